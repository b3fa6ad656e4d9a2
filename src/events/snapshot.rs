//! Start-up that stays bounded as the log grows: the folded state is stored in the log's
//! database now and then (a snapshot at a sequence number), and start-up reads the newest
//! snapshot and folds only the events after it. The events are never removed, so history
//! stays whole; a snapshot in an older format, or one that does not check out, is passed
//! over and the whole log folded, as before snapshots existed.

use super::{Event, EventLog, EventLogError, State, fold, replay};

/// The format of a stored `State`; a new one is a new number, and older snapshots are then
/// passed over (the next one written is in the new format).
pub const STATE_VERSION: u32 = 1;

/// How many events the controller lets pass between snapshots: a start-up folds at most
/// this many after reading one.
pub const SNAPSHOT_EVERY: u64 = 10_000;

/// The state the log says: the newest usable snapshot and the events after it.
pub fn load(log: &EventLog) -> Result<State, EventLogError> {
    let start = match log.load_snapshot(STATE_VERSION)? {
        Some((seq, json)) => match serde_json::from_str::<State>(&json) {
            Ok(state) if state.seq == seq => Some(state),
            _ => None,
        },
        None => None,
    };
    let Some(state) = start else {
        return Ok(replay(&log.read_after::<Event>(0)?));
    };
    let after = state.seq;
    Ok(log.read_after::<Event>(after)?.iter().fold(state, fold))
}

/// Stores a snapshot of `state` (folded from this log) at its sequence number.
pub fn save(log: &EventLog, state: &State) -> Result<(), EventLogError> {
    let json = serde_json::to_string(state).map_err(|source| EventLogError::Encode {
        kind: "snapshot",
        source,
    })?;
    log.save_snapshot(state.seq, STATE_VERSION, &json)
}

/// Folds the log and stores the result as its newest snapshot; the sequence it is at.
pub fn compact(log: &EventLog) -> Result<u64, EventLogError> {
    let state = load(log)?;
    save(log, &state)?;
    Ok(state.seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{DeployReason, ReleaseNumber, ServiceConfig};
    use crate::store::Digest;

    fn history(log: &EventLog, from: u64, to: u64) {
        let mut events = Vec::new();
        for n in from..=to {
            events.push(Event::ReleaseCreated {
                service: "web".into(),
                release: ReleaseNumber(n),
                image: Digest::of(&n.to_be_bytes()),
                config_digest: format!("c{n}"),
                config: ServiceConfig::test(1, 1, 0),
                source: None,
            });
            events.push(Event::DeployStarted {
                service: "web".into(),
                from: n.checked_sub(1).filter(|p| *p > 0).map(ReleaseNumber),
                to: ReleaseNumber(n),
                reason: DeployReason::Deploy,
            });
        }
        log.append_many("test", 1, &events).unwrap();
    }

    #[test]
    fn a_snapshot_and_the_events_after_it_fold_to_the_whole_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(&dir.path().join("events.db")).unwrap();
        history(&log, 1, 50);
        assert_eq!(compact(&log).unwrap(), 100);
        history(&log, 51, 60);
        let whole = replay(&log.read_after::<Event>(0).unwrap());
        assert_eq!(load(&log).unwrap(), whole);
        // A snapshot in another format is passed over, not misread.
        log.save_snapshot(120, STATE_VERSION + 1, "{}").unwrap();
        assert_eq!(load(&log).unwrap(), whole);
        // So is one past the log's end (its tail was lost) or one that does not check out.
        log.save_snapshot(500, STATE_VERSION, "{}").unwrap();
        assert_eq!(load(&log).unwrap(), whole);
    }
}
