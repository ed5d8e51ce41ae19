//! Group status, per-message delivery status, and operator offset resets.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tracing::info;

use super::filter::TagFilter;
use super::group_state::GroupState;
use super::progress::{QueueKey, QueueState};
use super::retry;
use super::{
    GroupHandle, GroupStatus, InstanceStatus, SUBSCRIPTIONS_NS, Subscription,
    broadcast_offsets_key, dlq_topic, is_retry_topic_of, retry_topic,
};
use crate::broker::{Broker, ConsumeModel, Delivery, DeliveryStatus, GroupKind};
use crate::error::{Result, WharfError};
use crate::model::StoredMessage;
use crate::store::CommittedOffset;

/// Where one queue's consumer stands, read under the lock; `None` = never read (start rule).
type Positions = BTreeMap<QueueKey, Option<u64>>;

/// `GET /v1/groups/{group}/status`.
pub async fn group_status(b: &Broker, group: &str) -> Result<GroupStatus> {
    let g = b.consumer_group(group)?;
    let handle = b.engine.handle(&g).await?;
    let now = b.clock.now_ms();
    let retry = retry_topic(group);
    struct Inst {
        id: String,
        address: String,
        pid: Option<u32>,
        subscriptions: Vec<Subscription>,
        positions: Positions,
    }
    let (insts, group_positions, inconsistent, subscriptions, tps, last) = {
        let st = handle.state.lock();
        let subscriptions = if st.instances.is_empty() {
            st.persisted_subscriptions.clone().unwrap_or_default()
        } else {
            st.majority_subscriptions()
        };
        let position = |key: &QueueKey| -> Option<u64> {
            st.queues
                .get(key)
                .map(|q| q.committed())
                .or_else(|| st.loaded.get(key).copied())
        };
        let insts: Vec<Inst> = st
            .instances
            .iter()
            .map(|(id, i)| Inst {
                id: id.clone(),
                address: i.address.clone(),
                pid: i.pid,
                subscriptions: i.subscriptions.clone(),
                positions: i
                    .assigned
                    .iter()
                    .map(|k| {
                        let p = match st.model {
                            ConsumeModel::Clustering => position(k),
                            ConsumeModel::Broadcasting => i
                                .own
                                .get(k)
                                .map(|q| q.committed())
                                .or_else(|| i.own_loaded.get(k).copied()),
                        };
                        (k.clone(), p)
                    })
                    .collect(),
            })
            .collect();
        // Group backlog covers every subscribed queue, owned or not (clustering), so messages of
        // a queue nobody reads still count.
        let mut group_positions = Positions::new();
        if st.model == ConsumeModel::Clustering {
            for s in &subscriptions {
                for q in 0..b.engine_queue_count(&s.topic) {
                    let k = (s.topic.clone(), q);
                    let p = position(&k);
                    group_positions.insert(k, p);
                }
            }
            let k = (retry.clone(), 0);
            let p = position(&k);
            group_positions.insert(k, p);
        }
        (
            insts,
            group_positions,
            st.inconsistent_instances(),
            subscriptions,
            st.rate.per_second(now),
            st.last_consume_ms,
        )
    };
    let mut instances = Vec::with_capacity(insts.len());
    let mut broadcast_backlog = 0;
    for i in insts {
        let backlog = backlog_of(b, g.model, &i.positions).await?;
        broadcast_backlog += backlog;
        instances.push(InstanceStatus {
            instance_id: i.id,
            address: i.address,
            pid: i.pid,
            backlog,
            subscriptions: i.subscriptions,
        });
    }
    // Self-balancing clients (RocketMQ SDKs) split the queues themselves; their share is
    // recomputed here with the SDKs' default split, from the offsets they committed.
    let members: Vec<_> = b
        .members(group)
        .await?
        .into_iter()
        .filter(|m| m.kind == crate::store::MemberKind::SelfBalancing)
        .collect();
    let mut subscriptions = subscriptions;
    let mut group_positions = group_positions;
    if !members.is_empty() {
        let committed: HashMap<QueueKey, u64> = b
            .store
            .load_offsets(group)
            .await?
            .into_iter()
            .map(|o| ((o.topic, o.queue_id), o.offset))
            .collect();
        let ids: Vec<&str> = members.iter().map(|m| m.member_id.as_str()).collect();
        for m in &members {
            for s in &m.subscriptions {
                if !subscriptions.iter().any(|x| x.topic == s.topic) {
                    subscriptions.push(s.clone());
                }
            }
        }
        for (index, m) in members.iter().enumerate() {
            let mut positions = Positions::new();
            for s in &m.subscriptions {
                let queues = b.engine_queue_count(&s.topic);
                let mine = match g.model {
                    ConsumeModel::Clustering => allocate_averagely(queues, ids.len(), index),
                    ConsumeModel::Broadcasting => (0..queues).collect(),
                };
                for q in mine {
                    let k = (s.topic.clone(), q);
                    positions.insert(k.clone(), committed.get(&k).copied());
                }
                if g.model == ConsumeModel::Clustering {
                    for q in 0..queues {
                        let k = (s.topic.clone(), q);
                        let p = committed.get(&k).copied();
                        group_positions.entry(k).or_insert(p);
                    }
                }
            }
            let backlog = backlog_of(b, g.model, &positions).await?;
            broadcast_backlog += backlog;
            instances.push(InstanceStatus {
                instance_id: m.member_id.clone(),
                address: m.address.clone(),
                pid: m.pid,
                backlog,
                subscriptions: m.subscriptions.clone(),
            });
        }
    }
    let backlog = match g.model {
        ConsumeModel::Clustering => backlog_of(b, g.model, &group_positions).await?,
        ConsumeModel::Broadcasting => broadcast_backlog,
    };
    Ok(GroupStatus {
        online: !instances.is_empty(),
        consistent: inconsistent.is_empty(),
        inconsistent_instances: inconsistent,
        backlog,
        consume_tps: tps,
        last_consume_ms: last,
        subscriptions,
        instances,
    })
}

/// Queue ids member `index` of `members` (sorted ids) reads under RocketMQ's default split
/// (AllocateMessageQueueAveragely): contiguous ranges, the first `queues % members` one longer.
fn allocate_averagely(queues: u32, members: usize, index: usize) -> Vec<u32> {
    let (n, c) = (queues as usize, members.max(1));
    if index >= c || n == 0 {
        return Vec::new();
    }
    let rem = n % c;
    let size = if n <= c {
        1
    } else if rem > 0 && index < rem {
        n / c + 1
    } else {
        n / c
    };
    let start = if rem > 0 && index < rem {
        index * size
    } else {
        index * size + rem
    };
    let range = size.min(n.saturating_sub(start));
    (0..range).map(|i| ((start + i) % n) as u32).collect()
}

/// Messages between each position and the queue's end (filtered ones included, as offsets).
async fn backlog_of(b: &Broker, model: ConsumeModel, positions: &Positions) -> Result<u64> {
    let mut total = 0;
    for (key, pos) in positions {
        let bounds = b.store.queue_bounds(&key.0, key.1).await?;
        let start = match pos {
            Some(p) => *p,
            None => b.start_offset(None, model, key).await?.0,
        };
        total += bounds.max.saturating_sub(start.max(bounds.min));
    }
    Ok(total)
}

/// Most retry copies of one message examined (newest first). Each copy of a chain is written
/// only after the one before it failed, so only the newest can be outstanding; a second chain
/// exists only after a redelivery, so copies older than this are long settled.
const MAX_COPIES_EXAMINED: usize = 64;

/// Where a group's progress is read from when answering a delivery query.
enum Progress {
    /// The group's consumption state is in memory: its instances and live positions decide.
    Live(Arc<GroupHandle>),
    /// No state in memory, so no instance is online: committed offsets from the store decide,
    /// and nothing is built (a query must not cost a group's worth of state per group).
    Stored(HashMap<QueueKey, u64>),
}

impl Progress {
    /// True when the group (clustering) has settled `offset` of queue `key`.
    fn consumed(&self, key: &QueueKey, offset: u64) -> bool {
        match self {
            Progress::Live(h) => clustering_consumed(&h.state.lock(), key, offset),
            Progress::Stored(committed) => committed.get(key).is_some_and(|c| offset < *c),
        }
    }

    /// Status of a message the group has not finished with.
    fn unsettled(&self) -> DeliveryStatus {
        match self {
            Progress::Live(h) => unsettled(&h.state.lock()),
            Progress::Stored(_) => DeliveryStatus::Offline,
        }
    }
}

/// The subscription of `group` to `topic`, from live instances or the last persisted set.
fn subscription_of<'a>(subs: &'a [Subscription], topic: &str) -> Option<&'a Subscription> {
    subs.iter().find(|s| s.topic == topic)
}

/// Subscriptions each group persisted last (for groups without state in memory), read once
/// per query rather than once per group.
async fn persisted_subscriptions(b: &Broker) -> Result<HashMap<String, Vec<Subscription>>> {
    Ok(b.store
        .meta_list(SUBSCRIPTIONS_NS)
        .await?
        .into_iter()
        .filter_map(|(k, v)| {
            serde_json::from_slice::<Vec<Subscription>>(&v)
                .ok()
                .map(|s| (k, s))
        })
        .collect())
}

/// Per consumer group subscribed to the message's topic: consumed / filtered / pending /
/// offline / dead_letter.
///
/// A clustering group commits a failed message's offset once its retry copy is stored, so a
/// committed offset alone does not mean consumed: the message's copies in `%RETRY%<group>` and
/// `%DLQ%<group>` (found through their system key, see [`retry::origin_key`]) decide.
/// A group whose consumption state is not in memory is answered from the store (its persisted
/// subscriptions and committed offsets) without building that state.
pub async fn deliveries(b: &Broker, message: &StoredMessage) -> Result<Vec<Delivery>> {
    let key = retry::origin_key(&retry::origin(message).1);
    let queue = (message.topic.clone(), message.queue_id);
    let mut persisted: Option<HashMap<String, Vec<Subscription>>> = None;
    let mut out = Vec::new();
    for g in b.list_groups() {
        if g.kind == GroupKind::Producer {
            continue;
        }
        let live = b.engine.existing(&g.name).filter(|h| {
            let st = h.state.lock();
            st.model == g.model && st.created_ms == g.created_ms
        });
        let (status, progress) = match live {
            Some(handle) => {
                let status = {
                    let st = handle.state.lock();
                    let subs = if st.instances.is_empty() {
                        st.persisted_subscriptions.clone().unwrap_or_default()
                    } else {
                        st.majority_subscriptions()
                    };
                    let Some(sub) = subscription_of(&subs, &message.topic) else {
                        continue;
                    };
                    if filtered_out(sub, message) {
                        DeliveryStatus::Filtered
                    } else {
                        let consumed = message.queue_offset.is_some_and(|o| match st.model {
                            ConsumeModel::Clustering => clustering_consumed(&st, &queue, o),
                            ConsumeModel::Broadcasting => {
                                !st.instances.is_empty()
                                    && st.instances.values().all(|i| {
                                        i.own.get(&queue).is_some_and(|q| q.is_consumed(o))
                                    })
                            }
                        });
                        if consumed {
                            DeliveryStatus::Consumed
                        } else {
                            unsettled(&st)
                        }
                    }
                };
                (status, Progress::Live(handle))
            }
            None => {
                if persisted.is_none() {
                    persisted = Some(persisted_subscriptions(b).await?);
                }
                let Some(sub) = persisted
                    .as_ref()
                    .and_then(|p| p.get(&g.name))
                    .and_then(|subs| subscription_of(subs, &message.topic))
                else {
                    continue;
                };
                if filtered_out(sub, message) {
                    (DeliveryStatus::Filtered, Progress::Stored(HashMap::new()))
                } else if g.model == ConsumeModel::Broadcasting {
                    // Each broadcasting instance has its own progress, and none is online.
                    (DeliveryStatus::Offline, Progress::Stored(HashMap::new()))
                } else {
                    let committed: HashMap<QueueKey, u64> = b
                        .store
                        .load_offsets(&g.name)
                        .await?
                        .into_iter()
                        .map(|o| ((o.topic, o.queue_id), o.offset))
                        .collect();
                    let progress = Progress::Stored(committed);
                    let consumed = message
                        .queue_offset
                        .is_some_and(|o| progress.consumed(&queue, o));
                    let status = if consumed {
                        DeliveryStatus::Consumed
                    } else {
                        DeliveryStatus::Offline
                    };
                    (status, progress)
                }
            }
        };
        // Broadcasting never retries, so only clustering has copies to look at.
        let status = if status == DeliveryStatus::Consumed && g.model == ConsumeModel::Clustering {
            match copies_state(b, &progress, &g.name, &key).await? {
                Copies::Settled => DeliveryStatus::Consumed,
                Copies::RetryOutstanding => progress.unsettled(),
                Copies::DeadLettered => DeliveryStatus::DeadLetter,
            }
        } else {
            status
        };
        out.push(Delivery {
            group: g.name.clone(),
            status,
        });
    }
    Ok(out)
}

/// True when the subscription's tag expression excludes the message.
fn filtered_out(sub: &Subscription, message: &StoredMessage) -> bool {
    TagFilter::parse(&sub.expression).is_ok_and(|f| !f.matches(message.tag.as_deref()))
}

/// Status of a message the group has not finished with: pending, or offline without instances.
fn unsettled(st: &GroupState) -> DeliveryStatus {
    if st.instances.is_empty() {
        DeliveryStatus::Offline
    } else {
        DeliveryStatus::Pending
    }
}

/// True when a clustering group has settled `offset` of queue `key`.
fn clustering_consumed(st: &GroupState, key: &QueueKey, offset: u64) -> bool {
    match st.queues.get(key) {
        Some(q) => q.is_consumed(offset),
        None => st.loaded.get(key).is_some_and(|c| offset < *c),
    }
}

/// Where the failure copies of a message whose own offset a clustering group committed stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copies {
    /// No copy, or every retry copy was consumed (a dead letter re-sent counts as retried).
    Settled,
    /// A retry copy is held for its back-off, or visible and not yet consumed.
    RetryOutstanding,
    /// Its last retry failed too: the copy sits in the dead-letter topic, not re-sent.
    DeadLettered,
}

/// Looks up the copies indexed under `key` in the group's retry and dead-letter topics.
///
/// Retry copies are examined before the dead-letter topic: the engine stores a dead letter
/// before it commits the failed retry, so a retry seen as settled here already has its dead
/// letter visible, and the answer never flips to consumed in between. The newest dead letter
/// counts only if no retry copy re-sent it.
async fn copies_state(b: &Broker, progress: &Progress, group: &str, key: &str) -> Result<Copies> {
    let retry = retry_topic(group);
    let copies = b.store.by_key(&retry, key, MAX_COPIES_EXAMINED).await?;
    for copy in &copies {
        let offset = match copy.queue_offset {
            Some(o) => Some(o),
            // The key index returns a timer copy as appended; the lookup by id finds the
            // offset it was revealed at, and none while it is still held.
            None => b.store.get(copy.id).await?.and_then(|m| m.queue_offset),
        };
        // A copy whose offset cannot be found is counted as outstanding: claiming consumed
        // without evidence is the mistake this check exists to prevent.
        let consumed =
            offset.is_some_and(|o| progress.consumed(&(retry.clone(), copy.queue_id), o));
        if !consumed {
            return Ok(Copies::RetryOutstanding);
        }
    }
    let Some(dead) = b.store.by_key(&dlq_topic(group), key, 1).await?.pop() else {
        return Ok(Copies::Settled);
    };
    let dead_id = dead.id.to_string();
    let resent = copies
        .iter()
        .any(|c| c.properties.get(retry::PROP_RESENT_DEAD_LETTER) == Some(&dead_id));
    Ok(if resent {
        Copies::Settled
    } else {
        Copies::DeadLettered
    })
}

/// Number of groups whose consumption state is built in memory (tests check that a query
/// builds none).
#[cfg(test)]
pub(crate) fn built_group_states(b: &Broker) -> usize {
    b.engine.groups.read().len()
}

/// Moves the group's position on every queue of `topic` to the first message stored at or after
/// `timestamp_ms`; in-flight deliveries on those queues are forgotten (their receipts go stale).
pub async fn reset_offset(b: &Broker, group: &str, topic: &str, timestamp_ms: u64) -> Result<()> {
    let g = b.consumer_group(group)?;
    if !is_retry_topic_of(topic, group) {
        b.topic(topic)?;
    }
    let queues = b.engine_queue_count(topic);
    let mut offsets = Vec::with_capacity(queues as usize);
    for q in 0..queues {
        offsets.push(CommittedOffset {
            topic: topic.to_string(),
            queue_id: q,
            offset: b.store.offset_for_time(topic, q, timestamp_ms).await?,
        });
    }
    if offsets.is_empty() {
        return Err(WharfError::bad_request(format!(
            "topic '{topic}' has no queues to reset"
        )));
    }
    let handle = b.engine.handle(&g).await?;
    let mut writes: Vec<(String, Vec<CommittedOffset>)> = Vec::new();
    {
        let mut st = handle.state.lock();
        match st.model {
            ConsumeModel::Clustering => {
                let st = &mut *st;
                let released = reset_queues(&mut st.queues, &mut st.loaded, &offsets);
                for (who, bytes) in released {
                    if let Some(i) = st.instances.get_mut(&who) {
                        i.release(bytes);
                    }
                }
                writes.push((g.name.clone(), offsets.clone()));
            }
            ConsumeModel::Broadcasting => {
                for (id, inst) in st.instances.iter_mut() {
                    let released = reset_queues(&mut inst.own, &mut inst.own_loaded, &offsets);
                    for (_, bytes) in released {
                        inst.release(bytes);
                    }
                    writes.push((broadcast_offsets_key(&g.name, id), offsets.clone()));
                }
            }
        }
        st.refresh_deadline();
    }
    for (owner, o) in writes {
        b.store.commit_offsets(&owner, &o).await?;
    }
    handle.notify.notify_waiters();
    info!(group, topic, timestamp_ms, "consumer offset reset");
    Ok(())
}

/// Moves each queue in `offsets` to its new position: queues with progress forget what they had
/// in flight (returned as (holder, body bytes) so credit can be released); queues without
/// progress start there when first read. The new positions count as persisted, since the caller
/// writes them.
fn reset_queues(
    queues: &mut BTreeMap<QueueKey, QueueState>,
    loaded: &mut HashMap<QueueKey, u64>,
    offsets: &[CommittedOffset],
) -> Vec<(String, usize)> {
    let mut released = Vec::new();
    for o in offsets {
        let key = (o.topic.clone(), o.queue_id);
        if let Some(q) = queues.get_mut(&key) {
            released.extend(q.reset_to(o.offset));
            q.persisted = Some(o.offset);
        }
        loaded.insert(key, o.offset);
    }
    released
}

#[cfg(test)]
mod tests {
    use super::allocate_averagely;

    #[test]
    fn self_balancing_shares_split_like_the_sdks() {
        assert_eq!(allocate_averagely(4, 2, 0), vec![0, 1]);
        assert_eq!(allocate_averagely(4, 2, 1), vec![2, 3]);
        assert_eq!(allocate_averagely(5, 2, 0), vec![0, 1, 2]);
        assert_eq!(allocate_averagely(5, 2, 1), vec![3, 4]);
        assert_eq!(allocate_averagely(2, 3, 1), vec![1]);
        assert_eq!(allocate_averagely(2, 3, 2), Vec::<u32>::new());
        assert_eq!(allocate_averagely(8, 1, 0), (0..8).collect::<Vec<_>>());
    }
}
