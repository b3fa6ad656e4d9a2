//! The local runtime's watch: each running instance's workload is watched through a pidfd,
//! which the kernel makes readable when the process ends, and its end is broadcast at once
//! (`Runtime::changes`). A hint only: listing stays the truth (a change is sent for a
//! process that ended, whatever it was), so a watcher that missed one loses nothing but
//! time. Instances are watched when this runtime starts them and when a listing finds them
//! running (those another graven started, before a restart); a process with no async
//! runtime (the CLI's `ps`) watches nothing.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::broadcast;

use crate::runtime::{CHANGES_BUFFER, InstanceChange, InstanceId};

#[derive(Debug)]
pub struct Watch {
    changes: broadcast::Sender<InstanceChange>,
    /// Instances whose workload a task waits on.
    watched: Mutex<BTreeSet<InstanceId>>,
}

impl Watch {
    pub fn new() -> Arc<Watch> {
        Arc::new(Watch {
            changes: broadcast::channel(CHANGES_BUFFER).0,
            watched: Mutex::default(),
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<InstanceChange> {
        self.changes.subscribe()
    }

    /// Tells every watcher of a change found other than by waiting (a drift check's).
    pub fn notify(&self, change: InstanceChange) {
        let _ = self.changes.send(change);
    }

    fn watched(&self) -> std::sync::MutexGuard<'_, BTreeSet<InstanceId>> {
        self.watched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches the workload `pid` of instance `id` until it ends, unless it is watched
    /// already or there is no async runtime to wait in.
    pub fn watch(self: &Arc<Self>, id: &InstanceId, pid: u32) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self.watched().insert(id.clone()) {
            return;
        }
        let Some(pid) = rustix::process::Pid::from_raw(pid as i32) else {
            self.watched().remove(id);
            return;
        };
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK)
            .ok()
            .and_then(|fd| {
                // SAFETY: the `OwnedFd` is moved into the `AsyncFd`, which owns it until it
                // is dropped: the descriptor stays open and the same for its whole life.
                unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.ok()
            });
        let watch = self.clone();
        let id = id.clone();
        runtime.spawn(async move {
            // A process already gone (no pidfd) has ended: that is news too.
            if let Some(pidfd) = pidfd {
                let _ = pidfd.readable().await;
            }
            watch.watched().remove(&id);
            let _ = watch.changes.send(InstanceChange::Exited { id });
        });
    }
}
