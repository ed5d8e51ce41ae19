//! In-memory state of one consumer group: live instances, queue ownership, progress, counters.

use std::collections::{BTreeMap, HashMap};

use super::Subscription;
use super::filter::TagFilter;
use super::progress::{QueueKey, QueueState};
use super::rebalance::average_share;
use crate::broker::ConsumeModel;
use crate::store::{CommittedOffset, Lease};

/// One live consumer instance.
#[derive(Debug)]
pub struct Instance {
    /// Address shown in status.
    pub address: String,
    /// Process id, when known.
    pub pid: Option<u32>,
    /// Subscriptions as registered (one per topic, the last wins).
    pub subscriptions: Vec<Subscription>,
    /// Parsed filters by topic.
    pub filters: BTreeMap<String, TagFilter>,
    /// Last heartbeat, register or receive (clock ms).
    pub last_seen_ms: u64,
    /// Delivered, unsettled messages.
    pub in_flight: usize,
    /// Their body bytes.
    pub in_flight_bytes: usize,
    /// Queues it reads (clustering: its share; broadcasting: all of its topics).
    pub assigned: Vec<QueueKey>,
    /// Where the next receive starts in `assigned`, so queues are served in turn.
    pub cursor: usize,
    /// Broadcasting only: its own progress per queue.
    pub own: BTreeMap<QueueKey, QueueState>,
    /// Broadcasting only: offsets loaded from the store when it registered.
    pub own_loaded: HashMap<QueueKey, u64>,
    /// Long polls open now (a waiting instance is alive even without heartbeats).
    pub polling: u32,
}

impl Instance {
    /// A fresh instance with parsed subscriptions.
    pub fn new(
        address: String,
        pid: Option<u32>,
        subscriptions: Vec<Subscription>,
        filters: BTreeMap<String, TagFilter>,
        now_ms: u64,
    ) -> Instance {
        Instance {
            address,
            pid,
            subscriptions,
            filters,
            last_seen_ms: now_ms,
            in_flight: 0,
            in_flight_bytes: 0,
            assigned: Vec::new(),
            cursor: 0,
            own: BTreeMap::new(),
            own_loaded: HashMap::new(),
            polling: 0,
        }
    }

    /// Canonical subscription set, for consistency checks.
    pub fn signature(&self) -> BTreeMap<String, String> {
        self.filters
            .iter()
            .map(|(t, f)| (t.clone(), f.canonical()))
            .collect()
    }

    /// Releases flow-control credit for one settled or recalled message.
    pub fn release(&mut self, bytes: usize) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(bytes);
    }
}

/// Settled-message counts per clock second over a short window, for consume TPS.
#[derive(Debug, Default)]
pub struct RateWindow {
    buckets: [(u64, u64); RATE_WINDOW_SECS as usize],
}

/// Seconds the consume TPS averages over.
pub const RATE_WINDOW_SECS: u64 = 10;

impl RateWindow {
    /// Counts `n` events at `now_ms`.
    pub fn add(&mut self, now_ms: u64, n: u64) {
        let sec = now_ms / 1000;
        let slot = &mut self.buckets[(sec % RATE_WINDOW_SECS) as usize];
        if slot.0 != sec {
            *slot = (sec, 0);
        }
        slot.1 += n;
    }

    /// Events per second over the window ending at `now_ms`.
    pub fn per_second(&self, now_ms: u64) -> f64 {
        let sec = now_ms / 1000;
        let total: u64 = self
            .buckets
            .iter()
            .filter(|(s, _)| *s + RATE_WINDOW_SECS > sec && *s <= sec)
            .map(|(_, n)| n)
            .sum();
        total as f64 / RATE_WINDOW_SECS as f64
    }
}

/// State of one consumer group.
#[derive(Debug)]
pub struct GroupState {
    /// Clustering or broadcasting (fixed when the state is built).
    pub model: ConsumeModel,
    /// Creation time of the group this state belongs to (a re-created group starts afresh).
    pub created_ms: u64,
    /// Live instances by id (sorted: the allocation relies on it).
    pub instances: BTreeMap<String, Instance>,
    /// Clustering: shared progress per queue.
    pub queues: BTreeMap<QueueKey, QueueState>,
    /// Clustering: committed offsets loaded from the store, for queues without progress yet.
    pub loaded: HashMap<QueueKey, u64>,
    /// Offsets of departed broadcasting instances still to be written: (offset owner, offsets).
    pub unflushed: Vec<(String, Vec<CommittedOffset>)>,
    /// Earliest consume-timeout deadline (clock ms); `u64::MAX` when nothing is in flight.
    pub next_deadline_ms: u64,
    /// Settled messages per second.
    pub rate: RateWindow,
    /// Last settle time.
    pub last_consume_ms: Option<u64>,
    /// Subscriptions last persisted for the group (for queries while it is offline).
    pub persisted_subscriptions: Option<Vec<Subscription>>,
    /// Last consistency verdict logged, so a warning is logged once per change.
    pub warned_inconsistent: Vec<String>,
    /// Clustering: the queue leases this host holds for the group; only these are served.
    pub leases: BTreeMap<QueueKey, Lease>,
    /// Clock time of the last lease pass (renewals run every `LEASE_RENEW_MS`).
    pub last_lease_pass_ms: u64,
}

impl GroupState {
    /// Empty state with the group's loaded offsets.
    pub fn new(model: ConsumeModel, offsets: Vec<CommittedOffset>) -> GroupState {
        GroupState {
            model,
            created_ms: 0,
            instances: BTreeMap::new(),
            queues: BTreeMap::new(),
            loaded: offsets
                .into_iter()
                .map(|o| ((o.topic, o.queue_id), o.offset))
                .collect(),
            unflushed: Vec::new(),
            next_deadline_ms: u64::MAX,
            rate: RateWindow::default(),
            last_consume_ms: None,
            persisted_subscriptions: None,
            warned_inconsistent: Vec::new(),
            leases: BTreeMap::new(),
            last_lease_pass_ms: 0,
        }
    }

    /// Recomputes who reads which queue. `queues_of` gives the queue ids of a topic this host
    /// may serve (all of them for broadcasting; those it holds leases on for clustering; none if
    /// the topic is gone); `retry_topic` is read by every clustering instance. Queues changing hands get a new epoch;
    /// messages already delivered stay with whoever holds them until settled or past the consume
    /// timeout (a slow consumer keeps its work), while ready ones go to the new owner.
    pub fn rebalance(&mut self, queues_of: &dyn Fn(&str) -> Vec<u32>, retry_topic: &str) {
        let mut topics: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (id, inst) in &self.instances {
            for topic in inst.filters.keys() {
                topics.entry(topic.clone()).or_default().push(id.clone());
            }
        }
        let mut assigned: BTreeMap<String, Vec<QueueKey>> = self
            .instances
            .keys()
            .map(|id| (id.clone(), Vec::new()))
            .collect();
        match self.model {
            ConsumeModel::Broadcasting => {
                for (topic, ids) in &topics {
                    for id in ids {
                        if let Some(list) = assigned.get_mut(id) {
                            list.extend(queues_of(topic).into_iter().map(|q| (topic.clone(), q)));
                        }
                    }
                }
            }
            ConsumeModel::Clustering => {
                if !self.instances.is_empty() {
                    let all: Vec<String> = self.instances.keys().cloned().collect();
                    topics.insert(retry_topic.to_string(), all);
                }
                for (topic, ids) in &topics {
                    let queues = queues_of(topic);
                    for (i, id) in ids.iter().enumerate() {
                        if let Some(list) = assigned.get_mut(id) {
                            let share = average_share(queues.len() as u32, ids.len(), i);
                            list.extend(
                                queues[share.start as usize..share.end as usize]
                                    .iter()
                                    .map(|q| (topic.clone(), *q)),
                            );
                        }
                    }
                }
                let owner: HashMap<&QueueKey, &String> = assigned
                    .iter()
                    .flat_map(|(id, keys)| keys.iter().map(move |k| (k, id)))
                    .collect();
                for (key, q) in self.queues.iter_mut() {
                    let new_owner = owner.get(key).map(|s| (*s).clone());
                    if q.owner != new_owner {
                        q.owner = new_owner;
                        q.epoch += 1;
                    }
                }
            }
        }
        for (id, keys) in assigned {
            if let Some(inst) = self.instances.get_mut(&id) {
                if inst.assigned != keys {
                    inst.cursor = 0;
                }
                inst.assigned = keys;
            }
        }
    }

    /// Instances whose subscriptions differ from the most common set (ties: the set of the
    /// first instance id), sorted; empty when consistent.
    pub fn inconsistent_instances(&self) -> Vec<String> {
        let mut counts: Vec<(BTreeMap<String, String>, usize)> = Vec::new();
        for inst in self.instances.values() {
            let sig = inst.signature();
            match counts.iter_mut().find(|(s, _)| *s == sig) {
                Some((_, n)) => *n += 1,
                None => counts.push((sig, 1)),
            }
        }
        let Some(majority) = counts
            .iter()
            .enumerate()
            .max_by_key(|(i, (_, n))| (*n, usize::MAX - i))
            .map(|(_, (s, _))| s.clone())
        else {
            return Vec::new();
        };
        self.instances
            .iter()
            .filter(|(_, inst)| inst.signature() != majority)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Subscriptions of the majority of instances (the group's subscriptions in status).
    pub fn majority_subscriptions(&self) -> Vec<Subscription> {
        let odd = self.inconsistent_instances();
        self.instances
            .iter()
            .find(|(id, _)| !odd.contains(id))
            .map(|(_, inst)| {
                inst.filters
                    .iter()
                    .map(|(t, f)| Subscription {
                        topic: t.clone(),
                        expression: f.canonical(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Recomputes the earliest consume-timeout deadline.
    pub fn refresh_deadline(&mut self) {
        let shared = self.queues.values().filter_map(QueueState::next_deadline);
        let own = self
            .instances
            .values()
            .flat_map(|i| i.own.values().filter_map(QueueState::next_deadline));
        self.next_deadline_ms = shared.chain(own).min().unwrap_or(u64::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every queue of a topic (the retry topic has one).
    fn all(topic: &str, n: u32) -> Vec<u32> {
        if topic.starts_with("%RETRY%") {
            vec![0]
        } else {
            (0..n).collect()
        }
    }

    fn inst(subs: &[(&str, &str)]) -> Instance {
        let subscriptions: Vec<Subscription> = subs
            .iter()
            .map(|(t, e)| Subscription {
                topic: t.to_string(),
                expression: e.to_string(),
            })
            .collect();
        let filters = subs
            .iter()
            .map(|(t, e)| (t.to_string(), TagFilter::parse(e).unwrap()))
            .collect();
        Instance::new("addr".into(), None, subscriptions, filters, 0)
    }

    #[test]
    fn clustering_splits_queues_and_shares_the_retry_queue() {
        let mut g = GroupState::new(ConsumeModel::Clustering, vec![]);
        for id in ["c", "a", "b"] {
            g.instances.insert(id.into(), inst(&[("T", "*")]));
        }
        g.rebalance(&|t| all(t, 8), "%RETRY%G");
        let a = &g.instances["a"].assigned;
        assert_eq!(a.len(), 4, "3 of T plus the retry queue: {a:?}");
        assert!(a.contains(&("%RETRY%G".to_string(), 0)));
        assert_eq!(g.instances["b"].assigned.len(), 3);
        assert_eq!(g.instances["c"].assigned.len(), 2);
    }

    #[test]
    fn a_departed_owner_hands_its_queue_on() {
        let mut g = GroupState::new(ConsumeModel::Clustering, vec![]);
        g.instances.insert("a".into(), inst(&[("T", "*")]));
        g.instances.insert("b".into(), inst(&[("T", "*")]));
        g.rebalance(&|t| all(t, 2), "%RETRY%G");
        let mut q = QueueState::new(0, false);
        q.owner = Some("b".into());
        g.queues.insert(("T".into(), 1), q);
        g.instances.remove("b");
        g.rebalance(&|t| all(t, 2), "%RETRY%G");
        let q = &g.queues[&("T".to_string(), 1)];
        assert_eq!(q.owner.as_deref(), Some("a"));
        assert_eq!(q.epoch, 1);
        assert_eq!(g.instances["a"].assigned.len(), 3);
    }

    #[test]
    fn broadcasting_gives_everyone_everything() {
        let mut g = GroupState::new(ConsumeModel::Broadcasting, vec![]);
        g.instances.insert("a".into(), inst(&[("T", "*")]));
        g.instances
            .insert("b".into(), inst(&[("T", "*"), ("U", "x")]));
        g.rebalance(&|t| all(t, if t == "T" { 4 } else { 2 }), "%RETRY%G");
        assert_eq!(g.instances["a"].assigned.len(), 4);
        assert_eq!(g.instances["b"].assigned.len(), 6);
    }

    #[test]
    fn consistency_names_the_odd_instances() {
        let mut g = GroupState::new(ConsumeModel::Clustering, vec![]);
        g.instances.insert("a".into(), inst(&[("T", "x||y")]));
        g.instances.insert("b".into(), inst(&[("T", "y||x")]));
        g.instances.insert("c".into(), inst(&[("T", "x || y")]));
        assert!(
            g.inconsistent_instances().is_empty(),
            "tag order and spaces do not matter"
        );
        g.instances.insert("d".into(), inst(&[("T", "*")]));
        let odd = g.inconsistent_instances();
        assert!(odd.contains(&"d".to_string()), "{odd:?}");
        assert!(!odd.contains(&"a".to_string()));
    }

    #[test]
    fn rate_window_averages_recent_seconds() {
        let mut r = RateWindow::default();
        r.add(1_000, 50);
        r.add(1_500, 50);
        r.add(2_000, 100);
        assert!((r.per_second(2_000) - 20.0).abs() < 1e-9);
        assert_eq!(r.per_second(100_000), 0.0);
    }
}
