//! The vocabulary of the OCI distribution and image specs: digests, names
//! and references, media types and manifest structure. Everything above
//! speaks in these types; nothing here does I/O.

pub mod accept;
pub mod digest;
pub mod error_code;
pub mod manifest;
pub mod platform;
pub mod reference;
