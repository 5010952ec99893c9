//! Nix images end to end (issue #3): images built on pull from the tests'
//! package set (`tests/pkgs`) with the host's Nix, checked with containerd,
//! skopeo and a raw HTTP client.
//!
//! Every test needs `nix-build`, `nix-store` and busybox; a missing one is a
//! failure, never a skip. Each test runs its own daemon on a fresh state
//! directory, with `--nix-option substituters=` so Nix never waits for
//! cache.nixos.org. Nothing here uses the ~500 MB `big` image (that is the
//! benchmark's, `bench/nix.sh`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The line the daemon logs once per build.
const BUILT: &str = "built Nix image";

/// What `hello` prints, and what `greet` adds (see tests/pkgs/default.nix).
const HELLO_OUT: &str = "Hello from nix";
const LIBFOO_OUT: &str = "libfoo data";
/// The tail of `broken`'s build log.
const BROKEN_MSG: &str = "about to fail: this is the useful tail";

fn get_accept(d: &Daemon, path: &str, accept: &str) -> Response {
    request(d.addr(), "GET", path, &[("Accept", accept)])
}

fn manifest_path(repo: &str, reference: &str) -> String {
    match repo.split_once('?') {
        Some((r, q)) => format!("/v2/{r}/manifests/{reference}?{q}"),
        None => format!("/v2/{repo}/manifests/{reference}"),
    }
}

/// GET `repo:latest` with `accept`; asserts a 200 whose headers match the
/// body (type, digest, length) and returns (digest, body, manifest JSON).
fn manifest(d: &Daemon, repo: &str, accept: &str) -> (String, Vec<u8>, Value) {
    let path = manifest_path(repo, "latest");
    let r = get_accept(d, &path, accept);
    let what = format!("GET {path} (Accept: {accept})");
    assert_eq!(r.status, 200, "{what}\n{r}");
    let digest = sha256_digest(&r.body);
    assert_eq!(
        r.header("Docker-Content-Digest").as_deref(),
        Some(digest.as_str()),
        "{what}: Docker-Content-Digest is not the body's sha256\n{r}"
    );
    let v = r.json();
    let media_type = v["mediaType"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        r.header("Content-Type").as_deref(),
        Some(media_type.as_str()),
        "{what}: Content-Type is not the manifest's mediaType\n{r}"
    );
    assert_eq!(
        r.header("Content-Length"),
        Some(r.body.len().to_string()),
        "{what}\n{r}"
    );
    (digest, r.body, v)
}

fn oci_manifest(d: &Daemon, repo: &str) -> (String, Vec<u8>, Value) {
    let m = manifest(d, repo, OCI_MANIFEST);
    assert_eq!(m.2["mediaType"], OCI_MANIFEST, "{repo}: {}", m.2);
    m
}

/// (digest, size, mediaType) of each layer, in order.
fn layers(manifest: &Value) -> Vec<(String, u64, String)> {
    manifest["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("manifest without layers: {manifest}"))
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_owned(),
                l["size"].as_u64().unwrap(),
                l["mediaType"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// GET a blob; asserts 200, its length and that its sha256 is `digest`.
fn blob(d: &Daemon, repo: &str, digest: &str, size: u64) -> Vec<u8> {
    let repo_only = repo.split('?').next().unwrap();
    let query = repo.split_once('?').map(|(_, q)| format!("?{q}"));
    let path = format!(
        "/v2/{repo_only}/blobs/{digest}{}",
        query.unwrap_or_default()
    );
    let r = d.get(&path);
    assert_eq!(r.status, 200, "GET {path}\n{r}");
    assert_eq!(r.body.len() as u64, size, "GET {path}: length");
    assert_eq!(sha256_digest(&r.body), digest, "GET {path}: content");
    assert_eq!(
        r.header("Docker-Content-Digest").as_deref(),
        Some(digest),
        "GET {path}\n{r}"
    );
    r.body
}

/// Fetches and verifies the config and every layer of `manifest`; returns
/// the config JSON and the layers' bytes.
fn fetch_image(d: &Daemon, repo: &str, manifest: &Value) -> (Value, Vec<Vec<u8>>) {
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let config_size = manifest["config"]["size"].as_u64().unwrap();
    let config = blob(d, repo, config_digest, config_size);
    let config: Value = serde_json::from_slice(&config).expect("config is JSON");
    let bytes = layers(manifest)
        .iter()
        .map(|(digest, size, _)| blob(d, repo, digest, *size))
        .collect();
    (config, bytes)
}

/// The uncompressed tar of a layer blob of type `media_type`.
fn layer_tar(bytes: &[u8], media_type: &str) -> Vec<u8> {
    let mut out = Vec::new();
    if media_type.ends_with("+gzip") || media_type.ends_with(".tar.gzip") {
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .expect("gunzip layer");
    } else if media_type.ends_with("+zstd") || media_type.ends_with(".tar.zstd") {
        out = zstd::stream::decode_all(bytes).expect("unzstd layer");
    } else {
        assert!(
            media_type.ends_with(".tar") || media_type.ends_with(".tar.v1"),
            "unexpected layer media type {media_type}"
        );
        out = bytes.to_vec();
    }
    out
}

/// One entry of a layer tarball.
#[derive(Debug)]
struct Entry {
    path: String,
    uid: u64,
    gid: u64,
    mtime: u64,
}

fn tar_entries(tar_bytes: &[u8]) -> Vec<Entry> {
    let mut archive = tar::Archive::new(tar_bytes);
    archive
        .entries()
        .expect("tar entries")
        .map(|e| {
            let e = e.expect("tar entry");
            let h = e.header();
            Entry {
                path: e.path().expect("entry path").to_string_lossy().into_owned(),
                uid: h.uid().unwrap(),
                gid: h.gid().unwrap(),
                mtime: h.mtime().unwrap(),
            }
        })
        .collect()
}

/// The store path basenames (`<hash>-<name>`) a layer's entries lie under.
fn store_paths_in(entries: &[Entry]) -> BTreeSet<String> {
    entries
        .iter()
        .filter_map(|e| {
            let p = e.path.trim_start_matches("./").trim_start_matches('/');
            let rest = p.strip_prefix("nix/store/")?;
            let base = rest.split('/').next().unwrap();
            (!base.is_empty()).then(|| base.to_owned())
        })
        .collect()
}

/// Store path basename → layer digest, for the layers that hold store paths.
fn layer_of_path(manifest: &Value, layer_bytes: &[Vec<u8>]) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for ((digest, _, media_type), bytes) in layers(manifest).iter().zip(layer_bytes) {
        for p in store_paths_in(&tar_entries(&layer_tar(bytes, media_type))) {
            let prev = map.insert(p.clone(), digest.clone());
            assert!(
                prev.is_none(),
                "store path {p} is in two layers of {manifest}"
            );
        }
    }
    map
}

/// The runtime closure (store path basenames) of package set attributes.
fn closure(attrs: &[&str]) -> BTreeSet<String> {
    let mut cmd = Command::new("nix-build");
    cmd.args(["--no-out-link", "--option", "substituters", "", PKGS]);
    for a in attrs {
        cmd.args(["-A", a]);
    }
    let out = output_timeout(&mut cmd, Duration::from_secs(300));
    assert_success(&format!("nix-build {attrs:?}"), &out);
    let outs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let out = output_timeout(
        Command::new("nix-store").arg("-qR").args(&outs),
        Duration::from_secs(60),
    );
    assert_success("nix-store -qR", &out);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().trim_start_matches("/nix/store/").to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The `Env` of `holder` (`skopeo inspect` output or an image config's
/// `config`) sets `PATH` and points `SSL_CERT_FILE` at the CA bundle.
fn assert_nix_env(holder: &Value) {
    let env: Vec<&str> = holder["Env"]
        .as_array()
        .unwrap_or_else(|| panic!("no Env: {holder}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(env.iter().any(|e| e.starts_with("PATH=")), "Env {env:?}");
    assert!(
        env.contains(&"SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"),
        "Env {env:?}"
    );
}

/// `errors[0].message` of an error response.
fn error_message(r: &Response) -> String {
    serde_json::from_slice::<Value>(&r.body)
        .ok()
        .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("not an OCI error body:\n{r}"))
}

/// `nixery-local build --state-dir STATE <nix args> NAME`
fn build_cmd(state: &Path, name: &str) -> std::process::Output {
    let mut cmd = Command::new(bin());
    cmd.arg("build")
        .arg("--state-dir")
        .arg(state)
        .args(nix_args(&[]))
        .arg(name);
    output_timeout(&mut cmd, Duration::from_secs(300))
}

/// Pulls `reference` (a `nix.local/…` name) and checks containerd recorded
/// the digest the daemon serves to containerd for `repo_query`.
fn ctr_pull(ctrd: &Containerd, d: &Daemon, reference: &str, repo_query: &str) {
    ctrd.pull_ok(reference);
    let (digest, _, _) = manifest(d, repo_query, ACCEPT_MANIFESTS);
    ctrd.assert_image(reference, &digest);
}

// ---------------------------------------------------------------------------
// Real clients
// ---------------------------------------------------------------------------

/// containerd pulls `nix.local/…` through the hosts.toml that `setup
/// containerd` writes and runs what it pulled.
#[test]
fn containerd_pulls_and_runs_nix_local_images() {
    let (d, _log) = nix_daemon(&[]);
    let ctrd = Containerd::start();
    ctrd.setup_by_cli(&d.host_port());

    ctr_pull(&ctrd, &d, "nix.local/hello:latest", "hello?ns=nix.local");
    let out = ctrd.run_ok("nix.local/hello:latest", &["hello"]);
    assert!(out.contains(HELLO_OUT), "hello printed {out:?}");

    ctr_pull(
        &ctrd,
        &d,
        "nix.local/shell/greet:latest",
        "shell/greet?ns=nix.local",
    );
    let out = ctrd.run_ok("nix.local/shell/greet:latest", &["bash", "-c", "greet"]);
    assert!(
        out.contains(HELLO_OUT) && out.contains(LIBFOO_OUT),
        "greet printed {out:?}"
    );
    // The customisation layer: /tmp (1777), /usr/bin/env, the CA bundle,
    // and the config's Env.
    let out = ctrd.run_ok(
        "nix.local/shell/greet:latest",
        &[
            "sh",
            "-c",
            "ls -ld /tmp; /usr/bin/env; cat /etc/ssl/certs/ca-bundle.crt",
        ],
    );
    assert!(out.starts_with("drwxrwxrwt"), "/tmp is not 1777: {out:?}");
    assert!(
        out.lines()
            .any(|l| l == "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"),
        "no SSL_CERT_FILE in the environment: {out:?}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("PATH=")),
        "no PATH: {out:?}"
    );
    assert!(
        out.contains("nixery-local test bundle"),
        "no CA bundle at /etc/ssl/certs/ca-bundle.crt: {out:?}"
    );
    // The shell image's own command is bash (exits at once without stdin).
    let (_, _, m) = oci_manifest(&d, "nix/shell/greet");
    let (config, _) = fetch_image(&d, "nix/shell/greet", &m);
    assert_eq!(
        config["config"]["Cmd"],
        serde_json::json!(["bash"]),
        "{config}"
    );
    // (--null-io: with ctr's own stdin, bash would wait for input.)
    let id = format!("nix-cmd-{}", std::process::id());
    let out = ctrd.ctr(&[
        "run",
        "--rm",
        "--null-io",
        "nix.local/shell/greet:latest",
        &id,
    ]);
    assert_success("ctr run nix.local/shell/greet:latest (its own Cmd)", &out);
}

/// `--layer-compression zstd` and `none`: the right media types, blobs
/// whose uncompressed content matches the config's diff_ids, and containerd
/// unpacks and runs them.
/// Debian's Docker 20.10 cannot unpack zstd layers, the default: it gets a
/// gzip variant of the image (told by its User-Agent), pulls it by the
/// daemon's address as the status page and README say, and runs it. The
/// same name still gives other clients zstd layers.
#[test]
fn docker_20_10_pulls_and_runs_a_nix_image() {
    let (d, _log) = nix_daemon(&[]);
    let docker = Dockerd::start();
    let reference = format!("{}/nix/hello:latest", d.host_port());
    let out = docker.docker(&["pull", &reference]);
    assert_success(&format!("docker pull {reference}"), &out);
    let out = docker.docker(&["run", "--rm", "--network", "none", &reference, "hello"]);
    assert_success(&format!("docker run {reference}"), &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(HELLO_OUT), "hello printed {stdout:?}");

    let (_, _, manifest) = oci_manifest(&d, "nix/hello");
    for (_, _, media_type) in layers(&manifest) {
        assert!(
            media_type.ends_with("+zstd"),
            "a client without Docker's User-Agent gets zstd layers, not {media_type}"
        );
    }
}

#[test]
fn zstd_and_uncompressed_layers_pull_and_run() {
    for (compression, media_type) in [("zstd", OCI_LAYER_ZSTD), ("none", OCI_LAYER_TAR)] {
        let (d, _log) = nix_daemon(&["--layer-compression", compression]);
        let (_, _, m) = oci_manifest(&d, "nix/hello");
        let (config, bytes) = fetch_image(&d, "nix/hello", &m);
        let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap().clone();
        for ((digest, _, mt), (b, diff_id)) in layers(&m).iter().zip(bytes.iter().zip(&diff_ids)) {
            assert_eq!(mt, media_type, "{compression}: layer {digest}\n{m}");
            let tar = layer_tar(b, mt);
            assert_eq!(
                sha256_digest(&tar),
                diff_id.as_str().unwrap(),
                "{compression}: layer {digest} does not match its diff_id"
            );
        }
        let ctrd = Containerd::start();
        ctrd.setup_by_cli(&d.host_port());
        ctr_pull(&ctrd, &d, "nix.local/hello:latest", "hello?ns=nix.local");
        let out = ctrd.run_ok("nix.local/hello:latest", &["hello"]);
        assert!(
            out.contains(HELLO_OUT),
            "{compression}: hello printed {out:?}"
        );
    }
}

/// skopeo copies a Nix image to an OCI layout; every blob matches its
/// digest, and `skopeo inspect` sees the config's Env.
#[test]
fn skopeo_copies_and_verifies_a_nix_image() {
    let (d, _log) = nix_daemon(&[]);
    let src = format!("docker://{}/nix/greet:latest", d.host_port());
    let dir = tempdir("nix-skopeo");
    let dest = format!("oci:{}:latest", dir.path().display());
    let out = skopeo(&["copy", "--src-tls-verify=false", &src, &dest]);
    assert_success(&format!("skopeo copy {src} {dest}"), &out);

    let blobs_dir = dir.path().join("blobs/sha256");
    let mut n = 0;
    for e in std::fs::read_dir(&blobs_dir).expect("layout blobs") {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let bytes = std::fs::read(e.path()).unwrap();
        assert_eq!(
            sha256_digest(&bytes),
            format!("sha256:{name}"),
            "blob {name} does not match its digest"
        );
        n += 1;
    }
    // The layers skopeo wrote are the daemon's (manifest + config + layers).
    let (_, _, m) = oci_manifest(&d, "nix/greet");
    let ls = layers(&m);
    assert!(n >= ls.len() + 2, "only {n} blobs in the layout");
    for (digest, _, _) in &ls {
        assert!(
            blob_path(dir.path(), digest).exists(),
            "layer {digest} missing from the copy"
        );
    }

    let out = skopeo(&["inspect", "--tls-verify=false", &src]);
    assert_success(&format!("skopeo inspect {src}"), &out);
    let v: Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
    assert_nix_env(&v);
    assert_eq!(
        v["Layers"].as_array().map(Vec::len),
        Some(ls.len()),
        "inspect: {v}"
    );
}

// ---------------------------------------------------------------------------
// The registry contract on a Nix image
// ---------------------------------------------------------------------------

#[test]
fn conformance_essentials_on_a_nix_image() {
    // gzip: the layer types every Docker client reads (zstd, the default,
    // has its own test below).
    let (d, _log) = nix_daemon(&["--layer-compression", "gzip"]);
    let repo = "nix/greet";

    // By tag, then by digest: identical bytes and headers.
    let (digest, body, m) = oci_manifest(&d, repo);
    let by_digest = get_accept(&d, &manifest_path(repo, &digest), OCI_MANIFEST);
    assert_eq!(by_digest.status, 200, "GET by digest\n{by_digest}");
    assert!(by_digest.body == body, "by digest: different bytes");
    assert_eq!(
        by_digest.header("Docker-Content-Digest").as_deref(),
        Some(digest.as_str())
    );
    assert_eq!(
        by_digest.header("Content-Type").as_deref(),
        Some(OCI_MANIFEST)
    );

    // HEAD by tag and by digest: the same headers, no body.
    for reference in ["latest", digest.as_str()] {
        let path = manifest_path(repo, reference);
        let r = request(d.addr(), "HEAD", &path, &[("Accept", OCI_MANIFEST)]);
        assert_eq!(r.status, 200, "HEAD {path}\n{r}");
        assert!(r.body.is_empty(), "HEAD {path} has a body\n{r}");
        assert_eq!(
            r.header("Docker-Content-Digest").as_deref(),
            Some(digest.as_str()),
            "HEAD {path}\n{r}"
        );
        assert_eq!(
            r.header("Content-Type").as_deref(),
            Some(OCI_MANIFEST),
            "HEAD {path}\n{r}"
        );
        assert_eq!(
            r.header("Content-Length"),
            Some(body.len().to_string()),
            "HEAD {path}\n{r}"
        );
    }

    // Docker schema 2 by Accept: same layers, Docker media types, its own
    // digest, also served by that digest.
    let (ddigest, dbody, dm) = manifest(&d, repo, DOCKER_MANIFEST);
    assert_eq!(dm["mediaType"], DOCKER_MANIFEST, "{dm}");
    assert_eq!(dm["schemaVersion"], 2, "{dm}");
    assert_eq!(dm["config"]["mediaType"], DOCKER_CONFIG, "{dm}");
    let oci_layers: Vec<_> = layers(&m).into_iter().map(|l| (l.0, l.1)).collect();
    let docker_layers: Vec<_> = layers(&dm).into_iter().map(|l| (l.0, l.1)).collect();
    assert_eq!(oci_layers, docker_layers, "OCI and Docker layers differ");
    for (_, _, mt) in layers(&dm) {
        assert_eq!(mt, DOCKER_LAYER_GZIP, "{dm}");
    }
    let r = get_accept(&d, &manifest_path(repo, &ddigest), DOCKER_MANIFEST);
    assert_eq!(r.status, 200, "Docker manifest by digest\n{r}");
    assert!(
        r.body == dbody,
        "Docker manifest by digest: different bytes"
    );

    // The config and layers.
    let (config, bytes) = fetch_image(&d, repo, &m);
    assert_eq!(config["architecture"], host_arch(), "{config}");
    assert_eq!(config["os"], "linux", "{config}");
    assert_eq!(config["rootfs"]["type"], "layers", "{config}");
    assert_nix_env(&config["config"]);
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(diff_ids.len(), bytes.len(), "diff_ids vs layers: {config}");
    let non_empty_history = config["history"]
        .as_array()
        .unwrap_or_else(|| panic!("no history: {config}"))
        .iter()
        .filter(|h| h["empty_layer"] != true)
        .count();
    assert_eq!(
        non_empty_history,
        bytes.len(),
        "history entries with a layer vs layers: {config}"
    );
    let (_, dbytes) = fetch_image(&d, repo, &dm);
    assert_eq!(dbytes.len(), bytes.len());
    for (((digest, _, mt), b), diff_id) in layers(&m).iter().zip(&bytes).zip(diff_ids) {
        let tar = layer_tar(b, mt);
        assert_eq!(
            sha256_digest(&tar),
            diff_id.as_str().unwrap(),
            "layer {digest} does not match its diff_id"
        );
        let entries = tar_entries(&tar);
        assert!(!entries.is_empty(), "layer {digest} is empty");
        let mtime = entries[0].mtime;
        for e in &entries {
            assert!(
                !e.path.starts_with('/') && !e.path.split('/').any(|c| c == ".."),
                "layer {digest}: entry {e:?}"
            );
            assert_eq!((e.uid, e.gid), (0, 0), "layer {digest}: entry {e:?}");
            assert_eq!(e.mtime, mtime, "layer {digest}: entry {e:?}");
        }
    }

    // HEAD of a blob: headers only.
    let (big, big_size, _) = layers(&m).into_iter().max_by_key(|l| l.1).unwrap();
    let path = format!("/v2/{repo}/blobs/{big}");
    let r = request(d.addr(), "HEAD", &path, &[]);
    assert_eq!(r.status, 200, "HEAD {path}\n{r}");
    assert!(r.body.is_empty(), "HEAD {path} has a body");
    assert_eq!(r.header("Content-Length"), Some(big_size.to_string()));
    assert_eq!(
        r.header("Docker-Content-Digest").as_deref(),
        Some(big.as_str())
    );

    // Ranges on the largest layer.
    let full = &bytes[layers(&m).iter().position(|l| l.0 == big).unwrap()];
    let size = full.len();
    assert!(size > 1000, "largest layer is only {size} bytes");
    for (spec, start, end) in [
        ("bytes=0-99".to_owned(), 0, 99),
        (format!("bytes=100-{}", size - 1), 100, size - 1),
        ("bytes=-10".to_owned(), size - 10, size - 1),
        ("bytes=500-".to_owned(), 500, size - 1),
    ] {
        let r = request(d.addr(), "GET", &path, &[("Range", &spec)]);
        assert_eq!(r.status, 206, "Range: {spec}\n{r}");
        assert_eq!(
            r.header("Content-Range"),
            Some(format!("bytes {start}-{end}/{size}")),
            "Range: {spec}\n{r}"
        );
        assert!(r.body == full[start..=end], "Range: {spec}: wrong bytes");
    }
    for spec in [
        format!("bytes={size}-"),
        format!("bytes={}-{}", size + 10, size + 20),
    ] {
        let r = request(d.addr(), "GET", &path, &[("Range", &spec)]);
        assert_eq!(r.status, 416, "Range: {spec}\n{r}");
        assert_eq!(
            r.header("Content-Range"),
            Some(format!("bytes */{size}")),
            "Range: {spec}\n{r}"
        );
    }

    // The same image under containerd's ns for nix.local and for docker.io.
    let (d_ns, _, _) = oci_manifest(&d, "greet?ns=nix.local");
    assert_eq!(d_ns, digest, "greet?ns=nix.local vs nix/greet");
    let (d_docker_io, _, _) = oci_manifest(&d, "nix/greet?ns=docker.io");
    assert_eq!(d_docker_io, digest, "nix/greet?ns=docker.io vs nix/greet");
}

// ---------------------------------------------------------------------------
// Names, layers and determinism
// ---------------------------------------------------------------------------

#[test]
fn package_order_does_not_matter_and_images_share_layers() {
    let (d, _log) = nix_daemon(&[]);
    let (a, _, _) = oci_manifest(&d, "nix/greet/hello");
    let (b, _, _) = oci_manifest(&d, "nix/hello/greet");
    assert_eq!(a, b, "nix/greet/hello and nix/hello/greet differ");
    let (c, _, _) = oci_manifest(&d, "nix/hello/greet/hello");
    assert_eq!(a, c, "a repeated package changed the image");

    let (_, _, mh) = oci_manifest(&d, "nix/hello");
    let (_, _, mg) = oci_manifest(&d, "nix/greet");
    let (_, hb) = fetch_image(&d, "nix/hello", &mh);
    let (_, gb) = fetch_image(&d, "nix/greet", &mg);
    let hmap = layer_of_path(&mh, &hb);
    let gmap = layer_of_path(&mg, &gb);

    // Each image holds exactly the closure of its packages plus cacert and
    // iana-etc, one store path per layer (well under the budget).
    let hclosure = closure(&["hello", "cacert", "iana-etc"]);
    let gclosure = closure(&["greet", "cacert", "iana-etc"]);
    assert_eq!(
        hmap.keys().cloned().collect::<BTreeSet<_>>(),
        hclosure,
        "nix/hello's store paths"
    );
    assert_eq!(
        gmap.keys().cloned().collect::<BTreeSet<_>>(),
        gclosure,
        "nix/greet's store paths"
    );
    for (what, map) in [("nix/hello", &hmap), ("nix/greet", &gmap)] {
        let distinct: BTreeSet<_> = map.values().collect();
        assert_eq!(
            distinct.len(),
            map.len(),
            "{what}: store paths share layers under budget: {map:?}"
        );
    }

    // The shared paths (busybox, hello, cacert, iana-etc) sit in identical
    // layers.
    let shared: Vec<&String> = hclosure.intersection(&gclosure).collect();
    assert_eq!(shared.len(), 4, "shared paths {shared:?}");
    for p in shared {
        assert_eq!(hmap[p], gmap[p], "store path {p} has different layers");
    }
    let hl: BTreeSet<String> = layers(&mh).into_iter().map(|l| l.0).collect();
    let gl: BTreeSet<String> = layers(&mg).into_iter().map(|l| l.0).collect();
    assert_eq!(hl.intersection(&gl).count(), 4, "{hl:?}\n{gl:?}");
}

#[test]
fn two_daemons_build_identical_images() {
    let (d1, _l1) = nix_daemon(&[]);
    let (d2, _l2) = nix_daemon(&[]);
    assert_ne!(d1.state_dir(), d2.state_dir());
    for repo in ["nix/greet", "nix/shell/hello"] {
        let (o1, _, _) = oci_manifest(&d1, repo);
        let (o2, _, _) = oci_manifest(&d2, repo);
        assert_eq!(o1, o2, "{repo}: OCI manifests differ between daemons");
        let (k1, _, _) = manifest(&d1, repo, DOCKER_MANIFEST);
        let (k2, _, _) = manifest(&d2, repo, DOCKER_MANIFEST);
        assert_eq!(k1, k2, "{repo}: Docker manifests differ between daemons");
    }
}

#[test]
fn lowercase_and_digit_names_find_their_attributes() {
    let (d, _log) = nix_daemon(&[]);
    let cases = [
        ("nix/haskellpackages.foo", "haskellPackages", "foo-0.1.0"),
        (
            "nix/python3packages.requests",
            "python3Packages",
            "python3.11-requests-2.31.0",
        ),
        ("nix/1password", "_1password", "1password-8.10"),
    ];
    for (repo, what, store_name) in cases {
        let (_, _, m) = oci_manifest(&d, repo);
        let (_, bytes) = fetch_image(&d, repo, &m);
        let paths = layer_of_path(&m, &bytes);
        assert!(
            paths.keys().any(|p| p.ends_with(&format!("-{store_name}"))),
            "{repo} ({what}) does not hold {store_name}: {paths:?}"
        );
    }
}

#[test]
fn custom_namespace_and_nix_registry() {
    let (d, log) = nix_daemon(&["--nix-namespace", "pkgs", "--nix-registry", "nix.example"]);
    let (a, _, _) = oci_manifest(&d, "pkgs/hello");
    let (b, _, _) = oci_manifest(&d, "hello?ns=nix.example");
    assert_eq!(a, b, "pkgs/hello vs hello?ns=nix.example");
    assert_eq!(log.count(BUILT), 1, "{}", log.text());
    // `nix/` is an ordinary repository now: not built, not served.
    let r = get_accept(&d, "/v2/nix/hello/manifests/latest", OCI_MANIFEST);
    assert_ne!(r.status, 200, "nix/hello with --nix-namespace pkgs\n{r}");
    assert_eq!(log.count(BUILT), 1, "{}", log.text());
}

// ---------------------------------------------------------------------------
// Refusals and failures
// ---------------------------------------------------------------------------

#[test]
fn unknown_packages_are_all_named() {
    let (d, log) = nix_daemon(&[]);
    for (repo, missing) in [
        (
            "nix/doesnotexist/alsomissing",
            &["doesnotexist", "alsomissing"][..],
        ),
        ("nix/hello/doesnotexist", &["doesnotexist"][..]),
        (
            "nix/python3packages.nope/nothere",
            &["python3packages.nope", "nothere"][..],
        ),
    ] {
        let path = manifest_path(repo, "latest");
        let r = get_accept(&d, &path, OCI_MANIFEST);
        // Not a 404: containerd would print only "not found".
        assert_eq!(r.status, 400, "GET {path}\n{r}");
        assert_eq!(
            r.error_code().as_deref(),
            Some("NAME_UNKNOWN"),
            "GET {path}\n{r}"
        );
        let msg = error_message(&r);
        for m in missing {
            assert!(msg.contains(m), "GET {path}: {m} not named in {msg:?}");
        }
    }
    assert_eq!(log.count(BUILT), 0, "something was built:\n{}", log.text());
}

#[test]
fn malicious_names_are_refused_and_build_nothing() {
    let (mut d, log) = nix_daemon(&[]);
    let forty: Vec<String> = (1..=40).map(|i| format!("p{i}")).collect();
    let long = "a".repeat(300);
    let deep: Vec<&str> = ["a"; 100].to_vec();
    let paths = [
        "/v2/nix/a..b/manifests/latest".to_owned(),
        format!("/v2/nix/{}/manifests/latest", forty.join("/")),
        "/v2/nix/%24%7Bbuiltins.x%7D/manifests/latest".to_owned(),
        "/v2/nix/%24%7Bbuiltins.readFile%20%22%2Fetc%2Fpasswd%22%7D/manifests/latest".to_owned(),
        "/v2/nix/builtins.currenttime/manifests/latest".to_owned(),
        "/v2/nix/builtins.storedir/manifests/latest".to_owned(),
        "/v2/nix/import/manifests/latest".to_owned(),
        "/v2/nix/throw/manifests/latest".to_owned(),
        "/v2/nix/x--option/manifests/latest".to_owned(),
        "/v2/nix/x--expr/manifests/latest".to_owned(),
        "/v2/nix/..%2f..%2fetc%2fpasswd/manifests/latest".to_owned(),
        "/v2/nix/a%0ab/manifests/latest".to_owned(),
        "/v2/nix/a%00b/manifests/latest".to_owned(),
        "/v2/nix/a%22b/manifests/latest".to_owned(),
        "/v2/nix/a%27b/manifests/latest".to_owned(),
        "/v2/nix/a%3bb/manifests/latest".to_owned(),
        "/v2/nix/a%20b/manifests/latest".to_owned(),
        format!("/v2/nix/{long}/manifests/latest"),
        format!("/v2/nix/{}/manifests/latest", deep.join(".")),
        "/v2/nix/hello.outpath/manifests/latest".to_owned(),
        "/v2/nix/busybox.type/manifests/latest".to_owned(),
        // Not packages: a function and an attribute set.
        "/v2/nix/slow/manifests/latest".to_owned(),
        "/v2/nix/bigparts/manifests/latest".to_owned(),
        // Through nix.local's namespace-less names.
        "/v2/%24%7Bx%7D/manifests/latest?ns=nix.local".to_owned(),
        "/v2/builtins.currenttime/manifests/latest?ns=nix.local".to_owned(),
        // Tags that cannot exist.
        "/v2/nix/hello/manifests/--help".to_owned(),
        "/v2/nix/hello/manifests/-A".to_owned(),
    ];
    for path in &paths {
        let started = Instant::now();
        let r = get_accept(&d, path, OCI_MANIFEST);
        let code = r.error_code();
        assert!(
            matches!(
                (r.status, code.as_deref()),
                (400, Some("NAME_INVALID" | "NAME_UNKNOWN")) | (404, Some("MANIFEST_UNKNOWN"))
            ),
            "GET {path}: expected 400 NAME_INVALID or NAME_UNKNOWN, or 404 MANIFEST_UNKNOWN\n{r}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "GET {path} took {:?}",
            started.elapsed()
        );
        assert!(d.is_alive(), "daemon died on GET {path}");
    }
    assert_eq!(log.count(BUILT), 0, "something was built:\n{}", log.text());
    // Still serving, and still building.
    assert_eq!(d.get("/v2/").status, 200);
    oci_manifest(&d, "nix/hello");
    assert_eq!(log.count(BUILT), 1, "{}", log.text());
}

/// A failed build returns the tail of Nix's log, and no image is cached.
/// The HEAD and GET of a pull, and a retry right after, cost one build.
#[test]
fn build_failure_returns_the_tail_of_nix_log() {
    let (mut d, log) = nix_daemon(&[]);
    let path = manifest_path("nix/broken", "latest");
    for attempt in 1..=2 {
        let r = get_accept(&d, &path, OCI_MANIFEST);
        let code = r.error_code();
        assert!(
            matches!(
                (r.status, code.as_deref()),
                (500, Some("UNKNOWN")) | (404, Some("MANIFEST_UNKNOWN"))
            ),
            "GET {path} (attempt {attempt}): expected 500 UNKNOWN or 404 MANIFEST_UNKNOWN\n{r}"
        );
        let msg = error_message(&r);
        assert!(
            msg.contains(BROKEN_MSG),
            "GET {path} (attempt {attempt}): Nix's log tail missing from {msg:?}"
        );
        let r = request(d.addr(), "HEAD", &path, &[("Accept", OCI_MANIFEST)]);
        assert!(r.status >= 400, "HEAD {path} (attempt {attempt})\n{r}");
        assert!(r.body.is_empty(), "HEAD {path} has a body\n{r}");
    }
    // With a good package, the failing one still fails the image.
    let path = manifest_path("nix/hello/broken", "latest");
    let r = get_accept(&d, &path, OCI_MANIFEST);
    assert!(
        r.status >= 400 && error_message(&r).contains(BROKEN_MSG),
        "GET {path}\n{r}"
    );
    assert!(d.is_alive());
    assert_eq!(log.count(BUILT), 0, "something was built:\n{}", log.text());
    assert_eq!(
        log.count("Nix image build failed"),
        2,
        "one build each for nix/broken and nix/hello/broken:\n{}",
        log.text()
    );
}

// ---------------------------------------------------------------------------
// Cache: restarts, the build command, concurrency
// ---------------------------------------------------------------------------

/// Every manifest variant and blob of `repo` the daemon serves: the OCI and
/// Docker manifests (digest and bytes), fetched and verified.
fn snapshot(d: &Daemon, repo: &str) -> [(String, Vec<u8>); 2] {
    let (od, ob, om) = oci_manifest(d, repo);
    fetch_image(d, repo, &om);
    let (kd, kb, km) = manifest(d, repo, DOCKER_MANIFEST);
    fetch_image(d, repo, &km);
    [(od, ob), (kd, kb)]
}

#[test]
fn restarted_daemon_serves_cached_image_without_nix() {
    require_nix();
    let dir = tempdir("nix-restart");
    let state = dir.path().join("state");
    let args = nix_args(&[]);
    let d = Daemon::start_in(&state, &args);
    let log = d.log().clone();
    let before = snapshot(&d, "nix/greet");
    assert_eq!(log.count(BUILT), 1, "{}", log.text());
    d.stop();

    // No Nix on PATH: anything that needs Nix fails.
    let d = Daemon::builder()
        .state_dir(&state)
        .args(&args)
        .env("PATH", "/nonexistent")
        .start();
    let log = d.log();
    let after = snapshot(&d, "nix/greet");
    assert_eq!(before[0].0, after[0].0, "OCI manifest digest changed");
    assert!(before[0].1 == after[0].1, "OCI manifest bytes changed");
    assert_eq!(before[1].0, after[1].0, "Docker manifest digest changed");
    assert!(before[1].1 == after[1].1, "Docker manifest bytes changed");
    assert_eq!(
        log.count(BUILT),
        0,
        "rebuilt after restart:\n{}",
        log.text()
    );
    // Prove Nix really is unreachable: an uncached image cannot be built.
    let r = get_accept(&d, "/v2/nix/hello/manifests/latest", OCI_MANIFEST);
    assert_ne!(
        r.status, 200,
        "nix/hello was built without Nix on PATH; the restart check proves nothing\n{r}"
    );
}

#[test]
fn build_command_warms_the_cache() {
    require_nix();
    let dir = tempdir("nix-build-cmd");
    let state = dir.path().join("state");
    let out = build_cmd(&state, "greet:latest");
    assert_success("nixery-local build greet:latest", &out);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let digest = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("digest "))
        .unwrap_or_else(|| panic!("no `digest sha256:…` line in:\n{stdout}"))
        .trim()
        .to_owned();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "digest {digest:?}"
    );
    // The table names the store paths.
    for name in ["greet-2.0", "hello-1.0", "libfoo-0.1", "busybox"] {
        assert!(stdout.contains(name), "{name} not in the table:\n{stdout}");
    }

    let d = Daemon::builder()
        .state_dir(&state)
        .args(nix_args(&[]))
        .env("PATH", "/nonexistent")
        .start();
    let log = d.log();
    let [(oci, _), (docker, _)] = snapshot(&d, "nix/greet");
    assert!(
        digest == oci || digest == docker,
        "build printed {digest}, the daemon serves {oci} (OCI) and {docker} (Docker)"
    );
    let (ns, _, _) = oci_manifest(&d, "greet?ns=nix.local");
    assert_eq!(ns, oci, "greet?ns=nix.local");
    assert_eq!(log.count(BUILT), 0, "rebuilt:\n{}", log.text());
}

#[test]
fn concurrent_pulls_share_one_build_and_disconnects_do_not_cancel() {
    let (d, log) = nix_daemon(&[]);
    let path = manifest_path("nix/greet/cacert", "latest");
    let barrier = Barrier::new(8);
    let results: Vec<Response> = thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    get_accept(&d, &path, OCI_MANIFEST)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert_eq!(r.status, 200, "GET {path}\n{r}");
        assert!(r.body == results[0].body, "different manifests");
    }
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        log.count(BUILT),
        1,
        "8 concurrent pulls of one image:\n{}",
        log.text()
    );
    let built = log.lines().into_iter().find(|l| l.contains(BUILT)).unwrap();
    for field in ["name=", "layers=", "duration_ms="] {
        assert!(built.contains(field), "no {field} in {built:?}");
    }

    // A client that leaves mid-build does not cancel the build.
    let path = manifest_path("nix/python3packages.requests", "latest");
    let mut s = TcpStream::connect(d.addr()).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: {OCI_MANIFEST}\r\n\r\n",
        d.addr()
    )
    .unwrap();
    thread::sleep(Duration::from_millis(20));
    assert_eq!(
        log.count(BUILT),
        1,
        "the build finished before the client left; the check proves nothing"
    );
    drop(s);
    assert!(
        log.wait_for(BUILT, 2, Duration::from_secs(120)),
        "the build was not finished after the client left:\n{}",
        log.text()
    );
    let r = get_accept(&d, &path, OCI_MANIFEST);
    assert_eq!(r.status, 200, "GET {path}\n{r}");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        log.count(BUILT),
        2,
        "rebuilt after the first build finished:\n{}",
        log.text()
    );
}

/// Why a pull failed reaches each real client's terminal: Docker and skopeo
/// print the JSON message of a 4xx, and the reason phrase of a 5xx, which
/// carries the message too (they ignore 5xx bodies); containerd resolves
/// with HEAD and prints only the status line, so the reason phrase is all it
/// shows, and a 404 would show as "not found": these failures are not 404s.
/// containerd, through the hosts.toml `setup containerd` writes, never falls
/// back to https://nix.local, so it never looks the name up.
#[test]
fn failures_show_their_reason_in_every_client() {
    let (d, _log) = nix_daemon(&[]);
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();
    // No package set at all: NIX_PATH names none and no flag sets one.
    let unconfigured = Daemon::builder().env("NIX_PATH", "").start();
    const UNCONFIGURED_MSG: &str = "no Nix package set is configured";

    let ctrd = Containerd::start();
    ctrd.setup_by_cli(&d.host_port());
    for (name, reason) in [
        ("broken", BROKEN_MSG),
        ("nosuchpkg", "unknown packages: nosuchpkg"),
    ] {
        let out = ctrd.pull(&format!("nix.local/{name}:latest"), &[]);
        assert!(
            !out.status.success(),
            "ctr pull of nix.local/{name} succeeded"
        );
        assert!(
            stderr(&out).contains(reason),
            "ctr pull nix.local/{name}: {reason:?} missing from\n{}",
            stderr(&out)
        );
    }
    let other = Containerd::start();
    other.setup_by_cli(&unconfigured.host_port());
    let out = other.pull("nix.local/hello:latest", &[]);
    assert!(
        !out.status.success() && stderr(&out).contains(UNCONFIGURED_MSG),
        "ctr pull without a package set:\n{}",
        stderr(&out)
    );
    for c in [&ctrd, &other] {
        let log = c.log_text();
        assert!(
            !log.contains("host=nix.local") && !log.contains("lookup nix.local"),
            "containerd tried nix.local itself:\n{log}"
        );
    }

    let docker = Dockerd::start();
    for (daemon, name, reason) in [
        (&d, "broken", BROKEN_MSG),
        (&d, "nosuchpkg", "unknown packages: nosuchpkg"),
        (&unconfigured, "hello", UNCONFIGURED_MSG),
    ] {
        let out = docker.docker(&["pull", &format!("{}/nix/{name}", daemon.host_port())]);
        assert!(!out.status.success(), "docker pull nix/{name} succeeded");
        assert!(
            stderr(&out).contains(reason),
            "docker pull nix/{name}: {reason:?} missing from\n{}",
            stderr(&out)
        );
        let skopeo_ref = format!("docker://{}/nix/{name}", daemon.host_port());
        let out = skopeo(&["inspect", "--tls-verify=false", &skopeo_ref]);
        assert!(!out.status.success(), "skopeo inspect nix/{name} succeeded");
        assert!(
            stderr(&out).contains(reason),
            "skopeo inspect nix/{name}: {reason:?} missing from\n{}",
            stderr(&out)
        );
    }
}

/// The config's `created` of `repo:reference`.
fn created(d: &Daemon, repo: &str, reference: &str) -> String {
    let r = get_accept(d, &manifest_path(repo, reference), OCI_MANIFEST);
    assert_eq!(r.status, 200, "{repo}:{reference}\n{r}");
    let m = r.json();
    let config = blob(
        d,
        repo,
        m["config"]["digest"].as_str().expect("config digest"),
        m["config"]["size"].as_u64().expect("config size"),
    );
    let config: Value = serde_json::from_slice(&config).expect("config is JSON");
    config["created"].as_str().expect("created").to_owned()
}

/// An image is dated by its inputs, so the same inputs still give the same
/// digest: a git package set's commit time, else the image format's date;
/// never the store's 1970, which clients show as "56 years ago".
#[test]
fn images_are_dated_by_their_package_set() {
    require("git");
    let (d, _log) = nix_daemon(&[]);
    assert_eq!(created(&d, "nix/hello", "latest"), "2026-12-02T00:00:00Z");

    let repo = tempdir("nl-pkgs-git");
    std::fs::copy(
        Path::new(PKGS).join("default.nix"),
        repo.path().join("default.nix"),
    )
    .expect("copy the package set");
    let git = |args: &[&str]| {
        let mut cmd = Command::new("git");
        cmd.arg("-C")
            .arg(repo.path())
            .args(["-c", "user.name=t", "-c", "user.email=t@example.org"])
            .args(args)
            .env("GIT_AUTHOR_DATE", "2024-05-01T12:00:00Z")
            .env("GIT_COMMITTER_DATE", "2024-05-01T12:00:00Z");
        run_ok(&format!("git {args:?}"), &mut cmd, Duration::from_secs(30))
    };
    git(&["init", "-q"]);
    git(&["add", "default.nix"]);
    git(&["commit", "-q", "-m", "package set"]);
    let rev = git(&["rev-parse", "HEAD"]).trim().to_owned();
    let url = format!("file://{}", repo.path().display());
    let from_git = Daemon::start(&["--pkgs-repo", &url, "--nix-option", "substituters="]);
    assert_eq!(
        created(&from_git, "nix/hello", &rev),
        "2024-05-01T12:00:00Z"
    );
}

/// Docker 20.10 (no zstd) and containerd asking for the same tag at the
/// same time each get their own variant, every time: the answer does not
/// go through the tag's shared record.
#[test]
fn concurrent_clients_each_get_their_own_variant() {
    const DOCKER_20: &str = "docker/20.10.24+dfsg1 go/go1.19.8 git-commit/5d6db84 kernel/6.1.0 os/linux arch/amd64 UpstreamClient(Docker-Client/20.10.24+dfsg1 \\(linux\\))";
    const CONTAINERD: &str = "containerd/1.6.20~ds1";
    let (d, _log) = nix_daemon(&[]);
    let addr = d.addr();
    let layer_types = move |agent: &str| -> Vec<String> {
        let r = request(
            addr,
            "GET",
            "/v2/nix/hello/manifests/latest",
            &[("Accept", OCI_MANIFEST), ("User-Agent", agent)],
        );
        assert_eq!(r.status, 200, "{agent}: {r}");
        layers(&r.json()).into_iter().map(|(_, _, t)| t).collect()
    };
    // Both variants built first.
    assert!(layer_types(CONTAINERD).iter().all(|t| t.ends_with("+zstd")));
    assert!(layer_types(DOCKER_20).iter().all(|t| t.ends_with("+gzip")));
    let clients: Vec<_> = [(DOCKER_20, "+gzip"), (CONTAINERD, "+zstd")]
        .into_iter()
        .map(|(agent, suffix)| {
            thread::spawn(move || {
                for i in 0..150 {
                    let types = layer_types(agent);
                    assert!(
                        types.iter().all(|t| t.ends_with(suffix)),
                        "request {i} of {agent}: {types:?}"
                    );
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("a client got the other's variant");
    }
}
