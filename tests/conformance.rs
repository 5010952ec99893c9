//! The pull side of the OCI distribution spec (FIELD-NOTES §2), the daemon's
//! HTTP contract on top of it (ns scoping, Accept negotiation, read-only
//! refusals), and the `import` command line, checked with a raw HTTP client.
//! The read-only checks run against the daemon in process, on port 0; the
//! shutdown check runs the binary, since it needs a signal.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const RANGE_BLOB_SIZE: u64 = 2048;

/// A syntactically valid digest nothing has.
const MISSING_DIGEST: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000000";

const SPEC_CODES: &[&str] = &[
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
];

struct Fixture {
    daemon: Daemon,
    /// An empty upstream for every registry the checks name, so a miss is
    /// the upstream's real 404 (an unreachable one is a 502, not a miss).
    _upstream: DockerRegistry,
    /// docker.io/library/hello:1 and :latest
    oci: TestImage,
    /// docker.io/library/hello-docker:1
    docker: TestImage,
    /// docker.io/library/hello-multi:1
    multi: TestImage,
    /// docker.io/test/ranges:1, one 2048-byte layer
    ranges: TestImage,
    /// myreg.io:5000/x/y:1
    portreg: TestImage,
}

fn setup(dir: &std::path::Path) -> (std::path::PathBuf, [TestImage; 5]) {
    let state = dir.join("state");
    let oci = busybox_layout(&dir.join("oci"), "1", "conformance-oci");
    let docker = docker_v2_layout(&dir.join("docker"), "1", "conformance-docker");
    let multi = multi_platform_layout(&dir.join("multi"), "1", "conformance-multi");
    let ranges = blob_layout(&dir.join("ranges"), "1", RANGE_BLOB_SIZE);
    let portreg = busybox_layout(&dir.join("portreg"), "1", "conformance-port");
    import_ok(&state, &oci, "docker.io/library/hello:1");
    import_ok(&state, &oci, "docker.io/library/hello:latest");
    import_ok(&state, &docker, "docker.io/library/hello-docker:1");
    import_ok(&state, &multi, "docker.io/library/hello-multi:1");
    import_ok(&state, &ranges, "docker.io/test/ranges:1");
    import_ok(&state, &portreg, "myreg.io:5000/x/y:1");
    (state, [oci, docker, multi, ranges, portreg])
}

/// One daemon for the read-only checks.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = scratch_dir("conformance");
        let (state, [oci, docker, multi, ranges, portreg]) = setup(&dir);
        let upstream = DockerRegistry::start();
        let upstreams = ["docker.io", "ghcr.io", "myreg.io", "myreg.io:5000"]
            .map(|host| format!("--upstream={host}={}", upstream.url()));
        Fixture {
            daemon: Daemon::builder()
                .state_dir(&state)
                .args(upstreams)
                .in_process()
                .start(),
            _upstream: upstream,
            oci,
            docker,
            multi,
            ranges,
            portreg,
        }
    })
}

fn addr() -> SocketAddr {
    fixture().daemon.addr()
}

/// A request whose response must carry the API version header (all must).
fn req_to(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    let r = request(addr, method, path, headers);
    assert_eq!(
        r.header("Docker-Distribution-API-Version").as_deref(),
        Some("registry/2.0"),
        "{method} {path}: missing API version header\n{r}"
    );
    r
}

fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    req_to(addr(), method, path, headers)
}

fn get(path: &str) -> Response {
    req("GET", path, &[])
}

fn head(path: &str) -> Response {
    req("HEAD", path, &[])
}

/// A spec error: status, JSON body with `errors[0].code` and a message.
fn assert_error(r: &Response, what: &str, status: u16, code: &str) {
    assert_eq!(r.status, status, "{what}: status\n{r}");
    assert_eq!(r.error_code().as_deref(), Some(code), "{what}: code\n{r}");
    let v = r.json();
    assert!(
        v["errors"][0]["message"].is_string(),
        "{what}: message\n{r}"
    );
    let ct = r.header("Content-Type").unwrap_or_default();
    assert!(
        ct.starts_with("application/json"),
        "{what}: content type {ct:?}\n{r}"
    );
}

fn assert_head_error(r: &Response, what: &str, status: u16) {
    assert_eq!(r.status, status, "{what}: status\n{r}");
    assert!(r.body.is_empty(), "{what}: HEAD has a body\n{r}");
}

fn assert_blob_response(r: &Response, what: &str, digest: &str, size: u64) {
    assert_eq!(r.status, 200, "{what}\n{r}");
    assert_eq!(
        r.header("Content-Length"),
        Some(size.to_string()),
        "{what}\n{r}"
    );
    assert_eq!(
        r.header("Docker-Content-Digest").as_deref(),
        Some(digest),
        "{what}\n{r}"
    );
    assert_eq!(
        r.header("Content-Type").as_deref(),
        Some("application/octet-stream"),
        "{what}\n{r}"
    );
    assert_eq!(
        r.header("Accept-Ranges").as_deref(),
        Some("bytes"),
        "{what}\n{r}"
    );
}

/// Manifest headers and, for GET, the exact stored bytes.
fn assert_manifest_response(r: &Response, what: &str, image: &TestImage, is_get: bool) {
    assert_eq!(r.status, 200, "{what}\n{r}");
    assert_eq!(
        r.header("Content-Type").as_deref(),
        Some(image.media_type.as_str()),
        "{what}\n{r}"
    );
    assert_eq!(
        r.header("Docker-Content-Digest").as_deref(),
        Some(image.manifest_digest.as_str()),
        "{what}\n{r}"
    );
    assert_eq!(
        r.header("Content-Length"),
        Some(image.manifest_bytes.len().to_string()),
        "{what}\n{r}"
    );
    if is_get {
        assert!(r.body == image.manifest_bytes, "{what}: body differs\n{r}");
        assert_eq!(sha256_digest(&r.body), image.manifest_digest);
        assert_eq!(r.json()["mediaType"], image.media_type.as_str(), "{what}");
    } else {
        assert!(r.body.is_empty(), "{what}: HEAD has a body\n{r}");
    }
}

// ---------------------------------------------------------------------------
// /v2/
// ---------------------------------------------------------------------------

#[test]
fn api_version_check() {
    let r = get("/v2/");
    assert_eq!(r.status, 200, "{r}");
    let r = head("/v2/");
    assert_eq!(r.status, 200, "{r}");
    assert!(r.body.is_empty(), "{r}");
}

// ---------------------------------------------------------------------------
// Blobs
// ---------------------------------------------------------------------------

#[test]
fn blob_get_and_head() {
    let f = fixture();
    let digest = &f.oci.layer_digests[0];
    let size = f.oci.layer_sizes[0];
    let path = format!("/v2/library/hello/blobs/{digest}");

    let r = get(&path);
    assert_blob_response(&r, "GET blob", digest, size);
    assert!(r.body == f.oci.blob(digest), "GET blob: bytes differ");

    let r = head(&path);
    assert_blob_response(&r, "HEAD blob", digest, size);
    assert!(r.body.is_empty(), "HEAD blob has a body\n{r}");

    // The config blob too.
    let r = get(&format!("/v2/library/hello/blobs/{}", f.oci.config_digest));
    assert_blob_response(
        &r,
        "GET config",
        &f.oci.config_digest,
        f.oci.config_bytes.len() as u64,
    );
    assert!(r.body == f.oci.config_bytes);
}

#[test]
fn missing_blob_is_blob_unknown() {
    let path = format!("/v2/library/hello/blobs/{MISSING_DIGEST}");
    assert_error(&get(&path), "GET missing blob", 404, "BLOB_UNKNOWN");
    assert_head_error(&head(&path), "HEAD missing blob", 404);
}

fn range_path() -> String {
    format!(
        "/v2/test/ranges/blobs/{}",
        fixture().ranges.layer_digests[0]
    )
}

fn get_range(spec: &str) -> Response {
    req("GET", &range_path(), &[("Range", spec)])
}

fn assert_partial(spec: &str, start: usize, end_incl: usize) {
    let all = blob_layout_bytes(RANGE_BLOB_SIZE);
    let r = get_range(spec);
    let what = format!("Range: {spec}");
    assert_eq!(r.status, 206, "{what}\n{r}");
    assert_eq!(
        r.header("Content-Range"),
        Some(format!("bytes {start}-{end_incl}/{RANGE_BLOB_SIZE}")),
        "{what}\n{r}"
    );
    let len = end_incl + 1 - start;
    assert_eq!(
        r.header("Content-Length"),
        Some(len.to_string()),
        "{what}\n{r}"
    );
    assert_eq!(r.body.len(), len, "{what}");
    assert!(r.body == all[start..=end_incl], "{what}: wrong bytes");
}

fn assert_unsatisfiable(spec: &str) {
    let r = get_range(spec);
    let what = format!("Range: {spec}");
    assert_eq!(r.status, 416, "{what}\n{r}");
    assert_eq!(
        r.header("Content-Range"),
        Some(format!("bytes */{RANGE_BLOB_SIZE}")),
        "{what}\n{r}"
    );
}

#[test]
fn blob_layout_bytes_match_the_stored_blob() {
    // Guards the range tests' expectations themselves.
    let f = fixture();
    let r = get(&range_path());
    assert_blob_response(
        &r,
        "GET range blob",
        &f.ranges.layer_digests[0],
        RANGE_BLOB_SIZE,
    );
    assert!(r.body == blob_layout_bytes(RANGE_BLOB_SIZE));
}

#[test]
fn range_closed() {
    assert_partial("bytes=500-1499", 500, 1499);
    assert_partial("bytes=0-0", 0, 0);
    assert_partial("bytes=2047-2047", 2047, 2047);
}

#[test]
fn range_open_ended() {
    assert_partial("bytes=500-", 500, 2047);
    assert_partial("bytes=0-", 0, 2047);
}

#[test]
fn range_suffix() {
    assert_partial("bytes=-500", 1548, 2047);
    // A suffix longer than the blob is the whole blob.
    assert_partial("bytes=-5000", 0, 2047);
}

#[test]
fn range_end_past_eof_is_clamped() {
    assert_partial("bytes=500-9999", 500, 2047);
}

#[test]
fn range_unsatisfiable() {
    assert_unsatisfiable("bytes=500-0");
    assert_unsatisfiable("bytes=2048-");
    assert_unsatisfiable("bytes=4096-5000");
}

// ---------------------------------------------------------------------------
// Manifests
// ---------------------------------------------------------------------------

#[test]
fn manifests_by_tag_and_digest() {
    let f = fixture();
    for (name, image) in [
        ("library/hello", &f.oci),
        ("library/hello-docker", &f.docker),
        ("library/hello-multi", &f.multi),
    ] {
        for reference in [image.tag.as_str(), image.manifest_digest.as_str()] {
            let path = format!("/v2/{name}/manifests/{reference}");
            assert_manifest_response(&get(&path), &format!("GET {path}"), image, true);
            assert_manifest_response(&head(&path), &format!("HEAD {path}"), image, false);
        }
    }
    // The per-platform manifests of the index, by digest.
    for p in &f.multi.platforms {
        let path = format!("/v2/library/hello-multi/manifests/{}", p.digest);
        let r = get(&path);
        assert_eq!(r.status, 200, "{path}\n{r}");
        assert!(r.body == p.bytes, "{path}: bytes differ");
        assert_eq!(
            r.header("Content-Type").as_deref(),
            Some(OCI_MANIFEST),
            "{path}"
        );
        assert_eq!(
            r.header("Docker-Content-Digest").as_ref(),
            Some(&p.digest),
            "{path}"
        );
    }
}

#[test]
fn manifest_with_containerd_accept_header() {
    // What containerd sends when resolving a tag.
    let accept = "application/vnd.docker.distribution.manifest.v2+json, \
                  application/vnd.docker.distribution.manifest.list.v2+json, \
                  application/vnd.oci.image.manifest.v1+json, \
                  application/vnd.oci.image.index.v1+json, */*";
    let f = fixture();
    for (name, image) in [
        ("library/hello", &f.oci),
        ("library/hello-docker", &f.docker),
        ("library/hello-multi", &f.multi),
    ] {
        let path = format!("/v2/{name}/manifests/1?ns=docker.io");
        let r = req("HEAD", &path, &[("Accept", accept)]);
        assert_manifest_response(&r, &format!("HEAD {path}"), image, false);
    }
}

#[test]
fn missing_manifest_is_manifest_unknown() {
    let f = fixture();
    for path in [
        "/v2/library/hello/manifests/no-such-tag".to_string(),
        format!("/v2/library/hello/manifests/{MISSING_DIGEST}"),
        "/v2/library/no-such-repo/manifests/1".to_string(),
        // A manifest of another repository, by digest.
        format!(
            "/v2/library/hello-docker/manifests/{}",
            f.oci.manifest_digest
        ),
        // A blob digest is not a manifest.
        format!("/v2/library/hello/manifests/{}", f.oci.config_digest),
    ] {
        assert_error(&get(&path), &format!("GET {path}"), 404, "MANIFEST_UNKNOWN");
        assert_head_error(&head(&path), &format!("HEAD {path}"), 404);
    }
}

#[test]
fn malformed_digest_is_digest_invalid() {
    for reference in [
        "sha256:abc",
        "sha256:ABCDEF0000000000000000000000000000000000000000000000000000000000",
        "sha256:000000000000000000000000000000000000000000000000000000000000000g",
        "sha256:",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
    ] {
        let path = format!("/v2/library/hello/manifests/{reference}");
        assert_error(&get(&path), &format!("GET {path}"), 400, "DIGEST_INVALID");
        let path = format!("/v2/library/hello/blobs/{reference}");
        assert_error(&get(&path), &format!("GET {path}"), 400, "DIGEST_INVALID");
    }
    // Not even shaped like a digest, on the blob route.
    let path = "/v2/library/hello/blobs/latest";
    assert_error(&get(path), path, 400, "DIGEST_INVALID");
}

#[test]
fn invalid_tag_is_a_spec_error() {
    let long = "a".repeat(129);
    for tag in [
        "-leading-dash",
        ".leading-dot",
        long.as_str(),
        "tag%20with%20space",
    ] {
        let path = format!("/v2/library/hello/manifests/{tag}");
        let r = get(&path);
        assert!(matches!(r.status, 400 | 404), "GET {path}\n{r}");
        let code = r.error_code();
        assert!(
            code.as_deref().is_some_and(|c| SPEC_CODES.contains(&c)),
            "GET {path}: no spec error code\n{r}"
        );
    }
}

#[test]
fn invalid_name_is_name_invalid() {
    for name in [
        "Library/Hello",
        "library//hello",
        "library/hello-",
        "_x/y",
        "a/../b",
    ] {
        for path in [
            format!("/v2/{name}/manifests/1"),
            format!("/v2/{name}/blobs/{MISSING_DIGEST}"),
            format!("/v2/{name}/tags/list"),
        ] {
            let r = get(&path);
            assert_error(&r, &format!("GET {path}"), 400, "NAME_INVALID");
        }
    }
}

// ---------------------------------------------------------------------------
// Accept negotiation
// ---------------------------------------------------------------------------

#[test]
fn accept_without_stored_type_is_manifest_unknown() {
    let cases = [
        ("library/hello", DOCKER_MANIFEST),
        ("library/hello-docker", OCI_MANIFEST),
        ("library/hello-multi", "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"),
    ];
    for (name, accept) in cases {
        let path = format!("/v2/{name}/manifests/1");
        let r = req("GET", &path, &[("Accept", accept)]);
        assert_error(
            &r,
            &format!("GET {path} Accept: {accept}"),
            404,
            "MANIFEST_UNKNOWN",
        );
        let r = req("HEAD", &path, &[("Accept", accept)]);
        assert_head_error(&r, &format!("HEAD {path} Accept: {accept}"), 404);
    }
}

#[test]
fn accept_matching_or_wildcard_is_served() {
    let f = fixture();
    let path = "/v2/library/hello/manifests/1";
    for accept in [
        "*/*",
        OCI_MANIFEST,
        "application/vnd.oci.image.manifest.v1+json; q=0.5",
        "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json",
    ] {
        let r = req("GET", path, &[("Accept", accept)]);
        assert_manifest_response(&r, &format!("GET {path} Accept: {accept}"), &f.oci, true);
    }
    // Several Accept header lines count together.
    let r = req(
        "GET",
        path,
        &[("Accept", DOCKER_MANIFEST), ("Accept", OCI_MANIFEST)],
    );
    assert_manifest_response(&r, "two Accept lines", &f.oci, true);
    let path = "/v2/library/hello-multi/manifests/1";
    let r = req("GET", path, &[("Accept", OCI_INDEX)]);
    assert_manifest_response(&r, "index with Accept: OCI index", &f.multi, true);
}

// ---------------------------------------------------------------------------
// ns scoping (containerd mirrors)
// ---------------------------------------------------------------------------

#[test]
fn ns_scopes_lookups_to_a_registry() {
    let f = fixture();
    let path = "/v2/library/hello/manifests/1?ns=ghcr.io";
    let r = get(path);
    assert_error(&r, path, 404, "MANIFEST_UNKNOWN");
    assert_eq!(
        r.header("OCI-Namespace").as_deref(),
        Some("ghcr.io"),
        "{path}\n{r}"
    );
    let r = head(path);
    assert_head_error(&r, path, 404);

    let path = "/v2/library/hello/manifests/1?ns=docker.io";
    let r = get(path);
    assert_manifest_response(&r, path, &f.oci, true);
    assert_eq!(
        r.header("OCI-Namespace").as_deref(),
        Some("docker.io"),
        "{path}\n{r}"
    );

    // A registry with a port arrives percent-encoded.
    let path = "/v2/x/y/manifests/1?ns=myreg.io%3A5000";
    let r = get(path);
    assert_manifest_response(&r, path, &f.portreg, true);
    assert_eq!(
        r.header("OCI-Namespace").as_deref(),
        Some("myreg.io:5000"),
        "{path}\n{r}"
    );
    let path = format!(
        "/v2/x/y/blobs/{}?ns=myreg.io%3A5000",
        f.portreg.config_digest
    );
    let r = get(&path);
    assert_eq!(r.status, 200, "{path}\n{r}");
    assert!(r.body == f.portreg.config_bytes);

    // Without ns the default registry (docker.io) is meant.
    let path = "/v2/x/y/manifests/1";
    assert_error(&get(path), path, 404, "MANIFEST_UNKNOWN");
    assert!(get(path).header("OCI-Namespace").is_none());
    let path = "/v2/x/y/manifests/1?ns=myreg.io";
    assert_error(&get(path), path, 404, "MANIFEST_UNKNOWN");
}

// ---------------------------------------------------------------------------
// Tags
// ---------------------------------------------------------------------------

#[test]
fn tags_list() {
    let r = get("/v2/library/hello/tags/list");
    assert_eq!(r.status, 200, "{r}");
    let v = r.json();
    assert_eq!(v["name"], "library/hello", "{r}");
    assert_eq!(v["tags"], serde_json::json!(["1", "latest"]), "{r}");

    let r = get("/v2/x/y/tags/list?ns=myreg.io%3A5000");
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.json()["tags"], serde_json::json!(["1"]), "{r}");

    let path = "/v2/library/no-such-repo/tags/list";
    assert_error(&get(path), path, 404, "NAME_UNKNOWN");
    let path = "/v2/library/hello/tags/list?ns=ghcr.io";
    assert_error(&get(path), path, 404, "NAME_UNKNOWN");
}

#[test]
fn tags_list_pagination() {
    let r = get("/v2/library/hello/tags/list?n=1");
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.json()["tags"], serde_json::json!(["1"]), "{r}");
    let link = r.header("Link").unwrap_or_default();
    assert!(
        link.contains("rel=\"next\"") && link.contains("last=1") && link.contains("n=1"),
        "Link: {link:?}\n{r}"
    );
    let r = get("/v2/library/hello/tags/list?n=1&last=1");
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.json()["tags"], serde_json::json!(["latest"]), "{r}");
    let r = get("/v2/library/hello/tags/list?last=latest");
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.json()["tags"], serde_json::json!([]), "{r}");
}

// ---------------------------------------------------------------------------
// Read-only
// ---------------------------------------------------------------------------

fn assert_refused(r: &Response, what: &str) {
    assert_error(r, what, 405, "UNSUPPORTED");
    let allow: BTreeSet<String> = r
        .header("Allow")
        .unwrap_or_default()
        .split(',')
        .map(|m| m.trim().to_ascii_uppercase())
        .collect();
    let expected: BTreeSet<String> = ["GET", "HEAD"].iter().map(|s| s.to_string()).collect();
    assert_eq!(allow, expected, "{what}: Allow\n{r}");
}

/// Push and delete are refused with 405 UNSUPPORTED, and nothing changes:
/// own daemon so that the state-dir snapshot sees no other test's traffic.
#[test]
fn writes_are_refused_and_change_nothing() {
    let dir = tempdir("nl-readonly");
    let (state, [oci, docker, ..]) = setup(dir.path());
    let d = Daemon::start_in(&state, &["--offline"]);
    let before = list_files(&state);
    let a = d.addr();
    let layer = &oci.layer_digests[0];
    let manifest = &oci.manifest_digest;
    let refusals: Vec<(&str, String, &[u8])> = vec![
        ("POST", "/v2/library/hello/blobs/uploads/".into(), b""),
        (
            "POST",
            format!("/v2/library/hello/blobs/uploads/?digest={layer}"),
            b"x",
        ),
        (
            "POST",
            format!("/v2/library/hello/blobs/uploads/?mount={layer}&from=library/hello-docker"),
            b"",
        ),
        (
            "PATCH",
            "/v2/library/hello/blobs/uploads/some-upload-id".into(),
            b"data",
        ),
        (
            "PUT",
            format!("/v2/library/hello/blobs/uploads/some-upload-id?digest={layer}"),
            b"data",
        ),
        (
            "PUT",
            "/v2/library/hello/manifests/1".into(),
            &docker.manifest_bytes,
        ),
        (
            "PUT",
            "/v2/library/new-repo/manifests/1".into(),
            &docker.manifest_bytes,
        ),
        (
            "DELETE",
            format!("/v2/library/hello/manifests/{manifest}"),
            b"",
        ),
        ("DELETE", "/v2/library/hello/manifests/1".into(), b""),
        ("DELETE", format!("/v2/library/hello/blobs/{layer}"), b""),
        ("POST", "/v2/".into(), b""),
        ("DELETE", "/v2/library/hello/tags/list".into(), b""),
    ];
    for (method, path, body) in &refusals {
        let headers: &[(&str, &str)] = if path.contains("/manifests/") && *method == "PUT" {
            &[("Content-Type", DOCKER_MANIFEST)]
        } else {
            &[("Content-Type", "application/octet-stream")]
        };
        let r = request_body(a, method, path, headers, body);
        assert_refused(&r, &format!("{method} {path}"));
    }
    // The tag still resolves to the same manifest; nothing was written.
    let r = request(a, "GET", "/v2/library/hello/manifests/1", &[]);
    assert_manifest_response(&r, "after refusals", &oci, true);
    // Not cached, and offline: a 502 that says so, not a miss.
    let r = request(a, "GET", "/v2/library/new-repo/manifests/1", &[]);
    assert_eq!(r.status, 502, "{r}");
    assert!(r.reason.contains("offline"), "{r}");
    let r = request(a, "GET", &format!("/v2/library/hello/blobs/{layer}"), &[]);
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(list_files(&state), before, "state dir changed");
    assert_eq!(d.stop().code(), Some(0), "exit status after SIGTERM");
}

#[test]
fn unknown_routes_are_unsupported() {
    for path in [
        "/v2/library/hello/nope/1",
        "/v2/library/hello",
        "/v2/_catalog",
        "/v3/",
        // `/` is the status page; `/files` without an image is not a route.
        "/index.html",
    ] {
        let r = get(path);
        assert_eq!(r.status, 404, "GET {path}\n{r}");
        assert!(
            r.error_code()
                .is_some_and(|c| SPEC_CODES.contains(&c.as_str())),
            "GET {path}: no spec code\n{r}"
        );
    }
    let r = get("/v2/library/hello/nope/1");
    assert_error(&r, "unknown route", 404, "UNSUPPORTED");
    // An empty reference is an unknown route or a malformed digest/tag.
    for path in ["/v2/library/hello/manifests/", "/v2/library/hello/blobs/"] {
        let r = get(path);
        assert!(matches!(r.status, 400 | 404), "GET {path}\n{r}");
        assert!(
            r.error_code()
                .is_some_and(|c| SPEC_CODES.contains(&c.as_str())),
            "GET {path}: no spec code\n{r}"
        );
    }
}

// ---------------------------------------------------------------------------
// Concurrency and hostile input
// ---------------------------------------------------------------------------

#[test]
fn parallel_gets_are_all_correct() {
    let f = fixture();
    let a = addr();
    let layer = f.oci.layer_digests[0].clone();
    let layer_bytes = f.oci.blob(&layer);
    thread::scope(|s| {
        let handles: Vec<_> = (0..32)
            .map(|i| {
                let layer = &layer;
                let layer_bytes = &layer_bytes;
                s.spawn(move || {
                    if i % 2 == 0 {
                        let r = req_to(a, "GET", "/v2/library/hello/manifests/1", &[]);
                        assert_manifest_response(
                            &r,
                            &format!("parallel manifest {i}"),
                            &f.oci,
                            true,
                        );
                    } else {
                        let r = req_to(a, "GET", &format!("/v2/library/hello/blobs/{layer}"), &[]);
                        assert_eq!(r.status, 200, "parallel blob {i}\n{r}");
                        assert!(&r.body == layer_bytes, "parallel blob {i}: bytes differ");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
}

#[test]
fn path_traversal_is_refused() {
    let f = fixture();
    let layer = &f.oci.layer_digests[0];
    for path in [
        format!("/v2/../library/hello/blobs/{layer}"),
        format!("/v2/library/hello/blobs/{layer}/../../../../etc/passwd"),
        "/v2/library/hello/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd".to_string(),
        "/v2/%2e%2e/%2e%2e/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000".to_string(),
        "/v2/library/hello/manifests/..%2f..%2f..%2f..%2fetc%2fpasswd".to_string(),
    ] {
        let r = raw(
            addr(),
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert!((400..500).contains(&r.status), "GET {path}\n{r}");
        assert!(!r.text().contains("root:"), "GET {path} leaked a file\n{r}");
    }
    assert_eq!(
        get("/v2/").status,
        200,
        "daemon unhealthy after traversal attempts"
    );
}

#[test]
fn garbage_requests_get_4xx_or_close() {
    for bytes in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /v2/ HTTP/9.9\r\n\r\n",
        b"GET /v2/\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
        b"\x00\x01\x02\x03\r\n\r\n",
    ] {
        let r = raw(addr(), bytes);
        assert!(
            r.status == 0 || (400..=505).contains(&r.status),
            "{:?}\n{r}",
            String::from_utf8_lossy(bytes)
        );
    }
    assert_eq!(get("/v2/").status, 200, "daemon unhealthy after garbage");
}

/// A client that never finishes its headers is dropped after
/// `--header-timeout` (a mirror must not be held hostage).
#[test]
fn header_timeout_drops_slow_clients() {
    let d = Daemon::builder()
        .args(["--header-timeout", "1"])
        .in_process()
        .start();
    let mut s = TcpStream::connect(d.addr()).unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let res = s.read_to_end(&mut buf);
    let took = started.elapsed();
    assert!(
        res.is_ok()
            || res
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "connection not closed within 10 s: {res:?}"
    );
    assert!(took < Duration::from_secs(5), "closed only after {took:?}");
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    // Meanwhile, a proper request is served.
    assert_eq!(request(d.addr(), "GET", "/v2/", &[]).status, 200);
}

// ---------------------------------------------------------------------------
// The `import` command line
// ---------------------------------------------------------------------------

#[test]
fn import_rejects_corrupt_blob_and_changes_nothing() {
    let dir = tempdir("nl-import");
    let state = dir.path().join("state");
    let good = busybox_layout(&dir.path().join("good"), "1", "import-good");
    import_ok(&state, &good, "docker.io/library/good:1");
    let before = list_files(&state);

    for corrupt_which in ["layer", "config"] {
        let layout = dir.path().join(format!("bad-{corrupt_which}"));
        let bad = blob_layout(&layout, "1", 4096 + corrupt_which.len() as u64);
        let digest = if corrupt_which == "layer" {
            bad.layer_digests[0].clone()
        } else {
            bad.config_digest.clone()
        };
        bad.corrupt_blob(&digest);
        let out = import(&state, &bad.dir, "docker.io/library/bad:1");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "corrupt {corrupt_which}: {stderr}"
        );
        assert!(
            stderr.contains(&digest),
            "corrupt {corrupt_which}: message does not name {digest}: {stderr}"
        );
        assert_eq!(
            list_files(&state),
            before,
            "corrupt {corrupt_which}: cache changed"
        );
    }

    // A missing blob is as bad as a corrupt one.
    let layout = dir.path().join("missing");
    let bad = busybox_layout(&layout, "1", "import-missing");
    std::fs::remove_file(bad.blob_path(&bad.config_digest)).unwrap();
    let out = import(&state, &bad.dir, "docker.io/library/bad:1");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(&bad.config_digest));
    assert_eq!(list_files(&state), before, "missing blob: cache changed");
}

#[test]
fn import_normalises_references_and_picks_the_tagged_descriptor() {
    let dir = tempdir("nl-import");
    let state = dir.path().join("state");
    let image = busybox_layout(&dir.path().join("a"), "1", "import-norm");

    // A second descriptor in index.json, tagged "2": the tag picks.
    let other = docker_v2_layout(&dir.path().join("b"), "2", "import-other");
    for digest in other.blob_digests() {
        std::fs::copy(other.blob_path(&digest), image.blob_path(&digest)).unwrap();
    }
    let index_path = image.dir.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["manifests"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": DOCKER_MANIFEST,
            "digest": other.manifest_digest,
            "size": other.manifest_bytes.len(),
            "annotations": { REF_NAME: "2" },
        }));
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();

    // "hello:1" is docker.io/library/hello:1; "hello:2" picks descriptor "2".
    import_ok(&state, &image, "hello:1");
    let out = import(&state, &image.dir, "hello:2");
    assert_success("import hello:2", &out);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&other.manifest_digest));
    // No descriptor tagged "3" and more than one descriptor: refused.
    let out = import(&state, &image.dir, "hello:3");
    assert!(!out.status.success(), "import hello:3 picked something");

    let d = Daemon::start_in(&state, &["--offline"]);
    let r = request(
        d.addr(),
        "GET",
        "/v2/library/hello/manifests/1?ns=docker.io",
        &[],
    );
    assert_manifest_response(&r, "hello:1", &image, true);
    let r = request(d.addr(), "GET", "/v2/library/hello/manifests/2", &[]);
    assert_manifest_response(&r, "hello:2", &other, true);
    let r = request(d.addr(), "GET", "/v2/library/hello/manifests/3", &[]);
    assert_eq!(r.status, 502, "not imported, and offline: {r}");
    let r = request(d.addr(), "GET", "/v2/library/hello/tags/list", &[]);
    assert_eq!(r.json()["tags"], serde_json::json!(["1", "2"]), "{r}");
}

#[test]
fn bad_options_exit_64() {
    let dir = tempdir("nl-opts");
    let missing_config = dir.path().join("nope.toml");
    let bad_config = dir.path().join("bad.toml");
    std::fs::write(&bad_config, "this is = = not toml").unwrap();
    let cases: Vec<Vec<std::ffi::OsString>> = vec![
        vec!["serve".into(), "--no-such-flag".into()],
        vec!["serve".into(), "--listen".into(), "not-an-address".into()],
        vec!["serve".into(), "--config".into(), missing_config.into()],
        vec!["serve".into(), "--config".into(), bad_config.into()],
        vec!["no-such-command".into()],
    ];
    for args in cases {
        let out = output_timeout(
            std::process::Command::new(bin())
                .args(&args)
                .arg("--state-dir")
                .arg(dir.path().join("state")),
            Duration::from_secs(20),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(!stderr.trim().is_empty(), "{args:?}: no reason given");
    }
}
