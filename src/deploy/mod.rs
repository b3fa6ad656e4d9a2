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

use crate::bake::{self, BakeOptions, Progress};
use crate::controller::{DeployOrder, ServiceRelease};
use crate::events::{SecretRef, ServiceConfig, ServiceName, Source};
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
    let store = Secrets::open(home, &project.app, &project.environment)
        .map_err(DeployError::SecretStore)?;
    let mut pinned = BTreeMap::new();
    for service in project.services.values() {
        pinned.insert(service.name.clone(), pin(&store, project, service)?);
    }
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
    let mut services = Vec::new();
    for service in project.services.values() {
        let mut config = ServiceConfig {
            secrets: pinned.remove(&service.name).unwrap_or_default(),
            ..ServiceConfig::from(service)
        };
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
