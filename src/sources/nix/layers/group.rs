//! Grouping a runtime closure into layers ([`group_layers`]): one layer per
//! store path while the closure fits the budget, so images share layers;
//! otherwise Nixery's dominator-tree grouping weighted by popularity × size.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use petgraph::algo::dominators;
use petgraph::graph::{DiGraph, NodeIndex};
use serde::{Deserialize, Serialize};

use super::popularity::{package_name, Popularity};
use super::LayerError;
use crate::oci::digest::{Algorithm, Digest, Hasher};
use crate::sources::nix::closure::ClosureGraph;

/// A store path counts as popular (its own layer candidate) from this many
/// referrers on (Nixery's threshold).
pub(crate) const POPULAR_THRESHOLD: u64 = 100;
/// A store path whose closure is bigger than this is a layer candidate of
/// its own (Nixery's threshold).
pub(crate) const BIG_CLOSURE: u64 = 100_000_000;
/// Nixery gives these to every image and rates them above glibc.
const ALWAYS_POPULAR: [&str; 2] = ["nss-cacert", "iana-etc"];
const ALWAYS_POPULAR_COUNT: u64 = 500_000;

/// The store paths of one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LayerGroup {
    /// Sorted store paths.
    pub(crate) paths: Vec<String>,
    /// Sum of their NAR sizes.
    pub(crate) size: u64,
}

impl LayerGroup {
    /// The layer's identity: sha256 of its sorted store paths, one per line.
    /// With the compression setting, it decides the layer's bytes.
    pub(crate) fn id(&self) -> Digest {
        let mut h = Hasher::new(Algorithm::Sha256);
        for p in &self.paths {
            h.update(p.as_bytes());
            h.update(b"\n");
        }
        h.finish()
    }

    pub(crate) fn path_bufs(&self) -> Vec<PathBuf> {
        self.paths.iter().map(PathBuf::from).collect()
    }
}

/// A group during grouping: nodes are indexes into the sorted path list.
struct Group {
    head: usize,
    members: Vec<usize>,
    size: u64,
    rating: u128,
}

/// Splits `closure` into at most `budget − 1` store-path layers (the
/// customisation layer takes the last slot), in a deterministic order:
/// by their earliest path in a dependencies-first topological order of the
/// closure, ties broken by path.
///
/// - While the closure has at most `budget − 1` paths, every path is its own
///   layer, so images with overlapping closures share layers exactly.
/// - Otherwise (Nixery's algorithm): a fake root gets edges to the requested
///   outputs and to every path that is popular (≥ [`POPULAR_THRESHOLD`]
///   referrers) or whose closure exceeds [`BIG_CLOSURE`]; each child of the
///   root in the dominator tree, with everything it dominates, is a group.
///   Unlike Nixery, leftover budget is then spent splitting off the largest
///   dominator subtrees inside groups as groups of their own (so big shared
///   dependencies get layers of their own); if there are still too many
///   groups, the two lowest rated (popularity of the head × size) are
///   merged until they fit.
pub(crate) fn group_layers(
    closure: &ClosureGraph,
    popularity: &Popularity,
    budget: usize,
) -> Result<Vec<LayerGroup>, LayerError> {
    if budget < 2 {
        return Err(LayerError::BudgetTooSmall(budget));
    }
    let max_layers = budget - 1;
    let names: Vec<&str> = closure.paths.keys().map(String::as_str).collect();
    let n = names.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, p)| (*p, i)).collect();
    let refs: Vec<Vec<usize>> = names
        .iter()
        .map(|p| {
            let mut r: Vec<usize> = closure.paths[*p]
                .references
                .iter()
                .filter_map(|r| index.get(r.as_str()).copied())
                .collect();
            r.sort_unstable();
            r.dedup();
            r
        })
        .collect();
    let sizes: Vec<u64> = names.iter().map(|p| closure.paths[*p].nar_size).collect();
    let topo = topological_positions(&refs);

    let groups: Vec<Vec<usize>> = if n <= max_layers {
        (0..n).map(|i| vec![i]).collect()
    } else {
        dominator_groups(
            closure, &names, &index, &refs, &sizes, popularity, max_layers,
        )
    };

    let mut out: Vec<(usize, LayerGroup)> = groups
        .into_iter()
        .map(|members| {
            let first = members.iter().map(|&i| topo[i]).min().unwrap_or(usize::MAX);
            let mut paths: Vec<String> = members.iter().map(|&i| names[i].to_owned()).collect();
            paths.sort();
            let size = members.iter().map(|&i| sizes[i]).sum();
            (first, LayerGroup { paths, size })
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.paths.cmp(&b.1.paths)));
    Ok(out.into_iter().map(|(_, g)| g).collect())
}

/// Position of each node in a dependencies-first topological order, ties
/// broken by index (= path order). Cycles (which Nix does not produce) are
/// broken at the smallest remaining node.
fn topological_positions(refs: &[Vec<usize>]) -> Vec<usize> {
    let n = refs.len();
    let mut pending: Vec<usize> = refs.iter().map(Vec::len).collect();
    let mut referrers = vec![Vec::new(); n];
    for (i, r) in refs.iter().enumerate() {
        for &j in r {
            referrers[j].push(i);
        }
    }
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| pending[i] == 0).collect();
    let mut done = vec![false; n];
    let mut pos = vec![0; n];
    let mut next = 0;
    while next < n {
        let i = match ready.pop_first() {
            Some(i) => i,
            None => match (0..n).find(|&i| !done[i]) {
                Some(i) => i,
                None => break,
            },
        };
        if done[i] {
            continue;
        }
        done[i] = true;
        pos[i] = next;
        next += 1;
        for &r in &referrers[i] {
            pending[r] = pending[r].saturating_sub(1);
            if pending[r] == 0 && !done[r] {
                ready.insert(r);
            }
        }
    }
    pos
}

/// Whether the closure of `start` is bigger than `limit`; stops early.
fn closure_exceeds(start: usize, refs: &[Vec<usize>], sizes: &[u64], limit: u64) -> bool {
    let mut seen = vec![false; refs.len()];
    let mut stack = vec![start];
    seen[start] = true;
    let mut total = 0u64;
    while let Some(i) = stack.pop() {
        total += sizes[i];
        if total > limit {
            return true;
        }
        for &j in &refs[i] {
            if !seen[j] {
                seen[j] = true;
                stack.push(j);
            }
        }
    }
    false
}

fn dominator_groups(
    closure: &ClosureGraph,
    names: &[&str],
    index: &HashMap<&str, usize>,
    refs: &[Vec<usize>],
    sizes: &[u64],
    popularity: &Popularity,
    max_layers: usize,
) -> Vec<Vec<usize>> {
    let n = names.len();
    let pop: Vec<u64> = names
        .iter()
        .map(|p| {
            let name = package_name(p);
            if ALWAYS_POPULAR.iter().any(|a| name.starts_with(a)) {
                ALWAYS_POPULAR_COUNT
            } else {
                popularity.get(p).unwrap_or(1).max(1)
            }
        })
        .collect();

    let mut graph: DiGraph<(), ()> = DiGraph::with_capacity(n + 1, n * 4);
    let nodes: Vec<NodeIndex> = (0..=n).map(|_| graph.add_node(())).collect();
    let root = nodes[n];
    let mut has_referrer = vec![false; n];
    for (i, r) in refs.iter().enumerate() {
        for &j in r {
            graph.add_edge(nodes[i], nodes[j], ());
            has_referrer[j] = true;
        }
    }
    let mut from_root = BTreeSet::new();
    for r in &closure.roots {
        if let Some(&i) = index.get(r.as_str()) {
            from_root.insert(i);
        }
    }
    for i in 0..n {
        // Unreferenced paths must hang off the root to be grouped at all.
        if !has_referrer[i]
            || pop[i] >= POPULAR_THRESHOLD
            || closure_exceeds(i, refs, sizes, BIG_CLOSURE)
        {
            from_root.insert(i);
        }
    }
    for &i in &from_root {
        graph.add_edge(root, nodes[i], ());
    }

    let doms = dominators::simple_fast(&graph, root);
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); n + 1];
    for (i, &node) in nodes[..n].iter().enumerate() {
        match doms.immediate_dominator(node) {
            Some(d) => children[d.index()].push(i),
            // Unreachable cannot happen (see above); keep it anyway.
            None => children[n].push(i),
        }
    }
    for c in &mut children {
        c.sort_unstable();
    }
    // Size of each node's whole dominator subtree, children before parents.
    let mut order = vec![n];
    let mut k = 0;
    while k < order.len() {
        order.extend_from_slice(&children[order[k]]);
        k += 1;
    }
    let mut subtree_size = vec![0u64; n + 1];
    for &v in order.iter().rev() {
        let own = if v < n { sizes[v] } else { 0 };
        subtree_size[v] = own + children[v].iter().map(|&c| subtree_size[c]).sum::<u64>();
    }

    // A group is a head plus the whole subtrees of its `open` children.
    // Leftover budget is spent splitting off the largest open subtree as
    // a group of its own (so big shared dependencies get their own layers).
    let mut split: Vec<(usize, Vec<usize>)> = children[n]
        .iter()
        .map(|&c| (c, children[c].clone()))
        .collect();
    while split.len() < max_layers {
        let best = split
            .iter()
            .enumerate()
            .flat_map(|(gi, (_, open))| open.iter().enumerate().map(move |(oi, &c)| (gi, oi, c)))
            .max_by(|a, b| {
                subtree_size[a.2]
                    .cmp(&subtree_size[b.2])
                    .then_with(|| b.2.cmp(&a.2))
            });
        let Some((gi, oi, c)) = best else { break };
        split[gi].1.remove(oi);
        split.push((c, children[c].clone()));
    }

    let mut groups: Vec<Group> = split
        .into_iter()
        .map(|(head, open)| {
            let mut members = vec![head];
            let mut stack = open;
            while let Some(v) = stack.pop() {
                members.push(v);
                stack.extend_from_slice(&children[v]);
            }
            let size: u64 = members.iter().map(|&i| sizes[i]).sum();
            Group {
                head,
                rating: u128::from(pop[head]) * u128::from(size),
                size,
                members,
            }
        })
        .collect();

    // Over budget: merge the two lowest rated until it fits.
    let key = |g: &Group| {
        (
            g.rating,
            g.members.iter().min().copied().unwrap_or(usize::MAX),
        )
    };
    groups.sort_by_key(key);
    while groups.len() > max_layers {
        let a = groups.remove(0);
        let b = groups.remove(0);
        let mut members = a.members;
        members.extend(b.members);
        let merged = Group {
            head: a.head,
            size: a.size + b.size,
            rating: a.rating + b.rating,
            members,
        };
        let at = groups.partition_point(|g| key(g) <= key(&merged));
        groups.insert(at, merged);
    }
    groups.into_iter().map(|g| g.members).collect()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::sources::nix::closure::StorePathInfo;

    pub(crate) fn sp(name: &str) -> String {
        // 32-character fake hash so package_name() strips it.
        format!("/nix/store/{:0>32}-{name}", name.len())
    }

    fn graph(roots: &[&str], nodes: &[(&str, u64, &[&str])]) -> ClosureGraph {
        ClosureGraph {
            roots: roots.iter().map(|r| sp(r)).collect(),
            paths: nodes
                .iter()
                .map(|(n, size, refs)| {
                    (
                        sp(n),
                        StorePathInfo {
                            path: sp(n),
                            nar_size: *size,
                            nar_hash: String::new(),
                            references: refs.iter().map(|r| sp(r)).collect(),
                        },
                    )
                })
                .collect(),
        }
    }

    fn check_partition(closure: &ClosureGraph, groups: &[LayerGroup]) {
        let mut all: Vec<&String> = groups.iter().flat_map(|g| &g.paths).collect();
        all.sort();
        let expected: Vec<&String> = closure.paths.keys().collect();
        assert_eq!(all, expected, "every path in exactly one layer");
        for g in groups {
            let size: u64 = g.paths.iter().map(|p| closure.paths[p].nar_size).sum();
            assert_eq!(g.size, size);
        }
    }

    #[test]
    fn under_budget_every_path_is_a_layer_and_images_share_them() {
        let a = graph(
            &["app"],
            &[
                ("app", 10, &["libc", "libfoo"]),
                ("libfoo", 20, &["libc"]),
                ("libc", 30, &[]),
            ],
        );
        let b = graph(
            &["tool"],
            &[
                ("tool", 5, &["libc", "libfoo"]),
                ("libfoo", 20, &["libc"]),
                ("libc", 30, &[]),
            ],
        );
        let pop = Popularity::new();
        let ga = group_layers(&a, &pop, 10).expect("groups");
        let gb = group_layers(&b, &pop, 10).expect("groups");
        check_partition(&a, &ga);
        assert_eq!(ga.len(), 3);
        // Dependencies first.
        assert_eq!(ga[0].paths, [sp("libc")]);
        assert_eq!(ga[1].paths, [sp("libfoo")]);
        assert_eq!(ga[2].paths, [sp("app")]);
        let ids_a: BTreeSet<Digest> = ga.iter().map(LayerGroup::id).collect();
        let ids_b: BTreeSet<Digest> = gb.iter().map(LayerGroup::id).collect();
        assert_eq!(
            ids_a.intersection(&ids_b).count(),
            2,
            "libc and libfoo shared"
        );
        // Exactly at the limit: closure of 3 with budget 4.
        assert_eq!(group_layers(&a, &pop, 4).expect("groups").len(), 3);
    }

    /// A closure of `n` leaf libraries under one app, plus a popular base.
    pub(crate) fn wide(n: usize) -> ClosureGraph {
        let names: Vec<String> = (0..n).map(|i| format!("lib{i:03}")).collect();
        let mut nodes: Vec<(String, u64, Vec<String>)> = names
            .iter()
            .enumerate()
            .map(|(i, name)| (name.clone(), 1000 + i as u64, vec!["glibc".to_owned()]))
            .collect();
        let mut app_refs = names.clone();
        app_refs.push("glibc".into());
        nodes.push(("app".into(), 50, app_refs));
        nodes.push(("glibc".into(), 5000, vec![]));
        ClosureGraph {
            roots: vec![sp("app")],
            paths: nodes
                .iter()
                .map(|(n, s, r)| {
                    (
                        sp(n),
                        StorePathInfo {
                            path: sp(n),
                            nar_size: *s,
                            nar_hash: String::new(),
                            references: r.iter().map(|x| sp(x)).collect(),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn over_budget_respects_the_budget_and_is_deterministic() {
        let closure = wide(40);
        let mut pop = Popularity::new();
        pop.insert("glibc", 300_000);
        for budget in [2, 3, 5, 10, 20, 41, 42] {
            let g1 = group_layers(&closure, &pop, budget).expect("groups");
            let g2 = group_layers(&closure, &pop, budget).expect("groups");
            assert_eq!(g1, g2, "deterministic at budget {budget}");
            assert!(g1.len() < budget, "{} layers for budget {budget}", g1.len());
            check_partition(&closure, &g1);
            if budget >= 3 {
                // Popular glibc keeps a layer of its own.
                assert!(
                    g1.iter().any(|g| g.paths == [sp("glibc")]),
                    "budget {budget}"
                );
            }
        }
        // With room, the split fills the budget.
        assert_eq!(group_layers(&closure, &pop, 30).expect("groups").len(), 29);
        assert!(matches!(
            group_layers(&closure, &pop, 1),
            Err(LayerError::BudgetTooSmall(1))
        ));
    }

    #[test]
    fn dominator_groups_follow_nixery() {
        // Nixery's example: root -> A, B, C, D; A, B, C -> E; C -> D -> F;
        // G is big. E is popular.
        let closure = graph(
            &["a", "b", "c", "d", "g"],
            &[
                ("a", 10, &["e"]),
                ("b", 10, &["e"]),
                ("c", 10, &["e", "d"]),
                ("d", 10, &["f"]),
                ("e", 10, &[]),
                ("f", 10, &[]),
                ("g", 200_000_000, &[]),
            ],
        );
        let mut pop = Popularity::new();
        pop.insert("e", 1000);
        // Budget 6 + 1: {A} {B} {C} {E} {D, F} {G}.
        let groups = group_layers(&closure, &pop, 7).expect("groups");
        check_partition(&closure, &groups);
        let sets: BTreeSet<Vec<String>> = groups.iter().map(|g| g.paths.clone()).collect();
        assert!(sets.contains(&vec![sp("d"), sp("f")]), "{sets:?}");
        assert!(sets.contains(&vec![sp("e")]));
        assert!(sets.contains(&vec![sp("g")]));
        // Budget 2 + 1: everything merges into two layers.
        assert_eq!(group_layers(&closure, &pop, 3).expect("groups").len(), 2);
    }
}
