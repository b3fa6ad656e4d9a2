//! Importing images from outside: an OCI layout directory, an OCI archive (a tar of one), or a
//! docker-archive tarball (`docker save`). Every blob is checked against its digest on the way
//! in; docker-archive layers (uncompressed tars) are stored gzip-compressed the way graven
//! writes its own layers, so their diff_ids, and therefore the config, stay what they were.

use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Component, Path, PathBuf};

use super::layer::{compress_into, decompressed, is_gzip};
use super::{
    Descriptor, Digest, ImageConfig, MEDIA_TYPE_CONFIG, MEDIA_TYPE_LAYER_GZIP, Manifest, REF_NAME,
    Result, StoreError, Transaction, check_digest, digest_reader, oci,
};

/// Where an image to import is, as `FROM` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportKind {
    /// Detect from the path: a directory with `oci-layout` or `manifest.json`, or a tar file.
    Detect,
    OciLayout,
    OciArchive,
    DockerArchive,
}

fn bad(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::BadImport {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// The host's OCI architecture name.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

impl Transaction<'_> {
    /// Imports the image at `path`; `tag` picks one when the source holds several.
    /// Returns the manifest digest in the store.
    pub fn import(&mut self, path: &Path, kind: ImportKind, tag: Option<&str>) -> Result<Digest> {
        let meta = fs::metadata(path).map_err(|e| bad(path, format!("cannot read it: {e}")))?;
        let (dir, _unpacked) = if meta.is_dir() {
            (path.to_owned(), None)
        } else {
            let temp = tempfile::Builder::new()
                .prefix("graven-import-")
                .tempdir()
                .map_err(|e| bad(path, e.to_string()))?;
            unpack_archive(path, temp.path())?;
            (temp.path().to_owned(), Some(temp))
        };
        let has_layout = dir.join("oci-layout").is_file();
        let has_docker = dir.join("manifest.json").is_file();
        let docker = match kind {
            ImportKind::DockerArchive => true,
            ImportKind::OciLayout | ImportKind::OciArchive => false,
            ImportKind::Detect => has_docker,
        };
        let digest = if docker {
            if !has_docker {
                return Err(bad(path, "it has no manifest.json: not a docker-archive"));
            }
            self.import_docker(path, &dir, tag)?
        } else {
            if !has_layout {
                return Err(bad(
                    path,
                    "it is neither an OCI layout (no oci-layout file) nor a docker-archive (no manifest.json)",
                ));
            }
            self.import_oci(path, &dir, tag)?
        };
        self.make_snapshots(&digest);
        Ok(digest)
    }

    /// Unpacks the snapshots of the image's layer chains (`snapshot`) where missing, as
    /// `docker load` unpacks an image it loads, and writes the layers' path indexes: the first
    /// RUN, COPY or WORKDIR on the image then starts at once. Only a cache: where it cannot be made (no overlayfs, `GRAVEN_BAKE_OVERLAY=0`, a
    /// layer past the image's bound) the first RUN that needs it makes it, or says why not.
    fn make_snapshots(&self, digest: &Digest) {
        let store = self.store();
        let Ok(image) = store.image(digest) else {
            return;
        };
        let (layers, diff_ids) = (&image.manifest.layers, &image.config.rootfs.diff_ids);
        if layers.is_empty() {
            return;
        }
        if super::snapshot::overlay_wanted() {
            let _ = super::snapshot::with_private_mounts(|| store.snapshots(layers, diff_ids));
        }
        // And the path indexes a COPY or WORKDIR on it reads instead of the layers.
        for layer in layers {
            if store.path_index(&layer.digest).is_none()
                && let Ok(tar) = decompressed(&store.blob_path(&layer.digest))
                && let Ok(changes) = super::snapshot::tar_path_changes(tar)
            {
                let _ = store.put_path_index(&layer.digest, &changes);
            }
        }
    }

    fn import_oci(&mut self, origin: &Path, dir: &Path, tag: Option<&str>) -> Result<Digest> {
        let blob = |digest: &Digest| {
            dir.join("blobs")
                .join(digest.algorithm())
                .join(digest.hex())
        };
        let index_bytes = read_regular(origin, &dir.join("index.json"))?;
        let index: oci::ImageIndex = serde_json::from_slice(&index_bytes)
            .map_err(|e| bad(origin, format!("index.json is not valid: {e}")))?;
        let chosen = choose(origin, "index.json", &index.manifests, tag, |m, tag| {
            m.annotation(REF_NAME) == Some(tag)
        })?;
        let mut digest = chosen.digest.clone();
        let mut bytes = read_verified(origin, &blob(&digest), &digest)?;
        // A multi-platform index: take the host's platform, else its first image.
        let raw: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| bad(origin, format!("blob {digest} is not valid json: {e}")))?;
        if let Some(list) = raw.get("manifests").and_then(|m| m.as_array()) {
            let arch = host_architecture();
            let pick = list
                .iter()
                .find(|m| m["platform"]["architecture"] == arch && m["platform"]["os"] == "linux")
                .or(list.first())
                .ok_or_else(|| bad(origin, format!("image index {digest} is empty")))?;
            digest = Digest::parse(pick["digest"].as_str().unwrap_or_default())?;
            bytes = read_verified(origin, &blob(&digest), &digest)?;
        }
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| bad(origin, format!("manifest {digest} is not valid: {e}")))?;
        for descriptor in std::iter::once(&manifest.config).chain(&manifest.layers) {
            let path = blob(&descriptor.digest);
            regular_file(origin, &path)?;
            self.copy_blob_from(&path, &descriptor.digest)?;
        }
        self.put_blob(&bytes)
    }

    fn import_docker(&mut self, origin: &Path, dir: &Path, tag: Option<&str>) -> Result<Digest> {
        let manifest_bytes = read_regular(origin, &dir.join("manifest.json"))?;
        let entries: Vec<DockerManifestEntry> = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| bad(origin, format!("manifest.json is not valid: {e}")))?;
        let entry = choose(origin, "manifest.json", &entries, tag, |e, tag| {
            e.repo_tags
                .iter()
                .flatten()
                .any(|t| t == tag || t.rsplit('/').next() == Some(tag))
        })?;
        let config_bytes = read_regular(origin, &inside(origin, dir, &entry.config)?)?;
        let config: ImageConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| bad(origin, format!("image config is not valid: {e}")))?;
        if config.rootfs.diff_ids.len() != entry.layers.len() {
            return Err(bad(
                origin,
                format!(
                    "its config lists {} layers but manifest.json {}",
                    config.rootfs.diff_ids.len(),
                    entry.layers.len()
                ),
            ));
        }
        let config_digest = self.put_blob(&config_bytes)?;
        let mut layers = Vec::new();
        for (layer_path, want) in entry.layers.iter().zip(&config.rootfs.diff_ids) {
            let path = inside(origin, dir, layer_path)?;
            regular_file(origin, &path)?;
            let gzipped = is_gzip(&path).map_err(|e| bad(origin, format!("{layer_path}: {e}")))?;
            let open = || File::open(&path).map_err(|e| bad(origin, format!("{layer_path}: {e}")));
            let (descriptor, diff_id) = if gzipped {
                let digest = Digest::of_file(&path).map_err(|e| bad(origin, e.to_string()))?;
                let (diff_id, _) =
                    digest_reader(flate2::read::GzDecoder::new(BufReader::new(open()?)))
                        .map_err(|e| bad(origin, format!("{layer_path}: {e}")))?;
                let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                self.copy_blob_from(&path, &digest)?;
                (
                    Descriptor::new(MEDIA_TYPE_LAYER_GZIP, digest, size),
                    diff_id,
                )
            } else {
                let finished = compress_into(self.store(), BufReader::new(open()?))?;
                let diff_id = finished.diff_id.clone();
                (finished.keep(self)?, diff_id)
            };
            if &diff_id != want {
                return Err(bad(
                    origin,
                    format!("layer {layer_path} hashes to {diff_id}, its config says {want}"),
                ));
            }
            layers.push(descriptor);
        }
        let manifest = Manifest::new(
            Descriptor::new(MEDIA_TYPE_CONFIG, config_digest, config_bytes.len() as u64),
            layers,
        );
        self.put_blob(&oci::to_canonical_json(&manifest))
    }
}

/// The image of `list` (the entries of the source's `file`) that `tag` names, or without a tag
/// its only one.
fn choose<'a, T>(
    origin: &Path,
    file: &str,
    list: &'a [T],
    tag: Option<&str>,
    tagged: impl Fn(&T, &str) -> bool,
) -> Result<&'a T> {
    match (tag, list) {
        (Some(tag), _) => list
            .iter()
            .find(|item| tagged(item, tag))
            .ok_or_else(|| bad(origin, format!("it has no image tagged {tag:?}"))),
        (None, [only]) => Ok(only),
        (None, []) => Err(bad(origin, format!("its {file} lists no image"))),
        (None, _) => Err(bad(
            origin,
            "it holds several images: name one with :TAG after the path",
        )),
    }
}

/// A path named inside an archive's manifest, which must stay inside the archive: lexically,
/// and also after the archive's own symlinks are followed (`out -> /etc`, then `out/passwd`).
/// Returns the resolved path.
fn inside(origin: &Path, dir: &Path, relative: &str) -> Result<PathBuf> {
    let outside = || bad(origin, format!("{relative:?} points outside the archive"));
    let rel = Path::new(relative);
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(outside());
    }
    let path = dir.join(rel);
    let resolve =
        |p: &Path| fs::canonicalize(p).map_err(|e| bad(origin, format!("{}: {e}", path.display())));
    let resolved = resolve(&path)?;
    if !resolved.starts_with(resolve(dir)?) {
        return Err(outside());
    }
    Ok(resolved)
}

fn regular_file(origin: &Path, path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(bad(
            origin,
            format!("{} is not a regular file", path.display()),
        )),
        Err(e) => Err(bad(origin, format!("{}: {e}", path.display()))),
    }
}

fn read_regular(origin: &Path, path: &Path) -> Result<Vec<u8>> {
    regular_file(origin, path)?;
    fs::read(path).map_err(|e| bad(origin, format!("{}: {e}", path.display())))
}

fn read_verified(origin: &Path, path: &Path, digest: &Digest) -> Result<Vec<u8>> {
    let bytes = read_regular(origin, path)?;
    check_digest(digest, Digest::of(&bytes))?;
    Ok(bytes)
}

/// Unpacks a (possibly gzipped) tar; the tar crate refuses entries that escape `into`.
fn unpack_archive(path: &Path, into: &Path) -> Result<()> {
    let reader = decompressed(path).map_err(|e| bad(path, e.to_string()))?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(false);
    archive
        .unpack(into)
        .map_err(|e| bad(path, format!("it is not a readable tar archive: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    /// A docker-archive whose manifest names `layer_path` for its one layer, with `symlink`
    /// (name, target) among its entries; the config's diff_id is that of `layer`.
    fn docker_archive(layer: &[u8], layer_path: &str, symlink: Option<(&str, &Path)>) -> Vec<u8> {
        let mut config = ImageConfig::default();
        config.rootfs.diff_ids.push(Digest::of(layer));
        let manifest =
            format!(r#"[{{"Config":"config.json","RepoTags":["t:1"],"Layers":["{layer_path}"]}}]"#);
        let mut tar = tar::Builder::new(Vec::new());
        let mut add = |name: &str, bytes: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, name, bytes).unwrap();
        };
        add("manifest.json", manifest.as_bytes());
        add("config.json", &oci::to_canonical_json(&config));
        add("layer.tar", layer);
        if let Some((name, target)) = symlink {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            tar.append_link(&mut header, name, target).unwrap();
        }
        tar.into_inner().unwrap()
    }

    fn import(archive: &[u8]) -> Result<Digest> {
        let work = tempfile::tempdir().unwrap();
        let path = work.path().join("image.tar");
        fs::write(&path, archive).unwrap();
        let store = Store::open(&work.path().join("home")).unwrap();
        let mut txn = store.transaction().unwrap();
        txn.import(&path, ImportKind::DockerArchive, None)
    }

    /// Blobs are hashed while they are copied in: one that does not hash to its name is refused.
    #[test]
    fn oci_layout_blob_that_does_not_hash_to_its_name_is_refused() {
        let work = tempfile::tempdir().unwrap();
        // A store is an OCI layout, so one serves as the source.
        let source = Store::open(&work.path().join("source")).unwrap();
        let layer = source.put_blob(b"layer").unwrap();
        let layers = vec![Descriptor::new(MEDIA_TYPE_LAYER_GZIP, layer.clone(), 5)];
        let image = source.put_image(&ImageConfig::default(), layers).unwrap();
        source.tag("t", &image, None).unwrap();
        let import = |home: &str| {
            let store = Store::open(&work.path().join(home)).unwrap();
            let mut txn = store.transaction().unwrap();
            txn.import(source.root(), ImportKind::OciLayout, None)
        };
        // The control: the intact layout imports.
        assert_eq!(import("intact").unwrap(), image);
        fs::write(source.blob_path(&layer), b"other").unwrap();
        let result = import("corrupt");
        assert!(
            matches!(&result, Err(StoreError::CorruptBlob { digest, .. }) if digest == &layer),
            "{result:?}"
        );
    }

    #[test]
    fn docker_archive_symlink_cannot_lead_outside_the_archive() {
        let secret = b"a host file the archive must not read".to_vec();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("layer.tar"), &secret).unwrap();
        // The control: the same bytes inside the archive import.
        import(&docker_archive(&secret, "layer.tar", None)).unwrap();
        let escaping = docker_archive(&secret, "out/layer.tar", Some(("out", outside.path())));
        let error = import(&escaping).unwrap_err().to_string();
        assert!(
            error.contains("\"out/layer.tar\" points outside the archive"),
            "{error}"
        );
    }
}
