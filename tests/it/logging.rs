//! Logs: `--log-format json` writes one JSON object per line, `RUST_LOG`
//! filters by level and target, human logs carry no colour codes when they
//! go to a file, and a broken `RUST_LOG` is reported.

use std::process::Command;
use std::time::Duration;

use crate::util::*;

const SUBS: &str = "  - name: logs
    streams: [packet-counter-errors]
    rules: [\"log.rhai\"]
";

const LOG_RULE: &str = r#"fn on_message(msg, ctx) {
    log("warn", `warned about ${msg.hostname}`);
    log("info", `informed about ${msg.hostname}`);
}"#;

#[test]
fn json_logs_are_one_object_per_line_and_rust_log_filters_by_target() {
    let redis = RedisServer::start();
    let project = Project::new(&config(SUBS), &[("rules/log.rhai", LOG_RULE)]);
    let tl = project.start_with_env(
        &redis,
        &["--log-format", "json", "run"],
        &[("RUST_LOG", "warn,tripline::app=info")],
    );
    let mut con = redis.conn();
    xadd(&mut con, "packet-counter-errors", &[("hostname", b"r7")]);
    assert!(
        wait_until(Duration::from_secs(15), || tl
            .stderr()
            .contains("warned about r7")),
        "stderr:\n{}",
        tl.stderr()
    );
    let stderr = tl.stderr();
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object ({e}): {l}"))
        })
        .collect();
    for l in &lines {
        assert!(l["timestamp"].is_string(), "{l}");
        assert!(l["fields"]["message"].is_string(), "{l}");
    }
    let find = |text: &str| {
        lines
            .iter()
            .find(|l| l["fields"]["message"].as_str().unwrap().contains(text))
    };
    let warned = find("warned about r7").unwrap();
    assert_eq!(warned["level"], "WARN");
    assert_eq!(warned["target"], "tripline::rule");
    assert_eq!(warned["fields"]["rule"], "log");
    // info is let through for tripline::app only.
    let starting = find("tripline starting").expect("tripline::app=info");
    assert_eq!(starting["level"], "INFO");
    assert!(find("informed about r7").is_none(), "{stderr}");
    assert!(
        lines
            .iter()
            .all(|l| l["level"] != "INFO" || l["target"] == "tripline::app"),
        "{stderr}"
    );
}

#[test]
fn human_logs_to_a_file_are_plain_and_bad_rust_log_is_reported() {
    let project = Project::new(&config(SUBS), &[("rules/log.rhai", LOG_RULE)]);
    let run = |rust_log: &str| {
        let out = Command::new(bin())
            .current_dir(project.dir.path())
            .arg("check")
            .env("RUST_LOG", rust_log)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stderr).unwrap()
    };
    let debug = run("debug");
    assert!(debug.contains("DEBUG"), "{debug}");
    assert!(!debug.contains('\x1b'), "colour codes in a file: {debug:?}");
    let bad = run("tripline=loud");
    assert!(
        bad.contains("ignoring invalid RUST_LOG `tripline=loud`"),
        "{bad}"
    );
}
