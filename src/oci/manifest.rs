//! Manifest media types and the little of manifest structure the daemon
//! needs: which descriptors a manifest or index points at. Manifests are
//! always stored and served as the exact bytes received; these types only
//! read them.

use serde::Deserialize;

use crate::oci::digest::Digest;

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// The annotation an OCI layout's `index.json` names images with.
pub(crate) const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not valid manifest JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("Docker schema 1 manifests are not supported")]
    Schema1,
    #[error("unsupported manifest media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("the body says mediaType {body:?} but its descriptor says {descriptor:?}")]
    MediaTypeMismatch { body: String, descriptor: String },
}

#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType")]
    pub(crate) media_type: String,
    pub(crate) digest: Digest,
    pub(crate) size: u64,
    #[serde(default)]
    pub(crate) annotations: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) urls: Vec<String>,
    /// Set on the entries of an index.
    #[serde(default)]
    pub(crate) platform: Option<Platform>,
}

/// The `platform` of an index entry.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub(crate) struct Platform {
    // Lenient: an entry that leaves one out is still a manifest to walk.
    #[serde(default)]
    pub(crate) architecture: String,
    #[serde(default)]
    pub(crate) os: String,
}

pub(crate) fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

pub(crate) fn is_image_manifest(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "schemaVersion", default)]
    schema_version: Option<u64>,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// What a manifest points at.
#[derive(Debug)]
pub(crate) enum Children {
    /// An index: the per-platform manifests.
    Manifests(Vec<Descriptor>),
    /// An image manifest: its config, then its layers.
    Blobs(Vec<Descriptor>),
}

/// Parses `bytes` as a manifest of `media_type` (from the descriptor that
/// pointed at it) and returns what it references. The body's own
/// `mediaType`, when present, must agree with the descriptor's.
pub(crate) fn children(media_type: &str, bytes: &[u8]) -> Result<Children, ManifestError> {
    if media_type == DOCKER_SCHEMA1 || media_type == DOCKER_SCHEMA1_SIGNED {
        return Err(ManifestError::Schema1);
    }
    let env: Envelope = serde_json::from_slice(bytes)?;
    if env.schema_version == Some(1) {
        return Err(ManifestError::Schema1);
    }
    if let Some(body) = env.media_type {
        if body != media_type {
            return Err(ManifestError::MediaTypeMismatch {
                body,
                descriptor: media_type.to_owned(),
            });
        }
    }
    if is_index(media_type) {
        Ok(Children::Manifests(env.manifests))
    } else if is_image_manifest(media_type) {
        let mut blobs: Vec<Descriptor> = env.config.into_iter().collect();
        blobs.extend(env.layers);
        Ok(Children::Blobs(blobs))
    } else {
        Err(ManifestError::UnsupportedMediaType(media_type.to_owned()))
    }
}

/// The layers of the image manifest `bytes`, bottom first.
pub(crate) fn layers(media_type: &str, bytes: &[u8]) -> Result<Vec<Descriptor>, ManifestError> {
    if !is_image_manifest(media_type) {
        return Err(ManifestError::UnsupportedMediaType(media_type.to_owned()));
    }
    // Checks the body as `children` does (schema 1, media type agreement).
    children(media_type, bytes)?;
    let env: Envelope = serde_json::from_slice(bytes)?;
    Ok(env.layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn image_manifest_lists_config_then_layers() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D}","size":0}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{D}","size":0}}]}}"#
        );
        match children(OCI_MANIFEST, m.as_bytes()) {
            Ok(Children::Blobs(b)) => assert_eq!(b.len(), 2),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn refuses_schema1_and_mismatched_types() {
        assert!(matches!(
            children(OCI_MANIFEST, br#"{"schemaVersion":1}"#),
            Err(ManifestError::Schema1)
        ));
        let body = format!(r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}"}}"#);
        assert!(matches!(
            children(OCI_MANIFEST, body.as_bytes()),
            Err(ManifestError::MediaTypeMismatch { .. })
        ));
        assert!(children("text/plain", b"{}").is_err());
        assert!(children(OCI_INDEX, b"not json").is_err());
    }
}
