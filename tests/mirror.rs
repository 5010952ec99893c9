//! The pull-through mirror (issue #4) end to end, with real upstreams:
//! Debian's docker-registry in plain HTTP, TLS, htpasswd and token-auth
//! setups (images pushed with skopeo), a misbehaving upstream written for
//! these tests, and a real containerd pulling through a `hosts.toml` mirror
//! entry. Each test starts its own upstreams and daemon.
//!
//! "Exactly one upstream GET" is read from the upstream's own access log,
//! never from the daemon's log.

mod common;

use std::fs;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use serde_json::json;

const USER: &str = "mirror-user";
/// Distinctive, so a leak into the daemon's log is easy to spot.
const PASSWORD: &str = "pw-7Qx9-never-logged";

/// A loopback address nothing listens on: as a `hosts.toml` `server`, it
/// makes containerd's fallback fail, so a pull can only succeed through the
/// mirror.
fn dead_server() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

fn manifest_path(repo: &str, reference: &str, host: Option<&str>) -> String {
    match host {
        Some(h) => format!("/v2/{repo}/manifests/{reference}?{}", ns(h)),
        None => format!("/v2/{repo}/manifests/{reference}"),
    }
}

fn blob_path(repo: &str, digest: &str, host: Option<&str>) -> String {
    match host {
        Some(h) => format!("/v2/{repo}/blobs/{digest}?{}", ns(h)),
        None => format!("/v2/{repo}/blobs/{digest}"),
    }
}

fn get_manifest(daemon: &Daemon, path: &str) -> Response {
    get(daemon.addr(), path, &[("Accept", ACCEPT_MANIFESTS)])
}

/// The daemon serves `image` (manifest by tag, every blob) under `repo`,
/// byte for byte.
fn assert_serves_image(daemon: &Daemon, repo: &str, image: &TestImage, host: Option<&str>) {
    let path = manifest_path(repo, &image.tag, host);
    let m = get_manifest(daemon, &path);
    assert!(
        m.status == 200 && m.complete() && m.body == image.manifest_bytes,
        "GET {path}: expected the upstream's {} bytes of {}, got {}",
        image.manifest_bytes.len(),
        image.manifest_digest,
        m.summary()
    );
    for digest in [&image.config_digest]
        .into_iter()
        .chain(&image.layer_digests)
    {
        let path = blob_path(repo, digest, host);
        let b = get(daemon.addr(), &path, &[]);
        assert!(
            b.status == 200 && b.complete() && b.body == image.blob(digest),
            "GET {path}: expected {} bytes, got {}",
            image.blob(digest).len(),
            Response {
                body: b.body[..b.body.len().min(64)].to_vec(),
                ..b
            }
            .summary()
        );
    }
}

fn assert_alive(daemon: &mut Daemon) {
    assert!(daemon.is_alive(), "the daemon exited");
    let r = get(daemon.addr(), "/v2/", &[]);
    assert_eq!(
        r.status,
        200,
        "GET /v2/ after the failures: {}",
        r.summary()
    );
}

// ---------------------------------------------------------------------------
// The harness itself
// ---------------------------------------------------------------------------

/// The fake upstream and the streaming client behave as the other tests
/// assume, so a failure elsewhere points at the daemon.
#[test]
fn harness_fake_upstream_and_client() {
    let body = blob_layout_bytes(300_000);
    let b2 = body.clone();
    let fake = FakeUpstream::start(move |req| match req.path() {
        "/full" => Reply::ok("application/octet-stream", b2.clone(), None),
        "/short" => Reply::Truncated {
            headers: Vec::new(),
            body: b2[..1000].to_vec(),
            claimed: b2.len(),
            pace: None,
        },
        "/hang" => Reply::Hang,
        "/redirect" => Reply::redirect("/full"),
        _ => Reply::status(500),
    });
    let expected = Arc::new(body);
    let full = fetch(
        fake.addr(),
        "GET",
        "/full",
        &[],
        Body::Expect(expected.clone()),
        Duration::from_secs(10),
    );
    assert!(full.ok_and_matches(300_000), "{}", full.summary());
    let short = fetch(
        fake.addr(),
        "GET",
        "/short",
        &[],
        Body::Expect(expected.clone()),
        Duration::from_secs(10),
    );
    assert!(
        short.status == 200 && !short.complete() && short.received == 1000,
        "{}",
        short.summary()
    );
    let hang = fetch(
        fake.addr(),
        "GET",
        "/hang",
        &[],
        Body::Keep,
        Duration::from_secs(1),
    );
    assert!(
        hang.status == 0 && hang.error.is_some() && hang.elapsed < Duration::from_secs(3),
        "{}",
        hang.summary()
    );
    let head = fetch(
        fake.addr(),
        "HEAD",
        "/full",
        &[],
        Body::Keep,
        Duration::from_secs(5),
    );
    assert!(
        head.status == 200
            && head.complete()
            && head.header("content-length").as_deref() == Some("300000"),
        "{}",
        head.summary()
    );
    assert_eq!(get(fake.addr(), "/redirect", &[]).status, 307);
    assert_eq!(fake.count("GET", "/full"), 1, "{}", fake.request_text());
    assert_eq!(fake.count("HEAD", "/full"), 1, "{}", fake.request_text());
}

// ---------------------------------------------------------------------------
// 1. Plain HTTP upstream, containerd through the mirror
// ---------------------------------------------------------------------------

#[test]
fn containerd_pulls_and_runs_through_mirror_from_plain_http_upstream() {
    const MSG: &str = "hello-through-the-mirror";
    let mut reg = DockerRegistry::start();
    let dir = tempdir("mirror-plain");
    let image = busybox_layout(&dir.path().join("img"), "1", MSG);
    reg.push(&image, "library/hello:1");
    let daemon = Daemon::builder()
        .args(["--upstream".into(), reg.upstream_arg()])
        .start();

    let ctrd = Containerd::start();
    let host = reg.host_port();
    ctrd.hosts_dir_with_server(&host, &dead_server(), &daemon.url());
    let reference = format!("{host}/library/hello:1");
    let stdout = ctrd.pull_and_run(&reference, &image.manifest_digest);
    assert!(stdout.contains(MSG), "ctr run output: {stdout:?}");

    // The daemon fetched each blob from the upstream exactly once.
    for digest in [&image.config_digest, &image.layer_digests[0]] {
        assert_eq!(
            reg.blob_gets(digest),
            1,
            "upstream GETs of {digest}; access log:\n{}",
            reg.access_text()
        );
    }

    // With the upstream gone, the daemon still has it all.
    reg.stop();
    for digest in [
        &image.manifest_digest,
        &image.config_digest,
        &image.layer_digests[0],
    ] {
        assert!(
            cached_blob(daemon.state_dir(), digest).is_file(),
            "{digest} is not in the daemon's cache; cached: {:?}",
            cached_digests(daemon.state_dir())
        );
    }
    assert_serves_image(&daemon, "library/hello", &image, Some(&host));
    let by_digest = get_manifest(
        &daemon,
        &manifest_path("library/hello", &image.manifest_digest, Some(&host)),
    );
    assert!(
        by_digest.status == 200 && by_digest.body == image.manifest_bytes,
        "manifest by digest with the upstream stopped: {}",
        by_digest.summary()
    );
}

// ---------------------------------------------------------------------------
// 2. Single flight: 16 concurrent cold GETs, one upstream GET
// ---------------------------------------------------------------------------

#[test]
fn concurrent_cold_blob_gets_cause_one_upstream_get() {
    const CLIENTS: usize = 16;
    const SIZE: u64 = 64 << 20;
    let reg = DockerRegistry::start();
    let dir = tempdir("mirror-big");
    let image = blob_layout(&dir.path().join("img"), "1", SIZE);
    reg.push(&image, "library/big:1");
    let layer = image.layer_digests[0].clone();
    let expected = Arc::new(fs::read(image.blob_path(&layer)).unwrap());
    let daemon = Daemon::builder().args(reg.mirror_args()).start();

    // As a client does: the manifest first (no ns: the default registry).
    let m = get_manifest(&daemon, "/v2/library/big/manifests/1");
    assert!(
        m.status == 200 && m.body == image.manifest_bytes,
        "manifest: {}",
        m.summary()
    );

    let path = format!("/v2/library/big/blobs/{layer}");
    let results = fetch_together(
        daemon.addr(),
        &path,
        &expected,
        CLIENTS,
        Duration::from_secs(120),
    );
    for (i, r) in results.iter().enumerate() {
        assert!(
            r.ok_and_matches(SIZE),
            "client {i} of {CLIENTS}: {}",
            r.summary()
        );
    }
    assert_eq!(
        reg.blob_gets(&layer),
        1,
        "upstream GETs of the blob for {CLIENTS} concurrent cold GETs; access log:\n{}",
        reg.access_text()
    );
    let cached = cached_blob(daemon.state_dir(), &layer);
    wait_cached(daemon.state_dir(), &layer, Duration::from_secs(10));
    assert_eq!(
        fs::metadata(&cached).map(|m| m.len()).ok(),
        Some(SIZE),
        "{} after the downloads",
        cached.display()
    );
}

// ---------------------------------------------------------------------------
// 3. Upstream stopped: stale tags, fresh containerd; --offline
// ---------------------------------------------------------------------------

#[test]
fn cached_images_survive_upstream_loss_and_offline_mode() {
    const MSG: &str = "hello-while-upstream-is-down";
    let mut reg = DockerRegistry::start();
    let dir = tempdir("mirror-offline");
    let image = busybox_layout(&dir.path().join("img"), "1", MSG);
    reg.push(&image, "library/offline:1");
    let host = reg.host_port();
    let reference = format!("{host}/library/offline:1");
    let state = dir.path().join("state");

    let daemon = Daemon::builder()
        .state_dir(&state)
        .args([
            "--upstream".into(),
            reg.upstream_arg(),
            "--tag-ttl".into(),
            "1".into(),
            "--upstream-timeout".into(),
            "2".into(),
        ])
        .start();
    {
        let ctrd = Containerd::start();
        ctrd.hosts_dir_with_server(&host, &dead_server(), &daemon.url());
        let stdout = ctrd.pull_and_run(&reference, &image.manifest_digest);
        assert!(stdout.contains(MSG), "ctr run output: {stdout:?}");
    }

    // Upstream gone and the tag past its TTL: the revalidation fails and the
    // cached digest is served (stale-if-error) to a brand-new containerd.
    reg.stop();
    thread::sleep(Duration::from_millis(1500));
    let head = fetch(
        daemon.addr(),
        "HEAD",
        &manifest_path("library/offline", "1", Some(&host)),
        &[("Accept", ACCEPT_MANIFESTS)],
        Body::Keep,
        Duration::from_secs(20),
    );
    assert!(
        head.status == 200
            && head.header("docker-content-digest").as_deref()
                == Some(image.manifest_digest.as_str())
            && head.elapsed < Duration::from_secs(5),
        "HEAD by tag with the upstream stopped: {}",
        head.summary()
    );
    {
        let ctrd = Containerd::start();
        ctrd.hosts_dir_with_server(&host, &dead_server(), &daemon.url());
        let stdout = ctrd.pull_and_run(&reference, &image.manifest_digest);
        assert!(stdout.contains(MSG), "ctr run output: {stdout:?}");
    }
    daemon.stop();

    // --offline: the upstream URL now points at a recorder, which must see
    // nothing at all.
    let recorder = FakeUpstream::start(|_| Reply::status(500));
    let offline = Daemon::builder()
        .state_dir(&state)
        .args([
            "--offline".into(),
            "--upstream".into(),
            format!("{host}={}", recorder.url()),
        ])
        .start();
    assert_serves_image(&offline, "library/offline", &image, Some(&host));
    let misses = [
        manifest_path("library/offline", "2", Some(&host)),
        manifest_path("library/never-pulled", "1", Some(&host)),
        blob_path(
            "library/offline",
            &format!("sha256:{}", "ab".repeat(32)),
            Some(&host),
        ),
    ];
    for path in &misses {
        let r = fetch(
            offline.addr(),
            "GET",
            path,
            &[("Accept", ACCEPT_MANIFESTS)],
            Body::Keep,
            Duration::from_secs(10),
        );
        assert!(
            r.status == 502 && r.elapsed < Duration::from_secs(2) && r.reason.contains("offline"),
            "offline miss GET {path}: expected a 502 saying offline within 2 s, got {}",
            r.summary()
        );
    }
    {
        let ctrd = Containerd::start();
        ctrd.hosts_dir_with_server(&host, &dead_server(), &offline.url());
        let stdout = ctrd.pull_and_run(&reference, &image.manifest_digest);
        assert!(stdout.contains(MSG), "ctr run output: {stdout:?}");
    }
    assert!(
        recorder.requests().is_empty(),
        "--offline contacted the upstream:\n{}",
        recorder.request_text()
    );
}

// ---------------------------------------------------------------------------
// 4. A misbehaving upstream
// ---------------------------------------------------------------------------

#[test]
fn misbehaving_upstream_is_never_cached_and_fails_loudly() {
    const MIB: usize = 1 << 20;
    let wrong = blob_layout_bytes(2 * MIB as u64 + 1);
    let truncated = blob_layout_bytes(2 * MIB as u64 + 2);
    let hanging = blob_layout_bytes(1003);
    let failing = blob_layout_bytes(1004);
    let mut content = Content::default();
    let config = serde_json::to_vec(&json!({
        "architecture": host_arch(),
        "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [] },
    }))
    .unwrap();
    let config_digest = content.add_blob(config.clone());
    let d = |b: &[u8]| sha256_digest(b);
    let (wrong_d, truncated_d, hanging_d, failing_d) =
        (d(&wrong), d(&truncated), d(&hanging), d(&failing));
    let layers: Vec<_> = [&wrong, &truncated, &hanging, &failing]
        .iter()
        .map(|b| json!({ "mediaType": OCI_LAYER_TAR, "digest": d(b.as_slice()), "size": b.len() }))
        .collect();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len() },
        "layers": layers,
    }))
    .unwrap();
    content.add_manifest("library/bad", "1", OCI_MANIFEST, manifest.clone());

    // Same length as the real blob, 16 bytes flipped in the middle.
    let mut wrong_served = wrong.clone();
    for b in &mut wrong_served[MIB..MIB + 16] {
        *b ^= 0xff;
    }
    // 0: normal; 1: the tag hangs; 2: the tag answers 500.
    let tag_mode = Arc::new(AtomicUsize::new(0));
    let mode = tag_mode.clone();
    let (w, t, h, f) = (
        wrong_d.clone(),
        truncated_d.clone(),
        hanging_d.clone(),
        failing_d.clone(),
    );
    let truncated_half = truncated[..MIB].to_vec();
    let truncated_len = truncated.len();
    let pace = Duration::from_millis(5);
    let fake = FakeUpstream::start(move |req| {
        let p = req.path();
        let blob = |digest: &str| p.ends_with(&format!("/blobs/{digest}"));
        if blob(&w) {
            return Reply::ok("application/octet-stream", wrong_served.clone(), Some(&w))
                .paced(pace);
        }
        if blob(&t) {
            return Reply::Truncated {
                headers: vec![
                    ("Content-Type".into(), "application/octet-stream".into()),
                    ("Docker-Content-Digest".into(), t.clone()),
                ],
                body: truncated_half.clone(),
                claimed: truncated_len,
                pace: Some(pace),
            };
        }
        if blob(&h) {
            return Reply::Hang;
        }
        if blob(&f) {
            return Reply::status(500);
        }
        match p {
            "/v2/library/err/manifests/1" => return Reply::status(500),
            "/v2/library/hang/manifests/1" => return Reply::Hang,
            "/v2/library/bad/manifests/1" => match mode.load(Ordering::SeqCst) {
                1 => return Reply::Hang,
                2 => return Reply::status(503),
                _ => {}
            },
            _ => {}
        }
        content.reply(req)
    });
    let mut daemon = Daemon::builder()
        .args(fake.mirror_args())
        .args(["--upstream-timeout", "2", "--tag-ttl", "1"])
        .start();
    let state = daemon.state_dir().to_path_buf();
    let addr = daemon.addr();

    // Every scenario runs; the failures are reported together at the end.
    let mut failures: Vec<String> = Vec::new();
    macro_rules! expect {
        ($cond:expr, $($arg:tt)+) => {
            if !$cond {
                let message = format!($($arg)+);
                eprintln!("FAILED: {message}");
                failures.push(message);
            }
        };
    }

    let m = get_manifest(&daemon, "/v2/library/bad/manifests/1");
    assert!(
        m.status == 200 && m.body == manifest,
        "manifest: {}",
        m.summary()
    );

    // Each bad blob: the client's download fails, nothing is cached, the
    // daemon stays up, and the next request goes upstream again.
    let cases: [(&str, &String, &Vec<u8>, usize); 4] = [
        ("wrong bytes", &wrong_d, &wrong, 3),
        ("truncated body", &truncated_d, &truncated, 3),
        ("upstream 500", &failing_d, &failing, 1),
        ("upstream hangs", &hanging_d, &hanging, 1),
    ];
    for (what, digest, bytes, clients) in cases {
        let path = format!("/v2/library/bad/blobs/{digest}");
        let expected = Arc::new(bytes.clone());
        for round in 1..=2 {
            let before = fake.count("GET", &format!("/blobs/{digest}"));
            let results = fetch_together(addr, &path, &expected, clients, Duration::from_secs(30));
            for (i, r) in results.iter().enumerate() {
                expect!(
                    !(r.status == 200 && r.complete()),
                    "{what}, round {round}, client {i}: GET {path}: the client got a complete 200 response: {}",
                    r.summary()
                );
                // Upstream timeout 2 s; allow one retry and slack.
                expect!(
                    r.elapsed < Duration::from_secs(10),
                    "{what}, round {round}, client {i}: took {:?}: {}",
                    r.elapsed,
                    r.summary()
                );
            }
            thread::sleep(Duration::from_millis(200));
            expect!(
                !cached_blob(&state, digest).exists(),
                "{what}: {digest} entered the cache (round {round})"
            );
            assert_alive(&mut daemon);
            let after = fake.count("GET", &format!("/blobs/{digest}"));
            expect!(
                after > before,
                "{what}, round {round}: the upstream saw no new GET of {digest} ({before} before, {after} after); requests:\n{}",
                fake.request_text()
            );
        }
    }

    // Manifests the daemon cannot serve: a quick 502 (containerd moves on
    // to its next host, and reports this reason rather than "not found").
    for (what, repo, limit) in [
        ("upstream 500", "library/err", 3),
        ("upstream hangs", "library/hang", 6),
    ] {
        let r = get_manifest(&daemon, &format!("/v2/{repo}/manifests/1"));
        expect!(
            r.status == 502 && r.elapsed < Duration::from_secs(limit),
            "uncached manifest, {what}: expected 502 within {limit} s, got {}",
            r.summary()
        );
    }

    // Stale-if-error: the cached tag, past its TTL, while the upstream hangs
    // and then answers 503.
    for (mode, what, limit) in [(1, "hangs", 6), (2, "answers 503", 3)] {
        tag_mode.store(mode, Ordering::SeqCst);
        thread::sleep(Duration::from_millis(1200));
        let before = fake.count("HEAD", "/bad/manifests/1") + fake.count("GET", "/bad/manifests/1");
        let r = get_manifest(&daemon, "/v2/library/bad/manifests/1");
        expect!(
            r.status == 200 && r.body == manifest && r.elapsed < Duration::from_secs(limit),
            "cached tag while the upstream {what}: expected the cached manifest within {limit} s, got {}",
            r.summary()
        );
        let after = fake.count("HEAD", "/bad/manifests/1") + fake.count("GET", "/bad/manifests/1");
        expect!(
            after > before,
            "tag past --tag-ttl 1 was not revalidated while the upstream {what}; requests:\n{}",
            fake.request_text()
        );
    }
    tag_mode.store(0, Ordering::SeqCst);

    assert_alive(&mut daemon);
    let cached = cached_digests(&state);
    for digest in [&wrong_d, &truncated_d, &hanging_d, &failing_d] {
        expect!(!cached.contains(digest), "{digest} is cached: {cached:?}");
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------
// 5. TLS upstream with a CA the test generates
// ---------------------------------------------------------------------------

#[test]
fn tls_upstream_needs_its_ca() {
    const NAME: &str = "myreg.test";
    let dir = tempdir("mirror-tls");
    let pki = tls_pki(&dir.path().join("pki"), &[NAME]);
    let image = busybox_layout(&dir.path().join("img"), "1", "hello-over-tls");
    let reg = DockerRegistry::seeded(
        RegistryOpts {
            tls: Some((pki.server_cert.clone(), pki.server_key.clone())),
            ..RegistryOpts::default()
        },
        &[(&image, "library/tls:1")],
    );
    // The fixture: skopeo trusts the registry with the CA, not without.
    let src = format!("docker://{}/library/tls:1", reg.host_port());
    let ca_dir = pki.ca_dir.to_str().unwrap();
    assert_success(
        "skopeo inspect with the test CA",
        &skopeo(&["inspect", "--raw", "--cert-dir", ca_dir, &src]),
    );
    assert!(
        !skopeo(&["inspect", "--raw", &src]).status.success(),
        "skopeo trusted the test registry without its CA"
    );

    let upstream = format!("{NAME}={}", reg.url());
    let path = manifest_path("library/tls", "1", Some(NAME));

    let served_before = reg.count("GET", "/library/tls/manifests/1");
    let without = Daemon::builder()
        .isolated()
        .args(["--upstream".into(), upstream.clone()])
        .start();
    let r = get_manifest(&without, &path);
    assert!(
        matches!(r.status, 404 | 500..=599) && r.elapsed < Duration::from_secs(5),
        "without the CA: expected a quick 404/5xx, got {}",
        r.summary()
    );
    assert_eq!(
        reg.count("GET", "/library/tls/manifests/1"),
        served_before,
        "the registry answered a manifest GET over an untrusted connection:\n{}",
        reg.access_text()
    );

    let ca = format!("{NAME}={}", pki.ca_cert.display());
    let with = Daemon::builder()
        .isolated()
        .args([
            "--upstream".into(),
            upstream.clone(),
            "--upstream-ca".into(),
            ca,
        ])
        .start();
    assert_serves_image(&with, "library/tls", &image, Some(NAME));

    // containerd through the mirror: `server` cannot resolve, so only the
    // daemon can answer.
    let ctrd = Containerd::start();
    ctrd.hosts_dir(NAME, &with.url());
    let stdout = ctrd.pull_and_run(&format!("{NAME}/library/tls:1"), &image.manifest_digest);
    assert!(stdout.contains("hello-over-tls"), "output: {stdout:?}");

    // The system store honours SSL_CERT_FILE.
    let ca_file = pki.ca_cert.to_str().unwrap().to_owned();
    let via_env = Daemon::builder()
        .isolated()
        .args(["--upstream".into(), upstream])
        .env("SSL_CERT_FILE", &ca_file)
        .start();
    assert_serves_image(&via_env, "library/tls", &image, Some(NAME));
}

// ---------------------------------------------------------------------------
// 6. htpasswd (Basic) auth
// ---------------------------------------------------------------------------

#[test]
fn basic_auth_upstream_with_flag_and_docker_config() {
    let dir = tempdir("mirror-basic");
    let htpasswd = dir.path().join("htpasswd");
    htpasswd_file(&htpasswd, USER, PASSWORD);
    let image = busybox_layout(&dir.path().join("img"), "1", "hello-with-basic-auth");
    let reg = DockerRegistry::seeded(
        RegistryOpts {
            htpasswd: Some(htpasswd),
            ..RegistryOpts::default()
        },
        &[(&image, "library/basic:1")],
    );
    let src = format!("docker://{}/library/basic:1", reg.host_port());
    let creds = format!("{USER}:{PASSWORD}");
    assert_success(
        "skopeo inspect with credentials",
        &skopeo_inspect(&src, Some(&creds)),
    );
    assert!(
        !skopeo_inspect(&src, None).status.success(),
        "the htpasswd registry let skopeo in without credentials"
    );

    let host = reg.host_port();
    let base = reg.mirror_args();
    let d = Daemon::builder()
        .isolated()
        .args(&base)
        .args(["--credential".into(), format!("{host}={creds}")])
        .start();
    assert_serves_image(&d, "library/basic", &image, None);
    assert_no_secret(d.log());

    let d = Daemon::builder().isolated().args(&base).start();
    assert_fails_quickly(&d, "/v2/library/basic/manifests/1", "no credentials");

    let d = Daemon::builder()
        .isolated()
        .args(&base)
        .args(["--credential".into(), format!("{host}={USER}:wrong")])
        .start();
    assert_fails_quickly(&d, "/v2/library/basic/manifests/1", "wrong password");

    let docker_config = docker_config_dir(&dir.path().join("docker"), &host, USER, PASSWORD);
    let docker_config = docker_config.to_str().unwrap().to_owned();
    let d = Daemon::builder()
        .isolated()
        .args(&base)
        .env("DOCKER_CONFIG", &docker_config)
        .start();
    assert_serves_image(&d, "library/basic", &image, None);
    assert_no_secret(d.log());
}

/// `skopeo inspect --raw` of `src` over plain HTTP, with `creds` if given.
fn skopeo_inspect(src: &str, creds: Option<&str>) -> std::process::Output {
    let mut args = vec!["inspect", "--raw", "--tls-verify=false"];
    if let Some(creds) = creds {
        args.extend(["--creds", creds]);
    }
    args.push(src);
    skopeo(&args)
}

/// A manifest GET that fails, and quickly (a refused login must not hang).
fn assert_fails_quickly(daemon: &Daemon, path: &str, what: &str) {
    let r = get_manifest(daemon, path);
    assert!(
        r.status != 200 && r.elapsed < Duration::from_secs(5),
        "{what}: expected a quick failure, got {}",
        r.summary()
    );
}

/// Neither the password nor the `user:password` base64 appears in the log.
fn assert_no_secret(log: &DaemonLog) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let text = log.text();
    assert!(
        !text.contains(PASSWORD) && !text.contains(&b64),
        "credentials in the daemon's log:\n{text}"
    );
}

// ---------------------------------------------------------------------------
// 7. Token auth (distribution's `auth: token`)
// ---------------------------------------------------------------------------

#[test]
fn token_auth_upstream_fetches_one_token_for_many_requests() {
    let dir = tempdir("mirror-token");
    let issuer = TokenIssuer::start(&dir.path().join("issuer"), USER, PASSWORD);
    let image = multi_platform_layout(&dir.path().join("img"), "1", "hello-with-a-token");
    let reg = DockerRegistry::seeded(
        RegistryOpts {
            token: Some(issuer.auth()),
            ..RegistryOpts::default()
        },
        &[(&image, "library/tokened:1")],
    );
    let challenge = get(reg.addr(), "/v2/library/tokened/manifests/1", &[]);
    assert!(
        challenge.status == 401
            && challenge
                .header("www-authenticate")
                .is_some_and(|c| c.starts_with("Bearer ") && c.contains(&issuer.realm())),
        "registry challenge: {}",
        challenge.summary()
    );
    let src = format!("docker://{}/library/tokened:1", reg.host_port());
    let creds = format!("{USER}:{PASSWORD}");
    assert_success(
        "skopeo inspect through the token issuer",
        &skopeo_inspect(&src, Some(&creds)),
    );
    assert!(issuer.issued() >= 1, "skopeo got no token");

    let host = reg.host_port();
    let base = reg.mirror_args();

    // Without credentials the issuer refuses, so the pull fails.
    let anon = Daemon::builder().isolated().args(&base).start();
    assert_fails_quickly(&anon, "/v2/library/tokened/manifests/1", "no credentials");

    let d = Daemon::builder()
        .isolated()
        .args(base)
        .args(["--credential".into(), format!("{host}={creds}")])
        .start();
    let issued_before = issuer.issued();
    let upstream_before = reg.access_log().len();
    // Index by tag, both platform manifests by digest, config and layer:
    // five different upstream fetches in one repository (one scope).
    let index = get_manifest(&d, "/v2/library/tokened/manifests/1");
    assert!(
        index.status == 200 && index.body == image.manifest_bytes,
        "index by tag: {}",
        index.summary()
    );
    for p in &image.platforms {
        let r = get_manifest(&d, &format!("/v2/library/tokened/manifests/{}", p.digest));
        assert!(
            r.status == 200 && r.body == p.bytes,
            "{} manifest by digest: {}",
            p.architecture,
            r.summary()
        );
    }
    for digest in [&image.config_digest, &image.layer_digests[0]] {
        let r = get(
            d.addr(),
            &format!("/v2/library/tokened/blobs/{digest}"),
            &[],
        );
        assert!(
            r.status == 200 && r.body == image.blob(digest),
            "blob {digest}: {}",
            r.status
        );
    }
    let served: Vec<Access> = reg.access_log()[upstream_before..]
        .iter()
        .filter(|a| a.status == 200 && a.uri.starts_with("/v2/library/tokened/"))
        .cloned()
        .collect();
    assert!(
        served.len() >= 5,
        "expected at least 5 authorised upstream requests, access log:\n{}",
        reg.access_text()
    );
    assert_eq!(
        issuer.issued() - issued_before,
        1,
        "tokens fetched for {} upstream requests in one scope; issuer requests: {:?}",
        served.len(),
        issuer
            .requests()
            .iter()
            .map(|r| r.target.clone())
            .collect::<Vec<_>>()
    );
    assert_no_secret(d.log());
}

// ---------------------------------------------------------------------------
// 8. Redirects never carry the upstream's credentials
// ---------------------------------------------------------------------------

#[test]
fn redirect_target_never_sees_basic_credentials() {
    redirect_case(false);
}

#[test]
fn redirect_target_never_sees_bearer_token() {
    redirect_case(true);
}

/// An origin that wants Basic credentials (or a Bearer token from a token
/// issuer that wants them) answers every blob GET with a 307 to a "CDN" on
/// another port, which records what it is sent.
fn redirect_case(bearer: bool) {
    let dir = tempdir("mirror-redirect");
    let image = busybox_layout(&dir.path().join("img"), "1", "hello-via-cdn");
    let mut content = Content::default();
    content.add_image("library/redir", &image);
    let cdn_content = content.clone();
    let cdn = FakeUpstream::start(move |req| {
        let digest = req.path().strip_prefix("/cdn/").unwrap_or_default();
        match cdn_content.blob(digest) {
            Some(b) => Reply::ok("application/octet-stream", b.clone(), None),
            None => Reply::not_found("BLOB_UNKNOWN"),
        }
    });
    let issuer = bearer.then(|| TokenIssuer::start(&dir.path().join("issuer"), USER, PASSWORD));
    let challenge = match &issuer {
        Some(i) => format!(
            r#"Bearer realm="{}",service="{}",scope="repository:library/redir:pull""#,
            i.realm(),
            i.service
        ),
        None => r#"Basic realm="origin""#.to_owned(),
    };
    let cdn_url = cdn.url();
    let expected_auth = format!("{USER}:{PASSWORD}");
    let origin = FakeUpstream::start(move |req| {
        let authorised = if bearer {
            req.header("authorization")
                .is_some_and(|v| v.starts_with("Bearer ey") && v.matches('.').count() == 2)
        } else {
            req.basic_auth().as_deref() == Some(expected_auth.as_str())
        };
        if !authorised {
            return Reply::unauthorized(&challenge);
        }
        if let Some((_, digest)) = req.path().rsplit_once("/blobs/") {
            return Reply::redirect(&format!(
                "{cdn_url}/cdn/{digest}?X-Amz-Signature=0123456789abcdef"
            ));
        }
        content.reply(req)
    });
    // The CDN is on loopback: it must be named, as any private address.
    let daemon = Daemon::builder()
        .isolated()
        .args(origin.mirror_args())
        .args([
            "--credential".into(),
            format!("{}={USER}:{PASSWORD}", origin.host_port()),
            "--upstream".into(),
            format!("{}={}", cdn.host_port(), cdn.url()),
        ])
        .start();
    assert_serves_image(&daemon, "library/redir", &image, None);

    let cdn_requests = cdn.requests();
    assert!(
        !cdn_requests.is_empty(),
        "the redirect target saw no request; origin saw:\n{}",
        origin.request_text()
    );
    for r in &cdn_requests {
        assert!(
            r.header("authorization").is_none(),
            "the redirect target got the upstream's credentials: {} {} {:?}",
            r.method,
            r.target,
            r.headers
        );
    }
    let authorised_blob_gets = origin
        .requests()
        .iter()
        .filter(|r| {
            r.method == "GET" && r.path().contains("/blobs/") && r.header("authorization").is_some()
        })
        .count();
    assert!(
        authorised_blob_gets >= 2,
        "the daemon did not fetch the blobs from the origin with credentials:\n{}",
        origin.request_text()
    );
    if let Some(i) = &issuer {
        assert!(
            i.requests()
                .iter()
                .all(|r| r.header("x-amz-signature").is_none()),
            "token requests: {:?}",
            i.requests()
        );
        assert_eq!(i.issued(), 1, "tokens issued for one repository");
    }
    assert_no_secret(daemon.log());
}

// ---------------------------------------------------------------------------
// SSRF guard: unconfigured loopback hosts are never contacted
// ---------------------------------------------------------------------------

/// Without `--upstream`, a loopback or private registry host is refused:
/// quick 404s, and not even a TCP connection reaches the listener.
#[test]
fn unconfigured_loopback_upstreams_are_refused() {
    let listener = FakeUpstream::start(|_| Reply::ok("application/json", b"{}".to_vec(), None));
    let port = listener.addr().port();
    let daemon = Daemon::start(&[]);
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("127.0.0.2:{port}"),
    ] {
        let path = manifest_path("library/hello", "1", Some(&host));
        let r = get_manifest(&daemon, &path);
        assert!(
            r.status == 502 && r.elapsed < Duration::from_secs(2) && r.reason.contains("--upstream"),
            "GET {path} (an unconfigured loopback upstream): expected a quick 502 saying why, got {}",
            r.summary()
        );
    }
    let r = get_manifest(&daemon, "/v2/library/hello/manifests/1?ns=10.1.2.3");
    assert!(
        r.status == 502 && r.elapsed < Duration::from_secs(2) && r.reason.contains("--upstream"),
        "ns=10.1.2.3 (private): expected a quick 502 saying why, got {}",
        r.summary()
    );
    assert_eq!(
        listener.connections(),
        0,
        "the daemon connected to an unconfigured loopback upstream; requests:\n{}",
        listener.request_text()
    );
}

// ---------------------------------------------------------------------------
// Interrupted downloads resume with Range
// ---------------------------------------------------------------------------

/// The upstream cuts the first GET short but honours Range: the daemon
/// resumes where it stopped, and the client sees one complete, correct body.
#[test]
fn interrupted_download_resumes_with_range() {
    const SIZE: u64 = 3 << 20;
    let bytes = blob_layout_bytes(SIZE + 5);
    let mut content = Content::default();
    let digest = content.add_blob(bytes.clone());
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = content.add_blob(config.to_vec());
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len() },
        "layers": [{ "mediaType": OCI_LAYER_TAR, "digest": digest, "size": bytes.len() }],
    }))
    .unwrap();
    content.add_manifest("library/resume", "1", OCI_MANIFEST, manifest);
    let blob = bytes.clone();
    let d = digest.clone();
    let fake = FakeUpstream::start(move |req| {
        if !req.path().ends_with(&format!("/blobs/{d}")) {
            return content.reply(req);
        }
        let range = req
            .header("range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|r| r.parse::<usize>().ok());
        match range {
            Some(start) if start < blob.len() => Reply::Full {
                status: 206,
                headers: vec![
                    ("Content-Type".into(), "application/octet-stream".into()),
                    (
                        "Content-Range".into(),
                        format!("bytes {start}-{}/{}", blob.len() - 1, blob.len()),
                    ),
                ],
                body: blob[start..].to_vec(),
                pace: None,
            },
            _ => Reply::Truncated {
                headers: vec![("Content-Type".into(), "application/octet-stream".into())],
                body: blob[..blob.len() / 3].to_vec(),
                claimed: blob.len(),
                pace: None,
            },
        }
    });
    let daemon = Daemon::builder().args(fake.mirror_args()).start();
    let m = get_manifest(&daemon, "/v2/library/resume/manifests/1");
    assert_eq!(m.status, 200, "manifest: {}", m.summary());
    let r = fetch(
        daemon.addr(),
        "GET",
        &format!("/v2/library/resume/blobs/{digest}"),
        &[],
        Body::Expect(Arc::new(bytes.clone())),
        Duration::from_secs(30),
    );
    assert!(
        r.ok_and_matches(bytes.len() as u64),
        "GET of a blob whose first upstream GET is cut short: {}; upstream requests:\n{}",
        r.summary(),
        fake.requests()
            .iter()
            .map(|q| format!("{} {} range={:?}", q.method, q.target, q.header("range")))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let ranged: Vec<String> = fake
        .requests()
        .iter()
        .filter(|q| q.path().ends_with(&format!("/blobs/{digest}")))
        .filter_map(|q| q.header("range").map(str::to_owned))
        .collect();
    assert_eq!(
        ranged,
        vec![format!("bytes={}-", bytes.len() / 3)],
        "the resume request(s)"
    );
    assert!(
        wait_cached(daemon.state_dir(), &digest, Duration::from_secs(5)),
        "the resumed blob was not cached"
    );
}

// ---------------------------------------------------------------------------
// 9. Pull conformance on proxied images
// ---------------------------------------------------------------------------

#[test]
fn conformance_essentials_on_proxied_images() {
    let reg = DockerRegistry::start();
    let dir = tempdir("mirror-conf");
    let oci = busybox_layout(&dir.path().join("oci"), "1", "conf-oci");
    let multi = multi_platform_layout(&dir.path().join("multi"), "1", "conf-multi");
    reg.push(&oci, "library/conf-oci:1");
    reg.push(&multi, "library/conf-multi:1");
    // skopeo reads only OCI-typed manifests from a layout: the Docker
    // schema 2 image is the OCI one converted on push.
    let src = format!("oci:{}:1", oci.dir.display());
    let dest = format!("docker://{}/library/conf-docker:1", reg.host_port());
    assert_success(
        "skopeo copy --format v2s2",
        &skopeo(&[
            "copy",
            "--format",
            "v2s2",
            "--dest-tls-verify=false",
            &src,
            &dest,
        ]),
    );
    let host = reg.host_port();
    let daemon = Daemon::builder().args(reg.mirror_args()).start();
    let addr = daemon.addr();
    let r = get(addr, "/v2/", &[]);
    assert_eq!(r.status, 200, "GET /v2/: {}", r.summary());

    for (repo, media_type, platforms) in [
        ("library/conf-oci", OCI_MANIFEST, &[][..]),
        ("library/conf-docker", DOCKER_MANIFEST, &[][..]),
        ("library/conf-multi", OCI_INDEX, &multi.platforms[..]),
    ] {
        // What the upstream itself serves is the reference.
        let upstream = get(
            reg.addr(),
            &format!("/v2/{repo}/manifests/1"),
            &[("Accept", ACCEPT_MANIFESTS)],
        );
        assert!(
            upstream.status == 200
                && upstream.header("content-type").as_deref() == Some(media_type),
            "upstream {repo}: {}",
            upstream.summary()
        );
        let bytes = upstream.body.clone();
        let digest = sha256_digest(&bytes);
        for host_param in [None, Some(host.as_str())] {
            for reference in ["1", digest.as_str()] {
                let path = manifest_path(repo, reference, host_param);
                let get_r = get(addr, &path, &[("Accept", ACCEPT_MANIFESTS)]);
                check_manifest_response(&path, &get_r, &digest, media_type, &bytes);
                let head = fetch(
                    addr,
                    "HEAD",
                    &path,
                    &[("Accept", ACCEPT_MANIFESTS)],
                    Body::Keep,
                    Duration::from_secs(10),
                );
                assert!(
                    head.status == 200 && head.body.is_empty(),
                    "HEAD {path}: {}",
                    head.summary()
                );
                for h in ["content-type", "docker-content-digest", "content-length"] {
                    assert_eq!(
                        head.header(h),
                        get_r.header(h),
                        "HEAD {path}: {h} differs from GET"
                    );
                }
            }
        }
        for p in platforms {
            let path = manifest_path(repo, &p.digest, None);
            let r = get(addr, &path, &[("Accept", ACCEPT_MANIFESTS)]);
            check_manifest_response(&path, &r, &p.digest, OCI_MANIFEST, &p.bytes);
        }
    }

    // Blobs: GET, HEAD, Docker-Content-Digest, ranges once cached.
    let layer = &oci.layer_digests[0];
    let bytes = oci.blob(layer);
    let size = bytes.len();
    let path = blob_path("library/conf-oci", layer, None);
    let r = get(addr, &path, &[]);
    assert!(
        r.status == 200
            && r.body == bytes
            && r.header("docker-content-digest").as_deref() == Some(layer.as_str()),
        "GET {path}: {}",
        r.status
    );
    assert!(
        wait_cached(daemon.state_dir(), layer, Duration::from_secs(5)),
        "{layer} not cached 5 s after a complete GET"
    );
    let head = fetch(
        addr,
        "HEAD",
        &path,
        &[],
        Body::Keep,
        Duration::from_secs(10),
    );
    assert!(
        head.status == 200
            && head.body.is_empty()
            && head.header("content-length").as_deref() == Some(size.to_string().as_str())
            && head.header("docker-content-digest").as_deref() == Some(layer.as_str()),
        "HEAD {path}: {}",
        head.summary()
    );
    let config = get(
        addr,
        &blob_path("library/conf-oci", &oci.config_digest, Some(&host)),
        &[],
    );
    assert!(
        config.status == 200 && config.body == oci.config_bytes,
        "config: {}",
        config.summary()
    );
    let beyond_end = format!("bytes=500-{}", size + 1000);
    for (range, start, end) in [
        ("bytes=500-1499", 500, 1499),
        ("bytes=500-", 500, size - 1),
        ("bytes=-500", size - 500, size - 1),
        (beyond_end.as_str(), 500, size - 1),
    ] {
        let r = get(addr, &path, &[("Range", range)]);
        let content_range = format!("bytes {start}-{end}/{size}");
        assert!(
            r.status == 206
                && r.header("content-range").as_deref() == Some(content_range.as_str())
                && r.body == bytes[start..=end],
            "Range {range}: expected 206 with Content-Range {content_range}, got HTTP {} {:?}, {} bytes",
            r.status,
            r.header("content-range"),
            r.body.len()
        );
    }
    for range in [format!("bytes={size}-"), "bytes=500-0".to_owned()] {
        let r = get(addr, &path, &[("Range", range.as_str())]);
        assert_eq!(r.status, 416, "Range {range}: {}", r.summary());
    }

    // Misses: spec errors.
    let r = get(
        addr,
        &manifest_path("library/conf-oci", "2", None),
        &[("Accept", ACCEPT_MANIFESTS)],
    );
    assert!(
        r.status == 404
            && r.body.starts_with(b"{")
            && String::from_utf8_lossy(&r.body).contains("MANIFEST_UNKNOWN"),
        "missing tag: {}",
        r.summary()
    );
    let missing = format!("sha256:{}", "cd".repeat(32));
    let r = get(addr, &blob_path("library/conf-oci", &missing, None), &[]);
    assert!(
        r.status == 404 && String::from_utf8_lossy(&r.body).contains("BLOB_UNKNOWN"),
        "missing blob: {}",
        r.summary()
    );
}

fn check_manifest_response(path: &str, r: &Response, digest: &str, media_type: &str, bytes: &[u8]) {
    assert!(
        r.status == 200 && r.complete() && r.body == bytes,
        "GET {path}: expected the upstream's {} bytes of {digest}, got {}",
        bytes.len(),
        r.summary()
    );
    assert_eq!(
        r.header("docker-content-digest").as_deref(),
        Some(digest),
        "GET {path}: Docker-Content-Digest"
    );
    assert_eq!(
        r.header("content-type").as_deref(),
        Some(media_type),
        "GET {path}: Content-Type"
    );
    assert_eq!(
        r.header("content-length"),
        Some(bytes.len().to_string()),
        "GET {path}: Content-Length"
    );
}

/// Why a mirrored pull failed reaches each real client's terminal: an
/// upstream that refuses connections, and one that refuses us (401). The
/// daemon answers 502 with the reason, not a 404: containerd then reports
/// it after its own fallback fails, Docker and skopeo print it directly.
/// (podman: tests/podman.rs.)
#[test]
fn upstream_failures_show_their_reason_in_every_client() {
    let dir = tempdir("nl-refusing");
    let htpasswd = dir.path().join("htpasswd");
    htpasswd_file(&htpasswd, USER, PASSWORD);
    let locked = DockerRegistry::start_with(RegistryOpts {
        htpasswd: Some(htpasswd),
        ..RegistryOpts::default()
    });
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();
    let ctrd = Containerd::start();
    let docker = Dockerd::start();
    for (upstream, reason) in [
        (dead_server(), "Connection refused"),
        (locked.url(), "401 Unauthorized"),
    ] {
        // docker.io is this upstream; no credentials for the locked one.
        let daemon = Daemon::builder()
            .args(mirror_args("docker.io", &upstream))
            .start();
        ctrd.setup_by_cli(&daemon.host_port());
        let out = ctrd.pull("docker.io/library/gone:1", &[]);
        assert!(
            !out.status.success() && stderr(&out).contains(reason),
            "ctr pull through {upstream}: {reason:?} missing from\n{}",
            stderr(&out)
        );
        let direct = format!("{}/library/gone:1", daemon.host_port());
        let out = docker.docker(&["pull", &direct]);
        assert!(
            !out.status.success() && stderr(&out).contains(reason),
            "docker pull {direct}: {reason:?} missing from\n{}",
            stderr(&out)
        );
        let out = skopeo(&[
            "inspect",
            "--tls-verify=false",
            &format!("docker://{direct}"),
        ]);
        assert!(
            !out.status.success() && stderr(&out).contains(reason),
            "skopeo inspect {direct}: {reason:?} missing from\n{}",
            stderr(&out)
        );
    }
}

/// A configured upstream cannot point the daemon at the user's machine: a
/// redirect to an unconfigured loopback address is refused (not even a
/// connection reaches it), and the client is told why.
#[test]
fn redirects_to_unconfigured_private_addresses_are_refused() {
    let dir = tempdir("mirror-ssrf");
    let image = busybox_layout(&dir.path().join("img"), "1", "ssrf");
    let mut content = Content::default();
    content.add_image("library/ssrf", &image);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let target = format!("http://{}", listener.local_addr().expect("addr"));
    let origin = FakeUpstream::start(move |req| {
        if let Some((_, digest)) = req.path().rsplit_once("/blobs/") {
            return Reply::redirect(&format!("{target}/x/{digest}"));
        }
        content.reply(req)
    });
    let daemon = Daemon::builder()
        .isolated()
        .args(origin.mirror_args())
        .start();
    let layer = &image.layer_digests[0];
    let r = get(daemon.addr(), &blob_path("library/ssrf", layer, None), &[]);
    assert!(
        r.status == 502 && r.reason.contains("public address"),
        "a redirect to an unconfigured loopback service: {}",
        r.summary()
    );
    assert!(
        listener.accept().is_err(),
        "the daemon connected to the redirect target"
    );
}
