//! Turning Nix store paths into image layers:
//!
//! - `group`: grouping a runtime closure into at most `budget − 1`
//!   store-path layers ([`group_layers`]), weighted by `popularity`
//!   ([`Popularity`]: Nixery's data plus what this daemon learns);
//! - `tarball`: the deterministic layer tarball writer ([`write_layer`],
//!   [`LayerWriter`]), streaming from `/nix/store` through the compressor
//!   (`compress`) while hashing both the compressed blob (digest) and the
//!   tar (diff_id);
//! - `customise`: the customisation layer ([`write_customisation_layer`]):
//!   `/bin`, `/lib`, `/etc` … merged from the requested packages as
//!   symlinks, `/tmp`, `/usr/bin/env` and the CA bundle.
//!
//! This file holds what they share: [`LayerInfo`] (what a written layer is)
//! and [`LayerError`].
//!
//! Tarballs depend only on store contents and these settings: entries in
//! byte order of their paths (directories before their contents), mtime 1
//! (like the store), uid/gid 0 and no names, modes reduced to what a NAR
//! records (executable or not), symlinks never followed, hard links written
//! as files. gzip is zlib-rs at level 6 with a zero mtime and no file name;
//! zstd is level 3 on one thread.

mod compress;
mod customise;
mod group;
mod popularity;
mod tarball;

use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub(crate) use self::compress::{Compression, UnknownCompression};
pub(crate) use self::customise::{write_customisation_layer, CA_BUNDLE};
pub(crate) use self::group::{group_layers, LayerGroup};
pub(crate) use self::popularity::{package_name, Popularity};
pub(crate) use self::tarball::write_layer;
use crate::oci::digest::Digest;
use crate::util::fs::IoError;

/// Where store paths live, and their prefix inside layer tarballs.
pub(crate) const STORE_DIR: &str = "/nix/store";

/// What a written layer is: the blob (compressed) and its diff_id (the
/// sha256 of the uncompressed tar).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LayerInfo {
    /// Digest of the blob as written to the sink.
    pub(crate) digest: Digest,
    /// Size of the blob in bytes.
    pub(crate) size: u64,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids`).
    pub(crate) diff_id: Digest,
    /// Size of the uncompressed tar.
    pub(crate) tar_size: u64,
    pub(crate) compression: Compression,
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("writing the layer: {0}")]
    Write(#[source] io::Error),
    #[error("{0} is not a path in {STORE_DIR}")]
    NotInStore(PathBuf),
    #[error("{0}: not a regular file, directory or symlink (cannot be in the Nix store)")]
    UnsupportedFileType(PathBuf),
    #[error("layer budget {0} is too small: one layer is the customisation layer, so at least 2")]
    BudgetTooSmall(usize),
}
