//! graven's event-sourced example. Its whole state is a running total, kept only as events
//! (`{"add": N}`) in the app event log at `$GRAVEN_EVENTS_URL`:
//!
//! - on start it replays every event; its service sets `[health] events_caught_up = true`, so
//!   graven routes to an instance only once the log says it has read up to the log's end as
//!   it stood at the instance's start, and `/healthz` only says whether it serves;
//! - `LEDGER_PAGE` (events per read, default 1,000) and `LEDGER_PAGE_PAUSE_MS` (a pause after
//!   each page of the replay, default none) make a slow reader, to watch the gate at work;
//! - `POST /add?n=N` appends an event and answers once the event is folded into the total;
//! - `GET /` answers `total T after event S`;
//! - a follower long-polls the log, so events other instances append reach this one too.
//!
//! Kill it, redeploy it, roll it back: every instance shows the same total, because no
//! instance holds state the log does not.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Default)]
struct State {
    total: i64,
    /// The last event folded in.
    seq: u64,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

fn main() {
    let url = std::env::var("GRAVEN_EVENTS_URL").expect("GRAVEN_EVENTS_URL is set by graven");
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let listener = TcpListener::bind(("0.0.0.0", port.parse::<u16>().expect("PORT is a port")))
        .expect("the port is free");
    let state: Shared = Arc::default();
    let follower = state.clone();
    let events = url.clone();
    std::thread::spawn(move || follow(&events, &follower));
    for stream in listener.incoming().flatten() {
        let state = state.clone();
        let url = url.clone();
        std::thread::spawn(move || {
            let _ = serve(stream, &url, &state);
        });
    }
}

/// Replays the log, then keeps folding new events in as they come (long polls).
fn follow(url: &str, state: &Shared) {
    let setting = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let limit = setting("LEDGER_PAGE", 1_000);
    let pause = Duration::from_millis(setting("LEDGER_PAGE_PAUSE_MS", 0));
    let mut target = None;
    let mut replayed = false;
    loop {
        let from = state.0.lock().unwrap().seq + 1;
        let wait = if replayed { "&wait=10s" } else { "" };
        let path = format!("/events?from={from}&limit={limit}{wait}");
        let page = match request(url, "GET", &path, None) {
            Ok((200, body)) => body,
            _ => {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let page: serde_json::Value = serde_json::from_slice(&page).unwrap_or_default();
        let last = page["last"].as_u64().unwrap_or(0);
        let target = *target.get_or_insert(last);
        let (lock, changed) = &**state;
        let mut state = lock.lock().unwrap();
        for event in page["events"].as_array().into_iter().flatten() {
            let seq = event["seq"].as_u64().unwrap_or(0);
            if seq == state.seq + 1 {
                state.total += event["body"]["add"].as_i64().unwrap_or(0);
                state.seq = seq;
            }
        }
        replayed |= state.seq >= target;
        changed.notify_all();
        drop(state);
        if !replayed {
            std::thread::sleep(pause);
        }
    }
}

fn serve(stream: TcpStream, url: &str, state: &Shared) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let (status, body) = match (method, target.split('?').next().unwrap_or("")) {
        // Serving is all it says: graven's `events_caught_up` check adds the reading.
        ("GET", "/healthz") => (200, "ok".to_owned()),
        ("GET", "/") => {
            let state = state.0.lock().unwrap();
            (
                200,
                format!("total {} after event {}", state.total, state.seq),
            )
        }
        ("POST", "/add") => add(url, target, state),
        _ => (404, "not found".to_owned()),
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Appends `{"add": n}` and answers once this instance has folded it in.
fn add(url: &str, target: &str, state: &Shared) -> (u16, String) {
    let n: i64 = match target
        .split_once("n=")
        .and_then(|(_, n)| n.split('&').next()?.parse().ok())
    {
        Some(n) => n,
        None => return (400, "?n=NUMBER is required".to_owned()),
    };
    let body = format!("{{\"add\":{n}}}");
    let seq = match request(url, "POST", "/events", Some(&body)) {
        Ok((201, answer)) => serde_json::from_slice::<serde_json::Value>(&answer)
            .ok()
            .and_then(|a| a["seq"].as_u64()),
        _ => None,
    };
    let Some(seq) = seq else {
        return (503, "the event log did not take the event".to_owned());
    };
    let (lock, changed) = &**state;
    let state = changed
        .wait_timeout_while(lock.lock().unwrap(), Duration::from_secs(10), |s| {
            s.seq < seq
        })
        .unwrap()
        .0;
    (
        200,
        format!("total {} after event {}", state.total, state.seq),
    )
}

/// One HTTP/1.1 request to the event log (`url` is `http://ADDR:PORT/PATH`), answered with
/// its status and body.
fn request(
    url: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, Vec<u8>)> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (addr, base) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(70)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {base}{path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of head"))?;
    let status = String::from_utf8_lossy(&answer[..split])
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, answer[split + 4..].to_vec()))
}
