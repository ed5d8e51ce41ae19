//! The MQTT 3.1.1 gateway: listeners (TCP, TLS, WebSocket, secure WebSocket), sessions, and the
//! router that joins MQTT to the broker.
//!
//! Shape (after rumqttd's router/link split): one [`router::Router`] per host tails every broker
//! topic once and fans messages out through a subscription trie; each connection is a thin task
//! ([`connection`]) that owns packet ids and the in-flight window and never reads the store.
//! A publish to `Parent/...` is stored in broker topic `Parent` (the sub-topic and QoS kept as
//! properties), so every broker consumer sees it; a broker message to `Parent` tagged `MQ2MQTT`
//! reaches the MQTT subscribers of `Parent` + its `mqttSecondTopic`. In open mode, topics whose
//! first level is no broker topic live in the gateway's own topic, with the same durability.

pub mod codec;
mod connection;
pub mod inspect;
mod metrics;
mod owner;
mod presence;
mod retained;
pub mod router;
pub mod session;
pub mod topic;
mod transport;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, info_span, warn};

pub use metrics::MqttMetrics;

use self::codec::{Connect, ConnectCode};
use self::owner::Owners;
use self::presence::Presence;
use self::retained::Retained;
use self::router::Router;
use self::session::{Attached, Delivery, InflightRecord, MessageRef, Session, SessionRecord};
use crate::broker::api::{BrokerApi, GroupKind, StateSpace};
use crate::config::{MqttConfig, MqttMode};
use crate::http::auth::{Authenticator, Principal};
use crate::net::{Connection, Handler, Listener, Shutdown};

/// Property holding the MQTT sub-topic of a message stored in a broker topic (`/a/b` of
/// `Parent/a/b`); also set by broker producers on `MQ2MQTT` messages.
pub const PROP_SECOND_TOPIC: &str = "mqttSecondTopic";
/// Property holding the QoS a message was published with.
pub const PROP_QOS: &str = "qoslevel";
/// Property holding the full MQTT topic of a message in the gateway's own topic.
pub const PROP_TOPIC: &str = "mqttTopic";
/// Property holding the client id of the MQTT publisher.
pub const PROP_CLIENT_ID: &str = "clientId";
/// Property marking an empty MQTT payload (the broker stores one placeholder byte).
pub const PROP_EMPTY: &str = "mqttEmptyPayload";
/// Tag of broker messages meant for MQTT subscribers.
pub const TAG_MQ2MQTT: &str = "MQ2MQTT";
/// Separator of group and device in a strict-mode client id.
pub const CLIENT_ID_SEPARATOR: &str = "@@@";

/// The running gateway; cheap to clone (HTTP inspection holds one).
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

/// Shared state of the gateway.
pub(crate) struct Inner {
    broker: BrokerApi,
    config: MqttConfig,
    mode: MqttMode,
    auth: Arc<Authenticator>,
    router: Arc<Router>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    retained: Retained,
    presence: Presence,
    owners: Owners,
    /// This host's connections from CONNECT until they let go, by channel id (what a
    /// takeover notice names).
    channels: Mutex<HashMap<String, LiveChannel>>,
    metrics: Arc<MqttMetrics>,
    session_seq: AtomicU64,
    conn_seq: AtomicU64,
    /// Per topic: the last rate sample, for inspection rates.
    rate_samples: Mutex<HashMap<String, inspect::RateSample>>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// Longest a CONNECT waits for another host to let go of the connection it takes over (its
/// presence event and session stored); past it the CONNECT goes on with the session stored
/// last (that host may be stuck or partitioned).
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);
/// Pause before reading a changed store space again after a failed read.
const RELOAD_RETRY: Duration = Duration::from_millis(500);
/// Pause between tries to store a session whose client id another host is taking over.
const HANDOVER_RETRY: Duration = Duration::from_millis(200);

/// Change feeds of the store spaces other hosts write, taken before the gateway loads them.
struct StateWatches {
    retained: tokio::sync::watch::Receiver<u64>,
    /// Takeover notices to this host.
    kicks: tokio::sync::watch::Receiver<u64>,
}

/// One of this host's connections, for the takeover notices naming it.
struct LiveChannel {
    client_id: String,
    attached: Arc<Attached>,
    /// A notice closed it: the connection forgets the notice once it let go.
    noticed: bool,
}

/// Which kind of listener a connection came in on.
#[derive(Clone)]
enum Kind {
    Tcp,
    Tls(tokio_rustls::TlsAcceptor),
    Ws,
    Wss(tokio_rustls::TlsAcceptor),
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Tcp => "mqtt",
            Kind::Tls(_) => "mqtts",
            Kind::Ws => "mqtt-ws",
            Kind::Wss(_) => "mqtt-wss",
        }
    }
}

struct MqttHandler {
    gw: Arc<Inner>,
    kind: Kind,
}

impl Handler for MqttHandler {
    async fn serve(&self, conn: Connection) {
        let Connection {
            stream,
            peer,
            shutdown,
        } = conn;
        let gw = self.gw.clone();
        let handshake = Duration::from_millis(gw.config.connect_timeout_ms);
        let kind = self.kind.clone();
        let name = kind.name();
        // This future lives as long as the connection, so the handshakes and the session are
        // boxed and the handshake's result is gone before the session runs: an idle client
        // holds what its own transport's session needs, not room for the largest of them.
        // A TLS or WebSocket handshake that never finishes counts against the CONNECT timeout.
        let session: Option<BoxFuture<'static, ()>> = match kind {
            Kind::Tcp => {
                let (r, w) = transport::split_stream(stream);
                Some(Box::pin(connection::run(gw, r, w, peer, shutdown, name)))
            }
            Kind::Tls(acceptor) => {
                let tls = Box::pin(acceptor.accept(stream));
                finish_handshake("TLS", peer, handshake, tls).await.map(
                    |tls| -> BoxFuture<'static, ()> {
                        let (r, w) = transport::split_stream(tls);
                        Box::pin(connection::run(gw, r, w, peer, shutdown, name))
                    },
                )
            }
            Kind::Ws => {
                let ws = Box::pin(transport::accept_ws(stream, &gw.config.ws_path));
                finish_handshake("WebSocket", peer, handshake, ws)
                    .await
                    .map(|(r, w)| -> BoxFuture<'static, ()> {
                        Box::pin(connection::run(gw.clone(), r, w, peer, shutdown, name))
                    })
            }
            Kind::Wss(acceptor) => {
                let ws = Box::pin(async {
                    let tls = acceptor.accept(stream).await?;
                    transport::accept_ws(tls, &gw.config.ws_path).await
                });
                finish_handshake("secure WebSocket", peer, handshake, ws)
                    .await
                    .map(|(r, w)| -> BoxFuture<'static, ()> {
                        Box::pin(connection::run(gw.clone(), r, w, peer, shutdown, name))
                    })
            }
        };
        if let Some(session) = session {
            session.await;
        }
    }
}

/// The result of a transport handshake, or None (logged) when it fails or does not finish
/// `within`.
async fn finish_handshake<T, E: std::fmt::Display>(
    what: &str,
    peer: SocketAddr,
    within: Duration,
    handshake: BoxFuture<'_, Result<T, E>>,
) -> Option<T> {
    match tokio::time::timeout(within, handshake).await {
        Ok(Ok(t)) => Some(t),
        Ok(Err(e)) => {
            info!(%peer, error = %e, "mqtt {what} handshake failed; closing");
            None
        }
        Err(_) => {
            info!(%peer, "mqtt {what} handshake did not finish in time; closing");
            None
        }
    }
}

/// What admission found out about a CONNECT.
pub(crate) struct Admitted {
    /// The client id to use (generated for an empty one in open mode).
    pub client_id: String,
    /// Who is connecting (everything allowed in open mode).
    pub principal: Arc<Principal>,
}

impl Gateway {
    /// Loads stored sessions and retained messages, starts the router and binds every
    /// configured listener on `shutdown`. Returns the gateway and the bound addresses by
    /// listener name (`mqtt`, `mqtts`, `mqtt-ws`, `mqtt-wss`).
    pub async fn start(
        broker: BrokerApi,
        config: MqttConfig,
        auth: Arc<Authenticator>,
        shutdown: &Shutdown,
    ) -> anyhow::Result<(Gateway, Vec<(&'static str, SocketAddr)>)> {
        let mode = config.mode.unwrap_or(if auth.is_open() {
            MqttMode::Open
        } else {
            MqttMode::Strict
        });
        if mode == MqttMode::Open && !auth.is_open() {
            warn!(
                "[mqtt] mode = \"open\" with access keys configured: MQTT clients connect without credentials"
            );
        }
        let owners = Owners::new(broker.clone());
        // Taken before the first load, so another host's change in between is not missed.
        let watches = StateWatches {
            retained: broker.watch_state(StateSpace::MqttRetained),
            kicks: broker.watch_state(owners.own_notices()),
        };
        let metrics = Arc::new(MqttMetrics::default());
        let router = Router::new(
            broker.clone(),
            metrics.clone(),
            config.max_queued,
            config.deny_subscribe.clone(),
        );
        let inner = Arc::new(Inner {
            retained: Retained::load(&broker)
                .await
                .context("loading MQTT retained messages")?,
            presence: Presence::new(broker.clone()),
            owners,
            channels: Mutex::new(HashMap::new()),
            broker,
            mode,
            auth,
            router,
            sessions: Mutex::new(HashMap::new()),
            metrics,
            session_seq: AtomicU64::new(1),
            conn_seq: AtomicU64::new(1),
            rate_samples: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            config,
        });
        inner
            .load_sessions()
            .await
            .context("loading stored MQTT sessions")?;
        inner.router.start().await;
        let persister = inner.clone();
        inner
            .tasks
            .spawn(async move { persister.run_persister().await });
        let watcher = inner.clone();
        inner
            .tasks
            .spawn(async move { watcher.run_state_watches(watches).await });

        let mut bound = Vec::new();
        let c = &inner.config;
        let tls = if c.tls_listen.is_empty() && c.wss_listen.is_empty() {
            None
        } else {
            Some(
                crate::net::tls::tls_acceptor(Path::new(&c.tls_cert), Path::new(&c.tls_key))
                    .context("[mqtt] tls_cert / tls_key")?,
            )
        };
        let listeners: [(&str, Option<Kind>); 4] = [
            (c.listen.as_str(), Some(Kind::Tcp)),
            (c.tls_listen.as_str(), tls.clone().map(Kind::Tls)),
            (c.ws_listen.as_str(), Some(Kind::Ws)),
            (c.wss_listen.as_str(), tls.map(Kind::Wss)),
        ];
        for (listen, kind) in listeners {
            let Some(kind) = kind else { continue };
            if listen.is_empty() {
                continue;
            }
            let name = kind.name();
            let l = Listener::bind(name, listen, c.max_connections)
                .await
                .with_context(|| format!("cannot listen on {listen} for {name} ([mqtt])"))?;
            let addr = l.local_addr();
            info!(mode = ?mode, "listening {name}={addr}");
            bound.push((name, addr));
            shutdown.serve(
                l,
                MqttHandler {
                    gw: inner.clone(),
                    kind,
                },
            );
        }
        Ok((Gateway { inner }, bound))
    }

    /// Writes every stored session and stops the router (after the listeners have stopped).
    pub async fn stop(&self) {
        let g = &self.inner;
        g.stop.cancel();
        g.tasks.close();
        g.tasks.wait().await;
        g.flush_sessions(true).await;
        g.router.stop().await;
    }

    /// Prometheus text for `/metrics`.
    pub fn render_metrics(&self, out: &mut String) {
        self.inner.metrics.render(out);
        crate::metrics::gauge(
            out,
            "wharf_mqtt_retained_messages",
            "gauge",
            "Retained messages kept.",
            self.inner.retained.len() as u64,
        );
    }
}

impl Inner {
    /// Checks a CONNECT against the mode's rules; the error is the CONNACK code to answer.
    pub(crate) fn admit(&self, c: &Connect) -> Result<Admitted, (ConnectCode, String)> {
        let client_id = if c.client_id.is_empty() {
            if !c.clean_session {
                return Err((
                    ConnectCode::IdentifierRejected,
                    "an empty client id needs clean session = true [MQTT-3.1.3-8]".into(),
                ));
            }
            if self.mode == MqttMode::Strict {
                return Err((
                    ConnectCode::IdentifierRejected,
                    "strict mode needs a client id GroupID@@@DeviceID".into(),
                ));
            }
            format!("wharf-{:016x}", rand::random::<u64>())
        } else {
            c.client_id.clone()
        };
        if self.mode == MqttMode::Open {
            return Ok(Admitted {
                client_id,
                principal: self.auth.anonymous(),
            });
        }
        let Some((group, device)) = client_id.split_once(CLIENT_ID_SEPARATOR) else {
            return Err((
                ConnectCode::IdentifierRejected,
                format!("client id '{client_id}' is not GroupID@@@DeviceID"),
            ));
        };
        if device.is_empty() {
            return Err((
                ConnectCode::IdentifierRejected,
                format!("client id '{client_id}' has no device id after @@@"),
            ));
        }
        match self.broker.group(group) {
            Ok(g) if g.kind == GroupKind::Mqtt => {}
            Ok(_) => {
                return Err((
                    ConnectCode::IdentifierRejected,
                    format!("group '{group}' is not an MQTT group; create it with kind \"mqtt\""),
                ));
            }
            Err(_) => {
                return Err((
                    ConnectCode::IdentifierRejected,
                    format!(
                        "MQTT group '{group}' does not exist; create it with kind \"mqtt\" first"
                    ),
                ));
            }
        }
        let (Some(user), Some(password)) = (&c.username, &c.password) else {
            return Err((
                ConnectCode::BadCredentials,
                "strict mode needs user name = AccessKey and password = Base64(HMAC-SHA1(SecretKey, GroupID))".into(),
            ));
        };
        let password = String::from_utf8_lossy(password);
        let principal = self
            .auth
            .verify_hmac(user, group.as_bytes(), &password)
            .map_err(|e| (ConnectCode::NotAuthorized, e.message))?;
        if let Some(w) = &c.will {
            let parent = topic::first_level(&w.topic);
            if let Err(e) = principal.check_publish(parent) {
                return Err((
                    ConnectCode::NotAuthorized,
                    format!("will topic: {}", e.message),
                ));
            }
        }
        Ok(Admitted {
            client_id,
            principal,
        })
    }

    /// Binds a session to a new connection, taking over from a connection with the same client
    /// id. Returns the session and whether it was resumed (CONNACK's session present).
    pub(crate) async fn attach(
        &self,
        client_id: &str,
        clean: bool,
        attached: Arc<Attached>,
    ) -> (Arc<Session>, bool) {
        // Before the claim: a notice naming this connection may come as soon as it is written.
        self.channels.lock().insert(
            attached.channel_id.clone(),
            LiveChannel {
                client_id: client_id.to_owned(),
                attached: attached.clone(),
                noticed: false,
            },
        );
        self.take_over_cluster_wide(client_id, clean, &attached)
            .await;
        // Take over: disconnect the current holder and wait for it to let go of the session.
        for _ in 0..500 {
            let holder = self.sessions.lock().get(client_id).cloned();
            match holder {
                Some(s) if s.online() => {
                    s.kick(&format!(
                        "client id taken over by a new connection from {}",
                        attached.address
                    ));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                _ => break,
            }
        }
        let mut sessions = self.sessions.lock();
        let existing = sessions.get(client_id).cloned();
        let (session, present) = match existing {
            Some(s) if !clean && s.persistent && !s.online() => (s, true),
            other => {
                if let Some(old) = other
                    && old.persistent
                {
                    self.metrics.sessions_stored.fetch_sub(1, Ordering::Relaxed);
                    let broker = self.broker.clone();
                    let id = client_id.to_owned();
                    self.tasks.spawn(async move {
                        let cleared = session::CLEARED.to_vec();
                        if let Err(e) = broker.state_put(StateSpace::MqttSession, &id, cleared).await {
                            warn!(client_id = %id, error = %e, "cannot forget the stored MQTT session");
                        }
                    });
                }
                let s = Arc::new(Session::new(
                    client_id.to_owned(),
                    self.session_seq.fetch_add(1, Ordering::Relaxed),
                    !clean,
                ));
                if !clean {
                    self.metrics.sessions_stored.fetch_add(1, Ordering::Relaxed);
                }
                sessions.insert(client_id.to_owned(), s.clone());
                (s, false)
            }
        };
        {
            let mut st = session.state.lock();
            st.last_connect_ms = self.broker.clock().now_ms();
            st.last_address = attached.address.clone();
            st.last_channel = attached.channel_id.clone();
        }
        *session.attached.lock() = Some(attached);
        session.touch();
        (session, present)
    }

    /// Lets go of a session when its connection ends: a clean one is forgotten, a stored one
    /// written now (with the positions the router recorded for it).
    pub(crate) async fn detach(&self, session: &Arc<Session>) {
        if session.persistent {
            // A topic created moments ago may have no tail yet; give it one first, so the
            // session's positions cover it and nothing sent to it meanwhile is missed.
            self.router.sync_topics(false).await;
        }
        self.router.detach(session);
        let attached = session.attached.lock().take();
        session.state.lock().last_disconnect_ms = Some(self.broker.clock().now_ms());
        if session.persistent {
            // Queued messages stay queued in the session; they go out on reconnect.
            session.touch();
            let noticed = attached.as_ref().is_some_and(|a| {
                self.channels
                    .lock()
                    .get(&a.channel_id)
                    .is_some_and(|l| l.noticed)
            });
            if !self.persist(session).await && noticed {
                self.persist_for_handover(session).await;
            }
        }
        // After the session is stored: a host waiting to take the client id over loads it then.
        if let Some(attached) = attached {
            let claim = attached.claim.lock().take();
            if let Some(claim) = claim {
                self.owners.release(&session.client_id, &claim).await;
            }
            // Last, after the presence event and the session are stored: a host waiting on
            // the notice that closed this connection goes on when it is gone.
            let noticed = self
                .channels
                .lock()
                .remove(&attached.channel_id)
                .is_some_and(|l| l.noticed);
            if noticed && let Err(e) = self.owners.forget_notice(&attached.channel_id).await {
                warn!(client_id = %session.client_id, error = %e, "cannot forget the takeover notice; the host taking over waits for it (bounded)");
            }
        }
        if !session.persistent {
            let mut sessions = self.sessions.lock();
            if sessions
                .get(&session.client_id)
                .is_some_and(|s| s.key == session.key)
            {
                sessions.remove(&session.client_id);
            }
        }
    }

    /// The stored form of a session: for an online one taken while no tail routes, so its queue
    /// and in-flight messages agree with the positions.
    fn record(&self, s: &Session) -> SessionRecord {
        let build = |positions: Option<&std::collections::BTreeMap<(String, u32), u64>>| {
            let released = !s.online();
            let st = s.state.lock();
            SessionRecord {
                v: 1,
                client_id: s.client_id.clone(),
                subs: st.subs.iter().map(|(f, q)| (f.clone(), *q)).collect(),
                inflight: st
                    .inflight
                    .iter()
                    .map(|(pid, i)| InflightRecord {
                        pid: *pid,
                        stage: i.stage,
                        message: MessageRef::of(&i.delivery),
                    })
                    .collect(),
                queued: s
                    .outbox
                    .snapshot()
                    .iter()
                    .filter(|d| d.qos > 0)
                    .map(MessageRef::of)
                    .collect(),
                inbound_qos2: st.inbound_qos2.iter().copied().collect(),
                positions: positions
                    .unwrap_or(&st.positions)
                    .iter()
                    .map(|((t, q), o)| (t.clone(), *q, *o))
                    .collect(),
                next_pid: st.next_pid,
                last_connect_ms: st.last_connect_ms,
                last_disconnect_ms: st.last_disconnect_ms,
                last_address: st.last_address.clone(),
                channel: st.last_channel.clone(),
                released,
            }
        };
        if s.online() {
            self.router.with_positions(s, |p| build(Some(p)))
        } else {
            build(None)
        }
    }

    /// Writes one stored session now if it changed, unless another host stored a newer record of
    /// it meanwhile. False when the store could not take it: it stays dirty and is tried again.
    pub(crate) async fn persist(&self, s: &Session) -> bool {
        if !s.persistent {
            return true;
        }
        let _writing = s.writing.lock().await;
        if !s.dirty.swap(false, Ordering::AcqRel) {
            return true;
        }
        let raw = self.record(s).encode();
        let mut expected = match s.stored_version.load(Ordering::Acquire) {
            0 => None,
            v => Some(v),
        };
        let space = StateSpace::MqttSession;
        let retry_later = |e: &dyn std::fmt::Display| {
            s.dirty.store(true, Ordering::Release);
            warn!(client_id = %s.client_id, error = %e, "cannot store MQTT session; will retry");
            false
        };
        for _ in 0..3 {
            let r = self
                .broker
                .state_put_if(space.clone(), &s.client_id, raw.clone(), expected)
                .await;
            match r {
                Ok(Some(v)) => {
                    s.stored_version.store(v, Ordering::Release);
                    return true;
                }
                Ok(None) => {
                    let current = match self.broker.state_entry(space.clone(), &s.client_id).await {
                        Ok(e) => e,
                        Err(e) => return retry_later(&e),
                    };
                    // The connection attached here holds the client id: its state is the live
                    // one. A session never stored before may replace a cleared one.
                    let cleared = current
                        .as_ref()
                        .is_some_and(|(raw, _)| SessionRecord::is_cleared(raw));
                    if s.online() || (cleared && s.stored_version.load(Ordering::Acquire) == 0) {
                        expected = current.map(|(_, v)| v);
                        continue;
                    }
                    info!(client_id = %s.client_id, "another host stored this MQTT session since this host read it; this host's offline copy is stale and is not written (a connection here reads the stored one)");
                    return true;
                }
                Err(e) => return retry_later(&e),
            }
        }
        retry_later(&"the stored session kept changing under this host's write")
    }

    /// Another host waits (at most [`TAKEOVER_WAIT`]) to take this session's client id over and
    /// then reads the session stored last: keep trying to store this one for most of that wait,
    /// so the other host goes on with its latest state rather than an older one.
    async fn persist_for_handover(&self, s: &Session) {
        let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT * 3 / 4;
        warn!(client_id = %s.client_id, "cannot store the MQTT session another host is taking over; retrying before handing it over");
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(HANDOVER_RETRY).await;
            if self.persist(s).await {
                info!(client_id = %s.client_id, "stored the MQTT session before handing it over");
                return;
            }
        }
        warn!(client_id = %s.client_id, "could not store the MQTT session in time; the host taking over goes on with the one stored last (what changed since, such as acknowledgements, is redone: messages may come again)");
    }

    async fn flush_sessions(&self, all: bool) {
        let sessions: Vec<Arc<Session>> = self
            .sessions
            .lock()
            .values()
            .filter(|s| s.persistent && (all || s.dirty.load(Ordering::Relaxed)))
            .cloned()
            .collect();
        for s in sessions {
            self.persist(&s).await;
        }
    }

    async fn run_persister(self: Arc<Self>) {
        let every = Duration::from_millis(self.config.session_flush_ms);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(every) => self.flush_sessions(false).await,
            }
        }
    }

    /// Restores every stored session (offline until its client returns).
    async fn load_sessions(&self) -> crate::error::Result<()> {
        let records = self.broker.state_entries(StateSpace::MqttSession).await?;
        let mut restored = 0usize;
        for (client_id, raw, version) in records {
            let record = match SessionRecord::decode_stored(&raw) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    warn!(client_id = %client_id, error = %e, "stored MQTT session is unreadable; starting it afresh");
                    continue;
                }
            };
            let s = self.restore(&client_id, &record, version).await;
            self.sessions.lock().insert(client_id, s);
            restored += 1;
        }
        self.metrics
            .sessions_stored
            .store(restored as u64, Ordering::Relaxed);
        if restored > 0 {
            info!(sessions = restored, "restored stored MQTT sessions");
        }
        Ok(())
    }

    /// A stored session (at store `version`) as an offline session of this host (its messages
    /// read back).
    async fn restore(&self, client_id: &str, record: &SessionRecord, version: u64) -> Arc<Session> {
        let s = Arc::new(Session::new(
            client_id.to_owned(),
            self.session_seq.fetch_add(1, Ordering::Relaxed),
            true,
        ));
        let mut queued = Vec::new();
        for r in &record.queued {
            if let Some(d) = self.load_message(r).await {
                queued.push(d);
            }
        }
        {
            let mut st = s.state.lock();
            st.subs = record.subs.iter().cloned().collect();
            st.inbound_qos2 = record.inbound_qos2.iter().copied().collect();
            st.positions = record
                .positions
                .iter()
                .map(|(t, q, o)| ((t.clone(), *q), *o))
                .collect();
            st.next_pid = record.next_pid;
            st.last_connect_ms = record.last_connect_ms;
            st.last_disconnect_ms = record.last_disconnect_ms;
            st.last_address = record.last_address.clone();
            st.last_channel = record.channel.clone();
        }
        for i in &record.inflight {
            if let Some(d) = self.load_message(&i.message).await {
                s.state.lock().inflight.insert(
                    i.pid,
                    session::Inflight {
                        delivery: d,
                        stage: i.stage,
                    },
                );
            }
        }
        s.outbox.push_front_batch(queued);
        s.dirty.store(false, Ordering::Relaxed);
        s.stored_version.store(version, Ordering::Relaxed);
        s
    }

    async fn load_message(&self, r: &MessageRef) -> Option<Delivery> {
        if let Some(p) = r.inline_payload() {
            return Some(r.delivery(p));
        }
        let pos = r.position?;
        match self.broker.message_at(pos).await {
            Ok(Some(m)) => router::to_routed(&m).map(|routed| r.delivery(routed.payload)),
            Ok(None) => {
                warn!(topic = %r.topic, position = pos, "a message a stored MQTT session held is gone (retention); skipping it");
                None
            }
            Err(e) => {
                warn!(topic = %r.topic, error = %e, "cannot read a message of a stored MQTT session; skipping it");
                None
            }
        }
    }

    /// Claims the client id for this connection in the store. When a connection on another
    /// live host held it, waits (at most [`TAKEOVER_WAIT`]) until that host has let go of it:
    /// its presence event comes before this connection's, and a session it stored is the one
    /// to use.
    async fn take_over_cluster_wide(&self, client_id: &str, clean: bool, attached: &Attached) {
        let claim = match self
            .owners
            .claim(client_id, &attached.channel_id, &attached.address, !clean)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                warn!(client_id, error = %e, "cannot claim the MQTT client id in the store; a connection with this id on another host is not taken over");
                return;
            }
        };
        let (previous, noticed) = (claim.previous.clone(), claim.noticed);
        *attached.claim.lock() = Some(claim);
        if let Some(p) = &previous
            && noticed
            && !self.owners.wait_let_go(p, TAKEOVER_WAIT).await
        {
            warn!(client_id, host = %p.host, "the host that held this client id did not let go of it in time; going on with the session stored last");
            if !self.owners.host_is_live(&p.host).await {
                // It died meanwhile: nobody else would ever take the notice away.
                self.owners.withdraw_notice(p).await;
            }
        }
        if !clean || previous.is_some_and(|p| p.persistent) {
            self.refresh_session(client_id).await;
        }
    }

    /// Replaces this host's offline copy of a stored session with the store's, since another
    /// host may have used and stored it since (a copy not yet written here is kept, unless the
    /// store's record is newer than the one it came from).
    async fn refresh_session(&self, client_id: &str) {
        let stored = match self
            .broker
            .state_entry(StateSpace::MqttSession, client_id)
            .await
        {
            Ok(v) => v,
            Err(e) => {
                warn!(client_id, error = %e, "cannot read the stored MQTT session; using this host's copy");
                return;
            }
        };
        let store_version = stored.as_ref().map_or(0, |(_, v)| *v);
        let restored = match stored.map(|(raw, v)| (SessionRecord::decode_stored(&raw), v)) {
            Some((Ok(Some(r)), v)) => Some(self.restore(client_id, &r, v).await),
            Some((Ok(None), _)) => None,
            Some((Err(e), _)) => {
                warn!(client_id, error = %e, "stored MQTT session is unreadable; starting it afresh");
                None
            }
            None => None,
        };
        let mut sessions = self.sessions.lock();
        let local = sessions.get(client_id).cloned();
        if local.as_ref().is_some_and(|s| {
            s.online()
                || (s.dirty.load(Ordering::Acquire)
                    && s.stored_version.load(Ordering::Acquire) == store_version)
        }) {
            return;
        }
        match restored {
            Some(s) => {
                if !local.is_some_and(|l| l.persistent) {
                    self.metrics.sessions_stored.fetch_add(1, Ordering::Relaxed);
                }
                sessions.insert(client_id.to_owned(), s);
            }
            None => {
                if local.is_some_and(|l| l.persistent) {
                    sessions.remove(client_id);
                    self.metrics.sessions_stored.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Follows what other hosts write: retained messages, and takeover notices to this host.
    async fn run_state_watches(self: Arc<Self>, mut w: StateWatches) {
        // Notices left from before a restart name no connection of this run: forget them now.
        let (mut retained, mut kicks) = (false, true);
        loop {
            // A failed read is tried again, since the feed may not move again by itself.
            while retained || kicks {
                if retained {
                    match self.retained.reload(&self.broker).await {
                        Ok(()) => retained = false,
                        Err(e) => {
                            warn!(error = %e, "cannot reload MQTT retained messages; will retry")
                        }
                    }
                }
                if kicks {
                    match self.handle_notices().await {
                        Ok(()) => kicks = false,
                        Err(e) => {
                            warn!(error = %e, "cannot read MQTT takeover notices; will retry")
                        }
                    }
                }
                if retained || kicks {
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(RELOAD_RETRY) => {}
                    }
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                r = w.retained.changed() => {
                    if r.is_err() { return }
                    retained = true;
                }
                r = w.kicks.changed() => {
                    if r.is_err() { return }
                    kicks = true;
                }
            }
        }
    }

    /// Disconnects the connections of this host that takeover notices name; a notice naming
    /// none (it ended, or is of an earlier run) is forgotten, one naming a live connection is
    /// forgotten by that connection once it let go.
    async fn handle_notices(&self) -> crate::error::Result<()> {
        for (channel, notice) in self.owners.notices().await? {
            let live = {
                let mut channels = self.channels.lock();
                match (channels.get_mut(&channel), &notice) {
                    // Channel ids restart with the host: the client id tells an earlier run's.
                    (Some(l), Some(n)) if l.client_id == n.client_id => {
                        l.noticed = true;
                        Some(l.attached.clone())
                    }
                    _ => None,
                }
            };
            match (live, notice) {
                (Some(attached), Some(n)) => attached.kick(&n.reason()),
                _ => self.owners.forget_notice(&channel).await?,
            }
        }
        Ok(())
    }

    /// A new connection id, also the presence `channelId`.
    pub(crate) fn next_channel_id(&self) -> String {
        format!(
            "{}-{}",
            self.broker.host_id(),
            self.conn_seq.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// Runs a connection's future in a span naming the client.
pub(crate) fn session_span(client_id: &str, transport: &str, peer: SocketAddr) -> tracing::Span {
    info_span!("mqtt_session", client_id = %client_id, transport, %peer)
}
