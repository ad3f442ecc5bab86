//! The rule sandbox against real processes: `import` refused by `check` and
//! by a live reload, a runaway rule stopped and logged with its position
//! while the message's next rule still alerts, and a label from a missing
//! field failing the rule instead of alerting with an empty label.

use std::time::Duration;

use crate::util::*;

const STREAM: &str = "readings";

/// One subscription on [`STREAM`] over every rule; HTTP on `port` when
/// given.
fn sandbox_config(port: Option<u16>) -> String {
    let http = match port {
        Some(port) => format!("http:\n  listen: \"127.0.0.1:{port}\"\n"),
        None => "http:\n  enabled: false\n".to_string(),
    };
    format!(
        "instance: sandbox-{}\n{http}shutdown_timeout: 10s\nsubscriptions:\n  - name: readings-rules\n    streams: [{STREAM}]\n",
        free_port()
    )
}

/// A rule that would alert if a module it imported got loaded.
const SECRET_MODULE: &str = "export const LOADED = true;\n";

const ALERTS_ON_LOADED: &str = "fn on_message(msg, ctx) {\n    alert(#{ name: \"Loaded\" });\n}\n";

#[test]
fn check_refuses_import_at_top_level_and_in_on_message_relative_or_absolute() {
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("secret.rhai"), SECRET_MODULE).unwrap();
    let absolute = secrets.path().join("secret").display().to_string();
    let inside = format!("fn on_message(msg, ctx) {{\n    import \"{absolute}\" as s;\n}}\n");
    let project = Project::new(
        &sandbox_config(None),
        &[
            ("secret.rhai", SECRET_MODULE),
            (
                "rules/top.rhai",
                &format!("import \"secret\" as s;\n{ALERTS_ON_LOADED}"),
            ),
            ("rules/inside.rhai", &inside),
        ],
    );
    let (code, out, err) = project.command(&["check"], None);
    assert_ne!(code, 0, "stdout:\n{out}");
    let reason = "rules cannot import modules (sandbox)";
    for expected in [
        format!("rules/top.rhai:1:1: {reason}"),
        "`import \"secret\" as s`".to_string(),
        format!("rules/inside.rhai:2:5: {reason}"),
        format!("`import \"{absolute}\" as s`"),
    ] {
        assert!(err.contains(&expected), "{expected} not in:\n{err}");
    }
}

#[test]
fn reload_refuses_an_import_and_the_running_rules_keep_alerting() {
    let redis = RedisServer::start();
    let port = free_port();
    let project = Project::new(
        &sandbox_config(Some(port)),
        &[
            ("rules/r.rhai", ALERTS_ON_LOADED),
            ("plugins/file.yaml", FILE_SINK),
        ],
    );
    std::fs::write(project.path("secret.rhai"), SECRET_MODULE).unwrap();
    let tl = project.start(&redis);
    let http = format!("127.0.0.1:{port}");
    tl.wait_watching(&http);

    project.write(
        "rules/r.rhai",
        "fn on_message(msg, ctx) {\n    import \"../secret\" as s;\n    alert(#{ name: \"Imported\" });\n}\n",
    );
    let location = "rules/r.rhai:2:5: rules cannot import modules (sandbox)";
    assert!(
        wait_until(Duration::from_secs(10), || tl.stderr().contains(location)),
        "the watcher did not report the import; stderr:\n{}",
        tl.stderr()
    );
    let (status, body) = http_request(&http, "POST", "/-/reload", "");
    assert_eq!(status, 500, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        report["rules"]["error"]
            .as_str()
            .unwrap()
            .contains(location),
        "{body}"
    );

    let mut con = redis.conn();
    xadd(&mut con, STREAM, &[("value", b"1")]);
    assert!(
        wait_until(Duration::from_secs(15), || !project
            .json_lines("alerts.jsonl")
            .is_empty()),
        "no alert; stderr:\n{}",
        tl.stderr()
    );
    let alerts = project.json_lines("alerts.jsonl");
    assert_eq!(alerts[0]["name"], "Loaded", "{alerts:?}");
}

#[test]
fn runaway_rule_is_logged_with_its_file_and_limit_and_the_next_rule_still_alerts() {
    let redis = RedisServer::start();
    let project = Project::new(
        &sandbox_config(None),
        &[
            (
                "rules/a_runaway.rhai",
                "fn on_message(msg, ctx) {\n    let a = [];\n    loop { a.push(a.len()); }\n}\n",
            ),
            (
                "rules/b_alert.rhai",
                "fn on_message(msg, ctx) {\n    alert(#{ name: \"After\", labels: #{ host: msg.host } });\n}\n",
            ),
            ("plugins/file.yaml", FILE_SINK),
        ],
    );
    let tl = project.start(&redis);
    let mut con = redis.conn();
    xadd(&mut con, STREAM, &[("host", b"r1")]);
    assert!(
        wait_until(Duration::from_secs(20), || !project
            .json_lines("alerts.jsonl")
            .is_empty()),
        "no alert from the rule after the runaway; stderr:\n{}",
        tl.stderr()
    );
    let stderr = tl.stderr();
    let failed = stderr
        .lines()
        .find(|l| l.contains("rule failed: a_runaway.rhai"))
        .unwrap_or_else(|| panic!("no rule error naming the file in:\n{stderr}"));
    assert!(failed.contains("limits."), "{failed}");
    assert_eq!(
        project.json_lines("alerts.jsonl")[0]["labels"]["host"],
        "r1"
    );
}

#[test]
fn missing_hostname_is_a_rule_error_not_an_empty_label() {
    let redis = RedisServer::start();
    let project = Project::new(
        &sandbox_config(None),
        &[
            (
                "rules/r.rhai",
                "fn on_message(msg, ctx) {\n    alert(#{ name: \"Down\", labels: #{ hostname: msg.hostname } });\n}\n",
            ),
            ("plugins/file.yaml", FILE_SINK),
        ],
    );
    let tl = project.start(&redis);
    let mut con = redis.conn();
    xadd(&mut con, STREAM, &[("interface", b"et-0/0/1")]);
    xadd(&mut con, STREAM, &[("hostname", b"core-1")]);
    assert!(
        wait_until(Duration::from_secs(20), || !project
            .json_lines("alerts.jsonl")
            .is_empty()
            && tl.stderr().contains("rule failed")),
        "stderr:\n{}",
        tl.stderr()
    );
    let stderr = tl.stderr();
    assert!(
        stderr.contains("r.rhai:2:5: Runtime error: alert(): label `hostname` is ()"),
        "{stderr}"
    );
    // Both entries are judged (the later one alerted): nothing more comes.
    std::thread::sleep(Duration::from_millis(500));
    let alerts = project.json_lines("alerts.jsonl");
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["labels"]["hostname"], "core-1");
}
