//! `nixery-local prefetch REF…`: pulls images into the cache the way a
//! client would (Nix images are built, others fetched from upstream), so
//! they can be served offline later. For a multi-platform image every
//! platform's manifest is cached, and the blobs of the host's platform.

use std::io::Write;

use crate::oci::accept::Accept;
use crate::oci::client::Client;
use crate::oci::digest::Digest;
use crate::oci::manifest::{self, Children};
use crate::oci::platform;
use crate::oci::reference::{ImageRef, Reference};
use crate::registry::{BlobSource, Registry, RegistryError};
use crate::sources::{ErrorKind, SourceError};

#[derive(Debug, Default)]
pub struct Prefetched {
    pub digest: Option<Digest>,
    pub blobs: usize,
    pub bytes: u64,
}

/// Pulls `image` into the cache, printing progress lines to `progress`.
pub async fn prefetch(
    registry: &Registry,
    image: &ImageRef,
    progress: &mut (dyn Write + Send),
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
                    let _ = writeln!(progress, "  {} {size} bytes", desc.digest);
                }
            }
            // A manifest the registry served but we cannot walk: nothing more to fetch.
            Err(_) => {}
        }
    }
    Ok(done)
}
