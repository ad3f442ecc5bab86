//! The seed's own bytes: every entry the real Go libraries wrote
//! (tests/fixtures/watermill/seed-publisher.jsonl: empty Watermill
//! metadata, a bare-float transceiver reading) replayed byte for byte into
//! the shipped setup, and the `redis_stream` sink's default output read the
//! way a stock Watermill subscriber reads it.

use std::collections::HashMap;
use std::time::Duration;

use crate::util::*;

const FIXTURE: &str = "tests/fixtures/watermill/seed-publisher.jsonl";

/// The `redis_stream` sink as a user writes it when they leave `format` out.
const STREAM_SINK: &str = "name: alerts-stream\nkind: redis_stream\nstream: tripline-alerts\n";

/// One line of the fixture.
struct Entry {
    stream: String,
    fields: Vec<(String, Vec<u8>)>,
}

impl Entry {
    fn payload(&self) -> String {
        let (_, raw) = self.fields.iter().find(|(k, _)| k == "payload").unwrap();
        String::from_utf8_lossy(raw).into_owned()
    }
}

fn fixture() -> Vec<Entry> {
    #[derive(serde::Deserialize)]
    struct Line {
        stream: String,
        fields_b64: InOrder,
    }
    shipped(FIXTURE)
        .lines()
        .map(|line| {
            let line: Line = serde_json::from_str(line).unwrap();
            Entry {
                stream: line.stream,
                fields: line
                    .fields_b64
                    .0
                    .into_iter()
                    .map(|(k, b64)| (k, base64(&b64)))
                    .collect(),
            }
        })
        .collect()
}

/// A JSON object's string members in the file's order (each fixture line
/// keeps the field order Watermill wrote).
struct InOrder(Vec<(String, String)>);

impl<'de> serde::Deserialize<'de> for InOrder {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<InOrder, D::Error> {
        struct Pairs;
        impl<'de> serde::de::Visitor<'de> for Pairs {
            type Value = InOrder;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<InOrder, A::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = a.next_entry()? {
                    pairs.push(pair);
                }
                Ok(InOrder(pairs))
            }
        }
        d.deserialize_map(Pairs)
    }
}

/// The raw bytes of a field.
fn bytes(v: &redis::Value) -> &[u8] {
    match v {
        redis::Value::BulkString(b) => b,
        other => panic!("not a string: {other:?}"),
    }
}

/// Standard base64 with padding, as the fixture is written.
fn base64(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let digits: Vec<u32> = text
        .bytes()
        .filter(|&b| b != b'=')
        .map(|b| ALPHABET.iter().position(|&a| a == b).expect("base64 digit") as u32)
        .collect();
    let mut out = Vec::new();
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0, |n, (i, d)| n | d << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// The shipped config's subscriptions and rules, a file sink and a
/// `redis_stream` sink without `format`.
fn shipped_project() -> Project {
    let tripline_yaml = shipped("tripline.yaml");
    let (_, subscriptions) = tripline_yaml
        .split_once("subscriptions:\n")
        .expect("tripline.yaml has subscriptions");
    let rules = [
        "rules/packet_errors/alert.rhai",
        "rules/packet_errors/log.rhai",
        "rules/transceiver/rx_power.rhai",
    ]
    .map(|rel| (rel, shipped(rel)));
    let mut files: Vec<(&str, &str)> = rules.iter().map(|(p, t)| (*p, t.as_str())).collect();
    files.push(("plugins/file.yaml", FILE_SINK));
    files.push(("plugins/alerts-stream.yaml", STREAM_SINK));
    Project::new(&config(subscriptions), &files)
}

/// Whether `group` on `stream` exists, has nothing pending, and has been
/// handed everything up to `last`.
fn drained(con: &mut redis::Connection, stream: &str, group: &str, last: &str) -> bool {
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query(con)
        .unwrap_or_default();
    let Some(g) = groups
        .iter()
        .find(|g| g.get("name").map(bytes) == Some(group.as_bytes()))
    else {
        return false;
    };
    g.get("pending") == Some(&redis::Value::Int(0))
        && g.get("last-delivered-id").map(bytes) == Some(last.as_bytes())
}

/// What Watermill's stock `redisstream` unmarshaller (1.2.2) requires of an
/// entry: `_watermill_message_uuid` and `payload` present (it type-asserts
/// them and panics otherwise); `metadata` absent, empty, or a msgpack map
/// of strings. Returns the payload.
fn read_as_watermill(fields: &HashMap<String, redis::Value>) -> serde_json::Value {
    let field = |name: &str| fields.get(name).map(|v| bytes(v).to_vec());
    let uuid = field("_watermill_message_uuid").expect("a stock subscriber panics without a uuid");
    assert!(!uuid.is_empty());
    let payload = field("payload").expect("a stock subscriber panics without a payload");
    if let Some(metadata) = field("metadata").filter(|m| !m.is_empty()) {
        let value = rmpv::decode::read_value(&mut metadata.as_slice()).unwrap();
        let rmpv::Value::Map(pairs) = value else {
            panic!("metadata is not a msgpack map: {value}")
        };
        assert!(
            pairs.iter().all(|(k, v)| k.is_str() && v.is_str()),
            "metadata is not a map of strings: {pairs:?}"
        );
    }
    serde_json::from_slice(&payload).unwrap()
}

/// The fixture, byte for byte, through the shipped setup: every entry's
/// outcome is what the seed does, and none is dead-lettered (before, every
/// one was, for its empty `metadata`).
#[test]
fn seed_publisher_entries_alert_log_and_drain_none_dead_lettered() {
    let entries = fixture();
    assert_eq!(entries.len(), 14);
    let redis = RedisServer::start();
    let mut con = redis.conn();
    // All in the streams before tripline reads, so each stream is one
    // batch in order (a group shares a live stream among its consumers).
    let ids: Vec<String> = entries
        .iter()
        .map(|e| {
            let fields: Vec<(&str, &[u8])> = e
                .fields
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect();
            xadd(&mut con, &e.stream, &fields)
        })
        .collect();
    // The stored bytes are the fixture's, field for field.
    for (e, id) in entries.iter().zip(&ids) {
        let stored = xrange_raw(&mut con, &e.stream);
        let entry = stored.iter().find(|s| s.id == *id).unwrap();
        assert_eq!(entry.map.len(), e.fields.len());
        for (k, v) in &e.fields {
            assert_eq!(bytes(&entry.map[k]), v.as_slice(), "{id} {k}");
        }
    }
    let project = shipped_project();
    let tl = project.start_with_env(&redis, &["--log-format", "json", "run"], &[]);

    let last_id = |stream: &str| {
        let i = (0..entries.len())
            .rev()
            .find(|&i| entries[i].stream == stream)
            .unwrap();
        ids[i].clone()
    };
    let packets = "packet-counter-errors";
    let (last_packet, last_reading) = (last_id(packets), last_id("transceiver_telemetry"));
    assert!(
        wait_until(Duration::from_secs(30), || {
            drained(&mut con, packets, "packet-error-alerts", &last_packet)
                && drained(&mut con, packets, "packet-error-logs", &last_packet)
                && drained(
                    &mut con,
                    "transceiver_telemetry",
                    "transceiver-alerts",
                    &last_reading,
                )
        }),
        "groups not drained; stderr:\n{}",
        tl.stderr()
    );
    for group in ["packet-error-alerts", "packet-error-logs"] {
        assert_eq!(group_position(&mut con, packets, group), (0, 0), "{group}");
    }

    // Entries are told apart by stream and id: ids repeat across streams.
    let entry_of = |stream: &serde_json::Value, id: &serde_json::Value| {
        (0..entries.len())
            .find(|&i| entries[i].stream == *stream && ids[i] == *id)
            .unwrap_or_else(|| panic!("{stream} {id} is no fixture entry"))
    };

    // Notifications, in the order the file sink received them: (name,
    // status, severity, entry). A firing one names the entry that raised
    // it; a resolved one keeps its firing origin, so its place in the
    // sequence tells which reading resolved it.
    let seed_alerts = |alerts: &[serde_json::Value]| {
        alerts
            .iter()
            .filter(|a| a["name"] == "HighInputErrors" || a["name"] == "LowRxPower")
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(20), || seed_alerts(
            &project.json_lines("alerts.jsonl")
        ) >= 6),
        "alerts: {:?}\nstderr:\n{}",
        project.json_lines("alerts.jsonl"),
        tl.stderr()
    );
    let alerts = project.json_lines("alerts.jsonl");
    let notes: Vec<(&str, &str, &str, usize)> = alerts
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap(),
                a["status"].as_str().unwrap(),
                a["severity"].as_str().unwrap(),
                entry_of(&a["origin"]["stream"], &a["origin"]["id"]),
            )
        })
        .collect();

    // Log lines the rules wrote, by entry.
    let stderr = tl.stderr();
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let mut logs_of: Vec<Vec<String>> = vec![Vec::new(); entries.len()];
    for l in lines.iter().filter(|l| l["target"] == "tripline::rule") {
        logs_of[entry_of(&l["fields"]["stream"], &l["fields"]["id"])].push(format!(
            "{} {}: {}",
            l["level"].as_str().unwrap(),
            l["fields"]["rule"].as_str().unwrap(),
            l["fields"]["message"].as_str().unwrap()
        ));
    }

    // The observed outcome of each entry (`--nocapture` shows it).
    for (i, e) in entries.iter().enumerate() {
        let raised: Vec<String> = notes
            .iter()
            .filter(|n| n.3 == i && n.1 == "firing")
            .map(|n| format!("{} {}", n.0, n.2))
            .collect();
        eprintln!(
            "{:>2} {} {} raised={raised:?} logs={:?}",
            i + 1,
            e.stream,
            e.payload(),
            logs_of[i]
        );
    }
    eprintln!("notifications in order: {notes:?}");

    // The seed's alerts: ≥ 10,000 input errors fire HighInputErrors (a
    // severity change is sent at once, a repeat is not), a lower reading
    // resolves it; the transceiver reading -41.5 dBm fires LowRxPower,
    // -3.2 resolves it. Entries are numbered from 0 here.
    let sequence = |name: &str| -> Vec<(&str, &str, usize)> {
        notes
            .iter()
            .filter(|n| n.0 == name)
            .map(|n| (n.1, n.2, n.3))
            .collect()
    };
    assert_eq!(
        sequence("HighInputErrors"),
        [
            ("firing", "major", 6),
            ("firing", "critical", 8),
            ("firing", "major", 10),
            ("resolved", "major", 10),
        ]
    );
    assert_eq!(
        sequence("LowRxPower"),
        [("firing", "critical", 12), ("resolved", "critical", 12)]
    );
    // Beside them, only the shipped rule's rate band (its readings are
    // milliseconds apart here, so every jump is a steep rate).
    assert!(
        notes.iter().all(
            |n| ["HighInputErrors", "LowRxPower", "InputErrorRate"].contains(&n.0)
                && (n.0 == "LowRxPower") == (n.3 >= 12)
        ),
        "{notes:?}"
    );
    let lowrx = alerts.iter().find(|a| a["name"] == "LowRxPower").unwrap();
    assert_eq!(
        lowrx["labels"],
        serde_json::json!({"topic": "transceiver_telemetry"})
    );
    assert!(
        lowrx["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("is -41.5 dBm"),
        "{lowrx}"
    );

    // The seed's log lines: a warning per reading ≥ 500, naming its band.
    let expected_logs: [&[&str]; 14] = [
        &[],
        &[],
        &["low input errors on router dc-router-1 interface GigabitEthernet0/1/0: 500"],
        &["low input errors on router dc-router-1 interface GigabitEthernet0/1/0: 999"],
        &["medium input errors on router dc-router-1 interface GigabitEthernet0/1/0: 1000"],
        &["medium input errors on router dc-router-1 interface GigabitEthernet0/1/0: 9999"],
        &["high input errors on router dc-router-1 interface GigabitEthernet0/1/0: 10000"],
        &["high input errors on router dc-router-1 interface GigabitEthernet0/1/0: 99999"],
        &["very high input errors on router dc-router-1 interface GigabitEthernet0/1/0: 100000"],
        &["very high input errors on router dc-router-1 interface GigabitEthernet0/1/0: 1533300"],
        &["high input errors on router dc-router-1 interface GigabitEthernet0/1/0: 12000"],
        &[],
        &[],
        &[],
    ];
    for (i, want) in expected_logs.iter().enumerate() {
        let want: Vec<String> = want
            .iter()
            .map(|text| format!("WARN packet_errors/log: {text}"))
            .collect();
        assert_eq!(
            logs_of[i],
            want,
            "entry {} ({})",
            i + 1,
            entries[i].payload()
        );
    }

    // Nothing dead-lettered, on any stream.
    for stream in ["packet-counter-errors", "transceiver_telemetry"] {
        assert_eq!(xrange(&mut con, &format!("{stream}:dead")), vec![]);
    }
    assert!(
        !lines
            .iter()
            .any(|l| l["fields"]["message"] == "entry dead-lettered"),
        "{stderr}"
    );

    // The default `redis_stream` sink wrote each alert so that a stock
    // Watermill subscriber reads it (both sinks deliver on their own, so
    // wait until they agree).
    assert!(
        wait_until(Duration::from_secs(20), || xrange_raw(
            &mut con,
            "tripline-alerts"
        )
        .len()
            == project.json_lines("alerts.jsonl").len()),
        "tripline-alerts: {:?}",
        xrange(&mut con, "tripline-alerts")
    );
    let written = xrange_raw(&mut con, "tripline-alerts").len();
    assert!(written >= alerts.len());
    assert_watermill_stream(&mut con, "tripline-alerts", written);
}

/// Every entry of `stream` reads as Watermill, and carries an alert.
fn assert_watermill_stream(con: &mut redis::Connection, stream: &str, count: usize) {
    let entries = xrange_raw(con, stream);
    assert_eq!(entries.len(), count);
    for entry in &entries {
        let alert = read_as_watermill(&entry.map);
        assert!(alert["fingerprint"].is_string(), "{alert}");
        assert!(alert["name"].is_string(), "{alert}");
    }
}

/// A `redis_stream` sink written without `format` used to write one `alert`
/// field, on which a stock Watermill subscriber panics.
#[test]
fn redis_stream_sink_without_format_is_readable_by_watermill() {
    let redis = RedisServer::start();
    let mut con = redis.conn();
    let project = Project::new(
        &config("  - name: s\n    streams: [s]\n"),
        &[
            (
                "rules/a.rhai",
                "fn on_message(msg, ctx) { alert(#{ name: \"X\", labels: #{ host: msg.host } }); }",
            ),
            ("plugins/alerts-stream.yaml", STREAM_SINK),
        ],
    );
    let tl = project.start(&redis);
    xadd(&mut con, "s", &[("host", b"r\n1\x1b[31m")]);
    assert!(
        wait_until(Duration::from_secs(20), || xrange(
            &mut con,
            "tripline-alerts"
        )
        .len()
            == 1),
        "stderr:\n{}",
        tl.stderr()
    );
    assert_watermill_stream(&mut con, "tripline-alerts", 1);
    let (_, fields) = &xrange(&mut con, "tripline-alerts")[0];
    let alert: serde_json::Value = serde_json::from_str(&fields["payload"]).unwrap();
    assert_eq!(alert["labels"]["host"], "r\n1\x1b[31m");
    assert!(!fields.contains_key("alert"), "{fields:?}");
}
