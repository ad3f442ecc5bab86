//! The timer side of the alert lifecycle: pending alerts whose `for`
//! elapsed, auto-resolve of alerts no longer asserted, deadman watches whose
//! series went silent, release of flap holds, firings withheld by a silence
//! that ended. These need a clock, not a message. Every instance runs them; the
//! versioned commit makes sure only one of them notifies each transition.

use std::time::{Duration, Instant};

use redis::RedisError;
use tokio_util::sync::CancellationToken;

use super::store::{Settled, Settlement, Store};
use crate::clock::now_ms;
use crate::redis_conn::{LazyConn, RedisTarget, note_error};

/// How often the whole alert state is re-read from Redis, so alerts raised
/// by other (possibly dead) instances are covered by this one's timers.
const FULL_REFRESH: Duration = Duration::from_secs(15);

/// Every this many full reads (5 minutes), even a partition the cache is
/// known to equal is read: a failover that lost a write of ours and let
/// another instance write the same generation would otherwise leave the
/// cache wrong for good.
const EVERY_PARTITION_EVERY: u32 = 20;

/// Runs the timers of the partitions of `streams` every `every` until
/// `shutdown`. `housekeeping` is called with the time after each full read
/// (every 15 s), for work outside alert state that suits that slow pace
/// (the eviction of stale rule samples); taking it as a function keeps
/// `alert` from depending on `rules`, which depends on `alert`.
pub async fn run(
    store: Store,
    target: RedisTarget,
    streams: Vec<String>,
    every: Duration,
    housekeeping: impl Fn(u64),
    shutdown: CancellationToken,
) {
    // Its own connection: the full read is the largest reply tripline asks for.
    let mut conn = LazyConn::own(target, Duration::from_secs(5));
    let mut last_refresh: Option<Instant> = None;
    let mut refreshes: u32 = 0;
    // The first full read happens at once: until it, every commit checks a
    // version per alert (see `alert::book`).
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.cancelled() => return,
            }
        }
        first = false;
        if last_refresh.is_none_or(|t| t.elapsed() >= FULL_REFRESH) {
            let every_partition = refreshes.is_multiple_of(EVERY_PARTITION_EVERY);
            match store.load(&mut conn, &streams, every_partition).await {
                Ok(()) => {
                    last_refresh = Some(Instant::now());
                    refreshes = refreshes.wrapping_add(1);
                }
                Err(e) => {
                    note_error("reading alert state", &e);
                    conn.reset();
                    continue;
                }
            }
            housekeeping(now_ms());
        }
        if let Err(e) = fire_due(&store, &mut conn).await {
            note_error("alert timers", &e);
            conn.reset();
        }
    }
}

/// Settles what is due in every partition. One that another instance
/// changed meanwhile is decided again on the next tick.
async fn fire_due(store: &Store, conn: &mut LazyConn) -> Result<(), RedisError> {
    for tag in store.tags() {
        if let Settled::Committed(notified) =
            store.settle(conn, Settlement::Due { tag: &tag }).await?
        {
            for a in &notified {
                store.metrics().alert_notified(a);
            }
        }
    }
    Ok(())
}
