//! `graven up`, `daemon`, `deploy`, `rollback`, `status`, `releases`, `history`, `down`:
//! the project commands. `up` and `daemon` run the control plane in this process, holding the
//! home's control lock (`up --detach` starts `daemon` in the background instead, and `daemon
//! stop` signals the lock's holder); the others talk to it over the API socket. Building and
//! baking happen here, in the CLI process, before the daemon is asked for anything, so a
//! failed bake never touches what runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use super::{Threads, async_runtime};
use crate::api::{
    self, Client, ControlLock, Daemon, DeployCheck, DeployRequest, FollowRequest, HistoryRequest,
    RollbackRequest, Target, lock,
};
use crate::controller::{DeployOrder, Follower, Outcome, Rollout, RolloutWatch, Snapshot};
use crate::deploy::Step;
use crate::events::{DeployOutcome, Envelope, Event, ReleaseNumber, ServiceName};
use crate::runtime::{AnyRuntime, LocalRuntime};
use crate::spec::{self, DEFAULT_ENVIRONMENT, Project};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeKind {
    Local,
    /// In-memory instances inside the daemon (tests; never in the shipped binary).
    #[cfg(feature = "dev-tools")]
    Fake,
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// The project directory (holding graven.toml).
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// The environment of graven.toml to run.
    #[arg(long = "env", default_value = DEFAULT_ENVIRONMENT)]
    pub environment: String,
    /// Print the deploy's outcome as JSON.
    #[arg(long)]
    pub json: bool,
    /// Run the control plane in the background (a daemon that outlives this terminal, its
    /// output in $GRAVEN_HOME/daemon.log), deploy to it and return; `graven daemon stop`
    /// stops it. When one already runs on this home, deploy to that one.
    #[arg(long, short = 'd')]
    pub detach: bool,
    // `up` runs the same control plane as `daemon`, with its options.
    #[command(flatten)]
    pub daemon: ControlPlaneArgs,
}

#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    #[command(subcommand)]
    pub action: Option<DaemonAction>,
    #[command(flatten)]
    pub options: ControlPlaneArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum DaemonAction {
    /// Stop the control plane running on this home (a daemon or an `up`): it drains and
    /// stops every instance, then exits.
    Stop(StopDaemonArgs),
}

#[derive(Debug, clap::Args)]
pub struct StopDaemonArgs {
    /// How long to wait for it to drain and exit.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// The options of the control plane, which `up` and `daemon` both run.
#[derive(Debug, clap::Args)]
pub struct ControlPlaneArgs {
    #[arg(
        long,
        value_enum,
        default_value = "local",
        env = "GRAVEN_RUNTIME",
        hide = true
    )]
    pub runtime: RuntimeKind,
    #[command(flatten)]
    pub dns: DnsArgs,
}

/// Graven's DNS server, as `[dns]` writes it (docs/dns.md): each flag, or else its variable,
/// overrides graven.toml's key. For `graven daemon`, which reads no graven.toml, they are the
/// only way to set them; a deploy whose `[dns]` sets a key otherwise is refused.
#[derive(Debug, Default, clap::Parser)]
pub struct DnsArgs {
    /// The zone graven's DNS server answers for (`[dns] zone`; `graven` unless set).
    #[arg(long = "dns-zone", env = "GRAVEN_DNS_ZONE", value_name = "ZONE")]
    pub zone: Option<String>,
    /// Where it listens: IP:PORT, several separated by commas, or `off` (`[dns] listen`;
    /// `127.0.0.1:1053` unless set).
    #[arg(
        long = "dns-listen",
        env = "GRAVEN_DNS_LISTEN",
        value_name = "ADDRESSES"
    )]
    pub listen: Option<String>,
    /// The TTL of its answers in seconds, 0 to 3600 (`[dns] ttl`; 5 unless set).
    #[arg(
        long = "dns-ttl",
        env = "GRAVEN_DNS_TTL",
        value_name = "SECONDS",
        value_parser = clap::value_parser!(u32).range(0..=crate::spec::dns::MAX_TTL)
    )]
    pub ttl: Option<u32>,
    /// UDP queries one source may send a second, 0 for no limit (`[dns] rate_limit`; 5000
    /// unless set).
    #[arg(
        long = "dns-rate-limit",
        env = "GRAVEN_DNS_RATE_LIMIT",
        value_name = "QUERIES",
        value_parser = clap::value_parser!(u32).range(0..=crate::spec::dns::MAX_RATE_LIMIT)
    )]
    pub rate_limit: Option<u32>,
}

impl DnsArgs {
    /// The keys these set, checked.
    fn settings(&self) -> anyhow::Result<crate::dns::DnsSettings> {
        use crate::dns::DnsConfig;
        Ok(crate::dns::DnsSettings {
            zone: self
                .zone
                .as_deref()
                .map(|zone| DnsConfig::zone(zone).map(|name| name.to_ascii()))
                .transpose()?,
            listen: self
                .listen
                .as_deref()
                .map(DnsConfig::parse_listen)
                .transpose()?,
            ttl: self.ttl,
            rate_limit: self.rate_limit,
        })
    }

    /// The variables alone: `graven deploy` takes no such flags, but the same variables a
    /// control plane started from this shell would read.
    fn from_env() -> anyhow::Result<DnsArgs> {
        Ok(<DnsArgs as clap::Parser>::try_parse_from(["graven"])?)
    }

    /// Flags that make a control plane run `settings`.
    fn flags(settings: &crate::dns::DnsSettings) -> Vec<String> {
        let mut flags = Vec::new();
        if let Some(zone) = &settings.zone {
            flags.extend(["--dns-zone".to_owned(), zone.clone()]);
        }
        if let Some(listen) = &settings.listen {
            let listen: Vec<String> = listen.iter().map(ToString::to_string).collect();
            let listen = if listen.is_empty() {
                "off".to_owned()
            } else {
                listen.join(",")
            };
            flags.extend(["--dns-listen".to_owned(), listen]);
        }
        if let Some(ttl) = settings.ttl {
            flags.extend(["--dns-ttl".to_owned(), ttl.to_string()]);
        }
        if let Some(rate_limit) = settings.rate_limit {
            flags.extend(["--dns-rate-limit".to_owned(), rate_limit.to_string()]);
        }
        flags
    }
}

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The project directory (holding graven.toml).
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// The environment of graven.toml to deploy.
    #[arg(long = "env", default_value = DEFAULT_ENVIRONMENT)]
    pub environment: String,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
    /// `--runtime kubernetes` and its options (docs/kubernetes.md).
    #[command(flatten)]
    pub remote: super::render::RemoteDeployArgs,
}

#[derive(Debug, clap::Args)]
pub struct TargetArgs {
    /// The app (needed only when the daemon runs several).
    #[arg(long)]
    pub app: Option<String>,
    /// The environment (needed only when the daemon runs several).
    #[arg(long = "env")]
    pub environment: Option<String>,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

impl TargetArgs {
    fn target(&self) -> Target {
        Target {
            app: self.app.clone(),
            environment: self.environment.clone(),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Only this service (default: every service).
    #[arg(long)]
    pub service: Option<String>,
    /// The release number to go back to (default: the one before the current).
    #[arg(long)]
    pub to: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct RecoverArgs {
    /// Only this app's logs (default: every app's).
    #[arg(long)]
    pub app: Option<String>,
    /// Only this environment's logs (default: every environment's).
    #[arg(long = "env")]
    pub environment: Option<String>,
    /// Print what was done to each log as JSON.
    #[arg(long)]
    pub json: bool,
}

fn open_runtime(home: &Path, kind: RuntimeKind) -> anyhow::Result<AnyRuntime> {
    Ok(match kind {
        RuntimeKind::Local => AnyRuntime::Local(LocalRuntime::open(home)?),
        #[cfg(feature = "dev-tools")]
        RuntimeKind::Fake => AnyRuntime::Fake(crate::runtime::FakeRuntime::new()),
    })
}

/// Prints a line to stdout. `up` and `daemon` keep SIGPIPE ignored, so a closed pipe (the
/// `tee` of `graven up 2>&1 | tee` gone first) is a write error: it is dropped here, since
/// nothing printed is worth leaving instances undrained for, and `println!` would panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Prints a line to stderr, dropping a write error for the same reason as `say!`.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Ctrl-C, SIGTERM and SIGHUP, caught from the moment this is made: from then on none ends
/// the process at once, so instances started after it are always drained and stopped. SIGHUP
/// is the terminal closing under a foreground `up` or `daemon`: left at its default it would
/// kill the process and leave its instances running unrouted.
struct StopSignal {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl StopSignal {
    /// Installs the handlers; must run inside the tokio runtime.
    fn install() -> anyhow::Result<StopSignal> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignal {
            interrupt: signal(SignalKind::interrupt()).context("catching SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("catching SIGTERM")?,
            hangup: signal(SignalKind::hangup()).context("catching SIGHUP")?,
        })
    }

    /// Resolves when the process is asked to stop.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
            _ = self.hangup.recv() => {}
        }
    }
}

/// Loads graven.toml, printing every problem it has.
pub(super) fn load_project(dir: &Path, environment: &str) -> anyhow::Result<Project> {
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("project directory {}", dir.display()))?;
    spec::load(&dir, environment).map_err(|errors| anyhow::anyhow!("{errors}"))
}

/// Runs the build step and bakes the image (`deploy::prepare`), printing each step.
pub(super) fn prepare(home: &Path, project: &Project, resume: bool) -> anyhow::Result<DeployOrder> {
    let mut progress = |step: Step<'_>| match step {
        Step::Build { command } => note!("graven: build: {command}"),
        Step::Baked(crate::bake::Progress::Finished {
            step,
            total,
            text,
            cached,
        }) => {
            let how = if cached { "cached" } else { "done" };
            note!("graven: bake [{step}/{total}] {text}  {how}");
        }
        Step::Baked(_) => {}
    };
    Ok(crate::deploy::prepare(
        home,
        project,
        resume,
        &mut progress,
    )?)
}

#[derive(Debug, Serialize)]
struct DeployReport<'a> {
    app: &'a str,
    environment: &'a str,
    rollout: &'a Rollout,
    outcomes: &'a [Outcome],
    routes: BTreeMap<ServiceName, String>,
}

/// Prints one event of a rollout's progress on stderr (unless the outcome goes out as JSON).
fn progress_line(envelope: &Envelope<Event>, quiet: bool) {
    if !quiet {
        note!("  {}", envelope.payload.describe());
    }
}

/// Follows a rollout in this process (`graven up`), printing its events as they are
/// appended, until every deploy it started has ended.
async fn follow_here(
    handle: &crate::controller::ControllerHandle,
    rollout: &Rollout,
    quiet: bool,
) -> anyhow::Result<Vec<Outcome>> {
    let mut watch = RolloutWatch::new(rollout);
    let mut follower = Follower::new(handle, rollout.after_seq);
    while !watch.done() {
        for envelope in follower.next().await? {
            progress_line(&envelope, quiet);
            watch.observe(&envelope);
            if watch.done() {
                break;
            }
        }
    }
    Ok(watch.outcomes())
}

/// Prints the outcome of a rollout; the exit code says whether every deploy succeeded. A
/// release rolled back is followed by the last lines its instances wrote (from the log
/// store under `home`): why they did not become healthy is usually there.
fn report(
    home: &Path,
    json: bool,
    app: &str,
    environment: &str,
    rollout: &Rollout,
    outcomes: &[Outcome],
    snapshot: Option<&Snapshot>,
) -> anyhow::Result<ExitCode> {
    let routes: BTreeMap<ServiceName, String> = snapshot
        .map(|s| {
            s.routes
                .iter()
                .map(|(service, address)| (service.clone(), format!("http://{address}")))
                .collect()
        })
        .unwrap_or_default();
    let failed = outcomes
        .iter()
        .any(|o| !matches!(o.outcome, DeployOutcome::Succeeded { .. }));
    if json {
        let report = DeployReport {
            app,
            environment,
            rollout,
            outcomes,
            routes,
        };
        say!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for service in &rollout.unchanged {
            say!("{service}: unchanged");
        }
        for scaled in &rollout.scaled {
            match scaled.route {
                Some(route) => say!(
                    "{}: scaled to {} on {route} (same release)",
                    scaled.service,
                    scaled.instances
                ),
                None => say!(
                    "{}: scaled to {} (same release)",
                    scaled.service,
                    scaled.instances
                ),
            }
        }
        for kept in &rollout.kept {
            match kept.wanted {
                Some(wanted) if wanted != kept.made => say!(
                    "{}: release {wanted} stays wanted; this directory is unchanged since it \
                     made release {} (`graven deploy` deploys it again)",
                    kept.service,
                    kept.made
                ),
                _ => say!("{}: release {} (unchanged)", kept.service, kept.made),
            }
        }
        for outcome in outcomes {
            match &outcome.outcome {
                DeployOutcome::Succeeded { .. } => {
                    say!(
                        "{}: release {} is serving",
                        outcome.service,
                        outcome.release
                    )
                }
                DeployOutcome::RolledBack { reason, .. } => {
                    say!(
                        "{}: release {} rolled back: {reason}",
                        outcome.service,
                        outcome.release
                    );
                    failing_lines(home, app, environment, outcome);
                }
                DeployOutcome::Superseded { .. } => say!(
                    "{}: release {} was superseded before it finished",
                    outcome.service,
                    outcome.release
                ),
            }
        }
        for (service, url) in &routes {
            say!("{service}: {url}");
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

pub fn up(home: &Path, args: UpArgs) -> anyhow::Result<ExitCode> {
    if args.detach {
        return up_detached(home, args);
    }
    // Before anything is read or started: a second control plane on this home fails here.
    let dir = std::path::absolute(&args.dir).unwrap_or_else(|_| args.dir.clone());
    let lock = ControlLock::acquire(home, &format!("graven up {}", dir.display()))?;
    let project = load_project(&args.dir, &args.environment)?;
    let runtime = async_runtime(Threads::All)?;
    let code = runtime.block_on(async {
        // Before anything can start an instance: a stop asked for during the bake or the
        // first rollout must still drain what was started.
        let mut stop = StopSignal::install()?;
        let listener = api::bind(home, &lock).await?;
        let daemon = Daemon::open(
            home,
            open_runtime(home, args.daemon.runtime)?,
            dns_config(&project.dns, &args.daemon.dns)?,
        )?;
        for address in daemon
            .set_logs(&project.app, &project.environment, &project.logs)
            .await?
        {
            note!("graven: syslog listening on {address}");
        }
        daemon.resume_syslog().await;
        let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(daemon.clone().serve(listener, async {
            let _ = api_stopped.await;
        }));
        let logs_home = home.to_owned();
        let result = async {
            let handle =
                daemon.controller_on(&project.app, &project.environment, Some(&project.runtime))?;
            let home = home.to_owned();
            let order = {
                let project = project.clone();
                tokio::task::spawn_blocking(move || prepare(&home, &project, true)).await??
            };
            let rollout = handle.deploy(order, &crate::actor::this_process()).await?;
            let outcomes = follow_here(&handle, &rollout, args.json).await?;
            let snapshot = handle.snapshot();
            report(
                &logs_home,
                args.json,
                &project.app,
                &project.environment,
                &rollout,
                &outcomes,
                Some(&snapshot),
            )
        };
        let code = tokio::select! {
            result = result => match result {
                Ok(code) => {
                    if code == ExitCode::SUCCESS {
                        note!(
                            "graven: serving {}/{}; Ctrl-C stops",
                            project.app, project.environment
                        );
                    } else {
                        // Never "serving": a first rollout that rolled back left nothing to
                        // serve. What did start keeps running, to be looked at.
                        note!(
                            "graven: the rollout of {}/{} did not succeed (above); up keeps \
                             running what runs, see `graven status`; Ctrl-C stops",
                            project.app, project.environment
                        );
                    }
                    stop.recv().await;
                    code
                }
                Err(error) => {
                    note!("graven: {}", super::report(&error));
                    ExitCode::FAILURE
                }
            },
            () = stop.recv() => {
                note!("graven: stopped before the rollout finished");
                ExitCode::FAILURE
            }
        };
        note!(
            "graven: draining and stopping the instances of {}/{}",
            project.app,
            project.environment
        );
        daemon
            .shutdown_only(&project.app, &project.environment)
            .await;
        let _ = stop_api.send(());
        let _ = server.await;
        let _ = std::fs::remove_file(api::socket_path(home));
        anyhow::Ok(code)
    });
    // A bake cut short by a stop may still be running on a blocking thread; it started no
    // instance, and its store transaction commits nothing unless it finishes.
    runtime.shutdown_background();
    code
}

pub fn daemon(home: &Path, args: DaemonArgs) -> anyhow::Result<ExitCode> {
    if let Some(DaemonAction::Stop(stop)) = args.action {
        return stop_daemon(home, stop);
    }
    let lock = ControlLock::acquire(home, "graven daemon")?;
    let runtime = async_runtime(Threads::All)?;
    runtime.block_on(async {
        let mut stop = StopSignal::install()?;
        let listener = api::bind(home, &lock).await?;
        let daemon: Arc<Daemon> = Daemon::open(
            home,
            open_runtime(home, args.options.runtime)?,
            dns_config(&crate::dns::DnsSettings::default(), &args.options.dns)?,
        )?;
        // What the apps' last deploys asked for: forwarding resumes where each destination
        // last confirmed.
        daemon.resume_syslog().await;
        note!(
            "graven: daemon listening on {}",
            api::socket_path(home).display()
        );
        daemon.clone().serve(listener, stop.recv()).await;
        note!("graven: draining and stopping every instance");
        daemon.shutdown().await;
        let _ = std::fs::remove_file(api::socket_path(home));
        Ok(ExitCode::SUCCESS)
    })
}

/// The DNS server's settings: the defaults, then the project's `[dns]` (`up`; none for
/// `daemon`), then the flags and their variables.
fn dns_config(
    project: &crate::dns::DnsSettings,
    args: &DnsArgs,
) -> anyhow::Result<crate::dns::DnsConfig> {
    Ok(crate::dns::DnsConfig::default().with(&project.and(&args.settings()?))?)
}

/// The output of a control plane `up --detach` started, under the home.
const DAEMON_LOG: &str = "daemon.log";

/// Past this size, the log a start would append to becomes `daemon.log.1` (one earlier
/// file is kept), so restarts do not grow it without bound.
const DAEMON_LOG_SIZE: u64 = 8 << 20;

/// How long `up --detach` waits for the control plane it started to answer (it replays
/// every event log first).
const DAEMON_START: Duration = Duration::from_secs(60);

/// `up --detach`: a control plane in the background (unless one runs on this home already),
/// then a deploy to it, exactly as `graven deploy` makes one.
fn up_detached(home: &Path, args: UpArgs) -> anyhow::Result<ExitCode> {
    // A project that does not load starts nothing.
    let project = load_project(&args.dir, &args.environment)?;
    // What `up` in the foreground would run: the control plane started here runs it, and one
    // already running must agree.
    let dns = project.dns.and(&args.daemon.dns.settings()?);
    let holder = match lock::holder(home)? {
        Some(holder) => {
            note!(
                "graven: a control plane already runs on {} ({holder}): deploying to it",
                home.display()
            );
            holder
        }
        None => {
            let holder = start_daemon(home, args.daemon.runtime, &dns)?;
            note!(
                "graven: started the control plane in the background ({holder}); its output \
                 goes to {}",
                home.join(DAEMON_LOG).display()
            );
            holder
        }
    };
    // `up`, in the background: it resumes the wanted release as the foreground one does.
    let code = deploy_to_daemon(home, &project, &dns, args.json, true)?;
    note!(
        "graven: the control plane keeps serving in the background (pid {}); `graven daemon \
         stop` drains and stops it",
        holder.pid
    );
    Ok(code)
}

/// Starts `graven daemon` in a session of its own (no terminal, so no hang-up reaches it),
/// its output appended to `daemon.log`, and waits until it answers on the socket.
fn start_daemon(
    home: &Path,
    kind: RuntimeKind,
    dns: &crate::dns::DnsSettings,
) -> anyhow::Result<lock::Holder> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    let log_path = home.join(DAEMON_LOG);
    if std::fs::metadata(&log_path).is_ok_and(|m| m.len() > DAEMON_LOG_SIZE) {
        let earlier = home.join(format!("{DAEMON_LOG}.1"));
        std::fs::rename(&log_path, &earlier)
            .with_context(|| format!("moving {} to {}", log_path.display(), earlier.display()))?;
    }
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    log.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} owner-only", log_path.display()))?;
    {
        use std::io::Write as _;
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        let _ = writeln!(&log, "graven: {now}: started by `graven up --detach`");
    }
    // What the daemon writes begins here; an error shows that part only.
    let start = log.metadata().map_or(0, |m| m.len());
    let exe = std::env::current_exe().context("finding graven's own binary")?;
    let kind = clap::ValueEnum::to_possible_value(&kind).expect("every runtime has a name");
    let mut command = std::process::Command::new(exe);
    command
        .arg("--home")
        .arg(home)
        .args(["daemon", "--runtime", kind.get_name()])
        .args(DnsArgs::flags(dns))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .context("duplicating the log's descriptor")?,
        )
        .stderr(log);
    // SAFETY: setsid and close_range are single syscalls, async-signal-safe, allocating
    // nothing.
    unsafe {
        command.pre_exec(|| {
            rustix::process::setsid()?;
            // Whatever this command's caller left open without close-on-exec (a CI step's
            // pipe, say) would be held by the daemon for its whole life: closed at the exec.
            // Marked rather than closed, so std's own pipe still reports a failed exec.
            libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as i32);
            Ok(())
        })
    };
    let mut child = command
        .spawn()
        .context("starting the control plane in the background")?;
    let client = Client::new(home);
    let runtime = async_runtime(Threads::One)?;
    let deadline = std::time::Instant::now() + DAEMON_START;
    loop {
        if runtime.block_on(client.status(&Target::default())).is_ok() {
            // Another one started at the same moment may be the one that answered.
            if let Some(holder) = lock::holder(home)? {
                return Ok(holder);
            }
        }
        let written = || {
            let text = std::fs::read(&log_path).unwrap_or_default();
            String::from_utf8_lossy(text.get(start as usize..).unwrap_or_default()).into_owned()
        };
        if let Some(status) = child.try_wait()? {
            bail!(
                "the control plane started in the background exited ({status}) before it \
                 answered; {} says:\n{}",
                log_path.display(),
                written().trim_end()
            );
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "the control plane started in the background (pid {}) did not answer within \
                 {}; see {}",
                child.id(),
                humantime::format_duration(DAEMON_START),
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How many of a failed release's last lines a deploy shows.
const FAILING_LINES: usize = 20;

/// The last lines the instances of a release that was rolled back wrote, indented under
/// its outcome.
fn failing_lines(home: &Path, app: &str, environment: &str, outcome: &Outcome) {
    let query = crate::logs::Query {
        app: Some(app.to_owned()),
        environment: Some(environment.to_owned()),
        services: vec![outcome.service.to_string()],
        release: Some(outcome.release.0),
        tail: Some(FAILING_LINES),
        ..crate::logs::Query::default()
    };
    let mut lines = Vec::new();
    crate::logs::read::read(home, &query, &mut |record| {
        let mark = match record.stream {
            crate::logs::Stream::Stdout => '|',
            crate::logs::Stream::Stderr => '!',
        };
        lines.push(format!(
            "  {} {mark} {}",
            record.source.meta.instance,
            String::from_utf8_lossy(&record.line)
        ));
    });
    if lines.is_empty() {
        return;
    }
    say!(
        "  the last {} lines of its instances (`graven logs {} --release {}` for all):",
        lines.len(),
        outcome.service,
        outcome.release
    );
    // Root in an instance holds no capability (docs/security.md): a server that starts as
    // root to chown its files or drop to its own user, as under Docker, fails here with EPERM.
    let denied = lines.iter().any(|l| l.contains("Operation not permitted"));
    for line in lines {
        say!("{line}");
    }
    if denied {
        say!(
            "  (\"Operation not permitted\": an instance holds no capability, so chown, setuid, \
             setgid and mount fail even as root; a server that starts as root to drop to its own \
             user runs as that user instead: `user = \"www-data\"` in graven.toml, see \
             docs/security.md#root-in-an-instance)"
        );
    }
}

/// `daemon stop`: SIGTERM to the holder of the home's control lock, then a wait until that
/// process has ended (its pidfd readable), which is after it drained and let the lock go.
fn stop_daemon(home: &Path, args: StopDaemonArgs) -> anyhow::Result<ExitCode> {
    let Some((holder, pidfd)) = lock::signal_holder(home, rustix::process::Signal::TERM)? else {
        say!("no control plane runs on {}", home.display());
        return Ok(ExitCode::SUCCESS);
    };
    note!("graven: stopping the control plane ({holder}): it drains every instance first");
    let deadline = std::time::Instant::now() + args.timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let timeout = rustix::event::Timespec::try_from(left.min(Duration::from_secs(1)))
            .expect("a second fits a timespec");
        let mut fds = [rustix::event::PollFd::new(
            &pidfd,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => {}
            Ok(_) => break,
            Err(error) => bail!("waiting for the control plane ({holder}) to end: {error}"),
        }
        if left.is_zero() {
            bail!(
                "the control plane ({holder}) still runs after {}: it may still be draining",
                humantime::format_duration(args.timeout)
            );
        }
    }
    say!("the control plane on {} has stopped", home.display());
    Ok(ExitCode::SUCCESS)
}

async fn finish(
    home: &Path,
    client: &Client,
    accepted: api::Accepted,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let target = accepted.target();
    // The daemon streams the rollout's events as they are appended, and ends the stream once
    // every deploy has ended; nothing is polled.
    let mut watch = RolloutWatch::new(&accepted.rollout);
    let request = FollowRequest {
        target: target.clone(),
        after: accepted.rollout.after_seq,
        rollout: accepted.rollout.clone(),
    };
    client
        .follow(&request, |envelope| {
            progress_line(&envelope, json);
            watch.observe(&envelope);
        })
        .await?;
    if !watch.done() {
        bail!("the control plane stopped before the rollout ended");
    }
    let outcomes = watch.outcomes();
    let snapshot = client.status(&target).await?.into_iter().next();
    report(
        home,
        json,
        &accepted.app,
        &accepted.environment,
        &accepted.rollout,
        &outcomes,
        snapshot.as_ref(),
    )
}

pub fn deploy(home: &Path, args: DeployArgs) -> anyhow::Result<ExitCode> {
    // An environment whose runtime is kubernetes goes to its cluster as `--runtime
    // kubernetes` does, with graven.toml's kube_* keys where no flag is given.
    let project = load_project(&args.dir, &args.environment)?;
    let kubernetes = args.remote.runtime.is_some()
        || matches!(
            project.runtime,
            crate::spec::RuntimeChoice::Kubernetes { .. }
        );
    if kubernetes {
        return super::render::deploy(home, &project, args.json, args.remote);
    }
    let remote = &args.remote;
    anyhow::ensure!(
        remote.server.is_none()
            && remote.cluster.namespace.is_none()
            && remote.cluster.image.is_none(),
        "--server, --namespace and --image are a kubernetes deploy's: environment {:?} runs on \
         graven's control plane (give --runtime kubernetes, or runtime = \"kubernetes\" in \
         graven.toml)",
        args.environment
    );
    let dns = project.dns.and(&DnsArgs::from_env()?.settings()?);
    deploy_to_daemon(home, &project, &dns, args.json, false)
}

/// Builds, bakes and deploys the project to the running control plane; `resume` is `up`'s.
fn deploy_to_daemon(
    home: &Path,
    project: &Project,
    dns: &crate::dns::DnsSettings,
    json: bool,
    resume: bool,
) -> anyhow::Result<ExitCode> {
    let client = Client::new(home);
    let runtime = async_runtime(Threads::One)?;
    // Check the daemon is there, and would not refuse the deploy for its `[dns]`, before
    // spending time on a build.
    runtime.block_on(client.check_deploy(&DeployCheck {
        app: project.app.clone(),
        environment: project.environment.clone(),
        dns: dns.clone(),
    }))?;
    let order = prepare(home, project, resume)?;
    runtime.block_on(async {
        let accepted = client
            .deploy(&DeployRequest {
                app: project.app.clone(),
                environment: project.environment.clone(),
                order,
                logs: project.logs.clone(),
                runtime: Some(project.runtime.clone()),
                dns: dns.clone(),
            })
            .await?;
        finish(home, &client, accepted, json).await
    })
}

pub fn rollback(home: &Path, args: RollbackArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(home);
    async_runtime(Threads::One)?.block_on(async {
        let accepted = client
            .rollback(&RollbackRequest {
                target: args.target.target(),
                service: args.service.map(ServiceName::from),
                to: args.to.map(ReleaseNumber),
            })
            .await?;
        finish(home, &client, accepted, args.target.json).await
    })
}

pub fn down(home: &Path, args: TargetArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(home);
    async_runtime(Threads::One)?.block_on(async {
        let accepted = client.down(&args.target()).await?;
        let target = accepted.target();
        // Down returns once every instance is drained and gone.
        loop {
            let snapshots = client.status(&target).await?;
            if snapshots.iter().all(|s| s.state.instances.is_empty()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&accepted)?);
        } else {
            println!(
                "{}/{}: every service is down",
                accepted.app, accepted.environment
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The target of a reporting command: what `--app`/`--env` say, else the app of
/// `./graven.toml` when there is one (its environment too when `--env` is left out and the
/// app has only one on this home).
pub(super) fn reported_target(args: &TargetArgs) -> Target {
    let mut target = args.target();
    if target.app.is_none()
        && let Ok(project) = spec::load(Path::new("."), DEFAULT_ENVIRONMENT)
    {
        target.app = Some(project.app);
    }
    target
}

/// Milliseconds since the Unix epoch, now.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How long ago `at_ms` was, in a short human form ("3m 12s").
fn age(at_ms: u64) -> String {
    let secs = now_ms().saturating_sub(at_ms) / 1000;
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

fn at(at_ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(at_ms))
        .to_string()
}

/// The snapshots a reporting command shows: the daemon's when one runs, else folded from
/// the logs on disk (said once on stderr). Whether they came from the disk.
fn snapshots(home: &Path, target: &Target) -> anyhow::Result<(Vec<Snapshot>, bool)> {
    let client = Client::new(home);
    match async_runtime(Threads::One)?.block_on(client.status(target)) {
        Ok(snapshots) => Ok((snapshots, false)),
        Err(crate::api::client::ClientError::NoDaemon { .. }) => {
            Ok((api::offline::snapshots(home, target)?, true))
        }
        Err(error) => Err(error.into()),
    }
}

/// How far an instance has read the app event log, for `graven status`.
fn event_read_text(
    instance: &crate::events::fold::InstanceState,
    reads: &crate::controller::EventRead,
) -> String {
    use crate::events::fold::Lifecycle;
    let read = reads.read.map_or("nothing read yet".to_owned(), |r| {
        format!("read up to event {r}")
    });
    let gated = matches!(
        instance.lifecycle,
        Lifecycle::Starting | Lifecycle::Unhealthy
    );
    match reads.target {
        Some(target) if gated && reads.read.is_none_or(|r| r < target) => {
            format!("{read}, catching up with event {target} (not routed until then)")
        }
        Some(target) => format!("{read}, caught up with event {target}"),
        None => read,
    }
}

pub fn status(home: &Path, args: TargetArgs) -> anyhow::Result<ExitCode> {
    let target = reported_target(&args);
    let (mut snapshots, offline) = snapshots(home, &target)?;
    for snapshot in &mut snapshots {
        snapshot.syslog = api::syslog::report(home, &snapshot.app, &snapshot.environment);
    }
    if args.json {
        let now = now_ms();
        let mut shown = Vec::new();
        for snapshot in &snapshots {
            let mut value = serde_json::to_value(snapshot)?;
            // Each instance's age and, under phoenix, when it is due to be recycled: facts of
            // the moment, added beside the fold's state rather than in it.
            if let Some(instances) = value["state"]["instances"].as_object_mut() {
                for (name, shown) in instances.iter_mut() {
                    let Some(instance) = snapshot.state.instances.get(name.as_str()) else {
                        continue;
                    };
                    shown["age_ms"] = now.saturating_sub(instance.launched_at_ms).into();
                    if let Some(due) =
                        crate::controller::plan::phoenix::recycle_due_ms(&snapshot.state, instance)
                    {
                        shown["recycle_due_ms"] = due.into();
                    }
                }
            }
            shown.push(value);
        }
        say!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(ExitCode::SUCCESS);
    }
    if offline {
        note!(
            "graven: no control plane runs on {}: this is what its event logs say; routes are \
             not bound",
            home.display()
        );
    }
    if snapshots.is_empty() {
        say!("nothing is deployed");
    }
    for snapshot in &snapshots {
        say!("{}/{}", snapshot.app, snapshot.environment);
        if let Some(problem) = &snapshot.log_problem {
            say!(
                "  the event log cannot be written since {} ({}): routes serve the last known \
                 state, nothing new is done, retrying",
                at(problem.since_ms),
                problem.error
            );
        }
        let state = &snapshot.state;
        for (name, service) in &state.services {
            // No release wanted: the service was removed, or its rollout rolled back with no
            // release to go back to (its first), which is said even once nothing runs.
            let rolled_back = state
                .releases_of(name)
                .next_back()
                .and_then(|r| Some((r.number, r.failed.as_ref()?)));
            let wanted = match (service.wanted, rolled_back) {
                (Some(w), _) => format!("release {w}"),
                (None, Some((number, why))) => format!(
                    "no release is wanted: release {number} was rolled back: {why} \
                     (`graven releases`, `graven logs {name} --release {number}`)"
                ),
                (None, None) if state.instances_of(name).next().is_some() => {
                    "removed, draining".to_owned()
                }
                (None, None) => continue,
            };
            let route = snapshot
                .routes
                .get(name)
                .map(|a| format!(" http://{a}"))
                .unwrap_or_default();
            say!("  service {name}: {wanted}{route}");
            if let Some(deploy) = &service.deploy {
                say!(
                    "    {} in progress: {} -> {} (for {})",
                    deploy.reason,
                    deploy.from.map_or("none".to_owned(), |f| f.to_string()),
                    deploy.to,
                    age(deploy.started_at_ms)
                );
            }
            if let Some(backoff) = &service.backoff {
                say!(
                    "    crash loop: {} failures, launches wait {}",
                    backoff.failures,
                    humantime::format_duration(Duration::from_millis(backoff.delay_ms))
                );
            }
            if let Some(error) = snapshot.route_errors.get(name) {
                say!("    route error: {error}");
            }
            for instance in state.instances_of(name) {
                let mut lifecycle = format!("{:?}", instance.lifecycle).to_lowercase();
                if instance.condemned.is_some() {
                    lifecycle += ", condemned";
                }
                say!(
                    "    {:<28} release {:<4} {:<20} {:<22} up {:<8} {}",
                    instance.name,
                    instance.release,
                    lifecycle,
                    instance.address.map_or("-".to_owned(), |a| a.to_string()),
                    age(instance.launched_at_ms),
                    instance.runtime_id.as_ref().map_or("-", |id| id.as_str()),
                );
                // What the check said when it failed: the http status, the connect error,
                // the exec's exit and last line. Cleared once the instance passes again.
                if let Some(detail) = &instance.detail {
                    say!("      last health check: {detail}");
                }
                if let Some(reads) = snapshot.event_reads.get(&instance.name) {
                    say!("      app event log: {}", event_read_text(instance, reads));
                }
                // Why it is being replaced: an exec, drift with its evidence, or its age.
                if let Some(reason) = &instance.condemned {
                    say!("      condemned: {reason}");
                } else if let Some(due) =
                    crate::controller::plan::phoenix::recycle_due_ms(state, instance)
                {
                    say!("      {}", recycle_text(state, instance, due));
                }
            }
        }
        if let Some(report) = &snapshot.syslog {
            print_syslog(report);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// When an instance is recycled: in how long, or since when it is due and what it waits
/// for (its window, or the budget).
fn recycle_text(
    state: &crate::events::State,
    instance: &crate::events::InstanceState,
    due: u64,
) -> String {
    let window = state
        .wanted_release(&instance.service)
        .and_then(|r| r.config.phoenix.as_ref()?.window.as_ref())
        .map(|w| format!(" (window {w})"))
        .unwrap_or_default();
    let now = now_ms();
    let round = |ms: u64| humantime::format_duration(Duration::from_secs(ms / 1000));
    if due > now {
        format!("recycled in {}{window}", round(due - now))
    } else {
        format!(
            "due for recycling {} ago{window}: waits for its window, a rollout or a \
             replacement under way",
            round(now - due)
        )
    }
}

/// The syslog counters, as of when the control plane last wrote them.
fn print_syslog(report: &crate::logs::syslog::SyslogReport) {
    let when = age(report.at_ms);
    for f in &report.forward {
        say!(
            "  syslog to {}: {}, {} sent, {} dropped (buffer full), {} buffered, {} resent, {} \
             connection failures ({when} ago)",
            f.to,
            if f.up { "up" } else { "down" },
            f.sent,
            f.dropped,
            f.buffered,
            f.resent,
            f.failures,
        );
    }
    if let Some(l) = &report.listen {
        let refused = if l.bad.is_empty() {
            "none refused".to_owned()
        } else {
            let kinds: Vec<String> = l.bad.iter().map(|(k, n)| format!("{k}: {n}")).collect();
            format!("refused {}", kinds.join(", "))
        };
        say!(
            "  syslog listening on {}: {} received, {refused}, {} connections ({} refused), {} \
             lost to the store's errors ({when} ago)",
            l.addresses.join(", "),
            l.received,
            l.connections,
            l.refused_connections,
            l.sink_errors,
        );
    }
}

pub fn releases(home: &Path, args: TargetArgs) -> anyhow::Result<ExitCode> {
    let target = reported_target(&args);
    let (snapshots, _) = snapshots(home, &target)?;
    if args.json {
        let releases: Vec<_> = snapshots
            .iter()
            .flat_map(|s| s.state.releases.values())
            .collect();
        say!("{}", serde_json::to_string_pretty(&releases)?);
        return Ok(ExitCode::SUCCESS);
    }
    for snapshot in &snapshots {
        say!("{}/{}", snapshot.app, snapshot.environment);
        for release in snapshot.state.releases.values() {
            let wanted = snapshot
                .state
                .services
                .get(&release.service)
                .and_then(|s| s.wanted)
                == Some(release.number);
            let failed = release
                .failed
                .as_ref()
                .map(|why| format!("  FAILED: {why}"))
                .unwrap_or_default();
            say!(
                "  {} {:<4} {:<12} image {} config {}  {} by {}{failed}",
                if wanted { "*" } else { " " },
                release.number,
                release.service,
                release.image.short(),
                release
                    .config_digest
                    .get(7..19)
                    .unwrap_or(&release.config_digest),
                at(release.created_at_ms),
                release.created_by,
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn history(home: &Path, args: TargetArgs) -> anyhow::Result<ExitCode> {
    let target = reported_target(&args);
    let client = Client::new(home);
    let runtime = async_runtime(Threads::One)?;
    // Page by page, so a long log is never held whole, by the daemon or here; with no
    // control plane, from the log on disk, opened once.
    let mut after = 0;
    let mut first = true;
    let mut offline: Option<crate::events::EventLog> = None;
    if args.json {
        say!("[");
    }
    loop {
        let page = match &offline {
            Some(log) => log.read_page(after, crate::controller::HISTORY_PAGE)?,
            None => {
                let request = HistoryRequest {
                    target: target.clone(),
                    after,
                };
                match runtime.block_on(client.history(&request)) {
                    Ok(page) => page,
                    Err(crate::api::client::ClientError::NoDaemon { .. }) => {
                        let log = offline.insert(api::offline::log(home, &target)?);
                        log.read_page(after, crate::controller::HISTORY_PAGE)?
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        };
        let Some(last) = page.last() else {
            break;
        };
        after = last.seq;
        for envelope in &page {
            if args.json {
                let comma = if first { "" } else { "," };
                say!("{comma}{}", serde_json::to_string(envelope)?);
            } else {
                say!(
                    "{:>5} {} {:<24} {}",
                    envelope.seq,
                    humantime::format_rfc3339_millis(
                        std::time::UNIX_EPOCH + Duration::from_millis(envelope.at_ms)
                    ),
                    envelope.actor,
                    envelope.payload.describe()
                );
            }
            first = false;
        }
    }
    if args.json {
        say!("]");
    }
    Ok(ExitCode::SUCCESS)
}

/// Records the loss in every event log (of the app and environment asked) whose end was
/// lost, so the daemon starts on it again; release, instance and sequence numbers go on after
/// the highest one the log's mark records. Logs that lost nothing are left as they are.
pub fn recover(home: &Path, args: RecoverArgs) -> anyhow::Result<ExitCode> {
    let logs = logs_named(home, &args)?;
    let mut reports = Vec::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for (app, environment, log) in logs {
        let recorded =
            crate::events::EventLog::recover(&log, "cli", now, |loss| Event::HistoryLost {
                kept_through: loss.kept_through,
                lost_through: loss.lost_through,
            })
            .with_context(|| format!("recovering {}", log.display()))?;
        if args.json {
            reports.push(serde_json::json!({
                "app": app,
                "environment": environment,
                "recorded": recorded,
            }));
            continue;
        }
        match recorded {
            Some(envelope) => println!(
                "{app}/{environment}: {}; recorded as event {}",
                envelope.payload.describe(),
                envelope.seq
            ),
            None => println!("{app}/{environment}: nothing was lost"),
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// The event logs under `home` that `--app`/`--env` name (all when left out), as
/// (app, environment, path); none is an error.
fn logs_named(home: &Path, args: &RecoverArgs) -> anyhow::Result<Vec<(String, String, PathBuf)>> {
    let target = Target {
        app: args.app.clone(),
        environment: args.environment.clone(),
    };
    let logs = api::offline::logs(home, &target)?;
    if logs.is_empty() {
        bail!("no event log under {} matches", home.join("apps").display());
    }
    Ok(logs)
}

/// Stores a snapshot of each named log's state (`events::snapshot`): start-up then folds
/// only the events after it. The events themselves stay.
pub fn compact(home: &Path, args: RecoverArgs) -> anyhow::Result<ExitCode> {
    let mut done = Vec::new();
    for (app, environment, path) in logs_named(home, &args)? {
        let log = crate::events::EventLog::open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let seq = crate::events::snapshot::compact(&log)
            .with_context(|| format!("compacting {}", path.display()))?;
        if !args.json {
            say!("{app}/{environment}: snapshot at event {seq}; start-up folds only what follows");
        }
        done.push(serde_json::json!({"app": app, "environment": environment, "snapshot_at": seq}));
    }
    if args.json {
        say!("{}", serde_json::to_string_pretty(&done)?);
    }
    Ok(ExitCode::SUCCESS)
}
