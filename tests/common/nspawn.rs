//! A booted Debian under systemd-nspawn, for the packaged service on a real
//! systemd. `tests/nspawn-root.sh` prepares the root once and caches it
//! outside the clone; each [`Machine`] boots a private copy of it with only a
//! loopback network (`--private-network`, so its 127.0.0.1:7733 is its own)
//! and runs commands inside with `nsenter` into the container's PID 1: this
//! machine's PID 1 is not systemd, so there is no machined to register with
//! (`--register=no`) and no `systemd-run -M`. The nspawn invocation is the
//! one FIELD-NOTES §8 found to work here.

use std::collections::VecDeque;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::{
    assert_success, forward_lines, output_timeout, poll_until, repo, require_from, s, Proc,
};

/// What commands inside see: a clean environment, not the test's.
const ENV: [&str; 4] = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
    "LANG=C.UTF-8",
    "SYSTEMD_COLORS=0",
];

/// Console lines kept for a failed boot's message.
const CONSOLE_LINES: usize = 200;

/// Where tests/nspawn-root.sh keeps roots between runs, and where the
/// running copies live (on the same file system, for `--reflink`).
pub fn nspawn_cache() -> PathBuf {
    std::env::var_os("NIXERY_LOCAL_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/nixery-local-tests"))
}

/// Panics unless this runs as root with systemd-nspawn, debootstrap and
/// nsenter installed.
pub fn require_nspawn() {
    // SAFETY: getuid has no preconditions.
    assert_eq!(
        unsafe { libc::getuid() },
        0,
        "booting a container needs root (sudo tests/run.sh)"
    );
    require_from("systemd-nspawn", "systemd-container");
    require_from("debootstrap", "debootstrap");
    require_from("nsenter", "util-linux");
}

/// The cached root of `kind` (`booted` or `plain`, see
/// tests/nspawn-root.sh), built first when missing: minutes, once per
/// package list. Its progress goes to the test's stderr.
pub fn cached_root(kind: &str) -> PathBuf {
    let script = repo().join("tests/nspawn-root.sh");
    let mut cmd = Command::new(&script);
    cmd.arg(kind);
    let mut proc = Proc::spawn(cmd);
    forward_lines("nspawn-root".into(), proc.stderr(), |_| {});
    let mut stdout = proc.stdout();
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let status = proc.wait_or_panic(Duration::from_secs(1800), "tests/nspawn-root.sh");
    let text = reader.join().expect("stdout reader");
    assert!(status.success(), "tests/nspawn-root.sh {kind}: {status}");
    let root = PathBuf::from(
        text.lines()
            .last()
            .expect("the script prints the root")
            .trim(),
    );
    assert!(
        root.join("usr/bin").is_dir(),
        "{} is no root",
        root.display()
    );
    root
}

/// A booted copy of a cached root; powered off and deleted when dropped.
pub struct Machine {
    name: String,
    root: PathBuf,
    nspawn: Proc,
    /// The container's PID 1, as this machine numbers it (0 until known).
    leader: u32,
    console: Arc<Mutex<VecDeque<String>>>,
}

impl Machine {
    /// Copies `cached` and boots the copy; returns once systemd inside has
    /// finished starting up.
    pub fn boot(cached: &Path) -> Machine {
        static N: AtomicUsize = AtomicUsize::new(0);
        let runs = nspawn_cache().join("runs");
        fs::create_dir_all(&runs).expect("create the runs directory");
        reap_orphans(&runs);
        // Unique per test process and machine: nspawn keeps per-machine
        // state under /run/systemd/nspawn/ by this name.
        let name = format!(
            "nl-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let root = runs.join(&name);
        let out = output_timeout(
            Command::new("cp")
                .args(["-a", "--reflink=auto"])
                .arg(cached)
                .arg(&root),
            Duration::from_secs(600),
        );
        if !out.status.success() {
            let _ = fs::remove_dir_all(&root);
            assert_success("cp -a the cached root", &out);
        }

        let mut cmd = Command::new("systemd-nspawn");
        cmd.env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .args(["--quiet", "--boot", "--directory"])
            .arg(&root)
            .args(["--machine", &name])
            .args(["--register=no", "--keep-unit", "--private-network"])
            .arg("--system-call-filter=keyctl add_key request_key bpf");
        let mut nspawn = Proc::spawn(cmd);
        let console = Arc::new(Mutex::new(VecDeque::new()));
        for stream in [
            Box::new(nspawn.stdout()) as Box<dyn Read + Send>,
            Box::new(nspawn.stderr()),
        ] {
            let console = console.clone();
            forward_lines(String::new(), stream, move |line| {
                let mut c = console.lock().unwrap();
                if c.len() == CONSOLE_LINES {
                    c.pop_front();
                }
                c.push_back(line.to_owned());
            });
        }
        let mut m = Machine {
            name,
            root,
            nspawn,
            leader: 0,
            console,
        };
        m.find_leader();
        m.wait_booted();
        m
    }

    /// The machine's name (also its hostname).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `path` inside the container as a path on this machine: files written
    /// there appear inside (the root is a plain directory).
    pub fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// The container's console so far (its last lines).
    pub fn console(&self) -> String {
        let c = self.console.lock().unwrap();
        c.iter().map(|l| format!("{l}\n")).collect()
    }

    /// The nspawn child whose pid namespace starts with it: PID 1 inside.
    fn find_leader(&mut self) {
        let nspawn = self.nspawn.id();
        let mut leader = None;
        let found = poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
            leader = children(nspawn)
                .into_iter()
                .find(|&pid| is_pid_namespace_init(pid));
            leader.is_some()
        });
        assert!(
            found,
            "no container init under systemd-nspawn ({nspawn}) after 30 s; console:\n{}",
            self.console()
        );
        self.leader = leader.expect("found");
    }

    /// Waits for `systemctl is-system-running --wait` to say running (or
    /// degraded: a unit that cannot work in a container is not ours).
    fn wait_booted(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Some(status) = self.nspawn.exited() {
                panic!(
                    "systemd-nspawn exited during boot ({status}); console:\n{}",
                    self.console()
                );
            }
            let out = self.output(
                &["systemctl", "is-system-running", "--wait"],
                Duration::from_secs(120),
            );
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            match state.as_str() {
                "running" => return,
                "degraded" => {
                    let failed = self.output(
                        &["systemctl", "--failed", "--no-pager", "--no-legend"],
                        Duration::from_secs(30),
                    );
                    eprintln!(
                        "{}: booted degraded; failed units:\n{}",
                        self.name,
                        String::from_utf8_lossy(&failed.stdout)
                    );
                    return;
                }
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "{} did not finish booting in 180 s (state {state:?}, {}); console:\n{}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim(),
                self.console()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// `args` run inside the container (all its namespaces, as root, in a
    /// clean environment), not yet started.
    pub fn command(&self, args: &[&str]) -> Command {
        assert!(self.leader != 0, "the container has no init yet");
        let mut cmd = Command::new("nsenter");
        cmd.args(["--target", &self.leader.to_string(), "--all", "--"])
            .args(["env", "-i"])
            .args(ENV)
            .args(args);
        cmd
    }

    /// `args` run inside to completion, killed after `timeout`.
    pub fn output(&self, args: &[&str], timeout: Duration) -> Output {
        output_timeout(&mut self.command(args), timeout)
    }

    /// [`Machine::output`] that must succeed; returns stdout.
    pub fn run_ok(&self, args: &[&str], timeout: Duration) -> String {
        let out = self.output(args, timeout);
        assert_success(&format!("{} (in {})", args.join(" "), self.name), &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `sh -c SCRIPT` inside, which must succeed; returns stdout.
    pub fn sh_ok(&self, script: &str, timeout: Duration) -> String {
        self.run_ok(&["sh", "-c", script], timeout)
    }

    /// `args` started inside in the background.
    pub fn spawn(&self, args: &[&str]) -> Proc {
        Proc::spawn(self.command(args))
    }

    /// The last `lines` lines of the journal of `units` inside.
    pub fn journal(&self, units: &[&str], lines: usize) -> String {
        let mut args = vec!["journalctl", "--no-pager", "--quiet", "-o", "short-precise"];
        for u in units {
            args.extend(["-u", u]);
        }
        let n = lines.to_string();
        args.extend(["-n", &n]);
        let out = self.output(&args, Duration::from_secs(30));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// A unit's state as `systemctl is-active` prints it.
    pub fn unit_state(&self, unit: &str) -> String {
        let out = self.output(&["systemctl", "is-active", unit], Duration::from_secs(30));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Powers the container off (nspawn turns SIGTERM into an orderly
    /// shutdown), kills what is left, and deletes the copy.
    fn power_off(&mut self) {
        if self.nspawn.is_running() {
            self.nspawn.signal(libc::SIGTERM);
            if self.nspawn.wait(Duration::from_secs(60)).is_none() {
                eprintln!("{}: no shutdown within 60 s, killing it", self.name);
            }
        }
        self.nspawn.kill();
        // nspawn gone, the container may not be: its init outlives a killed
        // nspawn. Killing a pid namespace's init kills the namespace.
        kill_containers_of(&self.root);
        if let Err(e) = fs::remove_dir_all(&self.root) {
            eprintln!("{}: cannot remove {}: {e}", self.name, self.root.display());
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.power_off();
    }
}

/// The pids whose parent is `parent`.
fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            status_field(*pid, "PPid").is_some_and(|ppid| ppid.trim() == parent.to_string())
        })
        .collect()
}

/// A field of /proc/PID/status.
fn status_field(pid: u32, name: &str) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::to_owned)
}

/// PID 1 of a pid namespace below ours (`NSpid: <ours> … 1`).
fn is_pid_namespace_init(pid: u32) -> bool {
    status_field(pid, "NSpid").is_some_and(|f| {
        let ids: Vec<&str> = f.split_whitespace().collect();
        ids.len() > 1 && ids.last() == Some(&"1")
    })
}

/// SIGKILLs every container init whose root directory is `root` (what a
/// killed nspawn leaves running), and waits for them to go.
fn kill_containers_of(root: &Path) {
    let Ok(meta) = fs::metadata(root) else {
        return;
    };
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    let inits: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| is_pid_namespace_init(pid))
        .filter(|pid| {
            fs::metadata(format!("/proc/{pid}/root/."))
                .is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
        })
        .collect();
    for &pid in &inits {
        // SAFETY: kill(2) on a pid that is a container init on this root.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
    poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        inits
            .iter()
            .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    });
}

/// Removes the copies of dead test processes (`nl-<pid>-<n>`), first
/// killing their containers if nspawn died without powering them off.
fn reap_orphans(runs: &Path) {
    let Ok(entries) = fs::read_dir(runs) else {
        return;
    };
    for e in entries.flatten() {
        let file_name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_name
            .strip_prefix("nl-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("removing {} (its test process is gone)", s(&e.path()));
        kill_containers_of(&e.path());
        let _ = fs::remove_dir_all(e.path());
    }
}
