//! A `Feed` and a `Sink` in memory, for tests: a shared vector of records with the delivered
//! cursor beside it, and a shared vector of what was received.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{Cursor, Feed, OutRecord, Received, Sink, SyslogError};

#[derive(Debug, Default)]
struct Shared {
    records: Vec<OutRecord>,
    delivered: Option<Cursor>,
}

/// Records pushed by a test, handed out in order; clones share the same records, and a new
/// reader (`reader`) starts after the delivered cursor, as a restarted forwarder's feed does.
#[derive(Debug, Clone, Default)]
pub struct VecFeed {
    shared: Arc<(Mutex<Shared>, Condvar)>,
    next: usize,
}

impl VecFeed {
    pub fn new() -> VecFeed {
        VecFeed::default()
    }

    pub fn push(&self, record: OutRecord) {
        let (lock, cond) = &*self.shared;
        lock.lock().unwrap().records.push(record);
        cond.notify_all();
    }

    pub fn delivered_cursor(&self) -> Option<Cursor> {
        self.shared.0.lock().unwrap().delivered
    }

    /// A feed over the same records that starts after the delivered cursor.
    pub fn reader(&self) -> VecFeed {
        let shared = self.shared.0.lock().unwrap();
        let next = match shared.delivered {
            None => 0,
            Some(c) => shared.records.iter().take_while(|r| r.cursor <= c).count(),
        };
        VecFeed {
            shared: self.shared.clone(),
            next,
        }
    }
}

impl Feed for VecFeed {
    fn next(&mut self, max: usize, wait: Duration) -> Result<Vec<OutRecord>, SyslogError> {
        let (lock, cond) = &*self.shared;
        let guard = lock.lock().unwrap();
        let (guard, _) = cond
            .wait_timeout_while(guard, wait, |s| s.records.len() <= self.next)
            .unwrap();
        let end = guard.records.len().min(self.next + max);
        let batch = guard.records[self.next.min(end)..end].to_vec();
        self.next = end;
        Ok(batch)
    }

    fn delivered(&mut self, cursor: Cursor) -> Result<(), SyslogError> {
        let mut shared = self.shared.0.lock().unwrap();
        shared.delivered = Some(shared.delivered.map_or(cursor, |c| c.max(cursor)));
        Ok(())
    }
}

/// Everything received, shared between clones.
#[derive(Debug, Clone, Default)]
pub struct VecSink {
    pub received: Arc<Mutex<Vec<Received>>>,
}

impl VecSink {
    pub fn new() -> VecSink {
        VecSink::default()
    }

    pub fn snapshot(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Sink for VecSink {
    fn accept(&mut self, batch: Vec<Received>) -> Result<(), SyslogError> {
        self.received.lock().unwrap().extend(batch);
        Ok(())
    }
}
