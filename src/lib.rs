//! tripline: a rule engine for streaming network telemetry.
//!
//! # Layout
//! Read top-down, the modules follow one message through the engine:
//!
//! - [`config`]: the YAML file and its defaults, resolved into the validated
//!   [`config::Settings`] (every problem reported at once, at file:line).
//! - [`redis_conn`]: connections to one Redis or a Redis Cluster (reply
//!   timeouts, reconnect backoff, health).
//! - [`group_reader`]: the one consumer-group reader of subscriptions and
//!   sinks (own pending first, then new; delivery counts, claims, lag), with
//!   its fast path: XREADGROUP over a socket of our own.
//! - [`keys`]: every Redis key tripline uses, and the hash tag that
//!   places them on Redis Cluster.
//! - [`shard`]: sharded topics (`S:{0}` … `S:{n-1}`) and which shard a
//!   device publishes to.
//! - [`consume`]: one consumer-group loop per subscription worker: read a batch,
//!   evaluate it, commit it; claiming stale entries; dead-lettering.
//! - [`instance`]: the instance name's lease, and removing consumers idle for
//!   long.
//! - [`decode`]: Watermill envelope, single JSON field or flat fields → message.
//! - [`rules`]: the frozen Rhai `Engine`, the script API, the compiled rule set.
//! - [`model`]: the alert as it leaves tripline, and its fingerprint.
//! - [`alert`]: the pure lifecycle, the book
//!   (this instance's cache of the alert state), the store (the one commit
//!   of alert state, outbox, dead letters and XACK, in one script run, with
//!   its compare-and-set and retries), the timers and silences.
//! - [`sinks`]: the `Sink` trait, one file per kind, the per-sink dispatcher.
//! - [`http`]: /metrics, /healthz, /readyz, /-/reload, `/api/silences` and the seed's
//!   `POST /telemetry-data` gateway.
//! - [`process`]: one entry through decode, rules and the alert book.
//! - [`ruletest`]: `*.test.yaml` rule tests on a virtual clock (`tripline test`).
//! - [`replay`]: the JSON-lines format of `tripline record` and `tripline replay`.
//! - [`reload`]: swap in a whole new rule/plugin set, or keep the old one;
//!   [`reload::watch`] turns saved files into reloads.
//! - [`status`]: what tripline is doing, for the person on call:
//!   `/api/v1/{alerts,rules,status}`, Alertmanager's API v2, the page at `/`.
//! - [`metrics`]: one function per event, writing the log line and the metric.
//! - [`metrics_process`]: the standard `process_*` metrics, read from `/proc`.
//! - [`runtime`]: the context one engine's parts share (metrics, silences,
//!   rule state), handed in rather than process-wide.
//! - [`app`]: `run(config, shutdown)` wires the tasks and drains them on stop.
//! - [`clock`]: wall-clock milliseconds and their RFC 3339 form.
//! - [`escape`]: control characters in untrusted text made visible, for
//!   every human-facing output (text logs, console, CLI reports).
//! - [`version`]: the crate version and the git commit built (`build.rs`).
//! - [`cli`]: the `run`, `check`, `test`, `replay`, `record`, `simulate`,
//!   `silence`, `completions` and `man` commands behind `main`.

pub mod alert;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod consume;
pub mod decode;
pub mod escape;
pub mod group_reader;
pub mod http;
pub mod instance;
pub mod keys;
pub mod metrics;
pub mod metrics_process;
pub mod model;
pub mod process;
pub mod redis_conn;
pub mod reload;
pub mod replay;
pub mod rules;
pub mod ruletest;
pub mod runtime;
pub mod shard;
pub mod sinks;
pub mod status;
#[cfg(test)]
mod test_redis;
pub mod version;
