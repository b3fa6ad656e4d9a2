//! Planned failures on a schedule, through the controller, against the in-memory fake
//! runtime and the real proxy: kills come at the configured rate (the count over the run is
//! inside the Poisson interval the test computes), an exempt service is never touched,
//! graceful stops fail no request under keep-alive load, and a leashed schedule records what
//! it would do and does nothing.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use graven::chaos::{ChaosConfig, Kind, Thresholds};
use graven::controller::{self, ControllerHandle, ServiceRelease};
use graven::events::{DrainReason, Envelope, Event, Lifecycle, ServiceConfig, Strategy};
use graven::runtime::{FakeRuntime, Runtime};
use graven::store::Digest;
use support::daemon::{config, free_port, order, outcome};

fn start(fake: &FakeRuntime, log: &std::path::Path) -> ControllerHandle {
    support::daemon::fake_controller(fake, log)
}

/// A service of `instances` behind `route` of which one may be down at a time.
fn service(name: &str, instances: u32, route: SocketAddr) -> ServiceRelease {
    let mut config: ServiceConfig = config(instances, route, &[("VERSION", "v1")]);
    config.strategy = Strategy::Rolling {
        max_surge: 1,
        max_unavailable: 1,
    };
    ServiceRelease {
        service: name.into(),
        image: Digest::of(b"hello image"),
        config,
    }
}

fn chaos(kinds: &[Kind], mean: Duration) -> ChaosConfig {
    ChaosConfig {
        mean_between: mean,
        min_between: Duration::ZERO,
        kinds: kinds.to_vec(),
        duration: Duration::from_millis(200),
        seed: Some(16),
        checker: Thresholds {
            enabled: false,
            ..Thresholds::default()
        },
        ..ChaosConfig::default()
    }
}

/// Deploys `services` with no chaos and waits until `web` and `db` instances of them are
/// healthy, then turns `chaos` on (the same releases: only `chaos_configured` is recorded).
/// Settling first keeps the schedule's experiments out of the wait.
async fn deploy(
    controller: &ControllerHandle,
    services: Vec<ServiceRelease>,
    chaos: ChaosConfig,
    (web, db): (usize, usize),
) {
    controller
        .deploy(order(services.clone()), "test")
        .await
        .unwrap();
    outcome(controller).await;
    settle(controller, web, db).await;
    set_chaos(controller, services, Some(chaos)).await;
}

async fn set_chaos(
    controller: &ControllerHandle,
    services: Vec<ServiceRelease>,
    chaos: Option<ChaosConfig>,
) {
    let mut order = order(services);
    order.chaos = chaos.map(Box::new);
    let rollout = controller.deploy(order, "test").await.unwrap();
    assert!(rollout.started.is_empty(), "{rollout:?}");
}

async fn events(controller: &ControllerHandle) -> Vec<Envelope<Event>> {
    let mut all = Vec::new();
    loop {
        let after = all.last().map_or(0, |e: &Envelope<Event>| e.seq);
        let page = controller.history(after).await.unwrap();
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

/// The experiments that started: (service, instance, leashed).
fn started(events: &[Envelope<Event>]) -> Vec<(String, Option<String>, bool)> {
    events
        .iter()
        .filter_map(|e| match &e.payload {
            Event::ChaosStarted {
                service,
                instance,
                leashed,
                ..
            } => Some((
                service.to_string(),
                instance.as_ref().map(|i| i.to_string()),
                *leashed,
            )),
            _ => None,
        })
        .collect()
}

fn healthy(snapshot: &controller::Snapshot, service: &str) -> usize {
    snapshot
        .state
        .instances_of(service)
        .filter(|i| i.lifecycle == Lifecycle::Healthy)
        .count()
}

async fn settle(controller: &ControllerHandle, web: usize, db: usize) {
    tokio::time::timeout(
        Duration::from_secs(30),
        controller.wait_for(|snap| {
            healthy(snap, "web") == web
                && healthy(snap, "db") == db
                && snap.state.instances.len() == web + db
                && snap.state.chaos.running.is_none()
        }),
    )
    .await
    .expect("every instance healthy again");
}

/// The smallest and largest counts a Poisson variable of mean `mean` takes with probability
/// at least 99.9% between them (0.05% cut from each tail).
fn poisson_interval(mean: f64) -> (u64, u64) {
    let mut pmf = (-mean).exp();
    let mut cdf = pmf;
    let mut k = 0u64;
    let mut low = None;
    loop {
        if low.is_none() && cdf > 0.0005 {
            low = Some(k);
        }
        if cdf >= 0.9995 {
            return (low.unwrap(), k);
        }
        k += 1;
        pmf *= mean / k as f64;
        cdf += pmf;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_come_at_the_configured_rate_and_never_touch_an_exempt_service() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeRuntime::new();
    let controller = start(&fake, &dir.path().join("events.db"));
    let mean = Duration::from_secs(2);
    let mut config = chaos(&[Kind::Kill], mean);
    config.exempt = vec!["db".into()];
    deploy(
        &controller,
        vec![
            service("web", 3, free_port()),
            service("db", 2, free_port()),
        ],
        config,
        (3, 2),
    )
    .await;
    let db_before: BTreeSet<String> = controller
        .snapshot()
        .state
        .instances_of("db")
        .map(|i| i.name.to_string())
        .collect();
    let from = controller.snapshot().state.seq;
    // The observation period of the rate: the schedule runs on its own meanwhile.
    let period = Duration::from_secs(30);
    tokio::time::sleep(period).await;
    let all = events(&controller).await;
    let during: Vec<_> = all.iter().filter(|e| e.seq > from).cloned().collect();
    let kills = started(&during);
    let (low, high) = poisson_interval(period.as_secs_f64() / mean.as_secs_f64());
    eprintln!(
        "{} kills in {period:?}; 99.9% interval [{low}, {high}]",
        kills.len()
    );
    assert!(
        (low..=high).contains(&(kills.len() as u64)),
        "{} kills in {period:?} with a mean of {mean:?} between them: outside [{low}, {high}]",
        kills.len()
    );
    assert!(
        kills
            .iter()
            .all(|(s, i, leashed)| s == "web" && i.is_some() && !leashed)
    );
    // Each was carried out: its instance exited on a signal and was replaced.
    let exited = during
        .iter()
        .filter(|e| {
            matches!(
                e.payload,
                Event::InstanceExited {
                    signal: Some(9),
                    ..
                }
            )
        })
        .count();
    assert!(
        exited + 1 >= kills.len(),
        "{exited} exits for {} kills",
        kills.len()
    );
    // The exempt service's instances are the ones it had.
    let db_after: BTreeSet<String> = controller
        .snapshot()
        .state
        .instances_of("db")
        .map(|i| i.name.to_string())
        .collect();
    assert_eq!(db_before, db_after, "the exempt service was touched");
    assert!(
        !during.iter().any(|e| matches!(&e.payload,
            Event::InstanceExited { instance, .. } | Event::InstanceDraining { instance, .. }
                if db_before.contains(instance.as_str()))),
        "an instance of the exempt service ended"
    );
    controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stops_fail_no_request_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeRuntime::new();
    let controller = start(&fake, &dir.path().join("events.db"));
    let route = free_port();
    let mut config = chaos(&[Kind::Stop], Duration::from_millis(1500));
    config.duration = Duration::from_millis(300);
    let services = vec![service("web", 3, route)];
    deploy(&controller, services.clone(), config, (3, 0)).await;
    let from = controller.snapshot().state.seq;
    let load = support::load::Load::start(route, 8);
    let stops = |controller: &ControllerHandle| {
        let controller = controller.clone();
        async move {
            let all = events(&controller).await;
            all.iter()
                .filter(|e| e.seq > from)
                .filter(|e| {
                    matches!(
                        e.payload,
                        Event::InstanceDraining {
                            reason: DrainReason::Chaos { .. },
                            ..
                        }
                    )
                })
                .count()
        }
    };
    tokio::time::timeout(Duration::from_secs(60), async {
        while stops(&controller).await < 4 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("four graceful stops");
    // Off again, so that the service settles (the running experiment ends on its own).
    set_chaos(&controller, services, None).await;
    settle(&controller, 3, 0).await;
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    assert!(report.total > 200, "the load ran: {report:?}");
    // Every stopped instance is gone, and three healthy ones serve.
    assert_eq!(fake.list().await.unwrap().len(), 3);
    controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leashed_schedule_records_what_it_would_do_and_does_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeRuntime::new();
    let controller = start(&fake, &dir.path().join("events.db"));
    let mut config = chaos(&[Kind::Kill, Kind::Stop], Duration::from_millis(300));
    config.leashed = true;
    deploy(
        &controller,
        vec![service("web", 3, free_port())],
        config,
        (3, 0),
    )
    .await;
    let ids: BTreeSet<_> = fake
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    let from = controller.snapshot().state.seq;
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let all = events(&controller).await;
            let leashed = started(&all[..])
                .into_iter()
                .filter(|(_, _, leashed)| *leashed)
                .count();
            if leashed >= 5 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("five leashed experiments recorded");
    let all = events(&controller).await;
    let during: Vec<_> = all.iter().filter(|e| e.seq > from).collect();
    assert!(
        !during.iter().any(|e| matches!(
            e.payload,
            Event::InstanceDraining { .. }
                | Event::InstanceExited { .. }
                | Event::ChaosEnded { .. }
        )),
        "a leashed experiment did something: {during:#?}"
    );
    let now: BTreeSet<_> = fake
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(ids, now, "the instances are the ones there were");
    assert!(controller.snapshot().state.chaos.running.is_none());
    controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_asked_for_keeps_to_the_minimum_and_the_exempt_list() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeRuntime::new();
    let controller = start(&fake, &dir.path().join("events.db"));
    // Scheduled experiments practically never: only what the test asks for runs.
    let mut config = chaos(&[Kind::Stop], Duration::from_secs(1_000_000));
    config.exempt = vec!["db".into()];
    let mut strict = service("web", 2, free_port());
    strict.config.strategy = Strategy::Rolling {
        max_surge: 1,
        max_unavailable: 0,
    };
    deploy(
        &controller,
        vec![strict, service("db", 2, free_port())],
        config,
        (2, 2),
    )
    .await;
    let ask = |service: &str, kind: Kind| graven::controller::ChaosRequest {
        service: Some(service.into()),
        kind: Some(kind),
        duration: Some(Duration::from_millis(200)),
    };
    let error = controller
        .chaos_run(ask("db", Kind::Kill), "test")
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("exempt"), "{error}");
    let error = controller
        .chaos_run(ask("web", Kind::Stop), "test")
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("minimum is 2"), "{error}");
    // A fault takes no instance away: it may run.
    let run = controller
        .chaos_run(ask("web", Kind::Latency), "test")
        .await
        .unwrap();
    assert_eq!(run.service.as_str(), "web");
    assert_eq!(run.instance, None);
    controller.shutdown().await;
}
