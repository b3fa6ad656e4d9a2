//! `graven __load`: the load generator of `graven::loadgen` for benchmark scripts. Hidden:
//! a test and benchmark tool, not part of graven's interface.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;

use crate::loadgen::{Load, LoadOptions};

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The address to load, e.g. 127.0.0.1:8000.
    #[arg(long)]
    address: SocketAddr,
    /// Keep-alive connections, each sending requests back to back.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// How long to run, e.g. 10s (at most, with --stop-file).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Stop as soon as this file exists: lets a script end the load when its deploy is done.
    #[arg(long, value_name = "PATH")]
    stop_file: Option<PathBuf>,
    /// The path to GET.
    #[arg(long, default_value = "/")]
    path: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let mut options = LoadOptions::new(args.address, args.connections);
    options.path = args.path;
    let load = Load::start_with(options);
    let end = Instant::now() + args.duration;
    while Instant::now() < end && !args.stop_file.as_ref().is_some_and(|f| f.exists()) {
        std::thread::sleep(Duration::from_millis(10).min(end - Instant::now()));
    }
    let report = load.stop();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let seconds = report.elapsed_ms as f64 / 1000.0;
        println!(
            "requests {}  failed {}  {:.0} req/s over {seconds:.1}s",
            report.total,
            report.failed,
            report.total as f64 / seconds.max(0.001)
        );
        for (version, count) in &report.versions {
            println!("  version {version}: {count}");
        }
        println!(
            "  version changes: {} (last: {})",
            report.version_changes,
            report.last_version.as_deref().unwrap_or("-")
        );
        for failure in &report.failures {
            println!("  failure: {failure}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
