//! RUN on overlayfs over snapshots of layer chains: the layers it makes are the ones the
//! unpack-and-diff way makes (`GRAVEN_BAKE_OVERLAY=0`), byte for byte; a snapshot is made
//! once and shared by later bakes; `graven gc` removes the snapshots no image needs and keeps
//! the rest; a failed RUN leaves no mount and no temp dir; COPY reads no lower layer once the
//! layer's path index is written; a RUN's overlay is `volatile`, and a snapshot of another
//! boot is made again, not read.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::{graven, succeed};

/// A context with busybox and a small tree to change, remove and make again.
fn context() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::copy(support::busybox(), dir.path().join("busybox")).unwrap();
    for (path, text) in [
        ("tree/a/f1", "1"),
        ("tree/a/f2", "2"),
        ("tree/a/sub/f3", "3"),
        ("tree/b/g", "g"),
        ("tree/c/x", "x"),
        ("tree/d/y", "y"),
        ("tree/keep", "keep"),
        ("tree/same", "same"),
        ("tree/owned", "owned"),
        ("other.txt", "other"),
    ] {
        let path = dir.path().join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }
    dir
}

const BASE: &str = "FROM scratch\nCOPY busybox /bin/busybox\nCOPY busybox /bin/sh\n";

/// `graven bake --json --tag TAG DIR` of `containerfile` (written into `dir`), with
/// `GRAVEN_BAKE_OVERLAY` as given and temp dirs under `tmp`.
fn bake(home: &Path, dir: &Path, tag: &str, containerfile: &str, overlay: &str) -> Command {
    fs::write(dir.join("Containerfile"), containerfile).unwrap();
    let mut command = graven(home);
    command
        .env("GRAVEN_BAKE_OVERLAY", overlay)
        .args(["bake", "--json", "--tag", tag])
        .arg(dir);
    command
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The entries (path and content) of layer `index` of the image tagged `tag`.
fn layer(home: &Path, tag: &str, index: usize) -> Vec<String> {
    let store = graven::store::Store::open(home).unwrap();
    let image = store.image(&store.resolve(tag).unwrap()).unwrap();
    let layer = &image.manifest.layers[index];
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(
        store.open_blob(&layer.digest).unwrap(),
    ));
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let mut content = String::new();
            e.read_to_string(&mut content).unwrap_or_default();
            let h = e.header();
            format!(
                "{} {:o} {}:{} {content:?}",
                e.path().unwrap().display(),
                h.mode().unwrap(),
                h.uid().unwrap(),
                h.gid().unwrap()
            )
        })
        .collect()
}

/// The snapshot directories under `home`, by name, with their inodes.
fn snapshots(home: &Path) -> BTreeMap<String, u64> {
    let Ok(listing) = fs::read_dir(home.join("snapshots")) else {
        return BTreeMap::new();
    };
    listing
        .flatten()
        .filter(|e| e.file_name() != "paths")
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().ino(),
            )
        })
        .collect()
}

/// The chain ids (hex) of the image tagged `tag`.
fn chains(home: &Path, tag: &str) -> Vec<String> {
    let store = graven::store::Store::open(home).unwrap();
    let image = store.image(&store.resolve(tag).unwrap()).unwrap();
    graven::store::snapshot::chain_ids(&image.config.rootfs.diff_ids)
        .iter()
        .map(|c| c.hex().to_owned())
        .collect()
}

/// Adds, changes, removals, a removed directory made again (opaque on overlayfs), a directory
/// moved (copied: no redirects), a directory replaced by a file, hard links, symlinks, a
/// chown and a chmod that change nothing (a copy-up that is no change), and /tmp.
const CHANGES: &str = "\
COPY tree /data
RUN echo new > /data/new && echo changed >> /data/keep && rm /data/b/g \
 && rm -rf /data/a && mkdir -p /data/a/sub && echo again > /data/a/f1 \
 && ln /data/same /data/same-link && ln -s ../same /data/b/sym && chmod 700 /data/b \
 && chown 0:0 /data/owned && chmod 644 /data/owned && mkdir -p /tmp && echo t > /tmp/t
RUN rm -rf /data/c && echo file > /data/c && mv /data/d /data/e && rm -rf /data/a \
 && mkdir /data/a && chmod 711 /data/a && mv /data/new /data/moved && mkdir -p /opt/x \
 && ln -s /data/moved /opt/x/link && rm /data/same-link
";

#[test]
fn overlay_and_unpacked_runs_give_identical_layers() {
    let dir = context();
    let containerfile = format!("{BASE}{CHANGES}");
    let overlay = tempfile::tempdir().unwrap();
    let unpacked = tempfile::tempdir().unwrap();
    let with = json(&succeed(&mut bake(
        overlay.path(),
        dir.path(),
        "t:1",
        &containerfile,
        "1",
    )));
    let without = json(&succeed(&mut bake(
        unpacked.path(),
        dir.path(),
        "t:1",
        &containerfile,
        "0",
    )));
    // The overlay way was taken (else the comparison proves nothing), the other was not.
    let chains = chains(overlay.path(), "t:1");
    let made = snapshots(overlay.path());
    for chain in &chains[..4] {
        assert!(made.contains_key(chain), "no snapshot {chain}: {made:?}");
    }
    assert!(snapshots(unpacked.path()).is_empty());
    assert_eq!(with["layers"], without["layers"]);
    assert_eq!(with["digest"], without["digest"]);
    // What the layers hold, so a change to both ways at once cannot pass unseen.
    assert_eq!(
        layer(overlay.path(), "t:1", 3),
        [
            "data/a/.wh.f2 644 0:0 \"\"",
            "data/a/f1 644 0:0 \"again\\n\"",
            "data/a/sub/.wh.f3 644 0:0 \"\"",
            "data/b/ 700 0:0 \"\"",
            "data/b/.wh.g 644 0:0 \"\"",
            "data/b/sym 777 0:0 \"\"",
            "data/keep 644 0:0 \"keepchanged\\n\"",
            "data/new 644 0:0 \"new\\n\"",
            "data/same-link 644 0:0 \"same\"",
            "tmp/ 755 0:0 \"\"",
            "tmp/t 644 0:0 \"t\\n\"",
        ]
    );
    // `data/c` is a file now: nothing under it is removed as well (the unpack way wrote
    // `data/c/.wh.x` too, a whiteout under a file).
    assert_eq!(
        layer(overlay.path(), "t:1", 4),
        [
            "data/.wh.d 644 0:0 \"\"",
            "data/.wh.new 644 0:0 \"\"",
            "data/.wh.same-link 644 0:0 \"\"",
            "data/a/ 711 0:0 \"\"",
            "data/a/.wh.f1 644 0:0 \"\"",
            "data/a/.wh.sub 644 0:0 \"\"",
            "data/c 644 0:0 \"file\\n\"",
            "data/e/ 755 0:0 \"\"",
            "data/e/y 644 0:0 \"y\"",
            "data/moved 644 0:0 \"new\\n\"",
            "opt/ 755 0:0 \"\"",
            "opt/x/ 755 0:0 \"\"",
            "opt/x/link 777 0:0 \"\"",
        ]
    );
}

#[test]
fn a_snapshot_is_made_once_and_shared_by_later_bakes() {
    let dir = context();
    let home = tempfile::tempdir().unwrap();
    succeed(&mut bake(
        home.path(),
        dir.path(),
        "t:1",
        &format!("{BASE}RUN echo one > /one\n"),
        "1",
    ));
    // The two COPY layers', and the RUN's (its upper dir, kept).
    let first = snapshots(home.path());
    assert_eq!(first.len(), 3, "{first:?}");
    let again = json(&succeed(&mut bake(
        home.path(),
        dir.path(),
        "t:2",
        &format!("{BASE}RUN echo two > /two\n"),
        "1",
    )));
    assert_eq!(again["cached_steps"], 3, "the RUN ran: {again}");
    // The same directories (same inodes): not unpacked again; one more, the new RUN's.
    let now = snapshots(home.path());
    assert_eq!(now.len(), 4, "{now:?}");
    for (chain, inode) in &first {
        assert_eq!(now.get(chain), Some(inode), "{chain} was made again");
    }
}

#[test]
fn gc_removes_the_snapshots_no_image_needs_and_keeps_the_rest() {
    let dir = context();
    let home = tempfile::tempdir().unwrap();
    succeed(&mut bake(
        home.path(),
        dir.path(),
        "keep:1",
        &format!("{BASE}RUN echo x > /x\nRUN echo y > /y\n"),
        "1",
    ));
    succeed(&mut bake(
        home.path(),
        dir.path(),
        "drop:1",
        &format!("{BASE}COPY other.txt /other\nRUN echo z > /z\n"),
        "1",
    ));
    let kept = chains(home.path(), "keep:1");
    let dropped = chains(home.path(), "drop:1");
    let made = snapshots(home.path());
    assert!(made.contains_key(&dropped[2]), "{made:?}");
    assert!(made.contains_key(&kept[2]), "{made:?}");
    // Nothing goes while both images are tagged.
    let out = json(&succeed(graven(home.path()).args(["gc", "--json"])));
    assert_eq!(out["snapshots"], serde_json::json!([]), "{out}");
    succeed(graven(home.path()).args(["image", "rm", "drop:1"]));
    let dry = json(&succeed(graven(home.path()).args([
        "gc",
        "--json",
        "--dry-run",
    ])));
    assert_eq!(snapshots(home.path()), made, "a dry run removed a snapshot");
    let out = json(&succeed(graven(home.path()).args(["gc", "--json"])));
    assert_eq!(dry["snapshots"], out["snapshots"]);
    let names: Vec<&str> = out["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    let mut gone = vec![
        format!("snapshot sha256:{}", dropped[2]),
        format!("snapshot sha256:{}", dropped[3]),
    ];
    gone.sort();
    assert_eq!(names, gone, "{out}");
    let left = snapshots(home.path());
    assert!(!left.contains_key(&dropped[2]), "{left:?}");
    assert!(!left.contains_key(&dropped[3]), "{left:?}");
    for chain in &kept[..3] {
        assert!(left.contains_key(chain), "gc removed {chain}: {left:?}");
    }
    // What is kept still serves: a RUN on the kept image's chain makes no snapshot again.
    succeed(&mut bake(
        home.path(),
        dir.path(),
        "keep:2",
        &format!("{BASE}RUN echo x > /x\nRUN echo other > /other\n"),
        "1",
    ));
    assert_eq!(snapshots(home.path())[&kept[2]], left[&kept[2]]);
}

/// The lines of this process's mountinfo that name `path`.
fn mounts_under(path: &Path) -> Vec<String> {
    let needle = path.display().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|line| line.contains(&needle) || line.contains("graven-overlay"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_failed_run_leaves_no_mount_and_no_temp_dir() {
    let dir = context();
    let home = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = bake(
        home.path(),
        dir.path(),
        "t:1",
        &format!("{BASE}RUN echo x > /x\nRUN echo y > /y; sleep 600 & exit 3\n"),
        "1",
    )
    .env("TMPDIR", tmp.path())
    .output()
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("exit status 3"), "{stderr}");
    // The overlay was used (the second RUN's chain has a snapshot), and is gone everywhere.
    assert_eq!(snapshots(home.path()).len(), 3);
    assert_eq!(mounts_under(home.path()), Vec::<String>::new());
    assert_eq!(mounts_under(tmp.path()), Vec::<String>::new());
    let left: Vec<PathBuf> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "temp dirs left: {left:?}");
    let temps: Vec<String> = snapshots(home.path())
        .into_keys()
        .filter(|name| name.starts_with(".tmp-"))
        .collect();
    assert!(temps.is_empty(), "{temps:?}");
}

#[test]
fn a_copy_reads_no_lower_layer() {
    let dir = context();
    let home = tempfile::tempdir().unwrap();
    let fresh = tempfile::tempdir().unwrap();
    succeed(&mut bake(
        home.path(),
        dir.path(),
        "t:1",
        &format!("{BASE}COPY other.txt /first\n"),
        "1",
    ));
    // The lower layers' contents are made unreadable as a tar (same size, same name): a COPY
    // that read them would fail.
    let store = graven::store::Store::open(home.path()).unwrap();
    let image = store.image(&store.resolve("t:1").unwrap()).unwrap();
    let mut saved = Vec::new();
    for layer in &image.manifest.layers[..2] {
        let path = store.blob_path(&layer.digest);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, vec![0x1f; bytes.len()]).unwrap();
        saved.push((path, bytes));
    }
    let containerfile = format!("{BASE}COPY other.txt /first\nCOPY other.txt /a/b/second\n");
    let out = bake(home.path(), dir.path(), "t:2", &containerfile, "1")
        .output()
        .unwrap();
    for (path, bytes) in saved {
        fs::write(path, bytes).unwrap();
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And the image is the one a bake that reads every layer makes.
    let reference = json(&succeed(&mut bake(
        fresh.path(),
        dir.path(),
        "t:2",
        &containerfile,
        "1",
    )));
    assert_eq!(json(&out)["digest"], reference["digest"]);
}

/// Regression: a snapshot is one layer unpacked, and was bounded alone, so an image of
/// layers each below `GRAVEN_MAX_IMAGE_SIZE` but past it together went through.
#[test]
fn the_image_size_bound_counts_every_layer_below_a_run() {
    let dir = context();
    let containerfile = format!("{BASE}RUN echo x > /x\n");
    for overlay in ["1", "0"] {
        let home = tempfile::tempdir().unwrap();
        // One busybox (about 2 MB) fits, two do not.
        let out = bake(home.path(), dir.path(), "t:1", &containerfile, overlay)
            .env("GRAVEN_MAX_IMAGE_SIZE", "3000K")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "GRAVEN_BAKE_OVERLAY={overlay}: {stderr}"
        );
        assert!(
            stderr.contains("the image unpacks to more than 3072000 bytes"),
            "GRAVEN_BAKE_OVERLAY={overlay}: {stderr}"
        );
        // The snapshot of the first layer, which fits, may stay; none of the second.
        assert!(snapshots(home.path()).len() <= 1, "{overlay}");
    }
}

/// The snapshots hold what images hold, setuid-root files among them: under a home any user
/// may enter (as `$HOME/.local/share` is), no other user reaches them.
#[test]
fn setuid_files_of_snapshots_are_out_of_other_users_reach() {
    if !rustix::process::geteuid().is_root() {
        return; // the setuid file is root's only when the bake is root's
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = context();
    let place = tempfile::tempdir().unwrap();
    fs::set_permissions(place.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let home = place.path().join("home");
    fs::create_dir(&home).unwrap();
    fs::set_permissions(&home, fs::Permissions::from_mode(0o755)).unwrap();
    succeed(&mut bake(
        &home,
        dir.path(),
        "t:1",
        "FROM scratch\nCOPY busybox /bin/sh\nCOPY --chmod=4755 busybox /bin/suid\nRUN echo x > /x\n",
        "1",
    ));
    let store = graven::store::Store::open(&home).unwrap();
    let image = store.image(&store.resolve("t:1").unwrap()).unwrap();
    let chain = &graven::store::snapshot::chain_ids(&image.config.rootfs.diff_ids)[1];
    let file = home.join(format!("snapshots/{}/fs/bin/suid", chain.hex()));
    assert_eq!(fs::metadata(&file).unwrap().mode() & 0o7777, 0o4755);
    let nobody_stat = |path: &Path| {
        support::as_nobody()
            .arg(support::busybox())
            .arg("stat")
            .arg(path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    // The control: nobody does reach the home itself (its mode is the user's to choose).
    fs::set_permissions(&home, fs::Permissions::from_mode(0o755)).unwrap();
    assert!(nobody_stat(&home), "the control failed");
    assert!(!nobody_stat(&file), "nobody reached {}", file.display());
}

/// Without the privilege to mount (an unprivileged user's bake), graven says once that
/// overlayfs is not available, unpacks instead, and makes the same image.
#[test]
fn without_mount_privileges_a_bake_says_so_once_and_makes_the_same_image() {
    if !rustix::process::geteuid().is_root() {
        return; // the rest of the suite runs rootless already; this compares with root's
    }
    let dir = context();
    let containerfile = format!("{BASE}RUN echo one > /one\nRUN echo two > /two\n");
    let root_home = tempfile::tempdir().unwrap();
    let as_root = json(&succeed(&mut bake(
        root_home.path(),
        dir.path(),
        "t:1",
        &containerfile,
        "1",
    )));
    assert!(!snapshots(root_home.path()).is_empty());
    let place = tempfile::tempdir().unwrap();
    let home = place.path().join("home");
    let context = place.path().join("context");
    fs::create_dir(&home).unwrap();
    fs::create_dir(&context).unwrap();
    for name in ["busybox", "Containerfile"] {
        fs::copy(dir.path().join(name), context.join(name)).unwrap();
    }
    succeed(
        Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(place.path()),
    );
    let out = succeed(
        support::as_nobody()
            .env("GRAVEN_HOME", &home)
            .env_remove("GRAVEN_BAKE_OVERLAY")
            .env_remove("SOURCE_DATE_EPOCH")
            .arg(support::graven_bin())
            .args(["bake", "--json", "--tag", "t:1"])
            .arg(&context),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("overlayfs is not available").count(),
        1,
        "{stderr}"
    );
    assert!(snapshots(&home).is_empty());
    assert_eq!(json(&out)["digest"], as_root["digest"]);
}

/// useradd writes its backups (`/etc/group-`) in place with the old size and mtime put back:
/// only the content says the file changed. The overlay way compares it (the unpacking way,
/// which keeps no copy of the old content, does not: docs/bake.md says so).
#[test]
fn a_file_rewritten_in_place_with_its_size_and_mtime_put_back_is_in_the_layer() {
    let dir = context();
    let containerfile = format!(
        "{BASE}RUN [\"/bin/busybox\", \"sh\", \"-c\", \"busybox mkdir -p /etc && echo root:x:0: > /etc/group-\"]\n\
         RUN [\"/bin/busybox\", \"sh\", \"-c\", \"busybox cp -p /etc/group- /saved && echo root:*:0: > /etc/group- && busybox touch -r /saved /etc/group- && busybox rm /saved\"]\n"
    );
    let home = tempfile::tempdir().unwrap();
    succeed(&mut bake(
        home.path(),
        dir.path(),
        "inplace:1",
        &containerfile,
        "1",
    ));
    assert!(
        !snapshots(home.path()).is_empty(),
        "the overlay way was taken"
    );
    let entries = layer(home.path(), "inplace:1", 3);
    assert!(
        entries
            .iter()
            .any(|e| e.starts_with("etc/group- ") && e.ends_with("\"root:*:0:\\n\"")),
        "{entries:?}"
    );
}

/// Regression (cold bakes spent seconds on it): a RUN's upper dir was deleted once its layer
/// was written, and the next RUN unpacked that layer again into a snapshot; BuildKit keeps the
/// step's upper dir as the next step's lower. Now the upper dir becomes the layer's snapshot.
#[test]
fn a_run_s_upper_dir_becomes_the_snapshot_of_its_layer() {
    let dir = context();
    let home = tempfile::tempdir().unwrap();
    succeed(&mut bake(
        home.path(),
        dir.path(),
        "t:1",
        &format!("{BASE}RUN echo one > /one && mkdir -p /var/log && echo x > /var/log/dpkg.log\n"),
        "1",
    ));
    let chains = chains(home.path(), "t:1");
    let made = snapshots(home.path());
    assert!(made.contains_key(&chains[2]), "{made:?}");
    let fs_dir = home.path().join("snapshots").join(&chains[2]).join("fs");
    assert_eq!(fs::read_to_string(fs_dir.join("one")).unwrap(), "one\n");
    // As the layer has it: the layer's mtime, and no file the rules drop.
    assert_eq!(fs::symlink_metadata(fs_dir.join("one")).unwrap().mtime(), 1);
    assert!(!fs_dir.join("var/log/dpkg.log").exists());
    let temps: Vec<String> = made
        .into_keys()
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(temps.is_empty(), "{temps:?}");
}

/// What a later RUN sees of the tree: every path under `/` (not /proc, /sys, /dev) with its
/// type, mode and owners, and for all but directories (whose mtimes unpacking never sets) its
/// size, mtime, link count and content hash.
const LISTING: &str = "RUN busybox find / -xdev -path /proc -prune -o -path /sys -prune \
 -o -path /dev -prune -o -path /paths -prune -o -print | busybox sort > /paths \
 && while read p; do if [ -d \"$p\" ] && [ ! -L \"$p\" ]; then busybox stat -c '%n %F %a %u:%g' \"$p\"; \
 else busybox stat -c '%n %F %a %u:%g %s %Y %h' \"$p\"; fi; \
 if [ -f \"$p\" ] && [ ! -L \"$p\" ]; then busybox md5sum \"$p\"; fi; done < /paths > /listing \
 && rm /paths\n";

/// The snapshot a RUN's upper dir became is the tree its layer unpacks to: a later RUN sees
/// the same (paths, types, modes, owners, sizes, mtimes, link counts, contents) whether it
/// starts on the kept upper dir, on a snapshot unpacked from the layer, or on the layers
/// unpacked whole. The step writes files the rules drop and bytecode they rewrite, hard
/// links (a layer stores copies), a setuid file, a removed and remade directory (opaque), a
/// chmod of `/` (which no layer holds) and a working directory graven made again.
#[test]
fn a_snapshot_kept_from_a_run_is_the_one_unpacked_from_its_layer() {
    let dir = context();
    let steps = format!(
        "{BASE}COPY tree /data\nWORKDIR /work/deep\nRUN rm -rf /work\n\
RUN echo new > /data/new && echo changed >> /data/keep && rm /data/b/g \
 && rm -rf /data/a && mkdir -p /data/a/sub && echo again > /data/a/f1 \
 && ln /data/same /data/same-link && ln -s ../same /data/b/sym && chmod 700 /data/b \
 && chown 0:0 /data/owned && chmod 644 /data/owned && chmod 700 / \
 && mkdir -p /var/log /app/__pycache__ && echo log > /var/log/dpkg.log \
 && echo 'x = 1' > /app/m.py \
 && printf '\\247\\r\\r\\n\\0\\0\\0\\0\\1\\2\\3\\4\\5\\0\\0\\0code' > /app/__pycache__/m.cpython-311.pyc \
 && chmod 4755 /data/new && ln /data/new /data/new-link\n"
    );
    let whole = format!("{steps}{LISTING}");
    let kept = tempfile::tempdir().unwrap();
    let with = json(&succeed(&mut bake(
        kept.path(),
        dir.path(),
        "t:1",
        &whole,
        "1",
    )));
    // The same steps, with every snapshot then removed: the listing's RUN unpacks them.
    let unpacked = tempfile::tempdir().unwrap();
    succeed(&mut bake(unpacked.path(), dir.path(), "t:0", &steps, "1"));
    for chain in snapshots(unpacked.path()).into_keys() {
        fs::remove_dir_all(unpacked.path().join("snapshots").join(chain)).unwrap();
    }
    let again = json(&succeed(&mut bake(
        unpacked.path(),
        dir.path(),
        "t:1",
        &whole,
        "1",
    )));
    assert_eq!(
        again["cached_steps"],
        with["total_steps"].as_u64().unwrap() - 1
    );
    let whole_unpack = tempfile::tempdir().unwrap();
    let without = json(&succeed(&mut bake(
        whole_unpack.path(),
        dir.path(),
        "t:1",
        &whole,
        "0",
    )));
    let listing = |home: &Path| {
        let layers = layer(home, "t:1", 6);
        layers
            .into_iter()
            .find(|l| l.starts_with("listing "))
            .unwrap()
    };
    assert_eq!(listing(kept.path()), listing(unpacked.path()));
    assert_eq!(listing(kept.path()), listing(whole_unpack.path()));
    assert_eq!(with["digest"], again["digest"]);
    assert_eq!(with["digest"], without["digest"]);
}

/// Regression (the first RUN of a cold bake unpacked the base, and the first COPY or WORKDIR
/// read its whole layer for the paths it holds, where `docker load` unpacks an image before
/// any build): importing a base unpacks its snapshots and writes its layers' path indexes.
#[test]
fn importing_a_base_unpacks_its_snapshots_and_path_indexes() {
    let dir = context();
    let home = tempfile::tempdir().unwrap();
    succeed(&mut bake(
        home.path(),
        dir.path(),
        "base:1",
        &format!("{BASE}COPY other.txt /other\n"),
        "1",
    ));
    let archive = dir.path().join("base.tar");
    succeed(
        graven(home.path())
            .args(["image", "export", "base:1", "--format", "docker", "-o"])
            .arg(&archive),
    );
    let fresh = tempfile::tempdir().unwrap();
    succeed(&mut bake(
        fresh.path(),
        dir.path(),
        "imported:1",
        "FROM docker-archive:base.tar\n",
        "1",
    ));
    let made = snapshots(fresh.path());
    let chains = chains(fresh.path(), "imported:1");
    assert_eq!(chains.len(), 3);
    for chain in &chains {
        assert!(made.contains_key(chain), "no snapshot {chain}: {made:?}");
    }
    let store = graven::store::Store::open(fresh.path()).unwrap();
    let image = store.image(&store.resolve("imported:1").unwrap()).unwrap();
    for layer in &image.manifest.layers {
        assert!(
            store.path_index(&layer.digest).is_some(),
            "{}",
            layer.digest
        );
    }
    // With overlayfs switched off, no snapshot; the path indexes all the same.
    let off = tempfile::tempdir().unwrap();
    succeed(&mut bake(
        off.path(),
        dir.path(),
        "imported:1",
        "FROM docker-archive:base.tar\n",
        "0",
    ));
    assert!(snapshots(off.path()).is_empty());
    let store = graven::store::Store::open(off.path()).unwrap();
    for layer in &image.manifest.layers {
        assert!(
            store.path_index(&layer.digest).is_some(),
            "{}",
            layer.digest
        );
    }
}

/// The layer `index` of `tag`'s entry for `path`, as `layer` lists it.
fn entry(home: &Path, tag: &str, index: usize, path: &str) -> String {
    let entries = layer(home, tag, index);
    entries
        .iter()
        .find(|e| e.starts_with(&format!("{path} ")))
        .unwrap_or_else(|| panic!("no {path} in {entries:?}"))
        .clone()
}

/// A RUN's writable overlay is mounted `volatile` (no sync reaches the disk from the step, and
/// unmounting it syncs nothing), and the snapshot its upper dir becomes names this boot. The
/// unpack-and-diff way has no overlay: the same step sees none there.
#[test]
fn a_run_s_overlay_is_volatile_and_its_snapshot_names_the_boot() {
    let dir = context();
    let step = format!(
        "{BASE}RUN if busybox grep -q '^[^ ]* [^ ]* [^ ]* / / .* overlay .*volatile' \
         /proc/self/mountinfo; then echo yes > /volatile; else echo no > /volatile; fi\n"
    );
    let home = tempfile::tempdir().unwrap();
    succeed(&mut bake(home.path(), dir.path(), "t:1", &step, "1"));
    assert_eq!(
        entry(home.path(), "t:1", 2, "volatile"),
        "volatile 644 0:0 \"yes\\n\""
    );
    let chains = chains(home.path(), "t:1");
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let snapshot = home.path().join("snapshots").join(&chains[2]);
    assert_eq!(
        fs::read_to_string(snapshot.join("boot-id")).unwrap(),
        boot.trim()
    );
    let unpacked = tempfile::tempdir().unwrap();
    succeed(&mut bake(unpacked.path(), dir.path(), "t:1", &step, "0"));
    assert_eq!(
        entry(unpacked.path(), "t:1", 2, "volatile"),
        "volatile 644 0:0 \"no\\n\""
    );
}

/// Regression for what `volatile` risks: a snapshot's files are never synced, so after a
/// crash some may be short of their bytes. A snapshot that names another boot is not read: it
/// is made again from its layer. The control: the same damage in a snapshot of this boot is
/// what a RUN on it sees (so the check, not chance, keeps the later RUN from it).
#[test]
fn a_snapshot_of_another_boot_is_made_again_from_its_layer() {
    let dir = context();
    let home = tempfile::tempdir().unwrap();
    let first = format!("{BASE}RUN echo one > /one\n");
    succeed(&mut bake(home.path(), dir.path(), "t:1", &first, "1"));
    let chain = chains(home.path(), "t:1")[2].clone();
    let snapshot = home.path().join("snapshots").join(&chain);
    // What a crash may leave: a file of the snapshot without its bytes.
    fs::write(snapshot.join("fs/one"), "").unwrap();
    succeed(&mut bake(
        home.path(),
        dir.path(),
        "t:2",
        &format!("{first}RUN busybox cat /one > /seen\n"),
        "1",
    ));
    assert_eq!(entry(home.path(), "t:2", 3, "seen"), "seen 644 0:0 \"\"");
    fs::write(snapshot.join("boot-id"), "another boot").unwrap();
    succeed(&mut bake(
        home.path(),
        dir.path(),
        "t:3",
        &format!("{first}RUN busybox cat /one > /seen-again\n"),
        "1",
    ));
    assert_eq!(
        entry(home.path(), "t:3", 3, "seen-again"),
        "seen-again 644 0:0 \"one\\n\""
    );
    // Made again, in this boot; nothing left aside.
    assert_eq!(
        fs::read_to_string(snapshot.join("fs/one")).unwrap(),
        "one\n"
    );
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(
        fs::read_to_string(snapshot.join("boot-id")).unwrap(),
        boot.trim()
    );
    let temps: Vec<String> = snapshots(home.path())
        .into_keys()
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(temps.is_empty(), "{temps:?}");
}
