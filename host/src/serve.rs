//! `wharf serve`: open the store, start the broker and plugins, serve HTTP, stop gracefully.
//!
//! Shutdown order on SIGINT/SIGTERM: stop accepting connections and let in-flight requests finish
//! (bounded by `[http] shutdown_grace_ms`), stop plugins (they hand back in-flight messages), then
//! shut the broker down, which flushes the store.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt as _;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::broker::Broker;
use crate::clock::{SharedClock, SystemClock};
use crate::config::{Config, LogFormat};
use crate::http::auth::Authenticator;
use crate::http::{AppState, HttpMetrics};
use crate::plugin::PluginHost;

/// Installs the tracing subscriber: `RUST_LOG` wins over `filter`; logs go to stderr so stdout
/// stays free for the machine-readable `wharf: listening` line and client output.
pub fn init_logging(format: LogFormat, filter: &str) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .or_else(|| tracing_subscriber::EnvFilter::try_new(filter).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Human => {
            let ansi = std::env::var_os("NO_COLOR").is_none()
                && std::io::IsTerminal::is_terminal(&std::io::stderr());
            builder.with_ansi(ansi).try_init()
        }
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}

/// Runs the host until SIGINT/SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    match &config.source {
        Some(p) => {
            info!(version = env!("CARGO_PKG_VERSION"), config = %p.display(), "wharf starting")
        }
        None => info!(
            version = env!("CARGO_PKG_VERSION"),
            "wharf starting with built-in defaults (no --config and no config/wharf.toml)"
        ),
    }
    info!(
        data_dir = %config.store.data_dir.display(),
        plugins_dir = %config.plugins.dir.display(),
        flush = ?config.store.flush,
        "settings"
    );
    let clock: SharedClock = Arc::new(SystemClock::with_offset(config.testing.clock_offset_ms));
    if config.testing.clock_offset_ms != 0 {
        warn!(
            clock_offset_ms = config.testing.clock_offset_ms,
            "[testing] clock_offset_ms is set: the host clock is shifted; never do this in production"
        );
    }
    let store = crate::store::open_store(&config.store, clock.clone())
        .await
        .with_context(|| format!("opening the store in {}", config.store.data_dir.display()))?;
    let broker = Broker::open(config.broker.clone(), store, clock.clone())
        .await
        .context("starting the broker")?;
    let plugins = match PluginHost::start(
        broker.clone(),
        config.plugins.clone(),
        config.store.data_dir.clone(),
    )
    .await
    {
        Ok(p) => p,
        Err(e) => {
            let _ = broker.shutdown().await;
            return Err(anyhow::Error::new(e).context("starting the plugin runtime"));
        }
    };

    // Signatures are checked against real wall time, not the [testing] offset clock: clients sign
    // with their real clocks, and the offset only exists to age data.
    let auth = Arc::new(Authenticator::new(
        &config.auth,
        Arc::new(SystemClock::default()),
    ));
    if auth.is_open() {
        warn!(
            "auth is OPEN: no [[auth.keys]] configured, so every HTTP request is accepted unsigned"
        );
    } else {
        info!(
            keys = config.auth.keys.len(),
            "auth on: HTTP requests must be signed (GET /healthz stays open)"
        );
    }

    let listener = match bind(&config.http.listen).await {
        Ok(l) => l,
        Err(e) => {
            plugins.shutdown().await;
            let _ = broker.shutdown().await;
            return Err(e);
        }
    };
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let state = Arc::new(AppState {
        broker: broker.clone(),
        plugins: plugins.clone(),
        auth,
        config: config.http.clone(),
        metrics: HttpMetrics::default(),
        shutdown: stop_rx.clone(),
    });
    let app = crate::http::router(state);

    let mut stop_rx = stop_rx;
    let server = axum::serve(
        listener.tap_io(|tcp| {
            // Small request/response pairs: without NODELAY, Nagle adds up to 40 ms per answer.
            let _ = tcp.set_nodelay(true);
        }),
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = stop_rx.changed().await;
    });
    let mut server = tokio::spawn(server.into_future());

    info!("listening http={addr}");
    for (name, listen) in [
        ("mqtt", &config.mqtt.listen),
        ("remoting", &config.remoting.listen),
    ] {
        if !listen.is_empty() {
            warn!("{name} listener is not built yet: NOT listening on {listen} ([{name}] listen)");
        }
    }
    {
        // Machine-readable, for scripts and tests that start the host on port 0.
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "wharf: listening http={addr}");
        let _ = out.flush();
    }

    let early = tokio::select! {
        _ = shutdown_signal() => None,
        r = &mut server => Some(r),
    };
    let mut result = Ok(());
    match early {
        Some(r) => {
            result = Err(match r {
                Ok(Ok(())) => anyhow::anyhow!("the HTTP server stopped unexpectedly"),
                Ok(Err(e)) => anyhow::Error::new(e).context("the HTTP server failed"),
                Err(e) => anyhow::Error::new(e).context("the HTTP server task failed"),
            });
        }
        None => {
            info!("shutting down: no new connections; finishing in-flight requests");
            let _ = stop_tx.send(true);
            let grace = Duration::from_millis(config.http.shutdown_grace_ms);
            if tokio::time::timeout(grace, &mut server).await.is_err() {
                warn!(
                    grace_ms = config.http.shutdown_grace_ms,
                    "in-flight requests did not finish in time; closing them"
                );
                server.abort();
            }
        }
    }
    plugins.shutdown().await;
    info!("plugins stopped");
    broker.shutdown().await.context("flushing the store")?;
    info!("broker stopped; store flushed; bye");
    result
}

async fn bind(listen: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} ([http] listen / --http)"))
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!("cannot watch SIGTERM ({e}); only SIGINT stops the host");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => info!("SIGINT received"),
        _ = term => info!("SIGTERM received"),
    }
}
