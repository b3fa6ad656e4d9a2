//! An `InstanceSpec` as a Docker container's create body: the local runtime's lock-down where
//! the Engine API can say it (read-only root, size-capped `noexec` tmpfs mounts, every
//! capability dropped, no new privileges, Docker's default seccomp profile, the user, memory,
//! process and CPU limits) and a refusal naming the setting where it cannot. Pure: the Swarm
//! backend builds its task template from the same translation.

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, HostConfig};

use super::labels;
use crate::runtime::{InstanceSpec, NetworkMode, RuntimeError};

pub use crate::runtime::DEFAULT_PORT;

/// `/tmp`'s and `/dev/shm`'s size when `limits.tmp` is unset, as the local sandbox's.
const DEFAULT_TMP_BYTES: u64 = crate::sandbox::DEFAULT_TMP_BYTES;

/// Where the instance is reached: its port in its own network, or a port of the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub network: NetworkMode,
    pub port: u16,
}

/// The create body for `spec` under the image reference `image`, labelled as `labels`
/// says. Refuses what Docker cannot express rather than dropping it.
pub fn container_body(
    spec: &InstanceSpec,
    image: &str,
    hostname: &str,
    placement: Placement,
    labels: HashMap<String, String>,
) -> Result<ContainerCreateBody, RuntimeError> {
    refuse_unexpressible(spec)?;
    let env = environment(spec, placement.port);
    let tmp_bytes = spec.limits.tmp_bytes.unwrap_or(DEFAULT_TMP_BYTES);
    // Programs run from tmpfs mounts only where the spec allows it, as in the local sandbox.
    let exec = if spec.exec_tmp { "exec" } else { "noexec" };
    let tmpfs_options = |bytes: u64| format!("rw,{exec},nosuid,nodev,size={bytes},mode=1777");
    let mut tmpfs: HashMap<String, String> = spec
        .tmpfs
        .iter()
        .map(|t| (t.path.clone(), tmpfs_options(t.bytes)))
        .collect();
    tmpfs.insert("/tmp".to_owned(), tmpfs_options(tmp_bytes));
    // Every graven container is labelled with its home, whose volumes these are.
    let home = labels.get(labels::HOME).map_or("", String::as_str);
    let binds: Vec<String> = spec
        .volumes
        .iter()
        .map(|v| format!("{}:{}", volume_name(home, &v.name), v.path))
        .collect();
    let pids = spec.limits.pids.unwrap_or(crate::runtime::DEFAULT_PIDS);
    let host_config = HostConfig {
        readonly_rootfs: Some(true),
        cap_drop: Some(vec!["ALL".to_owned()]),
        // No `seccomp=` option: Docker's default profile applies, as `docker run` gives.
        security_opt: Some(vec!["no-new-privileges".to_owned()]),
        tmpfs: Some(tmpfs),
        shm_size: Some(tmp_bytes as i64),
        binds: Some(binds),
        memory: spec.limits.memory_bytes.map(|b| b as i64),
        // Docker reads 0 and -1 as no limit, as graven reads 0.
        pids_limit: Some(if pids == 0 { -1 } else { pids as i64 }),
        nano_cpus: spec.limits.cpu_millis.map(|m| m as i64 * 1_000_000),
        // A small init as PID 1 passes the stop signal on, so the workload ends by it as it
        // would on the local runtime (PID 1 ignores signals it has no handler for).
        init: Some(true),
        network_mode: Some(match placement.network {
            NetworkMode::Private => "bridge".to_owned(),
            NetworkMode::Host => "host".to_owned(),
        }),
        dns: spec
            .dns
            .as_ref()
            .and_then(|d| d.nameserver)
            .map(|ip| vec![ip.to_string()]),
        // Graven's server is the engine's only where the daemon has its bridge address.
        dns_search: spec
            .dns
            .as_ref()
            .filter(|d| d.nameserver.is_some())
            .map(|d| vec![d.search.clone()]),
        ..HostConfig::default()
    };
    let entrypoint = spec.entrypoint.as_ref().map(|e| {
        // Docker clears the image's ENTRYPOINT with `[""]`; an empty list keeps it.
        if e.is_empty() {
            vec![String::new()]
        } else {
            e.clone()
        }
    });
    Ok(ContainerCreateBody {
        image: Some(image.to_owned()),
        hostname: Some(hostname.to_owned()),
        cmd: spec.command.clone(),
        entrypoint,
        env: Some(env),
        user: spec.user.clone(),
        labels: Some(labels),
        stop_signal: spec.stop_signal.clone(),
        stop_timeout: Some(spec.stop_grace.as_secs().max(1) as i64),
        host_config: Some(host_config),
        ..ContainerCreateBody::default()
    })
}

/// The Docker volume the graven volume `name` of the graven home `home` (as its containers'
/// `labels::HOME` says it) is: the name, prefixed so graven's volumes are told apart from the
/// engine's others, and with a short stable hash of the home, so two homes on one engine
/// never share a volume they each call `name`.
pub fn volume_name(home: &str, name: &str) -> String {
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(home.as_bytes());
    format!(
        "{}{}-{name}",
        labels::VOLUME_PREFIX,
        hex::encode(&hash[..HOME_HASH_BYTES])
    )
}

/// How much of the home's hash a volume name carries: 8 hex digits, enough to tell the
/// few homes that share an engine apart.
const HOME_HASH_BYTES: usize = 4;

/// The settings Docker's bridge network cannot give as graven means them.
fn refuse_unexpressible(spec: &InstanceSpec) -> Result<(), RuntimeError> {
    let refuse = |what: &str| {
        Err(RuntimeError::CannotExpress {
            runtime: "docker",
            what: what.to_owned(),
        })
    };
    if !spec.outbound && spec.network == NetworkMode::Private {
        // The default bridge routes wherever the host does; an internal network would also
        // cut graven's proxy off from the instance.
        return refuse("refuse an instance's outbound connections (outbound = false)");
    }
    if spec.network == NetworkMode::Private && spec.host_port.is_some() {
        return refuse("give an instance with a network of its own a fixed host port");
    }
    Ok(())
}

/// The workload's environment as an engine takes it: the spec's variables and secrets, with
/// `PORT` the port the instance listens on whatever the spec set.
pub(crate) fn environment(spec: &InstanceSpec, port: u16) -> Vec<String> {
    let mut env: Vec<String> = spec
        .env
        .iter()
        .chain(spec.secret_env.0.iter())
        .filter(|(key, _)| key.as_str() != "PORT")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    env.push(format!("PORT={port}"));
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{TmpfsMount, VolumeMount};
    use crate::store::Digest;

    fn body(spec: &InstanceSpec) -> ContainerCreateBody {
        let placement = Placement {
            network: NetworkMode::Private,
            port: 8080,
        };
        container_body(spec, "graven/image:x", "abc", placement, HashMap::new()).unwrap()
    }

    #[test]
    fn the_lock_down_is_in_every_body() {
        let mut spec = InstanceSpec::new(Digest::of(b"image"));
        spec.tmpfs.push(TmpfsMount {
            path: "/cache".into(),
            bytes: 1 << 20,
        });
        spec.volumes.push(VolumeMount {
            name: "data".into(),
            path: "/data".into(),
        });
        spec.limits.memory_bytes = Some(64 << 20);
        spec.limits.cpu_millis = Some(1500);
        spec.env.insert("PORT".into(), "1".into());
        let body = body(&spec);
        let host = body.host_config.unwrap();
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(
            host.security_opt,
            Some(vec!["no-new-privileges".to_owned()])
        );
        let tmpfs = host.tmpfs.unwrap();
        assert_eq!(
            tmpfs["/cache"],
            "rw,noexec,nosuid,nodev,size=1048576,mode=1777"
        );
        assert!(tmpfs["/tmp"].contains("noexec"));
        assert_eq!(
            host.binds,
            Some(vec![format!("{}:/data", volume_name("", "data"))])
        );
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.nano_cpus, Some(1_500_000_000));
        assert_eq!(host.pids_limit, Some(crate::runtime::DEFAULT_PIDS as i64));
        // The runtime's port wins over an env's PORT, as on the local runtime.
        assert_eq!(body.env, Some(vec!["PORT=8080".to_owned()]));
    }

    /// Two graven homes on one engine each have a volume `data`: they must be two Docker
    /// volumes, or one home's instances would read and write the other's data.
    #[test]
    fn two_homes_on_one_engine_never_share_a_volume() {
        let mut spec = InstanceSpec::new(Digest::of(b"image"));
        spec.volumes.push(VolumeMount {
            name: "data".into(),
            path: "/data".into(),
        });
        let binds_of = |home: &str| {
            let placement = Placement {
                network: NetworkMode::Private,
                port: 8080,
            };
            let labels = HashMap::from([(labels::HOME.to_owned(), home.to_owned())]);
            container_body(&spec, "i", "h", placement, labels)
                .unwrap()
                .host_config
                .unwrap()
                .binds
                .unwrap()
        };
        let one = binds_of("/srv/one/.graven");
        let other = binds_of("/srv/other/.graven");
        assert_ne!(one, other);
        // Stable: the same home names the same volume, whichever graven asks.
        assert_eq!(one, binds_of("/srv/one/.graven"));
        let name = one[0].strip_suffix(":/data").unwrap();
        assert!(name.starts_with(labels::VOLUME_PREFIX), "{name}");
        assert!(name.ends_with("-data"), "{name}");
    }

    #[test]
    fn exec_tmp_lifts_noexec_and_an_empty_entrypoint_clears_the_image_s() {
        let mut spec = InstanceSpec::new(Digest::of(b"image"));
        spec.exec_tmp = true;
        spec.entrypoint = Some(vec![]);
        let body = body(&spec);
        assert!(body.host_config.unwrap().tmpfs.unwrap()["/tmp"].starts_with("rw,exec,"));
        assert_eq!(body.entrypoint, Some(vec![String::new()]));
    }

    #[test]
    fn what_docker_cannot_express_is_refused() {
        let mut spec = InstanceSpec::new(Digest::of(b"image"));
        spec.outbound = false;
        let placement = Placement {
            network: NetworkMode::Private,
            port: 8080,
        };
        let refused = container_body(&spec, "i", "h", placement, HashMap::new()).unwrap_err();
        assert!(
            refused.to_string().contains("outbound = false"),
            "{refused}"
        );
    }
}
