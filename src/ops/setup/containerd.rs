//! containerd's `certs.d/<host>/hosts.toml`: one file per registry, the
//! daemon as a pull/resolve mirror and the real registry as the fallback.
//! Docker with the containerd image store reads the same files, so
//! `setup docker` writes them too.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::{hosts, Common, PlannedFile, Registries, DEFAULT_HOST_DIR, MARKER, NIX_REGISTRY};
use crate::oci::reference::DOCKER_HUB;

#[derive(Clone, Debug, clap::Args)]
pub struct ContainerdArgs {
    /// containerd's hosts directory (the CRI plugin's `config_path`, ctr's
    /// `--hosts-dir`).
    #[arg(long, value_name = "DIR", default_value = "/etc/containerd/certs.d")]
    pub(crate) hosts_dir: PathBuf,
    #[command(flatten)]
    pub(crate) registries: Registries,
    #[command(flatten)]
    pub(crate) common: Common,
}

/// Where a registry really is: Docker Hub's API is not at docker.io.
fn upstream(host: &str) -> String {
    match host {
        DOCKER_HUB => "https://registry-1.docker.io".to_owned(),
        other => format!("https://{other}"),
    }
}

/// `hosts.toml` for `host`: the daemon as a pull/resolve mirror, the real
/// registry as `server`, which containerd falls back to when the daemon
/// fails or cannot be reached. A Nix registry's server is the daemon.
pub(crate) fn hosts_toml(host: &str, mirror_url: &str) -> String {
    let mut s = format!(
        "{MARKER} ({host}); rerunning setup rewrites this file.\n\
         # Delete the line above to keep your own edits: setup then leaves the file alone.\n"
    );
    match host {
        // Without a server line containerd falls back to https://nix.local:
        // an mDNS lookup, whose DNS error hides the daemon's answer.
        // containerd 1.6 also needs the [host] table, so the daemon is both.
        NIX_REGISTRY => {
            let _ = writeln!(
                s,
                "# nix.local exists only in nixery-local: the daemon is also the server, so\n\
                 # containerd never looks the name up.\nserver = \"{mirror_url}\""
            );
        }
        // containerd's default for the server is https://<host>, which for
        // `_default` is each image's own registry.
        DEFAULT_HOST_DIR => s.push_str(
            "# Every registry without a directory of its own; each falls back to itself.\n",
        ),
        _ => {
            let _ = writeln!(s, "server = \"{}\"", upstream(host));
        }
    }
    let _ = write!(
        s,
        "\n[host.\"{mirror_url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    );
    s
}

pub(super) fn hosts_files(dir: &Path, registries: &Registries, url: &str) -> Vec<PlannedFile> {
    hosts(registries)
        .iter()
        .map(|host| PlannedFile::owned(&dir.join(host).join("hosts.toml"), hosts_toml(host, url)))
        .collect()
}

pub(super) fn containerd_next(dir: &Path) -> String {
    let dir = dir.display();
    format!(
        "containerd reads these files on every pull; nothing needs a restart.\n\
         - ctr: pass --hosts-dir {dir}, e.g. ctr images pull --hosts-dir {dir} nix.local/hello:latest\n\
         - Kubernetes (the CRI plugin): /etc/containerd/config.toml needs\n    \
             [plugins.\"io.containerd.grpc.v1.cri\".registry]\n      config_path = \"{dir}\"\n  \
           (containerd 2: [plugins.\"io.containerd.cri.v1.images\".registry]); if you add it: sudo systemctl restart containerd\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::setup::mirror_url;
    use crate::ops::setup::tests::listen;

    #[test]
    fn hosts_toml_keeps_the_upstream_as_fallback() {
        let url = mirror_url(listen());
        let docker = hosts_toml("docker.io", &url);
        assert!(docker.starts_with(MARKER));
        assert!(docker.contains("\nserver = \"https://registry-1.docker.io\"\n"));
        assert!(docker.contains(
            "\n[host.\"http://127.0.0.1:7733\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ));
        assert!(hosts_toml("ghcr.io", &url).contains("\nserver = \"https://ghcr.io\"\n"));
        assert!(!hosts_toml(DEFAULT_HOST_DIR, &url).contains("server ="));
        for host in [NIX_REGISTRY, DEFAULT_HOST_DIR] {
            let parsed: toml::Value = toml::from_str(&hosts_toml(host, &url)).expect("valid TOML");
            assert!(parsed["host"]["http://127.0.0.1:7733"].is_table());
        }
        let nix: toml::Value = toml::from_str(&hosts_toml(NIX_REGISTRY, &url)).expect("TOML");
        assert_eq!(nix["server"].as_str(), Some("http://127.0.0.1:7733"));
        let parsed: toml::Value = toml::from_str(&docker).expect("valid TOML");
        assert_eq!(
            parsed["host"]["http://127.0.0.1:7733"]["capabilities"],
            toml::Value::Array(vec!["pull".into(), "resolve".into()])
        );
    }
}
