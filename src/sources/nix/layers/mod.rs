//! Turning Nix store paths into image layers. This module owns:
//!
//! - grouping a runtime closure into at most `budget − 1` store-path layers
//!   ([`group_layers`]): one layer per path while the closure fits, so
//!   images share layers; otherwise Nixery's dominator-tree grouping weighted
//!   by popularity × size;
//! - popularity data ([`Popularity`]): Nixery's JSON format, plus what is
//!   learnt from closures this daemon has seen;
//! - the deterministic layer tarball writer ([`write_layer`],
//!   [`LayerWriter`]), streaming from `/nix/store` through the compressor
//!   while hashing both the compressed blob (digest) and the tar (diff_id);
//! - the customisation layer ([`write_customisation_layer`]): `/bin`,
//!   `/lib`, `/etc` … merged from the requested packages as symlinks, `/tmp`,
//!   `/usr/bin/env` and the CA bundle.
//!
//! Tarballs depend only on store contents and these settings: entries in
//! byte order of their paths (directories before their contents), mtime 1
//! (like the store), uid/gid 0 and no names, modes reduced to what a NAR
//! records (executable or not), symlinks never followed, hard links written
//! as files. gzip is zlib-rs at level 6 with a zero mtime and no file name;
//! zstd is level 3 on one thread.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use petgraph::algo::dominators;
use petgraph::graph::{DiGraph, NodeIndex};
use serde::{Deserialize, Serialize};

use crate::oci::digest::{Algorithm, Digest, Hasher};
use crate::sources::nix::runner::ClosureGraph;

/// Where store paths live, and their prefix inside layer tarballs.
pub const STORE_DIR: &str = "/nix/store";
/// The mtime of every entry: Nix's own for store contents.
pub const MTIME: u64 = 1;
/// Read buffer per file.
const READ_CHUNK: usize = 256 << 10;
/// gzip level: with the zlib-rs backend, part of the layer digests.
pub const GZIP_LEVEL: u32 = 6;
/// zstd level: part of the layer digests.
pub const ZSTD_LEVEL: i32 = 3;

// ---------------------------------------------------------------------------
// Compression and layer descriptors
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Gzip,
    Zstd,
    None,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::None => "none",
        }
    }

    /// The layer media type in an OCI manifest.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
        }
    }

    /// The layer media type in a Docker schema 2 manifest. zstd has no
    /// official Docker type; containerd and Docker ≥ 23 accept this one.
    pub fn docker_media_type(self) -> &'static str {
        match self {
            Compression::Gzip => "application/vnd.docker.image.rootfs.diff.tar.gzip",
            Compression::Zstd => "application/vnd.docker.image.rootfs.diff.tar.zstd",
            Compression::None => "application/vnd.docker.image.rootfs.diff.tar",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown layer compression {0:?} (gzip, zstd, none)")]
pub struct UnknownCompression(String);

impl FromStr for Compression {
    type Err = UnknownCompression;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            "none" => Ok(Compression::None),
            _ => Err(UnknownCompression(s.to_owned())),
        }
    }
}

/// What a written layer is: the blob (compressed) and its diff_id (the
/// sha256 of the uncompressed tar).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// Digest of the blob as written to the sink.
    pub digest: Digest,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids`).
    pub diff_id: Digest,
    /// Size of the uncompressed tar.
    pub tar_size: u64,
    pub compression: Compression,
}

impl LayerInfo {
    /// The OCI layer media type.
    pub fn media_type(&self) -> &'static str {
        self.compression.oci_media_type()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing the layer: {0}")]
    Write(#[source] io::Error),
    #[error("{0} is not a path in {STORE_DIR}")]
    NotInStore(PathBuf),
    #[error("{0}: not a regular file, directory or symlink (cannot be in the Nix store)")]
    UnsupportedFileType(PathBuf),
    #[error("layer budget {0} is too small: one layer is the customisation layer, so at least 2")]
    BudgetTooSmall(usize),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> LayerError + '_ {
    move |source| LayerError::Io {
        path: path.to_owned(),
        source,
    }
}

// ---------------------------------------------------------------------------
// Hashing and compression plumbing
// ---------------------------------------------------------------------------

/// Counts and (unless told not to) hashes everything written through it.
struct HashWriter<W> {
    inner: W,
    hasher: Option<Hasher>,
    count: u64,
}

impl<W: Write> HashWriter<W> {
    fn new(inner: W, hash: bool) -> Self {
        HashWriter {
            inner,
            hasher: hash.then(|| Hasher::new(Algorithm::Sha256)),
            count: 0,
        }
    }

    fn finish(self) -> (W, Option<Digest>, u64) {
        (self.inner, self.hasher.map(Hasher::finish), self.count)
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Encoder<W: Write> {
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    None(W),
}

impl<W: Write> Encoder<W> {
    fn new(inner: W, compression: Compression) -> io::Result<Self> {
        Ok(match compression {
            // Explicit header fields: no mtime, no name, OS "unknown", so
            // the blob depends on the content only.
            Compression::Gzip => Encoder::Gzip(
                flate2::GzBuilder::new()
                    .mtime(0)
                    .operating_system(255)
                    .write(inner, flate2::Compression::new(GZIP_LEVEL)),
            ),
            Compression::Zstd => {
                let mut enc = zstd::stream::write::Encoder::new(inner, ZSTD_LEVEL)?;
                enc.include_checksum(false)?;
                enc.include_contentsize(false)?;
                Encoder::Zstd(enc)
            }
            Compression::None => Encoder::None(inner),
        })
    }

    fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
            Encoder::None(mut w) => {
                w.flush()?;
                Ok(w)
            }
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
            Encoder::None(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
            Encoder::None(w) => w.flush(),
        }
    }
}

// ---------------------------------------------------------------------------
// The tar writer
// ---------------------------------------------------------------------------

type Sink<W> = HashWriter<Encoder<HashWriter<W>>>;

/// A deterministic layer tarball being written to `W`.
pub struct LayerWriter<W: Write> {
    tar: tar::Builder<Sink<W>>,
    compression: Compression,
    /// File read buffer.
    buf: Vec<u8>,
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    // GNU headers: long paths and link targets become GNU long-name
    // entries; user and group names stay empty.
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h.set_size(size);
    h
}

/// `tar_path` with a trailing slash, as tar writes directory names.
fn dir_name(tar_path: &Path) -> PathBuf {
    let mut s = tar_path.as_os_str().to_owned();
    s.push("/");
    PathBuf::from(s)
}

impl<W: Write> LayerWriter<W> {
    pub fn new(out: W, compression: Compression) -> Result<Self, LayerError> {
        // Uncompressed, blob and tar are the same bytes: hash them once.
        let hash_blob = compression != Compression::None;
        let encoder = Encoder::new(HashWriter::new(out, hash_blob), compression)
            .map_err(LayerError::Write)?;
        Ok(LayerWriter {
            tar: tar::Builder::new(HashWriter::new(encoder, true)),
            compression,
            buf: vec![0; READ_CHUNK],
        })
    }

    /// Adds a directory entry (no contents).
    pub fn add_dir(&mut self, tar_path: &Path, mode: u32) -> Result<(), LayerError> {
        let mut h = header(tar::EntryType::Directory, mode, 0);
        self.tar
            .append_data(&mut h, dir_name(tar_path), io::empty())
            .map_err(io_at(tar_path))
    }

    /// Adds a symlink entry.
    pub fn add_symlink(&mut self, tar_path: &Path, target: &Path) -> Result<(), LayerError> {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        self.tar
            .append_link(&mut h, tar_path, target)
            .map_err(io_at(tar_path))
    }

    /// Adds a regular file entry with in-memory contents.
    pub fn add_file(&mut self, tar_path: &Path, mode: u32, data: &[u8]) -> Result<(), LayerError> {
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
        self.tar
            .append_data(&mut h, tar_path, data)
            .map_err(io_at(tar_path))
    }

    /// Adds `fs_path` (file, symlink or directory tree) as `tar_path`,
    /// walking directories in byte order of names, depth first, without
    /// following symlinks. Files are streamed in 256 KiB reads.
    pub fn add_tree(&mut self, fs_path: &Path, tar_path: &Path) -> Result<(), LayerError> {
        struct Frame {
            fs: PathBuf,
            tar: PathBuf,
            // Reverse order, so `pop` yields the smallest name.
            names: Vec<OsString>,
        }
        let mut stack = Vec::new();
        if self.add_entry(fs_path, tar_path)? {
            stack.push(Frame {
                fs: fs_path.to_owned(),
                tar: tar_path.to_owned(),
                names: sorted_names_desc(fs_path)?,
            });
        }
        while let Some(frame) = stack.last_mut() {
            let Some(name) = frame.names.pop() else {
                stack.pop();
                continue;
            };
            let fs = frame.fs.join(&name);
            let tar = frame.tar.join(&name);
            if self.add_entry(&fs, &tar)? {
                let names = sorted_names_desc(&fs)?;
                stack.push(Frame { fs, tar, names });
            }
        }
        Ok(())
    }

    /// Adds one entry; returns whether it is a directory to descend into.
    fn add_entry(&mut self, fs_path: &Path, tar_path: &Path) -> Result<bool, LayerError> {
        let meta = fs::symlink_metadata(fs_path).map_err(io_at(fs_path))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(fs_path).map_err(io_at(fs_path))?;
            self.add_symlink(tar_path, &target)?;
            Ok(false)
        } else if ft.is_dir() {
            self.add_dir(tar_path, 0o555)?;
            Ok(true)
        } else if ft.is_file() {
            // A NAR records only "executable or not": so do we.
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o555
            } else {
                0o444
            };
            let size = meta.len();
            let mut file = fs::File::open(fs_path).map_err(io_at(fs_path))?;
            let mut h = header(tar::EntryType::Regular, mode, size);
            // The tar crate writes the header (and any long-name entry);
            // the data goes straight to the sink in big chunks, because
            // its own copy loop feeds the compressor 8 KiB at a time.
            self.tar
                .append_data(&mut h, tar_path, io::empty())
                .map_err(io_at(fs_path))?;
            let sink = self.tar.get_mut();
            let mut remaining = size;
            while remaining > 0 {
                let want = self
                    .buf
                    .len()
                    .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                let n = match file.read(&mut self.buf[..want]) {
                    Ok(0) => {
                        return Err(LayerError::Io {
                            path: fs_path.to_owned(),
                            source: io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "file shrank while being archived",
                            ),
                        })
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(io_at(fs_path)(e)),
                };
                sink.write_all(&self.buf[..n]).map_err(LayerError::Write)?;
                remaining -= n as u64;
            }
            let pad = (512 - size % 512) % 512;
            sink.write_all(&[0u8; 512][..pad as usize])
                .map_err(LayerError::Write)?;
            Ok(false)
        } else {
            Err(LayerError::UnsupportedFileType(fs_path.to_owned()))
        }
    }

    /// Ends the archive and the compressed stream; returns the layer's
    /// digests and the sink.
    pub fn finish(self) -> Result<(LayerInfo, W), LayerError> {
        let sink = self.tar.into_inner().map_err(LayerError::Write)?;
        let (encoder, diff_id, tar_size) = sink.finish();
        let diff_id = diff_id.unwrap_or_else(|| Digest::sha256_of(b""));
        let inner = encoder.finish().map_err(LayerError::Write)?;
        let (mut out, digest, size) = inner.finish();
        let digest = digest.unwrap_or_else(|| diff_id.clone());
        out.flush().map_err(LayerError::Write)?;
        Ok((
            LayerInfo {
                digest,
                size,
                diff_id,
                tar_size,
                compression: self.compression,
            },
            out,
        ))
    }
}

fn sorted_names_desc(dir: &Path) -> Result<Vec<OsString>, LayerError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_at(dir))? {
        names.push(entry.map_err(io_at(dir))?.file_name());
    }
    names.sort_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
    Ok(names)
}

/// The tar path of a store path: `/nix/store/x` → `nix/store/x`.
fn store_tar_path(path: &Path) -> Result<PathBuf, LayerError> {
    let rel = path
        .strip_prefix(STORE_DIR)
        .map_err(|_| LayerError::NotInStore(path.to_owned()))?;
    let mut comps = rel.components();
    match (comps.next(), comps.next()) {
        (Some(std::path::Component::Normal(_)), None) => {}
        _ => return Err(LayerError::NotInStore(path.to_owned())),
    }
    Ok(Path::new(&STORE_DIR[1..]).join(rel))
}

/// Writes one store-path layer: `nix/`, `nix/store/`, then each path (in
/// byte order, whatever order `paths` has) with all its contents, streamed
/// from the store through the compressor into `out`. Pass `&mut sink` to
/// keep using the sink afterwards.
pub fn write_layer<W: Write>(
    paths: &[PathBuf],
    compression: Compression,
    out: W,
) -> Result<LayerInfo, LayerError> {
    let mut sorted: Vec<(&PathBuf, PathBuf)> = paths
        .iter()
        .map(|p| store_tar_path(p).map(|t| (p, t)))
        .collect::<Result<_, _>>()?;
    sorted.sort_by(|a, b| a.1.as_os_str().as_bytes().cmp(b.1.as_os_str().as_bytes()));
    sorted.dedup_by(|a, b| a.1 == b.1);

    let mut w = LayerWriter::new(out, compression)?;
    w.add_dir(Path::new("nix"), 0o755)?;
    w.add_dir(Path::new("nix/store"), 0o755)?;
    for (fs_path, tar_path) in &sorted {
        w.add_tree(fs_path, tar_path)?;
    }
    w.finish().map(|(info, _)| info)
}

// ---------------------------------------------------------------------------
// Popularity
// ---------------------------------------------------------------------------

/// A store path counts as popular (its own layer candidate) from this many
/// referrers on (Nixery's threshold).
pub const POPULAR_THRESHOLD: u64 = 100;
/// A store path whose closure is bigger than this is a layer candidate of
/// its own (Nixery's threshold).
pub const BIG_CLOSURE: u64 = 100_000_000;
/// Nixery gives these to every image and rates them above glibc.
const ALWAYS_POPULAR: [&str; 2] = ["nss-cacert", "iana-etc"];
const ALWAYS_POPULAR_COUNT: u64 = 500_000;

/// How many store paths reference each package: keys are store path names
/// without the hash (`glibc-2.37-8`, Nixery's popcount format) or full base
/// names (`<hash>-glibc-2.37-8`), values reference counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Popularity(BTreeMap<String, u64>);

/// `/nix/store/<hash>-<name>` → `<hash>-<name>`.
fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// `/nix/store/<hash>-<name>` → `<name>` (what Nixery's popcount keys on).
pub fn package_name(path: &str) -> &str {
    let base = base_name(path);
    match base.split_once('-') {
        Some((hash, name)) if hash.len() == 32 => name,
        _ => base,
    }
}

impl Popularity {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses Nixery's popularity JSON: `{ "<name>": <count>, … }`. Counts
    /// may be floats (rounded); negative or non-numeric values are errors.
    pub fn from_nixery_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let raw: BTreeMap<String, serde_json::Value> = serde_json::from_slice(bytes)?;
        let mut out = BTreeMap::new();
        for (name, value) in raw {
            let count = value
                .as_u64()
                .or_else(|| {
                    value
                        .as_f64()
                        .filter(|f| *f >= 0.0)
                        .map(|f| f.round() as u64)
                })
                .ok_or_else(|| {
                    serde::de::Error::custom(format!("popularity of {name:?} is not a count"))
                })?;
            out.insert(name, count);
        }
        Ok(Popularity(out))
    }

    /// The same JSON format, keys sorted.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.0).unwrap_or_default()
    }

    pub fn insert(&mut self, key: impl Into<String>, count: u64) {
        self.0.insert(key.into(), count);
    }

    /// The count for a store path: by full base name, else by package name.
    pub fn get(&self, store_path: &str) -> Option<u64> {
        self.0
            .get(base_name(store_path))
            .or_else(|| self.0.get(package_name(store_path)))
            .copied()
    }

    /// Adds the reference counts seen in one closure (how many paths of
    /// it reference each path): call it for every image built, or for the
    /// whole local store's graph.
    pub fn learn(&mut self, closure: &ClosureGraph) {
        for info in closure.paths.values() {
            for r in &info.references {
                *self.0.entry(package_name(r).to_owned()).or_default() += 1;
            }
        }
    }

    /// Adds another data set's counts to these.
    pub fn merge(&mut self, other: &Popularity) {
        for (k, v) in &other.0 {
            let e = self.0.entry(k.clone()).or_default();
            *e = e.saturating_add(*v);
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<HashMap<String, u64>> for Popularity {
    fn from(map: HashMap<String, u64>) -> Self {
        Popularity(map.into_iter().collect())
    }
}

// ---------------------------------------------------------------------------
// Grouping
// ---------------------------------------------------------------------------

/// The store paths of one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerGroup {
    /// Sorted store paths.
    pub paths: Vec<String>,
    /// Sum of their NAR sizes.
    pub size: u64,
}

impl LayerGroup {
    /// The layer's identity: sha256 of its sorted store paths, one per line.
    /// With the compression setting, it decides the layer's bytes.
    pub fn id(&self) -> Digest {
        let mut h = Hasher::new(Algorithm::Sha256);
        for p in &self.paths {
            h.update(p.as_bytes());
            h.update(b"\n");
        }
        h.finish()
    }

    pub fn path_bufs(&self) -> Vec<PathBuf> {
        self.paths.iter().map(PathBuf::from).collect()
    }
}

/// A group during grouping: nodes are indexes into the sorted path list.
struct Group {
    head: usize,
    members: Vec<usize>,
    size: u64,
    rating: u128,
}

/// Splits `closure` into at most `budget − 1` store-path layers (the
/// customisation layer takes the last slot), in a deterministic order:
/// by their earliest path in a dependencies-first topological order of the
/// closure, ties broken by path.
///
/// - While the closure has at most `budget − 1` paths, every path is its own
///   layer, so images with overlapping closures share layers exactly.
/// - Otherwise (Nixery's algorithm): a fake root gets edges to the requested
///   outputs and to every path that is popular (≥ [`POPULAR_THRESHOLD`]
///   referrers) or whose closure exceeds [`BIG_CLOSURE`]; each child of the
///   root in the dominator tree, with everything it dominates, is a group.
///   Unlike Nixery, leftover budget is then spent splitting off the largest
///   dominator subtrees inside groups as groups of their own (so big shared
///   dependencies get layers of their own); if there are still too many
///   groups, the two lowest rated (popularity of the head × size) are
///   merged until they fit.
pub fn group_layers(
    closure: &ClosureGraph,
    popularity: &Popularity,
    budget: usize,
) -> Result<Vec<LayerGroup>, LayerError> {
    if budget < 2 {
        return Err(LayerError::BudgetTooSmall(budget));
    }
    let max_layers = budget - 1;
    let names: Vec<&str> = closure.paths.keys().map(String::as_str).collect();
    let n = names.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, p)| (*p, i)).collect();
    let refs: Vec<Vec<usize>> = names
        .iter()
        .map(|p| {
            let mut r: Vec<usize> = closure.paths[*p]
                .references
                .iter()
                .filter_map(|r| index.get(r.as_str()).copied())
                .collect();
            r.sort_unstable();
            r.dedup();
            r
        })
        .collect();
    let sizes: Vec<u64> = names.iter().map(|p| closure.paths[*p].nar_size).collect();
    let topo = topological_positions(&refs);

    let groups: Vec<Vec<usize>> = if n <= max_layers {
        (0..n).map(|i| vec![i]).collect()
    } else {
        dominator_groups(
            closure, &names, &index, &refs, &sizes, popularity, max_layers,
        )
    };

    let mut out: Vec<(usize, LayerGroup)> = groups
        .into_iter()
        .map(|members| {
            let first = members.iter().map(|&i| topo[i]).min().unwrap_or(usize::MAX);
            let mut paths: Vec<String> = members.iter().map(|&i| names[i].to_owned()).collect();
            paths.sort();
            let size = members.iter().map(|&i| sizes[i]).sum();
            (first, LayerGroup { paths, size })
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.paths.cmp(&b.1.paths)));
    Ok(out.into_iter().map(|(_, g)| g).collect())
}

/// Position of each node in a dependencies-first topological order, ties
/// broken by index (= path order). Cycles (which Nix does not produce) are
/// broken at the smallest remaining node.
fn topological_positions(refs: &[Vec<usize>]) -> Vec<usize> {
    let n = refs.len();
    let mut pending: Vec<usize> = refs.iter().map(Vec::len).collect();
    let mut referrers = vec![Vec::new(); n];
    for (i, r) in refs.iter().enumerate() {
        for &j in r {
            referrers[j].push(i);
        }
    }
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| pending[i] == 0).collect();
    let mut done = vec![false; n];
    let mut pos = vec![0; n];
    let mut next = 0;
    while next < n {
        let i = match ready.pop_first() {
            Some(i) => i,
            None => match (0..n).find(|&i| !done[i]) {
                Some(i) => i,
                None => break,
            },
        };
        if done[i] {
            continue;
        }
        done[i] = true;
        pos[i] = next;
        next += 1;
        for &r in &referrers[i] {
            pending[r] = pending[r].saturating_sub(1);
            if pending[r] == 0 && !done[r] {
                ready.insert(r);
            }
        }
    }
    pos
}

/// Whether the closure of `start` is bigger than `limit`; stops early.
fn closure_exceeds(start: usize, refs: &[Vec<usize>], sizes: &[u64], limit: u64) -> bool {
    let mut seen = vec![false; refs.len()];
    let mut stack = vec![start];
    seen[start] = true;
    let mut total = 0u64;
    while let Some(i) = stack.pop() {
        total += sizes[i];
        if total > limit {
            return true;
        }
        for &j in &refs[i] {
            if !seen[j] {
                seen[j] = true;
                stack.push(j);
            }
        }
    }
    false
}

fn dominator_groups(
    closure: &ClosureGraph,
    names: &[&str],
    index: &HashMap<&str, usize>,
    refs: &[Vec<usize>],
    sizes: &[u64],
    popularity: &Popularity,
    max_layers: usize,
) -> Vec<Vec<usize>> {
    let n = names.len();
    let pop: Vec<u64> = names
        .iter()
        .map(|p| {
            let name = package_name(p);
            if ALWAYS_POPULAR.iter().any(|a| name.starts_with(a)) {
                ALWAYS_POPULAR_COUNT
            } else {
                popularity.get(p).unwrap_or(1).max(1)
            }
        })
        .collect();

    let mut graph: DiGraph<(), ()> = DiGraph::with_capacity(n + 1, n * 4);
    let nodes: Vec<NodeIndex> = (0..=n).map(|_| graph.add_node(())).collect();
    let root = nodes[n];
    let mut has_referrer = vec![false; n];
    for (i, r) in refs.iter().enumerate() {
        for &j in r {
            graph.add_edge(nodes[i], nodes[j], ());
            has_referrer[j] = true;
        }
    }
    let mut from_root = BTreeSet::new();
    for r in &closure.roots {
        if let Some(&i) = index.get(r.as_str()) {
            from_root.insert(i);
        }
    }
    for i in 0..n {
        // Unreferenced paths must hang off the root to be grouped at all.
        if !has_referrer[i]
            || pop[i] >= POPULAR_THRESHOLD
            || closure_exceeds(i, refs, sizes, BIG_CLOSURE)
        {
            from_root.insert(i);
        }
    }
    for &i in &from_root {
        graph.add_edge(root, nodes[i], ());
    }

    let doms = dominators::simple_fast(&graph, root);
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); n + 1];
    for (i, &node) in nodes[..n].iter().enumerate() {
        match doms.immediate_dominator(node) {
            Some(d) => children[d.index()].push(i),
            // Unreachable cannot happen (see above); keep it anyway.
            None => children[n].push(i),
        }
    }
    for c in &mut children {
        c.sort_unstable();
    }
    // Size of each node's whole dominator subtree, children before parents.
    let mut order = vec![n];
    let mut k = 0;
    while k < order.len() {
        order.extend_from_slice(&children[order[k]]);
        k += 1;
    }
    let mut subtree_size = vec![0u64; n + 1];
    for &v in order.iter().rev() {
        let own = if v < n { sizes[v] } else { 0 };
        subtree_size[v] = own + children[v].iter().map(|&c| subtree_size[c]).sum::<u64>();
    }

    // A group is a head plus the whole subtrees of its `open` children.
    // Leftover budget is spent splitting off the largest open subtree as
    // a group of its own (so big shared dependencies get their own layers).
    let mut split: Vec<(usize, Vec<usize>)> = children[n]
        .iter()
        .map(|&c| (c, children[c].clone()))
        .collect();
    while split.len() < max_layers {
        let best = split
            .iter()
            .enumerate()
            .flat_map(|(gi, (_, open))| open.iter().enumerate().map(move |(oi, &c)| (gi, oi, c)))
            .max_by(|a, b| {
                subtree_size[a.2]
                    .cmp(&subtree_size[b.2])
                    .then_with(|| b.2.cmp(&a.2))
            });
        let Some((gi, oi, c)) = best else { break };
        split[gi].1.remove(oi);
        split.push((c, children[c].clone()));
    }

    let mut groups: Vec<Group> = split
        .into_iter()
        .map(|(head, open)| {
            let mut members = vec![head];
            let mut stack = open;
            while let Some(v) = stack.pop() {
                members.push(v);
                stack.extend_from_slice(&children[v]);
            }
            let size: u64 = members.iter().map(|&i| sizes[i]).sum();
            Group {
                head,
                rating: u128::from(pop[head]) * u128::from(size),
                size,
                members,
            }
        })
        .collect();

    // Over budget: merge the two lowest rated until it fits.
    let key = |g: &Group| {
        (
            g.rating,
            g.members.iter().min().copied().unwrap_or(usize::MAX),
        )
    };
    groups.sort_by_key(key);
    while groups.len() > max_layers {
        let a = groups.remove(0);
        let b = groups.remove(0);
        let mut members = a.members;
        members.extend(b.members);
        let merged = Group {
            head: a.head,
            size: a.size + b.size,
            rating: a.rating + b.rating,
            members,
        };
        let at = groups.partition_point(|g| key(g) <= key(&merged));
        groups.insert(at, merged);
    }
    groups.into_iter().map(|g| g.members).collect()
}

// ---------------------------------------------------------------------------
// The customisation layer
// ---------------------------------------------------------------------------

/// Where the CA bundle goes (and what `SSL_CERT_FILE` points at).
pub const CA_BUNDLE: &str = "etc/ssl/certs/ca-bundle.crt";

/// What went into a customisation layer, for the image config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customisation {
    /// `/etc/ssl/certs/ca-bundle.crt` exists in the image.
    pub ca_bundle: bool,
    /// What `/usr/bin/env` points at, if anything.
    pub env: Option<PathBuf>,
}

/// A node of the symlink tree: a real directory or a symlink.
enum Node {
    Dir {
        mode: u32,
        children: BTreeMap<OsString, Node>,
    },
    Link(PathBuf),
}

fn new_dir(mode: u32) -> Node {
    Node::Dir {
        mode,
        children: BTreeMap::new(),
    }
}

fn is_dir(p: &Path) -> bool {
    // Follows symlinks: a package's `bin` may itself be a link.
    fs::metadata(p).map(|m| m.is_dir()).unwrap_or(false)
}

/// Merges `src` into `children` under `name`, `buildEnv`-style: a name only
/// one package provides becomes a symlink to it; a directory several
/// provide becomes a real directory merged one level down. On a file
/// conflict the first package wins.
fn merge_into(children: &mut BTreeMap<OsString, Node>, name: OsString, src: PathBuf) {
    use std::collections::btree_map::Entry;
    match children.entry(name) {
        Entry::Vacant(v) => {
            v.insert(Node::Link(src));
        }
        Entry::Occupied(mut o) => {
            if !is_dir(&src) {
                tracing::debug!(path = %src.display(), "customisation layer: collision, first package wins");
                return;
            }
            let node = o.get_mut();
            if let Node::Link(existing) = node {
                if !is_dir(existing) {
                    tracing::debug!(path = %src.display(), "customisation layer: collision, first package wins");
                    return;
                }
                let existing = existing.clone();
                *node = expand_link(&existing);
            }
            if let Node::Dir { children, .. } = node {
                for (child, path) in dir_entries(&src) {
                    merge_into(children, child, path);
                }
            }
        }
    }
}

/// A directory node holding links to everything in `dir`.
fn expand_link(dir: &Path) -> Node {
    let mut children = BTreeMap::new();
    for (name, path) in dir_entries(dir) {
        children.insert(name, Node::Link(path));
    }
    Node::Dir {
        mode: 0o755,
        children,
    }
}

/// Entries of `dir` in byte order; unreadable directories count as empty
/// (the store is immutable, so this only happens on a broken store).
fn dir_entries(dir: &Path) -> Vec<(OsString, PathBuf)> {
    let mut out: Vec<(OsString, PathBuf)> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .map(|e| (e.file_name(), e.path()))
            .collect(),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "customisation layer: cannot list");
            Vec::new()
        }
    };
    out.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    out
}

/// Where `rel` would lead in the image: the store path behind it, if the
/// tree maps it to one.
fn resolve(root: &BTreeMap<OsString, Node>, rel: &Path) -> Option<PathBuf> {
    let mut children = root;
    let mut comps = rel.iter();
    while let Some(c) = comps.next() {
        match children.get(c)? {
            Node::Dir { children: next, .. } => children = next,
            Node::Link(target) => {
                let mut p = target.clone();
                p.extend(comps);
                return Some(p);
            }
        }
    }
    None
}

/// Makes `rel` a real directory in the tree (expanding links to
/// directories on the way); `None` when a file is in the way.
fn ensure_dir<'a>(
    mut children: &'a mut BTreeMap<OsString, Node>,
    rel: &Path,
) -> Option<&'a mut BTreeMap<OsString, Node>> {
    for c in rel.iter() {
        let node = children
            .entry(c.to_owned())
            .or_insert_with(|| new_dir(0o755));
        if let Node::Link(target) = node {
            if !is_dir(target) {
                return None;
            }
            let target = target.clone();
            *node = expand_link(&target);
        }
        match node {
            Node::Dir { children: next, .. } => children = next,
            Node::Link(_) => return None,
        }
    }
    Some(children)
}

/// The first of `closure` (in order) whose package name starts with one of
/// `prefixes` (earlier prefixes first) and which has `rel`.
fn find_in_closure(closure: &[String], prefixes: &[&str], rel: &str) -> Option<PathBuf> {
    prefixes.iter().find_map(|prefix| {
        closure
            .iter()
            .filter(|p| package_name(p).starts_with(prefix))
            .map(|p| Path::new(p).join(rel))
            .find(|p| p.exists())
    })
}

/// Writes the customisation layer: the top-level entries of `packages`
/// (store paths of the requested outputs, first wins on conflicts) merged
/// at `/` as symlinks into the store, `/tmp` (1777), `/usr/bin/env`
/// (the merged `bin/env`, else coreutils', else busybox's from `closure`)
/// and `/etc/ssl/certs/ca-bundle.crt` (the merged one, else cacert's from
/// `closure`). `closure` is searched in the order given; pass it sorted.
pub fn write_customisation_layer<W: Write>(
    packages: &[String],
    closure: &[String],
    compression: Compression,
    out: W,
) -> Result<(LayerInfo, Customisation), LayerError> {
    let mut root: BTreeMap<OsString, Node> = BTreeMap::new();
    for pkg in packages {
        for (name, path) in dir_entries(Path::new(pkg)) {
            // /tmp is ours; nix-support is build metadata, not for images.
            if name == "tmp" || name == "nix-support" {
                continue;
            }
            merge_into(&mut root, name, path);
        }
    }

    let packaged_env = resolve(&root, Path::new("usr/bin/env")).filter(|p| p.exists());
    let mut env = packaged_env.clone().or_else(|| {
        resolve(&root, Path::new("bin/env"))
            .filter(|p| p.exists())
            .or_else(|| find_in_closure(closure, &["coreutils", "busybox", ""], "bin/env"))
    });
    if packaged_env.is_none() {
        if let Some(target) = &env {
            match ensure_dir(&mut root, Path::new("usr/bin")) {
                Some(dir) => {
                    dir.insert("env".into(), Node::Link(target.clone()));
                }
                None => env = None,
            }
        }
    }

    let mut ca_bundle = resolve(&root, Path::new(CA_BUNDLE)).is_some_and(|p| p.exists());
    if !ca_bundle {
        if let Some(target) = find_in_closure(closure, &["nss-cacert", "cacert"], CA_BUNDLE) {
            if let Some(dir) = ensure_dir(&mut root, Path::new("etc/ssl/certs")) {
                dir.insert("ca-bundle.crt".into(), Node::Link(target));
                ca_bundle = true;
            }
        }
    }

    root.insert("tmp".into(), new_dir(0o1777));

    let mut w = LayerWriter::new(out, compression)?;
    write_tree(&mut w, &root, Path::new(""))?;
    let (info, _) = w.finish()?;
    Ok((info, Customisation { ca_bundle, env }))
}

fn write_tree<W: Write>(
    w: &mut LayerWriter<W>,
    children: &BTreeMap<OsString, Node>,
    prefix: &Path,
) -> Result<(), LayerError> {
    // BTreeMap<OsString> orders by bytes on Unix: the same order as
    // store-path layers.
    for (name, node) in children {
        let path = prefix.join(name);
        match node {
            Node::Link(target) => w.add_symlink(&path, target)?,
            Node::Dir { mode, children } => {
                w.add_dir(&path, *mode)?;
                write_tree(w, children, &path)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::nix::runner::StorePathInfo;
    use std::os::unix::fs::symlink;

    fn write(path: &Path, data: &[u8], mode: u32) {
        fs::write(path, data).expect("write");
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// A fake store path with every kind of entry the tar writer must get
    /// right.
    fn fake_path(dir: &Path) -> PathBuf {
        let p = dir.join("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-fake-1.0");
        fs::create_dir_all(p.join("sub")).expect("mkdir");
        write(&p.join("file.txt"), b"hello\n", 0o644);
        write(&p.join("exec.sh"), b"#!/bin/sh\necho hi\n", 0o755);
        write(&p.join("Zeta"), b"upper sorts first", 0o444);
        write(&p.join("alpha"), b"", 0o444);
        write(&p.join("sub/deep.txt"), &vec![7u8; 300_000], 0o444);
        symlink(
            "/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-dep/bin/x",
            p.join("link-abs"),
        )
        .expect("symlink");
        symlink("sub", p.join("link-dir")).expect("symlink");
        let long_target = format!("/nix/store/{}", "t".repeat(150));
        symlink(&long_target, p.join("link-long")).expect("symlink");
        let long_dir = p.join("l".repeat(90));
        fs::create_dir_all(&long_dir).expect("mkdir");
        write(&long_dir.join("f".repeat(60)), b"long", 0o444);
        p
    }

    fn tar_of(fs_path: &Path, compression: Compression) -> (Vec<u8>, LayerInfo) {
        let mut out = Vec::new();
        let mut w = LayerWriter::new(&mut out, compression).expect("writer");
        w.add_tree(
            fs_path,
            Path::new("nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-fake-1.0"),
        )
        .expect("tree");
        let (info, _) = w.finish().expect("finish");
        (out, info)
    }

    struct Entry {
        path: String,
        kind: tar::EntryType,
        mode: u32,
        link: Option<String>,
        size: u64,
    }

    fn entries(tar_bytes: &[u8]) -> Vec<Entry> {
        let mut ar = tar::Archive::new(tar_bytes);
        let mut out = Vec::new();
        for e in ar.entries().expect("entries") {
            let e = e.expect("entry");
            let h = e.header();
            assert_eq!(h.mtime().expect("mtime"), MTIME);
            assert_eq!(h.uid().expect("uid"), 0);
            assert_eq!(h.gid().expect("gid"), 0);
            assert_eq!(h.username_bytes(), Some(&b""[..]));
            assert_eq!(h.groupname_bytes(), Some(&b""[..]));
            out.push(Entry {
                path: e.path().expect("path").to_string_lossy().into_owned(),
                kind: h.entry_type(),
                mode: h.mode().expect("mode"),
                link: e
                    .link_name()
                    .expect("link")
                    .map(|l| l.to_string_lossy().into_owned()),
                size: h.size().expect("size"),
            });
        }
        out
    }

    fn decompress(blob: &[u8], compression: Compression) -> Vec<u8> {
        let mut out = Vec::new();
        match compression {
            Compression::Gzip => {
                flate2::read::GzDecoder::new(blob)
                    .read_to_end(&mut out)
                    .expect("gunzip");
            }
            Compression::Zstd => {
                zstd::stream::read::Decoder::new(blob)
                    .expect("zstd")
                    .read_to_end(&mut out)
                    .expect("unzstd");
            }
            Compression::None => out.extend_from_slice(blob),
        }
        out
    }

    #[test]
    fn tar_entries_are_sorted_normalised_and_links_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = fake_path(dir.path());
        let (bytes, _) = tar_of(&p, Compression::None);
        let es = entries(&bytes);
        let base = "nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-fake-1.0";
        let rel: Vec<String> = es
            .iter()
            .map(|e| e.path.strip_prefix(base).expect("prefix").to_owned())
            .collect();
        let long = format!("/{}", "l".repeat(90));
        let expected = [
            "/".to_owned(),
            "/Zeta".into(),
            "/alpha".into(),
            "/exec.sh".into(),
            "/file.txt".into(),
            "/link-abs".into(),
            "/link-dir".into(),
            "/link-long".into(),
            format!("{long}/"),
            format!("{long}/{}", "f".repeat(60)),
            "/sub/".into(),
            "/sub/deep.txt".into(),
        ];
        assert_eq!(rel, expected);
        let by = |suffix: &str| {
            es.iter()
                .find(|e| e.path == format!("{base}{suffix}"))
                .expect("entry present")
        };
        assert_eq!(by("/").kind, tar::EntryType::Directory);
        assert_eq!(by("/").mode, 0o555);
        assert_eq!(by("/exec.sh").mode, 0o555);
        assert_eq!(by("/file.txt").mode, 0o444);
        assert_eq!(by("/sub/deep.txt").size, 300_000);
        let l = by("/link-dir");
        assert_eq!(l.kind, tar::EntryType::Symlink);
        assert_eq!(l.link.as_deref(), Some("sub"));
        assert_eq!(
            by("/link-abs").link.as_deref(),
            Some("/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-dep/bin/x")
        );
        assert_eq!(
            by("/link-long").link.as_deref(),
            Some(format!("/nix/store/{}", "t".repeat(150)).as_str())
        );
    }

    #[test]
    fn layers_are_byte_identical_and_digests_match() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = fake_path(dir.path());
        for c in [Compression::Gzip, Compression::Zstd, Compression::None] {
            let (a, ia) = tar_of(&p, c);
            let (b, ib) = tar_of(&p, c);
            assert_eq!(a, b, "{c} output differs between runs");
            assert_eq!(ia, ib);
            assert_eq!(ia.digest, Digest::sha256_of(&a));
            assert_eq!(ia.size, a.len() as u64);
            let tar = decompress(&a, c);
            assert_eq!(ia.diff_id, Digest::sha256_of(&tar));
            assert_eq!(ia.tar_size, tar.len() as u64);
            assert_eq!(tar.len() % 512, 0);
            if c == Compression::None {
                assert_eq!(ia.digest, ia.diff_id);
            }
        }
        let (gz, _) = tar_of(&p, Compression::Gzip);
        assert_eq!(&gz[..4], &[0x1f, 0x8b, 8, 0], "no FNAME/FEXTRA flags");
        assert_eq!(&gz[4..8], &[0, 0, 0, 0], "mtime 0");
        assert_eq!(gz[9], 255);
    }

    #[test]
    fn digests_are_pinned() {
        // Changing the header, walk order, gzip backend or level changes
        // every layer digest users have cached; this test notices.
        let layer = |c| {
            let mut w = LayerWriter::new(io::sink(), c).expect("writer");
            w.add_dir(Path::new("nix"), 0o755).expect("dir");
            w.add_file(Path::new("nix/x"), 0o444, b"pinned\n")
                .expect("file");
            w.add_symlink(Path::new("nix/y"), Path::new("/nix/x"))
                .expect("link");
            w.finish().expect("finish").0
        };
        let diff_id = "sha256:dc6786c51961ff45aa471a7d89cf0a43b13d7aae641750b922a05f468084e481";
        let gz = layer(Compression::Gzip);
        assert_eq!(gz.diff_id.to_string(), diff_id);
        assert_eq!(
            gz.digest.to_string(),
            "sha256:0c998be1779166d4191fb1be6bab2217f8948c6dfec74fb4b977af4470183dd8"
        );
        let zst = layer(Compression::Zstd);
        assert_eq!(zst.diff_id.to_string(), diff_id);
        assert_eq!(
            zst.digest.to_string(),
            "sha256:8f884cdfaafa3fef4031c9ff71d669ba3d6166b6782362d391eb909b67ecfe7f"
        );
    }

    #[test]
    fn write_layer_refuses_paths_outside_the_store() {
        for bad in ["/etc", "/nix/store", "/nix/store/a/b", "nix/store/a"] {
            let err = write_layer(&[PathBuf::from(bad)], Compression::None, io::sink());
            assert!(matches!(err, Err(LayerError::NotInStore(_))), "{bad}");
        }
    }

    // --- Grouping --------------------------------------------------------

    fn sp(name: &str) -> String {
        // 32-character fake hash so package_name() strips it.
        format!("/nix/store/{:0>32}-{name}", name.len())
    }

    fn graph(roots: &[&str], nodes: &[(&str, u64, &[&str])]) -> ClosureGraph {
        ClosureGraph {
            roots: roots.iter().map(|r| sp(r)).collect(),
            paths: nodes
                .iter()
                .map(|(n, size, refs)| {
                    (
                        sp(n),
                        StorePathInfo {
                            path: sp(n),
                            nar_size: *size,
                            nar_hash: String::new(),
                            references: refs.iter().map(|r| sp(r)).collect(),
                        },
                    )
                })
                .collect(),
        }
    }

    fn check_partition(closure: &ClosureGraph, groups: &[LayerGroup]) {
        let mut all: Vec<&String> = groups.iter().flat_map(|g| &g.paths).collect();
        all.sort();
        let expected: Vec<&String> = closure.paths.keys().collect();
        assert_eq!(all, expected, "every path in exactly one layer");
        for g in groups {
            let size: u64 = g.paths.iter().map(|p| closure.paths[p].nar_size).sum();
            assert_eq!(g.size, size);
        }
    }

    #[test]
    fn under_budget_every_path_is_a_layer_and_images_share_them() {
        let a = graph(
            &["app"],
            &[
                ("app", 10, &["libc", "libfoo"]),
                ("libfoo", 20, &["libc"]),
                ("libc", 30, &[]),
            ],
        );
        let b = graph(
            &["tool"],
            &[
                ("tool", 5, &["libc", "libfoo"]),
                ("libfoo", 20, &["libc"]),
                ("libc", 30, &[]),
            ],
        );
        let pop = Popularity::new();
        let ga = group_layers(&a, &pop, 10).expect("groups");
        let gb = group_layers(&b, &pop, 10).expect("groups");
        check_partition(&a, &ga);
        assert_eq!(ga.len(), 3);
        // Dependencies first.
        assert_eq!(ga[0].paths, [sp("libc")]);
        assert_eq!(ga[1].paths, [sp("libfoo")]);
        assert_eq!(ga[2].paths, [sp("app")]);
        let ids_a: BTreeSet<Digest> = ga.iter().map(LayerGroup::id).collect();
        let ids_b: BTreeSet<Digest> = gb.iter().map(LayerGroup::id).collect();
        assert_eq!(
            ids_a.intersection(&ids_b).count(),
            2,
            "libc and libfoo shared"
        );
        // Exactly at the limit: closure of 3 with budget 4.
        assert_eq!(group_layers(&a, &pop, 4).expect("groups").len(), 3);
    }

    /// A closure of `n` leaf libraries under one app, plus a popular base.
    fn wide(n: usize) -> ClosureGraph {
        let names: Vec<String> = (0..n).map(|i| format!("lib{i:03}")).collect();
        let mut nodes: Vec<(String, u64, Vec<String>)> = names
            .iter()
            .enumerate()
            .map(|(i, name)| (name.clone(), 1000 + i as u64, vec!["glibc".to_owned()]))
            .collect();
        let mut app_refs = names.clone();
        app_refs.push("glibc".into());
        nodes.push(("app".into(), 50, app_refs));
        nodes.push(("glibc".into(), 5000, vec![]));
        ClosureGraph {
            roots: vec![sp("app")],
            paths: nodes
                .iter()
                .map(|(n, s, r)| {
                    (
                        sp(n),
                        StorePathInfo {
                            path: sp(n),
                            nar_size: *s,
                            nar_hash: String::new(),
                            references: r.iter().map(|x| sp(x)).collect(),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn over_budget_respects_the_budget_and_is_deterministic() {
        let closure = wide(40);
        let mut pop = Popularity::new();
        pop.insert("glibc", 300_000);
        for budget in [2, 3, 5, 10, 20, 41, 42] {
            let g1 = group_layers(&closure, &pop, budget).expect("groups");
            let g2 = group_layers(&closure, &pop, budget).expect("groups");
            assert_eq!(g1, g2, "deterministic at budget {budget}");
            assert!(g1.len() < budget, "{} layers for budget {budget}", g1.len());
            check_partition(&closure, &g1);
            if budget >= 3 {
                // Popular glibc keeps a layer of its own.
                assert!(
                    g1.iter().any(|g| g.paths == [sp("glibc")]),
                    "budget {budget}"
                );
            }
        }
        // With room, the split fills the budget.
        assert_eq!(group_layers(&closure, &pop, 30).expect("groups").len(), 29);
        assert!(matches!(
            group_layers(&closure, &pop, 1),
            Err(LayerError::BudgetTooSmall(1))
        ));
    }

    #[test]
    fn dominator_groups_follow_nixery() {
        // Nixery's example: root -> A, B, C, D; A, B, C -> E; C -> D -> F;
        // G is big. E is popular.
        let closure = graph(
            &["a", "b", "c", "d", "g"],
            &[
                ("a", 10, &["e"]),
                ("b", 10, &["e"]),
                ("c", 10, &["e", "d"]),
                ("d", 10, &["f"]),
                ("e", 10, &[]),
                ("f", 10, &[]),
                ("g", 200_000_000, &[]),
            ],
        );
        let mut pop = Popularity::new();
        pop.insert("e", 1000);
        // Budget 6 + 1: {A} {B} {C} {E} {D, F} {G}.
        let groups = group_layers(&closure, &pop, 7).expect("groups");
        check_partition(&closure, &groups);
        let sets: BTreeSet<Vec<String>> = groups.iter().map(|g| g.paths.clone()).collect();
        assert!(sets.contains(&vec![sp("d"), sp("f")]), "{sets:?}");
        assert!(sets.contains(&vec![sp("e")]));
        assert!(sets.contains(&vec![sp("g")]));
        // Budget 2 + 1: everything merges into two layers.
        assert_eq!(group_layers(&closure, &pop, 3).expect("groups").len(), 2);
    }

    #[test]
    fn popularity_reads_nixery_json_and_learns() {
        let p = Popularity::from_nixery_json(br#"{"glibc-2.37-8": 312345, "zlib-1.3": 4.0}"#)
            .expect("parses");
        assert_eq!(
            p.get("/nix/store/00000000000000000000000000000000-glibc-2.37-8"),
            Some(312345)
        );
        assert_eq!(
            p.get("/nix/store/00000000000000000000000000000000-zlib-1.3"),
            Some(4)
        );
        assert_eq!(p.get("/nix/store/00000000000000000000000000000000-x"), None);
        assert!(Popularity::from_nixery_json(br#"{"x": "many"}"#).is_err());
        assert!(Popularity::from_nixery_json(br#"{"x": -1}"#).is_err());

        let mut learnt = Popularity::new();
        learnt.learn(&wide(3));
        assert_eq!(learnt.get(&sp("glibc")), Some(4));
        assert_eq!(learnt.get(&sp("lib000")), Some(1));
        let round = Popularity::from_nixery_json(&learnt.to_json()).expect("round trip");
        assert_eq!(round, learnt);
    }

    // --- Customisation layer ---------------------------------------------

    fn pkg(dir: &Path, name: &str, files: &[(&str, &str)]) -> String {
        let p = dir.join(format!("{:0>32}-{name}", 0));
        for (rel, content) in files {
            let f = p.join(rel);
            fs::create_dir_all(f.parent().expect("parent")).expect("mkdir");
            if let Some(target) = content.strip_prefix("->") {
                symlink(target, &f).expect("symlink");
            } else {
                fs::write(&f, content).expect("write");
            }
        }
        p.to_string_lossy().into_owned()
    }

    #[test]
    fn customisation_layer_merges_packages_as_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let a = pkg(
            d,
            "a-1",
            &[("bin/a", "a"), ("share/doc/a", "a"), ("tmp/x", "no")],
        );
        let b = pkg(
            d,
            "b-1",
            &[("bin/b", "b"), ("bin/a", "b's a"), ("etc/foo", "b")],
        );
        let coreutils = pkg(d, "coreutils-9.1", &[("bin/env", "env")]);
        let cacert = pkg(
            d,
            "nss-cacert-3.92",
            &[("etc/ssl/certs/ca-bundle.crt", "pem")],
        );
        let closure = vec![a.clone(), b.clone(), cacert.clone(), coreutils.clone()];

        let mut out = Vec::new();
        let (info, custom) = write_customisation_layer(
            &[a.clone(), b.clone()],
            &closure,
            Compression::None,
            &mut out,
        )
        .expect("layer");
        assert!(custom.ca_bundle);
        assert_eq!(custom.env, Some(Path::new(&coreutils).join("bin/env")));
        assert_eq!(info.diff_id, Digest::sha256_of(&out));

        let es = entries(&out);
        let listing: Vec<(String, Option<String>)> = es
            .iter()
            .map(|e| (e.path.clone(), e.link.clone()))
            .collect();
        let l = |p: &str, t: &str| (p.to_owned(), Some(t.to_owned()));
        let dirent = |p: &str| (p.to_owned(), None);
        assert_eq!(
            listing,
            [
                dirent("bin/"),
                l("bin/a", &format!("{a}/bin/a")),
                l("bin/b", &format!("{b}/bin/b")),
                dirent("etc/"),
                l("etc/foo", &format!("{b}/etc/foo")),
                dirent("etc/ssl/"),
                dirent("etc/ssl/certs/"),
                l(
                    "etc/ssl/certs/ca-bundle.crt",
                    &format!("{cacert}/{CA_BUNDLE}")
                ),
                l("share", &format!("{a}/share")),
                dirent("tmp/"),
                dirent("usr/"),
                dirent("usr/bin/"),
                l("usr/bin/env", &format!("{coreutils}/bin/env")),
            ]
        );
        let tmp = es.iter().find(|e| e.path == "tmp/").expect("tmp");
        assert_eq!(tmp.mode, 0o1777);
        assert_eq!(tmp.kind, tar::EntryType::Directory);

        // Same input, same bytes.
        let mut again = Vec::new();
        let (info2, _) =
            write_customisation_layer(&[a, b], &closure, Compression::Gzip, &mut again)
                .expect("layer");
        let mut third = Vec::new();
        let (info3, _) = write_customisation_layer(
            &[closure[0].clone(), closure[1].clone()],
            &closure,
            Compression::Gzip,
            &mut third,
        )
        .expect("layer");
        assert_eq!(again, third);
        assert_eq!(info2, info3);
        assert_eq!(info2.diff_id, info.diff_id);
    }

    #[test]
    fn customisation_layer_without_coreutils_or_cacert() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let busybox = pkg(
            d,
            "busybox",
            &[("bin/busybox", "bb"), ("bin/env", "->busybox")],
        );
        let hello = pkg(d, "hello-1.0", &[("bin/hello", "hi")]);
        let (_, custom) = write_customisation_layer(
            &[hello],
            std::slice::from_ref(&busybox),
            Compression::None,
            io::sink(),
        )
        .expect("layer");
        assert!(!custom.ca_bundle);
        assert_eq!(custom.env, Some(Path::new(&busybox).join("bin/env")));
    }

    // --- Against the real store ------------------------------------------

    fn built_closure(name: &str) -> crate::sources::nix::runner::BuiltImage {
        use crate::sources::nix::runner::{ImageName, Nix, NixConfig, PkgSource};
        let nix = Nix::new(NixConfig {
            options: vec![("substituters".into(), String::new())],
            ..NixConfig::default()
        });
        let source = PkgSource::Path {
            path: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pkgs"),
        };
        nix.build(&source, &ImageName::parse(name).expect("name"), None)
            .expect("nix builds tests/pkgs (is nix-bin installed?)")
    }

    #[test]
    fn real_store_layers_match_gnu_tar() {
        let built = built_closure("greet");
        let paths: Vec<PathBuf> = built.closure.paths.keys().map(PathBuf::from).collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("layer.tar.gz");
        let info = write_layer(
            &paths,
            Compression::Gzip,
            fs::File::create(&file).expect("create"),
        )
        .expect("layer");
        let again = write_layer(&paths, Compression::Gzip, io::sink()).expect("layer");
        assert_eq!(info, again);
        let blob = fs::read(&file).expect("read");
        assert_eq!(info.digest, Digest::sha256_of(&blob));

        let listing = std::process::Command::new("tar")
            .arg("-tvzf")
            .arg(&file)
            .output()
            .expect("tar runs");
        assert!(listing.status.success(), "{listing:?}");
        let text = String::from_utf8_lossy(&listing.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].ends_with(" nix/"), "{}", lines[0]);
        assert!(lines[1].ends_with(" nix/store/"), "{}", lines[1]);
        let greet = built.evaluation.packages[0].outputs[0]
            .path
            .trim_start_matches('/');
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("-r-xr-xr-x 0/0")
                    && l.ends_with(&format!("{greet}/bin/greet"))),
            "{text}"
        );
        // busybox's applets are symlinks, not copies.
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("lrwxrwxrwx") && l.ends_with("/bin/sh -> busybox")),
            "{text}"
        );
        assert!(lines.iter().all(|l| l.contains(" 1970-01-01 ")), "{text}");
    }
}
