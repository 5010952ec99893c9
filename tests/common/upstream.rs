//! A misbehaving registry written for the mirror tests ([`FakeUpstream`]):
//! a loopback HTTP/1.1 server (keep-alive, one thread per connection) that
//! records every request and answers with a handler: wrong bytes, truncated
//! bodies, hangs, 5xx, redirects ([`Reply`]), or what a registry holding
//! [`Content`] would serve. The token issuer in `auth.rs` runs on it too.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::{mirror_args, sha256_digest, TestImage, OCI_MANIFEST};

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Req {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    pub headers: Vec<(String, String)>,
}

impl Req {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap()
    }

    pub fn query(&self) -> Vec<(String, String)> {
        let q = self.target.split_once('?').map(|(_, q)| q).unwrap_or("");
        form_urlencoded::parse(q.as_bytes()).into_owned().collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `user:password` of a `Basic` Authorization header.
    pub fn basic_auth(&self) -> Option<String> {
        let v = self.header("authorization")?;
        let (scheme, b64) = v.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()?;
        String::from_utf8(raw).ok()
    }
}

/// What the fake upstream does with a request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// A complete response; `pace` sleeps that long after each 64 KiB.
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        pace: Option<Duration>,
    },
    /// 200 with `Content-Length: claimed`, then `body` (shorter), then the
    /// connection is closed.
    Truncated {
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        claimed: usize,
        pace: Option<Duration>,
    },
    /// Reads the request and never answers (until the server is dropped, or
    /// 120 s).
    Hang,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        let body = format!(
            r#"{{"errors":[{{"code":"UNKNOWN","message":"fake upstream says {status}"}}]}}"#
        );
        Reply::Full {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.into_bytes(),
            pace: None,
        }
    }

    pub fn not_found(code: &str) -> Reply {
        Reply::Full {
            status: 404,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: format!(r#"{{"errors":[{{"code":"{code}","message":"not here"}}]}}"#)
                .into_bytes(),
            pace: None,
        }
    }

    pub fn ok(content_type: &str, body: Vec<u8>, digest: Option<&str>) -> Reply {
        let mut headers = vec![("Content-Type".into(), content_type.into())];
        if let Some(d) = digest {
            headers.push(("Docker-Content-Digest".into(), d.into()));
        }
        Reply::Full {
            status: 200,
            headers,
            body,
            pace: None,
        }
    }

    pub fn redirect(location: &str) -> Reply {
        Reply::Full {
            status: 307,
            headers: vec![("Location".into(), location.into())],
            body: Vec::new(),
            pace: None,
        }
    }

    pub fn unauthorized(challenge: &str) -> Reply {
        Reply::Full {
            status: 401,
            headers: vec![
                ("Content-Type".into(), "application/json".into()),
                ("WWW-Authenticate".into(), challenge.into()),
            ],
            body: br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#
                .to_vec(),
            pace: None,
        }
    }

    /// Slows the body down: `delay` after every 64 KiB.
    pub fn paced(self, delay: Duration) -> Reply {
        match self {
            Reply::Full {
                status,
                headers,
                body,
                ..
            } => Reply::Full {
                status,
                headers,
                body,
                pace: Some(delay),
            },
            Reply::Truncated {
                headers,
                body,
                claimed,
                ..
            } => Reply::Truncated {
                headers,
                body,
                claimed,
                pace: Some(delay),
            },
            Reply::Hang => Reply::Hang,
        }
    }
}

type Handler = Arc<dyn Fn(&Req) -> Reply + Send + Sync>;

/// A loopback HTTP/1.1 server (keep-alive, one thread per connection) that
/// records every request and answers with `handler`.
pub struct FakeUpstream {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Req>>>,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

fn read_head(r: &mut BufReader<TcpStream>) -> io::Result<Option<Req>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let line = line.trim_end();
    if line.is_empty() {
        // Tolerate a stray CRLF between requests.
        return read_head(r);
    }
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            headers.push((n.trim().to_owned(), v.trim().to_owned()));
        }
    }
    Ok(Some(Req {
        method,
        target,
        headers,
    }))
}

fn write_body(s: &mut TcpStream, body: &[u8], pace: Option<Duration>) -> io::Result<()> {
    match pace {
        None => s.write_all(body),
        Some(delay) => {
            for chunk in body.chunks(64 * 1024) {
                s.write_all(chunk)?;
                s.flush()?;
                thread::sleep(delay);
            }
            Ok(())
        }
    }
}

fn serve_connection(
    stream: TcpStream,
    handler: &Handler,
    requests: &Mutex<Vec<Req>>,
    stop: &AtomicBool,
) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    loop {
        let Some(req) = read_head(&mut r)? else {
            return Ok(());
        };
        // Bodies (none expected from a pulling client) are skipped.
        if let Some(n) = req
            .header("content-length")
            .and_then(|v| v.parse::<u64>().ok())
        {
            io::copy(&mut (&mut r).take(n), &mut io::sink())?;
        }
        requests.lock().unwrap().push(req.clone());
        let head_only = req.method == "HEAD";
        let close = req
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        match handler(&req) {
            Reply::Full {
                status,
                headers,
                body,
                pace,
            } => {
                let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
                for (n, v) in &headers {
                    head.push_str(&format!("{n}: {v}\r\n"));
                }
                head.push_str(&format!("Content-Length: {}\r\n", body.len()));
                if close {
                    head.push_str("Connection: close\r\n");
                }
                head.push_str("\r\n");
                w.write_all(head.as_bytes())?;
                if !head_only {
                    write_body(&mut w, &body, pace)?;
                }
                w.flush()?;
                if close {
                    return Ok(());
                }
            }
            Reply::Truncated {
                headers,
                body,
                claimed,
                pace,
            } => {
                let mut head = String::from("HTTP/1.1 200 OK\r\n");
                for (n, v) in &headers {
                    head.push_str(&format!("{n}: {v}\r\n"));
                }
                head.push_str(&format!("Content-Length: {claimed}\r\n\r\n"));
                w.write_all(head.as_bytes())?;
                if !head_only {
                    write_body(&mut w, &body, pace)?;
                }
                w.flush()?;
                let _ = w.shutdown(std::net::Shutdown::Both);
                return Ok(());
            }
            Reply::Hang => {
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(50));
                }
                return Ok(());
            }
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        307 => "Temporary Redirect",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Whatever",
    }
}

impl FakeUpstream {
    pub fn start<F>(handler: F) -> FakeUpstream
    where
        F: Fn(&Req) -> Reply + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake upstream");
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Handler = Arc::new(handler);
        let connections = Arc::new(AtomicUsize::new(0));
        let (reqs, stop2, conns) = (requests.clone(), stop.clone(), connections.clone());
        thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                conns.fetch_add(1, Ordering::SeqCst);
                let (handler, reqs, stop3) = (handler.clone(), reqs.clone(), stop2.clone());
                thread::spawn(move || {
                    if let Err(e) = serve_connection(stream, &handler, &reqs, &stop3) {
                        if !matches!(
                            e.kind(),
                            io::ErrorKind::BrokenPipe
                                | io::ErrorKind::ConnectionReset
                                | io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                        ) {
                            eprintln!("[fake upstream {addr}] connection error: {e}");
                        }
                    }
                });
            }
        });
        FakeUpstream {
            addr,
            requests,
            connections,
            stop,
        }
    }

    /// TCP connections accepted so far (a TLS handshake or garbage that
    /// never became a request counts too).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `--upstream 127.0.0.1:PORT=http://127.0.0.1:PORT`
    pub fn upstream_arg(&self) -> String {
        format!("{}={}", self.host_port(), self.url())
    }

    /// `--default-registry HOST --upstream HOST=URL` for this server.
    pub fn mirror_args(&self) -> Vec<String> {
        mirror_args(&self.host_port(), &self.url())
    }

    pub fn requests(&self) -> Vec<Req> {
        self.requests.lock().unwrap().clone()
    }

    /// Requests with `method` whose path ends with `suffix`.
    pub fn count(&self, method: &str, suffix: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.method == method && r.path().ends_with(suffix))
            .count()
    }

    /// Every request line, for assertion messages.
    pub fn request_text(&self) -> String {
        self.requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.target))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// What a registry holds: manifests by `REPO/manifests/REF` (tag or
/// digest) and blobs by digest, answered like distribution does.
#[derive(Clone, Default)]
pub struct Content {
    /// `REPO:TAG` or `REPO@DIGEST` → (media type, bytes).
    manifests: HashMap<String, (String, Vec<u8>)>,
    blobs: HashMap<String, Vec<u8>>,
}

impl Content {
    /// Every manifest, index and blob of `image` under `repo`, tagged
    /// with the image's tag.
    pub fn add_image(&mut self, repo: &str, image: &TestImage) {
        let top = (image.media_type.clone(), image.manifest_bytes.clone());
        self.manifests
            .insert(format!("{repo}:{}", image.tag), top.clone());
        self.manifests
            .insert(format!("{repo}@{}", image.manifest_digest), top);
        for p in &image.platforms {
            self.manifests.insert(
                format!("{repo}@{}", p.digest),
                (OCI_MANIFEST.into(), p.bytes.clone()),
            );
        }
        for d in image.blob_digests() {
            if !self.manifests.contains_key(&format!("{repo}@{d}")) {
                self.blobs.insert(d.clone(), image.blob(&d));
            }
        }
    }

    pub fn add_manifest(&mut self, repo: &str, tag: &str, media_type: &str, bytes: Vec<u8>) {
        let digest = sha256_digest(&bytes);
        let v = (media_type.to_owned(), bytes);
        self.manifests.insert(format!("{repo}:{tag}"), v.clone());
        self.manifests.insert(format!("{repo}@{digest}"), v);
    }

    pub fn add_blob(&mut self, bytes: Vec<u8>) -> String {
        let d = sha256_digest(&bytes);
        self.blobs.insert(d.clone(), bytes);
        d
    }

    pub fn blob(&self, digest: &str) -> Option<&Vec<u8>> {
        self.blobs.get(digest)
    }

    /// Answers `/v2/`, `/v2/REPO/manifests/REF` and `/v2/REPO/blobs/DIGEST`.
    pub fn reply(&self, req: &Req) -> Reply {
        let path = req.path();
        if path == "/v2/" || path == "/v2" {
            return Reply::ok("application/json", b"{}".to_vec(), None);
        }
        let Some(rest) = path.strip_prefix("/v2/") else {
            return Reply::not_found("NAME_UNKNOWN");
        };
        if let Some((repo, reference)) = rest.rsplit_once("/manifests/") {
            let key = if reference.starts_with("sha256:") {
                format!("{repo}@{reference}")
            } else {
                format!("{repo}:{reference}")
            };
            return match self.manifests.get(&key) {
                Some((mt, bytes)) => Reply::ok(mt, bytes.clone(), Some(&sha256_digest(bytes))),
                None => Reply::not_found("MANIFEST_UNKNOWN"),
            };
        }
        if let Some((_, digest)) = rest.rsplit_once("/blobs/") {
            return match self.blobs.get(digest) {
                Some(bytes) => Reply::ok("application/octet-stream", bytes.clone(), Some(digest)),
                None => Reply::not_found("BLOB_UNKNOWN"),
            };
        }
        Reply::not_found("NAME_UNKNOWN")
    }
}
