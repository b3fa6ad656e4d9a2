//! An in-memory backend for testing what sits on top of the runtime (the controller, the
//! proxy, deploy strategies) without images, namespaces or processes.
//!
//! Each instance is a real HTTP server on `127.0.0.1` inside this process that behaves like
//! the example service: `/healthz` answers 200 (503 when `HEALTHY=0`), `/` answers
//! "<GREETING or hello> from hello <VERSION or 0>" with an `x-hello-version` header. Killing
//! an instance closes its listener and every open connection, as a dying process would.
//! Test hooks (`crash`, `set_behavior`) inject the failures a controller must handle.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use super::{
    Instance, InstanceId, InstanceSpec, InstanceStatus, ProbeOutput, Runtime, RuntimeError,
};
use crate::store::Digest;

const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;

/// How a fake instance answers, switchable while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    /// `/healthz` answers 200.
    Healthy,
    /// `/healthz` answers 503; `/` still answers.
    Unhealthy,
    /// Connections are accepted but no request is ever answered (a hung process).
    Hung,
    /// `/healthz` answers 200 but `/` answers 500: a release whose requests fail while its
    /// health check passes.
    Failing,
}

impl Behavior {
    fn to_u8(self) -> u8 {
        match self {
            Behavior::Healthy => 0,
            Behavior::Unhealthy => 1,
            Behavior::Hung => 2,
            Behavior::Failing => 3,
        }
    }

    fn from_u8(value: u8) -> Behavior {
        match value {
            0 => Behavior::Healthy,
            1 => Behavior::Unhealthy,
            3 => Behavior::Failing,
            _ => Behavior::Hung,
        }
    }
}

/// The in-memory runtime. Clones share the same instances.
#[derive(Debug, Clone)]
pub struct FakeRuntime {
    inner: Arc<Mutex<Inner>>,
    changes: tokio::sync::broadcast::Sender<super::InstanceChange>,
}

impl Default for FakeRuntime {
    fn default() -> FakeRuntime {
        FakeRuntime {
            inner: Arc::default(),
            changes: tokio::sync::broadcast::channel(super::CHANGES_BUFFER).0,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    /// `None` accepts every image; `Some` only the listed ones (to test `UnknownImage`).
    known_images: Option<BTreeSet<Digest>>,
    prepared: BTreeSet<Digest>,
    instances: BTreeMap<InstanceId, FakeInstance>,
    /// Drift made by a test, found by the next check that asks for its instance.
    planted: BTreeMap<InstanceId, super::Drift>,
    /// How many drift checks were asked for.
    drift_checks: u64,
}

#[derive(Debug)]
struct FakeInstance {
    info: Instance,
    /// Set while the server runs.
    server: Option<Server>,
    /// `IGNORE_SIGTERM=1` in the env: `stop` waits out the grace and kills.
    ignores_stop: bool,
    /// Its named volumes: owned by it while it runs, as the local runtime's lock makes them.
    volumes: Vec<String>,
}

#[derive(Debug)]
struct Server {
    /// The accept loop; it owns every connection task, so aborting it closes them all.
    task: JoinHandle<()>,
    behavior: Arc<AtomicU8>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Answers {
    greeting: String,
    version: String,
    behavior: Arc<AtomicU8>,
}

impl FakeRuntime {
    /// A fake that accepts any image digest.
    pub fn new() -> FakeRuntime {
        FakeRuntime::default()
    }

    /// A fake that knows only `images`; starting anything else fails with `UnknownImage`.
    pub fn with_images(images: impl IntoIterator<Item = Digest>) -> FakeRuntime {
        let fake = FakeRuntime::default();
        fake.lock().known_images = Some(images.into_iter().collect());
        fake
    }

    /// Makes a running instance exit on its own with `code`, as a crash would.
    pub fn crash(&self, id: &InstanceId, code: i32) -> Result<(), RuntimeError> {
        self.lock().exit(
            id,
            InstanceStatus::Exited {
                code: Some(code),
                signal: None,
            },
        )?;
        self.exited(id);
        Ok(())
    }

    /// Tells watchers that `id` exited.
    fn exited(&self, id: &InstanceId) {
        let _ = self
            .changes
            .send(super::InstanceChange::Exited { id: id.clone() });
    }

    /// Changes how a running instance answers.
    pub fn set_behavior(&self, id: &InstanceId, behavior: Behavior) -> Result<(), RuntimeError> {
        let mut inner = self.lock();
        let instance = inner.get_mut(id)?;
        match &instance.server {
            Some(server) => {
                server.behavior.store(behavior.to_u8(), Ordering::SeqCst);
                Ok(())
            }
            None => Err(RuntimeError::WrongState {
                id: id.clone(),
                status: instance.info.status,
                action: "changed",
            }),
        }
    }

    /// Marks an instance tainted, as a break-glass exec does on a real runtime.
    pub fn taint(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        self.lock().get_mut(id)?.info.tainted = true;
        Ok(())
    }

    /// Changes a running instance behind graven's back, as a tampered root or a program
    /// written and run would: the next drift check that asks for it finds `drift`.
    pub fn plant_drift(&self, id: &InstanceId, drift: super::Drift) -> Result<(), RuntimeError> {
        let mut inner = self.lock();
        inner.get_mut(id)?;
        inner.planted.insert(id.clone(), drift);
        Ok(())
    }

    /// How many drift checks this fake was asked for.
    pub fn drift_checks(&self) -> u64 {
        self.lock().drift_checks
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic in another test thread must not hide this thread's own failure.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_image(&self, image: &Digest) -> Result<(), RuntimeError> {
        match &self.lock().known_images {
            Some(known) if !known.contains(image) => Err(RuntimeError::UnknownImage {
                reference: image.to_string(),
            }),
            _ => Ok(()),
        }
    }
}

impl Inner {
    fn get_mut(&mut self, id: &InstanceId) -> Result<&mut FakeInstance, RuntimeError> {
        self.instances
            .get_mut(id)
            .ok_or_else(|| RuntimeError::UnknownInstance { id: id.clone() })
    }

    fn exit(&mut self, id: &InstanceId, status: InstanceStatus) -> Result<(), RuntimeError> {
        let instance = self.get_mut(id)?;
        if instance.info.status.is_exited() {
            return Err(RuntimeError::WrongState {
                id: id.clone(),
                status: instance.info.status,
                action: "exited",
            });
        }
        instance.server = None;
        instance.info.status = status;
        instance.info.pid = None;
        Ok(())
    }
}

impl Runtime for FakeRuntime {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<super::InstanceChange> {
        self.changes.subscribe()
    }

    async fn prepare(&self, image: &Digest) -> Result<(), RuntimeError> {
        self.check_image(image)?;
        self.lock().prepared.insert(image.clone());
        Ok(())
    }

    async fn start(&self, spec: InstanceSpec) -> Result<Instance, RuntimeError> {
        spec.validate()?;
        self.check_image(&spec.image)?;
        let bind = SocketAddr::from(([127, 0, 0, 1], spec.host_port.unwrap_or(0)));
        let listener = TcpListener::bind(bind).await.map_err(|source| {
            if source.kind() == std::io::ErrorKind::AddrInUse {
                RuntimeError::PortInUse { port: bind.port() }
            } else {
                RuntimeError::Other {
                    context: format!("fake instance listening on {bind}"),
                    source,
                }
            }
        })?;
        let address = listener
            .local_addr()
            .map_err(|source| RuntimeError::Other {
                context: "fake instance address".to_owned(),
                source,
            })?;
        let env = |key: &str| spec.secret_env.0.get(key).or(spec.env.get(key)).cloned();
        let behavior = if env("HEALTHY").as_deref() == Some("0") {
            Behavior::Unhealthy
        } else {
            Behavior::Healthy
        };
        let answers = Arc::new(Answers {
            greeting: env("GREETING").unwrap_or_else(|| "hello".to_owned()),
            version: env("VERSION").unwrap_or_else(|| "0".to_owned()),
            behavior: Arc::new(AtomicU8::new(behavior.to_u8())),
        });
        let server = Server {
            behavior: answers.behavior.clone(),
            task: tokio::spawn(serve(listener, answers)),
        };
        let mut inner = self.lock();
        // A named volume is owned by one live instance at a time (checked under the lock
        // that inserts, so two starts at once cannot both take it).
        for volume in &spec.volumes {
            let holder = inner
                .instances
                .iter()
                .find(|(_, i)| !i.info.status.is_exited() && i.volumes.contains(&volume.name));
            if let Some((holder, _)) = holder {
                server.task.abort();
                return Err(RuntimeError::BadVolume {
                    name: volume.name.clone(),
                    reason: format!("in use by instance {holder}"),
                });
            }
        }
        inner.next_id += 1;
        let id = InstanceId(format!("fake{:06}", inner.next_id));
        let info = Instance {
            id: id.clone(),
            image: spec.image.clone(),
            labels: spec.labels.clone(),
            status: InstanceStatus::Running,
            address: Some(address),
            pid: None,
            started_at_ms: super::now_ms(),
            tainted: false,
            log: None,
            warnings: Vec::new(),
            drift: None,
        };
        inner.instances.insert(
            id,
            FakeInstance {
                info: info.clone(),
                server: Some(server),
                ignores_stop: env("IGNORE_SIGTERM").as_deref() == Some("1"),
                volumes: spec.volumes.iter().map(|v| v.name.clone()).collect(),
            },
        );
        Ok(info)
    }

    async fn inspect(&self, id: &InstanceId) -> Result<Instance, RuntimeError> {
        Ok(self.lock().get_mut(id)?.info.clone())
    }

    async fn check_drift(
        &self,
        ids: &[InstanceId],
        _check: super::DriftCheck,
    ) -> Result<Vec<(InstanceId, super::Drift)>, RuntimeError> {
        let mut found = Vec::new();
        {
            let mut inner = self.lock();
            inner.drift_checks += 1;
            for id in ids {
                let Some(drift) = inner.planted.remove(id) else {
                    continue;
                };
                if let Ok(instance) = inner.get_mut(id)
                    && !instance.info.status.is_exited()
                    && instance.info.drift.is_none()
                {
                    instance.info.drift = Some(drift.clone());
                    found.push((id.clone(), drift));
                }
            }
        }
        for (id, _) in &found {
            let _ = self
                .changes
                .send(super::InstanceChange::Drifted { id: id.clone() });
        }
        Ok(found)
    }

    /// A fake instance runs no commands: `true` passes and `false` fails; any other command
    /// passes while the instance's health is switched healthy, fails (exit 1) while
    /// unhealthy and outlasts its timeout while hung. Nothing is tainted.
    async fn probe(
        &self,
        id: &InstanceId,
        command: &[String],
        timeout: Duration,
    ) -> Result<ProbeOutput, RuntimeError> {
        let behavior = {
            let mut inner = self.lock();
            let instance = inner.get_mut(id)?;
            match &instance.server {
                Some(server) => Behavior::from_u8(server.behavior.load(Ordering::SeqCst)),
                None => {
                    return Err(RuntimeError::WrongState {
                        id: id.clone(),
                        status: instance.info.status,
                        action: "probed",
                    });
                }
            }
        };
        let answer = |code: i32, line: &str| ProbeOutput {
            code: Some(code),
            timed_out: false,
            last_line: line.to_owned(),
        };
        Ok(match (command.first().map(String::as_str), behavior) {
            (Some("true"), _) => answer(0, ""),
            (Some("false"), _) => answer(1, ""),
            (_, Behavior::Healthy | Behavior::Failing) => answer(0, "healthy"),
            (_, Behavior::Unhealthy) => answer(1, "unhealthy"),
            (_, Behavior::Hung) => {
                tokio::time::sleep(timeout).await;
                ProbeOutput {
                    code: None,
                    timed_out: true,
                    last_line: String::new(),
                }
            }
        })
    }

    async fn list(&self) -> Result<Vec<Instance>, RuntimeError> {
        Ok(self
            .lock()
            .instances
            .values()
            .map(|i| i.info.clone())
            .collect())
    }

    async fn stop(&self, id: &InstanceId, grace: Duration) -> Result<Instance, RuntimeError> {
        let ignores_stop = {
            let mut inner = self.lock();
            let instance = inner.get_mut(id)?;
            if instance.info.status.is_exited() {
                return Ok(instance.info.clone());
            }
            instance.info.status = InstanceStatus::Stopping;
            instance.ignores_stop
        };
        let signal = if ignores_stop {
            tokio::time::sleep(grace).await;
            SIGKILL
        } else {
            SIGTERM
        };
        let info = {
            let mut inner = self.lock();
            let instance = inner.get_mut(id)?;
            // A crash during the grace period already recorded how it ended.
            if !instance.info.status.is_exited() {
                instance.server = None;
                instance.info.pid = None;
                instance.info.status = InstanceStatus::Exited {
                    code: None,
                    signal: Some(signal),
                };
            }
            instance.info.clone()
        };
        self.exited(id);
        Ok(info)
    }

    async fn kill(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        {
            let mut inner = self.lock();
            if inner.get_mut(id)?.info.status.is_exited() {
                return Ok(());
            }
            inner.exit(
                id,
                InstanceStatus::Exited {
                    code: None,
                    signal: Some(SIGKILL),
                },
            )?;
        }
        self.exited(id);
        Ok(())
    }

    async fn remove(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        let mut inner = self.lock();
        let status = inner.get_mut(id)?.info.status;
        if !status.is_exited() {
            return Err(RuntimeError::WrongState {
                id: id.clone(),
                status,
                action: "removed",
            });
        }
        inner.instances.remove(id);
        Ok(())
    }
}

async fn serve(listener: TcpListener, answers: Arc<Answers>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // Reap finished connections so a long-lived instance does not grow without bound.
        while connections.try_join_next().is_some() {}
        let answers = answers.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let answers = answers.clone();
                async move { answer(&answers, request).await }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

async fn answer(
    answers: &Answers,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let behavior = Behavior::from_u8(answers.behavior.load(Ordering::SeqCst));
    if behavior == Behavior::Hung {
        std::future::pending::<()>().await;
    }
    let (status, body) = match request.uri().path() {
        "/healthz" if matches!(behavior, Behavior::Healthy | Behavior::Failing) => {
            (StatusCode::OK, "ok\n".to_owned())
        }
        "/healthz" => (StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n".to_owned()),
        "/" if behavior == Behavior::Failing => {
            (StatusCode::INTERNAL_SERVER_ERROR, "failing\n".to_owned())
        }
        "/" => (
            StatusCode::OK,
            format!("{} from hello {}\n", answers.greeting, answers.version),
        ),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let response = Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .header("x-hello-version", answers.version.as_str())
        .body(Full::new(Bytes::from(body)))
        .expect("static headers are valid");
    Ok(response)
}
