//! One MQTT connection: CONNECT and admission, then the session loop until the client goes.
//!
//! The loop owns the protocol state that is per connection (keep-alive, the order of replies,
//! inbound QoS 2 ids in progress) and drives the session's outbox through the in-flight window.
//! Replies run through one ordered queue of futures, so PUBACKs leave in the order the PUBLISHes
//! came in [MQTT-4.6.0-2] while stores of consecutive publishes proceed together; a QoS 1/2
//! PUBLISH is acknowledged only once the broker has stored it durably. Writes go through a
//! separate task so a client that stops reading never blocks reading its acknowledgements.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::codec::{
    self, AckKind, ConnAck, Connect, ConnectCode, DecodeError, Packet, Publish, SUBACK_FAILURE,
    SubAck, Will,
};
use super::presence::EventType;
use super::session::{Attached, Delivery, Inflight, Session, Stage};
use super::topic::{check_filter, check_topic_name, first_level};
use super::{
    Inner, PROP_CLIENT_ID, PROP_EMPTY, PROP_QOS, PROP_SECOND_TOPIC, PROP_TOPIC, session_span,
};
use crate::broker::api::{OutgoingMessage, QueueChoice};
use crate::config::MqttMode;
use crate::http::auth::Principal;

use super::transport::{Reader, Writer};

/// Replies waiting for their turn at most; past it the loop stops reading the socket.
const MAX_PENDING_REPLIES: usize = 256;
/// Deliveries encoded per outbox pump.
const PUMP_BATCH: usize = 512;
/// Bytes encoded per outbox pump (about).
const PUMP_BYTES: usize = 128 * 1024;
/// Writer queue depth (chunks of packets): with [`PUMP_BYTES`], at most ~1 MiB per connection
/// waits for its socket.
const WRITE_QUEUE: usize = 8;
/// How long a closing connection's writer may take to flush.
const WRITER_DRAIN: Duration = Duration::from_secs(2);

/// What a reply future yields: packets to write, then deliveries to queue after them (retained
/// messages follow their SUBACK).
#[derive(Default)]
struct Reply {
    packets: Vec<Packet>,
    then: Vec<Delivery>,
    /// Inbound QoS 2 ids whose store finished (now in the session's `inbound_qos2`).
    qos2_done: Vec<u16>,
}

/// Consecutive publishes to one destination, stored with one send.
struct Batch {
    dest: Dest,
    items: Vec<Publish>,
}

type ReplyFuture = BoxFuture<'static, Result<Reply, String>>;

/// Where a published topic is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Dest {
    /// A broker topic (the MQTT topic's first level).
    Broker(String),
    /// The gateway's own topic (open mode, first level is no broker topic).
    Local,
}

/// How the session loop ended.
enum End {
    /// The client sent DISCONNECT: no will.
    Disconnect,
    /// The connection went away or was closed by us: the will is published.
    Lost(String),
    /// The host is stopping.
    Shutdown,
}

/// Serves one connection from its first byte to its close.
pub(super) async fn run<R: Reader, W: Writer>(
    gw: Arc<Inner>,
    mut reader: R,
    writer: W,
    peer: SocketAddr,
    shutdown: CancellationToken,
    transport: &'static str,
) {
    gw.metrics.connections_total.fetch_add(1, Ordering::Relaxed);
    gw.metrics.connections_open.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
    let metrics = gw.metrics.clone();
    let writer_task = tokio::spawn(write_loop(writer, rx, metrics));
    // The reader sizes the buffer to the traffic; an idle client keeps little.
    let mut buf = BytesMut::new();
    // Boxed, so the connection's future keeps no room for this one-off read once it is done.
    let first = Box::pin(read_connect(
        &gw,
        &mut reader,
        &mut buf,
        &tx,
        peer,
        &shutdown,
        transport,
    ))
    .await;
    if let Some(c) = first {
        connected(&gw, c, reader, buf, &tx, peer, shutdown, transport).await;
    }
    drop(tx);
    let mut writer_task = writer_task;
    if tokio::time::timeout(WRITER_DRAIN, &mut writer_task)
        .await
        .is_err()
    {
        writer_task.abort();
    }
    gw.metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
}

/// Reads the first packet, within the CONNECT timeout; `None` (answered or logged) unless it
/// is a CONNECT.
async fn read_connect<R: Reader>(
    gw: &Inner,
    reader: &mut R,
    buf: &mut BytesMut,
    tx: &mpsc::Sender<Bytes>,
    peer: SocketAddr,
    shutdown: &CancellationToken,
    transport: &'static str,
) -> Option<Connect> {
    let connect_timeout = Duration::from_millis(gw.config.connect_timeout_ms);
    let first = tokio::select! {
        _ = shutdown.cancelled() => None,
        r = tokio::time::timeout(connect_timeout, read_packet(reader, buf, gw.config.max_packet_bytes)) => match r {
            Err(_) => {
                info!(%peer, transport, timeout_ms = gw.config.connect_timeout_ms, "no CONNECT in time; closing");
                None
            }
            Ok(Ok(Some(p))) => Some(p),
            Ok(Ok(None)) => None,
            Ok(Err(DecodeError::UnsupportedProtocol { name, level })) => {
                info!(%peer, transport, protocol = %name, level, "unsupported protocol; answering CONNACK 1");
                send_packet(tx, gw, &Packet::ConnAck(ConnAck { session_present: false, code: ConnectCode::UnacceptableProtocol })).await;
                gw.metrics.connect_refused.fetch_add(1, Ordering::Relaxed);
                None
            }
            Ok(Err(e)) => {
                gw.metrics.protocol_errors.fetch_add(1, Ordering::Relaxed);
                info!(%peer, transport, error = %e, "bad first packet; closing");
                None
            }
        },
    }?;
    gw.metrics.packet_in(first.name());
    match first {
        Packet::Connect(c) => Some(c),
        other => {
            gw.metrics.protocol_errors.fetch_add(1, Ordering::Relaxed);
            info!(%peer, transport, packet = other.name(), "first packet is not CONNECT [MQTT-3.1.0-1]; closing");
            None
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn connected<R: Reader>(
    gw: &Arc<Inner>,
    c: Connect,
    reader: R,
    buf: BytesMut,
    tx: &mpsc::Sender<Bytes>,
    peer: SocketAddr,
    shutdown: CancellationToken,
    transport: &'static str,
) {
    let admitted = match gw.admit(&c) {
        Ok(a) => a,
        Err((code, why)) => {
            info!(%peer, transport, client_id = %c.client_id, code = code as u8, reason = %why, "CONNECT refused");
            gw.metrics.connect_refused.fetch_add(1, Ordering::Relaxed);
            send_packet(
                tx,
                gw,
                &Packet::ConnAck(ConnAck {
                    session_present: false,
                    code,
                }),
            )
            .await;
            return;
        }
    };
    let span = session_span(&admitted.client_id, transport, peer);
    async move {
        let attached = Arc::new(Attached {
            channel_id: gw.next_channel_id(),
            address: peer.to_string(),
            kick: CancellationToken::new(),
            kick_reason: Default::default(),
            claim: Default::default(),
        });
        let (session, present) =
            Box::pin(gw.attach(&admitted.client_id, c.clean_session, attached.clone())).await;
        send_packet(
            tx,
            gw,
            &Packet::ConnAck(ConnAck {
                session_present: present,
                code: ConnectCode::Accepted,
            }),
        )
        .await;
        info!(
            clean_session = c.clean_session,
            session_present = present,
            keep_alive = c.keep_alive,
            "connected"
        );
        let ranges = gw.router.attach(&session);
        gw.router.catch_up(session.clone(), ranges);
        Box::pin(
            gw.presence
                .event(&session.client_id, EventType::Connect, &attached.channel_id),
        )
        .await;

        let mut conn = Conn {
            gw: gw.clone(),
            session: session.clone(),
            principal: admitted.principal,
            tx: tx.clone(),
            stalled: None,
            pending: FuturesOrdered::new(),
            qos2_in_progress: HashSet::new(),
            keep_alive: (c.keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(c.keep_alive) * 1500)),
            batch: None,
            retained_turn: None,
        };
        if present {
            conn.resend_inflight();
        }
        let end = conn.run(reader, buf, &attached, &shutdown).await;
        if matches!(end, End::Disconnect | End::Lost(_)) {
            // Publishes read before the end are stored (and QoS 2 ids recorded) before the
            // session is let go; a QoS 0 message followed at once by DISCONNECT is not lost.
            Box::pin(conn.finish()).await;
        }
        let (kind, publish_will) = match &end {
            End::Disconnect => {
                info!("client disconnected");
                (EventType::Disconnect, false)
            }
            End::Lost(why) => {
                info!(reason = %why, "connection closed");
                (EventType::TcpClean, true)
            }
            End::Shutdown => {
                info!("host stopping; connection closed");
                (EventType::TcpClean, false)
            }
        };
        // Outstanding replies are dropped with the connection; their stores may still finish,
        // and an unacknowledged QoS 1/2 message is retransmitted by the client.
        drop(conn);
        // The event is stored before the session is let go: a connection taking the client id
        // over on another host waits for that (the takeover notice forgotten in `detach`), so
        // its connect event comes after.
        Box::pin(
            gw.presence
                .event(&session.client_id, kind, &attached.channel_id),
        )
        .await;
        Box::pin(gw.detach(&session)).await;
        if publish_will && let Some(w) = c.will {
            Box::pin(publish_will_message(gw, &session.client_id, w)).await;
        }
    }
    .instrument(span)
    .await
}

async fn publish_will_message(gw: &Arc<Inner>, client_id: &str, w: Will) {
    let p = Publish {
        dup: false,
        qos: w.qos,
        retain: w.retain,
        topic: w.topic,
        packet_id: None,
        payload: w.payload,
    };
    let dest = match destination(gw, &p.topic) {
        Ok(d) => d,
        Err(why) => {
            warn!(topic = %p.topic, reason = %why, "will message not published");
            return;
        }
    };
    let msg = outgoing(&p, &dest, client_id);
    let stored = match &dest {
        Dest::Broker(t) => gw.broker.send(t, vec![msg]).await,
        Dest::Local => gw.broker.send_mqtt_local(vec![msg]).await,
    };
    match stored {
        Ok(_) => {
            if p.retain {
                let parent = parent_name(&dest);
                if let Err(e) = gw
                    .retained
                    .set(&gw.broker, &p.topic, p.qos, p.payload.clone(), &parent)
                    .await
                {
                    warn!(topic = %p.topic, error = %e, "cannot store the retained will message");
                }
            }
            info!(topic = %p.topic, qos = p.qos, "will message published");
        }
        Err(e) => warn!(topic = %p.topic, error = %e, "cannot store the will message"),
    }
}

fn parent_name(dest: &Dest) -> String {
    match dest {
        Dest::Broker(t) => t.clone(),
        Dest::Local => crate::broker::api::MQTT_LOCAL_TOPIC.to_owned(),
    }
}

/// Where a publish to `topic` is stored: the broker topic named by its first level, else (open
/// mode) the gateway's own topic; strict mode refuses topics outside broker topics.
fn destination(gw: &Inner, topic: &str) -> Result<Dest, String> {
    let parent = first_level(topic);
    if !parent.is_empty() && gw.broker.topic(parent).is_ok() {
        return Ok(Dest::Broker(parent.to_owned()));
    }
    match gw.mode {
        MqttMode::Open => Ok(Dest::Local),
        MqttMode::Strict => Err(format!(
            "topic '{topic}': its first level '{parent}' is not a broker topic; create topic '{parent}' first (strict mode)"
        )),
    }
}

/// The broker message for an MQTT publish: the sub-topic (or whole topic) and QoS as properties,
/// the payload as body (an empty payload as one placeholder byte, marked).
fn outgoing(p: &Publish, dest: &Dest, client_id: &str) -> OutgoingMessage {
    let mut m = OutgoingMessage {
        queue: QueueChoice::ShardingKey(p.topic.clone()),
        ..Default::default()
    };
    match dest {
        Dest::Broker(parent) => {
            m.properties.insert(
                PROP_SECOND_TOPIC.to_owned(),
                p.topic[parent.len()..].to_owned(),
            );
        }
        Dest::Local => {
            m.properties.insert(PROP_TOPIC.to_owned(), p.topic.clone());
        }
    }
    m.properties.insert(PROP_QOS.to_owned(), p.qos.to_string());
    m.properties
        .insert(PROP_CLIENT_ID.to_owned(), client_id.to_owned());
    if p.payload.is_empty() {
        m.properties.insert(PROP_EMPTY.to_owned(), "1".to_owned());
        m.body = Bytes::from_static(b"\0");
    } else {
        m.body = p.payload.clone();
    }
    m
}

/// Reads until one whole packet is in `buf` and decodes it; `Ok(None)` at end of stream.
async fn read_packet<R: Reader>(
    reader: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Packet>, DecodeError> {
    loop {
        if let Some(n) = codec::frame(buf, max)? {
            return codec::decode(buf.split_to(n).freeze()).map(Some);
        }
        match reader.read(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

async fn send_packet(tx: &mpsc::Sender<Bytes>, gw: &Inner, p: &Packet) {
    gw.metrics.packets_out(p.name(), 1);
    let _ = Box::pin(tx.send(codec::to_bytes(p))).await;
}

async fn write_loop<W: Writer>(
    mut w: W,
    mut rx: mpsc::Receiver<Bytes>,
    metrics: Arc<super::MqttMetrics>,
) {
    while let Some(first) = rx.recv().await {
        let mut chunk = first;
        if !rx.is_empty() {
            let mut b = BytesMut::from(&chunk[..]);
            while b.len() < 256 * 1024 {
                match rx.try_recv() {
                    Ok(more) => b.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            chunk = b.freeze();
        }
        metrics
            .bytes_out
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        if w.write(chunk).await.is_err() {
            break;
        }
    }
    w.close().await;
}

enum Event {
    Read(std::io::Result<usize>),
    Reply(Result<Reply, String>),
    Outbox,
    Writable,
    KeepAlive,
    Kick,
    Shutdown,
}

struct Conn {
    gw: Arc<Inner>,
    session: Arc<Session>,
    principal: Arc<Principal>,
    tx: mpsc::Sender<Bytes>,
    /// A chunk the writer queue had no room for; nothing more is pumped until it is written.
    stalled: Option<Bytes>,
    pending: FuturesOrdered<ReplyFuture>,
    /// Inbound QoS 2 ids whose store is still running.
    qos2_in_progress: HashSet<u16>,
    keep_alive: Option<Duration>,
    batch: Option<Batch>,
    /// Fires when the last batch holding RETAIN publishes has set them: batches store
    /// concurrently, and the retained message of a topic must be the one published last.
    retained_turn: Option<oneshot::Receiver<()>>,
}

impl Conn {
    /// Starts storing the publishes gathered so far; their acknowledgements follow once stored.
    fn flush_batch(&mut self) {
        let Some(b) = self.batch.take() else { return };
        let gw = self.gw.clone();
        let session = self.session.clone();
        let msgs: Vec<OutgoingMessage> = b
            .items
            .iter()
            .map(|p| outgoing(p, &b.dest, &session.client_id))
            .collect();
        let parent = parent_name(&b.dest);
        let turn = if b.items.iter().any(|p| p.retain) {
            let (done, next) = oneshot::channel();
            Some((self.retained_turn.replace(next), done))
        } else {
            None
        };
        self.pending.push_back(Box::pin(async move {
            let n = msgs.len() as u64;
            let reliable = b.items.iter().any(|p| p.qos > 0);
            let stored = match &b.dest {
                Dest::Broker(t) => gw.broker.send(t, msgs).await,
                Dest::Local => gw.broker.send_mqtt_local(msgs).await,
            };
            // Dropped (firing the next batch's turn) when this future ends, however it ends.
            let _my_turn = match turn {
                Some((Some(earlier), done)) => {
                    // Its sender is only ever dropped: an error is the signal that it is done.
                    let _ = earlier.await;
                    Some(done)
                }
                Some((None, done)) => Some(done),
                None => None,
            };
            if let Err(e) = stored {
                if reliable {
                    return Err(format!(
                        "cannot store PUBLISH ({} {}: {}); closing so the client sends it again",
                        e.code.code(),
                        e.code.name(),
                        e.message
                    ));
                }
                warn!(error = %e, count = n, "QoS 0 PUBLISH not stored");
                return Ok(Reply::default());
            }
            gw.metrics.record_published(&parent, n);
            let mut reply = Reply::default();
            for p in &b.items {
                if p.retain
                    && let Err(e) = gw
                        .retained
                        .set(&gw.broker, &p.topic, p.qos, p.payload.clone(), &parent)
                        .await
                {
                    warn!(topic = %p.topic, error = %e, "cannot store the retained message");
                }
                match (p.qos, p.packet_id) {
                    (1, Some(id)) => reply.packets.push(Packet::Ack(AckKind::PubAck, id)),
                    (2, Some(id)) => {
                        session.state.lock().inbound_qos2.insert(id);
                        reply.qos2_done.push(id);
                        reply.packets.push(Packet::Ack(AckKind::PubRec, id));
                    }
                    _ => {}
                }
            }
            if !reply.qos2_done.is_empty() && session.persistent {
                // The id must survive a restart before PUBREC goes out, or a retransmission
                // after a crash would be stored twice.
                session.touch();
                gw.persist(&session).await;
            }
            Ok(reply)
        }));
    }

    async fn run<R: Reader>(
        &mut self,
        mut reader: R,
        mut buf: BytesMut,
        attached: &Attached,
        shutdown: &CancellationToken,
    ) -> End {
        let mut deadline = self.keep_alive.map(|k| Instant::now() + k);
        self.pump();
        loop {
            let can_read = self.pending.len() < MAX_PENDING_REPLIES;
            let ev = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Event::Shutdown,
                _ = attached.kick.cancelled() => Event::Kick,
                Some(r) = self.pending.next(), if !self.pending.is_empty() => Event::Reply(r),
                r = self.tx.reserve(), if self.stalled.is_some() => match r {
                    Ok(_) => Event::Writable,
                    Err(_) => return End::Lost("the connection's writer stopped (socket error)".into()),
                },
                r = reader.read(&mut buf), if can_read => Event::Read(r),
                _ = self.session.outbox.notified(), if self.stalled.is_none() => Event::Outbox,
                _ = sleep_until(deadline), if deadline.is_some() => Event::KeepAlive,
            };
            match ev {
                Event::Shutdown => return End::Shutdown,
                Event::Kick => {
                    let why = attached
                        .kick_reason
                        .lock()
                        .clone()
                        .unwrap_or_else(|| "disconnected by the host".into());
                    return End::Lost(why);
                }
                Event::KeepAlive => {
                    return End::Lost(format!(
                        "no packet for 1.5 × keep-alive ({} ms) [MQTT-3.1.2-24]",
                        self.keep_alive.map_or(0, |k| k.as_millis())
                    ));
                }
                Event::Reply(Ok(reply)) => {
                    for id in &reply.qos2_done {
                        self.qos2_in_progress.remove(id);
                    }
                    let mut out = BytesMut::new();
                    for p in &reply.packets {
                        self.gw.metrics.packets_out(p.name(), 1);
                        codec::encode(p, &mut out);
                    }
                    self.write(out.freeze());
                    if !reply.then.is_empty() {
                        self.session.outbox.push_catch_up(reply.then);
                    }
                }
                Event::Reply(Err(why)) => return End::Lost(why),
                Event::Writable => {
                    if let Some(chunk) = self.stalled.take() {
                        self.write(chunk);
                    }
                }
                Event::Outbox => {}
                Event::Read(Ok(0)) => {
                    return End::Lost("the client closed the connection without DISCONNECT".into());
                }
                Event::Read(Err(e)) => return End::Lost(format!("read error: {e}")),
                Event::Read(Ok(n)) => {
                    self.gw
                        .metrics
                        .bytes_in
                        .fetch_add(n as u64, Ordering::Relaxed);
                    deadline = self.keep_alive.map(|k| Instant::now() + k);
                    loop {
                        let frame = match codec::frame(&buf, self.gw.config.max_packet_bytes) {
                            Ok(Some(n)) => buf.split_to(n).freeze(),
                            Ok(None) => break,
                            Err(e) => {
                                self.gw
                                    .metrics
                                    .protocol_errors
                                    .fetch_add(1, Ordering::Relaxed);
                                return End::Lost(format!("{e}; closing"));
                            }
                        };
                        let packet = match codec::decode(frame) {
                            Ok(p) => p,
                            Err(e) => {
                                self.gw
                                    .metrics
                                    .protocol_errors
                                    .fetch_add(1, Ordering::Relaxed);
                                return End::Lost(format!("{e}; closing"));
                            }
                        };
                        self.gw.metrics.packet_in(packet.name());
                        if let Some(end) = self.handle(packet) {
                            return end;
                        }
                    }
                    self.flush_batch();
                }
            }
            self.pump();
        }
    }

    /// Stores what was read but not yet stored and waits (bounded) for every reply in progress.
    async fn finish(&mut self) {
        self.flush_batch();
        let drain = async {
            while let Some(r) = self.pending.next().await {
                if r.is_err() {
                    break;
                }
            }
        };
        if tokio::time::timeout(WRITER_DRAIN, drain).await.is_err() {
            warn!(
                "stores of the last publishes did not finish in time; the client retransmits QoS 1/2 ones"
            );
        }
    }

    /// Queues a chunk for the writer, or holds it when the writer is behind.
    fn write(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        if let Some(s) = self.stalled.take() {
            let mut b = BytesMut::from(&s[..]);
            b.extend_from_slice(&chunk);
            self.stalled = Some(b.freeze());
            return;
        }
        match self.tx.try_send(chunk) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(c)) => self.stalled = Some(c),
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Sends what the outbox holds, QoS 1/2 messages only while the in-flight window has room.
    fn pump(&mut self) {
        loop {
            if self.stalled.is_some() {
                return;
            }
            let room = {
                let st = self.session.state.lock();
                self.gw
                    .config
                    .max_inflight
                    .saturating_sub(st.inflight.len())
            };
            let mut qos_taken = 0usize;
            let mut total = 0usize;
            let mut bytes = 0usize;
            let ds = self.session.outbox.pop_while(|d| {
                // Bounded in count and bytes: what waits for the socket stays small, and the
                // rest waits in the outbox, where the per-session cap applies.
                if total >= PUMP_BATCH || bytes >= PUMP_BYTES {
                    return false;
                }
                bytes += d.msg.payload.len() + d.msg.topic.len() + 8;
                if d.qos > 0 {
                    if qos_taken >= room {
                        return false;
                    }
                    qos_taken += 1;
                }
                total += 1;
                true
            });
            if ds.is_empty() {
                return;
            }
            let n = ds.len();
            let mut out = BytesMut::new();
            let mut run: Option<(String, u64)> = None;
            {
                let mut st = self.session.state.lock();
                for d in ds {
                    match &mut run {
                        Some((p, c)) if *p == d.msg.parent => *c += 1,
                        _ => {
                            if let Some((p, c)) = run.take() {
                                self.gw.metrics.record_delivered(&p, c);
                            }
                            run = Some((d.msg.parent.clone(), 1));
                        }
                    }
                    if d.qos == 0 && !d.retain {
                        out.extend_from_slice(&d.msg.qos0_frame());
                        continue;
                    }
                    let packet_id = if d.qos > 0 {
                        match st.allocate_pid() {
                            Some(id) => Some(id),
                            None => continue,
                        }
                    } else {
                        None
                    };
                    codec::encode(
                        &Packet::Publish(Publish {
                            dup: false,
                            qos: d.qos,
                            retain: d.retain,
                            topic: d.msg.topic.clone(),
                            packet_id,
                            payload: d.msg.payload.clone(),
                        }),
                        &mut out,
                    );
                    if let Some(id) = packet_id {
                        st.inflight.insert(
                            id,
                            Inflight {
                                delivery: d,
                                stage: Stage::Published,
                            },
                        );
                    }
                }
            }
            if let Some((p, c)) = run {
                self.gw.metrics.record_delivered(&p, c);
            }
            self.gw.metrics.packets_out("PUBLISH", n as u64);
            self.session.touch();
            self.write(out.freeze());
        }
    }

    /// Re-sends what was in flight when the session's last connection ended: PUBLISH with DUP,
    /// or PUBREL for QoS 2 messages already received [MQTT-4.4.0-1].
    fn resend_inflight(&mut self) {
        let mut out = BytesMut::new();
        let mut n = 0;
        {
            let st = self.session.state.lock();
            for (id, i) in &st.inflight {
                n += 1;
                let p = match i.stage {
                    Stage::Published => Packet::Publish(Publish {
                        dup: true,
                        qos: i.delivery.qos,
                        retain: i.delivery.retain,
                        topic: i.delivery.msg.topic.clone(),
                        packet_id: Some(*id),
                        payload: i.delivery.msg.payload.clone(),
                    }),
                    Stage::Released => Packet::Ack(AckKind::PubRel, *id),
                };
                self.gw.metrics.packets_out(p.name(), 1);
                codec::encode(&p, &mut out);
            }
        }
        if n > 0 {
            debug!(count = n, "re-sent in-flight messages after reconnect");
        }
        self.write(out.freeze());
    }

    fn reply_now(&mut self, packets: Vec<Packet>) {
        self.flush_batch();
        self.pending.push_back(Box::pin(async move {
            Ok(Reply {
                packets,
                ..Default::default()
            })
        }));
    }

    /// Handles one packet; `Some` ends the connection.
    fn handle(&mut self, packet: Packet) -> Option<End> {
        match packet {
            Packet::Publish(p) => return self.publish(p),
            Packet::Ack(AckKind::PubAck, id) => {
                let mut st = self.session.state.lock();
                if st.inflight.get(&id).is_some_and(|i| i.delivery.qos == 1) {
                    st.inflight.remove(&id);
                }
                drop(st);
                self.session.touch();
            }
            Packet::Ack(AckKind::PubRec, id) => {
                if let Some(i) = self.session.state.lock().inflight.get_mut(&id) {
                    i.stage = Stage::Released;
                }
                self.session.touch();
                self.reply_now(vec![Packet::Ack(AckKind::PubRel, id)]);
            }
            Packet::Ack(AckKind::PubComp, id) => {
                let mut st = self.session.state.lock();
                if st
                    .inflight
                    .get(&id)
                    .is_some_and(|i| i.stage == Stage::Released)
                {
                    st.inflight.remove(&id);
                }
                drop(st);
                self.session.touch();
            }
            Packet::Ack(AckKind::PubRel, id) => {
                self.flush_batch();
                let session = self.session.clone();
                let gw = self.gw.clone();
                self.pending.push_back(Box::pin(async move {
                    // Runs after the message's store finished (the reply queue is ordered), so a
                    // retransmitted PUBLISH is recognised until the id is released here.
                    let removed = session.state.lock().inbound_qos2.remove(&id);
                    if removed && session.persistent {
                        session.touch();
                        gw.persist(&session).await;
                    }
                    Ok(Reply {
                        packets: vec![Packet::Ack(AckKind::PubComp, id)],
                        ..Default::default()
                    })
                }));
            }
            Packet::Subscribe(s) => return self.subscribe(s),
            Packet::Unsubscribe(u) => {
                self.flush_batch();
                {
                    let mut st = self.session.state.lock();
                    for f in &u.filters {
                        if st.subs.remove(f).is_some() {
                            self.gw.router.unsubscribe(&self.session, f);
                        }
                    }
                }
                self.session.touch();
                let session = self.session.clone();
                let gw = self.gw.clone();
                self.pending.push_back(Box::pin(async move {
                    gw.persist(&session).await;
                    Ok(Reply {
                        packets: vec![Packet::Ack(AckKind::UnsubAck, u.packet_id)],
                        ..Default::default()
                    })
                }));
            }
            Packet::PingReq => self.reply_now(vec![Packet::PingResp]),
            Packet::Disconnect => return Some(End::Disconnect),
            Packet::Connect(_) => {
                self.gw
                    .metrics
                    .protocol_errors
                    .fetch_add(1, Ordering::Relaxed);
                return Some(End::Lost("a second CONNECT [MQTT-3.1.0-2]; closing".into()));
            }
            other => {
                self.gw
                    .metrics
                    .protocol_errors
                    .fetch_add(1, Ordering::Relaxed);
                return Some(End::Lost(format!(
                    "{} is a server-to-client packet; closing",
                    other.name()
                )));
            }
        }
        None
    }

    fn subscribe(&mut self, s: codec::Subscribe) -> Option<End> {
        self.flush_batch();
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        for (filter, qos) in &s.filters {
            let code = match self.check_subscription(filter) {
                Ok(()) => {
                    let mut st = self.session.state.lock();
                    let known = st.subs.contains_key(filter);
                    if !known && st.subs.len() >= self.gw.config.max_subscriptions {
                        info!(filter = %filter, limit = self.gw.config.max_subscriptions, "subscription refused: the client holds the most subscriptions allowed ([mqtt] max_subscriptions)");
                        SUBACK_FAILURE
                    } else {
                        st.subs.insert(filter.clone(), *qos);
                        drop(st);
                        self.gw.router.subscribe(&self.session, filter, *qos);
                        let retained_now = self.gw.retained.matching(filter);
                        for m in retained_now
                            .into_iter()
                            .filter(|m| !self.gw.router.denied(&m.topic))
                        {
                            retained.push(Delivery {
                                qos: m.qos.min(*qos),
                                msg: m,
                                retain: true,
                            });
                        }
                        *qos
                    }
                }
                Err(Refusal::Code(why)) => {
                    info!(filter = %filter, reason = %why, "subscription refused (SUBACK 0x80)");
                    SUBACK_FAILURE
                }
                Err(Refusal::Close(why)) => return Some(End::Lost(why)),
            };
            codes.push(code);
        }
        self.session.touch();
        let session = self.session.clone();
        let gw = self.gw.clone();
        let packet_id = s.packet_id;
        self.pending.push_back(Box::pin(async move {
            gw.persist(&session).await;
            Ok(Reply {
                packets: vec![Packet::SubAck(SubAck { packet_id, codes })],
                then: retained,
                ..Default::default()
            })
        }));
        None
    }

    fn check_subscription(&self, filter: &str) -> Result<(), Refusal> {
        check_filter(filter).map_err(Refusal::Code)?;
        if let Some(d) = self
            .gw
            .config
            .deny_subscribe
            .iter()
            .find(|d| covers(d, filter))
        {
            // A filter inside a denied one is refused; a wider filter is granted and the router
            // keeps the denied topics from it (as broker ACLs do).
            return Err(Refusal::Code(format!(
                "'{filter}' is within '{d}' in [mqtt] deny_subscribe"
            )));
        }
        if self.gw.mode == MqttMode::Strict {
            let parent = first_level(filter);
            if parent == "+" || parent == "#" {
                return Err(Refusal::Code(
                    "strict mode: a filter's first level must name a broker topic".into(),
                ));
            }
            if self.gw.broker.topic(parent).is_err() {
                return Err(Refusal::Code(format!(
                    "'{parent}' is not a broker topic; create it first"
                )));
            }
            if let Err(e) = self.principal.check_subscribe("topic", parent) {
                return Err(Refusal::Close(format!(
                    "SUBSCRIBE to '{filter}' refused: {}; closing",
                    e.message
                )));
            }
        }
        Ok(())
    }

    fn publish(&mut self, p: Publish) -> Option<End> {
        if let Err(why) = check_topic_name(&p.topic) {
            self.gw
                .metrics
                .protocol_errors
                .fetch_add(1, Ordering::Relaxed);
            return Some(End::Lost(format!("PUBLISH refused: {why}; closing")));
        }
        let dest = match destination(&self.gw, &p.topic) {
            Ok(d) => d,
            Err(why) => return Some(End::Lost(format!("PUBLISH refused: {why}; closing"))),
        };
        if let Dest::Broker(parent) = &dest
            && self.gw.mode == MqttMode::Strict
            && let Err(e) = self.principal.check_publish(parent)
        {
            return Some(End::Lost(format!(
                "PUBLISH to '{}' refused: {}; closing",
                p.topic, e.message
            )));
        }
        if p.qos == 2 {
            let id = p.packet_id.unwrap_or(0);
            let seen = self.session.state.lock().inbound_qos2.contains(&id);
            if seen || self.qos2_in_progress.contains(&id) {
                // A retransmission of a message already taken: answer again, store nothing.
                self.reply_now(vec![Packet::Ack(AckKind::PubRec, id)]);
                return None;
            }
            self.qos2_in_progress.insert(id);
        }
        let same = self.batch.as_ref().is_some_and(|b| b.dest == dest);
        if !same {
            self.flush_batch();
        }
        let b = self.batch.get_or_insert_with(|| Batch {
            dest: dest.clone(),
            items: Vec::new(),
        });
        b.items.push(p);
        None
    }
}

enum Refusal {
    /// SUBACK 0x80 for this filter.
    Code(String),
    /// Close the connection (a permission failure, as the spec says).
    Close(String),
}

/// True when every topic `filter` matches is also matched by `deny`.
fn covers(deny: &str, filter: &str) -> bool {
    let mut d = deny.split('/');
    let mut f = filter.split('/');
    loop {
        match (d.next(), f.next()) {
            (Some("#"), _) => return true,
            (None, None) => return true,
            (Some("+"), Some(l)) if l != "#" => {}
            (Some(a), Some(b)) if a == b && b != "+" && b != "#" => {}
            _ => return false,
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::covers;

    #[test]
    fn deny_covers_only_narrower_filters() {
        assert!(covers("secret/#", "secret/x"));
        assert!(covers("secret/#", "secret/+/y"));
        assert!(covers("secret/#", "secret"));
        assert!(covers("a/+", "a/b"));
        assert!(covers("a/+", "a/+"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("secret/#", "#"));
        assert!(!covers("test/nosubscribe", "+/+"));
        assert!(covers("test/nosubscribe", "test/nosubscribe"));
    }
}
