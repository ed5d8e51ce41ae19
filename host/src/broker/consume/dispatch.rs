//! Receive and settle for broker-assigned consumers: in-flight tracking, receipts, flow control.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, instrument};

use super::filter::TagFilter;
use super::group_state::GroupState;
use super::progress::{Entry, QueueKey, QueueState, weight};
use super::retry::strip_origin_key;
use super::{
    Delivered, DeliveryToken, GroupHandle, Outcome, PROP_ORIGIN_MESSAGE_ID, PROP_RETRY_TOPIC,
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

/// Which topics one receive serves: all the instance's (`None`), or those a request names.
#[derive(Debug, Clone, Copy)]
struct Wanted<'a>(Option<&'a [String]>);

impl Wanted<'_> {
    /// True when the receive reads queues of `topic` (the retry topic always: it holds retries
    /// of every topic, told apart per message).
    fn queue(&self, topic: &str) -> bool {
        match self.0 {
            None => true,
            Some(ts) => topic.starts_with("%RETRY%") || ts.iter().any(|t| t == topic),
        }
    }

    /// True when the receive hands out `m`, read from a queue of `queue_topic`.
    fn message(&self, queue_topic: &str, m: &StoredMessage) -> bool {
        match self.0 {
            None => true,
            Some(ts) if queue_topic.starts_with("%RETRY%") => m
                .properties
                .get(PROP_RETRY_TOPIC)
                .is_some_and(|origin| ts.iter().any(|t| t == origin)),
            Some(_) => true,
        }
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
        topics: Option<&[String]>,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivered>> {
        let wanted = Wanted(topics);
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
                let mut watches = self.queue_watches(&handle, instance, wanted);
                for w in &mut watches {
                    w.borrow_and_update();
                }
                let notified = handle.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let got = self.try_receive(&g, &handle, instance, wanted, max).await?;
                if !got.is_empty() || Instant::now() >= deadline {
                    return Ok(got);
                }
                let mut stop = self.engine.stop.subscribe();
                tokio::select! {
                    _ = any_changed(&mut watches) => {}
                    _ = &mut notified => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = stop.wait_for(|s| *s) => return Ok(Vec::new()),
                }
            }
        }
        .await
    }

    /// Change signals of the queues a receive reads: an append elsewhere never wakes it. A
    /// rebalance, a settle that frees credit or a reset wakes it through the group's notify.
    fn queue_watches(
        &self,
        handle: &GroupHandle,
        instance: &str,
        wanted: Wanted<'_>,
    ) -> Vec<watch::Receiver<u64>> {
        let st = handle.state.lock();
        let Some(inst) = st.instances.get(instance) else {
            return Vec::new();
        };
        inst.assigned
            .iter()
            .filter(|k| wanted.queue(&k.0))
            .map(|k| self.store.watch_queue(&k.0, k.1))
            .collect()
    }

    /// One pass: ready messages first, then fresh reads from owned queues in turn.
    async fn try_receive(
        &self,
        g: &Group,
        handle: &Arc<GroupHandle>,
        instance: &str,
        wanted: Wanted<'_>,
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
                .filter(|k| wanted.queue(&k.0))
                .cloned()
                .collect();
            for key in &plan {
                if budget.is_spent() {
                    break;
                }
                self.take_ready(
                    &mut st,
                    instance,
                    key,
                    wanted,
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
                wanted,
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
        instance: &str,
        key: &QueueKey,
        wanted: Wanted<'_>,
        deadline_ms: u64,
        budget: &mut Budget,
        out: &mut Vec<Delivered>,
    ) {
        let seq = &self.engine.deliveries_seq;
        let mut taken = (0usize, 0usize);
        let lease = st.leases.get(key).map_or(0, |l| l.epoch);
        if let Some(q) = progress_mut(st, instance, key)
            && q.owner.as_deref() == Some(instance)
        {
            let to = Recipient {
                instance,
                key,
                epoch: q.epoch,
                lease,
                deadline_ms,
            };
            for (offset, entry) in q.pending.iter_mut() {
                if let Entry::Ready { message } = entry {
                    if !wanted.message(&key.0, message) {
                        continue;
                    }
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
            // Served only under this host's lease; the lease may have gone while we looked.
            ConsumeModel::Clustering if !st.leases.contains_key(key) => {}
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
        wanted: Wanted<'_>,
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
        let lease = st.leases.get(key).map_or(0, |l| l.epoch);
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
            instance,
            key,
            epoch: q.epoch,
            lease,
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
            if !wanted.message(&key.0, &m) {
                // A retry of a topic this receive does not name: it waits, ready, for one that does.
                q.pending.insert(
                    offset,
                    Entry::Ready {
                        message: Arc::new(m),
                    },
                );
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

    /// Settles a batch of deliveries in one pass over the group's state; failures (clustering)
    /// are written as retries together. Answers one result per token, in order: a stale or
    /// unknown token is a precise error and does not stop the others.
    #[instrument(skip(self, batch), fields(group = %group, count = batch.len()))]
    pub(super) async fn settle_tokens(
        &self,
        group: &str,
        batch: &[(DeliveryToken, Outcome)],
    ) -> Result<Vec<Result<()>>> {
        let g = self.consumer_group(group)?;
        let Some(handle) = self.engine.existing(group) else {
            let e = || {
                WharfError::bad_request(format!(
                    "receipts of group '{group}' expired: the group has no consumer state on this host \
                     (it restarted, or the group was deleted and created again); the messages are or will \
                     be delivered again, so settle the newer deliveries instead"
                ))
            };
            return Ok(batch.iter().map(|_| Err(e())).collect());
        };
        let now = self.clock.now_ms();
        let (cap, cap_bytes) = (
            self.config.max_in_flight_messages,
            self.config.max_in_flight_bytes,
        );
        let mut results = Vec::with_capacity(batch.len());
        let mut failed: Vec<(String, QueueKey, u64, Arc<StoredMessage>)> = Vec::new();
        // Waking pollers on every settle costs a wasted read each; only freed credit of an
        // instance at its cap can let a waiting receive make progress.
        let mut credit_freed = false;
        {
            let mut st = handle.state.lock();
            let model = st.model;
            let mut settled = 0u64;
            for (token, outcome) in batch {
                let key: QueueKey = (token.topic.clone(), token.queue_id);
                if model == ConsumeModel::Clustering {
                    let now_held = st.leases.get(&key).map(|l| l.epoch);
                    if now_held != Some(token.lease) {
                        let why = match now_held {
                            Some(e) => format!(
                                "the queue's lease moved since delivery (epoch {}, now {e}); it is served anew",
                                token.lease
                            ),
                            None => format!(
                                "this host no longer holds the queue's lease (epoch {}): another host serves it",
                                token.lease
                            ),
                        };
                        results.push(Err(stale(token, &why)));
                        continue;
                    }
                }
                let taken = match find_progress(&mut st, &key, token) {
                    None => Err(stale(
                        token,
                        "the instance or queue is no longer consuming on this host",
                    )),
                    Some(q) => take_in_flight(q, token, *outcome, model),
                };
                let (holder, message) = match taken {
                    Ok(m) => m,
                    Err(e) => {
                        results.push(Err(e));
                        continue;
                    }
                };
                if let Some(inst) = st.instances.get_mut(&holder) {
                    // Settling is liveness: a consumer busy acknowledging is alive.
                    inst.last_seen_ms = now;
                    credit_freed |= inst.in_flight >= cap || inst.in_flight_bytes >= cap_bytes;
                    inst.release(weight(&message));
                }
                settled += 1;
                if *outcome == Outcome::ReconsumeLater {
                    if model == ConsumeModel::Clustering {
                        failed.push((holder, key, token.offset, message));
                    } else {
                        debug!("broadcasting: failed message is not retried");
                    }
                }
                results.push(Ok(()));
            }
            if settled > 0 {
                st.rate.add(now, settled);
                st.last_consume_ms = Some(now);
            }
        }
        if credit_freed {
            handle.notify.notify_waiters();
        }
        if !failed.is_empty() {
            self.fail_and_forget(&g, &handle, failed).await?;
        }
        Ok(results)
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
    instance: &'a str,
    key: &'a QueueKey,
    epoch: u64,
    lease: u64,
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
        out.push(Delivered {
            message: present(&message),
            token: DeliveryToken {
                topic: self.key.0.clone(),
                queue_id: self.key.1,
                offset,
                epoch: self.epoch,
                lease: self.lease,
                delivery,
            },
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

/// The error for a token that no longer names a live delivery.
fn stale(token: &DeliveryToken, why: &str) -> WharfError {
    WharfError::bad_request(format!(
        "receipt expired for {}:{} offset {} ({why}); the message is or will be delivered again, \
         so settle the newer delivery instead",
        token.topic, token.queue_id, token.offset
    ))
}

/// Removes the in-flight entry `token` names from `q` and returns its message; a failure of a
/// clustering group stays behind as `Settling` until its retry copy is durable.
fn take_in_flight(
    q: &mut QueueState,
    token: &DeliveryToken,
    outcome: Outcome,
    model: ConsumeModel,
) -> Result<(String, Arc<StoredMessage>)> {
    let matches = matches!(
        q.pending.get(&token.offset),
        Some(Entry::InFlight { delivery, .. }) if *delivery == token.delivery
    );
    if !matches {
        let why = if q.pending.contains_key(&token.offset) {
            "it was redelivered since; a newer receipt exists"
        } else if q.epoch != token.epoch {
            "the queue's offset was reset since delivery"
        } else {
            "already settled, or its consume timeout passed and it was scheduled for retry"
        };
        return Err(stale(token, why));
    }
    let Some(Entry::InFlight {
        instance, message, ..
    }) = q.pending.remove(&token.offset)
    else {
        return Err(stale(token, "already settled"));
    };
    if outcome == Outcome::ReconsumeLater && model == ConsumeModel::Clustering {
        q.pending.insert(
            token.offset,
            Entry::Settling {
                message: message.clone(),
            },
        );
    }
    Ok((instance, message))
}

/// The progress holding `token`'s delivery of queue `key`: the group's (clustering), or that of
/// the broadcasting instance whose entry at that offset carries that delivery number.
fn find_progress<'a>(
    st: &'a mut GroupState,
    key: &QueueKey,
    token: &DeliveryToken,
) -> Option<&'a mut QueueState> {
    match st.model {
        ConsumeModel::Clustering => st.queues.get_mut(key),
        ConsumeModel::Broadcasting => st
            .instances
            .values_mut()
            .filter_map(|i| i.own.get_mut(key))
            .find(|q| {
                matches!(q.pending.get(&token.offset),
                    Some(Entry::InFlight { delivery, .. }) if *delivery == token.delivery)
            }),
    }
}

/// Resolves when any of `watches` sees a new value (or its sender is gone); never when empty.
async fn any_changed(watches: &mut [watch::Receiver<u64>]) {
    if watches.is_empty() {
        return std::future::pending().await;
    }
    let mut waits: Vec<_> = watches.iter_mut().map(|w| Box::pin(w.changed())).collect();
    std::future::poll_fn(|cx| {
        for w in &mut waits {
            if w.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}
