//! The HTTP API (contract "HTTP API"): axum routes that call the broker and the plugin host.
//!
//! One middleware does the per-request work every route shares: a tracing span (method, path,
//! status, latency), the body cap, signature checks, and request counters. Handlers parse bodies
//! themselves (see [`error`]) so every failure is the contract's JSON error.
//!
//! Choices where the contract is silent:
//! - Lists (`GET /v1/topics`, `/v1/groups`, `/v1/plugins`) answer a JSON array; queries answer
//!   `{"messages":[...]}` plus `"next_page_token"` (null on the last page) for ranges and dead letters.
//! - Send answers 200; creates answer 201; deletes answer 200 `{"name","deleted":true}`.
//! - Receive answers `{"instance_id","messages":[...]}`; `max` defaults to 16 (1..=256), `wait_ms`
//!   to 0 (at most `[http] max_wait_ms`), `expression` to `*`; `subscriptions:[{topic,expression}]`
//!   may replace `topic`/`expression`. Without `instance_id` the instance is `http@<client IP>`, so
//!   keep-alive reconnects do not rebalance. Long polls end early (empty) when the host stops.
//! - Ack/nack settle every receipt; if any fails, the answer is the first failure's error plus
//!   `"settled"` and `"failed":[{"receipt","error"}]`.
//! - Auth: `GET /healthz` is always open, `/metrics` when `[auth] metrics_open`. A key's
//!   `allow_publish` lists topics it may send to, directly, through a plugin's HTTP trigger
//!   (`/t/...`, the route's topic) or by re-sending a dead letter (the message's topic);
//!   `allow_subscribe` lists topics *and* groups it may read (receive needs both the group and
//!   the topic, ack/nack/status/offsets/dead letters the group, queries the topic: a message
//!   by id in a topic the key may not read is a 404, like a missing one); `"*"` allows all;
//!   `admin` (default false) allows managing topics, groups and plugins. A signed request with
//!   a body must carry `Content-MD5` matching it, which makes the body part of the signature.
//!   Failed authentication is 401 NO_PERMISSION (16); missing rights are 403, and a key that
//!   may read no topic gets 403 for a message by id before any lookup.
//! - Limits (`[http]`): headers must arrive within `header_read_timeout_ms` (the connection is
//!   closed; this is also the keep-alive idle timeout and bounds the TLS handshake), a body
//!   within `body_read_timeout_ms` of its headers (408), at most `max_long_polls` receives wait
//!   at once (503 SYSTEM_BUSY with `Retry-After: 1`), `wait_ms` at most `max_wait_ms` (400).
//! - HTTPS: with `tls_cert` and `tls_key` the listener speaks TLS only (rustls, ALPN
//!   `http/1.1`), loaded by [`crate::net::tls`] like the MQTT TLS listeners.

pub mod auth;
pub mod body;
pub mod error;
pub mod messages;

mod consume;
pub use consume::LongPolls;
mod mqtt;
mod ops;
mod plugins;
mod query;
mod resources;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use self::auth::{Authenticator, Principal, SignedParts};
use self::error::{ApiError, BodyLimit, read_body};
use crate::broker::api::BrokerApi;
use crate::config::HttpConfig;
use crate::error::WharfError;
use crate::metrics::Histogram;
use crate::net::{Connection, Handler};
use crate::plugin::PluginHost;

/// Everything a handler may use.
pub struct AppState {
    /// The broker.
    pub broker: BrokerApi,
    /// The plugin runtime.
    pub plugins: Arc<PluginHost>,
    /// Signature checks.
    pub auth: Arc<Authenticator>,
    /// `[http]` settings.
    pub config: HttpConfig,
    /// Request counters for `/metrics`.
    pub metrics: HttpMetrics,
    /// Cancelled when the host starts shutting down; long polls end early then.
    pub shutdown: CancellationToken,
    /// The MQTT gateway, when one of its listeners is on (inspection, metrics).
    pub mqtt: Option<crate::mqtt::Gateway>,
    /// Receives waiting at once (`[http] max_long_polls`).
    pub long_polls: LongPolls,
}

/// Shared handler state.
pub type Shared = Arc<AppState>;

/// Request counts by status class and request latency.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    /// Index = status / 100 (1..=5).
    by_class: [AtomicU64; 6],
    /// Whole-request latency, µs.
    pub latency_us: Histogram,
}

impl HttpMetrics {
    fn record(&self, status: u16, micros: u64) {
        let class = usize::from(status / 100).min(5);
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        self.latency_us.record(micros);
    }

    /// Appends the counters in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        out.push_str("# HELP wharf_http_requests_total HTTP requests answered, by status class.\n");
        out.push_str("# TYPE wharf_http_requests_total counter\n");
        for class in 1..=5 {
            let _ = writeln!(
                out,
                "wharf_http_requests_total{{class=\"{class}xx\"}} {}",
                self.by_class[class].load(Ordering::Relaxed)
            );
        }
        self.latency_us.snapshot().render(
            out,
            "wharf_http_request_duration_seconds",
            "Time from request head to response head.",
            "",
        );
    }
}

/// The calling principal, put in request extensions by the middleware.
pub struct Caller(pub Arc<Principal>);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Arc<Principal>>()
            .cloned()
            .map(Caller)
            .ok_or_else(|| WharfError::internal("request reached a handler unauthenticated").into())
    }
}

/// The client's socket address (for default consumer instance ids).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

/// Serves the HTTP API on connections of the shared listener loop ([`crate::net`]), over plain
/// TCP or, with `[http] tls_cert` / `tls_key`, over TLS only.
pub struct HttpHandler {
    router: Router,
    http1: hyper::server::conn::http1::Builder,
    tls: Option<TlsAcceptor>,
    /// `[http] header_read_timeout_ms`; also bounds the TLS handshake.
    header_timeout: Duration,
}

/// The HTTPS acceptor for `[http]`, or `None` when it serves plain HTTP. It offers ALPN
/// `http/1.1` only: the API speaks HTTP/1.1.
pub fn tls_acceptor(config: &HttpConfig) -> anyhow::Result<Option<TlsAcceptor>> {
    if !config.tls() {
        return Ok(None);
    }
    let mut tls = crate::net::tls::server_config(
        std::path::Path::new(&config.tls_cert),
        std::path::Path::new(&config.tls_key),
    )?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(tls))))
}

impl HttpHandler {
    /// A handler serving [`router`] over HTTP/1.1 with keep-alive; `tls` from [`tls_acceptor`].
    pub fn new(state: Shared, tls: Option<TlsAcceptor>) -> HttpHandler {
        let header_timeout = Duration::from_millis(state.config.header_read_timeout_ms);
        let mut http1 = hyper::server::conn::http1::Builder::new();
        // The header timer also runs while a keep-alive connection waits for its next request,
        // so it doubles as the idle timeout; a client trickling headers cannot hold a
        // connection (and a place under max_connections) for ever.
        http1
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_timeout);
        HttpHandler {
            router: router(state),
            http1,
            tls,
            header_timeout,
        }
    }

    /// Serves one connection's requests until it closes or the host stops.
    async fn serve_io<I>(&self, io: I, peer: SocketAddr, shutdown: CancellationToken)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let router = self.router.clone();
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            // What `into_make_service_with_connect_info` did: `ClientAddr` reads it.
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            tower_service::Service::call(&mut router.clone(), req)
        });
        let conn = self.http1.serve_connection(io, service);
        let mut conn = std::pin::pin!(conn);
        let stopping = shutdown.cancelled();
        let mut stopping = std::pin::pin!(stopping);
        let mut asked = false;
        let result = loop {
            tokio::select! {
                r = conn.as_mut() => break r,
                () = &mut stopping, if !asked => {
                    // Idle: closes now; busy: answers the request in hand, then closes.
                    asked = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "HTTP connection ended with an error");
        }
    }
}

impl Handler for HttpHandler {
    async fn serve(&self, conn: Connection) {
        let Connection {
            stream,
            peer,
            shutdown,
        } = conn;
        let Some(tls) = &self.tls else {
            return self.serve_io(TokioIo::new(stream), peer, shutdown).await;
        };
        let handshake = tokio::time::timeout(self.header_timeout, tls.accept(stream));
        let stream = tokio::select! {
            r = handshake => match r {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    // Most often a plain-HTTP client on the HTTPS port, or a client that does
                    // not trust the certificate; it sees its own error.
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("TLS handshake timed out ([http] header_read_timeout_ms)");
                    return;
                }
            },
            () = shutdown.cancelled() => return,
        };
        self.serve_io(TokioIo::new(stream), peer, shutdown).await
    }
}

/// Builds the router with every contract route.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/metrics", get(ops::metrics))
        .route(
            "/v1/topics",
            post(resources::create_topic).get(resources::list_topics),
        )
        .route(
            "/v1/topics/{topic}",
            get(resources::show_topic).delete(resources::delete_topic),
        )
        .route(
            "/v1/topics/{topic}/messages",
            post(query::send).get(query::search),
        )
        .route("/v1/messages/{message_id}", get(query::by_id))
        .route(
            "/v1/groups",
            post(resources::create_group).get(resources::list_groups),
        )
        .route(
            "/v1/groups/{group}",
            get(resources::show_group)
                .patch(resources::patch_group)
                .delete(resources::delete_group),
        )
        .route("/v1/groups/{group}/receive", post(consume::receive))
        .route("/v1/groups/{group}/ack", post(consume::ack))
        .route("/v1/groups/{group}/nack", post(consume::nack))
        .route("/v1/groups/{group}/status", get(consume::status))
        .route("/v1/groups/{group}/offsets", post(consume::reset_offsets))
        .route(
            "/v1/groups/{group}/dead-letters",
            get(consume::dead_letters),
        )
        .route(
            "/v1/groups/{group}/dead-letters/{message_id}/resend",
            post(consume::resend_dead_letter),
        )
        .route("/v1/mqtt/devices/{client_id}", get(mqtt::device))
        .route("/v1/mqtt/groups/{group}", get(mqtt::group))
        .route("/v1/mqtt/topics/{topic}", get(mqtt::topic))
        .route("/v1/plugins", post(plugins::deploy).get(plugins::list))
        .route(
            "/v1/plugins/{name}",
            get(plugins::status).delete(plugins::remove),
        )
        .route("/v1/plugins/{name}/rollback", post(plugins::rollback))
        .route("/t/{*path}", post(plugins::trigger))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::middleware::from_fn_with_state(state.clone(), front))
        // Bodies are capped by `front` ([http] max_body_bytes / max_upload_bytes) instead.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::no_route(method.as_str(), uri.path())
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::wrong_method(method.as_str(), uri.path())
}

/// Paths served without a signature.
fn is_open_path(path: &str, metrics_open: bool) -> bool {
    path == "/healthz" || (metrics_open && path == "/metrics")
}

fn header_str<'a>(h: &'a HeaderMap, name: &header::HeaderName) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Per-request span, body cap, authentication and counters.
async fn front(State(st): State<Shared>, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let span = tracing::info_span!(
        "http",
        method = %req.method(),
        path = %req.uri().path(),
        status = tracing::field::Empty,
        latency_us = tracing::field::Empty,
        access_key = tracing::field::Empty,
    );
    async move {
        let max_bytes = if req.uri().path() == "/v1/plugins" {
            st.config.max_upload_bytes
        } else {
            st.config.max_body_bytes
        };
        // The body's deadline starts once the headers are in, which is now.
        let body = BodyLimit::starting_now(
            max_bytes,
            Duration::from_millis(st.config.body_read_timeout_ms),
        );
        let resp = match authenticate(&st, &mut req, &body).await {
            Ok(principal) => {
                if let Some(ak) = &principal.access_key {
                    tracing::Span::current().record("access_key", ak.as_str());
                }
                req.extensions_mut().insert(principal);
                req.extensions_mut().insert(body);
                match CatchPanic(Box::pin(next.run(req))).await {
                    Ok(resp) => resp,
                    Err(what) => {
                        tracing::error!(panic = %what, "request handler panicked");
                        ApiError::from(WharfError::internal(
                            "the host hit an internal error serving this request; it is logged, please report it",
                        ))
                        .into_response()
                    }
                }
            }
            Err(e) => e.into_response(),
        };
        let micros = start.elapsed().as_micros() as u64;
        let status = resp.status().as_u16();
        st.metrics.record(status, micros);
        let span = tracing::Span::current();
        span.record("status", status);
        span.record("latency_us", micros);
        tracing::debug!("request done");
        resp
    }
    .instrument(span)
    .await
}

/// The `Content-MD5` header (`Base64(MD5(body))`), lower-case as hyper keeps names.
const CONTENT_MD5: header::HeaderName = header::HeaderName::from_static("content-md5");

/// Checks the signature and, for a signed request with a body, that `Content-MD5` is there and
/// matches the body: the signature covers Content-MD5, so this makes the body signed too.
async fn authenticate(
    st: &AppState,
    req: &mut Request,
    body: &BodyLimit,
) -> Result<Arc<Principal>, ApiError> {
    if st.auth.is_open() || is_open_path(req.uri().path(), st.auth.metrics_open) {
        return Ok(st.auth.anonymous());
    }
    let h = req.headers();
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let principal = st.auth.authenticate(&SignedParts {
        method: req.method().as_str(),
        path_and_query,
        authorization: header_str(h, &header::AUTHORIZATION),
        date: header_str(h, &header::DATE),
        content_md5: header_str(h, &CONTENT_MD5),
        content_type: header_str(h, &header::CONTENT_TYPE),
    })?;
    let md5 = header_str(req.headers(), &CONTENT_MD5).map(|v| v.trim().to_string());
    // No body at all (no Content-Length or Content-Length: 0, not chunked): nothing to sign.
    if md5.is_none() && hyper::body::Body::is_end_stream(req.body()) {
        return Ok(principal);
    }
    // The body is read here, under the same size cap and deadline the handler would use.
    let taken = std::mem::replace(req, Request::new(axum::body::Body::empty()));
    let (parts, stream) = taken.into_parts();
    let bytes = read_body(Request::from_parts(parts.clone(), stream), body).await?;
    match md5 {
        None if bytes.is_empty() => {}
        None => {
            return Err(WharfError::new(
                crate::error::ErrorCode::NoPermission,
                crate::error::ErrorKind::Unauthenticated,
                "a signed request with a body must carry a `Content-MD5` header: Base64 of the MD5 \
             digest of the exact body bytes (for the body `{}` it is `Content-MD5: \
             mZFLkyvTelC5g8XnyQrpOw==`), and the same value as the second line of the \
             StringToSign, so the signature covers the body",
            )
            .into());
        }
        Some(md5) if auth::content_md5(&bytes) != md5 => {
            return Err(WharfError::new(
                crate::error::ErrorCode::NoPermission,
                crate::error::ErrorKind::Unauthenticated,
                "Content-MD5 does not match the body; send Base64(MD5(body)) of the exact bytes, \
             and sign that same value",
            )
            .into());
        }
        Some(_) => {}
    }
    *req = Request::from_parts(parts, axum::body::Body::from(bytes));
    Ok(principal)
}

/// Turns a panicking handler into a 500 JSON answer instead of a dropped connection.
struct CatchPanic<F>(std::pin::Pin<Box<F>>);

impl<F: std::future::Future> std::future::Future for CatchPanic<F> {
    type Output = Result<F::Output, String>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let fut = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(payload) => {
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                std::task::Poll::Ready(Err(what))
            }
        }
    }
}
