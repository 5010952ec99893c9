//! The shape of `src/` that `lib.rs`'s `# Layout` doc promises: no module
//! depends on another that depends back on it (through `crate::` and
//! `super::` paths, tests aside), every module opens with a `//!` doc, no
//! source file is much over 800 lines, and every folder is in the doc.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 850;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `a::b::c` for `src/a/b/c.rs` or `src/a/b/c/mod.rs`; `None` for the
/// crate roots and the binary's own modules.
fn module_of(path: &Path) -> Option<String> {
    let rel = path.strip_prefix(src()).ok()?.with_extension("");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    match parts.first().map(String::as_str) {
        None | Some("lib") | Some("main") | Some("cli") => None,
        _ => Some(parts.join("::")),
    }
}

/// The code of a file without its `#[cfg(test)]` tail and comment lines.
fn code(text: &str) -> String {
    let body = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    let body = body
        .split("#[cfg(test)]\npub(crate) mod tests")
        .next()
        .unwrap_or(body);
    let body = body
        .split("#[cfg(test)]\npub(super) mod tests")
        .next()
        .unwrap_or(body);
    body.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `prefix::a::b…` path in `code`, as its list of components.
fn paths_after<'a>(code: &'a str, prefix: &str) -> Vec<Vec<&'a str>> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let parts: Vec<&str> = rest[..end].split("::").filter(|p| !p.is_empty()).collect();
        found.push(parts);
    }
    found
}

fn graph() -> (BTreeSet<String>, BTreeMap<String, BTreeSet<String>>) {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let modules: BTreeMap<String, PathBuf> = files
        .iter()
        .filter_map(|f| module_of(f).map(|m| (m, f.clone())))
        .collect();
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    // The longest known module a path starts with.
    let resolve = |parts: &[&str]| -> Option<String> {
        (1..=parts.len())
            .rev()
            .map(|k| parts[..k].join("::"))
            .find(|m| names.contains(m))
    };
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in &modules {
        let code = code(&fs::read_to_string(file).expect("read"));
        let parent: Vec<&str> = module.split("::").collect();
        let parent = &parent[..parent.len() - 1];
        let mut targets: Vec<Option<String>> = paths_after(&code, "crate::")
            .iter()
            .map(|p| resolve(p))
            .collect();
        for p in paths_after(&code, "super::") {
            let full: Vec<&str> = parent.iter().copied().chain(p).collect();
            targets.push(resolve(&full));
        }
        for t in targets.into_iter().flatten() {
            // A parent's `mod`/`use` of its children is how Rust nests, not a
            // dependency back up.
            let is_ancestor = module.starts_with(&format!("{t}::"));
            let is_child = t.starts_with(&format!("{module}::"));
            if t != *module && !is_ancestor && !is_child {
                edges.entry(module.clone()).or_default().insert(t);
            }
        }
    }
    (names, edges)
}

#[test]
fn no_module_depends_on_one_that_depends_back() {
    let (names, edges) = graph();
    // Top level and within each folder: collapse modules to their prefix
    // at each depth and look for a cycle there.
    for depth in 1..=4 {
        let at = |m: &str| m.split("::").take(depth).collect::<Vec<_>>().join("::");
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, tos) in &edges {
            for to in tos {
                let (a, b) = (at(from), at(to));
                // Only siblings at this depth: same parent, different module.
                let parent = |m: &str| m.rsplit_once("::").map(|(p, _)| p.to_owned());
                if a != b && parent(&a) == parent(&b) {
                    g.entry(a).or_default().insert(b);
                }
            }
        }
        for start in names.iter().map(|m| at(m)).collect::<BTreeSet<_>>() {
            let mut stack = vec![(start.clone(), vec![start.clone()])];
            while let Some((node, path)) = stack.pop() {
                for next in g.get(&node).into_iter().flatten() {
                    assert!(
                        *next != start,
                        "dependency cycle: {} -> {start}",
                        path.join(" -> ")
                    );
                    if !path.contains(next) && path.len() < 12 {
                        let mut p = path.clone();
                        p.push(next.clone());
                        stack.push((next.clone(), p));
                    }
                }
            }
        }
    }
}

#[test]
fn modules_are_documented_and_small() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    for f in &files {
        let text = fs::read_to_string(f).expect("read");
        let rel = f.strip_prefix(src()).expect("in src").display().to_string();
        assert!(
            text.starts_with("//!"),
            "src/{rel} does not open with a //! doc saying what it owns"
        );
        let lines = text.lines().count();
        assert!(
            lines <= MAX_LINES,
            "src/{rel} has {lines} lines (at most {MAX_LINES})"
        );
    }
}

#[test]
fn the_layout_doc_names_every_folder() {
    let lib = fs::read_to_string(src().join("lib.rs")).expect("lib.rs");
    for entry in fs::read_dir(src()).expect("src") {
        let path = entry.expect("entry").path();
        let name = path
            .file_stem()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if name == "lib" || name == "main" {
            continue;
        }
        assert!(
            lib.contains(&format!("[`{name}`]")) || lib.contains(&format!("`{name}/`")),
            "lib.rs's # Layout doc does not name src/{name}"
        );
    }
}

/// The layers of lib.rs's table, top first; the leaves any layer may use.
const LAYERS: [&str; 9] = [
    "app",
    "http",
    "ops",
    "config",
    "blobserve",
    "registry",
    "sources",
    "store",
    "oci",
];
const LEAVES: [&str; 2] = ["telemetry", "util"];

#[test]
fn top_level_modules_only_use_the_layers_below() {
    let (names, edges) = graph();
    let top = |m: &str| m.split("::").next().unwrap_or(m).to_owned();
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    for name in names.iter().map(|m| top(m)).collect::<BTreeSet<_>>() {
        assert!(
            rank(&name).is_some() || LEAVES.contains(&name.as_str()),
            "src/{name} is in neither LAYERS nor LEAVES of tests/layout.rs (nor lib.rs's table?)"
        );
    }
    // The table in lib.rs lists them in the same order.
    let lib = fs::read_to_string(src().join("lib.rs")).expect("lib.rs");
    let at = |m: &str| lib.find(&format!("| [`{m}`]"));
    let positions: Vec<_> = LAYERS.iter().map(|m| (m, at(m))).collect();
    for pair in positions.windows(2) {
        let ((a, pa), (b, pb)) = (pair[0], pair[1]);
        assert!(
            pa.is_some() && pb.is_some() && pa < pb,
            "lib.rs's table must list {a} above {b}"
        );
    }
    for (from, tos) in &edges {
        let (a, ra) = (top(from), rank(&top(from)));
        for to in tos {
            let (b, rb) = (top(to), rank(&top(to)));
            if a == b {
                continue;
            }
            let leaf = |m: &str| LEAVES.iter().position(|l| *l == m);
            let ok = match (ra, rb, leaf(&a), leaf(&b)) {
                // A layer uses a layer below it, or a leaf.
                (Some(x), Some(y), _, _) => x < y,
                (Some(_), None, _, Some(_)) => true,
                // A leaf uses only the leaves after it (telemetry uses util).
                (None, None, Some(x), Some(y)) => x < y,
                _ => false,
            };
            assert!(ok, "{from} uses {to}: {a} may use only the layers below it");
        }
    }
}
