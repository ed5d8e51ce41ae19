//! The consumption engine: one API for every consumer kind.
//!
//! Broker-assigned consumers (plugins, the HTTP pull consumer, later MQTT) register an instance,
//! `receive` batches and `settle` each message with commit / reconsume-later. Queue-level access
//! for self-balancing clients (RocketMQ SDKs, later) reads a queue through the group's filter and
//! commits offsets directly. Retries re-enter `%RETRY%<group>` when their back-off ends; dead
//! letters land in `%DLQ%<group>`; both are ordinary topics in the store, so they are durable.
//!
//! SKELETON: signatures are the contract for front ends; bodies are filled in by the engine work.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Broker, BrokerConfig, Delivery, DeliveryStatus, GroupKind, SendReceipt};
use crate::clock::SharedClock;
use crate::error::Result;
use crate::model::StoredMessage;
use crate::store::{Store, TimePage};

/// One (topic, tag expression) pair a consumer subscribes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    /// Topic.
    pub topic: String,
    /// `*`, `TagA` or `TagA||TagB`.
    pub expression: String,
}

/// Who a consumer instance is; registering again with the same id refreshes it.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// Consumer group (must exist).
    pub group: String,
    /// Unique within the group, stable across reconnects (e.g. `plugin-name@host#worker`).
    pub instance_id: String,
    /// Network address or description shown in status.
    pub address: String,
    /// Process id, when known.
    pub pid: Option<u32>,
    /// What it subscribes; the same topic twice keeps the last.
    pub subscriptions: Vec<Subscription>,
}

/// A message handed to a consumer instance.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// The message (for a retry: `reconsume_times` already counts earlier attempts).
    pub message: StoredMessage,
    /// Opaque handle to settle it with.
    pub receipt: String,
}

/// What a consumer answered for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Done.
    CommitMessage,
    /// Retry after the back-off.
    ReconsumeLater,
}

/// One instance in a status answer.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceStatus {
    /// Instance id.
    pub instance_id: String,
    /// Address.
    pub address: String,
    /// Process id.
    pub pid: Option<u32>,
    /// Messages assigned to this instance not yet consumed.
    pub backlog: u64,
    /// Its subscriptions.
    pub subscriptions: Vec<Subscription>,
}

/// `GET /v1/groups/{group}/status`.
#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    /// Any instance online.
    pub online: bool,
    /// All instances subscribe the same.
    pub consistent: bool,
    /// Instances whose subscriptions differ from the majority (empty when consistent).
    pub inconsistent_instances: Vec<String>,
    /// Messages not yet consumed over all subscribed topics.
    pub backlog: u64,
    /// Messages consumed per second (recent).
    pub consume_tps: f64,
    /// Last time any message was settled (ms), if ever.
    pub last_consume_ms: Option<u64>,
    /// The group's subscriptions.
    pub subscriptions: Vec<Subscription>,
    /// Connected instances.
    pub instances: Vec<InstanceStatus>,
}

/// The engine's state; lives inside [`Broker`].
pub struct Engine {
    #[allow(dead_code)]
    config: BrokerConfig,
    #[allow(dead_code)]
    store: Arc<dyn Store>,
    #[allow(dead_code)]
    clock: SharedClock,
}

impl Engine {
    /// Builds the engine (no tasks yet).
    pub fn new(config: BrokerConfig, store: Arc<dyn Store>, clock: SharedClock) -> Engine {
        Engine {
            config,
            store,
            clock,
        }
    }

    /// Starts background tasks (timer reveal, retention, heartbeat expiry, consume timeouts).
    pub fn start(_broker: &Arc<Broker>) {}

    /// Stops background tasks and persists offsets.
    pub async fn shutdown(&self) {}

    /// Per consumer group status of `message` (query by id).
    pub async fn deliveries(
        &self,
        broker: &Broker,
        message: &StoredMessage,
    ) -> Result<Vec<Delivery>> {
        let _ = message;
        Ok(broker
            .list_groups()
            .into_iter()
            .filter(|g| g.kind == GroupKind::Consumer)
            .map(|g| Delivery {
                group: g.name,
                status: DeliveryStatus::Pending,
            })
            .collect())
    }
}

impl Broker {
    /// Registers (or refreshes) a consumer instance; counts as a heartbeat.
    pub async fn register_consumer(&self, spec: InstanceSpec) -> Result<()> {
        let _ = spec;
        todo!("consumption engine")
    }

    /// Marks an instance alive without changing its subscriptions.
    pub fn heartbeat(&self, group: &str, instance_id: &str) {
        let _ = (group, instance_id);
    }

    /// Removes an instance; its un-acknowledged messages go to the others.
    pub async fn unregister_consumer(&self, group: &str, instance_id: &str) -> Result<()> {
        let _ = (group, instance_id);
        todo!("consumption engine")
    }

    /// Long-polls up to `wait` for at most `max` messages for this instance.
    pub async fn receive(
        &self,
        group: &str,
        instance_id: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivered>> {
        let _ = (group, instance_id, max, wait);
        todo!("consumption engine")
    }

    /// Settles one delivered message; a stale or unknown receipt is a clear error.
    pub async fn settle(&self, group: &str, receipt: &str, outcome: Outcome) -> Result<()> {
        let _ = (group, receipt, outcome);
        todo!("consumption engine")
    }

    /// Status of a consumer group.
    pub async fn group_status(&self, group: &str) -> Result<GroupStatus> {
        let _ = group;
        todo!("consumption engine")
    }

    /// Resets the group's offset on `topic` to the first message stored at or after `timestamp_ms`.
    pub async fn reset_offset(&self, group: &str, topic: &str, timestamp_ms: u64) -> Result<()> {
        let _ = (group, topic, timestamp_ms);
        todo!("consumption engine")
    }

    /// Dead letters of a group, paged like a time-range query.
    pub async fn dead_letters(
        &self,
        group: &str,
        limit: usize,
        page_token: Option<&str>,
    ) -> Result<TimePage> {
        let _ = (group, limit, page_token);
        todo!("consumption engine")
    }

    /// Re-sends one dead letter to its original topic.
    pub async fn resend_dead_letter(&self, group: &str, message_id: &str) -> Result<SendReceipt> {
        let _ = (group, message_id);
        todo!("consumption engine")
    }
}
