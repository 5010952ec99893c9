//! What a registry client can read beyond what `Accept` says, told by its
//! `User-Agent`. Docker engines before 23 accept zstd layers in a manifest
//! but cannot unpack them ("archive/tar: invalid tar header" after the whole
//! download), and say nothing about it in `Accept`.

/// A client's abilities; the default is a client that reads everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Client {
    /// Whether it unpacks zstd-compressed layers.
    pub(crate) zstd_layers: bool,
}

impl Default for Client {
    fn default() -> Self {
        Client { zstd_layers: true }
    }
}

impl Client {
    /// From a `User-Agent` header. Docker's starts `docker/20.10.24+dfsg1 …`;
    /// containerd, podman, skopeo and others read zstd.
    pub(crate) fn from_user_agent(user_agent: Option<&str>) -> Client {
        let docker_major = user_agent
            .and_then(|ua| ua.strip_prefix("docker/"))
            .and_then(|v| v.split('.').next())
            .and_then(|major| major.parse::<u32>().ok());
        Client {
            zstd_layers: docker_major.is_none_or(|major| major >= 23),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_docker_engines_read_no_zstd() {
        let debian = "docker/20.10.24+dfsg1 go/go1.19.8 git-commit/5d6db84 kernel/6.1 os/linux arch/amd64 UpstreamClient(Docker-Client/20.10.24+dfsg1 \\(linux\\))";
        assert!(!Client::from_user_agent(Some(debian)).zstd_layers);
        assert!(Client::from_user_agent(Some("docker/23.0.1 go/go1.19.5")).zstd_layers);
        assert!(Client::from_user_agent(Some("docker/28.2.2 go/go1.24")).zstd_layers);
        assert!(Client::from_user_agent(Some("containerd/1.6.20+ds1")).zstd_layers);
        assert!(Client::from_user_agent(Some("skopeo/1.9.3")).zstd_layers);
        assert!(Client::from_user_agent(None).zstd_layers);
        assert!(Client::from_user_agent(Some("docker/")).zstd_layers);
    }
}
