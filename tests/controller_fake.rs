//! The controller in-process against the in-memory fake runtime and the real proxy: rolling
//! deploys, a bad release that rolls back by itself, self-healing, rollback and restart.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use graven::controller::{ControllerHandle, Snapshot};
use graven::events::{CondemnReason, DeployOutcome, DrainReason, Event, Lifecycle, RouteKind};
use graven::runtime::{FakeRuntime, InstanceId, Runtime};
use graven::store::Digest;
use support::daemon::{config, free_port, order, outcome, release, version};

struct Setup {
    _dir: tempfile::TempDir,
    log: std::path::PathBuf,
    fake: FakeRuntime,
    controller: ControllerHandle,
}

fn start(fake: &FakeRuntime, log: &std::path::Path) -> ControllerHandle {
    support::daemon::fake_controller(fake, log)
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.db");
    let fake = FakeRuntime::new();
    let controller = start(&fake, &log);
    Setup {
        _dir: dir,
        log,
        fake,
        controller,
    }
}

fn healthy_versions(snapshot: &Snapshot) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    for i in snapshot.state.instances.values() {
        if i.lifecycle == Lifecycle::Healthy {
            *counts.entry(i.release.get()).or_default() += 1;
        }
    }
    counts
}

async fn running_on_runtime(fake: &FakeRuntime) -> usize {
    fake.list()
        .await
        .unwrap()
        .iter()
        .filter(|i| !i.status.is_exited())
        .count()
}

/// Deploys two instances of v1 behind `route` and waits until the deploy ends.
async fn deploy_v1(controller: &ControllerHandle, route: SocketAddr) {
    controller
        .deploy(
            order(vec![release(config(2, route, &[("VERSION", "v1")]))]),
            "test",
        )
        .await
        .unwrap();
    outcome(controller).await;
}

/// The version that answers one request on `route`, asked off the async threads.
async fn served(route: SocketAddr) -> Result<String, String> {
    tokio::task::spawn_blocking(move || version(route))
        .await
        .unwrap()
}

/// Waits (bounded) until the runtime no longer lists instance `id`.
async fn wait_until_removed(fake: &FakeRuntime, id: &InstanceId, what: &str) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while fake.list().await.unwrap().iter().any(|i| i.id == *id) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect(what);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_roll_out_and_the_route_follows() {
    let s = setup();
    let route = free_port();
    let first = s
        .controller
        .deploy(
            order(vec![release(config(2, route, &[("VERSION", "v1")]))]),
            "test",
        )
        .await
        .unwrap();
    assert_eq!(first.started.len(), 1);
    assert!(matches!(
        outcome(&s.controller).await,
        DeployOutcome::Succeeded { .. }
    ));
    let r = served(route).await;
    assert_eq!(r.as_deref(), Ok("v1"));

    // The same image and config again makes no release.
    let again = s
        .controller
        .deploy(
            order(vec![release(config(2, route, &[("VERSION", "v1")]))]),
            "test",
        )
        .await
        .unwrap();
    assert_eq!(
        again.unchanged,
        vec![graven::events::ServiceName::new("web")]
    );

    // The instance count is not part of a release: scaling keeps release 1 and adds one.
    let scaled = s
        .controller
        .deploy(
            order(vec![release(config(3, route, &[("VERSION", "v1")]))]),
            "test",
        )
        .await
        .unwrap();
    assert_eq!(scaled.scaled.len(), 1, "{scaled:?}");
    assert_eq!(scaled.scaled[0].instances, 3);
    let snapshot = tokio::time::timeout(
        Duration::from_secs(10),
        s.controller
            .wait_for(|snap| healthy_versions(snap) == BTreeMap::from([(1, 3)])),
    )
    .await
    .expect("scaled to 3");
    assert_eq!(snapshot.state.releases.len(), 1);
    s.controller
        .deploy(
            order(vec![release(config(2, route, &[("VERSION", "v1")]))]),
            "test",
        )
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        s.controller
            .wait_for(|snap| snap.state.instances.len() == 2),
    )
    .await
    .expect("scaled back to 2");

    // A config change alone is a new release that replaces every instance.
    s.controller
        .deploy(
            order(vec![release(config(2, route, &[("VERSION", "v2")]))]),
            "test",
        )
        .await
        .unwrap();
    assert!(matches!(
        outcome(&s.controller).await,
        DeployOutcome::Succeeded { .. }
    ));
    let snapshot = s.controller.snapshot();
    assert_eq!(healthy_versions(&snapshot), BTreeMap::from([(2, 2)]));
    assert_eq!(snapshot.state.instances.len(), 2);
    let r = served(route).await;
    assert_eq!(r.as_deref(), Ok("v2"));
    // Every old instance was stopped and removed from the runtime, not only unrouted.
    let fake = s.fake.clone();
    tokio::time::timeout(Duration::from_secs(5), async {
        while running_on_runtime(&fake).await != 2 || fake.list().await.unwrap().len() != 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("old instances removed");

    // Rollback goes back to release 1 through the same path.
    let back = s.controller.rollback(None, None, "test").await.unwrap();
    assert_eq!(back.started[0].to, 1);
    assert!(matches!(
        outcome(&s.controller).await,
        DeployOutcome::Succeeded { .. }
    ));
    let r = served(route).await;
    assert_eq!(r.as_deref(), Ok("v1"));
    s.controller.shutdown().await;
    assert_eq!(s.fake.list().await.unwrap().len(), 0, "shutdown stops all");
}

/// One keep-alive `GET /` on an open connection; the version that answered.
fn keep_alive_version(stream: &mut std::net::TcpStream) -> Result<String, String> {
    use std::io::{BufRead, Read, Write};
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut reader = std::io::BufReader::new(&*stream);
    let (mut version, mut length) = (None, 0usize);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("the connection ended".to_owned());
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim().to_owned();
            match name.to_ascii_lowercase().as_str() {
                "x-hello-version" => version = Some(value),
                "content-length" => length = value.parse().map_err(|_| "bad length")?,
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).map_err(|e| e.to_string())?;
    version.ok_or_else(|| "no version header".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_route_keeps_a_long_connection_through_a_rolling_deploy() {
    let s = setup();
    let route = free_port();
    let tcp = |version: &str| {
        let mut config = config(2, route, &[("VERSION", version)]);
        config.route_kind = RouteKind::Tcp;
        config.stop_grace = Duration::from_secs(20);
        config
    };
    s.controller
        .deploy(order(vec![release(tcp("v1"))]), "test")
        .await
        .unwrap();
    assert!(matches!(
        outcome(&s.controller).await,
        DeployOutcome::Succeeded { .. }
    ));
    // A client's session: one connection, kept open across the deploy.
    let mut session = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(route).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let answer = keep_alive_version(&mut stream);
        (stream, answer)
    })
    .await
    .unwrap();
    assert_eq!(session.1.as_deref(), Ok("v1"));

    s.controller
        .deploy(order(vec![release(tcp("v2"))]), "test")
        .await
        .unwrap();
    // New connections during the deploy all succeed and end up on v2; the old instance that
    // holds the session is drained, not stopped, while the session lasts.
    let during = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while std::time::Instant::now() < deadline {
            let answer = version(route);
            let done = answer.as_deref() == Ok("v2");
            seen.push(answer);
            if done && seen.len() > 20 {
                break;
            }
        }
        seen
    })
    .await
    .unwrap();
    let failed: Vec<_> = during.iter().filter(|answer| answer.is_err()).collect();
    assert!(failed.is_empty(), "failed connections: {failed:?}");
    assert_eq!(during.last().map(|a| a.as_deref()), Some(Ok("v2")));
    let snapshot = tokio::time::timeout(
        Duration::from_secs(10),
        s.controller.wait_for(|snap| {
            healthy_versions(snap) == BTreeMap::from([(2, 2)])
                && snap
                    .state
                    .instances
                    .values()
                    .any(|i| i.release.get() == 1 && i.lifecycle == Lifecycle::Draining)
        }),
    )
    .await
    .expect("v2 serves while a v1 instance drains");
    assert!(
        snapshot.state.deploys.last().unwrap().outcome.is_none(),
        "the deploy waits for the drain"
    );
    let (mut stream, _) = session;
    session = tokio::task::spawn_blocking(move || {
        let answer = keep_alive_version(&mut stream);
        (stream, answer)
    })
    .await
    .unwrap();
    assert_eq!(
        session.1.as_deref(),
        Ok("v1"),
        "the session is still served by its instance while it drains"
    );
    drop(session);
    assert!(matches!(
        outcome(&s.controller).await,
        DeployOutcome::Succeeded { .. }
    ));
    let fake = s.fake.clone();
    tokio::time::timeout(Duration::from_secs(10), async {
        while running_on_runtime(&fake).await != 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the drained instances stop once the session ends");
    s.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_route_on_a_port_in_use_refuses_the_deploy_and_records_nothing() {
    let s = setup();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let route = taken.local_addr().unwrap();
    let mut config = config(1, route, &[("VERSION", "v1")]);
    config.route_kind = RouteKind::Tcp;
    let error = s
        .controller
        .deploy(order(vec![release(config)]), "test")
        .await
        .expect_err("the route's address is taken");
    let message = error.to_string();
    assert!(message.contains(&route.to_string()), "{message}");
    let snapshot = s.controller.snapshot();
    assert!(snapshot.state.releases.is_empty(), "{:?}", snapshot.state);
    assert!(snapshot.state.instances.is_empty());
    assert_eq!(running_on_runtime(&s.fake).await, 0);
    s.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_never_gets_healthy_is_never_routed_and_rolls_back() {
    let s = setup();
    let route = free_port();
    deploy_v1(&s.controller, route).await;
    // Never healthy: rolled back at its deadline, a short one.
    let mut bad = config(2, route, &[("VERSION", "bad"), ("HEALTHY", "0")]);
    bad.health_deadline = Duration::from_secs(2);
    s.controller
        .deploy(order(vec![release(bad)]), "test")
        .await
        .unwrap();
    // Requests keep flowing while the bad release is tried; every one is served by v1.
    let probe = tokio::task::spawn_blocking(move || {
        let mut served = Vec::new();
        let end = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < end {
            served.push(version(route));
        }
        served
    });
    let result = outcome(&s.controller).await;
    let DeployOutcome::RolledBack { reason, .. } = result else {
        panic!("expected a rollback, got {result:?}");
    };
    let reason = reason.to_string();
    assert!(reason.contains("healthy within"), "{reason}");
    let served = probe.await.unwrap();
    assert!(!served.is_empty());
    assert!(
        served.iter().all(|v| v.as_deref() == Ok("v1")),
        "{served:?}"
    );
    let snapshot = s.controller.snapshot();
    assert_eq!(snapshot.state.services["web"].wanted, Some(1.into()));
    s.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instance_is_replaced() {
    let s = setup();
    let route = free_port();
    deploy_v1(&s.controller, route).await;
    let load = support::load::Load::start(route, 4);
    support::wait_for(Duration::from_secs(10), "load running", || {
        (load.snapshot().total > 50).then_some(())
    });
    let victim = s.fake.list().await.unwrap()[0].id.clone();
    s.fake.crash(&victim, 3).unwrap();
    let healed =
        tokio::time::timeout(
            Duration::from_secs(10),
            s.controller.wait_for(|snap| {
                healthy_versions(snap).get(&1) == Some(&2)
                    && snap.state.instances.len() == 2
                    && snap.state.instances.values().all(|i| {
                        i.runtime_id.as_ref().map(|r| r.as_str()) != Some(victim.0.as_str())
                    })
            }),
        )
        .await
        .expect("a replacement is healthy");
    assert_eq!(healed.state.instances.len(), 2);
    let before = load.snapshot().total;
    support::wait_for(Duration::from_secs(10), "requests after healing", || {
        (load.snapshot().total > before + 50).then_some(())
    });
    let report = load.stop();
    eprintln!("self-healing under load: {report:?}");
    // The proxy re-sends an idempotent request whose instance closed the connection before
    // answering, so the crash is invisible to clients.
    assert_eq!(
        report.failed, 0,
        "clients saw errors: {:?}",
        report.failures
    );
    wait_until_removed(
        &s.fake,
        &victim,
        "the crashed instance is removed from the runtime",
    )
    .await;
    s.controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_adopts_what_it_wants_and_removes_orphans() {
    let s = setup();
    let route = free_port();
    deploy_v1(&s.controller, route).await;
    let before: Vec<_> = s
        .controller
        .snapshot()
        .state
        .instances
        .keys()
        .cloned()
        .collect();
    s.controller.abort().await;
    // An instance the log knows nothing of, labelled as this app's.
    let mut spec = graven::runtime::InstanceSpec::new(Digest::of(b"hello image"));
    spec.labels = [
        ("app", "hello"),
        ("environment", "test"),
        ("service", "web"),
        ("instance", "stray"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let stray = s.fake.start(spec).await.unwrap().id;
    // Another app's instance is not this controller's business.
    let mut other = graven::runtime::InstanceSpec::new(Digest::of(b"hello image"));
    other.labels = [("app", "other"), ("environment", "test")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let other = s.fake.start(other).await.unwrap().id;

    let controller = start(&s.fake, &s.log);
    wait_until_removed(&s.fake, &stray, "the orphan is removed").await;
    let snapshot = controller.snapshot();
    let after: Vec<_> = snapshot.state.instances.keys().cloned().collect();
    assert_eq!(
        before, after,
        "the wanted instances are adopted, not replaced"
    );
    assert!(s.fake.list().await.unwrap().iter().any(|i| i.id == other));
    let r = served(route).await;
    assert_eq!(r.as_deref(), Ok("v1"));
    controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_whose_instances_fail_at_once_rolls_back_early_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let good = Digest::of(b"hello image");
    let fake = FakeRuntime::with_images([good.clone()]);
    let controller = start(&fake, &dir.path().join("events.db"));
    let route = free_port();
    deploy_v1(&controller, route).await;
    let mut broken = release(config(2, route, &[("VERSION", "v2")]));
    broken.image = Digest::of(b"an image the runtime cannot start");
    controller
        .deploy(order(vec![broken]), "test")
        .await
        .unwrap();
    let result = outcome(&controller).await;
    let DeployOutcome::RolledBack { reason, .. } = result else {
        panic!("expected a rollback, got {result:?}");
    };
    let reason = reason.to_string();
    assert!(reason.contains("failed 3 times"), "{reason}");
    assert!(reason.contains("did not start"), "{reason}");
    let r = served(route).await;
    assert_eq!(r.as_deref(), Ok("v1"));
    let snapshot = controller.snapshot();
    assert_eq!(healthy_versions(&snapshot), BTreeMap::from([(1, 2)]));
    controller.shutdown().await;
}

/// Regression: after a restart, health monitors of adopted instances started from
/// "unknown", and an unknown instance never flips to unhealthy, so an adopted instance that
/// stopped answering kept its "healthy" state (and its traffic) forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_instance_that_stops_answering_is_replaced() {
    let s = setup();
    let route = free_port();
    deploy_v1(&s.controller, route).await;
    s.controller.abort().await;

    let controller = start(&s.fake, &s.log);
    let adopted = controller.snapshot();
    assert_eq!(healthy_versions(&adopted), BTreeMap::from([(1, 2)]));
    let (name, victim) = adopted
        .state
        .instances
        .iter()
        .find_map(|(name, i)| Some((name.clone(), i.runtime_id.clone()?)))
        .expect("an adopted instance with a runtime id");
    s.fake
        .set_behavior(
            &graven::runtime::InstanceId(victim.0.clone()),
            graven::runtime::fake::Behavior::Unhealthy,
        )
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        controller.wait_for(|snapshot| {
            !snapshot.state.instances.contains_key(&name)
                && healthy_versions(snapshot) == BTreeMap::from([(1, 2)])
        }),
    )
    .await
    .expect("the adopted instance that stopped answering is replaced");
    controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tainted_instance_is_condemned_and_replaced_before_it_drains() {
    let s = setup();
    let route = free_port();
    deploy_v1(&s.controller, route).await;
    let load = support::load::Load::start(route, 4);
    support::wait_for(Duration::from_secs(10), "load running", || {
        (load.snapshot().total > 50).then_some(())
    });
    // A break-glass exec marks the instance on the runtime, as `graven exec` does.
    let victim = s.fake.list().await.unwrap()[0].id.clone();
    s.fake.taint(&victim).unwrap();
    let replaced =
        tokio::time::timeout(
            Duration::from_secs(10),
            s.controller.wait_for(|snap| {
                healthy_versions(snap).get(&1) == Some(&2)
                    && snap.state.instances.len() == 2
                    && snap.state.instances.values().all(|i| {
                        i.runtime_id.as_ref().map(|r| r.as_str()) != Some(victim.0.as_str())
                    })
            }),
        )
        .await
        .expect("the tainted instance is replaced");
    assert!(
        replaced
            .state
            .instances
            .values()
            .all(|i| i.condemned.is_none())
    );
    wait_until_removed(&s.fake, &victim, "the tainted instance is removed").await;
    let report = load.stop();
    assert_eq!(
        report.failed, 0,
        "clients saw errors: {:?}",
        report.failures
    );
    // The log says why, and the replacement was launched before the condemned one drained.
    let history = s.controller.history(0).await.unwrap();
    let position = |wanted: &dyn Fn(&Event) -> bool| {
        history
            .iter()
            .position(|e| wanted(&e.payload))
            .expect("the event is in the log")
    };
    let condemned = position(&|e| {
        matches!(
            e,
            Event::InstanceCondemned {
                reason: CondemnReason::Tainted,
                ..
            }
        )
    });
    let drained = position(&|e| {
        matches!(
            e,
            Event::InstanceDraining {
                reason: DrainReason::Condemned { .. },
                ..
            }
        )
    });
    let launched_after = history[condemned..drained]
        .iter()
        .any(|e| matches!(e.payload, Event::InstanceLaunched { .. }));
    assert!(
        launched_after,
        "a replacement was launched before the drain"
    );
    s.controller.shutdown().await;
}
