use super::*;

fn bytes(body: &str) -> Append {
    Append {
        kind: Kind::Bytes,
        body: body.as_bytes().to_vec(),
        expected: None,
    }
}

fn expecting(body: &str, expected: u64) -> Append {
    Append {
        expected: Some(expected),
        ..bytes(body)
    }
}

fn bodies(log: &AppEventLog, from: u64) -> Vec<(u64, String)> {
    log.read(from, usize::MAX, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, String::from_utf8(e.body).unwrap()))
        .collect()
}

fn seqs(answers: Vec<Result<u64>>) -> Vec<Result<u64, String>> {
    answers
        .into_iter()
        .map(|a| a.map_err(|e| e.to_string()))
        .collect()
}

#[test]
fn appends_are_numbered_from_one_and_read_back_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = AppEventLog::open(dir.path()).unwrap();
    assert_eq!(log.position().last, 0);
    assert_eq!(
        seqs(log.append(&[bytes("a"), bytes("b")]).unwrap()),
        [Ok(1), Ok(2)]
    );
    assert_eq!(seqs(log.append(&[bytes("c")]).unwrap()), [Ok(3)]);
    drop(log);
    let log = AppEventLog::open(dir.path()).unwrap();
    assert_eq!(
        bodies(&log, 1),
        [(1, "a".into()), (2, "b".into()), (3, "c".into())]
    );
    assert_eq!(bodies(&log, 3), [(3, "c".into())]);
    assert_eq!(bodies(&log, 4), []);
}

#[test]
fn an_append_expecting_an_old_last_event_is_refused_with_the_current_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = AppEventLog::open(dir.path()).unwrap();
    log.append(&[bytes("a")]).unwrap();
    // Two appenders both saw event 1: in one batch, the first wins and the second is told
    // the last is now 2.
    let answers = seqs(log.append(&[expecting("b", 1), expecting("c", 1)]).unwrap());
    assert_eq!(answers[0], Ok(2));
    assert_eq!(
        answers[1],
        Err("expected the last event to be 1, but it is 2".to_owned())
    );
    assert_eq!(bodies(&log, 1).len(), 2);
}

#[test]
fn a_body_over_the_limit_is_refused_and_the_rest_of_the_batch_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = AppEventLog::open(dir.path()).unwrap();
    let big = Append {
        kind: Kind::Bytes,
        body: vec![b'x'; MAX_BODY + 1],
        expected: None,
    };
    let answers = seqs(log.append(&[big, bytes("small")]).unwrap());
    assert!(answers[0].as_ref().unwrap_err().contains("over the limit"));
    assert_eq!(answers[1], Ok(1));
}

#[test]
fn a_torn_record_at_the_end_is_cleared_and_the_next_append_follows_the_last_whole_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = AppEventLog::open(dir.path()).unwrap();
    log.append(&[bytes("kept")]).unwrap();
    drop(log);
    // A crash in the middle of a write: half of a record's head and nothing after it.
    let path = dir.path().join(LOG_FILE);
    let mut torn = Vec::new();
    encode(2, 0, Kind::Bytes, b"lost", &mut torn);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    file.write_all(&torn[..HEAD / 2]).unwrap();
    drop(file);
    let mut log = AppEventLog::open(dir.path()).unwrap();
    assert_eq!(log.position().last, 1);
    assert_eq!(seqs(log.append(&[bytes("next")]).unwrap()), [Ok(2)]);
    drop(log);
    let log = AppEventLog::open(dir.path()).unwrap();
    assert_eq!(bodies(&log, 1), [(1, "kept".into()), (2, "next".into())]);
}

#[test]
fn two_writers_on_one_log_never_reuse_a_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let mut one = AppEventLog::open(dir.path()).unwrap();
    let mut two = AppEventLog::open(dir.path()).unwrap();
    for i in 0..10 {
        one.append(&[bytes(&format!("one {i}"))]).unwrap();
        two.append(&[bytes(&format!("two {i}"))]).unwrap();
    }
    let log = AppEventLog::open(dir.path()).unwrap();
    let read = bodies(&log, 1);
    assert_eq!(read.len(), 20);
    assert!(
        read.iter()
            .enumerate()
            .all(|(i, (seq, _))| *seq == i as u64 + 1)
    );
    // The other writer's optimistic check sees the other's appends too.
    let answers = seqs(one.append(&[expecting("stale", 19)]).unwrap());
    assert_eq!(
        answers,
        [Err(
            "expected the last event to be 19, but it is 20".to_owned()
        )]
    );
}

#[test]
fn reads_page_from_any_sequence_through_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = AppEventLog::open(dir.path()).unwrap();
    let batch: Vec<Append> = (1..=1000).map(|i| bytes(&i.to_string())).collect();
    log.append(&batch).unwrap();
    let page = log.read(700, 5, usize::MAX).unwrap();
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [700, 701, 702, 703, 704]
    );
    assert_eq!(page[0].body, b"700");
    // At least one event even when it alone is over the byte budget.
    assert_eq!(log.read(999, 10, 1).unwrap().len(), 1);
}

#[test]
fn compaction_drops_what_the_snapshot_covers_and_every_handle_follows_the_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = AppEventLog::open(dir.path()).unwrap();
    let mut other = AppEventLog::open(dir.path()).unwrap();
    let batch: Vec<Append> = (1..=10).map(|i| bytes(&i.to_string())).collect();
    log.append(&batch).unwrap();
    log.put_snapshot(&Snapshot {
        seq: 6,
        body: b"sum 21".to_vec(),
    })
    .unwrap();
    assert_eq!(log.compact().unwrap(), 6);
    assert_eq!(log.position().first, 7);
    assert!(matches!(
        log.read(3, 10, usize::MAX),
        Err(AppEventsError::Compacted { first: 7 })
    ));
    assert_eq!(bodies(&log, 7).len(), 4);
    // The other handle still had the old file open: its next append lands in the new one.
    assert_eq!(seqs(other.append(&[bytes("11")]).unwrap()), [Ok(11)]);
    let log = AppEventLog::open(dir.path()).unwrap();
    assert_eq!(log.position().first, 7);
    assert_eq!(bodies(&log, 7).last().unwrap(), &(11, "11".to_owned()));
    assert_eq!(
        log.snapshot().unwrap(),
        Some(Snapshot {
            seq: 6,
            body: b"sum 21".to_vec()
        })
    );
}

#[test]
fn a_snapshot_past_the_last_event_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = AppEventLog::open(dir.path()).unwrap();
    log.append(&[bytes("a")]).unwrap();
    let refused = log.put_snapshot(&Snapshot {
        seq: 2,
        body: Vec::new(),
    });
    assert!(matches!(
        refused,
        Err(AppEventsError::SnapshotAhead { seq: 2, last: 1 })
    ));
    assert_eq!(log.snapshot().unwrap(), None);
}

#[test]
fn a_file_that_is_not_a_log_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(LOG_FILE), b"something else entirely").unwrap();
    assert!(matches!(
        AppEventLog::open(dir.path()),
        Err(AppEventsError::NotALog { .. })
    ));
    assert_eq!(
        std::fs::read(dir.path().join(LOG_FILE)).unwrap(),
        b"something else entirely"
    );
}

/// Waits until the zeros thread has written all it was asked for.
fn wait_for_zeros(log: &AppEventLog) {
    let ahead = log.ahead.as_ref().expect("zeros are written ahead");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let len = std::fs::metadata(&log.path).unwrap().len();
        if len >= ahead.asked {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the zeros thread wrote {len} of {} bytes within a minute",
            ahead.asked
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn big(tag: usize, len: usize) -> Append {
    let mut body = format!("{tag:08} ").into_bytes();
    body.resize(len, b'a' + (tag % 26) as u8);
    Append {
        kind: Kind::Bytes,
        body,
        expected: None,
    }
}

#[test]
fn appends_past_the_zeros_written_ahead_never_write_zeros_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = AppEventLog::open(dir.path()).unwrap();
    log.write_zeros_ahead().unwrap();
    // 24 MiB of records: the file's end is crossed three times.
    for i in 0..48 {
        wait_for_zeros(&log);
        assert_eq!(
            seqs(log.append(&[big(i, 512 * 1024)]).unwrap()),
            [Ok(i as u64 + 1)]
        );
    }
    assert_eq!(log.zeroed_inline, 0, "every append found its zeros written");
    let len = std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
    assert!(len >= log.end + PREALLOCATE / 2, "the zeros stay ahead");
    assert!(len.is_multiple_of(PREALLOCATE));
    drop(log);
    let log = AppEventLog::open(dir.path()).unwrap();
    let read = log.read(1, usize::MAX, usize::MAX).unwrap();
    assert_eq!(read.len(), 48);
    assert!(
        read.iter()
            .enumerate()
            .all(|(i, e)| e.body == big(i, 512 * 1024).body)
    );
}

#[test]
fn a_crash_inside_a_batch_in_the_zeros_written_ahead_loses_only_that_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = AppEventLog::open(dir.path()).unwrap();
    log.write_zeros_ahead().unwrap();
    for i in 0..20 {
        log.append(&[big(i, 512 * 1024)]).unwrap();
    }
    wait_for_zeros(&log);
    let end = log.end;
    // A crash in the middle of a batch's write, past the first extension: whole records
    // nobody was answered for and a torn one, all in the zeros written ahead.
    let mut torn = Vec::new();
    encode(21, 0, Kind::Bytes, b"never answered", &mut torn);
    encode(22, 0, Kind::Bytes, b"torn", &mut torn);
    torn.truncate(torn.len() - 3);
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join(LOG_FILE))
        .unwrap()
        .write_all_at(&torn, end + 1)
        .unwrap();
    drop(log);
    let mut log = AppEventLog::open(dir.path()).unwrap();
    log.write_zeros_ahead().unwrap();
    assert_eq!(log.position().last, 20);
    assert_eq!(seqs(log.append(&[bytes("next")]).unwrap()), [Ok(21)]);
    drop(log);
    let log = AppEventLog::open(dir.path()).unwrap();
    let read = log.read(1, usize::MAX, usize::MAX).unwrap();
    assert_eq!(read.len(), 21);
    assert_eq!(read[20].body, b"next");
    assert!(
        read[..20]
            .iter()
            .enumerate()
            .all(|(i, e)| e.body == big(i, 512 * 1024).body)
    );
}

#[test]
fn another_writer_extending_the_file_while_zeros_are_written_ahead_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = AppEventLog::open(dir.path()).unwrap();
    daemon.write_zeros_ahead().unwrap();
    let mut other = AppEventLog::open(dir.path()).unwrap();
    // Both append at once, 20 MiB in all, so each crosses the file's end while the zeros
    // thread extends it: its `O_APPEND` writes must never land on the other's records.
    let writer = std::thread::spawn(move || {
        for i in 0..40 {
            other.append(&[big(1000 + i, 256 * 1024)]).unwrap();
        }
    });
    for i in 0..40 {
        daemon.append(&[big(i, 256 * 1024)]).unwrap();
    }
    writer.join().unwrap();
    drop(daemon);
    let log = AppEventLog::open(dir.path()).unwrap();
    let read = log.read(1, usize::MAX, usize::MAX).unwrap();
    assert_eq!(read.len(), 80, "every append is there");
    let mut tags: Vec<usize> = read
        .iter()
        .map(|e| {
            let tag: usize = std::str::from_utf8(&e.body[..8]).unwrap().parse().unwrap();
            assert_eq!(
                e.body,
                big(tag, 256 * 1024).body,
                "event {} is whole",
                e.seq
            );
            tag
        })
        .collect();
    tags.sort_unstable();
    let wanted: Vec<usize> = (0..40).chain(1000..1040).collect();
    assert_eq!(tags, wanted);
}

#[test]
fn refresh_if_changed_takes_no_lock_while_nothing_changed_though_zeros_run_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = AppEventLog::open(dir.path()).unwrap();
    log.write_zeros_ahead().unwrap();
    log.append(&[bytes("a")]).unwrap();
    wait_for_zeros(&log);
    assert!(std::fs::metadata(&log.path).unwrap().len() > log.end);
    // Another handle holds the writers' lock: a refresh that took it would wait forever.
    let other = AppEventLog::open(dir.path()).unwrap();
    let held = Locked::take(&other.lock, &other.path).unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    let refresher = std::thread::spawn(move || {
        let changed = log.refresh_if_changed().unwrap();
        done.send(()).unwrap();
        (log, changed)
    });
    assert!(
        finished
            .recv_timeout(std::time::Duration::from_secs(30))
            .is_ok(),
        "refresh_if_changed waited for the writers' lock though nothing changed"
    );
    let (mut log, changed) = refresher.join().unwrap();
    assert!(!changed, "nothing changed");
    drop(held);
    // Another writer's append is noticed.
    let mut other = other;
    other.append(&[bytes("b")]).unwrap();
    assert!(log.refresh_if_changed().unwrap());
    assert_eq!(log.position().last, 2);
    assert!(!log.refresh_if_changed().unwrap());
    // So is a compaction (the path names a new file).
    log.put_snapshot(&Snapshot {
        seq: 1,
        body: b"a".to_vec(),
    })
    .unwrap();
    other.compact().unwrap();
    assert!(log.refresh_if_changed().unwrap());
    assert_eq!(log.position().first, 2);
}

#[test]
fn the_log_reads_no_file_times_so_a_batch_sync_writes_no_inode() {
    // A `stat` asking for the change or modification time (`metadata()` asks for every field)
    // makes the file's next write store a fresh time, which dirties the inode; ext4 without a
    // journal then writes the inode's block in the next sync, before its flush. The writer
    // stat'ed the log in every batch, so every batch's sync wrote two blocks (a `perf` trace of
    // the daemon under wrk: the inode's block in 798 of 798 syncs). Userspace sees no trace of
    // that (the stored time need not change), so this reads the module's code: every stat in
    // it goes through `identity`, which asks for the inode and the size only.
    let code: Vec<&str> = include_str!("mod.rs")
        .lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect();
    let stats: Vec<String> = code
        .iter()
        .enumerate()
        .filter(|(_, line)| {
            line.contains("metadata(")
                || line.contains("fstat")
                || line.contains("symlink_metadata")
        })
        .map(|(n, line)| format!("mod.rs:{}: {}", n + 1, line.trim()))
        .collect();
    assert_eq!(
        stats,
        Vec::<String>::new(),
        "stats that read the file's times"
    );
    assert!(!IDENTITY.intersects(
        rustix::fs::StatxFlags::MTIME
            | rustix::fs::StatxFlags::CTIME
            | rustix::fs::StatxFlags::ATIME
            | rustix::fs::StatxFlags::BTIME
    ));
}
