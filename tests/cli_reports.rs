//! What the image and instance commands report, through the real binary: every command that
//! reports something takes `--json` and prints JSON with it; the short digests `graven
//! images` and `graven releases` print name an image wherever one is asked for, tagged or
//! not; `graven ps` shows which app and environment a controller's instance belongs to.

mod support;

use std::path::Path;

use support::daemon::{RemoveInstancesOnDrop, Up, run, run_ok, v1_project};

fn json(home: &Path, args: &[&str]) -> serde_json::Value {
    let (stdout, _) = run_ok(home, args);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

/// Regression (issue 11, item 6): `graven image inspect --json` was refused, and `image
/// export`, `image rm` and `rm` had no JSON to give.
#[test]
fn every_command_that_reports_takes_json() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    let _cleanup = RemoveInstancesOnDrop(home.clone());
    let digest = support::runtime::hello_image(&home).to_string();

    let context = temp.path().join("context");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::write(
        context.join("Containerfile"),
        "FROM hello:test\nLABEL a=b\n",
    )
    .unwrap();
    let baked = json(
        &home,
        &[
            "bake",
            "--json",
            "--tag",
            "child:1",
            context.to_str().unwrap(),
        ],
    );
    assert!(baked["digest"].is_string());
    assert_eq!(
        json(&home, &["images", "--json"]).as_array().unwrap().len(),
        2
    );
    assert_eq!(
        json(&home, &["image", "inspect", "--json", "hello:test"])["digest"],
        digest
    );
    let archive = temp.path().join("hello.tar");
    let exported = json(
        &home,
        &[
            "image",
            "export",
            "--json",
            "hello:test",
            "-o",
            archive.to_str().unwrap(),
        ],
    );
    assert_eq!(exported["digest"], digest);
    assert_eq!(exported["format"], "oci");
    assert_eq!(
        exported["bytes"].as_u64().unwrap(),
        std::fs::metadata(&archive).unwrap().len()
    );
    let removed = json(&home, &["image", "rm", "--json", "child:1"]);
    assert_eq!(removed["tag"], "child:1");
    assert_eq!(removed["digest"], baked["digest"]);

    let started = json(&home, &["run", "-d", "--json", "hello:test"]);
    let id = started["id"].as_str().unwrap().to_owned();
    let listed = json(&home, &["ps", "--json"]);
    assert_eq!(listed[0]["id"], id.as_str());
    assert!(listed[0]["labels"].is_object());
    let stopped = json(&home, &["stop", "--json", "--grace", "5s", &id]);
    assert_eq!(stopped["status"]["state"], "exited");
    assert_eq!(json(&home, &["rm", "--json", &id]), serde_json::json!([id]));

    for args in [&["gc", "--dry-run", "--json"][..], &["gc", "--json"]] {
        let report = json(&home, args);
        for key in ["blobs", "roots", "instance_dirs"] {
            assert!(report[key].is_array(), "{args:?}: {report}");
        }
        assert!(report["freed_bytes"].is_u64(), "{report}");
    }
}

/// Regression (issue 11, item 6): the short digests `graven releases` prints did not resolve
/// when the image had no tag (a release's image is tagged only while it is the newest).
#[test]
fn short_digests_of_untagged_images_resolve_everywhere_an_image_is_named() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    let _cleanup = RemoveInstancesOnDrop(home.clone());
    let digest = support::runtime::hello_image(&home).to_string();
    run_ok(&home, &["image", "rm", "hello:test"]);
    let short = digest["sha256:".len()..][..12].to_owned();
    assert!(
        json(&home, &["images", "--json"])
            .as_array()
            .unwrap()
            .is_empty()
    );

    for reference in [short.clone(), format!("sha256:{short}")] {
        assert_eq!(
            json(&home, &["image", "inspect", &reference])["digest"],
            digest,
            "{reference}"
        );
    }
    let archive = temp.path().join("out.tar");
    run_ok(
        &home,
        &["image", "export", &short, "-o", archive.to_str().unwrap()],
    );
    assert!(archive.is_file());
    let started = json(&home, &["run", "-d", "--json", &short]);
    assert_eq!(started["image"], digest);
    run_ok(&home, &["rm", "-f", started["id"].as_str().unwrap()]);
    // Too short to be taken for a digest.
    let (ok, _, stderr) = run(&home, &["image", "inspect", &short[..5]]);
    assert!(!ok);
    assert!(stderr.contains("is not in the store"), "{stderr}");
}

/// Regression (issue 11, item 6): `graven ps` did not say which app and environment an
/// instance belonged to, and instance names repeat across them.
#[test]
fn ps_shows_the_app_and_environment_of_a_controllers_instances() {
    let (_temp, home, dir, _route) = v1_project(1);
    let _up = Up::start(&home, &dir, "local");
    let listed = json(&home, &["ps", "--json"]);
    let instance = &listed.as_array().unwrap()[0];
    assert_eq!(instance["labels"]["app"], "demo");
    assert_eq!(instance["labels"]["environment"], "local");
    let (stdout, _) = run_ok(&home, &["ps"]);
    let mut lines = stdout.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&header[..4], ["ID", "APP", "ENV", "NAME"]);
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(row[1..3], ["demo", "local"], "{stdout}");
    assert!(row[3].starts_with("web-1-"), "{stdout}");
}
