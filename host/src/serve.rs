//! `wharf serve`: open the store, start the broker and plugins, serve HTTP, stop gracefully.
//!
//! Shutdown order on SIGINT/SIGTERM: stop accepting connections and let in-flight requests finish
//! (long polls return at once; bounded by `[http] shutdown_grace_ms`, see [`crate::net`]), stop
//! plugins (they hand back in-flight messages), then shut the broker down, which flushes the store.
//! While it runs, the host keeps a membership row in the store that other hosts sharing it
//! read (remoting routes list every live host).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::Broker;
use crate::broker::api::BrokerApi;
use crate::clock::{SharedClock, SystemClock};
use crate::config::{Config, LogFormat};
use crate::http::auth::Authenticator;
use crate::http::{AppState, HttpHandler, HttpMetrics, LongPolls};
use crate::mqtt::Gateway;
use crate::net::{Listener, Shutdown};
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
        .with_context(|| match config.store.backend {
            crate::store::Backend::Embedded => {
                format!("opening the store in {}", config.store.data_dir.display())
            }
            crate::store::Backend::Postgres => format!(
                "opening the PostgreSQL store at {}",
                crate::store::postgres::redacted_url(&config.store.postgres.url)
            ),
        })?;
    let broker = BrokerApi::new(
        Broker::open(config.broker.clone(), store, clock.clone())
            .await
            .context("starting the broker")?,
    );
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

    let http_tls = match crate::http::tls_acceptor(&config.http)
        .context("[http] tls_cert / tls_key: cannot serve HTTPS")
    {
        Ok(t) => t,
        Err(e) => {
            plugins.shutdown().await;
            let _ = broker.shutdown().await;
            return Err(e);
        }
    };
    let listener = match Listener::bind("http", &config.http.listen, config.http.max_connections)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} ([http] listen / --http)",
                config.http.listen
            )
        }) {
        Ok(l) => l,
        Err(e) => {
            plugins.shutdown().await;
            let _ = broker.shutdown().await;
            return Err(e);
        }
    };
    let addr = listener.local_addr();
    let shutdown = Shutdown::new();
    let mqtt_on = [
        &config.mqtt.listen,
        &config.mqtt.tls_listen,
        &config.mqtt.ws_listen,
        &config.mqtt.wss_listen,
    ]
    .iter()
    .any(|l| !l.is_empty());
    let (mqtt, mqtt_bound) = if mqtt_on {
        match Gateway::start(broker.clone(), config.mqtt.clone(), auth.clone(), &shutdown).await {
            Ok((g, bound)) => (Some(g), bound),
            Err(e) => {
                shutdown.stop(Duration::ZERO).await;
                plugins.shutdown().await;
                let _ = broker.shutdown().await;
                return Err(e.context("starting the MQTT gateway"));
            }
        }
    } else {
        (None, Vec::new())
    };
    let state = Arc::new(AppState {
        broker: broker.clone(),
        plugins: plugins.clone(),
        auth: auth.clone(),
        config: config.http.clone(),
        metrics: HttpMetrics::default(),
        shutdown: shutdown.token(),
        mqtt: mqtt.clone(),
        long_polls: LongPolls::new(config.http.max_long_polls),
    });
    let https = http_tls.is_some();
    shutdown.serve(listener, HttpHandler::new(state, http_tls));

    if https {
        info!("listening http={addr} (HTTPS only: clients use https://{addr})");
    } else {
        info!("listening http={addr}");
    }
    // Every bound listener, by name, for the machine-readable line below.
    let mut bound: Vec<(&str, std::net::SocketAddr)> = vec![("http", addr)];
    bound.extend(mqtt_bound);
    if !config.remoting.listen.is_empty() {
        match crate::remoting::start(&config.remoting, broker.clone(), auth.clone(), &shutdown)
            .await
        {
            Ok(a) => bound.push(("remoting", a)),
            Err(e) => {
                shutdown.stop(Duration::ZERO).await;
                plugins.shutdown().await;
                let _ = broker.shutdown().await;
                return Err(e);
            }
        }
    }
    let remoting_addr = bound
        .iter()
        .find(|(name, _)| *name == "remoting")
        .map(|(_, a)| match config.remoting.advertised_addr.as_str() {
            "" => {
                if a.ip().is_unspecified() {
                    warn!(listen = %a, "[remoting] listens on every interface but advertised_addr is empty:                         routes other hosts give name an address clients cannot reach; set [remoting] advertised_addr");
                }
                a.to_string()
            }
            advertised => advertised.to_string(),
        });
    let membership = Membership::start(broker.clone(), remoting_addr);
    {
        // Machine-readable, for scripts and tests that start the host on port 0.
        use std::io::Write as _;
        let line = bound
            .iter()
            .map(|(name, a)| format!("{name}={a}"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "wharf: listening {line}");
        let _ = out.flush();
    }

    shutdown_signal().await;
    info!("shutting down: no new connections; finishing in-flight requests");
    if !shutdown
        .stop(Duration::from_millis(config.http.shutdown_grace_ms))
        .await
    {
        warn!(
            grace_ms = config.http.shutdown_grace_ms,
            "in-flight requests did not finish in time; closing them"
        );
    }
    if let Some(g) = &mqtt {
        g.stop().await;
        info!("MQTT sessions stored; router stopped");
    }
    membership.stop().await;
    plugins.shutdown().await;
    info!("plugins stopped");
    broker.shutdown().await.context("flushing the store")?;
    info!("broker stopped; store flushed; bye");
    Ok(())
}

/// This host's membership row among the hosts sharing the store (remoting routes list every
/// live host from these rows): renewed like a queue lease, so a killed host drops out of the
/// routes when its row expires, and removed at a clean shutdown.
struct Membership {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    broker: BrokerApi,
}

impl Membership {
    fn start(broker: BrokerApi, remoting: Option<String>) -> Membership {
        use crate::broker::consume::leases::{LEASE_RENEW_MS, LEASE_TTL_MS};
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (broker, stop) = (broker.clone(), stop.clone());
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(LEASE_RENEW_MS));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    if let Err(e) = broker.host_heartbeat(remoting.clone(), LEASE_TTL_MS).await {
                        warn!(error = %e, "cannot renew this host's membership row; will retry");
                    }
                }
            }
        });
        Membership { stop, task, broker }
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
        if let Err(e) = self.broker.host_leave().await {
            warn!(error = %e, "cannot remove this host's membership row; it expires by itself");
        }
    }
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
