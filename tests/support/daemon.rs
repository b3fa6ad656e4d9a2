//! Helpers for tests of the control plane: service configs and releases, a free port for a
//! route, one request that says which version answered.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use graven::controller::{ControllerHandle, ServiceRelease};
use graven::events::{DeployOutcome, ServiceConfig};
use graven::proxy::HealthCheck;
use graven::store::Digest;

/// A fast-checking service config behind `route`, with `env` for the instances.
pub fn config(instances: u32, route: SocketAddr, env: &[(&str, &str)]) -> ServiceConfig {
    ServiceConfig {
        instances,
        port: 8080,
        route: Some(route),
        command: None,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        health: HealthCheck {
            path: "/healthz".to_owned(),
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(500),
            healthy_after: 1,
            unhealthy_after: 2,
        },
        max_surge: 1,
        max_unavailable: 0,
        health_deadline: Duration::from_secs(2),
        stop_grace: Duration::from_secs(2),
        volumes: vec![],
        limits: Default::default(),
    }
}

pub fn release(config: ServiceConfig) -> ServiceRelease {
    ServiceRelease {
        service: "web".to_owned(),
        image: Digest::of(b"hello image"),
        // Like the spec's digest, the count and the route are not part of a release.
        config_digest: {
            let mut release_part = config.clone();
            release_part.instances = 0;
            release_part.route = None;
            Digest::of(serde_json::to_string(&release_part).unwrap().as_bytes()).to_string()
        },
        config,
    }
}

/// A port that was free a moment ago, for a route that must keep its address across restarts.
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// One `GET /` on a fresh connection; the version that answered.
pub fn version(route: SocketAddr) -> Result<String, String> {
    let mut stream = TcpStream::connect(route).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    if !response.starts_with("HTTP/1.1 200") {
        return Err(response.lines().next().unwrap_or("").to_owned());
    }
    response
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("x-hello-version")
                .then(|| value.trim().to_owned())
        })
        .ok_or_else(|| "no version header".to_owned())
}

/// Waits (bounded) until the last deploy of `web` has an outcome, and returns it.
pub async fn outcome(controller: &ControllerHandle) -> DeployOutcome {
    let snapshot = tokio::time::timeout(
        Duration::from_secs(20),
        controller.wait_for(|s| s.state.deploys.last().is_some_and(|d| d.outcome.is_some())),
    )
    .await
    .expect("the deploy ends within 20s");
    snapshot
        .state
        .deploys
        .last()
        .unwrap()
        .outcome
        .clone()
        .unwrap()
}
