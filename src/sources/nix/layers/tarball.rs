//! The deterministic layer tarball writer ([`LayerWriter`], [`write_layer`]):
//! store paths streamed in byte order of their paths, with normalised
//! headers, through the compressor into the sink, hashing the blob and the
//! tar on the way.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::compress::{Compression, Encoder, HashWriter};
use super::{LayerError, LayerInfo, STORE_DIR};
use crate::oci::digest::Digest;
use crate::util::fs::io_err;

/// The mtime of every entry: Nix's own for store contents.
pub(crate) const MTIME: u64 = 1;
/// Read buffer per file.
const READ_CHUNK: usize = 256 << 10;

type Sink<W> = HashWriter<Encoder<HashWriter<W>>>;

/// A deterministic layer tarball being written to `W`.
pub(crate) struct LayerWriter<W: Write> {
    tar: tar::Builder<Sink<W>>,
    compression: Compression,
    /// File read buffer.
    buf: Vec<u8>,
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    // GNU headers: long paths and link targets become GNU long-name
    // entries; user and group names stay empty.
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h.set_size(size);
    h
}

/// `tar_path` with a trailing slash, as tar writes directory names.
fn dir_name(tar_path: &Path) -> PathBuf {
    let mut s = tar_path.as_os_str().to_owned();
    s.push("/");
    PathBuf::from(s)
}

impl<W: Write> LayerWriter<W> {
    pub(crate) fn new(out: W, compression: Compression) -> Result<Self, LayerError> {
        // Uncompressed, blob and tar are the same bytes: hash them once.
        let hash_blob = compression != Compression::None;
        let encoder = Encoder::new(HashWriter::new(out, hash_blob), compression)
            .map_err(LayerError::Write)?;
        Ok(LayerWriter {
            tar: tar::Builder::new(HashWriter::new(encoder, true)),
            compression,
            buf: vec![0; READ_CHUNK],
        })
    }

    /// Adds a directory entry (no contents).
    pub(crate) fn add_dir(&mut self, tar_path: &Path, mode: u32) -> Result<(), LayerError> {
        let mut h = header(tar::EntryType::Directory, mode, 0);
        self.tar
            .append_data(&mut h, dir_name(tar_path), io::empty())
            .map_err(io_err("writing", tar_path))?;
        Ok(())
    }

    /// Adds a symlink entry.
    pub(crate) fn add_symlink(&mut self, tar_path: &Path, target: &Path) -> Result<(), LayerError> {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        self.tar
            .append_link(&mut h, tar_path, target)
            .map_err(io_err("writing", tar_path))?;
        Ok(())
    }

    /// Adds a regular file entry with in-memory contents.
    #[cfg(test)]
    pub(crate) fn add_file(
        &mut self,
        tar_path: &Path,
        mode: u32,
        data: &[u8],
    ) -> Result<(), LayerError> {
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
        self.tar
            .append_data(&mut h, tar_path, data)
            .map_err(io_err("writing", tar_path))?;
        Ok(())
    }

    /// Adds `fs_path` (file, symlink or directory tree) as `tar_path`,
    /// walking directories in byte order of names, depth first, without
    /// following symlinks. Files are streamed in 256 KiB reads.
    pub(crate) fn add_tree(&mut self, fs_path: &Path, tar_path: &Path) -> Result<(), LayerError> {
        struct Frame {
            fs: PathBuf,
            tar: PathBuf,
            // Reverse order, so `pop` yields the smallest name.
            names: Vec<OsString>,
        }
        let mut stack = Vec::new();
        if self.add_entry(fs_path, tar_path)? {
            stack.push(Frame {
                fs: fs_path.to_owned(),
                tar: tar_path.to_owned(),
                names: sorted_names_desc(fs_path)?,
            });
        }
        while let Some(frame) = stack.last_mut() {
            let Some(name) = frame.names.pop() else {
                stack.pop();
                continue;
            };
            let fs = frame.fs.join(&name);
            let tar = frame.tar.join(&name);
            if self.add_entry(&fs, &tar)? {
                let names = sorted_names_desc(&fs)?;
                stack.push(Frame { fs, tar, names });
            }
        }
        Ok(())
    }

    /// Adds one entry; returns whether it is a directory to descend into.
    fn add_entry(&mut self, fs_path: &Path, tar_path: &Path) -> Result<bool, LayerError> {
        let meta = fs::symlink_metadata(fs_path).map_err(io_err("stat", fs_path))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(fs_path).map_err(io_err("readlink", fs_path))?;
            self.add_symlink(tar_path, &target)?;
            Ok(false)
        } else if ft.is_dir() {
            self.add_dir(tar_path, 0o555)?;
            Ok(true)
        } else if ft.is_file() {
            // A NAR records only "executable or not": so do we.
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o555
            } else {
                0o444
            };
            let size = meta.len();
            let mut file = fs::File::open(fs_path).map_err(io_err("open", fs_path))?;
            let mut h = header(tar::EntryType::Regular, mode, size);
            // The tar crate writes the header (and any long-name entry);
            // the data goes straight to the sink in big chunks, because
            // its own copy loop feeds the compressor 8 KiB at a time.
            self.tar
                .append_data(&mut h, tar_path, io::empty())
                .map_err(io_err("writing", fs_path))?;
            let sink = self.tar.get_mut();
            let mut remaining = size;
            while remaining > 0 {
                let want = self
                    .buf
                    .len()
                    .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                let n = match file.read(&mut self.buf[..want]) {
                    Ok(0) => {
                        return Err(io_err("read", fs_path)(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "file shrank while being archived",
                        ))
                        .into())
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(io_err("read", fs_path)(e).into()),
                };
                sink.write_all(&self.buf[..n]).map_err(LayerError::Write)?;
                remaining -= n as u64;
            }
            let pad = (512 - size % 512) % 512;
            sink.write_all(&[0u8; 512][..pad as usize])
                .map_err(LayerError::Write)?;
            Ok(false)
        } else {
            Err(LayerError::UnsupportedFileType(fs_path.to_owned()))
        }
    }

    /// Ends the archive and the compressed stream; returns the layer's
    /// digests and the sink.
    pub(crate) fn finish(self) -> Result<(LayerInfo, W), LayerError> {
        let sink = self.tar.into_inner().map_err(LayerError::Write)?;
        let (encoder, diff_id, tar_size) = sink.finish();
        let diff_id = diff_id.unwrap_or_else(|| Digest::sha256_of(b""));
        let inner = encoder.finish().map_err(LayerError::Write)?;
        let (mut out, digest, size) = inner.finish();
        let digest = digest.unwrap_or_else(|| diff_id.clone());
        out.flush().map_err(LayerError::Write)?;
        Ok((
            LayerInfo {
                digest,
                size,
                diff_id,
                tar_size,
                compression: self.compression,
            },
            out,
        ))
    }
}

fn sorted_names_desc(dir: &Path) -> Result<Vec<OsString>, LayerError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("read", dir))? {
        names.push(entry.map_err(io_err("read", dir))?.file_name());
    }
    names.sort_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
    Ok(names)
}

/// The tar path of a store path: `/nix/store/x` → `nix/store/x`.
fn store_tar_path(path: &Path) -> Result<PathBuf, LayerError> {
    let rel = path
        .strip_prefix(STORE_DIR)
        .map_err(|_| LayerError::NotInStore(path.to_owned()))?;
    let mut comps = rel.components();
    match (comps.next(), comps.next()) {
        (Some(std::path::Component::Normal(_)), None) => {}
        _ => return Err(LayerError::NotInStore(path.to_owned())),
    }
    Ok(Path::new(&STORE_DIR[1..]).join(rel))
}

/// Writes one store-path layer: `nix/`, `nix/store/`, then each path (in
/// byte order, whatever order `paths` has) with all its contents, streamed
/// from the store through the compressor into `out`. Pass `&mut sink` to
/// keep using the sink afterwards.
pub(crate) fn write_layer<W: Write>(
    paths: &[PathBuf],
    compression: Compression,
    out: W,
) -> Result<LayerInfo, LayerError> {
    let mut sorted: Vec<(&PathBuf, PathBuf)> = paths
        .iter()
        .map(|p| store_tar_path(p).map(|t| (p, t)))
        .collect::<Result<_, _>>()?;
    sorted.sort_by(|a, b| a.1.as_os_str().as_bytes().cmp(b.1.as_os_str().as_bytes()));
    sorted.dedup_by(|a, b| a.1 == b.1);

    let mut w = LayerWriter::new(out, compression)?;
    w.add_dir(Path::new("nix"), 0o755)?;
    w.add_dir(Path::new("nix/store"), 0o755)?;
    for (fs_path, tar_path) in &sorted {
        w.add_tree(fs_path, tar_path)?;
    }
    w.finish().map(|(info, _)| info)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn write(path: &Path, data: &[u8], mode: u32) {
        fs::write(path, data).expect("write");
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// A fake store path with every kind of entry the tar writer must get
    /// right.
    fn fake_path(dir: &Path) -> PathBuf {
        let p = dir.join("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-fake-1.0");
        fs::create_dir_all(p.join("sub")).expect("mkdir");
        write(&p.join("file.txt"), b"hello\n", 0o644);
        write(&p.join("exec.sh"), b"#!/bin/sh\necho hi\n", 0o755);
        write(&p.join("Zeta"), b"upper sorts first", 0o444);
        write(&p.join("alpha"), b"", 0o444);
        write(&p.join("sub/deep.txt"), &vec![7u8; 300_000], 0o444);
        symlink(
            "/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-dep/bin/x",
            p.join("link-abs"),
        )
        .expect("symlink");
        symlink("sub", p.join("link-dir")).expect("symlink");
        let long_target = format!("/nix/store/{}", "t".repeat(150));
        symlink(&long_target, p.join("link-long")).expect("symlink");
        let long_dir = p.join("l".repeat(90));
        fs::create_dir_all(&long_dir).expect("mkdir");
        write(&long_dir.join("f".repeat(60)), b"long", 0o444);
        p
    }

    fn tar_of(fs_path: &Path, compression: Compression) -> (Vec<u8>, LayerInfo) {
        let mut out = Vec::new();
        let mut w = LayerWriter::new(&mut out, compression).expect("writer");
        w.add_tree(
            fs_path,
            Path::new("nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-fake-1.0"),
        )
        .expect("tree");
        let (info, _) = w.finish().expect("finish");
        (out, info)
    }

    pub(crate) struct Entry {
        pub(crate) path: String,
        pub(crate) kind: tar::EntryType,
        pub(crate) mode: u32,
        pub(crate) link: Option<String>,
        pub(crate) size: u64,
    }

    pub(crate) fn entries(tar_bytes: &[u8]) -> Vec<Entry> {
        let mut ar = tar::Archive::new(tar_bytes);
        let mut out = Vec::new();
        for e in ar.entries().expect("entries") {
            let e = e.expect("entry");
            let h = e.header();
            assert_eq!(h.mtime().expect("mtime"), MTIME);
            assert_eq!(h.uid().expect("uid"), 0);
            assert_eq!(h.gid().expect("gid"), 0);
            assert_eq!(h.username_bytes(), Some(&b""[..]));
            assert_eq!(h.groupname_bytes(), Some(&b""[..]));
            out.push(Entry {
                path: e.path().expect("path").to_string_lossy().into_owned(),
                kind: h.entry_type(),
                mode: h.mode().expect("mode"),
                link: e
                    .link_name()
                    .expect("link")
                    .map(|l| l.to_string_lossy().into_owned()),
                size: h.size().expect("size"),
            });
        }
        out
    }

    fn decompress(blob: &[u8], compression: Compression) -> Vec<u8> {
        let mut out = Vec::new();
        match compression {
            Compression::Gzip => {
                flate2::read::GzDecoder::new(blob)
                    .read_to_end(&mut out)
                    .expect("gunzip");
            }
            Compression::Zstd => {
                zstd::stream::read::Decoder::new(blob)
                    .expect("zstd")
                    .read_to_end(&mut out)
                    .expect("unzstd");
            }
            Compression::None => out.extend_from_slice(blob),
        }
        out
    }

    #[test]
    fn tar_entries_are_sorted_normalised_and_links_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = fake_path(dir.path());
        let (bytes, _) = tar_of(&p, Compression::None);
        let es = entries(&bytes);
        let base = "nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-fake-1.0";
        let rel: Vec<String> = es
            .iter()
            .map(|e| e.path.strip_prefix(base).expect("prefix").to_owned())
            .collect();
        let long = format!("/{}", "l".repeat(90));
        let expected = [
            "/".to_owned(),
            "/Zeta".into(),
            "/alpha".into(),
            "/exec.sh".into(),
            "/file.txt".into(),
            "/link-abs".into(),
            "/link-dir".into(),
            "/link-long".into(),
            format!("{long}/"),
            format!("{long}/{}", "f".repeat(60)),
            "/sub/".into(),
            "/sub/deep.txt".into(),
        ];
        assert_eq!(rel, expected);
        let by = |suffix: &str| {
            es.iter()
                .find(|e| e.path == format!("{base}{suffix}"))
                .expect("entry present")
        };
        assert_eq!(by("/").kind, tar::EntryType::Directory);
        assert_eq!(by("/").mode, 0o555);
        assert_eq!(by("/exec.sh").mode, 0o555);
        assert_eq!(by("/file.txt").mode, 0o444);
        assert_eq!(by("/sub/deep.txt").size, 300_000);
        let l = by("/link-dir");
        assert_eq!(l.kind, tar::EntryType::Symlink);
        assert_eq!(l.link.as_deref(), Some("sub"));
        assert_eq!(
            by("/link-abs").link.as_deref(),
            Some("/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-dep/bin/x")
        );
        assert_eq!(
            by("/link-long").link.as_deref(),
            Some(format!("/nix/store/{}", "t".repeat(150)).as_str())
        );
    }

    #[test]
    fn layers_are_byte_identical_and_digests_match() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = fake_path(dir.path());
        for c in [Compression::Gzip, Compression::Zstd, Compression::None] {
            let (a, ia) = tar_of(&p, c);
            let (b, ib) = tar_of(&p, c);
            assert_eq!(a, b, "{c} output differs between runs");
            assert_eq!(ia, ib);
            assert_eq!(ia.digest, Digest::sha256_of(&a));
            assert_eq!(ia.size, a.len() as u64);
            let tar = decompress(&a, c);
            assert_eq!(ia.diff_id, Digest::sha256_of(&tar));
            assert_eq!(ia.tar_size, tar.len() as u64);
            assert_eq!(tar.len() % 512, 0);
            if c == Compression::None {
                assert_eq!(ia.digest, ia.diff_id);
            }
        }
        let (gz, _) = tar_of(&p, Compression::Gzip);
        assert_eq!(&gz[..4], &[0x1f, 0x8b, 8, 0], "no FNAME/FEXTRA flags");
        assert_eq!(&gz[4..8], &[0, 0, 0, 0], "mtime 0");
        assert_eq!(gz[9], 255);
    }

    #[test]
    fn digests_are_pinned() {
        // Changing the header, walk order, gzip backend or level changes
        // every layer digest users have cached; this test notices.
        let layer = |c| {
            let mut w = LayerWriter::new(io::sink(), c).expect("writer");
            w.add_dir(Path::new("nix"), 0o755).expect("dir");
            w.add_file(Path::new("nix/x"), 0o444, b"pinned\n")
                .expect("file");
            w.add_symlink(Path::new("nix/y"), Path::new("/nix/x"))
                .expect("link");
            w.finish().expect("finish").0
        };
        let diff_id = "sha256:dc6786c51961ff45aa471a7d89cf0a43b13d7aae641750b922a05f468084e481";
        let gz = layer(Compression::Gzip);
        assert_eq!(gz.diff_id.to_string(), diff_id);
        assert_eq!(
            gz.digest.to_string(),
            "sha256:0c998be1779166d4191fb1be6bab2217f8948c6dfec74fb4b977af4470183dd8"
        );
        let zst = layer(Compression::Zstd);
        assert_eq!(zst.diff_id.to_string(), diff_id);
        assert_eq!(
            zst.digest.to_string(),
            "sha256:8f884cdfaafa3fef4031c9ff71d669ba3d6166b6782362d391eb909b67ecfe7f"
        );
    }

    #[test]
    fn write_layer_refuses_paths_outside_the_store() {
        for bad in ["/etc", "/nix/store", "/nix/store/a/b", "nix/store/a"] {
            let err = write_layer(&[PathBuf::from(bad)], Compression::None, io::sink());
            assert!(matches!(err, Err(LayerError::NotInStore(_))), "{bad}");
        }
    }

    fn built_closure(name: &str) -> crate::sources::nix::runner::BuiltImage {
        use crate::sources::nix::command::{Nix, NixConfig};
        use crate::sources::nix::name::ImageName;
        use crate::sources::nix::pkgset::PkgSource;
        let nix = Nix::new(NixConfig {
            options: vec![("substituters".into(), String::new())],
            ..NixConfig::default()
        });
        let source = PkgSource::Path {
            path: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pkgs"),
        };
        nix.build(&source, &ImageName::parse(name).expect("name"), None)
            .expect("nix builds tests/pkgs (is nix-bin installed?)")
    }

    #[test]
    fn real_store_layers_match_gnu_tar() {
        let built = built_closure("greet");
        let paths: Vec<PathBuf> = built.closure.paths.keys().map(PathBuf::from).collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("layer.tar.gz");
        let info = write_layer(
            &paths,
            Compression::Gzip,
            fs::File::create(&file).expect("create"),
        )
        .expect("layer");
        let again = write_layer(&paths, Compression::Gzip, io::sink()).expect("layer");
        assert_eq!(info, again);
        let blob = fs::read(&file).expect("read");
        assert_eq!(info.digest, Digest::sha256_of(&blob));

        let listing = std::process::Command::new("tar")
            .arg("-tvzf")
            .arg(&file)
            .output()
            .expect("tar runs");
        assert!(listing.status.success(), "{listing:?}");
        let text = String::from_utf8_lossy(&listing.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].ends_with(" nix/"), "{}", lines[0]);
        assert!(lines[1].ends_with(" nix/store/"), "{}", lines[1]);
        let greet = built.evaluation.packages[0].outputs[0]
            .path
            .trim_start_matches('/');
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("-r-xr-xr-x 0/0")
                    && l.ends_with(&format!("{greet}/bin/greet"))),
            "{text}"
        );
        // busybox's applets are symlinks, not copies.
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("lrwxrwxrwx") && l.ends_with("/bin/sh -> busybox")),
            "{text}"
        );
        assert!(lines.iter().all(|l| l.contains(" 1970-01-01 ")), "{text}");
    }
}
