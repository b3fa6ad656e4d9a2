//! An instance's output into graven's log store: the engine's log stream of the container
//! (stdout and stderr, each line with the engine's timestamp) appended to the instance's
//! source, `logs/<log-group>/<id>`, as the local runtime's shim fills it, so `graven logs`
//! reads Docker's instances like any other. The follower is a task of the graven process
//! that started or listed the instance; one writer per source at a time (the store's lock),
//! so a second process's follower gives way. Lines written while no graven followed are
//! read from the engine again from the source's last line on (`since`).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::container::LogOutput;
use futures_util::StreamExt;

use crate::logs::ingest::Writer;
use crate::runtime::Instance;
use crate::runtime::local::retention;

/// How often what was appended is made durable, as the shim's default.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// Follows the container `name`'s output until it ends (the container exited and the
/// engine closed the stream) or the store refuses a line.
pub async fn follow(docker: &Docker, name: &str, home: &Path, instance: &Instance) {
    let group = instance
        .labels
        .get(retention::LOG_GROUP)
        .map_or(crate::logs::RUN_GROUP, String::as_str)
        .to_owned();
    let opened = {
        let home = home.to_owned();
        let id = instance.id.0.clone();
        let meta = retention::meta(&instance.id, &instance.labels, instance.started_at_ms);
        tokio::task::spawn_blocking(move || Writer::open_with(&home, &group, &id, &meta)).await
    };
    // Another process follows it already (the source is locked), or the store is unusable.
    let Ok(Ok(mut writer)) = opened else {
        return;
    };
    let last_ns = last_line_ns(writer.dir()).unwrap_or(0);
    let last = UNIX_EPOCH + Duration::from_nanos(last_ns);
    let since = last_ns / 1_000_000_000;
    let mut stream = docker.logs(
        name,
        Some(bollard::query_parameters::LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            timestamps: true,
            since: since as i32,
            ..Default::default()
        }),
    );
    let mut last_sync = tokio::time::Instant::now();
    while let Some(Ok(chunk)) = stream.next().await {
        let bytes = match &chunk {
            LogOutput::StdOut { message } | LogOutput::StdErr { message } => message,
            LogOutput::Console { message } | LogOutput::StdIn { message } => message,
        };
        for line in bytes.split_inclusive(|&b| b == b'\n') {
            let (time, text) = split_timestamp(line);
            if last_ns > 0 && time <= last {
                // Already in the store from an earlier follower (`since` is whole seconds).
                continue;
            }
            if writer.append(time, text).is_err() {
                return;
            }
        }
        if last_sync.elapsed() >= SYNC_EVERY {
            let _ = writer.sync();
            last_sync = tokio::time::Instant::now();
        }
    }
    let _ = writer.sync();
}

/// The engine's `timestamps` prefix (RFC 3339, nanoseconds) split off a line; a line
/// without one is stamped now.
pub(crate) fn split_timestamp(line: &[u8]) -> (SystemTime, &[u8]) {
    if let Some(space) = line.iter().position(|&b| b == b' ')
        && let Ok(text) = std::str::from_utf8(&line[..space])
        && let Ok(time) = humantime::parse_rfc3339(text)
    {
        return (time, &line[space + 1..]);
    }
    (SystemTime::now(), line)
}

/// The time of the source's newest line (its index's last entry), so a new follower asks
/// the engine for what came after it.
pub(crate) fn last_line_ns(dir: &Path) -> Option<u64> {
    use crate::logs::index::{ENTRY, Entry};
    use std::io::{Read, Seek, SeekFrom};
    let mut index = std::fs::File::open(dir.join(crate::logs::INDEX)).ok()?;
    let len = index.metadata().ok()?.len();
    let whole = len - len % ENTRY as u64;
    if whole == 0 {
        return None;
    }
    index.seek(SeekFrom::Start(whole - ENTRY as u64)).ok()?;
    let mut bytes = [0u8; ENTRY];
    index.read_exact(&mut bytes).ok()?;
    Entry::decode(&bytes).map(|entry| entry.time_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_s_timestamp_is_the_line_s_time() {
        let (time, text) = split_timestamp(b"2026-12-06T17:30:00.5Z hello\n");
        assert_eq!(text, b"hello\n");
        let ms = time.duration_since(UNIX_EPOCH).unwrap().as_millis();
        assert_eq!(ms % 1000, 500);
        let (_, text) = split_timestamp(b"no stamp\n");
        assert_eq!(text, b"no stamp\n");
    }
}
