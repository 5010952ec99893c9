//! The Debian package on a booted Debian: systemd-nspawn boots a private copy
//! of a cached bookworm root (tests/nspawn-root.sh) with a loopback-only
//! network; the .deb of the binary under test and the tests' package set go
//! in; then the real programs inside drive the service, each a checked step:
//! `systemctl start`, `nixery-local setup containerd`, ctr pulling and
//! running a Nix image built through nix-daemon as the service user,
//! `nixery-local import` as the README shows it, socket activation, a
//! restart in the middle of a build, and `dpkg -P`.
//!
//! Needs root, systemd-nspawn and debootstrap, and Debian's mirror the first
//! time (the root is cached in /var/cache/nixery-local-tests; the container
//! itself has no network). A failed step does not stop the independent ones
//! after it: booting costs seconds, so one run reports every broken step,
//! each with the tail of the service's and nix-daemon's journal.

mod common;

use std::fs;
use std::io::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const CONFIG: &str = "/etc/nixery-local/config.toml";
const HOSTS_DIR: &str = "/etc/containerd/certs.d";
/// The tests' package set, copied into the root.
const PKGS_INSIDE: &str = "/srv/nixery-local-pkgs";
/// The OCI layout imported with `nixery-local import`, and what it echoes.
const LAYOUT_INSIDE: &str = "/var/tmp/booted-layout";
const IMPORTED_REF: &str = "docker.io/library/booted:1.0";
const IMPORTED_SAYS: &str = "imported-into-the-booted-service";

const MINUTE: Duration = Duration::from_secs(60);

/// The checked steps of one boot: a failing step is recorded with the
/// journal's tail, and the run goes on unless later steps need it.
struct Steps<'a> {
    m: &'a Machine,
    failed: Vec<String>,
}

impl Steps<'_> {
    /// Runs `step`; false (and recorded) if it panicked.
    fn run(&mut self, name: &str, step: impl FnOnce(&Machine)) -> bool {
        eprintln!("--- step: {name}");
        let started = Instant::now();
        match panic::catch_unwind(AssertUnwindSafe(|| step(self.m))) {
            Ok(()) => {
                eprintln!("--- ok: {name} ({:.1?})", started.elapsed());
                true
            }
            Err(e) => {
                let message = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "(no message)".into());
                let journal = self.m.journal(&["nixery-local", "nix-daemon"], 60);
                self.failed.push(format!(
                    "step {name:?} failed: {message}\n\
                     --- journalctl -u nixery-local -u nix-daemon (last 60 lines) ---\n{journal}"
                ));
                eprintln!("--- FAILED: {name} ({:.1?})", started.elapsed());
                false
            }
        }
    }

    /// [`Steps::run`] for a step the rest depend on: stops at its failure.
    fn must(&mut self, name: &str, step: impl FnOnce(&Machine)) {
        if !self.run(name, step) {
            self.finish();
        }
    }

    /// Panics with every failed step.
    fn finish(&mut self) {
        assert!(
            self.failed.is_empty(),
            "{} step(s) failed on the booted Debian:\n\n{}",
            self.failed.len(),
            self.failed.join("\n\n")
        );
    }
}

fn ctr_pull(m: &Machine, reference: &str) -> String {
    m.run_ok(
        &["ctr", "images", "pull", "--hosts-dir", HOSTS_DIR, reference],
        2 * MINUTE,
    )
}

/// `ctr run --rm` (no cpu controller in the container: `--cpu-shares 0`).
fn ctr_run(m: &Machine, reference: &str, id: &str, args: &[&str]) -> String {
    let mut v = vec!["ctr", "run", "--rm", "--cpu-shares", "0", reference, id];
    v.extend_from_slice(args);
    m.run_ok(&v, 2 * MINUTE)
}

/// The value of an unlabelled counter on the service's /metrics.
fn metric(m: &Machine, name: &str) -> u64 {
    let text = m.run_ok(&["curl", "-sSf", "http://127.0.0.1:7733/metrics"], MINUTE);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
        .trim()
        .parse()
        .expect("a counter")
}

fn main_pid(m: &Machine) -> String {
    m.run_ok(
        &["systemctl", "show", "-P", "MainPID", "nixery-local.service"],
        MINUTE,
    )
    .trim()
    .to_owned()
}

fn exists_inside(m: &Machine, path: &str) -> bool {
    m.path(path).symlink_metadata().is_ok()
}

/// Copies in what the steps need: the .deb, the package set and a layout.
fn provision(m: &Machine, deb: &Path, layout: &Path) {
    fs::copy(deb, m.path("/root/nixery-local.deb")).expect("copy the .deb in");
    for (from, to) in [
        (PKGS.to_owned(), PKGS_INSIDE),
        (s(layout).to_owned(), LAYOUT_INSIDE),
    ] {
        run_ok(
            &format!("cp -a {from}"),
            Command::new("cp").args(["-a", &from]).arg(m.path(to)),
            MINUTE,
        );
    }
    // As skopeo leaves it with the usual umask: `import` run as root reads
    // it as the cache's owner.
    run_ok(
        "chmod -R a+rX the layout",
        Command::new("chmod")
            .arg("-R")
            .arg("a+rX")
            .arg(m.path(LAYOUT_INSIDE)),
        MINUTE,
    );
    // Debian's nix.conf turns the sandbox off; the package set needs that
    // (its builder is the root's busybox), so make sure.
    let nix_conf = fs::read_to_string(m.path("/etc/nix/nix.conf")).expect("read nix.conf");
    assert!(
        nix_conf.lines().any(|l| l.trim() == "sandbox = false"),
        "nix.conf in the root no longer turns the sandbox off:\n{nix_conf}"
    );
}

fn install(m: &Machine) {
    m.run_ok(&["dpkg", "--install", "/root/nixery-local.deb"], 5 * MINUTE);
    let groups = m.run_ok(&["id", "-nG", PACKAGE], MINUTE);
    assert!(
        groups.split_whitespace().any(|g| g == "nix-users"),
        "the service user is not in nix-users: {groups}"
    );
    // postinst starts the socket and the service when systemd runs.
    assert_eq!(m.unit_state("nixery-local.socket"), "active");
    // The service reads the tests' package set and never waits for
    // cache.nixos.org (there is no network).
    let mut config = fs::OpenOptions::new()
        .append(true)
        .open(m.path(CONFIG))
        .expect("open the installed config");
    writeln!(
        config,
        "\n# tests/service_booted.rs\npkgs-path = \"{PKGS_INSIDE}\"\nnix-option = [\"substituters=\"]"
    )
    .expect("append to the config");
    // Step 1 starts it; the socket stays.
    m.run_ok(&["systemctl", "stop", "nixery-local.service"], 2 * MINUTE);
    assert_eq!(m.unit_state("nixery-local.service"), "inactive");
}

fn start(m: &Machine) {
    m.run_ok(&["systemctl", "start", "nixery-local"], 2 * MINUTE);
    assert_eq!(m.unit_state("nixery-local.service"), "active");
    let user = m.run_ok(&["ps", "-o", "user=", "-p", &main_pid(m)], MINUTE);
    assert_eq!(user.trim(), PACKAGE, "the daemon's user");
    let env = m.run_ok(
        &[
            "systemctl",
            "show",
            "-P",
            "Environment",
            "nixery-local.service",
        ],
        MINUTE,
    );
    assert!(env.contains("NIX_REMOTE=daemon"), "Environment={env}");
    let code = ping(m);
    assert_eq!(code, "200", "GET /v2/");
}

fn setup_containerd(m: &Machine) {
    assert_eq!(m.unit_state("containerd"), "active");
    // As README's Install section says (as root: no sudo needed).
    let out = m.run_ok(
        &["nixery-local", "setup", "containerd", "--config", CONFIG],
        MINUTE,
    );
    let hosts = format!("{HOSTS_DIR}/nix.local/hosts.toml");
    assert!(out.contains(&hosts), "{out}");
    let text = fs::read_to_string(m.path(&hosts)).expect("read nix.local's hosts.toml");
    assert!(text.contains("[host.\"http://127.0.0.1:7733\"]"), "{text}");
    assert!(exists_inside(
        m,
        &format!("{HOSTS_DIR}/docker.io/hosts.toml")
    ));
}

fn nix_image_through_nix_daemon(m: &Machine) {
    ctr_pull(m, "nix.local/hello:latest");
    let said = ctr_run(m, "nix.local/hello:latest", "booted-hello", &["hello"]);
    assert_eq!(said.trim(), "Hello from nix");
    // The build went through nix-daemon, connected to as the service user...
    let daemon_log = m.journal(&["nix-daemon"], 200);
    let connected = format!(", user {PACKAGE}");
    assert!(
        daemon_log
            .lines()
            .any(|l| l.contains("accepted connection from pid") && l.contains(&connected)),
        "nix-daemon saw no connection from {PACKAGE}:\n{daemon_log}"
    );
    // ...which built it: the output is root's (the service user cannot
    // write to the store).
    let owner = m.sh_ok("stat -c %U /nix/store/*-hello-1.0 | sort -u", MINUTE);
    assert_eq!(owner.trim(), "root", "owner of the built output");
    let service_log = m.journal(&["nixery-local"], 200);
    assert!(
        service_log.contains("built Nix image name=hello"),
        "{service_log}"
    );
}

fn import_as_the_readme_says(m: &Machine) {
    // README: `nixery-local import LAYOUT_DIR REF`; for the packaged service
    // with its config, as root.
    let out = m.run_ok(
        &[
            "nixery-local",
            "import",
            "--config",
            CONFIG,
            LAYOUT_INSIDE,
            IMPORTED_REF,
        ],
        MINUTE,
    );
    assert!(out.contains(&format!("imported {IMPORTED_REF}")), "{out}");
    let pull = m.output(
        &[
            "ctr",
            "images",
            "pull",
            "--hosts-dir",
            HOSTS_DIR,
            IMPORTED_REF,
        ],
        2 * MINUTE,
    );
    if !pull.status.success() {
        // Where did the import go, if not to the service's cache?
        let caches = m.output(
            &[
                "sh",
                "-c",
                "ls -la /var/lib/nixery-local /root/.cache/nixery-local 2>&1",
            ],
            MINUTE,
        );
        panic!(
            "the service does not serve the imported {IMPORTED_REF}: ctr pull failed \
             ({}):\n{}\n{}",
            pull.status,
            String::from_utf8_lossy(&pull.stderr),
            String::from_utf8_lossy(&caches.stdout)
        );
    }
    let said = ctr_run(m, IMPORTED_REF, "booted-imported", &[]);
    assert_eq!(said.trim(), IMPORTED_SAYS);
}

/// The status of `GET /v2/` on the service's address, from inside.
fn ping(m: &Machine) -> String {
    m.run_ok(
        &[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://127.0.0.1:7733/v2/",
        ],
        MINUTE,
    )
}

fn socket_activation(m: &Machine) {
    let before = main_pid(m);
    m.run_ok(&["systemctl", "stop", "nixery-local.service"], 2 * MINUTE);
    assert_eq!(m.unit_state("nixery-local.service"), "inactive");
    assert_eq!(m.unit_state("nixery-local.socket"), "active");
    let code = ping(m);
    assert_eq!(code, "200", "GET /v2/ through the socket");
    assert_eq!(m.unit_state("nixery-local.service"), "active");
    assert_ne!(main_pid(m), before, "not a new process");
}

fn restart_during_a_build(m: &Machine) {
    let reference = "nix.local/sleepy:latest";
    let mut pull = m.spawn(&["ctr", "images", "pull", "--hosts-dir", HOSTS_DIR, reference]);
    // The bracket keeps pgrep from matching a shell holding the pattern.
    let building = poll_until(MINUTE, Duration::from_millis(100), || {
        m.output(&["pgrep", "-f", "nixery-local-sleepy-builde[r]"], MINUTE)
            .status
            .success()
    });
    assert!(building, "the sleepy build never started");
    let started = Instant::now();
    m.run_ok(&["systemctl", "restart", "nixery-local"], 3 * MINUTE);
    eprintln!("restart took {:.1?}", started.elapsed());
    let status = pull.wait_or_panic(3 * MINUTE, "ctr images pull during the restart");
    eprintln!("the pull started before the restart: {status}");
    // Served from the cache now, whether or not that pull got its answer:
    // the new process builds nothing.
    ctr_pull(m, reference);
    let said = ctr_run(m, reference, "booted-sleepy", &["sleepy"]);
    assert_eq!(said.trim(), "sleepy woke up");
    let journal = m.journal(&["nixery-local"], 400);
    assert!(
        !journal.contains("interrupted by the user"),
        "the restart interrupted the build:\n{journal}"
    );
    assert_eq!(
        metric(m, "nixery_local_nix_builds_total"),
        0,
        "the restarted service built the image again"
    );
    assert_eq!(
        journal.matches("built Nix image name=sleepy").count(),
        1,
        "{journal}"
    );
}

fn purge(m: &Machine) {
    m.run_ok(&["dpkg", "--purge", PACKAGE], 5 * MINUTE);
    let status = m.output(&["dpkg-query", "-W", "-f=${Status}", PACKAGE], MINUTE);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.is_empty() || status.contains("not-installed"),
        "dpkg still knows it: {status}"
    );
    for path in [
        "/usr/bin/nixery-local",
        "/lib/systemd/system/nixery-local.service",
        "/lib/systemd/system/nixery-local.socket",
        "/usr/lib/systemd/user/nixery-local.service",
        "/etc/systemd/system/multi-user.target.wants/nixery-local.service",
        "/etc/systemd/system/sockets.target.wants/nixery-local.socket",
        "/etc/systemd/system/nixery-local.service",
        "/etc/systemd/system/nixery-local.socket",
        CONFIG,
        "/etc/nixery-local",
        "/var/lib/nixery-local",
        "/var/cache/nixery-local",
    ] {
        assert!(!exists_inside(m, path), "{path} left after dpkg --purge");
    }
    // Stopped, and nothing listens any more.
    for unit in ["nixery-local.service", "nixery-local.socket"] {
        assert_ne!(m.unit_state(unit), "active", "{unit}");
    }
    let curl = m.output(&["curl", "-sS", "http://127.0.0.1:7733/v2/"], MINUTE);
    assert!(!curl.status.success(), "something still answers on 7733");
}

#[test]
fn packaged_service_on_a_booted_debian() {
    require_nspawn();
    let t0 = Instant::now();
    let cached = cached_root("booted");
    eprintln!("cached root {} ({:.1?})", cached.display(), t0.elapsed());
    let work = tempdir("nl-booted");
    let deb = build_deb(work.path());
    let layout = busybox_layout(&work.path().join("layout"), "1.0", IMPORTED_SAYS);

    let t1 = Instant::now();
    let m = Machine::boot(&cached);
    eprintln!("{} booted ({:.1?})", m.name(), t1.elapsed());
    provision(&m, &deb, &layout.dir);

    let mut steps = Steps {
        m: &m,
        failed: Vec::new(),
    };
    steps.must("dpkg --install", install);
    steps.must("1. systemctl start nixery-local", start);
    steps.must("2. nixery-local setup containerd", setup_containerd);
    steps.run(
        "3. ctr pulls and runs a Nix image built through nix-daemon",
        nix_image_through_nix_daemon,
    );
    steps.run(
        "4. nixery-local import, then ctr pulls it",
        import_as_the_readme_says,
    );
    steps.run("5. socket activation", socket_activation);
    steps.run("6. restart during a build", restart_during_a_build);
    steps.run("7. dpkg --purge", purge);
    steps.finish();
    eprintln!("booted test done in {:.1?}", t0.elapsed());
}
