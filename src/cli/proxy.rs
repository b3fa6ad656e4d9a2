//! `graven __proxy`: one route (HTTP, or TCP with `--tcp`) over fixed backends, all healthy
//! and enabled, until SIGTERM.
//! Hidden: it exists so bench/proxy.sh can measure the proxy alone, without a controller.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;

use super::{Threads, async_runtime};
use crate::proxy::{AnyRoute, Backend, RouteOptions};

#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// An instance's address; repeat for several.
    #[arg(long = "backend", value_name = "ADDR", required = true, num_args = 1..)]
    pub backends: Vec<SocketAddr>,
    /// Serve a TCP route (layer 4) instead of an HTTP one.
    #[arg(long)]
    pub tcp: bool,
    /// Threads the route serves on (default: one per core).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: Option<u16>,
}

pub fn run(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    // The route serves on its own thread; this runtime only waits for the signal.
    async_runtime(Threads::One)?.block_on(async {
        let backends: Vec<Backend> = args
            .backends
            .iter()
            .enumerate()
            .map(|(index, &address)| Backend {
                instance: format!("backend-{index}"),
                release: 1,
                address,
                healthy: true,
                enabled: true,
            })
            .collect();
        let mut options = RouteOptions::new(args.listen);
        if let Some(threads) = args.threads {
            options.threads = usize::from(threads);
        }
        let route = AnyRoute::bind(options, args.tcp).await?;
        route.set_backends(backends);
        let local_addr = route.local_addr();
        // Watch for SIGTERM before announcing the address: whoever reads it may stop us next.
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("cannot watch for SIGTERM")?;
        println!("proxy listening on {local_addr}");
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        route.shutdown().await;
        anyhow::Ok(ExitCode::SUCCESS)
    })
}
