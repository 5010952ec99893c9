//! The pull-through side: fills the cache from upstream registries.
//!
//! - Tags are revalidated with `HEAD` (Docker Hub does not count HEADs) at
//!   most once per `tag_ttl`; in between, and whenever the upstream is
//!   unreachable, slow, refuses us or answers 5xx, the cached digest stands
//!   (stale-if-error). A digest reference never needs the network once cached.
//! - Manifests are stored as the exact upstream bytes after checking their
//!   digest.
//! - A blob is downloaded once however many clients want it: the first
//!   request starts a [`Download`] as its own task, and every client streams
//!   from its temp file as bytes arrive. The blob enters the cache only after
//!   its digest and size check out; otherwise every reader's stream fails,
//!   so no client takes a short or wrong body for a whole one.

pub mod upstream;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::sync::{mpsc, watch};

use crate::oci::accept::Accept;
use crate::oci::digest::{Digest, Hasher};
use crate::oci::manifest;
use crate::oci::reference::{RegistryHost, RepoName, Tag};
use crate::sources::mirror::upstream::{Target, UpstreamError, Upstreams};
use crate::sources::{ErrorKind, SourceError};
use crate::store::{ManifestVariant, Store, StoreError, TagRecord, MAX_MANIFEST_SIZE};
use crate::telemetry::activity::ACTIVITIES;
use crate::telemetry::metrics::{self, METRICS};
use crate::util::singleflight::RemoveOnDrop;
use crate::util::units::human_bytes;

/// Body frames waiting for the writer (hyper's frames are at most a few
/// hundred KiB, so this bounds a download's memory to a few MiB).
const WRITE_QUEUE: usize = 16;
/// An upstream body that sends nothing for this long is given up on.
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Times an interrupted blob download is resumed with `Range`.
const RESUME_ATTEMPTS: usize = 3;

/// Every manifest type we store, for upstream `Accept`.
const MANIFEST_TYPES: [&str; 4] = [
    manifest::OCI_INDEX,
    manifest::DOCKER_MANIFEST_LIST,
    manifest::OCI_MANIFEST,
    manifest::DOCKER_MANIFEST,
];

#[derive(Debug, thiserror::Error)]
pub(crate) enum MirrorError {
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    #[error("upstream has no {0}")]
    NotFound(String),
    #[error("upstream answered {status} for {what}")]
    Status { status: StatusCode, what: String },
    #[error("upstream sent a bad manifest for {what}: {message}")]
    BadManifest { what: String, message: String },
    #[error("blob {digest} failed: {message}")]
    Download { digest: Digest, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl From<MirrorError> for SourceError {
    fn from(e: MirrorError) -> SourceError {
        let kind = match e {
            MirrorError::NotFound(_) => ErrorKind::NotFound,
            MirrorError::Upstream(_)
            | MirrorError::Status { .. }
            | MirrorError::BadManifest { .. }
            | MirrorError::Download { .. } => ErrorKind::Unavailable,
            // Still a fast answer, so that containerd falls back to the
            // upstream itself; the cause goes to the log.
            MirrorError::Store(_) | MirrorError::Task(_) => {
                tracing::error!(error = %e, "the cache failed while filling a miss");
                ErrorKind::Unavailable
            }
        };
        SourceError::new(kind, e.to_string())
    }
}

type TagKey = (RegistryHost, RepoName, Tag);

pub(crate) struct Mirror {
    store: Arc<Store>,
    upstreams: Upstreams,
    tag_ttl: Duration,
    /// When each tag was last confirmed with its upstream (or found unreachable).
    checked: Mutex<HashMap<TagKey, Instant>>,
    downloads: Arc<Mutex<HashMap<Digest, Arc<Download>>>>,
}

impl Mirror {
    pub(crate) fn new(store: Arc<Store>, upstreams: Upstreams, tag_ttl: Duration) -> Mirror {
        Mirror {
            store,
            upstreams,
            tag_ttl,
            checked: Mutex::new(HashMap::new()),
            downloads: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, MirrorError> {
        let store = Arc::clone(&self.store);
        Ok(tokio::task::spawn_blocking(move || f(&store)).await??)
    }

    fn recently_checked(&self, key: &TagKey) -> bool {
        self.checked
            .lock()
            .ok()
            .and_then(|c| c.get(key).copied())
            .is_some_and(|t| t.elapsed() < self.tag_ttl)
    }

    fn mark_checked(&self, key: TagKey) {
        if let Ok(mut c) = self.checked.lock() {
            c.insert(key, Instant::now());
        }
    }

    /// Brings the cached record of `tag` up to date with the upstream when it
    /// is due. `Ok` means: serve whatever the cache now holds.
    pub(crate) async fn refresh_tag(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        tag: &Tag,
        accept: &Accept,
    ) -> Result<(), MirrorError> {
        let key: TagKey = (host.clone(), repo.clone(), tag.clone());
        let (h, r, t) = key.clone();
        let local = self.blocking(move |s| s.tag(&h, &r, &t)).await?;
        let usable = local.as_ref().is_some_and(|rec| {
            rec.manifests
                .iter()
                .any(|m| accept.accepts(&m.media_type) && self.store.has_blob(&m.digest))
        });
        if usable && (self.recently_checked(&key) || self.upstreams.offline()) {
            return Ok(());
        }
        let what = format!("{host}/{repo}:{tag}");
        match self
            .revalidate(host, repo, tag, accept, local.as_ref())
            .await
        {
            Ok(()) => {
                self.mark_checked(key);
                Ok(())
            }
            // The upstream lacks a tag the cache holds (an import, or a tag
            // deleted upstream): serve the cache, as distribution's proxy does.
            Err(MirrorError::NotFound(_)) if usable => {
                tracing::info!(image = %what, "upstream has no such tag; serving the cached one");
                self.mark_checked(key);
                Ok(())
            }
            Err(e) if usable => {
                tracing::warn!(image = %what, error = %e, "upstream unavailable; serving the cached digest");
                self.mark_checked(key);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn revalidate(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        tag: &Tag,
        accept: &Accept,
        local: Option<&TagRecord>,
    ) -> Result<(), MirrorError> {
        let what = format!("{host}/{repo}:{tag}");
        let types: Vec<&str> = MANIFEST_TYPES
            .iter()
            .copied()
            .filter(|t| accept.accepts(t))
            .collect();
        let target = Target::Manifest(tag.to_string());
        let head = self
            .upstreams
            .fetch(host, repo, &target, Method::HEAD, &types, None)
            .await?;
        check_status(head.status(), &what)?;
        let announced: Option<Digest> = head
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        if let (Some(d), Some(local)) = (&announced, local) {
            if local.manifests.iter().any(|m| &m.digest == d) && self.store.has_blob(d) {
                return Ok(());
            }
        }
        // Changed (or never seen): fetch the bytes, by digest when we know it.
        let target = match &announced {
            Some(d) => Target::Manifest(d.to_string()),
            None => target,
        };
        let variant = self
            .fetch_manifest(host, repo, &target, &types, announced.as_ref(), &what)
            .await?;
        let (h, r, t) = (host.clone(), repo.clone(), tag.clone());
        self.blocking(move |s| {
            let record = TagRecord {
                manifests: vec![variant],
            };
            s.publish(&h, &r, [], Some((&t, &record)))
        })
        .await?;
        tracing::info!(image = %what, "tag updated from upstream");
        Ok(())
    }

    /// Caches the manifest `digest` of `repo` from the upstream, unless it is
    /// already there.
    pub(crate) async fn manifest_by_digest(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(), MirrorError> {
        let (h, r, d) = (host.clone(), repo.clone(), digest.clone());
        let cached = self
            .blocking(move |s| Ok(s.linked_manifest(&h, &r, &d)?.is_some() && s.has_blob(&d)))
            .await?;
        if cached {
            return Ok(());
        }
        let what = format!("{host}/{repo}@{digest}");
        let target = Target::Manifest(digest.to_string());
        self.fetch_manifest(host, repo, &target, &MANIFEST_TYPES, Some(digest), &what)
            .await
            .map(drop)
    }

    /// GETs a manifest, checks its digest (against `expected` when known),
    /// stores it and links it to the repository.
    async fn fetch_manifest(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        target: &Target,
        accept: &[&str],
        expected: Option<&Digest>,
        what: &str,
    ) -> Result<ManifestVariant, MirrorError> {
        let resp = self
            .upstreams
            .fetch(host, repo, target, Method::GET, accept, None)
            .await?;
        check_status(resp.status(), what)?;
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_owned());
        let bad = |message: String| MirrorError::BadManifest {
            what: what.to_owned(),
            message,
        };
        let body = tokio::time::timeout(
            BODY_IDLE_TIMEOUT,
            Limited::new(resp.into_body(), MAX_MANIFEST_SIZE as usize).collect(),
        )
        .await
        .map_err(|_| bad("the body did not arrive in time".into()))?
        .map_err(|e| bad(e.to_string()))?
        .to_bytes();
        let digest = match expected {
            Some(d) => {
                let mut h = Hasher::new(d.algorithm());
                h.update(&body);
                let actual = h.finish();
                if &actual != d {
                    return Err(bad(format!("its bytes hash to {actual}, not {d}")));
                }
                actual
            }
            None => Digest::sha256_of(&body),
        };
        let media_type = manifest_media_type(content_type.as_deref(), &body)
            .ok_or_else(|| bad("not a manifest media type this cache serves".into()))?;
        // Parse it as what it claims to be; rejects schema 1 and mismatches.
        manifest::children(&media_type, &body).map_err(|e| bad(e.to_string()))?;
        metrics::add(&METRICS.manifest_fetches, 1);
        let variant = ManifestVariant {
            media_type: media_type.clone(),
            digest: digest.clone(),
            size: body.len() as u64,
        };
        let (h, r) = (host.clone(), repo.clone());
        self.blocking(move |s| s.put_manifest(&h, &r, &digest, &media_type, &body))
            .await?;
        Ok(variant)
    }

    /// The download of `digest`: the one in flight, or a new one. Returns
    /// once the upstream has answered, so a miss is a prompt error rather
    /// than a stream that fails.
    pub(crate) async fn blob(
        self: &Arc<Self>,
        host: &RegistryHost,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Arc<Download>, MirrorError> {
        let download = {
            let mut downloads = self
                .downloads
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match downloads.get(digest) {
                Some(d) => Arc::clone(d),
                None => {
                    let (tx, rx) = watch::channel(Progress::Starting);
                    let tx = Arc::new(tx);
                    let d = Arc::new(Download {
                        digest: digest.clone(),
                        file: Mutex::new(None),
                        progress: rx,
                    });
                    downloads.insert(digest.clone(), Arc::clone(&d));
                    let this = Arc::clone(self);
                    let (host, repo, dl) = (host.clone(), repo.clone(), Arc::clone(&d));
                    tokio::spawn(async move {
                        // Forgotten when the task ends, also by a panic, so
                        // the next request starts a new download.
                        let _forget =
                            RemoveOnDrop::new(Arc::clone(&this.downloads), dl.digest.clone());
                        let result = this.download(&host, &repo, &dl, &tx).await;
                        let digest = &dl.digest;
                        match result {
                            Ok(size) => {
                                tracing::info!(%digest, size, "blob cached from upstream");
                                let _ = tx.send(Progress::Done { size });
                            }
                            Err(MirrorError::NotFound(what)) => {
                                tracing::info!(%digest, "upstream has no such blob");
                                let _ = tx.send(Progress::Missing(what));
                            }
                            Err(e) => {
                                tracing::warn!(%digest, error = %e, "blob download failed");
                                let _ = tx.send(Progress::Failed(e.to_string()));
                            }
                        }
                    });
                    d
                }
            }
        };
        if let Err(e) = download.size().await {
            return Err(match &*download.progress.borrow() {
                Progress::Missing(what) => MirrorError::NotFound(what.clone()),
                _ => MirrorError::Download {
                    digest: digest.clone(),
                    message: e.to_string(),
                },
            });
        }
        Ok(download)
    }

    /// The download task: upstream → temp file (verified) → cache.
    async fn download(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        dl: &Download,
        tx: &Arc<watch::Sender<Progress>>,
    ) -> Result<u64, MirrorError> {
        let digest = &dl.digest;
        let fail = |message: String| MirrorError::Download {
            digest: digest.clone(),
            message,
        };
        let target = Target::Blob(digest.clone());
        let resp = self
            .upstreams
            .fetch(host, repo, &target, Method::GET, &[], None)
            .await?;
        check_status(resp.status(), &format!("blob {digest}"))?;
        if resp.status() != StatusCode::OK {
            return Err(fail(format!("unexpected status {}", resp.status())));
        }
        let total = content_length(&resp);
        let store = Arc::clone(&self.store);
        let alg = digest.algorithm();
        let writer = tokio::task::spawn_blocking(move || store.blob_writer(alg)).await??;
        let reader =
            File::open(writer.path()).map_err(|e| fail(format!("opening the temp file: {e}")))?;
        if let Ok(mut f) = dl.file.lock() {
            *f = Some(Arc::new(reader));
        }
        let _ = tx.send(Progress::Running { written: 0, total });

        // Receiving, and hashing + writing, run side by side: the body is
        // handed to a writer on the blocking pool through a bounded channel,
        // which keeps memory bounded and lets a slow disk slow the upstream.
        let (bytes_tx, mut bytes_rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
        let progress = Arc::clone(tx);
        let short = digest.hex().get(..12).unwrap_or(digest.hex());
        let activity = ACTIVITIES.start("download", format!("{host}/{repo}@{short}"));
        let writing = tokio::task::spawn_blocking(move || {
            let mut writer = writer;
            let mut written = 0u64;
            let of_total = total.map_or(String::new(), |t| format!(" of {}", human_bytes(t)));
            while let Some(bytes) = bytes_rx.blocking_recv() {
                writer.write_all(&bytes)?;
                let before = written;
                written += bytes.len() as u64;
                metrics::add(&METRICS.bytes_fetched, bytes.len() as u64);
                let _ = progress.send(Progress::Running { written, total });
                // The page's stage, at most once per MB.
                if before >> 20 != written >> 20 {
                    activity.stage(format!("{}{of_total}", human_bytes(written)));
                }
            }
            Ok::<_, StoreError>((writer, written))
        });

        let mut received: u64 = 0;
        let mut body = resp.into_body();
        let mut resumes = 0;
        loop {
            let frame = tokio::time::timeout(BODY_IDLE_TIMEOUT, body.frame()).await;
            let data: Bytes = match frame {
                Ok(Some(Ok(f))) => match f.into_data() {
                    Ok(data) => data,
                    Err(_) => continue, // trailers
                },
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    // Interrupted: resume from what we have, if the upstream can.
                    match self
                        .resume(host, repo, &target, received, &mut resumes)
                        .await
                    {
                        Some(b) => {
                            tracing::info!(%digest, at = received, error = %e, "resuming an interrupted blob download");
                            body = b;
                            continue;
                        }
                        None => {
                            return Err(fail(format!(
                                "upstream body failed after {received} bytes: {e}"
                            )))
                        }
                    }
                }
                Err(_) => {
                    return Err(fail(format!(
                        "upstream sent nothing for {BODY_IDLE_TIMEOUT:?}"
                    )))
                }
            };
            received += data.len() as u64;
            if total.is_some_and(|t| received > t) {
                return Err(fail(format!(
                    "upstream sent more than its Content-Length {}",
                    total.unwrap_or(0)
                )));
            }
            if bytes_tx.send(data).await.is_err() {
                // The writer stopped: its error is the one to report.
                break;
            }
        }
        drop(bytes_tx);
        let (writer, written) = writing.await??;
        if let Some(t) = total {
            if written != t {
                return Err(fail(format!("upstream sent {written} of {t} bytes")));
            }
        }
        let expected = digest.clone();
        let staged =
            tokio::task::spawn_blocking(move || writer.verify(&expected, written)).await??;
        // Verified: readers may have the last byte now; durability follows.
        let _ = tx.send(Progress::Verified { size: written });
        let committed = tokio::task::spawn_blocking(move || staged.sync_and_commit()).await;
        match committed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(%digest, error = %e, "verified blob could not be cached"),
            Err(e) => tracing::warn!(%digest, error = %e, "verified blob could not be cached"),
        }
        Ok(written)
    }

    async fn resume(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        target: &Target,
        at: u64,
        resumes: &mut usize,
    ) -> Option<Incoming> {
        if *resumes >= RESUME_ATTEMPTS {
            return None;
        }
        *resumes += 1;
        let resp = self
            .upstreams
            .fetch(host, repo, target, Method::GET, &[], Some(at))
            .await
            .ok()?;
        let starts_at_offset = resp
            .headers()
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes "))
            .and_then(|v| v.split('-').next())
            .and_then(|v| v.parse::<u64>().ok())
            == Some(at);
        (resp.status() == StatusCode::PARTIAL_CONTENT && starts_at_offset).then(|| resp.into_body())
    }
}

/// The media type of a manifest: the upstream's `Content-Type` when it is a
/// manifest type, else the body's own `mediaType`.
fn manifest_media_type(content_type: Option<&str>, body: &[u8]) -> Option<String> {
    let known = |t: &str| manifest::is_index(t) || manifest::is_image_manifest(t);
    if let Some(t) = content_type.filter(|t| known(t)) {
        return Some(t.to_owned());
    }
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    let probe: Probe = serde_json::from_slice(body).ok()?;
    probe.media_type.filter(|t| known(t))
}

fn check_status(status: StatusCode, what: &str) -> Result<(), MirrorError> {
    if status.is_success() {
        Ok(())
    } else if status == StatusCode::NOT_FOUND {
        Err(MirrorError::NotFound(what.to_owned()))
    } else {
        Err(MirrorError::Status {
            status,
            what: what.to_owned(),
        })
    }
}

fn content_length(resp: &http::Response<Incoming>) -> Option<u64> {
    resp.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// How far a download has got.
#[derive(Clone, Debug)]
pub(crate) enum Progress {
    Starting,
    Running {
        written: u64,
        total: Option<u64>,
    },
    /// Every byte is in and matches the digest; the cache commit follows.
    Verified {
        size: u64,
    },
    /// Committed to the cache.
    Done {
        size: u64,
    },
    Failed(String),
    /// The upstream has no such blob: a miss, not a failure.
    Missing(String),
}

/// A blob arriving from upstream, readable while it arrives.
pub(crate) struct Download {
    pub(crate) digest: Digest,
    /// A read handle on the temp file: stays valid after the rename into the
    /// cache and after the file is removed on failure.
    file: Mutex<Option<Arc<File>>>,
    progress: watch::Receiver<Progress>,
}

fn failed(message: &str) -> io::Error {
    io::Error::other(format!("upstream download failed: {message}"))
}

impl Download {
    /// The blob's size once the upstream has said (`None`: it did not).
    pub(crate) async fn size(&self) -> io::Result<Option<u64>> {
        let mut rx = self.progress.clone();
        let state = rx
            .wait_for(|p| !matches!(p, Progress::Starting))
            .await
            .map_err(|_| failed("the download task ended"))?
            .clone();
        match state {
            Progress::Running { total, .. } => Ok(total),
            Progress::Verified { size } | Progress::Done { size } => Ok(Some(size)),
            Progress::Failed(m) | Progress::Missing(m) => Err(failed(&m)),
            Progress::Starting => Err(failed("the download task ended")),
        }
    }

    /// Waits until bytes past `offset` may be sent and returns how far they
    /// go, or `None` at the end of a complete blob. The last byte is held
    /// back until the digest has been verified: a client that has every byte
    /// of a body takes it as complete, so a bad download must fail before
    /// that. A failed download is an error, so readers abort.
    pub(crate) async fn available(&self, offset: u64) -> io::Result<Option<u64>> {
        fn sendable(written: u64, total: Option<u64>) -> u64 {
            match total {
                Some(t) => written.min(t.saturating_sub(1)),
                None => written,
            }
        }
        let mut rx = self.progress.clone();
        let state = rx
            .wait_for(|p| match p {
                Progress::Running { written, total } => sendable(*written, *total) > offset,
                Progress::Verified { .. }
                | Progress::Done { .. }
                | Progress::Failed(_)
                | Progress::Missing(_) => true,
                Progress::Starting => false,
            })
            .await
            .map_err(|_| failed("the download task ended"))?
            .clone();
        match state {
            Progress::Running { written, total } => Ok(Some(sendable(written, total))),
            Progress::Verified { size } | Progress::Done { size } => {
                Ok((offset < size).then_some(size))
            }
            Progress::Failed(m) | Progress::Missing(m) => Err(failed(&m)),
            Progress::Starting => Err(failed("the download task ended")),
        }
    }

    /// Waits for the whole blob to be verified and committed to the cache;
    /// returns its size.
    pub(crate) async fn finished(&self) -> io::Result<u64> {
        let mut rx = self.progress.clone();
        let state = rx
            .wait_for(|p| {
                matches!(
                    p,
                    Progress::Done { .. } | Progress::Failed(_) | Progress::Missing(_)
                )
            })
            .await
            .map_err(|_| failed("the download task ended"))?
            .clone();
        match state {
            Progress::Done { size } => Ok(size),
            Progress::Failed(m) | Progress::Missing(m) => Err(failed(&m)),
            _ => Err(failed("the download task ended")),
        }
    }

    /// Reads arrived bytes (blocking); call [`Download::available`] first.
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let file = self
            .file
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .ok_or_else(|| failed("no data yet"))?;
        crate::store::read_full_at(&file, offset, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_comes_from_the_header_or_the_body() {
        let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert_eq!(
            manifest_media_type(Some("application/json"), body).as_deref(),
            Some(manifest::OCI_INDEX)
        );
        assert_eq!(
            manifest_media_type(Some(manifest::DOCKER_MANIFEST), b"{}").as_deref(),
            Some(manifest::DOCKER_MANIFEST)
        );
        assert_eq!(manifest_media_type(Some("text/html"), b"<html>"), None);
    }

    #[tokio::test]
    async fn readers_follow_a_download_and_fail_with_it() {
        let (tx, rx) = watch::channel(Progress::Starting);
        let dl = Arc::new(Download {
            digest: Digest::sha256_of(b""),
            file: Mutex::new(None),
            progress: rx,
        });
        let reader = {
            let dl = Arc::clone(&dl);
            tokio::spawn(async move { dl.available(10).await })
        };
        tx.send(Progress::Running {
            written: 5,
            total: Some(20),
        })
        .expect("send");
        assert_eq!(dl.size().await.expect("size"), Some(20));
        tx.send(Progress::Running {
            written: 15,
            total: Some(20),
        })
        .expect("send");
        assert_eq!(reader.await.expect("join").expect("available"), Some(15));
        tx.send(Progress::Running {
            written: 20,
            total: Some(20),
        })
        .expect("send");
        assert_eq!(
            dl.available(15).await.expect("available"),
            Some(19),
            "the last byte waits for verification"
        );
        tx.send(Progress::Failed("digest mismatch".into()))
            .expect("send");
        assert!(
            dl.available(15).await.is_err(),
            "a failed download must not look complete"
        );
    }
}
