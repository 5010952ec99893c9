//! `nixery-local setup …`: the files it writes are used by real clients to
//! pull through the daemon (containerd with `ctr --hosts-dir`; skopeo with
//! the podman drop-in), it is idempotent, refuses files it did not write
//! unless `--force` (which backs them up), and `--dry-run` writes nothing.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use common::*;

const HUB_MSG: &str = "hello-through-setup-containerd";
const GHCR_MSG: &str = "hello-from-ghcr-through-setup";

struct Fixture {
    daemon: Daemon,
    hub: TestImage,
    ghcr: TestImage,
}

/// One daemon for the file, with its images imported before it starts.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = scratch_dir("setup");
        let state = dir.join("state");
        let hub = busybox_layout(&dir.join("hub"), "1", HUB_MSG);
        let ghcr = busybox_layout(&dir.join("ghcr"), "1", GHCR_MSG);
        let daemon = Daemon::builder()
            .state_dir(&state)
            .import(&hub, "docker.io/library/hello:1")
            .import(&ghcr, "ghcr.io/acme/hello:1")
            .start();
        Fixture { daemon, hub, ghcr }
    })
}

/// `nixery-local setup ARGS` (30 s limit).
fn setup(args: &[&str]) -> Output {
    output_timeout(
        Command::new(bin()).arg("setup").args(args),
        Duration::from_secs(30),
    )
}

fn setup_ok(args: &[&str]) -> String {
    let out = setup(args);
    assert_success(&format!("setup {}", args.join(" ")), &out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every file under `dir` (relative path) with its content, sorted by path.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    list_files(dir)
        .into_iter()
        .map(|p| {
            let content = fs::read(dir.join(&p)).expect("read");
            (p, content)
        })
        .collect()
}

#[test]
fn containerd_pulls_through_the_hosts_toml_setup_writes() {
    let f = fixture();
    let ctrd = Containerd::start();
    let certs = ctrd.certs_dir();
    let listen = f.daemon.host_port();
    let stdout = setup_ok(&["containerd", "--hosts-dir", s(&certs), "--listen", &listen]);
    assert!(stdout.contains("--hosts-dir"), "{stdout}");
    for host in [
        "nix.local",
        "docker.io",
        "ghcr.io",
        "quay.io",
        "registry.k8s.io",
    ] {
        let text = fs::read_to_string(certs.join(host).join("hosts.toml")).expect("hosts.toml");
        assert!(
            text.contains(&format!("[host.\"http://{listen}\"]")),
            "{host}: {text}"
        );
    }

    for (reference, image, message) in [
        ("docker.io/library/hello:1", &f.hub, HUB_MSG),
        ("ghcr.io/acme/hello:1", &f.ghcr, GHCR_MSG),
    ] {
        let said = ctrd.pull_and_run(reference, &image.manifest_digest);
        assert!(said.contains(message), "ctr run {reference}: {said:?}");
    }

    // Idempotent: a second run changes nothing.
    let before = snapshot(&certs);
    let stdout = setup_ok(&["containerd", "--hosts-dir", s(&certs), "--listen", &listen]);
    assert!(stdout.contains("nothing to change"), "{stdout}");
    assert_eq!(snapshot(&certs), before);
}

#[test]
fn a_foreign_file_is_refused_then_backed_up_with_force() {
    let dir = tempdir("nl-setup");
    let certs = dir.path().join("certs.d");
    let foreign = certs.join("docker.io/hosts.toml");
    fs::create_dir_all(foreign.parent().expect("parent")).expect("mkdir");
    let mine = "server = \"https://registry-1.docker.io\"\n# my own\n";
    fs::write(&foreign, mine).expect("write");

    let args = [
        "containerd",
        "--hosts-dir",
        s(&certs),
        "--listen",
        "127.0.0.1:7733",
    ];
    let out = setup(&args);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(s(&foreign)) && stderr.contains("--force"),
        "{stderr}"
    );
    // Nothing was written, not even the files that were free.
    assert_eq!(
        snapshot(&certs),
        [(
            PathBuf::from("docker.io/hosts.toml"),
            mine.as_bytes().to_vec()
        )]
    );

    let mut forced = args.to_vec();
    forced.push("--force");
    let stdout = setup_ok(&forced);
    assert!(stdout.contains("replaced"), "{stdout}");
    let new = fs::read_to_string(&foreign).expect("read");
    assert!(new.starts_with("# Managed by nixery-local setup"), "{new}");
    let backups: Vec<PathBuf> = list_files(&certs)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("hosts.toml.bak-"))
        })
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert_eq!(
        fs::read_to_string(certs.join(&backups[0])).expect("read"),
        mine
    );

    // The file is setup's own now: no --force needed to rewrite it.
    let stdout = setup_ok(&[
        "containerd",
        "--hosts-dir",
        s(&certs),
        "--listen",
        "127.0.0.1:7744",
    ]);
    assert!(
        stdout.contains("replaced") || stdout.contains("created"),
        "{stdout}"
    );
    assert!(fs::read_to_string(&foreign)
        .expect("read")
        .contains("http://127.0.0.1:7744"));
}

#[test]
fn dry_run_writes_nothing() {
    let dir = tempdir("nl-setup");
    let certs = dir.path().join("certs.d");
    let stdout = setup_ok(&[
        "containerd",
        "--hosts-dir",
        s(&certs),
        "--registry",
        "ghcr.io",
        "--listen",
        "127.0.0.1:7733",
        "--dry-run",
    ]);
    assert!(!certs.exists(), "dry run created {}", certs.display());
    assert!(
        stdout.contains(&format!(
            "would create {}",
            s(&certs.join("ghcr.io/hosts.toml"))
        )),
        "{stdout}"
    );
    assert!(stdout.contains("server = \"https://ghcr.io\""), "{stdout}");
    assert!(
        stdout.contains("[host.\"http://127.0.0.1:7733\"]"),
        "{stdout}"
    );
    assert!(stdout.contains("nothing was written"), "{stdout}");
}

#[test]
fn listen_comes_from_the_config_file() {
    let dir = tempdir("nl-setup");
    let config = dir.path().join("config.toml");
    fs::write(&config, "listen = \"0.0.0.0:7801\"\n").expect("write");
    let certs = dir.path().join("certs.d");
    setup_ok(&[
        "containerd",
        "--hosts-dir",
        s(&certs),
        "--all",
        "--config",
        s(&config),
    ]);
    let files: Vec<PathBuf> = list_files(&certs);
    assert_eq!(files.len(), 2, "{files:?}");
    let default = fs::read_to_string(certs.join("_default/hosts.toml")).expect("read");
    // An unspecified listen address is reached on loopback.
    assert!(
        default.contains("[host.\"http://127.0.0.1:7801\"]"),
        "{default}"
    );
    assert!(!default.contains("server ="), "{default}");
}

#[test]
fn docker_daemon_json_is_merged_with_a_backup() {
    let dir = tempdir("nl-setup");
    let json = dir.path().join("daemon.json");
    let certs = dir.path().join("certs.d");
    fs::write(&json, "{\"log-driver\": \"journald\"}\n").expect("write");
    let args = [
        "docker",
        "--daemon-json",
        s(&json),
        "--certs-dir",
        s(&certs),
        "--registry",
        "docker.io",
        "--listen",
        "127.0.0.1:7733",
    ];
    let stdout = setup_ok(&args);
    assert!(stdout.contains("systemctl restart docker"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(&json).expect("read")).expect("json");
    assert_eq!(
        v,
        serde_json::json!({"log-driver": "journald", "registry-mirrors": ["http://127.0.0.1:7733"]})
    );
    assert!(certs.join("docker.io/hosts.toml").exists());
    assert!(certs.join("nix.local/hosts.toml").exists());
    let backups = list_files(dir.path())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("daemon.json.bak-"))
        .count();
    assert_eq!(backups, 1);

    let before = snapshot(dir.path());
    let stdout = setup_ok(&args);
    assert!(stdout.contains("nothing to change"), "{stdout}");
    assert_eq!(snapshot(dir.path()), before);

    fs::write(&json, "{not json").expect("write");
    let out = setup(&args);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a JSON object"));
}

/// The podman drop-in is registries.conf syntax; skopeo (containers/image,
/// like podman) resolves docker.io through the daemon with it, and has no
/// other way to reach the image (no network).
#[test]
fn skopeo_reads_the_podman_drop_in() {
    require("skopeo");
    let f = fixture();
    let dir = tempdir("nl-setup");
    let conf = dir.path().join("nixery-local.conf");
    setup_ok(&[
        "podman",
        "--conf",
        s(&conf),
        "--listen",
        &f.daemon.host_port(),
    ]);
    let out = output_timeout(
        Command::new("skopeo")
            .arg("--registries-conf")
            .arg(&conf)
            .args(["inspect", "--raw", "docker://docker.io/library/hello:1"]),
        Duration::from_secs(60),
    );
    assert_success("skopeo inspect through the podman drop-in", &out);
    assert_eq!(sha256_digest(&out.stdout), f.hub.manifest_digest);
}

#[test]
fn k3s_registries_yaml() {
    let dir = tempdir("nl-setup");
    let yaml = dir.path().join("registries.yaml");
    let args = [
        "k3s",
        "--registries-yaml",
        s(&yaml),
        "--registry",
        "docker.io",
        "--listen",
        "127.0.0.1:7733",
    ];
    let stdout = setup_ok(&args);
    assert!(stdout.contains("systemctl restart k3s"), "{stdout}");
    let text = fs::read_to_string(&yaml).expect("read");
    assert!(
        text.contains("  \"docker.io\":\n    endpoint:\n      - \"http://127.0.0.1:7733\"\n"),
        "{text}"
    );
    assert!(text.contains("  \"nix.local\":\n"), "{text}");
    assert!(setup_ok(&args).contains("nothing to change"));
}
