//! `systemd-analyze verify`, for the shipped units and the installed ones.

use std::ffi::OsStr;
use std::process::Command;
use std::time::Duration;

use super::{output_timeout, require, tempdir};

/// `systemd-analyze [--user] verify UNITS…`: exits 0 and says nothing (it
/// reports unknown keys and bad values as warnings with status 0).
pub fn systemd_verify<S: AsRef<OsStr> + std::fmt::Debug>(user: bool, units: &[S]) {
    require("systemd-analyze");
    let runtime = tempdir("nl-xdg-runtime");
    let mut cmd = Command::new("systemd-analyze");
    if user {
        cmd.arg("--user");
    }
    cmd.arg("verify")
        .args(units)
        // A user manager needs a runtime dir even offline.
        .env("XDG_RUNTIME_DIR", runtime.path())
        .env("SYSTEMD_LOG_COLOR", "0");
    let out = output_timeout(&mut cmd, Duration::from_secs(60));
    super::assert_success("systemd-analyze verify", &out);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.trim().is_empty(),
        "systemd-analyze verify {units:?}: {said}"
    );
}
