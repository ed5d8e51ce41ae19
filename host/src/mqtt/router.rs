//! The per-host router: tails every queue of every broker topic (and the gateway's own topic)
//! once, turns stored messages into MQTT messages, matches them against one subscription trie
//! and pushes them into the outboxes of the sessions they go to. Sessions never read the store:
//! the router also replays, for a reconnecting clean-session=false client, what arrived while
//! it was away, from the queue positions its session had reached.
//!
//! A session that reads more slowly than messages arrive is not fed from memory without bound:
//! its outbox holds at most [`OUTBOX_IN_MEMORY`] deliveries, and past that the tail marks the
//! session as lagging on that queue ([`Lag`]) and feeds it from the store as it drains, in order,
//! while every other session goes on receiving live. Only a session `[mqtt] max_queued` messages
//! behind loses QoS 0 messages (the oldest it lags on, counted) or, holding QoS 1/2 ones, is
//! disconnected.
//!
//! Consistency rule: a tail routes a batch and advances its `routed_upto` under the read lock;
//! attaching or detaching a session takes the write lock. So at the moment a session attaches,
//! every message below `routed_upto` is the catch-up's to replay and every message from it on
//! reaches the session live: nothing is missed, nothing doubled.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::metrics::MqttMetrics;
use super::session::{Delivery, Lag, Pushed, Routed, Session};
use super::topic::{Trie, matches};
use super::{PROP_EMPTY, PROP_QOS, PROP_SECOND_TOPIC, PROP_TOPIC, TAG_MQ2MQTT};
use crate::broker::api::{BrokerApi, MQTT_LOCAL_TOPIC, TagFilter};
use crate::model::StoredMessage;

/// Messages read from a queue per step.
const READ_BATCH: usize = 512;
/// How often the router looks for created and deleted topics.
const TOPIC_SYNC: Duration = Duration::from_secs(1);
/// Most deliveries one session's outbox holds in memory; a session further behind (up to
/// `max_queued`) is fed from the store.
pub const OUTBOX_IN_MEMORY: usize = 10_000;

/// One queue being tailed.
#[derive(Debug)]
struct Tail {
    /// The router's id for it, in [`Lag`]s.
    id: u64,
    /// Every message below this offset has been routed (or skipped while nobody was online).
    routed_upto: AtomicU64,
    cancel: CancellationToken,
    /// Sessions lagging on this queue, fed from the store by the tail's task.
    lagging: Mutex<Vec<Arc<Session>>>,
    /// Notified when a lagging session's outbox has room again.
    room: Arc<Notify>,
}

/// Where the message being routed comes from.
struct At<'a> {
    tail: &'a Arc<Tail>,
    topic: &'a str,
    queue_id: u32,
    offset: u64,
}

#[derive(Default)]
struct RouterState {
    trie: Trie<u64, u8>,
    online: HashMap<u64, Arc<Session>>,
    by_client: HashMap<String, Arc<Session>>,
    tails: HashMap<(String, u32), Arc<Tail>>,
}

/// A range of one queue a reconnecting session must replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatchUp {
    /// Broker topic (or the gateway's own).
    pub topic: String,
    /// Queue id.
    pub queue_id: u32,
    /// First offset to replay.
    pub from: u64,
    /// First offset the live tail delivers.
    pub to: u64,
}

/// The router (one per host).
pub struct Router {
    broker: BrokerApi,
    /// `[mqtt] deny_subscribe`: topics no subscription receives, whatever its filter.
    deny: Vec<String>,
    state: RwLock<RouterState>,
    metrics: Arc<MqttMetrics>,
    max_queued: usize,
    /// What one outbox holds in memory: an eighth of `max_queued`, at most [`OUTBOX_IN_MEMORY`].
    in_memory: usize,
    next_tail: AtomicU64,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Router {
    /// A router over `broker`; call [`Router::start`] to begin tailing.
    pub fn new(
        broker: BrokerApi,
        metrics: Arc<MqttMetrics>,
        max_queued: usize,
        deny: Vec<String>,
    ) -> Arc<Router> {
        Arc::new(Router {
            broker,
            deny,
            state: RwLock::new(RouterState::default()),
            metrics,
            max_queued,
            in_memory: (max_queued / 8).clamp(1, OUTBOX_IN_MEMORY),
            next_tail: AtomicU64::new(1),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
        })
    }

    /// Starts tailing every topic from its end, and watching for new topics.
    pub async fn start(self: &Arc<Self>) {
        self.sync_topics(true).await;
        let me = self.clone();
        self.tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = me.cancel.cancelled() => return,
                    _ = tokio::time::sleep(TOPIC_SYNC) => me.sync_topics(false).await,
                }
            }
        });
    }

    /// Stops every tail.
    pub async fn stop(&self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Starts tails for topics that appeared and stops those of deleted topics. Topics found at
    /// start are tailed from their end; a topic created later from its start, so nothing sent to
    /// it before the tail began is missed.
    pub async fn sync_topics(self: &Arc<Self>, at_start: bool) {
        let mut wanted: Vec<(String, u32)> = self
            .broker
            .list_topics()
            .into_iter()
            .map(|t| (t.name, t.queues))
            .collect();
        wanted.push((
            MQTT_LOCAL_TOPIC.to_owned(),
            self.broker.queue_count(MQTT_LOCAL_TOPIC),
        ));
        let mut keep = std::collections::HashSet::new();
        for (topic, queues) in wanted {
            for q in 0..queues {
                keep.insert((topic.clone(), q));
                if self.state.read().tails.contains_key(&(topic.clone(), q)) {
                    continue;
                }
                let bounds = match self.broker.queue_bounds(&topic, q).await {
                    Ok(b) => b,
                    Err(e) => {
                        warn!(topic = %topic, queue = q, error = %e, "mqtt router cannot read queue bounds; retrying");
                        continue;
                    }
                };
                let start = if at_start || topic == MQTT_LOCAL_TOPIC {
                    bounds.max
                } else {
                    bounds.min
                };
                let tail = Arc::new(Tail {
                    id: self.next_tail.fetch_add(1, Ordering::Relaxed),
                    routed_upto: AtomicU64::new(start),
                    cancel: self.cancel.child_token(),
                    lagging: Mutex::new(Vec::new()),
                    room: Arc::new(Notify::new()),
                });
                self.state
                    .write()
                    .tails
                    .insert((topic.clone(), q), tail.clone());
                let me = self.clone();
                let topic = topic.clone();
                self.tracker
                    .spawn(async move { me.run_tail(topic, q, tail).await });
            }
        }
        let mut st = self.state.write();
        st.tails.retain(|k, t| {
            let live = keep.contains(k);
            if !live {
                t.cancel.cancel();
            }
            live
        });
    }

    async fn run_tail(self: Arc<Self>, topic: String, queue_id: u32, tail: Arc<Tail>) {
        debug!(topic = %topic, queue = queue_id, "mqtt router tails queue");
        self.tail_loop(&topic, queue_id, &tail).await;
        // The queue is gone (or the host stops): nothing more comes from it for anyone.
        let lagging = std::mem::take(&mut *tail.lagging.lock());
        for s in lagging {
            s.end_lag(tail.id);
        }
    }

    async fn tail_loop(&self, topic: &str, queue_id: u32, tail: &Arc<Tail>) {
        let all = TagFilter::All;
        let mut next = tail.routed_upto.load(Ordering::Acquire);
        loop {
            if tail.cancel.is_cancelled() {
                return;
            }
            let mut waiting_for_room = false;
            let nobody = self.state.read().online.is_empty();
            if nobody {
                // Nobody online: skip reading; clean-session=false sessions catch up later
                // from their own positions.
                match self.broker.queue_bounds(topic, queue_id).await {
                    Ok(b) => {
                        let st = self.state.read();
                        if st.online.is_empty() {
                            next = next.max(b.max);
                            tail.routed_upto.store(next, Ordering::Release);
                        } else {
                            continue;
                        }
                    }
                    Err(e) => {
                        warn!(topic = %topic, queue = queue_id, error = %e, "mqtt router cannot read queue bounds");
                    }
                }
            } else {
                match self
                    .broker
                    .read_queue(topic, queue_id, next, READ_BATCH, &all)
                    .await
                {
                    Ok(pull) => {
                        let routed: Vec<(u64, Arc<Routed>)> = pull
                            .messages
                            .iter()
                            .filter_map(|m| {
                                let r = to_routed(m)?;
                                Some((m.queue_offset.unwrap_or(next), Arc::new(r)))
                            })
                            .collect();
                        {
                            let st = self.state.read();
                            for (offset, r) in &routed {
                                let at = At {
                                    tail,
                                    topic,
                                    queue_id,
                                    offset: *offset,
                                };
                                self.route(&st, &at, r);
                            }
                            next = pull.next_offset.max(next);
                            tail.routed_upto.store(next, Ordering::Release);
                        }
                        waiting_for_room = self.feed_lagging(tail, topic, queue_id, next).await;
                        if pull.next_offset < pull.bounds.max {
                            continue;
                        }
                    }
                    Err(e) => {
                        warn!(topic = %topic, queue = queue_id, error = %e, "mqtt router cannot read queue; retrying in 1 s");
                        tokio::select! {
                            _ = tail.cancel.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        continue;
                    }
                }
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            tokio::select! {
                _ = tail.cancel.cancelled() => return,
                _ = self.broker.wait_queue(topic, queue_id, next, deadline) => {}
                _ = tail.room.notified(), if waiting_for_room => {}
            }
        }
    }

    /// Hands each session lagging on this queue what its outbox has room for, from the store,
    /// up to `upto` (where the live stream stands); a session that has caught up goes back to
    /// live delivery. True when some session waits for room, which wakes the tail.
    async fn feed_lagging(&self, tail: &Arc<Tail>, topic: &str, queue_id: u32, upto: u64) -> bool {
        let lagging: Vec<Arc<Session>> = tail.lagging.lock().clone();
        if lagging.is_empty() {
            return false;
        }
        let all = TagFilter::All;
        let low = self.in_memory / 2;
        let mut waiting = false;
        let back_to_live = |s: &Arc<Session>| {
            s.end_lag(tail.id);
            tail.lagging.lock().retain(|x| !Arc::ptr_eq(x, s));
        };
        for s in lagging {
            loop {
                let Some(from) = s.lag_from(tail.id).filter(|_| s.online()) else {
                    back_to_live(&s);
                    break;
                };
                if from >= upto {
                    // Caught up: only this task routes this queue, so the next message of it
                    // goes to the outbox live.
                    back_to_live(&s);
                    debug!(client_id = %s.client_id, topic, queue = queue_id, "mqtt session caught up with the live stream");
                    break;
                }
                if !s.outbox.want_room(low, &tail.room) {
                    waiting = true;
                    break;
                }
                let room = self.in_memory.saturating_sub(s.outbox.len()).max(1);
                let max = READ_BATCH.min(room).min((upto - from) as usize);
                let pull = match self
                    .broker
                    .read_queue(topic, queue_id, from, max, &all)
                    .await
                {
                    Ok(p) => p,
                    Err(e) => {
                        warn!(client_id = %s.client_id, topic, queue = queue_id, error = %e, "mqtt router cannot read a lagging session's messages; retrying in 1 s");
                        tokio::select! {
                            _ = tail.cancel.cancelled() => return false,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        }
                    }
                };
                let to = pull.next_offset.min(upto);
                if to <= from {
                    break;
                }
                let batch = self.deliveries_for(&s, &pull.messages, to);
                // Under the read lock, so a detach (write lock) sees either none of this batch
                // or all of it with the position moved past it.
                let _st = self.state.read();
                if !s.advance_lag(tail.id, from, to, batch.len()) {
                    break;
                }
                if batch.iter().any(|d| d.qos > 0) {
                    s.touch();
                }
                self.metrics
                    .lagged_deliveries
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                s.outbox.push_live_batch(batch);
            }
        }
        waiting
    }

    /// What of `messages` (read from one queue) below offset `to` goes to session `s`, at the
    /// QoS it gets there.
    fn deliveries_for(&self, s: &Session, messages: &[StoredMessage], to: u64) -> Vec<Delivery> {
        let subs = s.subscriptions();
        messages
            .iter()
            .filter(|m| m.queue_offset.is_some_and(|o| o < to))
            .filter_map(|m| {
                let routed = to_routed(m)?;
                let qos = self.qos_for(s, &subs, &routed)?;
                Some(Delivery {
                    msg: Arc::new(routed),
                    qos,
                    retain: false,
                })
            })
            .collect()
    }

    /// The QoS `routed` goes to session `s` at (its subscriptions `subs`), or None when it does
    /// not go there.
    fn qos_for(&self, s: &Session, subs: &[(String, u8)], routed: &Routed) -> Option<u8> {
        match p2p_target(&routed.topic) {
            Some(target) => (target == s.client_id).then_some(routed.qos),
            None if self.denied(&routed.topic) => None,
            None => subs
                .iter()
                .filter(|(f, _)| matches(f, &routed.topic))
                .map(|(_, q)| *q)
                .max()
                .map(|g| g.min(routed.qos)),
        }
    }

    /// Pushes one message to every session it goes to, at the highest QoS granted among the
    /// matching filters ([MQTT-3.3.5-1]), or to its one P2P target.
    fn route(&self, st: &RouterState, at: &At, r: &Arc<Routed>) {
        self.metrics.record_in_router(&r.parent);
        if let Some(target) = p2p_target(&r.topic) {
            if let Some(s) = st.by_client.get(target) {
                self.push(s, at, r, r.qos);
            }
            return;
        }
        if self.denied(&r.topic) {
            return;
        }
        let mut hits: Vec<(u64, u8)> = Vec::new();
        st.trie.for_each_match(&r.topic, |k, q| {
            match hits.iter_mut().find(|(key, _)| key == k) {
                Some(h) => h.1 = h.1.max(*q),
                None => hits.push((*k, *q)),
            }
        });
        for (k, granted) in hits {
            if let Some(s) = st.online.get(&k) {
                self.push(s, at, r, r.qos.min(granted));
            }
        }
    }

    fn push(&self, s: &Arc<Session>, at: &At, r: &Arc<Routed>, qos: u8) {
        if s.lagging.load(Ordering::Acquire) && self.skip_lagging(s, at, qos) {
            return;
        }
        let d = Delivery {
            msg: r.clone(),
            qos,
            retain: false,
        };
        match s.outbox.push(d, self.in_memory) {
            Pushed::Queued => {
                if qos > 0 {
                    s.touch();
                }
            }
            Pushed::Full if self.in_memory < self.max_queued => {
                // Behind, not yet too far: the rest comes from the store as the outbox drains.
                debug!(client_id = %s.client_id, topic = at.topic, queue = at.queue_id, from = at.offset, "mqtt session falls behind the live stream; fed from the store");
                s.begin_lag(Lag {
                    tail: at.tail.id,
                    topic: at.topic.to_owned(),
                    queue_id: at.queue_id,
                    from: at.offset,
                    skipped: 1,
                    qos1: qos > 0,
                });
                let mut lagging = at.tail.lagging.lock();
                if !lagging.iter().any(|x| Arc::ptr_eq(x, s)) {
                    lagging.push(s.clone());
                }
            }
            Pushed::Full if qos == 0 => self.dropped(s, 1),
            Pushed::Full => self.overflow(s),
        }
    }

    /// Counts a message for a session lagging on this queue instead of queueing it; false when
    /// the session does not lag here. Past `max_queued` behind, the QoS 0 messages it lags on
    /// are dropped (this one kept, so the lag restarts at it), or, lagging on QoS 1/2 messages,
    /// the session is disconnected.
    fn skip_lagging(&self, s: &Arc<Session>, at: &At, qos: u8) -> bool {
        let mut lags = s.lags.lock();
        let Some(i) = lags.iter().position(|l| l.tail == at.tail.id) else {
            return false;
        };
        let behind: usize = lags.iter().map(|l| l.skipped).sum::<usize>() + 1;
        let lag = &mut lags[i];
        if behind + s.outbox.len() <= self.max_queued {
            lag.skipped += 1;
            lag.qos1 |= qos > 0;
            return true;
        }
        if lag.qos1 {
            lag.skipped += 1;
            drop(lags);
            self.overflow(s);
            return true;
        }
        let dropped = lag.skipped;
        lag.from = at.offset;
        lag.skipped = 1;
        lag.qos1 = qos > 0;
        drop(lags);
        self.dropped(s, dropped);
        true
    }

    fn dropped(&self, s: &Session, n: usize) {
        s.dropped.fetch_add(n as u64, Ordering::Relaxed);
        self.metrics
            .dropped_qos0
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    fn overflow(&self, s: &Session) {
        self.metrics
            .overflow_disconnects
            .fetch_add(1, Ordering::Relaxed);
        s.kick(&format!(
            "{} messages wait for it (the [mqtt] max_queued cap): the client reads too slowly; its QoS 1/2 messages stay queued in its session",
            self.max_queued
        ));
    }

    /// Makes an online session's subscriptions live. Returns the ranges it must replay (from the
    /// positions a stored session reached; none for a fresh one) and starts holding live
    /// messages back until [`Router::catch_up`] has replayed them.
    pub fn attach(&self, s: &Arc<Session>) -> Vec<CatchUp> {
        let mut st = self.state.write();
        let state = s.state.lock();
        for (filter, qos) in &state.subs {
            st.trie.insert(filter, s.key, *qos);
        }
        let mut ranges = Vec::new();
        for ((topic, q), from) in &state.positions {
            if let Some(t) = st.tails.get(&(topic.clone(), *q)) {
                let to = t.routed_upto.load(Ordering::Acquire);
                if *from < to {
                    ranges.push(CatchUp {
                        topic: topic.clone(),
                        queue_id: *q,
                        from: *from,
                        to,
                    });
                }
            }
        }
        drop(state);
        if !ranges.is_empty() {
            s.outbox.begin_catch_up();
        }
        st.online.insert(s.key, s.clone());
        st.by_client.insert(s.client_id.clone(), s.clone());
        ranges
    }

    /// Takes a session offline: its filters leave the trie, and a stored session remembers
    /// where every queue stood so it can catch up when it returns.
    pub fn detach(&self, s: &Session) {
        let mut st = self.state.write();
        let mut state = s.state.lock();
        for filter in state.subs.keys() {
            st.trie.remove(filter, &s.key);
        }
        st.online.remove(&s.key);
        if st
            .by_client
            .get(&s.client_id)
            .is_some_and(|x| x.key == s.key)
        {
            st.by_client.remove(&s.client_id);
        }
        if s.persistent {
            state.positions = positions_of(&st, s);
        }
        s.end_lags();
    }

    /// Adds (or regrants) one subscription of an online session.
    pub fn subscribe(&self, s: &Session, filter: &str, qos: u8) {
        let mut st = self.state.write();
        if st.online.contains_key(&s.key) {
            st.trie.insert(filter, s.key, qos);
        }
    }

    /// Removes one subscription of an online session.
    pub fn unsubscribe(&self, s: &Session, filter: &str) {
        self.state.write().trie.remove(filter, &s.key);
    }

    /// Runs `f` with every queue's routed position while no tail routes, so what a session has
    /// queued and in flight is consistent with the positions (a session snapshot).
    pub fn with_positions<R>(
        &self,
        s: &Session,
        f: impl FnOnce(&BTreeMap<(String, u32), u64>) -> R,
    ) -> R {
        let st = self.state.write();
        let p = positions_of(&st, s);
        f(&p)
    }

    /// Replays `ranges` into the session's outbox (only messages its filters match, or P2P
    /// messages to it), then releases the live messages held back meanwhile.
    pub fn catch_up(self: &Arc<Self>, s: Arc<Session>, ranges: Vec<CatchUp>) {
        if ranges.is_empty() {
            return;
        }
        let me = self.clone();
        self.tracker.spawn(async move {
            let all = TagFilter::All;
            let mut replayed = 0usize;
            'ranges: for r in &ranges {
                let mut next = r.from;
                while next < r.to {
                    if me.cancel.is_cancelled() || !s.online() {
                        break 'ranges;
                    }
                    // Flow control: the outbox is bounded for live traffic; catch-up waits for
                    // the client to take what it has before reading more.
                    while s.outbox.ready() > me.in_memory / 2 && s.online() && !me.cancel.is_cancelled() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    let max = READ_BATCH.min((r.to - next) as usize);
                    let pull = match me.broker.read_queue(&r.topic, r.queue_id, next, max, &all).await {
                        Ok(p) => p,
                        Err(e) => {
                            warn!(client_id = %s.client_id, topic = %r.topic, error = %e, "mqtt catch-up read failed; retrying in 1 s");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    };
                    if pull.next_offset <= next {
                        break;
                    }
                    let batch = me.deliveries_for(&s, &pull.messages, r.to);
                    replayed += batch.len();
                    s.outbox.push_catch_up(batch);
                    next = pull.next_offset;
                }
            }
            s.outbox.end_catch_up();
            s.touch();
            if replayed > 0 {
                info!(client_id = %s.client_id, replayed, "mqtt session caught up on messages from while it was away");
            }
        });
    }

    /// True when `topic` is kept from every subscription (`[mqtt] deny_subscribe`).
    pub fn denied(&self, topic: &str) -> bool {
        self.deny.iter().any(|d| matches(d, topic))
    }

    /// Online sessions' client ids.
    pub fn online_count(&self) -> usize {
        self.state.read().online.len()
    }
}

/// Every queue's position for session `s`: where the live stream stands, or, on a queue `s`
/// lags on, the first message it has not been handed.
fn positions_of(st: &RouterState, s: &Session) -> BTreeMap<(String, u32), u64> {
    let mut p: BTreeMap<(String, u32), u64> = st
        .tails
        .iter()
        .map(|(k, t)| (k.clone(), t.routed_upto.load(Ordering::Acquire)))
        .collect();
    for l in s.lags.lock().iter() {
        if let Some(at) = p.get_mut(&(l.topic.clone(), l.queue_id)) {
            *at = (*at).min(l.from);
        }
    }
    p
}

/// The P2P target of `Parent/p2p/<clientId>`.
pub fn p2p_target(topic: &str) -> Option<&str> {
    let mut parts = topic.splitn(3, '/');
    let (_, p2p, target) = (parts.next()?, parts.next()?, parts.next()?);
    (p2p == "p2p" && !target.is_empty()).then_some(target)
}

/// The MQTT view of a stored message, or None when it is not for MQTT clients: messages of the
/// gateway's own topic; messages MQTT clients published to a broker topic; broker messages
/// tagged `MQ2MQTT` (sub-topic from `mqttSecondTopic`, QoS from `qoslevel`, else 1).
pub fn to_routed(m: &StoredMessage) -> Option<Routed> {
    let topic = if m.topic == MQTT_LOCAL_TOPIC {
        m.properties.get(PROP_TOPIC)?.clone()
    } else if let Some(second) = m.properties.get(PROP_SECOND_TOPIC) {
        format!("{}{}", m.topic, second)
    } else if m.tag.as_deref() == Some(TAG_MQ2MQTT) {
        m.topic.clone()
    } else {
        return None;
    };
    let qos = m
        .properties
        .get(PROP_QOS)
        .and_then(|q| q.parse::<u8>().ok())
        .map_or(1, |q| q.min(2));
    let payload = if m.properties.contains_key(PROP_EMPTY) {
        Bytes::new()
    } else {
        m.body.clone()
    };
    let position = m.id.position();
    Some(Routed::new(
        topic,
        payload,
        qos,
        Some(position),
        m.topic.clone(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p2p_targets() {
        assert_eq!(p2p_target("T/p2p/GID_a@@@d1"), Some("GID_a@@@d1"));
        assert_eq!(p2p_target("T/p2p/"), None);
        assert_eq!(p2p_target("T/x/GID"), None);
        assert_eq!(p2p_target("T/p2p"), None);
    }
}
