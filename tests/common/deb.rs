//! The Debian package of the binary under test, built with
//! `packaging/build-deb.sh` the way a user builds it (never by running cargo
//! from inside cargo test).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{bin, run_ok, s};

/// The package's name.
pub const PACKAGE: &str = "nixery-local";
/// The package's version: the crate's.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The repository (the crate's directory).
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the .deb from the binary under test into `dir`; returns its path.
pub fn build_deb(dir: &Path) -> PathBuf {
    let arch = run_ok(
        "dpkg --print-architecture",
        Command::new("dpkg").arg("--print-architecture"),
        Duration::from_secs(30),
    );
    let out = run_ok(
        "packaging/build-deb.sh",
        Command::new(repo().join("packaging/build-deb.sh"))
            .args(["--binary", bin(), "--out-dir", s(dir)])
            // Fast to build in a test; the default (xz) is for releases.
            .args(["--compression", "gzip"]),
        Duration::from_secs(300),
    );
    let deb = PathBuf::from(out.lines().last().expect("the script prints the .deb path"));
    assert_eq!(
        deb,
        dir.join(format!("{PACKAGE}_{VERSION}_{}.deb", arch.trim())),
        "{out}"
    );
    assert!(deb.is_file());
    deb
}
