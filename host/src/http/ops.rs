//! Health and Prometheus metrics.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::Shared;
use super::error::ApiError;
use crate::error::WharfError;
use crate::metrics::gauge;

/// `GET /healthz`: 200 only while the store can take writes.
pub async fn healthz(State(st): State<Shared>) -> Response {
    if st.broker.writable() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        let why = match st.broker.unwritable_reason() {
            Some(why) => format!(
                "the store stopped taking writes: {why}; restart the host once the disk is checked"
            ),
            None => "the store cannot take writes now (disk full or failed); check the host's logs and disk".into(),
        };
        ApiError::from(WharfError::unavailable(why)).into_response()
    }
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(st): State<Shared>) -> Response {
    let mut out = String::with_capacity(8 * 1024);
    crate::metrics::send_counters().render(&mut out);
    if let Some(gw) = &st.mqtt {
        gw.render_metrics(&mut out);
    }
    let s = st.broker.store_stats();
    gauge(
        &mut out,
        "wharf_store_appended_messages_total",
        "counter",
        "Messages appended to the store since start.",
        s.appended_messages,
    );
    gauge(
        &mut out,
        "wharf_store_appended_bytes_total",
        "counter",
        "Record bytes appended to the store since start.",
        s.appended_bytes,
    );
    gauge(
        &mut out,
        "wharf_store_segments",
        "gauge",
        "Log segments on disk.",
        s.segments,
    );
    gauge(
        &mut out,
        "wharf_store_disk_bytes",
        "gauge",
        "Bytes the store uses on disk.",
        s.disk_bytes,
    );
    gauge(
        &mut out,
        "wharf_store_pending_timers",
        "gauge",
        "Timer (delay) messages not yet visible.",
        s.pending_timers,
    );
    gauge(
        &mut out,
        "wharf_store_moved_timers_total",
        "counter",
        "Timer messages copied forward so retention never waits for a pending timer.",
        s.moved_timers,
    );
    gauge(
        &mut out,
        "wharf_store_writable",
        "gauge",
        "1 while the store can take writes.",
        u64::from(st.broker.writable()),
    );
    s.append_latency_us.render(
        &mut out,
        "wharf_store_append_duration_seconds",
        "Latency of one store append (write, plus fsync in sync mode).",
        "",
    );
    s.fsync_latency_us.render(
        &mut out,
        "wharf_store_fsync_duration_seconds",
        "Latency of one fsync.",
        "",
    );
    gauge(
        &mut out,
        "wharf_topics",
        "gauge",
        "Topics defined.",
        st.broker.list_topics().len() as u64,
    );
    gauge(
        &mut out,
        "wharf_groups",
        "gauge",
        "Groups defined.",
        st.broker.list_groups().len() as u64,
    );
    st.metrics.render(&mut out);
    st.long_polls.render(&mut out);
    st.plugins.render_metrics(&mut out);
    let mut resp = out.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}
