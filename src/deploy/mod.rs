//! The deploy use case, from a project to what the controller is asked for: run the
//! project's build step, bake its image (every unchanged step from the cache), and describe
//! each service's next release with its resolved config and where it came from. The CLI,
//! and the HTTP API and dashboard to come, call this; the controller then computes each
//! config's digest and decides whether it is a new release. Nothing here touches what runs:
//! a failed build or bake leaves every release as it was.

mod image;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::bake::{self, BakeOptions, Progress};
use crate::controller::{DeployOrder, ServiceRelease};
use crate::events::{HealthConfig, HealthKind, SecretRef, ServiceConfig, ServiceName, Source};
use crate::secrets::{Secrets, SecretsError};
use crate::spec::{DEFAULT_ENVIRONMENT, Project, Service};
use crate::store::Digest;

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    SecretStore(SecretsError),
    #[error("service {service}: {source}{hint}")]
    Secret {
        service: String,
        source: SecretsError,
        /// How to set a secret that is not set.
        hint: String,
    },
    #[error("running the build step {command:?}: {source}")]
    BuildSpawn {
        command: String,
        source: std::io::Error,
    },
    #[error("the build step {command:?} failed ({status})")]
    BuildFailed {
        command: String,
        status: std::process::ExitStatus,
    },
    #[error("reading image {image}: {source}")]
    ImageRead {
        image: Digest,
        source: crate::store::StoreError,
    },
    #[error("service {service}: {source}")]
    HealthCommand {
        service: String,
        source: crate::runtime::RuntimeError,
    },
    /// The service cannot run from the image as configured (a port, a VOLUME, a user).
    #[error("service {service}: {message}")]
    Image { service: String, message: String },
    #[error("baking {context}: {source}")]
    Bake {
        context: String,
        source: bake::BakeError,
    },
}

/// What preparing a deploy reports as it goes.
pub enum Step<'a> {
    /// The build step is about to run (its output goes to stderr).
    Build { command: &'a str },
    /// A bake step finished.
    Baked(Progress<'a>),
}

/// Pins the latest version of every secret the services name (first: a missing one fails
/// the deploy before any work), runs the build step, bakes the image and describes each
/// service's next release; `resume` is `graven up`'s (see `DeployOrder::resume`).
pub fn prepare(
    home: &Path,
    project: &Project,
    resume: bool,
    progress: &mut dyn FnMut(Step<'_>),
) -> Result<DeployOrder, DeployError> {
    let pinned = pin_all(home, project)?;
    if let Some(build) = &project.build {
        progress(Step::Build {
            command: &build.command,
        });
        let mut command = std::process::Command::new("sh");
        command
            .arg("-c")
            .arg(&build.command)
            .current_dir(&project.dir)
            .stdout(Stdio::from(std::io::stderr()));
        if let Some(restore) = crate::proxy::limits::restore_in_child() {
            // SAFETY: the hook only calls getrlimit and setrlimit, which are async-signal-safe
            // and allocate nothing.
            unsafe { std::os::unix::process::CommandExt::pre_exec(&mut command, restore) };
        }
        let status = command.status().map_err(|source| DeployError::BuildSpawn {
            command: build.command.clone(),
            source,
        })?;
        if !status.success() {
            return Err(DeployError::BuildFailed {
                command: build.command.clone(),
                status,
            });
        }
    }
    let image = bake_image(home, project, progress)?;
    describe(home, project, image, pinned, resume)
}

/// What [`prepare`] does after the bake, for an image already in the store (`graven render
/// --image`, `graven deploy --runtime kubernetes --image`): pins the secrets the services name
/// and describes each service's release from `image`. Nothing is built or baked.
pub fn prepare_image(
    home: &Path,
    project: &Project,
    image: Digest,
) -> Result<DeployOrder, DeployError> {
    let pinned = pin_all(home, project)?;
    describe(home, project, image, pinned, false)
}

/// The latest version of every secret each service names, by service.
fn pin_all(
    home: &Path,
    project: &Project,
) -> Result<BTreeMap<String, BTreeMap<String, SecretRef>>, DeployError> {
    let store = Secrets::open(home, &project.app, &project.environment)
        .map_err(DeployError::SecretStore)?;
    let mut pinned = BTreeMap::new();
    for service in project.services.values() {
        pinned.insert(service.name.clone(), pin(&store, project, service)?);
    }
    Ok(pinned)
}

/// Each service's release from the baked `image`, with the secrets `pinned` for it.
fn describe(
    home: &Path,
    project: &Project,
    image: Digest,
    mut pinned: BTreeMap<String, BTreeMap<String, SecretRef>>,
    resume: bool,
) -> Result<DeployOrder, DeployError> {
    let image_config = crate::store::Store::open(home)
        .and_then(|store| store.image(&image))
        .map_err(|source| DeployError::ImageRead {
            image: image.clone(),
            source,
        })?
        .config
        .config;
    let mut services = Vec::new();
    for service in project.services.values() {
        let mut config = ServiceConfig {
            secrets: pinned.remove(&service.name).unwrap_or_default(),
            ..ServiceConfig::from(service)
        };
        // Without a health table in graven.toml, the image's own HEALTHCHECK counts.
        if !service.health_table
            && let Some(check) = &image_config.healthcheck
            && let Some(health) = image_health(check, image_shell(&image_config), &config.health)
        {
            config.health = health;
        }
        if config.health.kind == HealthKind::Exec {
            check_health_command(home, &image, &service.name, &config.health.command)?;
        }
        // The image's port, volumes and user, once the health check is known (whether the
        // service needs a port depends on it).
        image::complete(home, &image, service, &mut config)?;
        services.push(ServiceRelease {
            service: ServiceName::new(&service.name),
            image: image.clone(),
            config,
        });
    }
    Ok(DeployOrder {
        services,
        source: Some(Source {
            host: crate::actor::host(),
            dir: project.dir.display().to_string(),
        }),
        resume,
        chaos: project.chaos.clone().map(Box::new),
    })
}

/// An image's HEALTHCHECK (Docker's `Healthcheck` object) as a release's health check, read
/// as Docker reads it: `CMD` runs its words, `CMD-SHELL` its text through the image's SHELL
/// (`/bin/sh -c` when it sets none), `NONE` disables the check (the instance counts as
/// healthy while it runs, checked at the service's own interval and thresholds); an unset or zero interval and timeout are 30 s, unset or zero
/// retries 3, the start period 0; one pass makes an instance healthy, as it does a Docker
/// container, and `retries` consecutive failures unhealthy. An empty test (inherit, with
/// nothing to inherit) is no check at all: None, and the service keeps its default. What
/// graven.toml does not say about probes (the http path) is kept from `default`.
pub fn image_health(
    check: &crate::store::HealthConfig,
    shell: Vec<String>,
    default: &HealthConfig,
) -> Option<HealthConfig> {
    const DOCKER_DEFAULT: Duration = Duration::from_secs(30);
    let nanos = |value: Option<u64>| {
        value
            .filter(|&n| n > 0)
            .map_or(DOCKER_DEFAULT, Duration::from_nanos)
    };
    let (kind, command) = match check.test.split_first() {
        None => return None,
        // Nothing to probe: the service's own pace of checking that the process runs.
        Some((first, _)) if first == "NONE" => {
            return Some(HealthConfig {
                kind: HealthKind::None,
                command: Vec::new(),
                from_image: true,
                ..default.clone()
            });
        }
        Some((first, words)) if first == "CMD" && !words.is_empty() => {
            (HealthKind::Exec, words.to_vec())
        }
        Some((first, [text])) if first == "CMD-SHELL" => {
            let mut command = shell;
            command.push(text.clone());
            (HealthKind::Exec, command)
        }
        // Docker refuses anything else when the container is made.
        Some(_) => return None,
    };
    Some(HealthConfig {
        kind,
        command,
        interval: nanos(check.interval),
        timeout: nanos(check.timeout),
        healthy_after: 1,
        unhealthy_after: check.retries.filter(|&n| n > 0).unwrap_or(3),
        start_period: check
            .start_period
            .map_or(Duration::ZERO, Duration::from_nanos),
        from_image: true,
        ..default.clone()
    })
}

/// The shell CMD-SHELL runs in: the image's SHELL, else `/bin/sh -c`.
fn image_shell(config: &crate::store::RuntimeConfig) -> Vec<String> {
    config
        .other
        .get("Shell")
        .and_then(|shell| serde_json::from_value::<Vec<String>>(shell.clone()).ok())
        .filter(|shell| !shell.is_empty())
        .unwrap_or_else(|| vec!["/bin/sh".to_owned(), "-c".to_owned()])
}

/// Refuses a deploy whose exec health command is not in its image, before anything starts.
fn check_health_command(
    home: &Path,
    image: &Digest,
    service: &str,
    command: &[String],
) -> Result<(), DeployError> {
    crate::runtime::LocalRuntime::open(home)
        .and_then(|runtime| runtime.check_probe_command(image, command))
        .map_err(|source| DeployError::HealthCommand {
            service: service.to_owned(),
            source,
        })
}

/// Bakes the project's image and tags it `<app>:<environment>`.
fn bake_image(
    home: &Path,
    project: &Project,
    progress: &mut dyn FnMut(Step<'_>),
) -> Result<Digest, DeployError> {
    let options = BakeOptions {
        context: project.dir.join(&project.image.context),
        containerfile: Some(project.dir.join(&project.image.containerfile)),
        tag: format!("{}:{}", project.app, project.environment),
        build_args: BTreeMap::new(),
        epoch: 0,
        target: None,
        no_cache: false,
        secrets: Default::default(),
    };
    let baked =
        bake::bake(home, &options, &mut |step| progress(Step::Baked(step))).map_err(|source| {
            DeployError::Bake {
                context: options.context.display().to_string(),
                source,
            }
        })?;
    Ok(baked.digest)
}

/// The version of each secret `service` names that the release pins: the latest. A secret
/// that is not set fails the deploy, saying how to set it.
fn pin(
    store: &Secrets,
    project: &Project,
    service: &Service,
) -> Result<BTreeMap<String, SecretRef>, DeployError> {
    let pinned = crate::secrets::resolve(store, &service.secrets).map_err(|source| {
        let hint = match &source {
            SecretsError::NotSet { name, .. } => {
                let env = if project.environment == DEFAULT_ENVIRONMENT {
                    String::new()
                } else {
                    format!(" --env {}", project.environment)
                };
                format!(": graven secrets set {name}{env}")
            }
            _ => String::new(),
        };
        DeployError::Secret {
            service: service.name.clone(),
            source,
            hint,
        }
    })?;
    Ok(pinned
        .into_iter()
        .map(|(variable, secret)| {
            let reference = SecretRef {
                name: secret.name,
                version: secret.version,
            };
            (variable, reference)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    /// An image's Healthcheck (Docker's JSON) and SHELL in, the release's check out.
    fn check(healthcheck: &str, shell: Option<&[&str]>, expected: Expect) {
        let healthcheck: crate::store::HealthConfig = serde_json::from_str(healthcheck).unwrap();
        let mut config = crate::store::RuntimeConfig {
            healthcheck: Some(healthcheck.clone()),
            ..Default::default()
        };
        if let Some(shell) = shell {
            config
                .other
                .insert("Shell".to_owned(), serde_json::json!(shell));
        }
        let default = ServiceConfig::test(1, 1, 0).health;
        let got = image_health(&healthcheck, image_shell(&config), &default);
        expected.assert_eq(&format!("{got:?}"));
    }

    /// Docker's reading, which each case follows: `CMD` runs its words, `CMD-SHELL` its text
    /// through the image's SHELL or `/bin/sh -c`, `NONE` disables checking; an unset or zero
    /// interval or timeout is 30 s, unset or zero retries 3, start period 0; a container is
    /// healthy after one pass and unhealthy after `retries` failures in a row; an empty test
    /// inherits, and with nothing to inherit there is no check.
    #[test]
    fn an_images_healthcheck_reads_as_docker_reads_it() {
        check(
            r#"{"Test": ["CMD", "pg_isready", "-q"]}"#,
            None,
            expect![[
                r#"Some(HealthConfig { path: "/healthz", interval: 30s, timeout: 30s, healthy_after: 1, unhealthy_after: 3, kind: Exec, command: ["pg_isready", "-q"], start_period: 0ns, from_image: true, events_caught_up: false })"#
            ]],
        );
        check(
            r#"{"Test": ["CMD-SHELL", "curl -f localhost || exit 1"], "Interval": 5000000000, "Timeout": 2000000000, "Retries": 5, "StartPeriod": 10000000000}"#,
            None,
            expect![[
                r#"Some(HealthConfig { path: "/healthz", interval: 5s, timeout: 2s, healthy_after: 1, unhealthy_after: 5, kind: Exec, command: ["/bin/sh", "-c", "curl -f localhost || exit 1"], start_period: 10s, from_image: true, events_caught_up: false })"#
            ]],
        );
        check(
            r#"{"Test": ["CMD-SHELL", "exit 0"], "Interval": 0, "Retries": 0}"#,
            Some(&["/bin/bash", "-o", "pipefail", "-c"]),
            expect![[
                r#"Some(HealthConfig { path: "/healthz", interval: 30s, timeout: 30s, healthy_after: 1, unhealthy_after: 3, kind: Exec, command: ["/bin/bash", "-o", "pipefail", "-c", "exit 0"], start_period: 0ns, from_image: true, events_caught_up: false })"#
            ]],
        );
        check(
            r#"{"Test": ["NONE"]}"#,
            None,
            expect![[
                r#"Some(HealthConfig { path: "/healthz", interval: 1s, timeout: 1s, healthy_after: 1, unhealthy_after: 2, kind: None, command: [], start_period: 0ns, from_image: true, events_caught_up: false })"#
            ]],
        );
        check(r#"{"Test": []}"#, None, expect![[r#"None"#]]);
        check(r#"{"Test": ["CMD"]}"#, None, expect![[r#"None"#]]);
        check(r#"{"Test": ["PING"]}"#, None, expect![[r#"None"#]]);
    }
}
