//! The recreate (stop-first) strategy, for stateful services: an instance of the service
//! starts only when no other of it is alive (starting, healthy or draining), so a volume is
//! never wanted by two at once. A replacement first has the new release's image prepared
//! (`Action::Prepare`, while the old instance still serves), then drains every old instance
//! (its route holds new connections meanwhile), and launches the new one once they are all
//! gone. A deploy succeeds and rolls back as a rolling one does; its rollback is a deploy of
//! the old release, stop-first the same way. A crashed instance is replaced without surge.

use super::{Action, Round, backoff_delay};
use crate::events::{
    DrainReason, InstanceName, Lifecycle, Release, RollbackReason, ServiceName, State, Strategy,
};

/// Whether `service` is planned stop-first: its wanted release is stateful (`recreate`), or
/// a live instance's release is (a rollback from a stateful release stops it first too), or
/// the wanted release mounts a named volume a live instance of the service mounts (a volume
/// is owned by one instance at a time, so a surge could never start beside it).
pub(super) fn applies(state: &State, service: &ServiceName, release: &Release) -> bool {
    let recreate = |release: &Release| release.config.strategy == Strategy::Recreate;
    let shares = |other: &Release| {
        release
            .config
            .volumes
            .iter()
            .any(|v| other.config.volumes.iter().any(|o| o.name == v.name))
    };
    recreate(release)
        || state
            .instances_of(service)
            .filter_map(|i| state.releases.get(&i.release))
            .any(|other| recreate(other) || shares(other))
}

pub(super) fn plan(round: &mut Round<'_>, service: &ServiceName, release: &Release) {
    let state = round.state;
    let observed = round.observed;
    let now_ms = round.now_ms;
    let Some(service_state) = state.services.get(service) else {
        return;
    };
    let wanted = release.number;
    let config = &release.config;
    let desired = state
        .scale(service)
        .map_or(config.instances, |s| s.instances);
    let live: Vec<_> = state
        .instances_of(service)
        .filter(|i| !round.gone.contains(&i.name))
        .collect();
    // Alive in any way but being drained: a launch waits for every one of these to be gone.
    let mut draining = false;
    let mut old_live = 0u32;
    let mut new_healthy = 0u32;
    // Current instances, not yet healthy ones first: the order surplus ones are drained in.
    let mut current: Vec<(bool, InstanceName)> = Vec::new();
    // Instances to stop before the new release starts, with the reason.
    let mut replaced: Vec<(InstanceName, DrainReason)> = Vec::new();
    for instance in &live {
        let is_current = instance.release == wanted;
        if !is_current {
            old_live += 1;
        }
        if instance.lifecycle == Lifecycle::Draining {
            draining = true;
            continue;
        }
        let name = instance.name.clone();
        match (&instance.condemned, is_current, instance.lifecycle) {
            (Some(reason), true, _) => replaced.push((
                name,
                DrainReason::Condemned {
                    reason: reason.clone(),
                },
            )),
            (_, false, Lifecycle::Healthy) => {
                replaced.push((name, DrainReason::Replaced { by: wanted }))
            }
            (_, false, _) => replaced.push((name, DrainReason::NotWanted { wanted })),
            (None, true, Lifecycle::Healthy) => {
                new_healthy += 1;
                current.push((true, name));
            }
            (None, true, Lifecycle::Unhealthy) => round.drain(
                &name,
                DrainReason::Unhealthy {
                    detail: instance.detail.clone(),
                },
            ),
            (None, true, Lifecycle::Starting)
                if now_ms
                    >= instance.launched_at_ms.max(observed.since_ms)
                        + config.time_to_healthy().as_millis() as u64 =>
            {
                round.drain(
                    &name,
                    DrainReason::NotHealthyInTime {
                        deadline: config.time_to_healthy(),
                    },
                )
            }
            (None, true, Lifecycle::Starting) => current.push((false, name)),
            (None, true, Lifecycle::Draining) => unreachable!("draining instances are skipped"),
        }
    }

    if deploy_outcome(round, service, release, new_healthy, desired, old_live) {
        return;
    }

    // Scaled down: the surplus goes, instances that are not serving yet first.
    let mut current_count = current.len() as u32;
    if current_count > desired {
        current.sort();
        for (_, name) in current.iter().take((current_count - desired) as usize) {
            round.drain(name, DrainReason::ScaledDown { to: desired });
        }
        current_count = desired;
    }

    // Stop-first: the new release's image is made ready while the old instances still serve,
    // then they all go at once; nothing new starts until they are gone.
    if !replaced.is_empty() {
        if !observed.prepared.contains(&release.image) {
            round.push(Action::Prepare {
                service: service.clone(),
                release: wanted,
            });
            return;
        }
        for (name, reason) in &replaced {
            round.drain(name, reason.clone());
        }
        return;
    }
    // One drained this round (unhealthy, late, surplus) or still draining is alive yet.
    if draining || live.iter().any(|i| round.gone.contains(&i.name)) {
        return;
    }

    let launches = desired.saturating_sub(current_count);
    if launches == 0 {
        return;
    }
    let delay = backoff_delay(service_state.failures);
    let until_ms = service_state.last_failure_at_ms + delay.as_millis() as u64;
    if now_ms < until_ms {
        if service_state.backoff.as_ref().map(|b| b.until_ms) != Some(until_ms) {
            round.push(Action::Backoff {
                service: service.clone(),
                failures: service_state.failures,
                delay_ms: delay.as_millis() as u64,
                until_ms,
            });
        }
        return;
    }
    for _ in 0..launches {
        round.launch(service, wanted);
    }
}

/// Succeeds or rolls back the deploy under way to `release`, as the rolling strategy does.
/// True when it rolled back (nothing else is planned for the service this round).
fn deploy_outcome(
    round: &mut Round<'_>,
    service: &ServiceName,
    release: &Release,
    new_healthy: u32,
    desired: u32,
    old_live: u32,
) -> bool {
    let state = round.state;
    let Some(service_state) = state.services.get(service) else {
        return false;
    };
    let wanted = release.number;
    let config = &release.config;
    let Some(deploy) = service_state.deploy.as_ref().filter(|d| d.to == wanted) else {
        return false;
    };
    let deadline = deploy.started_at_ms.max(round.observed.since_ms)
        + config.time_to_healthy().as_millis() as u64;
    let last_failure = service_state.last_failure.clone();
    let reason = if deploy.failures >= super::MAX_DEPLOY_FAILURES {
        Some(RollbackReason::TooManyFailures {
            failures: deploy.failures,
            last_failure,
        })
    } else if round.now_ms >= deadline && new_healthy < desired {
        Some(RollbackReason::NotHealthyInTime {
            healthy: new_healthy,
            desired,
            deadline: config.time_to_healthy(),
            last_failure,
        })
    } else {
        None
    };
    if let Some(reason) = reason {
        round.push(Action::RollBack {
            service: service.clone(),
            from: wanted,
            to: deploy.from,
            reason,
        });
        return true;
    }
    if new_healthy >= desired && old_live == 0 {
        round.push(Action::Succeed {
            service: service.clone(),
            release: wanted,
        });
    }
    false
}
