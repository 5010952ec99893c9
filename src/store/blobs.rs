//! Blobs: content-addressed files under `blobs/<alg>/<hex>`, written
//! through a [`BlobWriter`] that hashes as it goes, verified into a
//! [`StagedBlob`] and only then renamed into place, and read back as
//! [`BlobFile`]s with positioned reads.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{remove_if_present, rename_durably, Store, StoreError, MAX_MANIFEST_SIZE};
use crate::oci::digest::{Digest, Hasher};
use crate::util::fs::io_err;

impl Store {
    fn blob_path(&self, digest: &Digest) -> PathBuf {
        blob_path_in(&self.root, digest)
    }

    pub(crate) fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Opens a blob for reading, or `None` when the cache does not hold it.
    pub(crate) fn open_blob(&self, digest: &Digest) -> Result<Option<BlobFile>, StoreError> {
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
    pub(crate) fn read_manifest(&self, digest: &Digest) -> Result<Option<Bytes>, StoreError> {
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

    /// Removes a blob. Readers that have it open keep reading their copy.
    pub(crate) fn remove_blob(&self, digest: &Digest) -> Result<(), StoreError> {
        remove_if_present(&self.blob_path(digest))
    }

    /// Every blob with its size and modification time (seconds since the epoch).
    pub(crate) fn all_blobs(&self) -> Result<Vec<(Digest, u64, u64)>, StoreError> {
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
    pub(crate) fn blob_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.all_blobs()?.iter().map(|(_, size, _)| size).sum())
    }

    /// A new temp file for writing a blob whose digest is checked on commit.
    pub(crate) fn blob_writer(
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
    pub(crate) fn put_blob_bytes(&self, expected: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        let mut w = self.blob_writer(expected.algorithm())?;
        w.write_all(bytes)?;
        w.finish(expected, bytes.len() as u64)?.commit()
    }
}

fn blob_path_in(root: &Path, digest: &Digest) -> PathBuf {
    root.join("blobs")
        .join(digest.algorithm().name())
        .join(digest.hex())
}

/// Fills `buf` from `offset` of `file` and returns how many bytes were read:
/// fewer than `buf.len()` only at the end of the file.
pub(crate) fn read_full_at(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
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

/// An open blob; reads are positioned so one file serves concurrent ranges.
pub(crate) struct BlobFile {
    file: File,
    len: u64,
}

impl BlobFile {
    /// Wraps an open file of `len` bytes (blobserve serves extracted files
    /// through the same streaming path as blobs).
    pub(crate) fn from_file(file: File, len: u64) -> BlobFile {
        BlobFile { file, len }
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Fills `buf` from `offset` (blocking) and returns how many bytes were
    /// read: fewer than `buf.len()` only at the end of the blob.
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        read_full_at(&self.file, offset, buf)
    }
}

/// A blob being written to a temp file, hashed as it goes.
pub(crate) struct BlobWriter {
    /// The store's root, where the blob goes on commit.
    root: PathBuf,
    path: PathBuf,
    file: File,
    hasher: Hasher,
    len: u64,
}

impl BlobWriter {
    /// The temp file being written, for readers that follow the writer.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn write_all(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
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
    pub(crate) fn verify(
        mut self,
        expected: &Digest,
        expected_len: u64,
    ) -> Result<StagedBlob, StoreError> {
        self.check(expected, expected_len)
    }

    /// Checks digest and size, fsyncs, and returns the blob ready to commit.
    /// On a mismatch the temp file is removed.
    pub(crate) fn finish(
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
    pub(crate) fn finish_computed(mut self) -> Result<(Digest, u64, StagedBlob), StoreError> {
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
pub(crate) struct StagedBlob {
    from: PathBuf,
    to: PathBuf,
}

impl StagedBlob {
    /// Fsyncs the verified bytes, then commits them.
    pub(crate) fn sync_and_commit(self) -> Result<(), StoreError> {
        File::open(&self.from)
            .and_then(|f| f.sync_all())
            .map_err(io_err("fsync", &self.from))?;
        self.commit()
    }

    pub(crate) fn commit(self) -> Result<(), StoreError> {
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
    use crate::store::tests::count_files;
    use crate::store::RecordKind;

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
}
