//! Group status, per-message delivery status, and operator offset resets.

use std::collections::{BTreeMap, HashMap};

use tracing::info;

use super::filter::TagFilter;
use super::progress::{QueueKey, QueueState};
use super::{
    GroupStatus, InstanceStatus, Subscription, broadcast_offsets_key, is_retry_topic_of,
    retry_topic,
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

/// Per consumer group subscribed to the message's topic: consumed / filtered / pending / offline.
pub async fn deliveries(b: &Broker, message: &StoredMessage) -> Result<Vec<Delivery>> {
    let mut out = Vec::new();
    for g in b.list_groups() {
        if g.kind == GroupKind::Producer {
            continue;
        }
        let handle = b.engine.handle(&g).await?;
        let st = handle.state.lock();
        let subs = if st.instances.is_empty() {
            st.persisted_subscriptions.clone().unwrap_or_default()
        } else {
            st.majority_subscriptions()
        };
        let Some(sub) = subs.iter().find(|s| s.topic == message.topic) else {
            continue;
        };
        let status = match TagFilter::parse(&sub.expression) {
            Ok(f) if !f.matches(message.tag.as_deref()) => DeliveryStatus::Filtered,
            _ => {
                let key = (message.topic.clone(), message.queue_id);
                let consumed = message.queue_offset.is_some_and(|o| match st.model {
                    ConsumeModel::Clustering => match st.queues.get(&key) {
                        Some(q) => q.is_consumed(o),
                        None => st.loaded.get(&key).is_some_and(|c| o < *c),
                    },
                    ConsumeModel::Broadcasting => {
                        !st.instances.is_empty()
                            && st
                                .instances
                                .values()
                                .all(|i| i.own.get(&key).is_some_and(|q| q.is_consumed(o)))
                    }
                });
                if consumed {
                    DeliveryStatus::Consumed
                } else if st.instances.is_empty() {
                    DeliveryStatus::Offline
                } else {
                    DeliveryStatus::Pending
                }
            }
        };
        out.push(Delivery {
            group: g.name.clone(),
            status,
        });
    }
    Ok(out)
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
