//! The command line: argument types (parsed by `main`) and one module per
//! command. Commands return `anyhow::Result`; `main` prints the error chain
//! and picks the exit code.

pub mod check;
pub mod run;
pub mod silence;
pub mod simulate;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "tripline",
    version,
    about = "Rule engine for streaming network telemetry: Redis Streams in, Rhai rules, alerts out.",
    after_help = "Examples:\n  tripline run --config tripline.yaml\n  tripline check\n  tripline simulate --rate 500 --duration 30s"
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
}

/// Installs the log subscriber: level from `RUST_LOG` (default `info`).
/// Colours only on a terminal, so log files and collectors get plain text.
/// An unparsable `RUST_LOG` is reported, not silently replaced.
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let (filter, bad_filter) = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(spec) => match EnvFilter::try_new(&spec) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new("info"), Some(format!("`{spec}`: {e}"))),
        },
        Err(_) => (EnvFilter::new("info"), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    if let Some(why) = bad_filter {
        tracing::warn!("ignoring invalid RUST_LOG {why}; logging at info");
    }
}

/// Runs the parsed command.
pub fn execute(cli: Cli) -> anyhow::Result<()> {
    init_logging(cli.log_format);
    match cli.command {
        Command::Run => run::run(cli.config.as_deref()),
        Command::Check => check::check(cli.config.as_deref()),
        Command::Simulate(args) => simulate::simulate(cli.config.as_deref(), args),
        Command::Silence(action) => silence::silence(cli.config.as_deref(), action),
    }
}
