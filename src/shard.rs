//! Sharded topics: one logical topic `S` spread over the streams `S:{0}` …
//! `S:{n-1}`, so that Redis Cluster places them on different nodes and
//! several instances read them in parallel. A subscription lists the topic
//! with its shard count and reads every shard; publishers (the gateway,
//! `tripline simulate`, your collectors) pick a reading's shard from its
//! device name, so one device's readings stay in order on one shard.

/// Stream `i` of a sharded topic: `topic:{i}`. The braces make `i` the hash
/// tag, so the shard's outbox and state keys share its slot.
pub fn shard_stream(topic: &str, i: u32) -> String {
    format!("{topic}:{{{i}}}")
}

/// Every stream of `topic` split over `shards` shards.
pub fn shard_streams(topic: &str, shards: u32) -> Vec<String> {
    (0..shards).map(|i| shard_stream(topic, i)).collect()
}

/// The topic a stream belongs to: `S` for a shard `S:{n}`, else the stream
/// itself. A rule's `TOPICS` may name either.
pub fn topic_of(stream: &str) -> &str {
    if let Some(body) = stream.strip_suffix('}')
        && let Some((topic, n)) = body.rsplit_once(":{")
        && !n.is_empty()
        && n.bytes().all(|b| b.is_ascii_digit())
    {
        return topic;
    }
    stream
}

/// The shard of `key` (a device's host name): 32-bit FNV-1a of its bytes,
/// modulo `shards`. Stable across versions and easy to reproduce in other
/// languages (Go: `hash/fnv.New32a`).
pub fn shard_for(key: &str, shards: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % shards.max(1)
}

/// The stream a reading from `key` goes to: `topic` itself when it is not
/// sharded (`shards` ≤ 1), else its shard.
pub fn stream_for(topic: &str, shards: u32, key: &str) -> String {
    if shards <= 1 {
        topic.to_string()
    } else {
        shard_stream(topic, shard_for(key, shards))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_round_trip_to_their_topic() {
        assert_eq!(shard_streams("t", 3), ["t:{0}", "t:{1}", "t:{2}"]);
        assert_eq!(topic_of("t:{12}"), "t");
        assert_eq!(topic_of("t"), "t");
        assert_eq!(topic_of("t:{x}"), "t:{x}");
        assert_eq!(topic_of("t:{}"), "t:{}");
        assert_eq!(crate::keys::hash_tag(&shard_stream("t", 7)), "7");
    }

    #[test]
    fn device_shard_is_stable_and_spread() {
        // FNV-1a 32 test vectors: "" → 0x811c9dc5, "a" → 0xe40c292c.
        assert_eq!(shard_for("", u32::MAX), 0x811c_9dc5);
        assert_eq!(shard_for("a", u32::MAX), 0xe40c_292c);
        assert_eq!(stream_for("t", 1, "core-1"), "t");
        assert_eq!(stream_for("t", 8, "core-1"), stream_for("t", 8, "core-1"));
        let used: std::collections::HashSet<u32> = (0..64)
            .map(|d| shard_for(&format!("router-{d:02}"), 8))
            .collect();
        assert_eq!(used.len(), 8, "64 devices cover all 8 shards");
    }
}
