//! `POST /api/v1/ingest/{stream}` against a real Redis and the real binary:
//! an object, an array and NDJSON, each read back from Redis in Watermill's
//! envelope and judged by a rule into an alert; hostile bodies, an unknown
//! stream and a missing token each get their 4xx and write nothing; the
//! same transaction on a Redis Cluster.

use std::time::Duration;

use crate::util::*;

const TOKEN: &str = "s3cret";

/// Alerts on any entry with more than 100 errors, naming where it came from.
const RULE: &str = r#"
fn on_message(msg, ctx) {
    if msg.errors > 100 {
        alert(#{
            name: "IngestErrors",
            severity: "major",
            labels: #{ hostname: msg.hostname, source: ctx.metadata.source },
        });
    }
}
"#;

/// A tripline with the gateway on behind `TOKEN` (bodies up to 4 KiB),
/// reading `telemetry` (judged by [`RULE`]) and `other`.
fn start(redis: &RedisServer) -> (Project, Tripline, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let project = Project::new(
        &format!(
            "instance: ingest-{}\nhttp:\n  listen: \"{addr}\"\n  gateway:\n    token: {TOKEN}\n    max_body_bytes: 4096\nshutdown_timeout: 10s\nsubscriptions:\n  - name: telemetry\n    streams: [telemetry]\n    rules: [\"ingest/*.rhai\"]\n  - name: other\n    streams: [other]\n    rules: [\"none/*.rhai\"]\n",
            free_port()
        ),
        &[
            ("rules/ingest/errors.rhai", RULE),
            ("plugins/file.yaml", FILE_SINK),
        ],
    );
    let tl = project.start(redis);
    tl.wait_ready(&addr);
    (project, tl, addr)
}

fn ingest(addr: &str, stream: &str, content_type: Option<&str>, body: &[u8]) -> HttpReply {
    let auth = format!("Bearer {TOKEN}");
    let mut headers = vec![("Authorization", auth.as_str())];
    if let Some(ct) = content_type {
        headers.push(("Content-Type", ct));
    }
    http_call(
        addr,
        "POST",
        &format!("/api/v1/ingest/{stream}"),
        &headers,
        body,
    )
    .unwrap()
}

/// The ids of a 200 answer, after checking it names `stream`.
fn ids(reply: &HttpReply, stream: &str) -> Vec<String> {
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["stream"], stream, "{body}");
    body["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().to_string())
        .collect()
}

fn xlen(con: &mut redis::Connection, stream: &str) -> i64 {
    redis::cmd("XLEN").arg(stream).query(con).unwrap()
}

fn metric(addr: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = http_call(addr, "GET", "/metrics", &[], b"").unwrap().text();
    sample(&text, name, labels)
}

#[test]
fn ingested_object_array_and_ndjson_are_written_as_watermill_entries_and_judged_into_alerts() {
    let redis = RedisServer::start();
    let (project, tl, addr) = start(&redis);
    let mut written: Vec<(String, String)> = Vec::new();
    let mut expect = |reply: HttpReply, hosts: &[&str]| {
        let ids = ids(&reply, "telemetry");
        assert_eq!(ids.len(), hosts.len(), "{}", reply.text());
        written.extend(ids.into_iter().zip(hosts.iter().map(|h| h.to_string())));
    };
    expect(
        ingest(
            &addr,
            "telemetry",
            Some("application/json"),
            br#"{"hostname":"obj-1","errors":500}"#,
        ),
        &["obj-1"],
    );
    expect(
        ingest(
            &addr,
            "telemetry",
            Some("application/json"),
            br#"[{"hostname":"arr-1","errors":200},{"hostname":"arr-2","errors":300}]"#,
        ),
        &["arr-1", "arr-2"],
    );
    expect(
        ingest(
            &addr,
            "telemetry",
            Some("application/x-ndjson"),
            b"{\"hostname\":\"nd-1\",\"errors\":101}\r\n\n{\"hostname\":\"nd-2\",\"errors\":102}\n",
        ),
        &["nd-1", "nd-2"],
    );
    // NDJSON without saying so (curl -d sends a form type).
    expect(
        ingest(
            &addr,
            "telemetry",
            Some("application/x-www-form-urlencoded"),
            b"{\"hostname\":\"det-1\",\"errors\":150}\n{\"hostname\":\"det-2\",\"errors\":160}",
        ),
        &["det-1", "det-2"],
    );
    // CR and ESC, escaped as JSON requires, are data and reach the rule as sent.
    let hostile = "evil\r\u{1b}[2J\nhost";
    expect(
        ingest(
            &addr,
            "telemetry",
            None,
            br#"{"hostname":"evil\r\u001b[2J\nhost","errors":999}"#,
        ),
        &[hostile],
    );
    // Below the rule's threshold: written, judged, no alert.
    expect(
        ingest(
            &addr,
            "telemetry",
            None,
            br#"{"hostname":"quiet","errors":1}"#,
        ),
        &["quiet"],
    );

    // Read back: each id holds the Watermill envelope with the posted object.
    let mut con = redis.conn();
    let entries = xrange_raw(&mut con, "telemetry");
    assert_eq!(entries.len(), written.len());
    for (entry, (want_id, host)) in entries.iter().zip(&written) {
        assert_eq!(&entry.id, want_id);
        let field = |name: &str| match entry.map.get(name) {
            Some(Value::BulkString(b)) => b.clone(),
            other => panic!("{}: {name} is {other:?}", entry.id),
        };
        assert_eq!(field("_watermill_message_uuid").len(), 36);
        assert!(!field("metadata").is_empty());
        let payload: serde_json::Value = serde_json::from_slice(&field("payload")).unwrap();
        assert_eq!(payload["hostname"], host.as_str());
    }

    // Every entry over the threshold became an alert naming its entry.
    let alerting = written.len() - 1;
    assert!(
        wait_until(Duration::from_secs(30), || project
            .json_lines("alerts.jsonl")
            .len()
            >= alerting),
        "alerts: {:?}\nstderr:\n{}",
        project.json_lines("alerts.jsonl"),
        tl.stderr()
    );
    let alerts = project.json_lines("alerts.jsonl");
    assert_eq!(alerts.len(), alerting, "{alerts:?}");
    for (id, host) in &written[..alerting] {
        let alert = alerts
            .iter()
            .find(|a| a["origin"]["id"] == id.as_str())
            .unwrap_or_else(|| panic!("no alert for {id} ({host:?}) in {alerts:?}"));
        assert_eq!(alert["labels"]["hostname"], host.as_str());
        assert_eq!(alert["labels"]["source"], "tripline-ingest");
    }
    assert_eq!(
        metric(
            &addr,
            "tripline_ingest_requests_total",
            &[("result", "accepted")]
        ),
        Some(6.0)
    );
    assert_eq!(
        metric(
            &addr,
            "tripline_ingest_entries_total",
            &[("stream", "telemetry")]
        ),
        Some(written.len() as f64)
    );
}

/// A body the endpoint must refuse: (what it is, its Content-Type, the
/// bytes, the status and the error expected).
type Refused = (
    &'static str,
    Option<&'static str>,
    Vec<u8>,
    u16,
    &'static str,
);

#[test]
fn hostile_ingest_requests_get_a_4xx_naming_what_was_wrong_and_write_nothing() {
    let redis = RedisServer::start();
    let (_project, tl, addr) = start(&redis);
    let error = |reply: &HttpReply| reply.json()["error"].as_str().unwrap().to_string();

    // No token, a wrong one: 401 before anything else is looked at.
    let body = br#"{"hostname":"r1","errors":500}"#;
    for auth in [None, Some("Bearer wrong"), Some("Basic czNjcmV0")] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let reply = http_call(&addr, "POST", "/api/v1/ingest/telemetry", &headers, body).unwrap();
        assert_eq!(reply.status, 401, "{auth:?}: {}", reply.text());
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    }
    let reply = http_call(&addr, "POST", "/api/v1/ingest/nope", &[], body).unwrap();
    assert_eq!(
        reply.status, 401,
        "the stream list is not shown without the token"
    );

    // A stream no subscription reads (ESC in its name too): 404 naming it
    // and the allowed ones.
    let reply = ingest(&addr, "nope", None, body);
    assert_eq!(reply.status, 404, "{}", reply.text());
    assert_eq!(
        error(&reply),
        "no subscription reads stream `nope`; allowed: other, telemetry"
    );
    assert_eq!(
        reply.json()["allowed"],
        serde_json::json!(["other", "telemetry"])
    );
    let reply = ingest(&addr, "evil%1B%5B2J%0D", None, body);
    assert_eq!(reply.status, 404, "{}", reply.text());
    assert!(
        error(&reply).contains("`evil\u{1b}[2J\r`"),
        "{}",
        reply.text()
    );

    // Bodies: each refused whole, saying where and why.
    let cases: Vec<Refused> = vec![
        (
            "bad JSON at line 3 of NDJSON",
            Some("application/x-ndjson"),
            b"{\"hostname\":\"a\",\"errors\":500}\n{\"hostname\":\"b\",\"errors\":500}\n{\"hostname\": oops}\n{\"hostname\":\"d\",\"errors\":500}\n".to_vec(),
            400,
            "line 3: not JSON: expected value (column 14)",
        ),
        (
            "bad JSON at line 3, NDJSON detected",
            None,
            b"{\"hostname\":\"a\",\"errors\":500}\n{\"hostname\":\"b\",\"errors\":500}\n{\"hostname\": oops}\n".to_vec(),
            400,
            "line 3: not JSON: expected value (column 14)",
        ),
        (
            "a non-object element",
            Some("application/json"),
            br#"[{"hostname":"a","errors":500},{"hostname":"b","errors":500},"c"]"#.to_vec(),
            400,
            "element 2: a string is not a JSON object; every entry must be one",
        ),
        (
            "a non-object NDJSON line",
            Some("application/x-ndjson"),
            b"{\"hostname\":\"a\",\"errors\":500}\n[1,2]\n".to_vec(),
            400,
            "line 2: an array is not a JSON object; every entry must be one",
        ),
        (
            "raw CR and ESC inside a string",
            None,
            b"{\"hostname\":\"a\r\x1b[2J\",\"errors\":500}".to_vec(),
            400,
            "line 1: not JSON: control character (\\u0000-\\u001F) found while parsing a string (column 15)",
        ),
        (
            "an empty body",
            Some("application/json"),
            b"".to_vec(),
            400,
            "the body is empty: send one JSON object, an array of objects, or NDJSON",
        ),
        (
            "an empty array",
            Some("application/json"),
            b"[]".to_vec(),
            400,
            "the body is empty: send one JSON object, an array of objects, or NDJSON",
        ),
        (
            "a huge body",
            Some("application/x-ndjson"),
            "{\"hostname\":\"a\",\"errors\":500}\n"
                .repeat(1000)
                .into_bytes(),
            413,
            "Body larger than 4096 bytes",
        ),
    ];
    for (what, content_type, body, status, message) in cases {
        let reply = ingest(&addr, "telemetry", content_type, &body);
        assert_eq!(reply.status, status, "{what}: {}", reply.text());
        assert_eq!(error(&reply), message, "{what}");
    }

    let mut con = redis.conn();
    assert_eq!(xlen(&mut con, "telemetry"), 0, "something was written");
    assert_eq!(xlen(&mut con, "nope"), 0);
    let count = |result: &str| {
        metric(
            &addr,
            "tripline_ingest_requests_total",
            &[("result", result)],
        )
    };
    assert_eq!(count("unauthorized"), Some(4.0));
    assert_eq!(count("unknown_stream"), Some(2.0));
    assert_eq!(count("malformed"), Some(7.0));
    assert_eq!(count("too_large"), Some(1.0));
    assert_eq!(count("accepted"), Some(0.0));
    assert!(
        !tl.stderr().contains('\u{1b}'),
        "a raw ESC reached the log:\n{}",
        tl.stderr()
    );
}

#[test]
fn ingest_writes_all_or_nothing_on_a_redis_cluster_too() {
    let cluster = RedisCluster::start(3, 0, 5000);
    let addr = format!("127.0.0.1:{}", free_port());
    let project = Project::new(
        &format!(
            "instance: ingest-{}\nhttp:\n  listen: \"{addr}\"\nshutdown_timeout: 10s\nsubscriptions:\n  - name: t\n    streams: [plain, {{topic: t, shards: 2}}]\n",
            free_port()
        ),
        &[],
    );
    let tl = project.start_on(&cluster.addr());
    let body = b"{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n";
    let mut con = cluster.conn();
    // `t:{1}`, URL-encoded; a shard of a topic is a stream like any other.
    for (stream, path) in [("plain", "plain"), ("t:{1}", "t:%7B1%7D")] {
        let mut reply = None;
        assert!(
            wait_until(Duration::from_secs(60), || {
                reply = http_call(&addr, "POST", &format!("/api/v1/ingest/{path}"), &[], body)
                    .ok()
                    .filter(|r| r.status == 200);
                reply.is_some()
            }),
            "ingest never accepted; stderr:\n{}",
            tl.stderr()
        );
        let ids = ids(&reply.unwrap(), stream);
        let stored: Vec<String> = xrange(&mut con, stream)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(stored, ids, "{stream}");
        let bad = http_call(
            &addr,
            "POST",
            &format!("/api/v1/ingest/{path}"),
            &[],
            b"{\"n\":4}\n{\"n\":5}\nnope\n",
        )
        .unwrap();
        assert_eq!(bad.status, 400, "{}", bad.text());
        assert_eq!(xrange(&mut con, stream).len(), 3, "{stream}");
    }
}
