//! Topics and groups: validation, the in-memory registry, persistence in store metadata, and
//! the registry's reload when another host sharing the store changes them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::Broker;
use super::consume::broadcast_offsets_key;
use super::specs::{
    ConsumeModel, DEFAULT_CONSUME_TIMEOUT_MS, DEFAULT_MAX_RECONSUME_TIMES, Group, GroupKind,
    GroupPatch, GroupSpec, MAX_QUEUES, Topic, TopicSpec,
};
use crate::error::{Result, WharfError};
use crate::model::validate_name;
use crate::store::{PutCondition, PutOutcome, Store};

const TOPICS: &str = "topics";
const GROUPS: &str = "groups";
/// Broadcasting instances that may hold offsets, keyed by their offset owner key
/// ([`broadcast_offsets_key`]); group names hold no `%`, so a group's keys share one prefix.
const BROADCAST_INSTANCES: &str = "broadcast_instances";

/// In-memory view of every topic and group, loaded at start and written through to the store.
#[derive(Debug, Default)]
pub struct Registry {
    /// Topics by name.
    pub topics: BTreeMap<String, Topic>,
    /// Groups by name.
    pub groups: BTreeMap<String, Group>,
}

impl Registry {
    /// Reads every topic and group from store metadata.
    pub async fn load(store: &dyn Store) -> Result<Registry> {
        let mut reg = Registry::default();
        for (name, raw) in store.meta_list(TOPICS).await? {
            let t: Topic = serde_json::from_slice(&raw).map_err(|e| {
                WharfError::internal(format!("stored topic '{name}' is unreadable: {e}"))
            })?;
            reg.topics.insert(name, t);
        }
        for (name, raw) in store.meta_list(GROUPS).await? {
            let g: Group = serde_json::from_slice(&raw).map_err(|e| {
                WharfError::internal(format!("stored group '{name}' is unreadable: {e}"))
            })?;
            reg.groups.insert(name, g);
        }
        Ok(reg)
    }
}

/// Change feeds of the topic and group namespaces, taken before the registry's first load so
/// a change made by another host in between is not missed.
pub(super) struct RegistryWatches {
    topics: watch::Receiver<u64>,
    groups: watch::Receiver<u64>,
}

impl RegistryWatches {
    /// Subscribes to both namespaces.
    pub(super) fn new(store: &dyn Store) -> RegistryWatches {
        RegistryWatches {
            topics: store.watch_meta(TOPICS),
            groups: store.watch_meta(GROUPS),
        }
    }
}

/// Pause before trying a failed reload again (the store is unreachable).
const RELOAD_RETRY: Duration = Duration::from_millis(500);

/// Reloads the registry whenever the store reports that topics or groups changed, so what
/// another host sharing the store created, updated or deleted is in force here within
/// [`crate::store::META_WATCH_MS`] plus one reload.
pub(super) fn spawn_sync(broker: &Arc<Broker>, mut w: RegistryWatches) {
    let weak = Arc::downgrade(broker);
    broker.engine().spawn(move |mut stop| async move {
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                r = w.topics.changed() => if r.is_err() { return },
                r = w.groups.changed() => if r.is_err() { return },
            }
            loop {
                let Some(b) = weak.upgrade() else { return };
                match b.reload_registry().await {
                    Ok(()) => break,
                    Err(e) => warn!(error = %e, "cannot reload topics and groups; will retry"),
                }
                drop(b);
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(RELOAD_RETRY) => {}
                }
            }
        }
    });
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| WharfError::internal(format!("cannot encode metadata: {e}")))
}

/// Which registry map a resource lives in, and its store namespace.
trait Resource: Clone + Serialize {
    /// Store metadata namespace.
    const NAMESPACE: &'static str;
    /// Word used in messages ("topic", "group").
    const WHAT: &'static str;
    /// The resource's name.
    fn name(&self) -> &str;
    /// Its map in the registry.
    fn map(reg: &mut Registry) -> &mut BTreeMap<String, Self>;
    /// The error for a missing resource of this kind.
    fn missing(name: &str) -> WharfError;
}

impl Resource for Topic {
    const NAMESPACE: &'static str = TOPICS;
    const WHAT: &'static str = "topic";
    fn name(&self) -> &str {
        &self.name
    }
    fn map(reg: &mut Registry) -> &mut BTreeMap<String, Self> {
        &mut reg.topics
    }
    fn missing(name: &str) -> WharfError {
        WharfError::topic_not_exist(name)
    }
}

impl Resource for Group {
    const NAMESPACE: &'static str = GROUPS;
    const WHAT: &'static str = "group";
    fn name(&self) -> &str {
        &self.name
    }
    fn map(reg: &mut Registry) -> &mut BTreeMap<String, Self> {
        &mut reg.groups
    }
    fn missing(name: &str) -> WharfError {
        WharfError::group_not_exist(name)
    }
}

impl Broker {
    /// Writes `value` through to the store, then the registry. With `must_be_new` a resource of
    /// that name is a 409, otherwise it must already exist. Writes are serialised so the
    /// existence check and the write cannot interleave with another create, update or delete.
    async fn put_resource<T: Resource>(&self, value: T, must_be_new: bool) -> Result<T> {
        let _writes = self.registry_writes.lock().await;
        let exists = T::map(&mut self.registry.write()).contains_key(value.name());
        if must_be_new && exists {
            return Err(WharfError::conflict(format!(
                "{} '{}' already exists",
                T::WHAT,
                value.name()
            )));
        }
        if !must_be_new && !exists {
            return Err(T::missing(value.name()));
        }
        if must_be_new {
            // Another host sharing the store may have created it since the registry last
            // reloaded: the store decides, create-if-absent.
            let raw = to_json(&value)?;
            let outcome = self
                .store
                .meta_put_if(T::NAMESPACE, value.name(), raw, PutCondition::Absent)
                .await?;
            if let PutOutcome::Conflict { .. } = outcome {
                return Err(WharfError::conflict(format!(
                    "{} '{}' already exists (created on another host)",
                    T::WHAT,
                    value.name()
                )));
            }
            T::map(&mut self.registry.write()).insert(value.name().to_string(), value.clone());
            return Ok(value);
        }
        self.write_resource(value).await
    }

    /// Stores `value` and puts it in the registry; the caller holds `registry_writes`.
    async fn write_resource<T: Resource>(&self, value: T) -> Result<T> {
        self.store
            .meta_put(T::NAMESPACE, value.name(), to_json(&value)?)
            .await?;
        T::map(&mut self.registry.write()).insert(value.name().to_string(), value.clone());
        Ok(value)
    }

    /// Replaces the registry with what the store holds now. A group that is gone, or was
    /// deleted and created anew (another creation time), also loses this host's consumption
    /// state, as a local delete does.
    pub(in crate::broker) async fn reload_registry(&self) -> Result<()> {
        let _writes = self.registry_writes.lock().await;
        let fresh = Registry::load(self.store.as_ref()).await?;
        let stale: Vec<String> = {
            let reg = self.registry.read();
            reg.groups
                .values()
                .filter(|g| fresh.groups.get(&g.name).map(|f| f.created_ms) != Some(g.created_ms))
                .map(|g| g.name.clone())
                .collect()
        };
        let changed = {
            let mut reg = self.registry.write();
            let changed = reg.topics != fresh.topics || reg.groups != fresh.groups;
            *reg = fresh;
            changed
        };
        for g in &stale {
            self.forget_group(g);
        }
        if changed {
            debug!(
                stale_groups = stale.len(),
                "topics and groups reloaded from the store"
            );
        }
        Ok(())
    }

    /// Creates a topic; 409 if it exists.
    pub(in crate::broker) async fn create_topic(&self, spec: TopicSpec) -> Result<Topic> {
        validate_name("topic", &spec.name)?;
        let queues = spec.queues.unwrap_or(self.config.default_queues);
        if queues == 0 || queues > MAX_QUEUES {
            return Err(WharfError::bad_request(format!(
                "queues must be 1..={MAX_QUEUES}, got {queues}"
            )));
        }
        let topic = Topic {
            name: spec.name,
            topic_type: spec.topic_type,
            queues,
            created_ms: self.clock.now_ms(),
        };
        let topic = self.put_resource(topic, true).await?;
        info!(topic = %topic.name, queues, "topic created");
        Ok(topic)
    }

    /// Every topic, sorted by name.
    pub(in crate::broker) fn list_topics(&self) -> Vec<Topic> {
        self.registry.read().topics.values().cloned().collect()
    }

    /// One topic, or `TOPIC_NOT_EXIST`.
    pub(in crate::broker) fn topic(&self, name: &str) -> Result<Topic> {
        self.registry
            .read()
            .topics
            .get(name)
            .cloned()
            .ok_or_else(|| WharfError::topic_not_exist(name))
    }

    /// Deletes a topic (its stored messages age out with retention).
    pub(in crate::broker) async fn delete_topic(&self, name: &str) -> Result<()> {
        let _writes = self.registry_writes.lock().await;
        self.topic(name)?;
        self.store.meta_delete(TOPICS, name).await?;
        self.registry.write().topics.remove(name);
        info!(topic = %name, "topic deleted");
        Ok(())
    }

    /// Creates a group; 409 if it exists.
    pub(in crate::broker) async fn create_group(&self, spec: GroupSpec) -> Result<Group> {
        validate_name("group", &spec.name)?;
        if spec.kind == GroupKind::Mqtt {
            validate_mqtt_group(&spec.name)?;
        }
        let max_reconsume_times = spec
            .max_reconsume_times
            .unwrap_or(DEFAULT_MAX_RECONSUME_TIMES);
        validate_group_settings(max_reconsume_times, spec.consume_timeout_ms)?;
        let group = Group {
            name: spec.name,
            kind: spec.kind,
            model: spec.model,
            max_reconsume_times,
            consume_timeout_ms: spec
                .consume_timeout_ms
                .unwrap_or(DEFAULT_CONSUME_TIMEOUT_MS),
            created_ms: self.clock.now_ms(),
        };
        let group = self.put_resource(group, true).await?;
        info!(group = %group.name, "group created");
        Ok(group)
    }

    /// Replaces a group's settings (the latest setting wins for all instances).
    pub(in crate::broker) async fn update_group(&self, group: Group) -> Result<Group> {
        validate_group_settings(group.max_reconsume_times, Some(group.consume_timeout_ms))?;
        self.put_resource(group, false).await
    }

    /// `PATCH /v1/groups/{group}`: changes the settings `patch` names and keeps the rest.
    ///
    /// The engine reads the group from the registry on every receive and every failure, so the
    /// new values apply to every instance from the next message on. `kind` and `model` may be
    /// repeated but not changed: a live group switching between clustering and broadcasting
    /// would strand its offsets and in-flight messages.
    pub(in crate::broker) async fn patch_group(
        &self,
        name: &str,
        patch: GroupPatch,
    ) -> Result<Group> {
        let _writes = self.registry_writes.lock().await;
        let mut group = self.group(name)?;
        if let Some(kind) = patch.kind
            && kind != group.kind
        {
            return Err(WharfError::bad_request(format!(
                "kind: group '{name}' is a {} group and cannot become a {} group; create a new group instead",
                kind_word(group.kind),
                kind_word(kind)
            )));
        }
        if let Some(model) = patch.model
            && model != group.model
        {
            return Err(WharfError::bad_request(format!(
                "model: group '{name}' consumes by {} and cannot switch to {} while it exists \
                 (its offsets and in-flight messages belong to the old model); create a new group instead",
                model_word(group.model),
                model_word(model)
            )));
        }
        if let Some(n) = patch.max_reconsume_times {
            group.max_reconsume_times = n;
        }
        if let Some(t) = patch.consume_timeout_ms {
            group.consume_timeout_ms = t;
        }
        validate_group_settings(group.max_reconsume_times, Some(group.consume_timeout_ms))?;
        let group = self.write_resource(group).await?;
        info!(group = %name, max_reconsume_times = group.max_reconsume_times,
            consume_timeout_ms = group.consume_timeout_ms, "group settings changed");
        Ok(group)
    }

    /// Every group, sorted by name.
    pub(in crate::broker) fn list_groups(&self) -> Vec<Group> {
        self.registry.read().groups.values().cloned().collect()
    }

    /// One group, or `SUBSCRIPTION_GROUP_NOT_EXIST`.
    pub(in crate::broker) fn group(&self, name: &str) -> Result<Group> {
        self.registry
            .read()
            .groups
            .get(name)
            .cloned()
            .ok_or_else(|| WharfError::group_not_exist(name))
    }

    /// Deletes a group, its offsets (shared and every broadcasting instance's) and its
    /// remembered subscriptions, so a group created again under the same name starts clean.
    /// State is removed before the group record: a crash midway leaves a group that starts
    /// afresh, never a new group that resumes at the old one's offsets.
    pub(in crate::broker) async fn delete_group(&self, name: &str) -> Result<()> {
        let _writes = self.registry_writes.lock().await;
        self.group(name)?;
        let prefix = broadcast_offsets_key(name, "");
        for (key, _) in self.store.meta_list(BROADCAST_INSTANCES).await? {
            if key.starts_with(&prefix) {
                self.store.delete_offsets(&key).await?;
                self.store.meta_delete(BROADCAST_INSTANCES, &key).await?;
            }
        }
        self.store.delete_offsets(name).await?;
        self.store
            .meta_delete(super::consume::SUBSCRIPTIONS_NS, name)
            .await?;
        self.store.meta_delete(GROUPS, name).await?;
        self.registry.write().groups.remove(name);
        self.forget_group(name);
        info!(group = %name, "group deleted");
        Ok(())
    }

    /// Records that a broadcasting instance of `group` keeps offsets of its own, so deleting
    /// the group can find and delete them (the store lists offsets only by owner). Called when
    /// an instance registers, which is before it can commit; written once per instance.
    pub(crate) async fn remember_broadcast_instance(
        &self,
        group: &str,
        instance: &str,
    ) -> Result<()> {
        let key = broadcast_offsets_key(group, instance);
        let known = self
            .store
            .meta_list(BROADCAST_INSTANCES)
            .await?
            .iter()
            .any(|(k, _)| *k == key);
        if !known {
            self.store
                .meta_put(BROADCAST_INSTANCES, &key, instance.as_bytes().to_vec())
                .await?;
        }
        Ok(())
    }
}

/// Reserved member group of the rows hosts sharing a store keep about themselves (no real
/// group name can hold `%`).
const HOSTS_GROUP: &str = "%HOSTS%";

/// What a live host tells the others about itself (its membership row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// The host's identity for this boot ([`Broker::host_id`]).
    pub host_id: String,
    /// Address RocketMQ clients reach its remoting listener at, when it has one.
    pub remoting: Option<String>,
}

impl Broker {
    /// Renews this host's membership row for `ttl_ms` (a host that stops renewing drops out).
    pub(in crate::broker) async fn host_heartbeat(
        &self,
        remoting: Option<String>,
        ttl_ms: u64,
    ) -> Result<()> {
        let info = HostInfo {
            host_id: self.host_id.clone(),
            remoting,
        };
        self.store
            .member_heartbeat(
                HOSTS_GROUP,
                &self.host_id,
                crate::store::MemberKind::SelfBalancing,
                to_json(&info)?,
                ttl_ms,
            )
            .await
            .map(|_| ())
    }

    /// Every live host sharing the store (this one included once it heartbeats), by host id.
    pub(in crate::broker) async fn live_hosts(&self) -> Result<Vec<HostInfo>> {
        let rows = self.store.member_list(HOSTS_GROUP).await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| serde_json::from_slice::<HostInfo>(&r.data).ok())
            .collect())
    }

    /// Removes this host's membership row (clean shutdown), so routes stop naming it at once.
    pub(in crate::broker) async fn host_leave(&self) -> Result<()> {
        self.store
            .member_remove(HOSTS_GROUP, &self.host_id)
            .await
            .map(|_| ())
    }
}

/// Checks a consumer instance id: 1-255 printable characters without spaces at the ends, and
/// no `%` (it would make broadcasting offset keys `<group>%BROADCAST%<instance>` ambiguous).
/// Surrounding spaces are refused rather than trimmed: receive and settle look the instance up
/// by the id exactly as the caller sends it.
pub fn validate_instance_id(id: &str) -> Result<()> {
    if id.contains('%') {
        return Err(WharfError::bad_request(format!(
            "instance id '{}' contains '%', which is reserved for system keys; use another character",
            id.escape_debug()
        )));
    }
    if id.trim().is_empty() || id.trim() != id || id.len() > 255 || id.chars().any(char::is_control)
    {
        return Err(WharfError::bad_request(format!(
            "instance id '{}' is invalid: use 1-255 printable characters, without spaces at the ends",
            id.escape_debug()
        )));
    }
    Ok(())
}

fn kind_word(k: GroupKind) -> &'static str {
    match k {
        GroupKind::Consumer => "consumer",
        GroupKind::Producer => "producer",
        GroupKind::Mqtt => "mqtt",
    }
}

fn model_word(m: ConsumeModel) -> &'static str {
    match m {
        ConsumeModel::Clustering => "clustering",
        ConsumeModel::Broadcasting => "broadcasting",
    }
}

fn validate_group_settings(
    max_reconsume_times: u32,
    consume_timeout_ms: Option<u64>,
) -> Result<()> {
    if max_reconsume_times > 1000 {
        return Err(WharfError::bad_request(format!(
            "max_reconsume_times must be 0..=1000, got {max_reconsume_times}"
        )));
    }
    if let Some(t) = consume_timeout_ms
        && !(1..=24 * 3600 * 1000).contains(&t)
    {
        return Err(WharfError::bad_request(format!(
            "consume_timeout_ms must be 1..=86400000 (1 ms to 24 h), got {t}"
        )));
    }
    Ok(())
}

/// MQTT groups are `GID_` + letters, digits, underscores; 7–32 characters in all.
pub fn validate_mqtt_group(name: &str) -> Result<()> {
    let ok = name.starts_with("GID_")
        && (7..=32).contains(&name.len())
        && name[4..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(WharfError::bad_request(format!(
            "invalid MQTT group '{name}': use GID_ followed by letters, digits or '_', 7-32 characters in all"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_group_names() {
        assert!(validate_mqtt_group("GID_ABC_1").is_ok());
        assert!(validate_mqtt_group("GID_AB").is_err());
        assert!(validate_mqtt_group("XID_ABCDEF").is_err());
        assert!(validate_mqtt_group("GID_ABC-1").is_err());
    }

    #[test]
    fn spec_rejects_unknown_fields() {
        assert!(serde_json::from_str::<TopicSpec>(r#"{"name":"abc","colour":"red"}"#).is_err());
        let g: GroupSpec = serde_json::from_str(r#"{"name":"GID_x","kind":"consumer"}"#).unwrap();
        assert_eq!(g.model, ConsumeModel::Clustering);
    }
}
