//! How an alert's lifecycle entry is stored in Redis: in the partition's
//! hash (`keys::state_key`), field = the fingerprint in hex, value =
//! `<version>|<json entry>`. The version is what the commit's
//! compare-and-set checks (see `alert::store`).

use super::lifecycle::{Entry, Head};

/// An entry as cached: its head decoded, the whole kept as the JSON Redis
/// holds and decoded only for a transition. Every router has a deadman
/// watch: kept decoded, an entry (an alert with two small B-trees and a
/// dozen strings) takes about 2 KB; as JSON about 0.4 KB.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Stored {
    /// What deciding most assertions and finding due timers reads.
    pub(super) head: Head,
    /// The whole entry, as Redis holds it after the version.
    /// Shared: the `tripline_alerts_active` gauge counts from the cache
    /// ([`super::AlertBook::active`]), taking a reference to each
    /// under the book's lock instead of a copy.
    pub(super) json: std::sync::Arc<str>,
}

impl Stored {
    pub(super) fn of(e: &Entry) -> Stored {
        Stored {
            head: Head::of(e),
            json: serde_json::to_string(e).expect("entries serialize").into(),
        }
    }

    /// Reads what [`Stored::of`] or Redis (checked by [`decode`]) wrote.
    pub(super) fn entry(&self) -> Entry {
        serde_json::from_str(&self.json).expect("cached entries were decoded once already")
    }

    /// `<version>|<json>`, the value Redis holds.
    pub(super) fn encode(&self, version: u64) -> String {
        format!("{version}|{}", self.json)
    }
}

/// The hash field of fingerprint `fp`.
pub(super) fn field(fp: u64) -> String {
    format!("{fp:016x}")
}

/// The fingerprint a hash field names; `None` for a field tripline did not write.
pub(super) fn parse_field(f: &str) -> Option<u64> {
    u64::from_str_radix(f, 16).ok()
}

/// A stored value's version and entry; `None` when unreadable (a version
/// of tripline that wrote another format).
pub(super) fn decode(raw: &str) -> Option<(u64, Stored)> {
    let (v, json) = raw.split_once('|')?;
    let entry: Entry = serde_json::from_str(json).ok()?;
    let stored = Stored {
        head: Head::of(&entry),
        json: json.into(),
    };
    Some((v.parse().ok()?, stored))
}

#[cfg(test)]
mod tests {
    use super::super::lifecycle::tests::{fire, policy};
    use super::*;

    #[test]
    fn what_is_encoded_decodes_to_the_same_entry_and_version() {
        let (entry, _) = policy().step(None, &fire(0, 7), &Default::default());
        let stored = Stored::of(&entry.expect("firing"));
        let (version, back) = decode(&stored.encode(42)).expect("readable");
        assert_eq!(version, 42);
        assert_eq!(back, stored);
        assert_eq!(back.entry(), stored.entry());
    }

    #[test]
    fn values_of_another_format_are_unreadable() {
        for raw in [
            "",
            "7",
            "x|{}",
            "7|{}",
            "7|not json",
            "-1|{\"phase\":\"firing\"}",
        ] {
            assert!(decode(raw).is_none(), "{raw:?}");
        }
    }

    #[test]
    fn fields_are_fixed_width_hex() {
        assert_eq!(field(1), "0000000000000001");
        assert_eq!(parse_field(&field(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_field("not hex"), None);
    }
}
