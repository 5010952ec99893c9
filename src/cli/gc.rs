//! `nixery-local gc`: evicts least recently used images until the cache is
//! within its limit, and deletes blobs nothing needs.

use anyhow::Context;

use nixery_local::app::{max_cache_bytes, open_store};
use nixery_local::config::Options;
use nixery_local::store::gc::{self, Usage};

use super::cache::{Access, CacheArgs};
use super::Failure;

#[derive(clap::Args)]
pub struct GcArgs {
    #[command(flatten)]
    cache: CacheArgs,
    /// Most bytes of blobs the cache keeps (e.g. 500MB, 20GiB) [default: as
    /// for `serve`].
    #[arg(long, value_name = "SIZE")]
    max_cache_size: Option<String>,
}

pub fn run(args: GcArgs) -> Result<(), Failure> {
    let settings = args.cache.settings(
        Options {
            max_cache_size: args.max_cache_size,
            ..Options::default()
        },
        Access::Write,
    )?;
    let store = open_store(&settings)?;
    let usage = Usage::load(&store).context("reading cache access times")?;
    let max = max_cache_bytes(&settings);
    let r =
        gc::collect(&store, max, &usage.snapshot(), gc::MIN_AGE).context("collecting the cache")?;
    for image in &r.evicted {
        println!("evicted {image}");
    }
    println!(
        "cache: {} bytes before, {} after (limit {max}); {} blobs deleted, {} bytes freed",
        r.size_before, r.size_after, r.deleted_blobs, r.freed_bytes
    );
    if r.size_before <= max {
        println!("the cache is within its limit: nothing to evict");
    } else if r.kept_young > 0 {
        println!(
            "kept {} images used or built in the last {} minutes: images that young are never evicted",
            r.kept_young,
            gc::MIN_AGE.as_secs() / 60
        );
    }
    Ok(())
}
