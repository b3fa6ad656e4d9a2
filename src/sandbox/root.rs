//! Paths inside an image's root, resolved by the kernel as if the root were `/` (openat2 with
//! `RESOLVE_IN_ROOT`, magic links refused): an image's absolute symlink, `..` or
//! `/proc/self/root` trick can never lead outside it. The sandbox opens every mount point it
//! makes in a root through here; the local runtime every file it reads from one (passwd,
//! group, the entrypoint's presence). Never a string join of a root and an image's path.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags, ResolveFlags};

/// How every path under a root is resolved.
const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT.union(ResolveFlags::NO_MAGICLINKS);

/// The files `read_file` reads at most this much of: passwd and group files are small, and an
/// image's file must not make graven read without end.
pub const READ_LIMIT: u64 = 1 << 20;

/// Opens the directory `root` itself, to resolve paths under (`O_PATH`).
pub fn open_root(root: &Path) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens `path` (absolute or not, as an image names it) inside the root `root` with `flags`
/// (close-on-exec always). A busy rename elsewhere can make openat2 ask for a retry, which
/// it gets a few times.
pub fn open_in(root: impl AsFd, path: &str, flags: OFlags) -> std::io::Result<OwnedFd> {
    let relative = path.trim_start_matches('/');
    let relative = if relative.is_empty() { "." } else { relative };
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(
            root.as_fd(),
            relative,
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        ) {
            Err(rustix::io::Errno::AGAIN) if tries < 8 => tries += 1,
            result => return Ok(result?),
        }
    }
}

/// Whether `path` exists inside `root` (a dangling symlink does not).
pub fn exists(root: &Path, path: &str) -> bool {
    open_root(root).is_ok_and(|fd| open_in(&fd, path, OFlags::PATH).is_ok())
}

/// The regular file `path` inside `root`, read up to `READ_LIMIT` bytes; `None` when it is
/// missing or not a regular file. The kind is checked on an `O_PATH` descriptor before the file
/// is opened for reading: opening a FIFO would block, and opening a device node the image holds
/// would act on the host's device (a watchdog starts counting when opened). The file opened
/// for reading must be the one checked.
pub fn read_file(root: &Path, path: &str) -> std::io::Result<Option<Vec<u8>>> {
    let fd = open_root(root)?;
    let located = match open_in(&fd, path, OFlags::PATH) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let seen = rustix::fs::fstat(&located)?;
    if rustix::fs::FileType::from_raw_mode(seen.st_mode) != rustix::fs::FileType::RegularFile {
        return Ok(None);
    }
    let file = open_in(
        &fd,
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
    )?;
    let opened = rustix::fs::fstat(&file)?;
    if (opened.st_dev, opened.st_ino) != (seen.st_dev, seen.st_ino) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{path} changed while it was opened"),
        ));
    }
    let mut bytes = Vec::new();
    std::fs::File::from(file)
        .take(READ_LIMIT)
        .read_to_end(&mut bytes)?;
    Ok(Some(bytes))
}

/// `read_file` as text (lossy), empty when missing or unreadable: what a USER lookup reads.
pub fn read_text(root: &Path, path: &str) -> String {
    read_file(root, path)
        .ok()
        .flatten()
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_symlink_never_reads_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(dir.path().join("secret"), "host").unwrap();
        let outside = dir.path().join("secret");
        std::os::unix::fs::symlink(&outside, root.join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("../../secret", root.join("etc/group")).unwrap();
        std::os::unix::fs::symlink("/proc/self/root/etc/hostname", root.join("etc/magic")).unwrap();
        // Each resolves inside the root, where there is nothing.
        assert_eq!(read_text(&root, "/etc/passwd"), "");
        assert_eq!(read_text(&root, "etc/group"), "");
        assert_eq!(read_text(&root, "etc/magic"), "");
        assert!(!exists(&root, "etc/passwd"));
        std::fs::write(root.join("secret"), "image").unwrap();
        assert_eq!(read_text(&root, "/etc/passwd"), "");
        assert_eq!(read_text(&root, "/etc/group"), "image");
    }

    #[test]
    fn a_fifo_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("fifo"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        assert_eq!(read_file(dir.path(), "fifo").unwrap(), None);
    }

    /// An image's device node is never opened, not even to look at it: opening would act on
    /// the host's device. inotify sees every open of the node; opening it by hand is the
    /// negative control.
    #[test]
    fn a_device_node_is_not_opened() {
        use rustix::fs::inotify;
        if !rustix::process::geteuid().is_root() {
            return; // only root makes device nodes
        }
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("zero");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &node,
            rustix::fs::FileType::CharacterDevice,
            Mode::from_raw_mode(0o644),
            rustix::fs::makedev(1, 5),
        )
        .unwrap();
        let watch =
            inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC).unwrap();
        inotify::add_watch(&watch, &node, inotify::WatchFlags::OPEN).unwrap();
        let opened = || {
            let mut events = [0u8; 256];
            match rustix::io::read(&watch, &mut events) {
                Ok(n) => n > 0,
                Err(rustix::io::Errno::AGAIN) => false,
                Err(e) => panic!("reading inotify: {e}"),
            }
        };
        assert_eq!(read_file(dir.path(), "zero").unwrap(), None);
        assert!(!opened(), "read_file opened the image's device node");
        drop(std::fs::File::open(&node).unwrap());
        assert!(opened(), "inotify did not see an open");
    }
}
