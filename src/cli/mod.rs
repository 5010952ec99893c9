//! The command line: one file per command. Each command turns its
//! arguments into settings, runs, and reports through [`Failure`], so a
//! mistake of the user's exits with one status ([`EXIT_USAGE`]) and one
//! message form everywhere.

mod build;
mod cache;
mod doctor;
mod gc;
mod import;
mod ls;
mod prefetch;
mod serve;
mod setup;

use std::fmt::Display;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use nixery_local::config::{ConfigError, Options, Settings};
use nixery_local::ops::setup::SetupCommand;
use nixery_local::sources::mirror::upstream::Upstreams;

use cache::CacheArgs;

/// sysexits' EX_USAGE: the command line or config file is wrong.
const EXIT_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "nixery-local",
    version,
    about = "A local registry mirror: Nix images built on pull, and a pull-through cache for every other registry"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The config file and flags every daemon-like command takes.
#[derive(Args)]
struct Common {
    /// TOML file with any of the options below (same names, e.g.
    /// `state-dir = "/var/cache/nixery-local"`); flags win over it [default,
    /// but for `serve`: /etc/nixery-local/config.toml when it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    options: Options,
}

impl Common {
    fn settings(self) -> Result<Settings, Failure> {
        settings(self.config, self.options)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry daemon.
    Serve(Common),
    /// Seed the cache from an OCI image layout, as if REF had been pulled.
    Import(import::ImportArgs),
    /// Build a Nix image into the cache without a server (to warm the cache
    /// before going offline), then print its digest and layers.
    Build {
        #[command(flatten)]
        common: Common,
        /// The image: package attribute paths joined by `/`, as in a pull of
        /// `nix.local/NAME[:TAG]`, e.g. `shell/git/htop` or `hello:latest`.
        name: String,
    },
    /// Evict least recently used images until the cache is within
    /// --max-cache-size, and delete blobs nothing needs.
    Gc(gc::GcArgs),
    /// List the cached images: registry, repository, tag, digest, size, last use.
    Ls(CacheArgs),
    /// Pull images into the cache (Nix images are built, others fetched from
    /// upstream) to use them offline later, e.g. `nix/shell/git`,
    /// `docker.io/library/alpine:3.20`.
    Prefetch {
        #[command(flatten)]
        common: Common,
        #[arg(required = true, value_name = "REF")]
        images: Vec<String>,
    },
    /// Check Nix, the package source, the state dir, the daemon and each
    /// container client's mirror config, and say what is wrong.
    Doctor(doctor::DoctorArgs),
    /// Point a container client at the daemon by writing its mirror config.
    Setup {
        #[command(subcommand)]
        client: SetupCommand,
    },
}

/// Why a command did not succeed.
pub enum Failure {
    /// The command line or the config is wrong: exit [`EXIT_USAGE`].
    Usage(String),
    /// The command ran and failed.
    Failed(anyhow::Error),
    /// The command already reported what failed (doctor's checks).
    Reported,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure::Failed(e.into())
    }
}

/// A mistake of the user's, in the command line or the config file.
fn usage(e: impl Display) -> Failure {
    Failure::Usage(e.to_string())
}

impl Cli {
    /// Parses the command line; `--help` and `--version` print and exit 0.
    pub fn parse_or_exit() -> Result<Cli, ExitCode> {
        match Cli::try_parse() {
            Ok(cli) => Ok(cli),
            Err(e) if !e.use_stderr() => {
                let _ = e.print();
                Err(ExitCode::SUCCESS)
            }
            Err(e) => Err(report(Failure::Usage(
                first_line(&e.to_string()).to_owned(),
            ))),
        }
    }

    pub fn run(self) -> ExitCode {
        let result = match self.command {
            Command::Serve(common) => serve::run(common),
            Command::Import(args) => import::run(args),
            Command::Build { common, name } => build::run(common, &name),
            Command::Gc(args) => gc::run(args),
            Command::Ls(args) => ls::run(args),
            Command::Prefetch { common, images } => prefetch::run(common, &images),
            Command::Doctor(args) => doctor::run(args),
            Command::Setup { client } => setup::run(&client),
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(f) => report(f),
        }
    }
}

fn report(failure: Failure) -> ExitCode {
    match failure {
        Failure::Usage(reason) => {
            eprintln!("nixery-local: {}", reason.trim_start_matches("error: "));
            ExitCode::from(EXIT_USAGE)
        }
        Failure::Failed(e) => {
            eprintln!("nixery-local: {e:#}");
            ExitCode::FAILURE
        }
        Failure::Reported => ExitCode::FAILURE,
    }
}

fn first_line(s: &str) -> &str {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s)
}

/// Flags over the config file over the defaults.
fn settings(config: Option<PathBuf>, flags: Options) -> Result<Settings, Failure> {
    let options = match config {
        Some(path) => {
            let file = Options::from_file(&path).map_err(usage)?;
            flags.or(file).map_err(usage)?
        }
        None => flags,
    };
    options.resolve().map_err(|e: ConfigError| usage(e))
}

/// The upstream registries; a CA file that cannot be read is a
/// configuration error too.
fn upstreams(settings: &Settings) -> Result<Upstreams, Failure> {
    Upstreams::new(settings.upstream.clone()).map_err(usage)
}

/// A multi-threaded runtime for the commands that serve or fetch.
fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    use anyhow::Context;
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?)
}
