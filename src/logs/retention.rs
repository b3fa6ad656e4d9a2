//! How long the store keeps lines: per group (a service: `<app>/<env>/<service>`), at most
//! `max_bytes` on disk and nothing older than `max_age`. Sources whose writer is gone go
//! whole, oldest first; a live source over its share has its oldest bytes freed by punching
//! a hole (the append-only attribute cleared around it) after its new start is recorded, so
//! a reader never shows the zeros. Its shim, `remove` and `graven gc` enforce it.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::read::{Source, source_dirs};
use super::{LogsError, START, Stream, io};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub max_bytes: u64,
    pub max_age: Duration,
}

/// What keeps a laptop's disk safe: 256 MiB and 7 days per service.
pub const DEFAULT: Policy = Policy {
    max_bytes: 256 << 20,
    max_age: Duration::from_secs(7 * 24 * 3600),
};

/// What retention freed: a whole source, or the oldest bytes of a live one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Freed {
    pub source: String,
    pub bytes: u64,
    pub whole: bool,
}

/// Bytes a source takes on disk (holes are free).
fn usage(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// The file in a group's directory that holds its retention, written by each start of one
/// of its instances (so the newest release's bound applies).
const POLICY: &str = "retention.json";

#[derive(Serialize, serde::Deserialize)]
struct Recorded {
    max_bytes: u64,
    max_age_s: u64,
}

/// Records `policy` as the group's.
pub fn save_policy(group_dir: &Path, policy: Policy) -> Result<(), LogsError> {
    super::private_dirs(group_dir)?;
    let path = group_dir.join(POLICY);
    let tmp = group_dir.join(format!(".{POLICY}.{}", std::process::id()));
    let recorded = Recorded {
        max_bytes: policy.max_bytes,
        max_age_s: policy.max_age.as_secs(),
    };
    let bytes = serde_json::to_vec(&recorded).expect("a policy serializes");
    // Every start of the group's instances records it, nearly always unchanged: a rename
    // over the old file makes ext4 start writing the new one out (auto_da_alloc), a few
    // hundred µs on the start's path, where reading it back costs a few µs.
    if std::fs::read(&path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    {
        // Owner-only, as everything in graven's home.
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut file| file.write_all(&bytes))
            .map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

/// The group's recorded retention, `DEFAULT` without one.
pub fn policy_of(group_dir: &Path) -> Policy {
    std::fs::read(group_dir.join(POLICY))
        .ok()
        .and_then(|b| serde_json::from_slice::<Recorded>(&b).ok())
        .map_or(DEFAULT, |r| Policy {
            max_bytes: r.max_bytes,
            max_age: Duration::from_secs(r.max_age_s),
        })
}

/// Enforces every group's recorded retention (`graven gc`).
pub fn enforce_all(home: &Path, dry_run: bool) -> Vec<Freed> {
    let mut groups: Vec<PathBuf> = source_dirs(home)
        .into_iter()
        .filter_map(|d| d.parent().map(Path::to_owned))
        .collect();
    groups.dedup();
    let mut freed = Vec::new();
    for group in groups {
        freed.extend(enforce(&group, policy_of(&group), dry_run).unwrap_or_default());
    }
    freed
}

/// Enforces `policy` on the group in `group_dir` (the sources directly under it). Holds
/// the group's lock, so two shims of one service never free the same bytes.
pub fn enforce(group_dir: &Path, policy: Policy, dry_run: bool) -> Result<Vec<Freed>, LogsError> {
    let lock_path = group_dir.join(".retention.lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io(&lock_path)(e.into()))?;
    let mut sources: Vec<Source> = std::fs::read_dir(group_dir)
        .map_err(io(group_dir))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Source::open(&e.path()).ok())
        .collect();
    sources.sort_by(|a, b| (a.meta.started_at_ms, &a.dir).cmp(&(b.meta.started_at_ms, &b.dir)));
    let cutoff = super::now_ns().saturating_sub(policy.max_age.as_nanos() as u64);
    let mut freed = Vec::new();
    let mut kept = Vec::new();
    // Age first: whole dead sources whose last line is older, old bytes of live ones.
    for source in sources {
        let newest = Stream::ALL
            .iter()
            .map(|&s| source.time_of(s, source.extent(s).1))
            .max()
            .unwrap_or(0);
        if !source.live && newest < cutoff {
            freed.push(remove(&source, dry_run)?);
            continue;
        }
        let mut free = [0u64; 2];
        for stream in Stream::ALL {
            free[stream.index()] = source.first_at_or_after(stream, cutoff);
        }
        if let Some(f) = punch(&source, free, dry_run)? {
            freed.push(f);
        }
        kept.push(source);
    }
    // Then size, oldest first.
    let mut total: u64 = kept.iter().map(|s| usage(&s.dir)).sum();
    for source in &kept {
        if total <= policy.max_bytes {
            break;
        }
        // The newest source, dead or live, is trimmed rather than removed: its last lines
        // are often why it was removed.
        let newest = std::ptr::eq(source, kept.last().expect("not empty"));
        if !source.live && !newest {
            let f = remove(source, dry_run)?;
            total = total.saturating_sub(f.bytes);
            freed.push(f);
            continue;
        }
        // It gives up its oldest bytes, each stream in proportion.
        let over = total - policy.max_bytes;
        let mut free = [0u64; 2];
        let held: u64 = Stream::ALL
            .iter()
            .map(|&s| source.extent(s).1 - source.extent(s).0)
            .sum();
        for stream in Stream::ALL {
            let (start, len) = source.extent(stream);
            let share = (len - start) as u128 * over as u128 / held.max(1) as u128;
            free[stream.index()] = source.line_start_at((start + share as u64).min(len), stream);
        }
        if let Some(f) = punch(source, free, dry_run)? {
            total = total.saturating_sub(f.bytes);
            freed.push(f);
        }
    }
    Ok(freed)
}

fn remove(source: &Source, dry_run: bool) -> Result<Freed, LogsError> {
    let bytes = usage(&source.dir);
    if !dry_run {
        super::ingest::unseal(&source.dir);
        std::fs::remove_dir_all(&source.dir).map_err(io(&source.dir))?;
    }
    Ok(Freed {
        source: source.dir.to_string_lossy().into_owned(),
        bytes,
        whole: true,
    })
}

/// Frees each stream's bytes before `to` (a line's start): records the new starts, then
/// punches the holes.
fn punch(source: &Source, to: [u64; 2], dry_run: bool) -> Result<Option<Freed>, LogsError> {
    let starts = Stream::ALL.map(|s| source.extent(s).0);
    let to = [to[0].max(starts[0]), to[1].max(starts[1])];
    if to == starts {
        return Ok(None);
    }
    let bytes = (to[0] - starts[0]) + (to[1] - starts[1]);
    if !dry_run {
        let path = source.dir.join(START);
        let (index_from, index_to) = index_cut(&source.dir, to);
        let mut record = Vec::with_capacity(24);
        record.extend_from_slice(&to[0].to_le_bytes());
        record.extend_from_slice(&to[1].to_le_bytes());
        record.extend_from_slice(&index_to.to_le_bytes());
        let tmp = source.dir.join(".start.tmp");
        File::options()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &record))
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        for stream in Stream::ALL {
            let i = stream.index();
            if to[i] <= starts[i] {
                continue;
            }
            let data = source.dir.join(stream.file());
            let file = File::options()
                .append(true)
                .open(&data)
                .map_err(io(&data))?;
            let was = super::ingest::is_append_only(&file);
            if was {
                super::ingest::set_append_only(&file, false);
            }
            let punched = rustix::fs::fallocate(
                &file,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                0,
                to[i],
            );
            if was {
                super::ingest::set_append_only(&file, true);
            }
            punched.map_err(|e| io(&data)(e.into()))?;
        }
        // The index's entries of freed bytes go too (its growth is bounded with the data's).
        if index_to > index_from {
            let index = source.dir.join(super::INDEX);
            let file = File::options()
                .append(true)
                .open(&index)
                .map_err(io(&index))?;
            rustix::fs::fallocate(
                &file,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                0,
                index_to,
            )
            .map_err(|e| io(&index)(e.into()))?;
        }
    }
    Ok(Some(Freed {
        source: source.dir.to_string_lossy().into_owned(),
        bytes,
        whole: false,
    }))
}

/// The index's kept start now, and where it begins once each stream's bytes before `to`
/// are freed: past every leading entry that ends at or before its stream's new start.
fn index_cut(dir: &Path, to: [u64; 2]) -> (u64, u64) {
    use super::index::{ENTRY, Entry};
    let from = super::read::read_starts(dir)[2];
    let Ok(bytes) = std::fs::read(dir.join(super::INDEX)) else {
        return (from, from);
    };
    let mut at = from - from % ENTRY as u64;
    while let Some(entry) = bytes
        .get(at as usize..at as usize + ENTRY)
        .and_then(Entry::decode)
    {
        if entry.end > to[entry.stream.index()] {
            break;
        }
        at += ENTRY as u64;
    }
    (from, at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::Writer;
    use crate::logs::read::{Query, read};
    use std::time::SystemTime;

    fn texts(home: &Path) -> Vec<String> {
        let mut got = Vec::new();
        read(home, &Query::default(), &mut |r| {
            got.push(format!(
                "{}:{}",
                r.source.meta.instance,
                String::from_utf8_lossy(&r.line)
            ))
        });
        got
    }

    #[test]
    fn a_policy_is_rewritten_only_when_it_changes() {
        use std::os::unix::fs::MetadataExt;
        let group = tempfile::tempdir().unwrap();
        let group = group.path().join("g");
        let inode = || std::fs::metadata(group.join(POLICY)).unwrap().ino();
        let small = Policy {
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(60),
        };
        save_policy(&group, small).unwrap();
        assert_eq!(policy_of(&group), small);
        let first = inode();
        // The same policy again leaves the file as it was: no new file renamed over it.
        save_policy(&group, small).unwrap();
        assert_eq!(inode(), first);
        // Another one replaces it.
        let large = Policy {
            max_bytes: 1 << 30,
            ..small
        };
        save_policy(&group, large).unwrap();
        assert_eq!(policy_of(&group), large);
        assert_ne!(inode(), first);
        save_policy(&group, small).unwrap();
        assert_eq!(policy_of(&group), small);
    }

    #[test]
    fn old_dead_sources_go_and_a_live_one_loses_its_oldest_lines_only() {
        let home = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let old = now - Duration::from_secs(3600);
        {
            let mut dead = Writer::open(home.path(), "g", "dead").unwrap();
            dead.append(old, b"gone").unwrap();
        }
        let mut live = Writer::open(home.path(), "g", "live").unwrap();
        live.append(old, b"old").unwrap();
        live.append(now, b"new").unwrap();
        let policy = Policy {
            max_bytes: u64::MAX,
            max_age: Duration::from_secs(60),
        };
        let dry = enforce(&home.path().join("logs/g"), policy, true).unwrap();
        assert_eq!(dry.len(), 2);
        assert_eq!(texts(home.path()), ["dead:gone", "live:old", "live:new"]);
        enforce(&home.path().join("logs/g"), policy, false).unwrap();
        assert_eq!(texts(home.path()), ["live:new"]);
    }

    #[test]
    fn over_its_size_a_group_drops_its_oldest_dead_sources_first() {
        let home = tempfile::tempdir().unwrap();
        let line = vec![b'x'; 8191];
        for name in ["a", "b", "c"] {
            let mut w = Writer::open(home.path(), "g", name).unwrap();
            for _ in 0..16 {
                w.append(SystemTime::now(), &line).unwrap();
            }
        }
        let policy = Policy {
            max_bytes: 300 << 10,
            max_age: Duration::from_secs(3600),
        };
        enforce(&home.path().join("logs/g"), policy, false).unwrap();
        let left: Vec<String> = texts(home.path())
            .iter()
            .map(|t| t.split(':').next().unwrap().to_owned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(left, ["b", "c"]);
    }
}
