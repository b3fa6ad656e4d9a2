//! `graven events`: the app event log for people — where it stands, its events (and
//! following new ones), an append by hand, and compaction. It reads and writes the log's files
//! directly (the same locking as the daemon's writer), so no daemon is needed.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use crate::app_events::{AppEventLog, Append, Event, Kind, LOG_FILE};
use crate::spec;

#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    #[command(subcommand)]
    pub action: EventsAction,
}

#[derive(Debug, clap::Args)]
pub struct Scope {
    /// The app (default: graven.toml's in this directory).
    #[arg(long)]
    pub app: Option<String>,
    /// The environment.
    #[arg(long = "env", default_value = spec::DEFAULT_ENVIRONMENT)]
    pub environment: String,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum EventsAction {
    /// Where the log stands: first and last sequence, size, snapshot.
    Status(Scope),
    /// Print events from a sequence on; `-f` keeps printing new ones.
    Tail {
        #[command(flatten)]
        scope: Scope,
        /// The first sequence to print (default: the last ten).
        #[arg(long)]
        from: Option<u64>,
        /// Keep printing events as they are appended.
        #[arg(short, long)]
        follow: bool,
    },
    /// Append one event (the body as given, or stdin with `-`).
    Append {
        #[command(flatten)]
        scope: Scope,
        /// The body is JSON (checked, and given back as JSON).
        #[arg(long = "json-body")]
        json_body: bool,
        /// Append only if the last event is this one (optimistic concurrency).
        #[arg(long)]
        expected: Option<u64>,
        /// The event's body; `-` reads it from stdin.
        body: String,
    },
    /// Drop the events the app's snapshot covers.
    Compact(Scope),
    /// The URL of the log's API on loopback, with its token (for curl and scripts; it is a
    /// credential).
    Url(Scope),
}

pub fn run(home: &Path, args: EventsArgs) -> anyhow::Result<ExitCode> {
    match args.action {
        EventsAction::Status(scope) => status(home, &scope),
        EventsAction::Tail {
            scope,
            from,
            follow,
        } => tail(home, &scope, from, follow),
        EventsAction::Append {
            scope,
            json_body,
            expected,
            body,
        } => append(home, &scope, json_body, expected, &body),
        EventsAction::Compact(scope) => compact(home, &scope),
        EventsAction::Url(scope) => url(home, &scope),
    }
}

/// The directory of the log `scope` names: one the control plane made (the app was deployed
/// in that environment), never made here.
fn dir(home: &Path, scope: &Scope) -> anyhow::Result<PathBuf> {
    let app = match &scope.app {
        Some(app) => app.clone(),
        None => {
            spec::load(Path::new("."), &scope.environment)
                .context("no --app given and no graven.toml here to take it from")?
                .app
        }
    };
    let dir = home.join("apps").join(&app).join(&scope.environment);
    if !dir.is_dir() {
        anyhow::bail!(
            "{app} was never deployed in {}: it has no app event log",
            scope.environment
        );
    }
    Ok(dir)
}

fn open(home: &Path, scope: &Scope) -> anyhow::Result<AppEventLog> {
    let dir = dir(home, scope)?;
    AppEventLog::open(&dir).with_context(|| format!("opening {}", dir.join(LOG_FILE).display()))
}

fn status(home: &Path, scope: &Scope) -> anyhow::Result<ExitCode> {
    let log = open(home, scope)?;
    let position = log.position();
    let snapshot = log.snapshot()?.map(|s| s.seq);
    if scope.json {
        let value = serde_json::json!({
            "first": position.first,
            "last": position.last,
            "bytes": position.bytes,
            "snapshot": snapshot,
        });
        println!("{value}");
    } else {
        println!(
            "events {}..{} ({} bytes); snapshot: {}",
            position.first,
            position.last,
            position.bytes,
            snapshot.map_or("none".to_owned(), |seq| format!("as of {seq}"))
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn tail(home: &Path, scope: &Scope, from: Option<u64>, follow: bool) -> anyhow::Result<ExitCode> {
    let mut log = open(home, scope)?;
    let position = log.position();
    let mut next = from.unwrap_or_else(|| position.last.saturating_sub(9).max(position.first));
    let mut out = std::io::stdout().lock();
    loop {
        let events = log.read(next, 1000, 4 << 20)?;
        for event in &events {
            print_event(&mut out, event, scope.json)?;
        }
        if let Some(last) = events.last() {
            next = last.seq + 1;
            continue;
        }
        if !follow {
            break;
        }
        out.flush()?;
        // New events come from another process's writer: look again shortly.
        std::thread::sleep(Duration::from_millis(100));
        log.refresh()?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_event(out: &mut impl std::io::Write, event: &Event, json: bool) -> std::io::Result<()> {
    let body = match event.kind {
        Kind::Json => serde_json::from_slice(&event.body).unwrap_or(serde_json::Value::Null),
        Kind::Bytes => String::from_utf8_lossy(&event.body).into_owned().into(),
    };
    if json {
        let value = serde_json::json!({ "seq": event.seq, "time_ms": event.time_ms, "body": body });
        writeln!(out, "{value}")
    } else {
        let text = match body {
            serde_json::Value::String(text) => text,
            other => other.to_string(),
        };
        writeln!(out, "{:>8}  {}  {text}", event.seq, time(event.time_ms))
    }
}

fn time(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn append(
    home: &Path,
    scope: &Scope,
    json_body: bool,
    expected: Option<u64>,
    body: &str,
) -> anyhow::Result<ExitCode> {
    let body = if body == "-" {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)?;
        bytes
    } else {
        body.as_bytes().to_vec()
    };
    if json_body {
        serde_json::from_slice::<serde::de::IgnoredAny>(&body).context("the body is not JSON")?;
    }
    let mut log = open(home, scope)?;
    let kind = if json_body { Kind::Json } else { Kind::Bytes };
    let answer = log
        .append(&[Append {
            kind,
            body,
            expected,
        }])?
        .pop()
        .expect("one answer per append")?;
    if scope.json {
        println!("{}", serde_json::json!({ "seq": answer }));
    } else {
        println!("appended event {answer}");
    }
    Ok(ExitCode::SUCCESS)
}

fn compact(home: &Path, scope: &Scope) -> anyhow::Result<ExitCode> {
    let mut log = open(home, scope)?;
    let dropped = log.compact()?;
    let position = log.position();
    if scope.json {
        println!(
            "{}",
            serde_json::json!({ "dropped": dropped, "first": position.first, "last": position.last })
        );
    } else if dropped == 0 {
        println!("nothing to compact (no snapshot past the first event)");
    } else {
        println!(
            "dropped {dropped} events the snapshot covers; the log holds {}..{}",
            position.first, position.last
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn url(home: &Path, scope: &Scope) -> anyhow::Result<ExitCode> {
    let dir = dir(home, scope)?;
    let port: u16 = std::fs::read_to_string(home.join(crate::app_events::server::PORT_FILE))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .context("no control plane has served the app event log on this home yet")?;
    let token = crate::app_events::server::token(&dir)?;
    let app = dir
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let url = crate::app_events::server::url(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        app,
        &scope.environment,
        &token,
    );
    if scope.json {
        println!("{}", serde_json::json!({ "url": url }));
    } else {
        println!("{url}");
    }
    Ok(ExitCode::SUCCESS)
}
