//! The local runtime without root: graven run by an unprivileged user (uid 65534) starts
//! each instance in a user namespace that maps that one user to root inside. What the
//! instance sees, what the host sees, and that exec, volumes and stop work as with root.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use graven::store::RuntimeConfig;
use support::runtime::{File, assert_locked_down, get, parse_report, probe_binary, put_image};
use support::succeed;

const USER: u32 = 65534;

/// A temp dir that ends up the user's, with a copy of the graven binary in it (the checkout
/// may lie where the user cannot reach, under /root say) and graven's home.
struct Place {
    dir: tempfile::TempDir,
}

impl Place {
    fn new() -> Place {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("graven");
        // A hard link, or else a copy made by `cp`: a copy written by this process would
        // leave its write descriptor open for an instant, and a test forking meanwhile
        // would carry it into its child and make exec of the copy fail ("text file busy").
        if std::fs::hard_link(support::graven_bin(), &binary).is_err() {
            succeed(Command::new("cp").arg(support::graven_bin()).arg(&binary));
        }
        std::fs::create_dir(dir.path().join("home")).unwrap();
        Place { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn home(&self) -> PathBuf {
        self.path().join("home")
    }

    /// Hands the dir and everything made in it so far to the user, but the binary: that may
    /// be a hard link to the build's own, which stays root's (the user only runs it).
    fn give_to_user(&self) {
        let owner = format!("{USER}:{USER}");
        succeed(Command::new("chown").arg(&owner).arg(self.path()));
        for entry in std::fs::read_dir(self.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name() != Some("graven".as_ref()) {
                succeed(Command::new("chown").args(["-R", &owner]).arg(path));
            }
        }
    }

    /// A graven command run as `USER`.
    fn graven(&self) -> Command {
        let mut command = Command::new(self.path().join("graven"));
        command
            .env("GRAVEN_HOME", self.home())
            .env_remove("SOURCE_DATE_EPOCH")
            .uid(USER)
            .gid(USER)
            .current_dir("/");
        command
    }
}

/// The first field of a `Uid:` or `Gid:` line of /proc/<pid>/status: the id on the host.
fn host_id(pid: u64, field: &str) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Removes the instance, as the user, whatever the test's outcome.
struct Cleanup<'a>(&'a Place, String);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.0.graven().args(["rm", "-f", &self.1]).output();
    }
}

#[test]
fn an_unprivileged_user_runs_a_locked_down_instance_in_a_user_namespace() {
    if !rustix::process::geteuid().is_root() {
        // Every other runtime test already runs rootless then; this one needs root only to
        // become the unprivileged user.
        eprintln!("not root: the rest of the suite runs rootless already");
        return;
    }
    let place = Place::new();
    let home = &place.home();
    let config = RuntimeConfig {
        // CMD, so a command given (`graven run IMG -- /probe report`) replaces it.
        cmd: Some(vec!["/probe".to_owned(), "serve".to_owned()]),
        ..RuntimeConfig::default()
    };
    put_image(
        home,
        "probe:test",
        &[File::executable("probe", &probe_binary())],
        config,
    );
    place.give_to_user();

    let started = succeed(place.graven().args([
        "run",
        "-d",
        "--json",
        "--volume",
        "data:/data",
        "probe:test",
    ]));
    let instance: serde_json::Value = serde_json::from_slice(&started.stdout).unwrap();
    let id = instance["id"].as_str().unwrap().to_owned();
    let _cleanup = Cleanup(&place, id.clone());
    let address = instance["address"].as_str().unwrap().parse().unwrap();
    let pid = instance["pid"].as_u64().unwrap();
    // A network of its own without root too: a user-mode one (pasta).
    let warnings = instance["warnings"].to_string();
    assert!(
        !warnings.contains("shares the host's network"),
        "{warnings}"
    );

    // Inside: root of its own user namespace, and still without any privilege.
    let reply = support::wait_for(Duration::from_secs(10), "the probe to answer", || {
        get(address, "/report")
    });
    let seen = parse_report(&reply.body);
    assert_locked_down(&seen);
    assert_eq!(seen["uid"], "0", "the one mapped id is root inside");

    // Outside: that root is the unprivileged user, in a user namespace of its own.
    assert_eq!(host_id(pid, "Uid:"), USER);
    assert_eq!(host_id(pid, "Gid:"), USER);
    let user_ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/user")).unwrap();
    assert_ne!(user_ns(&pid.to_string()), user_ns("self"));
    // Nothing graven made belongs to anyone else: not the shared root, not the volume.
    for made in ["rootfs", "volumes/data", &format!("instances/{id}")] {
        let owner = std::fs::metadata(home.join(made)).unwrap().uid();
        assert_eq!(owner, USER, "{made} belongs to uid {owner}");
    }

    // Break-glass exec enters the same namespaces as the same (mapped) user.
    let inside = succeed(place.graven().args(["exec", &id, "--", "/probe", "report"]));
    let inside = parse_report(&String::from_utf8(inside.stdout).unwrap());
    assert_eq!(inside["uid"], "0");
    assert_eq!(inside["cap_eff"], "0000000000000000");
    assert_eq!(inside["hostname"], id);

    let stopped = succeed(place.graven().args(["stop", "--grace", "5s", &id]));
    let stopped = String::from_utf8(stopped.stdout).unwrap();
    assert!(stopped.contains("exited"), "{stopped}");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the workload is gone"
    );
    succeed(place.graven().args(["rm", &id]));

    // Its output is in the log store without root too, every line stamped, and outlives it.
    let logs = succeed(place.graven().args(["logs", "--json", "--instance", &id]));
    let lines: Vec<serde_json::Value> = String::from_utf8(logs.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let said: Vec<&str> = lines.iter().filter_map(|l| l["line"].as_str()).collect();
    assert!(
        said.iter().any(|l| l.starts_with("probe: listening on"))
            && said.contains(&"probe: got SIGTERM"),
        "{lines:?}"
    );
    assert!(lines.iter().all(|l| l["time"].is_string()), "{lines:?}");
    let source = home.join("logs/_run").join(&id);
    let owner = std::fs::metadata(source.join("out")).unwrap().uid();
    assert_eq!(owner, USER, "the log belongs to uid {owner}");
}

/// Baking without root: RUN runs as root of a user namespace, and what it writes lands in
/// the layer owned by root, as when baking with root (on disk it is the user's).
#[test]
fn an_unprivileged_user_bakes_a_run_step_whose_files_are_root_s() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("not root: the bake tests run rootless already");
        return;
    }
    let busybox = support::busybox();
    let place = Place::new();
    let home = place.home();
    let context = place.path().join("context");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::copy(busybox, context.join("busybox")).unwrap();
    std::fs::write(
        context.join("Containerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo made > /made; /bin/busybox id -u > /uid\"]\n",
    )
    .unwrap();
    place.give_to_user();
    let baked = succeed(
        place
            .graven()
            .arg("bake")
            .arg(&context)
            .args(["--tag", "made", "--json"]),
    );
    let baked = String::from_utf8(baked.stdout).unwrap();
    assert!(baked.contains("sha256:"), "{baked}");

    let store = graven::store::Store::open(&home).unwrap();
    let image = store.image(&store.resolve("made").unwrap()).unwrap();
    let top = image.manifest.layers.last().unwrap();
    let gz = store.read_blob(&top.digest).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(gz.as_slice()));
    let mut owners = BTreeMap::new();
    let mut uid_inside = String::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let header = entry.header();
        owners.insert(path.clone(), (header.uid().unwrap(), header.gid().unwrap()));
        if path == "uid" {
            use std::io::Read;
            entry.read_to_string(&mut uid_inside).unwrap();
        }
    }
    assert_eq!(uid_inside.trim(), "0", "RUN runs as root of its namespace");
    assert_eq!(owners.get("made"), Some(&(0, 0)), "{owners:?}");
    assert_eq!(owners.get("uid"), Some(&(0, 0)), "{owners:?}");
}

/// A RUN step baked without root has Docker's default capabilities inside its user
/// namespace, which maps one id: a chown to root (graven's user) works, one to any other id
/// fails, a device node cannot be made, and cache and tmpfs mounts work.
#[test]
fn a_rootless_run_step_has_the_build_capabilities_inside_its_namespace() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("not root: the bake tests run rootless already");
        return;
    }
    let place = Place::new();
    let home = place.home();
    let context = place.path().join("context");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::copy(support::busybox(), context.join("busybox")).unwrap();
    let script = "B=/bin/busybox; $B grep CapEff /proc/self/status > /out; \
        $B touch /f; $B chown 0:0 /f && echo chown-root-ok >> /out; \
        $B chown 1:1 /f 2>/dev/null || echo chown-other-refused >> /out; \
        $B mknod /node c 1 5 2>/dev/null || echo mknod-refused >> /out; \
        echo cached >> /cache/runs; $B cat /cache/runs >> /out; \
        $B grep -c ' /scratch tmpfs' /proc/mounts >> /out";
    std::fs::write(
        context.join("Containerfile"),
        format!(
            "FROM scratch\nCOPY busybox /bin/busybox\n\
             RUN --mount=type=cache,target=/cache --mount=type=tmpfs,target=/scratch \
             [\"/bin/busybox\", \"sh\", \"-c\", {}]\n",
            serde_json::to_string(script).unwrap()
        ),
    )
    .unwrap();
    place.give_to_user();
    succeed(
        place
            .graven()
            .arg("bake")
            .arg(&context)
            .args(["--tag", "caps", "--json"]),
    );
    let store = graven::store::Store::open(&home).unwrap();
    let image = store.image(&store.resolve("caps").unwrap()).unwrap();
    let top = image.manifest.layers.last().unwrap();
    let gz = store.read_blob(&top.digest).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(gz.as_slice()));
    let mut out = String::new();
    let mut paths = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        if path == "out" {
            use std::io::Read;
            entry.read_to_string(&mut out).unwrap();
        }
        paths.push(path);
    }
    assert_eq!(
        out,
        "CapEff:\t00000000a80425fb\nchown-root-ok\nchown-other-refused\nmknod-refused\ncached\n1\n"
    );
    assert_eq!(paths, ["f", "out"]);
}

/// A server of the test's on the host's loopback, answering any request with HTTP 200.
fn serve_on_loopback() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let bound = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0; 1024];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok");
        }
    });
    bound
}

/// `GET PATH` from `address`: the whole answer, or `None` when nothing answers.
fn http_get(address: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nhost: x\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.starts_with("HTTP/").then_some(answer)
}

/// Whether a new instance (`graven run ARGS box:test`, followed to its end) gets an HTTP
/// answer from port `port` of its own `127.0.0.1` and of its default gateway: the two ways a
/// user-mode network could lead to the host's loopback.
fn reaches_host_loopback(place: &Place, args: &[&str], port: u16) -> bool {
    let script = format!(
        "gw=$(/busybox ip route | /busybox awk '/^default/ {{print $3}}'); \
         for host in 127.0.0.1 $gw; do \
           printf 'GET / HTTP/1.0\\r\\n\\r\\n' | /busybox nc -w 2 $host {port} \
             | /busybox grep -q '^HTTP/' && exit 0; \
         done; exit 1"
    );
    place
        .graven()
        .arg("run")
        .args(args)
        .args(["box:test", "--", "/busybox", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Whether process `pid` runs (a zombie does not).
fn running(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

#[test]
fn a_rootless_instance_serves_on_its_own_port_behind_a_route_and_cannot_reach_the_host_s_loopback()
{
    if !rustix::process::geteuid().is_root() {
        eprintln!("not root: this test needs root only to become the unprivileged user");
        return;
    }
    let place = Place::new();
    let home = &place.home();
    support::runtime::hello_image(home);
    let config = RuntimeConfig {
        cmd: Some(vec!["/busybox".to_owned(), "true".to_owned()]),
        ..RuntimeConfig::default()
    };
    put_image(
        home,
        "box:test",
        &[File::executable("busybox", support::busybox())],
        config,
    );
    place.give_to_user();

    // Port 80 of its own network (not the host's: the user could not bind it there).
    let started =
        succeed(
            place
                .graven()
                .args(["run", "-d", "--json", "--port", "80", "hello:test"]),
        );
    let instance: serde_json::Value = serde_json::from_slice(&started.stdout).unwrap();
    let id = instance["id"].as_str().unwrap().to_owned();
    let _cleanup = Cleanup(&place, id.clone());
    let warnings = instance["warnings"].to_string();
    assert!(
        !warnings.contains("shares the host's network"),
        "{warnings}"
    );
    let address = instance["address"].as_str().unwrap().to_owned();
    let address: SocketAddr = address.parse().unwrap();
    assert!(
        address.ip().is_loopback() && address.port() != 80,
        "{address}"
    );

    // Behind a route (the standalone proxy), which connects to the address the runtime says.
    let mut route = Command::new(support::graven_bin())
        .args([
            "__proxy",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &address.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(route.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let listen = line
        .trim()
        .strip_prefix("proxy listening on ")
        .unwrap()
        .to_owned();
    let answer = support::wait_for(
        Duration::from_secs(10),
        "the instance behind the route",
        || http_get(&listen, "/").filter(|a| a.contains(" 200 OK\r\n")),
    );
    assert!(answer.contains("hello"), "{answer}");
    // SAFETY: kill(2) on the PID of a child this test started and has not reaped yet.
    let sent = unsafe { libc::kill(route.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0);
    route.wait().unwrap();

    // The pasta that carries its network is the instance's: gone with its removal.
    let state = std::fs::read_to_string(home.join(format!("instances/{id}/state.json"))).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    let pasta = state["pasta"]["pid"]
        .as_u64()
        .expect("the instance's pasta");
    assert!(running(pasta));
    succeed(place.graven().args(["rm", "-f", &id]));
    support::wait_for(
        Duration::from_secs(10),
        "the instance's pasta to end",
        || (!running(pasta)).then_some(()),
    );

    // The host's loopback is out of its reach, through 127.0.0.1 as through the gateway...
    let server = serve_on_loopback();
    assert!(!reaches_host_loopback(&place, &[], server.port()));
    // ... and within reach on the host's network (the negative control).
    assert!(reaches_host_loopback(
        &place,
        &["--network", "host"],
        server.port()
    ));
}
