//! A SIMULATED Kubernetes API server for the tests (no real one can run on this machine): a
//! small hyper server on 127.0.0.1:0, on a thread of its own, stopped when dropped. It
//! stores what is applied (server-side apply: `PATCH` with `application/apply-patch+yaml`
//! and a field manager), bumps `metadata.generation` when an object's spec changes, serves
//! `GET` and `DELETE` and the discovery documents `kubectl` reads, and plays a scripted
//! controller: each `GET` of a Deployment or StatefulSet moves its rollout one replica
//! further, except for images marked `never_available`, whose new pods never become
//! available (the old ones keep serving). Nothing here is a real cluster's behaviour beyond
//! what those few fields say.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    /// `METHOD path` of every request, in order.
    requests: Vec<String>,
    /// Image name fragments whose pods never become available.
    never_available: Vec<String>,
    /// Paths whose applies are refused as invalid.
    refused: Vec<String>,
    /// Paths whose applies are refused from the nth on (counting every apply to the path).
    refused_from: BTreeMap<String, usize>,
    /// Replicas available when the last rollout of each workload finished.
    stable: BTreeMap<String, u64>,
    /// Reads of each workload's status since its generation changed.
    steps: BTreeMap<String, u64>,
    resource_version: u64,
}

pub struct KubeSim {
    pub address: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for KubeSim {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl KubeSim {
    pub fn start() -> KubeSim {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the simulated api");
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let served = state.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            let state = served.clone();
                            tokio::spawn(async move {
                                let service = service_fn(move |request| {
                                    let state = state.clone();
                                    async move { Ok::<_, Infallible>(handle(&state, request).await) }
                                });
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            });
                        }
                    }
                }
            });
        });
        KubeSim {
            address,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Pods of images whose name holds `fragment` never become available.
    pub fn never_available(&self, fragment: &str) {
        self.state
            .lock()
            .unwrap()
            .never_available
            .push(fragment.to_owned());
    }

    /// Applies to `path` are refused (422, as an admission webhook or a validation would).
    pub fn refuse(&self, path: &str) {
        self.state.lock().unwrap().refused.push(path.to_owned());
    }

    /// Applies to `path` from its `nth` on (counting every apply to it, from 1) are refused:
    /// a rollback's apply, say, after the release it undoes was accepted.
    pub fn refuse_from(&self, path: &str, nth: usize) {
        let mut state = self.state.lock().unwrap();
        state.refused_from.insert(path.to_owned(), nth);
    }

    pub fn object(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }

    pub fn paths(&self) -> Vec<String> {
        self.state.lock().unwrap().objects.keys().cloned().collect()
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// A kubeconfig naming this server, for `kubectl`.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: sim\n  cluster:\n    server: {}\n\
                 contexts:\n- name: sim\n  context:\n    cluster: sim\n    user: sim\n\
                 current-context: sim\nusers:\n- name: sim\n  user: {{}}\n",
                self.url()
            ),
        )
        .unwrap();
        path
    }
}

fn answer(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    answer(
        code,
        json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": reason, "message": message, "code": code.as_u16() }),
    )
}

fn resource(name: &str, kind: &str, namespaced: bool) -> Value {
    json!({ "name": name, "singularName": kind.to_lowercase(), "namespaced": namespaced,
            "kind": kind, "verbs": ["create", "delete", "get", "list", "patch", "update"] })
}

/// The discovery documents (the legacy, unaggregated form) for the kinds graven renders.
fn discovery(path: &str) -> Option<Value> {
    let group = |name: &str| {
        json!({ "name": name, "versions": [{ "groupVersion": format!("{name}/v1"), "version": "v1" }],
                "preferredVersion": { "groupVersion": format!("{name}/v1"), "version": "v1" } })
    };
    let list = |gv: &str, resources: Vec<Value>| json!({ "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources });
    Some(match path {
        "/api" => json!({ "kind": "APIVersions", "versions": ["v1"],
                          "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1" }] }),
        "/apis" => json!({ "kind": "APIGroupList", "apiVersion": "v1",
                           "groups": [group("apps"), group("networking.k8s.io")] }),
        "/api/v1" => list(
            "v1",
            vec![
                resource("namespaces", "Namespace", false),
                resource("configmaps", "ConfigMap", true),
                resource("secrets", "Secret", true),
                resource("services", "Service", true),
            ],
        ),
        "/apis/apps/v1" => list(
            "apps/v1",
            vec![
                resource("deployments", "Deployment", true),
                resource("statefulsets", "StatefulSet", true),
            ],
        ),
        "/apis/networking.k8s.io/v1" => list(
            "networking.k8s.io/v1",
            vec![resource("networkpolicies", "NetworkPolicy", true)],
        ),
        "/version" => json!({ "major": "1", "minor": "32", "gitVersion": "v1.32.0-simulated" }),
        _ => return None,
    })
}

fn is_workload(path: &str) -> bool {
    path.contains("/deployments/") || path.contains("/statefulsets/")
}

async fn handle(state: &Mutex<State>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    let content_type = request
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut state = state.lock().unwrap();
    state.requests.push(format!("{method} {path}"));
    if method == Method::GET
        && let Some(document) = discovery(&path)
    {
        return answer(StatusCode::OK, document);
    }
    match method {
        Method::GET => {
            if is_workload(&path) && state.objects.contains_key(&path) {
                step(&mut state, &path);
            }
            match state.objects.get(&path) {
                Some(object) => answer(StatusCode::OK, object.clone()),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{path} not found"),
                ),
            }
        }
        Method::DELETE => match state.objects.remove(&path) {
            Some(_) => answer(
                StatusCode::OK,
                json!({ "kind": "Status", "status": "Success" }),
            ),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{path} not found"),
            ),
        },
        Method::PATCH => {
            if content_type != "application/apply-patch+yaml" || !query.contains("fieldManager=") {
                return status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    "only server-side apply with a field manager is simulated",
                );
            }
            let applies = state
                .requests
                .iter()
                .filter(|r| **r == format!("PATCH {path}"))
                .count();
            if state.refused.contains(&path)
                || state
                    .refused_from
                    .get(&path)
                    .is_some_and(|&nth| applies >= nth)
            {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "refused by the test",
                );
            }
            let Ok(mut object) = serde_json::from_slice::<Value>(&body) else {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the body is not JSON",
                );
            };
            state.resource_version += 1;
            let version = state.resource_version;
            let created = !state.objects.contains_key(&path);
            let (generation, old_status) = match state.objects.get(&path) {
                Some(old) => {
                    let generation = old["metadata"]["generation"].as_u64().unwrap_or(1);
                    let changed = old["spec"] != object["spec"] || old["data"] != object["data"];
                    (generation + u64::from(changed), old["status"].clone())
                }
                None => (1, json!({})),
            };
            if old_status != json!({}) && !old_status.is_null() {
                object["status"] = old_status;
            } else if is_workload(&path) {
                object["status"] = json!({});
            }
            object["metadata"]["generation"] = json!(generation);
            object["metadata"]["resourceVersion"] = json!(version.to_string());
            object["metadata"]["uid"] = json!(format!("uid-{}", path.len() + version as usize));
            state.steps.remove(&path);
            state.objects.insert(path.clone(), object.clone());
            answer(
                if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                object,
            )
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not simulated",
        ),
    }
}

/// The scripted controller: one more replica rolled out per read of the status.
fn step(state: &mut State, path: &str) {
    let object = state.objects[path].clone();
    let generation = object["metadata"]["generation"].as_u64().unwrap_or(1);
    let replicas = object["spec"]["replicas"].as_u64().unwrap_or(1);
    let image = object["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let stable = state.stable.get(path).copied().unwrap_or(0);
    let steps = state.steps.entry(path.to_owned()).or_insert(0);
    *steps += 1;
    let steps = *steps;
    let bad = state.never_available.iter().any(|f| image.contains(f));
    let stateful = path.contains("/statefulsets/");
    let revision = format!("rev-{generation}");
    let status = if bad {
        // One new pod is made and never becomes available; the old ones keep serving.
        let old_revision = object["status"]["currentRevision"].clone();
        let mut status = json!({
            "observedGeneration": generation,
            "replicas": stable + 1,
            "updatedReplicas": 1,
            "availableReplicas": stable,
            "readyReplicas": stable,
            "conditions": [{ "type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated" }],
        });
        if stateful {
            status["replicas"] = json!(replicas);
            status["readyReplicas"] = json!(stable.saturating_sub(1));
            status["availableReplicas"] = json!(stable.saturating_sub(1));
            status["currentRevision"] = old_revision;
            status["updateRevision"] = json!(revision);
        }
        status
    } else {
        let updated = steps.min(replicas);
        let done = updated == replicas;
        let available = if done {
            replicas
        } else {
            updated.max(stable.min(replicas))
        };
        if done {
            state.stable.insert(path.to_owned(), replicas);
        }
        let mut status = json!({
            "observedGeneration": generation,
            "replicas": if done || stateful { replicas } else { replicas + 1 },
            "updatedReplicas": updated,
            "availableReplicas": available,
            "readyReplicas": available,
            "conditions": [{ "type": "Progressing", "status": "True",
                             "reason": if done { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" } }],
        });
        if stateful {
            status["updateRevision"] = json!(revision);
            status["currentRevision"] = if done {
                json!(revision)
            } else {
                object["status"]["currentRevision"].clone()
            };
        }
        status
    };
    if let Some(object) = state.objects.get_mut(path) {
        object["status"] = status;
    }
}

/// Bakes a tiny image (`FROM scratch`, one file, USER 65534, EXPOSE 8080) tagged `tag` into
/// `home`'s store and returns its digest; `content` makes images differ. Bakes are
/// reproducible, so the same content always gives the same digest (the goldens hold it).
pub fn test_image(home: &std::path::Path, tag: &str, content: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Containerfile"),
        "FROM scratch\nCOPY hello /hello\nEXPOSE 8080\nUSER 65534:65534\nENTRYPOINT [\"/hello\"]\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("hello"), content).unwrap();
    let output = super::succeed(
        super::graven(home)
            .arg("bake")
            .arg(dir.path())
            .args(["-t", tag]),
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    stdout
        .split_whitespace()
        .find(|word| word.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no digest in bake's output: {stdout}"))
        .to_owned()
}

/// kubernetes-validate (PyPI), as `scripts/kube-tools` installs it; panics with the fix.
pub fn kubernetes_validate() -> std::path::PathBuf {
    let path = std::env::var_os("GRAVEN_KUBERNETES_VALIDATE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/cache/graven-test/kube-venv/bin/kubernetes-validate".into());
    assert!(
        path.is_file(),
        "{} is missing: run scripts/kube-tools (scripts/test does)",
        path.display()
    );
    path
}

/// The Kubernetes versions docs/kubernetes.md names: every rendered manifest passes
/// `kubernetes-validate --strict` for each.
pub const KUBERNETES_VERSIONS: [&str; 8] = [
    "1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0",
];
