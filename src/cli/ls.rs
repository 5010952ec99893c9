//! `nixery-local ls`: the cached images, most recently used first.

use std::io::Write;

use anyhow::Context;

use nixery_local::app::open_store;
use nixery_local::store::gc::{self, Usage};
use nixery_local::util::time::now_secs;
use nixery_local::util::units::{human_age, human_bytes};

use nixery_local::config::Options;

use super::cache::{Access, CacheArgs};
use super::Failure;

pub fn run(args: CacheArgs) -> Result<(), Failure> {
    let settings = args.settings(Options::default(), Access::Read)?;
    let store = open_store(&settings)?;
    let usage = Usage::load(&store).context("reading cache access times")?;
    let images = gc::images(&store, &usage.snapshot()).context("listing the cache")?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<60} {:<19} {:>10}  last used",
        "image", "digest", "size"
    )?;
    for img in images.iter().rev() {
        let digest = img
            .manifests
            .first()
            .map(|m| format!("{}", m.digest))
            .unwrap_or_default();
        let short = digest.get(..19).unwrap_or(&digest);
        let ago = now_secs().saturating_sub(img.last_used);
        let name = settings.nix.shown_name(&img.id, &settings.default_registry);
        writeln!(
            out,
            "{name:<60} {short:<19} {:>10}  {} ago",
            human_bytes(img.size),
            human_age(ago)
        )?;
    }
    Ok(())
}
