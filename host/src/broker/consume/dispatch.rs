//! Receive and settle for broker-assigned consumers: in-flight tracking, receipts, flow control.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, instrument};

use super::filter::TagFilter;
use super::group_state::GroupState;
use super::progress::{Entry, QueueKey, QueueState, weight};
use super::receipt::Receipt;
use super::retry::strip_origin_key;
use super::{
    Delivered, GroupHandle, Outcome, PROP_ORIGIN_MESSAGE_ID, PROP_RETRY_TOPIC,
    START_FROM_EARLIEST_MAX_AGE_MS, is_retry_topic_of, not_registered,
};
use crate::broker::{Broker, ConsumeModel, Group};
use crate::error::{Result, WharfError};
use crate::model::{MessageId, StoredMessage};

/// How a retry looks to consumers: the original topic, id and business keys, with its
/// reconsume count. Any other message is handed out as stored, shared rather than copied.
pub fn present(stored: &Arc<StoredMessage>) -> Arc<StoredMessage> {
    if !stored.topic.starts_with("%RETRY%") {
        return stored.clone();
    }
    let mut m = StoredMessage::clone(stored);
    strip_origin_key(&mut m);
    if let Some(t) = m.properties.get(PROP_RETRY_TOPIC) {
        m.topic = t.clone();
    }
    if let Some(id) = m
        .properties
        .get(PROP_ORIGIN_MESSAGE_ID)
        .and_then(|s| MessageId::from_str(s).ok())
    {
        m.id = id;
    }
    Arc::new(m)
}

/// Progress of `key` for `instance`: the group's (clustering) or the instance's (broadcasting).
pub fn progress_mut<'a>(
    st: &'a mut GroupState,
    instance: &str,
    key: &QueueKey,
) -> Option<&'a mut QueueState> {
    match st.model {
        ConsumeModel::Clustering => st.queues.get_mut(key),
        ConsumeModel::Broadcasting => st.instances.get_mut(instance)?.own.get_mut(key),
    }
}

/// Flow-control credit of one receive call.
#[derive(Debug)]
struct Budget {
    /// Messages it may still hand out.
    count: usize,
    /// Body bytes it may still hand out.
    bytes: usize,
    /// The instance holds nothing: the first message may exceed the byte credit.
    oversize_ok: bool,
}

impl Budget {
    /// Takes credit for one message of `weight` bytes, if there is enough.
    fn admit(&mut self, weight: usize) -> bool {
        if self.count == 0 || (weight > self.bytes && !self.oversize_ok) {
            return false;
        }
        self.count -= 1;
        self.bytes = self.bytes.saturating_sub(weight);
        self.oversize_ok = false;
        true
    }

    /// Nothing more can be handed out.
    fn is_spent(&self) -> bool {
        self.count == 0 || (self.bytes == 0 && !self.oversize_ok)
    }
}

/// What one read of a queue needs, taken under the lock.
struct ReadJob {
    from: u64,
    epoch: u64,
    filter: TagFilter,
}

impl Broker {
    /// Receive: long poll until something is delivered or `wait` passes.
    #[instrument(skip(self), fields(group = %group, instance = %instance))]
    pub(super) async fn receive_batch(
        &self,
        group: &str,
        instance: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivered>> {
        let g = self.consumer_group(group)?;
        let handle = self
            .engine
            .existing(group)
            .ok_or_else(|| not_registered(group, instance))?;
        let max = max.clamp(1, super::MAX_RECEIVE_BATCH);
        let deadline = Instant::now() + wait;
        set_polling(&handle, instance, 1);
        let _polling = PollingGuard {
            handle: &handle,
            instance,
        };
        async {
            loop {
                let mut changes = self.store.changes();
                changes.borrow_and_update();
                let notified = handle.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let got = self.try_receive(&g, &handle, instance, max).await?;
                if !got.is_empty() || Instant::now() >= deadline {
                    return Ok(got);
                }
                let mut stop = self.engine.stop.subscribe();
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = &mut notified => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = stop.wait_for(|s| *s) => return Ok(Vec::new()),
                }
            }
        }
        .await
    }

    /// One pass: ready messages first, then fresh reads from owned queues in turn.
    async fn try_receive(
        &self,
        g: &Group,
        handle: &Arc<GroupHandle>,
        instance: &str,
        max: usize,
    ) -> Result<Vec<Delivered>> {
        let now = self.clock.now_ms();
        let deadline_ms = now.saturating_add(g.consume_timeout_ms);
        let mut out = Vec::new();
        let (plan, mut budget) = {
            let mut st = handle.state.lock();
            let inst = st
                .instances
                .get_mut(instance)
                .ok_or_else(|| not_registered(&g.name, instance))?;
            inst.last_seen_ms = now;
            let cap = self.config.max_in_flight_messages;
            if inst.in_flight >= cap || inst.in_flight_bytes >= self.config.max_in_flight_bytes {
                debug!(
                    in_flight = inst.in_flight,
                    bytes = inst.in_flight_bytes,
                    "flow control: instance holds too many unsettled messages"
                );
                return Ok(out);
            }
            let mut budget = Budget {
                count: max.min(cap - inst.in_flight),
                bytes: self.config.max_in_flight_bytes - inst.in_flight_bytes,
                // One message larger than the whole byte cap must still get through, alone.
                oversize_ok: inst.in_flight == 0,
            };
            let n = inst.assigned.len();
            let start = if n == 0 { 0 } else { inst.cursor % n };
            inst.cursor = inst.cursor.wrapping_add(1);
            let plan: Vec<QueueKey> = inst.assigned[start..]
                .iter()
                .chain(&inst.assigned[..start])
                .cloned()
                .collect();
            for key in &plan {
                if budget.is_spent() {
                    break;
                }
                self.take_ready(
                    &mut st,
                    g,
                    instance,
                    key,
                    deadline_ms,
                    &mut budget,
                    &mut out,
                );
            }
            (plan, budget)
        };
        for key in plan {
            if budget.is_spent() {
                break;
            }
            self.read_queue_into(
                g,
                handle,
                instance,
                &key,
                deadline_ms,
                &mut budget,
                &mut out,
            )
            .await?;
        }
        Ok(out)
    }

    /// Hands out messages left ready by a departed owner or a rebalance.
    #[allow(clippy::too_many_arguments)]
    fn take_ready(
        &self,
        st: &mut GroupState,
        g: &Group,
        instance: &str,
        key: &QueueKey,
        deadline_ms: u64,
        budget: &mut Budget,
        out: &mut Vec<Delivered>,
    ) {
        let seq = &self.engine.deliveries_seq;
        let mut taken = (0usize, 0usize);
        if let Some(q) = progress_mut(st, instance, key)
            && q.owner.as_deref() == Some(instance)
        {
            let to = Recipient {
                group: &g.name,
                instance,
                key,
                epoch: q.epoch,
                deadline_ms,
            };
            for (offset, entry) in q.pending.iter_mut() {
                if let Entry::Ready { message } = entry {
                    if !budget.admit(weight(message)) {
                        break;
                    }
                    taken.0 += 1;
                    taken.1 += weight(message);
                    *entry = to.hand_out(seq, *offset, message.clone(), out);
                }
            }
        }
        charge(st, instance, taken, deadline_ms);
    }

    /// Where a queue without progress starts: its committed offset, else the start rule.
    pub(super) async fn start_offset(
        &self,
        st_committed: Option<u64>,
        model: ConsumeModel,
        key: &QueueKey,
    ) -> Result<(u64, bool)> {
        if let Some(c) = st_committed {
            return Ok((c, true));
        }
        let bounds = self.store.queue_bounds(&key.0, key.1).await?;
        if model == ConsumeModel::Broadcasting {
            return Ok((bounds.max, false));
        }
        let now = self.clock.now_ms();
        let earliest = self.store.earliest_stored_ms(&key.0).await?;
        let recent =
            earliest.is_some_and(|t| now.saturating_sub(t) <= START_FROM_EARLIEST_MAX_AGE_MS);
        Ok((if recent { bounds.min } else { bounds.max }, false))
    }

    /// Builds progress for a queue the instance owns but has never read.
    pub(super) async fn init_progress(
        &self,
        handle: &GroupHandle,
        instance: &str,
        key: &QueueKey,
    ) -> Result<()> {
        let (model, committed) = {
            let st = handle.state.lock();
            let committed = match st.model {
                ConsumeModel::Clustering => st.loaded.get(key).copied(),
                ConsumeModel::Broadcasting => st
                    .instances
                    .get(instance)
                    .and_then(|i| i.own_loaded.get(key).copied()),
            };
            (st.model, committed)
        };
        let (offset, persisted) = self.start_offset(committed, model, key).await?;
        let mut st = handle.state.lock();
        let owns = st
            .instances
            .get(instance)
            .is_some_and(|i| i.assigned.contains(key));
        let mut q = QueueState::new(offset, persisted);
        if owns {
            q.owner = Some(instance.to_string());
        }
        match model {
            ConsumeModel::Clustering => {
                st.queues.entry(key.clone()).or_insert(q);
            }
            ConsumeModel::Broadcasting => {
                if let Some(inst) = st.instances.get_mut(instance) {
                    inst.own.entry(key.clone()).or_insert(q);
                }
            }
        }
        Ok(())
    }

    /// Reads fresh messages from one owned queue through the instance's filter.
    #[allow(clippy::too_many_arguments)]
    async fn read_queue_into(
        &self,
        g: &Group,
        handle: &Arc<GroupHandle>,
        instance: &str,
        key: &QueueKey,
        deadline_ms: u64,
        budget: &mut Budget,
        out: &mut Vec<Delivered>,
    ) -> Result<()> {
        let mut initialised = false;
        let job = loop {
            let needs_init = {
                let mut st = handle.state.lock();
                let filter = if is_retry_topic_of(&key.0, &g.name) {
                    Some(TagFilter::All)
                } else {
                    st.instances
                        .get(instance)
                        .and_then(|i| i.filters.get(&key.0).cloned())
                };
                let Some(filter) = filter else {
                    return Ok(());
                };
                match progress_mut(&mut st, instance, key) {
                    Some(q) => {
                        if q.owner.as_deref() != Some(instance) || q.reading {
                            return Ok(());
                        }
                        q.reading = true;
                        break ReadJob {
                            from: q.next_read,
                            epoch: q.epoch,
                            filter,
                        };
                    }
                    None => true,
                }
            };
            if needs_init && !initialised {
                self.init_progress(handle, instance, key).await?;
                initialised = true;
            } else {
                return Ok(());
            }
        };
        let mut guard = ReadGuard {
            handle,
            instance,
            key,
            epoch: job.epoch,
            armed: true,
        };
        let read = self
            .store
            .read_queue(&key.0, key.1, job.from, budget.count, job.filter.hashes())
            .await;
        guard.armed = false;
        let mut st = handle.state.lock();
        let seq = &self.engine.deliveries_seq;
        let Some(q) = progress_mut(&mut st, instance, key) else {
            return Ok(());
        };
        q.reading = false;
        let read = read?;
        if q.epoch != job.epoch || q.next_read != job.from || q.owner.as_deref() != Some(instance) {
            // Ownership moved or the offset was reset while reading: the new state wins.
            return Ok(());
        }
        let to = Recipient {
            group: &g.name,
            instance,
            key,
            epoch: q.epoch,
            deadline_ms,
        };
        let mut taken = (0usize, 0usize);
        let mut stopped_at = None;
        for m in read.messages {
            let Some(offset) = m.queue_offset else {
                continue;
            };
            if !job.filter.matches(m.tag.as_deref()) {
                continue;
            }
            if !budget.admit(weight(&m)) {
                stopped_at = Some(offset);
                break;
            }
            taken.0 += 1;
            taken.1 += weight(&m);
            let entry = to.hand_out(seq, offset, Arc::new(m), out);
            q.pending.insert(offset, entry);
        }
        // Retention may have removed what we had not read yet: continue from the oldest kept.
        q.next_read = match stopped_at {
            // Out of credit: the rest is read again next time.
            Some(offset) => offset,
            None => read.next_offset.max(job.from).max(read.bounds.min),
        };
        charge(&mut st, instance, taken, deadline_ms);
        Ok(())
    }

    /// Settle: commit, or hand a failure to the retry path.
    #[instrument(skip(self, receipt), fields(group = %group))]
    pub(super) async fn settle_one(
        &self,
        group: &str,
        receipt: &str,
        outcome: Outcome,
    ) -> Result<()> {
        let g = self.consumer_group(group)?;
        let r = Receipt::decode(receipt)?;
        if r.group != group {
            return Err(WharfError::bad_request(format!(
                "receipt belongs to group '{}', not '{group}'; settle it through its own group",
                r.group
            )));
        }
        let stale = |why: &str| {
            WharfError::bad_request(format!(
                "receipt expired for {}:{} offset {} ({why}); the message is or will be delivered again, \
                 so settle the newer delivery instead",
                r.topic, r.queue_id, r.offset
            ))
        };
        let handle = self
            .engine
            .existing(group)
            .ok_or_else(|| stale("the group has no consumer state; the host restarted"))?;
        let key: QueueKey = (r.topic.clone(), r.queue_id);
        let now = self.clock.now_ms();
        let failed = {
            let mut st = handle.state.lock();
            let model = st.model;
            let Some(q) = progress_mut(&mut st, &r.instance, &key) else {
                return Err(stale("the instance or queue is no longer consuming"));
            };
            let matches = matches!(
                q.pending.get(&r.offset),
                Some(Entry::InFlight { delivery, .. }) if *delivery == r.delivery
            );
            if !matches {
                let why = if q.epoch != r.epoch {
                    "the queue was rebalanced or its offset reset since delivery"
                } else if q.pending.contains_key(&r.offset) {
                    "it was redelivered since; a newer receipt exists"
                } else {
                    "already settled, or its consume timeout passed and it was scheduled for retry"
                };
                return Err(stale(why));
            }
            let Some(Entry::InFlight {
                instance, message, ..
            }) = q.pending.remove(&r.offset)
            else {
                return Err(stale("already settled"));
            };
            let retry = outcome == Outcome::ReconsumeLater && model == ConsumeModel::Clustering;
            if retry {
                q.pending.insert(
                    r.offset,
                    Entry::Settling {
                        message: message.clone(),
                    },
                );
            }
            let (cap, cap_bytes) = (
                self.config.max_in_flight_messages,
                self.config.max_in_flight_bytes,
            );
            // Waking pollers on every settle costs a wasted read each; only freed credit of an
            // instance at its cap can let a waiting receive make progress.
            let mut credit_freed = false;
            if let Some(inst) = st.instances.get_mut(&instance) {
                credit_freed = inst.in_flight >= cap || inst.in_flight_bytes >= cap_bytes;
                inst.release(weight(&message));
            }
            st.rate.add(now, 1);
            st.last_consume_ms = Some(now);
            (retry.then_some(message), credit_freed)
        };
        let (failed, credit_freed) = failed;
        if credit_freed {
            handle.notify.notify_waiters();
        }
        if let Some(message) = failed {
            self.fail_and_forget(
                &g,
                &handle,
                vec![(r.instance.clone(), key, r.offset, message)],
            )
            .await?;
        } else if outcome == Outcome::ReconsumeLater {
            debug!("broadcasting: failed message is not retried");
        }
        Ok(())
    }

    /// Writes retries (or dead letters) for messages in `Settling` state, then drops them from
    /// pending; on a store error they become ready again so nothing is lost.
    pub(super) async fn fail_and_forget(
        &self,
        g: &Group,
        handle: &GroupHandle,
        failed: Vec<(String, QueueKey, u64, Arc<StoredMessage>)>,
    ) -> Result<()> {
        if failed.is_empty() {
            return Ok(());
        }
        let messages: Vec<&StoredMessage> = failed.iter().map(|f| f.3.as_ref()).collect();
        let mut guard = SettlingGuard {
            handle,
            failed: &failed,
            armed: true,
        };
        let res = self.write_retries(g, &messages).await;
        guard.armed = false;
        let mut st = handle.state.lock();
        for (instance, key, offset, message) in &failed {
            if let Some(q) = progress_mut(&mut st, instance, key)
                && let Some(entry) = q.pending.get_mut(offset)
                && matches!(entry, Entry::Settling { message: m } if Arc::ptr_eq(m, message))
            {
                if res.is_ok() {
                    q.pending.remove(offset);
                } else {
                    *entry = Entry::Ready {
                        message: message.clone(),
                    };
                }
            }
        }
        drop(st);
        handle.notify.notify_waiters();
        res
    }
}

/// Who a message is handed to, and on which queue and ownership epoch.
struct Recipient<'a> {
    group: &'a str,
    instance: &'a str,
    key: &'a QueueKey,
    epoch: u64,
    deadline_ms: u64,
}

impl Recipient<'_> {
    /// Gives `message` (at `offset`) a fresh delivery number and receipt, pushes it to `out`,
    /// and returns the in-flight entry that waits for its settle or consume timeout.
    fn hand_out(
        &self,
        seq: &AtomicU64,
        offset: u64,
        message: Arc<StoredMessage>,
        out: &mut Vec<Delivered>,
    ) -> Entry {
        let delivery = seq.fetch_add(1, Ordering::Relaxed);
        let receipt = Receipt {
            group: self.group.to_string(),
            instance: self.instance.to_string(),
            topic: self.key.0.clone(),
            queue_id: self.key.1,
            offset,
            epoch: self.epoch,
            delivery,
        };
        out.push(Delivered {
            message: present(&message),
            receipt: receipt.encode(),
        });
        Entry::InFlight {
            instance: self.instance.to_string(),
            delivery,
            deadline_ms: self.deadline_ms,
            message,
        }
    }
}

/// Counts `taken` (messages, body bytes) against the instance's flow-control credit and makes
/// the consume-timeout pass look no later than `deadline_ms`.
fn charge(st: &mut GroupState, instance: &str, taken: (usize, usize), deadline_ms: u64) {
    if taken.0 == 0 {
        return;
    }
    if let Some(inst) = st.instances.get_mut(instance) {
        inst.in_flight += taken.0;
        inst.in_flight_bytes += taken.1;
    }
    st.next_deadline_ms = st.next_deadline_ms.min(deadline_ms);
}

/// Ends the poll count even when the caller gives up on a receive (client disconnected).
struct PollingGuard<'a> {
    handle: &'a GroupHandle,
    instance: &'a str,
}

impl Drop for PollingGuard<'_> {
    fn drop(&mut self) {
        set_polling(self.handle, self.instance, -1);
    }
}

/// Clears a queue's `reading` flag if a receive is dropped mid-read, so the queue never stalls.
struct ReadGuard<'a> {
    handle: &'a GroupHandle,
    instance: &'a str,
    key: &'a QueueKey,
    epoch: u64,
    armed: bool,
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut st = self.handle.state.lock();
            if let Some(q) = progress_mut(&mut st, self.instance, self.key)
                && q.epoch == self.epoch
            {
                q.reading = false;
            }
        }
    }
}

/// Makes `Settling` entries ready again if their retry write is abandoned midway, so they are
/// redelivered instead of pinning the committed offset forever.
struct SettlingGuard<'a> {
    handle: &'a GroupHandle,
    failed: &'a [(String, QueueKey, u64, Arc<StoredMessage>)],
    armed: bool,
}

impl Drop for SettlingGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut st = self.handle.state.lock();
        for (instance, key, offset, message) in self.failed {
            if let Some(q) = progress_mut(&mut st, instance, key)
                && let Some(entry) = q.pending.get_mut(offset)
                && matches!(entry, Entry::Settling { message: m } if Arc::ptr_eq(m, message))
            {
                *entry = Entry::Ready {
                    message: message.clone(),
                };
            }
        }
    }
}

/// Counts an open long poll so heartbeat expiry leaves a waiting instance alone.
fn set_polling(handle: &GroupHandle, instance: &str, delta: i32) {
    if let Some(inst) = handle.state.lock().instances.get_mut(instance) {
        inst.polling = inst.polling.saturating_add_signed(delta);
    }
}
