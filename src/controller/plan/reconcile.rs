//! Reconciling the log with the runtime's listing: instances the log knows but the runtime no
//! longer has are forgotten, ones whose process ended are recorded as exited, ones started
//! while no controller listened are adopted, drains cut short by a restart are resumed,
//! tainted or drifted ones are condemned, and instances the log does not want are orphans to remove.

use std::collections::BTreeMap;

use super::{Action, Round, Seen};
use crate::events::{CondemnReason, GoneReason, Lifecycle, RuntimeId};

pub(super) fn reconcile(round: &mut Round<'_>) {
    let state = round.state;
    let observed = round.observed;
    let by_id: BTreeMap<&RuntimeId, &Seen> = observed.runtime.iter().map(|s| (&s.id, s)).collect();
    let by_name: BTreeMap<&str, &Seen> = observed
        .runtime
        .iter()
        .filter_map(|s| Some((s.name.as_ref()?.as_str(), s)))
        .collect();
    for instance in state.instances.values() {
        let name = &instance.name;
        if observed.busy.contains(name) {
            continue;
        }
        let draining = instance.lifecycle == Lifecycle::Draining;
        let seen = match &instance.runtime_id {
            Some(id) => by_id.get(id).copied(),
            None => by_name.get(name.as_str()).copied(),
        };
        let Some(seen) = seen else {
            round.push(Action::Forget {
                instance: name.clone(),
                reason: if draining {
                    GoneReason::Stopped
                } else {
                    GoneReason::Lost
                },
            });
            continue;
        };
        if draining {
            round.push(Action::ResumeStop {
                instance: name.clone(),
            });
            continue;
        }
        match (seen.exited, instance.runtime_id.is_none(), seen.address) {
            (Some((code, signal)), _, _) => round.push(Action::Exited {
                instance: name.clone(),
                runtime_id: seen.id.clone(),
                code,
                signal,
            }),
            (None, true, Some(address)) => round.push(Action::Adopt {
                instance: name.clone(),
                runtime_id: seen.id.clone(),
                address,
            }),
            (None, true, None) => {
                // Running but unreachable: nothing can route to it, so stop it.
                round.push(Action::RemoveOrphan {
                    runtime_id: seen.id.clone(),
                });
                round.push(Action::Forget {
                    instance: name.clone(),
                    reason: GoneReason::Lost,
                });
            }
            (None, false, _) => {}
        }
        // Drift is condemned as an exec is: the same replacement, with its evidence.
        let reason = match (seen.tainted, &seen.drift) {
            (true, _) => Some(CondemnReason::Tainted),
            (false, drift) => drift.clone(),
        };
        if let Some(reason) = reason
            && seen.exited.is_none()
            && instance.condemned.is_none()
            && !round.gone.contains(name)
        {
            round.push(Action::Condemn {
                instance: name.clone(),
                reason,
            });
        }
    }
    for seen in &observed.runtime {
        if observed.busy_ids.contains(&seen.id) {
            continue;
        }
        let known = seen
            .name
            .as_ref()
            .and_then(|name| state.instances.get(name))
            .is_some_and(|i| i.runtime_id.as_ref().is_none_or(|id| *id == seen.id));
        if !known {
            round.push(Action::RemoveOrphan {
                runtime_id: seen.id.clone(),
            });
        }
    }
}
