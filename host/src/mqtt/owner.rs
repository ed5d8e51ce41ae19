//! Cluster-wide ownership of client ids: one record per client id in the store names the host
//! and connection holding it. A CONNECT claims the id with a compare-and-set; a claim that
//! replaces an online holder on another host leaves that host a [`Notice`] naming the holder's
//! channel, in a space only that host watches. That host disconnects the named connection and
//! deletes the notice once the connection has let go (its presence event and session stored),
//! so a duplicate client id is taken over across hosts as on one host, at a cost per takeover
//! rather than per client id in the cluster.

use std::time::Duration;

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

/// A takeover notice to the host of a replaced holder (JSON in [`StateSpace::MqttKick`] of that
/// host, keyed by the replaced connection's channel id, which no other notice names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// The client id taken over.
    pub client_id: String,
    /// Host id of the new holder.
    pub host: String,
    /// Address of the new holder's connection.
    pub address: String,
}

impl Notice {
    /// The notice a claim writing `record` owes the replaced `previous` holder: only an online
    /// holder on another host needs one (this host's own are taken over locally).
    pub fn for_claim(
        client_id: &str,
        previous: &OwnerRecord,
        record: &OwnerRecord,
    ) -> Option<Notice> {
        (previous.online && previous.host != record.host).then(|| Notice {
            client_id: client_id.to_owned(),
            host: record.host.clone(),
            address: record.address.clone(),
        })
    }

    /// The notice stored as `raw`, if readable.
    pub fn decode(raw: &[u8]) -> Option<Notice> {
        serde_json::from_slice(raw).ok()
    }

    /// Why the replaced connection is closed (its log line).
    pub fn reason(&self) -> String {
        format!(
            "client id taken over by a new connection from {} on host {}",
            self.address, self.host
        )
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
    /// Whether a [`Notice`] was left for the previous holder's host (see [`Owners::wait_let_go`]).
    pub noticed: bool,
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

    /// Makes this host's connection `channel` the holder of `client_id`, whoever held it, and
    /// leaves the [`Notice`] the replaced holder's host needs to disconnect it.
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
                let noticed = match previous
                    .as_ref()
                    .and_then(|p| Some((p, Notice::for_claim(client_id, p, &record)?)))
                {
                    // A dead host would never read it, and it would stay in the store.
                    Some((p, notice)) if self.host_is_live(&p.host).await => {
                        self.notify(p, &notice).await
                    }
                    _ => false,
                };
                return Ok(Claim {
                    version,
                    record,
                    previous,
                    noticed,
                });
            }
        }
    }

    /// Leaves `notice` for `holder`'s host; false (logged) when it cannot be stored.
    async fn notify(&self, holder: &OwnerRecord, notice: &Notice) -> bool {
        let raw = serde_json::to_vec(notice).unwrap_or_default();
        match self
            .broker
            .state_put(
                StateSpace::MqttKick(holder.host.clone()),
                &holder.channel,
                raw,
            )
            .await
        {
            Ok(()) => true,
            Err(e) => {
                warn!(client_id = %notice.client_id, host = %holder.host, error = %e, "cannot leave the takeover notice in the store; the connection on the other host keeps this client id until it ends");
                false
            }
        }
    }

    /// True while `host` heartbeats (also when that cannot be read: then a notice is left and
    /// waited for, bounded, rather than a session still in use loaded).
    pub async fn host_is_live(&self, host: &str) -> bool {
        match self.broker.live_hosts().await {
            Ok(hosts) => hosts.iter().any(|h| h.host_id == host),
            Err(_) => true,
        }
    }

    /// Removes the notice left for `holder`'s host (which died before handling it).
    pub async fn withdraw_notice(&self, holder: &OwnerRecord) {
        let space = StateSpace::MqttKick(holder.host.clone());
        if let Err(e) = self.broker.state_delete(space, &holder.channel).await {
            warn!(host = %holder.host, error = %e, "cannot remove the takeover notice left for a dead host");
        }
    }

    /// Waits, at most `within`, until `holder`'s host has handled the notice to its connection
    /// (the connection ended and its presence event and session are stored). False if not in
    /// time (that host may be stuck or partitioned).
    pub async fn wait_let_go(&self, holder: &OwnerRecord, within: Duration) -> bool {
        let space = StateSpace::MqttKick(holder.host.clone());
        // Taken before the first read, so a delete in between moves it.
        let mut changes = self.broker.watch_state(space.clone());
        let handled = async {
            loop {
                match self.broker.state_get(space.clone(), &holder.channel).await {
                    Ok(None) => return,
                    Ok(Some(_)) => {}
                    Err(e) => {
                        warn!(host = %holder.host, error = %e, "cannot read the takeover notice")
                    }
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(within, handled).await.is_ok()
    }

    /// Every notice to this host, by the channel id it names (`None`: unreadable).
    pub async fn notices(&self) -> Result<Vec<(String, Option<Notice>)>> {
        Ok(self
            .broker
            .state_list(self.own_notices())
            .await?
            .into_iter()
            .map(|(channel, raw)| (channel, Notice::decode(&raw)))
            .collect())
    }

    /// Forgets the notice to this host's connection `channel` (handled, or stale).
    pub async fn forget_notice(&self, channel: &str) -> Result<()> {
        self.broker.state_delete(self.own_notices(), channel).await
    }

    /// The space of notices to this host.
    pub fn own_notices(&self) -> StateSpace {
        StateSpace::MqttKick(self.broker.host_id().to_owned())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(host: &str, channel: &str, online: bool) -> OwnerRecord {
        OwnerRecord {
            host: host.into(),
            channel: channel.into(),
            address: format!("10.0.0.1:{}", channel.len()),
            persistent: false,
            online,
        }
    }

    #[test]
    fn only_an_online_holder_on_another_host_gets_a_notice() {
        let new = record("b", "b-7", true);
        let n = Notice::for_claim("GID_x@@@d", &record("a", "a-3", true), &new)
            .expect("an online holder on host a");
        assert_eq!(
            n,
            Notice {
                client_id: "GID_x@@@d".into(),
                host: "b".into(),
                address: new.address.clone(),
            }
        );
        assert_eq!(
            n.reason(),
            format!(
                "client id taken over by a new connection from {} on host b",
                new.address
            )
        );
        assert_eq!(
            Notice::for_claim("GID_x@@@d", &record("a", "a-3", false), &new),
            None,
            "a holder that let go needs no disconnect"
        );
        assert_eq!(
            Notice::for_claim("GID_x@@@d", &record("b", "b-2", true), &new),
            None,
            "this host's own holder is taken over locally"
        );
    }

    #[test]
    fn a_notice_reads_back_and_garbage_does_not() {
        let n = Notice {
            client_id: "c".into(),
            host: "b".into(),
            address: "[::1]:5".into(),
        };
        let raw = serde_json::to_vec(&n).expect("JSON");
        assert_eq!(Notice::decode(&raw), Some(n));
        assert_eq!(Notice::decode(b"{not json"), None);
    }
}
