//! Blobserve: files from inside images over HTTP (`/files/<repo>:<tag>/<path>`).
//!
//! An image is resolved to its manifest through the [`Registry`] (so Nix
//! images are built and mirrored images fetched as needed; an index picks the
//! host's platform). Each layer is extracted once into
//! `<state>/extracted/<alg>/<hex>/`, through a temp directory renamed into
//! place, so nothing half-written is ever seen. Extraction never creates device
//! nodes, never follows or writes through symlinks, and drops entries whose
//! path is absolute or climbs with `..`. Concurrent first requests for a layer
//! wait for one extraction, which runs as its own task so a client hanging up
//! does not cancel it.
//!
//! A lookup walks the layer stack top-down, honouring whiteouts (`.wh.NAME`)
//! and opaque directories (`.wh..wh..opq`), and resolves symlinks component by
//! component inside the image root: absolute targets are relative to the
//! image root and `..` at the root stays there.
//!
//! The extracted space is capped (`--blobserve-max-size`); least recently used
//! layers are evicted whole, never one a request is reading.
//!
//! This module knows nothing of HTTP: [`crate::http`] turns its answers into
//! responses and its [`BlobserveError`]s into status codes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::watch;

use crate::oci::accept::Accept;
use crate::oci::digest::Digest;
use crate::oci::manifest;
use crate::oci::reference::{NameError, Reference, RegistryHost, RepoName};
use crate::registry::{BlobSource, Registry, RegistryError};
use crate::sources::mirror::Download;
use crate::store::BlobFile;

/// Symlinks followed in one lookup before giving up (as Linux's ELOOP).
pub const MAX_SYMLINK_HOPS: usize = 40;

/// A file replaced wholesale in memory (for search-and-replace) is at most this big.
const MAX_REPLACE_SIZE: u64 = 16 << 20;

/// Extracted files are written in writes this large.
const WRITE_BUFFER: usize = 1 << 20;

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Per-repository settings, from the config file's `[blobserve."REPO"]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlobserveRepo {
    /// A directory in the image that every request path is relative to.
    #[serde(default)]
    pub workdir: Option<String>,
    /// Search-and-replace modifiers on named files (paths relative to the
    /// working directory).
    #[serde(default)]
    pub replace: Vec<Replacement>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Replacement {
    pub file: String,
    pub from: String,
    pub to: String,
}

#[derive(Clone, Debug, Default)]
pub struct BlobserveSettings {
    /// Keyed by repository (`nix/hello`) or host and repository
    /// (`docker.io/library/nginx`).
    pub repos: BTreeMap<String, BlobserveRepo>,
    /// Most bytes the extracted layers may take.
    pub max_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BlobserveError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("no such file or directory in the image: {0}")]
    NotFound(String),
    #[error("too many levels of symbolic links resolving {0}")]
    SymlinkLoop(String),
    #[error("not a directory: {0}")]
    NotADirectory(String),
    #[error("the image has no manifest for linux/{0}")]
    NoPlatform(&'static str),
    #[error("cannot read the image's manifest: {0}")]
    Manifest(String),
    #[error("unsupported layer media type {0:?}")]
    UnsupportedLayer(String),
    #[error("extracting layer {digest} failed: {message}")]
    Extract { digest: Digest, message: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BlobserveError + 'a {
    move |source| BlobserveError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

// ---------------------------------------------------------------------------
// Request names
// ---------------------------------------------------------------------------

/// `<repository>(:<tag>|@<digest>)/<path>` split into its parts. Repository
/// components never contain `:` or `@`, tags and digests never `/`.
#[derive(Debug, PartialEq, Eq)]
pub struct FileRequest {
    pub repo: RepoName,
    pub reference: Reference,
    /// The raw reference text, for building links.
    pub reference_text: String,
    /// The path inside the image, without the leading `/` (may be empty).
    pub path: String,
}

impl FileRequest {
    /// Parses the part of a request path after `/files/` (already
    /// percent-decoded).
    pub fn parse(rest: &str) -> Result<FileRequest, BlobserveError> {
        let split = rest.find([':', '@']).ok_or_else(|| {
            BlobserveError::BadRequest(
                "name the image as <repository>:<tag> or <repository>@<digest>".into(),
            )
        })?;
        let (repo, tail) = rest.split_at(split);
        let (reference, path) = match tail[1..].find('/') {
            Some(i) => (&tail[1..1 + i], &tail[2 + i..]),
            None => (&tail[1..], ""),
        };
        let repo: RepoName = repo.parse()?;
        let reference = if tail.starts_with('@') {
            Reference::Digest(reference.parse().map_err(NameError::from)?)
        } else {
            Reference::Tag(reference.parse()?)
        };
        if path.contains('\0') {
            return Err(BlobserveError::BadRequest("the path contains NUL".into()));
        }
        Ok(FileRequest {
            repo,
            reference_text: tail[..1 + tail[1..].find('/').unwrap_or(tail.len() - 1)].to_owned(),
            reference,
            path: path.to_owned(),
        })
    }
}

/// Splits a path into its names, dropping empty and `.` components; `..`
/// is kept for the resolver (which never lets it leave the root).
fn components(path: &str) -> impl DoubleEndedIterator<Item = &str> {
    path.split('/').filter(|c| !c.is_empty() && *c != ".")
}

// ---------------------------------------------------------------------------
// What a lookup finds
// ---------------------------------------------------------------------------

/// A regular file to stream, with what the response needs.
pub struct FileHit {
    pub file: Arc<BlobFile>,
    pub size: u64,
    pub modified: Option<SystemTime>,
    /// The layer the file comes from.
    pub layer: Digest,
    /// The file's path in the image (after symlinks), with a leading `/`.
    pub path: String,
    /// Set when a replacement rewrote the file: the whole new content.
    pub replaced: Option<Bytes>,
    /// Keeps the layers from eviction while the response streams.
    pub guard: ImageGuard,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct DirEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modified: Option<u64>,
}

pub struct Listing {
    /// The directory's path in the image, with a leading `/`.
    pub path: String,
    pub entries: Vec<DirEntry>,
}

pub enum Found {
    File(Box<FileHit>),
    Dir(Listing),
}

/// Holds every layer of an image in use; dropping it lets them be evicted.
pub struct ImageGuard {
    _layers: Vec<LayerGuard>,
}

struct LayerGuard {
    inner: Arc<Inner>,
    digest: Digest,
    dir: PathBuf,
}

impl Drop for LayerGuard {
    fn drop(&mut self) {
        if let Ok(mut st) = self.inner.state.lock() {
            if let Some(e) = st.entries.get_mut(&self.digest) {
                e.users = e.users.saturating_sub(1);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The service
// ---------------------------------------------------------------------------

pub struct Blobserve {
    registry: Arc<Registry>,
    inner: Arc<Inner>,
    repos: BTreeMap<String, BlobserveRepo>,
}

impl std::fmt::Debug for Blobserve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blobserve")
            .field("root", &self.inner.root)
            .field("max_bytes", &self.inner.max_bytes)
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// `<state>/extracted`
    root: PathBuf,
    max_bytes: u64,
    state: Mutex<LayerState>,
    tmp_counter: AtomicU64,
}

type Outcome = Option<Result<(), String>>;

#[derive(Default)]
struct LayerState {
    entries: HashMap<Digest, Entry>,
    inflight: HashMap<Digest, watch::Receiver<Outcome>>,
    total: u64,
    clock: u64,
}

struct Entry {
    size: u64,
    last_used: u64,
    users: usize,
}

impl Blobserve {
    /// Opens the extracted space at `root` (creating it), dropping leftovers
    /// of interrupted extractions and taking stock of what is there.
    pub fn new(
        registry: Arc<Registry>,
        root: PathBuf,
        settings: BlobserveSettings,
    ) -> Result<Blobserve, BlobserveError> {
        let tmp = root.join("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err("remove", &tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
        let mut found = Vec::new();
        for alg in fs::read_dir(&root)
            .map_err(io_err("read", &root))?
            .flatten()
        {
            let alg_name = alg.file_name().to_string_lossy().into_owned();
            if alg_name == "tmp" || !alg.path().is_dir() {
                continue;
            }
            let Ok(layers) = fs::read_dir(alg.path()) else {
                continue;
            };
            for layer in layers.flatten() {
                let name = layer.file_name().to_string_lossy().into_owned();
                let Ok(digest) = format!("{alg_name}:{name}").parse::<Digest>() else {
                    continue;
                };
                let mtime = layer
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((mtime, digest, tree_size(&layer.path())));
            }
        }
        found.sort_by_key(|f| f.0);
        let mut state = LayerState::default();
        for (_, digest, size) in found {
            state.clock += 1;
            state.total += size;
            state.entries.insert(
                digest,
                Entry {
                    size,
                    last_used: state.clock,
                    users: 0,
                },
            );
        }
        Ok(Blobserve {
            registry,
            inner: Arc::new(Inner {
                root,
                max_bytes: settings.max_bytes,
                state: Mutex::new(state),
                tmp_counter: AtomicU64::new(0),
            }),
            repos: settings.repos,
        })
    }

    /// Bytes the extracted layers take now.
    pub fn extracted_bytes(&self) -> u64 {
        self.inner.state.lock().map(|s| s.total).unwrap_or(0)
    }

    /// The file or directory `req.path` names in the image.
    pub async fn lookup(
        &self,
        host: RegistryHost,
        req: &FileRequest,
    ) -> Result<Found, BlobserveError> {
        let settings = self
            .repos
            .get(&format!("{host}/{}", req.repo))
            .or_else(|| self.repos.get(req.repo.as_str()))
            .cloned()
            .unwrap_or_default();
        let layers = self.image_layers(&host, &req.repo, &req.reference).await?;
        let mut guards = Vec::with_capacity(layers.len());
        let acquired = futures_util::future::join_all(
            layers
                .iter()
                .map(|l| self.acquire(host.clone(), req.repo.clone(), l.clone())),
        )
        .await;
        for g in acquired {
            guards.push(g?);
        }
        // Top layer first.
        guards.reverse();
        let mut full = String::new();
        if let Some(w) = &settings.workdir {
            full.push_str(w);
            full.push('/');
        }
        full.push_str(&req.path);
        let rel_path: Vec<String> = components(&req.path).map(str::to_owned).collect();
        let workdir: Vec<String> = components(settings.workdir.as_deref().unwrap_or(""))
            .map(str::to_owned)
            .collect();
        let rules = settings.replace;
        tokio::task::spawn_blocking(move || {
            let dirs: Vec<&Path> = guards.iter().map(|g| g.dir.as_path()).collect();
            let resolved = resolve(&dirs, &full)?;
            match resolved {
                Resolved::Dir { path, stack } => {
                    let entries = list(&dirs, &path, &stack)?;
                    Ok(Found::Dir(Listing {
                        path: format!("/{}", path.join("/")),
                        entries,
                    }))
                }
                Resolved::File { path, layer } => {
                    // A rule names the file as asked for or as resolved
                    // (through symlinks), relative to the working directory.
                    let replacement: Vec<&Replacement> = rules
                        .iter()
                        .filter(|r| {
                            components(&r.file).eq(rel_path.iter().map(String::as_str))
                                || workdir
                                    .iter()
                                    .map(String::as_str)
                                    .chain(components(&r.file))
                                    .eq(path.iter().map(String::as_str))
                        })
                        .collect();
                    let fs_path = join(dirs[layer], &path);
                    let file = File::open(&fs_path).map_err(io_err("open", &fs_path))?;
                    let meta = file.metadata().map_err(io_err("stat", &fs_path))?;
                    let size = meta.len();
                    let replaced = if replacement.is_empty() {
                        None
                    } else {
                        if size > MAX_REPLACE_SIZE {
                            return Err(BlobserveError::BadRequest(format!(
                                "{full} is too large to rewrite ({size} bytes)"
                            )));
                        }
                        let mut text = fs::read(&fs_path).map_err(io_err("read", &fs_path))?;
                        for r in &replacement {
                            text = replace_all(&text, r.from.as_bytes(), r.to.as_bytes());
                        }
                        Some(Bytes::from(text))
                    };
                    let layer_digest = guards[layer].digest.clone();
                    Ok(Found::File(Box::new(FileHit {
                        file: Arc::new(BlobFile::from_file(file, size)),
                        size: replaced.as_ref().map_or(size, |b| b.len() as u64),
                        modified: meta.modified().ok(),
                        layer: layer_digest,
                        path: format!("/{}", path.join("/")),
                        replaced,
                        guard: ImageGuard { _layers: guards },
                    })))
                }
            }
        })
        .await?
    }

    /// The layer descriptors of the image, bottom first.
    async fn image_layers(
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

    /// The layer's extracted directory, extracting it first if needed; the
    /// guard keeps it from eviction.
    async fn acquire(
        &self,
        host: RegistryHost,
        repo: RepoName,
        layer: manifest::Descriptor,
    ) -> Result<LayerGuard, BlobserveError> {
        let digest = layer.digest.clone();
        let dir = self.inner.layer_dir(&digest);
        loop {
            let mut rx = {
                let mut st = lock(&self.inner.state);
                st.clock += 1;
                let now = st.clock;
                if let Some(e) = st.entries.get_mut(&digest) {
                    e.users += 1;
                    e.last_used = now;
                    return Ok(LayerGuard {
                        inner: Arc::clone(&self.inner),
                        digest,
                        dir,
                    });
                }
                // A task that died without an answer (a panic) is forgotten.
                if st
                    .inflight
                    .get(&digest)
                    .is_some_and(|rx| rx.has_changed().is_err() && rx.borrow().is_none())
                {
                    st.inflight.remove(&digest);
                }
                match st.inflight.get(&digest) {
                    Some(rx) => rx.clone(),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        st.inflight.insert(digest.clone(), rx.clone());
                        let inner = Arc::clone(&self.inner);
                        let registry = Arc::clone(&self.registry);
                        let (h, r, l) = (host.clone(), repo.clone(), layer.clone());
                        // Its own task: a client hanging up must not cancel it.
                        tokio::spawn(async move {
                            let result = extract_task(&inner, &registry, h, r, &l).await;
                            let outcome = {
                                let mut st = lock(&inner.state);
                                st.inflight.remove(&l.digest);
                                match result {
                                    Ok(size) => {
                                        st.clock += 1;
                                        let now = st.clock;
                                        st.total += size;
                                        st.entries.insert(
                                            l.digest.clone(),
                                            Entry {
                                                size,
                                                last_used: now,
                                                users: 0,
                                            },
                                        );
                                        Ok(())
                                    }
                                    Err(e) => {
                                        tracing::warn!(digest = %l.digest, error = %e, "layer extraction failed");
                                        Err(e.to_string())
                                    }
                                }
                            };
                            let _ = tx.send(Some(outcome));
                            let inner2 = Arc::clone(&inner);
                            let keep = l.digest.clone();
                            let _ = tokio::task::spawn_blocking(move || inner2.evict(&keep)).await;
                        });
                        rx
                    }
                }
            };
            let outcome = rx
                .wait_for(Option::is_some)
                .await
                .map(|o| o.clone())
                .unwrap_or(Some(Err("the extraction task ended".into())));
            if let Some(Err(message)) = outcome {
                return Err(BlobserveError::Extract {
                    digest: digest.clone(),
                    message,
                });
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn layer_dir(&self, digest: &Digest) -> PathBuf {
        self.root.join(digest.algorithm().name()).join(digest.hex())
    }

    fn tmp_path(&self, what: &str) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{what}.{}.{n}", std::process::id()))
    }

    /// Evicts least recently used layers nobody is reading until the space
    /// fits; `keep` (just extracted) stays.
    fn evict(&self, keep: &Digest) {
        loop {
            let victim = {
                let mut st = lock(&self.state);
                if st.total <= self.max_bytes {
                    return;
                }
                let Some(d) = st
                    .entries
                    .iter()
                    .filter(|(d, e)| e.users == 0 && *d != keep)
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(d, _)| d.clone())
                else {
                    return;
                };
                let e = st.entries.remove(&d).map_or(0, |e| e.size);
                st.total = st.total.saturating_sub(e);
                // Moved aside under the lock, so a re-extraction can rename
                // its own result into place right away.
                let from = self.layer_dir(&d);
                let to = self.tmp_path("evicted");
                if let Err(e) = fs::rename(&from, &to) {
                    tracing::warn!(path = %from.display(), error = %e, "cannot evict extracted layer");
                    continue;
                }
                tracing::info!(digest = %d, bytes = e, "layer evicted from the extracted space");
                to
            };
            if let Err(e) = fs::remove_dir_all(&victim) {
                tracing::warn!(path = %victim.display(), error = %e, "cannot remove evicted layer");
            }
        }
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

// ---------------------------------------------------------------------------
// Extraction
// ---------------------------------------------------------------------------

/// Fetches the layer and extracts it; returns the bytes it takes.
async fn extract_task(
    inner: &Arc<Inner>,
    registry: &Registry,
    host: RegistryHost,
    repo: RepoName,
    layer: &manifest::Descriptor,
) -> Result<u64, BlobserveError> {
    let started = Instant::now();
    let blob = registry.blob(host, repo, layer.digest.clone()).await?;
    let source = match blob.source {
        BlobSource::Stored(f) => Source::Stored(f),
        BlobSource::Downloading(dl) => {
            // Wait for the whole blob (verified) before reading it.
            let mut pos = 0;
            while let Some(end) = dl
                .available(pos)
                .await
                .map_err(|e| BlobserveError::Extract {
                    digest: layer.digest.clone(),
                    message: e.to_string(),
                })?
            {
                pos = end;
            }
            Source::Download(dl)
        }
    };
    let inner2 = Arc::clone(inner);
    let digest = layer.digest.clone();
    let (size, files) = tokio::task::spawn_blocking(move || {
        let tmp = inner2.tmp_path("extract");
        let result = extract_into(source, &tmp).and_then(|stats| {
            let dest = inner2.layer_dir(&digest);
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).map_err(io_err("create", parent))?;
            }
            match fs::rename(&tmp, &dest) {
                Ok(()) => Ok(stats),
                // Left by an earlier run we did not account for: keep it.
                Err(_) if dest.is_dir() => {
                    let _ = fs::remove_dir_all(&tmp);
                    Ok((tree_size(&dest), stats.1))
                }
                Err(e) => Err(io_err("rename", &dest)(e)),
            }
        });
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result.map_err(|e| match e {
            e @ BlobserveError::Extract { .. } => e,
            e => BlobserveError::Extract {
                digest: digest.clone(),
                message: e.to_string(),
            },
        })
    })
    .await??;
    tracing::info!(digest = %layer.digest, bytes = size, files, elapsed_ms = started.elapsed().as_millis() as u64, "extracted layer");
    Ok(size)
}

enum Source {
    Stored(Arc<BlobFile>),
    Download(Arc<Download>),
}

/// Sequential reads over a positioned-read source.
struct SourceReader {
    source: Source,
    offset: u64,
}

impl Read for SourceReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match &self.source {
            Source::Stored(f) => f.read_at(self.offset, buf)?,
            Source::Download(d) => d.read_at(self.offset, buf)?,
        };
        self.offset += n as u64;
        Ok(n)
    }
}

/// Extracts a (possibly compressed) tar stream into the new directory `dest`;
/// returns (bytes, entries written).
fn extract_into(source: Source, dest: &Path) -> Result<(u64, u64), BlobserveError> {
    let mut reader = io::BufReader::with_capacity(1 << 20, SourceReader { source, offset: 0 });
    let magic = {
        let buf = io::BufRead::fill_buf(&mut reader).map_err(io_err("read", dest))?;
        buf.get(..4).map(<[u8]>::to_vec).unwrap_or_default()
    };
    let stream: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(reader))
    } else if magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(zstd::stream::read::Decoder::with_buffer(reader).map_err(io_err("zstd", dest))?)
    } else {
        Box::new(reader)
    };
    fs::create_dir_all(dest).map_err(io_err("create", dest))?;
    let mut archive = tar::Archive::new(stream);
    let mut bytes = 0u64;
    let mut count = 0u64;
    let entries = archive.entries().map_err(io_err("read tar", dest))?;
    for entry in entries {
        let mut entry = entry.map_err(io_err("read tar", dest))?;
        let raw = entry.path_bytes().into_owned();
        let Some(rel) = safe_relative(&raw) else {
            tracing::debug!(path = %String::from_utf8_lossy(&raw), "skipping tar entry outside the root");
            continue;
        };
        if rel.as_os_str().is_empty() {
            continue; // the root itself
        }
        let target = dest.join(&rel);
        // Every parent must be a real directory we made: never write through a symlink.
        if !ensure_parents(dest, &rel)? {
            tracing::debug!(path = %rel.display(), "skipping tar entry below a non-directory");
            continue;
        }
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().unwrap_or(0o644);
        let mtime = entry.header().mtime().ok();
        match kind {
            tar::EntryType::Directory => match fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    remove_any(&target)?;
                    fs::create_dir(&target).map_err(io_err("create", &target))?;
                }
                Err(_) => fs::create_dir(&target).map_err(io_err("create", &target))?,
            },
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                remove_any(&target)?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&target)
                    .map_err(io_err("create", &target))?;
                // Large writes: the page cache then holds the file in large
                // folios, which later stream ~10 % faster than 8 KiB writes'.
                let size = entry.header().size().unwrap_or(0);
                let cap = size.clamp(4096, WRITE_BUFFER as u64) as usize;
                let mut w = io::BufWriter::with_capacity(cap, &mut f);
                let n = io::copy(&mut entry, &mut w).map_err(io_err("write", &target))?;
                w.flush().map_err(io_err("write", &target))?;
                drop(w);
                bytes += n;
                let perm = 0o644 | (mode & 0o111);
                f.set_permissions(fs::Permissions::from_mode(perm))
                    .map_err(io_err("chmod", &target))?;
                if let Some(t) = mtime {
                    let _ =
                        f.set_modified(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t));
                }
            }
            tar::EntryType::Symlink => {
                let Some(link) = entry.link_name_bytes().map(|c| c.into_owned()) else {
                    continue;
                };
                remove_any(&target)?;
                let link = std::ffi::OsStr::from_bytes(&link);
                std::os::unix::fs::symlink(link, &target).map_err(io_err("symlink", &target))?;
                bytes += link.len() as u64;
            }
            tar::EntryType::Link => {
                let Some(link) = entry.link_name_bytes().map(|c| c.into_owned()) else {
                    continue;
                };
                let Some(src_rel) = safe_relative(&link) else {
                    continue;
                };
                let src = dest.join(&src_rel);
                // Only to a regular file this layer wrote, reached through real directories.
                let ok = ensure_parents_exist(dest, &src_rel)
                    && fs::symlink_metadata(&src).is_ok_and(|m| m.is_file());
                if !ok {
                    tracing::debug!(path = %rel.display(), "skipping hard link to a missing file");
                    continue;
                }
                remove_any(&target)?;
                fs::hard_link(&src, &target).map_err(io_err("link", &target))?;
            }
            // Devices, FIFOs, and anything else: never created.
            _ => continue,
        }
        count += 1;
    }
    Ok((bytes, count))
}

use std::os::unix::ffi::OsStrExt;

/// A tar path as a relative path of plain names; `None` for absolute paths
/// and any `..`.
fn safe_relative(raw: &[u8]) -> Option<PathBuf> {
    let p = Path::new(std::ffi::OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => return None,
        }
    }
    Some(out)
}

/// Creates the parents of `rel` under `root` as real directories. False when
/// one exists as something else (a symlink, a file): the entry is skipped.
fn ensure_parents(root: &Path, rel: &Path) -> Result<bool, BlobserveError> {
    let mut cur = root.to_path_buf();
    let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
    for c in parent.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(io_err("create", &cur))?;
            }
            Err(e) => return Err(io_err("stat", &cur)(e)),
        }
    }
    Ok(true)
}

/// Whether every parent of `rel` under `root` is a real directory.
fn ensure_parents_exist(root: &Path, rel: &Path) -> bool {
    let mut cur = root.to_path_buf();
    let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
    for c in parent.components() {
        cur.push(c);
        if !fs::symlink_metadata(&cur).is_ok_and(|m| m.is_dir()) {
            return false;
        }
    }
    true
}

/// Removes whatever is at `path` (nothing there is fine); never follows a symlink.
fn remove_any(path: &Path) -> Result<(), BlobserveError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(io_err("remove", path)),
        Ok(_) => fs::remove_file(path).map_err(io_err("remove", path)),
        Err(_) => Ok(()),
    }
}

/// Bytes of regular files and symlinks under `dir` (symlinks not followed).
fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

// ---------------------------------------------------------------------------
// Lookup over the layer stack
// ---------------------------------------------------------------------------

enum Resolved {
    /// A directory: its path and the layers (indexes, top first) contributing to it.
    Dir {
        path: Vec<String>,
        stack: Vec<usize>,
    },
    /// A regular file in layer `layer`.
    File { path: Vec<String>, layer: usize },
}

fn join(base: &Path, parts: &[String]) -> PathBuf {
    let mut p = base.to_path_buf();
    p.extend(parts);
    p
}

/// What `name` is inside the directory `dir` (whose contributing layers are
/// `stack`): a directory with its own stack, or a non-directory in one layer.
enum Child {
    Missing,
    Dir(Vec<usize>),
    Other { layer: usize, meta: fs::Metadata },
}

fn child(layers: &[&Path], dir: &[String], stack: &[usize], name: &str) -> Child {
    let mut dir_stack = Vec::new();
    for &l in stack {
        let base = join(layers[l], dir);
        if fs::symlink_metadata(base.join(format!("{WHITEOUT}{name}"))).is_ok() {
            break;
        }
        match fs::symlink_metadata(base.join(name)) {
            Ok(m) if m.is_dir() => {
                dir_stack.push(l);
                if fs::symlink_metadata(base.join(name).join(OPAQUE)).is_ok() {
                    break;
                }
            }
            Ok(m) => {
                if dir_stack.is_empty() {
                    return Child::Other { layer: l, meta: m };
                }
                // A directory above hides a non-directory below.
                break;
            }
            Err(_) => {}
        }
    }
    if dir_stack.is_empty() {
        Child::Missing
    } else {
        Child::Dir(dir_stack)
    }
}

/// Resolves `path` in the merged image, following symlinks (also the final
/// one) inside the root.
fn resolve(layers: &[&Path], path: &str) -> Result<Resolved, BlobserveError> {
    let root_stack = {
        let mut s = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            s.push(i);
            if fs::symlink_metadata(l.join(OPAQUE)).is_ok() {
                break;
            }
        }
        s
    };
    // The resolved directories so far: (name, stack of that directory).
    let mut cur: Vec<(String, Vec<usize>)> = Vec::new();
    let mut todo: std::collections::VecDeque<String> =
        components(path).map(str::to_owned).collect();
    let mut hops = 0;
    let names = |cur: &[(String, Vec<usize>)]| cur.iter().map(|c| c.0.clone()).collect::<Vec<_>>();
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            cur.pop();
            continue;
        }
        if name.starts_with(WHITEOUT) {
            return Err(BlobserveError::NotFound(format!("/{path}")));
        }
        let dir = names(&cur);
        let stack = cur.last().map_or(&root_stack, |c| &c.1).clone();
        match child(layers, &dir, &stack, &name) {
            Child::Missing => return Err(BlobserveError::NotFound(format!("/{path}"))),
            Child::Dir(s) => cur.push((name, s)),
            Child::Other { layer, meta } if meta.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(BlobserveError::SymlinkLoop(format!("/{path}")));
                }
                let link_path = join(layers[layer], &dir).join(&name);
                let target = fs::read_link(&link_path).map_err(io_err("readlink", &link_path))?;
                let target = target.as_os_str().as_bytes();
                let target = String::from_utf8_lossy(target).into_owned();
                if target.starts_with('/') {
                    cur.clear();
                }
                for c in components(&target).rev() {
                    todo.push_front(c.to_owned());
                }
            }
            Child::Other { layer, meta } => {
                if meta.is_file() && todo.is_empty() {
                    let mut p = dir;
                    p.push(name);
                    return Ok(Resolved::File { path: p, layer });
                }
                if meta.is_file() {
                    return Err(BlobserveError::NotADirectory(format!("/{path}")));
                }
                return Err(BlobserveError::NotFound(format!("/{path}")));
            }
        }
    }
    let stack = cur.last().map_or(&root_stack, |c| &c.1).clone();
    Ok(Resolved::Dir {
        path: names(&cur),
        stack,
    })
}

/// The merged entries of a directory, minus whiteouts, sorted by name.
fn list(
    layers: &[&Path],
    dir: &[String],
    stack: &[usize],
) -> Result<Vec<DirEntry>, BlobserveError> {
    let mut seen: BTreeMap<String, DirEntry> = BTreeMap::new();
    let mut hidden: HashSet<String> = HashSet::new();
    for &l in stack {
        let base = join(layers[l], dir);
        let rd = fs::read_dir(&base).map_err(io_err("read", &base))?;
        let mut whiteouts = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(hidden_name) = name.strip_prefix(WHITEOUT) {
                if name != OPAQUE {
                    whiteouts.push(hidden_name.to_owned());
                }
                continue;
            }
            if seen.contains_key(&name) || hidden.contains(&name) {
                continue;
            }
            let Ok(m) = e.metadata() else { continue };
            let ft = m.file_type();
            let (kind, target) = if ft.is_dir() {
                ("dir", None)
            } else if ft.is_symlink() {
                let t = fs::read_link(e.path())
                    .ok()
                    .map(|t| t.to_string_lossy().into_owned());
                ("symlink", t)
            } else {
                ("file", None)
            };
            let modified = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs());
            seen.insert(
                name.clone(),
                DirEntry {
                    name,
                    kind,
                    size: if ft.is_dir() { 0 } else { m.len() },
                    target,
                    modified,
                },
            );
        }
        hidden.extend(whiteouts);
    }
    Ok(seen.into_values().collect())
}

fn replace_all(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    if from.is_empty() {
        return haystack.to_vec();
    }
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Content types
// ---------------------------------------------------------------------------

/// A content type from the file name's extension.
pub fn content_type(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or(path);
    let ext = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => ext.to_ascii_lowercase(),
        _ => return "application/octet-stream",
    };
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" | "map" => "application/json",
        "txt" | "md" | "conf" | "cfg" | "ini" | "log" | "nix" | "sh" | "toml" | "yaml" | "yml" => {
            "text/plain; charset=utf-8"
        }
        "xml" => "application/xml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "ico" => "image/x-icon",
        "wasm" => "application/wasm",
        "pdf" => "application/pdf",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "gz" | "tgz" => "application/gzip",
        "zst" => "application/zstd",
        "tar" => "application/x-tar",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_split_at_the_reference() {
        let r = FileRequest::parse("nix/hello:latest/bin/hello").expect("parse");
        assert_eq!(r.repo.as_str(), "nix/hello");
        assert_eq!(r.reference_text, ":latest");
        assert_eq!(r.path, "bin/hello");
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let r = FileRequest::parse(&format!("a/b/c@{d}/x/y:z")).expect("parse");
        assert_eq!(r.repo.as_str(), "a/b/c");
        assert_eq!(r.reference, Reference::Digest(d.parse().expect("digest")));
        assert_eq!(r.path, "x/y:z");
        let r = FileRequest::parse("a:1").expect("parse");
        assert_eq!(r.path, "");
        assert!(FileRequest::parse("nix/hello/bin").is_err());
        assert!(FileRequest::parse("Nix:latest/x").is_err());
        assert!(FileRequest::parse("a@sha256:zz/x").is_err());
    }

    fn layer(dir: &Path, files: &[(&str, &str)], links: &[(&str, &str)], dirs: &[&str]) {
        for d in dirs {
            fs::create_dir_all(dir.join(d)).expect("mkdir");
        }
        for (p, c) in files {
            let p = dir.join(p);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            fs::write(p, c).expect("write");
        }
        for (p, t) in links {
            let p = dir.join(p);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::os::unix::fs::symlink(t, p).expect("symlink");
        }
    }

    #[test]
    fn lookups_honour_whiteouts_opaque_dirs_and_stay_in_the_root() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (low, high) = (tmp.path().join("low"), tmp.path().join("high"));
        layer(
            &low,
            &[
                ("etc/passwd", "root"),
                ("etc/gone", "x"),
                ("opq/old", "o"),
                ("etc/hostname", "image-host"),
            ],
            &[],
            &[],
        );
        layer(
            &high,
            &[
                ("etc/.wh.gone", ""),
                ("opq/.wh..wh..opq", ""),
                ("opq/new", "n"),
            ],
            &[
                ("abs", "/etc/passwd"),
                ("up", "../../../../etc/hostname"),
                ("loop", "loop"),
                ("etcdir", "/etc"),
            ],
            &[],
        );
        let layers = [high.as_path(), low.as_path()];
        let file = |p: &str| match resolve(&layers, p) {
            Ok(Resolved::File { path, layer }) => {
                fs::read_to_string(join(layers[layer], &path)).expect("read")
            }
            Ok(Resolved::Dir { .. }) => "<dir>".into(),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(file("etc/passwd"), "root");
        assert_eq!(file("abs"), "root");
        assert_eq!(file("up"), "image-host");
        assert_eq!(file("etcdir/../../etc/passwd"), "root");
        assert_eq!(file("etcdir/hostname"), "image-host");
        assert!(file("etc/gone").starts_with("error: no such"));
        assert!(file("opq/old").starts_with("error: no such"));
        assert_eq!(file("opq/new"), "n");
        assert!(file("loop").starts_with("error: too many"));
        assert!(file("etc/.wh.gone").starts_with("error"));
        let Ok(Resolved::Dir { path, stack }) = resolve(&layers, "opq") else {
            panic!("opq is a dir");
        };
        let names: Vec<String> = list(&layers, &path, &stack)
            .expect("list")
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["new"]);
        let Ok(Resolved::Dir { path, stack }) = resolve(&layers, "etc") else {
            panic!("etc is a dir");
        };
        let names: Vec<String> = list(&layers, &path, &stack)
            .expect("list")
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["hostname", "passwd"]);
    }

    #[test]
    fn extraction_refuses_escapes_and_devices() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, "evil", "/").expect("link");
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(2);
        h.set_mode(0o644);
        b.append_data(&mut h, "evil/pwned", &b"hi"[..])
            .expect("data");
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Char);
        h.set_size(0);
        b.append_data(&mut h, "dev/null", io::empty()).expect("dev");
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(2);
        h.set_mode(0o644);
        b.append_data(&mut h, "ok/file", &b"ok"[..]).expect("data");
        let mut tar = b.into_inner().expect("tar");
        // `..` cannot be written through the builder's checks; patch a name in.
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..9].copy_from_slice(b"../escape");
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(0);
        h.set_cksum();
        let end = tar.len() - 1024;
        tar.splice(end..end, h.as_bytes().iter().copied());
        let blob = tmp.path().join("blob");
        fs::write(&blob, &tar).expect("write");
        let file = File::open(&blob).expect("open");
        let dest = tmp.path().join("out");
        let (_, n) = extract_into(
            Source::Stored(Arc::new(BlobFile::from_file(file, tar.len() as u64))),
            &dest,
        )
        .expect("extract");
        assert_eq!(n, 2, "the symlink and ok/file");
        assert!(fs::symlink_metadata(dest.join("evil"))
            .expect("link")
            .file_type()
            .is_symlink());
        assert!(!dest.join("dev/null").exists());
        assert!(!tmp.path().join("escape").exists());
        assert_eq!(fs::read(dest.join("ok/file")).expect("read"), b"ok");
    }

    #[test]
    fn content_types_by_extension() {
        assert_eq!(content_type("/a/index.html"), "text/html; charset=utf-8");
        assert_eq!(content_type("/bin/hello"), "application/octet-stream");
        assert_eq!(content_type("/.bashrc"), "application/octet-stream");
        assert_eq!(content_type("x.PNG"), "image/png");
    }

    #[test]
    fn replace_rewrites_every_occurrence() {
        assert_eq!(replace_all(b"a-b-a", b"a", b"xy"), b"xy-b-xy");
        assert_eq!(replace_all(b"abc", b"", b"z"), b"abc");
    }
}
