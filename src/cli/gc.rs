//! `nixery-local gc`: evicts least recently used images until the cache is
//! within its limit, and deletes blobs nothing needs.

use anyhow::Context;

use nixery_local::app::{max_cache_bytes, open_store};
use nixery_local::store::gc::{self, Usage};

use super::{Common, Failure};

pub fn run(common: Common) -> Result<(), Failure> {
    let settings = common.settings()?;
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
    Ok(())
}
