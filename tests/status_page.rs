//! The status page at `/`, rendered by a real browser (headless Chromium):
//! it shows the cached images, the recent pulls with their outcome, the
//! work in progress, and the client setup for the address the browser used.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Headless Chromium as this machine runs it: no sandbox (root), no GPU, and
/// no background networking (the machine has no network to reach).
fn chromium(args: &[&str], profile: &std::path::Path) -> std::process::Output {
    require("chromium");
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args);
    output_timeout(&mut cmd, Duration::from_secs(60))
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

#[test]
fn status_page_renders_cache_pulls_and_setup() {
    let layouts = tempdir("nl-status");
    let state = tempdir("nl-status-state");
    let profile = tempdir("nl-chromium");
    let image = busybox_layout(&layouts.path().join("img"), "1", "hi");
    import_ok(state.path(), &image, "docker.io/library/hello:1");
    let daemon = Daemon::start_in(state.path(), &["--offline"]);
    assert_eq!(
        request(daemon.addr(), "GET", "/v2/library/hello/manifests/1", &[]).status,
        200
    );
    // Not cached, and offline: a failure that says so.
    assert_eq!(
        request(daemon.addr(), "GET", "/v2/library/missing/manifests/2", &[]).status,
        502
    );

    let url = format!("{}/", daemon.url());
    let out = chromium(&["--dump-dom", &url], profile.path());
    assert_success("chromium --dump-dom", &out);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("docker.io/library/hello:1"),
        "cached image missing:\n{dom}"
    );
    assert!(
        dom.contains(&image.manifest_digest[..19]),
        "digest missing:\n{dom}"
    );
    assert!(
        dom.contains("docker.io/library/missing:2"),
        "failed pull missing:\n{dom}"
    );
    assert!(
        dom.contains("class=\"err\""),
        "the failure is not marked:\n{dom}"
    );
    assert!(
        dom.contains(&format!("[host.\"http://{}\"]", daemon.host_port())),
        "setup does not use the daemon's address:\n{dom}"
    );

    let shot = profile.path().join("status.png");
    let out = chromium(
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,900",
            &url,
        ],
        profile.path(),
    );
    assert_success("chromium --screenshot", &out);
    let png = std::fs::read(&shot).expect("screenshot written");
    assert_eq!(png_size(&png), (1200, 900));
    // A blank page compresses to almost nothing; a rendered one does not.
    assert!(
        png.len() > 20_000,
        "screenshot looks blank ({} bytes)",
        png.len()
    );
    // Kept for people: target/tmp/status-page.png.
    let _ = std::fs::copy(
        &shot,
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png"),
    );
}

/// Work in progress shows while it runs and the page refreshes itself;
/// each pull shows once, under the name it was pulled by.
#[test]
fn status_page_shows_builds_in_progress_and_pulls_by_their_names() {
    require_nix();
    let profile = tempdir("nl-chromium");
    let nonce = format!("{}-{:?}", std::process::id(), std::time::SystemTime::now());
    let daemon = Daemon::builder()
        .args(nix_args(&[]))
        .env(
            "NIXERY_TEST_NONCE",
            nonce.replace(|c: char| !c.is_ascii_alphanumeric(), ""),
        )
        .env("NIXERY_LOCAL_LOG", "debug")
        .start();
    let log = daemon.log().clone();
    let addr = daemon.addr();
    let manifest = move |path: &'static str| {
        fetch(
            addr,
            "GET",
            path,
            &[("Accept", OCI_MANIFEST)],
            Body::Keep,
            Duration::from_secs(120),
        )
    };
    // As podman and Docker pull it: no `ns`.
    let pull = std::thread::spawn(move || manifest("/v2/nix/napping/manifests/latest"));
    assert!(
        log.wait_for("step=build", 1, Duration::from_secs(60)),
        "the build did not start:\n{}",
        log.text()
    );
    let url = format!("{}/", daemon.url());
    let out = chromium(&["--dump-dom", &url], profile.path());
    assert_success("chromium --dump-dom", &out);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("id=\"running\"") && dom.contains("napping"),
        "the running build is not shown:\n{dom}"
    );
    assert!(
        dom.contains("http-equiv=\"refresh\" content=\"2\""),
        "the page does not refresh while work runs:\n{dom}"
    );
    assert_eq!(pull.join().expect("pull thread").status, 200);

    // Resolve with HEAD, then GET the tag: one more pull, not two.
    assert_eq!(
        request(addr, "HEAD", "/v2/nix/napping/manifests/latest", &[]).status,
        200
    );
    assert_eq!(manifest("/v2/nix/napping/manifests/latest").status, 200);
    assert_eq!(
        manifest("/v2/napping/manifests/latest?ns=nix.local").status,
        200
    );
    assert_eq!(
        log.count("pull image=nix/napping:latest"),
        2,
        "{}",
        log.text()
    );
    assert_eq!(log.count("pull image=nix.local/napping:latest"), 1);

    let out = chromium(&["--dump-dom", &url], profile.path());
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("nix/napping:latest") && dom.contains("nix.local/napping:latest"),
        "pulls are not shown by their names:\n{dom}"
    );
    assert!(!dom.contains("docker.io/nix/napping"), "{dom}");
    assert!(
        !dom.contains("id=\"running\""),
        "the build still shows:\n{dom}"
    );
}
