//! Reloading rules and plugins while messages flow.
//!
//! Rules: the whole directory is compiled into a new set; only if every file
//! compiles is it swapped in (one atomic pointer store). A batch loads the
//! set once when it starts, so in-flight messages finish on the version they
//! started with and the next batch sees the new one. On any error the last
//! good set keeps running. Plugins: the manifest set is validated whole, then
//! the supervisor restarts only the sinks whose file changed.
//!
//! Triggers (file watcher, SIGHUP, `POST /-/reload`) all end up in
//! [`Reloader::reload`]; one reload runs at a time.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::config::Subscription;
use crate::metrics;
use crate::process::LoadedRules;
use crate::rules::RuleSet;
use crate::sinks::supervisor::Supervisor;

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

    fn summary(&self) -> String {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        format!(
            "added: {}; changed: {}; removed: {}",
            list(&self.added),
            list(&self.changed),
            list(&self.removed)
        )
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

pub struct Reloader {
    pub engine: Arc<rhai::Engine>,
    /// The live rule set the workers read.
    pub rules: Arc<ArcSwap<LoadedRules>>,
    pub sinks: Arc<Supervisor>,
    pub rules_dir: PathBuf,
    pub plugins_dir: PathBuf,
    pub subscriptions: Vec<Subscription>,
    /// Serialises reloads: two saves in quick succession apply in order.
    pub lock: tokio::sync::Mutex<()>,
}

impl Reloader {
    /// Reloads rules and plugins; `trigger` names the cause in the log.
    pub async fn reload(&self, trigger: &str) -> ReloadReport {
        let _one_at_a_time = self.lock.lock().await;
        tracing::debug!(trigger, "reloading");
        let rules = self.reload_rules().await;
        metrics::reload("rules", rules.ok, &detail(&rules));
        let plugins = self.reload_plugins().await;
        metrics::reload("plugins", plugins.ok, &detail(&plugins));
        ReloadReport { rules, plugins }
    }

    async fn reload_rules(&self) -> PartReport {
        let engine = self.engine.clone();
        let dir = self.rules_dir.clone();
        let compiled = tokio::task::spawn_blocking(move || RuleSet::load(&engine, &dir))
            .await
            .expect("rule compilation does not panic");
        let set = match compiled {
            Ok(set) => set,
            Err(e) => return PartReport::failed(e.to_string()),
        };
        let old = self.rules.load();
        let report = diff(
            old.set
                .rules
                .iter()
                .map(|r| (r.name.clone(), r.source_hash))
                .collect(),
            set.rules
                .iter()
                .map(|r| (r.name.clone(), r.source_hash))
                .collect(),
        );
        self.rules
            .store(Arc::new(LoadedRules::new(set, &self.subscriptions)));
        report
    }

    async fn reload_plugins(&self) -> PartReport {
        let dir = self.plugins_dir.clone();
        let loaded = tokio::task::spawn_blocking(move || crate::sinks::load_dir(&dir))
            .await
            .expect("manifest loading does not panic");
        match loaded {
            Ok(manifests) => {
                let c = self.sinks.apply(manifests).await;
                PartReport {
                    ok: true,
                    added: c.added,
                    changed: c.changed,
                    removed: c.removed,
                    error: None,
                }
            }
            Err(errors) => PartReport::failed(
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
        }
    }
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
    }
}
