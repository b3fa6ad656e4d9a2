//! Syslog out and in: lines forwarded to syslog servers (RFC 5424 or RFC 3164, over TCP with
//! octet-counting framing or over UDP) and a listener that takes other machines' syslog
//! (UDP and TCP, octet-counted or LF framed, RFC 5424 or RFC 3164) into graven.
//!
//! This module owns the wire: formatting, framing, parsing, the forwarders' connections and
//! buffers, the listener's sockets. It never touches the log store: what to forward comes
//! from a `Feed` and what was received goes to a `Sink`, two small traits the store
//! implements. Formatting, parsing and framing are pure (`format`, `parse`, `framing`) and take
//! the clock as an argument; the forwarder and the listener are the tokio shells around them.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub mod config;
pub mod files;
pub mod format;
pub mod forward;
pub mod framing;
pub mod listen;
pub mod memory;
pub mod parse;
pub mod time;

pub use config::{Endpoint, ForwardConfig, ListenConfig, Transport, WireFormat};
pub use files::{FileFeed, FileSink};
pub use forward::{ForwardStats, Forwarder};
pub use framing::{BadInput, Deframer, Framing};
pub use listen::{Listener, ListenerStats};
pub use memory::{VecFeed, VecSink};

/// What a control plane's syslog forwarders and listener have done, as `graven status` shows
/// it: read from the running counters, written beside the app's event log now and then.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyslogReport {
    /// When the counters were read, in ms since the epoch.
    pub at_ms: u64,
    pub forward: Vec<ForwardReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<ListenReport>,
}

/// One forwarder's counters (`ForwardStats`), with its destination.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardReport {
    pub to: String,
    pub up: bool,
    pub sent: u64,
    pub dropped: u64,
    pub resent: u64,
    pub buffered: u64,
    pub connections: u64,
    pub failures: u64,
}

/// The listener's counters (`ListenerStats`), refused input by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenReport {
    pub addresses: Vec<String>,
    pub received: u64,
    pub bad: std::collections::BTreeMap<String, u64>,
    pub connections: u64,
    pub refused_connections: u64,
    pub sink_errors: u64,
}

/// Everything that can go wrong in this module, each carrying what failed.
#[derive(Debug, thiserror::Error)]
pub enum SyslogError {
    #[error("bad syslog address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: String,
        source: std::io::Error,
    },
    #[error("syslog feed {name}: {source}")]
    Feed {
        name: String,
        source: std::io::Error,
    },
    #[error("syslog sink {name}: {source}")]
    Sink {
        name: String,
        source: std::io::Error,
    },
    #[error("bad syslog message: {0}")]
    Parse(String),
}

/// The standard output streams of an instance, and what a forwarded line's severity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    /// stdout is informational, stderr an error: the severity a forwarded line carries.
    pub fn severity(self) -> Severity {
        match self {
            Stream::Stdout => Severity::Info,
            Stream::Stderr => Severity::Err,
        }
    }
}

/// RFC 5424 §6.2.1 severities, numbered as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Emerg = 0,
    Alert = 1,
    Crit = 2,
    Err = 3,
    Warning = 4,
    Notice = 5,
    Info = 6,
    Debug = 7,
}

impl Severity {
    pub fn from_code(code: u8) -> Option<Severity> {
        Some(match code {
            0 => Severity::Emerg,
            1 => Severity::Alert,
            2 => Severity::Crit,
            3 => Severity::Err,
            4 => Severity::Warning,
            5 => Severity::Notice,
            6 => Severity::Info,
            7 => Severity::Debug,
            _ => return None,
        })
    }
}

/// A facility code, 0 (kern) to 23 (local7), as RFC 5424 §6.2.1 numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u8")]
pub struct Facility(u8);

impl TryFrom<u8> for Facility {
    type Error = String;

    fn try_from(code: u8) -> Result<Facility, String> {
        Facility::new(code).ok_or_else(|| format!("facility {code} is out of range (0 to 23)"))
    }
}

impl Facility {
    pub const USER: Facility = Facility(1);
    pub const LOCAL0: Facility = Facility(16);

    pub fn new(code: u8) -> Option<Facility> {
        (code <= 23).then_some(Facility(code))
    }

    pub fn code(self) -> u8 {
        self.0
    }

    /// The names rsyslog and syslog.conf use, in code order.
    const NAMES: [&'static str; 24] = [
        "kern",
        "user",
        "mail",
        "daemon",
        "auth",
        "syslog",
        "lpr",
        "news",
        "uucp",
        "cron",
        "authpriv",
        "ftp",
        "ntp",
        "security",
        "console",
        "solaris-cron",
        "local0",
        "local1",
        "local2",
        "local3",
        "local4",
        "local5",
        "local6",
        "local7",
    ];

    pub fn from_name(name: &str) -> Option<Facility> {
        Self::NAMES
            .iter()
            .position(|n| *n == name)
            .map(|code| Facility(code as u8))
    }
}

impl fmt::Display for Facility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::NAMES[self.0 as usize])
    }
}

/// A position in a feed: opaque to this module, increasing along the feed.
pub type Cursor = u64;

/// One line to forward, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutRecord {
    /// When the line was written.
    pub time: SystemTime,
    pub app: String,
    pub environment: String,
    pub service: String,
    pub release: u64,
    pub instance: String,
    pub stream: Stream,
    pub line: Vec<u8>,
    pub cursor: Cursor,
}

/// What to forward: the store's lines in order, resumable after a restart.
///
/// `next` blocks for at most `wait` and returns the records after the last one it returned
/// (an empty batch when none came); a feed opened anew starts after its last delivered
/// cursor. `delivered` says every record up to and including `cursor` has been dealt with
/// (sent, or dropped and counted): a feed persists it so a restarted forwarder resumes there.
pub trait Feed: Send + 'static {
    fn next(&mut self, max: usize, wait: Duration) -> Result<Vec<OutRecord>, SyslogError>;
    fn delivered(&mut self, cursor: Cursor) -> Result<(), SyslogError>;
}

/// A parsed message as the listener received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Received {
    pub received: SystemTime,
    /// The message's own timestamp, when it had one graven could read.
    pub timestamp: Option<SystemTime>,
    pub hostname: Option<String>,
    pub app_name: Option<String>,
    pub procid: Option<String>,
    pub msgid: Option<String>,
    pub severity: Severity,
    pub facility: Facility,
    /// The structured data as sent (RFC 5424 only), `None` for the nil value.
    pub structured_data: Option<String>,
    pub message: Vec<u8>,
    pub peer: SocketAddr,
}

/// Where received messages go, a batch at a time; called from a thread of its own, so it may
/// block on disk.
pub trait Sink: Send + 'static {
    fn accept(&mut self, batch: Vec<Received>) -> Result<(), SyslogError>;
}
