//! Online/offline events: for a client `GID_X@@@device`, each connect and disconnect is sent to
//! broker topic `GID_X_MQTT` (when it exists) with tag `connect`, `disconnect` (the client sent
//! DISCONNECT) or `tcpclean` (the connection went away for any other reason) and the JSON body
//! `{"clientId","time","eventType","channelId","eventIndex"}`.
//!
//! `eventIndex` strictly increases per client, across restarts too: it is `boot << 32 | n`, where
//! `boot` is a durable counter taken once per start of the host and `n` counts the client's
//! events in this boot. Consumers order a device's events by it (see plugins/device-presence).

use std::collections::HashMap;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::Serialize;
use tracing::{debug, warn};

use super::CLIENT_ID_SEPARATOR;
use crate::broker::api::{BrokerApi, OutgoingMessage, QueueChoice, StateSpace};

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
    boot: tokio::sync::OnceCell<u64>,
    counters: Mutex<HashMap<String, u64>>,
}

impl Presence {
    /// A sender over `broker`.
    pub fn new(broker: BrokerApi) -> Presence {
        Presence {
            broker,
            boot: tokio::sync::OnceCell::new(),
            counters: Mutex::new(HashMap::new()),
        }
    }

    async fn boot(&self) -> crate::error::Result<u64> {
        self.boot
            .get_or_try_init(|| async {
                let last = self
                    .broker
                    .state_get(StateSpace::MqttPresence, BOOT_KEY)
                    .await?
                    .and_then(|v| String::from_utf8(v).ok())
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0);
                let boot = last + 1;
                self.broker
                    .state_put(
                        StateSpace::MqttPresence,
                        BOOT_KEY,
                        boot.to_string().into_bytes(),
                    )
                    .await?;
                Ok(boot)
            })
            .await
            .copied()
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
        let boot = match self.boot().await {
            Ok(b) => b,
            Err(e) => {
                warn!(client_id, error = %e, "cannot take a presence boot number; event not sent");
                return;
            }
        };
        let n = {
            let mut c = self.counters.lock();
            let n = c.entry(client_id.to_owned()).or_insert(0);
            *n += 1;
            *n
        };
        let body = Body {
            client_id,
            time: self.broker.clock().now_ms(),
            event_type: kind.tag(),
            channel_id,
            event_index: (boot << 32) | n,
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
