//! The catch-up gate (`events_caught_up`) with software nobody here wrote: a Python app on
//! Debian (python3 installed with apt on a base made with debootstrap, stdlib only) that keeps
//! a tally only in the app event log and reads it slowly on start. Without the gate a
//! deploy routes to new instances still replaying (the negative control); with it, no answer
//! of the route is ever behind the log.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::daemon::{Up, free_port, run_ok};
use support::wait_for;

/// The app: folds `{"add": n}` events into a total, reading `PAGE` events a request with
/// `PAGE_PAUSE_MS` between pages until it holds the log as it stood when it started, then
/// follows with long polls. `POST /add?n=N` appends and answers once this instance has
/// folded the event in; `GET /` shows the total; `/healthz` answers as soon as it serves.
const TALLY: &str = r#"import json, os, threading, time, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

URL = os.environ["GRAVEN_EVENTS_URL"]
PAGE = int(os.environ.get("PAGE", "1000"))
PAUSE = int(os.environ.get("PAGE_PAUSE_MS", "0")) / 1000
lock = threading.Lock()
total, last = 0, 0


def call(method, path, body=None):
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(URL + path, data=body, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=90) as answer:
        return json.load(answer)


def follow():
    global total, last
    start = call("GET", "")["last"]
    while True:
        caught_up = last >= start
        wait = "&wait=30s" if caught_up else ""
        try:
            page = call("GET", f"/events?from={last + 1}&limit={PAGE}{wait}")
        except OSError as error:
            print("reading the log:", error, flush=True)
            time.sleep(0.2)
            continue
        with lock:
            for event in page["events"]:
                total += event["body"]["add"]
                last = event["seq"]
        if not caught_up and PAUSE:
            time.sleep(PAUSE)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/healthz":
            return self.answer("ok")
        with lock:
            self.answer(f"total {total} after event {last}")

    def do_POST(self):
        n = int(self.path.partition("n=")[2])
        seq = call("POST", "/events", json.dumps({"add": n}).encode())["seq"]
        while True:
            with lock:
                if last >= seq:
                    break
            time.sleep(0.01)
        self.answer(f"event {seq}")

    def answer(self, text):
        body = text.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


threading.Thread(target=follow, daemon=True).start()
ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()
"#;

/// The project: the tally on the Debian base, two instances behind `route`, the gate as
/// `gated` says, `env` (TOML pairs) added to the service's environment.
fn project(dir: &Path, route: SocketAddr, version: &str, gated: bool, env: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tally.py"), TALLY).unwrap();
    std::fs::write(
        dir.join("Containerfile"),
        format!(
            "FROM docker-archive:{}\n\
             RUN apt-get update \\\n \
             && apt-get install -y --no-install-recommends python3 \\\n \
             && rm -rf /var/lib/apt/lists/*\n\
             COPY tally.py /app/tally.py\n\
             ENV PORT=8080\n\
             EXPOSE 8080\n\
             USER 65534:65534\n\
             CMD [\"python3\", \"-u\", \"/app/tally.py\"]\n",
            support::debian_base().display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("graven.toml"),
        format!(
            r#"app = "tally"

[services.tally]
instances = 2
route = "{route}"
env = {{ VERSION = "{version}"{env} }}
health = {{ path = "/healthz", interval = "100ms", timeout = "1s", healthy_after = 1, unhealthy_after = 3, events_caught_up = {gated} }}
deploy = {{ strategy = "rolling", max_surge = 1, max_unavailable = 0, health_deadline = "60s" }}
stop_grace = "2s"
"#
        ),
    )
    .unwrap();
}

/// One request over a fresh connection: "STATUS BODY", or the error.
fn request(route: SocketAddr, method: &str, path: &str) -> String {
    let answer = (|| -> std::io::Result<String> {
        let mut stream = TcpStream::connect(route)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: tally\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    })();
    match answer {
        Ok(answer) => {
            let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
            let status = head.split_whitespace().nth(1).unwrap_or("?");
            format!("{status} {body}")
        }
        Err(error) => format!("error {error}"),
    }
}

/// Waits until a dozen answers in a row (both instances) show `expected`.
fn wait_for_total(route: SocketAddr, expected: &str) {
    wait_for(Duration::from_secs(60), expected, || {
        (0..12)
            .all(|_| request(route, "GET", "/") == expected)
            .then_some(())
    });
}

/// Deploys the project and returns every answer the route gave meanwhile, sampled as fast
/// as it answers until the deploy ended and every instance shows `full`.
fn answers_during_deploy(home: &Path, dir: &Path, route: SocketAddr, full: &str) -> Vec<String> {
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !done.load(Ordering::SeqCst) {
                seen.push(request(route, "GET", "/"));
            }
            seen
        })
    };
    run_ok(home, &["deploy", dir.to_str().unwrap()]);
    wait_for_total(route, full);
    done.store(true, Ordering::SeqCst);
    sampler.join().unwrap()
}

#[test]
fn a_python_app_on_debian_is_routed_to_only_once_it_has_caught_up_with_the_log() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let route = free_port();
    project(&dir, route, "v1", true, "");
    let _daemon = Up::daemon(&home, "local");
    run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    for n in 1..=40 {
        let answer = request(route, "POST", &format!("/add?n={n}"));
        assert_eq!(answer, format!("200 event {n}"));
    }
    let full = "200 total 820 after event 40";
    wait_for_total(route, full);
    // Five events a page, 0.3 s after each: 2.4 s of replay for each new instance.
    let slow = r#", PAGE = "5", PAGE_PAUSE_MS = "300""#;

    // The negative control: without the gate, the route answers from a new instance still
    // replaying (the deploy changes only the environment: the same image, no new bake).
    project(&dir, route, "v2", false, slow);
    let seen = answers_during_deploy(&home, &dir, route, full);
    let behind: Vec<&String> = seen.iter().filter(|s| *s != full).collect();
    assert!(
        behind.iter().any(|s| s.starts_with("200 total")),
        "without events_caught_up some answer should come from an instance still replaying; \
         {} answers: {behind:?}",
        seen.len()
    );
    println!(
        "without the gate: {} of {} answers behind the log, e.g. {:?}",
        behind.len(),
        seen.len(),
        behind.first()
    );

    // With the gate: every answer holds the whole log.
    project(&dir, route, "v3", true, slow);
    let seen = answers_during_deploy(&home, &dir, route, full);
    let behind: Vec<&String> = seen.iter().filter(|s| *s != full).collect();
    assert!(
        behind.is_empty(),
        "with events_caught_up every answer holds the whole log: {behind:?}"
    );
    println!("with the gate: {} answers, all whole", seen.len());
}
