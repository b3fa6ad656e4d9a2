//! RUN steps run in the sandbox inside the image's root filesystem: an image FROM scratch with
//! busybox as /bin/sh runs shell commands whose file changes become a layer (whiteouts for
//! removals); a failing RUN names file, line and exit status and leaves the store as it was.

mod support;

use std::fs;
use std::io::Read;
use std::path::Path;

use support::{graven, succeed};

fn context() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::copy(support::busybox(), dir.path().join("busybox")).unwrap();
    dir
}

/// Writes `containerfile` into `dir` and returns `graven bake --json --tag run:1 <dir>`.
fn bake(home: &Path, dir: &Path, containerfile: &str) -> std::process::Command {
    fs::write(dir.join("Containerfile"), containerfile).unwrap();
    let mut command = graven(home);
    command.args(["bake", "--json", "--tag", "run:1"]).arg(dir);
    command
}

/// The last layer's entries with their content.
fn last_layer(home: &Path) -> Vec<String> {
    layer(home, |count| count - 1)
}

/// The entries of one layer (`which` picks it from the layer count) with their content.
fn layer(home: &Path, which: impl FnOnce(usize) -> usize) -> Vec<String> {
    let store = graven::store::Store::open(home).unwrap();
    let image = store.image(&store.resolve("run:1").unwrap()).unwrap();
    let layer = &image.manifest.layers[which(image.manifest.layers.len())];
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
            format!("{} {:?}", e.path().unwrap().display(), content)
        })
        .collect()
}

const BASE: &str = "FROM scratch\nCOPY busybox /bin/busybox\nCOPY busybox /bin/sh\n";

#[test]
fn run_changes_become_a_layer() {
    let home = tempfile::tempdir().unwrap();
    let dir = context();
    let containerfile = format!(
        "{BASE}ENV WHO=world\nRUN /bin/busybox mkdir -p /etc && echo \"hello $WHO\" > /etc/greeting\nRUN [\"/bin/busybox\", \"rm\", \"/bin/sh\"]\n"
    );
    let out = succeed(&mut bake(home.path(), dir.path(), &containerfile));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["layers"].as_array().unwrap().len(), 4);
    assert_eq!(last_layer(home.path()), ["bin/.wh.sh \"\""]);
    // The greeting, and only it: the mount points the sandbox made (/dev, /proc, /sys) are
    // not content.
    assert_eq!(
        layer(home.path(), |_| 2),
        ["etc/ \"\"", "etc/greeting \"hello world\\n\""]
    );
    // A rebuild takes every RUN from the cache.
    let again = bake(home.path(), dir.path(), &containerfile)
        .output()
        .unwrap();
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["cached_steps"], again["total_steps"]);
    assert_eq!(again["digest"], result["digest"]);
}

#[test]
fn a_failing_run_names_file_line_and_status_and_keeps_the_store() {
    let home = tempfile::tempdir().unwrap();
    let dir = context();
    succeed(&mut bake(home.path(), dir.path(), BASE));
    let list = |home: &Path| {
        let mut files: Vec<String> = fs::read_dir(home.join("store/blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        (files, fs::read(home.join("store/index.json")).unwrap())
    };
    let before = list(home.path());
    let out = bake(
        home.path(),
        dir.path(),
        &format!("{BASE}RUN echo partial > /partial\nRUN exit 3\n"),
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Containerfile:5:"), "{stderr}");
    assert!(stderr.contains("exit status 3"), "{stderr}");
    assert_eq!(list(home.path()), before, "a failed RUN changed the store");
}

/// `docker build` keeps what a RUN writes under /tmp; so does graven (it once mounted a
/// tmpfs there, as for instances, and the files were lost). A base without /tmp gets none
/// made for it, as with docker.
#[test]
fn what_run_writes_under_tmp_is_in_the_layer() {
    let home = tempfile::tempdir().unwrap();
    let dir = context();
    support::succeed(&mut bake(
        home.path(),
        dir.path(),
        &format!(
            "{BASE}RUN /bin/busybox ls -d /tmp || echo no-tmp > /no-tmp\nRUN /bin/busybox mkdir -m 1777 /tmp && echo kept > /tmp/kept\n"
        ),
    ));
    assert_eq!(
        last_layer(home.path()),
        ["tmp/ \"\"", "tmp/kept \"kept\\n\""]
    );
    assert_eq!(
        layer(home.path(), |_| 2),
        ["no-tmp \"no-tmp\\n\""],
        "the base had no /tmp and got none"
    );
}

/// `exec 7</dir 9>>file; graven bake …` with `RUN cat /proc/self/fd/7/secret` read the
/// host's files as uid 0: the baker's open files reached the RUN step. Only stdin, stdout,
/// stderr (and ls's own listing) are open in it now; the host's device nodes are not the
/// step's to chmod or touch either (it runs as root).
#[test]
fn a_run_step_holds_none_of_the_baker_s_files_or_devices() {
    let home = tempfile::tempdir().unwrap();
    let dir = context();
    let stray = support::StrayFds::new(home.path());
    let script = serde_json::to_string(support::TOUCH_DEVICES).unwrap();
    let containerfile = format!(
        "{BASE}RUN /bin/busybox ls /proc/self/fd > /fds\nRUN [\"/bin/busybox\", \"sh\", \"-c\", {script}]\n"
    );
    let before = support::host_devices();
    let mut command = bake(home.path(), dir.path(), &containerfile);
    stray.hand_to(&mut command);
    let out = succeed(&mut command);
    assert_eq!(
        layer(home.path(), |count| count - 2),
        ["fds \"0\\n1\\n2\\n3\\n\""]
    );
    assert_eq!(
        support::host_devices(),
        before,
        "the host's device nodes changed"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains('5'),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A RUN step had no process limit at all; it has an instance's default now. The probe
/// starts threads until one is refused.
#[test]
fn a_fork_bomb_in_a_run_step_stops_at_the_process_limit() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fs::copy(support::runtime::probe_binary(), dir.path().join("probe")).unwrap();
    let out = succeed(&mut bake(
        home.path(),
        dir.path(),
        "FROM scratch\nCOPY probe /probe\nRUN [\"/probe\", \"threads\", \"10000\"]\n",
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!("threads={}", graven::sandbox::DEFAULT_PIDS - 1);
    assert!(stderr.contains(&expected), "{stderr}");
}

/// A RUN gets `HOME` as Docker's builder gives it: the user's from the image's passwd, else
/// `/root` for root; one the Containerfile sets wins.
#[test]
fn a_run_step_has_home() {
    let home = tempfile::tempdir().unwrap();
    let dir = context();
    fs::write(
        dir.path().join("passwd"),
        "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
    )
    .unwrap();
    let containerfile = format!(
        "{BASE}COPY passwd /etc/passwd\nRUN echo \"root $HOME\" > /seen-root\n\
         RUN /bin/busybox mkdir -m 777 /out\nUSER app\nRUN echo \"app $HOME\" > /out/seen-app\n"
    );
    succeed(&mut bake(home.path(), dir.path(), &containerfile));
    let store = graven::store::Store::open(home.path()).unwrap();
    let image = store.image(&store.resolve("run:1").unwrap()).unwrap();
    let all: Vec<String> = (0..image.manifest.layers.len())
        .flat_map(|i| layer(home.path(), |_| i))
        .collect();
    assert!(
        all.contains(&"seen-root \"root /root\\n\"".to_owned()),
        "{all:?}"
    );
    assert!(
        all.contains(&"out/seen-app \"app /home/app\\n\"".to_owned()),
        "{all:?}"
    );
}
