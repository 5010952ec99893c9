//! podman's (and buildah's, skopeo's, CRI-O's) `registries.conf.d`
//! drop-in: the daemon as the mirror of the default registry, plus Nix
//! images under their namespace.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::{client_address, Common, MARKER, NIX_NAMESPACE, NIX_REGISTRY};
use crate::oci::reference::RegistryHost;

#[derive(Clone, Debug, clap::Args)]
pub struct PodmanArgs {
    /// The drop-in written for podman, buildah, skopeo and CRI-O.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/containers/registries.conf.d/nixery-local.conf"
    )]
    pub(crate) conf: PathBuf,
    #[command(flatten)]
    pub(crate) common: Common,
}

/// A registries.conf (v2) drop-in. Podman sends no `ns`, so only the
/// registry the daemon serves by default can be mirrored, plus Nix images
/// under their namespace.
pub(crate) fn podman_conf(listen: SocketAddr, default_registry: &RegistryHost) -> String {
    let addr = client_address(listen);
    format!(
        "{MARKER} (podman); rerunning setup rewrites this file.\n\
         # Delete the line above to keep your own edits: setup then leaves the file alone.\n\
         \n\
         [[registry]]\n\
         prefix = \"{default_registry}\"\n\
         location = \"{default_registry}\"\n\
         \n\
         [[registry.mirror]]\n\
         location = \"{addr}\"\n\
         insecure = true\n\
         \n\
         [[registry]]\n\
         prefix = \"{NIX_REGISTRY}\"\n\
         location = \"{addr}/{NIX_NAMESPACE}\"\n\
         insecure = true\n"
    )
}

pub(super) fn podman_next(listen: SocketAddr) -> String {
    let addr = client_address(listen);
    format!(
        "podman reads registries.conf.d on every command; nothing needs a restart (CRI-O: sudo systemctl reload crio).\n\
         Nix images: podman pull {NIX_REGISTRY}/hello (or {addr}/{NIX_NAMESPACE}/hello)\n"
    )
}
