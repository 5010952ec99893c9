//! The daemon's settings: command-line flags, the same keys in an optional
//! TOML file (flags win), and the defaults, resolved into [`Settings`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::oci::reference::RegistryHost;
use crate::sources::mirror::upstream::{Credential, UpstreamSettings};
use crate::sources::nix::command::NixConfig;
use crate::sources::nix::layers::{Compression, Popularity};
use crate::sources::nix::pkgset::PkgSource;
use crate::sources::nix::{NixSettings, SourceSetting};

/// Loopback only by default: the daemon serves whatever its cache holds to
/// anyone who can connect.
pub(crate) const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7733);
pub(crate) const DEFAULT_HEADER_TIMEOUT_SECS: u64 = 10;
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// zstd measured fastest end to end (build + `ctr pull` + unpack) on a
/// cached image and close to uncompressed on a cold one, at a fraction of
/// the disk (BENCHMARKS.md). Docker before 23 cannot unpack zstd: it is
/// told by its User-Agent and gets gzip layers (`oci::client`).
pub(crate) const DEFAULT_LAYER_COMPRESSION: &str = "zstd";
/// Nixery's 94 + 1, well below overlayfs' and containerd's limits.
pub(crate) const DEFAULT_LAYER_BUDGET: usize = 95;
/// Every repository of this registry host is a Nix image.
pub(crate) const DEFAULT_NIX_REGISTRY: &str = "nix.local";
/// Repositories under this first component are Nix images (`nix/hello`).
pub(crate) const DEFAULT_NIX_NAMESPACE: &str = "nix";
pub(crate) const DEFAULT_NIX_TTL_SECS: u64 = 3600;
pub(crate) const DEFAULT_TAG_TTL_SECS: u64 = 60;
pub(crate) const DEFAULT_UPSTREAM_TIMEOUT_SECS: u64 = 5;

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
    DefaultRegistry(#[from] crate::oci::reference::NameError),
    #[error("no state directory: pass --state-dir, or set STATE_DIRECTORY or a home directory")]
    NoStateDir,
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("{0}")]
    Nix(String),
    #[error("invalid size {0:?}: use bytes or a number with kB, MB, GB, KiB, MiB, GiB …")]
    Size(String),
    // Never echoes a credential: messages name the host only.
    #[error("{0}")]
    Upstream(String),
    #[error("merging the flags with the config file: {0}")]
    Merge(String),
}

/// The options of `serve`, as flags and as keys of the config file (the file
/// uses the flag names: `listen`, `state-dir`, …). All optional here so a
/// flag left out falls back to the file, then to the default.
#[derive(Clone, Debug, Default, Deserialize, Serialize, clap::Args)]
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

    /// Most bytes of blobs the cache keeps; least recently used images are
    /// evicted beyond it (e.g. 500MB, 20GiB) [default: a quarter of the
    /// filesystem holding the state dir].
    #[arg(long, value_name = "SIZE")]
    pub max_cache_size: Option<String>,

    /// Nix package set: a file or directory that, imported and called with
    /// `{}`, yields an attribute set of packages (a nixpkgs checkout, say)
    /// [default: <nixpkgs> from NIX_PATH].
    #[arg(long, value_name = "PATH", help_heading = "Nix images")]
    pub pkgs_path: Option<PathBuf>,

    /// Nix package set: a nixpkgs channel, e.g. nixos-24.05.
    #[arg(long, value_name = "NAME", help_heading = "Nix images")]
    pub pkgs_channel: Option<String>,

    /// Nix package set: a git repository; the image tag picks the ref, a
    /// 40-hex tag the commit, `latest` the default branch.
    #[arg(long, value_name = "URL", help_heading = "Nix images")]
    pub pkgs_repo: Option<String>,

    /// Nix package set: a flake's legacyPackages (needs a Nix with flakes).
    #[arg(long, value_name = "REF", help_heading = "Nix images")]
    pub pkgs_flake: Option<String>,

    /// Repositories under this first component are Nix images
    /// (`nix/shell/git`) [default: nix].
    #[arg(long, value_name = "NAME", help_heading = "Nix images")]
    pub nix_namespace: Option<String>,

    /// Every repository of this registry host is a Nix image (repeatable)
    /// [default: nix.local].
    #[arg(
        long = "nix-registry",
        value_name = "HOST",
        help_heading = "Nix images"
    )]
    #[serde(default)]
    pub nix_registry: Vec<String>,

    /// Most layers per Nix image, the customisation layer included
    /// [default: 95].
    #[arg(long, value_name = "N", help_heading = "Nix images")]
    pub layer_budget: Option<usize>,

    /// Layer compression: gzip, zstd or none [default: zstd; Docker engines
    /// older than 23, which cannot unpack zstd, get gzip].
    #[arg(long, value_name = "KIND", help_heading = "Nix images")]
    pub layer_compression: Option<String>,

    /// Seconds a Nix image from a floating source (path, channel, <nixpkgs>,
    /// a branch) is served before the next pull re-evaluates it; commit-pinned
    /// images are kept forever [default: 3600].
    #[arg(long, value_name = "SECS", help_heading = "Nix images")]
    pub nix_ttl: Option<u64>,

    /// Seconds one Nix evaluation and build may take [default: 600].
    #[arg(long, value_name = "SECS", help_heading = "Nix images")]
    pub nix_timeout: Option<u64>,

    /// A Nix option for every Nix call, NAME=VALUE (repeatable), e.g.
    /// `substituters=` on a machine without network.
    #[arg(
        long = "nix-option",
        value_name = "NAME=VALUE",
        help_heading = "Nix images"
    )]
    #[serde(default)]
    pub nix_option: Vec<String>,

    /// Where registry HOST lives, as HOST=URL (repeatable), e.g.
    /// `registry.lan=http://10.0.0.5:5000`. Only hosts named here may be
    /// plain HTTP or on loopback or private addresses; any other host H is
    /// reached at https://H on public addresses only.
    #[arg(
        long = "upstream",
        value_name = "HOST=URL",
        help_heading = "Pull-through mirror"
    )]
    #[serde(default)]
    pub upstream: Vec<String>,

    /// An extra CA certificate (PEM) to trust for one upstream, HOST=FILE
    /// (repeatable). The system store (SSL_CERT_FILE/SSL_CERT_DIR) is
    /// always trusted.
    #[arg(
        long = "upstream-ca",
        value_name = "HOST=FILE",
        help_heading = "Pull-through mirror"
    )]
    #[serde(default)]
    pub upstream_ca: Vec<String>,

    /// A login for one upstream, HOST=USER:PASSWORD (repeatable; better put
    /// in the config file than on a command line). Docker's config.json
    /// `auths` are used too.
    #[arg(
        long = "credential",
        value_name = "HOST=USER:PASSWORD",
        help_heading = "Pull-through mirror"
    )]
    #[serde(default)]
    pub credential: Vec<String>,

    /// Contact only the registries named with --upstream; every other
    /// registry is served from the cache alone.
    #[arg(long, help_heading = "Pull-through mirror")]
    #[serde(default)]
    pub upstream_only: bool,

    /// Never contact an upstream: serve only what the cache holds.
    #[arg(long, help_heading = "Pull-through mirror")]
    #[serde(default)]
    pub offline: bool,

    /// Seconds a cached tag is served before it is checked again with the
    /// upstream (a HEAD request) [default: 60].
    #[arg(long, value_name = "SECS", help_heading = "Pull-through mirror")]
    pub tag_ttl: Option<u64>,

    /// Seconds to wait for an upstream to connect and answer; past it, a
    /// cached copy is served or the client gets a prompt 404 [default: 5].
    #[arg(long, value_name = "SECS", help_heading = "Pull-through mirror")]
    pub upstream_timeout: Option<u64>,

    /// Nixery-format popularity data (JSON: package name → reference count)
    /// for grouping store paths when an image has more than the layer budget.
    #[arg(long, value_name = "FILE", help_heading = "Nix images")]
    pub popularity: Option<PathBuf>,

    // --- blobserve (issue #6) ---
    /// Most bytes the layers extracted for `/files/…` may take; least
    /// recently used layers are evicted beyond it (e.g. 2GB) [default: a
    /// quarter of the filesystem holding the state dir].
    #[arg(long, value_name = "SIZE", help_heading = "Blobserve")]
    pub blobserve_max_size: Option<String>,

    /// Per-repository blobserve settings (config file only):
    /// `[blobserve."REPO"] workdir = "/usr/share/app"` and
    /// `replace = [{ file = "index.html", from = "…", to = "…" }]`.
    #[arg(skip)]
    #[serde(default)]
    pub blobserve: std::collections::BTreeMap<String, crate::blobserve::BlobserveRepo>,
    // --- end blobserve ---
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

    /// `self` (flags) where set, else `file`. A flag left out, off, or
    /// given no values leaves the file's value: the merge goes key by key
    /// through the options' serialized form, so a new option needs no
    /// code here.
    pub fn or(self, file: Options) -> Result<Options, ConfigError> {
        let merge_error = |e: serde_json::Error| ConfigError::Merge(e.to_string());
        let flags = serde_json::to_value(self).map_err(merge_error)?;
        let mut merged = serde_json::to_value(file).map_err(merge_error)?;
        if let (Value::Object(flags), Value::Object(merged)) = (flags, &mut merged) {
            for (key, value) in flags {
                let unset = match &value {
                    Value::Null | Value::Bool(false) => true,
                    Value::Array(a) => a.is_empty(),
                    Value::Object(o) => o.is_empty(),
                    _ => false,
                };
                if !unset {
                    merged.insert(key, value);
                }
            }
        }
        serde_json::from_value(merged).map_err(merge_error)
    }

    pub fn resolve(self) -> Result<Settings, ConfigError> {
        let nix = self.nix_settings()?;
        let upstream = self.upstream_settings()?;
        let tag_ttl = Duration::from_secs(self.tag_ttl.unwrap_or(DEFAULT_TAG_TTL_SECS));
        // blobserve (issue #6)
        let blobserve_max_bytes = self
            .blobserve_max_size
            .as_deref()
            .map(|s| parse_size(s).ok_or_else(|| ConfigError::Size(s.to_owned())))
            .transpose()?;
        let max_cache_bytes = self
            .max_cache_size
            .as_deref()
            .map(|s| parse_size(s).ok_or_else(|| ConfigError::Size(s.to_owned())))
            .transpose()?;
        let listen = self.listen.unwrap_or(DEFAULT_LISTEN);
        let state_dir = match self.state_dir {
            Some(d) => d,
            None => default_state_dir()?,
        };
        let default_registry = self
            .default_registry
            .as_deref()
            .unwrap_or(crate::oci::reference::DOCKER_HUB)
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
            nix,
            upstream,
            tag_ttl,
            max_cache_bytes,
            blobserve_max_bytes,
            blobserve_repos: self.blobserve,
        })
    }

    fn upstream_settings(&self) -> Result<UpstreamSettings, ConfigError> {
        fn pair<'a>(flag: &str, v: &'a str) -> Result<(RegistryHost, &'a str), ConfigError> {
            let (host, rest) = v
                .split_once('=')
                .ok_or_else(|| ConfigError::Upstream(format!("{flag} {v:?} is not HOST=…")))?;
            Ok((host.parse()?, rest))
        }
        let mut overrides = Vec::new();
        for v in &self.upstream {
            let (host, url) = pair("upstream", v)?;
            let uri: http::Uri = url
                .parse()
                .map_err(|_| ConfigError::Upstream(format!("upstream URL {url:?} is not a URL")))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
                return Err(ConfigError::Upstream(format!(
                    "upstream URL {url:?} must be http://HOST[:PORT] or https://HOST[:PORT]"
                )));
            }
            overrides.push((host, url.trim_end_matches('/').to_owned()));
        }
        let mut extra_cas = Vec::new();
        for v in &self.upstream_ca {
            let (host, file) = pair("upstream-ca", v)?;
            extra_cas.push((host, PathBuf::from(file)));
        }
        let mut credentials = Vec::new();
        for v in &self.credential {
            // Not `pair`: a malformed entry must not be echoed, it may hold a password.
            let (host, login) = v.split_once('=').ok_or_else(|| {
                ConfigError::Upstream("a credential is not HOST=USER:PASSWORD".into())
            })?;
            let host: RegistryHost = host.parse()?;
            let (username, password) = login.split_once(':').ok_or_else(|| {
                ConfigError::Upstream(format!("credential for {host} is not USER:PASSWORD"))
            })?;
            credentials.push((
                host,
                Credential {
                    username: username.to_owned(),
                    password: password.to_owned(),
                },
            ));
        }
        let timeout = self
            .upstream_timeout
            .unwrap_or(DEFAULT_UPSTREAM_TIMEOUT_SECS);
        if timeout == 0 {
            return Err(ConfigError::Zero("upstream-timeout"));
        }
        Ok(UpstreamSettings {
            overrides,
            extra_cas,
            credentials,
            timeout: Duration::from_secs(timeout),
            offline: self.offline,
            only_configured: self.upstream_only,
        })
    }

    fn nix_settings(&self) -> Result<NixSettings, ConfigError> {
        let sources = [
            self.pkgs_path.as_ref().map(|p| {
                // Nix needs an absolute path; a relative one means the cwd.
                let abs = std::path::absolute(p).unwrap_or_else(|_| p.clone());
                SourceSetting::Fixed(PkgSource::Path { path: abs })
            }),
            self.pkgs_channel
                .as_ref()
                .map(|c| SourceSetting::Fixed(PkgSource::Channel { channel: c.clone() })),
            self.pkgs_repo
                .as_ref()
                .map(|u| SourceSetting::GitRepo(u.clone())),
            self.pkgs_flake
                .as_ref()
                .map(|f| SourceSetting::Fixed(PkgSource::Flake { flake: f.clone() })),
        ];
        let mut given = sources.into_iter().flatten();
        let source = given
            .next()
            .unwrap_or(SourceSetting::Fixed(PkgSource::NixPath));
        if given.next().is_some() {
            return Err(ConfigError::Nix(
                "give at most one of pkgs-path, pkgs-channel, pkgs-repo, pkgs-flake".into(),
            ));
        }
        if let SourceSetting::Fixed(s) = &source {
            s.validate().map_err(|e| ConfigError::Nix(e.to_string()))?;
        }
        let namespace = self
            .nix_namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NIX_NAMESPACE.into());
        namespace
            .parse::<crate::oci::reference::RepoName>()
            .ok()
            .filter(|n| !n.as_str().contains('/'))
            .ok_or_else(|| {
                ConfigError::Nix(format!(
                    "nix-namespace {namespace:?} is not one repository name component"
                ))
            })?;
        let registries = if self.nix_registry.is_empty() {
            vec![DEFAULT_NIX_REGISTRY.parse()?]
        } else {
            self.nix_registry
                .iter()
                .map(|h| h.parse())
                .collect::<Result<_, _>>()?
        };
        let layer_budget = self.layer_budget.unwrap_or(DEFAULT_LAYER_BUDGET);
        if layer_budget < 2 {
            return Err(ConfigError::Nix("layer-budget must be at least 2".into()));
        }
        let compression: Compression = self
            .layer_compression
            .as_deref()
            .unwrap_or(DEFAULT_LAYER_COMPRESSION)
            .parse()
            .map_err(|e: crate::sources::nix::layers::UnknownCompression| {
                ConfigError::Nix(e.to_string())
            })?;
        let mut options = Vec::new();
        for o in &self.nix_option {
            let (k, v) = o
                .split_once('=')
                .ok_or_else(|| ConfigError::Nix(format!("nix-option {o:?} is not NAME=VALUE")))?;
            options.push((k.to_owned(), v.to_owned()));
        }
        let nix_timeout = self
            .nix_timeout
            .unwrap_or(NixConfig::default().timeout.as_secs());
        if nix_timeout == 0 {
            return Err(ConfigError::Zero("nix-timeout"));
        }
        let popularity = match &self.popularity {
            None => Popularity::new(),
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Popularity::from_nixery_json(&bytes).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
        };
        Ok(NixSettings {
            namespace,
            registries,
            source,
            layer_budget,
            compression,
            ttl: Duration::from_secs(self.nix_ttl.unwrap_or(DEFAULT_NIX_TTL_SECS)),
            popularity,
            nix: NixConfig {
                timeout: Duration::from_secs(nix_timeout),
                options,
                ..NixConfig::default()
            },
        })
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub default_registry: RegistryHost,
    pub(crate) header_timeout: Duration,
    pub(crate) max_connections: usize,
    pub nix: NixSettings,
    pub upstream: UpstreamSettings,
    pub(crate) tag_ttl: Duration,
    /// `None`: decided from the filesystem at startup.
    pub(crate) max_cache_bytes: Option<u64>,
    /// blobserve (issue #6): the extracted space's cap (`None`: from the
    /// filesystem at startup) and per-repository settings.
    pub(crate) blobserve_max_bytes: Option<u64>,
    pub(crate) blobserve_repos: std::collections::BTreeMap<String, crate::blobserve::BlobserveRepo>,
}

/// Parses a size: plain bytes, or a number with a unit (`kB`, `MB`, `GB`,
/// `TB` in powers of 1000; `KiB`, `MiB`, `GiB`, `TiB` in powers of 1024).
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let factor: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = num * factor;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// systemd tells a service its directories (`StateDirectory=`,
/// `CacheDirectory=`; several are colon-separated, the first is ours);
/// otherwise the XDG cache directory.
pub(crate) fn default_state_dir() -> Result<PathBuf, ConfigError> {
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
        let s = flags.or(file).expect("merge").resolve().expect("resolve");
        assert_eq!(s.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(s.state_dir, PathBuf::from("/flag"));
        assert_eq!(s.header_timeout, Duration::from_secs(3));
        assert_eq!(s.default_registry.as_str(), "docker.io");
        assert_eq!(s.max_connections, DEFAULT_MAX_CONNECTIONS);
    }

    #[test]
    fn sizes_take_decimal_and_binary_units() {
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("500MB"), Some(500_000_000));
        assert_eq!(parse_size("10GiB"), Some(10 << 30));
        assert_eq!(parse_size("1.5 kB"), Some(1500));
        assert_eq!(parse_size("12 parsecs"), None);
        assert_eq!(parse_size("-1"), None);
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
