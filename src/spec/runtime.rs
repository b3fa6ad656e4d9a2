//! `runtime` and `docker_host` of `[environments.ENV]`: which backend runs the environment's
//! instances, so a laptop runs `local` and a server `docker` from the same file. Checked for
//! every environment (a typo in production's fails on a laptop too); the one asked for is
//! the project's. `kubernetes` is not run by the control plane: `graven deploy` and `graven
//! render` apply or write its manifests (docs/kubernetes.md). `swarm` is named in the
//! grammar and refused as not built yet, rather than read as a typo.

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
    /// A Kubernetes cluster, reached by `graven deploy` through its API (never by the control
    /// plane): `kube_server`, `kube_registry` and `kube_namespace`, each replaced by its
    /// command-line flag when one is given.
    Kubernetes {
        server: Option<String>,
        registry: Option<String>,
        namespace: Option<String>,
    },
}

impl RuntimeChoice {
    /// The name as graven.toml spells it.
    pub fn name(&self) -> &'static str {
        match self {
            RuntimeChoice::Local => "local",
            RuntimeChoice::Docker { .. } => "docker",
            RuntimeChoice::Kubernetes { .. } => "kubernetes",
        }
    }
}

/// The backends graven.toml names.
const BUILT: [&str; 3] = ["local", "docker", "kubernetes"];
/// The ones it names but that are not built yet.
const NOT_BUILT: [&str; 1] = ["swarm"];

/// An environment's keys for its runtime, as written.
pub(crate) struct RawRuntime<'a> {
    pub runtime: Option<&'a Field<String>>,
    pub docker_host: Option<&'a Field<String>>,
    pub kube_server: Option<&'a Field<String>>,
    pub kube_registry: Option<&'a Field<String>>,
    pub kube_namespace: Option<&'a Field<String>>,
}

/// Checks an environment's `runtime` and its engine's keys (all absent: local).
pub(crate) fn check(raw: RawRuntime<'_>, prefix: &str, issues: &mut Issues) -> RuntimeChoice {
    let RawRuntime {
        runtime,
        docker_host,
        kube_server,
        kube_registry,
        kube_namespace,
    } = raw;
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
                    format!(
                        "the {name} runtime is not built yet: use \"local\", \"docker\" or \"kubernetes\""
                    ),
                );
                return RuntimeChoice::Local;
            }
            Ok(name) => {
                issues.push(
                    field.span.clone(),
                    &runtime_path,
                    format!(
                        "unknown runtime {name:?}: use \"local\", \"docker\" or \"kubernetes\"{}",
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
    let kubernetes = name.as_deref() == Some("kubernetes");
    let mut kube = |field: Option<&Field<String>>,
                    key: &str,
                    valid: fn(&str) -> Result<(), String>| {
        let field = field?;
        let path = format!("{prefix}.{key}");
        match field.value.clone().and_then(|v| valid(&v).map(|()| v)) {
            Ok(value) if kubernetes => Some(value),
            Ok(_) => {
                issues.push(
                    field.span.clone(),
                    &path,
                    format!("{key} is the kubernetes runtime's: set runtime = \"kubernetes\" too"),
                );
                None
            }
            Err(message) => {
                issues.push(field.span.clone(), &path, message);
                None
            }
        }
    };
    let server = kube(kube_server, "kube_server", check_server);
    let registry = kube(kube_registry, "kube_registry", check_registry);
    let namespace = kube(kube_namespace, "kube_namespace", |n| {
        super::values::dns_label("namespace", n)
    });
    match name.as_deref() {
        Some("docker") => RuntimeChoice::Docker { host },
        Some("kubernetes") => RuntimeChoice::Kubernetes {
            server,
            registry,
            namespace,
        },
        _ => RuntimeChoice::Local,
    }
}

/// An API server's address as `graven deploy --server` takes it: plain HTTP (a `kubectl
/// proxy`), docs/kubernetes.md.
fn check_server(server: &str) -> Result<(), String> {
    match server.strip_prefix("http://") {
        Some(rest) if !rest.is_empty() => Ok(()),
        _ => Err(format!(
            "{server:?} is not an API server's address: write http://HOST:PORT (a `kubectl proxy`)"
        )),
    }
}

/// A registry as `--registry` takes it: `HOST[:PORT][/PATH]`, no scheme.
fn check_registry(registry: &str) -> Result<(), String> {
    if registry.is_empty() || registry.contains("://") || registry.contains(char::is_whitespace) {
        return Err(format!(
            "{registry:?} is not a registry: write HOST[:PORT][/PATH], without a scheme"
        ));
    }
    Ok(())
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
        let cluster = "[environments.prod]\nruntime = \"kubernetes\"\n\
                       kube_server = \"http://127.0.0.1:8001\"\n\
                       kube_registry = \"registry.example:5000/team\"\nkube_namespace = \"hello\"\n";
        assert_eq!(
            parse(cluster, "prod"),
            Ok(RuntimeChoice::Kubernetes {
                server: Some("http://127.0.0.1:8001".to_owned()),
                registry: Some("registry.example:5000/team".to_owned()),
                namespace: Some("hello".to_owned()),
            })
        );
    }

    #[test]
    fn a_wrong_runtime_is_refused_in_every_environment() {
        let cases = [
            ("runtime = \"dokcer\"", "unknown runtime \"dokcer\""),
            ("runtime = \"dokcer\"", "did you mean \"docker\""),
            ("runtime = \"swarm\"", "the swarm runtime is not built yet"),
            (
                "kube_server = \"http://127.0.0.1:8001\"",
                "set runtime = \"kubernetes\" too",
            ),
            (
                "runtime = \"kubernetes\"\nkube_server = \"https://k8s:6443\"",
                "write http://HOST:PORT",
            ),
            (
                "runtime = \"kubernetes\"\nkube_registry = \"https://r.example\"",
                "without a scheme",
            ),
            (
                "runtime = \"kubernetes\"\nkube_namespace = \"Not_A_Label\"",
                "environments.prod.kube_namespace",
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
