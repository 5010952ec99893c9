//! A private containerd per test (own root, state and sockets, on the
//! overlayfs snapshotter where it works), `hosts.toml` mirror entries, and
//! pulling and running images through it with `ctr`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{assert_success, bin, forward_lines, output_timeout, require, unmount_all_under, Proc};

/// A private containerd (own root, state, sockets) for one test.
pub struct Containerd {
    dir: TempDir,
    socket: PathBuf,
    snapshotter: String,
    proc: Proc,
    /// containerd's own log: which hosts it tried, and why it moved on.
    log: Arc<Mutex<Vec<String>>>,
}

impl Containerd {
    pub fn start() -> Containerd {
        for cmd in ["containerd", "ctr", "runc", "containerd-shim-runc-v2"] {
            require(cmd);
        }
        // Short path: unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("ctrd")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let d = dir.path();
        let socket = d.join("c.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  level = "info"

[metrics]
  address = ""
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
        );
        let config_path = d.join("config.toml");
        fs::write(&config_path, config).expect("write containerd config");
        fs::create_dir_all(d.join("certs.d")).unwrap();

        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config_path);
        let mut proc = Proc::spawn(cmd);
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&log);
        forward_lines("containerd".into(), proc.stderr(), move |line| {
            lines.lock().expect("log lock").push(line.to_owned())
        });
        forward_lines("containerd stdout".into(), proc.stdout(), |_| {});
        let mut c = Containerd {
            dir,
            socket,
            snapshotter: "overlayfs".into(),
            proc,
            log,
        };

        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if c.socket.exists() && c.ctr(&["version"]).status.success() {
                break;
            }
            if let Some(status) = c.proc.exited() {
                panic!("containerd exited during startup: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "containerd socket not ready after 20 s"
            );
            thread::sleep(Duration::from_millis(50));
        }

        // overlayfs cannot work everywhere (e.g. root on overlay); the
        // plugin then reports skip/error and native is the fallback.
        let plugins = c.ctr(&["plugins", "ls"]);
        let listing = String::from_utf8_lossy(&plugins.stdout);
        let overlay_ok = listing.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&"io.containerd.snapshotter.v1")
                && f.get(1) == Some(&"overlayfs")
                && f.last() == Some(&"ok")
        });
        if !overlay_ok {
            eprintln!("containerd overlayfs snapshotter unavailable; using native\n{listing}");
            c.snapshotter = "native".into();
        }
        c
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn snapshotter(&self) -> &str {
        &self.snapshotter
    }

    /// The `--hosts-dir` directory (shared by all hosts of this instance).
    pub fn certs_dir(&self) -> PathBuf {
        self.dir.path().join("certs.d")
    }

    /// containerd's log so far, one line each.
    pub fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// The hosts files the real `nixery-local setup containerd` writes for a
    /// daemon on `listen`, into this instance's `--hosts-dir`.
    pub fn setup_by_cli(&self, listen: &str) -> PathBuf {
        let certs = self.certs_dir();
        let out = output_timeout(
            Command::new(bin())
                .args(["setup", "containerd", "--hosts-dir"])
                .arg(&certs)
                .args(["--listen", listen]),
            Duration::from_secs(30),
        );
        assert_success("nixery-local setup containerd", &out);
        certs
    }

    /// `ctr --address SOCK --namespace test ARGS` (120 s limit), with the
    /// chosen snapshotter.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_timeout(args, Duration::from_secs(120))
    }

    pub fn ctr_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        output_timeout(
            Command::new("ctr")
                .arg("--address")
                .arg(&self.socket)
                .args(["--namespace", "test"])
                .args(args)
                .env("CONTAINERD_SNAPSHOTTER", &self.snapshotter),
            timeout,
        )
    }

    /// `ctr` that must succeed; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert_success(&format!("ctr {}", args.join(" ")), &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes `<certs.d>/<registry_host>/hosts.toml` with
    /// `server = "https://<registry_host>"` and `mirror_url` as a
    /// pull+resolve host; returns the `--hosts-dir` directory.
    pub fn hosts_dir(&self, registry_host: &str, mirror_url: &str) -> PathBuf {
        self.hosts_dir_with_server(
            registry_host,
            &format!("https://{registry_host}"),
            mirror_url,
        )
    }

    /// Like [`Containerd::hosts_dir`] with an explicit upstream `server`.
    pub fn hosts_dir_with_server(
        &self,
        registry_host: &str,
        server: &str,
        mirror_url: &str,
    ) -> PathBuf {
        let certs = self.certs_dir();
        let dir = certs.join(registry_host);
        fs::create_dir_all(&dir).expect("create hosts dir");
        let toml = format!(
            "server = \"{server}\"\n\n[host.\"{mirror_url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        );
        fs::write(dir.join("hosts.toml"), toml).expect("write hosts.toml");
        certs
    }

    /// `ctr images pull --hosts-dir CERTS REF` (plus `extra` args).
    pub fn pull(&self, reference: &str, extra: &[&str]) -> Output {
        let certs = self.certs_dir();
        let certs = certs.to_str().unwrap();
        let mut args = vec!["images", "pull", "--hosts-dir", certs];
        args.extend_from_slice(extra);
        args.push(reference);
        self.ctr(&args)
    }

    /// `ctr images pull` of `reference` that must succeed.
    pub fn pull_ok(&self, reference: &str) {
        let out = self.pull(reference, &[]);
        assert_success(&format!("ctr images pull {reference}"), &out);
    }

    /// Asserts containerd recorded `digest` for `reference`.
    pub fn assert_image(&self, reference: &str, digest: &str) {
        let listing = self.ctr_ok(&["images", "ls", &format!("name=={reference}")]);
        assert!(
            listing.contains(digest),
            "containerd's {reference} is not {digest}:\n{listing}"
        );
    }

    /// `ctr run --rm REF ID ARGS…` (the image's own command when `args` is
    /// empty) with a machine-unique ID: runc keeps its state in
    /// /run/containerd/runc/<namespace>/<id>, shared by every containerd on
    /// the host, so IDs must not collide across parallel tests.
    pub fn run(&self, reference: &str, args: &[&str]) -> Output {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir_name = self.dir.path().file_name().unwrap().to_string_lossy();
        let id = format!("{dir_name}-{}", N.fetch_add(1, Ordering::Relaxed));
        let mut v = vec!["run", "--rm", reference, &id];
        v.extend_from_slice(args);
        self.ctr(&v)
    }

    /// [`Containerd::run`] that must succeed; returns its stdout.
    pub fn run_ok(&self, reference: &str, args: &[&str]) -> String {
        let out = self.run(reference, args);
        assert_success(&format!("ctr run {reference} {args:?}"), &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Pulls `reference` through the configured hosts dir, checks containerd
    /// recorded `digest` for it, runs it and returns its stdout.
    pub fn pull_and_run(&self, reference: &str, digest: &str) -> String {
        self.pull_ok(reference);
        self.assert_image(reference, digest);
        self.run_ok(reference, &[])
    }

    fn cleanup(&mut self) {
        // Tasks first, so shims exit and release their mounts.
        let ids = self.ctr_timeout(&["tasks", "ls", "-q"], Duration::from_secs(10));
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.ctr_timeout(
                &["tasks", "kill", "-s", "SIGKILL", id],
                Duration::from_secs(10),
            );
            let _ = self.ctr_timeout(&["tasks", "delete", "--force", id], Duration::from_secs(10));
        }
        let ids = self.ctr_timeout(&["containers", "ls", "-q"], Duration::from_secs(10));
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.ctr_timeout(&["containers", "delete", id], Duration::from_secs(10));
        }
        self.proc.terminate(Duration::from_secs(5));
        unmount_all_under(self.dir.path());
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.cleanup();
    }
}
