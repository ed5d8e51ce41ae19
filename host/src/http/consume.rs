//! The HTTP pull consumer (receive, ack, nack) and group operations (status, offsets, dead letters).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::error::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult};
use super::messages::{MessageJson, ReceivedJson};
use super::{Caller, ClientAddr, Shared};
use crate::broker::consume::{InstanceSpec, Outcome, Subscription};
use crate::broker::query::original_topic;
use crate::error::WharfError;

/// Most messages one receive may ask for.
pub const MAX_RECEIVE: usize = 256;
/// Messages a receive returns when `max` is absent.
pub const DEFAULT_RECEIVE: usize = 16;

/// The cap on receives waiting at once (`[http] max_long_polls`). A parked long poll holds
/// little memory, but each holds a connection and a consumer instance's attention; past the cap
/// a new one is refused at once with SYSTEM_BUSY instead of piling up.
#[derive(Debug)]
pub struct LongPolls {
    slots: Semaphore,
    max: usize,
    refused: AtomicU64,
}

impl LongPolls {
    /// Room for `max` waiting receives.
    pub fn new(max: usize) -> LongPolls {
        LongPolls {
            slots: Semaphore::new(max),
            max,
            refused: AtomicU64::new(0),
        }
    }

    /// A place for one long poll, held until it answers; SYSTEM_BUSY when all are taken.
    fn enter(&self) -> Result<SemaphorePermit<'_>, WharfError> {
        self.slots.try_acquire().map_err(|_| {
            self.refused.fetch_add(1, Ordering::Relaxed);
            WharfError::busy(format!(
                "{} receives are already waiting for messages on this host ([http] \
                 max_long_polls = {}); retry after a moment, poll with wait_ms = 0, or raise \
                 the limit",
                self.max, self.max
            ))
        })
    }

    /// Appends the gauges in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        crate::metrics::gauge(
            out,
            "wharf_http_long_polls",
            "gauge",
            "Receives waiting for messages (wait_ms > 0) now.",
            (self.max - self.slots.available_permits()) as u64,
        );
        crate::metrics::gauge(
            out,
            "wharf_http_long_polls_refused_total",
            "counter",
            "Long polls refused with SYSTEM_BUSY because [http] max_long_polls were waiting.",
            self.refused.load(Ordering::Relaxed),
        );
    }
}

/// Body of `POST /v1/groups/{group}/receive`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveRequest {
    /// Topic to consume.
    #[serde(default)]
    topic: Option<String>,
    /// Tag expression; default `*`.
    #[serde(default)]
    expression: Option<String>,
    /// Several (topic, expression) pairs at once, instead of `topic` and `expression`.
    #[serde(default)]
    subscriptions: Option<Vec<SubscriptionJson>>,
    /// Most messages to return; default 16, at most 256.
    #[serde(default)]
    max: Option<usize>,
    /// Long-poll wait when nothing is ready (ms); default 0.
    #[serde(default)]
    wait_ms: Option<u64>,
    /// Stable consumer instance id; default derived from the client's IP address.
    #[serde(default)]
    instance_id: Option<String>,
}

/// One entry of `subscriptions` in a receive.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionJson {
    /// Topic.
    topic: String,
    /// Tag expression; default `*`.
    #[serde(default = "all_tags")]
    expression: String,
}

fn all_tags() -> String {
    "*".into()
}

/// `POST /v1/groups/{group}/receive`: subscribe this consumer to the named topics (keeping its
/// others) and long-poll them.
pub async fn receive(
    State(st): State<Shared>,
    Caller(who): Caller,
    ClientAddr(addr): ClientAddr,
    ApiPath(group): ApiPath<String>,
    ApiJson(req): ApiJson<ReceiveRequest>,
) -> ApiResult<Response> {
    who.check_subscribe("group", &group)?;
    let subscriptions = match (req.topic, req.subscriptions) {
        (Some(topic), None) => vec![Subscription {
            topic,
            expression: req.expression.unwrap_or_else(|| "*".into()),
        }],
        (None, Some(subs)) if !subs.is_empty() && req.expression.is_none() => subs
            .into_iter()
            .map(|s| Subscription {
                topic: s.topic,
                expression: s.expression,
            })
            .collect(),
        _ => {
            return Err(WharfError::bad_request(
                "say what to consume: either `topic` (with an optional `expression`, default \"*\") or a non-empty `subscriptions` list of {\"topic\",\"expression\"}",
            )
            .into());
        }
    };
    for sub in &subscriptions {
        who.check_subscribe("topic", &sub.topic)?;
    }
    let max = req.max.unwrap_or(DEFAULT_RECEIVE);
    if !(1..=MAX_RECEIVE).contains(&max) {
        return Err(
            WharfError::bad_request(format!("max must be 1..={MAX_RECEIVE}, got {max}")).into(),
        );
    }
    let wait_ms = req.wait_ms.unwrap_or(0);
    if wait_ms > st.config.max_wait_ms {
        return Err(WharfError::bad_request(format!(
            "wait_ms {wait_ms} is over the host's limit of {} ms ([http] max_wait_ms); poll again instead",
            st.config.max_wait_ms
        ))
        .into());
    }
    // Taken before any work, so a refused poll changes nothing; held until the answer.
    let _slot = if wait_ms > 0 {
        Some(st.long_polls.enter()?)
    } else {
        None
    };
    let address = addr.map(|a| a.to_string()).unwrap_or_else(|| "http".into());
    // One instance per client host by default: connections come and go under keep-alive, and a
    // new instance per connection would rebalance queues on every reconnect.
    let instance_id = req.instance_id.unwrap_or_else(|| match addr {
        Some(a) => format!("http@{}", a.ip()),
        None => "http@unknown".into(),
    });
    if instance_id.is_empty() {
        return Err(WharfError::bad_request("instance_id must not be empty").into());
    }
    // The request says what it reads now; the instance's other topics stay subscribed, so one
    // client reading several topics is one consistent member and its receipts stay valid.
    let topics: Vec<String> = subscriptions.iter().map(|s| s.topic.clone()).collect();
    st.broker
        .subscribe(InstanceSpec {
            group: group.clone(),
            instance_id: instance_id.clone(),
            address,
            pid: None,
            subscriptions,
        })
        .await?;
    // A long poll must not hold up shutdown. Dropping it mid-way is safe: whatever it had taken
    // stays un-acknowledged and is delivered again after the restart.
    let wait = Duration::from_millis(wait_ms);
    let delivered = tokio::select! {
        r = st.broker.receive_topics(&group, &instance_id, &topics, max, wait) => r?,
        () = st.shutdown.cancelled() => Vec::new(),
    };
    let receipts: Vec<String> = delivered
        .iter()
        .map(|d| st.broker.receipt(&group, d))
        .collect();
    let messages: Vec<_> = delivered
        .iter()
        .zip(&receipts)
        .map(|(d, receipt)| ReceivedJson {
            message: MessageJson::new(&d.message),
            receipt,
        })
        .collect();
    Ok(Json(json!({ "instance_id": instance_id, "messages": messages })).into_response())
}

/// Body of ack and nack.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleRequest {
    /// Receipts from receive.
    receipts: Vec<String>,
}

/// `POST /v1/groups/{group}/ack`: CommitMessage for each receipt.
pub async fn ack(
    st: State<Shared>,
    who: Caller,
    group: ApiPath<String>,
    body: ApiJson<SettleRequest>,
) -> ApiResult<Response> {
    settle(st, who, group, body, Outcome::CommitMessage).await
}

/// `POST /v1/groups/{group}/nack`: ReconsumeLater for each receipt.
pub async fn nack(
    st: State<Shared>,
    who: Caller,
    group: ApiPath<String>,
    body: ApiJson<SettleRequest>,
) -> ApiResult<Response> {
    settle(st, who, group, body, Outcome::ReconsumeLater).await
}

/// Settles every receipt; when some fail, answers with the first failure's status and error, plus
/// which receipts failed and how many were settled (the others are settled all the same).
async fn settle(
    State(st): State<Shared>,
    Caller(who): Caller,
    ApiPath(group): ApiPath<String>,
    ApiJson(req): ApiJson<SettleRequest>,
    outcome: Outcome,
) -> ApiResult<Response> {
    who.check_subscribe("group", &group)?;
    if req.receipts.is_empty() {
        return Err(
            WharfError::bad_request("receipts is empty; pass the receipts from receive").into(),
        );
    }
    let mut settled = 0usize;
    let mut failed = Vec::new();
    let mut first: Option<WharfError> = None;
    for receipt in &req.receipts {
        match st.broker.settle(&group, receipt, outcome).await {
            Ok(()) => settled += 1,
            Err(e) => {
                failed.push(json!({"receipt": receipt, "error": e.to_json()["error"]}));
                first.get_or_insert(e);
            }
        }
    }
    match first {
        None => Ok(Json(json!({ "settled": settled })).into_response()),
        Some(e) => {
            let err = ApiError::from(e);
            let status = err.status();
            let mut body = err.error.to_json();
            body["settled"] = json!(settled);
            body["failed"] = json!(failed);
            Ok((status, Json(body)).into_response())
        }
    }
}

/// `GET /v1/groups/{group}/status`.
pub async fn status(
    State(st): State<Shared>,
    Caller(who): Caller,
    ApiPath(group): ApiPath<String>,
) -> ApiResult<Response> {
    who.check_subscribe("group", &group)?;
    Ok(Json(st.broker.group_status(&group).await?).into_response())
}

/// Body of `POST /v1/groups/{group}/offsets`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    /// Topic whose offset moves.
    topic: String,
    /// Store time to move to (ms).
    timestamp_ms: u64,
}

/// `POST /v1/groups/{group}/offsets`: reset the group's offset on a topic to a time.
pub async fn reset_offsets(
    State(st): State<Shared>,
    Caller(who): Caller,
    ApiPath(group): ApiPath<String>,
    ApiJson(req): ApiJson<ResetRequest>,
) -> ApiResult<Response> {
    who.check_subscribe("group", &group)?;
    who.check_subscribe("topic", &req.topic)?;
    st.broker
        .reset_offset(&group, &req.topic, req.timestamp_ms)
        .await?;
    Ok(
        Json(json!({"group": group, "topic": req.topic, "timestamp_ms": req.timestamp_ms}))
            .into_response(),
    )
}

/// Query of `GET /v1/groups/{group}/dead-letters`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    /// Page size; default 100.
    limit: Option<usize>,
    /// From the previous page.
    page_token: Option<String>,
}

/// `GET /v1/groups/{group}/dead-letters`.
pub async fn dead_letters(
    State(st): State<Shared>,
    Caller(who): Caller,
    ApiPath(group): ApiPath<String>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> ApiResult<Response> {
    who.check_subscribe("group", &group)?;
    let page = st
        .broker
        .dead_letters(
            &group,
            p.limit.unwrap_or(super::query::DEFAULT_PAGE),
            p.page_token.as_deref(),
        )
        .await?;
    Ok(super::query::page_response(&page))
}

/// `POST /v1/groups/{group}/dead-letters/{message_id}/resend`: `message_id` is the id the
/// producer got; the message is delivered again to this group only. Needs the rights to read
/// the group and to publish to the message's topic: a re-send puts that topic's message in
/// front of the group again, as a send would.
pub async fn resend_dead_letter(
    State(st): State<Shared>,
    Caller(who): Caller,
    ApiPath((group, message_id)): ApiPath<(String, String)>,
) -> ApiResult<Response> {
    who.check_subscribe("group", &group)?;
    if !who.publishes_all() {
        let message = st.broker.find_message(&message_id).await?;
        who.check_resend(&group, &original_topic(&message))?;
    }
    let receipt = st.broker.resend_dead_letter(&group, &message_id).await?;
    Ok(Json(receipt).into_response())
}
