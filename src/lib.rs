//! nixery-local: a local registry mirror. Requests enter at [`http`], which
//! calls the [`registry`] service, which reads the content-addressed
//! [`store`]. [`import`] seeds the store from OCI layouts.

pub mod blobserve;
pub mod builder;
pub mod chunks;
pub mod config;
pub mod digest;
pub mod doctor;
pub mod gc;
pub mod http;
pub mod image;
pub mod import;
pub mod layers;
pub mod manifest;
pub mod metrics;
pub mod mirror;
pub mod nix;
pub mod prefetch;
pub mod reference;
pub mod registry;
pub mod setup;
pub mod status;
pub mod store;
pub mod systemd;
pub mod upstream;
