//! `[chaos]` and `[environments.ENV.chaos]`: planned failures, checked into the chaos
//! module's `ChaosConfig`. The top-level table is every environment's default; an
//! environment's table replaces it key by key (its `checker` table too).

use std::time::Duration;

use serde::Deserialize;
use toml::{Spanned, Value};

use super::problem::{Issues, did_you_mean, quoted_list};
use super::raw::{Field, describe};
use super::values;
use crate::chaos::{ChaosConfig, Kind, PPM, Window};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawChaos {
    pub mean_between: Option<Field<String>>,
    pub min_between: Option<Field<String>>,
    pub window: Option<Field<String>>,
    pub exempt: Option<Field<Vec<String>>>,
    pub stateful: Option<Field<Vec<String>>>,
    pub kinds: Option<Field<Vec<String>>>,
    pub duration: Option<Field<String>>,
    pub leashed: Option<Field<bool>>,
    pub share: Option<Field<Value>>,
    pub latency: Option<Field<String>>,
    pub status: Option<Field<i64>>,
    pub seed: Option<Field<i64>>,
    pub checker: Option<Spanned<RawChecker>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawChecker {
    pub enabled: Option<Field<bool>>,
    pub max_error_rate: Option<Field<Value>>,
    pub max_p99_increase: Option<Field<String>>,
    pub min_requests: Option<Field<i64>>,
    pub window: Option<Field<String>>,
    pub cool_down: Option<Field<String>>,
    pub baseline: Option<Field<String>>,
}

/// The key's field from the environment's table, else from the top-level one, with the
/// dotted path of the table it came from.
fn pick<'a, T>(
    env: Option<(&'a RawChaos, &str)>,
    base: Option<(&'a RawChaos, &str)>,
    get: impl Fn(&'a RawChaos) -> Option<&'a Field<T>>,
) -> Option<(&'a Field<T>, String)> {
    env.and_then(|(raw, at)| get(raw).map(|f| (f, at.to_owned())))
        .or_else(|| base.and_then(|(raw, at)| get(raw).map(|f| (f, at.to_owned()))))
}

fn checker_pick<'a, T>(
    env: Option<(&'a RawChaos, &str)>,
    base: Option<(&'a RawChaos, &str)>,
    get: impl Fn(&'a RawChecker) -> Option<&'a Field<T>>,
) -> Option<(&'a Field<T>, String)> {
    let inner = |(raw, at): (&'a RawChaos, &str)| {
        let checker = raw.checker.as_ref()?.get_ref();
        get(checker).map(|f| (f, format!("{at}.checker")))
    };
    env.and_then(inner).or_else(|| base.and_then(inner))
}

/// Checks one picked field with `check`, reporting a problem at its span.
fn checked<T, U>(
    picked: Option<(&Field<T>, String)>,
    key: &str,
    issues: &mut Issues,
    check: impl FnOnce(&T) -> Result<U, String>,
) -> Option<U> {
    let (field, table) = picked?;
    let result = field.value.as_ref().map_err(String::clone).and_then(check);
    match result {
        Ok(value) => Some(value),
        Err(message) => {
            issues.push(field.span.clone(), format!("{table}.{key}"), message);
            None
        }
    }
}

/// A share of requests: a number from 0 to 1 or a percentage ("10%"), in parts per million.
fn share(value: &Value) -> Result<u32, String> {
    let fraction = match value {
        Value::Float(f) => *f,
        Value::Integer(i) => *i as f64,
        Value::String(s) => match s.trim().strip_suffix('%') {
            Some(p) => {
                p.trim()
                    .parse::<f64>()
                    .map_err(|_| format!("{s:?} is not a percentage like \"10%\""))?
                    / 100.0
            }
            None => return Err(format!("{s:?} is not a share: write 0.1 or \"10%\"")),
        },
        other => {
            return Err(format!(
                "expected a share (0.1 or \"10%\"), found {}",
                describe(other)
            ));
        }
    };
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(format!(
            "{fraction} is not a share of requests between 0 (excluded) and 1"
        ));
    }
    Ok((fraction * f64::from(PPM)).round() as u32)
}

/// The environment's chaos config: None when neither table is written.
pub(crate) fn check(
    base: Option<&Spanned<RawChaos>>,
    env: Option<(&Spanned<RawChaos>, &str)>,
    services: &[&str],
    issues: &mut Issues,
) -> Option<ChaosConfig> {
    let env_at = env.map(|(raw, name)| (raw.get_ref(), format!("environments.{name}.chaos")));
    let env = env_at.as_ref().map(|(raw, at)| (*raw, at.as_str()));
    let base = base.map(|raw| (raw.get_ref(), "chaos"));
    if env.is_none() && base.is_none() {
        return None;
    }
    let mut config = ChaosConfig::default();
    let duration = |text: &String| values::duration(text);
    let positive = |text: &String| {
        values::duration(text).and_then(|d| {
            if d.is_zero() {
                Err("must be longer than zero".to_owned())
            } else {
                Ok(d)
            }
        })
    };
    if let Some(d) = checked(
        pick(env, base, |r| r.mean_between.as_ref()),
        "mean_between",
        issues,
        positive,
    ) {
        config.mean_between = d;
    }
    let min = pick(env, base, |r| r.min_between.as_ref());
    let min_span = min
        .as_ref()
        .map(|(f, t)| (f.span.clone(), format!("{t}.min_between")));
    if let Some(d) = checked(min, "min_between", issues, duration) {
        config.min_between = d;
    }
    if config.min_between > config.mean_between {
        let (span, field) = min_span.unwrap_or((0..0, "chaos.min_between".to_owned()));
        issues.push(
            span,
            &field,
            format!(
                "min_between ({}) is longer than mean_between ({}): the mean could not be kept",
                humantime::format_duration(config.min_between),
                humantime::format_duration(config.mean_between)
            ),
        );
    }
    config.window = checked(
        pick(env, base, |r| r.window.as_ref()),
        "window",
        issues,
        |w| Window::parse(w),
    );
    let known = |list: &Vec<String>| -> Result<Vec<String>, String> {
        for name in list {
            if !services.contains(&name.as_str()) {
                return Err(format!(
                    "no service {name:?} (known: {}){}",
                    quoted_list(services.iter().copied()),
                    did_you_mean(name, services.iter().copied())
                ));
            }
        }
        Ok(list.clone())
    };
    if let Some(list) = checked(
        pick(env, base, |r| r.exempt.as_ref()),
        "exempt",
        issues,
        known,
    ) {
        config.exempt = list;
    }
    if let Some(list) = checked(
        pick(env, base, |r| r.stateful.as_ref()),
        "stateful",
        issues,
        known,
    ) {
        config.stateful = list;
    }
    let kinds = |list: &Vec<String>| -> Result<Vec<Kind>, String> {
        if list.is_empty() {
            return Err("no kinds: name at least one of \"stop\", \"kill\", \"latency\", \"error\", \"reset\"".to_owned());
        }
        list.iter()
            .map(|k| {
                Kind::parse(k).ok_or_else(|| {
                    let names = Kind::ALL.map(Kind::as_str);
                    format!(
                        "unknown kind {k:?} (known: {}){}",
                        quoted_list(names),
                        did_you_mean(k, names)
                    )
                })
            })
            .collect()
    };
    if let Some(list) = checked(
        pick(env, base, |r| r.kinds.as_ref()),
        "kinds",
        issues,
        kinds,
    ) {
        config.kinds = list;
    }
    if let Some(d) = checked(
        pick(env, base, |r| r.duration.as_ref()),
        "duration",
        issues,
        positive,
    ) {
        config.duration = d;
    }
    if let Some(b) = checked(
        pick(env, base, |r| r.leashed.as_ref()),
        "leashed",
        issues,
        |b| Ok(*b),
    ) {
        config.leashed = b;
    }
    if let Some(s) = checked(
        pick(env, base, |r| r.share.as_ref()),
        "share",
        issues,
        share,
    ) {
        config.share_ppm = s;
    }
    if let Some(d) = checked(
        pick(env, base, |r| r.latency.as_ref()),
        "latency",
        issues,
        positive,
    ) {
        config.latency = d;
    }
    let status = |s: &i64| match *s {
        400..=599 => Ok(*s as u16),
        other => Err(format!("{other} is not an error status (400 to 599)")),
    };
    if let Some(s) = checked(
        pick(env, base, |r| r.status.as_ref()),
        "status",
        issues,
        status,
    ) {
        config.status = s;
    }
    config.seed = checked(pick(env, base, |r| r.seed.as_ref()), "seed", issues, |s| {
        u64::try_from(*s).map_err(|_| format!("{s} is not a seed (0 or more)"))
    });
    let checker = &mut config.checker;
    if let Some(b) = checked(
        checker_pick(env, base, |c| c.enabled.as_ref()),
        "enabled",
        issues,
        |b| Ok(*b),
    ) {
        checker.enabled = b;
    }
    if let Some(s) = checked(
        checker_pick(env, base, |c| c.max_error_rate.as_ref()),
        "max_error_rate",
        issues,
        share,
    ) {
        checker.max_error_rate_ppm = s;
    }
    if let Some(d) = checked(
        checker_pick(env, base, |c| c.max_p99_increase.as_ref()),
        "max_p99_increase",
        issues,
        duration,
    ) {
        checker.max_p99_increase = d;
    }
    let count = |n: &i64| u64::try_from(*n).map_err(|_| format!("{n} is not a count (0 or more)"));
    if let Some(n) = checked(
        checker_pick(env, base, |c| c.min_requests.as_ref()),
        "min_requests",
        issues,
        count,
    ) {
        checker.min_requests = n;
    }
    let at_least_a_second = |text: &String| {
        values::duration(text).and_then(|d| {
            if d < Duration::from_secs(1) {
                Err("must be at least 1s (the checker judges once a second)".to_owned())
            } else {
                Ok(d)
            }
        })
    };
    if let Some(d) = checked(
        checker_pick(env, base, |c| c.window.as_ref()),
        "window",
        issues,
        at_least_a_second,
    ) {
        checker.window = d;
    }
    if let Some(d) = checked(
        checker_pick(env, base, |c| c.baseline.as_ref()),
        "baseline",
        issues,
        at_least_a_second,
    ) {
        checker.baseline = d;
    }
    if let Some(d) = checked(
        checker_pick(env, base, |c| c.cool_down.as_ref()),
        "cool_down",
        issues,
        duration,
    ) {
        checker.cool_down = d;
    }
    Some(config)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use expect_test::{Expect, expect};

    use crate::chaos::{ChaosConfig, Kind};

    const BASE: &str = r#"
app = "a"
[services.web]
port = 8080
[services.db]
port = 5432
"#;

    fn parse(extra: &str, environment: &str) -> Result<Option<ChaosConfig>, String> {
        crate::spec::parse(
            &format!("{BASE}{extra}"),
            Path::new("graven.toml"),
            Path::new("/app"),
            environment,
        )
        .map(|p| p.chaos)
        .map_err(|e| e.to_string())
    }

    fn check_err(extra: &str, expected: Expect) {
        expected.assert_eq(&parse(extra, "local").unwrap_err());
    }

    #[test]
    fn no_table_is_no_chaos_and_an_empty_one_is_the_defaults() {
        assert_eq!(parse("", "local"), Ok(None));
        assert_eq!(
            parse("[chaos]\n", "local"),
            Ok(Some(ChaosConfig::default()))
        );
    }

    #[test]
    fn an_environment_overlays_the_top_level_table_key_by_key() {
        let extra = r#"
[chaos]
mean_between = "2h"
min_between = "20m"
exempt = ["db"]
kinds = ["stop", "kill"]
checker = { cool_down = "1h", max_error_rate = "5%" }
[environments.prod.chaos]
kinds = ["latency"]
leashed = true
window = "09:00-17:00 +01:00"
share = 0.25
checker = { enabled = false }
[environments.dev]
"#;
        let prod = parse(extra, "prod").unwrap().unwrap();
        assert_eq!(prod.mean_between, std::time::Duration::from_secs(7200));
        assert_eq!(prod.exempt, vec!["db".to_owned()]);
        assert_eq!(prod.kinds, vec![Kind::Latency]);
        assert!(prod.leashed);
        assert_eq!(prod.share_ppm, 250_000);
        assert_eq!(prod.window.unwrap().to_string(), "09:00-17:00 +01:00");
        assert!(!prod.checker.enabled);
        // The checker's keys the environment does not set come from the top level.
        assert_eq!(prod.checker.cool_down, std::time::Duration::from_secs(3600));
        assert_eq!(prod.checker.max_error_rate_ppm, 50_000);
        let dev = parse(extra, "dev").unwrap().unwrap();
        assert_eq!(dev.kinds, vec![Kind::Stop, Kind::Kill]);
        assert!(!dev.leashed);
        assert!(dev.checker.enabled);
    }

    #[test]
    fn every_mistake_is_reported_at_its_place() {
        check_err(
            r#"
[chaos]
mean_between = "1m"
min_between = "5m"
exempt = ["dv"]
kinds = ["kil"]
share = 1.5
status = 200
window = "9-5"
colour = "red"
checker = { window = "10ms" }
"#,
            expect![[r#"
                graven.toml:10:15: chaos.min_between: min_between (5m) is longer than mean_between (1m): the mean could not be kept
                graven.toml:11:10: chaos.exempt: no service "dv" (known: "db", "web"); did you mean "db"?
                graven.toml:12:9: chaos.kinds: unknown kind "kil" (known: "stop", "kill", "latency", "error", "reset"); did you mean "kill"?
                graven.toml:13:9: chaos.share: 1.5 is not a share of requests between 0 (excluded) and 1
                graven.toml:14:10: chaos.status: 200 is not an error status (400 to 599)
                graven.toml:15:10: chaos.window: "9" is not a time like "09:00"
                graven.toml:16:1: chaos.colour: unknown field "colour" (known: "mean_between", "min_between", "window", "exempt", "stateful", "kinds", "duration", "leashed", "share", "latency", "status", "seed", "checker")
                graven.toml:17:22: chaos.checker.window: must be at least 1s (the checker judges once a second)"#]],
        );
        check_err(
            "[environments.prod.chaos]\nwindow = \"09:00-17:00 Mars/Olympus\"\n",
            expect![[
                r#"graven.toml:8:10: environments.prod.chaos.window: "Mars/Olympus" is neither a UTC offset like "+01:00" nor a time zone this machine knows"#
            ]],
        );
    }
}
