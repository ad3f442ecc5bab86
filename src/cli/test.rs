//! `tripline test [PATH...]`: runs rule tests (`*.test.yaml`) and reports
//! each failing test with its file:line and an expected-versus-got diff.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use arc_swap::ArcSwap;

use crate::config::Settings;
use crate::escape::escape;
use crate::process::LoadedRules;
use crate::rules::RuleSet;
use crate::ruletest::run::{CaseResult, Runner};
use crate::ruletest::{Suite, located};
use crate::runtime::Runtime;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Test files, or directories searched for `*.test.yaml` (default: the rules directory).
    #[arg(value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// List every test, not only the failing ones.
    #[arg(long, short)]
    pub verbose: bool,
}

pub fn test(config_path: Option<&Path>, args: Args) -> anyhow::Result<()> {
    let config = Settings::load(config_path)?;
    let engine = Runtime::new().rule_engine(&config.limits);
    let set = RuleSet::load(&engine, &config.rules_dir).context("rules failed to load")?;
    let roots = if args.paths.is_empty() {
        vec![config.rules_dir.clone()]
    } else {
        args.paths.clone()
    };
    let mut files = Vec::new();
    for root in &roots {
        discover(root, &mut files)?;
    }
    if files.is_empty() {
        let where_: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        bail!("no *.test.yaml files under {}", where_.join(", "));
    }
    let loaded: Vec<_> = files
        .iter()
        .map(|f| Suite::load(f, &config, &set))
        .collect();
    let selections = loaded
        .iter()
        .enumerate()
        .filter_map(|(i, s)| Some((Runner::key(i), s.as_ref().ok()?.selection.clone())))
        .collect();
    let runner = Runner {
        limits: config.limits.clone(),
        rules: Arc::new(ArcSwap::from_pointee(LoadedRules { set, selections })),
        policy: config.alerts.policy,
    };
    let mut out = std::io::stdout().lock();
    let (mut passed, mut failed) = (0usize, 0usize);
    for (i, suite) in loaded.iter().enumerate() {
        let suite = match suite {
            Ok(s) => s,
            Err(e) => {
                failed += 1;
                writeln!(out, "FAIL  {e}")?;
                continue;
            }
        };
        let results = runner.run(suite, &Runner::key(i));
        let bad = results.iter().filter(|r| !r.failures.is_empty()).count();
        passed += results.len() - bad;
        failed += bad;
        if bad == 0 {
            writeln!(
                out,
                "ok    {} ({} test{})",
                suite.path.display(),
                results.len(),
                plural(results.len())
            )?;
        } else {
            writeln!(
                out,
                "FAIL  {} ({bad} of {} test{} failed)",
                suite.path.display(),
                results.len(),
                plural(results.len())
            )?;
        }
        for r in &results {
            if r.failures.is_empty() {
                if args.verbose {
                    writeln!(out, "        ok  {}", escape(&r.name))?;
                }
            } else {
                report(&mut out, suite, r)?;
            }
        }
    }
    writeln!(out, "\n{passed} passed, {failed} failed")?;
    if failed > 0 {
        bail!("{failed} test{} failed", plural(failed));
    }
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// One failing test: where it is, then every expectation that did not hold.
fn report(out: &mut impl Write, suite: &Suite, r: &CaseResult) -> std::io::Result<()> {
    writeln!(
        out,
        "\n  --- FAIL {}: {}",
        located(&suite.path, suite.line(r.index, None), None),
        escape(&r.name)
    )?;
    let mut last_step = None;
    for f in &r.failures {
        if last_step != Some(f.step) {
            let line = match f.step {
                Some(s) => suite.line(r.index, Some(s)),
                None => suite.expect_line(r.index),
            };
            let what = match f.step {
                Some(s) => format!("step {}", s + 1),
                None => "expect".to_string(),
            };
            writeln!(
                out,
                "    {what} ({}; {}):",
                located(&suite.path, line, None),
                escape(&f.context)
            )?;
            last_step = Some(f.step);
        }
        for line in f.text.lines() {
            writeln!(out, "      {}", escape(line))?;
        }
    }
    writeln!(out)
}

/// Adds `path` if it is a file, or every `*.test.yaml` below it (hidden
/// entries skipped), sorted so runs are reproducible.
fn discover(path: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_file() {
        files.push(path.to_path_buf());
        return Ok(());
    }
    let mut found = Vec::new();
    walk(path, &mut found)?;
    found.sort();
    files.extend(found);
    Ok(())
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            walk(&path, out)?;
        } else if name.ends_with(".test.yaml") || name.ends_with(".test.yml") {
            out.push(path);
        }
    }
    Ok(())
}
