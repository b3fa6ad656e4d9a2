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

/// graven baked from a terminal (a pty the test opens, made graven's controlling terminal):
/// the RUN step is in a session of its own, as runc puts a container, so it has no
/// controlling terminal. Before, the step shared graven's session and had the terminal its
/// stderr is on as its own, so it could push keystrokes into the user's shell with TIOCSTI
/// (run once graven exits) or open it through `/dev/tty`.
#[test]
fn a_run_step_has_no_controlling_terminal_even_from_a_terminal() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let home = tempfile::tempdir().unwrap();
    let dir = context();
    let containerfile = format!(
        "{BASE}RUN set -- $(/bin/busybox cat /proc/self/stat); echo \"$7\" > /tty-nr; \
         if (: </dev/tty) 2>/dev/null; then echo reached > /dev-tty; else echo refused > /dev-tty; fi\n"
    );
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two new descriptors into the given ints; both are owned below.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty just returned these descriptors, owned nowhere else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut command = bake(home.path(), dir.path(), &containerfile);
    command
        .stdin(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap())
        .stdout(std::process::Stdio::null());
    // SAFETY: setsid and ioctl are single async-signal-safe syscalls on the child itself;
    // stdin is the pty's slave, which becomes the new session's controlling terminal.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    // The command holds its copies of the slave too: the master reads to its end only once
    // graven's (and its children's) are the last.
    drop((command, slave));
    // The terminal's output (graven's progress) is read until the last slave is closed, so
    // graven never blocks on a full terminal.
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = std::fs::File::from(master).read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    });
    let status = child.wait().unwrap();
    let terminal = reader.join().unwrap();
    assert!(status.success(), "graven bake failed: {terminal}");
    let entries = last_layer(home.path());
    assert!(
        entries.contains(&"tty-nr \"0\\n\"".to_owned()),
        "{entries:?}"
    );
    assert!(
        entries.contains(&"dev-tty \"refused\\n\"".to_owned()),
        "{entries:?}"
    );
}

/// One entry of a layer: path, uid, gid, mode, content.
type LayerEntry = (String, u64, u64, u32, Vec<u8>);

/// The contents of every layer of `tag`, newest last.
fn layers_of(home: &Path, tag: &str) -> Vec<Vec<LayerEntry>> {
    let store = graven::store::Store::open(home).unwrap();
    let image = store.image(&store.resolve(tag).unwrap()).unwrap();
    image
        .manifest
        .layers
        .iter()
        .map(|layer| {
            let blob = store.open_blob(&layer.digest).unwrap();
            let reader: Box<dyn Read> = if layer.media_type.ends_with("gzip") {
                Box::new(flate2::read::GzDecoder::new(blob))
            } else {
                Box::new(blob)
            };
            let mut archive = tar::Archive::new(reader);
            archive
                .entries()
                .unwrap()
                .map(|e| {
                    let mut e = e.unwrap();
                    let mut content = Vec::new();
                    e.read_to_end(&mut content).unwrap();
                    let h = e.header();
                    let path = e.path().unwrap().display().to_string();
                    let path = path.trim_end_matches('/').to_owned();
                    (
                        path,
                        h.uid().unwrap(),
                        h.gid().unwrap(),
                        h.mode().unwrap(),
                        content,
                    )
                })
                .collect()
        })
        .collect()
}

/// A layer's file as text (`None` when the layer lacks it).
fn file_in(layer: &[LayerEntry], path: &str) -> Option<String> {
    layer
        .iter()
        .find(|(p, ..)| p == path)
        .map(|(.., content)| String::from_utf8_lossy(content).into_owned())
}

/// The store's blobs and index, to see that a failed bake left it as it was.
fn store_listing(home: &Path) -> (Vec<String>, Vec<u8>) {
    let mut files: Vec<String> = fs::read_dir(home.join("store/blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    (files, fs::read(home.join("store/index.json")).unwrap())
}

/// A RUN ran as uid 0 with no capability at all, so `chown`, `useradd` and apt's drop to its
/// sandbox user failed. As root in the image it has Docker's default set now
/// (0xa80425fb: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID, SETPCAP,
/// NET_BIND_SERVICE, NET_RAW, SYS_CHROOT, MKNOD, AUDIT_WRITE, SETFCAP), nothing inheritable
/// or ambient; a step that runs as another user has none, as with Docker.
#[test]
fn a_run_step_as_root_has_docker_s_default_capabilities() {
    let home = tempfile::tempdir().unwrap();
    let dir = context();
    let caps = "/bin/busybox grep Cap /proc/self/status";
    let containerfile = format!(
        "{BASE}RUN {caps} > /caps-root && /bin/busybox chown 123:456 /caps-root\n\
         RUN /bin/busybox mkdir -m 777 /out\nUSER 65534\nRUN {caps} > /out/caps-nobody\n"
    );
    succeed(&mut bake(home.path(), dir.path(), &containerfile));
    let layers = layers_of(home.path(), "run:1");
    let root = layers[2].iter().find(|(p, ..)| p == "caps-root").unwrap();
    assert_eq!((root.1, root.2), (123, 456), "chown as root works");
    let text = String::from_utf8_lossy(&root.4);
    for (field, value) in [
        ("CapInh", "0000000000000000"),
        ("CapPrm", "00000000a80425fb"),
        ("CapEff", "00000000a80425fb"),
        ("CapBnd", "00000000a80425fb"),
        ("CapAmb", "0000000000000000"),
    ] {
        assert!(text.contains(&format!("{field}:\t{value}")), "{text}");
    }
    let nobody = file_in(layers.last().unwrap(), "out/caps-nobody").unwrap();
    for field in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(
            nobody.contains(&format!("{field}:\t0000000000000000")),
            "{nobody}"
        );
    }
}

/// With CAP_MKNOD a step makes device nodes, as with Docker; none of them may open (Docker's
/// devices cgroup stops that): not in the root, /tmp, /dev, /dev/shm nor a tmpfs mount. A
/// node of /dev/zero is the probe, so a regression reads zeros, never a disk. The sandbox's
/// own /dev/zero still reads (the control).
#[test]
fn device_nodes_a_run_step_makes_never_open() {
    let home = tempfile::tempdir().unwrap();
    let dir = context();
    let script = "B=/bin/busybox; $B mkdir -p /tmp /srv; \
        for d in / /tmp/ /dev/ /dev/shm/ /srv/; do \
          $B mknod ${d}zero-node c 1 5 || echo \"mknod $d failed\" >> /out; \
          if $B head -c 1 ${d}zero-node | $B wc -c | $B grep -q 1; then echo \"opened $d\" >> /out; \
          else echo \"refused $d\" >> /out; fi; $B rm -f ${d}zero-node; done; \
        $B head -c 3 /dev/zero | $B wc -c >> /out";
    let containerfile = format!(
        "{BASE}RUN --mount=type=tmpfs,target=/srv [\"/bin/busybox\", \"sh\", \"-c\", {}]\n",
        serde_json::to_string(script).unwrap()
    );
    succeed(&mut bake(home.path(), dir.path(), &containerfile));
    let layers = layers_of(home.path(), "run:1");
    let out = file_in(layers.last().unwrap(), "out").unwrap();
    assert_eq!(
        out,
        "refused /\nrefused /tmp/\nrefused /dev/\nrefused /dev/shm/\nrefused /srv/\n3\n"
    );
}

/// With CAP_DAC_OVERRIDE a step passes every file mode, so what keeps it from the kernel's
/// knobs is the mounts: /proc/sys and /sys are read-only (the same value written back, so a
/// regression changes nothing), /proc/timer_list (readable by root with DAC_OVERRIDE) is
/// masked, `mount` and `unshare` are refused,
/// and the host's files are out of reach (`chroot`, which Docker allows a build step, leads
/// nowhere else).
#[test]
fn a_run_step_cannot_write_the_kernel_s_files_or_reach_the_host() {
    let home = tempfile::tempdir().unwrap();
    let dir = context();
    let marker = home.path().join("host-marker");
    fs::write(&marker, "host").unwrap();
    let script = format!(
        "B=/bin/busybox; $B mkdir -p /mnt /chroot/bin; $B cp /bin/busybox /chroot/bin/; \
         v=$($B cat /proc/sys/vm/swappiness); (echo $v > /proc/sys/vm/swappiness) 2>> /out || echo sys-refused >> /out; \
         (echo 0 > /sys/kernel/profiling) 2>> /out || echo sysfs-refused >> /out; \
         echo timer_list=$($B wc -c < /proc/timer_list) >> /out; \
         $B mount -t tmpfs none /mnt 2>/dev/null || echo mount-refused >> /out; \
         $B unshare -m true 2>/dev/null || echo unshare-refused >> /out; \
         $B ls {} 2>/dev/null || echo host-unreachable >> /out; \
         $B chroot /chroot /bin/busybox true && echo chroot-ok >> /out; $B rm -r /chroot",
        marker.display()
    );
    let containerfile = format!(
        "{BASE}RUN [\"/bin/busybox\", \"sh\", \"-c\", {}]\n",
        serde_json::to_string(&script).unwrap()
    );
    succeed(&mut bake(home.path(), dir.path(), &containerfile));
    let layers = layers_of(home.path(), "run:1");
    let out = file_in(layers.last().unwrap(), "out").unwrap();
    let lines: Vec<&str> = out.lines().filter(|l| !l.contains("Read-only")).collect();
    assert_eq!(
        lines,
        [
            "sys-refused",
            "sysfs-refused",
            "timer_list=0",
            "mount-refused",
            "unshare-refused",
            "host-unreachable",
            "chroot-ok"
        ],
        "{out}"
    );
    assert_eq!(out.matches("Read-only file system").count(), 2, "{out}");
}

/// A device node a step leaves would be opened by graven on the host to read it into the
/// layer (a block device: the host's disk), and a FIFO made graven wait forever: both are
/// refused by name, and the store stays as it was. A socket is no content (as with
/// BuildKit) and is left out.
#[test]
fn a_device_node_or_fifo_left_by_a_run_step_is_refused_by_name() {
    let home = tempfile::tempdir().unwrap();
    let dir = context();
    succeed(&mut bake(home.path(), dir.path(), BASE));
    let before = store_listing(home.path());
    for (line, name) in [
        (
            "RUN /bin/busybox mknod /left-node c 1 5",
            "a device node at /left-node",
        ),
        ("RUN /bin/busybox mkfifo /left-fifo", "a fifo at /left-fifo"),
    ] {
        let mut child = bake(home.path(), dir.path(), &format!("{BASE}{line}\n"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A regression waits forever on the FIFO: the bake is stopped by its own PID.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("{line}: the bake did not end");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(!status.success(), "{stderr}");
        assert_eq!(stderr.matches("Containerfile:4:").count(), 1, "{stderr}");
        assert!(stderr.contains(&format!("left {name}")), "{stderr}");
        assert_eq!(
            store_listing(home.path()),
            before,
            "{line} changed the store"
        );
    }
}

/// `RUN --mount` as BuildKit reads it: a cache that persists across bakes and is in no layer,
/// a tmpfs, the context bound read-only (a copy when `rw`, its writes thrown away), and the
/// mount points made only for the step (the base has no /cache, /scratch, /ctx or /run) are
/// not in the layer either. `SOURCE_DATE_EPOCH` is the bake's epoch.
#[test]
fn run_mounts_reach_the_step_and_never_the_layer() {
    let home = tempfile::tempdir().unwrap();
    let dir = context();
    fs::write(dir.path().join("data.txt"), "from the context\n").unwrap();
    let step = |n: u32| {
        format!(
            "{BASE}RUN --mount=type=cache,target=/cache,sharing=locked \
               --mount=type=tmpfs,target=/scratch,size=1M \
               --mount=type=bind,source=data.txt,target=/ctx/data.txt \
               --mount=type=bind,target=/rw,rw \
               [\"/bin/busybox\", \"sh\", \"-c\", \"B=/bin/busybox; echo run{n} >> /cache/runs; \
               $B cat /cache/runs > /seen-cache; $B grep -c ' /scratch tmpfs' /proc/mounts > /seen-tmpfs; \
               $B cat /ctx/data.txt > /seen-bind; (echo x > /ctx/data.txt) 2>/dev/null || echo refused > /seen-ro; \
               echo kept-out > /rw/written; echo $SOURCE_DATE_EPOCH > /seen-epoch\"]\n"
        )
    };
    succeed(bake(home.path(), dir.path(), &step(1)).env("SOURCE_DATE_EPOCH", "1700000000"));
    succeed(bake(home.path(), dir.path(), &step(2)).env("SOURCE_DATE_EPOCH", "1700000000"));
    let layers = layers_of(home.path(), "run:1");
    let last = layers.last().unwrap();
    let paths: Vec<&str> = last.iter().map(|(p, ..)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "seen-bind",
            "seen-cache",
            "seen-epoch",
            "seen-ro",
            "seen-tmpfs"
        ]
    );
    assert_eq!(file_in(last, "seen-cache").unwrap(), "run1\nrun2\n");
    assert_eq!(file_in(last, "seen-tmpfs").unwrap(), "1\n");
    assert_eq!(file_in(last, "seen-bind").unwrap(), "from the context\n");
    assert_eq!(file_in(last, "seen-ro").unwrap(), "refused\n");
    assert_eq!(file_in(last, "seen-epoch").unwrap(), "1700000000\n");
    assert!(
        !dir.path().join("written").exists(),
        "a rw bind wrote the context"
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("data.txt")).unwrap(),
        "from the context\n",
        "a read-only bind was written"
    );
    let caches: Vec<_> = fs::read_dir(home.path().join("bake-mounts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.ends_with(".lock"))
        .collect();
    assert_eq!(caches.len(), 1, "{caches:?}");
}

/// What a bind mount shows a step is one of its inputs: a changed file of the context runs
/// the step again (BuildKit's key has the mount's content too), an unchanged one is cached.
#[test]
fn a_changed_bind_mounted_file_runs_the_step_again() {
    let home = tempfile::tempdir().unwrap();
    let dir = context();
    let containerfile = format!(
        "{BASE}RUN --mount=type=bind,source=data.txt,target=/data.txt /bin/busybox cp /data.txt /seen\n"
    );
    let seen = |content: &str| {
        fs::write(dir.path().join("data.txt"), content).unwrap();
        let out = succeed(&mut bake(home.path(), dir.path(), &containerfile));
        let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let layers = layers_of(home.path(), "run:1");
        let seen = file_in(layers.last().unwrap(), "seen").unwrap();
        (seen, result["cached_steps"].as_u64().unwrap())
    };
    assert_eq!(seen("one\n"), ("one\n".to_owned(), 1));
    assert_eq!(seen("two\n"), ("two\n".to_owned(), 3));
    assert_eq!(seen("two\n"), ("two\n".to_owned(), 4));
}

/// A RUN resolves names as the host does: the host's resolv.conf and hosts are bound into
/// the step, read-only, and are never in its layer: on a base whose /etc lacks them the mount
/// points made for them are gone again; on a base with its own resolv.conf the image keeps
/// its own. A base without /etc gets none (so `mkdir /etc` works, as
/// `user_lookup_reads_the_images_passwd_not_the_hosts` does).
#[test]
fn the_host_s_resolv_conf_and_hosts_reach_the_step_only() {
    let home = tempfile::tempdir().unwrap();
    let dir = context();
    fs::write(dir.path().join("resolv.conf"), "nameserver 192.0.2.1\n").unwrap();
    let host = fs::read_to_string("/etc/resolv.conf").unwrap();
    let hosts = fs::read_to_string("/etc/hosts").unwrap();
    let containerfile = format!(
        "{BASE}RUN /bin/busybox mkdir /etc\n\
         RUN /bin/busybox cat /etc/resolv.conf > /seen-resolv && /bin/busybox cat /etc/hosts > /seen-hosts\n\
         COPY resolv.conf /etc/resolv.conf\n\
         RUN /bin/busybox cat /etc/resolv.conf > /seen-again; (echo x > /etc/resolv.conf) 2>/dev/null || echo refused > /write\n"
    );
    succeed(&mut bake(home.path(), dir.path(), &containerfile));
    let layers = layers_of(home.path(), "run:1");
    assert_eq!(
        layers[2].iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
        ["etc"]
    );
    let first = &layers[3];
    let paths: Vec<&str> = first.iter().map(|(p, ..)| p.as_str()).collect();
    assert_eq!(paths, ["seen-hosts", "seen-resolv"]);
    assert_eq!(file_in(first, "seen-resolv").unwrap(), host);
    assert_eq!(file_in(first, "seen-hosts").unwrap(), hosts);
    let last = layers.last().unwrap();
    let paths: Vec<&str> = last.iter().map(|(p, ..)| p.as_str()).collect();
    assert_eq!(paths, ["seen-again", "write"]);
    assert_eq!(file_in(last, "seen-again").unwrap(), host);
    assert_eq!(file_in(last, "write").unwrap(), "refused\n");
}

/// A RUN has the host's network (`docker build --network=host`), and `--network=none` a
/// namespace of its own with only a loopback device.
#[test]
fn run_network_is_the_host_s_unless_none() {
    let home = tempfile::tempdir().unwrap();
    let dir = context();
    // The namespace's identity, not its devices: other tests add and remove veths meanwhile.
    let host = fs::read_link("/proc/self/ns/net").unwrap();
    let containerfile = format!(
        "{BASE}RUN /bin/busybox readlink /proc/self/ns/net > /host-net\n\
         RUN --network=none /bin/busybox readlink /proc/self/ns/net > /own-net; \
         /bin/busybox cat /proc/net/dev > /no-net\n"
    );
    succeed(&mut bake(home.path(), dir.path(), &containerfile));
    let layers = layers_of(home.path(), "run:1");
    let seen = file_in(&layers[layers.len() - 2], "host-net").unwrap();
    assert_eq!(seen.trim(), host.to_str().unwrap());
    let own = file_in(layers.last().unwrap(), "own-net").unwrap();
    assert!(own.starts_with("net:["), "{own}");
    assert_ne!(own.trim(), host.to_str().unwrap());
    let none = file_in(layers.last().unwrap(), "no-net").unwrap();
    let devices: Vec<&str> = none
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(devices, ["lo"], "{none}");
}

/// `graven bake --secret id=ID,src=PATH` (or `env=VAR`) reaches the step at /run/secrets/ID
/// (or its target), read-only, and nowhere else: not in a layer, a config, a cache record,
/// progress or `--json`. The step proves it read it with a hash.
#[test]
fn a_secret_reaches_its_step_and_nothing_else() {
    use sha2::Digest as _;
    let home = tempfile::tempdir().unwrap();
    let dir = context();
    let value = format!("s3cr3t-{}", std::process::id());
    let secret_file = home.path().join("token");
    fs::write(&secret_file, &value).unwrap();
    let containerfile = format!(
        "{BASE}RUN --mount=type=secret,id=token --mount=type=secret,id=key,target=/etc/key,mode=0440 \
         --mount=type=secret,id=absent,required=false \
         [\"/bin/busybox\", \"sh\", \"-c\", \"B=/bin/busybox; $B sha256sum < /run/secrets/token > /token-sum; \
         $B sha256sum < /etc/key > /key-sum; $B stat -c %a /etc/key > /key-mode; \
         (echo x > /run/secrets/token) 2>/dev/null || echo refused > /write\"]\n"
    );
    let mut command = bake(home.path(), dir.path(), &containerfile);
    command
        .arg("--secret")
        .arg(format!("id=token,src={}", secret_file.display()))
        .args(["--secret", "id=key,env=GRAVEN_TEST_KEY"])
        .env("GRAVEN_TEST_KEY", &value);
    let out = succeed(&mut command);
    let sum = format!(
        "{}  -\n",
        hex::encode(sha2::Sha256::digest(value.as_bytes()))
    );
    let layers = layers_of(home.path(), "run:1");
    let last = layers.last().unwrap();
    assert_eq!(file_in(last, "token-sum").unwrap(), sum);
    assert_eq!(file_in(last, "key-sum").unwrap(), sum);
    assert_eq!(file_in(last, "key-mode").unwrap(), "440\n");
    assert_eq!(file_in(last, "write").unwrap(), "refused\n");
    let paths: Vec<&str> = last.iter().map(|(p, ..)| p.as_str()).collect();
    assert_eq!(paths, ["key-mode", "key-sum", "token-sum", "write"]);
    for (what, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        assert!(
            !String::from_utf8_lossy(bytes).contains(&value),
            "the secret is in {what}"
        );
    }
    // Every file graven keeps, layers decompressed, holds no trace of it.
    let mut stack = vec![home.path().to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path == secret_file {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let raw = fs::read(&path).unwrap();
            let mut plain = Vec::new();
            let _ = flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut plain);
            for bytes in [&raw, &plain] {
                assert!(
                    !String::from_utf8_lossy(bytes).contains(&value),
                    "the secret is in {}",
                    path.display()
                );
            }
        }
    }
}

/// Every misuse of `RUN --mount`, `--network` or `graven bake --secret` is one error naming
/// the Containerfile's line once (the command line's own flag: no line), and the store stays
/// as it was.
#[test]
fn misused_run_mounts_and_secrets_fail_once_and_keep_the_store() {
    let home = tempfile::tempdir().unwrap();
    let dir = context();
    fs::write(dir.path().join("data.txt"), "x").unwrap();
    std::os::unix::fs::symlink("/etc", dir.path().join("escape")).unwrap();
    succeed(&mut bake(home.path(), dir.path(), BASE));
    let before = store_listing(home.path());
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "RUN --mount=type=volume,target=/v true",
            &[],
            "type=volume: expected bind, cache, secret or tmpfs",
        ),
        (
            "RUN --mount=type=cache true",
            &[],
            "a cache mount needs a target",
        ),
        (
            "RUN --mount=type=tmpfs,target=/x,mode=0700 true",
            &[],
            "mode is not an option of type=tmpfs",
        ),
        (
            "RUN --network=bridge true",
            &[],
            "--network=bridge: expected default, host or none",
        ),
        (
            "RUN --security=insecure true",
            &[],
            "unknown flag --security for RUN",
        ),
        (
            "RUN --mount=type=secret,id=token true",
            &[],
            "secret token was not given",
        ),
        (
            "RUN --mount=type=bind,source=missing,target=/m true",
            &[],
            "--mount source missing: source \"missing\" does not exist in the build context",
        ),
        (
            "RUN --mount=type=bind,source=escape/passwd,target=/m true",
            &[],
            "--mount source escape/passwd: ",
        ),
        (
            "RUN --mount=type=bind,from=builder,target=/m true",
            &[],
            "--mount from=builder: no image of that name",
        ),
        (
            "RUN --mount=type=secret,id=token true",
            &["--secret", "id=token,env=GRAVEN_TEST_UNSET_VARIABLE"],
            "the environment variable GRAVEN_TEST_UNSET_VARIABLE is not set",
        ),
    ];
    for (line, extra, expected) in cases {
        let out = bake(home.path(), dir.path(), &format!("{BASE}{line}\n"))
            .args(*extra)
            .env_remove("GRAVEN_TEST_UNSET_VARIABLE")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{line}: {stderr}");
        assert_eq!(
            stderr.matches("Containerfile:4:").count(),
            1,
            "{line}: {stderr}"
        );
        assert!(stderr.contains(expected), "{line}: {stderr}");
        assert_eq!(
            store_listing(home.path()),
            before,
            "{line} changed the store"
        );
    }
    for (flag, expected) in [
        ("id=token", "it needs exactly one of src=PATH and env=VAR"),
        ("src=/etc/hostname", "it needs id=ID"),
        ("id=token,src=/no/such/file", "/no/such/file is not a file"),
    ] {
        let out = bake(home.path(), dir.path(), &format!("{BASE}RUN true\n"))
            .args(["--secret", flag])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag}: {stderr}");
        assert!(stderr.contains(expected), "{flag}: {stderr}");
        assert_eq!(
            store_listing(home.path()),
            before,
            "{flag} changed the store"
        );
    }
}

/// What a Dockerfile user expects of RUN on a Debian base (debootstrap's, see
/// `support::debian_base`): `apt-get update && apt-get install` (apt drops to its `_apt` user:
/// setgroups and setuid, which failed with no capability), `useradd` (writes /etc/shadow as
/// root: DAC_OVERRIDE) and `chown` to it, names resolved through the host's resolv.conf and
/// hosts, which are bound for the step only: never in a layer, whether the image lacks the
/// file (the mount point made for it goes) or has its own (which stays the image's).
#[test]
fn apt_get_install_and_useradd_work_on_a_debian_base() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("resolv.conf"), "nameserver 192.0.2.1\n").unwrap();
    let containerfile = format!(
        "FROM docker-archive:{}\n\
         RUN apt-get update\n\
         RUN useradd -m app && mkdir /srv/app && chown app:app /srv/app && touch /srv/app/owned && chown app /srv/app/owned\n\
         COPY resolv.conf /etc/resolv.conf\n\
         RUN apt-get install -y --no-install-recommends netbase && rm -rf /var/lib/apt/lists/*\n",
        support::debian_base().display()
    );
    succeed(&mut bake(home.path(), dir.path(), &containerfile));
    let layers = layers_of(home.path(), "run:1");
    assert_eq!(layers.len(), 5);
    let (update, users, copied, install) = (&layers[1], &layers[2], &layers[3], &layers[4]);
    assert!(
        update
            .iter()
            .any(|(p, ..)| p.starts_with("var/lib/apt/lists/deb.debian.org")),
        "apt-get update fetched no list"
    );
    let passwd = file_in(users, "etc/passwd").unwrap();
    let uid: u64 = passwd
        .lines()
        .find_map(|l| l.strip_prefix("app:x:"))
        .and_then(|rest| rest.split(':').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(file_in(users, "etc/shadow").unwrap().contains("app:"));
    for path in ["srv/app", "srv/app/owned", "home/app"] {
        let entry = users.iter().find(|(p, ..)| p == path).unwrap();
        assert_eq!(entry.1, uid, "{path} is not app's");
    }
    assert!(
        file_in(install, "etc/services").is_some(),
        "netbase is not installed"
    );
    for (name, layer) in [("update", update), ("useradd", users), ("install", install)] {
        for host_file in ["etc/resolv.conf", "etc/hosts"] {
            assert!(
                layer.iter().all(|(p, ..)| p != host_file),
                "{host_file} is in the {name} layer"
            );
        }
    }
    assert_eq!(
        file_in(copied, "etc/resolv.conf").unwrap(),
        "nameserver 192.0.2.1\n"
    );
}

#[test]
fn a_bind_mount_from_a_stage_shows_that_stage_and_is_keyed_by_it() {
    let home = tempfile::tempdir().unwrap();
    let dir = context();
    let file = |word: &str| {
        format!(
            "FROM scratch AS tools\nCOPY busybox /bin/busybox\nCOPY busybox /bin/sh\n\
             RUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo {word} > /made\"]\n\
             {BASE}RUN --mount=type=bind,from=tools,source=/made,target=/mnt/made \
             /bin/busybox cp /mnt/made /copied\n"
        )
    };
    let out = succeed(&mut bake(home.path(), dir.path(), &file("first")));
    let entries = last_layer(home.path());
    assert!(
        entries.contains(&"copied \"first\\n\"".to_owned()),
        "{entries:?}"
    );
    assert!(
        !entries.iter().any(|e| e.starts_with("mnt")),
        "the mount point is not content: {entries:?}"
    );
    let baked: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Another word in the source stage is another key for the step that binds it.
    succeed(&mut bake(home.path(), dir.path(), &file("second")));
    let entries = last_layer(home.path());
    assert!(
        entries.contains(&"copied \"second\\n\"".to_owned()),
        "{entries:?}"
    );
    // The unchanged file again: every step cached.
    let again = succeed(&mut bake(home.path(), dir.path(), &file("first")));
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["digest"], baked["digest"]);
    assert_eq!(again["cached_steps"], again["total_steps"]);
}
