//! Real servers, unmodified, deployed with graven: stock Debian nginx as `www-data` on its
//! own port behind an HTTP route, and PostgreSQL behind a TCP route with a TCP health check,
//! each through a rolling deploy under load with no failed request or connection. Both
//! images are baked by graven from a Debian base made with debootstrap.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::daemon::{Up, free_port, run_ok};
use support::load::{Load, LoadOptions};

/// A scratch dir with a graven home and a project whose Containerfile is `steps` on the
/// Debian base: (the dir, which must be kept, home, project, a free route address).
fn debian_project(
    steps: &str,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
    SocketAddr,
) {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    write(
        &dir,
        "Containerfile",
        &format!(
            "FROM docker-archive:{}\n{steps}",
            support::debian_base().display()
        ),
    );
    (temp, home, dir, free_port())
}

/// `psql` as postgres through `route`, with what else the caller adds.
fn psql_at(route: SocketAddr) -> Command {
    let mut command = Command::new("psql");
    command
        .args([
            "-h",
            &route.ip().to_string(),
            "-p",
            &route.port().to_string(),
        ])
        .args(["-U", "postgres", "-tA"])
        .env("PGCONNECT_TIMEOUT", "10");
    command
}

/// Writes a file of the project.
fn write(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// nginx's site as the test deploys it: the version in a header (what the load counts) and
/// in the body.
fn nginx_site(version: &str) -> String {
    format!(
        "server {{\n    listen 80 default_server;\n    root /var/www/html;\n    \
         add_header x-hello-version {version};\n    location / {{ return 200 \"{version}\\n\"; }}\n}}\n"
    )
}

/// Stock Debian nginx: the package's config untouched but for the site, its logs to
/// /dev/stdout and /dev/stderr as Docker's own nginx image links them, `USER www-data`,
/// the port it listens on from EXPOSE.
const NGINX_CONTAINERFILE: &str = "\
RUN apt-get update \\
 && apt-get install -y --no-install-recommends nginx \\
 && rm -rf /var/lib/apt/lists/* \\
 && ln -sf /dev/stdout /var/log/nginx/access.log \\
 && ln -sf /dev/stderr /var/log/nginx/error.log
COPY site.conf /etc/nginx/sites-enabled/default
USER www-data
EXPOSE 80
CMD [\"nginx\", \"-g\", \"daemon off;\"]
";

#[test]
fn stock_nginx_as_www_data_on_its_own_port_rolls_with_no_failed_request() {
    let (_temp, home, dir, route) = debian_project(NGINX_CONTAINERFILE);
    write(&dir, "site.conf", &nginx_site("v1"));
    write(
        &dir,
        "graven.toml",
        &format!(
            r#"app = "nginx"

[services.web]
instances = 2
route = "{route}"
tmpfs = {{ "/run" = "16MiB", "/var/lib/nginx" = "64MiB" }}
health = {{ path = "/", interval = "200ms", timeout = "1s", healthy_after = 1, unhealthy_after = 3 }}
deploy = {{ max_surge = 1, max_unavailable = 0, health_deadline = "90s" }}
stop_grace = "5s"
"#
        ),
    );
    let _daemon = Up::daemon(&home, "local");
    run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    let answer = support::runtime::get(route, "/").expect("nginx answers through the route");
    assert_eq!(answer.body, "v1\n");

    let load = Load::start_with(LoadOptions::new(route, 4));
    write(&dir, "site.conf", &nginx_site("v2"));
    run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    support::wait_for(Duration::from_secs(30), "v2 to answer under load", || {
        (load.snapshot().last_version.as_deref() == Some("v2")).then_some(())
    });
    let report = load.stop();
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.failures);
    assert!(
        report.versions.get("v1").is_some_and(|&n| n > 0),
        "{report:?}"
    );
    assert!(
        report.versions.get("v2").is_some_and(|&n| n > 0),
        "{report:?}"
    );

    // nginx listened on port 80 of each instance's own address (EXPOSE; no `port` in
    // graven.toml), not on the host: nothing of the host listens there.
    let (ps, _) = run_ok(&home, &["ps"]);
    let running: Vec<&str> = ps.lines().filter(|line| line.contains("running")).collect();
    assert_eq!(running.len(), 2, "{ps}");
    for line in running {
        assert!(line.contains(":80 ") || line.ends_with(":80"), "{ps}");
        assert!(!line.contains("127.0.0.1:"), "{ps}");
    }
}

/// PostgreSQL from Debian as a stateless TCP service: each instance makes its own cluster
/// in its /tmp at start, so two may run at once during a rolling deploy.
const POSTGRES_CONTAINERFILE: &str = "\
RUN apt-get update \\
 && apt-get install -y --no-install-recommends postgresql-15 \\
 && rm -rf /var/lib/apt/lists/*
USER postgres
ENV PATH=/usr/lib/postgresql/15/bin:$PATH
EXPOSE 5432
CMD [\"sh\", \"-c\", \"initdb -D /tmp/pg -U postgres --auth=trust >/dev/null && echo 'host all all 0.0.0.0/0 trust' >> /tmp/pg/pg_hba.conf && exec postgres -D /tmp/pg -k /tmp -c listen_addresses='*'\"]
";

/// `psql -c SQL` through the route: its trimmed output, or why it failed.
fn psql(route: SocketAddr, sql: &str) -> Result<String, String> {
    let out = psql_at(route)
        .args(["-c", sql])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

#[test]
fn postgres_behind_a_tcp_route_rolls_with_no_failed_connection() {
    let (_temp, home, dir, route) = debian_project(POSTGRES_CONTAINERFILE);
    let project = |version: &str| {
        format!(
            r#"app = "pg"

[services.db]
instances = 2
route = "tcp://{route}"
env = {{ VERSION = "{version}" }}
limits = {{ tmp = "256MiB" }}
health = {{ kind = "tcp", interval = "200ms", timeout = "1s", healthy_after = 2, unhealthy_after = 3 }}
deploy = {{ max_surge = 1, max_unavailable = 0, health_deadline = "60s" }}
stop_grace = "20s"
"#
        )
    };
    write(&dir, "graven.toml", &project("v1"));
    let _daemon = Up::daemon(&home, "local");
    run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    assert_eq!(psql(route, "select 1").as_deref(), Ok("1"));

    // A long session: one psql connection open across the deploy.
    let mut session = Command::new("psql")
        .args([
            "-h",
            &route.ip().to_string(),
            "-p",
            &route.port().to_string(),
        ])
        .args(["-U", "postgres", "-tA"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("psql starts");
    let mut to_session = session.stdin.take().unwrap();
    let mut from_session = BufReader::new(session.stdout.take().unwrap());
    let mut ask = |sql: &str| {
        writeln!(to_session, "{sql}").unwrap();
        let mut line = String::new();
        from_session.read_line(&mut line).unwrap();
        line.trim().to_owned()
    };
    let backend = ask("select pg_backend_pid();");
    assert!(backend.parse::<u32>().is_ok(), "{backend:?}");

    // Short connections during the deploy, one after another, none may fail.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut results = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                results.push(psql(route, "select 1"));
            }
            results
        })
    };
    write(&dir, "graven.toml", &project("v2"));
    // `graven deploy` follows the rollout to its end, which waits for the session's drain:
    // it runs beside the test's session.
    let deploying = {
        let (home, dir) = (home.clone(), dir.clone());
        std::thread::spawn(move || {
            run_ok(&home, &["deploy", dir.to_str().unwrap()]);
        })
    };
    // The new release serves new connections while the session's instance drains (a
    // rolling deploy with max_surge 1 starts the second v2 instance only once the first
    // v1 one is gone, so that one waits for the session or stop_grace).
    let mut last = String::new();
    let drained = support::try_wait_for(Duration::from_secs(60), || {
        last = run_ok(&home, &["status", "--json"]).0;
        let status: serde_json::Value = serde_json::from_str(&last).ok()?;
        let lifecycles: Vec<(u64, String)> = status[0]["state"]["instances"]
            .as_object()?
            .values()
            .map(|i| {
                (
                    i["release"].as_u64().unwrap_or(0),
                    i["lifecycle"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        // Every v1 instance out of rotation, one still draining: the one the session holds
        // (the other, with no connection, drains at once).
        let healthy_v1 = lifecycles
            .iter()
            .any(|(release, state)| *release == 1 && state == "healthy");
        let draining_v1 = lifecycles
            .iter()
            .any(|(release, state)| *release == 1 && state == "draining");
        (!healthy_v1 && draining_v1).then_some(())
    });
    if drained.is_none() {
        let (history, _) = run_ok(&home, &["history"]);
        panic!("v1 out of rotation and draining:\n{history}");
    }
    assert_eq!(
        ask("select pg_backend_pid();"),
        backend,
        "the session is still on its backend while its instance drains"
    );
    // The session ends; its instance's drain ends with it, and so does the deploy.
    drop(to_session);
    session.wait().unwrap();
    deploying.join().unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let results = clients.join().unwrap();
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(!results.is_empty());
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        results.len()
    );
}
