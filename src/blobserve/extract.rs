//! Extraction: unpacking one layer (gzip, zstd or plain tar) into a temp
//! directory renamed into place, so nothing half-written is ever seen.
//! Extraction never creates device nodes, never follows or writes through
//! symlinks, and drops entries whose path is absolute or climbs with `..`.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::blobserve::BlobserveError;
use crate::oci::manifest;
use crate::oci::reference::{RegistryHost, RepoName};
use crate::registry::{BlobSource, Registry};
use crate::sources::mirror::Download;
use crate::store::BlobFile;
use crate::util::fs::io_err;

/// Extracted files are written in writes this large.
const WRITE_BUFFER: usize = 1 << 20;

/// Fetches the layer and extracts it; returns the bytes it takes.
/// The layer is unpacked into `tmp`, then renamed to `dest`.
pub(super) async fn extract_task(
    tmp: PathBuf,
    dest: PathBuf,
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
    let digest = layer.digest.clone();
    let (size, files) = tokio::task::spawn_blocking(move || {
        let result = extract_into(source, &tmp).and_then(|stats| {
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
                Err(e) => Err(io_err("rename", &dest)(e).into()),
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
            Err(e) => return Err(io_err("stat", &cur)(e).into()),
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
        Ok(m) if m.is_dir() => Ok(fs::remove_dir_all(path).map_err(io_err("remove", path))?),
        Ok(_) => Ok(fs::remove_file(path).map_err(io_err("remove", path))?),
        Err(_) => Ok(()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

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
}
