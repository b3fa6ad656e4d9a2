//! Garbage collection: removes blobs that nothing reachable names. Roots are the tags of
//! `index.json` plus the caller's extra roots (release digests, the bake cache's layers).
//! A root that is a manifest or an index keeps everything it refers to. The snapshots of
//! layer chains go with the images that need them (`snapshot`).

use std::collections::BTreeSet;
use std::fs;

use super::{Digest, Result, Store, TEMP, io_err, oci};

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Blobs removed, with their sizes.
    pub removed: Vec<(Digest, u64)>,
    /// Temp files a write cut short (a crash mid-bake) left, by path under the store, with
    /// their sizes.
    pub leftovers: Vec<(String, u64)>,
    /// Snapshots (by chain id) and path indexes no kept image needs, with their sizes.
    pub snapshots: Vec<(String, u64)>,
    pub freed_bytes: u64,
    pub kept: usize,
}

impl Store {
    /// Every blob reachable from the tags and `extra_roots`.
    pub fn reachable(&self, extra_roots: &[Digest]) -> Result<BTreeSet<Digest>> {
        let mut seen = BTreeSet::new();
        let mut queue: Vec<Digest> = self.tags()?.into_iter().map(|t| t.digest).collect();
        queue.extend(extra_roots.iter().cloned());
        while let Some(digest) = queue.pop() {
            if !seen.insert(digest.clone()) || !self.has_blob(&digest) {
                continue;
            }
            // Only small JSON documents can be manifests or indexes; layers are not parsed.
            let size = fs::metadata(self.blob_path(&digest))
                .map(|m| m.len())
                .unwrap_or(0);
            if size > super::MAX_MANIFEST_SIZE {
                continue;
            }
            let bytes = self.read_blob(&digest)?;
            if let Ok(manifest) = serde_json::from_slice::<oci::Manifest>(&bytes) {
                queue.push(manifest.config.digest);
                queue.extend(manifest.layers.into_iter().map(|l| l.digest));
            } else if let Ok(index) = serde_json::from_slice::<oci::ImageIndex>(&bytes) {
                queue.extend(index.manifests.into_iter().map(|m| m.digest));
            }
        }
        Ok(seen)
    }

    /// Removes every blob not reachable from a tag or `extra_roots`, and every snapshot no
    /// image kept needs; never one that is. With `dry_run`, reports what it would remove and
    /// removes nothing.
    pub fn gc(&self, extra_roots: &[Digest], dry_run: bool) -> Result<GcReport> {
        let _lock = super::txn::gc_lock(self, true)?;
        let keep = self.reachable(extra_roots)?;
        let dir = self.root().join("blobs/sha256");
        let mut report = GcReport::default();
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .collect::<Result<_, _>>()
            .map_err(io_err(&dir))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name();
            let Some(digest) = name
                .to_str()
                .and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok())
            else {
                continue;
            };
            if keep.contains(&digest) {
                report.kept += 1;
                continue;
            }
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            if !dry_run {
                fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
            }
            report.freed_bytes += size;
            report.removed.push((digest, size));
        }
        // Every blob is written through a transaction, which holds the gc lock shared: under
        // it exclusively, a temp file is no write under way but what a crash left.
        for dir in ["blobs", "blobs/sha256"] {
            let dir = self.root().join(dir);
            let mut temps: Vec<_> = fs::read_dir(&dir)
                .map_err(io_err(&dir))?
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(TEMP))
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .collect();
            temps.sort_by_key(|e| e.file_name());
            for entry in temps {
                let path = entry.path();
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                if !dry_run {
                    fs::remove_file(&path).map_err(io_err(&path))?;
                }
                let name = path.strip_prefix(self.root()).unwrap_or(&path);
                report.freed_bytes += size;
                report.leftovers.push((name.display().to_string(), size));
            }
        }
        report.snapshots = self.gc_snapshots(&keep, dry_run)?;
        report.freed_bytes += report.snapshots.iter().map(|(_, size)| size).sum::<u64>();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Descriptor, ImageConfig, MEDIA_TYPE_LAYER_GZIP};
    use super::*;

    #[test]
    fn keeps_tagged_and_extra_roots_removes_the_rest() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let image = |layer: &[u8]| {
            let layer = store.put_blob(layer).unwrap();
            let digest = store
                .put_image(
                    &ImageConfig::default(),
                    vec![Descriptor::new(MEDIA_TYPE_LAYER_GZIP, layer.clone(), 1)],
                )
                .unwrap();
            (digest, layer)
        };
        let (tagged, tagged_layer) = image(b"tagged layer");
        store.tag("t", &tagged, None).unwrap();
        let (release, release_layer) = image(b"release layer");
        let (_, loose_layer) = image(b"loose layer");
        // A dry run reports the same and removes nothing.
        let dry = store.gc(std::slice::from_ref(&release), true).unwrap();
        assert!(store.has_blob(&loose_layer));
        let report = store.gc(std::slice::from_ref(&release), false).unwrap();
        assert_eq!(dry, report);
        for kept in [&tagged, &tagged_layer, &release, &release_layer] {
            assert!(store.has_blob(kept), "{kept} was removed");
        }
        assert!(!store.has_blob(&loose_layer));
        // The loose image's manifest and layer go; both images share one config blob.
        assert_eq!(report.removed.len(), 2, "{report:?}");
        // A temp file a crash left is removed too.
        let temp = store.root().join("blobs/.tmp-crashed");
        fs::write(&temp, b"half a layer").unwrap();
        let report = store.gc(std::slice::from_ref(&release), false).unwrap();
        assert_eq!(report.leftovers, [("blobs/.tmp-crashed".to_owned(), 12)]);
        assert!(!temp.exists());
        // Negative control: without the extra root the release's blobs go too.
        store.gc(&[], false).unwrap();
        assert!(!store.has_blob(&release_layer));
        assert!(store.has_blob(&tagged_layer));
    }
}
