//! nixery-local: a local registry mirror.

pub mod app;
pub mod blobserve;
pub mod config;
pub mod http;
pub mod oci;
pub mod ops;
pub mod registry;
pub mod sources;
pub mod store;
pub mod telemetry;
pub mod util;
