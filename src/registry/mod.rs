//! The registry module owns talking to OCI registries (the distribution API, through the
//! `oci-client` crate): pulling an image into a store transaction, every blob checked against
//! its digest, and pushing an image from the store with its manifest's bytes unchanged, so the
//! registry's digest is graven's. Credentials come from the Docker config file (`auth`).
//!
//! It names only `store`; it knows nothing of Containerfiles, instances or services. Its
//! calls are blocking: each runs the async client on a runtime of its own, on a thread of its
//! own, so it can be called from anywhere (a bake, the CLI) and leaves no thread behind.
//! Plain HTTP is spoken only to loopback registries (`localhost`, `127.0.0.0/8`, `::1`, as
//! Docker treats them) and to those `GRAVEN_INSECURE_REGISTRIES` lists; every other one is
//! HTTPS (rustls, the system's roots).

mod auth;

use std::fs::File;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::store::{
    Descriptor, Digest, MEDIA_TYPE_INDEX, MEDIA_TYPE_LAYER, MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_MANIFEST, Manifest, Store, StoreError, Transaction, host_architecture,
};

pub use auth::config_file;

/// The registries (`host[:port]`, comma-separated; a host alone means any of its ports) that
/// graven speaks plain HTTP to although they are not on loopback, as Docker's
/// `insecure-registries` setting.
pub const INSECURE_VAR: &str = "GRAVEN_INSECURE_REGISTRIES";

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// What graven asks a registry for, and all it can use: images and indexes, OCI or Docker's.
const ACCEPTED: &[&str] = &[
    MEDIA_TYPE_MANIFEST,
    MEDIA_TYPE_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];
/// The layer media types the unpacker reads (zstd and foreign layers are not among them).
const LAYER_TYPES: &[&str] = &[
    MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_LAYER,
    DOCKER_LAYER_GZIP,
    DOCKER_LAYER,
];
/// The largest manifest or index graven accepts: real ones are a few KiB.
const MAX_MANIFEST_SIZE: usize = 4 * 1024 * 1024;
/// A blob at least this large reports its progress while it moves.
pub const PROGRESS_THRESHOLD: u64 = 8 * 1024 * 1024;
const CHUNK: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{reference:?} is not an image reference: {reason}")]
    BadReference { reference: String, reason: String },
    #[error("{reference}: {detail}")]
    Registry { reference: String, detail: String },
    #[error("{reference}: {what} {digest} from the registry hashes to {actual}")]
    Corrupt {
        reference: String,
        what: &'static str,
        digest: Digest,
        actual: Digest,
    },
    #[error("{reference}: {reason}")]
    Unusable { reference: String, reason: String },
    #[error("{reference}: {registry} refused access: {hint}")]
    Unauthorized {
        reference: String,
        registry: String,
        hint: String,
    },
    #[error("credentials for {registry} in {path}: {reason}")]
    Credentials {
        registry: String,
        path: PathBuf,
        reason: String,
    },
    #[error("{reference}: {source}")]
    Store {
        reference: String,
        source: StoreError,
    },
    #[error("cannot start the registry client: {0}")]
    Client(String),
}

/// An image in a registry, as `FROM` and `graven image push` name it:
/// `host[:port]/path[:tag][@digest]`.
#[derive(Debug, Clone)]
pub struct RemoteRef {
    text: String,
    reference: Reference,
    digest: Option<Digest>,
}

impl RemoteRef {
    /// Parses `text` when its first component names a registry host (it holds a `.` or a `:`,
    /// or is `localhost`, Docker's rule); `None` for a name without one (`debian:12`), which
    /// graven never sends to Docker Hub unless written `docker.io/library/debian:12`.
    pub fn parse(text: &str) -> Result<Option<RemoteRef>, RegistryError> {
        let Some((first, _)) = text.split_once('/') else {
            return Ok(None);
        };
        // `./base.tar` and `../x` are paths, not hosts.
        let host = first.contains('.') || first.contains(':') || first == "localhost";
        if !host || first == "." || first == ".." {
            return Ok(None);
        }
        let bad = |reason: String| RegistryError::BadReference {
            reference: text.to_owned(),
            reason,
        };
        let reference = Reference::try_from(text).map_err(|e| bad(e.to_string().to_lowercase()))?;
        let digest = reference
            .digest()
            .map(Digest::parse)
            .transpose()
            .map_err(|e| bad(e.to_string()))?;
        Ok(Some(RemoteRef {
            text: text.to_owned(),
            reference,
            digest,
        }))
    }

    /// As the user wrote it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// `host[:port]`, as the Docker config file's `auths` name it.
    pub fn registry(&self) -> &str {
        self.reference.resolve_registry()
    }

    /// `host[:port]/path:tag` when a tag was written (the name `graven image pull` tags).
    pub fn tagged_name(&self) -> Option<String> {
        let tag = self.reference.tag()?;
        let name = self.text.split('@').next().unwrap_or(&self.text);
        name.ends_with(&format!(":{tag}")).then(|| name.to_owned())
    }

    fn err(&self, error: oci_client::errors::OciDistributionError) -> RegistryError {
        use oci_client::errors::{DigestError, OciDistributionError};
        let unauthorized = match &error {
            OciDistributionError::UnauthorizedError { .. } => true,
            OciDistributionError::RequestError(e) => {
                e.status() == Some(http::StatusCode::UNAUTHORIZED)
            }
            _ => false,
        };
        if unauthorized {
            // `pull` and `push` say which credentials were sent (`auth::explain`).
            return RegistryError::Unauthorized {
                reference: self.text.clone(),
                registry: self.registry().to_owned(),
                hint: String::new(),
            };
        }
        if let OciDistributionError::DigestError(DigestError::VerificationError {
            expected,
            actual,
        }) = &error
            && let (Ok(digest), Ok(actual)) = (Digest::parse(expected), Digest::parse(actual))
        {
            return RegistryError::Corrupt {
                reference: self.text.clone(),
                what: "content",
                digest,
                actual,
            };
        }
        if let OciDistributionError::RegistryError { envelope, url } = &error {
            let said: Vec<&str> = envelope.errors.iter().map(|e| e.message.as_str()).collect();
            return RegistryError::Registry {
                reference: self.text.clone(),
                detail: format!("the registry answered: {} ({url})", said.join("; ")),
            };
        }
        // The client's errors keep their cause (a refused connection, a TLS alert) in their
        // source chain, which a plain message would lose.
        let mut detail = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !detail.contains(&text) {
                detail = format!("{detail}: {text}");
            }
            source = cause.source();
        }
        if !plain_http(self.registry())
            && matches!(
                error,
                oci_client::errors::OciDistributionError::RequestError(_)
            )
        {
            detail = format!(
                "{detail} (graven speaks HTTPS to {}: plain HTTP only to loopback registries and those {INSECURE_VAR} lists)",
                self.registry()
            );
        }
        RegistryError::Registry {
            reference: self.text.clone(),
            detail,
        }
    }

    fn store_err(&self) -> impl FnOnce(StoreError) -> RegistryError + '_ {
        move |source| RegistryError::Store {
            reference: self.text.clone(),
            source,
        }
    }

    fn unusable(&self, reason: impl Into<String>) -> RegistryError {
        RegistryError::Unusable {
            reference: self.text.clone(),
            reason: reason.into(),
        }
    }
}

/// Whether graven speaks plain HTTP to `registry` (`host[:port]`): a loopback one, or one
/// `GRAVEN_INSECURE_REGISTRIES` lists.
pub fn plain_http(registry: &str) -> bool {
    let (host, port) = split_host_port(registry);
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    loopback
        || std::env::var(INSECURE_VAR).is_ok_and(|list| {
            list.split(',').map(str::trim).any(|entry| {
                let (want_host, want_port) = split_host_port(entry);
                !entry.is_empty() && want_host == host && want_port.is_none_or(|p| Some(p) == port)
            })
        })
}

/// `host` and `port` of `host[:port]` or `[v6][:port]`.
fn split_host_port(registry: &str) -> (&str, Option<&str>) {
    if let Some(rest) = registry.strip_prefix('[') {
        let (host, after) = rest.split_once(']').unwrap_or((rest, ""));
        return (host, after.strip_prefix(':'));
    }
    match registry.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, Some(port)),
        _ if registry.parse::<IpAddr>().is_ok() => (registry, None),
        Some((host, port)) => (host, Some(port)),
        None => (registry, None),
    }
}

/// How far a large blob has moved, for a progress line.
#[derive(Debug, Clone)]
pub struct BlobProgress {
    pub digest: Digest,
    pub done: u64,
    pub total: u64,
}

/// Where progress of blobs larger than `PROGRESS_THRESHOLD` goes.
pub type ProgressFn = Arc<dyn Fn(&BlobProgress) + Send + Sync>;

/// An image pulled into a transaction.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Pulled {
    /// The image's manifest: the host's platform's when the reference names an index.
    pub digest: Digest,
    /// The index the manifest was chosen from, when the reference named one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<Digest>,
    /// Blobs fetched from the registry (0 when the store held them all).
    pub fetched_blobs: usize,
}

/// An image pushed from the store.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Pushed {
    pub reference: String,
    pub digest: Digest,
    pub pushed_blobs: usize,
    /// Blobs the registry already had (a HEAD said so), not sent again.
    pub skipped_blobs: usize,
    pub pushed_bytes: u64,
}

/// The image `remote` names, found in the store without the registry: only by digest, and
/// only when the manifest (through the host's platform's entry, for an index) and all its
/// blobs are there.
pub fn local(store: &Store, remote: &RemoteRef) -> Option<Pulled> {
    let digest = remote.digest()?;
    let complete = |digest: &Digest| {
        let image = store.image(digest).ok()?;
        image
            .manifest
            .layers
            .iter()
            .all(|l| store.has_blob(&l.digest))
            .then_some(())
    };
    let bytes = store.read_blob_verified(digest).ok()?;
    let (manifest, index) = match platform_entry(remote, &bytes) {
        Ok(Some(chosen)) => (chosen, Some(digest.clone())),
        Ok(None) => (digest.clone(), None),
        Err(_) => return None,
    };
    complete(&manifest)?;
    Some(Pulled {
        digest: manifest,
        index,
        fetched_blobs: 0,
    })
}

/// Pulls the image `remote` names into `txn` (which a failed bake or pull drops, leaving the
/// store as it was) unless `local` finds it: the manifest (the host's platform's, linux, when
/// the reference names an index), its config and layers, each checked against its digest
/// and size; blobs the store holds are not fetched.
pub fn pull(
    txn: &mut Transaction<'_>,
    remote: &RemoteRef,
    progress: Option<ProgressFn>,
) -> Result<Pulled, RegistryError> {
    if let Some(found) = local(txn.store(), remote) {
        return Ok(found);
    }
    let client = client(remote)?;
    let auth = auth::credentials(remote.registry())?;
    let pulled = block_on(async {
        let (bytes, digest) = fetch_manifest(&client, &auth, remote, &remote.reference).await?;
        if let Some(want) = remote.digest()
            && want != &digest
        {
            return Err(RegistryError::Corrupt {
                reference: remote.text.clone(),
                what: "manifest",
                digest: want.clone(),
                actual: digest,
            });
        }
        let mut index = None;
        let (bytes, digest) = match platform_entry(remote, &bytes)? {
            None => (bytes, digest),
            Some(chosen) => {
                txn.put_blob(&bytes).map_err(remote.store_err())?;
                index = Some(digest);
                let by_digest = remote.reference.clone_with_digest(chosen.to_string());
                let (bytes, actual) = fetch_manifest(&client, &auth, remote, &by_digest).await?;
                if actual != chosen {
                    return Err(RegistryError::Corrupt {
                        reference: remote.text.clone(),
                        what: "manifest",
                        digest: chosen,
                        actual,
                    });
                }
                (bytes, actual)
            }
        };
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| remote.unusable(format!("manifest {digest} is not valid: {e}")))?;
        for layer in &manifest.layers {
            if !LAYER_TYPES.contains(&layer.media_type.as_str()) {
                return Err(remote.unusable(format!(
                    "layer {} has media type {}, which graven cannot unpack (it reads tar and tar+gzip layers)",
                    layer.digest, layer.media_type
                )));
            }
        }
        let mut fetched_blobs = 0;
        for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
            if txn.store().has_blob(&blob.digest) {
                continue;
            }
            fetch_blob(&client, remote, txn, blob, progress.as_ref()).await?;
            fetched_blobs += 1;
        }
        txn.put_blob(&bytes).map_err(remote.store_err())?;
        // Reads the config back as an image config: a pull never stores an unusable image.
        txn.store().image(&digest).map_err(remote.store_err())?;
        Ok(Pulled {
            digest,
            index,
            fetched_blobs,
        })
    })?;
    pulled.map_err(|e| auth::explain(e, &auth))
}

/// Pushes the image `digest` of `store` to `remote` (tagged `latest` when no tag is given):
/// the blobs the registry lacks (a HEAD asks), then the manifest's bytes as the store holds
/// them, so the registry names it by the same digest.
pub fn push(
    store: &Store,
    digest: &Digest,
    remote: &RemoteRef,
    progress: Option<ProgressFn>,
) -> Result<Pushed, RegistryError> {
    if let Some(want) = remote.digest()
        && want != digest
    {
        return Err(remote.unusable(format!(
            "the image to push is {digest}; a digest in the target must be the image's own"
        )));
    }
    let bytes = store
        .read_blob_verified(digest)
        .map_err(remote.store_err())?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| remote.unusable(format!("manifest {digest} is not valid: {e}")))?;
    let target = match remote.reference.tag() {
        Some(_) => remote.reference.clone(),
        None => Reference::with_tag(
            remote.reference.registry().to_owned(),
            remote.reference.repository().to_owned(),
            "latest".to_owned(),
        ),
    };
    let client = client(remote)?;
    let auth = auth::credentials(remote.registry())?;
    let pushed = block_on(async {
        client
            .store_auth_if_needed(target.resolve_registry(), &auth)
            .await;
        let mut pushed = Pushed {
            reference: target.whole(),
            digest: digest.clone(),
            pushed_blobs: 0,
            skipped_blobs: 0,
            pushed_bytes: 0,
        };
        for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
            let exists = client
                .blob_exists(&target, blob.digest.as_str())
                .await
                .map_err(|e| remote.err(e))?;
            if exists {
                pushed.skipped_blobs += 1;
                continue;
            }
            pushed.pushed_bytes +=
                push_blob(&client, remote, &target, store, blob, &progress).await?;
            pushed.pushed_blobs += 1;
        }
        let media_type = manifest
            .media_type
            .as_deref()
            .unwrap_or(MEDIA_TYPE_MANIFEST);
        let content_type = http::HeaderValue::from_str(media_type)
            .map_err(|_| remote.unusable(format!("media type {media_type:?} is not a header")))?;
        client
            .push_manifest_raw(&target, bytes, content_type)
            .await
            .map_err(|e| remote.err(e))?;
        Ok(pushed)
    })?;
    pushed.map_err(|e| auth::explain(e, &auth))
}

fn client(remote: &RemoteRef) -> Result<Client, RegistryError> {
    let registry = remote.registry().to_owned();
    let config = ClientConfig {
        protocol: if plain_http(&registry) {
            ClientProtocol::HttpsExcept(vec![registry])
        } else {
            ClientProtocol::Https
        },
        // One PUT per blob, its body streamed from the store's file.
        use_monolithic_push: true,
        // graven chooses the platform itself, from the index's raw bytes.
        platform_resolver: None,
        connect_timeout: Some(Duration::from_secs(30)),
        read_timeout: Some(Duration::from_secs(300)),
        ..ClientConfig::default()
    };
    Client::try_from(config).map_err(|e| RegistryError::Client(e.to_string()))
}

/// Runs `future` on a runtime of its own on a thread of its own: the caller may be inside a
/// runtime already (which may not block on another), or a process that must stay
/// single-threaded once the call is over.
fn block_on<F>(future: F) -> Result<F::Output, RegistryError>
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| RegistryError::Client(e.to_string()))?;
                Ok(runtime.block_on(future))
            })
            .join()
            .unwrap_or_else(|_| Err(RegistryError::Client("its thread panicked".to_owned())))
    })
}

/// A manifest or index by `reference`, its size bounded, and the digest of its bytes.
async fn fetch_manifest(
    client: &Client,
    auth: &RegistryAuth,
    remote: &RemoteRef,
    reference: &Reference,
) -> Result<(Vec<u8>, Digest), RegistryError> {
    let (bytes, _) = client
        .pull_manifest_raw(reference, auth, ACCEPTED)
        .await
        .map_err(|e| match remote.err(e) {
            RegistryError::Corrupt {
                reference,
                digest,
                actual,
                ..
            } => RegistryError::Corrupt {
                reference,
                what: "manifest",
                digest,
                actual,
            },
            other => other,
        })?;
    if bytes.len() > MAX_MANIFEST_SIZE {
        return Err(remote.unusable(format!(
            "its manifest is {} bytes, more than the {MAX_MANIFEST_SIZE} graven reads",
            bytes.len()
        )));
    }
    let digest = Digest::of(&bytes);
    Ok((bytes.to_vec(), digest))
}

/// For an index (OCI or Docker's list), the manifest of the host's platform (linux and
/// `host_architecture`); `None` when `bytes` is an image manifest.
fn platform_entry(remote: &RemoteRef, bytes: &[u8]) -> Result<Option<Digest>, RegistryError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| remote.unusable(format!("its manifest is not valid json: {e}")))?;
    let media_type = value["mediaType"].as_str().unwrap_or_default();
    let is_index = [MEDIA_TYPE_INDEX, DOCKER_MANIFEST_LIST].contains(&media_type)
        || (media_type.is_empty() && value.get("manifests").is_some());
    if !is_index {
        return Ok(None);
    }
    let entries = value["manifests"].as_array().cloned().unwrap_or_default();
    let arch = host_architecture();
    let chosen = entries.iter().find(|m| {
        m["platform"]["os"] == "linux"
            && m["platform"]["architecture"] == arch
            && ACCEPTED.contains(&m["mediaType"].as_str().unwrap_or(MEDIA_TYPE_MANIFEST))
    });
    let Some(chosen) = chosen else {
        let offered: Vec<String> = entries
            .iter()
            .map(|m| {
                format!(
                    "{}/{}",
                    m["platform"]["os"].as_str().unwrap_or("?"),
                    m["platform"]["architecture"].as_str().unwrap_or("?")
                )
            })
            .collect();
        return Err(remote.unusable(format!(
            "its index has no image for linux/{arch} (it has {})",
            if offered.is_empty() {
                "none".to_owned()
            } else {
                offered.join(", ")
            }
        )));
    };
    let digest = chosen["digest"].as_str().unwrap_or_default();
    Digest::parse(digest)
        .map(Some)
        .map_err(|e| remote.unusable(format!("its index names {e}")))
}

/// Streams one blob into the store through `txn`, bounded by its descriptor's size and kept
/// only when it hashes to its digest.
async fn fetch_blob(
    client: &Client,
    remote: &RemoteRef,
    txn: &mut Transaction<'_>,
    blob: &Descriptor,
    progress: Option<&ProgressFn>,
) -> Result<(), RegistryError> {
    let descriptor = oci_client::manifest::OciDescriptor {
        media_type: blob.media_type.clone(),
        digest: blob.digest.to_string(),
        size: i64::try_from(blob.size).unwrap_or(i64::MAX),
        ..Default::default()
    };
    let mut stream = client
        .pull_blob_stream(&remote.reference, &descriptor)
        .await
        .map_err(|e| remote.err(e))?;
    let mut incoming = txn.incoming().map_err(remote.store_err())?;
    let io = |e: std::io::Error| {
        remote.store_err()(StoreError::Io {
            path: txn.store().root().to_owned(),
            source: e,
        })
    };
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            // The client's own check of the digest, at the stream's end, comes first.
            let verified = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<oci_client::errors::DigestError>());
            match verified {
                Some(oci_client::errors::DigestError::VerificationError { actual, .. })
                    if Digest::parse(actual).is_ok() =>
                {
                    RegistryError::Corrupt {
                        reference: remote.text.clone(),
                        what: "blob",
                        digest: blob.digest.clone(),
                        actual: Digest::parse(actual).expect("checked by the guard"),
                    }
                }
                _ => remote.err(e.into()),
            }
        })?;
        if incoming.len() + chunk.len() as u64 > blob.size {
            return Err(remote.unusable(format!(
                "blob {} is larger than the {} bytes its manifest says",
                blob.digest, blob.size
            )));
        }
        incoming.write_all(&chunk).map_err(io)?;
        if let Some(report) = progress.filter(|_| blob.size >= PROGRESS_THRESHOLD) {
            report(&BlobProgress {
                digest: blob.digest.clone(),
                done: incoming.len(),
                total: blob.size,
            });
        }
    }
    if incoming.len() != blob.size {
        return Err(remote.unusable(format!(
            "blob {} has {} bytes, its manifest says {}",
            blob.digest,
            incoming.len(),
            blob.size
        )));
    }
    txn.keep_incoming(incoming, &blob.digest)
        .map_err(|e| match e {
            StoreError::CorruptBlob { digest, actual } => RegistryError::Corrupt {
                reference: remote.text.clone(),
                what: "blob",
                digest,
                actual,
            },
            other => remote.store_err()(other),
        })?;
    Ok(())
}

/// Pushes one blob of the store, its body streamed from the blob's file; returns its size.
async fn push_blob(
    client: &Client,
    remote: &RemoteRef,
    target: &Reference,
    store: &Store,
    blob: &Descriptor,
    progress: &Option<ProgressFn>,
) -> Result<u64, RegistryError> {
    let mut file: File = store.open_blob(&blob.digest).map_err(remote.store_err())?;
    let size = file
        .metadata()
        .map_err(|e| {
            remote.store_err()(StoreError::Io {
                path: store.blob_path(&blob.digest),
                source: e,
            })
        })?
        .len();
    let digest = blob.digest.clone();
    let report = progress.clone().filter(|_| size >= PROGRESS_THRESHOLD);
    let mut done = 0u64;
    let chunks = std::iter::from_fn(move || {
        let mut buf = vec![0u8; CHUNK];
        match file.read(&mut buf) {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                done += n as u64;
                if let Some(report) = &report {
                    report(&BlobProgress {
                        digest: digest.clone(),
                        done,
                        total: size,
                    });
                }
                Some(Ok(bytes::Bytes::from(buf)))
            }
            Err(e) => Some(Err(oci_client::errors::OciDistributionError::IoError(e))),
        }
    });
    client
        .push_blob_stream(
            target,
            futures_util::stream::iter(chunks),
            blob.digest.as_str(),
            Some(size),
        )
        .await
        .map_err(|e| remote.err(e))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_with_a_host_are_remote() {
        let remote = |text: &str| {
            RemoteRef::parse(text)
                .unwrap()
                .map(|r| r.registry().to_owned())
        };
        assert_eq!(remote("debian:12"), None);
        assert_eq!(remote("library/debian"), None);
        assert_eq!(remote("app"), None);
        assert_eq!(remote("./images/base.tar"), None);
        assert_eq!(remote("../base:1"), None);
        assert_eq!(remote("/abs/base.tar"), None);
        assert_eq!(
            remote("127.0.0.1:5000/app").as_deref(),
            Some("127.0.0.1:5000")
        );
        assert_eq!(remote("localhost/x/y:1").as_deref(), Some("localhost"));
        assert_eq!(
            remote("registry.example/x/y:1").as_deref(),
            Some("registry.example")
        );
        assert_eq!(
            remote("docker.io/library/debian:12").as_deref(),
            Some("index.docker.io")
        );
        let pinned = RemoteRef::parse(&format!("localhost:5000/a@{}", Digest::of(b"x")))
            .unwrap()
            .unwrap();
        assert_eq!(pinned.digest(), Some(&Digest::of(b"x")));
        assert!(RemoteRef::parse("localhost:5000/A").is_err());
        assert!(RemoteRef::parse("localhost:5000/a@sha256:12").is_err());
    }

    #[test]
    fn plain_http_only_for_loopback_and_listed_registries() {
        for (registry, plain) in [
            ("localhost:5000", true),
            ("localhost", true),
            ("127.0.0.1:5000", true),
            ("127.1.2.3", true),
            ("[::1]:5000", true),
            ("0.0.0.0:5000", false),
            ("10.0.0.1:5000", false),
            ("registry.example", false),
            ("localhost.example:5000", false),
        ] {
            assert_eq!(plain_http(registry), plain, "{registry}");
        }
    }

    #[test]
    fn host_and_port_split_as_written() {
        assert_eq!(split_host_port("a.b:5000"), ("a.b", Some("5000")));
        assert_eq!(split_host_port("a.b"), ("a.b", None));
        assert_eq!(split_host_port("[::1]:5000"), ("::1", Some("5000")));
        assert_eq!(split_host_port("[::1]"), ("::1", None));
        assert_eq!(split_host_port("::1"), ("::1", None));
    }
}
