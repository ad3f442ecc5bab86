//! The `*.test.yaml` format as serde types. Parsing is strict: unknown keys
//! are errors, and values that need parsing (times, offsets, levels) are
//! parsed inside their visitor so an error points at the value's own line
//! and column.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::alert::{Severity, Status};

/// A `*.test.yaml` file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFile {
    /// Globs under `rules_dir` choosing the rules under test, as in a
    /// subscription. Default: the `.rhai` file beside this one with the same
    /// stem (`alert.test.yaml` tests `alert.rhai`).
    #[serde(default)]
    pub rules: Option<Vec<String>>,
    /// Test a configured subscription instead: its rules, group and streams.
    #[serde(default)]
    pub subscription: Option<String>,
    /// Stream of every input that names none; default the subscription's
    /// first stream, else the first stream a rule under test lists in
    /// `TOPICS`, else the first stream of a configured subscription that runs
    /// one of the rules under test.
    #[serde(default)]
    pub stream: Option<String>,
    /// `ctx.group` the rules see; default the subscription's group, else
    /// [`super::DEFAULT_GROUP`].
    #[serde(default)]
    pub group: Option<String>,
    /// Virtual time at the start of every test (RFC 3339); default
    /// [`super::DEFAULT_START_MS`].
    #[serde(default)]
    pub start: Option<Timestamp>,
    /// The tests; each starts from a clean slate (no firing alerts).
    pub tests: Vec<Case>,
}

/// One test: a sequence of inputs and what they must produce.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// Shown in the report.
    pub name: String,
    /// Inputs, in time order.
    pub steps: Vec<Step>,
    /// Checked once every step has run, over everything the test produced.
    #[serde(default)]
    pub expect: Option<CaseExpect>,
}

/// One input message (or `repeat` copies of it) and what it must produce.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// When it arrives: `+30s` after the previous input (the first one:
    /// after `start`), or an absolute RFC 3339 time. Default `+0s`.
    #[serde(default)]
    pub at: Option<At>,
    /// Send the message this many times, each one `at` after the previous,
    /// so "the same reading every 10 s for 5 minutes" is one step.
    #[serde(default = "one")]
    pub repeat: u32,
    /// Stream the message arrives on; default the file's `stream`.
    #[serde(default)]
    pub stream: Option<String>,
    /// Entry id (`ctx.id`); default `<virtual ms>-<n>` as Redis would assign.
    #[serde(default)]
    pub id: Option<String>,
    /// Delivery count the rules see (`ctx.delivery_count`).
    #[serde(default = "one_u64")]
    pub deliveries: u64,
    /// The message body: a mapping is sent as JSON in a `payload` field; a
    /// string is sent verbatim (so broken JSON can be tested).
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    /// Raw flat stream fields instead of a payload, as `XADD s * k v …`
    /// would write them (numbers become numbers when decoded).
    #[serde(default)]
    pub fields: Option<BTreeMap<String, Text>>,
    /// Wrap the payload in a Watermill envelope (implied by `metadata` or
    /// `uuid`).
    #[serde(default)]
    pub watermill: bool,
    /// Watermill metadata (`ctx.metadata`).
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, Text>>,
    /// Watermill message UUID (`ctx.uuid`).
    #[serde(default)]
    pub uuid: Option<String>,
    /// What this step's message(s) must produce; unchecked parts are left out.
    #[serde(default)]
    pub expect: Option<StepExpect>,
}

fn one() -> u32 {
    1
}
fn one_u64() -> u64 {
    1
}

/// Expectations about one step. A list that is present must account for
/// everything produced (`alerts: []` means "no alert"); an absent one is not
/// checked, except rule errors and undecodable input, which fail the test
/// unless expected here or in the test's `expect`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepExpect {
    /// Alert notifications (firing and resolved) the step sent.
    #[serde(default)]
    pub alerts: Option<Vec<AlertMatch>>,
    /// Alerts firing after the step (whether or not it notified).
    #[serde(default)]
    pub firing: Option<Vec<AlertMatch>>,
    /// Log lines the rules wrote.
    #[serde(default)]
    pub logs: Option<Vec<LogMatch>>,
    /// Rules that failed (threw, hit a sandbox limit).
    #[serde(default)]
    pub errors: Option<Vec<ErrorMatch>>,
    /// Whether a rule called `drop()`.
    #[serde(default)]
    pub dropped: Option<bool>,
    /// `true`, or text the reason must contain: the input cannot be decoded
    /// (it would be dead-lettered). `false`: it must decode.
    #[serde(default)]
    pub undecodable: Option<Undecodable>,
}

/// Expectations about a whole test, over every step.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseExpect {
    /// Every alert notification the test sent, in any order.
    #[serde(default)]
    pub alerts: Option<Vec<AlertMatch>>,
    /// Alerts still firing at the end.
    #[serde(default)]
    pub firing: Option<Vec<AlertMatch>>,
    /// Every log line.
    #[serde(default)]
    pub logs: Option<Vec<LogMatch>>,
    /// Every rule error.
    #[serde(default)]
    pub errors: Option<Vec<ErrorMatch>>,
    /// How many messages were dropped.
    #[serde(default)]
    pub drops: Option<u64>,
}

/// Describes an alert notification; fields left out match anything.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertMatch {
    /// The alert's name, exactly.
    #[serde(default)]
    pub name: Option<String>,
    /// The alert's severity.
    #[serde(default)]
    pub severity: Option<Severity>,
    /// Default `firing`: a resolve must be asked for by name.
    #[serde(default = "firing")]
    pub status: Status,
    /// Labels that must be present with these values; others may exist.
    #[serde(default)]
    pub labels: BTreeMap<String, Text>,
    /// Text the `summary` annotation must contain.
    #[serde(default)]
    pub summary: Option<String>,
    /// Text the `description` annotation must contain.
    #[serde(default)]
    pub description: Option<String>,
    /// Annotations that must be present and contain these texts.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The rule that raised it (path under `rules/` without `.rhai`).
    #[serde(default)]
    pub rule: Option<String>,
}

fn firing() -> Status {
    Status::Firing
}

/// Describes a log line; fields left out match anything.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogMatch {
    /// The level `log()` was given.
    #[serde(default)]
    pub level: Option<Level>,
    /// Text the line must contain.
    #[serde(default)]
    pub contains: Option<String>,
    /// The whole line, exactly.
    #[serde(default)]
    pub text: Option<String>,
    /// The rule that wrote it.
    #[serde(default)]
    pub rule: Option<String>,
}

/// Describes a rule error; fields left out match anything.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorMatch {
    /// The rule that failed.
    #[serde(default)]
    pub rule: Option<String>,
    /// Text the error (with its file:line:col) must contain.
    #[serde(default)]
    pub contains: Option<String>,
}

/// A log level as `log()` accepts it; `warning` is `warn`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Level(pub crate::rules::LogLevel);

impl<'de> Deserialize<'de> for Level {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Level, D::Error> {
        use crate::rules::LogLevel::*;
        parse_str(d, "a log level", |s| {
            match s.to_ascii_lowercase().as_str() {
                "trace" => Ok(Level(Trace)),
                "debug" => Ok(Level(Debug)),
                "info" => Ok(Level(Info)),
                "warn" | "warning" => Ok(Level(Warn)),
                "error" => Ok(Level(Error)),
                _ => Err(format!(
                    "log level `{s}` is not one of trace, debug, info, warn, error"
                )),
            }
        })
    }
}

/// Reads a string and parses it inside the visitor, so a parse error
/// carries the position of the string itself, not of its parent mapping.
fn parse_str<'de, D: Deserializer<'de>, T>(
    d: D,
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error> {
    struct V<T> {
        /// What serde says it expected when the value is not a string.
        expecting: &'static str,
        /// Turns the text into the value, or says what is wrong with it.
        parse: fn(&str) -> Result<T, String>,
    }
    impl<T> Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
            (self.parse)(s).map_err(E::custom)
        }
    }
    d.deserialize_str(V { expecting, parse })
}

/// `undecodable:` — `false` (must decode), `true` (must not), or text the
/// reason must contain.
#[derive(Debug, Clone, PartialEq)]
pub enum Undecodable {
    /// The message must decode.
    No,
    /// The message must not decode; the reason must contain `contains`.
    Yes {
        /// Text the decode error must contain, if given.
        contains: Option<String>,
    },
}

impl<'de> Deserialize<'de> for Undecodable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Undecodable, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Undecodable;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true, false, or text the reason must contain")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Undecodable, E> {
                Ok(if b {
                    Undecodable::Yes { contains: None }
                } else {
                    Undecodable::No
                })
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Undecodable, E> {
                Ok(Undecodable::Yes {
                    contains: Some(s.to_string()),
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// A scalar written as text, the way stream fields and labels are stored:
/// `input_errors: 600` and `input_errors: "600"` are the same field.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// An absolute time in milliseconds since the epoch, written as RFC 3339.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timestamp(pub u64);

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        parse_str(d, "an RFC 3339 time", |s| {
            crate::clock::parse_rfc3339(s)
                .map(Timestamp)
                .ok_or_else(|| format!("`{s}` is not an RFC 3339 time (like 2025-01-01T00:00:00Z)"))
        })
    }
}

/// When a step's message arrives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum At {
    /// `+30s`: this long after the previous input.
    After(Duration),
    /// An RFC 3339 time.
    Exactly(u64),
}

impl<'de> Deserialize<'de> for At {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<At, D::Error> {
        parse_str(d, "an offset like +30s or an RFC 3339 time", |s| {
            let s = s.trim();
            if let Some(offset) = s.strip_prefix('+') {
                return humantime::parse_duration(offset.trim())
                    .map(At::After)
                    .map_err(|e| format!("`{s}`: {e} (write offsets like +30s, +5m, +1h30m)"));
            }
            crate::clock::parse_rfc3339(s).map(At::Exactly).ok_or_else(|| {
                format!(
                    "`{s}` is neither an offset like +30s nor an RFC 3339 time like 2025-01-01T00:00:30Z"
                )
            })
        })
    }
}
