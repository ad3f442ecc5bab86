//! `POST /telemetry-data`, the seed's gateway for collectors that cannot
//! speak Redis: validates a reading and appends it to a stream in
//! Watermill's envelope. Its token, body limit and Redis connection also
//! serve [`super::ingest`].

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use redis::{FromRedisValue, RedisError};
use serde_json::{Value, json};

use super::auth::{bearer_ok, unauthorized};
use crate::config::GatewaySettings;
use crate::decode::{WATERMILL_METADATA, WATERMILL_PAYLOAD, WATERMILL_UUID, encode_metadata};
use crate::metrics::Metrics;
use crate::redis_conn::RedisTarget;
use crate::shard::stream_for;

/// How long the gateway waits for Redis: a collector waits for our answer,
/// so a stuck Redis must turn into a 503 quickly.
const GATEWAY_REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// The exact bodies of the seed's 400 answers; collectors may match on them.
const MALFORMED: &str = "Malformed data received";
const INCOMPLETE: &str = "Incomplete or invalid data received";

/// `POST /telemetry-data`: validates a reading and appends it to the
/// configured stream in Watermill's envelope.
pub struct Gateway {
    /// Stream (or sharded topic) readings are appended to.
    stream: String,
    /// Shards of `stream`; above 1 a reading goes to its device's shard.
    shards: u32,
    /// Bearer token requests must carry, if any.
    token: Option<String>,
    /// Body size limit in bytes.
    max_body_bytes: usize,
    /// Where to publish, over the instance's shared connection.
    target: RedisTarget,
    /// Where requests are counted by result.
    metrics: Arc<Metrics>,
    /// Streams `POST /api/v1/ingest/{stream}` may write: those some
    /// subscription reads, so nothing is written that no rule will see.
    ingest_streams: Vec<String>,
}

impl Gateway {
    /// `ingest_streams`: the streams the subscriptions read.
    pub fn new(
        config: &GatewaySettings,
        ingest_streams: Vec<String>,
        target: RedisTarget,
        metrics: Arc<Metrics>,
    ) -> Gateway {
        metrics.gateway_serving(&ingest_streams);
        Gateway {
            ingest_streams,
            stream: config.stream.clone(),
            shards: config.shards,
            token: config.token.clone(),
            max_body_bytes: config.max_body_bytes,
            target,
            metrics,
        }
    }

    /// The `/telemetry-data` and `/api/v1/ingest/{stream}` routes, refusing
    /// bodies over `max_body_bytes` before they are read.
    pub fn routes(self: Arc<Self>) -> Router {
        let limit = self.max_body_bytes;
        Router::new()
            .route(
                "/telemetry-data",
                post(telemetry)
                    .with_state(self.clone())
                    .layer(DefaultBodyLimit::max(limit)),
            )
            .merge(super::ingest::routes(self))
    }

    pub(super) fn authorized(&self, headers: &HeaderMap) -> bool {
        bearer_ok(headers, self.token.as_deref())
    }

    pub(super) fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    pub(super) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(super) fn ingest_streams(&self) -> &[String] {
        &self.ingest_streams
    }

    /// XADDs one reading; returns the entry id.
    async fn publish(&self, stream: &str, payload: &[u8]) -> Result<String, RedisError> {
        let mut pipe = redis::pipe();
        pipe.add_command(watermill_xadd(stream, payload, "tripline-gateway"));
        let (id,): (String,) = self.send(&pipe).await?;
        Ok(id)
    }

    /// Sends `pipe` on the shared connection. A connection found dead (Redis
    /// restarted since the last request) is replaced and `pipe` sent once
    /// more; a timeout is not retried, as Redis may have applied it.
    pub(super) async fn send<T: FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, RedisError> {
        let send = async || {
            self.target
                .with_shared(GATEWAY_REPLY_TIMEOUT, async |c| pipe.query_async(c).await)
                .await
        };
        match send().await {
            Err(e) if e.is_connection_dropped() && !e.is_timeout() => send().await,
            other => other,
        }
    }
}

/// The XADD of one entry in Watermill's envelope, as the seed's Go
/// publishers write it, so rules see the same `msg` (and `source` in its
/// metadata says which endpoint took it).
pub(super) fn watermill_xadd(stream: &str, payload: &[u8], source: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream)
        .arg("*")
        .arg(WATERMILL_UUID)
        .arg(uuid::Uuid::new_v4().to_string())
        .arg(WATERMILL_METADATA)
        .arg(encode_metadata(&[("source", source)]))
        .arg(WATERMILL_PAYLOAD)
        .arg(payload);
    cmd
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn telemetry(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if !gateway.authorized(&headers) {
        gateway
            .metrics
            .gateway_rejected("unauthorized", "missing or wrong bearer token");
        return unauthorized();
    }
    let body = match body {
        Ok(b) => b,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let limit = gateway.max_body_bytes;
            gateway
                .metrics
                .gateway_rejected("too_large", &format!("body over {limit} bytes"));
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("Body larger than {limit} bytes"),
            );
        }
        Err(rejection) => {
            gateway
                .metrics
                .gateway_rejected("malformed", &rejection.body_text());
            return error(StatusCode::BAD_REQUEST, MALFORMED);
        }
    };
    let reading = match validate(&body) {
        Ok(r) => r,
        Err(Rejection::Malformed(why)) => {
            gateway.metrics.gateway_rejected("malformed", &why);
            return error(StatusCode::BAD_REQUEST, MALFORMED);
        }
        Err(Rejection::Invalid(why)) => {
            gateway.metrics.gateway_rejected("invalid", &why);
            return error(StatusCode::BAD_REQUEST, INCOMPLETE);
        }
    };
    let payload = serde_json::to_vec(&reading).expect("a JSON value serializes");
    let device = reading["hostname"].as_str().unwrap_or_default();
    let stream = stream_for(&gateway.stream, gateway.shards, device);
    match gateway.publish(&stream, &payload).await {
        Ok(id) => {
            gateway.metrics.gateway_accepted(&stream, &id);
            (StatusCode::OK, Json(json!({ "stream": stream, "id": id }))).into_response()
        }
        Err(e) => {
            gateway.metrics.gateway_publish_failed(&stream, &e);
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "Could not publish the reading; try again later",
            )
        }
    }
}

/// Why a body is refused; the text goes to the log, not to the client.
#[derive(Debug, PartialEq)]
enum Rejection {
    /// Not a JSON object with fields of the seed's types.
    Malformed(String),
    /// Well-formed, but the hostname is empty or the error count missing or
    /// not positive.
    Invalid(String),
}

/// The seed's checks: a JSON object whose `hostname` and `interface` are
/// strings and `input_errors` an integer (wrong types are malformed, as for
/// the Go decoder), with a non-empty hostname and a positive error count.
/// Extra fields are kept.
fn validate(body: &[u8]) -> Result<Value, Rejection> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| Rejection::Malformed(format!("not JSON: {e}")))?;
    let Some(object) = value.as_object() else {
        return Err(Rejection::Malformed("not a JSON object".into()));
    };
    let string = |field: &str| match object.get(field) {
        None | Some(Value::Null) => Ok(""),
        Some(Value::String(s)) => Ok(s.as_str()),
        Some(_) => Err(Rejection::Malformed(format!("`{field}` is not a string"))),
    };
    let hostname = string("hostname")?;
    string("interface")?;
    let errors = match object.get("input_errors") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| Rejection::Malformed("`input_errors` is not an integer".into()))?,
    };
    if hostname.trim().is_empty() {
        return Err(Rejection::Invalid("empty or missing `hostname`".into()));
    }
    if errors <= 0 {
        return Err(Rejection::Invalid(format!(
            "`input_errors` is missing, zero or negative ({errors})"
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_readings_are_validated_like_the_go_gateway() {
        let ok =
            validate(br#"{"hostname":"r1","interface":"et-0","input_errors":12,"site":"ams"}"#)
                .unwrap();
        assert_eq!(ok["site"], "ams");
        let malformed = |b: &[u8]| matches!(validate(b), Err(Rejection::Malformed(_)));
        let invalid = |b: &[u8]| matches!(validate(b), Err(Rejection::Invalid(_)));
        assert!(malformed(b"{not json"));
        assert!(malformed(b"[1, 2]"));
        assert!(malformed(br#"{"hostname": 5, "input_errors": 3}"#));
        assert!(malformed(
            br#"{"hostname": "r1", "interface": 1, "input_errors": 3}"#
        ));
        assert!(malformed(br#"{"hostname": "r1", "input_errors": "3"}"#));
        assert!(malformed(br#"{"hostname": "r1", "input_errors": 1.5}"#));
        assert!(invalid(br#"{"hostname": "", "input_errors": 3}"#));
        assert!(invalid(br#"{"input_errors": 3}"#));
        assert!(invalid(br#"{"hostname": "r1"}"#));
        assert!(invalid(br#"{"hostname": "r1", "input_errors": 0}"#));
        assert!(invalid(br#"{"hostname": "r1", "input_errors": -4}"#));
        assert!(invalid(br#"{"hostname": "r1", "input_errors": null}"#));
    }
}
