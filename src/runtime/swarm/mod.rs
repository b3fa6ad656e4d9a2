//! The Swarm runtime: instances as services on a Docker Swarm, one service of one replica per
//! instance, driven through the manager's Engine API (`docker_host`). Swarm only places:
//! graven's controller decides rollouts, health gating and rollback as on every runtime,
//! and Swarm never restarts a task (`service`), so a task that ends, or whose node is lost,
//! is an instance that exited and that the controller replaces (`tasks`). Images are loaded
//! from graven's store into every node's engine (`swarm_engines`) by digest, and the service
//! names the engine's image id, so no node pulls; a node whose engine could not take the
//! image is kept out of the service's placement. An instance is reached on its node's
//! address at the port the node published in host mode. Everything graven needs to know is
//! on the service's labels (the Docker runtime's `labels`). The watch follows each node's
//! engine's container events (a node knows of a start or an end before the manager does)
//! and polls the manager's task list (a lost node sends no event); stops and kills go
//! through the node's engine too; logs are the service's, followed into graven's log store;
//! probes and drift go through the engine of the node the task runs on.

pub mod service;
pub mod tasks;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{ExecConfig, Service, ServiceSpecMode, ServiceSpecModeReplicated};
use bollard::query_parameters as q;
use futures_util::StreamExt;
use tokio::sync::broadcast;

use super::docker::{engine_error, image, is_not_found, labels, logs, marks};
use super::{
    Drift, DriftCheck, Instance, InstanceChange, InstanceId, InstanceSpec, InstanceStatus,
    ProbeOutput, Runtime, RuntimeError,
};
use crate::store::{Digest, Store};

/// How often the watch reads the manager's tasks: a lost node is seen about as fast as the
/// Swarm's own heartbeat allows.
const POLL: Duration = Duration::from_millis(250);
/// How long an engine of a node may take to answer before it counts as unreachable.
const ENGINE_ANSWER: Duration = Duration::from_secs(3);
/// How long `stop` and `kill` wait past the grace for the manager to see the task ended.
const END_WAIT: Duration = Duration::from_secs(20);
/// How long `start` waits for Swarm to place the task and its node to run it.
const START_WAIT: Duration = Duration::from_secs(60);
/// How often `start`, `stop` and `kill` read the manager's tasks while they wait.
const WAIT_POLL: Duration = Duration::from_millis(50);
/// How long a node's event stream that ended waits before it asks again.
const RECONNECT: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct SwarmRuntime {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The manager's engine: services, tasks, nodes.
    manager: super::DockerRuntime,
    /// Every node's engine (the manager's among them), where images are loaded and probes
    /// run, with the node id each answered with.
    engines: Vec<super::DockerRuntime>,
    node_ids: Mutex<HashMap<String, String>>,
    home: PathBuf,
    home_label: String,
    store: Store,
    changes: broadcast::Sender<InstanceChange>,
    watch: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// One task per node's engine following its containers' events (`watch_node`).
    node_watches: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// What those tasks saw, for `start` to wait on.
    containers: broadcast::Sender<TaskContainer>,
    followed: Arc<Mutex<HashSet<InstanceId>>>,
    /// Each image loaded so far: the nodes that hold it and its id there.
    loaded: Mutex<HashMap<Digest, Loaded>>,
    /// What nodes' engines said of instances before the manager knew (`tasks::overlay`):
    /// a start seen on its node, an end seen or made there. Forgotten at `remove`.
    facts: Mutex<HashMap<InstanceId, tasks::NodeFact>>,
}

/// An image in the Swarm: the nodes known to hold it and the image's id in their engines
/// (the same on every node: it is the hash of the image's config). Images are not taken from
/// an engine behind graven's back; a start that fails forgets what is known of its image, so
/// the next one asks every engine again.
#[derive(Debug, Clone, Default)]
struct Loaded {
    holders: HashSet<String>,
    image_id: Option<String>,
}

/// A container of one of this home's tasks started or ended on a node's engine.
#[derive(Debug, Clone)]
struct TaskContainer {
    /// Which of `Inner::engines` said so.
    engine: usize,
    id: InstanceId,
    container: String,
    /// `None` for a start; how it ended for a `die`.
    exited: Option<InstanceStatus>,
}

/// One instance's service, its tasks and the nodes, read from the manager.
struct Found {
    service: Service,
    recorded: labels::Recorded,
    placed: tasks::Placed,
}

impl SwarmRuntime {
    /// A runtime on the Swarm whose manager's engine is at `host`, with the nodes' engines
    /// `engines` (the manager's may be among them), for graven's home `home`. Nothing is
    /// asked of any engine until the first call.
    pub fn open(home: &Path, host: &str, engines: &[String]) -> Result<SwarmRuntime, RuntimeError> {
        let manager = super::DockerRuntime::open(home, host)?;
        let mut seen = HashSet::from([host.to_owned()]);
        let mut nodes = vec![manager.clone()];
        for engine in engines {
            if seen.insert(engine.clone()) {
                nodes.push(super::DockerRuntime::open(home, engine)?);
            }
        }
        let home = std::path::absolute(home).map_err(|source| RuntimeError::Other {
            context: "resolving graven's home".to_owned(),
            source,
        })?;
        let (changes, _) = broadcast::channel(super::CHANGES_BUFFER);
        let (containers, _) = broadcast::channel(super::CHANGES_BUFFER);
        Ok(SwarmRuntime {
            inner: Arc::new(Inner {
                store: manager.store().clone(),
                manager,
                engines: nodes,
                node_ids: Mutex::default(),
                home_label: home.display().to_string(),
                home,
                changes,
                watch: Mutex::new(None),
                node_watches: Mutex::default(),
                containers,
                followed: Arc::default(),
                loaded: Mutex::default(),
                facts: Mutex::default(),
            }),
        })
    }

    async fn manager(&self) -> Result<&Docker, RuntimeError> {
        self.inner.manager.engine().await
    }

    fn service_name(id: &InstanceId) -> String {
        format!("graven-{id}")
    }

    /// The node id of the engine `runtime`, asked once; `None` when it does not answer.
    async fn node_of<'a>(&self, runtime: &'a super::DockerRuntime) -> Option<(String, &'a Docker)> {
        let known = self.known_node(runtime);
        let docker = tokio::time::timeout(ENGINE_ANSWER, runtime.engine())
            .await
            .ok()?
            .ok()?;
        if let Some(id) = known {
            // A stopped engine is not reached: its socket refuses, quickly.
            tokio::time::timeout(ENGINE_ANSWER, docker.ping())
                .await
                .ok()?
                .ok()?;
            return Some((id, docker));
        }
        let info = tokio::time::timeout(ENGINE_ANSWER, docker.info())
            .await
            .ok()?
            .ok()?;
        let id = info
            .swarm
            .and_then(|s| s.node_id)
            .filter(|i| !i.is_empty())?;
        self.inner
            .node_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(runtime.host().to_owned(), id.clone());
        Some((id, docker))
    }

    /// The engine of node `node`, when it is one graven was given and it answers.
    async fn engine_of_node(&self, node: &str) -> Option<&Docker> {
        for runtime in &self.inner.engines {
            if let Some((id, docker)) = self.node_of(runtime).await
                && id == node
            {
                return Some(docker);
            }
        }
        None
    }

    fn fact(&self, id: &InstanceId) -> Option<tasks::NodeFact> {
        self.inner
            .facts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    fn set_fact(&self, id: &InstanceId, fact: Option<tasks::NodeFact>) {
        let mut facts = self.inner.facts.lock().unwrap_or_else(|e| e.into_inner());
        match fact {
            Some(fact) => facts.insert(id.clone(), fact),
            None => facts.remove(id),
        };
    }

    /// The node id `runtime`'s engine answered with before, asking nothing.
    fn known_node(&self, runtime: &super::DockerRuntime) -> Option<String> {
        self.inner
            .node_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(runtime.host())
            .cloned()
    }

    /// Loads `image` into every engine that answers and is not known to hold it; returns
    /// the nodes that hold it and the image's id there. Once every node holds it, nothing is
    /// asked of any engine: a deploy's every start after the first (and the prepare before
    /// each) costs no request.
    async fn load_everywhere(
        &self,
        image: &Digest,
    ) -> Result<(HashSet<String>, String), RuntimeError> {
        let known = self
            .inner
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(image)
            .cloned()
            .unwrap_or_default();
        let Loaded {
            mut holders,
            mut image_id,
        } = known;
        let mut last_error = None;
        for runtime in &self.inner.engines {
            if image_id.is_some()
                && self
                    .known_node(runtime)
                    .is_some_and(|node| holders.contains(&node))
            {
                continue;
            }
            let Some((node, docker)) = self.node_of(runtime).await else {
                continue;
            };
            match image::load(docker, &self.inner.store, image).await {
                Ok(()) => {}
                Err(error @ RuntimeError::UnknownImage { .. }) => return Err(error),
                Err(error) => {
                    last_error = Some(error);
                    continue;
                }
            }
            if image_id.is_none() {
                let inspected = docker
                    .inspect_image(&image::reference(image))
                    .await
                    .map_err(|e| engine_error(format!("inspecting image {image}"), e))?;
                image_id = inspected.id;
            }
            holders.insert(node);
        }
        match image_id {
            Some(id) => {
                self.inner
                    .loaded
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(
                        image.clone(),
                        Loaded {
                            holders: holders.clone(),
                            image_id: Some(id.clone()),
                        },
                    );
                Ok((holders, id))
            }
            None => Err(last_error.unwrap_or_else(|| RuntimeError::Other {
                context: format!("loading image {image} into the swarm"),
                source: std::io::Error::other("no node's engine answered (swarm_engines)"),
            })),
        }
    }

    /// The manager's nodes, by id.
    async fn nodes(&self) -> Result<HashMap<String, tasks::NodeView>, RuntimeError> {
        let docker = self.manager().await?;
        let nodes = docker
            .list_nodes(None::<q::ListNodesOptions>)
            .await
            .map_err(|e| engine_error("listing the swarm's nodes", e))?;
        Ok(nodes
            .iter()
            .filter_map(|n| Some((n.id.clone()?, tasks::NodeView::of(n))))
            .collect())
    }

    /// Every service of this home with its tasks.
    async fn find_all(&self, only: Option<&InstanceId>) -> Result<Vec<Found>, RuntimeError> {
        let docker = self.manager().await?;
        let mut filters = HashMap::from([(
            "label".to_owned(),
            vec![format!("{}={}", labels::HOME, self.inner.home_label)],
        )]);
        if let Some(id) = only {
            filters.insert("name".to_owned(), vec![Self::service_name(id)]);
        }
        let services = docker
            .list_services(Some(q::ListServicesOptions {
                filters: Some(filters.clone()),
                ..Default::default()
            }))
            .await
            .map_err(|e| engine_error("listing the swarm's services", e))?;
        if services.is_empty() {
            return Ok(Vec::new());
        }
        let mut task_filters = HashMap::new();
        if let Some(id) = only {
            task_filters.insert("service".to_owned(), vec![Self::service_name(id)]);
        }
        let all_tasks = docker
            .list_tasks(Some(q::ListTasksOptions {
                filters: Some(task_filters),
            }))
            .await
            .map_err(|e| engine_error("listing the swarm's tasks", e))?;
        let nodes = self.nodes().await?;
        let mut found = Vec::new();
        for service in services {
            let Some(spec_labels) = service.spec.as_ref().and_then(|s| s.labels.clone()) else {
                continue;
            };
            let Some(recorded) = labels::read(&spec_labels) else {
                continue;
            };
            // A name filter matches by prefix: the exact service only.
            if only.is_some_and(|id| *id != recorded.id) {
                continue;
            }
            let service_tasks: Vec<_> = all_tasks
                .iter()
                .filter(|t| t.service_id.is_some() && t.service_id == service.id)
                .collect();
            let replicas = service
                .spec
                .as_ref()
                .and_then(|s| s.mode.as_ref())
                .and_then(|m| m.replicated.as_ref())
                .and_then(|r| r.replicas)
                .unwrap_or(1);
            let placed = tasks::overlay(
                tasks::placed(&service_tasks, &nodes, recorded.port, replicas),
                self.fact(&recorded.id).as_ref(),
            );
            found.push(Found {
                service,
                recorded,
                placed,
            });
        }
        Ok(found)
    }

    async fn find(&self, id: &InstanceId) -> Result<Found, RuntimeError> {
        if !labels::valid_id(id) {
            return Err(RuntimeError::UnknownInstance { id: id.clone() });
        }
        self.find_all(Some(id))
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| RuntimeError::UnknownInstance { id: id.clone() })
    }

    fn instance_of(&self, found: &Found) -> Instance {
        self.instance_at(&found.recorded, found.placed.status, found.placed.address)
    }

    fn instance_at(
        &self,
        recorded: &labels::Recorded,
        status: InstanceStatus,
        address: Option<SocketAddr>,
    ) -> Instance {
        let recorded = recorded.clone();
        let marks = marks::load(&self.inner.home, "swarm", &recorded.id);
        let warnings = vec![service::NO_NEW_PRIVILEGES.to_owned()];
        Instance {
            id: recorded.id,
            image: recorded.image,
            labels: recorded.labels,
            status,
            address,
            pid: None,
            started_at_ms: recorded.started_at_ms,
            tainted: marks.tainted,
            log: None,
            warnings,
            drift: marks.drift,
        }
    }

    /// Sets the service's replicas (0 stops its task, with the spec's stop signal and
    /// grace), at the version just read. Only the mode changes: a changed task template
    /// would be an update, and Swarm would start a new task to roll it.
    async fn scale(&self, found: &Found, replicas: i64) -> Result<(), RuntimeError> {
        let docker = self.manager().await?;
        let id = &found.recorded.id;
        let mut spec = found.service.spec.clone().unwrap_or_default();
        spec.mode = Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated {
                replicas: Some(replicas),
            }),
            ..Default::default()
        });
        let version = found
            .service
            .version
            .as_ref()
            .and_then(|v| v.index)
            .unwrap_or(0);
        docker
            .update_service(
                &Self::service_name(id),
                spec,
                q::UpdateServiceOptions {
                    version: version as i32,
                    ..Default::default()
                },
                None,
            )
            .await
            .map_err(|e| engine_error(format!("scaling instance {id}"), e))?;
        Ok(())
    }

    /// Waits until the manager reports `id` exited, up to `wait`.
    async fn wait_exited(&self, id: &InstanceId, wait: Duration) -> Result<Instance, RuntimeError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let instance = self.inspect(id).await?;
            if instance.status.is_exited() || tokio::time::Instant::now() >= deadline {
                return Ok(instance);
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
    }

    /// Starts the polling watch unless one runs; outside a tokio runtime nothing is
    /// watched (`list` stays the truth).
    fn ensure_watch(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut watch = self.inner.watch.lock().unwrap_or_else(|e| e.into_inner());
        if watch.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let runtime = self.clone();
        *watch = Some(handle.spawn(async move { runtime.poll_tasks().await }));
    }

    /// Starts a task following each node's engine's container events unless it runs (one
    /// whose tokio runtime went is replaced); outside a tokio runtime nothing is followed.
    fn ensure_node_watches(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut watches = self
            .inner
            .node_watches
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if watches.len() == self.inner.engines.len() && watches.iter().all(|w| !w.is_finished()) {
            return;
        }
        for watch in watches.drain(..) {
            watch.abort();
        }
        for engine in 0..self.inner.engines.len() {
            let runtime = self.clone();
            watches.push(handle.spawn(async move { runtime.watch_node(engine).await }));
        }
    }

    /// Follows the `start` and `die` events of this home's task containers on node engine
    /// `engine` (`service::TASK_HOME`): a container that started is what `start` waits for;
    /// one that died is an instance that exited (its task never runs again), reported as a
    /// change at once. The manager learns of both only when the node reports, later; its
    /// event stream of API 1.41 has no task events at all. A stream that ends (the engine
    /// stopped or restarted) is asked for again.
    async fn watch_node(self, engine: usize) {
        loop {
            if let Ok(docker) = self.inner.engines[engine].engine().await {
                let label = format!("{}={}", service::TASK_HOME, self.inner.home_label);
                let mut events = super::docker::container_events(docker, &["start", "die"], label);
                while let Some(Ok(event)) = events.next().await {
                    let actor = event.actor.unwrap_or_default();
                    let attributes = actor.attributes.unwrap_or_default();
                    let Some(id) = attributes
                        .get(service::TASK_INSTANCE)
                        .cloned()
                        .map(InstanceId)
                    else {
                        continue;
                    };
                    let exited = (event.action.as_deref() != Some("start")).then(|| {
                        let code = attributes.get("exitCode").and_then(|c| c.parse().ok());
                        tasks::exit_status(code)
                    });
                    if let Some(status) = exited {
                        self.set_fact(&id, Some(tasks::NodeFact::Ended(status)));
                        let _ = self
                            .inner
                            .changes
                            .send(InstanceChange::Exited { id: id.clone() });
                    }
                    let _ = self.inner.containers.send(TaskContainer {
                        engine,
                        id,
                        container: actor.id.unwrap_or_default(),
                        exited,
                    });
                }
            }
            tokio::time::sleep(RECONNECT).await;
        }
    }

    /// Where a container started on node engine `engine` is reached: its node's address
    /// (`nodes`, as the manager lists them) and the port the node's engine published for
    /// `port`; `None` while it is not running there.
    async fn reached_on_node(
        &self,
        engine: usize,
        container: &str,
        port: u16,
        nodes: &HashMap<String, tasks::NodeView>,
    ) -> Option<tasks::NodeFact> {
        let (node, docker) = self.node_of(&self.inner.engines[engine]).await?;
        let ip = nodes.get(&node)?.address?;
        let inspected = docker.inspect_container(container, None).await.ok()?;
        if inspected.state?.running != Some(true) {
            return None;
        }
        let published = tasks::published_port(inspected.network_settings?.ports.as_ref()?, port)?;
        Some(tasks::NodeFact::Running {
            address: SocketAddr::new(ip, published),
            node,
            container: container.to_owned(),
        })
    }

    /// Reports each instance that exited (its task ended, or its node was lost) or whose
    /// service went, once, by reading the manager's tasks every `POLL`. The engine's event
    /// stream of API 1.41 has no task events, only services' and nodes'.
    async fn poll_tasks(self) {
        let mut live: HashSet<InstanceId> = HashSet::new();
        let mut first = true;
        loop {
            if let Ok(found) = self.find_all(None).await {
                let now: HashSet<InstanceId> = found
                    .iter()
                    .filter(|f| !f.placed.status.is_exited())
                    .map(|f| f.recorded.id.clone())
                    .collect();
                if !first {
                    for id in live.difference(&now) {
                        let _ = self
                            .inner
                            .changes
                            .send(InstanceChange::Exited { id: id.clone() });
                    }
                }
                first = false;
                live = now;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Follows the service's output into the log store unless a task of this process does.
    fn follow_logs(&self, instance: &Instance) {
        if tokio::runtime::Handle::try_current().is_err() || instance.status.is_exited() {
            return;
        }
        let mut followed = self
            .inner
            .followed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !followed.insert(instance.id.clone()) {
            return;
        }
        drop(followed);
        let runtime = self.clone();
        let instance = instance.clone();
        tokio::spawn(async move {
            if let Ok(docker) = runtime.manager().await {
                follow_service(docker, &runtime.inner.home, &instance).await;
            }
            let mut followed = runtime
                .inner
                .followed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            followed.remove(&instance.id);
        });
    }

    /// The engine and container of `id`'s running task.
    async fn running_container(
        &self,
        id: &InstanceId,
        action: &'static str,
    ) -> Result<(&Docker, String), RuntimeError> {
        let found = self.find(id).await?;
        if found.placed.status != InstanceStatus::Running {
            return Err(RuntimeError::WrongState {
                id: id.clone(),
                status: found.placed.status,
                action,
            });
        }
        let (Some(node), Some(_)) = (found.placed.node.clone(), &found.placed.container) else {
            return Err(RuntimeError::WrongState {
                id: id.clone(),
                status: InstanceStatus::Created,
                action,
            });
        };
        self.task_container(&found)
            .await
            .ok_or_else(|| RuntimeError::Other {
                context: format!("instance {id} on node {node}"),
                source: std::io::Error::other(
                    "the node's engine is not among swarm_engines, or does not answer",
                ),
            })
    }

    /// The engine of the node `found`'s task runs on and its container there, while it
    /// runs or is being stopped; `None` when graven has no engine for the node that answers.
    async fn task_container(&self, found: &Found) -> Option<(&Docker, String)> {
        if !matches!(
            found.placed.status,
            InstanceStatus::Running | InstanceStatus::Stopping
        ) {
            return None;
        }
        let container = found.placed.container.clone()?;
        let docker = self.engine_of_node(found.placed.node.as_ref()?).await?;
        Some((docker, container))
    }

    /// Waits until `found`'s task's container, told to end through its node's engine, does
    /// not run there; what the instance then is, kept as the node's word until the manager
    /// knows too. `None` when the engine does not say.
    async fn ended_on_node(
        &self,
        found: &Found,
        docker: &Docker,
        container: &str,
    ) -> Option<Instance> {
        super::docker::wait_not_running(docker, container, END_WAIT).await;
        let state = docker
            .inspect_container(container, None)
            .await
            .ok()?
            .state?;
        if state.running != Some(false) {
            return None;
        }
        let status = tasks::exit_status(state.exit_code);
        self.set_fact(&found.recorded.id, Some(tasks::NodeFact::Ended(status)));
        Some(self.instance_at(&found.recorded, status, None))
    }
}

/// Follows the service's output (stdout and stderr, the manager gathering it from the
/// task's node) into the instance's source of the log store, as the Docker runtime's
/// follower does for a container.
async fn follow_service(docker: &Docker, home: &Path, instance: &Instance) {
    use crate::logs::ingest::Writer;
    let group = instance
        .labels
        .get(crate::runtime::local::retention::LOG_GROUP)
        .map_or(crate::logs::RUN_GROUP, String::as_str)
        .to_owned();
    let opened = {
        let home = home.to_owned();
        let id = instance.id.0.clone();
        let meta = crate::runtime::local::retention::meta(
            &instance.id,
            &instance.labels,
            instance.started_at_ms,
        );
        tokio::task::spawn_blocking(move || Writer::open_with(&home, &group, &id, &meta)).await
    };
    let Ok(Ok(mut writer)) = opened else {
        return;
    };
    let last_ns = logs::last_line_ns(writer.dir()).unwrap_or(0);
    let last = std::time::UNIX_EPOCH + Duration::from_nanos(last_ns);
    let mut stream = docker.service_logs(
        &SwarmRuntime::service_name(&instance.id),
        Some(q::LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            timestamps: true,
            since: (last_ns / 1_000_000_000) as i32,
            ..Default::default()
        }),
    );
    let mut last_sync = tokio::time::Instant::now();
    while let Some(Ok(chunk)) = stream.next().await {
        let bytes = match &chunk {
            LogOutput::StdOut { message } | LogOutput::StdErr { message } => message,
            LogOutput::Console { message } | LogOutput::StdIn { message } => message,
        };
        for line in bytes.split_inclusive(|&b| b == b'\n') {
            let (time, text) = logs::split_timestamp(line);
            if last_ns > 0 && time <= last {
                continue;
            }
            if writer.append(time, text).is_err() {
                return;
            }
        }
        if last_sync.elapsed() >= Duration::from_secs(1) {
            let _ = writer.sync();
            last_sync = tokio::time::Instant::now();
        }
    }
    let _ = writer.sync();
}

impl Runtime for SwarmRuntime {
    fn name(&self) -> &'static str {
        "swarm"
    }

    fn changes(&self) -> broadcast::Receiver<InstanceChange> {
        let receiver = self.inner.changes.subscribe();
        self.ensure_watch();
        self.ensure_node_watches();
        receiver
    }

    async fn prepare(&self, image: &Digest) -> Result<(), RuntimeError> {
        self.load_everywhere(image).await.map(drop)
    }

    async fn start(&self, spec: InstanceSpec) -> Result<Instance, RuntimeError> {
        spec.validate()?;
        let (holders, image_id) = self.load_everywhere(&spec.image).await?;
        // Tasks land only where the image is: every other node is excluded.
        let nodes = self.nodes().await?;
        let excluded: Vec<String> = nodes
            .keys()
            .filter(|node| !holders.contains(*node))
            .cloned()
            .collect();
        let id = InstanceId(format!("{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff));
        let recorded = labels::Recorded {
            id: id.clone(),
            image: spec.image.clone(),
            port: spec.port.unwrap_or(super::DEFAULT_PORT),
            network: super::NetworkMode::Private,
            started_at_ms: super::now_ms(),
            labels: spec.labels.clone(),
        };
        let (service_spec, _) = service::service_spec(
            &spec,
            &Self::service_name(&id),
            &image_id,
            (&id.0, &self.inner.home_label),
            labels::write(&recorded, &self.inner.home_label),
            &excluded,
        )?;
        let docker = self.manager().await?;
        // Subscribed before the service exists, so its container's start cannot be missed.
        let mut containers = self.inner.containers.subscribe();
        self.ensure_node_watches();
        docker
            .create_service(service_spec, None)
            .await
            .map_err(|e| engine_error(format!("creating instance {id}"), e))?;
        // Returned once it runs, reached at its node's address, as every runtime's start:
        // as soon as its node's engine says its container started (the manager learns it
        // when the node reports, later), or the manager's tasks say so first.
        let deadline = tokio::time::Instant::now() + START_WAIT;
        let mut poll = tokio::time::interval(WAIT_POLL);
        let failure = loop {
            tokio::select! {
                seen = containers.recv() => {
                    let Ok(seen) = seen else {
                        // Lagged: the manager's tasks still say.
                        continue;
                    };
                    if seen.id != id || seen.exited.is_some() {
                        continue;
                    }
                    let reached = self
                        .reached_on_node(seen.engine, &seen.container, recorded.port, &nodes)
                        .await;
                    if let Some(fact @ tasks::NodeFact::Running { address, .. }) = reached {
                        self.set_fact(&id, Some(fact));
                        let instance =
                            self.instance_at(&recorded, InstanceStatus::Running, Some(address));
                        self.follow_logs(&instance);
                        return Ok(instance);
                    }
                    continue;
                }
                _ = poll.tick() => {}
            }
            let found = self.find(&id).await?;
            let instance = self.instance_of(&found);
            if instance.status == InstanceStatus::Running && instance.address.is_some() {
                self.follow_logs(&instance);
                return Ok(instance);
            }
            if instance.status.is_exited() {
                break found
                    .placed
                    .error
                    .unwrap_or_else(|| "its task ended".to_owned());
            }
            if tokio::time::Instant::now() >= deadline {
                break format!(
                    "swarm did not run its task within {} s{}",
                    START_WAIT.as_secs(),
                    found
                        .placed
                        .error
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
            }
        };
        // Nothing is left behind: the service goes, and what was known of its image is
        // asked again (a node may have lost it).
        let _ = docker.delete_service(&Self::service_name(&id)).await;
        self.inner
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&spec.image);
        Err(RuntimeError::Sandbox {
            id,
            message: failure,
        })
    }

    async fn inspect(&self, id: &InstanceId) -> Result<Instance, RuntimeError> {
        let found = self.find(id).await?;
        Ok(self.instance_of(&found))
    }

    async fn list(&self) -> Result<Vec<Instance>, RuntimeError> {
        let mut instances: Vec<Instance> = self
            .find_all(None)
            .await?
            .iter()
            .map(|found| self.instance_of(found))
            .collect();
        for instance in &instances {
            // A restarted graven follows the output of what it finds running.
            self.follow_logs(instance);
        }
        instances.sort_by_key(|i| (i.started_at_ms, i.id.clone()));
        Ok(instances)
    }

    async fn stop(&self, id: &InstanceId, grace: Duration) -> Result<Instance, RuntimeError> {
        let found = self.find(id).await?;
        if found.placed.status.is_exited() {
            return Ok(self.instance_of(&found));
        }
        // The service wants no task any more: Swarm's own stop (the spec's stop signal and
        // grace) follows, but reaches the node a second or more later (1.1–1.3 s on the
        // bench's Swarm), so the node's engine, where graven has it, stops the container
        // at once, the same way (its stop signal, SIGKILL after the grace).
        self.scale(&found, 0).await?;
        if let Some((docker, container)) = self.task_container(&found).await
            && super::docker::stop_container(docker, &container, grace)
                .await
                .is_ok()
            && let Some(stopped) = self.ended_on_node(&found, docker, &container).await
        {
            return Ok(stopped);
        }
        self.wait_exited(id, grace + END_WAIT).await
    }

    async fn kill(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        let found = self.find(id).await?;
        if found.placed.status.is_exited() {
            return Ok(());
        }
        // SIGKILL through the node's engine where graven has it; else Swarm's stop (with the
        // service's grace), its nearest.
        if let Some((docker, container)) = self.task_container(&found).await
            && super::docker::kill_container(docker, &container)
                .await
                .is_ok()
            && self
                .ended_on_node(&found, docker, &container)
                .await
                .is_some()
        {
            return Ok(());
        }
        self.scale(&found, 0).await?;
        self.wait_exited(id, END_WAIT).await.map(drop)
    }

    async fn remove(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        let found = self.find(id).await?;
        if !found.placed.status.is_exited() {
            return Err(RuntimeError::WrongState {
                id: id.clone(),
                status: found.placed.status,
                action: "removed",
            });
        }
        let docker = self.manager().await?;
        match docker.delete_service(&Self::service_name(id)).await {
            Ok(()) => {}
            Err(error) if is_not_found(&error) => {}
            Err(error) => return Err(engine_error(format!("removing instance {id}"), error)),
        }
        marks::remove(&self.inner.home, "swarm", id);
        self.set_fact(id, None);
        Ok(())
    }

    async fn probe(
        &self,
        id: &InstanceId,
        command: &[String],
        timeout: Duration,
    ) -> Result<ProbeOutput, RuntimeError> {
        let (docker, container) = self.running_container(id, "probed").await?;
        let context = || format!("running a command in instance {id}");
        let exec = docker
            .create_exec(
                &container,
                ExecConfig {
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(command.to_vec()),
                    ..ExecConfig::default()
                },
            )
            .await
            .map_err(|e| engine_error(context(), e))?;
        let started = docker
            .start_exec(&exec.id, None)
            .await
            .map_err(|e| engine_error(context(), e))?;
        let mut output = Vec::new();
        let ran = tokio::time::timeout(timeout, async {
            if let bollard::exec::StartExecResults::Attached {
                output: mut out, ..
            } = started
            {
                while let Some(Ok(chunk)) = out.next().await {
                    output.extend_from_slice(chunk.as_ref());
                    if output.len() > 64 * super::PROBE_LINE_BYTES {
                        output.drain(..output.len() - 8 * super::PROBE_LINE_BYTES);
                    }
                }
            }
        })
        .await;
        // The engine has no call to end an exec, and the node's PIDs are not this host's:
        // one that outlasts its timeout is left to end by itself.
        let timed_out = ran.is_err();
        let code = match docker.inspect_exec(&exec.id).await {
            Ok(exec) if !timed_out && exec.running != Some(true) => {
                exec.exit_code.map(|c| c as i32)
            }
            _ => None,
        };
        Ok(ProbeOutput {
            code,
            timed_out,
            last_line: crate::runtime::probe_last_line(&output),
        })
    }

    async fn check_drift(
        &self,
        ids: &[InstanceId],
        _check: DriftCheck,
    ) -> Result<Vec<(InstanceId, Drift)>, RuntimeError> {
        let mut found = Vec::new();
        for id in ids {
            let instance = match self.inspect(id).await {
                Ok(instance) => instance,
                Err(RuntimeError::UnknownInstance { .. }) => continue,
                Err(error) => return Err(error),
            };
            if instance.status.is_exited() || instance.drift.is_some() {
                continue;
            }
            // A node graven has no engine for is not checked (docs/runtimes.md).
            let Ok((docker, container)) = self.running_container(id, "checked").await else {
                continue;
            };
            let changes = match docker.container_changes(&container).await {
                Ok(changes) => changes.unwrap_or_default(),
                Err(error) if is_not_found(&error) => continue,
                Err(error) => return Err(engine_error(format!("diffing instance {id}"), error)),
            };
            let inspected = docker
                .inspect_container(&container, None)
                .await
                .map_err(|e| engine_error(format!("inspecting instance {id}"), e))?;
            let mounts: Vec<String> = inspected
                .mounts
                .unwrap_or_default()
                .into_iter()
                .filter_map(|m| m.destination)
                .collect();
            let writable = super::docker::drift::writable_paths(&[], &mounts);
            if let Some(first) = super::docker::drift::findings(&changes, &writable)
                .into_iter()
                .next()
            {
                marks::record_drift(&self.inner.home, "swarm", id, &first)?;
                let _ = self
                    .inner
                    .changes
                    .send(InstanceChange::Drifted { id: id.clone() });
                found.push((id.clone(), first));
            }
        }
        Ok(found)
    }
}
