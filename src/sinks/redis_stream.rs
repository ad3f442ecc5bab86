//! `redis_stream`: XADD each alert to a stream, on tripline's own Redis or
//! another one. The default, `format: watermill`, writes Watermill's
//! envelope (what the seed's Go services read), so a Go Watermill
//! subscriber consumes alerts with its stock Redis Streams unmarshaller.
//! That unmarshaller type-asserts `_watermill_message_uuid` and `payload`
//! without checking them, so an entry lacking either panics the subscriber:
//! the one-field `json` layout is opt-in, for consumers that are not
//! Watermill.
//!
//! A batch is one MULTI/EXEC: it lands whole or not at all, so a retry never
//! follows a half-written batch.

use serde::Deserialize;

use super::{BuildContext, DeliverFuture, Sink, SinkError, SinkSettings};
use crate::alert::Alert;
use crate::decode::{WATERMILL_METADATA, WATERMILL_PAYLOAD, WATERMILL_UUID, encode_metadata};
use crate::redis_conn::{RedisEndpoint, RedisTarget};

/// How an alert is laid out in the stream entry.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One field, `alert`: the alert as JSON (the outbox's own layout).
    Json,
    /// `_watermill_message_uuid`, `metadata` (msgpack map: fingerprint,
    /// rule, name, severity, status) and `payload` (the alert as JSON).
    /// The default: a stream is as likely to be read by the seed's Go
    /// services as by anything else, and they crash on any other layout.
    #[default]
    Watermill,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisStreamSettings {
    /// Stream to append to.
    pub stream: String,
    /// Another Redis (`host:port`, `redis://[user:password@]host:port[/db]`,
    /// `unix:///path`, `redis+cluster://host:port,…`); default: the Redis
    /// tripline reads from.
    #[serde(default)]
    pub url: Option<String>,
    /// Approximate cap on the stream's length (`XADD MAXLEN ~`); default
    /// unbounded.
    #[serde(default)]
    pub maxlen: Option<u64>,
    /// `watermill` (default) or `json`.
    #[serde(default)]
    pub format: Format,
}

impl RedisStreamSettings {
    /// The URL of `url`, without echoing it (it may hold a password).
    fn other_redis(&self) -> Result<Option<RedisEndpoint>, String> {
        self.url
            .as_deref()
            .map(|u| {
                RedisEndpoint::parse(u).map_err(|_| {
                    "`url` is not a usable Redis address (host:port, redis://…, unix://…, redis+cluster://…)"
                        .to_string()
                })
            })
            .transpose()
    }
}

impl SinkSettings for RedisStreamSettings {
    fn validate(&self) -> Result<(), String> {
        if self.stream.is_empty() {
            return Err("`stream` must not be empty".into());
        }
        if self.maxlen == Some(0) {
            return Err("`maxlen` must be at least 1 (leave it out for no cap)".into());
        }
        self.other_redis().map(drop)
    }

    fn build(self, cx: &BuildContext) -> Result<Box<dyn Sink>, String> {
        let target = match self.other_redis()? {
            Some(endpoint) => RedisTarget::new(&endpoint, cx.timeout)
                .map_err(|_| "`url` is not a usable Redis address".to_string())?,
            None => cx.redis.clone(),
        };
        Ok(Box::new(RedisStreamSink {
            target,
            settings: self,
            timeout: cx.timeout,
        }))
    }
}

pub struct RedisStreamSink {
    /// Written over its shared connection: tripline's own Redis shares the
    /// instance's (one MULTI/EXEC pipeline is sent in one piece, so other
    /// users' commands never land inside it).
    target: RedisTarget,
    settings: RedisStreamSettings,
    /// How long a delivery waits for Redis, reported in timeout errors.
    timeout: std::time::Duration,
}

impl RedisStreamSink {
    fn error(&self, e: redis::RedisError) -> SinkError {
        if e.is_timeout() {
            SinkError::Timeout(self.timeout)
        } else {
            SinkError::Failed(format!("Redis: {e}"))
        }
    }
}

/// The fields of `a`'s stream entry, in `format`.
fn entry_fields(format: Format, a: &Alert) -> Vec<(&'static str, Vec<u8>)> {
    let json = serde_json::to_vec(a).expect("alerts always serialize");
    match format {
        Format::Json => vec![(crate::keys::ALERT_FIELD, json)],
        Format::Watermill => {
            let status = super::webhook::status_str(a.status);
            let metadata = encode_metadata(&[
                ("fingerprint", &a.fingerprint),
                ("rule", &a.rule),
                ("name", &a.name),
                ("severity", a.severity.as_str()),
                ("status", status),
            ]);
            vec![
                (
                    WATERMILL_UUID,
                    uuid::Uuid::new_v4().to_string().into_bytes(),
                ),
                (WATERMILL_METADATA, metadata),
                (WATERMILL_PAYLOAD, json),
            ]
        }
    }
}

impl Sink for RedisStreamSink {
    fn deliver<'a>(&'a self, alerts: &'a [Alert]) -> DeliverFuture<'a> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for a in alerts {
                let cmd = pipe.cmd("XADD").arg(&self.settings.stream);
                if let Some(n) = self.settings.maxlen {
                    cmd.arg("MAXLEN").arg("~").arg(n);
                }
                cmd.arg("*");
                for (k, v) in entry_fields(self.settings.format, a) {
                    cmd.arg(k).arg(v);
                }
                cmd.ignore();
            }
            self.target
                .with_shared(self.timeout, async |c| pipe.query_async::<()>(c).await)
                .await
                .map_err(|e| self.error(e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::{Origin, Severity, Status};

    fn alert() -> Alert {
        Alert {
            fingerprint: "f1f2b1627a1c5599".into(),
            rule: "transceiver/rx_power".into(),
            name: "LowRxPower".into(),
            severity: Severity::Critical,
            status: Status::Firing,
            labels: [("topic".to_string(), "transceiver_telemetry".to_string())].into(),
            annotations: [("summary".to_string(), "line\nbreak \u{1b}[31m".to_string())].into(),
            starts_at: "2026-01-01T00:00:00Z".into(),
            ends_at: None,
            origin: Origin::default(),
        }
    }

    #[test]
    fn a_manifest_without_format_writes_watermill() {
        let settings: RedisStreamSettings =
            serde_yaml::from_str("stream: tripline-alerts\n").unwrap();
        assert_eq!(settings.format, Format::Watermill);
    }

    /// What Watermill's stock `redisstream` unmarshaller does with an entry:
    /// `_watermill_message_uuid` and `payload` must be there (it panics
    /// otherwise), `metadata` empty or a msgpack map of strings.
    #[test]
    fn watermill_entry_is_what_the_stock_unmarshaller_reads() {
        let fields = entry_fields(Format::default(), &alert());
        let names: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            [WATERMILL_UUID, WATERMILL_METADATA, WATERMILL_PAYLOAD]
        );
        let uuid = std::str::from_utf8(&fields[0].1).unwrap();
        assert!(uuid::Uuid::parse_str(uuid).is_ok(), "{uuid}");
        let rmpv::Value::Map(metadata) =
            rmpv::decode::read_value(&mut fields[1].1.as_slice()).unwrap()
        else {
            panic!("metadata is not a msgpack map: {:x?}", fields[1].1);
        };
        let metadata: Vec<(&str, &str)> = metadata
            .iter()
            .map(|(k, v)| (k.as_str().unwrap(), v.as_str().unwrap()))
            .collect();
        assert_eq!(
            metadata,
            [
                ("fingerprint", "f1f2b1627a1c5599"),
                ("rule", "transceiver/rx_power"),
                ("name", "LowRxPower"),
                ("severity", "critical"),
                ("status", "firing"),
            ]
        );
        let payload: serde_json::Value = serde_json::from_slice(&fields[2].1).unwrap();
        assert_eq!(payload["annotations"]["summary"], "line\nbreak \u{1b}[31m");
    }
}
