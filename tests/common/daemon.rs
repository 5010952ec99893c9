//! The daemon under test: [`Daemon::builder`] is the one way to start
//! `nixery-local serve` (arguments, environment, state directory, images
//! imported first); its stderr is kept as a [`DaemonLog`]. With
//! [`DaemonBuilder::in_process`] the same flags run the library's daemon
//! ([`nixery_local::app::App`]) on a thread of the test instead, on port 0,
//! as mini-redis tests its server. Also `import`, and what the daemon's
//! cache directory holds.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use tempfile::TempDir;

use super::{
    assert_success, blob_path, busybox_layout, docker_v2_layout, forward_lines,
    multi_platform_layout, output_timeout, poll_until, request, scratch_dir, DockerRegistry, Proc,
    Response, TestImage,
};

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_nixery-local")
}

/// A running `nixery-local serve` on a loopback port of its choosing;
/// SIGKILLed (or, in process, shut down) when dropped.
pub struct Daemon {
    addr: SocketAddr,
    state_dir: PathBuf,
    log: DaemonLog,
    runner: Runner,
    // After `runner`: the daemon is gone before its state directory is.
    _tmp: Option<TempDir>,
}

/// Where the daemon runs.
enum Runner {
    /// The binary, as users run it.
    Process(Proc),
    /// The library's HTTP edge in this test process.
    InProcess(InProcess),
}

/// `App::serve` on a thread with a runtime of its own; dropping it shuts the
/// server down and waits for it.
struct InProcess {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    /// Serves `state_dir` with the flags of `serve` in `args`; returns once
    /// it listens.
    fn start(state_dir: &Path, args: &[OsString]) -> (InProcess, SocketAddr) {
        #[derive(clap::Parser)]
        struct Serve {
            #[command(flatten)]
            options: nixery_local::config::Options,
        }
        let mut argv: Vec<OsString> = vec!["serve".into(), "--state-dir".into()];
        argv.push(state_dir.as_os_str().to_owned());
        argv.extend(args.iter().cloned());
        let serve = <Serve as clap::Parser>::try_parse_from(argv)
            .unwrap_or_else(|e| panic!("in-process daemon flags: {e}"));
        let settings = serve
            .options
            .resolve()
            .unwrap_or_else(|e| panic!("in-process daemon settings: {e}"));
        let upstreams =
            nixery_local::sources::mirror::upstream::Upstreams::new(settings.upstream.clone())
                .unwrap_or_else(|e| panic!("in-process daemon upstreams: {e}"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let app = nixery_local::app::App::open(&settings, upstreams)
                    .unwrap_or_else(|e| panic!("in-process daemon: {e:?}"));
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind 127.0.0.1:0");
                let addr = listener.local_addr().expect("local addr");
                let ready = move || {
                    let _ = tx.send(addr);
                };
                let shutdown = async {
                    let _ = stopped.await;
                };
                app.serve(&settings, listener, ready, shutdown)
                    .await
                    .unwrap_or_else(|e| panic!("in-process daemon: {e:?}"));
            });
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("in-process daemon never listened: {e:?}"));
        let server = InProcess {
            stop: Some(stop),
            thread: Some(thread),
        };
        (server, addr)
    }

    fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How to start a [`Daemon`]: see [`Daemon::builder`].
#[derive(Default)]
pub struct DaemonBuilder {
    state_dir: Option<PathBuf>,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    imports: Vec<(TestImage, String)>,
    in_process: bool,
}

impl DaemonBuilder {
    /// Serve this state directory (e.g. after `import`) rather than a fresh
    /// temporary one.
    pub fn state_dir(mut self, dir: &Path) -> Self {
        self.state_dir = Some(dir.to_path_buf());
        self
    }

    /// Arguments after `serve --listen 127.0.0.1:0 --state-dir DIR`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Adds `key=value` to the daemon's environment (a later value for the
    /// same key wins).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// No Docker credentials but what a later [`DaemonBuilder::env`] gives
    /// it (the machine's `~/.docker/config.json` must not leak into auth
    /// tests), and debug logging.
    pub fn isolated(self) -> Self {
        static HOME: OnceLock<PathBuf> = OnceLock::new();
        let home = HOME.get_or_init(|| scratch_dir("mirror-empty-home"));
        self.env("HOME", home)
            .env("DOCKER_CONFIG", home)
            .env("NIXERY_LOCAL_LOG", "debug")
    }

    /// Imports `image` as `reference` (asserting success, see [`import_ok`])
    /// into the state directory before the daemon starts.
    pub fn import(mut self, image: &TestImage, reference: &str) -> Self {
        self.imports.push((image.clone(), reference.to_owned()));
        self
    }

    /// Runs the daemon in this test process (see the module doc); for the
    /// protocol suites, which need no process of their own.
    pub fn in_process(mut self) -> Self {
        self.in_process = true;
        self
    }

    /// Runs the imports, starts the daemon and waits for its listening line.
    pub fn start(self) -> Daemon {
        let tmp = match self.state_dir {
            Some(_) => None,
            None => Some(
                tempfile::Builder::new()
                    .prefix("nl-state")
                    .tempdir()
                    .expect("tempdir"),
            ),
        };
        let state_dir = self
            .state_dir
            .unwrap_or_else(|| tmp.as_ref().unwrap().path().to_path_buf());
        for (image, reference) in &self.imports {
            import_ok(&state_dir, image, reference);
        }
        if self.in_process {
            // The environment is the test process's own: it cannot differ.
            assert!(self.env.is_empty(), "an in-process daemon takes no env");
            let (server, addr) = InProcess::start(&state_dir, &self.args);
            return Daemon {
                addr,
                state_dir,
                log: DaemonLog::default(),
                runner: Runner::InProcess(server),
                _tmp: tmp,
            };
        }
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(&state_dir)
            .args(&self.args)
            .envs(self.env);
        let mut proc = Proc::spawn(cmd);
        let log = DaemonLog::default();
        let sink = log.clone();
        forward_lines("daemon".into(), proc.stderr(), move |line| {
            sink.push(line.to_owned())
        });
        let (tx, rx) = mpsc::channel();
        let mut tx = Some(tx);
        forward_lines("daemon stdout".into(), proc.stdout(), move |line| {
            if line.starts_with("nixery-local listening on ") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(line.to_owned());
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(e) => {
                let status = proc.exited();
                proc.kill();
                panic!(
                    "daemon never printed its listening line ({e:?}); exit: {status:?}\n{}",
                    log.text()
                );
            }
        };
        let addr: SocketAddr = line
            .strip_prefix("nixery-local listening on http://")
            .map(|u| u.trim_end_matches('/'))
            .and_then(|u| u.parse().ok())
            .unwrap_or_else(|| panic!("unexpected listening line {line:?}"));
        assert!(addr.ip().is_loopback(), "daemon bound {addr}");
        Daemon {
            addr,
            state_dir,
            log,
            runner: Runner::Process(proc),
            _tmp: tmp,
        }
    }
}

impl Daemon {
    /// The one way to start a daemon: set what differs, then `.start()`.
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder::default()
    }

    /// `serve EXTRA_ARGS` on a fresh temporary state directory.
    pub fn start(extra_args: &[&str]) -> Daemon {
        Daemon::builder().args(extra_args).start()
    }

    /// `serve EXTRA_ARGS` on an existing state directory (e.g. after `import`).
    pub fn start_in(state_dir: &Path, extra_args: &[&str]) -> Daemon {
        Daemon::builder()
            .state_dir(state_dir)
            .args(extra_args)
            .start()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT`
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Its stderr so far (and from now on); empty in process.
    pub fn log(&self) -> &DaemonLog {
        &self.log
    }

    fn process(&mut self) -> &mut Proc {
        match &mut self.runner {
            Runner::Process(proc) => proc,
            Runner::InProcess(_) => panic!("the in-process daemon has no process"),
        }
    }

    pub fn pid(&mut self) -> u32 {
        self.process().id()
    }

    pub fn is_alive(&mut self) -> bool {
        match &mut self.runner {
            Runner::Process(proc) => proc.is_running(),
            Runner::InProcess(server) => server.is_running(),
        }
    }

    /// SIGTERM, then wait up to 10 s; panics (after SIGKILL) if it hangs.
    pub fn stop(self) -> ExitStatus {
        self.stop_within(Duration::from_secs(10))
    }

    /// SIGTERM, then waits up to `limit` for the exit.
    pub fn stop_within(mut self, limit: Duration) -> ExitStatus {
        self.process()
            .terminate(limit)
            .unwrap_or_else(|| panic!("daemon did not exit within {limit:?} of SIGTERM"))
    }

    /// Shorthand for [`request`] `GET path` against this daemon.
    pub fn get(&self, path: &str) -> Response {
        request(self.addr, "GET", path, &[])
    }
}

/// A daemon for a whole test binary (on a scratch directory: statics are
/// never dropped) holding a busybox image of each kind, imported before it
/// starts: OCI as `docker.io/library/hello:1`, Docker schema 2 as
/// `docker.io/library/hello-docker:1`, multi-platform as
/// `docker.io/library/hello-multi:1`, and OCI as `ghcr_ref`. Each image
/// echoes its message from `messages` (in that order). docker.io and
/// ghcr.io are an empty loopback registry, so anything else is a real miss
/// (404), not an unreachable upstream (502).
pub struct ImageFixture {
    pub daemon: Daemon,
    pub oci: TestImage,
    pub docker: TestImage,
    pub multi: TestImage,
    pub ghcr: TestImage,
    _upstream: DockerRegistry,
}

impl ImageFixture {
    pub fn start(name: &str, messages: [&str; 4], ghcr_ref: &str) -> ImageFixture {
        let dir = scratch_dir(name);
        let [oci_msg, docker_msg, multi_msg, ghcr_msg] = messages;
        let oci = busybox_layout(&dir.join("oci"), "1", oci_msg);
        let docker = docker_v2_layout(&dir.join("docker"), "1", docker_msg);
        let multi = multi_platform_layout(&dir.join("multi"), "1", multi_msg);
        let ghcr = busybox_layout(&dir.join("ghcr"), "1", ghcr_msg);
        let upstream = DockerRegistry::start();
        let daemon = Daemon::builder()
            .state_dir(&dir.join("state"))
            .import(&oci, "docker.io/library/hello:1")
            .import(&docker, "docker.io/library/hello-docker:1")
            .import(&multi, "docker.io/library/hello-multi:1")
            .import(&ghcr, ghcr_ref)
            .args(["docker.io", "ghcr.io"].map(|h| format!("--upstream={h}={}", upstream.url())))
            .start();
        ImageFixture {
            daemon,
            oci,
            docker,
            multi,
            ghcr,
            _upstream: upstream,
        }
    }
}

/// The stderr lines of a [`Daemon`], kept for assertions (and still
/// forwarded to the test's stderr).
#[derive(Clone, Default)]
pub struct DaemonLog(Arc<Mutex<Vec<String>>>);

impl DaemonLog {
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Every line, joined, for assertion messages.
    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// How many lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until at least `n` lines contain `needle`; false on timeout.
    pub fn wait_for(&self, needle: &str, n: usize, timeout: Duration) -> bool {
        poll_until(timeout, Duration::from_millis(20), || {
            self.count(needle) >= n
        })
    }

    fn push(&self, line: String) {
        self.0.lock().unwrap().push(line);
    }
}

/// `nixery-local import --state-dir STATE LAYOUT REF`
pub fn import(state_dir: &Path, layout: &Path, reference: &str) -> Output {
    output_timeout(
        Command::new(bin())
            .arg("import")
            .arg("--state-dir")
            .arg(state_dir)
            .arg(layout)
            .arg(reference),
        Duration::from_secs(60),
    )
}

/// Imports `image` as `reference`, asserting success and that the reported
/// digest is the layout's top-level manifest/index digest.
pub fn import_ok(state_dir: &Path, image: &TestImage, reference: &str) {
    let out = import(state_dir, &image.dir, reference);
    assert_success(&format!("import {reference}"), &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.trim();
    assert!(
        line.starts_with("imported ") && line.ends_with(&format!(" {}", image.manifest_digest)),
        "import {reference}: expected `imported {reference} {}`, got {line:?}",
        image.manifest_digest
    );
}

/// Where the daemon keeps blob `digest` in its state directory (the same
/// `blobs/sha256/<hex>` as an OCI layout).
pub fn cached_blob(state_dir: &Path, digest: &str) -> PathBuf {
    blob_path(state_dir, digest)
}

/// Waits up to `timeout` for blob `digest` to be committed to the daemon's
/// cache (a download commits just after its last byte goes out).
pub fn wait_cached(state_dir: &Path, digest: &str, timeout: Duration) -> bool {
    let path = cached_blob(state_dir, digest);
    poll_until(timeout, Duration::from_millis(20), || path.is_file())
}

/// Every digest the daemon has under `blobs/` (sorted).
pub fn cached_digests(state_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(state_dir.join("blobs/sha256"))
        .map(|rd| {
            rd.flatten()
                .map(|e| format!("sha256:{}", e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
