//! The alert lifecycle as a pure state machine: pending (`for`) → firing →
//! resolved, repeat intervals, auto-resolve, deadman watches and flap
//! holding. [`Policy::step`] applies one assertion to one alert's entry,
//! [`Policy::on_timer`] what a clock decides; neither knows of Redis or of
//! the cache (see `alert::book`), so both are tested on plain values.

use serde::{Deserialize, Serialize};

use super::silence::{self, ActiveSilences, Silences};
use super::{Alert, Severity, Status};
use crate::clock::rfc3339;
use crate::metrics::Metrics;

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
    /// (`AlertBook::is_watched`). Building an alert costs more than most
    /// rules, and nearly every assertion changes nothing.
    pub alert: Option<Alert>,
    pub now_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Phase {
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
pub(super) struct Entry {
    pub(super) phase: Phase,
    /// When the condition started holding (pending) or the alert fired.
    pub(super) since: u64,
    /// Last notification sent.
    pub(super) notified: u64,
    /// Last assertion seen.
    pub(super) seen: u64,
    /// `for` duration of a pending alert.
    #[serde(default)]
    pub(super) for_ms: u64,
    /// Auto-resolve delay of this alert (0 = never).
    #[serde(default)]
    pub(super) resolve_after_ms: u64,
    /// Deadman: silence allowed before firing.
    #[serde(default)]
    pub(super) deadman_ms: u64,
    /// Timestamps of recent state changes, for flap detection.
    #[serde(default)]
    pub(super) changes: Vec<u64>,
    /// Notifications are held because the alert flaps.
    #[serde(default)]
    pub(super) held: bool,
    /// The silence ([`silence::id_hash`]) that withheld the last firing
    /// notification, 0 if it was sent. No sink has then seen the alert
    /// fire: its resolve is withheld too, and the end of the silence sends
    /// the firing (Alertmanager's semantics).
    #[serde(default)]
    pub(super) muted: u64,
    pub(super) alert: Alert,
}

/// What deciding most assertions and finding due timers reads of an entry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Head {
    pub(super) phase: Phase,
    /// When a pending alert's `for` started: the timer fires it at `since + for_ms`.
    pub(super) since: u64,
    pub(super) notified: u64,
    pub(super) seen: u64,
    pub(super) for_ms: u64,
    pub(super) resolve_after_ms: u64,
    pub(super) deadman_ms: u64,
    pub(super) held: bool,
    pub(super) muted: u64,
    /// The latest of `changes`.
    pub(super) last_change: Option<u64>,
    pub(super) severity: Severity,
}

impl Head {
    pub(super) fn of(e: &Entry) -> Head {
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

/// The flap history a resolved tombstone hands on to the next lifecycle
/// of its alert: `changes` and `held`.
type History = (Vec<u64>, bool);

/// Whether a deadman watch last seen at `seen` needs no write for a silence
/// of `after_ms` asserted at `now`: the new deadline is written only when it
/// moved by a tenth of the window, one write per series per window/10 rather
/// than per message.
pub(super) fn watch_is_fresh(seen: u64, deadman_ms: u64, after_ms: u64, now: u64) -> bool {
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
fn released(silences: &ActiveSilences, muted: u64, now: u64) -> bool {
    muted != 0 && !silences.active().in_force(muted, now)
}

/// Whether a firing alert's firing was withheld by a silence that is no
/// longer in force at `now`.
fn unmuted(e: &Head, silences: &Silences, now: u64) -> bool {
    e.phase == Phase::Firing && e.muted != 0 && !silences.in_force(e.muted, now)
}

/// Silences as Alertmanager applies them, kept in the alert's state so that
/// every instance and every sink agrees: a firing notification a silence
/// mutes is withheld and remembered in `next` (the silence's end sends it,
/// see [`Policy::on_timer`]); the resolve of an alert whose firing was
/// withheld (`was_muted`) is withheld too, so no sink hears of a resolve of
/// a firing it never got. Anything else passes.
pub(super) fn through_silences(
    silences: &ActiveSilences,
    metrics: &Metrics,
    next: Option<&mut Entry>,
    was_muted: bool,
    note: Option<Alert>,
    now: u64,
) -> Option<Alert> {
    let note = note?;
    match note.status {
        Status::Firing => {
            let silences = silences.active();
            let muting = silences.muting(&note, now);
            if let Some(e) = next {
                e.muted = muting.map_or(0, silence::id_hash);
            }
            match muting {
                Some(id) => {
                    metrics.alert_silenced(&note, id);
                    None
                }
                None => Some(note),
            }
        }
        Status::Resolved if was_muted => {
            metrics.alert_silenced(&note, "");
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

/// Whether an alert not re-asserted since `seen` has resolved by itself at `now`.
fn quiet_too_long(e: &Head, now: u64) -> bool {
    e.resolve_after_ms > 0 && now.saturating_sub(e.seen) >= e.resolve_after_ms
}

impl Policy {
    /// True when [`Self::step`] would leave `entry` as it is and notify
    /// nothing; must agree with it (a test checks).
    pub(super) fn is_noop(
        &self,
        entry: Option<&Head>,
        a: &Action,
        silences: &ActiveSilences,
    ) -> bool {
        let now = a.now_ms;
        match (&a.kind, entry) {
            (ActionKind::Resolve, None) => true,
            (ActionKind::Resolve, Some(e)) => matches!(e.phase, Phase::Watching | Phase::Resolved),
            (ActionKind::Fire { .. }, _) if a.alert.is_none() => true,
            (ActionKind::Fire { .. }, Some(e)) if e.phase == Phase::Watching => true,
            (ActionKind::Fire { .. }, Some(e)) if e.phase == Phase::Firing => {
                let escalated = a.alert.as_ref().is_some_and(|n| n.severity != e.severity);
                let due = now.saturating_sub(e.notified) >= self.repeat_ms;
                !(escalated
                    || due
                    || released(silences, e.muted, now)
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

    /// The state machine for one action on one entry: the next entry
    /// (`None` = nothing stored) and the notification to send, if any.
    pub(super) fn step(
        &self,
        entry: Option<Entry>,
        a: &Action,
        silences: &ActiveSilences,
    ) -> (Option<Entry>, Option<Alert>) {
        // Without the rule's alert nothing can be created (see `Action::alert`).
        let absent = entry.as_ref().is_none_or(|e| e.phase == Phase::Resolved);
        if a.alert.is_none()
            && a.kind != ActionKind::Resolve
            && (absent || matches!(a.kind, ActionKind::Fire { .. }))
        {
            return (entry, None);
        }
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
        let history = history.map(|h| (h.changes, h.held)).unwrap_or_default();
        match (&a.kind, entry) {
            (
                ActionKind::Fire {
                    for_ms,
                    resolve_after_ms,
                },
                None,
            ) => self.start(a, *for_ms, *resolve_after_ms, history),
            (ActionKind::Fire { for_ms, .. }, Some(e)) => self.fire_again(e, a, *for_ms, silences),
            (ActionKind::Resolve, Some(e)) => self.clear(e, a),
            (ActionKind::Resolve, None) => (None, None),
            (ActionKind::Deadman { after_ms }, None) => {
                (Some(watching(a, *after_ms, history)), None)
            }
            (ActionKind::Deadman { after_ms }, Some(e)) => self.report(e, a, *after_ms),
        }
    }

    /// A condition that starts holding: pending, or firing at once without `for`.
    fn start(
        &self,
        a: &Action,
        for_ms: u64,
        resolve_after_ms: Option<u64>,
        (changes, held): History,
    ) -> (Option<Entry>, Option<Alert>) {
        let now = a.now_ms;
        let mut e = Entry {
            phase: Phase::Pending,
            since: now,
            notified: 0,
            seen: now,
            for_ms,
            resolve_after_ms: resolve_after_ms.unwrap_or(self.resolve_after_ms),
            deadman_ms: 0,
            changes,
            held,
            muted: 0,
            alert: incoming(a),
        };
        if for_ms == 0 {
            let note = self.fire(&mut e, now);
            (Some(e), note)
        } else {
            (Some(e), None)
        }
    }

    /// A condition asserted again on an alert that exists.
    fn fire_again(
        &self,
        mut e: Entry,
        a: &Action,
        for_ms: u64,
        silences: &ActiveSilences,
    ) -> (Option<Entry>, Option<Alert>) {
        let now = a.now_ms;
        match e.phase {
            Phase::Pending => {
                e.seen = now;
                e.for_ms = for_ms;
                e.alert = incoming(a);
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
                let due = now.saturating_sub(e.notified) >= self.repeat_ms
                    || released(silences, e.muted, now);
                let refresh_seen = seen_is_stale(e.seen, e.resolve_after_ms, now);
                if !(escalated || due || refresh_seen) {
                    return (Some(e), None);
                }
                e.seen = now;
                if !(escalated || due) {
                    return (Some(e), None);
                }
                let starts = e.alert.starts_at.clone();
                e.alert = incoming(a);
                e.alert.starts_at = starts;
                e.notified = now;
                let note = (!e.held).then(|| e.alert.clone());
                (Some(e), note)
            }
            Phase::Watching | Phase::Resolved => (Some(e), None),
        }
    }

    /// A condition cleared on an alert that exists.
    fn clear(&self, mut e: Entry, a: &Action) -> (Option<Entry>, Option<Alert>) {
        match e.phase {
            Phase::Pending => (None, None),
            Phase::Firing => {
                // `resolve()` with text of its own: the resolved
                // notification says that, not the firing's text.
                if let Some(own) = &a.alert {
                    e.alert.annotations = own.annotations.clone();
                }
                let note = self.resolved(&mut e, a.now_ms);
                (self.tombstone(e), note)
            }
            Phase::Watching | Phase::Resolved => (Some(e), None),
        }
    }

    /// A deadman series that reported, on a watch that exists.
    fn report(&self, mut e: Entry, a: &Action, after_ms: u64) -> (Option<Entry>, Option<Alert>) {
        let now = a.now_ms;
        if e.phase == Phase::Firing {
            // The series reports again: the silence is over.
            let note = self.resolved(&mut e, now);
            e.phase = Phase::Watching;
            e.seen = now;
            e.deadman_ms = after_ms;
            if let Some(n) = &a.alert {
                e.alert = n.clone();
            }
            return (Some(e), note);
        }
        if watch_is_fresh(e.seen, e.deadman_ms, after_ms, now) {
            return (Some(e), None);
        }
        e.seen = now;
        e.deadman_ms = after_ms;
        if let Some(n) = &a.alert {
            e.alert = n.clone();
        }
        (Some(e), None)
    }

    /// Whether the timer has anything to do for an entry at `now`
    /// ([`Self::on_timer`] then decides what); `touched` is the latest
    /// deadman reading this instance judged.
    pub(super) fn timer_due(&self, e: &Head, touched: u64, silences: &Silences, now: u64) -> bool {
        self.settled(e, now)
            || match e.phase {
                Phase::Firing => quiet_too_long(e, now) || unmuted(e, silences, now),
                Phase::Resolved => e
                    .last_change
                    .is_none_or(|t| now.saturating_sub(t) >= self.flap_window_ms),
                Phase::Watching => watch_expired(e, touched, now) || must_publish(e, touched, now),
                Phase::Pending => pending_due(e, now) || quiet_too_long(e, now),
            }
    }

    /// The timer-driven transition of entry `e` (whose head is `head`) at
    /// `now`: auto-resolve of alerts not re-asserted, deadman watches whose
    /// series went silent, pending alerts whose `for` elapsed, flap holds
    /// released, firings whose silence ended.
    pub(super) fn on_timer(
        &self,
        mut e: Entry,
        head: &Head,
        touched: u64,
        silences: &Silences,
        now: u64,
    ) -> (Option<Entry>, Option<Alert>) {
        if self.settled(head, now) {
            // Flapping stopped a window ago: release the hold and tell
            // the sinks where the alert stands now.
            e.held = false;
            e.changes.clear();
            return match e.phase {
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
            };
        }
        if unmuted(head, silences, now) {
            // The silence that withheld its firing ended and it still
            // fires: send it now ([`through_silences`] checks that no
            // other silence mutes it).
            e.muted = 0;
            e.notified = now;
            let note = (!e.held).then(|| e.alert.clone());
            return (Some(e), note);
        }
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
            Phase::Watching if !watch_expired(head, touched, now) => {
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
            Phase::Pending if pending_due(head, now) => {
                let note = self.fire(&mut e, now);
                (Some(e), note)
            }
            Phase::Pending | Phase::Resolved => (None, None),
        }
    }

    fn note_change(&self, e: &mut Entry, now: u64) {
        if self.flap_max_changes == 0 {
            return;
        }
        let window = self.flap_window_ms;
        e.changes.retain(|t| now.saturating_sub(*t) < window);
        e.changes.push(now);
        let flapping = e.changes.len() as u32 > self.flap_max_changes;
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
        if self.flap_max_changes == 0 {
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

    /// Resolves `e` at `now`: the resolved notification, unless held.
    pub(super) fn resolved(&self, e: &mut Entry, now: u64) -> Option<Alert> {
        self.note_change(e, now);
        let mut n = e.alert.clone();
        n.status = Status::Resolved;
        n.ends_at = Some(rfc3339(now));
        (!e.held).then_some(n)
    }

    /// A held (flapping) alert whose last change is a whole window old.
    fn settled(&self, e: &Head, now: u64) -> bool {
        e.held
            && e.last_change
                .is_none_or(|t| now.saturating_sub(t) >= self.flap_window_ms)
    }
}

/// The alert a `Fire` or a creating `Deadman` carries (see `Action::alert`;
/// [`Policy::step`] returns early without one).
fn incoming(a: &Action) -> Alert {
    a.alert.clone().expect("checked in step")
}

/// A new deadman watch on a series that reported.
fn watching(a: &Action, after_ms: u64, (changes, held): History) -> Entry {
    Entry {
        phase: Phase::Watching,
        since: a.now_ms,
        notified: 0,
        seen: a.now_ms,
        for_ms: 0,
        resolve_after_ms: 0,
        deadman_ms: after_ms,
        changes,
        held,
        muted: 0,
        alert: incoming(a),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::{Origin, Severity};
    use super::*;

    pub(in crate::alert) const MIN: u64 = 60_000;

    pub(in crate::alert) fn policy() -> Policy {
        Policy {
            repeat_ms: 60 * MIN,
            resolve_after_ms: 0,
            flap_max_changes: 0,
            flap_window_ms: 10 * MIN,
        }
    }

    pub(in crate::alert) fn alert(sev: Severity) -> Alert {
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

    pub(in crate::alert) fn act(kind: ActionKind, now: u64) -> Action {
        Action {
            fp: 1,
            kind,
            alert: Some(alert(Severity::Major)),
            now_ms: now,
        }
    }

    pub(in crate::alert) fn fire(for_ms: u64, now: u64) -> Action {
        act(
            ActionKind::Fire {
                for_ms,
                resolve_after_ms: None,
            },
            now,
        )
    }

    /// Steps through `actions` from nothing; the notifications' statuses.
    fn walk(policy: &Policy, actions: &[Action]) -> (Option<Entry>, Vec<Status>) {
        let mut entry = None;
        let mut sent = Vec::new();
        for a in actions {
            let (next, note) = policy.step(entry, a, &ActiveSilences::default());
            sent.extend(note.map(|n| n.status));
            entry = next;
        }
        (entry, sent)
    }

    #[test]
    fn a_pending_alert_cleared_before_its_for_leaves_nothing() {
        let (entry, sent) = walk(
            &policy(),
            &[fire(5 * MIN, 0), act(ActionKind::Resolve, 4 * MIN)],
        );
        assert_eq!(entry, None);
        assert!(sent.is_empty());
    }

    #[test]
    fn a_firing_keeps_its_start_across_repeats() {
        let (entry, sent) = walk(&policy(), &[fire(0, 0), fire(0, 60 * MIN)]);
        let e = entry.expect("firing");
        assert_eq!(sent, [Status::Firing, Status::Firing]);
        assert_eq!(e.alert.starts_at, rfc3339(0));
        assert_eq!(e.notified, 60 * MIN);
    }

    #[test]
    fn a_resolve_leaves_a_tombstone_only_for_flap_detection() {
        let actions = [fire(0, 0), act(ActionKind::Resolve, 1)];
        assert_eq!(walk(&policy(), &actions).0, None);
        let flapping = Policy {
            flap_max_changes: 3,
            ..policy()
        };
        let (entry, sent) = walk(&flapping, &actions);
        assert_eq!(
            entry.map(|e| (e.phase, e.changes)),
            Some((Phase::Resolved, vec![0, 1]))
        );
        assert_eq!(sent, [Status::Firing, Status::Resolved]);
    }

    #[test]
    fn the_timer_fires_a_silent_watch_and_resolves_a_quiet_alert() {
        let p = Policy {
            resolve_after_ms: 5 * MIN,
            ..policy()
        };
        let silences = Silences::default();
        let (watch, _) = walk(&p, &[act(ActionKind::Deadman { after_ms: 10 * MIN }, 0)]);
        let watch = watch.expect("watching");
        let head = Head::of(&watch);
        assert!(!p.timer_due(&head, 0, &silences, 10 * MIN - 1));
        assert!(p.timer_due(&head, 0, &silences, 10 * MIN));
        let (next, note) = p.on_timer(watch, &head, 0, &silences, 10 * MIN);
        assert_eq!(next.map(|e| e.phase), Some(Phase::Firing));
        assert_eq!(note.map(|n| n.status), Some(Status::Firing));

        let (firing, _) = walk(&p, &[fire(0, 0)]);
        let firing = firing.expect("firing");
        let head = Head::of(&firing);
        assert!(!p.timer_due(&head, 0, &silences, 5 * MIN - 1));
        let (next, note) = p.on_timer(firing, &head, 0, &silences, 5 * MIN);
        assert_eq!(next, None);
        assert_eq!(note.map(|n| n.status), Some(Status::Resolved));
    }

    #[test]
    fn the_no_op_shortcut_agrees_with_the_state_machine() {
        for flap_max_changes in [0, 2] {
            no_op_shortcut_agrees(Policy {
                resolve_after_ms: 5 * MIN,
                flap_max_changes,
                ..policy()
            });
        }
    }

    fn no_op_shortcut_agrees(policy: Policy) {
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
        let none = ActiveSilences::default();
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
                            let (next, note) = policy.step(entry.clone(), &a, &none);
                            let unchanged = next == entry && note.is_none();
                            assert_eq!(
                                policy.is_noop(entry.as_ref().map(Head::of).as_ref(), &a, &none),
                                unchanged,
                                "{k:?} on {entry:?}"
                            );
                        }
                        entry = policy
                            .step(entry.clone(), &act(k.clone(), i as u64 * 3 * MIN), &none)
                            .0;
                    }
                }
            }
        }
    }
}
