//! The CLI owns argument parsing, progress display and `--json` output. It calls into the
//! other modules and holds no logic of its own; `anyhow` is allowed here and in main.rs only.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bake;
mod image;
mod instance;
mod load;
mod project;
mod proxy;

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
    /// Inspect, export or remove an image.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Remove blobs no tag or release refers to.
    Gc(image::GcArgs),
    /// Serve one route over fixed backends (for benchmarks).
    #[command(name = "__proxy", hide = true)]
    Proxy(proxy::ProxyArgs),
    /// A keep-alive HTTP load generator for tests and benchmarks.
    #[command(name = "__load", hide = true)]
    Load(load::LoadArgs),
}

impl Cli {
    pub fn home(&self) -> PathBuf {
        self.home
            .clone()
            .unwrap_or_else(crate::store::Store::default_home)
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let home = cli.home();
    let result = match cli.command {
        Command::Bake(args) => bake::run(&home, args),
        Command::Images(args) => image::images(&home, args),
        Command::Image(command) => image::run(&home, command),
        Command::Gc(args) => image::gc(&home, args),
        Command::Proxy(args) => proxy::run(args),
        Command::Load(args) => load::run(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("graven: {error:#}");
            ExitCode::FAILURE
        }
    }
}
