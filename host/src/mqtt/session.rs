//! A client's session: what the router hands it ([`Outbox`]), what it has in flight, and the
//! durable record of a clean-session=false session ([`SessionRecord`]).
//!
//! The router pushes [`Delivery`]s into the outbox and never waits on a client; the connection
//! task pulls from it as its in-flight window allows. A session outlives its connection when the
//! client asked for clean-session=false: subscriptions, in-flight messages (with their packet
//! ids), messages queued for it and the queue positions it had reached are kept in memory and
//! written to the store, so a restart of the host resumes them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use base64::Engine as _;
use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::codec::{self, Packet, Publish};

/// One message on its way to MQTT clients, shared by every session it goes to.
#[derive(Debug)]
pub struct Routed {
    /// Full MQTT topic name.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: u8,
    /// Log position of the stored message (None for retained messages served from memory).
    pub position: Option<u64>,
    /// The broker topic it is stored in (for per-topic rates).
    pub parent: String,
    /// The QoS 0 PUBLISH frame, encoded once for every QoS 0 subscriber.
    qos0_frame: OnceLock<Bytes>,
}

impl Routed {
    /// A routed message.
    pub fn new(
        topic: String,
        payload: Bytes,
        qos: u8,
        position: Option<u64>,
        parent: String,
    ) -> Routed {
        Routed {
            topic,
            payload,
            qos,
            position,
            parent,
            qos0_frame: OnceLock::new(),
        }
    }

    /// The PUBLISH frame for QoS 0 without RETAIN, encoded on first use.
    pub fn qos0_frame(&self) -> Bytes {
        self.qos0_frame
            .get_or_init(|| {
                codec::to_bytes(&Packet::Publish(Publish {
                    dup: false,
                    qos: 0,
                    retain: false,
                    topic: self.topic.clone(),
                    packet_id: None,
                    payload: self.payload.clone(),
                }))
            })
            .clone()
    }
}

/// A message for one session at the QoS it gets there.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message.
    pub msg: Arc<Routed>,
    /// min(published QoS, granted QoS).
    pub qos: u8,
    /// RETAIN flag on the wire (set only for retained messages sent on SUBSCRIBE).
    pub retain: bool,
}

/// What became of a push into an outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// Not queued: as many as the cap allows already wait (the router decides what follows).
    Full,
}

/// Messages waiting for the connection to send them, bounded.
#[derive(Debug, Default)]
pub struct Outbox {
    q: Mutex<OutQ>,
    notify: Notify,
    /// True while some router tail waits for room here (see [`Outbox::want_room`]); read on
    /// every pop, so the common case costs one load.
    room_wanted: AtomicBool,
}

#[derive(Debug, Default)]
struct OutQ {
    items: VecDeque<Delivery>,
    /// While a reconnecting session catches up on what it missed, live messages wait here so
    /// the order per queue holds.
    parked: Option<Vec<Delivery>>,
    /// Tails waiting until no more than this many deliveries wait, with their wake-ups.
    room: Vec<(usize, Arc<Notify>)>,
}

impl OutQ {
    fn waiting(&self) -> usize {
        self.items.len() + self.parked.as_ref().map_or(0, Vec::len)
    }
}

impl Outbox {
    /// Adds a live delivery unless `cap` deliveries already wait.
    pub fn push(&self, d: Delivery, cap: usize) -> Pushed {
        let mut q = self.q.lock();
        if q.waiting() >= cap {
            return Pushed::Full;
        }
        match &mut q.parked {
            Some(p) => p.push(d),
            None => q.items.push_back(d),
        }
        drop(q);
        self.notify.notify_one();
        Pushed::Queued
    }

    /// Adds live deliveries where live ones go (behind a catch-up in progress), uncapped: the
    /// router sizes these batches to the room it saw.
    pub fn push_live_batch(&self, ds: Vec<Delivery>) {
        if ds.is_empty() {
            return;
        }
        let mut q = self.q.lock();
        match &mut q.parked {
            Some(p) => p.extend(ds),
            None => q.items.extend(ds),
        }
        drop(q);
        self.notify.notify_one();
    }

    /// True when at most `low` deliveries wait; otherwise `wake` is notified once they do.
    pub fn want_room(&self, low: usize, wake: &Arc<Notify>) -> bool {
        let mut q = self.q.lock();
        if q.waiting() <= low {
            return true;
        }
        if !q.room.iter().any(|(_, w)| Arc::ptr_eq(w, wake)) {
            q.room.push((low, wake.clone()));
        }
        self.room_wanted.store(true, Ordering::Release);
        false
    }

    /// Adds deliveries ahead of anything live (catch-up, retained messages, restored queue).
    pub fn push_front_batch(&self, ds: Vec<Delivery>) {
        if ds.is_empty() {
            return;
        }
        let mut q = self.q.lock();
        for d in ds.into_iter().rev() {
            q.items.push_front(d);
        }
        drop(q);
        self.notify.notify_one();
    }

    /// Adds catch-up deliveries behind what is queued (still ahead of parked live ones).
    pub fn push_catch_up(&self, ds: Vec<Delivery>) {
        if ds.is_empty() {
            return;
        }
        self.q.lock().items.extend(ds);
        self.notify.notify_one();
    }

    /// Holds live deliveries back until [`Outbox::end_catch_up`].
    pub fn begin_catch_up(&self) {
        self.q.lock().parked.get_or_insert_with(Vec::new);
    }

    /// Releases the live deliveries held during catch-up.
    pub fn end_catch_up(&self) {
        let mut q = self.q.lock();
        if let Some(p) = q.parked.take() {
            q.items.extend(p);
        }
        drop(q);
        self.notify.notify_one();
    }

    /// Takes deliveries while `take` says yes to the next one.
    pub fn pop_while(&self, mut take: impl FnMut(&Delivery) -> bool) -> Vec<Delivery> {
        let mut q = self.q.lock();
        let mut out = Vec::new();
        while let Some(d) = q.items.front() {
            if !take(d) {
                break;
            }
            if let Some(d) = q.items.pop_front() {
                out.push(d);
            }
        }
        if !out.is_empty() && self.room_wanted.load(Ordering::Acquire) {
            let waiting = q.waiting();
            q.room.retain(|(low, wake)| {
                let keep = waiting > *low;
                if !keep {
                    wake.notify_one();
                }
                keep
            });
            self.room_wanted
                .store(!q.room.is_empty(), Ordering::Release);
        }
        out
    }

    /// Everything waiting, in order (parked ones last), leaving the outbox empty.
    pub fn drain(&self) -> Vec<Delivery> {
        let mut q = self.q.lock();
        let mut out: Vec<Delivery> = q.items.drain(..).collect();
        if let Some(p) = q.parked.take() {
            out.extend(p);
        }
        out
    }

    /// A copy of everything waiting, in order, leaving it in place (for session snapshots).
    pub fn snapshot(&self) -> Vec<Delivery> {
        let q = self.q.lock();
        let mut out: Vec<Delivery> = q.items.iter().cloned().collect();
        if let Some(p) = &q.parked {
            out.extend(p.iter().cloned());
        }
        out
    }

    /// Number of deliveries waiting.
    pub fn len(&self) -> usize {
        self.q.lock().waiting()
    }

    /// Number of deliveries ready to send (those held back behind a catch-up not counted).
    pub fn ready(&self) -> usize {
        self.q.lock().items.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves when something was pushed since the last call.
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

/// Where a QoS 2 message to the client stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// PUBREL sent, waiting for PUBCOMP.
    Released,
}

/// A QoS 1/2 message sent to the client and not yet acknowledged.
#[derive(Debug, Clone)]
pub struct Inflight {
    /// What was sent.
    pub delivery: Delivery,
    /// Protocol stage.
    pub stage: Stage,
}

/// The connection a session is attached to.
#[derive(Debug)]
pub struct Attached {
    /// Per-connection id (also presence `channelId`).
    pub channel_id: String,
    /// Peer address.
    pub address: String,
    /// Cancelled to disconnect this connection (takeover, overflow, shutdown).
    pub kick: CancellationToken,
    /// Why it was kicked, for its log line.
    pub kick_reason: Mutex<Option<String>>,
    /// Its cluster-wide hold on the client id, once taken (released when it ends).
    pub claim: Mutex<Option<super::owner::Claim>>,
}

impl Attached {
    /// Disconnects this connection, saying why (the first reason given is kept).
    pub fn kick(&self, reason: &str) {
        self.kick_reason
            .lock()
            .get_or_insert_with(|| reason.to_owned());
        self.kick.cancel();
    }
}

/// Mutable session state.
#[derive(Debug, Default)]
pub struct SessionState {
    /// Topic filter → granted QoS.
    pub subs: BTreeMap<String, u8>,
    /// Outbound packet id → message in flight.
    pub inflight: BTreeMap<u16, Inflight>,
    /// Inbound QoS 2 packet ids received (PUBREC sent, PUBREL not yet seen).
    pub inbound_qos2: BTreeSet<u16>,
    /// Next outbound packet id to try.
    pub next_pid: u16,
    /// (topic, queue) → first offset not yet routed to this session; used on reconnect.
    pub positions: BTreeMap<(String, u32), u64>,
    /// Last CONNECT accepted (ms).
    pub last_connect_ms: u64,
    /// Last disconnect (ms), if any.
    pub last_disconnect_ms: Option<u64>,
    /// Address of the last connection.
    pub last_address: String,
    /// Channel id of the last connection.
    pub last_channel: String,
}

impl SessionState {
    /// A free packet id, or None when all 65,535 are in flight.
    pub fn allocate_pid(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            self.next_pid = self.next_pid.wrapping_add(1);
            if self.next_pid == 0 {
                self.next_pid = 1;
            }
            if !self.inflight.contains_key(&self.next_pid) {
                return Some(self.next_pid);
            }
        }
        None
    }
}

/// A client's session.
#[derive(Debug)]
pub struct Session {
    /// Client identifier.
    pub client_id: String,
    /// Unique per session instance (the router's key).
    pub key: u64,
    /// clean-session=false: kept after disconnect and stored.
    pub persistent: bool,
    /// What waits to be sent.
    pub outbox: Outbox,
    /// Subscriptions, in-flight messages, positions.
    pub state: Mutex<SessionState>,
    /// The connection it is attached to, if online.
    pub attached: Mutex<Option<Arc<Attached>>>,
    /// Changed since last written to the store.
    pub dirty: AtomicBool,
    /// Store version of the record this host last read or wrote (0: none), so a write never
    /// replaces a newer record another host stored meanwhile.
    pub stored_version: AtomicU64,
    /// Held while the session is written, so two writes of it never race each other.
    pub writing: tokio::sync::Mutex<()>,
    /// Messages dropped for this session (QoS 0 past the queue cap).
    pub dropped: AtomicU64,
    /// Queues on which this session fell behind the live stream: what it has not been sent
    /// yet waits in the store, not in memory, and the router feeds it from there.
    pub lags: Mutex<Vec<Lag>>,
    /// True while `lags` is not empty (read for every message routed to the session).
    pub lagging: AtomicBool,
}

/// Where a session stands on one queue it fell behind on.
#[derive(Debug, Clone)]
pub struct Lag {
    /// The router's id of the queue's tail.
    pub tail: u64,
    /// Broker topic of the queue.
    pub topic: String,
    /// Queue id.
    pub queue_id: u32,
    /// First queue offset not yet handed to the session.
    pub from: u64,
    /// Messages for the session among those skipped, not yet handed over.
    pub skipped: usize,
    /// Some of them are QoS 1/2.
    pub qos1: bool,
}

impl Session {
    /// A new, empty session.
    pub fn new(client_id: String, key: u64, persistent: bool) -> Session {
        Session {
            client_id,
            key,
            persistent,
            outbox: Outbox::default(),
            state: Mutex::new(SessionState::default()),
            attached: Mutex::new(None),
            dirty: AtomicBool::new(persistent),
            stored_version: AtomicU64::new(0),
            writing: tokio::sync::Mutex::new(()),
            dropped: AtomicU64::new(0),
            lags: Mutex::new(Vec::new()),
            lagging: AtomicBool::new(false),
        }
    }

    /// Messages waiting for this session in the store, past what its outbox holds.
    pub fn lagged(&self) -> usize {
        if !self.lagging.load(Ordering::Acquire) {
            return 0;
        }
        self.lags.lock().iter().map(|l| l.skipped).sum()
    }

    /// The first offset not yet handed over on the queue of tail `tail`, if it lags there.
    pub fn lag_from(&self, tail: u64) -> Option<u64> {
        self.lags
            .lock()
            .iter()
            .find(|l| l.tail == tail)
            .map(|l| l.from)
    }

    /// Records that `[from, to)` of tail `tail`'s queue was handed over (`delivered` of them
    /// were for this session); false when the lag is no longer where the caller read it.
    pub fn advance_lag(&self, tail: u64, from: u64, to: u64, delivered: usize) -> bool {
        let mut lags = self.lags.lock();
        match lags.iter_mut().find(|l| l.tail == tail && l.from == from) {
            Some(l) => {
                l.from = to;
                l.skipped = l.skipped.saturating_sub(delivered);
                true
            }
            None => false,
        }
    }

    /// Fed from the store on `lag`'s queue from now on.
    pub fn begin_lag(&self, lag: Lag) {
        self.lags.lock().push(lag);
        self.lagging.store(true, Ordering::Release);
    }

    /// Back to live delivery on tail `tail`'s queue.
    pub fn end_lag(&self, tail: u64) {
        let mut lags = self.lags.lock();
        lags.retain(|l| l.tail != tail);
        self.lagging.store(!lags.is_empty(), Ordering::Release);
    }

    /// Forgets every lag (the session went offline; its positions already took them in).
    pub fn end_lags(&self) {
        self.lags.lock().clear();
        self.lagging.store(false, Ordering::Release);
    }

    /// Its subscriptions with their granted QoS.
    pub fn subscriptions(&self) -> Vec<(String, u8)> {
        self.state
            .lock()
            .subs
            .iter()
            .map(|(f, q)| (f.clone(), *q))
            .collect()
    }

    /// True while a connection is attached.
    pub fn online(&self) -> bool {
        self.attached.lock().is_some()
    }

    /// Marks the session as needing a write to the store.
    pub fn touch(&self) {
        if self.persistent {
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Disconnects the attached connection, if any, saying why.
    pub fn kick(&self, reason: &str) {
        if let Some(a) = self.attached.lock().as_ref() {
            a.kick(reason);
        }
    }
}

/// A message reference in a stored session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageRef {
    /// Full MQTT topic.
    pub topic: String,
    /// QoS on the wire to this client.
    pub qos: u8,
    /// Published QoS.
    pub pub_qos: u8,
    /// RETAIN flag on the wire.
    #[serde(default)]
    pub retain: bool,
    /// Broker topic the message is stored in.
    pub parent: String,
    /// Log position; the payload is read back from the log.
    pub position: Option<u64>,
    /// Base64 payload when there is no log position (retained messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_b64: Option<String>,
}

impl MessageRef {
    /// The reference for a delivery.
    pub fn of(d: &Delivery) -> MessageRef {
        MessageRef {
            topic: d.msg.topic.clone(),
            qos: d.qos,
            pub_qos: d.msg.qos,
            retain: d.retain,
            parent: d.msg.parent.clone(),
            position: d.msg.position,
            payload_b64: d
                .msg
                .position
                .is_none()
                .then(|| base64::engine::general_purpose::STANDARD.encode(&d.msg.payload)),
        }
    }

    /// The delivery back, given the payload read from the log (or kept inline).
    pub fn delivery(&self, payload: Bytes) -> Delivery {
        Delivery {
            msg: Arc::new(Routed::new(
                self.topic.clone(),
                payload,
                self.pub_qos,
                self.position,
                self.parent.clone(),
            )),
            qos: self.qos,
            retain: self.retain,
        }
    }

    /// The inline payload, if any.
    pub fn inline_payload(&self) -> Option<Bytes> {
        let b = self.payload_b64.as_ref()?;
        base64::engine::general_purpose::STANDARD
            .decode(b)
            .ok()
            .map(Bytes::from)
    }
}

/// An in-flight message in a stored session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InflightRecord {
    /// Packet id it was sent with.
    pub pid: u16,
    /// Stage.
    pub stage: Stage,
    /// The message.
    pub message: MessageRef,
}

/// The stored form of a clean-session=false session (JSON in the store's MQTT session space).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionRecord {
    /// Record format version.
    pub v: u32,
    /// Client identifier.
    pub client_id: String,
    /// (filter, granted QoS).
    pub subs: Vec<(String, u8)>,
    /// In flight to the client.
    pub inflight: Vec<InflightRecord>,
    /// Waiting to be sent.
    pub queued: Vec<MessageRef>,
    /// Inbound QoS 2 ids awaiting PUBREL.
    pub inbound_qos2: Vec<u16>,
    /// (topic, queue, next offset) reached.
    pub positions: Vec<(String, u32, u64)>,
    /// Next packet id.
    pub next_pid: u16,
    /// Last connect (ms).
    pub last_connect_ms: u64,
    /// Last disconnect (ms).
    pub last_disconnect_ms: Option<u64>,
    /// Last address.
    pub last_address: String,
    /// Channel id of the last connection (empty in records older than multi-host takeover).
    #[serde(default)]
    pub channel: String,
    /// Written when that connection ended (a host taking the client id over waits for the
    /// connection's takeover notice to go instead, which comes after this write).
    #[serde(default)]
    pub released: bool,
}

/// What the store holds for a client id whose stored session a clean-session connect ended.
/// It is written rather than the record deleted, so the record's version keeps growing: a
/// host holding a copy from before can never match a later session's version by chance.
pub const CLEARED: &[u8] = b"{\"cleared\":true}";

impl SessionRecord {
    /// The stored session in `raw`, or None when it holds [`CLEARED`].
    pub fn decode_stored(raw: &[u8]) -> Result<Option<SessionRecord>, serde_json::Error> {
        if Self::is_cleared(raw) {
            return Ok(None);
        }
        Self::decode(raw).map(Some)
    }

    /// True when `raw` is [`CLEARED`].
    pub fn is_cleared(raw: &[u8]) -> bool {
        raw == CLEARED
    }

    /// JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a stored record.
    pub fn decode(raw: &[u8]) -> Result<SessionRecord, serde_json::Error> {
        serde_json::from_slice(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(qos: u8) -> Delivery {
        Delivery {
            msg: Arc::new(Routed::new(
                "a/b".into(),
                Bytes::from_static(b"x"),
                qos,
                Some(7),
                "a".into(),
            )),
            qos,
            retain: false,
        }
    }

    #[test]
    fn a_cleared_session_reads_as_none_and_a_record_as_itself() {
        assert_eq!(SessionRecord::decode_stored(CLEARED).unwrap(), None);
        let r = SessionRecord {
            v: 1,
            client_id: "c".into(),
            ..Default::default()
        };
        assert_eq!(SessionRecord::decode_stored(&r.encode()).unwrap(), Some(r));
        assert!(SessionRecord::decode_stored(b"{").is_err());
    }

    #[test]
    fn outbox_refuses_past_its_cap() {
        let o = Outbox::default();
        assert_eq!(o.push(d(0), 2), Pushed::Queued);
        assert_eq!(o.push(d(1), 2), Pushed::Queued);
        assert_eq!(o.push(d(0), 2), Pushed::Full);
        assert_eq!(o.push(d(1), 2), Pushed::Full);
        assert_eq!(o.len(), 2);
    }

    #[test]
    fn a_tail_waiting_for_room_is_woken_once_enough_was_taken() {
        let o = Outbox::default();
        for _ in 0..4 {
            o.push(d(0), 10);
        }
        let wake = Arc::new(Notify::new());
        assert!(!o.want_room(2, &wake));
        assert_eq!(o.pop_while(|_| true).len(), 4);
        // The wake-up was stored as a permit: a waiter that comes later still sees it.
        assert!(futures_util::FutureExt::now_or_never(wake.notified()).is_some());
        assert!(o.want_room(2, &wake));
    }

    #[test]
    fn catch_up_goes_before_parked_live_deliveries() {
        let o = Outbox::default();
        o.begin_catch_up();
        let mut live = d(1);
        live.retain = true; // marks it
        o.push(live, 10);
        o.push_catch_up(vec![d(1), d(1)]);
        assert_eq!(o.len(), 3);
        o.end_catch_up();
        let all = o.pop_while(|_| true);
        assert_eq!(
            all.iter().map(|d| d.retain).collect::<Vec<_>>(),
            [false, false, true]
        );
    }

    #[test]
    fn packet_ids_skip_zero_and_in_flight_ones() {
        let mut s = SessionState {
            next_pid: u16::MAX - 1,
            ..Default::default()
        };
        s.inflight.insert(
            u16::MAX,
            Inflight {
                delivery: d(1),
                stage: Stage::Published,
            },
        );
        assert_eq!(s.allocate_pid(), Some(1));
    }

    #[test]
    fn records_round_trip() {
        let r = SessionRecord {
            v: 1,
            client_id: "c".into(),
            subs: vec![("a/#".into(), 1)],
            inflight: vec![InflightRecord {
                pid: 3,
                stage: Stage::Released,
                message: MessageRef::of(&d(2)),
            }],
            queued: vec![MessageRef::of(&d(1))],
            inbound_qos2: vec![9],
            positions: vec![("a".into(), 0, 12)],
            next_pid: 3,
            ..Default::default()
        };
        assert_eq!(SessionRecord::decode(&r.encode()).unwrap(), r);
    }
}
