//! Per (registry host, repository): which manifests it holds
//! (`_manifests/revisions/`, linked after their blobs are committed) and
//! what its tags point at (`_manifests/tags/`, each a JSON [`TagRecord`]).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{remove_if_present, Store, StoreError};
use crate::oci::digest::Digest;
use crate::oci::reference::{RegistryHost, RepoName, Tag};
use crate::util::fs::io_err;

/// A tag found by [`Store::all_tags`].
#[derive(Clone, Debug)]
pub(crate) struct TagEntry {
    pub(crate) host: RegistryHost,
    pub(crate) repo: RepoName,
    pub(crate) tag: Tag,
    pub(crate) record: TagRecord,
    /// When the tag was last written, seconds since the epoch.
    pub(crate) modified: u64,
}

/// One manifest a tag can resolve to. A tag may carry several variants of the
/// same image (say OCI and Docker v2 forms) for Accept negotiation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestVariant {
    #[serde(rename = "mediaType")]
    pub(crate) media_type: String,
    pub digest: Digest,
    pub(crate) size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TagRecord {
    /// In order of preference: the first is served when the client does not say.
    pub(crate) manifests: Vec<ManifestVariant>,
}

impl Store {
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

    /// Every tag in the cache: host, repository, tag, its record and when the
    /// record was written.
    pub(crate) fn all_tags(&self) -> Result<Vec<TagEntry>, StoreError> {
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

    pub(crate) fn remove_tag(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<(), StoreError> {
        remove_if_present(&self.tag_path(host, repo, tag))
    }

    pub(crate) fn unlink_manifest(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(), StoreError> {
        remove_if_present(&self.revision_path(host, repo, digest))
    }

    /// Records that `repo` on `host` holds the manifest `digest`. The blob
    /// must already be committed.
    pub(crate) fn link_manifest(
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
    pub(crate) fn linked_manifest(
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

    pub(crate) fn set_tag(
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

    pub(crate) fn tag(
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
    pub(crate) fn tags(
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

#[cfg(test)]
mod tests {
    use super::*;

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
