//! What `status`, `releases` and `history` show when no control plane runs: the same fold
//! of the same event logs, read from disk (`$GRAVEN_HOME/apps/<app>/<environment>/events.db`).
//! Routes are not bound then, so a snapshot read here has none; everything else is what the
//! daemon would say.

use std::path::Path;
use std::sync::Arc;

use super::{ApiError, Target, event_logs};
use crate::controller::{ControllerError, Snapshot};
use crate::events::{Envelope, Event, EventLog};

/// The logs `target` names, as (app, environment, path), sorted; an app or environment it
/// names that has no log is an error.
fn matching(
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

/// At most `limit` events after `after` of the one log `target` names.
pub fn history(
    home: &Path,
    target: &Target,
    after: u64,
    limit: usize,
) -> Result<Vec<Envelope<Event>>, ApiError> {
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
    let log = EventLog::open(path).map_err(ControllerError::from)?;
    Ok(log.read_page(after, limit).map_err(ControllerError::from)?)
}
