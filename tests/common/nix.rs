//! The tests' Nix package set (`tests/pkgs`, built with busybox) and daemons
//! that build images from it with the host's Nix, never waiting for
//! cache.nixos.org (`--nix-option substituters=`).

use super::{require, Daemon, DaemonLog};

/// The tests' package set, handed to the daemon as `--pkgs-path`.
pub const PKGS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pkgs");

/// Panics unless `nix-build`, `nix-store` and busybox are installed.
pub fn require_nix() {
    require("nix-build");
    require("nix-store");
    require("busybox");
}

/// The Nix options every Nix daemon and `build` gets, plus `extra`.
pub fn nix_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--pkgs-path", PKGS, "--nix-option", "substituters="];
    v.extend_from_slice(extra);
    v
}

/// A daemon serving Nix images from the tests' package set on a fresh state
/// directory, and its log.
pub fn nix_daemon(extra: &[&str]) -> (Daemon, DaemonLog) {
    require_nix();
    let d = Daemon::start(&nix_args(extra));
    let log = d.log().clone();
    (d, log)
}
