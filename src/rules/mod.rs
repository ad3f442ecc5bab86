//! Rules: `rules/**/*.rhai`, one file per rule, run in path order.
//!
//! The `Engine` is built once, given the API and the sandbox limits, and then
//! only shared (`Arc<RuleEngine>`), never mutated. Its stateful helpers keep
//! their series in the [`state::RuleState`] of the runtime it was built with. A [`RuleSet`] is compiled whole
//! from the directory: if any file fails, the caller keeps its previous set.

pub mod api;
mod budget;
pub mod kind;
pub mod kind_check;
pub mod lint;
pub mod state;
pub mod when;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rhai::{AST, CallFnOptions, Dynamic, Engine, EvalAltResult, Position, Scope};

use crate::config::Limits;
use crate::metrics::{Decision, Metrics, RuleMetrics};
pub use api::{Actions, LogLevel, RawAlert};
use state::RuleState;

/// Name of the function every rule defines.
pub const ENTRY_POINT: &str = "on_message";
/// Optional top-level constant listing the streams a rule handles.
pub const TOPICS_CONST: &str = "TOPICS";
/// Optional top-level constant: `const SHADOW = true;` evaluates the rule and
/// counts its alerts, but sends none of them.
pub const SHADOW_CONST: &str = "SHADOW";

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

/// Keywords a rule may not use, each with the reason given when a rule
/// does: the sandbox section of docs/rules.md lists what is left.
const DISABLED_KEYWORDS: [(&str, &str); 2] = [
    (
        "import",
        "rules cannot import modules (sandbox): a rule is one file and reads nothing from disk",
    ),
    (
        "eval",
        "rules cannot call `eval` (sandbox): the code a rule runs is the code `check` compiled",
    ),
];

/// The frozen engine, with the metrics its compiled rules count into.
pub struct RuleEngine {
    engine: Engine,
    /// Where the per-rule handles ([`RuleMetrics`]) of every rule compiled
    /// with this engine are resolved, and shadowed alerts are counted.
    metrics: Arc<Metrics>,
    /// The series the rules' `rate`/`delta` keep, which the alert checks
    /// the engine runs itself ([`kind_check`]) share.
    state: Arc<RuleState>,
}

impl RuleEngine {
    /// The metrics of the runtime the engine was built with: the processor
    /// counts shadow rules' alerts there, next to the rules' own handles.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

impl std::ops::Deref for RuleEngine {
    type Target = Engine;

    fn deref(&self) -> &Engine {
        &self.engine
    }
}

/// Builds the one engine every rule runs in: sandboxed (the standard packages
/// of `Engine::new` have no file, network or process access; `import` and
/// `eval` are disabled), limited, and carrying the rule API bound to
/// `runtime`'s rule state and metrics.
pub fn build_engine(
    limits: &Limits,
    rules: &Arc<RuleState>,
    metrics: &Arc<Metrics>,
) -> Arc<RuleEngine> {
    let mut engine = Engine::new();
    // `Engine::new` installs a resolver that loads any `import`ed script from
    // disk. `import` does not even compile here; with no resolver, nothing
    // could load a file should a module path ever be reached another way.
    engine.set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
    for (keyword, _) in DISABLED_KEYWORDS {
        engine.disable_symbol(keyword);
    }
    let budget = limits.max_eval_time;
    engine.on_progress(move |ops| budget::check(ops, budget));
    engine.set_max_operations(limits.max_operations);
    engine.set_max_call_levels(limits.max_call_levels);
    engine.set_max_string_size(limits.max_string_size);
    engine.set_max_array_size(limits.max_array_size);
    engine.set_max_map_size(limits.max_map_size);
    engine.set_max_expr_depths(64, 32);
    // Rhai interns short strings (map keys, property names) in one cache
    // behind a spin lock: every worker thread contends on it, and once it
    // holds its 256 entries (hostnames fill it at once) each new string
    // scans it to evict one. Allocating the string is cheaper.
    engine.set_max_strings_interned(0);
    api::register(&mut engine, rules);
    Arc::new(RuleEngine {
        engine,
        metrics: metrics.clone(),
        state: rules.clone(),
    })
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
    /// The compiled file; `on_message` is called in it, and `check`'s lint
    /// ([`lint`]) reads its literals.
    pub(crate) ast: AST,
    /// Whether the file defines `on_message`: a rule made only of checked
    /// alert kinds need not, and is never called into.
    has_entry: bool,
    /// The alert kinds among its top-level constants that carry a `check`,
    /// in declaration order: the engine runs them on every message the
    /// rule handles, before `on_message`.
    checks: Vec<kind::AlertKind>,
    /// Top-level `const`/`let` values, evaluated once at load and visible to
    /// `on_message` on every call.
    scope: Scope<'static>,
    /// Whether `scope` holds constants only: no call can change them, so a
    /// thread may keep one copy and lend it to every call (see
    /// [`ThreadScopes`]). A top-level `let` can be assigned by `on_message`,
    /// and each call must start from the loaded value: such a rule gets a
    /// fresh copy per call.
    constants_only: bool,
    /// Whether `on_message` may read its context (see [`reads_context`]):
    /// building the context map costs more than many rules.
    reads_context: bool,
    /// Streams this rule handles; `None` means all of its subscription's.
    topics: Option<Vec<String>>,
    /// Which messages the rule is for (its `WHEN`): the others skip it
    /// without a call into Rhai.
    when: Option<when::When>,
    /// Shadow mode: alerts are counted and logged, never sent.
    pub shadow: bool,
    metrics: RuleMetrics,
}

impl Rule {
    /// The streams listed in the rule's `TOPICS`, if it has one.
    pub fn topics(&self) -> Option<&[String]> {
        self.topics.as_deref()
    }

    /// The rule's `WHEN` declaration, if it has one.
    pub fn when(&self) -> Option<&when::When> {
        self.when.as_ref()
    }

    /// The alert kinds the rule declares at its top level, described
    /// ([`kind::AlertKind::describe`]), in declaration order.
    pub fn alert_kinds(&self) -> Vec<String> {
        self.scope
            .iter()
            .filter_map(|(_, _, v)| v.try_cast::<kind::AlertKind>())
            .map(|k| k.describe(&self.name))
            .collect()
    }

    /// Whether the rule sees entries of `stream`; a shard `S:{n}` counts
    /// as its topic `S` too.
    pub fn handles(&self, stream: &str) -> bool {
        self.topics.as_ref().is_none_or(|t| {
            let topic = crate::shard::topic_of(stream);
            t.iter().any(|s| s == stream || s == topic)
        })
    }
}

/// A whole, successfully compiled rules directory.
pub struct RuleSet {
    pub rules: Vec<Rule>,
    /// The rules' string equalities by field and value: a message looks up
    /// the rules it may match instead of checking every declaration.
    index: when::Index,
    /// Whether any rule may read its context: if none does, no message
    /// needs to look through hundreds of rules to find out.
    any_reads_context: bool,
    /// Unique per loaded set in this process (never reused), so that a
    /// thread's scope copies are never lent to a rule of another set.
    id: u64,
}

/// Source of [`RuleSet`] ids.
static NEXT_SET_ID: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static THREAD_SCOPES: RefCell<ThreadScopes> = const {
        RefCell::new(ThreadScopes {
            // No set yet: ids count up from 0.
            set: u64::MAX,
            scopes: Vec::new(),
        })
    };
}

/// This thread's copies of the constant scopes of one rule set, by rule
/// index. Cloning a scope per call (three allocations, every name and value)
/// and growing it again for the call's arguments and locals cost about 4% of
/// the judge benchmark; a copy kept here already has the room. Rules run on
/// several threads at once, so each keeps its own. Keyed by the set's id: a
/// thread that meets another set (a hot reload) drops them all.
struct ThreadScopes {
    set: u64,
    scopes: Vec<Option<Scope<'static>>>,
}

/// One message as the rules see it.
pub struct Message<'a> {
    pub stream: &'a str,
    /// The decoded message (a shared map).
    pub body: &'a Dynamic,
    /// `ctx`: stream, id, group, delivery count, metadata, … Owned: each
    /// rule gets its own copy, and the last one gets this one (a map copy
    /// per rule and message is measurable).
    pub ctx: Dynamic,
    /// Entry id, for error logs.
    pub id: &'a str,
    /// The message's time (its own timestamp, or arrival).
    pub now_ms: u64,
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
    pub fn load(engine: &RuleEngine, dir: &Path) -> Result<RuleSet, RuleError> {
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
            match guarded(&path, || compile_rule(engine, &path, &rel, &source)) {
                Ok(rule) => rules.push(rule),
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(RuleSet {
                index: when::Index::build(rules.iter().map(Rule::when)),
                any_reads_context: rules.iter().any(|r| r.reads_context),
                rules,
                id: NEXT_SET_ID.fetch_add(1, Ordering::Relaxed),
            })
        } else {
            Err(RuleError::Compile(errors))
        }
    }

    /// Whether a selected rule that handles `stream` may read the context:
    /// if none does, the caller need not build it.
    pub fn reads_context(&self, selected: &[usize], stream: &str) -> bool {
        self.any_reads_context
            && selected
                .iter()
                .any(|&i| self.rules[i].reads_context && self.rules[i].handles(stream))
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

    /// Runs the selected rules, in order, on one message. `msg.body` is
    /// shared: rules see each other's changes to it, nothing is copied. A
    /// rule whose `WHEN` the message does not meet (at the moment its turn
    /// comes) is skipped and has no result. `selected` is ascending, as
    /// [`RuleSet::select`] returns it (the index finds candidates in it by
    /// binary search).
    pub fn evaluate(
        &self,
        engine: &RuleEngine,
        selected: &[usize],
        msg: Message,
    ) -> Vec<RuleResult> {
        debug_assert!(selected.is_sorted(), "selections are in path order");
        let Message {
            stream,
            body,
            ctx,
            id: msg_id,
            now_ms,
        } = msg;
        let last = if self.any_reads_context {
            selected
                .iter()
                .rev()
                .find(|&&i| self.rules[i].handles(stream) && self.rules[i].reads_context)
        } else {
            None
        };
        let mut ctx = Some(ctx);
        let mut results = Vec::new();
        let mut keys = self.index.keys(body);
        let mut candidates = self.index.candidates(&keys, selected, None);
        let mut k = 0;
        while let Some(&i) = candidates.get(k) {
            k += 1;
            let rule = &self.rules[i];
            if !rule.handles(stream) || rule.when.as_ref().is_some_and(|w| !w.admits(body)) {
                continue;
            }
            let ctx = if !rule.reads_context {
                Dynamic::UNIT
            } else if Some(&i) == last {
                ctx.take().unwrap_or_default()
            } else {
                ctx.clone().unwrap_or_default()
            };
            let started = Instant::now();
            api::begin(&rule.name, now_ms);
            let checked = if rule.checks.is_empty() {
                Ok(())
            } else {
                kind::run_checks(&rule.checks, body, &engine.state)
                    .map_err(|e| format!("{}: {e}", rule.rel_path))
            };
            let call = match checked {
                Ok(()) if rule.has_entry => self
                    .call_entry(engine, i, body, ctx)
                    .map_err(|e| describe_eval_error(&rule.rel_path, &e)),
                other => other,
            };
            // The rule may have changed a field the index looks up.
            if !keys.is_empty() {
                let now = self.index.keys(body);
                if now != keys {
                    keys = now;
                    candidates = self.index.candidates(&keys, selected, Some(i));
                    k = 0;
                }
            }
            let actions = api::take();
            let outcome = match call {
                Ok(()) => Ok(actions),
                Err(text) => {
                    rule.metrics.rule_failed(msg_id, &text);
                    Err(text)
                }
            };
            rule.metrics.observe(decision(&outcome), started.elapsed());
            let dropped = matches!(&outcome, Ok(a) if a.drop);
            results.push(RuleResult { rule: i, outcome });
            if dropped {
                break;
            }
        }
        results
    }

    /// Calls rule `i`'s `on_message` on one message, within its budget.
    fn call_entry(
        &self,
        engine: &Engine,
        i: usize,
        body: &Dynamic,
        ctx: Dynamic,
    ) -> Result<(), Box<EvalAltResult>> {
        let mut scope = self.borrow_scope(i);
        let call = {
            let _budget = budget::start();
            let options = CallFnOptions::new().eval_ast(false).rewind_scope(true);
            engine.call_fn_with_options::<Dynamic>(
                options,
                &mut scope,
                &self.rules[i].ast,
                ENTRY_POINT,
                (body.clone(), ctx),
            )
        };
        self.return_scope(i, scope);
        call.map(drop)
    }

    /// The scope for one call of rule `i`: this thread's kept copy, or a
    /// fresh one.
    fn borrow_scope(&self, i: usize) -> Scope<'static> {
        let rule = &self.rules[i];
        if !rule.constants_only {
            return rule.scope.clone();
        }
        THREAD_SCOPES
            .with_borrow_mut(|t| {
                if t.set != self.id {
                    t.set = self.id;
                    t.scopes.clear();
                    t.scopes.resize_with(self.rules.len(), || None);
                }
                t.scopes[i].take()
            })
            .unwrap_or_else(|| rule.scope.clone())
    }

    /// Keeps `scope` for rule `i`'s next call on this thread, if it is still
    /// the rule's constants. This rewinds it to them (dropping the call's
    /// parameters and locals, whatever the call did), and constants cannot be assigned nor given to
    /// a non-pure method; but a closure that captures a constant turns it
    /// into a shared value in place: such a scope is dropped and the next
    /// call starts from the loaded constants, as every call did before
    /// copies were kept.
    fn return_scope(&self, i: usize, mut scope: Scope<'static>) {
        let rule = &self.rules[i];
        if !rule.constants_only {
            return;
        }
        scope.rewind(rule.scope.len());
        if scope.iter_raw().any(|(_, _, v)| v.is_shared()) {
            return;
        }
        THREAD_SCOPES.with_borrow_mut(|t| {
            if t.set == self.id {
                t.scopes[i] = Some(scope);
            }
        });
    }
}

/// The alert kinds with a `check` among a rule's top-level constants, in
/// declaration order, each once (`const B = A;` names one kind twice).
/// Fails if the top level declared more (some are inside an array or a
/// map, where the engine would never see them), or if the rule would do
/// nothing at all.
fn checked_kinds(
    rule: &str,
    scope: &Scope,
    declared: usize,
    has_entry: bool,
) -> Result<Vec<kind::AlertKind>, String> {
    let mut checks: Vec<kind::AlertKind> = Vec::new();
    for k in scope
        .iter()
        .filter_map(|(_, _, v)| v.try_cast::<kind::AlertKind>())
    {
        if k.check().is_none() || checks.iter().any(|c| c.is(&k)) {
            continue;
        }
        if let Some(twin) = checks.iter().find(|c| c.same_alerts(&k)) {
            return Err(format!(
                "checked alert kinds {} and {} raise the same alerts (same name, same label fields): one check would resolve what the other fires; give each its own `name`",
                twin.describe(rule),
                k.describe(rule)
            ));
        }
        checks.push(k);
    }
    if checks.len() < declared {
        return Err("an alert kind with a `check` must be a top-level constant of its own (`const K = alert_kind(…)`), not inside an array or a map: the engine would never see it to run its check".into());
    }
    if !has_entry && checks.is_empty() {
        return Err(format!(
            "no `fn {ENTRY_POINT}(msg, ctx)` defined, and no alert kind with a `check`: the rule would never do anything"
        ));
    }
    Ok(checks)
}

/// `file:line:col: what happened`; a sandbox limit also names the config
/// key that sets it.
fn describe_eval_error(rel: &str, e: &EvalAltResult) -> String {
    let what = match e {
        EvalAltResult::ErrorTerminated(reason, _) => reason.to_string(),
        EvalAltResult::ErrorTooManyOperations(_) => {
            "too many operations (limits.max_operations)".to_string()
        }
        EvalAltResult::ErrorStackOverflow(_) => {
            "functions nested too deep (limits.max_call_levels)".to_string()
        }
        EvalAltResult::ErrorDataTooLarge(what, _) => {
            let key = if what.contains("string") {
                "max_string_size"
            } else if what.contains("map") {
                "max_map_size"
            } else {
                "max_array_size"
            };
            format!("{what} too large (limits.{key})")
        }
        other => other.to_string(),
    };
    format!("{}: {what}", located(rel, e.position()))
}

/// `file:line:col`, or as much of it as `pos` has.
fn located(rel: &str, pos: Position) -> String {
    match (pos.line(), pos.position()) {
        (Some(l), Some(c)) => format!("{rel}:{l}:{c}"),
        (Some(l), None) => format!("{rel}:{l}"),
        _ => rel.to_string(),
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

/// Runs `compile` and turns a panic into a compile error of `path`: Rhai's
/// compiler runs on untrusted text, and a rule it chokes on must fail its
/// own load (`check`, a reload) and not kill the watcher or the process.
fn guarded(
    path: &Path,
    compile: impl FnOnce() -> Result<Rule, CompileError>,
) -> Result<Rule, CompileError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(compile)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        Err(CompileError {
            path: path.to_path_buf(),
            line: None,
            column: None,
            message: format!("the rule compiler panicked on this file: {what}"),
        })
    })
}

fn compile_rule(
    engine: &RuleEngine,
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
        .map_err(|e| error(e.position(), compile_message(source, &e)))?;
    ast.set_source(rel);
    let has_entry = ast
        .iter_functions()
        .any(|f| f.name == ENTRY_POINT && f.params.len() == 2);
    let mut scope = Scope::new();
    api::begin(rel, 0);
    let loading = kind::Loading::start();
    let top = {
        let _budget = budget::start();
        engine.run_ast_with_scope(&mut scope, &ast)
    };
    let declared_checks = loading.declared();
    drop(loading);
    let stray = api::take();
    top.map_err(|e| {
        let text = describe_eval_error(rel, &e);
        let what = text.split_once(": ").map_or(text.as_str(), |(_, w)| w);
        error(e.position(), format!("top-level code failed: {what}"))
    })?;
    if !stray.is_empty() {
        return Err(error(
            rhai::Position::NONE,
            "top-level code must not call alert/resolve/log/print/debug/drop; do it in on_message"
                .into(),
        ));
    }
    let name = rel.strip_suffix(".rhai").unwrap_or(rel).to_string();
    let checks = checked_kinds(&name, &scope, declared_checks, has_entry)
        .map_err(|e| error(rhai::Position::NONE, e))?;
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
    let shadow = match scope.get(SHADOW_CONST) {
        None => false,
        Some(v) => v.as_bool().map_err(|_| {
            error(
                rhai::Position::NONE,
                format!("`{SHADOW_CONST}` must be true or false"),
            )
        })?,
    };
    let when = match scope.get(when::WHEN_CONST) {
        None => None,
        Some(v) => Some(when::When::parse(v).map_err(|e| error(rhai::Position::NONE, e))?),
    };
    let constants_only = scope.iter_raw().all(|(_, constant, _)| constant);
    let reads_context = reads_context(&ast, source);
    Ok(Rule {
        shadow,
        metrics: RuleMetrics::new(&engine.metrics, &name),
        name,
        rel_path: rel.to_string(),
        path: path.to_path_buf(),
        source_hash: hash_source(source),
        ast,
        has_entry,
        checks,
        constants_only,
        reads_context,
        scope,
        topics,
        when,
    })
}

/// The message of a compile error; a disabled keyword gets the sandbox's
/// reason and the offending text (`import "x"`) instead of Rhai's
/// "reserved keyword".
fn compile_message(source: &str, e: &rhai::ParseError) -> String {
    let word = match e.err_type() {
        rhai::ParseErrorType::Reserved(word) => word,
        rhai::ParseErrorType::BadInput(rhai::LexError::ImproperSymbol(word, _)) => word,
        other => return other.to_string(),
    };
    let Some((_, reason)) = DISABLED_KEYWORDS.iter().find(|(k, _)| k == word) else {
        return e.err_type().to_string();
    };
    match offending_text(source, e.position()) {
        Some(text) => format!("{reason}: `{text}`"),
        None => reason.to_string(),
    }
}

/// The statement that starts at `pos`, up to its `;` or the end of its
/// line and at most 80 characters, for an error message.
fn offending_text(source: &str, pos: Position) -> Option<String> {
    let line = source.lines().nth(pos.line()?.checked_sub(1)?)?;
    let rest: String = line.chars().skip(pos.position()?.checked_sub(1)?).collect();
    let end = rest.find(';').unwrap_or(rest.len());
    let text: String = rest[..end].trim_end().chars().take(80).collect();
    (!text.is_empty()).then_some(text)
}

/// False when the file has no `on_message` (only checked alert kinds,
/// which never see the context), or when the name of its second parameter
/// appears nowhere in the file but in its signature: then nothing can read
/// the context (`eval` is disabled). Any other mention (a comment, a
/// string, another function's parameter of the same name) counts as a read.
fn reads_context(ast: &AST, source: &str) -> bool {
    let Some(name) = ast
        .iter_functions()
        .find(|f| f.name == ENTRY_POINT && f.params.len() == 2)
        .map(|f| f.params[1])
    else {
        return false;
    };
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let mentions = source
        .match_indices(name)
        .filter(|(at, _)| {
            let before = source[..*at].chars().next_back();
            let after = source[at + name.len()..].chars().next();
            !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
        })
        .count();
    mentions > 1
}

fn hash_source(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// How one rule call is counted: an alert outranks a resolve, which
/// outranks a drop, then a log; nothing at all is a pass.
fn decision(outcome: &Result<Actions, String>) -> Decision {
    match outcome {
        Err(_) => Decision::Error,
        Ok(a) if !a.alerts.is_empty() || !a.deadmen.is_empty() => Decision::Alert,
        Ok(a) if !a.resolves.is_empty() => Decision::Resolve,
        Ok(a) if a.drop => Decision::Drop,
        Ok(a) if !a.logs.is_empty() => Decision::Log,
        Ok(_) => Decision::Pass,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::Severity;
    use crate::runtime::Runtime;

    thread_local! {
        /// One runtime per test: the engines a test builds share its rule
        /// state and metrics, as the engines of one process do.
        static RUNTIME: Runtime = Runtime::new();
    }

    fn build_engine(limits: &Limits) -> Arc<RuleEngine> {
        RUNTIME.with(|rt| rt.rule_engine(limits))
    }

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
        run_at(set, stream, body, 0)
    }

    fn run_at(set: &RuleSet, stream: &str, body: &str, now_ms: u64) -> Vec<RuleResult> {
        let engine = build_engine(&Limits::default());
        let msg: Dynamic = serde_json::from_str(body).unwrap();
        let all: Vec<usize> = (0..set.rules.len()).collect();
        let ctx = Dynamic::from_map(Default::default());
        set.evaluate(
            &engine,
            &all,
            Message {
                stream,
                body: &msg,
                ctx,
                id: "1-0",
                now_ms,
            },
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
        assert_eq!(run(&set, "a:{3}", r#"{"v": 11}"#).len(), 1, "a shard of a");
        assert!(run(&set, "b:{3}", r#"{"v": 11}"#).is_empty());
    }

    #[test]
    fn a_declared_rule_runs_only_on_the_messages_it_declares() {
        let rule =
            |when: &str| format!("const WHEN = {when};\n fn on_message(m, c) {{ log(\"ran\"); }}");
        let (_d, set) = set_of(&[
            (
                "a_site.rhai",
                &rule(r#"#{ equals: #{ site: "ams", role: "leaf" } }"#),
            ),
            (
                "b_other_site.rhai",
                &rule(r#"#{ equals: #{ site: "fra" } }"#),
            ),
            ("c_threshold.rhai", &rule("#{ min: #{ errors: 10 } }")),
            ("d_undeclared.rhai", "fn on_message(m, c) { log(\"ran\"); }"),
        ]);
        let set = set.unwrap();
        let ran = |body: &str| -> Vec<usize> {
            run(&set, "s", body).into_iter().map(|r| r.rule).collect()
        };
        assert_eq!(
            ran(r#"{"site":"ams","role":"leaf","errors":10}"#),
            [0, 2, 3]
        );
        assert_eq!(ran(r#"{"site":"ams","role":"spine","errors":9}"#), [3]);
        assert_eq!(ran(r#"{"site":"fra","errors":11.5}"#), [1, 2, 3]);
        assert_eq!(ran("[]"), [3]);
    }

    #[test]
    fn a_rule_that_changes_a_declared_field_decides_which_later_rules_run() {
        let (_d, set) = set_of(&[
            ("a_rename.rhai", "fn on_message(m, c) { m.site = \"fra\"; }"),
            (
                "b_ams.rhai",
                "const WHEN = #{ equals: #{ site: \"ams\" } };\n fn on_message(m, c) {}",
            ),
            (
                "c_fra.rhai",
                "const WHEN = #{ equals: #{ site: \"fra\" } };\n fn on_message(m, c) {}",
            ),
        ]);
        let set = set.unwrap();
        let engine = build_engine(&Limits::default());
        let body = serde_json::from_str::<Dynamic>(r#"{"site":"ams"}"#)
            .unwrap()
            .into_shared();
        let ran: Vec<usize> = set
            .evaluate(
                &engine,
                &[0, 1, 2],
                Message {
                    stream: "s",
                    body: &body,
                    ctx: Dynamic::UNIT,
                    id: "1-0",
                    now_ms: 0,
                },
            )
            .into_iter()
            .map(|r| r.rule)
            .collect();
        assert_eq!(ran, [0, 2]);
    }

    #[test]
    fn a_bad_declaration_fails_the_load_naming_the_rule() {
        let (_d, set) = set_of(&[(
            "w.rhai",
            "const WHEN = #{ min: #{ errors: \"high\" } };\n fn on_message(m, c) {}",
        )]);
        let err = set.err().unwrap().to_string();
        assert!(
            err.contains("w.rhai: `WHEN.min.errors` must be a number, not string"),
            "{err}"
        );
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
    fn helpers_reach_the_actions() {
        let (_d, set) = set_of(&[(
            "h.rhai",
            r#"fn on_message(m, c) {
                let a = #{ name: "Hot", labels: #{ host: m.host }, for_duration: "5m", resolve_after: 600 };
                hysteresis_above(a, m.v, 1000, 200);
                deadman(#{ name: "Silent", labels: #{ host: m.host } }, "10m");
                metric("rules_test_value", m.v, #{ host: m.host });
            }"#,
        )]);
        let set = set.unwrap();
        let acts = |v: i64| {
            let r = run(&set, "s", &format!(r#"{{"host": "r1", "v": {v}}}"#));
            r[0].outcome.clone().unwrap()
        };
        let high = acts(1500);
        assert_eq!(high.alerts.len(), 1);
        assert_eq!(high.alerts[0].for_ms, 300_000);
        assert_eq!(high.alerts[0].resolve_after_ms, Some(600_000));
        assert_eq!(high.deadmen[0].after_ms, 600_000);
        let mid = acts(500);
        assert!(
            mid.alerts.is_empty() && mid.resolves.is_empty(),
            "inside the band: hold"
        );
        assert_eq!(acts(100).resolves.len(), 1);
        assert!(
            RUNTIME
                .with(|rt| rt.metrics.encode())
                .contains("tripline_rules_test_value{host=\"r1\"} 100")
        );
    }

    const KINDS: &str = r#"
        const HOT = alert_kind(#{ name: "Hot", severity: "major", labels: ["if", "host"],
            summary: "{{host}} {{if}}: {{value}}", for_duration: "1m" });
        const GONE = alert_kind(#{ name: "Gone", labels: ["host"] });
        fn on_message(m, c) {
            switch m.op {
                "fire" => HOT.fire(m, m.v, "critical"),
                "fire1" => HOT.fire(m),
                "resolve" => HOT.resolve(m),
                "watch" => GONE.deadman(m, "10m"),
                "band" => HOT.hysteresis_above(m, m.v, 100, 50.0),
                "not_a_map" => HOT.fire(42),
                "bad_level" => HOT.fire(m, 1, "urgent"),
                "bad_value" => HOT.hysteresis_above(m, "x", 100, 50),
            }
        }"#;

    #[test]
    fn alert_kinds_take_their_labels_from_the_message() {
        let (_d, set) = set_of(&[("k.rhai", KINDS)]);
        let set = set.unwrap();
        let acts = |body: &str| run(&set, "s", body).remove(0).outcome.unwrap();
        let fired = acts(r#"{"op": "fire", "host": "r1", "if": "et-0", "v": 7, "x": 1}"#);
        let a = &fired.alerts[0];
        assert_eq!(a.name.as_deref(), Some("Hot"));
        assert_eq!(a.severity, Severity::Critical);
        assert_eq!(a.value.as_deref(), Some("7"));
        assert_eq!(a.for_ms, 60_000);
        assert_eq!(a.annotations["summary"], "{{host}} {{if}}: {{value}}");
        let labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(labels, ["host=r1", "if=et-0"], "only the declared fields");
        let fp = crate::alert::fingerprint("k", "Hot", &a.labels);
        let plain = acts(r#"{"op": "fire1", "host": "r1", "if": "et-0"}"#);
        assert_eq!(plain.alerts[0].severity, Severity::Major);
        assert_eq!(plain.alerts[0].value, None);
        let resolved = acts(r#"{"op": "resolve", "host": "r1", "if": "et-0"}"#);
        assert_eq!(resolved.resolves[0].0, fp, "the alert fire() raised");
        let watched = acts(r#"{"op": "watch", "host": "r1"}"#);
        let gone = watched.deadmen[0].alert.build().unwrap();
        assert_eq!(watched.deadmen[0].after_ms, 600_000);
        assert_eq!(
            watched.deadmen[0].fp,
            crate::alert::fingerprint("k", "Gone", &gone.labels)
        );
        let band = |v: f64| {
            acts(&format!(
                r#"{{"op": "band", "host": "r1", "if": "et-0", "v": {v}}}"#
            ))
        };
        assert_eq!(band(150.5).alerts[0].value.as_deref(), Some("150.5"));
        let held = band(70.0);
        assert!(held.alerts.is_empty() && held.resolves.is_empty());
        assert_eq!(band(10.0).resolves[0].0, fp);
    }

    const CHECKED: &str = r#"
        const HOT = alert_kind(#{ name: "Hot", severity: "major", labels: ["host"],
            summary: "{{host}}: {{value}}",
            check: #{ field: "t", at_least: 80, clear: 70, escalate: #{ critical: 95 } } });
        const GONE = alert_kind(#{ name: "Gone", labels: ["host"],
            check: #{ field: "t", silent_after: "2m" } });
        const COLD = alert_kind(#{ name: "Cold", labels: ["host"],
            check: #{ field: "t", below: -10 } });
        const MANUAL = alert_kind(#{ name: "Manual", labels: ["host"] });
    "#;

    #[test]
    fn checked_alert_kinds_fire_escalate_and_resolve_without_on_message() {
        let (_d, set) = set_of(&[("c.rhai", CHECKED)]);
        let set = set.unwrap();
        let acts = |t: &str| {
            run(&set, "s", &format!(r#"{{"host": "r1", "t": {t}}}"#))
                .remove(0)
                .outcome
                .unwrap()
        };
        let names = |a: &Actions| -> Vec<String> {
            a.alerts
                .iter()
                .map(|a| {
                    format!(
                        "{}/{}",
                        a.name.as_deref().unwrap_or("?"),
                        a.severity.as_str()
                    )
                })
                .collect()
        };
        let hot = acts("85");
        assert_eq!(names(&hot), ["Hot/major"]);
        assert_eq!(
            hot.alerts[0].value.as_deref(),
            Some("85"),
            "the field as it came"
        );
        assert_eq!(hot.deadmen.len(), 1, "every reading confirms the watch");
        assert_eq!(hot.deadmen[0].after_ms, 120_000);
        assert_eq!(hot.resolves.len(), 1, "Cold: not below -10, resolved");
        let hot_fp = crate::alert::fingerprint("c", "Hot", &hot.alerts[0].labels);
        assert_eq!(names(&acts("96.5")), ["Hot/critical"]);
        let held = acts("75");
        assert!(held.alerts.is_empty());
        assert!(
            !held.resolves.iter().any(|(fp, _)| *fp == hot_fp),
            "inside the band Hot holds"
        );
        assert!(acts("60").resolves.iter().any(|(fp, _)| *fp == hot_fp));
        assert_eq!(names(&acts("-20")), ["Cold/warning"]);
    }

    #[test]
    fn a_rate_check_compares_the_per_second_rate_of_a_counter() {
        let (_d, set) = set_of(&[(
            "r.rhai",
            r#"const FAST = alert_kind(#{ name: "Fast", labels: ["host"], summary: "{{value}}/s",
                check: #{ field: "n", rate: true, above: 10.0, clear: 2.0 } });"#,
        )]);
        let set = set.unwrap();
        let at = |n: i64, ms: u64| {
            run_at(&set, "s", &format!(r#"{{"host": "rate-1", "n": {n}}}"#), ms)
                .remove(0)
                .outcome
                .unwrap()
        };
        let first = at(0, 1_000);
        assert!(
            first.alerts.is_empty() && first.resolves.is_empty(),
            "one sample tells no rate: neither fire nor resolve"
        );
        let fast = at(100, 4_000);
        assert_eq!(
            fast.alerts[0].value.as_deref(),
            Some("33.33"),
            "to the hundredth"
        );
        let held = at(115, 7_000);
        assert!(
            held.alerts.is_empty() && held.resolves.is_empty(),
            "5/s: inside the band"
        );
        let redelivered = at(115, 7_000);
        assert!(
            redelivered.alerts.is_empty() && redelivered.resolves.is_empty(),
            "the same moment again tells no rate"
        );
        assert_eq!(at(118, 10_000).resolves.len(), 1, "1/s: below the band");
        let reset = at(5, 13_000);
        assert!(
            reset.alerts.is_empty(),
            "a reset counts from zero: 5 in 3 s"
        );
    }

    #[test]
    fn a_reading_without_a_number_is_logged_once_and_checks_nothing() {
        let (_d, set) = set_of(&[("c.rhai", CHECKED)]);
        let set = set.unwrap();
        for (body, says) in [
            (
                r#"{"host": "r1", "t": "hot"}"#,
                "reading without a numeric t: hot (string)",
            ),
            (
                r#"{"host": "r1"}"#,
                "reading without a numeric t: the field is missing",
            ),
        ] {
            let a = run(&set, "s", body).remove(0).outcome.unwrap();
            assert!(a.alerts.is_empty() && a.resolves.is_empty() && a.deadmen.is_empty());
            assert_eq!(
                a.logs.len(),
                1,
                "once, though three kinds check t: {:?}",
                a.logs
            );
            assert_eq!(a.logs[0].0, LogLevel::Warn);
            assert_eq!(a.logs[0].1, says);
        }
        let huge = format!(r#"{{"host": "r1", "t": "{}"}}"#, "x".repeat(10_000));
        let a = run(&set, "s", &huge).remove(0).outcome.unwrap();
        assert!(a.logs[0].1.len() < 200, "{}", a.logs[0].1);
        assert!(a.logs[0].1.ends_with("x… (string)"));
    }

    #[test]
    fn a_checked_kind_without_its_label_field_fails_the_rule_naming_it() {
        let (_d, set) = set_of(&[("c.rhai", CHECKED)]);
        let set = set.unwrap();
        let e = run(&set, "s", r#"{"t": 85}"#)
            .remove(0)
            .outcome
            .unwrap_err();
        assert!(
            e.contains(
                "c.rhai: check(): label field of alert Hot missing from the message: `host`"
            ),
            "{e}"
        );
    }

    #[test]
    fn checks_run_before_on_message_and_their_actions_add_up() {
        let src = format!(
            "{CHECKED}\nfn on_message(m, c) {{ log(\"warn\", `t=${{m.t}}`); MANUAL.fire(m); }}"
        );
        let (_d, set) = set_of(&[("c.rhai", &src)]);
        let set = set.unwrap();
        let a = run(&set, "s", r#"{"host": "r1", "t": 90}"#)
            .remove(0)
            .outcome
            .unwrap();
        let names: Vec<_> = a.alerts.iter().map(|a| a.name.clone().unwrap()).collect();
        assert_eq!(names, ["Hot", "Manual"]);
        assert_eq!(a.logs[0].1, "t=90");
    }

    /// Two checked kinds without names: both the rule's alert.
    const SAME_ALERTS: &str = "const HIGH = alert_kind(#{ labels: [\"host\"], check: #{ field: \"t\", above: 80 } });\nconst LOW = alert_kind(#{ labels: [\"host\"], check: #{ field: \"t\", below: -10 } });";

    #[test]
    fn two_checked_kinds_raising_the_same_alerts_fail_the_load() {
        let (_d, set) = set_of(&[("same.rhai", SAME_ALERTS)]);
        let e = set.err().unwrap().to_string();
        assert!(
            e.contains("same.rhai: checked alert kinds same (warning; host; checks t above 80) and same (warning; host; checks t below -10) raise the same alerts"),
            "{e}"
        );
    }

    #[test]
    fn a_check_must_be_a_top_level_constant_of_its_own() {
        let (_d, set) = set_of(&[(
            "hidden.rhai",
            r#"const KS = [alert_kind(#{ check: #{ field: "t", above: 1 } })];
               fn on_message(m, c) {}"#,
        )]);
        let e = set.err().unwrap().to_string();
        assert!(
            e.contains("hidden.rhai: an alert kind with a `check` must be a top-level constant"),
            "{e}"
        );
        let (_d, set) = set_of(&[(
            "late.rhai",
            r#"fn on_message(m, c) { let k = alert_kind(#{ check: #{ field: "t", above: 1 } }); }"#,
        )]);
        let e = run(&set.unwrap(), "s", r#"{"t": 2}"#)
            .remove(0)
            .outcome
            .unwrap_err();
        assert!(
            e.contains("must be declared as a top-level constant"),
            "{e}"
        );
        let (_d, set) = set_of(&[(
            "twice.rhai",
            r#"const A = alert_kind(#{ name: "A", check: #{ field: "t", above: 1 } }); const B = A;"#,
        )]);
        let a = run(&set.unwrap(), "s", r#"{"t": 2}"#)
            .remove(0)
            .outcome
            .unwrap();
        assert_eq!(
            a.alerts.len(),
            1,
            "one kind under two names is checked once"
        );
        let (_d, set) = set_of(&[("idle.rhai", "const K = alert_kind(#{ name: \"K\" });")]);
        let e = set.err().unwrap().to_string();
        assert!(e.contains("no alert kind with a `check`"), "{e}");
    }

    #[test]
    fn check_lists_a_rules_alert_kinds_in_declaration_order() {
        let (_d, set) = set_of(&[
            ("net/k.rhai", KINDS),
            (
                "plain.rhai",
                "const N = 1;\nconst K = alert_kind(#{ severity: \"critical\" });\n fn on_message(m, c) {}",
            ),
        ]);
        let set = set.unwrap();
        assert_eq!(
            set.rules[0].alert_kinds(),
            ["Hot (major; host, if)", "Gone (warning; host)"]
        );
        assert_eq!(set.rules[1].alert_kinds(), ["plain (critical; no labels)"]);
    }

    #[test]
    fn an_alert_kind_names_what_is_wrong_with_a_call() {
        let (_d, set) = set_of(&[("k.rhai", KINDS)]);
        let set = set.unwrap();
        let error = |body: &str| run(&set, "s", body).remove(0).outcome.unwrap_err();
        let e = error(r#"{"op": "fire", "v": 1, "host": "r1"}"#);
        assert!(
            e.contains("label field of alert Hot missing from the message: `if`"),
            "{e}"
        );
        let e = error(r#"{"op": "watch", "host": null}"#);
        assert!(e.contains("missing from the message: `host`"), "{e}");
        let e = error(r#"{"op": "not_a_map"}"#);
        assert!(e.contains("must be the message (a map), got i64"), "{e}");
        let e = error(r#"{"op": "bad_level", "host": "r1", "if": "x"}"#);
        assert!(e.contains("severity `urgent`"), "{e}");
        let e = error(r#"{"op": "bad_value", "host": "r1", "if": "x"}"#);
        assert!(e.contains("expected a number, got string"), "{e}");
        let (_d, bad) = set_of(&[(
            "d.rhai",
            "const K = alert_kind(#{ name: \"K\", labels: #{ host: 1 } });\n fn on_message(m, c) {}",
        )]);
        let e = bad.err().unwrap().to_string();
        assert!(
            e.contains("d.rhai") && e.contains("`labels` must list"),
            "{e}"
        );
    }

    #[test]
    fn a_band_on_a_map_in_a_variable_leaves_the_variable_as_it_was() {
        let (_d, set) = set_of(&[(
            "b.rhai",
            r#"fn on_message(m, c) {
                let a = #{ name: "Hot", labels: #{ host: "r1" } };
                hysteresis_above(a, m.v, 100, 50);
                hysteresis_above(a, 1.5, 100.0, 50);
                if a.name != "Hot" { throw "the band took the map"; }
            }"#,
        )]);
        let r = run(&set.unwrap(), "s", r#"{"v": 500}"#);
        assert_eq!(r[0].outcome.as_ref().unwrap().alerts.len(), 1);
    }

    #[test]
    fn hysteresis_below_mirrors_above_and_checks_its_thresholds() {
        let (_d, set) = set_of(&[(
            "p.rhai",
            "fn on_message(m, c) { hysteresis_below(#{ name: \"Low\" }, m.p, -40.0, -38.0); }",
        )]);
        let set = set.unwrap();
        let acts = |p: f64| {
            let r = run(&set, "s", &format!(r#"{{"p": {p}}}"#));
            r[0].outcome.clone().unwrap()
        };
        assert_eq!(acts(-41.0).alerts.len(), 1);
        let held = acts(-39.0);
        assert!(held.alerts.is_empty() && held.resolves.is_empty());
        assert_eq!(acts(-37.0).resolves.len(), 1);
        let (_d, bad) = set_of(&[(
            "b.rhai",
            "fn on_message(m, c) { hysteresis_below(#{}, 1, -38.0, -40.0); }",
        )]);
        let r = run(&bad.unwrap(), "s", "{}");
        assert!(
            r[0].outcome
                .as_ref()
                .unwrap_err()
                .contains("clear threshold -40")
        );
    }

    #[test]
    fn rate_in_a_rule_uses_the_message_time() {
        let (_d, set) = set_of(&[(
            "r.rhai",
            "fn on_message(m, c) { if rate(m.k, m.n) > 5.0 { alert(#{}); } }",
        )]);
        let set = set.unwrap();
        let engine = build_engine(&Limits::default());
        let ctx = Dynamic::from_map(Default::default());
        let at = |n: i64, ms: u64| {
            let body: Dynamic =
                serde_json::from_str(&format!(r#"{{"k": "rate-test", "n": {n}}}"#)).unwrap();
            let r = set.evaluate(
                &engine,
                &[0],
                Message {
                    stream: "s",
                    body: &body,
                    ctx: ctx.clone(),
                    id: "1",
                    now_ms: ms,
                },
            );
            r[0].outcome.as_ref().unwrap().alerts.len()
        };
        assert_eq!(at(0, 0), 0);
        assert_eq!(at(100, 10_000), 1, "10/s");
        assert_eq!(at(120, 20_000), 0, "2/s");
        assert_eq!(at(5, 30_000), 0, "reset: 5 over 10 s, not a spike");
    }

    #[test]
    fn bad_durations_fail_with_the_key() {
        let (_d, set) = set_of(&[(
            "x.rhai",
            "fn on_message(m, c) { alert(#{ for_duration: \"soon\" }); }",
        )]);
        let r = run(&set.unwrap(), "s", "{}");
        assert!(
            r[0].outcome
                .as_ref()
                .unwrap_err()
                .contains("`for_duration`")
        );
    }

    #[test]
    fn editor_files_are_not_rules() {
        assert!(!is_rule_file(Path::new("r/.#a.rhai")));
        assert!(!is_rule_file(Path::new("r/a.rhai~")));
        assert!(!is_rule_file(Path::new("r/.a.rhai.swp")));
        assert!(is_rule_file(Path::new("r/a.rhai")));
    }

    #[test]
    fn the_context_is_built_unless_nothing_can_read_it() {
        let engine = build_engine(&Limits::default());
        let reads = |src: &str| reads_context(&engine.compile(src).unwrap(), src);
        assert!(!reads("fn on_message(msg, ctx) { log(msg.x); }"));
        assert!(!reads("fn on_message(m, c) { let cc = c_; let c_ = 1; }"));
        assert!(reads("fn on_message(msg, ctx) { log(ctx.id); }"));
        assert!(reads(
            "fn on_message(msg, ctx) { let f = || ctx.id; f.call() }"
        ));
        assert!(reads("fn on_message(msg, ctx) { is_def_var(\"ctx\") }"));
        assert!(reads("// ctx\nfn on_message(msg, ctx) { }"));
        assert!(reads(
            "fn on_message(msg, ctx) { f(ctx) }\nfn f(c) { log(c.stream) }"
        ));
        assert!(
            !reads("const K = alert_kind(#{ name: \"ctx\" });"),
            "no on_message: only checks, which never see it"
        );
    }

    #[test]
    fn kept_scopes_hold_the_loaded_values_on_every_call() {
        let (_d, set) = set_of(&[
            (
                "a.rhai",
                "const N = 3; const L = [1, 2];\n fn on_message(m, c) {\n if is_def_var(\"local\") { throw \"leaked\"; }\n let local = N;\n if m.x == 1 { L.push(3); }\n if m.x == 2 { throw \"stop\"; }\n let f = || N + L.len();\n if f.call() != 5 || N + L.len() != 5 { throw \"changed\"; }\n }",
            ),
            (
                "b.rhai",
                "let V = 1;\n fn on_message(m, c) { if V != 1 { throw \"kept\"; } V += 1; }",
            ),
        ]);
        let set = set.unwrap();
        let outcomes = |x: i64| {
            run(&set, "s", &format!(r#"{{"x": {x}}}"#))
                .into_iter()
                .map(|r| r.outcome.err())
                .collect::<Vec<_>>()
        };
        assert_eq!(outcomes(0), [None, None]);
        let failed = outcomes(1);
        assert!(
            failed[0].as_ref().unwrap().contains("constant"),
            "{failed:?}"
        );
        assert!(outcomes(2)[0].as_ref().unwrap().contains("stop"));
        assert_eq!(outcomes(0), [None, None]);
        assert_eq!(outcomes(0), [None, None]);
    }

    #[test]
    fn a_reloaded_rule_sees_its_own_constants() {
        let rule = |n: i64| {
            format!("const N = {n};\n fn on_message(m, c) {{ if N != {n} {{ throw N; }} }}")
        };
        let (_d, old) = set_of(&[("r.rhai", &rule(1))]);
        let (_d, new) = set_of(&[("r.rhai", &rule(2))]);
        let (old, new) = (old.unwrap(), new.unwrap());
        for set in [&old, &new, &old, &new] {
            assert!(run(set, "s", "{}")[0].outcome.is_ok());
        }
    }

    #[test]
    fn sandbox_has_no_eval() {
        let (_d, set) = set_of(&[("x.rhai", "fn on_message(m, c) { eval(\"1\"); }")]);
        let err = set.err().unwrap().to_string();
        assert!(
            err.contains("x.rhai:1:23: rules cannot call `eval` (sandbox)"),
            "{err}"
        );
    }

    /// Runs every rule of `set` on `{}` with `limits`; the outcomes in path
    /// order and how long the whole message took.
    fn run_with(
        set: &RuleSet,
        limits: &Limits,
    ) -> (Vec<Result<Actions, String>>, std::time::Duration) {
        let engine = build_engine(limits);
        let body: Dynamic = serde_json::from_str("{}").unwrap();
        let all: Vec<usize> = (0..set.rules.len()).collect();
        let started = Instant::now();
        let results = set.evaluate(
            &engine,
            &all,
            Message {
                stream: "s",
                body: &body,
                ctx: Dynamic::UNIT,
                id: "1-0",
                now_ms: 0,
            },
        );
        let took = started.elapsed();
        (results.into_iter().map(|r| r.outcome).collect(), took)
    }

    #[test]
    fn import_is_refused_at_load_with_its_position_anywhere_in_a_rule() {
        let module = tempfile::tempdir().unwrap();
        let target = module.path().join("secret.rhai");
        std::fs::write(&target, "export const X = 1;").unwrap();
        let absolute = target.with_extension("").display().to_string();
        let (_d, set) = set_of(&[
            (
                "a_top.rhai",
                "import \"secret\" as s;\nfn on_message(m, c) {}",
            ),
            (
                "b_inside.rhai",
                &format!("fn on_message(m, c) {{\n    import \"{absolute}\" as s;\n}}"),
            ),
            (
                "c_helper.rhai",
                "fn helper() {\n  if true {\n      import \"../secret\";\n  }\n}\nfn on_message(m, c) { helper() }",
            ),
        ]);
        let err = set.err().unwrap().to_string();
        let reason = "rules cannot import modules (sandbox)";
        for expected in [
            format!("a_top.rhai:1:1: {reason}"),
            format!("b_inside.rhai:2:5: {reason}"),
            format!("c_helper.rhai:3:7: {reason}"),
            "`import \"secret\" as s`".to_string(),
            format!("`import \"{absolute}\" as s`"),
        ] {
            assert!(err.contains(&expected), "{expected} not in:\n{err}");
        }
    }

    #[test]
    fn runaways_stop_naming_their_rule_and_limit_and_the_next_rule_still_alerts() {
        let (_d, set) = set_of(&[
            (
                "1_array.rhai",
                "fn on_message(m, c) {\n  let a = [];\n  loop { a.push(a.len()); }\n}",
            ),
            (
                "2_map.rhai",
                "fn on_message(m, c) {\n  let x = #{}; let i = 0;\n  loop { x[`k${i}`] = i; i += 1; }\n}",
            ),
            (
                "3_string.rhai",
                "fn on_message(m, c) {\n  let s = \"\";\n  loop { s += \"xxxxxxxx\"; }\n}",
            ),
            (
                "4_recursion.rhai",
                "fn deeper(n) { deeper(n + 1) }\nfn on_message(m, c) {\n  deeper(0)\n}",
            ),
            ("5_loop.rhai", "fn on_message(m, c) {\n  loop {}\n}"),
            ("6_alert.rhai", "fn on_message(m, c) { alert(#{}); }"),
        ]);
        let (outcomes, _) = run_with(&set.unwrap(), &Limits::default());
        let errors: Vec<&String> = outcomes[..5]
            .iter()
            .map(|o| o.as_ref().unwrap_err())
            .collect();
        for (error, expected) in errors.iter().zip([
            "1_array.rhai",
            "2_map.rhai",
            "3_string.rhai",
            "4_recursion.rhai",
            "5_loop.rhai",
        ]) {
            assert!(error.starts_with(expected), "{expected}: {error}");
        }
        for error in &errors {
            assert!(error.contains("limits."), "names its limit: {error}");
        }
        assert_eq!(outcomes[5].as_ref().unwrap().alerts.len(), 1);
    }

    #[test]
    fn max_eval_time_stops_a_loop_the_operations_limit_would_let_run() {
        let (_d, set) = set_of(&[(
            "spin.rhai",
            "fn on_message(m, c) {\n  let n = 0;\n  loop { n += 1; }\n}",
        )]);
        let limits = Limits {
            max_operations: u64::MAX,
            max_eval_time: std::time::Duration::from_millis(20),
            ..Limits::default()
        };
        let (outcomes, took) = run_with(&set.unwrap(), &limits);
        let error = outcomes[0].as_ref().unwrap_err();
        assert!(
            error.starts_with("spin.rhai") && error.contains("limits.max_eval_time (20ms)"),
            "{error}"
        );
        assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    }

    #[test]
    fn top_level_runaway_fails_the_load_within_its_budget() {
        let (_d, set) = set_of(&[(
            "t.rhai",
            "let a = [];\nloop { a.push(1); }\nfn on_message(m, c) {}",
        )]);
        let err = set.err().unwrap().to_string();
        assert!(
            err.contains("t.rhai:2:") && err.contains("top-level code failed"),
            "{err}"
        );
    }

    #[test]
    fn sleep_is_refused_even_through_a_function_pointer() {
        let (_d, set) = set_of(&[
            ("a.rhai", "fn on_message(m, c) { sleep(3600); }"),
            ("b.rhai", "fn on_message(m, c) { sleep(0.5); }"),
            (
                "c.rhai",
                "fn on_message(m, c) { Fn(\"sleep\").call(3600); }",
            ),
        ]);
        let (outcomes, took) = run_with(&set.unwrap(), &Limits::default());
        for o in &outcomes {
            assert!(
                o.as_ref()
                    .unwrap_err()
                    .contains("rules cannot sleep (sandbox)"),
                "{o:?}"
            );
        }
        assert!(took < std::time::Duration::from_millis(500), "{took:?}");
    }

    #[test]
    fn huge_single_allocations_are_refused_not_made() {
        let (_d, set) = set_of(&[
            (
                "a.rhai",
                "fn on_message(m, c) { let b = blob(1_000_000_000); }",
            ),
            (
                "b.rhai",
                "fn on_message(m, c) { let a = []; a.pad(1_000_000_000, 0); }",
            ),
            (
                "c.rhai",
                "fn on_message(m, c) { let s = \"\"; s.pad(1_000_000_000, \"x\"); }",
            ),
            (
                "d.rhai",
                "fn on_message(m, c) { let a = [1]; for i in 0..40 { a += a; } }",
            ),
        ]);
        let (outcomes, took) = run_with(&set.unwrap(), &Limits::default());
        for o in &outcomes {
            assert!(o.as_ref().unwrap_err().contains("too large"), "{o:?}");
        }
        assert!(took < std::time::Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn print_and_debug_are_rule_logs_not_stdout() {
        let (_d, set) = set_of(&[(
            "p.rhai",
            "fn on_message(m, c) { print(\"p\"); debug(\"d\"); }",
        )]);
        let (outcomes, _) = run_with(&set.unwrap(), &Limits::default());
        let logs = &outcomes[0].as_ref().unwrap().logs;
        assert_eq!(logs[0], (LogLevel::Info, "p".to_string()));
        assert_eq!(logs[1].0, LogLevel::Debug);
        let (_d, top) = set_of(&[("t.rhai", "print(1);\nfn on_message(m, c) {}")]);
        assert!(top.err().unwrap().to_string().contains("print"));
    }

    #[test]
    fn a_missing_field_in_a_label_fails_the_rule_at_its_position() {
        let (_d, set) = set_of(&[
            (
                "a.rhai",
                "fn on_message(m, c) {\n  alert(#{ labels: #{ hostname: m.hostname } });\n}",
            ),
            (
                "b.rhai",
                "fn on_message(m, c) {\n  resolve(#{ name: m.alert_name });\n}",
            ),
            (
                "c.rhai",
                "fn on_message(m, c) {\n  hysteresis_above(#{ labels: #{ i: m.interface } }, 5, 1, 0);\n}",
            ),
            (
                "d.rhai",
                "fn on_message(m, c) {\n  alert(#{ labels: #{ vrf: m.vrf ?? \"default\" } });\n}",
            ),
        ]);
        let (outcomes, _) = run_with(&set.unwrap(), &Limits::default());
        for (o, expected) in outcomes
            .iter()
            .zip(["a.rhai:2:3: ", "b.rhai:2:3: ", "c.rhai:2:3: "])
        {
            let e = o.as_ref().unwrap_err();
            assert!(
                e.starts_with(expected) && e.contains("is () (a field missing"),
                "{e}"
            );
        }
        let d = outcomes[3].as_ref().unwrap();
        assert_eq!(d.alerts[0].labels["vrf"], "default");
    }

    #[test]
    fn require_names_every_missing_field() {
        let (_d, set) = set_of(&[
            (
                "a.rhai",
                "fn on_message(m, c) {\n  require(m, [\"hostname\", \"interface\", \"x\"]);\n}",
            ),
            (
                "b.rhai",
                "fn on_message(m, c) { require(m, \"x\"); alert(#{}); }",
            ),
        ]);
        let r = run(&set.unwrap(), "s", r#"{"x": 1, "interface": null}"#);
        let e = r[0].outcome.as_ref().unwrap_err();
        assert!(
            e.starts_with("a.rhai:2:3: ")
                && e.contains("require(): the message has no fields `hostname`, `interface`"),
            "{e}"
        );
        assert_eq!(r[1].outcome.as_ref().unwrap().alerts.len(), 1);
    }

    #[test]
    fn a_compiler_panic_is_the_files_compile_error() {
        let err = guarded(Path::new("rules/p.rhai"), || panic!("parser gave up"))
            .err()
            .unwrap();
        assert_eq!(err.path, Path::new("rules/p.rhai"));
        assert!(
            err.to_string()
                .contains("the rule compiler panicked on this file: parser gave up"),
            "{err}"
        );
    }

    /// Worst engine time per message of each runaway, for
    /// docs/performance.md: `cargo test --lib rules::tests::runaway_engine_time -- --ignored --nocapture`.
    #[test]
    #[ignore = "prints figures; run by hand"]
    fn runaway_engine_time() {
        let runaways = [
            ("array", "let a = []; loop { a.push(a.len()); }"),
            (
                "map",
                "let x = #{}; let i = 0; loop { x[`k${i}`] = i; i += 1; }",
            ),
            ("string", "let s = \"\"; loop { s += \"x\"; }"),
            ("recursion", "deeper(0)"),
            ("loop", "loop {}"),
            (
                "array of 9,000 (no limit hit)",
                "let a = []; for i in 0..9000 { a.push(i); }",
            ),
        ];
        for (what, body) in runaways {
            let rule =
                format!("fn deeper(n) {{ deeper(n + 1) }}\nfn on_message(m, c) {{ {body} }}");
            let (_d, set) = set_of(&[("r.rhai", &rule)]);
            let set = set.unwrap();
            let mut times: Vec<std::time::Duration> = (0..20)
                .map(|_| run_with(&set, &Limits::default()).1)
                .collect();
            times.sort();
            let error = run_with(&set, &Limits::default()).0[0]
                .clone()
                .err()
                .unwrap_or_default();
            println!(
                "{what:32} median {:>9.2?}  max {:>9.2?}  {error}",
                times[times.len() / 2],
                times[times.len() - 1]
            );
        }
    }
}
