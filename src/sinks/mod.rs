//! Sinks: where alerts leave tripline.
//!
//! One manifest in `plugins/*.yaml` is one sink instance. Each kind is one
//! file here holding its settings type and its runtime; [`KINDS`] is the one
//! place that lists them. Every sink reads the outbox through its own
//! consumer group ([`dispatch`]), so one slow or dead sink never holds up the
//! engine or the other sinks.
//!
//! Adding a kind: a file with a settings type (serde, unknown fields denied)
//! implementing [`SinkSettings`], whose `build` returns a [`Sink`], and one
//! line in [`KINDS`]. Retries, backoff, timeouts, routing, dead-letters and
//! metrics are the dispatcher's job, not the kind's.

pub mod alertmanager;
pub mod console;
pub mod dispatch;
pub mod exec;
pub mod file;
mod http_post;
pub mod manifest;
pub mod redis_stream;
pub mod slack;
pub mod supervisor;
pub mod webhook;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::alert::Alert;
use crate::metrics::Metrics;
use crate::redis_conn::RedisTarget;

pub use manifest::{Manifest, PluginError, Route, load_dir};

/// Why a delivery failed. The dispatcher retries every kind but
/// [`SinkError::Rejected`]; logs and the dead-letter stream say which it was.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Failed(String),
    /// The receiver understood the batch and refused it (HTTP 4xx other
    /// than 408/429): sending it again cannot help, so it is dead-lettered
    /// at once instead of holding up the alerts behind it.
    #[error("rejected: {0}")]
    Rejected(String),
}

impl SinkError {
    /// True when retrying the same batch cannot succeed.
    pub fn is_permanent(&self) -> bool {
        matches!(self, SinkError::Rejected(_))
    }
}

pub type DeliverFuture<'a> = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send + 'a>>;

/// A destination for alerts. `deliver` gets a batch; it succeeds only when
/// every alert in it has been handed over (a retry resends the whole batch,
/// so receivers must tolerate duplicates: alerts carry a fingerprint).
///
/// The dispatcher drops the future when the manifest's `timeout` passes, so
/// `deliver` must leave the sink usable when cancelled at any `.await`.
/// On Redis Cluster the outboxes of different hash slots are delivered
/// independently, so `deliver` may run concurrently with itself; a sink
/// that cannot take that serializes inside (as `exec` and `console` do).
pub trait Sink: Send + Sync {
    fn deliver<'a>(&'a self, alerts: &'a [Alert]) -> DeliverFuture<'a>;

    /// Called once when the sink stops, after its last delivery: the place
    /// to let a child process exit or flush a buffer. Default: nothing.
    fn close(&self) -> DeliverFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}

/// What a kind may need beyond its own settings when it is built.
#[derive(Clone)]
pub struct BuildContext {
    /// The sink's name, for log fields and the webhook's `receiver`.
    pub sink: String,
    /// The engine's own Redis, for kinds that write there by default.
    pub redis: RedisTarget,
    /// The manifest's `timeout`. The dispatcher enforces it on every
    /// attempt; kinds use it for their own connect and reply timeouts so the
    /// error says what timed out.
    pub timeout: Duration,
    /// The manifest's directory (absolute): relative paths in a manifest are
    /// relative to it, as config paths are to the config file, so a service
    /// started from `/` finds the same files as a shell in the checkout.
    pub base_dir: PathBuf,
    /// Where a kind counts the events of its own (an exec program's exits).
    pub metrics: Arc<Metrics>,
}

/// The settings of one kind: a serde type (unknown fields denied) that knows
/// how to check itself and build its runtime.
pub trait SinkSettings: serde::de::DeserializeOwned {
    /// Checks what serde cannot (URL syntax, non-empty values…). No I/O:
    /// `tripline check` and every reload run it.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    /// Builds the runtime when the sink starts.
    fn build(self, cx: &BuildContext) -> Result<Box<dyn Sink>, String>;
}

/// One registered kind. Built with [`Kind::of`], so the registry stays a
/// list of one-liners.
pub struct Kind {
    /// What `kind:` says in a manifest.
    pub name: &'static str,
    validate: fn(&serde_yaml::Value) -> Result<(), String>,
    build: BuildFn,
}

/// Parses a kind's settings and builds its runtime.
type BuildFn = fn(&serde_yaml::Value, &BuildContext) -> Result<Box<dyn Sink>, String>;

impl Kind {
    pub const fn of<S: SinkSettings>(name: &'static str) -> Kind {
        Kind {
            name,
            validate: validate_as::<S>,
            build: build_as::<S>,
        }
    }

    /// Parses and checks `settings` (the manifest minus its common keys).
    pub fn validate(&self, settings: &serde_yaml::Value) -> Result<(), String> {
        (self.validate)(settings)
    }

    pub fn build(
        &self,
        settings: &serde_yaml::Value,
        cx: &BuildContext,
    ) -> Result<Box<dyn Sink>, String> {
        (self.build)(settings, cx)
    }
}

/// Every built-in kind. Adding a kind: one file, one line here.
pub const KINDS: &[Kind] = &[
    Kind::of::<console::ConsoleSettings>("console"),
    Kind::of::<file::FileSettings>("file"),
    Kind::of::<webhook::WebhookSettings>("webhook"),
    Kind::of::<slack::SlackSettings>("slack"),
    Kind::of::<alertmanager::AlertmanagerSettings>("alertmanager"),
    Kind::of::<redis_stream::RedisStreamSettings>("redis_stream"),
    Kind::of::<exec::ExecSettings>("exec"),
];

pub fn kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.name == name)
}

/// Parses kind settings strictly (unknown keys are errors); a manifest with
/// no settings at all parses like an empty mapping, so all-default kinds
/// need none.
fn parse_as<S: SinkSettings>(v: &serde_yaml::Value) -> Result<S, String> {
    let v = if v.is_null() {
        serde_yaml::Value::Mapping(serde_yaml::Mapping::new())
    } else {
        v.clone()
    };
    let s: S = serde_yaml::from_value(v).map_err(|e| e.to_string())?;
    s.validate()?;
    Ok(s)
}

fn validate_as<S: SinkSettings>(v: &serde_yaml::Value) -> Result<(), String> {
    parse_as::<S>(v).map(drop)
}

fn build_as<S: SinkSettings>(
    v: &serde_yaml::Value,
    cx: &BuildContext,
) -> Result<Box<dyn Sink>, String> {
    parse_as::<S>(v)?.build(cx)
}
