//! The customisation layer ([`write_customisation_layer`]): the requested
//! packages' top-level entries merged at `/` as symlinks into the store
//! (`buildEnv`-style), plus `/tmp`, `/usr/bin/env` and the CA bundle.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::compress::Compression;
use super::popularity::package_name;
use super::tarball::LayerWriter;
use super::{LayerError, LayerInfo};

/// Where the CA bundle goes (and what `SSL_CERT_FILE` points at).
pub(crate) const CA_BUNDLE: &str = "etc/ssl/certs/ca-bundle.crt";

/// What went into a customisation layer, for the image config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Customisation {
    /// `/etc/ssl/certs/ca-bundle.crt` exists in the image.
    pub(crate) ca_bundle: bool,
    /// What `/usr/bin/env` points at, if anything.
    pub(crate) env: Option<PathBuf>,
}

/// A node of the symlink tree: a real directory or a symlink.
enum Node {
    Dir {
        mode: u32,
        children: BTreeMap<OsString, Node>,
    },
    Link(PathBuf),
}

fn new_dir(mode: u32) -> Node {
    Node::Dir {
        mode,
        children: BTreeMap::new(),
    }
}

fn is_dir(p: &Path) -> bool {
    // Follows symlinks: a package's `bin` may itself be a link.
    fs::metadata(p).map(|m| m.is_dir()).unwrap_or(false)
}

/// Merges `src` into `children` under `name`, `buildEnv`-style: a name only
/// one package provides becomes a symlink to it; a directory several
/// provide becomes a real directory merged one level down. On a file
/// conflict the first package wins.
fn merge_into(children: &mut BTreeMap<OsString, Node>, name: OsString, src: PathBuf) {
    use std::collections::btree_map::Entry;
    match children.entry(name) {
        Entry::Vacant(v) => {
            v.insert(Node::Link(src));
        }
        Entry::Occupied(mut o) => {
            if !is_dir(&src) {
                tracing::debug!(path = %src.display(), "customisation layer: collision, first package wins");
                return;
            }
            let node = o.get_mut();
            if let Node::Link(existing) = node {
                if !is_dir(existing) {
                    tracing::debug!(path = %src.display(), "customisation layer: collision, first package wins");
                    return;
                }
                let existing = existing.clone();
                *node = expand_link(&existing);
            }
            if let Node::Dir { children, .. } = node {
                for (child, path) in dir_entries(&src) {
                    merge_into(children, child, path);
                }
            }
        }
    }
}

/// A directory node holding links to everything in `dir`.
fn expand_link(dir: &Path) -> Node {
    let mut children = BTreeMap::new();
    for (name, path) in dir_entries(dir) {
        children.insert(name, Node::Link(path));
    }
    Node::Dir {
        mode: 0o755,
        children,
    }
}

/// Entries of `dir` in byte order; unreadable directories count as empty
/// (the store is immutable, so this only happens on a broken store).
fn dir_entries(dir: &Path) -> Vec<(OsString, PathBuf)> {
    let mut out: Vec<(OsString, PathBuf)> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .map(|e| (e.file_name(), e.path()))
            .collect(),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "customisation layer: cannot list");
            Vec::new()
        }
    };
    out.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    out
}

/// Where `rel` would lead in the image: the store path behind it, if the
/// tree maps it to one.
fn resolve(root: &BTreeMap<OsString, Node>, rel: &Path) -> Option<PathBuf> {
    let mut children = root;
    let mut comps = rel.iter();
    while let Some(c) = comps.next() {
        match children.get(c)? {
            Node::Dir { children: next, .. } => children = next,
            Node::Link(target) => {
                let mut p = target.clone();
                p.extend(comps);
                return Some(p);
            }
        }
    }
    None
}

/// Makes `rel` a real directory in the tree (expanding links to
/// directories on the way); `None` when a file is in the way.
fn ensure_dir<'a>(
    mut children: &'a mut BTreeMap<OsString, Node>,
    rel: &Path,
) -> Option<&'a mut BTreeMap<OsString, Node>> {
    for c in rel.iter() {
        let node = children
            .entry(c.to_owned())
            .or_insert_with(|| new_dir(0o755));
        if let Node::Link(target) = node {
            if !is_dir(target) {
                return None;
            }
            let target = target.clone();
            *node = expand_link(&target);
        }
        match node {
            Node::Dir { children: next, .. } => children = next,
            Node::Link(_) => return None,
        }
    }
    Some(children)
}

/// The first of `closure` (in order) whose package name starts with one of
/// `prefixes` (earlier prefixes first) and which has `rel`.
fn find_in_closure(closure: &[String], prefixes: &[&str], rel: &str) -> Option<PathBuf> {
    prefixes.iter().find_map(|prefix| {
        closure
            .iter()
            .filter(|p| package_name(p).starts_with(prefix))
            .map(|p| Path::new(p).join(rel))
            .find(|p| p.exists())
    })
}

/// Writes the customisation layer: the top-level entries of `packages`
/// (store paths of the requested outputs, first wins on conflicts) merged
/// at `/` as symlinks into the store, `/tmp` (1777), `/usr/bin/env`
/// (the merged `bin/env`, else coreutils', else busybox's from `closure`)
/// and `/etc/ssl/certs/ca-bundle.crt` (the merged one, else cacert's from
/// `closure`). `closure` is searched in the order given; pass it sorted.
pub(crate) fn write_customisation_layer<W: Write>(
    packages: &[String],
    closure: &[String],
    compression: Compression,
    out: W,
) -> Result<(LayerInfo, Customisation), LayerError> {
    let mut root: BTreeMap<OsString, Node> = BTreeMap::new();
    for pkg in packages {
        for (name, path) in dir_entries(Path::new(pkg)) {
            // /tmp is ours; nix-support is build metadata, not for images.
            if name == "tmp" || name == "nix-support" {
                continue;
            }
            merge_into(&mut root, name, path);
        }
    }

    let packaged_env = resolve(&root, Path::new("usr/bin/env")).filter(|p| p.exists());
    let mut env = packaged_env.clone().or_else(|| {
        resolve(&root, Path::new("bin/env"))
            .filter(|p| p.exists())
            .or_else(|| find_in_closure(closure, &["coreutils", "busybox", ""], "bin/env"))
    });
    if packaged_env.is_none() {
        if let Some(target) = &env {
            match ensure_dir(&mut root, Path::new("usr/bin")) {
                Some(dir) => {
                    dir.insert("env".into(), Node::Link(target.clone()));
                }
                None => env = None,
            }
        }
    }

    let mut ca_bundle = resolve(&root, Path::new(CA_BUNDLE)).is_some_and(|p| p.exists());
    if !ca_bundle {
        if let Some(target) = find_in_closure(closure, &["nss-cacert", "cacert"], CA_BUNDLE) {
            if let Some(dir) = ensure_dir(&mut root, Path::new("etc/ssl/certs")) {
                dir.insert("ca-bundle.crt".into(), Node::Link(target));
                ca_bundle = true;
            }
        }
    }

    root.insert("tmp".into(), new_dir(0o1777));

    let mut w = LayerWriter::new(out, compression)?;
    write_tree(&mut w, &root, Path::new(""))?;
    let (info, _) = w.finish()?;
    Ok((info, Customisation { ca_bundle, env }))
}

fn write_tree<W: Write>(
    w: &mut LayerWriter<W>,
    children: &BTreeMap<OsString, Node>,
    prefix: &Path,
) -> Result<(), LayerError> {
    // BTreeMap<OsString> orders by bytes on Unix: the same order as
    // store-path layers.
    for (name, node) in children {
        let path = prefix.join(name);
        match node {
            Node::Link(target) => w.add_symlink(&path, target)?,
            Node::Dir { mode, children } => {
                w.add_dir(&path, *mode)?;
                write_tree(w, children, &path)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::os::unix::fs::symlink;

    use super::super::tarball::tests::entries;
    use crate::oci::digest::Digest;

    fn pkg(dir: &Path, name: &str, files: &[(&str, &str)]) -> String {
        let p = dir.join(format!("{:0>32}-{name}", 0));
        for (rel, content) in files {
            let f = p.join(rel);
            fs::create_dir_all(f.parent().expect("parent")).expect("mkdir");
            if let Some(target) = content.strip_prefix("->") {
                symlink(target, &f).expect("symlink");
            } else {
                fs::write(&f, content).expect("write");
            }
        }
        p.to_string_lossy().into_owned()
    }

    #[test]
    fn customisation_layer_merges_packages_as_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let a = pkg(
            d,
            "a-1",
            &[("bin/a", "a"), ("share/doc/a", "a"), ("tmp/x", "no")],
        );
        let b = pkg(
            d,
            "b-1",
            &[("bin/b", "b"), ("bin/a", "b's a"), ("etc/foo", "b")],
        );
        let coreutils = pkg(d, "coreutils-9.1", &[("bin/env", "env")]);
        let cacert = pkg(
            d,
            "nss-cacert-3.92",
            &[("etc/ssl/certs/ca-bundle.crt", "pem")],
        );
        let closure = vec![a.clone(), b.clone(), cacert.clone(), coreutils.clone()];

        let mut out = Vec::new();
        let (info, custom) = write_customisation_layer(
            &[a.clone(), b.clone()],
            &closure,
            Compression::None,
            &mut out,
        )
        .expect("layer");
        assert!(custom.ca_bundle);
        assert_eq!(custom.env, Some(Path::new(&coreutils).join("bin/env")));
        assert_eq!(info.diff_id, Digest::sha256_of(&out));

        let es = entries(&out);
        let listing: Vec<(String, Option<String>)> = es
            .iter()
            .map(|e| (e.path.clone(), e.link.clone()))
            .collect();
        let l = |p: &str, t: &str| (p.to_owned(), Some(t.to_owned()));
        let dirent = |p: &str| (p.to_owned(), None);
        assert_eq!(
            listing,
            [
                dirent("bin/"),
                l("bin/a", &format!("{a}/bin/a")),
                l("bin/b", &format!("{b}/bin/b")),
                dirent("etc/"),
                l("etc/foo", &format!("{b}/etc/foo")),
                dirent("etc/ssl/"),
                dirent("etc/ssl/certs/"),
                l(
                    "etc/ssl/certs/ca-bundle.crt",
                    &format!("{cacert}/{CA_BUNDLE}")
                ),
                l("share", &format!("{a}/share")),
                dirent("tmp/"),
                dirent("usr/"),
                dirent("usr/bin/"),
                l("usr/bin/env", &format!("{coreutils}/bin/env")),
            ]
        );
        let tmp = es.iter().find(|e| e.path == "tmp/").expect("tmp");
        assert_eq!(tmp.mode, 0o1777);
        assert_eq!(tmp.kind, tar::EntryType::Directory);

        // Same input, same bytes.
        let mut again = Vec::new();
        let (info2, _) =
            write_customisation_layer(&[a, b], &closure, Compression::Gzip, &mut again)
                .expect("layer");
        let mut third = Vec::new();
        let (info3, _) = write_customisation_layer(
            &[closure[0].clone(), closure[1].clone()],
            &closure,
            Compression::Gzip,
            &mut third,
        )
        .expect("layer");
        assert_eq!(again, third);
        assert_eq!(info2, info3);
        assert_eq!(info2.diff_id, info.diff_id);
    }

    #[test]
    fn customisation_layer_without_coreutils_or_cacert() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let busybox = pkg(
            d,
            "busybox",
            &[("bin/busybox", "bb"), ("bin/env", "->busybox")],
        );
        let hello = pkg(d, "hello-1.0", &[("bin/hello", "hi")]);
        let (_, custom) = write_customisation_layer(
            &[hello],
            std::slice::from_ref(&busybox),
            Compression::None,
            io::sink(),
        )
        .expect("layer");
        assert!(!custom.ca_bundle);
        assert_eq!(custom.env, Some(Path::new(&busybox).join("bin/env")));
    }
}
