//! A health probe that graven cannot make for want of descriptors is not held against the
//! instance. Its own test binary: it fills this process's descriptor table.

mod support;

use std::time::Duration;

use graven::proxy::limits::exhaustions;
use graven::proxy::{Health, HealthCheck, HealthKind, HealthMonitor};
use support::proxy::*;

const DEADLINE: Duration = Duration::from_secs(10);

/// Opens files until the process has no descriptor left; they are closed when dropped.
fn fill_descriptor_table() -> Vec<std::fs::File> {
    let mut files = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(file) => files.push(file),
            Err(error) if error.raw_os_error() == Some(libc::EMFILE) => return files,
            Err(error) => panic!("opening /dev/null: {error}"),
        }
    }
}

#[tokio::test]
async fn probes_graven_cannot_make_do_not_flip_a_healthy_instance() {
    let backend = TestBackend::start("a").await;
    let check = HealthCheck {
        kind: HealthKind::Http,
        path: "/healthz".into(),
        interval: Duration::from_millis(10),
        timeout: Duration::from_secs(1),
        healthy_after: 1,
        unhealthy_after: 2,
        start_period: Duration::ZERO,
    };
    let (changes, mut received) = tokio::sync::mpsc::unbounded_channel();
    let _monitor =
        HealthMonitor::spawn_from("a".into(), backend.address, check, Health::Healthy, changes);
    let before = exhaustions();
    let hogs = fill_descriptor_table();
    // Many times unhealthy_after rounds whose probe could not get a socket.
    eventually(DEADLINE, "probes failing for want of descriptors", || {
        exhaustions() >= before + 10
    })
    .await;
    drop(hogs);
    assert_eq!(received.try_recv().ok(), None);

    // Negative control: an instance that really stops answering is reported unhealthy.
    drop(backend);
    let change = tokio::time::timeout(DEADLINE, received.recv())
        .await
        .expect("a flip")
        .expect("the monitor runs");
    assert_eq!(change.health, Health::Unhealthy, "{change:?}");
}
