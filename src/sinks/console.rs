//! `console`: one human-readable line per alert on standard output.
//!
//! The readable line is escaped ([`crate::escape`]): labels and annotations
//! come from messages, and a newline in one must not print a second, forged
//! alert line, nor an ESC sequence clear or recolour the operator's terminal.

use std::borrow::Cow;
use std::io::Write;
use std::sync::Mutex;

use serde::Deserialize;

use super::{BuildContext, DeliverFuture, Sink, SinkError, SinkSettings};
use crate::alert::{Alert, Status};
use crate::escape::escape;

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

/// `FIRING critical HighInputErrors {hostname=r1, interface=et-0/0/1} ALERT! …`,
/// control characters escaped, so always one line.
pub fn line(a: &Alert) -> String {
    let status = match a.status {
        Status::Firing => "FIRING",
        Status::Resolved => "RESOLVED",
    };
    let labels = a.labels_text();
    let text = format!(
        "{status} {} {} {{{labels}}} {} [rule {}]",
        a.severity.as_str(),
        a.name,
        a.summary(),
        a.rule
    );
    if let Cow::Owned(escaped) = escape(&text) {
        return escaped;
    }
    text
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::{Origin, Severity};

    #[test]
    fn a_newline_in_a_label_prints_no_forged_alert_line() {
        let hostile = "r1\nFIRING critical Forged {} x [rule x]\r\x1b[2J\u{2028}";
        let alert = Alert {
            fingerprint: "fp".into(),
            rule: "r".into(),
            name: "Down".into(),
            severity: Severity::Critical,
            status: Status::Firing,
            labels: [("hostname".to_string(), hostile.to_string())].into(),
            annotations: [("summary".to_string(), format!("down: {hostile}"))].into(),
            starts_at: "2026-01-01T00:00:00Z".into(),
            ends_at: None,
            origin: Origin::default(),
        };
        let sink = ConsoleSink::new(Vec::new(), false);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(sink.deliver(&[alert])).unwrap();
        let out = String::from_utf8(sink.into_inner()).unwrap();
        let escaped = r"r1\nFIRING critical Forged {} x [rule x]\r\x1b[2J\u{2028}";
        assert_eq!(
            out,
            format!("FIRING critical Down {{hostname={escaped}}} down: {escaped} [rule r]\n")
        );
    }
}
