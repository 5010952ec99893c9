//! Bad input: every hostile request gets a clear 4xx, the daemon stays up,
//! nothing outside the cache is read, and bad imports change nothing. The
//! hostile requests go to the daemon in process, on port 0; the crash and
//! restart checks run the binary.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A daemon holding one small image, `docker.io/library/hello:1`, with a
/// secret planted beside its state directory where a traversal would land.
struct Fixture {
    daemon: Daemon,
    image: TestImage,
    secret: Vec<u8>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

fn fixture(extra: &[&str]) -> Fixture {
    let root = tempdir("nl-hostile");
    let layouts = tempdir("nl-layout");
    let state = root.path().join("state");
    fs::create_dir_all(&state).expect("mkdir");
    let image = busybox_layout(&layouts.path().join("hello"), "1", "hello");
    import_ok(&state, &image, "docker.io/library/hello:1");
    // Bytes that would be served if a path escaped the cache.
    let secret = b"TOP-SECRET-CANARY".to_vec();
    for rel in ["secret", "blobs/sha256/secret", "state/../secret"] {
        let p = root.path().join(rel);
        if let Some(dir) = p.parent() {
            let _ = fs::create_dir_all(dir);
        }
        let _ = fs::write(p, &secret);
    }
    let daemon = Daemon::builder()
        .state_dir(&state)
        .args(extra)
        .in_process()
        .start();
    Fixture {
        daemon,
        image,
        secret,
        _dirs: (root, layouts),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn traversal_and_malformed_names_get_spec_errors() {
    let mut f = fixture(&[]);
    let addr = f.daemon.addr();
    let layer = f.image.layer_digests[0].clone();
    let cases: &[(&str, u16, &str)] = &[
        ("/v2/../../secret/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/%2e%2e/%2e%2e/secret/manifests/1", 400, "NAME_INVALID"),
        (
            "/v2/library/hello/manifests/..%2F..%2Fsecret",
            404,
            "MANIFEST_UNKNOWN",
        ),
        // A `/` in the digest position leaves no route to match.
        (
            "/v2/library/hello/blobs/sha256:../../secret",
            404,
            "UNSUPPORTED",
        ),
        (
            "/v2/library/hello/blobs/..%2F..%2Fsecret",
            400,
            "DIGEST_INVALID",
        ),
        (
            "/v2/library/hello/blobs/sha256:secret",
            400,
            "DIGEST_INVALID",
        ),
        (
            "/v2/library/hello/manifests/sha256:zz",
            400,
            "DIGEST_INVALID",
        ),
        (
            "/v2/library/hello/manifests/md5:d41d8cd98f00b204e9800998ecf8427e",
            400,
            "DIGEST_INVALID",
        ),
        ("/v2/Library/Hello/manifests/1", 400, "NAME_INVALID"),
        ("/v2/library//hello/manifests/1", 400, "NAME_INVALID"),
        ("/v2/_manifests/manifests/1", 400, "NAME_INVALID"),
        ("/v2/library/hello/manifests/-bad", 404, "MANIFEST_UNKNOWN"),
        (
            "/v2/library/hello/manifests/.hidden",
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/library/hello/manifests/1?ns=..%2F..%2Fsecret",
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/library/hello/manifests/1?ns=a%00b",
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/library/hello/tags/list?n=-3",
            400,
            "PAGINATION_NUMBER_INVALID",
        ),
        ("/v2/library/hello/manifests/a/b", 404, "UNSUPPORTED"),
        ("/secret", 404, "UNSUPPORTED"),
    ];
    for (path, status, code) in cases {
        let r = request(addr, "GET", path, &[]);
        assert_eq!(r.status, *status, "GET {path}:\n{r}");
        assert_eq!(r.error_code().as_deref(), Some(*code), "GET {path}:\n{r}");
        assert!(!contains(&r.raw, &f.secret), "GET {path} leaked the canary");
    }
    // A blob by a digest that is valid but names the layer through a bogus repo
    // still validates the name first.
    let r = request(addr, "GET", &format!("/v2/../blobs/{layer}"), &[]);
    assert_eq!(r.status, 400, "{r}");

    let long = vec!["a"; 200].join("/");
    let r = request(addr, "GET", &format!("/v2/{long}/manifests/1"), &[]);
    assert_eq!(
        (r.status, r.error_code().as_deref()),
        (400, Some("NAME_INVALID")),
        "{r}"
    );
    let long_tag = "t".repeat(129);
    let r = request(
        addr,
        "GET",
        &format!("/v2/library/hello/manifests/{long_tag}"),
        &[],
    );
    assert_eq!(r.status, 404, "{r}");
    assert!(f.daemon.is_alive(), "daemon died");
}

#[test]
fn non_utf8_paths_and_garbage_requests_are_refused() {
    let mut f = fixture(&[]);
    let addr = f.daemon.addr();
    let hostile: &[&[u8]] = &[
        b"GET /v2/\xff\xfe/manifests/1 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v2/library/hello/manifests/1\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage-tls-hello\r\n\r\n",
        b"GET http://evil.example/v2/../../secret HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost x\r\n\r\n",
        b"GET /v2/ HTTP/9.9\r\nHost: x\r\n\r\n",
    ];
    for req in hostile {
        let r = raw(addr, req);
        assert!(
            r.status == 0 || (400..500).contains(&r.status),
            "{:?} got {r}",
            String::from_utf8_lossy(req)
        );
        assert!(!contains(&r.raw, &f.secret));
    }
    assert!(f.daemon.is_alive(), "daemon died");
    assert_eq!(f.daemon.get("/v2/").status, 200);
}

#[test]
fn huge_headers_get_431_and_the_daemon_stays_up() {
    let mut f = fixture(&[]);
    let addr = f.daemon.addr();
    let big = "x".repeat(200 << 10);
    let r = request(addr, "GET", "/v2/", &[("X-Big", &big)]);
    assert_eq!(r.status, 431, "{r}");
    let many: Vec<(String, String)> = (0..2000)
        .map(|i| (format!("X-H{i}"), "v".repeat(40)))
        .collect();
    let refs: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let r = request(addr, "GET", "/v2/", &refs);
    assert!(r.status == 431 || r.status == 400, "{r}");
    assert!(f.daemon.is_alive());
    assert_eq!(f.daemon.get("/v2/").status, 200);
}

#[test]
fn slowloris_connections_are_closed_and_do_not_stall_others() {
    let f = fixture(&["--header-timeout", "1"]);
    let addr = f.daemon.addr();
    // 50 connections that each send half a request head and then nothing.
    let mut slow: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .expect("write");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            s
        })
        .collect();
    // Others are served meanwhile.
    let started = Instant::now();
    let r = request(addr, "GET", "/v2/library/hello/manifests/1", &[]);
    assert_eq!(r.status, 200, "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a normal request was stalled"
    );
    // And the slow ones are cut off after about the header timeout.
    for s in &mut slow {
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "slow connections were held for {waited:?} with a 1 s header timeout"
    );
    // An idle connection that sends nothing at all is closed too.
    let mut idle = TcpStream::connect(addr).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let t = Instant::now();
    let mut buf = Vec::new();
    let _ = idle.read_to_end(&mut buf);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "idle connection held {:?}",
        t.elapsed()
    );
}

#[test]
fn read_only_refusals_write_nothing() {
    let mut f = fixture(&[]);
    let addr = f.daemon.addr();
    let before = list_files(f.daemon.state_dir());
    let m = f.image.manifest_digest.clone();
    let layer = f.image.layer_digests[0].clone();
    let attempts: Vec<(&str, String, Vec<u8>)> = vec![
        ("POST", "/v2/library/hello/blobs/uploads/".into(), vec![]),
        (
            "POST",
            format!("/v2/library/evil/blobs/uploads/?digest={layer}"),
            b"evil".to_vec(),
        ),
        (
            "PATCH",
            "/v2/library/hello/blobs/uploads/123".into(),
            b"evil".to_vec(),
        ),
        (
            "PUT",
            "/v2/library/hello/manifests/1".into(),
            b"{\"schemaVersion\":2}".to_vec(),
        ),
        (
            "PUT",
            "/v2/library/hello/manifests/evil".into(),
            b"{}".to_vec(),
        ),
        ("DELETE", format!("/v2/library/hello/manifests/{m}"), vec![]),
        ("DELETE", format!("/v2/library/hello/blobs/{layer}"), vec![]),
        ("OPTIONS", "/v2/".into(), vec![]),
    ];
    for (method, path, body) in &attempts {
        let r = request_body(addr, method, path, &[], body);
        assert_eq!(r.status, 405, "{method} {path}:\n{r}");
        assert_eq!(r.error_code().as_deref(), Some("UNSUPPORTED"), "{r}");
        assert_eq!(r.header("allow").as_deref(), Some("GET, HEAD"), "{r}");
    }
    assert_eq!(
        list_files(f.daemon.state_dir()),
        before,
        "a refused write changed the cache"
    );
    let r = request(addr, "GET", "/v2/library/hello/manifests/1", &[]);
    assert_eq!(r.header("docker-content-digest"), Some(m));
    assert!(f.daemon.is_alive());
}

fn state_snapshot(state: &Path) -> Vec<std::path::PathBuf> {
    list_files(state)
}

#[test]
fn bad_layouts_are_refused_naming_the_blob_and_change_nothing() {
    let state = tempdir("nl-import-state");
    let layouts = tempdir("nl-import");
    let good = busybox_layout(&layouts.path().join("good"), "1", "ok");
    import_ok(state.path(), &good, "docker.io/library/good:1");
    let before = state_snapshot(state.path());

    // A corrupt layer: refused, naming it.
    let bad = busybox_layout(&layouts.path().join("bad"), "1", "bad");
    bad.corrupt_layer();
    let out = import(state.path(), &bad.dir, "docker.io/library/bad:1");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&bad.layer_digests[0]),
        "error must name the blob: {err}"
    );

    // A missing blob.
    let missing = busybox_layout(&layouts.path().join("missing"), "1", "m");
    fs::remove_file(missing.blob_path(&missing.config_digest)).expect("rm");
    let out = import(state.path(), &missing.dir, "docker.io/library/missing:1");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&missing.config_digest), "{err}");

    // A manifest whose bytes do not match its descriptor.
    let lying = busybox_layout(&layouts.path().join("lying"), "1", "l");
    lying.corrupt_blob(&lying.manifest_digest);
    let out = import(state.path(), &lying.dir, "docker.io/library/lying:1");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&lying.manifest_digest), "{err}");

    // Not a layout at all.
    let out = import(state.path(), layouts.path(), "docker.io/library/x:1");
    assert_eq!(out.status.code(), Some(1));

    // A bad reference is a usage error.
    let out = import(state.path(), &good.dir, "Not/A/Valid:Ref:");
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(
        state_snapshot(state.path()),
        before,
        "a refused import changed the cache"
    );
}

#[test]
fn a_killed_import_leaves_nothing_that_is_served() {
    let state = tempdir("nl-kill-state");
    let layouts = tempdir("nl-kill");
    let image = blob_layout(&layouts.path().join("big"), "1", 256 << 20);
    let mut child = Command::new(bin())
        .args(["import", "--state-dir"])
        .arg(state.path())
        .arg(&image.dir)
        .arg("docker.io/library/big:1")
        .spawn()
        .expect("spawn import");
    // Kill it mid-write: wait until its temp file exists.
    let tmp = state.path().join("tmp");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0) == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("kill -9");
    let _ = child.wait();
    // Offline: a miss is answered from the cache alone.
    let mut daemon = Daemon::start_in(state.path(), &["--offline"]);
    assert_eq!(
        fs::read_dir(&tmp).expect("tmp").count(),
        0,
        "leftovers of the killed import must be cleaned on start"
    );
    let layer = &image.layer_digests[0];
    let r = request(
        daemon.addr(),
        "HEAD",
        &format!("/v2/library/big/blobs/{layer}"),
        &[],
    );
    assert_eq!(
        r.status, 502,
        "a blob of an unfinished import is served:\n{r}"
    );
    let r = request(daemon.addr(), "GET", "/v2/library/big/manifests/1", &[]);
    assert_eq!(r.status, 502, "{r}");
    assert!(r.reason.contains("offline"), "{r}");
    assert!(daemon.is_alive());
}

#[test]
fn bad_options_and_config_files_exit_64_with_one_line() {
    let dir = tempdir("nl-config");
    let unknown_key = dir.path().join("unknown.toml");
    fs::write(&unknown_key, "lisen = \"127.0.0.1:1\"\n").expect("write");
    let bad_toml = dir.path().join("bad.toml");
    fs::write(&bad_toml, "listen = [\n").expect("write");
    let state = dir.path().join("state");
    let state = state.to_str().expect("utf8");
    let cases: Vec<Vec<String>> = vec![
        vec!["serve".into(), "--bogus".into()],
        vec!["serve".into(), "--listen".into(), "not-an-address".into()],
        vec![
            "serve".into(),
            "--config".into(),
            "/nonexistent/nixery.toml".into(),
        ],
        vec![
            "serve".into(),
            "--config".into(),
            unknown_key.display().to_string(),
        ],
        vec![
            "serve".into(),
            "--config".into(),
            bad_toml.display().to_string(),
        ],
        vec![
            "serve".into(),
            "--state-dir".into(),
            state.into(),
            "--default-registry".into(),
            "NOT A HOST".into(),
        ],
        vec![
            "serve".into(),
            "--state-dir".into(),
            state.into(),
            "--header-timeout".into(),
            "0".into(),
        ],
        vec!["frobnicate".into()],
        vec![],
    ];
    for args in &cases {
        let out = Command::new(bin()).args(args).output().expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
    }
    // --help documents every option and succeeds.
    let out = Command::new(bin())
        .args(["serve", "--help"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--listen",
        "--state-dir",
        "--config",
        "--default-registry",
        "--header-timeout",
        "--max-connections",
    ] {
        assert!(help.contains(opt), "--help lacks {opt}:\n{help}");
    }
}
