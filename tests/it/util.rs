//! Shared helpers of the integration tests: a throwaway `redis-server` per
//! test, the real `tripline` binary in a temp directory, and polling.

#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use redis::Value;

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it is true or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// A `redis-server` on a free port, without persistence unless asked, in its
/// own directory; killed on drop.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    persistent: bool,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(false)
    }

    /// With `appendonly yes` and `appendfsync always`, so a restart keeps
    /// every stream entry (for tests that kill Redis mid-stream).
    pub fn start_persistent() -> RedisServer {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> RedisServer {
        let mut s = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            persistent,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--save")
            .arg("");
        if self.persistent {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (.ci/run installs it)");
        self.child = Some(child);
        let url = self.url();
        assert!(
            wait_until(Duration::from_secs(10), || {
                redis::Client::open(url.as_str())
                    .and_then(|c| c.get_connection())
                    .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                    .is_ok()
            }),
            "redis-server did not come up on port {}",
            self.port
        );
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The seed's `REDIS_ADDR` form.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url().as_str())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills Redis and starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs one command and returns its reply.
pub fn q(con: &mut redis::Connection, args: &[&str]) -> Value {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(con).unwrap()
}

/// XADD with the given field/value pairs; returns the id.
pub fn xadd(con: &mut redis::Connection, stream: &str, fields: &[(&str, &[u8])]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query(con).unwrap()
}

/// A message in Watermill's envelope, as the seed's Go publishers write it.
pub fn xadd_watermill(con: &mut redis::Connection, stream: &str, json: &str) -> String {
    let meta = tripline::decode::encode_metadata(&[("source", "test")]);
    let uuid = uuid_like();
    xadd(
        con,
        stream,
        &[
            ("_watermill_message_uuid", uuid.as_bytes()),
            ("metadata", &meta),
            ("payload", json.as_bytes()),
        ],
    )
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "00000000-0000-4000-8000-{:012}",
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// (pending, lag) of `group` on `stream`, from XINFO GROUPS.
pub fn group_position(con: &mut redis::Connection, stream: &str, group: &str) -> (i64, i64) {
    let v: Vec<std::collections::HashMap<String, Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query(con)
        .unwrap();
    let g = v
        .into_iter()
        .find(|g| g.get("name") == Some(&Value::BulkString(group.as_bytes().to_vec())))
        .unwrap_or_else(|| panic!("group {group} missing on {stream}"));
    let int = |k: &str| match g.get(k) {
        Some(Value::Int(i)) => *i,
        other => panic!("{k}: {other:?}"),
    };
    (int("pending"), int("lag"))
}

/// Entries of a stream as (id, field → value).
pub fn xrange(
    con: &mut redis::Connection,
    stream: &str,
) -> Vec<(String, std::collections::HashMap<String, String>)> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query(con)
        .unwrap();
    reply
        .ids
        .into_iter()
        .map(|e| {
            let map = e
                .map
                .into_iter()
                .map(|(k, v)| {
                    let s = match v {
                        Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                        other => format!("{other:?}"),
                    };
                    (k, s)
                })
                .collect();
            (e.id, map)
        })
        .collect()
}

/// Ids pending in `group` on `stream`.
pub fn pending_ids(con: &mut redis::Connection, stream: &str, group: &str) -> Vec<String> {
    let v: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(1_000_000)
        .query(con)
        .unwrap();
    let Value::Array(rows) = v else { return vec![] };
    rows.into_iter()
        .filter_map(|r| match r {
            Value::Array(mut p) if !p.is_empty() => match p.swap_remove(0) {
                Value::BulkString(b) => Some(String::from_utf8(b).unwrap()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// A project directory for one tripline process: config, rules, plugins.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    /// `config` is the YAML of tripline.yaml; `files` are (relative path,
    /// content) pairs such as ("rules/a.rhai", "...").
    pub fn new(config: &str, files: &[(&str, &str)]) -> Project {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tripline.yaml"), config).unwrap();
        std::fs::create_dir_all(dir.path().join("rules")).unwrap();
        std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
        for (p, text) in files {
            let path = dir.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        Project { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// Lines of a JSON-lines file written by a file sink (empty if absent).
    pub fn json_lines(&self, rel: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path(rel))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Starts `tripline run` against `redis`.
    pub fn start(&self, redis: &RedisServer) -> Tripline {
        self.start_with_args(redis, &["run"])
    }

    pub fn start_with_args(&self, redis: &RedisServer, args: &[&str]) -> Tripline {
        Tripline::spawn(self.dir.path(), &redis.addr(), args, &[])
    }

    /// Like `start_with_args`, with extra environment variables (applied
    /// last, so `RUST_LOG` here wins).
    pub fn start_with_env(
        &self,
        redis: &RedisServer,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Tripline {
        Tripline::spawn(self.dir.path(), &redis.addr(), args, env)
    }

    /// Runs a tripline command to completion: (exit code, stdout, stderr).
    pub fn command(&self, args: &[&str], redis_addr: Option<&str>) -> (i32, String, String) {
        let mut cmd = Command::new(bin());
        cmd.current_dir(self.dir.path()).args(args);
        match redis_addr {
            Some(a) => cmd.env("REDIS_ADDR", a),
            None => cmd.env_remove("REDIS_ADDR"),
        };
        let out = cmd.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tripline")
}

/// A running `tripline` process; killed on drop.
pub struct Tripline {
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Tripline {
    fn spawn(dir: &Path, redis_addr: &str, args: &[&str], env: &[(&str, &str)]) -> Tripline {
        let n = free_port();
        let stdout = dir.join(format!("stdout-{n}.log"));
        let stderr = dir.join(format!("stderr-{n}.log"));
        let child = Command::new(bin())
            .current_dir(dir)
            .args(args)
            .env("REDIS_ADDR", redis_addr)
            .env(
                "RUST_LOG",
                std::env::var("TRIPLINE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Tripline {
            child: Some(child),
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for exit; returns the exit code (None if still running after
    /// `timeout`).
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn read(path: &Path) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn stdout(&self) -> String {
        Self::read(&self.stdout)
    }

    pub fn stderr(&self) -> String {
        Self::read(&self.stderr)
    }
}

impl Drop for Tripline {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A tripline.yaml for tests: HTTP off, fast claims, a unique instance name.
pub fn config(subscriptions: &str) -> String {
    format!(
        "instance: test-{}\nhttp:\n  enabled: false\nshutdown_timeout: 10s\nsubscriptions:\n{subscriptions}",
        free_port()
    )
}

/// A shipped file of the repository (rules, plugins), read at test time so
/// tests exercise what users get.
pub fn shipped(rel: &str) -> String {
    std::fs::read_to_string(format!("{}/{rel}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The seed's two groups on `packet-counter-errors`, over the shipped rules.
pub const SEED_SUBS: &str = "  - name: packet-error-alerts
    streams: [packet-counter-errors]
    rules: [\"packet_errors/alert*.rhai\"]
  - name: packet-error-logs
    streams: [packet-counter-errors]
    rules: [\"packet_errors/log*.rhai\"]
";

/// A file sink manifest writing to `alerts.jsonl` in the project.
pub const FILE_SINK: &str = "name: file\nkind: file\npath: alerts.jsonl\n";

/// An HTTP response read by [`http_call`].
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }
}

/// One blocking HTTP/1.1 request over a fresh connection (`Connection:
/// close`). `Err` when nothing listens at `addr` or the connection breaks.
pub fn http_call(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpReply> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    // A server may answer (413, 401) and close before reading all of a big
    // body; the answer is still readable.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers in the response"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(HttpReply {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> std::io::Result<Vec<u8>> {
    let bad = || std::io::Error::other("bad chunked encoding");
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n").ok_or_else(bad)?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad())?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err(bad());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// One blocking HTTP/1.1 request to `addr` (`host:port`); returns the status
/// code and the body. `Connection: close`, so the body is what follows the
/// headers until the server hangs up.
pub fn http_request(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, rest) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {raw}"));
    let chunked = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    let body = if chunked {
        unchunk(rest)
    } else {
        rest.to_string()
    };
    (status, body)
}

/// Decodes a `Transfer-Encoding: chunked` body.
fn unchunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        body.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    body
}
