//! The runtime context: what the parts of one engine share (metrics,
//! silences, the rule helpers' state), built once and handed to each part,
//! the way mini-redis hands its `Db` to every connection. Nothing is
//! process-wide: a test, or each `tripline test` case, builds its own and
//! starts from nothing.

use std::sync::Arc;

use crate::alert::silence::ActiveSilences;
use crate::alert::{AlertBook, Policy};
use crate::config::Limits;
use crate::metrics::Metrics;
use crate::rules::state::{RuleGauges, RuleState};
use crate::rules::{RuleEngine, build_engine};

/// Cheap to clone: every field is shared.
#[derive(Clone)]
pub struct Runtime {
    /// Every metric family; each subsystem emits into it and `/metrics`
    /// encodes it.
    pub metrics: Arc<Metrics>,
    /// The silences in force, refreshed from Redis; the lifecycle and the
    /// sinks consult them.
    pub silences: Arc<ActiveSilences>,
    /// The samples and gauges of the rule helpers: the engine's functions
    /// write them, `/metrics` exports the gauges, reload forgets a removed
    /// rule's and the timers evict stale ones.
    pub rules: Arc<RuleState>,
}

impl Runtime {
    /// Everything empty: no metric counted, no silence in force, no
    /// sample. The rule gauges are exported by this runtime's metrics.
    pub fn new() -> Runtime {
        let rules = Arc::new(RuleState::default());
        Runtime {
            metrics: Arc::new(Metrics::new(vec![Box::new(RuleGauges(rules.clone()))])),
            silences: Arc::default(),
            rules,
        }
    }
}

impl Runtime {
    /// An alert book that consults these silences and counts into these
    /// metrics.
    pub fn alert_book(&self, policy: Policy) -> AlertBook {
        AlertBook::new(policy, self.silences.clone(), self.metrics.clone())
    }

    /// The frozen Rhai engine whose helpers keep their series in this
    /// runtime's rule state and whose rules count into its metrics.
    pub fn rule_engine(&self, limits: &Limits) -> Arc<RuleEngine> {
        build_engine(limits, &self.rules, &self.metrics)
    }
}

impl Default for Runtime {
    fn default() -> Runtime {
        Runtime::new()
    }
}
