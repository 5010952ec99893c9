//! The on-disk cache: content-addressed blobs plus, per (registry host,
//! repository), which manifests it holds and what its tags point at.
//!
//! Layout under the state directory:
//!
//! ```text
//! blobs/<alg>/<hex>                                   blob and manifest bytes
//! repos/<host>/<repo>/_manifests/revisions/<alg>/<hex> media type of a manifest the repo holds
//! repos/<host>/<repo>/_manifests/tags/<tag>           JSON TagRecord
//! records/<kind>/<hex>                                 small JSON records keyed by a digest
//! usage.json                                          when each manifest was last served
//! gcroots/                                            Nix GC roots of cached Nix images
//! tmp/<pid>.<n>                                       files being written
//! ```
//!
//! Every file is written to `tmp/`, verified, fsynced and renamed into place,
//! so a reader sees either nothing or complete, verified bytes, whatever
//! happens to the writer. Repository components cannot start with `_`, so
//! `_manifests` never collides with a name. All inputs are validated types
//! from [`crate::oci::reference`] and [`crate::oci::digest`], so paths cannot escape.
//!
//! The store is synchronous: callers on the async runtime use
//! `spawn_blocking` (see [`crate::registry`]).

pub mod gc;
pub mod ingest;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::oci::digest::{Digest, Hasher};
use crate::oci::reference::{RegistryHost, RepoName, Tag};
use crate::util::fs::{io_err, IoError};

/// Manifests larger than this are refused (containerd refuses over ~4 MB too).
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("blob {expected} failed verification: got {actual} ({size} bytes)")]
    DigestMismatch {
        expected: Digest,
        actual: Digest,
        size: u64,
    },
    #[error("blob {digest} has {actual} bytes, expected {expected}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("manifest {digest} is {size} bytes, over the {MAX_MANIFEST_SIZE}-byte limit")]
    ManifestTooLarge { digest: Digest, size: u64 },
    #[error("tag record {path} is corrupt: {source}")]
    CorruptRecord {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// A tag found by [`Store::all_tags`].
#[derive(Clone, Debug)]
pub struct TagEntry {
    pub host: RegistryHost,
    pub repo: RepoName,
    pub tag: Tag,
    pub record: TagRecord,
    /// When the tag was last written, seconds since the epoch.
    pub modified: u64,
}

/// Kinds of small records the store keeps besides blobs and tags.
#[derive(Clone, Copy, Debug)]
pub enum RecordKind {
    /// A built layer, keyed by the hash of its store paths and settings.
    Layer,
    /// A built Nix image, keyed by the hash of its request.
    NixImage,
}

impl RecordKind {
    fn dir(self) -> &'static str {
        match self {
            RecordKind::Layer => "layers",
            RecordKind::NixImage => "nix-images",
        }
    }
}

/// One manifest a tag can resolve to. A tag may carry several variants of the
/// same image (say OCI and Docker v2 forms) for Accept negotiation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestVariant {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    /// In order of preference: the first is served when the client does not say.
    pub manifests: Vec<ManifestVariant>,
}

/// What the cache remembers of a built image.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NixImageRecord {
    pub name: String,
    /// Seconds since the epoch.
    pub built_at: u64,
    /// Commit-pinned sources never go stale.
    pub pinned: bool,
    /// OCI first, then Docker schema 2.
    pub manifests: Vec<ManifestVariant>,
    /// Layer blob digests, bottom first.
    pub layers: Vec<Digest>,
    pub gc_roots: Vec<PathBuf>,
}

pub struct Store {
    root: PathBuf,
    tmp_counter: AtomicU64,
}

impl Store {
    /// Opens (creating if needed) the store at `root` and removes temp files
    /// left behind by writers that no longer run.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        for dir in ["blobs", "repos", "records", "gcroots", "tmp"] {
            let p = root.join(dir);
            fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        }
        let store = Store {
            root: root.to_owned(),
            tmp_counter: AtomicU64::new(0),
        };
        store.clean_tmp()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Temp files are named `<pid>.<n>`; those whose process is gone are
    /// leftovers of a crash. Another live process (an `import` running beside
    /// the daemon) keeps its files.
    fn clean_tmp(&self) -> Result<(), StoreError> {
        let tmp = self.root.join("tmp");
        let entries = fs::read_dir(&tmp).map_err(io_err("read", &tmp))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.split('.').next())
                .and_then(|p| p.parse::<i32>().ok());
            let alive = pid.is_some_and(|p| p == std::process::id() as i32 || process_alive(p));
            if !alive {
                let path = entry.path();
                let removed = if path.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                if let Err(e) = removed {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove leftover temp file");
                }
            }
        }
        Ok(())
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        blob_path_in(&self.root, digest)
    }

    fn repo_dir(&self, host: &RegistryHost, repo: &RepoName) -> PathBuf {
        let mut p = self.root.join("repos").join(host.as_str());
        p.extend(repo.components());
        p.join("_manifests")
    }

    fn revision_path(&self, host: &RegistryHost, repo: &RepoName, digest: &Digest) -> PathBuf {
        self.repo_dir(host, repo)
            .join("revisions")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    fn tag_path(&self, host: &RegistryHost, repo: &RepoName, tag: &Tag) -> PathBuf {
        self.repo_dir(host, repo).join("tags").join(tag.as_str())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Opens a blob for reading, or `None` when the cache does not hold it.
    pub fn open_blob(&self, digest: &Digest) -> Result<Option<BlobFile>, StoreError> {
        let path = self.blob_path(digest);
        match File::open(&path) {
            Ok(file) => {
                let len = file.metadata().map_err(io_err("stat", &path))?.len();
                Ok(Some(BlobFile { file, len }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("open", &path)(e).into()),
        }
    }

    /// Reads a whole manifest blob (bounded by [`MAX_MANIFEST_SIZE`]).
    pub fn read_manifest(&self, digest: &Digest) -> Result<Option<Bytes>, StoreError> {
        let Some(blob) = self.open_blob(digest)? else {
            return Ok(None);
        };
        if blob.len > MAX_MANIFEST_SIZE {
            return Err(StoreError::ManifestTooLarge {
                digest: digest.clone(),
                size: blob.len,
            });
        }
        let path = self.blob_path(digest);
        let mut buf = Vec::with_capacity(blob.len as usize);
        blob.file
            .take(MAX_MANIFEST_SIZE + 1)
            .read_to_end(&mut buf)
            .map_err(io_err("read", &path))?;
        Ok(Some(Bytes::from(buf)))
    }

    /// Every tag in the cache: host, repository, tag, its record and when the
    /// record was written.
    pub fn all_tags(&self) -> Result<Vec<TagEntry>, StoreError> {
        let mut out = Vec::new();
        let repos = self.root.join("repos");
        let hosts = match fs::read_dir(&repos) {
            Ok(h) => h,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err("read", &repos)(e).into()),
        };
        for host in hosts {
            let host_dir = host.map_err(io_err("read", &repos))?.path();
            let Some(host) = host_dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<RegistryHost>().ok())
            else {
                continue;
            };
            self.walk_repos(&host, &host_dir, &mut Vec::new(), &mut out)?;
        }
        Ok(out)
    }

    fn walk_repos(
        &self,
        host: &RegistryHost,
        dir: &Path,
        components: &mut Vec<String>,
        out: &mut Vec<TagEntry>,
    ) -> Result<(), StoreError> {
        for entry in fs::read_dir(dir).map_err(io_err("read", dir))? {
            let path = entry.map_err(io_err("read", dir))?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            if !path.is_dir() {
                continue;
            }
            if name == "_manifests" {
                let Ok(repo) = components.join("/").parse::<RepoName>() else {
                    continue;
                };
                let tags_dir = path.join("tags");
                let Ok(tags) = fs::read_dir(&tags_dir) else {
                    continue;
                };
                for t in tags {
                    let t = t.map_err(io_err("read", &tags_dir))?;
                    let Some(tag) = t.file_name().to_str().and_then(|n| n.parse::<Tag>().ok())
                    else {
                        continue;
                    };
                    let modified = t
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_secs());
                    if let Some(record) = self.tag(host, &repo, &tag)? {
                        out.push(TagEntry {
                            host: host.clone(),
                            repo: repo.clone(),
                            tag,
                            record,
                            modified,
                        });
                    }
                }
            } else {
                components.push(name);
                self.walk_repos(host, &path, components, out)?;
                components.pop();
            }
        }
        Ok(())
    }

    pub fn remove_tag(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<(), StoreError> {
        remove_if_present(&self.tag_path(host, repo, tag))
    }

    pub fn unlink_manifest(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(), StoreError> {
        remove_if_present(&self.revision_path(host, repo, digest))
    }

    /// Removes a blob. Readers that have it open keep reading their copy.
    pub fn remove_blob(&self, digest: &Digest) -> Result<(), StoreError> {
        remove_if_present(&self.blob_path(digest))
    }

    pub fn remove_record(&self, kind: RecordKind, key: &Digest) -> Result<(), StoreError> {
        remove_if_present(&self.record_path(kind, key))
    }

    /// Every blob with its size and modification time (seconds since the epoch).
    pub fn all_blobs(&self) -> Result<Vec<(Digest, u64, u64)>, StoreError> {
        let mut out = Vec::new();
        let blobs = self.root.join("blobs");
        let algs = match fs::read_dir(&blobs) {
            Ok(a) => a,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err("read", &blobs)(e).into()),
        };
        for alg in algs {
            let dir = alg.map_err(io_err("read", &blobs))?.path();
            let Some(alg_name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            for entry in fs::read_dir(&dir).map_err(io_err("read", &dir))? {
                let entry = entry.map_err(io_err("read", &dir))?;
                let Some(digest) = entry
                    .file_name()
                    .to_str()
                    .and_then(|hex| format!("{alg_name}:{hex}").parse::<Digest>().ok())
                else {
                    continue;
                };
                if let Ok(meta) = entry.metadata() {
                    let mtime = meta
                        .modified()
                        .ok()
                        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_secs());
                    out.push((digest, meta.len(), mtime));
                }
            }
        }
        Ok(out)
    }

    /// The total size of all blobs.
    pub fn blob_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.all_blobs()?.iter().map(|(_, size, _)| size).sum())
    }

    /// When each manifest was last served (seconds since the epoch), as saved
    /// by [`Store::save_usage`].
    pub fn load_usage(&self) -> Result<HashMap<Digest, u64>, StoreError> {
        let path = self.root.join("usage.json");
        match fs::read(&path) {
            // A damaged file only loses access times; start afresh.
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).unwrap_or_default()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(HashMap::new()),
            Err(e) => Err(io_err("read", &path)(e).into()),
        }
    }

    pub fn save_usage(&self, usage: &HashMap<Digest, u64>) -> Result<(), StoreError> {
        let path = self.root.join("usage.json");
        let json = serde_json::to_vec(usage).map_err(|source| StoreError::CorruptRecord {
            path: path.clone(),
            source,
        })?;
        self.write_atomic(&path, &json)
    }

    /// Where Nix GC roots for cached Nix images live.
    pub fn gcroots_dir(&self) -> PathBuf {
        self.root.join("gcroots")
    }

    fn record_path(&self, kind: RecordKind, key: &Digest) -> PathBuf {
        self.root.join("records").join(kind.dir()).join(key.hex())
    }

    /// A small JSON record, or `None` when there is none (or it is unreadable
    /// as `T`, which callers treat as a miss and overwrite).
    pub fn record<T: serde::de::DeserializeOwned>(
        &self,
        kind: RecordKind,
        key: &Digest,
    ) -> Result<Option<T>, StoreError> {
        let path = self.record_path(kind, key);
        match fs::read(&path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &path)(e).into()),
        }
    }

    /// Every readable record of `kind` with its key (unreadable ones are skipped).
    pub fn records<T: serde::de::DeserializeOwned>(
        &self,
        kind: RecordKind,
    ) -> Result<Vec<(Digest, T)>, StoreError> {
        let dir = self.root.join("records").join(kind.dir());
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("read", &dir)(e).into()),
        };
        let mut out = Vec::new();
        for entry in entries {
            let path = entry.map_err(io_err("read", &dir))?.path();
            let key = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok());
            if let (Some(key), Ok(bytes)) = (key, fs::read(&path)) {
                if let Ok(v) = serde_json::from_slice(&bytes) {
                    out.push((key, v));
                }
            }
        }
        Ok(out)
    }

    pub fn put_record<T: Serialize>(
        &self,
        kind: RecordKind,
        key: &Digest,
        value: &T,
    ) -> Result<(), StoreError> {
        let path = self.record_path(kind, key);
        let json = serde_json::to_vec(value).map_err(|source| StoreError::CorruptRecord {
            path: path.clone(),
            source,
        })?;
        self.write_atomic(&path, &json)
    }

    /// A new temp file for writing a blob whose digest is checked on commit.
    pub fn blob_writer(
        &self,
        algorithm: crate::oci::digest::Algorithm,
    ) -> Result<BlobWriter, StoreError> {
        let (path, file) = self.temp_file()?;
        Ok(BlobWriter {
            root: self.root.clone(),
            path,
            file,
            hasher: Hasher::new(algorithm),
            len: 0,
        })
    }

    /// Stores `bytes` as a blob after checking they hash to `expected`.
    pub fn put_blob_bytes(&self, expected: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        let mut w = self.blob_writer(expected.algorithm())?;
        w.write_all(bytes)?;
        w.finish(expected, bytes.len() as u64)?.commit()
    }

    fn temp_file(&self) -> Result<(PathBuf, File), StoreError> {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let path = self
            .root
            .join("tmp")
            .join(format!("{}.{n}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        Ok((path, file))
    }

    /// Writes `contents` to `dest` atomically and durably.
    fn write_atomic(&self, dest: &Path, contents: &[u8]) -> Result<(), StoreError> {
        let (tmp, mut file) = self.temp_file()?;
        let result = (|| {
            file.write_all(contents).map_err(io_err("write", &tmp))?;
            file.sync_all().map_err(io_err("fsync", &tmp))?;
            rename_durably(&tmp, dest)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Records that `repo` on `host` holds the manifest `digest`. The blob
    /// must already be committed.
    pub fn link_manifest(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        digest: &Digest,
        media_type: &str,
    ) -> Result<(), StoreError> {
        self.write_atomic(
            &self.revision_path(host, repo, digest),
            media_type.as_bytes(),
        )
    }

    /// The media type of a manifest the repository holds, or `None`.
    pub fn linked_manifest(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<String>, StoreError> {
        let path = self.revision_path(host, repo, digest);
        match fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &path)(e).into()),
        }
    }

    pub fn set_tag(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        tag: &Tag,
        record: &TagRecord,
    ) -> Result<(), StoreError> {
        let path = self.tag_path(host, repo, tag);
        let json = serde_json::to_vec(record).map_err(|source| StoreError::CorruptRecord {
            path: path.clone(),
            source,
        })?;
        self.write_atomic(&path, &json)
    }

    pub fn tag(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Option<TagRecord>, StoreError> {
        let path = self.tag_path(host, repo, tag);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", &path)(e).into()),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StoreError::CorruptRecord { path, source })
    }

    /// The repository's tags, sorted, or `None` when it holds no manifests.
    pub fn tags(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
    ) -> Result<Option<Vec<String>>, StoreError> {
        let dir = self.repo_dir(host, repo);
        if !dir.is_dir() {
            return Ok(None);
        }
        let tags_dir = dir.join("tags");
        let mut tags = Vec::new();
        match fs::read_dir(&tags_dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(io_err("read", &tags_dir))?;
                    if let Some(name) = entry.file_name().to_str() {
                        tags.push(name.to_owned());
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("read", &tags_dir)(e).into()),
        }
        tags.sort();
        Ok(Some(tags))
    }
}

fn blob_path_in(root: &Path, digest: &Digest) -> PathBuf {
    root.join("blobs")
        .join(digest.algorithm().name())
        .join(digest.hex())
}

/// Fills `buf` from `offset` of `file` and returns how many bytes were read:
/// fewer than `buf.len()` only at the end of the file.
pub fn read_full_at(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e).into()),
    }
}

/// Moves `from` over `to` and fsyncs the directory so the rename survives a crash.
fn rename_durably(from: &Path, to: &Path) -> Result<(), StoreError> {
    let dir = to.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    fs::rename(from, to).map_err(io_err("rename", to))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))?;
    Ok(())
}

fn process_alive(pid: i32) -> bool {
    // Signal 0 checks existence; EPERM still means it exists.
    // SAFETY: kill with signal 0 sends nothing and has no memory effects.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// An open blob; reads are positioned so one file serves concurrent ranges.
pub struct BlobFile {
    file: File,
    len: u64,
}

impl BlobFile {
    /// Wraps an open file of `len` bytes (blobserve serves extracted files
    /// through the same streaming path as blobs).
    pub fn from_file(file: File, len: u64) -> BlobFile {
        BlobFile { file, len }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fills `buf` from `offset` (blocking) and returns how many bytes were
    /// read: fewer than `buf.len()` only at the end of the blob.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        read_full_at(&self.file, offset, buf)
    }
}

/// A blob being written to a temp file, hashed as it goes.
pub struct BlobWriter {
    /// The store's root, where the blob goes on commit.
    root: PathBuf,
    path: PathBuf,
    file: File,
    hasher: Hasher,
    len: u64,
}

impl BlobWriter {
    /// The temp file being written, for readers that follow the writer.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        self.file
            .write_all(bytes)
            .map_err(io_err("write", &self.path))?;
        Ok(())
    }

    /// Hands the temp file to a [`StagedBlob`] (which removes it on error)
    /// and checks digest and size.
    fn check(&mut self, expected: &Digest, expected_len: u64) -> Result<StagedBlob, StoreError> {
        let staged = StagedBlob {
            from: std::mem::take(&mut self.path),
            to: blob_path_in(&self.root, expected),
        };
        let hasher = std::mem::replace(&mut self.hasher, Hasher::new(expected.algorithm()));
        let actual = hasher.finish();
        if &actual != expected {
            return Err(StoreError::DigestMismatch {
                expected: expected.clone(),
                actual,
                size: self.len,
            });
        }
        if self.len != expected_len {
            return Err(StoreError::SizeMismatch {
                digest: expected.clone(),
                expected: expected_len,
                actual: self.len,
            });
        }
        Ok(staged)
    }

    /// Checks digest and size without waiting for the disk: what is verified
    /// can be shown to readers at once; [`StagedBlob::sync_and_commit`] then
    /// makes it durable.
    pub fn verify(
        mut self,
        expected: &Digest,
        expected_len: u64,
    ) -> Result<StagedBlob, StoreError> {
        self.check(expected, expected_len)
    }

    /// Checks digest and size, fsyncs, and returns the blob ready to commit.
    /// On a mismatch the temp file is removed.
    pub fn finish(
        mut self,
        expected: &Digest,
        expected_len: u64,
    ) -> Result<StagedBlob, StoreError> {
        let staged = self.check(expected, expected_len)?;
        self.file
            .sync_all()
            .map_err(io_err("fsync", &staged.from))?;
        Ok(staged)
    }
}

impl BlobWriter {
    /// For bytes the daemon produced itself (built layers, configs): the
    /// digest is whatever was written, so there is nothing to check it
    /// against. Returns the digest, the size and the blob ready to commit.
    pub fn finish_computed(mut self) -> Result<(Digest, u64, StagedBlob), StoreError> {
        let algorithm = self.hasher.algorithm();
        let digest = std::mem::replace(&mut self.hasher, Hasher::new(algorithm)).finish();
        // From here the StagedBlob owns the temp file (and removes it on error).
        let staged = StagedBlob {
            from: std::mem::take(&mut self.path),
            to: blob_path_in(&self.root, &digest),
        };
        self.file
            .sync_all()
            .map_err(io_err("fsync", &staged.from))?;
        Ok((digest, self.len, staged))
    }
}

impl io::Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        self.file.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Unfinished: the bytes are not verified, so they must not stay.
        // (`finish` moves the path into a StagedBlob, leaving it empty here.)
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A verified, fsynced blob waiting in `tmp/`; dropped uncommitted, it is removed.
pub struct StagedBlob {
    from: PathBuf,
    to: PathBuf,
}

impl StagedBlob {
    /// Fsyncs the verified bytes, then commits them.
    pub fn sync_and_commit(self) -> Result<(), StoreError> {
        File::open(&self.from)
            .and_then(|f| f.sync_all())
            .map_err(io_err("fsync", &self.from))?;
        self.commit()
    }

    pub fn commit(self) -> Result<(), StoreError> {
        // `from` no longer exists on success; on failure Drop removes it.
        rename_durably(&self.from, &self.to)
    }
}

impl Drop for StagedBlob {
    fn drop(&mut self) {
        if self.from.exists() {
            let _ = fs::remove_file(&self.from);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count_files(dir: &Path) -> usize {
        fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
    }

    #[test]
    fn verified_blob_is_committed_and_readable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let data = b"hello blob".repeat(1000);
        let digest = Digest::sha256_of(&data);
        store.put_blob_bytes(&digest, &data).expect("put");
        let blob = store.open_blob(&digest).expect("open").expect("present");
        assert_eq!(blob.len(), data.len() as u64);
        let mut buf = [0u8; 7];
        assert_eq!(blob.read_at(5, &mut buf).expect("read"), 7);
        assert_eq!(&buf[..], &data[5..12]);
        let mut big = [0u8; 100];
        let n = blob.read_at(data.len() as u64 - 3, &mut big).expect("read");
        assert_eq!(n, 3, "short only at the end");
        assert_eq!(count_files(&dir.path().join("tmp")), 0);
    }

    #[test]
    fn built_blobs_are_stored_under_their_computed_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut w = store
            .blob_writer(crate::oci::digest::Algorithm::Sha256)
            .expect("writer");
        w.write_all(b"built ").expect("write");
        w.write_all(b"layer").expect("write");
        let (digest, len, staged) = w.finish_computed().expect("finish");
        assert_eq!(digest, Digest::sha256_of(b"built layer"));
        assert_eq!(len, 11);
        assert!(!store.has_blob(&digest), "not visible before commit");
        staged.commit().expect("commit");
        assert!(store.has_blob(&digest));

        let key = Digest::sha256_of(b"key");
        assert_eq!(
            store.record::<u32>(RecordKind::Layer, &key).expect("read"),
            None
        );
        store
            .put_record(RecordKind::Layer, &key, &7u32)
            .expect("put");
        assert_eq!(
            store.record::<u32>(RecordKind::Layer, &key).expect("read"),
            Some(7)
        );
    }

    #[test]
    fn wrong_bytes_never_enter_the_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let digest = Digest::sha256_of(b"right");
        let err = store
            .put_blob_bytes(&digest, b"wrong")
            .expect_err("must fail");
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        let mut w = store.blob_writer(digest.algorithm()).expect("writer");
        w.write_all(b"right").expect("write");
        let err = w.finish(&digest, 6).err().expect("size mismatch");
        assert!(matches!(err, StoreError::SizeMismatch { .. }), "{err}");
        assert!(!store.has_blob(&digest));
        assert_eq!(count_files(&dir.path().join("tmp")), 0);
        // An abandoned writer leaves nothing either.
        let mut w = store.blob_writer(digest.algorithm()).expect("writer");
        w.write_all(b"rig").expect("write");
        drop(w);
        assert_eq!(count_files(&dir.path().join("tmp")), 0);
    }

    #[test]
    fn leftovers_of_dead_writers_are_removed_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        Store::open(dir.path()).expect("open");
        let tmp = dir.path().join("tmp");
        // pid 0 is never a user process; `junk` has no pid at all.
        for name in ["999999999.0", "junk"] {
            fs::write(tmp.join(name), b"partial").expect("write");
        }
        let mine = tmp.join(format!("{}.77", std::process::id()));
        fs::write(&mine, b"in progress").expect("write");
        Store::open(dir.path()).expect("reopen");
        assert!(mine.exists(), "a live writer's temp file must survive");
        assert_eq!(count_files(&tmp), 1);
    }

    #[test]
    fn tags_and_links_round_trip_per_host() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let hub: RegistryHost = "docker.io".parse().expect("host");
        let ghcr: RegistryHost = "ghcr.io".parse().expect("host");
        let repo: RepoName = "library/alpine".parse().expect("repo");
        let tag: Tag = "3.20".parse().expect("tag");
        let digest = Digest::sha256_of(b"{}");
        let record = TagRecord {
            manifests: vec![ManifestVariant {
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                digest: digest.clone(),
                size: 2,
            }],
        };
        store.set_tag(&hub, &repo, &tag, &record).expect("set");
        store
            .link_manifest(
                &hub,
                &repo,
                &digest,
                "application/vnd.oci.image.manifest.v1+json",
            )
            .expect("link");
        assert_eq!(store.tag(&hub, &repo, &tag).expect("read"), Some(record));
        assert_eq!(store.tag(&ghcr, &repo, &tag).expect("read"), None);
        assert!(store
            .linked_manifest(&hub, &repo, &digest)
            .expect("read")
            .is_some());
        assert!(store
            .linked_manifest(&ghcr, &repo, &digest)
            .expect("read")
            .is_none());
        assert_eq!(
            store.tags(&hub, &repo).expect("list"),
            Some(vec!["3.20".to_owned()])
        );
        assert_eq!(store.tags(&ghcr, &repo).expect("list"), None);
    }
}
