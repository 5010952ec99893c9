//! Child processes: prerequisites on PATH, spawning a child tied to the test
//! binary ([`Proc`]: killed on drop and when the test binary dies), copying
//! its output to the test's stderr, running a command with a time limit, and
//! polling with a deadline.

use std::io::{self, BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Panics unless `cmd` is an executable on PATH (or an absolute path),
/// naming the Debian package that ships it.
pub fn require(cmd: &str) {
    let package = match cmd {
        "containerd" | "ctr" | "containerd-shim-runc-v2" => "containerd",
        "busybox" => "busybox-static",
        "mount" | "umount" => "mount",
        "htpasswd" => "apache2-utils",
        "systemd-analyze" => "systemd",
        "dockerd" => "docker.io",
        other => other,
    };
    require_from(cmd, package);
}

/// Panics unless `cmd` is an executable on PATH, naming `package`.
pub fn require_from(cmd: &str, package: &str) {
    assert!(
        which(cmd).is_some(),
        "prerequisite {cmd} missing: install with apt-get install {package}"
    );
}

fn which(cmd: &str) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if cmd.contains('/') {
        let p = PathBuf::from(cmd);
        return is_exec(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join(cmd))
        .find(|p| is_exec(p))
}

/// Calls `done` every `step` until it is true (then true) or `timeout`
/// has passed (then false).
pub fn poll_until(timeout: Duration, step: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(step);
    }
}

/// A loopback port that was free a moment ago (for servers that cannot bind
/// port 0 and report it, like docker-registry).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Runs `cmd` to completion like `Command::output`, but kills it after
/// `timeout` (then the returned status is the kill's) so a hung client cannot
/// hang the suite.
pub fn output_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    let collect = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = collect(Box::new(child.stdout.take().unwrap()));
    let err = collect(Box::new(child.stderr.take().unwrap()));
    let status = match wait_timeout(&mut child, timeout) {
        Some(status) => status,
        None => {
            eprintln!("timeout after {timeout:?}, killing {desc}");
            let _ = child.kill();
            child.wait().expect("wait")
        }
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Panics with both output streams unless `out` succeeded.
pub fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// [`output_timeout`] that must succeed ([`assert_success`] with `what`);
/// returns stdout.
pub fn run_ok(what: &str, cmd: &mut Command, timeout: Duration) -> String {
    let out = output_timeout(cmd, timeout);
    assert_success(what, &out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    poll_until(timeout, Duration::from_millis(20), || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    status
}

/// Copies a child's output stream line by line to the test's stderr (which
/// the test harness captures and shows on failure), each line also handed
/// to `each` (which may keep it).
pub fn forward_lines<R, F>(prefix: String, stream: R, mut each: F)
where
    R: Read + Send + 'static,
    F: FnMut(&str) + Send + 'static,
{
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if !prefix.is_empty() {
                eprintln!("[{prefix}] {line}");
            }
            each(&line);
        }
    });
}

/// Spawns `cmd` from one thread that lives as long as the test process, with
/// PR_SET_PDEATHSIG: the kernel kills the child when that thread (i.e. the
/// test binary) dies, even on abort or for a `static` daemon never dropped.
/// Spawning from the calling test thread would kill it when that test ends.
fn spawn_tied(mut cmd: Command) -> io::Result<Child> {
    type Req = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Req>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Req>();
        thread::Builder::new()
            .name("child-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn child-spawner thread");
        Mutex::new(tx)
    });
    // SAFETY: prctl is async-signal-safe and touches no Rust state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock()
        .unwrap()
        .send((cmd, reply_tx))
        .expect("child-spawner alive");
    reply_rx.recv().expect("child-spawner replied")
}

/// A child process tied to the test binary: SIGKILLed and reaped when
/// dropped, and killed by the kernel when the test binary dies.
pub struct Proc {
    child: Option<Child>,
}

impl Proc {
    /// Spawns `cmd` with stdin from /dev/null and stdout and stderr piped
    /// (take them with [`Proc::stdout`] and [`Proc::stderr`]).
    pub fn spawn(mut cmd: Command) -> Proc {
        let desc = format!("{:?}", cmd.get_program());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = spawn_tied(cmd).unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
        Proc { child: Some(child) }
    }

    fn child(&self) -> &Child {
        self.child.as_ref().expect("the process was reaped")
    }

    pub fn stdout(&mut self) -> ChildStdout {
        self.child.as_mut().unwrap().stdout.take().expect("stdout")
    }

    pub fn stderr(&mut self) -> ChildStderr {
        self.child.as_mut().unwrap().stderr.take().expect("stderr")
    }

    pub fn id(&self) -> u32 {
        self.child().id()
    }

    /// Its exit status if it has exited (it is then reaped).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().expect("try_wait")?;
        self.child = None;
        Some(status)
    }

    /// Not exited, and not killed by this handle.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: plain kill(2) on a pid we spawned and have not reaped yet.
        unsafe {
            libc::kill(self.id() as libc::pid_t, sig);
        }
    }

    /// Waits up to `timeout` for it to exit; None if it is still running.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = wait_timeout(self.child.as_mut()?, timeout)?;
        self.child = None;
        Some(status)
    }

    /// [`Proc::wait`] that must succeed: kills it and panics (naming
    /// `what`) if it has not exited within `timeout`.
    pub fn wait_or_panic(&mut self, timeout: Duration, what: &str) -> ExitStatus {
        match self.wait(timeout) {
            Some(status) => status,
            None => {
                self.kill();
                panic!("{what} did not exit within {timeout:?}");
            }
        }
    }

    /// SIGTERM, then up to `timeout`; SIGKILL if it is still running then.
    /// None if it needed the SIGKILL.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.child.as_ref()?;
        self.signal(libc::SIGTERM);
        let status = self.wait(timeout);
        self.kill();
        status
    }

    /// SIGKILL and reap (nothing if it is already reaped).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Unmounts (lazily) everything mounted under `base`, deepest first: what
/// a container runtime left behind.
pub fn unmount_all_under(base: &std::path::Path) {
    let base = base.to_string_lossy().into_owned();
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| p.starts_with(&base))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for m in mounts {
        let c = std::ffi::CString::new(m).unwrap();
        // SAFETY: umount2 with a valid C string.
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
}
