//! `[services.NAME.phoenix]`: instances recycled past an age (docs/phoenix.md). Each key is
//! checked once where it is written, an environment's overlay replaces the keys it sets,
//! and the whole is checked once the service is resolved. Names no module but the spec's
//! own; a window's time zone is looked up in the system's time zone database (jiff), so a
//! misspelt zone fails the deploy instead of silently never recycling.

use std::time::Duration;

use serde::Deserialize;

use super::problem::Issues;
use super::raw::{Field, join};
use super::values;
use super::{Phoenix, Window};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPhoenix {
    pub max_age: Option<Field<String>>,
    pub jitter: Option<Field<String>>,
    pub window: Option<Field<String>>,
    pub max_at_once: Option<Field<i64>>,
    pub stop_first: Option<Field<bool>>,
}

/// One table's phoenix keys after their own checks: `None` where absent or invalid.
#[derive(Debug, Clone, Default)]
pub(super) struct Partial {
    /// Where the table was written (its dotted path and span), once one was.
    table: Option<(String, std::ops::Range<usize>)>,
    max_age: Option<Duration>,
    jitter: Option<Duration>,
    window: Option<Window>,
    max_at_once: Option<u32>,
    stop_first: Option<bool>,
}

/// The longest `max_at_once` takes: beyond any service's instance count a typo aims for.
const MAX_AT_ONCE: i64 = 1000;

pub(super) fn check(raw: &toml::Spanned<RawPhoenix>, prefix: &str, issues: &mut Issues) -> Partial {
    let path = |name: &str| join(prefix, name);
    let table = raw.get_ref();
    let mut leaf = |field: &Option<Field<String>>, name: &str, zero_ok: bool| {
        let field = field.as_ref()?;
        let checked = field.value.clone().and_then(|text| {
            let duration = values::duration(&text)?;
            if duration.is_zero() && !zero_ok {
                return Err(format!("{text:?} must be longer than zero"));
            }
            Ok(duration)
        });
        checked
            .map_err(|message| issues.push(field.span.clone(), path(name), message))
            .ok()
    };
    let max_age = leaf(&table.max_age, "max_age", false);
    let jitter = leaf(&table.jitter, "jitter", true);
    let window = table.window.as_ref().and_then(|field| {
        field
            .value
            .clone()
            .and_then(|text| Window::parse(&text))
            .map_err(|message| issues.push(field.span.clone(), path("window"), message))
            .ok()
    });
    let max_at_once = table
        .max_at_once
        .as_ref()
        .and_then(|field| match field.value {
            Ok(n @ 1..=MAX_AT_ONCE) => Some(n as u32),
            Ok(n) => {
                issues.push(
                    field.span.clone(),
                    path("max_at_once"),
                    format!("{n} is out of range: it must be between 1 and {MAX_AT_ONCE}"),
                );
                None
            }
            Err(ref message) => {
                issues.push(field.span.clone(), path("max_at_once"), message.clone());
                None
            }
        });
    let stop_first = table.stop_first.as_ref().and_then(|field| {
        field
            .value
            .clone()
            .map_err(|message| issues.push(field.span.clone(), path("stop_first"), message))
            .ok()
    });
    Partial {
        table: Some((prefix.to_owned(), raw.span())),
        max_age,
        jitter,
        window,
        max_at_once,
        stop_first,
    }
}

impl Partial {
    /// `self` with every key `overlay` sets replaced.
    pub(super) fn overlaid(&self, overlay: &Partial) -> Partial {
        Partial {
            table: overlay.table.clone().or_else(|| self.table.clone()),
            max_age: overlay.max_age.or(self.max_age),
            jitter: overlay.jitter.or(self.jitter),
            window: overlay.window.clone().or_else(|| self.window.clone()),
            max_at_once: overlay.max_at_once.or(self.max_at_once),
            stop_first: overlay.stop_first.or(self.stop_first),
        }
    }

    /// Whether a phoenix table was written (here or in the base).
    pub(super) fn written(&self) -> bool {
        self.table.is_some()
    }

    /// The service's phoenix settings: none without a table; a table without `max_age`
    /// is reported (an age is what the table is for).
    pub(super) fn resolve(&self, in_environment: &str, issues: &mut Issues) -> Option<Phoenix> {
        let (field, span) = self.table.as_ref()?;
        let Some(max_age) = self.max_age else {
            if !issues.mentions(field, "max_age") {
                issues.push(
                    span.clone(),
                    field,
                    format!(
                        "a phoenix table needs max_age, how old an instance may get \
                         (e.g. max_age = \"24h\"){in_environment}"
                    ),
                );
            }
            return None;
        };
        Some(Phoenix {
            max_age,
            jitter: self.jitter.unwrap_or(Duration::ZERO),
            window: self.window.clone(),
            max_at_once: self.max_at_once.unwrap_or(1),
            stop_first: self.stop_first.unwrap_or(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use expect_test::expect;

    #[test]
    fn windows() {
        let inputs = [
            "02:00-05:00",
            "02:00-05:00 Europe/Paris",
            "22:30-01:15 UTC",
            "05:00-05:00",
            "2:00-05:00",
            "02:00-24:00",
            "02:00-05:00 Mars/Olympus",
            "02:00-05:00 UTC extra",
            "22:00-02:00 +01:00",
            "",
        ];
        let shown: Vec<String> = inputs
            .iter()
            .map(|text| match super::Window::parse(text) {
                Ok(w) => format!("{text:?} -> {w}"),
                Err(e) => format!("{text:?} -> error: {}", e.split(" (").next().unwrap()),
            })
            .collect();
        expect![[r#"
            "02:00-05:00" -> 02:00-05:00
            "02:00-05:00 Europe/Paris" -> 02:00-05:00 Europe/Paris
            "22:30-01:15 UTC" -> 22:30-01:15
            "05:00-05:00" -> error: "05:00-05:00" is an empty window
            "2:00-05:00" -> 02:00-05:00
            "02:00-24:00" -> 02:00-24:00
            "02:00-05:00 Mars/Olympus" -> error: "Mars/Olympus" is neither a UTC offset like "+01:00" nor a time zone this machine knows
            "02:00-05:00 UTC extra" -> error: "UTC extra" is not a UTC offset like "+01:00"
            "22:00-02:00 +01:00" -> 22:00-02:00 +01:00
            "" -> error: "" is not a window like "09:00-17:00""#]]
        .assert_eq(&shown.join("\n"));
    }
}
