//! Names for services: an authoritative DNS server for graven's zone (`graven.` by default),
//! answering from the controllers' published snapshots: on loopback for people and rootless
//! instances (pasta forwards their port 53 to it), on port 53 of the home's own loopback
//! address for `network = "host"` instances, and on the daemon's own address on the bridge
//! for instances with a network of their own.
//!
//! It owns the zone (`zone`, pure) and its sockets (`server`). It never decides anything: it
//! reads snapshots, never the event log, and never touches a controller, a route or an
//! instance. It resolves no other zone (REFUSED: no open resolver); instances' resolv.conf
//! lists the host's resolvers after it for those.

pub mod server;
pub mod zone;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use hickory_proto::rr::Name;
use serde::{Deserialize, Serialize};

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

/// Overrides `[dns] listen` for the control plane (`graven daemon --dns-listen`): addresses
/// separated by commas, or `off`.
pub const LISTEN_ENV: &str = "GRAVEN_DNS_LISTEN";

/// The first two bytes of each home's own loopback address (`host_address`): 127.53.0.0/16,
/// away from 127.0.0.1, systemd-resolved's 127.0.0.53 and Debian's 127.0.1.1.
const HOST_PREFIX: [u8; 2] = [127, 53];

/// The loopback address whose port 53 `home`'s control plane serves for `network = "host"`
/// instances, whose resolv.conf can name no other port: one of 127.53.0.0/16 (every 127/8
/// address is Linux's loopback's), from the home's path, so the control planes of two homes
/// on one host do not take each other's; two that collide anyway find it bound (said on the
/// second one's stderr). Nothing is kept: the next control plane of the home finds it again.
pub fn host_address(home: &Path) -> Ipv4Addr {
    use sha2::Digest as _;
    let home = std::path::absolute(home).unwrap_or_else(|_| home.to_owned());
    let digest = sha2::Sha256::digest(home.as_os_str().as_encoded_bytes());
    // The last byte is neither 0 nor 255, which some tools read as a network or broadcast.
    let last = 1 + digest[1] % 254;
    Ipv4Addr::new(HOST_PREFIX[0], HOST_PREFIX[1], digest[0], last)
}

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

    /// This config with the keys `settings` sets replaced.
    pub fn with(&self, settings: &DnsSettings) -> Result<DnsConfig, DnsError> {
        let mut config = self.clone();
        if let Some(zone) = &settings.zone {
            config.zone = DnsConfig::zone(zone)?;
        }
        if let Some(listen) = &settings.listen {
            config.listen = listen.clone();
        }
        if let Some(ttl) = settings.ttl {
            config.ttl = ttl;
        }
        if let Some(rate_limit) = settings.rate_limit {
            config.rate_limit = rate_limit;
        }
        Ok(config)
    }

    /// Each key `settings` sets that this config has otherwise, as `KEY WANTED (VALUE HERE)`;
    /// empty when they agree. `listen` is compared as configured (port 0 as 0), not as bound.
    pub fn differences(&self, settings: &DnsSettings) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(zone) = &settings.zone
            && !DnsConfig::zone(zone).is_ok_and(|zone| zone == self.zone)
        {
            out.push(format!("zone {zone:?} (here {:?})", self.zone.to_ascii()));
        }
        if let Some(listen) = &settings.listen
            && *listen != self.listen
        {
            let show = |list: &[SocketAddr]| {
                let list: Vec<String> = list.iter().map(ToString::to_string).collect();
                format!("[{}]", list.join(", "))
            };
            out.push(format!(
                "listen {} (here {})",
                show(listen),
                show(&self.listen)
            ));
        }
        if let Some(ttl) = settings.ttl
            && ttl != self.ttl
        {
            out.push(format!("ttl {ttl} (here {})", self.ttl));
        }
        if let Some(rate_limit) = settings.rate_limit
            && rate_limit != self.rate_limit
        {
            out.push(format!(
                "rate_limit {rate_limit} (here {})",
                self.rate_limit
            ));
        }
        out
    }

    /// The search domain of an app's environment: where `SERVICE` alone is looked up.
    pub fn search(&self, app: &str, environment: &str) -> String {
        format!(
            "{environment}.{app}.{}",
            self.zone.to_ascii().trim_end_matches('.')
        )
    }
}

/// The keys of `[dns]` a project or the control plane's flags set, each left out when not
/// set: applied over the defaults (`DnsConfig::with`), and sent with a deploy so a control
/// plane running other settings refuses it instead of naming its instances otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSettings {
    /// A zone `DnsConfig::zone` takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<Vec<SocketAddr>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u32>,
}

impl DnsSettings {
    pub fn is_empty(&self) -> bool {
        *self == DnsSettings::default()
    }

    /// These settings with the keys `over` sets replaced.
    pub fn and(&self, over: &DnsSettings) -> DnsSettings {
        DnsSettings {
            zone: over.zone.clone().or_else(|| self.zone.clone()),
            listen: over.listen.clone().or_else(|| self.listen.clone()),
            ttl: over.ttl.or(self.ttl),
            rate_limit: over.rate_limit.or(self.rate_limit),
        }
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
