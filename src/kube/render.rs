//! A project's releases as Kubernetes objects, in the order they are applied: the namespace,
//! ConfigMaps (plain env), Secrets (secret env), Services (a routed service's, and the
//! headless one a StatefulSet names), NetworkPolicies (`outbound = false`), then the
//! workloads (a Deployment, or a StatefulSet for a stop-first service or one with named
//! volumes). Pure: the caller reads the store and the secret store; the same input always
//! renders the same bytes (objects in a fixed order, keys sorted by `serde_json`'s map).

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::KubeError;
use crate::events::{HealthKind, RouteKind, ServiceConfig, Strategy};
use crate::store::Digest;

/// Where the objects go and how images are named there.
#[derive(Debug, Clone)]
pub struct Options {
    pub app: String,
    pub environment: String,
    /// The namespace every object is in; `APP-ENV` unless given.
    pub namespace: String,
    /// Where the cluster pulls images from: `HOST[/PATH]`, the image named
    /// `REGISTRY/APP@sha256:…` (`graven image push DIGEST REGISTRY/APP` puts it there).
    pub registry: String,
    /// The storage each named volume's PersistentVolumeClaim asks for (graven's volumes have
    /// no size of their own): a Kubernetes quantity, `1Gi` by default.
    pub volume_size: String,
}

impl Options {
    /// The namespace graven uses when none is given.
    pub fn default_namespace(app: &str, environment: &str) -> String {
        format!("{app}-{environment}")
    }
}

/// One service's release, with what the cluster needs that the release does not record.
#[derive(Debug, Clone)]
pub struct Workload {
    pub service: String,
    pub image: Digest,
    pub config: ServiceConfig,
    /// The uid and gid its process runs as (the `user`, else the image's USER, resolved in
    /// the image's own passwd and group files; root when neither says).
    pub run_as: (u32, u32),
    /// Each secret env variable's value, as the release pins it.
    pub secret_values: BTreeMap<String, Vec<u8>>,
}

/// Kubernetes' minimum probe period and timeout: a second.
const MIN_PROBE: Duration = Duration::from_secs(1);

/// /tmp and /dev/shm when `limits.tmp_bytes` says nothing, as the local runtime's.
const DEFAULT_TMP_BYTES: u64 = crate::sandbox::DEFAULT_TMP_BYTES;

/// Every object, in apply order; names and labels checked.
pub fn render(options: &Options, workloads: &[Workload]) -> Result<Vec<Value>, KubeError> {
    check_registry(&options.registry)?;
    for name in [&options.namespace, &options.app, &options.environment] {
        check_label(name)?;
    }
    let mut workloads: Vec<&Workload> = workloads.iter().collect();
    workloads.sort_by(|a, b| a.service.cmp(&b.service));
    let mut objects = vec![json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": options.namespace,
            "labels": base_labels(options),
        },
    })];
    let (mut config_maps, mut secrets, mut services, mut policies, mut apps) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for workload in workloads {
        check_label(&workload.service)?;
        if workload.config.health.events_caught_up {
            // Pods get no app event log, so the gate could never open.
            return Err(KubeError::Unsupported {
                service: workload.service.clone(),
                what: "[health] events_caught_up (the app event log is graven's daemon's)"
                    .to_owned(),
            });
        }
        let pod = Pod::new(options, workload);
        if let Some(object) = &pod.config_map {
            config_maps.push(object.clone());
        }
        if let Some(object) = &pod.secret {
            secrets.push(object.clone());
        }
        if let Some(object) = routed_service(options, workload) {
            services.push(object);
        }
        if pod.stateful() {
            services.push(headless_service(options, workload));
        }
        if !workload.config.outbound {
            policies.push(no_outbound(options, workload));
        }
        apps.push(pod.workload(options));
    }
    for group in [config_maps, secrets, services, policies, apps] {
        objects.extend(group);
    }
    Ok(objects)
}

/// The objects as a YAML stream of JSON documents (JSON is YAML), which `kubectl apply -f`
/// and schema validators read; each document starts with `---`.
pub fn to_documents(objects: &[Value]) -> String {
    let mut text = String::new();
    for object in objects {
        text.push_str("---\n");
        // A `Value`'s serialization cannot fail: its keys are strings.
        text.push_str(&serde_json::to_string_pretty(object).unwrap_or_default());
        text.push('\n');
    }
    text
}

/// The file an object is written to by `graven render -o DIR`: `NN-kind-name.json`, numbered
/// in apply order so `kubectl apply -f DIR` applies them in it.
pub fn file_name(index: usize, object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap_or("object").to_lowercase();
    let name = object["metadata"]["name"].as_str().unwrap_or("unnamed");
    format!("{index:02}-{kind}-{name}.json")
}

/// A registry a cluster can pull from by name: a host, then optional path components.
fn check_registry(registry: &str) -> Result<(), KubeError> {
    let fail = |reason: &str| KubeError::BadRegistry {
        registry: registry.to_owned(),
        reason: reason.to_owned(),
    };
    if registry.is_empty() {
        return Err(fail(
            "empty: name the registry the cluster pulls from (HOST[/PATH])",
        ));
    }
    if registry.contains("://") || registry.contains('@') || registry.ends_with('/') {
        return Err(fail(
            "write HOST[/PATH], without a scheme, a digest or a trailing '/'",
        ));
    }
    if registry
        .chars()
        .any(|c| c.is_whitespace() || c.is_ascii_uppercase())
    {
        return Err(fail("a registry's name is lowercase, without spaces"));
    }
    // The reference the kubelet pulls (`image_ref`), read as the registry module reads a
    // `FROM`: a first component that names no host (no '.' or ':', not `localhost`) is a
    // Docker Hub namespace to the kubelet, whatever was meant.
    let pulled = format!("{registry}/app@sha256:{}", "0".repeat(64));
    match crate::registry::RemoteRef::parse(&pulled) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(fail(
            "its first component names no registry host (it holds no '.' or ':' and is not \
             localhost), so the cluster would pull from Docker Hub: write HOST[:PORT][/PATH]",
        )),
        Err(error) => Err(fail(&error.to_string())),
    }
}

/// A DNS label, as every object's name here is (names and label values alike).
fn check_label(name: &str) -> Result<(), KubeError> {
    // The spec's rule for its own names, so the two never disagree.
    crate::spec::dns_label("object", name).map_err(|_| KubeError::BadName {
        name: name.to_owned(),
        reason: "1 to 63 lowercase letters, digits or '-', not starting or ending with '-'"
            .to_owned(),
    })
}

/// A name made of graven's own (a volume named after an image's VOLUME may hold '.') as a
/// DNS label: other characters become '-', and a changed or shortened name gets a hash of the
/// original so two never meet.
fn label_of(name: &str) -> String {
    if check_label(name).is_ok() {
        return name.to_owned();
    }
    let cleaned: String = name
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let stem: String = cleaned.trim_matches('-').chars().take(52).collect();
    format!(
        "{}-{}",
        stem.trim_end_matches('-'),
        &short_hash(name.as_bytes())[..10]
    )
}

fn short_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn base_labels(options: &Options) -> Value {
    json!({
        "app.kubernetes.io/managed-by": "graven",
        "app.kubernetes.io/part-of": options.app,
        "graven.dev/app": options.app,
        "graven.dev/environment": options.environment,
    })
}

/// What selects a service's pods: stable across releases (a selector cannot change).
fn selector(options: &Options, service: &str) -> Value {
    json!({
        "graven.dev/app": options.app,
        "graven.dev/environment": options.environment,
        "graven.dev/service": service,
    })
}

fn labels(options: &Options, service: &str) -> Value {
    let mut labels = base_labels(options);
    labels["app.kubernetes.io/name"] = json!(service);
    labels["graven.dev/service"] = json!(service);
    labels
}

fn metadata(options: &Options, name: &str, service: &str) -> Value {
    json!({
        "name": name,
        "namespace": options.namespace,
        "labels": labels(options, service),
    })
}

/// Whole seconds, rounded up, at least one (Kubernetes counts probes in seconds).
fn seconds(duration: Duration) -> u64 {
    let duration = duration.max(MIN_PROBE);
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// The pod a workload runs, and the ConfigMap and Secret its env comes from.
struct Pod<'a> {
    workload: &'a Workload,
    image: String,
    config_map: Option<Value>,
    secret: Option<Value>,
}

impl<'a> Pod<'a> {
    fn new(options: &Options, workload: &'a Workload) -> Pod<'a> {
        let config = &workload.config;
        let service = &workload.service;
        // Named by content: a pod of the old release keeps reading the env it started with
        // while a new one rolls out, and a rollback finds its own still there.
        let config_map = (!config.env.is_empty()).then(|| {
            let data = json!(config.env);
            let name = format!(
                "{service}-env-{}",
                &short_hash(data.to_string().as_bytes())[..10]
            );
            json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": metadata(options, &name, service),
                "immutable": true,
                "data": data,
            })
        });
        // Named by the secrets' names and versions, never their values.
        let secret = (!config.secrets.is_empty()).then(|| {
            let pinned: BTreeMap<&String, String> = config
                .secrets
                .iter()
                .map(|(var, at)| (var, format!("{}:{}", at.name, at.version)))
                .collect();
            let name = format!(
                "{service}-secrets-{}",
                &short_hash(json!(pinned).to_string().as_bytes())[..10]
            );
            let data: BTreeMap<&String, String> = config
                .secrets
                .keys()
                .map(|var| {
                    let value = workload
                        .secret_values
                        .get(var)
                        .map(Vec::as_slice)
                        .unwrap_or_default();
                    (var, base64::engine::general_purpose::STANDARD.encode(value))
                })
                .collect();
            json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": metadata(options, &name, service),
                "type": "Opaque",
                "immutable": true,
                "data": data,
            })
        });
        Pod {
            workload,
            image: image_name(options, &workload.image),
            config_map,
            secret,
        }
    }

    /// Stop-first services and services with named volumes are StatefulSets: each pod keeps
    /// its own claim, and the old pod is gone before its replacement starts.
    fn stateful(&self) -> bool {
        self.rolling().is_none()
    }

    /// The surge and unavailability of a workload that is a Deployment (a rolling service
    /// without volumes); `None` for a StatefulSet.
    fn rolling(&self) -> Option<(u32, u32)> {
        let config = &self.workload.config;
        match config.strategy {
            Strategy::Rolling {
                max_surge,
                max_unavailable,
            } if config.volumes.is_empty() => Some((max_surge, max_unavailable)),
            Strategy::Rolling { .. } | Strategy::Recreate => None,
        }
    }

    fn container(&self) -> Value {
        let workload = self.workload;
        let config = &workload.config;
        let mut container = json!({
            "name": workload.service,
            "imagePullPolicy": "IfNotPresent",
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "capabilities": { "drop": ["ALL"] },
                "privileged": false,
                "readOnlyRootFilesystem": true,
                "runAsGroup": workload.run_as.1,
                "runAsNonRoot": workload.run_as.0 != 0,
                "runAsUser": workload.run_as.0,
                "seccompProfile": { "type": "RuntimeDefault" },
            },
        });
        // Docker's and Kubernetes' words differ: ENTRYPOINT is `command`, CMD is `args`, and
        // either given replaces the image's CMD, as graven's `entrypoint` does.
        if let Some(entrypoint) = &config.entrypoint {
            container["command"] = json!(entrypoint);
        }
        if let Some(command) = &config.command {
            container["args"] = json!(command);
        }
        let mut env = Vec::new();
        if config.port != 0 {
            // The local runtime tells an instance its port in $PORT; so does the pod.
            env.push(json!({ "name": "PORT", "value": config.port.to_string() }));
        }
        if let Some(secret) = &self.secret {
            for var in config.secrets.keys() {
                env.push(json!({
                    "name": var,
                    "valueFrom": { "secretKeyRef": {
                        "name": secret["metadata"]["name"],
                        "key": var,
                    }},
                }));
            }
        }
        if !env.is_empty() {
            container["env"] = json!(env);
        }
        if let Some(config_map) = &self.config_map {
            container["envFrom"] = json!([{
                "configMapRef": { "name": config_map["metadata"]["name"] },
            }]);
        }
        if config.port != 0 {
            container["ports"] = json!([{
                "containerPort": config.port,
                "name": port_name(config),
                "protocol": "TCP",
            }]);
        }
        for (field, probe) in self.probes() {
            container[field] = probe;
        }
        let mut limits = serde_json::Map::new();
        if let Some(cpu) = config.limits.cpu_millis {
            limits.insert("cpu".to_owned(), json!(format!("{cpu}m")));
        }
        if let Some(memory) = config.limits.memory_bytes {
            limits.insert("memory".to_owned(), json!(memory.to_string()));
        }
        if !limits.is_empty() {
            container["resources"] = json!({ "limits": limits });
        }
        container["volumeMounts"] = json!(
            self.volumes()
                .iter()
                .map(|(name, path, _)| json!({ "name": name, "mountPath": path }))
                .collect::<Vec<_>>()
        );
        container["image"] = json!(self.image);
        container
    }

    /// Every mount: /tmp and /dev/shm (the root is read-only; the local runtime gives both),
    /// the tmpfs mounts, then the named volumes (whose source is a claim, `None` here).
    fn volumes(&self) -> Vec<(String, String, Option<Value>)> {
        let config = &self.workload.config;
        let tmp = config.limits.tmp_bytes.unwrap_or(DEFAULT_TMP_BYTES);
        let memory = |bytes: u64| json!({ "emptyDir": { "medium": "Memory", "sizeLimit": bytes.to_string() } });
        let mut volumes = vec![
            ("tmp".to_owned(), "/tmp".to_owned(), Some(memory(tmp))),
            (
                "dev-shm".to_owned(),
                "/dev/shm".to_owned(),
                Some(memory(tmp)),
            ),
        ];
        for (path, bytes) in &config.tmpfs {
            volumes.push((
                label_of(&format!("tmpfs{}", path.replace('/', "-"))),
                path.clone(),
                Some(memory(*bytes)),
            ));
        }
        for volume in &config.volumes {
            volumes.push((label_of(&volume.name), volume.path.clone(), None));
        }
        volumes
    }

    /// Probes from the health check: readiness (`healthy_after` passes route it,
    /// `unhealthy_after` failures stop routing it), liveness (`unhealthy_after` failures
    /// restart it), and a startup probe that gives a new pod the deploy's health deadline
    /// plus the start period before liveness counts.
    fn probes(&self) -> Vec<(&'static str, Value)> {
        let config = &self.workload.config;
        let health = &config.health;
        let handler = match health.kind {
            HealthKind::Http => json!({ "httpGet": { "path": health.path, "port": config.port } }),
            HealthKind::Tcp => json!({ "tcpSocket": { "port": config.port } }),
            HealthKind::Exec => json!({ "exec": { "command": health.command } }),
            HealthKind::None => return Vec::new(),
        };
        let period = seconds(health.interval);
        let probe = |success: u32, failure: u64| {
            let mut probe = handler.clone();
            probe["periodSeconds"] = json!(period);
            probe["timeoutSeconds"] = json!(seconds(health.timeout));
            probe["successThreshold"] = json!(success.max(1));
            probe["failureThreshold"] = json!(failure.max(1));
            probe
        };
        let unhealthy = u64::from(health.unhealthy_after);
        let start = seconds(config.health_deadline + health.start_period);
        vec![
            ("readinessProbe", probe(health.healthy_after, unhealthy)),
            ("livenessProbe", probe(1, unhealthy)),
            ("startupProbe", probe(1, start.div_ceil(period))),
        ]
    }

    fn template(&self, options: &Options) -> Value {
        let workload = self.workload;
        let config = &workload.config;
        let volumes: Vec<Value> = self
            .volumes()
            .into_iter()
            .filter_map(|(name, _, source)| {
                source.map(|mut source| {
                    source["name"] = json!(name);
                    source
                })
            })
            .collect();
        let mut spec = json!({
            "automountServiceAccountToken": false,
            "containers": [self.container()],
            "enableServiceLinks": false,
            "securityContext": {
                "runAsNonRoot": workload.run_as.0 != 0,
                "seccompProfile": { "type": "RuntimeDefault" },
            },
            "terminationGracePeriodSeconds": config.stop_grace.as_secs(),
            "volumes": volumes,
        });
        if !config.volumes.is_empty() {
            // A claim's files become the workload's group's, as graven gives a named volume
            // to the instance's user.
            spec["securityContext"]["fsGroup"] = json!(workload.run_as.1);
        }
        if config.host_network {
            spec["hostNetwork"] = json!(true);
        }
        let mut labels = labels(options, &workload.service);
        // The release names the pod's content: the same config and image, the same release.
        labels["graven.dev/release"] = json!(&short_hash(spec.to_string().as_bytes())[..12]);
        json!({ "metadata": { "labels": labels }, "spec": spec })
    }

    fn workload(&self, options: &Options) -> Value {
        let workload = self.workload;
        let config = &workload.config;
        let service = &workload.service;
        let template = self.template(options);
        let release = template["metadata"]["labels"]["graven.dev/release"].clone();
        let mut metadata = metadata(options, service, service);
        metadata["labels"]["graven.dev/release"] = release;
        metadata["annotations"] = json!({
            "graven.dev/health-deadline-seconds":
                seconds(config.health_deadline + config.health.start_period).to_string(),
        });
        let mut spec = json!({
            "replicas": config.instances,
            "revisionHistoryLimit": config.keep_releases,
            "selector": { "matchLabels": selector(options, service) },
            "template": template,
        });
        let Some((max_surge, max_unavailable)) = self.rolling() else {
            spec["serviceName"] = json!(headless_name(service));
            spec["podManagementPolicy"] = json!("OrderedReady");
            // One pod at a time, each gone before its replacement starts: stop-first.
            spec["updateStrategy"] = json!({ "type": "RollingUpdate" });
            spec["volumeClaimTemplates"] = json!(
                config
                    .volumes
                    .iter()
                    .map(|volume| json!({
                        "metadata": {
                            "name": label_of(&volume.name),
                            "labels": labels(options, service),
                        },
                        "spec": {
                            "accessModes": ["ReadWriteOnce"],
                            "resources": { "requests": { "storage": options.volume_size } },
                        },
                    }))
                    .collect::<Vec<_>>()
            );
            return json!({ "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": metadata, "spec": spec });
        };
        spec["strategy"] = json!({
            "type": "RollingUpdate",
            "rollingUpdate": { "maxSurge": max_surge, "maxUnavailable": max_unavailable },
        });
        spec["progressDeadlineSeconds"] =
            json!(seconds(config.health_deadline + config.health.start_period));
        json!({ "apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata, "spec": spec })
    }
}

/// `REGISTRY/APP@sha256:…`: by digest, so the cluster runs the bytes graven baked.
pub fn image_name(options: &Options, image: &Digest) -> String {
    format!("{}/{}@{}", options.registry, options.app, image)
}

fn port_name(config: &ServiceConfig) -> &'static str {
    match config.route_kind {
        RouteKind::Http => "http",
        RouteKind::Tcp => "tcp",
    }
}

fn headless_name(service: &str) -> String {
    format!("{service}-pods")
}

/// A routed service's Service: the route's port, to the service's port on its pods.
fn routed_service(options: &Options, workload: &Workload) -> Option<Value> {
    let config = &workload.config;
    let route = config.route?;
    let mut port = json!({
        "name": port_name(config),
        "port": route.port(),
        "protocol": "TCP",
        "targetPort": config.port,
    });
    if config.route_kind == RouteKind::Http {
        port["appProtocol"] = json!("http");
    }
    Some(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(options, &workload.service, &workload.service),
        "spec": {
            "ports": [port],
            "selector": selector(options, &workload.service),
            "type": "ClusterIP",
        },
    }))
}

/// The headless Service a StatefulSet names, which gives each pod its own DNS name.
fn headless_service(options: &Options, workload: &Workload) -> Value {
    let config = &workload.config;
    let mut spec = json!({
        "clusterIP": "None",
        "publishNotReadyAddresses": false,
        "selector": selector(options, &workload.service),
    });
    if config.port != 0 {
        spec["ports"] = json!([{
            "name": port_name(config),
            "port": config.port,
            "protocol": "TCP",
            "targetPort": config.port,
        }]);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(options, &headless_name(&workload.service), &workload.service),
        "spec": spec,
    })
}

/// `outbound = false`: the pods reach other pods of the cluster and its DNS, nothing beyond
/// (as an instance reaches nothing beyond graven's bridge). It takes a network plugin that
/// enforces NetworkPolicy.
fn no_outbound(options: &Options, workload: &Workload) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(options, &format!("{}-no-outbound", workload.service), &workload.service),
        "spec": {
            "egress": [{ "to": [{ "namespaceSelector": {} }] }],
            "podSelector": { "matchLabels": selector(options, &workload.service) },
            "policyTypes": ["Egress"],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_dns_labels_without_meeting() {
        let check = |name: &str, expected: &str| assert_eq!(label_of(name), expected, "{name}");
        check("pgdata", "pgdata");
        check(
            "db.var-lib-postgresql-data",
            "db-var-lib-postgresql-data-19ad4ff2c4",
        );
        check("db.srv-my_2dapp", "db-srv-my-2dapp-58b0515051");
        check("tmpfs-run", "tmpfs-run");
        // Two names that clean to the same text keep apart by their hashes.
        assert_ne!(label_of("a.b"), label_of("a_b"));
        let long = label_of(&format!("x.{}", "y".repeat(80)));
        assert!(check_label(&long).is_ok(), "{long}");
    }

    #[test]
    fn probe_seconds_round_up_to_kubernetes_minimum() {
        let check = |ms: u64, expected: u64| {
            assert_eq!(seconds(Duration::from_millis(ms)), expected, "{ms} ms")
        };
        check(0, 1);
        check(200, 1);
        check(1000, 1);
        check(1001, 2);
        check(30_000, 30);
    }

    #[test]
    fn registries_are_host_and_path() {
        for good in [
            "registry.example.com",
            "127.0.0.1:5000/team",
            "ghcr.io/org/sub",
            "localhost:5000",
            "localhost/team",
        ] {
            assert!(check_registry(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "https://ghcr.io",
            "ghcr.io/org/",
            "Ghcr.io",
            "a b",
            "x@sha256:00",
            // Docker Hub namespaces to the kubelet, not hosts.
            "myregistry",
            "team/sub",
        ] {
            assert!(check_registry(bad).is_err(), "{bad}");
        }
    }
}
