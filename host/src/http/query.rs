//! Sending and reading messages: send, query by id, by key, by time range.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::error::{ApiPath, ApiQuery, ApiResult, RawBody};
use super::messages::{MessageJson, parse_send};
use super::{Caller, Shared};
use crate::broker::api::TimePage;
use crate::broker::query::original_topic;
use crate::error::{ErrorKind, WharfError};

/// `POST /v1/topics/{topic}/messages`: one message or a batch; answers once durably stored.
pub async fn send(
    State(st): State<Shared>,
    Caller(who): Caller,
    ApiPath(topic): ApiPath<String>,
    RawBody(bytes): RawBody,
) -> ApiResult<Response> {
    who.check_publish(&topic)?;
    let req = parse_send(&bytes)?;
    let mut receipts = st.broker.send(&topic, req.messages).await?;
    if req.batch {
        Ok(Json(receipts).into_response())
    } else {
        let one = receipts
            .pop()
            .ok_or_else(|| WharfError::internal("the store answered a send with no receipt"))?;
        Ok(Json(one).into_response())
    }
}

/// Query string of `GET /v1/topics/{topic}/messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchParams {
    /// Business key: the newest ≤ 64 messages carrying it.
    key: Option<String>,
    /// Range start (store time, ms, inclusive); default 0.
    begin_ms: Option<u64>,
    /// Range end (store time, ms, inclusive); default now.
    end_ms: Option<u64>,
    /// Page size; default 100, at most 1000.
    limit: Option<usize>,
    /// Token from the previous page's `next_page_token`.
    page_token: Option<String>,
}

/// Default page size of a time-range query.
pub(super) const DEFAULT_PAGE: usize = 100;

/// `GET /v1/topics/{topic}/messages?key=K` or `?begin_ms=&end_ms=&limit=&page_token=`.
pub async fn search(
    State(st): State<Shared>,
    Caller(who): Caller,
    ApiPath(topic): ApiPath<String>,
    ApiQuery(p): ApiQuery<SearchParams>,
) -> ApiResult<Response> {
    who.check_subscribe("topic", &topic)?;
    if let Some(key) = p.key {
        if p.begin_ms.is_some() || p.end_ms.is_some() || p.page_token.is_some() {
            return Err(WharfError::bad_request(
                "query either by `key` or by `begin_ms`/`end_ms`, not both",
            )
            .into());
        }
        let found = st.broker.by_key(&topic, &key).await?;
        let messages: Vec<_> = found.iter().map(MessageJson::new).collect();
        return Ok(Json(json!({ "messages": messages })).into_response());
    }
    let begin = p.begin_ms.unwrap_or(0);
    let end = p.end_ms.unwrap_or_else(|| st.broker.clock().now_ms());
    let page = st
        .broker
        .by_time(
            &topic,
            begin,
            end,
            p.limit.unwrap_or(DEFAULT_PAGE),
            p.page_token.as_deref(),
        )
        .await?;
    Ok(page_response(&page))
}

/// One page of messages: `{"messages":[...],"next_page_token"}` (null on the last page).
pub fn page_response(page: &TimePage) -> Response {
    let messages: Vec<_> = page.messages.iter().map(MessageJson::new).collect();
    Json(json!({ "messages": messages, "next_page_token": page.next_page_token })).into_response()
}

/// `GET /v1/messages/{message_id}`: the message and per-group delivery status.
///
/// Rights are checked before any delivery work, and so that the answer says no more than a
/// topic check would: a key that may read no topic is refused before the lookup, and for a key
/// limited to some topics a message in another topic is "not found", exactly as a missing one.
pub async fn by_id(
    State(st): State<Shared>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    who.check_subscribe_any("query messages")?;
    let hidden = || {
        WharfError::not_found(format!(
            "message '{id}' {} (or it is in a topic this access key may not read)",
            crate::broker::query::NOT_FOUND
        ))
    };
    let message = match st.broker.find_message(&id).await {
        Ok(m) => m,
        Err(e) if e.kind == ErrorKind::NotFound && !who.subscribes_all() => {
            return Err(hidden().into());
        }
        Err(e) => return Err(e.into()),
    };
    if !who.may_subscribe(&original_topic(&message)) {
        return Err(hidden().into());
    }
    let view = st.broker.message_view(message).await?;
    let mut v = serde_json::to_value(MessageJson::new(&view.message))
        .map_err(|e| WharfError::internal(format!("cannot encode message: {e}")))?;
    v["deliveries"] = json!(view.deliveries);
    Ok(Json(v).into_response())
}
