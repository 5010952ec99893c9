//! The one harness every integration test binary shares (`mod common;`),
//! split by concern; this file only declares the parts, re-exports them so a
//! test needs nothing but `use common::*;`, and holds a few tiny helpers.
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
//! | `nix.rs` | the tests' Nix package set and daemons that build from it |
//! | `systemd.rs` | `systemd-analyze verify` |
//!
//! Missing prerequisites are failures, never skips: a skipped end-to-end test
//! looks exactly like a passing one.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

pub mod auth;
pub mod containerd;
pub mod daemon;
pub mod docker;
pub mod http;
pub mod layouts;
pub mod nix;
pub mod process;
pub mod registry;
pub mod skopeo;
pub mod systemd;
pub mod upstream;

// Each test binary uses only some of these.
#[allow(unused_imports)]
pub use {
    auth::*, containerd::*, daemon::*, docker::*, http::*, layouts::*, nix::*, process::*,
    registry::*, skopeo::*, systemd::*, upstream::*,
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
