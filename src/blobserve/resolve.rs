//! Lookup over the layer stack: a path resolved top-down through the
//! extracted layers, honouring whiteouts (`.wh.NAME`) and opaque directories
//! (`.wh..wh..opq`), with symlinks resolved component by component inside
//! the image root (absolute targets are relative to the image root and `..`
//! at the root stays there); and the merged listing of a directory.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::blobserve::request::components;
use crate::blobserve::{BlobserveError, DirEntry};
use crate::util::fs::io_err;

/// Symlinks followed in one lookup before giving up (as Linux's ELOOP).
pub(crate) const MAX_SYMLINK_HOPS: usize = 40;

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

pub(super) enum Resolved {
    /// A directory: its path and the layers (indexes, top first) contributing to it.
    Dir {
        path: Vec<String>,
        stack: Vec<usize>,
    },
    /// A regular file in layer `layer`.
    File { path: Vec<String>, layer: usize },
}

pub(super) fn join(base: &Path, parts: &[String]) -> PathBuf {
    let mut p = base.to_path_buf();
    p.extend(parts);
    p
}

/// What `name` is inside the directory `dir` (whose contributing layers are
/// `stack`): a directory with its own stack, or a non-directory in one layer.
enum Child {
    Missing,
    Dir(Vec<usize>),
    Other { layer: usize, meta: fs::Metadata },
}

fn child(layers: &[&Path], dir: &[String], stack: &[usize], name: &str) -> Child {
    let mut dir_stack = Vec::new();
    for &l in stack {
        let base = join(layers[l], dir);
        if fs::symlink_metadata(base.join(format!("{WHITEOUT}{name}"))).is_ok() {
            break;
        }
        match fs::symlink_metadata(base.join(name)) {
            Ok(m) if m.is_dir() => {
                dir_stack.push(l);
                if fs::symlink_metadata(base.join(name).join(OPAQUE)).is_ok() {
                    break;
                }
            }
            Ok(m) => {
                if dir_stack.is_empty() {
                    return Child::Other { layer: l, meta: m };
                }
                // A directory above hides a non-directory below.
                break;
            }
            Err(_) => {}
        }
    }
    if dir_stack.is_empty() {
        Child::Missing
    } else {
        Child::Dir(dir_stack)
    }
}

/// Resolves `path` in the merged image, following symlinks (also the final
/// one) inside the root.
pub(super) fn resolve(layers: &[&Path], path: &str) -> Result<Resolved, BlobserveError> {
    let root_stack = {
        let mut s = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            s.push(i);
            if fs::symlink_metadata(l.join(OPAQUE)).is_ok() {
                break;
            }
        }
        s
    };
    // The resolved directories so far: (name, stack of that directory).
    let mut cur: Vec<(String, Vec<usize>)> = Vec::new();
    let mut todo: std::collections::VecDeque<String> =
        components(path).map(str::to_owned).collect();
    let mut hops = 0;
    let names = |cur: &[(String, Vec<usize>)]| cur.iter().map(|c| c.0.clone()).collect::<Vec<_>>();
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            cur.pop();
            continue;
        }
        if name.starts_with(WHITEOUT) {
            return Err(BlobserveError::NotFound(format!("/{path}")));
        }
        let dir = names(&cur);
        let stack = cur.last().map_or(&root_stack, |c| &c.1).clone();
        match child(layers, &dir, &stack, &name) {
            Child::Missing => return Err(BlobserveError::NotFound(format!("/{path}"))),
            Child::Dir(s) => cur.push((name, s)),
            Child::Other { layer, meta } if meta.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(BlobserveError::SymlinkLoop(format!("/{path}")));
                }
                let link_path = join(layers[layer], &dir).join(&name);
                let target = fs::read_link(&link_path).map_err(io_err("readlink", &link_path))?;
                let target = target.as_os_str().as_bytes();
                let target = String::from_utf8_lossy(target).into_owned();
                if target.starts_with('/') {
                    cur.clear();
                }
                for c in components(&target).rev() {
                    todo.push_front(c.to_owned());
                }
            }
            Child::Other { layer, meta } => {
                if meta.is_file() && todo.is_empty() {
                    let mut p = dir;
                    p.push(name);
                    return Ok(Resolved::File { path: p, layer });
                }
                if meta.is_file() {
                    return Err(BlobserveError::NotADirectory(format!("/{path}")));
                }
                return Err(BlobserveError::NotFound(format!("/{path}")));
            }
        }
    }
    let stack = cur.last().map_or(&root_stack, |c| &c.1).clone();
    Ok(Resolved::Dir {
        path: names(&cur),
        stack,
    })
}

/// The merged entries of a directory, minus whiteouts, sorted by name.
pub(super) fn list(
    layers: &[&Path],
    dir: &[String],
    stack: &[usize],
) -> Result<Vec<DirEntry>, BlobserveError> {
    let mut seen: BTreeMap<String, DirEntry> = BTreeMap::new();
    let mut hidden: HashSet<String> = HashSet::new();
    for &l in stack {
        let base = join(layers[l], dir);
        let rd = fs::read_dir(&base).map_err(io_err("read", &base))?;
        let mut whiteouts = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(hidden_name) = name.strip_prefix(WHITEOUT) {
                if name != OPAQUE {
                    whiteouts.push(hidden_name.to_owned());
                }
                continue;
            }
            if seen.contains_key(&name) || hidden.contains(&name) {
                continue;
            }
            let Ok(m) = e.metadata() else { continue };
            let ft = m.file_type();
            let (kind, target) = if ft.is_dir() {
                ("dir", None)
            } else if ft.is_symlink() {
                let t = fs::read_link(e.path())
                    .ok()
                    .map(|t| t.to_string_lossy().into_owned());
                ("symlink", t)
            } else {
                ("file", None)
            };
            let modified = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs());
            seen.insert(
                name.clone(),
                DirEntry {
                    name,
                    kind,
                    size: if ft.is_dir() { 0 } else { m.len() },
                    target,
                    modified,
                },
            );
        }
        hidden.extend(whiteouts);
    }
    Ok(seen.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(dir: &Path, files: &[(&str, &str)], links: &[(&str, &str)], dirs: &[&str]) {
        for d in dirs {
            fs::create_dir_all(dir.join(d)).expect("mkdir");
        }
        for (p, c) in files {
            let p = dir.join(p);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            fs::write(p, c).expect("write");
        }
        for (p, t) in links {
            let p = dir.join(p);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::os::unix::fs::symlink(t, p).expect("symlink");
        }
    }

    #[test]
    fn lookups_honour_whiteouts_opaque_dirs_and_stay_in_the_root() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (low, high) = (tmp.path().join("low"), tmp.path().join("high"));
        layer(
            &low,
            &[
                ("etc/passwd", "root"),
                ("etc/gone", "x"),
                ("opq/old", "o"),
                ("etc/hostname", "image-host"),
            ],
            &[],
            &[],
        );
        layer(
            &high,
            &[
                ("etc/.wh.gone", ""),
                ("opq/.wh..wh..opq", ""),
                ("opq/new", "n"),
            ],
            &[
                ("abs", "/etc/passwd"),
                ("up", "../../../../etc/hostname"),
                ("loop", "loop"),
                ("etcdir", "/etc"),
            ],
            &[],
        );
        let layers = [high.as_path(), low.as_path()];
        let file = |p: &str| match resolve(&layers, p) {
            Ok(Resolved::File { path, layer }) => {
                fs::read_to_string(join(layers[layer], &path)).expect("read")
            }
            Ok(Resolved::Dir { .. }) => "<dir>".into(),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(file("etc/passwd"), "root");
        assert_eq!(file("abs"), "root");
        assert_eq!(file("up"), "image-host");
        assert_eq!(file("etcdir/../../etc/passwd"), "root");
        assert_eq!(file("etcdir/hostname"), "image-host");
        assert!(file("etc/gone").starts_with("error: no such"));
        assert!(file("opq/old").starts_with("error: no such"));
        assert_eq!(file("opq/new"), "n");
        assert!(file("loop").starts_with("error: too many"));
        assert!(file("etc/.wh.gone").starts_with("error"));
        let Ok(Resolved::Dir { path, stack }) = resolve(&layers, "opq") else {
            panic!("opq is a dir");
        };
        let names: Vec<String> = list(&layers, &path, &stack)
            .expect("list")
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["new"]);
        let Ok(Resolved::Dir { path, stack }) = resolve(&layers, "etc") else {
            panic!("etc is a dir");
        };
        let names: Vec<String> = list(&layers, &path, &stack)
            .expect("list")
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["hostname", "passwd"]);
    }
}
