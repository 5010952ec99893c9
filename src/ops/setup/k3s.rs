//! k3s' (and RKE2's) `registries.yaml`: the daemon as the first endpoint
//! of each mirrored registry.

use std::fmt::Write as _;
use std::path::PathBuf;

use super::{Common, Registries, DEFAULT_HOST_DIR, MARKER};

#[derive(Clone, Debug, clap::Args)]
pub struct K3sArgs {
    /// k3s' (and RKE2's) registry configuration.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/rancher/k3s/registries.yaml"
    )]
    pub(crate) registries_yaml: PathBuf,
    #[command(flatten)]
    pub(crate) registries: Registries,
    #[command(flatten)]
    pub(crate) common: Common,
}

/// registries.yaml: the daemon as the first endpoint of each registry; k3s
/// keeps the registry itself as the fallback.
pub(crate) fn k3s_registries_yaml(hosts: &[String], mirror_url: &str) -> String {
    let mut s = format!(
        "{MARKER} (k3s); rerunning setup rewrites this file.\n\
         # Delete the line above to keep your own edits: setup then leaves the file alone.\n\
         mirrors:\n"
    );
    for host in hosts {
        // k3s spells containerd's `_default` as "*".
        let key = if host == DEFAULT_HOST_DIR { "*" } else { host };
        let _ = write!(s, "  \"{key}\":\n    endpoint:\n      - \"{mirror_url}\"\n");
    }
    s
}

pub(super) fn k3s_next() -> String {
    "Restart k3s to load registries.yaml: sudo systemctl restart k3s (agents: k3s-agent; RKE2: rke2-server or rke2-agent, which read /etc/rancher/rke2/registries.yaml)\n".to_owned()
}
