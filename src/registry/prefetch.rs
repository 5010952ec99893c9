//! `nixery-local prefetch REF…`: pulls images into the cache the way a
//! client would (Nix images are built, others fetched from upstream), so
//! they can be served offline later. For a multi-platform image every
//! platform's manifest is cached, and the blobs of the host's platform.

use std::io::Write;

use crate::oci::accept::Accept;
use crate::oci::digest::Digest;
use crate::oci::manifest::{self, Children};
use crate::oci::reference::{ImageRef, Reference};
use crate::registry::{BlobSource, Registry, RegistryError};
use crate::sources::{ErrorKind, SourceError};

/// The OCI name of this machine's architecture.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "riscv64" => "riscv64",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        other => other,
    }
}

#[derive(Debug, Default)]
pub struct Prefetched {
    pub digest: Option<Digest>,
    pub blobs: usize,
    pub bytes: u64,
}

/// Pulls `image` into the cache, printing progress lines to `progress`.
pub async fn prefetch(
    registry: &Registry,
    image: &ImageRef,
    progress: &mut (dyn Write + Send),
) -> Result<Prefetched, RegistryError> {
    let mut done = Prefetched::default();
    let top = registry
        .manifest(
            image.host.clone(),
            image.repo.clone(),
            Reference::Tag(image.tag.clone()),
            Accept::default(),
        )
        .await?;
    done.digest = Some(top.digest.clone());
    let mut todo = vec![(top.media_type, top.bytes)];
    while let Some((media_type, bytes)) = todo.pop() {
        match manifest::children(&media_type, &bytes) {
            Ok(Children::Manifests(list)) => {
                let wanted = host_platform_digests(&bytes);
                for child in list {
                    let m = registry
                        .manifest(
                            image.host.clone(),
                            image.repo.clone(),
                            Reference::Digest(child.digest.clone()),
                            Accept::default(),
                        )
                        .await?;
                    if wanted.contains(&child.digest) {
                        todo.push((m.media_type, m.bytes));
                    }
                }
            }
            Ok(Children::Blobs(list)) => {
                for desc in list {
                    let blob = registry
                        .blob(image.host.clone(), image.repo.clone(), desc.digest.clone())
                        .await?;
                    let size = match &blob.source {
                        BlobSource::Stored(f) => f.len(),
                        BlobSource::Downloading(d) => d.finished().await.map_err(|e| {
                            RegistryError::BlobSource(SourceError::new(
                                ErrorKind::Unavailable,
                                format!("blob {} failed: {e}", desc.digest),
                            ))
                        })?,
                    };
                    done.blobs += 1;
                    done.bytes += size;
                    let _ = writeln!(progress, "  {} {size} bytes", desc.digest);
                }
            }
            // A manifest the registry served but we cannot walk: nothing more to fetch.
            Err(_) => {}
        }
    }
    Ok(done)
}

/// The children of an index that are for this machine (linux, its
/// architecture); all of them when none says its platform.
fn host_platform_digests(index: &[u8]) -> Vec<Digest> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(index) else {
        return Vec::new();
    };
    let list = v["manifests"].as_array().cloned().unwrap_or_default();
    let digest = |m: &serde_json::Value| m["digest"].as_str().and_then(|d| d.parse().ok());
    let ours: Vec<Digest> = list
        .iter()
        .filter(|m| {
            m["platform"]["os"] == "linux" && m["platform"]["architecture"] == host_architecture()
        })
        .filter_map(digest)
        .collect();
    if ours.is_empty() && list.iter().all(|m| m.get("platform").is_none()) {
        list.iter().filter_map(digest).collect()
    } else {
        ours
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_host_platform_from_an_index() {
        let amd = format!("sha256:{}", "a".repeat(64));
        let arm = format!("sha256:{}", "b".repeat(64));
        let index = format!(
            r#"{{"manifests":[
              {{"digest":"{amd}","platform":{{"os":"linux","architecture":"amd64"}}}},
              {{"digest":"{arm}","platform":{{"os":"linux","architecture":"arm64"}}}}]}}"#
        );
        let picked = host_platform_digests(index.as_bytes());
        assert_eq!(picked.len(), 1);
        let expected = if host_architecture() == "amd64" {
            &amd
        } else {
            &arm
        };
        assert_eq!(picked[0].to_string(), *expected);
    }
}
