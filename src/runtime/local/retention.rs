//! Where an instance's output goes in the log store, and what is left of removed instances'
//! directories. An instance writes into `logs/<group>/<id>` (`logs::source_dir`), the group
//! being its `log-group` label (the controller sets `<app>/<environment>/<service>`, so each
//! service has its own retention) or `_run` for instances started without one (`graven
//! run`). Its service's retention (`logs::retention`) is recorded in the group when it
//! starts, and enforced by its shim, by `remove` and by `graven gc`; removing an instance
//! deletes its whole directory, since its output is in the store.
//!
//! Directories left by a graven from before the log store hold a `log` and no state; gc
//! keeps them as long as the store keeps lines (`logs::retention::DEFAULT`'s age), then
//! deletes them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::state::{LOG, LOG_BEFORE, LogTarget, STATE};
use crate::logs::retention::{DEFAULT, Policy};
use crate::runtime::{InstanceId, Limits, RuntimeError};

/// The label whose value groups instances for log retention.
pub const LOG_GROUP: &str = "log-group";

/// How often a shim syncs its instance's output to disk when nothing says otherwise:
/// comparable to rsyslog's and journald's intervals.
pub const DEFAULT_SYNC_MS: u64 = 1000;

/// The instance's source in the log store, with its service's retention (`limits.log`
/// is the service's size bound) recorded in its group.
pub fn target(
    home: &Path,
    id: &InstanceId,
    labels: &BTreeMap<String, String>,
    limits: &Limits,
) -> Result<LogTarget, RuntimeError> {
    let group = labels
        .get(LOG_GROUP)
        .map_or(crate::logs::RUN_GROUP, String::as_str);
    let dir = crate::logs::source_dir(home, group, &id.0).map_err(|e| RuntimeError::Other {
        context: format!("the log source of {id}"),
        source: std::io::Error::other(e),
    })?;
    let meta = meta(id, labels, super::super::now_ms());
    let policy = Policy {
        max_bytes: limits.log_bytes.unwrap_or(DEFAULT.max_bytes),
        max_age: limits
            .log_age_s
            .map_or(DEFAULT.max_age, Duration::from_secs),
    };
    Ok(LogTarget {
        dir,
        meta,
        sync_ms: DEFAULT_SYNC_MS,
        max_bytes: policy.max_bytes,
        max_age_s: policy.max_age.as_secs(),
    })
}

/// The log source's meta of the instance `id` labelled `labels`, started at
/// `started_at_ms`: the same for every runtime that fills the log store.
pub fn meta(
    id: &InstanceId,
    labels: &BTreeMap<String, String>,
    started_at_ms: u64,
) -> crate::logs::Meta {
    // The controller's labels (`controller::LABEL_*`), read by name: the runtime does not
    // name the controller.
    let label = |key: &str| labels.get(key).cloned().unwrap_or_default();
    crate::logs::Meta {
        app: label("app"),
        environment: label("environment"),
        service: label("service"),
        release: labels.get("release").and_then(|r| r.parse().ok()),
        instance: labels
            .get("instance")
            .cloned()
            .unwrap_or_else(|| id.0.clone()),
        id: id.0.clone(),
        started_at_ms,
    }
}

/// What `graven gc` deletes under `instances`: every directory with no state but a log of
/// a graven from before the store older than the store's age bound, or no log at all (left
/// by a start that died). The caller holds the start lock exclusively, so no start or
/// removal is half done.
pub fn expired(instances: &Path) -> Vec<PathBuf> {
    let max_age = DEFAULT.max_age;
    let mut expired: Vec<PathBuf> = stateless(instances)
        .into_iter()
        .filter(|dir| {
            let changed = [dir.join(LOG), dir.join(LOG_BEFORE)]
                .iter()
                .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
                .max();
            changed.is_none_or(|t| t.elapsed().is_ok_and(|age| age > max_age))
        })
        .collect();
    expired.sort();
    expired
}

/// What a kept old directory holds besides its log, for gc to delete.
pub fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| ![LOG, LOG_BEFORE].contains(&e.file_name().to_str().unwrap_or("")))
        .map(|e| e.path())
        .collect()
}

/// Every directory under `instances` with no state.
pub fn stateless(instances: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(instances) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .map(|entry| entry.path())
        .filter(|dir| !dir.join(STATE).exists())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_writes_into_its_services_group_and_run_ones_into_their_own() {
        let home = Path::new("/h");
        let id = InstanceId("abc".into());
        let labels = BTreeMap::from([
            (LOG_GROUP.to_owned(), "demo/local/web".to_owned()),
            ("instance".to_owned(), "web-3".to_owned()),
            ("release".to_owned(), "2".to_owned()),
        ]);
        let t = target(home, &id, &labels, &Limits::default()).unwrap();
        assert_eq!(t.dir, Path::new("/h/logs/demo/local/web/abc"));
        assert_eq!(
            (t.meta.instance.as_str(), t.meta.release),
            ("web-3", Some(2))
        );
        let run = target(home, &id, &BTreeMap::new(), &Limits::default()).unwrap();
        assert_eq!(run.dir, Path::new("/h/logs/_run/abc"));
        let evil = BTreeMap::from([(LOG_GROUP.to_owned(), "../../etc".to_owned())]);
        assert!(target(home, &id, &evil, &Limits::default()).is_err());
    }
}
