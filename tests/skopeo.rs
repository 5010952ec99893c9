//! skopeo (containers/image) as a client of the daemon: inspect, raw bytes,
//! copies into OCI layouts and into a real registry.

mod common;

use std::fs;
use std::path::Path;
use std::sync::OnceLock;

use common::*;
use serde_json::Value;

fn fixture() -> &'static ImageFixture {
    static F: OnceLock<ImageFixture> = OnceLock::new();
    F.get_or_init(|| {
        ImageFixture::start(
            "skopeo",
            ["skopeo-oci", "skopeo-docker", "skopeo-multi", "skopeo-ghcr"],
            "ghcr.io/acme/only-on-ghcr:1",
        )
    })
}

fn src(repo_tag: &str) -> String {
    format!("docker://{}/{repo_tag}", fixture().daemon.host_port())
}

/// Every blob of an OCI layout hashes to its file name; returns the
/// digest `index.json` points at.
fn verify_layout(dir: &Path) -> String {
    for entry in fs::read_dir(dir.join("blobs/sha256")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let digest = sha256_digest(&fs::read(entry.path()).unwrap());
        assert_eq!(digest, format!("sha256:{name}"), "corrupt blob in {dir:?}");
    }
    let index: Value = serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_owned()
}

/// `skopeo copy EXTRA… docker://DAEMON/REPO_TAG oci:DIR:copied` into a
/// fresh directory, verified with [`verify_layout`]; returns the directory
/// and the digest its `index.json` points at.
fn copy_to_layout(repo_tag: &str, extra: &[&str]) -> (tempfile::TempDir, String) {
    let out = tempdir("skopeo-out");
    let dest = format!("oci:{}:copied", out.path().display());
    let src = src(repo_tag);
    let mut args = vec!["copy"];
    args.extend_from_slice(extra);
    args.extend(["--src-tls-verify=false", &src, &dest]);
    skopeo_ok(&args);
    let top = verify_layout(out.path());
    (out, top)
}

#[test]
fn inspect_reports_the_imported_image() {
    let f = fixture();
    let out = skopeo_ok(&["inspect", "--tls-verify=false", &src("library/hello:1")]);
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["Digest"], f.oci.manifest_digest.as_str(), "{v:#}");
    assert_eq!(v["Architecture"], host_arch(), "{v:#}");
    assert_eq!(v["Os"], "linux", "{v:#}");
    let layers: Vec<&str> = v["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(layers, f.oci.layer_digests, "{v:#}");
}

#[test]
fn inspect_raw_is_byte_identical() {
    let f = fixture();
    for (image, name) in [
        (&f.oci, "library/hello:1"),
        (&f.docker, "library/hello-docker:1"),
        (&f.multi, "library/hello-multi:1"),
    ] {
        let raw = skopeo_ok(&["inspect", "--raw", "--tls-verify=false", &src(name)]);
        assert_eq!(
            raw,
            image.manifest_bytes,
            "{name}: raw manifest differs:\n{}",
            String::from_utf8_lossy(&raw)
        );
    }
    // The config blob, fetched by digest.
    let raw = skopeo_ok(&[
        "inspect",
        "--config",
        "--raw",
        "--tls-verify=false",
        &src("library/hello:1"),
    ]);
    assert_eq!(raw, f.oci.config_bytes);
}

/// Without `ns` the default registry (docker.io) is meant, so an image
/// imported only for ghcr.io is not visible.
#[test]
fn inspect_of_other_registry_image_fails_without_ns() {
    fixture();
    let out = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &src("acme/only-on-ghcr:1"),
    ]);
    assert!(
        !out.status.success(),
        "ghcr.io image served as docker.io: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("manifest unknown"),
        "expected a manifest-unknown error, got: {err}"
    );
}

#[test]
fn copy_to_oci_layout_preserves_digests() {
    let f = fixture();
    let (out, top) = copy_to_layout("library/hello:1", &[]);
    assert_eq!(top, f.oci.manifest_digest);
    for digest in f.oci.layer_digests.iter().chain([&f.oci.config_digest]) {
        assert_eq!(
            fs::read(blob_path(out.path(), digest)).unwrap(),
            f.oci.blob(digest),
            "blob {digest}"
        );
    }
}

/// A Docker schema 2 image copied into an OCI layout is converted by skopeo
/// (manifest and config are rewritten, so their digests change), but the
/// layer bytes are the daemon's.
#[test]
fn copy_docker_v2_image_to_oci_layout() {
    let f = fixture();
    let (out, _) = copy_to_layout("library/hello-docker:1", &[]);
    for digest in &f.docker.layer_digests {
        assert!(
            blob_path(out.path(), digest).exists(),
            "blob {digest} missing from copy"
        );
    }
}

#[test]
fn copy_all_platforms_preserves_index() {
    let f = fixture();
    let (out, top) = copy_to_layout("library/hello-multi:1", &["--all"]);
    assert_eq!(top, f.multi.manifest_digest);
    for p in &f.multi.platforms {
        assert_eq!(
            fs::read(blob_path(out.path(), &p.digest)).unwrap(),
            p.bytes,
            "{} manifest",
            p.architecture
        );
        assert!(blob_path(out.path(), &p.config_digest).exists());
    }
}

/// Daemon → CNCF distribution → raw manifest: the bytes survive a real
/// registry round trip, for a single image and an index.
#[test]
fn round_trip_through_reference_registry() {
    let f = fixture();
    let reg = DockerRegistry::start();
    for (image, name) in [
        (&f.oci, "library/hello:1"),
        (&f.multi, "library/hello-multi:1"),
    ] {
        let dest = format!("docker://{}/{name}", reg.host_port());
        skopeo_ok(&[
            "copy",
            "--all",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &src(name),
            &dest,
        ]);
        let raw = skopeo_ok(&["inspect", "--raw", "--tls-verify=false", &dest]);
        assert_eq!(raw, image.manifest_bytes, "{name} after round trip");
    }
}
