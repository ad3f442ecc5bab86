//! The HTTP listener against a real Redis and the real binary: the seed's
//! gateway (every status code), readiness following Redis, `/metrics`
//! content after a known set of messages, promtool and a real Prometheus.

use std::time::Duration;

use crate::util::*;

const STREAM: &str = "packet-counter-errors";

/// A tripline.yaml with HTTP on `addr`; `http_extra` is indented YAML
/// added under `http:`.
fn http_config(addr: &str, http_extra: &str, subscriptions: &str) -> String {
    format!(
        "instance: test-{}\nhttp:\n  listen: \"{addr}\"\n{http_extra}shutdown_timeout: 10s\nsubscriptions:\n{subscriptions}",
        free_port()
    )
}

fn local_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// The seed's setup (shipped rules, a file sink) with HTTP on `addr`.
fn seed_project(addr: &str, http_extra: &str) -> Project {
    Project::new(
        &http_config(addr, http_extra, SEED_SUBS),
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

fn get(addr: &str, path: &str) -> HttpReply {
    http_call(addr, "GET", path, &[], b"").unwrap()
}

fn post(addr: &str, body: &str) -> HttpReply {
    http_call(addr, "POST", "/telemetry-data", &[], body.as_bytes()).unwrap()
}

fn xlen(con: &mut redis::Connection, stream: &str) -> i64 {
    redis::cmd("XLEN").arg(stream).query(con).unwrap()
}

#[test]
fn posted_reading_is_published_in_watermill_envelope_and_ends_as_alert() {
    let redis = RedisServer::start();
    let addr = local_addr();
    let project = seed_project(&addr, "");
    let tl = project.start(&redis);
    tl.wait_ready(&addr);

    let reply = post(
        &addr,
        r#"{"hostname":"core-1","interface":"et-0/0/1","input_errors":12000,"site":"ams1"}"#,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let answer = reply.json();
    assert_eq!(answer["stream"], STREAM);

    let mut con = redis.conn();
    let entries = xrange(&mut con, STREAM);
    assert_eq!(entries.len(), 1, "{entries:?}");
    let (id, fields) = &entries[0];
    assert_eq!(answer["id"], id.as_str());
    let uuid = &fields["_watermill_message_uuid"];
    assert_eq!(uuid.len(), 36, "{uuid}");
    assert_eq!(uuid.matches('-').count(), 4, "{uuid}");
    let payload: serde_json::Value = serde_json::from_str(&fields["payload"]).unwrap();
    assert_eq!(
        payload,
        serde_json::json!({"hostname":"core-1","interface":"et-0/0/1","input_errors":12000,"site":"ams1"})
    );
    // The metadata is a msgpack map of strings, as Watermill writes it.
    let metadata = raw_field(&mut con, STREAM, "metadata");
    let decoded = rmpv::decode::read_value(&mut metadata.as_slice()).unwrap();
    let map = decoded.as_map().expect("metadata is a msgpack map");
    assert!(
        map.iter()
            .any(|(k, v)| k.as_str() == Some("source") && v.as_str() == Some("tripline-gateway")),
        "{decoded}"
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
    assert_eq!(alerts[0]["labels"]["hostname"], "core-1");
    assert_eq!(alerts[0]["labels"]["interface"], "et-0/0/1");
}

/// The raw bytes of `field` in the first entry of `stream`.
fn raw_field(con: &mut redis::Connection, stream: &str, field: &str) -> Vec<u8> {
    let Value::Array(entries) = q(con, &["XRANGE", stream, "-", "+"]) else {
        panic!("XRANGE did not answer an array")
    };
    let Some(Value::Array(entry)) = entries.into_iter().next() else {
        panic!("{stream} is empty")
    };
    let Some(Value::Array(fields)) = entry.into_iter().nth(1) else {
        panic!("entry without fields")
    };
    let mut it = fields.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if let (Value::BulkString(k), Value::BulkString(v)) = (k, v)
            && k == field.as_bytes()
        {
            return v;
        }
    }
    panic!("no field {field}")
}

#[test]
fn bad_readings_get_the_seeds_400_bodies_and_publish_nothing() {
    let redis = RedisServer::start();
    let addr = local_addr();
    let project = seed_project(&addr, "");
    let tl = project.start(&redis);
    tl.wait_ready(&addr);

    let malformed = [
        "{\"hostname\": \"r1\", \"input_errors\": ",
        "not json at all",
        "[1, 2, 3]",
        "\"a string\"",
        "",
        r#"{"hostname": 17, "interface": "et-0", "input_errors": 5}"#,
        r#"{"hostname": "r1", "interface": ["et-0"], "input_errors": 5}"#,
        r#"{"hostname": "r1", "interface": "et-0", "input_errors": "5"}"#,
        r#"{"hostname": "r1", "interface": "et-0", "input_errors": 5.5}"#,
    ];
    for body in malformed {
        let r = post(&addr, body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(
            r.json(),
            serde_json::json!({"error": "Malformed data received"}),
            "{body}"
        );
    }
    let incomplete = [
        r#"{"hostname": "", "interface": "et-0", "input_errors": 5}"#,
        r#"{"interface": "et-0", "input_errors": 5}"#,
        r#"{"hostname": "r1", "interface": "et-0"}"#,
        r#"{"hostname": "r1", "interface": "et-0", "input_errors": 0}"#,
        r#"{"hostname": "r1", "interface": "et-0", "input_errors": null}"#,
        r#"{"hostname": "r1", "interface": "et-0", "input_errors": -3}"#,
        r#"{}"#,
    ];
    for body in incomplete {
        let r = post(&addr, body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(
            r.json(),
            serde_json::json!({"error": "Incomplete or invalid data received"}),
            "{body}"
        );
    }
    let mut con = redis.conn();
    assert_eq!(xlen(&mut con, STREAM), 0);
    let m = get(&addr, "/metrics").text();
    assert_eq!(
        sample(
            &m,
            "tripline_gateway_requests_total",
            &[("result", "malformed")]
        ),
        Some(malformed.len() as f64),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "tripline_gateway_requests_total",
            &[("result", "invalid")]
        ),
        Some(incomplete.len() as f64),
        "{m}"
    );
}

/// A valid reading padded with an extra field to exactly `len` bytes.
fn padded_reading(len: usize) -> String {
    let head = r#"{"hostname":"r1","interface":"et-0","input_errors":7,"pad":""#;
    let tail = "\"}";
    format!("{head}{}{tail}", "x".repeat(len - head.len() - tail.len()))
}

#[test]
fn body_over_64_kib_is_413() {
    let redis = RedisServer::start();
    let addr = local_addr();
    let project = seed_project(&addr, "");
    let tl = project.start(&redis);
    tl.wait_ready(&addr);

    let at_limit = padded_reading(64 * 1024);
    let r = post(&addr, &at_limit);
    assert_eq!(r.status, 200, "{}", r.text());

    let over = padded_reading(64 * 1024 + 1);
    let r = post(&addr, &over);
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(
        r.json(),
        serde_json::json!({"error": "Body larger than 65536 bytes"})
    );
    let mut con = redis.conn();
    assert_eq!(xlen(&mut con, STREAM), 1);
}

#[test]
fn bearer_token_from_the_environment_guards_the_gateway_only() {
    let redis = RedisServer::start();
    let addr = local_addr();
    let project = seed_project(&addr, "  gateway:\n    token_env: TRIPLINE_GW_TOKEN\n");

    // Without the variable the configuration is refused, naming it.
    let (code, _, stderr) = project.command(&["check"], Some(&redis.addr()));
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("environment variable `TRIPLINE_GW_TOKEN` is not set"),
        "{stderr}"
    );

    let tl = project.start_with_env(&redis, &["run"], &[("TRIPLINE_GW_TOKEN", "s3cret")]);
    tl.wait_ready(&addr);
    let body = br#"{"hostname":"r1","interface":"et-0","input_errors":7}"#;
    let call = |headers: &[(&str, &str)]| {
        http_call(&addr, "POST", "/telemetry-data", headers, body).unwrap()
    };
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong")],
        vec![("Authorization", "Bearer s3cre")],
        vec![("Authorization", "Basic s3cret")],
        vec![("Authorization", "s3cret")],
    ] {
        let r = call(&headers);
        assert_eq!(r.status, 401, "{headers:?}: {}", r.text());
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert_eq!(
            r.json(),
            serde_json::json!({"error": "Missing or invalid bearer token"})
        );
    }
    let mut con = redis.conn();
    assert_eq!(xlen(&mut con, STREAM), 0);
    let r = call(&[("Authorization", "Bearer s3cret")]);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call(&[("authorization", "bearer s3cret")]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(xlen(&mut con, STREAM), 2);
    // Scrapes and probes need no token.
    assert_eq!(get(&addr, "/metrics").status, 200);
    assert_eq!(get(&addr, "/readyz").status, 200);
}

#[test]
fn failed_publish_is_503_and_gateway_recovers_with_redis() {
    let mut redis = RedisServer::start();
    let addr = local_addr();
    let project = seed_project(&addr, "");
    let tl = project.start(&redis);
    tl.wait_ready(&addr);
    let reading = r#"{"hostname":"r1","interface":"et-0","input_errors":7}"#;
    assert_eq!(post(&addr, reading).status, 200);

    // The gateway's connection died with the old server: it reconnects.
    redis.restart();
    let r = post(&addr, reading);
    assert_eq!(r.status, 200, "{}; stderr:\n{}", r.text(), tl.stderr());

    redis.stop();
    let r = post(&addr, reading);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(
        r.json(),
        serde_json::json!({"error": "Could not publish the reading; try again later"})
    );

    redis.restart();
    let r = post(&addr, reading);
    assert_eq!(r.status, 200, "{}; stderr:\n{}", r.text(), tl.stderr());
    let mut con = redis.conn();
    assert_eq!(
        xlen(&mut con, STREAM),
        1,
        "the restarted Redis keeps nothing"
    );
    let m = get(&addr, "/metrics").text();
    assert_eq!(
        sample(
            &m,
            "tripline_gateway_requests_total",
            &[("result", "accepted")]
        ),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "tripline_gateway_requests_total",
            &[("result", "unavailable")]
        ),
        Some(1.0),
        "{m}"
    );
}

fn readyz(addr: &str) -> Option<HttpReply> {
    http_call(addr, "GET", "/readyz", &[], b"").ok()
}

#[test]
fn readyz_follows_redis_from_start_up_on() {
    let mut redis = RedisServer::start();
    redis.stop();
    let addr = local_addr();
    let project = seed_project(&addr, "");
    let tl = project.start(&redis);

    // Serving before Redis is reachable: alive, not ready, and says why.
    assert!(
        wait_until(Duration::from_secs(15), || readyz(&addr).is_some_and(|r| {
            r.status == 503
                && r.text().contains("Redis is unreachable")
                && r.text().contains("engine is starting")
        })),
        "{:?}; stderr:\n{}",
        readyz(&addr).map(|r| r.text()),
        tl.stderr()
    );
    assert_eq!(get(&addr, "/healthz").status, 200);
    assert!(
        get(&addr, "/metrics")
            .text()
            .contains("tripline_redis_up 0")
    );

    redis.restart();
    tl.wait_ready(&addr);
    assert_eq!(readyz(&addr).unwrap().text(), "ready\n");

    // No message flows: the health check notices the outage anyway.
    redis.stop();
    assert!(
        wait_until(Duration::from_secs(10), || readyz(&addr)
            .is_some_and(
                |r| r.status == 503 && r.text().contains("Redis is unreachable")
            )),
        "{:?}",
        readyz(&addr).map(|r| r.text())
    );
    assert!(
        get(&addr, "/metrics")
            .text()
            .contains("tripline_redis_up 0")
    );
    assert_eq!(get(&addr, "/healthz").status, 200);

    redis.restart();
    tl.wait_ready(&addr);
    assert!(
        get(&addr, "/metrics")
            .text()
            .contains("tripline_redis_up 1")
    );
}

/// Drops readings from `ignored`, throws on readings from `bad`.
const GATE_RULE: &str = r#"fn on_message(msg, ctx) {
    if msg.hostname == "ignored" { drop(); }
    if msg.hostname == "bad" { throw "bad host"; }
}"#;

#[test]
fn metrics_after_known_messages_have_every_family_and_pass_promtool() {
    let redis = RedisServer::start();
    let mut con = redis.conn();
    // A consumer that died holding 3 entries: they stay pending (claim
    // min-idle is 60 s), which the pending gauge must show.
    q(&mut con, &["XGROUP", "CREATE", "t", "s1", "0", "MKSTREAM"]);
    for i in 0..3 {
        xadd(&mut con, "t", &[("ghost", i.to_string().as_bytes())]);
    }
    q(
        &mut con,
        &[
            "XREADGROUP",
            "GROUP",
            "s1",
            "ghost",
            "COUNT",
            "3",
            "STREAMS",
            "t",
            ">",
        ],
    );
    let addr = local_addr();
    let subs = "  - name: s1\n    streams: [t]\n    concurrency: 1\n";
    let project = Project::new(
        &http_config(&addr, "", subs),
        &[
            ("rules/a_gate.rhai", GATE_RULE),
            (
                "rules/packet_errors/alert.rhai",
                &shipped("rules/packet_errors/alert.rhai"),
            ),
            ("plugins/file.yaml", FILE_SINK),
        ],
    );
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let tl = project.start(&redis);
    tl.wait_ready(&addr);

    let reading = |host: &str, errors: i64| {
        format!(r#"{{"hostname":"{host}","interface":"et-0","input_errors":{errors}}}"#)
    };
    for i in 0..5 {
        xadd_watermill(&mut con, "t", &reading(&format!("quiet-{i}"), 10 + i));
    }
    xadd_watermill(&mut con, "t", &reading("core-1", 12_000));
    xadd_watermill(&mut con, "t", &reading("core-2", 150_000));
    xadd_watermill(&mut con, "t", &reading("ignored", 5));
    xadd_watermill(&mut con, "t", &reading("bad", 5));
    xadd(&mut con, "t", &[("payload", b"{not json")]);
    // 10 entries judged: 7 processed (2 alerts), 1 dropped, 1 error, 1 dead.

    let scrape = || get(&addr, "/metrics").text();
    let labels_t = [("stream", "t"), ("group", "s1")];
    let messages = |text: &str, outcome: &str| {
        sample(
            text,
            "tripline_messages_total",
            &[labels_t[0], labels_t[1], ("outcome", outcome)],
        )
    };
    assert!(
        wait_until(Duration::from_secs(20), || {
            let m = scrape();
            messages(&m, "processed") == Some(7.0)
                && messages(&m, "dead_lettered") == Some(1.0)
                && sample(&m, "tripline_sink_deliveries_total", &[("sink", "file")]) == Some(2.0)
                && sample(&m, "tripline_consumer_pending", &labels_t) == Some(3.0)
        }),
        "metrics never settled:\n{}\nstderr:\n{}",
        scrape(),
        tl.stderr()
    );
    let m = scrape();
    let reply = get(&addr, "/metrics");
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );

    // Messages by stream, group and outcome.
    assert_eq!(messages(&m, "dropped"), Some(1.0), "{m}");
    assert_eq!(messages(&m, "error"), Some(1.0), "{m}");
    // Rule evaluations by rule and decision; errors; time histogram.
    let evals = |rule: &str, decision: &str| {
        sample(
            &m,
            "tripline_rule_evaluations_total",
            &[("rule", rule), ("decision", decision)],
        )
        .unwrap_or_else(|| panic!("no {rule}/{decision} in\n{m}"))
    };
    assert_eq!(evals("a_gate", "drop"), 1.0);
    assert_eq!(evals("a_gate", "error"), 1.0);
    assert_eq!(evals("a_gate", "pass"), 7.0);
    assert_eq!(evals("a_gate", "alert") + evals("a_gate", "log"), 0.0);
    let alert_rule: f64 = ["alert", "resolve", "log", "drop", "pass", "error"]
        .iter()
        .map(|d| evals("packet_errors/alert", d))
        .sum();
    assert_eq!(alert_rule, 8.0, "the dropped reading never reaches it");
    assert!(evals("packet_errors/alert", "alert") >= 2.0);
    assert_eq!(
        sample(&m, "tripline_rule_errors_total", &[("rule", "a_gate")]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            "tripline_rule_errors_total",
            &[("rule", "packet_errors/alert")]
        ),
        Some(0.0)
    );
    let hist = |suffix: &str, extra: &[(&str, &str)]| {
        let mut labels = vec![("rule", "a_gate")];
        labels.extend_from_slice(extra);
        sample(
            &m,
            &format!("tripline_rule_evaluation_seconds_{suffix}"),
            &labels,
        )
        .unwrap_or_else(|| panic!("no histogram {suffix} in\n{m}"))
    };
    assert_eq!(hist("count", &[]), 9.0);
    assert_eq!(hist("bucket", &[("le", "+Inf")]), 9.0);
    let sum = hist("sum", &[]);
    assert!(sum > 0.0 && sum < 9.0, "{sum}");
    // Alerts by rule and severity.
    for severity in ["major", "critical"] {
        assert_eq!(
            sample(
                &m,
                "tripline_alerts_total",
                &[
                    ("rule", "packet_errors/alert"),
                    ("severity", severity),
                    ("status", "firing")
                ]
            ),
            Some(1.0),
            "{m}"
        );
    }
    // Sinks: delivered, and the failure counters exist at zero.
    for family in [
        "tripline_sink_failures_total",
        "tripline_sink_retries_total",
        "tripline_sink_dead_letters_total",
    ] {
        assert_eq!(sample(&m, family, &[("sink", "file")]), Some(0.0), "{m}");
    }
    // Reloads by result (the startup load is not a reload: both at 0) and
    // the last success time (set by the startup load).
    for kind in ["rules", "plugins"] {
        assert_eq!(
            sample(
                &m,
                "tripline_reloads_total",
                &[("kind", kind), ("result", "success")]
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &m,
                "tripline_reloads_total",
                &[("kind", kind), ("result", "failure")]
            ),
            Some(0.0)
        );
        let at = sample(
            &m,
            "tripline_last_reload_success_timestamp_seconds",
            &[("kind", kind)],
        )
        .unwrap();
        assert!(
            at >= started - 1.0 && at <= started + 60.0,
            "{at} vs {started}"
        );
    }
    // Consumer position: the ghost's 3 entries pending, nothing undelivered.
    assert_eq!(
        sample(&m, "tripline_consumer_pending", &labels_t),
        Some(3.0)
    );
    assert_eq!(sample(&m, "tripline_consumer_lag", &labels_t), Some(0.0));
    assert_eq!(group_position(&mut con, "t", "s1"), (3, 0));
    assert_eq!(sample(&m, "tripline_redis_up", &[]), Some(1.0));
    assert_eq!(
        sample(
            &m,
            "tripline_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );

    let (ok, report) = promtool_check(&m);
    assert!(ok, "promtool check metrics failed:\n{report}\n---\n{m}");

    // Prometheus asks for OpenMetrics and gets it.
    let om = http_call(
        &addr,
        "GET",
        "/metrics",
        &[(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )],
        b"",
    )
    .unwrap();
    assert_eq!(
        om.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(om.text().ends_with("# EOF\n"), "{}", om.text());
    assert!(om.text().contains("# TYPE tripline_messages counter"));
}

#[test]
fn real_prometheus_scrapes_tripline() {
    let redis = RedisServer::start();
    let addr = local_addr();
    let project = seed_project(&addr, "");
    let tl = project.start(&redis);
    tl.wait_ready(&addr);
    let mut con = redis.conn();
    for i in 0..4 {
        xadd_watermill(
            &mut con,
            STREAM,
            &format!(
                r#"{{"hostname":"r{i}","interface":"et-0","input_errors":{}}}"#,
                100 + i
            ),
        );
    }
    // 4 entries, each processed by both seed groups.
    assert!(
        wait_until(Duration::from_secs(15), || {
            let m = get(&addr, "/metrics").text();
            ["packet-error-alerts", "packet-error-logs"]
                .iter()
                .all(|g| {
                    sample(
                        &m,
                        "tripline_messages_total",
                        &[("group", g), ("outcome", "processed")],
                    ) == Some(4.0)
                })
        }),
        "stderr:\n{}",
        tl.stderr()
    );

    let prom = Prometheus::start(project.dir.path(), &addr);
    let log = || std::fs::read_to_string(project.path("prometheus.err")).unwrap_or_default();
    let target_up = || {
        prom.api("/api/v1/targets").is_some_and(|v| {
            v["data"]["activeTargets"]
                .as_array()
                .is_some_and(|ts| ts.iter().any(|t| t["health"] == "up"))
        })
    };
    assert!(
        wait_until(Duration::from_secs(60), target_up),
        "target never up: {:?}\nprometheus log:\n{}",
        prom.api("/api/v1/targets"),
        log()
    );
    let query = |q: &str| prom.api(&format!("/api/v1/query?query={q}"));
    let processed = || {
        query("tripline_messages_total").map(|v| {
            v["data"]["result"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["metric"]["outcome"] == "processed")
                .map(|r| r["value"][1].as_str().unwrap().parse::<f64>().unwrap())
                .sum::<f64>()
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), || processed() == Some(8.0)),
        "query gave {:?}\nprometheus log:\n{}",
        query("tripline_messages_total"),
        log()
    );
    let up = query("up").unwrap();
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
}
