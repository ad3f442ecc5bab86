//! The timer side of the alert lifecycle: pending alerts whose `for`
//! elapsed, auto-resolve of alerts no longer asserted, deadman watches whose
//! series went silent, release of flap holds, firings withheld by a silence
//! that ended. These need a clock, not a message. Every instance runs them; the
//! versioned commit makes sure only one of them notifies each transition.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::RedisError;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::alert::{Alert, AlertBook, Decision, Snapshot};
use crate::keys::{hash_tag, state_key};
use crate::metrics;
use crate::outbox::{self, Basis, Committed, Settlement};
use crate::process::now_ms;
use crate::redis_conn::{LazyConn, note_error};
use crate::rules::state;

/// How often the whole alert state is re-read from Redis, so alerts raised
/// by other (possibly dead) instances are covered by this one's timers.
const FULL_REFRESH: Duration = Duration::from_secs(15);

pub async fn run(
    shared: Arc<Shared>,
    streams: Vec<String>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut conn = LazyConn::new(shared.target.clone(), Duration::from_secs(5));
    let mut last_refresh: Option<Instant> = None;
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
            match refresh(&shared, &streams, &mut conn).await {
                Ok(()) => last_refresh = Some(Instant::now()),
                Err(e) => {
                    note_error("reading alert state", &e);
                    conn.reset();
                    continue;
                }
            }
            state::evict_stale(now_ms());
        }
        if let Err(e) = fire_due(&shared, &mut conn).await {
            note_error("alert timers", &e);
            conn.reset();
        }
    }
}

/// One representative stream per hash tag: they share a state hash.
fn partitions(streams: &[String]) -> BTreeMap<String, String> {
    streams
        .iter()
        .map(|s| (hash_tag(s).to_string(), s.clone()))
        .collect()
}

/// Reads every partition whole. The generation is read before and again
/// under the partition's gate after: equal, nothing wrote in between and
/// the cache is known to equal Redis from then on (see `alert::book`).
async fn refresh(
    shared: &Shared,
    streams: &[String],
    conn: &mut LazyConn,
) -> Result<(), RedisError> {
    let book = &shared.processor.book;
    for (tag, stream) in partitions(streams) {
        let before = outbox::read_gen(conn.get().await?, &stream).await?;
        let mut cursor = 0u64;
        let mut fields = Vec::new();
        loop {
            let (next, page): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
                .arg(state_key(&stream))
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(conn.get().await?)
                .await?;
            fields.extend(page);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let snapshot = Snapshot::decode(&fields);
        drop(fields);
        let gate = book.gate(&tag);
        let decided = gate.lock().await;
        let after = outbox::read_gen(conn.get().await?, &stream).await?;
        let stale = book.load_partition(&tag, snapshot, (before == after).then_some(before));
        drop(decided);
        drop(stale);
    }
    Ok(())
}

async fn fire_due(shared: &Shared, conn: &mut LazyConn) -> Result<(), RedisError> {
    let book = &shared.processor.book;
    for tag in book.tags() {
        let gate = book.gate(&tag);
        let _decided = gate.lock().await;
        let decision = book.due_in(&tag, now_ms());
        commit_unacked(
            conn,
            book,
            &tag,
            &shared.outbox_prefix,
            shared.outbox_max_len,
            decision,
        )
        .await?;
    }
    Ok(())
}

/// Commits lifecycle decisions that no message caused (timers, retired
/// rules) in partition `tag`; the caller holds the partition's gate since
/// it decided. On a conflict (another instance got there first) the
/// decision is rolled back and the fields refreshed from Redis. Returns the
/// notifications committed and whether it conflicted.
pub async fn commit_unacked(
    conn: &mut LazyConn,
    book: &AlertBook,
    tag: &str,
    outbox_prefix: &str,
    outbox_max_len: u64,
    decision: Decision,
) -> Result<(Vec<Alert>, bool), RedisError> {
    let Some(stream) = decision.writes.first().map(|w| w.stream.clone()) else {
        return Ok((Vec::new(), false));
    };
    let conn = match conn.get().await {
        Ok(c) => c,
        Err(e) => {
            book.rollback(tag, decision.undo);
            return Err(e);
        }
    };
    let synced = book.synced(tag);
    let settlement = Settlement {
        acks: &[],
        alerts: &decision.notifications,
        dead: &[],
        writes: &decision.writes,
        basis: synced.map_or(Basis::Versions, Basis::Generation),
    };
    let committed = outbox::commit(
        conn,
        &stream,
        "",
        outbox_prefix,
        outbox_max_len,
        &settlement,
    )
    .await;
    match committed {
        Ok(Committed::Done(generation)) => {
            book.committed(tag, synced, generation);
            for a in &decision.notifications {
                metrics::alert_notified(a);
            }
            Ok((decision.notifications, false))
        }
        Ok(Committed::Stale) => {
            book.rollback(tag, decision.undo);
            book.unsync(tag);
            metrics::state_redecided(&stream, "stale");
            Ok((Vec::new(), true))
        }
        Ok(Committed::Conflict(changed)) => {
            book.rollback(tag, decision.undo);
            metrics::state_redecided(&stream, "conflict");
            let fresh = outbox::read_state(conn, &stream, &changed).await?;
            book.refresh(tag, fresh);
            Ok((Vec::new(), true))
        }
        Err(e) => {
            book.rollback(tag, decision.undo);
            book.unsync(tag);
            Err(e)
        }
    }
}
