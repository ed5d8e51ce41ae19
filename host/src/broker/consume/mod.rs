//! The consumption engine: one API for every consumer kind.
//!
//! Broker-assigned consumers (plugins, the HTTP pull consumer, later MQTT) register an instance,
//! `receive` batches and `settle` each message with commit / reconsume-later. Queue-level access
//! for self-balancing clients (RocketMQ SDKs, later) reads a queue through the group's filter and
//! commits offsets directly. Retries re-enter `%RETRY%<group>` when their back-off ends; dead
//! letters land in `%DLQ%<group>`; both are ordinary topics in the store, so they are durable.
//!
//! Layout: [`filter`] parses tag expressions, [`rebalance`] splits queues, [`progress`] tracks
//! one queue's read position and unsettled messages, [`group_state`] holds a group's instances,
//! [`dispatch`] implements receive/settle, [`retry`] writes retries and dead letters, [`timers`]
//! runs the background work, [`status`] answers status and per-message delivery queries, and
//! [`queue_api`] serves self-balancing clients.

pub mod dispatch;
pub mod filter;
pub mod group_state;
pub mod leases;
pub mod members;
pub mod progress;
pub mod queue_api;
pub mod rebalance;
pub mod receipt;
pub mod retry;
pub mod schedule;
pub mod status;
pub mod timers;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{info, instrument, warn};

use super::{Broker, ConsumeModel, Delivery, GroupKind, SendReceipt};
use crate::error::{ErrorCode, ErrorKind, Result, WharfError};
use crate::model::StoredMessage;
use crate::store::{Store, TimePage};
pub use filter::TagFilter;
use group_state::{GroupState, Instance};

pub use super::specs::Subscription;
pub use members::{Member, MemberSpec};
pub use queue_api::{DelayPolicy, PullRequest, QueuePull, SendBack, SentBack};
pub use receipt::DeliveryToken;

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
    /// The message (for a retry: `reconsume_times` already counts earlier attempts); shared
    /// with the engine's in-flight entry, so handing it out copies nothing.
    pub message: Arc<StoredMessage>,
    /// Names this one delivery; in-process consumers settle with it directly, remote ones get
    /// it wrapped in a receipt ([`Broker::receipt`]).
    pub token: DeliveryToken,
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

/// Property naming the topic a retry or dead letter came from.
pub const PROP_RETRY_TOPIC: &str = "RETRY_TOPIC";
/// Property naming the id of the message a retry or dead letter is a copy of.
pub const PROP_ORIGIN_MESSAGE_ID: &str = "ORIGIN_MESSAGE_ID";
/// A new group starts from the earliest kept message when the topic's first message is at most
/// this old, else from the newest.
pub const START_FROM_EARLIEST_MAX_AGE_MS: u64 = 3 * 24 * 3600 * 1000;
/// Most messages one receive hands out.
pub const MAX_RECEIVE_BATCH: usize = 1024;
/// Store metadata namespace holding each group's last known subscriptions.
pub(super) const SUBSCRIPTIONS_NS: &str = "consumer_subscriptions";

/// The per-group retry topic.
pub fn retry_topic(group: &str) -> String {
    format!("%RETRY%{group}")
}

/// True when `topic` is `group`'s retry topic; checked without building the name, since
/// receive asks on every queue read.
pub fn is_retry_topic_of(topic: &str, group: &str) -> bool {
    topic.strip_prefix("%RETRY%") == Some(group)
}

/// The per-group dead-letter topic.
pub fn dlq_topic(group: &str) -> String {
    format!("%DLQ%{group}")
}

/// Key under which a broadcasting instance's own offsets are committed.
pub fn broadcast_offsets_key(group: &str, instance: &str) -> String {
    format!("{group}%BROADCAST%{instance}")
}

/// One group's state and the signal long polls wait on.
pub struct GroupHandle {
    /// Mutable state; never held across an await.
    pub state: Mutex<GroupState>,
    /// Woken on settle, rebalance and reset (credit or ready messages may be available).
    pub notify: Notify,
}

/// The engine's state; lives inside [`Broker`].
pub struct Engine {
    store: Arc<dyn Store>,
    groups: RwLock<HashMap<String, Arc<GroupHandle>>>,
    deliveries_seq: AtomicU64,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Engine {
    /// Builds the engine (no tasks yet). Settings and time are read through the owning
    /// [`Broker`], so the engine keeps no copy that could drift from them.
    pub fn new(store: Arc<dyn Store>) -> Engine {
        Engine {
            store,
            groups: RwLock::new(HashMap::new()),
            // A random start per process, so receipts from before a restart never match a new
            // delivery of the same offset.
            deliveries_seq: AtomicU64::new(u64::from(rand::random::<u32>()) << 32),
            stop: watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// Starts background tasks (timer reveal, retention, heartbeat expiry, consume timeouts).
    pub fn start(broker: &Arc<Broker>) {
        timers::spawn_all(broker);
    }

    /// Runs a background task of the broker until shutdown: it gets the stop signal, and
    /// shutdown waits for it like for the engine's own tasks.
    pub(crate) fn spawn<F>(&self, task: impl FnOnce(watch::Receiver<bool>) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(task(self.stop.subscribe()));
        self.tasks.lock().push(handle);
    }

    /// Stops background tasks and persists offsets.
    pub async fn shutdown(&self) {
        self.stop_tasks().await;
        if let Err(e) = self.flush_offsets().await {
            warn!(error = %e, "could not persist consumer offsets at shutdown");
        }
    }

    /// Signals every background task and long poll to stop, and waits for the tasks.
    pub(crate) async fn stop_tasks(&self) {
        self.stop.send_replace(true);
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *self.tasks.lock());
        for t in tasks {
            if let Err(e) = t.await
                && e.is_panic()
            {
                warn!(error = %e, "engine task panicked");
            }
        }
    }

    /// Per consumer group status of `message` (query by id).
    pub async fn deliveries(
        &self,
        broker: &Broker,
        message: &StoredMessage,
    ) -> Result<Vec<Delivery>> {
        status::deliveries(broker, message).await
    }

    /// The handle of a group whose state is already built, if any.
    fn existing(&self, group: &str) -> Option<Arc<GroupHandle>> {
        self.groups.read().get(group).cloned()
    }

    /// Every group handle (for background passes).
    fn all_handles(&self) -> Vec<(String, Arc<GroupHandle>)> {
        self.groups
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The group's handle, building it (offsets and subscriptions from the store) on first use.
    /// A group deleted and created again under the same name gets fresh state.
    async fn handle(&self, group: &super::Group) -> Result<Arc<GroupHandle>> {
        let current = |h: &GroupHandle| {
            let st = h.state.lock();
            st.model == group.model && st.created_ms == group.created_ms
        };
        if let Some(h) = self.existing(&group.name)
            && current(&h)
        {
            return Ok(h);
        }
        let offsets = self.store.load_offsets(&group.name).await?;
        let subs = self
            .store
            .meta_list(SUBSCRIPTIONS_NS)
            .await?
            .into_iter()
            .find(|(k, _)| *k == group.name)
            .and_then(|(_, v)| serde_json::from_slice::<Vec<Subscription>>(&v).ok());
        let mut state = GroupState::new(group.model, offsets);
        state.created_ms = group.created_ms;
        state.persisted_subscriptions = subs;
        let mut groups = self.groups.write();
        match groups.get(&group.name) {
            Some(h) if current(h) => Ok(h.clone()),
            _ => {
                let h = Arc::new(GroupHandle {
                    state: Mutex::new(state),
                    notify: Notify::new(),
                });
                if let Some(old) = groups.insert(group.name.clone(), h.clone()) {
                    old.notify.notify_waiters();
                }
                Ok(h)
            }
        }
    }

    /// Forgets a group's in-memory state (group deleted).
    fn forget(&self, group: &str) {
        if let Some(h) = self.groups.write().remove(group) {
            h.notify.notify_waiters();
        }
    }

    /// Forgets `handle` if it is still the group's current state.
    fn forget_stale(&self, group: &str, handle: &Arc<GroupHandle>) {
        let mut groups = self.groups.write();
        if groups.get(group).is_some_and(|h| Arc::ptr_eq(h, handle)) {
            groups.remove(group);
            handle.notify.notify_waiters();
        }
    }
}

/// `SUBSCRIPTION_NOT_EXIST` for an instance that is not (or no longer) registered.
fn not_registered(group: &str, instance: &str) -> WharfError {
    WharfError::new(
        ErrorCode::SubscriptionNotExist,
        ErrorKind::NotFound,
        format!(
            "instance '{instance}' is not registered in group '{group}' (never registered, \
             unregistered, or silent past the heartbeat timeout); register it with its subscriptions first"
        ),
    )
}

impl Broker {
    /// The group, which must be a consumer (or MQTT) group.
    fn consumer_group(&self, group: &str) -> Result<super::Group> {
        let g = self.group(group)?;
        if g.kind == GroupKind::Producer {
            return Err(WharfError::bad_request(format!(
                "group '{group}' is a producer group; consume with a consumer group"
            )));
        }
        Ok(g)
    }

    /// Queue count of a topic the engine reads (1 for retry topics, 0 for a deleted topic).
    pub(in crate::broker) fn engine_queue_count(&self, topic: &str) -> u32 {
        if topic.starts_with("%RETRY%") || topic.starts_with("%DLQ%") {
            1
        } else if topic == crate::broker::send::MQTT_LOCAL_TOPIC {
            crate::broker::send::MQTT_LOCAL_QUEUES
        } else {
            self.registry
                .read()
                .topics
                .get(topic)
                .map_or(0, |t| t.queues)
        }
    }

    /// Recomputes queue ownership of a group after its instances changed.
    fn rebalance_locked(&self, group: &str, state: &mut GroupState) {
        let retry = retry_topic(group);
        let leased = |t: &str| -> Vec<u32> {
            state
                .leases
                .keys()
                .filter(|(topic, _)| topic == t)
                .map(|(_, q)| *q)
                .collect()
        };
        let queues: BTreeMap<String, Vec<u32>> = match state.model {
            ConsumeModel::Clustering => state
                .instances
                .values()
                .flat_map(|i| i.filters.keys().cloned())
                .chain(std::iter::once(retry.clone()))
                .map(|t| {
                    let q = leased(&t);
                    (t, q)
                })
                .collect(),
            ConsumeModel::Broadcasting => state
                .instances
                .values()
                .flat_map(|i| i.filters.keys().cloned())
                .map(|t| {
                    let q = (0..self.engine_queue_count(&t)).collect();
                    (t, q)
                })
                .collect(),
        };
        state.rebalance(&|t| queues.get(t).cloned().unwrap_or_default(), &retry);
        let odd = state.inconsistent_instances();
        if odd != state.warned_inconsistent {
            if !odd.is_empty() {
                warn!(
                    group,
                    instances = ?odd,
                    "consumer group subscriptions are inconsistent: these instances subscribe differently from the rest, so messages may be lost or mis-routed"
                );
            }
            state.warned_inconsistent = odd;
        }
    }

    /// Registers (or refreshes) a consumer instance; counts as a heartbeat.
    #[instrument(skip_all, fields(group = %spec.group, instance = %spec.instance_id))]
    pub(in crate::broker) async fn register_consumer(&self, spec: InstanceSpec) -> Result<()> {
        let g = self.consumer_group(&spec.group)?;
        let id = spec.instance_id.as_str();
        super::resources::validate_instance_id(id)?;
        if spec.subscriptions.is_empty() {
            return Err(WharfError::new(
                ErrorCode::SubscriptionNotExist,
                ErrorKind::Invalid,
                format!(
                    "instance '{id}' of group '{}' subscribes to nothing; give at least one (topic, expression)",
                    spec.group
                ),
            ));
        }
        let mut filters: BTreeMap<String, TagFilter> = BTreeMap::new();
        let mut by_topic: BTreeMap<String, Subscription> = BTreeMap::new();
        for sub in &spec.subscriptions {
            // SDK clients name the group's retry topic explicitly; every other topic must exist.
            if !is_retry_topic_of(&sub.topic, &g.name) {
                self.topic(&sub.topic)?;
            }
            filters.insert(sub.topic.clone(), TagFilter::parse(&sub.expression)?);
            by_topic.insert(sub.topic.clone(), sub.clone());
        }
        let subscriptions: Vec<Subscription> = by_topic.into_values().collect();
        let handle = self.engine.handle(&g).await?;
        let own_loaded = if g.model == ConsumeModel::Broadcasting {
            self.remember_broadcast_instance(&g.name, id).await?;
            self.store
                .load_offsets(&broadcast_offsets_key(&g.name, id))
                .await?
                .into_iter()
                .map(|o| ((o.topic, o.queue_id), o.offset))
                .collect()
        } else {
            HashMap::new()
        };
        let now = self.clock.now_ms();
        let to_persist = {
            let mut st = handle.state.lock();
            let changed = match st.instances.get_mut(id) {
                Some(inst) => {
                    inst.last_seen_ms = now;
                    inst.address = spec.address.clone();
                    inst.pid = spec.pid;
                    let changed = inst.filters != filters;
                    inst.filters = filters;
                    inst.subscriptions = subscriptions;
                    changed
                }
                None => {
                    let mut inst =
                        Instance::new(spec.address.clone(), spec.pid, subscriptions, filters, now);
                    inst.own_loaded = own_loaded;
                    st.instances.insert(id.to_string(), inst);
                    info!(address = %spec.address, "consumer instance joined");
                    true
                }
            };
            if changed {
                self.rebalance_locked(&g.name, &mut st);
            }
            let majority = st.majority_subscriptions();
            if st.persisted_subscriptions.as_ref() != Some(&majority) {
                st.persisted_subscriptions = Some(majority.clone());
                Some(majority)
            } else {
                None
            }
        };
        // Take (or give back) the queues this host serves before fixing start positions.
        self.lease_pass(&g, &handle).await?;
        // Fix every start position now, not at the first receive: "start at the newest" means
        // the newest when the consumer joined.
        let missing: Vec<(String, progress::QueueKey)> = {
            let st = handle.state.lock();
            st.instances
                .iter()
                .flat_map(|(iid, inst)| {
                    inst.assigned
                        .iter()
                        .filter(|k| match st.model {
                            ConsumeModel::Clustering => !st.queues.contains_key(*k),
                            ConsumeModel::Broadcasting => !inst.own.contains_key(*k),
                        })
                        .map(move |k| (iid.clone(), k.clone()))
                })
                .collect()
        };
        for (iid, key) in missing {
            self.init_progress(&handle, &iid, &key).await?;
        }
        handle.notify.notify_waiters();
        if let Some(subs) = to_persist {
            let raw = serde_json::to_vec(&subs)
                .map_err(|e| WharfError::internal(format!("cannot encode subscriptions: {e}")))?;
            self.store.meta_put(SUBSCRIPTIONS_NS, &g.name, raw).await?;
        }
        Ok(())
    }

    /// Registers the instance, or adds (replacing same-topic) `spec.subscriptions` to the ones it
    /// has while keeping its other topics: for front ends whose requests name some topics at a
    /// time (HTTP pull). Nothing is rebalanced unless the subscription set really changes.
    pub(in crate::broker) async fn subscribe(&self, spec: InstanceSpec) -> Result<()> {
        let mut subscriptions: Vec<Subscription> = self
            .engine
            .existing(&spec.group)
            .and_then(|h| {
                h.state
                    .lock()
                    .instances
                    .get(&spec.instance_id)
                    .map(|i| i.subscriptions.clone())
            })
            .unwrap_or_default();
        subscriptions.retain(|s| !spec.subscriptions.iter().any(|n| n.topic == s.topic));
        subscriptions.extend(spec.subscriptions);
        self.register_consumer(InstanceSpec {
            subscriptions,
            ..spec
        })
        .await
    }

    /// Marks an instance alive without changing its subscriptions.
    pub(in crate::broker) fn heartbeat(&self, group: &str, instance_id: &str) {
        if let Some(h) = self.engine.existing(group)
            && let Some(inst) = h.state.lock().instances.get_mut(instance_id)
        {
            inst.last_seen_ms = self.clock.now_ms();
        }
    }

    /// True when the instance is registered and alive (front ends re-register when false).
    pub(in crate::broker) fn is_registered(&self, group: &str, instance_id: &str) -> bool {
        self.engine
            .existing(group)
            .is_some_and(|h| h.state.lock().instances.contains_key(instance_id))
    }

    /// Removes an instance that leaves on purpose; it hands its un-acknowledged messages back,
    /// so the others get them at once (without counting a retry).
    #[instrument(skip(self))]
    pub(in crate::broker) async fn unregister_consumer(
        &self,
        group: &str,
        instance_id: &str,
    ) -> Result<()> {
        self.consumer_group(group)?;
        if let Some(h) = self.engine.existing(group) {
            let removed = {
                let mut st = h.state.lock();
                for q in st.queues.values_mut() {
                    q.recall_from(instance_id);
                }
                self.remove_instance_locked(group, &mut st, instance_id)
            };
            if removed {
                info!("consumer instance left");
                h.notify.notify_waiters();
                let g = self.consumer_group(group)?;
                self.lease_pass(&g, &h).await?;
            }
        }
        Ok(())
    }

    /// Drops an instance from the state and rebalances; true if it was there.
    fn remove_instance_locked(&self, group: &str, st: &mut GroupState, instance: &str) -> bool {
        let Some(inst) = st.instances.remove(instance) else {
            return false;
        };
        if st.model == ConsumeModel::Broadcasting && !inst.own.is_empty() {
            let offsets = inst
                .own
                .iter()
                .map(|((topic, q), p)| crate::store::CommittedOffset {
                    topic: topic.clone(),
                    queue_id: *q,
                    offset: p.committed(),
                })
                .collect();
            st.unflushed
                .push((broadcast_offsets_key(group, instance), offsets));
        }
        self.rebalance_locked(group, st);
        st.refresh_deadline();
        true
    }

    /// Long-polls up to `wait` for at most `max` messages for this instance.
    pub(in crate::broker) async fn receive(
        &self,
        group: &str,
        instance_id: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivered>> {
        self.receive_batch(group, instance_id, None, max, wait)
            .await
    }

    /// Like [`Broker::receive`], but only messages of `topics` (retries included, by the topic
    /// they came from); the instance's other subscriptions wait for a receive that names them.
    pub(in crate::broker) async fn receive_topics(
        &self,
        group: &str,
        instance_id: &str,
        topics: &[String],
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivered>> {
        self.receive_batch(group, instance_id, Some(topics), max, wait)
            .await
    }

    /// The receipt a remote consumer settles `delivered` with: it names this host (and boot),
    /// the group and the delivery, so a receipt from elsewhere is told apart.
    pub(in crate::broker) fn receipt(&self, group: &str, delivered: &Delivered) -> String {
        receipt::Receipt::new(&self.host_id, group, &delivered.token).encode()
    }

    /// Settles one delivered message by its receipt; a stale or unknown receipt is a clear error.
    pub(in crate::broker) async fn settle(
        &self,
        group: &str,
        receipt: &str,
        outcome: Outcome,
    ) -> Result<()> {
        let r = receipt::Receipt::decode(receipt)?;
        if r.group != group {
            return Err(WharfError::bad_request(format!(
                "receipt belongs to group '{}', not '{group}'; settle it through its own group",
                r.group
            )));
        }
        if r.host != self.host_id {
            return Err(WharfError::bad_request(format!(
                "receipt expired for {}:{} offset {}: it was issued by host '{}', and this is '{}' (the host \
                 restarted or another host delivered it); the message is or will be delivered again, so \
                 settle the newer delivery instead",
                r.token.topic, r.token.queue_id, r.token.offset, r.host, self.host_id
            )));
        }
        self.settle_tokens(group, &[(r.token, outcome)])
            .await?
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Settles deliveries an in-process consumer holds, in one pass and without receipts; one
    /// result per entry, in order.
    pub(in crate::broker) async fn settle_batch(
        &self,
        group: &str,
        batch: &[(DeliveryToken, Outcome)],
    ) -> Result<Vec<Result<()>>> {
        self.settle_tokens(group, batch).await
    }

    /// Status of a consumer group.
    pub(in crate::broker) async fn group_status(&self, group: &str) -> Result<GroupStatus> {
        status::group_status(self, group).await
    }

    /// Resets the group's offset on `topic` to the first message stored at or after `timestamp_ms`.
    pub(in crate::broker) async fn reset_offset(
        &self,
        group: &str,
        topic: &str,
        timestamp_ms: u64,
    ) -> Result<()> {
        status::reset_offset(self, group, topic, timestamp_ms).await
    }

    /// Dead letters of a group, paged like a time-range query.
    pub(in crate::broker) async fn dead_letters(
        &self,
        group: &str,
        limit: usize,
        page_token: Option<&str>,
    ) -> Result<TimePage> {
        retry::dead_letters(self, group, limit, page_token).await
    }

    /// Re-sends one dead letter (by the id the producer got) to its own group only.
    pub(in crate::broker) async fn resend_dead_letter(
        &self,
        group: &str,
        message_id: &str,
    ) -> Result<SendReceipt> {
        retry::resend_dead_letter(self, group, message_id).await
    }

    /// Drops the engine's state of a deleted group (call after `delete_group`).
    pub fn forget_group(&self, group: &str) {
        self.engine.forget(group);
    }
}
