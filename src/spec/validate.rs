//! Validation: the raw shape becomes a typed `Project` for one environment.
//!
//! Each raw table is checked field by field once (base services and every environment's
//! overlays), which gives each value its place in the file. Then every environment is
//! resolved (overlay over base, defaults for the rest) and checked as a whole, so a problem
//! in production's settings is reported even while working locally. Only the requested
//! environment's result is returned.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::problem::{Issues, did_you_mean, quoted_list};
use super::raw::{
    Field, Named, RawDeploy, RawDrift, RawHealth, RawLimits, RawProject, RawService, join,
};
use super::values;
use super::{BuildStep, DeployPolicy, ImageSource, Project, RouteKind, Service, Strategy};
use crate::proxy::{HealthCheck, HealthKind};
use crate::runtime::{Limits, TmpfsMount, VolumeMount};

/// The environment every project has without declaring it.
pub const DEFAULT_ENVIRONMENT: &str = "local";

/// The most threads a route may be given: far beyond the cores a machine running graven
/// has, low enough that a typo cannot start thousands of threads.
const MAX_ROUTE_THREADS: i64 = 256;

/// Where a value was written: its span and dotted field path.
#[derive(Debug, Clone)]
struct Loc {
    span: Range<usize>,
    field: String,
}

#[derive(Debug, Clone)]
struct At<T> {
    value: T,
    loc: Loc,
}

/// One table's fields after their own checks: `None` where absent or invalid (an invalid
/// value has been reported already).
#[derive(Debug, Clone, Default)]
struct Partial {
    instances: Option<At<u32>>,
    port: Option<At<u16>>,
    route: Option<At<values::Route>>,
    route_threads: Option<At<u32>>,
    srv_name: Option<At<String>>,
    command: Option<At<Vec<String>>>,
    env: BTreeMap<String, At<values::EnvValue>>,
    /// Whether a health table was written (otherwise the image's HEALTHCHECK counts).
    health_table: bool,
    health_path: Option<At<String>>,
    health_kind: Option<At<Kind>>,
    health_command: Option<At<Vec<String>>>,
    start_period: Option<At<Duration>>,
    interval: Option<At<Duration>>,
    timeout: Option<At<Duration>>,
    healthy_after: Option<At<u32>>,
    unhealthy_after: Option<At<u32>>,
    events_caught_up: Option<At<bool>>,
    strategy: Option<At<Strategy>>,
    stateful: Option<At<bool>>,
    max_surge: Option<At<u32>>,
    max_unavailable: Option<At<u32>>,
    health_deadline: Option<At<Duration>>,
    keep_releases: Option<At<u32>>,
    stop_grace: Option<At<Duration>>,
    volumes: Option<At<Vec<VolumeMount>>>,
    memory: Option<At<u64>>,
    pids: Option<At<u64>>,
    cpu: Option<At<u64>>,
    tmp: Option<At<u64>>,
    log: Option<At<u64>>,
    log_age: Option<At<Duration>>,
    host_network: Option<At<bool>>,
    outbound: Option<At<bool>>,
    entrypoint: Option<At<Vec<String>>>,
    user: Option<At<String>>,
    tmpfs: Option<At<Vec<TmpfsMount>>>,
    drift_interval: Option<At<Duration>>,
    exec_tmp: Option<At<bool>>,
    allow_exec: Option<At<Vec<String>>>,
    phoenix: super::phoenix::Partial,
}

impl Partial {
    /// `self` with every field `overlay` sets replaced; env variables merge key by key.
    fn overlaid(&self, overlay: &Partial) -> Partial {
        fn pick<T: Clone>(over: &Option<At<T>>, base: &Option<At<T>>) -> Option<At<T>> {
            over.clone().or_else(|| base.clone())
        }
        let mut env = self.env.clone();
        env.extend(overlay.env.clone());
        Partial {
            instances: pick(&overlay.instances, &self.instances),
            port: pick(&overlay.port, &self.port),
            route: pick(&overlay.route, &self.route),
            route_threads: pick(&overlay.route_threads, &self.route_threads),
            srv_name: pick(&overlay.srv_name, &self.srv_name),
            command: pick(&overlay.command, &self.command),
            env,
            health_table: overlay.health_table || self.health_table,
            health_path: pick(&overlay.health_path, &self.health_path),
            health_kind: pick(&overlay.health_kind, &self.health_kind),
            health_command: pick(&overlay.health_command, &self.health_command),
            start_period: pick(&overlay.start_period, &self.start_period),
            interval: pick(&overlay.interval, &self.interval),
            timeout: pick(&overlay.timeout, &self.timeout),
            healthy_after: pick(&overlay.healthy_after, &self.healthy_after),
            unhealthy_after: pick(&overlay.unhealthy_after, &self.unhealthy_after),
            events_caught_up: pick(&overlay.events_caught_up, &self.events_caught_up),
            strategy: pick(&overlay.strategy, &self.strategy),
            stateful: pick(&overlay.stateful, &self.stateful),
            max_surge: pick(&overlay.max_surge, &self.max_surge),
            max_unavailable: pick(&overlay.max_unavailable, &self.max_unavailable),
            health_deadline: pick(&overlay.health_deadline, &self.health_deadline),
            keep_releases: pick(&overlay.keep_releases, &self.keep_releases),
            stop_grace: pick(&overlay.stop_grace, &self.stop_grace),
            host_network: pick(&overlay.host_network, &self.host_network),
            outbound: pick(&overlay.outbound, &self.outbound),
            volumes: pick(&overlay.volumes, &self.volumes),
            memory: pick(&overlay.memory, &self.memory),
            pids: pick(&overlay.pids, &self.pids),
            cpu: pick(&overlay.cpu, &self.cpu),
            tmp: pick(&overlay.tmp, &self.tmp),
            log: pick(&overlay.log, &self.log),
            log_age: pick(&overlay.log_age, &self.log_age),
            entrypoint: pick(&overlay.entrypoint, &self.entrypoint),
            user: pick(&overlay.user, &self.user),
            tmpfs: pick(&overlay.tmpfs, &self.tmpfs),
            drift_interval: pick(&overlay.drift_interval, &self.drift_interval),
            exec_tmp: pick(&overlay.exec_tmp, &self.exec_tmp),
            allow_exec: pick(&overlay.allow_exec, &self.allow_exec),
            phoenix: self.phoenix.overlaid(&overlay.phoenix),
        }
    }
}

/// Checks one optional leaf: `None` when it is absent, else as `check_field` does.
fn leaf<T, U>(
    field: &Option<Field<T>>,
    path: &str,
    issues: &mut Issues,
    check: impl FnOnce(&T) -> Result<U, String>,
) -> Option<At<U>> {
    check_field(field.as_ref()?, path, issues, check)
}

/// Checks one leaf: its type (from reading) and then `check`, reporting either problem.
fn check_field<T, U>(
    field: &Field<T>,
    path: &str,
    issues: &mut Issues,
    check: impl FnOnce(&T) -> Result<U, String>,
) -> Option<At<U>> {
    let checked = field.value.as_ref().map_err(String::clone).and_then(check);
    match checked {
        Ok(value) => Some(At {
            value,
            loc: Loc {
                span: field.span.clone(),
                field: path.to_owned(),
            },
        }),
        Err(message) => {
            issues.push(field.span.clone(), path, message);
            None
        }
    }
}

fn integer_in<T: TryFrom<i64>>(min: i64, max: i64) -> impl FnOnce(&i64) -> Result<T, String> {
    move |n| {
        if (min..=max).contains(n) {
            T::try_from(*n).map_err(|_| format!("{n} is out of range"))
        } else if max == i64::from(u32::MAX) {
            Err(format!("{n} is out of range: it must be at least {min}"))
        } else {
            Err(format!(
                "{n} is out of range: it must be between {min} and {max}"
            ))
        }
    }
}

fn positive_duration(text: &String) -> Result<Duration, String> {
    let duration = values::duration(text)?;
    if duration.is_zero() {
        return Err(format!("{text:?} must be longer than zero"));
    }
    Ok(duration)
}

fn check_service(raw: &RawService, prefix: &str, issues: &mut Issues) -> Partial {
    let path = |name: &str| join(prefix, name);
    let u32_max = i64::from(u32::MAX);
    let mut partial = Partial {
        instances: leaf(
            &raw.instances,
            &path("instances"),
            issues,
            integer_in(0, u32_max),
        ),
        port: leaf(&raw.port, &path("port"), issues, integer_in(1, 65535)),
        route: leaf(&raw.route, &path("route"), issues, |r| values::route(r)),
        route_threads: leaf(
            &raw.route_threads,
            &path("route_threads"),
            issues,
            integer_in(1, MAX_ROUTE_THREADS),
        ),
        srv_name: leaf(&raw.srv_name, &path("srv_name"), issues, |name| {
            values::srv_name(name).map(|()| name.clone())
        }),
        command: leaf(&raw.command, &path("command"), issues, |command| {
            if command.first().is_none_or(|program| program.is_empty()) {
                Err("the command needs a program: [\"/app\", \"--flag\"]".into())
            } else {
                Ok(command.clone())
            }
        }),
        stateful: leaf(&raw.stateful, &path("stateful"), issues, |b| Ok(*b)),
        stop_grace: leaf(&raw.stop_grace, &path("stop_grace"), issues, |d| {
            values::duration(d)
        }),
        host_network: leaf(&raw.network, &path("network"), issues, |n| {
            match n.as_str() {
                "host" => Ok(true),
                "private" => Ok(false),
                _ => Err(format!(
                    "{n:?} is not a network: write \"private\" or \"host\""
                )),
            }
        }),
        outbound: leaf(&raw.outbound, &path("outbound"), issues, |o| Ok(*o)),
        // Empty is allowed: no entrypoint, as `docker run --entrypoint ""` gives.
        entrypoint: leaf(&raw.entrypoint, &path("entrypoint"), issues, |entrypoint| {
            if entrypoint.first().is_some_and(|program| program.is_empty()) {
                Err(
                    "the entrypoint needs a program: [\"/entry\", \"--flag\"], or [] for none"
                        .into(),
                )
            } else {
                Ok(entrypoint.clone())
            }
        }),
        user: leaf(&raw.user, &path("user"), issues, values::user),
        ..Partial::default()
    };
    if let Some(env) = &raw.env {
        for (key, value) in env.get_ref() {
            let field = join(&path("env"), key.get_ref());
            if let Err(message) = values::env_key(key.get_ref()) {
                issues.push(key.span(), &field, message);
            } else if let Some(value) = check_field(value, &field, issues, values::env_value) {
                partial.env.insert(key.get_ref().clone(), value);
            }
        }
    }
    if let Some(health) = &raw.health {
        // `events_caught_up` alone adds to the image's HEALTHCHECK rather than replacing it.
        let h = health.get_ref();
        partial.health_table = h.kind.is_some()
            || h.path.is_some()
            || h.command.is_some()
            || h.start_period.is_some()
            || h.interval.is_some()
            || h.timeout.is_some()
            || h.healthy_after.is_some()
            || h.unhealthy_after.is_some();
        check_health(health.get_ref(), &path("health"), issues, &mut partial);
    }
    if let Some(deploy) = &raw.deploy {
        check_deploy(deploy.get_ref(), &path("deploy"), issues, &mut partial);
    }
    if let Some(limits) = &raw.limits {
        check_limits(limits.get_ref(), &path("limits"), issues, &mut partial);
    }
    if let Some(volumes) = &raw.volumes {
        partial.volumes = check_volumes(volumes, &path("volumes"), issues);
    }
    if let Some(tmpfs) = &raw.tmpfs {
        partial.tmpfs = check_tmpfs(tmpfs, &path("tmpfs"), issues);
    }
    if let Some(drift) = &raw.drift {
        check_drift(drift.get_ref(), &path("drift"), issues, &mut partial);
    }
    if let Some(phoenix) = &raw.phoenix {
        partial.phoenix = super::phoenix::check(phoenix, &path("phoenix"), issues);
    }
    partial
}

/// `[services.NAME.drift]`: how often the check runs (more than zero), whether programs may
/// run from /tmp, and the absolute paths from which running one is not drift.
fn check_drift(raw: &RawDrift, prefix: &str, issues: &mut Issues, partial: &mut Partial) {
    let path = |name: &str| join(prefix, name);
    partial.drift_interval = leaf(&raw.interval, &path("interval"), issues, |d| {
        let interval = values::duration(d)?;
        if interval.is_zero() {
            return Err("the interval must be more than zero".into());
        }
        Ok(interval)
    });
    partial.exec_tmp = leaf(&raw.exec_tmp, &path("exec_tmp"), issues, |e| Ok(*e));
    partial.allow_exec = leaf(&raw.allow_exec, &path("allow_exec"), issues, |paths| {
        for p in paths {
            values::mount_path(p)?;
        }
        Ok(paths.clone())
    });
}

/// `tmpfs = { "/run" = "16MiB" }`: absolute paths, each with a size more than zero. Overlaps
/// (with each other and with volumes) are checked once the service is whole.
fn check_tmpfs(
    raw: &Spanned<Named<Field<toml::Value>>>,
    prefix: &str,
    issues: &mut Issues,
) -> Option<At<Vec<TmpfsMount>>> {
    let mut mounts = Vec::new();
    let mut ok = true;
    for (path, size) in raw.get_ref() {
        let field = join(prefix, path.get_ref());
        if let Err(message) = values::mount_path(path.get_ref()) {
            issues.push(path.span(), &field, message);
            ok = false;
            continue;
        }
        match check_field(size, &field, issues, |v| {
            values::size(v).and_then(values::nonzero_size)
        }) {
            Some(bytes) => mounts.push(TmpfsMount {
                path: path.get_ref().clone(),
                bytes: bytes.value,
            }),
            None => ok = false,
        }
    }
    ok.then(|| At {
        value: mounts,
        loc: Loc {
            span: raw.span(),
            field: prefix.to_owned(),
        },
    })
}

fn check_health(raw: &RawHealth, prefix: &str, issues: &mut Issues, partial: &mut Partial) {
    let path = |name: &str| join(prefix, name);
    let u32_max = i64::from(u32::MAX);
    partial.health_path = leaf(&raw.path, &path("path"), issues, |p| {
        if p.starts_with('/') && !p.contains(char::is_whitespace) {
            Ok(p.clone())
        } else {
            Err(format!(
                "{p:?} must be a path starting with '/', e.g. \"/healthz\""
            ))
        }
    });
    partial.health_kind = leaf(&raw.kind, &path("kind"), issues, |k| match k.as_str() {
        "http" => Ok(Kind::Http),
        "tcp" => Ok(Kind::Tcp),
        "exec" => Ok(Kind::Exec),
        "none" => Ok(Kind::None),
        other => Err(format!(
            "unknown health kind {other:?} (known: \"http\", \"tcp\", \"exec\", \"none\")"
        )),
    });
    partial.health_command = leaf(&raw.command, &path("command"), issues, health_command);
    partial.start_period = leaf(&raw.start_period, &path("start_period"), issues, |d| {
        values::duration(d)
    });
    partial.interval = leaf(&raw.interval, &path("interval"), issues, positive_duration);
    partial.timeout = leaf(&raw.timeout, &path("timeout"), issues, positive_duration);
    partial.healthy_after = leaf(
        &raw.healthy_after,
        &path("healthy_after"),
        issues,
        integer_in(1, u32_max),
    );
    partial.unhealthy_after = leaf(
        &raw.unhealthy_after,
        &path("unhealthy_after"),
        issues,
        integer_in(1, u32_max),
    );
    partial.events_caught_up = leaf(
        &raw.events_caught_up,
        &path("events_caught_up"),
        issues,
        |b| Ok::<bool, String>(*b),
    );
}

/// What a health probe does, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Http,
    Tcp,
    Exec,
    None,
}

/// An exec health command: a list is run as it is (Docker's `CMD`), a string by
/// `/bin/sh -c` (Docker's `CMD-SHELL`).
fn health_command(value: &toml::Value) -> Result<Vec<String>, String> {
    let command = match value {
        toml::Value::String(text) if !text.trim().is_empty() => {
            vec!["/bin/sh".to_owned(), "-c".to_owned(), text.clone()]
        }
        toml::Value::Array(words) => words
            .iter()
            .map(|w| w.as_str().map(str::to_owned))
            .collect::<Option<Vec<String>>>()
            .ok_or("a command list holds strings only: [\"pg_isready\", \"-q\"]")?,
        toml::Value::String(_) => Vec::new(),
        _ => {
            return Err(
                "a command is a list (run as it is) or a string (run by /bin/sh -c)".to_owned(),
            );
        }
    };
    if command.first().is_none_or(|program| program.is_empty()) {
        return Err("the command needs a program: [\"pg_isready\", \"-q\"]".to_owned());
    }
    Ok(command)
}

fn check_deploy(raw: &RawDeploy, prefix: &str, issues: &mut Issues, partial: &mut Partial) {
    let path = |name: &str| join(prefix, name);
    let u32_max = i64::from(u32::MAX);
    partial.strategy = leaf(&raw.strategy, &path("strategy"), issues, |s| {
        match s.as_str() {
            "rolling" => Ok(Strategy::Rolling),
            "recreate" => Ok(Strategy::Recreate),
            other => Err(format!(
                "unknown strategy {other:?} (known: \"rolling\", \"recreate\")"
            )),
        }
    });
    partial.max_surge = leaf(
        &raw.max_surge,
        &path("max_surge"),
        issues,
        integer_in(0, u32_max),
    );
    partial.max_unavailable = leaf(
        &raw.max_unavailable,
        &path("max_unavailable"),
        issues,
        integer_in(0, u32_max),
    );
    partial.health_deadline = leaf(
        &raw.health_deadline,
        &path("health_deadline"),
        issues,
        positive_duration,
    );
    partial.keep_releases = leaf(
        &raw.keep_releases,
        &path("keep_releases"),
        issues,
        integer_in(1, u32_max),
    );
}

fn check_limits(raw: &RawLimits, prefix: &str, issues: &mut Issues, partial: &mut Partial) {
    let path = |name: &str| join(prefix, name);
    let positive_size = |value: &toml::Value| values::size(value).and_then(values::nonzero_size);
    partial.memory = leaf(&raw.memory, &path("memory"), issues, positive_size);
    partial.tmp = leaf(&raw.tmp, &path("tmp"), issues, positive_size);
    partial.log = leaf(&raw.log, &path("log"), issues, positive_size);
    partial.log_age = leaf(&raw.log_age, &path("log_age"), issues, positive_duration);
    partial.pids = leaf(&raw.pids, &path("pids"), issues, integer_in(0, i64::MAX));
    partial.cpu = leaf(&raw.cpu, &path("cpu"), issues, values::cpu_millis);
}

fn check_volumes(
    raw: &Spanned<Named<Field<String>>>,
    prefix: &str,
    issues: &mut Issues,
) -> Option<At<Vec<VolumeMount>>> {
    let mut mounts: Vec<VolumeMount> = Vec::new();
    let mut ok = true;
    for (name, path) in raw.get_ref() {
        let field = join(prefix, name.get_ref());
        if let Err(message) = values::dns_label("volume", name.get_ref()) {
            issues.push(name.span(), &field, message);
            ok = false;
            continue;
        }
        let Some(path) = check_field(path, &field, issues, |p| {
            values::mount_path(p).map(|()| p.clone())
        }) else {
            ok = false;
            continue;
        };
        if let Some(other) = mounts.iter().find(|m| m.path == path.value) {
            issues.push(
                path.loc.span,
                &field,
                format!(
                    "{:?} is already where volume {:?} is mounted",
                    path.value, other.name
                ),
            );
            ok = false;
            continue;
        }
        mounts.push(VolumeMount {
            name: name.get_ref().clone(),
            path: path.value,
        });
    }
    ok.then(|| At {
        value: mounts,
        loc: Loc {
            span: raw.span(),
            field: prefix.to_owned(),
        },
    })
}

/// A base service as checked: its table's place, and its fields.
struct BaseService {
    span: Range<usize>,
    partial: Partial,
}

/// Fills in defaults and checks what spans several fields. `None` when something is
/// missing or contradictory (reported).
fn resolve_service(
    name: &str,
    base: &BaseService,
    merged: &Partial,
    environment: &str,
    issues: &mut Issues,
) -> Option<Service> {
    let in_environment = if environment == DEFAULT_ENVIRONMENT {
        String::new()
    } else {
        format!(" (in environment {environment:?})")
    };
    // Every whole-service rule is checked before giving up, so each is reported. A missing
    // port is not one: the deploy takes the image's EXPOSE, and refuses a service that needs
    // a port (a route, or a check that connects to it) when the image exposes none.
    let port = merged.port.as_ref().map(|p| p.value);
    let (kind, health_ok) = health_kind(name, merged, &in_environment, issues);
    let threads_ok = match (&merged.route_threads, &merged.route) {
        (Some(threads), None) => {
            issues.push(
                threads.loc.span.clone(),
                threads.loc.field.clone(),
                format!("route_threads needs a route{in_environment}"),
            );
            false
        }
        _ => true,
    };
    let srv_ok = match (&merged.srv_name, &merged.route) {
        (Some(srv), None) => {
            issues.push(
                srv.loc.span.clone(),
                srv.loc.field.clone(),
                format!("srv_name names a route's SRV record: it needs a route{in_environment}"),
            );
            false
        }
        _ => true,
    };
    let volumes = merged
        .volumes
        .as_ref()
        .map(|v| v.value.clone())
        .unwrap_or_default();
    let tmpfs = merged
        .tmpfs
        .as_ref()
        .map(|t| t.value.clone())
        .unwrap_or_default();
    let mounts = crate::runtime::settings::check_mounts(&volumes, &tmpfs);
    if let Err(error) = &mounts {
        let (span, field) = merged.tmpfs.as_ref().map_or_else(
            || (base.span.clone(), format!("services.{name}")),
            |at| (at.loc.span.clone(), at.loc.field.clone()),
        );
        issues.push(span, field, format!("{error}{in_environment}"));
    }
    let max_surge = merged.max_surge.as_ref().map_or(1, |m| m.value);
    let max_unavailable = merged.max_unavailable.as_ref().map_or(0, |m| m.value);
    let surge_ok = max_surge > 0 || max_unavailable > 0;
    if !surge_ok {
        let loc = merged
            .max_surge
            .as_ref()
            .or(merged.max_unavailable.as_ref())
            .map(|at| at.loc.clone())
            .expect("both are zero, so one was written");
        issues.push(
            loc.span,
            loc.field,
            format!(
                "max_surge + max_unavailable must be at least 1, or a deploy could never \
                 replace an instance{in_environment}"
            ),
        );
    }
    let stateful_ok = check_stateful(name, merged, &volumes, &in_environment, issues);
    let phoenix = merged.phoenix.resolve(&in_environment, issues);
    let phoenix_ok = phoenix.is_some() || !merged.phoenix.written();
    if !(surge_ok && health_ok && stateful_ok && threads_ok && srv_ok && phoenix_ok)
        || mounts.is_err()
    {
        return None;
    }
    let value =
        |at: &Option<At<Duration>>, default: Duration| at.as_ref().map_or(default, |a| a.value);
    let count = |at: &Option<At<u32>>, default: u32| at.as_ref().map_or(default, |a| a.value);
    let bytes = |at: &Option<At<u64>>| at.as_ref().map(|a| a.value);
    Some(Service {
        name: name.to_owned(),
        instances: count(&merged.instances, 1),
        port,
        route: merged.route.as_ref().map(|r| r.value.listen),
        route_kind: merged
            .route
            .as_ref()
            .map_or(RouteKind::Http, |r| r.value.kind),
        route_threads: merged.route_threads.as_ref().map(|t| t.value),
        srv_name: merged.srv_name.as_ref().map(|s| s.value.clone()),
        command: merged.command.as_ref().map(|c| c.value.clone()),
        entrypoint: merged.entrypoint.as_ref().map(|e| e.value.clone()),
        user: merged.user.as_ref().map(|u| u.value.clone()),
        env: merged
            .env
            .iter()
            .filter_map(|(k, v)| match &v.value {
                values::EnvValue::Plain(text) => Some((k.clone(), text.clone())),
                values::EnvValue::Secret(_) => None,
            })
            .collect(),
        secrets: merged
            .env
            .iter()
            .filter_map(|(k, v)| match &v.value {
                values::EnvValue::Secret(name) => Some((k.clone(), name.clone())),
                values::EnvValue::Plain(_) => None,
            })
            .collect(),
        health: HealthCheck {
            kind: match kind {
                Kind::Http => HealthKind::Http,
                Kind::Tcp => HealthKind::Tcp,
                Kind::Exec => HealthKind::Exec {
                    command: merged
                        .health_command
                        .as_ref()
                        .map(|c| c.value.clone())
                        .unwrap_or_default(),
                },
                Kind::None => HealthKind::None,
            },
            start_period: value(&merged.start_period, Duration::ZERO),
            path: merged
                .health_path
                .as_ref()
                .map_or_else(|| "/healthz".to_owned(), |p| p.value.clone()),
            interval: value(&merged.interval, Duration::from_secs(1)),
            timeout: value(&merged.timeout, Duration::from_secs(1)),
            healthy_after: count(&merged.healthy_after, 2),
            unhealthy_after: count(&merged.unhealthy_after, 3),
        },
        health_table: merged.health_table,
        events_caught_up: merged.events_caught_up.as_ref().is_some_and(|e| e.value),
        deploy: DeployPolicy {
            strategy: match (&merged.strategy, &merged.stateful) {
                (Some(strategy), _) => strategy.value,
                (None, Some(stateful)) if stateful.value => Strategy::Recreate,
                (None, _) => Strategy::Rolling,
            },
            max_surge,
            max_unavailable,
            health_deadline: value(&merged.health_deadline, Duration::from_secs(30)),
            keep_releases: count(&merged.keep_releases, super::DEFAULT_KEEP_RELEASES),
        },
        stop_grace: value(&merged.stop_grace, Duration::from_secs(10)),
        host_network: merged.host_network.as_ref().is_some_and(|h| h.value),
        outbound: merged.outbound.as_ref().is_none_or(|o| o.value),
        drift: super::Drift {
            interval: merged.drift_interval.as_ref().map(|i| i.value),
            exec_tmp: merged.exec_tmp.as_ref().is_some_and(|e| e.value),
            allow_exec: merged
                .allow_exec
                .as_ref()
                .map(|a| a.value.clone())
                .unwrap_or_default(),
        },
        phoenix,
        volumes,
        tmpfs,
        limits: Limits {
            memory_bytes: bytes(&merged.memory),
            pids: bytes(&merged.pids),
            cpu_millis: bytes(&merged.cpu),
            tmp_bytes: bytes(&merged.tmp),
            log_bytes: bytes(&merged.log),
            log_age_s: merged.log_age.as_ref().map(|a| a.value.as_secs().max(1)),
        },
    })
}

/// What a stop-first service needs, and what a volume allows: a named volume is owned by
/// one live instance at a time, so a service with one runs a single instance, and a
/// stateful service is not rolled. False when something contradicts that (reported).
fn check_stateful(
    name: &str,
    merged: &Partial,
    volumes: &[VolumeMount],
    in_environment: &str,
    issues: &mut Issues,
) -> bool {
    let mut ok = true;
    let stateful = merged.stateful.as_ref().filter(|s| s.value);
    let recreate = merged
        .strategy
        .as_ref()
        .filter(|s| s.value == Strategy::Recreate);
    if let (Some(stateful), Some(strategy)) = (stateful, &merged.strategy)
        && strategy.value == Strategy::Rolling
    {
        issues.push(
            strategy.loc.span.clone(),
            &strategy.loc.field,
            format!(
                "a stateful service is replaced stop-first: write strategy = \"recreate\" or \
                 leave it out (stateful = true at {}){in_environment}",
                stateful.loc.field
            ),
        );
        ok = false;
    }
    if stateful.is_some() || recreate.is_some() {
        for surge in [&merged.max_surge, &merged.max_unavailable]
            .into_iter()
            .flatten()
        {
            issues.push(
                surge.loc.span.clone(),
                &surge.loc.field,
                format!(
                    "a stop-first service never runs two instances of a release at once: \
                     leave max_surge and max_unavailable out{in_environment}"
                ),
            );
            ok = false;
        }
    }
    let instances = merged.instances.as_ref().filter(|i| i.value > 1);
    if let Some(instances) = instances
        && (stateful.is_some() || !volumes.is_empty())
    {
        let why = match volumes.first() {
            Some(volume) => format!(
                "volume {:?} is owned by one live instance at a time, so they cannot share it",
                volume.name
            ),
            None => "a stateful service runs a single instance".to_owned(),
        };
        issues.push(
            instances.loc.span.clone(),
            &instances.loc.field,
            format!(
                "service {name:?} has instances = {}: {why}{in_environment}",
                instances.value
            ),
        );
        ok = false;
    }
    ok
}

/// The kind of a service's health check: as written; `exec` when only a command is; else
/// `tcp` for a service with a TCP route, `http` for one with another route or a port and
/// `none` for one with neither (a worker).
/// False when the kind and the command contradict each other (reported).
fn health_kind(
    name: &str,
    merged: &Partial,
    in_environment: &str,
    issues: &mut Issues,
) -> (Kind, bool) {
    let written = merged.health_kind.as_ref();
    let command = merged.health_command.as_ref();
    match (written, command) {
        (Some(kind), None) if kind.value == Kind::Exec => {
            if !issues.mentions(&format!("services.{name}.health"), "command") {
                issues.push(
                    kind.loc.span.clone(),
                    &kind.loc.field,
                    format!(
                        "an exec health check needs a command, e.g. command = \
                         [\"pg_isready\", \"-q\"] or a string run by /bin/sh -c{in_environment}"
                    ),
                );
            }
            (Kind::Exec, false)
        }
        (Some(kind), Some(command)) if kind.value != Kind::Exec => {
            issues.push(
                command.loc.span.clone(),
                &command.loc.field,
                format!(
                    "a command is only run by kind = \"exec\", not {:?}{in_environment}",
                    format!("{:?}", kind.value).to_lowercase()
                ),
            );
            (kind.value, false)
        }
        (Some(kind), _) => (kind.value, true),
        (None, Some(_)) => (Kind::Exec, true),
        (None, None)
            if merged
                .route
                .as_ref()
                .is_some_and(|r| r.value.kind == RouteKind::Tcp) =>
        {
            (Kind::Tcp, true)
        }
        (None, None) if merged.route.is_some() || merged.port.is_some() => (Kind::Http, true),
        (None, None) => (Kind::None, true),
    }
}

/// `dir` joined with a path from the file, without `.` components.
fn resolve_path(dir: &Path, path: &str) -> PathBuf {
    dir.join(path)
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

pub(crate) fn validate(
    raw: &RawProject,
    dir: &Path,
    environment: &str,
    issues: &mut Issues,
) -> Option<Project> {
    let app = match &raw.app {
        Some(app) => check_field(app, "app", issues, |a| {
            values::dns_label("app", a).map(|()| a.clone())
        }),
        None => {
            issues.push(
                0..0,
                "app",
                "missing field \"app\": name the application, e.g. app = \"hello\"",
            );
            None
        }
    };
    let build = raw
        .build
        .as_ref()
        .and_then(|build| match &build.get_ref().command {
            Some(command) => check_field(command, "build.command", issues, |c| {
                if c.trim().is_empty() {
                    Err("the build command is empty".to_owned())
                } else {
                    Ok(BuildStep { command: c.clone() })
                }
            })
            .map(|at| at.value),
            None if issues.mentions("build", "command") => None,
            None => {
                issues.push(
                    build.span(),
                    "build",
                    "missing field \"command\": the command that builds the app",
                );
                None
            }
        });
    let non_empty = |p: &String| {
        if p.trim().is_empty() {
            Err("the path is empty".to_owned())
        } else {
            Ok(p.clone())
        }
    };
    let image = raw.image.as_ref().map(Spanned::get_ref);
    let containerfile = image
        .and_then(|i| leaf(&i.containerfile, "image.containerfile", issues, non_empty))
        .map_or_else(|| "Containerfile".to_owned(), |at| at.value);
    let context = image
        .and_then(|i| leaf(&i.context, "image.context", issues, non_empty))
        .map_or_else(|| ".".to_owned(), |at| at.value);

    // Base services, checked once.
    let mut bases: BTreeMap<String, BaseService> = BTreeMap::new();
    match &raw.services {
        Some(services) if !services.get_ref().is_empty() => {
            for (name, service) in services.get_ref() {
                let prefix = format!("services.{}", name.get_ref());
                if let Err(message) = values::dns_label("service", name.get_ref()) {
                    issues.push(name.span(), &prefix, message);
                }
                let partial = check_service(service.get_ref(), &prefix, issues);
                bases.insert(
                    name.get_ref().clone(),
                    BaseService {
                        span: name.span(),
                        partial,
                    },
                );
            }
        }
        _ => issues.push(
            raw.services.as_ref().map_or(0..0, Spanned::span),
            "services",
            "no services: describe at least one in a [services.NAME] table",
        ),
    }

    // Every environment's overlays, checked once.
    let mut overlays: BTreeMap<String, BTreeMap<String, Partial>> = BTreeMap::new();
    overlays.insert(DEFAULT_ENVIRONMENT.to_owned(), BTreeMap::new());
    let mut runtimes: BTreeMap<String, super::RuntimeChoice> = BTreeMap::new();
    if let Some(environments) = &raw.environments {
        for (env_name, env) in environments.get_ref() {
            let env_prefix = format!("environments.{}", env_name.get_ref());
            if let Err(message) = values::dns_label("environment", env_name.get_ref()) {
                issues.push(env_name.span(), &env_prefix, message);
            }
            let raw_env = env.get_ref();
            let runtime = super::runtime::check(
                super::runtime::RawRuntime {
                    runtime: raw_env.runtime.as_ref(),
                    docker_host: raw_env.docker_host.as_ref(),
                    swarm_engines: raw_env.swarm_engines.as_ref(),
                    kube_server: raw_env.kube_server.as_ref(),
                    kube_registry: raw_env.kube_registry.as_ref(),
                    kube_namespace: raw_env.kube_namespace.as_ref(),
                },
                &env_prefix,
                issues,
            );
            runtimes.insert(env_name.get_ref().clone(), runtime);
            let mut services = BTreeMap::new();
            let declared = env.get_ref().services.as_ref().map(Spanned::get_ref);
            for (name, service) in declared.into_iter().flatten() {
                let prefix = format!("{env_prefix}.services.{}", name.get_ref());
                if !bases.contains_key(name.get_ref()) {
                    let known = quoted_list(bases.keys().map(String::as_str));
                    let hint = did_you_mean(name.get_ref(), bases.keys().map(String::as_str));
                    issues.push(
                        name.span(),
                        &prefix,
                        format!(
                            "no service {:?} in [services] to override (known: {known}){hint}",
                            name.get_ref()
                        ),
                    );
                    continue;
                }
                services.insert(
                    name.get_ref().clone(),
                    check_service(service.get_ref(), &prefix, issues),
                );
            }
            overlays.insert(env_name.get_ref().clone(), services);
        }
    }

    if !overlays.contains_key(environment) {
        let known = || overlays.keys().map(String::as_str);
        issues.push(
            raw.environments.as_ref().map_or(0..0, Spanned::span),
            "environments",
            format!(
                "environment {environment:?} is not defined (known: {}){}",
                quoted_list(known()),
                did_you_mean(environment, known())
            ),
        );
    }

    // Resolve every environment, the requested one last kept. The default environment goes
    // first so a problem in the base is reported without an environment's name.
    let mut order: Vec<&String> = overlays.keys().collect();
    order.sort_by_key(|name| name.as_str() != DEFAULT_ENVIRONMENT);
    let mut wanted = None;
    for env_name in order {
        let mut services = BTreeMap::new();
        let mut routes: Vec<(String, At<values::Route>)> = Vec::new();
        for (name, base) in &bases {
            let merged = match overlays[env_name].get(name) {
                Some(overlay) => base.partial.overlaid(overlay),
                None => base.partial.clone(),
            };
            if let Some(route) = &merged.route {
                if let Some((other, _)) = routes
                    .iter()
                    .find(|(_, r)| values::routes_overlap(r.value.listen, route.value.listen))
                {
                    let in_environment = if env_name == DEFAULT_ENVIRONMENT {
                        String::new()
                    } else {
                        format!(" in environment {env_name:?}")
                    };
                    issues.push(
                        route.loc.span.clone(),
                        &route.loc.field,
                        format!(
                            "{} overlaps the route of service {other:?}{in_environment}: \
                             two services cannot share a listening address",
                            route.value
                        ),
                    );
                } else {
                    routes.push((name.clone(), route.clone()));
                }
            }
            if let Some(service) = resolve_service(name, base, &merged, env_name, issues) {
                services.insert(name.clone(), service);
            }
        }
        if env_name == environment {
            wanted = Some(services);
        }
    }

    let names: Vec<&str> = bases.keys().map(String::as_str).collect();
    let logs = super::logs::check(raw.logs.as_ref(), &names, issues);
    let dns = super::dns::check(raw.dns.as_ref(), issues);
    // Every environment's `[chaos]` is checked, so a production typo fails on a laptop too;
    // the requested one is kept (a problem in the top-level table is said once).
    let mut chaos = super::chaos::check(raw.chaos.as_ref(), None, &names, issues);
    for (name, env) in raw.environments.iter().flat_map(|envs| envs.get_ref()) {
        let overlay = env
            .get_ref()
            .chaos
            .as_ref()
            .map(|c| (c, name.get_ref().as_str()));
        if overlay.is_none() && name.get_ref() != environment {
            continue;
        }
        let checked = super::chaos::check(raw.chaos.as_ref(), overlay, &names, issues);
        if name.get_ref() == environment {
            chaos = checked;
        }
    }

    if !issues.is_empty() {
        return None;
    }
    Some(Project {
        app: app?.value,
        dir: dir.to_owned(),
        environment: environment.to_owned(),
        build,
        image: ImageSource {
            containerfile: resolve_path(dir, &containerfile),
            context: resolve_path(dir, &context),
        },
        services: wanted?,
        logs,
        dns,
        chaos,
        runtime: runtimes.remove(environment).unwrap_or_default(),
    })
}
