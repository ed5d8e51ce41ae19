//! Queue leases for broker-assigned consumers (plugins, HTTP pull): this host serves a
//! clustering group's queue only while it holds that queue's lease, so hosts sharing one store
//! never serve one queue at once, and offsets are committed fenced by the lease epoch.
//!
//! Each pass the host heartbeats itself as a host-assigned member of the group, splits every
//! subscribed topic's queues over the live hosts that subscribe it (the same deterministic
//! average split the local instances use), gives back leases outside its share (after
//! committing their offsets), and acquires or renews the rest. A queue whose lease was lost or
//! changed epoch starts afresh from the committed offset in the store; what was in flight on it
//! gets a precise "lease moved" error at settle and is delivered again by the new holder.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::progress::QueueKey;
use super::rebalance::average_share;
use super::{GroupHandle, retry_topic};
use crate::broker::{Broker, ConsumeModel, Group};
use crate::error::{Result, WharfError};
use crate::store::{CommittedOffset, Lease, LeaseKey, MemberKind};

/// How long a lease (and the host's member row) lives without renewal: a dead host's queues
/// move to the others within this time.
pub const LEASE_TTL_MS: u64 = 8_000;
/// How often held leases are renewed (clock time).
pub const LEASE_RENEW_MS: u64 = 2_000;

/// What a host's member row says about it.
#[derive(Debug, Serialize, Deserialize)]
struct HostMember {
    /// Topics its local instances of the group subscribe.
    topics: Vec<String>,
}

fn lease_key(group: &str, key: &QueueKey) -> LeaseKey {
    LeaseKey {
        group: group.to_string(),
        topic: key.0.clone(),
        queue_id: key.1,
    }
}

impl Broker {
    /// Brings the group's leases in line with this host's share (see the module doc). Returns
    /// true when the set of leased queues or an epoch changed (the caller's state was rebalanced).
    pub(super) async fn lease_pass(&self, g: &Group, handle: &Arc<GroupHandle>) -> Result<bool> {
        if g.model != ConsumeModel::Clustering {
            return Ok(false);
        }
        let topics: BTreeSet<String> = {
            let st = handle.state.lock();
            st.instances
                .values()
                .flat_map(|i| i.filters.keys().cloned())
                .collect()
        };
        let held: BTreeMap<QueueKey, Lease> = handle.state.lock().leases.clone();
        if topics.is_empty() {
            // Nobody here consumes the group any more: hand the queues to the other hosts, but
            // keep those with deliveries still out, so a consumer that went quiet can still
            // settle them until their consume timeout (then they are retried from here).
            let mut changed = false;
            let mut kept = 0usize;
            let now = self.clock.now_ms();
            for (key, lease) in &held {
                let busy = handle.state.lock().queues.get(key).is_some_and(|q| {
                    q.pending
                        .values()
                        .any(|e| !matches!(e, super::progress::Entry::Ready { .. }))
                });
                if !busy {
                    self.give_up(g, handle, key, lease).await;
                    changed = true;
                    continue;
                }
                kept += 1;
                if lease.expires_at_ms.saturating_sub(now) <= LEASE_TTL_MS - LEASE_RENEW_MS {
                    match self.store.lease_renew(lease, LEASE_TTL_MS).await? {
                        Some(l) => {
                            handle.state.lock().leases.insert(key.clone(), l);
                        }
                        None => {
                            let mut st = handle.state.lock();
                            st.leases.remove(key);
                            st.queues.remove(key);
                            changed = true;
                        }
                    }
                }
            }
            if kept == 0 {
                self.store.member_remove(&g.name, &self.host_id).await?;
            }
            return Ok(changed);
        }
        let data = serde_json::to_vec(&HostMember {
            topics: topics.iter().cloned().collect(),
        })
        .map_err(|e| WharfError::internal(format!("cannot encode member row: {e}")))?;
        self.store
            .member_heartbeat(
                &g.name,
                &self.host_id,
                MemberKind::HostAssigned,
                data,
                LEASE_TTL_MS,
            )
            .await?;
        let hosts: Vec<(String, BTreeSet<String>)> = self
            .store
            .member_list(&g.name)
            .await?
            .into_iter()
            .filter(|m| m.kind == MemberKind::HostAssigned)
            .map(|m| {
                let topics = serde_json::from_slice::<HostMember>(&m.data)
                    .map(|h| h.topics.into_iter().collect())
                    .unwrap_or_default();
                (m.member_id, topics)
            })
            .collect();
        let desired = self.share(g, &topics, &hosts);
        let mut changed = false;
        for (key, lease) in &held {
            if !desired.contains(key) {
                self.give_up(g, handle, key, lease).await;
                changed = true;
            }
        }
        let now = self.clock.now_ms();
        let mut moved: Vec<QueueKey> = Vec::new();
        for key in &desired {
            let got = match held.get(key) {
                Some(l) if l.expires_at_ms.saturating_sub(now) > LEASE_TTL_MS - LEASE_RENEW_MS => {
                    continue;
                }
                Some(l) => self.store.lease_renew(l, LEASE_TTL_MS).await?,
                None => {
                    self.store
                        .lease_acquire(&lease_key(&g.name, key), &self.host_id, LEASE_TTL_MS)
                        .await?
                }
            };
            let mut st = handle.state.lock();
            match got {
                Some(lease) => {
                    let epoch = lease.epoch;
                    let before = st.leases.insert(key.clone(), lease).map(|l| l.epoch);
                    if before != Some(epoch) {
                        if before.is_some() {
                            warn!(group = %g.name, topic = %key.0, queue = key.1,
                                "queue lease changed epoch under this host; restarting it from the committed offset");
                        }
                        st.queues.remove(key);
                        moved.push(key.clone());
                        changed = true;
                    }
                }
                None => {
                    if st.leases.remove(key).is_some() {
                        warn!(group = %g.name, topic = %key.0, queue = key.1,
                            "queue lease lost to another host; its deliveries here are void");
                        st.queues.remove(key);
                        changed = true;
                    }
                }
            }
        }
        if !moved.is_empty() {
            // Another holder may have committed further since this host last looked.
            let committed = self.store.load_offsets(&g.name).await?;
            let mut st = handle.state.lock();
            for o in committed {
                let key = (o.topic, o.queue_id);
                if moved.contains(&key) {
                    st.loaded.insert(key, o.offset);
                }
            }
        }
        if changed {
            let mut st = handle.state.lock();
            self.rebalance_locked(&g.name, &mut st);
            info!(group = %g.name, leased = st.leases.len(), "queue leases changed");
            drop(st);
            handle.notify.notify_waiters();
        }
        Ok(changed)
    }

    /// The queues this host should hold: each topic's queues split over the live hosts
    /// subscribing it (sorted by id, as every host sees them), the retry queue likewise.
    fn share(
        &self,
        g: &Group,
        topics: &BTreeSet<String>,
        hosts: &[(String, BTreeSet<String>)],
    ) -> BTreeSet<QueueKey> {
        let retry = retry_topic(&g.name);
        let mut desired = BTreeSet::new();
        for topic in topics.iter().chain(std::iter::once(&retry)) {
            let mut subscribers: Vec<&str> = hosts
                .iter()
                .filter(|(_, t)| *topic == retry || t.contains(topic))
                .map(|(id, _)| id.as_str())
                .collect();
            // Our own row may not be listed yet by a store that reads slightly behind.
            if !subscribers.contains(&self.host_id.as_str()) {
                subscribers.push(&self.host_id);
                subscribers.sort_unstable();
            }
            let Some(i) = subscribers.iter().position(|h| *h == self.host_id) else {
                continue;
            };
            let n = self.engine_queue_count(topic);
            desired.extend(average_share(n, subscribers.len(), i).map(|q| (topic.clone(), q)));
        }
        desired
    }

    /// Commits a queue's offset under its lease, gives the lease back and forgets the queue.
    async fn give_up(&self, g: &Group, handle: &GroupHandle, key: &QueueKey, lease: &Lease) {
        let offset = handle.state.lock().queues.get(key).map(|q| q.committed());
        let mut committed = None;
        if let Some(offset) = offset {
            let commit = CommittedOffset {
                topic: key.0.clone(),
                queue_id: key.1,
                offset,
            };
            match self
                .store
                .commit_offsets_fenced(&g.name, &[(commit, lease.epoch)])
                .await
            {
                Ok(ok) if ok.first() == Some(&true) => committed = Some(offset),
                Ok(_) => {}
                Err(e) => warn!(group = %g.name, topic = %key.0, queue = key.1, error = %e,
                    "could not commit offset before giving the queue up; the next holder redelivers from the last commit"),
            }
        }
        if let Err(e) = self.store.lease_release(lease).await {
            warn!(group = %g.name, topic = %key.0, queue = key.1, error = %e,
                "could not release queue lease; it expires by itself");
        }
        let mut st = handle.state.lock();
        st.leases.remove(key);
        st.queues.remove(key);
        // Status and delivery queries still know where the group stands on the queue.
        if let Some(offset) = committed {
            st.loaded.insert(key.clone(), offset);
        }
    }

    /// Gives back every lease this host holds (clean shutdown), committing offsets first.
    pub(in crate::broker) async fn release_all_leases(&self) {
        for (name, handle) in self.engine.all_handles() {
            let Ok(g) = self.group(&name) else { continue };
            let held: Vec<(QueueKey, Lease)> = handle
                .state
                .lock()
                .leases
                .iter()
                .map(|(k, l)| (k.clone(), l.clone()))
                .collect();
            for (key, lease) in held {
                self.give_up(&g, &handle, &key, &lease).await;
            }
            let _ = self.store.member_remove(&name, &self.host_id).await;
        }
    }
}
