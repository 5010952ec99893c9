//! `nixery-local setup CLIENT`: points a container client at the daemon by
//! writing its mirror configuration. What is written where belongs to one
//! submodule per client (`containerd`: `certs.d/<host>/hosts.toml`, which
//! Docker reads too; `docker`: `daemon.json`; `podman`: a `registries.conf.d`
//! drop-in; `k3s`: `registries.yaml`). This module owns the command line and
//! the rules for touching a user's files:
//!
//! - a file whose content would not change is left alone (setup is
//!   idempotent);
//! - a file setup wrote (it starts with [`MARKER`]) is replaced;
//! - any other file is refused, unless `--force`, which backs it up to
//!   `FILE.bak-<UTC timestamp>` first. `daemon.json` is the exception: it is
//!   merged (other keys kept), after a backup;
//! - the whole plan is checked before the first write, so a refusal changes
//!   nothing; `--dry-run` prints the plan and changes nothing either.

mod containerd;
mod docker;
mod k3s;
mod podman;

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::config::{Options, Settings};
use crate::oci::reference::{RegistryHost, DOCKER_HUB};

use containerd::{containerd_next, hosts_files};
use docker::{docker_daemon_json, docker_next};
use k3s::k3s_next;
use podman::podman_next;

pub(crate) use containerd::{hosts_toml, ContainerdArgs};
pub(crate) use docker::DockerArgs;
pub(crate) use k3s::{k3s_registries_yaml, K3sArgs};
pub(crate) use podman::{podman_conf, PodmanArgs};

/// First line of every file setup owns; a file without it is the user's.
pub(crate) const MARKER: &str = "# Managed by nixery-local setup";

/// The registry host whose every repository is a Nix image; it exists only
/// in the daemon, so it has no upstream.
pub(crate) use crate::config::DEFAULT_NIX_REGISTRY as NIX_REGISTRY;

/// The repository namespace for Nix images on clients that cannot send
/// containerd's `ns` (podman): `127.0.0.1:7733/nix/hello`.
pub(crate) use crate::config::DEFAULT_NIX_NAMESPACE as NIX_NAMESPACE;

/// Registries mirrored when no `--registry` is given.
pub(crate) const DEFAULT_REGISTRIES: [&str; 4] =
    ["docker.io", "ghcr.io", "quay.io", "registry.k8s.io"];

/// containerd's directory for hosts that have none of their own.
const DEFAULT_HOST_DIR: &str = "_default";

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing to stdout: {0}")]
    Output(#[source] io::Error),
    #[error("refusing to overwrite {} that nixery-local did not write: {}; move {} away, or rerun with --force to back {} up and replace {}",
        if paths.len() == 1 { "a file" } else { "files" },
        paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        if paths.len() == 1 { "it" } else { "them" },
        if paths.len() == 1 { "it" } else { "them" },
        if paths.len() == 1 { "it" } else { "them" })]
    Foreign { paths: Vec<PathBuf> },
    #[error("{path} is not a JSON object ({message}); fix or move it, then rerun")]
    Json { path: PathBuf, message: String },
    #[error("{path}: \"registry-mirrors\" is not a list of strings; fix it, then rerun")]
    MirrorsShape { path: PathBuf },
    #[error("Docker's registry-mirrors only mirror docker.io, but the daemon serves {0} to clients that send no registry; set default-registry = \"docker.io\" or skip `setup docker`")]
    DockerDefaultRegistry(RegistryHost),
}

/// Options every client shares: where the daemon is, and how to write.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Common {
    /// The daemon's TOML config file, for its `listen` address (same file as
    /// `serve --config`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub options: Options,
    /// Print what would be written and change nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Replace files nixery-local did not write, after backing each up to
    /// FILE.bak-<timestamp>.
    #[arg(long)]
    pub(crate) force: bool,
}

/// Which registries get a `hosts.toml`.
#[derive(Clone, Debug, Default, clap::Args)]
pub(crate) struct Registries {
    /// A registry to mirror (repeatable) [default: docker.io, ghcr.io,
    /// quay.io, registry.k8s.io]. nix.local is always included.
    #[arg(long = "registry", value_name = "HOST", conflicts_with = "all")]
    pub(crate) registries: Vec<RegistryHost>,
    /// Mirror every registry: one `_default` entry instead of one per host.
    #[arg(long)]
    pub(crate) all: bool,
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum SetupCommand {
    /// containerd (ctr, nerdctl, Kubernetes through CRI): `hosts.toml` mirror
    /// entries that keep each upstream as the fallback.
    Containerd(ContainerdArgs),
    /// Docker: `registry-mirrors` in daemon.json (docker.io only) and
    /// `hosts.toml` for the containerd image store.
    Docker(DockerArgs),
    /// podman, buildah, skopeo, CRI-O: a registries.conf.d drop-in.
    Podman(PodmanArgs),
    /// k3s and RKE2: registries.yaml.
    K3s(K3sArgs),
}

impl SetupCommand {
    pub fn common(&self) -> &Common {
        match self {
            SetupCommand::Containerd(a) => &a.common,
            SetupCommand::Docker(a) => &a.common,
            SetupCommand::Podman(a) => &a.common,
            SetupCommand::K3s(a) => &a.common,
        }
    }
}

/// Plans the client's files from the daemon's `settings`, applies the plan
/// (or prints it, with `--dry-run`) and tells on `out` what to restart.
pub fn run(
    command: &SetupCommand,
    settings: &Settings,
    out: &mut dyn Write,
) -> Result<(), SetupError> {
    let url = mirror_url(settings.listen);
    let (files, next) = match command {
        SetupCommand::Containerd(a) => (
            hosts_files(&a.hosts_dir, &a.registries, &url),
            containerd_next(&a.hosts_dir),
        ),
        SetupCommand::Docker(a) => {
            if settings.default_registry.as_str() != DOCKER_HUB {
                return Err(SetupError::DockerDefaultRegistry(
                    settings.default_registry.clone(),
                ));
            }
            let mut files = vec![docker_daemon_json(&a.daemon_json, &url)?];
            files.extend(hosts_files(&a.certs_dir, &a.registries, &url));
            (files, docker_next(settings.listen))
        }
        SetupCommand::Podman(a) => (
            vec![PlannedFile::owned(
                &a.conf,
                podman_conf(settings.listen, &settings.default_registry),
            )],
            podman_next(settings.listen),
        ),
        SetupCommand::K3s(a) => (
            vec![PlannedFile::owned(
                &a.registries_yaml,
                k3s_registries_yaml(&hosts(&a.registries), &url),
            )],
            k3s_next(),
        ),
    };
    let common = command.common();
    let changed = apply(&files, common.dry_run, common.force, out)?;
    let say = |out: &mut dyn Write, text: &str| out.write_all(text.as_bytes());
    let result = if common.dry_run {
        say(out, "dry run: nothing was written\n")
    } else if changed {
        say(out, &next)
    } else {
        say(out, "nothing to change\n")
    };
    result.map_err(SetupError::Output)
}

/// `http://ADDR` of the daemon; an unspecified listen address (0.0.0.0,
/// [::]) is reached on loopback.
pub(crate) fn mirror_url(listen: SocketAddr) -> String {
    format!("http://{}", client_address(listen))
}

fn client_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// The hosts to configure: nix.local first, then the chosen registries (or
/// the defaults), without repeats.
fn hosts(registries: &Registries) -> Vec<String> {
    let chosen: Vec<String> = if registries.all {
        vec![DEFAULT_HOST_DIR.to_owned()]
    } else if registries.registries.is_empty() {
        DEFAULT_REGISTRIES.iter().map(|s| (*s).to_owned()).collect()
    } else {
        registries
            .registries
            .iter()
            .map(|r| r.as_str().to_owned())
            .collect()
    };
    let mut hosts = vec![NIX_REGISTRY.to_owned()];
    for host in chosen {
        if !hosts.contains(&host) {
            hosts.push(host);
        }
    }
    hosts
}

// ---------------------------------------------------------------------------
// Applying a plan
// ---------------------------------------------------------------------------

/// How a file may be changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ownership {
    /// Whole file, ours when it starts with [`MARKER`].
    Owned,
    /// Merged into whatever is there; backed up before each change.
    Merged,
}

#[derive(Clone, Debug)]
pub(crate) struct PlannedFile {
    path: PathBuf,
    content: Vec<u8>,
    ownership: Ownership,
}

impl PlannedFile {
    fn owned(path: &Path, content: String) -> PlannedFile {
        PlannedFile {
            path: path.to_owned(),
            content: content.into_bytes(),
            ownership: Ownership::Owned,
        }
    }

    fn merged(path: &Path, content: Vec<u8>) -> PlannedFile {
        PlannedFile {
            path: path.to_owned(),
            content,
            ownership: Ownership::Merged,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Create,
    Unchanged,
    Replace,
    BackUpAndReplace,
}

fn read_existing(path: &Path) -> Result<Option<Vec<u8>>, SetupError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SetupError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Checks every file, then writes (or, dry, prints) the plan. Returns
/// whether anything changed or would change.
fn apply(
    files: &[PlannedFile],
    dry_run: bool,
    force: bool,
    out: &mut dyn Write,
) -> Result<bool, SetupError> {
    let mut actions = Vec::with_capacity(files.len());
    let mut foreign = Vec::new();
    for file in files {
        let action = match read_existing(&file.path)? {
            None => Action::Create,
            Some(bytes) if bytes == file.content => Action::Unchanged,
            Some(_) if file.ownership == Ownership::Merged => Action::BackUpAndReplace,
            Some(bytes) if bytes.starts_with(MARKER.as_bytes()) => Action::Replace,
            Some(_) if force => Action::BackUpAndReplace,
            Some(_) => {
                foreign.push(file.path.clone());
                Action::Unchanged
            }
        };
        actions.push(action);
    }
    if !foreign.is_empty() {
        return Err(SetupError::Foreign { paths: foreign });
    }
    let stamp = crate::util::time::timestamp(SystemTime::now());
    let mut changed = false;
    for (file, action) in files.iter().zip(actions) {
        let path = file.path.display();
        if action == Action::Unchanged {
            writeln!(out, "unchanged {path}").map_err(SetupError::Output)?;
            continue;
        }
        changed = true;
        let verb = match action {
            Action::Create => "create",
            _ => "replace",
        };
        if dry_run {
            let note = if action == Action::BackUpAndReplace {
                " (after backing it up)"
            } else {
                ""
            };
            writeln!(out, "would {verb} {path}{note}:").map_err(SetupError::Output)?;
            out.write_all(&file.content).map_err(SetupError::Output)?;
            if !file.content.ends_with(b"\n") {
                out.write_all(b"\n").map_err(SetupError::Output)?;
            }
            continue;
        }
        let backup = if action == Action::BackUpAndReplace {
            Some(back_up(&file.path, &stamp)?)
        } else {
            None
        };
        write_atomically(&file.path, &file.content)?;
        match backup {
            Some(b) => writeln!(out, "replaced {path} (the old file is {})", b.display()),
            None => writeln!(out, "{verb}d {path}"),
        }
        .map_err(SetupError::Output)?;
    }
    Ok(changed)
}

/// Copies `path` to `path.bak-STAMP` (or `…-2`, `-3`, … if taken),
/// permissions included; the original stays until it is replaced.
fn back_up(path: &Path, stamp: &str) -> Result<PathBuf, SetupError> {
    let io_error = |path: &Path| {
        let path = path.to_owned();
        move |source| SetupError::Io { path, source }
    };
    let base = format!("{}.bak-{stamp}", path.display());
    for n in 1.. {
        let candidate = PathBuf::from(if n == 1 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        // create_new: never overwrite an earlier backup.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&candidate)
        {
            Ok(_) => {
                std::fs::copy(path, &candidate).map_err(io_error(&candidate))?;
                return Ok(candidate);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_error(&candidate)(e)),
        }
    }
    unreachable!("1.. is unbounded")
}

/// Writes through a temporary file and a rename, so a client never reads
/// half a file; keeps an existing file's permissions, else 0644.
fn write_atomically(path: &Path, content: &[u8]) -> Result<(), SetupError> {
    let io_error = |source| SetupError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(io_error)?;
    let mode = match std::fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(_) => 0o644,
    };
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.nixery-local-{}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(content)?;
        // The mode passed to open is masked by the umask.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn listen() -> SocketAddr {
        "127.0.0.1:7733".parse().expect("addr")
    }

    #[test]
    fn the_mirror_is_reached_on_loopback() {
        assert_eq!(mirror_url(listen()), "http://127.0.0.1:7733");
        assert_eq!(
            mirror_url("0.0.0.0:9000".parse().expect("addr")),
            "http://127.0.0.1:9000"
        );
        assert_eq!(
            mirror_url("[::]:9000".parse().expect("addr")),
            "http://[::1]:9000"
        );
    }

    #[test]
    fn hosts_are_nix_then_the_chosen_registries() {
        let defaults = hosts(&Registries::default());
        assert_eq!(
            defaults,
            [
                "nix.local",
                "docker.io",
                "ghcr.io",
                "quay.io",
                "registry.k8s.io"
            ]
        );
        let chosen = Registries {
            registries: vec![
                "ghcr.io".parse().expect("host"),
                "nix.local".parse().expect("host"),
                "ghcr.io".parse().expect("host"),
            ],
            all: false,
        };
        assert_eq!(hosts(&chosen), ["nix.local", "ghcr.io"]);
        let all = Registries {
            registries: vec![],
            all: true,
        };
        assert_eq!(hosts(&all), ["nix.local", "_default"]);
    }

    #[test]
    fn plans_are_all_or_nothing_and_idempotent() {
        let dir = tempfile::tempdir().expect("tmp");
        let ours = dir.path().join("a/hosts.toml");
        let theirs = dir.path().join("b/hosts.toml");
        std::fs::create_dir_all(theirs.parent().expect("parent")).expect("mkdir");
        std::fs::write(&theirs, "server = \"https://mine\"\n").expect("write");
        let plan = [
            PlannedFile::owned(&ours, format!("{MARKER}\nx = 1\n")),
            PlannedFile::owned(&theirs, format!("{MARKER}\nx = 2\n")),
        ];
        let mut out = Vec::new();
        let e = apply(&plan, false, false, &mut out).expect_err("refused");
        assert!(
            matches!(&e, SetupError::Foreign { paths } if paths == std::slice::from_ref(&theirs))
        );
        assert!(e.to_string().contains("--force"), "{e}");
        assert!(!ours.exists(), "a refusal writes nothing");

        // Dry run: prints, writes nothing.
        let mut out = Vec::new();
        assert!(apply(&plan, true, true, &mut out).expect("dry run"));
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.contains("would create"), "{text}");
        assert!(text.contains("would replace"), "{text}");
        assert!(!ours.exists());

        let mut out = Vec::new();
        assert!(apply(&plan, false, true, &mut out).expect("forced"));
        assert_eq!(
            std::fs::read_to_string(&theirs).expect("read"),
            format!("{MARKER}\nx = 2\n")
        );
        let backups: Vec<_> = std::fs::read_dir(theirs.parent().expect("parent"))
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("hosts.toml.bak-"))
            .collect();
        assert_eq!(backups.len(), 1, "{backups:?}");
        let backup = theirs.with_file_name(&backups[0]);
        assert_eq!(
            std::fs::read_to_string(backup).expect("read"),
            "server = \"https://mine\"\n"
        );
        assert_eq!(
            std::fs::metadata(&ours).expect("stat").permissions().mode() & 0o777,
            0o644
        );

        // Again: nothing changes, and no force is needed (the files are ours).
        let mut out = Vec::new();
        assert!(!apply(&plan, false, false, &mut out).expect("idempotent"));
        // A changed plan replaces our own file without asking.
        let plan2 = [PlannedFile::owned(&ours, format!("{MARKER}\nx = 3\n"))];
        assert!(apply(&plan2, false, false, &mut Vec::new()).expect("replace ours"));
    }

    #[test]
    fn podman_and_k3s_files_parse() {
        let conf = podman_conf(listen(), &"docker.io".parse().expect("host"));
        let v: toml::Value = toml::from_str(&conf).expect("valid TOML");
        let regs = v["registry"].as_array().expect("registries");
        assert_eq!(regs[0]["prefix"].as_str(), Some("docker.io"));
        assert_eq!(
            regs[0]["mirror"][0]["location"].as_str(),
            Some("127.0.0.1:7733")
        );
        assert_eq!(regs[0]["mirror"][0]["insecure"].as_bool(), Some(true));
        assert_eq!(regs[1]["location"].as_str(), Some("127.0.0.1:7733/nix"));

        let yaml = k3s_registries_yaml(
            &["nix.local".to_owned(), "_default".to_owned()],
            "http://127.0.0.1:7733",
        );
        assert!(yaml.starts_with(MARKER));
        assert!(
            yaml.contains("  \"nix.local\":\n    endpoint:\n      - \"http://127.0.0.1:7733\"\n")
        );
        assert!(yaml.contains("  \"*\":\n"));
    }
}
