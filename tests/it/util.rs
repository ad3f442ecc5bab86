//! Shared helpers of the integration tests: a throwaway `redis-server` per
//! test, the real `tripline` binary in a temp directory, and polling.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use redis::Value;

/// A port nobody listens on right now, below Linux's ephemeral range
/// (32768-60999).
///
/// A port the kernel hands out for `bind(0)` comes from the ephemeral range,
/// which every outgoing connection of every test draws from too: between
/// picking it and `redis-server` binding it, a client socket could take it,
/// and the server then failed to start ("cluster node did not come up", CI
/// run of session 3). Ports below that range are only ever taken by a
/// listener, and the process-wide counter keeps two tests of this binary
/// from picking the same one; the bind check skips ports other processes
/// hold.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let start = std::process::id() * 97 % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < SPAN, "no free port left below the ephemeral range");
        let port = (LOW + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
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
    /// `requirepass` of the default user, if any; [`RedisServer::url`] and
    /// [`RedisServer::conn`] carry it.
    password: Option<String>,
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

    /// With `requirepass`: every client must AUTH.
    pub fn start_with_password(password: &str) -> RedisServer {
        let mut s = Self::new(false);
        s.password = Some(password.to_string());
        s.spawn();
        s
    }

    fn start_with(persistent: bool) -> RedisServer {
        let mut s = Self::new(persistent);
        s.spawn();
        s
    }

    fn new(persistent: bool) -> RedisServer {
        RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            persistent,
            password: None,
        }
    }

    /// An ACL user allowed everything, with its own password.
    pub fn add_user(&self, user: &str, password: &str) {
        let mut con = self.conn();
        let pass = format!(">{password}");
        q(
            &mut con,
            &["ACL", "SETUSER", user, "on", &pass, "~*", "&*", "+@all"],
        );
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
        if let Some(password) = &self.password {
            cmd.arg("--requirepass").arg(password);
        }
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
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
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

/// Entries of a stream with their fields' raw bytes, for tests that check
/// exactly what was stored.
pub fn xrange_raw(
    con: &mut impl redis::ConnectionLike,
    stream: &str,
) -> Vec<redis::streams::StreamId> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query(con)
        .unwrap();
    reply.ids
}

/// Entries of a stream as (id, field → value), on one server or a cluster.
pub fn xrange(
    con: &mut impl redis::ConnectionLike,
    stream: &str,
) -> Vec<(String, std::collections::HashMap<String, String>)> {
    xrange_raw(con, stream)
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
    /// Only whole lines: the sink may be writing the last one as we read.
    pub fn json_lines(&self, rel: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path(rel))
            .unwrap_or_default()
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n') && !l.trim().is_empty())
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

    /// Waits until `/readyz` on `http` answers 200: Redis reachable, rules
    /// loaded, groups joined.
    pub fn wait_ready(&self, http: &str) {
        assert!(
            wait_until(Duration::from_secs(60), || http_call(
                http,
                "GET",
                "/readyz",
                &[],
                b""
            )
            .is_ok_and(|r| r.status == 200)),
            "/readyz on {http} never answered 200; stderr:\n{}",
            self.stderr()
        );
    }

    /// Waits (20 s at most) until the log holds `text`.
    pub fn wait_for_log(&self, text: &str) {
        assert!(
            wait_until(Duration::from_secs(20), || self.stderr().contains(text)),
            "no `{text}` in stderr:\n{}",
            self.stderr()
        );
    }

    /// Waits until the file watcher runs and HTTP answers on `http`: then a
    /// saved file or a `POST /-/reload` reaches a running engine.
    pub fn wait_watching(&self, http: &str) {
        assert!(
            wait_until(Duration::from_secs(20), || self
                .stderr()
                .contains("watching rules and plugins for changes")
                && std::net::TcpStream::connect(http).is_ok()),
            "tripline did not come up; stderr:\n{}",
            self.stderr()
        );
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

/// A file sink manifest writing to `alerts.jsonl` in the project (its path
/// is relative to the manifest, in `plugins/`).
pub const FILE_SINK: &str = "name: file\nkind: file\npath: ../alerts.jsonl\n";

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

/// One `redis-server` of a [`RedisCluster`].
pub struct ClusterNode {
    /// Client port.
    pub port: u16,
    /// Cluster bus port, chosen free too (the default, port + 10000, may
    /// not exist for a high port).
    bus_port: u16,
    /// Its `nodes.conf` and log; removed on drop.
    dir: tempfile::TempDir,
    /// `None` once killed.
    child: Option<Child>,
}

/// A local Redis Cluster made of `redis-server` processes, as
/// `scripts/redis-cluster` builds one: `masters` masters with `replicas`
/// replicas each, created with `redis-cli --cluster create`; every node is
/// killed on drop.
pub struct RedisCluster {
    /// Masters first (as `redis-cli --cluster create` assigns them), then
    /// replicas; roles change with failovers.
    pub nodes: Vec<ClusterNode>,
    /// Replicas [`RedisCluster::wait_ok`] expects to see.
    replicas_total: usize,
}

impl RedisCluster {
    /// `node_timeout_ms`: how long a master may be unreachable before its
    /// replica takes over.
    pub fn start(masters: usize, replicas: usize, node_timeout_ms: u64) -> RedisCluster {
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            replicas_total: masters * replicas,
        };
        for _ in 0..masters * (1 + replicas) {
            let mut node = ClusterNode {
                port: free_port(),
                bus_port: free_port(),
                dir: tempfile::tempdir().unwrap(),
                child: None,
            };
            node.spawn(node_timeout_ms);
            cluster.nodes.push(node);
        }
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(
                cluster
                    .nodes
                    .iter()
                    .map(|n| format!("127.0.0.1:{}", n.port)),
            )
            .arg("--cluster-replicas")
            .arg(replicas.to_string())
            .arg("--cluster-yes")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "redis-cli --cluster create failed");
        cluster.wait_ok();
        cluster
    }

    /// Waits until every live node reports `cluster_state:ok` and sees all
    /// replicas, and every replica has synced with its master.
    pub fn wait_ok(&self) {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let ok = wait_until(Duration::from_secs(30), || {
                let Ok(mut con) = node.try_conn() else {
                    return false;
                };
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut con)
                    .unwrap_or_default();
                let nodes: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query(&mut con)
                    .unwrap_or_default();
                let replicas = nodes
                    .lines()
                    .filter(|l| l.split(' ').nth(2).is_some_and(|f| f.contains("slave")))
                    .count();
                // A replica can take over only once it has synced.
                let replication: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut con)
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
                    && replicas >= self.replicas_total
                    && !replication.contains("master_link_status:down")
            });
            assert!(ok, "node {} never reached cluster_state:ok", node.port);
        }
    }

    /// The seed nodes in tripline's `redis+cluster://` form (every node, so
    /// a killed one is never the only way in).
    pub fn addr(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// A cluster client that follows MOVED and failovers by itself.
    pub fn conn(&self) -> redis::cluster::ClusterConnection {
        redis::cluster::ClusterClientBuilder::new(
            self.nodes
                .iter()
                .filter(|n| n.child.is_some())
                .map(|n| format!("redis://127.0.0.1:{}/", n.port)),
        )
        .connection_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
        .get_connection()
        .unwrap()
    }

    /// The port of the master serving `key`'s slot, as a live node sees it.
    pub fn master_of(&self, key: &str) -> u16 {
        let node = self.nodes.iter().find(|n| n.child.is_some()).unwrap();
        let mut con = node.try_conn().unwrap();
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut con)
            .unwrap();
        let ranges: Vec<Vec<Value>> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut con).unwrap();
        for r in ranges {
            let (Value::Int(lo), Value::Int(hi), Value::Array(master)) = (&r[0], &r[1], &r[2])
            else {
                continue;
            };
            if (*lo..=*hi).contains(&slot)
                && let Value::Int(port) = master[1]
            {
                return port as u16;
            }
        }
        panic!("no master serves the slot of {key}");
    }

    /// A replica of the master on `port`.
    pub fn replica_of(&self, port: u16) -> u16 {
        let node = self.node(port);
        let id: String = redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut node.try_conn().unwrap())
            .unwrap();
        let lines: Vec<String> = redis::cmd("CLUSTER")
            .arg("REPLICAS")
            .arg(&id)
            .query(&mut node.try_conn().unwrap())
            .unwrap();
        let addr = lines[0].split(' ').nth(1).unwrap();
        addr.split(['@', ':']).nth(1).unwrap().parse().unwrap()
    }

    pub fn node(&self, port: u16) -> &ClusterNode {
        self.nodes.iter().find(|n| n.port == port).unwrap()
    }

    /// SIGKILLs the node on `port`. The cluster has one replica fewer
    /// after that: the node itself, or the replica promoted in its place.
    pub fn kill(&mut self, port: u16) {
        self.replicas_total = self.replicas_total.saturating_sub(1);
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap()
            .stop();
    }

    /// Whether the node on `port` is a master now (ROLE).
    pub fn is_master(&self, port: u16) -> bool {
        let Ok(mut con) = self.node(port).try_conn() else {
            return false;
        };
        let role: Vec<Value> = redis::cmd("ROLE").query(&mut con).unwrap_or_default();
        role.first() == Some(&Value::BulkString(b"master".to_vec()))
    }
}

impl ClusterNode {
    fn spawn(&mut self, node_timeout_ms: u64) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--cluster-port", &self.bus_port.to_string()])
            .args(["--bind", "127.0.0.1", "--cluster-enabled", "yes"])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", &node_timeout_ms.to_string()])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--save", "", "--appendonly", "no"])
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--logfile", "redis.log"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (.ci/run installs it)");
        self.child = Some(child);
        assert!(
            wait_until(Duration::from_secs(10), || self
                .try_conn()
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok()),
            "cluster node did not come up on port {}; its log:\n{}",
            self.port,
            self.log()
        );
    }

    /// A plain connection to this node alone.
    pub fn try_conn(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))?
            .get_connection_with_timeout(Duration::from_secs(2))
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The node's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Project {
    /// Starts `tripline run` with `REDIS_ADDR=addr` (e.g. a cluster's
    /// [`RedisCluster::addr`]).
    pub fn start_on(&self, addr: &str) -> Tripline {
        Tripline::spawn(self.dir.path(), addr, &["run"], &[])
    }
}

/// A `prometheus` server scraping `target` every second (job `tripline`),
/// with its own storage and config under `dir`; killed on drop.
pub struct Prometheus {
    /// The server, killed on drop so no test leaves one running.
    child: Child,
    /// Where its HTTP API listens.
    pub addr: String,
    /// Its stderr (where it logs), for failure messages.
    log: PathBuf,
}

impl Prometheus {
    pub fn start(dir: &Path, target: &str) -> Prometheus {
        let addr = format!("127.0.0.1:{}", free_port());
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: tripline\n    scrape_interval: 1s\n    scrape_timeout: 900ms\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let log = dir.join("prometheus.err");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("prometheus must be installed (Debian package `prometheus`; scripts/test installs it)");
        Prometheus { child, addr, log }
    }

    /// A GET of the HTTP API; `None` unless it answered 200.
    pub fn api(&self, path: &str) -> Option<serde_json::Value> {
        let r = http_call(&self.addr, "GET", path, &[], b"").ok()?;
        (r.status == 200).then(|| r.json())
    }

    /// The series an instant PromQL query returns now; `Err` with
    /// Prometheus' answer when it refused the query.
    pub fn query(&self, promql: &str) -> Result<Vec<serde_json::Value>, String> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let r = http_call(&self.addr, "GET", &path, &[], b"").map_err(|e| e.to_string())?;
        let v = r.json();
        match v["data"]["result"].as_array() {
            Some(series) if r.status == 200 => Ok(series.clone()),
            _ => Err(format!("{} {}", r.status, r.text())),
        }
    }

    /// Waits until the scrape target is up.
    pub fn wait_target_up(&self, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.api("/api/v1/targets").is_some_and(|v| {
                v["data"]["activeTargets"]
                    .as_array()
                    .is_some_and(|ts| ts.iter().any(|t| t["health"] == "up"))
            })
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes `s` for a URL query value (everything but RFC 3986's
/// unreserved characters).
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `git rev-parse --short HEAD` of the checkout the tests run in; `None`
/// without `.git` (a source tarball), where the binary says "unknown".
pub fn checkout_commit() -> Option<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if !root.join(".git").exists() {
        return None;
    }
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Samples of the Prometheus text format as (name, labels, value).
pub fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once("=\"").unwrap();
                    (k.to_string(), v.trim_end_matches('"').to_string())
                })
                .collect();
            (name.to_string(), labels, value)
        })
        .collect()
}

/// The value of the one sample of `name` whose labels include `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<f64> = samples(text)
        .into_iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .collect();
    assert!(found.len() <= 1, "{name} {labels:?} matches {found:?}");
    found.first().copied()
}

/// `promtool check metrics` on `text`: (passed, its report).
pub fn promtool_check(text: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "promtool must be installed (Debian package `prometheus`; scripts/test installs it)",
        );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}
