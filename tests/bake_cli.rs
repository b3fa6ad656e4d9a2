//! `graven bake` end to end: reproducibility, the cache, bad input leaving the store untouched,
//! COPY/ADD semantics, `.dockerignore`, and every kind of FROM.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::{graven, hello_binary, succeed, workspace};

/// `graven bake <dir> <args>`.
fn bake(home: &Path, dir: &Path, args: &[&str]) -> Command {
    let mut command = graven(home);
    command.arg("bake").arg(dir).args(args);
    command
}

fn bake_json(home: &Path, dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = succeed(&mut bake(home, dir, &[&["--json"], args].concat()));
    serde_json::from_slice(&out.stdout).expect("--json prints json")
}

fn digest_of(value: &serde_json::Value) -> String {
    value["digest"].as_str().expect("a digest").to_owned()
}

/// The example's context: its Containerfile and .dockerignore plus the static binary.
fn example_context(dir: &Path) {
    fs::create_dir_all(dir.join("dist")).unwrap();
    for name in ["Containerfile", ".dockerignore"] {
        fs::copy(
            workspace().join("examples/hello").join(name),
            dir.join(name),
        )
        .unwrap();
    }
    fs::copy(hello_binary(), dir.join("dist/hello")).unwrap();
}

fn set_mtime(path: &Path, seconds: i64) {
    let file = fs::File::options().write(true).open(path).unwrap();
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds as u64);
    file.set_times(fs::FileTimes::new().set_modified(time).set_accessed(time))
        .unwrap();
}

/// Every file under the store and the cache with its size and content hash.
fn store_files(home: &Path) -> BTreeMap<PathBuf, (u64, String)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![home.join("store"), home.join("cache")];
    while let Some(dir) = stack.pop() {
        let Ok(read) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in read.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = fs::read(&path).unwrap();
                let hash = graven::store::Digest::of(&bytes).to_string();
                out.insert(
                    path.strip_prefix(home).unwrap().to_owned(),
                    (bytes.len() as u64, hash),
                );
            }
        }
    }
    out
}

/// The entries of an image's layers: path, mode, uid:gid and content size.
fn layer_listing(home: &Path, tag: &str) -> Vec<String> {
    let store = graven::store::Store::open(home).unwrap();
    let image = store.image(&store.resolve(tag).unwrap()).unwrap();
    let mut out = Vec::new();
    for layer in &image.manifest.layers {
        let blob = store.open_blob(&layer.digest).unwrap();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(blob));
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let header = entry.header().clone();
            let mut content = String::new();
            if header.entry_type().is_file() {
                entry.read_to_string(&mut content).unwrap_or_default();
            }
            let link = entry
                .link_name()
                .unwrap()
                .map(|l| format!(" -> {}", l.display()))
                .unwrap_or_default();
            out.push(format!(
                "{} {:o} {}:{}{link}{}",
                entry.path().unwrap().display(),
                header.mode().unwrap(),
                header.uid().unwrap(),
                header.gid().unwrap(),
                if content.is_empty() || content.len() > 40 {
                    String::new()
                } else {
                    format!(" {content:?}")
                }
            ));
        }
    }
    out
}

#[test]
fn the_example_bakes_to_the_same_digest_whatever_the_mtimes_and_copy_order() {
    let home_a = tempfile::tempdir().unwrap();
    let home_b = tempfile::tempdir().unwrap();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    example_context(a.path());
    // The second copy is created in the opposite order and with other mtimes.
    fs::create_dir_all(b.path().join("dist")).unwrap();
    fs::copy(hello_binary(), b.path().join("dist/hello")).unwrap();
    for name in [".dockerignore", "Containerfile"] {
        fs::copy(
            workspace().join("examples/hello").join(name),
            b.path().join(name),
        )
        .unwrap();
    }
    set_mtime(&b.path().join("dist/hello"), 1_000_000_000);
    set_mtime(&b.path().join("Containerfile"), 1_500_000_000);
    let first = bake_json(home_a.path(), a.path(), &["--tag", "hello:1"]);
    let second = bake_json(home_b.path(), b.path(), &["--tag", "hello:1"]);
    assert_eq!(digest_of(&first), digest_of(&second));
    assert_eq!(first["layers"], second["layers"]);

    // SOURCE_DATE_EPOCH changes the layer mtimes, so the digest, and does so the same way
    // every time.
    let with_epoch = |home: &Path, dir: &Path| {
        let out = succeed(
            graven(home)
                .env("SOURCE_DATE_EPOCH", "1700000000")
                .args(["bake", "--json", "--tag", "hello:epoch"])
                .arg(dir),
        );
        digest_of(&serde_json::from_slice(&out.stdout).unwrap())
    };
    let epoch_a = with_epoch(home_a.path(), a.path());
    let epoch_b = with_epoch(home_b.path(), b.path());
    assert_eq!(epoch_a, epoch_b);
    assert_ne!(epoch_a, digest_of(&first));
    // A different file content is a different image (the negative control).
    fs::write(b.path().join("dist/hello"), b"not the binary").unwrap();
    let changed = bake_json(home_b.path(), b.path(), &["--tag", "hello:1"]);
    assert_ne!(digest_of(&changed), digest_of(&first));
}

#[test]
fn an_unchanged_rebuild_is_all_cached_and_a_change_is_not() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    example_context(dir.path());
    let cold = bake_json(home.path(), dir.path(), &[]);
    let name = dir
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_lowercase();
    assert_eq!(
        cold["tag"],
        format!("{name}:latest"),
        "the default tag is the directory's name"
    );
    assert_eq!(
        cold["cached_steps"], 1,
        "only FROM scratch is cached on a cold bake"
    );
    let warm = succeed(&mut bake(home.path(), dir.path(), &[]));
    let stderr = String::from_utf8_lossy(&warm.stderr);
    assert!(stderr.contains("every step was cached"), "{stderr}");
    assert!(
        stderr.contains("[2/7] COPY dist/hello /hello  cached"),
        "{stderr}"
    );
    let warm = bake_json(home.path(), dir.path(), &[]);
    assert_eq!(warm["cached_steps"], warm["total_steps"]);
    assert_eq!(digest_of(&warm), digest_of(&cold));
    // Touching the file's mtime alone keeps the cache; changing its content does not.
    set_mtime(&dir.path().join("dist/hello"), 42);
    let touched = bake_json(home.path(), dir.path(), &[]);
    assert_eq!(touched["cached_steps"], touched["total_steps"]);
    fs::write(dir.path().join("dist/hello"), b"changed").unwrap();
    let changed = bake(home.path(), dir.path(), &[])
        .output()
        .expect("graven runs");
    let stderr = String::from_utf8_lossy(&changed.stderr);
    assert!(!stderr.contains("every step was cached"), "{stderr}");
    assert!(
        stderr.contains("[2/7] COPY dist/hello /hello  done"),
        "{stderr}"
    );
}

/// Bakes `containerfile` in a context holding `files` and expects a failure whose message has
/// every one of `wanted`, with the store and cache exactly as before.
fn check_failure(setup: &dyn Fn(&Path), containerfile: &str, wanted: &[&str]) {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A store with an image in it already, so "as before" is not just "empty".
    example_context(dir.path());
    bake_json(home.path(), dir.path(), &["--tag", "before:1"]);
    setup(dir.path());
    fs::write(dir.path().join("Containerfile"), containerfile).unwrap();
    let before = store_files(home.path());
    let out = bake(home.path(), dir.path(), &["--tag", "after:1"])
        .output()
        .expect("graven runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{containerfile:?} baked");
    for want in wanted {
        assert!(
            stderr.contains(want),
            "{containerfile:?}: {want:?} not in {stderr}"
        );
    }
    assert_eq!(
        store_files(home.path()),
        before,
        "{containerfile:?} changed the store"
    );
}

#[test]
fn bad_input_names_file_line_and_reason_and_leaves_the_store_as_it_was() {
    let none = |_: &Path| {};
    // Each case copies a fresh file first, so a failure after a layer was written must remove
    // that layer again.
    let fresh = "FROM scratch\nCOPY fresh /fresh\n";
    let with_fresh = |dir: &Path| fs::write(dir.join("fresh"), b"a new blob").unwrap();
    check_failure(
        &none,
        "FROM scratch\nFROBNICATE x",
        &["Containerfile:2: unknown instruction \"FROBNICATE\""],
    );
    check_failure(&none, "FROM a b c", &["Containerfile:1: malformed FROM"]);
    check_failure(
        &none,
        "FROM no-such-image:1",
        &["Containerfile:1: FROM no-such-image:1: no image of that name"],
    );
    check_failure(
        &with_fresh,
        &format!("{fresh}COPY ../etc /x"),
        &["Containerfile:3:", "outside the build context"],
    );
    check_failure(
        &with_fresh,
        &format!("{fresh}COPY /etc/passwd /x"),
        &["Containerfile:3:", "absolute path"],
    );
    check_failure(
        &with_fresh,
        &format!("{fresh}COPY missing /x"),
        &["Containerfile:3:", "\"missing\" does not exist"],
    );
    let escaping_link = |dir: &Path| {
        with_fresh(dir);
        std::os::unix::fs::symlink("/etc", dir.join("link")).unwrap();
    };
    check_failure(
        &escaping_link,
        &format!("{fresh}COPY link/passwd /x"),
        &[
            "Containerfile:3:",
            "outside the build context through a symlink",
        ],
    );
    check_failure(
        &escaping_link,
        &format!("{fresh}COPY link /x"),
        &[
            "Containerfile:3:",
            "outside the build context through a symlink",
        ],
    );
    let ignored = |dir: &Path| {
        with_fresh(dir);
        fs::write(dir.join("secret"), b"s").unwrap();
        fs::write(dir.join(".dockerignore"), "secret\n").unwrap();
    };
    check_failure(
        &ignored,
        &format!("{fresh}COPY secret /x"),
        &["Containerfile:3:", "excluded by .dockerignore"],
    );
    for (name, entries) in [
        ("dotdot.tar", vec![("../evil", false)]),
        ("absolute.tar", vec![("/etc/evil", false)]),
        (
            "through-link.tar",
            vec![("link", true), ("link/evil", false)],
        ),
    ] {
        let archive = |dir: &Path| {
            with_fresh(dir);
            write_raw_tar(&dir.join(name), &entries);
        };
        check_failure(
            &archive,
            &format!("{fresh}ADD {name} /x/"),
            &["Containerfile:3:", "ADD"],
        );
    }
    check_failure(
        &with_fresh,
        &format!("{fresh}RUN /bin/false"),
        &["Containerfile:3:"],
    );
    check_failure(
        &with_fresh,
        &format!("{fresh}EXPOSE http"),
        &["Containerfile:3: EXPOSE http"],
    );
}

/// A tar whose names are written raw (the tar crate refuses to write `..` and absolute
/// names); `(name, true)` is a symlink to /etc.
fn write_raw_tar(path: &Path, entries: &[(&str, bool)]) {
    let mut bytes = Vec::new();
    for (name, link) in entries {
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_mode(0o644);
        header.set_mtime(0);
        if *link {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_link_name("/etc").unwrap();
            header.set_size(0);
        } else {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(4);
        }
        header.set_cksum();
        bytes.extend_from_slice(header.as_bytes());
        if !*link {
            let mut block = [0u8; 512];
            block[..4].copy_from_slice(b"evil");
            bytes.extend_from_slice(&block);
        }
    }
    bytes.extend_from_slice(&[0u8; 1024]);
    fs::write(path, bytes).unwrap();
}

#[test]
fn copy_add_dockerignore_chown_chmod_and_workdir() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::create_dir_all(d.join("app/sub")).unwrap();
    fs::create_dir_all(d.join("app/logs")).unwrap();
    fs::write(d.join("app/run.sh"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(
        d.join("app/run.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    fs::write(d.join("app/sub/data.txt"), "data").unwrap();
    fs::write(d.join("app/logs/x.log"), "log").unwrap();
    fs::write(d.join("app/notes.md"), "notes").unwrap();
    fs::write(d.join("app/KEEP.md"), "keep").unwrap();
    std::os::unix::fs::symlink("sub/data.txt", d.join("app/link")).unwrap();
    fs::write(d.join(".dockerignore"), "**/*.log\n*/*.md\n!app/KEEP.md\n").unwrap();
    // A gzipped tar for ADD to unpack.
    let mut archive = tar::Builder::new(flate2::write::GzEncoder::new(
        fs::File::create(d.join("bundle.tar.gz")).unwrap(),
        flate2::Compression::default(),
    ));
    let mut header = tar::Header::new_gnu();
    header.set_size(6);
    header.set_mode(0o600);
    archive
        .append_data(&mut header, "inner/file", &b"inside"[..])
        .unwrap();
    archive.into_inner().unwrap().finish().unwrap();
    fs::write(d.join("plain.txt"), "plain").unwrap();
    fs::write(
        d.join("Containerfile"),
        "FROM scratch\nCOPY --chown=10:20 app /srv/app\nADD bundle.tar.gz /opt/\nCOPY --chmod=0600 plain.txt /etc/\nWORKDIR /work/dir\nADD plain.txt relative\nCOPY app/*/*.txt p*.txt /globbed/\n",
    )
    .unwrap();
    bake_json(home.path(), d, &["--tag", "t:1"]);
    expect_test::expect![[r##"
        [
            "srv/ 755 0:0",
            "srv/app/ 755 10:20",
            "srv/app/KEEP.md 644 10:20 \"keep\"",
            "srv/app/link 777 10:20 -> sub/data.txt",
            "srv/app/logs/ 755 10:20",
            "srv/app/run.sh 755 10:20 \"#!/bin/sh\\n\"",
            "srv/app/sub/ 755 10:20",
            "srv/app/sub/data.txt 644 10:20 \"data\"",
            "opt/ 755 0:0",
            "opt/inner/ 755 0:0",
            "opt/inner/file 600 0:0 \"inside\"",
            "etc/ 755 0:0",
            "etc/plain.txt 600 0:0 \"plain\"",
            "work/ 755 0:0",
            "work/dir/ 755 0:0",
            "work/dir/relative 644 0:0 \"plain\"",
            "globbed/ 755 0:0",
            "globbed/data.txt 644 0:0 \"data\"",
            "globbed/plain.txt 644 0:0 \"plain\"",
        ]
    "##]]
    .assert_debug_eq(&layer_listing(home.path(), "t:1"));
}

#[test]
fn from_store_tag_oci_archive_layout_and_docker_archive() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    example_context(dir.path());
    let base = bake_json(home.path(), dir.path(), &["--tag", "base:1"]);
    let base_layers = base["layers"].clone();
    let exports = tempfile::tempdir().unwrap();
    let oci = exports.path().join("base-oci.tar");
    let docker = exports.path().join("base-docker.tar");
    for (format, path) in [("oci", &oci), ("docker", &docker)] {
        succeed(
            graven(home.path())
                .args(["image", "export", "base:1", "--format", format, "-o"])
                .arg(path),
        );
    }
    let layout = exports.path().join("layout");
    fs::create_dir(&layout).unwrap();
    tar::Archive::new(fs::File::open(&oci).unwrap())
        .unpack(&layout)
        .unwrap();
    // A docker-archive as `docker save` writes it: uncompressed layers, a config by name.
    let docker_save = exports.path().join("saved.tar");
    write_docker_save(home.path(), "base:1", &docker_save);

    fs::write(dir.path().join("extra"), "extra").unwrap();
    for from in [
        "base:1".to_owned(),
        base["digest"].as_str().unwrap().to_owned(),
        format!("oci-archive:{}", oci.display()),
        format!("oci:{}:base:1", layout.display()),
        layout.display().to_string(),
        format!("docker-archive:{}", docker.display()),
        docker_save.display().to_string(),
    ] {
        let fresh_home = tempfile::tempdir().unwrap();
        let target_home = if from.starts_with("base:") || from.starts_with("sha256:") {
            home.path()
        } else {
            fresh_home.path()
        };
        fs::write(
            dir.path().join("Containerfile"),
            format!("FROM {from}\nCOPY extra /extra\nCMD [\"x\"]\n"),
        )
        .unwrap();
        let child = bake_json(target_home, dir.path(), &["--tag", "child:1"]);
        let layers = child["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2, "FROM {from}");
        assert_eq!(
            layers[0], base_layers[0],
            "FROM {from} keeps the base layer"
        );
        let inspect = graven(target_home)
            .args(["image", "inspect", "child:1"])
            .output()
            .unwrap();
        let inspect: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
        assert_eq!(
            inspect["config"]["config"]["Entrypoint"][0], "/hello",
            "FROM {from}"
        );
        assert_eq!(inspect["config"]["config"]["Cmd"][0], "x");
    }
}

/// Writes a docker-archive the way `docker save` does: each layer an uncompressed tar under
/// `<id>/layer.tar`, the config as `<hex>.json`.
fn write_docker_save(home: &Path, tag: &str, path: &Path) {
    let store = graven::store::Store::open(home).unwrap();
    let image = store.image(&store.resolve(tag).unwrap()).unwrap();
    let mut tar = tar::Builder::new(fs::File::create(path).unwrap());
    let mut add = |name: &str, bytes: &[u8]| {
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, name, bytes).unwrap();
    };
    let config = store.read_blob(&image.manifest.config.digest).unwrap();
    let config_name = format!("{}.json", image.manifest.config.digest.hex());
    add(&config_name, &config);
    let mut layers = Vec::new();
    for (i, layer) in image.manifest.layers.iter().enumerate() {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(store.open_blob(&layer.digest).unwrap())
            .read_to_end(&mut raw)
            .unwrap();
        let name = format!("layer{i}/layer.tar");
        add(&name, &raw);
        layers.push(name);
    }
    let manifest =
        serde_json::json!([{"Config": config_name, "RepoTags": ["base:1"], "Layers": layers}]);
    add("manifest.json", manifest.to_string().as_bytes());
    tar.finish().unwrap();
}

#[test]
fn chown_by_name_reads_the_images_passwd_and_group() {
    let home = tempfile::tempdir().unwrap();
    let d = tempfile::tempdir().unwrap();
    fs::write(
        d.path().join("passwd"),
        "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/app:/bin/sh\n",
    )
    .unwrap();
    fs::write(d.path().join("group"), "staff:x:50:\n").unwrap();
    fs::write(d.path().join("file"), "f").unwrap();
    fs::write(
        d.path().join("Containerfile"),
        "FROM scratch\nCOPY passwd group /etc/\nCOPY --chown=app file /a\nCOPY --chown=app:staff file /b\n",
    )
    .unwrap();
    bake_json(home.path(), d.path(), &["--tag", "t:1"]);
    let listing = layer_listing(home.path(), "t:1");
    assert!(
        listing.contains(&"a 644 1000:1001 \"f\"".to_owned()),
        "{listing:?}"
    );
    assert!(
        listing.contains(&"b 644 1000:50 \"f\"".to_owned()),
        "{listing:?}"
    );
    // A name the image does not know is an error naming the line.
    fs::write(
        d.path().join("Containerfile"),
        "FROM scratch\nCOPY passwd group /etc/\nCOPY --chown=nobody file /a\n",
    )
    .unwrap();
    let out = bake(home.path(), d.path(), &["--tag", "t:2"])
        .output()
        .expect("graven runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "Containerfile:3: --chown=nobody: user \"nobody\" is not in the image's /etc/passwd"
        ),
        "{stderr}"
    );
}

/// A base saved from `docker import` or Docker's classic builder: its config writes `null`
/// for empty lists and maps and holds fields graven does not model. It is baked from; the
/// runtime fields it has are carried into the child, what it says of how it was made is not.
#[test]
fn a_base_whose_config_has_nulls_and_unmodelled_fields_is_baked_from() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut layer = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(5);
    header.set_mode(0o644);
    layer
        .append_data(&mut header, "etc/motd", &b"base\n"[..])
        .unwrap();
    let layer = layer.into_inner().unwrap();
    let diff_id = graven::store::Digest::of(&layer);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Hostname": "", "Env": null, "Cmd": null, "Volumes": null, "Labels": null,
            "Entrypoint": null, "OnBuild": null, "WorkingDir": ""
        },
        "container_config": {"Cmd": null},
        "docker_version": "20.10.24+dfsg1",
        "history": null,
        "rootfs": {"type": "layers", "diff_ids": [diff_id.as_str()]}
    });
    let archive = dir.path().join("imported.tar");
    let mut tar = tar::Builder::new(fs::File::create(&archive).unwrap());
    let mut add = |name: &str, bytes: &[u8]| {
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, name, bytes).unwrap();
    };
    add("config.json", config.to_string().as_bytes());
    add("layer/layer.tar", &layer);
    let manifest = serde_json::json!([{"Config": "config.json", "RepoTags": ["imported:1"],
        "Layers": ["layer/layer.tar"]}]);
    add("manifest.json", manifest.to_string().as_bytes());
    tar.finish().unwrap();
    drop(tar);
    fs::write(dir.path().join("extra"), "extra").unwrap();
    fs::write(
        dir.path().join("Containerfile"),
        format!(
            "FROM docker-archive:{}\nCOPY extra /extra\nCMD [\"x\"]\n",
            archive.display()
        ),
    )
    .unwrap();
    bake_json(home.path(), dir.path(), &["--tag", "child:1"]);
    let inspect = succeed(graven(home.path()).args(["image", "inspect", "child:1"]));
    let inspect: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let child = &inspect["config"];
    assert_eq!(child["config"]["Cmd"][0], "x", "{child}");
    assert_eq!(
        child["config"]["Hostname"], "",
        "runtime fields carry over: {child}"
    );
    assert!(child.get("docker_version").is_none(), "{child}");
    assert!(child.get("container_config").is_none(), "{child}");
}

/// Each error said its location twice ("Containerfile:2: …: Containerfile:2: …"): the report
/// printed the error's chain, and the error already held its source's text.
#[test]
fn an_error_names_its_file_and_line_once() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("Containerfile"),
        "FROM scratch\nFROBNICATE x\n",
    )
    .unwrap();
    let missing = dir.path().join("Missingfile");
    for (args, wanted) in [
        (
            vec![],
            "Containerfile:2: unknown instruction \"FROBNICATE\"",
        ),
        (
            vec!["-f".to_owned(), missing.display().to_string()],
            "Missingfile: No such file or directory",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = bake(home.path(), dir.path(), &args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(wanted), "{wanted:?} not in {stderr}");
        assert_eq!(stderr.matches(wanted).count(), 1, "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}
