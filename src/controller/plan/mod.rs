//! The pure half of the controller: given the folded state, what the runtime was last seen
//! running and the time, decide what to do next. No I/O and no clock of its own; the shell
//! appends each action's event before carrying it out, then plans again.
//!
//! A round is four jobs, each its own function: reconcile the log with the runtime's listing
//! (`reconcile`) and condemn what is past its age (`phoenix`), drain what no wanted service needs, plan each wanted service with the
//! planner of its release's strategy (`rolling`, `recreate`; a new strategy is a new file and a match arm
//! in `plan_service`), and decide which instances take traffic (`traffic`), which comes first
//! in the round's actions so that nothing is drained while a route still sends to it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use crate::events::{
    CondemnReason, DrainReason, Event, GoneReason, InstanceName, Lifecycle, ReleaseNumber,
    RollbackReason, RuntimeId, ServiceName, State, Strategy,
};
use crate::store::Digest;

pub mod phoenix;
mod reconcile;
mod recreate;
mod rolling;
mod traffic;

#[cfg(test)]
mod properties;
#[cfg(test)]
mod tests;

/// What the shell knows beyond the log: the runtime's last listing and its own work under way.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// False until the runtime has been listed once; nothing is judged lost or orphaned before.
    pub listed: bool,
    /// This app and environment's instances on the runtime, as last listed.
    pub runtime: Vec<Seen>,
    /// Instances with an effect under way, or started after the listing was taken: the
    /// listing cannot be trusted about them.
    pub busy: BTreeSet<InstanceName>,
    /// Runtime instances being stopped or removed.
    pub busy_ids: BTreeSet<RuntimeId>,
    /// When this controller started (ms since the epoch). Health deadlines count from here at
    /// the earliest: time a controller was down is not held against a release.
    pub since_ms: u64,
    /// What ends every new instance's name (`.<environment>.<app>`), so that names are
    /// unique across the apps and environments of a home, not only within one log.
    pub name_suffix: String,
    /// Images the runtime has prepared since this controller started: a stop-first
    /// replacement stops the old instance only once the new one's image is among them.
    pub prepared: BTreeSet<Digest>,
    /// The time zones the wanted releases' phoenix windows name, found by the shell in the
    /// system's database; a window whose zone is missing is never open.
    pub zones: BTreeMap<String, jiff::tz::TimeZone>,
}

/// One runtime instance as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub id: RuntimeId,
    /// The `instance` label: the name the controller gave it.
    pub name: Option<InstanceName>,
    /// `Some((code, signal))` once its process is gone.
    pub exited: Option<(Option<i32>, Option<i32>)>,
    pub address: Option<SocketAddr>,
    /// Someone ran a command inside it: it must be replaced.
    pub tainted: bool,
    /// A drift check found it changed from its image: it must be replaced, for this reason.
    pub drift: Option<CondemnReason>,
}

/// One decision. Most carry the event that announces them (`Action::event`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Launch {
        service: ServiceName,
        release: ReleaseNumber,
        instance: InstanceName,
    },
    /// Get the release's image ready to start (unpacked), recorded in `Observed::prepared`.
    Prepare {
        service: ServiceName,
        release: ReleaseNumber,
    },
    /// A launched instance the runtime runs though no start result was recorded.
    Adopt {
        instance: InstanceName,
        runtime_id: RuntimeId,
        address: SocketAddr,
    },
    Exited {
        instance: InstanceName,
        runtime_id: RuntimeId,
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// The runtime does not have the instance (any more).
    Forget {
        instance: InstanceName,
        reason: GoneReason,
    },
    /// The instance must be replaced; it serves until its replacement does.
    Condemn {
        instance: InstanceName,
        reason: CondemnReason,
    },
    Drain {
        instance: InstanceName,
        reason: DrainReason,
    },
    /// A draining instance whose stop is not under way (the controller restarted mid-drain).
    ResumeStop {
        instance: InstanceName,
    },
    /// Which instances of the service take new requests from now on.
    Route {
        service: ServiceName,
        routed: BTreeMap<InstanceName, u32>,
    },
    RemoveOrphan {
        runtime_id: RuntimeId,
    },
    Backoff {
        service: ServiceName,
        failures: u32,
        delay_ms: u64,
        until_ms: u64,
    },
    Succeed {
        service: ServiceName,
        release: ReleaseNumber,
    },
    RollBack {
        service: ServiceName,
        from: ReleaseNumber,
        to: Option<ReleaseNumber>,
        reason: RollbackReason,
    },
}

impl Action {
    /// The event that records this decision, appended before the effect.
    pub fn event(&self) -> Option<Event> {
        Some(match self.clone() {
            Action::Launch {
                service,
                release,
                instance,
            } => Event::InstanceLaunched {
                service,
                release,
                instance,
            },
            Action::Adopt {
                instance,
                runtime_id,
                address,
            } => Event::InstanceStarted {
                instance,
                runtime_id,
                address,
            },
            Action::Exited {
                instance,
                code,
                signal,
                ..
            } => Event::InstanceExited {
                instance,
                code,
                signal,
            },
            Action::Forget { instance, reason } => Event::InstanceGone { instance, reason },
            Action::Condemn { instance, reason } => Event::InstanceCondemned { instance, reason },
            Action::Drain { instance, reason } => Event::InstanceDraining { instance, reason },
            // The drain was recorded when it was decided; this only finishes it.
            Action::ResumeStop { .. } => return None,
            // Only work ahead of a decision; what it got ready is not the log's business.
            Action::Prepare { .. } => return None,
            Action::Route { service, routed } => Event::TrafficChanged { service, routed },
            Action::RemoveOrphan { runtime_id } => Event::OrphanRemoved { runtime_id },
            Action::Backoff {
                service,
                failures,
                delay_ms,
                until_ms,
            } => Event::CrashLoopBackoff {
                service,
                failures,
                delay_ms,
                until_ms,
            },
            Action::Succeed { service, release } => Event::DeploySucceeded { service, release },
            Action::RollBack {
                service,
                from,
                to,
                reason,
            } => Event::DeployRolledBack {
                service,
                from,
                to,
                reason,
            },
        })
    }

    /// The instance this action takes out of the running, if any.
    fn ends(&self) -> Option<&InstanceName> {
        match self {
            Action::Drain { instance, .. }
            | Action::Forget { instance, .. }
            | Action::Exited { instance, .. } => Some(instance),
            _ => None,
        }
    }
}

/// A deploy whose new instances failed this many times rolls back before its deadline.
pub const MAX_DEPLOY_FAILURES: u32 = 3;

/// How long launches wait after `failures` consecutive failed instances: the first
/// replacement is immediate, then 0.5 s doubling up to 30 s.
pub fn backoff_delay(failures: u32) -> Duration {
    if failures < 2 {
        return Duration::ZERO;
    }
    let exponent = (failures - 2).min(16);
    Duration::from_millis(500u64.saturating_mul(1 << exponent)).min(Duration::from_secs(30))
}

/// What one round decides so far, shared by the jobs of the round.
struct Round<'a> {
    state: &'a State,
    observed: &'a Observed,
    now_ms: u64,
    actions: Vec<Action>,
    /// Instances the actions so far have taken out of the running.
    gone: BTreeSet<InstanceName>,
    /// The highest instance number used so far, for naming launches.
    launched: u64,
}

impl Round<'_> {
    fn push(&mut self, action: Action) {
        if let Some(instance) = action.ends() {
            self.gone.insert(instance.clone());
        }
        self.actions.push(action);
    }

    fn drain(&mut self, instance: &InstanceName, reason: DrainReason) {
        self.push(Action::Drain {
            instance: instance.clone(),
            reason,
        });
    }

    fn launch(&mut self, service: &ServiceName, release: ReleaseNumber) {
        self.launched += 1;
        let instance = InstanceName(format!(
            "{service}-{release}-{}{}",
            self.launched, self.observed.name_suffix
        ));
        self.push(Action::Launch {
            service: service.clone(),
            release,
            instance,
        });
    }
}

pub fn plan(state: &State, observed: &Observed, now_ms: u64) -> Vec<Action> {
    let mut round = Round {
        state,
        observed,
        now_ms,
        actions: Vec::new(),
        gone: BTreeSet::new(),
        launched: state.launched,
    };
    if observed.listed {
        reconcile::reconcile(&mut round);
    }
    phoenix::plan(&mut round);
    drain_unwanted(&mut round);
    for service in state.wanted_services() {
        plan_service(&mut round, service);
    }
    let mut actions = traffic::decide(state, &round.gone);
    actions.append(&mut round.actions);
    actions
}

/// While shutting down: drain everything, finish drains, forget what never started. Traffic
/// to every instance stops first.
pub fn shutdown_plan(state: &State, observed: &Observed) -> Vec<Action> {
    let mut round = Round {
        state,
        observed,
        now_ms: 0,
        actions: Vec::new(),
        gone: BTreeSet::new(),
        launched: state.launched,
    };
    for instance in state.instances.values() {
        let name = &instance.name;
        let draining = instance.lifecycle == Lifecycle::Draining;
        if observed.busy.contains(name) || instance.runtime_id.is_some() {
            if draining {
                if !observed.busy.contains(name) {
                    round.push(Action::ResumeStop {
                        instance: name.clone(),
                    });
                }
            } else {
                round.drain(name, DrainReason::Shutdown);
            }
        } else {
            round.push(Action::Forget {
                instance: name.clone(),
                reason: GoneReason::Lost,
            });
        }
    }
    let mut actions = traffic::decide(state, &round.gone);
    actions.append(&mut round.actions);
    actions
}

/// Drains the instances of services that are no longer wanted.
fn drain_unwanted(round: &mut Round<'_>) {
    let state = round.state;
    for instance in state.instances.values() {
        let wanted = state.services.get(&instance.service).and_then(|s| s.wanted);
        if wanted.is_none()
            && instance.lifecycle != Lifecycle::Draining
            && !round.gone.contains(&instance.name)
        {
            round.drain(&instance.name, DrainReason::ServiceRemoved);
        }
    }
}

/// Plans one wanted service with the planner of its wanted release's strategy.
fn plan_service(round: &mut Round<'_>, service: &ServiceName) {
    let state = round.state;
    let Some(release) = state.wanted_release(service) else {
        return;
    };
    if recreate::applies(state, service, release) {
        return recreate::plan(round, service, release);
    }
    match release.config.strategy {
        Strategy::Rolling {
            max_surge,
            max_unavailable,
        } => rolling::plan(round, service, release, max_surge, max_unavailable),
        Strategy::Recreate => recreate::plan(round, service, release),
    }
}
