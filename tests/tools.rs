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
    // Each blob as it lands, with its size for people.
    let layer = &image.layer_digests[0];
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with(&format!("  {layer} ")) && l.ends_with('B')),
        "no progress line for {layer}:\n{stdout}"
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

/// One cache for every command: run as root, `import` works as the cache's
/// owner (the service's user), so the service can later evict what it
/// wrote; run as someone who cannot write the cache, it says so and names a
/// way out instead of using another directory.
#[test]
fn commands_work_as_the_cache_owner_or_say_why_not() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = tempdir("nl-owner");
    // The layout must be readable by the owner, as under /tmp it would be.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let image = busybox_layout(&root.path().join("img"), "1", "owned");
    let state = root.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    let nobody = "nobody";
    let status = Command::new("chown")
        .args([&format!("{nobody}:nogroup"), state.to_str().expect("utf8")])
        .status()
        .expect("chown");
    assert!(status.success());

    let out = import(&state, &image.dir, "docker.io/library/owned:1");
    assert_success("import as root into nobody's cache", &out);
    let owner = std::fs::metadata(&state).expect("stat").uid();
    let mut files = 0;
    for path in list_files(&state) {
        let meta = std::fs::symlink_metadata(state.join(&path)).expect("stat");
        assert_eq!(
            meta.uid(),
            owner,
            "{} is not the cache owner's",
            path.display()
        );
        files += 1;
    }
    assert!(files > 0, "import wrote nothing");

    // Someone without write access to the cache: a clear refusal. (A copy
    // of the binary: the checkout may not be reachable for that user.)
    let exe = root.path().join("nixery-local");
    std::fs::copy(bin(), &exe).expect("copy the binary");
    let out = output_timeout(
        Command::new("setpriv")
            .args(["--reuid=daemon", "--regid=daemon", "--clear-groups"])
            .arg(&exe)
            .arg("gc")
            .arg("--state-dir")
            .arg(&state),
        std::time::Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("you cannot write to the cache")
            && err.contains("--state-dir"),
        "gc by a user who cannot write the cache:\n{err}"
    );
}
