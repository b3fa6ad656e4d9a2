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

/// Paths graven's reproducibility rules keep out of RUN layers (src/bake/reproducible.rs).
const DROPPED: [&str; 8] = [
    "var/log/dpkg.log",
    "var/log/alternatives.log",
    "var/log/apt/history.log",
    "var/log/apt/term.log",
    "var/log/apt/eipp.log.xz",
    "var/cache/apt/pkgcache.bin",
    "var/cache/apt/srcpkgcache.bin",
    "var/cache/ldconfig/aux-cache",
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

/// Python bytecode without its validation field (bytes 4..16 of a PEP 552 header).
fn comparable(path: &str, bytes: &[u8]) -> Vec<u8> {
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
        let (a, b) = (ours.files.get(path), docker.files.get(path));
        if a != b {
            found.push(format!("/{path}\n    graven: {a:?}\n    docker: {b:?}"));
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
