//! Who the daemon is upstream: credentials (flags, config file, Docker's
//! `config.json`), the `WWW-Authenticate` challenge, and which
//! `Authorization` header a request starts with (a cached Bearer token, or
//! Basic for hosts that asked for it).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use base64::Engine as _;
use http::header::HeaderValue;

use super::Upstreams;
use crate::oci::reference::{RegistryHost, DOCKER_HUB};

/// A registry login. Debug output never shows the password.
#[derive(Clone)]
pub(crate) struct Credential {
    pub(crate) username: String,
    pub(crate) password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}, <redacted>)", self.username)
    }
}

impl Credential {
    pub(super) fn basic(&self) -> HeaderValue {
        let raw = format!("{}:{}", self.username, self.password);
        let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
        let mut v = HeaderValue::from_str(&format!("Basic {encoded}"))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        v.set_sensitive(true);
        v
    }
}

/// Docker's credential store: `$DOCKER_CONFIG/config.json` or
/// `~/.docker/config.json`, `auths.<registry>.auth` = base64 `user:pass`.
/// Credential helpers (`credsStore`) are not run.
pub(crate) fn docker_config_credentials() -> Vec<(RegistryHost, Credential)> {
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
pub(super) fn parse_challenge(value: &str) -> (String, HashMap<String, String>) {
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
    pub(super) fn auth_header(&self, host: &RegistryHost, scope: &str) -> Option<HeaderValue> {
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
    fn credentials_are_not_printed() {
        let c = Credential {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
