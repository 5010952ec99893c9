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

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::oci::digest::Digest;
use crate::oci::reference::{RegistryHost, RepoName, DOCKER_HUB};
use crate::telemetry::metrics::{self, METRICS};

/// Redirects followed per request (blobs are often one hop to a CDN).
const MAX_REDIRECTS: usize = 5;
/// Token responses are small; anything bigger is refused.
const MAX_TOKEN_RESPONSE: usize = 1 << 20;
/// Tokens without `expires_in` live this long (the spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

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

/// A registry login. Debug output never shows the password.
#[derive(Clone)]
pub struct Credential {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}, <redacted>)", self.username)
    }
}

impl Credential {
    fn basic(&self) -> HeaderValue {
        let raw = format!("{}:{}", self.username, self.password);
        let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
        let mut v = HeaderValue::from_str(&format!("Basic {encoded}"))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        v.set_sensitive(true);
        v
    }
}

#[derive(Clone, Debug, Default)]
pub struct UpstreamSettings {
    /// `--upstream HOST=URL`: trusted hosts and where they live.
    pub overrides: Vec<(RegistryHost, String)>,
    /// `--upstream-ca HOST=FILE`: an extra CA for one host.
    pub extra_cas: Vec<(RegistryHost, PathBuf)>,
    pub credentials: Vec<(RegistryHost, Credential)>,
    /// Connect and response-header timeout.
    pub timeout: Duration,
    pub offline: bool,
    /// Contact only the hosts in `overrides`.
    pub only_configured: bool,
}

/// What to fetch from an upstream.
#[derive(Clone, Debug)]
pub enum Target {
    Manifest(String),
    Blob(Digest),
}

/// A resolver that only returns public addresses: the daemon must not be
/// turned into a proxy into the local network by a registry name (or a
/// redirect, or a token realm) that resolves to one.
#[derive(Clone)]
struct Resolver {
    public_only: bool,
}

type ResolveFuture = Pin<
    Box<
        dyn std::future::Future<Output = Result<std::vec::IntoIter<SocketAddr>, std::io::Error>>
            + Send,
    >,
>;

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = ResolveFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let public_only = self.public_only;
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .filter(|a| !public_only || is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{} has no public address", name.as_str()),
                ));
            }
            Ok(addrs.into_iter())
        })
    }
}

/// Whether `ip` is reachable on the public internet (not loopback, private,
/// link-local, shared, unspecified or multicast).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80)
        }
    }
}

type HttpClient = Client<HttpsConnector<HttpConnector<Resolver>>, Empty<Bytes>>;

/// A cached Bearer token.
struct Token {
    value: HeaderValue,
    expires: Instant,
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

fn tls_config(extra_ca: Option<&Path>) -> Result<rustls::ClientConfig, UpstreamError> {
    let mut roots = rustls::RootCertStore::empty();
    // The system store, honouring SSL_CERT_FILE / SSL_CERT_DIR.
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!(error = %e, "skipping an unreadable system certificate");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra_ca {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect())
            .map_err(|e| UpstreamError::Ca {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(UpstreamError::Ca {
                path: path.to_owned(),
                message: "no certificates in the file".into(),
            });
        }
        for cert in certs {
            roots.add(cert).map_err(|e| UpstreamError::Ca {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn client(public_only: bool, timeout: Duration, tls: rustls::ClientConfig) -> HttpClient {
    let mut http = HttpConnector::new_with_resolver(Resolver { public_only });
    http.enforce_http(false);
    http.set_connect_timeout(Some(timeout));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(https)
}

/// Docker's credential store: `$DOCKER_CONFIG/config.json` or
/// `~/.docker/config.json`, `auths.<registry>.auth` = base64 `user:pass`.
/// Credential helpers (`credsStore`) are not run.
pub fn docker_config_credentials() -> Vec<(RegistryHost, Credential)> {
    let path = match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) => PathBuf::from(dir).join("config.json"),
        None => match directories::BaseDirs::new() {
            Some(b) => b.home_dir().join(".docker/config.json"),
            None => return Vec::new(),
        },
    };
    let Ok(bytes) = std::fs::read(&path) else {
        return Vec::new();
    };
    #[derive(serde::Deserialize)]
    struct DockerConfig {
        #[serde(default)]
        auths: HashMap<String, AuthEntry>,
    }
    #[derive(serde::Deserialize)]
    struct AuthEntry {
        auth: Option<String>,
    }
    let Ok(config) = serde_json::from_slice::<DockerConfig>(&bytes) else {
        tracing::warn!(path = %path.display(), "ignoring a Docker config that is not valid JSON");
        return Vec::new();
    };
    let mut out = Vec::new();
    for (key, entry) in config.auths {
        let Some(auth) = entry.auth else { continue };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(auth.trim()) else {
            continue;
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            continue;
        };
        let Some((username, password)) = decoded.split_once(':') else {
            continue;
        };
        // Keys are hosts or URLs; Hub's legacy key is https://index.docker.io/v1/.
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("");
        let host = match host {
            "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => DOCKER_HUB,
            h => h,
        };
        if let Ok(host) = host.parse() {
            out.push((
                host,
                Credential {
                    username: username.to_owned(),
                    password: password.to_owned(),
                },
            ));
        }
    }
    out
}

/// The parameters of a `WWW-Authenticate` challenge: its scheme and
/// `key="value"` pairs (values may contain commas inside quotes).
fn parse_challenge(value: &str) -> (String, HashMap<String, String>) {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            val.push(n);
                        }
                    }
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            val = chars.by_ref().take_while(|c| *c != ',').collect();
        }
        params.insert(key.trim().to_ascii_lowercase(), val.trim().to_owned());
    }
    (scheme.to_ascii_lowercase(), params)
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

    pub fn offline(&self) -> bool {
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

    /// The client for a URL: trusted hosts (and, from a trusted upstream,
    /// wherever it redirects) use the unrestricted client; everything else
    /// only reaches public addresses, IP literals included.
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
    pub async fn fetch(
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

    fn auth_header(&self, host: &RegistryHost, scope: &str) -> Option<HeaderValue> {
        if let Ok(tokens) = self.tokens.lock() {
            if let Some(t) = tokens.get(&(host.clone(), scope.to_owned())) {
                if t.expires > Instant::now() {
                    return Some(t.value.clone());
                }
            }
        }
        let basic = self
            .basic_hosts
            .lock()
            .map(|b| b.contains(host))
            .unwrap_or(false);
        if basic {
            return self.credentials.get(host).map(Credential::basic);
        }
        None
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
            let client = self.client_for(host, &uri, trusted)?;
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

    async fn fetch_token(
        &self,
        host: &RegistryHost,
        trusted: bool,
        params: &HashMap<String, String>,
        scope: &str,
    ) -> Result<(), UpstreamError> {
        let realm = params.get("realm").ok_or_else(|| UpstreamError::Token {
            realm: String::new(),
            message: "Bearer challenge without a realm".into(),
        })?;
        // The serializer is not Send: finish it before any await.
        let query = {
            let mut q = form_urlencoded::Serializer::new(String::new());
            if let Some(service) = params.get("service") {
                q.append_pair("service", service);
            }
            q.append_pair("scope", params.get("scope").map_or(scope, String::as_str));
            q.finish()
        };
        let sep = if realm.contains('?') { '&' } else { '?' };
        let url = format!("{realm}{sep}{query}");
        let token_err = |message: String| UpstreamError::Token {
            realm: realm.clone(),
            message,
        };
        let uri: Uri = url
            .parse()
            .map_err(|_| token_err("invalid realm URL".into()))?;
        let mut req = Request::get(uri.clone());
        if let Some(c) = self.credentials.get(host) {
            req = req.header(header::AUTHORIZATION, c.basic());
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| token_err(e.to_string()))?;
        let client = self.client_for(host, &uri, trusted)?;
        let resp = tokio::time::timeout(self.settings.timeout, client.request(req))
            .await
            .map_err(|_| token_err("timed out".into()))?
            .map_err(|e| token_err(error_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(token_err(format!("status {}", resp.status())));
        }
        let body = tokio::time::timeout(
            self.settings.timeout,
            Limited::new(resp.into_body(), MAX_TOKEN_RESPONSE).collect(),
        )
        .await
        .map_err(|_| token_err("timed out".into()))?
        .map_err(|e| token_err(e.to_string()))?
        .to_bytes();
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| token_err(e.to_string()))?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .ok_or_else(|| token_err("no token in the response".into()))?;
        let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| token_err("token is not a valid header value".into()))?;
        value.set_sensitive(true);
        let lifetime = parsed
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME);
        // Refresh a little early so a token does not expire mid-request.
        let expires = Instant::now() + lifetime.saturating_sub(Duration::from_secs(5));
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert((host.clone(), scope.to_owned()), Token { value, expires });
        }
        Ok(())
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
    fn challenges_parse_quoted_values_with_commas() {
        let (scheme, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        );
        assert_eq!(scheme, "bearer");
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/alpine:pull,push");
        let (scheme, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(scheme, "basic");
        assert_eq!(p["realm"], "Registry Realm");
    }

    #[test]
    fn only_public_addresses_are_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.5.5",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["1.1.1.1", "52.1.2.3", "2606:4700::1111"] {
            assert!(is_public(ip.parse().expect("ip")), "{ip}");
        }
    }

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

    #[test]
    fn credentials_are_not_printed() {
        let c = Credential {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
