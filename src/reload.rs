//! Reloading rules and plugins while messages flow.
//!
//! Rules: the whole directory is compiled into a new set; only if every file
//! compiles is it swapped in (one atomic pointer store). A batch loads the
//! set once when it starts, so in-flight messages finish on the version they
//! started with and the next batch sees the new one. On any error the last
//! good set keeps running. Plugins: the manifest set is validated whole, then
//! the supervisor restarts only the sinks whose file changed.
//!
//! A rule the new set no longer has is retired: its firing alerts are
//! resolved (written to the outbox of the stream that raised them) and
//! forgotten. Rules that remain keep their state: the alert book is keyed by
//! fingerprint (rule name + alert name + labels), not by rule version.
//!
//! Triggers ([`watch`], SIGHUP, `POST /-/reload`) all end up here; one
//! reload runs at a time. SIGHUP and HTTP always reload and report; the
//! watcher calls [`Reloader::reload_if_changed`], which neither counts nor
//! logs a result equal to what already runs (same files, or the same error
//! as last time).

pub mod watch;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::alert::Alert;
use crate::alert::store::{Settled, Settlement, Store};
use crate::config::Subscription;
use crate::metrics::{self, Metrics};
use crate::process::LoadedRules;
use crate::redis_conn::{Backoff, LazyConn, RedisTarget};
use crate::rules::{RuleEngine, RuleSet};
use crate::runtime::Runtime;
use crate::sinks::supervisor::Supervisor;

/// How long a reload that removed rules waits for batches still judging
/// with the old set; far above one batch (judging plus a commit that times
/// out after 5 s), so only a stuck batch hits it.
const RETIRE_WAIT: Duration = Duration::from_secs(10);
/// How long the resolves of removed rules' alerts are retried while Redis
/// is unreachable; the reload lock is held meanwhile.
const RETIRE_WRITE_DEADLINE: Duration = Duration::from_secs(10);

/// Outcome of one part of a reload.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PartReport {
    pub ok: bool,
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    /// The compile or validation errors (file:line:col: message), on failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl PartReport {
    fn failed(error: String) -> PartReport {
        PartReport {
            ok: false,
            added: Vec::new(),
            changed: Vec::new(),
            removed: Vec::new(),
            error: Some(error),
        }
    }

    fn unchanged(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }

    /// `added a, b; changed c; removed d`, naming only what happened.
    fn summary(&self) -> String {
        let parts: Vec<String> = [
            ("added", &self.added),
            ("changed", &self.changed),
            ("removed", &self.removed),
        ]
        .iter()
        .filter(|(_, names)| !names.is_empty())
        .map(|(what, names)| format!("{what} {}", names.join(", ")))
        .collect();
        if parts.is_empty() {
            "no changes".to_string()
        } else {
            parts.join("; ")
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    pub rules: PartReport,
    pub plugins: PartReport,
}

impl ReloadReport {
    pub fn ok(&self) -> bool {
        self.rules.ok && self.plugins.ok
    }
}

/// What the last reload of each kind left behind. Lives inside the lock
/// that serialises reloads.
#[derive(Debug, Default)]
pub struct LastReload {
    /// The error of the last rules reload while the files on disk differ
    /// from what runs; `None` when in sync.
    rules_error: Option<String>,
    /// Same for plugins.
    plugins_error: Option<String>,
}

pub struct Reloader {
    pub engine: Arc<RuleEngine>,
    /// The live rule set the workers read.
    pub rules: Arc<ArcSwap<LoadedRules>>,
    pub sinks: Arc<Supervisor>,
    pub rules_dir: PathBuf,
    pub plugins_dir: PathBuf,
    pub subscriptions: Vec<Subscription>,
    /// The workers' alert state: a removed rule's firing alerts are taken
    /// out of it and resolved.
    pub store: Store,
    /// Where those resolves are written.
    pub target: RedisTarget,
    /// Serialises reloads (two saves in quick succession apply in order)
    /// and remembers what the last one left behind.
    pub lock: tokio::sync::Mutex<LastReload>,
    /// Where reloads are counted, and the rule state a removed rule's
    /// samples and gauges are dropped from.
    pub runtime: Runtime,
}

impl Reloader {
    /// Reloads rules and plugins and reports both, changed or not;
    /// `trigger` names the cause in the log.
    pub async fn reload(&self, trigger: &str) -> ReloadReport {
        let mut last = self.lock.lock().await;
        tracing::debug!(trigger, "reloading");
        let rules = (self.reload_rules(&mut last, true).await).expect("forced reloads report");
        let plugins = (self.reload_plugins(&mut last, true).await).expect("forced reloads report");
        emit(&self.runtime.metrics, "rules", trigger, &rules);
        emit(&self.runtime.metrics, "plugins", trigger, &plugins);
        ReloadReport { rules, plugins }
    }

    /// Reloads what differs from what runs. A kind whose files compile to
    /// exactly the running set (or fail with the error already reported) is
    /// neither counted nor logged, so a save that changes nothing, or a
    /// stray event, is not a reload.
    pub async fn reload_if_changed(&self, trigger: &str) {
        let mut last = self.lock.lock().await;
        if let Some(rules) = self.reload_rules(&mut last, false).await {
            emit(&self.runtime.metrics, "rules", trigger, &rules);
        }
        if let Some(plugins) = self.reload_plugins(&mut last, false).await {
            emit(&self.runtime.metrics, "plugins", trigger, &plugins);
        }
    }

    /// Compiles the rules directory and swaps the set in if it differs;
    /// `None` when not `forced` and the result equals what runs.
    async fn reload_rules(&self, last: &mut LastReload, forced: bool) -> Option<PartReport> {
        let engine = self.engine.clone();
        let dir = self.rules_dir.clone();
        // A panic on one file is that file's compile error (see
        // `RuleSet::load`); one anywhere else fails this reload, not the
        // watcher, the SIGHUP handler or the HTTP request that asked.
        let compiled = tokio::task::spawn_blocking(move || RuleSet::load(&engine, &dir)).await;
        let set = match compiled {
            Ok(Ok(set)) => set,
            Ok(Err(e)) => return failure(&mut last.rules_error, e.to_string(), forced),
            Err(e) => {
                let text = format!("loading the rules failed: {e}");
                return failure(&mut last.rules_error, text, forced);
            }
        };
        let report = {
            let old = self.rules.load();
            diff(
                old.set
                    .rules
                    .iter()
                    .map(|r| (r.name.clone(), r.source_hash))
                    .collect(),
                set.rules
                    .iter()
                    .map(|r| (r.name.clone(), r.source_hash))
                    .collect(),
            )
        };
        let was_failing = last.rules_error.take().is_some();
        if report.unchanged() {
            return (forced || was_failing).then_some(report);
        }
        let old = self
            .rules
            .swap(Arc::new(LoadedRules::new(set, &self.subscriptions)));
        if !report.removed.is_empty() {
            self.retire(old, &report.removed).await;
        }
        Some(report)
    }

    /// Validates the plugins directory and lets the supervisor restart the
    /// sinks that changed; `None` when not `forced` and nothing changed.
    async fn reload_plugins(&self, last: &mut LastReload, forced: bool) -> Option<PartReport> {
        let dir = self.plugins_dir.clone();
        let loaded = tokio::task::spawn_blocking(move || crate::sinks::load_dir(&dir)).await;
        let manifests = match loaded {
            Ok(Ok(manifests)) => manifests,
            Err(e) => {
                let text = format!("loading the plugins failed: {e}");
                return failure(&mut last.plugins_error, text, forced);
            }
            Ok(Err(errors)) => {
                let text = errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n");
                return failure(&mut last.plugins_error, text, forced);
            }
        };
        let c = self.sinks.apply(manifests).await;
        let report = PartReport {
            ok: true,
            added: c.added,
            changed: c.changed,
            removed: c.removed,
            error: None,
        };
        let was_failing = last.plugins_error.take().is_some();
        (forced || was_failing || !report.unchanged()).then_some(report)
    }

    /// Drops the state of `removed` rules and resolves their firing alerts.
    /// Waits first until no batch judged with `old` is still in flight: such
    /// a batch could re-fire a removed rule's alert after its resolve, or
    /// roll its resolve back.
    async fn retire(&self, old: Arc<LoadedRules>, removed: &[String]) {
        let waited = tokio::time::Instant::now();
        while Arc::strong_count(&old) > 1 {
            if waited.elapsed() > RETIRE_WAIT {
                tracing::warn!(
                    "a batch judged with the previous rules is still in flight after {RETIRE_WAIT:?}; resolving the removed rules' alerts anyway"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(old);
        self.runtime.rules.forget_rules(removed);
        let resolved = self.write_resolved(removed).await;
        for rule in removed {
            metrics::rule_retired(rule, resolved.iter().filter(|a| &a.rule == rule).count());
        }
    }

    /// Removes the rules' alert state and writes the resolves of their
    /// firing alerts, retrying while Redis is unreachable (or another
    /// instance changes the same alerts) up to [`RETIRE_WRITE_DEADLINE`].
    async fn write_resolved(&self, removed: &[String]) -> Vec<Alert> {
        let deadline = tokio::time::Instant::now() + RETIRE_WRITE_DEADLINE;
        let mut conn = LazyConn::new(self.target.clone());
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut sent = Vec::new();
        'attempt: loop {
            let mut conflicted = false;
            for tag in self.store.tags() {
                let retire = Settlement::Retire {
                    tag: &tag,
                    rules: removed,
                };
                match self.store.settle(&mut conn, retire).await {
                    Ok(Settled::Committed(notified)) => {
                        for a in &notified {
                            self.runtime.metrics.alert_notified(a);
                        }
                        sent.extend(notified);
                    }
                    Ok(Settled::Contended) => conflicted = true,
                    Err(e) => {
                        conn.reset();
                        let delay = backoff.next_delay();
                        if tokio::time::Instant::now() + delay > deadline {
                            self.give_up(removed, &e.to_string()).await;
                            return sent;
                        }
                        tokio::time::sleep(delay).await;
                        continue 'attempt;
                    }
                }
            }
            if !conflicted {
                return sent;
            }
        }
    }

    /// Past the deadline: forgets the removed rules' alerts here anyway and
    /// reports the resolves that could not be written.
    async fn give_up(&self, removed: &[String], error: &str) {
        for tag in self.store.tags() {
            let unsent = self.store.forget_here(&tag, removed).await;
            self.runtime.metrics.retired_alerts_unsent(&unsent, error);
        }
    }
}

/// A failed part: reported unless not `forced` and it is the error already
/// reported last time.
fn failure(last_error: &mut Option<String>, error: String, forced: bool) -> Option<PartReport> {
    if !forced && last_error.as_deref() == Some(error.as_str()) {
        return None;
    }
    *last_error = Some(error.clone());
    Some(PartReport::failed(error))
}

fn emit(metrics: &Metrics, kind: &str, trigger: &str, p: &PartReport) {
    metrics.reload(kind, trigger, p.ok, &detail(p));
}

fn detail(p: &PartReport) -> String {
    match &p.error {
        Some(e) => e.clone(),
        None => p.summary(),
    }
}

/// Names added, changed (different source) and removed between two sets.
fn diff(old: HashMap<String, u64>, new: HashMap<String, u64>) -> PartReport {
    let mut r = PartReport {
        ok: true,
        added: Vec::new(),
        changed: Vec::new(),
        removed: Vec::new(),
        error: None,
    };
    for (name, hash) in &new {
        match old.get(name) {
            None => r.added.push(name.clone()),
            Some(h) if h != hash => r.changed.push(name.clone()),
            Some(_) => {}
        }
    }
    r.removed = old
        .keys()
        .filter(|n| !new.contains_key(*n))
        .cloned()
        .collect();
    r.added.sort();
    r.changed.sort();
    r.removed.sort();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_added_changed_removed() {
        let old = HashMap::from([("a".to_string(), 1), ("b".to_string(), 2)]);
        let new = HashMap::from([("b".to_string(), 3), ("c".to_string(), 4)]);
        let r = diff(old, new);
        assert_eq!(r.added, ["c"]);
        assert_eq!(r.changed, ["b"]);
        assert_eq!(r.removed, ["a"]);
        assert_eq!(r.summary(), "added c; changed b; removed a");
        let same = diff(
            HashMap::from([("a".to_string(), 1)]),
            HashMap::from([("a".to_string(), 1)]),
        );
        assert!(same.unchanged());
        assert_eq!(same.summary(), "no changes");
    }

    #[test]
    fn an_error_already_reported_is_not_reported_again_unless_forced() {
        let mut last = None;
        assert!(failure(&mut last, "r.rhai:1:2: bad".into(), false).is_some());
        assert!(failure(&mut last, "r.rhai:1:2: bad".into(), false).is_none());
        assert!(failure(&mut last, "r.rhai:1:2: bad".into(), true).is_some());
        let other = failure(&mut last, "r.rhai:3:1: worse".into(), false).unwrap();
        assert_eq!(other.error.as_deref(), Some("r.rhai:3:1: worse"));
    }
}
