//! An image's layers: its manifest through the
//! [`Registry`](crate::registry::Registry) (an index picks
//! the host's platform), checked to be an image manifest whose layers are
//! all tarballs we can unpack.

use crate::blobserve::{Blobserve, BlobserveError};
use crate::oci::accept::Accept;
use crate::oci::client::Client;
use crate::oci::manifest::{self, Children};
use crate::oci::platform;
use crate::oci::reference::{Reference, RegistryHost, RepoName};

impl Blobserve {
    /// The layer descriptors of the image, bottom first.
    pub(super) async fn image_layers(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Vec<manifest::Descriptor>, BlobserveError> {
        let m = self
            .registry
            .manifest(
                host.clone(),
                repo.clone(),
                reference.clone(),
                Accept::default(),
                Client::default(),
            )
            .await?;
        let (mut media_type, mut bytes) = (m.media_type, m.bytes);
        if manifest::is_index(&media_type) {
            let Children::Manifests(list) = manifest::children(&media_type, &bytes)
                .map_err(|e| BlobserveError::Manifest(e.to_string()))?
            else {
                return Err(BlobserveError::Manifest(
                    "an index without manifests".into(),
                ));
            };
            let pick = platform::for_this_host(&list)
                .first()
                .map(|d| d.digest.clone())
                .ok_or(BlobserveError::NoPlatform(platform::host_architecture()))?;
            let m = self
                .registry
                .manifest(
                    host.clone(),
                    repo.clone(),
                    Reference::Digest(pick),
                    Accept::default(),
                    Client::default(),
                )
                .await?;
            (media_type, bytes) = (m.media_type, m.bytes);
        }
        let layers = manifest::layers(&media_type, &bytes)
            .map_err(|e| BlobserveError::Manifest(e.to_string()))?;
        for l in &layers {
            if !is_layer_type(&l.media_type) {
                return Err(BlobserveError::UnsupportedLayer(l.media_type.clone()));
            }
        }
        Ok(layers)
    }
}

fn is_layer_type(media_type: &str) -> bool {
    // OCI and Docker layer types (plain, gzip, zstd, foreign); never encrypted.
    (media_type.contains(".layer.")
        || media_type.contains("rootfs.diff")
        || media_type.contains("image.rootfs"))
        && !media_type.contains("encrypted")
}
