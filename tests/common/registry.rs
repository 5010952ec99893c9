//! Debian's `docker-registry` (CNCF distribution) on loopback, as the
//! reference registry and as an upstream of the mirror: plain, TLS, htpasswd
//! or token auth ([`RegistryOpts`]), with its access log captured so tests
//! can count the requests it served, and images pushed with skopeo.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{
    assert_success, forward_lines, free_port, poll_until, require, skopeo, tempdir, Proc, TestImage,
};

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

/// `docker-registry` on loopback with its own storage and its access log
/// (stdout, combined format, one line per request) captured.
pub struct DockerRegistry {
    dir: TempDir,
    /// A seeded storage directory this registry owns (see [`seeded`]).
    ///
    /// [`seeded`]: DockerRegistry::seeded
    _seed: Option<TempDir>,
    storage: PathBuf,
    addr: SocketAddr,
    tls: bool,
    proc: Proc,
    access: Arc<Mutex<Vec<Access>>>,
}

/// `--default-registry HOST --upstream HOST=URL`.
pub fn mirror_args(host: &str, url: &str) -> Vec<String> {
    vec![
        "--default-registry".into(),
        host.into(),
        "--upstream".into(),
        format!("{host}={url}"),
    ]
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

impl DockerRegistry {
    /// A plain-HTTP registry with its own storage.
    pub fn start() -> DockerRegistry {
        DockerRegistry::start_with(RegistryOpts::default())
    }

    pub fn start_with(opts: RegistryOpts) -> DockerRegistry {
        require("docker-registry");
        let dir = tempdir("upreg");
        let storage = opts
            .storage
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        // docker-registry cannot report a port it picked, so pick one and
        // retry on the (rare) race with another process.
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
            cmd.arg("serve").arg(&config);
            let mut proc = Proc::spawn(cmd);
            let access = Arc::new(Mutex::new(Vec::new()));
            let sink = access.clone();
            let port = addr.port();
            forward_lines(
                format!("upstream :{port} access"),
                proc.stdout(),
                move |line| {
                    if let Some(a) = parse_access(line) {
                        sink.lock().unwrap().push(a);
                    }
                },
            );
            // The JSON app log repeats every request at info level; only
            // warnings and errors are worth showing. Its "listening on" line
            // comes after a successful bind: a connect alone could reach
            // another process that took the port first.
            let (tx, listening) = mpsc::channel();
            let mut tx = Some(tx);
            forward_lines(String::new(), proc.stderr(), move |line| {
                if line.contains(r#""msg":"listening on "#) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                if !line.contains(r#""level":"info""#) {
                    eprintln!("[upstream :{port}] {line}");
                }
            });
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Some(status) = proc.exited() {
                    eprintln!("docker-registry exited ({status}); retrying on another port");
                    break;
                }
                if listening.try_recv().is_ok() {
                    assert!(
                        TcpStream::connect(addr).is_ok(),
                        "docker-registry said it listens on {addr}, but connect fails"
                    );
                    return DockerRegistry {
                        dir,
                        _seed: None,
                        storage,
                        addr,
                        tls: opts.tls.is_some(),
                        proc,
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
    pub fn seeded(mut opts: RegistryOpts, images: &[(&TestImage, &str)]) -> DockerRegistry {
        let storage = tempdir("upreg-seed");
        let storage_path = storage.path().join("data");
        {
            let mut plain = DockerRegistry::start_with(RegistryOpts {
                storage: Some(storage_path.clone()),
                ..RegistryOpts::default()
            });
            for (image, reference) in images {
                plain.push(image, reference);
            }
            plain.stop();
        }
        opts.storage = Some(storage_path);
        let mut reg = DockerRegistry::start_with(opts);
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

    /// `--default-registry HOST --upstream HOST=URL`: the daemon mirrors
    /// this registry, also for names without `ns`.
    pub fn mirror_args(&self) -> Vec<String> {
        mirror_args(&self.host_port(), &self.url())
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
        self.proc.is_running()
    }

    /// Kills the registry and waits until its port refuses connections.
    pub fn stop(&mut self) {
        self.proc.kill();
        let addr = self.addr;
        assert!(
            poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
                TcpStream::connect(addr).is_err()
            }),
            "{addr} still accepting"
        );
    }
}
