//! Builds the daemon once, from settings: the store, the image sources, the
//! registry service, blobserve, and the cache collector, then serves them
//! over HTTP until shutdown. `serve` and `prefetch` both start here, so the
//! two never wire the parts differently.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::blobserve::{Blobserve, BlobserveError, BlobserveSettings};
use crate::config::Settings;
use crate::http::{self, ServerOptions};
use crate::registry::Registry;
use crate::sources::mirror::upstream::Upstreams;
use crate::sources::mirror::Mirror;
use crate::sources::nix::NixImages;
use crate::sources::Sources;
use crate::store::gc::{self, Usage};
use crate::store::{Store, StoreError};

/// How often the collector checks the cache size and saves access times.
const GC_INTERVAL: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    // The cause is the error's source, not part of its message: the CLI
    // prints the chain.
    #[error("opening the cache at {}", path.display())]
    Store { path: PathBuf, source: StoreError },
    #[error("reading cache access times")]
    Usage(#[source] StoreError),
    #[error("opening the extracted-layer space")]
    Blobserve(#[from] BlobserveError),
    #[error("background task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// The cache at the configured state dir.
pub fn open_store(settings: &Settings) -> Result<Store, AppError> {
    Store::open(&settings.state_dir).map_err(|source| AppError::Store {
        path: settings.state_dir.clone(),
        source,
    })
}

/// The size the cache is kept under: the configured limit, or a share of
/// the disk it lives on.
pub fn max_cache_bytes(settings: &Settings) -> u64 {
    settings
        .max_cache_bytes
        .or_else(|| gc::default_max_bytes(&settings.state_dir))
        .unwrap_or(u64::MAX)
}

/// A daemon's parts, wired.
pub struct App {
    store: Arc<Store>,
    usage: Arc<Usage>,
    registry: Arc<Registry>,
}

impl App {
    /// Opens the cache and wires the sources (Nix images, the mirror of
    /// `upstreams`) behind the registry service.
    pub fn open(settings: &Settings, upstreams: Upstreams) -> Result<App, AppError> {
        let store = Arc::new(open_store(settings)?);
        let nix = Arc::new(NixImages::new(Arc::clone(&store), settings.nix.clone()));
        let mirror = Arc::new(Mirror::new(Arc::clone(&store), upstreams, settings.tag_ttl));
        let usage = Arc::new(Usage::load(&store).map_err(AppError::Usage)?);
        let sources = Sources::new().with_nix(nix).with_mirror(mirror);
        let registry = Arc::new(
            Registry::new(
                Arc::clone(&store),
                settings.default_registry.clone(),
                sources,
            )
            .with_usage(Arc::clone(&usage)),
        );
        Ok(App {
            store,
            usage,
            registry,
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Serves on `listener` until `shutdown` completes, keeping the cache
    /// under its limit meanwhile; saves access times on the way out.
    /// `ready` runs once every part is open, just before the first accept;
    /// what it returns (a watchdog, say) lives until the server stops.
    pub async fn serve<G>(
        self,
        settings: &Settings,
        listener: TcpListener,
        ready: impl FnOnce() -> G,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), AppError> {
        let max_bytes = max_cache_bytes(settings);
        let collector = tokio::spawn(collect_periodically(
            Arc::clone(&self.store),
            Arc::clone(&self.usage),
            max_bytes,
        ));
        let blobserve = {
            let settings = BlobserveSettings {
                repos: settings.blobserve_repos.clone(),
                max_bytes: settings
                    .blobserve_max_bytes
                    .or_else(|| gc::default_max_bytes(&settings.state_dir))
                    .unwrap_or(u64::MAX),
            };
            let root = self.store.root().join("extracted");
            let registry = Arc::clone(&self.registry);
            tokio::task::spawn_blocking(move || Blobserve::new(registry, root, settings)).await??
        };
        let options = ServerOptions {
            header_timeout: settings.header_timeout,
            max_connections: settings.max_connections,
            cache_limit: Some(max_bytes),
            blobserve: Some(Arc::new(blobserve)),
        };
        let guard = ready();
        http::serve(listener, Arc::clone(&self.registry), options, shutdown).await;
        // Builds whose clients left run on: ending the process would
        // interrupt Nix and waste the work.
        self.registry.work_finished().await;
        drop(guard);
        collector.abort();
        if let Err(e) = self.usage.save(&self.store) {
            tracing::warn!(error = %e, "cannot save cache access times");
        }
        Ok(())
    }
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
