//! Each remoting request mapped onto [`BrokerApi`]: name server (routes), broker (send, pull,
//! offsets, heartbeats, member lists, send-back, unregister) and ONS signatures.
//!
//! Every request gets an answer with a code and a remark saying what to do; nothing a client
//! sends can panic the host. Wharf's own rules decide where the SDK's would differ: topics are
//! never created implicitly, a group is created on its first heartbeat only when
//! `[remoting] auto_create_groups` allows it, and a consumer without a committed offset starts
//! where the host's own consumers would.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use tracing::debug;
use wharf_codec::properties;

use super::codec::record::{MAX_INFLATED_BYTES, MessageRecord, SYSFLAG_COMPRESSED, encode_record};
use super::codec::{CodecError, Command, decode_batch, deflate, encode_offset_msg_id, inflate};
use super::codes;
use super::{ConnCtx, RemotingState};
use crate::broker::api::{
    ConsumeModel, DelayPolicy, GroupKind, GroupSpec, MemberSpec, OutgoingMessage, PullRequest,
    QueueChoice, SendBack, SendReceipt, Subscription, TagFilter,
};
use crate::broker::consume::schedule::delay_level_ms;
use crate::broker::consume::{PROP_ORIGIN_MESSAGE_ID, is_retry_topic_of};
use crate::error::{ErrorCode, ErrorKind, WharfError};
use crate::http::auth::Principal;
use crate::model::{StoredMessage, WireInfo};

/// Broker name routes give (one broker: the hosts sharing the store, this one as master).
pub const BROKER_NAME: &str = "wharf";
/// Cluster name routes give.
pub const CLUSTER_NAME: &str = "wharf";
/// Bodies at least this long are zlib-compressed on pull (RocketMQ producers compress from 4 KiB).
pub const COMPRESS_OVER: usize = 4096;
/// Longest a pull may be held, whatever the client asks.
const MAX_SUSPEND: Duration = Duration::from_secs(60);
/// Most messages one pull returns.
const MAX_PULL: usize = 1024;

/// Property with the ONS absolute start-deliver time (ms).
pub const PROP_START_DELIVER_TIME: &str = "__STARTDELIVERTIME";
/// Property with an absolute deliver time (ms), RocketMQ 5.
pub const PROP_TIMER_DELIVER_MS: &str = "TIMER_DELIVER_MS";
/// Property with a relative delay in seconds, RocketMQ 5.
pub const PROP_TIMER_DELAY_SEC: &str = "TIMER_DELAY_SEC";
/// Property with a relative delay in ms, RocketMQ 5.
pub const PROP_TIMER_DELAY_MS: &str = "TIMER_DELAY_MS";
/// Property with one of the 18 classic delay levels.
pub const PROP_DELAY_LEVEL: &str = "DELAY";
/// Property Java clients read a message's client-side id from.
pub const PROP_UNIQ_KEY: &str = "UNIQ_KEY";

/// A failed request: the response code and the remark.
#[derive(Debug)]
struct Fail {
    code: i32,
    remark: String,
}

impl Fail {
    fn new(code: i32, remark: impl Into<String>) -> Fail {
        Fail {
            code,
            remark: remark.into(),
        }
    }
}

impl From<WharfError> for Fail {
    fn from(e: WharfError) -> Fail {
        Fail {
            code: e.code.code(),
            remark: format!("{} ({}): {}", e.code.name(), e.code.code(), e.message),
        }
    }
}

type Reply = Result<Command, Fail>;

/// Answers one request (the reply of a oneway request is dropped by the caller).
pub async fn handle(state: &Arc<RemotingState>, ctx: &ConnCtx, req: Command) -> Command {
    let result = match authenticate(state, &req) {
        Ok(who) => dispatch(state, ctx, &who, &req).await,
        Err(f) => Err(f),
    };
    match result {
        Ok(reply) => reply,
        Err(f) => {
            debug!(code = f.code, remark = %f.remark, "request refused");
            Command::response_to(&req, f.code, Some(f.remark))
        }
    }
}

async fn dispatch(state: &RemotingState, ctx: &ConnCtx, who: &Principal, req: &Command) -> Reply {
    match req.code {
        codes::GET_ROUTEINFO_BY_TOPIC => route(state, ctx, req).await,
        codes::SEND_MESSAGE | codes::SEND_MESSAGE_V2 => send(state, ctx, who, req, false).await,
        codes::SEND_BATCH_MESSAGE => send(state, ctx, who, req, true).await,
        codes::HEART_BEAT => heartbeat(state, ctx, who, req).await,
        codes::GET_CONSUMER_LIST_BY_GROUP => consumer_list(state, who, req).await,
        codes::QUERY_CONSUMER_OFFSET => query_offset(state, who, req).await,
        codes::UPDATE_CONSUMER_OFFSET => update_offset(state, who, req).await,
        codes::SEARCH_OFFSET_BY_TIMESTAMP | codes::GET_MAX_OFFSET | codes::GET_MIN_OFFSET => {
            queue_offsets(state, who, req).await
        }
        codes::PULL_MESSAGE => pull(state, ctx, who, req).await,
        codes::CONSUMER_SEND_MSG_BACK => send_back(state, who, req).await,
        codes::UNREGISTER_CLIENT => unregister(state, who, req).await,
        codes::VIEW_MESSAGE_BY_ID => view_message(state, ctx, who, req).await,
        other => Err(Fail::new(
            codes::REQUEST_CODE_NOT_SUPPORTED,
            format!(
                "request code {other} is not supported by Wharf (transactions and ordered-queue \
                 locks are not served yet)"
            ),
        )),
    }
}

// ---- fields

fn field<'a>(req: &'a Command, name: &str) -> Option<&'a str> {
    // SEND_MESSAGE_V2 and batch use short names: look those up first, as a send reads a dozen
    // fields per message.
    let short = matches!(req.code, codes::SEND_MESSAGE_V2 | codes::SEND_BATCH_MESSAGE)
        .then(|| codes::v2_short_name(name))
        .flatten();
    short.and_then(|s| req.field(s)).or_else(|| req.field(name))
}

fn required<'a>(req: &'a Command, name: &str) -> Result<&'a str, Fail> {
    field(req, name).filter(|v| !v.is_empty()).ok_or_else(|| {
        Fail::new(
            codes::SYSTEM_ERROR,
            format!("request code {} needs the header field '{name}'", req.code),
        )
    })
}

fn number<T: std::str::FromStr>(req: &Command, name: &str) -> Result<Option<T>, Fail> {
    match field(req, name) {
        None | Some("") | Some("null") => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| {
            Fail::new(
                codes::SYSTEM_ERROR,
                format!("header field '{name}' = '{v}' is not a valid number"),
            )
        }),
    }
}

fn required_number<T: std::str::FromStr>(req: &Command, name: &str) -> Result<T, Fail> {
    number(req, name)?.ok_or_else(|| {
        Fail::new(
            codes::SYSTEM_ERROR,
            format!("request code {} needs the header field '{name}'", req.code),
        )
    })
}

fn queue_id(req: &Command) -> Result<u32, Fail> {
    let q: i64 = required_number(req, "queueId")?;
    u32::try_from(q).map_err(|_| {
        Fail::new(
            codes::SYSTEM_ERROR,
            format!("queueId {q} is out of range; queue ids are 0..queues"),
        )
    })
}

fn ok(req: &Command) -> Command {
    Command::response_to(req, codes::SUCCESS, None)
}

// ---- auth

/// The caller, from the ONS / ACL signature: `Signature = Base64(HMAC-SHA1(SecretKey, values
/// of every extField but Signature, ordered by name, then the body))`.
fn authenticate(state: &RemotingState, req: &Command) -> Result<Arc<Principal>, Fail> {
    if state.auth.is_open() {
        return Ok(state.auth.anonymous());
    }
    let (Some(ak), Some(sig)) = (req.field("AccessKey"), req.field("Signature")) else {
        return Err(Fail::new(
            codes::SYSTEM_ERROR,
            "this host requires signed requests: configure the client with an access key and \
             secret from the host's [[auth.keys]] (ali-ons: accessKeyId / accessKeySecret), so \
             requests carry AccessKey and Signature",
        ));
    };
    let mut data = Vec::with_capacity(256 + req.body.len());
    for (k, v) in req.ext_fields.iter() {
        if k != "Signature" {
            data.extend_from_slice(v.as_bytes());
        }
    }
    data.extend_from_slice(&req.body);
    state.auth.verify_hmac(ak, &data, sig).map_err(|e| {
        Fail::new(
            codes::SYSTEM_ERROR,
            format!(
                "signature refused: {} (the signed bytes are the values of every header field but \
                 Signature, ordered by name, followed by the body)",
                e.message
            ),
        )
    })
}

/// A retry topic counts as its group for permissions.
fn check_read(who: &Principal, group: &str, topic: &str) -> Result<(), Fail> {
    who.check_subscribe("group", group)?;
    if !is_retry_topic_of(topic, group) {
        who.check_subscribe("topic", topic)?;
    }
    Ok(())
}

// ---- name server

/// The broker addresses a route names: this host as the master (id 0, the address the
/// client reached), then every other live host sharing the store, by host id. All hosts serve
/// every queue of the one shared store, so a client whose host dies reaches the same queues
/// through another (RocketMQ clients fail over to a listed address and to their other name
/// servers, which are the other hosts).
async fn broker_addrs(
    state: &RemotingState,
    ctx: &ConnCtx,
) -> serde_json::Map<String, serde_json::Value> {
    let mut addrs = serde_json::Map::new();
    addrs.insert("0".into(), json!(ctx.store_host.to_string()));
    let me = state.broker.host_id().to_string();
    match state.broker.live_hosts().await {
        Ok(hosts) => {
            let others = hosts
                .into_iter()
                .filter(|h| h.host_id != me)
                .filter_map(|h| h.remoting);
            for (i, addr) in others.enumerate() {
                addrs.insert((i + 1).to_string(), json!(addr));
            }
        }
        // The route still names this host, which answers; the others come back next time.
        Err(e) => debug!(error = %e, "cannot list the other hosts for a route"),
    }
    addrs
}

async fn route(state: &RemotingState, ctx: &ConnCtx, req: &Command) -> Reply {
    let topic = required(req, "topic")?;
    let queues = if topic.starts_with("%RETRY%") || topic.starts_with("%DLQ%") {
        // A retry topic routes before its group exists: clients ask for it before their first
        // heartbeat creates the group.
        state.broker.queue_count(topic).max(1)
    } else {
        match state.broker.topic(topic) {
            Ok(t) => t.queues,
            Err(e) if e.code == ErrorCode::TopicNotExist => {
                return Err(Fail::new(
                    codes::TOPIC_NOT_EXIST,
                    format!(
                        "No topic route info in name server for the topic: {topic}; Wharf never \
                         creates topics implicitly: create it first (wharf topic create {topic})"
                    ),
                ));
            }
            Err(e) => return Err(e.into()),
        }
    };
    let body = json!({
        "queueDatas": [{
            "brokerName": BROKER_NAME,
            "readQueueNums": queues,
            "writeQueueNums": queues,
            "perm": 6,
            "topicSysFlag": 0,
            "topicSynFlag": 0,
        }],
        "brokerDatas": [{
            "cluster": CLUSTER_NAME,
            "brokerName": BROKER_NAME,
            "brokerAddrs": broker_addrs(state, ctx).await,
            "enableActingMaster": false,
        }],
        "filterServerTable": {},
    });
    let mut reply = ok(req);
    reply.body = Bytes::from(body.to_string());
    Ok(reply)
}

// ---- send

/// Splits a RocketMQ properties string into Wharf's tag, keys, start-deliver time and the
/// remaining properties.
struct Parsed {
    msg: OutgoingMessage,
}

fn parse_message(raw_props: &str, body: Bytes, born_ms: Option<u64>) -> Result<Parsed, Fail> {
    let illegal = |m: String| Fail::new(codes::MESSAGE_ILLEGAL, m);
    let mut props: BTreeMap<String, String> = properties::decode_map(raw_props.as_bytes())
        .map_err(|e| illegal(format!("message properties cannot be decoded: {e}")))?;
    // ali-ons writes TAGS = "null" (or "undefined") for an untagged message.
    let tag = props
        .remove(properties::TAGS)
        .filter(|t| !t.is_empty() && t != "null" && t != "undefined");
    let keys: Vec<String> = props
        .remove(properties::KEYS)
        .map(|k| properties::split_keys(&k).map(str::to_string).collect())
        .unwrap_or_default();
    let num = |name: &str| -> Result<Option<u64>, Fail> {
        match props.get(name).map(|v| v.trim()) {
            None | Some("") | Some("0") => Ok(None),
            Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
                illegal(format!(
                    "property {name} = '{v}' is not a non-negative whole number"
                ))
            }),
        }
    };
    let mut deliver_at_ms = num(PROP_START_DELIVER_TIME)?.or(num(PROP_TIMER_DELIVER_MS)?);
    let mut delay_ms = num(PROP_TIMER_DELAY_MS)?;
    if delay_ms.is_none() {
        delay_ms = num(PROP_TIMER_DELAY_SEC)?.map(|s| s.saturating_mul(1000));
    }
    if let Some(level) = num(PROP_DELAY_LEVEL)? {
        let level = u32::try_from(level)
            .ok()
            .filter(|l| (1..=18).contains(l))
            .ok_or_else(|| illegal(format!("delay level {level} is not one of 1..18")))?;
        if deliver_at_ms.is_none() && delay_ms.is_none() {
            delay_ms = Some(delay_level_ms(level, 1.0));
        }
    }
    if deliver_at_ms.is_some() {
        delay_ms = None;
    }
    Ok(Parsed {
        msg: OutgoingMessage {
            tag,
            keys,
            properties: props,
            body,
            deliver_at_ms: deliver_at_ms.take(),
            delay_ms,
            born_ms,
            queue: QueueChoice::RoundRobin,
        },
    })
}

fn plain_body(body: &[u8], sys_flag: i32) -> Result<Bytes, Fail> {
    if sys_flag & SYSFLAG_COMPRESSED == 0 {
        return Ok(Bytes::copy_from_slice(body));
    }
    inflate(body, MAX_INFLATED_BYTES)
        .map(Bytes::from)
        .map_err(|e| {
            Fail::new(
                codes::MESSAGE_ILLEGAL,
                format!("{e} (sysFlag bit 0 is set)"),
            )
        })
}

async fn send(
    state: &RemotingState,
    ctx: &ConnCtx,
    who: &Principal,
    req: &Command,
    batch: bool,
) -> Reply {
    let topic = required(req, "topic")?;
    let sys_flag: i32 = number(req, "sysFlag")?.unwrap_or(0);
    let flag: i32 = number(req, "flag")?.unwrap_or(0);
    let born_ms: Option<u64> = number(req, "bornTimestamp")?;
    let queue = match number::<i64>(req, "queueId")? {
        Some(q) if q >= 0 => QueueChoice::Queue(u32::try_from(q).unwrap_or(u32::MAX)),
        _ => QueueChoice::RoundRobin,
    };
    if let Some(group) = topic.strip_prefix("%RETRY%") {
        return send_to_retry(state, who, req, group, sys_flag).await;
    }
    who.check_publish(topic)?;
    let wire = WireInfo {
        flag,
        sys_flag: sys_flag & !SYSFLAG_COMPRESSED,
        born_host: Some(ctx.peer),
        store_host: Some(ctx.store_host),
    };
    let mut msgs = Vec::new();
    if batch {
        let entries = decode_batch(&req.body)
            .map_err(|e| Fail::new(codes::MESSAGE_ILLEGAL, format!("batch body: {e}")))?;
        for e in entries {
            let props = std::str::from_utf8(e.properties)
                .map_err(|_| Fail::new(codes::MESSAGE_ILLEGAL, "batch properties are not UTF-8"))?;
            let mut p = parse_message(props, plain_body(e.body, sys_flag)?, born_ms)?;
            p.msg.queue = queue.clone();
            msgs.push((
                p.msg,
                WireInfo {
                    flag: e.flag,
                    ..wire
                },
            ));
        }
    } else {
        let props = field(req, "properties").unwrap_or("");
        let mut p = parse_message(props, plain_body(&req.body, sys_flag)?, born_ms)?;
        p.msg.queue = queue;
        msgs.push((p.msg, wire));
    }
    let receipts = state.broker.send_wire(topic, msgs).await?;
    Ok(send_reply(req, ctx.store_host, &receipts))
}

fn send_reply(req: &Command, store_host: SocketAddr, receipts: &[SendReceipt]) -> Command {
    let mut reply = ok(req);
    reply
        .set(
            "msgId",
            Listed(receipts, |r: &SendReceipt| {
                encode_offset_msg_id(store_host, r.message_id.position())
            }),
        )
        .set(
            "wharfMessageId",
            Listed(receipts, |r: &SendReceipt| r.message_id),
        );
    if let Some(first) = receipts.first() {
        reply.set("queueId", first.queue_id).set(
            "queueOffset",
            // A timer message has no queue offset until it is due.
            first.queue_offset.map_or(-1, |o| o as i64),
        );
    }
    reply
}

/// Displays what the function makes of each item, comma-separated (a batch's ids in one
/// header field), straight into the field with no string per item.
struct Listed<'a, T, F>(&'a [T], F);

impl<T, D: std::fmt::Display, F: Fn(&T) -> D> std::fmt::Display for Listed<'_, T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, item) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}", (self.1)(item))?;
        }
        Ok(())
    }
}

/// A client that could not send a message back writes the retry itself to `%RETRY%<group>`
/// (ali-ons and the Java client both fall back to this): it becomes a send-back through the
/// group's retry schedule, so it is the same durable retry as any other.
async fn send_to_retry(
    state: &RemotingState,
    who: &Principal,
    req: &Command,
    group: &str,
    sys_flag: i32,
) -> Reply {
    who.check_subscribe("group", group)?;
    let p = parse_message(
        field(req, "properties").unwrap_or(""),
        plain_body(&req.body, sys_flag)?,
        number(req, "bornTimestamp")?,
    )?;
    let attempt: u32 = number(req, "reconsumeTimes")?.unwrap_or(1);
    let max: Option<u32> = number(req, "maxReconsumeTimes")?;
    let now = state.broker.clock().now_ms();
    let m = StoredMessage {
        id: crate::model::MessageId::new(now, 0, 0),
        topic: format!("%RETRY%{group}"),
        queue_id: 0,
        queue_offset: None,
        tag: p.msg.tag,
        keys: p.msg.keys,
        properties: p.msg.properties,
        body: p.msg.body,
        born_ms: p.msg.born_ms.unwrap_or(now),
        stored_ms: now,
        deliver_at_ms: None,
        reconsume_times: attempt.saturating_sub(1),
        wire: WireInfo::default(),
    };
    state
        .broker
        .send_back(
            group,
            &m,
            SendBack {
                delay: DelayPolicy::GroupSchedule,
                max_reconsume_times: max,
            },
        )
        .await?;
    let mut reply = ok(req);
    reply
        .set("msgId", "")
        .set("queueId", 0)
        .set("queueOffset", -1);
    Ok(reply)
}

// ---- heartbeats and members

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Heartbeat {
    #[serde(rename = "clientID")]
    client_id: String,
    #[serde(default)]
    consumer_data_set: Vec<ConsumerData>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConsumerData {
    group_name: String,
    #[serde(default)]
    message_model: Option<String>,
    #[serde(default)]
    subscription_data_set: Vec<SubscriptionData>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubscriptionData {
    topic: String,
    #[serde(default)]
    sub_string: Option<String>,
    #[serde(default)]
    expression_type: Option<String>,
}

fn check_tag_expression(expression_type: Option<&str>) -> Result<(), Fail> {
    match expression_type {
        None | Some("") | Some("TAG") => Ok(()),
        Some(other) => Err(Fail::new(
            codes::SUBSCRIPTION_PARSE_FAILED,
            format!("expression type {other} is not supported: Wharf filters by tag; use TAG"),
        )),
    }
}

async fn ensure_group(state: &RemotingState, group: &str, model: ConsumeModel) -> Result<(), Fail> {
    match state.broker.group(group) {
        Ok(_) => Ok(()),
        Err(e) if e.code == ErrorCode::SubscriptionGroupNotExist => {
            if !state.auto_create_groups {
                return Err(Fail::new(
                    codes::SUBSCRIPTION_GROUP_NOT_EXIST,
                    format!(
                        "consumer group '{group}' does not exist: create it (wharf group create \
                         {group}) or set [remoting] auto_create_groups = true"
                    ),
                ));
            }
            let spec = GroupSpec {
                name: group.to_string(),
                kind: GroupKind::Consumer,
                model,
                max_reconsume_times: None,
                consume_timeout_ms: None,
            };
            match state.broker.create_group(spec).await {
                Ok(_) => {
                    tracing::info!(group, ?model, "consumer group created on first heartbeat");
                    Ok(())
                }
                // Another client's heartbeat created it first.
                Err(e) if e.kind == ErrorKind::Conflict => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

async fn heartbeat(state: &RemotingState, ctx: &ConnCtx, who: &Principal, req: &Command) -> Reply {
    let hb: Heartbeat = serde_json::from_slice(&req.body).map_err(|e| {
        Fail::new(
            codes::SYSTEM_ERROR,
            format!("heartbeat body is not the expected JSON: {e}"),
        )
    })?;
    let pid = hb
        .client_id
        .split('@')
        .nth(1)
        .and_then(|p| p.parse::<u32>().ok());
    let mut first_error: Option<Fail> = None;
    for c in hb.consumer_data_set {
        let result = async {
            who.check_subscribe("group", &c.group_name)?;
            let model = match c.message_model.as_deref() {
                Some("BROADCASTING") => ConsumeModel::Broadcasting,
                _ => ConsumeModel::Clustering,
            };
            let mut subscriptions = Vec::with_capacity(c.subscription_data_set.len());
            for s in &c.subscription_data_set {
                check_tag_expression(s.expression_type.as_deref())?;
                if !is_retry_topic_of(&s.topic, &c.group_name) {
                    who.check_subscribe("topic", &s.topic)?;
                }
                let expression = match s.sub_string.as_deref() {
                    None | Some("") => "*".to_string(),
                    Some(e) => e.to_string(),
                };
                subscriptions.push(Subscription {
                    topic: s.topic.clone(),
                    expression,
                });
            }
            ensure_group(state, &c.group_name, model).await?;
            let spec = MemberSpec {
                member_id: hb.client_id.clone(),
                address: ctx.peer.to_string(),
                pid,
                subscriptions: subscriptions.clone(),
            };
            let changed = state.broker.heartbeat_member(&c.group_name, spec).await?;
            for s in &subscriptions {
                state.remember_subscription(&c.group_name, &s.topic, &s.expression);
            }
            state.register_member(&c.group_name, &hb.client_id, ctx.id);
            if changed {
                state.notify_group(&c.group_name);
            }
            Ok::<(), Fail>(())
        }
        .await;
        if let Err(f) = result
            && first_error.is_none()
        {
            first_error = Some(f);
        }
    }
    match first_error {
        Some(f) => Err(f),
        None => Ok(ok(req)),
    }
}

async fn consumer_list(state: &RemotingState, who: &Principal, req: &Command) -> Reply {
    let group = required(req, "consumerGroup")?;
    who.check_subscribe("group", group)?;
    let ids = state.broker.member_ids(group).await?;
    let mut reply = ok(req);
    reply.body = Bytes::from(json!({ "consumerIdList": ids }).to_string());
    Ok(reply)
}

async fn unregister(state: &RemotingState, who: &Principal, req: &Command) -> Reply {
    let client = required(req, "clientID")?;
    if let Some(group) = field(req, "consumerGroup").filter(|g| !g.is_empty()) {
        who.check_subscribe("group", group)?;
        state.forget_member(group, client);
        match state.broker.leave(group, client).await {
            Ok(true) => state.notify_group(group),
            Ok(false) => {}
            // Unregistering from a group that is gone is already done.
            Err(e) if e.code == ErrorCode::SubscriptionGroupNotExist => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(ok(req))
}

// ---- offsets

async fn query_offset(state: &RemotingState, who: &Principal, req: &Command) -> Reply {
    let group = required(req, "consumerGroup")?;
    let topic = required(req, "topic")?;
    let queue = queue_id(req)?;
    check_read(who, group, topic)?;
    // No committed offset: answer where the host's own consumers would start, so an SDK group
    // and a plugin group behave alike (RocketMQ answers 22 and lets each client decide).
    let offset = match state
        .broker
        .committed_queue_offset(group, topic, queue)
        .await?
    {
        Some(o) => o,
        None => state.broker.queue_start_offset(group, topic, queue).await?,
    };
    let mut reply = ok(req);
    reply.set("offset", offset);
    Ok(reply)
}

async fn update_offset(state: &RemotingState, who: &Principal, req: &Command) -> Reply {
    let group = required(req, "consumerGroup")?;
    let topic = required(req, "topic")?;
    let queue = queue_id(req)?;
    check_read(who, group, topic)?;
    let offset: i64 = required_number(req, "commitOffset")?;
    // ali-ons persists -1 for queues it has not consumed yet: nothing to commit.
    if offset >= 0 {
        state
            .broker
            .commit_queue_offset(group, topic, queue, offset as u64, None)
            .await?;
    }
    Ok(ok(req))
}

fn check_topic(state: &RemotingState, topic: &str) -> Result<(), Fail> {
    if topic.starts_with("%RETRY%") || topic.starts_with("%DLQ%") {
        return Ok(());
    }
    state.broker.topic(topic)?;
    Ok(())
}

async fn queue_offsets(state: &RemotingState, who: &Principal, req: &Command) -> Reply {
    let topic = required(req, "topic")?;
    let queue = queue_id(req)?;
    if let Some(group) = topic.strip_prefix("%RETRY%") {
        who.check_subscribe("group", group)?;
    } else {
        who.check_subscribe("topic", topic)?;
    }
    check_topic(state, topic)?;
    if queue >= state.broker.queue_count(topic) {
        return Err(Fail::new(
            codes::SYSTEM_ERROR,
            format!("topic '{topic}' has no queue {queue}; refresh the route"),
        ));
    }
    let offset = match req.code {
        codes::SEARCH_OFFSET_BY_TIMESTAMP => {
            let ts: u64 = required_number(req, "timestamp")?;
            state.broker.offset_for_time(topic, queue, ts).await?
        }
        codes::GET_MIN_OFFSET => state.broker.queue_bounds(topic, queue).await?.min,
        _ => state.broker.queue_bounds(topic, queue).await?.max,
    };
    let mut reply = ok(req);
    reply.set("offset", offset);
    Ok(reply)
}

// ---- pull

const PULL_FLAG_COMMIT: i32 = 1;
const PULL_FLAG_SUSPEND: i32 = 2;
const PULL_FLAG_SUBSCRIPTION: i32 = 4;

async fn pull(state: &RemotingState, ctx: &ConnCtx, who: &Principal, req: &Command) -> Reply {
    let group = required(req, "consumerGroup")?;
    let topic = required(req, "topic")?;
    let queue = queue_id(req)?;
    check_read(who, group, topic)?;
    let offset: i64 = required_number(req, "queueOffset")?;
    let offset = u64::try_from(offset).unwrap_or(0);
    let sys_flag: i32 = number(req, "sysFlag")?.unwrap_or(0);
    let max: usize = number::<i64>(req, "maxMsgNums")?
        .unwrap_or(32)
        .clamp(1, MAX_PULL as i64) as usize;
    check_tag_expression(field(req, "expressionType"))?;
    let expression = match field(req, "subscription").filter(|s| !s.is_empty()) {
        Some(s) if sys_flag & PULL_FLAG_SUBSCRIPTION != 0 => s.to_string(),
        _ => state
            .subscription(group, topic)
            .unwrap_or_else(|| "*".to_string()),
    };
    let filter = TagFilter::parse(&expression).map_err(|e| {
        Fail::new(
            codes::SUBSCRIPTION_PARSE_FAILED,
            format!("subscription '{expression}': {}", e.message),
        )
    })?;
    if sys_flag & PULL_FLAG_COMMIT != 0
        && let Some(c) = number::<i64>(req, "commitOffset")?
        && c >= 0
    {
        state
            .broker
            .commit_queue_offset(group, topic, queue, c as u64, None)
            .await?;
    }
    let wait = if sys_flag & PULL_FLAG_SUSPEND != 0 {
        Duration::from_millis(number::<u64>(req, "suspendTimeoutMillis")?.unwrap_or(15_000))
            .min(MAX_SUSPEND)
    } else {
        Duration::ZERO
    };
    let bounds = state.broker.queue_bounds(topic, queue).await?;
    if offset > bounds.max {
        let mut reply = Command::response_to(
            req,
            codes::PULL_OFFSET_MOVED,
            Some(format!(
                "offset {offset} is past the end of {topic}:{queue} ({}); restart at nextBeginOffset",
                bounds.max
            )),
        );
        pull_fields(&mut reply, bounds.max, bounds.min, bounds.max);
        return Ok(reply);
    }
    let pulled = tokio::select! {
        r = state.broker.pull_queue(group, PullRequest {
            topic,
            queue_id: queue,
            offset,
            max,
            filter: &filter,
            wait,
        }) => r?,
        () = ctx.shutdown.cancelled() => {
            let mut reply = Command::response_to(req, codes::PULL_NOT_FOUND, Some("host stopping".into()));
            pull_fields(&mut reply, offset, bounds.min, bounds.max);
            return Ok(reply);
        }
    };
    let (min, max_off) = (pulled.bounds.min, pulled.bounds.max);
    if pulled.messages.is_empty() {
        let code = if pulled.next_offset > offset {
            codes::PULL_RETRY_IMMEDIATELY
        } else {
            codes::PULL_NOT_FOUND
        };
        let mut reply = Command::response_to(req, code, None);
        pull_fields(&mut reply, pulled.next_offset, min, max_off);
        return Ok(reply);
    }
    let mut body = Vec::with_capacity(pulled.messages.iter().map(|m| m.body.len() + 256).sum());
    for m in &pulled.messages {
        encode_stored(m, ctx.store_host, &mut body)
            .map_err(|e| Fail::new(codes::SYSTEM_ERROR, e.to_string()))?;
    }
    let mut reply = ok(req);
    pull_fields(&mut reply, pulled.next_offset, min, max_off);
    reply.body = Bytes::from(body);
    Ok(reply)
}

fn pull_fields(reply: &mut Command, next: u64, min: u64, max: u64) {
    reply
        .set("nextBeginOffset", next)
        .set("minOffset", min)
        .set("maxOffset", max)
        .set("suggestWhichBrokerId", 0);
}

/// Appends `m` in the record layout clients decode pulled messages from.
pub fn encode_stored(
    m: &StoredMessage,
    store_host: SocketAddr,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let mut props = Vec::with_capacity(64);
    let origin_id;
    let uniq = if m.properties.contains_key(PROP_UNIQ_KEY) {
        None
    } else {
        // Java clients show UNIQ_KEY as the message id: give them the id Wharf's query answers.
        origin_id = m
            .properties
            .get(PROP_ORIGIN_MESSAGE_ID)
            .cloned()
            .unwrap_or_else(|| m.id.to_string());
        Some((PROP_UNIQ_KEY, origin_id.as_str()))
    };
    properties::encode_message(
        &mut props,
        m.tag.as_deref(),
        m.keys.iter().map(String::as_str),
        m.properties
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(uniq),
    );
    let mut sys_flag = m.wire.sys_flag & !SYSFLAG_COMPRESSED;
    let body = if m.body.len() >= COMPRESS_OVER {
        sys_flag |= SYSFLAG_COMPRESSED;
        deflate(&m.body)
    } else {
        m.body.to_vec()
    };
    let rec = MessageRecord {
        queue_id: m.queue_id as i32,
        flag: m.wire.flag,
        queue_offset: m.queue_offset.unwrap_or(0) as i64,
        physical_offset: m.id.position() as i64,
        sys_flag,
        born_ms: m.born_ms as i64,
        born_host: m
            .wire
            .born_host
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
        store_ms: m.stored_ms as i64,
        store_host: m.wire.store_host.unwrap_or(store_host),
        reconsume_times: m.reconsume_times as i32,
        prepared_tx_offset: 0,
        body,
        topic: m.topic.clone(),
        properties: props,
    };
    encode_record(&rec, out)
}

// ---- send back and view

async fn send_back(state: &RemotingState, who: &Principal, req: &Command) -> Reply {
    let group = required(req, "group")?;
    who.check_subscribe("group", group)?;
    let position: i64 = required_number(req, "offset")?;
    let delay_level: i32 = number(req, "delayLevel")?.unwrap_or(0);
    let max: Option<u32> =
        number::<i64>(req, "maxReconsumeTimes")?.and_then(|m| u32::try_from(m).ok());
    let message = match u64::try_from(position) {
        Ok(p) => state.broker.message_at(p).await?,
        Err(_) => None,
    };
    let Some(message) = message else {
        return Err(Fail::new(
            codes::SYSTEM_ERROR,
            format!(
                "no message at offset {position} (originMsgId {}): it may be past retention",
                field(req, "originMsgId").unwrap_or("?")
            ),
        ));
    };
    let delay = match delay_level {
        l if l < 0 => DelayPolicy::DeadLetterNow,
        0 => DelayPolicy::GroupSchedule,
        l => DelayPolicy::Level(l as u32),
    };
    let sent = state
        .broker
        .send_back(
            group,
            &message,
            SendBack {
                delay,
                max_reconsume_times: max,
            },
        )
        .await?;
    debug!(?sent, "send back");
    Ok(ok(req))
}

async fn view_message(
    state: &RemotingState,
    ctx: &ConnCtx,
    who: &Principal,
    req: &Command,
) -> Reply {
    let position: u64 = required_number(req, "offset")?;
    // As over HTTP: a key that may read nothing is refused before the lookup, and a message in
    // a topic the key may not read is answered like a missing one, so nothing leaks.
    who.check_subscribe_any("query messages")?;
    let missing = || {
        Fail::new(
            codes::SYSTEM_ERROR,
            format!(
                "no message at offset {position}: it may be past retention (or it is in a topic \
                 this access key may not read)"
            ),
        )
    };
    let Some(m) = state.broker.message_at(position).await? else {
        return Err(missing());
    };
    let (topic, _) = crate::broker::consume::retry::origin(&m);
    if !who.may_subscribe(&topic) {
        return Err(missing());
    }
    let mut body = Vec::new();
    encode_stored(&m, ctx.store_host, &mut body)
        .map_err(|e| Fail::new(codes::SYSTEM_ERROR, e.to_string()))?;
    let mut reply = ok(req);
    reply.body = Bytes::from(body);
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remoting::codes::v2_long_name;

    #[test]
    fn properties_become_tag_keys_and_timers() {
        let p = parse_message(
            "TAGS\x01order\x02KEYS\x01k1 k2\x02__STARTDELIVERTIME\x011700000000000\x02a\x01b\x02",
            Bytes::from_static(b"x"),
            Some(5),
        )
        .unwrap()
        .msg;
        assert_eq!(p.tag.as_deref(), Some("order"));
        assert_eq!(p.keys, vec!["k1", "k2"]);
        assert_eq!(p.deliver_at_ms, Some(1_700_000_000_000));
        assert_eq!(p.properties.get("a").map(String::as_str), Some("b"));
        assert!(!p.properties.contains_key("TAGS"));

        let p = parse_message("TAGS\x01null\x02DELAY\x013\x02", Bytes::new(), None)
            .unwrap()
            .msg;
        assert_eq!(p.tag, None, "ali-ons writes TAGS=null for untagged");
        assert_eq!(p.delay_ms, Some(10_000), "level 3 = 10 s");

        let p = parse_message("TIMER_DELAY_SEC\x012\x02", Bytes::new(), None)
            .unwrap()
            .msg;
        assert_eq!(p.delay_ms, Some(2000));
        let p = parse_message("TIMER_DELIVER_MS\x0199\x02", Bytes::new(), None)
            .unwrap()
            .msg;
        assert_eq!(p.deliver_at_ms, Some(99));

        let e = parse_message("DELAY\x0119\x02", Bytes::new(), None)
            .err()
            .unwrap();
        assert_eq!(e.code, codes::MESSAGE_ILLEGAL);
        let e = parse_message("__STARTDELIVERTIME\x01soon\x02", Bytes::new(), None)
            .err()
            .unwrap();
        assert!(e.remark.contains("__STARTDELIVERTIME"), "{}", e.remark);
        assert!(parse_message("no separator", Bytes::new(), None).is_err());
    }

    #[test]
    fn v2_short_names_read_as_long_ones() {
        let mut req = Command::request(codes::SEND_MESSAGE_V2, 1);
        req.set("b", "Trade").set("e", 3);
        assert_eq!(field(&req, "topic"), Some("Trade"));
        assert_eq!(queue_id(&req).unwrap(), 3);
        assert_eq!(v2_long_name("l"), Some("maxReconsumeTimes"));
        req.set("e", -1);
        assert!(queue_id(&req).is_err());
        req.set("e", "x");
        assert!(queue_id(&req).is_err());
    }

    #[test]
    fn v1_sends_read_long_names_and_v2_sends_fall_back_to_them() {
        let mut v1 = Command::request(codes::SEND_MESSAGE, 1);
        v1.set("topic", "Trade").set("b", "NotATopicField");
        assert_eq!(field(&v1, "topic"), Some("Trade"));
        let mut v2 = Command::request(codes::SEND_MESSAGE_V2, 2);
        v2.set("topic", "Long");
        assert_eq!(field(&v2, "topic"), Some("Long"));
        v2.set("b", "Short");
        assert_eq!(field(&v2, "topic"), Some("Short"));
    }

    #[test]
    fn a_batch_reply_lists_every_id_in_order() {
        let host: SocketAddr = "127.0.0.1:9876".parse().unwrap();
        let receipts: Vec<SendReceipt> = [7u64, 9]
            .iter()
            .map(|&p| SendReceipt {
                message_id: crate::model::MessageId::new(1, 2, p),
                queue_id: 3,
                queue_offset: Some(p),
            })
            .collect();
        let req = Command::request(codes::SEND_BATCH_MESSAGE, 5);
        let reply = send_reply(&req, host, &receipts);
        let want: Vec<String> = [7, 9]
            .iter()
            .map(|&p| encode_offset_msg_id(host, p))
            .collect();
        assert_eq!(reply.field("msgId"), Some(want.join(",").as_str()));
        let wharf: Vec<String> = receipts.iter().map(|r| r.message_id.to_string()).collect();
        assert_eq!(
            reply.field("wharfMessageId"),
            Some(wharf.join(",").as_str())
        );
        assert_eq!(reply.field("queueId"), Some("3"));
        assert_eq!(reply.field("queueOffset"), Some("7"));
        assert_eq!(send_reply(&req, host, &[]).field("msgId"), Some(""));
    }

    #[test]
    fn compressed_bodies_are_inflated_and_bombs_refused() {
        let z = deflate(b"hello hello hello");
        assert_eq!(&plain_body(&z, 1).unwrap()[..], b"hello hello hello");
        assert_eq!(&plain_body(b"raw", 0).unwrap()[..], b"raw");
        assert_eq!(
            plain_body(b"raw", 1).err().unwrap().code,
            codes::MESSAGE_ILLEGAL
        );
    }
}
