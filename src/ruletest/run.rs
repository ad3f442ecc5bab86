//! Runs a [`Suite`]: every test on its own virtual clock with a runtime of
//! its own (alert book, rule samples and gauges, silences, metrics), every
//! message through [`Processor::process`], then the checks.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::matching::{LogLine, RuleFailure, compare};
use super::{CaseExpect, PreparedCase, StepExpect, Suite, Undecodable};
use crate::alert::{Alert, Policy, Status};
use crate::config::Limits;
use crate::escape::escape;
use crate::process::{self, LoadedRules, Processor, Verdict};
use crate::runtime::Runtime;

/// What every test run shares: the compiled rules, with one selection per
/// suite (keyed by [`Runner::key`]).
pub struct Runner {
    /// The config's sandbox limits, for the engine each test builds.
    pub limits: Limits,
    /// The compiled rules, with one selection per suite.
    pub rules: Arc<ArcSwap<LoadedRules>>,
    /// The config's alert lifecycle policy (repeat interval, auto-resolve,
    /// flap detection), so tests behave as production does.
    pub policy: Policy,
}

/// The outcome of one test.
#[derive(Debug)]
pub struct CaseResult {
    /// The test's `name`.
    pub name: String,
    /// Index of the test in its file.
    pub index: usize,
    /// Every expectation that did not hold; empty when the test passed.
    pub failures: Vec<Failure>,
}

/// One expectation that did not hold.
#[derive(Debug)]
pub struct Failure {
    /// The step it is about; `None` for the test's overall `expect`.
    pub step: Option<usize>,
    /// Where and when that step ran, for the report.
    pub context: String,
    /// The expected-versus-got diff.
    pub text: String,
}

impl Runner {
    /// The selection key of the suite at `index` in [`LoadedRules::selections`].
    pub fn key(index: usize) -> String {
        format!("tripline-test:{index}")
    }

    /// A processor on a runtime of its own (no alert state, no rule
    /// samples or gauges), so each test starts from nothing whatever ran
    /// before it. The compiled rules run in any engine built alike.
    fn fresh_processor(&self) -> Processor {
        let runtime = Runtime::new();
        Processor {
            engine: runtime.rule_engine(&self.limits),
            rules: self.rules.clone(),
            book: Arc::new(runtime.alert_book(self.policy)),
        }
    }

    /// Runs every test of the suite registered under `key`.
    pub fn run(&self, suite: &Suite, key: &str) -> Vec<CaseResult> {
        suite
            .cases
            .iter()
            .enumerate()
            .map(|(index, case)| CaseResult {
                name: case.name.clone(),
                index,
                failures: self.run_case(suite, key, case),
            })
            .collect()
    }

    fn run_case(&self, suite: &Suite, key: &str, case: &PreparedCase) -> Vec<Failure> {
        let processor = self.fresh_processor();
        let loaded = processor.rules.load();
        let errors_expected_overall = case.expect.errors.is_some();
        let mut firing: BTreeMap<String, Alert> = BTreeMap::new();
        let mut all = Got::default();
        let mut failures = Vec::new();
        for (si, (inputs, expect)) in case.steps.iter().zip(&case.step_expects).enumerate() {
            let mut got = Got::default();
            for input in inputs {
                // Timers first: whatever fell due by this input's time.
                let due = processor.book.due(input.now_ms);
                for a in &due.notifications {
                    match a.status {
                        Status::Firing => firing.insert(a.fingerprint.clone(), a.clone()),
                        Status::Resolved => firing.remove(&a.fingerprint),
                    };
                }
                got.alerts.extend(due.notifications);
                if input.fields.is_empty() {
                    continue;
                }
                let out = processor.process(
                    &loaded,
                    &process::Input {
                        subscription: key,
                        group: &suite.group,
                        stream: &input.stream,
                        id: &input.id,
                        deliveries: input.deliveries,
                        fields: &input.fields,
                        now_ms: input.now_ms,
                    },
                );
                match out.verdict {
                    Verdict::Undecodable(reason) => got.undecodable.push(reason),
                    Verdict::Processed { dropped, .. } => got.drops += u64::from(dropped),
                }
                for a in &out.notifications {
                    match a.status {
                        Status::Firing => firing.insert(a.fingerprint.clone(), a.clone()),
                        Status::Resolved => firing.remove(&a.fingerprint),
                    };
                }
                got.alerts.extend(out.notifications);
                got.logs
                    .extend(out.logs.into_iter().map(|(rule, level, text)| LogLine {
                        rule,
                        level,
                        text,
                    }));
                got.errors.extend(
                    out.errors
                        .into_iter()
                        .map(|(rule, text)| RuleFailure { rule, text }),
                );
            }
            let firing_now: Vec<Alert> = firing.values().cloned().collect();
            let texts = check_step(
                expect,
                &got,
                &firing_now,
                inputs.len() as u64,
                errors_expected_overall,
            );
            if !texts.is_empty() {
                let context = step_context(inputs);
                failures.extend(texts.into_iter().map(|text| Failure {
                    step: Some(si),
                    context: context.clone(),
                    text,
                }));
            }
            all.absorb(got);
        }
        let firing_at_end: Vec<Alert> = firing.into_values().collect();
        failures.extend(
            check_case(&case.expect, &all, &firing_at_end)
                .into_iter()
                .map(|text| Failure {
                    step: None,
                    context: "after the last step".into(),
                    text,
                }),
        );
        failures
    }
}

/// What a step (or a whole test) produced.
#[derive(Default)]
struct Got {
    /// Notifications sent, in order.
    alerts: Vec<Alert>,
    /// Log lines written, in order.
    logs: Vec<LogLine>,
    /// Rules that failed.
    errors: Vec<RuleFailure>,
    /// Messages a rule dropped.
    drops: u64,
    /// Decode errors, one per undecodable message.
    undecodable: Vec<String>,
}

impl Got {
    fn absorb(&mut self, other: Got) {
        self.alerts.extend(other.alerts);
        self.logs.extend(other.logs);
        self.errors.extend(other.errors);
        self.drops += other.drops;
        self.undecodable.extend(other.undecodable);
    }
}

fn step_context(inputs: &[super::Input]) -> String {
    let first = &inputs[0];
    let mut s = format!(
        "at {}, stream {}, id {}",
        crate::clock::rfc3339(first.now_ms),
        first.stream,
        first.id
    );
    if inputs.len() > 1 {
        let last = &inputs[inputs.len() - 1];
        s.push_str(&format!(
            ", ×{} until {}",
            inputs.len(),
            crate::clock::rfc3339(last.now_ms)
        ));
    }
    s
}

fn check_step(
    e: &StepExpect,
    got: &Got,
    firing: &[Alert],
    copies: u64,
    errors_expected_overall: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(exp) = &e.alerts {
        out.extend(compare("alerts", exp, &got.alerts));
    }
    if let Some(exp) = &e.firing {
        out.extend(compare("firing after this step", exp, firing));
    }
    if let Some(exp) = &e.logs {
        out.extend(compare("logs", exp, &got.logs));
    }
    match &e.errors {
        Some(exp) => out.extend(compare("rule errors", exp, &got.errors)),
        None if !errors_expected_overall && !got.errors.is_empty() => {
            out.extend(compare::<super::ErrorMatch>(
                "rule errors (none expected; list them under `errors:` if intended)",
                &[],
                &got.errors,
            ));
        }
        None => {}
    }
    if let Some(want) = e.dropped {
        let have = if want {
            got.drops == copies
        } else {
            got.drops == 0
        };
        if !have {
            out.push(format!(
                "dropped: expected {want}, got {} ({} of {copies} message(s) dropped)",
                !want, got.drops
            ));
        }
    }
    // The decode error quotes the input; the report keeps it on one line.
    let reason = got.undecodable.first().map(|r| escape(r));
    match (&e.undecodable, reason) {
        (None, Some(reason)) => out.push(format!(
            "undecodable: the input could not be decoded ({reason}); add `undecodable: true` if intended"
        )),
        (Some(Undecodable::No), Some(reason)) => out.push(format!(
            "undecodable: expected the input to decode, got: {reason}"
        )),
        (Some(Undecodable::Yes { .. }), None) => {
            out.push("undecodable: expected the input to be undecodable, but it decoded".into())
        }
        (Some(Undecodable::Yes { contains: Some(want) }), Some(reason))
            if !got.undecodable[0].contains(want.as_str()) =>
        {
            out.push(format!(
                "undecodable: expected a reason containing {want:?}, got: {reason}"
            ))
        }
        _ => {}
    }
    out
}

fn check_case(e: &CaseExpect, all: &Got, firing: &[Alert]) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(exp) = &e.alerts {
        out.extend(compare("alerts over the whole test", exp, &all.alerts));
    }
    if let Some(exp) = &e.firing {
        out.extend(compare("firing at the end", exp, firing));
    }
    if let Some(exp) = &e.logs {
        out.extend(compare("logs over the whole test", exp, &all.logs));
    }
    if let Some(exp) = &e.errors {
        out.extend(compare("rule errors over the whole test", exp, &all.errors));
    }
    if let Some(want) = e.drops
        && want != all.drops
    {
        out.push(format!("drops: expected {want}, got {}", all.drops));
    }
    out
}
