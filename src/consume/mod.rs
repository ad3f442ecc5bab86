//! The consumer side: per subscription, `concurrency` worker loops (read a
//! batch, judge it on a blocking thread, commit it), one claimer that takes
//! over entries abandoned by dead consumers, and a reporter of pending/lag.
//!
//! Every worker has its own consumer name (`<instance>-w<i>`) and reads
//! through a [`GroupReader`], which re-reads its own pending entries before
//! new ones.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::RedisError;
use tokio_util::sync::CancellationToken;

use crate::alert::Action;
use crate::alert::store::{DeadLetter, Settled, Settlement, Store};
use crate::clock::now_ms;
use crate::config::Subscription;
use crate::group_reader::{Delivered, GroupReader, Member, ensure_group, position};
use crate::metrics;
use crate::metrics::Metrics;
use crate::process::{Input, LoadedRules, Processor, Verdict};
use crate::redis_conn::{self, Backoff, LazyConn, RedisTarget, note_error, pause};
use crate::runtime::Runtime;

/// What every loop of every subscription shares.
pub struct Shared {
    pub processor: Processor,
    pub target: RedisTarget,
    /// Where each batch's outcome and alert decisions are committed.
    pub store: Store,
    /// Metrics, silences and rule state of this engine.
    pub runtime: Runtime,
}

/// The judged batch of one stream, ready for the lifecycle and the commit.
struct Judged {
    acks: Vec<String>,
    dead: Vec<DeadLetter>,
    /// Alert assertions of the whole batch, in message order.
    actions: Vec<Action>,
    processed: u64,
    dropped: u64,
    errored: u64,
}

fn backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
}

/// One read/judge/commit loop. Returns when `shutdown` fires, after the
/// batch in hand (and one read ahead, if any) is committed.
pub async fn run_worker(
    shared: Arc<Shared>,
    sub: Arc<Subscription>,
    consumer: String,
    shutdown: CancellationToken,
) {
    tracing::debug!(subscription = %sub.name, consumer, "worker started");
    let mut worker = Worker::new(shared, sub, consumer);
    let mut backoff = backoff();
    while !shutdown.is_cancelled() {
        match worker.step().await {
            Ok(()) => {
                if backoff.attempts() > 0 {
                    redis_conn::check_health_now();
                    backoff.reset();
                }
            }
            Err(e) => {
                note_error(&format!("subscription {}", worker.judge.sub.name), &e);
                worker.reader.reset();
                worker.write.reset();
                worker.groups_ready = false;
                if !pause(&mut backoff, &shutdown).await {
                    break;
                }
            }
        }
    }
    if let Err(e) = worker.finish().await {
        note_error(&format!("subscription {}", worker.judge.sub.name), &e);
    }
    tracing::debug!(
        subscription = %worker.judge.sub.name,
        consumer = worker.reader.member().consumer,
        "worker stopped"
    );
}

/// One worker of a subscription: its reader, and what it judges and
/// commits with.
struct Worker {
    judge: Judge,
    /// Our consumer of the subscription's group on those streams.
    reader: GroupReader,
    /// For the commits, which must not wait behind a blocking read.
    write: LazyConn,
    /// Groups are (re)created after every (re)connect: a Redis that restarted
    /// without persistence has lost them.
    groups_ready: bool,
}

impl Worker {
    fn new(shared: Arc<Shared>, sub: Arc<Subscription>, consumer: String) -> Worker {
        Worker {
            reader: GroupReader::new(
                &shared.target,
                member_of(&sub, consumer),
                sub.streams.clone(),
                sub.batch_size,
                sub.block,
            ),
            write: LazyConn::new(shared.target.clone()),
            groups_ready: false,
            judge: Judge::new(shared, sub),
        }
    }

    async fn step(&mut self) -> Result<(), RedisError> {
        if !self.groups_ready {
            let conn = self.write.get().await?;
            let sub = &self.judge.sub;
            for stream in &sub.streams {
                ensure_group(conn, stream, sub.group(), &sub.start_id).await?;
            }
            self.groups_ready = true;
            redis_conn::check_health_now();
        }
        let read = self.reader.read(true).await?;
        // Reading ahead pays only with a backlog (a full batch of new
        // entries). Without one, the read would wait here for the next
        // entry, which an idle worker of the group should take at once
        // instead.
        let backlog = !read.redelivered
            && read
                .batches
                .iter()
                .any(|(_, entries)| entries.len() >= self.judge.sub.batch_size);
        let batches = self
            .reader
            .member()
            .deliveries(&mut self.write, read)
            .await?;
        if !backlog {
            let left = self.judge.settle_all(batches, &mut self.write).await?;
            left.into_iter().for_each(|s| self.reader.redrain(s));
            return Ok(());
        }
        let (settled, ahead) = tokio::join!(
            self.judge.settle_all(batches, &mut self.write),
            self.reader.read_ahead()
        );
        let left = settled?;
        if left.is_empty() {
            ahead?;
        }
        left.into_iter().for_each(|s| self.reader.redrain(s));
        Ok(())
    }

    /// Judges what was read ahead before the shutdown, rather than leave it
    /// pending.
    async fn finish(&mut self) -> Result<(), RedisError> {
        let Some(read) = self.reader.take_ahead() else {
            return Ok(());
        };
        let batches = self
            .reader
            .member()
            .deliveries(&mut self.write, read)
            .await?;
        self.judge.settle_all(batches, &mut self.write).await?;
        Ok(())
    }
}

/// Where a batch is judged. Handing it to the blocking pool and back costs
/// two thread wake-ups, more than judging an entry or two with the shipped
/// rules (20–100 µs, log line included); judging in place holds the
/// reactor thread, which a slow rule must not (`limits.max_eval_time` is
/// 50 ms per rule and message). So a batch is judged in place only while
/// this worker's recent cost per entry says it takes at most
/// [`JudgeCost::IN_PLACE`]; one slow batch sends the next ones to the pool
/// at once, and the estimate comes back down only as cheap batches are
/// measured there. Measured at 5,000 readings/s, each its own batch: p50
/// 1.62–1.68 -> 1.33–1.48 ms, tripline CPU 8.7–9.4 -> 8.1–8.2 s.
struct JudgeCost {
    /// Recent cost of an entry, in ns: up at once, down by a sixteenth of
    /// the difference per batch, so that a rule slow on one message in many
    /// holds the reactor at most once per eighty-odd batches.
    per_entry_ns: AtomicU64,
}

impl JudgeCost {
    const IN_PLACE: Duration = Duration::from_micros(250);

    fn in_place(&self, entries: usize) -> bool {
        let per_entry = self.per_entry_ns.load(Ordering::Relaxed);
        (entries as u64).saturating_mul(per_entry) <= Self::IN_PLACE.as_nanos() as u64
    }

    fn judged(&self, entries: usize, took: Duration) {
        let measured = took.as_nanos() as u64 / entries.max(1) as u64;
        let old = self.per_entry_ns.load(Ordering::Relaxed);
        let new = if measured >= old {
            measured
        } else {
            (old * 15 + measured) / 16
        };
        self.per_entry_ns.store(new, Ordering::Relaxed);
    }
}

impl Default for JudgeCost {
    /// Unmeasured: a lone entry is judged in place, a batch of three or
    /// more goes to the pool until one has been measured.
    fn default() -> JudgeCost {
        JudgeCost {
            per_entry_ns: AtomicU64::new(Self::IN_PLACE.as_nanos() as u64 / 2),
        }
    }
}

/// What one task that judges a subscription's batches (a worker, or the
/// claimer) judges and commits them with.
struct Judge {
    /// The rules, the alert book and the outbox every task commits to.
    shared: Arc<Shared>,
    /// The subscription, narrowed to the streams this task reads.
    sub: Arc<Subscription>,
    /// What judging an entry has cost this task lately: whether a batch is
    /// judged in place or on the blocking pool.
    cost: JudgeCost,
}

impl Judge {
    fn new(shared: Arc<Shared>, sub: Arc<Subscription>) -> Judge {
        Judge {
            shared,
            sub,
            cost: JudgeCost::default(),
        }
    }

    /// Judges and commits batches given with their delivery counts. Returns
    /// the streams whose batch was left pending after too many state
    /// conflicts: read again from our own pending list at once, not after
    /// `claim_min_idle`.
    async fn settle_all(
        &self,
        batches: Vec<(String, Vec<Delivered>)>,
        write: &mut LazyConn,
    ) -> Result<Vec<String>, RedisError> {
        let mut left = Vec::new();
        for (stream, delivered) in batches {
            if !settle(self, &stream, delivered, write).await? {
                left.push(stream);
            }
        }
        Ok(left)
    }
}

/// Judges a batch of one stream and commits its outcome; false when it was
/// left pending because the alert state kept changing under it (see
/// [`Store::settle`]).
async fn settle(
    Judge { shared, sub, cost }: &Judge,
    stream: &str,
    batch: Vec<Delivered>,
    write: &mut LazyConn,
) -> Result<bool, RedisError> {
    // Held until the batch is committed or rolled back: a reload that
    // removes a rule waits for every batch judged with the old set to let go
    // of it before resolving that rule's alerts.
    let rules = shared.processor.rules.load_full();
    let entries = batch.len();
    // The judging alone is timed: with the hand-off to the pool counted, a
    // loaded machine would keep every batch there.
    let timed = |shared: &Shared, rules: &LoadedRules, sub: &Subscription, stream: &str| {
        let started = Instant::now();
        let judged = judge(shared, rules, sub, stream, batch);
        (judged, started.elapsed())
    };
    let (judged, took) = if cost.in_place(entries) {
        timed(shared, &rules, sub, stream)
    } else {
        let shared = shared.clone();
        let sub = sub.clone();
        let stream = stream.to_string();
        let rules = rules.clone();
        tokio::task::spawn_blocking(move || timed(&shared, &rules, &sub, &stream))
            .await
            .expect("judge catches rule panics itself")
    };
    cost.judged(entries, took);
    let settled = shared
        .store
        .settle(
            write,
            Settlement::Batch {
                stream,
                group: sub.group(),
                acks: &judged.acks,
                dead: &judged.dead,
                actions: &judged.actions,
            },
        )
        .await?;
    let Settled::Committed(notified) = settled else {
        tracing::warn!(
            stream,
            "alert state kept changing under this batch; it stays pending and is judged again"
        );
        return Ok(false);
    };
    drop(rules);
    let group = sub.group();
    let m = &shared.runtime.metrics;
    m.messages(stream, group, "processed", judged.processed);
    m.messages(stream, group, "dropped", judged.dropped);
    m.messages(stream, group, "error", judged.errored);
    for d in &judged.dead {
        m.dead_lettered(stream, group, &d.id, &d.reason);
    }
    for a in &notified {
        m.alert_notified(a);
    }
    Ok(true)
}

fn judge(
    shared: &Shared,
    loaded: &LoadedRules,
    sub: &Subscription,
    stream: &str,
    batch: Vec<Delivered>,
) -> Judged {
    let mut j = Judged {
        acks: Vec::with_capacity(batch.len()),
        dead: Vec::new(),
        actions: Vec::new(),
        processed: 0,
        dropped: 0,
        errored: 0,
    };
    let now = now_ms();
    for d in batch {
        j.acks.push(d.id.clone());
        let Some(fields) = d.fields else {
            // Deleted while pending: nothing to judge, only to acknowledge.
            continue;
        };
        if d.deliveries > sub.max_deliveries {
            j.dead.push(DeadLetter {
                reason: format!(
                    "delivered {} times, more than max_deliveries ({})",
                    d.deliveries, sub.max_deliveries
                ),
                id: d.id,
                fields,
            });
            continue;
        }
        let input = Input {
            subscription: &sub.name,
            group: sub.group(),
            stream,
            id: &d.id,
            deliveries: d.deliveries,
            fields: &fields,
            now_ms: now,
        };
        let out = std::panic::catch_unwind(AssertUnwindSafe(|| {
            shared.processor.evaluate(loaded, &input)
        }));
        let out = match out {
            Ok(out) => out,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                j.dead.push(DeadLetter {
                    reason: format!("rule engine panicked: {what}"),
                    id: d.id,
                    fields,
                });
                continue;
            }
        };
        for (rule, level, text) in &out.logs {
            metrics::rule_log(rule, stream, &d.id, (*level).into(), text);
        }
        match out.verdict {
            Verdict::Undecodable(reason) => {
                j.dead.push(DeadLetter {
                    id: d.id,
                    fields,
                    reason,
                });
            }
            Verdict::Processed {
                dropped,
                rule_errors,
            } => {
                if rule_errors > 0 {
                    j.errored += 1;
                } else if dropped {
                    j.dropped += 1;
                } else {
                    j.processed += 1;
                }
            }
        }
        j.actions.extend(out.actions);
    }
    j
}

/// `consumer` in the subscription's group.
fn member_of(sub: &Subscription, consumer: String) -> Member {
    Member {
        group: sub.group().to_string(),
        consumer,
    }
}

/// Takes over entries idle longer than `claim_min_idle` (their consumer is
/// dead or stuck) and judges them here; entries delivered too often are
/// dead-lettered instead.
pub async fn run_claimer(
    shared: Arc<Shared>,
    sub: Arc<Subscription>,
    consumer: String,
    shutdown: CancellationToken,
) {
    let member = member_of(&sub, consumer);
    let mut write = LazyConn::new(shared.target.clone());
    let judge = Judge::new(shared, sub);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(judge.sub.claim_interval) => {}
            _ = shutdown.cancelled() => break,
        }
        for stream in &judge.sub.streams {
            if let Err(e) = claim_stream(&judge, &member, stream, &mut write).await {
                note_error(&format!("claiming on {stream}"), &e);
                write.reset();
            }
            if shutdown.is_cancelled() {
                break;
            }
        }
    }
}

async fn claim_stream(
    judge: &Judge,
    member: &Member,
    stream: &str,
    write: &mut LazyConn,
) -> Result<(), RedisError> {
    let sub = &judge.sub;
    let min_idle = sub.claim_min_idle.as_millis() as u64;
    while let Some(claimed) = member
        .claim_idle(write, stream, min_idle, sub.batch_size)
        .await?
    {
        tracing::info!(
            subscription = %sub.name,
            stream,
            n = claimed.entries.len(),
            from = %claimed.from,
            "claimed entries idle longer than claim_min_idle"
        );
        settle(judge, stream, claimed.entries, write).await?;
        if !claimed.full {
            break;
        }
    }
    Ok(())
}

/// Refreshes the pending and lag gauges of every group on an interval (not
/// per scrape: a scrape must not cost Redis round trips). Every instance
/// reports the same group-wide figures; aggregate them with `max`, not `sum`.
pub async fn run_position_reporter(
    target: RedisTarget,
    subs: Vec<Arc<Subscription>>,
    every: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut conn = LazyConn::new(target);
    loop {
        for sub in &subs {
            for stream in &sub.streams {
                let found = match conn.get().await {
                    Ok(c) => position(c, stream, sub.group()).await,
                    Err(e) => Err(e),
                };
                match found {
                    Ok(Some((pending, lag))) => {
                        metrics.consumer_position(stream, sub.group(), pending, lag)
                    }
                    Ok(None) => {}
                    Err(_) => conn.reset(),
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use arc_swap::ArcSwap;

    use super::*;
    use crate::config::{OutboxConfig, Settings};
    use crate::keys::outbox_key;
    use crate::rules::RuleSet;
    use crate::test_redis::TestRedis;

    #[test]
    fn a_slow_batch_sends_the_next_ones_to_the_blocking_pool_until_cheap_ones_bring_the_cost_down()
    {
        let cost = JudgeCost::default();
        assert!(cost.in_place(1) && !cost.in_place(3), "unmeasured");
        cost.judged(1, Duration::from_micros(2));
        assert!(cost.in_place(1), "cheap");
        cost.judged(1, Duration::from_millis(50));
        assert!(!cost.in_place(1), "one slow batch is enough");
        let mut batches = 0;
        while !cost.in_place(1) {
            cost.judged(100, Duration::from_micros(300));
            batches += 1;
        }
        assert!((60..120).contains(&batches), "{batches}");
        for _ in 0..200 {
            cost.judged(100, Duration::from_micros(300));
        }
        assert!(
            cost.in_place(20) && !cost.in_place(100),
            "3 µs an entry: a full batch still goes to the pool"
        );
    }

    const CONFIG: &str =
        "subscriptions:\n  - {name: errs, group: g, streams: [errors], start_id: \"0\"}\n";
    const RULE: &str = "fn on_message(m, c) { if m.errors > 10 { alert(#{ name: \"Errors\", labels: #{ host: m.host } }); } }";

    /// The engine's shared part for one rule on `redis`, in a runtime of
    /// its own (and the rules directory it was loaded from).
    fn shared_on(redis: &TestRedis) -> (tempfile::TempDir, Arc<Shared>, Arc<Subscription>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("errors.rhai"), RULE).unwrap();
        let mut config = Settings::parse(CONFIG, "t").unwrap();
        config.rules_dir = dir.path().to_path_buf();
        let runtime = Runtime::new();
        let engine = runtime.rule_engine(&config.limits);
        let set = RuleSet::load(&engine, dir.path()).unwrap();
        let book = Arc::new(runtime.alert_book(config.alerts.policy));
        let shared = Shared {
            processor: Processor {
                engine,
                rules: Arc::new(ArcSwap::from_pointee(LoadedRules::new(
                    set,
                    &config.subscriptions,
                ))),
                book: book.clone(),
            },
            target: redis.target(),
            store: Store::new(book, config.outbox.prefix.clone(), config.outbox.max_len),
            runtime,
        };
        let sub = Arc::new(config.subscriptions[0].clone());
        (dir, Arc::new(shared), sub)
    }

    #[tokio::test]
    async fn a_worker_step_judges_commits_and_counts_into_its_runtime() {
        let redis = TestRedis::start();
        let (_rules, shared, sub) = shared_on(&redis);
        let mut con = redis.conn();
        let entries: [&[(&str, &str)]; 3] = [
            &[("host", "r1"), ("errors", "50")],
            &[("host", "r2"), ("errors", "1")],
            &[("payload", "{oops")],
        ];
        for fields in entries {
            let _: String = redis::cmd("XADD")
                .arg("errors")
                .arg("*")
                .arg(fields)
                .query(&mut con)
                .unwrap();
        }
        let mut worker = Worker::new(shared.clone(), sub, "c1".into());
        // The first step creates the group and drains our (empty) pending
        // list; the second reads the three entries and commits them.
        for _ in 0..2 {
            worker.step().await.unwrap();
        }
        let pending: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
            .arg("errors")
            .arg("g")
            .query(&mut con)
            .unwrap();
        assert_eq!(pending.0, 0, "all three acknowledged");
        let outbox: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(outbox_key(&OutboxConfig::default().prefix, "errors"))
            .arg("-")
            .arg("+")
            .query(&mut con)
            .unwrap();
        assert_eq!(outbox.len(), 1, "{outbox:?}");
        assert!(outbox[0].1[0].1.contains("\"host\":\"r1\""), "{outbox:?}");
        let dead: u64 = redis::cmd("XLEN")
            .arg("errors:dead")
            .query(&mut con)
            .unwrap();
        assert_eq!(dead, 1);
        let text = shared.runtime.metrics.encode();
        for line in [
            "tripline_messages_total{stream=\"errors\",group=\"g\",outcome=\"processed\"} 2",
            "tripline_messages_total{stream=\"errors\",group=\"g\",outcome=\"dead_lettered\"} 1",
            "tripline_alerts_total{rule=\"errors\",severity=\"warning\",status=\"firing\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }
}
