//! What graven marks on an instance that an engine's labels cannot hold (a container's are
//! fixed at create, a service's belong to its spec): tainted, drifted. One small file per
//! instance under `$GRAVEN_HOME/<runtime>/marks` (`docker` or `swarm`), gone with the
//! instance. Shared by the Docker and the Swarm runtimes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::runtime::{Drift, InstanceId, RuntimeError};

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Marks {
    #[serde(default)]
    pub tainted: bool,
    #[serde(default)]
    pub drift: Option<Drift>,
}

fn path(home: &Path, runtime: &str, id: &InstanceId) -> PathBuf {
    home.join(runtime).join("marks").join(format!("{id}.json"))
}

pub(crate) fn load(home: &Path, runtime: &str, id: &InstanceId) -> Marks {
    std::fs::read(path(home, runtime, id))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn save(home: &Path, runtime: &str, id: &InstanceId, marks: &Marks) -> Result<(), RuntimeError> {
    let path = path(home, runtime, id);
    let dir = path.parent().expect("a marks file has a directory");
    let io = |source| RuntimeError::Io {
        id: id.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let bytes = serde_json::to_vec(marks).expect("marks serialize");
    crate::store::write_atomic(&path, &bytes).map_err(|e| RuntimeError::Other {
        context: format!("recording instance {id}"),
        source: std::io::Error::other(e),
    })
}

pub(crate) fn taint(home: &Path, runtime: &str, id: &InstanceId) -> Result<(), RuntimeError> {
    let mut marks = load(home, runtime, id);
    marks.tainted = true;
    save(home, runtime, id, &marks)
}

pub(crate) fn record_drift(
    home: &Path,
    runtime: &str,
    id: &InstanceId,
    drift: &Drift,
) -> Result<(), RuntimeError> {
    let mut marks = load(home, runtime, id);
    marks.drift = Some(drift.clone());
    save(home, runtime, id, &marks)
}

pub(crate) fn remove(home: &Path, runtime: &str, id: &InstanceId) {
    let _ = std::fs::remove_file(path(home, runtime, id));
}
