//! nixery-local: a registry mirror on the developer's machine. Nix images
//! are built on pull from the host's Nix store; every other image is pulled
//! through from its upstream once and then served from a local cache.
//!
//! # Layout
//!
//! Layers from top to bottom: a module uses only the ones below it
//! (`tests/layout.rs` checks this order). `telemetry` and `util` are leaves
//! that any layer may use.
//!
//! | folder | owns |
//! |---|---|
//! | `main.rs`, `cli/` (the binary) | parsing the command line, one file per command; the only place `anyhow` is used |
//! | [`app`] | wiring the daemon once: store, sources, registry, blobserve, the cache collector |
//! | [`http`] | the wire: accept loop and limits, routes, `error.rs` (the one conversion to the OCI error envelope), `range.rs`, bodies, `/files`, the status page |
//! | [`ops`] | running on a host: `setup/` (one file per client), the doctor's checks, systemd |
//! | [`config`] | flags, the config file and the defaults, resolved into the settings of the layers below |
//! | [`blobserve`] | files from inside images: request, image, extract, space, resolve, content |
//! | [`registry`] | the registry service: route a request to its source once, then answer from the store; `prefetch` |
//! | [`sources`] | where images come from, behind one interface: `nix/` (name, package set, evaluation, closure, command, runner, `layers/`, image), `mirror/` (revalidation, downloads, `upstream/`: auth, tokens, connect, TLS), `layout` (import) |
//! | [`store`] | the on-disk cache: `blobs`, `repos` (links and tags), `records`; `ingest` (the one commit path: blobs, then links, then the tag); `gc` |
//! | [`oci`] | the vocabulary: digests, references, media types, manifest structure, platforms, `Accept`, error codes |
//! | [`telemetry`] | metrics and the event log of the status page |
//! | [`util`] | single-flight, time, file-system errors |
//!
//! A change to what clients see on the wire belongs in `http`; to which
//! image answers a name, in `registry` and `sources`; to what is kept on
//! disk, in `store`.

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
