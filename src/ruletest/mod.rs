//! `*.test.yaml`: unit tests for rules, run by `tripline test`.
//!
//! A test file names the rules under test, feeds them messages on a virtual
//! clock and states what must come out. Every message goes through
//! [`crate::process::Processor::process`], the code production runs, with a
//! runtime of its own per test (alert book, the rule helpers' samples and
//! gauges), so dedup, repeat intervals and resolve-only-if-firing behave
//! exactly as they do live and no test sees what another left behind. The format is
//! documented for users in `docs/rules-testing.md`; this module parses it
//! strictly (an unknown key is an error naming the key and its line) and
//! [`run`] executes it.

pub mod format;
mod matching;
pub mod run;

use std::path::{Path, PathBuf};

pub use format::*;

use crate::config::Settings;
use crate::config::locate::{self, Seg};
use crate::replay::{Fields, json_fields};
use crate::rules::RuleSet;

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

/// One message the runner will send, fully resolved.
#[derive(Debug, Clone)]
pub struct Input {
    /// Stream it arrives on (`ctx.stream`; rules' `TOPICS` filter on it).
    pub stream: String,
    /// Entry id (`ctx.id`).
    pub id: String,
    /// `ctx.delivery_count`.
    pub deliveries: u64,
    /// The entry's fields, decoded by the engine's own decoder; empty for a
    /// step that only lets time pass (Redis has no empty entries).
    pub fields: Fields,
    /// Virtual time of arrival.
    pub now_ms: u64,
}

/// A test file that parsed and makes sense against the loaded rules.
#[derive(Debug)]
pub struct Suite {
    /// The file, as given or found; names it in reports.
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
    /// The test's `name`.
    pub name: String,
    /// Per step, the messages it sends (`repeat` copies).
    pub steps: Vec<Vec<Input>>,
    /// Per step, what it must produce (parallel to `steps`).
    pub step_expects: Vec<StepExpect>,
    /// What the whole test must produce.
    pub expect: CaseExpect,
}

impl Suite {
    /// Reads and checks one test file against the compiled rules.
    pub fn load(path: &Path, config: &Settings, set: &RuleSet) -> Result<Suite, TestFileError> {
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
        config: &Settings,
        set: &RuleSet,
    ) -> Result<Suite, TestFileError> {
        let file: TestFile = serde_yaml::from_str(&text).map_err(|e| parse_error(path, e))?;
        let invalid = |p: Problem| TestFileError::Invalid {
            path: path.to_path_buf(),
            line: locate::node_line(&text, &p.at),
            message: p.message,
        };
        let target = Target::of(&file, path, config, set).map_err(invalid)?;
        if file.tests.is_empty() {
            return Err(invalid(Problem::at(
                &[Seg::Key("tests")],
                "`tests` is empty".into(),
            )));
        }
        let start = file.start.map(|t| t.0).unwrap_or(DEFAULT_START_MS);
        let cases = file
            .tests
            .into_iter()
            .enumerate()
            .map(|(ci, case)| prepare_case(ci, case, start, &target, set))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        Ok(Suite {
            path: path.to_path_buf(),
            text,
            selection: target.selection,
            group: target.group,
            cases,
        })
    }

    /// Line of test `case` (and of its step `step`), for reports.
    pub fn line(&self, case: usize, step: Option<usize>) -> Option<usize> {
        let mut at = vec![Seg::Key("tests"), Seg::Item(case)];
        if let Some(s) = step {
            at.extend([Seg::Key("steps"), Seg::Item(s)]);
        }
        locate::node_line(&self.text, &at)
    }

    /// Line of test `case`'s overall `expect`.
    pub fn expect_line(&self, case: usize) -> Option<usize> {
        locate::node_line(
            &self.text,
            &[Seg::Key("tests"), Seg::Item(case), Seg::Key("expect")],
        )
    }
}

/// Something wrong in a test file that parsed, and where.
struct Problem {
    /// Path to the offending node, to find its line.
    at: Vec<Seg<'static>>,
    /// What is wrong, for the user.
    message: String,
}

impl Problem {
    fn at(at: &[Seg<'static>], message: String) -> Problem {
        Problem {
            at: at.to_vec(),
            message,
        }
    }
}

/// What a test file tests: which rules, as which group, on which streams.
struct Target {
    /// Indices of the rules under test.
    selection: Vec<usize>,
    /// `ctx.group`.
    group: String,
    /// With `subscription`: its name and the streams it reads (the only
    /// ones a step may use).
    subscription: Option<(String, Vec<String>)>,
    /// Stream of steps that name none.
    default_stream: Option<String>,
}

impl Target {
    fn of(
        file: &TestFile,
        path: &Path,
        config: &Settings,
        set: &RuleSet,
    ) -> Result<Target, Problem> {
        let (selection, group, subscription) = match (&file.subscription, &file.rules) {
            (Some(_), Some(_)) => {
                return Err(Problem::at(
                    &[Seg::Key("subscription")],
                    "give either `rules` or `subscription`, not both".into(),
                ));
            }
            (Some(name), None) => {
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
                        Problem::at(
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
                    Some((sub.name.clone(), sub.streams.clone())),
                )
            }
            (None, Some(globs)) => {
                for (i, g) in globs.iter().enumerate() {
                    globset::Glob::new(g).map_err(|e| {
                        Problem::at(
                            &[Seg::Key("rules"), Seg::Item(i)],
                            format!("bad rule glob `{g}`: {e}"),
                        )
                    })?;
                }
                let selection = set.select(globs);
                if selection.is_empty() {
                    return Err(Problem::at(
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
                vec![rule_beside(path, config, set).map_err(|m| Problem::at(&[], m))?],
                DEFAULT_GROUP.to_string(),
                None,
            ),
        };
        let default_stream = file
            .stream
            .clone()
            .or_else(|| subscription.as_ref().and_then(|(_, s)| s.first().cloned()))
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
        Ok(Target {
            selection,
            group: file.group.clone().unwrap_or(group),
            subscription,
            default_stream,
        })
    }

    /// The stream of a step, checked against what the rules under test read.
    fn stream_of(&self, step: &Step, set: &RuleSet) -> Result<String, String> {
        let stream = step
            .stream
            .clone()
            .or_else(|| self.default_stream.clone())
            .ok_or("no stream: set `stream` in the step or at the top of the file")?;
        if let Some((name, streams)) = &self.subscription
            && !streams.contains(&stream)
        {
            return Err(format!(
                "subscription `{name}` does not read stream `{stream}` (it reads {})",
                streams.join(", ")
            ));
        }
        if !self
            .selection
            .iter()
            .any(|&i| set.rules[i].handles(&stream))
        {
            return Err(format!(
                "none of the rules under test handles stream `{stream}` (see their TOPICS)"
            ));
        }
        Ok(stream)
    }
}

/// The virtual clock of one test, and the ids Redis would assign.
struct Clock {
    /// Virtual time of the latest message, ms since the epoch.
    now: u64,
    /// Sequence number of the last id within `now`'s millisecond.
    seq: Option<u64>,
}

impl Clock {
    /// Moves to the time of the next message; returns its default id.
    fn advance(&mut self, at: Option<At>, copy: u32) -> Result<String, String> {
        let next = match at {
            None => self.now,
            Some(At::After(d)) => self.now + d.as_millis() as u64,
            Some(At::Exactly(t)) if copy > 0 => {
                return Err(format!(
                    "`repeat` needs a relative `at` (like +10s), not the absolute time {}",
                    crate::clock::rfc3339(t)
                ));
            }
            Some(At::Exactly(t)) if t < self.now => {
                return Err(format!(
                    "time goes backwards: {} is before the previous input at {}",
                    crate::clock::rfc3339(t),
                    crate::clock::rfc3339(self.now)
                ));
            }
            Some(At::Exactly(t)) => t,
        };
        let seq = match self.seq {
            Some(s) if next == self.now => s + 1,
            _ => 0,
        };
        self.now = next;
        self.seq = Some(seq);
        Ok(format!("{next}-{seq}"))
    }
}

fn prepare_case(
    ci: usize,
    case: Case,
    start: u64,
    target: &Target,
    set: &RuleSet,
) -> Result<PreparedCase, Problem> {
    if case.steps.is_empty() {
        return Err(Problem::at(
            &[Seg::Key("tests"), Seg::Item(ci)],
            format!("test `{}` has no steps", case.name),
        ));
    }
    let mut clock = Clock {
        now: start,
        seq: None,
    };
    let mut steps = Vec::new();
    let mut step_expects = Vec::new();
    for (si, step) in case.steps.into_iter().enumerate() {
        let bad = |message: String| {
            Problem::at(
                &[
                    Seg::Key("tests"),
                    Seg::Item(ci),
                    Seg::Key("steps"),
                    Seg::Item(si),
                ],
                message,
            )
        };
        let stream = target.stream_of(&step, set).map_err(bad)?;
        let fields = step_fields(&step).map_err(bad)?;
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
            let id = clock.advance(step.at, copy).map_err(bad)?;
            inputs.push(Input {
                stream: stream.clone(),
                id: step.id.clone().unwrap_or(id),
                deliveries: step.deliveries,
                fields: fields.clone(),
                now_ms: clock.now,
            });
        }
        steps.push(inputs);
        step_expects.push(step.expect.unwrap_or_default());
    }
    Ok(PreparedCase {
        name: case.name,
        steps,
        step_expects,
        expect: case.expect.unwrap_or_default(),
    })
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
fn rule_beside(path: &Path, config: &Settings, set: &RuleSet) -> Result<usize, String> {
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
        // Only `at`: time passes without a message, for timers.
        (None, None) if !envelope && step.id.is_none() && step.stream.is_none() => Ok(Vec::new()),
        (None, None) => Err("the step sends nothing: give `payload` or `fields` (a step with only `at` lets time pass)".into()),
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arc_swap::ArcSwap;

    use super::run::{CaseResult, Runner};
    use super::*;
    use crate::process::LoadedRules;
    use crate::runtime::Runtime;

    const CONFIG: &str = "subscriptions:\n  - {name: errs, group: g-errs, streams: [errors], rules: [\"e*.rhai\"]}\n";

    /// A rules directory with `rules`, the config above pointing at it, and
    /// the test file `text` (named `name`) run against it.
    fn run(rules: &[(&str, &str)], name: &str, text: &str) -> Result<Vec<CaseResult>, String> {
        let dir = tempfile::tempdir().unwrap();
        for (file, src) in rules {
            std::fs::write(dir.path().join(file), src).unwrap();
        }
        let mut config = Settings::parse(CONFIG, "t").unwrap();
        config.rules_dir = dir.path().to_path_buf();
        let engine = Runtime::new().rule_engine(&config.limits);
        let set = RuleSet::load(&engine, dir.path()).unwrap();
        let suite = Suite::parse(&dir.path().join(name), text.to_string(), &config, &set)
            .map_err(|e| e.to_string())?;
        let runner = Runner {
            limits: config.limits.clone(),
            rules: Arc::new(ArcSwap::from_pointee(LoadedRules {
                set,
                selections: [(Runner::key(0), suite.selection.clone())].into(),
            })),
            policy: config.alerts.policy,
        };
        Ok(runner.run(&suite, &Runner::key(0)))
    }

    fn failures(results: &[CaseResult]) -> Vec<String> {
        results
            .iter()
            .flat_map(|r| r.failures.iter().map(|f| f.text.clone()))
            .collect()
    }

    /// Logs what the rule sees of time, id, stream and group.
    const ECHO: &str =
        "fn on_message(m, c) { log(`${c.timestamp_ms} ${c.id} ${c.stream} ${c.group} ${m.v}`); }";

    #[test]
    fn virtual_clock_ids_and_defaults() {
        let text = "\
tests:
  - name: clock
    steps:
      - payload: {v: 1}
        expect: {logs: [{text: '1735689600000 1735689600000-0 errors tripline-test 1'}]}
      - fields: {v: '2'}
        expect: {logs: [{text: '1735689600000 1735689600000-1 errors tripline-test 2'}]}
      - at: +1m
        repeat: 2
        payload: {v: 3}
        expect:
          logs:
            - {text: '1735689660000 1735689660000-0 errors tripline-test 3'}
            - {text: '1735689720000 1735689720000-0 errors tripline-test 3'}
      - at: 2025-01-01T01:00:00Z
        payload: {v: 4}
        expect: {logs: [{contains: '1735693200000 '}]}
";
        let r = run(&[("echo.rhai", ECHO)], "echo.test.yaml", text).unwrap();
        assert_eq!(failures(&r), Vec::<String>::new());
    }

    #[test]
    fn subscription_gives_its_rules_group_and_stream() {
        let text = "\
subscription: errs
tests:
  - name: as the subscription
    steps: [{payload: {v: 1}, expect: {logs: [{contains: ' errors g-errs 1'}]}}]
";
        let rules = [
            ("echo.rhai", ECHO),
            ("other.rhai", "fn on_message(m, c) { log(\"x\"); }"),
        ];
        let r = run(&rules, "any.test.yaml", text).unwrap();
        assert_eq!(failures(&r), Vec::<String>::new());
    }

    #[test]
    fn each_test_starts_with_no_alert_firing() {
        let rule = "fn on_message(m, c) { if m.v > 5 { alert(#{name: \"X\"}); } else { resolve(#{name: \"X\"}); } }";
        let text = "\
tests:
  - name: fires
    steps: [{payload: {v: 9}, expect: {alerts: [{name: X}]}}]
  - name: nothing to resolve in a fresh test
    steps: [{payload: {v: 1}, expect: {alerts: [], firing: []}}]
  - name: fires again in a fresh test
    steps: [{payload: {v: 9}, expect: {alerts: [{name: X, severity: warning}]}}]
";
        let r = run(&[("e.rhai", rule)], "e.test.yaml", text).unwrap();
        assert_eq!(failures(&r), Vec::<String>::new());
    }

    #[test]
    fn each_test_starts_with_no_rule_samples() {
        let rule = "fn on_message(m, c) { if delta(\"k\", m.n) > 5 { alert(#{name: \"Jump\"}); } }";
        let text = "\
tests:
  - name: jumps
    steps:
      - {payload: {n: 0}, expect: {alerts: []}}
      - {payload: {n: 10}, expect: {alerts: [{name: Jump}]}}
  - name: the first sample of a fresh test has no delta
    steps: [{payload: {n: 100}, expect: {alerts: []}}]
";
        let r = run(&[("e.rhai", rule)], "e.test.yaml", text).unwrap();
        assert_eq!(failures(&r), Vec::<String>::new());
    }

    #[test]
    fn rule_errors_fail_unless_expected() {
        let rule = "fn on_message(m, c) { if m.v == 0 { throw \"zero\"; } }";
        let text = "\
tests:
  - name: unexpected
    steps: [{payload: {v: 0}}]
  - name: expected at the step
    steps: [{payload: {v: 0}, expect: {errors: [{contains: zero}]}}]
  - name: expected over the test
    steps: [{payload: {v: 0}}, {payload: {v: 0}}]
    expect: {errors: [{rule: e}, {rule: e}]}
";
        let r = run(&[("e.rhai", rule)], "e.test.yaml", text).unwrap();
        assert_eq!(r[0].failures.len(), 1);
        assert!(
            r[0].failures[0].text.contains("+ e: "),
            "{:?}",
            r[0].failures
        );
        assert!(
            r[1].failures.is_empty() && r[2].failures.is_empty(),
            "{r:?}"
        );
    }

    #[test]
    fn drops_and_undecodable_are_checked() {
        let rule = "fn on_message(m, c) { if m.v > 1 { drop(); } }";
        let text = "\
tests:
  - name: t
    steps:
      - {payload: {v: 2}, expect: {dropped: false}}
      - {payload: {v: 0}, expect: {dropped: true}}
      - {payload: '[1]', expect: {undecodable: 'nope'}}
      - {payload: '{', expect: {undecodable: false}}
    expect: {drops: 0}
";
        let r = run(&[("e.rhai", rule)], "e.test.yaml", text).unwrap();
        let f = failures(&r);
        assert_eq!(f.len(), 5, "{f:#?}");
        assert!(f[0].starts_with("dropped: expected false, got true"));
        assert!(f[1].starts_with("dropped: expected true, got false"));
        assert!(f[2].contains("containing \"nope\""));
        assert!(f[3].starts_with("undecodable: expected the input to decode"));
        assert_eq!(f[4], "drops: expected 0, got 1");
    }

    #[test]
    fn mistakes_in_a_test_file_name_the_line() {
        let rules = [
            ("e.rhai", ECHO),
            ("t.rhai", "const TOPICS = [\"t\"]; fn on_message(m, c) {}"),
        ];
        let err = |name: &str, text: &str| run(&rules, name, text).unwrap_err();
        let e = err("x.test.yaml", "tests: []\n");
        assert!(
            e.contains("no rule") && e.contains("`rules:` or `subscription:`"),
            "{e}"
        );
        let e = err(
            "e.test.yaml",
            "tests:\n  - name: a\n    steps:\n      - {payload: {v: 1}}\n      - {at: +1s, repeat: 2, id: '1-1', payload: {v: 1}}\n",
        );
        assert!(
            e.contains("e.test.yaml:5:") && e.contains("`id` cannot be combined"),
            "{e}"
        );
        let e = err(
            "e.test.yaml",
            "tests:\n  - name: a\n    steps:\n      - {at: 2025-01-01T00:00:00Z, repeat: 2, payload: {v: 1}}\n",
        );
        assert!(e.contains(":4:") && e.contains("relative `at`"), "{e}");
        let e = err(
            "t.test.yaml",
            "stream: other\ntests:\n  - name: a\n    steps: [{payload: {v: 1}}]\n",
        );
        assert!(
            e.contains(":4:") && e.contains("handles stream `other`"),
            "{e}"
        );
        let e = err(
            "z.test.yaml",
            "subscription: errs\ntests:\n  - name: a\n    steps: [{stream: t, payload: {v: 1}}]\n",
        );
        assert!(e.contains("does not read stream `t`"), "{e}");
        let e = err("z.test.yaml", "rules: ['nothing*']\ntests: []\n");
        assert!(e.contains(":1:") && e.contains("matches no rule"), "{e}");
        let e = err(
            "e.test.yaml",
            "tests:\n  - name: a\n    steps: [{payload: {v: 1}, fields: {v: 1}}]\n",
        );
        assert!(e.contains("either `payload` or `fields`"), "{e}");
        let e = err(
            "e.test.yaml",
            "tests:\n  - name: a\n    steps: [{payload: {v: 1}, expect: {logs: [{level: loud}]}}]\n",
        );
        assert!(
            e.contains("e.test.yaml:3:") && e.contains("log level `loud`"),
            "{e}"
        );
    }

    #[test]
    fn watermill_envelope_reaches_the_rule() {
        let rule = "fn on_message(m, c) { log(`${c.uuid} ${c.metadata.source} ${m.v}`); }";
        let text = "\
tests:
  - name: envelope
    steps:
      - uuid: u-1
        metadata: {source: c1}
        payload: {v: 7}
        expect: {logs: [{text: 'u-1 c1 7'}]}
";
        let r = run(&[("e.rhai", rule)], "e.test.yaml", text).unwrap();
        assert_eq!(failures(&r), Vec::<String>::new());
    }
}
