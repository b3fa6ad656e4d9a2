//! Events own the append-only event log (SQLite, WAL, durable before the effect) and the pure
//! fold that turns a sequence of events into the state the API shows.

mod log;

pub use log::{
    ENVELOPE_VERSION, Envelope, EventKind, EventLog, EventLogError, RawRow, SCHEMA_VERSION,
    checksum, decode_envelope,
};
