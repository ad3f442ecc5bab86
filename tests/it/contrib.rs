//! The operator's toolbox under `contrib/` and `examples/`, checked with the
//! tools that consume it: the Grafana dashboard's every query against a real
//! Prometheus scraping a real tripline, the alerting rules with `promtool`,
//! the systemd unit with `systemd-analyze`, the completions with `bash`, the
//! man page with `man`, and every example with `tripline check` and
//! `tripline test`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::*;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Whether `tool` can be started at all; a test that needs a missing one
/// prints why it skipped.
fn available(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn dashboard() -> Value {
    serde_json::from_str(&shipped("contrib/grafana/tripline.json"))
        .expect("contrib/grafana/tripline.json is JSON")
}

/// Every panel that is not a row, including those a collapsed row holds.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            out.extend(p["panels"].as_array().into_iter().flatten());
        } else {
            out.push(p);
        }
    }
    out
}

/// The dashboard's template variables of type `query`: (name, PromQL).
fn query_variables(d: &Value) -> Vec<(String, String)> {
    d["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .expect("a variable query");
            (v["name"].as_str().unwrap().to_string(), q.to_string())
        })
        .collect()
}

#[test]
fn grafana_dashboard_has_the_variables_and_panels_operators_need() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 39, "schemaVersion");
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()));
    let vars = d["templating"]["list"].as_array().unwrap();
    let ds = vars.iter().find(|v| v["type"] == "datasource").unwrap();
    assert_eq!(ds["query"], "prometheus");
    let names: Vec<&str> = vars.iter().map(|v| v["name"].as_str().unwrap()).collect();
    for want in ["datasource", "instance", "subscription", "sink"] {
        assert!(names.contains(&want), "variable {want} missing: {names:?}");
    }
    let ds_ref = format!("${{{}}}", ds["name"].as_str().unwrap());
    let mut ids = std::collections::HashSet::new();
    let mut cells: Vec<(u64, u64, u64, u64, &str)> = Vec::new();
    let rows = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "row");
    for p in rows.chain(panels(&d)) {
        let title = p["title"].as_str().unwrap();
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24, "{title} is wider than the grid");
        for (ox, oy, ow, oh, other) in &cells {
            let apart = x >= ox + ow || ox >= &(x + w) || y >= oy + oh || oy >= &(y + h);
            assert!(apart, "{title} overlaps {other}");
        }
        cells.push((x, y, w, h, title));
    }
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap();
        assert_eq!(p["datasource"]["uid"], ds_ref.as_str(), "{title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], ds_ref.as_str(), "{title}");
            assert!(t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()));
        }
    }
}

/// A variable value as Grafana puts it in a PromQL regex: metacharacters
/// escaped, and the backslash doubled inside the string literal.
fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push_str("\\\\");
        }
        out.push(c);
    }
    out
}

/// `$name` → `value` for every variable, longest names first so none is
/// replaced inside another.
fn substitute(q: &str, vars: &BTreeMap<String, String>) -> String {
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let mut out = q.to_string();
    for n in names {
        out = out.replace(&format!("${n}"), &vars[n]);
    }
    out
}

/// Rules for the dashboard's traffic: every `down` reading fires an alert
/// (and one a silence mutes), every `up` resolves it.
const DASH_LINK_RULE: &str = r#"
fn on_message(msg, ctx) {
    let labels = #{ hostname: msg.hostname };
    if msg.state == "down" {
        alert(#{ name: "DashLinkDown", severity: "critical", labels: labels, summary: "link down on {{hostname}}" });
        alert(#{ name: "DashMuted", severity: "warning", labels: labels });
    } else {
        resolve(#{ name: "DashLinkDown", labels: labels });
    }
}
"#;

/// Fails on every reading that carries `boom`.
const DASH_BOOM_RULE: &str = r#"
fn on_message(msg, ctx) {
    if "boom" in msg {
        throw "boom";
    }
}
"#;

#[test]
fn every_grafana_dashboard_query_returns_series_from_a_live_tripline() {
    let d = dashboard();
    let redis = RedisServer::start();
    let addr = format!("127.0.0.1:{}", free_port());
    let closed = free_port();
    let project = Project::new(
        &format!(
            "instance: dash-{}\nhttp:\n  listen: \"{addr}\"\nshutdown_timeout: 10s\nsubscriptions:\n  - name: telemetry\n    streams: [telemetry]\n",
            free_port()
        ),
        &[
            ("rules/dash/link.rhai", DASH_LINK_RULE),
            ("rules/dash/boom.rhai", DASH_BOOM_RULE),
            ("plugins/file.yaml", FILE_SINK),
            (
                "plugins/down.yaml",
                &format!(
                    "name: down\nkind: webhook\nurl: http://127.0.0.1:{closed}/alerts\nmax_attempts: 2\ntimeout: 2s\n"
                ),
            ),
        ],
    );
    let (code, out, err) = project.command(
        &["silence", "add", "alertname=DashMuted", "--duration", "1h"],
        Some(&redis.addr()),
    );
    assert_eq!(code, 0, "silence add: {out}{err}");
    let tl = project.start(&redis);
    tl.wait_ready(&addr);

    // Traffic until the end of the test: a link goes down and the previous
    // one comes back, and now and then a reading the boom rule fails on.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let mut con = redis.conn();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                xadd_watermill(
                    &mut con,
                    "telemetry",
                    &format!(r#"{{"hostname":"r{i}","state":"down"}}"#),
                );
                if i > 0 {
                    xadd_watermill(
                        &mut con,
                        "telemetry",
                        &format!(r#"{{"hostname":"r{}","state":"up"}}"#, i - 1),
                    );
                }
                if i.is_multiple_of(5) {
                    xadd_watermill(
                        &mut con,
                        "telemetry",
                        r#"{"hostname":"x","state":"up","boom":true}"#,
                    );
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };

    let prom = Prometheus::start(project.dir.path(), &addr);
    assert!(
        prom.wait_target_up(Duration::from_secs(60)),
        "target never up: {:?}\nprometheus log:\n{}",
        prom.api("/api/v1/targets"),
        prom.log()
    );

    // The variables, each resolved as Grafana would (label_values over the
    // earlier ones' values), must list something.
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    vars.insert("__rate_interval".into(), "10s".into());
    vars.insert("__interval".into(), "10s".into());
    let variables = query_variables(&d);
    for (name, q) in &variables {
        let inner = q
            .trim()
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {name}: not label_values(selector, label): {q}"));
        let (selector, label) = inner.rsplit_once(',').unwrap();
        let selector = substitute(selector.trim(), &vars);
        let path = format!(
            "/api/v1/label/{}/values?match[]={}",
            label.trim(),
            url_encode(&selector)
        );
        let mut values = Vec::new();
        wait_until(Duration::from_secs(60), || {
            values = prom
                .api(&path)
                .and_then(|v| v["data"].as_array().cloned())
                .unwrap_or_default();
            !values.is_empty()
        });
        assert!(
            !values.is_empty(),
            "variable {name} ({q}) lists nothing\ntripline stderr:\n{}",
            tl.stderr()
        );
        let alternatives: Vec<String> = values
            .iter()
            .map(|v| regex_escape(v.as_str().unwrap()))
            .collect();
        vars.insert(name.clone(), alternatives.join("|"));
    }

    // Every query of every panel, until each has returned a series.
    let mut pending: Vec<(String, String, String)> = Vec::new();
    let checked_panels = panels(&d);
    for p in &checked_panels {
        for t in p["targets"].as_array().unwrap() {
            pending.push((
                p["title"].as_str().unwrap().to_string(),
                t["refId"].as_str().unwrap().to_string(),
                substitute(t["expr"].as_str().unwrap(), &vars),
            ));
        }
    }
    let queries = pending.len();
    let end = Instant::now() + Duration::from_secs(120);
    while !pending.is_empty() && Instant::now() < end {
        pending.retain(|(title, ref_id, q)| match prom.query(q) {
            Ok(series) => series.is_empty(),
            Err(e) => panic!("panel {title:?} query {ref_id}: Prometheus refused `{q}`: {e}"),
        });
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::SeqCst);
    traffic.join().unwrap();
    assert!(
        pending.is_empty(),
        "{} of {queries} dashboard queries never returned a series:\n{}\n/metrics:\n{}\ntripline stderr:\n{}",
        pending.len(),
        pending
            .iter()
            .map(|(t, r, q)| format!("  {t} [{r}]: {q}"))
            .collect::<Vec<_>>()
            .join("\n"),
        http_call(&addr, "GET", "/metrics", &[], b"")
            .map(|r| r.text())
            .unwrap_or_default(),
        tl.stderr()
    );

    // The check is not vacuous: a renamed metric returns nothing.
    let renamed = substitute(
        r#"sum by (group, outcome) (rate(tripline_messages_renamed_total{job=~"$job"}[$__rate_interval]))"#,
        &vars,
    );
    assert_eq!(prom.query(&renamed), Ok(vec![]));
    println!(
        "dashboard: {} panels, {queries} queries and {} variables returned series",
        checked_panels.len(),
        variables.len()
    );
}

/// `expect` of a promtool test case: (alert name, whether it expects alerts).
fn promtool_cases(test_file: &Path) -> Vec<(String, bool)> {
    let y: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(test_file).unwrap()).unwrap();
    let mut out = Vec::new();
    for t in y["tests"].as_sequence().unwrap() {
        for case in t["alert_rule_test"].as_sequence().into_iter().flatten() {
            out.push((
                case["alertname"].as_str().unwrap().to_string(),
                case["exp_alerts"]
                    .as_sequence()
                    .is_some_and(|a| !a.is_empty()),
            ));
        }
    }
    out
}

#[test]
fn tripline_alerting_rules_pass_promtool_check_and_one_unit_test_per_alert() {
    if !available("promtool") {
        println!(
            "skipped: promtool is not installed (Debian package `prometheus`; scripts/test installs it)"
        );
        return;
    }
    let dir = repo("contrib/prometheus");
    let check = Command::new("promtool")
        .args(["check", "rules", "tripline-alerts.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));

    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("tripline-alerts.yml")).unwrap())
            .unwrap();
    let alerts: Vec<String> = rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap())
        .filter_map(|r| r["alert"].as_str().map(String::from))
        .collect();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("tests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    files.sort();
    for alert in &alerts {
        let testing: Vec<&PathBuf> = files
            .iter()
            .filter(|f| promtool_cases(f).iter().any(|(a, _)| a == alert))
            .collect();
        assert_eq!(testing.len(), 1, "{alert}: tested by {testing:?}");
        let cases = promtool_cases(testing[0]);
        assert!(
            cases.iter().all(|(a, _)| a == alert),
            "{testing:?} tests more than {alert}"
        );
        assert!(
            cases.iter().any(|(_, fires)| *fires) && cases.iter().any(|(_, fires)| !*fires),
            "{alert}: needs a case that fires and one that does not"
        );
    }
    assert_eq!(files.len(), alerts.len(), "one test file per alert");

    let test = Command::new("promtool")
        .args(["test", "rules"])
        .args(files.iter().map(|f| f.strip_prefix(&dir).unwrap()))
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(test.status.success(), "{}", text(&test));
    let report = String::from_utf8_lossy(&test.stdout);
    assert_eq!(report.matches("SUCCESS").count(), files.len(), "{report}");
    println!(
        "promtool: {} alerts, {} test files passed",
        alerts.len(),
        files.len()
    );
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = shipped("contrib/systemd/tripline.service");
    for line in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "StateDirectory=tripline",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} missing");
    }
    if !available("systemd-analyze") {
        println!("skipped: systemd-analyze is not installed (Debian package `systemd`)");
        return;
    }
    // verify wants the ExecStart binary and the Documentation= man page
    // to exist: this build's binary and its own `tripline man`.
    let dir = tempfile::tempdir().unwrap();
    let unit_path = dir.path().join("tripline.service");
    std::fs::write(&unit_path, unit.replace("/usr/local/bin/tripline", bin())).unwrap();
    let man_dir = dir.path().join("man/man1");
    std::fs::create_dir_all(&man_dir).unwrap();
    let man = Command::new(bin()).arg("man").output().unwrap();
    assert!(man.status.success(), "{}", text(&man));
    std::fs::write(man_dir.join("tripline.1"), &man.stdout).unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .env("MANPATH", dir.path().join("man"))
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", text(&verify));
    assert!(verify.stderr.is_empty(), "{}", text(&verify));
}

#[test]
fn completions_load_in_their_shells_and_the_man_page_renders() {
    let run = |args: &[&str]| {
        let out = Command::new(bin()).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let script = run(&["completions", shell]);
        assert!(script.contains("tripline"), "{shell}: {script}");
        // Every subcommand can be completed.
        for sub in ["run", "check", "test", "replay", "record", "silence", "man"] {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
        std::fs::write(dir.path().join(shell), &script).unwrap();
    }
    let bash = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -e; bash -n '{0}'; source '{0}'; complete -p tripline",
            dir.path().join("bash").display()
        ))
        .output()
        .unwrap();
    assert!(bash.status.success(), "{}", text(&bash));
    assert!(
        String::from_utf8_lossy(&bash.stdout).starts_with("complete "),
        "{}",
        text(&bash)
    );
    for (shell, flag) in [("zsh", "-n"), ("fish", "--no-execute")] {
        if available(shell) {
            let out = Command::new(shell)
                .arg(flag)
                .arg(dir.path().join(shell))
                .output()
                .unwrap();
            assert!(out.status.success(), "{shell}: {}", text(&out));
        } else {
            println!("{shell} is not installed: its completion was generated, not parsed");
        }
    }

    let page = dir.path().join("tripline.1");
    std::fs::write(&page, run(&["man"])).unwrap();
    let rendered = Command::new("man")
        .arg("-l")
        .arg(&page)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "80")
        .output()
        .unwrap();
    assert!(rendered.status.success(), "{}", text(&rendered));
    let rendered = String::from_utf8_lossy(&rendered.stdout);
    for want in ["NAME", "SYNOPSIS", "SUBCOMMANDS", "completions", "VERSION"] {
        assert!(rendered.contains(want), "{want} missing:\n{rendered}");
    }

    // The pages tripline(1) refers to, one per subcommand, render too.
    let pages = dir.path().join("man1");
    std::fs::create_dir_all(&pages).unwrap();
    run(&["man", "--out-dir", pages.to_str().unwrap()]);
    for page in [
        "tripline.1",
        "tripline-run.1",
        "tripline-silence-add.1",
        "tripline-man.1",
    ] {
        let out = Command::new("man")
            .arg("-l")
            .arg(pages.join(page))
            .env("MANPAGER", "cat")
            .output()
            .unwrap();
        assert!(
            out.status.success() && !out.stdout.is_empty(),
            "{page}: {}",
            text(&out)
        );
    }
}

/// The directories under `examples/`, each a complete setup.
fn examples() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(repo("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("tripline.yaml").is_file())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn every_example_passes_check_and_its_rule_tests() {
    let dirs = examples();
    assert!(dirs.len() >= 6, "{dirs:?}");
    let mut summary = Vec::new();
    for dir in &dirs {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        assert!(dir.join("README.md").is_file(), "{name}: README.md missing");
        let run = |args: &[&str]| {
            Command::new(bin())
                .current_dir(dir)
                .args(args)
                .env_remove("REDIS_ADDR")
                .output()
                .unwrap()
        };
        let check = run(&["check", "--config", "tripline.yaml"]);
        assert!(check.status.success(), "{name}: check\n{}", text(&check));
        let test = run(&["test", "--config", "tripline.yaml"]);
        assert!(test.status.success(), "{name}: test\n{}", text(&test));
        let out = String::from_utf8_lossy(&test.stdout).into_owned();
        let tally = out
            .lines()
            .find(|l| l.ends_with(" failed"))
            .unwrap_or_else(|| panic!("{name}: no tally\n{out}"))
            .to_string();
        assert!(
            tally.ends_with(" 0 failed") && !tally.starts_with("0 passed"),
            "{name}: {tally}"
        );
        summary.push(format!("{name}: {tally}"));
    }
    println!("{}", summary.join("\n"));
}

#[test]
fn python_exec_plugin_example_receives_the_alerts_of_a_replay() {
    if !available("python3") {
        println!("skipped: python3 is not installed (scripts/test installs it)");
        return;
    }
    let src = repo("examples/exec-plugin-python");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&src, dir.path());
    let out = Command::new(bin())
        .current_dir(dir.path())
        .args([
            "replay",
            "--sinks",
            "--config",
            "tripline.yaml",
            "readings.jsonl",
        ])
        .env_remove("REDIS_ADDR")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("0 failed deliveries"), "{}", text(&out));
    let tickets = std::fs::read_to_string(dir.path().join("tickets.jsonl"))
        .unwrap_or_else(|e| panic!("tickets.jsonl: {e}\n{}", text(&out)));
    let tickets: Vec<Value> = tickets
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(tickets.len(), 2, "{tickets:?}");
    assert_eq!(tickets[0]["action"], "open", "{tickets:?}");
    assert_eq!(tickets[0]["title"], "PSU failed on core-1 (psu 2)");
    assert_eq!(tickets[1]["action"], "close", "{tickets:?}");
    assert_eq!(tickets[0]["key"], tickets[1]["key"]);
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}
