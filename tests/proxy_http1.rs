//! The route's own HTTP/1.1 client side against instances that frame their answers every
//! way HTTP/1.1 allows: a pooled connection the instance closed, an answer without a
//! length, chunked bodies both ways, HEAD, and a body echoed while it is still being sent.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::proxy::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const DEADLINE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_post_after_the_instance_closed_its_idle_connection_goes_out_on_a_fresh_one() {
    let closed = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&closed);
    let instance = RawBackend::serve(move |mut stream| {
        let closed = Arc::clone(&counted);
        async move {
            if read_head(&mut stream).await.is_some() {
                let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                let _ = stream.write_all(reply).await;
            }
            // Keep-alive said nothing against reuse, but the instance closes at once.
            drop(stream);
            closed.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    let route = route(|_| {}).await;
    route.set_backends(vec![backend("closing", 1, instance.address)]);
    let client = client();
    assert_eq!(get(&client, route.local_addr(), "/").await.body, "ok");
    eventually(DEADLINE, "the instance to close", || {
        closed.load(Ordering::SeqCst) == 1
    })
    .await;
    // A POST is never sent twice: had it gone out on the closed connection, it would fail.
    for round in 2..5 {
        let answer = send(&client, Method::POST, route.local_addr(), "/", Bytes::new()).await;
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (StatusCode::OK, "ok")
        );
        eventually(DEADLINE, "the instance to close", || {
            closed.load(Ordering::SeqCst) == round
        })
        .await;
    }
    assert_eq!(route.metrics().retries, 0);
    assert_eq!(route.metrics().release(1).unwrap().errors.upstream, 0);
}

#[tokio::test]
async fn an_answer_without_a_length_runs_to_the_close() {
    let eof =
        RawBackend::start(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the close")
            .await;
    let route = route(|_| {}).await;
    route.set_backends(vec![backend("eof", 1, eof.address)]);
    let client = client();
    for _ in 0..3 {
        let answer = get(&client, route.local_addr(), "/").await;
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (StatusCode::OK, "until the close")
        );
    }
    // Control: an answer cut short of its length is an upstream failure, not a short body.
    let short = RawBackend::start(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\ncut").await;
    route.set_backends(vec![backend("short", 2, short.address)]);
    let request = Request::get(format!("http://{}/", route.local_addr()))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    // The client sees the failure either before the head (the route's connection closes
    // before it was flushed) or in the body; never a whole, short answer.
    if let Ok(response) = client.request(request).await {
        assert!(response.into_body().collect().await.is_err());
    }
}

/// A client whose request bodies have no length: hyper sends them chunked.
fn streaming_client()
-> Client<hyper_util::client::legacy::connect::HttpConnector, BoxBody<Bytes, Infallible>> {
    Client::builder(TokioExecutor::new()).build_http()
}

#[tokio::test]
async fn chunked_bodies_go_both_ways() {
    // The instance records the request it got (head and chunked body, up to the last
    // chunk) and answers in chunks with trailers.
    let (seen_sender, mut seen) = mpsc::unbounded_channel();
    let instance = RawBackend::serve(move |mut stream| {
        let seen_sender = seen_sender.clone();
        async move {
            let mut request = Vec::new();
            let mut buffer = [0u8; 4096];
            while !request.ends_with(b"0\r\n\r\n") {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(read) => request.extend_from_slice(&buffer[..read]),
                }
            }
            let _ = seen_sender.send(String::from_utf8_lossy(&request).into_owned());
            let reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                          6\r\nchunk \r\n3;ext=1\r\none\r\n0\r\nx-trailer: t\r\n\r\n";
            let _ = stream.write_all(reply).await;
            let _ = read_head(&mut stream).await;
        }
    })
    .await;
    let route = route(|_| {}).await;
    route.set_backends(vec![backend("chunks", 1, instance.address)]);
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = ["hello ", "chunked ", "world"]
        .into_iter()
        .map(|part| Ok(Frame::data(Bytes::from_static(part.as_bytes()))))
        .collect();
    let body = BoxBody::new(StreamBody::new(futures_util::stream::iter(frames)));
    let request = Request::post(format!("http://{}/upload", route.local_addr()))
        .body(body)
        .unwrap();
    let response = streaming_client()
        .request(request)
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get("content-length").is_none());
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes();
    assert_eq!(&body[..], b"chunk one");
    let request = seen.recv().await.expect("the instance saw the request");
    let (head, body) = request.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("POST /upload HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("\r\ntransfer-encoding: chunked"), "{head}");
    let mut decoded = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest.split_once("\r\n").expect("a chunk-size line");
        let size = usize::from_str_radix(size, 16).expect("a hex size");
        if size == 0 {
            break;
        }
        decoded.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    assert_eq!(decoded, "hello chunked world");
}

#[tokio::test]
async fn head_answers_keep_their_length_and_have_no_body() {
    let a = TestBackend::start("a").await;
    let route = route(|_| {}).await;
    route.set_backends(vec![a.backend(1)]);
    let client = client();
    for _ in 0..2 {
        let answer = send(&client, Method::HEAD, route.local_addr(), "/", Bytes::new()).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.header("content-length"), "1");
        assert_eq!(answer.body, "");
        // The connection the HEAD went out on carries the next request.
        assert_eq!(get(&client, route.local_addr(), "/").await.body, "a");
    }
    assert_eq!(a.connections(), 1);
}

#[tokio::test]
async fn a_body_echoed_while_it_is_still_being_sent_streams_both_ways() {
    // The instance answers at once and sends back each piece of the body as it reads it:
    // a route that wrote the whole request before reading would stall once both
    // directions' socket buffers filled.
    let instance = RawBackend::serve(|mut stream| async move {
        let Some(head) = read_head(&mut stream).await else {
            return;
        };
        let text = String::from_utf8_lossy(&head).into_owned();
        let (head, early) = text.split_once("\r\n\r\n").expect("a head");
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .and_then(|value| value.trim().parse().ok())
            .expect("a content-length");
        let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {length}\r\n\r\n");
        if stream.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
        let mut left = length;
        let early = early.as_bytes();
        if stream.write_all(early).await.is_err() {
            return;
        }
        left -= early.len();
        let mut buffer = vec![0u8; 64 * 1024];
        while left > 0 {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => {
                    if stream.write_all(&buffer[..read]).await.is_err() {
                        return;
                    }
                    left -= read;
                }
            }
        }
    })
    .await;
    let route = route(|_| {}).await;
    route.set_backends(vec![backend("echo", 1, instance.address)]);
    // ASCII, so that the raw backend's lossy head split leaves the body's bytes alone.
    let big: Vec<u8> = (0..24 * 1024 * 1024)
        .map(|index| b'a' + (index % 26) as u8)
        .collect();
    let big = Bytes::from(big);
    let answer = tokio::time::timeout(
        DEADLINE * 6,
        send(
            &client(),
            Method::POST,
            route.local_addr(),
            "/echo",
            big.clone(),
        ),
    )
    .await
    .expect("the echo finishes");
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.body.as_bytes() == &big[..], "the echo differs");
}
