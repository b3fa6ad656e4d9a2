//! Named volumes as persistent data a person manages: listed with their size and the
//! instances that hold them, removed only when no live instance holds them, exported to a
//! tar only then (a copy taken under a running writer would not be consistent). Nothing here
//! runs as part of a deploy: `graven down` and every replacement leave volumes alone.

use std::path::{Path, PathBuf};

use super::LocalRuntime;
use super::state::{self, Proc, STATE};
use super::volume_lock;
use crate::runtime::{InstanceId, RuntimeError};

/// One named volume.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VolumeInfo {
    pub name: String,
    /// Bytes on disk (allocated blocks, as `du` counts them).
    pub bytes: u64,
    /// The live instances whose sandbox binds it: their runtime ids and, when the control
    /// plane started them, their names.
    pub holders: Vec<Holder>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Holder {
    pub id: InstanceId,
    pub instance: Option<String>,
}

fn bad(name: &str, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::BadVolume {
        name: name.to_owned(),
        reason: reason.into(),
    }
}

impl LocalRuntime {
    fn volume_dir(&self, name: &str) -> Result<PathBuf, RuntimeError> {
        let valid =
            !name.is_empty() && !name.starts_with('.') && !name.contains('/') && name != "..";
        let dir = self.home.join("volumes").join(name);
        match std::fs::symlink_metadata(&dir) {
            Ok(meta) if valid && meta.is_dir() => Ok(dir),
            _ => Err(bad(name, "no such volume")),
        }
    }

    /// The live instances that bind each volume: its lock's holder (volume_lock.rs), and
    /// any instance whose state names it (one started by a graven from before the lock).
    fn holders(&self) -> std::collections::BTreeMap<String, Vec<Holder>> {
        let mut holders: std::collections::BTreeMap<String, Vec<Holder>> = Default::default();
        let entries = std::fs::read_dir(self.home.join("volumes"));
        for entry in entries.into_iter().flatten().flatten() {
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str().and_then(|n| n.strip_prefix(".lock-")) else {
                continue;
            };
            if let Some(holder) = volume_lock::holder(&entry.path()) {
                holders.entry(name.to_owned()).or_default().push(Holder {
                    id: holder.id,
                    instance: holder.instance,
                });
            }
        }
        let entries = std::fs::read_dir(self.home.join("instances"));
        for entry in entries.into_iter().flatten().flatten() {
            if !entry.path().join(STATE).is_file() {
                continue;
            }
            let Ok(state) = state::load(&entry.path()) else {
                continue;
            };
            // One still starting holds nothing yet (its shim takes the lock, or is refused).
            if state.workload.is_none() || state.observed_status().is_exited() {
                continue;
            }
            for volume in &state.volumes {
                let list = holders.entry(volume.clone()).or_default();
                if !list.iter().any(|h| h.id == state.id) {
                    list.push(Holder {
                        id: state.id.clone(),
                        instance: state.labels.get("instance").cloned(),
                    });
                }
            }
        }
        holders
    }

    /// Every named volume, by name.
    pub fn volumes(&self) -> Result<Vec<VolumeInfo>, RuntimeError> {
        let mut holders = self.holders();
        let dir = self.home.join("volumes");
        let mut volumes = Vec::new();
        let entries =
            std::fs::read_dir(&dir).map_err(super::other(format!("reading {}", dir.display())))?;
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.starts_with('.') || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            volumes.push(VolumeInfo {
                bytes: disk_usage(&entry.path()),
                holders: holders.remove(&name).unwrap_or_default(),
                name,
            });
        }
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(volumes)
    }

    fn refuse_if_held(&self, name: &str, doing: &str) -> Result<(), RuntimeError> {
        if let Some(holders) = self.holders().get(name) {
            let names: Vec<String> = holders
                .iter()
                .map(|h| h.instance.clone().unwrap_or_else(|| h.id.0.clone()))
                .collect();
            return Err(bad(
                name,
                format!(
                    "in use by {}: stop it first ({doing} needs a volume nothing writes to)",
                    names.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// Takes the volume's lock for a command (not an instance), refusing at once when an
    /// instance's workload has it.
    fn lock_volume(&self, name: &str, command: &str) -> Result<volume_lock::Held, RuntimeError> {
        let holder = volume_lock::Holder {
            id: InstanceId(String::new()),
            instance: Some(command.to_owned()),
            shim: Proc::of(std::process::id()),
            workload: None,
        };
        let path = volume_lock::path(&self.home, name);
        volume_lock::take(name, &path, holder, std::time::Duration::ZERO).map_err(|e| match e {
            volume_lock::LockError::Held { holder, .. }
            | volume_lock::LockError::StillRunning { holder, .. } => bad(
                name,
                format!(
                    "in use by {holder}: stop it first ({command} needs a volume nothing writes to)"
                ),
            ),
            other => bad(name, other.to_string()),
        })
    }

    /// Deletes a volume and its data, unless a live instance holds it.
    pub fn remove_volume(&self, name: &str) -> Result<u64, RuntimeError> {
        let dir = self.volume_dir(name)?;
        self.refuse_if_held(name, "removing it")?;
        // Held while it goes: a start meanwhile is refused rather than given a dying tree.
        let _lock = self.lock_volume(name, "graven volume rm")?;
        let bytes = disk_usage(&dir);
        // Renamed aside first: a start that binds it by name from now on makes a new, empty
        // one instead of getting a half-deleted tree.
        let aside = self
            .home
            .join("volumes")
            .join(format!(".removing-{name}-{:x}", fastrand::u64(..)));
        std::fs::rename(&dir, &aside).map_err(super::other(format!("removing volume {name}")))?;
        std::fs::remove_dir_all(&aside).map_err(super::other(format!("removing volume {name}")))?;
        Ok(bytes)
    }

    /// Writes a tar of the volume's contents (paths relative to its root, owners, modes and
    /// times kept, symlinks stored as symlinks) to `out`, unless a live instance holds it.
    pub fn export_volume(&self, name: &str, out: impl std::io::Write) -> Result<(), RuntimeError> {
        let dir = self.volume_dir(name)?;
        self.refuse_if_held(name, "exporting it")?;
        // Held while the copy is taken, so no instance starts writing under it.
        let _lock = self.lock_volume(name, "graven volume export")?;
        let mut builder = tar::Builder::new(out);
        builder.follow_symlinks(false);
        builder.mode(tar::HeaderMode::Complete);
        builder
            .append_dir_all(".", &dir)
            .and_then(|()| builder.finish())
            .map_err(super::other(format!("exporting volume {name}")))
    }
}

/// Allocated bytes under `dir`, symlinks not followed.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            total += meta.blocks() * 512;
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    total
}
