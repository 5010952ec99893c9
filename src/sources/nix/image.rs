//! Image config and manifests for Nix images. This module owns the bytes
//! that get hashed: the config blob (shared by both manifest formats) and
//! the OCI and Docker schema 2 manifests over the same layers.
//!
//! Everything is serialised from ordered structs (fields in declaration
//! order, no maps), so equal inputs give equal bytes and digests on every
//! machine. `created` comes from the inputs too: the package set's commit
//! time when the source is a git commit or a flake, else [`FORMAT_DATE`].

use serde::Serialize;

use crate::oci::digest::Digest;
use crate::oci::manifest::{DOCKER_MANIFEST, OCI_MANIFEST};
use crate::sources::nix::layers::{LayerInfo, CA_BUNDLE};
use crate::util::time::rfc3339;

pub(crate) const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub(crate) const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// `created` when the package set has no date of its own (a path, a
/// channel, `<nixpkgs>`): the day this image format was defined, 2026-12-02.
/// Not the build time, which would differ between machines, and not the
/// store's 1970, which clients show as "56 years ago".
pub(crate) const FORMAT_DATE: u64 = 1_796_169_600;
/// The `PATH` of Nix images: the customisation layer links `/bin` etc.
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("no OCI platform for Nix system {0:?}")]
    UnknownSystem(String),
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// An OCI platform (`architecture`, `os`, `variant`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Platform {
    pub(crate) architecture: String,
    pub(crate) os: String,
    pub(crate) variant: Option<String>,
}

impl Platform {
    /// The platform of a Nix system string (`x86_64-linux` → `linux/amd64`).
    pub(crate) fn from_nix_system(system: &str) -> Result<Platform, ImageError> {
        let (arch, variant) = match system.split_once('-').map(|(a, _)| a) {
            Some("x86_64") => ("amd64", None),
            Some("aarch64") => ("arm64", Some("v8")),
            Some("i686") => ("386", None),
            Some("armv7l") => ("arm", Some("v7")),
            Some("armv6l") => ("arm", Some("v6")),
            Some("riscv64") => ("riscv64", None),
            Some("powerpc64le") => ("ppc64le", None),
            Some("s390x") => ("s390x", None),
            _ => return Err(ImageError::UnknownSystem(system.to_owned())),
        };
        let os = match system.split_once('-').map(|(_, o)| o) {
            Some("linux") => "linux",
            _ => return Err(ImageError::UnknownSystem(system.to_owned())),
        };
        Ok(Platform {
            architecture: arch.to_owned(),
            os: os.to_owned(),
            variant: variant.map(str::to_owned),
        })
    }
}

/// One layer of an image, bottom first, with its history line.
#[derive(Debug, Clone)]
pub(crate) struct ImageLayer {
    pub(crate) info: LayerInfo,
    /// The history entry's `created_by` (what produced this layer).
    pub(crate) created_by: String,
}

/// What goes into an image's config.
#[derive(Debug, Clone)]
pub(crate) struct ImageSpec {
    pub(crate) platform: Platform,
    pub(crate) env: Vec<String>,
    pub(crate) cmd: Option<Vec<String>>,
    /// Bottom first; the customisation layer last.
    pub(crate) layers: Vec<ImageLayer>,
    /// `created` of the config and of every history entry, in seconds since
    /// the epoch.
    pub(crate) created: u64,
}

/// The `Env` of a Nix image: `PATH`, and `SSL_CERT_FILE` when the image
/// has the CA bundle.
pub(crate) fn default_env(ca_bundle: bool) -> Vec<String> {
    let mut env = vec![format!("PATH={DEFAULT_PATH}")];
    if ca_bundle {
        env.push(format!("SSL_CERT_FILE=/{CA_BUNDLE}"));
    }
    env
}

/// A short `created_by` for a store-path layer: its package names.
pub(crate) fn describe_paths<S: AsRef<str>>(paths: &[S]) -> String {
    const MAX: usize = 200;
    let mut out = String::from("nix store paths:");
    for (i, p) in paths.iter().enumerate() {
        let name = crate::sources::nix::layers::package_name(p.as_ref());
        if out.len() + name.len() + 1 > MAX {
            out.push_str(&format!(" (+{} more)", paths.len() - i));
            break;
        }
        out.push(' ');
        out.push_str(name);
    }
    out
}

/// The config blob and both manifests, with their digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageManifests {
    pub(crate) config: Vec<u8>,
    pub(crate) config_digest: Digest,
    /// `application/vnd.oci.image.manifest.v1+json`
    pub(crate) oci: Vec<u8>,
    pub(crate) oci_digest: Digest,
    /// `application/vnd.docker.distribution.manifest.v2+json`
    pub(crate) docker: Vec<u8>,
    pub(crate) docker_digest: Digest,
}

// --- Serialised shapes (field order is the JSON order) ---------------------

#[derive(Serialize)]
struct Config<'a> {
    created: &'a str,
    architecture: &'a str,
    os: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
    config: RunConfig<'a>,
    rootfs: RootFs<'a>,
    history: Vec<History<'a>>,
}

#[derive(Serialize)]
struct RunConfig<'a> {
    #[serde(rename = "Env")]
    env: &'a [String],
    #[serde(rename = "Cmd", skip_serializing_if = "Option::is_none")]
    cmd: Option<&'a [String]>,
}

#[derive(Serialize)]
struct RootFs<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<&'a Digest>,
}

#[derive(Serialize)]
struct History<'a> {
    created: &'a str,
    created_by: &'a str,
}

#[derive(Serialize)]
struct Manifest<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    config: Descriptor<'a>,
    layers: Vec<Descriptor<'a>>,
}

#[derive(Serialize)]
struct Descriptor<'a> {
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    digest: &'a Digest,
    size: u64,
}

/// Serialises the config and both manifests for `spec`.
pub(crate) fn build_manifests(spec: &ImageSpec) -> Result<ImageManifests, ImageError> {
    let created = rfc3339(spec.created);
    let config = serde_json::to_vec(&Config {
        created: &created,
        architecture: &spec.platform.architecture,
        os: &spec.platform.os,
        variant: spec.platform.variant.as_deref(),
        config: RunConfig {
            env: &spec.env,
            cmd: spec.cmd.as_deref(),
        },
        rootfs: RootFs {
            kind: "layers",
            diff_ids: spec.layers.iter().map(|l| &l.info.diff_id).collect(),
        },
        history: spec
            .layers
            .iter()
            .map(|l| History {
                created: &created,
                created_by: &l.created_by,
            })
            .collect(),
    })?;
    let config_digest = Digest::sha256_of(&config);

    let manifest = |media_type, config_type, docker: bool| {
        serde_json::to_vec(&Manifest {
            schema_version: 2,
            media_type,
            config: Descriptor {
                media_type: config_type,
                digest: &config_digest,
                size: config.len() as u64,
            },
            layers: spec
                .layers
                .iter()
                .map(|l| Descriptor {
                    media_type: if docker {
                        l.info.compression.docker_media_type()
                    } else {
                        l.info.compression.oci_media_type()
                    },
                    digest: &l.info.digest,
                    size: l.info.size,
                })
                .collect(),
        })
    };
    let oci = manifest(OCI_MANIFEST, OCI_CONFIG, false)?;
    let docker = manifest(DOCKER_MANIFEST, DOCKER_CONFIG, true)?;
    Ok(ImageManifests {
        oci_digest: Digest::sha256_of(&oci),
        docker_digest: Digest::sha256_of(&docker),
        config_digest,
        config,
        oci,
        docker,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::nix::layers::Compression;

    fn layer(n: u8, compression: Compression) -> ImageLayer {
        ImageLayer {
            info: LayerInfo {
                digest: Digest::sha256_of(&[n]),
                size: 100 + u64::from(n),
                diff_id: Digest::sha256_of(&[n, n]),
                tar_size: 1024,
                compression,
            },
            created_by: format!("layer {n}"),
        }
    }

    fn spec(compression: Compression) -> ImageSpec {
        ImageSpec {
            platform: Platform::from_nix_system("x86_64-linux").expect("platform"),
            env: default_env(true),
            cmd: Some(vec!["bash".into()]),
            layers: vec![layer(1, compression), layer(2, compression)],
            created: FORMAT_DATE,
        }
    }

    #[test]
    fn platforms_from_nix_systems() {
        let p = Platform::from_nix_system("aarch64-linux").expect("arm64");
        assert_eq!((p.architecture.as_str(), p.os.as_str()), ("arm64", "linux"));
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert!(Platform::from_nix_system("x86_64-darwin").is_err());
        assert!(Platform::from_nix_system("nonsense").is_err());
    }

    #[test]
    fn config_and_manifests_have_the_expected_shape() {
        let m = build_manifests(&spec(Compression::Gzip)).expect("manifests");
        let config = String::from_utf8(m.config.clone()).expect("utf8");
        let d1 = Digest::sha256_of(&[1, 1]);
        let d2 = Digest::sha256_of(&[2, 2]);
        assert_eq!(
            config,
            format!(
                concat!(
                    r#"{{"created":"2026-12-02T00:00:00Z","architecture":"amd64","os":"linux","#,
                    r#""config":{{"Env":["PATH={}","SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"],"Cmd":["bash"]}},"#,
                    r#""rootfs":{{"type":"layers","diff_ids":["{}","{}"]}},"#,
                    r#""history":[{{"created":"2026-12-02T00:00:00Z","created_by":"layer 1"}},"#,
                    r#"{{"created":"2026-12-02T00:00:00Z","created_by":"layer 2"}}]}}"#
                ),
                DEFAULT_PATH, d1, d2
            )
        );
        assert_eq!(m.config_digest, Digest::sha256_of(&m.config));

        let oci: serde_json::Value = serde_json::from_slice(&m.oci).expect("json");
        assert_eq!(oci["schemaVersion"], 2);
        assert_eq!(oci["mediaType"], OCI_MANIFEST);
        assert_eq!(oci["config"]["mediaType"], OCI_CONFIG);
        assert_eq!(oci["config"]["digest"], m.config_digest.to_string());
        assert_eq!(oci["config"]["size"], m.config.len());
        assert_eq!(
            oci["layers"][0]["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        assert_eq!(
            oci["layers"][1]["digest"],
            Digest::sha256_of(&[2]).to_string()
        );
        assert_eq!(oci["layers"][1]["size"], 102);

        let docker: serde_json::Value = serde_json::from_slice(&m.docker).expect("json");
        assert_eq!(docker["mediaType"], DOCKER_MANIFEST);
        assert_eq!(docker["config"]["mediaType"], DOCKER_CONFIG);
        assert_eq!(docker["config"]["digest"], m.config_digest.to_string());
        assert_eq!(
            docker["layers"][0]["mediaType"],
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        );
        assert_eq!(m.oci_digest, Digest::sha256_of(&m.oci));
        assert_eq!(m.docker_digest, Digest::sha256_of(&m.docker));
        assert_ne!(m.oci_digest, m.docker_digest);
    }

    #[test]
    fn manifests_are_deterministic_and_follow_compression() {
        let a = build_manifests(&spec(Compression::Zstd)).expect("manifests");
        let b = build_manifests(&spec(Compression::Zstd)).expect("manifests");
        assert_eq!(a, b);
        let oci: serde_json::Value = serde_json::from_slice(&a.oci).expect("json");
        assert_eq!(
            oci["layers"][0]["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
        let mut no_cmd = spec(Compression::None);
        no_cmd.cmd = None;
        no_cmd.env = default_env(false);
        let c = build_manifests(&no_cmd).expect("manifests");
        let config = String::from_utf8(c.config).expect("utf8");
        assert!(
            !config.contains("Cmd") && !config.contains("SSL_CERT_FILE"),
            "{config}"
        );
    }

    #[test]
    fn describes_layers_by_package_name() {
        let paths = [
            "/nix/store/00000000000000000000000000000000-hello-1.0",
            "/nix/store/11111111111111111111111111111111-busybox",
        ];
        assert_eq!(describe_paths(&paths), "nix store paths: hello-1.0 busybox");
        let many: Vec<String> = (0..100)
            .map(|i| format!("/nix/store/00000000000000000000000000000000-package-{i}"))
            .collect();
        let d = describe_paths(&many);
        assert!(d.len() < 220 && d.ends_with("more)"), "{d}");
    }
}
