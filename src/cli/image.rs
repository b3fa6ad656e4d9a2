use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;

use crate::runtime::local::Freed;
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
        /// A tag, a digest or a unique digest prefix (at least 6 hex digits).
        reference: String,
        /// Accepted for symmetry with every other command: the output is JSON either way.
        #[arg(long)]
        json: bool,
    },
    /// Write an image to a tar file: an OCI archive, or a docker-archive for `docker load`.
    Export {
        /// A tag, a digest or a unique digest prefix (at least 6 hex digits).
        reference: String,
        #[arg(long, value_enum, default_value = "oci")]
        format: Format,
        /// The file to write.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// Print what was written as JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Push an image to a registry: the blobs it lacks, then the manifest unchanged, so the
    /// registry's digest is the store's. Prints the digest.
    Push {
        /// A tag, a digest or a unique digest prefix (at least 6 hex digits).
        reference: String,
        /// Where to: HOST[:PORT]/NAME[:TAG] (`latest` when no tag is given).
        target: String,
        /// Print what was pushed as JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Pull an image from a registry into the store, tagged with its name when it has a tag.
    Pull {
        /// HOST[:PORT]/NAME[:TAG][@DIGEST].
        reference: String,
        /// The tag to give it instead of its name.
        #[arg(short = 't', long)]
        tag: Option<String>,
        /// Print what was pulled as JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Remove a tag (the blobs stay until `graven gc`).
    Rm {
        /// The tag to remove.
        tag: String,
        /// Print what was removed as JSON for scripts.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Oci,
    Docker,
}

#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// Drop the bake cache too, so layers only the cache kept are freed.
    #[arg(long)]
    pub cache: bool,
    /// Say what would be removed, and remove nothing.
    #[arg(long)]
    pub dry_run: bool,
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

pub(super) fn human_size(bytes: u64) -> String {
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
        // Inspect's report is JSON with or without `--json`.
        ImageCommand::Inspect { reference, json: _ } => {
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
            json,
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
            let chosen = format;
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
            let file = temp
                .persist(&output)
                .with_context(|| format!("cannot write {}", output.display()))?;
            if json {
                let out = serde_json::json!({
                    "tag": tag,
                    "digest": digest,
                    "format": chosen,
                    "output": std::path::absolute(&output).unwrap_or(output),
                    "bytes": file.metadata().map(|m| m.len()).unwrap_or(0),
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                eprintln!("exported {tag} ({digest}) to {}", output.display());
            }
        }
        ImageCommand::Push {
            reference,
            target,
            json,
        } => return super::registry::push(home, &reference, &target, json),
        ImageCommand::Pull {
            reference,
            tag,
            json,
        } => return super::registry::pull(home, &reference, tag, json),
        ImageCommand::Rm { tag, json } => {
            let removed = store.update_index(|index| {
                let named = index
                    .manifests
                    .iter()
                    .find(|m| m.annotation(REF_NAME) == Some(tag.as_str()))
                    .map(|m| m.digest.clone());
                index
                    .manifests
                    .retain(|m| m.annotation(REF_NAME) != Some(tag.as_str()));
                Ok(named)
            })?;
            let Some(digest) = removed else {
                anyhow::bail!("no image is tagged {tag:?}");
            };
            if json {
                let out = serde_json::json!({ "tag": tag, "digest": digest });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                eprintln!("removed tag {tag}; `graven gc` frees its blobs");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `graven gc` removed (or, with `--dry-run`, would remove), for `--json`.
#[derive(serde::Serialize)]
struct GcOutput {
    dry_run: bool,
    /// Blobs of the store, by digest; and temp files a crash left, by path in the store.
    blobs: Vec<Freed>,
    /// Unpacked roots, by image digest.
    roots: Vec<Freed>,
    /// Directories of removed instances (and leftovers in the ones that stay), by id.
    instance_dirs: Vec<Freed>,
    /// Snapshots of layer chains no kept image needs, by chain id, and path indexes.
    snapshots: Vec<Freed>,
    kept_blobs: usize,
    freed_bytes: u64,
}

pub fn gc(home: &Path, args: GcArgs) -> anyhow::Result<ExitCode> {
    // What releases within retention, tags, the cache and existing instances reach stays.
    let releases = crate::api::release_images(home)?;
    let runtime = crate::runtime::LocalRuntime::open(home)?.gc(args.dry_run)?;
    let mut roots = releases;
    roots.extend(runtime.in_use.iter().cloned());
    let store = crate::bake::gc(home, &roots, args.cache, args.dry_run)?;
    let blobs: Vec<Freed> = store
        .removed
        .iter()
        .map(|(digest, bytes)| (digest.to_string(), *bytes))
        .chain(store.leftovers.iter().cloned())
        .map(|(name, bytes)| Freed { name, bytes })
        .collect();
    let snapshots: Vec<Freed> = store
        .snapshots
        .iter()
        .map(|(name, bytes)| Freed {
            name: name.clone(),
            bytes: *bytes,
        })
        .collect();
    let sum = |freed: &[Freed]| freed.iter().map(|f| f.bytes).sum::<u64>();
    let out = GcOutput {
        dry_run: args.dry_run,
        freed_bytes: sum(&blobs)
            + sum(&runtime.roots)
            + sum(&runtime.instance_dirs)
            + sum(&snapshots),
        snapshots,
        blobs,
        roots: runtime.roots,
        instance_dirs: runtime.instance_dirs,
        kept_blobs: store.kept,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for (what, freed) in [
        ("blob", &out.blobs),
        ("root", &out.roots),
        ("instance dir", &out.instance_dirs),
        ("", &out.snapshots),
    ] {
        for f in freed {
            // A snapshot's name says what it is (`snapshot <chain id>`, or its path).
            let what = if what.is_empty() {
                ""
            } else {
                &format!("{what} ")
            };
            println!("{verb} {what}{} {}", f.name, human_size(f.bytes));
        }
    }
    let count = |n: usize, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
    println!(
        "{} {}: {} ({}), {} ({}), {} ({}), {} ({}); {} kept",
        if args.dry_run { "would free" } else { "freed" },
        human_size(out.freed_bytes),
        count(out.blobs.len(), "blob"),
        human_size(sum(&out.blobs)),
        count(out.roots.len(), "unpacked root"),
        human_size(sum(&out.roots)),
        count(out.instance_dirs.len(), "instance dir"),
        human_size(sum(&out.instance_dirs)),
        count(out.snapshots.len(), "snapshot"),
        human_size(sum(&out.snapshots)),
        count(out.kept_blobs, "blob"),
    );
    Ok(ExitCode::SUCCESS)
}
