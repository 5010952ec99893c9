//! `nixery-local doctor`: checks the state dir, Nix and its package source,
//! the listener, and each container client's mirror config, and says
//! exactly what is wrong and how to fix it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::config::Settings;
use crate::sources::nix::command::Nix;
use crate::sources::nix::pkgset::PkgSource;
use crate::sources::nix::SourceSetting;

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

/// Runs every check (blocking: it starts Nix and connects to the daemon).
pub fn run(settings: &Settings) -> Vec<Check> {
    let mut out = vec![state_dir(&settings.state_dir)];
    out.extend(nix(settings));
    out.push(listener(settings.listen));
    let addr = display_addr(settings.listen);
    out.push(containerd(Path::new("/etc/containerd"), &addr));
    out.push(docker(Path::new("/etc/docker/daemon.json"), &addr));
    out.push(podman(
        Path::new("/etc/containers/registries.conf.d"),
        &addr,
    ));
    out.push(k3s(Path::new("/etc/rancher/k3s"), &addr));
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
