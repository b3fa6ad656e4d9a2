//! `graven chaos run` (one experiment now, through the daemon) and `graven chaos report`
//! (every experiment in the event log, with what users saw while it ran).

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;

use super::project::{TargetArgs, reported_target};
use super::{Threads, async_runtime};
use crate::api::client::ClientError;
use crate::api::{ChaosRunRequest, Client, HistoryRequest};
use crate::chaos::{Action, Kind, Seen};
use crate::controller::ChaosRequest;
use crate::events::{ChaosOutcome, Envelope, Event};

/// Prints a line to stdout; a closed stdout ends nothing.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Debug, clap::Args)]
pub struct ChaosArgs {
    #[command(subcommand)]
    pub command: ChaosCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ChaosCommand {
    /// Start one experiment now: a graceful stop, a kill, or a fault at the route.
    Run(RunArgs),
    /// Every experiment: what it did, what users saw while it ran, whether it was aborted.
    Report(ReportArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The service (default: any that allows the experiment).
    pub service: Option<String>,
    /// stop, kill, latency, error or reset (default: one of `[chaos] kinds`).
    #[arg(long, value_parser = parse_kind)]
    pub kind: Option<Kind>,
    /// How long it lasts (default: `[chaos] duration`).
    #[arg(long = "for", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    #[command(flatten)]
    pub target: TargetArgs,
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Only experiments that started within this long (`1h`, `7d`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
    #[command(flatten)]
    pub target: TargetArgs,
}

fn parse_kind(text: &str) -> Result<Kind, String> {
    Kind::parse(text).ok_or_else(|| {
        format!(
            "{text:?} is not a kind: stop, kill, latency, error or reset ({})",
            "see docs/chaos.md"
        )
    })
}

pub fn run(home: &Path, args: ChaosArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        ChaosCommand::Run(args) => chaos_run(home, args),
        ChaosCommand::Report(args) => report(home, args),
    }
}

fn chaos_run(home: &Path, args: RunArgs) -> anyhow::Result<ExitCode> {
    let request = ChaosRunRequest {
        target: reported_target(&args.target),
        request: ChaosRequest {
            service: args.service.as_deref().map(Into::into),
            kind: args.kind,
            duration: args.duration,
        },
    };
    let runtime = async_runtime(Threads::One)?;
    let accepted = runtime
        .block_on(Client::new(home).chaos_run(&request))
        .context("starting a chaos experiment")?;
    if args.target.json {
        say!("{}", serde_json::to_string_pretty(&accepted)?);
        return Ok(ExitCode::SUCCESS);
    }
    let started = &accepted.started;
    let target = match &started.instance {
        Some(instance) => format!("instance {instance} of {}", started.service),
        None => format!("the route of {}", started.service),
    };
    let verb = if started.leashed {
        "leashed: recorded what it would do,"
    } else {
        "started:"
    };
    say!(
        "chaos experiment {} {verb} {} on {target} for {} ({}/{}); `graven chaos report` \
         tells what users saw",
        started.experiment,
        started.action,
        humantime::format_duration(started.duration),
        accepted.app,
        accepted.environment
    );
    Ok(ExitCode::SUCCESS)
}

/// One experiment as the report shows it.
#[derive(Debug, Clone, Serialize)]
struct Experiment {
    experiment: u64,
    started_at_ms: u64,
    by: String,
    scheduled: bool,
    service: String,
    instance: Option<String>,
    action: Action,
    duration: Duration,
    leashed: bool,
    baseline: Option<Seen>,
    ended_at_ms: Option<u64>,
    outcome: Option<ChaosOutcome>,
    seen: Option<Seen>,
}

/// Pairs each experiment's start with its end, in the order they started.
fn experiments(events: &[Envelope<Event>]) -> Vec<Experiment> {
    let mut found: Vec<Experiment> = Vec::new();
    for envelope in events {
        match &envelope.payload {
            Event::ChaosStarted {
                experiment,
                service,
                instance,
                action,
                duration,
                leashed,
                scheduled,
                baseline,
            } => found.push(Experiment {
                experiment: *experiment,
                started_at_ms: envelope.at_ms,
                by: envelope.actor.clone(),
                scheduled: *scheduled,
                service: service.to_string(),
                instance: instance.as_ref().map(|i| i.to_string()),
                action: action.clone(),
                duration: *duration,
                leashed: *leashed,
                baseline: *baseline,
                ended_at_ms: None,
                outcome: None,
                seen: None,
            }),
            Event::ChaosEnded {
                experiment,
                outcome,
                seen,
            } => {
                if let Some(started) = found.iter_mut().rev().find(|e| e.experiment == *experiment)
                {
                    started.ended_at_ms = Some(envelope.at_ms);
                    started.outcome = Some(outcome.clone());
                    started.seen = Some(*seen);
                }
            }
            _ => {}
        }
    }
    found
}

fn report(home: &Path, args: ReportArgs) -> anyhow::Result<ExitCode> {
    let target = reported_target(&args.target);
    let client = Client::new(home);
    let runtime = async_runtime(Threads::One)?;
    let mut events = Vec::new();
    let mut offline: Option<crate::events::EventLog> = None;
    let mut after = 0;
    loop {
        let page = match &offline {
            Some(log) => log.read_page(after, crate::controller::HISTORY_PAGE)?,
            None => {
                let request = HistoryRequest {
                    target: target.clone(),
                    after,
                };
                match runtime.block_on(client.history(&request)) {
                    Ok(page) => page,
                    Err(ClientError::NoDaemon { .. }) => {
                        let log = offline.insert(crate::api::offline::log(home, &target)?);
                        log.read_page(after, crate::controller::HISTORY_PAGE)?
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        };
        let Some(last) = page.last() else {
            break;
        };
        after = last.seq;
        // Only the chaos events are kept: a long log is read page by page, never whole.
        events.extend(page.into_iter().filter(|e| {
            matches!(
                e.payload,
                Event::ChaosStarted { .. } | Event::ChaosEnded { .. }
            )
        }));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let since = args.since.map(|s| now.saturating_sub(s.as_millis() as u64));
    let found: Vec<Experiment> = experiments(&events)
        .into_iter()
        .filter(|e| since.is_none_or(|since| e.started_at_ms >= since))
        .collect();
    if args.target.json {
        say!("{}", serde_json::to_string_pretty(&found)?);
        return Ok(ExitCode::SUCCESS);
    }
    if found.is_empty() {
        say!("no chaos experiment yet");
        return Ok(ExitCode::SUCCESS);
    }
    for e in &found {
        let at =
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(e.started_at_ms));
        let target = match &e.instance {
            Some(instance) => instance.clone(),
            None => format!("route of {}", e.service),
        };
        let how = if e.scheduled { "scheduled" } else { "asked by" };
        let by = if e.scheduled {
            String::new()
        } else {
            format!(" {}", e.by)
        };
        say!(
            "#{} {at} {} on {target} for {} ({how}{by})",
            e.experiment,
            e.action,
            humantime::format_duration(e.duration)
        );
        if e.leashed {
            say!("    leashed: nothing was done");
            continue;
        }
        let outcome = match &e.outcome {
            Some(outcome) => outcome.to_string(),
            None => "running".to_owned(),
        };
        say!("    {outcome}");
        if let Some(seen) = &e.seen {
            say!("    users saw: {}", seen_line(seen));
        }
        if let Some(baseline) = &e.baseline {
            say!("    before:    {}", seen_line(baseline));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn seen_line(seen: &Seen) -> String {
    let us = |n: u64| humantime::format_duration(Duration::from_micros(n)).to_string();
    format!(
        "{} requests, {} failed, {} injected, p50 {}, p99 {}",
        seen.requests,
        seen.errors,
        seen.injected,
        us(seen.p50_us),
        us(seen.p99_us)
    )
}
