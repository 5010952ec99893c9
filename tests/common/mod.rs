//! Shared harness for the integration tests: the daemon under test, a raw
//! HTTP/1.1 client, an OCI image-layout builder, and throwaway containerd and
//! docker-registry instances on loopback.
//!
//! Missing prerequisites are failures, never skips: a skipped end-to-end test
//! looks exactly like a passing one.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use flate2::write::GzEncoder;
use flate2::Compression;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

// ---------------------------------------------------------------------------
// Prerequisites and process plumbing
// ---------------------------------------------------------------------------

/// Panics unless `cmd` is an executable on PATH (or an absolute path).
pub fn require(cmd: &str) {
    if which(cmd).is_some() {
        return;
    }
    let package = match cmd {
        "containerd" | "ctr" | "containerd-shim-runc-v2" => "containerd",
        "busybox" => "busybox-static",
        "mount" | "umount" => "mount",
        other => other,
    };
    panic!("prerequisite {cmd} missing: install with apt-get install {package}");
}

fn which(cmd: &str) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if cmd.contains('/') {
        let p = PathBuf::from(cmd);
        return is_exec(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join(cmd))
        .find(|p| is_exec(p))
}

/// Spawns `cmd` from one thread that lives as long as the test process, with
/// PR_SET_PDEATHSIG: the kernel kills the child when that thread (i.e. the
/// test binary) dies, even on abort or for a `static` daemon never dropped.
/// Spawning from the calling test thread would kill it when that test ends.
fn spawn_tied(mut cmd: Command) -> io::Result<Child> {
    type Req = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Req>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Req>();
        thread::Builder::new()
            .name("child-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn child-spawner thread");
        Mutex::new(tx)
    });
    // SAFETY: prctl is async-signal-safe and touches no Rust state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock()
        .unwrap()
        .send((cmd, reply_tx))
        .expect("child-spawner alive");
    reply_rx.recv().expect("child-spawner replied")
}

/// Copies a child's output stream line by line to the test's stderr (which
/// the test harness captures and shows on failure).
fn forward_lines<R: Read + Send + 'static>(prefix: String, stream: R) {
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            match line {
                Ok(l) => eprintln!("[{prefix}] {l}"),
                Err(_) => break,
            }
        }
    });
}

/// Runs `cmd` to completion like `Command::output`, but kills it after
/// `timeout` (then the returned status is the kill's) so a hung client cannot
/// hang the suite.
pub fn output_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    let collect = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = collect(Box::new(child.stdout.take().unwrap()));
    let err = collect(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            eprintln!("timeout after {timeout:?}, killing {desc}");
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Panics with both output streams unless `out` succeeded.
pub fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loopback port that was free a moment ago (for servers that cannot bind
/// port 0 and report it, like docker-registry).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: plain kill(2) on a pid we spawned and have not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

// ---------------------------------------------------------------------------
// The daemon under test
// ---------------------------------------------------------------------------

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_nixery-local")
}

pub struct Daemon {
    addr: SocketAddr,
    state_dir: PathBuf,
    _tmp: Option<TempDir>,
    child: Option<Child>,
}

impl Daemon {
    /// `serve` on a fresh temporary state directory.
    pub fn start(extra_args: &[&str]) -> Daemon {
        let tmp = tempfile::Builder::new()
            .prefix("nl-state")
            .tempdir()
            .expect("tempdir");
        let mut d = Daemon::start_in(tmp.path(), extra_args);
        d._tmp = Some(tmp);
        d
    }

    /// `serve` on an existing state directory (e.g. after `import`).
    pub fn start_in(state_dir: &Path, extra_args: &[&str]) -> Daemon {
        Daemon::start_in_logged(state_dir, extra_args, &[]).0
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT`
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM, then wait up to 10 s; panics (after SIGKILL) if it hangs.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        signal(&child, libc::SIGTERM);
        match wait_child(&mut child, Duration::from_secs(10)) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("daemon did not exit within 10 s of SIGTERM");
            }
        }
    }

    /// Shorthand for [`request`] against this daemon.
    pub fn get(&self, path: &str) -> Response {
        request(self.addr, "GET", path, &[])
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `nixery-local import --state-dir STATE LAYOUT REF`
pub fn import(state_dir: &Path, layout: &Path, reference: &str) -> Output {
    output_timeout(
        Command::new(bin())
            .arg("import")
            .arg("--state-dir")
            .arg(state_dir)
            .arg(layout)
            .arg(reference),
        Duration::from_secs(60),
    )
}

/// Imports `image` as `reference`, asserting success and that the reported
/// digest is the layout's top-level manifest/index digest.
pub fn import_ok(state_dir: &Path, image: &TestImage, reference: &str) {
    let out = import(state_dir, &image.dir, reference);
    assert_success(&format!("import {reference}"), &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.trim();
    assert!(
        line.starts_with("imported ") && line.ends_with(&format!(" {}", image.manifest_digest)),
        "import {reference}: expected `imported {reference} {}`, got {line:?}",
        image.manifest_digest
    );
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.1 client
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Response {
    /// 0 if the server sent nothing parseable (only from [`raw`]).
    pub status: u16,
    pub reason: String,
    /// In wire order; values are raw bytes.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Decoded body (de-chunked). For HEAD: whatever followed the head,
    /// which must be empty.
    pub body: Vec<u8>,
    /// Every byte received.
    pub raw: Vec<u8>,
}

impl Response {
    /// First value of header `name` (case-insensitive), lossily as UTF-8.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
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

/// `METHOD PATH HTTP/1.1` with `Host` (unless given) and `Connection: close`.
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
    exchange(addr, &bytes, method == "HEAD")
        .unwrap_or_else(|e| panic!("{method} {path} on {addr}: {e}"))
}

/// Sends `bytes` verbatim and reads the reply until EOF (or 10 s); for
/// hostile requests. Status 0 means no parseable response.
pub fn raw(addr: SocketAddr, bytes: &[u8]) -> Response {
    let is_head = bytes.starts_with(b"HEAD ");
    match exchange(addr, bytes, is_head) {
        Ok(r) => r,
        Err(e) => Response {
            status: 0,
            reason: format!("no response: {e}"),
            headers: Vec::new(),
            body: Vec::new(),
            raw: Vec::new(),
        },
    }
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

fn exchange(addr: SocketAddr, request: &[u8], is_head: bool) -> io::Result<Response> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    // The server may answer and close before reading all of a hostile
    // request; a write error is fine as long as a response arrives.
    let write_err = s.write_all(request).err();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut head: Option<Head> = None;
    let mut body: Option<Vec<u8>> = None;
    loop {
        let n = match s.read(&mut chunk) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                // After a complete head with no framing (HEAD): the quiet
                // period is the end of the response.
                if head.is_some() && is_head {
                    break;
                }
                return Err(io::Error::new(
                    e.kind(),
                    format!("read timed out after {} bytes", buf.len()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !buf.is_empty() => break,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if head.is_none() {
            head = parse_head(&buf)?;
            if head.is_some() && is_head {
                // With Connection: close the server closes right away; a
                // short wait still catches a stray body.
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
            }
        }
        if let (Some(h), false) = (&head, is_head) {
            let rest = &buf[h.len..];
            let get = |name: &str| {
                h.headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, v)| String::from_utf8_lossy(v).to_ascii_lowercase())
            };
            if get("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
                if let Some(b) = dechunk(rest)? {
                    body = Some(b);
                    break;
                }
            } else if let Some(cl) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
                if rest.len() >= cl {
                    body = Some(rest[..cl].to_vec());
                    break;
                }
            } else if matches!(h.status, 204 | 304) {
                body = Some(Vec::new());
                break;
            }
        }
    }
    let Some(h) = head.or(parse_head(&buf)?) else {
        return Err(io::Error::other(format!(
            "incomplete response ({} bytes{}): {:?}",
            buf.len(),
            write_err
                .map(|e| format!(", write error {e}"))
                .unwrap_or_default(),
            String::from_utf8_lossy(&buf[..buf.len().min(200)])
        )));
    };
    let body = body.unwrap_or_else(|| buf[h.len..].to_vec());
    Ok(Response {
        status: h.status,
        reason: h.reason,
        headers: h.headers,
        body,
        raw: buf,
    })
}

// ---------------------------------------------------------------------------
// OCI image layouts
// ---------------------------------------------------------------------------

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The OCI architecture name of the machine running the tests.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no OCI architecture mapping for {other}"),
    }
}

/// The architecture the multi-platform image carries besides the host's.
pub fn other_arch() -> &'static str {
    if host_arch() == "amd64" {
        "arm64"
    } else {
        "amd64"
    }
}

/// One platform's manifest inside an index layout.
#[derive(Debug, Clone)]
pub struct PlatformManifest {
    pub architecture: String,
    pub digest: String,
    pub bytes: Vec<u8>,
    pub config_digest: String,
    /// What `Cmd` echoes for this platform.
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct TestImage {
    /// The OCI image layout directory.
    pub dir: PathBuf,
    pub tag: String,
    /// Media type of the top-level manifest (an index for multi-platform).
    pub media_type: String,
    /// Digest and bytes of what `index.json` points at (manifest or index).
    pub manifest_digest: String,
    pub manifest_bytes: Vec<u8>,
    /// The host platform's config.
    pub config_digest: String,
    pub config_bytes: Vec<u8>,
    /// Every layer referenced (deduplicated, in manifest order).
    pub layer_digests: Vec<String>,
    pub layer_sizes: Vec<u64>,
    /// For index layouts: the per-platform manifests (host first).
    pub platforms: Vec<PlatformManifest>,
}

impl TestImage {
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        blob_path(&self.dir, digest)
    }

    pub fn blob(&self, digest: &str) -> Vec<u8> {
        fs::read(self.blob_path(digest)).unwrap_or_else(|e| panic!("read blob {digest}: {e}"))
    }

    /// Every digest under `blobs/sha256/`, sorted.
    pub fn blob_digests(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.dir.join("blobs/sha256"))
            .expect("read blobs dir")
            .map(|e| format!("sha256:{}", e.unwrap().file_name().to_string_lossy()))
            .collect();
        v.sort();
        v
    }

    /// Flips bytes in the middle of blob `digest` (size unchanged), so only a
    /// digest check notices.
    pub fn corrupt_blob(&self, digest: &str) {
        let path = self.blob_path(digest);
        let mut bytes = fs::read(&path).expect("read blob to corrupt");
        let (mid, len) = (bytes.len() / 2, bytes.len());
        for b in &mut bytes[mid..(mid + 16).min(len)] {
            *b ^= 0xff;
        }
        fs::write(&path, bytes).expect("write corrupted blob");
    }

    /// Corrupts the first layer.
    pub fn corrupt_layer(&self) {
        self.corrupt_blob(&self.layer_digests[0].clone());
    }
}

pub fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    layout.join("blobs/sha256").join(hex)
}

fn write_blob(layout: &Path, bytes: &[u8]) -> (String, u64) {
    let digest = sha256_digest(bytes);
    fs::write(blob_path(layout, &digest), bytes).expect("write blob");
    (digest, bytes.len() as u64)
}

fn init_layout(dir: &Path) {
    fs::create_dir_all(dir.join("blobs/sha256")).expect("create layout dir");
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
}

fn write_index_json(dir: &Path, media_type: &str, digest: &str, size: u64, tag: &str) {
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "annotations": { REF_NAME: tag },
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).expect("index.json");
}

/// (gzipped layer, diff_id) of the busybox rootfs; built once per process
/// because gzip in an unoptimised test build is slow-ish.
fn busybox_layer() -> &'static (Vec<u8>, String) {
    static LAYER: OnceLock<(Vec<u8>, String)> = OnceLock::new();
    LAYER.get_or_init(|| {
        let busybox = fs::read("/bin/busybox").unwrap_or_else(|e| {
            panic!("prerequisite /bin/busybox missing ({e}): install with apt-get install busybox-static")
        });
        let mut b = tar::Builder::new(Vec::new());
        let header = |kind: tar::EntryType, mode: u32, size: u64| {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(size);
            h
        };
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, "bin/", io::empty()).unwrap();
        let mut h = header(tar::EntryType::Regular, 0o755, busybox.len() as u64);
        b.append_data(&mut h, "bin/busybox", &busybox[..]).unwrap();
        for name in ["sh", "echo"] {
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            b.append_link(&mut h, format!("bin/{name}"), "busybox").unwrap();
        }
        let tar = b.into_inner().unwrap();
        let diff_id = sha256_digest(&tar);
        let mut gz = GzEncoder::new(Vec::new(), Compression::new(6));
        gz.write_all(&tar).unwrap();
        (gz.finish().unwrap(), diff_id)
    })
}

struct MediaTypes {
    manifest: &'static str,
    config: &'static str,
    layer: &'static str,
}

const OCI_TYPES: MediaTypes = MediaTypes {
    manifest: OCI_MANIFEST,
    config: OCI_CONFIG,
    layer: OCI_LAYER_GZIP,
};

const DOCKER_TYPES: MediaTypes = MediaTypes {
    manifest: DOCKER_MANIFEST,
    config: DOCKER_CONFIG,
    layer: DOCKER_LAYER_GZIP,
};

/// Writes config + manifest for one platform over already-written layers;
/// returns (manifest bytes, config bytes, config digest).
fn write_image_manifest(
    dir: &Path,
    types: &MediaTypes,
    arch: &str,
    cmd: Value,
    layers: &[(String, u64, String)], // (digest, size, diff_id)
) -> (Vec<u8>, Vec<u8>, String) {
    let config = json!({
        "created": "1970-01-01T00:00:00Z",
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin"],
            "Cmd": cmd,
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.2.clone()).collect::<Vec<_>>(),
        },
        "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "nixery-local tests" }],
    });
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let (config_digest, config_size) = write_blob(dir, &config_bytes);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": types.manifest,
        "config": { "mediaType": types.config, "digest": config_digest, "size": config_size },
        "layers": layers.iter().map(|(d, s, _)| json!({
            "mediaType": types.layer, "digest": d, "size": s,
        })).collect::<Vec<_>>(),
    });
    (
        serde_json::to_vec(&manifest).unwrap(),
        config_bytes,
        config_digest,
    )
}

fn echo_cmd(message: &str) -> Value {
    json!(["/bin/sh", "-c", format!("echo {message}")])
}

/// Writes the manifest and `index.json` of a one-platform image whose
/// layers are already in `dir`, and describes it.
fn image_layout(
    dir: &Path,
    tag: &str,
    types: &MediaTypes,
    cmd: Value,
    layers: &[(String, u64, String)], // (digest, size, diff_id)
) -> TestImage {
    let (manifest_bytes, config_bytes, config_digest) =
        write_image_manifest(dir, types, host_arch(), cmd, layers);
    let (manifest_digest, manifest_size) = write_blob(dir, &manifest_bytes);
    write_index_json(dir, types.manifest, &manifest_digest, manifest_size, tag);
    TestImage {
        dir: dir.to_path_buf(),
        tag: tag.into(),
        media_type: types.manifest.into(),
        manifest_digest,
        manifest_bytes,
        config_digest,
        config_bytes,
        layer_digests: layers.iter().map(|l| l.0.clone()).collect(),
        layer_sizes: layers.iter().map(|l| l.1).collect(),
        platforms: Vec::new(),
    }
}

fn single_image(dir: &Path, tag: &str, message: &str, types: &MediaTypes) -> TestImage {
    init_layout(dir);
    let (layer, diff_id) = busybox_layer();
    let (layer_digest, layer_size) = write_blob(dir, layer);
    let layers = [(layer_digest, layer_size, diff_id.clone())];
    image_layout(dir, tag, types, echo_cmd(message), &layers)
}

/// An OCI-typed busybox image whose `Cmd` echoes `message`.
pub fn busybox_layout(dir: &Path, tag: &str, message: &str) -> TestImage {
    single_image(dir, tag, message, &OCI_TYPES)
}

/// The same image with Docker schema 2 media types.
pub fn docker_v2_layout(dir: &Path, tag: &str, message: &str) -> TestImage {
    single_image(dir, tag, message, &DOCKER_TYPES)
}

/// An OCI index with a host-arch and an other-arch manifest (sharing the one
/// busybox layer); each platform echoes `"<message> on <arch>"`.
pub fn multi_platform_layout(dir: &Path, tag: &str, message: &str) -> TestImage {
    init_layout(dir);
    let (layer, diff_id) = busybox_layer();
    let (layer_digest, layer_size) = write_blob(dir, layer);
    let layers = [(layer_digest.clone(), layer_size, diff_id.clone())];
    let mut platforms = Vec::new();
    let mut host_config = None;
    for arch in [host_arch(), other_arch()] {
        let msg = format!("{message} on {arch}");
        let (bytes, config_bytes, config_digest) =
            write_image_manifest(dir, &OCI_TYPES, arch, echo_cmd(&msg), &layers);
        let (digest, _) = write_blob(dir, &bytes);
        host_config.get_or_insert((config_bytes, config_digest.clone()));
        platforms.push(PlatformManifest {
            architecture: arch.into(),
            digest,
            bytes,
            config_digest,
            message: msg,
        });
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": platforms.iter().map(|p| json!({
            "mediaType": OCI_MANIFEST,
            "digest": p.digest,
            "size": p.bytes.len(),
            "platform": { "architecture": p.architecture, "os": "linux" },
        })).collect::<Vec<_>>(),
    });
    let index_bytes = serde_json::to_vec(&index).unwrap();
    let (index_digest, index_size) = write_blob(dir, &index_bytes);
    write_index_json(dir, OCI_INDEX, &index_digest, index_size, tag);
    let (config_bytes, config_digest) = host_config.unwrap();
    TestImage {
        dir: dir.to_path_buf(),
        tag: tag.into(),
        media_type: OCI_INDEX.into(),
        manifest_digest: index_digest,
        manifest_bytes: index_bytes,
        config_digest,
        config_bytes,
        layer_digests: vec![layer_digest],
        layer_sizes: vec![layer_size],
        platforms,
    }
}

/// An OCI image whose single layer is `size` deterministic pseudo-random
/// bytes (xorshift; byte `i` is [`blob_layout_bytes`]`(..)[i]`), written and
/// hashed in a stream so large sizes do not sit in memory.
pub fn blob_layout(dir: &Path, tag: &str, size: u64) -> TestImage {
    init_layout(dir);
    let tmp = dir.join("blobs/sha256/.layer.tmp");
    let mut f = io::BufWriter::with_capacity(1 << 20, File::create(&tmp).expect("create layer"));
    let mut hasher = Sha256::new();
    let mut gen = PseudoRandom::new(size);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        gen.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        f.write_all(&buf[..n]).expect("write layer");
        left -= n as u64;
    }
    f.into_inner().expect("flush layer").sync_all().ok();
    let layer_digest = format!("sha256:{}", hex::encode(hasher.finalize()));
    fs::rename(&tmp, blob_path(dir, &layer_digest)).expect("rename layer");
    let types = MediaTypes {
        layer: OCI_LAYER_TAR,
        ..OCI_TYPES
    };
    let layers = [(layer_digest.clone(), size, layer_digest)];
    image_layout(dir, tag, &types, json!(["/bin/true"]), &layers)
}

/// The bytes [`blob_layout`] writes for `size` (in memory; for small sizes).
pub fn blob_layout_bytes(size: u64) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    PseudoRandom::new(size).fill(&mut v);
    v
}

/// xorshift64*, seeded by the size so different sizes give different blobs.
struct PseudoRandom(u64);

impl PseudoRandom {
    fn new(seed: u64) -> Self {
        PseudoRandom((seed ^ 0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Every file (not directory) under `dir`, relative and sorted; for
/// "nothing changed" checks.
pub fn list_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// `CARGO_TARGET_TMPDIR/<name>-<pid>`, fresh, for state that a `static`
/// shared daemon outlives its test in (statics are never dropped, so a
/// `TempDir` would leak); leftovers of dead test processes are removed.
pub fn scratch_dir(name: &str) -> PathBuf {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    if let Ok(entries) = fs::read_dir(base) {
        for e in entries.flatten() {
            let file_name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = file_name
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix('-'))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = base.join(format!("{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A temporary directory with a recognisable prefix.
pub fn tempdir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir")
}

// ---------------------------------------------------------------------------
// containerd
// ---------------------------------------------------------------------------

/// A private containerd (own root, state, sockets) for one test.
pub struct Containerd {
    dir: TempDir,
    socket: PathBuf,
    snapshotter: String,
    child: Option<Child>,
}

impl Containerd {
    pub fn start() -> Containerd {
        for cmd in ["containerd", "ctr", "runc", "containerd-shim-runc-v2"] {
            require(cmd);
        }
        // Short path: unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("ctrd")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let d = dir.path();
        let socket = d.join("c.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  level = "info"

[metrics]
  address = ""
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
        );
        let config_path = d.join("config.toml");
        fs::write(&config_path, config).expect("write containerd config");
        fs::create_dir_all(d.join("certs.d")).unwrap();

        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn_tied(cmd).expect("spawn containerd");
        forward_lines("containerd".into(), child.stderr.take().unwrap());
        forward_lines("containerd stdout".into(), child.stdout.take().unwrap());
        let mut c = Containerd {
            dir,
            socket,
            snapshotter: "overlayfs".into(),
            child: Some(child),
        };

        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if c.socket.exists() && c.ctr(&["version"]).status.success() {
                break;
            }
            if let Some(status) = c.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("containerd exited during startup: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "containerd socket not ready after 20 s"
            );
            thread::sleep(Duration::from_millis(50));
        }

        // overlayfs cannot work everywhere (e.g. root on overlay); the
        // plugin then reports skip/error and native is the fallback.
        let plugins = c.ctr(&["plugins", "ls"]);
        let listing = String::from_utf8_lossy(&plugins.stdout);
        let overlay_ok = listing.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&"io.containerd.snapshotter.v1")
                && f.get(1) == Some(&"overlayfs")
                && f.last() == Some(&"ok")
        });
        if !overlay_ok {
            eprintln!("containerd overlayfs snapshotter unavailable; using native\n{listing}");
            c.snapshotter = "native".into();
        }
        c
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn snapshotter(&self) -> &str {
        &self.snapshotter
    }

    /// The `--hosts-dir` directory (shared by all hosts of this instance).
    pub fn certs_dir(&self) -> PathBuf {
        self.dir.path().join("certs.d")
    }

    /// `ctr --address SOCK --namespace test ARGS` (120 s limit), with the
    /// chosen snapshotter.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_timeout(args, Duration::from_secs(120))
    }

    pub fn ctr_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        output_timeout(
            Command::new("ctr")
                .arg("--address")
                .arg(&self.socket)
                .args(["--namespace", "test"])
                .args(args)
                .env("CONTAINERD_SNAPSHOTTER", &self.snapshotter),
            timeout,
        )
    }

    /// `ctr` that must succeed; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert_success(&format!("ctr {}", args.join(" ")), &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes `<certs.d>/<registry_host>/hosts.toml` with
    /// `server = "https://<registry_host>"` and `mirror_url` as a
    /// pull+resolve host; returns the `--hosts-dir` directory.
    pub fn hosts_dir(&self, registry_host: &str, mirror_url: &str) -> PathBuf {
        self.hosts_dir_with_server(
            registry_host,
            &format!("https://{registry_host}"),
            mirror_url,
        )
    }

    /// Like [`Containerd::hosts_dir`] with an explicit upstream `server`.
    pub fn hosts_dir_with_server(
        &self,
        registry_host: &str,
        server: &str,
        mirror_url: &str,
    ) -> PathBuf {
        let certs = self.certs_dir();
        let dir = certs.join(registry_host);
        fs::create_dir_all(&dir).expect("create hosts dir");
        let toml = format!(
            "server = \"{server}\"\n\n[host.\"{mirror_url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        );
        fs::write(dir.join("hosts.toml"), toml).expect("write hosts.toml");
        certs
    }

    /// `ctr images pull --hosts-dir CERTS REF` (plus `extra` args).
    pub fn pull(&self, reference: &str, extra: &[&str]) -> Output {
        let certs = self.certs_dir();
        let certs = certs.to_str().unwrap();
        let mut args = vec!["images", "pull", "--hosts-dir", certs];
        args.extend_from_slice(extra);
        args.push(reference);
        self.ctr(&args)
    }

    /// `ctr run --rm REF ID` with a machine-unique ID: runc keeps its state
    /// in /run/containerd/runc/<namespace>/<id>, shared by every containerd
    /// on the host, so IDs must not collide across parallel tests.
    pub fn run(&self, reference: &str) -> Output {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir_name = self.dir.path().file_name().unwrap().to_string_lossy();
        let id = format!("{dir_name}-{}", N.fetch_add(1, Ordering::Relaxed));
        self.ctr(&["run", "--rm", reference, &id])
    }

    fn cleanup(&mut self) {
        // Tasks first, so shims exit and release their mounts.
        let ids = self.ctr_timeout(&["tasks", "ls", "-q"], Duration::from_secs(10));
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.ctr_timeout(
                &["tasks", "kill", "-s", "SIGKILL", id],
                Duration::from_secs(10),
            );
            let _ = self.ctr_timeout(&["tasks", "delete", "--force", id], Duration::from_secs(10));
        }
        let ids = self.ctr_timeout(&["containers", "ls", "-q"], Duration::from_secs(10));
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.ctr_timeout(&["containers", "delete", id], Duration::from_secs(10));
        }
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGTERM);
            if wait_child(&mut child, Duration::from_secs(5)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Anything still mounted under our directory, deepest first.
        let base = self.dir.path().to_string_lossy().into_owned();
        let mut mounts: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|p| p.replace("\\040", " "))
            .filter(|p| p.starts_with(&base))
            .collect();
        mounts.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for m in mounts {
            let c = std::ffi::CString::new(m).unwrap();
            // SAFETY: umount2 with a valid C string.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.cleanup();
    }
}

// ---------------------------------------------------------------------------
// CNCF distribution (docker-registry), as a reference registry
// ---------------------------------------------------------------------------

/// Debian's `docker-registry` on loopback with its own storage.
pub struct DockerRegistry {
    _dir: TempDir,
    addr: SocketAddr,
    child: Option<Child>,
}

impl DockerRegistry {
    pub fn start() -> DockerRegistry {
        require("docker-registry");
        let dir = tempdir("dreg");
        // docker-registry cannot report a port it picked, so pick one and
        // retry on the (rare) race with another process.
        for _ in 0..5 {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let config = dir.path().join("config.yml");
            fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                    dir.path().join("data").display()
                ),
            )
            .unwrap();
            let mut cmd = Command::new("docker-registry");
            cmd.arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = spawn_tied(cmd).expect("spawn docker-registry");
            forward_lines("docker-registry".into(), child.stderr.take().unwrap());
            forward_lines(
                "docker-registry stdout".into(),
                child.stdout.take().unwrap(),
            );
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    eprintln!("docker-registry exited ({status}); retrying on another port");
                    break;
                }
                if TcpStream::connect(addr).is_ok()
                    && request(addr, "GET", "/v2/", &[]).status == 200
                {
                    return DockerRegistry {
                        _dir: dir,
                        addr,
                        child: Some(child),
                    };
                }
                assert!(
                    Instant::now() < deadline,
                    "docker-registry not ready after 15 s"
                );
                thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("docker-registry failed to start");
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
}

impl Drop for DockerRegistry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// skopeo
// ---------------------------------------------------------------------------

/// `skopeo --policy <accept-anything> ARGS` (120 s limit); the policy is
/// explicit so the host's /etc/containers/policy.json does not matter.
pub fn skopeo<S: AsRef<OsStr>>(args: &[S]) -> Output {
    require("skopeo");
    static POLICY: OnceLock<PathBuf> = OnceLock::new();
    let policy = POLICY.get_or_init(|| {
        // Same content from every test process; write + rename so a
        // concurrent reader never sees a half-written file.
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let tmp = base.join(format!("skopeo-policy.json.{}", std::process::id()));
        fs::write(&tmp, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).unwrap();
        let p = base.join("skopeo-policy.json");
        fs::rename(&tmp, &p).unwrap();
        p
    });
    output_timeout(
        Command::new("skopeo")
            .arg("--policy")
            .arg(policy)
            .args(args),
        Duration::from_secs(120),
    )
}

/// Pushes a layout into a registry over plain HTTP (`skopeo copy --all`).
pub fn skopeo_push(image: &TestImage, dest: &str) {
    let src = format!("oci:{}:{}", image.dir.display(), image.tag);
    let out = skopeo(&["copy", "--all", "--dest-tls-verify=false", &src, dest]);
    assert_success(&format!("skopeo copy {src} {dest}"), &out);
}

// ---------------------------------------------------------------------------
// Daemons with a captured log and their own environment (Nix image tests)
// ---------------------------------------------------------------------------

/// The stderr lines of a daemon started with [`Daemon::start_logged`] or
/// [`Daemon::start_in_logged`], kept for assertions (and still forwarded to
/// the test's stderr).
#[derive(Clone, Default)]
pub struct DaemonLog(std::sync::Arc<Mutex<Vec<String>>>);

impl DaemonLog {
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Every line, joined, for assertion messages.
    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// How many lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until at least `n` lines contain `needle`; false on timeout.
    pub fn wait_for(&self, needle: &str, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count(needle) >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn push(&self, line: String) {
        self.0.lock().unwrap().push(line);
    }
}

impl Daemon {
    /// Like [`Daemon::start`], also returning the daemon's captured stderr;
    /// `env` is added to the daemon's environment.
    pub fn start_logged(extra_args: &[&str], env: &[(&str, &str)]) -> (Daemon, DaemonLog) {
        let tmp = tempfile::Builder::new()
            .prefix("nl-state")
            .tempdir()
            .expect("tempdir");
        let (mut d, log) = Daemon::start_in_logged(tmp.path(), extra_args, env);
        d._tmp = Some(tmp);
        (d, log)
    }

    /// Like [`Daemon::start_in`], also returning the daemon's captured
    /// stderr; `env` is added to the daemon's environment (e.g. a `PATH`
    /// without Nix).
    pub fn start_in_logged(
        state_dir: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> (Daemon, DaemonLog) {
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state_dir)
            .args(extra_args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn_tied(cmd).expect("spawn nixery-local serve");
        let log = DaemonLog::default();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[daemon] {line}");
                sink.push(line);
            }
        });
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("[daemon stdout] {line}");
                if line.starts_with("nixery-local listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line);
                    }
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "daemon never printed its listening line ({e:?}); exit: {status:?}\n{}",
                    log.text()
                );
            }
        };
        let addr: SocketAddr = line
            .strip_prefix("nixery-local listening on http://")
            .map(|u| u.trim_end_matches('/'))
            .and_then(|u| u.parse().ok())
            .unwrap_or_else(|| panic!("unexpected listening line {line:?}"));
        assert!(addr.ip().is_loopback(), "daemon bound {addr}");
        (
            Daemon {
                addr,
                state_dir: state_dir.to_path_buf(),
                _tmp: None,
                child: Some(child),
            },
            log,
        )
    }
}

impl Containerd {
    /// `ctr run --rm REF ID ARGS…` (the image's own command when `args` is
    /// empty) with a machine-unique ID, as [`Containerd::run`].
    pub fn run_args(&self, reference: &str, args: &[&str]) -> Output {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir_name = self.dir.path().file_name().unwrap().to_string_lossy();
        let id = format!("{dir_name}-a{}", N.fetch_add(1, Ordering::Relaxed));
        let mut v = vec!["run", "--rm", reference, &id];
        v.extend_from_slice(args);
        self.ctr(&v)
    }
}

// ---------------------------------------------------------------------------
// Upstream registries for the pull-through mirror tests
// ---------------------------------------------------------------------------

pub mod upstream;

// ---------------------------------------------------------------------------
// Blobserve (issue #6): a two-layer image with whiteouts, an opaque
// directory and symlinks that try to leave the image root
// ---------------------------------------------------------------------------

/// What [`layered_layout`] puts in its image (final, merged view).
pub const LAYERED_PASSWD: &str = "root:x:0:0:image root:/root:/bin/sh\n";
pub const LAYERED_HOSTNAME: &str = "image-hostname-not-the-hosts\n";
pub const LAYERED_INDEX_HTML: &str =
    "<!DOCTYPE html><html><head><base href=\"BASE_URL\"></head><body>app at BASE_URL</body></html>\n";

/// One tar entry for [`layered_layout`]'s layers.
pub enum TarItem<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Link(&'a str, &'a str),
}

/// A gzipped tar layer of `items` (mtime 1_700_000_000); returns (blob, diff_id).
pub fn tar_layer(items: &[TarItem]) -> (Vec<u8>, String) {
    let mut b = tar::Builder::new(Vec::new());
    for item in items {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match item {
            TarItem::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, io::empty()).unwrap();
            }
            TarItem::File(p, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            TarItem::Link(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
        }
    }
    let tar = b.into_inner().unwrap();
    let diff_id = sha256_digest(&tar);
    let mut gz = GzEncoder::new(Vec::new(), Compression::new(1));
    gz.write_all(&tar).unwrap();
    (gz.finish().unwrap(), diff_id)
}

/// An OCI image of gzipped tar `layers` (bottom first).
pub fn layers_layout(dir: &Path, tag: &str, layers: &[(Vec<u8>, String)]) -> TestImage {
    init_layout(dir);
    let mut descs = Vec::new();
    for (blob, diff_id) in layers {
        let (d, s) = write_blob(dir, blob);
        descs.push((d, s, diff_id.clone()));
    }
    image_layout(dir, tag, &OCI_TYPES, json!(["/bin/true"]), &descs)
}

/// Two layers. The lower one has `/etc/{passwd,hostname,gone}`,
/// `/opq/{old,sub/deep}`, `/app/index.html` and `/app/data.bin` (4096
/// pseudo-random bytes). The upper one whites out `/etc/gone`, makes `/opq`
/// opaque (adding `/opq/new`), and adds symlinks: `/abs -> /etc/passwd`,
/// `/up -> ../../../../etc/hostname`, `/app/deep/up ->
/// ../../../../../../etc/hostname`, `/etcdir -> /etc`, `/loop -> loop`, and
/// `/app/link.html -> index.html`.
pub fn layered_layout(dir: &Path, tag: &str) -> TestImage {
    let data = blob_layout_bytes(4096);
    let lower = tar_layer(&[
        TarItem::Dir("etc/"),
        TarItem::File("etc/passwd", LAYERED_PASSWD.as_bytes()),
        TarItem::File("etc/hostname", LAYERED_HOSTNAME.as_bytes()),
        TarItem::File("etc/gone", b"whited out\n"),
        TarItem::Dir("opq/"),
        TarItem::File("opq/old", b"hidden by the opaque dir\n"),
        TarItem::File("opq/sub/deep", b"hidden too\n"),
        TarItem::Dir("app/"),
        TarItem::File("app/index.html", LAYERED_INDEX_HTML.as_bytes()),
        TarItem::File("app/data.bin", &data),
    ]);
    let upper = tar_layer(&[
        TarItem::Dir("etc/"),
        TarItem::File("etc/.wh.gone", b""),
        TarItem::Dir("opq/"),
        TarItem::File("opq/.wh..wh..opq", b""),
        TarItem::File("opq/new", b"new\n"),
        TarItem::Link("abs", "/etc/passwd"),
        TarItem::Link("up", "../../../../etc/hostname"),
        TarItem::Dir("app/deep/"),
        TarItem::Link("app/deep/up", "../../../../../../etc/hostname"),
        TarItem::Link("etcdir", "/etc"),
        TarItem::Link("loop", "loop"),
        TarItem::Link("app/link.html", "index.html"),
    ]);
    layers_layout(dir, tag, &[lower, upper])
}
