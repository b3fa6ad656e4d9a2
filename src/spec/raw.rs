//! The raw shape of `graven.toml`: what serde reads before any meaning is checked.
//!
//! Every struct denies unknown fields, so a misspelt key is an error, never a silent default.
//! Every field is optional and every leaf is a `Field`, which records where the value was
//! written and keeps a value of the wrong type as a problem instead of failing the whole
//! parse: that is what lets `validate` report every problem at once.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Deserializer};
use toml::de::{DeTable, DeValue};
use toml::{Spanned, Value};

use super::problem::{Issues, quoted_list, suggest};

/// One leaf as written: its byte span in the file and its value, or why the value written
/// there is not of the expected type.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Field<T> {
    pub span: Range<usize>,
    pub value: Result<T, String>,
}

impl<'de, T: Leaf> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<Value>::deserialize(deserializer)?;
        let span = spanned.span();
        let value = spanned.into_inner();
        let value = T::from_value(&value)
            .ok_or_else(|| format!("expected {}, found {}", T::EXPECTED, describe(&value)));
        Ok(Field { span, value })
    }
}

/// The leaf types `graven.toml` uses, each with how an error message names it.
pub(crate) trait Leaf: Sized {
    const EXPECTED: &'static str;
    fn from_value(value: &Value) -> Option<Self>;
}

impl Leaf for String {
    const EXPECTED: &'static str = "a string";
    fn from_value(value: &Value) -> Option<Self> {
        value.as_str().map(str::to_owned)
    }
}

impl Leaf for bool {
    const EXPECTED: &'static str = "true or false";
    fn from_value(value: &Value) -> Option<Self> {
        value.as_bool()
    }
}

impl Leaf for i64 {
    const EXPECTED: &'static str = "an integer";
    fn from_value(value: &Value) -> Option<Self> {
        value.as_integer()
    }
}

impl Leaf for Vec<String> {
    const EXPECTED: &'static str = "an array of strings";
    fn from_value(value: &Value) -> Option<Self> {
        value
            .as_array()?
            .iter()
            .map(|item| item.as_str().map(str::to_owned))
            .collect()
    }
}

/// Sizes, CPU shares and env values accept more than one type; `validate` decides.
impl Leaf for Value {
    const EXPECTED: &'static str = "a value";
    fn from_value(value: &Value) -> Option<Self> {
        Some(value.clone())
    }
}

/// How an error message names a value of the wrong type: its type and, for short scalars,
/// the value itself.
pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("string {s:?}"),
        Value::Integer(i) => format!("integer {i}"),
        Value::Float(f) => format!("float {f}"),
        Value::Boolean(b) => format!("boolean {b}"),
        Value::Datetime(d) => format!("datetime {d}"),
        Value::Array(_) => "an array".to_owned(),
        Value::Table(_) => "a table".to_owned(),
    }
}

/// A table whose keys are names the user chooses (services, env variables, volumes).
pub(crate) type Named<T> = BTreeMap<Spanned<String>, T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProject {
    pub app: Option<Field<String>>,
    pub build: Option<Spanned<RawBuild>>,
    pub image: Option<Spanned<RawImage>>,
    pub services: Option<Spanned<Named<Spanned<RawService>>>>,
    pub environments: Option<Spanned<Named<Spanned<RawEnvironment>>>>,
    pub logs: Option<Spanned<super::logs::RawLogs>>,
    pub dns: Option<Spanned<super::dns::RawDns>>,
    pub chaos: Option<Spanned<super::chaos::RawChaos>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBuild {
    pub command: Option<Field<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawImage {
    pub containerfile: Option<Field<String>>,
    pub context: Option<Field<String>>,
}

/// A service in `[services.NAME]`, and also an overlay in
/// `[environments.ENV.services.NAME]`: the same fields, each one replacing the base's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawService {
    pub instances: Option<Field<i64>>,
    pub port: Option<Field<i64>>,
    pub route: Option<Field<String>>,
    pub route_threads: Option<Field<i64>>,
    pub srv_name: Option<Field<String>>,
    pub command: Option<Field<Vec<String>>>,
    /// A value is a string, or `{ secret = "name" }`; `validate` decides.
    pub env: Option<Spanned<Named<Field<Value>>>>,
    pub health: Option<Spanned<RawHealth>>,
    pub deploy: Option<Spanned<RawDeploy>>,
    /// `stateful = true`: replaced stop-first, one instance owning its volumes.
    pub stateful: Option<Field<bool>>,
    pub stop_grace: Option<Field<String>>,
    pub volumes: Option<Spanned<Named<Field<String>>>>,
    pub limits: Option<Spanned<RawLimits>>,
    pub network: Option<Field<String>>,
    pub outbound: Option<Field<bool>>,
    pub entrypoint: Option<Field<Vec<String>>>,
    pub user: Option<Field<String>>,
    /// Path → size; `validate` checks both.
    pub tmpfs: Option<Spanned<Named<Field<Value>>>>,
    pub drift: Option<Spanned<RawDrift>>,
    pub phoenix: Option<Spanned<super::phoenix::RawPhoenix>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDrift {
    pub interval: Option<Field<String>>,
    pub exec_tmp: Option<Field<bool>>,
    pub allow_exec: Option<Field<Vec<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealth {
    pub kind: Option<Field<String>>,
    pub path: Option<Field<String>>,
    /// A list (exec form) or a string (run by `/bin/sh -c`); `validate` decides.
    pub command: Option<Field<Value>>,
    pub start_period: Option<Field<String>>,
    pub interval: Option<Field<String>>,
    pub timeout: Option<Field<String>>,
    pub healthy_after: Option<Field<i64>>,
    pub unhealthy_after: Option<Field<i64>>,
    pub events_caught_up: Option<Field<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDeploy {
    pub strategy: Option<Field<String>>,
    pub max_surge: Option<Field<i64>>,
    pub max_unavailable: Option<Field<i64>>,
    pub health_deadline: Option<Field<String>>,
    pub keep_releases: Option<Field<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub memory: Option<Field<Value>>,
    pub pids: Option<Field<i64>>,
    pub cpu: Option<Field<Value>>,
    pub tmp: Option<Field<Value>>,
    pub log: Option<Field<Value>>,
    pub log_age: Option<Field<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEnvironment {
    pub services: Option<Spanned<Named<Spanned<RawService>>>>,
    pub chaos: Option<Spanned<super::chaos::RawChaos>>,
    pub runtime: Option<Field<String>>,
    pub docker_host: Option<Field<String>>,
    pub swarm_engines: Option<Field<Vec<String>>>,
    pub kube_server: Option<Field<String>>,
    pub kube_registry: Option<Field<String>>,
    pub kube_namespace: Option<Field<String>>,
}

/// Reads `source` into the raw shape, reporting every syntax error, every unknown field and
/// every table of the wrong type. Serde stops at the first such error, so each one is
/// recorded, the offending key is removed from the parsed document, and serde runs again
/// until the rest reads cleanly. `None` when the document is not TOML at all.
pub(crate) fn read(source: &str, issues: &mut Issues) -> Option<RawProject> {
    let (mut root, errors) = DeTable::parse_recoverable(source);
    if !errors.is_empty() {
        for error in errors {
            issues.push(error.span().unwrap_or(0..0), "", error.message().trim());
        }
        return None;
    }
    loop {
        let error = match RawProject::deserialize(toml::de::Deserializer::from(root.clone())) {
            Ok(raw) => return Some(raw),
            Err(error) => error,
        };
        let span = error.span().unwrap_or(0..0);
        match remove_at(root.get_mut(), &span, "") {
            Some((path, key)) => issues.push(span, &path, rephrase(error.message(), &key)),
            None => {
                // Not an error the removal can route around: report it and stop.
                issues.push(span, "", error.message().trim());
                return None;
            }
        }
    }
}

/// Removes the entry whose key or value is at `span`, returning its dotted path and key.
fn remove_at(
    table: &mut DeTable<'_>,
    span: &Range<usize>,
    prefix: &str,
) -> Option<(String, String)> {
    let hit = table
        .iter()
        .find(|(key, value)| key.span() == *span || value.span() == *span)
        .map(|(key, _)| key.get_ref().to_string());
    if let Some(key) = hit {
        table.remove(key.as_str());
        return Some((join(prefix, &key), key));
    }
    for (key, value) in table.iter_mut() {
        if let DeValue::Table(inner) = value.get_mut()
            && let Some(found) = remove_at(inner, span, &join(prefix, key.get_ref()))
        {
            return Some(found);
        }
    }
    None
}

pub(crate) fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Turns serde's messages into graven's: an unknown field gets a "did you mean" (or the
/// list of fields that exist), a table of the wrong type says what it is instead.
fn rephrase(message: &str, key: &str) -> String {
    let message = message.trim();
    if message.starts_with("unknown field") {
        // serde writes: unknown field `x`, expected one of `a`, `b` (names in backticks).
        let known: Vec<&str> = message.split('`').skip(3).step_by(2).collect();
        return match suggest(key, known.iter().copied()) {
            Some(near) => format!("unknown field {key:?}; did you mean {near:?}?"),
            None if known.is_empty() => format!("unknown field {key:?}: this table has no fields"),
            None => format!("unknown field {key:?} (known: {})", quoted_list(known)),
        };
    }
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        let found = rest.split(", expected").next().unwrap_or(rest);
        let found = match found {
            "sequence" => "an array".to_owned(),
            "map" => "a table".to_owned(),
            other => other.replace('`', ""),
        };
        return format!("expected a table, found {found}");
    }
    message.to_owned()
}
