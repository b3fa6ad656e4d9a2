//! `runtime` and `docker_host` of `[environments.ENV]`: which backend runs the environment's
//! instances, so a laptop runs `local` and a server `docker` from the same file. Checked for
//! every environment (a typo in production's fails on a laptop too); the one asked for is
//! the project's. `kubernetes` is not run by the control plane: `graven deploy` and `graven
//! render` apply or write its manifests (docs/kubernetes.md). `swarm` drives services on a
//! Docker Swarm through its manager (`docker_host`), with every node's engine in
//! `swarm_engines` so images are loaded into each (docs/runtimes.md).

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
    /// A Docker Swarm: its manager's engine at `host` (as `Docker`'s), and the engines of
    /// its nodes (`swarm_engines`), into which images are loaded and through which health
    /// probes run.
    Swarm {
        host: Option<String>,
        engines: Vec<String>,
    },
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
            RuntimeChoice::Swarm { .. } => "swarm",
            RuntimeChoice::Kubernetes { .. } => "kubernetes",
        }
    }
}

/// The backends graven.toml names.
const BUILT: [&str; 4] = ["local", "docker", "swarm", "kubernetes"];

/// An environment's keys for its runtime, as written.
pub(crate) struct RawRuntime<'a> {
    pub runtime: Option<&'a Field<String>>,
    pub docker_host: Option<&'a Field<String>>,
    pub swarm_engines: Option<&'a Field<Vec<String>>>,
    pub kube_server: Option<&'a Field<String>>,
    pub kube_registry: Option<&'a Field<String>>,
    pub kube_namespace: Option<&'a Field<String>>,
}

/// Checks an environment's `runtime` and its engine's keys (all absent: local).
pub(crate) fn check(raw: RawRuntime<'_>, prefix: &str, issues: &mut Issues) -> RuntimeChoice {
    let RawRuntime {
        runtime,
        docker_host,
        swarm_engines,
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
            Ok(name) => {
                issues.push(
                    field.span.clone(),
                    &runtime_path,
                    format!(
                        "unknown runtime {name:?}: use \"local\", \"docker\", \"swarm\" or \"kubernetes\"{}",
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
            Ok(host) if matches!(name.as_deref(), Some("docker" | "swarm")) => Some(host),
            Ok(_) => {
                issues.push(
                    field.span.clone(),
                    &host_path,
                    "docker_host is the docker or swarm runtime's engine: set runtime = \"docker\" or \"swarm\" too",
                );
                None
            }
            Err(message) => {
                issues.push(field.span.clone(), &host_path, message);
                None
            }
        },
    };
    let engines = check_engines(swarm_engines, name.as_deref(), prefix, issues);
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
        Some("swarm") => RuntimeChoice::Swarm { host, engines },
        Some("kubernetes") => RuntimeChoice::Kubernetes {
            server,
            registry,
            namespace,
        },
        _ => RuntimeChoice::Local,
    }
}

/// `swarm_engines`: each node's engine address, only with `runtime = "swarm"`.
fn check_engines(
    field: Option<&Field<Vec<String>>>,
    runtime: Option<&str>,
    prefix: &str,
    issues: &mut Issues,
) -> Vec<String> {
    let Some(field) = field else {
        return Vec::new();
    };
    let path = format!("{prefix}.swarm_engines");
    let engines = match &field.value {
        Ok(engines) => engines,
        Err(message) => {
            issues.push(field.span.clone(), &path, message.clone());
            return Vec::new();
        }
    };
    if runtime != Some("swarm") {
        issues.push(
            field.span.clone(),
            &path,
            "swarm_engines are the swarm runtime's nodes: set runtime = \"swarm\" too",
        );
        return Vec::new();
    }
    for engine in engines {
        if let Err(message) = check_host(engine) {
            issues.push(field.span.clone(), &path, message);
            return Vec::new();
        }
    }
    engines.clone()
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
        let swarm = "[environments.prod]\nruntime = \"swarm\"\ndocker_host = \"unix:///m.sock\"\n\
                     swarm_engines = [\"unix:///m.sock\", \"tcp://10.0.0.2:2375\"]\n";
        assert_eq!(
            parse(swarm, "prod"),
            Ok(RuntimeChoice::Swarm {
                host: Some("unix:///m.sock".to_owned()),
                engines: vec![
                    "unix:///m.sock".to_owned(),
                    "tcp://10.0.0.2:2375".to_owned()
                ],
            })
        );
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
            (
                "swarm_engines = [\"unix:///s\"]",
                "set runtime = \"swarm\" too",
            ),
            (
                "runtime = \"swarm\"\nswarm_engines = [\"10.0.0.2\"]",
                "environments.prod.swarm_engines",
            ),
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
                "set runtime = \"docker\" or \"swarm\" too",
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
