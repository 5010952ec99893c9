//! Small JSON records keyed by a digest (`records/<kind>/<hex>`): what the
//! daemon remembers of built layers and Nix images, read as a miss when
//! absent or unreadable.

use std::fs;
use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{remove_if_present, ManifestVariant, Store, StoreError};
use crate::oci::digest::Digest;
use crate::util::fs::io_err;

/// Kinds of small records the store keeps besides blobs and tags.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RecordKind {
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

/// What the cache remembers of a built image.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NixImageRecord {
    pub(crate) name: String,
    /// Seconds since the epoch.
    pub(crate) built_at: u64,
    /// Commit-pinned sources never go stale.
    pub(crate) pinned: bool,
    /// OCI first, then Docker schema 2.
    pub manifests: Vec<ManifestVariant>,
    /// Layer blob digests, bottom first.
    pub(crate) layers: Vec<Digest>,
    pub(crate) gc_roots: Vec<PathBuf>,
}

impl Store {
    fn record_path(&self, kind: RecordKind, key: &Digest) -> PathBuf {
        self.root.join("records").join(kind.dir()).join(key.hex())
    }

    /// A small JSON record, or `None` when there is none (or it is unreadable
    /// as `T`, which callers treat as a miss and overwrite).
    pub(crate) fn record<T: serde::de::DeserializeOwned>(
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
    pub(crate) fn records<T: serde::de::DeserializeOwned>(
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

    pub(crate) fn put_record<T: Serialize>(
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

    pub(crate) fn remove_record(&self, kind: RecordKind, key: &Digest) -> Result<(), StoreError> {
        remove_if_present(&self.record_path(kind, key))
    }
}
