//! Where images come from, behind one interface. A request is routed once
//! ([`Sources::route`]) to the [`Source`] that answers its repository; the
//! source then answers "bring this tag up to date", "this manifest by
//! digest" and "give me this blob", and writes what it finds through the
//! store's one ingest path
//! ([`crate::store::ingest`]). The registry then serves from the store.
//!
//! - [`nix`]: images built from the host's Nix store, for the repositories
//!   its settings route.
//! - [`mirror`]: upstream registries, for every other repository.
//! - [`layout`]: OCI layouts on disk, imported by the CLI rather than routed.
//!
//! The HTTP edge knows a source's failures only by [`ErrorKind`].

pub(crate) mod error;
pub mod layout;
pub mod mirror;
pub mod nix;

use std::sync::Arc;

pub(crate) use self::error::{ErrorKind, SourceError};
use self::mirror::{Download, Mirror};
use self::nix::NixImages;
use crate::oci::accept::Accept;
use crate::oci::client::Client;
use crate::oci::digest::Digest;
use crate::oci::reference::{RegistryHost, RepoName, Tag};
use crate::store::gc::ImageId;
use crate::store::ManifestVariant;
use crate::telemetry::metrics::{self, METRICS};

/// The sources a daemon has; either may be absent (tests, offline use).
#[derive(Clone, Default)]
pub(crate) struct Sources {
    nix: Option<Arc<NixImages>>,
    mirror: Option<Arc<Mirror>>,
}

/// The one source that answers a repository.
pub(crate) enum Source<'a> {
    /// A Nix image: `packages` is the repository path that names it.
    Nix {
        images: &'a Arc<NixImages>,
        packages: &'a str,
    },
    /// An upstream registry.
    Mirror(&'a Arc<Mirror>),
    /// Only what the cache already holds.
    Cache,
}

impl Sources {
    pub(crate) fn new() -> Sources {
        Sources::default()
    }

    /// Serves Nix images (built on demand) for the repositories `nix` routes.
    pub(crate) fn with_nix(mut self, nix: Arc<NixImages>) -> Sources {
        self.nix = Some(nix);
        self
    }

    /// Fills misses of every other repository from upstream registries.
    pub(crate) fn with_mirror(mut self, mirror: Arc<Mirror>) -> Sources {
        self.mirror = Some(mirror);
        self
    }

    /// Returns once the sources' background work (Nix builds) is done.
    pub(crate) async fn work_finished(&self) {
        if let Some(nix) = &self.nix {
            nix.builds_finished().await;
        }
    }

    /// How a cached image is shown: as it was pulled (see
    /// [`nix::NixSettings::shown_name`]).
    pub(crate) fn shown_name(&self, id: &ImageId, default_host: &RegistryHost) -> String {
        match &self.nix {
            Some(nix) => nix.settings().shown_name(id, default_host),
            None => id.to_string(),
        }
    }

    /// How a pull of `repo:reference` on `host` is shown (see
    /// [`nix::NixSettings::shown`]).
    pub(crate) fn shown(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        reference: &str,
        default_host: &RegistryHost,
    ) -> String {
        match &self.nix {
            Some(nix) => nix.settings().shown(host, repo, reference, default_host),
            None => format!("{host}/{repo}:{reference}"),
        }
    }

    /// The source of `repo` on `host`: Nix if it names a Nix image, else the
    /// mirror, else the cache alone.
    pub(crate) fn route<'a>(&'a self, host: &RegistryHost, repo: &'a RepoName) -> Source<'a> {
        if let Some(images) = &self.nix {
            if let Some(packages) = images.route(host, repo) {
                return Source::Nix { images, packages };
            }
        }
        match &self.mirror {
            Some(mirror) => Source::Mirror(mirror),
            None => Source::Cache,
        }
    }
}

impl Source<'_> {
    /// Brings the store's record of `tag` up to date: builds the Nix image,
    /// or revalidates the tag with its upstream when due. `Ok(None)` means
    /// the store's record is the answer (or there is none); `Ok(Some(..))`
    /// is an answer for this client alone (a Nix image's variant).
    pub(crate) async fn resolve_tag(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        tag: &Tag,
        accept: &Accept,
        client: Client,
    ) -> Result<Option<Vec<ManifestVariant>>, SourceError> {
        match self {
            Source::Nix { images, packages } => {
                let answer = images
                    .resolve_tag(host, repo, packages, tag, client)
                    .await?;
                return Ok(Some(answer));
            }
            Source::Mirror(mirror) => mirror.refresh_tag(host, repo, tag, accept).await?,
            Source::Cache => {}
        }
        Ok(None)
    }

    /// Brings the manifest `digest` into the store, linked to `repo`, if this
    /// source can supply it. Nix images publish every manifest when built.
    pub(crate) async fn fetch_manifest(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(), SourceError> {
        if let Source::Mirror(mirror) = self {
            mirror.manifest_by_digest(host, repo, digest).await?;
        }
        Ok(())
    }

    /// A blob the store lacks, arriving from this source; `None` when this
    /// source has no blobs of its own to offer. A Nix image's blobs are all
    /// written when it is built, so a miss there is a miss: it is not asked
    /// of the upstream registry that shares the host name.
    pub(crate) async fn fetch_blob(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<Arc<Download>>, SourceError> {
        match self {
            Source::Mirror(mirror) => {
                metrics::add(&METRICS.blob_misses, 1);
                Ok(Some(mirror.blob(host, repo, digest).await?))
            }
            Source::Nix { .. } | Source::Cache => Ok(None),
        }
    }
}
