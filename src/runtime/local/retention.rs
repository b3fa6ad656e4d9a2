//! How long the logs of removed instances stay. `remove` keeps an instance's log (its last
//! words are often why it was removed), but without a bound a crash loop or a day of
//! deploys leaves a directory per instance forever. So removal also records which group the
//! instance was in and, in that group, deletes all but the `KEEP` most recently removed
//! instances' directories.
//!
//! The group is the value of the instance's `log-group` label, opaque to the runtime (the
//! controller sets `<app>/<environment>/<service>`, so one churning service cannot push out
//! another's logs); instances without one (`graven run`) share one group. Directories left
//! by a graven from before this bound have no record and are never touched. A log store is
//! meant to take these logs over; until then this keeps the disk bounded.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::state::STATE;

/// The label whose value groups instances for log retention.
pub const LOG_GROUP: &str = "log-group";
/// How many removed instances' logs each group keeps: the last few crashes of a crash loop,
/// or the release before the current one, are still readable; with each log at most twice
/// its rotation size (16 MiB by default) a group holds at most 160 MiB.
pub const KEEP: usize = 5;
/// The record `remove` leaves beside a removed instance's log.
const REMOVED: &str = "removed.json";

#[derive(Debug, Serialize, Deserialize)]
struct Removed {
    group: String,
    removed_at_ms: u64,
}

/// Records that the instance in `dir` was removed, in `group`, now.
pub fn record(dir: &Path, group: &str) -> std::io::Result<()> {
    let removed_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let record = Removed {
        group: group.to_owned(),
        removed_at_ms,
    };
    std::fs::write(
        dir.join(REMOVED),
        serde_json::to_vec(&record).expect("a removal record serializes"),
    )
}

/// Deletes the directories of removed instances of `group` under `instances`, all but the
/// `keep` most recently removed. Best effort: a directory that cannot be read or deleted is
/// left for the next removal.
pub fn prune(instances: &Path, group: &str, keep: usize) {
    let Ok(entries) = std::fs::read_dir(instances) else {
        return;
    };
    let mut removed: Vec<(u64, std::path::PathBuf)> = entries
        .flatten()
        .map(|entry| entry.path())
        // An instance with state is not removed, whatever else its directory holds.
        .filter(|dir| !dir.join(STATE).exists())
        .filter_map(|dir| {
            let record: Removed =
                serde_json::from_slice(&std::fs::read(dir.join(REMOVED)).ok()?).ok()?;
            (record.group == group).then_some((record.removed_at_ms, dir))
        })
        .collect();
    removed.sort_by(|a, b| b.cmp(a));
    for (_, dir) in removed.into_iter().skip(keep) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_removed_of_the_same_group_are_kept() {
        let home = tempfile::tempdir().unwrap();
        let instances = home.path();
        let make = |name: &str, group: Option<&str>, at: u64, state: bool| {
            let dir = instances.join(name);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("log"), "x").unwrap();
            if let Some(group) = group {
                let record = Removed {
                    group: group.to_owned(),
                    removed_at_ms: at,
                };
                std::fs::write(dir.join(REMOVED), serde_json::to_vec(&record).unwrap()).unwrap();
            }
            if state {
                std::fs::write(dir.join(STATE), "{}").unwrap();
            }
        };
        for at in 1..=4 {
            make(&format!("a{at}"), Some("web"), at, false);
        }
        make("b1", Some("api"), 0, false);
        make("old", None, 0, false);
        make("live", Some("web"), 0, true);
        prune(instances, "web", 2);
        let mut left: Vec<String> = std::fs::read_dir(instances)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["a3", "a4", "b1", "live", "old"]);
    }
}
