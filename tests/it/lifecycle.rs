//! Alert lifecycle across instances: state lives in Redis, so two tripline
//! instances in one group notify each alert once and resolve it once.

use std::collections::HashMap;
use std::time::Duration;

use crate::util::*;

const RULE: &str = r#"
fn on_message(msg, ctx) {
    let a = #{ name: "Hot", severity: "major", labels: #{ host: msg.host } };
    if msg.v >= 100 { alert(a); } else { resolve(a); }
}"#;

/// (firing, resolved) notification counts per host, from the file sink.
fn counts(project: &Project) -> HashMap<String, (usize, usize)> {
    let mut m: HashMap<String, (usize, usize)> = HashMap::new();
    for a in project.json_lines("alerts.jsonl") {
        let host = a["labels"]["host"].as_str().unwrap().to_string();
        let e = m.entry(host).or_default();
        match a["status"].as_str().unwrap() {
            "firing" => e.0 += 1,
            _ => e.1 += 1,
        }
    }
    m
}

#[test]
fn two_instances_notify_each_alert_and_its_resolve_exactly_once() {
    let redis = RedisServer::start();
    let project = Project::new(
        "http:\n  enabled: false\nsubscriptions:\n  - name: hot\n    streams: [s]\n    batch_size: 5\n    concurrency: 2\n",
        &[("rules/hot.rhai", RULE), ("plugins/file.yaml", FILE_SINK)],
    );
    // Same config, same host name: the instance lease gives them distinct
    // consumer names.
    let a = project.start(&redis);
    let b = project.start(&redis);
    let mut con = redis.conn();
    let hosts = 40;
    for round in 0..6 {
        for h in 0..hosts {
            let v = 100 + round;
            xadd(
                &mut con,
                "s",
                &[
                    ("host", format!("h{h}").as_bytes()),
                    ("v", v.to_string().as_bytes()),
                ],
            );
        }
    }
    assert!(
        wait_until(Duration::from_secs(20), || counts(&project).len() == hosts),
        "a: {}\nb: {}",
        a.stderr(),
        b.stderr()
    );
    assert!(wait_until(Duration::from_secs(10), || group_position(
        &mut con, "s", "hot"
    ) == (0, 0)));
    for round in 0..6 {
        for h in 0..hosts {
            xadd(
                &mut con,
                "s",
                &[
                    ("host", format!("h{h}").as_bytes()),
                    ("v", round.to_string().as_bytes()),
                ],
            );
        }
    }
    assert!(
        wait_until(Duration::from_secs(30), || counts(&project)
            .values()
            .all(|c| c.1 >= 1)),
        "not every alert resolved: {:?}\na: {}\nb: {}",
        counts(&project),
        a.stderr(),
        b.stderr()
    );
    assert!(wait_until(Duration::from_secs(10), || group_position(
        &mut con, "s", "hot"
    ) == (0, 0)));
    std::thread::sleep(Duration::from_millis(500));
    let c = counts(&project);
    for h in 0..hosts {
        assert_eq!(c[&format!("h{h}")], (1, 1), "host h{h}: {c:?}");
    }
    // Both instances really did commit notifications (each logs its own).
    for (name, tl) in [("a", &a), ("b", &b)] {
        assert!(
            tl.stderr().contains("alert=Hot"),
            "instance {name} notified nothing, so the test proves nothing:\n{}",
            tl.stderr()
        );
    }
}

/// Two instances on two streams of one hash tag share one lifecycle. Both
/// start by reading the (empty) state whole, so each knows its cache equals
/// Redis and commits with one generation check instead of a version check
/// per alert. Then A fires, and B, whose cache still says "not firing",
/// gets the reading that resolves it: B's commit must see that the
/// generation moved and decide again on fresh state, or the resolve is lost.
#[test]
fn a_cache_known_current_notices_that_another_instance_wrote() {
    let redis = RedisServer::start();
    let config = |stream: &str| {
        format!(
            "http:\n  enabled: false\nsubscriptions:\n  - name: hot\n    streams: [\"{stream}\"]\n"
        )
    };
    let files = [("rules/hot.rhai", RULE), ("plugins/file.yaml", FILE_SINK)];
    let pa = Project::new(&config("a{t}"), &files);
    let pb = Project::new(&config("b{t}"), &files);
    let debug = [("RUST_LOG", "info,tripline=debug")];
    let a = pa.start_with_env(&redis, &["run"], &debug);
    let b = pb.start_with_env(&redis, &["run"], &debug);
    // Each reads the whole state on its first timer tick (after 1 s).
    std::thread::sleep(Duration::from_millis(2500));
    // Either instance's sink may deliver a notification: count both files.
    let total = || {
        let mut c = counts(&pa);
        for (h, (f, r)) in counts(&pb) {
            let e = c.entry(h).or_default();
            e.0 += f;
            e.1 += r;
        }
        c.get("h").copied().unwrap_or_default()
    };
    let mut con = redis.conn();
    xadd(&mut con, "a{t}", &[("host", b"h"), ("v", b"100")]);
    assert!(
        wait_until(Duration::from_secs(10), || total() == (1, 0)),
        "{:?}\na: {}",
        total(),
        a.stderr()
    );
    xadd(&mut con, "b{t}", &[("host", b"h"), ("v", b"0")]);
    assert!(
        wait_until(Duration::from_secs(10), || total() == (1, 1)),
        "the resolve was lost: {:?}\nb: {}",
        total(),
        b.stderr()
    );
    assert!(
        b.stderr().contains("deciding again"),
        "B never committed on a cache it believed current, so this proves nothing:\n{}",
        b.stderr()
    );
    // A still believes the alert firing: its resolve must not be sent a
    // second time, and the next firing must be.
    xadd(&mut con, "a{t}", &[("host", b"h"), ("v", b"0")]);
    xadd(&mut con, "a{t}", &[("host", b"h"), ("v", b"100")]);
    assert!(
        wait_until(Duration::from_secs(10), || total() == (2, 1)),
        "{:?}\na: {}",
        total(),
        a.stderr()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(total(), (2, 1));
}

#[test]
fn deadman_fires_when_a_series_goes_silent_and_resolves_when_it_returns() {
    let redis = RedisServer::start();
    let project = Project::new(
        "http:\n  enabled: false\nalerts:\n  timer_interval: 100ms\nsubscriptions:\n  - name: dm\n    streams: [s]\n",
        &[
            (
                "rules/dm.rhai",
                r#"fn on_message(msg, ctx) {
                    deadman(#{ name: "Silent", severity: "critical", labels: #{ host: msg.host } }, "1s");
                }"#,
            ),
            ("plugins/file.yaml", FILE_SINK),
        ],
    );
    let tl = project.start(&redis);
    let mut con = redis.conn();
    xadd(&mut con, "s", &[("host", b"quiet")]);
    assert!(
        wait_until(Duration::from_secs(15), || counts(&project).get("quiet")
            == Some(&(1, 0))),
        "{}",
        tl.stderr()
    );
    xadd(&mut con, "s", &[("host", b"quiet")]);
    assert!(wait_until(Duration::from_secs(10), || counts(&project)
        .get("quiet")
        == Some(&(1, 1))));
}

#[test]
fn silences_from_http_and_cli_mute_matching_notifications_on_every_instance() {
    let redis = RedisServer::start();
    let port = free_port();
    let project = Project::new(
        &format!(
            "http:\n  listen: 127.0.0.1:{port}\nsubscriptions:\n  - name: hot\n    streams: [s]\n"
        ),
        &[("rules/hot.rhai", RULE), ("plugins/file.yaml", FILE_SINK)],
    );
    let tl = project.start(&redis);
    let addr = format!("127.0.0.1:{port}");
    assert!(wait_until(Duration::from_secs(20), || {
        http_call(&addr, "GET", "/readyz", &[], b"").is_ok_and(|r| r.status == 200)
    }));
    let (status, body) = http_request(
        &addr,
        "POST",
        "/api/silences",
        r#"{"matchers": ["host=~muted-.*", "alertname=Hot"], "duration": "1h", "comment": "maintenance"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let bad = http_request(
        &addr,
        "POST",
        "/api/silences",
        r#"{"matchers": [], "duration": "1h"}"#,
    );
    assert_eq!(bad.0, 400, "{}", bad.1);
    // A second silence through the CLI, against the same Redis.
    let (code, out, err) = project.command(
        &["silence", "add", "host=other-1", "--duration", "1h"],
        Some(&redis.addr()),
    );
    assert_eq!(code, 0, "{out}{err}");
    let cli_id = out.split_whitespace().next().unwrap().to_string();
    // Let the instance pick the silences up (refreshed every 2 s).
    std::thread::sleep(Duration::from_millis(2500));

    let mut con = redis.conn();
    for host in ["muted-1", "muted-2", "other-1", "loud-1"] {
        xadd(&mut con, "s", &[("host", host.as_bytes()), ("v", b"500")]);
    }
    assert!(
        wait_until(Duration::from_secs(15), || counts(&project)
            .contains_key("loud-1")),
        "{}",
        tl.stderr()
    );
    assert!(wait_until(Duration::from_secs(10), || http_request(
        &addr, "GET", "/metrics", ""
    )
    .1
    .contains("tripline_sink_silenced_total{sink=\"file\"} 3")));
    let c = counts(&project);
    assert_eq!(c.len(), 1, "only the unsilenced alert is delivered: {c:?}");

    // Expire the CLI silence: the next notification for that host is sent.
    let (code, out, err) = project.command(&["silence", "expire", &cli_id], Some(&redis.addr()));
    assert_eq!(code, 0, "{out}{err}");
    let listed = http_request(&addr, "GET", "/api/silences", "").1;
    assert!(
        !listed.contains(&cli_id) && listed.contains("maintenance"),
        "{listed}"
    );
    std::thread::sleep(Duration::from_millis(2500));
    xadd(&mut con, "s", &[("host", b"other-1"), ("v", b"1")]);
    xadd(&mut con, "s", &[("host", b"other-1"), ("v", b"600")]);
    assert!(
        wait_until(Duration::from_secs(15), || counts(&project)
            .contains_key("other-1")),
        "{}",
        tl.stderr()
    );
}

#[test]
fn admin_token_guards_reload_and_silence_changes_but_not_reads() {
    let redis = RedisServer::start();
    let port = free_port();
    let project = Project::new(
        &format!(
            "http:\n  listen: 127.0.0.1:{port}\n  admin_token_env: TRIPLINE_TEST_ADMIN\nsubscriptions:\n  - name: hot\n    streams: [s]\n"
        ),
        &[("rules/hot.rhai", RULE)],
    );
    let tl = project.start_with_env(&redis, &["run"], &[("TRIPLINE_TEST_ADMIN", "adm1n")]);
    let addr = format!("127.0.0.1:{port}");
    assert!(
        wait_until(Duration::from_secs(20), || {
            http_call(&addr, "GET", "/readyz", &[], b"").is_ok_and(|r| r.status == 200)
        }),
        "{}",
        tl.stderr()
    );
    let silence = br#"{"matchers": ["host=a"], "duration": "1h"}"#;
    let bearer = [("Authorization", "Bearer adm1n")];
    let wrong = [("Authorization", "Bearer nope")];
    let call = |method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]| {
        http_call(&addr, method, path, headers, body)
            .unwrap()
            .status
    };
    assert_eq!(call("POST", "/-/reload", &[], b""), 401);
    assert_eq!(call("POST", "/-/reload", &wrong, b""), 401);
    assert_eq!(call("POST", "/-/reload", &bearer, b""), 200);
    assert_eq!(call("POST", "/api/silences", &[], silence), 401);
    let added = http_call(&addr, "POST", "/api/silences", &bearer, silence).unwrap();
    assert_eq!(added.status, 200, "{}", added.text());
    let id = added.json()["id"].as_str().unwrap().to_string();
    assert_eq!(
        call("GET", "/api/silences", &[], b""),
        200,
        "reads stay open"
    );
    let path = format!("/api/silences/{id}");
    assert_eq!(call("DELETE", &path, &[], b""), 401);
    assert_eq!(call("DELETE", &path, &bearer, b""), 200);
    // `check` fails when the variable is missing, naming it.
    let (code, _, err) = project.command(&["check"], Some(&redis.addr()));
    assert_ne!(code, 0);
    assert!(err.contains("TRIPLINE_TEST_ADMIN"), "{err}");
}
