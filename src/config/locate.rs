//! The line a node of a YAML document is on, for error messages: a setting
//! of the config file, a case or step of a `*.test.yaml` rule test. The YAML
//! parser knows where every node starts but hands that out only with an
//! error, so a probe walks the document down one path and fails on purpose
//! at the key (or sequence item) it looks for: the error's location is its
//! line. Flow style (`- {name: a, batch_size: 0}`) is handled by the parser
//! itself.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// One step into the document: a mapping key or a sequence item.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Seg<'a> {
    /// A mapping key.
    Key(&'a str),
    /// A sequence item, from 0.
    Item(usize),
}

/// The error text the probe fails with on reaching its node; anything else
/// (a type mismatch on the way) means the path is not in the document.
const FOUND: &str = "tripline: the node looked for";

/// The 1-based line of the node at `path` in `text`, or of its nearest
/// ancestor present there (a default that is wrong is reported where its
/// section starts); `None` when not even the first key is in the file.
pub fn line_of(text: &str, path: &[Seg]) -> Option<usize> {
    (1..=path.len())
        .rev()
        .find_map(|n| probe(text, &path[..n], true))
}

/// The 1-based line where the node at `path` itself starts (for a key, its
/// value: a test step's `payload:` block is placed where the payload is),
/// if the path exists.
pub fn node_line(text: &str, path: &[Seg]) -> Option<usize> {
    probe(text, path, false)
}

/// `at_key`: a path ending in a key is found at the key, not its value.
fn probe(text: &str, path: &[Seg], at_key: bool) -> Option<usize> {
    let de = serde_yaml::Deserializer::from_str(text);
    match (Probe { path, at_key }).deserialize(de) {
        Err(e) if e.to_string().contains(FOUND) => e.location().map(|l| l.line()),
        _ => None,
    }
}

/// Walks to the node at `path`; `Ok` when it is not there.
struct Probe<'p, 'a> {
    /// What is left of the path below the node being read.
    path: &'p [Seg<'a>],
    /// Whether a last key fails at itself rather than at its value.
    at_key: bool,
}

impl<'de> DeserializeSeed<'de> for Probe<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Probe<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((Seg::Key(want), rest)) = self.path.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        let last = rest.is_empty() && self.at_key;
        while let Some(is_it) = map.next_key_seed(KeyProbe { want, last })? {
            if is_it {
                return map.next_value_seed(Probe {
                    path: rest,
                    at_key: self.at_key,
                });
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((Seg::Item(want), rest)) = self.path.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        for _ in 0..*want {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        seq.next_element_seed(Probe {
            path: rest,
            at_key: self.at_key,
        })
        .map(|_| ())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.scalar()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.scalar()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }
}

/// A mapping key: whether it is `want`; fails on purpose when it is and
/// the path ends with it, so a setting is placed on its key's line (for a
/// section, where its name is written, not where its first child is).
struct KeyProbe<'p> {
    want: &'p str,
    last: bool,
}

impl<'de> DeserializeSeed<'de> for KeyProbe<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyProbe<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        match key == self.want {
            true if self.last => Err(E::custom(FOUND)),
            is_it => Ok(is_it),
        }
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
}

impl Probe<'_, '_> {
    /// A scalar is the node when the path ends here; it has no children.
    fn scalar<E: de::Error>(self) -> Result<(), E> {
        if self.path.is_empty() {
            Err(E::custom(FOUND))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Seg::{Item, Key};
    use super::*;

    const TEXT: &str = "\
# a comment
redis:
  url: \"h:1\"
subscriptions:
  - name: a
    streams: [s]

    batch_size: 0
  - {name: b, streams: [t], block: 0s}
http:
  gateway:
    token: \"\"
";

    #[test]
    fn block_and_flow_nodes_have_their_lines() {
        assert_eq!(line_of(TEXT, &[Key("redis"), Key("url")]), Some(3));
        let sub = |i, k| [Key("subscriptions"), Item(i), Key(k)];
        assert_eq!(line_of(TEXT, &sub(0, "batch_size")), Some(8));
        assert_eq!(line_of(TEXT, &sub(0, "name")), Some(5));
        assert_eq!(line_of(TEXT, &sub(1, "block")), Some(9));
        assert_eq!(
            line_of(TEXT, &[Key("http"), Key("gateway"), Key("token")]),
            Some(12)
        );
    }

    #[test]
    fn an_absent_key_is_reported_at_its_section() {
        assert_eq!(line_of(TEXT, &[Key("redis"), Key("cluster")]), Some(2));
        assert_eq!(
            line_of(
                TEXT,
                &[Key("subscriptions"), Item(0), Key("claim_interval")]
            ),
            Some(5)
        );
        assert_eq!(line_of(TEXT, &[Key("limits"), Key("max_map_size")]), None);
        assert_eq!(line_of("", &[Key("limits")]), None);
    }

    const DOC: &str = "\
rules: [a.rhai]
tests:
  - name: first
    steps:
      - payload: {x: 1}
      - at: +30s
        payload:
          x: 2
  - name: second
    steps: [{payload: {x: 3}}]
";

    #[test]
    fn finds_mappings_sequences_and_scalars() {
        assert_eq!(node_line(DOC, &[]), Some(1));
        assert_eq!(node_line(DOC, &[Key("tests"), Item(0)]), Some(3));
        assert_eq!(node_line(DOC, &[Key("tests"), Item(1)]), Some(9));
        assert_eq!(
            node_line(DOC, &[Key("tests"), Item(0), Key("steps"), Item(1)]),
            Some(6)
        );
        assert_eq!(
            node_line(
                DOC,
                &[Key("tests"), Item(0), Key("steps"), Item(1), Key("at")]
            ),
            Some(6)
        );
        assert_eq!(
            node_line(
                DOC,
                &[Key("tests"), Item(0), Key("steps"), Item(1), Key("payload")]
            ),
            Some(8)
        );
        assert_eq!(
            node_line(DOC, &[Key("tests"), Item(1), Key("steps"), Item(0)]),
            Some(10)
        );
    }

    #[test]
    fn missing_paths_have_no_line() {
        assert_eq!(node_line(DOC, &[Key("nope")]), None);
        assert_eq!(node_line(DOC, &[Key("tests"), Item(5)]), None);
        assert_eq!(node_line(DOC, &[Key("rules"), Item(0), Key("x")]), None);
        assert_eq!(node_line("a: [1,\n: ]\nb: 2\n", &[Key("b")]), None);
    }
}
