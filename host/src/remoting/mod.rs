//! The RocketMQ remoting front end: standard RocketMQ / ONS SDK clients, unchanged, talk to
//! Wharf as both their name server and their broker on one port (`[remoting] listen`).
//!
//! Layout: [`codec`] is the pure wire format; [`codes`] the request and response codes;
//! [`ops`] maps each request onto [`BrokerApi`]; this file owns connections: one task per
//! connection that decodes frames, runs its requests concurrently (a long-polling pull must not
//! hold up a send on the same connection) and writes their replies in as few syscalls as it can,
//! and the registry of which connection carries which consumer, for NOTIFY_CONSUMER_IDS_CHANGED
//! and for dropping a consumer whose connection closed.

pub mod codec;
pub mod codes;
pub mod ops;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use bytes::BytesMut;
use futures_util::FutureExt as _;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, warn};

use crate::broker::api::BrokerApi;
use crate::config::RemotingConfig;
use crate::http::auth::Authenticator;
use crate::net::{Connection, Handler, Listener, Shutdown};
use codec::{Command, decode_frame, encode_frame};

/// Requests one connection may have in progress at once; past it the reader stops reading, so
/// a client that floods is slowed down instead of growing the host's memory.
const MAX_IN_FLIGHT_PER_CONNECTION: usize = 1024;
/// Notices (NOTIFY_CONSUMER_IDS_CHANGED) queued for one connection; past it they are dropped,
/// as the client rebalances on its own timer anyway.
const NOTICE_QUEUE: usize = 64;
/// Reply bytes waiting for the socket past which no more replies are composed.
const OUT_HIGH_WATER: usize = 256 * 1024;

/// What every connection shares.
pub struct RemotingState {
    /// The broker.
    pub broker: BrokerApi,
    /// `[[auth.keys]]`; open when there are none.
    pub auth: Arc<Authenticator>,
    /// `[remoting] advertised_addr`; `None`: the address each client connected to.
    pub advertised: Option<SocketAddr>,
    /// Create a consumer group on its first heartbeat.
    pub auto_create_groups: bool,
    registry: Mutex<Registry>,
    next_conn: AtomicU64,
    next_opaque: AtomicI32,
}

/// Which connection carries which consumer, and what each group last said it subscribes.
#[derive(Default)]
struct Registry {
    /// Write queues of open connections.
    conns: HashMap<u64, mpsc::Sender<Vec<u8>>>,
    /// group → client id → connection its last heartbeat came on.
    members: HashMap<String, HashMap<String, u64>>,
    /// (group, topic) → tag expression from the latest heartbeat (pulls without a subscription).
    subscriptions: HashMap<(String, String), String>,
}

impl RemotingState {
    /// State for `config`; groups are auto-created per `[remoting] auto_create_groups`, by
    /// default only when the host runs open.
    pub fn new(broker: BrokerApi, auth: Arc<Authenticator>, config: &RemotingConfig) -> Self {
        let auto_create_groups = config.auto_create_groups.enabled(auth.is_open());
        RemotingState {
            broker,
            auth,
            advertised: config.advertised_addr.parse().ok(),
            auto_create_groups,
            registry: Mutex::new(Registry::default()),
            next_conn: AtomicU64::new(1),
            next_opaque: AtomicI32::new(1),
        }
    }

    /// Records that `client` of `group` heartbeats on connection `conn`.
    fn register_member(&self, group: &str, client: &str, conn: u64) {
        self.registry
            .lock()
            .members
            .entry(group.to_string())
            .or_default()
            .insert(client.to_string(), conn);
    }

    /// Remembers a group's tag expression for `topic`.
    fn remember_subscription(&self, group: &str, topic: &str, expression: &str) {
        self.registry.lock().subscriptions.insert(
            (group.to_string(), topic.to_string()),
            expression.to_string(),
        );
    }

    /// The tag expression `group` last registered for `topic`.
    fn subscription(&self, group: &str, topic: &str) -> Option<String> {
        self.registry
            .lock()
            .subscriptions
            .get(&(group.to_string(), topic.to_string()))
            .cloned()
    }

    /// Forgets `client` of `group` (unregister).
    fn forget_member(&self, group: &str, client: &str) {
        let mut reg = self.registry.lock();
        if let Some(m) = reg.members.get_mut(group) {
            m.remove(client);
            if m.is_empty() {
                reg.members.remove(group);
            }
        }
    }

    /// Tells every connection carrying a consumer of `group` that its member list changed, so
    /// those clients rebalance now rather than at their next periodic rebalance.
    fn notify_group(&self, group: &str) {
        let opaque = self.next_opaque.fetch_add(1, Ordering::Relaxed);
        let mut cmd = Command::request(codes::NOTIFY_CONSUMER_IDS_CHANGED, opaque);
        cmd.flag = codec::frame::FLAG_ONEWAY;
        cmd.set("consumerGroup", group);
        let mut frame = Vec::new();
        if encode_frame(&cmd, &mut frame).is_err() {
            return;
        }
        let reg = self.registry.lock();
        let Some(members) = reg.members.get(group) else {
            return;
        };
        let conns: HashSet<u64> = members.values().copied().collect();
        for c in conns {
            if let Some(tx) = reg.conns.get(&c) {
                // A full queue means the client is not reading; it rebalances on its own timer.
                let _ = tx.try_send(frame.clone());
            }
        }
    }

    /// A connection closed: its consumers leave their groups (RocketMQ drops a consumer whose
    /// channel closed), and the rest of each group is told to rebalance.
    async fn connection_closed(&self, conn: u64) {
        let gone: Vec<(String, String)> = {
            let mut reg = self.registry.lock();
            reg.conns.remove(&conn);
            let mut gone = Vec::new();
            reg.members.retain(|group, clients| {
                clients.retain(|client, c| {
                    let mine = *c == conn;
                    if mine {
                        gone.push((group.clone(), client.clone()));
                    }
                    !mine
                });
                !clients.is_empty()
            });
            gone
        };
        for (group, client) in gone {
            match self.broker.leave(&group, &client).await {
                Ok(true) => self.notify_group(&group),
                Ok(false) => {}
                Err(e) => debug!(group, client, error = %e, "leave on close failed"),
            }
        }
    }
}

/// Binds `[remoting] listen` and serves it until `shutdown` stops; returns the bound address
/// (logged like the HTTP listener's).
pub async fn start(
    config: &RemotingConfig,
    broker: BrokerApi,
    auth: Arc<Authenticator>,
    shutdown: &Shutdown,
) -> anyhow::Result<SocketAddr> {
    use anyhow::Context as _;
    let listener = Listener::bind("remoting", &config.listen, config.max_connections)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} ([remoting] listen / --remoting; \"\" turns it off)",
                config.listen
            )
        })?;
    let addr = listener.local_addr();
    let state = Arc::new(RemotingState::new(broker, auth, config));
    tracing::info!(
        auto_create_groups = state.auto_create_groups,
        advertised = ?state.advertised,
        "listening remoting={addr} (RocketMQ name server + broker)"
    );
    shutdown.serve(listener, RemotingHandler::new(state));
    Ok(addr)
}

/// Per-connection facts a request handler needs.
#[derive(Debug, Clone)]
pub struct ConnCtx {
    /// Registry id of the connection.
    pub id: u64,
    /// The client's address.
    pub peer: SocketAddr,
    /// The address routes and message ids name: advertised, else what the client connected to.
    pub store_host: SocketAddr,
    /// Cancelled when the host stops (long polls answer at once).
    pub shutdown: CancellationToken,
}

/// The remoting listener's [`Handler`].
#[derive(Clone)]
pub struct RemotingHandler {
    state: Arc<RemotingState>,
}

impl RemotingHandler {
    /// A handler over shared state.
    pub fn new(state: Arc<RemotingState>) -> Self {
        RemotingHandler { state }
    }
}

impl Handler for RemotingHandler {
    async fn serve(&self, conn: Connection) {
        let state = self.state.clone();
        let id = state.next_conn.fetch_add(1, Ordering::Relaxed);
        let local = conn.stream.local_addr().unwrap_or(conn.peer);
        let ctx = ConnCtx {
            id,
            peer: conn.peer,
            store_host: state.advertised.unwrap_or(local),
            shutdown: conn.shutdown.clone(),
        };
        let (mut rd, mut wr) = conn.stream.into_split();
        let (tx, mut notices) = mpsc::channel::<Vec<u8>>(NOTICE_QUEUE);
        state.registry.lock().conns.insert(id, tx);
        // Requests run concurrently inside this one task (a long-polling pull must not hold up
        // a send on the same connection); replies gather in `out` and leave in as few writes as
        // they come in. A task and a writer hop per request cost more than the request.
        let mut requests = FuturesUnordered::new();
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut out: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut sent = 0usize;
        let mut reading = true;
        loop {
            while reading && requests.len() < MAX_IN_FLIGHT_PER_CONNECTION {
                match decode_frame(&buf) {
                    Ok(Some((cmd, used))) => {
                        let _ = buf.split_to(used);
                        if cmd.is_response() {
                            // Clients answer nothing we ask but oneway notices; ignore strays.
                            continue;
                        }
                        // At debug level: an enabled span per request costs more than a
                        // send's whole store round; the connection's span carries the peer.
                        let span = debug_span!("request", code = cmd.code, opaque = cmd.opaque);
                        requests
                            .push(run_request(state.clone(), ctx.clone(), cmd).instrument(span));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // The stream cannot be resynchronised after a bad frame: stop reading
                        // this one connection (requests in hand still answer), the host and
                        // every other client carry on.
                        warn!(error = %e, "malformed remoting frame; closing the connection");
                        reading = false;
                    }
                }
            }
            if !reading && requests.is_empty() && sent == out.len() {
                break;
            }
            // A client that does not read stops getting replies composed, then stops being read.
            let room = out.len() - sent < OUT_HIGH_WATER;
            tokio::select! {
                biased;
                () = ctx.shutdown.cancelled(), if reading => reading = false,
                n = wr.write(&out[sent..]), if sent < out.len() => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        sent += n;
                        if sent == out.len() {
                            out.clear();
                            sent = 0;
                        }
                    }
                },
                Some(reply) = requests.next(), if room && !requests.is_empty() => {
                    // Replies finished by one store round all go out in the next write: one
                    // write per reply cost more than composing them.
                    let mut reply = Some(reply);
                    while let Some(r) = reply {
                        if let Some(r) = r
                            && let Err(e) = encode_frame(&r, &mut out)
                        {
                            warn!(error = %e, "cannot encode a reply");
                        }
                        reply = if out.len() - sent < OUT_HIGH_WATER {
                            requests.next().now_or_never().flatten()
                        } else {
                            None
                        };
                    }
                }
                Some(frame) = notices.recv(), if room => out.extend_from_slice(&frame),
                r = rd.read_buf(&mut buf), if reading
                    && requests.len() < MAX_IN_FLIGHT_PER_CONNECTION => match r {
                    Ok(0) => reading = false,
                    Ok(_) => {}
                    Err(e) => {
                        debug!(error = %e, "read failed");
                        reading = false;
                    }
                },
                else => break,
            }
        }
        // A socket that failed mid-write leaves requests in hand: they still finish (their
        // replies have nowhere to go), as a send or an offset commit cut off half way would not.
        while requests.next().await.is_some() {}
        state.connection_closed(id).await;
        let _ = wr.shutdown().await;
    }
}

/// Runs one request; `None` for a oneway one, which gets no reply.
async fn run_request(state: Arc<RemotingState>, ctx: ConnCtx, cmd: Command) -> Option<Command> {
    let oneway = cmd.is_oneway();
    let reply = ops::handle(&state, &ctx, cmd).await;
    (!oneway).then_some(reply)
}
