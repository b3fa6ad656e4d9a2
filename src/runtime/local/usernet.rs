//! A user-mode network for rootless instances, through pasta (Debian's `passt` package):
//! graven without root cannot make a bridge or veth pairs, so each instance gets a network
//! namespace of its own inside its user namespace (the sandbox makes it, with loopback only),
//! and a pasta process attached to it carries its traffic: a port of the host's loopback,
//! chosen per instance, forwarded to the instance's port (what the proxy connects to), and
//! outbound connections made from the host's side (unless `outbound = false`).
//!
//! pasta is told to reach the host's loopback for the instance only where graven asks: the
//! instance's own 127.0.0.1:53 (UDP and TCP) forwarded to graven's DNS server on the host's
//! loopback, the ports of its app and environment's loopback routes (what their names
//! answer) forwarded to the same ports of the host's; no other port (`-T`/`-U` list only
//! those) and the gateway address not mapped to the host (`--no-map-gw`). It is started by the starter once the workload runs (the shim itself
//! is inside the instance's user namespace and could not bind the host's port), with no
//! descriptor of its starter's, and stopped by PID when the workload ends (by the shim) or
//! the instance is removed; its PID is in the instance's state.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use super::state::Proc;

/// The program, found on `PATH`.
const PASTA: &str = "pasta";

#[derive(Debug, thiserror::Error)]
pub enum UserNetError {
    #[error("running pasta for instance process {pid}: {source}")]
    Spawn { pid: u32, source: std::io::Error },
    #[error("pasta for instance process {pid} failed: {message}")]
    Failed { pid: u32, message: String },
}

/// An instance's user-mode network, as its state records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UserNet {
    /// The host loopback port forwarded to the instance's.
    pub host_port: u16,
    /// The instance's own port, in its namespace.
    pub port: u16,
    /// Whether the instance may reach beyond its namespace.
    pub outbound: bool,
}

/// What of the host's loopback a user-mode instance reaches, besides the port it is reached
/// at: not recorded (a restarted control plane adopts pasta as it runs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostReach {
    /// The port of graven's DNS server on the host's 127.0.0.1, which the instance's own
    /// 127.0.0.1:53 is forwarded to.
    pub dns_port: Option<u16>,
    /// Ports of the host's loopback the instance's own 127.0.0.1 forwards to, port for port.
    pub routes: Vec<u16>,
}

impl HostReach {
    /// pasta's `-T` (TCP) and `-U` (UDP) lists, from the instance's namespace to the host's:
    /// `none` when empty. The instance's own port and 53 are never a route's: pasta would
    /// take them from the workload, or from the DNS forward.
    fn forwards(&self, own_port: u16) -> (String, String) {
        let mut tcp: Vec<String> = Vec::new();
        let mut udp: Vec<String> = Vec::new();
        if let Some(port) = self.dns_port {
            tcp.push(format!("53:{port}"));
            udp.push(format!("53:{port}"));
        }
        let mut routes = self.routes.clone();
        routes.sort_unstable();
        routes.dedup();
        tcp.extend(
            routes
                .iter()
                .filter(|&&p| p != own_port && p != 53 && Some(p) != self.dns_port)
                .map(u16::to_string),
        );
        let list = |ports: Vec<String>| {
            if ports.is_empty() {
                "none".to_owned()
            } else {
                ports.join(",")
            }
        };
        (list(tcp), list(udp))
    }
}

/// Whether rootless instances can have a user-mode network here, or why not: pasta must be
/// installed, and `/dev/net/tun` open to this user (pasta's interface in the namespace is a
/// tap; udev makes the node 0666 on a stock Debian, a host without udev may leave it 0600).
pub fn available() -> Result<(), String> {
    let installed = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(PASTA).is_file()));
    if !installed {
        return Err("pasta is not installed (Debian's passt package)".to_owned());
    }
    let tun = "/dev/net/tun";
    rustix::fs::access(
        tun,
        rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK,
    )
    .map_err(|e| format!("pasta cannot open {tun} as this user ({e}; udev makes it 0666)"))
}

/// Attaches pasta to the network namespace of the workload `pid` and returns once it
/// forwards (pasta's first process exits when its daemon is ready). `pid_file` is where pasta
/// writes its daemon's PID.
pub fn attach(
    pid: u32,
    net: &UserNet,
    reach: &HostReach,
    pid_file: &Path,
) -> Result<Proc, UserNetError> {
    let (tcp, udp) = reach.forwards(net.port);
    let mut command = Command::new(PASTA);
    command
        .args([
            "--quiet",
            "--no-map-gw",
            "-T",
            &tcp,
            "-U",
            &udp,
            "-u",
            "none",
        ])
        .arg("-t")
        .arg(format!("127.0.0.1/{}:{}", net.host_port, net.port))
        .arg("--pid")
        .arg(pid_file);
    // Without its tap interface configured, the instance has loopback only: pasta still
    // forwards the port (it connects to the instance's loopback from inside), nothing leaves.
    if net.outbound {
        command.arg("--config-net");
    }
    command
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: close_range is async-signal-safe; it closes every descriptor but the standard
    // three, so pasta holds nothing of its starter's (a controller's sockets, a log).
    unsafe {
        command.pre_exec(|| {
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let output = command
        .output()
        .map_err(|source| UserNetError::Spawn { pid, source })?;
    if !output.status.success() {
        return Err(UserNetError::Failed {
            pid,
            message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    let failed = |message: String| UserNetError::Failed { pid, message };
    let text = std::fs::read_to_string(pid_file)
        .map_err(|e| failed(format!("reading {}: {e}", pid_file.display())))?;
    let daemon: u32 = text
        .trim()
        .parse()
        .map_err(|_| failed(format!("{} holds no PID: {text:?}", pid_file.display())))?;
    Proc::of(daemon).ok_or_else(|| failed(format!("pasta {daemon} ended at once")))
}

/// Stops an instance's pasta, when the very same process still runs (a reused PID is left
/// alone).
pub fn stop(pasta: Proc) {
    if pasta.alive() {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(pasta.pid as i32).expect("a PID is not 0"),
            rustix::process::Signal::TERM,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_reached_at_the_dns_server_and_the_routes_only() {
        assert_eq!(
            HostReach::default().forwards(8080),
            ("none".to_owned(), "none".to_owned())
        );
        let reach = HostReach {
            dns_port: Some(1053),
            // Its own port, 53 and the DNS port are left out; repeats are one.
            routes: vec![5432, 8080, 53, 1053, 9000, 5432],
        };
        assert_eq!(
            reach.forwards(8080),
            ("53:1053,5432,9000".to_owned(), "53:1053".to_owned())
        );
    }
}
