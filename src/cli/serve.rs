//! `nixery-local serve`: the daemon, on its own listener or on the socket
//! systemd passed, until SIGTERM or Ctrl-C.

use std::io::Write;

use anyhow::Context;

use nixery_local::app::App;
use nixery_local::ops::systemd;

use super::{runtime, upstreams, Common, Failure};

pub fn run(common: Common) -> Result<(), Failure> {
    let settings = common.settings()?;
    let upstreams = upstreams(&settings)?;
    // systemd: before the runtime starts threads, as both unset variables.
    let inherited = systemd::listen_fds().context("taking the socket systemd passed")?;
    let notifier = systemd::Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "not sending notifications to systemd");
        systemd::Notifier::disabled()
    });
    runtime()?.block_on(async move {
        let app = App::open(&settings, upstreams)?;
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
        let ready = || {
            if let Err(e) = notifier.ready() {
                tracing::warn!(error = %e, "cannot tell systemd the daemon is ready");
            }
            notifier.spawn_watchdog()
        };
        let shutdown = async {
            shutdown_signal().await;
            // Stopping waits for running Nix builds; a second signal is the
            // way not to.
            tokio::spawn(async {
                shutdown_signal().await;
                tracing::warn!("second stop signal: exiting without waiting");
                std::process::exit(1);
            });
            if let Err(e) = notifier.stopping() {
                tracing::warn!(error = %e, "cannot tell systemd the daemon is stopping");
            }
        };
        app.serve(&settings, listener, ready, shutdown).await?;
        Ok(())
    })
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
