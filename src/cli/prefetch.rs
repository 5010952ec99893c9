//! `nixery-local prefetch REF…`: pulls images into the cache, through the
//! same wiring as the daemon, to serve them offline later.

use nixery_local::app::App;
use nixery_local::oci::reference::ImageRef;
use nixery_local::registry::prefetch::prefetch;
use nixery_local::util::units::human_bytes;

use super::cache::Access;
use super::{runtime, upstreams, usage, Common, Failure};

pub fn run(common: Common, images: &[String]) -> Result<(), Failure> {
    let settings = common.cache_settings(Access::Write)?;
    let refs = images
        .iter()
        .map(|i| i.parse::<ImageRef>().map_err(usage))
        .collect::<Result<Vec<_>, _>>()?;
    let upstreams = upstreams(&settings)?;
    runtime()?.block_on(async move {
        let app = App::open(&settings, upstreams)?;
        let mut failed = 0;
        for image in &refs {
            println!("{image}");
            let mut out = std::io::stdout();
            match prefetch(app.registry(), image, &mut out).await {
                Ok(p) => println!(
                    "prefetched {image} {} ({} blobs, {})",
                    p.digest.map(|d| d.to_string()).unwrap_or_default(),
                    p.blobs,
                    human_bytes(p.bytes)
                ),
                Err(e) => {
                    eprintln!("nixery-local: {image}: {e}");
                    failed += 1;
                }
            }
        }
        anyhow::ensure!(failed == 0, "{failed} of {} images failed", refs.len());
        Ok(())
    })?;
    Ok(())
}
