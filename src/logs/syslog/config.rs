//! What a forwarder and a listener are told: destinations and listen addresses as written in
//! `graven.toml` (`tcp://host:port`, `udp://host:port`), formats, services, buffer sizes.
//! Pure: `Endpoint::parse` is also what the spec's validation calls.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{Facility, SyslogError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Udp,
}

/// A syslog address: a scheme, a host (a name or an IP address, `[...]` for IPv6) and a port.
/// In JSON (a deploy's `[logs]`, as the daemon keeps it) it is the string it was written as,
/// checked again when read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Endpoint {
    pub transport: Transport,
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    pub fn parse(text: &str) -> Result<Endpoint, SyslogError> {
        let bad = |reason: &str| SyslogError::Address {
            address: text.to_owned(),
            reason: reason.to_owned(),
        };
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| bad("expected tcp://HOST:PORT or udp://HOST:PORT"))?;
        let transport = match scheme {
            "tcp" => Transport::Tcp,
            "udp" => Transport::Udp,
            _ => return Err(bad("the scheme must be tcp or udp")),
        };
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| bad("a port is required"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| bad("the port must be a number from 0 to 65535"))?;
        let host = match host.strip_prefix('[') {
            Some(v6) => {
                let v6 = v6
                    .strip_suffix(']')
                    .ok_or_else(|| bad("an IPv6 address ends with ]"))?;
                v6.parse::<std::net::Ipv6Addr>()
                    .map_err(|_| bad("not an IPv6 address"))?;
                v6.to_owned()
            }
            None => host.to_owned(),
        };
        let valid_name = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid_name && host.parse::<std::net::IpAddr>().is_err() {
            return Err(bad("the host must be a DNS name or an IP address"));
        }
        Ok(Endpoint {
            transport,
            host,
            port,
        })
    }

    /// The socket address to listen on: only an IP address is a place to listen.
    pub fn listen_addr(&self) -> Result<SocketAddr, SyslogError> {
        let ip: std::net::IpAddr = self.host.parse().map_err(|_| SyslogError::Address {
            address: self.to_string(),
            reason: "a listen address must be an IP address".into(),
        })?;
        Ok(SocketAddr::new(ip, self.port))
    }
}

impl From<Endpoint> for String {
    fn from(endpoint: Endpoint) -> String {
        endpoint.to_string()
    }
}

impl TryFrom<String> for Endpoint {
    type Error = SyslogError;

    fn try_from(text: String) -> Result<Endpoint, SyslogError> {
        Endpoint::parse(&text)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.transport {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireFormat {
    Rfc5424,
    Rfc3164,
}

impl WireFormat {
    pub fn parse(text: &str) -> Option<WireFormat> {
        match text {
            "rfc5424" => Some(WireFormat::Rfc5424),
            "rfc3164" => Some(WireFormat::Rfc3164),
            _ => None,
        }
    }
}

/// Lines a forwarder holds while its server is away, by default: about 10 MB of 100-byte
/// lines, minutes of a busy service's output.
pub const DEFAULT_BUFFER: usize = 100_000;

/// The largest message the listener takes, by default (rsyslog's `maxMessageSize` default).
pub const DEFAULT_MAX_MESSAGE: usize = 8192;

/// One `[[logs.forward]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardConfig {
    pub to: Endpoint,
    pub format: WireFormat,
    /// Only these services' lines; empty for every service.
    pub services: Vec<String>,
    /// Lines held unsent (or sent but not yet known received); past it the oldest are dropped
    /// and counted.
    pub buffer: usize,
    pub facility: Facility,
    /// The HOSTNAME field; the machine's node name when `None`.
    pub hostname: Option<String>,
    /// How long a line's bytes must have been acknowledged, the connection still up, before
    /// it is confirmed (`forward`'s head says why).
    pub confirm_after: std::time::Duration,
}

impl ForwardConfig {
    pub fn new(to: Endpoint) -> ForwardConfig {
        ForwardConfig {
            to,
            format: WireFormat::Rfc5424,
            services: Vec::new(),
            buffer: DEFAULT_BUFFER,
            facility: Facility::USER,
            hostname: None,
            confirm_after: super::forward::CONFIRM_AFTER,
        }
    }
}

/// `[logs] listen`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenConfig {
    pub addresses: Vec<Endpoint>,
    pub max_message: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: &str) {
        let got = match Endpoint::parse(text) {
            Ok(e) => e.to_string(),
            Err(e) => e.to_string(),
        };
        assert_eq!(got, expected);
    }

    #[test]
    fn endpoints() {
        check("tcp://logs.example.com:514", "tcp://logs.example.com:514");
        check("udp://[::1]:5514", "udp://[::1]:5514");
        check("udp://127.0.0.1:5514", "udp://127.0.0.1:5514");
        check(
            "http://x:1",
            "bad syslog address \"http://x:1\": the scheme must be tcp or udp",
        );
        check(
            "tcp://x",
            "bad syslog address \"tcp://x\": a port is required",
        );
        check(
            "tcp://x:99999",
            "bad syslog address \"tcp://x:99999\": the port must be a number from 0 to 65535",
        );
        check(
            "tcp://a b:1",
            "bad syslog address \"tcp://a b:1\": the host must be a DNS name or an IP address",
        );
        check(
            "logs:514",
            "bad syslog address \"logs:514\": expected tcp://HOST:PORT or udp://HOST:PORT",
        );
    }
}
