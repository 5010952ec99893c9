//! `nixery-local ls`: the cached images, most recently used first.

use std::io::Write;

use anyhow::Context;

use nixery_local::app::open_store;
use nixery_local::store::gc::{self, Usage};
use nixery_local::util::time::now_secs;

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
        "{:<60} {:<19} {:>14}  last used",
        "image", "digest", "bytes"
    )?;
    for img in images.iter().rev() {
        let digest = img
            .manifests
            .first()
            .map(|m| format!("{}", m.digest))
            .unwrap_or_default();
        let short = digest.get(..19).unwrap_or(&digest);
        let ago = now_secs().saturating_sub(img.last_used);
        writeln!(
            out,
            "{:<60} {short:<19} {:>14}  {} ago",
            img.id.to_string(),
            img.size,
            human_age(ago)
        )?;
    }
    Ok(())
}

fn human_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}
