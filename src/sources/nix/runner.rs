//! Building an image's packages with the host's Nix:
//! [`Nix::build`] evaluates an image name (see [`crate::sources::nix::eval`]),
//! realises the outputs and queries their closure (see
//! [`crate::sources::nix::closure`]), all within one deadline. Nix is whatever
//! the environment says (daemon or single-user); each command runs in its
//! own process group with a deadline (the `process` module).
//!
//! Everything here blocks (it waits for child processes): call it from
//! `tokio::task::spawn_blocking`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::sources::nix::closure::ClosureGraph;
use crate::sources::nix::command::Nix;
use crate::sources::nix::error::{NixError, Step};
use crate::sources::nix::eval::Evaluation;
use crate::sources::nix::name::ImageName;
use crate::sources::nix::pkgset::PkgSource;

/// The result of [`Nix::build`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BuiltImage {
    pub(crate) evaluation: Evaluation,
    pub(crate) closure: ClosureGraph,
    /// GC root links created for the outputs (see [`Nix::build`]).
    pub(crate) gc_roots: Vec<PathBuf>,
}

impl Nix {
    /// Evaluates, builds and queries the closure of `name` from `source`,
    /// all within [`NixConfig::timeout`].
    ///
    /// With `gc_root`, the outputs are realised with `--add-root gc_root`:
    /// Nix creates the links `gc_root`, `gc_root-2`, … (returned in
    /// [`BuiltImage::gc_roots`]), which keep the whole closure alive until
    /// the caller removes them. Without it, a concurrent
    /// `nix-collect-garbage` may delete the outputs before they are read.
    pub(crate) fn build(
        &self,
        source: &PkgSource,
        name: &ImageName,
        gc_root: Option<&Path>,
    ) -> Result<BuiltImage, NixError> {
        let deadline = Instant::now() + self.config().timeout;
        self.init_store_once(deadline);
        let evaluation = self.evaluate_until(source, name, deadline)?;
        let (roots, gc_roots) = self.realise_until(&evaluation, gc_root, deadline)?;
        let closure = self.closure_until(&roots, deadline)?;
        Ok(BuiltImage {
            evaluation,
            closure,
            gc_roots,
        })
    }

    fn realise_until(
        &self,
        evaluation: &Evaluation,
        gc_root: Option<&Path>,
        deadline: Instant,
    ) -> Result<(Vec<String>, Vec<PathBuf>), NixError> {
        let mut args = self.base_args();
        // Nix's own "last N log lines" of a failed builder: as many as we keep.
        args.extend([
            "--option".into(),
            "log-lines".into(),
            self.config().stderr_lines.to_string().into(),
        ]);
        args.push("--realise".into());
        if let Some(root) = gc_root {
            args.extend(["--add-root".into(), root.as_os_str().to_owned()]);
        }
        for p in &evaluation.packages {
            // `drv!out1,out2`: only the outputs that go into the image, so
            // nothing else (dev, doc) is substituted.
            let outs: Vec<&str> = p.outputs.iter().map(|o| o.name.as_str()).collect();
            args.push(format!("{}!{}", p.drv_path, outs.join(",")).into());
        }
        let out = self.run("nix-store", args, deadline, Step::Build)?;
        let stdout = match self.expect_success(out, Step::Build) {
            Err(NixError::BuildFailed { stderr_tail, .. }) if is_platform_error(&stderr_tail) => {
                return Err(NixError::UnsupportedSystem {
                    system: evaluation.system.clone(),
                    stderr_tail,
                })
            }
            other => other?,
        };
        let text = String::from_utf8_lossy(&stdout);
        let mut realised = Vec::new();
        let mut links = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if gc_root.is_some() {
                // With --add-root Nix prints the links it made.
                let link = PathBuf::from(line);
                let target = std::fs::read_link(&link).map_err(|e| NixError::BadOutput {
                    step: Step::Build,
                    detail: format!("GC root {line} is not a link: {e}"),
                })?;
                realised.push(target.to_string_lossy().into_owned());
                links.push(link);
            } else {
                realised.push(line.to_owned());
            }
        }
        // Prefer the evaluated paths (in package order); they are what was
        // asked for. Content-addressed outputs are only known afterwards,
        // so fall back to what Nix printed.
        let expected = evaluation.output_paths();
        let roots = if expected.iter().all(|p| realised.contains(p)) {
            expected
        } else {
            let mut r = realised;
            r.dedup();
            r
        };
        Ok((roots, links))
    }
}

fn is_platform_error(stderr: &str) -> bool {
    stderr.contains("is required to build") && stderr.contains("but I am a")
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::sources::nix::command::NixConfig;
    use std::process::Command;
    use std::time::Duration;

    // --- Against the real Nix and tests/pkgs ------------------------------

    pub(crate) fn test_nix(timeout: Duration) -> Nix {
        Nix::new(NixConfig {
            timeout,
            // Offline machine: do not wait for cache.nixos.org.
            options: vec![("substituters".into(), String::new())],
            ..NixConfig::default()
        })
    }

    pub(crate) fn test_pkgs() -> PkgSource {
        PkgSource::Path {
            path: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pkgs"),
        }
    }

    #[test]
    fn nix_is_installed() {
        let v = test_nix(Duration::from_secs(30))
            .version()
            .expect("nix-store must be installed (apt-get install nix-bin)");
        assert!(v.contains("Nix"), "{v}");
    }

    #[test]
    fn builds_hello_and_its_closure() {
        let nix = test_nix(Duration::from_secs(120));
        let name = ImageName::parse("hello").expect("valid");
        let built = nix.build(&test_pkgs(), &name, None).expect("hello builds");
        let ev = &built.evaluation;
        assert_eq!(ev.system, format!("{}-linux", std::env::consts::ARCH));
        let attrs: Vec<&str> = ev.packages.iter().map(|p| p.attr.as_str()).collect();
        // cacert and iana-etc come in as optional packages.
        assert_eq!(attrs, ["hello", "cacert", "iana-etc"]);
        assert!(!ev.packages[0].optional && ev.packages[1].optional);
        let hello = &ev.packages[0].outputs[0];
        assert_eq!(hello.name, "out");
        assert!(hello.path.ends_with("-hello-1.0"), "{}", hello.path);
        assert_eq!(built.closure.roots, ev.output_paths());

        // hello -> busybox, a real reference found by Nix's scanner.
        let info = &built.closure.paths[&hello.path];
        assert_eq!(info.references.len(), 1);
        assert!(info.references[0].ends_with("-busybox"));
        assert!(built.closure.paths[&info.references[0]].nar_size > 1_000_000);
        assert_eq!(built.closure.len(), 4);

        let script =
            std::fs::read_to_string(format!("{}/bin/hello", hello.path)).expect("hello script");
        assert!(script.contains("Hello from nix"));
        let out = Command::new(format!("{}/bin/hello", hello.path))
            .output()
            .expect("runs");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "Hello from nix\n");
    }

    #[test]
    fn build_failures_carry_the_log_tail() {
        let nix = test_nix(Duration::from_secs(120));
        let err = nix
            .build(
                &test_pkgs(),
                &ImageName::parse("broken").expect("valid"),
                None,
            )
            .expect_err("broken fails");
        assert!(matches!(err, NixError::BuildFailed { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("this is the useful tail"), "{msg}");
    }

    #[test]
    fn arm64_on_this_host_is_a_clear_error() {
        if std::env::consts::ARCH == "aarch64" {
            return;
        }
        let nix = test_nix(Duration::from_secs(120));
        let err = nix
            .build(
                &test_pkgs(),
                &ImageName::parse("arm64/hello").expect("valid"),
                None,
            )
            .expect_err("cannot build aarch64 here");
        assert!(
            matches!(&err, NixError::UnsupportedSystem { system, .. } if system == "aarch64-linux"),
            "{err:?}"
        );
    }

    #[test]
    fn gc_roots_are_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nix = test_nix(Duration::from_secs(120));
        let root = dir.path().join("root");
        let built = nix
            .build(
                &test_pkgs(),
                &ImageName::parse("greet").expect("valid"),
                Some(&root),
            )
            .expect("builds");
        assert_eq!(built.gc_roots.len(), built.evaluation.packages.len());
        assert_eq!(built.gc_roots[0], root);
        let target = std::fs::read_link(&root).expect("link");
        assert!(built
            .closure
            .roots
            .contains(&target.to_string_lossy().into_owned()));
        // greet -> hello, libfoo, busybox; plus cacert and iana-etc.
        assert_eq!(built.closure.len(), 6);

        let store = nix.store_graph().expect("whole store");
        for (path, info) in &built.closure.paths {
            assert_eq!(store.paths.get(path), Some(info));
        }
    }
}
