//! `nixery-local gc`: evicts least recently used images until the cache is
//! within its limit, and deletes blobs nothing needs.

use std::time::Duration;

use anyhow::Context;

use nixery_local::app::{max_cache_bytes, open_store};
use nixery_local::config::Options;
use nixery_local::store::gc::{self, Usage};
use nixery_local::util::units::{human_age, human_bytes};

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
    /// Images used or built more recently than this are kept whatever the
    /// size (e.g. 0, 90s, 10m, 2h) [default: 10m: a pull may be using them].
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    min_age: Option<Duration>,
}

/// `0`, `90`, `90s`, `10m`, `2h`, `1d`.
fn parse_age(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with s, m, h or d"))?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(n.saturating_mul(factor)))
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
    let min_age = args.min_age.unwrap_or(gc::MIN_AGE);
    let r = gc::collect(&store, max, &usage.snapshot(), min_age).context("collecting the cache")?;
    for image in &r.evicted {
        println!("evicted {image}");
    }
    println!(
        "cache: {} before, {} after (limit {}); {} blobs deleted, {} freed",
        human_bytes(r.size_before),
        human_bytes(r.size_after),
        human_bytes(max),
        r.deleted_blobs,
        human_bytes(r.freed_bytes)
    );
    if r.size_before <= max {
        println!("the cache is within its limit: nothing to evict");
    } else if r.kept_young > 0 {
        println!(
            "kept {} images used or built in the last {}: images that young are not evicted \
             (--min-age 0 evicts them too)",
            r.kept_young,
            human_age(min_age.as_secs())
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_take_a_unit() {
        assert_eq!(parse_age("0"), Ok(Duration::ZERO));
        assert_eq!(parse_age("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_age("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_age("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_age("10x").is_err());
        assert!(parse_age("m").is_err());
    }
}
