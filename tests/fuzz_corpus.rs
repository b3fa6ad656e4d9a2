//! Runs the fuzz targets' committed seeds (`fuzz/corpus/<target>/`) and the inputs fuzzing
//! found (`fuzz/artifacts-found/<target>/`) through the same property functions the targets
//! use (`tests/support/fuzzing.rs`), on stable Rust, so every `cargo test` replays them.
//!
//! The hand-made seeds are written by `seeds()` below; `UPDATE_SEEDS=1 cargo test --test
//! fuzz_corpus` rewrites them, and without it the test fails when the files differ.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use graven::events;
use graven::store::{Descriptor, Digest, ImageConfig, ImageIndex, MEDIA_TYPE_MANIFEST, REF_NAME};
use support::fuzzing::{self, TARGETS};

/// Found inputs whose bug is not fixed yet (target, file, the bug, the panic it must still
/// give): each must still fail its property that way; a fix makes this test say so, and the
/// entry goes.
const KNOWN_OPEN: &[(&str, &str, &str, &str)] = &[];

/// The canary is one directory in the temp dir: tests that touch it take turns.
static CANARY: Mutex<()> = Mutex::new(());

fn fuzz_dir() -> PathBuf {
    support::workspace().join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    out.retain(|p| p.is_file());
    out.sort();
    out
}

#[test]
fn every_seed_and_found_input_holds_its_properties() {
    let _turn = CANARY.lock().unwrap_or_else(|e| e.into_inner());
    let mut failures = Vec::new();
    for (target, property) in TARGETS {
        let seeds = files(&fuzz_dir().join("corpus").join(target));
        assert!(!seeds.is_empty(), "fuzz/corpus/{target} holds no seed");
        let found = files(&fuzz_dir().join("artifacts-found").join(target));
        for path in seeds.iter().chain(&found) {
            let name = path.file_name().unwrap().to_string_lossy();
            let open = KNOWN_OPEN
                .iter()
                .find(|(t, n, _, _)| t == target && *n == name);
            let data = fs::read(path).unwrap();
            let outcome = catch_unwind(AssertUnwindSafe(|| property(&data))).map_err(|panic| {
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            });
            match (outcome, open) {
                (Ok(()), None) => {}
                (Err(message), Some((_, _, _, expected))) if message.contains(expected) => {}
                (Err(message), _) => {
                    failures.push(format!("{}: {message}", path.display()));
                }
                (Ok(()), Some((_, _, bug, _))) => failures.push(format!(
                    "{}: passes now ({bug} is fixed?): drop it from KNOWN_OPEN",
                    path.display()
                )),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for (target, name, _, _) in KNOWN_OPEN {
        let path = fuzz_dir().join("artifacts-found").join(target).join(name);
        assert!(
            path.is_file(),
            "KNOWN_OPEN names {}, which is gone",
            path.display()
        );
    }
}

/// The canary check is what catches an escaping layer: it must fail when the canary is gone.
#[test]
fn the_canary_notices_a_removed_file() {
    let _turn = CANARY.lock().unwrap_or_else(|e| e.into_inner());
    let canary = fuzzing::Canary::plant();
    canary.check();
    fs::remove_file(std::env::temp_dir().join("graven-fuzz-canary/dir/file")).unwrap();
    assert!(catch_unwind(AssertUnwindSafe(|| canary.check())).is_err());
    fuzzing::Canary::plant().check();
}

/// A forged checksum must fail the decoder, and a right one pass it: the envelope property's
/// two halves each see their case.
#[test]
fn event_envelope_property_sees_both_checksum_cases() {
    let right = events::checksum(1, 5, "cli", 1, "{}");
    let row = |checksum: &str| format!("1\n5\ncli\n1\nkind\n{checksum}\n{{}}");
    fuzzing::event_envelope(row("").as_bytes());
    fuzzing::event_envelope(row(&right).as_bytes());
    fuzzing::event_envelope(row("0000").as_bytes());
    let decoded = events::decode_envelope::<serde_json::Value>(&events::RawRow {
        seq: 1,
        at_ms: 5,
        actor: "cli".into(),
        version: 1,
        kind: "kind".into(),
        payload: "{}".into(),
        checksum: "0000".into(),
    });
    assert!(decoded.is_err());
}

#[test]
fn committed_seeds_are_what_the_generator_makes() {
    let update = std::env::var_os("UPDATE_SEEDS").is_some();
    let mut stale = Vec::new();
    for (rel, bytes) in seeds() {
        let path = fuzz_dir().join(&rel);
        if update {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, &bytes).unwrap();
        } else if fs::read(&path).ok().as_ref() != Some(&bytes) {
            stale.push(rel);
        }
    }
    assert!(
        stale.is_empty(),
        "seeds differ from the generator (UPDATE_SEEDS=1 rewrites them): {stale:?}"
    );
    let total: u64 = ["corpus", "artifacts-found"]
        .iter()
        .flat_map(|d| TARGETS.iter().map(move |(t, _)| fuzz_dir().join(d).join(t)))
        .flat_map(|dir| files(&dir))
        .map(|f| f.metadata().unwrap().len())
        .sum();
    assert!(total < 200 * 1024, "the committed corpus is {total} bytes");
}

/// One tar entry, written with a raw header so that paths tar's builder refuses (`..`) can be
/// made too.
enum Entry<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
}

fn tar(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut out = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_ustar();
        let (path, data, kind, link, mode): (&str, &[u8], _, &str, u32) = match entry {
            Entry::File(path, data) => (path, data, tar::EntryType::Regular, "", 0o644),
            Entry::Dir(path) => (path, b"", tar::EntryType::Directory, "", 0o755),
            Entry::Symlink(path, to) => (path, b"", tar::EntryType::Symlink, to, 0o777),
            Entry::Hardlink(path, to) => (path, b"", tar::EntryType::Link, to, 0o644),
        };
        let old = header.as_old_mut();
        old.name[..path.len()].copy_from_slice(path.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_cksum();
        out.append(&header, data).unwrap();
    }
    out.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::new(6));
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// A tar of the directory `dir`, entries sorted, so the same files give the same bytes.
fn tar_dir(dir: &Path) -> Vec<u8> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Option<Vec<u8>>)>) {
        let mut entries: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if path.is_dir() {
                out.push((format!("{rel}/"), None));
                walk(root, &path, out);
            } else {
                out.push((rel, Some(fs::read(&path).unwrap())));
            }
        }
    }
    let mut found = Vec::new();
    walk(dir, dir, &mut found);
    let entries: Vec<Entry<'_>> = found
        .iter()
        .map(|(path, data)| match data {
            Some(data) => Entry::File(path, data),
            None => Entry::Dir(path),
        })
        .collect();
    tar(&entries)
}

/// A small layer with what real layers hold: directories, files, links, whiteouts.
fn plain_layer() -> Vec<u8> {
    tar(&[
        Entry::Dir("etc/"),
        Entry::File(
            "etc/passwd",
            b"root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/:/bin/sh\n",
        ),
        Entry::File("etc/group", b"root:x:0:\napp:x:1000:\n"),
        Entry::Dir("app/"),
        Entry::File("app/hello", b"#!/bin/sh\necho hello\n"),
        Entry::Symlink("app/current", "hello"),
        Entry::Hardlink("app/again", "app/hello"),
        Entry::File("app/.wh.old", b""),
        Entry::Dir("var/"),
        Entry::File("var/.wh..wh..opq", b""),
    ])
}

fn docker_archive(manifest_layer_path: &str) -> Vec<u8> {
    let layer = plain_layer();
    let mut config = ImageConfig::default();
    config.rootfs.diff_ids.push(Digest::of(&layer));
    let config = serde_json::to_vec(&config).unwrap();
    let manifest = format!(
        r#"[{{"Config":"config.json","RepoTags":["fuzz:1"],"Layers":["{manifest_layer_path}"]}}]"#
    );
    tar(&[
        Entry::File("manifest.json", manifest.as_bytes()),
        Entry::File("config.json", &config),
        Entry::File("layer.tar", &layer),
    ])
}

fn oci_archive() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    fuzzing::write_oci_layout(dir.path(), &gzip(&plain_layer()));
    tar_dir(dir.path())
}

/// The manifest and config of a real bake (`FROM scratch`, a COPY, config instructions).
fn baked_documents() -> Vec<(String, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    fs::create_dir_all(&context).unwrap();
    let file = context.join("hello");
    fs::write(&file, "hello\n").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(
        context.join("Containerfile"),
        "FROM scratch\nCOPY hello /hello\nENV PORT=8080\nEXPOSE 8080\nUSER 65534\n\
         HEALTHCHECK --interval=2s CMD [\"/hello\"]\nENTRYPOINT [\"/hello\"]\n",
    )
    .unwrap();
    let options = graven::bake::BakeOptions {
        context: context.clone(),
        containerfile: None,
        tag: "seed".into(),
        build_args: BTreeMap::new(),
        epoch: 0,
        target: None,
        no_cache: false,
        secrets: Default::default(),
    };
    let home = work.path().join("home");
    let baked = graven::bake::bake(&home, &options, &mut |_| {}).unwrap();
    let store = graven::store::Store::open(&home).unwrap();
    let manifest = store.read_blob(&baked.digest).unwrap();
    let image = store.image(&baked.digest).unwrap();
    let config = store.read_blob(&image.manifest.config.digest).unwrap();
    let mut descriptor = Descriptor::new(MEDIA_TYPE_MANIFEST, baked.digest, manifest.len() as u64);
    descriptor.set_annotation(REF_NAME, "seed");
    let index = ImageIndex {
        manifests: vec![descriptor],
        ..ImageIndex::default()
    };
    vec![
        ("baked-manifest.json".into(), manifest),
        ("baked-config.json".into(), config),
        (
            "baked-index.json".into(),
            serde_json::to_vec(&index).unwrap(),
        ),
    ]
}

/// Every generated seed and found input, as a path under `fuzz/` and its bytes.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |dir: &str, target: &str, name: &str, bytes: Vec<u8>| {
        out.push((format!("{dir}/{target}/{name}"), bytes));
    };
    let workspace = support::workspace();
    let read = |rel: &str| fs::read(workspace.join(rel)).unwrap();

    add(
        "corpus",
        "spec",
        "hello.toml",
        read("examples/hello/graven.toml"),
    );
    for name in ["worker-and-db.toml", "typos.toml"] {
        add(
            "corpus",
            "spec",
            name,
            read(&format!("tests/data/spec/{name}")),
        );
    }

    add(
        "corpus",
        "containerfile",
        "hello.containerfile",
        read("examples/hello/Containerfile"),
    );
    add(
        "corpus",
        "containerfile",
        "multi-stage.containerfile",
        b"# escape=`\nARG BASE=scratch\nFROM $BASE AS build\nARG NAME=world\n\
          ENV GREETING=\"hello ${NAME:-you}\" `\n    OTHER='a b'\nWORKDIR app/../src\n\
          COPY --chown=1000:1000 --chmod=0755 a b ./\nADD c.tar.gz /opt/\n\
          RUN [\"/bin/sh\", \"-c\", \"echo $GREETING\"]\nRUN echo ${OTHER:+set} > /x\n\n\
          FROM build\nUSER app:app\nLABEL a=b \"c d\"=e\nEXPOSE 80/tcp 53/udp\nVOLUME [\"/data\"]\n\
          HEALTHCHECK --interval=5s --timeout=1s --start-period=1m --retries=3 CMD curl -f x\n\
          STOPSIGNAL SIGINT\nSHELL [\"/bin/bash\", \"-c\"]\nCMD exec app\n"
            .to_vec(),
    );

    let empty = Digest::of(b"");
    add(
        "corpus",
        "digest",
        "valid.txt",
        empty.as_str().as_bytes().to_vec(),
    );
    add(
        "corpus",
        "digest",
        "uppercase.txt",
        empty.as_str().to_uppercase().into_bytes(),
    );

    if graven::store::host_architecture() == "amd64" {
        for (name, bytes) in baked_documents() {
            add("corpus", "oci_documents", &name, bytes);
        }
    }

    let payload = r#"{"kind":"deployed","service":"web","instances":[1,2.5,null,true]}"#;
    add(
        "corpus",
        "event_envelope",
        "valid.row",
        format!("7\n1700000000000\ncontroller\n1\ndeployed\n\n{payload}").into_bytes(),
    );
    add(
        "corpus",
        "event_envelope",
        "forged.row",
        format!(
            "7\n1700000000000\ncontroller\n1\ndeployed\n{}\n{payload}",
            "0".repeat(64)
        )
        .into_bytes(),
    );

    add(
        "corpus",
        "image_import",
        "docker-archive.tar",
        docker_archive("layer.tar"),
    );
    add(
        "corpus",
        "image_import",
        "docker-archive-escape.tar",
        docker_archive("../layer.tar"),
    );
    add("corpus", "image_import", "oci-archive.tar", oci_archive());
    add(
        "corpus",
        "image_import",
        "escape-entry.tar",
        tar(&[
            Entry::File("../outside", b"x"),
            Entry::File("index.json", b"{}"),
        ]),
    );

    add("corpus", "layer_unpack", "plain.tar", plain_layer());
    add(
        "corpus",
        "layer_unpack",
        "plain.tar.gz",
        gzip(&plain_layer()),
    );
    add(
        "artifacts-found",
        "layer_unpack",
        "escape-dotdot-file.tar",
        tar(&[Entry::File("../graven-fuzz-canary/file", b"replaced\n")]),
    );
    add(
        "artifacts-found",
        "layer_unpack",
        "escape-dotdot-whiteout.tar",
        tar(&[Entry::File("../graven-fuzz-canary/.wh.file", b"")]),
    );
    add(
        "artifacts-found",
        "layer_unpack",
        "escape-symlink-file.tar",
        tar(&[
            Entry::Symlink("link", "../graven-fuzz-canary"),
            Entry::File("link/file", b"replaced\n"),
        ]),
    );

    add("corpus", "add_archive", "plain.tar", plain_layer());
    add(
        "corpus",
        "add_archive",
        "escape-dotdot.tar",
        tar(&[Entry::File("../graven-fuzz-canary/file", b"replaced\n")]),
    );
    add(
        "corpus",
        "add_archive",
        "escape-symlink.tar",
        tar(&[
            Entry::Symlink("link", "../../graven-fuzz-canary"),
            Entry::File("link/file", b"replaced\n"),
            Entry::Hardlink("hard", "../graven-fuzz-canary/file"),
        ]),
    );
    add("corpus", "event_fold", "hello.events", event_lines());
    add("corpus", "event_envelope", "typed.row", {
        let line = String::from_utf8(event_lines()).unwrap();
        let first = line.lines().next().unwrap().to_owned();
        format!("1\n1000\ncontroller\n2\nrelease_created\n\n{first}").into_bytes()
    });

    for (name, body) in api_requests() {
        add("corpus", "api_request", &name, body);
    }

    // A limit of 8 + 4 * 40 bytes, the stream cut at byte 30.
    let syslog = |frames: &[u8]| [&[40u8, 30][..], frames].concat();
    add(
        "corpus",
        "syslog_stream",
        "octet-counted-5424.bin",
        syslog(
            b"61 <165>1 2026-12-06T10:00:00Z host app 1 ID47 - an rfc 5424 message\
                 44 <13>1 - - - - - [x@32473 a=\"1\"] with sd",
        ),
    );
    add(
        "corpus",
        "syslog_stream",
        "lf-3164.bin",
        syslog(b"<34>Oct 11 22:14:15 mymachine su: 'su root' failed\n<13>no header at all\n"),
    );
    add(
        "corpus",
        "syslog_stream",
        "bad-input.bin",
        syslog(b"5 <13>1 - - - - - too long for its count\n999 <13>oversize\n\xff\xfe\n<999>pri\n"),
    );

    add(
        "corpus",
        "image_paths",
        "plain.script",
        b"d etc\nf etc/passwd\ns lib usr/lib\nd usr/lib\nf lib/libc.so\nh libc lib/libc.so\n\
          f etc/.wh.group\nw /app/data\nr /etc/passwd\n"
            .to_vec(),
    );
    // What issue 10 found (items 1 and 6), each of which the old unpacker or bake's RUN did.
    for (name, script) in [
        ("whiteout-dot-dot.script", "f .wh...\n"),
        ("whiteout-dot.script", "f .wh..\n"),
        ("whiteout-empty.script", "f .wh.\n"),
        (
            "whiteout-through-root-link.script",
            "s sub /\nf sub/.wh...\n",
        ),
        (
            "opaque-through-sentinel-link.script",
            "s sub $S\nf sub/.wh..wh..opq\n",
        ),
        ("workdir-through-link.script", "s lnk $S\nw /lnk/x\n"),
        ("workdir-dot-dot.script", "w /../../x\n"),
        (
            "passwd-to-sentinel.script",
            "d etc\ns etc/passwd $S/file\nr /etc/passwd\n",
        ),
        (
            "hardlink-to-sentinel.script",
            "s up $W\nh stolen up/sentinel/file\n",
        ),
    ] {
        add(
            "artifacts-found",
            "image_paths",
            name,
            script.as_bytes().to_vec(),
        );
    }

    add("corpus", "instance_rootfs", "plain.tar", plain_layer());
    // The root is $TMPDIR/<work>/home/rootfs/<temp>: four levels below the canary.
    let up = "../../../../graven-fuzz-canary";
    for (name, entry) in [
        (
            "escape-symlink-file.tar",
            Entry::File("link/file", b"replaced\n"),
        ),
        (
            "escape-symlink-whiteout.tar",
            Entry::File("link/.wh.file", b""),
        ),
        (
            "escape-symlink-opaque.tar",
            Entry::File("link/dir/.wh..wh..opq", b""),
        ),
    ] {
        add(
            "artifacts-found",
            "instance_rootfs",
            name,
            tar(&[Entry::Symlink("link", up), entry]),
        );
    }
    out
}

/// A service's life as the controller logs it, one JSON event a line.
fn event_lines() -> Vec<u8> {
    use graven::events::{
        DeployReason, DrainReason, Event, GoneReason, ReleaseNumber, RollbackReason, RuntimeId,
        ServiceConfig,
    };
    let source =
        fs::read_to_string(support::workspace().join("examples/hello/graven.toml")).unwrap();
    let dir = Path::new("/project");
    let project = graven::spec::parse(&source, &dir.join("graven.toml"), dir, "local").unwrap();
    let service = &project.services["web"];
    let web = || "web".into();
    let instance = || "web-1".into();
    let runtime_id = || RuntimeId::new("abc123");
    let events = [
        Event::ReleaseCreated {
            service: web(),
            release: ReleaseNumber(1),
            image: Digest::of(b"image"),
            config_digest: ServiceConfig::from(service).digest().to_string(),
            config: ServiceConfig::from(service),
            source: None,
        },
        Event::DeployStarted {
            service: web(),
            from: None,
            to: ReleaseNumber(1),
            reason: DeployReason::Deploy,
        },
        Event::InstanceLaunched {
            service: web(),
            release: ReleaseNumber(1),
            instance: instance(),
        },
        Event::InstanceStarted {
            instance: instance(),
            runtime_id: runtime_id(),
            address: "127.0.0.1:40000".parse().unwrap(),
        },
        Event::InstanceHealthy {
            instance: instance(),
        },
        Event::DeploySucceeded {
            service: web(),
            release: ReleaseNumber(1),
        },
        Event::ServiceScaled {
            service: web(),
            instances: 3,
            route: None,
        },
        Event::InstanceUnhealthy {
            instance: instance(),
            detail: "status 503".to_owned(),
        },
        Event::InstanceExited {
            instance: instance(),
            code: Some(1),
            signal: None,
        },
        Event::InstanceGone {
            instance: instance(),
            reason: GoneReason::Exited,
        },
        Event::CrashLoopBackoff {
            service: web(),
            failures: 1,
            delay_ms: 1000,
            until_ms: 12_000,
        },
        Event::DeployRolledBack {
            service: web(),
            from: ReleaseNumber(2),
            to: Some(ReleaseNumber(1)),
            reason: RollbackReason::TooManyFailures {
                failures: 3,
                last_failure: Some("status 503".to_owned()),
            },
        },
        Event::InstanceDraining {
            instance: instance(),
            reason: DrainReason::Replaced {
                by: ReleaseNumber(2),
            },
        },
        Event::OrphanRemoved {
            runtime_id: runtime_id(),
        },
        Event::ServiceRemoved { service: web() },
        Event::LogUnwritable {
            since_ms: 5_000,
            error: "No space left on device".to_owned(),
        },
        Event::HistoryLost {
            kept_through: 12,
            lost_through: 15,
        },
    ];
    let mut out = String::new();
    for event in events {
        out.push_str(&serde_json::to_string(&event).unwrap());
        out.push('\n');
    }
    out.into_bytes()
}

/// Request bodies as the CLI sends them.
fn api_requests() -> Vec<(String, Vec<u8>)> {
    let lines = String::from_utf8(event_lines()).unwrap();
    let release: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    let deploy = serde_json::json!({
        "app": "hello",
        "environment": "local",
        "services": [{
            "service": "web",
            "image": release["image"],
            "config": release["config"],
        }],
    });
    let mut with_logs = deploy.clone();
    with_logs["logs"] = serde_json::json!({
        "listen": {"addresses": ["udp://127.0.0.1:5514", "tcp://[::1]:5514"], "max_message": 8192},
        "forward": [{
            "to": "tcp://logs.example.com:514",
            "format": "rfc3164",
            "services": ["web"],
            "buffer": 1000,
            "facility": 16,
            "hostname": null,
            "confirm_after": {"secs": 1, "nanos": 0},
        }],
    });
    vec![
        ("deploy.json".into(), serde_json::to_vec(&deploy).unwrap()),
        (
            "deploy-logs.json".into(),
            serde_json::to_vec(&with_logs).unwrap(),
        ),
        (
            "rollback.json".into(),
            br#"{"app":"hello","environment":"local","service":"web","to":1}"#.to_vec(),
        ),
        (
            "history.json".into(),
            br#"{"app":"hello","after":3}"#.to_vec(),
        ),
        ("empty.json".into(), Vec::new()),
    ]
}
