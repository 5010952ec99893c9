//! Package sets: where a Nix image's packages come from ([`PkgSource`]: a
//! path, a channel, a git repository, `<nixpkgs>` or a flake), and which
//! image tags pin one. The request expression in
//! [`crate::sources::nix::eval`] loads them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::sources::nix::error::NixError;

/// Where packages come from. Serialised into the request JSON as is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(crate) enum PkgSource {
    /// A local file or directory that, imported and called with `{}` (or
    /// `{ system = …; }` for `arm64`), yields an attribute set. Absolute.
    Path { path: PathBuf },
    /// A nixpkgs channel (`nixos-24.05`), fetched as
    /// `https://channels.nixos.org/<channel>/nixexprs.tar.xz`.
    Channel { channel: String },
    /// A git repository at a commit (`rev`), a ref, or its default branch.
    Git {
        url: String,
        rev: Option<String>,
        #[serde(rename = "ref")]
        git_ref: Option<String>,
    },
    /// `<nixpkgs>` from `NIX_PATH`.
    NixPath,
    /// A flake's `legacyPackages.<system>` (needs a Nix with flakes).
    Flake { flake: String },
}

impl PkgSource {
    /// A git source for an image tag: a 40-hex tag pins the commit,
    /// `latest` follows the default branch, anything else names a ref.
    pub(crate) fn git_for_tag(url: &str, tag: &str) -> PkgSource {
        let is_commit = tag.len() == 40 && tag.bytes().all(|b| b.is_ascii_hexdigit());
        PkgSource::Git {
            url: url.to_owned(),
            rev: is_commit.then(|| tag.to_ascii_lowercase()),
            git_ref: (!is_commit && tag != "latest").then(|| tag.to_owned()),
        }
    }

    /// Checks what the expression cannot: paths are absolute, channel names
    /// are plain names, URLs and flake references are non-empty.
    pub(crate) fn validate(&self) -> Result<(), NixError> {
        let bad = |why: String| Err(NixError::InvalidSource(why));
        match self {
            PkgSource::Path { path } if !path.is_absolute() => {
                bad(format!("package path {} is not absolute", path.display()))
            }
            PkgSource::Channel { channel }
                if channel.is_empty()
                    || channel.starts_with('.')
                    || !channel
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) =>
            {
                bad(format!("channel name {channel:?} is not a plain name"))
            }
            PkgSource::Git { url, .. } if url.is_empty() => bad("empty git URL".into()),
            PkgSource::Flake { flake } if flake.is_empty() => bad("empty flake reference".into()),
            _ => Ok(()),
        }
    }

    /// Whether the same request always evaluates to the same result (a
    /// commit-pinned git source). Everything else floats.
    pub(crate) fn is_pinned(&self) -> bool {
        matches!(self, PkgSource::Git { rev: Some(_), .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;
    use std::time::Duration;

    use crate::sources::nix::name::ImageName;
    use crate::sources::nix::runner::tests::test_nix;

    #[test]
    fn git_tags_pick_rev_ref_or_default_branch() {
        let commit = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(
            PkgSource::git_for_tag("https://x/y", commit),
            PkgSource::Git {
                url: "https://x/y".into(),
                rev: Some(commit.into()),
                git_ref: None
            }
        );
        assert!(PkgSource::git_for_tag("u", commit).is_pinned());
        assert_eq!(
            PkgSource::git_for_tag("u", "latest"),
            PkgSource::Git {
                url: "u".into(),
                rev: None,
                git_ref: None
            }
        );
        let branch = PkgSource::git_for_tag("u", "nixos-24.05");
        assert!(!branch.is_pinned());
        assert_eq!(
            serde_json::to_string(&branch).expect("json"),
            r#"{"type":"git","url":"u","rev":null,"ref":"nixos-24.05"}"#
        );
        assert_eq!(
            serde_json::to_string(&PkgSource::NixPath).expect("json"),
            r#"{"type":"nixpath"}"#
        );
    }

    #[test]
    fn sources_are_validated() {
        let ok = [
            PkgSource::Path {
                path: "/srv/pkgs".into(),
            },
            PkgSource::Channel {
                channel: "nixos-24.05".into(),
            },
            PkgSource::NixPath,
        ];
        for s in ok {
            assert!(s.validate().is_ok(), "{s:?}");
        }
        let bad = [
            PkgSource::Path {
                path: "pkgs".into(),
            },
            PkgSource::Channel {
                channel: "../../x".into(),
            },
            PkgSource::Channel {
                channel: "a/b".into(),
            },
            PkgSource::Git {
                url: String::new(),
                rev: None,
                git_ref: None,
            },
        ];
        for s in bad {
            assert!(
                matches!(s.validate(), Err(NixError::InvalidSource(_))),
                "{s:?}"
            );
        }
    }

    #[test]
    fn flake_sources_work() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pkgs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pkgs");
        std::fs::write(
            dir.path().join("flake.nix"),
            format!(
                "{{ outputs = {{ self }}: {{ legacyPackages.{}-linux = import {} {{ }}; }}; }}",
                std::env::consts::ARCH,
                pkgs.display()
            ),
        )
        .expect("write");
        let source = PkgSource::Flake {
            flake: format!("path:{}", dir.path().display()),
        };
        let ev = test_nix(Duration::from_secs(120))
            .evaluate(&source, &ImageName::parse("hello").expect("valid"))
            .expect("flake evaluates");
        assert_eq!(ev.packages[0].attr, "hello");
    }

    #[test]
    fn git_sources_pin_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = dir.path();
        let pkgs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pkgs");
        let git = |args: &[&str]| {
            let out = Command::new("git")
                .args([
                    "-c",
                    "user.name=t",
                    "-c",
                    "user.email=t@t",
                    "-c",
                    "init.defaultBranch=main",
                ])
                .args(args)
                .current_dir(repo)
                .output()
                .expect("git runs");
            assert!(out.status.success(), "git {args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        let write = |attr: &str| {
            std::fs::write(
                repo.join("default.nix"),
                format!(
                    "args: {{ {attr} = (import {} args).hello; }}",
                    pkgs.display()
                ),
            )
            .expect("write");
        };
        git(&["init", "-q"]);
        write("first");
        git(&["add", "default.nix"]);
        git(&["commit", "-q", "-m", "one"]);
        let first = git(&["rev-parse", "HEAD"]);
        write("second");
        git(&["commit", "-q", "-am", "two"]);

        let nix = test_nix(Duration::from_secs(120));
        let url = format!("file://{}", repo.display());
        let pinned = PkgSource::git_for_tag(&url, &first);
        assert!(pinned.is_pinned());
        let name = |n: &str| ImageName::parse(n).expect("valid");
        nix.evaluate(&pinned, &name("first"))
            .expect("first at the pinned commit");
        assert!(matches!(
            nix.evaluate(&pinned, &name("second")),
            Err(NixError::MissingPackages { .. })
        ));
        let latest = PkgSource::git_for_tag(&url, "latest");
        nix.evaluate(&latest, &name("second"))
            .expect("second on the default branch");
        let branch = PkgSource::git_for_tag(&url, "main");
        nix.evaluate(&branch, &name("second"))
            .expect("second on main");
    }
}
