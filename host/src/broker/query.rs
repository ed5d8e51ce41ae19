//! Message query: by id (with per-group delivery status), by key, by time range.

use serde::Serialize;

use super::Broker;
use super::consume::retry;
use crate::error::{Result, WharfError};
use crate::model::{MessageId, StoredMessage};
use crate::store::TimePage;

/// Why a message may be missing, said after its id in a not-found answer.
pub const NOT_FOUND: &str = "not found; it may be past retention or never stored";

/// The topic a message belongs to for permission checks: a retry or dead-letter copy belongs
/// to the topic its original was sent to.
pub fn original_topic(m: &StoredMessage) -> String {
    retry::origin(m).0
}

/// Most messages a key query returns.
pub const KEY_QUERY_LIMIT: usize = 64;
/// Most messages one time-range page returns.
pub const MAX_PAGE: usize = 1000;

/// Where a message stands for one consumer group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// The group has consumed it.
    Consumed,
    /// The group's tag expression excludes it.
    Filtered,
    /// Not yet consumed, or a retry of it is waiting for its back-off or its consumer.
    Pending,
    /// Not yet consumed (or a retry is outstanding) and the group has no online instance.
    Offline,
    /// `dead_letter`: every retry failed, so it sits in `%DLQ%<group>` unconsumed; an operator
    /// re-sends it with `POST /v1/groups/{group}/dead-letters/{message_id}/resend`.
    DeadLetter,
}

/// One group's status for a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Delivery {
    /// Consumer group.
    pub group: String,
    /// Status.
    pub status: DeliveryStatus,
}

/// A message found by id, with per-group delivery status.
#[derive(Debug, Clone)]
pub struct MessageView {
    /// The message.
    pub message: StoredMessage,
    /// One entry per consumer group subscribed to its topic.
    pub deliveries: Vec<Delivery>,
}

impl Broker {
    /// Finds a message by id, with its delivery status per group (for callers that may read
    /// every topic; front ends check rights between [`Broker::find_message`] and
    /// [`Broker::message_view`]).
    pub(in crate::broker) async fn message(&self, id: &str) -> Result<MessageView> {
        let message = self.find_message(id).await?;
        self.message_view(message).await
    }

    /// The stored message with this id (a retry or dead-letter copy as stored), without any
    /// delivery work, so a caller can check rights on [`original_topic`] first.
    pub(in crate::broker) async fn find_message(&self, id: &str) -> Result<StoredMessage> {
        let parsed: MessageId = id.parse()?;
        if let Some(m) = self.store.get(parsed).await? {
            return Ok(m);
        }
        // RocketMQ SDKs print offset message ids: store IPv4 (4 bytes), port (4), log position
        // (8). Wharf's own ids end in the same position, so both find the one record there.
        let position = parsed.position();
        let host = &parsed.0[0..8];
        match self.store.get_by_position(position).await? {
            Some(m)
                if m.id.position() == position
                    && m.wire.store_host.is_none_or(|h| offset_id_host(h) == host) =>
            {
                Ok(m)
            }
            _ => Err(WharfError::not_found(format!("message '{id}' {NOT_FOUND}"))),
        }
    }

    /// Adds the per-group delivery status to a message found by [`Broker::find_message`].
    pub(in crate::broker) async fn message_view(
        &self,
        mut message: StoredMessage,
    ) -> Result<MessageView> {
        let deliveries = self.engine.deliveries(self, &message).await?;
        if retry::is_copy_topic(&message.topic) {
            retry::strip_origin_key(&mut message);
        }
        Ok(MessageView {
            message,
            deliveries,
        })
    }

    /// The newest ≤ 64 messages of `topic` carrying `key`.
    pub(in crate::broker) async fn by_key(
        &self,
        topic: &str,
        key: &str,
    ) -> Result<Vec<StoredMessage>> {
        self.topic(topic)?;
        self.store.by_key(topic, key, KEY_QUERY_LIMIT).await
    }

    /// Messages of `topic` stored in `[begin_ms, end_ms]`, paged.
    pub(in crate::broker) async fn by_time(
        &self,
        topic: &str,
        begin_ms: u64,
        end_ms: u64,
        limit: usize,
        page_token: Option<&str>,
    ) -> Result<TimePage> {
        self.topic(topic)?;
        if begin_ms > end_ms {
            return Err(WharfError::bad_request(format!(
                "begin_ms {begin_ms} is after end_ms {end_ms}"
            )));
        }
        let limit = limit.clamp(1, MAX_PAGE);
        self.store
            .by_time(topic, begin_ms, end_ms, limit, page_token)
            .await
    }
}

/// The first 8 bytes of an offset message id for a record stored by `host`.
fn offset_id_host(host: std::net::SocketAddr) -> [u8; 8] {
    let ip = match host {
        std::net::SocketAddr::V4(a) => *a.ip(),
        std::net::SocketAddr::V6(a) => a
            .ip()
            .to_ipv4_mapped()
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
    };
    let mut b = [0u8; 8];
    b[0..4].copy_from_slice(&ip.octets());
    b[4..8].copy_from_slice(&i32::from(host.port()).to_be_bytes());
    b
}
