//! Member and lease rows of the embedded store.
//!
//! One host owns an embedded store, so the rows live in memory and die with the process; every
//! holder and member dies with it too. Expiry compares against the store clock's `now`, passed
//! in by the caller so the rules here are pure and unit-tested.
//!
//! Lease epochs are `boot << 32 | n`: `boot` is the data dir's boot counter (persisted, +1 on
//! every open) and `n` grows by one each time a queue's lease is taken anew. So an epoch never
//! goes backwards for a queue, not even across restarts, without writing anything per lease;
//! receipts and fenced commits from an earlier boot can never match a current epoch.

use std::collections::{BTreeMap, HashMap};

use crate::store::{Lease, LeaseKey, MemberKind, MemberRow};

/// The last lease taken on one queue. Kept after release or expiry: its epoch is the queue's
/// fence until the next holder takes the lease.
#[derive(Debug, Clone)]
struct Slot {
    holder: Option<String>,
    epoch: u64,
    expires_at_ms: u64,
}

impl Slot {
    fn lease(&self, key: &LeaseKey) -> Option<Lease> {
        Some(Lease {
            key: key.clone(),
            holder: self.holder.clone()?,
            epoch: self.epoch,
            expires_at_ms: self.expires_at_ms,
        })
    }
}

/// Every member and lease row of the store.
#[derive(Debug)]
pub struct Coord {
    epoch_base: u64,
    members: HashMap<String, BTreeMap<String, MemberRow>>,
    leases: HashMap<LeaseKey, Slot>,
}

impl Coord {
    /// Empty rows for boot number `boot` of the data dir.
    pub fn new(boot: u64) -> Coord {
        Coord {
            epoch_base: boot << 32,
            members: HashMap::new(),
            leases: HashMap::new(),
        }
    }

    /// Upserts a member live until `now + ttl_ms`; true when it was not live before.
    pub fn heartbeat(
        &mut self,
        now: u64,
        group: &str,
        member_id: &str,
        kind: MemberKind,
        data: Vec<u8>,
        ttl_ms: u64,
    ) -> bool {
        let rows = self.members.entry(group.to_string()).or_default();
        let expires_at_ms = now.saturating_add(ttl_ms);
        match rows.get_mut(member_id) {
            Some(row) => {
                let was_live = row.expires_at_ms > now;
                row.kind = kind;
                row.data = data;
                row.expires_at_ms = expires_at_ms;
                !was_live
            }
            None => {
                rows.insert(
                    member_id.to_string(),
                    MemberRow {
                        group: group.to_string(),
                        member_id: member_id.to_string(),
                        kind,
                        data,
                        expires_at_ms,
                    },
                );
                true
            }
        }
    }

    /// Live members of `group` by id; expired rows are dropped on the way.
    pub fn members(&mut self, now: u64, group: &str) -> Vec<MemberRow> {
        let Some(rows) = self.members.get_mut(group) else {
            return Vec::new();
        };
        rows.retain(|_, r| r.expires_at_ms > now);
        let live: Vec<MemberRow> = rows.values().cloned().collect();
        if rows.is_empty() {
            self.members.remove(group);
        }
        live
    }

    /// Removes a member; true if it was live.
    pub fn remove_member(&mut self, now: u64, group: &str, member_id: &str) -> bool {
        let Some(rows) = self.members.get_mut(group) else {
            return false;
        };
        let was_live = rows
            .remove(member_id)
            .is_some_and(|r| r.expires_at_ms > now);
        if rows.is_empty() {
            self.members.remove(group);
        }
        was_live
    }

    /// Takes the lease when free or expired (next epoch), renews it when `holder` holds it
    /// (same epoch); `None` while another holder's lease is live.
    pub fn acquire(
        &mut self,
        now: u64,
        key: &LeaseKey,
        holder: &str,
        ttl_ms: u64,
    ) -> Option<Lease> {
        let expires_at_ms = now.saturating_add(ttl_ms);
        match self.leases.get_mut(key) {
            Some(slot) => {
                let live = slot.holder.is_some() && slot.expires_at_ms > now;
                if live && slot.holder.as_deref() != Some(holder) {
                    return None;
                }
                if !live {
                    slot.epoch += 1;
                    slot.holder = Some(holder.to_string());
                }
                slot.expires_at_ms = expires_at_ms;
                slot.lease(key)
            }
            None => {
                let slot = Slot {
                    holder: Some(holder.to_string()),
                    epoch: self.epoch_base + 1,
                    expires_at_ms,
                };
                let lease = slot.lease(key);
                self.leases.insert(key.clone(), slot);
                lease
            }
        }
    }

    /// Extends `lease` while it is still the queue's lease (same holder and epoch, even past
    /// its expiry when nobody took it since); `None` when it was lost.
    pub fn renew(&mut self, now: u64, lease: &Lease, ttl_ms: u64) -> Option<Lease> {
        let slot = self.leases.get_mut(&lease.key)?;
        if slot.epoch != lease.epoch || slot.holder.as_deref() != Some(lease.holder.as_str()) {
            return None;
        }
        slot.expires_at_ms = now.saturating_add(ttl_ms);
        slot.lease(&lease.key)
    }

    /// Gives `lease` up if it is still the queue's lease; its epoch stays the fence.
    pub fn release(&mut self, lease: &Lease) {
        if let Some(slot) = self.leases.get_mut(&lease.key)
            && slot.epoch == lease.epoch
            && slot.holder.as_deref() == Some(lease.holder.as_str())
        {
            slot.holder = None;
        }
    }

    /// Live leases of `group`, sorted by key.
    pub fn leases(&self, now: u64, group: &str) -> Vec<Lease> {
        let mut out: Vec<Lease> = self
            .leases
            .iter()
            .filter(|(k, s)| k.group == group && s.expires_at_ms > now)
            .filter_map(|(k, s)| s.lease(k))
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// True when `epoch` is the epoch of the last lease taken on `(group, topic, queue_id)`.
    pub fn is_current(&self, group: &str, topic: &str, queue_id: u32, epoch: u64) -> bool {
        let key = LeaseKey {
            group: group.to_string(),
            topic: topic.to_string(),
            queue_id,
        };
        self.leases.get(&key).is_some_and(|s| s.epoch == epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(q: u32) -> LeaseKey {
        LeaseKey {
            group: "G".into(),
            topic: "T".into(),
            queue_id: q,
        }
    }

    #[test]
    fn epochs_start_above_every_earlier_boot() {
        let mut first = Coord::new(1);
        let mut last = 0;
        for i in 0..5 {
            let l = first.acquire(i * 10, &k(0), &format!("h{i}"), 5).unwrap();
            assert!(l.epoch > last);
            last = l.epoch;
        }
        let mut second = Coord::new(2);
        let l = second.acquire(0, &k(0), "h", 5).unwrap();
        assert!(l.epoch > last, "a later boot never reuses an epoch");
        assert!(!second.is_current("G", "T", 0, last));
        assert!(second.is_current("G", "T", 0, l.epoch));
    }

    #[test]
    fn release_keeps_the_fence_until_the_next_holder() {
        let mut c = Coord::new(1);
        let l = c.acquire(0, &k(0), "h1", 100).unwrap();
        c.release(&l);
        assert!(
            c.is_current("G", "T", 0, l.epoch),
            "final commits after release land"
        );
        assert!(c.leases(0, "G").is_empty());
        let l2 = c.acquire(1, &k(0), "h2", 100).unwrap();
        assert!(!c.is_current("G", "T", 0, l.epoch));
        assert_eq!(l2.epoch, l.epoch + 1);
    }

    #[test]
    fn members_expire_at_their_deadline() {
        let mut c = Coord::new(1);
        assert!(c.heartbeat(0, "G", "m", MemberKind::HostAssigned, vec![1], 10));
        assert_eq!(c.members(9, "G").len(), 1);
        assert!(c.members(10, "G").is_empty());
        assert!(c.heartbeat(10, "G", "m", MemberKind::HostAssigned, vec![], 10));
        assert!(c.remove_member(11, "G", "m"));
        assert!(c.members.is_empty(), "empty groups are dropped");
    }
}
