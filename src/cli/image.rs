use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;

use crate::store::{Digest, ExportFormat, REF_NAME, Store};

#[derive(Debug, clap::Args)]
pub struct ImagesArgs {
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Print an image's manifest, config and size as JSON.
    Inspect {
        /// A tag, a digest or a unique digest prefix.
        reference: String,
    },
    /// Write an image to a tar file: an OCI archive, or a docker-archive for `docker load`.
    Export {
        /// A tag, a digest or a unique digest prefix.
        reference: String,
        #[arg(long, value_enum, default_value = "oci")]
        format: Format,
        /// The file to write.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
    /// Remove a tag (the blobs stay until `graven gc`).
    Rm {
        /// The tag to remove.
        tag: String,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Oci,
    Docker,
}

#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// Drop the bake cache too, so layers only the cache kept are freed.
    #[arg(long)]
    pub cache: bool,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct Listed {
    tag: String,
    digest: Digest,
    size: u64,
    created_from: Option<String>,
}

pub fn images(home: &Path, args: ImagesArgs) -> anyhow::Result<ExitCode> {
    let store = Store::open(home)?;
    let mut listed = Vec::new();
    for tagged in store.tags()? {
        let size = store.image(&tagged.digest)?.size;
        listed.push(Listed {
            tag: tagged.tag,
            digest: tagged.digest,
            size,
            created_from: tagged.created_from,
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&listed)?);
    } else {
        println!(
            "{:<30} {:<14} {:>10}  CREATED FROM",
            "TAG", "DIGEST", "SIZE"
        );
        for image in listed {
            println!(
                "{:<30} {:<14} {:>10}  {}",
                image.tag,
                image.digest.short(),
                human_size(image.size),
                image.created_from.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1}GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1}MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1}KiB", b as f64 / (1u64 << 10) as f64),
        b => format!("{b}B"),
    }
}

pub fn run(home: &Path, command: ImageCommand) -> anyhow::Result<ExitCode> {
    let store = Store::open(home)?;
    match command {
        ImageCommand::Inspect { reference } => {
            let digest = store.resolve(&reference)?;
            let image = store.image(&digest)?;
            let tags: Vec<String> = store
                .tags()?
                .into_iter()
                .filter(|t| t.digest == digest)
                .map(|t| t.tag)
                .collect();
            let out = serde_json::json!({
                "digest": digest,
                "tags": tags,
                "size": image.size,
                "manifest": image.manifest,
                "config": image.config,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        ImageCommand::Export {
            reference,
            format,
            output,
        } => {
            let digest = store.resolve(&reference)?;
            // The archive names the image by the tag asked for, else by a tag it has.
            let tags = store.tags()?;
            let tag =
                if Digest::parse(&reference).is_ok() || tags.iter().all(|t| t.tag != reference) {
                    tags.into_iter()
                        .find(|t| t.digest == digest)
                        .map(|t| t.tag)
                        .unwrap_or_else(|| format!("graven:{}", digest.short()))
                } else {
                    reference.clone()
                };
            let format = match format {
                Format::Oci => ExportFormat::Oci,
                Format::Docker => ExportFormat::Docker,
            };
            let dir = output
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let mut temp = tempfile::Builder::new()
                .prefix(".graven-export-")
                .tempfile_in(dir)
                .with_context(|| format!("cannot write in {}", dir.display()))?;
            store.export(
                &digest,
                &tag,
                format,
                std::io::BufWriter::new(temp.as_file_mut()),
            )?;
            temp.persist(&output)
                .with_context(|| format!("cannot write {}", output.display()))?;
            eprintln!("exported {tag} ({digest}) to {}", output.display());
        }
        ImageCommand::Rm { tag } => {
            let removed = store.update_index(|index| {
                let before = index.manifests.len();
                index
                    .manifests
                    .retain(|m| m.annotation(REF_NAME) != Some(tag.as_str()));
                Ok(before != index.manifests.len())
            })?;
            anyhow::ensure!(removed, "no image is tagged {tag:?}");
            eprintln!("removed tag {tag}; `graven gc` frees its blobs");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn gc(home: &Path, args: GcArgs) -> anyhow::Result<ExitCode> {
    let releases = crate::api::release_images(home)?;
    let report = crate::bake::gc(home, &releases, args.cache)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for (digest, size) in &report.removed {
            println!("removed {digest} {}", human_size(*size));
        }
        println!(
            "freed {} in {} blobs; {} kept",
            human_size(report.freed_bytes),
            report.removed.len(),
            report.kept
        );
    }
    Ok(ExitCode::SUCCESS)
}
