//! `graven __proxy`: one route over fixed backends, all healthy and enabled, until SIGTERM.
//! Hidden: it exists so bench/proxy.sh can measure the proxy alone, without a controller.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;

use crate::proxy::{Backend, Route, RouteOptions};

#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// An instance's address; repeat for several.
    #[arg(long = "backend", value_name = "ADDR", required = true, num_args = 1..)]
    pub backends: Vec<SocketAddr>,
    /// Worker threads; 1 runs everything on one thread.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub threads: usize,
}

pub fn run(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let route = Route::bind(RouteOptions::new(args.listen)).await?;
        let backends = args
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
        route.set_backends(backends);
        println!("proxy listening on {}", route.local_addr());
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("cannot watch for SIGTERM")?;
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        route.shutdown().await;
        anyhow::Ok(ExitCode::SUCCESS)
    })
}
