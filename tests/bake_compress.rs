//! Layers compressed off the bake's path (src/bake/compress.rs): a big layer's gzip runs while
//! the next steps do, and the steps above it that read it (a RUN on it, a WORKDIR, COPY
//! --chown by name, COPY --from, a RUN above a big COPY) work while it runs; the image is the
//! one compressing inline gives (every blob the gzip of its tar as `LayerWriter` writes it, the
//! same digest on every bake), and a bake killed while a layer is being compressed leaves a
//! store the next bake completes in, with the same digest.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use graven::store::{Digest, Store};
use support::{graven, succeed, wait_for};

const BASE: &str = "FROM scratch AS one
COPY busybox /bin/busybox
COPY busybox /bin/sh
ENV PATH=/bin
RUN busybox --install -s /bin && mkdir /etc \\
 && echo 'nobody:x:65534:65534::/:/bin/sh' > /etc/passwd && echo 'nobody:x:65534:' > /etc/group
COPY seed /seed
";

/// A context with busybox, a 1 MiB incompressible seed, a 6 MiB file and a small one.
fn context() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::copy(support::busybox(), dir.path().join("busybox")).unwrap();
    let mut rng = fastrand::Rng::with_seed(12);
    let seed: Vec<u8> = (0..1 << 20).map(|_| rng.u8(..)).collect();
    fs::write(dir.path().join("seed"), &seed).unwrap();
    fs::write(dir.path().join("big-ctx"), seed.repeat(6)).unwrap();
    fs::write(dir.path().join("small"), "small\n").unwrap();
    dir
}

/// A context whose Containerfile writes a 96 MiB incompressible layer (its gzip takes a
/// while), then waits in its last RUN on a cache mount's file (`gate`): `started` appears
/// when that step runs, `go` lets it end.
fn gated_context() -> tempfile::TempDir {
    let dir = context();
    let containerfile = format!(
        "{BASE}RUN for i in $(seq 96); do cat /seed; done > /big
RUN --mount=type=cache,target=/gate,id=gate touch /gate/started \\
 && while [ ! -e /gate/go ]; do sleep 0.05; done
"
    );
    fs::write(dir.path().join("Containerfile"), &containerfile).unwrap();
    dir
}

/// The gate's cache mount on the host, in `home`.
fn gate(home: &Path) -> PathBuf {
    home.join("bake-mounts").join(Digest::of(b"gate").hex())
}

fn bake(home: &Path, dir: &Path, extra: &[&str]) -> serde_json::Value {
    let out = succeed(
        graven(home)
            .args(["bake", "--json", "--tag", "c:1"])
            .args(extra)
            .arg(dir),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn temps(home: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for dir in ["store/blobs", "store/blobs/sha256"] {
        for entry in fs::read_dir(home.join(dir)).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                names.push(name);
            }
        }
    }
    names
}

/// Every layer of the image is a whole gzip blob with no annotation, whose content is what
/// compressing its tar inline gives, under the diff_id the config names.
fn assert_inline_blobs(home: &Path, digest: &str) {
    let store = Store::open(home).unwrap();
    let image = store.image(&digest.parse::<Digest>().unwrap()).unwrap();
    assert_eq!(
        image.manifest.layers.len(),
        image.config.rootfs.diff_ids.len()
    );
    for (layer, diff_id) in image
        .manifest
        .layers
        .iter()
        .zip(&image.config.rootfs.diff_ids)
    {
        assert!(layer.annotations.is_empty(), "{layer:?}");
        assert_eq!(layer.media_type, graven::store::MEDIA_TYPE_LAYER_GZIP);
        let path = store.blob_path(&layer.digest);
        assert_eq!(fs::metadata(&path).unwrap().len(), layer.size);
        let inline =
            graven::store::compress_into(&store, graven::store::decompressed(&path).unwrap())
                .unwrap();
        assert_eq!(&inline.digest, &layer.digest);
        assert_eq!(&inline.diff_id, diff_id);
    }
}

#[test]
fn steps_above_a_layer_still_compressing_give_the_inline_blobs_and_one_digest() {
    let dir = context();
    // 12 MiB and 6 MiB layers are staged (over `STAGE_FROM`); each step after them reads them
    // its own way before their gzip may be done.
    let containerfile = format!(
        "{BASE}RUN for i in $(seq 12); do cat /seed; done > /big
RUN test $(wc -c < /big) = 12582912 && echo ran > /ran
WORKDIR /work
COPY small .
COPY --chown=nobody:nobody small /owned
RUN test \"$(stat -c %u:%g /owned)\" = 65534:65534 && cat /ran /work/small > /both
COPY big-ctx /big-ctx
RUN cmp /big-ctx /big-ctx && test $(wc -c < /big-ctx) = 6291456
FROM scratch
COPY --from=one /big /big
COPY --from=one /both /both
"
    );
    fs::write(dir.path().join("Containerfile"), &containerfile).unwrap();
    let home = tempfile::tempdir().unwrap();
    let first = bake(home.path(), dir.path(), &[]);
    let digest = first["digest"].as_str().unwrap();
    // Only the two `FROM scratch` count as cached.
    assert_eq!(first["cached_steps"], 2);
    assert_inline_blobs(home.path(), digest);
    let one = bake(home.path(), dir.path(), &["--target", "one"]);
    assert_eq!(
        one["cached_steps"], one["total_steps"],
        "the cache entries name the blobs, not their placeholders"
    );
    assert_inline_blobs(home.path(), one["digest"].as_str().unwrap());
    assert!(temps(home.path()).is_empty(), "{:?}", temps(home.path()));
    let again = tempfile::tempdir().unwrap();
    assert_eq!(
        bake(again.path(), dir.path(), &[])["digest"].as_str(),
        Some(digest),
        "two cold bakes give one digest"
    );
    // Without overlayfs every RUN unpacks the layers below it, waiting for their gzips.
    let unpacking = tempfile::tempdir().unwrap();
    let out = succeed(
        graven(unpacking.path())
            .env("GRAVEN_BAKE_OVERLAY", "0")
            .args(["bake", "--json", "--tag", "c:1"])
            .arg(dir.path()),
    );
    let unpacked: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(unpacked["digest"].as_str(), Some(digest));
    let cached = bake(home.path(), dir.path(), &[]);
    assert_eq!(cached["digest"].as_str(), Some(digest));
    assert_eq!(cached["cached_steps"], cached["total_steps"]);
}

#[test]
fn a_bake_killed_while_a_layer_compresses_leaves_a_store_the_next_bake_completes() {
    // The test kills the bake at the gate, with the big layer still being compressed.
    let dir = gated_context();
    let home = tempfile::tempdir().unwrap();
    let index_before = {
        // A store with something in it already: the killed bake must leave it as it was.
        fs::write(dir.path().join("Base"), "FROM scratch\nCOPY small /small\n").unwrap();
        succeed(
            graven(home.path())
                .args(["bake", "--tag", "other:1", "-f"])
                .arg(dir.path().join("Base"))
                .arg(dir.path()),
        );
        fs::read(home.path().join("store/index.json")).unwrap()
    };
    let mut child = graven(home.path())
        .args(["bake", "--tag", "c:1"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = gate(home.path()).join("started");
    wait_for(Duration::from_secs(300), "the gate step to start", || {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the bake ended before its gate step: {status}");
        }
        started.exists().then_some(())
    });
    let compressing = temps(home.path());
    // SIGKILL by the PID of the bake this test spawned.
    child.kill().unwrap();
    child.wait().unwrap();
    fs::write(gate(home.path()).join("go"), "").unwrap();
    assert!(
        !compressing.is_empty(),
        "the 96 MiB layer's gzip was still running when the bake was killed"
    );
    assert_eq!(
        fs::read(home.path().join("store/index.json")).unwrap(),
        index_before,
        "nothing is tagged by a bake that did not finish"
    );
    let digest = bake(home.path(), dir.path(), &[])["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_inline_blobs(home.path(), &digest);
    // A clean home whose gate is open already bakes the same image.
    let clean = tempfile::tempdir().unwrap();
    fs::create_dir_all(gate(clean.path())).unwrap();
    fs::write(gate(clean.path()).join("go"), "").unwrap();
    assert_eq!(
        bake(clean.path(), dir.path(), &[])["digest"].as_str(),
        Some(digest.as_str())
    );
    // What the kill left (the blob being written) is gc's, and the image
    // stays whole after it.
    succeed(graven(home.path()).args(["gc"]));
    assert!(temps(home.path()).is_empty(), "{:?}", temps(home.path()));
    assert_inline_blobs(home.path(), &digest);
}

/// A RUN's big layer is gzipped from the snapshot its upper dir became: while its gzip runs,
/// the store holds no uncompressed copy of it (a staged tar), only the blob being written.
#[test]
fn a_run_layer_is_compressed_from_its_snapshot_with_no_uncompressed_copy() {
    let dir = gated_context();
    let home = tempfile::tempdir().unwrap();
    let gate = gate(home.path());
    let mut child = graven(home.path())
        .args(["bake", "--json", "--tag", "c:1"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(300), "the gate step to start", || {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the bake ended before its gate step: {status}");
        }
        gate.join("started").exists().then_some(())
    });
    // A tar has "ustar" at offset 257; the blob being written starts with gzip's magic.
    let tars: Vec<String> = temps(home.path())
        .into_iter()
        .filter(|name| {
            let path = ["store/blobs", "store/blobs/sha256"]
                .iter()
                .map(|d| home.path().join(d).join(name))
                .find(|p| p.exists());
            let mut head = [0u8; 512];
            path.and_then(|p| fs::File::open(p).ok())
                .is_some_and(|mut f| {
                    std::io::Read::read_exact(&mut f, &mut head).is_ok()
                        && &head[257..262] == b"ustar"
                })
        })
        .collect();
    fs::write(gate.join("go"), "").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(tars.is_empty(), "uncompressed copies of a layer: {tars:?}");
    let baked: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_inline_blobs(home.path(), baked["digest"].as_str().unwrap());
}
