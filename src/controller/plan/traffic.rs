//! Which instances take new requests: every healthy instance of the service that is not
//! being drained, weight 1 each (the rolling strategy's split; blue/green and canary will
//! weigh releases differently here). Decided after the round's other jobs, so an instance
//! the round drains or forgets is already out, and put first among the round's actions, so
//! its route stops sending to it before the drain waits on it.

use std::collections::{BTreeMap, BTreeSet};

use super::Action;
use crate::events::{InstanceName, Lifecycle, State};

pub(super) fn decide(state: &State, gone: &BTreeSet<InstanceName>) -> Vec<Action> {
    let mut routes = Vec::new();
    for (service, service_state) in &state.services {
        let routed: BTreeMap<InstanceName, u32> = state
            .instances_of(service)
            .filter(|i| {
                i.lifecycle == Lifecycle::Healthy && i.address.is_some() && !gone.contains(&i.name)
            })
            .map(|i| (i.name.clone(), 1))
            .collect();
        if routed != service_state.traffic {
            routes.push(Action::Route {
                service: service.clone(),
                routed,
            });
        }
    }
    routes
}
