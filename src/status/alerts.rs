//! Pending and firing alerts, read from the shared alert state in Redis
//! (`keys::state_key` of every consumed stream), not from this instance's
//! cache: every instance of a group answers the same, and an alert raised by
//! another instance is listed once.
//!
//! The state hash holds `<version>|<json entry>` per fingerprint (see
//! `alert::book`); only the parts shown here are read, so fields the
//! lifecycle adds later do not break the listing.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::alert::Alert;
use crate::alert::AlertBook;
use crate::alert::silence::{Matcher, Silence, Silences};
use crate::clock::rfc3339;
use crate::keys::{gen_key, hash_tag, state_key};
use crate::redis_conn::{HashScan, RedisConn};

/// The parts of a stored lifecycle entry the listing needs.
#[derive(Debug, Deserialize)]
struct Stored {
    /// `pending`, `firing`, `watching` (a deadman whose series reports) or
    /// `resolved` (kept for flap detection); only the first two are alerts.
    phase: String,
    /// When the condition started holding (pending) or the alert fired.
    since: u64,
    /// Last notification sent; 0 = none yet.
    #[serde(default)]
    notified: u64,
    alert: Alert,
}

/// What the gauge counts an entry by, borrowed from its JSON: the gauge
/// counts every alert every few seconds, and decoding every label and
/// annotation of each (and every deadman watch, only to drop it) was a
/// burst of CPU taken from judging each time.
#[derive(Debug, Deserialize)]
struct Counted<'a> {
    #[serde(borrow)]
    phase: Cow<'a, str>,
    #[serde(borrow)]
    alert: CountedAlert<'a>,
}

#[derive(Debug, Deserialize)]
struct CountedAlert<'a> {
    #[serde(borrow)]
    rule: Cow<'a, str>,
    severity: crate::alert::Severity,
}

/// One pending or firing alert as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AlertView {
    /// The alert's `name` (`alertname` to Alertmanager).
    pub name: String,
    /// The rule (path under `rules/` without `.rhai`) that raised it.
    pub rule: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub severity: &'static str,
    /// `pending` (its `for` has not elapsed) or `firing`.
    pub state: &'static str,
    /// RFC 3339: since when it is pending, or since when it fires.
    pub active_since: String,
    /// RFC 3339 of the last notification sent to the sinks; `None` while
    /// pending, or while a silence withheld every one.
    pub last_notification: Option<String>,
    /// The observed value, when the rule gave one as the `value` annotation.
    pub value: Option<String>,
    /// Hex identity of rule + name + labels.
    pub fingerprint: String,
    /// Ids of the active silences that mute it.
    pub silenced_by: Vec<String>,
    /// The stream whose message raised it.
    pub stream: String,
}

impl AlertView {
    /// The alert as the sinks see it, for matching with the silences'
    /// matchers and for Alertmanager's labels.
    pub fn subject(&self) -> Alert {
        Alert {
            fingerprint: self.fingerprint.clone(),
            rule: self.rule.clone(),
            name: self.name.clone(),
            severity: crate::alert::Severity::parse(self.severity).unwrap_or_default(),
            status: crate::alert::Status::Firing,
            labels: self.labels.clone(),
            annotations: self.annotations.clone(),
            starts_at: String::new(),
            ends_at: None,
            origin: Default::default(),
        }
    }
}

/// Decodes one state hash value; `None` for an entry that is not a pending
/// or firing alert, or that another version of tripline wrote.
fn decode(raw: &str) -> Option<AlertView> {
    let (_version, json) = raw.split_once('|')?;
    let s: Stored = serde_json::from_str(json).ok()?;
    let state = match s.phase.as_str() {
        "pending" => "pending",
        "firing" => "firing",
        _ => return None,
    };
    let a = s.alert;
    Some(AlertView {
        value: a.annotations.get("value").cloned(),
        name: a.name,
        rule: a.rule,
        labels: a.labels,
        annotations: a.annotations,
        severity: a.severity.as_str(),
        state,
        active_since: rfc3339(s.since),
        last_notification: (state == "firing" && s.notified > 0).then(|| rfc3339(s.notified)),
        fingerprint: a.fingerprint,
        silenced_by: Vec::new(),
        stream: a.origin.stream,
    })
}

/// The key `count` counts one state hash value by, if it is a pending or
/// firing alert.
fn decode_count(raw: &str) -> Option<CountKey> {
    let (_version, json) = raw.split_once('|')?;
    count_key(json)
}

/// [`decode_count`] of an entry's JSON (a value without its version).
fn count_key(json: &str) -> Option<CountKey> {
    // The phase is the entry's first field: a watch or a resolved entry
    // (half the state of a deadman rule) is dropped without parsing.
    if let Some(rest) = json.strip_prefix(r#"{"phase":""#)
        && !rest.starts_with("pending\"")
        && !rest.starts_with("firing\"")
    {
        return None;
    }
    let c: Counted = serde_json::from_str(json).ok()?;
    let state = match &*c.phase {
        "pending" => "pending",
        "firing" => "firing",
        _ => return None,
    };
    Some((state, c.alert.severity.as_str(), c.alert.rule.into_owned()))
}

/// Every pending and firing alert raised from `streams`, firing first, then
/// by name and labels. Streams sharing a hash tag share one state hash,
/// read once.
pub async fn read(conn: &mut RedisConn, streams: &[String]) -> redis::RedisResult<Vec<AlertView>> {
    let mut out = Vec::new();
    scan(conn, streams, decode, |views| out.extend(views)).await?;
    out.sort_by(|a, b| {
        (a.state, &a.name, &a.labels, &a.rule).cmp(&(b.state, &b.name, &b.labels, &b.rule))
    });
    Ok(out)
}

/// Counts by (state, severity, rule) of the pending and firing alerts of
/// `streams`, for the `tripline_alerts_active` gauge: from `book` for a
/// partition it holds as Redis does (at the generation Redis holds now),
/// read from Redis otherwise.
pub async fn count(
    conn: &mut RedisConn,
    streams: &[String],
    book: Option<&AlertBook>,
) -> redis::RedisResult<Counts> {
    let mut counts = Counts::new();
    let mut add = |keys: Vec<CountKey>| {
        for key in keys {
            *counts.entry(key).or_insert(0) += 1;
        }
    };
    let mut partitions: Vec<&String> = streams.iter().collect();
    partitions.sort_by_key(|s| state_key(s));
    partitions.dedup_by_key(|s| state_key(s));
    for stream in partitions {
        let cached = match book {
            Some(book) => {
                let generation: Option<u64> = redis::cmd("GET")
                    .arg(gen_key(stream))
                    .query_async(conn)
                    .await?;
                book.active(hash_tag(stream), generation.unwrap_or(0))
            }
            None => None,
        };
        match cached {
            Some(entries) => add(tokio::task::spawn_blocking(move || {
                entries.iter().filter_map(|j| count_key(j)).collect()
            })
            .await
            .unwrap_or_default()),
            None => scan(conn, std::slice::from_ref(stream), decode_count, &mut add).await?,
        }
    }
    Ok(counts)
}

/// Hands `each` the values of the state hashes of `streams` that `decode`
/// keeps, a page of [`HashScan`] at a time, each page decoded on a
/// blocking thread: decoding the whole state at once (a deadman watch per
/// router) stalled a reactor thread and doubled the process's peak memory.
async fn scan<T: Send + 'static>(
    conn: &mut RedisConn,
    streams: &[String],
    decode: fn(&str) -> Option<T>,
    mut each: impl FnMut(Vec<T>),
) -> redis::RedisResult<()> {
    let mut keys: Vec<String> = streams.iter().map(|s| state_key(s)).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        // A field may come twice (while the hash grows).
        let mut seen: HashSet<String> = HashSet::new();
        let mut scan = HashScan::new(&key);
        while let Some(page) = scan.next(conn).await? {
            let fresh: Vec<String> = page
                .into_iter()
                .filter_map(|(field, raw)| seen.insert(field).then_some(raw))
                .collect();
            let views = tokio::task::spawn_blocking(move || {
                fresh.iter().filter_map(|r| decode(r)).collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            each(views);
        }
    }
    Ok(())
}

/// What the gauge counts alerts by: state, severity, rule.
type CountKey = (&'static str, &'static str, String);

/// Alerts by (state, severity, rule).
pub type Counts = BTreeMap<CountKey, i64>;

/// Label matchers in the silences' syntax (`label=value`, `label=~regex`;
/// `alertname`, `severity` and `rule` match the alert's own fields).
pub struct Filter(Option<Silences>);

impl Filter {
    /// Parses every matcher; the error names the bad one.
    pub fn parse<S: AsRef<str>>(texts: &[S]) -> Result<Filter, String> {
        let matchers = texts
            .iter()
            .map(|t| Matcher::parse(t.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Filter::of(matchers))
    }

    /// An always-active silence made of the matchers matches exactly what
    /// they select: the filter and the silences can never disagree.
    pub fn of(matchers: Vec<Matcher>) -> Filter {
        if matchers.is_empty() {
            return Filter(None);
        }
        Filter(Some(Silences::new(vec![Silence {
            id: String::new(),
            matchers,
            starts_ms: 0,
            ends_ms: u64::MAX,
            created_by: String::new(),
            comment: String::new(),
        }])))
    }

    /// No matchers select everything.
    pub fn matches(&self, a: &AlertView) -> bool {
        self.0
            .as_ref()
            .is_none_or(|s| s.muting(&a.subject(), 1).is_some())
    }
}

/// Notes on each alert the active silences (at `now_ms`) that mute it.
pub fn mark_silenced(alerts: &mut [AlertView], silences: &[Silence], now_ms: u64) {
    let each: Vec<Silences> = silences
        .iter()
        .map(|s| Silences::new(vec![s.clone()]))
        .collect();
    for a in alerts {
        let subject = a.subject();
        a.silenced_by = each
            .iter()
            .filter_map(|s| s.muting(&subject, now_ms).map(str::to_string))
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::{Action, ActionKind, Origin, Policy, Severity, Status};

    /// The state as `alert::book` writes it, read back here: a change of
    /// that encoding fails this test instead of emptying the listing.
    fn written(for_ms: u64, now: u64) -> String {
        let book = crate::runtime::Runtime::new().alert_book(Policy {
            repeat_ms: 3_600_000,
            resolve_after_ms: 0,
            flap_max_changes: 0,
            flap_window_ms: 600_000,
        });
        let alert = Alert {
            fingerprint: "00000000000000aa".into(),
            rule: "packet_errors/alert".into(),
            name: "HighInputErrors".into(),
            severity: Severity::Major,
            status: Status::Firing,
            labels: [("hostname".to_string(), "core-1".to_string())].into(),
            annotations: [("value".to_string(), "12000".to_string())].into(),
            starts_at: String::new(),
            ends_at: None,
            origin: Origin {
                stream: "s".into(),
                ..Origin::default()
            },
        };
        let action = Action {
            fp: 0xaa,
            kind: ActionKind::Fire {
                for_ms,
                resolve_after_ms: None,
            },
            alert: Some(alert),
            now_ms: now,
        };
        let d = book.decide("s", &[action], false);
        d.writes[0]
            .value
            .clone()
            .expect("a firing alert is written")
    }

    #[test]
    fn alert_state_written_by_the_book_reads_as_firing_or_pending() {
        let firing = decode(&written(0, 1_700_000_000_000)).expect("decodes");
        assert_eq!(firing.state, "firing");
        assert_eq!(firing.active_since, "2023-11-14T22:13:20.000Z");
        assert_eq!(
            firing.last_notification.as_deref(),
            Some("2023-11-14T22:13:20.000Z")
        );
        assert_eq!(firing.value.as_deref(), Some("12000"));
        assert_eq!(
            (firing.stream.as_str(), firing.fingerprint.as_str()),
            ("s", "00000000000000aa")
        );
        let pending = decode(&written(60_000, 1_700_000_000_000)).expect("decodes");
        assert_eq!(
            (pending.state, pending.last_notification),
            ("pending", None)
        );
        assert!(decode("3|not json").is_none());
    }

    /// More alerts than one HSCAN page holds, of two states and rules: the
    /// gauge counts each once, page after page.
    #[tokio::test]
    async fn the_gauge_counts_every_alert_across_scan_pages() {
        let redis = crate::test_redis::TestRedis::start();
        let mut con = redis.conn();
        let key = state_key("s");
        let mut pipe = redis::pipe();
        for i in 0..2500_u64 {
            let raw = written(if i % 5 == 0 { 60_000 } else { 0 }, 1_700_000_000_000);
            let raw = if i % 2 == 0 {
                raw
            } else {
                raw.replace("packet_errors/alert", "other/rule")
            };
            pipe.hset(&key, format!("{i:016x}"), raw).ignore();
        }
        pipe.hset(&key, "not-ours", "3|not json").ignore();
        let () = pipe.query(&mut con).unwrap();
        let mut conn = redis
            .target()
            .connect(std::time::Duration::from_secs(5))
            .await
            .unwrap();
        let counts = count(&mut conn, &["s".to_string()], None).await.unwrap();
        let got = |state, rule: &str| counts[&(state, "major", rule.to_string())];
        assert_eq!(got("firing", "packet_errors/alert"), 1000);
        assert_eq!(got("pending", "packet_errors/alert"), 250);
        assert_eq!(got("firing", "other/rule"), 1000);
        assert_eq!(got("pending", "other/rule"), 250);
        assert_eq!(counts.values().sum::<i64>(), 2500);
    }

    #[test]
    fn the_gauge_counts_by_what_the_listing_shows() {
        for raw in [
            written(0, 1_700_000_000_000),
            written(60_000, 1_700_000_000_000),
        ] {
            let v = decode(&raw).unwrap();
            assert_eq!(decode_count(&raw), Some((v.state, v.severity, v.rule)));
        }
        let firing = written(0, 1_700_000_000_000);
        assert!(firing.contains(r#"|{"phase":"firing""#), "{firing}");
        for phase in ["watching", "resolved"] {
            let raw = firing.replace(r#""phase":"firing""#, &format!(r#""phase":"{phase}""#));
            assert_eq!(decode(&raw), None);
            assert_eq!(decode_count(&raw), None);
        }
        assert_eq!(decode_count("3|not json"), None);
        assert_eq!(decode_count("no version"), None);
    }

    #[test]
    fn filters_use_the_silences_matchers() {
        let a = decode(&written(0, 1)).unwrap();
        assert!(Filter::parse::<&str>(&[]).unwrap().matches(&a));
        assert!(
            Filter::parse(&["hostname=~core-.*", "alertname=HighInputErrors"])
                .unwrap()
                .matches(&a)
        );
        assert!(!Filter::parse(&["severity=critical"]).unwrap().matches(&a));
        assert!(Filter::parse(&["nolabel"]).is_err());
    }
}
