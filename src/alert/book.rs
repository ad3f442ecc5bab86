//! Which alerts are firing, so an alert asserted on every message is sent
//! once (and again each repeat interval), and a resolve is sent only for an
//! alert that was firing.
//!
//! Transitions are provisional until the batch that caused them is committed:
//! if the commit fails, [`AlertBook::rollback`] restores the previous state so
//! the redelivered messages raise the same notifications again.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{Alert, Status};

#[derive(Debug, Clone)]
struct Entry {
    /// The last firing notification, kept to build the resolve from it.
    alert: Alert,
    /// Milliseconds since the epoch of the last notification sent.
    notified_ms: u64,
}

/// A change made by one assertion, undone if its batch fails to commit.
#[derive(Debug)]
pub struct Transition {
    fingerprint: u64,
    previous: Option<Entry>,
}

#[derive(Debug)]
pub struct AlertBook {
    firing: Mutex<HashMap<u64, Entry>>,
    /// Minimum gap between two notifications of a still-firing alert.
    repeat_ms: u64,
}

impl AlertBook {
    pub fn new(repeat_interval: std::time::Duration) -> Self {
        AlertBook {
            firing: Mutex::new(HashMap::new()),
            repeat_ms: repeat_interval.as_millis() as u64,
        }
    }

    /// Records that `alert` (status firing) holds at `now_ms`; returns the
    /// notification to send, if any.
    pub fn fire(&self, fp: u64, mut alert: Alert, now_ms: u64) -> Option<(Alert, Transition)> {
        let mut firing = self.firing.lock().expect("alert book poisoned");
        match firing.get_mut(&fp) {
            Some(entry)
                if now_ms.saturating_sub(entry.notified_ms) < self.repeat_ms
                    && entry.alert.severity == alert.severity =>
            {
                None
            }
            Some(entry) => {
                let previous = entry.clone();
                alert.starts_at = entry.alert.starts_at.clone();
                entry.alert = alert.clone();
                entry.notified_ms = now_ms;
                Some((
                    alert,
                    Transition {
                        fingerprint: fp,
                        previous: Some(previous),
                    },
                ))
            }
            None => {
                firing.insert(
                    fp,
                    Entry {
                        alert: alert.clone(),
                        notified_ms: now_ms,
                    },
                );
                Some((
                    alert,
                    Transition {
                        fingerprint: fp,
                        previous: None,
                    },
                ))
            }
        }
    }

    /// Resolves the alert `fp` if it is firing; returns the notification.
    pub fn resolve(&self, fp: u64, ends_at: String) -> Option<(Alert, Transition)> {
        let mut firing = self.firing.lock().expect("alert book poisoned");
        let entry = firing.remove(&fp)?;
        let mut alert = entry.alert.clone();
        alert.status = Status::Resolved;
        alert.ends_at = Some(ends_at);
        Some((
            alert,
            Transition {
                fingerprint: fp,
                previous: Some(entry),
            },
        ))
    }

    /// Undoes transitions, newest first, after their batch failed to commit.
    pub fn rollback(&self, transitions: Vec<Transition>) {
        let mut firing = self.firing.lock().expect("alert book poisoned");
        for t in transitions.into_iter().rev() {
            match t.previous {
                Some(entry) => firing.insert(t.fingerprint, entry),
                None => firing.remove(&t.fingerprint),
            };
        }
    }

    /// Forgets every firing alert raised by one of `rules` (rules a reload
    /// removed) and returns them as resolved notifications ending at
    /// `ends_at`: nothing is left to resolve them later.
    pub fn retire_rules(&self, rules: &[String], ends_at: &str) -> Vec<Alert> {
        let mut firing = self.firing.lock().expect("alert book poisoned");
        let mut retired = Vec::new();
        firing.retain(|_, entry| {
            if !rules.contains(&entry.alert.rule) {
                return true;
            }
            let mut alert = entry.alert.clone();
            alert.status = Status::Resolved;
            alert.ends_at = Some(ends_at.to_string());
            retired.push(alert);
            false
        });
        retired.sort_by(|a, b| a.fingerprint.cmp(&b.fingerprint));
        retired
    }

    pub fn firing_count(&self) -> usize {
        self.firing.lock().expect("alert book poisoned").len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Origin, Severity};
    use super::*;
    use std::time::Duration;

    fn alert() -> Alert {
        Alert {
            fingerprint: "1".into(),
            rule: "r".into(),
            name: "n".into(),
            severity: Severity::Major,
            status: Status::Firing,
            labels: Default::default(),
            annotations: Default::default(),
            starts_at: "t0".into(),
            ends_at: None,
            origin: Origin::default(),
        }
    }

    #[test]
    fn fires_once_then_repeats_after_interval() {
        let book = AlertBook::new(Duration::from_secs(60));
        assert!(book.fire(1, alert(), 0).is_some());
        assert!(book.fire(1, alert(), 59_999).is_none());
        let (again, _) = book.fire(1, alert(), 60_000).unwrap();
        assert_eq!(again.starts_at, "t0");
    }

    #[test]
    fn severity_change_notifies_at_once() {
        let book = AlertBook::new(Duration::from_secs(60));
        book.fire(1, alert(), 0).unwrap();
        let mut worse = alert();
        worse.severity = Severity::Critical;
        assert!(book.fire(1, worse, 1).is_some());
    }

    #[test]
    fn resolve_only_when_firing() {
        let book = AlertBook::new(Duration::from_secs(60));
        assert!(book.resolve(1, "t1".into()).is_none());
        book.fire(1, alert(), 0).unwrap();
        let (r, _) = book.resolve(1, "t1".into()).unwrap();
        assert_eq!(r.status, Status::Resolved);
        assert_eq!(r.ends_at.as_deref(), Some("t1"));
        assert!(book.resolve(1, "t2".into()).is_none());
    }

    #[test]
    fn retiring_a_rule_resolves_only_its_alerts() {
        let book = AlertBook::new(Duration::from_secs(60));
        let mut gone = alert();
        gone.rule = "gone".into();
        book.fire(1, alert(), 0).unwrap();
        book.fire(2, gone, 0).unwrap();
        let retired = book.retire_rules(&["gone".to_string()], "t9");
        assert_eq!(retired.len(), 1);
        assert_eq!(retired[0].rule, "gone");
        assert_eq!(retired[0].status, Status::Resolved);
        assert_eq!(retired[0].ends_at.as_deref(), Some("t9"));
        assert_eq!(book.firing_count(), 1);
        assert!(book.resolve(2, "t10".into()).is_none());
        assert!(
            book.fire(1, alert(), 1).is_none(),
            "the kept rule's alert is still firing"
        );
    }

    #[test]
    fn rollback_makes_failed_batch_notify_again() {
        let book = AlertBook::new(Duration::from_secs(60));
        let (_, t) = book.fire(1, alert(), 0).unwrap();
        book.rollback(vec![t]);
        assert!(book.fire(1, alert(), 1).is_some());
        let (_, t) = book.resolve(1, "x".into()).unwrap();
        book.rollback(vec![t]);
        assert_eq!(book.firing_count(), 1);
    }
}
