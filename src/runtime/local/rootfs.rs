//! Unpacking an image once into `$GRAVEN_HOME/rootfs/<manifest-hex>`: every layer checked
//! against its digest (compressed) and its diff id (uncompressed), OCI whiteouts applied,
//! into a temp dir renamed into place, with the mount points every instance needs (`/dev`,
//! `/proc`, `/sys`, `/tmp`) made when the image lacks them. The result is shared by every
//! instance of the image and never written again: instances see it through a read-only bind
//! (or a read-only overlay when a volume's mount point is missing from it).
//!
//! `graven gc` removes the roots no instance uses. The start lock keeps it from removing one
//! an instance is being started from: every prepare, start and removal holds it shared,
//! from before it looks at a root until the instance's state (which names its image) is on
//! disk; gc holds it exclusive while it decides and moves roots aside.

use std::path::{Path, PathBuf};

use crate::runtime::RuntimeError;
use crate::store::{Digest, Image, Store};

/// Whether `image` is unpacked already (its next instance starts without unpacking).
pub fn is_unpacked(home: &Path, image: &Digest) -> bool {
    unpacked_path(home, image).is_dir()
}

/// Where unpacked roots live under `$GRAVEN_HOME`.
pub const DIR: &str = "rootfs";
/// The start lock's file under `$GRAVEN_HOME`.
const START_LOCK: &str = "start.lock";
/// The name prefix of a root being unpacked.
pub const UNPACKING: &str = ".tmp-";

/// Takes the start lock under `home`: shared for a prepare, start or removal (they do not
/// exclude each other), exclusive for gc. Held until the file is dropped; the descriptor is
/// close-on-exec, and a shim forked from a starter closes it, so no instance keeps it.
pub fn start_lock(home: &Path, exclusive: bool) -> Result<std::fs::File, RuntimeError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = home.join(START_LOCK);
    let other = |source| RuntimeError::Other {
        context: format!("locking {}", path.display()),
        source,
    };
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(other)?;
    let operation = if exclusive {
        rustix::fs::FlockOperation::LockExclusive
    } else {
        rustix::fs::FlockOperation::LockShared
    };
    rustix::fs::flock(&file, operation).map_err(|e| other(e.into()))?;
    Ok(file)
}

pub fn unpacked_path(home: &Path, image: &Digest) -> PathBuf {
    home.join(DIR).join(image.hex())
}

/// The unpacked root of `image`, unpacking it first when needed.
pub fn ensure(store: &Store, home: &Path, image: &Image) -> Result<PathBuf, RuntimeError> {
    let dir = home.join(DIR);
    let target = unpacked_path(home, &image.digest);
    if target.is_dir() {
        return Ok(target);
    }
    let other = |context: String| move |source| RuntimeError::Other { context, source };
    // Owner-only: the unpacked roots below keep the image's setuid-root files.
    super::private_dir(&dir)?;
    let temp = tempfile::Builder::new()
        .prefix(&format!("{UNPACKING}{}-", image.digest.short()))
        .tempdir_in(&dir)
        .map_err(other(format!("creating a temp dir in {}", dir.display())))?;
    store.unpack_layers(
        &image.manifest.layers,
        &image.config.rootfs.diff_ids,
        temp.path(),
    )?;
    add_mount_points(temp.path()).map_err(other(format!(
        "adding mount points to {}",
        temp.path().display()
    )))?;
    // The manifest the drift check verifies the root against, made from the tree just
    // written (nobody else has reached it yet); written beside the root before the root is
    // named, so a named root always has one (but one unpacked by an older graven).
    let entries = manifest_of(temp.path())?;
    super::drift::write_manifest(&target, &entries).map_err(other(format!(
        "writing the manifest of {}",
        target.display()
    )))?;
    let path = temp.keep();
    match std::fs::rename(&path, &target) {
        Ok(()) => Ok(target),
        // Another graven unpacked the same image first; theirs is identical.
        Err(_) if target.is_dir() => {
            let _ = std::fs::remove_dir_all(&path);
            Ok(target)
        }
        Err(source) => {
            let _ = std::fs::remove_dir_all(&path);
            Err(RuntimeError::Other {
                context: format!("moving the unpacked image to {}", target.display()),
                source,
            })
        }
    }
}

fn manifest_of(root: &Path) -> Result<Vec<super::drift::Entry>, RuntimeError> {
    let fd = super::drift::open_root(root);
    fd.and_then(|fd| super::drift::scan(&fd, Some(&mut super::drift::Budget::unbounded())))
        .map_err(|source| RuntimeError::Other {
            context: format!("making the manifest of {}", root.display()),
            source,
        })
}

/// The manifest of a root unpacked by a graven from before manifests, made from the image's
/// layers (unpacked afresh into a temp dir beside it, then removed), never from the tree in
/// use, which may be the tampered one; written beside the root.
pub fn manifest_from_layers(
    store: &Store,
    home: &Path,
    image: &Image,
) -> Result<Vec<super::drift::Entry>, RuntimeError> {
    let dir = home.join(DIR);
    let target = unpacked_path(home, &image.digest);
    let temp = tempfile::Builder::new()
        .prefix(&format!("{UNPACKING}{}-", image.digest.short()))
        .tempdir_in(&dir)
        .map_err(|source| RuntimeError::Other {
            context: format!("creating a temp dir in {}", dir.display()),
            source,
        })?;
    store.unpack_layers(
        &image.manifest.layers,
        &image.config.rootfs.diff_ids,
        temp.path(),
    )?;
    let other = |context: String| move |source| RuntimeError::Other { context, source };
    add_mount_points(temp.path()).map_err(other(format!(
        "adding mount points to {}",
        temp.path().display()
    )))?;
    let entries = manifest_of(temp.path())?;
    super::drift::write_manifest(&target, &entries).map_err(other(format!(
        "writing the manifest of {}",
        target.display()
    )))?;
    Ok(entries)
}

/// Makes the mount points every instance needs that the unpacked root lacks, each right
/// under the root's own descriptor: what the image has there (a directory, or a symlink that
/// the sandbox will resolve inside the root) is left alone, and nothing is followed.
fn add_mount_points(root: &Path) -> std::io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    let root_fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for (name, mode) in crate::sandbox::MOUNT_POINTS {
        match rustix::fs::mkdirat(&root_fd, name, Mode::from_raw_mode(mode)) {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        }
        // The umask took bits off (the sticky /tmp's among them).
        let dir = rustix::fs::openat(
            &root_fd,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        rustix::fs::fchmod(&dir, Mode::from_raw_mode(mode))?;
    }
    // The files an instance's generated resolv.conf and hosts are bound on (`names`), so the
    // root stays a plain bind rather than an overlay that makes them: empty, only where the
    // image has none, in an `/etc` that is a directory of the root's own (a symlinked one is
    // left to the sandbox, which resolves it inside the root).
    let made = match rustix::fs::mkdirat(&root_fd, "etc", Mode::from_raw_mode(0o755)) {
        Ok(()) => true,
        Err(rustix::io::Errno::EXIST) => false,
        Err(e) => return Err(e.into()),
    };
    let Ok(etc) = rustix::fs::openat(
        &root_fd,
        "etc",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return Ok(());
    };
    if made {
        // The umask took bits off; an image's own /etc keeps its mode.
        rustix::fs::fchmod(&etc, Mode::from_raw_mode(0o755))?;
    }
    for name in ["resolv.conf", "hosts"] {
        match rustix::fs::openat(
            &etc,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        ) {
            Ok(file) => rustix::fs::fchmod(&file, Mode::from_raw_mode(0o644))?,
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
