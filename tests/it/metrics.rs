//! `/metrics` of a freshly started tripline with no traffic: every series
//! whose labels are known at start exists at 0 (so `rate()` and
//! `increase()` see the first event), also for a rule and a sink a reload
//! adds; the build info names the commit. Checked with a real
//! `promtool check metrics` and by parsing.

use std::time::Duration;

use crate::util::*;

const RULE: &str = "fn on_message(msg, ctx) { if msg.bad == true { throw \"bad\"; } }";

/// `(family, labels)` pairs that must be present at exactly 0 in `text`.
fn assert_zero(text: &str, expected: &[(&str, Vec<(&str, &str)>)]) {
    let missing: Vec<String> = expected
        .iter()
        .filter(|(name, labels)| sample(text, name, labels) != Some(0.0))
        .map(|(name, labels)| format!("{name}{labels:?} = {:?}", sample(text, name, labels)))
        .collect();
    assert!(missing.is_empty(), "not at 0: {missing:#?}\n---\n{text}");
}

/// The series one rule has from the moment it is compiled.
fn rule_series(rule: &str) -> Vec<(&'static str, Vec<(&'static str, &str)>)> {
    let mut out: Vec<(&'static str, Vec<(&'static str, &str)>)> =
        ["alert", "log", "drop", "pass", "error", "resolve"]
            .into_iter()
            .map(|d| {
                (
                    "tripline_rule_evaluations_total",
                    vec![("rule", rule), ("decision", d)],
                )
            })
            .collect();
    out.push(("tripline_rule_errors_total", vec![("rule", rule)]));
    out.push(("tripline_alerts_silenced_total", vec![("rule", rule)]));
    out.push((
        "tripline_rule_evaluation_seconds_count",
        vec![("rule", rule)],
    ));
    out
}

/// The series one sink has from the moment it starts (lag once measured,
/// which the dispatcher does first thing).
fn sink_series(sink: &str) -> Vec<(&'static str, Vec<(&'static str, &str)>)> {
    [
        "tripline_sink_deliveries_total",
        "tripline_sink_failures_total",
        "tripline_sink_retries_total",
        "tripline_sink_dead_letters_total",
        "tripline_sink_silenced_total",
        "tripline_sink_lag",
    ]
    .into_iter()
    .map(|f| (f, vec![("sink", sink)]))
    .collect()
}

fn scrape(addr: &str) -> String {
    let reply = http_call(addr, "GET", "/metrics", &[], b"").unwrap();
    assert_eq!(reply.status, 200);
    reply.text()
}

#[test]
fn fresh_tripline_exposes_every_known_series_at_zero_also_after_a_reload_adds_a_rule_and_a_sink() {
    let redis = RedisServer::start();
    let addr = format!("127.0.0.1:{}", free_port());
    let project = Project::new(
        &format!(
            "instance: zero-{}\nhttp:\n  listen: \"{addr}\"\nshutdown_timeout: 10s\nsubscriptions:\n  - name: telemetry\n    streams: [telemetry]\n",
            free_port()
        ),
        &[
            ("rules/first.rhai", RULE),
            ("plugins/file.yaml", FILE_SINK),
            (
                "plugins/exec.yaml",
                "name: exec\nkind: exec\ncommand: cat\n",
            ),
        ],
    );
    let tl = project.start(&redis);
    let measured = |text: &str, sink: &str| {
        sample(text, "tripline_sink_lag", &[("sink", sink)]).is_some()
            && sample(
                text,
                "tripline_consumer_pending",
                &[("stream", "telemetry")],
            )
            .is_some()
    };
    assert!(
        wait_until(Duration::from_secs(60), || http_call(
            &addr,
            "GET",
            "/metrics",
            &[],
            b""
        )
        .is_ok_and(
            |r| measured(&r.text(), "exec") && measured(&r.text(), "file")
        )),
        "sink lag and consumer position never measured; stderr:\n{}",
        tl.stderr()
    );
    let m = scrape(&addr);
    let (ok, report) = promtool_check(&m);
    assert!(ok, "promtool check metrics failed:\n{report}\n---\n{m}");

    let stream = [("stream", "telemetry"), ("group", "telemetry")];
    let mut expected: Vec<(&str, Vec<(&str, &str)>)> = Vec::new();
    for outcome in ["processed", "dropped", "dead_lettered", "error"] {
        let mut labels = stream.to_vec();
        labels.push(("outcome", outcome));
        expected.push(("tripline_messages_total", labels));
    }
    expected.push(("tripline_consumers_removed_total", stream.to_vec()));
    expected.push(("tripline_consumer_pending", stream.to_vec()));
    expected.push(("tripline_consumer_lag", stream.to_vec()));
    for reason in ["stale", "conflict"] {
        expected.push((
            "tripline_alert_state_redecisions_total",
            vec![("stream", "telemetry"), ("reason", reason)],
        ));
    }
    expected.extend(rule_series("first"));
    expected.extend(sink_series("file"));
    expected.extend(sink_series("exec"));
    expected.push(("tripline_sink_program_exits_total", vec![("sink", "exec")]));
    for result in [
        "accepted",
        "malformed",
        "invalid",
        "too_large",
        "unauthorized",
        "unavailable",
    ] {
        expected.push(("tripline_gateway_requests_total", vec![("result", result)]));
    }
    for result in [
        "accepted",
        "malformed",
        "unknown_stream",
        "too_large",
        "unauthorized",
        "unavailable",
    ] {
        expected.push(("tripline_ingest_requests_total", vec![("result", result)]));
    }
    expected.push((
        "tripline_ingest_entries_total",
        vec![("stream", "telemetry")],
    ));
    for kind in ["rules", "plugins"] {
        for result in ["success", "failure"] {
            expected.push((
                "tripline_reloads_total",
                vec![("kind", kind), ("result", result)],
            ));
        }
    }
    expected.push(("tripline_retired_alerts_unsent_total", vec![]));
    assert_zero(&m, &expected);
    // Only an exec sink runs a program.
    assert_eq!(
        sample(&m, "tripline_sink_program_exits_total", &[("sink", "file")]),
        None
    );
    // Alerts are counted by severity, which no rule states before it fires.
    assert!(!m.contains("tripline_alerts_total"), "{m}");
    let commit = checkout_commit().unwrap_or_else(|| "unknown".into());
    let build = samples(&m)
        .into_iter()
        .find(|(n, _, _)| n == "tripline_build_info")
        .unwrap_or_else(|| panic!("no build info in\n{m}"));
    assert_eq!(build.1["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        build.1["commit"].starts_with(&commit),
        "{build:?} vs {commit}"
    );

    // A reload adds a rule and a sink: theirs are at 0 from then on.
    project.write("rules/second.rhai", RULE);
    project.write(
        "plugins/second.yaml",
        "name: second\nkind: file\npath: ../second.jsonl\n",
    );
    let reload = http_call(&addr, "POST", "/-/reload", &[], b"").unwrap();
    assert_eq!(reload.status, 200, "{}", reload.text());
    assert!(
        wait_until(Duration::from_secs(30), || measured(
            &scrape(&addr),
            "second"
        )),
        "the added sink's lag was never measured; stderr:\n{}",
        tl.stderr()
    );
    let m = scrape(&addr);
    let (ok, report) = promtool_check(&m);
    assert!(ok, "promtool check metrics failed:\n{report}\n---\n{m}");
    let mut added = rule_series("second");
    added.extend(sink_series("second"));
    assert_zero(&m, &added);
    let reloads = sample(
        &m,
        "tripline_reloads_total",
        &[("kind", "rules"), ("result", "success")],
    );
    assert!(reloads.is_some_and(|n| n >= 1.0), "{m}");
}
