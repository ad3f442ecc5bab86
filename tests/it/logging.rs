//! Logs: `--log-format json` writes one JSON object per line, `RUST_LOG`
//! filters by level and target, human logs carry no colour codes when they
//! go to a file, and a broken `RUST_LOG` is reported.
//!
//! Hostile text: a hostname carrying a newline, CR, ESC sequences, C1
//! controls, U+2028 and 20,000 more bytes stays on one line in every
//! human-facing output (text log, console sink, `replay`, `test`,
//! `silence list`) and is kept exactly in the JSON ones.

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

/// A line a reader would take for one of tripline's own log lines.
const FORGED_LOG: &str = "1999-01-01T00:00:00.000000Z ERROR tripline::app: FORGED";

/// A hostname that tries every way of breaking out of its line.
fn hostile_hostname() -> String {
    format!(
        "r1\n{FORGED_LOG}\r\x1b[2J\x1b[31mred\nFIRING critical Forged {{}} forged [rule x]\n  + firing critical Forged\u{2028}sep\u{2029}\u{85}c1\u{9b}2J\x07\x7f\u{202e}txt.exe\u{2066}{}",
        "A".repeat(20_000)
    )
}

/// What an escaped hostile hostname starts with.
const ESCAPED_START: &str = r"r1\n1999-01-01T00:00:00.000000Z ERROR tripline::app: FORGED\r\x1b[2J\x1b[31mred\nFIRING critical Forged {} forged [rule x]\n  + firing critical Forged\u{2028}sep\u{2029}\u{85}c1\u{9b}2J\x07\x7f\u{202e}txt.exe\u{2066}";

/// Fails when `text` holds a raw control character, line separator or
/// bidirectional override.
fn assert_no_raw_controls(what: &str, text: &str) {
    let bidi =
        |c: char| ('\u{202a}'..='\u{202e}').contains(&c) || ('\u{2066}'..='\u{2069}').contains(&c);
    let bad: Vec<char> = text
        .chars()
        .filter(|&c| c != '\n' && (c.is_control() || c == '\u{2028}' || c == '\u{2029}' || bidi(c)))
        .collect();
    assert!(bad.is_empty(), "{what} carries raw {bad:?}");
}

const HOSTILE_RULE: &str = r#"fn on_message(msg, ctx) {
    log("warn", `host ${msg.hostname}`);
    alert(#{ name: "Hostile", severity: "critical", labels: #{ hostname: msg.hostname }, summary: `down: ${msg.hostname}` });
}"#;

const HOSTILE_SUBS: &str = "  - name: hostile
    streams: [s]
";

#[test]
fn hostile_hostname_forges_no_log_line_and_no_console_alert() {
    let redis = RedisServer::start();
    let project = Project::new(
        &config(HOSTILE_SUBS),
        &[
            ("rules/hostile.rhai", HOSTILE_RULE),
            ("plugins/console.yaml", "name: console\nkind: console\n"),
            ("plugins/file.yaml", FILE_SINK),
        ],
    );
    let tl = project.start(&redis);
    let hostile = hostile_hostname();
    let mut con = redis.conn();
    xadd(&mut con, "s", &[("hostname", hostile.as_bytes())]);
    assert!(
        wait_until(Duration::from_secs(15), || tl.stdout().contains("Hostile")
            && tl.stderr().contains("host r1")
            && !project.json_lines("alerts.jsonl").is_empty()),
        "stdout:\n{}\nstderr:\n{}",
        tl.stdout(),
        tl.stderr()
    );

    let stderr = tl.stderr();
    assert_no_raw_controls("the text log", &stderr);
    for line in stderr.lines() {
        let b = line.as_bytes();
        assert!(
            b.len() > 27 && b[4] == b'-' && b[10] == b'T' && !line.starts_with("1999-"),
            "a log line without its own timestamp: {line:?}"
        );
    }
    // The rule's log line and the alert's both carry the hostname, escaped.
    let mentions: Vec<&str> = stderr.lines().filter(|l| l.contains("FORGED")).collect();
    for line in &mentions {
        assert!(
            line.contains(ESCAPED_START),
            "{}",
            &line[..300.min(line.len())]
        );
    }
    assert!(
        mentions
            .iter()
            .any(|l| l.contains(&format!("WARN tripline::rule: host {ESCAPED_START}AAAA"))),
        "no rule log line with the escaped hostname"
    );

    let stdout = tl.stdout();
    assert_no_raw_controls("the console sink", &stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one alert, one line:\n{stdout}");
    assert!(
        lines[0].starts_with("FIRING critical Hostile {hostname="),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains(ESCAPED_START), "{}", lines[0]);

    // The file sink writes JSON: the hostname arrives exactly as sent.
    let alerts = project.json_lines("alerts.jsonl");
    assert_eq!(alerts[0]["labels"]["hostname"], hostile.as_str());
}

#[test]
fn a_hostile_value_in_a_checked_field_is_warned_about_escaped_on_one_line() {
    let redis = RedisServer::start();
    let project = Project::new(
        &config(HOSTILE_SUBS),
        &[(
            "rules/checked.rhai",
            r#"const HOT = alert_kind(#{ name: "Hot", labels: ["hostname"], check: #{ field: "t", above: 1 } });"#,
        )],
    );
    let tl = project.start(&redis);
    let hostile = hostile_hostname();
    let mut con = redis.conn();
    xadd(
        &mut con,
        "s",
        &[("hostname", b"r1"), ("t", hostile.as_bytes())],
    );
    assert!(
        wait_until(Duration::from_secs(15), || tl
            .stderr()
            .contains("reading without a numeric t: r1")),
        "{}",
        tl.stderr()
    );
    let stderr = tl.stderr();
    assert_no_raw_controls("the text log", &stderr);
    let warning: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("reading without a numeric t"))
        .collect();
    assert_eq!(warning.len(), 1, "{stderr}");
    assert!(
        warning[0].contains(&format!(
            "reading without a numeric t: {}",
            &ESCAPED_START[..60]
        )),
        "{}",
        warning[0]
    );
    assert!(
        warning[0].len() < 600 && !warning[0].contains("AAAA"),
        "the value is cut: {}",
        warning[0]
    );
}

#[test]
fn hostile_hostname_stays_on_one_line_in_replay() {
    let project = Project::new(
        &config(HOSTILE_SUBS),
        &[("rules/hostile.rhai", HOSTILE_RULE)],
    );
    let hostile = hostile_hostname();
    let record = serde_json::json!({"stream": "s", "hostname": hostile});
    project.write("hostile.jsonl", &format!("{record}\n"));
    let (code, stdout, stderr) = project.command(&["replay", "hostile.jsonl"], None);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_no_raw_controls("replay", &stdout);
    let decisions: Vec<&str> = stdout.lines().filter(|l| l.starts_with("1: ")).collect();
    assert_eq!(decisions.len(), 2, "one LOG and one ALERT line:\n{stdout}");
    assert!(
        decisions[0].contains(&format!("LOG warn hostile: host {ESCAPED_START}")),
        "{}",
        decisions[0]
    );
    assert!(
        decisions[1].contains(&format!(
            "ALERT FIRING critical Hostile {{hostname={ESCAPED_START}"
        )),
        "{}",
        decisions[1]
    );
    // Everything else is the summary.
    let rest = stdout.lines().filter(|l| !l.starts_with("1: "));
    for line in rest {
        assert!(
            line == "summary:" || line.starts_with("  "),
            "forged line {line:?}"
        );
    }
}

#[test]
fn hostile_hostname_stays_on_one_line_in_a_failed_rule_test() {
    // YAML's own escapes: \e is ESC, \L U+2028, \N U+0085.
    let test = r#"stream: s
tests:
  - name: hostile
    steps:
      - fields: {hostname: "r1\n1999-01-01T00:00:00.000000Z ERROR tripline::app: FORGED\r\e[2J\n  + firing critical Forged {} [rule x]\L\N"}
        expect: {alerts: []}
"#;
    let project = Project::new(
        &config(HOSTILE_SUBS),
        &[
            ("rules/hostile.rhai", HOSTILE_RULE),
            ("rules/hostile.test.yaml", test),
        ],
    );
    let (code, stdout, stderr) = project.command(&["test"], None);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert_no_raw_controls("tripline test", &stdout);
    let produced: Vec<&str> = stdout.lines().filter(|l| l.contains("+ firing")).collect();
    assert_eq!(
        produced.len(),
        1,
        "one unexpected alert, one line:\n{stdout}"
    );
    assert!(
        produced[0].contains(r"{hostname=r1\n1999-01-01T00:00:00.000000Z ERROR tripline::app: FORGED\r\x1b[2J\n  + firing critical Forged {} [rule x]\u{2028}\u{85}}"),
        "{}",
        produced[0]
    );
    assert!(!stdout.lines().any(|l| l.starts_with("1999-")), "{stdout}");
}

#[test]
fn hostile_silence_stays_on_one_line_in_silence_list() {
    let redis = RedisServer::start();
    let project = Project::new(&config(HOSTILE_SUBS), &[]);
    let hostile = "r1\n1999-01-01T00:00:00.000000Z ERROR tripline::app: FORGED\r\x1b[2J\u{2028}";
    let matcher = format!("hostname={hostile}");
    let (code, stdout, stderr) = project.command(
        &[
            "silence",
            "add",
            &matcher,
            "--duration",
            "1h",
            "--comment",
            hostile,
            "--created-by",
            hostile,
        ],
        Some(&redis.addr()),
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let (code, stdout, stderr) = project.command(&["silence", "list"], Some(&redis.addr()));
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_no_raw_controls("silence list", &stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let escaped = r"r1\n1999-01-01T00:00:00.000000Z ERROR tripline::app: FORGED\r\x1b[2J\u{2028}";
    assert!(stdout.contains(&format!("hostname={escaped}")), "{stdout}");
    assert!(
        stdout.trim_end().ends_with(&format!(": {escaped}")),
        "{stdout}"
    );
}
