//! Image names: the path components of a Nix image's repository name
//! (after the caller stripped the Nix namespace) → validated, sorted,
//! deduplicated package attribute paths plus the `shell`/`arm64` flags.
//!
//! Validation is strict (plain attribute names only) although names never
//! reach Nix as code (see [`crate::sources::nix::eval`]): a refused name fails
//! early with a clear message instead of as a missing attribute.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// At most this many path components in one image name.
pub(crate) const MAX_COMPONENTS: usize = 32;
/// At most this many characters in one component (`python3Packages.requests`).
pub(crate) const MAX_COMPONENT_LEN: usize = 200;
/// At most this many `.`-separated segments in one attribute path.
pub(crate) const MAX_SEGMENTS: usize = 8;
/// At most this many characters in one attribute path segment.
pub(crate) const MAX_SEGMENT_LEN: usize = 100;

/// What the `shell` meta-package stands for (Nixery's set).
pub(crate) const SHELL_PACKAGES: [&str; 4] = ["bashInteractive", "coreutils", "moreutils", "nano"];
/// The Nix system the `arm64` meta-package selects.
pub(crate) const ARM64_SYSTEM: &str = "aarch64-linux";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageNameError {
    #[error("the image name has no components")]
    Empty,
    #[error("the image name has an empty path component")]
    EmptyComponent,
    #[error("the image name has {count} components, at most {max} are allowed")]
    TooManyComponents { count: usize, max: usize },
    #[error("component {component:?} is longer than {max} characters")]
    ComponentTooLong { component: String, max: usize },
    #[error("component {component:?} is not a package attribute path: {reason}")]
    InvalidComponent {
        component: String,
        reason: &'static str,
    },
    #[error("the image name names no packages, only meta-packages")]
    NoPackages,
}

/// One requested package: the attribute path as written (after the `_`
/// prefix rule) and its segments.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub(crate) struct AttrPath(String);

impl AttrPath {
    /// Validates one attribute path: segments `[A-Za-z0-9_][A-Za-z0-9_'-]*`
    /// joined by `.`. A leading digit is allowed because registry names may
    /// start with one; the first segment then gets nixpkgs' `_` prefix
    /// (`1password` → `_1password`). Nested segments starting with a digit
    /// stay as written; the Nix side also tries them with `_`.
    pub(crate) fn parse(component: &str) -> Result<AttrPath, ImageNameError> {
        let invalid = |reason| ImageNameError::InvalidComponent {
            component: component.to_owned(),
            reason,
        };
        if component.len() > MAX_COMPONENT_LEN {
            return Err(ImageNameError::ComponentTooLong {
                component: component.chars().take(40).collect::<String>() + "…",
                max: MAX_COMPONENT_LEN,
            });
        }
        let segments: Vec<&str> = component.split('.').collect();
        if segments.len() > MAX_SEGMENTS {
            return Err(invalid("too many '.'-separated segments"));
        }
        for seg in &segments {
            let mut bytes = seg.bytes();
            match bytes.next() {
                None => return Err(invalid("empty attribute name")),
                Some(b) if b.is_ascii_alphanumeric() || b == b'_' => {}
                Some(_) => {
                    return Err(invalid("attribute names start with a letter, digit or '_'"))
                }
            }
            if !bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'\'' | b'-')) {
                return Err(invalid(
                    "attribute names contain only letters, digits, '_', '\\'' and '-'",
                ));
            }
            if seg.len() > MAX_SEGMENT_LEN {
                return Err(invalid("attribute name too long"));
            }
        }
        let mut path = String::with_capacity(component.len() + 1);
        if segments[0].starts_with(|c: char| c.is_ascii_digit()) {
            path.push('_');
        }
        path.push_str(component);
        Ok(AttrPath(path))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('.')
    }
}

impl fmt::Display for AttrPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A parsed Nix image name. Two names that differ only in component order
/// or repetition are equal, and so are their [`ImageName::canonical`] keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct ImageName {
    /// Sorted, deduplicated, `shell` already expanded.
    packages: Vec<AttrPath>,
    /// `Some("aarch64-linux")` for `arm64`; `None` builds for the host.
    system: Option<String>,
    /// `shell` was given: the image's `Cmd` is `bash`.
    shell: bool,
}

impl ImageName {
    /// Parses the repository path below the Nix namespace, e.g.
    /// `shell/git/htop`. The meta-packages `shell` and `arm64` are
    /// recognised in any position, since order carries no meaning.
    pub(crate) fn parse(repo_path: &str) -> Result<ImageName, ImageNameError> {
        if repo_path.is_empty() {
            return Err(ImageNameError::Empty);
        }
        Self::from_components(repo_path.split('/'))
    }

    pub(crate) fn from_components<'a>(
        components: impl IntoIterator<Item = &'a str>,
    ) -> Result<ImageName, ImageNameError> {
        let mut packages = BTreeSet::new();
        let mut system = None;
        let mut shell = false;
        let mut count = 0usize;
        for component in components {
            count += 1;
            if count > MAX_COMPONENTS {
                return Err(ImageNameError::TooManyComponents {
                    count,
                    max: MAX_COMPONENTS,
                });
            }
            match component {
                "" => return Err(ImageNameError::EmptyComponent),
                "shell" => shell = true,
                "arm64" => system = Some(ARM64_SYSTEM.to_owned()),
                _ => {
                    packages.insert(AttrPath::parse(component)?);
                }
            }
        }
        if count == 0 {
            return Err(ImageNameError::Empty);
        }
        if shell {
            packages.extend(SHELL_PACKAGES.iter().map(|p| AttrPath(p.to_string())));
        }
        if packages.is_empty() {
            return Err(ImageNameError::NoPackages);
        }
        Ok(ImageName {
            packages: packages.into_iter().collect(),
            system,
            shell,
        })
    }

    pub(crate) fn packages(&self) -> &[AttrPath] {
        &self.packages
    }

    /// The Nix system to build for; `None` means the host's.
    pub(crate) fn system(&self) -> Option<&str> {
        self.system.as_deref()
    }

    /// The image config's `Cmd`: `bash` for `shell` images, else none.
    pub(crate) fn cmd(&self) -> Option<Vec<String>> {
        self.shell.then(|| vec!["bash".to_owned()])
    }

    /// A stable key for caches: flags, then the sorted expanded packages,
    /// joined by `/` (`arm64/shell/bashInteractive/…/git`).
    pub(crate) fn canonical(&self) -> String {
        let mut parts: Vec<&str> = Vec::new();
        if self.system.is_some() {
            parts.push("arm64");
        }
        if self.shell {
            parts.push("shell");
        }
        parts.extend(self.packages.iter().map(AttrPath::as_str));
        parts.join("/")
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &ImageName) -> Vec<&str> {
        n.packages().iter().map(AttrPath::as_str).collect()
    }

    #[test]
    fn names_are_sorted_and_deduplicated() {
        let a = ImageName::parse("htop/git/htop").expect("valid");
        let b = ImageName::parse("git/htop").expect("valid");
        assert_eq!(a, b);
        assert_eq!(names(&a), ["git", "htop"]);
        assert_eq!(a.canonical(), "git/htop");
        assert_eq!(a.system(), None);
        assert_eq!(a.cmd(), None);
    }

    #[test]
    fn meta_packages_expand_and_set_flags() {
        let n = ImageName::parse("arm64/shell/git").expect("valid");
        assert_eq!(
            names(&n),
            ["bashInteractive", "coreutils", "git", "moreutils", "nano"]
        );
        assert_eq!(n.system(), Some("aarch64-linux"));
        assert_eq!(n.cmd(), Some(vec!["bash".to_owned()]));
        assert_eq!(
            n.canonical(),
            "arm64/shell/bashInteractive/coreutils/git/moreutils/nano"
        );
        // Order of meta-packages does not matter either.
        assert_eq!(n, ImageName::parse("git/shell/arm64").expect("valid"));
        assert_eq!(ImageName::parse("arm64"), Err(ImageNameError::NoPackages));
        assert_eq!(names(&ImageName::parse("shell").expect("valid")).len(), 4);
    }

    #[test]
    fn attribute_paths_and_digit_prefix() {
        let n = ImageName::parse("python3packages.requests/1password/haskellPackages.foo")
            .expect("valid");
        assert_eq!(
            names(&n),
            [
                "_1password",
                "haskellPackages.foo",
                "python3packages.requests"
            ]
        );
        let p = AttrPath::parse("python3Packages.3to2").expect("valid");
        assert_eq!(
            p.segments().collect::<Vec<_>>(),
            ["python3Packages", "3to2"]
        );
        assert_eq!(
            AttrPath::parse("iana-etc").expect("valid").as_str(),
            "iana-etc"
        );
        assert_eq!(
            AttrPath::parse("_1password").expect("valid").as_str(),
            "_1password"
        );
    }

    #[test]
    fn hostile_names_are_refused() {
        for bad in [
            "",
            "/",
            "git//htop",
            "git/",
            ".git",
            "git.",
            "a..b",
            "-rf",
            "'x",
            "a\"b",
            "a;b",
            "${builtins.exec}",
            "a b",
            "pkgs.x)",
            "../etc",
            "é",
            "a\\b",
            "with import <nixpkgs> {}; x",
        ] {
            assert!(ImageName::parse(bad).is_err(), "{bad:?} should be refused");
        }
        let long = "a".repeat(MAX_COMPONENT_LEN + 1);
        assert!(matches!(
            ImageName::parse(&long),
            Err(ImageNameError::ComponentTooLong { .. })
        ));
        let deep = ["a"; MAX_SEGMENTS + 1].join(".");
        assert!(ImageName::parse(&deep).is_err());
        let many = vec!["a"; MAX_COMPONENTS + 1].join("/");
        assert!(matches!(
            ImageName::parse(&many),
            Err(ImageNameError::TooManyComponents { .. })
        ));
    }
}
