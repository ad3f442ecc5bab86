//! Sinks: where alerts leave tripline.
//!
//! One manifest in `plugins/*.yaml` is one sink instance. Each kind is one
//! file here holding its settings type and its runtime; [`KINDS`] is the one
//! place that lists them. Every sink reads the outbox through its own
//! consumer group ([`dispatch`]), so one slow or dead sink never holds up the
//! engine or the other sinks.

pub mod console;
pub mod dispatch;
pub mod file;
pub mod manifest;
pub mod supervisor;

use std::future::Future;
use std::pin::Pin;

use crate::alert::Alert;

pub use manifest::{Manifest, PluginError, Route, load_dir};

/// Why a delivery failed; the dispatcher retries either kind, but logs say
/// which it was.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("{0}")]
    Failed(String),
}

pub type DeliverFuture<'a> = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send + 'a>>;

/// A destination for alerts. `deliver` gets a batch; it succeeds only when
/// every alert in it has been handed over (a retry resends the whole batch,
/// so receivers must tolerate duplicates: alerts carry a fingerprint).
pub trait Sink: Send + Sync {
    fn deliver<'a>(&'a self, alerts: &'a [Alert]) -> DeliverFuture<'a>;
}

/// Builds a sink of one kind from the kind-specific settings of a manifest.
/// Pure validation happens here too: a bad setting is an error naming it.
pub type BuildFn = fn(&serde_yaml::Value) -> Result<Box<dyn Sink>, String>;

/// Every built-in kind. Adding a kind: one file, one line here.
pub const KINDS: &[(&str, BuildFn)] = &[("console", console::build), ("file", file::build)];

pub fn builder(kind: &str) -> Option<BuildFn> {
    KINDS.iter().find(|(k, _)| *k == kind).map(|(_, b)| *b)
}

/// Parses kind settings strictly: unknown keys are errors.
pub fn settings<T: serde::de::DeserializeOwned>(v: &serde_yaml::Value) -> Result<T, String> {
    serde_yaml::from_value(v.clone()).map_err(|e| e.to_string())
}
