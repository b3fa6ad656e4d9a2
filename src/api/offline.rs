//! What `status`, `releases` and `history` show when no control plane runs: the same fold
//! of the same event logs, read from disk (`$GRAVEN_HOME/apps/<app>/<environment>/events.db`).
//! Routes are not bound then, so a snapshot read here has none; everything else is what the
//! daemon would say.

use std::path::Path;
use std::sync::Arc;

use super::{ApiError, Target, event_logs};
use crate::controller::{ControllerError, Snapshot};
use crate::events::EventLog;

/// The logs `target` names, as (app, environment, path), sorted (none is no error).
pub fn logs(
    home: &Path,
    target: &Target,
) -> Result<Vec<(String, String, std::path::PathBuf)>, ApiError> {
    let mut logs: Vec<_> = event_logs(home)?
        .into_iter()
        .filter_map(|(app, environment, path)| {
            Some((
                app.into_string().ok()?,
                environment.into_string().ok()?,
                path,
            ))
        })
        .filter(|(app, environment, _)| {
            target.app.as_ref().is_none_or(|a| a == app)
                && target.environment.as_ref().is_none_or(|e| e == environment)
        })
        .collect();
    logs.sort();
    Ok(logs)
}

/// `logs`, where naming an app or environment that has no log is an error.
fn matching(
    home: &Path,
    target: &Target,
) -> Result<Vec<(String, String, std::path::PathBuf)>, ApiError> {
    let logs = logs(home, target)?;
    if logs.is_empty() && (target.app.is_some() || target.environment.is_some()) {
        return Err(ApiError::UnknownApp {
            app: target.app.clone().unwrap_or_default(),
            environment: target.environment.clone().unwrap_or_default(),
        });
    }
    Ok(logs)
}

/// The state of every app and environment `target` names, folded from its log.
pub fn snapshots(home: &Path, target: &Target) -> Result<Vec<Snapshot>, ApiError> {
    let mut snapshots = Vec::new();
    for (app, environment, path) in matching(home, target)? {
        let log = EventLog::open(&path).map_err(ControllerError::from)?;
        let state = crate::events::snapshot::load(&log).map_err(ControllerError::from)?;
        snapshots.push(Snapshot {
            app,
            environment,
            state: Arc::new(state),
            ..Snapshot::default()
        });
    }
    Ok(snapshots)
}

/// The one log `target` names, opened once for reading page by page (`read_page`).
pub fn log(home: &Path, target: &Target) -> Result<EventLog, ApiError> {
    let logs = matching(home, target)?;
    let path = match logs.as_slice() {
        [(_, _, path)] => path,
        [] => return Err(ApiError::NothingRunning),
        many => {
            return Err(ApiError::Ambiguous {
                choices: many
                    .iter()
                    .map(|(app, environment, _)| format!("{app}/{environment}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    };
    Ok(EventLog::open(path).map_err(ControllerError::from)?)
}
