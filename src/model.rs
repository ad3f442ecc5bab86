//! The alert as rules raise it, the outbox carries it and every sink
//! receives it, and its identity (the fingerprint). It depends on nothing
//! else in the crate, so metrics, sinks and the lifecycle can all name it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How bad it is; ordered so routes can say "at least major".
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    #[default]
    Warning,
    Major,
    Critical,
}

impl Severity {
    pub fn parse(s: &str) -> Option<Severity> {
        match s.to_ascii_lowercase().as_str() {
            "info" => Some(Severity::Info),
            "warning" => Some(Severity::Warning),
            "major" => Some(Severity::Major),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Major => "major",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Firing,
    Resolved,
}

/// Where the message that raised an alert came from, so a receiver can find it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Origin {
    pub stream: String,
    pub id: String,
    pub group: String,
}

/// One alert notification, as written to the outbox and read by every sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Hex fingerprint of rule + name + labels: the alert's identity.
    pub fingerprint: String,
    /// The rule (path under `rules/` without `.rhai`) that raised it.
    pub rule: String,
    pub name: String,
    pub severity: Severity,
    pub status: Status,
    pub labels: BTreeMap<String, String>,
    /// `summary`, `description` and any other annotation.
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339; when the alert started firing.
    pub starts_at: String,
    /// RFC 3339; set when resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ends_at: Option<String>,
    pub origin: Origin,
}

impl Alert {
    /// `k=v, k=v` in label order, for human-readable sinks.
    pub fn labels_text(&self) -> String {
        self.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn summary(&self) -> &str {
        self.annotations
            .get("summary")
            .map(String::as_str)
            .unwrap_or(&self.name)
    }
}

/// Identity of an alert: FNV-1a over rule, name and the sorted labels.
/// Stable across processes and versions, unlike `DefaultHasher`.
pub fn fingerprint(rule: &str, name: &str, labels: &BTreeMap<String, String>) -> u64 {
    let mut fp = Fingerprint::new(rule, name);
    for (k, v) in labels {
        fp.label(k, v);
    }
    fp.finish()
}

/// [`fingerprint`] fed one label at a time, in key order: lets a rule's
/// own label map be hashed without copying it.
pub struct Fingerprint(u64);

impl Fingerprint {
    pub fn new(rule: &str, name: &str) -> Fingerprint {
        let mut fp = Fingerprint(0xcbf2_9ce4_8422_2325);
        fp.eat(rule.as_bytes());
        fp.eat(name.as_bytes());
        fp
    }

    pub fn label(&mut self, key: &str, value: &str) {
        self.eat(key.as_bytes());
        self.eat(value.as_bytes());
    }

    pub fn finish(self) -> u64 {
        self.0
    }

    fn eat(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        self.0 = h.wrapping_mul(0x0100_0000_01b3);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_depends_on_every_part() {
        let mut l = BTreeMap::new();
        l.insert("host".to_string(), "r1".to_string());
        let a = fingerprint("r", "n", &l);
        assert_eq!(a, fingerprint("r", "n", &l.clone()));
        assert_ne!(a, fingerprint("r2", "n", &l));
        assert_ne!(a, fingerprint("r", "n2", &l));
        l.insert("if".into(), "x".into());
        assert_ne!(a, fingerprint("r", "n", &l));
        // Boundaries matter: ("ab","c") is not ("a","bc").
        assert_ne!(
            fingerprint("ab", "c", &BTreeMap::new()),
            fingerprint("a", "bc", &BTreeMap::new())
        );
    }
}
