//! RUN's flags as BuildKit reads them: `--mount=type=cache|bind|secret|tmpfs,…` and
//! `--network=default|host|none`. Pure: parsing and checking only; `run` makes the mounts.
//! A mount's options are comma-separated `key=value` words (`ro`, `rw` and `required` may
//! stand alone); every unknown key, or one that means nothing for the type, is an error.

/// The flags of one RUN instruction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunFlags {
    pub mounts: Vec<RunMount>,
    /// `--network=none`: a network namespace of its own with nothing in it. Otherwise
    /// (`default`, `host`) the host's network, as `docker build --network=host` gives.
    pub no_network: bool,
}

/// One `--mount`: where it goes inside the image (absolute, or relative to the working
/// directory, without `.` or `..` components) and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunMount {
    pub target: String,
    pub kind: MountKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountKind {
    /// A path of the build context (`from` unset or `context`), read-only unless `rw`, when
    /// the step writes a copy that is thrown away.
    Bind {
        source: String,
        from: Option<String>,
        rw: bool,
    },
    /// A directory kept across bakes under `$GRAVEN_HOME/bake-mounts`, never in a layer nor
    /// in the cache key; the id defaults to the target.
    Cache {
        id: String,
        sharing: Sharing,
        readonly: bool,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// `graven bake --secret id=ID,…` as a read-only file (default `/run/secrets/ID`).
    Secret {
        id: String,
        required: bool,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// An empty tmpfs; 0 bytes means the kernel's default size.
    Tmpfs { bytes: u64 },
}

/// How bakes running at once share a cache mount. `locked` and `private` both wait for the
/// one using it (BuildKit gives `private` a fresh directory instead; graven keeps one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    Shared,
    Locked,
}

/// Where `graven bake --secret` finds a secret's value; the value itself is read only when a
/// step mounts it, so it is in no option, error or log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(std::path::PathBuf),
    /// An environment variable of graven's.
    Env(String),
}

/// Parses `graven bake --secret`'s value: `id=ID,src=PATH` (also `source=`), `id=ID,env=VAR`,
/// with BuildKit's optional `type=file|env`.
pub fn parse_secret(value: &str) -> Result<(String, SecretSource), String> {
    let fail = |reason: &str| format!("--secret {value}: {reason}");
    let (mut id, mut file, mut env, mut kind) = (None, None, None, None);
    for word in value.split(',').filter(|w| !w.is_empty()) {
        let (key, v) = word
            .split_once('=')
            .ok_or_else(|| fail(&format!("{word} is not key=value")))?;
        let slot = match key {
            "id" => &mut id,
            "src" | "source" => &mut file,
            "env" => &mut env,
            "type" => &mut kind,
            other => return Err(fail(&format!("unknown key {other}"))),
        };
        if v.is_empty() || slot.replace(v.to_owned()).is_some() {
            return Err(fail(&format!("{key} needs one value")));
        }
    }
    let id = id.ok_or_else(|| fail("it needs id=ID"))?;
    if id.contains('/') {
        return Err(fail("an id may not hold a '/'"));
    }
    let source = match (kind.as_deref(), file, env) {
        (None | Some("file"), Some(path), None) => SecretSource::File(path.into()),
        (None | Some("env"), None, Some(var)) => SecretSource::Env(var),
        (Some(other), _, _) if other != "file" && other != "env" => {
            return Err(fail(&format!("type={other}: expected file or env")));
        }
        _ => return Err(fail("it needs exactly one of src=PATH and env=VAR")),
    };
    Ok((id, source))
}

impl RunMount {
    /// The stage or image a bind mount's `from=` names, if any.
    pub fn bind_from(&self) -> Option<&str> {
        match &self.kind {
            MountKind::Bind {
                from: Some(from), ..
            } => Some(from),
            _ => None,
        }
    }
}

/// Parses RUN's flags (`flags` as the instruction gave them, keys lowercased).
pub fn parse_flags(flags: &[(String, String)]) -> Result<RunFlags, String> {
    let mut parsed = RunFlags::default();
    for (key, value) in flags {
        match key.as_str() {
            "mount" => parsed.mounts.push(parse_mount(value)?),
            "network" => {
                parsed.no_network = match value.as_str() {
                    "default" | "host" => false,
                    "none" => true,
                    other => {
                        return Err(format!("--network={other}: expected default, host or none"));
                    }
                }
            }
            other => return Err(format!("unknown flag --{other} for RUN")),
        }
    }
    let mut targets: Vec<&str> = parsed.mounts.iter().map(|m| m.target.as_str()).collect();
    targets.sort_unstable();
    if let Some(twice) = targets.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(format!("--mount target {} is given twice", twice[0]));
    }
    Ok(parsed)
}

/// Parses one `--mount` value.
pub fn parse_mount(value: &str) -> Result<RunMount, String> {
    let fail = |reason: String| format!("--mount={value}: {reason}");
    let mut options: Vec<(String, Option<String>)> = Vec::new();
    for word in value.split(',').filter(|w| !w.is_empty()) {
        let (key, value) = match word.split_once('=') {
            Some((key, value)) => (key.to_lowercase(), Some(value.to_owned())),
            None => (word.to_lowercase(), None),
        };
        let key = match key.as_str() {
            "dst" | "destination" => "target".to_owned(),
            "src" => "source".to_owned(),
            "ro" => "readonly".to_owned(),
            "readwrite" => "rw".to_owned(),
            _ => key,
        };
        if options.iter().any(|(k, _)| *k == key) {
            return Err(fail(format!("{key} is given twice")));
        }
        options.push((key, value));
    }
    let take = |key: &str| -> Option<Option<String>> {
        options
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let text = |key: &str| -> Result<Option<String>, String> {
        match take(key) {
            None => Ok(None),
            Some(Some(v)) if !v.is_empty() => Ok(Some(v)),
            Some(_) => Err(fail(format!("{key} needs a value"))),
        }
    };
    let flag = |key: &str| -> Result<bool, String> {
        match take(key) {
            None => Ok(false),
            Some(None) => Ok(true),
            Some(Some(v)) => match v.to_lowercase().as_str() {
                "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(fail(format!("{key}={v}: expected true or false"))),
            },
        }
    };
    let number = |key: &str, default: u32| -> Result<u32, String> {
        match text(key)? {
            None => Ok(default),
            Some(v) => v
                .parse::<u32>()
                .ok()
                .filter(|id| *id != u32::MAX)
                .ok_or_else(|| fail(format!("{key}={v}: expected a numeric id"))),
        }
    };
    let mode = |default: u32| -> Result<u32, String> {
        match text("mode")? {
            None => Ok(default),
            Some(v) => u32::from_str_radix(&v, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| fail(format!("mode={v}: expected an octal mode like 0755"))),
        }
    };
    let kind_name = text("type")?.unwrap_or_else(|| "bind".to_owned());
    let allowed: &[&str] = match kind_name.as_str() {
        "bind" => &["type", "target", "source", "from", "readonly", "rw"],
        "cache" => &[
            "type", "target", "id", "sharing", "readonly", "mode", "uid", "gid",
        ],
        "secret" => &["type", "target", "id", "required", "mode", "uid", "gid"],
        "tmpfs" => &["type", "target", "size"],
        other => {
            return Err(fail(format!(
                "type={other}: expected bind, cache, secret or tmpfs"
            )));
        }
    };
    if let Some((key, _)) = options.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        return Err(fail(format!("{key} is not an option of type={kind_name}")));
    }
    let target = text("target")?;
    let (target, kind) = match kind_name.as_str() {
        "bind" => {
            let rw = flag("rw")?;
            if rw && flag("readonly")? {
                return Err(fail("rw and readonly contradict each other".to_owned()));
            }
            let kind = MountKind::Bind {
                source: text("source")?.unwrap_or_else(|| "/".to_owned()),
                from: text("from")?.filter(|from| from != "context"),
                rw,
            };
            (target, kind)
        }
        "cache" => {
            let target = target.ok_or_else(|| fail("a cache mount needs a target".to_owned()))?;
            let sharing = match text("sharing")?.as_deref() {
                None | Some("shared") => Sharing::Shared,
                Some("locked" | "private") => Sharing::Locked,
                Some(other) => {
                    return Err(fail(format!(
                        "sharing={other}: expected shared, private or locked"
                    )));
                }
            };
            let kind = MountKind::Cache {
                id: text("id")?.unwrap_or_else(|| target.clone()),
                sharing,
                readonly: flag("readonly")?,
                mode: mode(0o755)?,
                uid: number("uid", 0)?,
                gid: number("gid", 0)?,
            };
            (Some(target), kind)
        }
        "secret" => {
            let id = match (text("id")?, &target) {
                (Some(id), _) => id,
                // BuildKit's default id: the target's last name.
                (None, Some(target)) => target.rsplit('/').next().unwrap_or_default().to_owned(),
                (None, None) => {
                    return Err(fail("a secret mount needs an id or a target".to_owned()));
                }
            };
            if id.is_empty() || id.contains('/') {
                return Err(fail(format!(
                    "secret id {id:?} may not be empty or hold a '/'"
                )));
            }
            let target = target.unwrap_or_else(|| format!("/run/secrets/{id}"));
            let kind = MountKind::Secret {
                id,
                // Not BuildKit's default: a secret the step needs and does not get is a
                // bake that fails here, not a step that fails later for want of a file.
                required: take("required").is_none() || flag("required")?,
                mode: mode(0o400)?,
                uid: number("uid", 0)?,
                gid: number("gid", 0)?,
            };
            (Some(target), kind)
        }
        _ => {
            let bytes = match text("size")? {
                None => 0,
                Some(size) => crate::size::parse(&size).map_err(|e| fail(format!("size: {e}")))?,
            };
            (target, MountKind::Tmpfs { bytes })
        }
    };
    let target = target.ok_or_else(|| fail("a mount needs a target".to_owned()))?;
    Ok(RunMount {
        target: clean_target(&target).map_err(fail)?,
        kind,
    })
}

/// The context paths the step's bind mounts show it (`.` for the whole context), whose
/// content its cache key holds.
pub fn context_binds(flags: &RunFlags) -> impl Iterator<Item = &str> {
    flags.mounts.iter().filter_map(|mount| match &mount.kind {
        MountKind::Bind {
            source, from: None, ..
        } => Some(match source.trim_start_matches('/') {
            "" => ".",
            rel => rel,
        }),
        _ => None,
    })
}

/// The target without `.` components or repeated slashes; `..` and `/` itself are refused.
fn clean_target(target: &str) -> Result<String, String> {
    let parts: Vec<&str> = target
        .split('/')
        .filter(|part| !part.is_empty() && *part != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(format!("target {target} may not contain '..'"));
    }
    if parts.is_empty() {
        return Err(format!("target {target} is the root itself"));
    }
    let joined = parts.join("/");
    Ok(if target.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    })
}

/// The target as an absolute path inside the image: a relative one is under `workdir`.
pub fn absolute_target(target: &str, workdir: &str) -> String {
    if target.starts_with('/') {
        target.to_owned()
    } else {
        format!("{}/{target}", workdir.trim_end_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(value: &str, expected: expect_test::Expect) {
        let got = match parse_mount(value) {
            Ok(mount) => format!("{mount:?}"),
            Err(e) => format!("error: {e}"),
        };
        expected.assert_eq(&got);
    }

    #[test]
    fn mounts_as_buildkit_reads_them() {
        use expect_test::expect;
        check(
            "type=cache,target=/var/cache/apt,sharing=locked",
            expect![[
                r#"RunMount { target: "/var/cache/apt", kind: Cache { id: "/var/cache/apt", sharing: Locked, readonly: false, mode: 493, uid: 0, gid: 0 } }"#
            ]],
        );
        check(
            "type=cache,dst=/root/.cache/,id=pip,mode=0700,uid=10,gid=20,ro",
            expect![[
                r#"RunMount { target: "/root/.cache", kind: Cache { id: "pip", sharing: Shared, readonly: true, mode: 448, uid: 10, gid: 20 } }"#
            ]],
        );
        check(
            "target=src,source=./app,rw",
            expect![[
                r#"RunMount { target: "src", kind: Bind { source: "./app", from: None, rw: true } }"#
            ]],
        );
        check(
            "type=bind,destination=/ctx,from=context",
            expect![[
                r#"RunMount { target: "/ctx", kind: Bind { source: "/", from: None, rw: false } }"#
            ]],
        );
        check(
            "type=secret,id=token",
            expect![[
                r#"RunMount { target: "/run/secrets/token", kind: Secret { id: "token", required: true, mode: 256, uid: 0, gid: 0 } }"#
            ]],
        );
        check(
            "type=secret,target=/etc/key,required=false,mode=0440,gid=5",
            expect![[
                r#"RunMount { target: "/etc/key", kind: Secret { id: "key", required: false, mode: 288, uid: 0, gid: 5 } }"#
            ]],
        );
        check(
            "type=tmpfs,target=/scratch,size=64M",
            expect![[r#"RunMount { target: "/scratch", kind: Tmpfs { bytes: 67108864 } }"#]],
        );
    }

    #[test]
    fn secrets_as_the_command_line_gives_them() {
        let ok = |value: &str| parse_secret(value).unwrap();
        assert_eq!(
            ok("id=token,src=/tmp/t"),
            ("token".to_owned(), SecretSource::File("/tmp/t".into()))
        );
        assert_eq!(
            ok("type=env,id=key,env=API_KEY"),
            ("key".to_owned(), SecretSource::Env("API_KEY".to_owned()))
        );
        for (value, error) in [
            ("src=/tmp/t", "--secret src=/tmp/t: it needs id=ID"),
            (
                "id=a,src=/x,env=Y",
                "--secret id=a,src=/x,env=Y: it needs exactly one of src=PATH and env=VAR",
            ),
            (
                "id=a",
                "--secret id=a: it needs exactly one of src=PATH and env=VAR",
            ),
            ("id=a,src=", "--secret id=a,src=: src needs one value"),
            ("id=a,path=/x", "--secret id=a,path=/x: unknown key path"),
            (
                "id=a/b,src=/x",
                "--secret id=a/b,src=/x: an id may not hold a '/'",
            ),
            (
                "id=a,type=ssh,src=/x",
                "--secret id=a,type=ssh,src=/x: type=ssh: expected file or env",
            ),
        ] {
            assert_eq!(parse_secret(value).unwrap_err(), error, "{value}");
        }
    }

    #[test]
    fn misused_mounts_say_what_is_wrong() {
        use expect_test::expect;
        check(
            "type=volume,target=/x",
            expect![
                "error: --mount=type=volume,target=/x: type=volume: expected bind, cache, secret or tmpfs"
            ],
        );
        check(
            "type=cache",
            expect!["error: --mount=type=cache: a cache mount needs a target"],
        );
        check(
            "type=tmpfs,target=/x,mode=0700",
            expect![
                "error: --mount=type=tmpfs,target=/x,mode=0700: mode is not an option of type=tmpfs"
            ],
        );
        check(
            "type=cache,target=/x,sharing=sometimes",
            expect![
                "error: --mount=type=cache,target=/x,sharing=sometimes: sharing=sometimes: expected shared, private or locked"
            ],
        );
        check(
            "type=cache,target=/a/../../etc",
            expect![
                "error: --mount=type=cache,target=/a/../../etc: target /a/../../etc may not contain '..'"
            ],
        );
        check(
            "type=tmpfs,target=/",
            expect!["error: --mount=type=tmpfs,target=/: target / is the root itself"],
        );
        check(
            "type=secret",
            expect!["error: --mount=type=secret: a secret mount needs an id or a target"],
        );
        check(
            "type=cache,target=/x,uid=-1",
            expect!["error: --mount=type=cache,target=/x,uid=-1: uid=-1: expected a numeric id"],
        );
        check(
            "type=cache,target=/x,uid=4294967295",
            expect![
                "error: --mount=type=cache,target=/x,uid=4294967295: uid=4294967295: expected a numeric id"
            ],
        );
        check(
            "type=bind,target=/x,rw,ro",
            expect![
                "error: --mount=type=bind,target=/x,rw,ro: rw and readonly contradict each other"
            ],
        );
        check(
            "type=tmpfs,target=/x,target=/y",
            expect!["error: --mount=type=tmpfs,target=/x,target=/y: target is given twice"],
        );
        check(
            "type=tmpfs,target=/x,size=lots",
            expect![[
                r#"error: --mount=type=tmpfs,target=/x,size=lots: size: "lots" is not a size (try "64MiB", "512M", "1G")"#
            ]],
        );
        assert_eq!(
            parse_flags(&[("network".into(), "bridge".into())]).unwrap_err(),
            "--network=bridge: expected default, host or none"
        );
        assert_eq!(
            parse_flags(&[
                ("mount".into(), "type=tmpfs,target=/x".into()),
                ("mount".into(), "type=cache,target=/x/".into()),
            ])
            .unwrap_err(),
            "--mount target /x is given twice"
        );
        assert_eq!(
            parse_flags(&[("security".into(), "insecure".into())]).unwrap_err(),
            "unknown flag --security for RUN"
        );
    }
}
