//! Resource limits through cgroups: v1 (one hierarchy per controller, as on this kind of
//! host) or v2 (one unified hierarchy). Each instance gets `graven/<id>` in each hierarchy;
//! when that cannot be made, the instance runs without limits and says so.

use std::path::{Path, PathBuf};

use crate::runtime::Limits;

const ROOT: &str = "/sys/fs/cgroup";
const CPU_PERIOD_US: u64 = 100_000;

/// The cgroups one instance lives in.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Cgroups {
    pub dirs: Vec<PathBuf>,
}

impl Cgroups {
    /// The `cgroup.procs` files the sandbox helper joins.
    pub fn procs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Removes the groups once they are empty. The last processes of a PID namespace are
    /// reaped a moment after its PID 1, so a busy group is retried briefly.
    pub fn remove(&self) {
        for dir in &self.dirs {
            for _ in 0..100 {
                match std::fs::remove_dir(dir) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(2))
                    }
                    _ => break,
                }
            }
        }
    }
}

/// The cgroups `create` makes for instance `id`, found by their names in every hierarchy,
/// for an instance whose recorded state is lost (an orphan): so that its groups can go too.
pub fn of(id: &str) -> Cgroups {
    of_under(Path::new(ROOT), id)
}

fn of_under(root: &Path, id: &str) -> Cgroups {
    let unified = root.join("graven").join(id);
    let dirs = if root.join("cgroup.controllers").exists() {
        vec![unified]
    } else {
        std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|hierarchy| hierarchy.path().join("graven").join(id))
            .collect()
    };
    Cgroups {
        dirs: dirs.into_iter().filter(|dir| dir.is_dir()).collect(),
    }
}

/// How old an instance's group must be before `sweep` may remove it: a start makes its
/// groups a moment before its workload joins them, and an empty group of that age is a start
/// in progress, not a leftover.
const SWEEP_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes the empty groups of instances that are gone, whatever home they came from: a shim
/// killed with SIGKILL, or a home deleted while its instances ran, leaves groups that no state
/// names any more. The kernel refuses to remove a group that still holds a process, so only
/// empty ones go; young ones are left to the start that made them. On cgroup v1 a group's
/// time is when its inode was last brought into memory, never earlier than its making, so
/// the age is at worst too young: a leftover may wait for a later sweep, a start never loses
/// its group.
pub fn sweep() {
    sweep_under(Path::new(ROOT), SWEEP_GRACE);
}

fn sweep_under(root: &Path, grace: std::time::Duration) {
    let parents: Vec<PathBuf> = if root.join("cgroup.controllers").exists() {
        vec![root.join("graven")]
    } else {
        std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|hierarchy| hierarchy.path().join("graven"))
            .collect()
    };
    let now = std::time::SystemTime::now();
    for parent in parents {
        for group in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            let old = group
                .metadata()
                .ok()
                .filter(|m| m.is_dir())
                .and_then(|m| m.modified().ok())
                .is_some_and(|at| now.duration_since(at).is_ok_and(|age| age >= grace));
            if old {
                let _ = std::fs::remove_dir(group.path());
            }
        }
    }
}

/// Makes the instance's cgroups and writes its limits. `Err` says why limits are not
/// enforced; nothing is left behind then.
pub fn create(id: &str, limits: &Limits) -> Result<Cgroups, String> {
    create_under(Path::new(ROOT), id, limits)
}

fn create_under(root: &Path, id: &str, limits: &Limits) -> Result<Cgroups, String> {
    let mut made = Cgroups::default();
    let result = if root.join("cgroup.controllers").exists() {
        v2(root, id, limits, &mut made)
    } else {
        v1(root, id, limits, &mut made)
    };
    if result.is_err() {
        made.remove();
    }
    result.map(|()| made)
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), String> {
    std::fs::write(dir.join(file), value)
        .map_err(|e| format!("cannot write {}: {e}", dir.join(file).display()))
}

fn make(dir: PathBuf, made: &mut Cgroups) -> Result<PathBuf, String> {
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    made.dirs.push(dir.clone());
    Ok(dir)
}

/// Only the hierarchies of the limits given: every instance has a process limit, and making
/// a memory and a cpu group it does not need would only add to its start.
fn v1(root: &Path, id: &str, limits: &Limits, made: &mut Cgroups) -> Result<(), String> {
    let wanted = [
        ("memory", limits.memory_bytes.is_some()),
        ("pids", limits.pids.is_some()),
        ("cpu", limits.cpu_millis.is_some()),
    ];
    for (controller, _) in wanted.iter().filter(|(_, wanted)| *wanted) {
        if !root.join(controller).join("cgroup.procs").exists() {
            return Err(format!("the {controller} cgroup controller is not mounted"));
        }
    }
    if let Some(bytes) = limits.memory_bytes {
        let memory = make(root.join("memory/graven").join(id), made)?;
        write(&memory, "memory.limit_in_bytes", &bytes.to_string())?;
    }
    if let Some(max) = limits.pids {
        let pids = make(root.join("pids/graven").join(id), made)?;
        write(&pids, "pids.max", &max.to_string())?;
    }
    if let Some(millis) = limits.cpu_millis {
        let cpu = make(root.join("cpu/graven").join(id), made)?;
        write(&cpu, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
        write(
            &cpu,
            "cpu.cfs_quota_us",
            &(millis * CPU_PERIOD_US / 1000).to_string(),
        )?;
    }
    Ok(())
}

fn v2(root: &Path, id: &str, limits: &Limits, made: &mut Cgroups) -> Result<(), String> {
    let parent = root.join("graven");
    std::fs::create_dir_all(&parent)
        .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    for dir in [root, parent.as_path()] {
        write(dir, "cgroup.subtree_control", "+memory +pids +cpu")?;
    }
    let dir = make(parent.join(id), made)?;
    if let Some(bytes) = limits.memory_bytes {
        write(&dir, "memory.max", &bytes.to_string())?;
    }
    if let Some(max) = limits.pids {
        write(&dir, "pids.max", &max.to_string())?;
    }
    if let Some(millis) = limits.cpu_millis {
        write(
            &dir,
            "cpu.max",
            &format!("{} {CPU_PERIOD_US}", millis * CPU_PERIOD_US / 1000),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        memory_bytes: Some(64 << 20),
        pids: Some(32),
        cpu_millis: Some(1500),
        tmp_bytes: None,
        log_bytes: None,
        log_age_s: None,
    };

    #[test]
    fn v1_limits_are_written_per_controller() {
        let root = tempfile::tempdir().unwrap();
        for controller in ["memory", "pids", "cpu"] {
            std::fs::create_dir_all(root.path().join(controller)).unwrap();
            std::fs::write(root.path().join(controller).join("cgroup.procs"), "").unwrap();
        }
        let groups = create_under(root.path(), "abc", &LIMITS).unwrap();
        assert_eq!(groups.dirs.len(), 3);
        let read = |p: &str| std::fs::read_to_string(root.path().join(p)).unwrap();
        assert_eq!(read("memory/graven/abc/memory.limit_in_bytes"), "67108864");
        assert_eq!(read("pids/graven/abc/pids.max"), "32");
        assert_eq!(read("cpu/graven/abc/cpu.cfs_quota_us"), "150000");
    }

    #[test]
    fn v2_limits_are_written_in_one_group_with_the_controllers_enabled_above_it() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        let groups = create_under(root.path(), "abc", &LIMITS).unwrap();
        assert_eq!(groups.dirs, [root.path().join("graven/abc")]);
        let read = |p: &str| std::fs::read_to_string(root.path().join(p)).unwrap();
        assert_eq!(read("cgroup.subtree_control"), "+memory +pids +cpu");
        assert_eq!(read("graven/cgroup.subtree_control"), "+memory +pids +cpu");
        assert_eq!(read("graven/abc/memory.max"), "67108864");
        assert_eq!(read("graven/abc/pids.max"), "32");
        assert_eq!(read("graven/abc/cpu.max"), "150000 100000");
        assert_eq!(
            groups.procs(),
            [root.path().join("graven/abc/cgroup.procs")]
        );
    }

    #[test]
    fn a_missing_controller_means_no_limits_and_nothing_left() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("memory")).unwrap();
        std::fs::write(root.path().join("memory/cgroup.procs"), "").unwrap();
        let limits = Limits {
            memory_bytes: Some(1 << 30),
            pids: Some(10),
            ..Limits::default()
        };
        let error = create_under(root.path(), "abc", &limits).unwrap_err();
        assert!(error.contains("pids"), "{error}");
        assert!(!root.path().join("memory/graven/abc").exists());
        // A process limit alone needs only its own controller.
        std::fs::create_dir_all(root.path().join("pids")).unwrap();
        std::fs::write(root.path().join("pids/cgroup.procs"), "").unwrap();
        let pids_only = Limits {
            pids: Some(10),
            ..Limits::default()
        };
        let groups = create_under(root.path(), "abc", &pids_only).unwrap();
        assert_eq!(groups.dirs, [root.path().join("pids/graven/abc")]);
    }

    #[test]
    fn sweep_removes_old_empty_groups_and_leaves_young_ones() {
        let root = tempfile::tempdir().unwrap();
        let old = root.path().join("pids/graven/0ld");
        let young = root.path().join("pids/graven/young");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::create_dir_all(&young).unwrap();
        let an_hour_ago = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: (std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs()
                    - 3600) as _,
                tv_nsec: 0,
            },
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            &old,
            &an_hour_ago,
            rustix::fs::AtFlags::empty(),
        )
        .unwrap();
        sweep_under(root.path(), std::time::Duration::from_secs(60));
        assert!(!old.exists(), "an old empty group is a leftover");
        assert!(
            young.exists(),
            "a young group belongs to a start in progress"
        );
    }

    #[test]
    fn an_instance_s_groups_are_found_by_its_id_alone() {
        let root = tempfile::tempdir().unwrap();
        for controller in ["memory", "pids", "cpu"] {
            std::fs::create_dir_all(root.path().join(controller)).unwrap();
            std::fs::write(root.path().join(controller).join("cgroup.procs"), "").unwrap();
        }
        let made = create_under(root.path(), "abc", &LIMITS).unwrap();
        let mut found = of_under(root.path(), "abc").dirs;
        found.sort();
        let mut expected = made.dirs.clone();
        expected.sort();
        assert_eq!(found, expected);
        assert!(of_under(root.path(), "other").dirs.is_empty());
        let v2 = tempfile::tempdir().unwrap();
        std::fs::write(v2.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        let made = create_under(v2.path(), "abc", &LIMITS).unwrap();
        assert_eq!(of_under(v2.path(), "abc").dirs, made.dirs);
    }
}
