//! The command line, run as the built binary: `test` (passing, failing,
//! broken test files, the shipped rules), `check` on a broken rule, `replay`
//! with exact counts, `record` → `replay` against a real Redis, `--help` and
//! bad flags.

use std::process::Command;

use crate::util::*;

/// The seed's three subscriptions over the shipped rules.
const SHIPPED_SUBS: &str = "  - name: packet-error-alerts
    streams: [packet-counter-errors]
    rules: [\"packet_errors/alert*.rhai\"]
  - name: packet-error-logs
    streams: [packet-counter-errors]
    rules: [\"packet_errors/log*.rhai\"]
  - name: transceiver-alerts
    streams: [transceiver-telemetry]
    rules: [\"transceiver/*.rhai\"]
";

fn seed_project(extra: &[(&str, &str)]) -> Project {
    let alert = shipped("rules/packet_errors/alert.rhai");
    let log = shipped("rules/packet_errors/log.rhai");
    let rx = shipped("rules/transceiver/rx_power.rhai");
    let mut files = vec![
        ("rules/packet_errors/alert.rhai", alert.as_str()),
        ("rules/packet_errors/log.rhai", log.as_str()),
        ("rules/transceiver/rx_power.rhai", rx.as_str()),
    ];
    files.extend_from_slice(extra);
    Project::new(&config(SHIPPED_SUBS), &files)
}

const PASSING_TEST: &str = "\
tests:
  - name: fires then resolves
    steps:
      - payload: {hostname: core-1, interface: et-0/0/1, input_errors: 12000}
        expect:
          alerts: [{name: HighInputErrors, severity: major, labels: {hostname: core-1}}]
      - at: +30s
        payload: {hostname: core-1, interface: et-0/0/1, input_errors: 10}
        expect:
          alerts: [{name: HighInputErrors, status: resolved}]
          firing: []
";

const FAILING_TEST: &str = "\
rules: [packet_errors/alert.rhai]
tests:
  - name: passes
    steps:
      - payload: {hostname: core-1, interface: et-0/0/1, input_errors: 5}
        expect: {alerts: []}
  - name: expects the wrong severity
    steps:
      - payload: {hostname: core-1, interface: et-0/0/1, input_errors: 200}
      - at: +1m
        payload: {hostname: core-1, interface: et-0/0/1, input_errors: 12000}
        expect:
          alerts:
            - {name: HighInputErrors, severity: critical, labels: {hostname: core-1}}
";

#[test]
fn passing_test_file_exits_zero_with_summary() {
    let project = seed_project(&[("rules/packet_errors/alert.test.yaml", PASSING_TEST)]);
    let (code, out, err) = project.command(&["test"], None);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("ok    rules/packet_errors/alert.test.yaml (1 test)"),
        "{out}"
    );
    assert!(out.ends_with("\n1 passed, 0 failed\n"), "{out}");
}

#[test]
fn failing_test_prints_file_line_and_diff_and_exits_one() {
    let project = seed_project(&[("rules/packet_errors/wrong.test.yaml", FAILING_TEST)]);
    let (code, out, err) = project.command(&["test", "rules/packet_errors"], None);
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    let expected = "\
FAIL  rules/packet_errors/wrong.test.yaml (1 of 2 tests failed)

  --- FAIL rules/packet_errors/wrong.test.yaml:7: expects the wrong severity
    step 2 (rules/packet_errors/wrong.test.yaml:10; at 2025-01-01T00:01:00.000Z, stream packet-counter-errors, id 1735689660000-0):
      alerts (- expected but not produced, + produced but not expected):
        - firing critical HighInputErrors {hostname=core-1}
        + firing major HighInputErrors {hostname=core-1, interface=et-0/0/1} summary \"ALERT! High Input errors on router: core-1 interface et-0/0/1: 12000\" [rule packet_errors/alert]
";
    assert!(out.contains(expected), "got:\n{out}");
    assert!(out.ends_with("\n1 passed, 1 failed\n"), "{out}");
    assert!(err.contains("1 test failed"), "{err}");
}

#[test]
fn unknown_key_in_test_file_names_key_and_line() {
    let broken = "tests:\n  - name: typo\n    steps:\n      - paylod: {input_errors: 1}\n";
    let project = seed_project(&[("rules/packet_errors/alert.test.yaml", broken)]);
    let (code, out, _) = project.command(&["test"], None);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "rules/packet_errors/alert.test.yaml:4:9: tests[0].steps[0]: unknown field `paylod`"
        ),
        "{out}"
    );
    assert!(out.ends_with("\n0 passed, 1 failed\n"), "{out}");
}

#[test]
fn test_files_are_not_loaded_as_rules_or_plugins() {
    let project = seed_project(&[
        ("rules/packet_errors/alert.test.yaml", PASSING_TEST),
        ("plugins/console.test.yaml", "not: a manifest\n"),
    ]);
    let (code, out, err) = project.command(&["check"], None);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("3 rule(s), 0 sink(s)"), "{out}");
}

#[test]
fn shipped_rules_pass_their_tests() {
    let out = Command::new(bin())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("test")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for file in [
        "rules/packet_errors/alert.test.yaml",
        "rules/packet_errors/log.test.yaml",
        "rules/transceiver/rx_power.test.yaml",
    ] {
        assert!(stdout.contains(&format!("ok    {file}")), "{stdout}");
    }
    assert!(stdout.contains(" passed, 0 failed\n"), "{stdout}");
}

#[test]
fn check_reports_broken_rule_with_file_line_column() {
    let project = seed_project(&[(
        "rules/packet_errors/broken.rhai",
        "fn on_message(msg, ctx) {\n    let x = ;\n}\n",
    )]);
    let (code, out, err) = project.command(&["check"], None);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("rules/packet_errors/broken.rhai:2:13"),
        "stderr:\n{err}"
    );
}

/// Every kind of line a replay file can hold, with a known outcome each.
const REPLAY: &str = r#"{"stream":"packet-counter-errors","ts":"2025-01-01T00:00:00Z","hostname":"core-1","interface":"et-0/0/1","input_errors":12000}
{"stream":"packet-counter-errors","payload":{"hostname":"edge-2","interface":"xe-1/0/0","input_errors":600}}

{"stream":"packet-counter-errors","ts":"2025-01-01T00:01:00Z","fields":{"hostname":"core-1","interface":"et-0/0/1","input_errors":"5"}}
not json at all
{"stream":"transceiver-telemetry","hostname":"core-1","interface":"et-0/0/1","rx_power_dbm":-41.5}
{"stream":"transceiver-telemetry","hostname":"core-1","interface":"et-0/0/2","rx_power_dbm":"dark"}
{"stream":"elsewhere","x":1}
{"stream":"packet-counter-errors","payload":"{broken"}
{"hostname":"r9","interface":"x","input_errors":1}
"#;

#[test]
fn replay_prints_decisions_and_exact_summary() {
    let project = seed_project(&[("telemetry.jsonl", REPLAY)]);
    let (code, out, err) = project.command(&["replay", "telemetry.jsonl"], None);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let summary = "\
summary:
  lines: 9
  messages: 7
  malformed lines: 2
  read by no subscription: 1
  undecodable: 1
  logs: 3
  alerts: 3 (2 firing, 1 resolved)
    packet_errors/alert: 1 firing, 1 resolved
    transceiver/rx_power: 1 firing, 0 resolved
  drops: 0
  rule errors: 0
";
    assert!(out.ends_with(summary), "got:\n{out}");
    for line in [
        "1: packet-counter-errors 1735689600000-0 packet-error-alerts: ALERT FIRING major HighInputErrors {hostname=core-1, interface=et-0/0/1}",
        "2: packet-counter-errors 1735689600000-1 packet-error-logs: LOG warn packet_errors/log: low input errors on router edge-2 interface xe-1/0/0: 600",
        "4: packet-counter-errors 1735689660000-0 packet-error-alerts: ALERT RESOLVED major HighInputErrors",
        "5: MALFORMED not JSON",
        "6: transceiver-telemetry 1735689660000-1 transceiver-alerts: ALERT FIRING critical LowRxPower",
        "7: transceiver-telemetry 1735689660000-2 transceiver-alerts: LOG warn transceiver/rx_power: reading without a numeric rx_power_dbm",
        "8: elsewhere 1735689660000-3: SKIP no subscription reads stream `elsewhere`",
        "9: packet-counter-errors 1735689660000-4: UNDECODABLE field `payload` is not valid JSON",
        "10: MALFORMED no `stream` in the line and no --stream given",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
}

#[test]
fn replay_counts_rule_errors_and_drops_and_delivers_with_sinks() {
    let project = seed_project(&[
        (
            "rules/packet_errors/alert-0-guard.rhai",
            "fn on_message(msg, ctx) {\n  if msg.hostname == \"lab\" { drop(); }\n  if msg.hostname == \"bad\" { throw \"no good\"; }\n}\n",
        ),
        ("plugins/file.yaml", FILE_SINK),
        (
            "in.jsonl",
            "{\"hostname\":\"lab\",\"interface\":\"a\",\"input_errors\":50000}\n\
             {\"hostname\":\"bad\",\"interface\":\"a\",\"input_errors\":50000}\n\
             {\"hostname\":\"r1\",\"interface\":\"a\",\"input_errors\":50000}\n",
        ),
    ]);
    let (code, out, err) = project.command(
        &[
            "replay",
            "--stream",
            "packet-counter-errors",
            "--sinks",
            "--quiet",
            "in.jsonl",
        ],
        None,
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.starts_with("summary:\n"),
        "--quiet prints only the summary:\n{out}"
    );
    assert!(out.contains("\n  messages: 3\n"), "{out}");
    assert!(out.contains("\n  drops: 1\n"), "{out}");
    assert!(out.contains("\n  rule errors: 1\n"), "{out}");
    assert!(
        out.contains("\n    packet_errors/alert: 2 firing, 0 resolved\n"),
        "{out}"
    );
    assert!(
        out.ends_with("\n  delivered: 2 alert(s), 0 failed deliveries\n"),
        "{out}"
    );
    let delivered = project.json_lines("alerts.jsonl");
    let hosts: Vec<&str> = delivered
        .iter()
        .map(|a| a["labels"]["hostname"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["bad", "r1"]);
}

#[test]
fn record_then_replay_round_trips_a_real_stream() {
    let redis = RedisServer::start();
    let mut con = redis.conn();
    let project = seed_project(&[]);
    xadd_watermill(
        &mut con,
        "packet-counter-errors",
        r#"{"hostname":"core-1","interface":"et-0/0/1","input_errors":12000}"#,
    );
    // Entries on two streams in one millisecond get equal ids, and their
    // merge order is then a tie: keep each in its own millisecond.
    std::thread::sleep(std::time::Duration::from_millis(3));
    xadd(
        &mut con,
        "transceiver-telemetry",
        &[(
            "payload",
            br#"{"hostname":"core-1","interface":"et-0/0/1","rx_power_dbm":-41.5}"#,
        )],
    );
    std::thread::sleep(std::time::Duration::from_millis(3));
    xadd(
        &mut con,
        "packet-counter-errors",
        &[
            ("_watermill_message_uuid", b"u9"),
            ("payload", b"{not json"),
        ],
    );
    std::thread::sleep(std::time::Duration::from_millis(3));
    xadd(
        &mut con,
        "packet-counter-errors",
        &[
            ("hostname", b"core-1"),
            ("interface", b"et-0/0/1"),
            ("input_errors", b"700"),
        ],
    );
    let (code, out, err) = project.command(
        &[
            "record",
            "packet-counter-errors",
            "transceiver-telemetry",
            "-o",
            "rec.jsonl",
        ],
        Some(&redis.addr()),
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("record: 4 entries (packet-counter-errors 3, transceiver-telemetry 1)"),
        "{err}"
    );
    let lines = project.json_lines("rec.jsonl");
    let streams: Vec<&str> = lines
        .iter()
        .map(|l| l["stream"].as_str().unwrap())
        .collect();
    assert_eq!(
        streams,
        [
            "packet-counter-errors",
            "transceiver-telemetry",
            "packet-counter-errors",
            "packet-counter-errors"
        ],
        "merged in id order"
    );
    assert_eq!(lines[0]["payload"]["input_errors"], 12000);
    assert_eq!(lines[0]["metadata"]["source"], "test");
    assert_eq!(lines[2]["fields"]["payload"], "{not json");
    assert_eq!(lines[3]["fields"]["input_errors"], "700");

    // Replay needs no Redis: the address points nowhere.
    let (code, out, err) = project.command(&["replay", "rec.jsonl"], Some("127.0.0.1:1"));
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let summary = "\
summary:
  lines: 4
  messages: 4
  malformed lines: 0
  read by no subscription: 0
  undecodable: 1
  logs: 2
  alerts: 4 (3 firing, 1 resolved)
    packet_errors/alert: 2 firing, 1 resolved
    transceiver/rx_power: 1 firing, 0 resolved
  drops: 0
  rule errors: 0
";
    // 12,000 then 700 errors is a counter reset followed by 700 new errors
    // within a second: the rate alert fires too (rates span at least 1 s).
    assert!(out.ends_with(summary), "got:\n{out}");
    assert!(out.contains("ALERT FIRING major InputErrorRate"), "{out}");

    let (code, out, _) = project.command(
        &["record", "packet-counter-errors", "--count", "1"],
        Some(&redis.addr()),
    );
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1, "{out}");
}

#[test]
fn every_command_has_help_with_an_example() {
    let project = seed_project(&[]);
    for cmd in [
        "run",
        "check",
        "test",
        "replay",
        "record",
        "simulate",
        "completions",
        "man",
    ] {
        let (code, out, err) = project.command(&[cmd, "--help"], None);
        assert_eq!(code, 0, "{cmd}: {err}");
        assert!(
            out.contains("Example"),
            "{cmd} --help has no example:\n{out}"
        );
    }
}

#[test]
fn bad_flags_name_the_flag_and_exit_two() {
    let project = seed_project(&[]);
    let cases: [(&[&str], &str); 4] = [
        (&["replay", "--bogus", "x.jsonl"], "'--bogus'"),
        (&["simulate", "--rate", "fast"], "'--rate <RATE>'"),
        (&["record", "s", "--from", "yesterday"], "'--from <FROM>'"),
        (&["test", "--verbose=maybe"], "--verbose"),
    ];
    for (args, flag) in cases {
        let (code, _, err) = project.command(args, None);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?} should name {flag}:\n{err}");
    }
}

/// The shipped rules and their tests, without a config file of their own.
fn shipped_rules_and_tests() -> Vec<(&'static str, String)> {
    [
        "rules/packet_errors/alert.rhai",
        "rules/packet_errors/alert.test.yaml",
        "rules/packet_errors/log.rhai",
        "rules/packet_errors/log.test.yaml",
        "rules/transceiver/rx_power.rhai",
        "rules/transceiver/rx_power.test.yaml",
        "plugins/console.yaml",
    ]
    .into_iter()
    .map(|p| (p, shipped(p)))
    .collect()
}

fn project_with(config: &str, files: &[(&str, String)]) -> Project {
    let refs: Vec<(&str, &str)> = files.iter().map(|(p, t)| (*p, t.as_str())).collect();
    Project::new(config, &refs)
}

#[test]
fn config_without_subscriptions_gets_the_seeds_in_check_and_test() {
    let project = project_with("http: {enabled: false}\n", &shipped_rules_and_tests());
    let (code, out, err) = project.command(&["check"], None);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("OK: 3 subscription(s), 3 rule(s)"), "{out}");
    assert!(
        out.contains("transceiver-alerts (group transceiver-alerts, streams transceiver_telemetry, transceiver-telemetry): transceiver/rx_power"),
        "{out}"
    );
    assert!(
        out.contains("rule packet_errors/log runs only when: input_errors >= 500"),
        "{out}"
    );
    assert!(
        out.contains("rule packet_errors/alert declares alerts: RouterSilent (warning; hostname; checks silent_after 5m without input_errors), HighInputErrors (major; hostname, interface; checks input_errors at_least 10000, critical at 100000), InputErrorRate (major; hostname, interface; checks rate of input_errors above 50, clear 5)"),
        "{out}"
    );
    assert!(!err.contains("warning"), "{err}");
    let (code, out, err) = project.command(&["test"], None);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains(" passed, 0 failed\n"), "{out}");
}

#[test]
fn without_a_config_file_the_built_in_defaults_are_the_seeds() {
    let project = project_with("", &shipped_rules_and_tests());
    std::fs::remove_file(project.path("tripline.yaml")).unwrap();
    let (code, out, err) = project.command(&["check"], None);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("OK: 3 subscription(s), 3 rule(s)"), "{out}");
    assert!(
        out.contains("packet-error-logs (group packet-error-logs, streams packet-counter-errors): packet_errors/log"),
        "{out}"
    );
}

#[test]
fn check_lints_alert_maps_with_file_line_column() {
    let project = seed_project(&[(
        "rules/packet_errors/typo.rhai",
        "fn on_message(msg, ctx) {\n    if msg.input_errors > 5 {\n        alert(#{ name: \"Typo\", severity: \"crit\", labels: #{ h: msg.hostname } });\n    } else {\n        resolve(#{ name: \"Typo\", lables: #{ h: msg.hostname } });\n    }\n}\n",
    )]);
    let (code, out, err) = project.command(&["check"], None);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("rules/packet_errors/typo.rhai:3:42: alert(): severity `crit` is not one of info, warning, major, critical"),
        "{err}"
    );
    assert!(
        err.contains("rules/packet_errors/typo.rhai:5:34: resolve(): unknown field `lables`"),
        "{err}"
    );
}

#[test]
fn check_warns_when_no_sink_is_enabled_and_a_subscription_selects_no_rule() {
    let project = seed_project(&[]);
    let cfg = config(&format!(
        "{SHIPPED_SUBS}  - name: nothing\n    streams: [other]\n    rules: [\"typo/*.rhai\"]\n"
    ));
    project.write("tripline.yaml", &cfg);
    let (code, out, err) = project.command(&["check"], None);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("warning: subscription `nothing` selects no rule (`rules`: typo/*.rhai"),
        "{err}"
    );
    assert!(err.contains("warning: no sink is enabled"), "{err}");
    project.write("plugins/console.yaml", &shipped("plugins/console.yaml"));
    let (code, _, err) = project.command(&["check"], None);
    assert_eq!(code, 0);
    assert!(!err.contains("no sink is enabled"), "{err}");
}

/// A relative path in a manifest used to be relative to the directory
/// tripline was started in: under systemd (started in `/`) the same
/// checkout wrote elsewhere, or could not start its exec program.
#[test]
fn manifest_paths_are_relative_to_the_manifest_not_the_working_directory() {
    let alert = shipped("rules/packet_errors/alert.rhai");
    let project = Project::new(
        &config(SEED_SUBS),
        &[
            ("rules/packet_errors/alert.rhai", alert.as_str()),
            (
                "plugins/file.yaml",
                "name: file\nkind: file\npath: ../out/alerts.jsonl\n",
            ),
            (
                "plugins/exec.yaml",
                "name: exec\nkind: exec\ncommand: ./exec-example.py\nargs: [../exec-out.txt]\n",
            ),
        ],
    );
    std::fs::copy(
        format!("{}/plugins/exec-example.py", env!("CARGO_MANIFEST_DIR")),
        project.path("plugins/exec-example.py"),
    )
    .unwrap();
    let elsewhere = Project::new("", &[]);
    let redis = RedisServer::start();
    let cfg = project.path("tripline.yaml");
    let tl = elsewhere.start_with_args(&redis, &["--config", cfg.to_str().unwrap(), "run"]);
    let mut con = redis.conn();
    let id = xadd_watermill(
        &mut con,
        "packet-counter-errors",
        r#"{"hostname":"core-1","interface":"et-0/0/1","input_errors":12000}"#,
    );
    let delivered = wait_until(std::time::Duration::from_secs(20), || {
        !project.json_lines("out/alerts.jsonl").is_empty()
            && std::fs::read_to_string(project.path("exec-out.txt"))
                .is_ok_and(|t| t.contains("HighInputErrors"))
    });
    assert!(delivered, "entry {id}; stderr:\n{}", tl.stderr());
    assert_eq!(
        project.json_lines("out/alerts.jsonl")[0]["name"],
        "HighInputErrors"
    );
    assert!(!elsewhere.path("out").exists());
    assert!(!elsewhere.path("exec-out.txt").exists());
}

#[test]
fn http_listen_is_overridden_by_the_environment_and_a_busy_port_is_an_error() {
    let project = seed_project(&[]);
    project.write(
        "tripline.yaml",
        &format!(
            "instance: t-{}\nhttp: {{listen: \"127.0.0.1:1\"}}\nsubscriptions:\n{SHIPPED_SUBS}",
            free_port()
        ),
    );
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let redis = RedisServer::start();
    let mut tl = project.start_with_env(&redis, &["run"], &[("TRIPLINE_HTTP_LISTEN", &addr)]);
    let code = tl.wait(std::time::Duration::from_secs(20));
    assert!(matches!(code, Some(c) if c != 0), "{code:?}");
    let err = tl.stderr();
    assert!(
        err.contains(&format!("cannot listen on {addr}: Address already in use")),
        "{err}"
    );
}

#[test]
fn version_names_the_git_commit_of_the_checkout() {
    let out = Command::new(bin()).arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("tripline {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    let expected = checkout_commit().unwrap_or_else(|| "unknown".into());
    assert!(text.contains(&expected), "{text} should name {expected}");
}
