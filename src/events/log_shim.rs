//! TEMPORARY private shim of the spec helper's `events::log`, so the controller compiles
//! before theirs lands on main. Removed at merge; do not build on anything beyond the agreed
//! signatures.

use std::path::Path;
use std::sync::Mutex;

use serde::{Serialize, de::DeserializeOwned};

pub trait EventKind {
    fn kind(&self) -> &'static str;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Envelope<T> {
    pub seq: u64,
    pub at_ms: u64,
    pub actor: String,
    pub version: u32,
    pub payload: T,
}

#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error("event log: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("event log: {0}")]
    Json(#[from] serde_json::Error),
}

pub struct EventLog {
    db: Mutex<rusqlite::Connection>,
}

impl EventLog {
    pub fn open(path: &Path) -> Result<EventLog, EventLogError> {
        let db = rusqlite::Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute(
            "create table if not exists events (seq integer primary key, at_ms integer, actor text, version integer, payload text)",
            [],
        )?;
        Ok(EventLog { db: Mutex::new(db) })
    }

    pub fn append<T: Serialize + EventKind + Clone>(
        &self,
        actor: &str,
        at_ms: u64,
        payload: &T,
    ) -> Result<Envelope<T>, EventLogError> {
        let db = self.db.lock().expect("log lock");
        let text = serde_json::to_string(payload)?;
        db.execute(
            "insert into events (at_ms, actor, version, payload) values (?1, ?2, 1, ?3)",
            rusqlite::params![at_ms as i64, actor, text],
        )?;
        Ok(Envelope {
            seq: db.last_insert_rowid() as u64,
            at_ms,
            actor: actor.to_owned(),
            version: 1,
            payload: payload.clone(),
        })
    }

    pub fn read_after<T: DeserializeOwned>(
        &self,
        seq: u64,
    ) -> Result<Vec<Envelope<T>>, EventLogError> {
        let db = self.db.lock().expect("log lock");
        let mut statement = db.prepare(
            "select seq, at_ms, actor, version, payload from events where seq > ?1 order by seq",
        )?;
        let rows = statement.query_map([seq as i64], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, u32>(3)?,
                row.get::<_, String>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, at_ms, actor, version, payload) = row?;
            out.push(Envelope {
                seq: seq as u64,
                at_ms: at_ms as u64,
                actor,
                version,
                payload: serde_json::from_str(&payload)?,
            });
        }
        Ok(out)
    }

    pub fn last_seq(&self) -> Result<u64, EventLogError> {
        let db = self.db.lock().expect("log lock");
        Ok(
            db.query_row("select coalesce(max(seq), 0) from events", [], |row| {
                row.get::<_, i64>(0)
            })? as u64,
        )
    }
}
