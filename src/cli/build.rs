//! `nixery-local build NAME`: builds a Nix image into the cache without a
//! server, then prints its digest and layers.

use std::io::{IsTerminal, Write};
use std::sync::Arc;

use anyhow::Context;

use nixery_local::app::open_store;
use nixery_local::oci::reference::{RepoName, Tag};
use nixery_local::sources::nix::NixImages;

use super::cache::Access;
use super::{Common, Failure};

pub fn run(common: Common, name: &str) -> Result<(), Failure> {
    let settings = common.cache_settings(Access::Write)?;
    let (packages, tag) = match name.rsplit_once(':') {
        Some((p, t)) => (p, t),
        None => (name, "latest"),
    };
    let tag: Tag = tag.parse().context("invalid tag")?;
    let repo: RepoName = packages
        .parse()
        .context("invalid image name (lowercase attribute paths joined by '/')")?;
    let store = Arc::new(open_store(&settings)?);
    let images = NixImages::new(store, settings.nix.clone());
    let progress = std::io::stderr().is_terminal();
    let report = images
        .build_now(repo.as_str(), &tag, progress)
        .with_context(|| format!("building {name}"))?;
    let mut out = std::io::stdout().lock();
    let digest = report
        .record
        .manifests
        .first()
        .context("the build recorded no manifest")?
        .digest
        .clone();
    writeln!(out, "digest {digest}")?;
    writeln!(
        out,
        "{:<12} {:>12}  {:<6}  store paths",
        "layer", "bytes", "cached"
    )?;
    for layer in &report.layers {
        let short = layer.digest.hex().get(..12).unwrap_or(layer.digest.hex());
        let paths = match layer.paths.as_slice() {
            [one] => one.clone(),
            [first, rest @ ..] => format!("{first} (+{} more)", rest.len()),
            [] => String::new(),
        };
        let cached = if layer.reused { "yes" } else { "no" };
        writeln!(
            out,
            "{short:<12} {:>12}  {cached:<6}  {:<6}  {paths}",
            layer.size, layer.shared_with
        )?;
    }
    Ok(())
}
