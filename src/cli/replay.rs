//! `tripline replay FILE.jsonl`: runs recorded telemetry through the rules
//! with no Redis, printing every decision and a summary with exact counts.
//!
//! Each line goes to every subscription that reads its stream, as each
//! consumer group sees every entry in production; one alert book is shared,
//! as it is by the workers of one instance. With `--sinks` the alerts are
//! really delivered through the enabled plugins.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;

use crate::alert::{Alert, Status};
use crate::config::Settings;
use crate::escape::escape;
use crate::process::{Input, LoadedRules, Processor, Verdict};
use crate::replay::{Record, id_ms};
use crate::rules::RuleSet;
use crate::runtime::Runtime;
use crate::sinks::{self, Manifest, Sink};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// JSON-lines file to replay (`-` for standard input).
    #[arg(value_name = "FILE.jsonl")]
    pub file: PathBuf,
    /// Stream of lines that name none.
    #[arg(long)]
    pub stream: Option<String>,
    /// Really deliver alerts through the enabled sinks in the plugins directory (default: only print them).
    #[arg(long)]
    pub sinks: bool,
    /// Print only the summary, not every decision.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Exact counts of what the replay saw and decided.
#[derive(Debug, Default)]
struct Tally {
    /// Non-blank lines read.
    lines: u64,
    /// Lines that parsed as a message.
    messages: u64,
    /// Lines that did not.
    malformed: u64,
    /// Messages on a stream no subscription reads.
    unrouted: u64,
    /// Messages the engine could not decode (it would dead-letter them).
    undecodable: u64,
    /// Log lines the rules wrote.
    logs: u64,
    /// Per rule: (firing, resolved) notifications.
    alerts: BTreeMap<String, (u64, u64)>,
    /// Messages a rule dropped (per subscription).
    drops: u64,
    /// Rules that failed on a message.
    rule_errors: u64,
    /// With `--sinks`: alerts handed to sinks, and deliveries that failed.
    delivered: Option<(u64, u64)>,
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let (firing, resolved) = self
            .alerts
            .values()
            .fold((0, 0), |(f, r), (a, b)| (f + a, r + b));
        writeln!(f, "summary:")?;
        writeln!(f, "  lines: {}", self.lines)?;
        writeln!(f, "  messages: {}", self.messages)?;
        writeln!(f, "  malformed lines: {}", self.malformed)?;
        writeln!(f, "  read by no subscription: {}", self.unrouted)?;
        writeln!(f, "  undecodable: {}", self.undecodable)?;
        writeln!(f, "  logs: {}", self.logs)?;
        writeln!(
            f,
            "  alerts: {} ({firing} firing, {resolved} resolved)",
            firing + resolved
        )?;
        for (rule, (fi, re)) in &self.alerts {
            writeln!(f, "    {}: {fi} firing, {re} resolved", escape(rule))?;
        }
        writeln!(f, "  drops: {}", self.drops)?;
        write!(f, "  rule errors: {}", self.rule_errors)?;
        if let Some((ok, failed)) = self.delivered {
            write!(
                f,
                "\n  delivered: {ok} alert(s), {failed} failed deliver{}",
                if failed == 1 { "y" } else { "ies" }
            )?;
        }
        Ok(())
    }
}

/// A sink built from an enabled manifest, with its route.
struct LiveSink {
    /// Name and route of the sink.
    manifest: Manifest,
    /// The sink itself, built from the manifest's settings.
    sink: Box<dyn Sink>,
}

pub fn replay(config_path: Option<&Path>, args: Args) -> anyhow::Result<()> {
    let config = Settings::load(config_path)?;
    let runtime = Runtime::new();
    let engine = runtime.rule_engine(&config.limits);
    let set = RuleSet::load(&engine, &config.rules_dir).context("rules failed to load")?;
    let loaded = Arc::new(LoadedRules::new(set, &config.subscriptions));
    let processor = Processor {
        engine,
        rules: Arc::new(ArcSwap::new(loaded.clone())),
        book: Arc::new(runtime.alert_book(config.alerts.policy)),
    };
    let sinks = if args.sinks {
        build_sinks(&config, &runtime)?
    } else {
        Vec::new()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let input: Box<dyn BufRead> = if args.file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(&args.file)
            .with_context(|| format!("cannot open {}", args.file.display()))?;
        Box::new(std::io::BufReader::new(f))
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut replay = Replay {
        config: &config,
        processor: &processor,
        loaded: &loaded,
        sinks: &sinks,
        runtime: &runtime,
        args: &args,
        tally: Tally {
            delivered: args.sinks.then_some((0, 0)),
            ..Tally::default()
        },
        clock: None,
    };
    for (i, line) in input.lines().enumerate() {
        let n = i + 1;
        let line = line.with_context(|| format!("{}: reading line {n}", args.file.display()))?;
        if !line.trim().is_empty() {
            replay.line(n, &line, &mut out)?;
        }
    }
    writeln!(out, "{}", replay.tally)?;
    out.flush()?;
    Ok(())
}

/// One replay in progress: what judges the lines and what was counted.
struct Replay<'a> {
    /// Which subscriptions read which stream.
    config: &'a Settings,
    /// Decode, rules and alert book, as in `run`.
    processor: &'a Processor,
    /// The rule set, loaded once for the whole file.
    loaded: &'a LoadedRules,
    /// With `--sinks`: where alerts are really delivered.
    sinks: &'a [LiveSink],
    /// Runs the sinks' deliveries.
    runtime: &'a tokio::runtime::Runtime,
    /// `--stream` and `--quiet`.
    args: &'a Args,
    /// What happened so far, for the summary.
    tally: Tally,
    /// Time and sequence of the last message, so lines without either get
    /// ids that keep increasing.
    clock: Option<(u64, u64)>,
}

impl Replay<'_> {
    /// One non-blank line: parsed, given a time and an id, and judged by
    /// every subscription reading its stream.
    fn line(&mut self, n: usize, line: &str, out: &mut impl Write) -> anyhow::Result<()> {
        let quiet = self.args.quiet;
        self.tally.lines += 1;
        let rec = match Record::parse(line) {
            Ok(r) => r,
            Err(e) => {
                self.tally.malformed += 1;
                say(out, quiet, format_args!("{n}: MALFORMED {e}"))?;
                return Ok(());
            }
        };
        let Some(stream) = rec.stream.clone().or_else(|| self.args.stream.clone()) else {
            self.tally.malformed += 1;
            say(
                out,
                quiet,
                format_args!("{n}: MALFORMED no `stream` in the line and no --stream given"),
            )?;
            return Ok(());
        };
        self.tally.messages += 1;
        let (now_ms, id) = self.stamp(&rec);
        let config = self.config;
        let subs: Vec<_> = config
            .subscriptions
            .iter()
            .filter(|s| s.streams.contains(&stream))
            .collect();
        if subs.is_empty() {
            self.tally.unrouted += 1;
            say(
                out,
                quiet,
                format_args!("{n}: {stream} {id}: SKIP no subscription reads stream `{stream}`"),
            )?;
            return Ok(());
        }
        let fields = rec.fields();
        for sub in subs {
            let input = Input {
                subscription: &sub.name,
                group: sub.group(),
                stream: &stream,
                id: &id,
                deliveries: 1,
                fields: &fields,
                now_ms,
            };
            if !self.judge(n, &input, out)? {
                break;
            }
        }
        Ok(())
    }

    /// The message's time (its own, its id's, the previous message's, or
    /// now) and its id (its own, or one made from that time).
    fn stamp(&mut self, rec: &Record) -> (u64, String) {
        let now_ms = rec
            .timestamp_ms
            .or_else(|| rec.id.as_deref().and_then(id_ms))
            .or(self.clock.map(|(ms, _)| ms))
            .unwrap_or_else(crate::clock::now_ms);
        let seq = match self.clock {
            Some((ms, seq)) if ms == now_ms => seq + 1,
            _ => 0,
        };
        self.clock = Some((now_ms, seq));
        let id = rec.id.clone().unwrap_or_else(|| format!("{now_ms}-{seq}"));
        (now_ms, id)
    }

    /// One subscription's verdict on one message, printed and counted;
    /// false when the message is undecodable (every subscription would
    /// fail the same way, so the rest are skipped).
    fn judge(&mut self, n: usize, input: &Input, out: &mut impl Write) -> anyhow::Result<bool> {
        let (quiet, tally) = (self.args.quiet, &mut self.tally);
        let (stream, id) = (input.stream, input.id);
        let at = format!("{n}: {stream} {id} {}:", input.subscription);
        let result = self.processor.process(self.loaded, input);
        if let Verdict::Undecodable(reason) = &result.verdict {
            tally.undecodable += 1;
            say(
                out,
                quiet,
                format_args!("{n}: {stream} {id}: UNDECODABLE {reason}"),
            )?;
            return Ok(false);
        }
        for (rule, level, text) in &result.logs {
            tally.logs += 1;
            say(
                out,
                quiet,
                format_args!("{at} LOG {} {rule}: {text}", level.as_str()),
            )?;
        }
        for (rule, error) in &result.errors {
            tally.rule_errors += 1;
            say(out, quiet, format_args!("{at} ERROR {rule}: {error}"))?;
        }
        for a in &result.notifications {
            let entry = tally.alerts.entry(a.rule.clone()).or_default();
            match a.status {
                Status::Firing => entry.0 += 1,
                Status::Resolved => entry.1 += 1,
            }
            say(
                out,
                quiet,
                format_args!("{at} ALERT {}", sinks::console::line(a)),
            )?;
        }
        if let Some(rule) = &result.dropped_by {
            tally.drops += 1;
            say(out, quiet, format_args!("{at} DROP by {rule}"))?;
        }
        if !self.sinks.is_empty() && !result.notifications.is_empty() {
            out.flush()?;
            deliver(
                self.runtime,
                self.sinks,
                &result.notifications,
                tally,
                &at,
                out,
            )?;
        }
        Ok(true)
    }
}

/// One decision per line: ids, labels, log text and errors come from the
/// recording, so the line is escaped and a newline in them cannot forge a
/// decision.
fn say(out: &mut impl Write, quiet: bool, line: fmt::Arguments) -> std::io::Result<()> {
    if quiet {
        return Ok(());
    }
    writeln!(out, "{}", escape(&line.to_string()))
}

/// Builds every enabled sink the way `run` would, so a replay with
/// `--sinks` fails early on a bad manifest.
fn build_sinks(config: &Settings, runtime: &Runtime) -> anyhow::Result<Vec<LiveSink>> {
    let manifests = sinks::load_dir(&config.plugins_dir).map_err(|errors| {
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("plugins failed to load:\n{}", text.join("\n"))
    })?;
    // Connects lazily: only a `redis_stream` sink writing to tripline's own
    // Redis ever uses it.
    let redis = config.redis.target.clone();
    let mut live = Vec::new();
    for manifest in manifests.into_iter().filter(|m| m.enabled) {
        let kind = sinks::kind(&manifest.kind).with_context(|| {
            format!(
                "{}: unknown kind `{}`",
                manifest.path.display(),
                manifest.kind
            )
        })?;
        let cx = sinks::BuildContext {
            sink: manifest.name.clone(),
            redis: redis.clone(),
            timeout: manifest.timeout,
            base_dir: manifest.dir(),
            metrics: runtime.metrics.clone(),
        };
        let sink = kind
            .build(&manifest.settings, &cx)
            .map_err(|e| anyhow::anyhow!("{}: {e}", manifest.path.display()))?;
        live.push(LiveSink { manifest, sink });
    }
    if live.is_empty() {
        anyhow::bail!(
            "--sinks: no enabled sink in {}",
            config.plugins_dir.display()
        );
    }
    Ok(live)
}

/// Hands one message's alerts to every sink whose route wants them; a
/// failure is reported (even with `--quiet`) and counted, and the replay
/// goes on.
fn deliver(
    runtime: &tokio::runtime::Runtime,
    sinks: &[LiveSink],
    alerts: &[Alert],
    tally: &mut Tally,
    at: &str,
    out: &mut impl Write,
) -> std::io::Result<()> {
    for s in sinks {
        let batch: Vec<Alert> = alerts
            .iter()
            .filter(|a| s.manifest.route.matches(a))
            .cloned()
            .collect();
        if batch.is_empty() {
            continue;
        }
        let counts = tally.delivered.get_or_insert((0, 0));
        match runtime.block_on(s.sink.deliver(&batch)) {
            Ok(()) => counts.0 += batch.len() as u64,
            Err(e) => {
                counts.1 += 1;
                let line = format!("{at} SINK {} failed: {e}", s.manifest.name);
                writeln!(out, "{}", escape(&line))?;
            }
        }
    }
    Ok(())
}
