//! The HTTP edge: accepts connections, maps `/v2/…` requests onto the
//! [`Registry`] service and writes its answers, streaming blobs from disk.
//!
//! This module owns everything about the wire: routing, header parsing
//! (`Accept`, `Range`, the `ns` query), connection limits and timeouts,
//! graceful shutdown, and the one place where service errors become the OCI
//! error envelope ([`ApiError`]).

pub mod chunks;
pub mod status_page;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::blobserve::{Blobserve, BlobserveError, FileRequest, Found};
use crate::http::chunks::ChunkPool;
use crate::oci::accept::Accept;
use crate::oci::digest::Digest;
use crate::oci::reference::{NameError, Reference, RegistryHost, RepoName};
use crate::registry::{Blob, BlobSource, Registry, RegistryError};
use crate::sources::mirror::Download;
use crate::sources::nix::error::NixError;
use crate::sources::nix::BuildError;
use crate::store::BlobFile;
use crate::telemetry::events::EVENTS;
use crate::telemetry::metrics::{self, METRICS};

pub type Body = UnsyncBoxBody<Bytes, io::Error>;

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

/// How long in-flight requests may run after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");
const READ_ONLY_METHODS: HeaderValue = HeaderValue::from_static("GET, HEAD");

#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// A client must send a complete request head within this time.
    pub header_timeout: Duration,
    /// Connections beyond this wait in the listen backlog.
    pub max_connections: usize,
    /// The cache's size limit, shown on the status page.
    pub cache_limit: Option<u64>,
    /// blobserve (issue #6): serves `/files/…` when set.
    pub blobserve: Option<Arc<Blobserve>>,
}

/// Serves `registry` on `listener` until `shutdown` completes, then lets
/// in-flight requests finish (up to [`DRAIN_TIMEOUT`]).
pub async fn serve(
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
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!("drain timed out; closing remaining connections"),
    }
}

/// What every request handler shares.
struct App {
    registry: Arc<Registry>,
    cache_limit: Option<u64>,
    chunks: Arc<ChunkPool>,
    blobserve: Option<Arc<Blobserve>>,
}

/// An error as the client sees it: a status and one entry of the OCI error
/// envelope `{"errors":[{"code","message"}]}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn unsupported_route() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            "no such endpoint in the registry API",
        )
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        match e {
            RegistryError::ManifestUnknown(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", e.to_string())
            }
            RegistryError::BlobUnknown(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", e.to_string())
            }
            RegistryError::NameUnknown(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "NAME_UNKNOWN", e.to_string())
            }
            RegistryError::Nix(build) => ApiError::from(&*build),
            // A fast 404 lets containerd fall back to its next host.
            RegistryError::UpstreamManifest(ref m) => {
                tracing::info!(error = %m, "manifest miss");
                ApiError::new(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", e.to_string())
            }
            RegistryError::UpstreamBlob(ref m) => {
                tracing::info!(error = %m, "blob miss");
                ApiError::new(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", e.to_string())
            }
            RegistryError::Store(_) | RegistryError::Task(_) => {
                // The detail (paths, OS errors) goes to the log, not the client.
                tracing::error!(error = %e, "request failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "UNKNOWN",
                    "internal error; see the daemon's log",
                )
            }
        }
    }
}

impl From<&BuildError> for ApiError {
    fn from(e: &BuildError) -> ApiError {
        match e {
            BuildError::Name(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "NAME_INVALID", e.to_string())
            }
            // The client named something this host cannot provide: a miss,
            // with the reason (every missing package, or how to configure a
            // package source).
            BuildError::Nix(
                NixError::MissingPackages { .. }
                | NixError::NoPackageSource
                | NixError::UnsupportedSystem { .. },
            ) => ApiError::new(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", e.to_string()),
            // Evaluation and build failures carry the tail of Nix's log,
            // which is what the user needs to see in `ctr pull`'s output.
            BuildError::Nix(_) => {
                tracing::warn!(error = %e, "Nix image build failed");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string())
            }
            _ => {
                tracing::error!(error = %e, "Nix image build failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "UNKNOWN",
                    "building the image failed; see the daemon's log",
                )
            }
        }
    }
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> ApiError {
        match e {
            NameError::Digest(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", e.to_string())
            }
            // A tag that cannot exist names no manifest.
            NameError::Tag(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", e.to_string())
            }
            NameError::Repository(_) | NameError::Host(_) | NameError::Image(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "NAME_INVALID", e.to_string())
            }
        }
    }
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
struct Query {
    ns: Option<RegistryHost>,
    n: Option<usize>,
    last: Option<String>,
}

fn parse_query(query: Option<&str>) -> Result<Query, ApiError> {
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
                        "PAGINATION_NUMBER_INVALID",
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
    // A GET of a manifest by tag is what a pull starts with: it gets a log
    // line and a place on the status page.
    let pull = match route(&path) {
        Some(Route::Manifest { name, reference })
            if method == Method::GET && !reference.contains(':') =>
        {
            Some(format!("{name}:{reference}"))
        }
        _ => None,
    };
    let mut failure = None;
    let mut response = match dispatch(app, &req, &mut ns_echo).await {
        Ok(r) => r,
        Err(e) => {
            failure = Some(e.message.clone());
            error_response(e)
        }
    };
    if let Some(image) = pull {
        let host = ns_echo
            .clone()
            .unwrap_or_else(|| app.registry.default_host().clone());
        let image = format!("{host}/{image}");
        let status = response.status().as_u16();
        let ms = started.elapsed().as_millis() as u64;
        match &failure {
            None => tracing::info!(%image, status, ms, "pull"),
            Some(error) => tracing::info!(%image, status, ms, %error, "pull failed"),
        }
        EVENTS.record("pull", image, started.elapsed(), failure);
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
        let page = crate::http::status_page::render(addr, &images, bytes, app.cache_limit);
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
        return files(app, req, rest, ns_echo).await;
    }
    let Some(route) = route(req.uri().path()) else {
        return Err(ApiError::unsupported_route());
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            format!(
                "{} is not supported: this registry is a read-only cache",
                req.method()
            ),
        ));
    }
    let registry = &app.registry;
    let query = parse_query(req.uri().query())?;
    *ns_echo = query.ns.clone();
    let host = query.ns.unwrap_or_else(|| registry.default_host().clone());
    match route {
        Route::Ping => Ok(json_response(StatusCode::OK, Bytes::from_static(b"{}"))),
        Route::Upload => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
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
            let m = registry.manifest(host, repo, reference, accept).await?;
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

/// A single byte range `[start, end]` (inclusive), already checked against the size.
#[derive(Debug, PartialEq, Eq)]
enum RangeRequest {
    Whole,
    Part { start: u64, end: u64 },
    Unsatisfiable,
}

/// Parses `Range: bytes=…` for a blob of `size` bytes. Only single ranges are
/// served as 206; anything else we do not understand (multiple ranges, other
/// units, garbage) is ignored and the whole blob sent, as RFC 9110 allows.
fn parse_range(headers: &HeaderMap, size: u64) -> RangeRequest {
    let Some(value) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeRequest::Whole;
    };
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeRequest::Whole;
    };
    if spec.contains(',') {
        return RangeRequest::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Whole;
    };
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    match (first.is_empty(), num(first), num(last)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 || size == 0 {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Part {
                    start: size - n.min(size),
                    end: size - 1,
                }
            }
        }
        (false, Some(start), None) if last.is_empty() => {
            if start >= size {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Part {
                    start,
                    end: size - 1,
                }
            }
        }
        (false, Some(start), Some(end)) => {
            if start > end || start >= size {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Part {
                    start,
                    end: end.min(size - 1),
                }
            }
        }
        _ => RangeRequest::Whole,
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
    let (status, start, end_excl, size) = match blob.size {
        None => (StatusCode::OK, 0, u64::MAX, None),
        Some(size) => match parse_range(headers, size) {
            RangeRequest::Whole => (StatusCode::OK, 0, size, Some(size)),
            RangeRequest::Part { start, end } => {
                (StatusCode::PARTIAL_CONTENT, start, end + 1, Some(size))
            }
            RangeRequest::Unsatisfiable => {
                let mut resp = error_response(ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "BLOB_UNKNOWN",
                    format!("range not satisfiable for a blob of {size} bytes"),
                ));
                insert_str(
                    resp.headers_mut(),
                    header::CONTENT_RANGE,
                    &format!("bytes */{size}"),
                );
                return resp;
            }
        },
    };
    let body = if method == Method::HEAD {
        empty()
    } else {
        match blob.source {
            BlobSource::Stored(file) => blob_stream(Arc::clone(chunks), file, start, end_excl),
            BlobSource::Downloading(dl) => download_stream(Arc::clone(chunks), dl, start, end_excl),
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if size.is_some() {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(end_excl - start));
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
    insert_str(h, "docker-content-digest", &digest.to_string());
    insert_str(h, header::ETAG, &format!("\"{digest}\""));
    if let (StatusCode::PARTIAL_CONTENT, Some(size)) = (status, size) {
        insert_str(
            h,
            header::CONTENT_RANGE,
            &format!("bytes {start}-{}/{size}", end_excl - 1),
        );
    }
    resp
}

/// Streams `[start, end)` of a blob still arriving from upstream: each chunk
/// waits until its bytes have arrived. If the download fails (wrong digest,
/// cut off), the stream ends in an error, so hyper aborts the response and
/// the client sees a short body rather than a complete-looking one.
fn download_stream(pool: Arc<ChunkPool>, dl: Arc<Download>, start: u64, end: u64) -> Body {
    let stream = futures_util::stream::unfold(
        (pool, dl, start, end),
        |(pool, dl, offset, end)| async move {
            if offset >= end {
                return None;
            }
            let available = match dl.available(offset).await {
                Ok(Some(a)) => a,
                Ok(None) => return None,
                Err(e) => return Some((Err(e), (pool, dl, end, end))),
            };
            let (p, d) = (Arc::clone(&pool), Arc::clone(&dl));
            let read = tokio::task::spawn_blocking(move || {
                let mut chunk = p.take();
                let want = (available.min(end) - offset).min(chunk.buffer().len() as u64) as usize;
                let n = d.read_at(offset, &mut chunk.buffer()[..want])?;
                chunk.set_len(n);
                Ok::<_, io::Error>(chunk.freeze())
            })
            .await;
            match read {
                Ok(Ok(bytes)) if !bytes.is_empty() => {
                    metrics::add(&METRICS.bytes_served, bytes.len() as u64);
                    let next = offset + bytes.len() as u64;
                    Some((Ok(bytes), (pool, dl, next, end)))
                }
                Ok(Ok(_)) => Some((
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "download shorter than announced",
                    )),
                    (pool, dl, end, end),
                )),
                Ok(Err(e)) => Some((Err(e), (pool, dl, end, end))),
                Err(e) => Some((Err(io::Error::other(e)), (pool, dl, end, end))),
            }
        },
    );
    BodyExt::boxed_unsync(StreamBody::new(stream.map_ok(Frame::data)))
}

/// Streams `[start, end)` of `file` in pooled chunks read on the blocking
/// pool, one chunk read ahead so disk and socket overlap. hyper polls for the
/// next chunk only once the previous one is written, so a slow client holds at
/// most two chunks and never stalls anyone else.
fn blob_stream(pool: Arc<ChunkPool>, file: Arc<BlobFile>, start: u64, end: u64) -> Body {
    type Pending = tokio::task::JoinHandle<io::Result<Bytes>>;
    fn read(pool: &Arc<ChunkPool>, file: &Arc<BlobFile>, offset: u64, end: u64) -> Option<Pending> {
        if offset >= end {
            return None;
        }
        let (pool, file) = (Arc::clone(pool), Arc::clone(file));
        Some(tokio::task::spawn_blocking(move || {
            let mut chunk = pool.take();
            let len = (end - offset).min(chunk.buffer().len() as u64) as usize;
            let n = file.read_at(offset, &mut chunk.buffer()[..len])?;
            if n < len {
                // The file shrank under us; sending less than Content-Length
                // would corrupt the client's view, so abort the response.
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob is shorter than its recorded size",
                ));
            }
            chunk.set_len(n);
            Ok(chunk.freeze())
        }))
    }
    let first = read(&pool, &file, start, end);
    let state = (pool, file, start, end, first);
    let stream =
        futures_util::stream::unfold(state, |(pool, file, offset, end, pending)| async move {
            let chunk = match pending?.await {
                Ok(Ok(chunk)) => chunk,
                Ok(Err(e)) => return Some((Err(e), (pool, file, end, end, None))),
                Err(e) => return Some((Err(io::Error::other(e)), (pool, file, end, end, None))),
            };
            metrics::add(&METRICS.bytes_served, chunk.len() as u64);
            let next_offset = offset + chunk.len() as u64;
            let next = read(&pool, &file, next_offset, end);
            Some((Ok(chunk), (pool, file, next_offset, end, next)))
        });
    BodyExt::boxed_unsync(StreamBody::new(stream.map_ok(Frame::data)))
}

// ---------------------------------------------------------------------------
// blobserve (issue #6): `/files/<repository>(:<tag>|@<digest>)/<path>`
// ---------------------------------------------------------------------------

impl From<BlobserveError> for ApiError {
    fn from(e: BlobserveError) -> ApiError {
        match e {
            BlobserveError::Name(n) => ApiError::from(n),
            BlobserveError::Registry(r) => ApiError::from(r),
            BlobserveError::BadRequest(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "NAME_INVALID", e.to_string())
            }
            BlobserveError::NotFound(_)
            | BlobserveError::NotADirectory(_)
            | BlobserveError::SymlinkLoop(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", e.to_string())
            }
            BlobserveError::NoPlatform(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", e.to_string())
            }
            BlobserveError::UnsupportedLayer(_) | BlobserveError::Manifest(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UNSUPPORTED",
                e.to_string(),
            ),
            BlobserveError::Extract { .. }
            | BlobserveError::Io { .. }
            | BlobserveError::Task(_) => {
                tracing::error!(error = %e, "blobserve request failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "UNKNOWN",
                    "internal error; see the daemon's log",
                )
            }
        }
    }
}

/// Decodes `%XX` escapes; `None` for a malformed escape or non-UTF-8 result.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

async fn files(
    app: &App,
    req: &Request<Incoming>,
    rest: &str,
    ns_echo: &mut Option<RegistryHost>,
) -> Result<Response<Body>, ApiError> {
    let Some(blobserve) = &app.blobserve else {
        return Err(ApiError::unsupported_route());
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            format!("{} is not supported on /files", req.method()),
        ));
    }
    let query = parse_query(req.uri().query())?;
    *ns_echo = query.ns.clone();
    let host = query
        .ns
        .unwrap_or_else(|| app.registry.default_host().clone());
    let decoded = percent_decode(rest).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
            "malformed percent-encoding",
        )
    })?;
    let file_req = FileRequest::parse(&decoded)?;
    match blobserve.lookup(host, &file_req).await? {
        Found::File(hit) => Ok(file_response(
            &app.chunks,
            *hit,
            req.headers(),
            req.method(),
        )),
        Found::Dir(listing) => {
            let wants_json = req
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/json"));
            if wants_json {
                let body = serde_json::json!({ "path": listing.path, "entries": listing.entries });
                return Ok(json_response(StatusCode::OK, Bytes::from(body.to_string())));
            }
            let base = format!("/files/{}{}", file_req.repo, file_req.reference_text);
            let html = listing_html(&base, &listing, req.uri().query());
            let len = html.len();
            let mut resp = Response::new(full(Bytes::from(html)));
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            Ok(resp)
        }
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn href_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:@+".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn listing_html(base: &str, listing: &crate::blobserve::Listing, query: Option<&str>) -> String {
    let dir = listing.path.trim_end_matches('/');
    let q = query.map(|q| format!("?{q}")).unwrap_or_default();
    let mut html = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{0}</title></head>\n<body><h1>{0}</h1>\n<ul>\n",
        html_escape(&format!("{base}{dir}/"))
    );
    if !dir.is_empty() {
        let parent = dir.rsplit_once('/').map_or("", |(p, _)| p);
        html.push_str(&format!(
            "<li><a href=\"{}/{q}\">../</a></li>\n",
            href_escape(&format!("{base}{parent}"))
        ));
    }
    for e in &listing.entries {
        let suffix = if e.kind == "dir" { "/" } else { "" };
        let extra = match &e.target {
            Some(t) => format!(" → {}", html_escape(t)),
            None if e.kind == "file" => format!(" ({} bytes)", e.size),
            None => String::new(),
        };
        html.push_str(&format!(
            "<li><a href=\"{}{suffix}{q}\">{}{suffix}</a>{extra}</li>\n",
            href_escape(&format!("{base}{dir}/{}", e.name)),
            html_escape(&e.name),
        ));
    }
    html.push_str("</ul></body></html>\n");
    html
}

fn file_response(
    chunks: &Arc<ChunkPool>,
    hit: crate::blobserve::FileHit,
    headers: &HeaderMap,
    method: &Method,
) -> Response<Body> {
    let etag = format!("\"{}:{}\"", hit.layer, hit.path);
    let not_modified = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == etag || t.trim() == "*");
    let content_type = crate::blobserve::content_type(&hit.path);
    let mut resp = if not_modified {
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let size = hit.size;
        let (status, start, end_excl) = match parse_range(headers, size) {
            RangeRequest::Whole => (StatusCode::OK, 0, size),
            RangeRequest::Part { start, end } => (StatusCode::PARTIAL_CONTENT, start, end + 1),
            RangeRequest::Unsatisfiable => {
                let mut resp = error_response(ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "RANGE_INVALID",
                    format!("range not satisfiable for a file of {size} bytes"),
                ));
                insert_str(
                    resp.headers_mut(),
                    header::CONTENT_RANGE,
                    &format!("bytes */{size}"),
                );
                return resp;
            }
        };
        let body = if method == Method::HEAD {
            empty()
        } else if let Some(bytes) = &hit.replaced {
            full(bytes.slice(start as usize..end_excl as usize))
        } else {
            // The guard keeps the layer from eviction until the body is done.
            let guard = hit.guard;
            blob_stream(Arc::clone(chunks), hit.file, start, end_excl)
                .map_frame(move |f| {
                    let _ = &guard;
                    f
                })
                .boxed_unsync()
        };
        let mut r = Response::new(body);
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(end_excl - start));
        if status == StatusCode::PARTIAL_CONTENT {
            insert_str(
                h,
                header::CONTENT_RANGE,
                &format!("bytes {start}-{}/{size}", end_excl - 1),
            );
        }
        r
    };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    insert_str(h, header::ETAG, &etag);
    if let Some(m) = hit.modified {
        insert_str(h, header::LAST_MODIFIED, &crate::util::time::http_date(m));
    }
    resp
}

// --- end blobserve ---

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

fn error_response(e: ApiError) -> Response<Body> {
    let body = serde_json::json!({
        "errors": [{ "code": e.code, "message": e.message }]
    });
    let mut resp = json_response(e.status, Bytes::from(body.to_string()));
    if e.status == StatusCode::METHOD_NOT_ALLOWED {
        resp.headers_mut().insert(header::ALLOW, READ_ONLY_METHODS);
    }
    resp
}

fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let len = body.len();
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// Values here come from validated names and digests or from the store's own
/// records; one that is not a valid header value is left out, not sent broken.
fn insert_str(h: &mut HeaderMap, name: impl header::IntoHeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

fn empty() -> Body {
    Empty::new()
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
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

    fn range(v: &str, size: u64) -> RangeRequest {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).expect("header"));
        parse_range(&h, size)
    }

    #[test]
    fn ranges_follow_the_conformance_suite() {
        use RangeRequest::*;
        assert_eq!(
            range("bytes=500-1499", 2048),
            Part {
                start: 500,
                end: 1499
            }
        );
        assert_eq!(
            range("bytes=500-", 2048),
            Part {
                start: 500,
                end: 2047
            }
        );
        assert_eq!(
            range("bytes=-500", 2048),
            Part {
                start: 1548,
                end: 2047
            }
        );
        assert_eq!(
            range("bytes=500-9999", 2048),
            Part {
                start: 500,
                end: 2047
            }
        );
        assert_eq!(range("bytes=500-0", 2048), Unsatisfiable);
        assert_eq!(range("bytes=2048-", 2048), Unsatisfiable);
        assert_eq!(range("bytes=-0", 2048), Unsatisfiable);
        assert_eq!(range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(range("bytes=0-1,5-6", 2048), Whole);
        assert_eq!(range("items=0-1", 2048), Whole);
        assert_eq!(range("bytes=x-1", 2048), Whole);
        assert_eq!(range("bytes=+1-2", 2048), Whole);
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

    #[test]
    fn http_dates_and_percent_decoding() {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(
            crate::util::time::http_date(t),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(
            crate::util::time::http_date(std::time::UNIX_EPOCH),
            "Thu, 01 Jan 1970 00:00:00 GMT"
        );
        assert_eq!(percent_decode("a%20b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%2"), None);
    }
}
