//! The HTTP edge: accepts connections, maps `/v2/…` requests onto the
//! [`Registry`] service and writes its answers, streaming blobs from disk.
//!
//! This module owns everything about the wire: routing, header parsing
//! (`Accept`, `Range`, the `ns` query), connection limits and timeouts,
//! graceful shutdown, and the one place where service errors become the OCI
//! error envelope ([`ApiError`]).

mod body;
pub(crate) mod chunks;
mod error;
mod files;
mod range;
pub(crate) mod status_page;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub(crate) use self::body::Body;
use self::body::{blob_stream, download_stream, empty, full, insert_str, json_response};
use self::chunks::ChunkPool;
pub(crate) use self::error::ApiError;
use self::range::Span;
use crate::blobserve::Blobserve;
use crate::oci::accept::Accept;
use crate::oci::client::Client;
use crate::oci::digest::Digest;
use crate::oci::error_code::ErrorCode;
use crate::oci::reference::{NameError, Reference, RegistryHost, RepoName};
use crate::registry::{Blob, BlobSource, Registry};
use crate::telemetry::events::EVENTS;
use crate::telemetry::metrics::METRICS;

/// Blobs are read and sent in chunks this large: big enough that per-chunk
/// overhead vanishes (4 KiB chunks run at a twentieth of the speed).
const CHUNK: usize = 1 << 20;

/// At most this many large chunks exist (see [`crate::http::chunks`]): two per
/// stream (one being sent, one read ahead) for 16 clients at full speed.
const LARGE_CHUNKS: usize = 32;

/// What streams get once every large chunk is in use.
const SMALL_CHUNK: usize = 64 << 10;

/// Request heads larger than this are refused with 431 by hyper.
const MAX_HEAD: usize = 64 << 10;

/// How long in-flight requests may run after a shutdown signal, unless a
/// Nix build they may be waiting for is still running.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");

#[derive(Clone, Debug)]
pub(crate) struct ServerOptions {
    /// A client must send a complete request head within this time.
    pub(crate) header_timeout: Duration,
    /// Connections beyond this wait in the listen backlog.
    pub(crate) max_connections: usize,
    /// The cache's size limit, shown on the status page.
    pub(crate) cache_limit: Option<u64>,
    /// blobserve (issue #6): serves `/files/…` when set.
    pub(crate) blobserve: Option<Arc<Blobserve>>,
}

/// Serves `registry` on `listener` until `shutdown` completes, then lets
/// in-flight requests finish: up to [`DRAIN_TIMEOUT`] after the running Nix
/// builds end, so a pull waiting for one still gets its image. (Under
/// systemd, TimeoutStopSec= bounds the whole stop.)
pub(crate) async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
) {
    let app = Arc::new(App {
        registry,
        cache_limit: options.cache_limit,
        chunks: ChunkPool::new(CHUNK, LARGE_CHUNKS, SMALL_CHUNK),
        blobserve: options.blobserve.clone(),
    });
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(options.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&limit).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break, // the semaphore is never closed
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = Arc::clone(&app);
        let service = service_fn(move |req| {
            let app = Arc::clone(&app);
            async move { Ok::<_, Infallible>(handle(&app, req).await) }
        });
        let conn = http1::Builder::new()
            // Without a timer hyper silently ignores header_read_timeout.
            .timer(TokioTimer::new())
            .header_read_timeout(options.header_timeout)
            .max_buf_size(MAX_HEAD)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("shutting down: draining connections");
    // Builds first: requests waiting for one answer once it ends, and then
    // have the usual time to finish.
    let patience = async {
        app.registry.work_finished().await;
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = patience => tracing::warn!("drain timed out; closing remaining connections"),
    }
}

/// What every request handler shares.
pub(crate) struct App {
    registry: Arc<Registry>,
    cache_limit: Option<u64>,
    chunks: Arc<ChunkPool>,
    blobserve: Option<Arc<Blobserve>>,
}

/// The `/v2/` endpoints, split off the path from its end: repository names
/// may themselves contain `manifests` or `blobs` components, but references
/// and digests never contain `/`.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Ping,
    Manifest { name: &'a str, reference: &'a str },
    Blob { name: &'a str, digest: &'a str },
    Upload,
    Tags { name: &'a str },
}

fn route(path: &str) -> Option<Route<'_>> {
    let rest = match path {
        "/v2" | "/v2/" => return Some(Route::Ping),
        p => p.strip_prefix("/v2/")?,
    };
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(Route::Tags { name });
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        if !reference.contains('/') {
            return Some(Route::Manifest { name, reference });
        }
    }
    if let Some((name, tail)) = rest.rsplit_once("/blobs/") {
        if !tail.contains('/') && tail != "uploads" {
            return Some(Route::Blob { name, digest: tail });
        }
    }
    if rest.contains("/blobs/uploads") {
        return Some(Route::Upload);
    }
    None
}

/// What a request asked for beyond its route.
pub(crate) struct Query {
    ns: Option<RegistryHost>,
    n: Option<usize>,
    last: Option<String>,
}

pub(crate) fn parse_query(query: Option<&str>) -> Result<Query, ApiError> {
    let mut q = Query {
        ns: None,
        n: None,
        last: None,
    };
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*key {
            "ns" if q.ns.is_none() => q.ns = Some(value.parse::<RegistryHost>()?),
            "n" => {
                q.n = Some(value.parse().map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::PaginationNumberInvalid,
                        "n must be a non-negative integer",
                    )
                })?)
            }
            "last" => q.last = Some(value.into_owned()),
            _ => {}
        }
    }
    Ok(q)
}

async fn handle(app: &App, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let mut ns_echo = None;
    let route_label = match route(&path) {
        Some(Route::Ping) => "ping",
        Some(Route::Manifest { .. }) => "manifest",
        Some(Route::Blob { .. }) => "blob",
        Some(Route::Upload) => "upload",
        Some(Route::Tags { .. }) => "tags",
        None if path == "/metrics" => "metrics",
        None if path == "/" => "status",
        None if path.starts_with("/files/") => "files",
        None => "other",
    };
    // A manifest by tag is what a pull starts with (containerd and Docker
    // resolve it with HEAD, then GET by digest; skopeo and podman GET it):
    // it gets a log line and a place on the status page.
    let pull = match route(&path) {
        Some(Route::Manifest { name, reference })
            if (method == Method::GET || method == Method::HEAD) && !reference.contains(':') =>
        {
            Some((name.to_owned(), reference.to_owned()))
        }
        _ => None,
    };
    let mut failure = None;
    let mut response = match dispatch(app, &req, &mut ns_echo).await {
        Ok(r) => r,
        Err(e) => {
            failure = Some(e.message().to_owned());
            e.into_response()
        }
    };
    if let Some((name, reference)) = pull {
        let image = app
            .registry
            .pulled_name(ns_echo.as_ref(), &name, &reference);
        let status = response.status().as_u16();
        let ms = started.elapsed().as_millis() as u64;
        // One pull, one line: a HEAD then a GET of the tag, a client's
        // retries, or containerd asking the same daemon as mirror and as
        // server are all the same pull (see `record_pull`).
        let client = req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let head = method == Method::HEAD;
        if EVENTS.record_pull(
            image.clone(),
            client,
            head,
            started.elapsed(),
            failure.clone(),
        ) {
            match &failure {
                None => tracing::info!(%image, status, ms, "pull"),
                Some(error) => tracing::info!(%image, status, ms, %error, "pull failed"),
            }
        }
    }
    let headers = response.headers_mut();
    headers.insert("docker-distribution-api-version", API_VERSION);
    if let Some(ns) = ns_echo {
        if let Ok(v) = HeaderValue::from_str(ns.as_str()) {
            headers.insert("oci-namespace", v);
        }
    }
    if method == Method::HEAD {
        // Headers only; Content-Length stays that of the GET.
        *response.body_mut() = empty();
    }
    METRICS.request(
        route_label,
        method_label(&method),
        response.status().as_u16(),
    );
    tracing::debug!(%method, %path, status = response.status().as_u16(), elapsed_us = started.elapsed().as_micros() as u64, "request");
    response
}

async fn dispatch(
    app: &App,
    req: &Request<Incoming>,
    ns_echo: &mut Option<RegistryHost>,
) -> Result<Response<Body>, ApiError> {
    if req.uri().path() == "/" && req.method() == Method::GET {
        let images = app.registry.cached_images().await?;
        let bytes = app.registry.cache_bytes().await?;
        // The address the client used is the one to show it.
        let addr = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1:7733");
        let page = crate::http::status_page::render(
            addr,
            &images,
            &|id| app.registry.shown_name(id),
            bytes,
            app.cache_limit,
        );
        let mut resp = Response::new(full(Bytes::from(page)));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        return Ok(resp);
    }
    if req.uri().path() == "/metrics" && req.method() == Method::GET {
        let bytes = app.registry.cache_bytes().await?;
        let mut resp = Response::new(full(Bytes::from(METRICS.render(bytes))));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        return Ok(resp);
    }
    if let Some(rest) = req.uri().path().strip_prefix("/files/") {
        return files::files(app, req, rest, ns_echo).await;
    }
    let Some(route) = route(req.uri().path()) else {
        return Err(ApiError::unsupported_route());
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(ApiError::method_not_allowed(format!(
            "{} is not supported: this registry is a read-only cache",
            req.method()
        )));
    }
    let registry = &app.registry;
    let query = parse_query(req.uri().query())?;
    *ns_echo = query.ns.clone();
    let host = query.ns.unwrap_or_else(|| registry.default_host().clone());
    match route {
        Route::Ping => Ok(json_response(StatusCode::OK, Bytes::from_static(b"{}"))),
        Route::Upload => Err(ApiError::method_not_allowed(
            "uploads are not supported: this registry is a read-only cache",
        )),
        Route::Manifest { name, reference } => {
            let repo: RepoName = name.parse()?;
            let reference: Reference = reference.parse()?;
            let accept = Accept::from_header_values(
                req.headers()
                    .get_all(header::ACCEPT)
                    .iter()
                    .map(|v| v.as_bytes()),
            );
            let client = Client::from_user_agent(
                req.headers()
                    .get(header::USER_AGENT)
                    .and_then(|v| v.to_str().ok()),
            );
            let m = registry
                .manifest(host, repo, reference, accept, client)
                .await?;
            let mut resp = Response::new(full(m.bytes.clone()));
            let h = resp.headers_mut();
            insert_str(h, header::CONTENT_TYPE, &m.media_type);
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(m.bytes.len()));
            insert_str(h, "docker-content-digest", &m.digest.to_string());
            insert_str(h, header::ETAG, &format!("\"{}\"", m.digest));
            Ok(resp)
        }
        Route::Blob { name, digest } => {
            let repo: RepoName = name.parse()?;
            let digest: Digest = digest.parse().map_err(NameError::from)?;
            let blob = registry.blob(host, repo, digest).await?;
            Ok(blob_response(
                &app.chunks,
                blob,
                req.headers(),
                req.method(),
            ))
        }
        Route::Tags { name } => {
            let repo: RepoName = name.parse()?;
            let page = registry
                .tags(host, repo.clone(), query.n, query.last)
                .await?;
            let body = serde_json::json!({ "name": repo.as_str(), "tags": page.tags });
            let mut resp = json_response(StatusCode::OK, Bytes::from(body.to_string()));
            if let (Some(last), Some(n)) = (page.next_after, query.n) {
                let next = form_urlencoded::Serializer::new(String::new())
                    .append_pair("n", &n.to_string())
                    .append_pair("last", &last)
                    .finish();
                insert_str(
                    resp.headers_mut(),
                    header::LINK,
                    &format!("</v2/{repo}/tags/list?{next}>; rel=\"next\""),
                );
            }
            Ok(resp)
        }
    }
}

fn blob_response(
    chunks: &Arc<ChunkPool>,
    blob: Blob,
    headers: &HeaderMap,
    method: &Method,
) -> Response<Body> {
    let digest = &blob.digest;
    // A download whose size the upstream did not announce is sent whole,
    // without a Content-Length (chunked).
    let span = match blob.size {
        None => None,
        Some(size) => match Span::of_request(headers, size, "blob") {
            Ok(span) => Some(span),
            Err(resp) => return *resp,
        },
    };
    let (start, end_excl) = span.as_ref().map_or((0, u64::MAX), |s| (s.start, s.end));
    let body = if method == Method::HEAD {
        empty()
    } else {
        match blob.source {
            BlobSource::Stored(file) => blob_stream(Arc::clone(chunks), file, start, end_excl),
            BlobSource::Downloading(dl) => download_stream(Arc::clone(chunks), dl, start, end_excl),
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = span.as_ref().map_or(StatusCode::OK, |s| s.status);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(span) = &span {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(span.len()));
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        span.describe(h);
    }
    insert_str(h, "docker-content-digest", &digest.to_string());
    insert_str(h, header::ETAG, &format!("\"{digest}\""));
    resp
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_split_from_the_end() {
        assert_eq!(route("/v2/"), Some(Route::Ping));
        assert_eq!(route("/v2"), Some(Route::Ping));
        assert_eq!(
            route("/v2/a/manifests/b/manifests/latest"),
            Some(Route::Manifest {
                name: "a/manifests/b",
                reference: "latest"
            })
        );
        assert_eq!(
            route("/v2/library/alpine/blobs/sha256:abc"),
            Some(Route::Blob {
                name: "library/alpine",
                digest: "sha256:abc"
            })
        );
        assert_eq!(route("/v2/x/blobs/uploads/"), Some(Route::Upload));
        assert_eq!(route("/v2/x/blobs/uploads/123"), Some(Route::Upload));
        assert_eq!(
            route("/v2/x/y/tags/list"),
            Some(Route::Tags { name: "x/y" })
        );
        assert_eq!(route("/v2/x/manifests/a/b"), None);
        assert_eq!(route("/v3/x"), None);
        assert_eq!(route("/etc/passwd"), None);
    }

    #[test]
    fn ns_is_parsed_and_validated() {
        let q = parse_query(Some("ns=myreg.io%3A5000&n=3")).expect("query");
        assert_eq!(
            q.ns.map(|h| h.to_string()).as_deref(),
            Some("myreg.io:5000")
        );
        assert_eq!(q.n, Some(3));
        assert!(parse_query(Some("ns=..%2Fetc")).is_err());
        assert!(parse_query(Some("n=-1")).is_err());
    }
}
