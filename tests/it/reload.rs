//! Hot reload against a real engine: rules edited on disk while it runs,
//! broken saves, the ways editors save a file, a removed rule's alerts, and
//! 100 reloads under a continuous stream.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::util::*;

const STREAM: &str = "readings";
const GROUP: &str = "readings-rules";
const SINK_GROUP: &str = "tripline-sink:file";
const RULE: &str = "rules/r.rhai";

/// A config with HTTP on `port`, one subscription on [`STREAM`], and
/// `extra` top-level keys.
fn reload_config(port: u16, extra: &str) -> String {
    format!(
        "instance: test-{port}\nhttp:\n  listen: \"127.0.0.1:{port}\"\nshutdown_timeout: 10s\n{extra}subscriptions:\n  - name: {GROUP}\n    streams: [{STREAM}]\n"
    )
}

/// A rule alerting on `value > limit`, labelled with the message's `seq`
/// and `version`, so each alert names its message and the rule version
/// that judged it.
fn rule(limit: u32, version: &str) -> String {
    format!(
        "const LIMIT = {limit};\n\
         fn on_message(msg, ctx) {{\n\
         \x20   if msg.value > LIMIT {{\n\
         \x20       alert(#{{ name: \"High\", labels: #{{ seq: `${{msg.seq}}`, version: \"{version}\" }} }});\n\
         \x20   }}\n\
         }}\n"
    )
}

/// An engine under test: its Redis, project, process and HTTP address.
/// Fields drop in order: the process stops before its files and its Redis.
struct Engine {
    tl: Tripline,
    http: String,
    project: Project,
    redis: RedisServer,
}

impl Engine {
    /// Starts tripline with `files` and waits until its file watcher runs.
    fn start(extra_config: &str, files: &[(&str, &str)]) -> Engine {
        let redis = RedisServer::start();
        let port = free_port();
        let project = Project::new(&reload_config(port, extra_config), files);
        let tl = project.start(&redis);
        let http = format!("127.0.0.1:{port}");
        tl.wait_watching(&http);
        Engine {
            tl,
            http,
            project,
            redis,
        }
    }

    /// The value of one series on /metrics (0 when absent).
    fn metric(&self, series: &str) -> f64 {
        let (status, text) = http_request(&self.http, "GET", "/metrics", "");
        assert_eq!(status, 200);
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }

    fn reloads(&self, kind: &str, result: &str) -> f64 {
        self.metric(&format!(
            "tripline_reloads_total{{kind=\"{kind}\",result=\"{result}\"}}"
        ))
    }

    /// Waits until `kind` has had `n` reloads with `result`.
    fn wait_reloads(&self, kind: &str, result: &str, n: f64) {
        assert!(
            wait_until(Duration::from_secs(10), || self.reloads(kind, result) >= n),
            "expected {n} {kind} reloads with result {result}, saw {}; stderr:\n{}",
            self.reloads(kind, result),
            self.tl.stderr()
        );
    }

    fn send(&self, seq: u64, value: u64) {
        let mut con = self.redis.conn();
        xadd(
            &mut con,
            STREAM,
            &[
                ("seq", seq.to_string().as_bytes()),
                ("value", value.to_string().as_bytes()),
            ],
        );
    }

    /// Waits until every entry is acknowledged and every alert it raised is
    /// delivered by the file sink, then returns the delivered alerts.
    fn settled_alerts(&self) -> Vec<serde_json::Value> {
        let mut con = self.redis.conn();
        let outbox = format!("tripline:alerts:{{{STREAM}}}");
        let settled = wait_until(Duration::from_secs(30), || {
            group_position(&mut con, STREAM, GROUP) == (0, 0)
                && (q(&mut con, &["EXISTS", &outbox]) == Value::Int(0)
                    || group_position(&mut con, &outbox, SINK_GROUP) == (0, 0))
        });
        assert!(settled, "not settled; stderr:\n{}", self.tl.stderr());
        self.project.json_lines("alerts.jsonl")
    }
}

/// (seq, version) of every delivered alert, in delivery order.
fn seq_versions(alerts: &[serde_json::Value]) -> Vec<(u64, String)> {
    alerts
        .iter()
        .map(|a| {
            (
                a["labels"]["seq"].as_str().unwrap().parse().unwrap(),
                a["labels"]["version"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn edited_threshold_judges_later_messages() {
    let e = Engine::start(
        "",
        &[(RULE, &rule(100, "1")), ("plugins/file.yaml", FILE_SINK)],
    );
    e.send(1, 150);
    assert_eq!(seq_versions(&e.settled_alerts()), [(1, "1".to_string())]);

    let before = e.reloads("rules", "success");
    e.project.write(RULE, &rule(200, "2"));
    e.wait_reloads("rules", "success", before + 1.0);
    e.send(2, 150);
    e.send(3, 250);
    let mut got = seq_versions(&e.settled_alerts());
    got.sort();
    assert_eq!(got, [(1, "1".to_string()), (3, "2".to_string())]);
    assert!(
        e.tl.stderr().contains("rules reloaded: changed r"),
        "{}",
        e.tl.stderr()
    );
}

#[test]
fn syntax_error_keeps_old_rules_until_the_file_is_fixed() {
    let e = Engine::start(
        "",
        &[(RULE, &rule(100, "1")), ("plugins/file.yaml", FILE_SINK)],
    );
    let in_sync = "tripline_config_in_sync{kind=\"rules\"}";
    assert_eq!(e.metric(in_sync), 1.0);

    let failures = e.reloads("rules", "failure");
    e.project.write(
        RULE,
        "const LIMIT = 100;\nfn on_message(msg, ctx) {\n    let x = ;\n}\n",
    );
    e.wait_reloads("rules", "failure", failures + 1.0);
    assert_eq!(e.metric(in_sync), 0.0);
    let location = "rules/r.rhai:3:13";
    assert!(e.tl.stderr().contains(location), "{}", e.tl.stderr());
    let (status, body) = http_request(&e.http, "POST", "/-/reload", "");
    assert_eq!(status, 500, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["rules"]["ok"], false);
    assert!(
        report["rules"]["error"]
            .as_str()
            .unwrap()
            .contains(location),
        "{body}"
    );

    // The old rules keep deciding.
    e.send(1, 150);
    assert_eq!(seq_versions(&e.settled_alerts()), [(1, "1".to_string())]);

    let successes = e.reloads("rules", "success");
    e.project.write(RULE, &rule(100, "2"));
    e.wait_reloads("rules", "success", successes + 1.0);
    assert_eq!(e.metric(in_sync), 1.0);
    e.send(2, 150);
    let mut got = seq_versions(&e.settled_alerts());
    got.sort();
    assert_eq!(got, [(1, "1".to_string()), (2, "2".to_string())]);
}

/// One way editors and tools save a file: writes `text` to `path`.
type Save = fn(&std::path::Path, &str);

fn rename_over(path: &std::path::Path, text: &str) {
    let tmp = path.with_file_name(".r.rhai.tmp4711");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn delete_and_create(path: &std::path::Path, text: &str) {
    std::fs::remove_file(path).unwrap();
    std::fs::write(path, text).unwrap();
}

fn truncate_and_write(path: &std::path::Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.flush().unwrap();
    std::thread::sleep(Duration::from_millis(10));
    f.write_all(text.as_bytes()).unwrap();
}

fn write_in_chunks(path: &std::path::Path, text: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    let bytes = text.as_bytes();
    for chunk in bytes.chunks(bytes.len() / 4 + 1) {
        f.write_all(chunk).unwrap();
        f.flush().unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Vim with `backupcopy=no`: probe file `4913`, swap file, original renamed
/// to a backup, new file written, backup removed.
fn like_vim(path: &std::path::Path, text: &str) {
    let dir = path.parent().unwrap();
    let swap = dir.join(".r.rhai.swp");
    std::fs::write(&swap, "b0VIM garbage").unwrap();
    std::fs::write(dir.join("4913"), "").unwrap();
    std::fs::remove_file(dir.join("4913")).unwrap();
    let backup = dir.join("r.rhai~");
    std::fs::rename(path, &backup).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::remove_file(&backup).unwrap();
    std::fs::remove_file(&swap).unwrap();
}

#[test]
fn each_way_of_saving_gives_one_reload_with_the_final_content() {
    let e = Engine::start(
        "",
        &[(RULE, &rule(100, "0")), ("plugins/file.yaml", FILE_SINK)],
    );
    let saves: [(&str, Save); 5] = [
        ("rename over", rename_over),
        ("delete and create", delete_and_create),
        ("truncate and write", truncate_and_write),
        ("write in chunks", write_in_chunks),
        ("like vim", like_vim),
    ];
    let successes = e.reloads("rules", "success");
    let failures = e.reloads("rules", "failure");
    for (i, (how, save)) in saves.iter().enumerate() {
        let version = (i + 1).to_string();
        save(&e.project.path(RULE), &rule(100, &version));
        e.wait_reloads("rules", "success", successes + i as f64 + 1.0);
        e.send(i as u64 + 1, 150);
        let got = seq_versions(&e.settled_alerts());
        assert_eq!(
            got.last(),
            Some(&(i as u64 + 1, version.clone())),
            "{how}: the final content is not in effect; stderr:\n{}",
            e.tl.stderr()
        );
        assert_eq!(
            e.reloads("rules", "success"),
            successes + i as f64 + 1.0,
            "{how}: more than one reload; stderr:\n{}",
            e.tl.stderr()
        );
    }
    assert_eq!(e.reloads("rules", "failure"), failures, "{}", e.tl.stderr());
    let log = e.tl.stderr();
    let reload_lines: Vec<&str> = log.lines().filter(|l| l.contains("rules reload")).collect();
    assert_eq!(reload_lines.len(), saves.len(), "{reload_lines:#?}");
    assert!(
        reload_lines.iter().all(|l| l.contains("changed r")),
        "{reload_lines:#?}"
    );
    assert_eq!(e.reloads("plugins", "success"), 0.0, "{log}");
}

#[test]
fn removed_rule_resolves_its_alerts_and_kept_rules_keep_their_state() {
    let keep = |summary: &str| {
        format!(
            "fn on_message(msg, ctx) {{\n\
             \x20   let labels = #{{ host: msg.host }};\n\
             \x20   if msg.value > 100 {{ alert(#{{ name: \"Keep\", labels: labels, summary: \"{summary}\" }}); }}\n\
             \x20   else {{ resolve(#{{ name: \"Keep\", labels: labels }}); }}\n\
             }}\n"
        )
    };
    let gone = "fn on_message(msg, ctx) {\n    if msg.value > 100 { alert(#{ name: \"Gone\", labels: #{ host: msg.host } }); }\n}\n";
    let e = Engine::start(
        "",
        &[
            ("rules/keep.rhai", &keep("v1")),
            ("rules/gone.rhai", gone),
            ("plugins/file.yaml", FILE_SINK),
        ],
    );
    let mut con = e.redis.conn();
    let send = |host: &str, value: &str| {
        let mut con = e.redis.conn();
        xadd(
            &mut con,
            STREAM,
            &[("host", host.as_bytes()), ("value", value.as_bytes())],
        );
    };
    send("r1", "150");
    let fired = e.settled_alerts();
    assert_eq!(fired.len(), 2, "{fired:?}");
    let fingerprint = |name: &str| {
        fired.iter().find(|a| a["name"] == name).unwrap()["fingerprint"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (keep_fp, gone_fp) = (fingerprint("Keep"), fingerprint("Gone"));

    let successes = e.reloads("rules", "success");
    std::fs::remove_file(e.project.path("rules/gone.rhai")).unwrap();
    e.wait_reloads("rules", "success", successes + 1.0);
    let outbox = format!("tripline:alerts:{{{STREAM}}}");
    assert!(
        wait_until(Duration::from_secs(10), || xrange(&mut con, &outbox).len()
            == 3),
        "no resolve written for the removed rule; stderr:\n{}",
        e.tl.stderr()
    );
    let alerts = e.settled_alerts();
    assert_eq!(alerts.len(), 3, "{alerts:#?}");
    assert_eq!(alerts[2]["fingerprint"], gone_fp.as_str());
    assert_eq!(alerts[2]["status"], "resolved");
    assert!(alerts[2]["ends_at"].is_string());
    assert_eq!(alerts[2]["origin"]["stream"], STREAM);

    // The kept rule changes; its alert is still firing, so asserting it
    // again notifies nobody, and a resolve is sent because it is firing.
    e.project.write("rules/keep.rhai", &keep("v2"));
    e.wait_reloads("rules", "success", successes + 2.0);
    // One at a time: two workers could judge them in either order.
    send("r1", "150");
    assert_eq!(e.settled_alerts().len(), 3);
    send("r1", "50");
    assert!(
        wait_until(Duration::from_secs(10), || e
            .project
            .json_lines("alerts.jsonl")
            .len()
            >= 4),
        "the kept rule's resolve never came; stderr:\n{}",
        e.tl.stderr()
    );
    let alerts = e.settled_alerts();
    assert_eq!(alerts.len(), 4, "{alerts:#?}");
    assert_eq!(alerts[3]["fingerprint"], keep_fp.as_str());
    assert_eq!(alerts[3]["status"], "resolved");
    let log = e.tl.stderr();
    assert!(log.contains("rules reloaded: removed gone"), "{log}");
    assert!(
        log.contains("state dropped, 1 firing alert(s) resolved"),
        "{log}"
    );
}

#[test]
fn saved_plugin_manifest_starts_a_sink_and_a_broken_one_keeps_the_old() {
    let e = Engine::start(
        "",
        &[(RULE, &rule(100, "1")), ("plugins/file.yaml", FILE_SINK)],
    );
    e.project.write(
        "plugins/second.yaml",
        "name: second\nkind: file\npath: ../second.jsonl\n",
    );
    e.wait_reloads("plugins", "success", 1.0);
    e.project
        .write("plugins/broken.yaml", "name: broken\nkind: nonsense\n");
    e.wait_reloads("plugins", "failure", 1.0);
    assert_eq!(e.metric("tripline_config_in_sync{kind=\"plugins\"}"), 0.0);
    e.send(1, 150);
    assert!(
        wait_until(Duration::from_secs(15), || e
            .project
            .json_lines("second.jsonl")
            .len()
            == 1),
        "the added sink delivered nothing; stderr:\n{}",
        e.tl.stderr()
    );
    assert_eq!(e.settled_alerts().len(), 1);
    assert!(e.tl.stderr().contains("broken.yaml"), "{}", e.tl.stderr());
    // A rule change reloads the rules only: the plugins' error, already
    // reported, is not reported again.
    e.project.write(RULE, &rule(100, "2"));
    e.wait_reloads("rules", "success", 1.0);
    assert_eq!(e.reloads("plugins", "failure"), 1.0);
}

#[test]
fn removed_rules_directory_keeps_the_running_set_and_is_watched_again() {
    let e = Engine::start(
        "",
        &[(RULE, &rule(100, "1")), ("plugins/file.yaml", FILE_SINK)],
    );
    std::fs::remove_dir_all(e.project.path("rules")).unwrap();
    e.wait_reloads("rules", "failure", 1.0);
    assert!(
        e.tl.stderr().contains("does not exist"),
        "{}",
        e.tl.stderr()
    );
    e.send(1, 150);
    assert_eq!(seq_versions(&e.settled_alerts()), [(1, "1".to_string())]);

    e.project.write(RULE, &rule(100, "2"));
    e.wait_reloads("rules", "success", 1.0);
    e.send(2, 150);
    let mut got = seq_versions(&e.settled_alerts());
    got.sort();
    assert_eq!(got, [(1, "1".to_string()), (2, "2".to_string())]);
}

#[test]
fn hundred_reloads_under_a_stream_judge_every_message_once() {
    let always = |version: &str| {
        format!(
            "fn on_message(msg, ctx) {{\n    alert(#{{ name: \"Seen\", labels: #{{ seq: `${{msg.seq}}`, version: \"{version}\" }} }});\n}}\n"
        )
    };
    // Every assertion notifies, so a message judged twice shows up twice.
    let e = Engine::start(
        "alerts:\n  repeat_interval: 0s\n",
        &[(RULE, &always("a")), ("plugins/file.yaml", FILE_SINK)],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let producer = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let mut con = e.redis.conn();
        std::thread::spawn(move || {
            let mut seq = 0u64;
            while !stop.load(Ordering::SeqCst) || seq < 3000 {
                seq += 1;
                xadd(
                    &mut con,
                    STREAM,
                    &[("seq", seq.to_string().as_bytes()), ("value", b"1")],
                );
                sent.store(seq, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let successes = e.reloads("rules", "success");
    for i in 1..=100 {
        let version = if i % 2 == 1 { "b" } else { "a" };
        e.project.write(RULE, &always(version));
        e.wait_reloads("rules", "success", successes + f64::from(i));
    }
    stop.store(true, Ordering::SeqCst);
    producer.join().unwrap();
    let sent = sent.load(Ordering::SeqCst);

    let alerts = e.settled_alerts();
    let mut per_seq: HashMap<u64, Vec<String>> = HashMap::new();
    for (seq, version) in seq_versions(&alerts) {
        per_seq.entry(seq).or_default().push(version);
    }
    let twice: Vec<_> = per_seq.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(twice.is_empty(), "judged more than once: {twice:?}");
    let missing: Vec<u64> = (1..=sent).filter(|s| !per_seq.contains_key(s)).collect();
    assert!(missing.is_empty(), "never judged: {missing:?}");
    assert_eq!(alerts.len() as u64, sent);
    for version in ["a", "b"] {
        assert!(
            per_seq.values().any(|v| v[0] == version),
            "no message judged by version {version}"
        );
    }
    assert_eq!(e.reloads("rules", "success"), successes + 100.0);
    assert_eq!(e.reloads("rules", "failure"), 0.0);
    let mut con = e.redis.conn();
    assert_eq!(group_position(&mut con, STREAM, GROUP), (0, 0));
    assert!(pending_ids(&mut con, STREAM, GROUP).is_empty());
}
