//! RUN steps: the command runs in the same sandbox the local runtime uses, with a writable
//! root, as a build step (Docker's default capabilities as root, the host's network,
//! resolv.conf and hosts), and what it changed becomes the step's layer (new and changed paths,
//! removed ones as whiteouts). The root is an overlay of the chain's snapshots
//! (`store::snapshot`) whose upper dir is the change, or, where overlayfs cannot be mounted (or
//! `GRAVEN_BAKE_OVERLAY=0`), the lower layers unpacked into a temp root and diffed whole before
//! and after. `--mount`s are made ready here (cache dirs under the home, context paths,
//! secrets' copies); the mount points made only for them are removed before the diff.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use sha2::Digest as _;

use super::mounts::{self, MountKind, RunFlags, SecretSource, Sharing};
use super::plan::Action;
use super::tree::{self, Entry};
use crate::sandbox::{Bind, BuildStep, SandboxSpec, Tmpfs};
use crate::store::snapshot::{self, SnapshotError};
use crate::store::{self, Descriptor, Digest, Store};

pub struct RunOutput {
    pub entries: Vec<Entry>,
    /// Holds the step's root (whose files the entries name) until the layer is written.
    pub root: RunRoot,
    /// The overlay way's upper dir, which `keep_upper` can make the layer's snapshot.
    pub upper: Option<Upper>,
}

/// A RUN's upper dir (in its `RunRoot`) and what it holds that the layer does not.
pub struct Upper {
    dir: PathBuf,
    rest: tree::UpperRest,
}

/// A RUN step's root: `<0700 temp dir>/root`. The root is 0755 so that the image's own users
/// can walk it, and so holds what the image holds (setuid-root files among them); the 0700
/// dir around it, which graven makes, keeps every other host user from reaching any of it.
pub struct RunRoot {
    dir: tempfile::TempDir,
}

impl RunRoot {
    /// In the snapshots dir (0700 itself), where the upper dir can be renamed to a snapshot.
    fn in_snapshots(store: &Store) -> Result<RunRoot, SnapshotError> {
        let dir = store.snapshot_temp_dir()?;
        let root = dir.path().join("root");
        fs::create_dir(&root).map_err(|source| SnapshotError::Io { path: root, source })?;
        Ok(RunRoot { dir })
    }

    pub fn new() -> Result<RunRoot, String> {
        let fail = |e: std::io::Error| format!("cannot make a temp root: {e}");
        let dir = tempfile::Builder::new()
            .prefix("graven-run-")
            .permissions(fs::Permissions::from_mode(0o700))
            .tempdir()
            .map_err(fail)?;
        // The mode is set again: the one given at creation went through the umask, which
        // can only take bits away, but the check costs nothing and says what is meant.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).map_err(fail)?;
        fs::create_dir(dir.path().join("root")).map_err(fail)?;
        Ok(RunRoot { dir })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// `<0700 temp dir>/private`, beside the root: the step's secrets and throwaway copies,
    /// reached only through the mounts made of them.
    fn private_dir(&self) -> Result<PathBuf, String> {
        let dir = self.dir.path().join("private");
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => Ok(dir),
            Err(e) => Err(format!("cannot make the step's private dir: {e}")),
        }
    }
}

/// What a RUN step reaches beyond its image: the bake's home (cache mounts), the build
/// context (bind mounts), the secrets given to the bake and its epoch.
pub struct Inputs<'a> {
    pub home: &'a Path,
    pub context: &'a Path,
    pub secrets: &'a BTreeMap<String, SecretSource>,
    pub epoch: u64,
    /// The unpacked roots of the stages and images bind mounts name with `from=`, by mount
    /// number.
    pub bind_roots: &'a BTreeMap<usize, PathBuf>,
}

/// `SOURCE_DATE_EPOCH` in a RUN step when the bake has no epoch: 1980-01-01T00:00:00Z, the
/// earliest time a zip archive can hold.
pub const RUN_DEFAULT_EPOCH: u64 = 315_532_800;

/// The host files a step gets read-only for the step only, never in its layer, so that
/// package managers resolve names as the host does: `docker build --network=host`'s view.
const HOST_FILES: [&str; 2] = ["/etc/resolv.conf", "/etc/hosts"];

/// Runs the RUN step `action` in the image made of `layers`; returns the entries it changed.
/// On overlayfs over the layers' snapshots where the kernel allows it (the step's writes, in
/// the upper dir, are the layer), else on a fresh unpack of the layers, diffed whole: those
/// `settled` gives, every one named by its blob (the bake may still be compressing some).
pub fn run(
    store: &Store,
    layers: &[Descriptor],
    diff_ids: &[Digest],
    action: &Action,
    inputs: &Inputs<'_>,
    settled: &mut dyn FnMut() -> Result<Vec<Descriptor>, String>,
) -> Result<RunOutput, String> {
    let Action::Run {
        args,
        env,
        user,
        workdir,
        flags,
        ..
    } = action
    else {
        return Err("not a RUN step".to_owned());
    };
    let step = Step {
        args,
        env,
        user,
        workdir,
        flags,
        inputs,
    };
    // FROM scratch has nothing to unpack, and an overlay needs a lower dir.
    if !layers.is_empty() && snapshot::overlay_wanted() {
        let overlay = snapshot::with_private_mounts(|| run_overlay(store, layers, diff_ids, &step));
        match overlay.and_then(|result| result) {
            Ok(result) => return result,
            Err(SnapshotError::Unavailable { what, source }) => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    let _ = writeln!(
                        std::io::stderr(),
                        "graven: overlayfs is not available ({what}: {source}); RUN steps \
                         unpack their layers instead, which is slower"
                    );
                });
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    let run_root = RunRoot::new()?;
    let root = run_root.path();
    // Every layer is read from its blob now, a gzip still running included.
    let layers = settled()?;
    // `unpack_layers` makes the root 0755, as an image's `/` is.
    store
        .unpack_layers(&layers, diff_ids, &root)
        .map_err(|e| e.to_string())?;
    let (uid, gid) = prepare(&root, user, workdir)?;
    let before = tree::snapshot(&root).map_err(|e| e.to_string())?;
    command(&run_root, &root, &step, uid, gid, &|path| {
        before.contains_key(path)
    })?;
    let mut after = tree::snapshot(&root).map_err(|e| e.to_string())?;
    keep_only_layer_kinds(&root, &before, &mut after)?;
    // What is in the directories the sandbox mounts over is never layer content, and the
    // mount points it made are not either.
    let mounted: Vec<&str> = crate::sandbox::mount_points(true).collect();
    let entries = tree::diff(&root, &before, &after, &mounted);
    Ok(RunOutput {
        entries,
        root: run_root,
        upper: None,
    })
}

/// Makes the step's upper dir the snapshot of the chain its layer (`diff_id`, on `below`)
/// ends, once the layer is written from it: `tree::settle_upper` makes it the tree unpacking
/// the layer would (`entries` as written, the files the reproducibility rules `dropped`,
/// `mtime` the layer's), then the store names it. The next RUN then starts on it at once, as
/// BuildKit's does on the step's upper dir, where it would unpack the layer and this step's
/// upper dir be deleted. Returns whether it did; when not, nothing is named, the upper dir is
/// removed with the root, and a later step unpacks the snapshot as before.
pub fn keep_upper(
    store: &Store,
    upper: Upper,
    entries: &[Entry],
    dropped: &[String],
    below: &[Digest],
    diff_id: &Digest,
    mtime: u64,
) -> Result<bool, String> {
    if !tree::settle_upper(&upper.dir, entries, &upper.rest, dropped, mtime)
        .map_err(|e| format!("settling the step's upper dir: {e}"))?
    {
        return Ok(false);
    }
    // What unpacking the layer charges the image's bound: a block per entry and the bytes.
    let bytes = entries
        .iter()
        .map(|entry| match entry.kind {
            tree::EntryKind::File { size, .. } => 512 + size,
            _ => 512,
        })
        .sum();
    store
        .adopt_snapshot(below, diff_id, &upper.dir, bytes)
        .map_err(|e| e.to_string())
}

/// One RUN step's instruction and what it reaches.
struct Step<'a> {
    args: &'a [String],
    env: &'a [String],
    user: &'a str,
    workdir: &'a str,
    flags: &'a RunFlags,
    inputs: &'a Inputs<'a>,
}

/// The overlay way, on a thread in a private mount namespace (`with_private_mounts`): the
/// chain's snapshots (made where missing) are the lower dirs, `<temp>/upper` the upper one,
/// and the layer is read from the upper dir. The outer `Err` is an overlay this kernel or
/// these privileges cannot mount, raised before the command runs; the inner one the step's.
fn run_overlay(
    store: &Store,
    layers: &[Descriptor],
    diff_ids: &[Digest],
    step: &Step<'_>,
) -> Result<Result<RunOutput, String>, SnapshotError> {
    let fail = |e: String| Ok(Err(e));
    let run_root = RunRoot::in_snapshots(store)?;
    let root = run_root.path();
    let (upper, work, lower_view) = (
        run_root.dir.path().join("upper"),
        run_root.dir.path().join("work"),
        run_root.dir.path().join("lower"),
    );
    for dir in [&upper, &work, &lower_view] {
        if let Err(e) = fs::create_dir(dir) {
            return fail(format!("cannot make {}: {e}", dir.display()));
        }
    }
    // The upper dir's root is the merged root: 0755, as an image's `/` is.
    if let Err(e) = fs::set_permissions(&upper, fs::Permissions::from_mode(0o755)) {
        return fail(format!("cannot make {}: {e}", upper.display()));
    }
    let lowers = store.snapshots(layers, diff_ids)?;
    let top_first: Vec<&Path> = lowers.iter().rev().map(PathBuf::as_path).collect();
    let merged = snapshot::mount_overlay(&top_first, Some((&upper, &work)), &root)?;
    // The tree the step started from, to compare the upper dir with: one snapshot is that
    // tree as it is; more are merged by a read-only overlay (it needs two lower dirs).
    let (lower_mount, lower) = match top_first.as_slice() {
        [only] => (None, only.to_path_buf()),
        _ => (
            Some(snapshot::mount_overlay(&top_first, None, &lower_view)?),
            lower_view,
        ),
    };
    let entries = (|| {
        let (uid, gid) = prepare(&root, step.user, step.workdir)?;
        let pre = tree::snapshot(&upper).map_err(|e| e.to_string())?;
        let lower_fd = crate::sandbox::root::open_root(&lower)
            .map_err(|e| format!("opening the step's lower tree: {e}"))?;
        // A path existed before the step when the lower tree or the upper dir (the working
        // directory graven made) held it.
        let existed = |path: &str| {
            pre.contains_key(path)
                || crate::sandbox::root::open_in(
                    &lower_fd,
                    path,
                    rustix::fs::OFlags::PATH | rustix::fs::OFlags::NOFOLLOW,
                )
                .is_ok()
        };
        command(&run_root, &root, step, uid, gid, &existed)?;
        let mounted: Vec<&str> = crate::sandbox::mount_points(true).collect();
        tree::upper_diff(&upper, &lower, &pre, &mounted).map_err(|e| e.to_string())
    })();
    // Unmounted before the temp dir goes, on every path: removing it through a live
    // overlay would walk (and white out) the whole image, and leave the mount point.
    drop(lower_mount);
    drop(merged);
    Ok(entries.map(|(entries, rest)| RunOutput {
        entries,
        root: run_root,
        upper: Some(Upper { dir: upper, rest }),
    }))
}

/// The user the step runs as, and its working directory, made inside the root.
fn prepare(root: &Path, user: &str, workdir: &str) -> Result<(u32, u32), String> {
    let (uid, gid) = resolve_user(root, user)?;
    // The working directory is a path inside the image: made inside its root whatever the
    // image's symlinks say (`WORKDIR /lnk/x` with `lnk -> /home` must not make a host dir).
    store::inroot::create_dir_all(root, Path::new(workdir))
        .map_err(|e| format!("working directory {workdir}: {e}"))?;
    Ok((uid, gid))
}

/// Runs the step's command in the sandbox with `root` as its writable `/`, its mounts made
/// ready and, once it ended, the mount points made only for it removed (`existed` says which
/// paths the root held before the step).
fn command(
    run_root: &RunRoot,
    root: &Path,
    step: &Step<'_>,
    uid: u32,
    gid: u32,
    existed: &dyn Fn(&str) -> bool,
) -> Result<(), String> {
    let mut env = step.env.to_vec();
    // `HOME` as a build step expects it, unless the Containerfile set one.
    if !env.iter().any(|kv| kv.starts_with("HOME=")) {
        let passwd = crate::sandbox::root::read_text(root, "etc/passwd");
        env.push(format!(
            "HOME={}",
            crate::sandbox::user::home_of(uid, &passwd)
        ));
    }
    // The bake's epoch, for the tools that stamp what they make with it, unless the
    // Containerfile set one (an ARG or ENV of that name). Without one the step gets 1980's
    // first second, not 0: at 0 useradd writes a password change day of 0 (the password
    // must be changed at once) and zip cannot store the time.
    if !env.iter().any(|kv| kv.starts_with("SOURCE_DATE_EPOCH=")) {
        let epoch = match step.inputs.epoch {
            0 => RUN_DEFAULT_EPOCH,
            epoch => epoch,
        };
        env.push(format!("SOURCE_DATE_EPOCH={epoch}"));
    }
    let mounts = Mounts::prepare(run_root, root, step.flags, step.workdir, step.inputs)?;
    let spec = SandboxSpec {
        rootfs: root.to_owned(),
        writable_root: true,
        args: step.args.to_vec(),
        env,
        cwd: step.workdir.to_owned(),
        uid,
        gid,
        hostname: "graven-bake".to_owned(),
        binds: mounts.binds.clone(),
        tmp_bytes: 0,
        tmpfs: Vec::new(),
        exec_tmp: false,
        build_step: Some(BuildStep {
            tmpfs: mounts.tmpfs.clone(),
            no_network: step.flags.no_network,
        }),
    };
    // The command's output goes to graven's stderr, so `--json` keeps stdout clean.
    let out = || -> Result<Stdio, String> {
        let fd = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("cannot pass stderr to the sandbox: {e}"))?;
        Ok(Stdio::from(fd))
    };
    let status = crate::sandbox::run(&spec, out()?, out()?).map_err(|e| e.to_string());
    // The locks on cache mounts are let go, and the secrets' copies removed, at once: not
    // when the layer is written.
    let targets = mounts.targets.clone();
    drop(mounts);
    let status = status?;
    if !status.success() {
        let how = match (
            status.code(),
            std::os::unix::process::ExitStatusExt::signal(&status),
        ) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(signal)) => format!("signal {signal}"),
            _ => status.to_string(),
        };
        return Err(format!("the command failed with {how}"));
    }
    remove_made_mount_points(root, existed, &targets)
}

/// The mounts of one step, made ready on the host: what the sandbox binds and mounts, and
/// what must stay alive until the step ends (cache locks, and the run root's private dir
/// with the secrets' and rw binds' copies, removed when this is dropped).
struct Mounts {
    binds: Vec<Bind>,
    tmpfs: Vec<Tmpfs>,
    /// Every target inside the image, to remove the mount points made only for the step.
    targets: Vec<String>,
    private: PathBuf,
    _locks: Vec<fs::File>,
}

impl Drop for Mounts {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.private);
    }
}

impl Mounts {
    fn prepare(
        run_root: &RunRoot,
        root: &Path,
        flags: &RunFlags,
        workdir: &str,
        inputs: &Inputs<'_>,
    ) -> Result<Mounts, String> {
        let private = run_root.private_dir()?;
        let mut mounts = Mounts {
            binds: Vec::new(),
            tmpfs: Vec::new(),
            targets: Vec::new(),
            private: private.clone(),
            _locks: Vec::new(),
        };
        for file in HOST_FILES {
            if Path::new(file).is_file() && mount_point_usable(root, file) {
                mounts.bind(file.into(), file.to_owned(), true);
            }
        }
        for (n, mount) in flags.mounts.iter().enumerate() {
            let target = mounts::absolute_target(&mount.target, workdir);
            let at = |e: String| format!("--mount target {target}: {e}");
            match &mount.kind {
                MountKind::Bind { source, from, rw } => {
                    // From a stage or an image: a path of its unpacked root, resolved inside
                    // it as a context path is inside the context.
                    let root = match from {
                        Some(from) => inputs.bind_roots.get(&n).ok_or_else(|| {
                            at(format!("from={from}: the stage was not unpacked"))
                        })?,
                        None => inputs.context,
                    };
                    let source = in_context(root, source).map_err(at)?;
                    let source = if *rw {
                        // Writes are thrown away, as BuildKit's: the step gets a copy.
                        let copy = private.join(format!("bind-{n}"));
                        copy_tree(&source, &copy).map_err(|e| at(e.to_string()))?;
                        copy
                    } else {
                        source
                    };
                    mounts.bind(source, target, !rw);
                }
                MountKind::Cache {
                    id,
                    sharing,
                    readonly,
                    mode,
                    uid,
                    gid,
                } => {
                    let (dir, lock) = cache_dir(inputs.home, id, *sharing, *mode, (*uid, *gid))
                        .map_err(|e| at(format!("cache {id}: {e}")))?;
                    mounts._locks.extend(lock);
                    mounts.bind(dir, target, *readonly);
                }
                MountKind::Secret {
                    id,
                    required,
                    mode,
                    uid,
                    gid,
                } => {
                    let Some(value) = secret_value(inputs.secrets, id)? else {
                        if *required {
                            return Err(format!(
                                "secret {id} was not given: pass it with graven bake --secret id={id},src=PATH (or env=VAR), or mount it with required=false"
                            ));
                        }
                        continue;
                    };
                    let file = private.join(format!("secret-{n}"));
                    write_owned(&file, &value, *mode, (*uid, *gid))
                        .map_err(|e| format!("secret {id}: {e}"))?;
                    mounts.bind(file, target, true);
                }
                MountKind::Tmpfs { bytes } => {
                    mounts.targets.push(target.clone());
                    mounts.tmpfs.push(Tmpfs {
                        target,
                        bytes: *bytes,
                    });
                }
            }
        }
        // A mount inside another one's target comes after it.
        mounts.binds.sort_by_key(|b| b.target.matches('/').count());
        Ok(mounts)
    }

    fn bind(&mut self, source: PathBuf, target: String, readonly: bool) {
        self.targets.push(target.clone());
        self.binds.push(Bind {
            source,
            target,
            readonly,
        });
    }
}

/// Whether the image's `path` can take a file bind: its directory is in the image (a step of
/// an image without /etc may `mkdir /etc`, which a mount point there would make fail), and
/// it is missing (the sandbox makes it) or resolves, inside the root, to a regular file. A
/// dangling symlink there (to a resolver's runtime file, say) is left alone, and the step
/// goes without the host's file.
fn mount_point_usable(root: &Path, path: &str) -> bool {
    use rustix::fs::{FileType, OFlags};
    let Ok(root_fd) = crate::sandbox::root::open_root(root) else {
        return false;
    };
    let parent = path.rsplit_once('/').map_or("", |(parent, _)| parent);
    if crate::sandbox::root::open_in(&root_fd, parent, OFlags::PATH | OFlags::DIRECTORY).is_err() {
        return false;
    }
    match crate::sandbox::root::open_in(&root_fd, path, OFlags::PATH) {
        Ok(fd) => rustix::fs::fstat(&fd)
            .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            // Missing, or a symlink to something missing: only the first is usable.
            crate::sandbox::root::open_in(&root_fd, path, OFlags::PATH | OFlags::NOFOLLOW).is_err()
        }
        Err(_) => false,
    }
}

/// A path of the build context, resolved inside it by the kernel (a symlink in the context
/// cannot lead a bind outside it), as the host path of what it names.
fn in_context(context: &Path, source: &str) -> Result<PathBuf, String> {
    let fail = |e: std::io::Error| format!("source {source} in the build context: {e}");
    let context = crate::sandbox::root::open_root(context).map_err(fail)?;
    let fd =
        crate::sandbox::root::open_in(&context, source, rustix::fs::OFlags::PATH).map_err(fail)?;
    fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(fail)
}

/// `$GRAVEN_HOME/bake-mounts/<sha256 of the id>`, made with `mode` and owner on first use
/// (0700 above it: other host users never reach what steps leave there); locked for the
/// step when `sharing` says so.
fn cache_dir(
    home: &Path,
    id: &str,
    sharing: Sharing,
    mode: u32,
    (uid, gid): (u32, u32),
) -> std::io::Result<(PathBuf, Option<fs::File>)> {
    let parent = home.join(CACHE_MOUNTS);
    if !parent.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&parent)?;
        fs::set_permissions(&parent, fs::Permissions::from_mode(0o700))?;
    }
    let name = hex::encode(sha2::Sha256::digest(id.as_bytes()));
    let dir = parent.join(&name);
    if !dir.is_dir() {
        // Made aside and renamed, so no step sees it half made.
        let temp = tempfile::Builder::new()
            .prefix(".new-")
            .tempdir_in(&parent)?
            .keep();
        set_owner(&temp, (uid, gid))?;
        fs::set_permissions(&temp, fs::Permissions::from_mode(mode))?;
        if let Err(e) = fs::rename(&temp, &dir) {
            let _ = fs::remove_dir(&temp);
            if !dir.is_dir() {
                return Err(e);
            }
        }
    }
    let lock = match sharing {
        Sharing::Shared => None,
        Sharing::Locked => {
            let file = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(parent.join(format!("{name}.lock")))?;
            rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
            Some(file)
        }
    };
    Ok((dir, lock))
}

/// The directory under the home that holds the cache mounts.
pub const CACHE_MOUNTS: &str = "bake-mounts";

/// A secret's value from where `graven bake --secret` said; `None` when it was not given. A
/// file or variable it names that is missing is an error, naming the id only.
fn secret_value(
    secrets: &BTreeMap<String, SecretSource>,
    id: &str,
) -> Result<Option<Vec<u8>>, String> {
    match secrets.get(id) {
        None => Ok(None),
        Some(SecretSource::File(path)) => fs::read(path)
            .map(Some)
            .map_err(|e| format!("secret {id}: cannot read {}: {e}", path.display())),
        Some(SecretSource::Env(var)) => std::env::var_os(var)
            .map(|value| Some(value.into_encoded_bytes()))
            .ok_or_else(|| format!("secret {id}: the environment variable {var} is not set")),
    }
}

/// Writes `bytes` to a new file with `mode` and owner.
fn write_owned(path: &Path, bytes: &[u8], mode: u32, owner: (u32, u32)) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    set_owner(path, owner)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Gives `path` the owner a step sees as `uid:gid`. Without root the sandbox maps only
/// graven's own user (root inside), so there the file stays graven's: root's to the step.
fn set_owner(path: &Path, (uid, gid): (u32, u32)) -> std::io::Result<()> {
    if crate::sandbox::rootless() {
        return Ok(());
    }
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
}

/// Copies a directory tree (or one file) as it is: directories, regular files and symlinks
/// with their modes; nothing is followed below `source`, and other kinds are skipped.
fn copy_tree(source: &Path, dest: &Path) -> std::io::Result<()> {
    let meta = fs::symlink_metadata(source)?;
    let kind = meta.file_type();
    if kind.is_dir() {
        fs::create_dir(dest)?;
        for child in fs::read_dir(source)? {
            let child = child?;
            copy_tree(&child.path(), &dest.join(child.file_name()))?;
        }
        fs::set_permissions(dest, fs::Permissions::from_mode(meta.mode() & 0o7777))
    } else if kind.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(source)?, dest)
    } else if kind.is_file() {
        fs::copy(source, dest).map(|_| ())
    } else {
        Ok(())
    }
}

/// Removes the mount points the sandbox made only for this step (a bind's or tmpfs's target
/// and the directories above it that the image lacked), where the step left them empty:
/// they are not its content. Each is found where the kernel resolved it, inside the root.
fn remove_made_mount_points(
    root: &Path,
    existed: &dyn Fn(&str) -> bool,
    targets: &[String],
) -> Result<(), String> {
    use rustix::fs::{AtFlags, FileType, OFlags};
    let fail = |e: std::io::Error| format!("removing the step's mount points: {e}");
    let root_fd = crate::sandbox::root::open_root(root).map_err(fail)?;
    let real_root = fs::canonicalize(root).map_err(fail)?;
    let mut made = BTreeSet::new();
    for target in targets {
        let Ok(fd) = crate::sandbox::root::open_in(&root_fd, target, OFlags::PATH) else {
            continue;
        };
        let Ok(real) = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) else {
            continue;
        };
        let Some(mut path) = real
            .strip_prefix(&real_root)
            .ok()
            .and_then(|p| p.to_str())
            .map(str::to_owned)
        else {
            continue;
        };
        while !path.is_empty() && !existed(&path) {
            let parent = path.rsplit_once('/').map_or("", |(p, _)| p).to_owned();
            made.insert(path);
            path = parent;
        }
    }
    let mut made: Vec<String> = made.into_iter().collect();
    made.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    for path in made {
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", &path));
        let dir = store::inroot::open_dir(root_fd.as_fd(), Path::new(parent)).map_err(fail)?;
        let Ok(stat) = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        let flags = match FileType::from_raw_mode(stat.st_mode) {
            FileType::Directory => AtFlags::REMOVEDIR,
            FileType::RegularFile if stat.st_size == 0 => AtFlags::empty(),
            _ => continue,
        };
        match rustix::fs::unlinkat(&dir, name, flags) {
            Ok(()) | Err(rustix::io::Errno::NOTEMPTY | rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(fail(e.into())),
        }
    }
    Ok(())
}

/// A layer carries directories, regular files and symlinks. A socket the step left is not
/// content (as with BuildKit); a device node or FIFO it made is refused by name: graven
/// would have to open it on the host to read it, and a block device would be the host's
/// disk. Called once the step's processes are gone, so nothing changes meanwhile.
fn keep_only_layer_kinds(
    root: &Path,
    before: &BTreeMap<String, tree::Seen>,
    after: &mut BTreeMap<String, tree::Seen>,
) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let changed: Vec<String> = after
        .iter()
        .filter(|(path, now)| !now.is_dir && now.link.is_none() && before.get(*path) != Some(*now))
        .map(|(path, _)| path.clone())
        .collect();
    for path in changed {
        // The path was walked without following anything, so joining it names what was seen.
        let kind = fs::symlink_metadata(root.join(&path))
            .map_err(|e| format!("/{path}: {e}"))?
            .file_type();
        if kind.is_socket() {
            match before.get(&path) {
                Some(was) => after.insert(path, was.clone()),
                None => after.remove(&path),
            };
        } else if kind.is_block_device() || kind.is_char_device() || kind.is_fifo() {
            let what = if kind.is_fifo() {
                "a fifo"
            } else {
                "a device node"
            };
            return Err(format!(
                "the command left {what} at /{path}, which an image layer made by graven cannot hold; remove it in the same RUN"
            ));
        }
    }
    Ok(())
}

/// `uid[:gid]` numerically, or names looked up in the image's /etc/passwd and /etc/group
/// (read inside the root: `etc/passwd -> /etc/shadow` reads the image's, not the host's).
/// A missing or unreadable file is an empty one: names then fail as not found.
pub fn resolve_user(root: &Path, user: &str) -> Result<(u32, u32), String> {
    let read = |file: &str| crate::sandbox::root::read_text(root, file);
    crate::sandbox::user::resolve(user, &read("etc/passwd"), &read("etc/group"))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve_numerically_or_by_name() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("etc")).unwrap();
        fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        fs::write(root.path().join("etc/group"), "staff:x:50:\n").unwrap();
        for (user, expected) in [
            ("0", Ok((0, 0))),
            ("65534:65534", Ok((65534, 65534))),
            ("app", Ok((1000, 1001))),
            ("1000", Ok((1000, 1001))),
            ("app:staff", Ok((1000, 50))),
            (
                "nobody",
                Err("user \"nobody\" is not in the image's /etc/passwd".to_owned()),
            ),
            (
                "app:wheel",
                Err("group \"wheel\" is not in the image's /etc/group".to_owned()),
            ),
        ] {
            assert_eq!(resolve_user(root.path(), user), expected, "{user}");
        }
    }
}
