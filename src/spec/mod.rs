//! The spec owns `graven.toml`: parsing it into a raw type that rejects unknown fields,
//! validating that into the typed `Project`, and reporting every problem at once with line,
//! column and field. Pure: it reads one file and touches nothing else.

mod chaos;
pub mod dns;
pub mod logs;
mod phoenix;
mod problem;
mod raw;
pub mod runtime;
mod validate;
mod values;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::proxy::HealthCheck;
use crate::runtime::{Limits, TmpfsMount, VolumeMount};

pub use problem::{Problem, SpecErrors};
pub use runtime::RuntimeChoice;
pub use validate::DEFAULT_ENVIRONMENT;
pub(crate) use values::dns_label;
pub use values::nonzero_size;

/// The project file's name inside a project directory.
pub const FILE_NAME: &str = "graven.toml";

/// Reads and validates `dir/graven.toml` for `environment`.
pub fn load(dir: &Path, environment: &str) -> Result<Project, SpecErrors> {
    let file = dir.join(FILE_NAME);
    match std::fs::read_to_string(&file) {
        Ok(source) => parse(&source, &file, dir, environment),
        Err(error) => Err(SpecErrors {
            problems: vec![Problem {
                file,
                line: 0,
                column: 0,
                field: String::new(),
                message: format!("cannot read the project file: {error}"),
            }],
        }),
    }
}

/// Validates the text of a `graven.toml` for `environment`; pure. `file` names the source
/// in problems, `dir` is the project directory relative paths are resolved against. Every
/// problem is reported at once, in file order.
pub fn parse(
    source: &str,
    file: &Path,
    dir: &Path,
    environment: &str,
) -> Result<Project, SpecErrors> {
    let mut issues = problem::Issues::default();
    let project = raw::read(source, &mut issues)
        .and_then(|raw| validate::validate(&raw, dir, environment, &mut issues));
    match project {
        Some(project) if issues.is_empty() => Ok(project),
        _ => Err(issues.into_errors(source, file)),
    }
}

/// A validated `graven.toml`, resolved for one environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    pub app: String,
    /// The directory holding `graven.toml`; relative paths are resolved against it.
    pub dir: PathBuf,
    pub environment: String,
    pub build: Option<BuildStep>,
    pub image: ImageSource,
    pub services: BTreeMap<String, Service>,
    /// `[logs]`: syslog listening and forwarding.
    pub logs: logs::Logs,
    /// `[dns]`: the keys of graven's DNS server the project sets (none: the control plane's).
    pub dns: crate::dns::DnsSettings,
    /// `[chaos]` (overlaid by `[environments.ENV.chaos]`): planned failures; none when
    /// neither is written.
    pub chaos: Option<crate::chaos::ChaosConfig>,
    /// `[environments.ENV] runtime`: the backend the environment's instances run on.
    pub runtime: RuntimeChoice,
}

/// A command run before baking (compiling the app), from the project directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildStep {
    pub command: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSource {
    pub containerfile: PathBuf,
    pub context: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub instances: u32,
    /// `None`: the image's one exposed TCP port, read by the deploy; none at all for a
    /// service that listens on no port (a worker: no route, and a health check that does
    /// not connect).
    pub port: Option<u16>,
    pub route: Option<SocketAddr>,
    /// What the route speaks: HTTP (a reverse proxy) or TCP (bytes, at layer 4).
    pub route_kind: RouteKind,
    /// Threads the route serves on; None: one per core.
    pub route_threads: Option<u32>,
    /// The service name of its SRV record (`_NAME._tcp.…`); none: `http` for an HTTP route,
    /// the service's own name for a TCP one.
    pub srv_name: Option<String>,
    pub command: Option<Vec<String>>,
    /// Replaces the image's ENTRYPOINT (`command` replaces its CMD).
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's USER; checked against the image's files by the deploy.
    pub user: Option<String>,
    /// Plain env values, as written.
    pub env: BTreeMap<String, String>,
    /// Env variables whose value is a secret: variable → secret name. The value is read
    /// from the secret store only when an instance starts.
    pub secrets: BTreeMap<String, String>,
    pub health: HealthCheck,
    /// Whether graven.toml has a health table for it; without one the image's HEALTHCHECK,
    /// if it has one, is used instead (`deploy`).
    pub health_table: bool,
    /// `[services.NAME.health] events_caught_up`: a new instance is healthy only once it has
    /// also read the app event log up to its end as it stood at the instance's start.
    pub events_caught_up: bool,
    pub deploy: DeployPolicy,
    pub stop_grace: Duration,
    pub volumes: Vec<VolumeMount>,
    pub tmpfs: Vec<TmpfsMount>,
    pub limits: Limits,
    /// `network = "host"`: the host's network instead of one of its own.
    pub host_network: bool,
    /// `outbound = false`: no connection beyond graven's bridge.
    pub outbound: bool,
    /// `[services.NAME.drift]`.
    pub drift: Drift,
    /// `[services.NAME.phoenix]`; none: instances live until replaced for another reason.
    pub phoenix: Option<Phoenix>,
}

/// How a service's instances are recycled once they reach an age (docs/phoenix.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Phoenix {
    pub max_age: Duration,
    /// Each instance's due time is later by up to this much, taken from its name.
    pub jitter: Duration,
    /// When in the day recycles may start; none: at any time.
    pub window: Option<Window>,
    /// Recycles in flight at once.
    pub max_at_once: u32,
    /// A stop-first (stateful) service is recycled too.
    pub stop_first: bool,
}

/// A daily window of wall-clock time, as phoenix and chaos read it (`"02:00-05:00"`, with a
/// UTC offset or an IANA time zone after a space).
pub use crate::chaos::schedule::Window;

/// How drift is watched for in a service's instances (docs/drift.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Drift {
    /// How often the check runs; `None`: every minute.
    pub interval: Option<Duration>,
    /// Programs may run from /tmp, /dev/shm and tmpfs mounts.
    pub exec_tmp: bool,
    /// Paths inside the instance from which running a program is not drift.
    pub allow_exec: Vec<String>,
}

/// What a route speaks, as `route` says: `http://` (the default) or `tcp://`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    #[default]
    Http,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    Rolling,
    /// Stop-first: the old instance is gone before the new one starts (`stateful = true`).
    Recreate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeployPolicy {
    pub strategy: Strategy,
    pub max_surge: u32,
    pub max_unavailable: u32,
    /// New instances must be healthy within this long, or the deploy rolls back.
    pub health_deadline: Duration,
    /// How many of the service's newest releases keep their image through `graven gc`.
    pub keep_releases: u32,
}

/// `keep_releases` when `graven.toml` does not say: a few weeks of daily deploys to roll
/// back to, without every image ever deployed kept forever.
pub const DEFAULT_KEEP_RELEASES: u32 = 10;

#[cfg(test)]
mod tests;
