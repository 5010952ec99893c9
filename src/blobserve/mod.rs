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
//!
//! The parts: `request` parses what `/files/…` asks for, `image` finds
//! an image's layers, `extract` unpacks a layer, `space` keeps the
//! extracted layers within the cap, `resolve` walks the layer stack and
//! `content` types and rewrites what is served. This file holds the
//! settings, the service ([`Blobserve`]), what a lookup finds and
//! [`BlobserveError`].

mod content;
mod extract;
mod image;
mod request;
mod resolve;
mod space;

use std::collections::BTreeMap;
use std::fs::{self, File};

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub(crate) use self::content::content_type;
use self::content::replace_all;
use self::extract::tree_size;
use self::request::components;
pub(crate) use self::request::FileRequest;
use self::resolve::{join, list, resolve, Resolved};
pub(crate) use self::space::ImageGuard;
use self::space::{Entry, Inner, LayerState};
use crate::oci::digest::Digest;
use crate::oci::reference::{NameError, RegistryHost};
use crate::registry::{Registry, RegistryError};
use crate::store::BlobFile;
use crate::util::fs::{io_err, IoError};
use crate::util::singleflight::SingleFlight;

/// A file replaced wholesale in memory (for search-and-replace) is at most this big.
const MAX_REPLACE_SIZE: u64 = 16 << 20;

/// Per-repository settings, from the config file's `[blobserve."REPO"]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlobserveRepo {
    /// A directory in the image that every request path is relative to.
    #[serde(default)]
    pub(crate) workdir: Option<String>,
    /// Search-and-replace modifiers on named files (paths relative to the
    /// working directory).
    #[serde(default)]
    pub(crate) replace: Vec<Replacement>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct Replacement {
    pub(crate) file: String,
    pub(crate) from: String,
    pub(crate) to: String,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct BlobserveSettings {
    /// Keyed by repository (`nix/hello`) or host and repository
    /// (`docker.io/library/nginx`).
    pub(crate) repos: BTreeMap<String, BlobserveRepo>,
    /// Most bytes the extracted layers may take.
    pub(crate) max_bytes: u64,
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
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A regular file to stream, with what the response needs.
pub(crate) struct FileHit {
    pub(crate) file: Arc<BlobFile>,
    pub(crate) size: u64,
    pub(crate) modified: Option<SystemTime>,
    /// The layer the file comes from.
    pub(crate) layer: Digest,
    /// The file's path in the image (after symlinks), with a leading `/`.
    pub(crate) path: String,
    /// Set when a replacement rewrote the file: the whole new content.
    pub(crate) replaced: Option<Bytes>,
    /// Keeps the layers from eviction while the response streams.
    pub(crate) guard: ImageGuard,
}

#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct DirEntry {
    pub(crate) name: String,
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    pub(crate) size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) modified: Option<u64>,
}

pub(crate) struct Listing {
    /// The directory's path in the image, with a leading `/`.
    pub(crate) path: String,
    pub(crate) entries: Vec<DirEntry>,
}

pub(crate) enum Found {
    File(Box<FileHit>),
    Dir(Listing),
}

pub(crate) struct Blobserve {
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

impl Blobserve {
    /// Opens the extracted space at `root` (creating it), dropping leftovers
    /// of interrupted extractions and taking stock of what is there.
    pub(crate) fn new(
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
                extractions: SingleFlight::new(),
            }),
            repos: settings.repos,
        })
    }

    /// The file or directory `req.path` names in the image.
    pub(crate) async fn lookup(
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
}
