//! The image's own settings as Docker reads them, for every backend and for the deploy that
//! resolves a service's config: the command an instance runs (ENTRYPOINT and CMD against
//! `entrypoint` and `command`), the default port (EXPOSE), the volume an image's VOLUME
//! becomes, and where tmpfs mounts and volumes may go. Pure: no file, no process.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{RuntimeError, VolumeMount};

/// A size-capped tmpfs an instance gets at `path` (`tmpfs` in graven.toml, `graven run
/// --tmpfs`), mode 1777 as Docker's, `nosuid` and `nodev`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TmpfsMount {
    /// The absolute path inside the instance.
    pub path: String,
    /// The size cap in bytes (never 0: a tmpfs of size 0 would be unlimited).
    pub bytes: u64,
}

impl TmpfsMount {
    /// Parses the CLI's `PATH[:SIZE]`; the size defaults to `/tmp`'s.
    pub fn parse(text: &str) -> Result<TmpfsMount, RuntimeError> {
        let (path, size) = match text.split_once(':') {
            Some((path, size)) => (path, Some(size)),
            None => (text, None),
        };
        let bytes = match size {
            None => crate::sandbox::DEFAULT_TMP_BYTES,
            Some(size) => crate::size::parse(size)
                .ok()
                .filter(|&b| b > 0)
                .ok_or_else(|| RuntimeError::BadTmpfs {
                    path: path.to_owned(),
                    reason: format!("{size:?} is not a size (e.g. 16MiB)"),
                })?,
        };
        Ok(TmpfsMount {
            path: path.to_owned(),
            bytes,
        })
    }
}

/// The paths a tmpfs may not be mounted on or under: the sandbox's own mounts (`/tmp` is
/// sized with `limits.tmp`).
const RESERVED: [&str; 4] = ["/tmp", "/dev", "/proc", "/sys"];

/// Checks every tmpfs path (absolute, no `.` or `..`, not `/` nor a sandbox's own mount) and
/// that no two mounts overlap: a tmpfs on or inside a volume or another tmpfs, or a volume
/// inside a tmpfs, would hide one of them.
pub fn check_mounts(volumes: &[VolumeMount], tmpfs: &[TmpfsMount]) -> Result<(), RuntimeError> {
    let bad = |path: &str, reason: String| {
        Err(RuntimeError::BadTmpfs {
            path: path.to_owned(),
            reason,
        })
    };
    for (i, mount) in tmpfs.iter().enumerate() {
        let path = mount.path.as_str();
        if !path.starts_with('/') {
            return bad(path, "the path must be absolute".to_owned());
        }
        if path.split('/').any(|c| c == ".." || c == ".") {
            return bad(path, "the path may not contain '.' or '..'".to_owned());
        }
        if path.split('/').all(str::is_empty) {
            return bad(path, "a tmpfs cannot be mounted over /".to_owned());
        }
        if mount.bytes == 0 {
            return bad(path, "the size must be more than zero".to_owned());
        }
        if let Some(reserved) = RESERVED.iter().find(|r| overlap(path, r)) {
            return bad(
                path,
                format!("{reserved} is the sandbox's own (size /tmp with limits.tmp)"),
            );
        }
        if let Some(volume) = volumes.iter().find(|v| overlap(path, &v.path)) {
            return bad(
                path,
                format!(
                    "it overlaps volume {:?} mounted at {}",
                    volume.name, volume.path
                ),
            );
        }
        if let Some(other) = tmpfs[..i].iter().find(|t| overlap(path, &t.path)) {
            return bad(path, format!("it overlaps the tmpfs at {}", other.path));
        }
    }
    Ok(())
}

/// Whether one of two absolute paths is the other or inside it, component by component.
fn overlap(a: &str, b: &str) -> bool {
    let parts = |p: &str| -> Vec<String> {
        p.split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let (a, b) = (parts(a), parts(b));
    let n = a.len().min(b.len());
    a[..n] == b[..n]
}

/// What an instance runs, as Docker composes it: `entrypoint` replaces the image's
/// ENTRYPOINT, `command` its CMD, and an `entrypoint` given without a `command` clears the
/// image's CMD (`docker run --entrypoint`). An empty `entrypoint` clears ENTRYPOINT.
pub fn compose_command(
    image_entrypoint: Option<&[String]>,
    image_cmd: Option<&[String]>,
    entrypoint: Option<&[String]>,
    command: Option<&[String]>,
) -> Vec<String> {
    let cmd = match (command, entrypoint) {
        (Some(command), _) => command,
        (None, Some(_)) => &[],
        (None, None) => image_cmd.unwrap_or_default(),
    };
    entrypoint
        .or(image_entrypoint)
        .unwrap_or_default()
        .iter()
        .chain(cmd)
        .cloned()
        .collect()
}

/// The image's one exposed TCP port, the default of a service that names none: `None` when
/// the image exposes no TCP port, the ports written as Docker does (`80/tcp`) when it
/// exposes several. UDP and SCTP ports are not a service's: graven routes TCP.
pub fn exposed_port(exposed: &BTreeMap<String, serde_json::Value>) -> Result<Option<u16>, String> {
    let tcp: Vec<(u16, &String)> = exposed
        .keys()
        .filter_map(|key| {
            let (port, protocol) = key.split_once('/').unwrap_or((key, "tcp"));
            let port = port.parse::<u16>().ok().filter(|&p| p > 0)?;
            protocol.eq_ignore_ascii_case("tcp").then_some((port, key))
        })
        .collect();
    match tcp.as_slice() {
        [] => Ok(None),
        [(port, _)] => Ok(Some(*port)),
        many => Err(many
            .iter()
            .map(|(_, key)| key.as_str())
            .collect::<Vec<_>>()
            .join(", ")),
    }
}

/// The volume an image's VOLUME `path` becomes for `service`: the service's name, a `.`,
/// then the path's components joined by `-`, each byte other than an ASCII letter, digit or
/// `.` written `_xx` (its hex). `db` and `/var/lib/postgresql/data` give
/// `db.var-lib-postgresql-data`. No two (service, path) pairs give the same name (a
/// service's name holds no `.`, and `-` and `_` in a path are escaped), and none is a name
/// graven.toml can declare (those hold no `.`), so an image's volume never meets another.
pub fn volume_name(service: &str, path: &str) -> String {
    let encoded: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(|component| {
            component
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b == b'.' {
                        char::from(b).to_string()
                    } else {
                        format!("_{b:02x}")
                    }
                })
                .collect()
        })
        .collect();
    format!("{service}.{}", encoded.join("-"))
}

/// The image's VOLUME paths that neither a volume nor a tmpfs of the instance covers
/// (mounted at that path exactly), in the image's order; `/` is never one.
pub fn uncovered_volumes<'a>(
    image_volumes: &'a BTreeMap<String, serde_json::Value>,
    volumes: &[VolumeMount],
    tmpfs: &[TmpfsMount],
) -> Vec<&'a str> {
    let same = |a: &str, b: &str| a.trim_end_matches('/') == b.trim_end_matches('/');
    image_volumes
        .keys()
        .map(String::as_str)
        .filter(|path| !path.split('/').all(str::is_empty))
        .filter(|path| {
            !volumes.iter().any(|v| same(&v.path, path))
                && !tmpfs.iter().any(|t| same(&t.path, path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    /// Docker: `docker run IMG ARGS` replaces CMD and keeps ENTRYPOINT; `--entrypoint X`
    /// replaces ENTRYPOINT and clears CMD unless ARGS are given; `--entrypoint ""` clears it.
    #[test]
    fn a_command_replaces_cmd_and_keeps_the_entrypoint() {
        let ep = strings(&["/entry", "-x"]);
        let cmd = strings(&["serve"]);
        let check = |entrypoint: Option<&[&str]>, command: Option<&[&str]>, expected: &[&str]| {
            let entrypoint = entrypoint.map(strings);
            let command = command.map(strings);
            assert_eq!(
                compose_command(
                    Some(&ep),
                    Some(&cmd),
                    entrypoint.as_deref(),
                    command.as_deref()
                ),
                strings(expected),
                "{entrypoint:?} {command:?}"
            );
        };
        check(None, None, &["/entry", "-x", "serve"]);
        check(None, Some(&["run", "1"]), &["/entry", "-x", "run", "1"]);
        check(Some(&["/sh"]), None, &["/sh"]);
        check(Some(&["/sh"]), Some(&["-c", "id"]), &["/sh", "-c", "id"]);
        check(Some(&[]), None, &[]);
        check(Some(&[]), Some(&["/bin/id"]), &["/bin/id"]);
        assert_eq!(
            compose_command(None, Some(&cmd), None, None),
            strings(&["serve"])
        );
    }

    #[test]
    fn the_one_exposed_tcp_port_is_the_default() {
        let check = |keys: &[&str], expected: Result<Option<u16>, &str>| {
            let exposed = keys
                .iter()
                .map(|k| ((*k).to_owned(), serde_json::json!({})))
                .collect();
            assert_eq!(
                exposed_port(&exposed),
                expected.map_err(str::to_owned),
                "{keys:?}"
            );
        };
        check(&[], Ok(None));
        check(&["80/tcp"], Ok(Some(80)));
        check(&["8080"], Ok(Some(8080)));
        check(&["53/udp"], Ok(None));
        check(&["53/udp", "8080/tcp"], Ok(Some(8080)));
        check(&["443/tcp", "80/tcp"], Err("443/tcp, 80/tcp"));
    }

    #[test]
    fn an_image_volume_is_named_after_the_service_and_path_without_collisions() {
        assert_eq!(
            volume_name("db", "/var/lib/postgresql/data"),
            "db.var-lib-postgresql-data"
        );
        assert_eq!(volume_name("web", "/srv/my-app/"), "web.srv-my_2dapp");
        assert_ne!(volume_name("db", "/a/b"), volume_name("db", "/a-b"));
        assert_ne!(volume_name("db", "/a_2d"), volume_name("db", "/a-"));
        assert_ne!(volume_name("db-a", "/b"), volume_name("db", "/a/b"));
        let name = volume_name("db", "/data dir/x");
        let mount = VolumeMount {
            name: name.clone(),
            path: "/x".to_owned(),
        };
        assert!(mount.validate().is_ok(), "{name}");
    }

    #[test]
    fn tmpfs_paths_are_absolute_and_overlap_nothing() {
        let volumes = [VolumeMount {
            name: "data".to_owned(),
            path: "/var/lib/data".to_owned(),
        }];
        let tmpfs = |paths: &[&str]| -> Vec<TmpfsMount> {
            paths
                .iter()
                .map(|p| TmpfsMount {
                    path: (*p).to_owned(),
                    bytes: 1 << 20,
                })
                .collect()
        };
        let check = |paths: &[&str], expected: Option<&str>| {
            let result = check_mounts(&volumes, &tmpfs(paths));
            match expected {
                None => assert!(result.is_ok(), "{paths:?}: {result:?}"),
                Some(text) => {
                    let error = result.unwrap_err().to_string();
                    assert!(error.contains(text), "{paths:?}: {error}");
                }
            }
        };
        check(&["/run", "/var/lib/nginx"], None);
        check(&["/var/lib/database"], None);
        check(&["run"], Some("must be absolute"));
        check(&["/"], Some("over /"));
        check(&["/run/../etc"], Some("'..'"));
        check(&["/var/lib/data"], Some("overlaps volume \"data\""));
        check(&["/var/lib/data/cache"], Some("overlaps volume"));
        check(&["/var"], Some("overlaps volume"));
        check(&["/run", "/run/nginx"], Some("overlaps the tmpfs at /run"));
        check(&["/run/", "/run"], Some("overlaps the tmpfs"));
        check(&["/tmp"], Some("limits.tmp"));
        check(&["/dev/x"], Some("sandbox's own"));
    }

    #[test]
    fn an_image_volume_a_mount_covers_needs_no_volume() {
        let image: BTreeMap<String, serde_json::Value> = ["/data", "/cache", "/logs/"]
            .iter()
            .map(|k| ((*k).to_owned(), serde_json::json!({})))
            .collect();
        let volumes = [VolumeMount {
            name: "d".to_owned(),
            path: "/data/".to_owned(),
        }];
        let tmpfs = [TmpfsMount {
            path: "/cache".to_owned(),
            bytes: 1,
        }];
        assert_eq!(uncovered_volumes(&image, &volumes, &tmpfs), ["/logs/"]);
    }
}
