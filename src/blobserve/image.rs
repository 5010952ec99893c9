//! An image's layers: its manifest through the
//! [`Registry`](crate::registry::Registry) (an index picks
//! the host's platform), checked to be an image manifest whose layers are
//! all tarballs we can unpack.

use serde::Deserialize;

use crate::blobserve::{Blobserve, BlobserveError};
use crate::oci::accept::Accept;
use crate::oci::digest::Digest;
use crate::oci::manifest;
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
            )
            .await?;
        let (mut media_type, mut bytes) = (m.media_type, m.bytes);
        if manifest::is_index(&media_type) {
            let index: IndexBody = serde_json::from_slice(&bytes)
                .map_err(|e| BlobserveError::Manifest(e.to_string()))?;
            let arch = host_arch();
            let pick = index
                .manifests
                .into_iter()
                .find(|d| {
                    d.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == arch)
                })
                .ok_or(BlobserveError::NoPlatform(arch))?;
            let m = self
                .registry
                .manifest(
                    host.clone(),
                    repo.clone(),
                    Reference::Digest(pick.digest),
                    Accept::default(),
                )
                .await?;
            (media_type, bytes) = (m.media_type, m.bytes);
        }
        if !manifest::is_image_manifest(&media_type) {
            return Err(BlobserveError::Manifest(format!(
                "unsupported manifest media type {media_type:?}"
            )));
        }
        let body: ImageBody =
            serde_json::from_slice(&bytes).map_err(|e| BlobserveError::Manifest(e.to_string()))?;
        for l in &body.layers {
            if !is_layer_type(&l.media_type) {
                return Err(BlobserveError::UnsupportedLayer(l.media_type.clone()));
            }
        }
        Ok(body.layers)
    }
}

#[derive(Deserialize)]
struct IndexBody {
    #[serde(default)]
    manifests: Vec<PlatformDescriptor>,
}

#[derive(Deserialize)]
struct PlatformDescriptor {
    digest: Digest,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct ImageBody {
    #[serde(default)]
    layers: Vec<manifest::Descriptor>,
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn is_layer_type(media_type: &str) -> bool {
    // OCI and Docker layer types (plain, gzip, zstd, foreign); never encrypted.
    (media_type.contains(".layer.")
        || media_type.contains("rootfs.diff")
        || media_type.contains("image.rootfs"))
        && !media_type.contains("encrypted")
}
