//! The runtime contract, checked the same way against every backend: the in-memory fake, the
//! embedded local runtime, the Docker runtime on a dockerd of the test's own (with a
//! bridge of its own), and the Swarm runtime on a one-node Swarm of the test's own (an engine
//! in a network namespace of its own). A backend passes when every function here passes for
//! it; where Swarm cannot do what the contract asks, the difference is asserted instead.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use graven::runtime::{
    AnyRuntime, DockerRuntime, FakeRuntime, InstanceChange, InstanceSpec, InstanceStatus,
    LocalRuntime, Runtime, RuntimeError, SwarmRuntime, VolumeMount,
};
use graven::store::Digest;
use support::runtime::{Reply, get};

/// One backend under test with an image of the example service it can start.
struct Subject {
    runtime: AnyRuntime,
    image: Digest,
    _home: tempfile::TempDir,
    /// The engine a Docker subject runs on, stopped (by its PID) after the subject's
    /// instances are killed.
    _engine: Option<support::docker::Dockerd>,
    /// The Swarm a Swarm subject runs on, stopped likewise.
    _swarm: Option<support::swarm::Swarm>,
}

fn fake() -> Subject {
    let home = tempfile::tempdir().unwrap();
    let image = Digest::of(b"the example service");
    Subject {
        runtime: AnyRuntime::Fake(FakeRuntime::with_images([image.clone()])),
        image,
        _home: home,
        _engine: None,
        _swarm: None,
    }
}

fn local() -> Subject {
    graven::sandbox::set_helper_binary(support::graven_bin());
    let home = tempfile::tempdir().unwrap();
    let image = support::runtime::hello_image(home.path());
    Subject {
        runtime: AnyRuntime::Local(LocalRuntime::open(home.path()).unwrap()),
        image,
        _home: home,
        _engine: None,
        _swarm: None,
    }
}

/// The Docker runtime on an engine of the test's own; the example's image is loaded into it
/// from graven's store by `prepare` (the first start's).
fn docker() -> Subject {
    let engine = support::docker::Dockerd::start_with_bridge();
    let home = tempfile::tempdir().unwrap();
    let image = support::runtime::hello_image(home.path());
    Subject {
        runtime: AnyRuntime::Docker(DockerRuntime::open(home.path(), &engine.host()).unwrap()),
        image,
        _home: home,
        _engine: Some(engine),
        _swarm: None,
    }
}

/// The Swarm runtime on a one-node Swarm of the test's own (its manager's engine the only
/// one); the example's image is loaded into it by `prepare`.
fn swarm() -> Subject {
    let swarm = support::swarm::Swarm::with_nodes(1);
    let home = tempfile::tempdir().unwrap();
    let image = support::runtime::hello_image(home.path());
    let host = swarm.manager().host();
    Subject {
        runtime: AnyRuntime::Swarm(
            SwarmRuntime::open(home.path(), &host, std::slice::from_ref(&host)).unwrap(),
        ),
        image,
        _home: home,
        _engine: None,
        _swarm: Some(swarm),
    }
}

/// Kills whatever a failed test left running, so no instance outlives the test.
impl Drop for Subject {
    fn drop(&mut self) {
        let runtime = self.runtime.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                for instance in runtime.list().await.unwrap_or_default() {
                    if !instance.status.is_exited() {
                        let _ = runtime.kill(&instance.id).await;
                    }
                }
            });
        })
        .join();
    }
}

async fn fetch(address: SocketAddr, path: &str) -> Option<Reply> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || get(address, &path))
        .await
        .unwrap()
}

/// Waits until `/healthz` answers at all (the instance is listening), with a deadline long
/// enough for a loaded machine.
async fn wait_listening(address: SocketAddr) -> Reply {
    let deadline = tokio::time::Instant::now() + support::LEAST_WAIT;
    loop {
        if let Some(reply) = fetch(address, "/healthz").await {
            return reply;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{address} never answered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn spec(subject: &Subject) -> InstanceSpec {
    InstanceSpec::new(subject.image.clone())
}

/// A probe's timeout where it must not time out: it bounds only a probe that hangs, and a
/// loaded machine takes many times what this one does to run one.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    support::daemon::free_port().port()
}

async fn serves_health_and_greeting(subject: Subject) {
    let mut spec = spec(&subject);
    spec.env.insert("GREETING".into(), "hi".into());
    spec.env.insert("VERSION".into(), "7".into());
    spec.labels.insert("service".into(), "web".into());
    let instance = subject.runtime.start(spec).await.unwrap();
    assert_eq!(
        instance.labels.get("service").map(String::as_str),
        Some("web")
    );
    let address = instance.address.expect("an instance has an address");
    assert_eq!(wait_listening(address).await.status, 200);
    let reply = fetch(address, "/").await.unwrap();
    assert_eq!(reply.body, "hi from hello 7\n");
    assert_eq!(reply.headers["x-hello-version"], "7");
    let seen = subject.runtime.inspect(&instance.id).await.unwrap();
    assert_eq!(seen.status, InstanceStatus::Running);
    let listed = subject.runtime.list().await.unwrap();
    assert!(
        listed
            .iter()
            .any(|i| i.id == instance.id && !i.status.is_exited())
    );
    subject
        .runtime
        .stop(&instance.id, Duration::from_secs(5))
        .await
        .unwrap();
}

async fn unhealthy_env_fails_health(subject: Subject) {
    let mut spec = spec(&subject);
    spec.env.insert("HEALTHY".into(), "0".into());
    let instance = subject.runtime.start(spec).await.unwrap();
    let address = instance.address.unwrap();
    assert_eq!(wait_listening(address).await.status, 503);
    // The negative control: the same image without HEALTHY=0 is healthy.
    let healthy = subject.runtime.start(self::spec(&subject)).await.unwrap();
    assert_eq!(wait_listening(healthy.address.unwrap()).await.status, 200);
    for id in [instance.id, healthy.id] {
        subject
            .runtime
            .stop(&id, Duration::from_secs(5))
            .await
            .unwrap();
    }
}

async fn stop_ends_it_with_the_stop_signal(subject: Subject) {
    let instance = subject.runtime.start(spec(&subject)).await.unwrap();
    let address = instance.address.unwrap();
    wait_listening(address).await;
    let stopped = subject
        .runtime
        .stop(&instance.id, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        stopped.status,
        InstanceStatus::Exited {
            code: None,
            signal: Some(15)
        }
    );
    assert!(
        fetch(address, "/healthz").await.is_none(),
        "still answering after stop"
    );
    let seen = subject.runtime.inspect(&instance.id).await.unwrap();
    assert!(seen.status.is_exited());
    // Stopping again is harmless and reports the same end.
    let again = subject
        .runtime
        .stop(&instance.id, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(again.status, stopped.status);
}

async fn kill_ends_it_at_once(subject: Subject) {
    let instance = subject.runtime.start(spec(&subject)).await.unwrap();
    let address = instance.address.unwrap();
    wait_listening(address).await;
    subject.runtime.kill(&instance.id).await.unwrap();
    let seen = subject.runtime.inspect(&instance.id).await.unwrap();
    assert_eq!(
        seen.status,
        InstanceStatus::Exited {
            code: None,
            signal: Some(9)
        }
    );
    assert!(
        fetch(address, "/healthz").await.is_none(),
        "still answering after kill"
    );
}

/// An instance whose process ends is reported as a change at once (the controller lists on
/// it instead of every 100 ms): on the local runtime when its workload is killed by someone
/// other than graven, as a crash would end it.
async fn an_exit_is_reported_as_a_change(subject: Subject) {
    let mut changes = subject.runtime.changes();
    let instance = subject.runtime.start(spec(&subject)).await.unwrap();
    wait_listening(instance.address.unwrap()).await;
    match instance.pid {
        // SAFETY: kill(2) on the workload this test just started and saw answering.
        Some(pid) => unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        },
        None => subject.runtime.kill(&instance.id).await.unwrap(),
    }
    let change = tokio::time::timeout(support::LEAST_WAIT, async {
        loop {
            match changes.recv().await {
                Ok(InstanceChange::Exited { id }) if id == instance.id => return id,
                Ok(_) => continue,
                Err(error) => panic!("the watch ended: {error}"),
            }
        }
    })
    .await
    .expect("the exit is reported");
    assert_eq!(change, instance.id);
    let seen = subject.runtime.inspect(&instance.id).await.unwrap();
    assert!(seen.status.is_exited(), "{:?}", seen.status);
}

async fn remove_needs_an_exited_instance(subject: Subject) {
    let instance = subject.runtime.start(spec(&subject)).await.unwrap();
    wait_listening(instance.address.unwrap()).await;
    let refused = subject.runtime.remove(&instance.id).await;
    assert!(
        matches!(refused, Err(RuntimeError::WrongState { .. })),
        "{refused:?}"
    );
    subject
        .runtime
        .stop(&instance.id, Duration::from_secs(5))
        .await
        .unwrap();
    subject.runtime.remove(&instance.id).await.unwrap();
    let gone = subject.runtime.inspect(&instance.id).await;
    assert!(
        matches!(gone, Err(RuntimeError::UnknownInstance { .. })),
        "{gone:?}"
    );
    assert!(subject.runtime.list().await.unwrap().is_empty());
}

async fn unknown_image_starts_nothing(subject: Subject) {
    let unknown = Digest::of(b"no such image");
    let result = subject
        .runtime
        .start(InstanceSpec::new(unknown.clone()))
        .await;
    assert!(
        matches!(result, Err(RuntimeError::UnknownImage { .. })),
        "{result:?}"
    );
    let prepared = subject.runtime.prepare(&unknown).await;
    assert!(
        matches!(prepared, Err(RuntimeError::UnknownImage { .. })),
        "{prepared:?}"
    );
    // The negative control: the known image prepares.
    subject.runtime.prepare(&subject.image).await.unwrap();
    assert!(subject.runtime.list().await.unwrap().is_empty());
}

async fn escaping_volume_starts_nothing(subject: Subject) {
    let mut spec = spec(&subject);
    spec.volumes.push(VolumeMount {
        name: "../../etc".into(),
        path: "/data".into(),
    });
    let result = subject.runtime.start(spec).await;
    assert!(
        matches!(result, Err(RuntimeError::BadVolume { .. })),
        "{result:?}"
    );
    assert!(subject.runtime.list().await.unwrap().is_empty());
}

/// A named volume is owned by one live instance at a time: a second start on it is refused,
/// naming the volume; another volume is no obstacle; once the holder is stopped, it starts.
async fn a_held_volume_starts_nothing_until_its_holder_is_gone(subject: Subject) {
    let with_volume = |name: &str| {
        let mut spec = spec(&subject);
        spec.volumes.push(VolumeMount {
            name: name.into(),
            path: "/data".into(),
        });
        spec
    };
    let holder = subject.runtime.start(with_volume("data")).await.unwrap();
    let refused = subject.runtime.start(with_volume("data")).await;
    let message = refused
        .as_ref()
        .map(|_| String::new())
        .unwrap_or_else(|e| e.to_string());
    assert!(
        message.contains("\"data\"") && message.contains("in use by"),
        "{refused:?}"
    );
    assert_eq!(subject.runtime.list().await.unwrap().len(), 1);
    let other = subject.runtime.start(with_volume("other")).await.unwrap();
    subject
        .runtime
        .stop(&holder.id, Duration::from_secs(5))
        .await
        .unwrap();
    let next = subject.runtime.start(with_volume("data")).await.unwrap();
    for instance in [&holder, &other, &next] {
        let _ = subject.runtime.stop(&instance.id, Duration::ZERO).await;
        let _ = subject.runtime.remove(&instance.id).await;
    }
}

/// A tmpfs that overlaps a volume (or is not absolute) is refused the same way by every
/// backend, before anything starts.
async fn overlapping_tmpfs_starts_nothing(subject: Subject) {
    let mut spec = spec(&subject);
    spec.volumes.push(VolumeMount {
        name: "data".into(),
        path: "/data".into(),
    });
    for path in ["/data/cache", "cache"] {
        let mut bad = spec.clone();
        bad.tmpfs.push(graven::runtime::TmpfsMount {
            path: path.into(),
            bytes: 1 << 20,
        });
        let result = subject.runtime.start(bad).await;
        assert!(
            matches!(&result, Err(RuntimeError::BadTmpfs { path: p, .. }) if p == path),
            "{result:?}"
        );
    }
    assert!(subject.runtime.list().await.unwrap().is_empty());
}

async fn fixed_port_is_used_or_refused(subject: Subject) {
    let port = free_port();
    let mut spec = spec(&subject);
    // A fixed host port is the host network's: in a network of its own every instance has
    // every port.
    spec.network = graven::runtime::NetworkMode::Host;
    spec.host_port = Some(port);
    let instance = subject.runtime.start(spec.clone()).await.unwrap();
    assert_eq!(instance.address.unwrap().port(), port);
    wait_listening(instance.address.unwrap()).await;
    let taken = subject.runtime.start(spec).await;
    assert!(
        matches!(taken, Err(RuntimeError::PortInUse { port: p }) if p == port),
        "{taken:?}"
    );
    let listed = subject.runtime.list().await.unwrap();
    assert_eq!(listed.len(), 1, "a refused start left an instance behind");
    subject
        .runtime
        .stop(&instance.id, Duration::from_secs(5))
        .await
        .unwrap();
}

async fn instances_get_distinct_addresses(subject: Subject) {
    // Both asked to listen on the same port: each still has an address of its own (its own
    // network's, or a free host port).
    let mut same_port = spec(&subject);
    same_port.port = Some(8080);
    let a = subject.runtime.start(same_port.clone()).await.unwrap();
    let b = subject.runtime.start(same_port).await.unwrap();
    assert_ne!(a.id, b.id);
    assert_ne!(a.address, b.address);
    for instance in [&a, &b] {
        assert_eq!(wait_listening(instance.address.unwrap()).await.status, 200);
    }
    let labels: BTreeMap<_, _> = subject
        .runtime
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| (i.id, i.status))
        .collect();
    assert_eq!(labels.len(), 2);
    for id in [a.id, b.id] {
        subject
            .runtime
            .stop(&id, Duration::from_secs(5))
            .await
            .unwrap();
    }
}

/// A health probe runs in the instance without touching it: the instance keeps running,
/// untainted, and still serves; an exited instance cannot be probed.
async fn a_probe_leaves_the_instance_untainted(subject: Subject) {
    let rt = &subject.runtime;
    let instance = rt.start(spec(&subject)).await.unwrap();
    let address = instance.address.unwrap();
    wait_listening(address).await;
    // The example again, inside the instance: on the local runtime it finds its port taken
    // and exits 1; the fake answers for its health. Either way an answer, not an error.
    let command = ["/hello".to_owned()];
    let output = rt
        .probe(&instance.id, &command, PROBE_TIMEOUT)
        .await
        .unwrap();
    assert!(!output.timed_out, "{output:?}");
    let seen = rt.inspect(&instance.id).await.unwrap();
    assert!(!seen.tainted, "a probe tainted the instance");
    assert!(!seen.status.is_exited());
    assert_eq!(fetch(address, "/healthz").await.unwrap().status, 200);
    rt.kill(&instance.id).await.unwrap();
    let refused = rt
        .probe(&instance.id, &command, PROBE_TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(refused, RuntimeError::WrongState { .. }),
        "{refused}"
    );
}

/// A drift check of an untouched instance (probed, even) finds nothing and records nothing;
/// an exited instance, or one the runtime does not know, is skipped, not an error.
async fn an_untouched_instance_has_no_drift(subject: Subject) {
    let rt = &subject.runtime;
    let instance = rt.start(spec(&subject)).await.unwrap();
    wait_listening(instance.address.unwrap()).await;
    let command = ["/hello".to_owned()];
    rt.probe(&instance.id, &command, PROBE_TIMEOUT)
        .await
        .unwrap();
    let unknown = graven::runtime::InstanceId("nope".to_owned());
    let ids = [instance.id.clone(), unknown];
    let found = rt
        .check_drift(&ids, graven::runtime::DriftCheck::default())
        .await
        .unwrap();
    assert_eq!(found, vec![]);
    let seen = rt.inspect(&instance.id).await.unwrap();
    assert_eq!(seen.drift, None);
    assert!(!seen.status.is_exited());
    rt.kill(&instance.id).await.unwrap();
    let found = rt
        .check_drift(&ids, graven::runtime::DriftCheck::default())
        .await
        .unwrap();
    assert_eq!(found, vec![]);
}

macro_rules! conformance {
    ($backend:ident: $($case:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::$backend()).await;
                }
            )*
        }
    };
}

macro_rules! all_cases {
    ($backend:ident) => {
        conformance!($backend:
            serves_health_and_greeting,
            unhealthy_env_fails_health,
            stop_ends_it_with_the_stop_signal,
            kill_ends_it_at_once,
            an_exit_is_reported_as_a_change,
            remove_needs_an_exited_instance,
            unknown_image_starts_nothing,
            escaping_volume_starts_nothing,
            a_held_volume_starts_nothing_until_its_holder_is_gone,
            overlapping_tmpfs_starts_nothing,
            fixed_port_is_used_or_refused,
            instances_get_distinct_addresses,
            a_probe_leaves_the_instance_untainted,
            an_untouched_instance_has_no_drift,
        );
    };
}

all_cases!(fake);
all_cases!(local);
all_cases!(docker);
conformance!(swarm:
    serves_health_and_greeting,
    unhealthy_env_fails_health,
    stop_ends_it_with_the_stop_signal,
    kill_ends_it_at_once,
    an_exit_is_reported_as_a_change,
    remove_needs_an_exited_instance,
    unknown_image_starts_nothing,
    escaping_volume_starts_nothing,
    swarm_refuses_volumes,
    overlapping_tmpfs_starts_nothing,
    swarm_refuses_a_fixed_host_port,
    instances_get_distinct_addresses,
    a_probe_leaves_the_instance_untainted,
    an_untouched_instance_has_no_drift,
);

/// Swarm's difference for `a_held_volume_starts_nothing_until_its_holder_is_gone`: a named
/// volume lives on one node, and its data would not follow a task Swarm places elsewhere, so
/// a volume is refused, saying so, and nothing starts.
async fn swarm_refuses_volumes(subject: Subject) {
    let mut spec = spec(&subject);
    spec.volumes.push(VolumeMount {
        name: "data".into(),
        path: "/data".into(),
    });
    let refused = subject.runtime.start(spec).await;
    assert!(
        matches!(&refused, Err(RuntimeError::CannotExpress { runtime: "swarm", what }) if what.contains("volume")),
        "{refused:?}"
    );
    assert!(subject.runtime.list().await.unwrap().is_empty());
}

/// Swarm's difference for `fixed_port_is_used_or_refused`: no host network and no fixed host
/// port (a task's node is Swarm's choice); refused, and nothing starts.
async fn swarm_refuses_a_fixed_host_port(subject: Subject) {
    let mut spec = spec(&subject);
    spec.network = graven::runtime::NetworkMode::Host;
    spec.host_port = Some(free_port());
    let refused = subject.runtime.start(spec).await;
    assert!(
        matches!(
            &refused,
            Err(RuntimeError::CannotExpress {
                runtime: "swarm",
                ..
            })
        ),
        "{refused:?}"
    );
    assert!(subject.runtime.list().await.unwrap().is_empty());
}

/// The fake's failure hooks, which the controller's tests rely on.
mod fake_hooks {
    use super::*;
    use graven::runtime::fake::Behavior;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crash_and_behavior_switches() {
        let fake = FakeRuntime::new();
        let runtime = AnyRuntime::Fake(fake.clone());
        let instance = runtime
            .start(InstanceSpec::new(Digest::of(b"any")))
            .await
            .unwrap();
        let address = instance.address.unwrap();
        assert_eq!(wait_listening(address).await.status, 200);
        fake.set_behavior(&instance.id, Behavior::Unhealthy)
            .unwrap();
        assert_eq!(fetch(address, "/healthz").await.unwrap().status, 503);
        fake.set_behavior(&instance.id, Behavior::Hung).unwrap();
        let hung =
            tokio::time::timeout(Duration::from_millis(300), fetch(address, "/healthz")).await;
        assert!(hung.is_err(), "a hung instance answered: {hung:?}");
        fake.set_behavior(&instance.id, Behavior::Healthy).unwrap();
        assert_eq!(fetch(address, "/healthz").await.unwrap().status, 200);
        fake.crash(&instance.id, 3).unwrap();
        let seen = runtime.inspect(&instance.id).await.unwrap();
        assert_eq!(
            seen.status,
            InstanceStatus::Exited {
                code: Some(3),
                signal: None
            }
        );
        assert!(fetch(address, "/healthz").await.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ignoring_the_stop_signal_means_a_kill_after_the_grace() {
        let runtime = AnyRuntime::Fake(FakeRuntime::new());
        let mut spec = InstanceSpec::new(Digest::of(b"any"));
        spec.env.insert("IGNORE_SIGTERM".into(), "1".into());
        let instance = runtime.start(spec).await.unwrap();
        let stopped = runtime
            .stop(&instance.id, Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(
            stopped.status,
            InstanceStatus::Exited {
                code: None,
                signal: Some(9)
            }
        );
    }
}
