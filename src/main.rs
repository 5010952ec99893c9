//! The `nixery-local` command: parses the command line, sets up logging and
//! the runtime, and hands over to the library. The only place `anyhow` is used.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use nixery_local::blobserve::{Blobserve, BlobserveSettings};
use nixery_local::config::{ConfigError, Options, Settings};
use nixery_local::http::{self, ServerOptions};
use nixery_local::oci::reference::{ImageRef, RepoName, Tag};
use nixery_local::ops::setup::SetupCommand;
use nixery_local::ops::systemd;
use nixery_local::registry::Registry;
use nixery_local::sources::mirror::upstream::Upstreams;
use nixery_local::sources::mirror::Mirror;
use nixery_local::sources::nix::NixImages;
use nixery_local::store::gc::{self, Usage};
use nixery_local::store::Store;

/// sysexits' EX_USAGE: the command line or config file is wrong.
const EXIT_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "nixery-local",
    version,
    about = "A local registry mirror: Nix images built on pull, and a pull-through cache for every other registry"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry daemon.
    Serve {
        /// TOML file with any of the options below (same names, e.g.
        /// `state-dir = "/var/cache/nixery-local"`); flags win over it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        options: Options,
    },
    /// Seed the cache from an OCI image layout, as if REF had been pulled.
    Import {
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
    },
    /// Build a Nix image into the cache without a server (to warm the cache
    /// before going offline), then print its digest and layers.
    Build {
        /// TOML file with any of `serve`'s options; flags win over it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        options: Options,
        /// The image: package attribute paths joined by `/`, as in a pull of
        /// `nix.local/NAME[:TAG]`, e.g. `shell/git/htop` or `hello:latest`.
        name: String,
    },
    /// Evict least recently used images until the cache is within
    /// --max-cache-size, and delete blobs nothing needs.
    Gc {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        options: Options,
    },
    /// List the cached images: registry, repository, tag, digest, size, last use.
    Ls {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        options: Options,
    },
    /// Pull images into the cache (Nix images are built, others fetched from
    /// upstream) to use them offline later, e.g. `nix/shell/git`,
    /// `docker.io/library/alpine:3.20`.
    Prefetch {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        options: Options,
        #[arg(required = true, value_name = "REF")]
        images: Vec<String>,
    },
    /// Check Nix, the package source, the state dir, the daemon and each
    /// container client's mirror config, and say what is wrong.
    Doctor {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        options: Options,
    },
    /// Point a container client at the daemon by writing its mirror config.
    Setup {
        #[command(subcommand)]
        client: SetupCommand,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return usage_error(first_line(&e.to_string())),
    };
    init_logging();
    let result = match cli.command {
        Command::Serve { config, options } => {
            let settings = match settings(config, options) {
                Ok(s) => s,
                Err(e) => return usage_error(&e.to_string()),
            };
            // A CA file that cannot be read is a configuration error too.
            let upstreams = match Upstreams::new(settings.upstream.clone()) {
                Ok(u) => u,
                Err(e) => return usage_error(&e.to_string()),
            };
            serve(settings, upstreams)
        }
        Command::Import {
            config,
            state_dir,
            layout,
            reference,
        } => {
            let options = Options {
                state_dir,
                ..Options::default()
            };
            let settings = match settings(config, options) {
                Ok(s) => s,
                Err(e) => return usage_error(&e.to_string()),
            };
            let reference: ImageRef = match reference.parse() {
                Ok(r) => r,
                Err(e) => return usage_error(&e.to_string()),
            };
            import(&settings, &layout, &reference)
        }
        Command::Build {
            config,
            options,
            name,
        } => match settings(config, options) {
            Ok(s) => build(&s, &name),
            Err(e) => return usage_error(&e.to_string()),
        },
        Command::Prefetch {
            config,
            options,
            images,
        } => {
            let settings = match settings(config, options) {
                Ok(s) => s,
                Err(e) => return usage_error(&e.to_string()),
            };
            let mut refs = Vec::new();
            for image in &images {
                match image.parse::<ImageRef>() {
                    Ok(r) => refs.push(r),
                    Err(e) => return usage_error(&e.to_string()),
                }
            }
            let upstreams = match Upstreams::new(settings.upstream.clone()) {
                Ok(u) => u,
                Err(e) => return usage_error(&e.to_string()),
            };
            prefetch(&settings, upstreams, &refs)
        }
        Command::Doctor { config, options } => match settings(config, options) {
            Ok(s) => return doctor(&s),
            Err(e) => return usage_error(&e.to_string()),
        },
        Command::Gc { config, options } => match settings(config, options) {
            Ok(s) => collect_now(&s),
            Err(e) => return usage_error(&e.to_string()),
        },
        Command::Ls { config, options } => match settings(config, options) {
            Ok(s) => list(&s),
            Err(e) => return usage_error(&e.to_string()),
        },
        Command::Setup { client } => {
            let common = client.common();
            match settings(common.config.clone(), common.options.clone()) {
                Ok(s) => setup(&client, &s),
                Err(e) => return usage_error(&e.to_string()),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nixery-local: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s)
}

fn usage_error(reason: &str) -> ExitCode {
    eprintln!("nixery-local: {}", reason.trim_start_matches("error: "));
    ExitCode::from(EXIT_USAGE)
}

fn settings(config: Option<PathBuf>, flags: Options) -> Result<Settings, ConfigError> {
    let file = match config {
        Some(path) => Options::from_file(&path)?,
        None => Options::default(),
    };
    flags.or(file).resolve()
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NIXERY_LOCAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for people, not for journald or log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn open_store(settings: &Settings) -> anyhow::Result<Store> {
    Store::open(&settings.state_dir)
        .with_context(|| format!("opening the cache at {}", settings.state_dir.display()))
}

fn import(
    settings: &Settings,
    layout: &std::path::Path,
    reference: &ImageRef,
) -> anyhow::Result<()> {
    let store = open_store(settings)?;
    let digest = nixery_local::sources::layout::import_layout(&store, layout, reference)
        .with_context(|| format!("importing {} as {reference}", layout.display()))?;
    println!("imported {reference} {digest}");
    Ok(())
}

fn build(settings: &Settings, name: &str) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let (packages, tag) = match name.rsplit_once(':') {
        Some((p, t)) => (p, t),
        None => (name, "latest"),
    };
    let tag: Tag = tag.parse().context("invalid tag")?;
    let repo: RepoName = packages
        .parse()
        .context("invalid image name (lowercase attribute paths joined by '/')")?;
    let store = Arc::new(open_store(settings)?);
    let images = NixImages::new(store, settings.nix.clone());
    let progress = std::io::stderr().is_terminal();
    let report = images
        .build_now(repo.as_str(), &tag, progress)
        .with_context(|| format!("building {name}"))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "digest {}", report.record.manifests[0].digest)?;
    writeln!(
        out,
        "{:<12} {:>12}  {:<6}  store paths",
        "layer", "bytes", "cached"
    )?;
    for layer in &report.layers {
        let short = layer.digest.hex().get(..12).unwrap_or(layer.digest.hex());
        let paths = match layer.paths.as_slice() {
            [one] => one.clone(),
            [first, rest @ ..] => format!("{first} (+{} more)", rest.len()),
            [] => String::new(),
        };
        let cached = if layer.reused { "yes" } else { "no" };
        writeln!(
            out,
            "{short:<12} {:>12}  {cached:<6}  {:<6}  {paths}",
            layer.size, layer.shared_with
        )?;
    }
    Ok(())
}

fn setup(client: &SetupCommand, settings: &Settings) -> anyhow::Result<()> {
    nixery_local::ops::setup::run(client, settings, &mut std::io::stdout().lock())?;
    Ok(())
}

fn serve(settings: Settings, upstreams: Upstreams) -> anyhow::Result<()> {
    // systemd: before the runtime starts threads, as both unset variables.
    let inherited = systemd::listen_fds().context("taking the socket systemd passed")?;
    let notifier = systemd::Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "not sending notifications to systemd");
        systemd::Notifier::disabled()
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let store = Arc::new(open_store(&settings)?);
        let nix = Arc::new(NixImages::new(Arc::clone(&store), settings.nix.clone()));
        let mirror = Arc::new(Mirror::new(Arc::clone(&store), upstreams, settings.tag_ttl));
        let usage = Arc::new(Usage::load(&store).context("reading cache access times")?);
        let max_bytes = max_cache_bytes(&settings);
        let collector = tokio::spawn(collect_periodically(
            Arc::clone(&store),
            Arc::clone(&usage),
            max_bytes,
        ));
        let registry = Arc::new(
            Registry::new(Arc::clone(&store), settings.default_registry.clone())
                .with_nix(nix)
                .with_mirror(mirror)
                .with_usage(Arc::clone(&usage)),
        );
        let listener = match inherited {
            Some(listener) => {
                tracing::info!("using the socket systemd passed; --listen is ignored");
                listener
                    .set_nonblocking(true)
                    .context("setting up the socket systemd passed")?;
                tokio::net::TcpListener::from_std(listener)
                    .context("setting up the socket systemd passed")?
            }
            None => tokio::net::TcpListener::bind(settings.listen)
                .await
                .with_context(|| format!("listening on {}", settings.listen))?,
        };
        let addr = listener.local_addr().context("reading the bound address")?;
        tracing::info!(state_dir = %settings.state_dir.display(), default_registry = %settings.default_registry, "serving");
        // Tests and scripts wait for this exact line.
        let mut out = std::io::stdout().lock();
        writeln!(out, "nixery-local listening on http://{addr}").context("writing to stdout")?;
        out.flush().context("writing to stdout")?;
        drop(out);
        // blobserve (issue #6): files from inside images under /files/.
        let blobserve = {
            let max_bytes = settings
                .blobserve_max_bytes
                .or_else(|| gc::default_max_bytes(&settings.state_dir))
                .unwrap_or(u64::MAX);
            let root = store.root().join("extracted");
            let repos = settings.blobserve_repos.clone();
            let registry = Arc::clone(&registry);
            tokio::task::spawn_blocking(move || {
                Blobserve::new(
                    registry,
                    root,
                    BlobserveSettings { repos, max_bytes },
                )
            })
            .await
            .context("opening the extracted-layer space")?
            .context("opening the extracted-layer space")?
        };
        let options = ServerOptions {
            header_timeout: settings.header_timeout,
            max_connections: settings.max_connections,
            cache_limit: Some(max_bytes),
            blobserve: Some(Arc::new(blobserve)),
        };
        if let Err(e) = notifier.ready() {
            tracing::warn!(error = %e, "cannot tell systemd the daemon is ready");
        }
        let _watchdog = notifier.spawn_watchdog();
        let shutdown = async move {
            shutdown_signal().await;
            if let Err(e) = notifier.stopping() {
                tracing::warn!(error = %e, "cannot tell systemd the daemon is stopping");
            }
        };
        http::serve(listener, registry, options, shutdown).await;
        collector.abort();
        if let Err(e) = usage.save(&store) {
            tracing::warn!(error = %e, "cannot save cache access times");
        }
        Ok(())
    })
}

/// How often the collector checks the cache size and saves access times.
const GC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(300);

fn max_cache_bytes(settings: &Settings) -> u64 {
    settings
        .max_cache_bytes
        .or_else(|| gc::default_max_bytes(&settings.state_dir))
        .unwrap_or(u64::MAX)
}

/// Keeps the cache under its limit: at start, then every [`GC_INTERVAL`].
async fn collect_periodically(store: Arc<Store>, usage: Arc<Usage>, max_bytes: u64) {
    let mut tick = tokio::time::interval(GC_INTERVAL);
    loop {
        tick.tick().await;
        let (store, usage) = (Arc::clone(&store), Arc::clone(&usage));
        let run = tokio::task::spawn_blocking(move || {
            usage.save(&store)?;
            gc::collect(&store, max_bytes, &usage.snapshot(), gc::MIN_AGE)
        })
        .await;
        match run {
            Ok(Ok(r)) if !r.evicted.is_empty() || r.deleted_blobs > 0 => tracing::info!(
                evicted = r.evicted.len(),
                deleted_blobs = r.deleted_blobs,
                freed_bytes = r.freed_bytes,
                size = r.size_after,
                limit = max_bytes,
                "cache collected"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cache collection failed"),
            Err(e) => tracing::warn!(error = %e, "cache collection task failed"),
        }
    }
}

fn collect_now(settings: &Settings) -> anyhow::Result<()> {
    let store = open_store(settings)?;
    let usage = Usage::load(&store).context("reading cache access times")?;
    let max = max_cache_bytes(settings);
    let r =
        gc::collect(&store, max, &usage.snapshot(), gc::MIN_AGE).context("collecting the cache")?;
    for image in &r.evicted {
        println!("evicted {image}");
    }
    println!(
        "cache: {} bytes before, {} after (limit {max}); {} blobs deleted, {} bytes freed",
        r.size_before, r.size_after, r.deleted_blobs, r.freed_bytes
    );
    Ok(())
}

fn list(settings: &Settings) -> anyhow::Result<()> {
    let store = open_store(settings)?;
    let usage = Usage::load(&store).context("reading cache access times")?;
    let images = gc::images(&store, &usage.snapshot()).context("listing the cache")?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<60} {:<19} {:>14}  last used",
        "image", "digest", "bytes"
    )?;
    for img in images.iter().rev() {
        let digest = img
            .manifests
            .first()
            .map(|m| format!("{}", m.digest))
            .unwrap_or_default();
        let short = digest.get(..19).unwrap_or(&digest);
        let ago = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .saturating_sub(img.last_used);
        writeln!(
            out,
            "{:<60} {short:<19} {:>14}  {} ago",
            img.id.to_string(),
            img.size,
            human_age(ago)
        )?;
    }
    Ok(())
}

fn prefetch(settings: &Settings, upstreams: Upstreams, refs: &[ImageRef]) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let store = Arc::new(open_store(settings)?);
        let nix = Arc::new(NixImages::new(Arc::clone(&store), settings.nix.clone()));
        let mirror = Arc::new(Mirror::new(Arc::clone(&store), upstreams, settings.tag_ttl));
        let registry = Registry::new(store, settings.default_registry.clone())
            .with_nix(nix)
            .with_mirror(mirror);
        let mut failed = 0;
        for image in refs {
            println!("{image}");
            let mut out = std::io::stdout();
            match nixery_local::registry::prefetch::prefetch(&registry, image, &mut out).await {
                Ok(p) => println!(
                    "prefetched {image} {} ({} blobs, {} bytes)",
                    p.digest.map(|d| d.to_string()).unwrap_or_default(),
                    p.blobs,
                    p.bytes
                ),
                Err(e) => {
                    eprintln!("nixery-local: {image}: {e}");
                    failed += 1;
                }
            }
        }
        anyhow::ensure!(failed == 0, "{failed} of {} images failed", refs.len());
        Ok(())
    })
}

fn doctor(settings: &Settings) -> ExitCode {
    use nixery_local::ops::doctor::Verdict;
    let checks = nixery_local::ops::doctor::run(settings);
    let mut failed = false;
    for c in &checks {
        let mark = match c.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Note => "note",
            Verdict::Fail => {
                failed = true;
                "FAIL"
            }
        };
        println!("{mark}  {:<15} {}", c.what, c.detail);
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn human_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the daemon");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutdown requested");
}
