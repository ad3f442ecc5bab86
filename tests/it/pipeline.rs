//! The core pipeline against a real Redis: both seed groups, dead-letters,
//! claiming from dead consumers, Redis restarts, SIGTERM, runaway rules.

use std::collections::HashSet;
use std::time::Duration;

use crate::util::*;

fn seed_project() -> Project {
    Project::new(
        &config(SEED_SUBS),
        &[
            (
                "rules/packet_errors/alert.rhai",
                &shipped("rules/packet_errors/alert.rhai"),
            ),
            (
                "rules/packet_errors/log.rhai",
                &shipped("rules/packet_errors/log.rhai"),
            ),
            ("plugins/file.yaml", FILE_SINK),
        ],
    )
}

#[test]
fn seed_envelope_reaches_both_groups() {
    let redis = RedisServer::start();
    let project = seed_project();
    let mut con = redis.conn();
    let tl = project.start(&redis);
    xadd_watermill(
        &mut con,
        "packet-counter-errors",
        r#"{"hostname":"core-1","interface":"et-0/0/1","input_errors":12000}"#,
    );
    xadd_watermill(
        &mut con,
        "packet-counter-errors",
        r#"{"hostname":"edge-2","interface":"xe-1/0/0","input_errors":600}"#,
    );
    assert!(
        wait_until(Duration::from_secs(15), || !project
            .json_lines("alerts.jsonl")
            .is_empty()),
        "no alert delivered; stderr:\n{}",
        tl.stderr()
    );
    let alerts = project.json_lines("alerts.jsonl");
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["name"], "HighInputErrors");
    assert_eq!(alerts[0]["severity"], "major");
    assert_eq!(alerts[0]["labels"]["hostname"], "core-1");
    assert!(
        alerts[0]["annotations"]["summary"]
            .as_str()
            .unwrap()
            .starts_with("ALERT! High Input errors on router: core-1")
    );
    assert!(wait_until(Duration::from_secs(10), || tl
        .stderr()
        .contains(
            "low input errors on router edge-2 interface xe-1/0/0: 600"
        )));
    for group in ["packet-error-alerts", "packet-error-logs"] {
        assert!(
            wait_until(Duration::from_secs(10), || group_position(
                &mut con,
                "packet-counter-errors",
                group
            ) == (0, 0)),
            "{group} still has pending or lag: {:?}",
            group_position(&mut con, "packet-counter-errors", group)
        );
    }
}

#[test]
fn malformed_entries_are_dead_lettered_and_engine_keeps_running() {
    let redis = RedisServer::start();
    let project = seed_project();
    let mut con = redis.conn();
    let tl = project.start(&redis);
    let bad = [
        xadd(
            &mut con,
            "packet-counter-errors",
            &[
                ("_watermill_message_uuid", b"u1"),
                ("payload", b"{not json"),
            ],
        ),
        xadd(
            &mut con,
            "packet-counter-errors",
            &[
                ("_watermill_message_uuid", b"u2"),
                ("metadata", &[0xc1, 0x00, 0xff]),
                ("payload", b"{}"),
            ],
        ),
        xadd(&mut con, "packet-counter-errors", &[("payload", b"")]),
    ];
    let good = xadd_watermill(
        &mut con,
        "packet-counter-errors",
        r#"{"hostname":"r9","interface":"i","input_errors":50000}"#,
    );
    assert!(
        wait_until(Duration::from_secs(15), || !project
            .json_lines("alerts.jsonl")
            .is_empty()),
        "engine stopped after malformed input; stderr:\n{}",
        tl.stderr()
    );
    assert_eq!(project.json_lines("alerts.jsonl")[0]["origin"]["id"], good);
    // Each of the two groups dead-letters each bad entry once.
    assert!(wait_until(Duration::from_secs(10), || xrange(
        &mut con,
        "packet-counter-errors:dead"
    )
    .len()
        == 6));
    let dead = xrange(&mut con, "packet-counter-errors:dead");
    for id in &bad {
        let rows: Vec<_> = dead
            .iter()
            .filter(|(_, f)| f["tripline_source_id"] == *id)
            .collect();
        assert_eq!(rows.len(), 2, "{id}: {dead:?}");
        assert!(!rows[0].1["tripline_reason"].is_empty());
    }
    let reasons: Vec<&str> = dead
        .iter()
        .map(|(_, f)| f["tripline_reason"].as_str())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("not valid JSON")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("msgpack")), "{reasons:?}");
    // The original fields travel with the dead letter.
    assert!(
        dead.iter()
            .any(|(_, f)| f.get("payload").map(String::as_str) == Some("{not json"))
    );
    for group in ["packet-error-alerts", "packet-error-logs"] {
        assert!(wait_until(Duration::from_secs(10), || group_position(
            &mut con,
            "packet-counter-errors",
            group
        ) == (0, 0)));
    }
}

const COUNT_RULE: &str = "fn on_message(msg, ctx) {
    alert(#{ name: \"Seen\", severity: \"info\", labels: #{ seq: msg.seq } });
}";

pub(crate) fn counting_project(extra: &str) -> Project {
    Project::new(
        &config(&format!(
            "  - name: counter
    streams: [s]
    batch_size: 50
{extra}"
        )),
        &[
            ("rules/count.rhai", COUNT_RULE),
            ("plugins/file.yaml", FILE_SINK),
        ],
    )
}

#[test]
fn dead_consumer_pending_is_claimed_and_over_delivered_entry_dead_lettered() {
    let redis = RedisServer::start();
    let mut con = redis.conn();
    q(
        &mut con,
        &["XGROUP", "CREATE", "s", "counter", "0", "MKSTREAM"],
    );
    let ids: Vec<String> = (0..5)
        .map(|i| xadd(&mut con, "s", &[("seq", i.to_string().as_bytes())]))
        .collect();
    // A consumer reads them and dies without acking.
    q(
        &mut con,
        &[
            "XREADGROUP",
            "GROUP",
            "counter",
            "dead-one",
            "COUNT",
            "10",
            "STREAMS",
            "s",
            ">",
        ],
    );
    // One entry has already been delivered many times (a poison message).
    q(
        &mut con,
        &[
            "XCLAIM",
            "s",
            "counter",
            "dead-one",
            "0",
            &ids[4],
            "RETRYCOUNT",
            "9",
        ],
    );
    let project = counting_project(
        "    claim_min_idle: 1s\n    claim_interval: 300ms\n    max_deliveries: 5\n",
    );
    let tl = project.start(&redis);
    assert!(
        wait_until(Duration::from_secs(20), || project
            .json_lines("alerts.jsonl")
            .len()
            >= 4),
        "pending entries of the dead consumer were not claimed; stderr:\n{}",
        tl.stderr()
    );
    let seqs: HashSet<String> = project
        .json_lines("alerts.jsonl")
        .iter()
        .map(|a| a["labels"]["seq"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        seqs,
        ["0", "1", "2", "3"].iter().map(|s| s.to_string()).collect()
    );
    assert!(wait_until(Duration::from_secs(10), || xrange(
        &mut con, "s:dead"
    )
    .len()
        == 1));
    let dead = xrange(&mut con, "s:dead");
    assert_eq!(dead[0].1["tripline_source_id"], ids[4]);
    assert!(
        dead[0].1["tripline_reason"].contains("max_deliveries"),
        "{dead:?}"
    );
    assert!(wait_until(Duration::from_secs(10), || pending_ids(
        &mut con, "s", "counter"
    )
    .is_empty()));
}

pub(crate) fn seqs_delivered(project: &Project) -> HashSet<u64> {
    project
        .json_lines("alerts.jsonl")
        .iter()
        .map(|a| a["labels"]["seq"].as_str().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn survives_redis_restart_mid_stream() {
    let mut redis = RedisServer::start_persistent();
    let project = counting_project("");
    let tl = project.start(&redis);
    let total = 600u64;
    let mut con = redis.conn();
    for i in 0..total / 2 {
        xadd(&mut con, "s", &[("seq", i.to_string().as_bytes())]);
    }
    std::thread::sleep(Duration::from_millis(300));
    redis.restart();
    std::thread::sleep(Duration::from_millis(500));
    let mut con = redis.conn();
    for i in total / 2..total {
        xadd(&mut con, "s", &[("seq", i.to_string().as_bytes())]);
    }
    assert!(
        wait_until(Duration::from_secs(30), || seqs_delivered(&project).len()
            as u64
            == total),
        "missing after restart: {} of {total}; stderr:\n{}",
        seqs_delivered(&project).len(),
        tl.stderr()
    );
    assert!(wait_until(Duration::from_secs(10), || group_position(
        &mut con, "s", "counter"
    ) == (0, 0)));
    assert!(
        tl.stderr().contains("Redis unreachable"),
        "outage was not logged"
    );
}

#[test]
fn sigterm_mid_stream_loses_nothing_and_acks_nothing_unprocessed() {
    let redis = RedisServer::start();
    let mut con = redis.conn();
    let total = 20_000;
    let mut pipe = redis::pipe();
    for i in 0..total {
        pipe.cmd("XADD")
            .arg("s")
            .arg("*")
            .arg("seq")
            .arg(i)
            .ignore();
    }
    let _: () = pipe.query(&mut con).unwrap();
    let project = counting_project("");
    let mut tl = project.start(&redis);
    // Let it get busy, then stop it mid-stream.
    assert!(wait_until(Duration::from_secs(20), || {
        let v: Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg("s")
            .query(&mut con)
            .unwrap();
        format!("{v:?}").contains("counter")
            && group_position(&mut con, "s", "counter").1 < total - 500
    }));
    tl.signal("TERM");
    assert_eq!(
        tl.wait(Duration::from_secs(20)),
        Some(0),
        "stderr:\n{}",
        tl.stderr()
    );

    let outbox: HashSet<String> = xrange(&mut con, "tripline:alerts:{s}")
        .into_iter()
        .map(|(_, f)| {
            let a: serde_json::Value = serde_json::from_str(&f["alert"]).unwrap();
            a["origin"]["id"].as_str().unwrap().to_string()
        })
        .collect();
    let pending: HashSet<String> = pending_ids(&mut con, "s", "counter").into_iter().collect();
    let (_, lag) = group_position(&mut con, "s", "counter");
    assert!(
        outbox.is_disjoint(&pending),
        "an entry is both acked and pending"
    );
    // A graceful stop judges what it read (the batch read ahead included).
    assert!(
        pending.is_empty(),
        "{} entries read before SIGTERM were left pending",
        pending.len()
    );
    // Every entry is either committed with its alert, or never read.
    assert_eq!(
        outbox.len() + pending.len() + lag as usize,
        total as usize,
        "outbox {} pending {} lag {lag}",
        outbox.len(),
        pending.len()
    );
    assert!(!outbox.is_empty());
}

#[test]
fn endless_loop_rule_is_stopped_and_next_rule_still_alerts() {
    let redis = RedisServer::start();
    let project = Project::new(
        &config("  - name: loops\n    streams: [s]\n"),
        &[
            ("rules/a_loop.rhai", "fn on_message(msg, ctx) { loop { } }"),
            (
                "rules/b_alert.rhai",
                "fn on_message(msg, ctx) { alert(#{ name: \"StillHere\", severity: \"critical\" }); }",
            ),
            ("plugins/file.yaml", FILE_SINK),
        ],
    );
    let tl = project.start(&redis);
    let mut con = redis.conn();
    let id = xadd(&mut con, "s", &[("x", b"1")]);
    assert!(
        wait_until(Duration::from_secs(15), || !project
            .json_lines("alerts.jsonl")
            .is_empty()),
        "stderr:\n{}",
        tl.stderr()
    );
    assert_eq!(project.json_lines("alerts.jsonl")[0]["name"], "StillHere");
    let err = tl.stderr();
    assert!(
        err.contains("a_loop") && err.contains(&id) && err.contains("operations"),
        "the stopped rule was not logged with its name and the message id:\n{err}"
    );
    assert!(wait_until(Duration::from_secs(10), || group_position(
        &mut con, "s", "loops"
    ) == (0, 0)));
}
