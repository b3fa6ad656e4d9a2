//! The DNS server's sockets: UDP and TCP on each configured address and on the daemon's own
//! address on the bridge, answering from the zone in an `ArcSwap` (one lock-free load per
//! query; UDP on threads of its own, each with a cache of the answers it encoded and a
//! per-source limit); the zone rebuilt from the controllers' snapshots when one changes; and, on the
//! bridge address, a forwarder per route that listens on loopback only, so an instance with a
//! network of its own reaches the route at the address its name gives.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::zone::{EDNS_PAYLOAD, View, Zone};
use super::{DnsConfig, DnsError};
use crate::controller::Snapshot;

/// How often the snapshots are looked at: the controllers publish one per round (their tick
/// is 100 ms), so answers follow a health flip within a round or two, well inside any health
/// interval.
const REFRESH: Duration = Duration::from_millis(100);

/// A TCP client that sends nothing for this long is cut (RFC 7766 asks servers to time out
/// idle connections; tens of seconds is what BIND and unbound use).
const TCP_IDLE: Duration = Duration::from_secs(10);

/// The most TCP clients at once per listener; more wait in the kernel's backlog.
const TCP_CLIENTS: usize = 256;

/// How much each UDP socket asks the kernel to hold: some tens of thousands of queries.
const UDP_RECEIVE_BUFFER: usize = 4 << 20;

/// The largest answer to a UDP query without EDNS (RFC 1035).
const PLAIN_PAYLOAD: usize = 512;

/// A running DNS server; its tasks end with the async runtime, or when it is dropped.
pub struct DnsServer {
    zone: Arc<ArcSwap<Zone>>,
    /// Every address it answers on, UDP and TCP alike.
    pub addresses: Vec<SocketAddr>,
    /// Its address on the bridge, for instances' resolv.conf.
    pub bridge: Option<Ipv4Addr>,
    /// The home's own loopback address it answers on at port 53, for the resolv.conf of
    /// `network = "host"` instances.
    pub host: Option<Ipv4Addr>,
    tasks: Vec<JoinHandle<()>>,
    /// The UDP sockets, each answered by threads of its own: shut down on drop, which wakes
    /// the threads blocked reading them.
    udp: Vec<std::net::UdpSocket>,
    stop: Arc<AtomicBool>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.stop.store(true, Ordering::Relaxed);
        for socket in &self.udp {
            // On an unconnected UDP socket Linux reports ENOTCONN, and still marks it shut
            // and wakes every reader, which then sees the stop flag.
            let _ = rustix::net::shutdown(socket, rustix::net::Shutdown::Both);
        }
    }
}

impl DnsServer {
    /// The zone being answered now.
    pub fn zone(&self) -> Arc<Zone> {
        self.zone.load_full()
    }
}

/// Binds every listener of `config` (and port 53 on `bridge`, when instances have networks of
/// their own, and on `host`, the home's loopback address for `network = "host"` instances)
/// and answers from the snapshots `snapshots` gives, for as long as the async runtime runs
/// (it must be inside one). What cannot be bound is returned beside the server, which answers
/// on the rest: `bridge` and `host` are set only when bound there.
pub fn start(
    config: &DnsConfig,
    bridge: Option<Ipv4Addr>,
    host: Option<Ipv4Addr>,
    snapshots: impl Fn() -> Vec<Arc<Snapshot>> + Send + 'static,
) -> (DnsServer, Vec<DnsError>) {
    let mut errors = Vec::new();
    let zone = Arc::new(ArcSwap::from_pointee(Zone::empty(&config.zone, config.ttl)));
    let mut server = DnsServer {
        zone: zone.clone(),
        addresses: Vec::new(),
        bridge: None,
        host: None,
        tasks: Vec::new(),
        udp: Vec::new(),
        stop: Arc::new(AtomicBool::new(false)),
    };
    for address in &config.listen {
        let (udp, tcp) = match bind_pair(*address, false) {
            Ok(pair) => pair,
            Err(error) => {
                errors.push(error);
                continue;
            }
        };
        let Ok(local) = udp.local_addr() else {
            continue;
        };
        let server_ip = match local.ip() {
            ip if ip.is_unspecified() && ip.is_ipv4() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            ip if ip.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let view = View {
            server: server_ip,
            bridge: None,
        };
        server.serve(udp, tcp, view, config.rate_limit);
        server.addresses.push(local);
    }
    let bridge = bridge.filter(|ip| {
        let address = SocketAddr::from((*ip, 53));
        match bind_pair(address, true) {
            Ok((udp, tcp)) => {
                let view = View {
                    server: IpAddr::V4(*ip),
                    bridge: Some(*ip),
                };
                server.serve(udp, tcp, view, config.rate_limit);
                server.addresses.push(address);
                server.bridge = Some(*ip);
                true
            }
            Err(error) => {
                errors.push(error);
                false
            }
        }
    });
    // On the host's network an instance reaches loopback routes as the host does, so it is
    // answered as the host is. Not bound with IP_FREEBIND: every 127/8 address is loopback's.
    if let Some(ip) = host {
        let address = SocketAddr::from((ip, 53));
        match bind_pair(address, false) {
            Ok((udp, tcp)) => {
                let view = View {
                    server: IpAddr::V4(ip),
                    bridge: None,
                };
                server.serve(udp, tcp, view, config.rate_limit);
                server.addresses.push(address);
                server.host = Some(ip);
            }
            Err(error) => errors.push(error),
        }
    }
    let origin = config.zone.clone();
    let ttl = config.ttl;
    server.tasks.push(tokio::spawn(async move {
        let mut seen: Vec<Arc<Snapshot>> = Vec::new();
        let mut forwarders: BTreeMap<SocketAddr, JoinHandle<()>> = BTreeMap::new();
        // The serial starts at the clock so a restarted server does not go backwards.
        let mut serial = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32);
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = snapshots();
            let same =
                now.len() == seen.len() && now.iter().zip(&seen).all(|(a, b)| Arc::ptr_eq(a, b));
            if same {
                continue;
            }
            serial = serial.wrapping_add(1);
            zone.store(Arc::new(Zone::build(&origin, ttl, serial, &now)));
            if let Some(bridge) = bridge {
                let wanted = Zone::bridged_routes(&now);
                forwarders.retain(|route, task| {
                    let keep = wanted.contains(route);
                    if !keep {
                        task.abort();
                    }
                    keep
                });
                for route in wanted {
                    forwarders
                        .entry(route)
                        .or_insert_with(|| forward(bridge, route));
                }
            }
            seen = now;
        }
    }));
    (server, errors)
}

fn bind_error(address: SocketAddr) -> impl Fn(std::io::Error) -> DnsError {
    move |source| DnsError::Bind { address, source }
}

/// A UDP socket and a TCP listener on the same address and port (for port 0, the port the
/// kernel gave the UDP socket, tried a few times in case TCP's is taken). `free` binds an
/// address the host may not have yet (IP_FREEBIND).
fn bind_pair(
    address: SocketAddr,
    free: bool,
) -> Result<(std::net::UdpSocket, TcpListener), DnsError> {
    let mut last = None;
    for _ in 0..8 {
        let udp = bind_udp(address, free).map_err(bind_error(address))?;
        let local = udp.local_addr().map_err(bind_error(address))?;
        match bind_tcp(local, free) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(error) if address.port() == 0 => last = Some(error),
            Err(error) => return Err(bind_error(local)(error)),
        }
    }
    Err(bind_error(address)(last.unwrap_or_else(|| {
        std::io::Error::other("no port free for both UDP and TCP")
    })))
}

fn socket(
    address: SocketAddr,
    kind: rustix::net::SocketType,
    free: bool,
) -> std::io::Result<std::os::fd::OwnedFd> {
    let family = if address.is_ipv4() {
        rustix::net::AddressFamily::INET
    } else {
        rustix::net::AddressFamily::INET6
    };
    let fd = rustix::net::socket_with(
        family,
        kind,
        rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
        None,
    )?;
    // For TCP, so a restarted server is not kept off its port by connections in TIME_WAIT;
    // not for UDP, where it would let two sockets share one address and split its queries
    // (a second control plane on the same address must fail to bind instead).
    if kind == rustix::net::SocketType::STREAM {
        rustix::net::sockopt::set_socket_reuseaddr(&fd, true)?;
    }
    if free {
        rustix::net::sockopt::set_ip_freebind(&fd, true)?;
    }
    rustix::net::bind(&fd, &address)?;
    Ok(fd)
}

/// A blocking UDP socket: its readers are threads of their own, not tasks.
fn bind_udp(address: SocketAddr, free: bool) -> std::io::Result<std::net::UdpSocket> {
    let fd = socket(address, rustix::net::SocketType::DGRAM, free)?;
    let socket = std::net::UdpSocket::from(fd);
    socket.set_nonblocking(false)?;
    // A burst (or a flood its readers are cutting down) waits here rather than being
    // dropped by the kernel with everyone else's queries. Past `net.core.rmem_max` only as
    // root; best effort: a smaller buffer only means more loss in bursts.
    if rustix::net::sockopt::set_socket_recv_buffer_size_force(&socket, UDP_RECEIVE_BUFFER).is_err()
    {
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&socket, UDP_RECEIVE_BUFFER);
    }
    // A fallback only: shutdown wakes the readers at once when the server is dropped.
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    Ok(socket)
}

fn bind_tcp(address: SocketAddr, free: bool) -> std::io::Result<TcpListener> {
    let fd = socket(address, rustix::net::SocketType::STREAM, free)?;
    rustix::net::listen(&fd, 1024)?;
    TcpListener::from_std(std::net::TcpListener::from(fd))
}

impl DnsServer {
    /// Answers one address: UDP on a thread per core reading the shared socket, TCP on the
    /// async runtime. UDP is the hot path: plain threads in a blocking read keep its answers
    /// off the async runtime's two workers, which the daemon's controllers and routes share.
    fn serve(&mut self, udp: std::net::UdpSocket, tcp: TcpListener, view: View, rate_limit: u32) {
        let readers = std::thread::available_parallelism().map_or(1, |n| n.get());
        for _ in 0..readers {
            let Ok(socket) = udp.try_clone() else {
                continue;
            };
            let zone = self.zone.clone();
            let stop = self.stop.clone();
            // The kernel spreads one source's packets over the readers about evenly.
            let limit = SourceLimit::new(rate_limit.div_ceil(readers as u32));
            let _ = std::thread::Builder::new()
                .name("graven-dns".into())
                .spawn(move || serve_udp(&socket, view, &zone, &stop, limit));
        }
        self.udp.push(udp);
        self.tasks
            .push(tokio::spawn(serve_tcp(tcp, view, self.zone.clone())));
    }
}

fn serve_udp(
    socket: &std::net::UdpSocket,
    view: View,
    zone: &ArcSwap<Zone>,
    stop: &AtomicBool,
    mut limit: SourceLimit,
) {
    let mut buffer = vec![0u8; 4096];
    let mut cache = AnswerCache::new(zone.load_full());
    while !stop.load(Ordering::Relaxed) {
        let Ok((received, peer)) = socket.recv_from(&mut buffer) else {
            // The read timeout, or an ICMP error from an earlier answer's client reported
            // on this socket: it concerns that client only.
            continue;
        };
        if limit.exceeded(peer.ip()) {
            continue;
        }
        let query = &buffer[..received];
        let current = zone.load();
        if let Some(answer) = cache.answer(&current, query, |zone| {
            respond(query, &view, zone, Transport::Udp)
        }) {
            let _ = socket.send_to(answer, peer);
        }
    }
}

/// One reader's count of each source's queries in the current second: past its share of the
/// limit, a source's queries are dropped unanswered until the next second, which keeps a flood
/// from one source from taking the answers' time (an answer costs more than a read) and never
/// amplifies it. Forgotten every second, so its memory is bounded by one second's sources.
struct SourceLimit {
    per_second: u32,
    second: u64,
    counts: HashMap<IpAddr, u32>,
    start: std::time::Instant,
}

/// Sources one reader counts in a second before it starts the count afresh: spoofed sources
/// cannot grow it without bound.
const COUNTED_SOURCES: usize = 65_536;

impl SourceLimit {
    fn new(per_second: u32) -> SourceLimit {
        SourceLimit {
            per_second,
            second: 0,
            counts: HashMap::new(),
            start: std::time::Instant::now(),
        }
    }

    /// Counts one query from `source`; true when it is over the limit.
    fn exceeded(&mut self, source: IpAddr) -> bool {
        if self.per_second == 0
            || source == IpAddr::V4(Ipv4Addr::LOCALHOST)
            || source == IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
        {
            return false;
        }
        let second = self.start.elapsed().as_secs();
        if second != self.second || self.counts.len() >= COUNTED_SOURCES {
            self.second = second;
            self.counts.clear();
        }
        let count = self.counts.entry(source).or_insert(0);
        *count = count.saturating_add(1);
        *count > self.per_second
    }
}

/// The answers one UDP reader has sent for the zone it last answered from, by the query's
/// bytes after its ID. An answer depends on nothing else (the view is the reader's), so a
/// query seen before is answered with the same bytes under its own ID: no parsing, no
/// encoding. A query differing in any byte (another name, case, flag or EDNS size) is a
/// different key. Cleared when the zone is swapped, and when full.
pub(super) struct AnswerCache {
    zone: Arc<Zone>,
    answers: HashMap<Box<[u8]>, Option<Box<[u8]>>>,
    out: Vec<u8>,
}

/// Entries one reader keeps: every name of a large zone twice over (A and SRV, a few query
/// shapes), a few hundred kilobytes.
const CACHED_ANSWERS: usize = 8192;

impl AnswerCache {
    pub(super) fn new(zone: Arc<Zone>) -> AnswerCache {
        AnswerCache {
            zone,
            answers: HashMap::new(),
            out: Vec::with_capacity(PLAIN_PAYLOAD),
        }
    }

    /// The answer to `query` from `zone`: from the cache, or made by `respond` and kept.
    pub(super) fn answer(
        &mut self,
        zone: &Arc<Zone>,
        query: &[u8],
        respond: impl FnOnce(&Zone) -> Option<Vec<u8>>,
    ) -> Option<&[u8]> {
        // Holding the cached zone keeps its address from being reused by another zone, so
        // equal pointers mean the same zone.
        if !Arc::ptr_eq(&self.zone, zone) {
            self.zone = zone.clone();
            self.answers.clear();
        }
        let (Some(id), Some(key)) = (query.get(..2), query.get(2..)) else {
            return None;
        };
        let answer = match self.answers.get(key) {
            Some(answer) => answer.as_deref()?,
            None => {
                let answer = respond(zone);
                if self.answers.len() >= CACHED_ANSWERS {
                    self.answers.clear();
                }
                let answer = self
                    .answers
                    .entry(key.into())
                    .or_insert(answer.map(Vec::into_boxed_slice));
                answer.as_deref()?
            }
        };
        self.out.clear();
        self.out.extend_from_slice(answer);
        // Every answer begins with its query's ID (none shorter than the header is made).
        self.out.get_mut(..2)?.copy_from_slice(id);
        Some(&self.out)
    }
}

async fn serve_tcp(listener: TcpListener, view: View, zone: Arc<ArcSwap<Zone>>) {
    let clients = Arc::new(tokio::sync::Semaphore::new(TCP_CLIENTS));
    loop {
        let Ok(permit) = clients.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, most likely: give the others a moment to close.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let zone = zone.clone();
        tokio::spawn(async move {
            let _ = serve_connection(stream, view, zone).await;
            drop(permit);
        });
    }
}

/// Queries on one TCP connection, each framed by its two-byte length (RFC 1035 4.2.2), until
/// the client closes, goes idle or sends something that is not a query.
async fn serve_connection(
    mut stream: TcpStream,
    view: View,
    zone: Arc<ArcSwap<Zone>>,
) -> std::io::Result<()> {
    let mut buffer = vec![0u8; u16::MAX as usize];
    loop {
        let mut length = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut length)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let length = u16::from_be_bytes(length) as usize;
        let query = &mut buffer[..length];
        // The whole message within the idle time too: a client trickling a message that
        // never ends holds a slot no longer than an idle one.
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(query)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let Some(answer) = respond(query, &view, &zone.load(), Transport::Tcp) else {
            return Ok(());
        };
        let mut framed = Vec::with_capacity(answer.len() + 2);
        framed.extend_from_slice(&(answer.len() as u16).to_be_bytes());
        framed.extend_from_slice(&answer);
        stream.write_all(&framed).await?;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Transport {
    Udp,
    Tcp,
}

/// The bytes answering `query`, or `None` when nothing should be sent.
pub(super) fn respond(
    query: &[u8],
    view: &View,
    zone: &Zone,
    transport: Transport,
) -> Option<Vec<u8>> {
    let (response, limit) = match Message::from_vec(query) {
        Ok(request) if request.metadata.message_type == hickory_proto::op::MessageType::Query => {
            let limit = match (&request.edns, transport) {
                (_, Transport::Tcp) => u16::MAX as usize,
                (Some(edns), Transport::Udp) => {
                    (edns.max_payload() as usize).clamp(PLAIN_PAYLOAD, EDNS_PAYLOAD as usize)
                }
                (None, Transport::Udp) => PLAIN_PAYLOAD,
            };
            (zone.answer(&request, view), limit)
        }
        // Someone's answer: never answered, or two servers could talk forever.
        Ok(_) => return None,
        Err(_) => (super::zone::malformed(query)?, PLAIN_PAYLOAD),
    };
    let bytes = response.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    // Too big for UDP: the question alone, truncated, so the client asks again over TCP.
    response.truncate().to_vec().ok()
}

/// Listens on the bridge address at a loopback route's port and copies each connection to
/// the route: instances with a network of their own cannot reach the host's loopback.
fn forward(bridge: Ipv4Addr, route: SocketAddr) -> JoinHandle<()> {
    tokio::spawn(async move {
        let address = SocketAddr::from((bridge, route.port()));
        let listener = match bind_tcp(address, true) {
            Ok(listener) => listener,
            Err(error) => {
                tracing_note(&format!(
                    "instances cannot reach the route {route} at {address}: {error}"
                ));
                return;
            }
        };
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            tokio::spawn(async move {
                if let Ok(mut upstream) = TcpStream::connect(route).await {
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    })
}

/// A note for the operator on the daemon's stderr.
fn tracing_note(message: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "graven: {message}");
}
