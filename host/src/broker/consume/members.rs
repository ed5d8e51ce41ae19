//! Group membership for clients that balance queues themselves (RocketMQ SDKs): a heartbeat
//! keeps a member row alive in the store, the member list is what every client splits the
//! queues by, and a change (join, leave, new subscriptions) is reported so the front end can tell
//! the others to rebalance. Rows live in the store, so every host sees the same list.

use serde::{Deserialize, Serialize};
use tracing::{info, instrument};

use super::filter::TagFilter;
use super::{Subscription, is_retry_topic_of};
use crate::broker::Broker;
use crate::error::{Result, WharfError};
use crate::store::MemberKind;

/// What a self-balancing client says about itself in a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberSpec {
    /// Client id, unique in the group (RocketMQ's `clientID`).
    pub member_id: String,
    /// Network address shown in status.
    pub address: String,
    /// Process id, when known.
    pub pid: Option<u32>,
    /// What it subscribes; the same topic twice keeps the last.
    pub subscriptions: Vec<Subscription>,
}

/// One live member of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// Member id (a client id, or a host id for a host's dispatcher).
    pub member_id: String,
    /// Who balances its queues.
    pub kind: MemberKind,
    /// Address (empty for a host's dispatcher).
    pub address: String,
    /// Process id, when known.
    pub pid: Option<u32>,
    /// Its subscriptions (a host's dispatcher lists topics with `*`).
    pub subscriptions: Vec<Subscription>,
    /// When the row expires without another heartbeat (store clock, ms).
    pub expires_at_ms: u64,
}

/// A self-balancing member's row body.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct MemberData {
    address: String,
    pid: Option<u32>,
    subscriptions: Vec<Subscription>,
}

/// Longest client id accepted.
const MAX_MEMBER_ID: usize = 255;

impl Broker {
    /// A self-balancing client's heartbeat: creates or refreshes its member row for the
    /// heartbeat timeout. True when the member list changed (it joined, or its subscriptions
    /// did), so the front end should tell the group's other members to rebalance.
    #[instrument(skip(self, spec), fields(group = %group, member = %spec.member_id))]
    pub(in crate::broker) async fn heartbeat_member(
        &self,
        group: &str,
        spec: MemberSpec,
    ) -> Result<bool> {
        let g = self.consumer_group(group)?;
        let id = spec.member_id.as_str();
        if id.is_empty()
            || id.len() > MAX_MEMBER_ID
            || id.chars().any(|c| c.is_control() || c == '%')
        {
            return Err(WharfError::bad_request(format!(
                "client id '{}' is invalid: use 1-{MAX_MEMBER_ID} printable characters without '%'",
                id.escape_debug()
            )));
        }
        let mut subscriptions: Vec<Subscription> = Vec::with_capacity(spec.subscriptions.len());
        for sub in spec.subscriptions {
            if !is_retry_topic_of(&sub.topic, &g.name) {
                self.topic(&sub.topic)?;
            }
            TagFilter::parse(&sub.expression)?;
            subscriptions.retain(|s| s.topic != sub.topic);
            subscriptions.push(sub);
        }
        subscriptions.sort_by(|a, b| a.topic.cmp(&b.topic));
        let data = MemberData {
            address: spec.address,
            pid: spec.pid,
            subscriptions,
        };
        let before = self
            .store
            .member_list(&g.name)
            .await?
            .into_iter()
            .find(|m| m.member_id == id)
            .and_then(|m| serde_json::from_slice::<MemberData>(&m.data).ok());
        let raw = serde_json::to_vec(&data)
            .map_err(|e| WharfError::internal(format!("cannot encode member row: {e}")))?;
        let ttl = self.config.consumer_heartbeat_timeout_ms;
        let joined = self
            .store
            .member_heartbeat(&g.name, id, MemberKind::SelfBalancing, raw, ttl)
            .await?;
        if joined {
            info!(address = %data.address, "self-balancing consumer joined");
        }
        let changed = joined
            || before
                .as_ref()
                .is_none_or(|b| b.subscriptions != data.subscriptions);
        Ok(changed)
    }

    /// Live members of `group`, sorted by id: self-balancing clients and hosts' dispatchers.
    pub(in crate::broker) async fn members(&self, group: &str) -> Result<Vec<Member>> {
        self.consumer_group(group)?;
        let rows = self.store.member_list(group).await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let (address, pid, subscriptions) = match row.kind {
                    MemberKind::SelfBalancing => serde_json::from_slice::<MemberData>(&row.data)
                        .map(|d| (d.address, d.pid, d.subscriptions))
                        .unwrap_or_default(),
                    MemberKind::HostAssigned => (String::new(), None, Vec::new()),
                };
                Member {
                    member_id: row.member_id,
                    kind: row.kind,
                    address,
                    pid,
                    subscriptions,
                    expires_at_ms: row.expires_at_ms,
                }
            })
            .collect())
    }

    /// Ids of the group's live self-balancing members, sorted: the list SDK clients split by.
    pub(in crate::broker) async fn member_ids(&self, group: &str) -> Result<Vec<String>> {
        Ok(self
            .members(group)
            .await?
            .into_iter()
            .filter(|m| m.kind == MemberKind::SelfBalancing)
            .map(|m| m.member_id)
            .collect())
    }

    /// A self-balancing client leaves (unregister); true when it was a live member.
    pub(in crate::broker) async fn leave(&self, group: &str, member_id: &str) -> Result<bool> {
        self.consumer_group(group)?;
        let left = self.store.member_remove(group, member_id).await?;
        if left {
            info!(group, member = member_id, "self-balancing consumer left");
        }
        Ok(left)
    }
}
