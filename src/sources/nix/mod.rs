//! Nix images as a source of the cache: decides which repositories are Nix
//! images, builds them into the store (evaluation and builds by [`crate::sources::nix::runner`],
//! layers by [`crate::sources::nix::layers`], config and manifests by [`crate::sources::nix::image`]),
//! and remembers what it built.
//!
//! - A built image is a [`NixImageRecord`] keyed by the hash of everything
//!   that decides its bytes (name, package source, system, compression,
//!   budget). Within the TTL (forever for commit-pinned sources) it is served
//!   without calling Nix, also after a restart.
//! - A layer is keyed by its store paths and compression; one already in the
//!   cache is never rebuilt, whichever image asks for it. An image's missing
//!   layers are written in parallel on all cores.
//! - Concurrent requests for one image share one build, which runs as its
//!   own task: a client that disconnects does not cancel it.
//! - Each image's closure is kept alive by a GC root under the state dir.

pub(crate) mod closure;
pub(crate) mod command;
pub(crate) mod error;
pub(crate) mod eval;
pub(crate) mod image;
pub(crate) mod layers;
pub(crate) mod name;
pub(crate) mod pkgset;
pub(crate) mod runner;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Semaphore;

use self::image::{ImageError, ImageLayer, ImageSpec, Platform};
use self::layers::{Compression, LayerError, LayerGroup, LayerInfo, Popularity};
use crate::oci::client::Client;
use crate::oci::digest::{Algorithm, Digest};
use crate::oci::manifest::{DOCKER_MANIFEST, OCI_MANIFEST};
use crate::oci::reference::{RegistryHost, RepoName, Tag};
use crate::sources::nix::command::{Nix, NixConfig};
use crate::sources::nix::error::NixError;
use crate::sources::nix::name::{ImageName, ImageNameError};
use crate::sources::nix::pkgset::PkgSource;
use crate::sources::{ErrorKind, SourceError};
use crate::store::gc::ImageId;
use crate::store::{ManifestVariant, NixImageRecord, RecordKind, Store, StoreError, TagRecord};
use crate::telemetry::activity::{ActivityGuard, ACTIVITIES};
use crate::telemetry::metrics::{self, METRICS};
use crate::util::singleflight::SingleFlight;
use crate::util::time::now_secs;

/// Bump when a change alters the bytes built for the same inputs.
const FORMAT_VERSION: u32 = 2;

/// How long a failed build's error is the answer without calling Nix again:
/// a pull's HEAD and GET, and a client's retries, then cost one build, while
/// a fixed package set is tried again soon after.
const FAILURE_TTL: Duration = Duration::from_secs(10);

/// Builds running at once; more wait. Each build already uses every core
/// for its layers.
const PARALLEL_BUILDS: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid Nix image name: {0}")]
    Name(#[from] ImageNameError),
    #[error(transparent)]
    Nix(#[from] NixError),
    #[error("writing a layer: {0}")]
    Layer(#[from] LayerError),
    #[error("writing the image config: {0}")]
    Image(#[from] ImageError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("layer {expected} was written as {actual}")]
    LayerDigest { expected: Digest, actual: Digest },
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("the build ended without a result (a worker panicked)")]
    Interrupted,
}

impl From<&BuildError> for SourceError {
    fn from(e: &BuildError) -> SourceError {
        let kind = match e {
            BuildError::Name(_) => ErrorKind::Invalid,
            // The user must see which packages are missing.
            BuildError::Nix(NixError::MissingPackages { .. }) => ErrorKind::UnknownName,
            BuildError::Nix(NixError::UnsupportedSystem { .. }) => ErrorKind::NotFound,
            // Evaluation and build failures carry the tail of Nix's log, and
            // an unconfigured package set says how to configure one: what the
            // user needs to see.
            BuildError::Nix(_) => ErrorKind::Failed,
            _ => ErrorKind::Internal,
        };
        SourceError::new(kind, e.to_string())
    }
}

/// Where a build says how far along it is: the status page, and the
/// terminal for `nixery-local build`.
struct Progress {
    activity: ActivityGuard,
    terminal: bool,
}

impl Progress {
    fn say(&self, message: String) {
        if self.terminal {
            eprintln!("{message}");
        }
        self.activity.stage(message);
    }
}

/// Where packages come from.
#[derive(Clone, Debug)]
pub(crate) enum SourceSetting {
    /// The same source whatever the tag: a path, a channel, `<nixpkgs>`, a flake.
    Fixed(PkgSource),
    /// A git repository whose ref or commit the tag picks.
    GitRepo(String),
}

impl SourceSetting {
    fn for_tag(&self, tag: &Tag) -> PkgSource {
        match self {
            SourceSetting::Fixed(s) => s.clone(),
            SourceSetting::GitRepo(url) => PkgSource::git_for_tag(url, tag.as_str()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct NixSettings {
    /// Repositories whose first component is this are Nix images.
    pub(crate) namespace: String,
    /// Every repository of these registry hosts is a Nix image.
    pub(crate) registries: Vec<RegistryHost>,
    pub(crate) source: SourceSetting,
    pub(crate) layer_budget: usize,
    pub(crate) compression: Compression,
    /// How long a floating source's image is served before re-evaluating.
    pub(crate) ttl: Duration,
    pub(crate) popularity: Popularity,
    pub(crate) nix: NixConfig,
}

impl NixSettings {
    /// The package part of `repo` if it names a Nix image on `host`:
    /// everything for a Nix registry host, else what follows the namespace.
    pub(crate) fn route<'a>(&self, host: &RegistryHost, repo: &'a RepoName) -> Option<&'a str> {
        if self.registries.contains(host) {
            return Some(repo.as_str());
        }
        let (first, rest) = repo.as_str().split_once('/')?;
        (first == self.namespace).then_some(rest)
    }

    /// How a cached image is shown: as it was pulled. A Nix image stored
    /// under the default registry was pulled without `ns` (podman, Docker),
    /// as `nix/hello`, not `docker.io/nix/hello`.
    pub fn shown_name(&self, id: &ImageId, default_host: &RegistryHost) -> String {
        match id {
            ImageId::Tag { host, repo, tag } => self.shown(host, repo, tag.as_str(), default_host),
            other => other.to_string(),
        }
    }

    /// `host/repo:reference`, but `repo:reference` for a Nix image on the
    /// default registry.
    pub(crate) fn shown(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        reference: &str,
        default_host: &RegistryHost,
    ) -> String {
        if host == default_host && self.route(host, repo).is_some() {
            format!("{repo}:{reference}")
        } else {
            format!("{host}/{repo}:{reference}")
        }
    }
}

/// One layer of a finished build, for `nixery-local build`'s table.
#[derive(Clone, Debug)]
pub struct BuiltLayer {
    pub digest: Digest,
    pub size: u64,
    pub paths: Vec<String>,
    pub reused: bool,
    /// How many other cached Nix images have this layer.
    pub shared_with: usize,
}

/// The result of a build.
#[derive(Clone, Debug)]
pub struct BuildReport {
    pub record: NixImageRecord,
    pub layers: Vec<BuiltLayer>,
}

type Outcome = Result<NixImageRecord, Arc<BuildError>>;

/// A layer's description, and whether the cache already had it.
type LayerOutcome = Result<(LayerInfo, bool), BuildError>;

pub struct NixImages {
    store: Arc<Store>,
    nix: Nix,
    settings: NixSettings,
    /// Learnt from every closure built, on top of the configured data.
    popularity: Mutex<Popularity>,
    /// Whether the local store's graph went into `popularity` yet.
    learnt_store: std::sync::atomic::AtomicBool,
    inflight: SingleFlight<Digest, Outcome>,
    /// Recent failed builds, by request key: see [`FAILURE_TTL`].
    failures: Mutex<HashMap<Digest, (Instant, Arc<BuildError>)>>,
    builds: Semaphore,
}

impl NixImages {
    pub fn new(store: Arc<Store>, settings: NixSettings) -> NixImages {
        NixImages {
            store,
            nix: Nix::new(settings.nix.clone()),
            popularity: Mutex::new(settings.popularity.clone()),
            learnt_store: std::sync::atomic::AtomicBool::new(false),
            settings,
            inflight: SingleFlight::new(),
            failures: Mutex::new(HashMap::new()),
            builds: Semaphore::new(PARALLEL_BUILDS),
        }
    }

    /// Returns once no build is running or waiting to run: a stopping
    /// daemon lets builds finish rather than interrupt Nix.
    pub(crate) async fn builds_finished(&self) {
        let all = PARALLEL_BUILDS as u32;
        let running = PARALLEL_BUILDS - self.builds.available_permits();
        if running > 0 {
            tracing::info!(running, "waiting for Nix builds to finish");
        }
        // Fair: granted after every build queued before it. The semaphore is
        // never closed, so this cannot fail.
        let _all = self.builds.acquire_many(all).await;
    }

    /// The package part of `repo` if it names a Nix image on `host`:
    /// everything for a Nix registry host, else what follows the namespace.
    pub(crate) fn route<'a>(&self, host: &RegistryHost, repo: &'a RepoName) -> Option<&'a str> {
        self.settings.route(host, repo)
    }

    pub(crate) fn settings(&self) -> &NixSettings {
        &self.settings
    }

    /// The key of everything that decides an image's bytes.
    fn request_key(
        &self,
        name: &ImageName,
        source: &PkgSource,
        compression: Compression,
    ) -> Digest {
        #[derive(Serialize)]
        struct Key<'a> {
            version: u32,
            name: String,
            source: &'a PkgSource,
            compression: Compression,
            budget: usize,
            always_include: &'a [String],
        }
        let key = Key {
            version: FORMAT_VERSION,
            name: name.canonical(),
            source,
            compression,
            budget: self.settings.layer_budget,
            always_include: &self.settings.nix.always_include,
        };
        // Serialising a struct of strings cannot fail; an empty key would
        // only make every image a cache miss.
        Digest::sha256_of(&serde_json::to_vec(&key).unwrap_or_default())
    }

    fn fresh(&self, record: &NixImageRecord) -> bool {
        let complete = record
            .manifests
            .iter()
            .all(|m| self.store.has_blob(&m.digest));
        let young = now_secs().saturating_sub(record.built_at) < self.settings.ttl.as_secs();
        complete && (record.pinned || young)
    }

    /// Builds the image `packages` names if the cache has no fresh copy, and
    /// publishes it as `repo:tag` on `host`: the name it was asked by, so the
    /// by-digest requests that follow and tags/list find it.
    /// The manifests that answer `client` for `tag`, built if need be. They
    /// are the answer itself: the tag's record in the store is shared by
    /// every client, and a Docker 20.10 and a containerd asking at once must
    /// not get each other's variant. The record holds the configured
    /// compression's variant (or the first built), for listings and gc.
    pub(crate) async fn resolve_tag(
        self: &Arc<Self>,
        host: &RegistryHost,
        repo: &RepoName,
        packages: &str,
        tag: &Tag,
        client: Client,
    ) -> Result<Vec<ManifestVariant>, SourceError> {
        let compression = self.compression_for(client);
        let manifests = self
            .manifests(packages, tag, compression)
            .await
            .map_err(|e| SourceError::from(&*e))?;
        let is_default = compression == self.settings.compression;
        let (store, h, r, t, answer) = (
            Arc::clone(&self.store),
            host.clone(),
            repo.clone(),
            tag.clone(),
            manifests.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let links = manifests.iter().map(|m| (&m.digest, m.media_type.as_str()));
            // Only the default variant replaces a record: clients of both
            // kinds alternating would otherwise rewrite it on every pull.
            let record = TagRecord {
                manifests: manifests.clone(),
            };
            let tag = (is_default || store.tag(&h, &r, &t).ok().flatten().is_none())
                .then_some((&t, &record));
            store.publish(&h, &r, links, tag)
        })
        .await
        .map_err(|e| SourceError::from(&BuildError::from(e)))?
        .map_err(|e| SourceError::from(&BuildError::from(e)))?;
        Ok(answer)
    }

    /// The configured layer compression, unless `client` cannot unpack it:
    /// zstd for an old Docker engine becomes gzip, a variant of its own.
    fn compression_for(&self, client: Client) -> Compression {
        match self.settings.compression {
            Compression::Zstd if !client.zstd_layers => Compression::Gzip,
            c => c,
        }
    }

    /// The manifests of the image `packages` (the repository path below the
    /// namespace) names, with `compression`, building it if the cache has no
    /// fresh copy.
    pub(crate) async fn manifests(
        self: &Arc<Self>,
        packages: &str,
        tag: &Tag,
        compression: Compression,
    ) -> Result<Vec<ManifestVariant>, Arc<BuildError>> {
        let name = ImageName::parse(packages).map_err(|e| Arc::new(e.into()))?;
        let source = self.settings.source.for_tag(tag);
        let key = self.request_key(&name, &source, compression);

        let this = Arc::clone(self);
        let k = key.clone();
        let cached = tokio::task::spawn_blocking(move || {
            this.store
                .record::<NixImageRecord>(RecordKind::NixImage, &k)
        })
        .await
        .map_err(|e| Arc::new(e.into()))?
        .map_err(|e| Arc::new(e.into()))?;
        if let Some(record) = &cached {
            if self.fresh(record) {
                return Ok(record.manifests.clone());
            }
        }

        match self.shared_build(key, name, source, compression).await {
            Ok(record) => Ok(record.manifests),
            Err(e) => match cached {
                // Stale-if-error: an old image beats no image.
                Some(old) if old.manifests.iter().all(|m| self.store.has_blob(&m.digest)) => {
                    tracing::warn!(name = %old.name, error = %e, "rebuild failed; serving the previous build");
                    Ok(old.manifests)
                }
                _ => Err(e),
            },
        }
    }

    /// Joins the build of `key` in flight, or starts it as its own task.
    async fn shared_build(
        self: &Arc<Self>,
        key: Digest,
        name: ImageName,
        source: PkgSource,
        compression: Compression,
    ) -> Outcome {
        if let Some(e) = self.recent_failure(&key) {
            tracing::debug!(name = %name.canonical(), "the build failed moments ago; not retrying yet");
            return Err(e);
        }
        let this = Arc::clone(self);
        self.inflight
            .run(key.clone(), move || async move {
                this.build_task(&key, name, source, compression).await
            })
            .await
            .unwrap_or_else(|| Err(Arc::new(BuildError::Interrupted)))
    }

    fn recent_failure(&self, key: &Digest) -> Option<Arc<BuildError>> {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        failures.retain(|_, (at, _)| at.elapsed() < FAILURE_TTL);
        failures.get(key).map(|(_, e)| Arc::clone(e))
    }

    async fn build_task(
        self: &Arc<Self>,
        key: &Digest,
        name: ImageName,
        source: PkgSource,
        compression: Compression,
    ) -> Outcome {
        let shown_name = name.canonical();
        let activity = ACTIVITIES.start("build", shown_name.clone());
        activity.stage("waiting for a build slot");
        // The semaphore is never closed, so acquiring cannot fail.
        let _slot = self.builds.acquire().await.ok();
        let this = Arc::clone(self);
        let k = key.clone();
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let report = Progress {
                activity,
                terminal: false,
            };
            this.build_blocking(&k, &name, &source, compression, &report)
        })
        .await;
        METRICS.nix_build_duration.observe(started.elapsed());
        let outcome = match result {
            Ok(Ok(report)) => Ok(report.record),
            Ok(Err(e)) => Err(Arc::new(e)),
            Err(e) => Err(Arc::new(e.into())),
        };
        if let Err(e) = &outcome {
            tracing::warn!(name = %shown_name, error = %e, "Nix image build failed");
            self.failures
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(key.clone(), (Instant::now(), Arc::clone(e)));
        }
        let counter = match &outcome {
            Ok(_) => &METRICS.nix_builds,
            Err(_) => &METRICS.nix_build_failures,
        };
        metrics::add(counter, 1);
        crate::telemetry::events::EVENTS.record(
            "build",
            shown_name,
            started.elapsed(),
            outcome.as_ref().err().map(|e| e.to_string()),
        );
        outcome
    }

    /// Builds `packages` (for `tag`) into the cache, blocking: the daemon's
    /// builds and `nixery-local build` both end here.
    pub fn build_now(
        &self,
        packages: &str,
        tag: &Tag,
        progress: bool,
    ) -> Result<BuildReport, BuildError> {
        let name = ImageName::parse(packages)?;
        let source = self.settings.source.for_tag(tag);
        let compression = self.settings.compression;
        let key = self.request_key(&name, &source, compression);
        let progress = Progress {
            activity: ACTIVITIES.start("build", name.canonical()),
            terminal: progress,
        };
        let mut report = self.build_blocking(&key, &name, &source, compression, &progress)?;
        let others: Vec<(Digest, NixImageRecord)> = self.store.records(RecordKind::NixImage)?;
        for layer in &mut report.layers {
            layer.shared_with = others
                .iter()
                .filter(|(_, r)| r.name != report.record.name && r.layers.contains(&layer.digest))
                .count();
        }
        Ok(report)
    }

    fn build_blocking(
        &self,
        key: &Digest,
        name: &ImageName,
        source: &PkgSource,
        compression: Compression,
        progress: &Progress,
    ) -> Result<BuildReport, BuildError> {
        let started = Instant::now();
        let say = |msg: String| progress.say(msg);
        say(format!("evaluating and building {name} …"));
        let gc_root = self.store.gcroots_dir().join(key.hex());
        let built = self.nix.build(source, name, Some(&gc_root))?;
        let closure = &built.closure;

        let over_budget = closure.len() >= self.settings.layer_budget;
        if over_budget
            && !self
                .learnt_store
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            // Popularity only matters once paths must share layers: learn it
            // from the whole local store's reference graph, once.
            match self.nix.store_graph() {
                Ok(graph) => self
                    .popularity
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .learn(&graph),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the store's reference graph for popularity")
                }
            }
        }
        let popularity = {
            let mut learnt = self
                .popularity
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            learnt.learn(closure);
            learnt.clone()
        };
        let groups = layers::group_layers(closure, &popularity, self.settings.layer_budget)?;
        say(format!(
            "closure: {} store paths, {} MB, {} layers",
            closure.len(),
            closure.total_size() / 1_000_000,
            groups.len() + 1
        ));

        let mut built_layers = self.write_layers(&groups, compression, progress)?;

        // The customisation layer: symlinks into the closure, /tmp, env, CA bundle.
        let outputs = built.evaluation.output_paths();
        let closure_paths: Vec<String> = closure.paths.keys().cloned().collect();
        let mut w = self.store.blob_writer(Algorithm::Sha256)?;
        let (custom_info, custom) =
            layers::write_customisation_layer(&outputs, &closure_paths, compression, &mut w)?;
        let (digest, _, staged) = w.finish_computed()?;
        if digest != custom_info.digest {
            return Err(BuildError::LayerDigest {
                expected: custom_info.digest,
                actual: digest,
            });
        }
        staged.commit()?;

        let mut image_layers: Vec<ImageLayer> = groups
            .iter()
            .zip(&built_layers)
            .map(|(g, (info, _))| ImageLayer {
                info: info.clone(),
                created_by: image::describe_paths(&g.paths),
            })
            .collect();
        image_layers.push(ImageLayer {
            info: custom_info.clone(),
            created_by: format!("nixery-local: {name}"),
        });
        let spec = ImageSpec {
            platform: Platform::from_nix_system(&built.evaluation.system)?,
            env: image::default_env(custom.ca_bundle),
            cmd: name.cmd(),
            layers: image_layers,
            created: built.evaluation.source_date.unwrap_or(image::FORMAT_DATE),
        };
        let m = image::build_manifests(&spec)?;
        self.store.put_blob_bytes(&m.config_digest, &m.config)?;
        self.store.put_blob_bytes(&m.oci_digest, &m.oci)?;
        self.store.put_blob_bytes(&m.docker_digest, &m.docker)?;

        built_layers.push((custom_info, false));
        let record = NixImageRecord {
            name: name.canonical(),
            built_at: now_secs(),
            pinned: source.is_pinned(),
            manifests: vec![
                ManifestVariant {
                    media_type: OCI_MANIFEST.to_owned(),
                    digest: m.oci_digest,
                    size: m.oci.len() as u64,
                },
                ManifestVariant {
                    media_type: DOCKER_MANIFEST.to_owned(),
                    digest: m.docker_digest,
                    size: m.docker.len() as u64,
                },
            ],
            layers: built_layers.iter().map(|(i, _)| i.digest.clone()).collect(),
            gc_roots: built.gc_roots.clone(),
        };
        self.store.put_record(RecordKind::NixImage, key, &record)?;

        let reused = built_layers.iter().filter(|(_, r)| *r).count();
        tracing::info!(
            name = %record.name,
            layers = built_layers.len(),
            reused_layers = reused,
            closure_paths = closure.len(),
            duration_ms = started.elapsed().as_millis() as u64,
            digest = %record.manifests[0].digest,
            "built Nix image"
        );
        let mut table: Vec<BuiltLayer> = groups
            .iter()
            .zip(&built_layers)
            .map(|(g, (info, reused))| BuiltLayer {
                digest: info.digest.clone(),
                size: info.size,
                paths: g.paths.clone(),
                reused: *reused,
                shared_with: 0,
            })
            .collect();
        if let Some((info, _)) = built_layers.last() {
            table.push(BuiltLayer {
                digest: info.digest.clone(),
                size: info.size,
                paths: vec!["(customisation layer)".to_owned()],
                reused: false,
                shared_with: 0,
            });
        }
        Ok(BuildReport {
            record,
            layers: table,
        })
    }

    /// Each group's layer, from the cache when a layer of the same store
    /// paths and compression exists, else written now, several at once.
    fn write_layers(
        &self,
        groups: &[LayerGroup],
        compression: Compression,
        progress: &Progress,
    ) -> Result<Vec<(LayerInfo, bool)>, BuildError> {
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .min(groups.len().max(1));
        let next = std::sync::atomic::AtomicUsize::new(0);
        let done = std::sync::atomic::AtomicUsize::new(0);
        let results: Vec<Mutex<Option<LayerOutcome>>> =
            groups.iter().map(|_| Mutex::new(None)).collect();
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(group) = groups.get(i) else { break };
                    let result = self.layer(group, compression);
                    let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    progress.say(format!("layer {n}/{}", groups.len()));
                    if let Ok(mut slot) = results[i].lock() {
                        *slot = Some(result);
                    }
                });
            }
        });
        results
            .into_iter()
            .map(|slot| {
                slot.into_inner()
                    .ok()
                    .flatten()
                    .unwrap_or(Err(BuildError::Interrupted))
            })
            .collect()
    }

    fn layer(&self, group: &LayerGroup, compression: Compression) -> LayerOutcome {
        let key = {
            let mut h = crate::oci::digest::Hasher::new(Algorithm::Sha256);
            h.update(group.id().to_string().as_bytes());
            h.update(compression.as_str().as_bytes());
            h.finish()
        };
        if let Some(info) = self.store.record::<LayerInfo>(RecordKind::Layer, &key)? {
            if self.store.has_blob(&info.digest) {
                return Ok((info, true));
            }
        }
        let mut w = self.store.blob_writer(Algorithm::Sha256)?;
        let info = layers::write_layer(&group.path_bufs(), compression, &mut w)?;
        let (digest, _, staged) = w.finish_computed()?;
        if digest != info.digest {
            return Err(BuildError::LayerDigest {
                expected: info.digest,
                actual: digest,
            });
        }
        staged.commit()?;
        self.store.put_record(RecordKind::Layer, &key, &info)?;
        Ok((info, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(dir: &std::path::Path) -> NixImages {
        let store = Arc::new(Store::open(dir).expect("store"));
        NixImages::new(
            store,
            NixSettings {
                namespace: "nix".into(),
                registries: vec!["nix.local".parse().expect("host")],
                source: SourceSetting::Fixed(PkgSource::Path {
                    path: "/pkgs".into(),
                }),
                layer_budget: 95,
                compression: Compression::Gzip,
                ttl: Duration::from_secs(60),
                popularity: Popularity::new(),
                nix: NixConfig::default(),
            },
        )
    }

    #[test]
    fn routes_the_namespace_and_nix_registries_only() {
        let dir = tempfile::tempdir().expect("tmp");
        let n = images(dir.path());
        let repo = |s: &str| s.parse::<RepoName>().expect("repo");
        let docker: RegistryHost = "docker.io".parse().expect("host");
        let nix_local: RegistryHost = "nix.local".parse().expect("host");
        let r = repo("nix/shell/git");
        assert_eq!(n.route(&docker, &r), Some("shell/git"));
        let r = repo("shell/git");
        assert_eq!(n.route(&nix_local, &r), Some("shell/git"));
        assert_eq!(n.route(&docker, &r), None);
        let r = repo("nixos/nix");
        assert_eq!(
            n.route(&docker, &r),
            None,
            "only the whole first component counts"
        );
    }

    #[test]
    fn request_keys_ignore_order_but_not_settings() {
        let dir = tempfile::tempdir().expect("tmp");
        let n = images(dir.path());
        let src = PkgSource::Path {
            path: "/pkgs".into(),
        };
        let a = ImageName::parse("git/htop").expect("name");
        let b = ImageName::parse("htop/git/htop").expect("name");
        let zstd = Compression::Zstd;
        assert_eq!(n.request_key(&a, &src, zstd), n.request_key(&b, &src, zstd));
        let other = PkgSource::Path {
            path: "/other".into(),
        };
        assert_ne!(
            n.request_key(&a, &src, zstd),
            n.request_key(&a, &other, zstd)
        );
        assert_ne!(
            n.request_key(&a, &src, zstd),
            n.request_key(&a, &src, Compression::Gzip)
        );
    }

    #[test]
    fn stale_records_are_not_fresh_and_pinned_ones_never_expire() {
        let dir = tempfile::tempdir().expect("tmp");
        let n = images(dir.path());
        let bytes = b"{}";
        let digest = Digest::sha256_of(bytes);
        n.store.put_blob_bytes(&digest, bytes).expect("put");
        let mut record = NixImageRecord {
            name: "hello".into(),
            built_at: now_secs(),
            pinned: false,
            manifests: vec![ManifestVariant {
                media_type: OCI_MANIFEST.into(),
                digest,
                size: 2,
            }],
            layers: vec![],
            gc_roots: vec![],
        };
        assert!(n.fresh(&record));
        record.built_at -= 61;
        assert!(!n.fresh(&record));
        record.pinned = true;
        assert!(n.fresh(&record));
        record.manifests[0].digest = Digest::sha256_of(b"gone");
        assert!(
            !n.fresh(&record),
            "a record whose manifest is gone must be rebuilt"
        );
    }
}
