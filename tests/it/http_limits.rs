//! The HTTP listener sheds clients that hold connections without using
//! them: header bytes trickled one at a time, a request body that stops
//! half-way, a connection that sends nothing. `/healthz` keeps answering
//! while hundreds of such connections are open, and `http.max_connections`
//! bounds how many are served at once. Timeouts are configured small (1-2 s)
//! and the assertions are generous bounds.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::util::*;

fn limits_project(addr: &str, limits: &str) -> Project {
    let config = format!(
        "instance: test-{}\nhttp:\n  listen: \"{addr}\"\n{limits}shutdown_timeout: 10s\nsubscriptions:\n  - name: a\n    streams: [s]\n",
        free_port()
    );
    Project::new(&config, &[])
}

fn start_serving(addr: &str, limits: &str) -> (RedisServer, Project, Tripline) {
    let redis = RedisServer::start();
    let project = limits_project(addr, limits);
    let tl = project.start(&redis);
    assert!(
        wait_until(Duration::from_secs(15), || healthz(addr).is_some()),
        "HTTP never came up:\n{}",
        tl.stderr()
    );
    (redis, project, tl)
}

fn healthz(addr: &str) -> Option<String> {
    http_call(addr, "GET", "/healthz", &[], b"")
        .ok()
        .filter(|r| r.status == 200)
        .map(|r| r.text())
}

/// Whether the server has closed `s`: a read sees the end (after any
/// response the server sent first, such as a 408) or a reset.
fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// Waits for the server to close `s`, calling `step` between checks;
/// returns how long that took, or `None` if it stayed open `limit`.
fn time_to_close(
    s: &mut TcpStream,
    limit: Duration,
    mut step: impl FnMut(&mut TcpStream),
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if closed(s) {
            return Some(start.elapsed());
        }
        step(s);
        std::thread::sleep(Duration::from_millis(150));
    }
    None
}

const LIMITS: &str = "  header_read_timeout: 1s\n  idle_timeout: 2s\n";

#[test]
fn a_client_trickling_header_bytes_is_cut_off_by_the_header_timeout() {
    let addr = format!("127.0.0.1:{}", free_port());
    let (_redis, _project, _tl) = start_serving(&addr, LIMITS);
    let mut s = TcpStream::connect(&addr).unwrap();
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
        .iter()
        .chain(b"a".repeat(10_000).iter())
        .copied()
        .collect::<Vec<u8>>();
    let mut sent = 0;
    // One byte every ~150 ms: bytes keep moving, so only the header
    // timeout can end this.
    let took = time_to_close(&mut s, Duration::from_secs(30), |s| {
        if s.write_all(&request[sent..sent + 1]).is_ok() {
            sent += 1;
        }
    });
    let took = took.unwrap_or_else(|| panic!("still open after 30 s and {sent} header bytes"));
    eprintln!("trickling client cut off after {took:?} and {sent} header bytes");
    assert!(
        took >= Duration::from_millis(900),
        "closed after {took:?}, before the 1 s timeout"
    );
    // The listener is fine afterwards.
    assert_eq!(healthz(&addr).as_deref(), Some("ok\n"));
}

#[test]
fn idle_connections_and_stalled_bodies_are_closed() {
    let addr = format!("127.0.0.1:{}", free_port());
    let (_redis, _project, _tl) = start_serving(&addr, LIMITS);

    // Opens and sends nothing.
    let mut silent = TcpStream::connect(&addr).unwrap();
    let took = time_to_close(&mut silent, Duration::from_secs(30), |_| {});
    assert!(took.is_some(), "a silent connection stayed open 30 s");
    eprintln!("silent connection closed after {took:?}");

    // A kept-alive connection after its answer.
    let mut kept = TcpStream::connect(&addr).unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let took = time_to_close(&mut kept, Duration::from_secs(30), |_| {});
    assert!(
        took.is_some(),
        "an idle kept-alive connection stayed open 30 s"
    );

    // Headers complete, then the body stops: the idle timeout (2 s) ends it.
    let mut stalled = TcpStream::connect(&addr).unwrap();
    stalled
        .write_all(b"POST /telemetry-data HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"hostname\":")
        .unwrap();
    let took = time_to_close(&mut stalled, Duration::from_secs(30), |_| {})
        .expect("a stalled body kept its connection 30 s");
    eprintln!("stalled body cut off after {took:?}");
    assert!(
        took >= Duration::from_millis(1800),
        "closed after {took:?}, before the 2 s idle timeout"
    );
}

#[test]
fn healthz_answers_while_200_slow_clients_hold_connections_and_the_cap_holds() {
    let addr = format!("127.0.0.1:{}", free_port());
    let (_redis, _project, tl) = start_serving(
        &addr,
        "  header_read_timeout: 60s\n  idle_timeout: 60s\n  max_connections: 210\n",
    );
    let mut slow: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s
        })
        .collect();
    for _ in 0..3 {
        assert_eq!(healthz(&addr).as_deref(), Some("ok\n"));
    }
    assert!(
        slow.iter_mut().all(|s| !closed(s)),
        "slow clients were dropped"
    );

    // Fill the cap: a new request waits, not refused, and is served once a
    // slot frees.
    slow.extend((0..10).map(|_| TcpStream::connect(&addr).unwrap()));
    assert!(wait_until(Duration::from_secs(10), || tl
        .stderr()
        .contains("HTTP connection cap reached")));
    let mut waiting = TcpStream::connect(&addr).unwrap();
    waiting
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut buf = [0u8; 256];
    assert!(
        waiting.read(&mut buf).is_err(),
        "answered beyond `max_connections`"
    );
    slow.truncate(100);
    waiting
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = String::new();
    waiting.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
