//! The registry service: answers "which manifest bytes, which blob, which
//! tags" for a (registry host, repository) from the cache. It knows nothing of
//! HTTP; [`crate::http`] turns requests into calls here and [`RegistryError`]s
//! into the OCI error envelope.
//!
//! The store is synchronous, so every call into it runs on the blocking pool.

pub mod prefetch;

use std::sync::Arc;

use bytes::Bytes;

use crate::oci::accept::Accept;
use crate::oci::client::Client;
use crate::oci::digest::Digest;
use crate::oci::reference::{Reference, RegistryHost, RepoName};
use crate::sources::mirror::Download;
use crate::sources::{ErrorKind, SourceError, Sources};
use crate::store::gc::{CachedImage, ImageId, Usage};
use crate::store::{BlobFile, Store, StoreError};
use crate::telemetry::metrics::{self, METRICS};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    #[error("blob unknown to registry: {0}")]
    BlobUnknown(Digest),
    #[error("repository name not known to registry: {0}")]
    NameUnknown(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The repository's source could not supply the manifest.
    #[error("{0}")]
    ManifestSource(SourceError),
    /// The repository's source could not supply the blob.
    #[error("{0}")]
    BlobSource(SourceError),
}

/// Manifest bytes exactly as stored, with what the client needs to trust them.
#[derive(Clone, Debug)]
pub(crate) struct Manifest {
    pub(crate) bytes: Bytes,
    pub(crate) media_type: String,
    pub(crate) digest: Digest,
}

/// A blob ready to stream: from the cache, or arriving from upstream.
pub(crate) struct Blob {
    pub(crate) source: BlobSource,
    pub(crate) digest: Digest,
    /// `None` only for a download whose upstream did not say.
    pub(crate) size: Option<u64>,
}

pub(crate) enum BlobSource {
    Stored(Arc<BlobFile>),
    Downloading(Arc<Download>),
}

/// One page of a repository's tags.
#[derive(Debug)]
pub(crate) struct TagPage {
    pub(crate) tags: Vec<String>,
    /// Set when more tags follow: the last tag of this page.
    pub(crate) next_after: Option<String>,
}

pub struct Registry {
    store: Arc<Store>,
    default_host: RegistryHost,
    sources: Sources,
    usage: Arc<Usage>,
}

impl Registry {
    /// Serves the cache in `store`, filling misses from `sources`.
    pub(crate) fn new(store: Arc<Store>, default_host: RegistryHost, sources: Sources) -> Registry {
        Registry {
            store,
            default_host,
            sources,
            usage: Arc::new(Usage::default()),
        }
    }

    /// Records when manifests are served, for least-recently-used eviction.
    pub(crate) fn with_usage(mut self, usage: Arc<Usage>) -> Registry {
        self.usage = usage;
        self
    }

    /// Returns once work that outlives requests (Nix builds) is done.
    pub(crate) async fn work_finished(&self) {
        self.sources.work_finished().await;
    }

    /// The name a pull is shown under, as the client named it: with `ns`,
    /// `nix.local/hello` or `docker.io/library/alpine`; without, a Nix image
    /// is `nix/hello` (not `docker.io/nix/hello`), anything else is on the
    /// default registry.
    pub(crate) fn pulled_name(
        &self,
        ns: Option<&RegistryHost>,
        repo: &str,
        reference: &str,
    ) -> String {
        // With ns the name is as the client gave it: nothing is dropped.
        let Some(host) = ns else {
            let host = &self.default_host;
            return match repo.parse::<RepoName>() {
                Ok(r) => self.sources.shown(host, &r, reference, host),
                Err(_) => format!("{host}/{repo}:{reference}"),
            };
        };
        format!("{host}/{repo}:{reference}")
    }

    /// How a cached image is shown on the status page: as it was pulled.
    pub(crate) fn shown_name(&self, id: &ImageId) -> String {
        self.sources.shown_name(id, &self.default_host)
    }

    /// The host requests without containerd's `ns` parameter are scoped to.
    pub(crate) fn default_host(&self) -> &RegistryHost {
        &self.default_host
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, RegistryError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, RegistryError> + Send + 'static,
    {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || f(&store)).await?
    }

    /// The manifest `reference` names in `repo` on `host`, in a media type
    /// the client accepts.
    ///
    /// By tag, the first of the tag's variants the client accepts is served;
    /// a client that accepts none of them gets `ManifestUnknown` rather than
    /// bytes it cannot read. By digest, the bytes are fixed by the digest, so
    /// they are served whatever the `Accept`, but only if this repository holds
    /// that manifest.
    pub(crate) async fn manifest(
        &self,
        host: RegistryHost,
        repo: RepoName,
        reference: Reference,
        accept: Accept,
        client: Client,
    ) -> Result<Manifest, RegistryError> {
        let source = self.sources.route(&host, &repo);
        let answer = match &reference {
            Reference::Tag(tag) => source.resolve_tag(&host, &repo, tag, &accept, client).await,
            Reference::Digest(digest) => source
                .fetch_manifest(&host, &repo, digest)
                .await
                .map(|()| None),
        }
        .map_err(RegistryError::ManifestSource)?;
        self.blocking(move |store| {
            let (digest, media_type) = match &reference {
                Reference::Tag(tag) => {
                    let manifests = match answer {
                        Some(manifests) => manifests,
                        None => {
                            store
                                .tag(&host, &repo, tag)?
                                .ok_or_else(|| {
                                    RegistryError::ManifestUnknown(format!("{host}/{repo}:{tag}"))
                                })?
                                .manifests
                        }
                    };
                    let variant = manifests
                        .into_iter()
                        .find(|v| accept.accepts(&v.media_type))
                        .ok_or_else(|| {
                            RegistryError::ManifestUnknown(format!(
                                "{host}/{repo}:{tag} is not stored in a media type the client accepts"
                            ))
                        })?;
                    (variant.digest, variant.media_type)
                }
                Reference::Digest(digest) => {
                    let media_type = store.linked_manifest(&host, &repo, digest)?.ok_or_else(
                        || RegistryError::ManifestUnknown(format!("{host}/{repo}@{digest}")),
                    )?;
                    (digest.clone(), media_type)
                }
            };
            let bytes = store.read_manifest(&digest)?.ok_or_else(|| {
                tracing::warn!(%digest, "manifest is linked but its blob is missing");
                RegistryError::ManifestUnknown(format!("{host}/{repo}@{digest}"))
            })?;
            Ok(Manifest {
                bytes,
                media_type,
                digest,
            })
        })
        .await
        .inspect(|m| self.usage.touch(&m.digest))
    }

    /// A blob by digest. Blobs are content-addressed and shared by every
    /// repository of the cache, so any repository name reaches them; a miss
    /// is fetched from `repo` on `host`'s upstream.
    pub(crate) async fn blob(
        &self,
        host: RegistryHost,
        repo: RepoName,
        digest: Digest,
    ) -> Result<Blob, RegistryError> {
        let d = digest.clone();
        if let Some(file) = self.blocking(move |store| Ok(store.open_blob(&d)?)).await? {
            metrics::add(&METRICS.blob_hits, 1);
            return Ok(Blob {
                size: Some(file.len()),
                source: BlobSource::Stored(Arc::new(file)),
                digest,
            });
        }
        let source = self.sources.route(&host, &repo);
        let download = source
            .fetch_blob(&host, &repo, &digest)
            .await
            .map_err(RegistryError::BlobSource)?
            .ok_or_else(|| RegistryError::BlobUnknown(digest.clone()))?;
        let size = download.size().await.map_err(|e| {
            RegistryError::BlobSource(SourceError::new(
                ErrorKind::Unavailable,
                format!("blob {digest} failed: {e}"),
            ))
        })?;
        Ok(Blob {
            source: BlobSource::Downloading(download),
            digest,
            size,
        })
    }

    /// Every cached image, least recently used first (the status page).
    pub(crate) async fn cached_images(&self) -> Result<Vec<CachedImage>, RegistryError> {
        let usage = self.usage.snapshot();
        self.blocking(move |store| Ok(crate::store::gc::images(store, &usage)?))
            .await
    }

    /// Bytes of blobs in the cache, for `/metrics`.
    pub(crate) async fn cache_bytes(&self) -> Result<u64, RegistryError> {
        self.blocking(|store| Ok(store.blob_bytes()?)).await
    }

    /// The repository's tags in lexical order, `n` at most, after `last`.
    pub(crate) async fn tags(
        &self,
        host: RegistryHost,
        repo: RepoName,
        n: Option<usize>,
        last: Option<String>,
    ) -> Result<TagPage, RegistryError> {
        self.blocking(move |store| {
            let all = store
                .tags(&host, &repo)?
                .ok_or_else(|| RegistryError::NameUnknown(format!("{host}/{repo}")))?;
            let mut tags: Vec<String> = match &last {
                Some(last) => all.into_iter().filter(|t| t > last).collect(),
                None => all,
            };
            let mut next_after = None;
            if let Some(n) = n {
                if tags.len() > n {
                    tags.truncate(n);
                    next_after = tags.last().cloned();
                }
            }
            Ok(TagPage { tags, next_after })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::accept::tests::{accept, DOCKER, OCI};
    use crate::oci::reference::Tag;
    use crate::store::{ManifestVariant, TagRecord};

    async fn registry_with_tag(variants: &[(&str, &[u8])]) -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let host: RegistryHost = "docker.io".parse().expect("host");
        let repo: RepoName = "library/a".parse().expect("repo");
        let mut manifests = Vec::new();
        for (media_type, bytes) in variants {
            let digest = Digest::sha256_of(bytes);
            store.put_blob_bytes(&digest, bytes).expect("put");
            store
                .link_manifest(&host, &repo, &digest, media_type)
                .expect("link");
            manifests.push(ManifestVariant {
                media_type: media_type.to_string(),
                digest,
                size: bytes.len() as u64,
            });
        }
        let tag: Tag = "1".parse().expect("tag");
        store
            .set_tag(&host, &repo, &tag, &TagRecord { manifests })
            .expect("tag");
        (dir, Registry::new(Arc::new(store), host, Sources::new()))
    }

    #[tokio::test]
    async fn negotiates_between_stored_variants() {
        let (_dir, reg) = registry_with_tag(&[(OCI, b"oci"), (DOCKER, b"docker")]).await;
        let get = |a: Accept| {
            reg.manifest(
                "docker.io".parse().expect("host"),
                "library/a".parse().expect("repo"),
                Reference::Tag("1".parse().expect("tag")),
                a,
                Client::default(),
            )
        };
        let m = get(Accept::default()).await.expect("default");
        assert_eq!(m.media_type, OCI);
        let m = get(accept(DOCKER)).await.expect("docker");
        assert_eq!(&m.bytes[..], b"docker");
        assert!(matches!(
            get(accept(
                "application/vnd.docker.distribution.manifest.list.v2+json"
            ))
            .await,
            Err(RegistryError::ManifestUnknown(_))
        ));
    }

    #[tokio::test]
    async fn scoped_by_host_and_repository() {
        let (_dir, reg) = registry_with_tag(&[(OCI, b"oci")]).await;
        let digest = Digest::sha256_of(b"oci");
        let by_digest = |host: &str, repo: &str| {
            reg.manifest(
                host.parse().expect("host"),
                repo.parse().expect("repo"),
                Reference::Digest(digest.clone()),
                Accept::default(),
                Client::default(),
            )
        };
        assert!(by_digest("docker.io", "library/a").await.is_ok());
        assert!(by_digest("ghcr.io", "library/a").await.is_err());
        assert!(by_digest("docker.io", "library/b").await.is_err());
        let page = reg
            .tags(
                "docker.io".parse().expect("host"),
                "library/a".parse().expect("repo"),
                None,
                None,
            )
            .await
            .expect("tags");
        assert_eq!(page.tags, vec!["1"]);
        assert!(matches!(
            reg.tags(
                "ghcr.io".parse().expect("host"),
                "library/a".parse().expect("repo"),
                None,
                None
            )
            .await,
            Err(RegistryError::NameUnknown(_))
        ));
    }
}
