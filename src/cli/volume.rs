//! `graven volumes` and `graven volume rm|export`: named volumes as the persistent data they
//! are. Removal and export refuse a volume a live instance holds.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use crate::runtime::local::LocalRuntime;

#[derive(Debug, clap::Args)]
pub struct VolumesArgs {
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum VolumeCommand {
    /// Delete a volume and its data (refused while a live instance holds it).
    Rm {
        name: String,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Write a volume's contents to a tar file (refused while a live instance holds it, so
    /// the copy is consistent: stop the service first).
    Export {
        name: String,
        /// The tar file to write (`-` for stdout).
        #[arg(short, long)]
        output: PathBuf,
    },
}

pub fn list(home: &Path, args: VolumesArgs) -> anyhow::Result<ExitCode> {
    let runtime = LocalRuntime::open(home)?;
    let volumes = runtime.volumes()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&volumes)?);
        return Ok(ExitCode::SUCCESS);
    }
    let width = volumes
        .iter()
        .map(|v| v.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    println!("{:<width$}  {:>10}  HELD BY", "NAME", "SIZE");
    for volume in &volumes {
        let holders: Vec<String> = volume
            .holders
            .iter()
            .map(|h| h.instance.clone().unwrap_or_else(|| h.id.to_string()))
            .collect();
        println!(
            "{:<width$}  {:>10}  {}",
            volume.name,
            super::image::human_size(volume.bytes),
            if holders.is_empty() {
                "-".to_owned()
            } else {
                holders.join(", ")
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(home: &Path, command: VolumeCommand) -> anyhow::Result<ExitCode> {
    let runtime = LocalRuntime::open(home)?;
    match command {
        VolumeCommand::Rm { name, json } => {
            let bytes = runtime.remove_volume(&name)?;
            if json {
                println!("{}", serde_json::json!({ "removed": name, "bytes": bytes }));
            } else {
                println!(
                    "removed volume {name} ({})",
                    super::image::human_size(bytes)
                );
            }
        }
        VolumeCommand::Export { name, output } => {
            if output.as_os_str() == "-" {
                runtime.export_volume(&name, std::io::stdout().lock())?;
            } else {
                // Written aside and renamed: a failed export leaves no partial file behind.
                let dir = output
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                let temp = tempfile::NamedTempFile::new_in(dir)
                    .with_context(|| format!("creating a file in {}", dir.display()))?;
                runtime.export_volume(&name, std::io::BufWriter::new(temp.as_file()))?;
                temp.as_file().sync_all()?;
                temp.persist(&output)
                    .with_context(|| format!("writing {}", output.display()))?;
                eprintln!("exported volume {name} to {}", output.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
