//! `graven drift`: what the drift checks found. The current findings are the runtime's (each
//! running instance found changed from its image, waiting to be replaced); the history is
//! every instance condemned for drift in the event logs, with its evidence. `--check` runs
//! a check of every running instance now instead of waiting for the schedule. No daemon is
//! needed: both are read from the home.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use serde::Serialize;

use crate::api::Target;
use crate::events::{CondemnReason, Event, EventLog};
use crate::runtime::local::LocalRuntime;
use crate::runtime::{Drift, DriftCheck, InstanceId};

#[derive(Debug, clap::Args)]
pub struct DriftArgs {
    /// Only this app's history.
    #[arg(long)]
    pub app: Option<String>,
    /// Only this environment's history.
    #[arg(long = "env")]
    pub environment: Option<String>,
    /// Check every running instance now (its image's root and its programs) and record what
    /// is found; a control plane then replaces the instances.
    #[arg(long)]
    pub check: bool,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// One running instance found changed.
#[derive(Debug, Serialize)]
struct Current {
    id: InstanceId,
    instance: Option<String>,
    drift: Drift,
}

/// One instance condemned for drift, as its event log recorded it.
#[derive(Debug, Serialize)]
struct Past {
    app: String,
    environment: String,
    seq: u64,
    at_ms: u64,
    instance: String,
    reason: CondemnReason,
}

#[derive(Debug, Serialize)]
struct Report {
    current: Vec<Current>,
    history: Vec<Past>,
}

pub fn drift(home: &Path, args: DriftArgs) -> anyhow::Result<ExitCode> {
    let runtime = LocalRuntime::open(home)?;
    let instances = runtime.list_blocking()?;
    if args.check {
        let ids: Vec<InstanceId> = instances
            .iter()
            .filter(|i| !i.status.is_exited())
            .map(|i| i.id.clone())
            .collect();
        runtime
            .check_drift_blocking(&ids, DriftCheck::default())
            .context("checking for drift")?;
    }
    let current: Vec<Current> = runtime
        .list_blocking()?
        .into_iter()
        .filter(|i| !i.status.is_exited())
        .filter_map(|i| {
            Some(Current {
                instance: i.labels.get("instance").cloned(),
                drift: i.drift?,
                id: i.id,
            })
        })
        .collect();
    let target = Target {
        app: args.app.clone(),
        environment: args.environment.clone(),
    };
    let mut history = Vec::new();
    for (app, environment, path) in crate::api::offline::logs(home, &target)? {
        let log = EventLog::open(&path)?;
        let mut after = 0;
        loop {
            let page = log.read_page::<Event>(after, crate::controller::HISTORY_PAGE)?;
            let Some(last) = page.last() else {
                break;
            };
            after = last.seq;
            for envelope in page {
                if let Event::InstanceCondemned { instance, reason } = envelope.payload
                    && reason.is_drift()
                {
                    history.push(Past {
                        app: app.clone(),
                        environment: environment.clone(),
                        seq: envelope.seq,
                        at_ms: envelope.at_ms,
                        instance: instance.to_string(),
                        reason,
                    });
                }
            }
        }
    }
    if args.json {
        say!(
            "{}",
            serde_json::to_string_pretty(&Report { current, history })?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if current.is_empty() {
        say!("no running instance differs from its image");
    }
    for c in &current {
        let name = c.instance.as_deref().unwrap_or(c.id.0.as_str());
        say!("{name} ({}): {}", c.id, describe(&c.drift));
    }
    if !history.is_empty() {
        say!("condemned for drift:");
    }
    for past in &history {
        say!(
            "  {} {}/{} {}: {}",
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(past.at_ms)
            ),
            past.app,
            past.environment,
            past.instance,
            past.reason
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(drift: &Drift) -> String {
    match drift {
        Drift::RootChanged {
            path,
            change,
            expected,
            found,
        } => format!(
            "its image's file {path} changed ({}): expected {}, found {}",
            change.as_str(),
            expected.as_deref().unwrap_or("nothing"),
            found.as_deref().unwrap_or("nothing")
        ),
        Drift::ForeignProgram { pid, exe, cmdline } => {
            format!("process {pid} runs {exe}, which is not in its image ({cmdline})")
        }
    }
}
