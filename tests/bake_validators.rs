//! Independent validators accept what graven writes: skopeo reads the store and an exported
//! OCI archive, umoci unpacks the image, and the docker-archive export loads into a real
//! dockerd (started here when none is running) and the example answers /healthz from it.

mod support;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{graven, hello_binary, succeed, wait_for, workspace};

/// Bakes the example into `home` as `hello:valid` and returns its digest.
fn bake_example(home: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("dist")).unwrap();
    fs::copy(
        workspace().join("examples/hello/Containerfile"),
        dir.path().join("Containerfile"),
    )
    .unwrap();
    fs::copy(hello_binary(), dir.path().join("dist/hello")).unwrap();
    let out = succeed(
        graven(home)
            .args(["bake", "--json", "--tag", "hello:valid"])
            .arg(dir.path()),
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    result["digest"].as_str().unwrap().to_owned()
}

fn export(home: &Path, format: &str, to: &Path) {
    succeed(
        graven(home)
            .args(["image", "export", "hello:valid", "--format", format, "-o"])
            .arg(to),
    );
}

fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: run scripts/test, which installs the test peers"
    );
    Command::new(name)
}

fn skopeo_digest(reference: &str) -> String {
    let out = succeed(tool("skopeo").args(["inspect", reference]));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    value["Digest"].as_str().unwrap().to_owned()
}

#[test]
fn skopeo_reads_the_store_and_the_oci_export() {
    let home = tempfile::tempdir().unwrap();
    let digest = bake_example(home.path());
    let store = home.path().join("store");
    assert_eq!(
        skopeo_digest(&format!("oci:{}:hello:valid", store.display())),
        digest
    );
    let out = tempfile::tempdir().unwrap();
    let archive = out.path().join("hello.tar");
    export(home.path(), "oci", &archive);
    let layout = out.path().join("layout");
    fs::create_dir(&layout).unwrap();
    succeed(
        Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&layout),
    );
    assert_eq!(
        skopeo_digest(&format!("oci:{}:hello:valid", layout.display())),
        digest
    );
    // Negative control: a tag the layout does not hold is refused.
    let missing = tool("skopeo")
        .args(["inspect", &format!("oci:{}:nope", layout.display())])
        .output()
        .unwrap();
    assert!(!missing.status.success());
}

#[test]
fn umoci_unpacks_the_image_with_hello_in_its_rootfs() {
    let home = tempfile::tempdir().unwrap();
    bake_example(home.path());
    let bundle = tempfile::tempdir().unwrap();
    let target = bundle.path().join("bundle");
    succeed(
        tool("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!(
                "{}:hello:valid",
                home.path().join("store").display()
            ))
            .arg(&target),
    );
    let hello = target.join("rootfs/hello");
    assert!(hello.is_file(), "the bundle's rootfs has no /hello");
    assert_eq!(fs::read(&hello).unwrap(), fs::read(hello_binary()).unwrap());
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(target.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["process"]["args"][0], "/hello");
}

/// A dockerd this test started (own data root, socket and pid file), killed by its PID on drop.
struct Dockerd {
    child: Option<Child>,
    host: String,
    _dir: tempfile::TempDir,
}

impl Dockerd {
    /// The running docker when `docker info` works, else a fresh dockerd of our own.
    fn start() -> Dockerd {
        let dir = tempfile::Builder::new()
            .prefix("graven-dockerd-")
            .tempdir()
            .unwrap();
        let existing = Command::new("docker")
            .arg("info")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if existing {
            return Dockerd {
                child: None,
                host: std::env::var("DOCKER_HOST").unwrap_or_default(),
                _dir: dir,
            };
        }
        let socket: PathBuf = dir.path().join("docker.sock");
        let host = format!("unix://{}", socket.display());
        let log = fs::File::create(dir.path().join("dockerd.log")).unwrap();
        let child = tool("dockerd")
            .arg("--data-root")
            .arg(dir.path().join("data"))
            .arg("--exec-root")
            .arg(dir.path().join("exec"))
            .arg("--pidfile")
            .arg(dir.path().join("dockerd.pid"))
            .args(["-H", &host, "--iptables=false", "--bridge=none"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dockerd starts");
        let dockerd = Dockerd {
            child: Some(child),
            host,
            _dir: dir,
        };
        let log_path = dockerd._dir.path().join("dockerd.log");
        wait_for(Duration::from_secs(60), "dockerd to answer", || {
            let ok = dockerd
                .docker()
                .arg("info")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                // A dockerd that exited will never answer: fail with its log, not a timeout.
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                assert!(
                    !log.contains("level=fatal"),
                    "docker cannot run on this machine:\n{log}"
                );
            }
            ok.then_some(())
        });
        dockerd
    }

    fn docker(&self) -> Command {
        let mut command = Command::new("docker");
        if !self.host.is_empty() {
            command.env("DOCKER_HOST", &self.host);
        }
        command
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let Some(child) = &mut self.child else {
            return;
        };
        // SAFETY: kill(2) on the PID of the child this test spawned and has not reaped.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !matches!(child.try_wait(), Ok(Some(_))) {
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // dockerd leaves its network namespace bind-mounted under its exec root; detached,
        // the temp dir can go and no mount outlives the test.
        unmount_below(self._dir.path());
    }
}

/// Lazily unmounts every mount at or below `dir`, deepest first.
fn unmount_below(dir: &Path) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounted: Vec<&str> = info
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .filter(|point| Path::new(point).starts_with(dir))
        .collect();
    mounted.sort_by_key(|point| std::cmp::Reverse(point.len()));
    for point in mounted {
        if let Ok(point) = std::ffi::CString::new(point) {
            // SAFETY: a valid C string; MNT_DETACH only detaches that mount from this
            // (the test's) namespace.
            unsafe { libc::umount2(point.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// A container started by this test, stopped on drop.
struct Container<'a> {
    docker: &'a Dockerd,
    id: String,
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self
            .docker
            .docker()
            .args(["rm", "-f", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    // Read what arrives; a server that keeps the connection open ends the read by timeout.
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
        }
    }
    (!response.is_empty()).then(|| String::from_utf8_lossy(&response).into_owned())
}

#[test]
fn the_docker_export_loads_into_dockerd_and_answers_healthz() {
    let home = tempfile::tempdir().unwrap();
    bake_example(home.path());
    let out = tempfile::tempdir().unwrap();
    let archive = out.path().join("hello-docker.tar");
    export(home.path(), "docker", &archive);
    let dockerd = Dockerd::start();
    let load = succeed(dockerd.docker().arg("load").arg("-i").arg(&archive));
    assert!(String::from_utf8_lossy(&load.stdout).contains("hello:valid"));
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = succeed(
        dockerd
            .docker()
            .args(["run", "--rm", "-d", "--network", "host", "-e"])
            .arg(format!("PORT={port}"))
            .arg("hello:valid"),
    );
    let container = Container {
        docker: &dockerd,
        id: String::from_utf8_lossy(&run.stdout).trim().to_owned(),
    };
    let response = wait_for(
        Duration::from_secs(30),
        "the container to answer /healthz",
        || {
            http_get(port, "/healthz")
                .filter(|r| r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"))
        },
    );
    assert!(response.contains("ok"), "{response}");
    drop(container);
    // Negative control: nothing answers once the container is gone.
    wait_for(Duration::from_secs(30), "the port to close", || {
        http_get(port, "/healthz").is_none().then_some(())
    });
}
