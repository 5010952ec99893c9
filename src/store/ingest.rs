//! The one commit path by which an image becomes visible in a repository,
//! whatever its source: blobs first (committed by the caller through
//! [`super::BlobWriter`] or [`Store::put_blob_bytes`]), then each manifest
//! linked to the repository, then the tag, last. A reader that sees the tag
//! therefore finds every manifest and blob it reaches.

use super::{Store, StoreError, TagRecord};
use crate::oci::digest::Digest;
use crate::oci::reference::{RegistryHost, RepoName, Tag};

/// A manifest to link to a repository: its digest and media type.
pub(crate) type Link<'a> = (&'a Digest, &'a str);

impl Store {
    /// Links `manifests` (whose bytes are committed) to `repo` on `host`,
    /// then points `tag` at `record`. Links and tags that already say the
    /// same are not rewritten.
    pub(crate) fn publish<'a>(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        manifests: impl IntoIterator<Item = Link<'a>>,
        tag: Option<(&Tag, &TagRecord)>,
    ) -> Result<(), StoreError> {
        for (digest, media_type) in manifests {
            if self.linked_manifest(host, repo, digest)?.as_deref() != Some(media_type) {
                self.link_manifest(host, repo, digest, media_type)?;
            }
        }
        if let Some((tag, record)) = tag {
            let current = match self.tag(host, repo, tag) {
                Ok(current) => current,
                // A damaged tag record is replaced, not a reason to fail.
                Err(StoreError::CorruptRecord { .. }) => None,
                Err(e) => return Err(e),
            };
            if current.as_ref() != Some(record) {
                self.set_tag(host, repo, tag, record)?;
            }
        }
        Ok(())
    }

    /// Stores a verified manifest's bytes and links it to `repo` on `host`.
    pub(crate) fn put_manifest(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        digest: &Digest,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        self.put_blob_bytes(digest, bytes)?;
        self.publish(host, repo, [(digest, media_type)], None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ManifestVariant;

    #[test]
    fn publish_links_then_tags_and_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let host: RegistryHost = "docker.io".parse().expect("host");
        let repo: RepoName = "library/a".parse().expect("repo");
        let tag: Tag = "1".parse().expect("tag");
        let bytes = b"{}";
        let digest = Digest::sha256_of(bytes);
        let media = "application/vnd.oci.image.manifest.v1+json";
        store
            .put_manifest(&host, &repo, &digest, media, bytes)
            .expect("put");
        let record = TagRecord {
            manifests: vec![ManifestVariant {
                media_type: media.into(),
                digest: digest.clone(),
                size: 2,
            }],
        };
        for _ in 0..2 {
            store
                .publish(&host, &repo, [(&digest, media)], Some((&tag, &record)))
                .expect("publish");
        }
        assert_eq!(
            store.linked_manifest(&host, &repo, &digest).expect("link"),
            Some(media.to_owned())
        );
        assert_eq!(store.tag(&host, &repo, &tag).expect("tag"), Some(record));
    }
}
