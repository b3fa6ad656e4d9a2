//! The default seccomp filter, built with `seccompiler`: a deny-list of the syscalls a
//! workload has no business making (mounts, modules, kexec, bpf, tracing, keyrings, new
//! namespaces, clock and swap changes, io_uring), answered with EPERM so programs see a plain refusal.
//! `clone3` gets ENOSYS instead: its flags live in memory a filter cannot read, and ENOSYS
//! makes libc fall back to `clone`, whose namespace flags the filter does check.
//!
//! No weaker than Docker's default profile (moby's `profiles/seccomp/default.json`) for the
//! capabilities a sandbox holds (none for an instance, Docker's default set for a build step):
//! what that profile refuses without `CAP_SYS_ADMIN`, `CAP_SYS_PTRACE`, `CAP_SYS_NICE`,
//! `CAP_SYS_RAWIO`, `CAP_SYSLOG`, `CAP_SYS_TTY_CONFIG` or `CAP_SYS_TIME` is refused here too,
//! `personality` only takes the values it allows, and `ptrace` is refused where Docker allows
//! it. The one difference between the two: a build step may `chroot`, as Docker's profile lets
//! a holder of `CAP_SYS_CHROOT` (the step is pivot_rooted with nothing of the host left open,
//! so a chroot cannot lead out of it).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Syscalls refused outright.
const DENIED: &[i64] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_acct,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_quotactl,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_fsconfig,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_userfaultfd,
    // io_uring runs requests in kernel threads that seccomp never sees, and has been a
    // steady source of kernel exploits; Docker's default profile refuses it too.
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_syslog,
    libc::SYS_vhangup,
    libc::SYS_mount_setattr,
    libc::SYS_fanotify_init,
    libc::SYS_lookup_dcookie,
    libc::SYS_kcmp,
    libc::SYS_pidfd_getfd,
    libc::SYS_get_mempolicy,
    libc::SYS_set_mempolicy,
    libc::SYS_mbind,
    libc::SYS_move_pages,
    libc::SYS_migrate_pages,
    libc::SYS_uselib,
    libc::SYS_ustat,
    libc::SYS_sysfs,
    #[cfg(target_arch = "x86_64")]
    libc::SYS__sysctl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
];

/// `clone` flags that would make a new namespace.
const NAMESPACE_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];

/// The `personality` values Docker's profile allows: Linux itself, `UNAME26`, `PER_LINUX32`,
/// both, and the query. Others (`ADDR_NO_RANDOMIZE`, `READ_IMPLIES_EXEC`) weaken the process.
const PERSONALITIES: [u64; 5] = [0x0, 0x0008, 0x20000, 0x20008, 0xffff_ffff];

fn arch() -> Result<TargetArch, String> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| format!("no seccomp filter for {}", std::env::consts::ARCH))
}

/// The compiled filters, in the order they are installed; `build_step` allows `chroot`.
pub(super) fn filters(build_step: bool) -> Result<Vec<BpfProgram>, String> {
    let fail = |e: seccompiler::BackendError| format!("building the seccomp filter: {e}");
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED
        .iter()
        .chain(if build_step {
            &[][..]
        } else {
            &[libc::SYS_chroot][..]
        })
        .map(|&nr| (nr, Vec::new()))
        .collect();
    // Refused when the argument is none of the allowed values (a rule's conditions all hold).
    let personality = PERSONALITIES
        .iter()
        .map(|&value| SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, value))
        .collect::<Result<Vec<_>, _>>()
        .and_then(SeccompRule::new)
        .map_err(fail)?;
    rules.insert(libc::SYS_personality, vec![personality]);
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            let condition = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )?;
            SeccompRule::new(vec![condition])
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(fail)?;
    rules.insert(libc::SYS_clone, clone_rules);
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch()?,
    )
    .map_err(fail)?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch()?,
    )
    .map_err(fail)?;
    [deny, clone3]
        .into_iter()
        .map(|filter| {
            BpfProgram::try_from(filter).map_err(|e| format!("compiling the seccomp filter: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    /// Runs `probe` in a forked child under the filters and returns its exit code. The child
    /// only makes syscalls (the filters are compiled before the fork), so forking the
    /// multi-threaded test process is safe.
    fn under_filters(build_step: bool, probe: fn() -> bool) -> i32 {
        let filters = super::filters(build_step).unwrap();
        // SAFETY: the child makes raw syscalls only and ends with _exit.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                for filter in &filters {
                    if seccompiler::apply_filter(filter).is_err() {
                        libc::_exit(2);
                    }
                }
                libc::_exit(if probe() { 0 } else { 1 });
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            libc::WEXITSTATUS(status)
        }
    }

    fn refused(rc: libc::c_long) -> bool {
        rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }

    /// Docker's profile lets `personality` take a few values only: `ADDR_NO_RANDOMIZE` and
    /// `READ_IMPLIES_EXEC` weaken the process, and were allowed here.
    #[test]
    fn personality_takes_docker_s_values_only() {
        let probe = || {
            // SAFETY: personality only changes this (child) process's execution domain.
            unsafe {
                refused(libc::syscall(libc::SYS_personality, 0x0040000))
                    && refused(libc::syscall(libc::SYS_personality, 0x0400000))
                    && libc::syscall(libc::SYS_personality, 0xffff_ffffu64) >= 0
                    && libc::syscall(libc::SYS_personality, 0) >= 0
            }
        };
        assert_eq!(under_filters(false, probe), 0);
        assert_eq!(under_filters(true, probe), 0);
    }

    /// What Docker's profile refuses without `CAP_SYS_PTRACE` or `CAP_SYS_ADMIN` is refused;
    /// `chroot` is refused to an instance, allowed to a build step (as Docker's profile
    /// allows it with `CAP_SYS_CHROOT`).
    #[test]
    fn docker_s_refusals_hold_and_a_build_step_may_chroot() {
        fn common() -> bool {
            // SAFETY: each call fails or acts on this child only.
            unsafe {
                refused(libc::syscall(libc::SYS_kcmp, 0, 0, 0, 0, 0))
                    && refused(libc::syscall(libc::SYS_pidfd_getfd, 0, 0, 0))
                    && refused(libc::syscall(libc::SYS_mount_setattr, 0, 0, 0, 0, 0))
                    && refused(libc::syscall(libc::SYS_fanotify_init, 0, 0))
                    && refused(libc::syscall(libc::SYS_mbind, 0, 0, 0, 0, 0, 0))
                    && refused(libc::syscall(libc::SYS_mount, 0, 0, 0, 0, 0))
                    && refused(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER))
            }
        }
        // A chroot to `/` changes nothing.
        fn chroot() -> libc::c_long {
            // SAFETY: a valid C string path.
            unsafe { libc::syscall(libc::SYS_chroot, c"/".as_ptr()) }
        }
        assert_eq!(under_filters(false, || common() && refused(chroot())), 0);
        assert_eq!(under_filters(true, || common() && chroot() == 0), 0);
    }

    #[test]
    fn the_default_filter_compiles() {
        for build_step in [false, true] {
            let filters = super::filters(build_step).unwrap();
            assert_eq!(filters.len(), 2);
            assert!(filters.iter().all(|f| !f.is_empty()));
        }
    }
}
