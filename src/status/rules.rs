//! `/api/v1/rules`: each loaded rule with where it runs, its counters and
//! its last error. The counters are read back from this instance's metrics
//! exposition, the numbers `/metrics` shows, so the two never disagree and
//! the hot path counts nothing twice.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::metrics::Metrics;
use crate::metrics::record::RuleError;
use crate::process::LoadedRules;

/// One rule.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RuleView {
    /// Path under `rules/` without `.rhai`.
    pub name: String,
    /// Path under `rules/`.
    pub file: String,
    /// Alerts are counted and logged, never sent.
    pub shadow: bool,
    /// The subscriptions that select it, each with the streams it sees there.
    pub subscriptions: Vec<RuleSubscription>,
    /// Evaluations since start by decision (alert, resolve, log, drop, pass, error).
    pub evaluations: BTreeMap<String, u64>,
    /// Evaluations that threw or hit a sandbox limit.
    pub errors: u64,
    pub last_error: Option<RuleError>,
    /// Time of one evaluation, estimated from the histogram's buckets.
    pub evaluation_seconds: Quantiles,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RuleSubscription {
    pub name: String,
    pub group: String,
    pub streams: Vec<String>,
}

/// `None` until the rule was evaluated.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Quantiles {
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub count: u64,
}

/// The rules of `loaded`, in file order.
pub fn views(
    loaded: &LoadedRules,
    subscriptions: &[(String, String, Vec<String>)],
    metrics: &Metrics,
) -> Vec<RuleView> {
    let exposition = metrics.encode_prometheus_text();
    let counters = Counters::parse(&exposition);
    loaded
        .set
        .rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let subs = subscriptions
                .iter()
                .filter(|(name, _, _)| loaded.selections.get(name).is_some_and(|s| s.contains(&i)))
                .map(|(name, group, streams)| RuleSubscription {
                    name: name.clone(),
                    group: group.clone(),
                    streams: streams
                        .iter()
                        .filter(|s| rule.handles(s))
                        .cloned()
                        .collect(),
                })
                .collect();
            RuleView {
                name: rule.name.clone(),
                file: rule.rel_path.clone(),
                shadow: rule.shadow,
                subscriptions: subs,
                evaluations: counters
                    .evaluations
                    .get(&rule.name)
                    .cloned()
                    .unwrap_or_default(),
                errors: counters.errors.get(&rule.name).copied().unwrap_or(0),
                last_error: metrics.record.rule_error(&rule.name),
                evaluation_seconds: counters
                    .buckets
                    .get(&rule.name)
                    .map(|b| quantiles(b))
                    .unwrap_or_default(),
            }
        })
        .collect()
}

/// The per-rule series of the exposition.
#[derive(Debug, Default)]
struct Counters {
    evaluations: BTreeMap<String, BTreeMap<String, u64>>,
    errors: BTreeMap<String, u64>,
    /// Cumulative `(le, count)` pairs, in exposition order (ascending `le`).
    buckets: BTreeMap<String, Vec<(f64, u64)>>,
}

impl Counters {
    fn parse(text: &str) -> Counters {
        let mut c = Counters::default();
        for line in text.lines() {
            let Some((name, labels, value)) = sample(line) else {
                continue;
            };
            let Some(rule) = labels.get("rule").cloned() else {
                continue;
            };
            match name {
                "tripline_rule_evaluations_total" => {
                    if let Some(d) = labels.get("decision") {
                        c.evaluations
                            .entry(rule)
                            .or_default()
                            .insert(d.clone(), value as u64);
                    }
                }
                "tripline_rule_errors_total" => {
                    c.errors.insert(rule, value as u64);
                }
                "tripline_rule_evaluation_seconds_bucket" => {
                    let le = match labels.get("le").map(String::as_str) {
                        Some("+Inf") => f64::INFINITY,
                        Some(le) => le.parse().unwrap_or(f64::INFINITY),
                        None => continue,
                    };
                    c.buckets.entry(rule).or_default().push((le, value as u64));
                }
                _ => {}
            }
        }
        c
    }
}

/// `name{k="v",…} value` → its parts; `None` for comments and other lines.
fn sample(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
    let open = line.find('{')?;
    let name = &line[..open];
    let mut labels = BTreeMap::new();
    let mut rest = &line[open + 1..];
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            let value = after.split_whitespace().next()?.parse().ok()?;
            return Some((name, labels, value));
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, ch) = chars.next()?;
            match ch {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                other => value.push(other),
            }
        };
        labels.insert(key.to_string(), value);
        rest = &after[end + 1..];
    }
}

/// p50/p90/p99 by linear interpolation inside the bucket, as Prometheus'
/// `histogram_quantile` does.
fn quantiles(buckets: &[(f64, u64)]) -> Quantiles {
    let count = buckets.last().map_or(0, |b| b.1);
    let q = |q: f64| -> Option<f64> {
        if count == 0 {
            return None;
        }
        let rank = q * count as f64;
        let mut lower = (0.0, 0u64);
        for &(le, n) in buckets {
            if n as f64 >= rank {
                if le.is_infinite() {
                    return Some(lower.0);
                }
                let inside = (n - lower.1) as f64;
                let share = if inside == 0.0 {
                    0.0
                } else {
                    (rank - lower.1 as f64) / inside
                };
                return Some(lower.0 + (le - lower.0) * share);
            }
            lower = (le, n);
        }
        Some(lower.0)
    };
    // Nanoseconds are below what the buckets can tell apart.
    let ns = |v: Option<f64>| v.map(|s| (s * 1e9).round() / 1e9);
    Quantiles {
        p50: ns(q(0.5)),
        p90: ns(q(0.9)),
        p99: ns(q(0.99)),
        count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_names_with_quotes_and_newlines_survive_the_exposition() {
        let text = "# TYPE x counter\ntripline_rule_errors_total{rule=\"a\\\"b\\nc\"} 7\n";
        let c = Counters::parse(text);
        assert_eq!(c.errors.get("a\"b\nc"), Some(&7));
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let b = [(1.0, 0), (2.0, 100), (f64::INFINITY, 100)];
        let q = quantiles(&b);
        assert_eq!(q.count, 100);
        assert_eq!(q.p50, Some(1.5));
        assert!((q.p99.unwrap() - 1.99).abs() < 1e-9);
        assert_eq!(quantiles(&[(1.0, 0), (f64::INFINITY, 0)]).p50, None);
    }
}
