//! The Docker runtime: instances as containers on a Docker engine, through its Engine API
//! (bollard, the API version negotiated down to the engine's: Debian's 20.10 speaks 1.41).
//! Images are loaded from graven's store by digest (`image`), never built or pulled by the
//! engine; a container gets the local runtime's lock-down where Docker can express it and a
//! refusal where it cannot (`lockdown`); everything graven needs to know about an instance
//! is on its container's labels (`labels`), so `list` after a restart is the engine's word.
//! The watch is the engine's event stream; drift is `docker diff` (`drift`); the output is
//! followed into graven's log store (`logs`).

pub mod drift;
pub mod image;
pub mod labels;
pub mod lockdown;
pub mod logs;
pub(crate) mod marks;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, ExecConfig};
use bollard::query_parameters as q;
use futures_util::StreamExt;
use tokio::sync::broadcast;

use super::{
    Drift, DriftCheck, Instance, InstanceChange, InstanceId, InstanceSpec, InstanceStatus,
    NetworkMode, PROBE_LINE_BYTES, ProbeOutput, Runtime, RuntimeError, probe_last_line,
};
use crate::store::{Digest, Store};

/// The engine's address when neither graven.toml nor `$DOCKER_HOST` gives one.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";
/// How long one Engine API request may take (an image load included).
const REQUEST_TIMEOUT_S: u64 = 300;
/// How long `kill` waits for the engine to report the container exited.
const KILL_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct DockerRuntime {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The engine's address as given (`unix:///…` or `tcp://…`).
    host: String,
    /// The client, its API version negotiated on first use.
    client: tokio::sync::OnceCell<Docker>,
    home: PathBuf,
    /// The home as written on containers (`labels::HOME`).
    home_label: String,
    store: Store,
    changes: broadcast::Sender<InstanceChange>,
    /// The event-stream task while one runs.
    watch: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The instances whose output a task of this process follows into the log store.
    followed: Arc<Mutex<std::collections::HashSet<InstanceId>>>,
}

/// The runtimes open in this process, by graven home and engine. Every environment's
/// controller opens the runtime of its engine, and each one watching, listing and following
/// all of the home's containers handled every exit and taint once per environment and ran
/// a log follower per environment that lost the source's lock: one runtime per home and
/// engine serves them all, as the local runtime's one instance does.
type OpenRuntimes = HashMap<(PathBuf, String), std::sync::Weak<Inner>>;
static OPEN: Mutex<Option<OpenRuntimes>> = Mutex::new(None);

/// The execs this process started as health probes, by exec id, with when: an exec a watch
/// sees that is not among them is someone's break-glass, and taints. One for the process,
/// since every environment's runtime on an engine watches all of the home's containers.
static PROBES: Mutex<Option<HashMap<String, std::time::Instant>>> = Mutex::new(None);

/// How long a probe's exec id is remembered: far longer than the engine takes to report
/// the exec's start.
const PROBE_MEMORY: Duration = Duration::from_secs(300);

/// An Engine API failure as the runtime's error, saying what was being done.
pub(crate) fn engine_error(
    context: impl Into<String>,
    error: bollard::errors::Error,
) -> RuntimeError {
    RuntimeError::Other {
        context: context.into(),
        source: std::io::Error::other(error),
    }
}

pub(crate) fn is_not_found(error: &bollard::errors::Error) -> bool {
    matches!(
        error,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// The engine's events `actions` of the containers labelled `label` (`KEY=VALUE`), as they
/// happen; the Swarm runtime follows each node's task containers so too.
pub(crate) fn container_events(
    docker: &Docker,
    actions: &[&str],
    label: String,
) -> impl futures_util::Stream<Item = Result<bollard::models::EventMessage, bollard::errors::Error>>
{
    let filters = HashMap::from([
        ("type".to_owned(), vec!["container".to_owned()]),
        (
            "event".to_owned(),
            actions.iter().map(|a| (*a).to_owned()).collect(),
        ),
        ("label".to_owned(), vec![label]),
    ]);
    docker.events(Some(q::EventsOptions {
        filters: Some(filters),
        ..Default::default()
    }))
}

/// Stops `container`: its stop signal, then SIGKILL once `grace` has passed (in whole
/// seconds, the API's unit, rounded up so the grace is never shortened); one already stopped
/// is no error. Returns once it stopped. The Swarm runtime stops a task's container so too.
pub(crate) async fn stop_container(
    docker: &Docker,
    container: &str,
    grace: Duration,
) -> Result<(), bollard::errors::Error> {
    let seconds = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
    match docker
        .stop_container(
            container,
            Some(q::StopContainerOptions {
                t: Some(seconds as i32),
                ..Default::default()
            }),
        )
        .await
    {
        // Already stopped: 304.
        Ok(())
        | Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 304, ..
        }) => Ok(()),
        Err(error) => Err(error),
    }
}

/// SIGKILL to `container`; one not running any more (409: it ended meanwhile) is no error.
pub(crate) async fn kill_container(
    docker: &Docker,
    container: &str,
) -> Result<(), bollard::errors::Error> {
    match docker
        .kill_container(
            container,
            Some(q::KillContainerOptions {
                signal: "SIGKILL".to_owned(),
            }),
        )
        .await
    {
        Ok(())
        | Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 409, ..
        }) => Ok(()),
        Err(error) => Err(error),
    }
}

/// Waits, up to `wait`, until `container` does not run (the engine's wait endpoint). Whatever
/// the answer (bollard reads a non-zero exit code as an error, and a container removed
/// meanwhile is one too), the caller's inspect says what it then is.
pub(crate) async fn wait_not_running(docker: &Docker, container: &str, wait: Duration) {
    let mut waiting = docker.wait_container(
        container,
        Some(q::WaitContainerOptions {
            condition: "not-running".to_owned(),
        }),
    );
    let _ = tokio::time::timeout(wait, waiting.next()).await;
}

/// The engine's address for `configured` (graven.toml's `docker_host`): it, else
/// `$DOCKER_HOST`, else the usual socket.
pub fn engine_host(configured: Option<&str>) -> String {
    configured
        .map(str::to_owned)
        .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| DEFAULT_HOST.to_owned())
}

impl DockerRuntime {
    /// The runtime on the engine at `host` (`engine_host`) for instances of graven's home
    /// `home`: the one already open in this process, if any (`OPEN`). Nothing is asked of
    /// the engine until the first call.
    pub fn open(home: &Path, host: &str) -> Result<DockerRuntime, RuntimeError> {
        let home = std::path::absolute(home).map_err(|source| RuntimeError::Other {
            context: "resolving graven's home".to_owned(),
            source,
        })?;
        if !(host.starts_with("unix://") || host.starts_with("tcp://")) {
            return Err(RuntimeError::Other {
                context: format!("docker engine {host:?}"),
                source: std::io::Error::other(
                    "an engine's address is unix:///PATH or tcp://HOST:PORT",
                ),
            });
        }
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        let open = open.get_or_insert_with(HashMap::new);
        open.retain(|_, inner| inner.strong_count() > 0);
        let key = (home.clone(), host.to_owned());
        if let Some(inner) = open.get(&key).and_then(std::sync::Weak::upgrade) {
            return Ok(DockerRuntime { inner });
        }
        let store = Store::open(&home)?;
        let (changes, _) = broadcast::channel(super::CHANGES_BUFFER);
        let inner = Arc::new(Inner {
            host: host.to_owned(),
            client: tokio::sync::OnceCell::new(),
            home_label: home.display().to_string(),
            home,
            store,
            changes,
            watch: Mutex::new(None),
            followed: Arc::default(),
        });
        open.insert(key, Arc::downgrade(&inner));
        Ok(DockerRuntime { inner })
    }

    /// The engine's address.
    pub fn host(&self) -> &str {
        &self.inner.host
    }

    /// The image store instances are loaded from.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The client, connected and its API version negotiated on first use.
    pub async fn engine(&self) -> Result<&Docker, RuntimeError> {
        let host = &self.inner.host;
        self.inner
            .client
            .get_or_try_init(|| async {
                let docker = if let Some(path) = host.strip_prefix("unix://") {
                    Docker::connect_with_unix(path, REQUEST_TIMEOUT_S, bollard::API_DEFAULT_VERSION)
                } else {
                    Docker::connect_with_http(host, REQUEST_TIMEOUT_S, bollard::API_DEFAULT_VERSION)
                }
                .map_err(|e| engine_error(format!("connecting to docker engine {host}"), e))?;
                docker
                    .negotiate_version()
                    .await
                    .map_err(|e| engine_error(format!("docker engine {host}"), e))
            })
            .await
    }

    fn container_name(id: &InstanceId) -> String {
        format!("graven-{id}")
    }

    /// The container of `id`, when it is one of this home's.
    async fn inspect_raw(
        &self,
        id: &InstanceId,
    ) -> Result<(ContainerInspectResponse, labels::Recorded), RuntimeError> {
        let unknown = || RuntimeError::UnknownInstance { id: id.clone() };
        if !labels::valid_id(id) {
            return Err(unknown());
        }
        let docker = self.engine().await?;
        let response = match docker
            .inspect_container(&Self::container_name(id), None)
            .await
        {
            Ok(response) => response,
            Err(error) if is_not_found(&error) => return Err(unknown()),
            Err(error) => return Err(engine_error(format!("inspecting instance {id}"), error)),
        };
        let container_labels = response
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        if container_labels.get(labels::HOME) != Some(&self.inner.home_label) {
            return Err(unknown());
        }
        let recorded = labels::read(&container_labels).ok_or_else(unknown)?;
        Ok((response, recorded))
    }

    fn instance_of(
        &self,
        response: &ContainerInspectResponse,
        recorded: labels::Recorded,
    ) -> Instance {
        let state = response.state.clone().unwrap_or_default();
        let status = status_of(&state);
        let address = match recorded.network {
            NetworkMode::Host => Some(SocketAddr::from((Ipv4Addr::LOCALHOST, recorded.port))),
            NetworkMode::Private => response
                .network_settings
                .as_ref()
                .and_then(|n| n.networks.as_ref())
                .and_then(|n| n.values().find_map(|e| e.ip_address.clone()))
                .and_then(|ip| ip.parse::<IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, recorded.port)),
        };
        let marks = marks::load(&self.inner.home, "docker", &recorded.id);
        Instance {
            id: recorded.id,
            image: recorded.image,
            labels: recorded.labels,
            status,
            address,
            pid: state
                .pid
                .filter(|&p| p > 0 && !status.is_exited() && self.is_local())
                .map(|p| p as u32),
            started_at_ms: recorded.started_at_ms,
            tainted: marks.tainted,
            log: None,
            warnings: Vec::new(),
            drift: marks.drift,
        }
    }

    /// The containers of this home as the engine lists them, with what their labels record.
    async fn list_raw(
        &self,
    ) -> Result<Vec<(bollard::models::ContainerSummary, labels::Recorded)>, RuntimeError> {
        let docker = self.engine().await?;
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![format!("{}={}", labels::HOME, self.inner.home_label)],
        )]);
        let summaries = docker
            .list_containers(Some(q::ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| engine_error("listing instances", e))?;
        Ok(summaries
            .into_iter()
            .filter_map(|summary| {
                let recorded = summary.labels.as_ref().and_then(labels::read)?;
                Some((summary, recorded))
            })
            .collect())
    }

    /// The instance a listed container is, from the listing alone (no PID: the listing has
    /// none); `None` for an exited one whose exit code the listing does not say.
    fn instance_of_summary(
        &self,
        summary: &bollard::models::ContainerSummary,
        recorded: labels::Recorded,
    ) -> Option<Instance> {
        let status = summary_status(summary)?;
        let address = match recorded.network {
            NetworkMode::Host => Some(SocketAddr::from((Ipv4Addr::LOCALHOST, recorded.port))),
            NetworkMode::Private => summary
                .network_settings
                .as_ref()
                .and_then(|n| n.networks.as_ref())
                .and_then(|n| n.values().find_map(|e| e.ip_address.clone()))
                .and_then(|ip| ip.parse::<IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, recorded.port)),
        };
        let marks = marks::load(&self.inner.home, "docker", &recorded.id);
        Some(Instance {
            id: recorded.id,
            image: recorded.image,
            labels: recorded.labels,
            status,
            address,
            pid: None,
            started_at_ms: recorded.started_at_ms,
            tainted: marks.tainted,
            log: None,
            warnings: Vec::new(),
            drift: marks.drift,
        })
    }

    /// Whether the engine is on this machine (a unix socket), so its PIDs are this host's.
    fn is_local(&self) -> bool {
        self.inner.host.starts_with("unix://")
    }

    /// Waits until the engine reports `id` exited (its wait endpoint), up to `wait`, and
    /// returns what it then is.
    async fn wait_exited(&self, id: &InstanceId, wait: Duration) -> Result<Instance, RuntimeError> {
        let docker = self.engine().await?;
        wait_not_running(docker, &Self::container_name(id), wait).await;
        self.inspect(id).await
    }

    /// Refuses a start on a volume a live instance of this home holds, naming both, as the
    /// local runtime's volume lock does.
    async fn check_volumes(&self, spec: &InstanceSpec) -> Result<(), RuntimeError> {
        if spec.volumes.is_empty() {
            return Ok(());
        }
        for (summary, recorded) in self.list_raw().await? {
            use bollard::models::ContainerSummaryStateEnum as S;
            if matches!(
                summary.state,
                Some(S::EXITED) | Some(S::DEAD) | Some(S::REMOVING)
            ) {
                continue;
            }
            let held: Vec<String> = summary
                .mounts
                .unwrap_or_default()
                .into_iter()
                .filter_map(|m| m.name)
                .collect();
            for volume in &spec.volumes {
                if held.contains(&lockdown::volume_name(&self.inner.home_label, &volume.name)) {
                    let holder = recorded
                        .labels
                        .get("instance")
                        .map_or(recorded.id.0.clone(), |name| {
                            format!("{name} ({})", recorded.id)
                        });
                    return Err(RuntimeError::BadVolume {
                        name: volume.name.clone(),
                        reason: format!("in use by {holder}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Starts the event-stream task unless one runs (a finished one, its tokio runtime gone,
    /// is replaced). Outside a tokio runtime nothing is watched: `list` stays the truth.
    fn ensure_watch(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut watch = self.inner.watch.lock().unwrap_or_else(|e| e.into_inner());
        if watch.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let runtime = self.clone();
        *watch = Some(handle.spawn(async move { runtime.watch_events().await }));
    }

    /// Forwards the engine's `die` events of this home's containers as changes, and taints
    /// an instance an exec that is not graven's probe started in (`docker exec`, the
    /// break-glass); reconnects after a failure (a watcher that lagged lists, as with every
    /// backend).
    async fn watch_events(self) {
        loop {
            if let Ok(docker) = self.engine().await {
                let label = format!("{}={}", labels::HOME, self.inner.home_label);
                let mut events = container_events(docker, &["die", "exec_start"], label);
                while let Some(Ok(event)) = events.next().await {
                    let action = event.action.unwrap_or_default();
                    let attributes = event.actor.and_then(|a| a.attributes).unwrap_or_default();
                    let Some(id) = attributes.get(labels::INSTANCE).cloned().map(InstanceId) else {
                        continue;
                    };
                    if action == "die" {
                        let _ = self.inner.changes.send(InstanceChange::Exited { id });
                    } else if action.starts_with("exec_start") {
                        let exec = attributes.get("execID").cloned().unwrap_or_default();
                        if !self.is_probe(&exec) {
                            // The controller sees it on its next listing, as a local
                            // instance's `graven exec`.
                            let _ = marks::taint(&self.inner.home, "docker", &id);
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Follows `id`'s output into the log store unless a task of this process already does.
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
            if let Ok(docker) = runtime.engine().await {
                let name = Self::container_name(&instance.id);
                logs::follow(docker, &name, &runtime.inner.home, &instance).await;
            }
            let mut followed = runtime
                .inner
                .followed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            followed.remove(&instance.id);
        });
    }

    /// Kills the timed-out probe exec `exec` that ran as `pid` on a local engine: through a
    /// pidfd opened first and used only once the engine says the exec still runs as `pid`,
    /// so a PID reused by another process after the exec ended is never signalled.
    async fn kill_exec(&self, docker: &Docker, exec: &str, pid: i64) {
        let Some(raw) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        else {
            return;
        };
        let Ok(pidfd) = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty())
        else {
            // Gone already.
            return;
        };
        match docker.inspect_exec(exec).await {
            Ok(again) if still_runs_as(&again, pid) => {
                let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
            }
            _ => {}
        }
    }

    fn remember_probe(&self, exec: &str) {
        let mut probes = PROBES.lock().unwrap_or_else(|e| e.into_inner());
        let probes = probes.get_or_insert_with(HashMap::new);
        probes.retain(|_, at| at.elapsed() < PROBE_MEMORY);
        probes.insert(exec.to_owned(), std::time::Instant::now());
    }

    /// Whether `exec` was one of this process's probes. Kept until it ages out: every
    /// environment's watch sees the same exec.
    fn is_probe(&self, exec: &str) -> bool {
        let probes = PROBES.lock().unwrap_or_else(|e| e.into_inner());
        probes.as_ref().is_some_and(|p| p.contains_key(exec))
    }

    /// Runs `command` in the running instance `id`, as its user, for at most `timeout`.
    async fn exec(
        &self,
        id: &InstanceId,
        command: &[String],
        timeout: Duration,
    ) -> Result<ProbeOutput, RuntimeError> {
        let instance = self.inspect(id).await?;
        if instance.status != InstanceStatus::Running {
            return Err(RuntimeError::WrongState {
                id: id.clone(),
                status: instance.status,
                action: "probed",
            });
        }
        let docker = self.engine().await?;
        let context = || format!("running a command in instance {id}");
        let exec = docker
            .create_exec(
                &Self::container_name(id),
                ExecConfig {
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(command.to_vec()),
                    ..ExecConfig::default()
                },
            )
            .await
            .map_err(|e| engine_error(context(), e))?;
        // Remembered before it starts, so the watch never takes graven's probe for a
        // break-glass exec.
        self.remember_probe(&exec.id);
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
                    // Only the tail is kept: enough for the last line.
                    if output.len() > 64 * PROBE_LINE_BYTES {
                        output.drain(..output.len() - 8 * PROBE_LINE_BYTES);
                    }
                }
            }
        })
        .await;
        let inspected = docker.inspect_exec(&exec.id).await;
        let timed_out = ran.is_err();
        if timed_out
            && self.is_local()
            && let Ok(first) = &inspected
            && first.running == Some(true)
            && let Some(pid) = first.pid.filter(|&p| p > 0)
        {
            // The engine has no call to end an exec: on a local engine its PID is this
            // host's, and it is killed; a remote engine's is left to end by itself.
            self.kill_exec(docker, &exec.id, pid).await;
        }
        let code = match &inspected {
            Ok(exec) if !timed_out && exec.running != Some(true) => {
                exec.exit_code.map(|c| c as i32)
            }
            _ => None,
        };
        Ok(ProbeOutput {
            code,
            timed_out,
            last_line: probe_last_line(&output),
        })
    }
}

/// Whether the exec `again` (inspected after a pidfd of `pid` was opened) still runs as
/// `pid`: then the pidfd is its process's, since that process ran from before the pidfd was
/// opened until after, and a PID is reused only once its process is gone.
fn still_runs_as(again: &bollard::models::ExecInspectResponse, pid: i64) -> bool {
    again.running == Some(true) && again.pid == Some(pid)
}

/// A container's state as an instance's status. An exit code above 128 is read as the
/// signal that ended the workload (the init's and shells' convention): Docker reports no
/// other way, so a workload that itself exits 143 reads as ended by SIGTERM.
fn status_of(state: &bollard::models::ContainerState) -> InstanceStatus {
    use ContainerStateStatusEnum as S;
    match state.status {
        Some(S::CREATED) | None | Some(S::EMPTY) => InstanceStatus::Created,
        Some(S::RUNNING) | Some(S::PAUSED) | Some(S::RESTARTING) => InstanceStatus::Running,
        Some(S::STOPPING) => InstanceStatus::Stopping,
        Some(S::REMOVING) | Some(S::EXITED) | Some(S::DEAD) => exited(state.exit_code.unwrap_or(0)),
    }
}

fn exited(code: i64) -> InstanceStatus {
    if (129..=128 + 64).contains(&code) {
        InstanceStatus::Exited {
            code: None,
            signal: Some((code - 128) as i32),
        }
    } else {
        InstanceStatus::Exited {
            code: Some(code as i32),
            signal: None,
        }
    }
}

/// A listed container's status, as `status_of` reads an inspected one: the exit code of an
/// exited one from the listing's words (`Exited (137) 2 seconds ago`, the engine's form);
/// `None` when they do not say it.
fn summary_status(summary: &bollard::models::ContainerSummary) -> Option<InstanceStatus> {
    use bollard::models::ContainerSummaryStateEnum as S;
    match summary.state {
        Some(S::CREATED) | None | Some(S::EMPTY) => Some(InstanceStatus::Created),
        Some(S::RUNNING) | Some(S::PAUSED) | Some(S::RESTARTING) => Some(InstanceStatus::Running),
        Some(S::STOPPING) => Some(InstanceStatus::Stopping),
        Some(S::REMOVING) | Some(S::EXITED) | Some(S::DEAD) => {
            let words = summary.status.as_deref()?;
            let code = words.strip_prefix("Exited (")?.split_once(')')?.0;
            code.parse().ok().map(exited)
        }
    }
}

/// Takes `port` on the host's network: refused when something holds it.
fn check_host_port(port: u16) -> Result<(), RuntimeError> {
    std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        .map(drop)
        .map_err(|_| RuntimeError::PortInUse { port })
}

fn free_host_port() -> Result<u16, RuntimeError> {
    std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| RuntimeError::Other {
            context: "choosing a free port".to_owned(),
            source,
        })
}

impl Runtime for DockerRuntime {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn changes(&self) -> broadcast::Receiver<InstanceChange> {
        let receiver = self.inner.changes.subscribe();
        self.ensure_watch();
        receiver
    }

    async fn prepare(&self, image: &Digest) -> Result<(), RuntimeError> {
        let docker = self.engine().await?;
        image::load(docker, &self.inner.store, image).await
    }

    async fn start(&self, spec: InstanceSpec) -> Result<Instance, RuntimeError> {
        spec.validate()?;
        self.prepare(&spec.image).await?;
        let placement = match spec.network {
            NetworkMode::Private => lockdown::Placement {
                network: NetworkMode::Private,
                port: spec.port.unwrap_or(lockdown::DEFAULT_PORT),
            },
            NetworkMode::Host => {
                let port = match spec.host_port {
                    Some(port) => {
                        check_host_port(port)?;
                        port
                    }
                    None => free_host_port()?,
                };
                lockdown::Placement {
                    network: NetworkMode::Host,
                    port,
                }
            }
        };
        let id = InstanceId(format!("{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff));
        let recorded = labels::Recorded {
            id: id.clone(),
            image: spec.image.clone(),
            port: placement.port,
            network: placement.network,
            started_at_ms: super::now_ms(),
            labels: spec.labels.clone(),
        };
        let body = lockdown::container_body(
            &spec,
            &image::reference(&spec.image),
            &id.0,
            placement,
            labels::write(&recorded, &self.inner.home_label),
        )?;
        self.check_volumes(&spec).await?;
        let docker = self.engine().await?;
        let name = Self::container_name(&id);
        docker
            .create_container(
                Some(q::CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| engine_error(format!("creating instance {id}"), e))?;
        if let Err(error) = docker.start_container(&name, None).await {
            // Nothing is left behind: the created container goes.
            let _ = docker
                .remove_container(
                    &name,
                    Some(q::RemoveContainerOptions {
                        force: true,
                        ..Default::default()
                    }),
                )
                .await;
            return Err(RuntimeError::Sandbox {
                id,
                message: error.to_string(),
            });
        }
        let instance = self.inspect(&recorded.id).await?;
        self.follow_logs(&instance);
        Ok(instance)
    }

    async fn inspect(&self, id: &InstanceId) -> Result<Instance, RuntimeError> {
        let (response, recorded) = self.inspect_raw(id).await?;
        Ok(self.instance_of(&response, recorded))
    }

    async fn list(&self) -> Result<Vec<Instance>, RuntimeError> {
        let mut instances = Vec::new();
        for (summary, recorded) in self.list_raw().await? {
            // The listing says all an instance is but an exit code it cannot be read from
            // (the engine's words changed): then the container is inspected.
            let instance = match self.instance_of_summary(&summary, recorded.clone()) {
                Some(instance) => instance,
                None => match self.inspect(&recorded.id).await {
                    Ok(instance) => instance,
                    // Removed between the list and the inspect.
                    Err(RuntimeError::UnknownInstance { .. }) => continue,
                    Err(error) => return Err(error),
                },
            };
            // A restarted graven follows the output of what it finds running.
            self.follow_logs(&instance);
            instances.push(instance);
        }
        instances.sort_by_key(|i| (i.started_at_ms, i.id.clone()));
        Ok(instances)
    }

    async fn stop(&self, id: &InstanceId, grace: Duration) -> Result<Instance, RuntimeError> {
        let instance = self.inspect(id).await?;
        if instance.status.is_exited() {
            return Ok(instance);
        }
        let docker = self.engine().await?;
        stop_container(docker, &Self::container_name(id), grace)
            .await
            .map_err(|e| engine_error(format!("stopping instance {id}"), e))?;
        self.wait_exited(id, KILL_WAIT).await
    }

    async fn kill(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        let instance = self.inspect(id).await?;
        if instance.status.is_exited() {
            return Ok(());
        }
        let docker = self.engine().await?;
        kill_container(docker, &Self::container_name(id))
            .await
            .map_err(|e| engine_error(format!("killing instance {id}"), e))?;
        self.wait_exited(id, KILL_WAIT).await.map(drop)
    }

    async fn remove(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        let instance = self.inspect(id).await?;
        if !instance.status.is_exited() {
            return Err(RuntimeError::WrongState {
                id: id.clone(),
                status: instance.status,
                action: "removed",
            });
        }
        let docker = self.engine().await?;
        // `v: false`: a named volume outlives every instance that used it.
        match docker
            .remove_container(
                &Self::container_name(id),
                Some(q::RemoveContainerOptions {
                    v: false,
                    force: false,
                    link: false,
                }),
            )
            .await
        {
            Ok(()) => {}
            Err(error) if is_not_found(&error) => {}
            Err(error) => return Err(engine_error(format!("removing instance {id}"), error)),
        }
        marks::remove(&self.inner.home, "docker", id);
        Ok(())
    }

    async fn probe(
        &self,
        id: &InstanceId,
        command: &[String],
        timeout: Duration,
    ) -> Result<ProbeOutput, RuntimeError> {
        self.exec(id, command, timeout).await
    }

    async fn check_drift(
        &self,
        ids: &[InstanceId],
        _check: DriftCheck,
    ) -> Result<Vec<(InstanceId, Drift)>, RuntimeError> {
        let docker = self.engine().await?;
        let mut found = Vec::new();
        for id in ids {
            let (response, recorded) = match self.inspect_raw(id).await {
                Ok(raw) => raw,
                Err(RuntimeError::UnknownInstance { .. }) => continue,
                Err(error) => return Err(error),
            };
            let instance = self.instance_of(&response, recorded);
            if instance.status.is_exited() || instance.drift.is_some() {
                continue;
            }
            let changes = match docker.container_changes(&Self::container_name(id)).await {
                Ok(changes) => changes.unwrap_or_default(),
                Err(error) if is_not_found(&error) => continue,
                Err(error) => return Err(engine_error(format!("diffing instance {id}"), error)),
            };
            let tmpfs: Vec<String> = response
                .host_config
                .as_ref()
                .and_then(|h| h.tmpfs.as_ref())
                .map(|t| t.keys().cloned().collect())
                .unwrap_or_default();
            let mounts: Vec<String> = response
                .mounts
                .unwrap_or_default()
                .into_iter()
                .filter_map(|m| m.destination)
                .collect();
            let writable = drift::writable_paths(&tmpfs, &mounts);
            if let Some(first) = drift::findings(&changes, &writable).into_iter().next() {
                marks::record_drift(&self.inner.home, "docker", id, &first)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A probe's line reads the same on every backend: the local runtime trims it, so
    /// Docker's did too little when it kept the whitespace around it.
    /// Two environments of a home on one engine are one runtime: one watch, one follower per
    /// container, one probe memory. Another home or another engine is another runtime.
    #[test]
    fn every_environment_of_a_home_shares_one_runtime_per_engine() {
        let home = tempfile::tempdir().unwrap();
        let engine = "unix:///nowhere/docker.sock";
        let one = DockerRuntime::open(home.path(), engine).unwrap();
        let other_environment = DockerRuntime::open(home.path(), engine).unwrap();
        assert!(Arc::ptr_eq(&one.inner, &other_environment.inner));
        let other_engine = DockerRuntime::open(home.path(), "unix:///elsewhere.sock").unwrap();
        assert!(!Arc::ptr_eq(&one.inner, &other_engine.inner));
        let other = tempfile::tempdir().unwrap();
        let other_home = DockerRuntime::open(other.path(), engine).unwrap();
        assert!(!Arc::ptr_eq(&one.inner, &other_home.inner));
    }

    /// A timed-out probe's PID is killed only while the engine says the exec still runs as
    /// that PID: an exec that ended (its PID free for another process) or one the engine
    /// reports with another PID is left alone.
    #[test]
    fn a_probe_s_pid_is_killed_only_while_its_exec_runs_as_it() {
        let exec = |running: bool, pid: i64| bollard::models::ExecInspectResponse {
            running: Some(running),
            pid: Some(pid),
            ..Default::default()
        };
        assert!(still_runs_as(&exec(true, 42), 42));
        assert!(!still_runs_as(&exec(false, 42), 42));
        assert!(!still_runs_as(&exec(true, 43), 42));
    }

    /// The listing alone says what an instance is: an exited container's code (a signal
    /// above 128) comes from its words, and one whose words say no code is inspected.
    #[test]
    fn a_listed_container_s_status_is_read_from_the_listing() {
        use bollard::models::{ContainerSummary, ContainerSummaryStateEnum as S};
        let listed = |state: S, words: &str| ContainerSummary {
            state: Some(state),
            status: Some(words.to_owned()),
            ..Default::default()
        };
        let check = |state: S, words: &str, expected: Option<InstanceStatus>| {
            assert_eq!(summary_status(&listed(state, words)), expected, "{words}");
        };
        check(S::RUNNING, "Up 3 seconds", Some(InstanceStatus::Running));
        check(S::CREATED, "Created", Some(InstanceStatus::Created));
        check(
            S::EXITED,
            "Exited (137) 2 seconds ago",
            Some(InstanceStatus::Exited {
                code: None,
                signal: Some(9),
            }),
        );
        check(
            S::EXITED,
            "Exited (1) About a minute ago",
            Some(InstanceStatus::Exited {
                code: Some(1),
                signal: None,
            }),
        );
        check(S::DEAD, "Dead", None);
    }

    #[test]
    fn a_probe_s_last_line_is_trimmed_as_the_local_runtime_trims_it() {
        assert_eq!(probe_last_line(b"starting\n  ready \t\r\n \n"), "ready");
        assert_eq!(probe_last_line(b"  status: ok"), "status: ok");
        assert_eq!(probe_last_line(b" \n\t\n"), "");
    }
}
