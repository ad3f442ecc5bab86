//! Line numbers of nodes in a YAML document that has already parsed.
//!
//! The YAML crate reports positions only in errors, and it stamps an error
//! with the position of the innermost node being read when the error was
//! raised. So to learn where `tests[2].steps[0]` starts, the document is read
//! again with a seed that walks down that path and fails on arrival: the
//! failure carries the line. Only failing tests need a line, so this runs
//! rarely and on small files.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// One step of a path into the document.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Seg<'a> {
    /// A mapping key.
    Key(&'a str),
    /// A sequence index, from 0.
    Index(usize),
}

/// Raised on arrival at the target node; no real error text contains it.
const ARRIVED: &str = "\u{0}tripline-locate-arrived\u{0}";

/// The 1-based line where the node at `path` starts, if the path exists.
pub fn line_of(text: &str, path: &[Seg]) -> Option<usize> {
    let de = serde_yaml::Deserializer::from_str(text);
    match (Probe { path }).deserialize(de) {
        Err(e) if e.to_string().contains(ARRIVED) => e.location().map(|l| l.line()),
        _ => None,
    }
}

struct Probe<'p, 'a> {
    /// What is left of the path below the node being read.
    path: &'p [Seg<'a>],
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
        let Some((first, rest)) = self.path.split_first() else {
            return Err(de::Error::custom(ARRIVED));
        };
        while let Some(key) = map.next_key::<serde_yaml::Value>()? {
            if matches!(first, Seg::Key(k) if key.as_str() == Some(k)) {
                return map.next_value_seed(Probe { path: rest });
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.path.split_first() else {
            return Err(de::Error::custom(ARRIVED));
        };
        let mut index = 0;
        loop {
            if *first == Seg::Index(index) {
                return seq.next_element_seed(Probe { path: rest }).map(drop);
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            index += 1;
        }
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
}

impl Probe<'_, '_> {
    /// A scalar is the target or a dead end.
    fn scalar<E: de::Error>(&self) -> Result<(), E> {
        if self.path.is_empty() {
            Err(E::custom(ARRIVED))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        use Seg::*;
        assert_eq!(line_of(DOC, &[]), Some(1));
        assert_eq!(line_of(DOC, &[Key("tests"), Index(0)]), Some(3));
        assert_eq!(line_of(DOC, &[Key("tests"), Index(1)]), Some(9));
        assert_eq!(
            line_of(DOC, &[Key("tests"), Index(0), Key("steps"), Index(1)]),
            Some(6)
        );
        assert_eq!(
            line_of(
                DOC,
                &[Key("tests"), Index(0), Key("steps"), Index(1), Key("at")]
            ),
            Some(6)
        );
        assert_eq!(
            line_of(
                DOC,
                &[
                    Key("tests"),
                    Index(0),
                    Key("steps"),
                    Index(1),
                    Key("payload")
                ]
            ),
            Some(8)
        );
        assert_eq!(
            line_of(DOC, &[Key("tests"), Index(1), Key("steps"), Index(0)]),
            Some(10)
        );
    }

    #[test]
    fn missing_paths_have_no_line() {
        use Seg::*;
        assert_eq!(line_of(DOC, &[Key("nope")]), None);
        assert_eq!(line_of(DOC, &[Key("tests"), Index(5)]), None);
        assert_eq!(line_of(DOC, &[Key("rules"), Index(0), Key("x")]), None);
        assert_eq!(line_of("a: [1,\n: ]\nb: 2\n", &[Key("b")]), None);
    }
}
