//! `console`: one human-readable line per alert on standard output.

use std::io::Write;
use std::sync::Mutex;

use serde::Deserialize;

use super::{BuildContext, DeliverFuture, Sink, SinkError, SinkSettings};
use crate::alert::{Alert, Status};

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSettings {
    /// Print the alert as one JSON object instead of a readable line.
    #[serde(default)]
    pub json: bool,
}

/// Generic over the writer so tests can read what was printed.
pub struct ConsoleSink<W> {
    /// Standard output in production; a `Vec<u8>` in tests.
    out: Mutex<W>,
    /// Print JSON instead of the readable line.
    json: bool,
}

impl SinkSettings for ConsoleSettings {
    fn build(self, _: &BuildContext) -> Result<Box<dyn Sink>, String> {
        Ok(Box::new(ConsoleSink::new(std::io::stdout(), self.json)))
    }
}

impl<W: Write + Send> ConsoleSink<W> {
    pub fn new(out: W, json: bool) -> Self {
        ConsoleSink {
            out: Mutex::new(out),
            json,
        }
    }

    pub fn into_inner(self) -> W {
        self.out.into_inner().expect("console writer poisoned")
    }
}

/// `FIRING critical HighInputErrors {hostname=r1, interface=et-0/0/1} ALERT! …`
pub fn line(a: &Alert) -> String {
    let status = match a.status {
        Status::Firing => "FIRING",
        Status::Resolved => "RESOLVED",
    };
    let labels = a.labels_text();
    format!(
        "{status} {} {} {{{labels}}} {} [rule {}]",
        a.severity.as_str(),
        a.name,
        a.summary(),
        a.rule
    )
}

impl<W: Write + Send> Sink for ConsoleSink<W> {
    fn deliver<'a>(&'a self, alerts: &'a [Alert]) -> DeliverFuture<'a> {
        Box::pin(async move {
            let mut out = self
                .out
                .lock()
                .map_err(|_| SinkError::Failed("console writer poisoned".into()))?;
            for a in alerts {
                let text = if self.json {
                    serde_json::to_string(a).expect("alerts always serialize")
                } else {
                    line(a)
                };
                writeln!(out, "{text}")?;
            }
            out.flush()?;
            Ok(())
        })
    }
}
