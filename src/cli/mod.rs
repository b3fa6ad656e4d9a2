//! The CLI owns argument parsing, progress display and `--json` output. It calls into the
//! other modules and holds no logic of its own; `anyhow` is allowed here and in main.rs only.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod bake;
mod chaos;
mod drift;
mod events;
mod image;
mod instance;
// Test and benchmark tools, built only with the `dev-tools` feature (Cargo.toml says when).
#[cfg(feature = "dev-tools")]
mod load;
mod logs;
mod project;
#[cfg(feature = "dev-tools")]
mod proxy;
mod registry;
mod render;
mod secrets;
#[cfg(feature = "dev-tools")]
mod synthetic;
mod volume;

#[derive(Debug, Parser)]
#[command(
    name = "graven",
    version,
    about = "Immutable deployments from one binary"
)]
pub struct Cli {
    /// graven's data directory (store, instances, volumes, event log).
    #[arg(long, global = true, env = "GRAVEN_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Bake a Containerfile into an image in the local store.
    Bake(bake::BakeArgs),
    /// List the images in the local store.
    Images(image::ImagesArgs),
    /// Inspect, export, push, pull or remove an image.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Remove blobs no tag or release refers to.
    Gc(image::GcArgs),
    /// Start an instance of an image on the local runtime.
    Run(instance::RunArgs),
    /// List instances.
    Ps(instance::PsArgs),
    /// Stop an instance: its stop signal, a grace period, then SIGKILL.
    Stop(instance::StopArgs),
    /// Remove exited instances (their logs and volumes stay).
    Rm(instance::RmArgs),
    /// Break-glass: run a command inside an instance, which taints it.
    Exec(instance::ExecArgs),
    /// Instances found changed from their image (drift), and those condemned for it.
    Drift(drift::DriftArgs),
    /// Planned failures: one experiment now (`run`), or every experiment and what users
    /// saw during it (`report`).
    Chaos(chaos::ChaosArgs),
    /// Run the control plane for a project in the foreground: build, bake, deploy, route,
    /// keep healthy. Ctrl-C (or SIGTERM, or the terminal closing) drains and stops every
    /// instance. `--detach` runs it in the background instead.
    Up(project::UpArgs),
    /// Run the control plane without a project, for `graven deploy` from several apps;
    /// `graven daemon stop` stops the one running on this home.
    Daemon(project::DaemonArgs),
    /// Build, bake and roll out a new release of the project's services.
    Deploy(project::DeployArgs),
    /// Write an environment's manifests for another runtime (`--runtime kubernetes`).
    Render(render::RenderArgs),
    /// Roll back to the previous release (or `--to N`) through the same rolling path.
    Rollback(project::RollbackArgs),
    /// Services, their wanted release, deploys in progress and instances.
    Status(project::TargetArgs),
    /// Every release, numbered per environment; `*` marks the wanted one.
    Releases(project::TargetArgs),
    /// Every event in the log: releases, deploys, instances, rollbacks and why.
    History(project::TargetArgs),
    /// Instances' output from the log store, merged in time order; `-f` follows it.
    Logs(logs::LogsArgs),
    /// Drain and stop every service of an app.
    Down(project::TargetArgs),
    /// Accept event logs whose end was lost: record the loss and number on after it.
    Recover(project::RecoverArgs),
    /// Store a snapshot of each event log's folded state, so start-up reads only what
    /// follows it (the control plane also does this every 10,000 events).
    Compact(project::RecoverArgs),
    /// Named volumes: their size and the instances that hold them.
    Volumes(volume::VolumesArgs),
    /// Remove or export a named volume (refused while a live instance holds it).
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// The app event log: its state, its events (`tail -f`), an append, compaction.
    #[command(subcommand_value_name = "ACTION")]
    Events(events::EventsArgs),
    /// Set, list and remove the secrets graven.toml refers to (no daemon needed).
    #[command(subcommand)]
    Secrets(secrets::SecretsCommand),
    /// Serve one route over fixed backends (for benchmarks).
    #[cfg(feature = "dev-tools")]
    #[command(name = "__proxy", hide = true)]
    Proxy(proxy::ProxyArgs),
    /// A keep-alive HTTP load generator for tests and benchmarks.
    #[cfg(feature = "dev-tools")]
    #[command(name = "__load", hide = true)]
    Load(load::LoadArgs),
    /// Appends a long synthetic history to an event log (for the start-up benchmark).
    #[cfg(feature = "dev-tools")]
    #[command(name = "__synthetic-history", hide = true)]
    SyntheticHistory(synthetic::SyntheticArgs),
}

impl Command {
    /// Long-running servers must see a closed peer as an error on that one connection, so
    /// they keep Rust's ignored SIGPIPE (so does `run`, which must stop its instance on the
    /// way out); every other command only prints.
    fn serves(&self) -> bool {
        match self {
            Command::Up(_) | Command::Daemon(_) | Command::Run(_) => true,
            #[cfg(feature = "dev-tools")]
            Command::Proxy(_) | Command::Load(_) => true,
            _ => false,
        }
    }

    /// Commands that serve routes, which take their share of the descriptor limit.
    fn routes(&self) -> bool {
        match self {
            Command::Up(_) | Command::Daemon(_) => true,
            #[cfg(feature = "dev-tools")]
            Command::Proxy(_) => true,
            _ => false,
        }
    }

    /// Every command but the test tools reads or writes the home.
    fn uses_home(&self) -> bool {
        match self {
            #[cfg(feature = "dev-tools")]
            Command::Proxy(_) | Command::Load(_) => false,
            _ => true,
        }
    }
}

/// A command whose output is piped into `head` should end quietly when the pipe closes, as
/// Unix tools do, instead of panicking on the failed write.
fn restore_default_sigpipe() {
    // SAFETY: called on the main thread before any other thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE and no handler code is installed.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// How many threads a command's async runtime gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Threads {
    /// Client commands wait on a few files and one socket; starting worker threads would
    /// only add to their time (`graven run -d` is timed against `docker run`).
    One,
    /// The daemon serves the proxy and the controller on every core.
    All,
}

fn async_runtime(threads: Threads) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread(),
        Threads::All => tokio::runtime::Builder::new_multi_thread(),
    };
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}

impl Cli {
    /// The home as given, made absolute (paths under it are recorded and shown).
    pub fn home(&self) -> PathBuf {
        let home = self
            .home
            .clone()
            .unwrap_or_else(crate::store::Store::default_home);
        std::path::absolute(&home).unwrap_or(home)
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let home = cli.home();
    if !cli.command.serves() {
        restore_default_sigpipe();
    }
    // Owner-only before any command writes to it, whichever comes first: it will hold image
    // content (`LocalRuntime::make_home` says why).
    if cli.command.uses_home()
        && let Err(error) = crate::runtime::local::make_home(&home)
    {
        eprintln!("graven: {error}");
        return ExitCode::FAILURE;
    }
    if cli.command.routes() {
        // Before any thread exists: routes take their share of descriptors from this limit.
        crate::proxy::limits::raise_nofile();
    }
    let result = match cli.command {
        Command::Bake(args) => bake::run(&home, args),
        Command::Images(args) => image::images(&home, args),
        Command::Image(command) => image::run(&home, command),
        Command::Gc(args) => image::gc(&home, args),
        Command::Run(args) => instance::run(&home, args),
        Command::Ps(args) => instance::ps(&home, args),
        Command::Stop(args) => instance::stop(&home, args),
        Command::Rm(args) => instance::rm(&home, args),
        Command::Exec(args) => instance::exec(&home, args),
        Command::Drift(args) => drift::drift(&home, args),
        Command::Chaos(args) => chaos::run(&home, args),
        Command::Up(args) => project::up(&home, args),
        Command::Daemon(args) => project::daemon(&home, args),
        Command::Deploy(args) => project::deploy(&home, args),
        Command::Rollback(args) => project::rollback(&home, args),
        Command::Render(args) => render::render(&home, args),
        Command::Status(args) => project::status(&home, args),
        Command::Releases(args) => project::releases(&home, args),
        Command::History(args) => project::history(&home, args),
        Command::Logs(args) => logs::logs(&home, args),
        Command::Down(args) => project::down(&home, args),
        Command::Recover(args) => project::recover(&home, args),
        Command::Compact(args) => project::compact(&home, args),
        Command::Events(args) => events::run(&home, args),
        Command::Volumes(args) => volume::list(&home, args),
        Command::Volume(command) => volume::run(&home, command),
        Command::Secrets(command) => secrets::run(&home, command),
        #[cfg(feature = "dev-tools")]
        Command::Proxy(args) => proxy::run(args),
        #[cfg(feature = "dev-tools")]
        Command::Load(args) => load::run(args),
        #[cfg(feature = "dev-tools")]
        Command::SyntheticHistory(args) => synthetic::run(&home, args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            // Not `eprintln!`: `up` and `daemon` keep SIGPIPE ignored, and a closed stderr
            // must not turn a clean failure into a panic (exit 101).
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "graven: {}", report(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: many of graven's errors already name their
/// source in their own message (`baking DIR: FILE:LINE: …`), so a cause whose text the
/// report holds is not appended again (`{:#}` would print the location twice).
pub(crate) fn report(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}
