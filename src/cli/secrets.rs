//! `graven secrets set`, `list`, `rm`: the secret store of an app's environment, worked on
//! directly (no daemon needed), and `pin`, which gives a deploy the version of each secret
//! its services name. A value is read from stdin or a file, never from the command line,
//! which every user of the host can read in `ps`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;

use crate::secrets::{MAX_VALUE_BYTES, Secrets};
use crate::spec::{self, DEFAULT_ENVIRONMENT};

#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Set a secret's value (a new version), read from stdin or `--from-file`.
    Set(SetArgs),
    /// The secrets of an app's environment: name, latest version, when it was set.
    List(ListArgs),
    /// Remove a secret and every version of it.
    Rm(RmArgs),
}

#[derive(Debug, clap::Args)]
pub struct ScopeArgs {
    /// The app (default: the one of ./graven.toml).
    #[arg(long)]
    pub app: Option<String>,
    /// The environment.
    #[arg(long = "env", default_value = DEFAULT_ENVIRONMENT)]
    pub environment: String,
}

#[derive(Debug, clap::Args)]
pub struct SetArgs {
    /// The secret's name, as graven.toml refers to it: `{ secret = "NAME" }`.
    pub name: String,
    /// Read the value from this file, byte for byte (default: stdin, without its last
    /// newline).
    #[arg(long, value_name = "PATH")]
    pub from_file: Option<PathBuf>,
    #[command(flatten)]
    pub scope: ScopeArgs,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RmArgs {
    pub name: String,
    #[command(flatten)]
    pub scope: ScopeArgs,
}

pub fn run(home: &Path, command: SecretsCommand) -> anyhow::Result<ExitCode> {
    match command {
        SecretsCommand::Set(args) => set(home, args),
        SecretsCommand::List(args) => list(home, args),
        SecretsCommand::Rm(args) => rm(home, args),
    }
}

/// The store `--app`/`--env` name, the app defaulting to the one of ./graven.toml.
fn open(home: &Path, scope: &ScopeArgs) -> anyhow::Result<Secrets> {
    let app = match &scope.app {
        Some(app) => app.clone(),
        None => {
            let project = spec::load(Path::new("."), &scope.environment).map_err(|errors| {
                anyhow::anyhow!("{errors}\ngraven: name the app with --app, or fix graven.toml")
            })?;
            project.app
        }
    };
    Ok(Secrets::open(home, &app, &scope.environment)?)
}

fn set(home: &Path, args: SetArgs) -> anyhow::Result<ExitCode> {
    crate::secrets::check_name(&args.name)?;
    let secrets = open(home, &args.scope)?;
    let value = match &args.from_file {
        Some(path) => read_bounded(
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        )
        .with_context(|| format!("reading {}", path.display()))?,
        None => read_stdin(&args.name)?,
    };
    let version = secrets.set(&args.name, &value)?;
    println!(
        "graven: secret {} of {} is at version {version}; deploy to use it",
        args.name,
        secrets.scope()
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads at most one byte more than a secret may hold, so a huge input fails as too large
/// without being read whole.
fn read_bounded(reader: impl Read) -> std::io::Result<Vec<u8>> {
    let mut value = Vec::new();
    reader
        .take(MAX_VALUE_BYTES as u64 + 1)
        .read_to_end(&mut value)?;
    Ok(value)
}

/// The value on stdin without its last newline (what `echo` and a typed line end with). On
/// a terminal, one line is read without echo.
fn read_stdin(name: &str) -> anyhow::Result<Vec<u8>> {
    let stdin = std::io::stdin();
    let terminal = rustix::termios::isatty(&stdin);
    let mut value = if terminal {
        eprint!("value of secret {name}: ");
        let echo = EchoOff::new(&stdin);
        let mut line = String::new();
        stdin.read_line(&mut line).context("reading stdin")?;
        drop(echo);
        eprintln!();
        line.into_bytes()
    } else {
        read_bounded(stdin.lock()).context("reading stdin")?
    };
    if value.ends_with(b"\n") {
        value.pop();
        if value.ends_with(b"\r") {
            value.pop();
        }
    }
    if terminal && value.is_empty() {
        bail!("no value typed: secret {name} is unchanged");
    }
    Ok(value)
}

/// The terminal's echo turned off until dropped, so a typed value is not shown.
struct EchoOff<'a> {
    stdin: &'a std::io::Stdin,
    saved: Option<rustix::termios::Termios>,
}

impl<'a> EchoOff<'a> {
    fn new(stdin: &'a std::io::Stdin) -> EchoOff<'a> {
        use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
        let saved = tcgetattr(stdin).ok();
        if let Some(saved) = &saved {
            let mut quiet = saved.clone();
            quiet.local_modes.remove(LocalModes::ECHO);
            let _ = tcsetattr(stdin, OptionalActions::Now, &quiet);
        }
        EchoOff { stdin, saved }
    }
}

impl Drop for EchoOff<'_> {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = rustix::termios::tcsetattr(
                self.stdin,
                rustix::termios::OptionalActions::Now,
                saved,
            );
        }
    }
}

fn list(home: &Path, args: ListArgs) -> anyhow::Result<ExitCode> {
    let secrets = open(home, &args.scope)?;
    let listed = secrets.list()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&listed)?);
        return Ok(ExitCode::SUCCESS);
    }
    if listed.is_empty() {
        println!("no secrets in {}", secrets.scope());
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<32} {:>7}  SET", "NAME", "VERSION");
    for secret in listed {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(secret.set_at_ms);
        println!(
            "{:<32} {:>7}  {}",
            secret.name,
            secret.version,
            humantime::format_rfc3339_seconds(at)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn rm(home: &Path, args: RmArgs) -> anyhow::Result<ExitCode> {
    let secrets = open(home, &args.scope)?;
    secrets.remove(&args.name)?;
    println!(
        "graven: secret {} removed from {} (every version); a release that refers to it \
         starts no new instance",
        args.name,
        secrets.scope()
    );
    Ok(ExitCode::SUCCESS)
}
