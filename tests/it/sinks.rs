//! Sinks against real receivers: HTTP servers in the test, a real
//! Alertmanager, Redis streams, the shipped exec example. One shared
//! compliance check runs every kind; then the behaviours the issue asks for
//! (retries until a receiver is back, routing, a crash of tripline, plugin
//! reloads, killing an exec program mid-stream).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::util::*;

/// One alert per message: label `n` (plus `site`/`hostname` when given),
/// severity from the message (default critical); a `resolve` field resolves.
const RULE: &str = r#"
fn on_message(msg, ctx) {
    let a = #{ name: "TestAlert", labels: #{ n: `${msg.n}` }, summary: `test alert ${msg.n}` };
    if "site" in msg { a.labels.site = msg.site; }
    if "hostname" in msg { a.labels.hostname = msg.hostname; }
    a.severity = if "severity" in msg { msg.severity } else { "critical" };
    if "resolve" in msg { resolve(a); } else { alert(a); }
}
"#;

const STREAM: &str = "events";
const OUTBOX: &str = "tripline:alerts:{events}";

fn dead_key(sink: &str) -> String {
    format!("{OUTBOX}:dead:{sink}")
}

fn group(sink: &str) -> String {
    format!("tripline-sink:{sink}")
}

/// tripline.yaml reading `events`; HTTP on `http_port` when given.
fn sink_config(http_port: Option<u16>) -> String {
    let http = match http_port {
        Some(p) => format!("http:\n  listen: 127.0.0.1:{p}\n"),
        None => "http:\n  enabled: false\n".to_string(),
    };
    format!(
        "instance: test-{}\n{http}shutdown_timeout: 10s\nsubscriptions:\n  - name: events\n    streams: [{STREAM}]\n",
        free_port()
    )
}

/// A project with the test rule and the given plugin files.
fn sink_project(http_port: Option<u16>, plugins: &[(&str, String)]) -> Project {
    let mut files: Vec<(String, String)> = vec![("rules/every.rhai".into(), RULE.into())];
    for (name, text) in plugins {
        files.push((format!("plugins/{name}"), text.clone()));
    }
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
    Project::new(&sink_config(http_port), &refs)
}

/// Starts tripline with JSON logs, so tests can read log events reliably.
fn start(project: &Project, redis: &RedisServer) -> Tripline {
    project.start_with_args(redis, &["--log-format", "json", "run"])
}

/// Log events (JSON lines) whose message starts with `message` and whose
/// `sink` field is `sink`.
fn events(tl: &Tripline, message: &str, sink: &str) -> usize {
    tl.stderr()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| {
            e["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
                && e["fields"]["sink"] == sink
        })
        .count()
}

/// True once a reload log line mentions `detail` (e.g. "changed b").
fn reloaded(tl: &Tripline, detail: &str) -> bool {
    tl.stderr().lines().any(|l| {
        serde_json::from_str::<serde_json::Value>(l).is_ok_and(|e| {
            e["fields"]["kind"] == "plugins"
                && e["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("plugins reloaded") && m.contains(detail))
        })
    })
}

/// XADDs message `n` with extra flat fields.
fn send(con: &mut redis::Connection, n: u32, extra: &[(&str, &str)]) {
    let n = n.to_string();
    let mut fields: Vec<(&str, &[u8])> = vec![("n", n.as_bytes())];
    for (k, v) in extra {
        fields.push((k, v.as_bytes()));
    }
    xadd(con, STREAM, &fields);
}

/// Numbers following `pat` in `text` (`{n=3}` → 3 with pat `{n=`).
fn numbers_after(text: &str, pat: &str) -> BTreeSet<u32> {
    text.match_indices(pat)
        .filter_map(|(i, _)| {
            let digits: String = text[i + pat.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect()
}

/// `labels.n` of every alert-shaped JSON value.
fn label_ns<'a>(alerts: impl IntoIterator<Item = &'a serde_json::Value>) -> BTreeSet<u32> {
    alerts
        .into_iter()
        .filter_map(|a| a["labels"]["n"].as_str()?.parse().ok())
        .collect()
}

fn range(n: u32) -> BTreeSet<u32> {
    (0..n).collect()
}

/// (status, body) of an HTTP/1.0 request to 127.0.0.1:`port`.
fn http(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// The value of `name{sink="<sink>"}` on tripline's /metrics.
fn metric(port: u16, name: &str, sink: &str) -> Option<f64> {
    let (_, body) = http(port, "GET", "/metrics")?;
    let prefix = format!("{name}{{sink=\"{sink}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
}

// ---------------------------------------------------------------------------
// A real HTTP server the tests control.

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// 200, and the request is recorded.
    Ok,
    /// This status, nothing recorded.
    Status(u16),
    /// Accepts and reads, never answers.
    Hang,
}

/// One request the receiver accepted with 200.
#[derive(Debug, Clone)]
struct Request {
    path: String,
    /// Header names in lower case.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

struct ReceiverState {
    mode: Mutex<Mode>,
    received: Mutex<Vec<Request>>,
    /// Every request read, whatever the answer.
    attempts: AtomicUsize,
    /// Ends the accept loop and any hanging connection.
    stop: AtomicBool,
}

/// An HTTP/1.1 server on a fixed port that can go down and come back.
struct Receiver {
    port: u16,
    state: Arc<ReceiverState>,
    accept: Option<JoinHandle<()>>,
}

impl Receiver {
    fn start(mode: Mode) -> Receiver {
        let mut r = Receiver {
            port: free_port(),
            state: Arc::new(ReceiverState {
                mode: Mutex::new(mode),
                received: Mutex::new(Vec::new()),
                attempts: AtomicUsize::new(0),
                stop: AtomicBool::new(false),
            }),
            accept: None,
        };
        r.up();
        r
    }

    /// A receiver whose port is reserved but closed (connection refused).
    fn down_from_start() -> Receiver {
        let mut r = Receiver::start(Mode::Ok);
        r.down();
        r
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn up(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        self.state.stop.store(false, Ordering::SeqCst);
        let state = self.state.clone();
        self.accept = Some(std::thread::spawn(move || {
            while !state.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let state = state.clone();
                        std::thread::spawn(move || serve(s, &state));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => return,
                }
            }
        }));
    }

    /// Closes the port: new connections are refused.
    fn down(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            t.join().unwrap();
        }
    }

    fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    fn attempts(&self) -> usize {
        self.state.attempts.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<Request> {
        self.state.received.lock().unwrap().clone()
    }

    fn bodies(&self) -> Vec<serde_json::Value> {
        self.requests()
            .iter()
            .map(|r| serde_json::from_slice(&r.body).unwrap())
            .collect()
    }

    /// `labels.n` of every alert in webhook (v4) bodies.
    fn webhook_ns(&self) -> BTreeSet<u32> {
        let bodies = self.bodies();
        label_ns(bodies.iter().flat_map(|b| b["alerts"].as_array().unwrap()))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.down();
    }
}

fn serve(mut s: TcpStream, state: &ReceiverState) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    // Headers, then Content-Length bytes of body.
    let (head_end, length) = loop {
        if state.stop.load(Ordering::SeqCst) {
            return;
        }
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (i + 4, len);
        }
        match s.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) => continue,
            Err(_) => return,
        }
    };
    while buf.len() < head_end + length {
        if state.stop.load(Ordering::SeqCst) {
            return;
        }
        match s.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) => continue,
            Err(_) => return,
        }
    }
    state.attempts.fetch_add(1, Ordering::SeqCst);
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let path = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
        .to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    let mode = *state.mode.lock().unwrap();
    let status = match mode {
        Mode::Ok => {
            state.received.lock().unwrap().push(Request {
                path,
                headers,
                body: buf[head_end..head_end + length].to_vec(),
            });
            200
        }
        Mode::Status(code) => code,
        Mode::Hang => {
            while !state.stop.load(Ordering::SeqCst) && *state.mode.lock().unwrap() == Mode::Hang {
                std::thread::sleep(Duration::from_millis(20));
            }
            return;
        }
    };
    let body = if status == 200 { "ok" } else { "nope" };
    let _ = write!(
        s,
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

// ---------------------------------------------------------------------------
// The compliance check every kind passes.

/// Destinations of one kind for the compliance check: kind settings (YAML
/// lines) of a receiver that works, one that fails every delivery, and one
/// that never answers. A kind that cannot fail or hang says `None`.
struct Case {
    kind: &'static str,
    ok: String,
    failing: Option<String>,
    hanging: Option<String>,
}

const SENT: u32 = 5;

/// Runs `case` through a real tripline: the working sink gets every alert
/// exactly once and its metrics say so; the failing one retries, counts
/// the failures and dead-letters the alerts; the hanging one is cut off by
/// its `timeout` and dead-letters them too. `received` reads what the
/// working receiver got (`labels.n` of each alert).
fn compliance(
    case: Case,
    prepare: impl FnOnce(&Project),
    received: impl Fn(&Project, &Tripline, &mut redis::Connection) -> BTreeSet<u32>,
) {
    let kind = case.kind;
    let ok_name = format!("{kind}-ok");
    let failing_name = format!("{kind}-failing");
    let hanging_name = format!("{kind}-hanging");
    let mut plugins = vec![(
        "ok.yaml",
        format!("name: {ok_name}\nkind: {kind}\n{}\n", case.ok),
    )];
    if let Some(s) = &case.failing {
        plugins.push((
            "failing.yaml",
            format!("name: {failing_name}\nkind: {kind}\nmax_attempts: 2\n{s}\n"),
        ));
    }
    if let Some(s) = &case.hanging {
        plugins.push((
            "hanging.yaml",
            format!("name: {hanging_name}\nkind: {kind}\nmax_attempts: 2\ntimeout: 500ms\n{s}\n"),
        ));
    }
    let redis = RedisServer::start();
    let port = free_port();
    let project = sink_project(Some(port), &plugins);
    prepare(&project);
    let mut con = redis.conn();
    let tl = start(&project, &redis);
    for n in 0..SENT {
        send(&mut con, n, &[]);
    }

    assert!(
        wait_until(Duration::from_secs(30), || received(
            &project, &tl, &mut con
        ) == range(SENT)),
        "{kind}: the working sink got {:?}; stderr:\n{}",
        received(&project, &tl, &mut con),
        tl.stderr()
    );
    assert!(
        wait_until(Duration::from_secs(15), || metric(
            port,
            "tripline_sink_deliveries_total",
            &ok_name
        ) == Some(f64::from(SENT))),
        "{kind}: deliveries metric {:?}",
        metric(port, "tripline_sink_deliveries_total", &ok_name)
    );
    assert!(
        wait_until(Duration::from_secs(15), || metric(
            port,
            "tripline_sink_lag",
            &ok_name
        ) == Some(0.0)),
        "{kind}: lag metric {:?}",
        metric(port, "tripline_sink_lag", &ok_name)
    );
    assert_eq!(
        metric(port, "tripline_sink_failures_total", &ok_name).unwrap_or(0.0),
        0.0,
        "{kind}: the working sink counted failures"
    );

    for (name, expect_timeout) in [(&failing_name, false), (&hanging_name, true)] {
        let present = if expect_timeout {
            case.hanging.is_some()
        } else {
            case.failing.is_some()
        };
        if !present {
            continue;
        }
        assert!(
            wait_until(Duration::from_secs(30), || xrange(
                &mut con,
                &dead_key(name)
            )
            .len()
                == SENT as usize),
            "{name}: dead-letter stream has {:?}; stderr:\n{}",
            xrange(&mut con, &dead_key(name)),
            tl.stderr()
        );
        let dead = xrange(&mut con, &dead_key(name));
        let alerts: Vec<serde_json::Value> = dead
            .iter()
            .map(|(_, f)| serde_json::from_str(&f["alert"]).unwrap())
            .collect();
        assert_eq!(label_ns(&alerts), range(SENT), "{name}");
        for (_, f) in &dead {
            let reason = &f["reason"];
            assert_eq!(
                reason.contains("timed out after 500ms"),
                expect_timeout,
                "{name}: reason `{reason}`"
            );
        }
        assert!(
            wait_until(Duration::from_secs(15), || metric(
                port,
                "tripline_sink_dead_letters_total",
                name
            ) == Some(f64::from(SENT))),
            "{name}: dead-letter metric {:?}",
            metric(port, "tripline_sink_dead_letters_total", name)
        );
        // Two attempts per batch, both failed; one of them was retried.
        let failures = metric(port, "tripline_sink_failures_total", name).unwrap_or(0.0);
        let retries = metric(port, "tripline_sink_retries_total", name).unwrap_or(0.0);
        assert!(
            failures >= 2.0 && retries >= 1.0,
            "{name}: {failures} failures, {retries} retries"
        );
        // Counters exist from the sink's start, at 0 until something happens.
        assert_eq!(
            metric(port, "tripline_sink_deliveries_total", name),
            Some(0.0)
        );
        // Everything settled: nothing left queued for it.
        assert!(wait_until(Duration::from_secs(15), || group_position(
            &mut con,
            OUTBOX,
            &group(name)
        ) == (0, 0)));
    }
}

#[test]
fn compliance_console() {
    // Standard output neither fails nor hangs under a test.
    compliance(
        Case {
            kind: "console",
            ok: String::new(),
            failing: None,
            hanging: None,
        },
        |_| {},
        |_, tl, _| numbers_after(&tl.stdout(), "{n="),
    );
}

#[test]
fn compliance_file() {
    compliance(
        Case {
            kind: "file",
            ok: "path: ../out/alerts.jsonl".into(),
            // A parent "directory" that is a regular file.
            failing: Some("path: ../blocker/alerts.jsonl".into()),
            // Opening a FIFO nobody reads blocks forever.
            hanging: Some("path: ../hang.fifo".into()),
        },
        |p| {
            std::fs::write(p.path("blocker"), "not a directory").unwrap();
            let made = Command::new("mkfifo")
                .arg(p.path("hang.fifo"))
                .status()
                .unwrap();
            assert!(made.success());
        },
        |p, _, _| label_ns(&p.json_lines("out/alerts.jsonl")),
    );
}

#[test]
fn compliance_webhook() {
    let ok = Receiver::start(Mode::Ok);
    let failing = Receiver::start(Mode::Status(503));
    let hanging = Receiver::start(Mode::Hang);
    compliance(
        Case {
            kind: "webhook",
            ok: format!("url: {}", ok.url("/hook")),
            failing: Some(format!("url: {}", failing.url("/hook"))),
            hanging: Some(format!("url: {}", hanging.url("/hook"))),
        },
        |_| {},
        |_, _, _| ok.webhook_ns(),
    );
}

#[test]
fn compliance_slack() {
    let ok = Receiver::start(Mode::Ok);
    let failing = Receiver::start(Mode::Status(500));
    let hanging = Receiver::start(Mode::Hang);
    compliance(
        Case {
            kind: "slack",
            ok: format!("url: {}", ok.url("/services/T0/B0/x")),
            failing: Some(format!("url: {}", failing.url("/services/T0/B0/x"))),
            hanging: Some(format!("url: {}", hanging.url("/services/T0/B0/x"))),
        },
        |_| {},
        |_, _, _| {
            ok.bodies()
                .iter()
                .flat_map(|b| numbers_after(b["text"].as_str().unwrap(), "(n="))
                .collect()
        },
    );
}

#[test]
fn compliance_alertmanager() {
    let ok = Receiver::start(Mode::Ok);
    let failing = Receiver::start(Mode::Status(500));
    let hanging = Receiver::start(Mode::Hang);
    compliance(
        Case {
            kind: "alertmanager",
            ok: format!("url: {}", ok.url("")),
            failing: Some(format!("url: {}", failing.url(""))),
            hanging: Some(format!("url: {}", hanging.url(""))),
        },
        |_| {},
        |_, _, _| {
            let requests = ok.requests();
            assert!(requests.iter().all(|r| r.path == "/api/v2/alerts"));
            let bodies: Vec<serde_json::Value> = requests
                .iter()
                .map(|r| serde_json::from_slice(&r.body).unwrap())
                .collect();
            label_ns(bodies.iter().flat_map(|b| b.as_array().unwrap()))
        },
    );
}

#[test]
fn compliance_redis_stream() {
    let refused = free_port();
    let silent = Receiver::start(Mode::Hang);
    compliance(
        Case {
            kind: "redis_stream",
            ok: "stream: delivered\nformat: watermill".into(),
            failing: Some(format!("stream: x\nurl: 127.0.0.1:{refused}")),
            hanging: Some(format!("stream: x\nurl: 127.0.0.1:{}", silent.port)),
        },
        |_| {},
        |_, _, con| {
            let entries = xrange(con, "delivered");
            let payloads: Vec<serde_json::Value> = entries
                .iter()
                .map(|(_, f)| serde_json::from_str(&f["payload"]).unwrap())
                .collect();
            label_ns(&payloads)
        },
    );
}

#[test]
fn compliance_exec() {
    compliance(
        Case {
            kind: "exec",
            ok: "command: ./exec-example.py\nargs: [../exec-out.txt]".into(),
            failing: Some(
                "command: sh\nargs: [-c, 'while read l; do echo \"error: refused\"; done']".into(),
            ),
            hanging: Some("command: sh\nargs: [-c, 'cat > /dev/null']".into()),
        },
        install_exec_example,
        |p, _, _| {
            numbers_after(
                &std::fs::read_to_string(p.path("exec-out.txt")).unwrap_or_default(),
                "{n=",
            )
        },
    );
}

/// Copies the shipped exec example (executable) into the project.
fn install_exec_example(p: &Project) {
    let shipped = format!("{}/plugins/exec-example.py", env!("CARGO_MANIFEST_DIR"));
    let dest = p.path("plugins/exec-example.py");
    std::fs::copy(shipped, &dest).unwrap();
}

// ---------------------------------------------------------------------------
// Behaviours.

#[test]
fn webhook_retries_through_500s_and_an_outage_until_everything_arrives() {
    let mut hook = Receiver::start(Mode::Status(500));
    let port = free_port();
    let project = sink_project(
        Some(port),
        &[(
            "hook.yaml",
            format!(
                "name: hook\nkind: webhook\nmax_attempts: 100\nurl: {}\n",
                hook.url("/alerts")
            ),
        )],
    );
    let redis = RedisServer::start();
    let mut con = redis.conn();
    let tl = start(&project, &redis);
    for n in 0..3 {
        send(&mut con, n, &[]);
    }
    // Answers 500 a few times, then goes down entirely.
    assert!(
        wait_until(Duration::from_secs(30), || hook.attempts() >= 3),
        "{}",
        tl.stderr()
    );
    hook.down();
    for n in 3..6 {
        send(&mut con, n, &[]);
    }
    // While it is down, every alert is queued for it, and the gauge says so.
    assert!(
        wait_until(Duration::from_secs(20), || metric(
            port,
            "tripline_sink_lag",
            "hook"
        ) == Some(6.0)),
        "lag {:?}",
        metric(port, "tripline_sink_lag", "hook")
    );
    assert!(metric(port, "tripline_sink_failures_total", "hook").unwrap() >= 3.0);
    assert!(hook.requests().is_empty());
    hook.set_mode(Mode::Ok);
    hook.up();
    assert!(
        wait_until(Duration::from_secs(60), || hook.webhook_ns() == range(6)),
        "got {:?}; stderr:\n{}",
        hook.webhook_ns(),
        tl.stderr()
    );
    assert!(wait_until(Duration::from_secs(15), || metric(
        port,
        "tripline_sink_lag",
        "hook"
    ) == Some(0.0)));
    assert!(xrange(&mut con, &dead_key("hook")).is_empty());
}

#[test]
fn webhook_sends_alertmanager_v4_json_with_secret_headers_never_logged() {
    let mut hook = Receiver::start(Mode::Status(502));
    let secret = "s3cr3t-t0ken-in-url-and-header";
    let project = sink_project(
        None,
        &[(
            "hook.yaml",
            format!(
                "name: hook\nkind: webhook\nmax_attempts: 100\nurl: http://127.0.0.1:{}/hook/${{HOOK_SECRET}}\nheaders:\n  Authorization: \"Bearer ${{HOOK_SECRET}}\"\nexternal_url: https://dash.example/d/x\n",
                hook.port
            ),
        )],
    );
    let redis = RedisServer::start();
    let mut con = redis.conn();
    let tl = project.start_with_env(
        &redis,
        &["--log-format", "json", "run"],
        &[("HOOK_SECRET", secret), ("RUST_LOG", "debug")],
    );
    send(
        &mut con,
        0,
        &[("severity", "major"), ("hostname", "core-1")],
    );
    // Failures get logged; then the receiver goes down: connection errors too.
    assert!(wait_until(Duration::from_secs(30), || hook.attempts() >= 2));
    hook.down();
    assert!(wait_until(Duration::from_secs(30), || {
        tl.stderr().contains("delivery failed") && tl.stderr().contains("onnect")
    }));
    hook.set_mode(Mode::Ok);
    hook.up();
    assert!(wait_until(Duration::from_secs(60), || !hook
        .requests()
        .is_empty()));
    send(&mut con, 0, &[("resolve", "1"), ("hostname", "core-1")]);
    assert!(
        wait_until(Duration::from_secs(30), || hook.requests().len() >= 2),
        "{}",
        tl.stderr()
    );
    let requests = hook.requests();
    assert_eq!(requests[0].path, format!("/hook/{secret}"));
    assert!(
        requests[0]
            .headers
            .contains(&("authorization".into(), format!("Bearer {secret}")))
    );
    assert!(
        requests[0]
            .headers
            .contains(&("content-type".into(), "application/json".into()))
    );
    let firing: serde_json::Value = serde_json::from_slice(&requests[0].body).unwrap();
    assert_eq!(firing["version"], "4");
    assert_eq!(firing["status"], "firing");
    assert_eq!(firing["receiver"], "hook");
    assert_eq!(firing["groupKey"], "{}:{alertname=\"TestAlert\"}");
    assert_eq!(firing["truncatedAlerts"], 0);
    assert_eq!(firing["externalURL"], "https://dash.example/d/x");
    assert_eq!(
        firing["groupLabels"],
        serde_json::json!({"alertname": "TestAlert"})
    );
    assert_eq!(firing["commonLabels"]["hostname"], "core-1");
    assert_eq!(firing["commonAnnotations"]["summary"], "test alert 0");
    let a = &firing["alerts"][0];
    assert_eq!(a["status"], "firing");
    assert_eq!(
        a["labels"],
        serde_json::json!({"alertname": "TestAlert", "severity": "major", "n": "0", "hostname": "core-1"})
    );
    assert_eq!(a["endsAt"], "0001-01-01T00:00:00Z");
    assert_eq!(a["generatorURL"], "https://dash.example/d/x");
    assert!(a["startsAt"].as_str().unwrap().starts_with("20"));
    assert_eq!(a["fingerprint"].as_str().unwrap().len(), 16);
    let resolved: serde_json::Value =
        serde_json::from_slice(&requests.last().unwrap().body).unwrap();
    let r = &resolved["alerts"][0];
    assert_eq!(resolved["status"], "resolved");
    assert_eq!(r["status"], "resolved");
    assert_eq!(r["fingerprint"], a["fingerprint"]);
    assert_eq!(r["startsAt"], a["startsAt"]);
    assert_ne!(r["endsAt"], "0001-01-01T00:00:00Z");
    assert!(
        !tl.stderr().contains(secret),
        "the secret leaked into the log:\n{}",
        tl.stderr()
    );
    drop(con);
}

#[test]
fn webhook_4xx_is_dead_lettered_without_retries() {
    let hook = Receiver::start(Mode::Status(400));
    let port = free_port();
    let project = sink_project(
        Some(port),
        &[(
            "hook.yaml",
            format!(
                "name: hook\nkind: webhook\nmax_attempts: 50\nurl: {}\n",
                hook.url("/")
            ),
        )],
    );
    let redis = RedisServer::start();
    let mut con = redis.conn();
    let tl = start(&project, &redis);
    send(&mut con, 0, &[]);
    assert!(
        wait_until(Duration::from_secs(30), || xrange(
            &mut con,
            &dead_key("hook")
        )
        .len()
            == 1),
        "{}",
        tl.stderr()
    );
    assert!(xrange(&mut con, &dead_key("hook"))[0].1["reason"].contains("400"));
    assert_eq!(hook.attempts(), 1);
    assert_eq!(
        metric(port, "tripline_sink_retries_total", "hook"),
        Some(0.0)
    );
}

/// A real `prometheus-alertmanager` on a free port, killed on drop.
struct Alertmanager {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Alertmanager {
    fn start() -> Alertmanager {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("alertmanager.yml");
        std::fs::write(
            &config,
            "route:\n  receiver: blackhole\nreceivers:\n  - name: blackhole\n",
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus-alertmanager must be installed (scripts/test installs it)");
        let am = Alertmanager {
            port,
            child,
            _dir: dir,
        };
        assert!(
            wait_until(Duration::from_secs(30), || http(am.port, "GET", "/-/ready")
                .is_some_and(|(s, _)| s == 200)),
            "alertmanager did not become ready"
        );
        am
    }

    /// Alerts Alertmanager considers current (resolved ones are left out).
    fn alerts(&self) -> Vec<serde_json::Value> {
        http(self.port, "GET", "/api/v2/alerts")
            .and_then(|(_, body)| serde_json::from_str(&body).ok())
            .unwrap_or_default()
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn alertmanager_receives_firing_alert_and_resolves_it() {
    let am = Alertmanager::start();
    let project = sink_project(
        None,
        &[(
            "am.yaml",
            format!(
                "name: am\nkind: alertmanager\nurl: http://127.0.0.1:{}\n",
                am.port
            ),
        )],
    );
    let redis = RedisServer::start();
    let mut con = redis.conn();
    let tl = start(&project, &redis);
    send(&mut con, 7, &[("hostname", "core-1")]);
    send(&mut con, 8, &[("hostname", "core-2")]);
    let has = |n: &str| {
        am.alerts()
            .iter()
            .any(|a| a["labels"]["n"] == n && a["labels"]["alertname"] == "TestAlert")
    };
    assert!(
        wait_until(Duration::from_secs(30), || has("7") && has("8")),
        "alerts: {:?}; stderr:\n{}",
        am.alerts(),
        tl.stderr()
    );
    let a = am
        .alerts()
        .into_iter()
        .find(|a| a["labels"]["n"] == "7")
        .unwrap();
    assert_eq!(a["status"]["state"], "active");
    assert_eq!(a["labels"]["severity"], "critical");
    assert_eq!(a["labels"]["hostname"], "core-1");
    assert_eq!(a["annotations"]["summary"], "test alert 7");
    // Resolving #7 makes it disappear from Alertmanager's current alerts
    // (without a resolve it would stay for its 5 min resolve_timeout); #8
    // keeps firing.
    send(&mut con, 7, &[("hostname", "core-1"), ("resolve", "1")]);
    assert!(
        wait_until(Duration::from_secs(30), || !has("7")),
        "alert 7 still active: {:?}",
        am.alerts()
    );
    assert!(has("8"));
}

#[test]
fn exec_example_gets_every_alert_even_when_killed_mid_stream() {
    const TOTAL: u32 = 300;
    let project = sink_project(
        None,
        &[(
            "exec.yaml",
            "name: script\nkind: exec\ncommand: ./exec-example.py\nargs: [../exec-out.txt]\nbatch_size: 20\n".into(),
        )],
    );
    install_exec_example(&project);
    let redis = RedisServer::start();
    let tl = start(&project, &redis);
    let received = || {
        numbers_after(
            &std::fs::read_to_string(project.path("exec-out.txt")).unwrap_or_default(),
            "{n=",
        )
    };
    let producer = {
        let url = redis.url();
        std::thread::spawn(move || {
            let mut con = redis::Client::open(url.as_str())
                .unwrap()
                .get_connection()
                .unwrap();
            for n in 0..TOTAL {
                send(&mut con, n, &[]);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    // Kill the program three times while alerts keep coming.
    let mut killed = Vec::new();
    for round in 1..=3u32 {
        assert!(
            wait_until(Duration::from_secs(30), || received().len()
                >= (round * TOTAL / 5) as usize),
            "round {round}: got {}; stderr:\n{}",
            received().len(),
            tl.stderr()
        );
        let pid = children(tl.pid())
            .into_iter()
            .find(|p| !killed.contains(p))
            .expect("the exec program runs as tripline's child");
        let status = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        killed.push(pid);
    }
    producer.join().unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || received() == range(TOTAL)),
        "missing {:?}; stderr:\n{}",
        range(TOTAL).difference(&received()).collect::<Vec<_>>(),
        tl.stderr()
    );
    assert!(events(&tl, "exec program exited", "script") >= 3);
    // The program's stderr lines land in tripline's log.
    assert!(
        tl.stderr()
            .contains("notified: FIRING critical TestAlert {n=0}")
    );
}

/// Pids of `pid`'s child processes.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path().join("children");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        out.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    out
}

#[test]
fn critical_alert_reaches_only_the_sinks_whose_route_matches() {
    let sinks = [
        ("all", ""),
        ("critical", "route: {min_severity: critical}"),
        ("ams", "route: {labels: {site: ams1}}"),
        ("core", "route: {label_regex: {hostname: '^core-'}}"),
        (
            "critical-core",
            "route: {min_severity: critical, label_regex: {hostname: '^core-'}}",
        ),
    ];
    let plugins: Vec<(&str, String)> = sinks
        .iter()
        .map(|(name, route)| {
            (
                *name,
                format!("name: {name}\nkind: file\npath: ../{name}.jsonl\n{route}\n"),
            )
        })
        .collect();
    let plugins: Vec<(String, String)> = plugins
        .into_iter()
        .map(|(n, t)| (format!("{n}.yaml"), t))
        .collect();
    let refs: Vec<(&str, String)> = plugins
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let project = sink_project(None, &refs);
    let redis = RedisServer::start();
    let mut con = redis.conn();
    let tl = start(&project, &redis);
    send(
        &mut con,
        0,
        &[
            ("severity", "critical"),
            ("site", "ams1"),
            ("hostname", "edge-1"),
        ],
    );
    send(
        &mut con,
        1,
        &[
            ("severity", "major"),
            ("site", "fra1"),
            ("hostname", "core-7"),
        ],
    );
    send(
        &mut con,
        2,
        &[
            ("severity", "critical"),
            ("site", "fra1"),
            ("hostname", "core-8"),
        ],
    );
    assert!(
        wait_until(Duration::from_secs(30), || label_ns(
            &project.json_lines("all.jsonl")
        ) == range(3)),
        "{}",
        tl.stderr()
    );
    // Every sink has seen (and acknowledged) every alert: what each file
    // holds now is all it will ever get.
    for (name, _) in sinks {
        assert!(
            wait_until(Duration::from_secs(15), || group_position(
                &mut con,
                OUTBOX,
                &group(name)
            ) == (0, 0)),
            "{name} still has alerts queued"
        );
    }
    let got = |name: &str| label_ns(&project.json_lines(&format!("{name}.jsonl")));
    assert_eq!(got("critical"), BTreeSet::from([0, 2]));
    assert_eq!(got("ams"), BTreeSet::from([0]));
    assert_eq!(got("core"), BTreeSet::from([1, 2]));
    assert_eq!(got("critical-core"), BTreeSet::from([2]));
}

#[test]
fn alerts_queued_when_tripline_is_killed_are_delivered_after_restart() {
    const TOTAL: u32 = 20;
    let mut hook = Receiver::down_from_start();
    let project = sink_project(
        None,
        &[(
            "hook.yaml",
            format!(
                "name: hook\nkind: webhook\nmax_attempts: 1000\nbatch_size: 5\nurl: {}\n",
                hook.url("/")
            ),
        )],
    );
    let redis = RedisServer::start();
    let mut con = redis.conn();
    let mut first = start(&project, &redis);
    for n in 0..TOTAL {
        send(&mut con, n, &[]);
    }
    // All alerts are in the outbox; the sink holds a batch it cannot deliver.
    assert!(
        wait_until(Duration::from_secs(30), || {
            xrange(&mut con, OUTBOX).len() == TOTAL as usize
                && group_position(&mut con, OUTBOX, &group("hook")).0 > 0
        }),
        "{}",
        first.stderr()
    );
    first.kill();
    hook.up();
    // Restarted at once, it gets a new instance name (the dead one's lease
    // has not expired), and takes over the dead instance's pending alerts
    // once the lease is gone.
    let second = start(&project, &redis);
    assert!(
        wait_until(Duration::from_secs(90), || hook.webhook_ns()
            == range(TOTAL)),
        "got {:?}; stderr:\n{}",
        hook.webhook_ns(),
        second.stderr()
    );
    assert!(events(&second, "took over alerts left pending", "hook") >= 1);
    assert!(wait_until(Duration::from_secs(15), || group_position(
        &mut con,
        OUTBOX,
        &group("hook")
    ) == (0, 0)));
}

#[test]
fn plugin_reload_starts_reconfigures_and_stops_only_the_changed_sink() {
    let live = Receiver::start(Mode::Ok);
    let dead_port = free_port();
    let file_sink = |name: &str| format!("name: {name}\nkind: file\npath: ../{name}.jsonl\n");
    let project = sink_project(
        None,
        &[
            ("a.yaml", file_sink("a")),
            (
                "b.yaml",
                format!(
                    "name: b\nkind: webhook\nmax_attempts: 1000\nurl: http://127.0.0.1:{dead_port}/\n"
                ),
            ),
        ],
    );
    let redis = RedisServer::start();
    let mut con = redis.conn();
    let tl = start(&project, &redis);
    let got = |name: &str| label_ns(&project.json_lines(&format!("{name}.jsonl")));
    send(&mut con, 0, &[]);
    send(&mut con, 1, &[]);
    assert!(wait_until(Duration::from_secs(30), || got("a") == range(2)));
    assert!(wait_until(Duration::from_secs(15), || tl
        .stderr()
        .contains("delivery failed")));

    // Change b (its receiver moved): the alerts queued for it arrive there.
    project.write(
        "plugins/b.yaml",
        &format!(
            "name: b\nkind: webhook\nmax_attempts: 1000\nurl: {}\n",
            live.url("/")
        ),
    );
    tl.signal("HUP");
    assert!(wait_until(Duration::from_secs(30), || reloaded(
        &tl,
        "changed b"
    )));
    assert!(
        wait_until(Duration::from_secs(30), || live.webhook_ns() == range(2)),
        "{}",
        tl.stderr()
    );

    // Add c: it gets what is raised from now on.
    project.write("plugins/c.yaml", &file_sink("c"));
    tl.signal("HUP");
    assert!(wait_until(Duration::from_secs(30), || reloaded(
        &tl, "added c"
    )));
    send(&mut con, 2, &[]);
    assert!(wait_until(Duration::from_secs(30), || got("c")
        == BTreeSet::from([2])
        && got("a") == range(3)
        && live.webhook_ns() == range(3)));

    // Remove a: it stops; what is raised meanwhile stays queued for it.
    std::fs::remove_file(project.path("plugins/a.yaml")).unwrap();
    tl.signal("HUP");
    assert!(wait_until(Duration::from_secs(30), || reloaded(
        &tl,
        "removed a"
    )));
    send(&mut con, 3, &[]);
    send(&mut con, 4, &[]);
    assert!(wait_until(Duration::from_secs(30), || got("c")
        == BTreeSet::from([2, 3, 4])
        && live.webhook_ns() == range(5)));
    assert_eq!(got("a"), range(3));
    assert_eq!(group_position(&mut con, OUTBOX, &group("a")), (0, 2));

    // Re-adding a resumes where it stopped: nothing queued for it is lost.
    project.write("plugins/a.yaml", &file_sink("a"));
    tl.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(30), || got("a") == range(5)),
        "{}",
        tl.stderr()
    );

    // No reload touched a sink whose file did not change.
    assert_eq!(events(&tl, "sink started", "a"), 2);
    assert_eq!(events(&tl, "sink started", "b"), 2);
    assert_eq!(events(&tl, "sink started", "c"), 1);
    assert_eq!(events(&tl, "sink stopped", "c"), 0);
}

#[test]
fn shipped_plugin_examples_are_valid_once_enabled() {
    let dir = format!("{}/plugins", env!("CARGO_MANIFEST_DIR"));
    let mut plugins = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            plugins.push((
                path.file_name().unwrap().to_str().unwrap().to_string(),
                text.replace("enabled: false", "enabled: true"),
            ));
        }
    }
    let kinds: BTreeSet<String> = plugins
        .iter()
        .filter_map(|(_, t)| {
            t.lines()
                .find_map(|l| l.strip_prefix("kind: "))
                .map(|k| k.trim().to_string())
        })
        .collect();
    let expected: BTreeSet<String> = [
        "console",
        "file",
        "webhook",
        "slack",
        "alertmanager",
        "redis_stream",
        "exec",
    ]
    .iter()
    .map(|k| k.to_string())
    .collect();
    assert_eq!(kinds, expected, "one shipped example per kind");
    let refs: Vec<(&str, String)> = plugins
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let project = sink_project(None, &refs);
    let out = Command::new(bin())
        .current_dir(project.dir.path())
        .arg("check")
        .env("WEBHOOK_TOKEN", "t")
        .env(
            "SLACK_WEBHOOK_URL",
            "https://hooks.slack.com/services/T0/B0/x",
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("(7 enabled)"), "{stdout}");
}

#[test]
fn a_hanging_sink_holds_up_neither_the_engine_nor_the_other_sinks() {
    let hanging = Receiver::start(Mode::Hang);
    let project = sink_project(
        None,
        &[
            (
                "stuck.yaml",
                format!(
                    "name: stuck\nkind: webhook\ntimeout: 1h\nurl: {}\n",
                    hanging.url("/")
                ),
            ),
            ("file.yaml", FILE_SINK.to_string()),
        ],
    );
    let redis = RedisServer::start();
    let mut con = redis.conn();
    let tl = start(&project, &redis);
    for n in 0..50 {
        send(&mut con, n, &[]);
    }
    assert!(
        wait_until(Duration::from_secs(30), || label_ns(
            &project.json_lines("alerts.jsonl")
        ) == range(50)),
        "{}",
        tl.stderr()
    );
    // The engine acknowledged every message, while the stuck sink still
    // holds every alert it was meant to deliver.
    assert!(wait_until(Duration::from_secs(15), || group_position(
        &mut con, STREAM, "events"
    ) == (0, 0)));
    let (pending, lag) = group_position(&mut con, OUTBOX, &group("stuck"));
    assert_eq!(pending + lag, 50);
    assert!(hanging.attempts() >= 1);
}

#[test]
fn sigterm_exits_even_with_a_file_sink_stuck_on_a_fifo() {
    let project = sink_project(
        None,
        &[(
            "stuck.yaml",
            "name: stuck\nkind: file\npath: ../hang.fifo\ntimeout: 300ms\nmax_attempts: 1000\n"
                .into(),
        )],
    );
    let made = Command::new("mkfifo")
        .arg(project.path("hang.fifo"))
        .status()
        .unwrap();
    assert!(made.success());
    let redis = RedisServer::start();
    let mut con = redis.conn();
    let mut tl = start(&project, &redis);
    send(&mut con, 0, &[]);
    assert!(wait_until(Duration::from_secs(30), || tl
        .stderr()
        .contains("timed out after 300ms")));
    tl.signal("TERM");
    assert_eq!(
        tl.wait(Duration::from_secs(60)),
        Some(0),
        "tripline did not exit; stderr:\n{}",
        tl.stderr()
    );
    // The undelivered alert stays queued for the next start.
    assert_eq!(group_position(&mut con, OUTBOX, &group("stuck")).0, 1);
}
