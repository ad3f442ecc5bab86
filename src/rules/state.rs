//! Per-series state the rule helpers keep between messages: the last sample
//! of each counter (`rate`, `delta`) and the gauges rules export (`metric`).
//!
//! One [`RuleState`] belongs to one engine: the rule API's functions capture
//! it when the engine is built, and `/metrics` reads its gauges. A `tripline
//! test` case builds its own, so cases never see each other's samples.
//!
//! Keyed by rule name + the rule's own key, so it survives a reload of the
//! rule and is dropped when the rule is deleted. It is per instance: with
//! several instances in one group each sees a subset of a series' samples,
//! which keeps `rate` right (it is change over time between the samples this
//! instance saw) while `delta` is the change since *this instance's* last
//! sample. Alert lifecycle state, which must be exact across instances, is in
//! Redis instead (see `alert::book`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

/// Shards of the sample map, so parallel workers rarely contend.
const SHARDS: usize = 16;
/// Samples not updated for this long are forgotten (bounded memory when
/// devices come and go).
pub const SAMPLE_TTL_MS: u64 = 3_600_000;
/// Label sets one exported gauge may have; more is a rule error, not an
/// out-of-memory.
pub const MAX_SERIES_PER_METRIC: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Sample {
    value: f64,
    at_ms: u64,
}

/// Keys are `<rule>\0<key>`, the key from the message (hostname and
/// interface, say): hashed with aHash, several times faster than SipHash on
/// such keys and still randomly seeded against crafted collisions.
type Samples = HashMap<String, Sample, ahash::RandomState>;

/// The samples and gauges of one engine's rules.
#[derive(Debug)]
pub struct RuleState {
    /// Last sample per series, sharded so parallel workers rarely contend.
    samples: [Mutex<Samples>; SHARDS],
    /// Gauges the rules set with `metric()`, by name.
    gauges: Mutex<Gauges>,
}

impl Default for RuleState {
    fn default() -> RuleState {
        RuleState {
            samples: std::array::from_fn(|_| Mutex::new(Samples::default())),
            gauges: Mutex::new(Gauges::new()),
        }
    }
}

thread_local! {
    /// The full key of the sample being looked up, reused: a lookup per
    /// message must not allocate.
    static FULL_KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

fn shard_of(key: &str) -> usize {
    let mut h: u32 = 2166136261;
    for b in key.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(16777619);
    }
    h as usize % SHARDS
}

/// Samples closer together than this count as this far apart: a rate over
/// a few milliseconds is noise (700 errors 1 ms apart are not 700,000/s),
/// and two samples in the same millisecond must not read as "no change".
const MIN_RATE_WINDOW_S: f64 = 1.0;

impl RuleState {
    /// Change of a monotonic counter since the previous sample of `key`:
    /// returns (increase, seconds elapsed), or `None` for the first sample and
    /// for samples older than the previous one. A counter that went down was
    /// reset (a reboot): the increase is then the new value itself, never
    /// negative.
    fn advance(&self, rule: &str, key: &str, value: f64, at_ms: u64) -> Option<(f64, f64)> {
        FULL_KEY.with(|full| {
            let mut full = full.borrow_mut();
            full.clear();
            full.push_str(rule);
            full.push('\u{0}');
            full.push_str(key);
            self.advance_full(&full, value, at_ms)
        })
    }

    fn advance_full(&self, full: &str, value: f64, at_ms: u64) -> Option<(f64, f64)> {
        let mut shard = self.samples[shard_of(full)]
            .lock()
            .expect("sample shard poisoned");
        let now = Sample { value, at_ms };
        // Called per message: the key is copied into the map only for a new series.
        let Some(slot) = shard.get_mut(full) else {
            shard.insert(full.to_string(), now);
            return None;
        };
        if at_ms < slot.at_ms {
            return None;
        }
        let prev = std::mem::replace(slot, now);
        let increase = if value >= prev.value {
            value - prev.value
        } else {
            value
        };
        Some((increase, (at_ms - prev.at_ms) as f64 / 1000.0))
    }

    /// Per-second rate, or `None` when the sample tells none: the first of
    /// its series (after a restart, or once another instance took the
    /// series over), one older than the last, or one at the same moment (a
    /// redelivered entry). A rate check must not act on these: taken as 0,
    /// they resolved a firing rate alert after every restart, and fired a
    /// falling one.
    pub fn known_rate(&self, rule: &str, key: &str, value: f64, at_ms: u64) -> Option<f64> {
        self.advance(rule, key, value, at_ms)
            .filter(|(_, secs)| *secs > 0.0)
            .map(|(inc, secs)| inc / secs.max(MIN_RATE_WINDOW_S))
    }

    /// Per-second rate; 0.0 on the first sample and for out-of-order samples.
    pub fn rate(&self, rule: &str, key: &str, value: f64, at_ms: u64) -> f64 {
        self.advance(rule, key, value, at_ms)
            .map_or(0.0, |(inc, secs)| inc / secs.max(MIN_RATE_WINDOW_S))
    }

    /// Increase since the previous sample; 0.0 on the first.
    pub fn delta(&self, rule: &str, key: &str, value: f64, at_ms: u64) -> f64 {
        self.advance(rule, key, value, at_ms)
            .map_or(0.0, |(inc, _)| inc)
    }

    /// Forgets samples not updated since `now_ms - SAMPLE_TTL_MS`.
    pub fn evict_stale(&self, now_ms: u64) {
        for shard in &self.samples {
            shard
                .lock()
                .expect("sample shard poisoned")
                .retain(|_, s| now_ms.saturating_sub(s.at_ms) < SAMPLE_TTL_MS);
        }
    }
}

type Gauges = BTreeMap<String, GaugeFamily>;

#[derive(Debug, Default)]
struct GaugeFamily {
    /// Rules that set this gauge; a deleted rule's series are dropped.
    series: BTreeMap<Vec<(String, String)>, (f64, String)>,
}

/// Why `metric()` refused a value.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GaugeError {
    #[error("metric name `{0}` must match [a-zA-Z_][a-zA-Z0-9_]*")]
    Name(String),
    #[error("label name `{0}` must match [a-zA-Z_][a-zA-Z0-9_]* and not start with __")]
    Label(String),
    #[error("metric `{0}` already has {MAX_SERIES_PER_METRIC} label sets")]
    TooMany(String),
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl RuleState {
    /// Sets gauge `tripline_<name>{labels}` to `value`.
    pub fn set_gauge(
        &self,
        rule: &str,
        name: &str,
        value: f64,
        labels: Vec<(String, String)>,
    ) -> Result<(), GaugeError> {
        if !valid_name(name) {
            return Err(GaugeError::Name(name.to_string()));
        }
        if let Some((bad, _)) = labels
            .iter()
            .find(|(k, _)| !valid_name(k) || k.starts_with("__"))
        {
            return Err(GaugeError::Label(bad.clone()));
        }
        let mut all = self.gauges.lock().expect("gauges poisoned");
        let family = all.entry(name.to_string()).or_default();
        if family.series.len() >= MAX_SERIES_PER_METRIC && !family.series.contains_key(&labels) {
            return Err(GaugeError::TooMany(name.to_string()));
        }
        family.series.insert(labels, (value, rule.to_string()));
        Ok(())
    }

    /// Drops the samples and gauges of deleted rules.
    pub fn forget_rules(&self, rules: &[String]) {
        let prefixes: Vec<String> = rules.iter().map(|r| format!("{r}\u{0}")).collect();
        for shard in &self.samples {
            shard
                .lock()
                .expect("sample shard poisoned")
                .retain(|k, _| !prefixes.iter().any(|p| k.starts_with(p)));
        }
        let mut all = self.gauges.lock().expect("gauges poisoned");
        for family in all.values_mut() {
            family.series.retain(|_, (_, rule)| !rules.contains(rule));
        }
        all.retain(|_, f| !f.series.is_empty());
    }
}

/// Exposes the rule gauges of one [`RuleState`] on `/metrics`, encoded at
/// scrape time.
#[derive(Debug)]
pub struct RuleGauges(pub Arc<RuleState>);

impl Collector for RuleGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let all = self.0.gauges.lock().expect("gauges poisoned");
        for (name, family) in all.iter() {
            let mut metric = encoder.encode_descriptor(
                name,
                "Exported by a rule through metric()",
                None,
                MetricType::Gauge,
            )?;
            for (labels, (value, _)) in &family.series {
                metric.encode_family(labels)?.encode_gauge(value)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_handles_first_sample_reset_and_disorder() {
        let s = RuleState::default();
        let r = "state-test-rate";
        assert_eq!(s.rate(r, "k", 100.0, 0), 0.0);
        assert_eq!(s.rate(r, "k", 200.0, 10_000), 10.0);
        // Reboot: counter back to 50 → increase 50 over 10 s, not -150.
        assert_eq!(s.rate(r, "k", 50.0, 20_000), 5.0);
        // Older than the last sample: ignored.
        assert_eq!(s.rate(r, "k", 40.0, 15_000), 0.0);
        assert_eq!(s.rate(r, "k", 70.0, 30_000), 2.0);
        // Milliseconds apart, or the same millisecond: over at least 1 s.
        assert_eq!(s.rate(r, "k", 770.0, 30_001), 700.0);
        assert_eq!(s.rate(r, "k", 780.0, 30_001), 10.0);
    }

    #[test]
    fn delta_is_per_key_and_per_rule() {
        let s = RuleState::default();
        assert_eq!(s.delta("state-test-d1", "a", 5.0, 0), 0.0);
        assert_eq!(s.delta("state-test-d1", "a", 8.0, 1), 3.0);
        assert_eq!(s.delta("state-test-d2", "a", 100.0, 2), 0.0);
        assert_eq!(s.delta("state-test-d1", "b", 1.0, 3), 0.0);
    }

    #[test]
    fn forgetting_a_rule_drops_its_state() {
        let s = RuleState::default();
        s.rate("state-test-gone", "k", 1.0, 0);
        s.set_gauge("state-test-gone", "state_test_g", 1.0, vec![])
            .unwrap();
        s.forget_rules(&["state-test-gone".to_string()]);
        assert_eq!(
            s.rate("state-test-gone", "k", 5.0, 1000),
            0.0,
            "first sample again"
        );
        assert!(!s.gauges.lock().unwrap().contains_key("state_test_g"));
    }

    #[test]
    fn gauge_names_are_validated() {
        let s = RuleState::default();
        assert!(matches!(
            s.set_gauge("r", "bad-name", 1.0, vec![]),
            Err(GaugeError::Name(_))
        ));
        assert!(matches!(
            s.set_gauge("r", "ok", 1.0, vec![("__x".into(), "v".into())]),
            Err(GaugeError::Label(_))
        ));
    }

    #[test]
    fn engines_share_no_samples_or_gauges() {
        let (a, b) = (RuleState::default(), RuleState::default());
        a.delta("r", "k", 5.0, 0);
        a.set_gauge("r", "g", 1.0, vec![]).unwrap();
        assert_eq!(b.delta("r", "k", 8.0, 1), 0.0, "first sample in b");
        assert!(b.gauges.lock().unwrap().is_empty());
        assert_eq!(a.delta("r", "k", 8.0, 1), 3.0);
    }
}
