//! What the gateway shows about devices, MQTT groups and topics (HTTP `/v1/mqtt/...` and
//! `wharf mqtt ...`).

use std::sync::Arc;

use serde::Serialize;

use super::metrics::TopicCounts;
use super::session::Session;
use super::topic::first_level;
use super::{CLIENT_ID_SEPARATOR, Gateway};

/// One subscription of a device.
#[derive(Debug, Clone, Serialize)]
pub struct SubscriptionView {
    /// Topic filter.
    pub filter: String,
    /// Granted QoS.
    pub qos: u8,
}

/// A device (client id) as the gateway knows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceView {
    /// Client id.
    pub client_id: String,
    /// Connected now (to this host or another sharing the store).
    pub online: bool,
    /// Id of the host the device is connected to, when online.
    pub host: Option<String>,
    /// Address of the current (or last) connection.
    pub address: String,
    /// Last CONNECT accepted (ms).
    pub last_connect_ms: u64,
    /// Last disconnect (ms), if any.
    pub last_disconnect_ms: Option<u64>,
    /// clean-session=false: the session is kept while offline.
    pub persistent: bool,
    /// Subscriptions with granted QoS.
    pub subscriptions: Vec<SubscriptionView>,
    /// Messages waiting to be sent.
    pub queued: usize,
    /// QoS 1/2 messages sent and not yet acknowledged.
    pub inflight: usize,
    /// QoS 0 messages dropped because the client read too slowly.
    pub dropped_qos0: u64,
}

/// An MQTT group.
#[derive(Debug, Clone, Serialize)]
pub struct GroupView {
    /// Group id.
    pub group: String,
    /// Devices connected now.
    pub online: usize,
    /// Sessions known (online, or offline with clean-session=false).
    pub sessions: usize,
    /// Deliveries waiting or in flight over the group's sessions.
    pub pending: usize,
    /// Client ids of connected devices.
    pub online_clients: Vec<String>,
}

/// An MQTT parent topic.
#[derive(Debug, Clone, Serialize)]
pub struct TopicView {
    /// Broker topic.
    pub topic: String,
    /// Online sessions with a filter under this topic (or a wildcard first level).
    pub subscribers: usize,
    /// Subscribing client ids (online).
    pub subscriber_clients: Vec<String>,
    /// Messages MQTT clients published to it since start.
    pub published_total: u64,
    /// Messages routed from it since start.
    pub routed_total: u64,
    /// Deliveries to MQTT clients since start.
    pub delivered_total: u64,
    /// Recent rates (per second over the last sample window).
    pub rates: Rates,
}

/// Per-second rates.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Rates {
    /// Published by MQTT clients, per second.
    pub in_per_sec: f64,
    /// Delivered to MQTT clients, per second.
    pub out_per_sec: f64,
    /// Window the rate is over (ms).
    pub window_ms: u64,
}

/// One topic's rate sample: when, the counts then, and the rate computed then.
pub(crate) type RateSample = (u64, TopicCounts, Option<Rates>);

fn device(s: &Session, host_id: &str) -> DeviceView {
    let attached = s.attached.lock().as_ref().map(|a| a.address.clone());
    let st = s.state.lock();
    DeviceView {
        client_id: s.client_id.clone(),
        online: attached.is_some(),
        host: attached.as_ref().map(|_| host_id.to_owned()),
        address: attached.unwrap_or_else(|| st.last_address.clone()),
        last_connect_ms: st.last_connect_ms,
        last_disconnect_ms: st.last_disconnect_ms,
        persistent: s.persistent,
        subscriptions: st
            .subs
            .iter()
            .map(|(f, q)| SubscriptionView {
                filter: f.clone(),
                qos: *q,
            })
            .collect(),
        queued: s.outbox.len() + s.lagged(),
        inflight: st.inflight.len(),
        dropped_qos0: s.dropped.load(std::sync::atomic::Ordering::Relaxed),
    }
}

impl Gateway {
    /// A device by client id, if the gateway knows it (online here or on another host sharing
    /// the store, or with a stored session).
    pub async fn device(&self, client_id: &str) -> Option<DeviceView> {
        let me = self.inner.broker.host_id();
        let local = self
            .inner
            .sessions
            .lock()
            .get(client_id)
            .map(|s| device(s, me));
        if local.as_ref().is_some_and(|d| d.online) {
            return local;
        }
        // Not connected here: the owner record says whether another host holds it.
        let owner = match self.inner.owners.get(client_id).await {
            Ok(o) => o.filter(|o| o.online && o.host != me),
            Err(e) => {
                tracing::warn!(client_id, error = %e, "cannot read the MQTT client id owner; showing this host's view");
                None
            }
        };
        let Some(owner) = owner else { return local };
        let mut d = local.unwrap_or_else(|| DeviceView {
            client_id: client_id.to_owned(),
            online: false,
            host: None,
            address: String::new(),
            last_connect_ms: 0,
            last_disconnect_ms: None,
            persistent: owner.persistent,
            subscriptions: Vec::new(),
            queued: 0,
            inflight: 0,
            dropped_qos0: 0,
        });
        d.online = true;
        d.host = Some(owner.host);
        d.address = owner.address;
        Some(d)
    }

    /// An MQTT group's view (client ids `group@@@…`).
    pub fn group(&self, group: &str) -> GroupView {
        let prefix = format!("{group}{CLIENT_ID_SEPARATOR}");
        let sessions: Vec<Arc<Session>> = self
            .inner
            .sessions
            .lock()
            .values()
            .filter(|s| s.client_id.starts_with(&prefix))
            .cloned()
            .collect();
        let mut online_clients: Vec<String> = sessions
            .iter()
            .filter(|s| s.online())
            .map(|s| s.client_id.clone())
            .collect();
        online_clients.sort();
        GroupView {
            group: group.to_owned(),
            online: online_clients.len(),
            sessions: sessions.len(),
            pending: sessions
                .iter()
                .map(|s| s.outbox.len() + s.lagged() + s.state.lock().inflight.len())
                .sum(),
            online_clients,
        }
    }

    /// An MQTT parent topic's view.
    pub fn topic(&self, topic: &str) -> TopicView {
        let sessions: Vec<Arc<Session>> = self
            .inner
            .sessions
            .lock()
            .values()
            .filter(|s| s.online())
            .cloned()
            .collect();
        let mut subscriber_clients: Vec<String> = sessions
            .iter()
            .filter(|s| {
                s.state.lock().subs.keys().any(|f| {
                    let l = first_level(f);
                    l == topic || l == "+" || l == "#"
                })
            })
            .map(|s| s.client_id.clone())
            .collect();
        subscriber_clients.sort();
        let now = self.inner.metrics.topic(topic);
        let rates = self.inner.rates(topic, now);
        TopicView {
            topic: topic.to_owned(),
            subscribers: subscriber_clients.len(),
            subscriber_clients,
            published_total: now.published,
            routed_total: now.routed,
            delivered_total: now.delivered,
            rates,
        }
    }
}

impl super::Inner {
    /// Rates since the previous sample of `topic` (samples kept at least 1 s apart, so two
    /// quick reads still show a meaningful rate).
    fn rates(&self, topic: &str, now: TopicCounts) -> Rates {
        let now_ms = self.broker.clock().now_ms();
        let mut samples = self.rate_samples.lock();
        let entry = samples
            .entry(topic.to_owned())
            .or_insert((now_ms, now, None));
        let (at, counts, last_rate) = *entry;
        let elapsed = now_ms.saturating_sub(at);
        if elapsed >= 1000 {
            let secs = elapsed as f64 / 1000.0;
            let r = Rates {
                in_per_sec: now.published.saturating_sub(counts.published) as f64 / secs,
                out_per_sec: now.delivered.saturating_sub(counts.delivered) as f64 / secs,
                window_ms: elapsed,
            };
            *entry = (now_ms, now, Some(r));
            r
        } else {
            last_rate.unwrap_or_default()
        }
    }
}
