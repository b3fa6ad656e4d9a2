//! The store owns graven's local content-addressed image store under `$GRAVEN_HOME/store`.
//!
//! The store is an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`), so
//! `skopeo inspect oci:$GRAVEN_HOME/store:TAG` and `umoci` read it as it is. Tags are the
//! `org.opencontainers.image.ref.name` annotations of `index.json`.
//!
//! Invariants: a blob file's name is the sha256 of its bytes (written to a temp file, fsynced,
//! renamed); `index.json` is replaced atomically under an exclusive lock; a tag only ever names
//! a manifest whose blobs are all present. The store knows nothing of Containerfiles, instances
//! or services.

mod digest;
mod export;
mod gc;
mod import;
pub mod inroot;
mod layer;
mod oci;
mod pgzip;
pub mod snapshot;
mod txn;
mod unpack;

pub use digest::{Digest, DigestError};
pub use export::{ExportFormat, docker_repo_tag};
pub use gc::GcReport;
pub use import::{ImportKind, host_architecture};
pub use layer::{
    Compressing, FinishedLayer, GZIP_LEVEL, LayerWriter, StagedLayer, StagingWriter, compress_into,
    decompressed, is_gzip,
};
pub use oci::{
    Descriptor, HealthConfig, ImageConfig, ImageIndex, MEDIA_TYPE_CONFIG, MEDIA_TYPE_INDEX,
    MEDIA_TYPE_LAYER, MEDIA_TYPE_LAYER_GZIP, MEDIA_TYPE_MANIFEST, Manifest, RootFs, RuntimeConfig,
    to_canonical_json,
};
pub use txn::{IncomingBlob, Transaction};
pub use unpack::unpack_tar;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// The annotation OCI layouts use to name a manifest.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// graven's annotation recording where an image came from (a Containerfile path, an import).
pub const CREATED_FROM: &str = "dev.graven.created-from";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("image {reference:?} is not in the store")]
    UnknownImage { reference: String },
    #[error(
        "image reference {reference:?} is ambiguous: it matches {}; give more of the digest",
        candidates.iter().map(Digest::as_str).collect::<Vec<_>>().join(", ")
    )]
    AmbiguousImage {
        reference: String,
        candidates: Vec<Digest>,
    },
    #[error("blob {digest} is missing from the store")]
    MissingBlob { digest: Digest },
    #[error("blob {digest} is corrupt: its content hashes to {actual}")]
    CorruptBlob { digest: Digest, actual: Digest },
    #[error("{what} {digest} is not valid json: {source}")]
    BadJson {
        what: &'static str,
        digest: Digest,
        source: serde_json::Error,
    },
    #[error("tag {tag:?} is not valid: {reason}")]
    BadTag { tag: String, reason: &'static str },
    #[error("cannot import {path}: {reason}")]
    BadImport { path: PathBuf, reason: String },
    #[error("layer {digest}: {reason}")]
    BadLayer { digest: Digest, reason: String },
    #[error(
        "layer {digest}: the image unpacks to more than {limit} bytes (the bound is set by {MAX_IMAGE_SIZE_VAR})"
    )]
    TooLarge { digest: Digest, limit: u64 },
    #[error(
        "{MAX_IMAGE_SIZE_VAR}={value:?} is not a size: write bytes or a number with a unit, as in graven.toml (512M, 16GiB, 20GB)"
    )]
    BadMaxImageSize { value: String },
    #[error(transparent)]
    Digest(#[from] DigestError),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The fewest hex digits a digest prefix may have to name an image: short enough to type,
/// long enough that a word made of hex letters (`cafe`, `dead`) is not taken for a digest.
pub const MIN_DIGEST_PREFIX: usize = 6;
/// The name prefix of the store's temp files (a blob before it is named, `index.json`'s
/// replacement).
const TEMP: &str = ".tmp-";
/// The largest blob read as a manifest or index; layers are larger and never parsed.
const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

/// The environment variable that bounds how large an image may be once unpacked.
pub const MAX_IMAGE_SIZE_VAR: &str = "GRAVEN_MAX_IMAGE_SIZE";
/// The bound when the variable is unset: room for real images (a Debian with PostgreSQL is
/// about 1 GiB) many times over, and still far below a laptop's free disk, so a 1.5 MB gzip
/// bomb (a layer of zeros compresses about 1000 to 1) stops at 16 GiB instead of filling it.
pub const DEFAULT_MAX_IMAGE_SIZE: u64 = 16 << 30;

/// How many bytes an image (all its layers, or one ADD archive) may take unpacked:
/// `$GRAVEN_MAX_IMAGE_SIZE` (a size as `graven.toml` writes one), else `DEFAULT_MAX_IMAGE_SIZE`.
pub fn max_image_size() -> Result<u64> {
    match std::env::var(MAX_IMAGE_SIZE_VAR) {
        Ok(value) if !value.trim().is_empty() => {
            crate::size::parse(&value).map_err(|_| StoreError::BadMaxImageSize { value })
        }
        _ => Ok(DEFAULT_MAX_IMAGE_SIZE),
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `CorruptBlob` unless `actual`, what some content hashes to, is the `digest` it claims.
fn check_digest(digest: &Digest, actual: Digest) -> Result<()> {
    if &actual != digest {
        return Err(StoreError::CorruptBlob {
            digest: digest.clone(),
            actual,
        });
    }
    Ok(())
}

/// One manifest the store holds, with its parsed config.
#[derive(Debug, Clone)]
pub struct Image {
    pub digest: Digest,
    pub manifest: Manifest,
    pub config: ImageConfig,
    /// The size of the manifest, config and layer blobs together.
    pub size: u64,
}

/// A tag and the manifest it names, as listed by `graven images`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TaggedImage {
    pub tag: String,
    pub digest: Digest,
    pub created_from: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// `$GRAVEN_HOME`, else `$XDG_DATA_HOME/graven`, else `~/.local/share/graven`.
    pub fn default_home() -> PathBuf {
        if let Some(home) = std::env::var_os("GRAVEN_HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(home);
        }
        if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(data).join("graven");
        }
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/root"));
        home.join(".local/share/graven")
    }

    /// Opens (creating when absent) the store under `home`.
    pub fn open(home: &Path) -> Result<Store> {
        let root = home.join("store");
        let blobs = root.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let layout = root.join("oci-layout");
        if !layout.exists() {
            write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index = root.join("index.json");
        if !index.exists() {
            write_atomic(&index, &oci::to_canonical_json(&ImageIndex::default()))?;
        }
        Ok(Store { root })
    }

    /// The OCI layout directory (`oci:<this>:TAG` for skopeo).
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm())
            .join(digest.hex())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Writes `bytes` as a blob (temp file, fsync, rename) and returns its digest.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        let path = self.blob_path(&digest);
        if !path.is_file() {
            write_atomic(&path, bytes)?;
        }
        Ok(digest)
    }

    /// Moves a finished temp file into the store as the blob `digest`. The caller has hashed
    /// the content to `digest` while writing it (layers streamed to disk while compressing,
    /// blobs copied in), so it is not read again here.
    fn put_blob_file(&self, file: tempfile::NamedTempFile, digest: &Digest) -> Result<()> {
        let path = self.blob_path(digest);
        if path.is_file() {
            return Ok(());
        }
        file.as_file().sync_all().map_err(io_err(file.path()))?;
        file.persist(&path).map_err(|e| StoreError::Io {
            path: path.clone(),
            source: e.error,
        })?;
        sync_dir(path.parent().unwrap_or(&self.root))
    }

    /// A temp file on the store's filesystem, for streaming a blob before it is named.
    pub fn temp_file(&self) -> Result<tempfile::NamedTempFile> {
        let dir = self.root.join("blobs");
        tempfile::Builder::new()
            .prefix(TEMP)
            .tempfile_in(&dir)
            .map_err(io_err(&dir))
    }

    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        match fs::read(&path) {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::MissingBlob {
                digest: digest.clone(),
            }),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Reads a blob and checks its content against its name.
    pub fn read_blob_verified(&self, digest: &Digest) -> Result<Vec<u8>> {
        let bytes = self.read_blob(digest)?;
        check_digest(digest, Digest::of(&bytes))?;
        Ok(bytes)
    }

    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        let path = self.blob_path(digest);
        File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::MissingBlob {
                digest: digest.clone(),
            },
            _ => io_err(&path)(e),
        })
    }

    pub fn index(&self) -> Result<ImageIndex> {
        let path = self.root.join("index.json");
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        serde_json::from_slice(&bytes).map_err(|source| StoreError::BadJson {
            what: "index.json",
            digest: Digest::of(&bytes),
            source,
        })
    }

    /// Opens (creating) the lock file `name` in the store and flocks it, shared or exclusive;
    /// the lock lasts as long as the returned file.
    fn lock(&self, name: &str, exclusive: bool) -> Result<File> {
        let path = self.root.join(name);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let mode = if exclusive {
            rustix::fs::FlockOperation::LockExclusive
        } else {
            rustix::fs::FlockOperation::LockShared
        };
        rustix::fs::flock(&lock, mode).map_err(|e| io_err(&path)(e.into()))?;
        Ok(lock)
    }

    /// Replaces `index.json` with what `change` makes of it, under an exclusive lock so two
    /// graven processes never lose each other's tags.
    pub fn update_index<T>(&self, change: impl FnOnce(&mut ImageIndex) -> Result<T>) -> Result<T> {
        let _lock = self.lock("index.lock", true)?;
        let mut index = self.index()?;
        let out = change(&mut index)?;
        write_atomic(
            &self.root.join("index.json"),
            &oci::to_canonical_json(&index),
        )?;
        Ok(out)
    }

    /// Points `tag` at the manifest `digest` (which must be in the store with all its blobs).
    pub fn tag(&self, tag: &str, digest: &Digest, created_from: Option<&str>) -> Result<()> {
        validate_tag(tag)?;
        let image = self.image(digest)?;
        for layer in &image.manifest.layers {
            if !self.has_blob(&layer.digest) {
                return Err(StoreError::MissingBlob {
                    digest: layer.digest.clone(),
                });
            }
        }
        let path = self.blob_path(digest);
        let size = fs::metadata(&path).map_err(io_err(&path))?.len();
        self.update_index(|index| {
            index
                .manifests
                .retain(|m| m.annotation(REF_NAME) != Some(tag));
            let mut descriptor = Descriptor::new(MEDIA_TYPE_MANIFEST, digest.clone(), size);
            descriptor.set_annotation(REF_NAME, tag);
            if let Some(from) = created_from {
                descriptor.set_annotation(CREATED_FROM, from);
            }
            index.manifests.push(descriptor);
            index
                .manifests
                .sort_by(|a, b| a.annotation(REF_NAME).cmp(&b.annotation(REF_NAME)));
            Ok(())
        })
    }

    pub fn tags(&self) -> Result<Vec<TaggedImage>> {
        Ok(self
            .index()?
            .manifests
            .iter()
            .filter_map(|m| {
                Some(TaggedImage {
                    tag: m.annotation(REF_NAME)?.to_owned(),
                    digest: m.digest.clone(),
                    created_from: m.annotation(CREATED_FROM).map(str::to_owned),
                })
            })
            .collect())
    }

    /// Resolves a tag, a full digest (`sha256:…`), or a unique prefix of a manifest's digest
    /// (at least `MIN_DIGEST_PREFIX` hex digits, with or without `sha256:`, as `graven
    /// images` and `graven releases` print them) to a manifest digest that is in the store.
    /// A prefix matches every image the store holds, tagged or not (a release's image need
    /// not be tagged); one that matches several is an error naming them.
    pub fn resolve(&self, reference: &str) -> Result<Digest> {
        let unknown = || StoreError::UnknownImage {
            reference: reference.to_owned(),
        };
        if let Ok(digest) = Digest::parse(reference) {
            return if self.has_blob(&digest) {
                Ok(digest)
            } else {
                Err(unknown())
            };
        }
        if let Some(tagged) = self.tags()?.into_iter().find(|t| t.tag == reference) {
            return Ok(tagged.digest);
        }
        let prefix = reference.strip_prefix("sha256:").unwrap_or(reference);
        if prefix.len() < MIN_DIGEST_PREFIX || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(unknown());
        }
        let mut found = self.manifests_starting_with(&prefix.to_ascii_lowercase())?;
        match found.len() {
            0 => Err(unknown()),
            1 => Ok(found.remove(0)),
            _ => Err(StoreError::AmbiguousImage {
                reference: reference.to_owned(),
                candidates: found,
            }),
        }
    }

    /// The manifests in the store whose digest's hex starts with `prefix`, in order.
    fn manifests_starting_with(&self, prefix: &str) -> Result<Vec<Digest>> {
        let dir = self.root.join("blobs/sha256");
        let mut found = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let Some(digest) = entry
                .file_name()
                .to_str()
                .filter(|hex| hex.starts_with(prefix))
                .and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok())
            else {
                continue;
            };
            // Only a small blob can be a manifest: a layer is neither read nor hashed.
            let small = entry.metadata().is_ok_and(|m| m.len() <= MAX_MANIFEST_SIZE);
            if small && self.image(&digest).is_ok() {
                found.push(digest);
            }
        }
        found.sort();
        Ok(found)
    }

    /// Reads a manifest and its config.
    pub fn image(&self, digest: &Digest) -> Result<Image> {
        let manifest_bytes = self.read_blob_verified(digest)?;
        let manifest: Manifest =
            serde_json::from_slice(&manifest_bytes).map_err(|source| StoreError::BadJson {
                what: "manifest",
                digest: digest.clone(),
                source,
            })?;
        let config_bytes = self.read_blob_verified(&manifest.config.digest)?;
        let config: ImageConfig =
            serde_json::from_slice(&config_bytes).map_err(|source| StoreError::BadJson {
                what: "image config",
                digest: manifest.config.digest.clone(),
                source,
            })?;
        let size = manifest_bytes.len() as u64
            + manifest.config.size
            + manifest.layers.iter().map(|l| l.size).sum::<u64>();
        Ok(Image {
            digest: digest.clone(),
            manifest,
            config,
            size,
        })
    }

    /// Writes a config and a manifest over already-stored layers; returns the manifest digest.
    pub fn put_image(&self, config: &ImageConfig, layers: Vec<Descriptor>) -> Result<Digest> {
        let (config, manifest) = image_blobs(config, layers);
        self.put_blob(&config)?;
        self.put_blob(&manifest)
    }
}

/// The bytes of `config` and of a manifest naming it over `layers`, as `put_image` stores
/// them, with or without a transaction.
fn image_blobs(config: &ImageConfig, layers: Vec<Descriptor>) -> (Vec<u8>, Vec<u8>) {
    let config_bytes = oci::to_canonical_json(config);
    let manifest = Manifest::new(
        Descriptor::new(
            MEDIA_TYPE_CONFIG,
            Digest::of(&config_bytes),
            config_bytes.len() as u64,
        ),
        layers,
    );
    (config_bytes, oci::to_canonical_json(&manifest))
}

fn validate_tag(tag: &str) -> Result<()> {
    let bad = |reason| {
        Err(StoreError::BadTag {
            tag: tag.to_owned(),
            reason,
        })
    };
    if tag.is_empty() || tag.len() > 128 {
        return bad("a tag has 1 to 128 characters");
    }
    if tag.starts_with("sha256:") {
        return bad("a tag may not look like a digest");
    }
    if !tag
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-:/".contains(&b))
    {
        return bad("a tag may hold only letters, digits and . _ - : /");
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temp file in the same directory: written, fsynced,
/// renamed, and the directory fsynced, so a crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = tempfile::Builder::new()
        .prefix(TEMP)
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    file.write_all(bytes).map_err(io_err(path))?;
    file.as_file().sync_all().map_err(io_err(path))?;
    file.persist(path).map_err(|e| StoreError::Io {
        path: path.to_owned(),
        source: e.error,
    })?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Hashes a reader to its digest while counting its bytes.
pub fn digest_reader(mut reader: impl Read) -> io::Result<(Digest, u64)> {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((Digest::from_sha256(hasher.finalize().into()), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_round_trip_and_tags() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let layer = store.put_blob(b"layer").unwrap();
        let config = ImageConfig::default();
        let digest = store
            .put_image(
                &config,
                vec![Descriptor::new(MEDIA_TYPE_LAYER_GZIP, layer, 5)],
            )
            .unwrap();
        store.tag("hello:1", &digest, Some("test")).unwrap();
        assert_eq!(store.resolve("hello:1").unwrap(), digest);
        assert_eq!(store.resolve(&digest.hex()[..8]).unwrap(), digest);
        assert_eq!(store.resolve(digest.as_str()).unwrap(), digest);
        assert!(matches!(
            store.resolve("nope"),
            Err(StoreError::UnknownImage { .. })
        ));
        let image = store.image(&digest).unwrap();
        assert_eq!(image.manifest.layers.len(), 1);
        // Reopening finds the same tags.
        let again = Store::open(home.path()).unwrap();
        assert_eq!(
            again.tags().unwrap()[0].created_from.as_deref(),
            Some("test")
        );
    }

    #[test]
    fn tag_refuses_missing_layers() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let missing = Digest::of(b"not stored");
        let digest = store
            .put_image(
                &ImageConfig::default(),
                vec![Descriptor::new(MEDIA_TYPE_LAYER_GZIP, missing, 1)],
            )
            .unwrap();
        assert!(matches!(
            store.tag("x", &digest, None),
            Err(StoreError::MissingBlob { .. })
        ));
        assert!(store.tags().unwrap().is_empty());
    }

    #[test]
    fn corrupt_blob_is_detected() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let digest = store.put_blob(b"{}").unwrap();
        fs::write(store.blob_path(&digest), b"{ }").unwrap();
        assert!(matches!(
            store.read_blob_verified(&digest),
            Err(StoreError::CorruptBlob { .. })
        ));
    }

    /// Regression (issue 11, item 6): a short digest that `graven releases` printed did not
    /// resolve, since only tagged images were searched and a release's image is untagged.
    /// Every manifest in the store resolves by a unique prefix; an ambiguous one names the
    /// candidates; a layer or a config never resolves by prefix.
    #[test]
    fn untagged_manifests_resolve_by_prefix_and_ambiguous_prefixes_name_candidates() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let layer = store.put_blob(b"layer").unwrap();
        let config = ImageConfig::default();
        // Two manifests whose digests share their first 6 hex digits (a birthday search).
        let mut seen = std::collections::HashMap::new();
        let (first, second) = (1u64..)
            .find_map(|size| {
                let layers = vec![Descriptor::new(MEDIA_TYPE_LAYER_GZIP, layer.clone(), size)];
                let (config_bytes, manifest) = image_blobs(&config, layers);
                let digest = Digest::of(&manifest);
                let prefix = digest.hex()[..MIN_DIGEST_PREFIX].to_owned();
                seen.insert(prefix, (config_bytes.clone(), manifest.clone()))
                    .map(|earlier| (earlier, (config_bytes, manifest)))
            })
            .unwrap();
        store.put_blob(&first.0).unwrap();
        let a = store.put_blob(&first.1).unwrap();
        let b = store.put_blob(&second.1).unwrap();
        let shared = &a.hex()[..MIN_DIGEST_PREFIX];
        match store.resolve(shared) {
            Err(error @ StoreError::AmbiguousImage { .. }) => {
                let text = error.to_string();
                assert!(
                    text.contains(a.as_str()) && text.contains(b.as_str()),
                    "{text}"
                );
            }
            other => panic!("{other:?}"),
        }
        // A longer prefix, with or without `sha256:`, in either case, picks one.
        let unique = |d: &Digest| {
            (MIN_DIGEST_PREFIX..64)
                .map(|n| d.hex()[..n].to_owned())
                .find(|p| !a.hex().starts_with(p.as_str()) || !b.hex().starts_with(p.as_str()))
                .unwrap()
        };
        assert_eq!(store.resolve(&unique(&a)).unwrap(), a);
        assert_eq!(store.resolve(&format!("sha256:{}", unique(&b))).unwrap(), b);
        assert_eq!(store.resolve(&unique(&a).to_ascii_uppercase()).unwrap(), a);
        // Too short, a layer, a config: not images.
        assert!(store.resolve(&a.hex()[..MIN_DIGEST_PREFIX - 1]).is_err());
        assert!(store.resolve(&layer.hex()[..12]).is_err());
        assert!(store.resolve(&Digest::of(&first.0).hex()[..12]).is_err());
    }
}
