//! `nixery-local import LAYOUT REF`: seeds the cache from an OCI image
//! layout, as if REF had been pulled.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use nixery_local::app::open_store;
use nixery_local::config::Options;
use nixery_local::oci::reference::ImageRef;

use super::cache::{Access, CacheArgs};
use super::{usage, Failure};

#[derive(Args)]
pub struct ImportArgs {
    #[command(flatten)]
    cache: CacheArgs,
    /// The layout directory, as written by `skopeo copy … oci:DIR:TAG`.
    layout: PathBuf,
    /// The image it becomes, e.g. docker.io/library/alpine:3.20.
    reference: String,
}

pub fn run(args: ImportArgs) -> Result<(), Failure> {
    let settings = args.cache.settings(Options::default(), Access::Write)?;
    let reference: ImageRef = args.reference.parse().map_err(usage)?;
    let store = open_store(&settings)?;
    let digest = nixery_local::sources::layout::import_layout(&store, &args.layout, &reference)
        .with_context(|| format!("importing {} as {reference}", args.layout.display()))?;
    println!("imported {reference} {digest}");
    Ok(())
}
