//! Talking to upstream registries: where a registry host lives, TLS, auth
//! (Basic, and the Bearer token flow with a token cache), redirects, and
//! which addresses the daemon may contact at all.
//!
//! - A host given with `--upstream HOST=URL` is trusted as configured: it may
//!   be plain HTTP or on a loopback or private address, and so may what it
//!   redirects to. Any other host H is `https://H` (Docker Hub's is
//!   `registry-1.docker.io`) and is only reached on public addresses, so the
//!   daemon cannot be used as a proxy into the local network.
//! - Credentials (flags, config file, Docker's `config.json`) are sent only
//!   to their registry and its token realm, never to a redirect target on
//!   another host, and never logged.
//!
//! This module returns responses with their bodies unread; verifying what
//! they carry is [`crate::sources::mirror`]'s job.
//!
//! Here: [`Upstreams`], which host is reached where and whether at all
//! (offline, `--upstream-only`), the request loop and redirects. Beside it:
//! `auth` (credentials and challenges), `tokens` (the Bearer token flow and
//! its cache), `connect` (the HTTP client and its public-only resolver) and
//! `tls` (root and extra CAs).

mod auth;
mod connect;
mod tls;
mod tokens;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::Empty;
use hyper::body::Incoming;

use crate::oci::digest::Digest;
use crate::oci::reference::{RegistryHost, RepoName, DOCKER_HUB};
use crate::telemetry::metrics::{self, METRICS};

use auth::parse_challenge;
use connect::{client, HttpClient};
use tls::tls_config;
use tokens::Token;

pub(crate) use auth::{docker_config_credentials, Credential};
pub(crate) use connect::is_public;

/// Redirects followed per request (blobs are often one hop to a CDN).
const MAX_REDIRECTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("offline: not contacting {0}")]
    Offline(RegistryHost),
    #[error("{0} is not a configured upstream (--upstream-only)")]
    NotConfigured(RegistryHost),
    #[error("{0} is not a public address; name it with --upstream HOST=URL to allow it")]
    NotAllowed(String),
    #[error("invalid upstream URL {0:?}")]
    Url(String),
    #[error("{url}: {message}")]
    Request { url: String, message: String },
    #[error("{url}: no response within {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("{url}: too many redirects")]
    TooManyRedirects { url: String },
    #[error("token from {realm}: {message}")]
    Token { realm: String, message: String },
    #[error("reading CA file {path}: {message}")]
    Ca { path: PathBuf, message: String },
    #[error("TLS setup: {0}")]
    Tls(String),
}

#[derive(Clone, Debug, Default)]
pub struct UpstreamSettings {
    /// `--upstream HOST=URL`: trusted hosts and where they live.
    pub(crate) overrides: Vec<(RegistryHost, String)>,
    /// `--upstream-ca HOST=FILE`: an extra CA for one host.
    pub(crate) extra_cas: Vec<(RegistryHost, PathBuf)>,
    pub(crate) credentials: Vec<(RegistryHost, Credential)>,
    /// Connect and response-header timeout.
    pub(crate) timeout: Duration,
    pub(crate) offline: bool,
    /// Contact only the hosts in `overrides`.
    pub(crate) only_configured: bool,
}

/// What to fetch from an upstream.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    Manifest(String),
    Blob(Digest),
}

pub struct Upstreams {
    settings: UpstreamSettings,
    public: HttpClient,
    trusted: HttpClient,
    /// Trusted clients with an extra CA, per host.
    with_ca: HashMap<RegistryHost, HttpClient>,
    credentials: HashMap<RegistryHost, Credential>,
    tokens: Mutex<HashMap<(RegistryHost, String), Token>>,
    /// Hosts that answered a Basic challenge: send credentials up front.
    basic_hosts: Mutex<std::collections::HashSet<RegistryHost>>,
}

impl Upstreams {
    pub fn new(settings: UpstreamSettings) -> Result<Upstreams, UpstreamError> {
        let timeout = settings.timeout;
        let public = client(true, timeout, tls_config(None)?);
        let trusted = client(false, timeout, tls_config(None)?);
        let mut with_ca = HashMap::new();
        for (host, path) in &settings.extra_cas {
            with_ca.insert(
                host.clone(),
                client(false, timeout, tls_config(Some(path))?),
            );
        }
        // Flags and the config file win over Docker's config.
        let mut credentials: HashMap<RegistryHost, Credential> =
            docker_config_credentials().into_iter().collect();
        credentials.extend(settings.credentials.iter().cloned());
        Ok(Upstreams {
            settings,
            public,
            trusted,
            with_ca,
            credentials,
            tokens: Mutex::new(HashMap::new()),
            basic_hosts: Mutex::new(Default::default()),
        })
    }

    pub(crate) fn offline(&self) -> bool {
        self.settings.offline
    }

    /// The base URL of `host` and whether it is trusted (configured).
    fn base(&self, host: &RegistryHost) -> (String, bool) {
        if let Some((_, url)) = self.settings.overrides.iter().find(|(h, _)| h == host) {
            return (url.trim_end_matches('/').to_owned(), true);
        }
        if host.as_str() == DOCKER_HUB {
            return ("https://registry-1.docker.io".to_owned(), false);
        }
        (format!("https://{host}"), false)
    }

    /// Whether `uri` is at the address of an upstream named with
    /// `--upstream`.
    fn is_configured(&self, uri: &Uri) -> bool {
        let Some(authority) = uri.authority() else {
            return false;
        };
        self.settings.overrides.iter().any(|(_, url)| {
            url.parse::<Uri>()
                .ok()
                .and_then(|u| u.authority().cloned())
                .is_some_and(|a| a == *authority)
        })
    }

    /// The client for a URL: configured upstreams use the unrestricted
    /// client; everything else only reaches public addresses, IP literals
    /// included.
    fn client_for(
        &self,
        host: &RegistryHost,
        uri: &Uri,
        trusted: bool,
    ) -> Result<&HttpClient, UpstreamError> {
        if trusted {
            return Ok(self.with_ca.get(host).unwrap_or(&self.trusted));
        }
        if let Some(h) = uri.host() {
            let literal = h.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = literal.parse::<IpAddr>() {
                if !is_public(ip) {
                    return Err(UpstreamError::NotAllowed(h.to_owned()));
                }
            }
        }
        Ok(self.with_ca.get(host).unwrap_or(&self.public))
    }

    /// The repository path upstream: Docker Hub keeps official images under `library/`.
    fn upstream_repo(host: &RegistryHost, repo: &RepoName) -> String {
        if host.as_str() == DOCKER_HUB && !repo.as_str().contains('/') {
            format!("library/{repo}")
        } else {
            repo.to_string()
        }
    }

    /// Sends `method` for `target` in `repo` on `host`, authenticating as the
    /// registry asks and following redirects. The body is left unread.
    pub(crate) async fn fetch(
        &self,
        host: &RegistryHost,
        repo: &RepoName,
        target: &Target,
        method: Method,
        accept: &[&str],
        range_from: Option<u64>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        if self.settings.offline {
            return Err(UpstreamError::Offline(host.clone()));
        }
        if self.settings.only_configured && !self.settings.overrides.iter().any(|(h, _)| h == host)
        {
            return Err(UpstreamError::NotConfigured(host.clone()));
        }
        let (base, trusted) = self.base(host);
        let repo_path = Self::upstream_repo(host, repo);
        let url = match target {
            Target::Manifest(r) => format!("{base}/v2/{repo_path}/manifests/{r}"),
            Target::Blob(d) => format!("{base}/v2/{repo_path}/blobs/{d}"),
        };
        let scope = format!("repository:{repo_path}:pull");
        let mut tried_auth = false;
        loop {
            let auth = self.auth_header(host, &scope);
            let resp = self
                .send_following(
                    host,
                    &url,
                    trusted,
                    &method,
                    accept,
                    range_from,
                    auth.as_ref(),
                )
                .await?;
            if resp.status() != StatusCode::UNAUTHORIZED || tried_auth {
                return Ok(resp);
            }
            tried_auth = true;
            let challenge = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(parse_challenge);
            match challenge {
                Some((scheme, params)) if scheme == "bearer" => {
                    self.fetch_token(host, trusted, &params, &scope).await?;
                }
                Some((scheme, _)) if scheme == "basic" && self.credentials.contains_key(host) => {
                    if let Ok(mut b) = self.basic_hosts.lock() {
                        b.insert(host.clone());
                    }
                }
                // No way to authenticate: the 401 is the answer.
                _ => return Ok(resp),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_following(
        &self,
        host: &RegistryHost,
        url: &str,
        trusted: bool,
        method: &Method,
        accept: &[&str],
        range_from: Option<u64>,
        auth: Option<&HeaderValue>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let origin: Uri = url
            .parse()
            .map_err(|_| UpstreamError::Url(url.to_owned()))?;
        let origin_authority = origin.authority().cloned();
        let mut uri = origin;
        for _ in 0..=MAX_REDIRECTS {
            let same_host = uri.authority() == origin_authority.as_ref();
            // A configured upstream is trusted with its own address, not
            // with wherever it points: a hop elsewhere reaches only public
            // addresses, unless that address is configured too (a CDN).
            let hop_trusted = trusted && (same_host || self.is_configured(&uri));
            let mut req = Request::builder().method(method.clone()).uri(uri.clone());
            for a in accept {
                req = req.header(header::ACCEPT, *a);
            }
            if let Some(from) = range_from {
                req = req.header(header::RANGE, format!("bytes={from}-"));
            }
            // The upstream's credentials never go to another host.
            if let (Some(a), true) = (auth, same_host) {
                req = req.header(header::AUTHORIZATION, a.clone());
            }
            let req = req
                .body(Empty::new())
                .map_err(|e| UpstreamError::Url(e.to_string()))?;
            let client = self.client_for(host, &uri, hop_trusted)?;
            let shown = uri.to_string();
            let sent = Instant::now();
            let resp = match tokio::time::timeout(self.settings.timeout, client.request(req)).await
            {
                Err(_) => {
                    metrics::add(&METRICS.upstream_errors, 1);
                    return Err(UpstreamError::Timeout {
                        url: shown,
                        after: self.settings.timeout,
                    });
                }
                Ok(Err(e)) => {
                    metrics::add(&METRICS.upstream_errors, 1);
                    return Err(UpstreamError::Request {
                        url: shown,
                        message: error_chain(&e),
                    });
                }
                Ok(Ok(r)) => r,
            };
            METRICS.upstream_latency.observe(sent.elapsed());
            if resp.status().is_server_error() {
                metrics::add(&METRICS.upstream_errors, 1);
            }
            tracing::debug!(url = %shown, status = resp.status().as_u16(), "upstream");
            if !resp.status().is_redirection() {
                return Ok(resp);
            }
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| UpstreamError::Request {
                    url: shown.clone(),
                    message: format!("{} without a Location", resp.status()),
                })?;
            uri = resolve_location(&uri, location)
                .ok_or_else(|| UpstreamError::Url(location.to_owned()))?;
        }
        Err(UpstreamError::TooManyRedirects {
            url: url.to_owned(),
        })
    }
}

/// The full chain of an error, for messages (hyper's top level says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// A `Location` relative to the request's URI.
fn resolve_location(base: &Uri, location: &str) -> Option<Uri> {
    if let Ok(uri) = location.parse::<Uri>() {
        if uri.scheme().is_some() && uri.authority().is_some() {
            return Some(uri);
        }
    }
    if location.starts_with('/') {
        let mut parts = base.clone().into_parts();
        parts.path_and_query = Some(location.parse().ok()?);
        return Uri::from_parts(parts).ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_names_get_library_and_locations_resolve() {
        let hub: RegistryHost = "docker.io".parse().expect("host");
        let ghcr: RegistryHost = "ghcr.io".parse().expect("host");
        let alpine: RepoName = "alpine".parse().expect("repo");
        assert_eq!(Upstreams::upstream_repo(&hub, &alpine), "library/alpine");
        assert_eq!(Upstreams::upstream_repo(&ghcr, &alpine), "alpine");
        let base: Uri = "https://r.example/v2/a/blobs/x".parse().expect("uri");
        assert_eq!(
            resolve_location(&base, "/cdn/blob?sig=1").map(|u| u.to_string()),
            Some("https://r.example/cdn/blob?sig=1".to_owned())
        );
        assert_eq!(
            resolve_location(&base, "https://cdn.example/b").map(|u| u.to_string()),
            Some("https://cdn.example/b".to_owned())
        );
        assert!(resolve_location(&base, "relative/path").is_none());
    }

    #[tokio::test]
    async fn upstream_only_refuses_unnamed_hosts_without_a_request() {
        let ups = Upstreams::new(UpstreamSettings {
            overrides: vec![(
                "127.0.0.1:1".parse().expect("host"),
                "http://127.0.0.1:1".into(),
            )],
            only_configured: true,
            timeout: Duration::from_secs(1),
            ..UpstreamSettings::default()
        })
        .expect("upstreams");
        let repo: RepoName = "library/a".parse().expect("repo");
        let target = Target::Manifest("1".into());
        let err = ups
            .fetch(
                &"docker.io".parse().expect("host"),
                &repo,
                &target,
                Method::HEAD,
                &[],
                None,
            )
            .await
            .expect_err("refused");
        assert!(matches!(err, UpstreamError::NotConfigured(_)), "{err}");
        // The named one is tried (and fails to connect: nothing listens on port 1).
        let err = ups
            .fetch(
                &"127.0.0.1:1".parse().expect("host"),
                &repo,
                &target,
                Method::HEAD,
                &[],
                None,
            )
            .await
            .expect_err("no server");
        assert!(matches!(err, UpstreamError::Request { .. }), "{err}");
    }
}
