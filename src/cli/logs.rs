//! `graven logs`: the lines of every instance (and other source) in the log store, merged in
//! time order, filtered, searched and followed. It reads the store directly: no control
//! plane need run.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::logs::read::{Pattern, read};
use crate::logs::{Cursor, Follower, Query, Record, Stream};

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// Only these services (default: every one).
    pub services: Vec<String>,
    /// The app (default: every app).
    #[arg(long)]
    pub app: Option<String>,
    /// The environment (default: every environment).
    #[arg(long = "env")]
    pub environment: Option<String>,
    /// Keep printing new lines as they are written, across deploys.
    #[arg(short, long)]
    pub follow: bool,
    /// Lines from this long ago (`10m`, `2h`) or this time (RFC 3339) on.
    #[arg(long)]
    pub since: Option<String>,
    /// Lines up to this long ago or this time.
    #[arg(long)]
    pub until: Option<String>,
    /// Only the last N lines (with `-f`, of what is there before following).
    #[arg(long, value_name = "N")]
    pub tail: Option<usize>,
    /// Only the instances of this release.
    #[arg(long, value_name = "N")]
    pub release: Option<u64>,
    /// Only this instance (its name, such as `web-3`, or its id).
    #[arg(long, value_name = "NAME")]
    pub instance: Option<String>,
    /// Only this stream: stdout or stderr.
    #[arg(long)]
    pub stream: Option<Stream>,
    /// Only lines that hold this text.
    #[arg(long, value_name = "TEXT")]
    pub grep: Option<String>,
    /// Only lines that match this regular expression (Rust's `regex` syntax).
    #[arg(long, value_name = "RE")]
    pub regex: Option<String>,
    /// One JSON object per line: time, app, environment, service, release, instance (and
    /// the runtime's id), stream, line.
    #[arg(long)]
    pub json: bool,
}

/// A time given as a duration before now or an RFC 3339 time, in ns since the epoch.
fn time_arg(flag: &str, value: &str) -> anyhow::Result<u64> {
    if let Ok(ago) = humantime::parse_duration(value) {
        return Ok(crate::logs::now_ns().saturating_sub(ago.as_nanos() as u64));
    }
    let at = humantime::parse_rfc3339_weak(value).with_context(|| {
        format!("--{flag} {value}: expected a duration (10m, 2h) or an RFC 3339 time")
    })?;
    Ok(at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64))
}

fn query(args: &LogsArgs) -> anyhow::Result<Query> {
    let mut patterns = Vec::new();
    if let Some(text) = &args.grep {
        patterns.push(Pattern::Text(text.as_bytes().to_vec()));
    }
    if let Some(re) = &args.regex {
        let re = regex::bytes::Regex::new(re).with_context(|| format!("--regex {re}"))?;
        patterns.push(Pattern::Regex(re));
    }
    let since_ns = args
        .since
        .as_deref()
        .map(|v| time_arg("since", v))
        .transpose()?;
    let until_ns = args
        .until
        .as_deref()
        .map(|v| time_arg("until", v))
        .transpose()?;
    if let (Some(since), Some(until)) = (since_ns, until_ns)
        && since > until
    {
        bail!("--since is after --until");
    }
    Ok(Query {
        app: args.app.clone(),
        environment: args.environment.clone(),
        services: args.services.clone(),
        release: args.release,
        instance: args.instance.clone(),
        stream: args.stream,
        since_ns,
        until_ns,
        patterns,
        tail: args.tail,
    })
}

pub fn logs(home: &Path, args: LogsArgs) -> anyhow::Result<ExitCode> {
    let query = query(&args)?;
    let colour = !args.json
        && std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let mut printer = Printer {
        out: std::io::BufWriter::with_capacity(64 << 10, std::io::stdout().lock()),
        json: args.json,
        colour,
    };
    if !args.follow {
        let mut failed = None;
        read(home, &query, &mut |record| {
            if failed.is_none()
                && let Err(e) = printer.print(&record)
            {
                failed = Some(e);
            }
        });
        if let Some(e) = failed {
            return broken_pipe_is_fine(Err(e));
        }
        return broken_pipe_is_fine(printer.out.flush()).map(|_| ExitCode::SUCCESS);
    }
    // What is there now (its last `--tail` lines), then what comes, source by source as
    // instances start, until interrupted.
    let mut follower = Follower::new(
        home,
        Query {
            tail: None,
            ..query.clone()
        },
        Cursor::default(),
    );
    let mut first = follower.poll();
    if let Some(n) = query.tail {
        first.drain(..first.len().saturating_sub(n));
    }
    let mut batch = first;
    loop {
        for record in &batch {
            if let Err(e) = printer.print(record) {
                return broken_pipe_is_fine(Err(e));
            }
        }
        if let Err(e) = printer.out.flush() {
            return broken_pipe_is_fine(Err(e));
        }
        std::thread::sleep(Duration::from_millis(100));
        batch = follower.poll();
    }
}

/// A reader that went away (`graven logs | head`) is the end, not an error.
fn broken_pipe_is_fine(e: std::io::Result<()>) -> anyhow::Result<ExitCode> {
    match e {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Err(e) => Err(e).context("writing the lines"),
        Ok(()) => Ok(ExitCode::SUCCESS),
    }
}

struct Printer<W: Write> {
    out: W,
    json: bool,
    colour: bool,
}

/// The colours instances are told apart by on a terminal.
const COLOURS: [&str; 6] = ["36", "33", "32", "35", "34", "31"];

impl<W: Write> Printer<W> {
    fn print(&mut self, record: &Record) -> std::io::Result<()> {
        let meta = &record.source.meta;
        let time = humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + Duration::from_nanos(record.time_ns),
        );
        if self.json {
            // A line that is not UTF-8 is written lossily in `line` and exactly, in hex, in
            // `line_hex`.
            let mut object = serde_json::json!({
                "time": time.to_string(),
                "app": meta.app,
                "environment": meta.environment,
                "service": meta.service,
                "release": meta.release,
                "instance": meta.instance,
                "id": meta.id,
                "stream": record.stream.name(),
                "line": String::from_utf8_lossy(&record.line),
            });
            if std::str::from_utf8(&record.line).is_err() {
                object["line_hex"] = hex::encode(&record.line).into();
            }
            serde_json::to_writer(&mut self.out, &object)?;
            return self.out.write_all(b"\n");
        }
        let label = if meta.service.is_empty() || meta.service == meta.instance {
            meta.instance.clone()
        } else {
            format!("{}/{}", meta.service, meta.instance)
        };
        let mark = match record.stream {
            Stream::Stdout => '|',
            Stream::Stderr => '!',
        };
        if self.colour {
            let hash = label
                .bytes()
                .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
            let colour = COLOURS[hash % COLOURS.len()];
            write!(
                self.out,
                "\x1b[2m{time}\x1b[0m \x1b[{colour}m{label}\x1b[0m {mark} "
            )?;
        } else {
            write!(self.out, "{time} {label} {mark} ")?;
        }
        self.out
            .write_all(String::from_utf8_lossy(&record.line).as_bytes())?;
        self.out.write_all(b"\n")
    }
}
