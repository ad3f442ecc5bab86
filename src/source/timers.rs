//! The timer side of the alert lifecycle: auto-resolve of alerts no longer
//! asserted, deadman watches whose series went silent, release of flap
//! holds. These need a clock, not a message. Every instance runs them; the
//! versioned commit makes sure only one of them notifies each transition.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::RedisError;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::alert::{Alert, AlertBook, Decision, Write};
use crate::metrics;
use crate::outbox::{self, Committed, Settlement, hash_tag, state_key};
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
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
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

async fn refresh(
    shared: &Shared,
    streams: &[String],
    conn: &mut LazyConn,
) -> Result<(), RedisError> {
    for (tag, stream) in partitions(streams) {
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
        shared.processor.book.load_partition(&tag, fields);
    }
    Ok(())
}

async fn fire_due(shared: &Shared, conn: &mut LazyConn) -> Result<(), RedisError> {
    let book = &shared.processor.book;
    let decision = book.due(now_ms());
    commit_unacked(
        conn,
        book,
        &shared.outbox_prefix,
        shared.outbox_max_len,
        decision,
    )
    .await?;
    Ok(())
}

/// Commits lifecycle decisions that no message caused (timers, retired
/// rules), one atomic step per stream hash tag. On a version conflict that
/// part is rolled back and its fields refreshed from Redis: another
/// instance got there first. Returns the notifications committed and
/// whether any part conflicted.
pub async fn commit_unacked(
    conn: &mut LazyConn,
    book: &AlertBook,
    outbox_prefix: &str,
    outbox_max_len: u64,
    decision: Decision,
) -> Result<(Vec<Alert>, bool), RedisError> {
    let mut by_tag: BTreeMap<String, (String, Vec<Write>, Vec<Alert>)> = BTreeMap::new();
    for w in decision.writes {
        by_tag
            .entry(hash_tag(&w.stream).to_string())
            .or_insert_with(|| (w.stream.clone(), Vec::new(), Vec::new()))
            .1
            .push(w);
    }
    for n in decision.notifications {
        if let Some(slot) = by_tag.get_mut(hash_tag(&n.origin.stream)) {
            slot.2.push(n);
        }
    }
    let mut undo = decision.undo;
    let mut notified = Vec::new();
    let mut conflicted = false;
    for (stream, writes, alerts) in by_tag.into_values() {
        let settlement = Settlement {
            acks: &[],
            alerts: &alerts,
            dead: &[],
            writes: &writes,
        };
        let committed = outbox::commit(
            conn.get().await?,
            &stream,
            "",
            outbox_prefix,
            outbox_max_len,
            &settlement,
        )
        .await;
        let fields: Vec<&str> = writes.iter().map(|w| w.field.as_str()).collect();
        let (mine, rest): (Vec<_>, Vec<_>) = undo
            .into_iter()
            .partition(|t| fields.contains(&t.field().as_str()));
        undo = rest;
        match committed {
            Ok(Committed::Done) => {
                for a in &alerts {
                    metrics::alert_notified(a);
                }
                notified.extend(alerts);
            }
            Ok(Committed::Conflict(changed)) => {
                conflicted = true;
                book.rollback(mine);
                let fresh = outbox::read_state(conn.get().await?, &stream, &changed).await?;
                book.refresh(fresh);
            }
            Err(e) => {
                book.rollback(mine);
                book.rollback(undo);
                return Err(e);
            }
        }
    }
    Ok((notified, conflicted))
}
