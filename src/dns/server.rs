//! The DNS server's sockets: UDP and TCP on each configured address and on the daemon's own
//! address on the bridge, answering from the zone in an `ArcSwap` (one lock-free load per
//! query); the zone rebuilt from the controllers' snapshots when one changes; and, on the
//! bridge address, a forwarder per route that listens on loopback only, so an instance with a
//! network of its own reaches the route at the address its name gives.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
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

/// The largest answer to a UDP query without EDNS (RFC 1035).
const PLAIN_PAYLOAD: usize = 512;

/// A running DNS server; its tasks end with the async runtime, or when it is dropped.
pub struct DnsServer {
    zone: Arc<ArcSwap<Zone>>,
    /// Every address it answers on, UDP and TCP alike.
    pub addresses: Vec<SocketAddr>,
    /// Its address on the bridge, for instances' resolv.conf.
    pub bridge: Option<Ipv4Addr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
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
/// their own) and answers from the snapshots `snapshots` gives, for as long as the async
/// runtime runs (it must be inside one). What cannot be bound is returned beside the server,
/// which answers on the rest: `bridge` is set only when bound there.
pub fn start(
    config: &DnsConfig,
    bridge: Option<Ipv4Addr>,
    snapshots: impl Fn() -> Vec<Arc<Snapshot>> + Send + 'static,
) -> (DnsServer, Vec<DnsError>) {
    let mut errors = Vec::new();
    let zone = Arc::new(ArcSwap::from_pointee(Zone::empty(&config.zone, config.ttl)));
    let mut server = DnsServer {
        zone: zone.clone(),
        addresses: Vec::new(),
        bridge: None,
        tasks: Vec::new(),
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
        server.tasks.extend(serve(udp, tcp, view, zone.clone()));
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
                server.tasks.extend(serve(udp, tcp, view, zone.clone()));
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
fn bind_pair(address: SocketAddr, free: bool) -> Result<(UdpSocket, TcpListener), DnsError> {
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
    rustix::net::sockopt::set_socket_reuseaddr(&fd, true)?;
    if free {
        rustix::net::sockopt::set_ip_freebind(&fd, true)?;
    }
    rustix::net::bind(&fd, &address)?;
    Ok(fd)
}

fn bind_udp(address: SocketAddr, free: bool) -> std::io::Result<UdpSocket> {
    let fd = socket(address, rustix::net::SocketType::DGRAM, free)?;
    UdpSocket::from_std(std::net::UdpSocket::from(fd))
}

fn bind_tcp(address: SocketAddr, free: bool) -> std::io::Result<TcpListener> {
    let fd = socket(address, rustix::net::SocketType::STREAM, free)?;
    rustix::net::listen(&fd, 1024)?;
    TcpListener::from_std(std::net::TcpListener::from(fd))
}

/// The tasks answering one address: a UDP reader per core on the shared socket, and the TCP
/// acceptor.
fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    view: View,
    zone: Arc<ArcSwap<Zone>>,
) -> Vec<JoinHandle<()>> {
    let udp = Arc::new(udp);
    let readers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut tasks: Vec<JoinHandle<()>> = (0..readers)
        .map(|_| tokio::spawn(serve_udp(udp.clone(), view, zone.clone())))
        .collect();
    tasks.push(tokio::spawn(serve_tcp(tcp, view, zone)));
    tasks
}

async fn serve_udp(socket: Arc<UdpSocket>, view: View, zone: Arc<ArcSwap<Zone>>) {
    let mut buffer = vec![0u8; 4096];
    loop {
        let Ok((received, peer)) = socket.recv_from(&mut buffer).await else {
            // An ICMP error from an earlier answer's client, reported on this socket: it
            // concerns that client only.
            continue;
        };
        if let Some(answer) = respond(&buffer[..received], &view, &zone, Transport::Udp) {
            let _ = socket.send_to(&answer, peer).await;
        }
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
        let Some(answer) = respond(query, &view, &zone, Transport::Tcp) else {
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
    zone: &ArcSwap<Zone>,
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
            (zone.load().answer(&request, view), limit)
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
