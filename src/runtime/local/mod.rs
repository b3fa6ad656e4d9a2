//! The embedded local runtime: instances as sandboxed processes on this machine, with no
//! daemon. Each image is unpacked once into a shared read-only root (`rootfs`); each
//! instance is started by a detached shim (`shim`) that outlives graven, with its state on
//! disk under `$GRAVEN_HOME/instances/<id>` (`state`), so any graven process can list,
//! observe, stop and remove it. Limits go through cgroups where the host allows (`cgroup`).
//!
//! This module never enters namespaces itself: that is the sandbox's job, in the shim (a
//! fresh single-threaded process), never in the async process.

mod cgroup;
pub mod drift;
mod gc;
mod names;
pub mod net;
mod netlink;
pub mod orphans;
mod probe;
pub mod retention;
mod rootfs;
pub mod shim;
mod state;
mod usernet;
mod volume_lock;
pub mod volumes;
mod watch;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use state::{Proc, SCRATCH, ShimRequest, State};

pub use gc::{Freed, GcReport};

use super::{
    DEFAULT_PORT, Instance, InstanceId, InstanceSpec, InstanceStatus, NetworkMode, Runtime,
    RuntimeError,
};
use crate::sandbox::user;
use crate::sandbox::{self, Bind, Options, SandboxSpec};
use crate::store::{Digest, Store, StoreError};

/// Where pasta writes its PID (a rootless instance's user-mode network).
const PASTA_PID: &str = "pasta.pid";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long `stop` waits for the shim to record an exit after the kill.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Test hooks, honoured only by a build with the test tools (`dev-tools`): the shim waits
/// just before it records its workload, and `remove` between its first look at an instance
/// and its deletion, each until the file the variable names exists, so a test can put one
/// step between the two (tests/runtime_local.rs).
pub const HOLD_SHIM_RECORD_ENV: &str = "GRAVEN_TEST_HOLD_SHIM_RECORD";
pub const HOLD_REMOVE_ENV: &str = "GRAVEN_TEST_HOLD_REMOVE";

/// Waits until the file named by `var` exists, when a build with the test tools is given
/// one; says so first by making `<file>.waiting`.
fn test_hold(var: &str) {
    if !cfg!(feature = "dev-tools") {
        return;
    }
    let Some(path) = std::env::var_os(var).map(PathBuf::from) else {
        return;
    };
    let _ = std::fs::write(path.with_extension("waiting"), b"");
    while !path.exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Only an exited instance is removed: a running one is stopped first.
fn refuse_unless_exited(id: &InstanceId, state: &State) -> Result<(), RuntimeError> {
    let status = state.observed_status();
    if status.is_exited() {
        return Ok(());
    }
    Err(RuntimeError::WrongState {
        id: id.clone(),
        status,
        action: "removed",
    })
}

/// When this process was started as an instance's shim, runs it and never returns.
pub fn enter_if_shim() {
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|a| a == shim::SHIM_ARG)
        && let Some(dir) = args.next()
    {
        shim::main(Path::new(&dir));
    }
}

#[derive(Debug, Clone)]
pub struct LocalRuntime {
    home: PathBuf,
    store: Store,
    /// Shared by every clone: one pidfd task per running instance.
    watch: Arc<watch::Watch>,
}

fn other(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let context = context.into();
    move |source| RuntimeError::Other { context, source }
}

impl LocalRuntime {
    pub fn open(home: &Path) -> Result<LocalRuntime, RuntimeError> {
        // Absolute, so the paths recorded in an instance's state (its log, its root) mean
        // the same to a graven started elsewhere, and the shim need not keep our cwd.
        let home = &std::path::absolute(home).map_err(other("resolving graven's home"))?;
        make_home(home)?;
        let store = Store::open(home)?;
        for dir in ["instances", "volumes", "rootfs", SCRATCH] {
            private_dir(&home.join(dir))?;
        }
        Ok(LocalRuntime {
            home: home.to_owned(),
            store,
            watch: watch::Watch::new(),
        })
    }

    /// Where an instance's files are (its log stays after `remove`).
    fn dir_of(&self, id: &InstanceId) -> PathBuf {
        self.home.join("instances").join(&id.0)
    }

    fn instance_dir(&self, id: &InstanceId) -> Result<PathBuf, RuntimeError> {
        let valid = !id.0.is_empty() && id.0.bytes().all(|b| b.is_ascii_alphanumeric());
        let dir = self.dir_of(id);
        if valid && dir.join(state::STATE).is_file() {
            Ok(dir)
        } else {
            Err(RuntimeError::UnknownInstance { id: id.clone() })
        }
    }

    /// `load` for stopping: an instance whose directory is gone may still run, and is stopped
    /// as an orphan before it is reported unknown.
    fn load_or_stop_orphan(&self, id: &InstanceId) -> Result<(PathBuf, State), RuntimeError> {
        let loaded = self.load(id);
        if let Err(RuntimeError::UnknownInstance { .. }) = &loaded {
            let instances = self.home.join("instances");
            orphans::stop(&orphans::find(&instances, Some(&id.0)));
        }
        loaded
    }

    fn load(&self, id: &InstanceId) -> Result<(PathBuf, State), RuntimeError> {
        let dir = self.instance_dir(id)?;
        let state = state::load(&dir)?;
        Ok((dir, state))
    }

    /// The image store instances are started from.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether `image` is ready to start instances from without unpacking it first.
    pub fn is_prepared(&self, image: &Digest) -> bool {
        rootfs::is_unpacked(&self.home, image)
    }

    /// Where the log store is: the home's, beside the instances.
    pub fn home(&self) -> &Path {
        &self.home
    }

    fn image(&self, digest: &Digest) -> Result<crate::store::Image, RuntimeError> {
        self.store.image(digest).map_err(|e| match e {
            StoreError::MissingBlob { .. } | StoreError::UnknownImage { .. } => {
                RuntimeError::UnknownImage {
                    reference: digest.to_string(),
                }
            }
            other => other.into(),
        })
    }

    /// [`Runtime::prepare`] for a caller without an async runtime.
    pub fn prepare_blocking(
        &self,
        digest: &Digest,
    ) -> Result<(crate::store::Image, PathBuf), RuntimeError> {
        let _lock = rootfs::start_lock(&self.home, false)?;
        self.prepare_locked(digest)
    }

    /// `prepare_blocking` for a caller that holds the start lock.
    fn prepare_locked(
        &self,
        digest: &Digest,
    ) -> Result<(crate::store::Image, PathBuf), RuntimeError> {
        let image = self.image(digest)?;
        let root = rootfs::ensure(&self.store, &self.home, &image)?;
        Ok((image, root))
    }

    /// [`Runtime::start`] for a caller without an async runtime: `graven run -d` starts an
    /// instance and exits, and a thread pool would only add to its start time.
    pub fn start_blocking(&self, spec: InstanceSpec) -> Result<Instance, RuntimeError> {
        spec.validate()?;
        // Held until the instance's state names its image, so gc never removes the root
        // under a start (rootfs.rs).
        let _lock = rootfs::start_lock(&self.home, false)?;
        let (image, root) = self.prepare_locked(&spec.image)?;
        let config = &image.config.config;
        let args = super::settings::compose_command(
            config.entrypoint.as_deref(),
            config.cmd.as_deref(),
            spec.entrypoint.as_deref(),
            spec.command.as_deref(),
        );
        if args.first().is_none_or(|a| a.is_empty()) {
            return Err(RuntimeError::NoCommand {
                image: spec.image.clone(),
            });
        }
        let mut env: BTreeMap<String, String> = config
            .env
            .iter()
            .filter_map(|e| e.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        env.extend(spec.env.clone());
        env.extend(spec.secret_env.0.clone());
        env.entry("PATH".to_owned())
            .or_insert_with(|| DEFAULT_PATH.to_owned());
        check_entrypoint(&root, &args[0], &env["PATH"]).map_err(|path| {
            RuntimeError::MissingEntrypoint {
                image: spec.image.clone(),
                path,
            }
        })?;
        // Read inside the image's root: its `etc/passwd -> /etc/shadow` is its own file.
        let read = |p: &str| sandbox::root::read_text(&root, p);
        let bad_user = |error: user::UserError| {
            let user = spec
                .user
                .clone()
                .or(config.user.clone())
                .unwrap_or_default();
            let image = spec.image.clone();
            match error {
                user::UserError::UnknownName { .. } => RuntimeError::UnknownUser { user, image },
                user::UserError::InvalidId { .. } => RuntimeError::BadUser {
                    user,
                    image,
                    reason: error.to_string(),
                },
            }
        };
        let passwd = read("etc/passwd");
        let (uid, gid) = choose_user(
            spec.user.as_deref(),
            config.user.as_deref(),
            &passwd,
            &read("etc/group"),
        )
        .map_err(bad_user)?;
        // As Docker does, a workload gets its user's home unless its environment says one.
        env.entry("HOME".to_owned())
            .or_insert_with(|| user::home_of(uid, &passwd));
        // What really runs (rootless: the one mapped id) is what is recorded and used.
        let (uid, gid) = sandbox::identity(uid, gid).map_err(bad_user)?;
        let stop_signal = parse_signal(
            spec.stop_signal
                .as_deref()
                .or(config.stop_signal.as_deref())
                .unwrap_or("SIGTERM"),
        )
        .ok_or_else(|| RuntimeError::Sandbox {
            id: InstanceId(String::new()),
            message: format!(
                "unknown stop signal {:?}",
                spec.stop_signal.clone().or(config.stop_signal.clone())
            ),
        })?;
        let cwd = config
            .working_dir
            .clone()
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "/".to_owned());
        // A network of its own: the instance listens on its port, whatever other instances
        // do; on the host's, on a free port of the host's.
        let private = spec.network == NetworkMode::Private && net::available();
        // Rootless, a user-mode network instead: reached at a free port of the host's
        // loopback that pasta forwards to the instance's.
        let user_mode = spec.network == NetworkMode::Private
            && !private
            && sandbox::rootless()
            && usernet::available().is_ok();
        let port = if private || user_mode {
            spec.port.or(spec.host_port).unwrap_or(DEFAULT_PORT)
        } else {
            pick_port(spec.host_port)?
        };
        let user_network = if user_mode {
            Some(usernet::UserNet {
                host_port: pick_port(None)?,
                port,
                outbound: spec.outbound,
            })
        } else {
            None
        };
        // Only where its resolv.conf names graven's server (`names::files`).
        let host_reach = match spec.dns.as_ref().filter(|d| d.loopback_port.is_some()) {
            Some(dns) if user_mode => usernet::HostReach {
                dns_port: dns.loopback_port,
                routes: dns.routes.clone(),
            },
            _ => usernet::HostReach::default(),
        };
        env.insert("PORT".to_owned(), port.to_string());
        let mut binds = self.volume_binds(&spec, (uid, gid))?;
        let anonymous: Vec<String> =
            super::settings::uncovered_volumes(&config.volumes, &spec.volumes, &spec.tmpfs)
                .into_iter()
                .map(str::to_owned)
                .collect();
        // An image's VOLUME is its author's word: held to a volume's rules before anything is
        // made (the sandbox resolves it inside the root all the same).
        for path in &anonymous {
            let volume = super::VolumeMount {
                name: "anonymous".to_owned(),
                path: path.clone(),
            };
            volume.validate().map_err(|e| RuntimeError::BadVolume {
                name: format!("the image's VOLUME {path}"),
                reason: e.to_string(),
            })?;
        }
        // Everything that can be refused has been checked: now the instance is made.
        let id = InstanceId(format!("{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff));
        let dir = self.dir_of(&id);
        owner_only_dir(&dir).map_err(other(format!("creating {}", dir.display())))?;
        let network = match private.then(|| net::take(&dir, spec.outbound)).transpose() {
            Ok(network) => network,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(other("making the instance's network")(
                    std::io::Error::other(error),
                ));
            }
        };
        let leased = network.as_ref().map(|network| network.ip);
        let result = anonymous_volumes(&dir, &anonymous, (uid, gid)).and_then(|extra| {
            binds.extend(extra);
            // Its own resolv.conf and hosts: the host's name neither its resolvers nor it. On
            // the host's network or a user-mode one, a resolv.conf naming graven's server
            // where that reaches it.
            let kind = match (&network, &user_network) {
                (Some(network), _) => names::Network::Own(network.ip),
                (None, Some(_)) => names::Network::User,
                (None, None) => names::Network::Host,
            };
            let files = names::files(spec.dns.as_ref(), kind, &id.0);
            let names = names::binds(&dir, &root, files)
                .map_err(other("writing the instance's resolv.conf and hosts"))?;
            binds.extend(names);
            let resolved = Resolved {
                root,
                args,
                env,
                uid,
                gid,
                binds,
                port,
                stop_signal,
                cwd,
                network,
                user_network,
                host_reach,
            };
            self.launch(&id, &dir, &spec, resolved)
        });
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
            if let Some(ip) = leased {
                net::release(ip);
            }
        }
        result
    }

    fn launch(
        &self,
        id: &InstanceId,
        dir: &Path,
        spec: &InstanceSpec,
        resolved: Resolved,
    ) -> Result<Instance, RuntimeError> {
        let mut warnings = Vec::new();
        if spec.network == NetworkMode::Private
            && resolved.network.is_none()
            && resolved.user_network.is_none()
        {
            let why = match usernet::available() {
                Ok(()) => "that needs root".to_owned(),
                Err(reason) => format!("without root, a user-mode network: {reason}"),
            };
            warnings.push(format!(
                "no network of its own ({why}): the instance shares the host's network"
            ));
        }
        // Every instance has a process limit, the default one unless another is given, so a
        // fork bomb stops at it; memory and CPU only when asked for. A limit of 0 is none at
        // all, and no cgroup: on cgroup v1 joining one waits for an RCU grace period (about
        // 11 ms here), which a start that must be fast may not want to pay.
        let limits = super::Limits {
            pids: Some(spec.limits.pids.unwrap_or(super::DEFAULT_PIDS)).filter(|&max| max != 0),
            ..spec.limits.clone()
        };
        let cgroups = match cgroup::create(&id.0, &limits) {
            Ok(groups) => groups,
            Err(reason) => {
                warnings.push(format!("resource limits are not enforced: {reason}"));
                cgroup::Cgroups::default()
            }
        };
        let env: Vec<String> = resolved
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        // The state, which every graven command and `exec` read, has a secret's key only;
        // its value reaches the shim in memory (`shim::start`), never a file.
        let recorded_env: Vec<String> = resolved
            .env
            .iter()
            .map(|(k, v)| {
                if spec.secret_env.0.contains_key(k) {
                    format!("{k}={}", super::SecretEnv::REDACTED)
                } else {
                    format!("{k}={v}")
                }
            })
            .collect();

        let scratch = self.home.join(SCRATCH);
        let request = ShimRequest {
            spec: SandboxSpec {
                rootfs: resolved.root,
                writable_root: false,
                args: resolved.args,
                env,
                cwd: resolved.cwd.clone(),
                uid: resolved.uid,
                gid: resolved.gid,
                hostname: id.0.clone(),
                binds: resolved.binds,
                tmp_bytes: spec.limits.tmp_bytes.unwrap_or(0),
                tmpfs: spec
                    .tmpfs
                    .iter()
                    .map(|t| sandbox::Tmpfs {
                        target: t.path.clone(),
                        bytes: t.bytes,
                    })
                    .collect(),
                exec_tmp: spec.exec_tmp,
                build_step: None,
            },
            options: Options {
                scratch: Some(scratch),
                cgroups: cgroups.procs(),
                network: resolved.network.map(|n| n.join()),
                new_network: resolved.user_network.is_some(),
            },
            log: retention::target(&self.home, id, &spec.labels, &spec.limits)?,
            volume_locks: spec
                .volumes
                .iter()
                .map(|v| volume_lock::Claim {
                    volume: v.name.clone(),
                    path: volume_lock::path(&self.home, &v.name),
                    id: id.clone(),
                    instance: spec.labels.get("instance").cloned(),
                })
                .collect(),
        };
        let initial = State {
            id: id.clone(),
            image: spec.image.clone(),
            labels: spec.labels.clone(),
            status: InstanceStatus::Created,
            address: match (resolved.network, resolved.user_network) {
                (Some(network), _) => SocketAddr::from((network.ip, resolved.port)),
                (None, Some(user)) => SocketAddr::from(([127, 0, 0, 1], user.host_port)),
                (None, None) => SocketAddr::from(([127, 0, 0, 1], resolved.port)),
            },
            network: resolved.network,
            user_network: resolved.user_network,
            pasta: None,
            started_at_ms: super::now_ms(),
            tainted: false,
            warnings,
            stop_signal: resolved.stop_signal,
            creator: Proc::of(std::process::id()),
            shim: None,
            workload: None,
            cgroups: cgroups.clone(),
            uid: resolved.uid,
            gid: resolved.gid,
            env: recorded_env,
            cwd: resolved.cwd,
            volumes: spec.volumes.iter().map(|v| v.name.clone()).collect(),
            allow_exec: spec.allow_exec.clone(),
            drift: None,
        };
        state::save(dir, &initial)?;
        if let Err(message) = shim::start(dir, &request) {
            cgroups.remove();
            return Err(RuntimeError::Sandbox {
                id: id.clone(),
                message,
            });
        }
        let mut state = state::load(dir)?;
        if let Some(user) = resolved.user_network {
            // The workload runs in its namespace: pasta is attached to it now, from here (the
            // shim is inside the instance's user namespace and cannot bind the host's port).
            let attached = state
                .workload
                .ok_or_else(|| "the workload ended before its network was attached".to_owned())
                .and_then(|workload| {
                    usernet::attach(
                        workload.pid,
                        &user,
                        &resolved.host_reach,
                        &dir.join(PASTA_PID),
                    )
                    .map_err(|e| e.to_string())
                });
            let pasta = match attached {
                Ok(pasta) => pasta,
                Err(message) => {
                    Self::signal(&state, libc::SIGKILL);
                    return Err(RuntimeError::Sandbox {
                        id: id.clone(),
                        message,
                    });
                }
            };
            state = state::update(dir, |s| {
                s.pasta = Some(pasta);
                s.clone()
            })?;
            // The workload may have ended meanwhile, its shim finding no pasta to stop.
            if state.observed_status().is_exited() {
                usernet::stop(pasta);
            }
        }
        Ok(self.instance(dir, &state))
    }

    fn volume_binds(
        &self,
        spec: &InstanceSpec,
        owner: (u32, u32),
    ) -> Result<Vec<Bind>, RuntimeError> {
        let volumes = self.home.join("volumes");
        spec.volumes
            .iter()
            .map(|volume| {
                let source = volumes.join(&volume.name);
                if let Ok(meta) = std::fs::symlink_metadata(&source)
                    && !meta.is_dir()
                {
                    return Err(RuntimeError::BadVolume {
                        name: volume.name.clone(),
                        reason: format!("{} is not a directory", source.display()),
                    });
                }
                let created = !source.exists();
                if created {
                    std::fs::create_dir_all(&source)
                        .map_err(other(format!("creating volume {}", source.display())))?;
                }
                // A new volume belongs to the instance's user, who must write it. Rootless,
                // it already does: graven's user is the instance's user.
                if created && !sandbox::rootless() {
                    std::os::unix::fs::chown(&source, Some(owner.0), Some(owner.1)).map_err(
                        other(format!(
                            "giving volume {} to {}:{}",
                            source.display(),
                            owner.0,
                            owner.1
                        )),
                    )?;
                }
                Ok(Bind {
                    source,
                    target: volume.path.clone(),
                    readonly: false,
                })
            })
            .collect()
    }

    fn instance(&self, _dir: &Path, state: &State) -> Instance {
        let status = state.observed_status();
        Instance {
            id: state.id.clone(),
            image: state.image.clone(),
            labels: state.labels.clone(),
            status,
            address: Some(state.address),
            // A PID of a process that is gone may already be someone else's.
            pid: state
                .workload
                .filter(|_| !status.is_exited())
                .map(|p| p.pid),
            started_at_ms: state.started_at_ms,
            tainted: state.tainted,
            log: retention::target(&self.home, &state.id, &state.labels, &Default::default())
                .ok()
                .map(|t| t.dir.join(crate::logs::Stream::Stdout.file())),
            warnings: state.warnings.clone(),
            drift: state.drift.clone(),
        }
    }

    fn inspect_blocking(&self, id: &InstanceId) -> Result<Instance, RuntimeError> {
        let (dir, state) = self.load(id)?;
        Ok(self.instance(&dir, &state))
    }

    /// [`Runtime::list`] for a caller without an async runtime.
    pub fn list_blocking(&self) -> Result<Vec<Instance>, RuntimeError> {
        shim::reap();
        let dir = self.home.join("instances");
        // Instances whose directory was deleted cannot be listed; they are stopped instead
        // (a few times a minute at most: it walks /proc).
        orphans::sweep(&dir);
        let entries =
            std::fs::read_dir(&dir).map_err(other(format!("listing {}", dir.display())))?;
        let mut instances = Vec::new();
        for entry in entries {
            let entry = entry.map_err(other(format!("listing {}", dir.display())))?;
            let id = InstanceId(entry.file_name().to_string_lossy().into_owned());
            match self.inspect_blocking(&id) {
                Ok(instance) => {
                    if let (false, Some(pid)) = (instance.status.is_exited(), instance.pid) {
                        self.watch.watch(&instance.id, pid);
                    }
                    instances.push(instance)
                }
                // A state graven cannot read right now (out of descriptors or memory, an I/O
                // error) fails the whole listing: a listing without that instance would tell
                // the controller a live instance is gone, and it would replace it.
                Err(error) if unreadable_now(&error) => return Err(error),
                // A removed instance leaves only its log behind; a start in progress has no
                // state yet; a stray file is no instance. None of them is an instance.
                Err(_) => {}
            }
        }
        instances.sort_by_key(|i| (i.started_at_ms, i.id.clone()));
        Ok(instances)
    }

    /// Sends `signal` to the instance: to the shim, which passes it on to the workload; but
    /// SIGKILL to the workload itself, which ends its whole namespace and leaves the shim to
    /// record the exit.
    fn signal(state: &State, signal: i32) {
        let target = if signal == libc::SIGKILL {
            state.workload
        } else {
            state.shim
        };
        if let Some(proc) = target
            && proc.alive()
        {
            // SAFETY: kill has no memory effects; `alive` just checked the PID is still the
            // recorded process (start time), so no stranger is signalled.
            unsafe { libc::kill(proc.pid as i32, signal) };
        }
    }

    /// Waits until the instance is observed exited, up to `deadline`.
    async fn wait_exited(&self, id: &InstanceId, deadline: Duration) -> Result<bool, RuntimeError> {
        let end = tokio::time::Instant::now() + deadline;
        loop {
            let Some((_, state)) = self.load_unless_removed(id)? else {
                return Ok(true);
            };
            if state.observed_status().is_exited() {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= end {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The instance's dir and state, or `None` when it was removed (by another graven, or the
    /// controller, which removes the instances it sees exited) while this one waited on it.
    fn load_unless_removed(
        &self,
        id: &InstanceId,
    ) -> Result<Option<(PathBuf, State)>, RuntimeError> {
        match self.load(id) {
            Ok(loaded) => Ok(Some(loaded)),
            Err(RuntimeError::UnknownInstance { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Waits until the shim recorded the exit (or is gone), so the reported status says how
    /// the instance ended; records "vanished" when no shim is left to do it. `last` is the
    /// state seen before: when the instance is removed meanwhile, it is reported from that,
    /// as exited (it must have been, to be removed).
    async fn settle(
        &self,
        id: &InstanceId,
        last: (PathBuf, State),
    ) -> Result<Instance, RuntimeError> {
        let end = tokio::time::Instant::now() + KILL_WAIT;
        let (mut dir, mut state) = last;
        loop {
            match self.load_unless_removed(id)? {
                Some(loaded) => (dir, state) = loaded,
                None => return Ok(self.removed(&dir, state)),
            }
            let shim_alive = state.shim.is_some_and(|s| s.alive());
            if state.status.is_exited() || !shim_alive || tokio::time::Instant::now() >= end {
                if !state.status.is_exited() {
                    let observed = state.observed_status();
                    if observed.is_exited() {
                        let recorded = state::update(&dir, |s| {
                            if !s.status.is_exited() {
                                s.status = observed;
                            }
                        });
                        if recorded.is_err() && self.load_unless_removed(id)?.is_none() {
                            return Ok(self.removed(&dir, state));
                        }
                        recorded?;
                    }
                }
                return match self.load_unless_removed(id)? {
                    Some((dir, state)) => Ok(self.instance(&dir, &state)),
                    None => Ok(self.removed(&dir, state)),
                };
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until an exited instance's shim has logged the last of its output and recorded
    /// how it ended (at most a few seconds). The instance counts as exited as soon as its
    /// workload is gone; its log is complete only after this.
    pub async fn logged(&self, id: &InstanceId) -> Result<Instance, RuntimeError> {
        let loaded = self.load(id)?;
        self.settle(id, loaded).await
    }

    /// An instance removed while this graven waited on it, from the last state it saw.
    fn removed(&self, dir: &Path, mut state: State) -> Instance {
        if !state.status.is_exited() {
            state.status = InstanceStatus::Exited {
                code: None,
                signal: None,
            };
        }
        self.instance(dir, &state)
    }

    /// Break-glass: runs `args` inside the running instance with its user and environment,
    /// and marks the instance tainted first (it must be replaced). Blocking.
    pub fn exec(&self, id: &InstanceId, args: Vec<String>) -> Result<ExitStatus, RuntimeError> {
        let (dir, state) = self.load(id)?;
        let status = state.observed_status();
        let Some(workload) = state.workload.filter(|_| !status.is_exited()) else {
            return Err(RuntimeError::WrongState {
                id: id.clone(),
                status,
                action: "entered",
            });
        };
        state::update(&dir, |s| s.tainted = true)?;
        let request = sandbox::ExecRequest {
            pid: workload.pid,
            args,
            env: state.env.clone(),
            cwd: state.cwd.clone(),
            uid: state.uid,
            gid: state.gid,
            cgroups: state.cgroups.procs(),
        };
        sandbox::exec(
            &request,
            Stdio::inherit(),
            Stdio::inherit(),
            Stdio::inherit(),
        )
        .map_err(|e| RuntimeError::Sandbox {
            id: id.clone(),
            message: e.to_string(),
        })
    }

    fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(LocalRuntime) -> Result<T, RuntimeError> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, RuntimeError>> + Send + 'static {
        let this = self.clone();
        async move {
            tokio::task::spawn_blocking(move || work(this))
                .await
                .map_err(|e| other("a runtime task failed")(std::io::Error::other(e)))?
        }
    }
}

impl LocalRuntime {
    /// [`Runtime::check_drift`] for a caller without an async runtime (`graven drift
    /// --check`). Runs on the calling thread, at idle CPU and I/O priority.
    pub fn check_drift_blocking(
        &self,
        ids: &[InstanceId],
        check: super::DriftCheck,
    ) -> Result<Vec<(InstanceId, super::Drift)>, RuntimeError> {
        drift::idle_priority();
        let mut running = Vec::new();
        for id in ids {
            let Ok((dir, state)) = self.load(id) else {
                continue;
            };
            if state.drift.is_none() && !state.observed_status().is_exited() {
                running.push((dir, state));
            }
        }
        let mut found = Vec::new();
        let images: std::collections::BTreeSet<Digest> =
            running.iter().map(|(_, s)| s.image.clone()).collect();
        for image in images {
            if let Some(change) = self.verify_root(&image, check.read_per_second)? {
                found.extend(self.replace_root(&image, &change)?);
            }
        }
        for (dir, state) in &running {
            let (Some(workload), true) =
                (state.workload, found.iter().all(|(id, _)| *id != state.id))
            else {
                continue;
            };
            let root = rootfs::unpacked_path(&self.home, &state.image);
            if let Some(change) = drift::foreign_program(
                &root,
                &state.cgroups.procs(),
                workload.pid,
                &state.allow_exec,
            ) && self.record(dir, &state.id, &change)?
            {
                found.push((state.id.clone(), change));
            }
        }
        Ok(found)
    }

    /// Verifies the root of `image` against its manifest; a tampered one is moved aside and
    /// unpacked afresh before this returns. A root without a manifest (unpacked by a graven
    /// from before them) gets one made from the image's layers, never from the tree.
    fn verify_root(
        &self,
        image: &Digest,
        read_per_second: u64,
    ) -> Result<Option<super::Drift>, RuntimeError> {
        // Shared: gc may not move the root away while it is read; starts go on.
        let _lock = rootfs::start_lock(&self.home, false)?;
        let root = rootfs::unpacked_path(&self.home, image);
        if !root.is_dir() {
            return Ok(None);
        }
        let io = |what: &str| other(format!("{what} {}", root.display()));
        let manifest = match drift::read_manifest(&root).map_err(io("reading the manifest of"))? {
            Some(manifest) => manifest,
            None => rootfs::manifest_from_layers(&self.store, &self.home, &self.image(image)?)?,
        };
        let mut budget = drift::Budget::new(read_per_second);
        drift::verify(&root, &manifest, &mut budget).map_err(io("verifying"))
    }

    /// Moves the tampered root of `image` aside, records `change` on every running instance
    /// of the image and unpacks the root afresh, all under the start lock held exclusively:
    /// no start is half done, so every instance of the image runs on the tampered root, and
    /// none starts on it after.
    fn replace_root(
        &self,
        image: &Digest,
        change: &super::Drift,
    ) -> Result<Vec<(InstanceId, super::Drift)>, RuntimeError> {
        let _lock = rootfs::start_lock(&self.home, true)?;
        let root = rootfs::unpacked_path(&self.home, image);
        if root.is_dir() {
            let aside = root.with_file_name(format!(
                "{}{}-{}",
                drift::TAMPERED,
                image.hex(),
                fastrand::u64(..)
            ));
            std::fs::rename(&root, &aside)
                .map_err(other(format!("moving {} aside", root.display())))?;
            let _ = std::fs::remove_file(drift::manifest_path(&root));
        }
        // Recorded before the fresh unpack, so the controller condemns at once and launches
        // the replacements, whose starts wait for the lock, hence for the fresh root.
        let dir = self.home.join("instances");
        let mut found = Vec::new();
        let entries =
            std::fs::read_dir(&dir).map_err(other(format!("listing {}", dir.display())))?;
        for entry in entries.flatten() {
            let id = InstanceId(entry.file_name().to_string_lossy().into_owned());
            if let Ok((dir, state)) = self.load(&id)
                && state.image == *image
                && !state.observed_status().is_exited()
                && self.record(&dir, &id, change)?
            {
                found.push((id, change.clone()));
            }
        }
        rootfs::ensure(&self.store, &self.home, &self.image(image)?)?;
        Ok(found)
    }

    /// Records `change` as the instance's drift unless it has one; true when it is new.
    fn record(
        &self,
        dir: &Path,
        id: &InstanceId,
        change: &super::Drift,
    ) -> Result<bool, RuntimeError> {
        let new = state::update(dir, |s| {
            let new = s.drift.is_none();
            if new {
                s.drift = Some(change.clone());
            }
            new
        })?;
        if new {
            self.watch
                .notify(super::InstanceChange::Drifted { id: id.clone() });
        }
        Ok(new)
    }
}

impl Runtime for LocalRuntime {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn probe(
        &self,
        id: &InstanceId,
        command: &[String],
        timeout: Duration,
    ) -> Result<super::ProbeOutput, RuntimeError> {
        let (id, command) = (id.clone(), command.to_vec());
        self.blocking(move |rt| rt.probe_blocking(&id, command, timeout))
            .await
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<crate::runtime::InstanceChange> {
        self.watch.subscribe()
    }

    async fn prepare(&self, image: &Digest) -> Result<(), RuntimeError> {
        let image = image.clone();
        self.blocking(move |rt| rt.prepare_blocking(&image).map(|_| ()))
            .await
    }

    async fn start(&self, spec: InstanceSpec) -> Result<Instance, RuntimeError> {
        let instance = self.blocking(move |rt| rt.start_blocking(spec)).await?;
        if let Some(pid) = instance.pid {
            self.watch.watch(&instance.id, pid);
        }
        Ok(instance)
    }

    async fn inspect(&self, id: &InstanceId) -> Result<Instance, RuntimeError> {
        self.inspect_blocking(id)
    }

    async fn list(&self) -> Result<Vec<Instance>, RuntimeError> {
        self.list_blocking()
    }

    async fn check_drift(
        &self,
        ids: &[InstanceId],
        check: super::DriftCheck,
    ) -> Result<Vec<(InstanceId, super::Drift)>, RuntimeError> {
        // A thread of its own: its idle priority must not stay with a pool's thread.
        let (this, ids) = (self.clone(), ids.to_vec());
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("graven-drift".to_owned())
            .spawn(move || {
                let _ = tx.send(this.check_drift_blocking(&ids, check));
            })
            .map_err(other("starting a drift check"))?;
        rx.await
            .map_err(|e| other("a drift check failed")(std::io::Error::other(e)))?
    }

    async fn stop(&self, id: &InstanceId, grace: Duration) -> Result<Instance, RuntimeError> {
        let (dir, state) = self.load_or_stop_orphan(id)?;
        if state.observed_status().is_exited() {
            return self.settle(id, (dir, state)).await;
        }
        state::update(&dir, |s| {
            if s.status.can_become(InstanceStatus::Stopping) {
                s.status = InstanceStatus::Stopping;
            }
        })?;
        Self::signal(&state, state.stop_signal);
        if !self.wait_exited(id, grace).await? {
            Self::signal(&state, libc::SIGKILL);
        }
        self.settle(id, (dir, state)).await
    }

    async fn kill(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        let (dir, state) = self.load_or_stop_orphan(id)?;
        Self::signal(&state, libc::SIGKILL);
        self.settle(id, (dir, state)).await.map(|_| ())
    }

    async fn remove(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        let (dir, state) = self.load(id)?;
        refuse_unless_exited(id, &state)?;
        // The workload is gone, but its shim may still be logging the last of its output.
        if state.shim.is_some_and(|s| s.alive()) {
            self.settle(id, (dir.clone(), state.clone())).await?;
        }
        test_hold(HOLD_REMOVE_ENV);
        // gc tells a removed instance's directory by its record: it must not look while the
        // state is gone and the record not yet written.
        let _lock = rootfs::start_lock(&self.home, false)?;
        // Seen exited once more, under the instance's own lock, held until its directory is
        // gone. An instance whose starter died before its shim recorded anything looks
        // exited, yet that shim may still be launching the workload: either it recorded the
        // workload first (then the instance runs and is not removed), or its record finds
        // the directory gone, and it ends, its workload with it (PDEATHSIG).
        let _state_lock = state::lock(&dir)?;
        let state = state::load(&dir)?;
        refuse_unless_exited(id, &state)?;
        state.cgroups.remove();
        if let Some(pasta) = state.pasta {
            usernet::stop(pasta);
        }
        // All of it: the instance's output is in the log store, which outlives it.
        std::fs::remove_dir_all(&dir).map_err(other(format!("removing {}", dir.display())))?;
        // Its address is free once its state is gone (`net::sweep` tells by that too).
        if let Some(network) = state.network {
            net::release(network.ip);
            net::refill_in_background();
        }
        // Its service's logs, within their bound.
        if let Ok(target) = retention::target(&self.home, id, &state.labels, &Default::default())
            && let Some(group) = target.dir.parent()
        {
            // A shim killed before its workload ended left the data files append-only, which
            // nobody could then delete (not even root): nothing writes them any more.
            crate::logs::ingest::unseal(&target.dir);
            let policy = crate::logs::retention::policy_of(group);
            let _ = crate::logs::retention::enforce(group, policy, false);
        }
        Ok(())
    }
}

/// What a start resolved from its spec and image before making anything.
struct Resolved {
    root: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    uid: u32,
    gid: u32,
    binds: Vec<Bind>,
    port: u16,
    stop_signal: i32,
    cwd: String,
    network: Option<net::Attached>,
    user_network: Option<usernet::UserNet>,
    /// What of the host's loopback a user-mode instance's pasta forwards to.
    host_reach: usernet::HostReach,
}

/// Checks that the command exists in the image: an absolute path, or a name on `$PATH`.
fn check_entrypoint(root: &Path, program: &str, path: &str) -> Result<(), String> {
    // Looked up inside the image's root, as the sandbox's exec will: an image's symlink says
    // nothing about the host's files.
    let exists = |p: &str| sandbox::root::exists(root, p);
    if program.contains('/') {
        return if exists(program) {
            Ok(())
        } else {
            Err(program.to_owned())
        };
    }
    if path
        .split(':')
        .any(|dir| !dir.is_empty() && exists(&format!("{dir}/{program}")))
    {
        Ok(())
    } else {
        Err(program.to_owned())
    }
}

/// A fixed port must be free now; otherwise the kernel picks a free one.
fn pick_port(fixed: Option<u16>) -> Result<u16, RuntimeError> {
    let port = fixed.unwrap_or(0);
    match TcpListener::bind(("127.0.0.1", port)) {
        Ok(listener) => listener
            .local_addr()
            .map(|a| a.port())
            .map_err(other("reading a free port")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            Err(RuntimeError::PortInUse { port })
        }
        Err(e) => Err(other(format!("checking port {port}"))(e)),
    }
}

/// `SIGTERM`, `TERM` or `15`.
pub fn parse_signal(text: &str) -> Option<i32> {
    if let Ok(n) = text.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let name = text.trim().to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    Some(match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "WINCH" => libc::SIGWINCH,
        "ALRM" => libc::SIGALRM,
        _ => return None,
    })
}

/// Makes graven's home owner-only (0700), or makes an existing one of this user's so. It
/// holds image content (unpacked roots keep their setuid-root files, volumes what uid-0
/// instances wrote) that no other user of the host may reach, whoever made the home first
/// and whichever command (`run`, `bake`, `up`) came first.
pub fn make_home(home: &Path) -> Result<(), RuntimeError> {
    if let Some(parent) = home.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(other(format!("creating {}", parent.display())))?;
    }
    private_dir(home)
}

/// Creates `dir` 0700 whatever the umask (it must not exist yet).
fn owner_only_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(dir)
}

/// Creates `dir` 0700 (not through the umask), or takes group and other access away from an
/// existing one this user owns. One owned by another user is left as it is.
fn private_dir(dir: &Path) -> Result<(), RuntimeError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(other(format!("creating {}", dir.display()))(e)),
    }
    // The umask may have taken bits away, never added: only a dir that was there is looked at.
    let meta = std::fs::metadata(dir).map_err(other(format!("reading {}", dir.display())))?;
    if meta.mode() & 0o077 != 0 && meta.uid() == rustix::process::geteuid().as_raw() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(other(format!("making {} owner-only", dir.display())))?;
    }
    Ok(())
}

/// The identity an instance runs as, as with Docker: the `user` asked for, else the image's
/// USER, else root. Root is uid 0 with no capability at all, no_new_privs and seccomp
/// (docs/security.md says what that can and cannot do).
fn choose_user(
    explicit: Option<&str>,
    image: Option<&str>,
    passwd: &str,
    group: &str,
) -> Result<(u32, u32), user::UserError> {
    user::resolve(explicit.or(image).unwrap_or(""), passwd, group)
}

/// Makes an instance's anonymous volumes, one per image VOLUME that no volume or tmpfs of its
/// covers (`docker run` makes one each too), in its directory (`volumes/N`), so they go with
/// the instance; each belongs to the instance's user, who must write it.
fn anonymous_volumes(
    dir: &Path,
    paths: &[String],
    owner: (u32, u32),
) -> Result<Vec<Bind>, RuntimeError> {
    paths
        .iter()
        .enumerate()
        .map(|(i, path)| {
            let source = dir.join("volumes").join(i.to_string());
            std::fs::create_dir_all(&source)
                .map_err(other(format!("creating volume {}", source.display())))?;
            if !sandbox::rootless() {
                std::os::unix::fs::chown(&source, Some(owner.0), Some(owner.1))
                    .map_err(other(format!("giving {} to its user", source.display())))?;
            }
            Ok(Bind {
                source,
                target: path.clone(),
                readonly: false,
            })
        })
        .collect()
}

/// Whether `error` says an instance's state could not be read now, rather than that there is
/// no state to read (missing, not a directory) or that what is there is not a state.
fn unreadable_now(error: &RuntimeError) -> bool {
    let RuntimeError::Other { source, .. } = error else {
        return false;
    };
    source.raw_os_error().is_some()
        && !matches!(
            source.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
        )
}

#[cfg(test)]
mod tests {

    /// Docker runs an image as its USER, root included, and as root when it says none;
    /// `--user` replaces it. (graven used to run root and nothing as 65534.)
    #[test]
    fn an_image_runs_as_its_user_root_or_nothing_included() {
        let passwd = "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/:/bin/sh\n";
        let check = |explicit: Option<&str>, image: Option<&str>, expected: (u32, u32)| {
            assert_eq!(
                choose_user(explicit, image, passwd, "").unwrap(),
                expected,
                "{explicit:?} {image:?}"
            );
        };
        check(None, None, (0, 0));
        check(None, Some("root"), (0, 0));
        check(None, Some("0:0"), (0, 0));
        check(None, Some("app"), (1000, 1001));
        check(Some("0"), Some("app"), (0, 0));
        check(Some("app"), Some("root"), (1000, 1001));
        assert!(choose_user(None, Some("ghost"), passwd, "").is_err());
        assert!(choose_user(Some("ghost"), None, passwd, "").is_err());
    }

    use super::*;

    /// Regression (issue 10, item 7's class): an instance whose state could not be read
    /// (EMFILE under a descriptor attack) was left out of the listing, and the controller
    /// took the live instance for gone. An unreadable state now fails the listing; a missing
    /// one (a removed instance's log dir) is still skipped.
    #[test]
    fn an_unreadable_state_fails_the_listing_instead_of_hiding_the_instance() {
        let home = tempfile::tempdir().unwrap();
        let runtime = LocalRuntime::open(home.path()).unwrap();
        let instances = home.path().join("instances");
        std::fs::create_dir_all(instances.join("removed")).unwrap();
        std::fs::write(instances.join("removed/log"), "").unwrap();
        assert!(runtime.list_blocking().unwrap().is_empty());
        // A state.json that is there but fails to read, as EMFILE would fail it: reading
        // /proc/self/mem at offset 0 (never mapped) fails with EIO.
        std::fs::create_dir_all(instances.join("live")).unwrap();
        std::os::unix::fs::symlink("/proc/self/mem", instances.join("live/state.json")).unwrap();
        let error = runtime.list_blocking().unwrap_err();
        assert!(error.to_string().contains("state.json"), "{error}");
    }

    #[test]
    fn signals() {
        let check =
            |text: &str, expected: Option<i32>| assert_eq!(parse_signal(text), expected, "{text}");
        check("SIGTERM", Some(15));
        check("term", Some(15));
        check("SIGQUIT", Some(3));
        check("9", Some(9));
        check("0", None);
        check("SIGNOPE", None);
    }
}
