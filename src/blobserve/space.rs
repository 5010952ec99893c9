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

use tokio::sync::watch;

use crate::blobserve::extract::extract_task;
use crate::blobserve::{Blobserve, BlobserveError};
use crate::oci::digest::Digest;
use crate::oci::manifest;
use crate::oci::reference::{RegistryHost, RepoName};

/// Holds every layer of an image in use; dropping it lets them be evicted.
pub struct ImageGuard {
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
}

type Outcome = Option<Result<(), String>>;

#[derive(Default)]
pub(super) struct LayerState {
    pub(super) entries: HashMap<Digest, Entry>,
    inflight: HashMap<Digest, watch::Receiver<Outcome>>,
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

/// Bytes of regular files and symlinks under `dir` (symlinks not followed).
pub(super) fn tree_size(dir: &Path) -> u64 {
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
