//! Background work: timer reveal, consume-timeout and heartbeat expiry, offset flushing, retention.
//!
//! Tasks hold only a weak reference to the broker, so dropping the broker ends them; a clean
//! shutdown signals them through `Engine::stop` and waits for them.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::dispatch::progress_mut;
use super::leases::LEASE_RENEW_MS;
use super::progress::{Entry, QueueKey, weight};
use super::{Engine, GroupHandle, broadcast_offsets_key};
use crate::broker::{Broker, ConsumeModel};
use crate::error::Result;
use crate::model::StoredMessage;
use crate::store::CommittedOffset;

/// Longest pause between timer reveal passes.
pub const TIMER_TICK: Duration = Duration::from_millis(10);
/// Pause between expiry passes (consume timeouts, heartbeats).
pub const HOUSEKEEPING_TICK: Duration = Duration::from_millis(10);
/// How often committed offsets are written to the store.
pub const OFFSET_FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// How often retention runs (clock time).
pub const RETENTION_INTERVAL_MS: u64 = 3_600_000;
/// Timers revealed per store call.
const REVEAL_BATCH: usize = 4096;

/// Starts every background task of the engine.
pub fn spawn_all(broker: &Arc<Broker>) {
    let weak = Arc::downgrade(broker);
    let stop = broker.engine.stop.subscribe();
    let handles = vec![
        tokio::spawn(timer_loop(weak.clone(), stop.clone())),
        tokio::spawn(housekeeping_loop(weak.clone(), stop.clone())),
        tokio::spawn(retention_loop(weak, stop)),
    ];
    broker.engine.tasks.lock().extend(handles);
}

/// Sleeps `d` or returns false when asked to stop.
async fn pause(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        _ = stop.wait_for(|s| *s) => false,
        _ = tokio::time::sleep(d) => true,
    }
}

async fn timer_loop(weak: Weak<Broker>, mut stop: watch::Receiver<bool>) {
    loop {
        let next = {
            let Some(b) = weak.upgrade() else { return };
            reveal_due(&b).await;
            let now = b.clock.now_ms();
            b.store
                .next_timer_ms()
                .map(|t| Duration::from_millis(t.saturating_sub(now)))
        };
        let d = next.map_or(TIMER_TICK, |d| d.min(TIMER_TICK));
        if !pause(&mut stop, d.max(Duration::from_millis(1))).await {
            return;
        }
    }
}

/// Reveals every timer due now; never one before its time.
pub async fn reveal_due(b: &Broker) {
    loop {
        match b.store.reveal_due(b.clock.now_ms(), REVEAL_BATCH).await {
            Ok(n) if n >= REVEAL_BATCH => continue,
            Ok(_) => return,
            Err(e) => {
                warn!(error = %e, "timer reveal failed; will retry");
                return;
            }
        }
    }
}

async fn housekeeping_loop(weak: Weak<Broker>, mut stop: watch::Receiver<bool>) {
    let mut last_flush = tokio::time::Instant::now();
    loop {
        {
            let Some(b) = weak.upgrade() else { return };
            b.expire_pass().await;
            if last_flush.elapsed() >= OFFSET_FLUSH_INTERVAL {
                last_flush = tokio::time::Instant::now();
                if let Err(e) = b.engine.flush_offsets().await {
                    warn!(error = %e, "could not persist consumer offsets; will retry");
                }
            }
        }
        if !pause(&mut stop, HOUSEKEEPING_TICK).await {
            return;
        }
    }
}

async fn retention_loop(weak: Weak<Broker>, mut stop: watch::Receiver<bool>) {
    let mut last_run: Option<u64> = None;
    loop {
        {
            let Some(b) = weak.upgrade() else { return };
            let now = b.clock.now_ms();
            if last_run.is_none_or(|t| now.saturating_sub(t) >= RETENTION_INTERVAL_MS) {
                last_run = Some(now);
                match b.store.enforce_retention(now).await {
                    Ok(r) if r.segments_deleted > 0 => info!(
                        segments = r.segments_deleted,
                        bytes = r.bytes_freed,
                        "retention removed old segments"
                    ),
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "retention pass failed; will retry"),
                }
            }
        }
        if !pause(&mut stop, Duration::from_secs(1)).await {
            return;
        }
    }
}

impl Broker {
    /// Removes silent instances and retries messages past their consume timeout.
    pub async fn expire_pass(&self) {
        let now = self.clock.now_ms();
        let timeout = self.config.consumer_heartbeat_timeout_ms;
        for (name, handle) in self.engine.all_handles() {
            let g = match self.group(&name) {
                Ok(g) if g.created_ms == handle.state.lock().created_ms => g,
                // Deleted (or deleted and created again): its instances must register anew.
                _ => {
                    self.engine.forget_stale(&name, &handle);
                    continue;
                }
            };
            let silent: Vec<String> = {
                let mut st = handle.state.lock();
                let silent: Vec<String> = st
                    .instances
                    .iter()
                    .filter(|(_, i)| i.polling == 0 && now.saturating_sub(i.last_seen_ms) > timeout)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in &silent {
                    self.remove_instance_locked(&name, &mut st, id);
                }
                silent
            };
            if !silent.is_empty() {
                info!(group = %name, instances = ?silent,
                    "consumer instances stopped heartbeating; their queues moved to the others (what they hold stays theirs until the consume timeout)");
                handle.notify.notify_waiters();
            }
            let lease_due = g.model == ConsumeModel::Clustering && {
                let mut st = handle.state.lock();
                let due = !silent.is_empty()
                    || now.saturating_sub(st.last_lease_pass_ms) >= LEASE_RENEW_MS;
                if due {
                    st.last_lease_pass_ms = now;
                }
                due
            };
            if lease_due && let Err(e) = self.lease_pass(&g, &handle).await {
                warn!(group = %name, error = %e, "queue lease pass failed; will retry");
            }
            let expired = expire_in_flight(&handle, now);
            if !expired.is_empty() {
                info!(group = %name, count = expired.len(), "deliveries passed the consume timeout; retrying them");
                handle.notify.notify_waiters();
                if let Err(e) = self.fail_and_forget(&g, &handle, expired).await {
                    warn!(group = %name, error = %e, "could not write retries; messages stay ready for redelivery");
                }
            }
        }
    }
}

/// Takes every in-flight delivery past its deadline: clustering ones become `Settling` (to be
/// retried and returned here), broadcasting ones are dropped (no retries in that model).
fn expire_in_flight(
    handle: &GroupHandle,
    now: u64,
) -> Vec<(String, QueueKey, u64, Arc<StoredMessage>)> {
    let mut st = handle.state.lock();
    if now < st.next_deadline_ms {
        return Vec::new();
    }
    let model = st.model;
    let mut found: Vec<(String, QueueKey, u64)> = Vec::new();
    let mut scan =
        |owner: &str, key: &QueueKey, pending: &std::collections::BTreeMap<u64, Entry>| {
            for (offset, e) in pending {
                if let Entry::InFlight { deadline_ms, .. } = e
                    && *deadline_ms <= now
                {
                    found.push((owner.to_string(), key.clone(), *offset));
                }
            }
        };
    for (key, q) in &st.queues {
        scan("", key, &q.pending);
    }
    for (id, inst) in &st.instances {
        for (key, q) in &inst.own {
            scan(id, key, &q.pending);
        }
    }
    let mut out = Vec::new();
    for (owner, key, offset) in found {
        let Some(q) = progress_mut(&mut st, &owner, &key) else {
            continue;
        };
        let Some(Entry::InFlight {
            instance, message, ..
        }) = q.pending.remove(&offset)
        else {
            continue;
        };
        if model == ConsumeModel::Clustering {
            q.pending.insert(
                offset,
                Entry::Settling {
                    message: message.clone(),
                },
            );
            out.push((owner, key, offset, message.clone()));
        }
        if let Some(inst) = st.instances.get_mut(&instance) {
            inst.release(weight(&message));
        }
    }
    st.refresh_deadline();
    out
}

impl Engine {
    /// Commits a clustering group's offsets fenced by the lease epoch each queue is held under;
    /// a queue whose lease another holder took is dropped here (its deliveries are void) and left
    /// out of `offsets`, and the next lease pass runs at once.
    async fn commit_fenced(
        &self,
        group: &str,
        handle: &GroupHandle,
        offsets: &mut Vec<CommittedOffset>,
    ) -> Result<()> {
        let fenced: Vec<(CommittedOffset, u64)> = {
            let st = handle.state.lock();
            offsets
                .iter()
                .filter_map(|o| {
                    let epoch = st.leases.get(&(o.topic.clone(), o.queue_id))?.epoch;
                    Some((o.clone(), epoch))
                })
                .collect()
        };
        let accepted = self.store.commit_offsets_fenced(group, &fenced).await?;
        let mut st = handle.state.lock();
        offsets.clear();
        for ((o, _), ok) in fenced.into_iter().zip(accepted) {
            if ok {
                offsets.push(o);
            } else {
                let key = (o.topic.clone(), o.queue_id);
                warn!(group, topic = %o.topic, queue = o.queue_id,
                    "offset commit refused: another holder took the queue's lease; dropping it here");
                st.leases.remove(&key);
                st.queues.remove(&key);
                st.last_lease_pass_ms = 0;
            }
        }
        Ok(())
    }

    /// Writes every changed committed offset to the store.
    pub async fn flush_offsets(&self) -> Result<()> {
        for (name, handle) in self.all_handles() {
            let batches = {
                let mut st = handle.state.lock();
                let mut batches: Vec<(String, Vec<CommittedOffset>)> =
                    std::mem::take(&mut st.unflushed);
                let changed =
                    |queues: &std::collections::BTreeMap<QueueKey, super::progress::QueueState>| {
                        queues
                            .iter()
                            .filter(|(_, q)| q.persisted != Some(q.committed()))
                            .map(|((topic, queue_id), q)| CommittedOffset {
                                topic: topic.clone(),
                                queue_id: *queue_id,
                                offset: q.committed(),
                            })
                            .collect::<Vec<_>>()
                    };
                let shared = changed(&st.queues);
                if !shared.is_empty() {
                    batches.push((name.clone(), shared));
                }
                for (id, inst) in &st.instances {
                    let own = changed(&inst.own);
                    if !own.is_empty() {
                        batches.push((broadcast_offsets_key(&name, id), own));
                    }
                }
                batches
            };
            let mut batches = batches.into_iter();
            while let Some((owner, mut offsets)) = batches.next() {
                let written = if owner == name {
                    self.commit_fenced(&name, &handle, &mut offsets).await
                } else {
                    self.store.commit_offsets(&owner, &offsets).await
                };
                if let Err(e) = written {
                    // A departed broadcasting instance's offsets exist only in this batch list;
                    // keep every unwritten batch for the next pass instead of dropping it.
                    let mut st = handle.state.lock();
                    st.unflushed.push((owner, offsets));
                    st.unflushed.extend(batches);
                    return Err(e);
                }
                let mut st = handle.state.lock();
                let broadcast_instance = owner
                    .strip_prefix(&broadcast_offsets_key(&name, ""))
                    .map(str::to_string);
                for o in &offsets {
                    let key = (o.topic.clone(), o.queue_id);
                    let q = match &broadcast_instance {
                        Some(id) => st.instances.get_mut(id).and_then(|i| i.own.get_mut(&key)),
                        None => {
                            st.loaded.insert(key.clone(), o.offset);
                            st.queues.get_mut(&key)
                        }
                    };
                    if let Some(q) = q {
                        q.persisted = Some(o.offset);
                    }
                }
            }
        }
        Ok(())
    }
}
