//! The Kubernetes API as graven's deploy uses it: server-side apply (`PATCH` with
//! `application/apply-patch+yaml`, field manager `graven`), `GET` and `DELETE` of single
//! objects, over plain HTTP (a `kubectl proxy`, or any server reachable without TLS) with an
//! optional bearer token. Then `deploy`: the shared objects first, each workload applied and
//! watched until its rollout is done within the release's health deadline, and on any
//! failure every workload this deploy changed put back as the server held it before (read
//! before the first apply), or removed when there was none.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::Value;

use super::KubeError;
use super::rollout::{Rollout, rollout};

/// How long one request may take before the deploy gives up on the server.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a rollout's status is read: the API's watch would push it, a poll is simpler
/// and a rollout takes seconds.
pub const POLL: Duration = Duration::from_millis(250);

/// The health deadline a workload without graven's annotation gets.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(300);

/// A client of one API server.
pub struct Client {
    /// `http://host:port` and any path prefix, without a trailing '/'.
    base: String,
    token: Option<String>,
    http: HttpClient<HttpConnector, Full<Bytes>>,
}

impl Client {
    /// A client of `server` (`http://HOST:PORT[/PREFIX]`); `https` is refused by name.
    pub fn new(server: &str, token: Option<String>) -> Result<Client, KubeError> {
        let fail = |reason: &str| KubeError::BadServer {
            server: server.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: http::Uri = server.parse().map_err(|_| fail("not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(fail(
                    "graven speaks plain HTTP only: run `kubectl proxy` (which holds the \
                     credentials and the TLS) and give its http://127.0.0.1:8001",
                ));
            }
            _ => return Err(fail("write http://HOST:PORT")),
        }
        if uri.authority().is_none() {
            return Err(fail("no host"));
        }
        Ok(Client {
            base: server.trim_end_matches('/').to_owned(),
            token,
            http: HttpClient::builder(TokioExecutor::new()).build_http(),
        })
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<(StatusCode, Vec<u8>), KubeError> {
        let name = method_name(&method);
        let fail = |source: Box<dyn std::error::Error + Send + Sync>| KubeError::Http {
            method: name,
            path: path.to_owned(),
            source,
        };
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(http::header::ACCEPT, "application/json");
        if let Some(token) = &self.token {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = match body {
            Some((content_type, bytes)) => request
                .header(http::header::CONTENT_TYPE, content_type)
                .body(Full::new(Bytes::from(bytes))),
            None => request.body(Full::new(Bytes::new())),
        }
        .map_err(|e| fail(e.into()))?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| fail(e.into()))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| fail(e.into()))?
                .to_bytes();
            Ok((status, bytes.to_vec()))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| fail("no answer within 30 s".into()))?
    }

    fn refused(method: &'static str, path: &str, status: StatusCode, body: &[u8]) -> KubeError {
        // The API server's errors are `Status` objects; their message says what is wrong.
        let message = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect());
        KubeError::Refused {
            method,
            path: path.to_owned(),
            status: status.as_u16(),
            message,
        }
    }

    fn json(path: &str, body: &[u8]) -> Result<Value, KubeError> {
        serde_json::from_slice(body).map_err(|source| KubeError::BadAnswer {
            path: path.to_owned(),
            source,
        })
    }

    /// The object at `path`, or `None` when the server has none.
    pub async fn get(&self, path: &str) -> Result<Option<Value>, KubeError> {
        let (status, body) = self.request(Method::GET, path, None).await?;
        match status {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => Self::json(path, &body).map(Some),
            s => Err(Self::refused("GET", path, s, &body)),
        }
    }

    /// Server-side apply of `object`, owned by graven's field manager (taking over fields
    /// another manager set: graven's manifests are the truth for what they name).
    pub async fn apply(&self, object: &Value) -> Result<Value, KubeError> {
        let path = object_path(object)?;
        let query = format!("{path}?fieldManager=graven&force=true");
        let body = serde_json::to_vec(object).map_err(|source| KubeError::BadAnswer {
            path: path.clone(),
            source,
        })?;
        let (status, answer) = self
            .request(
                Method::PATCH,
                &query,
                Some(("application/apply-patch+yaml", body)),
            )
            .await?;
        if !status.is_success() {
            return Err(Self::refused("PATCH", &path, status, &answer));
        }
        Self::json(&path, &answer)
    }

    /// Removes the object at `path`; one already gone is no error.
    pub async fn delete(&self, path: &str) -> Result<(), KubeError> {
        let (status, body) = self.request(Method::DELETE, path, None).await?;
        match status {
            StatusCode::NOT_FOUND => Ok(()),
            s if s.is_success() => Ok(()),
            s => Err(Self::refused("DELETE", path, s, &body)),
        }
    }
}

fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "request",
    }
}

/// An object's path on the API server, from its kind, namespace and name.
pub fn object_path(object: &Value) -> Result<String, KubeError> {
    let kind = object["kind"].as_str().unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
    let bad = || KubeError::BadObject {
        kind: kind.to_owned(),
        name: name.to_owned(),
    };
    let (group, plural) = match kind {
        "Namespace" => return Ok(format!("/api/v1/namespaces/{name}")),
        "ConfigMap" => ("/api/v1", "configmaps"),
        "Secret" => ("/api/v1", "secrets"),
        "Service" => ("/api/v1", "services"),
        "Deployment" => ("/apis/apps/v1", "deployments"),
        "StatefulSet" => ("/apis/apps/v1", "statefulsets"),
        "NetworkPolicy" => ("/apis/networking.k8s.io/v1", "networkpolicies"),
        _ => return Err(bad()),
    };
    if name.is_empty() || namespace.is_empty() {
        return Err(bad());
    }
    Ok(format!("{group}/namespaces/{namespace}/{plural}/{name}"))
}

fn is_workload(object: &Value) -> bool {
    matches!(object["kind"].as_str(), Some("Deployment" | "StatefulSet"))
}

/// What happened to one workload.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadReport {
    pub kind: String,
    pub name: String,
    /// The release it was asked to run (its `graven.dev/release` label).
    pub release: String,
    pub outcome: WorkloadOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum WorkloadOutcome {
    /// Its rollout finished: every replica runs the release and is available.
    RolledOut,
    /// Put back as it was before this deploy (its previous release, which was `release`).
    RolledBack { release: Option<String> },
    /// It did not exist before this deploy and was removed.
    Removed,
    /// Not applied: an earlier workload of the deploy failed first.
    Skipped,
    /// Its rollback could not be applied (the API server refused or did not answer).
    RollbackFailed { reason: String },
}

/// A deploy's result: every workload's outcome, and why it failed, if it did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub workloads: Vec<WorkloadReport>,
    pub failure: Option<String>,
}

fn release_of(object: &Value) -> Option<String> {
    object["metadata"]["labels"]["graven.dev/release"]
        .as_str()
        .map(str::to_owned)
}

fn deadline_of(object: &Value) -> Duration {
    object["metadata"]["annotations"]["graven.dev/health-deadline-seconds"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .map_or(DEFAULT_DEADLINE, Duration::from_secs)
}

/// An object as read from the server, made fit to apply again: the fields the server owns
/// (identity, versions, status) left out.
fn reapplicable(mut object: Value) -> Value {
    if let Some(metadata) = object["metadata"].as_object_mut() {
        for field in [
            "creationTimestamp",
            "generation",
            "managedFields",
            "resourceVersion",
            "selfLink",
            "uid",
        ] {
            metadata.remove(field);
        }
    }
    if let Some(fields) = object.as_object_mut() {
        fields.remove("status");
    }
    object
}

/// Waits for `path`'s rollout until `deadline` after now: `Ok` when done, `Err` with why not.
async fn watch(
    client: &Client,
    path: &str,
    deadline: Duration,
    poll: Duration,
    progress: &mut dyn FnMut(&str),
) -> Result<Result<(), String>, KubeError> {
    let start = Instant::now();
    let mut said = String::new();
    loop {
        let Some(object) = client.get(path).await? else {
            return Ok(Err("it was deleted while rolling out".to_owned()));
        };
        match rollout(&object) {
            Rollout::Done => return Ok(Ok(())),
            Rollout::Failed(why) => return Ok(Err(why)),
            Rollout::Progressing(what) => {
                if start.elapsed() >= deadline {
                    return Ok(Err(format!(
                        "not healthy within its health deadline ({} s): {what}",
                        deadline.as_secs()
                    )));
                }
                if what != said {
                    progress(&what);
                    said = what;
                }
            }
        }
        tokio::time::sleep(poll).await;
    }
}

/// Puts the workload at `path` back as it was `before` this deploy, or removes it when
/// there was none, and watches the rollback's rollout.
async fn roll_back(
    client: &Client,
    path: &str,
    before: Option<&Value>,
    poll: Duration,
    progress: &mut dyn FnMut(&str),
) -> Result<WorkloadOutcome, KubeError> {
    let Some(before) = before else {
        progress("removing it (no release before this one)");
        client.delete(path).await?;
        return Ok(WorkloadOutcome::Removed);
    };
    let release = release_of(before);
    progress(&format!(
        "rolling back to release {}",
        release.as_deref().unwrap_or("(unlabelled)")
    ));
    client.apply(&reapplicable(before.clone())).await?;
    if let Err(why) = watch(client, path, deadline_of(before), poll, progress).await? {
        progress(&format!("the rollback is not healthy either: {why}"));
    }
    Ok(WorkloadOutcome::RolledBack { release })
}

/// One workload of a deploy: its object, where it lives, what the server held before the
/// deploy (the release to go back to), and what became of it.
struct Step<'a> {
    object: &'a Value,
    path: String,
    previous: Option<Value>,
    report: WorkloadReport,
}

/// Applies `objects` (in `render`'s order) and watches each workload's rollout; on a
/// failure, rolls every workload it changed back. `progress` hears what it waits for.
pub async fn deploy(
    client: &Client,
    objects: &[Value],
    poll: Duration,
    progress: &mut dyn FnMut(&str),
) -> Result<Report, KubeError> {
    // What the server holds before anything changes: the release to go back to.
    let mut steps = Vec::new();
    for object in objects.iter().filter(|o| is_workload(o)) {
        let path = object_path(object)?;
        let previous = client.get(&path).await?;
        steps.push(Step {
            object,
            path,
            previous,
            report: WorkloadReport {
                kind: object["kind"].as_str().unwrap_or_default().to_owned(),
                name: object["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                release: release_of(object).unwrap_or_default(),
                outcome: WorkloadOutcome::Skipped,
            },
        });
    }
    for object in objects.iter().filter(|o| !is_workload(o)) {
        client.apply(object).await?;
    }
    let mut failure = None;
    let mut applied = 0;
    for (index, step) in steps.iter_mut().enumerate() {
        let report = &mut step.report;
        let name = report.name.clone();
        progress(&format!(
            "{} {name}: applying release {}",
            report.kind, report.release
        ));
        // Counted before the apply: a refused or lost apply may still have changed it, and
        // putting back what was read is harmless when it did not.
        applied = index + 1;
        let mut hear = |what: &str| progress(&format!("{name}: {what}"));
        let watched = match client.apply(step.object).await {
            Ok(_) => {
                watch(
                    client,
                    &step.path,
                    deadline_of(step.object),
                    poll,
                    &mut hear,
                )
                .await
            }
            Err(error) => Err(error),
        };
        match watched {
            Ok(Ok(())) => report.outcome = WorkloadOutcome::RolledOut,
            Ok(Err(why)) => {
                failure = Some(format!("{} {name}: {why}", report.kind));
                break;
            }
            Err(error) => {
                failure = Some(format!("{} {name}: {error}", report.kind));
                break;
            }
        }
    }
    if failure.is_some() {
        // Every workload this deploy changed goes back, the failed one first; one that
        // cannot be put back is said and the others still are.
        for step in steps[..applied].iter_mut().rev() {
            let name = step.report.name.clone();
            let mut hear = |what: &str| progress(&format!("{name}: {what}"));
            step.report.outcome = match roll_back(
                client,
                &step.path,
                step.previous.as_ref(),
                poll,
                &mut hear,
            )
            .await
            {
                Ok(outcome) => outcome,
                Err(error) => WorkloadOutcome::RollbackFailed {
                    reason: error.to_string(),
                },
            };
        }
    }
    let reports = steps.into_iter().map(|step| step.report).collect();
    Ok(Report {
        workloads: reports,
        failure,
    })
}
