//! Paths an image holds act only inside its root, through every way an image comes in: a
//! COPY, an ADD archive, a base layer (FROM oci:, the store's import) and a WORKDIR, unpacked
//! by a RUN step or by `graven run`. Each test runs the real binary with `$TMPDIR` and
//! `$GRAVEN_HOME` inside its own temp dir, plants a sentinel where an escape would land (the
//! dir holding the bake's temp roots, the dir holding the instances' roots, a host dir a
//! symlink names) and checks it is untouched, whether graven accepts the image or refuses it.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{graven, succeed};

/// A test's world: `tmp/` is the `$TMPDIR` graven makes its temp roots in, `home/` its
/// `$GRAVEN_HOME`, `context/` the build context (with busybox), and a sentinel file in each of
/// `tmp/`, `home/rootfs/` and `host/`.
struct World {
    work: tempfile::TempDir,
}

const SENTINEL: &str = "sentinel";

impl World {
    fn new() -> World {
        let work = tempfile::tempdir().unwrap();
        let world = World { work };
        for dir in [world.tmp(), world.home().join("rootfs"), world.host()] {
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join(SENTINEL), "host").unwrap();
        }
        fs::create_dir_all(world.context()).unwrap();
        fs::copy(support::busybox(), world.context().join("busybox")).unwrap();
        world
    }

    fn tmp(&self) -> PathBuf {
        self.work.path().join("tmp")
    }

    fn home(&self) -> PathBuf {
        self.work.path().join("home")
    }

    fn host(&self) -> PathBuf {
        self.work.path().join("host")
    }

    fn context(&self) -> PathBuf {
        self.work.path().join("context")
    }

    fn graven(&self) -> Command {
        let mut command = graven(&self.home());
        command.env("TMPDIR", self.tmp());
        command
    }

    /// `graven bake --tag img:1` of `containerfile`; its output, success or not.
    fn bake(&self, containerfile: &str) -> Output {
        fs::write(self.context().join("Containerfile"), containerfile).unwrap();
        self.graven()
            .args(["bake", "--tag", "img:1"])
            .arg(self.context())
            .output()
            .unwrap()
    }

    /// Panics when a sentinel is gone or changed, or when something was made in `host/`.
    fn check(&self, what: &str) {
        for dir in [self.tmp(), self.home().join("rootfs"), self.host()] {
            assert_eq!(
                fs::read_to_string(dir.join(SENTINEL)).ok().as_deref(),
                Some("host"),
                "{what}: {} was removed",
                dir.join(SENTINEL).display()
            );
        }
        let made: Vec<String> = fs::read_dir(self.host())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name != SENTINEL)
            .collect();
        assert!(made.is_empty(), "{what}: made on the host: {made:?}");
    }
}

/// A tar of empty `(type, name, link target)` entries.
fn tar_of(entries: &[(tar::EntryType, &str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (kind, name, link) in entries {
        support::fuzzing::append_empty(&mut builder, *kind, name, link);
    }
    builder.into_inner().unwrap()
}

/// Base layers that name the root's parent, the root, or `/` through a symlink as the path a
/// whiteout hides.
const ESCAPING_LAYERS: &[&[(tar::EntryType, &str, &str)]] = &[
    &[(tar::EntryType::Regular, ".wh...", "")],
    &[(tar::EntryType::Regular, ".wh..", "")],
    &[(tar::EntryType::Regular, ".wh.", "")],
    &[
        (tar::EntryType::Symlink, "sub", "/"),
        (tar::EntryType::Regular, "sub/.wh...", ""),
    ],
];

/// Regression (issue 10, item 1): a COPY of a file named `.wh...` followed by a RUN emptied
/// the bake's `$TMPDIR` (the RUN step unpacked the layer and removed its root's parent).
#[test]
fn copy_of_a_whiteout_dot_dot_file_then_run_keeps_tmpdir() {
    let world = World::new();
    fs::write(world.context().join(".wh..."), "x").unwrap();
    let out = world.bake(
        "FROM scratch\nCOPY busybox /bin/sh\nCOPY .wh... /.wh...\nRUN [\"/bin/sh\", \"-c\", \"true\"]\n",
    );
    world.check("COPY .wh... then RUN");
    assert!(!out.status.success(), "a layer holding .wh... was baked");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(".wh..."),
        "the error does not name the file: {stderr}"
    );
}

/// Regression (issue 10, item 1): without a RUN the image baked, and `graven run` emptied
/// `$GRAVEN_HOME/rootfs`, where every instance's root is.
#[test]
fn copy_of_a_whiteout_dot_dot_file_then_graven_run_keeps_rootfs() {
    let world = World::new();
    fs::write(world.context().join(".wh..."), "x").unwrap();
    let out = world.bake("FROM scratch\nCOPY busybox /bin/sh\nCOPY .wh... /.wh...\n");
    if out.status.success() {
        let _ = world
            .graven()
            .args(["run", "img:1", "--", "/bin/sh", "-c", "true"])
            .output();
    }
    world.check("COPY .wh... then graven run");
    assert!(!out.status.success(), "a layer holding .wh... was baked");
}

/// Regression (issue 10, item 1): an ADD archive holding `.wh...`, then a RUN.
#[test]
fn add_of_an_archive_holding_whiteout_dot_dot_keeps_tmpdir() {
    let world = World::new();
    fs::write(
        world.context().join("a.tar"),
        tar_of(&[(tar::EntryType::Regular, ".wh...", "")]),
    )
    .unwrap();
    let out = world.bake(
        "FROM scratch\nCOPY busybox /bin/sh\nADD a.tar /\nRUN [\"/bin/sh\", \"-c\", \"true\"]\n",
    );
    world.check("ADD a.tar holding .wh...");
    assert!(!out.status.success(), "a layer holding .wh... was baked");
}

/// Regression (issue 10, item 1): an imported base layer (FROM oci:, through the store's
/// import) holding an escaping whiteout, unpacked by a RUN step.
#[test]
fn imported_layer_with_escaping_whiteouts_then_run_keeps_tmpdir() {
    for layer in ESCAPING_LAYERS {
        let world = World::new();
        support::fuzzing::write_oci_layout(&world.context().join("base"), &tar_of(layer));
        let out = world.bake("FROM oci:base\nRUN [\"/bin/true\"]\n");
        world.check(&format!("FROM a layer of {layer:?}, then RUN"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("not a file name"),
            "{layer:?}: {stderr}"
        );
    }
}

/// Regression (issue 10, item 1): the same imported layers, unpacked by `graven run` into
/// `$GRAVEN_HOME/rootfs`.
#[test]
fn imported_layer_with_escaping_whiteouts_then_graven_run_keeps_rootfs() {
    for layer in ESCAPING_LAYERS {
        let world = World::new();
        support::fuzzing::write_oci_layout(&world.context().join("base"), &tar_of(layer));
        succeed(&mut {
            fs::write(world.context().join("Containerfile"), "FROM oci:base\n").unwrap();
            let mut command = world.graven();
            command
                .args(["bake", "--tag", "img:1"])
                .arg(world.context());
            command
        });
        let out = world
            .graven()
            .args(["run", "img:1", "--", "/bin/true"])
            .output()
            .unwrap();
        world.check(&format!("graven run of a layer of {layer:?}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("not a file name"),
            "{layer:?}: {stderr}"
        );
    }
}

/// Regression (issue 10, item 6): `WORKDIR /lnk/x` through `lnk -> <a host dir>` made
/// `<host dir>/x` on the host, as root.
#[test]
fn workdir_through_an_image_symlink_makes_no_host_dir() {
    let world = World::new();
    let host = world.host();
    let out = world.bake(&format!(
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY busybox /bin/sh\n\
         RUN [\"/bin/busybox\", \"ln\", \"-s\", \"{}\", \"/lnk\"]\n\
         WORKDIR /lnk/x\nRUN [\"/bin/busybox\", \"test\", \"-d\", \"{}/x\"]\n",
        host.display(),
        host.display()
    ));
    world.check("WORKDIR through a symlink");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Regression (issue 10, item 6): a name the image's USER gives is looked up in the image's
/// /etc/passwd; `etc/passwd -> <a host file>` read the host's file instead.
#[test]
fn user_lookup_reads_the_images_passwd_not_the_hosts() {
    let world = World::new();
    let host_passwd = world.host().join("passwd");
    fs::write(&host_passwd, "hostonly:x:4242:4242::/:/bin/sh\n").unwrap();
    let out = world.bake(&format!(
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY busybox /bin/sh\n\
         RUN [\"/bin/busybox\", \"mkdir\", \"/etc\"]\n\
         RUN [\"/bin/busybox\", \"ln\", \"-s\", \"{}\", \"/etc/passwd\"]\n\
         USER hostonly\nRUN [\"/bin/busybox\", \"id\"]\n",
        host_passwd.display()
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("\"hostonly\" is not in the image's /etc/passwd"),
        "the host's passwd was read: {stderr}"
    );
}

/// Runs `tar` (GNU tar, for its sparse format) in `dir`.
fn gnu_tar(dir: &Path, args: &[&str]) {
    succeed(Command::new("tar").current_dir(dir).args(args));
}

/// Regression (issue 10, item 14): ADD dropped GNU sparse entries without a word. They are
/// unpacked whole, holes as zeros.
#[test]
fn add_unpacks_gnu_sparse_entries() {
    let world = World::new();
    let src = world.work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let file = fs::File::create(src.join("sparse")).unwrap();
    file.set_len(1 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&file, b"end", (1 << 20) - 3).unwrap();
    drop(file);
    fs::write(src.join("plain"), "plain").unwrap();
    gnu_tar(
        &src,
        &[
            "--format=gnu",
            "--sparse",
            "-cf",
            "../context/s.tar",
            "sparse",
            "plain",
        ],
    );
    let listed = Command::new("tar")
        .args(["-tvf"])
        .arg(world.context().join("s.tar"))
        .output()
        .unwrap();
    assert!(listed.status.success());
    let out = world.bake("FROM scratch\nADD s.tar /d/\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = graven::store::Store::open(&world.home()).unwrap();
    let image = store.image(&store.resolve("img:1").unwrap()).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(
        store.open_blob(&image.manifest.layers[0].digest).unwrap(),
    ));
    let mut found = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().display().to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        if path == "d/sparse" {
            assert_eq!(data.len(), 1 << 20);
            assert!(data.ends_with(b"end") && data[..data.len() - 3].iter().all(|b| *b == 0));
        }
        found.push(path);
    }
    assert_eq!(found, ["d/", "d/plain", "d/sparse"]);
}

/// ADD refuses what it cannot hold, naming the entry, rather than dropping it.
#[test]
fn add_refuses_devices_and_fifos_by_name() {
    for (kind, what) in [
        (tar::EntryType::Fifo, "a fifo"),
        (tar::EntryType::Char, "a character device"),
        (tar::EntryType::Block, "a block device"),
    ] {
        let world = World::new();
        fs::write(
            world.context().join("a.tar"),
            tar_of(&[(kind, "dev/thing", "")]),
        )
        .unwrap();
        let out = world.bake("FROM scratch\nADD a.tar /\n");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("\"dev/thing\" is ") && stderr.contains(what),
            "{what}: {stderr}"
        );
    }
}

/// Regression (issue 10, item 15c): a gzip bomb (a small archive of zeros) became a root
/// many times its size. `GRAVEN_MAX_IMAGE_SIZE` bounds an image as unpacked, for an ADD
/// archive, a RUN step's root and an instance's root alike, and the error names the layer.
#[test]
fn unpacked_image_size_is_bounded() {
    let world = World::new();
    // 4 MiB of zeros, about 4 KiB gzipped.
    let mut builder = tar::Builder::new(Vec::new());
    let zeros = vec![0u8; 4 << 20];
    let mut header = tar::Header::new_gnu();
    header.set_size(zeros.len() as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    builder
        .append_data(&mut header, "zeros", zeros.as_slice())
        .unwrap();
    let tar = builder.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let gz = gz.finish().unwrap();
    assert!(gz.len() < 64 << 10);
    fs::write(world.context().join("bomb.tar.gz"), &gz).unwrap();
    support::fuzzing::write_oci_layout(&world.context().join("base"), &gz);

    let bake_with = |limit: &str, containerfile: &str| {
        fs::write(world.context().join("Containerfile"), containerfile).unwrap();
        world
            .graven()
            .env("GRAVEN_MAX_IMAGE_SIZE", limit)
            .args(["bake", "--tag", "img:1"])
            .arg(world.context())
            .output()
            .unwrap()
    };
    // ADD: refused under a 1M bound, accepted under the default.
    let out = bake_with("1M", "FROM scratch\nADD bomb.tar.gz /\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("more than 1048576 bytes"),
        "{stderr}"
    );
    let out = bake_with("", "FROM scratch\nADD bomb.tar.gz /\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A base layer unpacked for RUN: refused, naming the layer; the temp root is gone.
    let layer = graven::store::Digest::of(&gz);
    let out = bake_with("1M", "FROM oci:base\nRUN [\"/bin/true\"]\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains(&format!("layer {layer}"))
            && stderr.contains("GRAVEN_MAX_IMAGE_SIZE"),
        "{stderr}"
    );
    let left: Vec<_> = fs::read_dir(world.tmp())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != SENTINEL)
        .collect();
    assert!(left.is_empty(), "temp dirs left behind: {left:?}");

    // An instance's root: refused, nothing left in rootfs but the sentinel.
    let out = bake_with("1M", "FROM oci:base\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = world
        .graven()
        .env("GRAVEN_MAX_IMAGE_SIZE", "1M")
        .args(["run", "img:1", "--", "/bin/true"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(&format!("layer {layer}")),
        "{stderr}"
    );
    let left: Vec<_> = fs::read_dir(world.home().join("rootfs"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != SENTINEL)
        .collect();
    assert!(left.is_empty(), "half-unpacked roots left behind: {left:?}");
    // A bad setting is an error, not the default.
    let out = bake_with("lots", "FROM oci:base\nRUN [\"/bin/true\"]\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("GRAVEN_MAX_IMAGE_SIZE=\"lots\" is not a size"),
        "{stderr}"
    );
    world.check("size bound");
}

/// Whether uid 65534 (no group) can `stat` `path`: what any other user of the host can do.
fn nobody_can_stat(path: &Path) -> bool {
    support::as_nobody()
        .arg(support::busybox())
        .arg("stat")
        .arg(path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Regression (issue 10, item 3): a RUN step's root was `$TMPDIR/graven-run-*`, made 0755 so
/// the image's users could walk it, and held the image's setuid-root files: any host user
/// could run them as root while the step ran. The root now sits in a 0700 dir of graven's.
#[test]
fn setuid_files_of_a_run_root_are_out_of_other_users_reach() {
    if !rustix::process::geteuid().is_root() {
        return; // the setuid file is root's only when the bake is root's
    }
    let world = World::new();
    // $TMPDIR as /tmp is: every user may enter it.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(world.work.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(world.tmp(), fs::Permissions::from_mode(0o1777)).unwrap();
    // The control: nobody does reach a file in a 0755 dir here.
    let control = world.tmp().join("control");
    fs::create_dir(&control).unwrap();
    fs::set_permissions(&control, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(control.join("file"), "x").unwrap();
    assert!(nobody_can_stat(&control.join("file")), "the control failed");
    fs::remove_dir_all(&control).unwrap();

    fs::write(
        world.context().join("Containerfile"),
        "FROM scratch\nCOPY busybox /bin/sh\nCOPY busybox /bin/busybox\n\
         COPY --chmod=4755 busybox /bin/suid\n\
         RUN until [ -e /go ]; do /bin/busybox sleep 0.05; done; /bin/busybox rm /go\n",
    )
    .unwrap();
    let mut bake = world
        .graven()
        // The unpacked root this looks for; an overlay root is seen only in graven's own
        // mount namespace (bake_snapshots.rs checks the snapshots' setuid files).
        .env("GRAVEN_BAKE_OVERLAY", "0")
        .args(["bake", "--tag", "img:1"])
        .arg(world.context())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The bake is stopped by its own PID whatever happens below.
    struct Stop<'a>(&'a mut std::process::Child);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let bake = Stop(&mut bake);
    let suid = support::wait_for(
        std::time::Duration::from_secs(60),
        "the RUN step's root",
        || {
            fs::read_dir(world.tmp()).ok()?.find_map(|e| {
                let dir = e.ok()?.path();
                let name = dir.file_name()?.to_string_lossy().into_owned();
                if !name.starts_with("graven-run-") {
                    return None;
                }
                // Whatever the layout, the setuid file is somewhere below this dir.
                [dir.join("bin/suid"), dir.join("root/bin/suid")]
                    .into_iter()
                    .find(|p| p.exists())
                    .map(|p| (dir, p))
            })
        },
    );
    let (dir, file) = suid;
    let reached = nobody_can_stat(&file);
    let go = file.parent().unwrap().parent().unwrap().join("go");
    fs::write(&go, "").unwrap();
    let status = support::wait_for(
        std::time::Duration::from_secs(60),
        "the bake to finish",
        || bake.0.try_wait().unwrap(),
    );
    assert!(
        !reached,
        "uid 65534 reached {} while the RUN step ran",
        file.display()
    );
    assert!(!dir.exists(), "the RUN root was left behind");
    assert!(status.success(), "the bake failed");
}
