//! Bases from registries against a real one: Debian's `docker-registry` (the distribution
//! project's registry), started by each test on loopback with its storage in a temp dir and
//! stopped by its PID. Push, remove, bake `FROM registry/…@digest`; pull by tag; basic auth
//! through a Docker config file; and bad input (unknown repository or tag, a blob whose
//! content does not match its digest, plain HTTP to a registry not on loopback), each leaving
//! the store as it was.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use support::{busybox, debian_base, graven, succeed, wait_for};

/// A registry of the test's own, on 127.0.0.1 at a port the kernel chose.
struct Registry {
    child: Child,
    port: u16,
    storage: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        Registry::start_with(None)
    }

    /// With `auth`, a user and password the registry asks for (htpasswd, basic auth).
    fn start_with(auth: Option<(&str, &str)>) -> Registry {
        succeed(
            Command::new(support::workspace().join("scripts/install-packages"))
                .args(["docker-registry", "apache2-utils"]),
        );
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        fs::create_dir(&storage).unwrap();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:0\n",
            storage.display()
        );
        if let Some((user, password)) = auth {
            let htpasswd = dir.path().join("htpasswd");
            let out = succeed(Command::new("htpasswd").args(["-Bbn", user, password]));
            fs::write(&htpasswd, out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: graven-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).unwrap();
        let log = fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let pid = child.id();
        let mut registry = Registry {
            child,
            port: 0,
            storage,
            _dir: dir,
        };
        registry.port = wait_for(Duration::from_secs(30), "the registry to listen", || {
            if let Ok(Some(status)) = registry.child.try_wait() {
                panic!("docker-registry exited: {status}");
            }
            listening_port(pid)
        });
        registry
    }

    /// `127.0.0.1:PORT/name`.
    fn name(&self, name: &str) -> String {
        format!("127.0.0.1:{}/{name}", self.port)
    }

    /// The file the registry keeps blob `digest` in.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // By its own PID: `Child::kill` signals exactly the process this test started.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The TCP port process `pid` listens on, from its sockets' inodes in /proc.
fn listening_port(pid: u32) -> Option<u16> {
    let inodes: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    for table in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Field 3 is the state (0A: listening), field 9 the socket's inode.
            if fields.len() > 9 && fields[3] == "0A" && inodes.iter().any(|i| i == fields[9]) {
                let port = fields[1].rsplit(':').next()?;
                return u16::from_str_radix(port, 16).ok();
            }
        }
    }
    None
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).expect("json")
}

fn fail(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        !out.status.success(),
        "expected a failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Bakes `containerfile` (with a `file` beside it) in `home`; the `--json` result.
fn bake(home: &Path, tag: &str, containerfile: &str) -> serde_json::Value {
    let dir = context(containerfile);
    json(&succeed(
        graven(home)
            .args(["bake", "--json", "--tag", tag])
            .arg(dir.path()),
    ))
}

fn context(containerfile: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("Containerfile"), containerfile).unwrap();
    fs::write(dir.path().join("file"), "from the context\n").unwrap();
    fs::copy(busybox(), dir.path().join("busybox")).unwrap();
    dir
}

/// A small image (busybox and a file, FROM scratch) tagged `small:1` in `home`; its digest.
fn small_image(home: &Path) -> String {
    let baked = bake(
        home,
        "small:1",
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY file /file\nCMD [\"/bin/busybox\", \"cat\", \"/file\"]\n",
    );
    baked["digest"].as_str().unwrap().to_owned()
}

fn push(home: &Path, reference: &str, target: &str) -> serde_json::Value {
    json(&succeed(
        graven(home).args(["image", "push", "--json", reference, target]),
    ))
}

/// Every file of the store with its size, and index.json's content: what a failed command
/// must leave exactly as it was.
fn store_snapshot(home: &Path) -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for entry in fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            let name = path.strip_prefix(root).unwrap().display().to_string();
            if path.is_dir() {
                walk(&path, root, out);
            } else if name.ends_with(".lock") {
                continue;
            } else if name == "index.json" {
                out.insert(name, fs::read_to_string(&path).unwrap());
            } else {
                out.insert(name, fs::metadata(&path).unwrap().len().to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    let root = home.join("store");
    walk(&root, &root, &mut out);
    out
}

/// The whole round trip the issue asks for, on the Debian base: bake an app on the base
/// from the store; push the base; remove it (tag, blobs and cache); bake the same app
/// `FROM 127.0.0.1:PORT/debian@DIGEST`: the base is pulled with the digest graven pushed,
/// the bake's record names it, and the app is the same image. With the image in the store, a
/// later bake by digest does not ask the registry (it is stopped by then).
#[test]
fn round_trip_push_remove_and_bake_from_the_registry_by_digest() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let base = bake(
        h,
        "debian:base",
        &format!("FROM docker-archive:{}\n", debian_base().display()),
    );
    let base_digest = base["digest"].as_str().unwrap().to_owned();
    let app = "COPY file /srv/file\nRUN cat /etc/debian_version /srv/file > /srv/both\nCMD [\"cat\", \"/srv/both\"]\n";
    let local = bake(h, "app:local", &format!("FROM debian:base\n{app}"));
    assert_eq!(local["bases"][0]["digest"], base_digest.as_str());

    let registry = Registry::start();
    let target = registry.name("debian:bookworm");
    let out = succeed(graven(h).args(["image", "push", "debian:base", &target]));
    let printed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        printed.trim(),
        base_digest,
        "push prints the store's digest"
    );
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress.contains("pushing ") && progress.contains(" bytes"),
        "a large layer shows its progress: {progress}"
    );
    // A second push sends nothing but the manifest: the registry has every blob.
    let again = push(h, "debian:base", &target);
    assert_eq!(again["pushed_blobs"], 0);
    assert_eq!(again["digest"], base_digest.as_str());

    succeed(graven(h).args(["image", "rm", "debian:base"]));
    succeed(graven(h).args(["image", "rm", "app:local"]));
    succeed(graven(h).args(["gc", "--cache"]));
    let blob = h
        .join("store/blobs/sha256")
        .join(&base_digest["sha256:".len()..]);
    assert!(!blob.exists(), "gc removed the base's manifest");

    let pinned = format!("{}@{base_digest}", registry.name("debian"));
    let from_registry = bake(h, "app:remote", &format!("FROM {pinned}\n{app}"));
    assert_eq!(from_registry["bases"][0]["digest"], base_digest.as_str());
    assert_eq!(from_registry["bases"][0]["from"], pinned.as_str());
    assert_eq!(
        from_registry["digest"], local["digest"],
        "the app baked on the pulled base is the app baked on the local one"
    );

    // The registry is gone; the base's digest is in the store, so nothing asks for it.
    drop(registry);
    let offline = bake(
        h,
        "app:offline",
        &format!("FROM {pinned}\nRUN echo offline > /offline\n"),
    );
    assert_eq!(offline["bases"][0]["digest"], base_digest.as_str());
}

/// A tag is resolved in the registry: `graven image pull` and a bake by tag get the digest
/// the registry's tag names; `image pull` tags the image with its name.
#[test]
fn pull_and_bake_by_tag() {
    let source = tempfile::tempdir().unwrap();
    let digest = small_image(source.path());
    let registry = Registry::start();
    let name = registry.name("tools/small:1");
    push(source.path(), "small:1", &name);

    let home = tempfile::tempdir().unwrap();
    let pulled = json(&succeed(
        graven(home.path()).args(["image", "pull", "--json", &name]),
    ));
    assert_eq!(pulled["digest"], digest.as_str());
    assert_eq!(pulled["tag"], name.as_str());
    let inspect = json(&succeed(
        graven(home.path()).args(["image", "inspect", &name]),
    ));
    assert_eq!(inspect["digest"], digest.as_str());

    let fresh = tempfile::tempdir().unwrap();
    let baked = bake(
        fresh.path(),
        "on-small:1",
        &format!("FROM {name}\nCOPY file /copied\n"),
    );
    assert_eq!(baked["bases"][0]["digest"], digest.as_str());
    assert_eq!(baked["total_steps"], 2);
}

/// Basic auth: with the Docker config file's `auths` entry (base64 `user:password`) push and
/// pull succeed; without it, or with a wrong password, they fail saying so, and the store is
/// as it was.
#[test]
fn credentials_from_the_docker_config_file() {
    let registry = Registry::start_with(Some(("graven", "s3cret")));
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let digest = small_image(h);
    let name = registry.name("private/small:1");
    let config_dir = |auth: &str| {
        let dir = tempfile::tempdir().unwrap();
        let encoded = base64(auth);
        fs::write(
            dir.path().join("config.json"),
            format!(
                r#"{{"auths": {{"127.0.0.1:{}": {{"auth": "{encoded}"}}}}}}"#,
                registry.port
            ),
        )
        .unwrap();
        dir
    };
    let good = config_dir("graven:s3cret");
    let wrong = config_dir("graven:wrong");
    let empty = tempfile::tempdir().unwrap();

    let refusals = [
        (empty.path(), "graven sent no credentials"),
        (wrong.path(), "it refused user \"graven\""),
    ];
    for (docker_config, why) in refusals {
        let error = fail(
            graven(h)
                .env("DOCKER_CONFIG", docker_config)
                .args(["image", "push", "small:1", &name]),
        );
        assert!(
            error.contains("refused access") && error.contains(why),
            "{error}"
        );
    }
    let pushed = json(&succeed(
        graven(h)
            .env("DOCKER_CONFIG", good.path())
            .args(["image", "push", "--json", "small:1", &name]),
    ));
    assert_eq!(pushed["digest"], digest.as_str());

    let other = tempfile::tempdir().unwrap();
    let o = other.path();
    small_image(o);
    let before = store_snapshot(o);
    let containerfile = format!("FROM {name}\nCOPY file /copied\n");
    for (docker_config, why) in refusals {
        let dir = context(&containerfile);
        let error = fail(
            graven(o)
                .env("DOCKER_CONFIG", docker_config)
                .args(["bake", "--tag", "x:1"])
                .arg(dir.path()),
        );
        assert!(
            error.contains(&format!("FROM {name}"))
                && error.contains("refused access")
                && error.contains(why),
            "{error}"
        );
        assert_eq!(
            store_snapshot(o),
            before,
            "a failed pull leaves the store as it was"
        );
    }
    let dir = context(&containerfile);
    let baked = json(&succeed(
        graven(o)
            .env("DOCKER_CONFIG", good.path())
            .args(["bake", "--json", "--tag", "x:1"])
            .arg(dir.path()),
    ));
    assert_eq!(baked["bases"][0]["digest"], digest.as_str());

    // A credential store (`credsStore`): graven runs `docker-credential-NAME get` with the
    // registry's host on stdin, as Docker does, and uses what it answers.
    let helper = tempfile::tempdir().unwrap();
    let asked = helper.path().join("asked");
    let script = helper.path().join("docker-credential-graventest");
    // Written by a child process, so no fork of this test binary's can hold it open for
    // writing when graven execs it.
    support::write_executable(
        &script,
        format!(
            "#!/bin/sh\ncat > {}\necho '{{\"Username\":\"graven\",\"Secret\":\"s3cret\"}}'\n",
            asked.display()
        )
        .as_bytes(),
    );
    fs::write(
        helper.path().join("config.json"),
        r#"{"credsStore": "graventest"}"#,
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        helper.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let fresh = tempfile::tempdir().unwrap();
    let pulled = json(&succeed(
        graven(fresh.path())
            .env("DOCKER_CONFIG", helper.path())
            .env("PATH", path)
            .args(["image", "pull", "--json", &name]),
    ));
    assert_eq!(pulled["digest"], digest.as_str());
    assert_eq!(
        fs::read_to_string(&asked).unwrap(),
        format!("127.0.0.1:{}", registry.port)
    );
}

/// Standard base64, for the Docker config file's `auth`.
fn base64(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Bad input: an unknown repository, an unknown tag, a layer the registry serves with content
/// that does not match its digest, a name without a registry host that the store lacks, and
/// a registry not on loopback (plain HTTP refused; HTTPS to a plain server fails) unless
/// `GRAVEN_INSECURE_REGISTRIES` lists it. Each fails saying what, and leaves the store as it
/// was.
#[test]
fn bad_registry_input_fails_clearly_and_leaves_the_store_untouched() {
    let source = tempfile::tempdir().unwrap();
    let digest = small_image(source.path());
    let registry = Registry::start();
    let name = registry.name("tools/small:1");
    push(source.path(), "small:1", &name);

    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    bake(h, "other:1", "FROM scratch\nCOPY file /file\n");
    let before = store_snapshot(h);
    let bake_fails = |from: &str, env: &[(&str, &str)]| {
        let dir = context(&format!("FROM {from}\nCOPY file /copied\n"));
        let mut command = graven(h);
        command.args(["bake", "--tag", "bad:1"]).arg(dir.path());
        for (key, value) in env {
            command.env(key, value);
        }
        let error = fail(&mut command);
        assert_eq!(store_snapshot(h), before, "FROM {from} changed the store");
        error
    };

    let unknown_repo = registry.name("tools/nothing:1");
    let error = bake_fails(&unknown_repo, &[]);
    assert!(
        error.contains(&format!("FROM {unknown_repo}")) && error.to_lowercase().contains("unknown"),
        "{error}"
    );
    let unknown_tag = registry.name("tools/small:2");
    let error = bake_fails(&unknown_tag, &[]);
    assert!(
        error.contains(&format!("FROM {unknown_tag}")) && error.to_lowercase().contains("unknown"),
        "{error}"
    );
    let error = bake_fails("small:1", &[]);
    assert!(error.contains("named with its host"), "{error}");

    // Plain HTTP only to loopback: 0.0.0.0 reaches the registry, but is not loopback.
    let unspecified = format!("0.0.0.0:{}/tools/small@{digest}", registry.port);
    let error = bake_fails(&unspecified, &[]);
    assert!(
        error.contains("graven speaks HTTPS") && error.contains("GRAVEN_INSECURE_REGISTRIES"),
        "{error}"
    );
    let listed = format!("0.0.0.0:{}", registry.port);
    let dir = context(&format!("FROM {unspecified}\nCOPY file /copied\n"));
    let baked = json(&succeed(
        graven(h)
            .env("GRAVEN_INSECURE_REGISTRIES", &listed)
            .args(["bake", "--json", "--tag", "listed:1"])
            .arg(dir.path()),
    ));
    assert_eq!(baked["bases"][0]["digest"], digest.as_str());

    // The registry serves a layer whose bytes are not its digest's (same size, one byte off).
    let fresh = tempfile::tempdir().unwrap();
    let f = fresh.path();
    bake(f, "other:1", "FROM scratch\nCOPY file /file\n");
    let before = store_snapshot(f);
    let manifest = json(&succeed(
        graven(source.path()).args(["image", "inspect", "small:1"]),
    ));
    let layer = manifest["manifest"]["layers"][0]["digest"]
        .as_str()
        .unwrap();
    let file = registry.blob_file(layer);
    let mut bytes = fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&file, bytes).unwrap();
    let pinned = format!("{}@{digest}", registry.name("tools/small"));
    let dir = context(&format!("FROM {pinned}\nCOPY file /copied\n"));
    let error = fail(graven(f).args(["bake", "--tag", "bad:1"]).arg(dir.path()));
    assert!(
        error.contains(&format!("blob {layer} from the registry hashes to sha256:")),
        "{error}"
    );
    assert_eq!(
        store_snapshot(f),
        before,
        "a corrupt blob leaves the store as it was"
    );
    let error = fail(graven(f).args(["image", "pull", &pinned]));
    assert!(error.contains("hashes to"), "{error}");
    assert_eq!(store_snapshot(f), before);
}

/// Regression: a `FROM` path whose first component holds a dot (`./base.tar`,
/// `v1.2/base.tar`) was taken for a registry's host and refused as a bad reference. A path
/// that exists in the context is a path.
#[test]
fn paths_that_look_like_registry_names_stay_paths() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let digest = small_image(h);
    let dir = context("");
    fs::create_dir(dir.path().join("v1.2")).unwrap();
    for path in ["small.tar", "v1.2/small.tar"] {
        succeed(
            graven(h)
                .args(["image", "export", "small:1", "-o"])
                .arg(dir.path().join(path)),
        );
    }
    for from in ["./small.tar", "v1.2/small.tar"] {
        fs::write(
            dir.path().join("Containerfile"),
            format!("FROM {from}\nCOPY file /copied\n"),
        )
        .unwrap();
        let baked = json(&succeed(
            graven(h)
                .args(["bake", "--json", "--tag", "on-path:1"])
                .arg(dir.path()),
        ));
        assert_eq!(baked["bases"][0]["digest"], digest.as_str(), "FROM {from}");
    }
}
