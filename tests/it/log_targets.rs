//! Events log under the target of the module they concern (reload, source,
//! sinks, alert, redis), so a `RUST_LOG` directive per module selects
//! them, and a failed reload stays on one line.

use std::time::Duration;

use crate::util::*;

const SUBS: &str = "  - name: seen
    streams: [s]
";

const RULE: &str = r#"fn on_message(msg, ctx) {
    alert(#{ name: "Seen", severity: "warning", labels: #{ host: `${msg.host}` }, summary: "seen" });
}"#;

#[test]
fn rust_log_selects_events_by_their_module() {
    let redis = RedisServer::start();
    let project = Project::new(
        &config(SUBS),
        &[("rules/seen.rhai", RULE), ("plugins/file.yaml", FILE_SINK)],
    );
    let tl = project.start_with_env(
        &redis,
        &["--log-format", "json", "run"],
        &[(
            "RUST_LOG",
            "warn,tripline::reload=info,tripline::sinks=info",
        )],
    );
    tl.wait_for_log("watching rules and plugins for changes");
    xadd(&mut redis.conn(), "s", &[("host", b"r1")]);
    assert!(
        wait_until(Duration::from_secs(20), || !project
            .json_lines("alerts.jsonl")
            .is_empty()),
        "{}",
        tl.stderr()
    );
    project.write("rules/seen.rhai", &format!("{RULE}\n// edited\n"));
    tl.wait_for_log("rules reloaded");

    let lines: Vec<serde_json::Value> = tl
        .stderr()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let target_of = |text: &str| {
        lines
            .iter()
            .find(|l| l["fields"]["message"].as_str().unwrap().contains(text))
            .map(|l| l["target"].as_str().unwrap().to_string())
    };
    assert_eq!(
        target_of("rules reloaded").as_deref(),
        Some("tripline::reload")
    );
    assert_eq!(
        target_of("sink started").as_deref(),
        Some("tripline::sinks")
    );
    // Info of other modules is filtered out: the subscription starting
    // (tripline::source), the alert notified (tripline::alert), …
    assert_eq!(target_of("consuming"), None);
    for l in &lines {
        let target = l["target"].as_str().unwrap();
        assert!(
            l["level"] != "INFO"
                || target.starts_with("tripline::reload")
                || target.starts_with("tripline::sinks"),
            "{l}"
        );
    }
}

#[test]
fn reload_error_stays_on_one_log_line() {
    let redis = RedisServer::start();
    let project = Project::new(&config(SUBS), &[("rules/seen.rhai", RULE)]);
    let tl = project.start(&redis);
    tl.wait_for_log("watching rules and plugins for changes");
    project.write(
        "rules/broken_a.rhai",
        "fn on_message(msg, ctx) {\n  let = ;\n}\n",
    );
    project.write("rules/broken_b.rhai", "fn on_message(msg, ctx) {\n  x +\n");
    tl.wait_for_log("reload failed");
    assert!(
        wait_until(Duration::from_secs(10), || tl
            .stderr()
            .lines()
            .any(|l| l.contains("reload failed")
                && l.contains("broken_a.rhai")
                && l.contains("broken_b.rhai"))),
        "{}",
        tl.stderr()
    );
    // Every line is an event of its own: it starts with a timestamp.
    let stderr = tl.stderr();
    for line in stderr.lines() {
        assert!(
            line.starts_with(|c: char| c.is_ascii_digit()),
            "a continuation line: {line:?} in\n{stderr}"
        );
    }
    let failed = stderr
        .lines()
        .find(|l| l.contains("broken_a.rhai") && l.contains("broken_b.rhai"))
        .unwrap();
    assert!(failed.contains(".rhai:2:"), "{failed}");
    assert!(failed.contains("; "), "{failed}");
}
