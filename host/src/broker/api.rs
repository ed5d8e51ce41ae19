//! The broker API: the whole surface front ends (HTTP, plugins, benches, and the MQTT and
//! remoting front ends to come) may call. The broker's own methods are private to `broker`;
//! nothing outside it reaches the store.
//!
//! The parts, top to bottom: resources (topics, groups); produce with a queue choice; query;
//! queue-level consumption for clients that balance queues themselves and for fan-out (read a
//! queue through a tag filter, wait on one queue, commit an offset fenced by a lease epoch,
//! send back under a delay policy, look a message up by log position); membership and queue
//! leases; broker-assigned consumption served by this host's dispatcher (subscribe, receive,
//! settle by receipt or by token in batches); dead letters and status; plugin deployment
//! records; host operations.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub use super::consume::{
    DelayPolicy, Delivered, DeliveryToken, GroupStatus, InstanceSpec, InstanceStatus, Member,
    MemberSpec, Outcome, PullRequest, QueuePull, SendBack, SentBack, Subscription, TagFilter,
};
pub use super::deployments::{PluginRecord, VersionRecord};
pub use super::query::{Delivery, DeliveryStatus, MessageView};
pub use super::resources::HostInfo;
pub use super::send::{MQTT_LOCAL_QUEUES, MQTT_LOCAL_TOPIC, SendReceipt};
pub use super::specs::{
    ConsumeModel, Group, GroupKind, GroupPatch, GroupSpec, Topic, TopicSpec, TopicType,
};
pub use super::specs::{OutgoingMessage, QueueChoice};
pub use super::{Broker, BrokerConfig};
pub use crate::store::{Lease, LeaseKey, MemberKind, QueueBounds, StoreStats, TimePage};
use crate::store::{PutCondition, PutOutcome};

use crate::clock::SharedClock;
use crate::error::Result;
use crate::model::{StoredMessage, WireInfo};

/// The spaces front ends keep durable records in, each apart from the broker's own metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateSpace {
    /// MQTT sessions of clean-session=false clients, by client id.
    MqttSession,
    /// MQTT retained messages, by topic.
    MqttRetained,
    /// MQTT presence counters (`eventIndex`), by client id.
    MqttPresence,
    /// Which host's connection holds each MQTT client id now (cluster-wide takeover).
    MqttOwner,
    /// Takeover notices to one host (by its host id): which of its MQTT connections another
    /// host's connection took the client id from, by channel id. Only that host watches it.
    MqttKick(String),
}

impl StateSpace {
    fn namespace(&self) -> std::borrow::Cow<'static, str> {
        match self {
            StateSpace::MqttSession => "fe.mqtt.session".into(),
            StateSpace::MqttRetained => "fe.mqtt.retained".into(),
            StateSpace::MqttPresence => "fe.mqtt.presence".into(),
            StateSpace::MqttOwner => "fe.mqtt.owner".into(),
            StateSpace::MqttKick(host) => format!("fe.mqtt.kick.{host}").into(),
        }
    }
}

/// A handle on the broker for front ends; cheap to clone.
#[derive(Clone)]
pub struct BrokerApi {
    broker: Arc<Broker>,
}

impl BrokerApi {
    /// The API over `broker`.
    pub fn new(broker: Arc<Broker>) -> BrokerApi {
        BrokerApi { broker }
    }

    // ---- resources

    /// Creates a topic (409 if it exists).
    pub async fn create_topic(&self, spec: TopicSpec) -> Result<Topic> {
        self.broker.create_topic(spec).await
    }
    /// Every topic, sorted by name.
    pub fn list_topics(&self) -> Vec<Topic> {
        self.broker.list_topics()
    }
    /// One topic (`TOPIC_NOT_EXIST` if unknown).
    pub fn topic(&self, name: &str) -> Result<Topic> {
        self.broker.topic(name)
    }
    /// Deletes a topic.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        self.broker.delete_topic(name).await
    }
    /// Creates a group (409 if it exists).
    pub async fn create_group(&self, spec: GroupSpec) -> Result<Group> {
        self.broker.create_group(spec).await
    }
    /// Replaces a group's settings as a whole (plugins deploying their manifest's settings).
    pub async fn update_group(&self, group: Group) -> Result<Group> {
        self.broker.update_group(group).await
    }
    /// Changes the settings `patch` names; the latest setting wins for every instance at once.
    pub async fn patch_group(&self, name: &str, patch: GroupPatch) -> Result<Group> {
        self.broker.patch_group(name, patch).await
    }
    /// Every group, sorted by name.
    pub fn list_groups(&self) -> Vec<Group> {
        self.broker.list_groups()
    }
    /// One group (`SUBSCRIPTION_GROUP_NOT_EXIST` if unknown).
    pub fn group(&self, name: &str) -> Result<Group> {
        self.broker.group(name)
    }
    /// Deletes a group and everything consumption kept for it.
    pub async fn delete_group(&self, name: &str) -> Result<()> {
        self.broker.delete_group(name).await
    }

    // ---- produce and query

    /// Sends a batch (all or nothing); answers once durable per the flush mode. Each message
    /// picks its queue by [`QueueChoice`].
    pub async fn send(&self, topic: &str, msgs: Vec<OutgoingMessage>) -> Result<Vec<SendReceipt>> {
        self.broker.send(topic, msgs).await
    }
    /// [`BrokerApi::send`] with each message's RocketMQ wire fields (the remoting front end).
    pub async fn send_wire(
        &self,
        topic: &str,
        msgs: Vec<(OutgoingMessage, WireInfo)>,
    ) -> Result<Vec<SendReceipt>> {
        self.broker.send_wire(topic, msgs).await
    }
    /// A message by id, with per-group delivery status.
    pub async fn message(&self, id: &str) -> Result<MessageView> {
        self.broker.message(id).await
    }
    /// A message by id, without delivery status (cheap; for permission checks first). Accepts
    /// Wharf's id and the offset message id RocketMQ SDKs print (store host + log position).
    pub async fn find_message(&self, id: &str) -> Result<StoredMessage> {
        self.broker.find_message(id).await
    }
    /// Per-group delivery status of a message already found.
    pub async fn message_view(&self, message: StoredMessage) -> Result<MessageView> {
        self.broker.message_view(message).await
    }
    /// The newest ≤ 64 messages of `topic` carrying `key`.
    pub async fn by_key(&self, topic: &str, key: &str) -> Result<Vec<StoredMessage>> {
        self.broker.by_key(topic, key).await
    }
    /// Messages of `topic` stored in `[begin_ms, end_ms]`, paged.
    pub async fn by_time(
        &self,
        topic: &str,
        begin_ms: u64,
        end_ms: u64,
        limit: usize,
        page_token: Option<&str>,
    ) -> Result<TimePage> {
        self.broker
            .by_time(topic, begin_ms, end_ms, limit, page_token)
            .await
    }

    // ---- queue level: self-balancing clients and fan-out

    /// Reads up to `max` messages of one queue from `from` through `filter`; no state.
    pub async fn read_queue(
        &self,
        topic: &str,
        queue_id: u32,
        from: u64,
        max: usize,
        filter: &TagFilter,
    ) -> Result<QueuePull> {
        self.broker
            .read_queue(topic, queue_id, from, max, filter)
            .await
    }
    /// Waits until one queue has a visible message at or past `offset` (true) or `deadline`.
    pub async fn wait_queue(
        &self,
        topic: &str,
        queue_id: u32,
        offset: u64,
        deadline: Instant,
    ) -> bool {
        self.broker
            .wait_queue(topic, queue_id, offset, deadline)
            .await
    }
    /// Read + wait for `group`: RocketMQ's long-polling PULL.
    pub async fn pull_queue(&self, group: &str, req: PullRequest<'_>) -> Result<QueuePull> {
        self.broker.pull_queue(group, req).await
    }
    /// Commits the next offset to consume; fenced when `epoch` (a lease epoch) is given.
    pub async fn commit_queue_offset(
        &self,
        group: &str,
        topic: &str,
        queue_id: u32,
        offset: u64,
        epoch: Option<u64>,
    ) -> Result<()> {
        self.broker
            .commit_queue_offset(group, topic, queue_id, offset, epoch)
            .await
    }
    /// The committed offset of (group, topic, queue), if any.
    pub async fn committed_queue_offset(
        &self,
        group: &str,
        topic: &str,
        queue_id: u32,
    ) -> Result<Option<u64>> {
        self.broker
            .committed_queue_offset(group, topic, queue_id)
            .await
    }
    /// Where `group` starts on a queue it never committed (the dispatcher's start rule).
    pub async fn queue_start_offset(&self, group: &str, topic: &str, queue_id: u32) -> Result<u64> {
        self.broker.queue_start_offset(group, topic, queue_id).await
    }
    /// The first offset of a queue stored at or after `timestamp_ms` (search by time).
    pub async fn offset_for_time(
        &self,
        topic: &str,
        queue_id: u32,
        timestamp_ms: u64,
    ) -> Result<u64> {
        self.broker
            .offset_for_time(topic, queue_id, timestamp_ms)
            .await
    }
    /// The message at a log position.
    pub async fn message_at(&self, position: u64) -> Result<Option<StoredMessage>> {
        self.broker.message_at(position).await
    }
    /// Schedules another attempt of `message` for `group` (or dead-letters it) under `policy`.
    pub async fn send_back(
        &self,
        group: &str,
        message: &StoredMessage,
        policy: SendBack,
    ) -> Result<SentBack> {
        self.broker.send_back(group, message, policy).await
    }

    // ---- membership and leases

    /// A self-balancing client's heartbeat; true when the member list changed.
    pub async fn heartbeat_member(&self, group: &str, spec: MemberSpec) -> Result<bool> {
        self.broker.heartbeat_member(group, spec).await
    }
    /// Live members of a group.
    pub async fn members(&self, group: &str) -> Result<Vec<Member>> {
        self.broker.members(group).await
    }
    /// Ids of a group's live self-balancing members, sorted.
    pub async fn member_ids(&self, group: &str) -> Result<Vec<String>> {
        self.broker.member_ids(group).await
    }
    /// A self-balancing client leaves; true when it was live.
    pub async fn leave(&self, group: &str, member_id: &str) -> Result<bool> {
        self.broker.leave(group, member_id).await
    }
    /// Takes the lease on a queue for `holder` (e.g. an ordered consumer's lock) for `ttl_ms`;
    /// `None` while another holder's lease is live.
    pub async fn acquire_lease(
        &self,
        key: &LeaseKey,
        holder: &str,
        ttl_ms: u64,
    ) -> Result<Option<Lease>> {
        self.broker.group(&key.group)?;
        self.broker.store.lease_acquire(key, holder, ttl_ms).await
    }
    /// Extends a held lease; `None` when it was lost.
    pub async fn renew_lease(&self, lease: &Lease, ttl_ms: u64) -> Result<Option<Lease>> {
        self.broker.store.lease_renew(lease, ttl_ms).await
    }
    /// Gives a lease up.
    pub async fn release_lease(&self, lease: &Lease) -> Result<()> {
        self.broker.store.lease_release(lease).await
    }

    // ---- broker-assigned consumers (this host's dispatcher)

    /// Registers (or refreshes) an instance with exactly these subscriptions.
    pub async fn register_consumer(&self, spec: InstanceSpec) -> Result<()> {
        self.broker.register_consumer(spec).await
    }
    /// Registers an instance, or adds these subscriptions to the ones it has.
    pub async fn subscribe(&self, spec: InstanceSpec) -> Result<()> {
        self.broker.subscribe(spec).await
    }
    /// Marks an instance alive without changing its subscriptions.
    pub fn heartbeat(&self, group: &str, instance_id: &str) {
        self.broker.heartbeat(group, instance_id)
    }
    /// True when the instance is registered and alive.
    pub fn is_registered(&self, group: &str, instance_id: &str) -> bool {
        self.broker.is_registered(group, instance_id)
    }
    /// An instance leaves on purpose, handing back what it holds.
    pub async fn unregister_consumer(&self, group: &str, instance_id: &str) -> Result<()> {
        self.broker.unregister_consumer(group, instance_id).await
    }
    /// Long-polls up to `wait` for at most `max` messages for the instance.
    pub async fn receive(
        &self,
        group: &str,
        instance_id: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivered>> {
        self.broker.receive(group, instance_id, max, wait).await
    }
    /// Like [`BrokerApi::receive`], only messages of `topics`.
    pub async fn receive_topics(
        &self,
        group: &str,
        instance_id: &str,
        topics: &[String],
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivered>> {
        self.broker
            .receive_topics(group, instance_id, topics, max, wait)
            .await
    }
    /// The receipt a remote consumer settles `delivered` with.
    pub fn receipt(&self, group: &str, delivered: &Delivered) -> String {
        self.broker.receipt(group, delivered)
    }
    /// Settles one delivery by its receipt.
    pub async fn settle(&self, group: &str, receipt: &str, outcome: Outcome) -> Result<()> {
        self.broker.settle(group, receipt, outcome).await
    }
    /// Settles in-process deliveries by token, in one pass; one result per entry.
    pub async fn settle_batch(
        &self,
        group: &str,
        batch: &[(DeliveryToken, Outcome)],
    ) -> Result<Vec<Result<()>>> {
        self.broker.settle_batch(group, batch).await
    }

    // ---- MQTT gateway storage and front-end state

    /// Sends to the MQTT gateway's own topic ([`MQTT_LOCAL_TOPIC`]): MQTT-to-MQTT traffic whose
    /// first level is no broker topic. Durable per the flush mode, like any send.
    pub async fn send_mqtt_local(&self, msgs: Vec<OutgoingMessage>) -> Result<Vec<SendReceipt>> {
        self.broker.send_mqtt_local(msgs).await
    }
    /// Oldest kept and next offsets of one queue.
    pub async fn queue_bounds(&self, topic: &str, queue_id: u32) -> Result<QueueBounds> {
        self.broker.store.queue_bounds(topic, queue_id).await
    }
    /// Queue count of a broker topic or of an engine topic (`%RETRY%`, `%DLQ%`, `%MQTT%`).
    pub fn queue_count(&self, topic: &str) -> u32 {
        self.broker.engine_queue_count(topic)
    }
    /// A front end's durable record (an MQTT session, a retained message), if stored.
    pub async fn state_get(&self, space: StateSpace, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.state_entry(space, key).await?.map(|(v, _)| v))
    }
    /// A front end's record with its store version (for [`BrokerApi::state_put_if`]).
    pub async fn state_entry(
        &self,
        space: StateSpace,
        key: &str,
    ) -> Result<Option<(Vec<u8>, u64)>> {
        Ok(self
            .broker
            .store
            .meta_get(&space.namespace(), key)
            .await?
            .map(|e| (e.value, e.version)))
    }
    /// Stores a front end's record only if it is still at store version `expected` (`None`:
    /// absent), atomically with the check. Returns the new version, or `None` when another
    /// write came first (nothing written).
    pub async fn state_put_if(
        &self,
        space: StateSpace,
        key: &str,
        value: Vec<u8>,
        expected: Option<u64>,
    ) -> Result<Option<u64>> {
        let cond = expected.map_or(PutCondition::Absent, PutCondition::Version);
        match self
            .broker
            .store
            .meta_put_if(&space.namespace(), key, value, cond)
            .await?
        {
            PutOutcome::Written { version } => Ok(Some(version)),
            PutOutcome::Conflict { .. } => Ok(None),
        }
    }
    /// Moves when any host sharing the store writes or deletes a record of `space` (another
    /// host's change within [`crate::store::META_WATCH_MS`]); it may also move without one.
    pub fn watch_state(&self, space: StateSpace) -> tokio::sync::watch::Receiver<u64> {
        self.broker.store.watch_meta(&space.namespace())
    }
    /// Stores a front end's record durably (per the flush mode) before answering.
    pub async fn state_put(&self, space: StateSpace, key: &str, value: Vec<u8>) -> Result<()> {
        self.broker
            .store
            .meta_put(&space.namespace(), key, value)
            .await
    }
    /// Forgets a front end's record.
    pub async fn state_delete(&self, space: StateSpace, key: &str) -> Result<()> {
        self.broker.store.meta_delete(&space.namespace(), key).await
    }
    /// Every record of one space.
    pub async fn state_list(&self, space: StateSpace) -> Result<Vec<(String, Vec<u8>)>> {
        self.broker.store.meta_list(&space.namespace()).await
    }
    /// Every record of one space with its store version (for [`BrokerApi::state_put_if`]).
    pub async fn state_entries(&self, space: StateSpace) -> Result<Vec<(String, Vec<u8>, u64)>> {
        Ok(self
            .broker
            .store
            .meta_entries(&space.namespace())
            .await?
            .into_iter()
            .map(|(k, e)| (k, e.value, e.version))
            .collect())
    }

    // ---- dead letters and status

    /// Status of a consumer group.
    pub async fn group_status(&self, group: &str) -> Result<GroupStatus> {
        self.broker.group_status(group).await
    }
    /// Resets the group's offset on `topic` to a store time.
    pub async fn reset_offset(&self, group: &str, topic: &str, timestamp_ms: u64) -> Result<()> {
        self.broker.reset_offset(group, topic, timestamp_ms).await
    }
    /// Dead letters of a group, paged.
    pub async fn dead_letters(
        &self,
        group: &str,
        limit: usize,
        page_token: Option<&str>,
    ) -> Result<TimePage> {
        self.broker.dead_letters(group, limit, page_token).await
    }
    /// Re-sends one dead letter to its group only.
    pub async fn resend_dead_letter(&self, group: &str, message_id: &str) -> Result<SendReceipt> {
        self.broker.resend_dead_letter(group, message_id).await
    }

    // ---- plugin deployment records

    /// Every stored plugin deployment.
    pub async fn deployments(&self) -> Result<Vec<PluginRecord>> {
        self.broker.deployments().await
    }
    /// Stores a plugin deployment record.
    pub async fn save_deployment(&self, record: &PluginRecord) -> Result<()> {
        self.broker.save_deployment(record).await
    }
    /// Forgets a plugin's deployment record.
    pub async fn delete_deployment(&self, name: &str) -> Result<()> {
        self.broker.delete_deployment(name).await
    }
    /// One plugin's record and its store version (for [`BrokerApi::save_deployment_if`]).
    pub async fn deployment(&self, name: &str) -> Result<Option<(PluginRecord, u64)>> {
        self.broker.deployment(name).await
    }
    /// Stores a record only if it is still at store version `expected` (`None`: absent); 409 else.
    pub async fn save_deployment_if(
        &self,
        record: &PluginRecord,
        expected: Option<u64>,
    ) -> Result<()> {
        self.broker.save_deployment_if(record, expected).await
    }
    /// Stores a version's manifest and component under the first free number from `from`.
    pub async fn store_plugin_version(
        &self,
        name: &str,
        from: u64,
        manifest: &str,
        component: &[u8],
    ) -> Result<u64> {
        self.broker
            .store_plugin_version(name, from, manifest, component)
            .await
    }
    /// A stored version's manifest and component, if the store has it.
    pub async fn plugin_version(
        &self,
        name: &str,
        version: u64,
    ) -> Result<Option<(String, Vec<u8>)>> {
        self.broker.plugin_version(name, version).await
    }
    /// Deletes one stored version's bytes.
    pub async fn delete_plugin_version(&self, name: &str, version: u64) -> Result<()> {
        self.broker.delete_plugin_version(name, version).await
    }
    /// Deletes every stored version's bytes of a plugin.
    pub async fn delete_plugin_versions(&self, name: &str) -> Result<()> {
        self.broker.delete_plugin_versions(name).await
    }
    /// Deletes stored versions no deployment names that are older than the newest it does.
    pub async fn prune_plugin_versions(&self, record: &PluginRecord) -> Result<()> {
        self.broker.prune_plugin_versions(record).await
    }
    /// Moves when any host deploys, rolls back or removes a plugin.
    pub fn watch_deployments(&self) -> tokio::sync::watch::Receiver<u64> {
        self.broker.watch_deployments()
    }
    /// Reloads topics and groups from the store now (before acting on another host's change).
    pub async fn refresh_registry(&self) -> Result<()> {
        self.broker.reload_registry().await
    }

    // ---- hosts sharing the store

    /// Renews this host's membership row for `ttl_ms`, with its remoting address.
    pub async fn host_heartbeat(&self, remoting: Option<String>, ttl_ms: u64) -> Result<()> {
        self.broker.host_heartbeat(remoting, ttl_ms).await
    }
    /// Every live host sharing the store, by host id.
    pub async fn live_hosts(&self) -> Result<Vec<HostInfo>> {
        self.broker.live_hosts().await
    }
    /// Removes this host's membership row (clean shutdown).
    pub async fn host_leave(&self) -> Result<()> {
        self.broker.host_leave().await
    }

    // ---- host operations

    /// True when the store can take writes now (`/healthz`).
    pub fn writable(&self) -> bool {
        self.broker.store.writable()
    }
    /// Why the store refuses writes until restart, if it does (`/healthz`).
    pub fn unwritable_reason(&self) -> Option<String> {
        self.broker.store.unwritable_reason()
    }
    /// Store counters and histograms for `/metrics`.
    pub fn store_stats(&self) -> StoreStats {
        self.broker.store.stats()
    }
    /// The injected clock.
    pub fn clock(&self) -> &SharedClock {
        self.broker.clock()
    }
    /// Broker settings.
    pub fn config(&self) -> &BrokerConfig {
        self.broker.config()
    }
    /// This host's identity for this boot.
    pub fn host_id(&self) -> &str {
        self.broker.host_id()
    }
    /// Flushes and stops (graceful shutdown).
    pub async fn shutdown(&self) -> Result<()> {
        self.broker.shutdown().await
    }
}
