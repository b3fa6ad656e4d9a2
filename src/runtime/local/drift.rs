//! Drift: what changed in an instance since it started from its image. Two checks, both
//! run on the controller's schedule (`LocalRuntime::check_drift_blocking`):
//!
//! - the unpacked root against its manifest (`<root>.manifest` beside it, made when it was
//!   unpacked): every entry's path, kind, mode, owner, size, symlink target and, for regular
//!   files, sha256. A walk by `openat`/`fstatat`/`readlinkat` from each directory's own
//!   descriptor, never following a symlink and never joining strings; a cheap metadata pass
//!   first, then the hashing pass, which reads at most a budget of bytes per second;
//! - each process of a running instance (its cgroups' members, else its PID namespace's):
//!   its `/proc/<pid>/exe` must be the very file its path names in the image's root (the same
//!   inode, on the instance's root mount), else the program is not the image's (written to
//!   /tmp, /dev/shm or a volume, or deleted).
//!
//! It never writes a root: a tampered one is moved aside and unpacked afresh by the caller.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::runtime::{Drift, FileChange};

/// The manifest's name beside its root: `rootfs/<hex>` has `rootfs/<hex>.manifest`.
pub const MANIFEST_SUFFIX: &str = ".manifest";
/// The name prefix of a tampered root moved aside (kept until no instance of its image is
/// left, for the draining instances that still run on it; then `gc` removes it).
pub const TAMPERED: &str = ".tampered-";
/// The most of a command line an event keeps.
const CMDLINE_BYTES: usize = 200;

/// The image (its digest's hex) a manifest (`<hex>.manifest`) or a tampered root moved
/// aside (`.tampered-<hex>-<n>`) belongs to.
pub fn image_of(name: &str) -> Option<&str> {
    if let Some(hex) = name.strip_suffix(MANIFEST_SUFFIX) {
        return Some(hex);
    }
    name.strip_prefix(TAMPERED)?.split('-').next()
}

/// One entry of a root as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// `/` for the root, else `/a/b`; bytes that are not UTF-8 (and `%`) as `%XX`.
    pub path: String,
    pub kind: Kind,
    /// The permission bits, setuid, setgid and sticky included.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// A regular file's size (0 for anything else: a directory's size is the filesystem's).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    /// A symlink's target, escaped as `path` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// A regular file's sha256, in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    Char,
    Block,
}

impl Kind {
    fn of(mode: u32) -> Kind {
        match FileType::from_raw_mode(mode) {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            FileType::Fifo => Kind::Fifo,
            FileType::Socket => Kind::Socket,
            FileType::CharacterDevice => Kind::Char,
            // Nothing else exists on Linux; an unknown type is recorded as one, never skipped.
            FileType::BlockDevice | FileType::Unknown => Kind::Block,
        }
    }
}

/// Escapes a name's bytes so that any name is one JSON string and back.
fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '%' {
                out.push_str("%25");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// How many bytes a walk may read per second, and what it read.
#[derive(Debug)]
pub struct Budget {
    per_second: u64,
    start: Instant,
    pub read: u64,
    /// The read buffer, made once per walk: a fresh 1 MiB buffer per file cost more CPU than
    /// hashing a Debian root's mostly small files (zeroing 5 GB for 5,000 files).
    buf: Vec<u8>,
}

impl Budget {
    pub fn new(per_second: u64) -> Budget {
        Budget {
            per_second: per_second.max(1),
            start: Instant::now(),
            read: 0,
            buf: Vec::new(),
        }
    }

    /// No bound: for the manifest made at unpack, which has just written every byte anyway.
    pub fn unbounded() -> Budget {
        Budget::new(u64::MAX)
    }

    /// Counts `bytes` read and sleeps while the walk is ahead of its budget.
    fn charge(&mut self, bytes: u64) {
        self.read += bytes;
        if self.per_second == u64::MAX {
            return;
        }
        let due = Duration::from_secs_f64(self.read as f64 / self.per_second as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

/// Walks the tree under `root` (a directory descriptor), every entry in a fixed order, the
/// regular files hashed when `budget` is given.
pub fn scan(root: &OwnedFd, mut budget: Option<&mut Budget>) -> std::io::Result<Vec<Entry>> {
    let meta = rustix::fs::fstat(root)?;
    let mut entries = vec![entry("/".to_owned(), &meta, None, None)];
    walk(root, "", &mut entries, &mut budget)?;
    Ok(entries)
}

fn entry(
    path: String,
    meta: &rustix::fs::Stat,
    link: Option<String>,
    hash: Option<String>,
) -> Entry {
    let kind = Kind::of(meta.st_mode);
    Entry {
        path,
        kind,
        mode: meta.st_mode & 0o7777,
        uid: meta.st_uid,
        gid: meta.st_gid,
        size: if kind == Kind::File {
            meta.st_size as u64
        } else {
            0
        },
        link,
        sha256: hash,
    }
}

fn walk(
    dir: &OwnedFd,
    prefix: &str,
    out: &mut Vec<Entry>,
    budget: &mut Option<&mut Budget>,
) -> std::io::Result<()> {
    let mut names = Vec::new();
    for name in rustix::fs::Dir::read_from(dir)? {
        let name = name?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    names.sort();
    for name in names {
        let path = format!("{prefix}/{}", escape(&name));
        let meta = rustix::fs::statat(dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)?;
        match Kind::of(meta.st_mode) {
            Kind::Dir => {
                out.push(entry(path.clone(), &meta, None, None));
                let child = rustix::fs::openat(
                    dir,
                    name.as_slice(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                walk(&child, &path, out, budget)?;
            }
            Kind::Symlink => {
                let target = rustix::fs::readlinkat(dir, name.as_slice(), Vec::new())?;
                let link = escape(target.as_bytes());
                out.push(entry(path, &meta, Some(link), None));
            }
            Kind::File => {
                let hash = match budget {
                    Some(budget) => Some(hash_at(dir, &name, budget)?),
                    None => None,
                };
                out.push(entry(path, &meta, None, hash));
            }
            _ => out.push(entry(path, &meta, None, None)),
        }
    }
    Ok(())
}

/// The sha256 of the regular file `name` in `dir`, opened without following a symlink and
/// without updating its access time.
fn hash_at(dir: &OwnedFd, name: &[u8], budget: &mut Budget) -> std::io::Result<String> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::CLOEXEC;
    let file = match rustix::fs::openat(dir, name, flags | OFlags::NOATIME, Mode::empty()) {
        // NOATIME is for the file's owner (or root) only.
        Err(rustix::io::Errno::PERM) => rustix::fs::openat(dir, name, flags, Mode::empty())?,
        other => other?,
    };
    let mut buf = std::mem::take(&mut budget.buf);
    buf.resize(1 << 20, 0);
    let hashed = hash_with(&file, &mut buf, budget);
    budget.buf = buf;
    hashed
}

fn hash_with(file: &OwnedFd, buf: &mut [u8], budget: &mut Budget) -> std::io::Result<String> {
    let mut hasher = sha2::Sha256::new();
    loop {
        let n = rustix::io::read(file, &mut *buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        budget.charge(n as u64);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Opens a root directory for a walk.
pub fn open_root(root: &Path) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

pub fn manifest_path(root: &Path) -> PathBuf {
    let mut name = root.file_name().unwrap_or_default().to_owned();
    name.push(MANIFEST_SUFFIX);
    root.with_file_name(name)
}

/// Writes the manifest of `root` beside it, owner-only: one JSON line per entry.
pub fn write_manifest(root: &Path, entries: &[Entry]) -> std::io::Result<()> {
    let path = manifest_path(root);
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut temp = tempfile::Builder::new()
        .prefix(".tmp-manifest-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(dir)?;
    {
        let mut out = std::io::BufWriter::new(temp.as_file_mut());
        for entry in entries {
            serde_json::to_writer(&mut out, entry)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
    }
    temp.as_file().sync_all()?;
    temp.persist(&path).map_err(|e| e.error)?;
    Ok(())
}

/// Reads the manifest beside `root`; `None` when there is none (a root unpacked by a graven
/// from before manifests).
pub fn read_manifest(root: &Path) -> std::io::Result<Option<Vec<Entry>>> {
    let path = manifest_path(root);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    text.lines()
        .map(|line| serde_json::from_str(line).map_err(std::io::Error::other))
        .collect::<Result<Vec<Entry>, _>>()
        .map(Some)
}

/// Verifies `root` against `manifest`: the metadata pass, then, when it found nothing, the
/// hashing pass within `budget`. The first change found, in walk order.
pub fn verify(
    root: &Path,
    manifest: &[Entry],
    budget: &mut Budget,
) -> std::io::Result<Option<Drift>> {
    let fd = open_root(root)?;
    if let Some(found) = compare(manifest, &scan(&fd, None)?) {
        return Ok(Some(found));
    }
    Ok(compare(manifest, &scan(&fd, Some(budget))?))
}

fn describe(entry: &Entry) -> String {
    format!(
        "{:?} {:04o} {}:{}",
        entry.kind, entry.mode, entry.uid, entry.gid
    )
    .to_lowercase()
}

/// The first difference between what the manifest expects and what a walk found (hashes
/// compared only where the walk made them).
pub fn compare(expected: &[Entry], found: &[Entry]) -> Option<Drift> {
    let by_path: BTreeMap<&str, &Entry> = expected.iter().map(|e| (e.path.as_str(), e)).collect();
    let changed = |path: &str, change, expected: String, found: String| {
        Some(Drift::RootChanged {
            path: path.to_owned(),
            change,
            expected: Some(expected),
            found: Some(found),
        })
    };
    let mut seen = BTreeSet::new();
    for entry in found {
        let path = entry.path.as_str();
        seen.insert(path);
        let Some(want) = by_path.get(path) else {
            return Some(Drift::RootChanged {
                path: path.to_owned(),
                change: FileChange::Added,
                expected: None,
                found: Some(describe(entry)),
            });
        };
        if want.kind != entry.kind {
            return changed(path, FileChange::Kind, describe(want), describe(entry));
        }
        if want.mode != entry.mode {
            let mode = |m: u32| format!("{m:04o}");
            return changed(path, FileChange::Mode, mode(want.mode), mode(entry.mode));
        }
        if (want.uid, want.gid) != (entry.uid, entry.gid) {
            let owner = |e: &Entry| format!("{}:{}", e.uid, e.gid);
            return changed(path, FileChange::Owner, owner(want), owner(entry));
        }
        if want.link != entry.link {
            let link = |e: &Entry| e.link.clone().unwrap_or_default();
            return changed(path, FileChange::Link, link(want), link(entry));
        }
        let hash = |e: &Entry| {
            format!(
                "sha256:{} ({} bytes)",
                e.sha256.as_deref().unwrap_or("?"),
                e.size
            )
        };
        if want.size != entry.size || (entry.sha256.is_some() && want.sha256 != entry.sha256) {
            return changed(path, FileChange::Content, hash(want), hash(entry));
        }
    }
    expected
        .iter()
        .find(|e| !seen.contains(e.path.as_str()))
        .map(|gone| Drift::RootChanged {
            path: gone.path.clone(),
            change: FileChange::Removed,
            expected: Some(describe(gone)),
            found: None,
        })
}

/// A process of an instance: its PID on the host.
fn members(cgroup_procs: &[PathBuf], workload: u32) -> Vec<u32> {
    let mut pids = BTreeSet::new();
    for procs in cgroup_procs {
        if let Ok(text) = std::fs::read_to_string(procs) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
    }
    if pids.is_empty() {
        // No cgroup: the members of the workload's PID namespace (it is PID 1 there).
        let ns = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
        if let Some(own) = ns(workload)
            && let Ok(dir) = std::fs::read_dir("/proc")
        {
            for entry in dir.flatten() {
                if let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok())
                    && ns(pid).as_ref() == Some(&own)
                {
                    pids.insert(pid);
                }
            }
        }
        pids.insert(workload);
    }
    pids.into_iter().collect()
}

/// The first process of an instance that runs a program which is not its image's: not the
/// file its path names in `root` (written to /tmp, /dev/shm or a volume, or deleted), unless
/// its path is under one of `allowed` (absolute paths inside the instance).
pub fn foreign_program(
    root: &Path,
    cgroup_procs: &[PathBuf],
    workload: u32,
    allowed: &[String],
) -> Option<Drift> {
    let root_fd = open_root(root).ok()?;
    // graven's own binary is the helper of a probe or an exec before it runs its command.
    let own = std::fs::metadata("/proc/self/exe")
        .ok()
        .map(|m| identity(&m));
    for pid in members(cgroup_procs, workload) {
        let Ok(meta) = std::fs::metadata(format!("/proc/{pid}/exe")) else {
            continue; // Gone, a zombie, or a kernel thread.
        };
        if Some(identity(&meta)) == own {
            continue;
        }
        let Ok(link) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
            continue;
        };
        let exe = link.to_string_lossy().into_owned();
        let deleted = exe.ends_with(" (deleted)");
        if !deleted && allowed.iter().any(|a| under(&link, Path::new(a))) {
            continue;
        }
        let in_image = !deleted && from_image(&root_fd, &link, &meta, pid);
        if !in_image {
            return Some(Drift::ForeignProgram {
                pid,
                exe,
                cmdline: cmdline(pid),
            });
        }
    }
    None
}

fn identity(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// Whether `path` is `prefix` or below it, component by component.
fn under(path: &Path, prefix: &Path) -> bool {
    path.starts_with(prefix)
}

/// Whether the running program (`meta`, what `/proc/<pid>/exe` is) is the file `path` names
/// in the image's root: the same inode, on the mount that is the instance's root (the
/// read-only bind of the root, or the read-only overlay over it, whose files report their
/// inode in the root but a device of the overlay's own). A program on /tmp, /dev/shm or a
/// volume is on another mount; one the instance wrote has no path in the image's root.
fn from_image(root_fd: &OwnedFd, path: &Path, meta: &std::fs::Metadata, pid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(file) = rustix::fs::openat2(
        root_fd.as_fd(),
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        rustix::fs::ResolveFlags::IN_ROOT | rustix::fs::ResolveFlags::NO_MAGICLINKS,
    ) else {
        return false;
    };
    let Ok(image) = rustix::fs::fstat(&file) else {
        return false;
    };
    if image.st_ino != meta.ino() {
        return false;
    }
    let mount = |link: &str| {
        rustix::fs::statx(
            rustix::fs::CWD,
            format!("/proc/{pid}/{link}"),
            AtFlags::empty(),
            rustix::fs::StatxFlags::MNT_ID,
        )
        .ok()
        .filter(|s| s.stx_mask & rustix::fs::StatxFlags::MNT_ID.bits() != 0)
        .map(|s| s.stx_mnt_id)
    };
    matches!((mount("exe"), mount("root")), (Some(exe), Some(root)) if exe == root)
}

fn cmdline(pid: u32) -> String {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut text: String = String::from_utf8_lossy(&bytes)
        .trim_end_matches('\0')
        .replace('\0', " ");
    if text.len() > CMDLINE_BYTES {
        let mut end = CMDLINE_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Lowers the calling thread's CPU and I/O priority to idle: a check must never compete
/// with the instances it checks.
pub fn idle_priority() {
    // SAFETY: setpriority and ioprio_set on the calling thread (id 0 is the caller) change
    // only its scheduling; a failure leaves it as it was, which is harmless.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
        const IOPRIO_WHO_PROCESS: libc::c_long = 1;
        const IOPRIO_CLASS_IDLE: libc::c_long = 3;
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0,
            IOPRIO_CLASS_IDLE << 13,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        std::fs::write(dir.path().join("bin/app"), b"#!/bin/sh\necho hi\n").unwrap();
        std::os::unix::fs::symlink("app", dir.path().join("bin/link")).unwrap();
        std::fs::write(dir.path().join("etc"), b"config").unwrap();
        dir
    }

    fn manifest(dir: &Path) -> Vec<Entry> {
        scan(&open_root(dir).unwrap(), Some(&mut Budget::unbounded())).unwrap()
    }

    fn check(change: impl FnOnce(&Path), expected: Option<(&str, FileChange)>) {
        let dir = tree();
        let entries = manifest(dir.path());
        change(dir.path());
        let found = verify(dir.path(), &entries, &mut Budget::unbounded()).unwrap();
        let got = found.map(|d| match d {
            Drift::RootChanged { path, change, .. } => (path, change),
            other => panic!("{other:?}"),
        });
        assert_eq!(got, expected.map(|(p, c)| (p.to_owned(), c)));
    }

    #[test]
    fn each_kind_of_change_is_found_and_an_untouched_tree_passes() {
        use std::os::unix::fs::PermissionsExt;
        check(|_| {}, None);
        // Same size, one byte changed: only the hashing pass sees it.
        check(
            |d| std::fs::write(d.join("etc"), b"conf1g").unwrap(),
            Some(("/etc", FileChange::Content)),
        );
        check(
            |d| std::fs::write(d.join("etc"), b"config, longer").unwrap(),
            Some(("/etc", FileChange::Content)),
        );
        check(
            |d| {
                std::fs::set_permissions(d.join("bin/app"), std::fs::Permissions::from_mode(0o4755))
                    .unwrap()
            },
            Some(("/bin/app", FileChange::Mode)),
        );
        check(
            |d| std::fs::write(d.join("bin/new"), b"x").unwrap(),
            Some(("/bin/new", FileChange::Added)),
        );
        check(
            |d| std::fs::remove_file(d.join("etc")).unwrap(),
            Some(("/etc", FileChange::Removed)),
        );
        check(
            |d| {
                std::fs::remove_file(d.join("bin/link")).unwrap();
                std::os::unix::fs::symlink("/etc", d.join("bin/link")).unwrap();
            },
            Some(("/bin/link", FileChange::Link)),
        );
        check(
            |d| std::os::unix::fs::lchown(d.join("etc"), Some(1234), Some(1234)).unwrap(),
            Some(("/etc", FileChange::Owner)),
        );
    }

    #[test]
    fn a_symlinked_directory_is_not_followed() {
        let dir = tree();
        std::os::unix::fs::symlink("/etc", dir.path().join("hostetc")).unwrap();
        let entries = manifest(dir.path());
        assert!(!entries.iter().any(|e| e.path.starts_with("/hostetc/")));
    }

    #[test]
    fn names_that_are_not_utf8_are_escaped_and_distinct() {
        assert_eq!(escape(b"a%b\xff"), "a%25b%FF");
        assert_ne!(escape(b"%FF"), escape(b"\xff"));
    }

    #[test]
    fn the_manifest_is_owner_only_and_reads_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tree();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("f"), b"x").unwrap();
        let entries = manifest(&root);
        write_manifest(&root, &entries).unwrap();
        let path = manifest_path(&root);
        assert_eq!(path, dir.path().join("root.manifest"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_manifest(&root).unwrap(), Some(entries));
    }
}
