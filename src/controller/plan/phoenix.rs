//! Phoenix: an instance past its service's age is condemned (`CondemnReason::Aged`) and
//! replaced through the same path as a drifted one, its replacement healthy before it is
//! drained. Each instance is due at its launch plus `max_age` plus an offset in `[0,
//! jitter)` taken from its name, so a restarted controller finds the same due times and
//! instances launched together are spread out. A due instance is condemned only inside the
//! window, while no rollout of its service is under way, while fewer than `max_at_once`
//! replacements are in flight, and only as far as the healthy count stays at or above
//! `instances - max_unavailable`. Pure: the time and the time zones come from the shell.

use std::collections::BTreeSet;

use super::{Action, Round};
use crate::events::{
    CondemnReason, InstanceName, InstanceState, Lifecycle, PhoenixConfig, Release, ServiceName,
    State, Strategy, Window,
};

/// Condemns the due instances of every wanted service with a phoenix table, within each
/// one's window and budget.
pub(super) fn plan(round: &mut Round<'_>) {
    let state = round.state;
    for service in state.wanted_services() {
        if let Some(release) = state.wanted_release(service) {
            plan_service(round, service, release);
        }
    }
}

fn plan_service(round: &mut Round<'_>, service: &ServiceName, release: &Release) {
    let state = round.state;
    let now_ms = round.now_ms;
    let Some(config) = &release.config.phoenix else {
        return;
    };
    // A rollout replaces every instance anyway; recycling meanwhile would only race it.
    if state
        .services
        .get(service)
        .is_none_or(|s| s.deploy.is_some())
    {
        return;
    }
    let stop_first = super::recreate::applies(state, service, release);
    if stop_first && !config.stop_first {
        return;
    }
    let live: Vec<&InstanceState> = state
        .instances_of(service)
        .filter(|i| !round.gone.contains(&i.name))
        .collect();
    if live.iter().any(|i| i.release != release.number) {
        return;
    }
    // Condemned earlier in this round (drift): not in the state yet, but in flight.
    let condemned_now: BTreeSet<&InstanceName> = round
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Condemn { instance, .. } => Some(instance),
            _ => None,
        })
        .collect();
    let condemned = |i: &InstanceState| i.condemned.is_some() || condemned_now.contains(&i.name);
    let mut due: Vec<(u64, &InstanceState)> = live
        .iter()
        .filter(|i| i.lifecycle == Lifecycle::Healthy && !condemned(i))
        .filter(|i| !round.observed.busy.contains(&i.name))
        .map(|i| (due_ms(i, config), *i))
        .filter(|(due, _)| now_ms >= *due)
        .collect();
    if due.is_empty() || !in_window(config.window.as_ref(), now_ms, round) {
        return;
    }
    let desired = state
        .scale(service)
        .map_or(release.config.instances, |s| s.instances);
    // What one recycle takes from the healthy count before its replacement serves, and the
    // floor the count must stay at: a service that may surge loses nothing (its condemned
    // instance serves until the replacement does); one that may not is short one meanwhile.
    let (cost, floor) = match release.config.strategy {
        Strategy::Rolling {
            max_surge,
            max_unavailable,
        } if !stop_first => (
            u32::from(max_surge == 0),
            desired.saturating_sub(max_unavailable),
        ),
        // Stop-first, opted in: each recycle is a moment without the instance.
        Strategy::Rolling { .. } | Strategy::Recreate => (1, 0),
    };
    let in_flight = live.iter().filter(|i| condemned(i)).count() as u32;
    let mut healthy = live
        .iter()
        .filter(|i| i.lifecycle == Lifecycle::Healthy)
        .count() as u32;
    due.sort_by(|a, b| (a.0, &a.1.name).cmp(&(b.0, &b.1.name)));
    let room = config.max_at_once.saturating_sub(in_flight) as usize;
    for (_, instance) in due.into_iter().take(room) {
        if healthy < floor + cost {
            break;
        }
        round.push(Action::Condemn {
            instance: instance.name.clone(),
            reason: CondemnReason::Aged {
                age: std::time::Duration::from_millis(
                    now_ms.saturating_sub(instance.launched_at_ms),
                ),
                max_age: config.max_age,
            },
        });
        healthy -= cost;
    }
}

/// When the planner will recycle `instance` (ms since the epoch), as `status` shows it: none
/// when its service has no phoenix table, is stop-first without `stop_first`, or the instance
/// is not of the wanted release (a rollout replaces it).
pub fn recycle_due_ms(state: &State, instance: &InstanceState) -> Option<u64> {
    let release = state.wanted_release(&instance.service)?;
    let config = release.config.phoenix.as_ref()?;
    let stop_first = super::recreate::applies(state, &instance.service, release);
    (release.number == instance.release && (config.stop_first || !stop_first))
        .then(|| due_ms(instance, config))
}

/// When `instance` is due to be recycled (ms since the epoch): its launch, plus `max_age`,
/// plus its own offset within the jitter.
pub fn due_ms(instance: &InstanceState, config: &PhoenixConfig) -> u64 {
    instance
        .launched_at_ms
        .saturating_add(config.max_age.as_millis() as u64)
        .saturating_add(offset_ms(instance.name.as_str(), config))
}

/// The instance's offset in `[0, jitter)`: FNV-1a of its name, so it is the same in every
/// controller and across restarts, and instances with different names land apart.
pub fn offset_ms(name: &str, config: &PhoenixConfig) -> u64 {
    let jitter = config.jitter.as_millis() as u64;
    if jitter == 0 {
        return 0;
    }
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    hash % jitter
}

/// Whether `now_ms` is inside the window (always, without one). A zone the shell could not
/// find is never inside: no recycle rather than one at the wrong hour.
fn in_window(window: Option<&Window>, now_ms: u64, round: &Round<'_>) -> bool {
    let Some(window) = window else {
        return true;
    };
    let zone = match &window.zone {
        None => match jiff::tz::Offset::from_seconds(window.offset_minutes * 60) {
            Ok(offset) => jiff::tz::TimeZone::fixed(offset),
            Err(_) => return false,
        },
        Some(name) => match round.observed.zones.get(name) {
            Some(zone) => zone.clone(),
            None => return false,
        },
    };
    minute_of_day(now_ms, &zone).is_some_and(|minute| window.contains(minute))
}

/// Minutes after midnight at `now_ms` in `zone`.
pub fn minute_of_day(now_ms: u64, zone: &jiff::tz::TimeZone) -> Option<u16> {
    let now = jiff::Timestamp::from_millisecond(i64::try_from(now_ms).ok()?).ok()?;
    let civil = zone.to_datetime(now);
    Some(civil.hour() as u16 * 60 + civil.minute() as u16)
}
