//! Blobserve end to end (issue #6): files from inside images over HTTP, from
//! a Nix image built from the tests' package set and from imported images
//! (a two-layer image with whiteouts, an opaque directory and symlinks that
//! try to leave the image root; a multi-platform index).

mod common;

use std::sync::Barrier;
use std::thread;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The line the daemon logs once per extracted layer.
const EXTRACTED: &str = "extracted layer";
/// The line it logs per evicted layer.
const EVICTED: &str = "layer evicted from the extracted space";

/// The config file every imported-image daemon here gets.
const CONFIG: &str = r#"
[blobserve."library/layered"]
replace = [{ file = "app/index.html", from = "BASE_URL", to = "https://example.test/app/" }]

[blobserve."library/webapp"]
workdir = "/app"
replace = [
  { file = "index.html", from = "BASE_URL", to = "/static/" },
  { file = "/index.html", from = "app at", to = "served at" },
]
"#;

/// A daemon over a state dir holding the layered image as
/// `docker.io/library/layered:1` and `docker.io/library/webapp:1`, with
/// [`CONFIG`]; its log is captured.
fn layered_daemon(extra: &[&str]) -> (Daemon, DaemonLog, tempfile::TempDir, tempfile::TempDir) {
    let layout = tempdir("nl-layout");
    let image = layered_layout(layout.path(), "1");
    let state = tempdir("nl-state");
    let config = state.path().join("blobserve.toml");
    std::fs::write(&config, CONFIG).expect("write config");
    // An empty upstream, so that a miss is its real 404 (an unreachable
    // upstream is a 502, not a miss).
    static EMPTY: std::sync::OnceLock<DockerRegistry> = std::sync::OnceLock::new();
    let empty = EMPTY.get_or_init(DockerRegistry::start);
    let upstreams = ["docker.io", "quay.io"].map(|h| format!("--upstream={h}={}", empty.url()));
    let d = Daemon::builder()
        .state_dir(state.path())
        .import(&image, "docker.io/library/layered:1")
        .import(&image, "docker.io/library/webapp:1")
        .args(["--config", s(&config)])
        .args(upstreams)
        .args(extra)
        .start();
    let log = d.log().clone();
    (d, log, layout, state)
}

fn get(d: &Daemon, path: &str) -> Response {
    d.get(path)
}

fn get_with(d: &Daemon, path: &str, headers: &[(&str, &str)]) -> Response {
    request(d.addr(), "GET", path, headers)
}

fn ok_text(d: &Daemon, path: &str) -> String {
    let r = get(d, path);
    assert_eq!(r.status, 200, "GET {path}\n{r}");
    r.text()
}

fn listing(d: &Daemon, path: &str) -> Vec<String> {
    let r = get_with(d, path, &[("Accept", "application/json")]);
    assert_eq!(r.status, 200, "GET {path}\n{r}");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let v: Value = r.json();
    v["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries: {r}"))
        .iter()
        .map(|e| e["name"].as_str().expect("name").to_owned())
        .collect()
}

#[test]
fn nix_image_files_are_served() {
    let (d, log) = nix_daemon(&[]);
    let r = get(&d, "/files/nix/hello:latest/bin/hello");
    assert_eq!(r.status, 200, "{r}\n{}", log.text());
    assert!(r.text().starts_with("#!"), "a script: {r}");
    assert!(r.text().contains("Hello from nix"), "{r}");
    assert_eq!(
        r.header("content-length").as_deref(),
        Some(r.body.len().to_string().as_str())
    );
    let etag = r.header("etag").expect("etag");
    assert!(
        etag.starts_with("\"sha256:") && etag.contains(":/nix/store/"),
        "{etag}"
    );
    let root = listing(&d, "/files/nix/hello:latest/");
    for name in ["bin", "nix"] {
        assert!(root.contains(&name.to_owned()), "{root:?}");
    }
    // Served again without extracting anything again.
    let layers = log.count(EXTRACTED);
    assert!(layers >= 2, "{}", log.text());
    assert_eq!(ok_text(&d, "/files/nix/hello:latest/bin/hello"), r.text());
    assert_eq!(log.count(EXTRACTED), layers);
}

#[test]
fn imported_image_files_listings_ranges_and_replacements() {
    let (d, _log, _layout, _state) = layered_daemon(&[]);
    let base = "/files/library/layered:1";
    assert_eq!(ok_text(&d, &format!("{base}/etc/passwd")), LAYERED_PASSWD);
    // ns chooses the registry, as in the registry API.
    assert_eq!(
        ok_text(&d, &format!("{base}/etc/passwd?ns=docker.io")),
        LAYERED_PASSWD
    );
    assert_eq!(
        get(&d, &format!("{base}/etc/passwd?ns=quay.io")).status,
        404
    );

    // Headers.
    let r = get(&d, &format!("{base}/app/data.bin"));
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.body, blob_layout_bytes(4096));
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(r.header("content-length").as_deref(), Some("4096"));
    assert_eq!(r.header("accept-ranges").as_deref(), Some("bytes"));
    assert_eq!(
        r.header("last-modified").as_deref(),
        Some("Tue, 14 Nov 2023 22:13:20 GMT")
    );
    let etag = r.header("etag").expect("etag");
    assert!(
        etag.starts_with("\"sha256:") && etag.ends_with(":/app/data.bin\""),
        "{etag}"
    );
    let head = request(d.addr(), "HEAD", &format!("{base}/app/data.bin"), &[]);
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length").as_deref(), Some("4096"));
    let r = get_with(
        &d,
        &format!("{base}/app/data.bin"),
        &[("If-None-Match", &etag)],
    );
    assert_eq!(r.status, 304, "{r}");
    assert!(r.body.is_empty());

    // Ranges.
    let r = get_with(
        &d,
        &format!("{base}/app/data.bin"),
        &[("Range", "bytes=100-199")],
    );
    assert_eq!(r.status, 206, "{r}");
    assert_eq!(r.body, blob_layout_bytes(4096)[100..200]);
    assert_eq!(
        r.header("content-range").as_deref(),
        Some("bytes 100-199/4096")
    );
    let r = get_with(
        &d,
        &format!("{base}/app/data.bin"),
        &[("Range", "bytes=-10")],
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.body, blob_layout_bytes(4096)[4086..]);
    let r = get_with(
        &d,
        &format!("{base}/app/data.bin"),
        &[("Range", "bytes=5000-")],
    );
    assert_eq!(r.status, 416, "{r}");
    assert_eq!(r.header("content-range").as_deref(), Some("bytes */4096"));

    // A replaced file: content, length and ranges are those of the new text.
    let replaced = LAYERED_INDEX_HTML.replace("BASE_URL", "https://example.test/app/");
    let r = get(&d, &format!("{base}/app/index.html"));
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.text(), replaced);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(
        r.header("content-length").as_deref(),
        Some(replaced.len().to_string().as_str())
    );
    let r = get_with(
        &d,
        &format!("{base}/app/index.html"),
        &[("Range", "bytes=0-14")],
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.text(), &replaced[..15]);

    // workdir: the repository's root is /app; both replacements apply.
    let web = "/files/library/webapp:1";
    let r = get(&d, &format!("{web}/index.html"));
    assert_eq!(
        r.text(),
        LAYERED_INDEX_HTML
            .replace("BASE_URL", "/static/")
            .replace("app at", "served at"),
        "{r}"
    );
    assert_eq!(
        listing(&d, &format!("{web}/")),
        ["data.bin", "deep", "index.html", "link.html"]
    );
    assert_eq!(get(&d, &format!("{web}/etc/passwd")).status, 404);
    // The workdir does not confine symlinks below the image root.
    assert_eq!(ok_text(&d, &format!("{web}/deep/up")), LAYERED_HOSTNAME);

    // Listings: JSON on request, HTML otherwise.
    assert_eq!(
        listing(&d, &format!("{base}/")),
        ["abs", "app", "etc", "etcdir", "loop", "opq", "up"]
    );
    let r = get_with(&d, &format!("{base}/app"), &[("Accept", "text/html")]);
    assert_eq!(r.status, 200, "{r}");
    assert!(r
        .header("content-type")
        .expect("type")
        .starts_with("text/html"));
    let html = r.text();
    assert!(
        html.contains("href=\"/files/library/layered:1/app/index.html\""),
        "{html}"
    );
    assert!(
        html.contains("href=\"/files/library/layered:1/app/deep/\""),
        "{html}"
    );
    let v: Value = get_with(
        &d,
        &format!("{base}/app"),
        &[("Accept", "application/json")],
    )
    .json();
    let link = v["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["name"] == "link.html")
        .expect("link.html listed")
        .clone();
    assert_eq!(link["type"], "symlink");
    assert_eq!(link["target"], "index.html");
    assert_eq!(v["path"], "/app");
}

#[test]
fn whiteouts_opaque_dirs_and_symlinks_stay_in_the_image() {
    let (d, _log, _layout, _state) = layered_daemon(&[]);
    let base = "/files/library/layered:1";
    // A whiteout in the upper layer hides the lower file.
    assert_eq!(get(&d, &format!("{base}/etc/gone")).status, 404);
    assert_eq!(listing(&d, &format!("{base}/etc")), ["hostname", "passwd"]);
    assert_eq!(get(&d, &format!("{base}/etc/.wh.gone")).status, 404);
    // An opaque directory hides everything below it.
    assert_eq!(get(&d, &format!("{base}/opq/old")).status, 404);
    assert_eq!(get(&d, &format!("{base}/opq/sub/deep")).status, 404);
    assert_eq!(ok_text(&d, &format!("{base}/opq/new")), "new\n");
    assert_eq!(listing(&d, &format!("{base}/opq")), ["new"]);

    // Symlinks resolve inside the image root, never on the host.
    let host_hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    assert_eq!(ok_text(&d, &format!("{base}/abs")), LAYERED_PASSWD);
    for path in [
        "up",
        "app/deep/up",
        "etcdir/hostname",
        "etcdir/../../../etc/hostname",
        "app/../../../../etc/hostname",
        "app/%2e%2e/%2e%2e/etc/hostname",
        "..%2f..%2f..%2fetc/hostname",
    ] {
        let r = get(&d, &format!("{base}/{path}"));
        assert_eq!(r.status, 200, "{path}\n{r}");
        assert_eq!(r.text(), LAYERED_HOSTNAME, "{path}");
        if !host_hostname.is_empty() {
            assert_ne!(r.text(), host_hostname, "{path} served the host's file");
        }
    }
    let r = get(&d, &format!("{base}/abs"));
    assert!(
        r.header("etag").expect("etag").ends_with(":/etc/passwd\""),
        "{r}"
    );
    assert_eq!(
        ok_text(&d, &format!("{base}/app/link.html")).len(),
        LAYERED_INDEX_HTML.len() + "https://example.test/app/".len() * 2 - "BASE_URL".len() * 2
    );
    // A loop ends in a 404, not a hang.
    let r = get(&d, &format!("{base}/loop"));
    assert_eq!(r.status, 404, "{r}");
    // A file is not a directory.
    assert_eq!(get(&d, &format!("{base}/etc/passwd/x")).status, 404);
    // Layers live in the extracted space, by digest.
    assert!(d.state_dir().join("extracted/sha256").is_dir());
}

#[test]
fn concurrent_first_requests_extract_each_layer_once() {
    let (d, log, _layout, _state) = layered_daemon(&[]);
    let addr = d.addr();
    let barrier = Barrier::new(32);
    let statuses: Vec<(u16, String)> = thread::scope(|s| {
        let handles: Vec<_> = (0..32)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let r = request(addr, "GET", "/files/library/layered:1/etc/passwd", &[]);
                    (r.status, r.text())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect()
    });
    for (status, text) in &statuses {
        assert_eq!(*status, 200);
        assert_eq!(text, LAYERED_PASSWD);
    }
    assert_eq!(
        log.count(EXTRACTED),
        2,
        "two layers, each extracted once\n{}",
        log.text()
    );
    // No temp directories are left behind.
    let tmp = d.state_dir().join("extracted/tmp");
    assert_eq!(std::fs::read_dir(&tmp).expect("tmp").count(), 0);
}

#[test]
fn bad_names_and_missing_things_are_4xx() {
    let (d, _log, _layout, _state) = layered_daemon(&[]);
    for (path, status) in [
        ("/files/library/layered/etc/passwd", 400),
        ("/files/Library/Layered:1/etc/passwd", 400),
        ("/files/library/layered@sha256:zz/etc/passwd", 400),
        ("/files/library/layered:bad%tag/etc", 400),
        ("/files/library/layered:nosuchtag/etc/passwd", 404),
        ("/files/library/nosuchrepo:1/etc/passwd", 404),
        ("/files/library/layered:1/no/such/file", 404),
        ("/files/:1/x", 400),
    ] {
        let r = get(&d, path);
        assert_eq!(r.status, status, "{path}\n{r}");
        assert!(r.error_code().is_some(), "{path}: a JSON error body\n{r}");
    }
    let r = request(
        d.addr(),
        "DELETE",
        "/files/library/layered:1/etc/passwd",
        &[],
    );
    assert_eq!(r.status, 405);
    // By digest works too.
    let m = get_with(
        &d,
        "/v2/library/layered/manifests/1",
        &[("Accept", OCI_MANIFEST)],
    );
    let digest = sha256_digest(&m.body);
    assert_eq!(
        ok_text(&d, &format!("/files/library/layered@{digest}/etc/passwd")),
        LAYERED_PASSWD
    );
}

#[test]
fn multi_platform_index_serves_the_host_platform() {
    let layout = tempdir("nl-layout");
    let image = multi_platform_layout(layout.path(), "2", "hi");
    let state = tempdir("nl-state");
    import_ok(state.path(), &image, "docker.io/library/multi:2");
    let d = Daemon::start_in(state.path(), &[]);
    let r = get(&d, "/files/library/multi:2/bin/busybox");
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.body, std::fs::read("/bin/busybox").expect("busybox"));
    // bin/sh is a relative symlink to busybox.
    assert_eq!(
        get(&d, "/files/library/multi:2/bin/sh").body.len(),
        r.body.len()
    );
}

#[test]
fn the_extracted_space_is_capped_with_lru_eviction() {
    let (d, log, _layout, state) = layered_daemon(&["--blobserve-max-size", "1"]);
    let other = tempdir("nl-layout");
    let busybox = busybox_layout(other.path(), "1", "x");
    import_ok(state.path(), &busybox, "docker.io/library/bb:1");
    // Each request still succeeds: layers in use are never evicted.
    assert_eq!(
        ok_text(&d, "/files/library/layered:1/etc/passwd"),
        LAYERED_PASSWD
    );
    assert!(get(&d, "/files/library/bb:1/bin/busybox").status == 200);
    assert!(
        log.wait_for(EVICTED, 2, Duration::from_secs(10)),
        "{}",
        log.text()
    );
    let extracted = log.count(EXTRACTED);
    // Evicted layers come back on the next request.
    assert_eq!(
        ok_text(&d, "/files/library/layered:1/etc/passwd"),
        LAYERED_PASSWD
    );
    assert!(log.count(EXTRACTED) > extracted);
    let dirs = std::fs::read_dir(d.state_dir().join("extracted/sha256"))
        .expect("extracted")
        .count();
    assert!(dirs <= 2, "at most the last image's layers stay: {dirs}");
}

#[test]
fn a_failed_extraction_leaves_nothing_behind() {
    let (d, log, _layout, state) = layered_daemon(&[]);
    let image = layered_layout(tempdir("nl-layout").path(), "1");
    // Truncate the stored upper layer: its gzip stream now ends early.
    let hex = image.layer_digests[1]
        .strip_prefix("sha256:")
        .expect("sha256");
    let blob = state.path().join("blobs/sha256").join(hex);
    let bytes = std::fs::read(&blob).expect("read layer");
    std::fs::write(&blob, &bytes[..bytes.len() / 2]).expect("truncate layer");
    let r = get(&d, "/files/library/layered:1/etc/passwd");
    assert_eq!(r.status, 500, "{r}");
    assert!(
        !r.text().contains(state.path().to_str().expect("utf-8")),
        "no paths leak: {r}"
    );
    assert!(log.count("layer extraction failed") >= 1, "{}", log.text());
    assert!(!d.state_dir().join("extracted/sha256").join(hex).exists());
    let tmp = d.state_dir().join("extracted/tmp");
    assert_eq!(std::fs::read_dir(&tmp).expect("tmp").count(), 0);
    // The intact lower layer was extracted and is complete.
    let lower = image.layer_digests[0]
        .strip_prefix("sha256:")
        .expect("sha256");
    let passwd = d
        .state_dir()
        .join("extracted/sha256")
        .join(lower)
        .join("etc/passwd");
    assert_eq!(
        std::fs::read_to_string(passwd).expect("lower layer"),
        LAYERED_PASSWD
    );
    // Put the layer back: the next request extracts it.
    std::fs::write(&blob, &bytes).expect("restore layer");
    assert_eq!(
        ok_text(&d, "/files/library/layered:1/etc/passwd"),
        LAYERED_PASSWD
    );
}
