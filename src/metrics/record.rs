//! What `/api/v1/status` and `/api/v1/rules` report that no Redis key or
//! metric holds: the last error of each rule, the last reload of each kind,
//! each sink's health. Events write here from the one function that logs and
//! counts them ([`super::Metrics`]), so the page and the log never disagree.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

use crate::clock::{now_ms, rfc3339};

/// The last failure of one rule, so an operator sees *which* message broke it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RuleError {
    /// RFC 3339.
    pub at: String,
    /// Stream entry id of the message the rule failed on.
    pub message_id: String,
    /// `file:line:col: message`, as the log line has it.
    pub error: String,
}

/// How the last reload of one kind (rules, plugins) went.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Reload {
    /// RFC 3339.
    pub at: String,
    /// What asked for it: `startup`, `SIGHUP`, `HTTP /-/reload`, `file change`.
    pub trigger: String,
    /// `success` or `failure`.
    pub result: &'static str,
    /// What changed, or on failure the errors (`file:line:col: message`).
    pub detail: String,
}

/// A sink's health as its last deliveries left it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sink {
    /// The manifest's `kind`.
    pub kind: String,
    /// `healthy` (last attempt delivered, or none yet), `retrying` (the last
    /// attempt failed and will be retried), `failing` (alerts went to its
    /// dead-letter stream since the last success).
    pub state: &'static str,
    /// RFC 3339 of the last delivery, if any since start.
    pub last_success: Option<String>,
    /// The last delivery error, with its time.
    pub last_error: Option<SinkError>,
    /// Outbox entries not acknowledged yet (undelivered plus in retry).
    pub backlog: i64,
    /// Alerts given up on since start (moved to its dead-letter stream).
    pub dead_letters: u64,
}

/// One delivery error of a sink.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SinkError {
    /// RFC 3339.
    pub at: String,
    /// The receiver's or program's answer.
    pub error: String,
}

/// Everything recorded, behind one lock: events are rare next to messages
/// (a rule error is already a slow path, logged at WARN).
#[derive(Debug, Default)]
struct Book {
    /// By rule name.
    rule_errors: BTreeMap<String, RuleError>,
    /// By kind (`rules`, `plugins`).
    reloads: BTreeMap<String, Reload>,
    /// By sink name.
    sinks: BTreeMap<String, Sink>,
}

/// What the events of one engine left behind for the status API; one per
/// [`super::Metrics`], so an engine built for a test starts empty.
#[derive(Debug, Default)]
pub struct Record(Mutex<Book>);

fn sink<'a>(b: &'a mut Book, name: &str) -> &'a mut Sink {
    b.sinks.entry(name.to_string()).or_insert_with(|| Sink {
        kind: String::new(),
        state: "healthy",
        last_success: None,
        last_error: None,
        backlog: 0,
        dead_letters: 0,
    })
}

impl Record {
    fn with<T>(&self, f: impl FnOnce(&mut Book) -> T) -> T {
        let mut b = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut b)
    }

    pub fn rule_failed(&self, rule: &str, message_id: &str, error: &str) {
        let e = RuleError {
            at: rfc3339(now_ms()),
            message_id: message_id.to_string(),
            error: error.to_string(),
        };
        self.with(|b| b.rule_errors.insert(rule.to_string(), e));
    }

    pub fn rule_error(&self, rule: &str) -> Option<RuleError> {
        self.with(|b| b.rule_errors.get(rule).cloned())
    }

    pub fn reloaded(&self, kind: &str, trigger: &str, ok: bool, detail: &str) {
        let r = Reload {
            at: rfc3339(now_ms()),
            trigger: trigger.to_string(),
            result: if ok { "success" } else { "failure" },
            detail: detail.to_string(),
        };
        self.with(|b| b.reloads.insert(kind.to_string(), r));
    }

    pub fn reloads(&self) -> BTreeMap<String, Reload> {
        self.with(|b| b.reloads.clone())
    }

    pub fn sink_started(&self, name: &str, kind: &str) {
        self.with(|b| sink(b, name).kind = kind.to_string());
    }

    pub fn sink_delivered(&self, name: &str) {
        self.with(|b| {
            let s = sink(b, name);
            s.state = "healthy";
            s.last_success = Some(rfc3339(now_ms()));
        });
    }

    pub fn sink_retrying(&self, name: &str, error: &str) {
        self.with(|b| {
            let s = sink(b, name);
            s.state = "retrying";
            s.last_error = Some(SinkError {
                at: rfc3339(now_ms()),
                error: error.to_string(),
            });
        });
    }

    /// Alerts went to the sink's dead-letter stream.
    pub fn sink_failing(&self, name: &str, n: u64, error: &str) {
        self.with(|b| {
            let s = sink(b, name);
            s.state = "failing";
            s.dead_letters += n;
            s.last_error = Some(SinkError {
                at: rfc3339(now_ms()),
                error: error.to_string(),
            });
        });
    }

    pub fn sink_backlog(&self, name: &str, entries: i64) {
        self.with(|b| sink(b, name).backlog = entries);
    }

    pub fn sinks(&self) -> BTreeMap<String, Sink> {
        self.with(|b| b.sinks.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_after_dead_letters_makes_a_sink_healthy_again() {
        let r = Record::default();
        r.sink_started("status-test-sink", "webhook");
        r.sink_retrying("status-test-sink", "connection refused");
        assert_eq!(r.sinks()["status-test-sink"].state, "retrying");
        r.sink_failing("status-test-sink", 2, "HTTP 400");
        let s = &r.sinks()["status-test-sink"];
        assert_eq!((s.state, s.dead_letters), ("failing", 2));
        r.sink_delivered("status-test-sink");
        let s = &r.sinks()["status-test-sink"];
        assert_eq!(s.state, "healthy");
        assert_eq!(s.last_error.as_ref().unwrap().error, "HTTP 400");
        assert_eq!(s.kind, "webhook");
    }
}
