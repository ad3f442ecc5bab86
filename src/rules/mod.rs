//! Rules: `rules/**/*.rhai`, one file per rule, run in path order.
//!
//! The `Engine` is built once, given the API and the sandbox limits, and then
//! only shared (`Arc<Engine>`), never mutated. A [`RuleSet`] is compiled whole
//! from the directory: if any file fails, the caller keeps its previous set.

pub mod api;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rhai::{AST, CallFnOptions, Dynamic, Engine, Scope};

use crate::config::Limits;
use crate::metrics::RuleMetrics;
pub use api::{Actions, LogLevel, RawAlert};

/// Name of the function every rule defines.
pub const ENTRY_POINT: &str = "on_message";
/// Optional top-level constant listing the streams a rule handles.
pub const TOPICS_CONST: &str = "TOPICS";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    #[error("rules directory {0} does not exist or is not a directory")]
    MissingDir(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Compile(Vec<CompileError>),
}

/// A rule that failed to compile, located to the character.
#[derive(Debug, Clone, PartialEq)]
pub struct CompileError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for CompileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

/// Builds the one engine every rule runs in: sandboxed (the standard packages
/// of `Engine::new` have no file, network or process access; `eval` is
/// disabled), limited, and carrying the rule API.
pub fn build_engine(limits: &Limits) -> Arc<Engine> {
    let mut engine = Engine::new();
    engine.set_max_operations(limits.max_operations);
    engine.set_max_call_levels(limits.max_call_levels);
    engine.set_max_string_size(limits.max_string_size);
    engine.set_max_array_size(limits.max_array_size);
    engine.set_max_map_size(limits.max_map_size);
    engine.set_max_expr_depths(64, 32);
    engine.disable_symbol("eval");
    api::register(&mut engine);
    Arc::new(engine)
}

/// One compiled rule file.
pub struct Rule {
    /// Path under `rules/` without `.rhai`: the rule's identity in logs,
    /// metrics and alert fingerprints.
    pub name: String,
    /// Path under `rules/` with extension; subscription globs match this.
    pub rel_path: String,
    /// The file on disk, for error messages.
    pub path: PathBuf,
    /// Hash of the source text, so a reload can tell changed from unchanged.
    pub source_hash: u64,
    ast: AST,
    /// Top-level `const`/`let` values, evaluated once at load and visible to
    /// `on_message` on every call.
    scope: Scope<'static>,
    /// Streams this rule handles; `None` means all of its subscription's.
    topics: Option<Vec<String>>,
    metrics: RuleMetrics,
}

impl Rule {
    /// The streams listed in the rule's `TOPICS`, if it has one.
    pub fn topics(&self) -> Option<&[String]> {
        self.topics.as_deref()
    }

    pub fn handles(&self, stream: &str) -> bool {
        self.topics
            .as_ref()
            .is_none_or(|t| t.iter().any(|s| s == stream))
    }
}

/// A whole, successfully compiled rules directory.
pub struct RuleSet {
    pub rules: Vec<Rule>,
}

/// What one rule did with one message.
#[derive(Debug)]
pub struct RuleResult {
    /// Index into [`RuleSet::rules`].
    pub rule: usize,
    /// The rule's actions, or the error that stopped it (its partial actions
    /// are discarded: a rule either completes or has no effect).
    pub outcome: Result<Actions, String>,
}

impl RuleSet {
    /// Compiles every `*.rhai` under `dir`; all errors are reported together.
    pub fn load(engine: &Engine, dir: &Path) -> Result<RuleSet, RuleError> {
        if !dir.is_dir() {
            return Err(RuleError::MissingDir(dir.to_path_buf()));
        }
        let mut files = Vec::new();
        collect_rule_files(dir, &mut files)?;
        files.sort();
        let mut rules = Vec::new();
        let mut errors = Vec::new();
        for path in files {
            let source = std::fs::read_to_string(&path).map_err(|source| RuleError::Io {
                path: path.clone(),
                source,
            })?;
            let rel = path
                .strip_prefix(dir)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            match compile_rule(engine, &path, &rel, &source) {
                Ok(rule) => rules.push(rule),
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(RuleSet { rules })
        } else {
            Err(RuleError::Compile(errors))
        }
    }

    /// Indices of the rules whose relative path matches one of `globs`, in
    /// path order.
    pub fn select(&self, globs: &[String]) -> Vec<usize> {
        let mut builder = globset::GlobSetBuilder::new();
        for g in globs {
            if let Ok(glob) = globset::Glob::new(g) {
                builder.add(glob);
            }
        }
        let Ok(set) = builder.build() else {
            return Vec::new();
        };
        (0..self.rules.len())
            .filter(|&i| set.is_match(&self.rules[i].rel_path))
            .collect()
    }

    /// Runs the selected rules, in order, on one message. `msg` is shared:
    /// rules see each other's changes to it, and nothing is copied per rule.
    pub fn evaluate(
        &self,
        engine: &Engine,
        selected: &[usize],
        stream: &str,
        msg: &Dynamic,
        ctx: &Dynamic,
        msg_id: &str,
    ) -> Vec<RuleResult> {
        let mut results = Vec::with_capacity(selected.len());
        for &i in selected {
            let rule = &self.rules[i];
            if !rule.handles(stream) {
                continue;
            }
            let started = Instant::now();
            api::begin();
            let mut scope = rule.scope.clone();
            let options = CallFnOptions::new().eval_ast(false).rewind_scope(true);
            let call = engine.call_fn_with_options::<Dynamic>(
                options,
                &mut scope,
                &rule.ast,
                ENTRY_POINT,
                (msg.clone(), ctx.clone()),
            );
            let actions = api::take();
            let outcome = match call {
                Ok(_) => Ok(actions),
                Err(e) => {
                    let text = describe_eval_error(&rule.rel_path, &e);
                    rule.metrics.rule_failed(msg_id, &text);
                    Err(text)
                }
            };
            rule.metrics.observe(&outcome, started.elapsed());
            let dropped = matches!(&outcome, Ok(a) if a.drop);
            results.push(RuleResult { rule: i, outcome });
            if dropped {
                break;
            }
        }
        results
    }
}

fn describe_eval_error(rel: &str, e: &rhai::EvalAltResult) -> String {
    let pos = e.position();
    match (pos.line(), pos.position()) {
        (Some(l), Some(c)) => format!("{rel}:{l}:{c}: {e}"),
        (Some(l), None) => format!("{rel}:{l}: {e}"),
        _ => format!("{rel}: {e}"),
    }
}

/// Editors leave `.#x.rhai`, `.x.rhai.swp`, `x.rhai~` and similar behind;
/// only plain visible `*.rhai` files are rules.
fn is_rule_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.') && !name.starts_with('#') && name.ends_with(".rhai")
}

fn collect_rule_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), RuleError> {
    let entries = std::fs::read_dir(dir).map_err(|source| RuleError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| RuleError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if path.is_dir() && !hidden {
            collect_rule_files(&path, out)?;
        } else if path.is_file() && is_rule_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

fn compile_rule(
    engine: &Engine,
    path: &Path,
    rel: &str,
    source: &str,
) -> Result<Rule, CompileError> {
    let error = |pos: rhai::Position, message: String| CompileError {
        path: path.to_path_buf(),
        line: pos.line(),
        column: pos.position(),
        message,
    };
    let mut ast = engine
        .compile(source)
        .map_err(|e| error(e.position(), e.err_type().to_string()))?;
    ast.set_source(rel);
    if !ast
        .iter_functions()
        .any(|f| f.name == ENTRY_POINT && f.params.len() == 2)
    {
        return Err(error(
            rhai::Position::NONE,
            format!("no `fn {ENTRY_POINT}(msg, ctx)` defined"),
        ));
    }
    let mut scope = Scope::new();
    api::begin();
    let top = engine.run_ast_with_scope(&mut scope, &ast);
    let stray = api::take();
    top.map_err(|e| error(e.position(), format!("top-level code failed: {e}")))?;
    if !stray.is_empty() {
        return Err(error(
            rhai::Position::NONE,
            "top-level code must not call alert/resolve/log/drop; do it in on_message".into(),
        ));
    }
    let topics = match scope.get(TOPICS_CONST) {
        None => None,
        Some(v) => {
            let list = v
                .clone()
                .into_typed_array::<rhai::ImmutableString>()
                .map_err(|_| {
                    error(
                        rhai::Position::NONE,
                        format!("`{TOPICS_CONST}` must be an array of stream names"),
                    )
                })?;
            Some(list.into_iter().map(|s| s.to_string()).collect())
        }
    };
    let name = rel.strip_suffix(".rhai").unwrap_or(rel).to_string();
    Ok(Rule {
        metrics: RuleMetrics::new(&name),
        name,
        rel_path: rel.to_string(),
        path: path.to_path_buf(),
        source_hash: hash_source(source),
        ast,
        scope,
        topics,
    })
}

fn hash_source(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_of(files: &[(&str, &str)]) -> (tempfile::TempDir, Result<RuleSet, RuleError>) {
        let dir = tempfile::tempdir().unwrap();
        for (name, src) in files {
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, src).unwrap();
        }
        let engine = build_engine(&Limits::default());
        let set = RuleSet::load(&engine, dir.path());
        (dir, set)
    }

    fn run(set: &RuleSet, stream: &str, body: &str) -> Vec<RuleResult> {
        let engine = build_engine(&Limits::default());
        let msg: Dynamic = serde_json::from_str(body).unwrap();
        let all: Vec<usize> = (0..set.rules.len()).collect();
        set.evaluate(
            &engine,
            &all,
            stream,
            &msg,
            &Dynamic::from_map(Default::default()),
            "1-0",
        )
    }

    #[test]
    fn rules_run_in_path_order_and_drop_stops_later_ones() {
        let (_d, set) = set_of(&[
            ("b.rhai", "fn on_message(m, c) { log(\"b\"); }"),
            ("a.rhai", "fn on_message(m, c) { if m.x > 1 { drop(); } }"),
        ]);
        let set = set.unwrap();
        assert_eq!(set.rules[0].name, "a");
        assert_eq!(run(&set, "s", r#"{"x": 5}"#).len(), 1);
        assert_eq!(run(&set, "s", r#"{"x": 0}"#).len(), 2);
    }

    #[test]
    fn top_level_constants_are_visible_and_topics_filter() {
        let (_d, set) = set_of(&[(
            "t.rhai",
            "const LIMIT = 10; const TOPICS = [\"a\"];\n fn on_message(m, c) { if m.v > LIMIT { alert(#{severity: \"major\"}); } }",
        )]);
        let set = set.unwrap();
        let r = run(&set, "a", r#"{"v": 11}"#);
        assert_eq!(r[0].outcome.as_ref().unwrap().alerts.len(), 1);
        assert!(run(&set, "b", r#"{"v": 11}"#).is_empty());
    }

    #[test]
    fn syntax_error_names_file_line_and_column() {
        let (_d, set) = set_of(&[
            ("ok.rhai", "fn on_message(m, c) {}"),
            ("bad.rhai", "fn on_message(m, c) {\n  let x = ;\n}"),
        ]);
        let err = set.err().unwrap().to_string();
        assert!(err.contains("bad.rhai:2:11"), "{err}");
    }

    #[test]
    fn missing_entry_point_is_a_compile_error() {
        let (_d, set) = set_of(&[("x.rhai", "fn other() {}")]);
        assert!(set.err().unwrap().to_string().contains("on_message"));
    }

    #[test]
    fn endless_loop_is_stopped_and_next_rule_runs() {
        let (_d, set) = set_of(&[
            ("1.rhai", "fn on_message(m, c) { loop {} }"),
            ("2.rhai", "fn on_message(m, c) { alert(#{name: \"x\"}); }"),
        ]);
        let r = run(&set.unwrap(), "s", "{}");
        assert!(
            r[0].outcome.as_ref().unwrap_err().contains("operations"),
            "{:?}",
            r[0]
        );
        assert_eq!(r[1].outcome.as_ref().unwrap().alerts.len(), 1);
    }

    #[test]
    fn bad_alert_fields_fail_the_rule_with_a_reason() {
        let (_d, set) = set_of(&[(
            "x.rhai",
            "fn on_message(m, c) { alert(#{severity: \"urgent\"}); }",
        )]);
        let r = run(&set.unwrap(), "s", "{}");
        let e = r[0].outcome.as_ref().unwrap_err();
        assert!(e.contains("x.rhai:1:") && e.contains("urgent"), "{e}");
    }

    #[test]
    fn editor_files_are_not_rules() {
        assert!(!is_rule_file(Path::new("r/.#a.rhai")));
        assert!(!is_rule_file(Path::new("r/a.rhai~")));
        assert!(!is_rule_file(Path::new("r/.a.rhai.swp")));
        assert!(is_rule_file(Path::new("r/a.rhai")));
    }

    #[test]
    fn sandbox_has_no_eval() {
        let (_d, set) = set_of(&[("x.rhai", "fn on_message(m, c) { eval(\"1\"); }")]);
        assert!(set.is_err());
    }
}
