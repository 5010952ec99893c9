//! The vocabulary of the OCI distribution and image specs: digests, names
//! and references, media types and manifest structure. Everything above
//! speaks in these types; nothing here does I/O.

pub(crate) mod accept;
pub(crate) mod client;
pub(crate) mod digest;
pub(crate) mod error_code;
pub(crate) mod manifest;
pub(crate) mod platform;
pub mod reference;
