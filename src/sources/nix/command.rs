//! The handle on the host's Nix ([`Nix`], configured by [`NixConfig`]) and
//! running one Nix command: in its own process group with stdin closed,
//! with a deadline (SIGTERM, then SIGKILL to the whole group), stdout
//! collected and the last lines of stderr kept (without terminal escapes)
//! for errors.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::sources::nix::error::{NixError, Step};

/// How to run Nix.
#[derive(Debug, Clone)]
pub(crate) struct NixConfig {
    /// Directory holding `nix-instantiate` and `nix-store`; `None` searches
    /// `PATH`.
    pub(crate) bin_dir: Option<PathBuf>,
    /// Deadline for one whole [`Nix::build`] (evaluation, build and queries).
    pub(crate) timeout: Duration,
    /// `--option NAME VALUE` pairs passed to every call (e.g.
    /// `substituters ""` offline).
    pub(crate) options: Vec<(String, String)>,
    /// Packages added to every image when the package set has them, as
    /// Nixery does with `cacert` and `iana-etc`; never reported missing.
    pub(crate) always_include: Vec<String>,
    /// How many lines of Nix's stderr errors carry.
    pub(crate) stderr_lines: usize,
}

impl Default for NixConfig {
    fn default() -> Self {
        NixConfig {
            bin_dir: None,
            timeout: Duration::from_secs(600),
            options: Vec::new(),
            always_include: vec!["cacert".to_owned(), "iana-etc".to_owned()],
            stderr_lines: 20,
        }
    }
}

/// A handle on the host's Nix. Cheap to clone; holds no processes.
#[derive(Debug, Clone)]
pub(crate) struct Nix {
    config: NixConfig,
}

impl Nix {
    pub(crate) fn new(config: NixConfig) -> Nix {
        Nix { config }
    }

    pub(crate) fn config(&self) -> &NixConfig {
        &self.config
    }

    pub(super) fn base_args(&self) -> Vec<OsString> {
        let mut args = Vec::new();
        for (name, value) in &self.config.options {
            args.extend(["--option".into(), name.into(), value.into()]);
        }
        args
    }

    /// `nix-store --version`, e.g. `nix-store (Nix) 2.8.0`: a cheap check
    /// that Nix runs at all.
    pub(crate) fn version(&self) -> Result<String, NixError> {
        let deadline = Instant::now() + Duration::from_secs(30).min(self.config.timeout);
        let out = self.run(
            "nix-store",
            vec!["--version".into()],
            deadline,
            Step::Version,
        )?;
        let out = self.expect_success(out, Step::Version)?;
        Ok(String::from_utf8_lossy(&out).trim().to_owned())
    }
    pub(super) fn init_store_once(&self, deadline: Instant) {
        static INIT: std::sync::Once = std::sync::Once::new();
        INIT.call_once(|| {
            let deadline = deadline.min(Instant::now() + Duration::from_secs(60));
            let result = self
                .run("nix-store", vec!["--init".into()], deadline, Step::Version)
                .and_then(|out| self.expect_success(out, Step::Version));
            // Not fatal: whatever is wrong shows up again, with context, in
            // the call that needs the store.
            if let Err(e) = result {
                tracing::debug!(error = %e, "nix-store --init failed");
            }
        });
    }
}

/// Output of a child process that exited.
pub(super) struct Finished {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr_tail: String,
}

/// stdout beyond this is an error: nothing we ask Nix for is that big.
const MAX_STDOUT: usize = 256 << 20;
/// Grace period between SIGTERM (Nix stops its builders) and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);

impl Nix {
    fn program(&self, name: &str) -> PathBuf {
        match &self.config().bin_dir {
            Some(dir) => dir.join(name),
            None => PathBuf::from(name),
        }
    }

    pub(super) fn expect_success(&self, out: Finished, step: Step) -> Result<Vec<u8>, NixError> {
        if out.status.success() {
            return Ok(out.stdout);
        }
        let status = out.status.to_string();
        let stderr_tail = out.stderr_tail;
        Err(match step {
            Step::Evaluate if stderr_tail.contains("was not found in the Nix search path") => {
                NixError::NoPackageSource
            }
            Step::Evaluate => NixError::EvalFailed {
                status,
                stderr_tail,
            },
            Step::Build => NixError::BuildFailed {
                status,
                stderr_tail,
            },
            step => NixError::CommandFailed {
                step,
                status,
                stderr_tail,
            },
        })
    }

    /// Runs one Nix command in its own process group with stdin closed,
    /// collecting stdout and the last
    /// [`NixConfig::stderr_lines`](crate::sources::nix::command::NixConfig::stderr_lines)
    /// lines of stderr (each line also goes to the debug log, as progress). Past
    /// `deadline` the group gets SIGTERM (Nix then stops its builders),
    /// then SIGKILL.
    pub(super) fn run(
        &self,
        program: &str,
        args: Vec<OsString>,
        deadline: Instant,
        step: Step,
    ) -> Result<Finished, NixError> {
        let path = self.program(program);
        let started = Instant::now();
        let mut child = Command::new(&path)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|source| {
                let program = path.display().to_string();
                if source.kind() == io::ErrorKind::NotFound {
                    NixError::NotInstalled { program, source }
                } else {
                    NixError::Io { program, source }
                }
            })?;
        tracing::debug!(program, %step, "started Nix");

        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let keep = self.config().stderr_lines.max(1);
        let out_reader = thread::spawn(move || -> io::Result<Vec<u8>> {
            let mut buf = Vec::new();
            if let Some(s) = stdout {
                s.take(MAX_STDOUT as u64 + 1).read_to_end(&mut buf)?;
            }
            Ok(buf)
        });
        let err_reader = thread::spawn(move || tail_lines(stderr, keep));

        let status = wait_until(&mut child, deadline);
        let stderr_tail = err_reader.join().unwrap_or_default();
        let stdout = out_reader.join();
        let status = match status {
            Ok(Some(status)) => status,
            Ok(None) => {
                return Err(NixError::Timeout {
                    step,
                    after: started.elapsed(),
                    stderr_tail,
                })
            }
            Err(source) => {
                return Err(NixError::Io {
                    program: path.display().to_string(),
                    source,
                })
            }
        };
        let stdout = match stdout {
            Ok(Ok(buf)) if buf.len() <= MAX_STDOUT => buf,
            Ok(Ok(_)) => {
                return Err(NixError::BadOutput {
                    step,
                    detail: format!("more than {MAX_STDOUT} bytes on stdout"),
                })
            }
            Ok(Err(source)) => {
                return Err(NixError::Io {
                    program: path.display().to_string(),
                    source,
                })
            }
            Err(_) => {
                return Err(NixError::Io {
                    program: path.display().to_string(),
                    source: io::Error::other("stdout reader panicked"),
                })
            }
        };
        tracing::debug!(program, %step, elapsed_ms = started.elapsed().as_millis() as u64, %status, "Nix finished");
        Ok(Finished {
            status,
            stdout,
            stderr_tail,
        })
    }
}

/// Waits for `child` until `deadline`. `Ok(None)`: it was killed for
/// running too long (and has been reaped).
fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    // Polling keeps ownership of `child` here, so the pid cannot be reaped
    // and reused behind our back before we signal it.
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
    signal_group(child, libc::SIGTERM);
    let grace = Instant::now() + KILL_GRACE;
    while Instant::now() < grace {
        if child.try_wait()?.is_some() {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
    signal_group(child, libc::SIGKILL);
    child.wait()?;
    Ok(None)
}

fn signal_group(child: &Child, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) has no memory-safety preconditions. The child is
        // unreaped (we own it and have not seen it exit), so its pid, which
        // is also its process group id (process_group(0)), is still ours.
        unsafe {
            libc::kill(-pid, signal);
        }
    }
}

/// Reads `stream` to the end, logging each line and returning the last
/// `keep` non-empty lines with terminal escapes removed.
fn tail_lines(stream: Option<impl Read>, keep: usize) -> String {
    let Some(stream) = stream else {
        return String::new();
    };
    let mut reader = BufReader::new(stream);
    let mut tail: VecDeque<String> = VecDeque::with_capacity(keep + 1);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        // A runaway line must not eat memory: keep its start.
        line.truncate(4096);
        let text = strip_ansi(&String::from_utf8_lossy(&line));
        let text = text.trim_end();
        if text.trim().is_empty() {
            continue;
        }
        tracing::debug!(target: "nixery_local::sources::nix::runner::stderr", "{text}");
        if tail.len() == keep {
            tail.pop_front();
        }
        tail.push_back(text.to_owned());
    }
    Vec::from(tail).join("\n")
}

/// Removes ANSI escape sequences (Nix colours some messages).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            // CSI: parameters and intermediates, then one final byte.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    use crate::sources::nix::command::NixConfig;
    use crate::sources::nix::name::ImageName;
    use crate::sources::nix::pkgset::PkgSource;
    use crate::sources::nix::runner::tests::test_nix;

    #[test]
    fn stderr_tail_keeps_last_lines_without_escapes() {
        let input = "one\n\n\u{1b}[31;1merror:\u{1b}[0m two\nthree\nfour";
        assert_eq!(
            tail_lines(Some(input.as_bytes()), 3),
            "error: two\nthree\nfour"
        );
        assert_eq!(tail_lines(Some(input.as_bytes()), 1), "four");
    }

    #[test]
    fn timeouts_kill_the_build() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("default.nix");
        // A fresh derivation each run, so nothing is cached.
        let nonce = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let pkgs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pkgs");
        std::fs::write(
            &file,
            format!(
                "{{ ... }}: {{ slow = (import {} {{}}).slow {{ nonce = \"{nonce}\"; }}; }}",
                pkgs.display()
            ),
        )
        .expect("write");
        let nix = test_nix(Duration::from_secs(3));
        let started = Instant::now();
        let err = nix
            .build(
                &PkgSource::Path { path: file },
                &ImageName::parse("slow").expect("valid"),
                None,
            )
            .expect_err("times out");
        assert!(
            matches!(
                err,
                NixError::Timeout {
                    step: Step::Build,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3) + KILL_GRACE + Duration::from_secs(2));
        assert!(err.to_string().contains("slow-"), "{err}");
    }

    #[test]
    fn missing_nix_is_reported_as_such() {
        let nix = Nix::new(NixConfig {
            bin_dir: Some(PathBuf::from("/nonexistent/nix/bin")),
            ..NixConfig::default()
        });
        assert!(matches!(nix.version(), Err(NixError::NotInstalled { .. })));
    }
}
