//! Test images as OCI image layouts on disk ([`TestImage`]): a busybox
//! image echoing a message (OCI or Docker media types), a multi-platform
//! index, a large pseudo-random layer, and a two-layer image with whiteouts
//! and hostile symlinks; plus the media types they and the tests name.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use flate2::write::GzEncoder;
use flate2::Compression;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use super::sha256_digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// containerd's Accept header for manifests (every type it understands).
pub const ACCEPT_MANIFESTS: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*";

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
        tar_gz(
            &[
                TarItem::Dir("bin/"),
                TarItem::Exec("bin/busybox", &busybox),
                TarItem::Link("bin/sh", "busybox"),
                TarItem::Link("bin/echo", "busybox"),
            ],
            0,
            6,
        )
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

/// What [`layered_layout`] puts in its image (final, merged view).
pub const LAYERED_PASSWD: &str = "root:x:0:0:image root:/root:/bin/sh\n";
pub const LAYERED_HOSTNAME: &str = "image-hostname-not-the-hosts\n";
pub const LAYERED_INDEX_HTML: &str =
    "<!DOCTYPE html><html><head><base href=\"BASE_URL\"></head><body>app at BASE_URL</body></html>\n";

/// One tar entry for [`tar_layer`].
pub enum TarItem<'a> {
    Dir(&'a str),
    /// A regular file, mode 0644.
    File(&'a str, &'a [u8]),
    /// A regular file, mode 0755.
    Exec(&'a str, &'a [u8]),
    Link(&'a str, &'a str),
}

/// A gzipped tar layer of `items` (mtime 1_700_000_000); returns (blob, diff_id).
pub fn tar_layer(items: &[TarItem]) -> (Vec<u8>, String) {
    tar_gz(items, 1_700_000_000, 1)
}

/// `items` as a tar owned by root with every mtime `mtime`, gzipped at
/// `level`; returns (blob, diff_id).
fn tar_gz(items: &[TarItem], mtime: u64, level: u32) -> (Vec<u8>, String) {
    let mut b = tar::Builder::new(Vec::new());
    for item in items {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        match item {
            TarItem::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, io::empty()).unwrap();
            }
            TarItem::File(p, data) | TarItem::Exec(p, data) => {
                let mode = if matches!(item, TarItem::Exec(..)) {
                    0o755
                } else {
                    0o644
                };
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(mode);
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
    let mut gz = GzEncoder::new(Vec::new(), Compression::new(level));
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
