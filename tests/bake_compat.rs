//! The compatibility suite: realistic Containerfiles, unmodified as Docker users write them,
//! baked by graven and by `docker build` (BuildKit, an engine the test starts) from the same
//! Debian base (`scripts/debian-base`) and the same context, and the two images compared: every
//! path's type, mode, owner and content, and the config fields a runtime reads.
//!
//! What may differ, and why (docs/bake.md, "Compared with docker build"):
//! - the files graven's reproducibility rules keep out of RUN layers (`DROPPED`) are not
//!   compared;
//! - Python bytecode is compared without its 12 validation bytes (flags, source mtime and size,
//!   or the source hash): both are valid for the image's own sources.
//!
//! Docker 20.10's built-in Dockerfile frontend predates heredocs, and a newer one would come
//! from Docker Hub (no internet here), so the heredoc case compares graven's image with
//! Docker's image of the same file written without heredocs.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use support::docker::Dockerd;
use support::{graven, imagefs, succeed};

/// The base's tag in both engines; the Containerfiles say `FROM graven-test/debian:bookworm`.
const BASE: &str = "graven-test/debian:bookworm";

/// Paths graven's reproducibility rules keep out of RUN layers.
use graven::bake::reproducible::DROPPED;

/// Files whose content is random or names the day it was made, on any two builds of any
/// engine: compared as present with their type, mode and owner, not their content.
/// `/etc/shadow`'s password change day is `SOURCE_DATE_EPOCH`'s under graven, today's under
/// Docker (compared with that field blanked); ssl-cert makes a fresh key and a certificate
/// for the build's host name (whose hash names a link in /etc/ssl/certs).
const VOLATILE: [&str; 2] = [
    "etc/ssl/certs/ssl-cert-snakeoil.pem",
    "etc/ssl/private/ssl-cert-snakeoil.key",
];

/// The config fields compared.
const CONFIG_FIELDS: [&str; 11] = [
    "Env",
    "Cmd",
    "Entrypoint",
    "User",
    "WorkingDir",
    "ExposedPorts",
    "Healthcheck",
    "Labels",
    "StopSignal",
    "Volumes",
    "OnBuild",
];

/// Both engines with the base loaded, and graven's home.
struct Engines {
    docker: Dockerd,
    home: tempfile::TempDir,
}

impl Engines {
    fn start() -> Engines {
        let started = std::time::Instant::now();
        let base = support::debian_base();
        let docker = Dockerd::start();
        eprintln!("dockerd answered after {:?}", started.elapsed());
        docker.run(&["load", "-i", base.to_str().unwrap()]);
        eprintln!("base loaded into docker after {:?}", started.elapsed());
        let home = tempfile::tempdir().unwrap();
        let ctx = tempfile::tempdir().unwrap();
        fs::write(
            ctx.path().join("Containerfile"),
            format!("FROM docker-archive:{}\n", base.display()),
        )
        .unwrap();
        succeed(
            graven(home.path())
                .args(["bake", "--tag", BASE])
                .arg(ctx.path()),
        );
        eprintln!("base imported into graven after {:?}", started.elapsed());
        Engines { docker, home }
    }

    /// Bakes `containerfile` in `ctx` with graven and Docker under `tag`; `docker_file` is the
    /// Containerfile Docker gets when it differs (heredocs). Returns both images.
    fn build(
        &self,
        ctx: &Path,
        tag: &str,
        containerfile: &str,
        docker_file: Option<&str>,
    ) -> (imagefs::Image, imagefs::Image) {
        let started = std::time::Instant::now();
        fs::write(ctx.join("Containerfile"), containerfile).unwrap();
        fs::write(ctx.join("Dockerfile"), docker_file.unwrap_or(containerfile)).unwrap();
        succeed(
            graven(self.home.path())
                .args(["bake", "--tag", tag, "--file"])
                .arg(ctx.join("Containerfile"))
                .arg(ctx),
        );
        let exported = ctx.join("graven-image.tar");
        succeed(
            graven(self.home.path())
                .args(["image", "export", "--format", "docker", "-o"])
                .arg(&exported)
                .arg(tag),
        );
        eprintln!(
            "{tag}: graven baked and exported after {:?}",
            started.elapsed()
        );
        let dockerfile = ctx.join("Dockerfile");
        self.docker.run(&[
            "build",
            "--network=host",
            "-q",
            "-f",
            dockerfile.to_str().unwrap(),
            "-t",
            tag,
            ctx.to_str().unwrap(),
        ]);
        let saved = self.docker.save(tag);
        eprintln!(
            "{tag}: docker built and saved after {:?}",
            started.elapsed()
        );
        let ours = imagefs::read(&exported, &comparable);
        fs::remove_file(&exported).unwrap();
        (ours, imagefs::read(&saved, &comparable))
    }
}

/// Python bytecode without its validation field (bytes 4..16 of a PEP 552 header), shadow
/// files without the password change day, volatile files as nothing.
fn comparable(path: &str, bytes: &[u8]) -> Vec<u8> {
    if VOLATILE.contains(&path) {
        return Vec::new();
    }
    if path == "etc/shadow" || path == "etc/shadow-" {
        let text = String::from_utf8_lossy(bytes);
        return text
            .lines()
            .map(|line| {
                let mut fields: Vec<&str> = line.split(':').collect();
                if fields.len() > 2 {
                    fields[2] = "";
                }
                fields.join(":") + "\n"
            })
            .collect::<String>()
            .into_bytes();
    }
    let mut bytes = bytes.to_vec();
    if path.ends_with(".pyc") && bytes.len() >= 16 && bytes[2..4] == *b"\r\n" {
        bytes[4..16].fill(0);
    }
    bytes
}

/// Every difference between the two images, as lines; empty when they agree.
fn differences(ours: &imagefs::Image, docker: &imagefs::Image) -> Vec<String> {
    let mut found = Vec::new();
    let paths: std::collections::BTreeSet<&String> =
        ours.files.keys().chain(docker.files.keys()).collect();
    for path in paths {
        if DROPPED.contains(&path.as_str()) {
            continue;
        }
        // The subject hash link of ssl-cert's certificate (named by the host name's hash).
        if path.starts_with("etc/ssl/certs/")
            && path.ends_with(".0")
            && ours
                .files
                .get(path)
                .or(docker.files.get(path))
                .map(|n| n.content.as_str())
                == Some("ssl-cert-snakeoil.pem")
        {
            continue;
        }
        let (a, b) = (ours.files.get(path), docker.files.get(path));
        if a != b {
            let mut line = format!("/{path}\n    graven: {a:?}\n    docker: {b:?}");
            if let (Some(x), Some(y)) = (ours.texts.get(path), docker.texts.get(path)) {
                line += &format!("\n    graven's text: {x:?}\n    docker's text: {y:?}");
            }
            found.push(line);
        }
    }
    let empty = |v: &serde_json::Value| {
        v.is_null()
            || v.as_array().is_some_and(|a| a.is_empty())
            || v.as_object().is_some_and(|o| o.is_empty())
            || v.as_str().is_some_and(str::is_empty)
    };
    for field in CONFIG_FIELDS {
        let (a, b) = (&ours.config[field], &docker.config[field]);
        if a != b && !(empty(a) && empty(b)) {
            found.push(format!("config {field}\n    graven: {a}\n    docker: {b}"));
        }
    }
    found
}

fn assert_same(name: &str, (ours, docker): (imagefs::Image, imagefs::Image)) {
    let found = differences(&ours, &docker);
    assert!(
        found.is_empty(),
        "{name}: graven's image differs from docker build's in {} places:\n{}",
        found.len(),
        found
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        ours.files.len() > 10,
        "{name}: the image has its base's files"
    );
}

/// A context directory holding `files` (path, content, mode).
fn context(files: &[(&str, &str, u32)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    for (path, content, mode) in files {
        let path = dir.path().join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).unwrap();
    }
    dir
}

#[test]
fn a_run_and_a_copy_on_the_debian_base() {
    let engines = Engines::start();
    let ctx = context(&[("etc-motd", "hello\n", 0o644)]);
    let file = "FROM graven-test/debian:bookworm\n\
        RUN echo built > /built && ln -s /built /etc/built-link && rm /etc/issue.net\n\
        COPY etc-motd /etc/motd\n\
        ENV GREETING=hello\n\
        LABEL org.example.kind=smoke\n\
        CMD [\"cat\", \"/built\"]\n";
    assert_same(
        "run and copy",
        engines.build(ctx.path(), "compat/smoke:1", file, None),
    );
}

#[test]
fn heredocs_give_the_image_docker_builds_from_the_same_file_without_them() {
    let engines = Engines::start();
    let ctx = context(&[]);
    let file = r#"# syntax=docker/dockerfile:1
FROM graven-test/debian:bookworm
ARG GREETING=hello
RUN <<EOF
set -e
mkdir -p /srv/app
echo "$GREETING from a heredoc" > /srv/app/greeting
EOF
COPY <<EOF /etc/app.conf
greeting=${GREETING}
EOF
RUN <<'EOF' bash
echo '$GREETING stays as written' > /srv/app/literal
EOF
"#;
    let plain = r#"FROM graven-test/debian:bookworm
ARG GREETING=hello
RUN set -e && mkdir -p /srv/app && echo "$GREETING from a heredoc" > /srv/app/greeting
RUN printf 'greeting=%s\n' "$GREETING" > /etc/app.conf && chmod 0644 /etc/app.conf
RUN echo '$GREETING stays as written' > /srv/app/literal
"#;
    assert_same(
        "heredocs",
        engines.build(ctx.path(), "compat/heredoc:1", file, Some(plain)),
    );
}

#[test]
fn onbuild_triggers_run_in_the_child_as_docker_runs_them() {
    let engines = Engines::start();
    let ctx = context(&[("app/main.sh", "#!/bin/sh\necho hello from onbuild\n", 0o755)]);
    let parent = r#"FROM graven-test/debian:bookworm
WORKDIR /app
ONBUILD COPY app/ /app/
ONBUILD RUN chmod 0755 /app/main.sh && echo built > /app/stamp
CMD ["/app/main.sh"]
"#;
    assert_same(
        "onbuild parent",
        engines.build(ctx.path(), "compat/onbuild-parent:1", parent, None),
    );
    let child = "FROM compat/onbuild-parent:1\nLABEL kind=child\n";
    let (ours, docker) = engines.build(ctx.path(), "compat/onbuild-child:1", child, None);
    assert!(ours.files.contains_key("app/stamp"), "the trigger ran");
    assert_same("onbuild child", (ours, docker));
}

#[test]
fn a_python_web_app_with_apt_a_venv_pip_and_useradd() {
    // The app the bake benchmark times (bench/python-app): apt, a venv and pip, useradd.
    let engines = Engines::start();
    let app = support::workspace().join("bench/python-app");
    let ctx = context(&[]);
    for name in ["requirements.txt", "app.py"] {
        fs::copy(app.join(name), ctx.path().join(name)).unwrap();
        fs::set_permissions(ctx.path().join(name), fs::Permissions::from_mode(0o644)).unwrap();
    }
    let file = fs::read_to_string(app.join("Containerfile")).unwrap();
    assert_same(
        "python app",
        engines.build(ctx.path(), "compat/python:1", &file, None),
    );
}

#[test]
fn nginx_with_a_custom_config_as_www_data() {
    let engines = Engines::start();
    let ctx = context(&[
        (
            "nginx.conf",
            "pid /tmp/nginx.pid;\nerror_log /dev/stderr;\nevents {}\nhttp {\n  access_log /dev/stdout;\n  client_body_temp_path /tmp/body;\n  proxy_temp_path /tmp/proxy;\n  fastcgi_temp_path /tmp/fastcgi;\n  uwsgi_temp_path /tmp/uwsgi;\n  scgi_temp_path /tmp/scgi;\n  server {\n    listen 8080;\n    root /var/www/html;\n  }\n}\n",
            0o644,
        ),
        ("site/index.html", "<h1>hello from nginx</h1>\n", 0o644),
    ]);
    let file = r#"FROM graven-test/debian:bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx \
 && rm -rf /var/lib/apt/lists/*
COPY nginx.conf /etc/nginx/nginx.conf
COPY site/ /var/www/html/
RUN chown -R www-data:www-data /var/lib/nginx /var/log/nginx
USER www-data
EXPOSE 8080
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
"#;
    assert_same(
        "nginx",
        engines.build(ctx.path(), "compat/nginx:1", file, None),
    );
}

#[test]
fn postgresql_with_its_data_dir_owned_by_its_user() {
    let engines = Engines::start();
    let ctx = context(&[]);
    // As the official postgres image does: no cluster at install time (initdb stamps it with
    // the time and a random system identifier), the data directory made for the server's user.
    let file = r#"FROM graven-test/debian:bookworm
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends postgresql-common; \
    sed -ri 's/#(create_main_cluster) .*$/\1 = false/' /etc/postgresql-common/createcluster.conf; \
    apt-get install -y --no-install-recommends postgresql-15; \
    rm -rf /var/lib/apt/lists/*
ENV PATH=$PATH:/usr/lib/postgresql/15/bin PGDATA=/var/lib/postgresql/data
RUN mkdir -p "$PGDATA" && chown -R postgres:postgres "$PGDATA" && chmod 0700 "$PGDATA"
VOLUME /var/lib/postgresql/data
USER postgres
EXPOSE 5432
STOPSIGNAL SIGINT
CMD ["postgres"]
"#;
    assert_same(
        "postgresql",
        engines.build(ctx.path(), "compat/postgres:1", file, None),
    );
}

#[test]
fn a_multi_stage_build_of_a_c_program_that_ends_from_scratch() {
    let engines = Engines::start();
    let ctx = context(&[(
        "hello.c",
        "#include <stdio.h>\nint main(void) { puts(\"hello from a static binary\"); return 0; }\n",
        0o644,
    )]);
    let file = r#"FROM graven-test/debian:bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev
WORKDIR /src
COPY hello.c .
RUN gcc -static -O2 -o /hello hello.c

FROM graven-test/debian:bookworm AS unused
RUN echo "a stage the target does not need" > /unused

FROM scratch
COPY --from=build /hello /hello
USER 65534
ENTRYPOINT ["/hello"]
"#;
    let (ours, docker) = engines.build(ctx.path(), "compat/static:1", file, None);
    assert!(ours.files.contains_key("hello"), "the binary was copied");
    let found = differences(&ours, &docker);
    assert!(found.is_empty(), "static: {}", found.join("\n"));
}

#[test]
fn a_cache_mount_keeps_apt_downloads_out_of_the_image() {
    let engines = Engines::start();
    let ctx = context(&[]);
    // Docker's documented pattern for apt with a cache mount.
    let file = r#"FROM graven-test/debian:bookworm
RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,target=/var/lib/apt,sharing=locked \
    apt-get update && apt-get install -y --no-install-recommends netbase
"#;
    let (ours, docker) = engines.build(ctx.path(), "compat/cache:1", file, None);
    assert!(
        ours.files.contains_key("etc/protocols"),
        "netbase was installed"
    );
    assert!(
        !ours
            .files
            .keys()
            .any(|p| p.starts_with("var/cache/apt/archives/netbase")),
        "the downloaded package stayed in the cache mount"
    );
    let found = differences(&ours, &docker);
    assert!(found.is_empty(), "cache mount: {}", found.join("\n"));
}

#[test]
fn two_cold_bakes_of_the_python_app_give_one_digest() {
    // `graven bake --check` bakes twice from clean (no cache) and compares: apt, pip and
    // useradd run twice for real.
    let home = tempfile::tempdir().unwrap();
    let ctx = tempfile::tempdir().unwrap();
    fs::write(
        ctx.path().join("Containerfile"),
        format!("FROM docker-archive:{}\n", support::debian_base().display()),
    )
    .unwrap();
    succeed(
        graven(home.path())
            .args(["bake", "--tag", BASE])
            .arg(ctx.path()),
    );
    let app = support::workspace().join("bench/python-app");
    let out = graven(home.path())
        .args(["bake", "--check", "--json", "--tag", "python-app:1"])
        .arg(&app)
        .output()
        .unwrap();
    let checked: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(checked["reproducible"], true, "{checked:#}");
    assert!(out.status.success());
}
