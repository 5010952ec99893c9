//! Popularity: how many store paths reference each package ([`Popularity`]),
//! from Nixery's JSON data and from the closures this daemon has seen.
//! Grouping ([`super::group_layers`]) gives popular paths layers of their own.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::sources::nix::closure::ClosureGraph;

/// How many store paths reference each package: keys are store path names
/// without the hash (`glibc-2.37-8`, Nixery's popcount format) or full base
/// names (`<hash>-glibc-2.37-8`), values reference counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct Popularity(BTreeMap<String, u64>);

/// `/nix/store/<hash>-<name>` → `<hash>-<name>`.
fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// `/nix/store/<hash>-<name>` → `<name>` (what Nixery's popcount keys on).
pub(crate) fn package_name(path: &str) -> &str {
    let base = base_name(path);
    match base.split_once('-') {
        Some((hash, name)) if hash.len() == 32 => name,
        _ => base,
    }
}

impl Popularity {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Parses Nixery's popularity JSON: `{ "<name>": <count>, … }`. Counts
    /// may be floats (rounded); negative or non-numeric values are errors.
    pub(crate) fn from_nixery_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
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
    #[cfg(test)]
    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.0).unwrap_or_default()
    }

    #[cfg(test)]
    pub(crate) fn insert(&mut self, key: impl Into<String>, count: u64) {
        self.0.insert(key.into(), count);
    }

    /// The count for a store path: by full base name, else by package name.
    pub(crate) fn get(&self, store_path: &str) -> Option<u64> {
        self.0
            .get(base_name(store_path))
            .or_else(|| self.0.get(package_name(store_path)))
            .copied()
    }

    /// Adds the reference counts seen in one closure (how many paths of
    /// it reference each path): call it for every image built, or for the
    /// whole local store's graph.
    pub(crate) fn learn(&mut self, closure: &ClosureGraph) {
        for info in closure.paths.values() {
            for r in &info.references {
                *self.0.entry(package_name(r).to_owned()).or_default() += 1;
            }
        }
    }
}

impl From<HashMap<String, u64>> for Popularity {
    fn from(map: HashMap<String, u64>) -> Self {
        Popularity(map.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::super::group::tests::{sp, wide};
    use super::*;

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
}
