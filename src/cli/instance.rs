//! `graven run / ps / stop / rm / exec`: instances on the embedded local runtime, for
//! debugging and scripts (services and deploys are the controller's).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};

use super::{Threads, async_runtime};
use crate::controller::{LABEL_APP, LABEL_ENVIRONMENT, LABEL_INSTANCE};
use crate::logs::{Cursor, Follower, Query, Stream};
use crate::runtime::{
    Instance, InstanceId, InstanceSpec, InstanceStatus, Limits, LocalRuntime, Runtime, TmpfsMount,
    VolumeMount,
};
use crate::spec;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The image: a tag, a digest, or a unique digest prefix.
    pub image: String,
    /// The port the instance listens on in its own network (default 8080); with `--network
    /// host`, a fixed host port (default: a free one graven picks). It gets it as $PORT.
    #[arg(long, short)]
    pub port: Option<u16>,
    /// `private` (default: a network of its own, with its own address) or `host` (the
    /// host's network, on a free port).
    #[arg(long, value_parser = ["private", "host"], default_value = "private")]
    pub network: String,
    /// In its own network, allow no connection beyond graven's bridge.
    #[arg(long)]
    pub no_outbound: bool,
    /// Environment variables, added to the image's.
    #[arg(long = "env", short, value_name = "K=V")]
    pub env: Vec<String>,
    /// Named volumes from $GRAVEN_HOME/volumes, mounted read-write.
    #[arg(long = "volume", short, value_name = "NAME:/path")]
    pub volumes: Vec<String>,
    /// A size-capped tmpfs at PATH (SIZE default 64M), writable on the read-only root.
    #[arg(long, value_name = "PATH[:SIZE]")]
    pub tmpfs: Vec<String>,
    /// Run as this user (uid[:gid] or a name in the image) instead of the image's USER.
    #[arg(long, short)]
    pub user: Option<String>,
    /// The program to run instead of the image's ENTRYPOINT ("" for none); the image's CMD
    /// is then dropped unless a command is given, as with docker run.
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Memory limit: bytes, or with a unit (512M, 1GiB, 1GB; as in graven.toml).
    #[arg(long, value_parser = positive_size)]
    pub memory: Option<u64>,
    /// Maximum number of processes and threads (default 2048; 0: no limit, and no cgroup).
    #[arg(long)]
    pub pids: Option<u64>,
    /// CPU limit in thousandths of a core (1500 = one and a half cores).
    #[arg(long)]
    pub cpu_millis: Option<u64>,
    /// Size cap of /tmp and of /dev/shm: bytes, or with a unit (default 64M).
    #[arg(long, value_parser = positive_size)]
    pub tmp_size: Option<u64>,
    /// The most the logs of `graven run` instances keep on disk, all of them together, in
    /// the log store (default 256M); older ones go first.
    #[arg(long, value_parser = positive_size)]
    pub log_size: Option<u64>,
    /// How long the logs of `graven run` instances are kept in the log store (default 7d).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub log_age: Option<std::time::Duration>,
    /// Start it and print its id instead of following its output.
    #[arg(long, short)]
    pub detach: bool,
    /// Print the instance as JSON (with -d).
    #[arg(long)]
    pub json: bool,
    /// The command to run instead of the image's CMD (its ENTRYPOINT stays, as with docker
    /// run; see --entrypoint).
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct PsArgs {
    /// Also list exited instances.
    #[arg(long, short)]
    pub all: bool,
    /// Print the instances as JSON (with their labels: app, environment, service, …).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct StopArgs {
    pub id: String,
    /// How long to wait after the stop signal before killing.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RmArgs {
    pub ids: Vec<String>,
    /// Stop running instances first (SIGKILL, no grace).
    #[arg(long, short)]
    pub force: bool,
    /// Print the removed instances' ids as JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    pub id: String,
    /// The command to run inside the instance.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// A size limit as `graven.toml` reads it.
fn positive_size(text: &str) -> Result<u64, String> {
    crate::size::parse(text).and_then(spec::nonzero_size)
}

/// Resolves a full id or a unique prefix of one.
async fn find(runtime: &LocalRuntime, text: &str) -> anyhow::Result<InstanceId> {
    let ids: Vec<InstanceId> = runtime
        .list()
        .await?
        .into_iter()
        .map(|i| i.id)
        .filter(|id| id.0.starts_with(text))
        .collect();
    match ids.as_slice() {
        [id] => Ok(id.clone()),
        [] => bail!("no instance {text:?}"),
        _ => bail!("{text:?} matches {} instances", ids.len()),
    }
}

fn status_text(status: InstanceStatus) -> String {
    match status {
        InstanceStatus::Created => "created".to_owned(),
        InstanceStatus::Running => "running".to_owned(),
        InstanceStatus::Stopping => "stopping".to_owned(),
        InstanceStatus::Exited {
            code: Some(code), ..
        } => format!("exited ({code})"),
        InstanceStatus::Exited {
            signal: Some(signal),
            ..
        } => format!("exited (signal {signal})"),
        InstanceStatus::Exited { .. } => "exited (vanished)".to_owned(),
    }
}

fn exit_code(status: InstanceStatus) -> ExitCode {
    match status {
        InstanceStatus::Exited { code, signal } => exit_code_of(code, signal),
        _ => ExitCode::FAILURE,
    }
}

/// The exit code a shell gives a process that ended with `code` or was killed by `signal`.
fn exit_code_of(code: Option<i32>, signal: Option<i32>) -> ExitCode {
    match (code, signal) {
        (Some(code), _) => ExitCode::from(code.clamp(0, 255) as u8),
        (None, Some(signal)) => ExitCode::from((128 + signal).clamp(0, 255) as u8),
        (None, None) => ExitCode::FAILURE,
    }
}

fn warn(instance: &Instance) {
    for warning in &instance.warnings {
        eprintln!("graven: warning: instance {}: {warning}", instance.id);
    }
}

pub fn run(home: &Path, args: RunArgs) -> anyhow::Result<ExitCode> {
    let runtime = LocalRuntime::open(home)?;
    let image = runtime.store().resolve(&args.image)?;
    let mut spec = InstanceSpec::new(image);
    for pair in &args.env {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("--env {pair:?}: write it K=V"))?;
        spec.env.insert(key.to_owned(), value.to_owned());
    }
    for volume in &args.volumes {
        spec.volumes.push(VolumeMount::parse(volume)?);
    }
    spec.host_port = args.port;
    if args.network == "host" {
        spec.network = crate::runtime::NetworkMode::Host;
    }
    spec.outbound = !args.no_outbound;
    spec.user = args.user.clone();
    for tmpfs in &args.tmpfs {
        spec.tmpfs.push(TmpfsMount::parse(tmpfs)?);
    }
    spec.command = (!args.command.is_empty()).then(|| args.command.clone());
    spec.entrypoint = args
        .entrypoint
        .as_ref()
        .map(|e| [e.clone()].into_iter().filter(|e| !e.is_empty()).collect());
    spec.limits = Limits {
        memory_bytes: args.memory,
        pids: args.pids,
        cpu_millis: args.cpu_millis,
        tmp_bytes: args.tmp_size,
        log_bytes: args.log_size,
        log_age_s: args.log_age.map(|a| a.as_secs().max(1)),
    };
    // The first instance of an image unpacks it, which takes a while for a big one.
    if !runtime.is_prepared(&spec.image) {
        let started = std::time::Instant::now();
        eprintln!(
            "graven: unpacking {} for its first instance",
            spec.image.short()
        );
        runtime.prepare_blocking(&spec.image)?;
        eprintln!(
            "graven: unpacked {} in {} ms",
            spec.image.short(),
            started.elapsed().as_millis()
        );
    }
    // In the foreground the instance lives as long as this command, whose signals are caught
    // from before the start: one that comes while the instance starts stops it too, instead
    // of ending this command and leaving the instance running unfollowed.
    let foreground = if args.detach {
        None
    } else {
        let rt = async_runtime(Threads::One)?;
        let signals = {
            let _entered = rt.enter();
            Signals::catch()?
        };
        Some((rt, signals))
    };
    // Started without an async runtime: `run -d` is done as soon as the instance runs, and
    // is timed as an instance start (bench/instance_start.sh).
    let instance = runtime.start_blocking(spec)?;
    warn(&instance);
    if args.detach {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&instance)?);
        } else {
            println!("{}", instance.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(address) = instance.address {
        eprintln!("graven: instance {} on http://{address}", instance.id);
    }
    let (rt, signals) = foreground.context("a foreground run has its async runtime")?;
    rt.block_on(follow(&runtime, &instance, signals))
}

/// The signals that stop a foreground instance: Ctrl-C, SIGTERM and SIGHUP (its terminal
/// closing).
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Must be called inside the async runtime that will wait for them.
    fn catch() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("catching SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("catching SIGTERM")?,
            hangup: signal(SignalKind::hangup()).context("catching SIGHUP")?,
        })
    }
}

/// Streams the instance's log until it exits; Ctrl-C stops it (and a second one kills it).
async fn follow(
    runtime: &LocalRuntime,
    instance: &Instance,
    signals: Signals,
) -> anyhow::Result<ExitCode> {
    // The instance's own source in the log store, read as `graven logs -f` reads it.
    let query = Query {
        instance: Some(instance.id.0.clone()),
        ..Query::default()
    };
    let mut log = Follower::new(runtime.home(), query, Cursor::default());
    let mut interrupts = 0;
    // The instance lives as long as this command: Ctrl-C, SIGTERM and SIGHUP (its terminal
    // closing) stop it with its grace; a second one kills it.
    let Signals {
        mut interrupt,
        mut terminate,
        mut hangup,
    } = signals;
    loop {
        let mut exited = runtime.inspect(&instance.id).await?.status;
        if exited.is_exited() {
            // Its last lines are in the log once the shim is done with it.
            exited = runtime.logged(&instance.id).await?.status;
        }
        // A closed terminal makes writing fail: the instance is stopped all the same.
        print_new_lines(&mut log);
        if exited.is_exited() {
            note(format_args!(
                "graven: instance {} {}",
                instance.id,
                status_text(exited)
            ));
            return Ok(exit_code(exited));
        }
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
            _ = hangup.recv() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
        }
        interrupts += 1;
        let runtime = runtime.clone();
        let id = instance.id.clone();
        if interrupts == 1 {
            note(format_args!("graven: stopping {id} (Ctrl-C again to kill)"));
            tokio::spawn(async move { runtime.stop(&id, Duration::from_secs(10)).await });
        } else {
            tokio::spawn(async move { runtime.kill(&id).await });
        }
    }
}

/// A line on stderr; a failed write (the terminal gone) is dropped, not a panic that would
/// leave the instance running.
fn note(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Prints the instance's new lines as it wrote them, to stdout or stderr as it did. A
/// failed write (a closed terminal) is dropped: the instance is stopped all the same.
fn print_new_lines(log: &mut Follower) {
    let records = log.poll();
    if records.is_empty() {
        return;
    }
    let (mut stdout, mut stderr) = (std::io::stdout().lock(), std::io::stderr().lock());
    for record in records {
        let out: &mut dyn Write = match record.stream {
            Stream::Stdout => &mut stdout,
            Stream::Stderr => &mut stderr,
        };
        let _ = out.write_all(&record.line);
        let _ = out.write_all(b"\n");
    }
    let _ = stdout.flush();
    let _ = stderr.flush();
}

pub fn ps(home: &Path, args: PsArgs) -> anyhow::Result<ExitCode> {
    let runtime = LocalRuntime::open(home)?;
    let instances: Vec<Instance> = async_runtime(Threads::One)?
        .block_on(runtime.list())?
        .into_iter()
        .filter(|i| args.all || !i.status.is_exited())
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&instances)?);
        return Ok(ExitCode::SUCCESS);
    }
    // APP, ENV and NAME (the controller's name for the instance, which `graven status`
    // shows) are the labels a controller gives what it starts; `graven run` instances have
    // none. Each column is as wide as its longest value, so long names never run together.
    let label = |i: &Instance, key: &str| i.labels.get(key).cloned().unwrap_or("-".to_owned());
    let rows: Vec<[String; 9]> = instances
        .iter()
        .map(|i| {
            [
                i.id.to_string(),
                label(i, LABEL_APP),
                label(i, LABEL_ENVIRONMENT),
                label(i, LABEL_INSTANCE),
                i.image.short().to_string(),
                status_text(i.status),
                i.address.map(|a| a.to_string()).unwrap_or_default(),
                i.pid.map(|p| p.to_string()).unwrap_or_default(),
                if i.tainted { "yes" } else { "" }.to_owned(),
            ]
        })
        .collect();
    let header = [
        "ID", "APP", "ENV", "NAME", "IMAGE", "STATUS", "ADDRESS", "PID", "TAINTED",
    ]
    .map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn stop(home: &Path, args: StopArgs) -> anyhow::Result<ExitCode> {
    let runtime = LocalRuntime::open(home)?;
    async_runtime(Threads::One)?.block_on(async {
        let id = find(&runtime, &args.id).await?;
        let instance = runtime.stop(&id, args.grace).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&instance)?);
        } else {
            println!("{} {}", instance.id, status_text(instance.status));
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn rm(home: &Path, args: RmArgs) -> anyhow::Result<ExitCode> {
    let runtime = LocalRuntime::open(home)?;
    async_runtime(Threads::One)?.block_on(async {
        let mut removed = Vec::new();
        for text in &args.ids {
            let id = find(&runtime, text).await?;
            if args.force {
                runtime.kill(&id).await?;
            }
            runtime.remove(&id).await?;
            if !args.json {
                println!("{id}");
            }
            removed.push(id);
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&removed)?);
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn exec(home: &Path, args: ExecArgs) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::ExitStatusExt;
    let runtime = LocalRuntime::open(home)?;
    let id = async_runtime(Threads::One)?.block_on(find(&runtime, &args.id))?;
    eprintln!(
        "graven: break-glass exec into {id}: the instance is now tainted and must be replaced"
    );
    let status = runtime.exec(&id, args.command)?;
    Ok(exit_code_of(status.code(), status.signal()))
}
