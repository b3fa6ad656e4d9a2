//! Exporting one image as a tar: an OCI layout holding just that image under one tag, and for
//! the docker format also a docker-archive `manifest.json` beside it whose paths point at the
//! same blobs, which is what `docker load` (20.10) reads. Entries are written in a fixed order
//! with fixed metadata, so the same image and tag give the same archive bytes.

use std::io::Write;

use super::{Descriptor, Digest, MEDIA_TYPE_MANIFEST, REF_NAME, Result, Store, StoreError, oci};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    Oci,
    Docker,
}

/// A tag as Docker's `RepoTags` wants it: `name:tag`, `latest` when the tag has none.
pub fn docker_repo_tag(tag: &str) -> String {
    let last = tag.rsplit('/').next().unwrap_or(tag);
    if last.contains(':') {
        tag.to_owned()
    } else {
        format!("{tag}:latest")
    }
}

impl Store {
    pub fn export(
        &self,
        digest: &Digest,
        tag: &str,
        format: ExportFormat,
        out: impl Write,
    ) -> Result<()> {
        let image = self.image(digest)?;
        let io = |source| StoreError::Io {
            path: self.root().to_owned(),
            source,
        };
        let manifest_size = std::fs::metadata(self.blob_path(digest)).map_err(io)?.len();
        let mut descriptor = Descriptor::new(MEDIA_TYPE_MANIFEST, digest.clone(), manifest_size);
        descriptor.set_annotation(REF_NAME, tag);
        let index = oci::ImageIndex {
            manifests: vec![descriptor],
            ..Default::default()
        };
        let blob_name = |d: &Digest| format!("blobs/{}/{}", d.algorithm(), d.hex());
        let mut tar = tar::Builder::new(out);
        let header = |size: u64, kind: tar::EntryType, mode: u32| {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(kind);
            h.set_size(size);
            h.set_mode(mode);
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            h
        };
        let small = |tar: &mut tar::Builder<_>, name: &str, bytes: &[u8]| {
            let mut h = header(bytes.len() as u64, tar::EntryType::Regular, 0o644);
            tar.append_data(&mut h, name, bytes).map_err(io)
        };
        small(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        small(&mut tar, "index.json", &oci::to_canonical_json(&index))?;
        if format == ExportFormat::Docker {
            let entry = serde_json::json!([{
                "Config": blob_name(&image.manifest.config.digest),
                "RepoTags": [docker_repo_tag(tag)],
                "Layers": image.manifest.layers.iter().map(|l| blob_name(&l.digest)).collect::<Vec<_>>(),
            }]);
            small(&mut tar, "manifest.json", &oci::to_canonical_json(&entry))?;
        }
        for dir in ["blobs/", "blobs/sha256/"] {
            let mut h = header(0, tar::EntryType::Directory, 0o755);
            tar.append_data(&mut h, dir, std::io::empty()).map_err(io)?;
        }
        let mut blobs: Vec<&Digest> = vec![digest, &image.manifest.config.digest];
        blobs.extend(image.manifest.layers.iter().map(|l| &l.digest));
        blobs.sort();
        blobs.dedup();
        for blob in blobs {
            let file = self.open_blob(blob)?;
            let size = file.metadata().map_err(io)?.len();
            let mut h = header(size, tar::EntryType::Regular, 0o644);
            tar.append_data(&mut h, blob_name(blob), file).map_err(io)?;
        }
        tar.into_inner().map_err(io)?.flush().map_err(io)
    }
}
