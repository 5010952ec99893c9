//! File-system errors with their context: which operation on which path.
//! Every module that touches the disk reports through [`IoError`], so a
//! user reads "rename /var/cache/…: No space left on device", never a bare
//! OS error.

use std::io;
use std::path::{Path, PathBuf};

/// An I/O failure, with the operation and the path it was on.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct IoError {
    op: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

impl IoError {
    /// The OS error underneath.
    #[cfg(test)]
    pub(crate) fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }
}

/// For `map_err`: wraps an `io::Error` of `op` on `path`.
pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> IoError + 'a {
    move |source| IoError {
        op,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_what_failed_where() {
        let e = io_err("open", Path::new("/x/y"))(io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().starts_with("open /x/y: "), "{e}");
    }
}
