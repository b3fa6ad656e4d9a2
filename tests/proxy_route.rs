//! A route against real backends on 127.0.0.1:0: balancing, health and enabled flags,
//! draining, holding, retries, error classification, HTTP/2, metrics, shutdown.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use graven::proxy::{
    Backend, Health, HealthCheck, HealthKind, HealthMonitor, ProxyError, Route, RouteOptions,
};
use http::{Method, StatusCode};
use support::proxy::*;

const DEADLINE: Duration = Duration::from_secs(10);

/// Sends `count` GETs to `/` and counts answers by the backend that gave them.
async fn spread(client: &TestClient, route: &Route, count: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..count {
        let answer = get(client, route.local_addr(), "/").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        *seen.entry(answer.body).or_default() += 1;
    }
    seen
}

#[tokio::test]
async fn balances_over_several_backends() {
    let backends = [
        TestBackend::start("a").await,
        TestBackend::start("b").await,
        TestBackend::start("c").await,
    ];
    let route = route(|_| {}).await;
    route.set_backends(backends.iter().map(|backend| backend.backend(1)).collect());
    let seen = spread(&client(), &route, 30).await;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["a", "b", "c"], "{seen:?}");
    assert!(seen.values().all(|&count| count >= 5), "uneven: {seen:?}");
}

#[tokio::test]
async fn only_healthy_and_enabled_backends_get_traffic() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let c = TestBackend::start("c").await;
    let route = route(|_| {}).await;
    let unhealthy = Backend {
        healthy: false,
        ..b.backend(1)
    };
    let disabled = Backend {
        enabled: false,
        ..c.backend(1)
    };
    route.set_backends(vec![a.backend(1), unhealthy, disabled]);
    let client = client();
    let seen = spread(&client, &route, 20).await;
    assert_eq!(seen, BTreeMap::from([("a".to_owned(), 20)]));
    assert_eq!((b.hits(), c.hits()), (0, 0));

    // Negative control: the same backends, all ready, do get traffic.
    route.set_backends(vec![a.backend(1), b.backend(1), c.backend(1)]);
    let seen = spread(&client, &route, 30).await;
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[tokio::test]
async fn health_monitor_reports_flips_after_consecutive_results() {
    let backend = TestBackend::start("a").await;
    let check = HealthCheck {
        kind: HealthKind::Http,
        path: "/healthz".into(),
        interval: Duration::from_millis(10),
        timeout: Duration::from_secs(1),
        healthy_after: 2,
        unhealthy_after: 3,
        start_period: Duration::ZERO,
    };
    let (changes, mut received) = tokio::sync::mpsc::unbounded_channel();
    let monitor = HealthMonitor::spawn("a".into(), backend.address, check.clone(), changes);
    let change = tokio::time::timeout(DEADLINE, received.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (change.instance.as_str(), change.health),
        ("a", Health::Healthy)
    );
    assert!(
        backend.health_hits() >= 2,
        "healthy after {} probes",
        backend.health_hits()
    );

    backend.set_healthy(false);
    let failing_from = backend.health_hits();
    let change = tokio::time::timeout(DEADLINE, received.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(change.health, Health::Unhealthy);
    assert!(change.detail.contains("500"), "{}", change.detail);
    assert!(backend.health_hits() >= failing_from + 3);
    drop(monitor);

    // A backend that never passes is probed, but never reported: it stays Unknown.
    let never = TestBackend::start("never").await;
    never.set_healthy(false);
    let (changes, mut received) = tokio::sync::mpsc::unbounded_channel();
    let _monitor = HealthMonitor::spawn("never".into(), never.address, check, changes);
    eventually(DEADLINE, "ten probes", || never.health_hits() >= 10).await;
    assert!(
        received.try_recv().is_err(),
        "a never-healthy instance was reported"
    );
}

#[tokio::test]
async fn drain_waits_for_in_flight_requests_while_new_ones_go_elsewhere() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let route = std::sync::Arc::new(route(|_| {}).await);
    route.set_backends(vec![a.backend(1)]);
    let client = client();
    let slow = tokio::spawn({
        let client = client.clone();
        let address = route.local_addr();
        async move { get(&client, address, "/slow").await }
    });
    eventually(DEADLINE, "the slow request on a", || {
        route.in_flight("a") == 1
    })
    .await;
    route.set_backends(vec![a.backend(1), b.backend(1)]);

    let drain = tokio::spawn({
        let route = std::sync::Arc::clone(&route);
        async move { route.drain("a", DEADLINE).await }
    });
    eventually(DEADLINE, "a disabled", || {
        route
            .backends()
            .iter()
            .any(|backend| backend.instance == "a" && !backend.enabled)
    })
    .await;
    let seen = spread(&client, &route, 10).await;
    assert_eq!(seen, BTreeMap::from([("b".to_owned(), 10)]));
    assert!(
        !drain.is_finished(),
        "drain returned while a request was in flight"
    );

    a.open_gate();
    let answer = slow.await.unwrap();
    assert_eq!((answer.status, answer.body.as_str()), (StatusCode::OK, "a"));
    assert_eq!(drain.await.unwrap(), 0);
    assert_eq!(route.in_flight("a"), 0);
}

#[tokio::test]
async fn drain_that_times_out_reports_what_is_left() {
    let a = TestBackend::start("a").await;
    let route = std::sync::Arc::new(route(|_| {}).await);
    route.set_backends(vec![a.backend(1)]);
    let slow = tokio::spawn({
        let address = route.local_addr();
        async move { get(&client(), address, "/slow").await }
    });
    eventually(DEADLINE, "the slow request", || route.in_flight("a") == 1).await;
    assert_eq!(route.drain("a", Duration::from_millis(50)).await, 1);
    a.open_gate();
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
}

#[tokio::test]
async fn removed_instances_pooled_connections_are_not_reused() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let route = route(|_| {}).await;
    let client = client();
    route.set_backends(vec![a.backend(1)]);
    get(&client, route.local_addr(), "/").await;
    get(&client, route.local_addr(), "/").await;
    // Positive control: while present, a's connection is kept open and reused.
    assert_eq!((a.connections(), a.open_connections()), (1, 1));

    route.set_backends(vec![b.backend(1)]);
    eventually(DEADLINE, "a's idle connection closed", || {
        a.open_connections() == 0
    })
    .await;
    route.set_backends(vec![a.backend(1)]);
    let answer = get(&client, route.local_addr(), "/").await;
    assert_eq!(answer.body, "a");
    assert_eq!(
        a.connections(),
        2,
        "the removed instance's idle connection was reused"
    );
}

#[tokio::test]
async fn held_requests_go_out_once_an_instance_is_ready() {
    let a = TestBackend::start("a").await;
    let route = route(|_| {}).await;
    let held = tokio::spawn({
        let address = route.local_addr();
        async move { get(&client(), address, "/").await }
    });
    eventually(DEADLINE, "a held request", || route.held() == 1).await;
    // An instance that is present but not healthy does not release it.
    route.set_backends(vec![Backend {
        healthy: false,
        ..a.backend(1)
    }]);
    route.set_backends(vec![a.backend(1)]);
    let answer = held.await.unwrap();
    assert_eq!((answer.status, answer.body.as_str()), (StatusCode::OK, "a"));
    assert_eq!(route.held(), 0);
}

#[tokio::test]
async fn full_hold_queue_and_hold_timeout_answer_503() {
    let route = route(|options| options.hold_queue = 1).await;
    let client = client();
    let first = tokio::spawn({
        let client = client.clone();
        let address = route.local_addr();
        async move { get(&client, address, "/").await }
    });
    eventually(DEADLINE, "a held request", || route.held() == 1).await;
    let refused = get(&client, route.local_addr(), "/").await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.header("x-graven-error"), "graven");
    first.abort();

    let route = route_with_timeout().await;
    let answer = get(&client, route.local_addr(), "/").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.header("x-graven-error"), "graven");
    assert_eq!(route.metrics().unrouted.graven, 1);
}

async fn route_with_timeout() -> Route {
    route(|options| options.hold_timeout = Duration::from_millis(20)).await
}

#[tokio::test]
async fn idempotent_requests_are_retried_on_another_instance_and_posts_are_not() {
    let good = TestBackend::start("good").await;
    let refusing = refusing_address().await;
    let route = route(|_| {}).await;
    route.set_backends(vec![backend("gone", 2, refusing), good.backend(1)]);
    let client = client();
    let mut failed = 0;
    for _ in 0..20 {
        let answer = get(&client, route.local_addr(), "/").await;
        failed += usize::from(answer.status != StatusCode::OK);
    }
    assert_eq!(failed, 0, "GETs failed despite retries");
    let retries = route.metrics().retries;
    assert!(
        retries > 0,
        "no GET was sent to the refusing instance, so nothing was proven"
    );

    // Negative control: the same route does not retry POSTs, so some fail.
    let mut bad_gateway = 0;
    for _ in 0..20 {
        let answer = send(
            &client,
            Method::POST,
            route.local_addr(),
            "/echo",
            Bytes::from_static(b"x"),
        )
        .await;
        if answer.status == StatusCode::BAD_GATEWAY {
            assert_eq!(answer.header("x-graven-error"), "upstream");
            bad_gateway += 1;
        }
    }
    assert!(
        bad_gateway > 0,
        "no POST failed: the refusing instance took none"
    );
    assert_eq!(route.metrics().retries, retries);
    assert_eq!(
        route.metrics().release(2).unwrap().errors.upstream,
        bad_gateway as u64
    );
}

#[tokio::test]
async fn a_get_on_a_pooled_connection_the_instance_closed_is_sent_again() {
    let racy = RawBackend::one_answer_per_connection().await;
    let route = route(|_| {}).await;
    route.set_backends(vec![backend("racy", 1, racy.address)]);
    let client = client();
    assert_eq!(get(&client, route.local_addr(), "/").await.body, "first");
    let answer = get(&client, route.local_addr(), "/").await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (StatusCode::OK, "first")
    );
    assert_eq!(route.metrics().retries, 1);

    // Negative control: a POST in the same position is not sent again.
    let answer = send(&client, Method::POST, route.local_addr(), "/", Bytes::new()).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.header("x-graven-error"), "upstream");
    assert_eq!(route.metrics().retries, 1);
}

#[tokio::test]
async fn with_retries_off_a_refused_get_fails() {
    let refusing = refusing_address().await;
    let route = route(|options| options.retries = 0).await;
    let good = TestBackend::start("good").await;
    route.set_backends(vec![backend("gone", 1, refusing), good.backend(1)]);
    let client = client();
    let mut failed = 0;
    for _ in 0..10 {
        failed += usize::from(
            get(&client, route.local_addr(), "/").await.status == StatusCode::BAD_GATEWAY,
        );
    }
    assert!(failed > 0);
}

#[tokio::test]
async fn upstream_failures_map_to_502_and_504() {
    let client = client();
    let check = async |backends: Vec<Backend>, path: &str, status: StatusCode| {
        let route = route(|options| {
            options.response_timeout = Duration::from_millis(100);
            options.retries = 0;
        })
        .await;
        route.set_backends(backends);
        let answer = get(&client, route.local_addr(), path).await;
        assert_eq!(answer.status, status, "{path}: {}", answer.body);
        assert_eq!(answer.header("x-graven-error"), "upstream");
        assert_eq!(route.metrics().release(1).unwrap().errors.upstream, 1);
    };
    let garbage = RawBackend::start(b"this is not http\r\n\r\n").await;
    check(
        vec![backend("garbage", 1, garbage.address)],
        "/",
        StatusCode::BAD_GATEWAY,
    )
    .await;
    let silent = RawBackend::start(b"").await;
    check(
        vec![backend("silent", 1, silent.address)],
        "/",
        StatusCode::BAD_GATEWAY,
    )
    .await;
    let refusing = refusing_address().await;
    check(
        vec![backend("refusing", 1, refusing)],
        "/",
        StatusCode::BAD_GATEWAY,
    )
    .await;
    let hanging = TestBackend::start("hanging").await;
    check(
        vec![hanging.backend(1)],
        "/hang",
        StatusCode::GATEWAY_TIMEOUT,
    )
    .await;
    // Control: the same backend answers through the same kind of route.
    let route = route(|options| options.response_timeout = Duration::from_millis(100)).await;
    route.set_backends(vec![hanging.backend(1)]);
    assert_eq!(
        get(&client, route.local_addr(), "/").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn http2_clients_are_served_and_bodies_stream_both_ways() {
    let a = TestBackend::start("a").await;
    let route = route(|_| {}).await;
    route.set_backends(vec![a.backend(1)]);
    let answer = get(&h2_client(), route.local_addr(), "/").await;
    assert_eq!(
        (answer.status, answer.version, answer.body.as_str()),
        (StatusCode::OK, http::Version::HTTP_2, "a")
    );
    assert_eq!(answer.header("x-seen-host"), route.local_addr().to_string());

    let big: String = (0..200_000)
        .map(|index| char::from(b'a' + (index % 26) as u8))
        .collect();
    for client in [client(), h2_client()] {
        let answer = send(
            &client,
            Method::POST,
            route.local_addr(),
            "/echo",
            Bytes::from(big.clone()),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(
            answer.body == big,
            "echoed body differs ({} bytes)",
            answer.body.len()
        );
    }
}

#[tokio::test]
async fn forwarding_headers_are_set_and_hop_by_hop_ones_stripped() {
    let a = TestBackend::start("a").await;
    let route = route(|_| {}).await;
    route.set_backends(vec![a.backend(1)]);
    let request = http::Request::get(format!("http://{}/", route.local_addr()))
        .header("connection", "x-secret")
        .header("x-secret", "1")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let response = client().request(request).await.unwrap();
    let seen = |name: &str| {
        response
            .headers()
            .get(format!("x-seen-{name}"))
            .map(|value| value.to_str().unwrap().to_owned())
    };
    assert_eq!(seen("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(seen("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(seen("host"), Some(route.local_addr().to_string()));
    assert_eq!((seen("connection"), seen("x-secret")), (None, None));
}

#[tokio::test]
async fn metrics_count_per_release() {
    let old = TestBackend::start("old").await;
    let new = TestBackend::start("new").await;
    let route = route(|_| {}).await;
    route.set_backends(vec![old.backend(1), new.backend(2)]);
    let seen = spread(&client(), &route, 20).await;
    let metrics = route.metrics();
    let count = |release: u64| metrics.release(release).unwrap();
    assert_eq!(count(1).requests, seen["old"] as u64);
    assert_eq!(count(2).requests, seen["new"] as u64);
    assert_eq!(count(1).responses.success + count(2).responses.success, 20);
    assert_eq!(
        count(1).latency.counts.iter().sum::<u64>(),
        count(1).requests
    );
    assert!(count(1).p50_us.is_some() && count(2).p99_us.is_some());
    // The metrics serialize for the API and the controller.
    let json = serde_json::to_value(&metrics).unwrap();
    assert_eq!(json["releases"][1]["release"], 2);
}

#[tokio::test]
async fn binding_a_used_address_names_it() {
    let first = route(|_| {}).await;
    let error = Route::bind(RouteOptions::new(first.local_addr()))
        .await
        .unwrap_err();
    assert!(matches!(error, ProxyError::Bind { .. }));
    assert!(
        error.to_string().contains(&first.local_addr().to_string()),
        "{error}"
    );
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_then_closes() {
    let a = TestBackend::start("a").await;
    let route = route(|_| {}).await;
    let address = route.local_addr();
    route.set_backends(vec![a.backend(1)]);
    let slow = tokio::spawn(async move { get(&client(), address, "/slow").await });
    eventually(DEADLINE, "the slow request", || route.in_flight("a") == 1).await;
    let shutdown = tokio::spawn(route.shutdown());
    // The listener closes at once; the request in flight is not cut.
    let end = tokio::time::Instant::now() + DEADLINE;
    while tokio::net::TcpStream::connect(address).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < end,
            "still accepting after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!shutdown.is_finished());
    a.open_gate();
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    tokio::time::timeout(DEADLINE, shutdown)
        .await
        .unwrap()
        .unwrap();
}

/// Regression: a retry went back to the instance that had just closed the connection (a
/// crashed instance leaves several dead pooled connections), so under concurrent load a GET
/// could spend its retries on one dead instance and answer 502 while a good one stood by.
#[tokio::test]
async fn a_retry_skips_the_instance_that_closed_the_connection() {
    let closing = RawBackend::start(b"").await;
    let good = TestBackend::start("good").await;
    let failures = async |retries: u32| {
        let route = route(|options| options.retries = retries).await;
        route.set_backends(vec![backend("closes", 1, closing.address), good.backend(1)]);
        let address = route.local_addr();
        let workers: Vec<_> = (0..8)
            .map(|_| {
                tokio::spawn(async move {
                    let client = client();
                    let mut failed = 0;
                    for _ in 0..40 {
                        failed +=
                            usize::from(get(&client, address, "/").await.status != StatusCode::OK);
                    }
                    failed
                })
            })
            .collect();
        let mut failed = 0;
        for worker in workers {
            failed += worker.await.unwrap();
        }
        failed
    };
    assert_eq!(
        failures(1).await,
        0,
        "one retry must reach the good instance"
    );
    // Negative control: without retries, the closing instance's share fails.
    assert!(failures(0).await > 0);
}
