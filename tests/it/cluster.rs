//! Scale-out on a local Redis Cluster (3 masters, started per test):
//! instances sharing a sharded topic, an instance SIGKILLed mid-stream, a
//! master failing over mid-stream; plus sharded publishing and consumer
//! housekeeping, which work on a single server too.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tripline::shard::{shard_for, shard_streams, stream_for};

use crate::util::*;

const TOPIC: &str = "telemetry";
const SHARDS: u32 = 6;
/// Devices publishing; readings of one device stay on one shard.
const DEVICES: u64 = 24;

/// One alert per message, named by its `seq`: the file sink then shows
/// which messages were processed and how often each was notified.
const SEQ_RULE: &str = r#"fn on_message(msg, ctx) {
    alert(#{ name: "Seen", severity: "warning", labels: #{ seq: `${msg.seq}` }, summary: "seen" });
}"#;

/// One subscription over the six shards of [`TOPIC`], claiming fast from
/// dead consumers, and a file sink.
fn seq_project() -> Project {
    let subs = format!(
        "  - name: seen
    streams: [{{topic: {TOPIC}, shards: {SHARDS}}}]
    batch_size: 20
    concurrency: 1
    claim_min_idle: 2s
    claim_interval: 500ms
"
    );
    Project::new(
        &config(&subs),
        &[
            ("rules/seen.rhai", SEQ_RULE),
            ("plugins/file.yaml", FILE_SINK),
        ],
    )
}

fn cluster_client(urls: &[String]) -> redis::RedisResult<redis::cluster::ClusterConnection> {
    redis::cluster::ClusterClientBuilder::new(urls.to_vec())
        .connection_timeout(Duration::from_secs(1))
        .build()?
        .get_connection()
}

/// Publishes message `seq` (device `dev-<seq % 24>`) to its device's
/// shard, retrying (with a new client) until Redis takes it: a failover
/// may be under way.
fn publish(urls: &[String], con: &mut Option<redis::cluster::ClusterConnection>, seq: u64) {
    let device = format!("dev-{}", seq % DEVICES);
    let stream = stream_for(TOPIC, SHARDS, &device);
    let payload = format!(r#"{{"hostname":"{device}","seq":{seq}}}"#);
    loop {
        if con.is_none() {
            *con = cluster_client(urls).ok();
        }
        if let Some(c) = con.as_mut() {
            let added: redis::RedisResult<String> = redis::cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("payload")
                .arg(&payload)
                .query(c);
            if added.is_ok() {
                return;
            }
            *con = None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A publisher thread sending `from..to` (or on until `stop` when `to` is
/// `None`), a little paced so the run lasts a few seconds; `sent` counts
/// acknowledged messages.
struct Publisher {
    /// Messages Redis acknowledged so far.
    sent: Arc<AtomicU64>,
    /// Set by `finish` when the publisher runs unbounded.
    stop: Arc<AtomicBool>,
    /// Whether it stops by itself after its last message.
    bounded: bool,
    /// Taken by `finish`.
    thread: Option<JoinHandle<()>>,
}

impl Publisher {
    fn start(urls: Vec<String>, from: u64, to: Option<u64>) -> Publisher {
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (sent, stop) = (sent.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut con = None;
                let mut seq = from;
                while to.is_none_or(|t| seq < t) && !stop.load(Ordering::SeqCst) {
                    publish(&urls, &mut con, seq);
                    sent.fetch_add(1, Ordering::SeqCst);
                    seq += 1;
                    if seq.is_multiple_of(10) {
                        std::thread::sleep(Duration::from_millis(15));
                    }
                }
            })
        };
        Publisher {
            sent,
            stop,
            bounded: to.is_some(),
            thread: Some(thread),
        }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Stops (if unbounded) and waits; returns how many were sent.
    fn finish(mut self) -> u64 {
        if !self.bounded {
            self.stop.store(true, Ordering::SeqCst);
        }
        self.thread.take().unwrap().join().unwrap();
        self.sent()
    }
}

fn urls(cluster: &RedisCluster) -> Vec<String> {
    cluster
        .nodes
        .iter()
        .map(|n| format!("redis://127.0.0.1:{}/", n.port))
        .collect()
}

/// How often each `seq` was delivered by the file sink.
fn delivered(project: &Project) -> HashMap<u64, usize> {
    let mut seen = HashMap::new();
    for a in project.json_lines("alerts.jsonl") {
        let seq = a["labels"]["seq"].as_str().unwrap().parse().unwrap();
        *seen.entry(seq).or_insert(0) += 1;
    }
    seen
}

/// How often each `seq` was committed to the outboxes (all shards).
fn committed(cluster: &RedisCluster) -> HashMap<u64, usize> {
    let mut con = cluster.conn();
    let mut seen = HashMap::new();
    for i in 0..SHARDS {
        for (_, fields) in xrange(&mut con, &format!("tripline:alerts:{{{i}}}")) {
            let alert: serde_json::Value = serde_json::from_str(&fields["alert"]).unwrap();
            let seq = alert["labels"]["seq"].as_str().unwrap().parse().unwrap();
            *seen.entry(seq).or_insert(0) += 1;
        }
    }
    seen
}

/// Entries pending in the subscription's group for consumers whose name
/// starts with `prefix`, over all shards.
fn pending_of(cluster: &RedisCluster, prefix: &str) -> i64 {
    let mut con = cluster.conn();
    let mut total = 0;
    for stream in shard_streams(TOPIC, SHARDS) {
        let summary: Vec<Value> = redis::cmd("XPENDING")
            .arg(&stream)
            .arg("seen")
            .query(&mut con)
            .unwrap_or_default();
        let Some(Value::Array(consumers)) = summary.get(3) else {
            continue;
        };
        for c in consumers {
            if let Value::Array(pair) = c
                && let [Value::BulkString(name), Value::BulkString(n)] = pair.as_slice()
                && name.starts_with(prefix.as_bytes())
            {
                total += String::from_utf8_lossy(n).parse::<i64>().unwrap();
            }
        }
    }
    total
}

/// Starts an instance and waits for its instance name (from its log).
fn start_instance(project: &Project, addr: &str) -> (Tripline, String) {
    let tl = project.start_on(addr);
    let mut name = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            name = tl
                .stderr()
                .lines()
                .find(|l| l.contains("instance name acquired"))
                .and_then(|l| l.split("instance=").nth(1))
                .map(|v| {
                    v.split_whitespace()
                        .next()
                        .unwrap()
                        .trim_matches('"')
                        .to_string()
                });
            name.is_some()
        }),
        "no instance name; stderr:\n{}",
        tl.stderr()
    );
    (tl, name.unwrap())
}

fn all_delivered(project: &Project, seqs: impl IntoIterator<Item = u64>) -> bool {
    let got = delivered(project);
    seqs.into_iter().all(|s| got.contains_key(&s))
}

fn missing(project: &Project, seqs: impl IntoIterator<Item = u64>) -> Vec<u64> {
    let got = delivered(project);
    let mut m: Vec<u64> = seqs.into_iter().filter(|s| !got.contains_key(s)).collect();
    m.sort();
    m.truncate(20);
    m
}

#[test]
fn three_instances_share_six_shards_and_a_sigkilled_one_loses_nothing() {
    let cluster = RedisCluster::start(3, 0, 5000);
    let addr = cluster.addr();
    let project = seq_project();
    let mut instances: Vec<(Tripline, String)> =
        (0..3).map(|_| start_instance(&project, &addr)).collect();

    // Phase 1: all three running; every message's alert delivered once.
    let first = Publisher::start(urls(&cluster), 0, Some(600)).finish();
    assert_eq!(first, 600);
    assert!(
        wait_until(Duration::from_secs(60), || all_delivered(&project, 0..600)),
        "missing {:?}",
        missing(&project, 0..600)
    );
    let got = delivered(&project);
    assert!(
        got.values().all(|n| *n == 1),
        "an alert was delivered twice: {:?}",
        got.iter()
            .filter(|(_, n)| **n > 1)
            .take(10)
            .collect::<Vec<_>>()
    );
    // Each instance committed its share (one log line per notification).
    let shares: Vec<usize> = instances
        .iter()
        .map(|(tl, _)| tl.stderr().matches("alert=Seen").count())
        .collect();
    assert_eq!(
        shares.iter().sum::<usize>(),
        600,
        "{shares:?}; stderr:\n{}",
        instances[0].0.stderr()
    );
    assert!(
        shares.iter().all(|n| *n > 0),
        "an instance idled: {shares:?}"
    );

    // Phase 2: SIGKILL one instance while it holds entries it has read and
    // not committed; the others claim them.
    let second = Publisher::start(urls(&cluster), 600, Some(2400));
    assert!(wait_until(Duration::from_secs(60), || second.sent() >= 500));
    let (mut victim, victim_name) = instances.remove(1);
    let consumer = format!("{victim_name}-w");
    let mut caught = 0;
    for _ in 0..3000 {
        victim.signal("STOP");
        caught = pending_of(&cluster, &consumer);
        if caught > 0 {
            break;
        }
        victim.signal("CONT");
        std::thread::sleep(Duration::from_millis(5));
    }
    victim.kill();
    assert!(
        caught > 0,
        "never caught {victim_name} holding pending entries"
    );
    assert_eq!(second.finish(), 1800);
    // Claimed after 2 s; the victim's unacknowledged alerts (if any) are
    // adopted by a sink once its 30 s instance lease has expired.
    assert!(
        wait_until(Duration::from_secs(90), || all_delivered(&project, 0..2400)),
        "missing {:?}",
        missing(&project, 0..2400)
    );
    assert!(
        wait_until(Duration::from_secs(10), || pending_of(&cluster, &consumer)
            == 0),
        "{victim_name} still holds entries"
    );
    let claimed = instances.iter().any(|(tl, _)| {
        tl.stderr()
            .contains("claimed entries idle longer than claim_min_idle")
    });
    assert!(claimed, "no survivor logged a claim");
    // Committed exactly once per message, whoever judged it.
    let outbox = committed(&cluster);
    assert_eq!(outbox.len(), 2400);
    assert!(
        outbox.values().all(|n| *n == 1),
        "committed twice: {:?}",
        outbox
            .iter()
            .filter(|(_, n)| **n > 1)
            .take(10)
            .collect::<Vec<_>>()
    );
}

#[test]
fn manual_failover_mid_stream_loses_nothing() {
    let cluster = RedisCluster::start(3, 1, 2000);
    let project = seq_project();
    let (tl, _) = start_instance(&project, &cluster.addr());
    let publisher = Publisher::start(urls(&cluster), 0, Some(1500));
    assert!(wait_until(Duration::from_secs(60), || delivered(&project)
        .len()
        >= 300));
    let master = cluster.master_of(&shard_streams(TOPIC, SHARDS)[0]);
    let replica = cluster.replica_of(master);
    let _: String = redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .query(&mut cluster.node(replica).try_conn().unwrap())
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || cluster.is_master(replica)),
        "replica {replica} was not promoted"
    );
    assert_eq!(publisher.finish(), 1500);
    assert!(
        wait_until(Duration::from_secs(60), || all_delivered(&project, 0..1500)),
        "missing {:?}; stderr:\n{}",
        missing(&project, 0..1500),
        tl.stderr()
    );
    let outbox = committed(&cluster);
    assert_eq!(outbox.len(), 1500);
    assert!(
        outbox.values().all(|n| *n == 1),
        "an alert was committed twice"
    );
}

#[test]
fn master_killed_mid_stream_replica_takes_over_and_tripline_continues() {
    let mut cluster = RedisCluster::start(3, 1, 2000);
    let project = seq_project();
    let (tl, _) = start_instance(&project, &cluster.addr());
    let publisher = Publisher::start(urls(&cluster), 0, None);
    assert!(wait_until(Duration::from_secs(60), || delivered(&project)
        .len()
        >= 300));
    let master = cluster.master_of(&shard_streams(TOPIC, SHARDS)[0]);
    let replica = cluster.replica_of(master);
    cluster.kill(master);
    assert!(
        wait_until(Duration::from_secs(30), || cluster.is_master(replica)),
        "replica {replica} was not promoted; its log:\n{}",
        cluster.node(replica).log()
    );
    cluster.wait_ok();
    let at_promotion = publisher.sent();
    assert!(wait_until(Duration::from_secs(60), || publisher.sent()
        >= at_promotion + 600));
    let sent = publisher.finish();
    // Everything sent after the promotion is judged and notified.
    assert!(
        wait_until(Duration::from_secs(60), || all_delivered(
            &project,
            at_promotion..sent
        )),
        "missing {:?}; stderr:\n{}",
        missing(&project, at_promotion..sent),
        tl.stderr()
    );
    // Redis replicates asynchronously: writes the dead master had not passed
    // on are gone (entries, acks, committed alerts), and tripline cannot
    // notify again what Redis lost. What Redis kept is all judged and
    // acknowledged: nothing pending, nothing undelivered, on every shard.
    assert!(
        wait_until(Duration::from_secs(60), || unsettled(&cluster) == 0),
        "entries left unsettled: {}; stderr:\n{}",
        unsettled(&cluster),
        tl.stderr()
    );
}

/// Entries of the topic not yet acknowledged by the subscription's group
/// (pending plus lag, over all shards).
fn unsettled(cluster: &RedisCluster) -> i64 {
    let mut con = cluster.conn();
    shard_streams(TOPIC, SHARDS)
        .iter()
        .map(|stream| {
            let groups: Vec<HashMap<String, Value>> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(stream)
                .query(&mut con)
                .unwrap();
            let g = groups
                .iter()
                .find(|g| g.get("name") == Some(&Value::BulkString(b"seen".to_vec())))
                .unwrap();
            let int = |k: &str| match g.get(k) {
                Some(Value::Int(i)) => *i,
                _ => i64::MAX / 16,
            };
            int("pending") + int("lag")
        })
        .sum()
}

#[test]
fn dead_letters_share_their_stream_slot_on_cluster() {
    let cluster = RedisCluster::start(3, 0, 5000);
    let project = Project::new(
        &config("  - name: seen\n    streams: [plain, {topic: t, shards: 2}]\n"),
        &[
            ("rules/seen.rhai", SEQ_RULE),
            ("plugins/file.yaml", FILE_SINK),
        ],
    );
    let _tl = start_instance(&project, &cluster.addr());
    let mut con = cluster.conn();
    for stream in ["plain", "t:{1}"] {
        let _: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("payload")
            .arg("{not json")
            .query(&mut con)
            .unwrap();
        let _: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("payload")
            .arg(r#"{"seq": 7}"#)
            .query(&mut con)
            .unwrap();
    }
    // `plain:dead` would hash elsewhere than `plain`: Cluster gets `{plain}:dead`.
    for dead in ["{plain}:dead", "t:{1}:dead"] {
        assert!(
            wait_until(Duration::from_secs(30), || xrange(&mut con, dead).len()
                == 1),
            "nothing in {dead}"
        );
        let (_, entry) = &xrange(&mut con, dead)[0];
        assert!(entry["tripline_reason"].contains("JSON"), "{entry:?}");
    }
    // The same alert identity raised from two streams: its lifecycle state
    // lives with each stream (hash tag), so each stream notifies it once.
    assert!(wait_until(Duration::from_secs(30), || delivered(&project)
        .get(&7)
        .is_some_and(|n| *n == 2)));
}

#[test]
fn simulate_keeps_each_device_on_one_shard_of_a_cluster() {
    let cluster = RedisCluster::start(3, 0, 5000);
    let project = Project::new(&config("  - {name: a, streams: [x]}\n"), &[]);
    let (code, _, err) = project.command(
        &[
            "simulate",
            "--shards",
            "4",
            "--count",
            "400",
            "--rate",
            "0",
            "--devices",
            "8",
        ],
        Some(&cluster.addr()),
    );
    assert_eq!(code, 0, "{err}");
    let mut con = cluster.conn();
    let mut total = 0;
    for topic in ["packet-counter-errors", "transceiver-telemetry"] {
        for (i, stream) in shard_streams(topic, 4).iter().enumerate() {
            for (_, fields) in xrange(&mut con, stream) {
                let v: serde_json::Value = serde_json::from_str(&fields["payload"]).unwrap();
                let device = v["hostname"].as_str().unwrap();
                assert_eq!(shard_for(device, 4) as usize, i, "{device} on {stream}");
                total += 1;
            }
        }
    }
    assert_eq!(total, 400);
}

#[test]
fn gateway_publishes_a_device_to_its_shard() {
    let redis = RedisServer::start();
    let listen = format!("127.0.0.1:{}", free_port());
    let project = Project::new(
        &format!(
            "instance: test-{}\nhttp:\n  listen: \"{listen}\"\n  gateway: {{stream: readings, shards: 4}}\nsubscriptions:\n  - name: a\n    streams: [{{topic: readings, shards: 4}}]\n",
            free_port()
        ),
        &[],
    );
    let tl = project.start(&redis);
    let mut con = redis.conn();
    for host in ["core-1", "core-2", "edge-7"] {
        let expected = format!("readings:{{{}}}", shard_for(host, 4));
        for _ in 0..2 {
            let body = format!(r#"{{"hostname":"{host}","interface":"et-0","input_errors":5}}"#);
            let mut reply = None;
            assert!(
                wait_until(Duration::from_secs(30), || {
                    reply = http_call(&listen, "POST", "/telemetry-data", &[], body.as_bytes())
                        .ok()
                        .filter(|r| r.status == 200);
                    reply.is_some()
                }),
                "gateway never accepted; stderr:\n{}",
                tl.stderr()
            );
            assert_eq!(reply.unwrap().json()["stream"], expected.as_str());
        }
    }
    for stream in shard_streams("readings", 4) {
        let hosts: Vec<String> = xrange(&mut con, &stream)
            .into_iter()
            .map(|(_, f)| {
                let v: serde_json::Value = serde_json::from_str(&f["payload"]).unwrap();
                v["hostname"].as_str().unwrap().to_string()
            })
            .collect();
        let expected: Vec<&str> = ["core-1", "core-2", "edge-7"]
            .into_iter()
            .filter(|h| stream_for("readings", 4, h) == stream)
            .flat_map(|h| [h, h])
            .collect();
        assert_eq!(hosts, expected, "{stream}");
    }
}

#[test]
fn idle_consumers_without_pending_entries_are_removed() {
    let redis = RedisServer::start();
    let mut con = redis.conn();
    q(&mut con, &["XGROUP", "CREATE", "s", "g", "0", "MKSTREAM"]);
    q(&mut con, &["XGROUP", "CREATECONSUMER", "s", "g", "gone-w0"]);
    // `stuck` holds an entry: it must stay until the entry is settled.
    xadd(&mut con, "s", &[("payload", br#"{"v": 1}"#)]);
    q(
        &mut con,
        &[
            "XREADGROUP",
            "GROUP",
            "g",
            "stuck",
            "COUNT",
            "1",
            "STREAMS",
            "s",
            ">",
        ],
    );
    let project = Project::new(
        &format!(
            "{}consumer_cleanup: {{max_idle: 1s, interval: 300ms}}\n",
            config("  - {name: a, group: g, streams: [s], claim_min_idle: 1h}\n")
        ),
        &[],
    );
    let tl = project.start(&redis);
    let consumers = |con: &mut redis::Connection| -> Vec<String> {
        let rows: Vec<HashMap<String, Value>> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg("s")
            .arg("g")
            .query(con)
            .unwrap();
        rows.iter()
            .map(|r| match &r["name"] {
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                other => format!("{other:?}"),
            })
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(30), || !consumers(&mut con)
            .contains(&"gone-w0".to_string())),
        "gone-w0 was not removed; stderr:\n{}",
        tl.stderr()
    );
    assert!(tl.stderr().contains("removed an idle consumer"));
    let left = consumers(&mut con);
    assert!(left.contains(&"stuck".to_string()), "{left:?}");
    assert!(
        left.iter().any(|c| c.ends_with("-w0") && c != "gone-w0"),
        "the instance's own consumer went too: {left:?}"
    );
}

/// Connections open on `node` besides the one asking (`CLIENT LIST`).
fn clients_on(node: &ClusterNode) -> usize {
    let mut con = node.try_conn().expect("connect to a node");
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut con)
        .expect("CLIENT LIST");
    list.lines().count() - 1
}

/// What one instance holds on each node caps how many instances a
/// Cluster's `maxclients` admits (docs/scaling.md). Measured with `CLIENT
/// LIST` once the instance has read and delivered through every shard; the
/// figure is printed (`--nocapture`), and it must stay within what
/// scale-out.md documents per node: the blocking readers of the tags the
/// node serves (here one worker and one sink lane per tag) plus the shared
/// connection, the health check's and the two whole-state readers'. It was
/// 30 on every node while each task had its own Cluster connection, with a
/// socket on every node.
#[test]
fn one_instance_holds_a_bounded_number_of_connections_per_cluster_node() {
    let cluster = RedisCluster::start(3, 0, 5000);
    let before: Vec<usize> = cluster.nodes.iter().map(clients_on).collect();
    let project = seq_project();
    let (_tl, _) = start_instance(&project, &cluster.addr());
    assert_eq!(Publisher::start(urls(&cluster), 0, Some(60)).finish(), 60);
    assert!(
        wait_until(Duration::from_secs(60), || all_delivered(&project, 0..60)),
        "missing {:?}",
        missing(&project, 0..60)
    );
    std::thread::sleep(Duration::from_secs(1));
    let held: Vec<usize> = cluster
        .nodes
        .iter()
        .zip(&before)
        .map(|(n, b)| clients_on(n).saturating_sub(*b))
        .collect();
    eprintln!(
        "connections per node held by one instance ({SHARDS} shards, one sink, 3 masters): {held:?}"
    );
    let documented: Vec<usize> = cluster
        .nodes
        .iter()
        .map(|n| {
            let tags = shard_streams(TOPIC, SHARDS)
                .iter()
                .filter(|s| cluster.master_of(s) == n.port)
                .count();
            2 * tags + 4
        })
        .collect();
    eprintln!("documented at most: {documented:?}");
    assert!(
        held.iter()
            .zip(&documented)
            .all(|(n, d)| (1..=*d).contains(n)),
        "{held:?}, documented at most {documented:?}"
    );
}
