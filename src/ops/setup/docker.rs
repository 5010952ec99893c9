//! Docker's `daemon.json`: our URL first in `registry-mirrors`, merged into
//! whatever else the file holds (it has no room for a marker, so it is
//! backed up before each change rather than owned).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::{
    client_address, read_existing, Common, PlannedFile, Registries, SetupError, NIX_NAMESPACE,
};

#[derive(Clone, Debug, clap::Args)]
pub struct DockerArgs {
    /// Docker's daemon config, where `registry-mirrors` goes.
    #[arg(long, value_name = "FILE", default_value = "/etc/docker/daemon.json")]
    pub(crate) daemon_json: PathBuf,
    /// Where Docker with the containerd image store reads `hosts.toml`.
    #[arg(long, value_name = "DIR", default_value = "/etc/docker/certs.d")]
    pub(crate) certs_dir: PathBuf,
    #[command(flatten)]
    pub(crate) registries: Registries,
    #[command(flatten)]
    pub(crate) common: Common,
}

/// daemon.json with our URL first in `registry-mirrors` and every other key
/// kept. The file has no room for a marker, so it is always merged into.
pub(super) fn docker_daemon_json(path: &Path, url: &str) -> Result<PlannedFile, SetupError> {
    let existing = read_existing(path)?;
    let mut doc = match &existing {
        None => serde_json::Map::new(),
        Some(bytes) => match serde_json::from_slice::<serde_json::Value>(bytes) {
            Ok(serde_json::Value::Object(map)) => map,
            Ok(_) => {
                return Err(SetupError::Json {
                    path: path.to_owned(),
                    message: "the top level is not an object".into(),
                })
            }
            Err(e) => {
                return Err(SetupError::Json {
                    path: path.to_owned(),
                    message: e.to_string(),
                })
            }
        },
    };
    let mirrors = doc
        .entry("registry-mirrors")
        .or_insert_with(|| serde_json::Value::Array(Vec::new()));
    let serde_json::Value::Array(list) = mirrors else {
        return Err(SetupError::MirrorsShape {
            path: path.to_owned(),
        });
    };
    let mut present = false;
    for entry in list.iter() {
        let Some(s) = entry.as_str() else {
            return Err(SetupError::MirrorsShape {
                path: path.to_owned(),
            });
        };
        present |= s.trim_end_matches('/') == url;
    }
    if present {
        // Unchanged, byte for byte, however it was formatted.
        if let Some(bytes) = existing {
            return Ok(PlannedFile::merged(path, bytes));
        }
    }
    list.insert(0, serde_json::Value::String(url.to_owned()));
    let mut text = serde_json::to_string_pretty(&serde_json::Value::Object(doc)).map_err(|e| {
        SetupError::Json {
            path: path.to_owned(),
            message: e.to_string(),
        }
    })?;
    text.push('\n');
    Ok(PlannedFile::merged(path, text.into_bytes()))
}

pub(super) fn docker_next(listen: SocketAddr) -> String {
    let addr = client_address(listen);
    format!(
        "Restart Docker to load daemon.json: sudo systemctl restart docker\n\
         registry-mirrors covers docker.io only; pull Nix images by address: docker pull {addr}/{NIX_NAMESPACE}/hello\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_json_is_merged() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("daemon.json");
        let url = "http://127.0.0.1:7733";
        let fresh = docker_daemon_json(&path, url).expect("plan");
        let v: serde_json::Value = serde_json::from_slice(&fresh.content).expect("json");
        assert_eq!(v, serde_json::json!({"registry-mirrors": [url]}));

        std::fs::write(
            &path,
            r#"{"log-driver": "journald", "registry-mirrors": ["https://m.example"]}"#,
        )
        .expect("write");
        let merged = docker_daemon_json(&path, url).expect("plan");
        let v: serde_json::Value = serde_json::from_slice(&merged.content).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"log-driver": "journald", "registry-mirrors": [url, "https://m.example"]})
        );
        std::fs::write(&path, &merged.content).expect("write");
        let again = docker_daemon_json(&path, url).expect("plan");
        assert_eq!(again.content, merged.content);

        std::fs::write(&path, "[1]").expect("write");
        assert!(matches!(
            docker_daemon_json(&path, url),
            Err(SetupError::Json { .. })
        ));
        std::fs::write(&path, r#"{"registry-mirrors": "x"}"#).expect("write");
        assert!(matches!(
            docker_daemon_json(&path, url),
            Err(SetupError::MirrorsShape { .. })
        ));
    }
}
