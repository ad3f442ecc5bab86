//! The alert hand-off: alerts raised by a batch are appended to the outbox in
//! the same MULTI/EXEC as the XACK of the entries that raised them, together
//! with any dead-letters. A crash therefore loses neither: either the entries
//! are still pending (and will be judged again) or their alerts are queued.
//!
//! Keys are Redis Cluster-safe: everything in one MULTI hashes to the source
//! stream's slot.

use redis::aio::MultiplexedConnection;
use redis::{RedisError, Value};

use crate::alert::Alert;

/// The part of a key Redis Cluster hashes: the first non-empty `{…}`, else
/// the whole key.
pub fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{')
        && let Some(len) = key[open + 1..].find('}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

/// Outbox of `stream`: `<prefix>:{<hash tag of stream>}`.
pub fn outbox_key(prefix: &str, stream: &str) -> String {
    format!("{prefix}:{{{}}}", hash_tag(stream))
}

/// Dead-letter stream of `stream`. A stream without a hash tag keeps the
/// plain `<stream>:dead`, which hashes elsewhere on Cluster; sharded streams
/// (`S:{n}`) carry their tag along and stay in one slot.
pub fn dead_key(stream: &str) -> String {
    format!("{stream}:dead")
}

/// Field of an outbox entry that holds the alert as JSON.
pub const ALERT_FIELD: &str = "alert";

/// An entry that goes to the dead-letter stream instead of the rules.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    pub reason: String,
}

/// Everything one batch settles for one stream.
#[derive(Debug, Default)]
pub struct Settlement {
    pub acks: Vec<String>,
    pub alerts: Vec<Alert>,
    pub dead: Vec<DeadLetter>,
}

/// Writes alerts and dead-letters and acknowledges, atomically.
pub async fn commit(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
    outbox_prefix: &str,
    outbox_max_len: u64,
    s: &Settlement,
) -> Result<(), RedisError> {
    if s.acks.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    pipe.atomic();
    if !s.alerts.is_empty() {
        let outbox = outbox_key(outbox_prefix, stream);
        for alert in &s.alerts {
            pipe.add_command(xadd_alert(&outbox, outbox_max_len, alert))
                .ignore();
        }
    }
    if !s.dead.is_empty() {
        let dead = dead_key(stream);
        for d in &s.dead {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&dead)
                .arg("*")
                .arg("tripline_source_stream")
                .arg(stream)
                .arg("tripline_source_id")
                .arg(&d.id)
                .arg("tripline_group")
                .arg(group)
                .arg("tripline_reason")
                .arg(&d.reason);
            for (k, v) in &d.fields {
                cmd.arg(k.as_slice()).arg(v.as_slice());
            }
            pipe.add_command(cmd).ignore();
        }
    }
    pipe.cmd("XACK")
        .arg(stream)
        .arg(group)
        .arg(&s.acks)
        .ignore();
    let _: Value = pipe.query_async(conn).await?;
    Ok(())
}

fn xadd_alert(outbox: &str, max_len: u64, alert: &Alert) -> redis::Cmd {
    let json = serde_json::to_string(alert).expect("alerts always serialize");
    let mut cmd = redis::cmd("XADD");
    cmd.arg(outbox)
        .arg("MAXLEN")
        .arg("~")
        .arg(max_len)
        .arg("*")
        .arg(ALERT_FIELD)
        .arg(json);
    cmd
}

/// Appends notifications that no stream entry raised (the resolves of a
/// rule a reload removed), each to the outbox of its origin stream. Not one
/// MULTI: the outboxes may live in different Cluster slots.
pub async fn append(
    conn: &mut MultiplexedConnection,
    outbox_prefix: &str,
    outbox_max_len: u64,
    alerts: &[Alert],
) -> Result<(), RedisError> {
    let mut pipe = redis::pipe();
    for alert in alerts {
        let outbox = outbox_key(outbox_prefix, &alert.origin.stream);
        pipe.add_command(xadd_alert(&outbox, outbox_max_len, alert))
            .ignore();
    }
    let _: Value = pipe.query_async(conn).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_stream_slot() {
        assert_eq!(hash_tag("plain"), "plain");
        assert_eq!(hash_tag("S:{3}"), "3");
        assert_eq!(hash_tag("a{}b"), "a{}b");
        assert_eq!(
            outbox_key("tripline:alerts", "plain"),
            "tripline:alerts:{plain}"
        );
        assert_eq!(
            outbox_key("tripline:alerts", "S:{3}"),
            "tripline:alerts:{3}"
        );
        assert_eq!(hash_tag(&dead_key("S:{3}")), "3");
    }
}
