//! Planned failures, the shell's half: the scheduler and the outage checker run here, on the
//! controller's loop, each round. What to do is `crate::chaos`'s (pure); this file samples
//! the routes' figures, records each experiment's events before its effect, and carries it
//! out through the controller's own machinery: a graceful stop is a drain (out of the route,
//! its requests finished, then stopped; the planner replaces it), a kill is
//! `Runtime::kill`, a fault is set on the service's route with its deadline.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Action, ControllerError, Shell, instance_id, now_ms, warn};
use crate::chaos::{self, Candidate, ChaosConfig, Figures, Kind};
use crate::events::{
    ChaosOutcome, DrainReason, Event, InstanceName, Lifecycle, ServiceName, State, Strategy,
};
use crate::proxy::faults::{Effect, Fault};
use crate::proxy::{AnyRoute, RouteMetrics};

/// How often the routes' figures are sampled and a running experiment judged.
const SAMPLE_EVERY_MS: u64 = 1000;

/// The most samples kept (the longest baseline or window the checker may look back over).
const SAMPLES_KEPT: usize = 3600;

/// What `graven chaos run` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChaosRequest {
    /// Any service that allows it when none.
    pub service: Option<ServiceName>,
    /// Any of the config's kinds (stop when no config) when none.
    pub kind: Option<Kind>,
    /// The config's duration when none.
    pub duration: Option<Duration>,
}

/// The experiment a `chaos run` started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChaosStarted {
    /// Events after this sequence number tell how it goes.
    pub after_seq: u64,
    pub experiment: u64,
    pub service: ServiceName,
    pub instance: Option<InstanceName>,
    pub action: chaos::Action,
    pub duration: Duration,
    pub leashed: bool,
}

/// The scheduler's and the checker's memory, which the log need not keep: the random
/// generator, when the next scheduled experiment is due, recent samples of each route's
/// figures, and the running experiment's baseline.
pub(super) struct Chaos {
    rng: fastrand::Rng,
    /// The config's seed the generator was last made from.
    seed: Option<u64>,
    next_at_ms: Option<u64>,
    samples: VecDeque<(u64, BTreeMap<ServiceName, Figures>)>,
    /// The running experiment, as this controller started it: None after a restart.
    live: Option<Live>,
}

struct Live {
    experiment: u64,
    /// The service's figures when it started, and over the baseline before it.
    start: Figures,
    baseline: Figures,
    last_judged_ms: u64,
}

impl Default for Chaos {
    fn default() -> Chaos {
        Chaos {
            rng: fastrand::Rng::new(),
            seed: None,
            next_at_ms: None,
            samples: VecDeque::new(),
            live: None,
        }
    }
}

/// A route's cumulative figures, as the outage checker reads them.
fn figures(metrics: &RouteMetrics) -> Figures {
    let mut figures = Figures {
        requests: metrics.unrouted.client + metrics.unrouted.upstream + metrics.unrouted.graven,
        errors: metrics.unrouted.upstream + metrics.unrouted.graven,
        injected: metrics.injected.errors + metrics.injected.resets,
        ..Figures::default()
    };
    figures.requests += figures.injected;
    for release in &metrics.releases {
        figures.requests += release.requests;
        figures.errors +=
            release.responses.server_error + release.errors.upstream + release.errors.graven;
        if figures.counts.len() < release.latency.counts.len() {
            figures.counts.resize(release.latency.counts.len(), 0);
            figures.bounds_us.clone_from(&release.latency.bounds_us);
        }
        for (sum, count) in figures.counts.iter_mut().zip(&release.latency.counts) {
            *sum += count;
        }
    }
    figures
}

/// The services an experiment could touch, as the pure chooser sees them.
fn candidates(state: &State, http_routes: &[ServiceName]) -> Vec<Candidate> {
    state
        .wanted_services()
        .filter_map(|service| {
            let release = state.wanted_release(service)?;
            let scale = state.scale(service)?;
            let traffic = &state.services.get(service)?.traffic;
            let config = &release.config;
            let (max_unavailable, stop_first) = match config.strategy {
                Strategy::Rolling {
                    max_unavailable, ..
                } => (max_unavailable, false),
                Strategy::Recreate => (1, true),
            };
            let healthy = state
                .instances_of(service)
                .filter(|i| {
                    i.lifecycle == Lifecycle::Healthy
                        && i.release == release.number
                        && i.condemned.is_none()
                        && traffic.contains_key(&i.name)
                })
                .map(|i| i.name.to_string())
                .collect();
            Some(Candidate {
                service: service.to_string(),
                desired: scale.instances,
                max_unavailable,
                healthy,
                stateful: stop_first || !config.volumes.is_empty(),
                deploying: state.services.get(service)?.deploy.is_some(),
                http_route: http_routes.contains(service),
            })
        })
        .collect()
}

impl Shell {
    /// One round of planned failures: sample the routes, judge or end the running
    /// experiment, or start a scheduled one when it is due.
    pub(super) fn chaos_round(&mut self) -> Result<(), ControllerError> {
        if self.shutting_down.is_some() {
            return Ok(());
        }
        let now = now_ms();
        // Sampled whether or not chaos is configured, so `graven chaos run` has a baseline.
        self.sample(now);
        if self.state.chaos.running.is_some() {
            // One at a time: a scheduled start that falls due meanwhile is skipped.
            if self.chaos.next_at_ms.is_some_and(|due| now >= due)
                && let Some(config) = &self.state.chaos.config
            {
                let wait = chaos::schedule::next_gap(config, &mut self.chaos.rng);
                self.chaos.next_at_ms = Some(now + wait.as_millis() as u64);
            }
            return self.watch_experiment(now);
        }
        let Some(config) = self.state.chaos.config.clone() else {
            self.chaos.next_at_ms = None;
            return Ok(());
        };
        if self.chaos.seed != config.seed {
            self.chaos.seed = config.seed;
            self.chaos.rng = config
                .seed
                .map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed);
            self.chaos.next_at_ms = None;
        }
        let gap = |chaos: &mut super::chaos::Chaos| {
            chaos::schedule::next_gap(&config, &mut chaos.rng).as_millis() as u64
        };
        let Some(due) = self.chaos.next_at_ms else {
            let wait = gap(&mut self.chaos);
            self.chaos.next_at_ms = Some(now + wait);
            return Ok(());
        };
        if now < due {
            return Ok(());
        }
        // Due: the next is drawn from now whether this one can start or is skipped (outside
        // the window, while paused, or when nothing may be touched).
        let wait = gap(&mut self.chaos);
        self.chaos.next_at_ms = Some(now + wait);
        let in_window = config.window.as_ref().is_none_or(|w| w.contains(now));
        if !in_window || now < self.state.chaos.paused_until_ms {
            return Ok(());
        }
        let candidates = candidates(&self.state, &self.http_routes());
        let Some((kind, service, instance)) =
            chaos::schedule::choose(&config, &candidates, &mut self.chaos.rng)
        else {
            return Ok(());
        };
        let action = chaos::Action::of(kind, &config);
        self.start_experiment(
            &config,
            super::CONTROLLER,
            ServiceName(service),
            instance.map(InstanceName),
            action,
            config.duration,
            true,
        )
        .map(|_| ())
    }

    /// `graven chaos run`: one experiment now, by the same rules as a scheduled one (but
    /// the window, the schedule and the pause).
    pub(super) fn chaos_run(
        &mut self,
        request: ChaosRequest,
        actor: &str,
    ) -> Result<ChaosStarted, ControllerError> {
        let refused = |reason: String| ControllerError::ChaosRefused { reason };
        if let Some(running) = &self.state.chaos.running {
            return Err(refused(format!(
                "experiment {} on {} is still running",
                running.experiment, running.service
            )));
        }
        let config = self.state.chaos.config.clone().unwrap_or_default();
        let candidates = candidates(&self.state, &self.http_routes());
        if let Some(service) = &request.service
            && !candidates.iter().any(|c| c.service == service.as_str())
        {
            return Err(ControllerError::UnknownService {
                service: service.clone(),
            });
        }
        let kinds: Vec<Kind> = match request.kind {
            Some(kind) => vec![kind],
            None => config.kinds.clone(),
        };
        let in_scope: Vec<Candidate> = candidates
            .into_iter()
            .filter(|c| {
                request
                    .service
                    .as_ref()
                    .is_none_or(|s| s.as_str() == c.service)
            })
            .collect();
        // The scheduler's own draw, over the kinds and services asked for.
        let scope = chaos::ChaosConfig {
            kinds: kinds.clone(),
            ..config.clone()
        };
        let Some((kind, service, instance)) =
            chaos::schedule::choose(&scope, &in_scope, &mut self.chaos.rng)
        else {
            let reasons: Vec<String> = in_scope
                .iter()
                .flat_map(|candidate| {
                    kinds.iter().filter_map(|&kind| {
                        chaos::schedule::allowed(&config, candidate, kind)
                            .err()
                            .map(|refusal| format!("{kind} of {}: {refusal}", candidate.service))
                    })
                })
                .collect();
            return Err(refused(if reasons.is_empty() {
                "no service is deployed".to_owned()
            } else {
                reasons.join("; ")
            }));
        };
        let instance = instance.map(InstanceName);
        let service = ServiceName(service);
        let duration = request.duration.unwrap_or(config.duration);
        let action = chaos::Action::of(kind, &config);
        let after_seq = self.state.seq;
        let experiment = self.start_experiment(
            &config,
            actor,
            service.clone(),
            instance.clone(),
            action.clone(),
            duration,
            false,
        )?;
        Ok(ChaosStarted {
            after_seq,
            experiment,
            service,
            instance,
            action,
            duration,
            leashed: config.leashed,
        })
    }

    /// Records the experiment's start, then (unless leashed) carries it out.
    #[allow(clippy::too_many_arguments)]
    fn start_experiment(
        &mut self,
        config: &ChaosConfig,
        actor: &str,
        service: ServiceName,
        instance: Option<InstanceName>,
        action: chaos::Action,
        duration: Duration,
        scheduled: bool,
    ) -> Result<u64, ControllerError> {
        let now = now_ms();
        let experiment = self.state.chaos.experiments + 1;
        let current = self.current_figures(&service);
        let baseline = self
            .figures_at(
                &service,
                now.saturating_sub(config.checker.baseline.as_millis() as u64),
            )
            .map(|earlier| current.since(&earlier))
            .unwrap_or_default();
        self.record_as(
            actor,
            Event::ChaosStarted {
                experiment,
                service: service.clone(),
                instance: instance.clone(),
                action: action.clone(),
                duration,
                leashed: config.leashed,
                scheduled,
                baseline: Some(baseline.seen()),
            },
        )?;
        if config.leashed {
            return Ok(experiment);
        }
        self.chaos.live = Some(Live {
            experiment,
            start: current,
            baseline,
            last_judged_ms: now,
        });
        match (&action, instance) {
            (chaos::Action::Stop, Some(instance)) => {
                self.act(Action::Drain {
                    instance,
                    reason: DrainReason::Chaos { experiment },
                })?;
            }
            (chaos::Action::Kill, Some(instance)) => {
                let id = self
                    .state
                    .instances
                    .get(&instance)
                    .and_then(|i| i.runtime_id.as_ref())
                    .map(instance_id);
                if let Some(id) = id {
                    let runtime = self.options.runtime.clone();
                    tokio::spawn(async move {
                        use crate::runtime::Runtime as _;
                        if let Err(error) = runtime.kill(&id).await {
                            warn(format_args!("graven: chaos: killing {instance}: {error}"));
                        }
                    });
                }
            }
            (
                chaos::Action::Latency { .. }
                | chaos::Action::Error { .. }
                | chaos::Action::Reset { .. },
                _,
            ) => {
                self.set_fault(&service, Some(fault(&action, duration)));
            }
            (chaos::Action::Stop | chaos::Action::Kill, None) => {}
        }
        Ok(experiment)
    }

    /// Ends the running experiment when its time is up, its service changed, or the outage
    /// checker finds the steady state broken.
    fn watch_experiment(&mut self, now: u64) -> Result<(), ControllerError> {
        let Some(running) = self.state.chaos.running.clone() else {
            return Ok(());
        };
        let live = self
            .chaos
            .live
            .as_ref()
            .filter(|live| live.experiment == running.experiment);
        let Some(live) = live else {
            // Started by a controller that has stopped since: its baseline is gone.
            return self.end_experiment(
                &running.service,
                running.experiment,
                ChaosOutcome::Interrupted {
                    why: "the controller restarted".to_owned(),
                },
                Figures::default(),
            );
        };
        let current = self.current_figures(&running.service);
        let seen = current.since(&live.start);
        let service_state = self.state.services.get(&running.service);
        if service_state.is_none_or(|s| s.wanted.is_none()) {
            let why = format!("service {} was removed", running.service);
            return self.end_experiment(
                &running.service,
                running.experiment,
                ChaosOutcome::Interrupted { why },
                seen,
            );
        }
        if service_state.is_some_and(|s| s.deploy.is_some()) {
            let why = format!("a deploy of {} began", running.service);
            return self.end_experiment(
                &running.service,
                running.experiment,
                ChaosOutcome::Interrupted { why },
                seen,
            );
        }
        if now >= running.until_ms {
            return self.end_experiment(
                &running.service,
                running.experiment,
                ChaosOutcome::Completed,
                seen,
            );
        }
        if now < live.last_judged_ms + SAMPLE_EVERY_MS {
            return Ok(());
        }
        let thresholds = self
            .state
            .chaos
            .config
            .as_ref()
            .map(|c| c.checker.clone())
            .unwrap_or_default();
        let window_start = now.saturating_sub(thresholds.window.as_millis() as u64);
        // The window judged never reaches back before the experiment began.
        let earlier = match self.figures_at(&running.service, window_start) {
            Some(earlier) if window_start >= running.started_at_ms => earlier,
            _ => live.start.clone(),
        };
        let window = current.since(&earlier);
        let verdict = chaos::checker::judge(&thresholds, &live.baseline, &window);
        if let Some(live) = &mut self.chaos.live {
            live.last_judged_ms = now;
        }
        if let Some(broken) = verdict {
            let paused_until_ms = now.saturating_add(thresholds.cool_down.as_millis() as u64);
            return self.end_experiment(
                &running.service,
                running.experiment,
                ChaosOutcome::Aborted {
                    broken,
                    paused_until_ms,
                },
                seen,
            );
        }
        Ok(())
    }

    fn end_experiment(
        &mut self,
        service: &ServiceName,
        experiment: u64,
        outcome: ChaosOutcome,
        seen: Figures,
    ) -> Result<(), ControllerError> {
        // Faults come off first: an abort must stop hurting users even if the log cannot
        // record it (the fault's own deadline would end it anyway).
        self.set_fault(service, None);
        self.chaos.live = None;
        self.record(Event::ChaosEnded {
            experiment,
            outcome,
            seen: seen.seen(),
        })?;
        Ok(())
    }

    fn set_fault(&self, service: &ServiceName, fault: Option<Fault>) {
        if let Some(entry) = self.routes.get(service) {
            entry.route.set_fault(fault);
        }
    }

    fn http_routes(&self) -> Vec<ServiceName> {
        self.routes
            .iter()
            .filter(|(_, entry)| matches!(*entry.route, AnyRoute::Http(_)))
            .map(|(service, _)| service.clone())
            .collect()
    }

    fn current_figures(&self, service: &ServiceName) -> Figures {
        self.routes
            .get(service)
            .map(|entry| figures(&entry.route.metrics()))
            .unwrap_or_default()
    }

    /// The service's figures as last sampled at or before `at_ms` (the oldest kept when
    /// none is that old), None when none was sampled.
    fn figures_at(&self, service: &ServiceName, at_ms: u64) -> Option<Figures> {
        let samples = &self.chaos.samples;
        let sample = samples
            .iter()
            .rev()
            .find(|(t, _)| *t <= at_ms)
            .or_else(|| samples.front())?;
        sample.1.get(service).cloned()
    }

    fn sample(&mut self, now: u64) {
        if self
            .chaos
            .samples
            .back()
            .is_some_and(|(t, _)| now < t + SAMPLE_EVERY_MS)
        {
            return;
        }
        let figures: BTreeMap<ServiceName, Figures> = self
            .routes
            .iter()
            .map(|(service, entry)| (service.clone(), figures(&entry.route.metrics())))
            .collect();
        self.chaos.samples.push_back((now, figures));
        while self.chaos.samples.len() > SAMPLES_KEPT {
            self.chaos.samples.pop_front();
        }
    }
}

/// The route fault an action sets, until `duration` from now.
fn fault(action: &chaos::Action, duration: Duration) -> Fault {
    let until = std::time::Instant::now() + duration;
    let (effect, share_ppm) = match *action {
        chaos::Action::Latency { delay, share_ppm } => (Effect::Latency(delay), share_ppm),
        chaos::Action::Error { status, share_ppm } => (Effect::Error(status), share_ppm),
        chaos::Action::Reset { share_ppm } => (Effect::Reset, share_ppm),
        chaos::Action::Stop | chaos::Action::Kill => (Effect::Reset, 0),
    };
    Fault {
        effect,
        share_ppm,
        until,
    }
}
