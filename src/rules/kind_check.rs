//! `check:` in an alert kind: a threshold, a band or a silence on one
//! message field, which the engine evaluates itself on every message the
//! rule handles, without calling into Rhai.
//!
//! ```rhai
//! const HIGH = alert_kind(#{ name: "HighErrors", labels: ["hostname"],
//!     check: #{ field: "errors", at_least: 1000, escalate: #{ critical: 100000 } } });
//! ```
//!
//! Rhai spends a few thousand instructions on every step of a script
//! (resolving and calling a function, reading a map field), so even a rule
//! made of native helpers pays tens of thousands per message: the shipped
//! alert rule, three alerts on one counter, ran at 0.59× a bare consume
//! loop (docs/performance.md). Most alerts on telemetry are exactly this:
//! a number past a threshold, a rate inside a band, a device gone quiet.
//! Declared, they cost a field lookup and a comparison, and a rule made
//! only of them needs no `on_message` at all.

use rhai::{Dynamic, ImmutableString, Map};

use super::api::duration_ms;
use crate::model::Severity;

/// What `check` reads: its keys, for the error naming an unknown one.
const CHECK_KEYS: &str =
    "field, above, at_least, below, at_most, clear, escalate, rate, silent_after";

/// A check on one field of every message.
#[derive(Debug)]
pub struct Check {
    /// The message field holding the reading.
    pub field: ImmutableString,
    pub test: Test,
}

#[derive(Debug)]
pub enum Test {
    Threshold(Threshold),
    /// A deadman watch: fires when no message with a number in the field
    /// arrives for this long (per label values), resolves when one does.
    Silent {
        after_ms: u64,
    },
}

/// Fires past `fire`, resolves past `clear`.
#[derive(Debug)]
pub struct Threshold {
    /// `above`/`at_least` fire on high values, `below`/`at_most` on low
    /// ones: the direction also says which side of `fire` `clear` and the
    /// escalations must be on.
    pub rising: bool,
    /// `at_least`/`at_most`: a value equal to `fire` fires (the seed's "at
    /// or above 10,000"); `above`/`below`: it does not.
    pub inclusive: bool,
    pub fire: f64,
    /// A band: the alert resolves only once the value is past this (strictly),
    /// and between the two it stays as it is, so a value hovering at the
    /// threshold does not flap. `None`: it resolves as soon as it stops firing.
    pub clear: Option<f64>,
    /// Severities for more extreme values, most extreme first: a reading
    /// takes the first whose threshold it reaches (compared like `fire`).
    pub escalate: Vec<(f64, Severity)>,
    /// The value compared is the field's per-second rate (a counter reset
    /// counts as a fresh start, not a negative rate), not the field itself.
    pub rate: bool,
}

impl Threshold {
    fn reaches(&self, value: f64, bound: f64) -> bool {
        match (self.rising, self.inclusive) {
            (true, true) => value >= bound,
            (true, false) => value > bound,
            (false, true) => value <= bound,
            (false, false) => value < bound,
        }
    }

    /// Whether `value` fires the alert.
    pub fn fires(&self, value: f64) -> bool {
        self.reaches(value, self.fire)
    }

    /// Whether `value` (which does not fire) resolves it.
    pub fn clears(&self, value: f64) -> bool {
        match self.clear {
            None => true,
            Some(c) if self.rising => value < c,
            Some(c) => value > c,
        }
    }

    /// The escalated severity of a firing `value`, if any.
    pub fn severity(&self, value: f64) -> Option<Severity> {
        self.escalate
            .iter()
            .find(|(bound, _)| self.reaches(value, *bound))
            .map(|(_, s)| *s)
    }
}

impl Check {
    /// Reads `check: #{…}`; every mistake is named here, at load.
    pub fn parse(v: &Dynamic) -> Result<Check, String> {
        const F: &str = "alert_kind(): `check`";
        let Some(map) = v.read_lock::<Map>() else {
            return Err(format!(
                "{F} must be a map like #{{ field: \"errors\", at_least: 1000 }}, got {}",
                v.type_name()
            ));
        };
        let mut field = None;
        let mut comparisons = Vec::new();
        let mut clear = None;
        let mut escalate = Vec::new();
        let mut rate = false;
        let mut silent_after = None;
        for (key, value) in map.iter() {
            match key.as_str() {
                "field" => match value.read_lock::<ImmutableString>() {
                    Some(s) if !s.is_empty() => field = Some(s.clone()),
                    _ => {
                        return Err(format!(
                            "{F}: `field` must name a message field, got {value} ({})",
                            value.type_name()
                        ));
                    }
                },
                "above" | "at_least" | "below" | "at_most" => {
                    comparisons.push((key.to_string(), bound(key, value)?));
                }
                "clear" => clear = Some(bound(key, value)?),
                "escalate" => escalate = escalations(value)?,
                "rate" => {
                    rate = value
                        .as_bool()
                        .map_err(|_| format!("{F}: `rate` must be true or false, got {value}"))?;
                }
                "silent_after" => match duration_ms(F, key, value) {
                    Ok(0) => return Err(format!("{F}: `silent_after` must be longer than 0")),
                    Ok(ms) => silent_after = Some(ms),
                    Err(e) => return Err(e),
                },
                other => {
                    return Err(format!("{F} has no key `{other}` (it takes {CHECK_KEYS})"));
                }
            }
        }
        let Some(field) = field else {
            return Err(format!("{F} needs `field`: the message field it reads"));
        };
        if let Some(after_ms) = silent_after {
            if !comparisons.is_empty() || clear.is_some() || !escalate.is_empty() || rate {
                return Err(format!(
                    "{F}: `silent_after` watches for readings that stop coming; it takes no threshold, clear, escalate or rate"
                ));
            }
            return Ok(Check {
                field,
                test: Test::Silent { after_ms },
            });
        }
        threshold(field, &comparisons, clear, escalate, rate)
    }

    /// `input_errors at_least 10000, critical at 100000`, for `tripline check`.
    pub fn describe(&self) -> String {
        let t = match &self.test {
            Test::Silent { after_ms } => {
                return format!(
                    "silent_after {} without {}",
                    humantime::format_duration(std::time::Duration::from_millis(*after_ms)),
                    self.field
                );
            }
            Test::Threshold(t) => t,
        };
        let op = match (t.rising, t.inclusive) {
            (true, true) => "at_least",
            (true, false) => "above",
            (false, true) => "at_most",
            (false, false) => "below",
        };
        let mut s = format!(
            "{}{} {op} {}",
            if t.rate { "rate of " } else { "" },
            self.field,
            t.fire
        );
        if let Some(c) = t.clear {
            s.push_str(&format!(", clear {c}"));
        }
        for (b, sev) in &t.escalate {
            s.push_str(&format!(", {} at {b}", sev.as_str()));
        }
        s
    }
}

/// The threshold of a `check`: exactly one comparison, a `clear` on the side
/// that does not fire, escalations on the side that does.
fn threshold(
    field: ImmutableString,
    comparisons: &[(String, f64)],
    clear: Option<f64>,
    mut escalate: Vec<(f64, Severity)>,
    rate: bool,
) -> Result<Check, String> {
    const F: &str = "alert_kind(): `check`";
    let (op, fire) = match comparisons {
        [(op, fire)] => (op.as_str(), *fire),
        [] => {
            return Err(format!(
                "{F} needs one of above, at_least, below, at_most (or silent_after)"
            ));
        }
        _ => {
            let ops: Vec<&str> = comparisons.iter().map(|(op, _)| op.as_str()).collect();
            return Err(format!(
                "{F} takes one threshold, got {}",
                ops.join(" and ")
            ));
        }
    };
    let rising = matches!(op, "above" | "at_least");
    escalate.sort_by(|a, b| {
        if rising {
            b.0.total_cmp(&a.0)
        } else {
            a.0.total_cmp(&b.0)
        }
    });
    let t = Threshold {
        rising,
        inclusive: matches!(op, "at_least" | "at_most"),
        fire,
        clear,
        escalate,
        rate,
    };
    if let Some(c) = t.clear
        && ((rising && c > fire) || (!rising && c < fire))
    {
        let side = if rising { "above" } else { "below" };
        return Err(format!(
            "{F}: clear {c} is {side} the threshold {fire}: it must be on the side that does not fire"
        ));
    }
    if let Some((b, s)) = t.escalate.iter().find(|(b, _)| !t.reaches(*b, fire)) {
        return Err(format!(
            "{F}: escalate {} at {b} does not fire ({op} {fire}): an escalation is a more extreme value",
            s.as_str()
        ));
    }
    Ok(Check {
        field,
        test: Test::Threshold(t),
    })
}

fn bound(key: &str, v: &Dynamic) -> Result<f64, String> {
    if let Ok(i) = v.as_int() {
        Ok(i as f64)
    } else if let Ok(f) = v.as_float()
        && f.is_finite()
    {
        Ok(f)
    } else {
        Err(format!(
            "alert_kind(): `check.{key}` must be a number, got {v} ({})",
            v.type_name()
        ))
    }
}

/// `escalate: #{ critical: 100000 }`, in the map's order: the caller,
/// which knows the direction, sorts it most extreme first.
fn escalations(v: &Dynamic) -> Result<Vec<(f64, Severity)>, String> {
    let Some(map) = v.read_lock::<Map>() else {
        return Err(format!(
            "alert_kind(): `check.escalate` must map severities to thresholds, like #{{ critical: 100000 }}, got {}",
            v.type_name()
        ));
    };
    let mut out = Vec::new();
    for (level, b) in map.iter() {
        let s = Severity::parse(level).ok_or_else(|| {
            format!(
                "alert_kind(): `check.escalate`: severity `{level}` is not one of info, warning, major, critical"
            )
        })?;
        out.push((bound(&format!("escalate.{level}"), b)?, s));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str) -> Result<Check, String> {
        Check::parse(&serde_json::from_str::<Dynamic>(json).unwrap())
    }

    fn threshold(json: &str) -> Threshold {
        match check(json).unwrap().test {
            Test::Threshold(t) => t,
            Test::Silent { .. } => panic!("{json} is a threshold"),
        }
    }

    #[test]
    fn a_check_names_what_is_wrong() {
        for (json, says) in [
            (r#"{"at_least": 1}"#, "needs `field`"),
            (
                r#"{"field": 3, "above": 1}"#,
                "`field` must name a message field",
            ),
            (
                r#"{"field": "x"}"#,
                "needs one of above, at_least, below, at_most",
            ),
            (
                r#"{"field": "x", "above": 1, "below": 0}"#,
                "takes one threshold, got",
            ),
            (
                r#"{"field": "x", "above": "high"}"#,
                "`check.above` must be a number",
            ),
            (
                r#"{"field": "x", "above": 10, "clear": 20}"#,
                "clear 20 is above the threshold 10",
            ),
            (
                r#"{"field": "x", "below": 10, "clear": 5}"#,
                "clear 5 is below the threshold 10",
            ),
            (
                r#"{"field": "x", "at_least": 10, "escalate": {"critical": 5}}"#,
                "escalate critical at 5 does not fire",
            ),
            (
                r#"{"field": "x", "above": 1, "escalate": {"urgent": 5}}"#,
                "severity `urgent`",
            ),
            (
                r#"{"field": "x", "above": 1, "escalate": 5}"#,
                "must map severities",
            ),
            (
                r#"{"field": "x", "above": 1, "rate": "yes"}"#,
                "`rate` must be true or false",
            ),
            (
                r#"{"field": "x", "silent_after": "5m", "above": 1}"#,
                "takes no threshold",
            ),
            (r#"{"field": "x", "silent_after": 0}"#, "longer than 0"),
            (
                r#"{"field": "x", "silent_after": "soon"}"#,
                "must be a duration",
            ),
            (r#"{"field": "x", "over": 1}"#, "no key `over`"),
        ] {
            let e = check(json).unwrap_err();
            assert!(e.contains(says), "{json}: {e}");
        }
        assert!(
            Check::parse(&Dynamic::from(3_i64))
                .unwrap_err()
                .contains("must be a map")
        );
    }

    #[test]
    fn each_comparison_fires_on_its_side_and_clears_past_the_band() {
        let at_least = threshold(r#"{"field": "x", "at_least": 10}"#);
        assert!(at_least.fires(10.0) && !at_least.fires(9.9));
        assert!(
            at_least.clears(9.9),
            "no band: resolves once it stops firing"
        );
        let above = threshold(r#"{"field": "x", "above": 10, "clear": 5}"#);
        assert!(!above.fires(10.0) && above.fires(10.1));
        assert!(
            !above.clears(5.0) && above.clears(4.9),
            "inside the band it holds"
        );
        let below = threshold(r#"{"field": "x", "below": -40.0, "clear": -38}"#);
        assert!(below.fires(-40.1) && !below.fires(-40.0));
        assert!(!below.clears(-39.0) && below.clears(-37.9));
        let at_most = threshold(r#"{"field": "x", "at_most": 0}"#);
        assert!(at_most.fires(0.0) && !at_most.fires(0.1));
    }

    #[test]
    fn escalation_takes_the_most_extreme_severity_reached() {
        let up = threshold(
            r#"{"field": "x", "at_least": 10, "escalate": {"critical": 1000, "major": 100}}"#,
        );
        assert_eq!(up.severity(50.0), None, "the declared severity");
        assert_eq!(up.severity(100.0), Some(Severity::Major));
        assert_eq!(up.severity(5000.0), Some(Severity::Critical));
        let down =
            threshold(r#"{"field": "x", "below": 10, "escalate": {"major": 5, "critical": 1}}"#);
        assert_eq!(down.severity(7.0), None);
        assert_eq!(down.severity(4.0), Some(Severity::Major));
        assert_eq!(down.severity(0.5), Some(Severity::Critical));
    }

    #[test]
    fn describe_says_what_is_checked() {
        let c = check(r#"{"field": "e", "rate": true, "above": 50, "clear": 5}"#).unwrap();
        assert_eq!(c.describe(), "rate of e above 50, clear 5");
        let c = check(r#"{"field": "e", "silent_after": "5m"}"#).unwrap();
        assert_eq!(c.describe(), "silent_after 5m without e");
    }
}
