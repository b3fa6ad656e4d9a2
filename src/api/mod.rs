//! The API owns the daemon's local HTTP interface over a unix socket (owner-only), its
//! routes and the mapping of errors to status codes, and the client the CLI uses.
//!
//! The daemon holds one controller per app and environment, each with its own event log
//! under `$GRAVEN_HOME/apps/<app>/<environment>/events.db`. It starts every controller whose
//! log exists (replay, then reconcile) before it answers anything. It decides nothing itself:
//! requests become controller commands, and answers are the controller's folded state.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};

use crate::controller::{
    self, ControllerError, ControllerHandle, ControllerOptions, DeployOrder, Rollout, Snapshot,
};
use crate::events::{Envelope, Event, ReleaseNumber, ServiceName, State};
use crate::runtime::AnyRuntime;

pub mod client;
mod environment_runtime;
pub mod lock;
pub mod offline;
pub mod syslog;

pub use client::Client;
pub use lock::ControlLock;

/// How often each controller lists the runtime when it reports no change.
const RESYNC: Duration = Duration::from_secs(2);

/// The socket's file name under `$GRAVEN_HOME`.
pub const SOCKET: &str = "graven.sock";

pub fn socket_path(home: &Path) -> PathBuf {
    home.join(SOCKET)
}

/// The largest request body the API reads. The largest legitimate one, a deploy of many
/// services with their environments, is a few hundred KiB; a bigger one is refused (413)
/// after reading at most this much, so a client cannot make the daemon buffer gigabytes.
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// How long a connection may wait for its next request head (the first one included), and
/// a body may take to arrive; then it is closed. `GRAVEN_API_IDLE_TIMEOUT` overrides it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
pub const IDLE_TIMEOUT_ENV: &str = "GRAVEN_API_IDLE_TIMEOUT";

/// The event log of one app in one environment.
pub fn log_path(home: &Path, app: &str, environment: &str) -> PathBuf {
    home.join("apps")
        .join(app)
        .join(environment)
        .join("events.db")
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("nothing is deployed {}", named(app, environment))]
    UnknownApp { app: String, environment: String },
    #[error("several apps run here ({choices}); name one with --app and --env")]
    Ambiguous { choices: String },
    #[error("nothing is deployed on this daemon yet")]
    NothingRunning,
    #[error("{name:?} is not a valid app or environment name: use letters, digits, '-' and '_'")]
    BadName { name: String },
    #[error("bad request: {reason}")]
    BadRequest { reason: String },
    #[error("the request body is larger than the api's limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the request body did not arrive within {after:?}")]
    BodyTimeout { after: Duration },
    #[error("{name}={value:?} is not a duration: {reason}")]
    Setting {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("no such endpoint: {method} {path}")]
    NoRoute { method: String, path: String },
    #[error("a graven daemon already listens on {}", socket.display())]
    AlreadyRunning { socket: PathBuf },
    // Not a `source`: the message crosses the API as text, so it carries the cause itself.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "release {release} of {service} was made with image {image}, which gc removed \
         (keep_releases = {keep_releases}): deploy it again"
    )]
    ImageCollected {
        service: ServiceName,
        release: ReleaseNumber,
        image: crate::store::Digest,
        keep_releases: u32,
    },
    #[error("the app event log cannot listen: {message}")]
    AppEvents { message: String },
    #[error("syslog ([logs]): {message}")]
    Syslog { message: String },
    #[error(
        "{app}/{environment} runs on the {from} runtime: stop it (graven down) before it \
         runs on {to}"
    )]
    RuntimeChange {
        app: String,
        environment: String,
        from: &'static str,
        to: &'static str,
    },
    #[error(
        "{app}/{environment}'s [dns] asks for {differences}, which this control plane does not \
         run: start it with the same settings (graven daemon --dns-zone, --dns-listen, \
         --dns-ttl, --dns-rate-limit, or GRAVEN_DNS_*), or leave them out of [dns]"
    )]
    DnsChange {
        app: String,
        environment: String,
        differences: String,
    },
    #[error("the {runtime} runtime: {message}")]
    Runtime {
        runtime: &'static str,
        message: String,
    },
    #[error(transparent)]
    Controller(#[from] ControllerError),
}

impl ApiError {
    /// Every error names its status here; adding a variant does not compile until it is
    /// given one.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::UnknownApp { .. } => StatusCode::NOT_FOUND,
            ApiError::Ambiguous { .. } => StatusCode::CONFLICT,
            ApiError::NothingRunning => StatusCode::NOT_FOUND,
            ApiError::BadName { .. } => StatusCode::BAD_REQUEST,
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::Setting { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ApiError::AlreadyRunning { .. } => StatusCode::CONFLICT,
            ApiError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::ImageCollected { .. } => StatusCode::CONFLICT,
            ApiError::AppEvents { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Syslog { .. } => StatusCode::CONFLICT,
            ApiError::RuntimeChange { .. } => StatusCode::CONFLICT,
            ApiError::DnsChange { .. } => StatusCode::CONFLICT,
            ApiError::Runtime { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Controller(error) => match error {
                ControllerError::UnknownService { .. } => StatusCode::NOT_FOUND,
                ControllerError::UnknownRelease { .. } => StatusCode::NOT_FOUND,
                ControllerError::NoPreviousRelease { .. } => StatusCode::CONFLICT,
                ControllerError::RouteUnavailable { .. } => StatusCode::CONFLICT,
                ControllerError::NothingDeployed { .. } => StatusCode::CONFLICT,
                ControllerError::Log(_) => StatusCode::INTERNAL_SERVER_ERROR,
                ControllerError::LogUnwritable { .. } => StatusCode::SERVICE_UNAVAILABLE,
                ControllerError::Stopped { .. } => StatusCode::SERVICE_UNAVAILABLE,
                ControllerError::ChaosRefused { .. } => StatusCode::CONFLICT,
                ControllerError::NoEventLog { .. } => StatusCode::CONFLICT,
            },
        }
    }
}

/// Which app and environment a request is about; either may be left out when only one
/// controller matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    #[serde(default)]
    pub app: Option<String>,
    #[serde(default)]
    pub environment: Option<String>,
}

impl Target {
    /// Whether `controller` is one this target names (a left-out part matches any).
    fn matches(&self, controller: &ControllerHandle) -> bool {
        self.app.as_deref().is_none_or(|a| a == controller.app())
            && self
                .environment
                .as_deref()
                .is_none_or(|e| e == controller.environment())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRequest {
    pub app: String,
    pub environment: String,
    #[serde(flatten)]
    pub order: DeployOrder,
    /// The project's `[logs]`: the syslog forwarders and listener the control plane runs for
    /// this app and environment from now on (none when empty).
    #[serde(default, skip_serializing_if = "crate::spec::logs::Logs::is_empty")]
    pub logs: crate::spec::logs::Logs,
    /// The environment's `runtime` in graven.toml; none: the one it ran on before, else the
    /// daemon's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<crate::spec::RuntimeChoice>,
    /// The keys of `[dns]` the project (or the deploying shell's `GRAVEN_DNS_*`) sets: the
    /// control plane refuses the deploy unless it runs them.
    #[serde(default, skip_serializing_if = "crate::dns::DnsSettings::is_empty")]
    pub dns: crate::dns::DnsSettings,
}

/// What a deploy asks of the control plane that it can refuse before anything is baked:
/// `graven deploy` sends it first (`/v1/deploy/check`), and the deploy itself is checked
/// again the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployCheck {
    pub app: String,
    pub environment: String,
    /// As `DeployRequest::dns`.
    #[serde(default, skip_serializing_if = "crate::dns::DnsSettings::is_empty")]
    pub dns: crate::dns::DnsSettings,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackRequest {
    #[serde(flatten)]
    pub target: Target,
    pub service: Option<ServiceName>,
    pub to: Option<ReleaseNumber>,
}

/// Follow a rollout's events as they are appended, from after `after` until every deploy
/// it started has ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowRequest {
    #[serde(flatten)]
    pub target: Target,
    pub after: u64,
    pub rollout: Rollout,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRequest {
    #[serde(flatten)]
    pub target: Target,
    #[serde(default)]
    pub after: u64,
}

/// `graven chaos run`: one experiment now in the app and environment named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChaosRunRequest {
    #[serde(flatten)]
    pub target: Target,
    #[serde(flatten)]
    pub request: controller::ChaosRequest,
}

/// The experiment a `chaos run` started, and which controller started it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChaosRunAccepted {
    pub app: String,
    pub environment: String,
    pub started: controller::ChaosStarted,
}

/// An answer to a command that changed something: which controller, and what it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub app: String,
    pub environment: String,
    pub rollout: Rollout,
}

impl Accepted {
    /// The target naming exactly the controller that accepted the command.
    pub fn target(&self) -> Target {
        Target {
            app: Some(self.app.clone()),
            environment: Some(self.environment.clone()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// The daemon: the controllers of every app and environment on this machine.
pub struct Daemon {
    home: PathBuf,
    runtime: AnyRuntime,
    /// Where instances reach the app event log.
    app_events: crate::app_events::server::AppEvents,
    tick: Duration,
    /// See `IDLE_TIMEOUT`.
    idle_timeout: Duration,
    /// Shared with the DNS server, which answers from every controller's snapshot.
    controllers: Arc<Mutex<BTreeMap<(String, String), ControllerHandle>>>,
    /// The syslog each app and environment's `[logs]` asks for, by app and environment.
    syslog: tokio::sync::Mutex<BTreeMap<(String, String), syslog::Syslog>>,
    /// Graven's DNS server, and how instances with a network of their own reach it.
    dns: Option<crate::dns::DnsServer>,
    dns_config: crate::dns::DnsConfig,
}

/// Starts graven's DNS server for `config`, and on the daemon's own address on the bridge when
/// instances get networks of their own, and on the home's loopback address for the local
/// runtime's `network = "host"` instances (`local`); what cannot be bound is said on stderr
/// and left out (several homes' daemons on one host cannot all have the default address, and
/// port 53 needs root).
fn start_dns(
    home: &Path,
    config: &crate::dns::DnsConfig,
    bridged: bool,
    local: bool,
    controllers: Arc<Mutex<BTreeMap<(String, String), ControllerHandle>>>,
) -> Option<crate::dns::DnsServer> {
    use std::io::Write as _;
    // Not `eprintln!`: a closed stderr must not end the daemon.
    let note = |message: &str| {
        let _ = writeln!(std::io::stderr(), "graven: {message}");
    };
    if config.listen.is_empty() {
        return None;
    }
    let bridge = if bridged {
        match crate::runtime::local::net::daemon_address(home) {
            Ok(ip) => Some(ip),
            Err(error) => {
                note(&format!(
                    "instances with a network of their own cannot reach graven's DNS server: {error}"
                ));
                None
            }
        }
    } else {
        None
    };
    let host = local.then(|| crate::dns::host_address(home));
    let (server, errors) = crate::dns::start(config, bridge, host, move || {
        controllers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(ControllerHandle::snapshot)
            .collect()
    });
    for error in errors {
        note(&error.to_string());
    }
    if let Some(host) = host.filter(|_| server.host.is_none()) {
        note(&format!(
            "instances with network = \"host\" cannot reach graven's DNS server at \
             {host}:53: they keep the image's resolv.conf"
        ));
    }
    for address in &server.addresses {
        note(&format!(
            "dns listening on {address} (udp, tcp) for {}",
            config.zone
        ));
    }
    Some(server)
}

fn valid_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadName {
            name: name.to_owned(),
        })
    }
}

impl Daemon {
    /// Starts a controller for every app and environment that has an event log. Must run
    /// inside a tokio runtime.
    pub fn open(
        home: &Path,
        runtime: AnyRuntime,
        dns_config: crate::dns::DnsConfig,
    ) -> Result<Arc<Daemon>, ApiError> {
        // The app event log's listeners, before any controller can start an instance that
        // is told where they are.
        let gateway = crate::runtime::local::net::available()
            .then(|| crate::runtime::local::net::Settings::from_env().ok())
            .flatten()
            .map(|settings| settings.subnet.gateway());
        let app_events = crate::app_events::server::start(home, gateway).map_err(|error| {
            ApiError::AppEvents {
                message: error.to_string(),
            }
        })?;
        let controllers = Arc::new(Mutex::new(BTreeMap::new()));
        // Only the local runtime's instances are on graven's bridge, or on the host's
        // network with a resolv.conf of graven's.
        let local = matches!(runtime, AnyRuntime::Local(_));
        let bridged = local && crate::runtime::local::net::available();
        let dns = start_dns(home, &dns_config, bridged, local, controllers.clone());
        let daemon = Arc::new(Daemon {
            home: home.to_owned(),
            runtime,
            app_events,
            tick: Duration::from_millis(100),
            idle_timeout: idle_timeout()?,
            controllers,
            syslog: tokio::sync::Mutex::new(BTreeMap::new()),
            dns,
            dns_config,
        });
        for (app, environment, _) in event_logs(home)? {
            if let (Some(app), Some(environment)) = (app.to_str(), environment.to_str())
                && valid_name(app).is_ok()
                && valid_name(environment).is_ok()
            {
                daemon.controller(app, environment)?;
            }
        }
        Ok(daemon)
    }

    /// The controller of `app` in `environment`, started (from its log) if need be.
    pub fn controller(&self, app: &str, environment: &str) -> Result<ControllerHandle, ApiError> {
        self.controller_on(app, environment, None)
    }

    /// `controller`, on the runtime graven.toml chose for the environment (`choice`: recorded
    /// beside its log, so a restarted daemon resumes it there; none: the one recorded, else
    /// the daemon's own).
    pub fn controller_on(
        &self,
        app: &str,
        environment: &str,
        choice: Option<&crate::spec::RuntimeChoice>,
    ) -> Result<ControllerHandle, ApiError> {
        valid_name(app)?;
        valid_name(environment)?;
        let mut controllers = self.controllers.lock().unwrap_or_else(|e| e.into_inner());
        let key = (app.to_owned(), environment.to_owned());
        let log = log_path(&self.home, app, environment);
        let dir = log.parent().expect("the log has a directory");
        if let Some(handle) = controllers.get(&key).filter(|h| !h.is_finished()) {
            let running = environment_runtime::recorded(dir).unwrap_or_default();
            if let Some(choice) = choice.filter(|c| c.name() != running.name()) {
                return Err(ApiError::RuntimeChange {
                    app: app.to_owned(),
                    environment: environment.to_owned(),
                    from: running.name(),
                    to: choice.name(),
                });
            }
            return Ok(handle.clone());
        }
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        let runtime = environment_runtime::open(&self.home, dir, choice, &self.runtime)?;
        let handle = controller::spawn(ControllerOptions {
            app: app.to_owned(),
            environment: environment.to_owned(),
            log,
            runtime,
            tick: self.tick,
            resync: RESYNC,
            // A name the store refuses (graven.toml's names never are) has no secrets.
            secrets: crate::secrets::Secrets::open(&self.home, app, environment).ok(),
            app_events: Some(self.app_events.clone()),
            dns: self.dns.as_ref().and_then(|dns| {
                // pasta forwards to the host's 127.0.0.1 (a listener on every address
                // included).
                let loopback_port = dns
                    .addresses
                    .iter()
                    .find(|a| {
                        a.ip() == std::net::Ipv4Addr::LOCALHOST
                            || a.ip() == std::net::Ipv4Addr::UNSPECIFIED
                    })
                    .map(std::net::SocketAddr::port);
                (dns.bridge.is_some() || dns.host.is_some() || loopback_port.is_some()).then(|| {
                    crate::runtime::InstanceDns {
                        nameserver: dns.bridge,
                        host: dns.host,
                        loopback_port,
                        routes: Vec::new(),
                        search: self.dns_config.search(app, environment),
                    }
                })
            }),
        })?;
        controllers.insert(key, handle.clone());
        Ok(handle)
    }

    /// The one controller `target` names, or the only one there is.
    pub fn find(&self, target: &Target) -> Result<ControllerHandle, ApiError> {
        let controllers = self.controllers.lock().unwrap_or_else(|e| e.into_inner());
        let matching: Vec<&ControllerHandle> =
            controllers.values().filter(|h| target.matches(h)).collect();
        match matching.as_slice() {
            [one] => Ok((*one).clone()),
            [] if target.app.is_none() && target.environment.is_none() => {
                Err(ApiError::NothingRunning)
            }
            [] => Err(ApiError::UnknownApp {
                app: target.app.clone().unwrap_or_default(),
                environment: target.environment.clone().unwrap_or_default(),
            }),
            many => Err(ApiError::Ambiguous {
                choices: many
                    .iter()
                    .map(|h| format!("{}/{}", h.app(), h.environment()))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The snapshots of the controllers `target` names; naming an app or environment that
    /// has none is an error.
    pub fn snapshots(&self, target: &Target) -> Result<Vec<Arc<Snapshot>>, ApiError> {
        let controllers = self.controllers.lock().unwrap_or_else(|e| e.into_inner());
        let snapshots: Vec<Arc<Snapshot>> = controllers
            .values()
            .filter(|h| target.matches(h))
            .map(|h| h.snapshot())
            .collect();
        if snapshots.is_empty() && (target.app.is_some() || target.environment.is_some()) {
            return Err(ApiError::UnknownApp {
                app: target.app.clone().unwrap_or_default(),
                environment: target.environment.clone().unwrap_or_default(),
            });
        }
        Ok(snapshots)
    }

    /// Drains and stops the instances of `app` in `environment` only; every other controller
    /// ends at once, as a killed process would, leaving its instances running for the next
    /// control plane to adopt. What `graven up` does when it stops: another project deployed
    /// to it is not its to stop.
    pub async fn shutdown_only(&self, app: &str, environment: &str) {
        for handle in self.handles() {
            if handle.app() == app && handle.environment() == environment {
                handle.shutdown().await;
            } else {
                handle.abort().await;
            }
        }
        self.stop_syslog().await;
    }

    /// Drains and stops every instance of every controller.
    pub async fn shutdown(&self) {
        for handle in self.handles() {
            handle.shutdown().await;
        }
        self.stop_syslog().await;
    }

    /// Runs `logs` for `app` in `environment` from now on, in place of what ran: unchanged,
    /// nothing is restarted; changed, the old forwarders stop (their cursors kept) and the
    /// new ones start; empty, nothing runs. Kept beside the app's event log, so a restarted
    /// control plane runs it again. Returns where the listener listens. When the new one
    /// cannot start (a listen address in use), the old one runs again and the error says why.
    pub async fn set_logs(
        &self,
        app: &str,
        environment: &str,
        logs: &crate::spec::logs::Logs,
    ) -> Result<Vec<String>, ApiError> {
        valid_name(app)?;
        valid_name(environment)?;
        let mut running = self.syslog.lock().await;
        let key = (app.to_owned(), environment.to_owned());
        if let Some(current) = running.get(&key)
            && current.config == *logs
        {
            return Ok(current.listening());
        }
        let old = running.remove(&key);
        let old_config = old.as_ref().map(|o| o.config.clone());
        if let Some(old) = old {
            old.stop().await;
        }
        if !logs.is_empty() {
            match syslog::Syslog::start(&self.home, app, environment, logs).await {
                Ok(started) => {
                    running.insert(key.clone(), started);
                }
                Err(error) => {
                    if let Some(config) = old_config
                        && let Ok(again) =
                            syslog::Syslog::start(&self.home, app, environment, &config).await
                    {
                        running.insert(key, again);
                    }
                    return Err(error);
                }
            }
        }
        syslog::keep_config(&self.home, app, environment, logs)?;
        Ok(running.get(&key).map(|s| s.listening()).unwrap_or_default())
    }

    /// Runs again the `[logs]` each app and environment's last deploy carried (a restarted
    /// control plane); one that cannot start is said on stderr and left off.
    pub async fn resume_syslog(&self) {
        let apps = match event_logs(&self.home) {
            Ok(apps) => apps,
            Err(_) => return,
        };
        for (app, environment, _) in apps {
            let (Some(app), Some(environment)) = (app.to_str(), environment.to_str()) else {
                continue;
            };
            let Some(logs) = syslog::kept_config(&self.home, app, environment) else {
                continue;
            };
            let said = match self.set_logs(app, environment, &logs).await {
                Ok(addresses) => addresses
                    .iter()
                    .map(|a| format!("graven: syslog listening on {a} for {app}/{environment}"))
                    .collect(),
                Err(error) => vec![format!("graven: {app}/{environment}: {error}")],
            };
            use std::io::Write as _;
            for line in said {
                // Not `eprintln!`: a closed stderr must not end the daemon.
                let _ = writeln!(std::io::stderr(), "{line}");
            }
        }
    }

    /// Stops every app's syslog, after the instances' last lines (a forwarder still sends
    /// what they wrote while draining, as far as it gets).
    async fn stop_syslog(&self) {
        let running = std::mem::take(&mut *self.syslog.lock().await);
        for (_, syslog) in running {
            syslog.stop().await;
        }
    }

    /// Every controller, taken out of the lock so none is awaited under it.
    fn handles(&self) -> Vec<ControllerHandle> {
        self.controllers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Serves the API on the unix socket until `stop` resolves; the socket is removed after.
    pub async fn serve(
        self: Arc<Self>,
        listener: UnixListener,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut builder = hyper::server::conn::http1::Builder::new();
        // hyper's head timer runs from when it starts waiting for a head: it closes a
        // connection that never sends a request and one idle between requests alike.
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.idle_timeout);
        // Whether accepting failed last time: a failure is printed once, not at every retry.
        let mut failing = false;
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        if !failing {
                            // Not `eprintln!`: a closed stderr must not end the daemon
                            // undrained.
                            use std::io::Write as _;
                            let _ = writeln!(
                                std::io::stderr(),
                                "graven: accepting on the api socket: {error}"
                            );
                            failing = true;
                        }
                        // Out of descriptors, most likely: back off rather than spin.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
                () = &mut stop => break,
            };
            failing = false;
            let daemon = self.clone();
            // Who asks, from the kernel's word on the peer: what its commands' events record.
            let actor: Arc<str> = match stream.peer_cred() {
                Ok(cred) => crate::actor::of_uid(cred.uid()).into(),
                Err(_) => crate::actor::UNKNOWN.into(),
            };
            let connection = builder.serve_connection(TokioIo::new(stream), {
                hyper::service::service_fn(move |request| {
                    let daemon = daemon.clone();
                    let actor = actor.clone();
                    async move { Ok::<_, Infallible>(daemon.answer(request, &actor).await) }
                })
            });
            tokio::spawn(async move {
                let _ = connection.await;
            });
        }
    }

    async fn answer(&self, request: Request<Incoming>, actor: &str) -> Response<ApiBody> {
        match self.route(request, actor).await {
            Ok(Answer::Whole(body)) => json_response(StatusCode::OK, body),
            Ok(Answer::Lines(lines)) => {
                let mut response = Response::new(ApiBody::Lines(lines));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/x-ndjson"),
                );
                response
            }
            Err(error) => {
                let mut response = json_response(
                    error.status(),
                    serde_json::to_vec(&ErrorBody {
                        error: error.to_string(),
                    })
                    .unwrap_or_default(),
                );
                if matches!(
                    error,
                    ApiError::BodyTooLarge { .. } | ApiError::BodyTimeout { .. }
                ) {
                    // The rest of the body is not read: the connection cannot carry another
                    // request.
                    response.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                response
            }
        }
    }

    async fn route(&self, request: Request<Incoming>, actor: &str) -> Result<Answer, ApiError> {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let body = self.read_body(request).await?;
        if (&method, path.as_str()) == (&Method::POST, "/v1/follow") {
            let request: FollowRequest = parse(&body)?;
            let handle = self.find(&request.target)?;
            return Ok(Answer::Lines(follow(&handle, request)));
        }
        self.route_whole(&method, &path, &body, actor)
            .await
            .map(Answer::Whole)
    }

    async fn route_whole(
        &self,
        method: &Method,
        path: &str,
        body: &Bytes,
        actor: &str,
    ) -> Result<Vec<u8>, ApiError> {
        match (method, path) {
            (&Method::POST, "/v1/deploy/check") => {
                let request: DeployCheck = parse(body)?;
                self.check_dns(&request.app, &request.environment, &request.dns)?;
                Ok(to_json(&serde_json::json!({})))
            }
            (&Method::POST, "/v1/deploy") => {
                let request: DeployRequest = parse(body)?;
                // Before anything starts: its instances would be named in another zone, or
                // told a server that is not there.
                self.check_dns(&request.app, &request.environment, &request.dns)?;
                let handle = self.controller_on(
                    &request.app,
                    &request.environment,
                    request.runtime.as_ref(),
                )?;
                self.set_logs(&request.app, &request.environment, &request.logs)
                    .await?;
                let rollout = handle.deploy(request.order, actor).await?;
                Ok(to_json(&accepted(&handle, rollout)))
            }
            (&Method::POST, "/v1/rollback") => {
                let request: RollbackRequest = parse(body)?;
                let handle = self.find(&request.target)?;
                rollback_images_present(
                    &self.home,
                    &handle.snapshot().state,
                    request.service.as_deref(),
                    request.to,
                )?;
                let rollout = handle.rollback(request.service, request.to, actor).await?;
                Ok(to_json(&accepted(&handle, rollout)))
            }
            (&Method::POST, "/v1/down") => {
                let target: Target = parse(body)?;
                let handle = self.find(&target)?;
                let rollout = handle.down(actor).await?;
                Ok(to_json(&accepted(&handle, rollout)))
            }
            (&Method::POST, "/v1/status") => {
                let target: Target = parse(body)?;
                let mut snapshots: Vec<Snapshot> = self
                    .snapshots(&target)?
                    .iter()
                    .map(|s| (**s).clone())
                    .collect();
                // How far each instance has read the app event log: the server's, not the
                // controller's, so a status shows it as it is now.
                for snapshot in &mut snapshots {
                    for name in snapshot.state.instances.keys() {
                        if let Some(read) = self.app_events.server.read_by(
                            &snapshot.app,
                            &snapshot.environment,
                            name.as_str(),
                        ) {
                            snapshot.event_reads.entry(name.clone()).or_default().read = Some(read);
                        }
                    }
                }
                Ok(to_json(&snapshots))
            }
            (&Method::POST, "/v1/chaos/run") => {
                let request: ChaosRunRequest = parse(body)?;
                let handle = self.find(&request.target)?;
                let started = handle.chaos_run(request.request, actor).await?;
                Ok(to_json(&ChaosRunAccepted {
                    app: handle.app().to_owned(),
                    environment: handle.environment().to_owned(),
                    started,
                }))
            }
            (&Method::POST, "/v1/history") => {
                let request: HistoryRequest = parse(body)?;
                let handle = self.find(&request.target)?;
                let events: Vec<Envelope<Event>> = handle.history(request.after).await?;
                Ok(to_json(&events))
            }
            _ => Err(ApiError::NoRoute {
                method: method.to_string(),
                path: path.to_owned(),
            }),
        }
    }
}

impl Daemon {
    /// Refuses a deploy whose `[dns]` sets a key otherwise than this control plane runs it.
    fn check_dns(
        &self,
        app: &str,
        environment: &str,
        dns: &crate::dns::DnsSettings,
    ) -> Result<(), ApiError> {
        let differences = self.dns_config.differences(dns);
        if differences.is_empty() {
            return Ok(());
        }
        Err(ApiError::DnsChange {
            app: app.to_owned(),
            environment: environment.to_owned(),
            differences: differences.join(", "),
        })
    }

    /// The whole body, refused without reading it when its declared length is over
    /// `MAX_BODY`, and after reading at most that much when it has none.
    async fn read_body(&self, request: Request<Incoming>) -> Result<Bytes, ApiError> {
        let too_large = ApiError::BodyTooLarge { limit: MAX_BODY };
        let declared = request
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if declared.is_some_and(|length| length > MAX_BODY as u64) {
            return Err(too_large);
        }
        let reading = Limited::new(request.into_body(), MAX_BODY).collect();
        match tokio::time::timeout(self.idle_timeout, reading).await {
            Err(_) => Err(ApiError::BodyTimeout {
                after: self.idle_timeout,
            }),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => Err(too_large),
            Ok(Err(error)) => Err(ApiError::BadRequest {
                reason: error.to_string(),
            }),
        }
    }
}

/// `IDLE_TIMEOUT`, or `GRAVEN_API_IDLE_TIMEOUT` when set.
fn idle_timeout() -> Result<Duration, ApiError> {
    let Some(value) = std::env::var_os(IDLE_TIMEOUT_ENV) else {
        return Ok(IDLE_TIMEOUT);
    };
    let text = value.to_string_lossy().into_owned();
    humantime::parse_duration(text.trim()).map_err(|error| ApiError::Setting {
        name: IDLE_TIMEOUT_ENV,
        value: text,
        reason: error.to_string(),
    })
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

fn accepted(handle: &ControllerHandle, rollout: Rollout) -> Accepted {
    Accepted {
        app: handle.app().to_owned(),
        environment: handle.environment().to_owned(),
        rollout,
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.is_empty() { b"{}" } else { body };
    serde_json::from_slice(body).map_err(|error| ApiError::BadRequest {
        reason: error.to_string(),
    })
}

/// What an endpoint answers: one JSON document, or JSON lines as they come (`/v1/follow`).
enum Answer {
    Whole(Vec<u8>),
    Lines(tokio::sync::mpsc::Receiver<Bytes>),
}

/// A response body: whole, or lines sent as they come, ending when the sender does.
pub enum ApiBody {
    Whole(Full<Bytes>),
    Lines(tokio::sync::mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for ApiBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ApiBody::Whole(full) => std::pin::Pin::new(full).poll_frame(cx),
            ApiBody::Lines(lines) => lines
                .poll_recv(cx)
                .map(|line| line.map(|bytes| Ok(hyper::body::Frame::data(bytes)))),
        }
    }

    // A whole answer says its length (`content-length`), as a plain `Full` would.
    fn is_end_stream(&self) -> bool {
        match self {
            ApiBody::Whole(full) => full.is_end_stream(),
            ApiBody::Lines(_) => false,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            ApiBody::Whole(full) => full.size_hint(),
            ApiBody::Lines(_) => hyper::body::SizeHint::default(),
        }
    }
}

/// Streams the controller's events after `request.after`, one JSON line each, until every
/// deploy of `request.rollout` has ended (or the client goes). Runs off the control loop; a
/// slow client slows only this task, and catches up from the log.
fn follow(handle: &ControllerHandle, request: FollowRequest) -> tokio::sync::mpsc::Receiver<Bytes> {
    let (lines, receiver) = tokio::sync::mpsc::channel(64);
    let mut follower = controller::Follower::new(handle, request.after);
    let mut watch = controller::RolloutWatch::new(&request.rollout);
    tokio::spawn(async move {
        while !watch.done() {
            let Ok(events) = follower.next().await else {
                return;
            };
            for envelope in events {
                watch.observe(&envelope);
                let mut line = to_json(&envelope);
                line.push(b'\n');
                if lines.send(Bytes::from(line)).await.is_err() || watch.done() {
                    return;
                }
            }
        }
    });
    receiver
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<ApiBody> {
    let mut response = Response::new(ApiBody::Whole(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// Every image `graven gc` must keep for the releases under `home`: those of the releases
/// `retained_releases` keeps in each event log. Older releases stay in their log (a release
/// is never edited), but their images may go; a rollback to one is then refused before
/// anything is recorded (`rollback_images_present`).
pub fn release_images(home: &Path) -> Result<Vec<crate::store::Digest>, ApiError> {
    let mut images = BTreeSet::new();
    for (_, _, log) in event_logs(home)? {
        let log = crate::events::EventLog::open(&log).map_err(ControllerError::from)?;
        let state =
            crate::events::replay(&log.read_after::<Event>(0).map_err(ControllerError::from)?);
        for number in retained_releases(&state) {
            images.insert(state.releases[&number].image.clone());
        }
    }
    Ok(images.into_iter().collect())
}

/// The releases of one log whose images gc keeps: for each service, the wanted release, both
/// ends of a rollout under way, every release an instance still runs, and the newest
/// `keep_releases` releases (the newest release's config says how many).
pub fn retained_releases(state: &State) -> BTreeSet<ReleaseNumber> {
    let mut kept = BTreeSet::new();
    let mut newest: BTreeMap<&str, Vec<ReleaseNumber>> = BTreeMap::new();
    for release in state.releases.values() {
        newest
            .entry(&release.service)
            .or_default()
            .push(release.number);
    }
    for (service, mut numbers) in newest {
        numbers.sort_unstable_by(|a, b| b.cmp(a));
        let keep = state.releases[&numbers[0]].config.keep_releases as usize;
        kept.extend(numbers.into_iter().take(keep));
        if let Some(service) = state.services.get(service) {
            kept.extend(service.wanted);
            if let Some(deploy) = &service.deploy {
                kept.extend(deploy.from);
                kept.insert(deploy.to);
            }
        }
    }
    kept.extend(state.instances.values().map(|i| i.release));
    // Only releases the log holds: an instance's number always names one.
    kept.retain(|n| state.releases.contains_key(n));
    kept
}

/// Refuses a rollback whose target release's image gc removed, before the controller
/// records anything: the controller cannot reach the store (its runtime may be remote or
/// the fake), so the check is here, where the daemon's home is. Unknown services and
/// releases are the controller's to report.
fn rollback_images_present(
    home: &Path,
    state: &State,
    service: Option<&str>,
    to: Option<ReleaseNumber>,
) -> Result<(), ApiError> {
    let services: Vec<&ServiceName> = match service {
        Some(service) => state
            .services
            .get_key_value(service)
            .map(|(k, _)| k)
            .into_iter()
            .collect(),
        None => state.wanted_services().collect(),
    };
    let retained = retained_releases(state);
    let store = home.join("store");
    for service in services {
        let current = state.services.get(service).and_then(|s| s.wanted);
        let target = to.or_else(|| controller::previous_release(state, service, current));
        let Some(release) = target.and_then(|n| state.releases.get(&n)) else {
            continue;
        };
        if release.service != *service || retained.contains(&release.number) {
            continue;
        }
        let present = store.is_dir()
            && crate::store::Store::open(home)
                .map(|s| s.has_blob(&release.image))
                .unwrap_or(true);
        if !present {
            let newest = state.releases_of(service).map(|r| r.number).max();
            return Err(ApiError::ImageCollected {
                service: service.clone(),
                release: release.number,
                image: release.image.clone(),
                keep_releases: newest.map_or(crate::spec::DEFAULT_KEEP_RELEASES, |n| {
                    state.releases[&n].config.keep_releases
                }),
            });
        }
    }
    Ok(())
}

/// Every event log under `home` (the layout `log_path` makes), as (app, environment, path).
pub(crate) fn event_logs(home: &Path) -> Result<Vec<(OsString, OsString, PathBuf)>, ApiError> {
    let apps = home.join("apps");
    let mut logs = Vec::new();
    if !apps.is_dir() {
        return Ok(logs);
    }
    for app in std::fs::read_dir(&apps).map_err(io(&apps))? {
        let app = app.map_err(io(&apps))?;
        let app_dir = app.path();
        // A stray file among the apps is none of graven's and holds no log.
        if !app_dir.is_dir() {
            continue;
        }
        for environment in std::fs::read_dir(&app_dir).map_err(io(&app_dir))? {
            let environment = environment.map_err(io(&app_dir))?;
            let log = environment.path().join("events.db");
            if log.is_file() {
                logs.push((app.file_name(), environment.file_name(), log));
            }
        }
    }
    Ok(logs)
}

/// "for app x in environment y", leaving out what was not named.
fn named(app: &str, environment: &str) -> String {
    match (app.is_empty(), environment.is_empty()) {
        (false, false) => format!("for app {app:?} in environment {environment:?}"),
        (false, true) => format!("for app {app:?}"),
        (true, false) => format!("in environment {environment:?}"),
        (true, true) => "here".to_owned(),
    }
}

/// Turns an I/O error on `path` into the API's error naming it.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ApiError + use<> {
    let path = path.to_owned();
    move |error| ApiError::Io { path, error }
}

/// Binds the API socket owner-only in an owner-only `home`, for the holder of its control
/// lock (asked for so that nothing binds without it): a socket file there was left by a
/// control plane that ended, and is replaced. One that still answers (a graven from before
/// the lock) is an error.
pub async fn bind(home: &Path, _lock: &ControlLock) -> Result<UnixListener, ApiError> {
    std::fs::create_dir_all(home).map_err(io(home))?;
    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700)).map_err(io(home))?;
    let socket = socket_path(home);
    if socket.exists() {
        if UnixStream::connect(&socket).await.is_ok() {
            return Err(ApiError::AlreadyRunning { socket });
        }
        std::fs::remove_file(&socket).map_err(io(&socket))?;
    }
    let listener = UnixListener::bind(&socket).map_err(io(&socket))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io(&socket))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_status_codes() {
        let check = |error: ApiError, expected: u16| {
            assert_eq!(error.status().as_u16(), expected, "{error}");
        };
        check(
            ApiError::Controller(ControllerError::UnknownService {
                service: "x".into(),
            }),
            404,
        );
        check(
            ApiError::Controller(ControllerError::RouteUnavailable {
                service: "web".into(),
                route: "127.0.0.1:1".parse().unwrap(),
                reason: "in use".into(),
            }),
            409,
        );
        check(
            ApiError::Controller(ControllerError::Stopped {
                app: "a".into(),
                environment: "e".into(),
            }),
            503,
        );
        check(ApiError::BadRequest { reason: "x".into() }, 400);
        check(ApiError::BodyTooLarge { limit: MAX_BODY }, 413);
        check(
            ApiError::Ambiguous {
                choices: "a/b, c/d".into(),
            },
            409,
        );
    }

    /// Regression (issue 11, item 7): every release ever made kept its image forever. Only
    /// the newest `keep_releases` of each service (the newest release's config says how
    /// many), the wanted one, both ends of a rollout and what instances run are kept.
    #[test]
    fn releases_beyond_keep_releases_are_not_retained() {
        use crate::events::{
            Deploy, DeployReason, InstanceState, Lifecycle, Release, ServiceConfig, ServiceState,
        };
        let mut state = State::default();
        let numbers = [
            ("web", 1),
            ("web", 2),
            ("web", 3),
            ("api", 4),
            ("web", 5),
            ("web", 6),
            ("api", 7),
            ("web", 8),
        ];
        for (service, number) in numbers {
            let mut config = ServiceConfig::test(1, 1, 0);
            // Only the newest release's bound counts.
            config.keep_releases = if number == 8 { 2 } else { 1 };
            let release = Release {
                number: ReleaseNumber(number),
                service: service.into(),
                image: crate::store::Digest::of(&number.to_be_bytes()),
                config_digest: String::new(),
                config,
                created_at_ms: 0,
                created_by: "test".into(),
                source: None,
                failed: None,
            };
            state.releases.insert(ReleaseNumber(number), release);
        }
        state
            .releases
            .get_mut(&ReleaseNumber(7))
            .unwrap()
            .config
            .keep_releases = 10;
        state.services.insert(
            "web".into(),
            ServiceState {
                wanted: Some(ReleaseNumber(2)),
                deploy: Some(Deploy {
                    from: Some(ReleaseNumber(1)),
                    to: ReleaseNumber(2),
                    reason: DeployReason::Rollback,
                    started_at_ms: 0,
                    failures: 0,
                }),
                ..ServiceState::default()
            },
        );
        state.instances.insert(
            "web-3".into(),
            InstanceState {
                name: "web-3".into(),
                service: "web".into(),
                release: ReleaseNumber(3),
                lifecycle: Lifecycle::Draining,
                runtime_id: None,
                address: None,
                launched_at_ms: 0,
                detail: None,
                drain: None,
                condemned: None,
            },
        );
        let retained: Vec<u64> = retained_releases(&state)
            .into_iter()
            .map(ReleaseNumber::get)
            .collect();
        assert_eq!(retained, [1, 2, 3, 4, 6, 7, 8]);
    }

    /// A plain `graven rollback` (to the release the current one replaced) is checked like
    /// `--to`: refused when gc removed that release's image, allowed while it is there.
    #[test]
    fn a_rollback_to_a_collected_image_is_refused_with_or_without_to() {
        use crate::events::{
            DeployOutcome, DeployReason, DeployRecord, Release, ServiceConfig, ServiceState,
        };
        let home = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(home.path()).unwrap();
        let mut state = State::default();
        for number in 1..=3u64 {
            let mut config = ServiceConfig::test(1, 1, 0);
            config.keep_releases = 1;
            let image = store.put_blob(&number.to_be_bytes()).unwrap();
            state.releases.insert(
                ReleaseNumber(number),
                Release {
                    number: ReleaseNumber(number),
                    service: "web".into(),
                    image,
                    config_digest: String::new(),
                    config,
                    created_at_ms: 0,
                    created_by: "test".into(),
                    source: None,
                    failed: None,
                },
            );
        }
        state.services.insert(
            "web".into(),
            ServiceState {
                wanted: Some(ReleaseNumber(3)),
                ..ServiceState::default()
            },
        );
        state.deploys.push(DeployRecord {
            service: "web".into(),
            from: Some(ReleaseNumber(2)),
            to: ReleaseNumber(3),
            reason: DeployReason::Deploy,
            started_at_ms: 0,
            by: "test".into(),
            outcome: Some(DeployOutcome::Succeeded { at_ms: 0 }),
        });
        let check = |service: Option<&str>, to: Option<u64>| {
            rollback_images_present(home.path(), &state, service, to.map(ReleaseNumber))
        };
        // Still in the store, though beyond retention: nothing to refuse.
        assert!(check(None, None).is_ok());
        std::fs::remove_file(store.blob_path(&state.releases[&ReleaseNumber(2)].image)).unwrap();
        for (service, to) in [(None, None), (Some("web"), None), (None, Some(2))] {
            let error = check(service, to).unwrap_err();
            assert!(
                matches!(
                    error,
                    ApiError::ImageCollected {
                        release: ReleaseNumber(2),
                        keep_releases: 1,
                        ..
                    }
                ),
                "{error}"
            );
            assert_eq!(error.status(), StatusCode::CONFLICT);
        }
        // The wanted release and unknown ones are not this check's to refuse.
        assert!(check(None, Some(3)).is_ok());
        assert!(check(None, Some(9)).is_ok());
        assert!(check(Some("nope"), None).is_ok());
    }

    #[test]
    fn release_images_are_read_from_every_event_log() {
        use crate::events::{EventLog, ServiceConfig};
        use crate::store::Digest;
        let home = tempfile::tempdir().unwrap();
        assert_eq!(release_images(home.path()).unwrap(), vec![]);
        let project = crate::spec::parse(
            "app = \"demo\"\n[services.web]\nport = 8080\n",
            Path::new("graven.toml"),
            home.path(),
            crate::spec::DEFAULT_ENVIRONMENT,
        )
        .unwrap();
        let config = ServiceConfig::from(&project.services["web"]);
        let mut expected = Vec::new();
        for (app, environment) in [("a", "local"), ("b", "prod")] {
            let log = log_path(home.path(), app, environment);
            std::fs::create_dir_all(log.parent().unwrap()).unwrap();
            let image = Digest::of(app.as_bytes());
            let created = Event::ReleaseCreated {
                service: "web".into(),
                release: crate::events::ReleaseNumber(1),
                image: image.clone(),
                config_digest: "c".into(),
                config: config.clone(),
                source: None,
            };
            EventLog::open(&log)
                .unwrap()
                .append("test", 0, &created)
                .unwrap();
            expected.push(image);
        }
        // A directory without a log is passed over.
        std::fs::create_dir_all(home.path().join("apps/c/local")).unwrap();
        expected.sort();
        assert_eq!(release_images(home.path()).unwrap(), expected);
    }

    #[test]
    fn app_and_environment_names_are_single_safe_path_components() {
        for good in ["hello", "pr-123", "a_b"] {
            assert!(valid_name(good).is_ok(), "{good}");
        }
        for bad in ["", "..", "a/b", "-x", "x y", &"a".repeat(65)] {
            assert!(valid_name(bad).is_err(), "{bad:?}");
        }
    }
}
