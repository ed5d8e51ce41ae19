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
//!   `allow_publish` lists topics it may send to, and groups whose dead letters it may re-send;
//!   `allow_subscribe` lists topics *and* groups it may read (receive needs both the group and
//!   the topic, ack/nack/status/offsets/dead letters the group, queries the topic: a message
//!   by id in a topic the key may not read is a 404, like a missing one); `"*"` allows all;
//!   `admin` (default true) allows managing topics, groups and plugins. Plugin HTTP triggers
//!   (`/t/...`) need a valid signature only. When a `Content-MD5` header is sent it must match
//!   the body, which makes the body part of the signature. Failed authentication is 401
//!   NO_PERMISSION (16); missing rights are 403, and a key that may read no topic gets 403 for
//!   a message by id before any lookup.

pub mod auth;
pub mod body;
pub mod error;
pub mod messages;

mod consume;
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
use std::time::Instant;

use axum::Router;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
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

/// Serves the HTTP API on connections of the shared listener loop ([`crate::net`]).
pub struct HttpHandler {
    router: Router,
    http1: hyper::server::conn::http1::Builder,
}

impl HttpHandler {
    /// A handler serving [`router`] over HTTP/1.1 with keep-alive.
    pub fn new(state: Shared) -> HttpHandler {
        // hyper's defaults: keep-alive on, no header-read timer (as `axum::serve` had it).
        HttpHandler {
            router: router(state),
            http1: hyper::server::conn::http1::Builder::new(),
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
        let router = self.router.clone();
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            // What `into_make_service_with_connect_info` did: `ClientAddr` reads it.
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            tower_service::Service::call(&mut router.clone(), req)
        });
        let conn = self.http1.serve_connection(TokioIo::new(stream), service);
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
        let resp = match authenticate(&st, &mut req).await {
            Ok(principal) => {
                if let Some(ak) = &principal.access_key {
                    tracing::Span::current().record("access_key", ak.as_str());
                }
                req.extensions_mut().insert(principal);
                let limit = if req.uri().path() == "/v1/plugins" {
                    st.config.max_upload_bytes
                } else {
                    st.config.max_body_bytes
                };
                req.extensions_mut().insert(BodyLimit(limit));
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

/// Checks the signature (and `Content-MD5` against the body when given).
async fn authenticate(st: &AppState, req: &mut Request) -> Result<Arc<Principal>, ApiError> {
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
        content_md5: header_str(h, &header::HeaderName::from_static("content-md5")),
        content_type: header_str(h, &header::CONTENT_TYPE),
    })?;
    // The signature covers Content-MD5; checking it against the body makes the body signed too.
    if let Some(md5) = header_str(
        req.headers(),
        &header::HeaderName::from_static("content-md5"),
    ) {
        let md5 = md5.trim().to_string();
        let limit = st.config.max_upload_bytes.max(st.config.max_body_bytes);
        let taken = std::mem::replace(req, Request::new(axum::body::Body::empty()));
        let (parts, body) = taken.into_parts();
        let bytes = read_body(Request::from_parts(parts.clone(), body), limit).await?;
        if auth::content_md5(&bytes) != md5 {
            return Err(WharfError::new(
                crate::error::ErrorCode::NoPermission,
                crate::error::ErrorKind::Unauthenticated,
                "Content-MD5 does not match the body; send Base64(MD5(body)) of the exact bytes",
            )
            .into());
        }
        *req = Request::from_parts(parts, axum::body::Body::from(bytes));
    }
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
