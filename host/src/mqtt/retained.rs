//! Retained messages: the last message published with RETAIN on each topic, kept in memory for
//! new subscribers and in the store so a restart keeps them. An empty retained payload deletes.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::session::Routed;
use super::topic::matches;
use crate::broker::api::{BrokerApi, StateSpace};
use crate::error::Result;

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    topic: String,
    qos: u8,
    parent: String,
    payload_b64: String,
}

/// The retained message store.
pub struct Retained {
    map: RwLock<BTreeMap<String, Arc<Routed>>>,
    /// Durable writes one at a time, so the store ends with the last one for each topic.
    writes: tokio::sync::Mutex<()>,
}

impl Retained {
    /// Loads every stored retained message.
    pub async fn load(broker: &BrokerApi) -> Result<Retained> {
        Ok(Retained {
            map: RwLock::new(read_all(broker).await?),
            writes: tokio::sync::Mutex::new(()),
        })
    }

    /// Replaces the kept messages with the store's, after another host set or cleared one.
    pub async fn reload(&self, broker: &BrokerApi) -> Result<()> {
        // Between local writes, so the map ends as the store does.
        let _one_at_a_time = self.writes.lock().await;
        let map = read_all(broker).await?;
        *self.map.write() = map;
        Ok(())
    }

    /// Retained messages whose topic `filter` matches.
    pub fn matching(&self, filter: &str) -> Vec<Arc<Routed>> {
        self.map
            .read()
            .iter()
            .filter(|(t, _)| matches(filter, t))
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    /// Replaces (or, with an empty payload, deletes) the retained message of `topic`; durable
    /// when it returns.
    pub async fn set(
        &self,
        broker: &BrokerApi,
        topic: &str,
        qos: u8,
        payload: Bytes,
        parent: &str,
    ) -> Result<()> {
        let _one_at_a_time = self.writes.lock().await;
        if payload.is_empty() {
            self.map.write().remove(topic);
            return broker.state_delete(StateSpace::MqttRetained, topic).await;
        }
        let record = Record {
            topic: topic.to_owned(),
            qos,
            parent: parent.to_owned(),
            payload_b64: base64::engine::general_purpose::STANDARD.encode(&payload),
        };
        self.map.write().insert(
            topic.to_owned(),
            Arc::new(Routed::new(
                topic.to_owned(),
                payload,
                qos,
                None,
                parent.to_owned(),
            )),
        );
        broker
            .state_put(
                StateSpace::MqttRetained,
                topic,
                serde_json::to_vec(&record).unwrap_or_default(),
            )
            .await
    }
}

async fn read_all(broker: &BrokerApi) -> Result<BTreeMap<String, Arc<Routed>>> {
    let mut map = BTreeMap::new();
    for (topic, raw) in broker.state_list(StateSpace::MqttRetained).await? {
        let Ok(r) = serde_json::from_slice::<Record>(&raw) else {
            warn!(topic = %topic, "stored retained message is unreadable; dropping it");
            continue;
        };
        let Ok(payload) = base64::engine::general_purpose::STANDARD.decode(&r.payload_b64) else {
            continue;
        };
        map.insert(
            topic.clone(),
            Arc::new(Routed::new(
                r.topic,
                Bytes::from(payload),
                r.qos,
                None,
                r.parent,
            )),
        );
    }
    Ok(map)
}
