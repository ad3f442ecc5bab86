//! `*.test.yaml`: unit tests for rules, run by `tripline test`.
//!
//! A test file names the rules under test, feeds them messages on a virtual
//! clock and states what must come out. Every message goes through
//! [`crate::process::Processor::process`], the code production runs, with a
//! fresh alert book per test, so dedup, repeat intervals and
//! resolve-only-if-firing behave exactly as they do live. The format is
//! documented for users in `docs/rules-testing.md`; this module parses it
//! strictly (an unknown key is an error naming the key and its line) and
//! [`run`] executes it.

pub mod locate;
mod matching;
pub mod run;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::alert::{Severity, Status};
use crate::config::Config;
use crate::replay::{Fields, json_fields};
use crate::rules::RuleSet;
use locate::Seg;

/// Virtual time of the first input when a file sets no `start`:
/// 2025-01-01T00:00:00Z. Fixed, so alert timestamps in output are stable.
pub const DEFAULT_START_MS: u64 = 1_735_689_600_000;

/// Watermill UUID of enveloped test inputs that set no `uuid`.
const DEFAULT_UUID: &str = "00000000-0000-4000-8000-000000000000";

/// Consumer group the rules see (`ctx.group`) when neither `group` nor
/// `subscription` says otherwise.
pub const DEFAULT_GROUP: &str = "tripline-test";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestFileError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Malformed YAML, an unknown key, a value of the wrong type.
    #[error("{}: {message}", located(path, *line, *column))]
    Parse {
        path: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    /// Parsed, but does not make a runnable test (no such rule, a stream no
    /// rule under test reads, time going backwards, …).
    #[error("{}: {message}", located(path, *line, None))]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
}

/// `file:line:col`, with whatever parts are known.
pub fn located(path: &Path, line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("{}:{l}:{c}", path.display()),
        (Some(l), None) => format!("{}:{l}", path.display()),
        _ => path.display().to_string(),
    }
}

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
    /// [`DEFAULT_GROUP`].
    #[serde(default)]
    pub group: Option<String>,
    /// Virtual time at the start of every test (RFC 3339); default
    /// [`DEFAULT_START_MS`].
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
    #[serde(default)]
    pub name: Option<String>,
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
    #[serde(default)]
    pub level: Option<Level>,
    /// Text the line must contain.
    #[serde(default)]
    pub contains: Option<String>,
    /// The whole line, exactly.
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub rule: Option<String>,
}

/// Describes a rule error; fields left out match anything.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorMatch {
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
        expecting: &'static str,
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
    No,
    Yes { contains: Option<String> },
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
            crate::replay::parse_rfc3339(s)
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
            crate::replay::parse_rfc3339(s).map(At::Exactly).ok_or_else(|| {
                format!(
                    "`{s}` is neither an offset like +30s nor an RFC 3339 time like 2025-01-01T00:00:30Z"
                )
            })
        })
    }
}

/// One message the runner will send, fully resolved.
#[derive(Debug, Clone)]
pub struct Input {
    pub stream: String,
    pub id: String,
    pub deliveries: u64,
    pub fields: Fields,
    pub now_ms: u64,
}

/// A test file that parsed and makes sense against the loaded rules.
#[derive(Debug)]
pub struct Suite {
    pub path: PathBuf,
    /// The file's text, to find lines of failing tests on demand.
    pub text: String,
    /// Indices into the rule set of the rules under test, in path order.
    pub selection: Vec<usize>,
    /// `ctx.group`.
    pub group: String,
    /// Per test: its name and, per step, the messages it sends.
    pub cases: Vec<PreparedCase>,
}

/// A test with its inputs resolved to streams, ids and virtual times.
#[derive(Debug)]
pub struct PreparedCase {
    pub name: String,
    /// Per step, the messages it sends (`repeat` copies).
    pub steps: Vec<Vec<Input>>,
    pub step_expects: Vec<StepExpect>,
    pub expect: CaseExpect,
}

impl Suite {
    /// Reads and checks one test file against the compiled rules.
    pub fn load(path: &Path, config: &Config, set: &RuleSet) -> Result<Suite, TestFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TestFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Suite::parse(path, text, config, set)
    }

    /// Checks the text of a test file; `path` names it in errors and finds
    /// the default rule beside it.
    pub fn parse(
        path: &Path,
        text: String,
        config: &Config,
        set: &RuleSet,
    ) -> Result<Suite, TestFileError> {
        let file: TestFile = serde_yaml::from_str(&text).map_err(|e| parse_error(path, e))?;
        let invalid = |at: &[Seg], message: String| TestFileError::Invalid {
            path: path.to_path_buf(),
            line: locate::line_of(&text, at),
            message,
        };
        if file.rules.is_some() && file.subscription.is_some() {
            return Err(invalid(
                &[Seg::Key("subscription")],
                "give either `rules` or `subscription`, not both".into(),
            ));
        }
        let (selection, group, sub_streams) = match (&file.subscription, &file.rules) {
            (Some(name), _) => {
                let sub = config
                    .subscriptions
                    .iter()
                    .find(|s| &s.name == name)
                    .ok_or_else(|| {
                        let known: Vec<&str> = config
                            .subscriptions
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect();
                        invalid(
                            &[Seg::Key("subscription")],
                            format!(
                                "no subscription `{name}` in the config (configured: {})",
                                known.join(", ")
                            ),
                        )
                    })?;
                (
                    set.select(&sub.rules),
                    sub.group().to_string(),
                    Some(sub.streams.clone()),
                )
            }
            (None, Some(globs)) => {
                for (i, g) in globs.iter().enumerate() {
                    globset::Glob::new(g).map_err(|e| {
                        invalid(
                            &[Seg::Key("rules"), Seg::Index(i)],
                            format!("bad rule glob `{g}`: {e}"),
                        )
                    })?;
                }
                let selection = set.select(globs);
                if selection.is_empty() {
                    return Err(invalid(
                        &[Seg::Key("rules")],
                        format!(
                            "`rules` {globs:?} matches no rule under {}",
                            config.rules_dir.display()
                        ),
                    ));
                }
                (selection, DEFAULT_GROUP.to_string(), None)
            }
            (None, None) => (
                vec![rule_beside(path, config, set).map_err(|m| invalid(&[], m))?],
                DEFAULT_GROUP.to_string(),
                None,
            ),
        };
        let group = file.group.clone().unwrap_or(group);
        let default_stream = file
            .stream
            .clone()
            .or_else(|| sub_streams.as_ref().and_then(|s| s.first().cloned()))
            .or_else(|| {
                selection
                    .iter()
                    .find_map(|&i| set.rules[i].topics().and_then(|t| t.first().cloned()))
            })
            .or_else(|| {
                config
                    .subscriptions
                    .iter()
                    .find(|s| set.select(&s.rules).iter().any(|i| selection.contains(i)))
                    .and_then(|s| s.streams.first().cloned())
            });
        let start = file.start.map(|t| t.0).unwrap_or(DEFAULT_START_MS);
        if file.tests.is_empty() {
            return Err(invalid(&[Seg::Key("tests")], "`tests` is empty".into()));
        }
        let mut cases = Vec::new();
        for (ci, case) in file.tests.into_iter().enumerate() {
            if case.steps.is_empty() {
                return Err(invalid(
                    &[Seg::Key("tests"), Seg::Index(ci)],
                    format!("test `{}` has no steps", case.name),
                ));
            }
            let mut now = start;
            let mut last_ms_seq: Option<(u64, u64)> = None;
            let mut steps = Vec::new();
            let mut step_expects = Vec::new();
            for (si, step) in case.steps.into_iter().enumerate() {
                let at_step = [
                    Seg::Key("tests"),
                    Seg::Index(ci),
                    Seg::Key("steps"),
                    Seg::Index(si),
                ];
                let bad = |message: String| invalid(&at_step, message);
                let stream = step
                    .stream
                    .clone()
                    .or_else(|| default_stream.clone())
                    .ok_or_else(|| {
                        bad("no stream: set `stream` in the step or at the top of the file".into())
                    })?;
                if let Some(streams) = &sub_streams
                    && !streams.contains(&stream)
                {
                    return Err(bad(format!(
                        "subscription `{}` does not read stream `{stream}` (it reads {})",
                        file.subscription.as_deref().unwrap_or_default(),
                        streams.join(", ")
                    )));
                }
                if !selection.iter().any(|&i| set.rules[i].handles(&stream)) {
                    return Err(bad(format!(
                        "none of the rules under test handles stream `{stream}` (see their TOPICS)"
                    )));
                }
                let fields = step_fields(&step).map_err(&bad)?;
                if step.repeat == 0 {
                    return Err(bad("`repeat` must be at least 1".into()));
                }
                if step.repeat > 1 && step.id.is_some() {
                    return Err(bad(
                        "`id` cannot be combined with `repeat`: every copy needs its own id".into(),
                    ));
                }
                let mut inputs = Vec::new();
                for copy in 0..step.repeat {
                    now = match step.at {
                        None => now,
                        Some(At::After(d)) => now + d.as_millis() as u64,
                        Some(At::Exactly(t)) if copy > 0 => {
                            return Err(bad(format!(
                                "`repeat` needs a relative `at` (like +10s), not the absolute time {}",
                                crate::process::rfc3339(t)
                            )));
                        }
                        Some(At::Exactly(t)) if t < now => {
                            return Err(bad(format!(
                                "time goes backwards: {} is before the previous input at {}",
                                crate::process::rfc3339(t),
                                crate::process::rfc3339(now)
                            )));
                        }
                        Some(At::Exactly(t)) => t,
                    };
                    let seq = match last_ms_seq {
                        Some((ms, seq)) if ms == now => seq + 1,
                        _ => 0,
                    };
                    last_ms_seq = Some((now, seq));
                    inputs.push(Input {
                        stream: stream.clone(),
                        id: step.id.clone().unwrap_or_else(|| format!("{now}-{seq}")),
                        deliveries: step.deliveries,
                        fields: fields.clone(),
                        now_ms: now,
                    });
                }
                steps.push(inputs);
                step_expects.push(step.expect.unwrap_or_default());
            }
            cases.push(PreparedCase {
                name: case.name,
                steps,
                step_expects,
                expect: case.expect.unwrap_or_default(),
            });
        }
        Ok(Suite {
            path: path.to_path_buf(),
            text,
            selection,
            group,
            cases,
        })
    }

    /// Line of test `case` (and of its step `step`), for reports.
    pub fn line(&self, case: usize, step: Option<usize>) -> Option<usize> {
        let mut at = vec![Seg::Key("tests"), Seg::Index(case)];
        if let Some(s) = step {
            at.extend([Seg::Key("steps"), Seg::Index(s)]);
        }
        locate::line_of(&self.text, &at)
    }

    /// Line of test `case`'s overall `expect`.
    pub fn expect_line(&self, case: usize) -> Option<usize> {
        locate::line_of(
            &self.text,
            &[Seg::Key("tests"), Seg::Index(case), Seg::Key("expect")],
        )
    }
}

fn parse_error(path: &Path, e: serde_yaml::Error) -> TestFileError {
    let (line, column) = match e.location() {
        Some(l) => (Some(l.line()), Some(l.column())),
        None => (None, None),
    };
    let mut message = e.to_string();
    if let (Some(l), Some(c)) = (line, column) {
        let suffix = format!(" at line {l} column {c}");
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_string();
        }
    }
    TestFileError::Parse {
        path: path.to_path_buf(),
        line,
        column,
        message,
    }
}

/// The rule a test file tests by default: `x.rhai` beside `x.test.yaml`.
fn rule_beside(path: &Path, config: &Config, set: &RuleSet) -> Result<usize, String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let stem = name
        .strip_suffix(".test.yaml")
        .or_else(|| name.strip_suffix(".test.yml"))
        .unwrap_or(name);
    let rule_file = path.with_file_name(format!("{stem}.rhai"));
    let advice = "name the rules under test with `rules:` or `subscription:`";
    let (Ok(rule_file), Ok(dir)) = (rule_file.canonicalize(), config.rules_dir.canonicalize())
    else {
        return Err(format!(
            "no rule {} beside this file; {advice}",
            rule_file.display()
        ));
    };
    let rel = rule_file
        .strip_prefix(&dir)
        .map_err(|_| {
            format!(
                "{} is not under the rules directory {}; {advice}",
                rule_file.display(),
                config.rules_dir.display()
            )
        })?
        .to_string_lossy()
        .replace('\\', "/");
    set.rules
        .iter()
        .position(|r| r.rel_path == rel)
        .ok_or_else(|| format!("`{rel}` is not a loaded rule; {advice}"))
}

/// The stream fields of a step's message.
fn step_fields(step: &Step) -> Result<Fields, String> {
    let envelope = step.watermill || step.metadata.is_some() || step.uuid.is_some();
    match (&step.payload, &step.fields) {
        (Some(_), Some(_)) => Err("give either `payload` or `fields`, not both".into()),
        (None, None) => Err("the step sends nothing: give `payload` or `fields`".into()),
        (None, Some(_)) if envelope => Err(
            "`watermill`, `metadata` and `uuid` wrap a `payload`; flat `fields` have no envelope"
                .into(),
        ),
        (None, Some(fields)) => Ok(fields
            .iter()
            .map(|(k, v)| (k.clone().into_bytes(), v.0.clone().into_bytes()))
            .collect()),
        (Some(payload), None) if !envelope => Ok(json_fields(payload, None)),
        (Some(payload), None) => {
            let metadata: Vec<(&str, &str)> = step
                .metadata
                .iter()
                .flatten()
                .map(|(k, v)| (k.as_str(), v.0.as_str()))
                .collect();
            let uuid = step.uuid.as_deref().unwrap_or(DEFAULT_UUID);
            Ok(json_fields(payload, Some((uuid, &metadata))))
        }
    }
}
