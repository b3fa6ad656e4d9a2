//! The controller owns reconciliation: one loop over a closed `Input` enum that compares the
//! wanted releases with what runs, and decides launches, drains, stops and rollbacks. Every
//! decision is appended to the event log before it takes effect.
//!
//! `plan` is the pure half (state + observations + time → actions); this file is the shell
//! that appends each action's event, folds it, and carries it out through the runtime and the
//! proxy. Start-up is the same path as any other moment: replay the log, list the runtime,
//! plan. The controller never edits a release and never touches another app's instances.
//!
//! When the log cannot be written (a full disk), the controller decides nothing new: routes
//! keep their snapshot and instances keep running, the snapshot says why, commands are
//! refused, and every tick after a growing back-off it tries again by recording the outage;
//! once that is written it carries on where the log says it was.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::events::{
    CONTROLLER, DeployReason, Envelope, Event, EventLog, EventLogError, GoneReason, InstanceName,
    Lifecycle, ReleaseNumber, RouteKind, RuntimeId, Scale, ServiceConfig, ServiceName, Source,
    State, fold,
};
use crate::proxy::health::{Health, HealthChange, HealthMonitor, ProbeFailure};
use crate::proxy::{AnyRoute, Backend, HealthCheck, HealthKind, RouteOptions};
use crate::runtime::{
    AnyRuntime, Instance, InstanceId, InstanceSpec, Limits, Runtime, RuntimeError, TmpfsMount,
    VolumeMount,
};
use crate::store::Digest;

pub mod chaos;
pub mod follow;
pub mod plan;

pub use chaos::{ChaosRequest, ChaosStarted};
pub use follow::{Follower, Outcome, RolloutWatch};
pub use plan::{Action, Observed, Seen, plan, shutdown_plan};

/// How much longer than two stop graces a shutdown waits for the runtime.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(30);

/// How long a closing route may wait for its connections before they are cut.
const ROUTE_CLOSE_DEADLINE: Duration = Duration::from_secs(30);

/// The most events one history request returns; a reader pages with `after`.
pub const HISTORY_PAGE: usize = 1000;

/// The first and the longest wait before writing to a log that could not be written is
/// tried again: short enough that a freed disk is noticed within seconds, long enough that
/// a full one is not hammered.
const LOG_RETRY_FIRST: Duration = Duration::from_millis(200);
const LOG_RETRY_MAX: Duration = Duration::from_secs(5);

/// The labels every instance carries, so a restarted controller can tell what it is.
pub const LABEL_APP: &str = "app";
pub const LABEL_ENVIRONMENT: &str = "environment";
pub const LABEL_SERVICE: &str = "service";
pub const LABEL_RELEASE: &str = "release";
pub const LABEL_INSTANCE: &str = "instance";

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("unknown service {service:?}")]
    UnknownService { service: ServiceName },
    #[error("service {service} has no release {number}")]
    UnknownRelease {
        service: ServiceName,
        number: ReleaseNumber,
    },
    #[error("service {service} has no earlier release to roll back to")]
    NoPreviousRelease { service: ServiceName },
    #[error("route {route} of service {service} cannot be bound: {reason}")]
    RouteUnavailable {
        service: ServiceName,
        route: SocketAddr,
        reason: String,
    },
    #[error("nothing is deployed in {app}/{environment} yet")]
    NothingDeployed { app: String, environment: String },
    #[error(transparent)]
    Log(#[from] EventLogError),
    #[error(
        "the event log of {app}/{environment} cannot be written ({reason}): nothing new is \
         done until it can; routes serve the last known state"
    )]
    LogUnwritable {
        app: String,
        environment: String,
        reason: String,
    },
    #[error("the controller of {app}/{environment} has stopped")]
    Stopped { app: String, environment: String },
    #[error("no chaos experiment can start: {reason}")]
    ChaosRefused { reason: String },
    #[error(
        "service {service} has [services.{service}.health] events_caught_up = true, but its \
         instances cannot reach the app event log: {reason}"
    )]
    NoEventLog {
        service: ServiceName,
        reason: String,
    },
}

/// What the controller is started with.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    pub app: String,
    pub environment: String,
    /// The event log of this app and environment.
    pub log: PathBuf,
    pub runtime: AnyRuntime,
    /// How often the plan is re-run without any other input (deadlines and back-offs are
    /// decided on time).
    pub tick: Duration,
    /// How often the runtime is listed anyway (the resync); a change the runtime reports
    /// (`Runtime::changes`) lists it at once.
    pub resync: Duration,
    /// The secret store of this app and environment, read when an instance starts; without
    /// one, an instance of a release that pins a secret fails to start.
    pub secrets: Option<crate::secrets::Secrets>,
    /// Where instances reach the app event log; each is given its URL (with the token of
    /// this app and environment) in `$GRAVEN_EVENTS_URL`, as a secret: never recorded.
    pub app_events: Option<crate::app_events::server::AppEvents>,
    /// Graven's DNS server as instances reach it (on the bridge, on the host's network, from
    /// a user-mode network): named first in their resolv.conf, with this app and
    /// environment's search domain.
    pub dns: Option<crate::runtime::InstanceDns>,
}

/// One service of a deploy: what its next release would be. Its config digest is computed
/// here, by the controller, from the config itself: no client says what it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRelease {
    pub service: ServiceName,
    pub image: Digest,
    pub config: ServiceConfig,
}

/// A deploy as the controller is asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployOrder {
    pub services: Vec<ServiceRelease>,
    /// The project directory (and host) the releases were made from.
    #[serde(default)]
    pub source: Option<Source>,
    /// `graven up`'s resume: a service whose inputs are those of the newest release made
    /// from `source` keeps its wanted release (a rollback stays rolled back) instead of
    /// deploying them again.
    #[serde(default)]
    pub resume: bool,
    /// The environment's `[chaos]` (none: no planned failures). Boxed: it is large, and
    /// most deploys carry none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chaos: Option<Box<crate::chaos::ChaosConfig>>,
}

/// What a deploy or rollback command started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// Events after this sequence number tell how the rollout goes.
    pub after_seq: u64,
    pub started: Vec<StartedDeploy>,
    /// Services whose image and config did not change: no new release.
    pub unchanged: Vec<ServiceName>,
    /// Services whose instance count or route changed without a new release.
    #[serde(default)]
    pub scaled: Vec<ScaledService>,
    /// Services `graven up` resumed: the working tree is what `made` was made from, and the
    /// wanted release (which a rollback chose) stays.
    #[serde(default)]
    pub kept: Vec<KeptService>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartedDeploy {
    pub service: ServiceName,
    pub from: Option<ReleaseNumber>,
    pub to: ReleaseNumber,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaledService {
    pub service: ServiceName,
    pub instances: u32,
    pub route: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptService {
    pub service: ServiceName,
    pub wanted: Option<ReleaseNumber>,
    pub made: ReleaseNumber,
}

impl Rollout {
    fn after(seq: u64) -> Rollout {
        Rollout {
            after_seq: seq,
            started: Vec::new(),
            unchanged: Vec::new(),
            scaled: Vec::new(),
            kept: Vec::new(),
        }
    }
}

/// The state as the API shows it: the fold plus where the routes listen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub app: String,
    pub environment: String,
    /// Shared, not copied, by every reader of the same snapshot.
    pub state: Arc<State>,
    pub routes: BTreeMap<ServiceName, SocketAddr>,
    /// Why a route could not be bound, by service.
    pub route_errors: BTreeMap<ServiceName, String>,
    /// Set while the event log cannot be written.
    #[serde(default)]
    pub log_problem: Option<LogProblem>,
    /// The counters of the control plane's syslog forwarders and listener, when `[logs]`
    /// asks for any: the controller does not run them, `graven status` reads them from
    /// where the control plane writes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syslog: Option<crate::logs::syslog::SyslogReport>,
    /// How far instances have read the app event log: the target of the ones an
    /// `events_caught_up` check gates (the controller's), and what each has read (the app
    /// event log server's, filled in by the API).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub event_reads: BTreeMap<InstanceName, EventRead>,
}

/// One instance's reading of the app event log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRead {
    /// The highest sequence it has read, when it has read since the daemon started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<u64>,
    /// Under `events_caught_up`: the last event when it started, which it must read before
    /// it counts as healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<u64>,
}

/// The event log cannot be written: since when (ms since the epoch) and the last error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogProblem {
    pub since_ms: u64,
    pub error: String,
}

type Reply<T> = oneshot::Sender<Result<T, ControllerError>>;

/// Requests from the API.
#[derive(Debug)]
pub enum Command {
    Deploy {
        order: DeployOrder,
        actor: String,
        reply: Reply<Rollout>,
    },
    Rollback {
        service: Option<ServiceName>,
        to: Option<ReleaseNumber>,
        actor: String,
        reply: Reply<Rollout>,
    },
    Down {
        actor: String,
        reply: Reply<Rollout>,
    },
    /// At most `HISTORY_PAGE` events after `after`.
    History {
        after: u64,
        reply: Reply<Vec<Envelope<Event>>>,
    },
    /// One chaos experiment now (`graven chaos run`).
    ChaosRun {
        request: ChaosRequest,
        actor: String,
        reply: Reply<ChaosStarted>,
    },
}

/// Everything the loop reacts to. Effects report back through it, so the loop alone changes
/// state and the log.
#[derive(Debug)]
pub enum Input {
    Tick,
    /// The runtime reported a change (an instance exited): list it now.
    RuntimeChanged,
    Health(HealthChange),
    Started {
        instance: InstanceName,
        result: Result<Instance, RuntimeError>,
        /// Under `events_caught_up`: the app event log's last event, taken before the
        /// instance started (so before it could read).
        events_head: Option<u64>,
    },
    Stopped {
        instance: InstanceName,
        result: Result<(), RuntimeError>,
    },
    Removed {
        runtime_id: RuntimeId,
    },
    /// A stop-first replacement's image is ready (or could not be made so).
    Prepared {
        image: crate::store::Digest,
        result: Result<(), RuntimeError>,
    },
    Command(Command),
    /// Drain and stop every instance, then end the loop.
    Shutdown(oneshot::Sender<()>),
    /// A drift check ended (what it found comes as runtime changes, which list).
    DriftChecked,
}

/// A cheap handle on a running controller.
#[derive(Debug, Clone)]
pub struct ControllerHandle {
    app: String,
    environment: String,
    inputs: mpsc::UnboundedSender<Input>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    /// Every event as it is appended (`Follower`).
    appended: broadcast::Sender<Envelope<Event>>,
    task: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl ControllerHandle {
    pub fn app(&self) -> &str {
        &self.app
    }

    pub fn environment(&self) -> &str {
        &self.environment
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Waits until the snapshot satisfies `condition`.
    pub async fn wait_for(&self, mut condition: impl FnMut(&Snapshot) -> bool) -> Arc<Snapshot> {
        let mut receiver = self.snapshot.clone();
        loop {
            let current = receiver.borrow_and_update().clone();
            if condition(&current) {
                return current;
            }
            if receiver.changed().await.is_err() {
                return self.snapshot();
            }
        }
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ControllerError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || ControllerError::Stopped {
            app: self.app.clone(),
            environment: self.environment.clone(),
        };
        self.inputs
            .send(Input::Command(make(reply)))
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    pub async fn deploy(
        &self,
        order: DeployOrder,
        actor: &str,
    ) -> Result<Rollout, ControllerError> {
        let actor = actor.to_owned();
        self.ask(|reply| Command::Deploy {
            order,
            actor,
            reply,
        })
        .await
    }

    pub async fn rollback(
        &self,
        service: Option<ServiceName>,
        to: Option<ReleaseNumber>,
        actor: &str,
    ) -> Result<Rollout, ControllerError> {
        let actor = actor.to_owned();
        self.ask(|reply| Command::Rollback {
            service,
            to,
            actor,
            reply,
        })
        .await
    }

    pub async fn down(&self, actor: &str) -> Result<Rollout, ControllerError> {
        let actor = actor.to_owned();
        self.ask(|reply| Command::Down { actor, reply }).await
    }

    pub async fn history(&self, after: u64) -> Result<Vec<Envelope<Event>>, ControllerError> {
        self.ask(|reply| Command::History { after, reply }).await
    }

    /// Starts one chaos experiment now.
    pub async fn chaos_run(
        &self,
        request: ChaosRequest,
        actor: &str,
    ) -> Result<ChaosStarted, ControllerError> {
        let actor = actor.to_owned();
        self.ask(|reply| Command::ChaosRun {
            request,
            actor,
            reply,
        })
        .await
    }

    /// Ends the loop at once, as a killed process would: nothing is drained or stopped, and
    /// instances keep running for the next controller to adopt. Returns once it has ended.
    pub async fn abort(&self) {
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// Whether the loop has ended (shut down or aborted).
    pub fn is_finished(&self) -> bool {
        self.task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_none_or(|t| t.is_finished())
    }

    /// Drains and stops every instance, then returns once the loop has ended.
    pub async fn shutdown(&self) {
        let (done, finished) = oneshot::channel();
        if self.inputs.send(Input::Shutdown(done)).is_ok() {
            let _ = finished.await;
        }
    }
}

/// Replays the log and starts the loop on the current tokio runtime.
pub fn spawn(options: ControllerOptions) -> Result<ControllerHandle, ControllerError> {
    let log = EventLog::open(&options.log)?;
    // The newest snapshot and the events after it: start-up stays bounded as the log grows.
    let state = crate::events::snapshot::load(&log)?;
    let snapshot = Arc::new(Snapshot {
        app: options.app.clone(),
        environment: options.environment.clone(),
        state: Arc::new(state.clone()),
        ..Snapshot::default()
    });
    let state_seq = state.seq;
    let (publish, watcher) = watch::channel(snapshot);
    let (inputs, receiver) = mpsc::unbounded_channel();
    let (health_tx, health_rx) = mpsc::unbounded_channel();
    let (appended, _) = broadcast::channel(follow::FOLLOW_BUFFER);
    let mut handle = ControllerHandle {
        app: options.app.clone(),
        environment: options.environment.clone(),
        inputs: inputs.clone(),
        snapshot: watcher,
        appended: appended.clone(),
        task: Arc::default(),
    };
    let shell = Shell {
        options,
        log,
        state,
        publish,
        inputs,
        health_tx,
        routes: BTreeMap::new(),
        route_errors: BTreeMap::new(),
        monitors: BTreeMap::new(),
        busy: BTreeSet::new(),
        busy_ids: BTreeSet::new(),
        prepared: BTreeSet::new(),
        preparing: BTreeMap::new(),
        shutting_down: None,
        since_ms: now_ms(),
        unwritable: None,
        dirty: false,
        snapshot_at: state_seq,
        appended,
        drift_last: None,
        drift_checking: false,
        missing_zones: BTreeSet::new(),
        chaos: chaos::Chaos::default(),
        catch_up: BTreeMap::new(),
        catching_up: BTreeSet::new(),
    };
    handle.task = Arc::new(std::sync::Mutex::new(Some(tokio::spawn(
        shell.run(receiver, health_rx),
    ))));
    Ok(handle)
}

struct RouteEntry {
    route: Arc<AnyRoute>,
    listen: SocketAddr,
    last: Vec<Backend>,
}

struct Shell {
    options: ControllerOptions,
    log: EventLog,
    state: State,
    publish: watch::Sender<Arc<Snapshot>>,
    inputs: mpsc::UnboundedSender<Input>,
    health_tx: mpsc::UnboundedSender<HealthChange>,
    routes: BTreeMap<ServiceName, RouteEntry>,
    route_errors: BTreeMap<ServiceName, String>,
    monitors: BTreeMap<InstanceName, HealthMonitor>,
    busy: BTreeSet<InstanceName>,
    busy_ids: BTreeSet<RuntimeId>,
    /// Images prepared for a stop-first replacement, and those being prepared (with when a
    /// failed one may be tried again).
    prepared: BTreeSet<crate::store::Digest>,
    preparing: BTreeMap<crate::store::Digest, Option<tokio::time::Instant>>,
    /// Set by `Shutdown`: who to tell, and when to give up waiting for stops.
    shutting_down: Option<(oneshot::Sender<()>, tokio::time::Instant)>,
    since_ms: u64,
    /// Set while the log cannot be written.
    unwritable: Option<Unwritable>,
    /// The state changed since the snapshot was last published. The snapshot is published
    /// once per round (and before a command is answered), not once per event: a round that
    /// records many events clones the state once.
    dirty: bool,
    /// The sequence of the last snapshot written (or found at start).
    snapshot_at: u64,
    /// Every appended event goes out here to whoever follows the log.
    appended: broadcast::Sender<Envelope<Event>>,
    /// When the last drift check started, and whether one runs (`check_drift`).
    drift_last: Option<tokio::time::Instant>,
    drift_checking: bool,
    /// Phoenix windows' time zones not found, said once each.
    missing_zones: BTreeSet<String>,
    /// The chaos scheduler's and outage checker's memory (`chaos`).
    chaos: chaos::Chaos,
    /// `events_caught_up`: the app event log's last event as it stood when each gated
    /// instance started (or, for one started before this controller, when it first asked).
    catch_up: BTreeMap<InstanceName, u64>,
    /// Gated instances whose probe passes but who have not read up to their `catch_up` yet:
    /// each round looks again.
    catching_up: BTreeSet<InstanceName>,
}

struct Unwritable {
    problem: LogProblem,
    /// The wait before the next try, doubled by each failed one.
    delay: Duration,
    retry_at: tokio::time::Instant,
}

/// Writes a diagnostic line to stderr. A closed or full stderr must never end the loop (a
/// panic there would leave instances undrained), so a failed write is dropped.
fn warn(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn runtime_id(id: &InstanceId) -> RuntimeId {
    RuntimeId(id.0.clone())
}

/// A runtime's drift finding in the log's own words.
fn condemn_reason(drift: crate::runtime::Drift) -> crate::events::CondemnReason {
    use crate::events::CondemnReason;
    use crate::events::FileChange as Logged;
    use crate::runtime::FileChange;
    match drift {
        crate::runtime::Drift::RootChanged {
            path,
            change,
            expected,
            found,
        } => CondemnReason::RootChanged {
            path,
            change: match change {
                FileChange::Content => Logged::Content,
                FileChange::Mode => Logged::Mode,
                FileChange::Owner => Logged::Owner,
                FileChange::Kind => Logged::Kind,
                FileChange::Link => Logged::Link,
                FileChange::Added => Logged::Added,
                FileChange::Removed => Logged::Removed,
            },
            expected,
            found,
        },
        crate::runtime::Drift::ForeignProgram { pid, exe, cmdline } => {
            CondemnReason::ForeignProgram { pid, exe, cmdline }
        }
    }
}

/// How long the route of a stop-first service holds clients while no instance is ready:
/// its whole switch, the old instance's stop (its grace) and the new one's start until
/// healthy (its deadline), so a client waits out a deploy rather than failing in it. Other
/// services keep the route's default.
fn route_hold(config: &ServiceConfig) -> Option<Duration> {
    let stop_first =
        config.strategy == crate::events::Strategy::Recreate || !config.volumes.is_empty();
    stop_first.then(|| config.stop_grace.saturating_add(config.time_to_healthy()))
}

fn instance_id(id: &RuntimeId) -> InstanceId {
    InstanceId(id.0.clone())
}

/// The proxy's health check for a release's.
fn health_check(config: &ServiceConfig) -> HealthCheck {
    let health = &config.health;
    HealthCheck {
        kind: match health.kind {
            crate::events::HealthKind::Http => HealthKind::Http,
            crate::events::HealthKind::Tcp => HealthKind::Tcp,
            crate::events::HealthKind::Exec => HealthKind::Exec {
                command: health.command.clone(),
            },
            crate::events::HealthKind::None => HealthKind::None,
        },
        path: health.path.clone(),
        interval: health.interval,
        timeout: health.timeout,
        healthy_after: health.healthy_after,
        unhealthy_after: health.unhealthy_after,
        start_period: health.start_period,
    }
}

/// Starts the health monitor of one instance: `http` and `tcp` probes are the proxy's,
/// `exec` and `none` ask the runtime (a command inside the instance; whether its process
/// runs), so the proxy never learns of runtimes.
fn monitor(
    runtime: &AnyRuntime,
    name: &InstanceName,
    id: InstanceId,
    address: SocketAddr,
    check: HealthCheck,
    known: Health,
    changes: mpsc::UnboundedSender<HealthChange>,
) -> HealthMonitor {
    let runtime = runtime.clone();
    match check.kind.clone() {
        HealthKind::Http | HealthKind::Tcp => {
            HealthMonitor::spawn_from(name.to_string(), address, check, known, changes)
        }
        HealthKind::Exec { command } => {
            let timeout = check.timeout;
            let probe = move || {
                let (runtime, id, command) = (runtime.clone(), id.clone(), command.clone());
                async move { exec_probe(&runtime, &id, &command, timeout).await }
            };
            HealthMonitor::spawn_probing(name.to_string(), check, known, changes, probe)
        }
        HealthKind::None => {
            let probe = move || {
                let (runtime, id) = (runtime.clone(), id.clone());
                async move {
                    match runtime.inspect(&id).await {
                        Ok(instance) if !instance.status.is_exited() => Ok("running".to_owned()),
                        Ok(instance) => Err(ProbeFailure::Instance(format!(
                            "not running ({:?})",
                            instance.status
                        ))),
                        Err(error) => Err(ProbeFailure::Instance(error.to_string())),
                    }
                }
            };
            HealthMonitor::spawn_probing(name.to_string(), check, known, changes, probe)
        }
    }
}

/// One exec probe: exit 0 within the timeout passes; the answer is the exit and the last
/// line of output. graven's own failure to run it (no descriptor, no process) is no
/// evidence against the instance.
async fn exec_probe(
    runtime: &AnyRuntime,
    id: &InstanceId,
    command: &[String],
    timeout: Duration,
) -> Result<String, ProbeFailure> {
    match runtime.probe(id, command, timeout).await {
        Ok(output) if output.passed() => Ok(output.to_string()),
        Ok(output) => Err(ProbeFailure::Instance(output.to_string())),
        Err(error @ (RuntimeError::Other { .. } | RuntimeError::Io { .. })) => {
            Err(ProbeFailure::Graven(error.to_string()))
        }
        Err(error) => Err(ProbeFailure::Instance(error.to_string())),
    }
}

impl Shell {
    async fn run(
        mut self,
        mut inputs: mpsc::UnboundedReceiver<Input>,
        mut health: mpsc::UnboundedReceiver<HealthChange>,
    ) {
        self.bind_wanted_routes().await;
        self.sync();
        let mut tick = tokio::time::interval(self.options.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut changes = self.options.runtime.changes();
        // The first tick lists: start-up reconciles with what runs.
        let mut next_resync = tokio::time::Instant::now();
        loop {
            let input = tokio::select! {
                Some(input) = inputs.recv() => input,
                Some(change) = health.recv() => Input::Health(change),
                // A change, or news that some were missed: either way, list.
                changed = changes.recv(), if !changes.is_closed() => match changed {
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => continue,
                    Ok(_) | Err(_) => Input::RuntimeChanged,
                },
                _ = tick.tick() => Input::Tick,
            };
            let listed = match input {
                Input::RuntimeChanged => true,
                Input::Tick => tokio::time::Instant::now() >= next_resync,
                _ => false,
            };
            if listed {
                next_resync = tokio::time::Instant::now() + self.options.resync;
            }
            // While the log cannot be written a round only runs once a try to record the
            // outage succeeds; until then nothing is planned (nothing could be recorded).
            let round = !listed || self.log_writable();
            if round {
                let result = match self.handle(input).await {
                    Ok(()) => self.step(listed).await,
                    Err(error) => Err(error),
                };
                if let Err(error) = result {
                    // Acting without recording would break the promise that every effect
                    // is announced first: nothing more is done, and what serves goes on.
                    self.log_failed(error);
                    self.sync();
                }
            }
            self.publish_if_changed();
            self.snapshot_if_due();
            let done =
                self.state.instances.is_empty() && self.busy.is_empty() && self.busy_ids.is_empty();
            // A shutdown that cannot record its drains leaves the instances running for the
            // next start to adopt, rather than wait out every grace for nothing.
            let stuck = self.unwritable.is_some();
            if let Some((_, give_up)) = &self.shutting_down
                && (done || stuck || tokio::time::Instant::now() >= *give_up)
            {
                if stuck && !done {
                    warn(format_args!(
                        "graven: {}/{}: the event log cannot be written: {} instance(s) left \
                         running for the next start to adopt",
                        self.options.app,
                        self.options.environment,
                        self.state.instances.len()
                    ));
                } else if !done {
                    warn(format_args!(
                        "graven: {}/{}: gave up waiting for {} instance(s) to stop",
                        self.options.app,
                        self.options.environment,
                        self.state.instances.len()
                    ));
                }
                self.stop_routes().await;
                if let Some((reply, _)) = self.shutting_down.take() {
                    let _ = reply.send(());
                }
                return;
            }
        }
    }

    async fn stop_routes(&mut self) {
        self.monitors.clear();
        let closing: Vec<_> = std::mem::take(&mut self.routes)
            .into_values()
            .map(|entry| tokio::spawn(shutdown_route(entry.route)))
            .collect();
        for closed in closing {
            let _ = closed.await;
        }
    }

    /// Whether the log is writable: true unless it failed, and then only once the outage has
    /// been recorded (tried at most once per back-off delay).
    fn log_writable(&mut self) -> bool {
        let Some(unwritable) = &self.unwritable else {
            return true;
        };
        if tokio::time::Instant::now() < unwritable.retry_at {
            return false;
        }
        self.try_resume()
    }

    /// Tries to record the outage now, whatever the back-off says.
    fn try_resume(&mut self) -> bool {
        let Some(unwritable) = &self.unwritable else {
            return true;
        };
        let event = Event::LogUnwritable {
            since_ms: unwritable.problem.since_ms,
            error: unwritable.problem.error.clone(),
        };
        match self.record(event) {
            Ok(_) => {
                self.unwritable = None;
                warn(format_args!(
                    "graven: {}/{}: the event log can be written again; carrying on",
                    self.options.app, self.options.environment
                ));
                self.publish_snapshot();
                true
            }
            Err(error) => {
                self.log_failed(error);
                if let Some(unwritable) = &mut self.unwritable {
                    unwritable.delay = (unwritable.delay * 2).min(LOG_RETRY_MAX);
                    unwritable.retry_at = tokio::time::Instant::now() + unwritable.delay;
                }
                false
            }
        }
    }

    /// Notes that the log could not be written: said once on stderr, shown in the snapshot.
    fn log_failed(&mut self, error: ControllerError) {
        let error = match error {
            ControllerError::Log(error) => error.to_string(),
            other => other.to_string(),
        };
        match &mut self.unwritable {
            Some(unwritable) => unwritable.problem.error = error,
            None => {
                warn(format_args!(
                    "graven: {}/{}: the event log cannot be written ({error}): routes serve \
                     the last known state and nothing new is done until it can; retrying",
                    self.options.app, self.options.environment
                ));
                self.unwritable = Some(Unwritable {
                    problem: LogProblem {
                        since_ms: now_ms(),
                        error,
                    },
                    delay: LOG_RETRY_FIRST,
                    retry_at: tokio::time::Instant::now() + LOG_RETRY_FIRST,
                });
            }
        }
        self.publish_snapshot();
    }

    /// Appends the controller's own decision and folds it in.
    fn record(&mut self, event: Event) -> Result<Envelope<Event>, ControllerError> {
        self.record_as(CONTROLLER, event)
    }

    /// Appends an event on behalf of `actor` (a command's user) and folds it in; the round
    /// publishes the new state.
    fn record_as(&mut self, actor: &str, event: Event) -> Result<Envelope<Event>, ControllerError> {
        let envelope = self.log.append(actor, now_ms(), &event)?;
        self.state = fold(std::mem::take(&mut self.state), &envelope);
        self.dirty = true;
        // Nobody following is fine; a slow follower catches up from the log.
        let _ = self.appended.send(envelope.clone());
        Ok(envelope)
    }

    /// Stores a snapshot of the state every `SNAPSHOT_EVERY` events, so the next start folds
    /// at most that many. A failure is only said: the log itself is whole, and the next
    /// start folds more.
    fn snapshot_if_due(&mut self) {
        use crate::events::snapshot::{SNAPSHOT_EVERY, save};
        if self.state.seq < self.snapshot_at + SNAPSHOT_EVERY || self.unwritable.is_some() {
            return;
        }
        self.snapshot_at = self.state.seq;
        if let Err(error) = save(&self.log, &self.state) {
            warn(format_args!(
                "graven: {}/{}: storing a snapshot of the state: {error}",
                self.options.app, self.options.environment
            ));
        }
    }

    fn publish_if_changed(&mut self) {
        if self.dirty {
            self.publish_snapshot();
        }
    }

    fn publish_snapshot(&mut self) {
        self.dirty = false;
        let snapshot = Snapshot {
            app: self.options.app.clone(),
            environment: self.options.environment.clone(),
            state: Arc::new(self.state.clone()),
            routes: self
                .routes
                .iter()
                .map(|(service, entry)| (service.clone(), entry.route.local_addr()))
                .collect(),
            route_errors: self.route_errors.clone(),
            log_problem: self.unwritable.as_ref().map(|u| u.problem.clone()),
            syslog: None,
            event_reads: self
                .catch_up
                .iter()
                .map(|(instance, target)| {
                    (
                        instance.clone(),
                        EventRead {
                            read: None,
                            target: Some(*target),
                        },
                    )
                })
                .collect(),
        };
        self.publish.send_replace(Arc::new(snapshot));
    }

    async fn handle(&mut self, input: Input) -> Result<(), ControllerError> {
        match input {
            Input::Tick | Input::RuntimeChanged => self.check_caught_up().await?,
            Input::DriftChecked => self.drift_checking = false,
            Input::Health(change) => self.health_changed(change).await?,
            Input::Started {
                instance,
                result,
                events_head,
            } => {
                self.busy.remove(&instance);
                if let Some(head) = events_head
                    && result.is_ok()
                {
                    self.catch_up.insert(instance.clone(), head);
                    self.dirty = true;
                }
                match result {
                    Ok(started) => match started.address {
                        Some(address) => {
                            self.record(Event::InstanceStarted {
                                instance,
                                runtime_id: runtime_id(&started.id),
                                address,
                            })?;
                        }
                        None => {
                            self.record(Event::InstanceGone {
                                instance,
                                reason: GoneReason::StartFailed {
                                    error: "the runtime gave it no address".to_owned(),
                                },
                            })?;
                            self.remove_runtime_instance(runtime_id(&started.id), Duration::ZERO);
                        }
                    },
                    Err(error) => {
                        self.record(Event::InstanceGone {
                            instance,
                            reason: GoneReason::StartFailed {
                                error: error.to_string(),
                            },
                        })?;
                    }
                }
            }
            Input::Stopped { instance, result } => {
                self.busy.remove(&instance);
                match result {
                    Ok(()) | Err(RuntimeError::UnknownInstance { .. }) => {
                        self.record(Event::InstanceGone {
                            instance,
                            reason: GoneReason::Stopped,
                        })?;
                    }
                    // The next listing finds it still draining and tries again.
                    Err(error) => warn(format_args!("graven: stopping {instance}: {error}")),
                }
            }
            Input::Removed { runtime_id } => {
                self.busy_ids.remove(&runtime_id);
            }
            Input::Prepared { image, result } => match result {
                Ok(()) => {
                    self.preparing.remove(&image);
                    self.prepared.insert(image);
                }
                Err(error) => {
                    // The old instance keeps serving; the deploy's deadline rolls it back if
                    // the image never gets ready.
                    warn(format_args!("graven: preparing image {image}: {error}"));
                    let retry = tokio::time::Instant::now() + Duration::from_secs(2);
                    self.preparing.insert(image, Some(retry));
                }
            },
            Input::Command(command) => self.command(command).await?,
            Input::Shutdown(done) => {
                // A log that can be written again records the drains; one that cannot ends
                // the shutdown at once (see `run`).
                self.try_resume();
                // Every drain and stop is bounded by its grace; this bounds a runtime that
                // does not answer.
                let longest = self
                    .state
                    .releases
                    .values()
                    .map(|r| r.config.stop_grace)
                    .max()
                    .unwrap_or_default();
                let give_up = tokio::time::Instant::now() + longest * 2 + SHUTDOWN_SLACK;
                self.shutting_down = Some((done, give_up));
            }
        }
        Ok(())
    }

    async fn health_changed(&mut self, change: HealthChange) -> Result<(), ControllerError> {
        let name = InstanceName(change.instance);
        let Some(instance) = self.state.instances.get(&name) else {
            return Ok(());
        };
        if change.health != Health::Healthy {
            self.catching_up.remove(&name);
        }
        let lifecycle = instance.lifecycle;
        let gated = self
            .state
            .releases
            .get(&instance.release)
            .is_some_and(|r| r.config.health.events_caught_up);
        if gated
            && change.health == Health::Healthy
            && matches!(lifecycle, Lifecycle::Starting | Lifecycle::Unhealthy)
            && !self.caught_up(&name).await
        {
            // The probe passes, the reading does not yet: each round looks again.
            self.catching_up.insert(name);
            return Ok(());
        }
        let event = match (lifecycle, change.health) {
            (Lifecycle::Draining, _) | (_, Health::Unknown) => return Ok(()),
            (Lifecycle::Healthy, Health::Healthy) | (Lifecycle::Unhealthy, Health::Unhealthy) => {
                return Ok(());
            }
            (Lifecycle::Starting | Lifecycle::Unhealthy, Health::Healthy) => {
                Event::InstanceHealthy {
                    instance: name.clone(),
                }
            }
            (Lifecycle::Starting | Lifecycle::Healthy, Health::Unhealthy) => {
                Event::InstanceUnhealthy {
                    instance: name.clone(),
                    detail: change.detail,
                }
            }
        };
        if let Err(error) = self.record(event) {
            // The monitor reported this flip once; started again from what the log knows,
            // it reports it again once the log can be written.
            self.monitors.remove(&name);
            return Err(error);
        }
        Ok(())
    }

    /// Whether `instance` has read the app event log up to its target (taken now when it has
    /// none: an instance this controller did not start).
    async fn caught_up(&mut self, instance: &InstanceName) -> bool {
        let Some(events) = &self.options.app_events else {
            return false;
        };
        let (app, environment) = (&self.options.app, &self.options.environment);
        let target = match self.catch_up.get(instance) {
            Some(target) => *target,
            None => match events.server.clone().head(app, environment).await {
                Ok(head) => {
                    self.catch_up.insert(instance.clone(), head);
                    self.dirty = true;
                    head
                }
                Err(_) => return false,
            },
        };
        target == 0
            || events
                .server
                .read_by(app, environment, instance.as_str())
                .is_some_and(|read| read >= target)
    }

    /// Records as healthy the gated instances that have caught up since their probe passed,
    /// and forgets the targets and read positions of instances that are gone.
    async fn check_caught_up(&mut self) -> Result<(), ControllerError> {
        let waiting: Vec<InstanceName> = self.catching_up.iter().cloned().collect();
        for name in waiting {
            let still =
                self.state.instances.get(&name).is_some_and(|i| {
                    matches!(i.lifecycle, Lifecycle::Starting | Lifecycle::Unhealthy)
                });
            if !still {
                self.catching_up.remove(&name);
                continue;
            }
            if self.caught_up(&name).await {
                self.catching_up.remove(&name);
                self.record(Event::InstanceHealthy {
                    instance: name.clone(),
                })?;
            }
        }
        let before = self.catch_up.len();
        let instances = &self.state.instances;
        self.catch_up.retain(|name, _| instances.contains_key(name));
        self.dirty |= self.catch_up.len() != before;
        if let Some(events) = &self.options.app_events {
            let live: Vec<&str> = instances.keys().map(InstanceName::as_str).collect();
            events
                .server
                .forget_readers_but(&self.options.app, &self.options.environment, &live);
        }
        Ok(())
    }

    async fn command(&mut self, command: Command) -> Result<(), ControllerError> {
        // A command that would change anything waits for the log: nothing it starts (a
        // route bound, a release made) may go unrecorded.
        let changes = !matches!(command, Command::History { .. });
        if changes && !self.try_resume() {
            let reason = self
                .unwritable
                .as_ref()
                .map(|u| u.problem.error.clone())
                .unwrap_or_default();
            let refused = ControllerError::LogUnwritable {
                app: self.options.app.clone(),
                environment: self.options.environment.clone(),
                reason,
            };
            match command {
                Command::Deploy { reply, .. }
                | Command::Rollback { reply, .. }
                | Command::Down { reply, .. } => {
                    let _ = reply.send(Err(refused));
                }
                Command::ChaosRun { reply, .. } => {
                    let _ = reply.send(Err(refused));
                }
                Command::History { .. } => {}
            }
            return Ok(());
        }
        match command {
            Command::Deploy {
                order,
                actor,
                reply,
            } => {
                let result = self.deploy(order, &actor).await;
                self.answer(reply, result)
            }
            Command::Rollback {
                service,
                to,
                actor,
                reply,
            } => {
                let result = self.rollback(service, to, &actor);
                self.answer(reply, result)
            }
            Command::Down { actor, reply } => {
                let mut result = Ok(Rollout::after(self.state.seq));
                let services: Vec<ServiceName> = self.state.wanted_services().cloned().collect();
                for service in services {
                    if let Err(error) = self.record_as(&actor, Event::ServiceRemoved { service }) {
                        result = Err(error);
                        break;
                    }
                }
                self.answer(reply, result)
            }
            Command::History { after, reply } => {
                let result = self
                    .log
                    .read_page(after, HISTORY_PAGE)
                    .map_err(ControllerError::from);
                self.answer(reply, result)
            }
            Command::ChaosRun {
                request,
                actor,
                reply,
            } => {
                let result = self.chaos_run(request, &actor);
                self.answer(reply, result)
            }
        }
    }

    /// Sends the command's answer, with the snapshot published first so a caller that asks
    /// for the status next sees what the command did. A failed log write is told to the
    /// caller, and goes up to the loop, which stops deciding until the log can be written.
    fn answer<T>(
        &mut self,
        reply: Reply<T>,
        result: Result<T, ControllerError>,
    ) -> Result<(), ControllerError> {
        self.publish_if_changed();
        match result {
            Err(ControllerError::Log(error)) => {
                let _ = reply.send(Err(ControllerError::LogUnwritable {
                    app: self.options.app.clone(),
                    environment: self.options.environment.clone(),
                    reason: error.to_string(),
                }));
                Err(ControllerError::Log(error))
            }
            other => {
                let _ = reply.send(other);
                Ok(())
            }
        }
    }

    async fn deploy(
        &mut self,
        order: DeployOrder,
        actor: &str,
    ) -> Result<Rollout, ControllerError> {
        // Everything that can refuse the deploy is checked before anything is recorded, so a
        // refused deploy leaves the running release untouched.
        for release in &order.services {
            if release.config.health.events_caught_up {
                self.check_event_log_reach(&release.service, &release.config)?;
            }
        }
        for release in &order.services {
            if let Some(listen) = release.config.route {
                let hold = route_hold(&release.config);
                let (kind, threads) = (release.config.route_kind, release.config.route_threads);
                self.ensure_route(&release.service, listen, kind, threads, hold)
                    .await?;
            }
        }
        let mut rollout = Rollout::after(self.state.seq);
        let wanted: BTreeSet<&ServiceName> = order.services.iter().map(|s| &s.service).collect();
        let removed: Vec<ServiceName> = self
            .state
            .wanted_services()
            .filter(|name| !wanted.contains(name))
            .cloned()
            .collect();
        for service in removed {
            self.record_as(actor, Event::ServiceRemoved { service })?;
        }
        if order.chaos.as_deref() != self.state.chaos.config.as_ref() {
            self.record_as(
                actor,
                Event::ChaosConfigured {
                    config: order.chaos.as_deref().cloned(),
                },
            )?;
        }
        for release in order.services {
            let digest = release.config.digest().to_string();
            let same =
                |r: &crate::events::Release| r.image == release.image && r.config_digest == digest;
            let service_state = self.state.services.get(&release.service);
            let current = self.state.wanted_release(&release.service);
            if current.is_some_and(same) {
                let scale = Scale {
                    instances: release.config.instances,
                    route: release.config.route,
                };
                if self.state.scale(&release.service) != Some(scale) {
                    self.record_as(
                        actor,
                        Event::ServiceScaled {
                            service: release.service.clone(),
                            instances: scale.instances,
                            route: scale.route,
                        },
                    )?;
                    rollout.scaled.push(ScaledService {
                        service: release.service,
                        instances: scale.instances,
                        route: scale.route,
                    });
                } else {
                    rollout.unchanged.push(release.service);
                }
                continue;
            }
            // `up` on a project that has releases: when the working tree is what the newest
            // release made from this directory was made from, the log's wanted release stays
            // (a rollback is never undone by starting again).
            let made_here = order.source.as_ref().and_then(|source| {
                self.state
                    .releases_of(&release.service)
                    .rfind(|r| r.source.as_ref() == Some(source))
            });
            if order.resume
                && service_state.is_some_and(|s| s.wanted.is_some())
                && let Some(made) = made_here.filter(|r| same(r))
            {
                rollout.kept.push(KeptService {
                    service: release.service.clone(),
                    wanted: service_state.and_then(|s| s.wanted),
                    made: made.number,
                });
                continue;
            }
            // A deploy that replaces one still rolling out falls back to what was serving
            // before it, never to a release that was not yet proven.
            let from = service_state.and_then(|s| match &s.deploy {
                Some(deploy) => deploy.from,
                None => s.wanted,
            });
            let number = self.state.next_release();
            self.record_as(
                actor,
                Event::ReleaseCreated {
                    service: release.service.clone(),
                    release: number,
                    image: release.image,
                    config_digest: digest,
                    config: release.config,
                    source: order.source.clone(),
                },
            )?;
            self.record_as(
                actor,
                Event::DeployStarted {
                    service: release.service.clone(),
                    from,
                    to: number,
                    reason: DeployReason::Deploy,
                },
            )?;
            rollout.started.push(StartedDeploy {
                service: release.service,
                from,
                to: number,
            });
        }
        Ok(rollout)
    }

    fn rollback(
        &mut self,
        service: Option<ServiceName>,
        to: Option<ReleaseNumber>,
        actor: &str,
    ) -> Result<Rollout, ControllerError> {
        let services: Vec<ServiceName> = match service {
            Some(service) => {
                if !self.state.services.contains_key(&service) {
                    return Err(ControllerError::UnknownService { service });
                }
                vec![service]
            }
            None => self.state.wanted_services().cloned().collect(),
        };
        if services.is_empty() {
            return Err(ControllerError::NothingDeployed {
                app: self.options.app.clone(),
                environment: self.options.environment.clone(),
            });
        }
        let mut targets = Vec::new();
        for service in &services {
            let current = self.state.services.get(service).and_then(|s| s.wanted);
            let target = match to {
                Some(number) => match self.state.releases.get(&number) {
                    Some(release) if release.service == *service => number,
                    _ => {
                        return Err(ControllerError::UnknownRelease {
                            service: service.clone(),
                            number,
                        });
                    }
                },
                None => previous_release(&self.state, service, current).ok_or_else(|| {
                    ControllerError::NoPreviousRelease {
                        service: service.clone(),
                    }
                })?,
            };
            targets.push((service.clone(), current, target));
        }
        let mut rollout = Rollout::after(self.state.seq);
        for (service, from, to) in targets {
            if from == Some(to) {
                rollout.unchanged.push(service);
                continue;
            }
            self.record_as(
                actor,
                Event::DeployStarted {
                    service: service.clone(),
                    from,
                    to,
                    reason: DeployReason::Rollback,
                },
            )?;
            rollout.started.push(StartedDeploy { service, from, to });
        }
        Ok(rollout)
    }

    /// Binds the service's route at `listen`, speaking `kind` on `threads` (None: one per
    /// core), unless it is bound so already; while no instance is ready it holds clients at
    /// least `hold` when given.
    async fn ensure_route(
        &mut self,
        service: &ServiceName,
        listen: SocketAddr,
        kind: RouteKind,
        threads: Option<u32>,
        hold: Option<Duration>,
    ) -> Result<(), ControllerError> {
        let tcp = kind == RouteKind::Tcp;
        let threads =
            threads.map_or_else(crate::proxy::default_threads, |threads| threads as usize);
        let mut options = RouteOptions {
            threads,
            ..RouteOptions::new(listen)
        };
        if let Some(hold) = hold {
            options.hold_timeout = options.hold_timeout.max(hold);
        }
        let existing = self.routes.get(service);
        let same_socket =
            existing.filter(|entry| entry.listen == listen && entry.route.is_tcp() == tcp);
        if same_socket.is_some_and(|entry| entry.route.threads() == threads) {
            return Ok(());
        }
        // Only the thread count changed: the new route takes the listening socket over and
        // the old one retires once its connections are done, so none is refused or lost.
        if let Some(entry) = same_socket {
            let route = AnyRoute::take_over(options, tcp, &entry.route)
                .await
                .map_err(|error| ControllerError::RouteUnavailable {
                    service: service.clone(),
                    route: listen,
                    reason: error.to_string(),
                })?;
            let entry = RouteEntry {
                route: Arc::new(route),
                listen,
                last: Vec::new(),
            };
            if let Some(old) = self.routes.insert(service.clone(), entry) {
                tokio::spawn(retire_route(old.route));
            }
            self.route_errors.remove(service);
            self.dirty = true;
            self.sync();
            return Ok(());
        }
        // Another kind on the same address: the old listener must close before the new one
        // can bind (dropping a route frees its address before the drop returns). Should the
        // new one fail, the old kind is bound again, so a refused deploy keeps its route.
        let mut previous_kind = None;
        if existing.is_some_and(|entry| entry.listen == listen)
            && let Some(old) = self.routes.remove(service)
        {
            previous_kind = Some(old.route.is_tcp());
            drop(old);
        }
        let bound = AnyRoute::bind(options, tcp).await;
        let route = match (bound, previous_kind) {
            (Ok(route), _) => route,
            (Err(error), previous) => {
                if let Some(was_tcp) = previous
                    && let Ok(old) = AnyRoute::bind(RouteOptions::new(listen), was_tcp).await
                {
                    self.routes.insert(
                        service.clone(),
                        RouteEntry {
                            route: Arc::new(old),
                            listen,
                            last: Vec::new(),
                        },
                    );
                    self.sync();
                }
                return Err(ControllerError::RouteUnavailable {
                    service: service.clone(),
                    route: listen,
                    reason: error.to_string(),
                });
            }
        };
        if let Some(old) = self.routes.insert(
            service.clone(),
            RouteEntry {
                route: Arc::new(route),
                listen,
                last: Vec::new(),
            },
        ) {
            tokio::spawn(shutdown_route(old.route));
        }
        self.route_errors.remove(service);
        // The snapshot says where routes listen.
        self.dirty = true;
        self.sync();
        Ok(())
    }

    async fn bind_wanted_routes(&mut self) {
        type Wanted = (
            ServiceName,
            SocketAddr,
            RouteKind,
            Option<u32>,
            Option<Duration>,
        );
        let wanted: Vec<Wanted> = self
            .state
            .services
            .keys()
            .filter_map(|service| {
                let route = self.state.scale(service)?.route?;
                let release = self.state.wanted_release(service);
                let (kind, threads) = release.map_or((RouteKind::Http, None), |release| {
                    (release.config.route_kind, release.config.route_threads)
                });
                let hold = release.and_then(|release| route_hold(&release.config));
                Some((service.clone(), route, kind, threads, hold))
            })
            .collect();
        for (service, listen, kind, threads, hold) in wanted {
            if let Err(error) = self
                .ensure_route(&service, listen, kind, threads, hold)
                .await
            {
                self.route_errors.insert(service, error.to_string());
                self.dirty = true;
            }
        }
    }

    /// Starts a drift check of this controller's running instances when one is due (the
    /// shortest drift interval of the wanted releases after the last one started) and none
    /// runs. It runs off the loop;
    /// what it finds, the runtime records on the instances and reports as changes.
    fn check_drift(&mut self) {
        if self.drift_checking || self.shutting_down.is_some() {
            return;
        }
        // The interval of the releases wanted now, from the last check: a deploy that
        // shortens it takes effect at once.
        let interval = self
            .state
            .services
            .values()
            .filter_map(|s| self.state.releases.get(&s.wanted?))
            .map(|r| r.config.drift.interval())
            .min()
            .unwrap_or(crate::events::DriftConfig::DEFAULT_INTERVAL);
        let now = tokio::time::Instant::now();
        if self.drift_last.is_some_and(|last| now < last + interval) {
            return;
        }
        let ids: Vec<InstanceId> = self
            .state
            .instances
            .values()
            .filter(|i| i.condemned.is_none())
            .filter_map(|i| i.runtime_id.as_ref().map(instance_id))
            .collect();
        if ids.is_empty() {
            return;
        }
        self.drift_last = Some(now);
        self.drift_checking = true;
        let runtime = self.options.runtime.clone();
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            let check = crate::runtime::DriftCheck::default();
            if let Err(error) = runtime.check_drift(&ids, check).await {
                warn(format_args!("graven: checking for drift: {error}"));
            }
            let _ = inputs.send(Input::DriftChecked);
        });
    }

    /// The time zones the wanted releases' phoenix windows name, from the system's database
    /// (jiff caches what it read); one it cannot find is left out, and said once.
    fn phoenix_zones(&mut self) -> BTreeMap<String, jiff::tz::TimeZone> {
        let mut zones = BTreeMap::new();
        let names: BTreeSet<String> = self
            .state
            .services
            .values()
            .filter_map(|s| self.state.releases.get(&s.wanted?))
            .filter_map(|r| r.config.phoenix.as_ref()?.window.as_ref()?.zone.clone())
            .collect();
        for name in names {
            match jiff::tz::TimeZone::get(&name) {
                Ok(zone) => {
                    zones.insert(name, zone);
                }
                Err(error) => {
                    if self.missing_zones.insert(name.clone()) {
                        warn(format_args!(
                            "graven: time zone {name:?} of a phoenix window: {error}; \
                             no recycles until it is found"
                        ));
                    }
                }
            }
        }
        zones
    }

    /// Plans and carries out one round of decisions.
    async fn step(&mut self, listed: bool) -> Result<(), ControllerError> {
        self.check_drift();
        let mut observed = Observed {
            listed: false,
            runtime: Vec::new(),
            busy: self.busy.clone(),
            busy_ids: self.busy_ids.clone(),
            prepared: self.prepared.clone(),
            since_ms: self.since_ms,
            name_suffix: format!(".{}.{}", self.options.environment, self.options.app),
            zones: self.phoenix_zones(),
        };
        if listed {
            match self.options.runtime.list().await {
                Ok(instances) => {
                    observed.listed = true;
                    observed.runtime = instances
                        .into_iter()
                        .filter(|i| self.owns(i))
                        .map(|i| Seen {
                            name: i
                                .labels
                                .get(LABEL_INSTANCE)
                                .map(|n| InstanceName(n.clone())),
                            exited: match i.status {
                                crate::runtime::InstanceStatus::Exited { code, signal } => {
                                    Some((code, signal))
                                }
                                crate::runtime::InstanceStatus::Created
                                | crate::runtime::InstanceStatus::Running
                                | crate::runtime::InstanceStatus::Stopping => None,
                            },
                            address: i.address,
                            tainted: i.tainted,
                            drift: i.drift.map(condemn_reason),
                            id: runtime_id(&i.id),
                        })
                        .collect();
                }
                Err(error) => warn(format_args!("graven: listing the runtime: {error}")),
            }
        }
        let actions = match self.shutting_down {
            Some(_) => shutdown_plan(&self.state, &observed),
            None => plan(&self.state, &observed, now_ms()),
        };
        for action in actions {
            self.act(action)?;
        }
        self.sync();
        self.close_gone_routes();
        self.chaos_round()?;
        Ok(())
    }

    fn owns(&self, instance: &Instance) -> bool {
        instance.labels.get(LABEL_APP) == Some(&self.options.app)
            && instance.labels.get(LABEL_ENVIRONMENT) == Some(&self.options.environment)
    }

    /// Records the action's event, then starts its effect.
    fn act(&mut self, action: Action) -> Result<(), ControllerError> {
        // What the runtime knew a forgotten instance as, read before the event folds it away.
        let forgotten = match &action {
            Action::Forget { instance, .. } => self
                .state
                .instances
                .get(instance)
                .and_then(|i| i.runtime_id.clone()),
            _ => None,
        };
        if let Some(event) = action.event() {
            self.record(event)?;
        }
        // Missing from the listing is not proof that nothing runs: an instance whose
        // directory was deleted is unlisted but alive, and the runtime's stop finds it.
        if let Some(runtime_id) = forgotten {
            self.remove_runtime_instance(runtime_id, Duration::ZERO);
        }
        match action {
            Action::Launch {
                service,
                release,
                instance,
            } => self.launch(service, release, instance),
            Action::Exited { runtime_id, .. } => {
                self.remove_runtime_instance(runtime_id, Duration::ZERO)
            }
            Action::Route { .. } => {
                // Routes must follow the decision before any drain of this round waits.
                self.sync();
            }
            Action::Drain { instance, .. } | Action::ResumeStop { instance } => {
                self.sync();
                self.stop_instance(instance);
            }
            Action::RemoveOrphan { runtime_id } => {
                self.remove_runtime_instance(runtime_id, Duration::from_secs(2))
            }
            Action::Prepare { release, .. } => self.prepare(release),
            Action::Adopt { .. }
            | Action::Forget { .. }
            | Action::Condemn { .. }
            | Action::Backoff { .. }
            | Action::Succeed { .. }
            | Action::RollBack { .. } => {}
        }
        Ok(())
    }

    fn launch(&mut self, service: ServiceName, release: ReleaseNumber, instance: InstanceName) {
        let Some(config) = self.state.releases.get(&release) else {
            return;
        };
        let mut spec = InstanceSpec::new(config.image.clone());
        let c = &config.config;
        spec.command = c.command.clone();
        spec.entrypoint = c.entrypoint.clone();
        spec.user = c.user.clone();
        spec.tmpfs = c
            .tmpfs
            .iter()
            .map(|(path, &bytes)| TmpfsMount {
                path: path.clone(),
                bytes,
            })
            .collect();
        spec.env = c.env.clone();
        // 0 is a service with no port (a worker).
        spec.port = Some(c.port).filter(|&port| port != 0);
        if c.host_network {
            spec.network = crate::runtime::NetworkMode::Host;
        }
        spec.outbound = c.outbound;
        spec.exec_tmp = c.drift.exec_tmp;
        spec.allow_exec = c.drift.allow_exec.clone();
        spec.dns = self.options.dns.clone().map(|mut dns| {
            // What a rootless instance's loopback forwards to the host's: the routes its
            // names answer with, as they are now (a route added later is not forwarded to
            // instances already running).
            dns.routes = self
                .state
                .services
                .keys()
                .filter_map(|service| self.state.scale(service)?.route)
                .filter(|route| route.ip().is_loopback() || route.ip().is_unspecified())
                .map(|route| route.port())
                .collect();
            dns
        });
        spec.volumes = c
            .volumes
            .iter()
            .map(|v| VolumeMount {
                name: v.name.clone(),
                path: v.path.clone(),
            })
            .collect();
        spec.limits = Limits {
            memory_bytes: c.limits.memory_bytes,
            pids: c.limits.pids,
            cpu_millis: c.limits.cpu_millis,
            tmp_bytes: c.limits.tmp_bytes,
            log_bytes: c.limits.log_bytes,
            log_age_s: c.limits.log_age_s,
        };
        spec.stop_grace = c.stop_grace;
        spec.labels = BTreeMap::from([
            (LABEL_APP.to_owned(), self.options.app.clone()),
            (
                LABEL_ENVIRONMENT.to_owned(),
                self.options.environment.clone(),
            ),
            (LABEL_SERVICE.to_owned(), service.to_string()),
            (LABEL_RELEASE.to_owned(), release.to_string()),
            (LABEL_INSTANCE.to_owned(), instance.to_string()),
            // The local runtime keeps the logs of a bounded number of removed instances
            // per group: per service, so one churning service cannot push out another's.
            (
                crate::runtime::local::retention::LOG_GROUP.to_owned(),
                format!(
                    "{}/{}/{service}",
                    self.options.app, self.options.environment
                ),
            ),
        ]);
        let secrets = (config.config.secrets.clone(), self.options.secrets.clone());
        let events_url = self.options.app_events.as_ref().and_then(|events| {
            let dir = self.options.log.parent()?;
            let token = crate::app_events::server::token(dir).ok()?;
            // A token of the instance's own: the log knows who reads how far.
            let token = crate::app_events::server::instance_token(
                &token,
                &self.options.app,
                &self.options.environment,
                instance.as_str(),
            );
            Some(events.endpoint.url_for(
                c.host_network,
                &self.options.app,
                &self.options.environment,
                &token,
            ))
        });
        // `events_caught_up`: the log's end as it stands before the instance can read, taken
        // by the task that starts it (the file work stays off the loop).
        let events_head = self
            .options
            .app_events
            .as_ref()
            .filter(|_| c.health.events_caught_up)
            .map(|events| {
                (
                    events.server.clone(),
                    self.options.app.clone(),
                    self.options.environment.clone(),
                )
            });
        self.busy.insert(instance.clone());
        let runtime = self.options.runtime.clone();
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            let events_head = match events_head {
                Some((server, app, environment)) => server.head(&app, &environment).await.ok(),
                None => None,
            };
            let result = match read_secrets(&secrets.0, secrets.1.as_ref()) {
                Ok(values) => {
                    spec.secret_env.0 = values;
                    if let Some(url) = events_url {
                        spec.secret_env
                            .0
                            .insert(crate::app_events::server::URL_ENV.to_owned(), url);
                    }
                    match runtime.prepare(&spec.image).await {
                        Ok(()) => runtime.start(spec).await,
                        Err(error) => Err(error),
                    }
                }
                Err(error) => Err(error),
            };
            let _ = inputs.send(Input::Started {
                instance,
                result,
                events_head,
            });
        });
    }

    /// Refuses an `events_caught_up` check on a service whose instances would get no URL of
    /// the app event log or could not reach it: they would never count as healthy.
    fn check_event_log_reach(
        &self,
        service: &ServiceName,
        config: &ServiceConfig,
    ) -> Result<(), ControllerError> {
        let refuse = |reason: &str| ControllerError::NoEventLog {
            service: service.clone(),
            reason: reason.to_owned(),
        };
        let Some(events) = &self.options.app_events else {
            return Err(refuse(
                "this control plane serves no app event log (no $GRAVEN_EVENTS_URL is given)",
            ));
        };
        let local = matches!(self.options.runtime, AnyRuntime::Local(_));
        if local && !config.host_network && events.endpoint.gateway.is_none() {
            return Err(refuse(
                "its instances have a network of their own and the app event log does not \
                 listen on graven's bridge (a rootless graven, or the bridge is unavailable); \
                 network = \"host\" instances reach it on loopback",
            ));
        }
        Ok(())
    }

    /// Prepares the release's image off the loop, unless it is being prepared already or
    /// failed a moment ago.
    fn prepare(&mut self, release: ReleaseNumber) {
        let Some(image) = self.state.releases.get(&release).map(|r| r.image.clone()) else {
            return;
        };
        let now = tokio::time::Instant::now();
        match self.preparing.get(&image) {
            Some(None) => return,
            Some(Some(retry)) if now < *retry => return,
            _ => {}
        }
        self.preparing.insert(image.clone(), None);
        let runtime = self.options.runtime.clone();
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            let result = runtime.prepare(&image).await;
            let _ = inputs.send(Input::Prepared { image, result });
        });
    }

    /// Drains the instance from its route, stops it with its grace and removes it.
    fn stop_instance(&mut self, instance: InstanceName) {
        if self.busy.contains(&instance) {
            return;
        }
        let Some(state) = self.state.instances.get(&instance) else {
            return;
        };
        let Some(runtime_id) = state.runtime_id.as_ref().map(instance_id) else {
            // Its start is under way; once it reports, the next listing resumes the stop.
            return;
        };
        let grace = self
            .state
            .releases
            .get(&state.release)
            .map_or(Duration::from_secs(10), |r| r.config.stop_grace);
        let route = self
            .routes
            .get(&state.service)
            .map(|entry| entry.route.clone());
        self.monitors.remove(&instance);
        self.busy.insert(instance.clone());
        let runtime = self.options.runtime.clone();
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            if let Some(route) = route {
                route.drain(instance.as_str(), grace).await;
            }
            let result = match runtime.stop(&runtime_id, grace).await {
                Ok(_) => runtime.remove(&runtime_id).await,
                Err(error) => Err(error),
            };
            let _ = inputs.send(Input::Stopped { instance, result });
        });
    }

    fn remove_runtime_instance(&mut self, id: RuntimeId, grace: Duration) {
        if !self.busy_ids.insert(id.clone()) {
            return;
        }
        let runtime = self.options.runtime.clone();
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            let runtime_instance = instance_id(&id);
            // The stop may find it exited already; only a failed removal is worth a word,
            // and the next listing tries again.
            let stopped = runtime.stop(&runtime_instance, grace).await;
            match runtime.remove(&runtime_instance).await {
                Ok(()) | Err(RuntimeError::UnknownInstance { .. }) => {}
                Err(error) => {
                    let stop = stopped
                        .err()
                        .map(|e| format!(" (stop: {e})"))
                        .unwrap_or_default();
                    warn(format_args!("graven: removing {id}: {error}{stop}"));
                }
            }
            let _ = inputs.send(Input::Removed { runtime_id: id });
        });
    }

    /// Closes the route of a service that is gone (removed, its last instance drained) or
    /// no longer has one. Run
    /// at the end of a round, never while a command is binding the route of a service it is
    /// about to deploy.
    fn close_gone_routes(&mut self) {
        let gone: Vec<ServiceName> = self
            .routes
            .keys()
            .filter(|service| match self.state.scale(service) {
                // Removed: closed once its last instance has drained.
                None => self.state.instances_of(service).next().is_none(),
                // Still wanted, but no longer routed.
                Some(scale) => scale.route.is_none(),
            })
            .cloned()
            .collect();
        for service in gone {
            if let Some(entry) = self.routes.remove(&service) {
                tokio::spawn(shutdown_route(entry.route));
            }
            self.route_errors.remove(&service);
            self.dirty = true;
        }
    }

    /// Brings health monitors and route snapshots in line with the state.
    fn sync(&mut self) {
        let watched: BTreeMap<&InstanceName, (SocketAddr, InstanceId)> = self
            .state
            .instances
            .values()
            .filter(|i| i.lifecycle != Lifecycle::Draining)
            .filter_map(|i| Some((&i.name, (i.address?, instance_id(i.runtime_id.as_ref()?)))))
            .collect();
        self.monitors.retain(|name, _| watched.contains_key(name));
        for (name, (address, id)) in watched {
            if self.monitors.contains_key(name) {
                continue;
            }
            let Some(instance) = self.state.instances.get(name) else {
                continue;
            };
            let Some(release) = self.state.releases.get(&instance.release) else {
                continue;
            };
            // A monitor restarted for an instance the log already knows as healthy (after a
            // controller restart) resumes from that, so a later hang still flips it.
            let known = match instance.lifecycle {
                Lifecycle::Healthy => Health::Healthy,
                Lifecycle::Unhealthy => Health::Unhealthy,
                Lifecycle::Starting | Lifecycle::Draining => Health::Unknown,
            };
            let monitor = monitor(
                &self.options.runtime,
                name,
                id,
                address,
                health_check(&release.config),
                known,
                self.health_tx.clone(),
            );
            self.monitors.insert(name.clone(), monitor);
        }
        for (service, entry) in &mut self.routes {
            let backends = backends(&self.state, service);
            if backends != entry.last {
                entry.route.set_backends(backends.clone());
                entry.last = backends;
            }
        }
    }
}

/// Stops a route gracefully (its connections get `ROUTE_CLOSE_DEADLINE` to finish) once no
/// drain task holds it any more; otherwise dropping it closes the listener. Runs off the
/// control loop.
async fn shutdown_route(route: Arc<AnyRoute>) {
    if let Ok(route) = Arc::try_unwrap(route) {
        let _ = tokio::time::timeout(ROUTE_CLOSE_DEADLINE, route.shutdown()).await;
    }
}

/// Retires a route whose successor took its listener over: its connections get
/// `ROUTE_CLOSE_DEADLINE` to finish (a TCP route's to end) once no drain task holds it.
async fn retire_route(route: Arc<AnyRoute>) {
    if let Ok(route) = Arc::try_unwrap(route) {
        let _ = tokio::time::timeout(
            ROUTE_CLOSE_DEADLINE + SHUTDOWN_SLACK,
            route.retire(ROUTE_CLOSE_DEADLINE),
        )
        .await;
    }
}

/// The release a rollback returns to: the one the last successful deploy of the service
/// replaced, or else the newest older release.
pub fn previous_release(
    state: &State,
    service: &str,
    current: Option<ReleaseNumber>,
) -> Option<ReleaseNumber> {
    let replaced = state
        .deploys
        .iter()
        .rev()
        .filter(|d| d.service == service && Some(d.to) == current)
        .find_map(|d| d.from);
    replaced.or_else(|| {
        state
            .releases_of(service)
            .map(|r| r.number)
            .filter(|n| current.is_none_or(|c| *n < c))
            .max()
    })
}

/// What the route of `service` should balance over: every instance with an address; those
/// the last traffic decision routes take new requests, draining ones finish theirs.
pub fn backends(state: &State, service: &str) -> Vec<Backend> {
    let traffic = state.services.get(service).map(|s| &s.traffic);
    state
        .instances_of(service)
        .filter_map(|i| {
            // An instance that turned unhealthy since the last traffic decision takes no
            // new request even before the next round decides without it.
            let routed = traffic.is_some_and(|t| t.contains_key(&i.name))
                && i.lifecycle == Lifecycle::Healthy;
            Some(Backend {
                instance: i.name.to_string(),
                release: i.release.get(),
                address: i.address?,
                healthy: routed || i.lifecycle == Lifecycle::Draining,
                enabled: i.lifecycle != Lifecycle::Draining,
            })
        })
        .collect()
}

/// The value of each secret a release pins, by env variable, read from the store when an
/// instance starts; a failure names the variable and the secret, never a value, and fails
/// the start like any other.
fn read_secrets(
    pinned: &BTreeMap<String, crate::events::SecretRef>,
    store: Option<&crate::secrets::Secrets>,
) -> Result<BTreeMap<String, String>, RuntimeError> {
    pinned
        .iter()
        .map(|(variable, secret)| {
            let context = || format!("env {variable}");
            let Some(store) = store else {
                return Err(RuntimeError::Other {
                    context: context(),
                    source: std::io::Error::other(format!(
                        "secret {:?}: this controller has no secret store",
                        secret.name
                    )),
                });
            };
            let value = store
                .read_text(&secret.name, secret.version)
                .map_err(|error| RuntimeError::Other {
                    context: context(),
                    source: std::io::Error::other(error),
                })?;
            Ok((variable.clone(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::events::{DeployOutcome, DeployRecord, InstanceState, Release};

    fn state(releases: &[u64], deploys: &[(Option<u64>, u64)]) -> State {
        let config = ServiceConfig::test(1, 1, 0);
        let mut state = State::default();
        for number in releases {
            state.releases.insert(
                ReleaseNumber(*number),
                Release {
                    number: ReleaseNumber(*number),
                    service: "web".into(),
                    image: Digest::of(b"x"),
                    config_digest: String::new(),
                    config: config.clone(),
                    created_at_ms: 0,
                    created_by: "test".into(),
                    source: None,
                    failed: None,
                },
            );
        }
        for (from, to) in deploys {
            state.deploys.push(DeployRecord {
                service: "web".into(),
                from: from.map(ReleaseNumber),
                to: ReleaseNumber(*to),
                reason: DeployReason::Deploy,
                started_at_ms: 0,
                by: "test".into(),
                outcome: Some(DeployOutcome::Succeeded { at_ms: 0 }),
            });
        }
        state
    }

    #[test]
    fn rollback_returns_to_what_the_current_release_replaced() {
        let check = |releases: &[u64],
                     deploys: &[(Option<u64>, u64)],
                     current: Option<u64>,
                     expected: Option<u64>| {
            assert_eq!(
                previous_release(&state(releases, deploys), "web", current.map(ReleaseNumber)),
                expected.map(ReleaseNumber),
                "{releases:?} {deploys:?} current {current:?}"
            );
        };
        check(
            &[1, 2, 3],
            &[(None, 1), (Some(1), 2), (Some(2), 3)],
            Some(3),
            Some(2),
        );
        // Release 2 failed and was rolled back; 3 replaced 1 directly.
        check(
            &[1, 2, 3],
            &[(None, 1), (Some(1), 2), (Some(1), 3)],
            Some(3),
            Some(1),
        );
        // No deploy record: the newest older release.
        check(&[1, 2, 5], &[], Some(5), Some(2));
        check(&[1], &[(None, 1)], Some(1), None);
    }

    #[test]
    fn only_healthy_instances_that_are_not_draining_take_requests() {
        let mut state = state(&[1], &[]);
        for (name, lifecycle, address) in [
            ("a", Lifecycle::Starting, None),
            ("b", Lifecycle::Starting, Some(1)),
            ("c", Lifecycle::Healthy, Some(2)),
            ("d", Lifecycle::Unhealthy, Some(3)),
            ("e", Lifecycle::Draining, Some(4)),
        ] {
            state.instances.insert(
                name.into(),
                InstanceState {
                    name: name.into(),
                    service: "web".into(),
                    release: ReleaseNumber(1),
                    lifecycle,
                    runtime_id: None,
                    address: address.map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
                    launched_at_ms: 0,
                    detail: None,
                    drain: None,
                    condemned: None,
                },
            );
        }
        // The planner's decision: the healthy one takes requests.
        state.services.entry("web".into()).or_default().traffic = [("c".into(), 1)].into();
        let routed: Vec<(String, bool, bool)> = backends(&state, "web")
            .into_iter()
            .map(|b| (b.instance, b.healthy, b.enabled))
            .collect();
        assert_eq!(
            routed,
            vec![
                ("b".into(), false, true),
                ("c".into(), true, true),
                ("d".into(), false, true),
                ("e".into(), true, false),
            ]
        );
    }
}
