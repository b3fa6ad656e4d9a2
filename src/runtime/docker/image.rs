//! Images into an engine: graven's store exports the image as a docker-archive, streamed to
//! the engine's load endpoint as it is written (no copy on disk), tagged by its digest so the
//! engine finds it again and a second prepare loads nothing. Never rebuilt, never pulled.
//! The Swarm backend loads each node's engine the same way.

use bollard::Docker;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::runtime::RuntimeError;
use crate::store::{Digest, ExportFormat, Store, StoreError};

/// The repository graven's images are tagged under in an engine.
const REPOSITORY: &str = "graven/image";

/// How an image of graven's is named in an engine: by its manifest's digest, so the same
/// digest is the same image everywhere.
pub fn reference(digest: &Digest) -> String {
    format!("{REPOSITORY}:{}", digest.hex())
}

/// Whether the engine holds `digest`'s image under its reference.
pub async fn is_loaded(docker: &Docker, digest: &Digest) -> Result<bool, RuntimeError> {
    match docker.inspect_image(&reference(digest)).await {
        Ok(_) => Ok(true),
        Err(error) if super::is_not_found(&error) => Ok(false),
        Err(error) => Err(super::engine_error(
            format!("inspecting image {digest}"),
            error,
        )),
    }
}

/// Loads `digest`'s image from `store` into the engine unless it is there already.
pub async fn load(docker: &Docker, store: &Store, digest: &Digest) -> Result<(), RuntimeError> {
    if is_loaded(docker, digest).await? {
        return Ok(());
    }
    // Known before anything is sent: a digest the store lacks is an unknown image.
    store.image(digest).map_err(|e| match e {
        StoreError::MissingBlob { .. } | StoreError::UnknownImage { .. } => {
            RuntimeError::UnknownImage {
                reference: digest.to_string(),
            }
        }
        other => other.into(),
    })?;
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let exporter = {
        let store = store.clone();
        let digest = digest.clone();
        let tag = reference(&digest);
        tokio::task::spawn_blocking(move || {
            // Whole chunks, not the tar's 512-byte headers one by one.
            let out = std::io::BufWriter::with_capacity(1 << 18, ChannelWriter { sender });
            store.export(&digest, &tag, ExportFormat::Docker, out)
        })
    };
    let body = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|chunk| (chunk, receiver))
    });
    let mut progress = docker.import_image_stream(
        bollard::query_parameters::ImportImageOptions {
            quiet: true,
            ..Default::default()
        },
        body,
        None,
    );
    let mut failure = None;
    while let Some(item) = progress.next().await {
        if let Err(error) = item {
            failure = Some(error);
            break;
        }
    }
    drop(progress);
    let exported = exporter.await.map_err(|e| RuntimeError::Other {
        context: format!("exporting image {digest}"),
        source: std::io::Error::other(e),
    })?;
    exported?;
    if let Some(error) = failure {
        return Err(super::engine_error(
            format!("loading image {digest}"),
            error,
        ));
    }
    if !is_loaded(docker, digest).await? {
        return Err(RuntimeError::Other {
            context: format!("loading image {digest}"),
            source: std::io::Error::other("the engine took the archive but has no such image"),
        });
    }
    Ok(())
}

/// The export's `Write`, each buffer a chunk of the load's body. A closed engine side ends
/// the export with an error instead of a hang.
struct ChannelWriter {
    sender: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sender
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::other("the engine stopped reading the image"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
