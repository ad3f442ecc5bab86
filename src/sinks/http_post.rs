//! What the HTTP kinds (`webhook`, `slack`, `alertmanager`) share: one
//! client per sink, a JSON POST, status mapping, and error texts that never
//! contain the URL or header values (they often carry a token).

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::SinkError;

/// Checks a URL setting without echoing it: it may hold a secret.
pub fn check_url(key: &str, url: &str) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("`{key}` is not a URL: {e}"))?;
    match parsed.scheme() {
        "http" | "https" => Ok(parsed),
        other => Err(format!(
            "`{key}` must be http:// or https://, not {other}://"
        )),
    }
}

/// Checks header names and values, naming the header but never its value.
pub fn check_headers(headers: &BTreeMap<String, String>) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        let n = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("`headers`: `{name}` is not a valid header name"))?;
        let mut v = HeaderValue::from_str(value)
            .map_err(|_| format!("`headers`: the value of `{name}` is not a valid header value"))?;
        v.set_sensitive(true);
        map.insert(n, v);
    }
    Ok(map)
}

/// A POST target: where, with which headers, through which client.
pub struct Poster {
    /// One client per sink: its connection pool is reused across batches.
    client: reqwest::Client,
    url: reqwest::Url,
    headers: HeaderMap,
    /// Reported in timeout errors.
    timeout: Duration,
}

impl Poster {
    pub fn new(url: reqwest::Url, headers: HeaderMap, timeout: Duration) -> Result<Poster, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Poster {
            client,
            url,
            headers,
            timeout,
        })
    }

    /// POSTs `body` as JSON. 2xx is success; 408, 429 and 5xx are failures
    /// worth retrying; any other status is a rejection.
    pub async fn post_json<T: serde::Serialize + ?Sized>(&self, body: &T) -> Result<(), SinkError> {
        let response = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .json(body)
            .send()
            .await
            .map_err(|e| self.error(e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        let snippet: String = text.trim().chars().take(200).collect();
        let message = if snippet.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status}: {snippet}")
        };
        if status.is_client_error()
            && status != reqwest::StatusCode::REQUEST_TIMEOUT
            && status != reqwest::StatusCode::TOO_MANY_REQUESTS
        {
            Err(SinkError::Rejected(message))
        } else {
            Err(SinkError::Failed(message))
        }
    }

    /// The error and its causes, without the URL.
    fn error(&self, e: reqwest::Error) -> SinkError {
        if e.is_timeout() {
            return SinkError::Timeout(self.timeout);
        }
        let e = e.without_url();
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        SinkError::Failed(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_setting_but_not_the_secret() {
        let e = check_url("url", "ftp://host/T0K3N").unwrap_err();
        assert!(e.contains("`url`") && !e.contains("T0K3N"), "{e}");
        let e = check_url("url", "hooks.example/T0K3N").unwrap_err();
        assert!(!e.contains("T0K3N"), "{e}");
        let headers = BTreeMap::from([("Authorization".to_string(), "Bearer T0K3N\n".to_string())]);
        let e = check_headers(&headers).unwrap_err();
        assert!(e.contains("Authorization") && !e.contains("T0K3N"), "{e}");
    }
}
