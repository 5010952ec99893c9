//! skopeo (containers/image), a second real client: every call gets an
//! explicit accept-anything policy, so the host's policy.json does not matter.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use super::{assert_success, output_timeout, require, TestImage};

/// `skopeo --policy <accept-anything> ARGS` (120 s limit).
pub fn skopeo<S: AsRef<OsStr>>(args: &[S]) -> Output {
    require("skopeo");
    static POLICY: OnceLock<PathBuf> = OnceLock::new();
    let policy = POLICY.get_or_init(|| {
        // Same content from every test process; write + rename so a
        // concurrent reader never sees a half-written file.
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let tmp = base.join(format!("skopeo-policy.json.{}", std::process::id()));
        fs::write(&tmp, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).unwrap();
        let p = base.join("skopeo-policy.json");
        fs::rename(&tmp, &p).unwrap();
        p
    });
    output_timeout(
        Command::new("skopeo")
            .arg("--policy")
            .arg(policy)
            .args(args),
        Duration::from_secs(120),
    )
}

/// [`skopeo`] that must succeed; returns its stdout.
pub fn skopeo_ok(args: &[&str]) -> Vec<u8> {
    let out = skopeo(args);
    assert_success(&format!("skopeo {}", args.join(" ")), &out);
    out.stdout
}

/// Pushes a layout into a registry over plain HTTP (`skopeo copy --all`).
pub fn skopeo_push(image: &TestImage, dest: &str) {
    let src = format!("oci:{}:{}", image.dir.display(), image.tag);
    let out = skopeo(&["copy", "--all", "--dest-tls-verify=false", &src, dest]);
    assert_success(&format!("skopeo copy {src} {dest}"), &out);
}
