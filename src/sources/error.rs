//! A source's failure as the layers above need it: a kind that decides the
//! answer, and a message for the user. Each source converts its own typed
//! errors here, so the HTTP edge never matches on Nix or upstream details.

use std::fmt;

/// What went wrong, in the terms a registry client can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// The source has no such image or blob (a missing package, an upstream
    /// 404, a system this host cannot build for).
    NotFound,
    /// The name cannot name anything in this source.
    Invalid,
    /// The name is well formed, but names nothing this source can supply,
    /// and no other host serves it either (packages the package set lacks):
    /// the client must see why rather than fall back and say "not found".
    UnknownName,
    /// The source could not be reached or answered badly (an upstream that is
    /// down, refuses us, or sends bytes that fail verification).
    Unavailable,
    /// The source tried and failed in a way the user must see: a Nix
    /// evaluation or build error, with the tail of its log.
    Failed,
    /// A fault of this daemon (disk, a panicked task); details go to the log.
    Internal,
}

#[derive(Clone, Debug)]
pub struct SourceError {
    kind: ErrorKind,
    message: String,
}

impl SourceError {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> SourceError {
        SourceError {
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SourceError {}
