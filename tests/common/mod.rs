//! The one harness every integration test binary shares (`mod common;`),
//! split by concern; this file only declares the parts, re-exports them so a
//! test needs nothing but `use common::*;`, and holds a few tiny helpers and
//! [`HubMirror`], the docker.io setup the real clients' mirror tests share.
//!
//! | file | what it owns |
//! |---|---|
//! | `process.rs` | prerequisites, spawning and killing child processes, timeouts |
//! | `daemon.rs` | the daemon under test: its one builder, its log, `import`, its cache |
//! | `http.rs` | the one raw HTTP/1.1 client, buffered or streaming |
//! | `layouts.rs` | OCI media types and the test images written as OCI layouts |
//! | `containerd.rs` | a private containerd, and pulling and running through it |
//! | `registry.rs` | Debian's `docker-registry` (CNCF distribution) |
//! | `upstream.rs` | a misbehaving registry written here, recording every request |
//! | `auth.rs` | the openssl PKI, htpasswd, Docker credentials and a token issuer |
//! | `skopeo.rs` | skopeo with an explicit policy |
//! | `podman.rs` | a private podman, in a mount namespace of its own |
//! | `nix.rs` | the tests' Nix package set and daemons that build from it |
//! | `systemd.rs` | `systemd-analyze verify` |
//! | `deb.rs` | the Debian package of the binary under test (`packaging/build-deb.sh`) |
//! | `nspawn.rs` | a booted Debian under systemd-nspawn, on a cached root (`tests/nspawn-root.sh`) |
//!
//! Missing prerequisites are failures, never skips: a skipped end-to-end test
//! looks exactly like a passing one.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

pub mod auth;
pub mod containerd;
pub mod daemon;
pub mod deb;
pub mod docker;
pub mod http;
pub mod layouts;
pub mod nix;
pub mod nspawn;
pub mod podman;
pub mod process;
pub mod registry;
pub mod skopeo;
pub mod systemd;
pub mod upstream;

// Each test binary uses only some of these.
#[allow(unused_imports)]
pub use {
    auth::*, containerd::*, daemon::*, deb::*, docker::*, http::*, layouts::*, nix::*, nspawn::*,
    podman::*, process::*, registry::*, skopeo::*, systemd::*, upstream::*,
};

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A path as `&str` (the tests' paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A temporary directory with a recognisable prefix.
pub fn tempdir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir")
}

/// `CARGO_TARGET_TMPDIR/<name>-<pid>`, fresh, for state that a `static`
/// shared daemon outlives its test in (statics are never dropped, so a
/// `TempDir` would leak); leftovers of dead test processes are removed.
pub fn scratch_dir(name: &str) -> PathBuf {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    if let Ok(entries) = fs::read_dir(base) {
        for e in entries.flatten() {
            let file_name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = file_name
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix('-'))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = base.join(format!("{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Every file (not directory) under `dir`, relative and sorted; for
/// "nothing changed" checks.
pub fn list_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The total size of the files under `dir`.
pub fn total_size(dir: &Path) -> u64 {
    list_files(dir)
        .iter()
        .map(|f| fs::metadata(dir.join(f)).expect("stat").len())
        .sum()
}

/// `nixery-local setup ARGS`, which must succeed (30 s at most); its stdout.
pub fn run_setup(args: &[&str]) -> String {
    let what = format!("nixery-local setup {}", args.join(" "));
    let mut cmd = Command::new(bin());
    run_ok(&what, cmd.arg("setup").args(args), Duration::from_secs(30))
}

/// Docker Hub as the real clients' mirror tests need it: a loopback
/// `docker-registry` holding a busybox image as `library/NAME:1`, and a
/// daemon mirroring docker.io from it. The daemon revalidates the tag on
/// every pull (`--tag-ttl 0`), so a pull after
/// [`HubMirror::stop_upstream`] is answered from the cache although the
/// daemon tried the upstream.
pub struct HubMirror {
    pub upstream: DockerRegistry,
    pub daemon: Daemon,
    pub image: TestImage,
    /// `docker.io/library/NAME:1`, as a user types it.
    pub reference: String,
    _dir: TempDir,
}

impl HubMirror {
    /// The image's `Cmd` echoes `message`.
    pub fn start(name: &str, message: &str) -> HubMirror {
        let dir = tempdir("nl-hub");
        let image = busybox_layout(&dir.path().join("image"), "1", message);
        let upstream = DockerRegistry::start();
        upstream.push(&image, &format!("library/{name}:1"));
        let daemon = Daemon::builder()
            .args(mirror_args("docker.io", &upstream.url()))
            .args(["--tag-ttl", "0"])
            .start();
        HubMirror {
            upstream,
            daemon,
            image,
            reference: format!("docker.io/library/{name}:1"),
            _dir: dir,
        }
    }

    /// The upstream served each of the image's blobs exactly once: the pull
    /// went through the daemon to it, and the daemon fetched each blob once.
    pub fn assert_fetched_once(&self) {
        let config = std::iter::once(&self.image.config_digest);
        for digest in config.chain(&self.image.layer_digests) {
            assert_eq!(
                self.upstream.blob_gets(digest),
                1,
                "upstream GETs of {digest}:\n{}",
                self.upstream.access_text()
            );
        }
    }

    /// The daemon logged at least `n` successful pulls of the reference.
    pub fn assert_pulls_served(&self, n: usize) {
        let line = format!("pull image={} status=200", self.reference);
        assert!(
            self.daemon.log().wait_for(&line, n, Duration::from_secs(5)),
            "fewer than {n} lines {line:?} in the daemon's log:\n{}",
            self.daemon.log().text()
        );
    }

    /// The daemon answered a pull from its cache after failing to reach the
    /// upstream (which it tries on every pull: `--tag-ttl 0`).
    pub fn assert_served_offline(&self) {
        let line = format!("serving the cached digest image={}", self.reference);
        assert!(
            self.daemon.log().wait_for(&line, 1, Duration::from_secs(5)),
            "no {line:?} in the daemon's log:\n{}",
            self.daemon.log().text()
        );
    }

    /// Kills the upstream: from now on only the daemon's cache has the image.
    pub fn stop_upstream(&mut self) {
        self.upstream.stop();
    }
}
