//! `prefetch` warms the cache for offline use; `doctor` says what is wrong.

mod common;

use std::process::Command;

use common::*;

#[test]
fn prefetched_images_are_served_offline_without_nix_or_upstream() {
    require("nix-build");
    let state = tempdir("nl-prefetch");
    let s = state.path().to_str().expect("utf8");
    let layouts = tempdir("nl-prefetch-layouts");
    let image = busybox_layout(&layouts.path().join("img"), "1", "from upstream");
    let upstream = DockerRegistry::start();
    let up = upstream.host_port();
    skopeo_push(&image, &format!("docker://{up}/library/hello:1"));

    let mut args: Vec<String> = vec!["prefetch".into(), "--state-dir".into(), s.into()];
    args.extend(nix_args(&[]).into_iter().map(String::from));
    args.extend([
        "--upstream".into(),
        format!("{up}=http://{up}"),
        "nix/hello".into(),
        format!("{up}/library/hello:1"),
    ]);
    let out = output_timeout(
        Command::new(bin()).args(&args),
        std::time::Duration::from_secs(120),
    );
    assert_success("prefetch", &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "prefetched {up}/library/hello:1 {}",
            image.manifest_digest
        )),
        "{stdout}"
    );
    drop(upstream);

    // Offline, and with no Nix on PATH: everything comes from the cache.
    let daemon = Daemon::builder()
        .state_dir(state.path())
        .args(["--offline", "--pkgs-path", PKGS])
        .env("PATH", "/nonexistent")
        .start();
    let r = request(
        daemon.addr(),
        "GET",
        &format!("/v2/library/hello/manifests/1?ns={up}"),
        &[],
    );
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.body, image.manifest_bytes);
    for layer in &image.layer_digests {
        let r = request(
            daemon.addr(),
            "GET",
            &format!("/v2/library/hello/blobs/{layer}?ns={up}"),
            &[],
        );
        assert_eq!(r.status, 200, "{r}");
        assert_eq!(sha256_digest(&r.body), *layer);
    }
    let r = request(daemon.addr(), "GET", "/v2/nix/hello/manifests/latest", &[]);
    assert_eq!(r.status, 200, "the prefetched Nix image needs no Nix: {r}");
    let m = r.json();
    for layer in m["layers"].as_array().expect("layers") {
        let d = layer["digest"].as_str().expect("digest");
        let b = request(
            daemon.addr(),
            "GET",
            &format!("/v2/nix/hello/blobs/{d}"),
            &[],
        );
        assert_eq!(sha256_digest(&b.body), d);
    }
}

#[test]
fn doctor_reports_the_daemon_and_how_to_fix_what_is_missing() {
    let state = tempdir("nl-doctor");
    let s = state.path().to_str().expect("utf8");
    let daemon = Daemon::start_in(state.path(), &[]);
    let listen = daemon.host_port();
    let doctor = |listen: &str| {
        Command::new(bin())
            .args([
                "doctor",
                "--state-dir",
                s,
                "--listen",
                listen,
                "--pkgs-path",
                PKGS,
            ])
            .output()
            .expect("run doctor")
    };
    let out = doctor(&listen);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ok    daemon"), "{text}");
    assert!(text.contains("ok    state directory"), "{text}");
    assert!(text.contains("ok    Nix"), "{text}");
    assert!(text.contains("ok    package source"), "{text}");
    drop(daemon);

    let dead = format!("127.0.0.1:{}", free_port());
    let out = doctor(&dead);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL  daemon"), "{text}");
    assert!(text.contains("systemctl start nixery-local"), "{text}");

    let out = Command::new(bin())
        .args([
            "doctor",
            "--state-dir",
            s,
            "--listen",
            &dead,
            "--pkgs-path",
            "/nonexistent/pkgs",
        ])
        .output()
        .expect("run doctor");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FAIL  package source"), "{text}");
    assert!(text.contains("/nonexistent/pkgs does not exist"), "{text}");
}
