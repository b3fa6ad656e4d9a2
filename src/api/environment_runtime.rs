//! Which runtime an environment's controller drives: graven.toml's `runtime` for the
//! environment, as the deploy request carries it, recorded beside the environment's event
//! log (`apps/<app>/<env>/runtime.json`) so a restarted daemon resumes each controller on
//! the runtime its instances are on. `local` is the daemon's own runtime (the embedded one,
//! or the tests' fake the daemon was started with).

use std::path::Path;

use super::ApiError;
use crate::runtime::{AnyRuntime, DockerRuntime, SwarmRuntime};
use crate::spec::RuntimeChoice;

const FILE: &str = "runtime.json";

/// The choice recorded in the environment's directory `dir`, if any.
pub fn recorded(dir: &Path) -> Option<RuntimeChoice> {
    let bytes = std::fs::read(dir.join(FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The runtime for the environment in `dir`: `choice` (recorded when it is new), else the
/// recorded one, else the daemon's own.
pub fn open(
    home: &Path,
    dir: &Path,
    choice: Option<&RuntimeChoice>,
    own: &AnyRuntime,
) -> Result<AnyRuntime, ApiError> {
    let choice = match choice {
        Some(choice) => {
            if recorded(dir).as_ref() != Some(choice) {
                let bytes = serde_json::to_vec(choice).expect("a runtime choice serializes");
                crate::store::write_atomic(&dir.join(FILE), &bytes).map_err(|e| {
                    ApiError::Runtime {
                        runtime: choice.name(),
                        message: e.to_string(),
                    }
                })?;
            }
            choice.clone()
        }
        None => recorded(dir).unwrap_or_default(),
    };
    match choice {
        RuntimeChoice::Local => Ok(own.clone()),
        // Its releases are applied by `graven deploy` through the cluster's API, and the
        // cluster's own controllers run them: no controller of graven's has instances there.
        RuntimeChoice::Kubernetes { .. } => Err(ApiError::Runtime {
            runtime: "kubernetes",
            message: "the control plane does not run kubernetes environments: `graven deploy` \
                      applies them through the cluster's API (docs/kubernetes.md)"
                .to_owned(),
        }),
        RuntimeChoice::Docker { host } => {
            let host = crate::runtime::docker::engine_host(host.as_deref());
            DockerRuntime::open(home, &host)
                .map(AnyRuntime::Docker)
                .map_err(|e| ApiError::Runtime {
                    runtime: "docker",
                    message: e.to_string(),
                })
        }
        RuntimeChoice::Swarm { host, engines } => {
            let host = crate::runtime::docker::engine_host(host.as_deref());
            SwarmRuntime::open(home, &host, &engines)
                .map(AnyRuntime::Swarm)
                .map_err(|e| ApiError::Runtime {
                    runtime: "swarm",
                    message: e.to_string(),
                })
        }
    }
}
