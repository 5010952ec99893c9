//! Keeping the cache within its size limit, and listing what it holds.
//!
//! The unit of eviction is an image: a tag (with the manifests, configs and
//! layers it reaches) or a Nix image built without a tag. Images go least
//! recently used first; a blob is deleted only when no remaining image
//! reaches it, so shared layers stay while anything still needs them.
//! Blobs written in the last [`MIN_AGE`] are never deleted: a pull or build
//! running beside the collector may be about to tag them. Deleting a blob a
//! client is streaming is safe: its open file stays readable.
//! Evicted Nix images release their GC roots.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use crate::oci::digest::Digest;
use crate::oci::manifest::{self, Children};
use crate::oci::reference::{RegistryHost, RepoName, Tag};
use crate::store::NixImageRecord;
use crate::store::{ManifestVariant, RecordKind, Store, StoreError};
use crate::telemetry::metrics::{self, METRICS};
use crate::util::time::now_secs;

/// Blobs younger than this are never collected.
pub const MIN_AGE: Duration = Duration::from_secs(600);

/// When each manifest was last served, kept in memory and saved now and then.
#[derive(Default)]
pub struct Usage {
    last: Mutex<HashMap<Digest, u64>>,
    /// Whether anything was touched since the last save.
    dirty: std::sync::atomic::AtomicBool,
}

impl Usage {
    pub fn load(store: &Store) -> Result<Usage, StoreError> {
        Ok(Usage {
            last: Mutex::new(store.load_usage()?),
            dirty: Default::default(),
        })
    }

    pub(crate) fn touch(&self, digest: &Digest) {
        if let Ok(mut last) = self.last.lock() {
            last.insert(digest.clone(), now_secs());
            self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> HashMap<Digest, u64> {
        self.last.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Saves the access times if they changed since the last save.
    pub(crate) fn save(&self, store: &Store) -> Result<(), StoreError> {
        if self.dirty.swap(false, std::sync::atomic::Ordering::Relaxed) {
            if let Err(e) = store.save_usage(&self.snapshot()) {
                self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
                return Err(e);
            }
        }
        Ok(())
    }
}

/// What identifies an image for eviction.
#[derive(Clone, Debug)]
pub enum ImageId {
    Tag {
        host: RegistryHost,
        repo: RepoName,
        tag: Tag,
    },
    /// A Nix image known only by its build record (`nixery-local build`).
    NixBuild { key: Digest, name: String },
}

impl std::fmt::Display for ImageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageId::Tag { host, repo, tag } => write!(f, "{host}/{repo}:{tag}"),
            ImageId::NixBuild { name, .. } => write!(f, "(nix build) {name}"),
        }
    }
}

/// A cached image and what it holds.
#[derive(Clone, Debug)]
pub struct CachedImage {
    pub id: ImageId,
    pub manifests: Vec<ManifestVariant>,
    /// Every blob the image reaches that the cache holds, manifests included.
    pub(crate) blobs: BTreeSet<Digest>,
    pub size: u64,
    /// Seconds since the epoch.
    pub last_used: u64,
}

/// Every blob `roots` reach: manifests, their children, configs and layers.
fn closure(store: &Store, roots: &[ManifestVariant]) -> BTreeSet<Digest> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<(String, Digest)> = roots
        .iter()
        .map(|m| (m.media_type.clone(), m.digest.clone()))
        .collect();
    while let Some((media_type, digest)) = todo.pop() {
        if !seen.insert(digest.clone()) {
            continue;
        }
        let Ok(Some(bytes)) = store.read_manifest(&digest) else {
            continue;
        };
        match manifest::children(&media_type, &bytes) {
            Ok(Children::Manifests(list)) => {
                todo.extend(list.into_iter().map(|d| (d.media_type, d.digest)));
            }
            Ok(Children::Blobs(list)) => seen.extend(list.into_iter().map(|d| d.digest)),
            Err(_) => {}
        }
    }
    seen
}

/// Every image in the cache, least recently used first.
pub fn images(store: &Store, usage: &HashMap<Digest, u64>) -> Result<Vec<CachedImage>, StoreError> {
    images_of(store, usage, &store.all_blobs()?)
}

/// [`images`], given the store's blobs (as [`Store::all_blobs`] lists them).
fn images_of(
    store: &Store,
    usage: &HashMap<Digest, u64>,
    blobs: &[(Digest, u64, u64)],
) -> Result<Vec<CachedImage>, StoreError> {
    let sizes: HashMap<&Digest, u64> = blobs.iter().map(|(d, size, _)| (d, *size)).collect();
    let used = |manifests: &[ManifestVariant], fallback: u64| {
        manifests
            .iter()
            .filter_map(|m| usage.get(&m.digest).copied())
            .max()
            .unwrap_or(fallback)
    };
    let mut out = Vec::new();
    let mut tagged: BTreeSet<Digest> = BTreeSet::new();
    for t in store.all_tags()? {
        let blobs: BTreeSet<Digest> = closure(store, &t.record.manifests)
            .into_iter()
            .filter(|d| sizes.contains_key(d))
            .collect();
        tagged.extend(t.record.manifests.iter().map(|m| m.digest.clone()));
        out.push(CachedImage {
            size: blobs.iter().filter_map(|d| sizes.get(d)).sum(),
            last_used: used(&t.record.manifests, t.modified),
            manifests: t.record.manifests,
            blobs,
            id: ImageId::Tag {
                host: t.host,
                repo: t.repo,
                tag: t.tag,
            },
        });
    }
    for (key, record) in store.records::<NixImageRecord>(RecordKind::NixImage)? {
        // Served images have tags already; a build record alone is its own image.
        if record.manifests.iter().any(|m| tagged.contains(&m.digest)) {
            continue;
        }
        let blobs: BTreeSet<Digest> = closure(store, &record.manifests)
            .into_iter()
            .filter(|d| sizes.contains_key(d))
            .collect();
        out.push(CachedImage {
            size: blobs.iter().filter_map(|d| sizes.get(d)).sum(),
            last_used: used(&record.manifests, record.built_at),
            manifests: record.manifests,
            blobs,
            id: ImageId::NixBuild {
                key,
                name: record.name,
            },
        });
    }
    out.sort_by_key(|i| i.last_used);
    Ok(out)
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub evicted: Vec<String>,
    pub deleted_blobs: usize,
    pub freed_bytes: u64,
    pub size_before: u64,
    pub size_after: u64,
    /// Images left in place because some of their blobs are younger than
    /// the minimum age: just pulled or built, and perhaps still in use.
    pub kept_young: usize,
}

/// Evicts least recently used images until the cache holds at most
/// `max_bytes`, then deletes every blob no remaining image reaches.
pub fn collect(
    store: &Store,
    max_bytes: u64,
    usage: &HashMap<Digest, u64>,
    min_age: Duration,
) -> Result<GcReport, StoreError> {
    let blobs = store.all_blobs()?;
    let size_before: u64 = blobs.iter().map(|(_, s, _)| s).sum();
    let mut report = GcReport {
        size_before,
        size_after: size_before,
        ..GcReport::default()
    };
    if size_before <= max_bytes {
        return Ok(report);
    }
    let images = images_of(store, usage, &blobs)?;
    let mut refs: HashMap<&Digest, usize> = HashMap::new();
    for img in &images {
        for d in &img.blobs {
            *refs.entry(d).or_default() += 1;
        }
    }
    let cutoff = now_secs().saturating_sub(min_age.as_secs());
    let size_of: HashMap<&Digest, (u64, u64)> =
        blobs.iter().map(|(d, s, m)| (d, (*s, *m))).collect();
    let collectable = |d: &Digest| size_of.get(d).is_some_and(|(_, mtime)| *mtime <= cutoff);

    // Orphans first: nothing needs them.
    let mut doomed: BTreeSet<Digest> = blobs
        .iter()
        .filter(|(d, _, _)| !refs.contains_key(d) && collectable(d))
        .map(|(d, _, _)| d.clone())
        .collect();
    let mut projected = size_before
        - doomed
            .iter()
            .filter_map(|d| size_of.get(d).map(|(s, _)| s))
            .sum::<u64>();
    let mut evicted = Vec::new();
    for img in &images {
        if projected <= max_bytes {
            break;
        }
        // An image with fresh blobs was just pulled or built: keep it whole.
        if !img.blobs.iter().all(&collectable) {
            report.kept_young += 1;
            continue;
        }
        evicted.push(img);
        for d in &img.blobs {
            if let Some(n) = refs.get_mut(d) {
                *n -= 1;
                if *n == 0 && collectable(d) && doomed.insert(d.clone()) {
                    projected -= size_of.get(d).map_or(0, |(s, _)| *s);
                }
            }
        }
    }

    // Records first, so nothing points at a blob while it goes.
    for img in &evicted {
        match &img.id {
            ImageId::Tag { host, repo, tag } => {
                store.remove_tag(host, repo, tag)?;
                for d in img.blobs.iter().filter(|d| doomed.contains(*d)) {
                    store.unlink_manifest(host, repo, d)?;
                }
            }
            ImageId::NixBuild { .. } => {}
        }
        report.evicted.push(img.id.to_string());
        metrics::add(&METRICS.evictions, 1);
    }
    // Nix build records whose manifests are going, and their GC roots.
    for (key, record) in store.records::<NixImageRecord>(RecordKind::NixImage)? {
        if record.manifests.iter().any(|m| doomed.contains(&m.digest)) {
            for root in &record.gc_roots {
                let _ = std::fs::remove_file(root);
            }
            store.remove_record(RecordKind::NixImage, &key)?;
        }
    }
    for d in &doomed {
        store.remove_blob(d)?;
        report.deleted_blobs += 1;
        report.freed_bytes += size_of.get(d).map_or(0, |(s, _)| *s);
    }
    metrics::add(&METRICS.evicted_bytes, report.freed_bytes);
    report.size_after = store.blob_bytes()?;
    Ok(report)
}

/// The default size limit: a quarter of the filesystem holding the cache.
pub(crate) fn default_max_bytes(state_dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(state_dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `st` a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    (rc == 0).then(|| (st.f_blocks as u64).saturating_mul(st.f_frsize as u64) / 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TagRecord;

    /// Stores an image of one layer (plus a config) under `tag`.
    fn image(store: &Store, repo: &str, tag: &str, layer: &[u8]) -> Digest {
        let put = |b: &[u8]| {
            let d = Digest::sha256_of(b);
            store.put_blob_bytes(&d, b).expect("put");
            d
        };
        let layer_d = put(layer);
        let config_d = put(format!("config of {repo}:{tag}").as_bytes());
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"c","digest":"{config_d}","size":1}},"layers":[{{"mediaType":"l","digest":"{layer_d}","size":{}}}]}}"#,
            manifest::OCI_MANIFEST,
            layer.len()
        );
        let m_d = put(m.as_bytes());
        let host: RegistryHost = "docker.io".parse().expect("host");
        let repo: RepoName = repo.parse().expect("repo");
        store
            .link_manifest(&host, &repo, &m_d, manifest::OCI_MANIFEST)
            .expect("link");
        store
            .set_tag(
                &host,
                &repo,
                &tag.parse().expect("tag"),
                &TagRecord {
                    manifests: vec![ManifestVariant {
                        media_type: manifest::OCI_MANIFEST.into(),
                        digest: m_d.clone(),
                        size: m.len() as u64,
                    }],
                },
            )
            .expect("tag");
        m_d
    }

    #[test]
    fn evicts_least_recently_used_and_keeps_shared_layers() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path()).expect("store");
        let shared = vec![7u8; 10_000];
        let old = image(&store, "library/old", "1", &shared);
        let new = image(&store, "library/new", "1", &shared);
        let big = image(&store, "library/big", "1", &vec![9u8; 50_000]);
        let mut usage = HashMap::new();
        usage.insert(old.clone(), 100);
        usage.insert(big.clone(), 200);
        usage.insert(new.clone(), 300);
        let before = store.blob_bytes().expect("size");
        // Room for everything but the big layer.
        let report = collect(&store, before - 40_000, &usage, Duration::ZERO).expect("gc");
        assert_eq!(
            report.evicted,
            vec!["docker.io/library/old:1", "docker.io/library/big:1"]
        );
        assert!(store.has_blob(&new), "the newest image stays");
        assert!(
            store.has_blob(&Digest::sha256_of(&shared)),
            "a layer still needed stays"
        );
        assert!(!store.has_blob(&old), "the evicted manifest goes");
        assert!(!store.has_blob(&Digest::sha256_of(&vec![9u8; 50_000])));
        assert_eq!(report.size_after, store.blob_bytes().expect("size"));
        assert!(report.size_after <= before - 40_000);
        assert_eq!(report.freed_bytes, before - report.size_after);
    }

    #[test]
    fn young_blobs_and_small_caches_are_left_alone() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path()).expect("store");
        let m = image(&store, "library/a", "1", b"layer");
        let report = collect(&store, u64::MAX, &HashMap::new(), MIN_AGE).expect("gc");
        assert!(report.evicted.is_empty());
        let report = collect(&store, 0, &HashMap::new(), MIN_AGE).expect("gc");
        assert_eq!(report.deleted_blobs, 0, "fresh blobs are protected");
        assert!(
            report.evicted.is_empty(),
            "a freshly pulled image keeps its tag"
        );
        assert!(store.has_blob(&m));
        let host: RegistryHost = "docker.io".parse().expect("host");
        let repo: RepoName = "library/a".parse().expect("repo");
        assert!(store
            .tag(&host, &repo, &"1".parse().expect("tag"))
            .expect("read")
            .is_some());
    }
}
