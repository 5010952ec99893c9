//! Closures: every store path reachable from the built outputs, with NAR
//! sizes and references ([`ClosureGraph`]), as `nix-store --query
//! --requisites` and `--dump-db` report them. [`crate::sources::nix::layers`]
//! turns a closure into layers.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::sources::nix::command::Nix;
use crate::sources::nix::error::{NixError, Step};

/// Paths per `nix-store` invocation, to stay far below ARG_MAX.
const ARGS_PER_CALL: usize = 2000;

/// One store path of a closure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StorePathInfo {
    /// `/nix/store/<hash>-<name>`.
    pub(crate) path: String,
    /// Size of the path's NAR serialisation: its content size.
    pub(crate) nar_size: u64,
    /// `sha256:<hex>` of the NAR, as Nix registered it.
    pub(crate) nar_hash: String,
    /// Other store paths this one references (self-references removed).
    pub(crate) references: Vec<String>,
}

/// A runtime closure: every store path reachable from `roots`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub(crate) struct ClosureGraph {
    /// The requested outputs, deduplicated, in request order.
    pub(crate) roots: Vec<String>,
    /// Every path of the closure, by path.
    pub(crate) paths: BTreeMap<String, StorePathInfo>,
}

impl ClosureGraph {
    pub(crate) fn total_size(&self) -> u64 {
        self.paths.values().map(|p| p.nar_size).sum()
    }

    pub(crate) fn len(&self) -> usize {
        self.paths.len()
    }

    /// Parses `nix-store --dump-db PATHS…` output: per path, its name, NAR
    /// hash (base16), NAR size, deriver (maybe empty), reference count and
    /// references.
    pub(crate) fn parse_dump_db(text: &str) -> Result<BTreeMap<String, StorePathInfo>, String> {
        let mut lines = text.lines();
        let mut out = BTreeMap::new();
        while let Some(path) = lines.next() {
            if path.is_empty() {
                continue;
            }
            let mut next = |what: &str| {
                lines
                    .next()
                    .ok_or_else(|| format!("dump-db output ends before the {what} of {path}"))
            };
            let hash = next("hash")?;
            let size = next("size")?;
            let _deriver = next("deriver")?;
            let count = next("reference count")?;
            let nar_size: u64 = size
                .parse()
                .map_err(|_| format!("bad NAR size {size:?} for {path}"))?;
            let count: usize = count
                .parse()
                .map_err(|_| format!("bad reference count {count:?} for {path}"))?;
            let mut references = Vec::with_capacity(count);
            for _ in 0..count {
                let r = next("references")?;
                if r != path {
                    references.push(r.to_owned());
                }
            }
            references.sort();
            references.dedup();
            let nar_hash = if hash.contains(':') {
                hash.to_owned()
            } else {
                format!("sha256:{hash}")
            };
            out.insert(
                path.to_owned(),
                StorePathInfo {
                    path: path.to_owned(),
                    nar_size,
                    nar_hash,
                    references,
                },
            );
        }
        Ok(out)
    }
}

impl Nix {
    pub(super) fn closure_until(
        &self,
        roots: &[String],
        deadline: Instant,
    ) -> Result<ClosureGraph, NixError> {
        let mut requisites = BTreeSet::new();
        for chunk in roots.chunks(ARGS_PER_CALL) {
            let mut args = self.base_args();
            args.extend(["--query".into(), "--requisites".into()]);
            args.extend(chunk.iter().map(OsString::from));
            let out = self.run("nix-store", args, deadline, Step::Query)?;
            let stdout = self.expect_success(out, Step::Query)?;
            requisites.extend(
                String::from_utf8_lossy(&stdout)
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned),
            );
        }
        let requisites: Vec<String> = requisites.into_iter().collect();
        let mut paths = BTreeMap::new();
        for chunk in requisites.chunks(ARGS_PER_CALL) {
            let mut args = self.base_args();
            args.push("--dump-db".into());
            args.extend(chunk.iter().map(OsString::from));
            let out = self.run("nix-store", args, deadline, Step::Query)?;
            let stdout = self.expect_success(out, Step::Query)?;
            let parsed = ClosureGraph::parse_dump_db(&String::from_utf8_lossy(&stdout)).map_err(
                |detail| NixError::BadOutput {
                    step: Step::Query,
                    detail,
                },
            )?;
            paths.extend(parsed);
        }
        for p in &requisites {
            if !paths.contains_key(p) {
                return Err(NixError::BadOutput {
                    step: Step::Query,
                    detail: format!("no registration for {p}"),
                });
            }
        }
        let mut seen = BTreeSet::new();
        let roots = roots
            .iter()
            .filter(|r| seen.insert(r.as_str()))
            .cloned()
            .collect();
        Ok(ClosureGraph { roots, paths })
    }

    /// Every valid path of the store with its references (`nix-store
    /// --dump-db`), e.g. to learn popularity from the local store's
    /// reference graph. `roots` is empty. Costs a second or so per 10,000
    /// paths.
    pub(crate) fn store_graph(&self) -> Result<ClosureGraph, NixError> {
        let deadline = Instant::now() + self.config().timeout;
        self.init_store_once(deadline);
        let mut args = self.base_args();
        args.push("--dump-db".into());
        let out = self.run("nix-store", args, deadline, Step::Query)?;
        let stdout = self.expect_success(out, Step::Query)?;
        let paths =
            ClosureGraph::parse_dump_db(&String::from_utf8_lossy(&stdout)).map_err(|detail| {
                NixError::BadOutput {
                    step: Step::Query,
                    detail,
                }
            })?;
        Ok(ClosureGraph {
            roots: Vec::new(),
            paths,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dump_db() {
        let text = "/nix/store/aaa-a\n\
            0f00\n\
            120\n\
            /nix/store/xxx-a.drv\n\
            2\n\
            /nix/store/aaa-a\n\
            /nix/store/bbb-b\n\
            /nix/store/bbb-b\n\
            0e00\n\
            7\n\
            \n\
            0\n";
        let paths = ClosureGraph::parse_dump_db(text).expect("parses");
        assert_eq!(paths.len(), 2);
        let a = &paths["/nix/store/aaa-a"];
        assert_eq!(a.nar_size, 120);
        assert_eq!(a.nar_hash, "sha256:0f00");
        assert_eq!(a.references, ["/nix/store/bbb-b"]);
        assert!(paths["/nix/store/bbb-b"].references.is_empty());
        assert!(ClosureGraph::parse_dump_db("/nix/store/aaa-a\nff\n").is_err());
        assert!(ClosureGraph::parse_dump_db("/nix/store/aaa-a\nff\nx\n\n0\n").is_err());
    }
}
