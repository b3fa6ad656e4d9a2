//! The app event log's HTTP API, which instances reach at `$GRAVEN_EVENTS_URL`
//! (`http://ADDR:PORT/v1/<app>/<environment>/<token>`):
//!
//! - `GET  URL` — where the log stands: `{"first","last","bytes"}`;
//! - `POST URL/events[?expected=N]` — append the body (JSON when the content type says so,
//!   bytes otherwise); `201 {"seq"}` once durable, `409 {"error","last"}` when the last event
//!   is not `N`, `413` over the size limit;
//! - `GET  URL/events?from=N[&limit=L][&wait=30s]` — events from `N` on, paged; with `wait`
//!   and none to give, the answer waits (long poll) for the next append or the time;
//!   `410 {"error","first"}` when `N` was compacted into the snapshot;
//! - `GET  URL/snapshot` and `PUT URL/snapshot?seq=N` — the app's own snapshot.
//!
//! The server runs on a thread of its own (`start`), which reads each append, writes the
//! appends waiting as one batch with one synced write (a group commit) and answers them; the
//! token is checked in constant time against the one the control
//! plane made for the app and environment. Errors map to status codes in one exhaustive match.
//!
//! An instance's URL carries a token of its own, `<instance>.<mac>`: an HMAC-SHA256 of the
//! app, environment and instance under the environment's token, so the server tells
//! instances apart without storing anything, a restarted daemon still knows every instance's,
//! and one opens exactly what the environment's token opens. For each instance the server
//! keeps how far it has read (`Readers`), which the controller's `events_caught_up` health
//! gate and `graven status` ask.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{oneshot, watch};

use super::{AppEventLog, AppEventsError, Append, Event, Kind, MAX_BODY, Snapshot};

/// The token's file name in an environment's directory.
pub const TOKEN_FILE: &str = "app-events.token";
/// The environment variable instances find the URL in.
pub const URL_ENV: &str = "GRAVEN_EVENTS_URL";
/// The most a long poll waits.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// The most events one read answers with, and the default.
const MAX_PAGE: usize = 10_000;
const DEFAULT_PAGE: usize = 1_000;
/// How often the server looks for another process's appends.
const LOOK_AGAIN: Duration = Duration::from_millis(200);
/// The most appends one batch takes: a bound on one write, not on throughput.
const MAX_BATCH: usize = 4_096;

/// What the API answers with when something is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("no such path: {0}")]
    NotFound(String),
    #[error("{0} is not allowed here")]
    Method(Method),
    #[error(
        "the token is neither this app's and environment's nor one of its instances' \
         (an instance's is `<instance>.<mac>`, given in $GRAVEN_EVENTS_URL)"
    )]
    Forbidden,
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("the body is over the limit of {MAX_BODY} bytes")]
    TooLarge,
    #[error(transparent)]
    Log(#[from] AppEventsError),
    #[error("the log's writer has stopped")]
    WriterGone,
}

impl ServeError {
    fn status(&self) -> StatusCode {
        match self {
            ServeError::NotFound(_) => StatusCode::NOT_FOUND,
            ServeError::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            ServeError::Forbidden => StatusCode::FORBIDDEN,
            ServeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ServeError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ServeError::Log(error) => match error {
                AppEventsError::Conflict { .. } => StatusCode::CONFLICT,
                AppEventsError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                AppEventsError::Compacted { .. } => StatusCode::GONE,
                AppEventsError::SnapshotAhead { .. } => StatusCode::BAD_REQUEST,
                AppEventsError::Io { .. }
                | AppEventsError::NotALog { .. }
                | AppEventsError::NotWritten { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ServeError::WriterGone => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The answer's body: the message, and the figure a client needs to carry on.
    fn body(&self) -> serde_json::Value {
        let mut body = serde_json::json!({ "error": self.to_string() });
        match self {
            ServeError::Log(AppEventsError::Conflict { last, .. }) => body["last"] = (*last).into(),
            ServeError::Log(AppEventsError::Compacted { first }) => body["first"] = (*first).into(),
            _ => {}
        }
        body
    }
}

/// The token an environment's instances carry, made on first use (random, 0600).
pub fn token(env_dir: &Path) -> std::io::Result<String> {
    use std::io::Write;
    let path = env_dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(token) if token.trim().len() == 64 => return Ok(token.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(env_dir)?;
    // The kernel's CSPRNG: the token is a credential.
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    let token = hex::encode(bytes);
    let mut temp = tempfile::NamedTempFile::new_in(env_dir)?;
    temp.write_all(token.as_bytes())?;
    temp.as_file().sync_all()?;
    std::fs::set_permissions(
        temp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    // Two makers at once: the first name wins and both read it back.
    match temp.persist_noclobber(&path) {
        Ok(_) => Ok(token),
        Err(_) => Ok(std::fs::read_to_string(&path)?.trim().to_owned()),
    }
}

/// The token of one instance of `app` in `environment`: its name and an HMAC-SHA256 of the
/// three names under the environment's token (`env_token`), in hex.
pub fn instance_token(env_token: &str, app: &str, environment: &str, instance: &str) -> String {
    use hmac::{KeyInit as _, Mac as _};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(env_token.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(
        format!("graven app event log instance\0{app}\0{environment}\0{instance}").as_bytes(),
    );
    format!("{instance}.{}", hex::encode(mac.finalize().into_bytes()))
}

/// Who a request's token names: a person or tool with the environment's token, or one
/// instance with its own.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Caller {
    Environment,
    Instance(String),
}

/// The caller `token` names in `app`/`environment` whose token is `env_token`, compared in
/// constant time; none for a token that is neither.
fn caller(token: &str, env_token: &str, app: &str, environment: &str) -> Option<Caller> {
    if constant_time_eq(token.as_bytes(), env_token.as_bytes()) {
        return Some(Caller::Environment);
    }
    let (instance, _) = token.rsplit_once('.')?;
    if !valid_instance(instance) {
        return None;
    }
    let expected = instance_token(env_token, app, environment, instance);
    constant_time_eq(token.as_bytes(), expected.as_bytes())
        .then(|| Caller::Instance(instance.to_owned()))
}

/// Instance names as the controller makes them (`<service>-<release>-<n>.<env>.<app>`).
fn valid_instance(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// How far each instance of one app and environment has read: the highest `from - 1` it has
/// asked for events from (up to the last event), since an instance asks from N once it holds
/// everything before N. Not what a read handed out: an instance has not folded a page in
/// when the server hands it over, and a gate opened then would route to it early (seen in
/// `tests/app_events.rs` on a loaded machine). Kept in memory: an instance that goes on
/// following tells a restarted daemon again with its next read.
#[derive(Debug, Default)]
struct Readers {
    read: Mutex<BTreeMap<String, u64>>,
}

impl Readers {
    fn record(&self, instance: &str, seq: u64) {
        let mut read = lock(&self.read);
        match read.get_mut(instance) {
            Some(known) => *known = (*known).max(seq),
            None => {
                read.insert(instance.to_owned(), seq);
            }
        }
    }

    fn get(&self, instance: &str) -> Option<u64> {
        lock(&self.read).get(instance).copied()
    }
}

/// The URL an instance of `app` in `environment` is given, for a server at `addr`.
pub fn url(addr: SocketAddr, app: &str, environment: &str, token: &str) -> String {
    format!("http://{addr}/v1/{app}/{environment}/{token}")
}

/// One open log: the appends waiting for the next batch, a handle for reads, and the last
/// sequence for long polls to wait on.
struct Stream {
    log: Arc<Mutex<AppEventLog>>,
    pending: Mutex<Pending>,
    last: watch::Sender<u64>,
    token: String,
    readers: Readers,
}

/// The appends waiting to be written, and whether a commit task is on its way to write them.
#[derive(Default)]
struct Pending {
    jobs: Vec<Job>,
    scheduled: bool,
}

type Job = (Append, oneshot::Sender<Result<u64, AppEventsError>>);

impl Stream {
    fn open(dir: &Path) -> Result<Arc<Stream>, ServeError> {
        let token = token(dir).map_err(|source| AppEventsError::Io {
            path: dir.join(TOKEN_FILE),
            source,
        })?;
        let mut log = AppEventLog::open(dir)?;
        // The daemon appends all the time: the zeros ahead of the records are written off the
        // appends' path.
        log.write_zeros_ahead()?;
        let (last, _) = watch::channel(log.position().last);
        let stream = Arc::new(Stream {
            log: Arc::new(Mutex::new(log)),
            pending: Mutex::new(Pending::default()),
            last,
            token,
            readers: Readers::default(),
        });
        let watched = Arc::downgrade(&stream);
        std::thread::Builder::new()
            .name("app-events-look".into())
            .spawn(move || look_for_other_writers(&watched))
            .map_err(|source| AppEventsError::Io {
                path: dir.to_owned(),
                source,
            })?;
        Ok(stream)
    }

    /// Appends one event and answers with its sequence once it is durable. The first append
    /// that finds no commit on its way starts one; every append that arrives before that
    /// commit runs joins its batch (a group commit).
    async fn append(self: &Arc<Self>, append: Append) -> Result<u64, ServeError> {
        let (answer, answered) = oneshot::channel();
        let start = {
            let mut pending = lock(&self.pending);
            pending.jobs.push((append, answer));
            !std::mem::replace(&mut pending.scheduled, true)
        };
        if start {
            // A task of its own, not this request's: a client that hangs up must not take
            // the batch of the others with it.
            tokio::spawn(self.clone().commit());
        }
        Ok(answered.await.map_err(|_| ServeError::WriterGone)??)
    }

    /// Writes the waiting appends as batches, each answered after its sync, until none wait.
    ///
    /// It runs on the event log's own thread (`start`), which serves the connections too: the
    /// thread that read an append syncs it and answers it, so no append crosses to another
    /// thread and back (the writer thread this replaced cost two wake-ups of a sleeping
    /// thread per append, and their run-queue delays were the tail at 4 connections). The
    /// sync blocks that thread, which is its job: the requests that come meanwhile wait in
    /// their sockets and make the next batch.
    async fn commit(self: Arc<Self>) {
        // `yield_now` wakes this task only after the runtime has polled its sockets: every
        // connection with an append ready is read first, and the append joins this batch.
        tokio::task::yield_now().await;
        loop {
            let (batch, more) = {
                let mut pending = lock(&self.pending);
                let mut bytes = 0;
                let take = pending
                    .jobs
                    .iter()
                    .take(MAX_BATCH)
                    .take_while(|(append, _)| {
                        bytes += append.body.len();
                        bytes <= super::MAX_BATCH_BYTES
                    })
                    .count()
                    .max(1)
                    .min(pending.jobs.len());
                let batch: Vec<Job> = pending.jobs.drain(..take).collect();
                let more = !pending.jobs.is_empty();
                pending.scheduled = more;
                (batch, more)
            };
            if !batch.is_empty() {
                self.write(batch);
            }
            if !more {
                return;
            }
        }
    }

    /// Appends `batch` (blocking for its sync), answers each append, and tells long polls.
    fn write(&self, batch: Vec<Job>) {
        let (appends, answers): (Vec<Append>, Vec<_>) = batch.into_iter().unzip();
        let mut log = lock(&self.log);
        match log.append(&appends) {
            Ok(results) => {
                let now = log.position().last;
                drop(log);
                for (result, answer) in results.into_iter().zip(answers) {
                    let _ = answer.send(result);
                }
                self.last.send_replace(now);
            }
            Err(error) => {
                drop(log);
                let message = error.to_string();
                for answer in answers {
                    let _ = answer.send(Err(AppEventsError::NotWritten {
                        message: message.clone(),
                    }));
                }
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every `LOOK_AGAIN`, takes notice of appends and compactions by another process (`graven
/// events`), so long polls hear of them too. Ends when the stream is dropped.
fn look_for_other_writers(stream: &std::sync::Weak<Stream>) {
    loop {
        std::thread::sleep(LOOK_AGAIN);
        let Some(stream) = stream.upgrade() else {
            return;
        };
        let mut log = lock(&stream.log);
        if log.refresh_if_changed().unwrap_or(false) {
            stream.last.send_replace(log.position().last);
        }
    }
}

/// The server: the logs of every app and environment under `apps_dir`
/// (`<apps_dir>/<app>/<environment>/`), opened when first asked for.
pub struct AppEventsServer {
    apps_dir: PathBuf,
    streams: Mutex<BTreeMap<(String, String), Arc<Stream>>>,
}

impl std::fmt::Debug for AppEventsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppEventsServer")
            .field("apps_dir", &self.apps_dir)
            .finish_non_exhaustive()
    }
}

impl AppEventsServer {
    pub fn new(apps_dir: PathBuf) -> Arc<AppEventsServer> {
        Arc::new(AppEventsServer {
            apps_dir,
            streams: Mutex::new(BTreeMap::new()),
        })
    }

    fn stream(&self, app: &str, environment: &str) -> Result<Arc<Stream>, ServeError> {
        let key = (app.to_owned(), environment.to_owned());
        let mut streams = lock(&self.streams);
        if let Some(stream) = streams.get(&key) {
            return Ok(stream.clone());
        }
        // Only an environment the control plane knows (its directory exists) has a log: a
        // stranger's path makes nothing on disk.
        let dir = self.apps_dir.join(app).join(environment);
        if !valid_name(app) || !valid_name(environment) || !dir.is_dir() {
            return Err(ServeError::NotFound(format!("{app}/{environment}")));
        }
        let stream = Stream::open(&dir)?;
        streams.insert(key, stream.clone());
        Ok(stream)
    }

    /// The last event of `app`/`environment`'s log now (0 when it has none). The file work
    /// (opening the log, looking for other writers' appends, waiting out a batch's sync) runs
    /// on a blocking thread, not the caller's async task.
    pub async fn head(self: Arc<Self>, app: &str, environment: &str) -> Result<u64, ServeError> {
        let (app, environment) = (app.to_owned(), environment.to_owned());
        tokio::task::spawn_blocking(move || {
            let stream = self.stream(&app, &environment)?;
            let mut log = lock(&stream.log);
            log.refresh_if_changed()?;
            Ok(log.position().last)
        })
        .await
        .map_err(|_| ServeError::WriterGone)?
    }

    /// How far `instance` of `app`/`environment` has read, if it has read at all since the
    /// log was opened by this server.
    pub fn read_by(&self, app: &str, environment: &str, instance: &str) -> Option<u64> {
        let streams = lock(&self.streams);
        streams
            .get(&(app.to_owned(), environment.to_owned()))?
            .readers
            .get(instance)
    }

    /// Forgets the read positions of `app`/`environment`'s instances not in `live`.
    pub fn forget_readers_but(&self, app: &str, environment: &str, live: &[&str]) {
        let streams = lock(&self.streams);
        if let Some(stream) = streams.get(&(app.to_owned(), environment.to_owned())) {
            lock(&stream.readers.read).retain(|name, _| live.contains(&name.as_str()));
        }
    }

    /// Serves on `listener` until `stop` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30));
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        // Out of descriptors, most likely: back off rather than spin.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
                () = &mut stop => break,
            };
            let _ = stream.set_nodelay(true);
            let server = self.clone();
            let connection = builder.serve_connection(
                TokioIo::new(stream),
                hyper::service::service_fn(move |request| {
                    let server = server.clone();
                    async move { Ok::<_, Infallible>(server.answer(request).await) }
                }),
            );
            tokio::spawn(async move {
                let _ = connection.await;
            });
        }
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        match self.route(request).await {
            Ok(response) => response,
            Err(error) => json(error.status(), &error.body()),
        }
    }

    async fn route(&self, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, ServeError> {
        let path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or("").to_owned();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (app, environment, token, rest) = match parts.as_slice() {
            ["v1", app, environment, token, rest @ ..] => (*app, *environment, *token, rest),
            _ => return Err(ServeError::NotFound(path.clone())),
        };
        let stream = self.stream(app, environment)?;
        let caller = caller(token, &stream.token, app, environment).ok_or(ServeError::Forbidden)?;
        let method = request.method().clone();
        match (rest, &method) {
            ([], &Method::GET) => {
                let position = {
                    let mut log = lock(&stream.log);
                    log.refresh_if_changed()?;
                    log.position()
                };
                let mut answer = serde_json::to_value(position).unwrap_or_default();
                if let Caller::Instance(instance) = &caller {
                    answer["instance"] = instance.as_str().into();
                    answer["read"] = stream.readers.get(instance).unwrap_or(0).into();
                }
                Ok(json(StatusCode::OK, &answer))
            }
            (["events"], &Method::POST) => {
                let kind = if is_json(&request) {
                    Kind::Json
                } else {
                    Kind::Bytes
                };
                let expected = param(&query, "expected")
                    .map(|v| {
                        v.parse::<u64>()
                            .map_err(|_| bad("expected must be a number"))
                    })
                    .transpose()?;
                let body = read_body(request).await?;
                if kind == Kind::Json
                    && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err()
                {
                    return Err(bad("the body is not JSON, though its content type says so"));
                }
                let seq = stream
                    .append(Append {
                        kind,
                        body: body.to_vec(),
                        expected,
                    })
                    .await?;
                Ok(json(
                    StatusCode::CREATED,
                    &serde_json::json!({ "seq": seq }),
                ))
            }
            (["events"], &Method::GET) => {
                let from = match param(&query, "from") {
                    Some(v) => v.parse::<u64>().map_err(|_| bad("from must be a number"))?,
                    None => 1,
                };
                let limit = match param(&query, "limit") {
                    Some(v) => v
                        .parse::<usize>()
                        .map_err(|_| bad("limit must be a number"))?,
                    None => DEFAULT_PAGE,
                }
                .min(MAX_PAGE);
                let wait = match param(&query, "wait") {
                    Some(v) => humantime::parse_duration(&v)
                        .map_err(|_| bad("wait must be a duration such as 30s"))?
                        .min(MAX_WAIT),
                    None => Duration::ZERO,
                };
                let mut last = stream.last.subscribe();
                // Asking from N says everything before N is held (up to what there is),
                // said before a long poll waits.
                if let Caller::Instance(instance) = &caller {
                    let held = from.saturating_sub(1).min(*last.borrow());
                    stream.readers.record(instance, held);
                }
                if !wait.is_zero() && *last.borrow() < from {
                    let _ = tokio::time::timeout(wait, last.wait_for(|last| *last >= from)).await;
                }
                let log = stream.log.clone();
                let events = tokio::task::spawn_blocking(move || {
                    let mut log = lock(&log);
                    log.refresh_if_changed()?;
                    log.read(from, limit, 4 << 20)
                        .map(|events| (events, log.position()))
                })
                .await
                .map_err(|_| ServeError::WriterGone)??;
                let (events, position) = events;
                let next = events
                    .last()
                    .map_or(from.max(position.first), |e| e.seq + 1);
                let events: Vec<serde_json::Value> = events.iter().map(wire).collect();
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({ "events": events, "next": next, "last": position.last }),
                ))
            }
            (["snapshot"], &Method::GET) => {
                let snapshot = lock(&stream.log).snapshot()?;
                match snapshot {
                    Some(snapshot) => {
                        let mut response = Response::new(Full::new(Bytes::from(snapshot.body)));
                        response
                            .headers_mut()
                            .insert("graven-seq", http::HeaderValue::from(snapshot.seq));
                        Ok(response)
                    }
                    None => Err(ServeError::NotFound("no snapshot yet".into())),
                }
            }
            (["snapshot"], &Method::PUT) => {
                let seq = param(&query, "seq")
                    .ok_or_else(|| bad("seq is required: the last event the snapshot covers"))?
                    .parse::<u64>()
                    .map_err(|_| bad("seq must be a number"))?;
                let body = read_body(request).await?;
                lock(&stream.log).put_snapshot(&Snapshot {
                    seq,
                    body: body.to_vec(),
                })?;
                Ok(json(StatusCode::OK, &serde_json::json!({ "seq": seq })))
            }
            ([], _) | (["events"], _) | (["snapshot"], _) => Err(ServeError::Method(method)),
            _ => Err(ServeError::NotFound(path.clone())),
        }
    }
}

/// An event as the API gives it: a JSON body as JSON, any other as base64.
fn wire(event: &Event) -> serde_json::Value {
    use base64::Engine;
    let mut value = serde_json::json!({ "seq": event.seq, "time_ms": event.time_ms });
    match event.kind {
        Kind::Json => {
            value["body"] = serde_json::from_slice(&event.body).unwrap_or(serde_json::Value::Null)
        }
        Kind::Bytes => {
            value["base64"] = base64::engine::general_purpose::STANDARD
                .encode(&event.body)
                .into()
        }
    }
    value
}

fn is_json(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let mime = v.split(';').next().unwrap_or("").trim();
            mime == "application/json" || mime.ends_with("+json")
        })
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, ServeError> {
    let limited = Limited::new(request.into_body(), MAX_BODY);
    match tokio::time::timeout(Duration::from_secs(30), limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => {
            Err(ServeError::TooLarge)
        }
        Ok(Err(error)) => Err(bad(&format!("reading the body: {error}"))),
        Err(_) => Err(bad("the body took over 30s to arrive")),
    }
}

fn bad(message: &str) -> ServeError {
    ServeError::BadRequest(message.to_owned())
}

fn param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| value.to_owned())
    })
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(value).unwrap_or_default(),
    )));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// App and environment names as the spec allows them: no path tricks.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Where a daemon's app event log listens: one port, on loopback (for `network = "host"`
/// instances and people) and, when instances have networks of their own, on the bridge's
/// gateway address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub port: u16,
    pub gateway: Option<std::net::Ipv4Addr>,
}

impl Endpoint {
    /// The URL an instance of `app` in `environment` is given: the gateway's address when it
    /// has a network of its own, loopback when it shares the host's.
    pub fn url_for(&self, host_network: bool, app: &str, environment: &str, token: &str) -> String {
        let ip = match (host_network, self.gateway) {
            (false, Some(gateway)) => gateway,
            _ => std::net::Ipv4Addr::LOCALHOST,
        };
        url(SocketAddr::from((ip, self.port)), app, environment, token)
    }
}

/// The file under `$GRAVEN_HOME` that keeps the port, so a restarted daemon listens where the
/// instances it left running were told to look.
pub const PORT_FILE: &str = "app-events.port";

/// A daemon's app event log: where instances reach it, and the server (which the controller
/// asks how far an instance has read).
#[derive(Debug, Clone)]
pub struct AppEvents {
    pub endpoint: Endpoint,
    pub server: Arc<AppEventsServer>,
    /// The event log's thread serves until the last clone of this is dropped.
    _serving: Arc<Serving>,
}

/// Ends the event log's thread when dropped.
#[derive(Debug)]
struct Serving {
    _stop: oneshot::Sender<()>,
}

/// Binds the app event log's listeners for the daemon of `home` and serves them on a thread
/// of its own (a single-threaded runtime, as a route's threads are) for as long as the
/// returned `AppEvents` (or a clone) is kept: each append is read, synced and answered on that
/// one thread (`Stream::commit`). `gateway` is the bridge's address when instances get
/// networks of their own; the port is opened to them there.
pub fn start(home: &Path, gateway: Option<std::net::Ipv4Addr>) -> Result<AppEvents, ServeError> {
    let port_path = home.join(PORT_FILE);
    let io = |source| {
        ServeError::Log(AppEventsError::Io {
            path: port_path.clone(),
            source,
        })
    };
    // The runtime is made, run and dropped on its thread: a runtime may not be dropped where
    // the caller is (inside the daemon's).
    let (made, runtime) = std::sync::mpsc::channel();
    let (stop, stopped) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("app-events".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => {
                    let _ = made.send(Ok(runtime.handle().clone()));
                    let _ = runtime.block_on(stopped);
                }
                Err(error) => {
                    let _ = made.send(Err(error));
                }
            }
        })
        .map_err(io)?;
    let runtime = runtime
        .recv()
        .map_err(|_| io(std::io::ErrorKind::BrokenPipe.into()))?
        .map_err(io)?;
    // The listeners register with the event log's runtime, not the caller's.
    let _entered = runtime.enter();
    let remembered: Option<u16> = std::fs::read_to_string(&port_path)
        .ok()
        .and_then(|text| text.trim().parse().ok());
    let bind = |port: u16| {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
        listener.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(listener)
    };
    // A port taken by someone else meanwhile: a new one, and instances started from now on
    // are told it.
    let loopback = match remembered.map(bind) {
        Some(Ok(listener)) => listener,
        _ => bind(0).map_err(io)?,
    };
    let port = loopback.local_addr().map_err(io)?.port();
    if remembered != Some(port) {
        // Owner-only, as everything in the home.
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&port_path)
            .and_then(|mut file| file.write_all(port.to_string().as_bytes()))
            .map_err(io)?;
    }
    let server = AppEventsServer::new(home.join("apps"));
    runtime.spawn(server.clone().serve(loopback, std::future::pending()));
    let mut endpoint = Endpoint {
        port,
        gateway: None,
    };
    if let Some(gateway) = gateway {
        match bind_free(SocketAddr::from((gateway, port))) {
            Ok(listener) => {
                runtime.spawn(server.clone().serve(listener, std::future::pending()));
                match crate::runtime::local::net::open_port(port) {
                    Ok(()) => endpoint.gateway = Some(gateway),
                    Err(error) => note(&format!(
                        "instances with a network of their own cannot reach the app event log: {error}"
                    )),
                }
            }
            Err(error) => note(&format!(
                "cannot listen for the app event log on {gateway}:{port}: {error}"
            )),
        }
    }
    Ok(AppEvents {
        endpoint,
        server,
        _serving: Arc::new(Serving { _stop: stop }),
    })
}

/// Binds even before the address exists on the host (the bridge is made with the first
/// instance that needs it): IP_FREEBIND.
fn bind_free(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `one`, a live c_int, for exactly its size, on a socket this
    // function owns.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::IPPROTO_IP,
            libc::IP_FREEBIND,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

/// A note for the operator on the daemon's stderr (not `eprintln!`: a closed stderr must not
/// end the daemon).
fn note(message: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "graven: {message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_token_made_before_the_hmac_crate_still_verifies() {
        // Made by the hand-written HMAC-SHA256 this module had before (on `sha2` alone).
        let before = "web-1-1.local.shop.\
                      391d4998c2f4b0ccc5c1fa3a555a358d16f66c797e37b2e9927d33f5697fa88e";
        let env_token = "e".repeat(64);
        assert_eq!(
            instance_token(&env_token, "shop", "local", "web-1-1.local.shop"),
            before
        );
        assert_eq!(
            caller(before, &env_token, "shop", "local"),
            Some(Caller::Instance("web-1-1.local.shop".into()))
        );
    }

    /// Who each token is in `app`/`local`: the environment, an instance, or nobody.
    fn check(app: &str, token: &str) -> Option<Caller> {
        caller(token, &"e".repeat(64), app, "local")
    }

    #[test]
    fn an_instance_token_opens_its_own_app_and_environment_only() {
        let env_token = "e".repeat(64);
        let web = instance_token(&env_token, "shop", "local", "web-1-1");
        assert_eq!(check("shop", &env_token), Some(Caller::Environment));
        assert_eq!(
            check("shop", &web),
            Some(Caller::Instance("web-1-1".into()))
        );
        // Another app, environment or token of the same name: nobody.
        assert_eq!(check("blog", &web), None);
        assert_eq!(
            caller(&web, &env_token, "shop", "production"),
            None,
            "another environment"
        );
        assert_eq!(caller(&web, &"f".repeat(64), "shop", "local"), None);
        // The MAC of one instance under another's name, a changed MAC, none, a bad name.
        let (_, mac) = web.rsplit_once('.').unwrap();
        assert_eq!(check("shop", &format!("web-1-2.{mac}")), None);
        let mut forged = web.clone();
        forged.replace_range(web.len() - 1.., "0");
        if forged == web {
            forged.replace_range(web.len() - 1.., "1");
        }
        assert_eq!(check("shop", &forged), None);
        assert_eq!(check("shop", "web-1-1."), None);
        assert_eq!(check("shop", "web-1-1"), None);
        let named = instance_token(&env_token, "shop", "local", "web-1-1.local.shop");
        assert_eq!(
            check("shop", &named),
            Some(Caller::Instance("web-1-1.local.shop".into()))
        );
        let spaced = instance_token(&env_token, "shop", "local", "a b");
        assert_eq!(check("shop", &spaced), None, "not an instance name");
    }

    #[test]
    fn a_reader_position_only_grows() {
        let readers = Readers::default();
        assert_eq!(readers.get("web-1-1"), None);
        readers.record("web-1-1", 5);
        readers.record("web-1-1", 3);
        assert_eq!(readers.get("web-1-1"), Some(5));
        readers.record("web-1-1", 9);
        assert_eq!(readers.get("web-1-1"), Some(9));
    }
}
