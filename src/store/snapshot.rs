//! Unpacked snapshots of layer chains, for bake's RUN steps:
//! `$GRAVEN_HOME/snapshots/<chain id>/fs` is one layer applied on top of the snapshots of the
//! layers below it, in overlayfs's own form (a removal a 0/0 character device, an opaque
//! directory marked by the `trusted.overlay.opaque` xattr: the kernel writes them, as the
//! layer is unpacked onto an overlay whose upper dir is the new snapshot), so the stack of a
//! chain's snapshots mounted as overlay lower dirs is the image's tree. A snapshot is made in
//! a temp dir and renamed into place, shared by every bake, and never written after; `gc`
//! removes the ones no kept image's chain names. Their files are written without a sync (a
//! writable overlay is mounted `volatile`): each names the boot it was made in, and one a
//! reboot may have left short of its bytes is made again, never read. Also here: the
//! per-layer path index (`snapshots/paths/<layer digest>.json`) that bake reads instead of a
//! layer's tar to learn which paths the lower layers hold, and the private mount namespace
//! every overlay mount lives in, so that no mount outlives the work that made it.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs;
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use sha2::Digest as _;

use super::{Descriptor, Digest, Store, StoreError, TEMP, oci};

/// Set to `0` to bake every RUN on a fresh unpack of its layers instead of overlayfs.
pub const OVERLAY_VAR: &str = "GRAVEN_BAKE_OVERLAY";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The kernel or the privileges at hand do not allow the mounts (rootless, no overlay
    /// module, an option this kernel does not know): the caller falls back to unpacking.
    #[error("overlayfs is not available here ({what}: {source})")]
    Unavailable {
        what: &'static str,
        source: io::Error,
    },
    #[error("snapshot {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The file beside a snapshot's `fs` that says how many bytes the image takes unpacked up to
/// its layer.
const SIZE: &str = "image-size";

/// The file beside a snapshot's `fs` that names the boot (the kernel's boot id) its files were
/// written in. Nothing syncs them: an overlay with an upper dir is mounted `volatile`, so
/// neither the step's own fsyncs (dpkg's thousands) nor the sync of the whole upper
/// filesystem that unmounting an overlay otherwise does (0.1–0.4 s per RUN of a cold bake
/// with another build writing) reach the disk (an unpack straight into a bottom layer's
/// snapshot never synced either). In the boot that wrote them the page cache holds every byte; after a crash some may be lost,
/// so a snapshot of another boot is removed and made again from its layer (`current`).
/// Snapshots without the file (made before it existed) are read as before.
const BOOT: &str = "boot-id";

/// The kernel's id of this boot; `None` where it cannot be read, and then overlays are
/// mounted without `volatile` (unmounting syncs them, as before) and no snapshot names a boot.
fn boot_id() -> Option<&'static str> {
    static BOOT_ID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT_ID
        .get_or_init(|| {
            fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .ok()
                .map(|id| id.trim().to_owned())
                .filter(|id| !id.is_empty())
        })
        .as_deref()
}

/// Whether the snapshot at `place` may be read: it exists and its files were written in this
/// boot (or by a graven that named no boot). `None` when a snapshot is there from another
/// boot.
fn trusted(place: &Path) -> Option<bool> {
    if !place.is_dir() {
        return Some(false);
    }
    match fs::read_to_string(place.join(BOOT)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Some(true),
        Ok(id) if Some(id.trim()) == boot_id() => Some(true),
        _ => None,
    }
}

/// What `image-size` of the snapshot at `place` says.
fn image_size(place: &Path) -> Result<u64, SnapshotError> {
    let file = place.join(SIZE);
    let text = fs::read_to_string(&file).map_err(io_err(&file))?;
    text.trim()
        .parse()
        .map_err(|e| io_err(&file)(io::Error::other(format!("not a size: {e}"))))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Errors that mean "no overlay here" rather than "this bake failed".
fn unavailable(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> SnapshotError {
    move |errno| match errno {
        rustix::io::Errno::PERM
        | rustix::io::Errno::ACCESS
        | rustix::io::Errno::NODEV
        | rustix::io::Errno::INVAL
        | rustix::io::Errno::NOSYS
        | rustix::io::Errno::OPNOTSUPP => SnapshotError::Unavailable {
            what,
            source: errno.into(),
        },
        other => SnapshotError::Io {
            path: PathBuf::from(what),
            source: other.into(),
        },
    }
}

/// Whether `GRAVEN_BAKE_OVERLAY` leaves overlayfs on (anything but `0`, or unset).
pub fn overlay_wanted() -> bool {
    std::env::var_os(OVERLAY_VAR).is_none_or(|v| v != "0")
}

/// The OCI chain ids of `diff_ids`: the first layer's diff id, then
/// `sha256(<chain below> + " " + <diff id>)` for each layer above.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut chains: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let chain = match chains.last() {
            None => diff_id.clone(),
            Some(below) => Digest::from_sha256(
                sha2::Sha256::digest(format!("{below} {diff_id}").as_bytes()).into(),
            ),
        };
        chains.push(chain);
    }
    chains
}

/// Runs `work` on a thread of its own in a private mount namespace (a copy of graven's, with
/// no propagation back): every mount it makes, and every mount a process it starts sees, is
/// gone when the thread ends, whatever path `work` took out of it.
pub fn with_private_mounts<T: Send>(work: impl FnOnce() -> T + Send) -> Result<T, SnapshotError> {
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            // SAFETY: only the mount namespace (and with it the filesystem context: cwd, root,
            // umask) is unshared, never the descriptor table, so no thread can be left with
            // descriptors another thread cannot see, which is the hazard `unshare_unsafe` names.
            unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }
                .map_err(unavailable("unshare of a mount namespace"))?;
            rustix::mount::mount_change(
                "/",
                MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
            )
            .map_err(unavailable("making the mounts private"))?;
            Ok(work())
        });
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// An overlay mount, unmounted when dropped (its namespace would drop it anyway when the
/// thread ends; this frees the directories for removal sooner).
pub struct Overlay {
    target: PathBuf,
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.target, UnmountFlags::DETACH);
    }
}

/// Mounts an overlay of `lowers` (topmost first) on `target`, writable into `upper` (with
/// `work`) when given, read-only otherwise. Call it only inside `with_private_mounts`.
/// Directories are named by descriptor (`/proc/self/fd/N`), so no path needs escaping and
/// a deep chain stays far inside the one page mount options may take.
pub fn mount_overlay(
    lowers: &[&Path],
    upper: Option<(&Path, &Path)>,
    target: &Path,
) -> Result<Overlay, SnapshotError> {
    let open = |path: &Path| -> Result<OwnedFd, SnapshotError> {
        rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err(path)(e.into()))
    };
    let mut held = Vec::new();
    let mut name = |path: &Path| -> Result<String, SnapshotError> {
        let fd = open(path)?;
        let name = format!("/proc/self/fd/{}", fd.as_raw_fd());
        held.push(fd);
        Ok(name)
    };
    let lowerdir = lowers
        .iter()
        .map(|l| name(l))
        .collect::<Result<Vec<_>, _>>()?
        .join(":");
    // Renamed directories must be copied, not redirected, and files copied whole, so that
    // the upper dir alone holds every change (it is the layer); no index, which would tie
    // the lower dirs to this one upper dir.
    let mut options = format!("lowerdir={lowerdir},redirect_dir=off,index=off,metacopy=off");
    let mut volatile = false;
    if let Some((upper, work)) = upper {
        let (upper, work) = (name(upper)?, name(work)?);
        options.push_str(&format!(",upperdir={upper},workdir={work}"));
        // No sync reaches the upper dir's filesystem: what is written there becomes a
        // snapshot that names this boot (`BOOT`), or is thrown away.
        volatile = boot_id().is_some();
    }
    let mount = |options: &str| {
        let options = CString::new(options).map_err(|e| io_err(target)(io::Error::other(e)))?;
        rustix::mount::mount(
            "graven-overlay",
            target,
            "overlay",
            MountFlags::empty(),
            options.as_c_str(),
        )
        .map_err(unavailable("mounting overlayfs"))
    };
    match volatile {
        // A kernel before 5.10 does not know the option: the mount syncs as before.
        true => match mount(&format!("{options},volatile")) {
            Err(SnapshotError::Unavailable { .. }) => mount(&options)?,
            other => other?,
        },
        false => mount(&options)?,
    }
    drop(held);
    Ok(Overlay {
        target: target.to_owned(),
    })
}

/// One change a layer makes to which paths exist: what a path index holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PathChange {
    Add {
        path: String,
        dir: bool,
    },
    /// A whiteout: the path and everything under it are gone.
    Remove(String),
    /// An opaque directory: everything under it from the layers below is gone.
    Opaque(String),
}

impl PathChange {
    /// The change a layer entry at `path` (clean, relative) makes.
    pub fn of(path: &str, dir: bool) -> PathChange {
        let (parent, name) = match path.rsplit_once('/') {
            Some((p, n)) => (p, n),
            None => ("", path),
        };
        if name == ".wh..wh..opq" {
            PathChange::Opaque(parent.to_owned())
        } else if let Some(hidden) = name.strip_prefix(".wh.") {
            PathChange::Remove(if parent.is_empty() {
                hidden.to_owned()
            } else {
                format!("{parent}/{hidden}")
            })
        } else {
            PathChange::Add {
                path: path.to_owned(),
                dir,
            }
        }
    }
}

/// What one layer changes of which paths exist, read from its (uncompressed) tar headers.
pub fn tar_path_changes(reader: impl io::Read) -> io::Result<Vec<PathChange>> {
    let mut changes = Vec::new();
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries()? {
        let entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        // Without `./`, leading or trailing slashes.
        let path = path
            .split('/')
            .filter(|p| !p.is_empty() && *p != ".")
            .collect::<Vec<_>>()
            .join("/");
        if !path.is_empty() {
            changes.push(PathChange::of(&path, entry.header().entry_type().is_dir()));
        }
    }
    Ok(changes)
}

impl Store {
    /// `$GRAVEN_HOME/snapshots`.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root()
            .parent()
            .unwrap_or(self.root())
            .join("snapshots")
    }

    /// The tree of the snapshot of the chain `diff_ids` ends (what its top layer holds, as
    /// unpacked over the ones below), if one was made.
    pub fn snapshot_tree(&self, diff_ids: &[Digest]) -> Option<PathBuf> {
        let chain = chain_ids(diff_ids).pop()?;
        let place = self.snapshots_dir().join(chain.hex());
        (trusted(&place) == Some(true)).then(|| place.join("fs"))
    }

    /// Whether the chain `chain` has a snapshot a RUN can start on as it is (one of another
    /// boot is made again first, from its layer's blob).
    pub fn has_snapshot(&self, chain: &Digest) -> bool {
        trusted(&self.snapshots_dir().join(chain.hex())) == Some(true)
    }

    /// Whether the snapshot at `place` (in `dir`) may be read, as `trusted` says; one of
    /// another boot is removed first (renamed aside, then deleted), so that it is made again.
    /// A snapshot of this boot found aside (another bake made it again between the look and
    /// the rename) is put back or, where it cannot be, left for gc, never deleted: that bake
    /// may be reading it.
    fn current(&self, dir: &Path, place: &Path) -> Result<bool, SnapshotError> {
        if let Some(trusted) = trusted(place) {
            return Ok(trusted);
        }
        let aside = tempfile::Builder::new()
            .prefix(TEMP)
            .tempdir_in(dir)
            .map_err(io_err(dir))?
            .keep();
        match fs::rename(place, &aside) {
            Ok(()) => {}
            // Another bake moved it first.
            Err(_) if !place.exists() => {
                let _ = fs::remove_dir(&aside);
                return Ok(false);
            }
            Err(e) => {
                let _ = fs::remove_dir(&aside);
                return Err(io_err(place)(e));
            }
        }
        if trusted(&aside) == Some(true) {
            let _ = fs::rename(&aside, place);
            return Ok(place.is_dir());
        }
        fs::remove_dir_all(&aside).map_err(io_err(&aside))?;
        Ok(false)
    }

    /// The snapshots of every chain of `layers` (made where missing), bottom first: the
    /// overlay lower dirs of the image, topmost last. Call it only inside
    /// `with_private_mounts` (a layer is unpacked onto an overlay of the ones below).
    pub fn snapshots(
        &self,
        layers: &[Descriptor],
        diff_ids: &[Digest],
    ) -> Result<Vec<PathBuf>, SnapshotError> {
        let dir = self.snapshots_dir();
        private_dir(&dir).map_err(io_err(&dir))?;
        if layers.len() != diff_ids.len() {
            return Err(io_err(&dir)(io::Error::other(format!(
                "{} layers but {} diff ids",
                layers.len(),
                diff_ids.len()
            ))));
        }
        let mut made: Vec<PathBuf> = Vec::with_capacity(layers.len());
        let mut used = 0;
        for ((layer, diff_id), chain) in layers.iter().zip(diff_ids).zip(chain_ids(diff_ids)) {
            let place = dir.join(chain.hex());
            if !self.current(&dir, &place)? {
                self.make_snapshot(&dir, layer, diff_id, &made, used, &place)?;
            }
            used = image_size(&place)?;
            made.push(place.join("fs"));
        }
        // The bound may have been lowered since the snapshots were made.
        let limit = super::max_image_size()?;
        if let Some(top) = layers.last()
            && used > limit
        {
            return Err(StoreError::TooLarge {
                digest: top.digest.clone(),
                limit,
            }
            .into());
        }
        Ok(made)
    }

    /// A new 0700 temp dir in the snapshots dir, for a RUN step's root and upper dir: on the
    /// snapshots' filesystem, so the upper dir can become a snapshot by a rename.
    pub fn snapshot_temp_dir(&self) -> Result<tempfile::TempDir, SnapshotError> {
        let dir = self.snapshots_dir();
        private_dir(&dir).map_err(io_err(&dir))?;
        let temp = tempfile::Builder::new()
            .prefix(TEMP)
            .tempdir_in(&dir)
            .map_err(io_err(&dir))?;
        fs::set_permissions(temp.path(), fs::Permissions::from_mode(0o700))
            .map_err(io_err(temp.path()))?;
        Ok(temp)
    }

    /// Makes `fs_dir` (in a temp dir of `snapshot_temp_dir`), which holds what unpacking the
    /// layer `diff_id` onto the snapshots of `below` would write, the snapshot of that chain
    /// by a rename: a RUN's upper dir once `bake::tree::settle_upper` made it that tree.
    /// `bytes` is what the layer takes unpacked, as the image's bound counts it. Returns
    /// whether it did: not when the chain has a snapshot already, nor past the bound (the
    /// step that needs the snapshot then unpacks it, and fails as it should).
    pub fn adopt_snapshot(
        &self,
        below: &[Digest],
        diff_id: &Digest,
        fs_dir: &Path,
        bytes: u64,
    ) -> Result<bool, SnapshotError> {
        let dir = self.snapshots_dir();
        let mut diff_ids = below.to_vec();
        diff_ids.push(diff_id.clone());
        let chains = chain_ids(&diff_ids);
        let place = dir.join(chains[chains.len() - 1].hex());
        if self.current(&dir, &place)? {
            return Ok(false);
        }
        let used = match chains.len() {
            1 => 0,
            n => image_size(&dir.join(chains[n - 2].hex()))?,
        };
        let size = used.saturating_add(bytes);
        if size > super::max_image_size()? {
            return Ok(false);
        }
        let temp = self.snapshot_temp_dir()?;
        let to = temp.path().join("fs");
        fs::rename(fs_dir, &to).map_err(io_err(fs_dir))?;
        self.name_snapshot(temp, size, &place)?;
        Ok(true)
    }

    fn make_snapshot(
        &self,
        dir: &Path,
        layer: &Descriptor,
        diff_id: &Digest,
        below: &[PathBuf],
        used: u64,
        place: &Path,
    ) -> Result<(), SnapshotError> {
        let temp = tempfile::Builder::new()
            .prefix(TEMP)
            .tempdir_in(dir)
            .map_err(io_err(dir))?;
        let fs_dir = temp.path().join("fs");
        fs::create_dir(&fs_dir).map_err(io_err(&fs_dir))?;
        // An image's `/` is 0755, whatever the umask made of it.
        fs::set_permissions(&fs_dir, fs::Permissions::from_mode(0o755)).map_err(io_err(&fs_dir))?;
        let size = if below.is_empty() {
            self.unpack_layer_above(layer, diff_id, &fs_dir, used)?
        } else {
            let work = temp.path().join("work");
            let merged = temp.path().join("merged");
            for made in [&work, &merged] {
                fs::create_dir(made).map_err(io_err(made))?;
            }
            let lowers: Vec<&Path> = below.iter().rev().map(PathBuf::as_path).collect();
            let size = {
                let _mount = mount_overlay(&lowers, Some((&fs_dir, &work)), &merged)?;
                self.unpack_layer_above(layer, diff_id, &merged, used)?
            };
            for made in [&work, &merged] {
                fs::remove_dir_all(made).map_err(io_err(made))?;
            }
            size
        };
        self.name_snapshot(temp, size, place)
    }

    /// Writes `image-size` (what the image takes unpacked up to this layer, as
    /// `GRAVEN_MAX_IMAGE_SIZE` counts) and `boot-id` beside the temp dir's `fs` and renames
    /// the temp dir to `place`: the snapshot is named only once it is whole, and never
    /// written after.
    fn name_snapshot(
        &self,
        temp: tempfile::TempDir,
        size: u64,
        place: &Path,
    ) -> Result<(), SnapshotError> {
        let write = |name: &str, text: &str| {
            let file = temp.path().join(name);
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .map_err(io_err(&file))
        };
        write(SIZE, &size.to_string())?;
        if let Some(boot) = boot_id() {
            write(BOOT, boot)?;
        }
        let temp = temp.keep();
        match fs::rename(&temp, place) {
            Ok(()) => Ok(()),
            // Another bake made the same snapshot meanwhile: theirs serves.
            Err(_) if place.is_dir() => {
                let _ = fs::remove_dir_all(&temp);
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&temp);
                Err(io_err(place)(e))
            }
        }
    }

    fn path_index_file(&self, layer: &Digest) -> PathBuf {
        self.snapshots_dir()
            .join("paths")
            .join(format!("{}.json", layer.hex()))
    }

    /// The path index of a layer, if one was written.
    pub fn path_index(&self, layer: &Digest) -> Option<Vec<PathChange>> {
        let bytes = fs::read(self.path_index_file(layer)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Writes a layer's path index (temp file, rename: a reader sees all of it or none).
    pub fn put_path_index(&self, layer: &Digest, changes: &[PathChange]) -> io::Result<()> {
        let file = self.path_index_file(layer);
        let dir = file.parent().expect("the index is in a directory");
        private_dir(&self.snapshots_dir())?;
        private_dir(dir)?;
        let mut temp = tempfile::Builder::new().prefix(TEMP).tempfile_in(dir)?;
        serde_json::to_writer(io::BufWriter::new(temp.as_file_mut()), changes)?;
        temp.persist(&file).map_err(|e| e.error)?;
        Ok(())
    }

    /// Removes (or, dry, lists) the snapshots whose chain no image in `keep` has, the path
    /// indexes of layers not in `keep`, and what a crash left; the caller holds the gc lock
    /// exclusively, so no bake is making or using one. Each snapshot is renamed aside before
    /// it is deleted: a crash midway leaves a temp dir, never a half snapshot under its name.
    pub(super) fn gc_snapshots(
        &self,
        keep: &BTreeSet<Digest>,
        dry_run: bool,
    ) -> super::Result<Vec<(String, u64)>> {
        let dir = self.snapshots_dir();
        let Ok(listing) = fs::read_dir(&dir) else {
            return Ok(Vec::new());
        };
        let mut chains = BTreeSet::new();
        for digest in keep {
            let small = fs::metadata(self.blob_path(digest))
                .is_ok_and(|m| m.len() <= super::MAX_MANIFEST_SIZE);
            if !small {
                continue;
            }
            let Ok(manifest) = serde_json::from_slice::<oci::Manifest>(&self.read_blob(digest)?)
            else {
                continue;
            };
            let Ok(bytes) = self.read_blob(&manifest.config.digest) else {
                continue;
            };
            if let Ok(config) = serde_json::from_slice::<oci::ImageConfig>(&bytes) {
                chains.extend(chain_ids(&config.rootfs.diff_ids));
            }
        }
        let mut removed = Vec::new();
        let mut entries: Vec<_> = listing.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name == "paths" {
                removed.extend(self.gc_path_indexes(&path, keep, dry_run)?);
                continue;
            }
            let chain = Digest::parse(&format!("sha256:{name}")).ok();
            if chain.as_ref().is_some_and(|c| chains.contains(c)) {
                continue;
            }
            let label = match &chain {
                Some(chain) => format!("snapshot {chain}"),
                None => format!("snapshots/{name}"),
            };
            let size = dir_size(&path);
            if !dry_run {
                let aside = if name.starts_with(TEMP) {
                    path.clone()
                } else {
                    dir.join(format!("{TEMP}gc-{name}"))
                };
                if aside != path {
                    fs::rename(&path, &aside).map_err(super::io_err(&path))?;
                }
                fs::remove_dir_all(&aside).map_err(super::io_err(&aside))?;
            }
            removed.push((label, size));
        }
        Ok(removed)
    }

    fn gc_path_indexes(
        &self,
        dir: &Path,
        keep: &BTreeSet<Digest>,
        dry_run: bool,
    ) -> super::Result<Vec<(String, u64)>> {
        let mut removed = Vec::new();
        let mut entries: Vec<_> = fs::read_dir(dir)
            .map_err(super::io_err(dir))?
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            let layer = name
                .strip_suffix(".json")
                .and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok());
            if layer.as_ref().is_some_and(|l| keep.contains(l)) {
                continue;
            }
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            if !dry_run {
                fs::remove_file(entry.path()).map_err(super::io_err(&entry.path()))?;
            }
            removed.push((format!("snapshots/paths/{name}"), size));
        }
        Ok(removed)
    }
}

/// Makes `dir` (and its parents) where missing, 0700 whatever the umask: the snapshots hold
/// what images hold, setuid-root files among them, and no other host user may reach them.
fn private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// The bytes of the files under `path` (not following symlinks), for gc's report.
fn dir_size(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(listing) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in listing.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(_) => total += entry.metadata().map(|m| m.len()).unwrap_or(0),
                Err(_) => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let chains = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chains[0], a);
        assert_eq!(chains[1], Digest::of(format!("{a} {b}").as_bytes()));
    }
}
