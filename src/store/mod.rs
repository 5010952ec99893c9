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
//!
//! The [`Store`] is opened here; its methods live beside what they touch:
//! `blobs` (blob files, writing and verifying them), `repos` (each
//! repository's manifest links and tags), `records` (small JSON records),
//! [`ingest`] (the one commit path) and [`gc`] (what may go).

mod blobs;
pub mod gc;
pub(crate) mod ingest;
mod records;
mod repos;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::oci::digest::Digest;
use crate::util::fs::{io_err, IoError};

pub(crate) use blobs::{read_full_at, BlobFile, StagedBlob};
pub(crate) use records::{NixImageRecord, RecordKind};
pub(crate) use repos::{ManifestVariant, TagRecord};

/// Manifests larger than this are refused (containerd refuses over ~4 MB too).
pub(crate) const MAX_MANIFEST_SIZE: u64 = 4 << 20;

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

pub struct Store {
    root: PathBuf,
    tmp_counter: AtomicU64,
}

impl Store {
    /// Opens (creating if needed) the store at `root` and removes temp files
    /// left behind by writers that no longer run.
    pub(crate) fn open(root: &Path) -> Result<Store, StoreError> {
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

    pub(crate) fn root(&self) -> &Path {
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

    /// When each manifest was last served (seconds since the epoch), as saved
    /// by [`Store::save_usage`].
    pub(crate) fn load_usage(&self) -> Result<HashMap<Digest, u64>, StoreError> {
        let path = self.root.join("usage.json");
        match fs::read(&path) {
            // A damaged file only loses access times; start afresh.
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).unwrap_or_default()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(HashMap::new()),
            Err(e) => Err(io_err("read", &path)(e).into()),
        }
    }

    pub(crate) fn save_usage(&self, usage: &HashMap<Digest, u64>) -> Result<(), StoreError> {
        let path = self.root.join("usage.json");
        let json = serde_json::to_vec(usage).map_err(|source| StoreError::CorruptRecord {
            path: path.clone(),
            source,
        })?;
        self.write_atomic(&path, &json)
    }

    /// Where Nix GC roots for cached Nix images live.
    pub(crate) fn gcroots_dir(&self) -> PathBuf {
        self.root.join("gcroots")
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

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn count_files(dir: &Path) -> usize {
        fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
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
}
