//! `graven up`, `daemon`, `deploy`, `rollback`, `status`, `releases`, `history`, `down`:
//! the project commands. `up` and `daemon` run the control plane in this process; the others
//! talk to it over the API socket. Building and baking happen here, in the CLI process,
//! before the daemon is asked for anything, so a failed bake never touches what runs.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use super::{Threads, async_runtime};
use crate::api::{self, Client, Daemon, DeployRequest, HistoryRequest, RollbackRequest, Target};
use crate::controller::{Rollout, ServiceRelease, Snapshot};
use crate::events::{DeployOutcome, Envelope, Event, ServiceConfig};
use crate::runtime::{AnyRuntime, FakeRuntime, LocalRuntime};
use crate::spec::{self, DEFAULT_ENVIRONMENT, Project};
use crate::store::Digest;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeKind {
    Local,
    /// In-memory instances inside the daemon (tests).
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
    // `up` runs the same control plane as `daemon`, with its options.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    #[arg(
        long,
        value_enum,
        default_value = "local",
        env = "GRAVEN_RUNTIME",
        hide = true
    )]
    pub runtime: RuntimeKind,
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
}

fn open_runtime(home: &Path, kind: RuntimeKind) -> anyhow::Result<AnyRuntime> {
    Ok(match kind {
        RuntimeKind::Local => AnyRuntime::Local(LocalRuntime::open(home)?),
        RuntimeKind::Fake => AnyRuntime::Fake(FakeRuntime::new()),
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

/// Ctrl-C and SIGTERM, caught from the moment this is made: from then on neither ends the
/// process at once, so instances started after it are always drained and stopped.
struct StopSignal {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignal {
    /// Installs the handlers; must run inside the tokio runtime.
    fn install() -> anyhow::Result<StopSignal> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignal {
            interrupt: signal(SignalKind::interrupt()).context("catching SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("catching SIGTERM")?,
        })
    }

    /// Resolves when the process is asked to stop.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// Loads graven.toml, printing every problem it has.
fn load_project(dir: &Path, environment: &str) -> anyhow::Result<Project> {
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("project directory {}", dir.display()))?;
    spec::load(&dir, environment).map_err(|errors| anyhow::anyhow!("{errors}"))
}

/// Pins the secrets each service names (first: a missing one fails before any work), runs
/// the build step, bakes the image, and describes each service's next release.
fn prepare(home: &Path, project: &Project) -> anyhow::Result<Vec<ServiceRelease>> {
    let mut pinned = super::secrets::pin(home, project)?;
    if let Some(build) = &project.build {
        note!("graven: build: {}", build.command);
        let mut command = std::process::Command::new("sh");
        command
            .arg("-c")
            .arg(&build.command)
            .current_dir(&project.dir)
            .stdout(Stdio::from(std::io::stderr()));
        if let Some(restore) = crate::proxy::limits::restore_in_child() {
            // SAFETY: the hook only calls getrlimit and setrlimit, which are async-signal-safe
            // and allocate nothing.
            unsafe { std::os::unix::process::CommandExt::pre_exec(&mut command, restore) };
        }
        let status = command
            .status()
            .with_context(|| format!("running the build step {:?}", build.command))?;
        if !status.success() {
            bail!("the build step {:?} failed ({status})", build.command);
        }
    }
    let image = bake(home, project)?;
    Ok(project
        .services
        .values()
        .map(|service| {
            let pinned = pinned.remove(&service.name).expect("pinned per service");
            ServiceRelease {
                service: service.name.clone(),
                image: image.clone(),
                config_digest: pinned.config_digest.to_string(),
                config: ServiceConfig {
                    secrets: pinned.secrets,
                    ..ServiceConfig::from(service)
                },
            }
        })
        .collect())
}

/// Bakes the project's image (every unchanged step comes from the cache) and tags it
/// `<app>:<environment>`.
fn bake(home: &Path, project: &Project) -> anyhow::Result<Digest> {
    let options = crate::bake::BakeOptions {
        context: project.dir.join(&project.image.context),
        containerfile: Some(project.dir.join(&project.image.containerfile)),
        tag: format!("{}:{}", project.app, project.environment),
        build_args: BTreeMap::new(),
        epoch: 0,
    };
    let mut progress = |event: crate::bake::Progress<'_>| {
        if let crate::bake::Progress::Finished {
            step,
            total,
            text,
            cached,
        } = event
        {
            let how = if cached { "cached" } else { "done" };
            note!("graven: bake [{step}/{total}] {text}  {how}");
        }
    };
    let baked = crate::bake::bake(home, &options, &mut progress)
        .with_context(|| format!("baking {}", options.context.display()))?;
    Ok(baked.digest)
}

/// How one service's rollout ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub service: String,
    pub release: u64,
    #[serde(flatten)]
    pub outcome: DeployOutcome,
}

#[derive(Debug, Serialize)]
struct DeployReport<'a> {
    app: &'a str,
    environment: &'a str,
    rollout: &'a Rollout,
    outcomes: &'a [Outcome],
    routes: BTreeMap<String, String>,
}

/// Prints the rollout's events as they are appended until every started deploy has ended.
async fn follow<F, Fut>(
    rollout: &Rollout,
    quiet: bool,
    mut history: F,
) -> anyhow::Result<Vec<Outcome>>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = anyhow::Result<Vec<Envelope<Event>>>>,
{
    let mut pending: BTreeMap<String, u64> = rollout
        .started
        .iter()
        .map(|s| (s.service.clone(), s.to))
        .collect();
    let mut outcomes = Vec::new();
    let mut after = rollout.after_seq;
    while !pending.is_empty() {
        let events = history(after).await?;
        if events.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        for envelope in events {
            after = envelope.seq;
            if !quiet {
                note!("  {}", envelope.payload.describe());
            }
            let ended = match &envelope.payload {
                Event::DeploySucceeded { service, release } => Some((
                    service,
                    *release,
                    DeployOutcome::Succeeded {
                        at_ms: envelope.at_ms,
                    },
                )),
                Event::DeployRolledBack {
                    service,
                    from,
                    reason,
                    ..
                } => Some((
                    service,
                    *from,
                    DeployOutcome::RolledBack {
                        at_ms: envelope.at_ms,
                        reason: reason.clone(),
                    },
                )),
                Event::DeployStarted { service, to, .. } if pending.get(service) != Some(to) => {
                    Some((
                        service,
                        pending.get(service).copied().unwrap_or(*to),
                        DeployOutcome::Superseded {
                            at_ms: envelope.at_ms,
                        },
                    ))
                }
                Event::ServiceRemoved { service } => Some((
                    service,
                    pending.get(service).copied().unwrap_or_default(),
                    DeployOutcome::Superseded {
                        at_ms: envelope.at_ms,
                    },
                )),
                _ => None,
            };
            if let Some((service, release, outcome)) = ended
                && pending.get(service) == Some(&release)
            {
                pending.remove(service);
                outcomes.push(Outcome {
                    service: service.clone(),
                    release,
                    outcome,
                });
            }
        }
    }
    Ok(outcomes)
}

/// Prints the outcome of a rollout; the exit code says whether every deploy succeeded.
fn report(
    json: bool,
    app: &str,
    environment: &str,
    rollout: &Rollout,
    outcomes: &[Outcome],
    snapshot: Option<&Snapshot>,
) -> anyhow::Result<ExitCode> {
    let routes: BTreeMap<String, String> = snapshot
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
        for outcome in outcomes {
            match &outcome.outcome {
                DeployOutcome::Succeeded { .. } => {
                    say!(
                        "{}: release {} is serving",
                        outcome.service,
                        outcome.release
                    )
                }
                DeployOutcome::RolledBack { reason, .. } => say!(
                    "{}: release {} rolled back: {reason}",
                    outcome.service,
                    outcome.release
                ),
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
    let project = load_project(&args.dir, &args.environment)?;
    let runtime = async_runtime(Threads::All)?;
    let code = runtime.block_on(async {
        // Before anything can start an instance: a stop asked for during the bake or the
        // first rollout must still drain what was started.
        let mut stop = StopSignal::install()?;
        let listener = api::bind(home).await?;
        let daemon = Daemon::open(home, open_runtime(home, args.daemon.runtime)?)?;
        let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(daemon.clone().serve(listener, async {
            let _ = api_stopped.await;
        }));
        let result = async {
            let handle = daemon.controller(&project.app, &project.environment)?;
            let home = home.to_owned();
            let releases = {
                let project = project.clone();
                tokio::task::spawn_blocking(move || prepare(&home, &project)).await??
            };
            let rollout = handle.deploy(releases).await?;
            let outcomes = follow(&rollout, args.json, |after| {
                let handle = handle.clone();
                async move { Ok(handle.history(after).await?) }
            })
            .await?;
            let snapshot = handle.snapshot();
            report(
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
                    note!(
                        "graven: serving {}/{}; Ctrl-C stops",
                        project.app, project.environment
                    );
                    stop.recv().await;
                    code
                }
                Err(error) => {
                    note!("graven: {error:#}");
                    ExitCode::FAILURE
                }
            },
            () = stop.recv() => {
                note!("graven: stopped before the rollout finished");
                ExitCode::FAILURE
            }
        };
        note!("graven: draining and stopping every instance");
        daemon.shutdown().await;
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
    let runtime = async_runtime(Threads::All)?;
    runtime.block_on(async {
        let mut stop = StopSignal::install()?;
        let listener = api::bind(home).await?;
        let daemon: Arc<Daemon> = Daemon::open(home, open_runtime(home, args.runtime)?)?;
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

async fn finish(client: &Client, accepted: api::Accepted, json: bool) -> anyhow::Result<ExitCode> {
    let target = accepted.target();
    let outcomes = follow(&accepted.rollout, json, |after| {
        let request = HistoryRequest {
            target: target.clone(),
            after,
        };
        let client = client.clone();
        async move { Ok(client.history(&request).await?) }
    })
    .await?;
    let snapshot = client.status(&target).await?.into_iter().next();
    report(
        json,
        &accepted.app,
        &accepted.environment,
        &accepted.rollout,
        &outcomes,
        snapshot.as_ref(),
    )
}

pub fn deploy(home: &Path, args: DeployArgs) -> anyhow::Result<ExitCode> {
    let project = load_project(&args.dir, &args.environment)?;
    let client = Client::new(home);
    let runtime = async_runtime(Threads::One)?;
    // Check the daemon is there before spending time on a build.
    runtime.block_on(client.status(&Target::default()))?;
    let services = prepare(home, &project)?;
    runtime.block_on(async {
        let accepted = client
            .deploy(&DeployRequest {
                app: project.app.clone(),
                environment: project.environment.clone(),
                services,
            })
            .await?;
        finish(&client, accepted, args.json).await
    })
}

pub fn rollback(home: &Path, args: RollbackArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(home);
    async_runtime(Threads::One)?.block_on(async {
        let accepted = client
            .rollback(&RollbackRequest {
                target: args.target.target(),
                service: args.service,
                to: args.to,
            })
            .await?;
        finish(&client, accepted, args.target.json).await
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

pub fn status(home: &Path, args: TargetArgs) -> anyhow::Result<ExitCode> {
    let snapshots =
        async_runtime(Threads::One)?.block_on(Client::new(home).status(&args.target()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&snapshots)?);
        return Ok(ExitCode::SUCCESS);
    }
    if snapshots.is_empty() {
        println!("nothing is deployed");
    }
    for snapshot in &snapshots {
        println!("{}/{}", snapshot.app, snapshot.environment);
        if let Some(problem) = &snapshot.log_problem {
            let since = std::time::UNIX_EPOCH + Duration::from_millis(problem.since_ms);
            println!(
                "  the event log cannot be written since {} ({}): routes serve the last known \
                 state, nothing new is done, retrying",
                humantime::format_rfc3339_seconds(since),
                problem.error
            );
        }
        for (name, service) in &snapshot.state.services {
            let wanted = service
                .wanted
                .map_or("none".to_owned(), |w| format!("release {w}"));
            let route = snapshot
                .routes
                .get(name)
                .map(|a| format!(" http://{a}"))
                .unwrap_or_default();
            println!("  service {name}: {wanted}{route}");
            if let Some(deploy) = &service.deploy {
                println!(
                    "    {} in progress: {} -> {}",
                    deploy.reason,
                    deploy.from.map_or("none".to_owned(), |f| f.to_string()),
                    deploy.to
                );
            }
            if let Some(backoff) = &service.backoff {
                println!(
                    "    crash loop: {} failures, launches wait {}",
                    backoff.failures,
                    humantime::format_duration(Duration::from_millis(backoff.delay_ms))
                );
            }
            if let Some(error) = snapshot.route_errors.get(name) {
                println!("    route error: {error}");
            }
            for instance in snapshot.state.instances_of(name) {
                println!(
                    "    {:<16} release {:<4} {:<10} {:<22} {}",
                    instance.name,
                    instance.release,
                    format!("{:?}", instance.lifecycle).to_lowercase(),
                    instance.address.map_or("-".to_owned(), |a| a.to_string()),
                    instance.runtime_id.as_ref().map_or("-", |id| id.0.as_str()),
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn releases(home: &Path, args: TargetArgs) -> anyhow::Result<ExitCode> {
    let snapshots =
        async_runtime(Threads::One)?.block_on(Client::new(home).status(&args.target()))?;
    if args.json {
        let releases: Vec<_> = snapshots
            .iter()
            .flat_map(|s| s.state.releases.values())
            .collect();
        println!("{}", serde_json::to_string_pretty(&releases)?);
        return Ok(ExitCode::SUCCESS);
    }
    for snapshot in &snapshots {
        println!("{}/{}", snapshot.app, snapshot.environment);
        for release in snapshot.state.releases.values() {
            let wanted = snapshot
                .state
                .services
                .get(&release.service)
                .and_then(|s| s.wanted)
                == Some(release.number);
            println!(
                "  {} {:<4} {:<12} image {} config {}",
                if wanted { "*" } else { " " },
                release.number,
                release.service,
                release.image.short(),
                release
                    .config_digest
                    .get(7..19)
                    .unwrap_or(&release.config_digest),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn history(home: &Path, args: TargetArgs) -> anyhow::Result<ExitCode> {
    let events =
        async_runtime(Threads::One)?.block_on(Client::new(home).history(&HistoryRequest {
            target: args.target(),
            after: 0,
        }))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&events)?);
        return Ok(ExitCode::SUCCESS);
    }
    for envelope in &events {
        let at = std::time::UNIX_EPOCH + Duration::from_millis(envelope.at_ms);
        println!(
            "{:>5} {} {}",
            envelope.seq,
            humantime::format_rfc3339_millis(at),
            envelope.payload.describe()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Records the loss in every event log (of the app and environment asked) whose end was
/// lost, so the daemon starts on it again; release, instance and sequence numbers go on after
/// the highest one the log's mark records. Logs that lost nothing are left as they are.
pub fn recover(home: &Path, args: RecoverArgs) -> anyhow::Result<ExitCode> {
    let apps = home.join("apps");
    let mut logs = Vec::new();
    for app in read_dir_names(&apps)? {
        if args.app.as_ref().is_some_and(|a| *a != app) {
            continue;
        }
        for environment in read_dir_names(&apps.join(&app))? {
            let log = api::log_path(home, &app, &environment);
            if args.environment.as_ref().is_none_or(|e| *e == environment) && log.is_file() {
                logs.push((app.clone(), environment, log));
            }
        }
    }
    if logs.is_empty() {
        bail!("no event log under {} matches", apps.display());
    }
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
        match recorded {
            Some(envelope) => println!(
                "{app}/{environment}: {}; recorded as event {}",
                envelope.payload.describe(),
                envelope.seq
            ),
            None => println!("{app}/{environment}: nothing was lost"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The names of the directories in `dir` (none when it does not exist).
fn read_dir_names(dir: &Path) -> anyhow::Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).with_context(|| format!("reading {}", dir.display())),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        if entry.path().is_dir()
            && let Ok(name) = entry.file_name().into_string()
        {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}
