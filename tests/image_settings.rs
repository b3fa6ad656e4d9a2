//! The image's own settings, as Docker reads them, through the real binary: ENTRYPOINT and
//! CMD against a command and `--entrypoint`, the image's USER (root included: uid 0 without
//! any capability) and `--user`, VOLUME, EXPOSE, tmpfs mounts, /dev/stdout and /dev/stderr
//! for a workload that is not root, and the bad input refused before anything is made.
//! Docker's behaviour is written beside each rule.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

use graven::store::{Digest, RuntimeConfig};
use support::runtime::{File, parse_report, probe_binary, put_image};

const PASSWD: &str = "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
const GROUP: &str = "root:x:0:\napp:x:1000:\n";

/// An image of the host's static busybox (with the applets the tests use) and the probe.
fn image(home: &Path, tag: &str, config: RuntimeConfig) -> Digest {
    let mut files = vec![
        File::executable("bin/busybox", support::busybox()),
        File::executable("probe", &probe_binary()),
        File::text("etc/passwd", PASSWD),
        File::text("etc/group", GROUP),
        // Root's alone: what uid 0 may read and another user may not.
        File {
            path: "etc/secret".to_owned(),
            bytes: b"s3cret\n".to_vec(),
            mode: 0o600,
        },
    ];
    for applet in ["sh", "echo", "cat", "stat", "dd", "id", "touch", "grep"] {
        files.push(File::symlink(&format!("bin/{applet}"), "busybox"));
    }
    let config = RuntimeConfig {
        env: vec!["PATH=/bin".to_owned()],
        ..config
    };
    put_image(home, tag, &files, config)
}

fn strings(items: &[&str]) -> Option<Vec<String>> {
    Some(items.iter().map(|s| (*s).to_owned()).collect())
}

/// `graven run ARGS` attached, to its end.
fn run(home: &Path, args: &[&str]) -> Output {
    support::graven(home)
        .arg("run")
        .args(args)
        .output()
        .expect("graven runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `graven run ARGS` that must succeed; its stdout.
fn run_ok(home: &Path, args: &[&str]) -> String {
    let output = run(home, args);
    assert!(
        output.status.success(),
        "graven run {args:?}: {}\n{}",
        output.status,
        stderr(&output)
    );
    stdout(&output)
}

/// The instances graven's home holds (every one, exited or not).
fn instance_dirs(home: &Path) -> Vec<String> {
    std::fs::read_dir(home.join("instances"))
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Regression (issue 13): `graven run IMG -- ARGS` and graven.toml's `command` replaced
/// ENTRYPOINT and CMD both. Docker's rules, each checked here:
/// - `docker run IMG` runs ENTRYPOINT + CMD;
/// - `docker run IMG ARGS` replaces CMD and keeps ENTRYPOINT;
/// - `docker run --entrypoint X IMG` replaces ENTRYPOINT and drops the image's CMD;
/// - `docker run --entrypoint X IMG ARGS` runs X ARGS;
/// - `docker run --entrypoint "" IMG ARGS` runs ARGS alone.
#[test]
fn a_command_replaces_cmd_and_keeps_the_entrypoint() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    image(
        home,
        "echo:test",
        RuntimeConfig {
            entrypoint: strings(&["/bin/echo", "entry"]),
            cmd: strings(&["cmd"]),
            ..RuntimeConfig::default()
        },
    );
    assert_eq!(run_ok(home, &["echo:test"]), "entry cmd\n");
    assert_eq!(run_ok(home, &["echo:test", "--", "a", "b"]), "entry a b\n");
    assert_eq!(
        run_ok(home, &["--entrypoint", "/bin/echo", "echo:test"]),
        "\n"
    );
    assert_eq!(
        run_ok(home, &["--entrypoint", "/bin/echo", "echo:test", "--", "x"]),
        "x\n"
    );
    assert_eq!(
        run_ok(
            home,
            &["--entrypoint", "", "echo:test", "--", "/bin/echo", "y"]
        ),
        "y\n"
    );
}

/// Regression (issue 13): an image whose USER is root, or that sets none, ran as 65534.
/// Docker runs it as root (uid 0), and as its USER otherwise; `--user` replaces it. Here
/// root is uid 0 with no capability, no_new_privs and seccomp.
#[test]
fn an_image_runs_as_its_user_root_or_none_included() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let probe = |user: Option<&str>| RuntimeConfig {
        user: user.map(str::to_owned),
        entrypoint: strings(&["/probe"]),
        cmd: strings(&["report"]),
        ..RuntimeConfig::default()
    };
    image(home, "none:test", probe(None));
    image(home, "root:test", probe(Some("root")));
    image(home, "app:test", probe(Some("app")));
    let seen = |args: &[&str]| parse_report(&run_ok(home, args));
    for tag in ["none:test", "root:test"] {
        let report = seen(&[tag]);
        assert_eq!(report["uid"], "0", "{tag}");
        assert_eq!(report["cap_eff"], "0000000000000000", "{tag}");
        assert_eq!(report["cap_bnd"], "0000000000000000", "{tag}");
        assert_eq!(report["no_new_privs"], "1", "{tag}");
        assert_eq!(report["seccomp"], "2", "{tag}");
    }
    assert_eq!(seen(&["app:test"])["uid"], "1000");
    assert_eq!(seen(&["--user", "app", "root:test"])["uid"], "1000");
    assert_eq!(seen(&["--user", "0", "app:test"])["uid"], "0");
    assert_eq!(seen(&["--user", "1000:0", "none:test"])["gid"], "0");
}

/// What root in an instance (uid 0, no capability) can do: write its tmpfs and volumes,
/// which are root's, and read root-only files of its image. What it cannot: chown, setuid
/// to another user, mount, open a raw socket, write the read-only root. The same probe as
/// another user cannot read the root-only file: the negative control that the read is
/// uid 0's ownership, not a hole.
#[test]
fn root_in_an_instance_owns_its_files_and_has_no_power() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    image(
        home,
        "probe:test",
        RuntimeConfig {
            entrypoint: strings(&["/probe"]),
            cmd: strings(&["powers"]),
            ..RuntimeConfig::default()
        },
    );
    let powers = |user: &str| {
        parse_report(&run_ok(
            home,
            &[
                "--user",
                user,
                "--tmpfs",
                "/run:1M",
                "-v",
                &format!("data-{user}:/data"),
                "-e",
                "PROBE_WRITE=/run,/data,/tmp",
                "-e",
                "PROBE_READ=/etc/secret,/etc/passwd",
                "probe:test",
            ],
        ))
    };
    let root = powers("root");
    let expected = [
        ("uid", "0"),
        ("cap_eff", "0000000000000000"),
        ("write:/run", "ok"),
        ("write:/data", "ok"),
        ("write:/tmp", "ok"),
        ("read:/etc/secret", "ok"),
        ("read:/etc/passwd", "ok"),
        ("chown", "Operation not permitted"),
        ("setuid", "Operation not permitted"),
        ("mount", "Operation not permitted"),
        ("raw_socket", "Operation not permitted"),
        ("root_write", "Read-only file system"),
        ("unshare", "Operation not permitted"),
    ];
    for (key, value) in expected {
        assert_eq!(root[key], value, "root: {key}");
    }
    let app = powers("app");
    assert_eq!(app["uid"], "1000");
    assert_eq!(app["read:/etc/secret"], "Permission denied");
    assert_eq!(app["write:/run"], "ok", "a tmpfs is 1777, as Docker's");
    assert_eq!(app["write:/data"], "ok", "a new volume is its user's");
    assert_eq!(app["setuid"], "Operation not permitted");
}

/// Regression (issue 13): nginx as www-data died on `open() "/dev/stderr" failed (13:
/// Permission denied)`: the pipes the shim makes for the workload's output were root's,
/// 0600. runc (Docker) gives them to the container's user; so does graven now.
#[test]
fn a_workload_that_is_not_root_opens_dev_stdout_and_dev_stderr() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    image(
        home,
        "probe:test",
        RuntimeConfig {
            user: Some("app".to_owned()),
            entrypoint: strings(&["/probe", "powers"]),
            ..RuntimeConfig::default()
        },
    );
    let output = run(home, &["probe:test"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let seen = parse_report(&stdout(&output));
    assert_eq!(seen["uid"], "1000");
    assert_eq!(seen["dev_stdout"], "ok");
    assert_eq!(seen["dev_stderr"], "ok");
    // Docker's pipe takes a plain open too; graven's log files are append-only as root, so
    // an instance cannot rewrite its history, at this price (docs/logs.md, "Protection").
    assert_eq!(seen["dev_stdout_plain"], "Operation not permitted");
    assert_eq!(seen["dev_stdin"], "ok");
    assert!(stdout(&output).contains("probe wrote to /dev/stdout\n"));
    assert!(stderr(&output).contains("probe wrote to /dev/stderr\n"));
}

/// `--tmpfs PATH[:SIZE]`: a size-capped tmpfs, mode 1777 as Docker's `--tmpfs` (the
/// kernel's default for a tmpfs's root; Docker's is also unlimited in size and noexec:
/// graven caps it, 64M by default, and lets it hold programs as its /tmp does), writable
/// by any user; its mount point made when the image lacks it; the root stays read-only.
#[test]
fn a_tmpfs_is_writable_size_capped_and_the_root_stays_read_only() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    image(
        home,
        "box:test",
        RuntimeConfig {
            user: Some("app".to_owned()),
            ..RuntimeConfig::default()
        },
    );
    let script = "stat -c %a /run /var/cache/app; \
                  dd if=/dev/zero of=/run/big bs=1024 count=2048 2>&1 | grep -o 'No space left'; \
                  echo x > /var/cache/app/f && cat /var/cache/app/f; \
                  touch /etc/nope 2>&1 | grep -o 'Read-only file system'";
    let out = run_ok(
        home,
        &[
            "--tmpfs",
            "/run:1MiB",
            "--tmpfs",
            "/var/cache/app",
            "box:test",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    assert_eq!(
        out, "1777\n1777\nNo space left\nx\nRead-only file system\n",
        "{out}"
    );
}

/// An image's VOLUME with `graven run`: an anonymous volume of the instance's own, as
/// `docker run` makes one (graven's starts empty: Docker copies the image's files at the
/// path into it), removed with the instance. A `-v` at that path replaces it, as in Docker.
#[test]
fn an_image_volume_is_an_anonymous_volume_of_the_instance() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    image(
        home,
        "vol:test",
        RuntimeConfig {
            entrypoint: strings(&["/probe", "powers"]),
            volumes: BTreeMap::from([("/data".to_owned(), serde_json::json!({}))]),
            ..RuntimeConfig::default()
        },
    );
    let seen = parse_report(&run_ok(home, &["-e", "PROBE_WRITE=/data,/etc", "vol:test"]));
    assert_eq!(seen["write:/data"], "ok");
    assert_eq!(seen["write:/etc"], "Read-only file system");
    let [id] = instance_dirs(home).try_into().unwrap();
    let anonymous = home.join("instances").join(&id).join("volumes/0");
    assert!(anonymous.join("probe-wrote").is_file());
    support::succeed(support::graven(home).args(["rm", &id]));
    assert!(!anonymous.exists(), "removed with its instance");
    // Covered by a named volume: that is written instead, and no anonymous one is made.
    run_ok(
        home,
        &["-v", "named:/data", "-e", "PROBE_WRITE=/data", "vol:test"],
    );
    assert!(home.join("volumes/named/probe-wrote").is_file());
    let [second] = instance_dirs(home)
        .into_iter()
        .filter(|other| *other != id)
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    assert!(!home.join("instances").join(second).join("volumes").exists());
}

/// Bad input is refused before anything is made: no instance directory, no volume.
#[test]
fn bad_tmpfs_and_users_are_refused_before_anything_starts() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    image(home, "box:test", RuntimeConfig::default());
    let refused = |args: &[&str], says: &str| {
        let mut all = args.to_vec();
        all.extend(["box:test", "--", "/bin/id"]);
        let output = run(home, &all);
        assert!(!output.status.success(), "{args:?} ran");
        assert!(
            stderr(&output).contains(says),
            "{args:?}: {}",
            stderr(&output)
        );
        assert_eq!(instance_dirs(home), Vec::<String>::new(), "{args:?}");
        assert!(!home.join("volumes/d").exists(), "{args:?}");
    };
    refused(
        &["--tmpfs", "run"],
        "tmpfs \"run\": the path must be absolute",
    );
    refused(
        &["--tmpfs", "/data/cache", "-v", "d:/data"],
        "overlaps volume \"d\"",
    );
    refused(
        &["--tmpfs", "/run", "--tmpfs", "/run/x"],
        "overlaps the tmpfs at /run",
    );
    refused(&["--tmpfs", "/tmp"], "limits.tmp");
    refused(&["--tmpfs", "/run:lots"], "is not a size");
    refused(
        &["--user", "ghost", "-v", "d:/data"],
        "\"ghost\" does not exist",
    );
    refused(&["--user", "app:ghosts"], "does not exist");
    // An image's VOLUME is held to a volume's rules too.
    image(
        home,
        "badvol:test",
        RuntimeConfig {
            volumes: BTreeMap::from([("/data/../../etc".to_owned(), serde_json::json!({}))]),
            ..RuntimeConfig::default()
        },
    );
    let output = run(home, &["badvol:test", "--", "/bin/id"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("the image's VOLUME /data/../../etc"),
        "{}",
        stderr(&output)
    );
    assert_eq!(instance_dirs(home), Vec::<String>::new());
}

/// A project whose image is baked from `containerfile` (with the probe and a passwd in its
/// context) and whose graven.toml is `toml`; what `deploy::prepare` makes of it.
fn prepare(
    home: &Path,
    dir: &Path,
    containerfile: &str,
    toml: &str,
) -> Result<graven::controller::DeployOrder, graven::deploy::DeployError> {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(probe_binary(), dir.join("probe")).unwrap();
    std::fs::write(dir.join("passwd"), PASSWD).unwrap();
    std::fs::write(dir.join("group"), GROUP).unwrap();
    std::fs::write(dir.join("Containerfile"), containerfile).unwrap();
    std::fs::write(dir.join("graven.toml"), toml).unwrap();
    let project = graven::spec::load(dir, "local").unwrap();
    graven::deploy::prepare(home, &project, false, &mut |_| {})
}

/// A service's release reads its image once baked, before anything is recorded:
/// - EXPOSE: Docker only documents a port with it (`docker run -P` publishes each); a
///   service without `port` takes the image's one exposed TCP port, and several (or none)
///   are a clear error naming them when the service needs a port (a route, or a check
///   that connects);
/// - VOLUME: `docker run` makes an anonymous volume per container (Compose keeps a
///   service's across recreations); a service gets one named after it and the path,
///   `db.var-lib-db`, unless it declares a volume (or tmpfs) at that path;
/// - `user`: one that the image's passwd or group lacks fails the deploy (`docker run`
///   fails at start: "unable to find user ghost").
#[test]
fn a_service_takes_its_images_expose_and_volumes_and_its_user_must_exist() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    let image = "FROM scratch\nCOPY probe /probe\nCOPY passwd /etc/passwd\n\
                 COPY group /etc/group\nVOLUME /var/lib/db\nENTRYPOINT [\"/probe\"]\n";
    let services = "app = \"a\"\n\
                    [services.db]\nuser = \"app\"\n\
                    [services.web]\nport = 9000\nvolumes = { cache = \"/var/lib/db\" }\n";
    let order = prepare(
        &home,
        &temp.path().join("one"),
        &format!("{image}EXPOSE 8080 53/udp\n"),
        services,
    )
    .unwrap();
    let config = |name: &str| {
        &order
            .services
            .iter()
            .find(|s| s.service.as_str() == name)
            .unwrap()
            .config
    };
    assert_eq!(config("db").port, 8080);
    let volumes = |name: &str| -> Vec<(String, String)> {
        config(name)
            .volumes
            .iter()
            .map(|v| (v.name.clone(), v.path.clone()))
            .collect()
    };
    assert_eq!(
        volumes("db"),
        [("db.var-lib-db".to_owned(), "/var/lib/db".to_owned())]
    );
    assert_eq!(config("web").port, 9000);
    assert_eq!(
        volumes("web"),
        [("cache".to_owned(), "/var/lib/db".to_owned())]
    );
    let refused = |containerfile: String, toml: &str, says: &str| {
        let dir = temp.path().join(format!("p{}", fastrand::u32(..)));
        let error = prepare(&home, &dir, &containerfile, toml)
            .err()
            .unwrap_or_else(|| panic!("{toml} deployed"))
            .to_string();
        assert!(error.contains(says), "{error}");
        // Nothing started: no instance, no log of releases.
        assert_eq!(instance_dirs(&home), Vec::<String>::new());
        assert!(
            !home
                .join("apps")
                .join("a")
                .join("local")
                .join("events.db")
                .exists()
        );
    };
    refused(
        format!("{image}EXPOSE 8080\n"),
        "app = \"a\"\n[services.db]\nuser = \"ghost\"\n",
        "service db: user \"ghost\": user \"ghost\" is not in the image's /etc/passwd",
    );
    refused(
        format!("{image}EXPOSE 80 443\n"),
        "app = \"a\"\n[services.db]\nroute = \":0\"\n",
        "service db: the image exposes several ports (443/tcp, 80/tcp); set `port`",
    );
    // The image's VOLUME is a named volume, which one live instance at a time may hold: a
    // second instance would be refused by the volume lock at its start, after the release is
    // recorded. A deploy (or a redeploy that scales up) is refused before.
    refused(
        format!("{image}EXPOSE 8080\n"),
        "app = \"a\"\n[services.db]\ninstances = 2\n",
        "service db: instances = 2: the image's VOLUME /var/lib/db is volume \"db.var-lib-db\", \
         owned by one live instance at a time",
    );
    // A service that is reached on its port (here through a route) needs one; a worker
    // (no route, a check that does not connect) deploys without.
    refused(
        image.to_owned(),
        "app = \"a\"\n[services.db]\nroute = \":0\"\n",
        "service db: no port: the image exposes none",
    );
}

/// Removes an instance, whatever the test's outcome.
struct Instance<'a> {
    home: &'a Path,
    id: String,
}

impl Drop for Instance<'_> {
    fn drop(&mut self) {
        let _ = support::graven(self.home)
            .args(["rm", "--force", &self.id])
            .output();
    }
}

/// `graven run -d ARGS`: the instance, removed when dropped.
fn start<'a>(home: &'a Path, args: &[&str]) -> Instance<'a> {
    let output = support::succeed(support::graven(home).args(["run", "-d"]).args(args));
    Instance {
        home,
        id: stdout(&output).trim().to_owned(),
    }
}

/// Where the instance is reached, as `graven ps --json` says.
fn address_of(home: &Path, id: &str) -> String {
    let out = support::succeed(support::graven(home).args(["ps", "--json"]));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    listed
        .as_array()
        .unwrap()
        .iter()
        .find(|instance| instance["id"].as_str() == Some(id))
        .and_then(|instance| instance["address"].as_str())
        .unwrap_or_else(|| panic!("instance {id} has an address: {listed}"))
        .to_owned()
}

/// The instance's lines in the log store, as `<time> <stream> <line>`.
fn log_of(home: &Path, id: &str) -> String {
    let query = graven::logs::Query {
        instance: Some(id.to_owned()),
        ..Default::default()
    };
    let mut text = String::new();
    graven::logs::read::read(home, &query, &mut |r| {
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(r.time_ns);
        text.push_str(&format!(
            "{} {} {}\n",
            humantime::format_rfc3339_millis(time),
            r.stream.name(),
            String::from_utf8_lossy(&r.line)
        ));
    });
    text
}

/// Stock Debian nginx (`apt-get install nginx`), its config untouched but for a site of its
/// own on port 80 of the instance's own network, as `www-data`
/// (USER), logging to /dev/stdout and /dev/stderr as Docker's nginx image does (its log
/// files are symlinks to them), with tmpfs mounts for /run (its pid file) and
/// /var/lib/nginx (its temp dirs): started with `graven run`, it answers, and its access
/// log reaches the instance's log. The negative control: without the tmpfs for
/// /var/lib/nginx it fails on the read-only root, as the issue saw.
#[test]
fn stock_debian_nginx_runs_as_www_data_with_tmpfs_and_logs_to_dev_stdout() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    let home = home.as_path();
    let ctx = temp.path().join("nginx");
    std::fs::create_dir_all(&ctx).unwrap();
    // Port 80, as www-data: the instance's own network lets any user bind it (as Docker's).
    std::fs::write(
        ctx.join("site"),
        "server {\n    listen 80;\n    root /srv/site;\n}\n",
    )
    .unwrap();
    std::fs::write(ctx.join("index.html"), "hello from nginx\n").unwrap();
    std::fs::write(
        ctx.join("Containerfile"),
        format!(
            "FROM docker-archive:{}\n\
             RUN apt-get update && apt-get install -y --no-install-recommends nginx \
                 && rm -rf /var/lib/apt/lists/*\n\
             RUN ln -sf /dev/stdout /var/log/nginx/access.log \
                 && ln -sf /dev/stderr /var/log/nginx/error.log \
                 && rm /etc/nginx/sites-enabled/default\n\
             COPY site /etc/nginx/sites-enabled/site\n\
             COPY index.html /srv/site/index.html\n\
             USER www-data\n\
             CMD [\"nginx\", \"-g\", \"daemon off;\"]\n",
            support::debian_base().display()
        ),
    )
    .unwrap();
    support::succeed(
        support::graven(home)
            .args(["bake", "--tag", "nginx:test", "--file"])
            .arg(ctx.join("Containerfile"))
            .arg(&ctx),
    );
    let nginx = start(
        home,
        &[
            "--port",
            "80",
            "--tmpfs",
            "/run:16MiB",
            "--tmpfs",
            "/var/lib/nginx:64MiB",
            "nginx:test",
        ],
    );
    let url = format!("http://{}/", address_of(home, &nginx.id));
    let body = support::wait_for(
        std::time::Duration::from_secs(30),
        "nginx to answer",
        || {
            let out = std::process::Command::new("curl")
                .args(["-sf", "--max-time", "2", &url])
                .output()
                .ok()?;
            out.status.success().then(|| stdout(&out))
        },
    );
    assert_eq!(body, "hello from nginx\n", "{}", log_of(home, &nginx.id));
    // The access log line (stdout) and the warning nginx gives as a user that is not root
    // (stderr) both reach the instance's log.
    let log = support::wait_for(
        std::time::Duration::from_secs(10),
        "the access log line",
        || {
            let log = log_of(home, &nginx.id);
            log.contains("\"GET / HTTP/1.1\" 200").then_some(log)
        },
    );
    assert!(log.contains(" stdout "), "{log}");
    assert!(!log.contains("Permission denied"), "{log}");
    assert!(!log.contains("Read-only file system"), "{log}");
    let ps = stdout(&support::succeed(
        support::graven(home).args(["ps", "--json"]),
    ));
    assert!(ps.contains(&nginx.id), "{ps}");
    drop(nginx);
    // Without a tmpfs for /var/lib/nginx: nginx cannot make its temp dirs.
    let output = run(home, &["--tmpfs", "/run:16MiB", "nginx:test"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("Read-only file system"),
        "{}",
        stderr(&output)
    );
}

/// The same image run by Docker (the test's own dockerd) and by graven, each case's output
/// compared: ENTRYPOINT and CMD against a command and `--entrypoint`, the user an image with
/// no USER runs as and `--user`, and a tmpfs's mode.
#[test]
fn docker_agrees_on_entrypoint_cmd_user_and_tmpfs() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    let home = home.as_path();
    image(
        home,
        "echo:test",
        RuntimeConfig {
            entrypoint: strings(&["/bin/echo", "entry"]),
            cmd: strings(&["cmd"]),
            ..RuntimeConfig::default()
        },
    );
    let archive = temp.path().join("echo.tar");
    support::succeed(
        support::graven(home)
            .args(["image", "export", "--format", "docker", "-o"])
            .arg(&archive)
            .arg("echo:test"),
    );
    let docker = support::docker::Dockerd::start();
    docker.run(&["load", "-i", archive.to_str().unwrap()]);
    // (options, command after the image)
    let cases: [(&[&str], &[&str]); 9] = [
        (&[], &[]),
        (&[], &["a", "b"]),
        (&["--entrypoint", "/bin/echo"], &[]),
        (&["--entrypoint", "/bin/echo"], &["x"]),
        (&["--entrypoint", ""], &["/bin/echo", "y"]),
        (&["--entrypoint", "/bin/id"], &["-u"]),
        (&["--entrypoint", "/bin/id", "--user", "app"], &["-u"]),
        (&["--entrypoint", "/bin/id", "--user", "1000:0"], &["-g"]),
        (
            &["--entrypoint", "/bin/stat", "--tmpfs", "/run"],
            &["-c", "%a", "/run"],
        ),
    ];
    for (options, command) in cases {
        let mut args: Vec<&str> = vec!["run", "--rm", "--network", "none"];
        args.extend(options);
        args.push("echo:test");
        args.extend(command);
        let from_docker = stdout(&docker.run(&args));
        let mut args: Vec<&str> = options.to_vec();
        args.push("echo:test");
        if !command.is_empty() {
            args.push("--");
            args.extend(command);
        }
        assert_eq!(run_ok(home, &args), from_docker, "{options:?} {command:?}");
    }
}
