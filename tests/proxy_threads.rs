//! Routes on several threads, against real backends on 127.0.0.1:0: connections spread over
//! the threads, and what the threads share stays exact (counters, holding and its cap,
//! draining, a TCP route's cut at the drain deadline); a new thread count takes the
//! listening socket over without losing a connection (and rebinding instead does lose
//! some); shutdown frees the address.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use graven::proxy::{Backend, Route, RouteOptions, TcpRoute};
use http::StatusCode;
use support::load::Load;
use support::proxy::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

const DEADLINE: Duration = Duration::from_secs(10);

async fn route_on(threads: usize, configure: impl FnOnce(&mut RouteOptions)) -> Route {
    route(|options| {
        options.threads = threads;
        configure(options);
    })
    .await
}

/// Sends one GET on `stream` (kept open) and reads the answer's status line and head.
async fn get_on(stream: &mut BufReader<TcpStream>, close: bool) -> Result<u16, String> {
    let connection = if close { "close" } else { "keep-alive" };
    let request = format!("GET / HTTP/1.1\r\nhost: test\r\nconnection: {connection}\r\n\r\n");
    let exchange = async {
        stream
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .map_err(|error| format!("send: {error}"))?;
        let mut line = String::new();
        let mut status = None;
        let mut length = 0usize;
        loop {
            line.clear();
            let read = stream
                .read_line(&mut line)
                .await
                .map_err(|error| format!("receive: {error}"))?;
            if read == 0 {
                return Err("closed before a whole answer".to_owned());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            match status {
                None => {
                    status = header
                        .split(' ')
                        .nth(1)
                        .and_then(|code| code.parse::<u16>().ok());
                }
                Some(_) => {
                    if let Some((name, value)) = header.split_once(':')
                        && name.eq_ignore_ascii_case("content-length")
                    {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
            }
        }
        let mut body = vec![0u8; length];
        stream
            .read_exact(&mut body)
            .await
            .map_err(|error| format!("body: {error}"))?;
        status.ok_or_else(|| "no status line".to_owned())
    };
    tokio::time::timeout(DEADLINE, exchange)
        .await
        .map_err(|_| "no answer in time".to_owned())?
}

async fn connect(address: SocketAddr) -> Result<BufReader<TcpStream>, String> {
    match tokio::time::timeout(DEADLINE, TcpStream::connect(address)).await {
        Ok(Ok(stream)) => Ok(BufReader::new(stream)),
        Ok(Err(error)) => Err(format!("connect: {error}")),
        Err(_) => Err("connect: timed out".to_owned()),
    }
}

/// One request on a connection of its own, closed after the answer.
async fn once(address: SocketAddr) -> Result<u16, String> {
    let mut stream = connect(address).await?;
    get_on(&mut stream, true).await
}

#[tokio::test]
async fn connections_spread_over_the_route_threads() {
    let backend = TestBackend::start("a").await;
    for (threads, expected) in [(1, vec![8]), (2, vec![4, 4]), (4, vec![2, 2, 2, 2])] {
        let route = route_on(threads, |_| {}).await;
        route.set_backends(vec![backend.backend(1)]);
        // Eight connections open at once, each answered once: the acceptor gives each to the
        // thread with the fewest open, so they spread evenly.
        let mut open = Vec::new();
        for _ in 0..8 {
            let mut stream = connect(route.local_addr()).await.expect("connect");
            assert_eq!(get_on(&mut stream, false).await, Ok(200));
            open.push(stream);
        }
        let metrics = route.metrics();
        assert_eq!(metrics.accepted_by_thread, expected, "{threads} threads");
        assert_eq!(metrics.connections, 8);
        // Each connection keeps working on the thread it was given.
        for stream in &mut open {
            assert_eq!(get_on(stream, false).await, Ok(200));
        }
        assert_eq!(route.threads(), threads);
    }
}

#[tokio::test]
async fn counters_add_up_across_threads() {
    const CLIENTS: usize = 8;
    const REQUESTS: usize = 50;
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let route = route_on(2, |_| {}).await;
    route.set_backends(vec![a.backend(1), b.backend(1)]);
    let address = route.local_addr();
    let mut clients = JoinSet::new();
    for _ in 0..CLIENTS {
        clients.spawn(async move {
            // A client of its own: a connection of its own, on one of the route's threads.
            let client = client();
            for _ in 0..REQUESTS {
                assert_eq!(get(&client, address, "/").await.status, StatusCode::OK);
            }
        });
    }
    while let Some(done) = clients.join_next().await {
        done.expect("a client finished");
    }
    let total = (CLIENTS * REQUESTS) as u64;
    let metrics = route.metrics();
    let release = metrics.release(1).expect("release 1 counted");
    assert_eq!(release.requests, total);
    assert_eq!(release.responses.success, total);
    assert_eq!(release.latency.counts.iter().sum::<u64>(), total);
    assert_eq!((a.hits() + b.hits()) as u64, total);
    assert_eq!(
        metrics.accepted_by_thread.iter().sum::<u64>(),
        CLIENTS as u64
    );
    assert!(
        metrics.accepted_by_thread.iter().all(|&count| count > 0),
        "both threads served: {metrics:?}"
    );
}

#[tokio::test]
async fn holding_and_its_cap_are_exact_across_threads() {
    let backend = TestBackend::start("a").await;
    let route = Arc::new(route_on(2, |options| options.hold_queue = 4).await);
    let address = route.local_addr();
    let mut clients = JoinSet::new();
    for _ in 0..6 {
        clients.spawn(async move { once(address).await });
    }
    // Four wait, whichever thread they are on; the other two are refused at once.
    let mut refused = 0;
    while refused < 2 {
        let answer = tokio::time::timeout(DEADLINE, clients.join_next())
            .await
            .expect("the refusals in time")
            .expect("a client")
            .expect("a client finished");
        assert_eq!(answer, Ok(503), "refused for the full queue");
        refused += 1;
    }
    eventually(DEADLINE, "four requests held", || route.held() == 4).await;
    assert_eq!(route.metrics().unrouted.graven, 2);
    assert_eq!(route.metrics().accepted_by_thread.iter().sum::<u64>(), 6);
    route.set_backends(vec![backend.backend(1)]);
    while let Some(answer) = clients.join_next().await {
        assert_eq!(answer.expect("a client finished"), Ok(200));
    }
    assert_eq!(route.held(), 0);
    let metrics = route.metrics();
    assert_eq!(metrics.release(1).map(|release| release.requests), Some(4));
    assert_eq!(metrics.unrouted.graven, 2);
}

#[tokio::test]
async fn a_drain_waits_for_requests_on_every_thread() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let route = Arc::new(route_on(2, |_| {}).await);
    route.set_backends(vec![a.backend(1)]);
    let address = route.local_addr();
    let mut slow = JoinSet::new();
    for _ in 0..4 {
        slow.spawn(async move {
            let client = client();
            get(&client, address, "/slow").await.status
        });
    }
    eventually(DEADLINE, "four slow requests in flight", || {
        route.in_flight("a") == 4
    })
    .await;
    assert_eq!(route.metrics().accepted_by_thread, [2, 2]);
    route.set_backends(vec![a.backend(1), b.backend(1)]);
    let draining = {
        let route = Arc::clone(&route);
        tokio::spawn(async move { route.drain("a", DEADLINE).await })
    };
    eventually(DEADLINE, "a no longer routable", || {
        route.backends().iter().any(|backend| !backend.enabled)
    })
    .await;
    // New requests, on either thread, go to b while a drains.
    for _ in 0..4 {
        assert_eq!(once(address).await, Ok(200));
    }
    assert_eq!(b.hits(), 4);
    assert!(!draining.is_finished(), "the drain waits for a's requests");
    a.open_gate();
    assert_eq!(
        draining.await.expect("drained"),
        0,
        "every request finished"
    );
    while let Some(status) = slow.join_next().await {
        assert_eq!(status.expect("a slow client"), StatusCode::OK);
    }
    assert_eq!(route.in_flight("a"), 0);
}

/// A TCP server that greets each connection with a line, then echoes what it reads until
/// the client closes.
async fn greeting_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                stream.write_all(b"hello\n").await?;
                let (mut read, mut write) = stream.split();
                tokio::io::copy(&mut read, &mut write).await?;
                Ok::<(), std::io::Error>(())
            });
        }
    });
    address
}

#[tokio::test]
async fn a_tcp_drain_cuts_connections_on_every_thread_at_its_deadline() {
    let address = greeting_server().await;
    let mut options = RouteOptions::new("127.0.0.1:0".parse().expect("address"));
    options.threads = 2;
    let route = TcpRoute::bind(options).await.expect("bind the route");
    route.set_backends(vec![Backend {
        instance: "a".to_owned(),
        release: 1,
        address,
        healthy: true,
        enabled: true,
    }]);
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut stream = connect(route.local_addr()).await.expect("connect");
        let mut line = String::new();
        tokio::time::timeout(DEADLINE, stream.read_line(&mut line))
            .await
            .expect("greeting in time")
            .expect("greeting");
        assert_eq!(line, "hello\n");
        open.push(stream);
    }
    assert_eq!(route.metrics().accepted_by_thread, [2, 2]);
    assert_eq!(route.in_flight("a"), 4);
    assert_eq!(route.drain("a", Duration::from_millis(100)).await, 4);
    for mut stream in open {
        let mut left = Vec::new();
        tokio::time::timeout(DEADLINE, stream.read_to_end(&mut left))
            .await
            .expect("cut in time")
            .expect("read to EOF");
        assert!(left.is_empty(), "the client sees its connection end");
    }
    eventually(DEADLINE, "the cut connections gone", || {
        route.in_flight("a") == 0
    })
    .await;
    let tcp = route
        .metrics()
        .release(1)
        .and_then(|release| release.tcp.clone())
        .expect("counted");
    assert_eq!((tcp.cut, tcp.open), (4, 0));
}

async fn greeted(address: SocketAddr) -> BufReader<TcpStream> {
    let mut stream = connect(address).await.expect("connect");
    let mut line = String::new();
    tokio::time::timeout(DEADLINE, stream.read_line(&mut line))
        .await
        .expect("greeting in time")
        .expect("greeting");
    assert_eq!(line, "hello\n");
    stream
}

#[tokio::test]
async fn a_tcp_route_with_a_new_thread_count_keeps_its_open_sessions() {
    let instance = Backend {
        instance: "a".to_owned(),
        release: 1,
        address: greeting_server().await,
        healthy: true,
        enabled: true,
    };
    let mut options = RouteOptions::new("127.0.0.1:0".parse().expect("address"));
    options.threads = 1;
    let old = TcpRoute::bind(options).await.expect("bind the route");
    old.set_backends(vec![instance.clone()]);
    let address = old.local_addr();
    let mut session = greeted(address).await;

    let mut options = RouteOptions::new(address);
    options.threads = 2;
    let takeover = old.takeover().expect("a listening route");
    let new = TcpRoute::take_over(options, &takeover)
        .await
        .expect("take the listener over");
    drop(takeover);
    new.set_backends(vec![instance]);
    // A grace far longer than the test's deadline: the old route must end because its last
    // session did, not because the grace ran out.
    let retiring = tokio::spawn(old.retire(Duration::from_secs(600)));
    for _ in 0..4 {
        drop(greeted(address).await);
    }
    // The old route accepts no more, but its session goes on.
    session.get_mut().write_all(b"ping\n").await.expect("send");
    let mut line = String::new();
    tokio::time::timeout(DEADLINE, session.read_line(&mut line))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(line, "ping\n");
    assert!(
        !retiring.is_finished(),
        "the old route waits for its session"
    );
    drop(session);
    tokio::time::timeout(DEADLINE, retiring)
        .await
        .expect("the old route ends with its last session")
        .expect("retired");
    drop(greeted(address).await);
    assert!(new.metrics().accepted_by_thread.iter().sum::<u64>() >= 1);
}

/// Clients that each open a connection, send one request and read the answer, again and
/// again until stopped: every refused or unanswered connection is a failure.
struct Churn {
    stop: Arc<AtomicBool>,
    succeeded: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    clients: JoinSet<()>,
}

impl Churn {
    fn start(address: SocketAddr, clients: usize) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let succeeded = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut set = JoinSet::new();
        for _ in 0..clients {
            let (stop, succeeded, failures) = (
                Arc::clone(&stop),
                Arc::clone(&succeeded),
                Arc::clone(&failures),
            );
            set.spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    match once(address).await {
                        Ok(200) => {
                            succeeded.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(status) => failures.lock().unwrap().push(format!("status {status}")),
                        Err(error) => failures.lock().unwrap().push(error),
                    }
                }
            });
        }
        Churn {
            stop,
            succeeded,
            failures,
            clients: set,
        }
    }

    fn succeeded(&self) -> u64 {
        self.succeeded.load(Ordering::SeqCst)
    }

    fn failed(&self) -> usize {
        self.failures.lock().unwrap().len()
    }

    async fn stop(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        while self.clients.join_next().await.is_some() {}
        let failures = std::mem::take(&mut *self.failures.lock().unwrap());
        (self.succeeded(), failures)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_thread_count_takes_the_listener_over_and_loses_no_connection() {
    let backend = TestBackend::start("a").await;
    let mut route = route_on(1, |_| {}).await;
    route.set_backends(vec![backend.backend(1)]);
    let address = route.local_addr();
    let churn = Churn::start(address, 8);
    // Each change is one more thread, then back to one: the old route stops accepting and
    // closes while connections arrive, and the new one serves the queue they wait in.
    for threads in [2, 3, 1, 2] {
        let before = churn.succeeded();
        eventually(DEADLINE, "the churn running", || {
            churn.succeeded() > before + 50
        })
        .await;
        let mut options = RouteOptions::new(address);
        options.threads = threads;
        let takeover = route.takeover().expect("a listening route");
        let next = Route::take_over(options, &takeover)
            .await
            .expect("take the listener over");
        drop(takeover);
        next.set_backends(vec![backend.backend(1)]);
        let previous = std::mem::replace(&mut route, next);
        tokio::time::timeout(DEADLINE, previous.shutdown())
            .await
            .expect("the old route stops in time");
        assert_eq!(route.threads(), threads);
    }
    let before = churn.succeeded();
    eventually(DEADLINE, "the last route serving", || {
        churn.succeeded() > before + 50
    })
    .await;
    let (succeeded, failures) = churn.stop().await;
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(succeeded > 250, "the churn ran: {succeeded}");

    // Negative control: the same churn, and the route closed and bound again instead: the
    // connections that arrive in between, or wait in the closed listener's queue, fail.
    let churn = Churn::start(address, 8);
    let end = tokio::time::Instant::now() + DEADLINE;
    while churn.failed() == 0 {
        assert!(
            tokio::time::Instant::now() < end,
            "rebinding never failed a connection"
        );
        drop(route);
        let mut options = RouteOptions::new(address);
        options.threads = 2;
        route = Route::bind(options).await.expect("bind again");
        route.set_backends(vec![backend.backend(1)]);
    }
    let (_, failures) = churn.stop().await;
    eprintln!(
        "negative control: {} failed, e.g. {:?}",
        failures.len(),
        failures.first()
    );
}

/// Waits until the load has had `more` answers beyond what it had.
async fn load_goes_on(load: &Load, more: u64) {
    let before = load.snapshot().total;
    eventually(DEADLINE, "the load running", || {
        load.snapshot().total > before + more
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_under_keep_alive_load_on_several_threads_fails_nothing_and_counts_it_all() {
    let route = route_on(2, |_| {}).await;
    let first = [
        TestBackend::start("v1-a").await,
        TestBackend::start("v1-b").await,
    ];
    route.set_backends(first.iter().map(|backend| backend.backend(1)).collect());
    let load = Load::start(route.local_addr(), 8);
    load_goes_on(&load, 200).await;
    let mut current = first;
    for release in 2..=4u64 {
        let next = [
            TestBackend::start(&format!("v{release}-a")).await,
            TestBackend::start(&format!("v{release}-b")).await,
        ];
        let old: Vec<Backend> = current.iter().map(|b| b.backend(release - 1)).collect();
        let new: Vec<Backend> = next.iter().map(|b| b.backend(release)).collect();
        route.set_backends(old.iter().chain(&new).cloned().collect());
        load_goes_on(&load, 100).await;
        // As a rolling deploy does: the old instances drain, then leave the backend set.
        for backend in &old {
            assert_eq!(route.drain(&backend.instance, DEADLINE).await, 0);
        }
        route.set_backends(new);
        load_goes_on(&load, 100).await;
        current = next;
    }
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    let metrics = route.metrics();
    let counted: u64 = metrics
        .releases
        .iter()
        .map(|release| release.requests)
        .sum();
    let answered: u64 = metrics
        .releases
        .iter()
        .map(|release| release.responses.success)
        .sum();
    assert_eq!(
        (counted, answered),
        (report.total, report.total),
        "{metrics:?}"
    );
    assert!(
        metrics.releases.iter().all(|release| release.requests > 0),
        "every release served: {metrics:?}"
    );
    assert_eq!(metrics.accepted_by_thread.iter().sum::<u64>(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_thread_count_fails_no_keep_alive_request() {
    let backend = TestBackend::start("a").await;
    let mut route = route_on(2, |_| {}).await;
    route.set_backends(vec![backend.backend(1)]);
    let address = route.local_addr();
    let load = Load::start(address, 8);
    for threads in [1, 2, 3] {
        load_goes_on(&load, 200).await;
        let mut options = RouteOptions::new(address);
        options.threads = threads;
        let takeover = route.takeover().expect("a listening route");
        let next = Route::take_over(options, &takeover)
            .await
            .expect("take the listener over");
        next.set_backends(vec![backend.backend(1)]);
        let previous = std::mem::replace(&mut route, next);
        // Busy connections are closed after their next answer, which says so.
        tokio::time::timeout(DEADLINE, previous.shutdown())
            .await
            .expect("the old route stops in time");
        eventually(DEADLINE, "every client on the new route", || {
            route.connections() == 8
        })
        .await;
    }
    load_goes_on(&load, 200).await;
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
}

#[tokio::test]
async fn shutdown_and_drop_free_the_address_on_several_threads() {
    let backend = TestBackend::start("a").await;
    for threads in [1, 3] {
        let route = route_on(threads, |_| {}).await;
        let address = route.local_addr();
        route.set_backends(vec![backend.backend(1)]);
        let mut open = Vec::new();
        for _ in 0..threads * 2 {
            let mut stream = connect(address).await.expect("connect");
            assert_eq!(get_on(&mut stream, false).await, Ok(200));
            open.push(stream);
        }
        tokio::time::timeout(DEADLINE, route.shutdown())
            .await
            .expect("every thread stops in time");
        let again = TcpListener::bind(address).await;
        assert!(again.is_ok(), "free after shutdown: {again:?}");
        drop(again);

        let route = route_on(threads, |options| options.listen = address).await;
        route.set_backends(vec![backend.backend(1)]);
        for _ in 0..threads * 2 {
            assert_eq!(once(address).await, Ok(200));
        }
        drop(route);
        let again = TcpListener::bind(address).await;
        assert!(again.is_ok(), "free once dropped: {again:?}");
    }
}
