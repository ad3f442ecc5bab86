//! Plugin manifests: `plugins/*.yaml`, one sink instance per file.
//!
//! ```yaml
//! name: oncall-webhook        # unique; names the sink's consumer group
//! kind: webhook               # one of sinks::KINDS
//! enabled: true               # default true
//! route:                      # optional; default: every alert
//!   min_severity: major
//!   labels: {site: ams1}      # label equals
//!   label_regex: {hostname: "^core-"}
//! max_attempts: 10            # then the batch goes to the sink's dead-letter stream
//! batch_size: 100
//! timeout: 10s                # one delivery attempt, whatever the kind
//! # everything else is the kind's own settings
//! url: http://…
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::alert::{Alert, Severity};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Which alerts a sink wants.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// The alert's severity must be at least this.
    #[serde(default)]
    pub min_severity: Option<Severity>,
    /// Every listed label must equal the value.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Every listed label must exist and match the regex.
    #[serde(default, with = "regex_map")]
    pub label_regex: Vec<(String, regex::Regex)>,
}

mod regex_map {
    use serde::{Deserialize, Deserializer};
    use std::collections::BTreeMap;

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(String, regex::Regex)>, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        raw.into_iter()
            .map(|(k, v)| {
                regex::Regex::new(&v)
                    .map(|r| (k.clone(), r))
                    .map_err(|e| serde::de::Error::custom(format!("label_regex `{k}`: {e}")))
            })
            .collect()
    }
}

impl Route {
    pub fn matches(&self, a: &Alert) -> bool {
        if let Some(min) = self.min_severity
            && a.severity < min
        {
            return false;
        }
        self.labels.iter().all(|(k, v)| a.labels.get(k) == Some(v))
            && self
                .label_regex
                .iter()
                .all(|(k, re)| a.labels.get(k).is_some_and(|v| re.is_match(v)))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Common {
    name: String,
    kind: String,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    route: Route,
    #[serde(default = "default_attempts")]
    max_attempts: u32,
    #[serde(default = "default_batch")]
    batch_size: usize,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    timeout: Duration,
    #[serde(default, with = "humantime_serde")]
    group_wait: Duration,
}

fn yes() -> bool {
    true
}
fn default_attempts() -> u32 {
    10
}
fn default_batch() -> usize {
    100
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

const COMMON_KEYS: [&str; 8] = [
    "name",
    "kind",
    "enabled",
    "route",
    "max_attempts",
    "batch_size",
    "timeout",
    "group_wait",
];

/// A parsed, validated manifest. Its `Debug` leaves the kind settings out:
/// after `${ENV}` substitution they hold secrets.
pub struct Manifest {
    /// The file it came from, for error messages.
    pub path: PathBuf,
    /// Unique; names the sink's consumer group and labels its metrics.
    pub name: String,
    /// One of [`super::KINDS`].
    pub kind: String,
    /// `false` keeps the file (and the sink's group) without running it.
    pub enabled: bool,
    /// Which alerts the sink wants.
    pub route: Route,
    /// Delivery attempts of one batch before it is dead-lettered.
    pub max_attempts: u32,
    /// Outbox entries read (and delivered) at once.
    pub batch_size: usize,
    /// Limit of one delivery attempt; the dispatcher enforces it for every
    /// kind, and an attempt that exceeds it is a failure (retried).
    pub timeout: Duration,
    /// After the first alert of a batch arrives, wait this long for more
    /// before delivering, so a burst (many interfaces of one device) leaves
    /// as one notification; 0 delivers at once.
    pub group_wait: Duration,
    /// The kind's own settings, as written (after `${ENV}` substitution).
    pub settings: serde_yaml::Value,
    /// Hash of the file text, so a reload restarts only changed sinks.
    pub source_hash: u64,
}

impl Manifest {
    /// The directory relative paths in this manifest are relative to,
    /// made absolute so it holds whatever directory a program is run in.
    pub fn dir(&self) -> PathBuf {
        let parent = self.path.parent().unwrap_or(Path::new(""));
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf())
    }
}

impl std::fmt::Debug for Manifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manifest")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("enabled", &self.enabled)
            .field("route", &self.route)
            .field("max_attempts", &self.max_attempts)
            .field("batch_size", &self.batch_size)
            .field("timeout", &self.timeout)
            .field("settings", &"<redacted>")
            .finish()
    }
}

/// Replaces `${NAME}` in one string with the environment variable. A
/// missing variable is recorded in `missing` and left as written; only its
/// name is ever reported, never a value.
fn expand_str(text: &str, missing: &mut Vec<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated `${` in manifest".to_string())?;
        let name = &after[..end];
        match std::env::var(name) {
            Ok(value) => out.push_str(&value),
            Err(_) => {
                missing.push(name.to_string());
                out.push_str(&rest[start..start + 2 + end + 1]);
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Substitutes `${NAME}` in every string value (not in keys, not in
/// comments). Working on parsed values means a secret containing `#`, `: `
/// or quotes is taken literally instead of changing the YAML around it.
fn expand_values(v: &mut serde_yaml::Value, missing: &mut Vec<String>) -> Result<(), String> {
    match v {
        serde_yaml::Value::String(s) => *s = expand_str(s, missing)?,
        serde_yaml::Value::Sequence(items) => {
            for item in items {
                expand_values(item, missing)?;
            }
        }
        serde_yaml::Value::Mapping(map) => {
            for (_, item) in map.iter_mut() {
                expand_values(item, missing)?;
            }
        }
        serde_yaml::Value::Tagged(t) => expand_values(&mut t.value, missing)?,
        _ => {}
    }
    Ok(())
}

pub fn parse(path: &Path, text: &str) -> Result<Manifest, PluginError> {
    let invalid = |message: String| PluginError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let mut value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| invalid(e.to_string()))?;
    let enabled = value
        .get("enabled")
        .and_then(serde_yaml::Value::as_bool)
        .unwrap_or(true);
    let mut missing = Vec::new();
    expand_values(&mut value, &mut missing).map_err(invalid)?;
    missing.dedup();
    // A disabled manifest may name variables that are not set (a template
    // waiting for its secret); its kind settings are checked once enabled.
    if enabled && !missing.is_empty() {
        let names: Vec<String> = missing.iter().map(|n| format!("`{n}`")).collect();
        return Err(invalid(format!(
            "environment variable {} is not set",
            names.join(", ")
        )));
    }
    let serde_yaml::Value::Mapping(map) = value else {
        return Err(invalid("a manifest must be a YAML mapping".into()));
    };
    let mut common = serde_yaml::Mapping::new();
    let mut settings = serde_yaml::Mapping::new();
    for (k, v) in map {
        let is_common = k.as_str().is_some_and(|k| COMMON_KEYS.contains(&k));
        if is_common {
            common.insert(k, v);
        } else {
            settings.insert(k, v);
        }
    }
    let common: Common = serde_yaml::from_value(serde_yaml::Value::Mapping(common))
        .map_err(|e| invalid(e.to_string()))?;
    if common.name.trim().is_empty()
        || !common
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(invalid(format!(
            "name `{}` must be non-empty letters, digits, `-`, `_` or `.`",
            common.name
        )));
    }
    if common.max_attempts == 0 || common.batch_size == 0 {
        return Err(invalid(
            "`max_attempts` and `batch_size` must be at least 1".into(),
        ));
    }
    if common.timeout.is_zero() {
        return Err(invalid("`timeout` must be more than 0".into()));
    }
    let kind = super::kind(&common.kind).ok_or_else(|| {
        let kinds: Vec<&str> = super::KINDS.iter().map(|k| k.name).collect();
        invalid(format!(
            "unknown kind `{}` (known: {})",
            common.kind,
            kinds.join(", ")
        ))
    })?;
    let settings = if settings.is_empty() {
        serde_yaml::Value::Null
    } else {
        serde_yaml::Value::Mapping(settings)
    };
    // Validate the kind's settings now, so `check` and reload catch them.
    if missing.is_empty() {
        kind.validate(&settings)
            .map_err(|e| invalid(format!("kind `{}`: {e}", common.kind)))?;
    }
    Ok(Manifest {
        path: path.to_path_buf(),
        name: common.name,
        kind: common.kind,
        enabled: common.enabled,
        route: common.route,
        max_attempts: common.max_attempts,
        batch_size: common.batch_size,
        timeout: common.timeout,
        group_wait: common.group_wait,
        settings,
        source_hash: {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            text.hash(&mut h);
            h.finish()
        },
    })
}

/// Every `*.yaml`/`*.yml` in `dir` (not recursive, `*.test.yaml` excluded),
/// in name order. A missing
/// directory means no sinks. All errors are reported together.
pub fn load_dir(dir: &Path) -> Result<Vec<Manifest>, Vec<PluginError>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                // `*.test.yaml` are rule tests, never sinks, wherever they sit.
                let is_test = name.ends_with(".test.yaml") || name.ends_with(".test.yml");
                !name.starts_with('.')
                    && !is_test
                    && (name.ends_with(".yaml") || name.ends_with(".yml"))
                    && p.is_file()
            })
            .collect(),
        Err(source) => {
            return Err(vec![PluginError::Io {
                path: dir.to_path_buf(),
                source,
            }]);
        }
    };
    paths.sort();
    let mut manifests = Vec::new();
    let mut errors = Vec::new();
    for p in paths {
        match std::fs::read_to_string(&p) {
            Ok(text) => match parse(&p, &text) {
                Ok(m) => manifests.push(m),
                Err(e) => errors.push(e),
            },
            Err(source) => errors.push(PluginError::Io { path: p, source }),
        }
    }
    let mut seen = std::collections::HashMap::new();
    for m in &manifests {
        if let Some(first) = seen.insert(m.name.clone(), m.path.clone()) {
            errors.push(PluginError::Invalid {
                path: m.path.clone(),
                message: format!(
                    "sink name `{}` is already used by {}",
                    m.name,
                    first.display()
                ),
            });
        }
    }
    if errors.is_empty() {
        Ok(manifests)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_kind_and_setting_are_named() {
        let e = parse(Path::new("p.yaml"), "name: a\nkind: pager\n").unwrap_err();
        assert!(e.to_string().contains("unknown kind `pager`"), "{e}");
        let e = parse(
            Path::new("p.yaml"),
            "name: a\nkind: file\npath: x\nfsinc: true\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("fsinc"), "{e}");
    }

    #[test]
    fn env_substitution_names_missing_variable() {
        let e = parse(
            Path::new("p.yaml"),
            "name: a\nkind: file\npath: ${TRIPLINE_SURELY_UNSET_VAR}\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("TRIPLINE_SURELY_UNSET_VAR"), "{e}");
    }

    #[test]
    fn env_values_are_literal_and_comments_are_not_expanded() {
        // SAFETY: std serialises its own environment access (var, set_var,
        // spawning), and nothing in this test binary reads the environment
        // from C code; no other test uses this variable.
        unsafe { std::env::set_var("TRIPLINE_TEST_TOKEN", "a#b: 'c\"") };
        let m = parse(
            Path::new("p.yaml"),
            "# set ${TRIPLINE_SURELY_UNSET_VAR} first\nname: a\nkind: webhook\nurl: http://h/\nheaders: {X-Token: \"${TRIPLINE_TEST_TOKEN}\"}\n",
        )
        .unwrap();
        assert_eq!(m.settings["headers"]["X-Token"].as_str(), Some("a#b: 'c\""));
        let debug = format!("{m:?}");
        assert!(!debug.contains("a#b"), "{debug}");
    }

    #[test]
    fn disabled_manifest_may_wait_for_its_variables() {
        let text = "name: a\nkind: slack\nenabled: false\nurl: ${TRIPLINE_SURELY_UNSET_VAR}\n";
        assert!(!parse(Path::new("p.yaml"), text).unwrap().enabled);
        let e = parse(Path::new("p.yaml"), &text.replace("false", "true")).unwrap_err();
        assert!(e.to_string().contains("TRIPLINE_SURELY_UNSET_VAR"), "{e}");
    }

    #[test]
    fn route_matching() {
        let m = parse(
            Path::new("p.yaml"),
            "name: a\nkind: console\nroute:\n  min_severity: major\n  label_regex: {hostname: '^core-'}\n",
        )
        .unwrap();
        let mut a = Alert {
            fingerprint: "f".into(),
            rule: "r".into(),
            name: "n".into(),
            severity: Severity::Critical,
            status: crate::alert::Status::Firing,
            labels: [("hostname".to_string(), "core-1".to_string())].into(),
            annotations: Default::default(),
            starts_at: String::new(),
            ends_at: None,
            origin: Default::default(),
        };
        assert!(m.route.matches(&a));
        a.severity = Severity::Warning;
        assert!(!m.route.matches(&a));
        a.severity = Severity::Major;
        a.labels.insert("hostname".into(), "edge-1".into());
        assert!(!m.route.matches(&a));
    }
}
