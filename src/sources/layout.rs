//! Seeding the cache from an OCI image layout (what `skopeo copy … oci:DIR:tag`
//! writes), as if the image had been pulled through the mirror.
//!
//! All or nothing: every blob the image reaches is verified against its digest
//! and size into the store's staging area first; only when all verified are
//! they committed, then the manifests linked, and the tag written last. A bad
//! layout leaves the cache as it was.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::oci::digest::Digest;
use crate::oci::manifest::{self, Children, Descriptor, ManifestError};
use crate::oci::reference::ImageRef;
use crate::store::{ManifestVariant, StagedBlob, Store, StoreError, TagRecord, MAX_MANIFEST_SIZE};
use crate::util::fs::{io_err, IoError};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{0}/oci-layout: not an OCI image layout (expected imageLayoutVersion 1.0.0)")]
    NotALayout(PathBuf),
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no image named {wanted:?} in the layout; it holds: {available}")]
    NoSuchImage { wanted: String, available: String },
    #[error("blob {digest} is missing from the layout")]
    MissingBlob { digest: Digest },
    #[error("blob {digest} is {size} bytes, over the {MAX_MANIFEST_SIZE}-byte manifest limit")]
    ManifestTooLarge { digest: Digest, size: u64 },
    #[error("manifest {digest}: {source}")]
    BadManifest {
        digest: Digest,
        source: ManifestError,
    },
    #[error("bad blob: {0}")]
    Verify(#[source] StoreError),
    #[error(transparent)]
    Store(StoreError),
}

#[derive(Deserialize)]
struct LayoutMarker {
    #[serde(rename = "imageLayoutVersion")]
    version: String,
}

#[derive(Deserialize)]
struct LayoutIndex {
    manifests: Vec<Descriptor>,
}

/// Imports the image `reference` names from the layout at `dir` and returns
/// the digest its tag now points at.
pub fn import_layout(
    store: &Store,
    dir: &Path,
    reference: &ImageRef,
) -> Result<Digest, ImportError> {
    let marker: LayoutMarker = read_json(&dir.join("oci-layout"))?;
    if marker.version != "1.0.0" {
        return Err(ImportError::NotALayout(dir.to_owned()));
    }
    let index: LayoutIndex = read_json(&dir.join("index.json"))?;
    let top = select(&index.manifests, reference)?;

    let mut import = Import {
        store,
        dir,
        staged: Vec::new(),
        manifests: Vec::new(),
        seen: std::collections::HashSet::new(),
    };
    import.manifest(top)?;

    // Everything verified: make it visible, blobs before the records that
    // point at them, the tag last.
    for blob in import.staged {
        blob.commit().map_err(ImportError::Store)?;
    }
    let record = TagRecord {
        manifests: vec![ManifestVariant {
            media_type: top.media_type.clone(),
            digest: top.digest.clone(),
            size: top.size,
        }],
    };
    let links = import.manifests.iter().map(|(d, m)| (d, m.as_str()));
    store
        .publish(
            &reference.host,
            &reference.repo,
            links,
            Some((&reference.tag, &record)),
        )
        .map_err(ImportError::Store)?;
    Ok(top.digest.clone())
}

/// The descriptor named by the reference's tag or full text; a layout with
/// only one image needs no name.
fn select<'a>(
    descs: &'a [Descriptor],
    reference: &ImageRef,
) -> Result<&'a Descriptor, ImportError> {
    let full = reference.to_string();
    let named = descs.iter().find(|d| {
        d.annotations
            .get(manifest::REF_NAME_ANNOTATION)
            .is_some_and(|n| n == reference.tag.as_str() || *n == full)
    });
    match (named, descs) {
        (Some(d), _) => Ok(d),
        (None, [only]) => Ok(only),
        (None, _) => Err(ImportError::NoSuchImage {
            wanted: reference.tag.to_string(),
            available: descs
                .iter()
                .map(|d| {
                    d.annotations
                        .get(manifest::REF_NAME_ANNOTATION)
                        .map_or_else(|| d.digest.to_string(), String::clone)
                })
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

struct Import<'a> {
    store: &'a Store,
    dir: &'a Path,
    staged: Vec<StagedBlob>,
    manifests: Vec<(Digest, String)>,
    seen: std::collections::HashSet<Digest>,
}

impl Import<'_> {
    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("blobs")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    fn open(&self, desc: &Descriptor) -> Result<File, ImportError> {
        let path = self.blob_path(&desc.digest);
        File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ImportError::MissingBlob {
                digest: desc.digest.clone(),
            },
            _ => io_err("open", &path)(e).into(),
        })
    }

    /// Verifies and stages a manifest or index and everything it reaches.
    fn manifest(&mut self, desc: &Descriptor) -> Result<(), ImportError> {
        if desc.size > MAX_MANIFEST_SIZE {
            return Err(ImportError::ManifestTooLarge {
                digest: desc.digest.clone(),
                size: desc.size,
            });
        }
        let mut bytes = Vec::new();
        let path = self.blob_path(&desc.digest);
        self.open(desc)?
            .take(MAX_MANIFEST_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err("read", &path))?;
        // Verify before parsing: the bytes we trust are the ones we checked.
        self.stage_bytes(desc, &bytes)?;
        self.manifests
            .push((desc.digest.clone(), desc.media_type.clone()));
        let children = manifest::children(&desc.media_type, &bytes).map_err(|source| {
            ImportError::BadManifest {
                digest: desc.digest.clone(),
                source,
            }
        })?;
        match children {
            Children::Manifests(list) => {
                for child in &list {
                    self.manifest(child)?;
                }
            }
            Children::Blobs(list) => {
                for blob in &list {
                    self.blob(blob)?;
                }
            }
        }
        Ok(())
    }

    fn stage_bytes(&mut self, desc: &Descriptor, bytes: &[u8]) -> Result<(), ImportError> {
        if !self.seen.insert(desc.digest.clone()) {
            return Ok(());
        }
        let mut w = self
            .store
            .blob_writer(desc.digest.algorithm())
            .map_err(ImportError::Store)?;
        w.write_all(bytes).map_err(ImportError::Store)?;
        let staged = w
            .finish(&desc.digest, desc.size)
            .map_err(ImportError::Verify)?;
        self.staged.push(staged);
        Ok(())
    }

    /// Streams a layer or config through the verifier in large chunks; memory
    /// stays flat whatever the blob's size.
    fn blob(&mut self, desc: &Descriptor) -> Result<(), ImportError> {
        if !self.seen.insert(desc.digest.clone()) {
            return Ok(());
        }
        // Non-distributable layers live elsewhere and are legitimately absent.
        if !desc.urls.is_empty() && !self.blob_path(&desc.digest).exists() {
            return Ok(());
        }
        let path = self.blob_path(&desc.digest);
        let mut file = self.open(desc)?;
        let mut w = self
            .store
            .blob_writer(desc.digest.algorithm())
            .map_err(ImportError::Store)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("read", &path)(e).into()),
            };
            w.write_all(&buf[..n]).map_err(ImportError::Store)?;
        }
        let staged = w
            .finish(&desc.digest, desc.size)
            .map_err(ImportError::Verify)?;
        self.staged.push(staged);
        Ok(())
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ImportError> {
    let mut bytes = Vec::new();
    File::open(path)
        .map_err(io_err("open", path))?
        .take(MAX_MANIFEST_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("read", path))?;
    serde_json::from_slice(&bytes).map_err(|source| ImportError::Json {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// Writes a minimal layout: one layer, a config and an OCI manifest.
    fn layout(dir: &Path, layer: &[u8]) -> (Digest, Digest) {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).expect("mkdir");
        let put = |bytes: &[u8]| {
            let d = Digest::sha256_of(bytes);
            fs::write(blobs.join(d.hex()), bytes).expect("write");
            d
        };
        let layer_d = put(layer);
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let config_d = put(config);
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_d}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_d}","size":{}}}]}}"#,
            manifest::OCI_MANIFEST,
            config.len(),
            layer.len()
        );
        let m_d = put(m.as_bytes());
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("write");
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{}","digest":"{m_d}","size":{},"annotations":{{"{}":"1"}}}}]}}"#,
            manifest::OCI_MANIFEST,
            m.len(),
            manifest::REF_NAME_ANNOTATION
        );
        fs::write(dir.join("index.json"), index).expect("write");
        (m_d, layer_d)
    }

    fn files_under(dir: &Path) -> usize {
        let mut n = 0;
        for e in fs::read_dir(dir).expect("read") {
            let p = e.expect("entry").path();
            n += if p.is_dir() { files_under(&p) } else { 1 };
        }
        n
    }

    #[test]
    fn imports_by_tag_and_serves_the_manifest() {
        let src = tempfile::tempdir().expect("tmp");
        let state = tempfile::tempdir().expect("tmp");
        let (m_d, layer_d) = layout(src.path(), b"layer bytes");
        let store = Store::open(state.path()).expect("open");
        let r: ImageRef = "example.com/a/b:1".parse().expect("ref");
        let got = import_layout(&store, src.path(), &r).expect("import");
        assert_eq!(got, m_d);
        assert!(store.has_blob(&layer_d));
        let tag = store
            .tag(&r.host, &r.repo, &r.tag)
            .expect("tag")
            .expect("some");
        assert_eq!(tag.manifests[0].digest, m_d);
        assert!(store
            .linked_manifest(&r.host, &r.repo, &m_d)
            .expect("link")
            .is_some());
    }

    #[test]
    fn a_corrupt_blob_is_named_and_leaves_the_cache_unchanged() {
        let src = tempfile::tempdir().expect("tmp");
        let state = tempfile::tempdir().expect("tmp");
        let (_, layer_d) = layout(src.path(), b"layer bytes");
        fs::write(
            src.path().join("blobs/sha256").join(layer_d.hex()),
            b"evil bytes!",
        )
        .expect("corrupt");
        let store = Store::open(state.path()).expect("open");
        let r: ImageRef = "a:1".parse().expect("ref");
        let err = import_layout(&store, src.path(), &r).expect_err("must fail");
        assert!(err.to_string().contains(&layer_d.to_string()), "{err}");
        assert_eq!(files_under(state.path()), 0, "nothing may be left behind");
    }

    #[test]
    fn an_unknown_name_lists_what_the_layout_holds() {
        let src = tempfile::tempdir().expect("tmp");
        let state = tempfile::tempdir().expect("tmp");
        layout(src.path(), b"x");
        // Add a second image so the name matters.
        let idx = fs::read_to_string(src.path().join("index.json")).expect("read");
        let two = idx.replacen("[{", "[{\"mediaType\":\"x\",\"digest\":\"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\",\"size\":0},{", 1);
        fs::write(src.path().join("index.json"), two).expect("write");
        let store = Store::open(state.path()).expect("open");
        let err =
            import_layout(&store, src.path(), &"a:2".parse().expect("ref")).expect_err("fail");
        assert!(matches!(err, ImportError::NoSuchImage { .. }), "{err}");
    }
}
