//! Cluster-wide ownership of client ids: one record per client id in the store names the host
//! and connection holding it. A CONNECT claims the id with a compare-and-set; every host
//! watches the records and disconnects its own connection when another host's claim names a
//! different one, so a duplicate client id is taken over across hosts as on one host.

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::broker::api::{BrokerApi, StateSpace};
use crate::error::Result;

/// Who holds a client id (JSON in the store's MQTT owner space).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// Host id of the holding host ([`BrokerApi::host_id`]).
    pub host: String,
    /// Channel id of the holding connection.
    pub channel: String,
    /// The connection's address.
    pub address: String,
    /// clean-session=false: the holder stores its session when it lets go.
    pub persistent: bool,
    /// False once the holder let go (the client disconnected).
    pub online: bool,
}

impl OwnerRecord {
    fn decode(raw: &[u8]) -> Option<OwnerRecord> {
        serde_json::from_slice(raw).ok()
    }
}

/// A claim taken on CONNECT.
#[derive(Debug, Clone)]
pub struct Claim {
    /// Store version of the record this connection wrote.
    pub version: u64,
    /// The record this connection wrote.
    pub record: OwnerRecord,
    /// The record before this claim (its `online` says whether a connection held the id).
    pub previous: Option<OwnerRecord>,
}

/// Reads and writes owner records.
pub struct Owners {
    broker: BrokerApi,
}

impl Owners {
    /// Owner records over `broker`.
    pub fn new(broker: BrokerApi) -> Owners {
        Owners { broker }
    }

    /// The current holder of `client_id`, if a record exists.
    pub async fn get(&self, client_id: &str) -> Result<Option<OwnerRecord>> {
        Ok(self
            .broker
            .state_get(StateSpace::MqttOwner, client_id)
            .await?
            .and_then(|raw| OwnerRecord::decode(&raw)))
    }

    /// Every record, by client id (unreadable ones skipped).
    pub async fn list(&self) -> Result<Vec<(String, OwnerRecord)>> {
        Ok(self
            .broker
            .state_list(StateSpace::MqttOwner)
            .await?
            .into_iter()
            .filter_map(|(k, raw)| Some((k, OwnerRecord::decode(&raw)?)))
            .collect())
    }

    /// Makes this host's connection `channel` the holder of `client_id`, whoever held it.
    pub async fn claim(
        &self,
        client_id: &str,
        channel: &str,
        address: &str,
        persistent: bool,
    ) -> Result<Claim> {
        let record = OwnerRecord {
            host: self.broker.host_id().to_owned(),
            channel: channel.to_owned(),
            address: address.to_owned(),
            persistent,
            online: true,
        };
        let raw = serde_json::to_vec(&record).unwrap_or_default();
        // A racing claim on another host makes the write conflict: read again and retry, so
        // exactly one connection ends up named and every other is disconnected by its host.
        loop {
            let current = self
                .broker
                .state_entry(StateSpace::MqttOwner, client_id)
                .await?;
            let (previous, expected) = match current {
                Some((v, version)) => (OwnerRecord::decode(&v), Some(version)),
                None => (None, None),
            };
            if let Some(version) = self
                .broker
                .state_put_if(StateSpace::MqttOwner, client_id, raw.clone(), expected)
                .await?
            {
                return Ok(Claim {
                    version,
                    record,
                    previous,
                });
            }
        }
    }

    /// Marks `client_id` offline if `claim` still holds it (a later claim is left alone).
    pub async fn release(&self, client_id: &str, claim: &Claim) {
        let record = OwnerRecord {
            online: false,
            ..claim.record.clone()
        };
        let raw = serde_json::to_vec(&record).unwrap_or_default();
        if let Err(e) = self
            .broker
            .state_put_if(StateSpace::MqttOwner, client_id, raw, Some(claim.version))
            .await
        {
            warn!(client_id, error = %e, "cannot mark the MQTT client id offline in the store; inspection on other hosts may show it online");
        }
    }
}
