//! A private podman per test: Debian's podman 4.3, as root, with its own
//! storage (overlay where it works, else vfs), run root, tmp dir, network
//! config, cgroup parent and config files under a temp dir, and registries
//! only from [`Podman::registries_conf`] (`CONTAINERS_REGISTRIES_CONF`), where
//! a test writes e.g. the drop-in of `nixery-local setup podman`.
//!
//! Two paths cannot be moved by any flag, so every podman of an instance runs
//! in a mount namespace of the instance's own, where `/var/lib` and `/run`
//! are overlays whose writes land in the temp dir: containers/image keeps
//! root's blob info cache in `/var/lib/containers/cache`, and podman 4.3's
//! cleanup drops `--runtime-flag`, so runc keeps its state in `/run/runc`.
//! Everything goes on drop: containers, the namespace with its mounts, the
//! cgroups.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::time::Duration;

use tempfile::TempDir;

use super::{
    assert_success, forward_lines, output_timeout, require, require_from, run_setup,
    unmount_all_under, Proc,
};

/// Mounts the overlays, says so, then keeps the namespace alive.
const NAMESPACE_SCRIPT: &str = r#"set -e
mount -t overlay overlay -o "lowerdir=/var/lib,upperdir=$1/upper,workdir=$1/work" /var/lib
mount -t overlay overlay -o "lowerdir=/run,upperdir=$2/upper,workdir=$2/work" /run
echo ready
exec sleep infinity"#;

pub struct Podman {
    dir: TempDir,
    /// `sleep` holding the mount namespace every podman enters.
    namespace: Proc,
    /// Global flags before every subcommand.
    flags: Vec<OsString>,
    /// What `CONTAINERS_REGISTRIES_CONF` names.
    registries: PathBuf,
    /// `--cgroup-parent` of every container (cgroupfs: a directory in each
    /// hierarchy, removed on drop).
    cgroup: String,
}

impl Podman {
    /// A podman that knows no registries but those that a test writes to
    /// [`Podman::registries_conf`] (none until then).
    pub fn start() -> Podman {
        for cmd in ["podman", "conmon", "runc", "mount"] {
            require(cmd);
        }
        for cmd in ["unshare", "nsenter"] {
            require_from(cmd, "util-linux");
        }
        // Short path, like the other engines' (unix sockets live under it).
        let dir = tempfile::Builder::new()
            .prefix("pdm")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let d = dir.path().to_path_buf();
        for sub in ["varlib/upper", "varlib/work", "run/upper", "run/work"] {
            fs::create_dir_all(d.join(sub)).expect("create the overlays' dirs");
        }
        fs::create_dir(d.join("tmp")).expect("create tmp");
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--"])
            .args(["sh", "-c", NAMESPACE_SCRIPT, "sh"])
            .arg(d.join("varlib"))
            .arg(d.join("run"));
        let mut namespace = Proc::spawn(cmd);
        forward_lines("podman namespace".into(), namespace.stderr(), |_| {});
        let (tx, ready) = mpsc::channel();
        forward_lines(String::new(), namespace.stdout(), move |line| {
            let _ = tx.send(line.to_owned());
        });
        match ready.recv_timeout(Duration::from_secs(10)) {
            Ok(line) if line == "ready" => {}
            other => panic!(
                "podman's mount namespace did not come up ({other:?}; exit: {:?})",
                namespace.exited()
            ),
        }

        // containers.conf and policy.json of our own: the host's do not apply.
        fs::write(
            d.join("containers.conf"),
            "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .expect("write containers.conf");
        fs::write(
            d.join("policy.json"),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .expect("write policy.json");
        // podman refuses to start without its registries.conf, which the
        // test writes later: an empty one until then.
        let no_registries = d.join("no-registries.conf");
        fs::write(&no_registries, "").expect("write no-registries.conf");
        let cgroup = format!(
            "nixery-local-{}",
            d.file_name().expect("name").to_string_lossy()
        );
        let mut podman = Podman {
            flags: Vec::new(),
            registries: no_registries,
            cgroup,
            namespace,
            dir,
        };
        // overlay can fail where /tmp is itself an overlay; vfs always works.
        for driver in ["overlay", "vfs"] {
            podman.use_storage_driver(driver);
            let out = podman.podman(&["info", "--format", "{{.Store.GraphDriverName}}"]);
            if out.status.success() {
                podman.registries = podman.registries_conf();
                return podman;
            }
            eprintln!(
                "podman's {driver} storage driver does not work here:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        panic!("podman works with no storage driver");
    }

    /// Writes storage.conf and the global flags for `driver`.
    fn use_storage_driver(&mut self, driver: &str) {
        // Its own directories: libpod's database remembers the driver.
        let d = self.dir.path().join(driver);
        let (root, run) = (d.join("root"), d.join("runroot"));
        fs::write(
            self.dir.path().join("storage.conf"),
            format!(
                "[storage]\ndriver = \"{driver}\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                root.display(),
                run.display()
            ),
        )
        .expect("write storage.conf");
        let flags: [(&str, PathBuf); 6] = [
            ("--root", root),
            ("--runroot", run),
            ("--tmpdir", d.join("libpod")),
            ("--network-config-dir", d.join("networks")),
            ("--storage-driver", driver.into()),
            ("--runtime", "runc".into()),
        ];
        self.flags = flags
            .into_iter()
            .flat_map(|(flag, value)| [OsString::from(flag), value.into_os_string()])
            .chain(["--cgroup-manager", "cgroupfs", "--events-backend", "file"].map(OsString::from))
            .collect();
    }

    /// The `registries.conf` this podman reads on every command (podman
    /// reads only the system's `registries.conf.d` besides).
    pub fn registries_conf(&self) -> PathBuf {
        self.dir.path().join("registries.conf")
    }

    /// Writes [`Podman::registries_conf`] with the real `nixery-local setup
    /// podman` for a daemon on `listen`.
    pub fn setup_by_cli(&self, listen: &str) {
        let conf = self.registries_conf();
        let conf = conf.to_str().expect("utf-8 path");
        run_setup(&["podman", "--conf", conf, "--listen", listen]);
    }

    /// `podman ARGS` in this instance (2 minutes at most).
    pub fn podman(&self, args: &[&str]) -> Output {
        let d = self.dir.path();
        output_timeout(
            Command::new("nsenter")
                .arg(format!("--mount=/proc/{}/ns/mnt", self.namespace.id()))
                .args(["--", "podman"])
                .args(&self.flags)
                .args(args)
                .env("CONTAINERS_REGISTRIES_CONF", &self.registries)
                .env("CONTAINERS_CONF", d.join("containers.conf"))
                .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
                // Where pulls stage layers (default /var/tmp).
                .env("TMPDIR", d.join("tmp"))
                .env("HOME", d),
            Duration::from_secs(120),
        )
    }

    /// `podman pull REF` with this instance's accept-anything policy.
    pub fn pull(&self, reference: &str) -> Output {
        let policy = self.dir.path().join("policy.json");
        let policy = policy.to_str().expect("utf-8 path");
        self.podman(&["pull", "--signature-policy", policy, reference])
    }

    /// [`Podman::pull`] that must succeed.
    pub fn pull_ok(&self, reference: &str) {
        assert_success(&format!("podman pull {reference}"), &self.pull(reference));
    }

    /// `podman run --rm --network none REF ARGS…` in this instance's cgroup
    /// parent, with the limits this machine needs (root here lacks
    /// CAP_SYS_RESOURCE, so podman may not raise them to its defaults).
    pub fn run(&self, reference: &str, args: &[&str]) -> Output {
        let parent = format!("/{}", self.cgroup);
        let mut v = vec!["run", "--rm", "--network", "none"];
        v.extend(["--cgroup-parent", &parent]);
        v.extend(["--ulimit", "nofile=1024:1024"]);
        v.extend(["--ulimit", "nproc=1024:1024", reference]);
        v.extend_from_slice(args);
        self.podman(&v)
    }

    /// The manifest digest podman recorded for `reference`.
    pub fn digest(&self, reference: &str) -> String {
        let out = self.podman(&["image", "inspect", "--format", "{{.Digest}}", reference]);
        assert_success(&format!("podman image inspect {reference}"), &out);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.podman(&["rm", "--all", "--force", "--time", "0"]);
        // The namespace, and the mounts in it, go with its last process.
        self.namespace.kill();
        remove_cgroup(&self.cgroup);
        unmount_all_under(self.dir.path());
    }
}

/// Removes cgroup `name` (and the cgroups in it) from every hierarchy:
/// `/sys/fs/cgroup/NAME` on cgroup v2, `/sys/fs/cgroup/*/NAME` on v1.
fn remove_cgroup(name: &str) {
    fn rmdir_tree(dir: &Path) {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
        // A cgroup is removed with rmdir, its control files and all.
        let _ = fs::remove_dir(dir);
    }
    let root = Path::new("/sys/fs/cgroup");
    let hierarchies = fs::read_dir(root).into_iter().flatten().flatten();
    for dir in hierarchies
        .map(|e| e.path().join(name))
        .chain([root.join(name)])
    {
        if dir.is_dir() {
            rmdir_tree(&dir);
        }
    }
}
