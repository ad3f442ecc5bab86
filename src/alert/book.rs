//! This instance's cache of the alert state, one partition per stream hash
//! tag: the entries, what generation of Redis they are known to equal, and
//! the gate that orders decisions on them. Deciding applies the pure
//! lifecycle (`alert::lifecycle`) to the cache and yields the notifications,
//! the versioned writes that make them durable and how to undo them;
//! `alert::store` commits them.
//!
//! The truth lives in Redis (one hash per stream hash tag, field =
//! fingerprint, value = `<version>|<json entry>`, see `alert::stored`), so
//! every instance in a group sees the same state. Each instance keeps a
//! cache of it and decides transitions locally; a commit then writes them
//! with compare-and-set on the versions it relied on. If another instance
//! changed one of those entries first, the commit is refused, the cache
//! refreshed and the decisions taken again, so two instances never both
//! notify, and a resolve is never lost because the other instance saw the
//! firing.
//!
//! Checking a version per alert relied on costs Redis a lookup for every
//! assertion, and nearly every assertion is a "nothing to do". So each
//! partition (stream hash tag) also has a generation counter that every
//! state write bumps. While this instance knows its cache of a partition
//! equals Redis at some generation (it read the whole partition then, and
//! only its own commits moved the counter since), a commit checks that one
//! counter instead; when anyone else wrote, the commit is refused as stale
//! and the per-alert checks take over until the next full read.
//!
//! Offline (`test`, `replay`) the same code runs on the cache alone.

use std::collections::{HashMap, HashSet};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};

use super::Alert;
use super::lifecycle::{
    Action, ActionKind, Entry, Phase, Policy, through_silences, watch_is_fresh,
};
use super::silence::ActiveSilences;
use super::stored::{Stored, decode, field, parse_field};
use crate::keys::hash_tag;
use crate::metrics::Metrics;

/// A versioned write of one fingerprint, checked against `expected` at commit.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    /// Stream whose state hash holds this alert (its origin).
    pub stream: String,
    /// Hash field: the fingerprint in hex.
    pub field: String,
    /// Version the decision was based on (0 = absent).
    pub expected: u64,
    /// New `<version>|<json>` value, or `None` to delete.
    pub value: Option<String>,
    /// Only check `expected`, write nothing: the decision to do nothing (a
    /// resolve of an alert believed not firing, a re-assertion within the
    /// repeat interval) rested on the cached version, which another
    /// instance may have changed.
    pub check_only: bool,
}

/// How to undo one cached change if its commit fails.
#[derive(Debug)]
pub struct Transition {
    /// The alert changed.
    fp: u64,
    /// Its cached state before the change, put back by a rollback.
    previous: Cached,
}

#[derive(Debug, Clone, Default)]
struct Cached {
    /// The version Redis holds (0 = absent), which a commit checks.
    version: u64,
    /// The entry; `None` when absent (deleted, or never there).
    entry: Option<Stored>,
    /// The latest deadman assertion this instance judged. The stored `seen`
    /// is only rewritten once it lags by a tenth of the silence (see
    /// [`watch_is_fresh`]), so firing on it alone could be that much early;
    /// kept here, never written, it costs the hot path nothing.
    touched: u64,
}

/// Decisions for a set of actions.
#[derive(Debug, Default)]
pub struct Decision {
    pub notifications: Vec<Alert>,
    /// One write per touched fingerprint (collapsed), for the commit.
    pub writes: Vec<Write>,
    pub undo: Vec<Transition>,
}

/// A partition's entries as read from Redis, decoded. With thousands of
/// alerts decoding takes milliseconds: it happens before any lock that
/// deciding needs is taken.
#[derive(Debug, Default)]
pub struct Snapshot(HashMap<u64, Cached>);

impl Snapshot {
    /// Decodes the `(field, value)` pairs of a state hash; unreadable ones
    /// are skipped (a version of tripline that wrote another format).
    pub fn decode(fields: &[(String, String)]) -> Snapshot {
        Snapshot(
            fields
                .iter()
                .filter_map(|(f, raw)| {
                    let (version, entry) = decode(raw)?;
                    let cached = Cached {
                        version,
                        entry: Some(entry),
                        touched: 0,
                    };
                    Some((parse_field(f)?, cached))
                })
                .collect(),
        )
    }
}

/// The cached state of one partition: the alerts raised from the streams
/// that share a hash tag, which Redis keeps in one hash.
#[derive(Debug, Default)]
struct Partition {
    /// By fingerprint.
    entries: HashMap<u64, Cached>,
    /// The partition's generation (`keys::gen_key`) at which `entries`
    /// equal what Redis holds, if known: set by a full read, advanced by our
    /// own commits, cleared when anyone else wrote or a commit failed.
    synced: Option<u64>,
    /// While a full read of the partition is under way: what this
    /// instance's own commits wrote meanwhile (see [`Overlap`]).
    reading: Option<Overlap>,
}

/// This instance's commits to a partition during a full read of it. A busy
/// instance commits every few milliseconds, so its own commits nearly
/// always land between the two generation reads around the hash's scan:
/// the read could never be trusted, the partition stayed unsynced, and
/// every commit checked a version per alert (a Lua script three times as
/// dear, one `HGET` per alert decided on) until the next read, which was
/// overlapped again. When these commits' steps of the generation chain
/// from the first generation read to the second, nobody else wrote, and
/// the snapshot with the fields they wrote taken from the cache is what
/// Redis holds.
#[derive(Debug, Default)]
struct Overlap {
    written: HashSet<u64>,
    /// The generation each writing commit found and left, in commit order.
    steps: Vec<(u64, u64)>,
}

impl Overlap {
    /// Whether these commits alone took the generation from `before` to
    /// `after`: each found what the one before it left.
    fn explains(&self, before: u64, after: u64) -> bool {
        let mut at = before;
        for &(found, left) in &self.steps {
            if found != at {
                return false;
            }
            at = left;
        }
        at == after
    }
}

#[derive(Debug)]
pub struct AlertBook {
    /// By hash tag: Redis keeps each tag's alert state in one hash.
    parts: Mutex<HashMap<String, Partition>>,
    /// Per partition: held from a decision to the end of its commit (and
    /// around a full read), so decisions on the cache are committed one
    /// after the other. Without it `synced` could not vouch for the cache:
    /// one worker's fast commit would certify another's uncommitted change.
    gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The lifecycle every decision applies.
    policy: Policy,
    /// The silences in force: a firing they mute is withheld, and their
    /// end releases it.
    silences: Arc<ActiveSilences>,
    /// Where withheld notifications are counted.
    metrics: Arc<Metrics>,
}

/// Partition `tag`, created empty on first use.
fn partition<'a>(parts: &'a mut HashMap<String, Partition>, tag: &str) -> &'a mut Partition {
    if !parts.contains_key(tag) {
        parts.insert(tag.to_string(), Partition::default());
    }
    parts.get_mut(tag).expect("inserted")
}

impl AlertBook {
    /// Usually built by [`crate::runtime::Runtime::alert_book`], with the
    /// runtime's silences and metrics.
    pub fn new(policy: Policy, silences: Arc<ActiveSilences>, metrics: Arc<Metrics>) -> Self {
        AlertBook {
            parts: Mutex::new(HashMap::new()),
            gates: Mutex::new(HashMap::new()),
            policy,
            silences,
            metrics,
        }
    }

    fn with_part<T>(&self, tag: &str, f: impl FnOnce(&mut Partition) -> T) -> T {
        let mut parts = self.parts.lock().expect("alert book poisoned");
        f(partition(&mut parts, tag))
    }

    /// The lock a decision on partition `tag` holds until it is committed.
    pub fn gate(&self, tag: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self.gates.lock().expect("alert book poisoned");
        gates.entry(tag.to_string()).or_default().clone()
    }

    /// Where the lifecycle counts what silences withheld, and what the
    /// store that settles its decisions counts too.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Partitions this instance holds state of.
    pub fn tags(&self) -> Vec<String> {
        let parts = self.parts.lock().expect("alert book poisoned");
        parts.keys().cloned().collect()
    }

    /// The stored JSON of the pending and firing alerts of partition `tag`,
    /// if the cache is known to equal what Redis holds at `generation`:
    /// the gauge of active alerts counts these instead of reading the
    /// whole state hash over the network every few seconds (with 50,000
    /// alerts that took Redis and this process long enough to triple the
    /// p99 latency of the readings judged meanwhile).
    pub fn active(&self, tag: &str, generation: u64) -> Option<Vec<Arc<str>>> {
        let parts = self.parts.lock().expect("alert book poisoned");
        let p = parts.get(tag).filter(|p| p.synced == Some(generation))?;
        Some(
            p.entries
                .values()
                .filter_map(|c| c.entry.as_ref())
                .filter(|s| matches!(s.head.phase, Phase::Pending | Phase::Firing))
                .map(|s| s.json.clone())
                .collect(),
        )
    }

    /// The generation at which the cache of `tag` is known to equal Redis.
    pub fn synced(&self, tag: &str) -> Option<u64> {
        self.with_part(tag, |p| p.synced)
    }

    /// After a commit of `writes` to `tag` based on the generation
    /// `based_on` (if it checked one), which took the generation from
    /// `steps.start()` to `steps.end()`: the cache stays known-equal only if
    /// it was before. A full read under way notes what the commit wrote.
    pub fn committed(
        &self,
        tag: &str,
        based_on: Option<u64>,
        steps: RangeInclusive<u64>,
        writes: &[Write],
    ) {
        self.with_part(tag, |p| {
            p.synced = based_on.map(|_| *steps.end());
            if let Some(o) = &mut p.reading {
                // The commit script moves the generation when it writes.
                let mut wrote = false;
                for w in writes.iter().filter(|w| !w.check_only) {
                    wrote = true;
                    o.written.extend(parse_field(&w.field));
                }
                if wrote {
                    o.steps.push(steps.into_inner());
                }
            }
        });
    }

    /// A full read of `tag` begins: from now until [`Self::load_partition`]
    /// (or [`Self::read_failed`]) this instance's commits there are noted.
    pub fn begin_read(&self, tag: &str) {
        self.with_part(tag, |p| p.reading = Some(Overlap::default()));
    }

    /// The full read of `tag` begun with [`Self::begin_read`] failed.
    pub fn read_failed(&self, tag: &str) {
        self.with_part(tag, |p| p.reading = None);
    }

    /// Someone else wrote `tag`, a commit's outcome is unknown, or the
    /// cache was changed without a commit: a full read under way can no
    /// longer be explained by this instance's commits either.
    pub fn unsync(&self, tag: &str) {
        self.with_part(tag, |p| {
            p.synced = None;
            p.reading = None;
        });
    }

    /// True when a deadman assertion on `fp` at `now` would only confirm a
    /// fresh watch ([`Self::is_noop`]), so the rule need not build its alert.
    pub fn is_watched(&self, stream: &str, fp: u64, after_ms: u64, now: u64) -> bool {
        let parts = self.parts.lock().expect("alert book poisoned");
        parts
            .get(hash_tag(stream))
            .and_then(|p| p.entries.get(&fp))
            .and_then(|c| c.entry.as_ref())
            .is_some_and(|Stored { head: e, .. }| {
                e.phase == Phase::Watching && watch_is_fresh(e.seen, e.deadman_ms, after_ms, now)
            })
    }

    /// Applies `actions` (raised from `stream`) in order to the cached state;
    /// returns the notifications and the versioned writes that make them
    /// durable. With `checks`, also a check-only write for every alert a
    /// decision to do nothing rested on; without, only the changes (for a
    /// commit that checks the partition's generation instead).
    pub fn decide(&self, stream: &str, actions: &[Action], checks: bool) -> Decision {
        let mut parts = self.parts.lock().expect("alert book poisoned");
        let cache = &mut partition(&mut parts, hash_tag(stream)).entries;
        let mut d = Decision::default();
        let mut first_version: HashMap<u64, u64> = HashMap::new();
        for a in actions {
            if let ActionKind::Deadman { .. } = a.kind
                && let Some(c) = cache.get_mut(&a.fp)
            {
                c.touched = c.touched.max(a.now_ms);
            }
            let cached = cache.get(&a.fp);
            if checks {
                first_version
                    .entry(a.fp)
                    .or_insert(cached.map_or(0, |c| c.version));
            }
            // Most assertions change nothing (a resolve of a quiet alert, a
            // re-assertion within the repeat interval): decided without
            // copying the entry.
            if self.policy.is_noop(
                cached.and_then(|c| c.entry.as_ref()).map(|s| &s.head),
                a,
                &self.silences,
            ) {
                continue;
            }
            let cur = cached.cloned().unwrap_or_default();
            let before = cur.entry.as_ref().map(Stored::entry);
            let was_muted = before.as_ref().is_some_and(|e| e.muted != 0);
            let (mut next, note) = self.policy.step(before.clone(), a, &self.silences);
            let note = through_silences(
                &self.silences,
                &self.metrics,
                next.as_mut(),
                was_muted,
                note,
                a.now_ms,
            );
            if next == before && note.is_none() {
                continue;
            }
            cache.insert(
                a.fp,
                Cached {
                    version: cur.version + 1,
                    entry: next.as_ref().map(Stored::of),
                    touched: match a.kind {
                        ActionKind::Deadman { .. } => cur.touched.max(a.now_ms),
                        _ => cur.touched,
                    },
                },
            );
            first_version.entry(a.fp).or_insert(cur.version);
            d.undo.push(Transition {
                fp: a.fp,
                previous: cur,
            });
            if let Some(n) = note {
                d.notifications.push(n);
            }
        }
        for (fp, expected) in first_version {
            let now = cache.get(&fp);
            let version = now.map_or(0, |c| c.version);
            let check_only = version == expected;
            d.writes.push(Write {
                stream: stream.to_string(),
                field: field(fp),
                expected,
                value: (!check_only)
                    .then(|| {
                        now.and_then(|c| c.entry.as_ref())
                            .map(|s| s.encode(version))
                    })
                    .flatten(),
                check_only,
            });
        }
        d.writes.sort_by(|a, b| a.field.cmp(&b.field));
        d
    }

    /// Timer-driven transitions at `now` in every partition (offline use).
    pub fn due(&self, now: u64) -> Decision {
        let mut d = Decision::default();
        for tag in self.tags() {
            let part = self.due_in(&tag, now);
            d.notifications.extend(part.notifications);
            d.writes.extend(part.writes);
            d.undo.extend(part.undo);
        }
        d
    }

    /// Timer-driven transitions at `now` in partition `tag` (see
    /// [`Policy::on_timer`]).
    pub fn due_in(&self, tag: &str, now: u64) -> Decision {
        // Runs every timer tick under the lock the workers' `decide` needs:
        // clone only the entries that are due, not the whole partition.
        let silences = self.silences.active();
        let candidates: Vec<(u64, Stored, u64)> = {
            let parts = self.parts.lock().expect("alert book poisoned");
            let Some(part) = parts.get(tag) else {
                return Decision::default();
            };
            part.entries
                .iter()
                .filter_map(|(fp, c)| c.entry.as_ref().map(|s| (*fp, s, c.touched)))
                .filter(|(_, s, touched)| self.policy.timer_due(&s.head, *touched, &silences, now))
                .map(|(fp, s, touched)| (fp, s.clone(), touched))
                .collect()
        };
        let mut parts = self.parts.lock().expect("alert book poisoned");
        let Some(cache) = parts.get_mut(tag).map(|p| &mut p.entries) else {
            return Decision::default();
        };
        let mut d = Decision::default();
        for (fp, stored, touched) in candidates {
            let Some(cur) = cache.get(&fp).cloned() else {
                continue;
            };
            if cur.entry.as_ref() != Some(&stored) {
                continue;
            }
            let touched = touched.max(cur.touched);
            let e = stored.entry();
            let stream = e.alert.origin.stream.clone();
            let (mut next, note) = self
                .policy
                .on_timer(e, &stored.head, touched, &silences, now);
            let note = through_silences(
                &self.silences,
                &self.metrics,
                next.as_mut(),
                stored.head.muted != 0,
                note,
                now,
            );
            d.undo.push(Transition {
                fp,
                previous: cur.clone(),
            });
            let version = cur.version + 1;
            let next = next.as_ref().map(Stored::of);
            d.writes.push(Write {
                stream,
                field: field(fp),
                expected: cur.version,
                value: next.as_ref().map(|s| s.encode(version)),
                check_only: false,
            });
            cache.insert(
                fp,
                Cached {
                    version,
                    entry: next,
                    touched,
                },
            );
            if let Some(n) = note {
                d.notifications.push(n);
            }
        }
        d
    }

    /// Undoes cached changes of partition `tag`, newest first, after their
    /// commit failed.
    pub fn rollback(&self, tag: &str, undo: Vec<Transition>) {
        self.with_part(tag, |p| {
            for t in undo.into_iter().rev() {
                p.entries.insert(t.fp, t.previous);
            }
        });
    }

    /// Replaces cached entries of partition `tag` with what Redis holds
    /// (`None` = absent).
    pub fn refresh(&self, tag: &str, fields: Vec<(String, Option<String>)>) {
        let fresh: Vec<(u64, Cached)> = fields
            .into_iter()
            .filter_map(|(f, raw)| {
                let cached = match raw.as_deref().and_then(decode) {
                    Some((version, entry)) => Cached {
                        version,
                        entry: Some(entry),
                        touched: 0,
                    },
                    None => Cached::default(),
                };
                Some((parse_field(&f)?, cached))
            })
            .collect();
        self.with_part(tag, |p| {
            for (fp, mut c) in fresh {
                c.touched = p.entries.get(&fp).map_or(0, |old| old.touched);
                p.entries.insert(fp, c);
            }
        });
    }

    /// Replaces what is cached for partition `tag` with `snapshot`, what
    /// Redis holds there: picks up alerts other instances raised (so this
    /// instance's timers cover them) and forgets deleted ones. The
    /// partition's generation was `before` when the read began ([`Self::begin_read`]) and
    /// `after` once it ended (read under the gate, so no decision of ours
    /// is in flight). If only this instance's own commits came between
    /// ([`Overlap`]), the snapshot is brought up to date with the fields
    /// they wrote and the partition is synced at `after`. Otherwise the
    /// snapshot may predate a commit (a deadman watch created meanwhile
    /// would be forgotten, and fire only after the next full read, 15 s
    /// late): a cached entry the snapshot lacks or holds at a lower version
    /// is kept. The partition is then unsynced, so every commit checks the
    /// versions of what it decided on and a kept entry another instance
    /// deleted is corrected there. Returns the replaced entries, for the
    /// caller to drop outside its locks.
    pub fn load_partition(
        &self,
        tag: &str,
        snapshot: Snapshot,
        before: u64,
        after: u64,
    ) -> Snapshot {
        let mut entries = snapshot.0;
        self.with_part(tag, |p| {
            let overlap = p.reading.take();
            let generation = if before == after {
                Some(after)
            } else if let Some(o) = overlap.filter(|o| o.explains(before, after)) {
                for fp in &o.written {
                    match p.entries.get(fp) {
                        Some(c) => entries.insert(*fp, c.clone()),
                        None => entries.remove(fp),
                    };
                }
                Some(after)
            } else {
                None
            };
            p.synced = generation;
            let mut replaced = HashMap::new();
            for (fp, old) in std::mem::take(&mut p.entries) {
                match entries.get_mut(&fp) {
                    Some(c) if generation.is_some() || c.version >= old.version => {
                        // What this instance judged but did not write outlives the read.
                        c.touched = old.touched;
                        replaced.insert(fp, old);
                    }
                    _ if generation.is_some() => {
                        replaced.insert(fp, old);
                    }
                    _ => {
                        entries.insert(fp, old);
                    }
                }
            }
            p.entries = entries;
            Snapshot(replaced)
        })
    }

    /// Drops the state of partition `tag` that belongs to rules that no
    /// longer exist; returns the resolved notifications of their firing
    /// alerts and the writes that delete them.
    pub fn forget_rules(&self, tag: &str, removed: &[String], now: u64) -> Decision {
        let mut d = Decision::default();
        self.with_part(tag, |p| {
            let cache = &mut p.entries;
            // Decoding every entry to read its rule would take seconds with
            // many alerts: only those whose JSON names a removed rule are.
            let named: Vec<String> = removed
                .iter()
                .map(|r| serde_json::to_string(r).expect("strings serialize"))
                .collect();
            let doomed: Vec<(u64, Entry)> = cache
                .iter()
                .filter_map(|(fp, c)| {
                    let s = c.entry.as_ref()?;
                    if !named.iter().any(|n| s.json.contains(n.as_str())) {
                        return None;
                    }
                    let e = s.entry();
                    removed.contains(&e.alert.rule).then_some((*fp, e))
                })
                .collect();
            for (fp, mut e) in doomed {
                let cur = cache.remove(&fp).expect("listed");
                if e.phase == Phase::Firing
                    && e.muted == 0
                    && let Some(n) = self.policy.resolved(&mut e, now)
                {
                    d.notifications.push(n);
                }
                d.writes.push(Write {
                    stream: e.alert.origin.stream.clone(),
                    field: field(fp),
                    expected: cur.version,
                    value: None,
                    check_only: false,
                });
                d.undo.push(Transition { fp, previous: cur });
            }
        });
        d
    }

    #[cfg(test)]
    fn firing_count(&self) -> usize {
        self.parts
            .lock()
            .expect("alert book poisoned")
            .values()
            .flat_map(|p| p.entries.values())
            .filter(|c| {
                c.entry
                    .as_ref()
                    .is_some_and(|s| s.head.phase == Phase::Firing)
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::super::lifecycle::tests::{MIN, act, fire, policy};
    use super::super::{Severity, Status};
    use super::*;
    use crate::runtime::Runtime;

    fn notes(book: &AlertBook, a: Action) -> Vec<Status> {
        book.decide("s", &[a], true)
            .notifications
            .iter()
            .map(|n| n.status)
            .collect()
    }

    #[test]
    fn fires_once_then_repeats_after_interval() {
        let book = Runtime::new().alert_book(policy());
        assert_eq!(notes(&book, fire(0, 0)), [Status::Firing]);
        assert!(notes(&book, fire(0, 59 * MIN)).is_empty());
        assert_eq!(notes(&book, fire(0, 60 * MIN)), [Status::Firing]);
    }

    #[test]
    fn for_holds_until_elapsed_and_never_fires_if_cleared_first() {
        let book = Runtime::new().alert_book(policy());
        assert!(notes(&book, fire(5 * MIN, 0)).is_empty());
        assert!(notes(&book, fire(5 * MIN, 4 * MIN)).is_empty());
        assert!(notes(&book, act(ActionKind::Resolve, 4 * MIN + 1)).is_empty());
        // Starts over: 5 more minutes needed.
        assert!(notes(&book, fire(5 * MIN, 6 * MIN)).is_empty());
        assert!(notes(&book, fire(5 * MIN, 10 * MIN)).is_empty());
        assert_eq!(notes(&book, fire(5 * MIN, 11 * MIN)), [Status::Firing]);
    }

    #[test]
    fn resolve_only_when_firing() {
        let book = Runtime::new().alert_book(policy());
        assert!(notes(&book, act(ActionKind::Resolve, 0)).is_empty());
        notes(&book, fire(0, 1));
        assert_eq!(
            notes(&book, act(ActionKind::Resolve, 2)),
            [Status::Resolved]
        );
        assert!(notes(&book, act(ActionKind::Resolve, 3)).is_empty());
    }

    #[test]
    fn severity_change_notifies_at_once() {
        let book = Runtime::new().alert_book(policy());
        notes(&book, fire(0, 0));
        let mut worse = fire(0, 1);
        worse.alert.as_mut().unwrap().severity = Severity::Critical;
        assert_eq!(notes(&book, worse), [Status::Firing]);
    }

    #[test]
    fn auto_resolve_after_silence() {
        let book = Runtime::new().alert_book(Policy {
            resolve_after_ms: 5 * MIN,
            ..policy()
        });
        notes(&book, fire(0, 0));
        assert!(book.due(4 * MIN).notifications.is_empty());
        let d = book.due(5 * MIN);
        assert_eq!(d.notifications[0].status, Status::Resolved);
        assert_eq!(book.firing_count(), 0);
    }

    #[test]
    fn deadman_fires_after_silence_and_resolves_when_series_returns() {
        let book = Runtime::new().alert_book(policy());
        let watch = |now| act(ActionKind::Deadman { after_ms: 10 * MIN }, now);
        assert!(notes(&book, watch(0)).is_empty());
        assert!(book.due(9 * MIN).notifications.is_empty());
        assert_eq!(book.due(10 * MIN).notifications[0].status, Status::Firing);
        assert!(book.due(11 * MIN).notifications.is_empty());
        assert_eq!(notes(&book, watch(12 * MIN)), [Status::Resolved]);
    }

    #[test]
    fn a_full_read_that_raced_a_commit_keeps_the_watch_the_commit_created() {
        let book = Runtime::new().alert_book(policy());
        let watch = |now| act(ActionKind::Deadman { after_ms: 10 * MIN }, now);
        // Read before the watch was committed, generation moved meanwhile.
        let stale = Snapshot::default();
        notes(&book, watch(0));
        drop(book.load_partition("s", stale, 6, 7));
        assert_eq!(book.due(10 * MIN).notifications[0].status, Status::Firing);
        // A read nothing raced is what Redis holds: the watch is gone there.
        let book = Runtime::new().alert_book(policy());
        notes(&book, watch(0));
        drop(book.load_partition("s", Snapshot::default(), 7, 7));
        assert!(book.due(10 * MIN).notifications.is_empty());
    }

    #[test]
    fn a_full_read_overlapped_by_its_own_commits_alone_is_synced_with_what_they_wrote() {
        let book = Runtime::new().alert_book(policy());
        let watch = |now| act(ActionKind::Deadman { after_ms: 10 * MIN }, now);
        book.begin_read("s");
        // The scan read the partition empty; then this instance committed
        // a new watch, which took the generation from 7 to 8.
        let d = book.decide("s", &[watch(0)], true);
        book.committed("s", None, 7..=8, &d.writes);
        drop(book.load_partition("s", Snapshot::default(), 7, 8));
        assert_eq!(book.synced("s"), Some(8), "nobody else wrote");
        // The first write ever seeds the generation at random: from
        // absent (0), any number is this commit's step.
        let book = Runtime::new().alert_book(policy());
        book.begin_read("s");
        let d = book.decide("s", &[watch(0)], true);
        book.committed("s", None, 0..=8_123_457, &d.writes);
        drop(book.load_partition("s", Snapshot::default(), 0, 8_123_457));
        assert_eq!(book.synced("s"), Some(8_123_457));
        assert_eq!(book.due(10 * MIN).notifications[0].status, Status::Firing);
    }

    #[test]
    fn a_full_read_that_another_writer_overlapped_stays_unsynced() {
        let book = Runtime::new().alert_book(policy());
        let watch = |now| act(ActionKind::Deadman { after_ms: 10 * MIN }, now);
        book.begin_read("s");
        let d = book.decide("s", &[watch(0)], true);
        book.committed("s", None, 8..=9, &d.writes);
        // 7 -> 9: the step to 8 was somebody else's.
        drop(book.load_partition("s", Snapshot::default(), 7, 9));
        assert_eq!(book.synced("s"), None);
        assert_eq!(
            book.due(10 * MIN).notifications[0].status,
            Status::Firing,
            "the watch is kept all the same"
        );
        // A commit that only checked versions moved nothing: it does not
        // count as a step.
        book.begin_read("s");
        let check = Write {
            stream: "s".into(),
            field: field(1),
            expected: 1,
            value: None,
            check_only: true,
        };
        book.committed("s", None, 8..=8, &[check]);
        drop(book.load_partition("s", Snapshot::default(), 8, 9));
        assert_eq!(book.synced("s"), None);
    }

    #[test]
    fn a_cache_changed_without_a_commit_during_a_full_read_stays_unsynced() {
        let book = Runtime::new().alert_book(policy());
        let watch = |now| act(ActionKind::Deadman { after_ms: 10 * MIN }, now);
        book.begin_read("s");
        let d = book.decide("s", &[watch(0)], true);
        book.committed("s", None, 7..=8, &d.writes);
        // forget_here: the cache drops what Redis still holds.
        book.unsync("s");
        drop(book.load_partition("s", Snapshot::default(), 7, 8));
        assert_eq!(book.synced("s"), None);
    }

    #[test]
    fn the_active_alerts_are_listed_only_from_a_cache_equal_to_redis() {
        let book = Runtime::new().alert_book(policy());
        notes(&book, fire(0, 0));
        assert_eq!(book.active("s", 7), None, "never synced");
        book.committed("s", Some(7), 7..=8, &[]);
        let active = book.active("s", 8).expect("synced at 8");
        assert_eq!(active.len(), 1);
        assert!(
            active[0].starts_with(r#"{"phase":"firing""#),
            "{}",
            active[0]
        );
        assert_eq!(book.active("s", 9), None, "Redis moved on");
        // A deadman watch is not an alert.
        book.decide(
            "t",
            &[act(ActionKind::Deadman { after_ms: 10 * MIN }, 0)],
            true,
        );
        book.committed("t", Some(1), 1..=2, &[]);
        assert_eq!(book.active("t", 2), Some(Vec::new()));
    }

    #[test]
    fn flapping_alert_is_held() {
        let book = Runtime::new().alert_book(Policy {
            flap_max_changes: 4,
            ..policy()
        });
        let mut sent = 0;
        for i in 0..10 {
            sent += notes(&book, fire(0, i * 1000)).len();
            sent += notes(&book, act(ActionKind::Resolve, i * 1000 + 500)).len();
        }
        assert_eq!(sent, 4, "only the changes before flapping are notified");
        // A change that finds its window quiet does not end the hold.
        assert!(notes(&book, fire(0, 9 * MIN)).is_empty());
        assert!(book.due(9 * MIN + 1).notifications.is_empty());
        // Settled for a whole window: the timer sends where it stands, once.
        let released = book.due(19 * MIN).notifications;
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].status, Status::Firing);
        assert!(book.due(30 * MIN).notifications.is_empty());
        assert_eq!(
            notes(&book, act(ActionKind::Resolve, 31 * MIN)),
            [Status::Resolved]
        );
    }

    #[test]
    fn a_pending_alert_fires_by_the_timer_and_is_never_dropped_for_quiet() {
        let book = Runtime::new().alert_book(policy());
        assert!(notes(&book, fire(30_000, 0)).is_empty());
        assert!(book.due(29_999).notifications.is_empty());
        assert_eq!(book.due(30_000).notifications[0].status, Status::Firing);
        // Readings 91 s apart: the second finds it firing already.
        assert!(notes(&book, fire(30_000, 91_000)).is_empty());
        assert_eq!(book.firing_count(), 1);
    }

    #[test]
    fn deadman_fires_on_the_last_reading_not_the_coalesced_one() {
        let book = Runtime::new().alert_book(policy());
        let watch = |now| act(ActionKind::Deadman { after_ms: 10 * MIN }, now);
        notes(&book, watch(0));
        // Within a tenth of the silence: nothing written, but judged.
        notes(&book, watch(MIN / 2));
        assert!(book.due(10 * MIN).notifications.is_empty());
        assert!(book.due(10 * MIN + MIN / 2 - 1).notifications.is_empty());
        assert_eq!(
            book.due(10 * MIN + MIN / 2).notifications[0].status,
            Status::Firing
        );
    }

    #[test]
    fn writes_carry_versions_and_rollback_restores() {
        let book = Runtime::new().alert_book(policy());
        let d = book.decide(
            "s",
            &[fire(0, 0), act(ActionKind::Resolve, 1), fire(0, 2)],
            true,
        );
        assert_eq!(d.notifications.len(), 3);
        assert_eq!(d.writes.len(), 1, "collapsed per fingerprint");
        assert!(!d.writes[0].check_only);
        assert_eq!(d.writes[0].expected, 0);
        assert!(d.writes[0].value.as_ref().unwrap().starts_with("3|"));
        book.rollback("s", d.undo);
        assert_eq!(book.firing_count(), 0);
        // What another instance wrote replaces the cache.
        let other = book.decide("s", &[fire(0, 0)], true);
        book.rollback("s", other.undo);
        book.refresh("s", vec![(field(1), other.writes[0].value.clone())]);
        assert!(
            notes(&book, fire(0, 5)).is_empty(),
            "already firing elsewhere"
        );
    }

    #[test]
    fn doing_nothing_is_checked_too() {
        let book = Runtime::new().alert_book(policy());
        let d = book.decide("s", &[act(ActionKind::Resolve, 0)], true);
        assert!(d.notifications.is_empty());
        assert_eq!(d.writes.len(), 1);
        assert!(
            d.writes[0].check_only,
            "a stale 'not firing' must be caught"
        );
        assert_eq!(d.writes[0].expected, 0);
    }

    #[test]
    fn without_checks_only_changes_are_written() {
        let book = Runtime::new().alert_book(policy());
        let d = book.decide("s", &[act(ActionKind::Resolve, 0)], false);
        assert!(d.writes.is_empty());
        let d = book.decide("s", &[fire(0, 1), act(ActionKind::Resolve, 2)], false);
        assert_eq!(d.writes.len(), 1);
        assert_eq!(d.writes[0].expected, 0);
        assert_eq!(d.writes[0].value, None, "fired then resolved: deleted");
    }

    #[test]
    fn partitions_are_separate_and_sync_follows_own_commits() {
        let book = Runtime::new().alert_book(policy());
        assert_eq!(notes(&book, fire(0, 0)), [Status::Firing]);
        // The same identity raised from a stream of another hash tag has
        // its own lifecycle.
        let other = book.decide("t", &[fire(0, 1)], true);
        assert_eq!(other.notifications.len(), 1);
        assert_eq!(book.synced("s"), None);
        book.load_partition("s", Snapshot::default(), 7, 7);
        assert_eq!(book.synced("s"), Some(7));
        book.committed("s", Some(7), 7..=8, &[]);
        assert_eq!(book.synced("s"), Some(8));
        book.committed("s", None, 8..=9, &[]);
        assert_eq!(
            book.synced("s"),
            None,
            "a version-checked commit proves nothing"
        );
        assert_eq!(book.synced("t"), None);
    }

    #[test]
    fn a_deadman_without_its_alert_refreshes_but_never_creates() {
        let book = Runtime::new().alert_book(policy());
        let bare = |now| Action {
            alert: None,
            ..act(ActionKind::Deadman { after_ms: 10 * MIN }, now)
        };
        assert!(book.decide("s", &[bare(0)], false).writes.is_empty());
        assert!(!book.is_watched("s", 1, 10 * MIN, 0));
        book.decide(
            "s",
            &[act(ActionKind::Deadman { after_ms: 10 * MIN }, 0)],
            false,
        );
        assert!(book.is_watched("s", 1, 10 * MIN, MIN / 2));
        assert!(!book.is_watched("s", 1, 10 * MIN, 2 * MIN), "due a refresh");
        assert!(
            !book.is_watched("t", 1, 10 * MIN, MIN / 2),
            "other partition"
        );
        assert_eq!(book.decide("s", &[bare(2 * MIN)], false).writes.len(), 1);
        assert!(book.is_watched("s", 1, 10 * MIN, 2 * MIN + MIN / 2));
    }

    #[test]
    fn forgetting_a_rule_resolves_its_alerts() {
        let book = Runtime::new().alert_book(policy());
        notes(&book, fire(0, 0));
        let d = book.forget_rules("s", &["r".to_string()], 10);
        assert_eq!(d.notifications[0].status, Status::Resolved);
        assert_eq!(d.writes[0].value, None);
        assert_eq!(book.firing_count(), 0);
    }
}
