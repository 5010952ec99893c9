//! podman 4.3 against the daemon, through nothing but the drop-in that
//! `nixery-local setup podman` writes: Nix images pulled and run by the
//! name a user types (`nix.local/…`), a docker.io image mirrored from a
//! loopback upstream and pulled again from the cache once the upstream is
//! gone, and each kind of failure explained on podman's stderr.
//!
//! Each test has its own podman (tests/common/podman.rs) and daemon.

mod common;

use common::*;

/// What `hello` prints and what `greet` adds (see tests/pkgs/default.nix).
const HELLO_OUT: &str = "Hello from nix";
const LIBFOO_OUT: &str = "libfoo data";
/// The tail of `broken`'s build log.
const BROKEN_MSG: &str = "about to fail: this is the useful tail";
const HUB_MSG: &str = "hello-through-podman-mirror";

/// A podman whose only registries are those of the drop-in the real
/// `nixery-local setup podman` writes for `daemon`.
fn podman_through_setup(daemon: &Daemon) -> Podman {
    let podman = Podman::start();
    podman.setup_by_cli(&daemon.host_port());
    podman
}

/// A pull that must fail with each of `reasons` on podman's stderr, which
/// is shown in the test's output either way.
fn assert_pull_fails_with(podman: &Podman, reference: &str, reasons: &[&str]) {
    let out = podman.pull(reference);
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("podman pull {reference} stderr:\n{err}");
    assert!(!out.status.success(), "podman pull {reference} succeeded");
    for reason in reasons {
        assert!(
            err.contains(reason),
            "podman pull {reference}: {reason:?} missing from its stderr:\n{err}"
        );
    }
}

/// `nix.local/NAME` is what a user types; the drop-in maps it to the
/// daemon's Nix namespace (podman sends no `ns`), and the images run.
#[test]
fn podman_pulls_and_runs_nix_local_images() {
    let (d, _log) = nix_daemon(&[]);
    let podman = podman_through_setup(&d);

    podman.pull_ok("nix.local/hello");
    let out = podman.run("nix.local/hello", &["hello"]);
    assert_success("podman run nix.local/hello hello", &out);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(HELLO_OUT), "hello printed {said:?}");

    // Several packages and a meta-package: a path of several components.
    podman.pull_ok("nix.local/shell/greet");
    let out = podman.run("nix.local/shell/greet", &["bash", "-c", "greet"]);
    assert_success("podman run nix.local/shell/greet greet", &out);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(HELLO_OUT) && said.contains(LIBFOO_OUT),
        "greet printed {said:?}"
    );
}

/// docker.io goes through the daemon to its upstream; once the upstream is
/// gone, a fresh pull of the same tag is answered from the daemon's cache
/// and runs. (podman's own fallback, the real docker.io, is out of reach:
/// loopback only, and no such image there.)
#[test]
fn podman_pulls_a_mirrored_image_then_from_the_cache_offline() {
    let mut hub = HubMirror::start("podman-hello", HUB_MSG);
    let podman = podman_through_setup(&hub.daemon);
    let reference = hub.reference.clone();

    podman.pull_ok(&reference);
    assert_eq!(podman.digest(&reference), hub.image.manifest_digest);
    hub.assert_fetched_once();
    hub.assert_pulls_served(1);

    hub.stop_upstream();
    assert_success("podman rmi", &podman.podman(&["rmi", &reference]));
    podman.pull_ok(&reference);
    assert_eq!(podman.digest(&reference), hub.image.manifest_digest);
    hub.assert_pulls_served(2);
    hub.assert_served_offline();
    let out = podman.run(&reference, &[]);
    assert_success(&format!("podman run {reference}"), &out);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(HUB_MSG), "{reference} printed {said:?}");
}

/// Why a Nix image cannot be had reaches podman's terminal: every unknown
/// package (a 4xx's JSON message), and the tail of a failed build's log
/// (a 5xx, whose reason phrase carries it: podman ignores 5xx bodies).
#[test]
fn podman_shows_why_a_nix_image_failed() {
    let (d, _log) = nix_daemon(&[]);
    let podman = podman_through_setup(&d);
    let unknown = "unknown packages: nosuchpkg";
    assert_pull_fails_with(&podman, "nix.local/nosuchpkg", &[unknown]);
    assert_pull_fails_with(&podman, "nix.local/broken", &[BROKEN_MSG]);
}

/// An image the cache lacks, while the upstream is down (nothing listens on
/// its port): podman then also tries the real docker.io and fails there,
/// but the daemon's reason (the upstream URL it tried, and how that failed)
/// must be on podman's stderr too.
#[test]
fn podman_shows_why_a_mirrored_image_failed() {
    let upstream = format!("http://127.0.0.1:{}", free_port());
    let d = Daemon::builder()
        .args(mirror_args("docker.io", &upstream))
        .start();
    let podman = podman_through_setup(&d);
    let tried = format!("{upstream}/v2/library/not-cached/manifests/1: ");
    assert_pull_fails_with(
        &podman,
        "docker.io/library/not-cached:1",
        &[&tried, "Connection refused"],
    );
}
