//! The group reader's own XREADGROUP connection (`group_reader::fast`)
//! against a real Redis: passwords, ACL users and databases, errors that
//! keep their code, and a group destroyed under a running instance.

use std::time::Duration;

use redis::ErrorKind;
use tripline::group_reader::fast::StreamReader;
use tripline::redis_conn::{RedisEndpoint, RedisTarget};

use crate::pipeline::{counting_project, seqs_delivered};
use crate::util::*;

fn publish(con: &mut redis::Connection, seqs: std::ops::Range<u64>) {
    for i in seqs {
        xadd(con, "s", &[("seq", i.to_string().as_bytes())]);
    }
}

/// Waits until every seq in `0..n` was alerted on.
fn assert_all_delivered(project: &Project, tl: &Tripline, n: u64) {
    assert!(
        wait_until(Duration::from_secs(20), || seqs_delivered(project).len()
            as u64
            >= n),
        "{} of {n} delivered; stderr:\n{}",
        seqs_delivered(project).len(),
        tl.stderr()
    );
}

#[test]
fn pipeline_runs_against_a_password_protected_redis() {
    let redis = RedisServer::start_with_password("s3cret");
    let project = counting_project("    block: 500ms\n");
    let tl = project.start_on(&redis.url());
    let mut con = redis.conn();
    publish(&mut con, 0..300);
    assert_all_delivered(&project, &tl, 300);
    assert!(wait_until(Duration::from_secs(10), || group_position(
        &mut con, "s", "counter"
    ) == (0, 0)));
}

#[test]
fn pipeline_runs_as_an_acl_user_on_another_database() {
    let redis = RedisServer::start_with_password("admin");
    redis.add_user("reader", "pw");
    let project = counting_project("    block: 500ms\n");
    let tl = project.start_on(&format!("redis://reader:pw@127.0.0.1:{}/2", redis.port));
    let mut con = redis.conn();
    q(&mut con, &["SELECT", "2"]);
    publish(&mut con, 0..300);
    assert_all_delivered(&project, &tl, 300);
    assert!(wait_until(Duration::from_secs(10), || group_position(
        &mut con, "s", "counter"
    ) == (0, 0)));
    let mut db0 = redis.conn();
    assert_eq!(q(&mut db0, &["EXISTS", "s"]), Value::Int(0));
}

#[test]
fn wrong_password_is_logged_and_tripline_keeps_retrying() {
    let redis = RedisServer::start_with_password("right");
    let project = counting_project("    block: 500ms\n");
    let mut tl = project.start_on(&format!("redis://:wrong@127.0.0.1:{}/", redis.port));
    assert!(
        wait_until(Duration::from_secs(10), || tl
            .stderr()
            .contains("Redis unreachable")),
        "stderr:\n{}",
        tl.stderr()
    );
    assert!(
        tl.stderr().to_lowercase().contains("authentication failed"),
        "{}",
        tl.stderr()
    );
    assert!(
        !tl.stderr().contains("wrong@"),
        "password leaked into the log"
    );
    assert_eq!(tl.wait(Duration::from_secs(2)), None, "tripline exited");
}

#[test]
fn group_destroyed_under_a_running_instance_is_recreated() {
    let redis = RedisServer::start();
    let project = counting_project("    block: 500ms\n");
    let tl = project.start(&redis);
    let mut con = redis.conn();
    publish(&mut con, 0..100);
    assert_all_delivered(&project, &tl, 100);
    // The worker is blocked in XREADGROUP when its group disappears.
    q(&mut con, &["XGROUP", "DESTROY", "s", "counter"]);
    assert!(
        wait_until(Duration::from_secs(10), || tl.stderr().contains("NOGROUP")),
        "stderr:\n{}",
        tl.stderr()
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            matches!(q(&mut con, &["XINFO", "GROUPS", "s"]), Value::Array(g) if !g.is_empty())
        }),
        "group not recreated; stderr:\n{}",
        tl.stderr()
    );
    publish(&mut con, 100..200);
    assert_all_delivered(&project, &tl, 200);
    assert!(wait_until(Duration::from_secs(10), || group_position(
        &mut con, "s", "counter"
    ) == (0, 0)));
}

fn reader(url: &str) -> StreamReader {
    let target =
        RedisTarget::new(&RedisEndpoint::parse(url).unwrap(), Duration::from_secs(2)).unwrap();
    StreamReader::for_target(&target, Duration::from_secs(3)).unwrap()
}

fn xreadgroup(id: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg("g")
        .arg("c")
        .arg("COUNT")
        .arg(10)
        .arg("BLOCK")
        .arg(100)
        .arg("STREAMS")
        .arg("s")
        .arg(id);
    cmd
}

#[test]
fn reader_authenticates_selects_and_reports_redis_errors() {
    let redis = RedisServer::start_with_password("admin");
    redis.add_user("reader", "pw");
    let mut con = redis.conn();
    q(&mut con, &["SELECT", "3"]);
    q(&mut con, &["XGROUP", "CREATE", "s", "g", "0", "MKSTREAM"]);
    let id = xadd(&mut con, "s", &[("k", b"v\r\n\0".as_slice())]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let url = format!("redis://reader:pw@127.0.0.1:{}/3", redis.port);
        let mut r = reader(&url);
        let batches = r.read(&xreadgroup(">")).await.unwrap();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].0, "s");
        assert_eq!(batches[0].1[0].id, id);
        assert_eq!(
            batches[0].1[0].fields,
            Some(vec![(b"k".to_vec(), b"v\r\n\0".to_vec())])
        );
        // Blocks 100 ms and times out: nothing to read.
        assert!(r.read(&xreadgroup(">")).await.unwrap().is_empty());
        // The entry, deleted while pending, is re-read without fields.
        q(&mut con, &["XDEL", "s", &id]);
        let pending = r.read(&xreadgroup("0")).await.unwrap();
        assert_eq!(pending[0].1[0].id, id);
        assert_eq!(pending[0].1[0].fields, None);

        q(&mut con, &["XGROUP", "DESTROY", "s", "g"]);
        let e = r.read(&xreadgroup(">")).await.unwrap_err();
        assert_eq!(e.code(), Some("NOGROUP"), "{e:?}");

        let mut db0 = reader(&format!("redis://reader:pw@127.0.0.1:{}/", redis.port));
        let e = db0.read(&xreadgroup(">")).await.unwrap_err();
        assert_eq!(e.code(), Some("NOGROUP"), "db 0 has no stream s: {e:?}");

        let mut wrong = reader(&format!("redis://reader:nope@127.0.0.1:{}/", redis.port));
        let e = wrong.read(&xreadgroup(">")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AuthenticationFailed, "{e:?}");
        assert!(e.to_string().contains("WRONGPASS"), "{e}");

        let mut no_db = reader(&format!("redis://reader:pw@127.0.0.1:{}/99", redis.port));
        let e = no_db.read(&xreadgroup(">")).await.unwrap_err();
        assert!(e.to_string().contains("database"), "{e}");
    });
}
