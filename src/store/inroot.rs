//! Paths inside an image's root filesystem, resolved by the kernel: `openat2` with
//! `RESOLVE_IN_ROOT` treats the root as `/` for every symlink and `..` met on the way, so a
//! path an image holds can never lead outside its root, whatever the image's symlinks say.
//! Unpacking, bake's RUN (WORKDIR, the image's user names) and anything else that opens a path
//! taken from image content go through here; none of them joins strings onto the root.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

/// How every path under a root is resolved: inside it, and never through the magic links of
/// `/proc` (which lead anywhere).
const IN_ROOT: ResolveFlags = ResolveFlags::IN_ROOT.union(ResolveFlags::NO_MAGICLINKS);

/// The mode of the directories an image implies without listing them, whatever the umask.
const DIR_MODE: u32 = 0o755;

/// Opens the directory that is an image's `/`. The path is graven's own (a temp dir, the
/// store's rootfs dir), so it is opened as given.
pub fn open_root(root: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Refuses what cannot be one name in a directory: empty, `.`, `..`, or holding a `/` (or a
/// NUL, which no syscall takes).
pub fn check_name(name: &OsStr) -> io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{:?} is not a file name", name.to_string_lossy()),
        ));
    }
    if bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{:?} holds a NUL byte", name.to_string_lossy()),
        ));
    }
    Ok(())
}

/// Opens the directory at `path` (relative to `root`, or absolute meaning the same) with
/// every symlink on the way resolved inside the root.
pub fn open_dir(root: BorrowedFd<'_>, path: &Path) -> io::Result<OwnedFd> {
    let path = relative(path)?;
    Ok(rustix::fs::openat2(
        root,
        dot_if_empty(&path),
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        IN_ROOT,
    )?)
}

/// Opens the directory at `path` under `root`, making the missing ones one component at a
/// time (0755), each resolved inside the root before the next is made. A symlink whose target
/// is missing is followed and its target made, inside the root, as `mkdir -p` in a chroot
/// would (a layer may hold `var/run -> /run` before anything made `/run`).
pub fn make_dirs(root: BorrowedFd<'_>, path: &Path) -> io::Result<OwnedFd> {
    const MAX_LINKS: usize = 40;
    let path = relative(path)?;
    // Most entries land in a directory that exists: one syscall for them.
    match open_dir(root, &path) {
        Ok(fd) => return Ok(fd),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut pending: VecDeque<OsString> = path.iter().map(ToOwned::to_owned).collect();
    let mut so_far = PathBuf::new();
    let mut dir = open_dir(root, &so_far)?;
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name.is_empty() || name == "." {
            continue;
        }
        so_far.push(&name);
        match open_dir(root, &so_far) {
            Ok(fd) => {
                dir = fd;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        match rustix::fs::readlinkat(&dir, name.as_os_str(), Vec::new()) {
            Ok(target) => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(rustix::io::Errno::LOOP.into());
                }
                let target = PathBuf::from(OsStr::from_bytes(target.as_bytes()));
                so_far.pop();
                if target.is_absolute() {
                    so_far = PathBuf::new();
                }
                for component in target.components().rev() {
                    match component {
                        Component::Normal(part) => pending.push_front(part.to_owned()),
                        Component::ParentDir => pending.push_front("..".into()),
                        _ => {}
                    }
                }
                dir = open_dir(root, &so_far)?;
            }
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => {
                check_name(&name)?;
                rustix::fs::mkdirat(&dir, name.as_os_str(), Mode::from_raw_mode(DIR_MODE))?;
                let made = open_dir(root, &so_far)?;
                // mkdir applied the umask; an image's directories do not have one.
                rustix::fs::fchmod(&made, Mode::from_raw_mode(DIR_MODE))?;
                dir = made;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(dir)
}

/// `mkdir -p` of `path` inside the image at `root` (bake's WORKDIR).
pub fn create_dir_all(root: &Path, path: &Path) -> io::Result<()> {
    let root = open_root(root)?;
    make_dirs(root.as_fd(), path).map(drop)
}

/// The content of the regular file at `path` inside the image at `root`, its symlinks
/// resolved inside the root. Anything but a regular file (a fifo would block, a device node
/// would read the host's device) is refused before it is opened for reading.
pub fn read_file(root: &Path, path: &Path) -> io::Result<Vec<u8>> {
    let root = open_root(root)?;
    let path = relative(path)?;
    let open = |flags: OFlags| {
        rustix::fs::openat2(
            &root,
            dot_if_empty(&path),
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            IN_ROOT,
        )
    };
    let located = open(OFlags::PATH)?;
    let seen = rustix::fs::fstat(&located)?;
    if FileType::from_raw_mode(seen.st_mode) != FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    let file = open(OFlags::RDONLY | OFlags::NOCTTY | OFlags::NONBLOCK)?;
    let opened = rustix::fs::fstat(&file)?;
    if (opened.st_dev, opened.st_ino) != (seen.st_dev, seen.st_ino) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} changed while it was opened", path.display()),
        ));
    }
    let mut out = Vec::new();
    std::fs::File::from(file).read_to_end(&mut out)?;
    Ok(out)
}

/// Removes `name` in `dir`, a directory with all it holds. Nothing is followed: a symlink is
/// removed as itself, and each directory is entered by descriptor, `O_NOFOLLOW`.
pub fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let stat = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
        let child = rustix::fs::openat(
            dir,
            name,
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        remove_children(child.as_fd(), |_| false)?;
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    } else {
        rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
    }
    Ok(())
}

/// Removes what `dir` holds, except the names `keep` says to keep.
pub fn remove_children(dir: BorrowedFd<'_>, keep: impl Fn(&OsStr) -> bool) -> io::Result<()> {
    // The names are read first: removing while reading a directory may skip entries.
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name != "." && name != ".." && !keep(name) {
            names.push(name.to_owned());
        }
    }
    for name in names {
        remove_at(dir, &name)?;
    }
    Ok(())
}

/// `path` relative to the root: a leading `/` and `.` are dropped (the root is `/`); `..`
/// stays, as the kernel stops it at the root.
fn relative(path: &Path) -> io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => {
                if name.as_bytes().contains(&0) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{} holds a NUL byte", path.display()),
                    ));
                }
                out.push(name);
            }
            Component::ParentDir => out.push(".."),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(out)
}

fn dot_if_empty(path: &Path) -> &Path {
    if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A root with `out -> /`, `up -> ../../..` and `abs -> <the host dir>`, beside a host dir
    /// holding `secret`.
    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let work = tempfile::tempdir().unwrap();
        let root = work.path().join("root");
        let host = work.path().join("host");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(&host).unwrap();
        std::fs::write(host.join("secret"), "host").unwrap();
        std::os::unix::fs::symlink("/", root.join("out")).unwrap();
        std::os::unix::fs::symlink("../../..", root.join("up")).unwrap();
        std::os::unix::fs::symlink(&host, root.join("abs")).unwrap();
        (work, root, host)
    }

    #[test]
    fn workdir_through_a_symlink_stays_inside_the_root() {
        let (_work, root, host) = setup();
        for (workdir, made) in [
            ("/abs/x", "abs/x"),
            ("/out/tmp/y", "tmp/y"),
            ("/up/z", "z"),
            ("/../../w", "w"),
            ("/etc/../../v", "v"),
        ] {
            create_dir_all(&root, Path::new(workdir)).unwrap();
            let inside = if workdir.starts_with("/abs") {
                // `abs` names the host dir by its absolute path: inside the root that path
                // is made afresh.
                root.join(host.strip_prefix("/").unwrap()).join("x")
            } else {
                root.join(made)
            };
            assert!(
                inside.is_dir(),
                "{workdir}: {} was not made",
                inside.display()
            );
        }
        assert!(!host.join("x").exists(), "a directory was made on the host");
    }

    #[test]
    fn reading_through_a_symlink_stays_inside_the_root() {
        let (_work, root, host) = setup();
        std::os::unix::fs::symlink(host.join("secret"), root.join("etc/passwd")).unwrap();
        assert_eq!(
            read_file(&root, Path::new("etc/passwd"))
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
        std::fs::write(root.join("etc/group"), "g").unwrap();
        assert_eq!(read_file(&root, Path::new("/up/etc/group")).unwrap(), b"g");
        rustix::fs::mknodat(
            open_root(&root).unwrap(),
            "etc/fifo",
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        assert!(read_file(&root, Path::new("etc/fifo")).is_err());
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", ".", "..", "a/b"] {
            assert!(check_name(OsStr::new(bad)).is_err(), "{bad:?}");
        }
        for good in ["a", "...", ".wh.x", "a b"] {
            assert!(check_name(OsStr::new(good)).is_ok(), "{good:?}");
        }
    }
}
