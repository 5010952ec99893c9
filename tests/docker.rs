//! Docker 20.10's `registry-mirrors`, as `nixery-local setup docker` writes
//! them into daemon.json: a private dockerd loaded with that file pulls
//! docker.io images through the daemon from a loopback upstream, and once
//! the upstream is gone, pulls the same tag again from the daemon's cache
//! and runs it. (Nix images by the daemon's address: tests/nix_images.rs.)

mod common;

use common::*;

const HUB_MSG: &str = "hello-through-docker-registry-mirrors";

#[test]
fn docker_pulls_docker_io_through_registry_mirrors_then_from_the_cache_offline() {
    let mut hub = HubMirror::start("docker-hello", HUB_MSG);
    let dir = tempdir("nl-docker");
    let json = dir.path().join("daemon.json");
    run_setup(&[
        "docker",
        "--daemon-json",
        s(&json),
        "--certs-dir",
        s(&dir.path().join("certs.d")),
        "--registry",
        "docker.io",
        "--listen",
        &hub.daemon.host_port(),
    ]);
    let docker = Dockerd::with_config_file(&json);
    let (reference, digest) = (hub.reference.clone(), hub.image.manifest_digest.clone());
    // Docker records the digest it pulled as NAME@DIGEST.
    let pulled = |what: &str| {
        let out = docker.docker(&["pull", &reference]);
        assert_success(&format!("docker pull {reference} ({what})"), &out);
        let out = docker.docker(&[
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            &reference,
        ]);
        assert_success("docker image inspect", &out);
        let digests = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            digests.contains(&digest),
            "{what}: Docker's digests of {reference} are {digests}, not {digest}"
        );
    };

    pulled("through the mirror");
    hub.assert_fetched_once();
    hub.assert_pulls_served(1);

    hub.stop_upstream();
    assert_success("docker rmi", &docker.docker(&["rmi", &reference]));
    // Docker falls back to the real docker.io only if the mirror fails;
    // that is out of reach here, so this pull is the daemon's cache.
    pulled("from the cache, upstream gone");
    hub.assert_pulls_served(2);
    hub.assert_served_offline();
    let out = docker.docker(&["run", "--rm", "--network", "none", &reference]);
    assert_success(&format!("docker run {reference}"), &out);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(HUB_MSG), "{reference} printed {said:?}");
}
