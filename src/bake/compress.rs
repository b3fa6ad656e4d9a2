//! Layers compressed off the bake's path. A big layer is gzipped on other threads while the
//! next steps run: written again from the RUN's snapshot that holds its files
//! (`tree::compress_from_tree`), or, where there is none, from its tar staged in a temp file
//! (`tree::stage_layer`). Meanwhile the image being built names it by a placeholder: a
//! descriptor whose digest is the diff_id, marked with an annotation no other descriptor
//! carries. The next steps mostly need no blob of it (a RUN starts on the snapshot its upper
//! dir became, keyed by diff_ids; a COPY or WORKDIR reads the path index written under the
//! diff_id); a step that does read it waits for its gzip first (`settle`). The manifest and
//! the cache entries are written only once every gzip is done (`finish`), with the blobs' own
//! descriptors: the same bytes, so the same digests, as compressing inline gives, and no blob
//! is referenced before it is whole.

use std::collections::BTreeMap;

use crate::store::snapshot::PathChange;
use crate::store::{
    Compressing, Descriptor, Digest, MEDIA_TYPE_LAYER_GZIP, StagedLayer, StoreError, Transaction,
};

/// The annotation that marks a placeholder; it never leaves the bake.
const PENDING: &str = "org.graven.gzip-pending";

/// The gzips of one bake: running, and done (kept in its transaction).
#[derive(Default)]
pub struct Compressions {
    running: BTreeMap<Digest, (Compressing, Vec<PathChange>)>,
    done: BTreeMap<Digest, Descriptor>,
}

/// Whether a layer descriptor is a placeholder for a gzip still running.
pub fn is_placeholder(layer: &Descriptor) -> bool {
    layer.annotations.contains_key(PENDING)
}

impl Compressions {
    /// Starts the gzip of a staged layer; returns the placeholder that names it meanwhile.
    pub fn start(
        &mut self,
        txn: &Transaction<'_>,
        staged: StagedLayer,
        changes: Vec<PathChange>,
    ) -> Result<Descriptor, StoreError> {
        let (diff_id, len) = (staged.diff_id.clone(), staged.len);
        self.start_with(diff_id, len, || {
            Ok((staged.compress(txn.store())?, changes))
        })
    }

    /// Starts the gzip of the layer `diff_id` (a tar of `len` bytes) that `begin` starts, with
    /// its path changes, unless this bake already compresses that tar (two stages that write
    /// the same layer make one blob); returns the placeholder that names it meanwhile.
    pub fn start_with(
        &mut self,
        diff_id: Digest,
        len: u64,
        begin: impl FnOnce() -> Result<(Compressing, Vec<PathChange>), StoreError>,
    ) -> Result<Descriptor, StoreError> {
        let mut placeholder = Descriptor::new(MEDIA_TYPE_LAYER_GZIP, diff_id.clone(), len);
        placeholder
            .annotations
            .insert(PENDING.to_owned(), String::new());
        if !self.running.contains_key(&diff_id) && !self.done.contains_key(&diff_id) {
            self.running.insert(diff_id, begin()?);
        }
        Ok(placeholder)
    }

    /// The blob's descriptor for the placeholder of `diff_id`, waiting for its gzip.
    fn blob(
        &mut self,
        txn: &mut Transaction<'_>,
        diff_id: &Digest,
    ) -> Result<Descriptor, StoreError> {
        if let Some(done) = self.done.get(diff_id) {
            return Ok(done.clone());
        }
        let Some((compressing, changes)) = self.running.remove(diff_id) else {
            return Err(StoreError::MissingBlob {
                digest: diff_id.clone(),
            });
        };
        let finished = compressing.wait()?;
        let digest = finished.digest.clone();
        let descriptor = finished.keep(txn)?;
        // The index a later bake's COPY reads, under the blob's digest as `write_layer` puts
        // it; one that cannot be written only costs reading the layer then.
        let _ = txn.store().put_path_index(&digest, &changes);
        self.done.insert(diff_id.clone(), descriptor.clone());
        Ok(descriptor)
    }

    /// Replaces the placeholders among `layers` that `wanted` (by index) picks by their blobs,
    /// waiting for those gzips only.
    pub fn settle(
        &mut self,
        txn: &mut Transaction<'_>,
        layers: &mut [Descriptor],
        wanted: impl Fn(usize) -> bool,
    ) -> Result<(), StoreError> {
        for (index, layer) in layers.iter_mut().enumerate() {
            if is_placeholder(layer) && wanted(index) {
                *layer = self.blob(txn, &layer.digest)?;
            }
        }
        Ok(())
    }

    /// Waits for every gzip and keeps its blob; afterwards `settle` waits for nothing.
    pub fn finish(&mut self, txn: &mut Transaction<'_>) -> Result<(), StoreError> {
        let running: Vec<Digest> = self.running.keys().cloned().collect();
        for diff_id in running {
            self.blob(txn, &diff_id)?;
        }
        Ok(())
    }
}
