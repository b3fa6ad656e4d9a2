//! The forwarder: one per `[[logs.forward]]`, a tokio task with a thread that reads its feed.
//!
//! Lines go into a bounded buffer and stay there until they are known received; a full buffer
//! drops its oldest lines and counts them (`ForwardStats::dropped`). "Known received" is as
//! much as plain syslog can say, which is not much: there is no application acknowledgement.
//! Over TCP, the kernel's send queue (`SIOCOUTQ`) says which bytes the peer's TCP has
//! acknowledged; a line is confirmed (dropped from the buffer, its cursor delivered to the
//! feed) once its bytes were acknowledged `CONFIRM_AFTER` ago and the connection is still up,
//! so a server that closes or resets soon after acknowledging (a restart: bytes acknowledged
//! into its socket buffer but never read are lost with it) has those lines sent again on the
//! next connection. Over UDP a line counts as acknowledged when sent, and a refused datagram
//! (the ICMP port-unreachable a stopped server's host sends back, read as `ECONNREFUSED`)
//! marks the server down the same way. Either way a line may arrive twice, never silently
//! not at all while it is in the buffer; docs/syslog.md says exactly what is and is not
//! guaranteed.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::config::{Endpoint, ForwardConfig, Transport, WireFormat};
use super::{Cursor, Feed, format};

/// How long after its bytes were acknowledged a line is confirmed (see the module's head).
pub const CONFIRM_AFTER: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_millis(50);
/// Bytes handed to one TCP write.
const CHUNK: usize = 64 * 1024;
const FEED_BATCH: usize = 1024;
const FEED_WAIT: Duration = Duration::from_millis(100);

/// What a forwarder has done so far; read it while it runs.
#[derive(Debug, Default)]
pub struct ForwardStats {
    /// Lines confirmed (see the module's head).
    pub sent: AtomicU64,
    /// Lines dropped unsent because the buffer was full.
    pub dropped: AtomicU64,
    /// Lines sent again after their connection was lost before they were confirmed.
    pub resent: AtomicU64,
    /// Connections made (TCP) or sockets opened (UDP).
    pub connections: AtomicU64,
    /// Connections lost, and connection attempts that failed.
    pub failures: AtomicU64,
    /// Lines in the buffer now.
    pub buffered: AtomicU64,
    /// Whether the server is reachable now.
    pub up: AtomicBool,
}

impl ForwardStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters now, for `graven status`.
    pub fn report(&self, to: &Endpoint) -> super::ForwardReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        super::ForwardReport {
            to: to.to_string(),
            up: self.up.load(Ordering::Relaxed),
            sent: get(&self.sent),
            dropped: get(&self.dropped),
            resent: get(&self.resent),
            buffered: get(&self.buffered),
            connections: get(&self.connections),
            failures: get(&self.failures),
        }
    }
}

/// One record for the task: its message, or `None` for a line of a service not forwarded
/// (its cursor still has to be delivered in order).
struct Item {
    cursor: Cursor,
    message: Option<Vec<u8>>,
}

struct Entry {
    /// The feed cursor delivered once this entry is confirmed: its own record's, or a later
    /// filtered-out record's.
    delivers: Cursor,
    message: Vec<u8>,
    /// Where the entry's last byte is on the current connection, once written there.
    end: Option<u64>,
    acked_at: Option<Instant>,
}

/// A running forwarder; `stop` ends it, leaving what it has not confirmed to be sent again by
/// the next forwarder over the same feed.
pub struct Forwarder {
    stats: Arc<ForwardStats>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    feed: std::thread::JoinHandle<()>,
}

impl Forwarder {
    /// Starts forwarding `feed`'s records as `config` says; call inside a tokio runtime.
    pub fn spawn<F: Feed>(config: ForwardConfig, feed: F) -> Forwarder {
        let stats = Arc::new(ForwardStats::default());
        let (stop, stopped) = watch::channel(false);
        let (items, rx) = mpsc::channel(4);
        let delivered = Arc::new(Mutex::new(None));
        let hostname = config
            .hostname
            .clone()
            .unwrap_or_else(format::local_hostname);
        let feed = {
            let (config, delivered, stopped) = (config.clone(), delivered.clone(), stopped.clone());
            std::thread::spawn(move || {
                read_feed(feed, &config, &hostname, items, &delivered, stopped)
            })
        };
        let task = tokio::spawn(run(config, rx, stats.clone(), delivered, stopped));
        Forwarder {
            stats,
            stop,
            task,
            feed,
        }
    }

    pub fn stats(&self) -> Arc<ForwardStats> {
        self.stats.clone()
    }

    /// Stops the task and the feed's thread, the feed told the last confirmed cursor.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let feed = self.feed;
        let _ = tokio::task::spawn_blocking(move || feed.join()).await;
    }
}

/// The feed's thread: formats records into messages for the task, and tells the feed what
/// the task confirmed.
fn read_feed<F: Feed>(
    mut feed: F,
    config: &ForwardConfig,
    hostname: &str,
    items: mpsc::Sender<Vec<Item>>,
    delivered: &Mutex<Option<Cursor>>,
    stopped: watch::Receiver<bool>,
) {
    let mut told = None;
    loop {
        let now = *delivered.lock().unwrap();
        if now != told {
            if let Some(cursor) = now {
                // A feed that cannot save its cursor sends lines again after a restart;
                // forwarding goes on.
                let _ = feed.delivered(cursor);
            }
            told = now;
        }
        if *stopped.borrow() {
            return;
        }
        let Ok(records) = feed.next(FEED_BATCH, FEED_WAIT) else {
            std::thread::sleep(FEED_WAIT);
            continue;
        };
        if records.is_empty() {
            continue;
        }
        let batch = records
            .iter()
            .map(|r| Item {
                cursor: r.cursor,
                message: (config.services.is_empty() || config.services.contains(&r.service)).then(
                    || match config.format {
                        WireFormat::Rfc5424 => format::rfc5424(r, config.facility, hostname),
                        WireFormat::Rfc3164 => format::rfc3164(r, config.facility, hostname),
                    },
                ),
            })
            .collect();
        if items.blocking_send(batch).is_err() {
            return;
        }
    }
}

enum Link {
    Tcp(TcpStream),
    Udp(UdpSocket),
}

impl Link {
    async fn connect(config: &ForwardConfig) -> std::io::Result<Link> {
        let to = (config.to.host.as_str(), config.to.port);
        let addr = tokio::net::lookup_host(to)
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        match config.to.transport {
            Transport::Tcp => {
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
                stream.set_nodelay(true)?;
                Ok(Link::Tcp(stream))
            }
            Transport::Udp => {
                let local: std::net::SocketAddr = if addr.is_ipv4() {
                    "0.0.0.0:0".parse().unwrap()
                } else {
                    "[::]:0".parse().unwrap()
                };
                let socket = UdpSocket::bind(local).await?;
                socket.connect(addr).await?;
                Ok(Link::Udp(socket))
            }
        }
    }

    /// Bytes written and not yet acknowledged by the peer's TCP: the kernel's send queue.
    fn unacknowledged(&self) -> u64 {
        match self {
            Link::Tcp(stream) => {
                let mut queued: libc::c_int = 0;
                // SAFETY: the descriptor is the stream's, open while it lives; TIOCOUTQ
                // (SIOCOUTQ) writes one int through the pointer, which points at one.
                let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
                if rc == 0 {
                    queued.max(0) as u64
                } else {
                    u64::MAX
                }
            }
            Link::Udp(_) => 0,
        }
    }

    async fn ready(&self, write: bool) -> std::io::Result<tokio::io::Ready> {
        // ERROR too: a refused datagram's ICMP makes a UDP socket neither readable nor
        // writable, only errored.
        let interest = if write {
            Interest::READABLE | Interest::WRITABLE | Interest::ERROR
        } else {
            Interest::READABLE | Interest::ERROR
        };
        match self {
            Link::Tcp(s) => s.ready(interest).await,
            Link::Udp(s) => s.ready(interest).await,
        }
    }

    /// Reads what the peer sent: `Err` when the connection is gone (end of stream, a reset,
    /// a refused datagram).
    fn check_read(&self) -> std::io::Result<()> {
        let mut scratch = [0u8; 512];
        let result = match self {
            Link::Tcp(s) => s.try_read(&mut scratch),
            Link::Udp(s) => s.try_recv(&mut scratch),
        };
        match result {
            Ok(0) if matches!(self, Link::Tcp(_)) => Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }
}

struct State {
    entries: VecDeque<Entry>,
    /// Entries before this index have been written on the current connection.
    written: usize,
    /// A chunk being written, and how far.
    out: Vec<u8>,
    out_pos: usize,
    /// Bytes written on the current connection.
    offset: u64,
    /// A filtered record's cursor to deliver once nothing older is buffered.
    loose: Option<Cursor>,
    delivered: Option<Cursor>,
}

impl State {
    fn deliver(&mut self, cursor: Cursor) {
        self.delivered = Some(self.delivered.map_or(cursor, |c| c.max(cursor)));
    }

    fn push(&mut self, item: Item, limit: usize, stats: &ForwardStats) {
        match item.message {
            None => match self.entries.back_mut() {
                Some(last) => last.delivers = item.cursor,
                None => self.loose = Some(item.cursor),
            },
            Some(message) => {
                if let Some(loose) = self.loose.take() {
                    self.deliver(loose);
                }
                self.entries.push_back(Entry {
                    delivers: item.cursor,
                    message,
                    end: None,
                    acked_at: None,
                });
                while self.entries.len() > limit.max(1) {
                    let oldest = self.entries.pop_front().unwrap();
                    self.written = self.written.saturating_sub(1);
                    self.deliver(oldest.delivers);
                    ForwardStats::add(&stats.dropped, 1);
                }
            }
        }
        if self.entries.is_empty()
            && let Some(loose) = self.loose.take()
        {
            self.deliver(loose);
        }
    }

    /// Marks acknowledged entries and confirms those acknowledged long enough ago.
    fn confirm(&mut self, link: &Link, now: Instant, after: Duration, stats: &ForwardStats) {
        let unacked = link.unacknowledged();
        let acked = self.offset.saturating_sub(unacked);
        for entry in self.entries.iter_mut().take(self.written) {
            match entry.end {
                Some(end) if end <= acked && entry.acked_at.is_none() => entry.acked_at = Some(now),
                _ => {}
            }
        }
        while let Some(front) = self.entries.front() {
            match front.acked_at {
                Some(at) if now.duration_since(at) >= after => {
                    let entry = self.entries.pop_front().unwrap();
                    self.written -= 1;
                    self.deliver(entry.delivers);
                    ForwardStats::add(&stats.sent, 1);
                }
                _ => break,
            }
        }
        if self.entries.is_empty()
            && let Some(loose) = self.loose.take()
        {
            self.deliver(loose);
        }
    }

    /// The connection is gone: everything not confirmed goes again on the next one.
    fn lost(&mut self, stats: &ForwardStats) {
        ForwardStats::add(&stats.resent, self.written as u64);
        ForwardStats::add(&stats.failures, 1);
        stats.up.store(false, Ordering::Relaxed);
        for entry in &mut self.entries {
            entry.end = None;
            entry.acked_at = None;
        }
        self.written = 0;
        self.out.clear();
        self.out_pos = 0;
        self.offset = 0;
    }

    /// Writes what is unwritten, as much as the socket takes now.
    fn write(&mut self, link: &Link) -> std::io::Result<()> {
        loop {
            if self.out_pos == self.out.len() {
                self.out.clear();
                self.out_pos = 0;
                if self.written == self.entries.len() {
                    return Ok(());
                }
                match link {
                    Link::Tcp(_) => {
                        let mut end = self.offset;
                        while self.written < self.entries.len() && self.out.len() < CHUNK {
                            let entry = &mut self.entries[self.written];
                            let before = self.out.len();
                            self.out
                                .extend_from_slice(&format::octet_counted(&entry.message));
                            end += (self.out.len() - before) as u64;
                            entry.end = Some(end);
                            self.written += 1;
                        }
                    }
                    Link::Udp(socket) => {
                        let entry = &mut self.entries[self.written];
                        let cut = entry.message.len().min(format::UDP_MAX);
                        let datagram = if cut < entry.message.len() {
                            format::truncate(entry.message.clone(), format::UDP_MAX)
                        } else {
                            entry.message.clone()
                        };
                        socket.try_send(&datagram)?;
                        self.offset += 1;
                        entry.end = Some(self.offset);
                        self.written += 1;
                        continue;
                    }
                }
            }
            let Link::Tcp(stream) = link else {
                unreachable!("only TCP writes in chunks")
            };
            let n = stream.try_write(&self.out[self.out_pos..])?;
            self.out_pos += n;
            self.offset += n as u64;
        }
    }
}

async fn run(
    config: ForwardConfig,
    mut items: mpsc::Receiver<Vec<Item>>,
    stats: Arc<ForwardStats>,
    delivered: Arc<Mutex<Option<Cursor>>>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut state = State {
        entries: VecDeque::new(),
        written: 0,
        out: Vec::new(),
        out_pos: 0,
        offset: 0,
        loose: None,
        delivered: None,
    };
    let mut link: Option<Link> = None;
    let mut backoff = BACKOFF_MIN;
    let mut retry_at = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut feed_open = true;
    loop {
        if link.is_none() && Instant::now() >= retry_at {
            match Link::connect(&config).await {
                Ok(new) => {
                    ForwardStats::add(&stats.connections, 1);
                    stats.up.store(true, Ordering::Relaxed);
                    backoff = BACKOFF_MIN;
                    link = Some(new);
                }
                Err(_) => {
                    ForwardStats::add(&stats.failures, 1);
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        let want_write = state.written < state.entries.len() || state.out_pos < state.out.len();
        let mut failed = false;
        tokio::select! {
            _ = stopped.changed() => break,
            batch = items.recv(), if feed_open => match batch {
                Some(batch) => {
                    for item in batch {
                        state.push(item, config.buffer, &stats);
                    }
                }
                None => feed_open = false,
            },
            ready = async { link.as_ref().unwrap().ready(want_write).await }, if link.is_some() => {
                let l = link.as_ref().unwrap();
                match ready {
                    Ok(ready) => {
                        if ready.is_readable() || ready.is_read_closed() || ready.is_error() {
                            failed |= l.check_read().is_err();
                        }
                        if !failed && ready.is_writable() {
                            match state.write(l) {
                                Ok(()) => {}
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                                Err(_) => failed = true,
                            }
                        }
                    }
                    Err(_) => failed = true,
                }
            }
            _ = tick.tick() => {
                if let Some(l) = &link {
                    state.confirm(l, Instant::now(), config.confirm_after, &stats);
                }
            }
        }
        if failed {
            state.lost(&stats);
            link = None;
            retry_at = Instant::now() + backoff;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        stats
            .buffered
            .store(state.entries.len() as u64, Ordering::Relaxed);
        if state.delivered.is_some() {
            *delivered.lock().unwrap() = state.delivered;
        }
        if link.is_none() && Instant::now() < retry_at {
            // Nothing to wait on but the feed and the retry time.
            tokio::select! {
                _ = stopped.changed() => break,
                _ = tokio::time::sleep_until(retry_at) => {}
                batch = items.recv(), if feed_open => match batch {
                    Some(batch) => for item in batch {
                        state.push(item, config.buffer, &stats);
                    },
                    None => feed_open = false,
                },
            }
            stats
                .buffered
                .store(state.entries.len() as u64, Ordering::Relaxed);
            if state.delivered.is_some() {
                *delivered.lock().unwrap() = state.delivered;
            }
        }
    }
}
