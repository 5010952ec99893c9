//! Credentials and trust for upstream registries: an openssl CA and server
//! certificate ([`tls_pki`]), an htpasswd file, a Docker `config.json`, and
//! a token server for distribution's `auth: token` ([`TokenIssuer`]: RS256
//! JWTs signed with `openssl dgst`, a key the test generates).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use super::{assert_success, output_timeout, require, FakeUpstream, Reply, Req, TokenAuth};

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

/// `openssl req -x509` in `dir`: a new key (`-newkey NEWKEY…`) and a
/// self-signed certificate for `subject`, valid 2 days, as (key, cert)
/// files; `extra` goes last.
fn self_signed(
    dir: &Path,
    newkey: &[&str],
    (key, cert): (&str, &str),
    subject: &str,
    extra: &[&str],
) {
    let mut args = vec!["req", "-x509", "-newkey"];
    args.extend_from_slice(newkey);
    args.extend([
        "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", subject,
    ]);
    args.extend_from_slice(extra);
    openssl(dir, &args);
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
    self_signed(
        dir,
        &["ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
        ("ca.key", "ca.pem"),
        "/CN=nixery-local test CA",
        &[
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
    require("htpasswd");
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
        self_signed(
            dir,
            &["rsa:2048"],
            ("token.key", "token.pem"),
            "/CN=nixery-local test token issuer",
            &[],
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
