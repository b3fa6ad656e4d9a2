//! Following the log as it is appended, and telling when a rollout has ended: what deploy
//! progress is made of, for the CLI in `graven up` (in process) and for the daemon, which
//! streams it over the API socket so no client polls.
//!
//! A `Follower` subscribes to the controller's appends before it reads what is already in
//! the log, so no event falls between the two; a reader too slow for the broadcast (it holds
//! the latest events only) catches up from the log, page by page. `RolloutWatch` is the one
//! place that says when each deploy of a rollout has ended, and how.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{ControllerError, ControllerHandle, HISTORY_PAGE, Rollout};
use crate::events::{DeployOutcome, Envelope, Event, ReleaseNumber, ServiceName};

/// How many appended events the broadcast keeps for a slow follower before it must catch
/// up from the log.
pub(super) const FOLLOW_BUFFER: usize = 1024;

/// The events of one controller's log after a sequence number, as they are appended.
pub struct Follower {
    handle: ControllerHandle,
    appended: broadcast::Receiver<Envelope<Event>>,
    /// The next sequence number to deliver.
    next: u64,
    /// Everything the log held past `next` has been delivered; the broadcast carries the rest.
    caught_up: bool,
}

impl Follower {
    pub fn new(handle: &ControllerHandle, after: u64) -> Follower {
        Follower {
            appended: handle.appended.subscribe(),
            handle: handle.clone(),
            next: after + 1,
            caught_up: false,
        }
    }

    /// The next events (at least one), waiting for them to be appended if need be. Fails
    /// once the controller has stopped.
    pub async fn next(&mut self) -> Result<Vec<Envelope<Event>>, ControllerError> {
        loop {
            // What the log already holds past what was delivered: at start, and after
            // falling behind the broadcast. Once caught up, the log is not read again.
            if !self.caught_up {
                let page = self.handle.history(self.next - 1).await?;
                if let Some(last) = page.last() {
                    self.next = last.seq + 1;
                    return Ok(page);
                }
                self.caught_up = true;
            }
            // Woken now and then to see whether the controller has stopped (its handle keeps
            // the broadcast open, so the channel alone never says so).
            let received =
                tokio::time::timeout(std::time::Duration::from_secs(1), self.appended.recv());
            let Ok(received) = received.await else {
                if self.handle.is_finished() {
                    return Err(self.stopped());
                }
                continue;
            };
            match received {
                Ok(envelope) if envelope.seq >= self.next => {
                    let mut events = vec![envelope];
                    while events.len() < HISTORY_PAGE
                        && let Ok(more) = self.appended.try_recv()
                    {
                        events.push(more);
                    }
                    // An event the broadcast skipped is read from the log instead.
                    if events[0].seq != self.next {
                        self.caught_up = false;
                        continue;
                    }
                    self.next = events.last().map_or(self.next, |e| e.seq + 1);
                    return Ok(events);
                }
                // Appended before this follower read the log: delivered already.
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => self.caught_up = false,
                Err(broadcast::error::RecvError::Closed) => return Err(self.stopped()),
            }
        }
    }

    fn stopped(&self) -> ControllerError {
        ControllerError::Stopped {
            app: self.handle.app().to_owned(),
            environment: self.handle.environment().to_owned(),
        }
    }
}

/// How one service's rollout ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub service: ServiceName,
    pub release: ReleaseNumber,
    #[serde(flatten)]
    pub outcome: DeployOutcome,
}

/// The deploys a rollout started, and which of them have ended.
#[derive(Debug, Clone)]
pub struct RolloutWatch {
    pending: BTreeMap<ServiceName, ReleaseNumber>,
    outcomes: Vec<Outcome>,
}

impl RolloutWatch {
    pub fn new(rollout: &Rollout) -> RolloutWatch {
        RolloutWatch {
            pending: rollout
                .started
                .iter()
                .map(|s| (s.service.clone(), s.to))
                .collect(),
            outcomes: Vec::new(),
        }
    }

    /// Takes one event into account; the outcome it ends, if any.
    pub fn observe(&mut self, envelope: &Envelope<Event>) -> Option<&Outcome> {
        let at_ms = envelope.at_ms;
        let ended = match &envelope.payload {
            Event::DeploySucceeded { service, release } => {
                Some((service, *release, DeployOutcome::Succeeded { at_ms }))
            }
            Event::DeployRolledBack {
                service,
                from,
                reason,
                ..
            } => Some((
                service,
                *from,
                DeployOutcome::RolledBack {
                    at_ms,
                    reason: reason.clone(),
                },
            )),
            Event::DeployStarted { service, to, .. } if self.pending.get(service) != Some(to) => {
                let release = self.pending.get(service).copied().unwrap_or(*to);
                Some((service, release, DeployOutcome::Superseded { at_ms }))
            }
            Event::ServiceRemoved { service } => {
                let release = self.pending.get(service).copied().unwrap_or_default();
                Some((service, release, DeployOutcome::Superseded { at_ms }))
            }
            _ => None,
        };
        let (service, release, outcome) = ended?;
        if self.pending.get(service) != Some(&release) {
            return None;
        }
        self.pending.remove(service);
        self.outcomes.push(Outcome {
            service: service.clone(),
            release,
            outcome,
        });
        self.outcomes.last()
    }

    /// Every started deploy has ended.
    pub fn done(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn outcomes(self) -> Vec<Outcome> {
        self.outcomes
    }
}
