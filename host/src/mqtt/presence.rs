//! Online/offline events: for a client `GID_X@@@device`, each connect and disconnect is sent to
//! broker topic `GID_X_MQTT` (when it exists) with tag `connect`, `disconnect` (the client sent
//! DISCONNECT) or `tcpclean` (the connection went away for any other reason) and the JSON body
//! `{"clientId","time","eventType","channelId","eventIndex"}`.
//!
//! `eventIndex` strictly increases per client, across restarts and across hosts sharing a store:
//! each event takes the client's durable counter up by one with a compare-and-set (events are
//! rare; one store round trip each). A client's first counter starts above every index the
//! older `boot << 32 | n` scheme gave (`(last boot + 1) << 32`), so an upgrade never goes back.
//! Consumers order a device's events by it (see plugins/device-presence).

use bytes::Bytes;
use serde::Serialize;
use tracing::{debug, warn};

use super::CLIENT_ID_SEPARATOR;
use crate::broker::api::{BrokerApi, OutgoingMessage, QueueChoice, StateSpace};

/// The older scheme's durable boot counter (read, never moved now).
const BOOT_KEY: &str = "%boot";

/// Kinds of presence event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// CONNECT accepted.
    Connect,
    /// The client sent DISCONNECT.
    Disconnect,
    /// The connection closed without DISCONNECT.
    TcpClean,
}

impl EventType {
    fn tag(self) -> &'static str {
        match self {
            EventType::Connect => "connect",
            EventType::Disconnect => "disconnect",
            EventType::TcpClean => "tcpclean",
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    client_id: &'a str,
    time: u64,
    event_type: &'a str,
    channel_id: &'a str,
    event_index: u64,
}

/// Presence event sender.
pub struct Presence {
    broker: BrokerApi,
    /// Lowest index a client's counter may hold (above the older scheme's indexes).
    base: tokio::sync::OnceCell<u64>,
}

impl Presence {
    /// A sender over `broker`.
    pub fn new(broker: BrokerApi) -> Presence {
        Presence {
            broker,
            base: tokio::sync::OnceCell::new(),
        }
    }

    async fn base(&self) -> crate::error::Result<u64> {
        self.base
            .get_or_try_init(|| async {
                let last_boot = self
                    .broker
                    .state_get(StateSpace::MqttPresence, BOOT_KEY)
                    .await?
                    .and_then(|v| String::from_utf8(v).ok())
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0);
                Ok((last_boot + 1) << 32)
            })
            .await
            .copied()
    }

    /// Takes the client's next `eventIndex` from its durable counter.
    async fn next_index(&self, client_id: &str) -> crate::error::Result<u64> {
        let base = self.base().await?;
        // Another host's event for the same client makes the write conflict: read again.
        loop {
            let current = self
                .broker
                .state_entry(StateSpace::MqttPresence, client_id)
                .await?;
            let (last, expected) = match current {
                Some((raw, version)) => (
                    String::from_utf8(raw)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok()),
                    Some(version),
                ),
                None => (None, None),
            };
            let next = last.unwrap_or(base).max(base) + 1;
            if self
                .broker
                .state_put_if(
                    StateSpace::MqttPresence,
                    client_id,
                    next.to_string().into_bytes(),
                    expected,
                )
                .await?
                .is_some()
            {
                return Ok(next);
            }
        }
    }

    /// Sends one event for `client_id` if its group has a `<group>_MQTT` topic.
    pub async fn event(&self, client_id: &str, kind: EventType, channel_id: &str) {
        let Some((group, _)) = client_id.split_once(CLIENT_ID_SEPARATOR) else {
            return;
        };
        let topic = format!("{group}_MQTT");
        if self.broker.topic(&topic).is_err() {
            return;
        }
        let event_index = match self.next_index(client_id).await {
            Ok(n) => n,
            Err(e) => {
                warn!(client_id, error = %e, "cannot take a presence event index; event not sent");
                return;
            }
        };
        let body = Body {
            client_id,
            time: self.broker.clock().now_ms(),
            event_type: kind.tag(),
            channel_id,
            event_index,
        };
        let msg = OutgoingMessage {
            tag: Some(kind.tag().to_owned()),
            // By client id and by channel, so a consumer can tell which connection an event is of.
            keys: vec![client_id.to_owned(), channel_id.to_owned()],
            body: Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
            // One client's events stay in one queue, in order.
            queue: QueueChoice::ShardingKey(client_id.to_owned()),
            ..Default::default()
        };
        match self.broker.send(&topic, vec![msg]).await {
            Ok(_) => debug!(client_id, event = kind.tag(), "presence event sent"),
            Err(e) => {
                warn!(client_id, event = kind.tag(), error = %e, "cannot send presence event")
            }
        }
    }
}
