//! `runtime` and `docker_host` of `[environments.ENV]`: which backend runs the environment's
//! instances, so a laptop runs `local` and a server `docker` from the same file. Checked for
//! every environment (a typo in production's fails on a laptop too); the one asked for is
//! the project's. `swarm` and `kubernetes` are named in the grammar and refused as not built
//! yet, rather than read as a typo.

use super::problem::Issues;
use super::raw::Field;

/// The backend an environment runs on.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "runtime", rename_all = "snake_case")]
pub enum RuntimeChoice {
    /// The embedded local runtime (the default).
    #[default]
    Local,
    /// A Docker engine: at `host` (`unix:///PATH` or `tcp://HOST:PORT`), else
    /// `$DOCKER_HOST`, else the usual socket.
    Docker { host: Option<String> },
}

impl RuntimeChoice {
    /// The name as graven.toml spells it.
    pub fn name(&self) -> &'static str {
        match self {
            RuntimeChoice::Local => "local",
            RuntimeChoice::Docker { .. } => "docker",
        }
    }
}

/// The backends graven.toml names.
const BUILT: [&str; 2] = ["local", "docker"];
/// The ones it names but that are not built yet.
const NOT_BUILT: [&str; 2] = ["swarm", "kubernetes"];

/// Checks an environment's `runtime` and `docker_host` (either absent: local).
pub(crate) fn check(
    runtime: Option<&Field<String>>,
    docker_host: Option<&Field<String>>,
    prefix: &str,
    issues: &mut Issues,
) -> RuntimeChoice {
    let runtime_path = format!("{prefix}.runtime");
    let host_path = format!("{prefix}.docker_host");
    let name = match runtime {
        None => None,
        Some(field) => match &field.value {
            Err(message) => {
                issues.push(field.span.clone(), &runtime_path, message.clone());
                return RuntimeChoice::Local;
            }
            Ok(name) if BUILT.contains(&name.as_str()) => Some(name.clone()),
            Ok(name) if NOT_BUILT.contains(&name.as_str()) => {
                issues.push(
                    field.span.clone(),
                    &runtime_path,
                    format!("the {name} runtime is not built yet: use \"local\" or \"docker\""),
                );
                return RuntimeChoice::Local;
            }
            Ok(name) => {
                issues.push(
                    field.span.clone(),
                    &runtime_path,
                    format!(
                        "unknown runtime {name:?}: use \"local\" or \"docker\"{}",
                        super::problem::did_you_mean(name, BUILT.into_iter())
                    ),
                );
                return RuntimeChoice::Local;
            }
        },
    };
    let host = match docker_host {
        None => None,
        Some(field) => match field.value.clone().and_then(|h| check_host(&h).map(|()| h)) {
            Ok(host) if name.as_deref() == Some("docker") => Some(host),
            Ok(_) => {
                issues.push(
                    field.span.clone(),
                    &host_path,
                    "docker_host is the docker runtime's engine: set runtime = \"docker\" too",
                );
                None
            }
            Err(message) => {
                issues.push(field.span.clone(), &host_path, message);
                None
            }
        },
    };
    match name.as_deref() {
        Some("docker") => RuntimeChoice::Docker { host },
        _ => RuntimeChoice::Local,
    }
}

/// An engine's address: `unix:///absolute/path` or `tcp://HOST:PORT`.
fn check_host(host: &str) -> Result<(), String> {
    if let Some(path) = host.strip_prefix("unix://") {
        if path.starts_with('/') && path.len() > 1 {
            return Ok(());
        }
        return Err(format!(
            "{host:?}: a unix socket's path is absolute (unix:///run/docker.sock)"
        ));
    }
    if let Some(address) = host.strip_prefix("tcp://")
        && let Some((name, port)) = address.rsplit_once(':')
        && !name.is_empty()
        && port.parse::<u16>().is_ok_and(|p| p > 0)
    {
        return Ok(());
    }
    Err(format!(
        "{host:?} is not an engine's address: write unix:///PATH or tcp://HOST:PORT"
    ))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::RuntimeChoice;

    const BASE: &str = "app = \"hello\"\n[services.web]\nroute = \"127.0.0.1:8080\"\n";

    fn parse(extra: &str, environment: &str) -> Result<RuntimeChoice, String> {
        let source = format!("{BASE}{extra}");
        crate::spec::parse(
            &source,
            Path::new("graven.toml"),
            Path::new("/p"),
            environment,
        )
        .map(|project| project.runtime)
        .map_err(|errors| errors.to_string())
    }

    #[test]
    fn an_environment_chooses_its_runtime() {
        let file = "[environments.prod]\nruntime = \"docker\"\ndocker_host = \"unix:///run/d.sock\"\n\
                    [environments.laptop]\nruntime = \"local\"\n";
        assert_eq!(
            parse(file, "prod"),
            Ok(RuntimeChoice::Docker {
                host: Some("unix:///run/d.sock".to_owned())
            })
        );
        assert_eq!(parse(file, "laptop"), Ok(RuntimeChoice::Local));
        assert_eq!(
            parse(file, crate::spec::DEFAULT_ENVIRONMENT),
            Ok(RuntimeChoice::Local)
        );
        let bare = "[environments.prod]\nruntime = \"docker\"\n";
        assert_eq!(
            parse(bare, "prod"),
            Ok(RuntimeChoice::Docker { host: None })
        );
    }

    #[test]
    fn a_wrong_runtime_is_refused_in_every_environment() {
        let cases = [
            ("runtime = \"dokcer\"", "unknown runtime \"dokcer\""),
            ("runtime = \"dokcer\"", "did you mean \"docker\""),
            ("runtime = \"swarm\"", "the swarm runtime is not built yet"),
            (
                "runtime = \"kubernetes\"",
                "the kubernetes runtime is not built yet",
            ),
            ("runtime = 3", "environments.prod.runtime"),
            (
                "docker_host = \"unix:///s\"",
                "set runtime = \"docker\" too",
            ),
            (
                "runtime = \"docker\"\ndocker_host = \"/var/run/docker.sock\"",
                "write unix:///PATH or tcp://HOST:PORT",
            ),
            (
                "runtime = \"docker\"\ndocker_host = \"tcp://h\"",
                "tcp://HOST:PORT",
            ),
        ];
        for (lines, fragment) in cases {
            let file = format!("[environments.prod]\n{lines}\n");
            // Checked even when another environment is asked for.
            let message = parse(&file, crate::spec::DEFAULT_ENVIRONMENT).unwrap_err();
            assert!(message.contains(fragment), "{lines}: {message}");
        }
    }
}
