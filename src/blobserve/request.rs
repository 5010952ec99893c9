//! Request names: the part of a `/files/` path after the prefix, split into
//! the image (repository and tag or digest) and the path inside it.

use crate::blobserve::BlobserveError;
use crate::oci::reference::{NameError, Reference, RepoName};

/// `<repository>(:<tag>|@<digest>)/<path>` split into its parts. Repository
/// components never contain `:` or `@`, tags and digests never `/`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct FileRequest {
    pub(crate) repo: RepoName,
    pub(crate) reference: Reference,
    /// The raw reference text, for building links.
    pub(crate) reference_text: String,
    /// The path inside the image, without the leading `/` (may be empty).
    pub(crate) path: String,
}

impl FileRequest {
    /// Parses the part of a request path after `/files/` (already
    /// percent-decoded).
    pub(crate) fn parse(rest: &str) -> Result<FileRequest, BlobserveError> {
        let split = rest.find([':', '@']).ok_or_else(|| {
            BlobserveError::BadRequest(
                "name the image as <repository>:<tag> or <repository>@<digest>".into(),
            )
        })?;
        let (repo, tail) = rest.split_at(split);
        let (reference, path) = match tail[1..].find('/') {
            Some(i) => (&tail[1..1 + i], &tail[2 + i..]),
            None => (&tail[1..], ""),
        };
        let repo: RepoName = repo.parse()?;
        let reference = if tail.starts_with('@') {
            Reference::Digest(reference.parse().map_err(NameError::from)?)
        } else {
            Reference::Tag(reference.parse()?)
        };
        if path.contains('\0') {
            return Err(BlobserveError::BadRequest("the path contains NUL".into()));
        }
        Ok(FileRequest {
            repo,
            reference_text: tail[..1 + tail[1..].find('/').unwrap_or(tail.len() - 1)].to_owned(),
            reference,
            path: path.to_owned(),
        })
    }
}

/// Splits a path into its names, dropping empty and `.` components; `..`
/// is kept for the resolver (which never lets it leave the root).
pub(super) fn components(path: &str) -> impl DoubleEndedIterator<Item = &str> {
    path.split('/').filter(|c| !c.is_empty() && *c != ".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_split_at_the_reference() {
        let r = FileRequest::parse("nix/hello:latest/bin/hello").expect("parse");
        assert_eq!(r.repo.as_str(), "nix/hello");
        assert_eq!(r.reference_text, ":latest");
        assert_eq!(r.path, "bin/hello");
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let r = FileRequest::parse(&format!("a/b/c@{d}/x/y:z")).expect("parse");
        assert_eq!(r.repo.as_str(), "a/b/c");
        assert_eq!(r.reference, Reference::Digest(d.parse().expect("digest")));
        assert_eq!(r.path, "x/y:z");
        let r = FileRequest::parse("a:1").expect("parse");
        assert_eq!(r.path, "");
        assert!(FileRequest::parse("nix/hello/bin").is_err());
        assert!(FileRequest::parse("Nix:latest/x").is_err());
        assert!(FileRequest::parse("a@sha256:zz/x").is_err());
    }
}
