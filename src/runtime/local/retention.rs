//! How long the logs of removed instances stay. `remove` keeps an instance's log (its last
//! words are often why it was removed), but without a bound a crash loop or a day of
//! deploys leaves a directory per instance forever. So removal also records which group the
//! instance was in and, in that group, deletes all but the `KEEP` most recently removed
//! instances' directories.
//!
//! The group is the value of the instance's `log-group` label, opaque to the runtime (the
//! controller sets `<app>/<environment>/<service>`, so one churning service cannot push out
//! another's logs); instances without one (`graven run`) share one group. Directories left
//! by a graven from before this bound have no record and are never touched by a removal;
//! `graven gc` bounds them too (`expired`). A log store is meant to take these logs over;
//! until then this keeps the disk bounded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::state::{LOG, LOG_BEFORE, STATE};

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
    let removed = removed(instances, false)
        .into_iter()
        .filter(|r| r.group == group)
        .collect();
    for dir in beyond(removed, keep) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// What `graven gc` deletes: the directories of removed instances beyond the `keep` most
/// recently removed of each group, every group at once. A directory with neither state nor
/// record (left by a start that died, or by a graven from before this bound) counts too, as
/// removed when its log last changed, in the group of instances without a `log-group`; one
/// without a log has nothing worth keeping. The caller holds the start lock exclusively, so
/// no start or removal is half done.
pub fn expired(instances: &Path, keep: usize) -> Vec<PathBuf> {
    let (logged, empty): (Vec<Entry>, Vec<Entry>) = removed(instances, true)
        .into_iter()
        .partition(|r| r.dir.join(LOG).exists() || r.dir.join(LOG_BEFORE).exists() || r.recorded);
    let mut groups: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    for entry in logged {
        groups.entry(entry.group.clone()).or_default().push(entry);
    }
    let mut expired: Vec<PathBuf> = empty.into_iter().map(|e| e.dir).collect();
    for (_, removed) in groups {
        expired.extend(beyond(removed, keep));
    }
    expired.sort();
    expired
}

/// What a removed instance's directory holds besides its log and its record (a removal cut
/// short, say), for gc to delete.
pub fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| ![LOG, LOG_BEFORE, REMOVED].contains(&e.file_name().to_str().unwrap_or("")))
        .map(|e| e.path())
        .collect()
}

/// Every directory under `instances` with no state: the removed instances (with their
/// record), and with `unrecorded` also those that have none.
fn removed(instances: &Path, unrecorded: bool) -> Vec<Entry> {
    let Ok(entries) = std::fs::read_dir(instances) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .map(|entry| entry.path())
        // An instance with state is not removed, whatever else its directory holds.
        .filter(|dir| !dir.join(STATE).exists())
        .filter_map(|dir| {
            let record = std::fs::read(dir.join(REMOVED))
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Removed>(&bytes).ok());
            match record {
                Some(record) => Some(Entry {
                    group: record.group,
                    removed_at_ms: record.removed_at_ms,
                    dir,
                    recorded: true,
                }),
                None if unrecorded => Some(Entry {
                    group: String::new(),
                    removed_at_ms: last_change_ms(&dir),
                    dir,
                    recorded: false,
                }),
                None => None,
            }
        })
        .collect()
}

/// When the instance's log (or else its directory) last changed, in ms since the epoch.
fn last_change_ms(dir: &Path) -> u64 {
    [dir.join(LOG), dir.join(LOG_BEFORE), dir.to_owned()]
        .iter()
        .find_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// The directories of `removed` (one group's) beyond the `keep` most recently removed.
fn beyond(mut removed: Vec<Entry>, keep: usize) -> Vec<PathBuf> {
    removed.sort_by(|a, b| (b.removed_at_ms, &b.dir).cmp(&(a.removed_at_ms, &a.dir)));
    removed.into_iter().skip(keep).map(|e| e.dir).collect()
}

/// A directory of a removed instance, as its record (or, without one, gc) sees it.
struct Entry {
    group: String,
    removed_at_ms: u64,
    dir: PathBuf,
    recorded: bool,
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
