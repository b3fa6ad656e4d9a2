//! Planned failures, the pure half: what `[chaos]` asks for (`ChaosConfig`, as the event log
//! records it), when the next experiment is due (`schedule`), which services and instances it
//! may touch, and whether the steady state held while it ran (`checker`).
//!
//! No I/O, no clock and no randomness of its own: callers pass the time and a seeded
//! `fastrand::Rng`, so tests state statistical bounds. It names no other module of the
//! crate (like `size`), so the spec validates into these types, the log records them and
//! the controller's shell (`controller::chaos`) acts on them. Its serde shapes are part of
//! the event log's format (pinned by `tests/data/events/v2/chaos_*.json`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod checker;
pub mod schedule;

pub use checker::{Broken, Figures, Seen, Thresholds};
pub use schedule::{Candidate, Refusal, Window};

/// One million: shares of requests are kept in parts per million, so the log's types stay
/// `Eq` (no floats) and a share reads back exactly.
pub const PPM: u32 = 1_000_000;

/// What an experiment may do, as `kinds` and `graven chaos run --kind` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Take an instance out of its route, let its requests finish, stop it with its grace.
    Stop,
    /// SIGKILL an instance, as a crash would.
    Kill,
    /// Delay a share of the route's requests.
    Latency,
    /// Answer a share of the route's requests with an error status.
    Error,
    /// Close a share of the route's requests' connections without an answer.
    Reset,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Stop,
        Kind::Kill,
        Kind::Latency,
        Kind::Error,
        Kind::Reset,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Stop => "stop",
            Kind::Kill => "kill",
            Kind::Latency => "latency",
            Kind::Error => "error",
            Kind::Reset => "reset",
        }
    }

    pub fn parse(text: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// Whether it acts on one instance (stop, kill) rather than on the route (faults).
    pub fn targets_instance(self) -> bool {
        matches!(self, Kind::Stop | Kind::Kill)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One experiment as decided: the kind with its parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    Stop,
    Kill,
    Latency { delay: Duration, share_ppm: u32 },
    Error { status: u16, share_ppm: u32 },
    Reset { share_ppm: u32 },
}

impl Action {
    pub fn kind(&self) -> Kind {
        match self {
            Action::Stop => Kind::Stop,
            Action::Kill => Kind::Kill,
            Action::Latency { .. } => Kind::Latency,
            Action::Error { .. } => Kind::Error,
            Action::Reset { .. } => Kind::Reset,
        }
    }

    /// The action of `kind` with the config's parameters.
    pub fn of(kind: Kind, config: &ChaosConfig) -> Action {
        let share_ppm = config.share_ppm;
        match kind {
            Kind::Stop => Action::Stop,
            Kind::Kill => Action::Kill,
            Kind::Latency => Action::Latency {
                delay: config.latency,
                share_ppm,
            },
            Kind::Error => Action::Error {
                status: config.status,
                share_ppm,
            },
            Kind::Reset => Action::Reset { share_ppm },
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let percent = |ppm: u32| f64::from(ppm) / 10_000.0;
        match self {
            Action::Stop => f.write_str("graceful stop"),
            Action::Kill => f.write_str("kill -9"),
            Action::Latency { delay, share_ppm } => write!(
                f,
                "{} added to {}% of requests",
                humantime::format_duration(*delay),
                percent(*share_ppm)
            ),
            Action::Error { status, share_ppm } => {
                write!(
                    f,
                    "status {status} for {}% of requests",
                    percent(*share_ppm)
                )
            }
            Action::Reset { share_ppm } => {
                write!(
                    f,
                    "connection reset for {}% of requests",
                    percent(*share_ppm)
                )
            }
        }
    }
}

/// `[chaos]` of one environment, resolved (docs/chaos.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChaosConfig {
    /// The mean time between two scheduled experiments.
    pub mean_between: Duration,
    /// The least time between two scheduled experiments.
    pub min_between: Duration,
    /// When scheduled experiments may start; any time when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    /// Services never touched, scheduled or asked for.
    #[serde(default)]
    pub exempt: Vec<String>,
    /// Stateful services (volumes, stop-first) that opt in; others are never touched.
    #[serde(default)]
    pub stateful: Vec<String>,
    /// What scheduled experiments pick from.
    pub kinds: Vec<Kind>,
    /// How long an experiment lasts (a fault is set, the outage checker watches).
    pub duration: Duration,
    /// Record what would be done, do nothing.
    pub leashed: bool,
    /// Of the route's requests, the share a fault hits.
    pub share_ppm: u32,
    /// The delay a latency fault adds.
    pub latency: Duration,
    /// The status an error fault answers with.
    pub status: u16,
    pub checker: Thresholds,
    /// The scheduler's seed; a random one when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl Default for ChaosConfig {
    fn default() -> ChaosConfig {
        ChaosConfig {
            mean_between: Duration::from_secs(3600),
            min_between: Duration::from_secs(600),
            window: None,
            exempt: Vec::new(),
            stateful: Vec::new(),
            kinds: vec![Kind::Stop],
            duration: Duration::from_secs(30),
            leashed: false,
            share_ppm: 100_000,
            latency: Duration::from_millis(200),
            status: 503,
            checker: Thresholds::default(),
            seed: None,
        }
    }
}
