//! Names for services: an authoritative DNS server for graven's zone (`graven.` by default),
//! answering from the controllers' published snapshots, on loopback for people and
//! `network = "host"` instances and on the daemon's own address on the bridge for instances
//! with a network of their own.
//!
//! It owns the zone (`zone`, pure) and its sockets (`server`). It never decides anything: it
//! reads snapshots, never the event log, and never touches a controller, a route or an
//! instance. It resolves no other zone (REFUSED: no open resolver); instances' resolv.conf
//! lists the host's resolvers after it for those.

pub mod server;
pub mod zone;

use std::net::SocketAddr;

use hickory_proto::rr::Name;

pub use server::{DnsServer, start};
pub use zone::{View, Zone};

/// Where graven's server listens unless `[dns] listen` says otherwise: loopback, on a port of
/// its own (53 on loopback is often systemd-resolved's, and 5353 is mDNS's).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:1053";

/// The zone unless `[dns] zone` says otherwise.
pub const DEFAULT_ZONE: &str = "graven.";

/// Seconds an answer may be cached unless `[dns] ttl` says otherwise: short, so a change is
/// seen within seconds by clients that cache.
pub const DEFAULT_TTL: u32 = 5;

/// Queries a second one source may send before the rest of that second's are dropped unanswered,
/// unless `[dns] rate_limit` says otherwise: far above what a service resolving its peers asks,
/// so only a runaway or hostile instance meets it.
pub const DEFAULT_RATE_LIMIT: u32 = 5000;

/// Overrides `[dns] listen` for the control plane (`graven daemon` reads no graven.toml):
/// addresses separated by commas, or `off`.
pub const LISTEN_ENV: &str = "GRAVEN_DNS_LISTEN";

/// What the server answers and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// The zone's origin, lowercase, ending with a dot.
    pub zone: Name,
    /// Where it listens, UDP and TCP alike; empty: not at all (not even on the bridge).
    pub listen: Vec<SocketAddr>,
    pub ttl: u32,
    /// Queries per second one source address may send over UDP; 0: no limit. The host's own
    /// loopback address (127.0.0.1, ::1) is never limited: it is every process of the host at
    /// once, `network = "host"` instances included.
    pub rate_limit: u32,
}

impl Default for DnsConfig {
    fn default() -> DnsConfig {
        DnsConfig {
            zone: Name::from_ascii(DEFAULT_ZONE).expect("the default zone is a name"),
            listen: vec![DEFAULT_LISTEN.parse().expect("the default address parses")],
            ttl: DEFAULT_TTL,
            rate_limit: DEFAULT_RATE_LIMIT,
        }
    }
}

impl DnsConfig {
    /// `zone` checked as a DNS name and made absolute and lowercase.
    pub fn zone(zone: &str) -> Result<Name, DnsError> {
        let bad = |message: String| DnsError::Zone {
            zone: zone.to_owned(),
            message,
        };
        let labels = zone.strip_suffix('.').unwrap_or(zone);
        let label_ok = |label: &str| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !labels.split('.').all(label_ok) {
            return Err(bad(
                "not a DNS name: each label between dots is 1 to 63 letters, digits, '-' or '_'"
                    .to_owned(),
            ));
        }
        let name = Name::from_ascii(zone).map_err(|e| bad(e.to_string()))?;
        if name.is_root() {
            return Err(bad("the root cannot be graven's zone".to_owned()));
        }
        let mut name = name.to_lowercase();
        name.set_fqdn(true);
        Ok(name)
    }

    /// `listen` as `GRAVEN_DNS_LISTEN` writes it.
    pub fn parse_listen(text: &str) -> Result<Vec<SocketAddr>, DnsError> {
        if text.trim() == "off" {
            return Ok(Vec::new());
        }
        text.split(',')
            .map(|a| {
                a.trim().parse().map_err(|_| DnsError::Listen {
                    address: a.trim().to_owned(),
                })
            })
            .collect()
    }

    /// The search domain of an app's environment: where `SERVICE` alone is looked up.
    pub fn search(&self, app: &str, environment: &str) -> String {
        format!(
            "{environment}.{app}.{}",
            self.zone.to_ascii().trim_end_matches('.')
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot listen for DNS on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("dns zone {zone:?}: {message}")]
    Zone { zone: String, message: String },
    #[error("dns listen address {address:?}: expected IP:PORT")]
    Listen { address: String },
}
