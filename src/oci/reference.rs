//! Names from the distribution spec: registry hosts, repository names, tags and
//! manifest references, plus the `host/repo:tag` image references users type.
//!
//! Every value here has been checked against the spec's grammar, so it is safe
//! to use as a path component under the state directory: no `..`, no `/` where
//! one is not expected, no uppercase, nothing empty.

use std::fmt;
use std::str::FromStr;

use crate::oci::digest::{Digest, DigestError};

/// The spec's limit on a repository name (many clients limit host + name to 255).
pub(crate) const MAX_NAME_LEN: usize = 255;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("invalid repository name {0:?}: components must match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)* joined by '/', at most 255 characters")]
    Repository(String),
    #[error("invalid tag {0:?}: tags match [A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}")]
    Tag(String),
    #[error("invalid registry host {0:?}")]
    Host(String),
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error("invalid image reference {0:?}: expected [HOST/]NAME[:TAG]")]
    Image(String),
}

/// A registry host such as `docker.io`, `ghcr.io` or `myreg.io:5000`, lowercased.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegistryHost(String);

impl RegistryHost {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for RegistryHost {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        let (host, port) = match lower.rsplit_once(':') {
            // A bracketed IPv6 literal contains colons of its own.
            Some((h, p)) if !p.contains(']') => (h, Some(p)),
            _ => (lower.as_str(), None),
        };
        let port_ok = port
            .is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
        let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'))
        {
            inner.parse::<std::net::Ipv6Addr>().is_ok()
        } else {
            !host.is_empty() && host.len() <= 253 && host.split('.').all(is_dns_label)
        };
        if port_ok && host_ok {
            Ok(RegistryHost(lower))
        } else {
            Err(NameError::Host(s.to_owned()))
        }
    }
}

fn is_dns_label(label: &str) -> bool {
    let b = label.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

impl fmt::Display for RegistryHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RegistryHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// A repository name: `/`-separated lowercase components.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

impl FromStr for RepoName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > MAX_NAME_LEN || !s.split('/').all(is_name_component) {
            return Err(NameError::Repository(s.to_owned()));
        }
        Ok(RepoName(s.to_owned()))
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn is_name_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    let mut run_start = true;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            run_start = false;
            continue;
        }
        // A separator must follow an alphanumeric run and precede another.
        if run_start {
            return false;
        }
        let sep_len = match b[i] {
            b'.' => 1,
            b'_' if b.get(i + 1) == Some(&b'_') => 2,
            b'_' => 1,
            b'-' => b[i..].iter().take_while(|&&x| x == b'-').count(),
            _ => return false,
        };
        i += sep_len;
        run_start = true;
    }
    !run_start
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// A tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..]
                .iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if ok {
            Ok(Tag(s.to_owned()))
        } else {
            Err(NameError::Tag(s.to_owned()))
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// What follows `/manifests/`: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = NameError;

    /// A colon makes it a digest (tags cannot contain one), so a malformed
    /// digest is reported as such rather than as a bad tag.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            Ok(Reference::Tag(s.parse()?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// An image reference as users write it: `[HOST/]NAME[:TAG]`, normalised the
/// way Docker does (`alpine` → `docker.io/library/alpine:latest`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub(crate) host: RegistryHost,
    pub(crate) repo: RepoName,
    pub(crate) tag: Tag,
}

pub(crate) const DOCKER_HUB: &str = "docker.io";

impl FromStr for ImageRef {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NameError::Image(s.to_owned());
        // The tag is after the last ':' that follows the last '/'.
        let last_slash = s.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match s[last_slash..].rfind(':') {
            Some(i) => (&s[..last_slash + i], &s[last_slash + i + 1..]),
            None => (s, "latest"),
        };
        let (host, path) = match name.split_once('/') {
            // Docker's rule: the first component is a host if it looks like one.
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.parse::<RegistryHost>()?, rest.to_owned())
            }
            _ => (DOCKER_HUB.parse()?, name.to_owned()),
        };
        let path = if host.as_str() == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if path.is_empty() {
            return Err(bad());
        }
        Ok(ImageRef {
            host,
            repo: path.parse()?,
            tag: tag.parse()?,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.host, self.repo, self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_follow_the_spec_grammar() {
        for good in [
            "a",
            "library/alpine",
            "a.b_c__d---e/f9",
            "nix/shell/git/htop",
        ] {
            assert!(good.parse::<RepoName>().is_ok(), "{good:?}");
        }
        for bad in [
            "", "A", "a//b", "/a", "a/", "..", "a/../b", ".a", "a.", "a___b", "a_-b", "-a",
            "a%2fb", "a b", "é",
        ] {
            assert!(bad.parse::<RepoName>().is_err(), "{bad:?}");
        }
        assert!("a".repeat(256).parse::<RepoName>().is_err());
        assert!("a".repeat(255).parse::<RepoName>().is_ok());
    }

    #[test]
    fn tags_follow_the_spec_grammar() {
        assert!("latest".parse::<Tag>().is_ok());
        assert!("_x.Y-1".parse::<Tag>().is_ok());
        assert!("a".repeat(128).parse::<Tag>().is_ok());
        for bad in ["", "-x", ".x", "a/b", "a:b", "a b"] {
            assert!(bad.parse::<Tag>().is_err(), "{bad:?}");
        }
        assert!("a".repeat(129).parse::<Tag>().is_err());
    }

    #[test]
    fn hosts_are_validated_and_lowercased() {
        assert_eq!(
            "Docker.IO".parse::<RegistryHost>().map(|h| h.0),
            Ok("docker.io".into())
        );
        for good in [
            "myreg.io:5000",
            "localhost",
            "127.0.0.1:5000",
            "[::1]:5000",
            "[::1]",
        ] {
            assert!(good.parse::<RegistryHost>().is_ok(), "{good:?}");
        }
        for bad in [
            "",
            "..",
            "a..b",
            "a/b",
            "-a.io",
            "a.io:",
            "a.io:x",
            "a.io:123456",
            "[zz]:1",
            "a_b.io",
        ] {
            assert!(bad.parse::<RegistryHost>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn references_distinguish_bad_digests_from_bad_tags() {
        assert!(matches!("v1".parse::<Reference>(), Ok(Reference::Tag(_))));
        assert!(matches!(
            "sha256:zz".parse::<Reference>(),
            Err(NameError::Digest(_))
        ));
        assert!(matches!("-v1".parse::<Reference>(), Err(NameError::Tag(_))));
    }

    #[test]
    fn image_refs_normalise_like_docker() {
        let r: ImageRef = "alpine".parse().expect("valid");
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
        let r: ImageRef = "docker.io/library/alpine:3.20".parse().expect("valid");
        assert_eq!(r.to_string(), "docker.io/library/alpine:3.20");
        let r: ImageRef = "myreg.io:5000/team/app:v1".parse().expect("valid");
        assert_eq!(
            (r.host.as_str(), r.repo.as_str(), r.tag.as_str()),
            ("myreg.io:5000", "team/app", "v1")
        );
        let r: ImageRef = "localhost/app".parse().expect("valid");
        assert_eq!(r.to_string(), "localhost/app:latest");
        assert!("docker.io/".parse::<ImageRef>().is_err());
        assert!("Alpine".parse::<ImageRef>().is_err());
    }
}
