//! The image commands against the real binary: `images`, `image inspect`, `image rm`, `gc`.

mod support;

use std::fs;
use std::path::Path;

use support::{graven, succeed};

fn run_json(home: &Path, args: &[&str]) -> serde_json::Value {
    let out = succeed(graven(home).args(args));
    serde_json::from_slice(&out.stdout).expect("json")
}

fn blobs(home: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(home.join("store/blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The digests of the blobs a `gc --json` report lists as removed.
fn removed_digests(report: &serde_json::Value) -> Vec<&str> {
    report["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect()
}

/// Bakes a one-file image whose file holds `content`.
fn bake(home: &Path, tag: &str, content: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("file"), content).unwrap();
    fs::write(
        dir.path().join("Containerfile"),
        "FROM scratch\nCOPY file /file\nLABEL purpose=test\n",
    )
    .unwrap();
    let out = succeed(
        graven(home)
            .args(["bake", "--json", "--tag", tag])
            .arg(dir.path()),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn images_inspect_rm_and_gc() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let keep = bake(h, "keep:1", "kept content");
    let gone = bake(h, "gone:1", "removed content");
    let listed = run_json(h, &["images", "--json"]);
    let tags: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["tag"].as_str().unwrap())
        .collect();
    assert_eq!(tags, ["gone:1", "keep:1"]);
    assert_eq!(listed[1]["digest"], keep["digest"]);
    assert_eq!(listed[1]["size"], keep["size"]);
    assert!(
        listed[1]["created_from"]
            .as_str()
            .unwrap()
            .ends_with("Containerfile")
    );

    let inspect = run_json(h, &["image", "inspect", "keep:1"]);
    assert_eq!(inspect["digest"], keep["digest"]);
    assert_eq!(inspect["config"]["config"]["Labels"]["purpose"], "test");
    assert_eq!(
        inspect["manifest"]["layers"][0]["digest"],
        keep["layers"][0]["digest"]
    );
    assert!(
        inspect["config"].get("created").is_none(),
        "no build timestamp"
    );
    let prefix = &keep["digest"].as_str().unwrap()["sha256:".len()..][..10];
    assert_eq!(
        run_json(h, &["image", "inspect", prefix])["digest"],
        keep["digest"]
    );

    // gc with both tagged frees nothing.
    let report = run_json(h, &["gc", "--json"]);
    assert_eq!(report["blobs"].as_array().unwrap().len(), 0);

    succeed(graven(h).args(["image", "rm", "gone:1"]));
    let again = graven(h).args(["image", "rm", "gone:1"]).output().unwrap();
    assert!(
        !again.status.success(),
        "removing a missing tag is an error"
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("no image is tagged \"gone:1\""));

    // The untagged image's manifest goes; its layer stays while the cache refers to it.
    let report = run_json(h, &["gc", "--json"]);
    let removed = removed_digests(&report);
    assert!(
        removed.contains(&gone["digest"].as_str().unwrap()),
        "{report}"
    );
    let gone_layer = gone["layers"][0]["digest"].as_str().unwrap();
    assert!(!removed.contains(&gone_layer), "a cached layer is a root");
    // Dropping the cache frees the layer; the tagged image keeps every blob.
    let report = run_json(h, &["gc", "--cache", "--json"]);
    let removed = removed_digests(&report);
    assert_eq!(removed, [gone_layer]);
    let left = blobs(h);
    for digest in [
        keep["digest"].as_str().unwrap(),
        keep["layers"][0]["digest"].as_str().unwrap(),
        inspect["manifest"]["config"]["digest"].as_str().unwrap(),
    ] {
        assert!(
            left.contains(&digest["sha256:".len()..].to_owned()),
            "{digest} was freed"
        );
    }
    assert_eq!(
        left.len(),
        3,
        "only keep:1's manifest, config and layer remain"
    );
    // The image still reads back whole.
    assert_eq!(
        run_json(h, &["image", "inspect", "keep:1"])["digest"],
        keep["digest"]
    );
    // A rebuild after gc --cache rebuilds the dropped layer and gives the same digest.
    let rebuilt = bake(h, "gone:1", "removed content");
    assert_eq!(rebuilt["digest"], gone["digest"]);
}

#[test]
fn unknown_references_are_errors() {
    let home = tempfile::tempdir().unwrap();
    for args in [
        &["image", "inspect", "nope:1"][..],
        &[
            "image",
            "export",
            "nope:1",
            "-o",
            "/tmp/graven-never-written.tar",
        ][..],
    ] {
        let out = graven(home.path()).args(args).output().unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("image \"nope:1\" is not in the store"),
            "{args:?}"
        );
    }
    assert!(!Path::new("/tmp/graven-never-written.tar").exists());
}
