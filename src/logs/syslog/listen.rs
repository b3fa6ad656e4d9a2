//! The listener: syslog in over UDP (a message per datagram) and TCP (octet-counted or LF
//! framed, told apart per frame), parsed and handed to a `Sink` in batches from a thread of
//! its own. Each connection holds at most one frame (`max_message`) and a read buffer;
//! connections past `MAX_CONNECTIONS` are closed as they come. Bad input is counted by kind
//! and skipped (`framing` says how the frames around it are kept). A listener stopping closes
//! its listening sockets, then shuts its side of each connection and reads what the peer had
//! sent for up to `DRAIN`, so a peer that checks its connection before sending (rsyslog does)
//! sends nothing into the void, and one that reconnects at once is refused, not half-served.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use super::config::{Endpoint, ListenConfig, Transport};
use super::framing::{BadInput, Deframer};
use super::{Received, Sink, SyslogError, parse};

/// TCP connections served at once.
pub const MAX_CONNECTIONS: usize = 1024;
const READ_SIZE: usize = 16 * 1024;
/// Messages queued for the sink before connections wait for it.
const QUEUE: usize = 4096;
const SINK_BATCH: usize = 1024;
/// How long a stopping listener reads what its TCP peers already sent.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// What the listener has taken and refused so far.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub received: AtomicU64,
    /// Refused input, indexed as `BadInput::ALL`.
    pub bad: [AtomicU64; 6],
    pub connections: AtomicU64,
    /// Connections closed at once because `MAX_CONNECTIONS` were open.
    pub refused_connections: AtomicU64,
    /// Batches the sink failed to take (their messages are lost).
    pub sink_errors: AtomicU64,
}

impl ListenerStats {
    pub fn bad(&self, kind: BadInput) -> u64 {
        let i = BadInput::ALL.iter().position(|k| *k == kind).unwrap();
        self.bad[i].load(Ordering::Relaxed)
    }

    /// The counters now, for `graven status`: refused input by kind, named as its error.
    pub fn report(&self, addresses: &[Endpoint]) -> super::ListenReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        super::ListenReport {
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            received: get(&self.received),
            bad: BadInput::ALL
                .iter()
                .zip(&self.bad)
                .map(|(kind, count)| (kind.name().to_owned(), get(count)))
                .filter(|(_, count)| *count > 0)
                .collect(),
            connections: get(&self.connections),
            refused_connections: get(&self.refused_connections),
            sink_errors: get(&self.sink_errors),
        }
    }

    fn count_bad(&self, kind: BadInput) {
        let i = BadInput::ALL.iter().position(|k| *k == kind).unwrap();
        self.bad[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// A running listener; `stop` ends it after the sink took what was received.
pub struct Listener {
    stats: Arc<ListenerStats>,
    local: Vec<Endpoint>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    sink: std::thread::JoinHandle<()>,
}

impl Listener {
    /// Binds every address (all or none) and starts serving; call inside a tokio runtime.
    pub async fn bind<S: Sink>(config: &ListenConfig, sink: S) -> Result<Listener, SyslogError> {
        let stats = Arc::new(ListenerStats::default());
        let (stop, stopped) = watch::channel(false);
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut tasks = JoinSet::new();
        let mut local = Vec::new();
        let mut bound = Vec::new();
        for endpoint in &config.addresses {
            let addr = endpoint.listen_addr()?;
            let bind_error = |source| SyslogError::Bind {
                address: endpoint.to_string(),
                source,
            };
            match endpoint.transport {
                Transport::Udp => {
                    let socket = UdpSocket::bind(addr).await.map_err(bind_error)?;
                    grow_receive_buffer(&socket);
                    let at = socket.local_addr().map_err(bind_error)?;
                    local.push(Endpoint {
                        transport: Transport::Udp,
                        host: at.ip().to_string(),
                        port: at.port(),
                    });
                    bound.push(Bound::Udp(socket));
                }
                Transport::Tcp => {
                    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
                    let at = listener.local_addr().map_err(bind_error)?;
                    local.push(Endpoint {
                        transport: Transport::Tcp,
                        host: at.ip().to_string(),
                        port: at.port(),
                    });
                    bound.push(Bound::Tcp(listener));
                }
            }
        }
        for b in bound {
            let (stats, tx, stopped) = (stats.clone(), tx.clone(), stopped.clone());
            let max = config.max_message;
            match b {
                Bound::Udp(socket) => tasks.spawn(serve_udp(socket, max, stats, tx, stopped)),
                Bound::Tcp(listener) => tasks.spawn(serve_tcp(listener, max, stats, tx, stopped)),
            };
        }
        drop(tx);
        let sink = {
            let stats = stats.clone();
            std::thread::spawn(move || feed_sink(sink, rx, &stats))
        };
        Ok(Listener {
            stats,
            local,
            stop,
            tasks,
            sink,
        })
    }

    /// The addresses bound, ports chosen by the kernel filled in, in the config's order.
    pub fn local_addrs(&self) -> &[Endpoint] {
        &self.local
    }

    pub fn stats(&self) -> Arc<ListenerStats> {
        self.stats.clone()
    }

    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        let sink = self.sink;
        let _ = tokio::task::spawn_blocking(move || sink.join()).await;
    }
}

enum Bound {
    Udp(UdpSocket),
    Tcp(TcpListener),
}

fn feed_sink<S: Sink>(mut sink: S, mut rx: mpsc::Receiver<Received>, stats: &ListenerStats) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < SINK_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        match sink.accept(batch) {
            Ok(()) => {
                stats.received.fetch_add(n, Ordering::Relaxed);
            }
            Err(_) => {
                stats.sink_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A frame's message, or the kind it was refused as.
fn received(frame: &[u8], peer: SocketAddr) -> Result<Received, BadInput> {
    let now = SystemTime::now();
    let p = parse::parse(frame, now)?;
    Ok(Received {
        received: now,
        timestamp: p.timestamp,
        hostname: p.hostname,
        app_name: p.app_name,
        procid: p.procid,
        msgid: p.msgid,
        severity: p.severity,
        facility: p.facility,
        structured_data: p.structured_data,
        message: p.message,
        peer,
    })
}

async fn serve_udp(
    socket: UdpSocket,
    max: usize,
    stats: Arc<ListenerStats>,
    tx: mpsc::Sender<Received>,
    mut stopped: watch::Receiver<bool>,
) {
    // One byte more than the limit tells a datagram over it from one exactly at it.
    let mut buf = vec![0u8; max + 1];
    loop {
        let (n, peer) = tokio::select! {
            _ = stopped.changed() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                // An ICMP error for an earlier reply, or an interrupted call: keep serving.
                Err(_) => continue,
            },
        };
        if n > max {
            stats.count_bad(BadInput::Oversize);
            continue;
        }
        match received(&buf[..n], peer) {
            Ok(r) => {
                if tx.send(r).await.is_err() {
                    return;
                }
            }
            Err(kind) => stats.count_bad(kind),
        }
    }
}

async fn serve_tcp(
    listener: TcpListener,
    max: usize,
    stats: Arc<ListenerStats>,
    tx: mpsc::Sender<Received>,
    mut stopped: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    // The connections are told to stop only once the listening socket is closed: a peer that
    // sees its connection shut reconnects at once (rsyslog does), and a connection the kernel
    // completed into a listener about to close would take its first sends into the void.
    let (closed, closing) = watch::channel(false);
    let serve = |connections: &mut JoinSet<()>, stream, peer| {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            stats.refused_connections.fetch_add(1, Ordering::Relaxed);
            return;
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let (stats, tx, stopped) = (stats.clone(), tx.clone(), closing.clone());
        connections.spawn(async move {
            serve_connection(stream, peer, max, &stats, &tx, stopped).await;
            drop(permit);
        });
    };
    loop {
        let (stream, peer) = tokio::select! {
            _ = stopped.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(r) => r,
                // Out of descriptors or a connection reset before it was accepted.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        serve(&mut connections, stream, peer);
    }
    // What the kernel already completed is served and drained like the rest.
    while let Some(Ok((stream, peer))) = listener.accept().now_or_never() {
        serve(&mut connections, stream, peer);
    }
    drop(listener);
    let _ = closed.send(true);
    while connections.join_next().await.is_some() {}
}

async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    max: usize,
    stats: &ListenerStats,
    tx: &mpsc::Sender<Received>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut deframer = Deframer::new(max);
    let mut buf = vec![0u8; READ_SIZE];
    let mut out = Vec::new();
    let mut drain_until = None;
    loop {
        let n = match drain_until {
            None => tokio::select! {
                _ = stopped.changed() => {
                    // Tell the sender first (rsyslog checks its connection before each send
                    // and reconnects elsewhere or later), then read what it already sent.
                    let _ = stream.shutdown().await;
                    drain_until = Some(tokio::time::Instant::now() + DRAIN);
                    continue;
                }
                r = stream.read(&mut buf) => r.unwrap_or(0),
            },
            Some(until) => tokio::time::timeout_at(until, stream.read(&mut buf))
                .await
                .map_or(0, |r| r.unwrap_or(0)),
        };
        let mut emit =
            |r: Result<(&[u8], _), BadInput>| match r.and_then(|(f, _)| received(f, peer)) {
                Ok(r) => out.push(r),
                Err(kind) => stats.count_bad(kind),
            };
        if n == 0 {
            deframer.finish(&mut emit);
        } else {
            deframer.push(&buf[..n], &mut emit);
        }
        for r in out.drain(..) {
            if tx.send(r).await.is_err() {
                return;
            }
        }
        if n == 0 {
            return;
        }
    }
}

/// How much a UDP listener asks the kernel to hold for it: a burst from several senders
/// while the listener's thread waits for a core is dropped by the kernel past the buffer, and
/// UDP has no resend (rsyslog's imudp raises it for the same reason).
const UDP_RECEIVE_BUFFER: libc::c_int = 4 << 20;

/// Raises the socket's receive buffer to `UDP_RECEIVE_BUFFER`: past `net.core.rmem_max` when
/// graven may (`SO_RCVBUFFORCE`, root), else as far as that limit allows. Best effort: a
/// smaller buffer only means more loss under bursts.
fn grow_receive_buffer(socket: &UdpSocket) {
    use std::os::fd::AsRawFd;
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt reads the c_int it is given, for its size, on a socket this
        // listener owns and keeps open for the call.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&UDP_RECEIVE_BUFFER as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stopping listener closes its listening socket before it shuts any connection, so a
    /// peer that reconnects the moment it sees its connection shut (rsyslog does) is refused
    /// and keeps its lines for later, instead of sending them into a connection the kernel
    /// completed for a socket about to close. Many rounds: the old order lost the race
    /// sometimes, not always.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_sees_its_connection_shut_is_refused_a_new_one() {
        use std::io::Read;
        for round in 0..50 {
            let config = ListenConfig {
                addresses: vec![Endpoint::parse("tcp://127.0.0.1:0").unwrap()],
                max_message: 8192,
            };
            let listener = Listener::bind(&config, crate::logs::syslog::VecSink::new())
                .await
                .unwrap();
            let at = format!("127.0.0.1:{}", listener.local_addrs()[0].port);
            let stats = listener.stats();
            let mut peer = std::net::TcpStream::connect(&at).unwrap();
            while stats.connections.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let stopping = tokio::spawn(listener.stop());
            let again = tokio::task::spawn_blocking(move || {
                let mut byte = [0u8; 1];
                assert_eq!(
                    peer.read(&mut byte).unwrap(),
                    0,
                    "the listener shut its side"
                );
                std::net::TcpStream::connect(&at)
            })
            .await
            .unwrap();
            let refused = again.as_ref().map_err(std::io::Error::kind).err();
            assert_eq!(
                refused,
                Some(std::io::ErrorKind::ConnectionRefused),
                "round {round}: {again:?}"
            );
            stopping.await.unwrap();
        }
    }

    #[test]
    fn the_report_names_refused_input_by_its_documented_kind_and_leaves_out_zeros() {
        let stats = ListenerStats::default();
        stats.count_bad(BadInput::BadLength);
        stats.count_bad(BadInput::BadLength);
        stats.count_bad(BadInput::Pri);
        stats.received.fetch_add(7, Ordering::Relaxed);
        let at = [Endpoint::parse("udp://127.0.0.1:5514").unwrap()];
        let report = stats.report(&at);
        assert_eq!(report.received, 7);
        assert_eq!(report.addresses, ["udp://127.0.0.1:5514"]);
        assert_eq!(
            report.bad.into_iter().collect::<Vec<_>>(),
            [("bad_length".to_owned(), 2), ("pri".to_owned(), 1)]
        );
    }
}
