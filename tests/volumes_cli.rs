//! Named volumes as persistent data: `graven volumes` lists them with their size and the
//! instances that hold them; `graven volume rm` and `graven volume export` refuse a volume a
//! live instance holds and work once it is free; `graven down` never deletes one.

mod support;

use support::daemon::{Up, free_port, hello_project, run, run_ok};

fn volumes(home: &std::path::Path) -> Vec<serde_json::Value> {
    let (stdout, _) = run_ok(home, &["volumes", "--json"]);
    serde_json::from_str(&stdout).unwrap()
}

#[test]
fn volumes_are_listed_with_holders_refused_while_held_and_kept_by_down() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    hello_project(
        &dir,
        free_port(),
        1,
        r#"VERSION = "v1""#,
        r#"volumes = { data = "/data" }"#,
    );
    let up = Up::start(&home, &dir, "local");
    // What the app would have written.
    std::fs::write(home.join("volumes/data/orders.db"), vec![7u8; 10_000]).unwrap();

    let listed = volumes(&home);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["name"], "data");
    assert!(listed[0]["bytes"].as_u64().unwrap() >= 10_000);
    let holders: Vec<&str> = listed[0]["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["instance"].as_str().unwrap())
        .collect();
    assert_eq!(holders.len(), 1, "its one instance holds it: {holders:?}");
    assert!(holders.iter().all(|h| h.starts_with("web-")), "{holders:?}");
    let (stdout, _) = run_ok(&home, &["volumes"]);
    assert!(
        stdout.contains("data") && stdout.contains(holders[0]),
        "{stdout}"
    );

    // In use: neither removed nor exported, and nothing touched.
    let (ok, _, stderr) = run(&home, &["volume", "rm", "data"]);
    assert!(!ok && stderr.contains("in use by"), "{stderr}");
    let tar = temp.path().join("data.tar");
    let (ok, _, stderr) = run(
        &home,
        &["volume", "export", "data", "-o", tar.to_str().unwrap()],
    );
    assert!(!ok && stderr.contains("in use by"), "{stderr}");
    assert!(!tar.exists(), "no partial file");
    assert!(home.join("volumes/data/orders.db").exists());

    // Down stops every instance and keeps the volume, with its data.
    run_ok(&home, &["down"]);
    assert_eq!(
        std::fs::read(home.join("volumes/data/orders.db")).unwrap(),
        vec![7u8; 10_000]
    );
    let listed = volumes(&home);
    assert_eq!(
        listed[0]["holders"].as_array().unwrap().len(),
        0,
        "{listed:?}"
    );

    // Free: exported (the tar holds the file), then removed.
    run_ok(
        &home,
        &["volume", "export", "data", "-o", tar.to_str().unwrap()],
    );
    let mut archive = tar::Archive::new(std::fs::File::open(&tar).unwrap());
    let names: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert!(names.iter().any(|n| n.ends_with("orders.db")), "{names:?}");
    let (stdout, _) = run_ok(&home, &["volume", "rm", "data"]);
    assert!(stdout.contains("removed volume data"), "{stdout}");
    assert!(volumes(&home).is_empty());
    let (ok, _, stderr) = run(&home, &["volume", "rm", "data"]);
    assert!(!ok && stderr.contains("no such volume"), "{stderr}");
    let (ok, _, stderr) = run(&home, &["volume", "rm", "../instances"]);
    assert!(!ok && stderr.contains("no such volume"), "{stderr}");
    drop(up);
}
