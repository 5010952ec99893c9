//! `nixery-local import LAYOUT REF`: seeds the cache from an OCI image
//! layout, as if REF had been pulled.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use nixery_local::app::open_store;
use nixery_local::config::Options;
use nixery_local::oci::reference::ImageRef;

use super::{settings, usage, Failure};

#[derive(Args)]
pub struct ImportArgs {
    /// TOML config file (only `state-dir` matters here).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The cache directory (defaults as for `serve`).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The layout directory, as written by `skopeo copy … oci:DIR:TAG`.
    layout: PathBuf,
    /// The image it becomes, e.g. docker.io/library/alpine:3.20.
    reference: String,
}

pub fn run(args: ImportArgs) -> Result<(), Failure> {
    let options = Options {
        state_dir: args.state_dir,
        ..Options::default()
    };
    let settings = settings(args.config, options)?;
    let reference: ImageRef = args.reference.parse().map_err(usage)?;
    let store = open_store(&settings)?;
    let digest = nixery_local::sources::layout::import_layout(&store, &args.layout, &reference)
        .with_context(|| format!("importing {} as {reference}", args.layout.display()))?;
    println!("imported {reference} {digest}");
    Ok(())
}
