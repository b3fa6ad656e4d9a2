//! Regression: when the status pipe's write end happened to be fd 3 in the caller, dup2 onto
//! fd 3 did nothing and left it close-on-exec, so the helper never got its status pipe and a
//! good sandbox failed to start. A process of its own, because it rearranges its descriptors.

mod support;

use std::process::Stdio;

use graven::sandbox::{self, SandboxSpec};

#[test]
fn a_status_pipe_that_lands_on_fd_3_still_reaches_the_helper() {
    sandbox::set_helper_binary(support::graven_bin());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(support::runtime::probe_binary(), root.join("probe")).unwrap();
    // SAFETY: this test binary runs this one test; it frees fd 0 and fd 3 so the next pipe
    // is (0, 3): read end 0, write end 3.
    unsafe {
        if libc::fcntl(3, libc::F_GETFD) >= 0 {
            let moved = libc::fcntl(3, libc::F_DUPFD_CLOEXEC, 10);
            assert!(moved >= 10);
            libc::close(3);
        }
        libc::close(0);
    }
    let spec = SandboxSpec {
        rootfs: root,
        writable_root: false,
        args: vec!["/probe".into(), "report".into()],
        env: Vec::new(),
        cwd: "/".into(),
        uid: 65534,
        gid: 65534,
        hostname: "fd3".into(),
        binds: Vec::new(),
        tmp_bytes: 0,
        tmpfs: Vec::new(),
        exec_tmp: false,
        build_step: None,
    };
    let status = sandbox::run(&spec, Stdio::null(), Stdio::null()).expect("the sandbox starts");
    assert!(status.success());
}
