//! Proxy faults and the outage checker, through the controller (fake runtime, real proxy):
//! an injected error, latency or reset hits the share of requests asked for (inside the
//! binomial interval the test computes), and a release that starts failing during an
//! experiment makes the checker abort it, remove its fault and pause chaos; the negative
//! control, with the checker off, lets the experiment run on while the errors go on.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use graven::chaos::{Broken, ChaosConfig, Kind, Thresholds};
use graven::controller::{ChaosRequest, ControllerHandle};
use graven::events::{ChaosOutcome, Event, Lifecycle};
use graven::runtime::fake::Behavior;
use graven::runtime::{FakeRuntime, Runtime};
use support::daemon::{config, free_port, order, outcome, release};

fn start(fake: &FakeRuntime, log: &std::path::Path) -> ControllerHandle {
    support::daemon::fake_controller(fake, log)
}

async fn deploy(controller: &ControllerHandle, route: SocketAddr, chaos: ChaosConfig) {
    let mut order = order(vec![release(config(2, route, &[("VERSION", "v1")]))]);
    order.chaos = Some(Box::new(chaos));
    controller.deploy(order, "test").await.unwrap();
    outcome(controller).await;
    tokio::time::timeout(
        Duration::from_secs(30),
        controller.wait_for(|snap| {
            snap.state
                .instances
                .values()
                .filter(|i| i.lifecycle == Lifecycle::Healthy)
                .count()
                == 2
        }),
    )
    .await
    .expect("two healthy instances");
}

/// No scheduled experiment: only the ones a test asks for.
fn quiet(share: f64) -> ChaosConfig {
    ChaosConfig {
        mean_between: Duration::from_secs(1_000_000),
        min_between: Duration::ZERO,
        share_ppm: (share * 1e6) as u32,
        latency: Duration::from_millis(100),
        checker: Thresholds {
            enabled: false,
            ..Thresholds::default()
        },
        ..ChaosConfig::default()
    }
}

/// What one request on a fresh connection got.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// The status and the `x-graven-fault` header, if any.
    Status(u16, Option<String>),
    /// The connection closed with no answer.
    Closed,
}

fn get(route: SocketAddr) -> Answer {
    let mut stream = TcpStream::connect(route).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut bytes = Vec::new();
    // A reset reads as an error, a close as the end: both with nothing read.
    let _ = stream.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let Some(status) = text
        .lines()
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
    else {
        return Answer::Closed;
    };
    let fault = text
        .lines()
        .take_while(|line| !line.is_empty())
        .find_map(|line| line.strip_prefix("x-graven-fault: "))
        .map(str::to_owned);
    Answer::Status(status, fault)
}

/// Sends `n` requests one after another off the async workers; returns each answer and how
/// long it took.
async fn requests(route: SocketAddr, n: usize) -> Vec<(Answer, Duration)> {
    tokio::task::spawn_blocking(move || {
        (0..n)
            .map(|_| {
                let began = Instant::now();
                let answer = get(route);
                (answer, began.elapsed())
            })
            .collect()
    })
    .await
    .unwrap()
}

/// The binomial interval, normal approximation at ±3.29 standard deviations (99.9%).
fn interval(n: usize, share: f64) -> (usize, usize) {
    let mean = n as f64 * share;
    let spread = 3.29 * (n as f64 * share * (1.0 - share)).sqrt();
    (
        (mean - spread).floor() as usize,
        (mean + spread).ceil() as usize,
    )
}

async fn run(controller: &ControllerHandle, kind: Kind, duration: Duration) -> u64 {
    let started = controller
        .chaos_run(
            ChaosRequest {
                service: Some("web".into()),
                kind: Some(kind),
                duration: Some(duration),
            },
            "test",
        )
        .await
        .unwrap();
    started.experiment
}

async fn ended(
    controller: &ControllerHandle,
    experiment: u64,
    within: Duration,
) -> Option<ChaosOutcome> {
    tokio::time::timeout(within, async {
        loop {
            let all = controller.history(0).await.unwrap();
            let found = all.iter().find_map(|e| match &e.payload {
                Event::ChaosEnded {
                    experiment: n,
                    outcome,
                    ..
                } if *n == experiment => Some(outcome.clone()),
                _ => None,
            });
            if let Some(outcome) = found {
                return outcome;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_errors_latency_and_resets_hit_the_share_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeRuntime::new();
    let controller = start(&fake, &dir.path().join("events.db"));
    let route = free_port();
    let share = 0.25;
    deploy(&controller, route, quiet(share)).await;

    // Errors: 400 requests, a quarter answered 503 by the route, the rest by the service.
    let experiment = run(&controller, Kind::Error, Duration::from_secs(60)).await;
    let answers = requests(route, 400).await;
    let injected = answers
        .iter()
        .filter(|(a, _)| *a == Answer::Status(503, Some("error".into())))
        .count();
    let served = answers
        .iter()
        .filter(|(a, _)| *a == Answer::Status(200, None))
        .count();
    let (low, high) = interval(400, share);
    assert!(
        (low..=high).contains(&injected),
        "{injected} of 400 injected errors for a share of {share}: outside [{low}, {high}]"
    );
    assert_eq!(injected + served, 400, "{answers:?}");
    // Ended by a deploy of another release: the experiment is interrupted, the fault gone.
    let mut next = order(vec![release(config(2, route, &[("VERSION", "v2")]))]);
    next.chaos = Some(Box::new(quiet(share)));
    controller.deploy(next, "test").await.unwrap();
    let end = ended(&controller, experiment, Duration::from_secs(10)).await;
    assert!(
        matches!(end, Some(ChaosOutcome::Interrupted { .. })),
        "{end:?}"
    );
    outcome(&controller).await;
    let after = requests(route, 100).await;
    assert!(
        after
            .iter()
            .all(|(a, _)| matches!(a, Answer::Status(200, None))),
        "a fault outlived its experiment: {after:?}"
    );

    // Latency: each delayed answer says so, took at least the delay, and a quarter are.
    let experiment = run(&controller, Kind::Latency, Duration::from_secs(60)).await;
    let answers = requests(route, 120).await;
    let delayed: Vec<&Duration> = answers
        .iter()
        .filter(|(a, _)| *a == Answer::Status(200, Some("latency".into())))
        .map(|(_, took)| took)
        .collect();
    let (low, high) = interval(120, share);
    assert!(
        (low..=high).contains(&delayed.len()),
        "{} of 120 delayed: outside [{low}, {high}]",
        delayed.len()
    );
    assert!(
        delayed
            .iter()
            .all(|took| **took >= Duration::from_millis(100)),
        "{delayed:?}"
    );
    assert!(
        answers
            .iter()
            .all(|(a, _)| matches!(a, Answer::Status(200, _)))
    );
    let mut next = order(vec![release(config(2, route, &[("VERSION", "v3")]))]);
    next.chaos = Some(Box::new(quiet(share)));
    controller.deploy(next, "test").await.unwrap();
    assert!(
        ended(&controller, experiment, Duration::from_secs(10))
            .await
            .is_some()
    );
    outcome(&controller).await;

    // Resets: a quarter of the connections close with no answer.
    run(&controller, Kind::Reset, Duration::from_secs(60)).await;
    let answers = requests(route, 400).await;
    let closed = answers.iter().filter(|(a, _)| *a == Answer::Closed).count();
    let (low, high) = interval(400, share);
    assert!(
        (low..=high).contains(&closed),
        "{closed} of 400 reset: outside [{low}, {high}]"
    );
    controller.shutdown().await;
}

/// Starts an error fault on a service under load, then makes every instance fail its
/// requests; returns the experiment, the load and when the instances began failing.
async fn fail_during_an_experiment(
    checker: bool,
) -> (
    tempfile::TempDir,
    FakeRuntime,
    ControllerHandle,
    u64,
    support::load::Load,
) {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeRuntime::new();
    let controller = start(&fake, &dir.path().join("events.db"));
    let route = free_port();
    let mut chaos = quiet(0.2);
    chaos.checker = Thresholds {
        enabled: checker,
        window: Duration::from_secs(2),
        min_requests: 20,
        max_error_rate_ppm: 50_000,
        cool_down: Duration::from_secs(600),
        ..Thresholds::default()
    };
    deploy(&controller, route, chaos).await;
    let load = support::load::Load::start(route, 4);
    tokio::time::timeout(Duration::from_secs(10), async {
        while load.snapshot().total < 200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("load running");
    let experiment = run(&controller, Kind::Error, Duration::from_secs(120)).await;
    // The injected errors alone are not the service's: the experiment runs on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        ended(&controller, experiment, Duration::from_millis(10))
            .await
            .is_none()
    );
    for instance in fake.list().await.unwrap() {
        fake.set_behavior(&instance.id, Behavior::Failing).unwrap();
    }
    (dir, fake, controller, experiment, load)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_starts_failing_makes_the_checker_abort_the_experiment() {
    let (_dir, _fake, controller, experiment, load) = fail_during_an_experiment(true).await;
    let end = ended(&controller, experiment, Duration::from_secs(30)).await;
    let Some(ChaosOutcome::Aborted {
        broken,
        paused_until_ms,
    }) = end
    else {
        panic!("not aborted: {end:?}");
    };
    assert!(matches!(broken, Broken::ErrorRate { .. }), "{broken:?}");
    assert!(broken.to_string().starts_with("error rate "), "{broken}");
    let state = controller.snapshot().state.clone();
    assert!(state.chaos.running.is_none());
    assert_eq!(state.chaos.paused_until_ms, paused_until_ms);
    assert!(
        paused_until_ms > graven_now_ms() + 500_000,
        "the cool-down holds"
    );
    // The fault is off: what fails now is the service's own 500, never an injected 503.
    let route = controller.snapshot().routes["web"];
    let after = requests(route, 100).await;
    assert!(
        after.iter().all(|(a, _)| *a == Answer::Status(500, None)),
        "{after:?}"
    );
    drop(load.stop());
    controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_checker_off_the_experiment_runs_on_while_the_errors_go_on() {
    let (_dir, _fake, controller, experiment, load) = fail_during_an_experiment(false).await;
    let failed = load.snapshot().failed;
    // Longer than the checked run above took to abort (a few seconds).
    let end = ended(&controller, experiment, Duration::from_secs(10)).await;
    assert_eq!(end, None, "ended without a checker");
    assert!(controller.snapshot().state.chaos.running.is_some());
    let route = controller.snapshot().routes["web"];
    let after = requests(route, 100).await;
    assert!(
        after
            .iter()
            .any(|(a, _)| *a == Answer::Status(503, Some("error".into()))),
        "the fault is still set"
    );
    assert!(load.snapshot().failed > failed + 100, "the errors go on");
    drop(load.stop());
    controller.shutdown().await;
}

fn graven_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
