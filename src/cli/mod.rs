//! The command line: argument types (parsed by `main`) and one module per
//! command. Commands return `anyhow::Result`; `main` prints the error chain
//! (see [`error_chain`]) and picks the exit code.

pub mod alerts;
pub mod check;
pub mod docs;
pub mod record;
pub mod replay;
pub mod run;
pub mod silence;
pub mod simulate;
pub mod status;
pub mod test;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};

use crate::escape::escape;

/// Reply timeout of the commands' Redis connections (never blocking reads).
const REDIS_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Parser)]
#[command(
    name = "tripline",
    version = crate::version::LONG,
    about = "Rule engine for streaming network telemetry: Redis Streams in, Rhai rules, alerts out.",
    after_help = "Examples:\n  tripline run --config tripline.yaml\n  tripline check\n  tripline test\n  tripline record packet-counter-errors --from 24h -o yesterday.jsonl\n  tripline replay yesterday.jsonl\n  tripline simulate --rate 500 --duration 30s"
)]
pub struct Cli {
    /// Configuration file (YAML). Default: ./tripline.yaml if present, else built-in defaults.
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the engine: consume the configured streams until SIGINT/SIGTERM.
    #[command(
        after_help = "Example:\n  REDIS_ADDR=127.0.0.1:6379 tripline run --config tripline.yaml"
    )]
    Run,
    /// Validate the config, every rule and every plugin manifest, as `run` would load them.
    #[command(after_help = "Example:\n  tripline check --config tripline.yaml")]
    Check,
    /// Publish realistic telemetry to Redis (for demos and load).
    #[command(
        after_help = "Examples:\n  tripline simulate --rate 200 --duration 1m\n  tripline simulate --count 100000 --rate 0 --format json"
    )]
    Simulate(simulate::Args),
    /// Mute notifications matching labels for a while (stored in Redis, honoured by every instance).
    #[command(subcommand)]
    Silence(silence::Action),
    /// List the pending and firing alerts of a running instance (cluster-wide), like `amtool alert query`.
    #[command(
        after_help = "Examples:\n  tripline alerts\n  tripline alerts hostname=core-1 severity=~major|critical\n  tripline alerts --url http://10.0.0.5:9464 --output json"
    )]
    Alerts(alerts::Args),
    /// Show how a running instance is doing: Redis, reloads, groups, sinks.
    #[command(
        after_help = "Examples:\n  tripline status\n  tripline status --url http://10.0.0.5:9464 -o json"
    )]
    Status(status::Args),
    /// Run rule tests: every `*.test.yaml` under the rules directory, or the given files and directories.
    #[command(
        after_help = "Examples:\n  tripline test\n  tripline test rules/packet_errors\n  tripline test -v rules/transceiver/rx_power.test.yaml\n\nExit status: 0 when every test passed, 1 otherwise. Format: docs/rules-testing.md"
    )]
    Test(test::Args),
    /// Run recorded telemetry (JSON lines) through the rules, without Redis, and print every decision.
    #[command(
        after_help = "Examples:\n  tripline replay yesterday.jsonl\n  tripline replay --quiet --config staging.yaml yesterday.jsonl\n  echo '{\"stream\":\"packet-counter-errors\",\"hostname\":\"r1\",\"interface\":\"et-0/0/1\",\"input_errors\":12000}' | tripline replay -\n\nLine format: docs/rules-testing.md"
    )]
    Replay(replay::Args),
    /// Dump a range of Redis streams to a JSON-lines file that `replay` reads.
    #[command(
        after_help = "Examples:\n  tripline record packet-counter-errors --from 24h -o yesterday.jsonl\n  tripline record packet-counter-errors transceiver-telemetry --from 2025-01-01T00:00:00Z --to 2025-01-02T00:00:00Z -o day.jsonl\n  tripline record packet-counter-errors --count 100"
    )]
    Record(record::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(
        after_help = "Examples:\n  source <(tripline completions bash)\n  tripline completions zsh > \"${fpath[1]}/_tripline\"\n  tripline completions fish > ~/.config/fish/completions/tripline.fish"
    )]
    Completions {
        /// The shell whose completion language the script is written in.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the tripline(1) man page (roff), or write it and one page per subcommand to a directory.
    #[command(
        after_help = "Examples:\n  tripline man | man -l -\n  tripline man --out-dir /usr/local/share/man/man1"
    )]
    Man(docs::ManArgs),
}

/// Installs the log subscriber: level from `RUST_LOG`, else `default`.
/// Colours only on a terminal, so log files and collectors get plain text.
/// An unparsable `RUST_LOG` is reported, not silently replaced. Human logs
/// escape control characters in every field and message
/// ([`EscapedFields`]); JSON logs rely on JSON's own escaping.
///
/// The redis client's own messages are kept to errors unless `RUST_LOG`
/// names a `redis` target: its Cluster client warns about every reconnect
/// attempt of every connection (hundreds of lines per failover), while
/// tripline logs an outage once.
pub fn init_logging(format: LogFormat, default: &str) {
    use std::io::IsTerminal;
    let spec = std::env::var(EnvFilter::DEFAULT_ENV).ok();
    let (filter, bad_filter) = match &spec {
        Some(spec) => match EnvFilter::try_new(spec) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new(default), Some(format!("`{spec}`: {e}"))),
        },
        None => (EnvFilter::new(default), None),
    };
    let names_redis = spec
        .iter()
        .flat_map(|s| s.split(','))
        .any(|d| d.trim().starts_with("redis"));
    let filter = if names_redis {
        filter
    } else {
        filter.add_directive("redis=error".parse().expect("a valid directive"))
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Human => builder.fmt_fields(EscapedFields::default()).init(),
        LogFormat::Json => builder.json().init(),
    }
    if let Some(why) = bad_filter {
        tracing::warn!("ignoring invalid RUST_LOG {why}; using the default filter `{default}`");
    }
}

/// The default field formatting, then [`escape`] over the result: messages
/// and field values carry hostnames, labels and rule log text, and a
/// newline among them would forge a whole log line (CR and ESC would
/// rewrite the terminal). Escaping what the fields wrote, rather than each
/// value, also covers `%display` values and error sources, which the
/// default formatter writes raw. The event's own parts (time, level,
/// target, colours) are written outside the fields and stay as they are.
#[derive(Default)]
struct EscapedFields {
    /// Writes `message key=value …` as the default human format does.
    inner: DefaultFields,
}

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        let mut raw = String::new();
        self.inner.format_fields(Writer::new(&mut raw), fields)?;
        writer.write_str(&escape(&raw))
    }
}

/// The error and its causes, each on its own line, leaving out a cause whose
/// text the message before it already shows (our errors often quote their
/// source, e.g. `config.yaml: unknown field … at line 4`).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    let mut last = out.clone();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !last.contains(&text) {
            out.push_str("\n  caused by: ");
            out.push_str(&text);
        }
        last = text;
    }
    out
}

/// Runs the parsed command.
pub fn execute(cli: Cli) -> anyhow::Result<()> {
    // `test` and `replay` report rule errors themselves; the engine's own
    // warnings would repeat them. What rules `print` still shows.
    let default_filter = match cli.command {
        Command::Test(_) | Command::Replay(_) => "error,tripline::rule=info",
        _ => "info",
    };
    init_logging(cli.log_format, default_filter);
    let config = cli.config.as_deref();
    match cli.command {
        Command::Run => run::run(config),
        Command::Check => check::check(config),
        Command::Simulate(args) => simulate::simulate(config, args),
        Command::Test(args) => test::test(config, args),
        Command::Replay(args) => replay::replay(config, args),
        Command::Record(args) => record::record(config, args),
        Command::Silence(action) => silence::silence(config, action),
        Command::Alerts(args) => alerts::alerts(config, args),
        Command::Status(args) => status::status(config, args),
        Command::Completions { shell } => docs::completions(shell),
        Command::Man(args) => docs::man(args),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    /// Collects what the log subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn human_log_events_stay_one_line_whatever_their_fields_hold() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .fmt_fields(super::EscapedFields::default())
            .finish();
        let host = "r1\n1999-01-01T00:00:00.000000Z ERROR tripline::app: FORGED\r\x1b[2J\u{2028}";
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(hostname = %host, "down: {host}");
            tracing::warn!(hostname = host, error = %std::io::Error::other(host), "debug-formatted");
            let span = tracing::info_span!("worker", device = %host);
            span.in_scope(|| tracing::error!("inside"));
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(!text.contains(['\r', '\x1b', '\u{2028}']), "{text:?}");
        for line in text.lines() {
            assert!(!line.starts_with("1999"), "{text}");
        }
        let escaped =
            r"r1\n1999-01-01T00:00:00.000000Z ERROR tripline::app: FORGED\r\x1b[2J\u{2028}";
        assert!(
            text.contains(&format!("down: {escaped} hostname={escaped}")),
            "{text}"
        );
        assert!(
            text.contains(&format!("worker{{device={escaped}}}")),
            "{text}"
        );
    }

    #[test]
    fn error_chain_skips_causes_already_quoted() {
        let quoted = anyhow::Error::new(std::io::Error::other("disk full"))
            .context("cannot write out.jsonl: disk full");
        assert_eq!(
            super::error_chain(&quoted),
            "cannot write out.jsonl: disk full"
        );
        let plain = anyhow::Error::new(std::io::Error::other("disk full")).context("cannot write");
        assert_eq!(
            super::error_chain(&plain),
            "cannot write\n  caused by: disk full"
        );
    }
}
