//! The OCI image-spec documents graven writes and reads: index, manifest, config.
//!
//! Field order is the declaration order and every map is a `BTreeMap`, so serializing the
//! same value always gives the same bytes, which is what makes digests reproducible.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Digest;

pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Serializes compactly; with ordered fields and maps this is canonical for graven's types.
/// Reads a JSON `null` as the field's default (an empty list or map): configs saved by
/// Docker's classic builder or `docker import` write `"Env": null`, `"Volumes": null`.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Option::unwrap_or_default)
}

pub fn to_canonical_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("graven's OCI types always serialize")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.to_owned(),
            digest,
            size,
            annotations: BTreeMap::new(),
        }
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str)
    }

    pub fn set_annotation(&mut self, key: &str, value: &str) {
        self.annotations.insert(key.to_owned(), value.to_owned());
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

impl Default for ImageIndex {
    fn default() -> Self {
        ImageIndex {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_INDEX.to_owned()),
            manifests: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Manifest {
    pub fn new(config: Descriptor, layers: Vec<Descriptor>) -> Manifest {
        Manifest {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_MANIFEST.to_owned()),
            config,
            layers,
            annotations: BTreeMap::new(),
        }
    }
}

/// The OCI image configuration. `created` is never set by graven: a build timestamp would
/// make every bake a new digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    pub architecture: String,
    pub os: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub config: RuntimeConfig,
    pub rootfs: RootFs,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub history: Vec<serde_json::Value>,
    /// Fields graven does not model (Docker's `container_config`, `docker_version`, `author`,
    /// `variant`…), kept as they were, after the modelled ones in key order. A bake does not
    /// carry them from its base into the image it makes: they describe how the base was made.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            created: None,
            architecture: "amd64".to_owned(),
            os: "linux".to_owned(),
            config: RuntimeConfig::default(),
            rootfs: RootFs {
                kind: "layers".to_owned(),
                diff_ids: Vec::new(),
            },
            history: Vec::new(),
            other: BTreeMap::new(),
        }
    }
}

/// What an instance of the image runs, as the OCI config's `config` object spells it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    #[serde(rename = "User", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(
        rename = "ExposedPorts",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub exposed_ports: BTreeMap<String, serde_json::Value>,
    #[serde(
        rename = "Env",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub env: Vec<String>,
    #[serde(
        rename = "Entrypoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(
        rename = "Volumes",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub volumes: BTreeMap<String, serde_json::Value>,
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    #[serde(
        rename = "Labels",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
    #[serde(
        rename = "StopSignal",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub stop_signal: Option<String>,
    /// Docker's extension; OCI configs carry it through unchanged.
    #[serde(
        rename = "Healthcheck",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub healthcheck: Option<HealthConfig>,
    /// Fields graven does not model (`Shell`, `OnBuild`, `ArgsEscaped`, `Hostname`…), kept as
    /// they were and carried into the images baked from this one, as Docker does.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// Docker's `Healthcheck` object (durations in nanoseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthConfig {
    #[serde(
        rename = "Test",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub test: Vec<String>,
    #[serde(rename = "Interval", default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<u64>,
    #[serde(rename = "Timeout", default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    #[serde(
        rename = "StartPeriod",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub start_period: Option<u64>,
    #[serde(rename = "Retries", default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<Digest>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config as `docker import` and Docker's classic builder save it: `null` lists and
    /// maps, and fields graven does not model.
    const DOCKER_IMPORT: &str = r#"{
        "architecture": "amd64",
        "config": {
            "Hostname": "", "Domainname": "", "User": "", "AttachStdin": false,
            "Env": null, "Cmd": null, "Image": "", "Volumes": null, "WorkingDir": "",
            "Entrypoint": null, "OnBuild": null, "Labels": null, "ExposedPorts": null
        },
        "container_config": {"Hostname": "", "Cmd": null},
        "created": "2026-12-01T00:00:00Z",
        "docker_version": "20.10.24+dfsg1",
        "history": null,
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []}
    }"#;

    #[test]
    fn a_docker_import_config_with_nulls_reads_and_keeps_what_graven_does_not_model() {
        let config: ImageConfig = serde_json::from_str(DOCKER_IMPORT).unwrap();
        assert!(config.config.env.is_empty());
        assert!(config.config.volumes.is_empty());
        assert!(config.history.is_empty());
        assert_eq!(config.other["docker_version"], "20.10.24+dfsg1");
        assert!(config.other.contains_key("container_config"));
        assert_eq!(config.config.other["Hostname"], "");
        assert!(config.config.other.contains_key("OnBuild"));
        // Written back, the fields graven does not model are still there.
        let again: serde_json::Value = serde_json::from_slice(&to_canonical_json(&config)).unwrap();
        assert_eq!(again["docker_version"], "20.10.24+dfsg1");
        assert_eq!(again["config"]["Domainname"], "");
    }

    #[test]
    fn a_config_graven_makes_serializes_as_before() {
        let mut config = ImageConfig::default();
        config.config.env = vec!["PORT=8080".into()];
        let json = String::from_utf8(to_canonical_json(&config)).unwrap();
        assert_eq!(
            json,
            r#"{"architecture":"amd64","os":"linux","config":{"Env":["PORT=8080"]},"rootfs":{"type":"layers","diff_ids":[]}}"#
        );
    }
}
