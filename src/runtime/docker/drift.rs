//! Drift on Docker: `docker diff` (the container's changes against its image) read against
//! the paths an instance may write. The root is read-only, so any change outside a tmpfs, a
//! volume or the engine's own mount points is a write that should not have been possible:
//! evidence of a changed root, the path and the kind of change. Pure: the engine's answer in,
//! findings out. Programs that are not the image's are not looked for here (no `/proc` of a
//! remote engine's host to read).

use bollard::models::{ChangeType, FilesystemChange};

use crate::runtime::{Drift, FileChange};

/// The paths the engine mounts into every container, and their contents.
const ENGINE_PATHS: [&str; 8] = [
    "/dev",
    // The init (`HostConfig::init`) is bound here.
    "/sbin/docker-init",
    "/proc",
    "/sys",
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/tmp",
];

/// The writable paths of an instance as recorded on its container: tmpfs mounts and
/// volumes, the engine's own mounts besides.
pub fn writable_paths(spec_tmpfs: &[String], spec_volumes: &[String]) -> Vec<String> {
    ENGINE_PATHS
        .iter()
        .map(|p| (*p).to_owned())
        .chain(spec_tmpfs.iter().cloned())
        .chain(spec_volumes.iter().cloned())
        .collect()
}

/// The changes that are drift, in the engine's order. A change at or under a writable
/// path is not; neither is a directory above one, changed or added (the engine made the
/// mount point inside it, and the directories to it where the image has none).
pub fn findings(changes: &[FilesystemChange], writable: &[String]) -> Vec<Drift> {
    changes
        .iter()
        .filter(|change| {
            let path = change.path.as_str();
            let inside = writable.iter().any(|w| under(path, w));
            let above = change.kind != ChangeType::_2 && writable.iter().any(|w| under(w, path));
            !inside && !above
        })
        .map(|change| Drift::RootChanged {
            path: change.path.clone(),
            change: match change.kind {
                ChangeType::_1 => FileChange::Added,
                ChangeType::_2 => FileChange::Removed,
                ChangeType::_0 => FileChange::Content,
            },
            expected: None,
            found: Some(format!("docker diff: {}", kind_letter(change.kind))),
        })
        .collect()
}

fn kind_letter(kind: ChangeType) -> &'static str {
    match kind {
        ChangeType::_0 => "C",
        ChangeType::_1 => "A",
        ChangeType::_2 => "D",
    }
}

/// Whether `path` is `dir` or inside it, component by component.
fn under(path: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    path == dir || (path.starts_with(dir) && path[dir.len()..].starts_with('/')) || dir.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(path: &str, kind: ChangeType) -> FilesystemChange {
        FilesystemChange {
            path: path.to_owned(),
            kind,
        }
    }

    #[test]
    fn only_changes_outside_the_writable_paths_are_drift() {
        let writable = writable_paths(&["/cache".to_owned()], &["/var/data".to_owned()]);
        let changes = [
            change("/var", ChangeType::_0),
            change("/var/data", ChangeType::_1),
            change("/var/data/x", ChangeType::_1),
            change("/cache", ChangeType::_1),
            change("/etc", ChangeType::_0),
            change("/sbin", ChangeType::_1),
            change("/sbin/docker-init", ChangeType::_1),
            change("/etc/hosts", ChangeType::_1),
            change("/cachet", ChangeType::_1),
            change("/etc/passwd", ChangeType::_0),
            change("/bin/sh", ChangeType::_2),
        ];
        let found = findings(&changes, &writable);
        let paths: Vec<(&str, FileChange)> = found
            .iter()
            .map(|d| match d {
                Drift::RootChanged { path, change, .. } => (path.as_str(), *change),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            paths,
            [
                ("/cachet", FileChange::Added),
                ("/etc/passwd", FileChange::Content),
                ("/bin/sh", FileChange::Removed),
            ]
        );
    }
}
