//! A route's thread count from the release, through the controller: deploys that change it
//! under keep-alive load fail no request, and the route's threads follow (counted by name in
//! /proc/self/task, which is why this test has a binary of its own).

mod support;

use std::time::Duration;

use graven::events::{DeployOutcome, ServiceConfig};
use graven::runtime::FakeRuntime;
use support::daemon::{config, free_port, order, outcome, release};
use support::load::Load;

/// Threads of this process serving HTTP routes.
fn route_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("list this process's threads")
        .filter_map(|task| {
            let comm = task.ok()?.path().join("comm");
            std::fs::read_to_string(comm).ok()
        })
        .filter(|name| name.trim_end() == "graven-route")
        .count()
}

fn with_threads(version: &str, threads: Option<u32>) -> ServiceConfig {
    let route = ROUTE.get_or_init(free_port);
    ServiceConfig {
        route_threads: threads,
        ..config(4, *route, &[("VERSION", version)])
    }
}

static ROUTE: std::sync::OnceLock<std::net::SocketAddr> = std::sync::OnceLock::new();

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_that_change_the_route_threads_fail_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let controller =
        support::daemon::fake_controller(&FakeRuntime::new(), &dir.path().join("events.db"));
    let first = with_threads("v1", Some(1));
    let route = first.route.expect("a route");
    controller
        .deploy(order(vec![release(first)]), "test")
        .await
        .unwrap();
    assert!(matches!(
        outcome(&controller).await,
        DeployOutcome::Succeeded { .. }
    ));
    assert_eq!(route_threads(), 1);

    let load = Load::start(route, 8);
    let served = |load: &Load, version: &str| load.snapshot().versions.get(version).copied();
    support::wait_for(Duration::from_secs(10), "v1 serving", || {
        served(&load, "v1").filter(|&count| count > 100)
    });
    for (version, threads) in [("v2", 3), ("v3", 2)] {
        let rollout = controller
            .deploy(
                order(vec![release(with_threads(version, Some(threads)))]),
                "test",
            )
            .await
            .unwrap();
        assert_eq!(
            rollout.started.len(),
            1,
            "{version}: a new thread count is a new release"
        );
        let result = outcome(&controller).await;
        assert!(
            matches!(result, DeployOutcome::Succeeded { .. }),
            "{version}: {result:?}"
        );
        support::wait_for(Duration::from_secs(10), "the new release serving", || {
            served(&load, version).filter(|&count| count > 100)
        });
        // The old route retires once its connections have moved (each closed after an
        // answer that says so); only the new one's threads are left.
        support::wait_for(
            Duration::from_secs(10),
            "the old route's threads gone",
            || (route_threads() == threads as usize).then_some(()),
        );
    }
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    assert_eq!(report.last_version.as_deref(), Some("v3"));
    controller.shutdown().await;
    support::wait_for(Duration::from_secs(10), "every route thread ended", || {
        (route_threads() == 0).then_some(())
    });
}
