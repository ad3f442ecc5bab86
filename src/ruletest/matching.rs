//! Matching what a test expected against what the rules produced, and the
//! diff shown when they differ.
//!
//! Lists are compared as multisets: every expectation must match a distinct
//! produced item and every produced item must be matched. Expectations may
//! overlap (`{name: X}` and `{name: X, labels: {…}}`), so the pairing is a
//! maximum bipartite matching, not first-fit, and a test never fails because
//! a loose expectation grabbed the item a strict one needed.

use crate::alert::Alert;
use crate::escape::escape;
use crate::rules::LogLevel;

use super::{AlertMatch, ErrorMatch, LogMatch};

/// Something a test can expect, and what it is compared with.
pub trait Expectation {
    type Got: Shown;
    fn matches(&self, got: &Self::Got) -> bool;
    /// One line saying what was expected, naming only the fields given.
    fn describe(&self) -> String;
}

/// One line showing a produced item in full.
pub trait Shown {
    fn show(&self) -> String;
}

/// A log line a rule wrote.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// The rule that wrote it.
    pub rule: String,
    /// The level it was written at.
    pub level: LogLevel,
    /// The line itself.
    pub text: String,
}

/// A rule that failed on a message.
#[derive(Debug, Clone)]
pub struct RuleFailure {
    /// The rule that failed.
    pub rule: String,
    /// The error, with file:line:col.
    pub text: String,
}

impl Shown for Alert {
    fn show(&self) -> String {
        let mut s = format!(
            "{} {} {} {}",
            status(self.status),
            self.severity.as_str(),
            self.name,
            labels(self.labels.iter())
        );
        if let Some(summary) = self.annotations.get("summary") {
            s.push_str(&format!(" summary {summary:?}"));
        }
        s.push_str(&format!(" [rule {}]", self.rule));
        s
    }
}

impl Shown for LogLine {
    fn show(&self) -> String {
        format!("{} {}: {:?}", self.level.as_str(), self.rule, self.text)
    }
}

impl Shown for RuleFailure {
    fn show(&self) -> String {
        format!("{}: {}", self.rule, self.text)
    }
}

fn status(s: crate::alert::Status) -> &'static str {
    match s {
        crate::alert::Status::Firing => "firing",
        crate::alert::Status::Resolved => "resolved",
    }
}

fn labels<'a>(it: impl Iterator<Item = (&'a String, &'a String)>) -> String {
    let inner: Vec<String> = it.map(|(k, v)| format!("{k}={v}")).collect();
    format!("{{{}}}", inner.join(", "))
}

impl Expectation for AlertMatch {
    type Got = Alert;

    fn matches(&self, a: &Alert) -> bool {
        let contains = |key: &str, want: &str| {
            a.annotations
                .get(key)
                .is_some_and(|have| have.contains(want))
        };
        a.status == self.status
            && self.name.as_ref().is_none_or(|n| &a.name == n)
            && self.severity.is_none_or(|s| a.severity == s)
            && self.rule.as_ref().is_none_or(|r| &a.rule == r)
            && self
                .labels
                .iter()
                .all(|(k, v)| a.labels.get(k) == Some(&v.0))
            && self.summary.as_ref().is_none_or(|s| contains("summary", s))
            && self
                .description
                .as_ref()
                .is_none_or(|s| contains("description", s))
            && self.annotations.iter().all(|(k, v)| contains(k, v))
    }

    fn describe(&self) -> String {
        let mut parts = vec![status(self.status).to_string()];
        if let Some(s) = self.severity {
            parts.push(s.as_str().to_string());
        }
        parts.push(self.name.clone().unwrap_or_else(|| "(any name)".into()));
        if !self.labels.is_empty() {
            parts.push(labels(self.labels.iter().map(|(k, v)| (k, &v.0))));
        }
        if let Some(s) = &self.summary {
            parts.push(format!("summary contains {s:?}"));
        }
        if let Some(s) = &self.description {
            parts.push(format!("description contains {s:?}"));
        }
        for (k, v) in &self.annotations {
            parts.push(format!("{k} contains {v:?}"));
        }
        if let Some(r) = &self.rule {
            parts.push(format!("[rule {r}]"));
        }
        parts.join(" ")
    }
}

impl Expectation for LogMatch {
    type Got = LogLine;

    fn matches(&self, l: &LogLine) -> bool {
        self.level.is_none_or(|lv| lv.0 == l.level)
            && self.rule.as_ref().is_none_or(|r| &l.rule == r)
            && self.text.as_ref().is_none_or(|t| &l.text == t)
            && self.contains.as_ref().is_none_or(|c| l.text.contains(c))
    }

    fn describe(&self) -> String {
        let mut parts = vec![
            self.level
                .map(|l| l.0.as_str().to_string())
                .unwrap_or_else(|| "(any level)".into()),
        ];
        if let Some(r) = &self.rule {
            parts.push(format!("{r}:"));
        }
        if let Some(t) = &self.text {
            parts.push(format!("{t:?}"));
        }
        if let Some(c) = &self.contains {
            parts.push(format!("contains {c:?}"));
        }
        parts.join(" ")
    }
}

impl Expectation for ErrorMatch {
    type Got = RuleFailure;

    fn matches(&self, e: &RuleFailure) -> bool {
        self.rule.as_ref().is_none_or(|r| &e.rule == r)
            && self.contains.as_ref().is_none_or(|c| e.text.contains(c))
    }

    fn describe(&self) -> String {
        let mut parts = vec![match &self.rule {
            Some(r) => format!("{r}:"),
            None => "(any rule):".into(),
        }];
        if let Some(c) = &self.contains {
            parts.push(format!("contains {c:?}"));
        }
        parts.join(" ")
    }
}

/// `None` when `expected` and `got` pair up one to one; otherwise the diff:
/// matched items as context, `-` for expectations nothing matched, `+` for
/// produced items nobody expected. Each item is escaped: labels, summaries
/// and errors carry message text, and a newline in one must not add a
/// forged line to the diff.
pub fn compare<E: Expectation>(what: &str, expected: &[E], got: &[E::Got]) -> Option<String> {
    let adjacent: Vec<Vec<bool>> = expected
        .iter()
        .map(|e| got.iter().map(|g| e.matches(g)).collect())
        .collect();
    let owner = max_matching(&adjacent, got.len());
    let matched = owner.iter().flatten().count();
    if matched == expected.len() && matched == got.len() {
        return None;
    }
    let mut out = format!("{what} (- expected but not produced, + produced but not expected):");
    for (j, g) in got.iter().enumerate() {
        if owner[j].is_some() {
            out.push_str(&format!("\n    {}", escape(&g.show())));
        }
    }
    for (i, e) in expected.iter().enumerate() {
        if !owner.contains(&Some(i)) {
            out.push_str(&format!("\n  - {}", escape(&e.describe())));
        }
    }
    for (j, g) in got.iter().enumerate() {
        if owner[j].is_none() {
            out.push_str(&format!("\n  + {}", escape(&g.show())));
        }
    }
    Some(out)
}

/// Kuhn's augmenting paths: for each produced item, the expectation it is
/// paired with. Lists in a test are short, so O(V·E) is nothing.
fn max_matching(adjacent: &[Vec<bool>], n_got: usize) -> Vec<Option<usize>> {
    fn augment(
        i: usize,
        adjacent: &[Vec<bool>],
        seen: &mut [bool],
        owner: &mut [Option<usize>],
    ) -> bool {
        for j in 0..owner.len() {
            if adjacent[i][j] && !seen[j] {
                seen[j] = true;
                if owner[j].is_none_or(|k| augment(k, adjacent, seen, owner)) {
                    owner[j] = Some(i);
                    return true;
                }
            }
        }
        false
    }
    let mut owner = vec![None; n_got];
    for i in 0..adjacent.len() {
        let mut seen = vec![false; n_got];
        augment(i, adjacent, &mut seen, &mut owner);
    }
    owner
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(text: &str) -> LogLine {
        LogLine {
            rule: "r".into(),
            level: LogLevel::Warn,
            text: text.into(),
        }
    }

    fn contains(c: &str) -> LogMatch {
        LogMatch {
            level: None,
            contains: Some(c.into()),
            text: None,
            rule: None,
        }
    }

    #[test]
    fn loose_expectation_does_not_steal_the_strict_ones_item() {
        // First-fit would pair "low" with "low a" and leave "a" unmatched.
        let got = [log("low a"), log("low")];
        assert_eq!(
            compare("logs", &[contains("low"), contains("a")], &got),
            None
        );
    }

    #[test]
    fn diff_marks_missing_and_unexpected() {
        let got = [log("kept"), log("surprise")];
        let diff = compare("logs", &[contains("kept"), contains("gone")], &got).unwrap();
        assert!(diff.contains("\n    warn r: \"kept\""), "{diff}");
        assert!(
            diff.contains("\n  - (any level) contains \"gone\""),
            "{diff}"
        );
        assert!(diff.contains("\n  + warn r: \"surprise\""), "{diff}");
    }

    #[test]
    fn empty_expectation_means_none() {
        assert_eq!(compare::<LogMatch>("logs", &[], &[]), None);
        assert!(compare::<LogMatch>("logs", &[], &[log("x")]).is_some());
    }
}
