//! `nixery-local prefetch REF…`: pulls images into the cache the way a
//! client would (Nix images are built, others fetched from upstream), so
//! they can be served offline later. For a multi-platform image every
//! platform's manifest is cached, and the blobs of the host's platform.

use std::io::Write;
use std::time::Duration;

use crate::oci::accept::Accept;
use crate::oci::client::Client;
use crate::oci::digest::Digest;
use crate::oci::manifest::{self, Children};
use crate::oci::platform;
use crate::oci::reference::{ImageRef, Reference};
use crate::registry::{BlobSource, Registry, RegistryError};
use crate::sources::{ErrorKind, SourceError};
use crate::telemetry::activity::ACTIVITIES;
use crate::util::units::human_bytes;

#[derive(Debug, Default)]
pub struct Prefetched {
    pub digest: Option<Digest>,
    pub blobs: usize,
    pub bytes: u64,
}

/// How often the work in progress is looked at.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Pulls `image` into the cache, printing progress lines to `progress`:
/// each blob as it lands, and the stages of builds and downloads while they
/// run.
pub async fn prefetch(
    registry: &Registry,
    image: &ImageRef,
    progress: &mut (dyn Write + Send),
) -> Result<Prefetched, RegistryError> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let pulling = pull(registry, image, tx);
    tokio::pin!(pulling);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let mut shown: Vec<(String, String)> = Vec::new();
    loop {
        tokio::select! {
            result = &mut pulling => {
                while let Ok(line) = rx.try_recv() {
                    let _ = writeln!(progress, "{line}");
                }
                return result;
            }
            Some(line) = rx.recv() => {
                let _ = writeln!(progress, "{line}");
            }
            _ = tick.tick() => {
                // Only what changed, so the output reads as a log too.
                let now: Vec<(String, String)> = ACTIVITIES
                    .snapshot()
                    .into_iter()
                    .map(|a| (format!("{} {}", a.kind, a.name), a.stage))
                    .collect();
                for (what, stage) in &now {
                    if !stage.is_empty() && !shown.iter().any(|(w, s)| w == what && s == stage) {
                        let _ = writeln!(progress, "  {what}: {stage}");
                    }
                }
                let _ = progress.flush();
                shown = now;
            }
        }
    }
}

async fn pull(
    registry: &Registry,
    image: &ImageRef,
    progress: tokio::sync::mpsc::UnboundedSender<String>,
) -> Result<Prefetched, RegistryError> {
    let mut done = Prefetched::default();
    let top = registry
        .manifest(
            image.host.clone(),
            image.repo.clone(),
            Reference::Tag(image.tag.clone()),
            Accept::default(),
            Client::default(),
        )
        .await?;
    done.digest = Some(top.digest.clone());
    let mut todo = vec![(top.media_type, top.bytes)];
    while let Some((media_type, bytes)) = todo.pop() {
        match manifest::children(&media_type, &bytes) {
            Ok(Children::Manifests(list)) => {
                let wanted: Vec<Digest> = platform::for_this_host(&list)
                    .into_iter()
                    .map(|d| d.digest.clone())
                    .collect();
                for child in list {
                    let m = registry
                        .manifest(
                            image.host.clone(),
                            image.repo.clone(),
                            Reference::Digest(child.digest.clone()),
                            Accept::default(),
                            Client::default(),
                        )
                        .await?;
                    if wanted.contains(&child.digest) {
                        todo.push((m.media_type, m.bytes));
                    }
                }
            }
            Ok(Children::Blobs(list)) => {
                for desc in list {
                    let blob = registry
                        .blob(image.host.clone(), image.repo.clone(), desc.digest.clone())
                        .await?;
                    let size = match &blob.source {
                        BlobSource::Stored(f) => f.len(),
                        BlobSource::Downloading(d) => d.finished().await.map_err(|e| {
                            RegistryError::BlobSource(SourceError::new(
                                ErrorKind::Unavailable,
                                format!("blob {} failed: {e}", desc.digest),
                            ))
                        })?,
                    };
                    done.blobs += 1;
                    done.bytes += size;
                    let _ = progress.send(format!("  {} {}", desc.digest, human_bytes(size)));
                }
            }
            // A manifest the registry served but we cannot walk: nothing more to fetch.
            Err(_) => {}
        }
    }
    Ok(done)
}
