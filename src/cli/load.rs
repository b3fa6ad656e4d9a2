//! `graven __load`: the load generator of `graven::loadgen` for benchmark scripts. Hidden:
//! a test and benchmark tool, not part of graven's interface.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::loadgen::{LoadOptions, run_for};

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The address to load, e.g. 127.0.0.1:8000.
    #[arg(long)]
    address: SocketAddr,
    /// Keep-alive connections, each sending requests back to back.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// How long to run, e.g. 10s.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
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
    let report = run_for(options, args.duration);
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
        println!("  sequence: {}", report.version_sequence.join(" -> "));
        for failure in &report.failures {
            println!("  failure: {failure}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
