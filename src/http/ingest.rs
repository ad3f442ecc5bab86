//! `POST /api/v1/ingest/{stream}`: for producers that cannot write to
//! Redis but are not the seed's collectors. One JSON object, a JSON array
//! of objects, or NDJSON; every entry is written in Watermill's envelope
//! (as the seed's Go publishers write it), all of them or none.
//!
//! It belongs to the gateway (on with it, behind its token and body limit)
//! and shares its Redis connection, but takes any object for any stream a
//! subscription reads, where `/telemetry-data` takes the seed's readings
//! for one stream.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Map, Value, json};

use super::auth::unauthorized;
use super::gateway::{Gateway, watermill_xadd};
use crate::decode::json_kind;
use crate::metrics::Ingest;

/// The `/api/v1/ingest/{stream}` route, refusing bodies over the gateway's
/// limit before they are read.
pub(super) fn routes(gateway: Arc<Gateway>) -> Router {
    let limit = gateway.max_body_bytes();
    Router::new().route(
        "/api/v1/ingest/{stream}",
        post(ingest)
            .with_state(gateway)
            .layer(DefaultBodyLimit::max(limit)),
    )
}

/// Why a body was refused; the text is the client's 400 and names where
/// (line, element) and what was wrong, never the offending bytes.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum BodyError {
    #[error("the body is empty: send one JSON object, an array of objects, or NDJSON")]
    Empty,
    #[error("{at}: not JSON: {why}")]
    NotJson { at: String, why: String },
    #[error("{at}: {found} is not a JSON object; every entry must be one")]
    NotObject { at: String, found: &'static str },
}

/// How the body is framed, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    /// `application/json`: one object or an array of objects.
    Json,
    /// `application/x-ndjson`: one object per line.
    Ndjson,
    /// Anything else (curl's form type, none): one value, or several
    /// separated by whitespace (NDJSON without saying so).
    Detect,
}

impl Framing {
    fn of(headers: &HeaderMap) -> Framing {
        let media = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .unwrap_or_default();
        match media.as_str() {
            "application/json" => Framing::Json,
            "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Framing::Ndjson,
            _ => Framing::Detect,
        }
    }
}

/// The entries of a body, each a JSON object, in order.
fn entries(body: &[u8], framing: Framing) -> Result<Vec<Map<String, Value>>, BodyError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(BodyError::Empty);
    }
    let values: Vec<(String, Value)> = match framing {
        Framing::Ndjson => ndjson(body)?,
        Framing::Json => vec![("body".into(), one_value(body)?)],
        Framing::Detect => {
            let mut found = Vec::new();
            for (i, value) in serde_json::Deserializer::from_slice(body)
                .into_iter::<Value>()
                .enumerate()
            {
                let value = value.map_err(|e| not_json(format!("line {}", e.line()), &e))?;
                found.push((format!("value {}", i + 1), value));
            }
            if found.len() == 1 {
                found[0].0 = "body".into();
            }
            found
        }
    };
    let values = match values.as_slice() {
        [(_, Value::Array(items))] => items
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("element {i}"), v.clone()))
            .collect(),
        _ => values,
    };
    if values.is_empty() {
        return Err(BodyError::Empty);
    }
    values
        .into_iter()
        .map(|(at, value)| match value {
            Value::Object(map) => Ok(map),
            other => Err(BodyError::NotObject {
                at,
                found: json_kind(&other),
            }),
        })
        .collect()
}

/// Exactly one JSON value.
fn one_value(body: &[u8]) -> Result<Value, BodyError> {
    serde_json::from_slice(body).map_err(|e| not_json("body".into(), &e))
}

/// One value per non-blank line; `\r\n` line ends are fine.
fn ndjson(body: &[u8]) -> Result<Vec<(String, Value)>, BodyError> {
    let mut out = Vec::new();
    for (i, line) in body.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let at = format!("line {}", i + 1);
        let value = serde_json::from_slice(line).map_err(|e| not_json(at.clone(), &e))?;
        out.push((at, value));
    }
    Ok(out)
}

/// serde's message with its position given as the column only: the line
/// is already in `at`, and serde's would count from the start of one NDJSON
/// line.
fn not_json(at: String, e: &serde_json::Error) -> BodyError {
    let text = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    let why = match text.strip_suffix(&position) {
        Some(message) => format!("{message} (column {})", e.column()),
        None => text,
    };
    BodyError::NotJson { at, why }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// Checks in the order that reveals least: the token before the stream
/// list, the stream before the body is judged.
async fn ingest(
    State(gateway): State<Arc<Gateway>>,
    Path(stream): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let metrics = gateway.metrics();
    if !gateway.authorized(&headers) {
        metrics.ingest_request(&stream, &Ingest::Unauthorized);
        return unauthorized();
    }
    let allowed = gateway.ingest_streams();
    if !allowed.contains(&stream) {
        let why = format!(
            "no subscription reads stream `{stream}`; allowed: {}",
            allowed.join(", ")
        );
        metrics.ingest_request(&stream, &Ingest::UnknownStream(&why));
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": why, "allowed": allowed })),
        )
            .into_response();
    }
    let body = match body {
        Ok(b) => b,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let why = format!("Body larger than {} bytes", gateway.max_body_bytes());
            metrics.ingest_request(&stream, &Ingest::TooLarge);
            return error(StatusCode::PAYLOAD_TOO_LARGE, &why);
        }
        Err(rejection) => {
            let why = rejection.body_text();
            metrics.ingest_request(&stream, &Ingest::Malformed(&why));
            return error(StatusCode::BAD_REQUEST, &why);
        }
    };
    let entries = match entries(&body, Framing::of(&headers)) {
        Ok(e) => e,
        Err(e) => {
            let why = e.to_string();
            metrics.ingest_request(&stream, &Ingest::Malformed(&why));
            return error(StatusCode::BAD_REQUEST, &why);
        }
    };
    // MULTI/EXEC: a failure part-way writes nothing.
    let mut pipe = redis::pipe();
    pipe.atomic();
    for entry in &entries {
        let payload = serde_json::to_vec(entry).expect("a JSON object serializes");
        pipe.add_command(watermill_xadd(&stream, &payload, "tripline-ingest"));
    }
    match gateway.send::<Vec<String>>(&pipe).await {
        Ok(ids) => {
            metrics.ingest_request(&stream, &Ingest::Accepted(ids.len()));
            (
                StatusCode::OK,
                Json(json!({ "stream": stream, "ids": ids })),
            )
                .into_response()
        }
        Err(e) => {
            metrics.ingest_request(&stream, &Ingest::Unavailable(&e));
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "Could not write the entries (none was written); try again later",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(r: Result<Vec<Map<String, Value>>, BodyError>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn objects_arrays_and_ndjson_become_entries_in_order() {
        let one = entries(br#"{"a": 1}"#, Framing::Detect).unwrap();
        assert_eq!(one.len(), 1);
        let array = entries(br#"[{"a": 1}, {"a": 2}]"#, Framing::Json).unwrap();
        assert_eq!(array[1]["a"], 2);
        let nd = entries(b"{\"a\": 1}\r\n\n{\"a\": 2}\n", Framing::Ndjson).unwrap();
        assert_eq!(nd.len(), 2);
        let detected = entries(b"{\"a\": 1}\n{\"a\": 2}\n{\"a\": 3}", Framing::Detect).unwrap();
        assert_eq!(detected[2]["a"], 3);
    }

    #[test]
    fn errors_name_the_line_or_element_and_why() {
        let bad_line = at(entries(b"{\"a\":1}\n{\"a\":2}\n{\"a\":\n", Framing::Ndjson));
        assert!(bad_line.starts_with("line 3: not JSON"), "{bad_line}");
        let detected = at(entries(b"{\"a\":1}\n{\"a\":2}\n{oops}\n", Framing::Detect));
        assert!(detected.starts_with("line 3: not JSON"), "{detected}");
        let element = at(entries(br#"[{"a":1}, 5]"#, Framing::Json));
        assert_eq!(
            element,
            "element 1: a number is not a JSON object; every entry must be one"
        );
        let value = at(entries(b"{\"a\":1} \"x\"", Framing::Detect));
        assert!(value.starts_with("value 2: a string"), "{value}");
        assert_eq!(entries(b" \n", Framing::Detect), Err(BodyError::Empty));
        assert_eq!(entries(b"[]", Framing::Json), Err(BodyError::Empty));
        // JSON forbids raw control characters in strings; escaped they are data.
        let raw = at(entries(b"{\"a\":\"x\x1b[2Jy\"}", Framing::Detect));
        assert!(raw.contains("control character"), "{raw}");
        let escaped = entries(br#"{"a":"x\u001b\ry"}"#, Framing::Detect).unwrap();
        assert_eq!(escaped[0]["a"], "x\u{1b}\ry");
    }

    #[test]
    fn framing_follows_the_content_type() {
        let with = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            Framing::of(&h)
        };
        assert_eq!(with("application/x-ndjson"), Framing::Ndjson);
        assert_eq!(with("Application/JSON; charset=utf-8"), Framing::Json);
        assert_eq!(with("application/x-www-form-urlencoded"), Framing::Detect);
        assert_eq!(Framing::of(&HeaderMap::new()), Framing::Detect);
    }
}
