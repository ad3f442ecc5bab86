//! Silences: mute notifications matching labels for a while (maintenance,
//! known incidents). Stored in Redis so every instance honours them; each
//! instance keeps a copy refreshed every few seconds, and the sinks drop
//! matching notifications (they are acknowledged and counted, not sent).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::RedisError;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::Alert;
use crate::redis_conn::{LazyConn, RedisConn, RedisTarget};

/// Hash of all silences: field = id, value = JSON.
pub const KEY: &str = crate::keys::SILENCES;

/// One label condition. `alertname`, `severity` and `rule` match the
/// alert's own fields; any other name matches a label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Matcher {
    pub label: String,
    pub value: String,
    /// `value` is a regular expression (anchored) instead of a literal.
    #[serde(default)]
    pub regex: bool,
}

impl Matcher {
    /// `label=value` or `label=~regex`.
    pub fn parse(text: &str) -> Result<Matcher, String> {
        let (label, rest) = text
            .split_once('=')
            .ok_or_else(|| format!("matcher `{text}` is not label=value or label=~regex"))?;
        let label = label.trim();
        if label.is_empty() {
            return Err(format!("matcher `{text}` has no label name"));
        }
        let (value, regex) = match rest.strip_prefix('~') {
            Some(re) => (re.to_string(), true),
            None => (rest.to_string(), false),
        };
        let m = Matcher {
            label: label.to_string(),
            value,
            regex,
        };
        m.compiled()?;
        Ok(m)
    }

    fn compiled(&self) -> Result<Option<regex::Regex>, String> {
        if !self.regex {
            return Ok(None);
        }
        regex::Regex::new(&format!("^(?:{})$", self.value))
            .map(Some)
            .map_err(|e| format!("matcher `{}`: bad regex: {e}", self.label))
    }

    fn subject<'a>(&self, a: &'a Alert) -> Option<&'a str> {
        match self.label.as_str() {
            "alertname" => Some(&a.name),
            "severity" => Some(a.severity.as_str()),
            "rule" => Some(&a.rule),
            l => a.labels.get(l).map(String::as_str),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Silence {
    pub id: String,
    pub matchers: Vec<Matcher>,
    /// Milliseconds since the epoch.
    pub starts_ms: u64,
    pub ends_ms: u64,
    #[serde(default)]
    pub created_by: String,
    #[serde(default)]
    pub comment: String,
}

impl Silence {
    pub fn new(
        matchers: Vec<Matcher>,
        now_ms: u64,
        duration: Duration,
        created_by: String,
        comment: String,
    ) -> Result<Silence, String> {
        if matchers.is_empty() {
            return Err("a silence needs at least one matcher (it would mute everything)".into());
        }
        if duration.is_zero() {
            return Err("a silence needs a positive duration".into());
        }
        Ok(Silence {
            id: uuid::Uuid::new_v4().to_string(),
            matchers,
            starts_ms: now_ms,
            ends_ms: now_ms + duration.as_millis() as u64,
            created_by,
            comment,
        })
    }

    pub fn active(&self, now_ms: u64) -> bool {
        self.starts_ms <= now_ms && now_ms < self.ends_ms
    }
}

/// The active silences with their regexes compiled, for fast matching.
#[derive(Debug, Default)]
pub struct Silences {
    compiled: Vec<(Silence, Vec<Option<regex::Regex>>)>,
}

impl Silences {
    pub fn new(list: Vec<Silence>) -> Silences {
        let compiled = list
            .into_iter()
            .filter_map(|s| {
                let res: Result<Vec<_>, _> = s.matchers.iter().map(Matcher::compiled).collect();
                res.ok().map(|r| (s, r))
            })
            .collect();
        Silences { compiled }
    }

    /// Whether the silence whose id hashes to `id` ([`id_hash`]) is in
    /// force at `now_ms`: false once it expired or was deleted.
    pub fn in_force(&self, id: u64, now_ms: u64) -> bool {
        self.compiled
            .iter()
            .any(|(s, _)| s.active(now_ms) && id_hash(&s.id) == id)
    }

    /// The id of the first active silence muting `a`, if any.
    pub fn muting(&self, a: &Alert, now_ms: u64) -> Option<&str> {
        self.compiled
            .iter()
            .find(|(s, res)| {
                s.active(now_ms)
                    && s.matchers.iter().zip(res).all(|(m, re)| {
                        m.subject(a).is_some_and(|v| match re {
                            Some(re) => re.is_match(v),
                            None => v == m.value,
                        })
                    })
            })
            .map(|(s, _)| s.id.as_str())
    }
}

/// A silence's id as a number: the alert state remembers which silence
/// withheld a notification without storing its text in every entry.
/// Never 0, which means "none".
pub fn id_hash(id: &str) -> u64 {
    super::Fingerprint::new(id, "").finish().max(1)
}

pub async fn add(conn: &mut RedisConn, s: &Silence) -> Result<(), RedisError> {
    let json = serde_json::to_string(s).expect("silences serialize");
    let _: i64 = redis::cmd("HSET")
        .arg(KEY)
        .arg(&s.id)
        .arg(json)
        .query_async(conn)
        .await?;
    Ok(())
}

/// Removes a silence; false if there was none with that id.
pub async fn expire(conn: &mut RedisConn, id: &str) -> Result<bool, RedisError> {
    let n: i64 = redis::cmd("HDEL")
        .arg(KEY)
        .arg(id)
        .query_async(conn)
        .await?;
    Ok(n > 0)
}

/// Every silence still in effect, oldest first; ended ones are deleted.
pub async fn list(conn: &mut RedisConn, now_ms: u64) -> Result<Vec<Silence>, RedisError> {
    let all: BTreeMap<String, String> = redis::cmd("HGETALL").arg(KEY).query_async(conn).await?;
    let mut live = Vec::new();
    let mut ended = Vec::new();
    for (id, json) in all {
        match serde_json::from_str::<Silence>(&json) {
            Ok(s) if s.ends_ms > now_ms => live.push(s),
            Ok(_) => ended.push(id),
            Err(e) => tracing::warn!(id, "ignoring unreadable silence: {e}"),
        }
    }
    if !ended.is_empty() {
        let _: i64 = redis::cmd("HDEL")
            .arg(KEY)
            .arg(&ended)
            .query_async(conn)
            .await?;
    }
    live.sort_by_key(|s| s.starts_ms);
    Ok(live)
}

/// The silences in force in one engine: empty until the first refresh, and
/// in tools that never start one. The lifecycle and the sinks read it, and
/// [`refresh_loop`] keeps it in step with Redis.
#[derive(Debug, Default)]
pub struct ActiveSilences(ArcSwap<Silences>);

impl ActiveSilences {
    /// The silences in force now, unchanged for as long as the caller
    /// holds them.
    pub fn active(&self) -> Arc<Silences> {
        self.0.load_full()
    }

    /// Replaces the whole set, as read from Redis.
    pub fn set(&self, list: Vec<Silence>) {
        self.0.store(Arc::new(Silences::new(list)));
    }
}

/// Keeps `into` in step with Redis until shutdown.
pub async fn refresh_loop(
    target: RedisTarget,
    every: Duration,
    into: Arc<ActiveSilences>,
    shutdown: CancellationToken,
) {
    crate::redis_conn::every(
        LazyConn::new(target),
        every,
        shutdown,
        "reading silences",
        async |c| list(c, crate::clock::now_ms()).await,
        |l| into.set(l),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::super::{Action, ActionKind, Origin, Policy, Severity, Status};
    use super::*;
    use crate::runtime::Runtime;

    fn alert(host: &str) -> Alert {
        Alert {
            fingerprint: "f".into(),
            rule: "packet_errors/alert".into(),
            name: "HighInputErrors".into(),
            severity: Severity::Major,
            status: Status::Firing,
            labels: [("hostname".to_string(), host.to_string())].into(),
            annotations: Default::default(),
            starts_at: String::new(),
            ends_at: None,
            origin: Origin::default(),
        }
    }

    #[test]
    fn matchers_parse_and_match() {
        assert!(Matcher::parse("nolabel").is_err());
        assert!(Matcher::parse("x=~(").is_err());
        let s = Silence::new(
            vec![
                Matcher::parse("hostname=~core-.*").unwrap(),
                Matcher::parse("alertname=HighInputErrors").unwrap(),
            ],
            1000,
            Duration::from_secs(60),
            "me".into(),
            "maintenance".into(),
        )
        .unwrap();
        let set = Silences::new(vec![s.clone()]);
        assert_eq!(set.muting(&alert("core-1"), 2000), Some(s.id.as_str()));
        assert_eq!(set.muting(&alert("edge-1"), 2000), None);
        assert_eq!(set.muting(&alert("core-1"), 61_000), None, "ended");
        assert_eq!(set.muting(&alert("xcore-1"), 2000), None, "anchored");
    }

    #[test]
    fn empty_silences_are_refused() {
        assert!(
            Silence::new(
                vec![],
                0,
                Duration::from_secs(1),
                String::new(),
                String::new()
            )
            .is_err()
        );
    }

    #[test]
    fn a_runtimes_silences_withhold_a_firing_until_they_end() {
        let policy = Policy {
            repeat_ms: 3_600_000,
            resolve_after_ms: 0,
            flap_max_changes: 0,
            flap_window_ms: 600_000,
        };
        let fire = |now_ms| Action {
            fp: 1,
            kind: ActionKind::Fire {
                for_ms: 0,
                resolve_after_ms: None,
            },
            alert: Some(alert("core-1")),
            now_ms,
        };
        let runtime = Runtime::new();
        let book = runtime.alert_book(policy);
        let s = Silence::new(
            vec![Matcher::parse("hostname=core-1").unwrap()],
            0,
            Duration::from_secs(60),
            "me".into(),
            "maintenance".into(),
        )
        .unwrap();
        runtime.silences.set(vec![s]);
        assert!(
            book.decide("s", &[fire(1000)], true)
                .notifications
                .is_empty()
        );
        let text = runtime.metrics.encode();
        assert!(
            text.contains("tripline_alerts_silenced_total{rule=\"packet_errors/alert\"} 1"),
            "{text}"
        );
        let released = book.due(61_000).notifications;
        assert_eq!(
            released.iter().map(|a| a.status).collect::<Vec<_>>(),
            [Status::Firing],
            "the silence ended: the withheld firing is sent"
        );
        let elsewhere = Runtime::new().alert_book(policy);
        assert_eq!(
            elsewhere
                .decide("s", &[fire(1000)], true)
                .notifications
                .len(),
            1,
            "another runtime has no silence"
        );
    }
}
