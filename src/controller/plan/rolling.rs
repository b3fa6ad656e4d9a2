//! The rolling strategy: new instances are launched `max_surge` at a time, and old ones (of
//! another release, or condemned) are drained only while at least `instances -
//! max_unavailable` healthy ones remain; the deploy succeeds once `instances` new instances
//! are healthy and no old one is left, and rolls back when the new release is not healthy
//! in time or its instances keep failing.

use super::{Action, Round, backoff_delay};
use crate::events::{DrainReason, InstanceName, Lifecycle, Release, RollbackReason, ServiceName};

pub(super) fn plan(
    round: &mut Round<'_>,
    service: &ServiceName,
    release: &Release,
    max_surge: u32,
    max_unavailable: u32,
) {
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
    let mut new_count = 0u32;
    let mut new_healthy = 0u32;
    // New instances, not yet healthy ones first: the order surplus ones are drained in.
    let mut new_names: Vec<(bool, InstanceName)> = Vec::new();
    // Healthy instances to be replaced, with the reason they go once they may.
    let mut old_healthy: Vec<(InstanceName, DrainReason)> = Vec::new();
    let mut old_live = 0u32;
    for instance in &live {
        let draining = instance.lifecycle == Lifecycle::Draining;
        let current = instance.release == wanted;
        if !current {
            old_live += 1;
        }
        if draining {
            continue;
        }
        let replaced = match (&instance.condemned, current) {
            (Some(reason), true) => Some(DrainReason::Condemned {
                reason: reason.clone(),
            }),
            (_, false) => Some(DrainReason::Replaced { by: wanted }),
            (None, true) => None,
        };
        match (replaced, instance.lifecycle) {
            (None, Lifecycle::Healthy) => {
                new_count += 1;
                new_healthy += 1;
                new_names.push((true, instance.name.clone()));
            }
            (None, Lifecycle::Unhealthy) => round.drain(
                &instance.name,
                DrainReason::Unhealthy {
                    detail: instance.detail.clone(),
                },
            ),
            (None, Lifecycle::Starting)
                if now_ms
                    >= instance.launched_at_ms.max(observed.since_ms)
                        + config.time_to_healthy().as_millis() as u64 =>
            {
                round.drain(
                    &instance.name,
                    DrainReason::NotHealthyInTime {
                        deadline: config.time_to_healthy(),
                    },
                )
            }
            (None, Lifecycle::Starting) => {
                new_count += 1;
                new_names.push((false, instance.name.clone()));
            }
            (Some(reason), Lifecycle::Healthy) => old_healthy.push((instance.name.clone(), reason)),
            // Failing is the reason an instance that was to be replaced anyway goes now.
            (Some(_), Lifecycle::Unhealthy) if current => round.drain(
                &instance.name,
                DrainReason::Unhealthy {
                    detail: instance.detail.clone(),
                },
            ),
            (Some(reason), Lifecycle::Starting | Lifecycle::Unhealthy) => {
                let reason = match reason {
                    DrainReason::Replaced { .. } => DrainReason::NotWanted { wanted },
                    other => other,
                };
                round.drain(&instance.name, reason)
            }
            (_, Lifecycle::Draining) => unreachable!("draining instances are skipped above"),
        }
    }

    if let Some(deploy) = service_state.deploy.as_ref().filter(|d| d.to == wanted) {
        let deadline = deploy.started_at_ms.max(observed.since_ms)
            + config.time_to_healthy().as_millis() as u64;
        let last_failure = service_state.last_failure.clone();
        let reason = if deploy.failures >= super::MAX_DEPLOY_FAILURES {
            Some(RollbackReason::TooManyFailures {
                failures: deploy.failures,
                last_failure,
            })
        } else if now_ms >= deadline && new_healthy < desired {
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
            return;
        }
        if new_healthy >= desired && old_live == 0 {
            round.push(Action::Succeed {
                service: service.clone(),
                release: wanted,
            });
        }
    }

    // Scaled down: drain the surplus, instances that are not serving yet first.
    if new_count > desired {
        new_names.sort();
        for (healthy, name) in new_names.iter().take((new_count - desired) as usize) {
            round.drain(name, DrainReason::ScaledDown { to: desired });
            new_count -= 1;
            if *healthy {
                new_healthy -= 1;
            }
        }
    }

    // Drain old instances while enough stay available; all of them once the new release is
    // fully healthy.
    let min_available = desired.saturating_sub(max_unavailable);
    let available = new_healthy + old_healthy.len() as u32;
    let drains = if new_healthy >= desired {
        old_healthy.len() as u32
    } else {
        available
            .saturating_sub(min_available)
            .min(old_healthy.len() as u32)
    };
    // A condemned instance serves until a healthy one replaces it: running short is a
    // rollout's allowance, not a replacement's, unless the service may not surge (then it
    // is the only way to replace it).
    let mut drained = 0u32;
    let mut serving = available;
    for (name, reason) in &old_healthy {
        if drained == drains {
            break;
        }
        let condemned = matches!(reason, DrainReason::Condemned { .. });
        if condemned && max_surge > 0 && serving <= desired {
            continue;
        }
        round.drain(name, reason.clone());
        drained += 1;
        serving -= 1;
    }

    // Launch new instances within the surge allowance.
    let surge = if max_surge == 0 && max_unavailable == 0 {
        1
    } else {
        max_surge
    };
    let alive = new_count + old_healthy.len() as u32 - drained;
    let launches = desired
        .saturating_sub(new_count)
        .min((desired + surge).saturating_sub(alive));
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
