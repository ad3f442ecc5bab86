//! Instance names that are stable across restarts yet unique among live
//! instances: `<base>`, or `<base>-2`, `<base>-3`… when another live process
//! holds the name. A lease key with a TTL, refreshed while we run, marks a
//! name as taken. Two instances sharing a consumer name would each re-read
//! the other's in-flight pending entries on start.

use std::time::Duration;

use redis::Value;
use tokio_util::sync::CancellationToken;

use crate::keys::instance_key;
use crate::redis_conn::{Backoff, LazyConn, RedisConn, RedisTarget, note_error, pause};

const TTL: Duration = Duration::from_secs(30);
const REFRESH: Duration = Duration::from_secs(10);
const MAX_SUFFIX: u32 = 64;

/// Refreshes the lease only while it is still ours (or re-takes it after a
/// Redis restart lost it).
const REFRESH_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0";

/// Whether the instance that named a consumer `name` still lives: its
/// pending entries are then its own to finish, not orphans to adopt.
pub async fn is_alive(conn: &mut RedisConn, name: &str) -> Result<bool, redis::RedisError> {
    redis::cmd("EXISTS")
        .arg(instance_key(name))
        .query_async(conn)
        .await
}
/// Takes the first free name, waiting (with backoff) for Redis if needed.
/// `None` when shutdown came first.
pub async fn acquire(
    target: &RedisTarget,
    base: &str,
    shutdown: &CancellationToken,
) -> Option<(String, String)> {
    let token = uuid::Uuid::new_v4().to_string();
    let mut conn = LazyConn::new(target.clone());
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match try_acquire(&mut conn, base, &token).await {
            Ok(name) => {
                crate::redis_conn::check_health_now();
                return Some((name, token));
            }
            Err(e) => {
                note_error("acquiring the instance name", &e);
                conn.reset();
                if !pause(&mut backoff, shutdown).await {
                    return None;
                }
            }
        }
    }
}

async fn try_acquire(
    conn: &mut LazyConn,
    base: &str,
    token: &str,
) -> Result<String, redis::RedisError> {
    for n in 1..=MAX_SUFFIX {
        let name = if n == 1 {
            base.to_string()
        } else {
            format!("{base}-{n}")
        };
        let taken: Value = redis::cmd("SET")
            .arg(instance_key(&name))
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(TTL.as_millis() as u64)
            .query_async(conn.get().await?)
            .await?;
        if taken != Value::Nil {
            return Ok(name);
        }
    }
    // Every name is held: fall back to a unique one rather than share.
    Ok(format!("{base}-{}", &token[..8]))
}

/// Keeps the lease alive until shutdown, then releases it.
pub async fn keep(target: RedisTarget, name: String, token: String, shutdown: CancellationToken) {
    let mut conn = LazyConn::new(target);
    let script = redis::Script::new(REFRESH_SCRIPT);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REFRESH) => {}
            _ = shutdown.cancelled() => break,
        }
        let result: Result<i64, redis::RedisError> = match conn.get().await {
            Ok(c) => {
                script
                    .key(instance_key(&name))
                    .arg(&token)
                    .arg(TTL.as_millis() as u64)
                    .invoke_async(c)
                    .await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(0) => tracing::error!(
                instance = %name,
                "another live process took this instance name; consumer names may be shared"
            ),
            Ok(_) => {}
            Err(e) => {
                note_error("refreshing the instance lease", &e);
                conn.reset();
            }
        }
    }
    if let Ok(c) = conn.get().await {
        let release = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        );
        let _: Result<i64, _> = release
            .key(instance_key(&name))
            .arg(&token)
            .invoke_async(c)
            .await;
    }
}
