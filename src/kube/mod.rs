//! Kubernetes: the manifests a project's releases become (`render`, pure), the API client that
//! applies them with server-side apply (`api`), and the rollout watch that decides when a
//! workload is healthy, has failed, or must be rolled back (`rollout`, pure). Placement
//! belongs to the cluster: nothing here schedules, starts or probes an instance, and nothing
//! here touches the local runtime, the proxy or the event log.

pub mod api;
pub mod render;
pub mod rollout;

pub use render::{Options, Workload, render, to_documents};

/// What went wrong rendering, applying or watching, naming the object or server at fault.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("registry {registry:?}: {reason}")]
    BadRegistry { registry: String, reason: String },
    #[error("{name:?} is not a usable Kubernetes name: {reason}")]
    BadName { name: String, reason: String },
    #[error("api server {server:?}: {reason}")]
    BadServer { server: String, reason: String },
    #[error("{method} {path}: {source}")]
    Http {
        method: &'static str,
        path: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{method} {path}: the api server answered {status}: {message}")]
    Refused {
        method: &'static str,
        path: String,
        status: u16,
        message: String,
    },
    #[error("{path}: the api server's answer is not JSON: {source}")]
    BadAnswer {
        path: String,
        source: serde_json::Error,
    },
    #[error("{kind} {name} has no kind or name the api server would accept")]
    BadObject { kind: String, name: String },
    #[error("service {service}: {what} has no Kubernetes form")]
    Unsupported { service: String, what: String },
}
