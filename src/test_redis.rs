//! A throwaway `redis-server` for the unit tests that need Redis, started as
//! the integration tests' `util::RedisServer` starts one: its own port below
//! the ephemeral range, its own directory, no persistence, killed on drop.
//! With the runtime context handed in, the worker step, sink delivery and
//! the plugin supervisor are tested in process against it.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::redis_conn::{RedisEndpoint, RedisTarget};

pub struct TestRedis {
    pub port: u16,
    /// Redis's working directory, removed with the server.
    _dir: tempfile::TempDir,
    child: Child,
}

/// A port nobody listens on, below the ephemeral range (see
/// `tests/it/util.rs::free_port` for why); the counter keeps two tests of
/// this binary from picking the same one.
fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let start = (std::process::id() * 97 + SPAN / 2) % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < SPAN, "no free port left below the ephemeral range");
        let port = (LOW + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl TestRedis {
    pub fn start() -> TestRedis {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (.ci/run installs it)");
        let redis = TestRedis {
            port,
            _dir: dir,
            child,
        };
        let until = Instant::now() + Duration::from_secs(10);
        while redis.try_conn().is_none() {
            assert!(
                Instant::now() < until,
                "redis-server did not come up on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// What tripline's own code connects with.
    pub fn target(&self) -> RedisTarget {
        let endpoint = RedisEndpoint::parse(&self.url()).unwrap();
        RedisTarget::new(&endpoint, Duration::from_secs(2)).unwrap()
    }

    /// A blocking connection, for setting up and checking from the test.
    pub fn conn(&self) -> redis::Connection {
        self.try_conn().expect("redis-server is up")
    }

    fn try_conn(&self) -> Option<redis::Connection> {
        let mut c = redis::Client::open(self.url())
            .ok()?
            .get_connection()
            .ok()?;
        redis::cmd("PING").query::<String>(&mut c).ok()?;
        Some(c)
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
