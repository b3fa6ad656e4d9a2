//! Zero downtime: four instances behind the route, keep-alive load, three consecutive deploys
//! of changed releases: no failed request, and the versions that answered show each switch.
//! The negative control kills instances without draining under the same load, and requests
//! do fail, so the first half proves something.

mod support;

use std::time::Duration;

use graven::events::DeployOutcome;
use graven::runtime::{FakeRuntime, Runtime};
use support::daemon::{config, free_port, order, outcome, release};
use support::load::Load;

const CONNECTIONS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_rolling_deploys_under_load_fail_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeRuntime::new();
    let controller = support::daemon::fake_controller(&fake, &dir.path().join("events.db"));
    let route = free_port();
    controller
        .deploy(
            order(vec![release(config(4, route, &[("VERSION", "v1")]))]),
            "test",
        )
        .await
        .unwrap();
    assert!(matches!(
        outcome(&controller).await,
        DeployOutcome::Succeeded { .. }
    ));

    let load = Load::start(route, CONNECTIONS);
    let count = |version: &str| load.snapshot().versions.get(version).copied().unwrap_or(0);
    let mut previous = "v1";
    for version in ["v2", "v3", "v4"] {
        let rollout = controller
            .deploy(
                order(vec![release(config(4, route, &[("VERSION", version)]))]),
                "test",
            )
            .await
            .unwrap();
        assert_eq!(rollout.started.len(), 1, "{version} is a new release");
        let result = outcome(&controller).await;
        assert!(
            matches!(result, DeployOutcome::Succeeded { .. }),
            "{version}: {result:?}"
        );
        // The switch is observed: once the deploy succeeded, the new version answers and the
        // previous one never again (its instances are drained and gone).
        let old_at_success = count(previous);
        let new_at_success = count(version);
        support::wait_for(
            Duration::from_secs(10),
            "requests served by the new release",
            || (count(version) > new_at_success + 100).then_some(()),
        );
        assert!(old_at_success > 0, "{previous} answered before the switch");
        assert_eq!(
            count(previous),
            old_at_success,
            "{previous} answered after its deploy ended"
        );
        previous = version;
    }
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    assert!(report.total > 400, "the load ran: {report:?}");
    assert!(report.version_changes >= 3, "{report:?}");
    assert_eq!(report.last_version.as_deref(), Some("v4"));
    // The old releases' instances are gone from the runtime.
    assert_eq!(fake.list().await.unwrap().len(), 4);

    // Negative control: the same load, and every instance killed without draining.
    let load = Load::start(route, CONNECTIONS);
    support::wait_for(Duration::from_secs(10), "load running", || {
        (load.snapshot().total > 50).then_some(())
    });
    for instance in fake.list().await.unwrap() {
        fake.kill(&instance.id).await.unwrap();
    }
    // The controller heals; wait until the route serves again, then look at what clients saw.
    let served = |load: &Load| load.snapshot().versions.get("v4").copied().unwrap_or(0);
    let before = served(&load);
    support::wait_for(Duration::from_secs(20), "requests succeed again", || {
        (served(&load) > before + 50).then_some(())
    });
    let killed = load.stop();
    eprintln!("negative control: {killed:?}");
    assert!(
        killed.failed > 0,
        "killing without draining must fail requests: {killed:?}"
    );
    controller.shutdown().await;
}
