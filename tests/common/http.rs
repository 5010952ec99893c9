//! The one raw HTTP/1.1 client of the tests (`Connection: close`, one
//! request per connection), and the registry API's `ns` parameter.
//!
//! Every request goes through one exchange, which reads the head, then the
//! body as framed (Content-Length, chunked, or until close; for HEAD, what
//! follows the head within a quiet second, which must be nothing), into a
//! [`Response`]. The entry points differ only in how they treat failure:
//! - [`request`] / [`request_body`]: panic if no response arrives or the
//!   connection stalls (a body cut short by the server is returned as is);
//! - [`raw`]: arbitrary bytes for hostile input; status 0 when nothing
//!   parseable came back;
//! - [`fetch`] / [`get`]: never panic, bounded by an overall deadline, and
//!   can check a large body against the expected bytes as it streams in
//!   ([`Body::Expect`]) without keeping it; [`Response::complete`] says
//!   whether it arrived in full.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// `ns` as containerd sends it: the registry host, `:` percent-encoded.
pub fn ns(host: &str) -> String {
    format!("ns={}", host.replace(':', "%3A"))
}

/// What to do with a response body.
#[derive(Clone, Debug)]
pub enum Body {
    /// Keep it in [`Response::body`] (and every byte in [`Response::raw`]).
    Keep,
    /// Compare it with these bytes as it arrives (for large blobs).
    Expect(Arc<Vec<u8>>),
}

#[derive(Debug, Clone)]
pub struct Response {
    /// 0 if the server sent nothing parseable.
    pub status: u16,
    pub reason: String,
    /// In wire order; values are raw bytes.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Decoded body (de-chunked), with [`Body::Keep`]. For HEAD: whatever
    /// followed the head, which must be empty.
    pub body: Vec<u8>,
    /// Every byte received, with [`Body::Keep`].
    pub raw: Vec<u8>,
    /// The body length the head announced (0 for HEAD, 204 and 304; none
    /// when chunked or unframed).
    pub content_length: Option<u64>,
    /// Body bytes received (de-chunked).
    pub received: u64,
    /// With [`Body::Expect`]: every byte so far matched and none extra.
    pub matches: bool,
    /// A transport error or timeout before the response was complete.
    pub error: Option<String>,
    /// That error's kind: `UnexpectedEof` or `ConnectionReset` when the
    /// server closed early, `TimedOut`/`WouldBlock` when it stalled.
    pub error_kind: Option<io::ErrorKind>,
    pub elapsed: Duration,
}

impl Response {
    fn new() -> Response {
        Response {
            status: 0,
            reason: String::new(),
            headers: Vec::new(),
            body: Vec::new(),
            raw: Vec::new(),
            content_length: None,
            received: 0,
            matches: true,
            error: None,
            error_kind: None,
            elapsed: Duration::ZERO,
        }
    }

    /// First value of header `name` (case-insensitive), lossily as UTF-8.
    pub fn header(&self, name: &str) -> Option<String> {
        self.header_all(name).into_iter().next()
    }

    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {self}"))
    }

    /// `errors[0].code` of a spec error body.
    pub fn error_code(&self) -> Option<String> {
        let v: Value = serde_json::from_slice(&self.body).ok()?;
        v.get("errors")?
            .get(0)?
            .get("code")?
            .as_str()
            .map(str::to_owned)
    }

    /// The body arrived in full as framed (no error, length as announced).
    pub fn complete(&self) -> bool {
        self.error.is_none() && self.content_length.is_none_or(|cl| cl == self.received)
    }

    /// 200, complete, and (with [`Body::Expect`]) exactly the expected bytes.
    pub fn ok_and_matches(&self, expected_len: u64) -> bool {
        self.status == 200 && self.complete() && self.matches && self.received == expected_len
    }

    /// The exchange failed other than by the server closing early: no
    /// response head, a stall, or something unparseable.
    fn failed(&self) -> bool {
        self.status == 0
            || self.error_kind.is_some_and(|k| {
                !matches!(
                    k,
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                )
            })
    }

    /// One line for assertion messages about streamed responses.
    pub fn summary(&self) -> String {
        let headers: Vec<(&str, String)> = self
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        format!(
            "HTTP {} after {:?}: Content-Length {:?}, received {} bytes, matches {}, error {:?}, headers {:?}{}",
            self.status,
            self.elapsed,
            self.content_length,
            self.received,
            self.matches,
            self.error,
            headers,
            if self.body.is_empty() {
                String::new()
            } else {
                format!(
                    ", body {:?}",
                    String::from_utf8_lossy(&self.body[..self.body.len().min(300)])
                )
            }
        )
    }
}

impl std::fmt::Display for Response {
    /// Status, headers and the start of the body, for assertion messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "HTTP {} {}", self.status, self.reason)?;
        for (n, v) in &self.headers {
            writeln!(f, "{n}: {}", String::from_utf8_lossy(v))?;
        }
        let shown = &self.body[..self.body.len().min(512)];
        write!(
            f,
            "\n{}{}",
            String::from_utf8_lossy(shown),
            if self.body.len() > 512 { "…" } else { "" }
        )
    }
}

/// `METHOD PATH HTTP/1.1` with `Host` (unless given) and `Connection: close`;
/// panics unless a response arrives.
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    request_body(addr, method, path, headers, &[])
}

/// Like [`request`] with a body (sent with `Content-Length`).
pub fn request_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let bytes = request_bytes(addr, method, path, headers, body);
    let r = exchange(addr, &bytes, method == "HEAD", &Body::Keep, None);
    if r.failed() {
        panic!(
            "{method} {path} on {addr}: {}",
            r.error.as_deref().unwrap_or("no response")
        );
    }
    r
}

/// Sends `bytes` verbatim and reads the reply until EOF (or a 30 s stall);
/// for hostile requests. Status 0 means no parseable response.
pub fn raw(addr: SocketAddr, bytes: &[u8]) -> Response {
    let r = exchange(addr, bytes, bytes.starts_with(b"HEAD "), &Body::Keep, None);
    if r.failed() {
        return Response {
            reason: format!(
                "no response: {}",
                r.error.as_deref().unwrap_or("no response")
            ),
            ..Response::new()
        };
    }
    r
}

/// `METHOD path` on `addr`, the body handled as `body`, all within
/// `timeout`; never panics on a short or failed response (that is what the
/// mirror tests look for). Status 0: no response head at all.
pub fn fetch(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body,
    timeout: Duration,
) -> Response {
    let bytes = request_bytes(addr, method, path, headers, &[]);
    let deadline = Instant::now() + timeout;
    exchange(addr, &bytes, method == "HEAD", &body, Some(deadline))
}

/// `clients` concurrent [`fetch`] GETs of `path`, released together, each
/// checking the body against `expected`; the responses in client order.
pub fn fetch_together(
    addr: SocketAddr,
    path: &str,
    expected: &Arc<Vec<u8>>,
    clients: usize,
    timeout: Duration,
) -> Vec<Response> {
    let barrier = Arc::new(Barrier::new(clients));
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (barrier, expected, path) = (barrier.clone(), expected.clone(), path.to_owned());
            thread::spawn(move || {
                barrier.wait();
                fetch(addr, "GET", &path, &[], Body::Expect(expected), timeout)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// [`fetch`] GET keeping the body (small things: manifests, errors,
/// configs), within 30 s.
pub fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response {
    fetch(
        addr,
        "GET",
        path,
        headers,
        Body::Keep,
        Duration::from_secs(30),
    )
}

fn request_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    req.push_str("Connection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

struct Head {
    status: u16,
    reason: String,
    headers: Vec<(String, Vec<u8>)>,
    len: usize,
}

/// Parses a response head at the start of `buf` if it is complete; skips
/// interim 1xx responses.
fn parse_head(buf: &[u8]) -> io::Result<Option<Head>> {
    let mut start = 0;
    loop {
        let Some(end) = find(&buf[start..], b"\r\n\r\n") else {
            return Ok(None);
        };
        let head = &buf[start..start + end];
        let mut lines = head
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let status_line = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        if !version.starts_with("HTTP/1.") {
            return Err(io::Error::other(format!("bad status line {status_line:?}")));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
        let reason = parts.next().unwrap_or_default().to_owned();
        let mut headers = Vec::new();
        for line in lines {
            let colon = line
                .iter()
                .position(|&b| b == b':')
                .ok_or_else(|| io::Error::other("header line without colon"))?;
            let name = String::from_utf8_lossy(&line[..colon]).into_owned();
            let value = line[colon + 1..].trim_ascii().to_vec();
            headers.push((name, value));
        }
        let len = start + end + 4;
        if (100..200).contains(&status) {
            start = len;
            continue;
        }
        return Ok(Some(Head {
            status,
            reason,
            headers,
            len,
        }));
    }
}

/// Decodes a chunked body; `None` if incomplete.
fn dechunk(mut b: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = find(b, b"\r\n") else {
            return Ok(None);
        };
        let size_str = String::from_utf8_lossy(&b[..eol]);
        let size_hex = size_str.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| io::Error::other(format!("bad chunk size {size_str:?}")))?;
        b = &b[eol + 2..];
        if size == 0 {
            // Trailers end with an empty line.
            return Ok(
                if b.starts_with(b"\r\n") || find(b, b"\r\n\r\n").is_some() {
                    Some(out)
                } else {
                    None
                },
            );
        }
        if b.len() < size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// A reader that stops at `deadline` and after 30 s without a byte.
struct Conn {
    stream: TcpStream,
    deadline: Option<Instant>,
    buf: Vec<u8>,
    /// Everything read, with [`Body::Keep`].
    keep_raw: bool,
    raw: Vec<u8>,
}

impl Conn {
    const IDLE: Duration = Duration::from_secs(30);

    /// Reads once with at most `limit` of waiting (and never past the
    /// deadline); `Ok(None)` at EOF.
    fn read(&mut self, limit: Duration) -> io::Result<Option<&[u8]>> {
        let wait = match self.deadline {
            None => limit,
            Some(d) => d
                .checked_duration_since(Instant::now())
                .filter(|r| !r.is_zero())
                .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))?
                .min(limit),
        };
        self.stream.set_read_timeout(Some(wait))?;
        let n = self.stream.read(&mut self.buf)?;
        if n == 0 {
            return Ok(None);
        }
        if self.keep_raw {
            self.raw.extend_from_slice(&self.buf[..n]);
        }
        Ok(Some(&self.buf[..n]))
    }
}

/// Sends `request` and reads the response into a [`Response`]; failures
/// are recorded in it, never raised.
fn exchange(
    addr: SocketAddr,
    request: &[u8],
    is_head: bool,
    body: &Body,
    deadline: Option<Instant>,
) -> Response {
    let t0 = Instant::now();
    let mut r = Response::new();
    if let Err(e) = read_response(addr, request, is_head, body, deadline, &mut r) {
        r.error = Some(format!("{:?}: {e}", e.kind()));
        r.error_kind = Some(e.kind());
    }
    if let Body::Expect(expected) = body {
        if r.received != expected.len() as u64 {
            r.matches = false;
        }
    }
    r.elapsed = t0.elapsed();
    r
}

fn read_response(
    addr: SocketAddr,
    request: &[u8],
    is_head: bool,
    body: &Body,
    deadline: Option<Instant>,
    r: &mut Response,
) -> io::Result<()> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut c = Conn {
        stream,
        deadline,
        buf: vec![0u8; 256 * 1024],
        keep_raw: matches!(body, Body::Keep),
        raw: Vec::new(),
    };
    // The server may answer and close before reading all of a hostile
    // request; a write error is fine as long as a response arrives.
    let write_err = c.stream.write_all(request).err();
    let result = read_body(&mut c, is_head, body, r, write_err);
    r.raw = std::mem::take(&mut c.raw);
    result
}

fn read_body(
    c: &mut Conn,
    is_head: bool,
    body: &Body,
    r: &mut Response,
    write_err: Option<io::Error>,
) -> io::Result<()> {
    let mut buf = Vec::new();
    let head = loop {
        if let Some(head) = parse_head(&buf)? {
            break head;
        }
        let got = match c.read(Conn::IDLE) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !buf.is_empty() => None,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("read timed out after {} bytes", buf.len()),
                ))
            }
            other => other?,
        };
        let Some(got) = got else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "incomplete response ({} bytes{}): {:?}",
                    buf.len(),
                    write_err
                        .as_ref()
                        .map(|e| format!(", write error {e}"))
                        .unwrap_or_default(),
                    String::from_utf8_lossy(&buf[..buf.len().min(200)])
                ),
            ));
        };
        buf.extend_from_slice(got);
    };
    r.status = head.status;
    r.reason = head.reason;
    r.headers = head.headers;
    let rest = buf.split_off(head.len);
    let chunked = r
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let declared = r
        .header("content-length")
        .and_then(|v| v.parse::<u64>().ok());
    let sink = |data: &[u8], r: &mut Response| {
        match body {
            Body::Keep => r.body.extend_from_slice(data),
            Body::Expect(expected) => {
                let start = r.received as usize;
                let end = start + data.len();
                if end > expected.len() || expected[start..end] != *data {
                    r.matches = false;
                }
            }
        }
        r.received += data.len() as u64;
    };

    if is_head || matches!(r.status, 204 | 304) {
        r.content_length = declared.filter(|_| !chunked).map(|_| 0);
        if !is_head {
            return Ok(());
        }
        // No framing: with Connection: close the server closes right away;
        // a quiet second still catches a stray body.
        sink(&rest, r);
        loop {
            match c.read(Duration::from_secs(1)) {
                Ok(Some(got)) => sink(got, r),
                Ok(None) => return Ok(()),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
        }
    }

    if chunked {
        let mut encoded = rest;
        loop {
            if let Some(decoded) = dechunk(&encoded)? {
                sink(&decoded, r);
                return Ok(());
            }
            match read_more(c)? {
                Some(got) => encoded.extend_from_slice(got),
                None => return Err(cut_short("chunked body cut short")),
            }
        }
    }

    r.content_length = declared;
    let take = |n: usize, r: &Response| match declared {
        Some(cl) => n.min((cl - r.received) as usize),
        None => n,
    };
    let n = take(rest.len(), r);
    sink(&rest[..n], r);
    loop {
        if declared.is_some_and(|cl| r.received >= cl) {
            return Ok(());
        }
        match read_more(c)? {
            Some(got) => {
                let n = take(got.len(), r);
                sink(&got[..n], r);
            }
            None => {
                return match declared {
                    None => Ok(()),
                    Some(cl) => Err(cut_short(&format!(
                        "body cut short at {} of {cl} bytes",
                        r.received
                    ))),
                }
            }
        }
    }
}

/// The next bytes of the body; `None` at EOF. A stall is a `TimedOut`.
fn read_more(c: &mut Conn) -> io::Result<Option<&[u8]>> {
    c.read(Conn::IDLE).map_err(|e| {
        if e.kind() == io::ErrorKind::WouldBlock {
            io::Error::new(io::ErrorKind::TimedOut, e)
        } else {
            e
        }
    })
}

fn cut_short(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, what.to_owned())
}
