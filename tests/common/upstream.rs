//! Upstream registries for the pull-through mirror tests (issue #4):
//! - [`UpstreamRegistry`]: Debian's `docker-registry` in its plain, TLS,
//!   htpasswd and token-auth setups, with its access log captured so tests
//!   can count the requests it served;
//! - [`TokenIssuer`]: a token server for distribution's `auth: token`
//!   (RS256 JWTs signed with `openssl dgst`, a key the test generates);
//! - [`FakeUpstream`]: a misbehaving registry written here (wrong bytes,
//!   truncated bodies, hangs, 5xx, redirects), recording every request;
//! - [`fetch`]: a client that streams a body and checks it without keeping
//!   it, and says whether it arrived complete;
//! - the openssl PKI these need.
//!
//! Missing prerequisites are failures, as everywhere in the harness.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use base64::Engine as _;

use super::*;

/// containerd's Accept header for manifests (every type it understands).
pub const ACCEPT_MANIFESTS: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*";

/// `ns` as containerd sends it: the registry host, `:` percent-encoded.
pub fn ns(host: &str) -> String {
    format!("ns={}", host.replace(':', "%3A"))
}

/// The directory that holds a digest's blob in the daemon's state dir.
pub fn cached_blob(state_dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    state_dir.join("blobs/sha256").join(hex)
}

/// Waits up to `timeout` for blob `digest` to be committed to the daemon's
/// cache (a download commits just after its last byte goes out).
pub fn wait_cached(state_dir: &Path, digest: &str, timeout: Duration) -> bool {
    let path = cached_blob(state_dir, digest);
    let deadline = Instant::now() + timeout;
    loop {
        if path.is_file() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Every digest the daemon has under `blobs/` (sorted).
pub fn cached_digests(state_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(state_dir.join("blobs/sha256"))
        .map(|rd| {
            rd.flatten()
                .map(|e| format!("sha256:{}", e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// openssl
// ---------------------------------------------------------------------------

/// `openssl ARGS` in `dir`; panics with its output unless it succeeds.
pub fn openssl(dir: &Path, args: &[&str]) -> Output {
    require("openssl");
    let out = output_timeout(
        Command::new("openssl").args(args).current_dir(dir),
        Duration::from_secs(60),
    );
    assert_success(&format!("openssl {}", args.join(" ")), &out);
    out
}

/// A CA and a server certificate it signed, as PEM files.
pub struct Pki {
    /// The CA certificate (what a client must trust).
    pub ca_cert: PathBuf,
    /// A directory holding only `ca.crt` (skopeo's `--cert-dir` layout).
    pub ca_dir: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

/// Generates a CA and a server certificate for `127.0.0.1` (IP SAN) and
/// `dns_names` (DNS SANs) under `dir`. EC P-256 keys: quick to generate.
pub fn tls_pki(dir: &Path, dns_names: &[&str]) -> Pki {
    fs::create_dir_all(dir).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=nixery-local test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    let mut san = String::from("subjectAltName=IP:127.0.0.1");
    for n in dns_names {
        san.push_str(&format!(",DNS:{n}"));
    }
    fs::write(
        dir.join("server.ext"),
        format!(
            "{san}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        ),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    );
    let ca_dir = dir.join("ca-only");
    fs::create_dir_all(&ca_dir).unwrap();
    fs::copy(dir.join("ca.pem"), ca_dir.join("ca.crt")).unwrap();
    Pki {
        ca_cert: dir.join("ca.pem"),
        ca_dir,
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
    }
}

/// A bcrypt htpasswd file (what distribution accepts) for one user.
pub fn htpasswd_file(path: &Path, user: &str, password: &str) {
    assert!(
        which("htpasswd").is_some(),
        "prerequisite htpasswd missing: install with apt-get install apache2-utils"
    );
    let out = output_timeout(
        Command::new("htpasswd").args(["-Bbn", user, password]),
        Duration::from_secs(30),
    );
    assert_success("htpasswd -Bbn", &out);
    fs::write(path, &out.stdout).unwrap();
}

/// A `DOCKER_CONFIG` directory whose `config.json` has `auths` for `host`.
pub fn docker_config_dir(dir: &Path, host: &str, user: &str, password: &str) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let config = json!({ "auths": { host: { "auth": auth } } });
    fs::write(
        dir.join("config.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
    dir.to_path_buf()
}

// ---------------------------------------------------------------------------
// docker-registry as an upstream
// ---------------------------------------------------------------------------

/// distribution's `auth: token` settings.
#[derive(Clone, Debug)]
pub struct TokenAuth {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    pub rootcertbundle: PathBuf,
}

#[derive(Clone, Debug, Default)]
pub struct RegistryOpts {
    /// Storage root to use (e.g. one seeded by a plain registry); a fresh
    /// one when `None`.
    pub storage: Option<PathBuf>,
    /// (certificate, key) PEM files: serve HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// `auth: htpasswd` with this file.
    pub htpasswd: Option<PathBuf>,
    pub token: Option<TokenAuth>,
}

/// One line of docker-registry's access log.
#[derive(Clone, Debug)]
pub struct Access {
    pub method: String,
    pub uri: String,
    pub status: u16,
}

/// `docker-registry` on loopback with its access log (stdout, combined
/// format, one line per request) captured.
pub struct UpstreamRegistry {
    dir: TempDir,
    /// A seeded storage directory this registry owns (see [`seeded`]).
    ///
    /// [`seeded`]: UpstreamRegistry::seeded
    _seed: Option<TempDir>,
    storage: PathBuf,
    addr: SocketAddr,
    tls: bool,
    child: Option<Child>,
    access: Arc<Mutex<Vec<Access>>>,
}

/// `"GET /v2/... HTTP/1.1" 200 ...` → (method, uri, status).
fn parse_access(line: &str) -> Option<Access> {
    let start = line.find('"')? + 1;
    let rest = &line[start..];
    let end = rest.find('"')?;
    let mut req = rest[..end].split(' ');
    let method = req.next()?.to_owned();
    let uri = req.next()?.to_owned();
    let status = rest[end + 1..].split_whitespace().next()?.parse().ok()?;
    Some(Access {
        method,
        uri,
        status,
    })
}

impl UpstreamRegistry {
    /// A plain-HTTP registry with its own storage.
    pub fn start_plain() -> UpstreamRegistry {
        UpstreamRegistry::start(RegistryOpts::default())
    }

    pub fn start(opts: RegistryOpts) -> UpstreamRegistry {
        require("docker-registry");
        let dir = tempdir("upreg");
        let storage = opts
            .storage
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        for _ in 0..5 {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let mut yaml = format!(
                "version: 0.1\nlog:\n  level: info\n  formatter: json\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {addr}\n  secret: nixery-local-tests\n",
                storage.display()
            );
            if let Some((cert, key)) = &opts.tls {
                yaml.push_str(&format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    cert.display(),
                    key.display()
                ));
            }
            if let Some(path) = &opts.htpasswd {
                yaml.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: nixery-local-tests\n    path: {}\n",
                    path.display()
                ));
            }
            if let Some(t) = &opts.token {
                yaml.push_str(&format!(
                    "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                    t.realm,
                    t.service,
                    t.issuer,
                    t.rootcertbundle.display()
                ));
            }
            let config = dir.path().join("config.yml");
            fs::write(&config, yaml).unwrap();
            let mut cmd = Command::new("docker-registry");
            cmd.arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = spawn_tied(cmd).expect("spawn docker-registry");
            let access = Arc::new(Mutex::new(Vec::new()));
            let sink = access.clone();
            let stdout = child.stdout.take().unwrap();
            let port = addr.port();
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("[upstream :{port} access] {line}");
                    if let Some(a) = parse_access(&line) {
                        sink.lock().unwrap().push(a);
                    }
                }
            });
            // The JSON app log repeats every request at info level; only
            // warnings and errors are worth showing. Its "listening on" line
            // comes after a successful bind: a connect alone could reach
            // another process that took the port first.
            let stderr = child.stderr.take().unwrap();
            let (tx, listening) = mpsc::channel();
            thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if line.contains(r#""msg":"listening on "#) {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    if !line.contains(r#""level":"info""#) {
                        eprintln!("[upstream :{port}] {line}");
                    }
                }
            });
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    eprintln!("docker-registry exited ({status}); retrying on another port");
                    break;
                }
                if listening.try_recv().is_ok() {
                    assert!(
                        TcpStream::connect(addr).is_ok(),
                        "docker-registry said it listens on {addr}, but connect fails"
                    );
                    return UpstreamRegistry {
                        dir,
                        _seed: None,
                        storage,
                        addr,
                        tls: opts.tls.is_some(),
                        child: Some(child),
                        access,
                    };
                }
                assert!(
                    Instant::now() < deadline,
                    "docker-registry not listening after 15 s"
                );
                thread::sleep(Duration::from_millis(25));
            }
        }
        panic!("docker-registry failed to start");
    }

    /// A registry configured by `opts` whose storage already holds
    /// `images` (pushed with skopeo into a plain registry on the same
    /// storage first, so auth and TLS setups need no push support).
    pub fn seeded(mut opts: RegistryOpts, images: &[(&TestImage, &str)]) -> UpstreamRegistry {
        let storage = tempdir("upreg-seed");
        let storage_path = storage.path().join("data");
        {
            let mut plain = UpstreamRegistry::start(RegistryOpts {
                storage: Some(storage_path.clone()),
                ..RegistryOpts::default()
            });
            for (image, reference) in images {
                plain.push(image, reference);
            }
            plain.stop();
        }
        opts.storage = Some(storage_path);
        let mut reg = UpstreamRegistry::start(opts);
        reg._seed = Some(storage);
        reg
    }

    /// `skopeo copy --all` of `image` to `REPO:TAG` on this (plain) registry.
    pub fn push(&self, image: &TestImage, reference: &str) {
        assert!(!self.tls, "push() is for plain registries; use seeded()");
        // --preserve-digests: skopeo would otherwise gzip uncompressed
        // layers on the way, and the registry would hold other digests.
        let src = format!("oci:{}:{}", image.dir.display(), image.tag);
        let dest = format!("docker://{}/{reference}", self.host_port());
        let out = skopeo(&[
            "copy",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &src,
            &dest,
        ]);
        assert_success(&format!("skopeo copy {src} {dest}"), &out);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT` or `https://…` for TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn storage(&self) -> &Path {
        &self.storage
    }

    /// `--upstream HOST=URL` for this registry under its own host name.
    pub fn upstream_arg(&self) -> String {
        format!("{}={}", self.host_port(), self.url())
    }

    /// The access log so far (waits briefly for lines in flight).
    pub fn access_log(&self) -> Vec<Access> {
        thread::sleep(Duration::from_millis(150));
        self.access.lock().unwrap().clone()
    }

    /// How many requests with `method` whose URI path ends with `suffix`.
    pub fn count(&self, method: &str, suffix: &str) -> usize {
        self.access_log()
            .iter()
            .filter(|a| a.method == method && a.uri.split('?').next().unwrap().ends_with(suffix))
            .count()
    }

    /// GETs of blob `digest` (any repository).
    pub fn blob_gets(&self, digest: &str) -> usize {
        self.count("GET", &format!("/blobs/{digest}"))
    }

    /// Access log lines, for assertion messages.
    pub fn access_text(&self) -> String {
        self.access_log()
            .iter()
            .map(|a| format!("{} {} {}", a.method, a.uri, a.status))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Kills the registry and waits until its port refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(self.addr).is_ok() {
            assert!(Instant::now() < deadline, "{} still accepting", self.addr);
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for UpstreamRegistry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// A minimal HTTP/1.1 server for the fake upstream and the token issuer
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Token issuer for distribution's `auth: token`
// ---------------------------------------------------------------------------

/// A token server: checks Basic credentials and issues RS256 JWTs that
/// distribution verifies against `rootcertbundle` (the signing certificate
/// travels in the JWS `x5c` header). Signatures come from `openssl dgst`.
pub struct TokenIssuer {
    server: FakeUpstream,
    issued: Arc<AtomicUsize>,
    pub service: String,
    pub issuer: String,
    /// The self-signed signing certificate (the registry's rootcertbundle).
    pub cert: PathBuf,
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl TokenIssuer {
    /// Issues tokens to `user:password` only; anonymous or wrong
    /// credentials get 401.
    pub fn start(dir: &Path, user: &str, password: &str) -> TokenIssuer {
        fs::create_dir_all(dir).unwrap();
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "token.key",
                "-out",
                "token.pem",
                "-days",
                "2",
                "-subj",
                "/CN=nixery-local test token issuer",
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-in",
                "token.pem",
                "-outform",
                "DER",
                "-out",
                "token.der",
            ],
        );
        let der = fs::read(dir.join("token.der")).unwrap();
        let x5c = base64::engine::general_purpose::STANDARD.encode(der);
        let key = dir.join("token.key");
        let service = "nixery-local-test-registry".to_owned();
        let issuer = "nixery-local-test-issuer".to_owned();
        let expected = format!("{user}:{password}");
        let issued = Arc::new(AtomicUsize::new(0));
        let counter = issued.clone();
        let (svc, iss) = (service.clone(), issuer.clone());
        let subject = user.to_owned();
        let server = FakeUpstream::start(move |req| {
            if req.path() != "/token" {
                return Reply::not_found("NAME_UNKNOWN");
            }
            if req.basic_auth().as_deref() != Some(expected.as_str()) {
                return Reply::unauthorized(r#"Basic realm="token""#);
            }
            let q = req.query();
            if !q.iter().any(|(k, v)| k == "service" && *v == svc) {
                return Reply::status(400);
            }
            let access: Vec<Value> = q
                .iter()
                .filter(|(k, _)| k == "scope")
                .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
                .filter_map(|scope| {
                    let mut parts = scope.rsplitn(2, ':');
                    let actions = parts.next()?;
                    let (kind, name) = parts.next()?.split_once(':')?;
                    Some(json!({
                        "type": kind,
                        "name": name,
                        "actions": actions.split(',').collect::<Vec<_>>(),
                    }))
                })
                .collect();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let header = json!({ "alg": "RS256", "typ": "JWT", "x5c": [x5c] });
            let claims = json!({
                "iss": iss,
                "sub": subject,
                "aud": svc,
                "exp": now + 300,
                "nbf": now - 30,
                "iat": now,
                "jti": format!("token-{n}"),
                "access": access,
            });
            let signing_input = format!(
                "{}.{}",
                b64url(&serde_json::to_vec(&header).unwrap()),
                b64url(&serde_json::to_vec(&claims).unwrap())
            );
            let mut child = Command::new("openssl")
                .args(["dgst", "-sha256", "-sign"])
                .arg(&key)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn openssl dgst");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(signing_input.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            if !out.status.success() {
                eprintln!(
                    "[token issuer] openssl dgst failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                return Reply::status(500);
            }
            let jwt = format!("{signing_input}.{}", b64url(&out.stdout));
            let body = json!({ "token": jwt, "access_token": jwt, "expires_in": 300 });
            Reply::ok("application/json", serde_json::to_vec(&body).unwrap(), None)
        });
        TokenIssuer {
            server,
            issued,
            service,
            issuer,
            cert: dir.join("token.pem"),
        }
    }

    /// `http://127.0.0.1:PORT/token`
    pub fn realm(&self) -> String {
        format!("{}/token", self.server.url())
    }

    /// Tokens issued so far.
    pub fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }

    /// Every request (including refused ones).
    pub fn requests(&self) -> Vec<Req> {
        self.server.requests()
    }

    pub fn auth(&self) -> TokenAuth {
        TokenAuth {
            realm: self.realm(),
            service: self.service.clone(),
            issuer: self.issuer.clone(),
            rootcertbundle: self.cert.clone(),
        }
    }
}

// ---------------------------------------------------------------------------
// A streaming client
// ---------------------------------------------------------------------------

/// What to do with a response body.
#[derive(Clone)]
pub enum Body {
    /// Keep it in [`Fetched::body`].
    Keep,
    /// Compare it with these bytes as it arrives (for large blobs).
    Expect(Arc<Vec<u8>>),
}

#[derive(Debug)]
pub struct Fetched {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub content_length: Option<u64>,
    /// Body bytes received (de-chunked).
    pub received: u64,
    /// With [`Body::Keep`].
    pub body: Vec<u8>,
    /// With [`Body::Expect`]: every byte so far matched and none extra.
    pub matches: bool,
    /// A transport error or timeout before the body was complete.
    pub error: Option<String>,
    pub elapsed: Duration,
}

impl Fetched {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body arrived in full as framed (no error, length as announced).
    pub fn complete(&self) -> bool {
        self.error.is_none() && self.content_length.is_none_or(|cl| cl == self.received)
    }

    /// 200, complete, and (with [`Body::Expect`]) exactly the expected bytes.
    pub fn ok_and_matches(&self, expected_len: u64) -> bool {
        self.status == 200 && self.complete() && self.matches && self.received == expected_len
    }

    pub fn summary(&self) -> String {
        format!(
            "HTTP {} after {:?}: Content-Length {:?}, received {} bytes, matches {}, error {:?}, headers {:?}{}",
            self.status,
            self.elapsed,
            self.content_length,
            self.received,
            self.matches,
            self.error,
            self.headers,
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

/// `GET`/`HEAD` `path` on `addr` with `Connection: close`, streaming the
/// body into `body`; never panics on a short or failed body (that is what
/// the tests look for). Status 0: no response head at all.
pub fn fetch(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body,
    timeout: Duration,
) -> Fetched {
    let t0 = Instant::now();
    let deadline = t0 + timeout;
    let mut f = Fetched {
        status: 0,
        headers: Vec::new(),
        content_length: None,
        received: 0,
        body: Vec::new(),
        matches: true,
        error: None,
        elapsed: Duration::ZERO,
    };
    let result = (|| -> io::Result<()> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())?;
        let remaining = |d: Instant| {
            d.checked_duration_since(Instant::now())
                .filter(|r| !r.is_zero())
                .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
        };
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 256 * 1024];
        let head = loop {
            if let Some(head) = parse_head(&buf)? {
                break head;
            }
            s.set_read_timeout(Some(remaining(deadline)?))?;
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed after {} header bytes", buf.len()),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        f.status = head.status;
        f.headers = head
            .headers
            .iter()
            .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        let head_len = head.len;
        let chunked = f
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        f.content_length = if chunked {
            None
        } else {
            f.header("content-length").and_then(|v| v.parse().ok())
        };
        if method == "HEAD" || matches!(f.status, 204 | 304) {
            f.content_length = f.content_length.map(|_| 0);
            return Ok(());
        }
        let mut raw_body: Vec<u8> = buf[head_len..].to_vec();
        let sink = |data: &[u8], f: &mut Fetched| {
            match &body {
                Body::Keep => f.body.extend_from_slice(data),
                Body::Expect(expected) => {
                    let start = f.received as usize;
                    let end = start + data.len();
                    if end > expected.len() || expected[start..end] != *data {
                        f.matches = false;
                    }
                }
            }
            f.received += data.len() as u64;
        };
        if chunked {
            // Small error bodies only: collect, then de-chunk.
            loop {
                if let Some(b) = dechunk(&raw_body)? {
                    sink(&b, &mut f);
                    return Ok(());
                }
                s.set_read_timeout(Some(remaining(deadline)?))?;
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "chunked body cut short",
                    ));
                }
                raw_body.extend_from_slice(&chunk[..n]);
            }
        }
        let limit = f.content_length;
        let first = match limit {
            Some(cl) => &raw_body[..raw_body.len().min(cl as usize)],
            None => &raw_body[..],
        };
        sink(first, &mut f);
        loop {
            if limit.is_some_and(|cl| f.received >= cl) {
                return Ok(());
            }
            s.set_read_timeout(Some(remaining(deadline)?))?;
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return match limit {
                    None => Ok(()),
                    Some(cl) => Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("body cut short at {} of {cl} bytes", f.received),
                    )),
                };
            }
            let take = match limit {
                Some(cl) => n.min((cl - f.received) as usize),
                None => n,
            };
            sink(&chunk[..take], &mut f);
        }
    })();
    if let Err(e) = result {
        f.error = Some(format!("{:?}: {e}", e.kind()));
    }
    if let Body::Expect(expected) = &body {
        if f.received != expected.len() as u64 {
            f.matches = false;
        }
    }
    f.elapsed = t0.elapsed();
    f
}

/// GET `path` keeping the body (small things: manifests, errors, configs).
pub fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Fetched {
    fetch(
        addr,
        "GET",
        path,
        headers,
        Body::Keep,
        Duration::from_secs(30),
    )
}
