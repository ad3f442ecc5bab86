//! What tripline says about the Redis it keeps its state in: whether Redis
//! persists (checked on every connect, CONFIG refused tolerated), when
//! Redis lost the state (a marker key per hash tag vanished), and one line
//! each for the start and the end of an outage.

use std::time::Duration;

use crate::util::*;

/// One alert per reading, named by its `host`.
const RULE: &str = r#"fn on_message(msg, ctx) {
    alert(#{ name: "Seen", severity: "warning", labels: #{ host: `${msg.host}` }, summary: "seen" });
}"#;

const LOST: &str = "Redis lost tripline's data";
const NO_PERSISTENCE: &str = "Redis persists nothing";

fn local_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// A subscription on `streams` (YAML flow list) with HTTP on `http`, the
/// rule above and a file sink.
fn project(http: &str, streams: &str) -> Project {
    Project::new(
        &format!(
            "instance: test-{}\nhttp:\n  listen: \"{http}\"\nshutdown_timeout: 10s\nsubscriptions:\n  - name: seen\n    streams: {streams}\n",
            free_port()
        ),
        &[("rules/seen.rhai", RULE), ("plugins/file.yaml", FILE_SINK)],
    )
}

/// The value of the sample `series` (name and labels exactly as exported)
/// on `/metrics`.
fn metric(http: &str, series: &str) -> Option<f64> {
    let text = http_call(http, "GET", "/metrics", &[], b"").unwrap().text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Lines of `tl`'s stderr that contain `text`.
fn lines_with(tl: &Tripline, text: &str) -> Vec<String> {
    tl.stderr()
        .lines()
        .filter(|l| l.contains(text))
        .map(String::from)
        .collect()
}

fn alerted(project: &Project, host: &str) -> bool {
    project
        .json_lines("alerts.jsonl")
        .iter()
        .any(|a| a["labels"]["host"] == host)
}

#[test]
fn flushed_redis_is_reported_as_lost_state_once_by_each_instance() {
    let redis = RedisServer::start();
    let (http_a, http_b) = (local_addr(), local_addr());
    let (a, b) = (project(&http_a, "[s]"), project(&http_b, "[s]"));
    let (ta, tb) = (a.start(&redis), b.start(&redis));
    ta.wait_ready(&http_a);
    tb.wait_ready(&http_b);
    let mut con = redis.conn();
    assert!(matches!(
        q(&mut con, &["GET", "tripline:marker:{s}"]),
        Value::BulkString(_)
    ));
    // Both instances check the one marker every second: no false alarm.
    std::thread::sleep(Duration::from_secs(3));
    for (tl, http) in [(&ta, &http_a), (&tb, &http_b)] {
        assert!(lines_with(tl, LOST).is_empty(), "{}", tl.stderr());
        let lost = metric(http, "tripline_redis_state_lost_total{tag=\"s\"}");
        assert_eq!(lost, Some(0.0));
    }

    q(&mut con, &["FLUSHALL"]);
    ta.wait_for_log(LOST);
    tb.wait_for_log(LOST);
    std::thread::sleep(Duration::from_secs(2));
    for (tl, http) in [(&ta, &http_a), (&tb, &http_b)] {
        let lost = lines_with(tl, LOST);
        assert_eq!(lost.len(), 1, "{}", tl.stderr());
        assert!(
            lost[0].contains("ERROR") && lost[0].contains("[\"s\"]"),
            "{lost:?}"
        );
        let counted = metric(http, "tripline_redis_state_lost_total{tag=\"s\"}");
        assert_eq!(counted, Some(1.0));
    }

    // The engine carries on: groups and marker are back, readings alert.
    xadd(&mut con, "s", &[("host", b"after-flush")]);
    assert!(
        wait_until(Duration::from_secs(20), || alerted(&a, "after-flush")
            || alerted(&b, "after-flush")),
        "stderr a:\n{}\nstderr b:\n{}",
        ta.stderr(),
        tb.stderr()
    );
    assert!(matches!(
        q(&mut con, &["GET", "tripline:marker:{s}"]),
        Value::BulkString(_)
    ));
}

#[test]
fn one_outage_logs_one_unreachable_and_one_reachable_line() {
    let mut redis = RedisServer::start();
    let http = local_addr();
    let project = project(&http, "[s]");
    let tl = project.start(&redis);
    tl.wait_ready(&http);
    xadd(&mut redis.conn(), "s", &[("host", b"before")]);
    assert!(
        wait_until(Duration::from_secs(20), || alerted(&project, "before")),
        "{}",
        tl.stderr()
    );

    redis.stop();
    // Every task (workers, claimer, sink, lease, timers…) fails and
    // retries a few times meanwhile.
    std::thread::sleep(Duration::from_secs(4));
    redis.restart();
    tl.wait_ready(&http);
    // Tasks that were idle through the outage (the lease refreshes every
    // 10 s) find their connection broken only now.
    std::thread::sleep(Duration::from_secs(11));
    xadd(&mut redis.conn(), "s", &[("host", b"after")]);
    assert!(
        wait_until(Duration::from_secs(20), || alerted(&project, "after")),
        "{}",
        tl.stderr()
    );

    let stderr = tl.stderr();
    assert_eq!(lines_with(&tl, "Redis unreachable").len(), 1, "{stderr}");
    assert_eq!(
        lines_with(&tl, "Redis reachable again").len(),
        1,
        "{stderr}"
    );
    // The restarted Redis kept nothing: said once, and warned on start and
    // on the reconnect that Redis does not persist.
    assert_eq!(lines_with(&tl, LOST).len(), 1, "{stderr}");
    assert_eq!(lines_with(&tl, NO_PERSISTENCE).len(), 2, "{stderr}");
}

#[test]
fn redis_without_persistence_is_warned_about_and_with_aof_is_not() {
    let (bare, aof) = (RedisServer::start(), RedisServer::start_persistent());
    let (http_bare, http_aof) = (local_addr(), local_addr());
    let (p_bare, p_aof) = (project(&http_bare, "[s]"), project(&http_aof, "[s]"));
    let (t_bare, t_aof) = (p_bare.start(&bare), p_aof.start(&aof));
    t_bare.wait_ready(&http_bare);
    t_aof.wait_ready(&http_aof);

    let warned = lines_with(&t_bare, NO_PERSISTENCE);
    assert_eq!(warned.len(), 1, "{}", t_bare.stderr());
    assert!(
        warned[0].contains("WARN")
            && warned[0].contains("appendonly no, save \"\"")
            && warned[0].contains("a Redis restart loses the alert state"),
        "{warned:?}"
    );
    assert!(
        lines_with(&t_aof, NO_PERSISTENCE).is_empty(),
        "{}",
        t_aof.stderr()
    );
    for (http, found) in [(&http_bare, "none"), (&http_aof, "aof")] {
        for mode in ["none", "unknown", "rdb", "aof"] {
            let series = format!("tripline_redis_persistence{{mode=\"{mode}\"}}");
            let want = if mode == found { 1.0 } else { 0.0 };
            assert_eq!(metric(http, &series), Some(want), "{series}");
        }
    }
}

#[test]
fn config_refused_by_an_acl_is_tolerated() {
    let redis = RedisServer::start();
    let mut con = redis.conn();
    q(
        &mut con,
        &[
            "ACL", "SETUSER", "noconfig", "on", ">pw", "~*", "&*", "+@all", "-config",
        ],
    );
    let http = local_addr();
    let project = project(&http, "[s]");
    let tl = project.start_on(&format!("redis://noconfig:pw@127.0.0.1:{}/", redis.port));
    tl.wait_ready(&http);

    let unknown = lines_with(&tl, "cannot tell whether Redis persists");
    assert_eq!(unknown.len(), 1, "{}", tl.stderr());
    assert!(
        unknown[0].contains("INFO") && unknown[0].contains("no permissions"),
        "{unknown:?}"
    );
    let loud: Vec<String> = tl
        .stderr()
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .map(String::from)
        .collect();
    assert!(loud.is_empty(), "{loud:?}");
    assert_eq!(
        metric(&http, "tripline_redis_persistence{mode=\"unknown\"}"),
        Some(1.0)
    );

    // The markers need no CONFIG: lost state is still detected.
    q(&mut con, &["FLUSHALL"]);
    tl.wait_for_log(LOST);
}

#[test]
fn cluster_nodes_without_persistence_are_named_and_a_flushed_node_loses_its_tags() {
    let cluster = RedisCluster::start(3, 0, 5000);
    let http = local_addr();
    let project = project(&http, "[{topic: t, shards: 3}]");
    let tl = project.start_on(&cluster.addr());
    tl.wait_ready(&http);

    let warned = lines_with(&tl, NO_PERSISTENCE);
    assert_eq!(warned.len(), 1, "{}", tl.stderr());
    for node in &cluster.nodes {
        let named = format!("127.0.0.1:{}: appendonly no", node.port);
        assert!(warned[0].contains(&named), "{named} in {warned:?}");
    }

    // Only the node holding shard 0's marker loses its data.
    let port = cluster.master_of("tripline:marker:{0}");
    q(&mut cluster.node(port).try_conn().unwrap(), &["FLUSHALL"]);
    tl.wait_for_log(LOST);
    std::thread::sleep(Duration::from_secs(2));
    let lost = lines_with(&tl, LOST);
    assert_eq!(lost.len(), 1, "{}", tl.stderr());
    for tag in ["0", "1", "2"] {
        let on_node = cluster.master_of(&format!("tripline:marker:{{{tag}}}")) == port;
        let series = format!("tripline_redis_state_lost_total{{tag=\"{tag}\"}}");
        let want = if on_node { 1.0 } else { 0.0 };
        assert_eq!(metric(&http, &series), Some(want), "{series}: {lost:?}");
        assert_eq!(lost[0].contains(&format!("\"{tag}\"")), on_node, "{lost:?}");
    }
}
