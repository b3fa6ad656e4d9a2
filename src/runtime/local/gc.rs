//! `graven gc`'s share of the local runtime: unpacked roots no instance uses, what is left
//! of removed instances, and the log store's retention (`logs::retention`). It never removes the root or the
//! directory of an instance that exists (running or not): it decides under the start lock
//! held exclusively (`rootfs::start_lock`), when no prepare, start or removal is half done,
//! and stops orphans (instances running without a directory, whose root no state names)
//! before it looks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{LocalRuntime, orphans, retention, rootfs, state};
use crate::runtime::RuntimeError;
use crate::store::Digest;

/// What `gc` removed (or, in a dry run, would remove) of the runtime's files.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Unpacked roots, named by their image's digest (or, for an unpacking a crash cut
    /// short, by the directory's name).
    pub roots: Vec<Freed>,
    /// Directories of removed instances, by instance id; and the leftovers of a removal cut
    /// short, by path inside one that stays.
    pub instance_dirs: Vec<Freed>,
    /// The images the existing instances run: roots of the store's gc too.
    #[serde(skip)]
    pub in_use: BTreeSet<Digest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Freed {
    pub name: String,
    pub bytes: u64,
}

/// The prefix of a root moved aside to be deleted once the start lock is released.
const DOOMED: &str = ".gc-";

fn other(context: String) -> impl FnOnce(std::io::Error) -> RuntimeError {
    move |source| RuntimeError::Other { context, source }
}

impl LocalRuntime {
    /// Removes the unpacked roots no existing instance uses and the directories of removed
    /// instances beyond log retention (`retention::expired`). With `dry_run`, reports the
    /// same and removes nothing.
    pub fn gc(&self, dry_run: bool) -> Result<GcReport, RuntimeError> {
        let instances = self.home.join("instances");
        let roots_dir = self.home.join(rootfs::DIR);
        let mut report = GcReport::default();
        let mut doomed = Vec::new();
        {
            let _lock = rootfs::start_lock(&self.home, true)?;
            if !dry_run {
                // An orphan's root is named by no state: it must not run while roots go.
                orphans::stop(&orphans::find(&instances, None));
                // Leases, namespaces and links no instance owns any more.
                super::net::sweep();
                super::cgroup::sweep();
            }
            report.in_use = self.images_in_use(&instances)?;
            for (name, paths) in unused_roots(&roots_dir, &report.in_use)? {
                if dry_run {
                    doomed.push((name, paths));
                    continue;
                }
                // Moved aside now (a rename is quick), measured and deleted once starts may
                // go on.
                let mut moved = Vec::new();
                for path in paths {
                    let aside = roots_dir.join(format!("{DOOMED}{}", fastrand::u64(..)));
                    std::fs::rename(&path, &aside)
                        .map_err(other(format!("moving {} aside", path.display())))?;
                    moved.push(aside);
                }
                doomed.push((name, moved));
            }
            let expired = retention::expired(&instances);
            for dir in &expired {
                let name = file_name(dir);
                report.instance_dirs.push(Freed {
                    bytes: disk_usage(dir),
                    name,
                });
                if !dry_run {
                    remove_tree(dir)?;
                }
            }
            for dir in retention::stateless(&instances)
                .into_iter()
                .filter(|d| !expired.contains(d))
            {
                for path in retention::leftovers(&dir) {
                    report.instance_dirs.push(Freed {
                        bytes: disk_usage(&path),
                        name: format!("{}/{}", file_name(&dir), file_name(&path)),
                    });
                    if !dry_run {
                        remove_tree(&path)?;
                    }
                }
            }
        }
        // The log store's retention, every service's bound (what each group recorded).
        let home = &self.home;
        let freed = crate::logs::retention::enforce_all(home, dry_run);
        for f in freed {
            let path = Path::new(&f.source);
            let name = path
                .strip_prefix(home)
                .unwrap_or(path)
                .display()
                .to_string();
            report.instance_dirs.push(Freed {
                name: if f.whole {
                    name
                } else {
                    format!("{name} (oldest lines)")
                },
                bytes: f.bytes,
            });
        }
        for (name, paths) in doomed {
            let bytes = paths.iter().map(|p| disk_usage(p)).sum();
            if !dry_run {
                for path in &paths {
                    remove_tree(path)?;
                }
            }
            report.roots.push(Freed { name, bytes });
        }
        Ok(report)
    }

    /// The image of every instance that has state. One whose state cannot be read stops gc:
    /// without it, gc cannot tell which root that instance runs from.
    fn images_in_use(&self, instances: &Path) -> Result<BTreeSet<Digest>, RuntimeError> {
        let mut images = BTreeSet::new();
        let entries = std::fs::read_dir(instances)
            .map_err(other(format!("listing {}", instances.display())))?;
        for entry in entries {
            let dir = entry
                .map_err(other(format!("listing {}", instances.display())))?
                .path();
            if dir.join(state::STATE).exists() {
                images.insert(state::load(&dir)?.image);
            }
        }
        Ok(images)
    }
}

/// The roots under `dir` to delete, by name: each unpacked image no instance uses with its
/// drift manifest and any tampered copy (one entry, named by the image), and what an
/// unpacking or a gc cut short left (none is under way while the start lock is exclusive).
fn unused_roots(
    dir: &Path,
    in_use: &BTreeSet<Digest>,
) -> Result<Vec<(String, Vec<PathBuf>)>, RuntimeError> {
    let mut unused: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(other(format!("listing {}", dir.display()))(e)),
    };
    for entry in entries {
        let entry = entry.map_err(other(format!("listing {}", dir.display())))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with(rootfs::UNPACKING) || name.starts_with(DOOMED) {
            unused.entry(name).or_default().push(path);
        } else if let Some(hex) = super::drift::image_of(&name)
            && let Ok(digest) = Digest::parse(&format!("sha256:{hex}"))
            && !in_use.contains(&digest)
        {
            // A manifest, or a tampered root kept while instances of its image drain: part
            // of the image's root.
            unused.entry(digest.to_string()).or_default().push(path);
        } else if let Ok(digest) = Digest::parse(&format!("sha256:{name}"))
            && !in_use.contains(&digest)
        {
            unused.entry(digest.to_string()).or_default().push(path);
        }
    }
    Ok(unused.into_iter().collect())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Bytes the files under `path` take (each hard-linked file once), following no symlink.
fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = BTreeSet::new();
    let mut total = 0;
    let mut pending = vec![path.to_owned()];
    while let Some(path) = pending.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                pending.extend(entries.flatten().map(|e| e.path()));
            }
        } else if seen.insert((meta.dev(), meta.ino())) {
            total += meta.blocks() * 512;
        }
    }
    total
}

/// Deletes a file or a whole tree without following symlinks. A root unpacked without root
/// privileges may hold directories its owner cannot write (an image's 0555 dirs): those are
/// made writable (never through a symlink) and the deletion retried.
fn remove_tree(path: &Path) -> Result<(), RuntimeError> {
    let remove = |path: &Path| match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    match remove(path) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            make_dirs_writable(path);
            remove(path)
        }
        result => result,
    }
    .map_err(other(format!("removing {}", path.display())))
}

fn make_dirs_writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut pending = vec![path.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&dir) else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        if let Ok(entries) = std::fs::read_dir(&dir) {
            pending.extend(entries.flatten().map(|e| e.path()));
        }
    }
}
