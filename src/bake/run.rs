//! RUN steps: the command runs in the same sandbox the local runtime uses, with a writable
//! root, and what it changed becomes the step's layer (new and changed paths, removed ones as
//! whiteouts). The root is an overlay of the chain's snapshots (`store::snapshot`) whose upper
//! dir is the change, or, where overlayfs cannot be mounted (or `GRAVEN_BAKE_OVERLAY=0`), the
//! lower layers unpacked into a temp root and diffed whole before and after.

use std::fs;
use std::io::Write as _;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::tree::{self, Entry};
use crate::sandbox::SandboxSpec;
use crate::store::snapshot::{self, SnapshotError};
use crate::store::{self, Descriptor, Digest, Store};

pub struct RunOutput {
    pub entries: Vec<Entry>,
    /// Holds the step's root (whose files the entries name) until the layer is written.
    pub root: RunRoot,
}

/// A RUN step's root: `<0700 temp dir>/root`. The root is 0755 so that the image's own users
/// can walk it, and so holds what the image holds (setuid-root files among them); the 0700
/// dir around it, which graven makes, keeps every other host user from reaching any of it.
pub struct RunRoot {
    dir: tempfile::TempDir,
}

impl RunRoot {
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
}

/// Runs `args` in the image made of `layers`; returns the entries it changed. On overlayfs
/// over the layers' snapshots where the kernel allows it (the step's writes, in the upper dir,
/// are the layer), else on a fresh unpack of the layers, diffed whole.
pub fn run(
    store: &Store,
    layers: &[Descriptor],
    diff_ids: &[Digest],
    args: &[String],
    env: &[String],
    user: &str,
    workdir: &str,
) -> Result<RunOutput, String> {
    // FROM scratch has nothing to unpack, and an overlay needs a lower dir.
    if !layers.is_empty() && snapshot::overlay_wanted() {
        let overlay = snapshot::with_private_mounts(|| {
            run_overlay(store, layers, diff_ids, args, env, user, workdir)
        });
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
    // `unpack_layers` makes the root 0755, as an image's `/` is.
    store
        .unpack_layers(layers, diff_ids, &root)
        .map_err(|e| e.to_string())?;
    let (uid, gid) = prepare(&root, user, workdir)?;
    let before = tree::snapshot(&root).map_err(|e| e.to_string())?;
    command(&root, args, env, uid, gid, workdir)?;
    let after = tree::snapshot(&root).map_err(|e| e.to_string())?;
    // What is in the directories the sandbox mounts over is never layer content, and the
    // mount points it made are not either.
    let mounted: Vec<&str> = crate::sandbox::mount_points(true).collect();
    let entries = tree::diff(&root, &before, &after, &mounted);
    Ok(RunOutput {
        entries,
        root: run_root,
    })
}

/// The overlay way, on a thread in a private mount namespace (`with_private_mounts`): the
/// chain's snapshots (made where missing) are the lower dirs, `<temp>/upper` the upper one,
/// and the layer is read from the upper dir. The outer `Err` is an overlay this kernel or
/// these privileges cannot mount, raised before the command runs; the inner one the step's.
fn run_overlay(
    store: &Store,
    layers: &[Descriptor],
    diff_ids: &[Digest],
    args: &[String],
    env: &[String],
    user: &str,
    workdir: &str,
) -> Result<Result<RunOutput, String>, SnapshotError> {
    let fail = |e: String| Ok(Err(e));
    let run_root = match RunRoot::new() {
        Ok(run_root) => run_root,
        Err(e) => return fail(e),
    };
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
        let (uid, gid) = prepare(&root, user, workdir)?;
        let pre = tree::snapshot(&upper).map_err(|e| e.to_string())?;
        command(&root, args, env, uid, gid, workdir)?;
        let mounted: Vec<&str> = crate::sandbox::mount_points(true).collect();
        tree::upper_diff(&upper, &lower, &pre, &mounted)
            .map_err(|e| format!("reading what the command wrote: {e}"))
    })();
    // Unmounted before the temp dir goes, on every path: removing it through a live
    // overlay would walk (and white out) the whole image, and leave the mount point.
    drop(lower_mount);
    drop(merged);
    Ok(entries.map(|entries| RunOutput {
        entries,
        root: run_root,
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

/// Runs the step's command in the sandbox with `root` as its writable `/`.
fn command(
    root: &Path,
    args: &[String],
    env: &[String],
    uid: u32,
    gid: u32,
    workdir: &str,
) -> Result<(), String> {
    // `HOME` as a build step expects it, unless the Containerfile set one.
    let mut env = env.to_vec();
    if !env.iter().any(|kv| kv.starts_with("HOME=")) {
        let passwd = crate::sandbox::root::read_text(root, "etc/passwd");
        env.push(format!(
            "HOME={}",
            crate::sandbox::user::home_of(uid, &passwd)
        ));
    }
    let spec = SandboxSpec {
        rootfs: root.to_owned(),
        writable_root: true,
        args: args.to_vec(),
        env,
        cwd: workdir.to_owned(),
        uid,
        gid,
        hostname: "graven-bake".to_owned(),
        binds: Vec::new(),
        tmp_bytes: 0,
    };
    // The command's output goes to graven's stderr, so `--json` keeps stdout clean.
    let out = || -> Result<Stdio, String> {
        let fd = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("cannot pass stderr to the sandbox: {e}"))?;
        Ok(Stdio::from(fd))
    };
    let status = crate::sandbox::run(&spec, out()?, out()?).map_err(|e| e.to_string())?;
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
