//! The daemon's settings: command-line flags, the same keys in an optional
//! TOML file (flags win), and the defaults, resolved into [`Settings`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::reference::RegistryHost;

/// Loopback only by default: the daemon serves whatever its cache holds to
/// anyone who can connect.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7733);
pub const DEFAULT_HEADER_TIMEOUT_SECS: u64 = 10;
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid default registry: {0}")]
    DefaultRegistry(#[from] crate::reference::NameError),
    #[error("no state directory: pass --state-dir, or set STATE_DIRECTORY or a home directory")]
    NoStateDir,
    #[error("{0} must be at least 1")]
    Zero(&'static str),
}

/// The options of `serve`, as flags and as keys of the config file (the file
/// uses the flag names: `listen`, `state-dir`, …). All optional here so a
/// flag left out falls back to the file, then to the default.
#[derive(Clone, Debug, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Options {
    /// Address to listen on [default: 127.0.0.1:7733]. Use a loopback address
    /// unless you mean to serve the cache to other machines.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// The cache directory [default: $STATE_DIRECTORY, else $CACHE_DIRECTORY,
    /// else the user's cache directory, e.g. ~/.cache/nixery-local].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Registry host that requests without containerd's `ns` parameter are
    /// served from [default: docker.io].
    #[arg(long, value_name = "HOST")]
    pub default_registry: Option<String>,

    /// Seconds a client has to send a complete request head; slower
    /// connections are closed [default: 10].
    #[arg(long, value_name = "SECS")]
    pub header_timeout: Option<u64>,

    /// Most connections served at once; more wait to be accepted
    /// [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
}

impl Options {
    /// Reads a config file in the same shape as the flags.
    pub fn from_file(path: &Path) -> Result<Options, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            // toml's messages span several lines; keep the reason on one.
            message: e.message().trim().replace('\n', "; "),
        })
    }

    /// `self` (flags) where set, else `file`.
    pub fn or(self, file: Options) -> Options {
        Options {
            listen: self.listen.or(file.listen),
            state_dir: self.state_dir.or(file.state_dir),
            default_registry: self.default_registry.or(file.default_registry),
            header_timeout: self.header_timeout.or(file.header_timeout),
            max_connections: self.max_connections.or(file.max_connections),
        }
    }

    pub fn resolve(self) -> Result<Settings, ConfigError> {
        let listen = self.listen.unwrap_or(DEFAULT_LISTEN);
        let state_dir = match self.state_dir {
            Some(d) => d,
            None => default_state_dir()?,
        };
        let default_registry = self
            .default_registry
            .as_deref()
            .unwrap_or(crate::reference::DOCKER_HUB)
            .parse()?;
        let header_timeout = self.header_timeout.unwrap_or(DEFAULT_HEADER_TIMEOUT_SECS);
        if header_timeout == 0 {
            return Err(ConfigError::Zero("header-timeout"));
        }
        let max_connections = self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(ConfigError::Zero("max-connections"));
        }
        Ok(Settings {
            listen,
            state_dir,
            default_registry,
            header_timeout: Duration::from_secs(header_timeout),
            max_connections,
        })
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub default_registry: RegistryHost,
    pub header_timeout: Duration,
    pub max_connections: usize,
}

/// systemd tells a service its directories (`StateDirectory=`,
/// `CacheDirectory=`; several are colon-separated, the first is ours);
/// otherwise the XDG cache directory.
pub fn default_state_dir() -> Result<PathBuf, ConfigError> {
    for var in ["STATE_DIRECTORY", "CACHE_DIRECTORY"] {
        if let Some(v) = std::env::var_os(var) {
            if let Some(first) = v.to_string_lossy().split(':').find(|s| !s.is_empty()) {
                return Ok(PathBuf::from(first));
            }
        }
    }
    directories::ProjectDirs::from("", "", "nixery-local")
        .map(|d| d.cache_dir().to_owned())
        .ok_or(ConfigError::NoStateDir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\nstate-dir = \"/var/x\"\nheader-timeout = 3\n",
        )
        .expect("write");
        let file = Options::from_file(&path).expect("parse");
        let flags = Options {
            state_dir: Some("/flag".into()),
            ..Options::default()
        };
        let s = flags.or(file).resolve().expect("resolve");
        assert_eq!(s.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(s.state_dir, PathBuf::from("/flag"));
        assert_eq!(s.header_timeout, Duration::from_secs(3));
        assert_eq!(s.default_registry.as_str(), "docker.io");
        assert_eq!(s.max_connections, DEFAULT_MAX_CONNECTIONS);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "lisen = \"x\"\n").expect("write");
        let e = Options::from_file(&path).expect_err("unknown key");
        assert!(!e.to_string().contains('\n'), "{e}");
        let bad = Options {
            default_registry: Some("Not A Host".into()),
            state_dir: Some("/x".into()),
            ..Options::default()
        };
        assert!(bad.resolve().is_err());
        assert!(Options::from_file(&dir.path().join("missing.toml")).is_err());
    }
}
