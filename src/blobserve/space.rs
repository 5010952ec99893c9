//! The extracted space under `<state>/extracted`: which layers are on disk,
//! who is reading them ([`ImageGuard`]), one extraction per layer at a time
//! (concurrent first requests wait for it; it runs as its own task), and
//! eviction of the least recently used layers nobody reads once the space
//! exceeds its cap.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::blobserve::extract::extract_task;
use crate::blobserve::{Blobserve, BlobserveError};
use crate::oci::digest::Digest;
use crate::oci::manifest;
use crate::oci::reference::{RegistryHost, RepoName};
use crate::util::singleflight::SingleFlight;

/// Holds every layer of an image in use; dropping it lets them be evicted.
pub(crate) struct ImageGuard {
    pub(super) _layers: Vec<LayerGuard>,
}

pub(super) struct LayerGuard {
    inner: Arc<Inner>,
    pub(super) digest: Digest,
    pub(super) dir: PathBuf,
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

pub(super) struct Inner {
    /// `<state>/extracted`
    pub(super) root: PathBuf,
    pub(super) max_bytes: u64,
    pub(super) state: Mutex<LayerState>,
    pub(super) tmp_counter: AtomicU64,
    /// One extraction per layer at a time.
    pub(super) extractions: SingleFlight<Digest, Result<(), String>>,
}

#[derive(Default)]
pub(super) struct LayerState {
    pub(super) entries: HashMap<Digest, Entry>,
    pub(super) total: u64,
    pub(super) clock: u64,
}

pub(super) struct Entry {
    pub(super) size: u64,
    pub(super) last_used: u64,
    pub(super) users: usize,
}

impl Blobserve {
    /// The layer's extracted directory, extracting it first if needed; the
    /// guard keeps it from eviction.
    pub(super) async fn acquire(
        &self,
        host: RegistryHost,
        repo: RepoName,
        layer: manifest::Descriptor,
    ) -> Result<LayerGuard, BlobserveError> {
        let digest = layer.digest.clone();
        let dir = self.inner.layer_dir(&digest);
        loop {
            if let Some(guard) = self.inner.use_layer(&digest, &dir) {
                return Ok(guard);
            }
            let inner = Arc::clone(&self.inner);
            let registry = Arc::clone(&self.registry);
            let (h, r, l) = (host.clone(), repo.clone(), layer.clone());
            let outcome = self
                .inner
                .extractions
                .run(digest.clone(), move || async move {
                    // Extracted between our look and this start: done.
                    if lock(&inner.state).entries.contains_key(&l.digest) {
                        return Ok(());
                    }
                    let (tmp, dest) = (inner.tmp_path("extract"), inner.layer_dir(&l.digest));
                    match extract_task(tmp, dest, &registry, h, r, &l).await {
                        Ok(size) => {
                            let mut st = lock(&inner.state);
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
                            drop(st);
                            let keep = l.digest.clone();
                            tokio::task::spawn_blocking(move || inner.evict(&keep));
                            Ok(())
                        }
                        Err(e) => {
                            tracing::warn!(digest = %l.digest, error = %e, "layer extraction failed");
                            Err(e.to_string())
                        }
                    }
                })
                .await
                .unwrap_or_else(|| Err("the extraction task ended".into()));
            if let Err(message) = outcome {
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
    /// A guard on the layer if it is extracted, marking it used now.
    fn use_layer(self: &Arc<Self>, digest: &Digest, dir: &Path) -> Option<LayerGuard> {
        let mut st = lock(&self.state);
        st.clock += 1;
        let now = st.clock;
        let e = st.entries.get_mut(digest)?;
        e.users += 1;
        e.last_used = now;
        Some(LayerGuard {
            inner: Arc::clone(self),
            digest: digest.clone(),
            dir: dir.to_owned(),
        })
    }

    pub(super) fn layer_dir(&self, digest: &Digest) -> PathBuf {
        self.root.join(digest.algorithm().name()).join(digest.hex())
    }

    pub(super) fn tmp_path(&self, what: &str) -> PathBuf {
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
