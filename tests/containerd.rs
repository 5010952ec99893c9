//! End to end with a real containerd: images imported into the daemon are
//! pulled through a `hosts.toml` mirror entry (`ctr images pull --hosts-dir`)
//! and run with runc. Each test has its own containerd; they share one daemon.

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

const OCI_MSG: &str = "hello-from-oci-image";
const DOCKER_MSG: &str = "hello-from-docker-v2-image";
const MULTI_MSG: &str = "hello-from-multi-platform-image";
const GHCR_MSG: &str = "hello-from-ghcr-image";

/// One daemon for the file, with every image imported before it starts.
fn fixture() -> &'static ImageFixture {
    static F: OnceLock<ImageFixture> = OnceLock::new();
    F.get_or_init(|| {
        ImageFixture::start(
            "containerd",
            [OCI_MSG, DOCKER_MSG, MULTI_MSG, GHCR_MSG],
            "ghcr.io/acme/hello:1",
        )
    })
}

/// Checks the harness itself (layout builder, containerd config, hosts.toml)
/// against CNCF distribution, so a failure elsewhere points at the daemon.
#[test]
fn harness_works_against_reference_registry() {
    let reg = DockerRegistry::start();
    let dir = tempdir("ctrd-ref");
    let image = busybox_layout(dir.path(), "1", "hello-from-reference-registry");
    skopeo_push(
        &image,
        &format!("docker://{}/library/hello:1", reg.host_port()),
    );
    let ctrd = Containerd::start();
    ctrd.hosts_dir("docker.io", &reg.url());
    let stdout = ctrd.pull_and_run("docker.io/library/hello:1", &image.manifest_digest);
    assert!(
        stdout.contains("hello-from-reference-registry"),
        "output: {stdout:?}"
    );
}

#[test]
fn oci_image_pulls_and_runs() {
    let f = fixture();
    let ctrd = Containerd::start();
    ctrd.hosts_dir("docker.io", &f.daemon.url());
    let stdout = ctrd.pull_and_run("docker.io/library/hello:1", &f.oci.manifest_digest);
    assert!(stdout.contains(OCI_MSG), "output: {stdout:?}");
}

#[test]
fn docker_v2_image_pulls_and_runs() {
    let f = fixture();
    let ctrd = Containerd::start();
    ctrd.hosts_dir("docker.io", &f.daemon.url());
    let stdout = ctrd.pull_and_run(
        "docker.io/library/hello-docker:1",
        &f.docker.manifest_digest,
    );
    assert!(stdout.contains(DOCKER_MSG), "output: {stdout:?}");
}

#[test]
fn multi_platform_image_runs_host_platform() {
    let f = fixture();
    let ctrd = Containerd::start();
    ctrd.hosts_dir("docker.io", &f.daemon.url());
    let stdout = ctrd.pull_and_run("docker.io/library/hello-multi:1", &f.multi.manifest_digest);
    let expected = format!("{MULTI_MSG} on {}", host_arch());
    assert!(
        stdout.contains(&expected),
        "expected {expected:?}, output: {stdout:?}"
    );
}

/// An image imported for ghcr.io is found through a ghcr.io mirror entry
/// (containerd sends `ns=ghcr.io`); the upstream is unreachable on purpose
/// so only the daemon can have served it.
#[test]
fn ghcr_image_pulls_through_ghcr_mirror() {
    let f = fixture();
    let ctrd = Containerd::start();
    ctrd.hosts_dir_with_server("ghcr.io", "https://127.0.0.1:1", &f.daemon.url());
    let stdout = ctrd.pull_and_run("ghcr.io/acme/hello:1", &f.ghcr.manifest_digest);
    assert!(stdout.contains(GHCR_MSG), "output: {stdout:?}");
    // containerd resolves the tag with HEAD and fetches by digest: that is
    // a pull all the same, in the log (and on the status page).
    assert!(
        f.daemon.log().wait_for(
            "pull image=ghcr.io/acme/hello:1 status=200",
            1,
            Duration::from_secs(5)
        ),
        "no pull line for containerd's pull:\n{}",
        f.daemon.log().text()
    );
}

/// `docker.io/library/hello:1` exists, but a pull of `ghcr.io/library/hello:1`
/// must not get it (ns scoping), and the miss must be fast: containerd then
/// falls back to the (dead) upstream and fails.
#[test]
fn docker_io_image_is_not_served_for_ghcr() {
    let f = fixture();
    let ctrd = Containerd::start();
    ctrd.hosts_dir_with_server("ghcr.io", "https://127.0.0.1:1", &f.daemon.url());
    let started = Instant::now();
    let out = ctrd.pull("ghcr.io/library/hello:1", &[]);
    let took = started.elapsed();
    assert!(
        !out.status.success(),
        "pull of ghcr.io/library/hello:1 succeeded, the daemon served a docker.io image for ns=ghcr.io:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        took < Duration::from_secs(15),
        "failed pull took {took:?} (a mirror miss must be fast)"
    );
    let images = ctrd.ctr_ok(&["images", "ls", "-q"]);
    assert!(
        !images.contains("ghcr.io/library/hello"),
        "image recorded: {images}"
    );
}
