//! The alert lifecycle: pending (`for`) → firing → resolved, repeat
//! intervals, auto-resolve, deadman watches and flap holding.
//!
//! The truth lives in Redis (one hash per stream hash tag, field =
//! fingerprint, value = `<version>|<json entry>`), so every instance in a
//! group sees the same state. Each instance keeps a cache of it and decides
//! transitions locally; a commit then writes them with compare-and-set on the
//! versions it relied on (see `outbox::commit`). If another instance changed
//! one of those entries first, the commit is refused, the cache refreshed and
//! the decisions taken again, so two instances never both notify, and a
//! resolve is never lost because the other instance saw the firing.
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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::silence::{self, Silences};
use super::{Alert, Severity, Status};
use crate::keys::hash_tag;
use crate::metrics;
use crate::process::rfc3339;

/// Lifecycle policy shared by every alert.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// A firing alert is re-notified at most this often.
    pub repeat_ms: u64,
    /// An alert not re-asserted for this long resolves by itself; 0 = never.
    pub resolve_after_ms: u64,
    /// More state changes than this within `flap_window_ms` hold
    /// notifications until the alert settles; 0 = no flap detection.
    pub flap_max_changes: u32,
    pub flap_window_ms: u64,
}

/// What a rule asked for about one alert identity.
#[derive(Debug, Clone, PartialEq)]
pub enum ActionKind {
    /// Condition holds; fire after it has held `for_ms`. `resolve_after_ms`
    /// overrides the policy when set.
    Fire {
        for_ms: u64,
        resolve_after_ms: Option<u64>,
    },
    /// Condition cleared.
    Resolve,
    /// The series reported; fire if it then stays silent for `after_ms`.
    Deadman { after_ms: u64 },
}

/// One assertion from one message.
#[derive(Debug, Clone)]
pub struct Action {
    pub fp: u64,
    pub kind: ActionKind,
    /// The alert as the rule described it (status firing; `starts_at` is
    /// replaced by the lifecycle). Always there for `Fire`; for `Resolve`
    /// only when `resolve()` gave text of its own, which replaces the
    /// stored alert's annotations (else the lifecycle resolves the alert it
    /// stored, firing text and all); for `Deadman`
    /// only when the watch was missing or due a refresh when judged
    /// ([`AlertBook::is_watched`]). Building an alert costs more than most
    /// rules, and nearly every assertion changes nothing.
    pub alert: Option<Alert>,
    pub now_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Phase {
    /// Condition holds, `for` not yet elapsed.
    Pending,
    Firing,
    /// A deadman watch whose series is reporting.
    Watching,
    /// Resolved, kept only while flap detection needs its history.
    Resolved,
}

/// The persisted state of one alert identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    phase: Phase,
    /// When the condition started holding (pending) or the alert fired.
    since: u64,
    /// Last notification sent.
    notified: u64,
    /// Last assertion seen.
    seen: u64,
    /// `for` duration of a pending alert.
    #[serde(default)]
    for_ms: u64,
    /// Auto-resolve delay of this alert (0 = never).
    #[serde(default)]
    resolve_after_ms: u64,
    /// Deadman: silence allowed before firing.
    #[serde(default)]
    deadman_ms: u64,
    /// Timestamps of recent state changes, for flap detection.
    #[serde(default)]
    changes: Vec<u64>,
    /// Notifications are held because the alert flaps.
    #[serde(default)]
    held: bool,
    /// The silence ([`silence::id_hash`]) that withheld the last firing
    /// notification, 0 if it was sent. No sink has then seen the alert
    /// fire: its resolve is withheld too, and the end of the silence sends
    /// the firing (Alertmanager's semantics).
    #[serde(default)]
    muted: u64,
    alert: Alert,
}

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
    fp: u64,
    previous: Cached,
}

#[derive(Debug, Clone, Default)]
struct Cached {
    version: u64,
    entry: Option<Stored>,
    /// The latest deadman assertion this instance judged. The stored `seen`
    /// is only rewritten once it lags by a tenth of the silence (see
    /// [`watch_is_fresh`]), so firing on it alone could be that much early;
    /// kept here, never written, it costs the hot path nothing.
    touched: u64,
}

/// What deciding most assertions and finding due timers reads of an entry.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Head {
    phase: Phase,
    /// When a pending alert's `for` started: the timer fires it at `since + for_ms`.
    since: u64,
    notified: u64,
    seen: u64,
    for_ms: u64,
    resolve_after_ms: u64,
    deadman_ms: u64,
    held: bool,
    muted: u64,
    /// The latest of `changes`.
    last_change: Option<u64>,
    severity: Severity,
}

impl Head {
    fn of(e: &Entry) -> Head {
        Head {
            phase: e.phase,
            since: e.since,
            notified: e.notified,
            seen: e.seen,
            for_ms: e.for_ms,
            resolve_after_ms: e.resolve_after_ms,
            deadman_ms: e.deadman_ms,
            held: e.held,
            muted: e.muted,
            last_change: e.changes.last().copied(),
            severity: e.alert.severity,
        }
    }
}

/// An entry as cached: its head decoded, the whole kept as the JSON Redis
/// holds and decoded only for a transition. Every router has a deadman
/// watch: kept decoded, an entry (an alert with two small B-trees and a
/// dozen strings) takes about 2 KB; as JSON about 0.4 KB.
#[derive(Debug, Clone, PartialEq)]
struct Stored {
    head: Head,
    json: Box<str>,
}

impl Stored {
    fn of(e: &Entry) -> Stored {
        Stored {
            head: Head::of(e),
            json: serde_json::to_string(e).expect("entries serialize").into(),
        }
    }

    /// Reads what [`Stored::of`] or Redis (checked by [`decode`]) wrote.
    fn entry(&self) -> Entry {
        serde_json::from_str(&self.json).expect("cached entries were decoded once already")
    }

    /// `<version>|<json>`, the value Redis holds.
    fn encode(&self, version: u64) -> String {
        format!("{version}|{}", self.json)
    }
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
    entries: HashMap<u64, Cached>,
    /// The partition's generation (`keys::gen_key`) at which `entries`
    /// equal what Redis holds, if known: set by a full read, advanced by our
    /// own commits, cleared when anyone else wrote or a commit failed.
    synced: Option<u64>,
}

#[derive(Debug)]
pub struct AlertBook {
    parts: Mutex<HashMap<String, Partition>>,
    /// Per partition: held from a decision to the end of its commit (and
    /// around a full read), so decisions on the cache are committed one
    /// after the other. Without it `synced` could not vouch for the cache:
    /// one worker's fast commit would certify another's uncommitted change.
    gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    policy: Policy,
}

pub fn field(fp: u64) -> String {
    format!("{fp:016x}")
}

fn parse_field(f: &str) -> Option<u64> {
    u64::from_str_radix(f, 16).ok()
}

fn decode(raw: &str) -> Option<(u64, Stored)> {
    let (v, json) = raw.split_once('|')?;
    let entry: Entry = serde_json::from_str(json).ok()?;
    let stored = Stored {
        head: Head::of(&entry),
        json: json.into(),
    };
    Some((v.parse().ok()?, stored))
}

/// Partition `tag`, created empty on first use.
fn partition<'a>(parts: &'a mut HashMap<String, Partition>, tag: &str) -> &'a mut Partition {
    if !parts.contains_key(tag) {
        parts.insert(tag.to_string(), Partition::default());
    }
    parts.get_mut(tag).expect("inserted")
}

/// Whether a deadman watch last seen at `seen` needs no write for a silence
/// of `after_ms` asserted at `now`: the new deadline is written only when it
/// moved by a tenth of the window, one write per series per window/10 rather
/// than per message.
fn watch_is_fresh(seen: u64, deadman_ms: u64, after_ms: u64, now: u64) -> bool {
    now.saturating_sub(seen) * 10 < after_ms && deadman_ms == after_ms
}

/// Whether a deadman watch has been silent for its whole silence at `now`,
/// counted from the latest reading known here: the stored `seen`, or a
/// later one this instance judged but did not write (`touched`).
fn watch_expired(e: &Head, touched: u64, now: u64) -> bool {
    now.saturating_sub(e.seen.max(touched)) >= e.deadman_ms
}

/// Whether this instance must write the later reading it judged (`touched`)
/// to a watch: half the silence has passed since the stored `seen`. Readings
/// still flowing would have been written by then (every tenth of the
/// silence), so this happens about once when a series stops reporting, and
/// long before another instance could fire on the stored `seen`.
fn must_publish(e: &Head, touched: u64, now: u64) -> bool {
    touched > e.seen && now.saturating_sub(e.seen) * 2 >= e.deadman_ms
}

/// Whether the silence `muted` names ([`silence::id_hash`], 0 = none) has
/// ended by `now`: reads the silences only for an alert one withheld.
fn released(muted: u64, now: u64) -> bool {
    muted != 0 && !silence::active().in_force(muted, now)
}

/// Whether a firing alert's firing was withheld by a silence that is no
/// longer in force at `now`.
fn unmuted(e: &Head, silences: &Silences, now: u64) -> bool {
    e.phase == Phase::Firing && e.muted != 0 && !silences.in_force(e.muted, now)
}

/// Silences as Alertmanager applies them, kept in the alert's state so that
/// every instance and every sink agrees: a firing notification a silence
/// mutes is withheld and remembered in `next` (the silence's end sends it,
/// see [`AlertBook::due_in`]); the resolve of an alert whose firing was
/// withheld (`was_muted`) is withheld too, so no sink hears of a resolve of
/// a firing it never got. Anything else passes.
fn through_silences(
    next: Option<&mut Entry>,
    was_muted: bool,
    note: Option<Alert>,
    now: u64,
) -> Option<Alert> {
    let note = note?;
    match note.status {
        Status::Firing => {
            let silences = silence::active();
            let muting = silences.muting(&note, now);
            if let Some(e) = next {
                e.muted = muting.map_or(0, silence::id_hash);
            }
            match muting {
                Some(id) => {
                    metrics::alert_silenced(&note, id);
                    None
                }
                None => Some(note),
            }
        }
        Status::Resolved if was_muted => {
            metrics::alert_silenced(&note, "");
            None
        }
        Status::Resolved => Some(note),
    }
}

/// Whether a pending alert's `for` has elapsed at `now`.
fn pending_due(e: &Head, now: u64) -> bool {
    now.saturating_sub(e.since) >= e.for_ms
}

/// Whether a firing alert's `seen` must be rewritten at `now`. It only
/// matters for auto-resolve, and then only once a tenth of the delay has
/// passed: steady firing stays free of writes.
fn seen_is_stale(seen: u64, resolve_after_ms: u64, now: u64) -> bool {
    resolve_after_ms > 0 && now.saturating_sub(seen) * 10 >= resolve_after_ms
}

impl AlertBook {
    pub fn new(policy: Policy) -> Self {
        AlertBook {
            parts: Mutex::new(HashMap::new()),
            gates: Mutex::new(HashMap::new()),
            policy,
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

    /// Partitions this instance holds state of.
    pub fn tags(&self) -> Vec<String> {
        let parts = self.parts.lock().expect("alert book poisoned");
        parts.keys().cloned().collect()
    }

    /// The generation at which the cache of `tag` is known to equal Redis.
    pub fn synced(&self, tag: &str) -> Option<u64> {
        self.with_part(tag, |p| p.synced)
    }

    /// After a commit to `tag` that found the generation at `based_on` and
    /// left it at `generation`: the cache stays known-equal only if it was before.
    pub fn committed(&self, tag: &str, based_on: Option<u64>, generation: u64) {
        self.with_part(tag, |p| p.synced = based_on.map(|_| generation));
    }

    /// Someone else wrote `tag`, or a commit's outcome is unknown.
    pub fn unsync(&self, tag: &str) {
        self.with_part(tag, |p| p.synced = None);
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
            if self.is_noop(cached.and_then(|c| c.entry.as_ref()).map(|s| &s.head), a) {
                continue;
            }
            let cur = cached.cloned().unwrap_or_default();
            let before = cur.entry.as_ref().map(Stored::entry);
            let was_muted = before.as_ref().is_some_and(|e| e.muted != 0);
            let (mut next, note) = self.step(before.clone(), a);
            let note = through_silences(next.as_mut(), was_muted, note, a.now_ms);
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

    /// True when [`Self::step`] would leave `entry` as it is and notify
    /// nothing; must agree with it (a test checks).
    fn is_noop(&self, entry: Option<&Head>, a: &Action) -> bool {
        let now = a.now_ms;
        match (&a.kind, entry) {
            (ActionKind::Resolve, None) => true,
            (ActionKind::Resolve, Some(e)) => matches!(e.phase, Phase::Watching | Phase::Resolved),
            (ActionKind::Fire { .. }, _) if a.alert.is_none() => true,
            (ActionKind::Fire { .. }, Some(e)) if e.phase == Phase::Watching => true,
            (ActionKind::Fire { .. }, Some(e)) if e.phase == Phase::Firing => {
                let escalated = a.alert.as_ref().is_some_and(|n| n.severity != e.severity);
                let due = now.saturating_sub(e.notified) >= self.policy.repeat_ms;
                !(escalated
                    || due
                    || released(e.muted, now)
                    || seen_is_stale(e.seen, e.resolve_after_ms, now))
            }
            (ActionKind::Deadman { after_ms }, Some(e)) if e.phase == Phase::Watching => {
                watch_is_fresh(e.seen, e.deadman_ms, *after_ms, now)
            }
            (ActionKind::Deadman { .. }, e) if a.alert.is_none() => {
                e.is_none_or(|e| e.phase == Phase::Resolved)
            }
            _ => false,
        }
    }

    /// The state machine for one action on one entry.
    fn step(&self, entry: Option<Entry>, a: &Action) -> (Option<Entry>, Option<Alert>) {
        let now = a.now_ms;
        // Without the rule's alert nothing can be created (see `Action::alert`).
        let absent = entry.as_ref().is_none_or(|e| e.phase == Phase::Resolved);
        if a.alert.is_none()
            && a.kind != ActionKind::Resolve
            && (absent || matches!(a.kind, ActionKind::Fire { .. }))
        {
            return (entry, None);
        }
        let incoming = || a.alert.clone().expect("checked above");
        if a.kind == ActionKind::Resolve
            && entry.as_ref().is_some_and(|e| e.phase == Phase::Resolved)
        {
            // Already resolved: keep the tombstone and its flap history.
            return (entry, None);
        }
        // A resolved tombstone is "absent" except for its flap history.
        let (entry, history) = match entry {
            Some(e) if e.phase == Phase::Resolved => (None, Some(e)),
            other => (other, None),
        };
        let (changes, held) = history.map(|h| (h.changes, h.held)).unwrap_or_default();
        match (&a.kind, entry) {
            (
                ActionKind::Fire {
                    for_ms,
                    resolve_after_ms,
                },
                None,
            ) => {
                let mut e = Entry {
                    phase: Phase::Pending,
                    since: now,
                    notified: 0,
                    seen: now,
                    for_ms: *for_ms,
                    resolve_after_ms: resolve_after_ms.unwrap_or(self.policy.resolve_after_ms),
                    deadman_ms: 0,
                    changes,
                    held,
                    muted: 0,
                    alert: incoming(),
                };
                if *for_ms == 0 {
                    let note = self.fire(&mut e, now);
                    (Some(e), note)
                } else {
                    (Some(e), None)
                }
            }
            (ActionKind::Fire { for_ms, .. }, Some(mut e)) => match e.phase {
                Phase::Pending => {
                    e.seen = now;
                    e.for_ms = *for_ms;
                    e.alert = incoming();
                    if now.saturating_sub(e.since) >= e.for_ms {
                        let note = self.fire(&mut e, now);
                        (Some(e), note)
                    } else {
                        (Some(e), None)
                    }
                }
                Phase::Firing => {
                    let escalated = a
                        .alert
                        .as_ref()
                        .is_some_and(|n| n.severity != e.alert.severity);
                    // A muted notification does not count as sent: once its
                    // silence ended, the next assertion sends it.
                    let due = now.saturating_sub(e.notified) >= self.policy.repeat_ms
                        || released(e.muted, now);
                    let refresh_seen = seen_is_stale(e.seen, e.resolve_after_ms, now);
                    if !(escalated || due || refresh_seen) {
                        return (Some(e), None);
                    }
                    e.seen = now;
                    if !(escalated || due) {
                        return (Some(e), None);
                    }
                    let starts = e.alert.starts_at.clone();
                    e.alert = incoming();
                    e.alert.starts_at = starts;
                    e.notified = now;
                    let note = (!e.held).then(|| e.alert.clone());
                    (Some(e), note)
                }
                Phase::Watching | Phase::Resolved => (Some(e), None),
            },
            (ActionKind::Resolve, Some(mut e)) => match e.phase {
                Phase::Pending => (None, None),
                Phase::Firing => {
                    // `resolve()` with text of its own: the resolved
                    // notification says that, not the firing's text.
                    if let Some(own) = &a.alert {
                        e.alert.annotations = own.annotations.clone();
                    }
                    let note = self.resolved(&mut e, now);
                    (self.tombstone(e), note)
                }
                Phase::Watching | Phase::Resolved => (Some(e), None),
            },
            (ActionKind::Resolve, None) => (None, None),
            (ActionKind::Deadman { after_ms }, None) => (
                Some(Entry {
                    phase: Phase::Watching,
                    since: now,
                    notified: 0,
                    seen: now,
                    for_ms: 0,
                    resolve_after_ms: 0,
                    deadman_ms: *after_ms,
                    changes,
                    held,
                    muted: 0,
                    alert: incoming(),
                }),
                None,
            ),
            (ActionKind::Deadman { after_ms }, Some(mut e)) => {
                if e.phase == Phase::Firing {
                    // The series reports again: the silence is over.
                    let note = self.resolved(&mut e, now);
                    e.phase = Phase::Watching;
                    e.seen = now;
                    e.deadman_ms = *after_ms;
                    if let Some(n) = &a.alert {
                        e.alert = n.clone();
                    }
                    return (Some(e), note);
                }
                if watch_is_fresh(e.seen, e.deadman_ms, *after_ms, now) {
                    return (Some(e), None);
                }
                e.seen = now;
                e.deadman_ms = *after_ms;
                if let Some(n) = &a.alert {
                    e.alert = n.clone();
                }
                (Some(e), None)
            }
        }
    }

    fn note_change(&self, e: &mut Entry, now: u64) {
        if self.policy.flap_max_changes == 0 {
            return;
        }
        let window = self.policy.flap_window_ms;
        e.changes.retain(|t| now.saturating_sub(*t) < window);
        e.changes.push(now);
        let flapping = e.changes.len() as u32 > self.policy.flap_max_changes;
        if flapping && !e.held {
            tracing::warn!(alert = %e.alert.name, fingerprint = %e.alert.fingerprint, "alert is flapping; holding its notifications until it settles");
        }
        // Once held, only the timer lifts the hold ([`Self::settled`]), a
        // whole window after the last change: a change that finds the
        // window quieter is still a change, not stability.
        e.held |= flapping;
    }

    /// What remains of a resolved entry: its flap history when flap
    /// detection is on, else nothing.
    fn tombstone(&self, mut e: Entry) -> Option<Entry> {
        if self.policy.flap_max_changes == 0 {
            return None;
        }
        e.phase = Phase::Resolved;
        Some(e)
    }

    fn fire(&self, e: &mut Entry, now: u64) -> Option<Alert> {
        e.phase = Phase::Firing;
        e.since = now;
        e.notified = now;
        e.seen = now;
        e.alert.status = Status::Firing;
        e.alert.starts_at = rfc3339(now);
        e.alert.ends_at = None;
        self.note_change(e, now);
        (!e.held).then(|| e.alert.clone())
    }

    fn resolved(&self, e: &mut Entry, now: u64) -> Option<Alert> {
        self.note_change(e, now);
        let mut n = e.alert.clone();
        n.status = Status::Resolved;
        n.ends_at = Some(rfc3339(now));
        (!e.held).then_some(n)
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

    /// Timer-driven transitions at `now` in partition `tag`: auto-resolve of
    /// alerts not re-asserted, deadman watches whose series went silent.
    pub fn due_in(&self, tag: &str, now: u64) -> Decision {
        // Runs every timer tick under the lock the workers' `decide` needs:
        // clone only the entries that are due, not the whole partition.
        let silences = silence::active();
        let candidates: Vec<(u64, Stored, u64)> = {
            let parts = self.parts.lock().expect("alert book poisoned");
            let Some(part) = parts.get(tag) else {
                return Decision::default();
            };
            part.entries
                .iter()
                .filter_map(|(fp, c)| c.entry.as_ref().map(|s| (*fp, s, c.touched)))
                .filter(|(_, Stored { head: e, .. }, touched)| {
                    self.settled(e, now)
                        || match e.phase {
                            Phase::Firing => {
                                (e.resolve_after_ms > 0
                                    && now.saturating_sub(e.seen) >= e.resolve_after_ms)
                                    || unmuted(e, &silences, now)
                            }
                            Phase::Resolved => e.last_change.is_none_or(|t| {
                                now.saturating_sub(t) >= self.policy.flap_window_ms
                            }),
                            Phase::Watching => {
                                watch_expired(e, *touched, now) || must_publish(e, *touched, now)
                            }
                            Phase::Pending => {
                                pending_due(e, now)
                                    || (e.resolve_after_ms > 0
                                        && now.saturating_sub(e.seen) >= e.resolve_after_ms)
                            }
                        }
                })
                .map(|(fp, e, touched)| (fp, e.clone(), touched))
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
            let mut e = stored.entry();
            let stream = e.alert.origin.stream.clone();
            let (next, note) = if self.settled(&stored.head, now) {
                // Flapping stopped a window ago: release the hold and tell
                // the sinks where the alert stands now.
                e.held = false;
                e.changes.clear();
                match e.phase {
                    Phase::Firing => {
                        let note = e.alert.clone();
                        (Some(e), Some(note))
                    }
                    Phase::Resolved => {
                        let mut note = e.alert.clone();
                        note.status = Status::Resolved;
                        note.ends_at.get_or_insert_with(|| rfc3339(now));
                        (None, Some(note))
                    }
                    _ => (Some(e), None),
                }
            } else if unmuted(&stored.head, &silences, now) {
                // The silence that withheld its firing ended and it still
                // fires: send it now ([`through_silences`] checks that no
                // other silence mutes it).
                e.muted = 0;
                e.notified = now;
                let note = (!e.held).then(|| e.alert.clone());
                (Some(e), note)
            } else if e.phase == Phase::Resolved {
                (None, None)
            } else {
                match e.phase {
                    Phase::Firing => {
                        let note = self.resolved(&mut e, now);
                        if e.deadman_ms > 0 {
                            e.phase = Phase::Watching;
                            e.seen = now;
                            (Some(e), note)
                        } else {
                            (self.tombstone(e), note)
                        }
                    }
                    Phase::Watching if !watch_expired(&stored.head, touched, now) => {
                        // Readings this instance judged after the stored
                        // `seen`: written now, half a silence before the
                        // stored deadline, so that no other instance fires
                        // on the older one.
                        e.seen = touched;
                        (Some(e), None)
                    }
                    Phase::Watching => {
                        let note = self.fire(&mut e, now);
                        (Some(e), note)
                    }
                    // `for` elapsed with the condition asserted and not
                    // resolved since: it fires without waiting for another
                    // message (event-driven telemetry may send none), unless
                    // it stopped being asserted for its `resolve_after`.
                    Phase::Pending if pending_due(&stored.head, now) => {
                        let note = self.fire(&mut e, now);
                        (Some(e), note)
                    }
                    Phase::Pending | Phase::Resolved => (None, None),
                }
            };
            let (mut next, note) = (next, note);
            let note = through_silences(next.as_mut(), stored.head.muted != 0, note, now);
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

    /// A held (flapping) alert whose last change is a whole window old.
    fn settled(&self, e: &Head, now: u64) -> bool {
        e.held
            && e.last_change
                .is_none_or(|t| now.saturating_sub(t) >= self.policy.flap_window_ms)
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

    /// Replaces everything cached for partition `tag` with `snapshot`, what
    /// Redis holds there: picks up alerts other instances raised (so this
    /// instance's timers cover them) and forgets deleted ones. `generation`
    /// is the partition's generation if nothing wrote while it was read.
    /// Returns the old entries, for the caller to drop outside its locks.
    pub fn load_partition(
        &self,
        tag: &str,
        snapshot: Snapshot,
        generation: Option<u64>,
    ) -> Snapshot {
        let mut entries = snapshot.0;
        self.with_part(tag, |p| {
            p.synced = generation;
            // What this instance judged but did not write outlives the read.
            for (fp, old) in &p.entries {
                if old.touched > 0
                    && let Some(c) = entries.get_mut(fp)
                {
                    c.touched = old.touched;
                }
            }
            Snapshot(std::mem::replace(&mut p.entries, entries))
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
                    && let Some(n) = self.resolved(&mut e, now)
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
    use super::super::{Origin, Severity};
    use super::*;

    const MIN: u64 = 60_000;

    fn policy() -> Policy {
        Policy {
            repeat_ms: 60 * MIN,
            resolve_after_ms: 0,
            flap_max_changes: 0,
            flap_window_ms: 10 * MIN,
        }
    }

    fn alert(sev: Severity) -> Alert {
        Alert {
            fingerprint: "1".into(),
            rule: "r".into(),
            name: "n".into(),
            severity: sev,
            status: Status::Firing,
            labels: Default::default(),
            annotations: Default::default(),
            starts_at: String::new(),
            ends_at: None,
            origin: Origin::default(),
        }
    }

    fn act(kind: ActionKind, now: u64) -> Action {
        Action {
            fp: 1,
            kind,
            alert: Some(alert(Severity::Major)),
            now_ms: now,
        }
    }

    fn fire(for_ms: u64, now: u64) -> Action {
        act(
            ActionKind::Fire {
                for_ms,
                resolve_after_ms: None,
            },
            now,
        )
    }

    fn notes(book: &AlertBook, a: Action) -> Vec<Status> {
        book.decide("s", &[a], true)
            .notifications
            .iter()
            .map(|n| n.status)
            .collect()
    }

    #[test]
    fn fires_once_then_repeats_after_interval() {
        let book = AlertBook::new(policy());
        assert_eq!(notes(&book, fire(0, 0)), [Status::Firing]);
        assert!(notes(&book, fire(0, 59 * MIN)).is_empty());
        assert_eq!(notes(&book, fire(0, 60 * MIN)), [Status::Firing]);
    }

    #[test]
    fn for_holds_until_elapsed_and_never_fires_if_cleared_first() {
        let book = AlertBook::new(policy());
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
        let book = AlertBook::new(policy());
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
        let book = AlertBook::new(policy());
        notes(&book, fire(0, 0));
        let mut worse = fire(0, 1);
        worse.alert.as_mut().unwrap().severity = Severity::Critical;
        assert_eq!(notes(&book, worse), [Status::Firing]);
    }

    #[test]
    fn auto_resolve_after_silence() {
        let book = AlertBook::new(Policy {
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
        let book = AlertBook::new(policy());
        let watch = |now| act(ActionKind::Deadman { after_ms: 10 * MIN }, now);
        assert!(notes(&book, watch(0)).is_empty());
        assert!(book.due(9 * MIN).notifications.is_empty());
        assert_eq!(book.due(10 * MIN).notifications[0].status, Status::Firing);
        assert!(book.due(11 * MIN).notifications.is_empty());
        assert_eq!(notes(&book, watch(12 * MIN)), [Status::Resolved]);
    }

    #[test]
    fn flapping_alert_is_held() {
        let book = AlertBook::new(Policy {
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
        let book = AlertBook::new(policy());
        assert!(notes(&book, fire(30_000, 0)).is_empty());
        assert!(book.due(29_999).notifications.is_empty());
        assert_eq!(book.due(30_000).notifications[0].status, Status::Firing);
        // Readings 91 s apart: the second finds it firing already.
        assert!(notes(&book, fire(30_000, 91_000)).is_empty());
        assert_eq!(book.firing_count(), 1);
    }

    #[test]
    fn deadman_fires_on_the_last_reading_not_the_coalesced_one() {
        let book = AlertBook::new(policy());
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
        let book = AlertBook::new(policy());
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
    fn the_no_op_shortcut_agrees_with_the_state_machine() {
        for flap_max_changes in [0, 2] {
            no_op_shortcut_agrees(AlertBook::new(Policy {
                resolve_after_ms: 5 * MIN,
                flap_max_changes,
                ..policy()
            }));
        }
    }

    fn no_op_shortcut_agrees(book: AlertBook) {
        let kinds = [
            ActionKind::Fire {
                for_ms: 0,
                resolve_after_ms: None,
            },
            ActionKind::Fire {
                for_ms: 2 * MIN,
                resolve_after_ms: None,
            },
            ActionKind::Resolve,
            ActionKind::Deadman { after_ms: 10 * MIN },
        ];
        // Reach many states by walking sequences of actions, checking each step.
        for first in &kinds {
            for second in &kinds {
                for third in &kinds {
                    let mut entry: Option<Entry> = None;
                    for (i, k) in [first, second, third, first, second]
                        .into_iter()
                        .enumerate()
                    {
                        // No alert: a resolve, or a deadman judged on a fresh watch.
                        for sev in [Some(Severity::Major), Some(Severity::Critical), None] {
                            let mut a = act(k.clone(), i as u64 * 3 * MIN);
                            match sev {
                                Some(sev) => a.alert.as_mut().unwrap().severity = sev,
                                None => a.alert = None,
                            }
                            let (next, note) = book.step(entry.clone(), &a);
                            let unchanged = next == entry && note.is_none();
                            assert_eq!(
                                book.is_noop(entry.as_ref().map(Head::of).as_ref(), &a),
                                unchanged,
                                "{k:?} on {entry:?}"
                            );
                        }
                        entry = book
                            .step(entry.clone(), &act(k.clone(), i as u64 * 3 * MIN))
                            .0;
                    }
                }
            }
        }
    }

    #[test]
    fn doing_nothing_is_checked_too() {
        let book = AlertBook::new(policy());
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
        let book = AlertBook::new(policy());
        let d = book.decide("s", &[act(ActionKind::Resolve, 0)], false);
        assert!(d.writes.is_empty());
        let d = book.decide("s", &[fire(0, 1), act(ActionKind::Resolve, 2)], false);
        assert_eq!(d.writes.len(), 1);
        assert_eq!(d.writes[0].expected, 0);
        assert_eq!(d.writes[0].value, None, "fired then resolved: deleted");
    }

    #[test]
    fn partitions_are_separate_and_sync_follows_own_commits() {
        let book = AlertBook::new(policy());
        assert_eq!(notes(&book, fire(0, 0)), [Status::Firing]);
        // The same identity raised from a stream of another hash tag has
        // its own lifecycle.
        let other = book.decide("t", &[fire(0, 1)], true);
        assert_eq!(other.notifications.len(), 1);
        assert_eq!(book.synced("s"), None);
        book.load_partition("s", Snapshot::default(), Some(7));
        assert_eq!(book.synced("s"), Some(7));
        book.committed("s", Some(7), 8);
        assert_eq!(book.synced("s"), Some(8));
        book.committed("s", None, 9);
        assert_eq!(
            book.synced("s"),
            None,
            "a version-checked commit proves nothing"
        );
        assert_eq!(book.synced("t"), None);
    }

    #[test]
    fn a_deadman_without_its_alert_refreshes_but_never_creates() {
        let book = AlertBook::new(policy());
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
        let book = AlertBook::new(policy());
        notes(&book, fire(0, 0));
        let d = book.forget_rules("s", &["r".to_string()], 10);
        assert_eq!(d.notifications[0].status, Status::Resolved);
        assert_eq!(d.writes[0].value, None);
        assert_eq!(book.firing_count(), 0);
    }
}
