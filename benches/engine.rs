//! The whole engine against a hand-written consumer, over a throwaway
//! `redis-server`: throughput, end-to-end latency and memory (the "Numbers we
//! hold ourselves to" of the spec). It prints figures and asserts nothing
//! about time. `scripts/bench` runs it on a release build; the commands and
//! the latest figures are in docs/performance.md.
//!
//! Under `cargo test` (no `--bench` argument) it runs every mode once on a
//! tiny input, so CI keeps the harness itself working.

#[path = "../tests/it/util.rs"]
mod util;

use std::collections::HashMap;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use redis::Value;
use serde::Deserialize;
use util::{RedisServer, free_port};

/// The stream of the shipped setup.
const STREAM: &str = "packet-counter-errors";
/// The shipped config's groups on [`STREAM`], in the order `--groups` takes
/// them, with the threshold the bare loop checks in each.
const GROUPS: [(&str, i64); 2] = [("packet-error-alerts", 10_000), ("packet-error-logs", 500)];
/// How long a phase may take before the benchmark gives up on it.
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Parser)]
#[command(about = "tripline benchmarks (see docs/performance.md)")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Drain a pre-filled stream with a bare consume loop and with `tripline run`.
    Throughput(ThroughputArgs),
    /// Publish at a fixed rate; XADD → line written by the file sink.
    Latency(LatencyArgs),
    /// Distinct label sets through the shipped rule's `rate()`; resident memory after.
    Memory(MemoryArgs),
    /// No Redis: decode + rules + alert lifecycle in this process, one
    /// thread, per subscription (what `perf record` of the hot path wants).
    Judge(JudgeArgs),
    /// Throughput against the number of rules of the pack (1 to 200), for
    /// tripline and the bare loop; writes the plot as SVG.
    Sweep(SweepArgs),
}

/// The readings a run judges and the rules that judge them, shared by
/// `throughput` and `judge` so both measure the same work.
#[derive(clap::Args, Clone)]
struct Workload {
    /// Entries pre-filled into the stream (judged per subscription, for `judge`).
    #[arg(long, default_value_t = 200_000)]
    messages: usize,
    /// Rules tripline runs: `shipped`, `1` or `20` generated threshold
    /// rules, `200` (the generated 200-rule pack), `pack:N` (its first N),
    /// or `pack:N/M` (its first N, those from M on for absent sites).
    #[arg(long, default_value = "shipped", value_parser = parse_rules)]
    rules: Rules,
    /// Generate the rules without their `WHEN` declaration, so every rule
    /// runs on every entry (how all rules ran before declarations).
    #[arg(long)]
    undeclared: bool,
    /// Share of series whose readings are at or above 10,000 (alerting).
    #[arg(long, default_value_t = 0.0)]
    alert_share: f64,
    /// Share of series between 500 and 10,000 (the log rule's warning band).
    #[arg(long, default_value_t = 0.05)]
    log_share: f64,
    /// Distinct hostname/interface series the readings cycle through.
    #[arg(long, default_value_t = 1000)]
    series: usize,
}

impl Workload {
    /// The payload of entry `i`: series `i` modulo `series`, see [`reading`]
    /// (and [`pack_reading`] for the rule pack).
    fn payload(&self, i: usize) -> String {
        let read = match self.rules {
            Rules::Pack(..) => pack_reading,
            _ => reading,
        };
        read(
            i % self.series,
            self.series,
            self.alert_share,
            self.log_share,
        )
    }
}

#[derive(clap::Args, Clone)]
struct ThroughputArgs {
    #[command(flatten)]
    work: Workload,
    /// Consumer groups on the stream: 2 = the shipped config (alerts + logs,
    /// every entry processed twice, by both loops); 1 = the alerts group only.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    groups: u8,
    /// Rounds; the order (bare first or tripline first) alternates.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Silence the rules' own log lines (`RUST_LOG=info,tripline::rule=error`)
    /// to see what they cost.
    #[arg(long)]
    quiet_rule_logs: bool,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Rules {
    Shipped,
    /// N generated threshold rules on `input_errors` ([`write_rules`]).
    Threshold(usize),
    /// The first N rules of the generated pack ([`pack_rule`]); those from
    /// the second number on are for sites no reading comes from.
    Pack(usize, usize),
}

impl std::fmt::Display for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rules::Shipped => write!(f, "shipped"),
            Rules::Threshold(n) => write!(f, "{n} generated threshold"),
            Rules::Pack(n, m) if m < n => write!(
                f,
                "{n} of the generated pack, {} of them for absent sites",
                n - m
            ),
            Rules::Pack(n, _) => write!(f, "{n} of the generated pack"),
        }
    }
}

fn parse_rules(s: &str) -> Result<Rules, String> {
    match s {
        "shipped" => Ok(Rules::Shipped),
        "1" => Ok(Rules::Threshold(1)),
        "20" => Ok(Rules::Threshold(20)),
        "200" => Ok(Rules::Pack(PACK_SIZE, PACK_SIZE)),
        _ => {
            let pack = s.strip_prefix("pack:").map(|p| {
                let (n, m) = p.split_once('/').unwrap_or((p, p));
                (n.parse::<usize>(), m.parse::<usize>())
            });
            match pack {
                Some((Ok(n), Ok(m))) if (1..=PACK_SIZE).contains(&n) && m <= n => {
                    Ok(Rules::Pack(n, m))
                }
                _ => Err(format!(
                    "`{s}`: expected shipped, 1, 20, 200, pack:N or pack:N/M with M <= N <= {PACK_SIZE} (rules from M on are for sites no reading has)"
                )),
            }
        }
    }
}

#[derive(clap::Args, Clone)]
struct LatencyArgs {
    /// Messages per second.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

#[derive(clap::Args, Clone)]
struct MemoryArgs {
    /// Distinct hostname/interface label sets.
    #[arg(long, default_value_t = 100_000)]
    series: usize,
    /// Readings per series (from the second on, `rate()` has a previous sample).
    #[arg(long, default_value_t = 2)]
    passes: usize,
}

#[derive(clap::Args, Clone)]
struct SweepArgs {
    /// Rule counts to run, each `--rules pack:N`.
    #[arg(long, value_delimiter = ',', default_value = "1,2,5,10,20,50,100,200")]
    counts: Vec<usize>,
    /// Entries per round.
    #[arg(long, default_value_t = 50_000)]
    messages: usize,
    /// Rounds per count.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// See `throughput --undeclared`.
    #[arg(long)]
    undeclared: bool,
    /// Where the plot goes.
    #[arg(long, default_value = "docs/rules-throughput.svg")]
    svg: PathBuf,
}

#[derive(clap::Args, Clone)]
struct JudgeArgs {
    #[command(flatten)]
    work: Workload,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // cargo bench appends `--bench`; cargo test passes libtest flags instead.
    if !args.iter().any(|a| a == "--bench") {
        smoke();
        return;
    }
    let args = args.into_iter().filter(|a| a != "--bench");
    match Cli::parse_from(args).mode {
        Mode::Throughput(a) => {
            throughput(&a);
        }
        Mode::Latency(a) => latency(&a),
        Mode::Memory(a) => memory(&a),
        Mode::Judge(a) => judge(&a),
        Mode::Sweep(a) => sweep(&a),
    }
}

/// Every mode on a tiny input: checks the harness, measures nothing.
fn smoke() {
    println!("smoke run (use `scripts/bench` for figures)");
    let work = |messages| Workload {
        messages,
        rules: Rules::Shipped,
        undeclared: false,
        alert_share: 0.1,
        log_share: 0.05,
        series: 100,
    };
    let _ = throughput(&ThroughputArgs {
        work: work(2_000),
        groups: 2,
        repeat: 1,
        quiet_rule_logs: false,
    });
    latency(&LatencyArgs {
        rate: 200,
        seconds: 1,
    });
    memory(&MemoryArgs {
        series: 1_000,
        passes: 2,
    });
    judge(&JudgeArgs { work: work(1_000) });
    judge(&JudgeArgs {
        work: Workload {
            rules: Rules::Pack(20, 20),
            ..work(1_000)
        },
    });
    let plot = tempfile::tempdir().expect("tempdir");
    sweep(&SweepArgs {
        counts: vec![1, 3],
        messages: 500,
        repeat: 1,
        undeclared: false,
        svg: plot.path().join("sweep.svg"),
    });
}

// ---------------------------------------------------------------- payloads

/// Series `s` of `n`: its labels and the constant counter value it reports.
/// The first `alert_share` of series sit at or above 10,000, the next
/// `log_share` in the warning band, the rest below 500. Values are constant
/// so that `rate()` stays 0: pre-filled entries carry ids a few µs apart,
/// and any growth would look like thousands of errors per second.
fn reading(s: usize, n: usize, alert_share: f64, log_share: f64) -> String {
    let frac = s as f64 / n as f64;
    let errors = if frac < alert_share {
        10_000 + (s * 37) % 80_000
    } else if frac < alert_share + log_share {
        500 + (s * 13) % 9_500
    } else {
        (s * 7) % 500
    };
    format!(
        r#"{{"hostname":"rtr-{:05}","interface":"Ethernet1/{}","input_errors":{errors}}}"#,
        s / 8,
        s % 8
    )
}

/// Rules in the generated pack (`--rules 200`).
const PACK_SIZE: usize = 200;
/// The pack's metrics: one field of the reading each.
const PACK_METRICS: [&str; 3] = ["input_errors", "output_errors", "crc_errors"];
/// Device roles of the pack's readings and rules.
const PACK_ROLES: [&str; 5] = ["spine", "leaf", "border", "core", "access"];
/// Sites of the pack's readings and rules: with the roles, 70 (site, role)
/// pairs; 200 rules over 3 metrics cover 67 of them, so a reading of a
/// covered pair matches 3 rules (one per metric).
const PACK_SITES: usize = 14;
/// The alert threshold of every pack rule.
const PACK_HIGH: i64 = 10_000;

/// Site and role of router `r` (readings and rules agree on this).
fn pack_place(r: usize) -> (String, &'static str) {
    (
        format!("site-{:02}", r % PACK_SITES),
        PACK_ROLES[(r / PACK_SITES) % PACK_ROLES.len()],
    )
}

/// A reading for the rule pack: [`reading`]'s series with its router's site
/// and role and two more counters, each in the same band as `input_errors`.
fn pack_reading(s: usize, n: usize, alert_share: f64, log_share: f64) -> String {
    let base = reading(s, n, alert_share, log_share);
    let errors: i64 =
        serde_json::from_str::<serde_json::Value>(&base).expect("reading")["input_errors"]
            .as_i64()
            .expect("input_errors");
    let (site, role) = pack_place(s / 8);
    format!(
        r#"{},"site":"{site}","role":"{role}","output_errors":{},"crc_errors":{}}}"#,
        base.strip_suffix('}').expect("object"),
        errors / 2 + errors % 10,
        errors / 3 + errors % 7
    )
}

/// What pack rule `i` is for: (metric, site, role). Rule `i` is metric
/// `i % 3` of (site, role) pair `i / 3`; from rule `matchable` on, of a
/// site no reading comes from (a rule that cannot match).
fn pack_target(i: usize, matchable: usize) -> (&'static str, String, &'static str) {
    let (mut site, role) = pack_place(i / PACK_METRICS.len());
    if i >= matchable {
        site = format!("absent-{i:03}");
    }
    (PACK_METRICS[i % PACK_METRICS.len()], site, role)
}

/// Pack rule `i`: a threshold on one metric for one device role at one
/// site. The rule checks its site and role itself (it is correct without
/// its declaration); its `WHEN` declaration lets the engine skip it natively.
fn pack_rule(i: usize, matchable: usize, declared: bool) -> String {
    let (metric, site, role) = pack_target(i, matchable);
    let when = if declared {
        format!(
            "const WHEN = #{{ equals: #{{ site: \"{site}\", role: \"{role}\" }}, fields: [\"{metric}\"] }};\n"
        )
    } else {
        String::new()
    };
    format!(
        r#"// Generated by benches/engine.rs: pack rule {i}, {metric} of {role} routers at {site}.
{when}const HIGH = {PACK_HIGH};

fn on_message(msg, ctx) {{
    if msg.site != "{site}" || msg.role != "{role}" {{
        return;
    }}
    let value = msg.{metric};
    if value >= HIGH {{
        alert(#{{
            name: "{metric}_high",
            severity: "major",
            labels: #{{ hostname: msg.hostname, interface: msg.interface, site: msg.site }},
            summary: `{metric} on ${{msg.hostname}} ${{msg.interface}}: ${{value}}`,
        }});
    }}
}}
"#
    )
}

/// Appends entries in Watermill's envelope, 1,000 per round trip.
fn publish_all(con: &mut redis::Connection, payloads: impl Iterator<Item = String>) -> usize {
    let meta = tripline::decode::encode_metadata(&[("source", "bench")]);
    let mut pipe = redis::pipe();
    let (mut queued, mut total) = (0, 0);
    for p in payloads {
        pipe.cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("_watermill_message_uuid")
            .arg(uuid::Uuid::new_v4().to_string())
            .arg("metadata")
            .arg(&meta)
            .arg("payload")
            .arg(p)
            .ignore();
        queued += 1;
        if queued == 1000 {
            pipe.query::<()>(con).expect("XADD");
            pipe.clear();
            total += queued;
            queued = 0;
        }
    }
    if queued > 0 {
        pipe.query::<()>(con).expect("XADD");
        total += queued;
    }
    total
}

// ---------------------------------------------------------------- /proc

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds from a `/proc/.../stat` file.
fn cpu_seconds(stat: &str) -> f64 {
    let text = std::fs::read_to_string(stat).unwrap_or_default();
    let after = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of stat; `after` starts at field 3.
    (ticks(11) + ticks(12)) / clock_ticks()
}

fn process_cpu(pid: u32) -> f64 {
    cpu_seconds(&format!("/proc/{pid}/stat"))
}

fn thread_cpu() -> f64 {
    cpu_seconds("/proc/thread-self/stat")
}

/// A `VmHWM`/`VmRSS`-style line of `/proc/<pid>/status`, in MiB.
fn status_mib(pid: u32, key: &str) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn redis_pid(con: &mut redis::Connection) -> u32 {
    let info: String = redis::cmd("INFO").arg("server").query(con).expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
        .expect("INFO server has process_id")
}

// ---------------------------------------------------------------- groups

/// Position of one group: (pending, lag, entries read); lag is `None` when
/// Redis cannot tell.
type Position = (i64, Option<i64>, i64);

fn positions(con: &mut redis::Connection) -> HashMap<String, Position> {
    let Ok(groups) = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(STREAM)
        .query::<Vec<HashMap<String, Value>>>(con)
    else {
        return HashMap::new();
    };
    let int = |v: Option<&Value>| match v {
        Some(Value::Int(i)) => Some(*i),
        _ => None,
    };
    groups
        .into_iter()
        .filter_map(|g| {
            let name = match g.get("name")? {
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                _ => return None,
            };
            let pos = (
                int(g.get("pending")).unwrap_or(0),
                int(g.get("lag")),
                int(g.get("entries-read")).unwrap_or(0),
            );
            Some((name, pos))
        })
        .collect()
}

/// When (since `from`) the first of `groups` read an entry, and when all of
/// them had read all `total` entries and acknowledged them.
struct Drain {
    first_read: Duration,
    drained: Duration,
}

fn watch_drain(con: &mut redis::Connection, groups: &[&str], total: usize, from: Instant) -> Drain {
    let mut first_read = None;
    loop {
        let now = from.elapsed();
        let pos = positions(con);
        let mine: Vec<&Position> = groups.iter().filter_map(|g| pos.get(*g)).collect();
        if first_read.is_none() && mine.iter().any(|(p, _, read)| *p > 0 || *read > 0) {
            first_read = Some(now);
        }
        let done =
            |(p, lag, read): &&Position| *p == 0 && (*lag == Some(0) || *read >= total as i64);
        if mine.len() == groups.len() && mine.iter().all(done) {
            return Drain {
                first_read: first_read.unwrap_or(now),
                drained: now,
            };
        }
        assert!(
            now < PHASE_TIMEOUT,
            "groups {groups:?} not drained after {PHASE_TIMEOUT:?}: {pos:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ---------------------------------------------------------------- bare loop

/// The payload as a hand-written consumer would declare it.
#[derive(Deserialize)]
struct Reading {
    hostname: String,
    interface: String,
    input_errors: i64,
}

/// The rule pack's payload, likewise.
#[derive(Deserialize)]
struct PackReading {
    hostname: String,
    interface: String,
    site: String,
    role: String,
    input_errors: i64,
    output_errors: i64,
    crc_errors: i64,
}

/// What the bare loop checks per entry: the same checks as tripline's
/// rules, written as plain Rust.
#[derive(Clone)]
enum Checks {
    /// The shipped rules' seed behaviour: one threshold (the group's).
    Shipped,
    /// `n` thresholds at 10,000, 20,000, … (the generated threshold rules).
    Thresholds(usize),
    /// The pack's first rules: (metric index, site, role), in rule order.
    Pack(Arc<Vec<(usize, String, &'static str)>>),
}

impl Checks {
    fn of(rules: Rules) -> Checks {
        match rules {
            Rules::Shipped => Checks::Shipped,
            Rules::Threshold(n) => Checks::Thresholds(n),
            Rules::Pack(n, m) => Checks::Pack(Arc::new(
                (0..n)
                    .map(|i| {
                        let (_, site, role) = pack_target(i, m);
                        (i % PACK_METRICS.len(), site, role)
                    })
                    .collect(),
            )),
        }
    }

    /// Decodes one payload and runs the checks on it, formatting an alert's
    /// text where one would fire.
    fn judge(&self, payload: &[u8], group_threshold: i64) {
        match self {
            Checks::Shipped | Checks::Thresholds(_) => {
                let Ok(r) = serde_json::from_slice::<Reading>(payload) else {
                    return;
                };
                let thresholds: &mut dyn Iterator<Item = i64> = match self {
                    Checks::Thresholds(n) => &mut (1..=*n as i64).map(|k| k * 10_000),
                    _ => &mut std::iter::once(group_threshold),
                };
                for t in thresholds {
                    if r.input_errors >= t {
                        std::hint::black_box(format!(
                            "ALERT! High Input errors on router: {} interface {}: {}",
                            r.hostname, r.interface, r.input_errors
                        ));
                    }
                }
            }
            Checks::Pack(rules) => {
                let Ok(r) = serde_json::from_slice::<PackReading>(payload) else {
                    return;
                };
                let values = [r.input_errors, r.output_errors, r.crc_errors];
                for (metric, site, role) in rules.iter() {
                    if r.site != *site || r.role != *role {
                        continue;
                    }
                    if values[*metric] >= PACK_HIGH {
                        std::hint::black_box(format!(
                            "{} on {} {} at {}: {}",
                            PACK_METRICS[*metric], r.hostname, r.interface, r.site, values[*metric]
                        ));
                    }
                }
            }
        }
    }
}

/// The plain consumer: XREADGROUP COUNT 100, decode each payload, run the
/// checks, and acknowledge the batch in the same round trip as the next
/// read. Returns the CPU seconds it used.
fn bare_consumer(url: &str, group: &str, threshold: i64, checks: &Checks) -> f64 {
    let cpu = thread_cpu();
    let mut con = redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("connect");
    let mut acks: Vec<Vec<u8>> = Vec::with_capacity(100);
    loop {
        let mut pipe = redis::pipe();
        if !acks.is_empty() {
            pipe.cmd("XACK").arg(STREAM).arg(group).arg(&acks).ignore();
        }
        pipe.cmd("XREADGROUP")
            .arg("GROUP")
            .arg(group)
            .arg("bare")
            .arg("COUNT")
            .arg(100)
            .arg("STREAMS")
            .arg(STREAM)
            .arg(">");
        let (reply,): (Value,) = pipe.query(&mut con).expect("XREADGROUP");
        acks.clear();
        // [[stream, [[id, [field, value, …]], …]]], or nil when drained.
        let Value::Array(streams) = reply else { break };
        for stream in streams {
            let Value::Array(mut parts) = stream else {
                continue;
            };
            let Some(Value::Array(entries)) = parts.pop() else {
                continue;
            };
            for entry in entries {
                let Value::Array(mut e) = entry else { continue };
                let fields = e.pop();
                let Some(Value::BulkString(id)) = e.pop() else {
                    continue;
                };
                acks.push(id);
                let Some(Value::Array(fields)) = fields else {
                    continue;
                };
                let payload = fields.chunks(2).find_map(|kv| match kv {
                    [Value::BulkString(k), Value::BulkString(v)] if k == b"payload" => Some(v),
                    _ => None,
                });
                if let Some(p) = payload {
                    checks.judge(p, threshold);
                }
            }
        }
        if acks.is_empty() {
            break;
        }
    }
    thread_cpu() - cpu
}

// ---------------------------------------------------------------- tripline

/// A project directory for `tripline run`: config, rules, a file sink.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new(rules: Rules, undeclared: bool, groups: u8) -> Project {
        let dir = tempfile::tempdir().expect("tempdir");
        let rules_dir = dir.path().join("rules");
        match rules {
            Rules::Shipped => copy_dir(
                &Path::new(env!("CARGO_MANIFEST_DIR")).join("rules"),
                &rules_dir,
            ),
            Rules::Threshold(n) => write_rules(&rules_dir, n, !undeclared),
            Rules::Pack(n, m) => {
                std::fs::create_dir_all(&rules_dir).expect("rules dir");
                for i in 0..n {
                    std::fs::write(
                        rules_dir.join(format!("pack_{i:03}.rhai")),
                        pack_rule(i, m, !undeclared),
                    )
                    .expect("write rule");
                }
            }
        }
        std::fs::create_dir_all(dir.path().join("plugins")).expect("plugins dir");
        std::fs::write(
            dir.path().join("plugins/bench-file.yaml"),
            "name: bench-file\nkind: file\npath: ../alerts.jsonl\n",
        )
        .expect("write plugin");
        std::fs::write(dir.path().join("tripline.yaml"), config(rules, groups))
            .expect("write config");
        Project { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn lines(&self, rel: &str) -> usize {
        std::fs::File::open(self.path(rel))
            .map(|f| std::io::BufReader::new(f).lines().count())
            .unwrap_or(0)
    }

    /// `tripline run` with stdout discarded and stderr (its log) in `tripline.log`.
    /// `BENCH_WRAP` runs it under a profiler (e.g. `perf record -g -o
    /// /tmp/perf.data`); CPU and memory figures then describe the wrapper.
    fn start(&self, redis: &RedisServer, quiet_rule_logs: bool) -> Child {
        let log = std::fs::File::create(self.path("tripline.log")).expect("log file");
        let filter = if quiet_rule_logs {
            "info,tripline::rule=error"
        } else {
            "info"
        };
        let bin = env!("CARGO_BIN_EXE_tripline");
        let mut cmd = match std::env::var("BENCH_WRAP")
            .ok()
            .filter(|w| !w.trim().is_empty())
        {
            Some(w) => {
                let mut parts = w.split_whitespace();
                let mut c = Command::new(parts.next().expect("--wrap is not empty"));
                c.args(parts).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.current_dir(self.dir.path())
            .arg("run")
            .env("REDIS_ADDR", redis.addr())
            .env("RUST_LOG", filter)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tripline")
    }
}

/// The shipped config with its own HTTP port and instance name; with
/// `groups == 1` only the alerts subscription on [`STREAM`]; generated rules
/// apply to every subscription.
fn config(rules: Rules, groups: u8) -> String {
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tripline.yaml"))
        .expect("shipped tripline.yaml");
    let mut c: serde_yaml::Value = serde_yaml::from_str(&shipped).expect("shipped config parses");
    c["instance"] = format!("bench-{}", free_port()).into();
    c["http"]["listen"] = format!("127.0.0.1:{}", free_port()).into();
    let subs = c["subscriptions"].as_sequence_mut().expect("subscriptions");
    let mut on_stream = 0;
    subs.retain(|s| {
        let reads = s["streams"]
            .as_sequence()
            .is_some_and(|l| l.iter().any(|v| v.as_str() == Some(STREAM)));
        if reads {
            on_stream += 1;
        }
        !reads || on_stream <= groups
    });
    if rules != Rules::Shipped {
        for s in subs.iter_mut() {
            s["rules"] = vec!["**/*.rhai"].into();
        }
    }
    serde_yaml::to_string(&c).expect("config serializes")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for e in std::fs::read_dir(from).expect("read rules dir") {
        let p = e.expect("dir entry").path();
        let dest = to.join(p.file_name().expect("file name"));
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).expect("copy rule");
        }
    }
}

/// `n` threshold rules at 10,000, 20,000, …: each reads the reading, most
/// pass, the alerting share raises one alert per rule it crosses. Declared,
/// each tells the engine it is only for readings at or above its threshold.
fn write_rules(dir: &Path, n: usize, declared: bool) {
    std::fs::create_dir_all(dir).expect("rules dir");
    for i in 0..n {
        let when = if declared {
            "const WHEN = #{ min: #{ input_errors: HIGH } };\n"
        } else {
            ""
        };
        let rule = format!(
            r#"// Generated by benches/engine.rs: threshold {i} of {n}.
const HIGH = {high};
{when}
fn on_message(msg, ctx) {{
    let errors = msg.input_errors;
    if errors >= HIGH {{
        alert(#{{
            name: "Threshold{i}",
            severity: "major",
            labels: #{{ hostname: msg.hostname, interface: msg.interface }},
            summary: `input errors on ${{msg.hostname}} ${{msg.interface}}: ${{errors}}`,
        }});
    }}
}}
"#,
            high = 10_000 * (i + 1)
        );
        std::fs::write(dir.join(format!("threshold_{i:02}.rhai")), rule).expect("write rule");
    }
}

fn tripline_groups(groups: u8) -> Vec<&'static str> {
    GROUPS[..groups as usize].iter().map(|(g, _)| *g).collect()
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let end = Instant::now() + Duration::from_secs(15);
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

// ---------------------------------------------------------------- throughput

/// One timed drain.
struct Phase {
    /// Entries per second from the first read to the last acknowledgement.
    rate: f64,
    secs: f64,
    /// CPU seconds of the consumer (tripline: the whole process, startup included).
    cpu: f64,
    redis_cpu: f64,
    /// Spawn to first read (tripline only).
    startup: f64,
    /// tripline's peak resident set, MiB.
    hwm_mib: f64,
    alerts: usize,
    log_lines: usize,
}

fn run_bare(
    redis: &RedisServer,
    redis_pid: u32,
    groups: u8,
    total: usize,
    checks: &Checks,
) -> Phase {
    let mut con = redis.conn();
    let names: Vec<String> = (0..groups).map(|g| format!("bare-{g}")).collect();
    for n in &names {
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(STREAM)
            .arg(n)
            .arg("0")
            .query(&mut con)
            .expect("XGROUP CREATE");
    }
    let redis_cpu = process_cpu(redis_pid);
    let start = Instant::now();
    let threads: Vec<_> = names
        .iter()
        .zip(GROUPS)
        .map(|(name, (_, threshold))| {
            let (url, name, checks) = (redis.url(), name.clone(), checks.clone());
            std::thread::spawn(move || bare_consumer(&url, &name, threshold, &checks))
        })
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let d = watch_drain(&mut con, &refs, total, start);
    let redis_cpu = process_cpu(redis_pid) - redis_cpu;
    let cpu = threads
        .into_iter()
        .map(|t| t.join().expect("bare loop"))
        .sum();
    let secs = (d.drained - d.first_read).as_secs_f64();
    Phase {
        rate: total as f64 / secs,
        secs,
        cpu,
        redis_cpu,
        startup: d.first_read.as_secs_f64(),
        hwm_mib: 0.0,
        alerts: 0,
        log_lines: 0,
    }
}

fn run_tripline(redis: &RedisServer, redis_pid: u32, a: &ThroughputArgs) -> Phase {
    let project = Project::new(a.work.rules, a.work.undeclared, a.groups);
    let mut con = redis.conn();
    let redis_cpu = process_cpu(redis_pid);
    let start = Instant::now();
    let mut child = project.start(redis, a.quiet_rule_logs);
    let d = watch_drain(&mut con, &tripline_groups(a.groups), a.work.messages, start);
    let redis_cpu = process_cpu(redis_pid) - redis_cpu;
    let cpu = process_cpu(child.id());
    let hwm_mib = status_mib(child.id(), "VmHWM");
    // Let the sink deliver what the last batches queued.
    std::thread::sleep(Duration::from_millis(300));
    stop(&mut child);
    let secs = (d.drained - d.first_read).as_secs_f64();
    let log = std::fs::read_to_string(project.path("tripline.log")).unwrap_or_default();
    Phase {
        rate: a.work.messages as f64 / secs,
        secs,
        cpu,
        redis_cpu,
        startup: d.first_read.as_secs_f64(),
        hwm_mib,
        alerts: project.lines("alerts.jsonl"),
        log_lines: log.lines().filter(|l| l.contains("tripline::rule")).count(),
    }
}

/// Medians of one `throughput` run's rounds.
struct Summary {
    bare: f64,
    tripline: f64,
    ratio: f64,
    /// tripline's CPU per entry and group, µs.
    cpu_us: f64,
}

fn throughput(a: &ThroughputArgs) -> Summary {
    let redis = RedisServer::start();
    let redis_pid = redis_pid(&mut redis.conn());
    let checks = Checks::of(a.work.rules);
    println!(
        "throughput: {} entries, {} series, alert share {}, log share {}, rules {}{}, {} group(s){}",
        a.work.messages,
        a.work.series,
        a.work.alert_share,
        a.work.log_share,
        a.work.rules,
        if a.work.undeclared {
            " (undeclared)"
        } else {
            ""
        },
        a.groups,
        if a.quiet_rule_logs {
            ", rule logs silenced"
        } else {
            ""
        }
    );
    println!(
        "  rates are stream entries/s, first read → all groups drained; each group reads every entry"
    );
    let mut ratios = Vec::new();
    let (mut bares, mut trips, mut cpus) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..a.repeat {
        let mut con = redis.conn();
        let _: () = redis::cmd("FLUSHALL").query(&mut con).expect("FLUSHALL");
        let xadd_cpu = process_cpu(redis_pid);
        publish_all(&mut con, (0..a.work.messages).map(|i| a.work.payload(i)));
        let xadd_cpu = process_cpu(redis_pid) - xadd_cpu;
        let (bare, trip) = if rep % 2 == 0 {
            let b = run_bare(&redis, redis_pid, a.groups, a.work.messages, &checks);
            (b, run_tripline(&redis, redis_pid, a))
        } else {
            let t = run_tripline(&redis, redis_pid, a);
            (
                run_bare(&redis, redis_pid, a.groups, a.work.messages, &checks),
                t,
            )
        };
        let ratio = trip.rate / bare.rate;
        let per_msg = trip.cpu / (a.work.messages * a.groups as usize) as f64 * 1e6;
        println!(
            "  round {} ({} first): XADD redis cpu {:.2} s | bare {:>7.0}/s ({:.2} s, cpu {:.2} s, redis cpu {:.2} s) | tripline {:>7.0}/s ({:.2} s, cpu {:.2} s = {:.1} µs/entry/group, redis cpu {:.2} s, startup {:.0} ms, peak RSS {:.1} MiB, {} alerts, {} rule log lines) | ratio {:.2}",
            rep + 1,
            if rep % 2 == 0 { "bare" } else { "tripline" },
            xadd_cpu,
            bare.rate,
            bare.secs,
            bare.cpu,
            bare.redis_cpu,
            trip.rate,
            trip.secs,
            trip.cpu,
            per_msg,
            trip.redis_cpu,
            trip.startup * 1000.0,
            trip.hwm_mib,
            trip.alerts,
            trip.log_lines,
            ratio
        );
        ratios.push(ratio);
        bares.push(bare.rate);
        trips.push(trip.rate);
        cpus.push(per_msg);
    }
    let (r, b, t) = (spread(&mut ratios), spread(&mut bares), spread(&mut trips));
    println!(
        "  RESULT bare {:.0}/s [{:.0}..{:.0}]  tripline {:.0}/s [{:.0}..{:.0}]  ratio {:.2} [{:.2}..{:.2}] (median [min..max] of {} rounds)",
        b.0, b.1, b.2, t.0, t.1, t.2, r.0, r.1, r.2, a.repeat
    );
    Summary {
        bare: b.0,
        tripline: t.0,
        ratio: r.0,
        cpu_us: spread(&mut cpus).0,
    }
}

// ---------------------------------------------------------------- sweep

/// `throughput --rules pack:N` for each count, then the plot.
fn sweep(a: &SweepArgs) {
    let mut points = Vec::new();
    for &n in &a.counts {
        let s = throughput(&ThroughputArgs {
            work: Workload {
                messages: a.messages,
                rules: parse_rules(&format!("pack:{n}")).expect("rule count in 1..=200"),
                undeclared: a.undeclared,
                alert_share: 0.0,
                log_share: 0.05,
                series: 1000,
            },
            groups: 2,
            repeat: a.repeat,
            quiet_rule_logs: false,
        });
        points.push((n, s));
    }
    println!(
        "sweep{}: rules | bare /s | tripline /s | ratio | tripline µs per entry and group",
        if a.undeclared { " (undeclared)" } else { "" }
    );
    for (n, s) in &points {
        println!(
            "  {n:>4} | {:>8.0} | {:>8.0} | {:.2} | {:.2}",
            s.bare, s.tripline, s.ratio, s.cpu_us
        );
    }
    let at = |n: usize| points.iter().find(|(k, _)| *k == n).map(|(_, s)| s.cpu_us);
    if let (Some(c20), Some(c200)) = (at(20), at(200)) {
        println!(
            "  marginal tripline CPU per added rule, 20 → 200 rules: {:.1} ns per entry and group",
            (c200 - c20) * 1000.0 / 180.0
        );
    }
    let title = format!(
        "Stream entries/s against rules per group ({} entries, 2 groups, pack rules{})",
        a.messages,
        if a.undeclared { ", undeclared" } else { "" }
    );
    std::fs::write(&a.svg, plot_svg(&title, &points)).expect("write the SVG");
    println!("  plot: {}", a.svg.display());
}

/// A line plot of both rates against the rule count, log-scaled x axis,
/// as a standalone SVG (no plotting library on the machine, none needed).
fn plot_svg(title: &str, points: &[(usize, Summary)]) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 420.0, 80.0, 20.0, 40.0, 60.0);
    let max_n = points.iter().map(|(n, _)| *n).max().unwrap_or(1).max(2) as f64;
    let max_rate = points
        .iter()
        .map(|(_, s)| s.bare.max(s.tripline))
        .fold(1.0, f64::max);
    // Round the y range up to a multiple of 50k entries/s.
    let y_max = (max_rate / 50_000.0).ceil() * 50_000.0;
    let x = |n: f64| left + (n.ln() / max_n.ln()) * (w - left - right);
    let y = |r: f64| top + (1.0 - r / y_max) * (h - top - bottom);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="{w}" height="{h}" fill="white"/>
<text x="{}" y="20" text-anchor="middle" font-size="14">{title}</text>
"#,
        w / 2.0
    );
    let mut tick = 0.0;
    while tick <= y_max {
        svg += &format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y0:.1}\" y2=\"{y0:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}k</text>\n",
            w - right,
            left - 6.0,
            y(tick) + 4.0,
            tick / 1000.0,
            y0 = y(tick)
        );
        tick += 50_000.0;
    }
    for (n, _) in points {
        let xn = x(*n as f64);
        svg += &format!(
            "<line x1=\"{xn:.1}\" x2=\"{xn:.1}\" y1=\"{top}\" y2=\"{}\" stroke=\"#eee\"/><text x=\"{xn:.1}\" y=\"{}\" text-anchor=\"middle\">{n}</text>\n",
            h - bottom,
            h - bottom + 18.0
        );
    }
    svg += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">rules per group (log scale)</text>\n<text x=\"18\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {})\">stream entries/s</text>\n",
        left + (w - left - right) / 2.0,
        h - 16.0,
        top + (h - top - bottom) / 2.0,
        top + (h - top - bottom) / 2.0
    );
    let bare: fn(&Summary) -> f64 = |s| s.bare;
    for (name, colour, rate) in [
        ("bare loop", "#888", bare),
        ("tripline", "#c0392b", |s| s.tripline),
    ] {
        let line: Vec<String> = points
            .iter()
            .map(|(n, s)| format!("{:.1},{:.1}", x(*n as f64), y(rate(s))))
            .collect();
        svg += &format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\n",
            line.join(" ")
        );
        for (n, s) in points {
            svg += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"><title>{name}, {n} rules: {:.0}/s</title></circle>\n",
                x(*n as f64),
                y(rate(s)),
                rate(s)
            );
        }
    }
    for (k, (name, colour)) in [
        ("bare loop (same checks in Rust)", "#888"),
        ("tripline", "#c0392b"),
    ]
    .iter()
    .enumerate()
    {
        let ly = top + 14.0 + 18.0 * k as f64;
        svg += &format!(
            "<line x1=\"{}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{colour}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{name}</text>\n",
            w - right - 230.0,
            w - right - 205.0,
            w - right - 200.0,
            ly + 4.0
        );
    }
    svg += "</svg>\n";
    svg
}

/// (median, min, max).
fn spread(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

// ---------------------------------------------------------------- latency

/// Waits until tripline has created the shipped groups on [`STREAM`] (sinks
/// are started before the workers, so alerts then have a reader too).
fn wait_ready(con: &mut redis::Connection) {
    let start = Instant::now();
    while tripline_groups(2)
        .iter()
        .any(|g| !positions(con).contains_key(*g))
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "tripline did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Latency is measured inside this process: from just before the XADD of a
/// reading is sent to when a poll of the sink's file (every 200 µs) first
/// sees the alert line naming that reading's unique host.
fn latency(a: &LatencyArgs) {
    let redis = RedisServer::start();
    let project = Project::new(Rules::Shipped, false, 2);
    let mut child = project.start(&redis, false);
    let mut con = redis.conn();
    wait_ready(&mut con);
    std::thread::sleep(Duration::from_millis(500));
    let total = (a.rate * a.seconds) as usize;
    let base = Instant::now();
    // Nanoseconds since `base` at which reading i was sent, plus one (0 = not yet).
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (sent, done, path) = (sent.clone(), done.clone(), project.path("alerts.jsonl"));
        std::thread::spawn(move || watch_file(&path, &sent, base, &done))
    };
    let meta = tripline::decode::encode_metadata(&[("source", "bench")]);
    let period = Duration::from_nanos(1_000_000_000 / a.rate);
    let cpu = process_cpu(child.id());
    let redis_pid = redis_pid(&mut con);
    let redis_cpu = process_cpu(redis_pid);
    for (i, slot) in sent.iter().enumerate() {
        let due = period * i as u32;
        if let Some(wait) = due.checked_sub(base.elapsed()) {
            std::thread::sleep(wait);
        }
        let payload = format!(
            r#"{{"hostname":"lat-{i}","interface":"Ethernet1/1","input_errors":{}}}"#,
            20_000 + i
        );
        slot.store(base.elapsed().as_nanos() as u64 + 1, Ordering::SeqCst);
        let _: String = redis::cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("_watermill_message_uuid")
            .arg(uuid::Uuid::new_v4().to_string())
            .arg("metadata")
            .arg(&meta)
            .arg("payload")
            .arg(payload)
            .query(&mut con)
            .expect("XADD");
    }
    let published_in = base.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !watcher.is_finished() {
        std::thread::sleep(Duration::from_millis(10));
    }
    done.store(true, Ordering::SeqCst);
    let mut lat = watcher.join().expect("watcher");
    let cpu = process_cpu(child.id()) - cpu;
    let redis_cpu = process_cpu(redis_pid) - redis_cpu;
    let rss = status_mib(child.id(), "VmRSS");
    stop(&mut child);
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
    println!(
        "latency: {} readings at {}/s for {} s (published in {:.2} s), each raising its own alert; shipped rules and config, file sink",
        total, a.rate, a.seconds, published_in
    );
    println!(
        "  XADD → line in the sink's file: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  ({} of {} seen; tripline cpu {:.2} s while publishing, RSS {:.1} MiB; redis cpu {:.2} s = {:.1} µs per reading, unbatched: XADD, 2 groups' reads and commits, outbox, sink)",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(0.999),
        lat[lat.len() - 1],
        lat.len(),
        total,
        cpu,
        rss,
        redis_cpu,
        redis_cpu / total as f64 * 1e6
    );
}

/// Tails the sink's JSON-lines file until every reading's alert was seen (or
/// `done`); returns the latencies in milliseconds.
fn watch_file(path: &Path, sent: &[AtomicU64], base: Instant, done: &AtomicBool) -> Vec<f64> {
    let mut lat = Vec::with_capacity(sent.len());
    let mut file = None;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    while lat.len() < sent.len() && !done.load(Ordering::SeqCst) {
        if file.is_none() {
            file = std::fs::File::open(path).ok();
        }
        let n = file.as_mut().map_or(0, |f| f.read(&mut chunk).unwrap_or(0));
        if n == 0 {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let seen = base.elapsed().as_nanos() as u64;
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) else {
                continue;
            };
            let seq = v["labels"]["hostname"]
                .as_str()
                .and_then(|h| h.strip_prefix("lat-"))
                .and_then(|s| s.parse::<usize>().ok());
            if let Some(at) = seq
                .and_then(|i| sent.get(i))
                .map(|s| s.load(Ordering::SeqCst))
                && at > 0
                && v["status"] == "firing"
            {
                lat.push((seen - (at - 1)) as f64 / 1e6);
            }
        }
    }
    lat
}

// ---------------------------------------------------------------- memory

fn memory(a: &MemoryArgs) {
    let redis = RedisServer::start();
    let project = Project::new(Rules::Shipped, false, 2);
    let mut child = project.start(&redis, false);
    let mut con = redis.conn();
    wait_ready(&mut con);
    std::thread::sleep(Duration::from_secs(1));
    let idle = status_mib(child.id(), "VmRSS");
    let total = a.series * a.passes;
    // Below 500: no alert, no log; the state is `rate()`'s one sample per series.
    let readings = (0..total).map(|i| {
        let s = i % a.series;
        format!(
            r#"{{"hostname":"mem-{:06}","interface":"Ethernet1/{}","input_errors":{}}}"#,
            s / 4,
            s % 4,
            (s + i / a.series) % 500
        )
    });
    let start = Instant::now();
    publish_all(&mut con, readings);
    watch_drain(&mut con, &tripline_groups(2), total, start);
    std::thread::sleep(Duration::from_millis(500));
    let rss = status_mib(child.id(), "VmRSS");
    let hwm = status_mib(child.id(), "VmHWM");
    stop(&mut child);
    println!(
        "memory: {} label sets × {} readings through the shipped rules (`rate()` keyed by hostname|interface)",
        a.series, a.passes
    );
    println!(
        "  tripline RSS idle {idle:.1} MiB, after {rss:.1} MiB (peak {hwm:.1} MiB); {:.0} bytes per label set",
        (rss - idle) * 1024.0 * 1024.0 / a.series as f64
    );
}

// ---------------------------------------------------------------- judge

/// A stream entry's field/value pairs.
type Fields = Vec<(Vec<u8>, Vec<u8>)>;

fn judge(a: &JudgeArgs) {
    use tripline::process::{Input, LoadedRules, Processor, Verdict};
    let project = Project::new(a.work.rules, a.work.undeclared, 2);
    let config =
        tripline::config::Settings::load(Some(&project.path("tripline.yaml"))).expect("config");
    let runtime = tripline::runtime::Runtime::new();
    let engine = runtime.rule_engine(&config.limits);
    let set = tripline::rules::RuleSet::load(&engine, &config.rules_dir).expect("rules");
    let processor = Processor {
        engine,
        rules: Arc::new(arc_swap::ArcSwap::from_pointee(LoadedRules::new(
            set,
            &config.subscriptions,
        ))),
        book: Arc::new(runtime.alert_book(config.alerts.policy)),
    };
    let meta = tripline::decode::encode_metadata(&[("source", "bench")]);
    let entries: Vec<(String, Fields)> = (0..a.work.messages)
        .map(|i| {
            let payload = a.work.payload(i);
            let fields = vec![
                (
                    b"_watermill_message_uuid".to_vec(),
                    uuid::Uuid::new_v4().to_string().into_bytes(),
                ),
                (b"metadata".to_vec(), meta.clone()),
                (b"payload".to_vec(), payload.into_bytes()),
            ];
            (
                format!("{}-{}", 1_700_000_000_000u64 + i as u64 / 100, i % 100),
                fields,
            )
        })
        .collect();
    println!(
        "judge: {} entries per subscription, one thread, no Redis",
        a.work.messages
    );
    let loaded = processor.rules.load();
    for sub in config
        .subscriptions
        .iter()
        .filter(|s| s.streams.iter().any(|s| s == STREAM))
    {
        let start = Instant::now();
        let (mut actions, mut notified, mut errors, mut undecodable) = (0, 0, 0, 0);
        for batch in entries.chunks(100) {
            let mut acts = Vec::new();
            for (id, fields) in batch {
                let out = processor.evaluate(
                    &loaded,
                    &Input {
                        subscription: &sub.name,
                        group: sub.group(),
                        stream: STREAM,
                        id,
                        deliveries: 1,
                        fields,
                        now_ms: 1_700_000_000_000,
                    },
                );
                errors += out.errors.len();
                undecodable += usize::from(matches!(out.verdict, Verdict::Undecodable(_)));
                if let Some((rule, e)) = out.errors.first().filter(|_| errors == 1) {
                    println!("  first rule error: {rule}: {e}");
                }
                acts.extend(out.actions);
            }
            actions += acts.len();
            // As a lone instance decides once its cache is known to equal Redis.
            notified += processor
                .book
                .decide(STREAM, &acts, false)
                .notifications
                .len();
        }
        let took = start.elapsed().as_secs_f64();
        println!(
            "  {:<22} {:.2} µs/entry ({} rules, {} actions, {} notifications, {} rule errors, {} undecodable)",
            sub.name,
            took / a.work.messages as f64 * 1e6,
            loaded.selections.get(&sub.name).map_or(0, Vec::len),
            actions,
            notified,
            errors,
            undecodable
        );
    }
}
