//! A network of its own for each instance: a network namespace with loopback up and an
//! address on graven's bridge (`graven0`), whose host side is its gateway, NAT to the host's
//! uplink for outbound traffic.
//!
//! Making a namespace and its veth pair costs about a millisecond of kernel work (through
//! netlink, `netlink.rs`: no `ip` is run, and `nft` only when graven's table is missing),
//! more than a start may cost, so several are made ahead of need (`fill`, run as `graven
//! __net fill` off the start path once a start or a removal left the pool low, at the lowest
//! CPU priority and after the starts have paused) and a start only takes one (`take`: an
//! unlink and a file written). The workload joins the namespace in the sandbox
//! (`sandbox::NetworkJoin`); this module never enters one in graven's async process.
//!
//! Everything lives under `/run/graven/net`, shared by every graven home on the host, since
//! the bridge and its addresses are the host's: a lease file per address (`leases/<ip>`,
//! made with `O_EXCL`, holding its owner: `pool` or the instance's directory), a marker per
//! ready namespace (`pool/<ip>`), the namespaces as `ip netns` knows them
//! (`/run/netns/graven-<ip>`). `/run` is emptied at boot, along with every namespace and link.
//! A lease is freed by the removal of its instance, or by `sweep` when its owner is gone.

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use super::netlink::{self, Route};

/// The bridge's name; `GRAVEN_BRIDGE` overrides it.
pub const BRIDGE_ENV: &str = "GRAVEN_BRIDGE";
/// The instances' subnet (`10.213.0.0/16` unless `GRAVEN_SUBNET` says otherwise).
pub const SUBNET_ENV: &str = "GRAVEN_SUBNET";
const DEFAULT_BRIDGE: &str = "graven0";
const DEFAULT_SUBNET: &str = "10.213.0.0/16";
/// The argv[1] of the process that makes namespaces (`graven __net fill`).
pub const NET_ARG: &str = "__net";
const DIR: &str = "/run/graven/net";
const NETNS_DIR: &str = "/run/netns";
/// The name every graven namespace starts with, for `ip netns` and `sweep`.
const NETNS_PREFIX: &str = "graven-";
/// The prefix of the host sides of the veth pairs.
const VETH_PREFIX: &str = "gv";
/// The nftables table graven owns (and flushes whenever it sets it up).
pub const NFT_TABLE: &str = "graven";
/// How many ready namespaces `fill` keeps.
const POOL: usize = 12;
/// A start refills the pool in the background when it leaves fewer than this: one filler
/// then makes the namespaces of the next eight or so starts, and its own exec is paid once
/// for all of them.
const LOW: usize = 4;
/// A filler in the background waits for the starts to pause this long before it makes any
/// namespace (each take touches the pool's directory), so that back-to-back starts do not
/// share the CPU with it...
const QUIET: Duration = Duration::from_millis(50);
/// ... unless the pool is down to this, or it has waited this long.
const QUIET_FLOOR: usize = 1;
const QUIET_MAX: Duration = Duration::from_secs(1);
/// The argument of a filler started in the background (`graven __net fill idle`).
const IDLE_ARG: &str = "idle";
/// A lease whose owner has no state yet is left alone this long (a start in progress).
const GRACE: Duration = Duration::from_secs(60);
/// The owner of a lease held by the pool.
const POOL_OWNER: &str = "pool";
/// The directory under a daemon's home that owns its address on the bridge (its DNS
/// server's), as an instance's directory owns the instance's: its `state.json` names the
/// address, and the lease is kept while that file is there.
pub const DNS_DIR: &str = "dns";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{command} failed: {message}")]
    Command { command: String, message: String },
    #[error(
        "the instance subnet {subnet} overlaps the host's route to {route}: choose another with {SUBNET_ENV}"
    )]
    Overlap { subnet: Subnet, route: String },
    #[error("{SUBNET_ENV}={text:?} is not an IPv4 subnet of /8 to /28 (e.g. 10.213.0.0/16)")]
    BadSubnet { text: String },
    #[error("no address of {subnet} is free")]
    Exhausted { subnet: Subnet },
    #[error("no ready network namespace after making them (another start took them all)")]
    NoneReady,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Io { what, source }
}

/// An IPv4 subnet: the bridge takes its first address, instances the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl Subnet {
    pub fn parse(text: &str) -> Result<Subnet, NetError> {
        let bad = || NetError::BadSubnet {
            text: text.to_owned(),
        };
        let (ip, prefix) = text.trim().split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=28).contains(&prefix) {
            return Err(bad());
        }
        let subnet = Subnet { base: ip, prefix };
        if u32::from(ip) & !subnet.mask() != 0 {
            return Err(bad());
        }
        Ok(subnet)
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }

    /// The bridge's address, the instances' gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1)
    }

    /// How many addresses instances may take (all but network, gateway and broadcast).
    fn hosts(&self) -> u32 {
        (1u32 << (32 - self.prefix)) - 3
    }

    /// The `n`th instance address, from 0.
    fn host(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 2 + n)
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.base)
    }

    /// Whether this subnet and `other` share an address.
    fn overlaps(&self, other: Subnet) -> bool {
        let mask = self.mask() & other.mask();
        u32::from(self.base) & mask == u32::from(other.base) & mask
    }
}

/// The network settings in force: from the environment, or the defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    pub bridge: String,
    pub subnet: Subnet,
}

impl Settings {
    pub fn from_env() -> Result<Settings, NetError> {
        let bridge = std::env::var(BRIDGE_ENV)
            .ok()
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| DEFAULT_BRIDGE.to_owned());
        let subnet = std::env::var(SUBNET_ENV)
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_SUBNET.to_owned());
        Ok(Settings {
            bridge,
            subnet: Subnet::parse(&subnet)?,
        })
    }
}

/// An instance's place on the bridge, as its state records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attached {
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    /// Whether the instance may reach beyond the bridge (it gets a default route).
    pub outbound: bool,
}

impl Attached {
    /// What the sandbox is told to join.
    pub fn join(&self) -> crate::sandbox::NetworkJoin {
        crate::sandbox::NetworkJoin {
            netns: netns_path(self.ip),
            gateway: self.outbound.then_some(self.gateway),
        }
    }
}

fn netns_name(ip: Ipv4Addr) -> String {
    format!("{NETNS_PREFIX}{}", ip.to_string().replace('.', "-"))
}

fn netns_path(ip: Ipv4Addr) -> PathBuf {
    Path::new(NETNS_DIR).join(netns_name(ip))
}

fn veth_name(ip: Ipv4Addr) -> String {
    format!("{VETH_PREFIX}{:08x}", u32::from(ip))
}

fn dir(sub: &str) -> PathBuf {
    Path::new(DIR).join(sub)
}

/// Whether instances can have a network of their own here: graven runs as root. Without
/// root they share the host's (a user-mode network is not made yet).
pub fn available() -> bool {
    !crate::sandbox::rootless()
}

/// Takes a ready namespace for the instance in `owner` (its directory), making some first
/// when none is ready; refills the pool in the background when it runs low.
pub fn take(owner: &Path, outbound: bool) -> Result<Attached, NetError> {
    let settings = Settings::from_env()?;
    let attached = |ip| Attached {
        ip,
        gateway: settings.subnet.gateway(),
        outbound,
    };
    // The bridge may be gone (removed by hand): the pool's namespaces are then cut off.
    if !Path::new("/sys/class/net").join(&settings.bridge).exists() {
        discard_pool();
    }
    for _ in 0..3 {
        if let Some(ip) = take_ready(owner, &settings)? {
            refill_in_background();
            return Ok(attached(ip));
        }
        run_filler()?;
    }
    Err(NetError::NoneReady)
}

/// Unlinks one ready marker (whoever unlinks it owns it) and gives its lease to `owner`.
fn take_ready(owner: &Path, settings: &Settings) -> Result<Option<Ipv4Addr>, NetError> {
    let pool = dir("pool");
    let Ok(entries) = std::fs::read_dir(&pool) else {
        return Ok(None);
    };
    // Shared with other starts, exclusive for `sweep`: between the unlink and the lease's new
    // owner, a lease still says `pool` with no marker, which `sweep` must not take for lost.
    let _lock = leases_lock(rustix::fs::FlockOperation::LockShared)?;
    let ready: Vec<Ipv4Addr> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|ip| settings.subnet.contains(*ip))
        .collect();
    for ip in ready {
        if std::fs::remove_file(pool.join(ip.to_string())).is_ok() {
            write_lease(ip, &owner.to_string_lossy())?;
            return Ok(Some(ip));
        }
    }
    Ok(None)
}

fn leases_lock(operation: rustix::fs::FlockOperation) -> Result<std::fs::File, NetError> {
    lock("leases.lock", operation)
}

/// Takes `operation` on the lock file `name` under `DIR`, made if missing; held until the
/// returned file is dropped.
fn lock(name: &str, operation: rustix::fs::FlockOperation) -> Result<std::fs::File, NetError> {
    let path = dir(name);
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(format!("opening {}", path.display())))?;
    rustix::fs::flock(&lock, operation)
        .map_err(|e| io(format!("locking {}", path.display()))(e.into()))?;
    Ok(lock)
}

/// Frees an address: its namespace's name is unmounted and removed (the namespace itself,
/// with its veth pair, goes when its last process does), then its lease.
pub fn release(ip: Ipv4Addr) {
    let path = netns_path(ip);
    let _ = rustix::mount::unmount(&path, rustix::mount::UnmountFlags::DETACH);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(dir("pool").join(ip.to_string()));
    let _ = std::fs::remove_file(dir("leases").join(ip.to_string()));
}

/// What `home/dns/state.json` says.
#[derive(serde::Serialize, serde::Deserialize)]
struct DnsState {
    bridge_address: Ipv4Addr,
}

/// The address `home`'s daemon holds on the bridge, if it holds one.
pub fn daemon_address_of(home: &Path) -> Option<Ipv4Addr> {
    let text = std::fs::read(home.join(DNS_DIR).join(super::state::STATE)).ok()?;
    serde_json::from_slice::<DnsState>(&text)
        .ok()
        .map(|s| s.bridge_address)
}

/// The daemon of `home`'s own address on the bridge, where its DNS server listens for
/// instances (`dns`): leased like an instance's, owned by `home/dns` (so no instance gets it,
/// and `sweep` keeps it while `home/dns/state.json` is there), and added to the bridge, the
/// bridge made first when missing. It is kept across restarts, because instances outlive
/// their daemon and their resolv.conf names it; `sweep` frees it, taking it off the bridge
/// first, once its home is gone.
pub fn daemon_address(home: &Path) -> Result<Ipv4Addr, NetError> {
    let settings = Settings::from_env()?;
    if !Path::new("/sys/class/net").join(&settings.bridge).exists() {
        run_filler()?;
    }
    let owner_dir = home.join(DNS_DIR);
    let owner = owner_dir.to_string_lossy().into_owned();
    let file = owner_dir.join(super::state::STATE);
    let remembered = daemon_address_of(home)
        .filter(|ip| settings.subnet.contains(*ip) && *ip != settings.subnet.gateway())
        .filter(|ip| {
            std::fs::read_to_string(dir("leases").join(ip.to_string())).is_ok_and(|o| o == owner)
        });
    let ip = match remembered {
        Some(ip) => ip,
        None => {
            // Shared with starts, exclusive for `sweep`, which would take a lease still
            // naming the pool without a ready marker for lost.
            let _lock = leases_lock(rustix::fs::FlockOperation::LockShared)?;
            let ip = lease_free(&settings)?;
            use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
            // The owner and its state first: a lease naming an owner without state is
            // freed by a sweep once it is a minute old.
            let state = serde_json::to_vec(&DnsState { bridge_address: ip })
                .map_err(|e| io("writing the DNS server's state")(e.into()))?;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&owner_dir)
                .and_then(|()| {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&file)
                })
                .and_then(|mut f| f.write_all(&state))
                .map_err(io(format!("writing {}", file.display())))?;
            write_lease(ip, &owner)?;
            ip
        }
    };
    let mut route = Route::open().map_err(io("opening netlink"))?;
    let bridge = &settings.bridge;
    let index = route
        .link_index(bridge)
        .map_err(io(format!("looking up {bridge}")))?
        .ok_or_else(|| NetError::Command {
            command: format!("looking up {bridge}"),
            message: "the bridge is missing".to_owned(),
        })?;
    route
        .replace_address(index, ip, settings.subnet.prefix)
        .map_err(io(format!("giving {bridge} the address {ip}")))?;
    Ok(ip)
}

/// Starts `graven __net fill idle` detached, to make the pool whole again off the start path,
/// once it runs low: a filler then makes several namespaces at once, and its own start is
/// paid once for them. It runs at the lowest priority (nice 19, set before its exec, so the
/// exec itself yields to the starts too) and waits for the starts to pause.
pub fn refill_in_background() {
    if !available() || pool_size() >= LOW {
        return;
    }
    let mut command = Command::new(crate::sandbox::helper_binary());
    command
        .args([NET_ARG, "fill", IDLE_ARG])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    // SAFETY: setpriority is async-signal-safe and touches nothing of the parent's memory.
    unsafe {
        command.pre_exec(|| {
            rustix::process::setpriority_process(None, 19)?;
            Ok(())
        });
    }
    let spawned = command.spawn();
    if let Ok(child) = spawned {
        super::shim::remember(child.id() as i32);
    }
}

fn pool_size() -> usize {
    std::fs::read_dir(dir("pool")).map_or(0, |d| d.count())
}

/// Runs `graven __net fill` and waits for it (behind a filler already at work).
fn run_filler() -> Result<(), NetError> {
    let output = Command::new(crate::sandbox::helper_binary())
        .args([NET_ARG, "fill"])
        .stdin(Stdio::null())
        .output()
        .map_err(io("starting graven __net fill"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NetError::Command {
            command: "graven __net fill".to_owned(),
            message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// When this process was started as `graven __net ...`, does that and never returns.
pub fn enter_if_net() {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some(NET_ARG) {
        return;
    }
    let result = match args.next().as_deref() {
        Some("fill") => {
            if args.next().as_deref() == Some(IDLE_ARG) {
                wait_for_quiet();
            }
            fill()
        }
        Some("sweep") => {
            sweep();
            Ok(())
        }
        other => Err(NetError::Command {
            command: format!("graven {NET_ARG}"),
            message: format!("unknown action {other:?}"),
        }),
    };
    match result {
        Ok(()) => std::process::exit(0),
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "graven {NET_ARG}: {error}");
            std::process::exit(1)
        }
    }
}

/// Waits until no start has taken a namespace for `QUIET` (a take unlinks a marker, which
/// sets the pool directory's mtime), the pool is nearly empty, or `QUIET_MAX` has passed.
fn wait_for_quiet() {
    let began = std::time::Instant::now();
    while began.elapsed() < QUIET_MAX && pool_size() > QUIET_FLOOR {
        let since_take = std::fs::metadata(dir("pool"))
            .and_then(|m| m.modified())
            .map(|t| SystemTime::now().duration_since(t).unwrap_or_default())
            .unwrap_or(QUIET);
        if since_take >= QUIET {
            return;
        }
        std::thread::sleep((QUIET - since_take).max(Duration::from_millis(5)));
    }
}

/// Makes the bridge and its rules when missing, then ready namespaces until the pool holds
/// `POOL`. One filler at a time (a lock under `DIR`); this is a fresh single-threaded
/// process, which may enter the namespaces it makes.
fn fill() -> Result<(), NetError> {
    let settings = Settings::from_env()?;
    for sub in ["leases", "pool"] {
        std::fs::create_dir_all(dir(sub)).map_err(io(format!("creating {DIR}/{sub}")))?;
    }
    let _filling = lock("fill.lock", rustix::fs::FlockOperation::LockExclusive)?;
    let mut route = Route::open().map_err(io("opening netlink"))?;
    let bridge = ensure_host(&settings, &mut route)?;
    if pool_size() >= POOL {
        return Ok(());
    }
    share_netns_dir()?;
    let mut host = Host {
        netns: std::fs::File::open("/proc/self/ns/net").map_err(io("opening this netns"))?,
        route,
        bridge,
    };
    while pool_size() < POOL {
        let ip = make_one(&settings, &mut host)?;
        std::fs::write(dir("pool").join(ip.to_string()), b"")
            .map_err(io("marking a namespace ready"))?;
    }
    Ok(())
}

/// Makes the bridge, gives it the gateway address, turns forwarding on and sets graven's
/// nftables table, when the bridge is not there yet (or not as it should be). Returns the
/// bridge's index.
fn ensure_host(settings: &Settings, route: &mut Route) -> Result<u32, NetError> {
    let bridge = &settings.bridge;
    let settings_text = format!("{bridge} {}", settings.subnet);
    // The bridge set up by an earlier filler for these settings, and still there: not set
    // up again.
    let ready = dir("bridge-ready");
    let index = route
        .link_index(bridge)
        .map_err(io(format!("looking up {bridge}")))?;
    let bridge_ready =
        index.is_some() && std::fs::read_to_string(&ready).is_ok_and(|t| t == settings_text);
    let index = match index {
        Some(index) if bridge_ready => index,
        index => {
            check_routes(settings)?;
            let index = match index {
                Some(index) => index,
                None => {
                    route
                        .add_bridge(bridge)
                        .map_err(io(format!("making the bridge {bridge}")))?;
                    route
                        .link_index(bridge)
                        .map_err(io(format!("looking up {bridge}")))?
                        .ok_or_else(|| NetError::Command {
                            command: format!("making the bridge {bridge}"),
                            message: "it is gone right after".to_owned(),
                        })?
                }
            };
            route
                .replace_address(index, settings.subnet.gateway(), settings.subnet.prefix)
                .map_err(io(format!("giving {bridge} its address")))?;
            route
                .set_up(index)
                .map_err(io(format!("setting {bridge} up")))?;
            index
        }
    };
    // Routing between the bridge and the uplink; turned on, never off (a user may rely on it).
    let forward = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(forward).is_ok_and(|v| v.trim() != "1") {
        std::fs::write(forward, "1").map_err(io(format!("writing {forward}")))?;
    }
    // The rules are loaded (`nft`, the one program run) when these rules were never loaded
    // (other settings, or an older graven's rules), or when the table is gone: a firewall's
    // reload (`flush ruleset`) removes it.
    let rules = dir("rules-ready");
    let wanted = ruleset(settings);
    let rules_ready = std::fs::read_to_string(&rules).is_ok_and(|t| t == wanted)
        && netlink::nft_table_exists(NFT_TABLE)
            .map_err(io("looking up graven's nftables table"))?;
    if !rules_ready {
        nft(&wanted)?;
        std::fs::write(&rules, &wanted).map_err(io(format!("writing {}", rules.display())))?;
    }
    if !bridge_ready {
        std::fs::write(&ready, settings_text)
            .map_err(io(format!("writing {}", ready.display())))?;
    }
    Ok(index)
}

/// graven's own table, replaced whole: the instances' traffic to other networks leaves with
/// the host's address (masquerade), and no instance opens a connection to the host's
/// bridge address, where the host's services on 0.0.0.0 listen (answers to connections the
/// host opened, the proxy's and the health checks', pass). The opened ports let a connection
/// through only to a socket bound to the gateway address itself (`socket wildcard 0`): the
/// app event log's listener, never a service on 0.0.0.0 that took an opened port after the
/// daemon that opened it was gone (the openings outlive their daemons).
fn ruleset(settings: &Settings) -> String {
    let subnet = settings.subnet;
    let bridge = &settings.bridge;
    let gateway = subnet.gateway();
    // The host services instances are meant to reach on the gateway (each daemon's app event
    // log), each a file under `open/` named by its TCP port.
    let ports = open_ports(gateway);
    let open = if ports.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        format!(
            "\t\tiifname \"{bridge}\" ip daddr {gateway} tcp dport {{ {} }} socket wildcard 0 accept\n",
            list.join(", ")
        )
    };
    format!(
        "table ip {NFT_TABLE}\n\
         delete table ip {NFT_TABLE}\n\
         table ip {NFT_TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {subnet} oifname != \"{bridge}\" masquerade\n\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         {open}\
         \t\tiifname \"{bridge}\" ip daddr {gateway} ct state new drop\n\
         \t}}\n\
         }}\n"
    )
}

/// The TCP ports on the gateway that instances may connect to (`open_port`), each still
/// listened on at `gateway`. An opening outlives the daemon that made it (a restarted daemon
/// binds its port again and opens it again), so the ones nothing listens on any more are
/// removed here, under the openings' lock that `open_port` takes too: a daemon listens before
/// it opens, so a live opening is never taken for a stale one. Without this every daemon that
/// ever ran (each test's and benchmark's home) would stay in the rules.
fn open_ports(gateway: Ipv4Addr) -> Vec<u16> {
    let open = dir("open");
    let Ok(_lock) = openings_lock(&open) else {
        return Vec::new();
    };
    let listening = std::fs::read_to_string("/proc/net/tcp")
        .map(|table| listening_on(&table, gateway))
        .unwrap_or_default();
    let mut ports = Vec::new();
    for entry in std::fs::read_dir(&open).into_iter().flatten().flatten() {
        let Some(port) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u16>().ok())
        else {
            continue;
        };
        if listening.contains(&port) {
            ports.push(port);
        } else {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    ports.sort_unstable();
    ports
}

/// The openings' lock (`open.lock`), held while an opening is made or the stale ones are
/// removed; the openings' directory is made first.
fn openings_lock(open: &Path) -> Result<std::fs::File, NetError> {
    std::fs::create_dir_all(open).map_err(io(format!("creating {}", open.display())))?;
    lock("open.lock", rustix::fs::FlockOperation::LockExclusive)
}

/// The TCP ports listened on at `address` itself (not a wildcard), from the text of
/// `/proc/net/tcp`: local address and port in hex (the address as the kernel stores it, in
/// network byte order; the port in host order), state `0A` for listening.
fn listening_on(table: &str, address: Ipv4Addr) -> Vec<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) != Some(&"0A") {
                return None;
            }
            let (ip, port) = fields.get(1)?.split_once(':')?;
            let ip = Ipv4Addr::from(u32::from_be(u32::from_str_radix(ip, 16).ok()?));
            (ip == address).then(|| u16::from_str_radix(port, 16).ok())?
        })
        .collect()
}

/// Lets instances connect to `port` on the gateway address, where a host service of graven's
/// own listens for them (the app event log), and reloads the rules if the bridge is set up.
/// The caller listens on the gateway's `port` before it calls this (an opening nothing
/// listens on is removed by the next reload, `open_ports`). The opening outlives this process
/// until then (a restarted daemon binds the same port again); a port is never opened for
/// anything but a graven listener bound to the gateway, and the rule lets through only
/// connections to a socket bound there (`ruleset`).
pub fn open_port(port: u16) -> Result<(), NetError> {
    let open = dir("open");
    let marker = open.join(port.to_string());
    {
        let _lock = openings_lock(&open)?;
        if marker.exists() {
            return Ok(());
        }
        std::fs::write(&marker, b"").map_err(io(format!("writing {}", marker.display())))?;
    }
    let settings = Settings::from_env()?;
    if Path::new("/sys/class/net").join(&settings.bridge).exists() {
        nft(&ruleset(&settings))?;
    }
    Ok(())
}

/// Refuses a subnet that overlaps one the host already routes (other than the bridge's).
fn check_routes(settings: &Settings) -> Result<(), NetError> {
    let table =
        std::fs::read_to_string("/proc/net/route").map_err(io("reading /proc/net/route"))?;
    for (device, route) in parse_routes(&table) {
        if device != settings.bridge && route.prefix > 0 && settings.subnet.overlaps(route) {
            return Err(NetError::Overlap {
                subnet: settings.subnet,
                route: format!("{route} on {device}"),
            });
        }
    }
    Ok(())
}

/// The routes of `/proc/net/route`: device and destination (addresses in hex, in network
/// byte order as the kernel stores them).
fn parse_routes(table: &str) -> Vec<(String, Subnet)> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let device = fields.first()?;
            let destination = u32::from_str_radix(fields.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(fields.get(7)?, 16).ok()?;
            let base = Ipv4Addr::from(u32::from_be(destination));
            let prefix = u32::from_be(mask).leading_ones() as u8;
            Some((device.to_string(), Subnet { base, prefix }))
        })
        .collect()
}

/// Leases a free address and makes its namespace: loopback up, `eth0` with the address,
/// its veth peer on the bridge, unprivileged ports from 0 (as Docker sets it, so a
/// non-root server binds port 80). No default route: the sandbox adds it for an instance
/// that may reach out.
fn make_one(settings: &Settings, host: &mut Host) -> Result<Ipv4Addr, NetError> {
    let ip = lease_free(settings)?;
    let made = make_netns(settings, host, ip);
    if made.is_err() {
        let _ = host.route.delete_link(&veth_name(ip));
        release(ip);
    }
    made.map(|()| ip)
}

/// What a filler keeps for every namespace it makes: its own namespace (to come back to), a
/// netlink socket there, and the bridge's index.
struct Host {
    netns: std::fs::File,
    route: Route,
    bridge: u32,
}

/// Makes a network namespace and names it as `ip netns add` does (a bind mount of it under
/// `/run/netns`, a shared mount point), then its links, through netlink: no `ip` is run.
fn make_netns(settings: &Settings, host: &mut Host, ip: Ipv4Addr) -> Result<(), NetError> {
    let name = netns_name(ip);
    let path = netns_path(ip);
    std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io(format!("creating {}", path.display())))?;
    // SAFETY: unshare only changes this single-threaded process's namespace membership.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
        return Err(io("making a network namespace")(
            std::io::Error::last_os_error(),
        ));
    }
    // Everything that must be done inside is done before coming back out; the socket opened
    // here keeps speaking to the new namespace afterwards.
    let inside = (|| {
        rustix::mount::mount_bind("/proc/self/ns/net", &path)
            .map_err(|e| io(format!("naming {name}"))(e.into()))?;
        // A net sysctl applies to the namespace of whoever opens the file.
        std::fs::write("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0").map_err(io(
            "setting ip_unprivileged_port_start in the instance's netns",
        ))?;
        let theirs = std::fs::File::open("/proc/self/ns/net").map_err(io("opening the netns"))?;
        let route = Route::open().map_err(io(format!("opening netlink in {name}")))?;
        Ok::<_, NetError>((theirs, route))
    })();
    setns(&host.netns)?;
    let (theirs, mut inner) = inside?;
    host.route
        .add_veth(&veth_name(ip), host.bridge, "eth0", theirs.as_fd())
        .map_err(io(format!("making the veth pair of {name}")))?;
    let eth0 = inner
        .link_index("eth0")
        .map_err(io(format!("looking up eth0 in {name}")))?
        .ok_or_else(|| NetError::Command {
            command: format!("making the veth pair of {name}"),
            message: "eth0 is not in the namespace".to_owned(),
        })?;
    inner
        .replace_address(eth0, ip, settings.subnet.prefix)
        .map_err(io(format!("giving eth0 its address in {name}")))?;
    for index in [eth0, netlink::LOOPBACK] {
        inner
            .set_up(index)
            .map_err(io(format!("setting links up in {name}")))?;
    }
    Ok(())
}

/// Makes `/run/netns` a shared mount point, as `ip netns` does, so a name made later shows
/// in mount namespaces copied from this one (and `ip netns` sees graven's as its own).
fn share_netns_dir() -> Result<(), NetError> {
    use rustix::mount::{MountPropagationFlags, mount_bind_recursive, mount_change};
    std::fs::create_dir_all(NETNS_DIR).map_err(io(format!("creating {NETNS_DIR}")))?;
    let shared = MountPropagationFlags::SHARED | MountPropagationFlags::REC;
    if mount_change(NETNS_DIR, shared).is_ok() {
        return Ok(());
    }
    // Not a mount point yet: bound onto itself first.
    mount_bind_recursive(NETNS_DIR, NETNS_DIR)
        .and_then(|()| mount_change(NETNS_DIR, shared))
        .map_err(|e| io(format!("sharing {NETNS_DIR}"))(e.into()))
}

fn setns(file: &std::fs::File) -> Result<(), NetError> {
    // SAFETY: setns only changes this single-threaded process's namespace membership.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc < 0 {
        return Err(io("entering a network namespace")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Creates the lease of an address no one holds (`O_EXCL`: two fillers never share one),
/// skipping addresses whose veth is still being torn down by the kernel.
fn lease_free(settings: &Settings) -> Result<Ipv4Addr, NetError> {
    let hosts = settings.subnet.hosts();
    let start = fastrand::u32(..hosts);
    for i in 0..hosts {
        let ip = settings.subnet.host((start + i) % hosts);
        if Path::new("/sys/class/net").join(veth_name(ip)).exists() || netns_path(ip).exists() {
            continue;
        }
        let created = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(dir("leases").join(ip.to_string()));
        match created {
            Ok(mut file) => {
                file.write_all(POOL_OWNER.as_bytes())
                    .map_err(io("writing a lease"))?;
                return Ok(ip);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io("creating a lease")(e)),
        }
    }
    Err(NetError::Exhausted {
        subnet: settings.subnet,
    })
}

/// Rewrites a lease in place: its owner alone writes it, and `sweep` never reads it meanwhile
/// (it holds the leases' lock exclusively, a taker shared). A rename over it would be safe
/// without the lock, but costs a start a few hundred microseconds on tmpfs.
fn write_lease(ip: Ipv4Addr, owner: &str) -> Result<(), NetError> {
    let path = dir("leases").join(ip.to_string());
    std::fs::write(&path, owner).map_err(io(format!("writing {}", path.display())))
}

/// The ready namespaces are dropped (the bridge they hung on is gone).
fn discard_pool() {
    let Ok(entries) = std::fs::read_dir(dir("pool")) else {
        return;
    };
    for entry in entries.flatten() {
        if let Some(ip) = entry.file_name().to_str().and_then(|n| n.parse().ok())
            && std::fs::remove_file(entry.path()).is_ok()
        {
            release(ip);
        }
    }
}

/// Frees what no one owns any more: leases of instances whose directory has no state (it
/// was removed, or never finished starting) for a while, pool leases with no ready marker
/// while no filler runs, graven namespaces with no lease, and veth links of graven's with no
/// namespace. Returns the addresses freed.
pub fn sweep() -> Vec<Ipv4Addr> {
    let mut freed = Vec::new();
    let leases = dir("leases");
    let filling = std::fs::File::open(dir("fill.lock")).is_ok_and(|lock| {
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockShared).is_err()
    });
    let now = SystemTime::now();
    let Ok(_lock) = leases_lock(rustix::fs::FlockOperation::LockExclusive) else {
        return freed;
    };
    for entry in std::fs::read_dir(&leases).into_iter().flatten().flatten() {
        let Some(ip) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        let Ok(owner) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > GRACE);
        let orphaned = if owner == POOL_OWNER {
            !filling && !dir("pool").join(ip.to_string()).exists()
        } else {
            let owner = Path::new(&owner);
            !owner.exists() || (old && !owner.join(super::state::STATE).exists())
        };
        if orphaned {
            // A daemon's address is on the bridge: taken off before an instance can lease
            // it (an instance's is in its namespace, and this finds nothing).
            take_off_bridge(ip);
            release(ip);
            freed.push(ip);
        }
    }
    // Names and links left by a filler that died half-way, or a lease removed by hand.
    for entry in std::fs::read_dir(NETNS_DIR).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(ip) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.replace('-', ".").parse::<Ipv4Addr>().ok())
            && !filling
            && !leases.join(ip.to_string()).exists()
        {
            release(ip);
            freed.push(ip);
        }
    }
    if !filling {
        let mut route = Route::open().ok();
        for entry in std::fs::read_dir("/sys/class/net")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(ip) = name
                .strip_prefix(VETH_PREFIX)
                .and_then(|hex| u32::from_str_radix(hex, 16).ok())
                .map(Ipv4Addr::from)
                .filter(|ip| !netns_path(*ip).exists())
                && name.len() == VETH_PREFIX.len() + 8
            {
                if let Some(route) = route.as_mut() {
                    let _ = route.delete_link(&name);
                }
                if !freed.contains(&ip) {
                    freed.push(ip);
                }
            }
        }
    }
    freed
}

/// Takes `ip` off the bridge, when the bridge holds it (a daemon's address).
fn take_off_bridge(ip: Ipv4Addr) {
    let Ok(settings) = Settings::from_env() else {
        return;
    };
    if let Ok(mut route) = Route::open()
        && let Ok(Some(index)) = route.link_index(&settings.bridge)
    {
        let _ = route.delete_address(index, ip, settings.subnet.prefix);
    }
}

/// Frees `home`'s daemon address at once (off the bridge, lease, state): for a home that is
/// about to be deleted, whose control plane is gone.
pub fn release_daemon_address(home: &Path) {
    if let Some(ip) = daemon_address_of(home) {
        let lease = std::fs::read_to_string(dir("leases").join(ip.to_string()));
        if lease.is_ok_and(|owner| Path::new(&owner) == home.join(DNS_DIR)) {
            take_off_bridge(ip);
            release(ip);
        }
    }
    let _ = std::fs::remove_dir_all(home.join(DNS_DIR));
}

fn nft(ruleset: &str) -> Result<(), NetError> {
    run("nft", &["-f", "-"], Some(ruleset))
}

fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<(), NetError> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(format!("running {command}")))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(input.as_bytes())
            .map_err(io(format!("writing to {command}")))?;
    }
    let output = child
        .wait_with_output()
        .map_err(io(format!("running {command}")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(NetError::Command {
        command,
        message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets() {
        let s = Subnet::parse("10.213.0.0/16").unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(s.host(0), Ipv4Addr::new(10, 213, 0, 2));
        assert_eq!(s.hosts(), 65533);
        assert!(s.contains(Ipv4Addr::new(10, 213, 255, 254)));
        assert!(!s.contains(Ipv4Addr::new(10, 214, 0, 1)));
        for bad in [
            "10.213.0.1/16",
            "10.213.0.0",
            "10.213.0.0/4",
            "x/16",
            "10.0.0.0/30",
        ] {
            assert!(Subnet::parse(bad).is_err(), "{bad}");
        }
        let wide = Subnet::parse("10.0.0.0/8").unwrap();
        assert!(wide.overlaps(s) && s.overlaps(wide));
        assert!(!s.overlaps(Subnet::parse("192.168.0.0/16").unwrap()));
    }

    #[test]
    fn routes_of_proc_net_route() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let routes = parse_routes(table);
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].1.prefix, 0);
        assert_eq!(routes[1].1, Subnet::parse("192.0.2.0/24").unwrap());
    }

    #[test]
    fn listeners_of_proc_net_tcp() {
        // 10.213.0.1:8080 and 0.0.0.0:8081 listening, 10.213.0.1:8082 connected.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100D50A:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
   1: 00000000:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1\n\
   2: 0100D50A:1F92 0200D50A:9C40 01 00000000:00000000 00:00000000 00000000     0        0 3 1\n";
        let gateway = Ipv4Addr::new(10, 213, 0, 1);
        assert_eq!(listening_on(table, gateway), vec![8080]);
        assert!(listening_on(table, Ipv4Addr::new(10, 213, 0, 2)).is_empty());
    }
}
