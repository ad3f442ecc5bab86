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
///
/// One worker per instance: A's last two readings (v=0, then v=100) must be
/// judged in order. With two workers each may read one of them, and
/// whichever takes the partition's gate first commits first; when the
/// v=100 one wins, the v=0 one then resolves the firing it raised, a second
/// resolve that is right for that commit order (it flaked so under load).
/// Readings of one series judged by different consumers are not ordered
/// (docs/scale-out.md, "Sharded topics"); this test is about the generation check.
#[test]
fn a_cache_known_current_notices_that_another_instance_wrote() {
    let redis = RedisServer::start();
    let config = |stream: &str| {
        format!(
            "http:\n  enabled: false\nsubscriptions:\n  - name: hot\n    streams: [\"{stream}\"]\n    concurrency: 1\n"
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
        "{:?}\nalerts: {:?}\n{:?}\na: {}\nb: {}",
        total(),
        pa.json_lines("alerts.jsonl"),
        pb.json_lines("alerts.jsonl"),
        a.stderr(),
        b.stderr()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(total(), (2, 1), "a: {}\nb: {}", a.stderr(), b.stderr());
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
    tl.wait_ready(&addr);
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
    .contains("tripline_alerts_silenced_total{rule=\"hot\"} 3")));
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
    tl.wait_ready(&addr);
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

/// Milliseconds since the epoch, on the clock the engine stamps alerts with.
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn rfc3339_ms(text: &str) -> u64 {
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap()
        .timestamp_millis() as u64
}

/// A collector reporting every 0.1 s: the coalesced refresh of its watch
/// (written once per tenth of the silence) lagged the last reading, and the
/// timer fired on it, up to a tenth of the silence early.
#[test]
fn deadman_never_fires_before_its_silence_has_passed_since_the_last_reading() {
    let redis = RedisServer::start();
    let project = Project::new(
        "http:\n  enabled: false\nalerts:\n  timer_interval: 100ms\nsubscriptions:\n  - name: dm\n    streams: [s]\n",
        &[
            (
                "rules/dm.rhai",
                r#"fn on_message(msg, ctx) {
                    deadman(#{ name: "CollectorSilent", labels: #{ host: msg.host } }, "4s");
                }"#,
            ),
            ("plugins/file.yaml", FILE_SINK),
        ],
    );
    let tl = project.start(&redis);
    let mut con = redis.conn();
    let mut last = 0;
    for _ in 0..23 {
        xadd(&mut con, "s", &[("host", b"fast")]);
        last = wall_ms();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        wait_until(Duration::from_secs(20), || counts(&project).get("fast")
            == Some(&(1, 0))),
        "{}",
        tl.stderr()
    );
    let fired = rfc3339_ms(
        project.json_lines("alerts.jsonl")[0]["starts_at"]
            .as_str()
            .unwrap(),
    );
    let after = fired as i64 - last as i64;
    println!("deadman \"4s\": fired {after} ms after the last reading was sent");
    assert!(after >= 4000, "fired {after} ms after the last reading");
}

/// Changes at 0, 1, 2, 3.5 and 5.5 s with at most 2 changes in 3 s: the
/// third change starts the hold. The change at 5.5 s finds only two changes
/// in its window; it used to lift the hold and go out at once.
#[test]
fn a_flap_hold_lasts_until_the_alert_is_stable_for_a_whole_window() {
    let redis = RedisServer::start();
    let project = Project::new(
        "http:\n  enabled: false\nalerts:\n  timer_interval: 100ms\n  flap_max_changes: 2\n  flap_window: 3s\nsubscriptions:\n  - name: hot\n    streams: [s]\n",
        &[("rules/hot.rhai", RULE), ("plugins/file.yaml", FILE_SINK)],
    );
    let tl = project.start(&redis);
    let mut con = redis.conn();
    // Let the engine come up before the clock of the test starts.
    xadd(&mut con, "s", &[("host", b"warmup"), ("v", b"100")]);
    assert!(
        wait_until(Duration::from_secs(20), || counts(&project)
            .contains_key("warmup")),
        "{}",
        tl.stderr()
    );
    let probe = |project: &Project| -> Vec<String> {
        project
            .json_lines("alerts.jsonl")
            .iter()
            .filter(|a| a["labels"]["host"] == "p")
            .map(|a| a["status"].as_str().unwrap().to_string())
            .collect()
    };
    let start = wall_ms();
    let mut last = 0;
    for (at, v) in [
        (0, "100"),
        (1000, "0"),
        (2000, "100"),
        (3500, "0"),
        (5500, "100"),
    ] {
        let wait = (start + at).saturating_sub(wall_ms());
        std::thread::sleep(Duration::from_millis(wait));
        xadd(&mut con, "s", &[("host", b"p"), ("v", v.as_bytes())]);
        last = wall_ms();
    }
    let mut third = None;
    assert!(
        wait_until(Duration::from_secs(15), || {
            let n = probe(&project).len();
            if n >= 3 && third.is_none() {
                third = Some(wall_ms());
            }
            n >= 3
        }),
        "{}",
        tl.stderr()
    );
    let third = third.unwrap();
    let statuses = probe(&project);
    println!(
        "flap hold (window 3 s): notifications {statuses:?}; the release was seen {} ms after the last change",
        third as i64 - last as i64
    );
    assert_eq!(statuses, ["firing", "resolved", "firing"]);
    assert!(
        third >= last + 3000,
        "released {} ms after the last change",
        third as i64 - last as i64
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(probe(&project).len(), 3, "sent once");
}

/// An HTTP receiver that records each request's body and answers 200.
struct Hook {
    port: u16,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl Hook {
    fn start() -> Hook {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { return };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let body = loop {
                    let Ok(n) = s.read(&mut chunk) else {
                        break None;
                    };
                    if n == 0 {
                        break None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break Some(buf[end + 4..end + 4 + len].to_vec());
                    }
                };
                if let Some(body) = body {
                    seen.lock()
                        .unwrap()
                        .push(serde_json::from_slice(&body).unwrap());
                    let _ = s.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    );
                }
            }
        });
        Hook { port, bodies }
    }

    fn bodies(&self) -> Vec<serde_json::Value> {
        self.bodies.lock().unwrap().clone()
    }
}

/// Three alerts for one device raised within 0.2 s from two streams of
/// different hash tags, so two outboxes: each outbox used to be delivered on
/// its own, two POSTs with one groupKey.
#[test]
fn a_group_from_two_outboxes_leaves_in_one_notification() {
    let redis = RedisServer::start();
    let hook = Hook::start();
    let project = Project::new(
        "http:\n  enabled: false\nsubscriptions:\n  - name: ports\n    streams: [\"a{x}\", \"b{y}\"]\n",
        &[
            (
                "rules/port.rhai",
                r#"fn on_message(msg, ctx) {
                    alert(#{ name: "PortFault", severity: "major", labels: #{ device: msg.device, port: msg.port } });
                }"#,
            ),
            (
                "plugins/hook.yaml",
                &format!(
                    "name: hook\nkind: webhook\ngroup_wait: 1s\ngroup_by: [alertname, device]\nurl: http://127.0.0.1:{}/\n",
                    hook.port
                ),
            ),
        ],
    );
    let tl = project.start(&redis);
    let mut con = redis.conn();
    xadd(&mut con, "a{x}", &[("device", b"warmup"), ("port", b"0")]);
    assert!(
        wait_until(Duration::from_secs(20), || hook.bodies().len() == 1),
        "{}",
        tl.stderr()
    );
    for (stream, port) in [("a{x}", "1"), ("b{y}", "2"), ("a{x}", "3")] {
        xadd(
            &mut con,
            stream,
            &[("device", b"dev-x"), ("port", port.as_bytes())],
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let alerts_in = |b: &serde_json::Value| b["alerts"].as_array().unwrap().len();
    assert!(
        wait_until(Duration::from_secs(15), || hook.bodies()[1..]
            .iter()
            .map(alerts_in)
            .sum::<usize>()
            == 3),
        "{:?}\n{}",
        hook.bodies(),
        tl.stderr()
    );
    std::thread::sleep(Duration::from_millis(1500));
    let posts: Vec<(String, usize)> = hook.bodies()[1..]
        .iter()
        .map(|b| (b["groupKey"].as_str().unwrap().to_string(), alerts_in(b)))
        .collect();
    println!(
        "group_wait 1s, 3 alerts of dev-x from two outboxes: POSTs (groupKey, alerts) {posts:?}"
    );
    assert_eq!(posts.len(), 1, "{posts:?}");
}

const BGP_RULE: &str = r#"
fn on_message(msg, ctx) {
    let a = #{ name: "BgpDown", severity: "major", labels: #{ peer: msg.peer },
               summary: "BGP {{peer}} is {{value}}", value: msg.state, for_duration: FOR };
    if msg.state == "Established" {
        resolve(#{ name: "BgpDown", labels: #{ peer: msg.peer }, summary: "BGP {{peer}} is back: {{value}}", value: msg.state });
    } else {
        alert(a);
    }
}"#;

/// Event-driven telemetry: a session that goes `Idle` sends one reading and
/// then nothing. Its pending alert fires by the timer when `for` elapses,
/// and readings further apart than twice `for` no longer drop it.
#[test]
fn a_pending_alert_fires_by_the_timer_when_its_for_elapses_in_tripline_test() {
    let project = Project::new(
        "http:\n  enabled: false\nsubscriptions:\n  - name: bgp\n    streams: [bgp]\n",
        &[
            ("rules/bgp.rhai", &format!("const FOR = \"30s\";{BGP_RULE}")),
            (
                "rules/bgp.test.yaml",
                r#"tests:
  - name: one Idle reading, then silence, fires at 30 s
    steps:
      - payload: {peer: 10.0.0.1, state: Idle}
        expect: {alerts: []}
      - at: +29s
        expect: {alerts: []}
      - at: +1s
        expect: {alerts: [{name: BgpDown, summary: "BGP 10.0.0.1 is Idle"}]}
      - at: +5m
        payload: {peer: 10.0.0.1, state: Established}
        expect: {alerts: [{name: BgpDown, status: resolved, summary: "BGP 10.0.0.1 is back: Established"}]}
  - name: down 91 s with readings 91 s apart fires
    steps:
      - payload: {peer: 10.0.0.2, state: Idle}
      - at: +91s
        payload: {peer: 10.0.0.2, state: Idle}
    expect: {alerts: [{name: BgpDown}]}
"#,
            ),
        ],
    );
    let (code, out, err) = project.command(&["test"], None);
    println!("{out}");
    assert_eq!(code, 0, "{out}{err}");
}

/// The same live: one `Idle` reading, then nothing; with `for` 2 s it fires
/// by the timer about 2 s after the reading, and the resolve says its own text.
#[test]
fn a_pending_alert_fires_by_the_timer_when_its_for_elapses_live() {
    let redis = RedisServer::start();
    let project = Project::new(
        "http:\n  enabled: false\nalerts:\n  timer_interval: 100ms\nsubscriptions:\n  - name: bgp\n    streams: [bgp]\n",
        &[
            ("rules/bgp.rhai", &format!("const FOR = \"2s\";{BGP_RULE}")),
            ("plugins/file.yaml", FILE_SINK),
        ],
    );
    let tl = project.start(&redis);
    let mut con = redis.conn();
    xadd(&mut con, "bgp", &[("peer", b"p1"), ("state", b"Idle")]);
    let sent = wall_ms();
    assert!(
        wait_until(Duration::from_secs(20), || !project
            .json_lines("alerts.jsonl")
            .is_empty()),
        "{}",
        tl.stderr()
    );
    let fired = &project.json_lines("alerts.jsonl")[0];
    let after = rfc3339_ms(fired["starts_at"].as_str().unwrap()) as i64 - sent as i64;
    println!("for 2s, one Idle reading: fired {after} ms after the reading was sent");
    assert_eq!(fired["status"], "firing");
    assert_eq!(fired["annotations"]["summary"], "BGP p1 is Idle");
    assert!(after >= 2000, "fired {after} ms after the reading");
    xadd(
        &mut con,
        "bgp",
        &[("peer", b"p1"), ("state", b"Established")],
    );
    assert!(
        wait_until(Duration::from_secs(10), || project
            .json_lines("alerts.jsonl")
            .len()
            == 2),
        "{}",
        tl.stderr()
    );
    let resolved = &project.json_lines("alerts.jsonl")[1];
    assert_eq!(resolved["status"], "resolved");
    assert_eq!(
        resolved["annotations"]["summary"], "BGP p1 is back: Established",
        "the resolve says its own text, not the firing's"
    );
}

/// The `hot` rule on stream `s` with a file sink and timers every
/// `timer_interval`, started and past creating its group, so that a silence
/// added next is the first thing it sees.
fn start_hot_silenceable(redis: &RedisServer, timer_interval: &str) -> (Project, Tripline) {
    let project = Project::new(
        &format!(
            "http:\n  enabled: false\nalerts:\n  timer_interval: {timer_interval}\nsubscriptions:\n  - name: hot\n    streams: [s]\n"
        ),
        &[("rules/hot.rhai", RULE), ("plugins/file.yaml", FILE_SINK)],
    );
    let tl = project.start(redis);
    let mut con = redis.conn();
    assert!(
        wait_until(Duration::from_secs(20), || group_exists(
            &mut con, "s", "hot"
        )),
        "{}",
        tl.stderr()
    );
    (project, tl)
}

/// Whether the engine created its consumer group `group` on `stream` yet.
fn group_exists(con: &mut redis::Connection, stream: &str, group: &str) -> bool {
    let groups: redis::RedisResult<Vec<HashMap<String, redis::Value>>> =
        redis::cmd("XINFO").arg("GROUPS").arg(stream).query(con);
    groups.is_ok_and(|g| {
        g.iter()
            .any(|g| g.get("name") == Some(&redis::Value::BulkString(group.into())))
    })
}

/// Adds a silence through the CLI; returns its id.
fn silence(project: &Project, redis: &RedisServer, matcher: &str) -> String {
    let (code, out, err) = project.command(
        &["silence", "add", matcher, "--duration", "1h"],
        Some(&redis.addr()),
    );
    assert_eq!(code, 0, "{out}{err}");
    out.split_whitespace().next().unwrap().to_string()
}

fn unsilence(project: &Project, redis: &RedisServer, id: &str) {
    let (code, out, err) = project.command(&["silence", "expire", id], Some(&redis.addr()));
    assert_eq!(code, 0, "{out}{err}");
}

/// Alertmanager's semantics: an alert that fired while silenced is sent as
/// firing when the silence ends (not after `repeat_interval`), and one that
/// fired and resolved while silenced is never heard of: no resolve of a
/// firing the sink never got.
#[test]
fn the_end_of_a_silence_sends_what_it_muted_and_never_a_lone_resolve() {
    let redis = RedisServer::start();
    let (project, tl) = start_hot_silenceable(&redis, "100ms");
    let mut con = redis.conn();
    let id = silence(&project, &redis, "host=~m.*");
    // The instance reads silences every 2 s.
    std::thread::sleep(Duration::from_millis(2500));
    xadd(&mut con, "s", &[("host", b"m-still"), ("v", b"500")]);
    xadd(&mut con, "s", &[("host", b"m-gone"), ("v", b"500")]);
    xadd(&mut con, "s", &[("host", b"loud"), ("v", b"500")]);
    xadd(&mut con, "s", &[("host", b"m-gone"), ("v", b"0")]);
    assert!(
        wait_until(Duration::from_secs(15), || counts(&project)
            .contains_key("loud")),
        "{}",
        tl.stderr()
    );
    assert!(wait_until(Duration::from_secs(10), || group_position(
        &mut con, "s", "hot"
    ) == (0, 0)));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(counts(&project).len(), 1, "{:?}", counts(&project));
    unsilence(&project, &redis, &id);
    let ended = wall_ms();
    let mut seen = None;
    assert!(
        wait_until(Duration::from_secs(15), || {
            let found = counts(&project).contains_key("m-still");
            if found && seen.is_none() {
                seen = Some(wall_ms());
            }
            found
        }),
        "the muted firing was not sent when the silence ended\n{}",
        tl.stderr()
    );
    println!(
        "silence ended: its muted firing was sent {} ms later",
        seen.unwrap() - ended
    );
    xadd(&mut con, "s", &[("host", b"m-still"), ("v", b"0")]);
    xadd(&mut con, "s", &[("host", b"m-gone"), ("v", b"0")]);
    assert!(wait_until(Duration::from_secs(10), || counts(&project)
        .get("m-still")
        == Some(&(1, 1))));
    std::thread::sleep(Duration::from_millis(1000));
    let c = counts(&project);
    assert_eq!(
        c.get("m-gone"),
        None,
        "a resolve of a firing never sent: {c:?}"
    );
    assert_eq!(c["m-still"], (1, 1));
}

/// The other direction: a firing withheld by a silence, whose clearing
/// reading arrives after the silence ended but before the timer sent the
/// firing, sends nothing at all; and a silence ending while the alert is
/// re-asserted within `repeat_interval` still sends it at once.
#[test]
fn a_resolve_of_a_firing_withheld_by_a_silence_is_withheld_too() {
    let redis = RedisServer::start();
    let (project, tl) = start_hot_silenceable(&redis, "60s");
    let mut con = redis.conn();
    let id = silence(&project, &redis, "host=quiet");
    std::thread::sleep(Duration::from_millis(2500));
    xadd(&mut con, "s", &[("host", b"quiet"), ("v", b"500")]);
    assert!(wait_until(Duration::from_secs(10), || group_position(
        &mut con, "s", "hot"
    ) == (0, 0)));
    unsilence(&project, &redis, &id);
    std::thread::sleep(Duration::from_millis(2500));
    // The timer (every 60 s here) has not sent the firing yet: the
    // re-assertion within repeat_interval does.
    xadd(&mut con, "s", &[("host", b"quiet"), ("v", b"600")]);
    assert!(
        wait_until(Duration::from_secs(10), || counts(&project).get("quiet")
            == Some(&(1, 0))),
        "a re-assertion after the silence must send the withheld firing: {:?}\n{}",
        counts(&project),
        tl.stderr()
    );
    let id = silence(&project, &redis, "host=again");
    std::thread::sleep(Duration::from_millis(2500));
    xadd(&mut con, "s", &[("host", b"again"), ("v", b"500")]);
    assert!(wait_until(Duration::from_secs(10), || group_position(
        &mut con, "s", "hot"
    ) == (0, 0)));
    unsilence(&project, &redis, &id);
    std::thread::sleep(Duration::from_millis(2500));
    xadd(&mut con, "s", &[("host", b"again"), ("v", b"0")]);
    xadd(&mut con, "s", &[("host", b"quiet"), ("v", b"0")]);
    assert!(wait_until(Duration::from_secs(10), || counts(&project)
        .get("quiet")
        == Some(&(1, 1))));
    std::thread::sleep(Duration::from_millis(1000));
    let c = counts(&project);
    assert_eq!(
        c.get("again"),
        None,
        "a resolve of a firing never sent: {c:?}"
    );
}

/// Checked alert kinds: the engine evaluates them without `on_message`.
fn checks_rule(fire_at: i64) -> String {
    format!(
        r#"const HOT = alert_kind(#{{ name: "Hot", severity: "major", labels: ["host"],
    summary: "{{{{host}}}} at {{{{value}}}}",
    check: #{{ field: "t", at_least: {fire_at}, escalate: #{{ critical: 95 }} }} }});
const GONE = alert_kind(#{{ name: "Gone", severity: "warning", labels: ["host"],
    check: #{{ field: "t", silent_after: "1s" }} }});
"#
    )
}

#[test]
fn checked_alert_kinds_fire_escalate_resolve_and_watch_through_redis_and_reload_with_their_file() {
    let redis = RedisServer::start();
    let project = Project::new(
        "http:\n  enabled: false\nalerts:\n  timer_interval: 100ms\nsubscriptions:\n  - name: checks\n    streams: [s]\n",
        &[
            ("rules/checks.rhai", &checks_rule(80)),
            ("plugins/file.yaml", FILE_SINK),
        ],
    );
    let tl = project.start(&redis);
    let mut con = redis.conn();
    let notes = |name: &str| -> Vec<String> {
        project
            .json_lines("alerts.jsonl")
            .into_iter()
            .filter(|a| a["name"] == name)
            .map(|a| {
                format!(
                    "{} {} {}",
                    a["status"].as_str().unwrap(),
                    a["severity"].as_str().unwrap(),
                    a["annotations"]["summary"].as_str().unwrap_or("")
                )
            })
            .collect()
    };
    let wait_for = |name: &str, want: &[&str]| {
        assert!(
            wait_until(Duration::from_secs(15), || notes(name) == want),
            "{name}: {:?}\n{}",
            notes(name),
            tl.stderr()
        );
    };
    xadd(&mut con, "s", &[("host", b"h1"), ("t", b"85")]);
    wait_for("Hot", &["firing major h1 at 85"]);
    xadd(&mut con, "s", &[("host", b"h1"), ("t", b"96")]);
    wait_for(
        "Hot",
        &["firing major h1 at 85", "firing critical h1 at 96"],
    );
    xadd(&mut con, "s", &[("host", b"h1"), ("t", b"10")]);
    wait_for(
        "Hot",
        &[
            "firing major h1 at 85",
            "firing critical h1 at 96",
            "resolved critical h1 at 96",
        ],
    );
    // No reading for 1 s: the watch fires; a reading resolves it.
    wait_for("Gone", &["firing warning "]);
    xadd(&mut con, "s", &[("host", b"h1"), ("t", b"11")]);
    wait_for("Gone", &["firing warning ", "resolved warning "]);

    // A bad check keeps the last good rules running, and says what is wrong.
    project.write(
        "rules/checks.rhai",
        &checks_rule(80).replace("at_least: 80", "at_least: \"hot\""),
    );
    assert!(
        wait_until(Duration::from_secs(10), || tl
            .stderr()
            .contains("`check.at_least` must be a number")),
        "{}",
        tl.stderr()
    );
    // The threshold edited down to 5: the next reading of 12 fires.
    project.write("rules/checks.rhai", &checks_rule(5));
    assert!(
        wait_until(Duration::from_secs(10), || tl
            .stderr()
            .contains("rules reloaded: changed checks")),
        "{}",
        tl.stderr()
    );
    xadd(&mut con, "s", &[("host", b"h1"), ("t", b"12")]);
    assert!(
        wait_until(Duration::from_secs(15), || notes("Hot").last()
            == Some(&"firing major h1 at 12".to_string())),
        "{:?}\n{}",
        notes("Hot"),
        tl.stderr()
    );
}
