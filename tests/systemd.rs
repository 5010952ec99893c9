//! The daemon under systemd: the shipped units pass `systemd-analyze verify`
//! (and its offline security review), and the daemon started the way systemd
//! starts it (listening socket as fd 3 with `LISTEN_FDS`/`LISTEN_PID`,
//! `NOTIFY_SOCKET`) serves on that socket, reports READY, pings the watchdog
//! and reports STOPPING on SIGTERM.

mod common;

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

const SHIPPED_EXEC: &str = "/usr/bin/nixery-local";

fn unit(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("systemd")
        .join(path)
}

/// Copies the unit into `dir` with `ExecStart=` pointing at the binary under
/// test (verify checks the program exists; the shipped path is the package's
/// `/usr/bin`). Nothing else changes.
fn with_test_binary(shipped: &Path, dir: &Path) -> PathBuf {
    let text = fs::read_to_string(shipped).expect("read unit");
    let copy: String = text
        .lines()
        .map(|line| match line.strip_prefix("ExecStart=") {
            Some(command) => format!("ExecStart={}\n", command.replace(SHIPPED_EXEC, bin())),
            None => format!("{line}\n"),
        })
        .collect();
    let path = dir.join(shipped.file_name().expect("file name"));
    fs::write(&path, copy).expect("write unit copy");
    path
}

#[test]
fn system_units_verify() {
    let dir = tempdir("nl-units");
    let service = with_test_binary(&unit("nixery-local.service"), dir.path());
    let socket = with_test_binary(&unit("nixery-local.socket"), dir.path());
    systemd_verify(false, &[service, socket]);
}

#[test]
fn user_unit_verifies() {
    let dir = tempdir("nl-user-units");
    let service = with_test_binary(&unit("user/nixery-local.service"), dir.path());
    systemd_verify(true, &[service]);
}

#[test]
fn shipped_units_name_the_packaged_paths() {
    let service = fs::read_to_string(unit("nixery-local.service")).expect("read");
    assert!(service.contains(
        "\nExecStart=/usr/bin/nixery-local serve --config /etc/nixery-local/config.toml\n"
    ));
    for line in [
        "Type=notify",
        "StateDirectory=nixery-local",
        "User=nixery-local",
    ] {
        assert!(service.contains(&format!("\n{line}\n")), "missing {line}");
    }
    let socket = fs::read_to_string(unit("nixery-local.socket")).expect("read");
    assert!(socket.contains("\nListenStream=127.0.0.1:7733\n"));
    let user = fs::read_to_string(unit("user/nixery-local.service")).expect("read");
    assert!(user.contains("\nExecStart=/usr/bin/nixery-local serve\n"));
    assert!(!user.lines().any(|l| l.starts_with("StateDirectory=")));
}

/// The hardening holds up in systemd's own review: `OK` or better.
#[test]
fn system_service_is_hardened() {
    require("systemd-analyze");
    let dir = tempdir("nl-units");
    let service = with_test_binary(&unit("nixery-local.service"), dir.path());
    let out = output_timeout(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--threshold=20"])
            .arg(&service)
            .env("SYSTEMD_LOG_COLOR", "0"),
        Duration::from_secs(60),
    );
    assert_success("systemd-analyze security (exposure at most 2.0)", &out);
}

// ---------------------------------------------------------------------------
// Starting the daemon the way systemd does
// ---------------------------------------------------------------------------

/// A daemon child that is killed if the test fails.
struct Activated {
    proc: Proc,
    /// Lines of stdout.
    stdout: mpsc::Receiver<String>,
}

impl Activated {
    /// `nixery-local serve ARGS` with `fd` as fd 3 and `env`; `LISTEN_PID` is
    /// set to the daemon's own pid by a shell that then execs it, as systemd
    /// sets it after forking.
    fn start(fd: Option<RawFd>, env: &[(&str, &str)], args: &[&str]) -> Activated {
        // Unless the test names another process's pid.
        let script = if env.iter().any(|(k, _)| *k == "LISTEN_PID") {
            r#"exec "$0" "$@""#
        } else {
            r#"export LISTEN_PID=$$; exec "$0" "$@""#
        };
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .arg(bin())
            .arg("serve")
            .args(args)
            // Only what the test passes, not the test runner's own.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .envs(env.iter().copied());
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork
        // and exec.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fd) = fd {
                    // dup2 clears FD_CLOEXEC on the copy, but is a no-op
                    // when the listener already is fd 3.
                    let r = if fd == 3 {
                        libc::fcntl(3, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(fd, 3)
                    };
                    if r < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut proc = Proc::spawn(cmd);
        forward_lines("daemon".into(), proc.stderr(), |_| {});
        let (tx, rx) = mpsc::channel();
        forward_lines("daemon stdout".into(), proc.stdout(), move |line| {
            let _ = tx.send(line.to_owned());
        });
        Activated { proc, stdout: rx }
    }

    /// The address in the daemon's `listening on` line.
    fn listening(&self) -> SocketAddr {
        let line = self
            .stdout
            .recv_timeout(Duration::from_secs(20))
            .expect("the daemon's listening line");
        line.strip_prefix("nixery-local listening on http://")
            .unwrap_or_else(|| panic!("unexpected line {line:?}"))
            .parse()
            .expect("an address")
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        self.proc.wait_or_panic(timeout, "the daemon")
    }

    fn terminate(&mut self) -> ExitStatus {
        self.proc.signal(libc::SIGTERM);
        self.wait(Duration::from_secs(15))
    }
}

/// The notification socket a service manager would listen on.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: PathBuf,
    socket: UnixDatagram,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        // Short path: unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("nl-notify")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        NotifySocket {
            _dir: dir,
            path,
            socket,
        }
    }

    fn path(&self) -> &str {
        self.path.to_str().expect("utf-8 path")
    }

    /// Datagrams until one equals `want` (panics after 20 s); returns all.
    fn until(&self, want: &str) -> Vec<String> {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = self
                .socket
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("waiting for {want:?} (got {seen:?}): {e}"));
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = message == want;
            seen.push(message);
            if done {
                return seen;
            }
        }
    }
}

#[test]
fn socket_activation_and_notifications() {
    let state = tempdir("nl-state");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let notify = NotifySocket::bind();
    // --listen names another port to show the inherited socket wins.
    let other = format!("127.0.0.1:{}", free_port());
    let mut daemon = Activated::start(
        Some(listener.as_raw_fd()),
        &[
            ("LISTEN_FDS", "1"),
            ("NOTIFY_SOCKET", notify.path()),
            ("WATCHDOG_USEC", "400000"),
        ],
        &[
            "--listen",
            &other,
            "--state-dir",
            state.path().to_str().expect("utf-8"),
        ],
    );
    // Only the daemon holds the socket now: if it were not serving on it,
    // connections would queue unanswered.
    drop(listener);
    assert_eq!(daemon.listening(), addr);
    assert_eq!(notify.until("READY=1"), ["READY=1"]);

    let response = request(addr, "GET", "/v2/", &[]);
    assert_eq!(response.status, 200, "{response}");
    assert!(
        std::net::TcpStream::connect(&other).is_err(),
        "--listen must be ignored under socket activation"
    );
    // Pings at half of WATCHDOG_USEC.
    notify.until("WATCHDOG=1");
    notify.until("WATCHDOG=1");

    daemon.proc.signal(libc::SIGTERM);
    let before_stopping = notify.until("STOPPING=1");
    assert!(
        before_stopping
            .iter()
            .all(|m| m == "WATCHDOG=1" || m == "STOPPING=1"),
        "{before_stopping:?}"
    );
    let status = daemon.wait(Duration::from_secs(15));
    assert!(status.success(), "exit after SIGTERM: {status}");
}

#[test]
fn without_systemd_the_daemon_binds_its_own_listener() {
    let state = tempdir("nl-state");
    // Variables meant for another process (an ancestor that did not unset
    // them) are ignored, even with a listening socket at fd 3.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let inherited = listener.local_addr().expect("addr");
    let cmd_env = [("LISTEN_FDS", "1"), ("LISTEN_PID", "1")];
    let mut daemon = Activated::start(
        Some(listener.as_raw_fd()),
        &cmd_env,
        &[
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state.path().to_str().expect("utf-8"),
        ],
    );
    let addr = daemon.listening();
    assert_ne!(addr, inherited);
    assert_eq!(request(addr, "GET", "/v2/", &[]).status, 200);
    assert!(daemon.terminate().success());
}

#[test]
fn an_inherited_socket_that_is_not_tcp_is_refused() {
    let state = tempdir("nl-state");
    let dir = tempfile::Builder::new()
        .prefix("nl-unix")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let unix = std::os::unix::net::UnixListener::bind(dir.path().join("s")).expect("bind");
    let mut daemon = Activated::start(
        Some(unix.as_raw_fd()),
        &[("LISTEN_FDS", "1")],
        &["--state-dir", state.path().to_str().expect("utf-8")],
    );
    let status = daemon.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{status}");
}

/// The packaged config parses, and its `listen` is the socket unit's address
/// (so `setup --config` points clients where systemd listens).
#[test]
fn packaged_config_matches_the_socket_unit() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/config.toml");
    let text = fs::read_to_string(&config).expect("read packaging/config.toml");
    let value: toml::Value = toml::from_str(&text).expect("valid TOML");
    let listen = value["listen"].as_str().expect("listen");
    let socket = fs::read_to_string(unit("nixery-local.socket")).expect("read");
    assert!(
        socket.contains(&format!("\nListenStream={listen}\n")),
        "listen = {listen:?} is not the socket's ListenStream="
    );
    // The daemon itself accepts the file (unknown keys are refused).
    let hosts = tempdir("nl-hosts");
    let out = output_timeout(
        Command::new(bin())
            .args(["setup", "containerd", "--dry-run", "--config"])
            .arg(&config)
            .arg("--hosts-dir")
            .arg(hosts.path()),
        Duration::from_secs(30),
    );
    assert_success("setup --config packaging/config.toml", &out);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("[host.\"http://{listen}\"]")));
}

/// A stop during a Nix build lets the build finish (what KillMode=mixed in
/// the unit relies on: only the daemon gets SIGTERM): the pull waiting for
/// the build gets its image, the daemon exits 0 once the build ends, and
/// Nix was not interrupted.
#[test]
fn stopping_waits_for_running_builds() {
    require_nix();
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos()
    );
    let daemon = Daemon::builder()
        .args(nix_args(&[]))
        .env("NIXERY_TEST_NONCE", &nonce)
        .env("NIXERY_LOCAL_LOG", "debug")
        .start();
    let log = daemon.log().clone();
    let addr = daemon.addr();
    let pull = std::thread::spawn(move || {
        fetch(
            addr,
            "GET",
            "/v2/nix/napping/manifests/latest",
            &[("Accept", OCI_MANIFEST)],
            Body::Keep,
            Duration::from_secs(120),
        )
    });
    assert!(
        log.wait_for("step=build", 1, Duration::from_secs(60)),
        "the build did not start:\n{}",
        log.text()
    );
    let status = daemon.stop_within(Duration::from_secs(60));
    let response = pull.join().expect("the pull thread");
    assert_eq!(
        response.status, 200,
        "the pull during the stop:\n{response}"
    );
    assert!(
        status.success(),
        "exit after SIGTERM during a build: {status}"
    );
    let text = log.text();
    assert!(text.contains("built Nix image"), "{text}");
    assert!(
        !text.contains("interrupted"),
        "Nix was interrupted:\n{text}"
    );
}
