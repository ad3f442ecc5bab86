//! Every Redis key tripline uses, in one place; the README's key table
//! (section "Delivery guarantees and Redis keys") lists the same.
//!
//! Keys written in one atomic step with a stream's XACK carry the stream's
//! hash tag, so on Redis Cluster they live in the stream's slot: the tag of
//! `S` is `S` itself, the tag of a shard `S:{3}` is `3`.
//!
//! | key | function |
//! |---|---|
//! | `<stream>` | the input, named in the config |
//! | `<stream>:dead` | [`dead_key`] |
//! | `<prefix>:{<tag>}` (prefix `tripline:alerts` by default) | [`outbox_key`] |
//! | `<outbox>:dead:<sink>` | [`sink_dead_key`] |
//! | `tripline:state:{<tag>}` | [`state_key`] |
//! | `tripline:state:{<tag>}:gen` | [`gen_key`] |
//! | `tripline:marker:{<tag>}` | [`marker_key`] |
//! | `tripline:silences` | [`SILENCES`] |
//! | `tripline:instance:<name>` | [`instance_key`] |

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

/// Field of an outbox entry that holds the alert as JSON (the commit script
/// in `alert::store` writes it by name too).
pub const ALERT_FIELD: &str = "alert";

/// Dead-letter stream of `stream`: `<stream>:dead`, in the stream's slot
/// when the stream has a hash tag (`S:{3}:dead`). On Cluster, a stream
/// without one gets `{<stream>}:dead` instead, so the dead letters can be
/// written in the same script run as the XACK; a single server keeps the
/// seed's `<stream>:dead`.
pub fn dead_key(stream: &str, cluster: bool) -> String {
    if cluster && hash_tag(stream) == stream {
        format!("{{{stream}}}:dead")
    } else {
        format!("{stream}:dead")
    }
}

/// Dead-letter stream of sink `sink` for the alerts of `outbox` it gave up
/// on: in the outbox's slot.
pub fn sink_dead_key(outbox: &str, sink: &str) -> String {
    format!("{outbox}:dead:{sink}")
}

/// Hash holding the alert lifecycle state of alerts raised from `stream`
/// (see `alert::book`), in the stream's slot.
pub fn state_key(stream: &str) -> String {
    format!("tripline:state:{{{}}}", hash_tag(stream))
}

/// Generation counter of the alert state of `stream` (see `alert::book`):
/// bumped by every commit that writes the state, in the stream's slot.
pub fn gen_key(stream: &str) -> String {
    format!("tripline:state:{{{}}}:gen", hash_tag(stream))
}

/// Marker of `stream`'s hash tag (see `redis_conn::StateMarkers`): exists
/// as long as Redis keeps the alert state and outbox of that tag, in their
/// slot.
pub fn marker_key(stream: &str) -> String {
    format!("tripline:marker:{{{}}}", hash_tag(stream))
}

/// The hash of all silences (see `alert::silence`): one key outside any
/// tag, since every instance and every stream shares them.
pub const SILENCES: &str = "tripline:silences";

/// The lease key of instance `name` (see `instance::lease`); it exists while
/// that instance lives.
pub fn instance_key(name: &str) -> String {
    format!("tripline:instance:{name}")
}

/// Start of every sink's consumer group name.
pub const SINK_GROUP_PREFIX: &str = "tripline-sink:";

/// The consumer group sink `sink` reads the outboxes with.
pub fn sink_group(sink: &str) -> String {
    format!("{SINK_GROUP_PREFIX}{sink}")
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
        for cluster in [false, true] {
            assert_eq!(dead_key("S:{3}", cluster), "S:{3}:dead");
        }
        assert_eq!(dead_key("plain", false), "plain:dead");
        assert_eq!(dead_key("plain", true), "{plain}:dead");
        assert_eq!(hash_tag(&dead_key("plain", true)), hash_tag("plain"));
        let outbox = outbox_key("tripline:alerts", "S:{3}");
        assert_eq!(hash_tag(&sink_dead_key(&outbox, "hook")), "3");
        for key in [state_key("S:{3}"), gen_key("S:{3}"), marker_key("S:{3}")] {
            assert_eq!(hash_tag(&key), "3", "{key}");
        }
    }
}
