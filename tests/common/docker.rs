//! A private Docker engine per test: Debian's `dockerd` 20.10 with its own
//! data root, exec root, socket and pidfile, and no bridge or iptables, so
//! the host's network is left alone. Driven with `/usr/bin/docker` (the
//! 20.10 client, not a newer one elsewhere on PATH). Optionally with a
//! `daemon.json` of the test's, such as `nixery-local setup docker` writes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{forward_lines, output_timeout, require, unmount_all_under, Proc};

/// The Debian client that matches the engine.
const DOCKER: &str = "/usr/bin/docker";

pub struct Dockerd {
    dir: TempDir,
    socket: PathBuf,
    proc: Proc,
}

impl Dockerd {
    pub fn start() -> Dockerd {
        Dockerd::start_with(None)
    }

    /// An engine configured by `daemon_json` (`--config-file`).
    pub fn with_config_file(daemon_json: &Path) -> Dockerd {
        Dockerd::start_with(Some(daemon_json))
    }

    fn start_with(daemon_json: Option<&Path>) -> Dockerd {
        require("dockerd");
        assert!(
            Path::new(DOCKER).exists(),
            "{DOCKER} missing (apt-get install docker.io)"
        );
        // Short path: unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("dkd")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let d = dir.path();
        let socket = d.join("d.sock");
        let mut cmd = Command::new("dockerd");
        cmd.arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .arg("--pidfile")
            .arg(d.join("pid"))
            .args(["--iptables=false", "--ip-masq=false", "--bridge=none"]);
        if let Some(path) = daemon_json {
            cmd.arg("--config-file").arg(path);
        }
        let mut proc = Proc::spawn(cmd);
        forward_lines("dockerd".into(), proc.stderr(), |_| {});
        forward_lines("dockerd stdout".into(), proc.stdout(), |_| {});
        let docker = Dockerd { dir, socket, proc };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut docker = docker;
        loop {
            if docker.socket.exists() && docker.docker(&["version"]).status.success() {
                return docker;
            }
            if let Some(status) = docker.proc.exited() {
                panic!("dockerd exited during startup: {status}");
            }
            assert!(Instant::now() < deadline, "dockerd did not start in 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `docker ARGS` against this engine (2 minutes at most).
    pub fn docker(&self, args: &[&str]) -> Output {
        output_timeout(
            Command::new(DOCKER)
                .arg("-H")
                .arg(format!("unix://{}", self.socket.display()))
                .args(args),
            Duration::from_secs(120),
        )
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let ids = self.docker(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.docker(&["rm", "-f", id]);
        }
        self.proc.terminate(Duration::from_secs(10));
        unmount_all_under(self.dir.path());
    }
}
