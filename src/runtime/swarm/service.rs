//! An `InstanceSpec` as a Swarm service's spec: one service per instance, one replica, no
//! restart by Swarm (a task that ends is an instance that exited, which graven's controller
//! replaces), its port published in host mode on whichever node runs the task (the routing
//! mesh needs IPVS, which graven cannot count on), its image referenced by the engine's
//! image id so no node ever pulls it. The lock-down is the Docker runtime's where a service
//! spec of API 1.41 can say it; what it cannot say is refused or, where the difference is
//! small, reported on the instance (`warnings`).

use std::collections::HashMap;

use bollard::models::{
    EndpointPortConfig, EndpointPortConfigPublishModeEnum, EndpointSpec, Limit, Mount,
    MountTmpfsOptions, MountType, ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated,
    TaskSpec, TaskSpecContainerSpec, TaskSpecContainerSpecDnsConfig, TaskSpecPlacement,
    TaskSpecResources, TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum,
};

use crate::runtime::{InstanceSpec, NetworkMode, RuntimeError};

/// `/tmp`'s size when `limits.tmp` is unset, and the size Swarm gives `/dev/shm` (API 1.41
/// has no setting for it).
const DEFAULT_TMP_BYTES: u64 = crate::sandbox::DEFAULT_TMP_BYTES;

/// What a lock-down setting becomes on Swarm when it cannot be applied as asked, said on
/// every instance it concerns.
pub const NO_NEW_PRIVILEGES: &str =
    "no-new-privileges is not set: a Swarm service spec of API 1.41 cannot express it";

/// On the task's container: the graven home whose instance it is, so a node's engine's event
/// stream can be asked for this home's containers alone (`SwarmRuntime::watch_node`).
pub const TASK_HOME: &str = "graven.swarm.home";
/// On the task's container: the instance id. Not the Docker runtime's `graven.instance`, so a
/// Docker runtime on the same engine never lists a task's container as its own.
pub const TASK_INSTANCE: &str = "graven.swarm.instance";

/// The service spec for `spec`: named `name`, its task's container running the image
/// `image_id` (the engine's `sha256:` id, the same on every node it was loaded into) as
/// instance `id` of graven's home `home`, with `labels` on the service, kept off the nodes
/// in `excluded` (their engines lack the image). Returns the warnings the instance carries.
pub fn service_spec(
    spec: &InstanceSpec,
    name: &str,
    image_id: &str,
    (id, home): (&str, &str),
    labels: HashMap<String, String>,
    excluded: &[String],
) -> Result<(ServiceSpec, Vec<String>), RuntimeError> {
    refuse_unexpressible(spec)?;
    let port = spec.port.unwrap_or(crate::runtime::DEFAULT_PORT);
    let env = crate::runtime::docker::lockdown::environment(spec, port);
    let mut warnings = vec![NO_NEW_PRIVILEGES.to_owned()];
    let tmp_bytes = spec.limits.tmp_bytes.unwrap_or(DEFAULT_TMP_BYTES);
    if tmp_bytes != DEFAULT_TMP_BYTES {
        warnings.push(format!(
            "/dev/shm is {DEFAULT_TMP_BYTES} bytes, not {tmp_bytes}: a Swarm service spec of \
             API 1.41 cannot size it"
        ));
    }
    // Docker mounts a service's tmpfs `noexec,nosuid,nodev` (checked by the Swarm test),
    // as the local sandbox's.
    let tmpfs = |path: &str, bytes: u64| Mount {
        target: Some(path.to_owned()),
        typ: Some(MountType::TMPFS),
        tmpfs_options: Some(MountTmpfsOptions {
            size_bytes: Some(bytes as i64),
            mode: Some(0o1777),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut mounts = vec![tmpfs("/tmp", tmp_bytes)];
    mounts.extend(spec.tmpfs.iter().map(|t| tmpfs(&t.path, t.bytes)));
    let pids = spec.limits.pids.unwrap_or(crate::runtime::DEFAULT_PIDS);
    let entrypoint = spec.entrypoint.as_ref().map(|e| {
        // As with `docker run`: `[""]` clears the image's ENTRYPOINT.
        if e.is_empty() {
            vec![String::new()]
        } else {
            e.clone()
        }
    });
    let container = TaskSpecContainerSpec {
        image: Some(image_id.to_owned()),
        command: entrypoint,
        args: spec.command.clone(),
        hostname: Some(id.to_owned()),
        labels: Some(HashMap::from([
            (TASK_HOME.to_owned(), home.to_owned()),
            (TASK_INSTANCE.to_owned(), id.to_owned()),
        ])),
        env: Some(env),
        user: spec.user.clone(),
        read_only: Some(true),
        mounts: Some(mounts),
        stop_signal: spec.stop_signal.clone(),
        stop_grace_period: Some(spec.stop_grace.as_nanos() as i64),
        dns_config: spec.dns.as_ref().and_then(|d| {
            Some(TaskSpecContainerSpecDnsConfig {
                nameservers: Some(vec![d.nameserver?.to_string()]),
                search: Some(vec![d.search.clone()]),
                options: None,
            })
        }),
        // A small init as PID 1 passes the stop signal on, as on the Docker runtime.
        init: Some(true),
        capability_drop: Some(vec!["ALL".to_owned()]),
        ..Default::default()
    };
    let task = TaskSpec {
        container_spec: Some(container),
        resources: Some(TaskSpecResources {
            limits: Some(Limit {
                nano_cpus: spec.limits.cpu_millis.map(|m| m as i64 * 1_000_000),
                memory_bytes: spec.limits.memory_bytes.map(|b| b as i64),
                pids: (pids > 0).then_some(pids as i64),
            }),
            ..Default::default()
        }),
        // Swarm never restarts a task: graven's controller counts exits and replaces.
        restart_policy: Some(TaskSpecRestartPolicy {
            condition: Some(TaskSpecRestartPolicyConditionEnum::NONE),
            ..Default::default()
        }),
        placement: Some(TaskSpecPlacement {
            constraints: Some(excluded.iter().map(|id| format!("node.id!={id}")).collect()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let spec = ServiceSpec {
        name: Some(name.to_owned()),
        labels: Some(labels),
        task_template: Some(task),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
            ..Default::default()
        }),
        endpoint_spec: Some(EndpointSpec {
            ports: Some(vec![EndpointPortConfig {
                target_port: Some(i64::from(port)),
                // None: the node's engine picks a free port, read back from the task.
                published_port: None,
                publish_mode: Some(EndpointPortConfigPublishModeEnum::HOST),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok((spec, warnings))
}

/// The settings a Swarm service cannot give as graven means them.
fn refuse_unexpressible(spec: &InstanceSpec) -> Result<(), RuntimeError> {
    let refuse = |what: &str| {
        Err(RuntimeError::CannotExpress {
            runtime: "swarm",
            what: what.to_owned(),
        })
    };
    if !spec.volumes.is_empty() {
        // A named volume is local to the node the task lands on: its data would not follow
        // an instance Swarm places elsewhere.
        return refuse("keep a volume's data when its instance moves to another node (volumes)");
    }
    if spec.network == NetworkMode::Host {
        return refuse("run an instance on a node's host network (network = \"host\")");
    }
    if spec.host_port.is_some() {
        return refuse("give an instance a fixed host port");
    }
    if !spec.outbound {
        return refuse("refuse an instance's outbound connections (outbound = false)");
    }
    if spec.exec_tmp {
        // API 1.41 has no tmpfs mount options, and Docker mounts a service's tmpfs noexec.
        return refuse("let programs run from /tmp and tmpfs mounts (drift.exec_tmp)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{TmpfsMount, VolumeMount};
    use crate::store::Digest;

    fn build(spec: &InstanceSpec) -> (ServiceSpec, Vec<String>) {
        service_spec(
            spec,
            "graven-abc",
            "sha256:00",
            ("abc", "/home"),
            HashMap::new(),
            &[],
        )
        .unwrap()
    }

    #[test]
    fn the_lock_down_is_in_every_service_spec() {
        let mut spec = InstanceSpec::new(Digest::of(b"image"));
        spec.tmpfs.push(TmpfsMount {
            path: "/cache".into(),
            bytes: 1 << 20,
        });
        spec.limits.memory_bytes = Some(64 << 20);
        spec.limits.cpu_millis = Some(1500);
        spec.env.insert("PORT".into(), "1".into());
        let (service, warnings) = build(&spec);
        let task = service.task_template.unwrap();
        let container = task.container_spec.unwrap();
        assert_eq!(container.read_only, Some(true));
        assert_eq!(container.capability_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(container.image.as_deref(), Some("sha256:00"));
        // The container says whose instance it is, under keys of the Swarm runtime's own.
        let labels = container.labels.unwrap();
        assert_eq!(labels[TASK_INSTANCE], "abc");
        assert_eq!(labels[TASK_HOME], "/home");
        assert!(!labels.contains_key(crate::runtime::docker::labels::INSTANCE));
        let mounts = container.mounts.unwrap();
        let targets: Vec<_> = mounts.iter().filter_map(|m| m.target.clone()).collect();
        assert_eq!(targets, ["/tmp", "/cache"]);
        assert!(mounts.iter().all(|m| m.typ == Some(MountType::TMPFS)));
        let limits = task.resources.unwrap().limits.unwrap();
        assert_eq!(limits.memory_bytes, Some(64 << 20));
        assert_eq!(limits.nano_cpus, Some(1_500_000_000));
        assert_eq!(limits.pids, Some(crate::runtime::DEFAULT_PIDS as i64));
        assert_eq!(
            task.restart_policy.unwrap().condition,
            Some(TaskSpecRestartPolicyConditionEnum::NONE)
        );
        // The runtime's port wins over an env's PORT, as on every runtime.
        assert_eq!(container.env, Some(vec!["PORT=8080".to_owned()]));
        let ports = service.endpoint_spec.unwrap().ports.unwrap();
        assert_eq!(
            ports[0].publish_mode,
            Some(EndpointPortConfigPublishModeEnum::HOST)
        );
        assert_eq!(ports[0].target_port, Some(8080));
        // What API 1.41 cannot say is said on the instance.
        assert_eq!(warnings, [NO_NEW_PRIVILEGES]);
    }

    #[test]
    fn nodes_without_the_image_are_excluded() {
        let spec = InstanceSpec::new(Digest::of(b"image"));
        let excluded = ["n2".to_owned(), "n3".to_owned()];
        let (service, _) = service_spec(
            &spec,
            "s",
            "sha256:00",
            ("h", "/home"),
            HashMap::new(),
            &excluded,
        )
        .unwrap();
        let placement = service.task_template.unwrap().placement.unwrap();
        assert_eq!(
            placement.constraints,
            Some(vec!["node.id!=n2".to_owned(), "node.id!=n3".to_owned()])
        );
    }

    #[test]
    fn what_swarm_cannot_express_is_refused() {
        let base = InstanceSpec::new(Digest::of(b"image"));
        let mut volume = base.clone();
        volume.volumes.push(VolumeMount {
            name: "data".into(),
            path: "/data".into(),
        });
        let mut host = base.clone();
        host.network = NetworkMode::Host;
        let mut exec = base.clone();
        exec.exec_tmp = true;
        let mut closed = base.clone();
        closed.outbound = false;
        for (spec, fragment) in [
            (volume, "volumes"),
            (host, "network = \"host\""),
            (exec, "exec_tmp"),
            (closed, "outbound = false"),
        ] {
            let refused =
                service_spec(&spec, "s", "i", ("h", "/home"), HashMap::new(), &[]).unwrap_err();
            let message = refused.to_string();
            assert!(message.contains(fragment), "{message}");
            assert!(message.starts_with("the swarm runtime cannot"), "{message}");
        }
    }
}
