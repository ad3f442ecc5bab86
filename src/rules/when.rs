//! `const WHEN = #{ … };`: which messages a rule is for, in a form the
//! engine reads at load and checks natively.
//!
//! Every call into Rhai costs about as much as a small rule's whole work, so
//! a rule that returns at once for most messages (one metric, one device
//! role, one site) still cost that much on every message. With a
//! declaration the engine skips it without calling it, and [`Index`] finds
//! the rules whose string equalities a message meets with a hash lookup,
//! without looking at the others: with hundreds of rules per subscription,
//! a message costs the rules that may match it. A declaration only ever skips: a rule that runs
//! still checks what it checks today, and a rule without one runs on every
//! message as before.

use std::collections::HashMap;

use rhai::{Dynamic, ImmutableString, Map};

/// The constant a rule declares its messages with.
pub const WHEN_CONST: &str = "WHEN";

/// One rule's declaration: a message is for the rule only if all of it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct When {
    /// Fields the message must have (any value but `()`): a rule that reads
    /// them without a default would fail on a message without them.
    fields: Vec<ImmutableString>,
    /// Field equal to a value: the device role, site or kind a rule is for.
    equals: Vec<(ImmutableString, Value)>,
    /// String field starting with a prefix: names that encode a hierarchy
    /// (`rtr-ams-…`).
    prefix: Vec<(ImmutableString, ImmutableString)>,
    /// Numeric field at or above a bound: a threshold rule that only acts
    /// above its threshold.
    min: Vec<(ImmutableString, Number)>,
    /// Numeric field at or below a bound.
    max: Vec<(ImmutableString, Number)>,
}

/// A value an `equals` entry compares with.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Str(ImmutableString),
    Number(Number),
    Bool(bool),
}

/// An integer stays an integer so that large counters compare exactly.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Number {
    Int(i64),
    Float(f64),
}

impl Number {
    fn of(v: &Dynamic) -> Option<Number> {
        if let Ok(i) = v.as_int() {
            Some(Number::Int(i))
        } else {
            v.as_float().ok().map(Number::Float)
        }
    }

    fn cmp(self, other: Number) -> Option<std::cmp::Ordering> {
        match (self, other) {
            (Number::Int(a), Number::Int(b)) => Some(a.cmp(&b)),
            (a, b) => a.float().partial_cmp(&b.float()),
        }
    }

    fn float(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::Float(f) => f,
        }
    }
}

impl std::fmt::Display for Number {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Number::Int(i) => write!(f, "{i}"),
            Number::Float(x) => write!(f, "{x:?}"),
        }
    }
}

impl When {
    /// Reads the value of a rule's `WHEN`; the error says which key or
    /// field is wrong and what was expected.
    pub fn parse(v: &Dynamic) -> Result<When, String> {
        let Some(map) = v.read_lock::<Map>() else {
            return Err(format!(
                "`{WHEN_CONST}` must be a map (#{{ fields: […], equals: #{{…}}, prefix: #{{…}}, min: #{{…}}, max: #{{…}} }}), not {}",
                v.type_name()
            ));
        };
        let mut when = When {
            fields: Vec::new(),
            equals: Vec::new(),
            prefix: Vec::new(),
            min: Vec::new(),
            max: Vec::new(),
        };
        for (key, value) in map.iter() {
            match key.as_str() {
                "fields" => {
                    let list = value
                        .clone()
                        .into_typed_array::<ImmutableString>()
                        .map_err(|_| {
                            format!("`{WHEN_CONST}.fields` must be an array of field names")
                        })?;
                    when.fields = list;
                }
                "equals" => {
                    when.equals = entries(value, key, |v| {
                        if let Ok(s) = v.as_immutable_string_ref() {
                            Some(Value::Str(s.clone()))
                        } else if let Ok(b) = v.as_bool() {
                            Some(Value::Bool(b))
                        } else {
                            Number::of(v).map(Value::Number)
                        }
                    })?;
                }
                "prefix" => {
                    when.prefix = entries(value, key, |v| {
                        v.as_immutable_string_ref().ok().map(|s| s.clone())
                    })?;
                }
                "min" => when.min = entries(value, key, Number::of)?,
                "max" => when.max = entries(value, key, Number::of)?,
                other => {
                    return Err(format!(
                        "`{WHEN_CONST}` has no key `{other}` (it takes fields, equals, prefix, min, max)"
                    ));
                }
            }
        }
        if when.fields.is_empty()
            && when.equals.is_empty()
            && when.prefix.is_empty()
            && when.min.is_empty()
            && when.max.is_empty()
        {
            return Err(format!(
                "`{WHEN_CONST}` declares nothing: remove it, or name what the rule's messages have"
            ));
        }
        Ok(when)
    }

    /// Whether `body` (the decoded message, as the rule would see it now)
    /// is for this rule. A message that is not a map has no fields.
    pub fn admits(&self, body: &Dynamic) -> bool {
        let Some(map) = body.read_lock::<Map>() else {
            return false;
        };
        let field = |name: &ImmutableString| map.get(name.as_str()).filter(|v| !v.is_unit());
        // Equalities first: they reject most messages.
        self.equals.iter().all(|(f, want)| {
            field(f).is_some_and(|v| match want {
                Value::Str(s) => v.as_immutable_string_ref().is_ok_and(|v| *v == *s),
                Value::Bool(b) => v.as_bool() == Ok(*b),
                Value::Number(n) => {
                    Number::of(v).and_then(|v| v.cmp(*n)) == Some(std::cmp::Ordering::Equal)
                }
            })
        }) && self.prefix.iter().all(|(f, p)| {
            field(f).is_some_and(|v| {
                v.as_immutable_string_ref()
                    .is_ok_and(|v| v.starts_with(p.as_str()))
            })
        }) && self.min.iter().all(|(f, b)| {
            field(f)
                .and_then(Number::of)
                .and_then(|v| v.cmp(*b))
                .is_some_and(std::cmp::Ordering::is_ge)
        }) && self.max.iter().all(|(f, b)| {
            field(f)
                .and_then(Number::of)
                .and_then(|v| v.cmp(*b))
                .is_some_and(std::cmp::Ordering::is_le)
        }) && self.fields.iter().all(|f| field(f).is_some())
    }

    /// The string equalities, which [`Index`] can look up.
    fn string_equals(&self) -> impl Iterator<Item = (&ImmutableString, &ImmutableString)> {
        self.equals.iter().filter_map(|(f, v)| match v {
            Value::Str(s) => Some((f, s)),
            _ => None,
        })
    }
}

/// For `tripline check`: the declaration as conditions, in the order
/// fields, equals, prefix, min, max (`site == "ams", errors >= 10000`).
impl std::fmt::Display for When {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> = self.fields.iter().map(|n| format!("has {n}")).collect();
        parts.extend(self.equals.iter().map(|(n, v)| match v {
            Value::Str(s) => format!("{n} == {:?}", s.as_str()),
            Value::Number(x) => format!("{n} == {x}"),
            Value::Bool(b) => format!("{n} == {b}"),
        }));
        parts.extend(
            self.prefix
                .iter()
                .map(|(n, p)| format!("{n} starts with {:?}", p.as_str())),
        );
        parts.extend(self.min.iter().map(|(n, b)| format!("{n} >= {b}")));
        parts.extend(self.max.iter().map(|(n, b)| format!("{n} <= {b}")));
        f.write_str(&parts.join(", "))
    }
}

/// The entries of a `#{ field: value }` map under `key`, each value read by
/// `read`.
fn entries<T>(
    value: &Dynamic,
    key: &str,
    read: impl Fn(&Dynamic) -> Option<T>,
) -> Result<Vec<(ImmutableString, T)>, String> {
    let what = match key {
        "equals" => "a string, number or bool",
        "prefix" => "a string",
        _ => "a number",
    };
    let Some(map) = value.read_lock::<Map>() else {
        return Err(format!(
            "`{WHEN_CONST}.{key}` must be a map of field names to {what}s"
        ));
    };
    map.iter()
        .map(|(field, v)| {
            read(v).map(|t| (field.as_str().into(), t)).ok_or_else(|| {
                format!(
                    "`{WHEN_CONST}.{key}.{field}` must be {what}, not {}",
                    v.type_name()
                )
            })
        })
        .collect()
}

/// The rules of a set that declare string equalities, looked up by the
/// message's values of those fields: a message costs one hash lookup per
/// distinct set of declared fields (site and role: one), not a check per
/// rule.
pub struct Index {
    /// Rules by the set of fields their string equalities name.
    groups: Vec<Group>,
    /// Rules without a string equality, ascending: candidates for every
    /// message.
    ungated: Vec<usize>,
    /// Seeds fixed per index, so that load and lookup hash alike.
    hasher: ahash::RandomState,
}

/// The rules whose string equalities name exactly `fields`.
struct Group {
    /// The fields, in name order.
    fields: Vec<ImmutableString>,
    /// Hash of the declared values (in `fields` order) → rules, ascending.
    /// A collision only adds candidates: each is checked in full before
    /// it runs.
    rules: HashMap<u64, Vec<usize>, ahash::RandomState>,
}

impl Index {
    pub fn build<'a>(whens: impl Iterator<Item = Option<&'a When>>) -> Index {
        let mut index = Index {
            groups: Vec::new(),
            ungated: Vec::new(),
            hasher: ahash::RandomState::with_seeds(1, 2, 3, 4),
        };
        for (i, w) in whens.enumerate() {
            let mut pairs: Vec<(&ImmutableString, &ImmutableString)> =
                w.map(|w| w.string_equals().collect()).unwrap_or_default();
            if pairs.is_empty() {
                index.ungated.push(i);
                continue;
            }
            pairs.sort();
            let key = index.hash(pairs.iter().map(|(_, v)| v.as_str()));
            let g = match index
                .groups
                .iter()
                .position(|g| g.fields.iter().eq(pairs.iter().map(|(f, _)| *f)))
            {
                Some(g) => g,
                None => {
                    index.groups.push(Group {
                        fields: pairs.iter().map(|(f, _)| (*f).clone()).collect(),
                        rules: HashMap::default(),
                    });
                    index.groups.len() - 1
                }
            };
            index.groups[g].rules.entry(key).or_default().push(i);
        }
        index
    }

    fn hash<'v>(&self, values: impl Iterator<Item = &'v str>) -> u64 {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = self.hasher.build_hasher();
        for v in values {
            v.hash(&mut h);
        }
        h.finish()
    }

    /// The message's key in each group: the hash of its values of the
    /// group's fields, `None` where one is missing or not a string. Empty
    /// when no rule declares a string equality.
    pub fn keys(&self, body: &Dynamic) -> Vec<Option<u64>> {
        use std::hash::{BuildHasher, Hash, Hasher};
        if self.groups.is_empty() {
            return Vec::new();
        }
        let map = body.read_lock::<Map>();
        self.groups
            .iter()
            .map(|g| {
                let map = map.as_ref()?;
                let mut h = self.hasher.build_hasher();
                for f in &g.fields {
                    map.get(f.as_str())?
                        .as_immutable_string_ref()
                        .ok()?
                        .as_str()
                        .hash(&mut h);
                }
                Some(h.finish())
            })
            .collect()
    }

    /// The rules of `selected` (ascending, as [`super::RuleSet::select`]
    /// returns them) after rule `after` that a message with `keys` (from
    /// [`Index::keys`]) may match, in order; `selected` itself when no rule
    /// declares a string equality.
    pub fn candidates<'s>(
        &self,
        keys: &[Option<u64>],
        selected: &'s [usize],
        after: Option<usize>,
    ) -> std::borrow::Cow<'s, [usize]> {
        let later = |i: &usize| after.is_none_or(|a| *i > a);
        if self.groups.is_empty() {
            let from = selected.partition_point(|i| !later(i));
            return std::borrow::Cow::Borrowed(&selected[from..]);
        }
        let mut out: Vec<usize> = self.ungated.iter().copied().filter(later).collect();
        for (g, key) in self.groups.iter().zip(keys) {
            if let Some(rules) = key.and_then(|k| g.rules.get(&k)) {
                out.extend(rules.iter().copied().filter(later));
            }
        }
        out.sort_unstable();
        out.dedup();
        out.retain(|i| selected.binary_search(i).is_ok());
        std::borrow::Cow::Owned(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn when(src: &str) -> Result<When, String> {
        let engine = rhai::Engine::new();
        When::parse(&engine.eval::<Dynamic>(src).unwrap())
    }

    fn body(json: &str) -> Dynamic {
        serde_json::from_str::<Dynamic>(json).unwrap().into_shared()
    }

    #[test]
    fn every_condition_must_hold() {
        let w = when(
            r#"#{ fields: ["interface"], equals: #{ site: "ams", up: true, slot: 3 }, prefix: #{ hostname: "rtr-" }, min: #{ errors: 10000 }, max: #{ errors: 1e6 } }"#,
        )
        .unwrap();
        let ok = r#"{"interface":"e1","site":"ams","up":true,"slot":3.0,"hostname":"rtr-1","errors":10000}"#;
        assert!(w.admits(&body(ok)));
        for bad in [
            ok.replace(r#""interface":"e1""#, r#""interface":null"#),
            ok.replace("ams", "fra"),
            ok.replace("true", "false"),
            ok.replace("3.0", "4"),
            ok.replace("rtr-", "sw-"),
            ok.replace("10000", "9999"),
            ok.replace("10000", "1000001"),
            ok.replace("10000", "\"10000\""),
        ] {
            assert!(!w.admits(&body(&bad)), "{bad}");
        }
        assert!(!w.admits(&body("[1]")));
    }

    #[test]
    fn large_integer_bounds_compare_exactly() {
        let w = when("#{ min: #{ c: 9007199254740993 } }").unwrap();
        assert!(!w.admits(&body(r#"{"c": 9007199254740992}"#)));
        assert!(w.admits(&body(r#"{"c": 9007199254740993}"#)));
    }

    #[test]
    fn a_bad_declaration_names_what_is_wrong() {
        for (src, expected) in [
            ("[1]", "`WHEN` must be a map"),
            ("#{ equal: #{} }", "no key `equal`"),
            (
                "#{ min: #{ x: \"1\" } }",
                "`WHEN.min.x` must be a number, not string",
            ),
            ("#{ prefix: #{ x: 1 } }", "`WHEN.prefix.x` must be a string"),
            ("#{ fields: \"x\" }", "`WHEN.fields` must be an array"),
            ("#{ equals: #{} }", "declares nothing"),
        ] {
            let e = when(src).unwrap_err();
            assert!(e.contains(expected), "{src}: {e}");
        }
    }

    #[test]
    fn check_prints_the_declaration() {
        let w = when(r#"#{ fields: ["a"], equals: #{ site: "ams" }, min: #{ e: 5 }, max: #{ e: 0.5 }, prefix: #{ h: "r" } }"#).unwrap();
        assert_eq!(
            w.to_string(),
            r#"has a, site == "ams", h starts with "r", e >= 5, e <= 0.5"#
        );
    }

    #[test]
    fn the_index_finds_the_rules_a_message_may_match_in_order() {
        let ws: Vec<Option<When>> = [
            Some(r#"#{ equals: #{ site: "a", role: "leaf" } }"#),
            Some(r#"#{ equals: #{ site: "b", role: "leaf" } }"#),
            Some(r#"#{ equals: #{ role: "spine" } }"#),
            Some("#{ min: #{ e: 1 } }"),
            None,
            Some(r#"#{ equals: #{ role: "spine", site: "b" }, min: #{ e: 5 } }"#),
            Some(r#"#{ equals: #{ site: "b", role: "spine", kind: "x" } }"#),
        ]
        .iter()
        .map(|s| s.map(|s| when(s).unwrap()))
        .collect();
        let index = Index::build(ws.iter().map(Option::as_ref));
        let all: Vec<usize> = (0..7).collect();
        let msg = index.keys(&body(r#"{"site":"b","role":"spine"}"#));
        assert_eq!(*index.candidates(&msg, &all, None), [2, 3, 4, 5]);
        assert_eq!(*index.candidates(&msg, &all, Some(3)), [4, 5]);
        assert_eq!(*index.candidates(&msg, &[0, 2, 4], None), [2, 4]);
        let scalar = index.keys(&body("7"));
        assert_eq!(*index.candidates(&scalar, &all, None), [3, 4]);
        let none = Index::build([None, None].into_iter());
        assert!(none.keys(&body("{}")).is_empty());
        assert_eq!(*none.candidates(&[], &[0, 1], Some(0)), [1]);
    }
}
