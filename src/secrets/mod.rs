//! Secrets own the values `graven.toml` names but never holds: one store per app and
//! environment, `$GRAVEN_HOME/apps/<app>/<env>/secrets/<name>/<version>`, each version a file
//! of its own (0600, in 0700 directories, written to a temp file, fsynced and renamed, never
//! changed after). Setting a secret again adds a version; a release pins the version it was
//! deployed with, so rotating a secret and deploying makes a new release, and rolling back
//! finds the old value still there.
//!
//! Nothing here knows releases, instances or the log: the spec names secrets, the deploy pins
//! versions (`resolve`), the controller reads a pinned value when it starts an instance. A
//! value leaves this module only towards the workload that asked for it. Values are not
//! encrypted at rest: a key kept on the same disk, readable by the same user, guards nothing
//! that the file modes do not (docs/security.md says why, and what to do for more).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// The largest value a secret may hold: far more than a password, a key or a certificate
/// chain needs, and small enough that every start of an instance may read it whole.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// The directory of a store under its app's environment directory.
pub const DIR: &str = "secrets";

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error(
        "secret name {name:?} is not valid: 1 to 63 lowercase letters, digits, '-', '_' or \
         '.', starting with a letter or a digit"
    )]
    BadName { name: String },
    #[error("{kind} name {name:?} cannot name a secret store")]
    BadScope { kind: &'static str, name: String },
    #[error("secret {name:?} is {size} bytes; a secret holds at most 64 KiB")]
    TooLarge { name: String, size: usize },
    #[error(
        "secret {name:?} is not UTF-8 text; secrets become environment variables, whose \
         values are text"
    )]
    NotText { name: String },
    #[error("secret {name:?} holds a NUL byte, which no environment variable can")]
    HoldsNul { name: String },
    #[error("secret {name:?} is not set in {scope}")]
    NotSet { name: String, scope: String },
    #[error("secret {name:?} has no version {version} in {scope}")]
    NoVersion {
        name: String,
        version: u64,
        scope: String,
    },
    #[error("secret store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What `list` tells of a secret: never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretInfo {
    pub name: String,
    /// Its latest version.
    pub version: u64,
    /// When that version was set, in milliseconds since the Unix epoch.
    pub set_at_ms: u64,
}

/// A secret as a release pins it: its name and the version the deploy found latest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    pub name: String,
    pub version: u64,
}

/// The secrets of one app in one environment.
#[derive(Debug, Clone)]
pub struct Secrets {
    dir: PathBuf,
    /// `app/environment`, as messages name the store.
    scope: String,
}

/// The environment directory of `app` under `home`, as the daemon lays it out.
fn env_dir(home: &Path, app: &str, environment: &str) -> PathBuf {
    home.join("apps").join(app).join(environment)
}

impl Secrets {
    /// The store of `app` in `environment` under `home`. Nothing is made until a secret is
    /// set; the names are checked so that neither can lead outside the home.
    pub fn open(home: &Path, app: &str, environment: &str) -> Result<Secrets, SecretsError> {
        for (kind, name) in [("app", app), ("environment", environment)] {
            if !plain_name(name) {
                return Err(SecretsError::BadScope {
                    kind,
                    name: name.to_owned(),
                });
            }
        }
        Ok(Secrets {
            dir: env_dir(home, app, environment).join(DIR),
            scope: format!("{app}/{environment}"),
        })
    }

    /// `app/environment`.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// Stores `value` as the next version of `name` and returns that version.
    pub fn set(&self, name: &str, value: &[u8]) -> Result<u64, SecretsError> {
        check_name(name)?;
        check_value(name, value)?;
        let dir = self.dir.join(name);
        private_dirs(&dir)?;
        let mut version = self.latest(name)?.unwrap_or(0) + 1;
        let mut file = tempfile::Builder::new()
            .prefix(".tmp-")
            .permissions(std::fs::Permissions::from_mode(0o600))
            .tempfile_in(&dir)
            .map_err(io(&dir))?;
        file.write_all(value).map_err(io(file.path()))?;
        file.as_file().sync_all().map_err(io(file.path()))?;
        // A version is never replaced: a concurrent `set` that took this number first makes
        // this one the next.
        loop {
            let path = dir.join(version.to_string());
            match file.persist_noclobber(&path) {
                Ok(_) => break,
                Err(error) if error.error.kind() == std::io::ErrorKind::AlreadyExists => {
                    file = error.file;
                    version += 1;
                }
                Err(error) => return Err(io(&path)(error.error)),
            }
        }
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&dir))?;
        Ok(version)
    }

    /// Every secret with its latest version and when that was set, by name; never a value.
    pub fn list(&self) -> Result<Vec<SecretInfo>, SecretsError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(io(&self.dir)(error)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io(&self.dir))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if check_name(&name).is_err() {
                continue;
            }
            let Some(version) = self.latest(&name)? else {
                continue;
            };
            let path = self.dir.join(&name).join(version.to_string());
            let meta = std::fs::metadata(&path).map_err(io(&path))?;
            let set_at_ms = u64::try_from(meta.mtime()).unwrap_or(0) * 1000
                + u64::try_from(meta.mtime_nsec()).unwrap_or(0) / 1_000_000;
            found.push(SecretInfo {
                name,
                version,
                set_at_ms,
            });
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    /// Removes `name` and every version of it. Instances running keep the value they were
    /// started with; a release that pins it can start no new instance.
    pub fn remove(&self, name: &str) -> Result<(), SecretsError> {
        check_name(name)?;
        let dir = self.dir.join(name);
        if !dir.is_dir() {
            return Err(self.not_set(name));
        }
        // Out of sight first, so a crash halfway leaves no secret with some versions gone.
        let doomed = self
            .dir
            .join(format!(".removed-{name}-{:08x}", fastrand::u32(..)));
        std::fs::rename(&dir, &doomed).map_err(io(&dir))?;
        std::fs::remove_dir_all(&doomed).map_err(io(&doomed))
    }

    /// The latest version of `name`, `None` when it is not set.
    pub fn latest(&self, name: &str) -> Result<Option<u64>, SecretsError> {
        check_name(name)?;
        let dir = self.dir.join(name);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(io(&dir)(error)),
        };
        let mut latest = None;
        for entry in entries {
            let entry = entry.map_err(io(&dir))?;
            let version = entry.file_name().to_str().and_then(version_of);
            latest = latest.max(version);
        }
        Ok(latest)
    }

    /// The value of `version` of `name`, read whole, without following a symlink.
    pub fn read(&self, name: &str, version: u64) -> Result<Vec<u8>, SecretsError> {
        check_name(name)?;
        let path = self.dir.join(name).join(version.to_string());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path);
        let file = match file {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(SecretsError::NoVersion {
                    name: name.to_owned(),
                    version,
                    scope: self.scope.clone(),
                });
            }
            Err(error) => return Err(io(&path)(error)),
        };
        let mut value = Vec::new();
        file.take(MAX_VALUE_BYTES as u64 + 1)
            .read_to_end(&mut value)
            .map_err(io(&path))?;
        check_value(name, &value)?;
        Ok(value)
    }

    /// The value of `version` of `name` as an environment variable's value.
    pub fn read_text(&self, name: &str, version: u64) -> Result<String, SecretsError> {
        let value = self.read(name, version)?;
        // `read` checked it is UTF-8.
        String::from_utf8(value).map_err(|_| SecretsError::NotText {
            name: name.to_owned(),
        })
    }

    fn not_set(&self, name: &str) -> SecretsError {
        SecretsError::NotSet {
            name: name.to_owned(),
            scope: self.scope.clone(),
        }
    }
}

/// Pins the latest version of every secret `names` refers to (environment variable → secret
/// name), or fails on the first one that is not set.
pub fn resolve(
    secrets: &Secrets,
    names: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, Pinned>, SecretsError> {
    names
        .iter()
        .map(|(variable, name)| {
            let version = secrets.latest(name)?.ok_or_else(|| secrets.not_set(name))?;
            let pinned = Pinned {
                name: name.clone(),
                version,
            };
            Ok((variable.clone(), pinned))
        })
        .collect()
}

/// A secret's name: 1 to 63 lowercase letters, digits, '-', '_' or '.', starting with a
/// letter or a digit. It is one path component that can be neither `.` nor `..`, and never
/// looks like a command-line flag.
pub fn check_name(name: &str) -> Result<(), SecretsError> {
    if plain_name(name) && name.len() <= 63 {
        Ok(())
    } else {
        Err(SecretsError::BadName {
            name: name.to_owned(),
        })
    }
}

fn plain_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

/// A value fits an environment variable: bounded, UTF-8, no NUL.
fn check_value(name: &str, value: &[u8]) -> Result<(), SecretsError> {
    let name = || name.to_owned();
    if value.len() > MAX_VALUE_BYTES {
        return Err(SecretsError::TooLarge {
            name: name(),
            size: value.len(),
        });
    }
    if std::str::from_utf8(value).is_err() {
        return Err(SecretsError::NotText { name: name() });
    }
    if value.contains(&0) {
        return Err(SecretsError::HoldsNul { name: name() });
    }
    Ok(())
}

/// A version's file name: a positive decimal number without leading zeros.
fn version_of(file_name: &str) -> Option<u64> {
    let version: u64 = file_name.parse().ok()?;
    (version > 0 && version.to_string() == file_name).then_some(version)
}

/// Makes `dir` and its missing parents 0700 whatever the umask, and takes group and other
/// access away from the store's own directory if an older graven made it wider.
fn private_dirs(dir: &Path) -> Result<(), SecretsError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    for path in [dir, dir.parent().unwrap_or(dir)] {
        let meta = std::fs::metadata(path).map_err(io(path))?;
        if meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
                .map_err(io(path))?;
        }
    }
    Ok(())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SecretsError + use<> {
    let path = path.to_owned();
    move |source| SecretsError::Io { path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Secrets) {
        let home = tempfile::tempdir().unwrap();
        let secrets = Secrets::open(home.path(), "hello", "production").unwrap();
        (home, secrets)
    }

    #[test]
    fn versions_count_up_and_each_keeps_its_value() {
        let (_home, secrets) = store();
        assert_eq!(secrets.latest("db-password").unwrap(), None);
        assert_eq!(secrets.set("db-password", b"one").unwrap(), 1);
        assert_eq!(secrets.set("db-password", b"two").unwrap(), 2);
        assert_eq!(secrets.latest("db-password").unwrap(), Some(2));
        assert_eq!(secrets.read("db-password", 1).unwrap(), b"one");
        assert_eq!(secrets.read_text("db-password", 2).unwrap(), "two");
        let err = secrets.read("db-password", 3).unwrap_err().to_string();
        assert_eq!(
            err,
            "secret \"db-password\" has no version 3 in hello/production"
        );
    }

    #[test]
    fn list_names_versions_never_values() {
        let (_home, secrets) = store();
        assert!(secrets.list().unwrap().is_empty());
        secrets.set("b.key", b"x").unwrap();
        secrets.set("a_token", b"y").unwrap();
        secrets.set("a_token", b"z").unwrap();
        let listed: Vec<(String, u64)> = secrets
            .list()
            .unwrap()
            .into_iter()
            .map(|s| (s.name, s.version))
            .collect();
        assert_eq!(listed, [("a_token".to_owned(), 2), ("b.key".to_owned(), 1)]);
    }

    #[test]
    fn remove_takes_every_version() {
        let (_home, secrets) = store();
        secrets.set("token", b"x").unwrap();
        secrets.set("token", b"y").unwrap();
        secrets.remove("token").unwrap();
        assert_eq!(secrets.latest("token").unwrap(), None);
        assert!(secrets.list().unwrap().is_empty());
        let err = secrets.remove("token").unwrap_err().to_string();
        assert_eq!(err, "secret \"token\" is not set in hello/production");
    }

    #[test]
    fn files_are_owner_only() {
        let (home, secrets) = store();
        secrets.set("token", b"x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        let dir = home.path().join("apps/hello/production/secrets");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("token")), 0o700);
        assert_eq!(mode(&dir.join("token/1")), 0o600);
    }

    #[test]
    fn names_are_one_plain_component() {
        for good in [
            "db-password",
            "a",
            "0",
            "tls.key",
            "api_token",
            &"a".repeat(63),
        ] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "-flag",
            ".hidden",
            "_x",
            "Upper",
            "sp ace",
            &"a".repeat(64),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(Secrets::open(Path::new("/h"), "..", "local").is_err());
        assert!(Secrets::open(Path::new("/h"), "app", "a/b").is_err());
    }

    #[test]
    fn values_must_fit_an_environment_variable() {
        let (_home, secrets) = store();
        let check = |value: &[u8], expected: &str| {
            let err = secrets.set("token", value).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        };
        check(&[0xff, 0xfe], "not UTF-8 text");
        check(b"a\0b", "NUL byte");
        check(&vec![b'x'; MAX_VALUE_BYTES + 1], "at most 64 KiB");
        assert_eq!(
            secrets.set("token", &vec![b'x'; MAX_VALUE_BYTES]).unwrap(),
            1
        );
        assert_eq!(secrets.set("token", b"").unwrap(), 2);
        assert_eq!(secrets.latest("token").unwrap(), Some(2));
    }

    #[test]
    fn resolve_pins_the_latest_or_names_the_missing() {
        let (_home, secrets) = store();
        secrets.set("db-password", b"one").unwrap();
        secrets.set("db-password", b"two").unwrap();
        let names = BTreeMap::from([("DB_PASSWORD".to_owned(), "db-password".to_owned())]);
        let pinned = resolve(&secrets, &names).unwrap();
        assert_eq!(
            pinned["DB_PASSWORD"],
            Pinned {
                name: "db-password".to_owned(),
                version: 2
            }
        );
        let names = BTreeMap::from([("API".to_owned(), "api-token".to_owned())]);
        let err = resolve(&secrets, &names).unwrap_err().to_string();
        assert_eq!(err, "secret \"api-token\" is not set in hello/production");
    }

    #[test]
    fn version_names() {
        assert_eq!(version_of("1"), Some(1));
        assert_eq!(version_of("12"), Some(12));
        for bad in ["0", "01", ".tmp-x", "-1", "+1", ""] {
            assert_eq!(version_of(bad), None, "{bad:?}");
        }
    }
}
