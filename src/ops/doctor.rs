//! `nixery-local doctor`: checks the state dir, Nix, its package source and
//! its daemon, the listener, each container client's mirror config and
//! version, and says exactly what is wrong and how to fix it.

use std::ffi::CString;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Settings;
use crate::sources::nix::command::Nix;
use crate::sources::nix::layers::Compression;
use crate::sources::nix::pkgset::PkgSource;
use crate::sources::nix::SourceSetting;
use crate::util::users;

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Verdict {
    Ok,
    /// Not a problem for everyone (a client that is not installed, say).
    Note,
    Fail,
}

#[derive(Debug)]
pub struct Check {
    pub what: String,
    pub verdict: Verdict,
    pub detail: String,
}

fn check(what: &str, verdict: Verdict, detail: impl Into<String>) -> Check {
    Check {
        what: what.to_owned(),
        verdict,
        detail: detail.into(),
    }
}

/// Where the clients' configs are, when not where their packages put them.
#[derive(Clone, Debug, clap::Args)]
pub struct ClientPaths {
    /// containerd's config directory (config.toml, certs.d/).
    #[arg(long, value_name = "DIR", default_value = "/etc/containerd")]
    pub containerd_dir: PathBuf,
    /// Docker's daemon.json.
    #[arg(long, value_name = "FILE", default_value = "/etc/docker/daemon.json")]
    pub docker_config: PathBuf,
    /// podman's (containers/image's) registries.conf.d.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/etc/containers/registries.conf.d"
    )]
    pub registries_dir: PathBuf,
    /// k3s's config directory (registries.yaml).
    #[arg(long, value_name = "DIR", default_value = "/etc/rancher/k3s")]
    pub k3s_dir: PathBuf,
}

/// The socket of a multi-user Nix (Debian's nix-setup-systemd, NixOS).
const NIX_DAEMON_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";

/// The packaged service's user.
const SERVICE_USER: &str = "nixery-local";

/// Runs every check (blocking: it starts Nix and connects to the daemon).
pub fn run(settings: &Settings, paths: &ClientPaths) -> Vec<Check> {
    let mut out = vec![state_dir(&settings.state_dir)];
    out.extend(nix(settings));
    out.push(nix_daemon(Path::new(NIX_DAEMON_SOCKET), SERVICE_USER));
    out.push(listener(settings.listen));
    let addr = display_addr(settings.listen);
    out.push(containerd(&paths.containerd_dir, &addr));
    out.push(docker(&paths.docker_config, &addr));
    out.push(podman(&paths.registries_dir, &addr));
    out.push(k3s(&paths.k3s_dir, &addr));
    out.extend(client_versions(settings.nix.compression));
    out
}

/// Whether Nix images can be built through the Nix daemon: the socket
/// exists, accepts this user, and admits the service's user by its group.
fn nix_daemon(socket: &Path, service_user: &str) -> Check {
    let what = "Nix daemon";
    let meta = match std::fs::metadata(socket) {
        Ok(m) => m,
        Err(_) => {
            let store = CString::new("/nix/store").expect("no NUL");
            // SAFETY: a valid NUL-terminated path.
            let writable = unsafe { libc::access(store.as_ptr(), libc::W_OK) } == 0;
            return if writable {
                check(
                    what,
                    Verdict::Note,
                    format!(
                        "no {}: Nix runs single-user, as this user",
                        socket.display()
                    ),
                )
            } else {
                check(
                    what,
                    Verdict::Fail,
                    format!(
                        "no {}: the service builds through the Nix daemon; on Debian: sudo apt-get install nix-setup-systemd",
                        socket.display()
                    ),
                )
            };
        }
    };
    let group = users::group_name(meta.gid());
    // Debian's socket is root:nix-users 0770: the service's user needs the group.
    if let Some(service) = users::by_name(service_user) {
        let others_may = meta.mode() & 0o006 == 0o006;
        if !others_may && !users::groups_of(&service).contains(&meta.gid()) {
            return check(
                what,
                Verdict::Fail,
                format!(
                    "the service's user {service_user} is not in group {group}, which may use {}: sudo adduser {service_user} {group} && sudo systemctl restart nixery-local",
                    socket.display()
                ),
            );
        }
    }
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(_) => check(
            what,
            Verdict::Ok,
            format!("{} accepts connections (group {group})", socket.display()),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => check(
            what,
            Verdict::Fail,
            format!(
                "this user cannot use {} ({e}): join group {group} (sudo adduser $USER {group}, then log in again)",
                socket.display()
            ),
        ),
        Err(e) => check(
            what,
            Verdict::Fail,
            format!(
                "{} does not answer ({e}): sudo systemctl start nix-daemon.socket",
                socket.display()
            ),
        ),
    }
}

/// `major.minor` of the first version-like word in `text`.
fn version(text: &str) -> Option<(u32, u32)> {
    text.split(|c: char| c.is_whitespace() || c == ',' || c == 'v')
        .find_map(|word| {
            let mut parts = word.split(['.', '~', '+', '-']);
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.parse().ok()?;
            Some((major, minor))
        })
}

/// What `program ARGS` says its version is, if it runs.
fn program_version(program: &str, args: &[&str]) -> Option<(String, (u32, u32))> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text.lines().next().unwrap_or("").trim().to_owned();
    version(&line).map(|v| (line, v))
}

/// Each installed client's version against the layer compression: which
/// ones read zstd, and what the others get.
fn client_versions(compression: Compression) -> Vec<Check> {
    let zstd = compression == Compression::Zstd;
    let mut out = Vec::new();
    if let Some((line, v)) = program_version("dockerd", &["--version"]) {
        let detail = if zstd && v < (23, 0) {
            format!(
                "{line}: cannot unpack zstd, so it is sent gzip layers (told by its User-Agent)"
            )
        } else {
            line
        };
        out.push(check("docker engine", Verdict::Ok, detail));
    }
    if let Some((line, v)) = program_version("containerd", &["--version"]) {
        // containerd reads zstd layers since 1.5.
        if zstd && v < (1, 5) {
            out.push(check(
                "containerd version",
                Verdict::Fail,
                format!("{line}: cannot unpack zstd layers: set layer-compression = \"gzip\""),
            ));
        } else {
            out.push(check("containerd version", Verdict::Ok, line));
        }
    }
    if let Some((line, _)) = program_version("podman", &["--version"]) {
        out.push(check("podman version", Verdict::Ok, line));
    }
    out
}

/// The address clients use: a wildcard listener is reached on loopback.
fn display_addr(listen: SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        format!("127.0.0.1:{}", listen.port())
    } else {
        listen.to_string()
    }
}

fn state_dir(dir: &Path) -> Check {
    let what = "state directory";
    if let Err(e) = std::fs::create_dir_all(dir) {
        return check(
            what,
            Verdict::Fail,
            format!("{} cannot be created: {e}", dir.display()),
        );
    }
    let probe = dir.join(format!(".doctor-{}", std::process::id()));
    match std::fs::write(&probe, b"") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            check(what, Verdict::Ok, format!("{} is writable", dir.display()))
        }
        Err(e) => check(
            what,
            Verdict::Fail,
            format!("{} is not writable by this user: {e}", dir.display()),
        ),
    }
}

fn nix(settings: &Settings) -> Vec<Check> {
    let n = Nix::new(settings.nix.nix.clone());
    let version = match n.version() {
        Ok(v) => check("Nix", Verdict::Ok, v),
        Err(e) => {
            return vec![check(
                "Nix",
                Verdict::Fail,
                format!("{e}. Nix images need Nix: apt-get install nix-bin (or install Nix)"),
            )]
        }
    };
    let source = match &settings.nix.source {
        SourceSetting::Fixed(PkgSource::Path { path }) if !path.exists() => check(
            "package source",
            Verdict::Fail,
            format!("pkgs-path {} does not exist", path.display()),
        ),
        SourceSetting::Fixed(PkgSource::Path { path }) => check(
            "package source",
            Verdict::Ok,
            format!("pkgs-path {}", path.display()),
        ),
        SourceSetting::Fixed(PkgSource::NixPath) => {
            let found = std::process::Command::new("nix-instantiate")
                .args(["--find-file", "nixpkgs"])
                .output();
            match found {
                Ok(o) if o.status.success() => check(
                    "package source",
                    Verdict::Ok,
                    format!("<nixpkgs> is {}", String::from_utf8_lossy(&o.stdout).trim()),
                ),
                _ => check(
                    "package source",
                    Verdict::Fail,
                    "<nixpkgs> is not in NIX_PATH: set pkgs-path, pkgs-channel or pkgs-repo in the config, or NIX_PATH=nixpkgs=…",
                ),
            }
        }
        SourceSetting::Fixed(other) => check("package source", Verdict::Ok, format!("{other:?}")),
        SourceSetting::GitRepo(url) => check("package source", Verdict::Ok, format!("git {url}")),
    };
    vec![version, source]
}

fn listener(addr: SocketAddr) -> Check {
    let what = "daemon";
    let target = display_addr(addr);
    let fail = |why: String| {
        check(
            what,
            Verdict::Fail,
            format!("{why}; start it with `systemctl start nixery-local` or `nixery-local serve`"),
        )
    };
    let Ok(sock) = target.parse::<SocketAddr>() else {
        return fail(format!("{target} is not an address"));
    };
    let mut stream = match TcpStream::connect_timeout(&sock, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => return fail(format!("nothing answers at {target} ({e})")),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!("GET /v2/ HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
    if let Err(e) = stream.write_all(req.as_bytes()) {
        return fail(format!("{target} closed the connection ({e})"));
    }
    let mut reply = Vec::new();
    let _ = stream.take(64 << 10).read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply).to_ascii_lowercase();
    if reply.starts_with("http/1.1 200") && reply.contains("docker-distribution-api-version") {
        check(
            what,
            Verdict::Ok,
            format!("a registry answers at http://{target}"),
        )
    } else {
        fail(format!("{target} answers, but not as a registry"))
    }
}

fn mentions(path: &Path, needle: &str) -> Option<bool> {
    std::fs::read_to_string(path)
        .ok()
        .map(|t| t.contains(needle))
}

fn containerd(etc: &Path, addr: &str) -> Check {
    let what = "containerd";
    if !etc.exists() {
        return check(what, Verdict::Note, "not installed (no /etc/containerd)");
    }
    let url = format!("http://{addr}");
    let hosts = etc.join("certs.d");
    let missing: Vec<&str> = [crate::config::DEFAULT_NIX_REGISTRY, "docker.io"]
        .into_iter()
        .filter(|h| mentions(&hosts.join(h).join("hosts.toml"), &url) != Some(true))
        .collect();
    if !missing.is_empty() {
        return check(
            what,
            Verdict::Fail,
            format!(
                "no mirror entry for {url} in {}/{{{}}}/hosts.toml: run `sudo nixery-local setup containerd`",
                hosts.display(),
                missing.join(",")
            ),
        );
    }
    if mentions(&etc.join("config.toml"), "config_path") != Some(true) {
        return check(
            what,
            Verdict::Fail,
            format!(
                "mirror entries exist, but {}/config.toml sets no registry config_path: add config_path = \"{}\" under [plugins.\"io.containerd.grpc.v1.cri\".registry] and restart containerd (ctr needs --hosts-dir {} instead)",
                etc.display(),
                hosts.display(),
                hosts.display()
            ),
        );
    }
    check(
        what,
        Verdict::Ok,
        format!("mirrors nix.local and docker.io through {url}"),
    )
}

fn docker(daemon_json: &Path, addr: &str) -> Check {
    let what = "docker";
    match mentions(daemon_json, &format!("http://{addr}")) {
        None => check(what, Verdict::Note, format!("no {}", daemon_json.display())),
        Some(true) => check(what, Verdict::Ok, "registry-mirrors points at the daemon"),
        Some(false) => check(
            what,
            Verdict::Fail,
            format!(
                "{} has no registry-mirrors entry for http://{addr}: run `sudo nixery-local setup docker`",
                daemon_json.display()
            ),
        ),
    }
}

fn podman(dropins: &Path, addr: &str) -> Check {
    let what = "podman";
    if !dropins.exists() {
        return check(what, Verdict::Note, "not installed (no registries.conf.d)");
    }
    match mentions(&dropins.join("nixery-local.conf"), addr) {
        Some(true) => check(
            what,
            Verdict::Ok,
            "the nixery-local drop-in mirrors through the daemon",
        ),
        _ => check(
            what,
            Verdict::Fail,
            format!(
                "no {}/nixery-local.conf for {addr}: run `sudo nixery-local setup podman`",
                dropins.display()
            ),
        ),
    }
}

fn k3s(dir: &Path, addr: &str) -> Check {
    let what = "k3s";
    if !dir.exists() {
        return check(what, Verdict::Note, "not installed (no /etc/rancher/k3s)");
    }
    match mentions(&dir.join("registries.yaml"), addr) {
        Some(true) => check(
            what,
            Verdict::Ok,
            "registries.yaml mirrors through the daemon",
        ),
        _ => check(
            what,
            Verdict::Fail,
            format!(
                "{}/registries.yaml does not point at {addr}: run `sudo nixery-local setup k3s`",
                dir.display()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_checks_say_what_to_run() {
        let dir = tempfile::tempdir().expect("tmp");
        let etc = dir.path().join("containerd");
        assert_eq!(containerd(&etc, "127.0.0.1:7733").verdict, Verdict::Note);
        std::fs::create_dir_all(etc.join("certs.d/docker.io")).expect("mkdir");
        let c = containerd(&etc, "127.0.0.1:7733");
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.detail.contains("setup containerd"), "{}", c.detail);
        for h in ["nix.local", "docker.io"] {
            std::fs::create_dir_all(etc.join("certs.d").join(h)).expect("mkdir");
            std::fs::write(
                etc.join("certs.d").join(h).join("hosts.toml"),
                "[host.\"http://127.0.0.1:7733\"]\n",
            )
            .expect("write");
        }
        let c = containerd(&etc, "127.0.0.1:7733");
        assert!(c.detail.contains("config_path"), "{}", c.detail);
        std::fs::write(
            etc.join("config.toml"),
            "config_path = \"/etc/containerd/certs.d\"\n",
        )
        .expect("write");
        assert_eq!(containerd(&etc, "127.0.0.1:7733").verdict, Verdict::Ok);
        assert_eq!(
            docker(&dir.path().join("daemon.json"), "127.0.0.1:7733").verdict,
            Verdict::Note
        );
    }

    #[test]
    fn versions_are_read_from_what_programs_print() {
        assert_eq!(
            version("Docker version 20.10.24+dfsg1, build 297e128"),
            Some((20, 10))
        );
        assert_eq!(
            version("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1"),
            Some((1, 6))
        );
        assert_eq!(version("podman version 4.3.1"), Some((4, 3)));
        assert_eq!(version("no version here"), None);
    }

    #[test]
    fn the_nix_daemon_check_names_the_fix() {
        let dir = tempfile::tempdir().expect("tmp");
        let missing = nix_daemon(&dir.path().join("socket"), "nobody");
        assert!(missing.detail.contains("socket"), "{}", missing.detail);
        // A socket nobody listens on any more: refused, with the fix.
        let path = dir.path().join("dead");
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        let dead = nix_daemon(&path, "no-such-service-user");
        assert_eq!(dead.verdict, Verdict::Fail);
        assert!(
            dead.detail.contains("systemctl start nix-daemon.socket"),
            "{}",
            dead.detail
        );
    }

    #[test]
    fn a_dead_listener_is_reported_with_the_fix() {
        // Bind and drop: nothing listens on the port afterwards.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port");
        let c = listener(port);
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(
            c.detail.contains("systemctl start nixery-local"),
            "{}",
            c.detail
        );
    }
}
