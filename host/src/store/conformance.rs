//! The backend-neutral conformance suite: every behaviour of [`Store`] checked through
//! `dyn Store` alone, so each backend proves the same contract.
//!
//! A backend joins with one line, `conformance_suite!(name, factory);` at the bottom of this
//! file, where `factory` is a [`Factory`]: it builds a [`Fixture`] on the suite's
//! [`ManualClock`], and the fixture opens a store over fresh data (and, when the backend can,
//! reopens the same data after `close`). Fixtures must open with the default retention
//! ([`RETENTION_MS`]). The macro expands to one `#[tokio::test]` per case below.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{CommittedOffset, LeaseKey, MemberKind, PutCondition, PutOutcome, QueueBounds, Store};
use crate::clock::ManualClock;
use crate::error::ErrorCode;
use crate::model::{MessageId, NewMessage, StoredMessage, WireInfo, tag_hash};

/// Where every case starts its clock.
pub const T0: u64 = 1_700_000_000_000;
/// The retention fixtures open with (the `[store] retention_hours` default).
pub const RETENTION_MS: u64 = 72 * 3_600_000;
/// Bound on any wait for something the store must do on its own; never reached when it works.
const PATIENCE: Duration = Duration::from_secs(10);

/// One backend under test.
#[async_trait]
pub trait Fixture: Send {
    /// Opens the store: fresh data on the first call, the same data on later calls (the
    /// previous store has been closed).
    async fn open(&mut self) -> Arc<dyn Store>;
    /// False when the backend cannot reopen its data; the restart cases then pass trivially.
    fn reopens(&self) -> bool;
}

/// Builds a fixture whose stores read time from `clock`.
pub type Factory = fn(Arc<ManualClock>) -> Box<dyn Fixture>;

/// Expands to one test per conformance case for the backend `factory` builds.
#[macro_export]
macro_rules! conformance_suite {
    ($name:ident, $factory:expr) => {
        $crate::conformance_suite!(@cases $name, $factory;
            append_and_get_keep_every_field,
            get_by_position_finds_messages_only,
            read_queue_filters_by_tag_and_reports_bounds,
            unwritten_queues_are_empty,
            offset_for_time_and_earliest_stored,
            by_key_is_newest_first_within_the_topic,
            by_time_lists_every_message_stored_in_the_range,
            concurrent_appends_are_gapless_and_visible_in_order,
            a_bad_batch_stores_nothing,
            timers_are_never_revealed_early,
            offsets_commit_load_and_delete,
            fenced_commits_follow_the_lease_epoch,
            metadata_versions_and_conditions,
            concurrent_creates_have_one_winner,
            members_heartbeat_list_remove_and_expire,
            leases_acquire_renew_release_and_expire,
            watch_queue_wakes_only_its_queue,
            watch_meta_moves_on_every_change_of_its_namespace,
            stats_writable_and_close,
            retention_removes_only_old_messages,
            pending_timers_pin_no_old_data,
            restart_keeps_messages_metadata_offsets_and_timers,
            restart_never_reuses_a_lease_epoch,
        );
    };
    (@cases $name:ident, $factory:expr; $($case:ident),* $(,)?) => {
        mod $name {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    $crate::store::conformance::$case($factory).await;
                }
            )*
        }
    };
}

// ------------------------------------------------------------------ helpers

async fn open(make: Factory) -> (Arc<ManualClock>, Box<dyn Fixture>, Arc<dyn Store>) {
    let clock = ManualClock::new(T0);
    let mut fx = make(clock.clone());
    let s = fx.open().await;
    (clock, fx, s)
}

fn msg(topic: &str, queue_id: u32, tag: Option<&str>, keys: &[&str], body: &str) -> NewMessage {
    NewMessage {
        topic: topic.to_string(),
        queue_id,
        tag: tag.map(str::to_string),
        keys: keys.iter().map(|k| k.to_string()).collect(),
        properties: BTreeMap::new(),
        body: Bytes::from(body.to_string()),
        born_ms: T0 - 1,
        deliver_at_ms: None,
        reconsume_times: 0,
        wire: WireInfo::default(),
    }
}

fn timer(topic: &str, queue_id: u32, body: &str, at: u64) -> NewMessage {
    NewMessage {
        deliver_at_ms: Some(at),
        ..msg(topic, queue_id, None, &[], body)
    }
}

fn body(m: &StoredMessage) -> &str {
    std::str::from_utf8(&m.body).unwrap_or("<binary>")
}

fn bodies(ms: &[StoredMessage]) -> Vec<&str> {
    ms.iter().map(body).collect()
}

async fn one(s: &dyn Store, m: NewMessage) -> crate::model::Appended {
    s.append(vec![m]).await.unwrap().remove(0)
}

async fn read_all(s: &dyn Store, topic: &str, queue_id: u32) -> Vec<StoredMessage> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let r = s
            .read_queue(topic, queue_id, from, 100, None)
            .await
            .unwrap();
        out.extend(r.messages);
        if r.next_offset >= r.bounds.max {
            return out;
        }
        from = r.next_offset;
    }
}

fn key(group: &str, topic: &str, queue_id: u32) -> LeaseKey {
    LeaseKey {
        group: group.to_string(),
        topic: topic.to_string(),
        queue_id,
    }
}

fn offset(topic: &str, queue_id: u32, offset: u64) -> CommittedOffset {
    CommittedOffset {
        topic: topic.to_string(),
        queue_id,
        offset,
    }
}

// ------------------------------------------------------------------ the message log

/// Append answers in input order and `get` returns every field as sent.
pub async fn append_and_get_keep_every_field(make: Factory) {
    let (_clock, _fx, s) = open(make).await;
    let born: SocketAddr = "10.1.2.3:50000".parse().unwrap();
    let store: SocketAddr = "[2001:db8::7]:10911".parse().unwrap();
    let mut full = msg("Orders", 2, Some("pay"), &["k1", "k2"], "full");
    full.properties.insert("a".into(), "1".into());
    full.properties.insert("UNIQ_KEY".into(), "x".into());
    full.born_ms = T0 - 50;
    full.reconsume_times = 3;
    full.wire = WireInfo {
        flag: -7,
        sys_flag: 0x40,
        born_host: Some(born),
        store_host: Some(store),
    };
    let plain = msg("Orders", 2, None, &[], "plain");
    let appended = s.append(vec![full.clone(), plain.clone()]).await.unwrap();
    assert_eq!(appended.len(), 2);
    assert_eq!(appended[0].queue_offset, Some(0));
    assert_eq!(appended[1].queue_offset, Some(1));
    assert!(
        appended
            .iter()
            .all(|a| a.queue_id == 2 && a.stored_ms == T0)
    );
    assert_ne!(appended[0].id, appended[1].id);

    for (a, sent) in appended.iter().zip([&full, &plain]) {
        let got = s
            .get(a.id)
            .await
            .unwrap()
            .expect("appended message is found by id");
        assert_eq!(got.id, a.id);
        assert_eq!(got.topic, sent.topic);
        assert_eq!(got.queue_id, sent.queue_id);
        assert_eq!(got.queue_offset, a.queue_offset);
        assert_eq!(got.tag, sent.tag);
        assert_eq!(got.keys, sent.keys);
        assert_eq!(got.properties, sent.properties);
        assert_eq!(got.body, sent.body);
        assert_eq!(got.born_ms, sent.born_ms);
        assert_eq!(got.stored_ms, T0);
        assert_eq!(got.deliver_at_ms, None);
        assert_eq!(got.reconsume_times, sent.reconsume_times);
        assert_eq!(got.wire, sent.wire);
    }
    let unknown = MessageId::new(T0, appended[0].id.node(), u64::MAX - 1);
    assert!(s.get(unknown).await.unwrap().is_none());
    assert!(s.append(Vec::new()).await.unwrap().is_empty());
}

/// A message is found by its log position; positions of nothing find nothing.
pub async fn get_by_position_finds_messages_only(make: Factory) {
    let (clock, _fx, s) = open(make).await;
    let a = one(&*s, msg("Pos", 0, Some("t"), &["k"], "by-position")).await;
    let held = one(&*s, timer("Pos", 0, "timer", T0 + 100)).await;
    let m = s.get_by_position(a.id.position()).await.unwrap().unwrap();
    assert_eq!(m.id, a.id);
    assert_eq!(body(&m), "by-position");
    assert_eq!(m.queue_offset, Some(0));
    let t = s
        .get_by_position(held.id.position())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.id, held.id);
    assert_eq!(t.queue_offset, None, "a held timer has no queue offset yet");
    clock.set(T0 + 100);
    assert_eq!(s.reveal_due(T0 + 100, 10).await.unwrap(), 1);
    let t = s
        .get_by_position(held.id.position())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        t.queue_offset,
        Some(1),
        "a revealed timer reports its offset"
    );
    assert!(s.get_by_position(u64::MAX - 1).await.unwrap().is_none());
}

/// A tag filter skips entries without reading them; `next_offset` covers what was examined.
pub async fn read_queue_filters_by_tag_and_reports_bounds(make: Factory) {
    let (_clock, _fx, s) = open(make).await;
    s.append(vec![
        msg("Tags", 0, Some("A"), &[], "a0"),
        msg("Tags", 0, Some("B"), &[], "b1"),
        msg("Tags", 0, None, &[], "none2"),
        msg("Tags", 0, Some("A"), &[], "a3"),
    ])
    .await
    .unwrap();
    let a = [tag_hash(Some("A"))];
    let r = s.read_queue("Tags", 0, 0, 10, Some(&a)).await.unwrap();
    assert_eq!(bodies(&r.messages), ["a0", "a3"]);
    let offs: Vec<_> = r.messages.iter().map(|m| m.queue_offset).collect();
    assert_eq!(offs, [Some(0), Some(3)]);
    assert_eq!(r.next_offset, 4);
    assert_eq!(r.bounds, QueueBounds { min: 0, max: 4 });

    let r = s.read_queue("Tags", 0, 0, 1, Some(&a)).await.unwrap();
    assert_eq!(bodies(&r.messages), ["a0"]);
    assert_eq!(r.next_offset, 1, "a full read stops after its last match");

    let untagged = [tag_hash(None)];
    let r = s
        .read_queue("Tags", 0, 0, 10, Some(&untagged))
        .await
        .unwrap();
    assert_eq!(bodies(&r.messages), ["none2"]);

    let nothing = [tag_hash(Some("Z"))];
    let r = s
        .read_queue("Tags", 0, 1, 10, Some(&nothing))
        .await
        .unwrap();
    assert!(r.messages.is_empty());
    assert_eq!(
        r.next_offset, 4,
        "filtered-out entries still move the offset"
    );

    let r = s.read_queue("Tags", 0, 2, 10, None).await.unwrap();
    assert_eq!(bodies(&r.messages), ["none2", "a3"]);
    let r = s.read_queue("Tags", 0, 99, 10, None).await.unwrap();
    assert!(r.messages.is_empty());
    assert_eq!(r.next_offset, 4, "a read past the end is clamped to max");
    assert_eq!(
        s.queue_bounds("Tags", 0).await.unwrap(),
        QueueBounds { min: 0, max: 4 }
    );
}

/// Queues and topics never written read as empty, not as errors.
pub async fn unwritten_queues_are_empty(make: Factory) {
    let (_clock, _fx, s) = open(make).await;
    one(&*s, msg("Some", 0, None, &[], "x")).await;
    assert_eq!(
        s.queue_bounds("Some", 5).await.unwrap(),
        QueueBounds::default()
    );
    assert_eq!(
        s.queue_bounds("Never", 0).await.unwrap(),
        QueueBounds::default()
    );
    let r = s.read_queue("Never", 0, 0, 10, None).await.unwrap();
    assert!(r.messages.is_empty());
    assert_eq!((r.next_offset, r.bounds), (0, QueueBounds::default()));
    assert_eq!(s.offset_for_time("Never", 0, T0).await.unwrap(), 0);
    assert_eq!(s.earliest_stored_ms("Never").await.unwrap(), None);
    assert!(s.by_key("Never", "k", 10).await.unwrap().is_empty());
    let page = s.by_time("Never", 0, u64::MAX, 10, None).await.unwrap();
    assert!(page.messages.is_empty() && page.next_page_token.is_none());
}

/// `offset_for_time` finds the first offset stored at or after a time; `earliest_stored_ms`
/// the oldest kept message of a topic.
pub async fn offset_for_time_and_earliest_stored(make: Factory) {
    let (clock, _fx, s) = open(make).await;
    for (i, at) in [T0, T0 + 10, T0 + 20].into_iter().enumerate() {
        clock.set(at);
        one(&*s, msg("Timed", 0, None, &[], &format!("m{i}"))).await;
    }
    clock.set(T0 + 30);
    one(&*s, msg("Timed", 1, None, &[], "other-queue")).await;
    assert_eq!(s.offset_for_time("Timed", 0, 0).await.unwrap(), 0);
    assert_eq!(s.offset_for_time("Timed", 0, T0).await.unwrap(), 0);
    assert_eq!(s.offset_for_time("Timed", 0, T0 + 5).await.unwrap(), 1);
    assert_eq!(s.offset_for_time("Timed", 0, T0 + 20).await.unwrap(), 2);
    assert_eq!(s.offset_for_time("Timed", 0, T0 + 21).await.unwrap(), 3);
    assert_eq!(s.offset_for_time("Timed", 1, T0).await.unwrap(), 0);
    assert_eq!(s.earliest_stored_ms("Timed").await.unwrap(), Some(T0));
}

/// The newest messages carrying a key, newest first, only from the asked topic.
pub async fn by_key_is_newest_first_within_the_topic(make: Factory) {
    let (clock, _fx, s) = open(make).await;
    for i in 0..3 {
        clock.advance(10);
        one(
            &*s,
            msg(
                "Keyed",
                i % 2,
                None,
                &["other", "order-1"],
                &format!("k{i}"),
            ),
        )
        .await;
        one(&*s, msg("Keyed", 0, None, &["order-2"], &format!("x{i}"))).await;
    }
    one(&*s, msg("Elsewhere", 0, None, &["order-1"], "foreign")).await;
    let got = s.by_key("Keyed", "order-1", 64).await.unwrap();
    assert_eq!(bodies(&got), ["k2", "k1", "k0"]);
    let got = s.by_key("Keyed", "order-1", 2).await.unwrap();
    assert_eq!(bodies(&got), ["k2", "k1"]);
    assert!(s.by_key("Keyed", "order-1", 0).await.unwrap().is_empty());
    assert!(s.by_key("Keyed", "order-3", 64).await.unwrap().is_empty());
    assert_eq!(
        bodies(&s.by_key("Elsewhere", "order-1", 64).await.unwrap()),
        ["foreign"]
    );
}

/// Every message stored in the range, timer messages included (pending or revealed, with their
/// deliver time), in store-time order, across pages of any size; timers stay invisible to
/// `read_queue` until due.
pub async fn by_time_lists_every_message_stored_in_the_range(make: Factory) {
    let (clock, _fx, s) = open(make).await;
    clock.set(T0 - 100);
    one(&*s, msg("Range", 0, None, &[], "before")).await;
    clock.set(T0);
    one(&*s, msg("Range", 0, None, &[], "a")).await;
    clock.set(T0 + 10);
    one(&*s, timer("Range", 0, "due-timer", T0 + 1_000)).await;
    clock.set(T0 + 20);
    one(&*s, msg("Range", 1, None, &[], "b")).await;
    clock.set(T0 + 30);
    let far = one(&*s, timer("Range", 1, "far-timer", T0 + 10_000_000)).await;
    clock.set(T0 + 40);
    one(&*s, msg("Other", 0, None, &[], "other-topic")).await;
    clock.set(T0 + 1_500);
    assert_eq!(s.reveal_due(T0 + 1_500, 10).await.unwrap(), 1);
    one(&*s, msg("Range", 0, None, &[], "after")).await;

    let want = ["a", "due-timer", "b", "far-timer"];
    let page = s.by_time("Range", T0, T0 + 40, 100, None).await.unwrap();
    assert_eq!(bodies(&page.messages), want);
    assert!(page.next_page_token.is_none());
    let due = &page.messages[1];
    assert_eq!(due.deliver_at_ms, Some(T0 + 1_000));
    assert_eq!(due.stored_ms, T0 + 10);
    assert_eq!(
        due.queue_offset,
        Some(2),
        "revealed after before and a in queue 0"
    );
    let pending = &page.messages[3];
    assert_eq!(pending.id, far.id);
    assert_eq!(pending.deliver_at_ms, Some(T0 + 10_000_000));
    assert_eq!(pending.queue_offset, None);

    for limit in [1, 2, 3] {
        let mut got = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..10 {
            let page = s
                .by_time("Range", T0, T0 + 40, limit, token.as_deref())
                .await
                .unwrap();
            assert!(page.messages.len() <= limit);
            got.extend(page.messages.iter().map(|m| body(m).to_string()));
            token = page.next_page_token;
            if token.is_none() {
                break;
            }
        }
        assert!(token.is_none(), "paging ends");
        assert_eq!(got, want, "pages of {limit}");
    }
    let r = s.read_queue("Range", 1, 0, 10, None).await.unwrap();
    assert_eq!(
        bodies(&r.messages),
        ["b"],
        "a pending timer stays invisible"
    );
    assert!(
        s.by_time("Range", T0, T0, 10, Some("garbage"))
            .await
            .is_err()
    );
}

/// Offsets of a queue are gapless and become visible in offset order under concurrent
/// appenders: a reader following the queue never sees a later offset before an earlier one.
pub async fn concurrent_appends_are_gapless_and_visible_in_order(make: Factory) {
    const WRITERS: u64 = 8;
    const EACH: u64 = 40;
    let (_clock, _fx, s) = open(make).await;
    let reader = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut rx = s.watch_queue("Gapless", 0);
            let mut next = 0u64;
            while next < WRITERS * EACH {
                rx.borrow_and_update();
                let r = s.read_queue("Gapless", 0, next, 1000, None).await.unwrap();
                for m in &r.messages {
                    assert_eq!(
                        m.queue_offset,
                        Some(next),
                        "visible in offset order, no gap"
                    );
                    next += 1;
                }
                assert_eq!(r.next_offset, next);
                if r.messages.is_empty() {
                    rx.changed().await.unwrap();
                }
            }
            next
        })
    };
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let s = s.clone();
        writers.push(tokio::spawn(async move {
            let mut offs = Vec::new();
            for i in 0..EACH {
                let batch = if i % 5 == 0 {
                    vec![
                        msg("Gapless", 0, None, &[], &format!("{w}-{i}a")),
                        msg("Gapless", 1, None, &[], &format!("{w}-{i}b")),
                    ]
                } else {
                    vec![msg("Gapless", 0, None, &[], &format!("{w}-{i}"))]
                };
                let a = s.append(batch).await.unwrap();
                offs.push(a[0].queue_offset.unwrap());
            }
            offs
        }));
    }
    let mut all = Vec::new();
    for w in writers {
        let offs = w.await.unwrap();
        assert!(
            offs.windows(2).all(|p| p[0] < p[1]),
            "one writer's offsets grow"
        );
        all.extend(offs);
    }
    all.sort_unstable();
    assert_eq!(all, (0..WRITERS * EACH).collect::<Vec<_>>());
    let seen = tokio::time::timeout(PATIENCE, reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen, WRITERS * EACH);
    let q1 = s.queue_bounds("Gapless", 1).await.unwrap();
    assert_eq!(q1.max, WRITERS * EACH / 5);
}

/// A batch the store cannot take fails whole: none of its messages is stored.
pub async fn a_bad_batch_stores_nothing(make: Factory) {
    let (_clock, _fx, s) = open(make).await;
    let bad = s
        .append(vec![
            msg("Batch", 0, None, &["bk"], "good-1"),
            msg("", 0, None, &[], "no topic"),
            msg("Batch", 0, None, &["bk"], "good-2"),
        ])
        .await;
    assert!(bad.is_err());
    assert_eq!(
        s.queue_bounds("Batch", 0).await.unwrap(),
        QueueBounds::default()
    );
    assert!(s.by_key("Batch", "bk", 10).await.unwrap().is_empty());
    let ok = s
        .append(vec![
            msg("Batch", 0, None, &[], "1"),
            msg("Batch", 0, None, &[], "2"),
            msg("Batch", 0, None, &[], "3"),
        ])
        .await
        .unwrap();
    let offs: Vec<_> = ok.iter().map(|a| a.queue_offset).collect();
    assert_eq!(offs, [Some(0), Some(1), Some(2)]);
    assert_eq!(bodies(&read_all(&*s, "Batch", 0).await), ["1", "2", "3"]);
}

/// Timer messages stay invisible until their deliver time, are revealed in deliver order, at
/// most `max` per call, and a deliver time in the past means visible at once.
pub async fn timers_are_never_revealed_early(make: Factory) {
    let (clock, _fx, s) = open(make).await;
    let late = one(&*s, timer("Delay", 0, "late", T0 + 2_000)).await;
    let early = one(&*s, timer("Delay", 0, "early", T0 + 1_000)).await;
    one(&*s, timer("Delay", 0, "same-time", T0 + 1_000)).await;
    assert_eq!((late.queue_offset, early.queue_offset), (None, None));
    let past = one(&*s, timer("Delay", 0, "past", T0 - 1)).await;
    assert_eq!(
        past.queue_offset,
        Some(0),
        "a past deliver time is visible now"
    );
    assert_eq!(s.next_timer_ms(), Some(T0 + 1_000));
    assert_eq!(s.stats().pending_timers, 3);

    clock.set(T0 + 999);
    assert_eq!(s.reveal_due(T0 + 999, 10).await.unwrap(), 0);
    assert_eq!(bodies(&read_all(&*s, "Delay", 0).await), ["past"]);

    clock.set(T0 + 1_000);
    assert_eq!(s.reveal_due(T0 + 1_000, 1).await.unwrap(), 1, "at most max");
    assert_eq!(s.reveal_due(T0 + 1_000, 10).await.unwrap(), 1);
    let visible = read_all(&*s, "Delay", 0).await;
    let mut names = bodies(&visible)[1..].to_vec();
    names.sort_unstable();
    assert_eq!(names, ["early", "same-time"]);
    assert!(visible.iter().all(|m| m.stored_ms == T0));
    assert_eq!(visible[1].deliver_at_ms, Some(T0 + 1_000));
    assert_eq!(s.next_timer_ms(), Some(T0 + 2_000));

    clock.set(T0 + 5_000);
    assert_eq!(s.reveal_due(T0 + 5_000, 10).await.unwrap(), 1);
    let visible = read_all(&*s, "Delay", 0).await;
    assert_eq!(body(&visible[3]), "late");
    assert_eq!(visible[3].queue_offset, Some(3));
    assert_eq!(s.next_timer_ms(), None);
    assert_eq!(s.stats().pending_timers, 0);
    assert_eq!(s.reveal_due(T0 + 5_000, 10).await.unwrap(), 0);
}

// ------------------------------------------------------------------ consumer offsets

/// Committed offsets are kept per group and queue, replaced by later commits, and forgotten
/// with the group.
pub async fn offsets_commit_load_and_delete(make: Factory) {
    let (_clock, _fx, s) = open(make).await;
    assert!(s.load_offsets("G1").await.unwrap().is_empty());
    s.commit_offsets("G1", &[offset("T", 0, 5), offset("T", 1, 7)])
        .await
        .unwrap();
    s.commit_offsets("G1", &[offset("T", 0, 9)]).await.unwrap();
    s.commit_offsets("G2", &[offset("U", 3, 1)]).await.unwrap();
    let mut g1 = s.load_offsets("G1").await.unwrap();
    g1.sort_by(|a, b| (&a.topic, a.queue_id).cmp(&(&b.topic, b.queue_id)));
    assert_eq!(g1, [offset("T", 0, 9), offset("T", 1, 7)]);
    s.delete_offsets("G1").await.unwrap();
    assert!(s.load_offsets("G1").await.unwrap().is_empty());
    assert_eq!(s.load_offsets("G2").await.unwrap(), [offset("U", 3, 1)]);
    s.delete_offsets("Nobody").await.unwrap();
}

/// A fenced commit lands only under the queue's current lease epoch; stale epochs, queues never
/// leased and other groups' leases are refused, each at its own index.
pub async fn fenced_commits_follow_the_lease_epoch(make: Factory) {
    let (clock, _fx, s) = open(make).await;
    let q0 = s
        .lease_acquire(&key("G", "T", 0), "h1", 1_000)
        .await
        .unwrap()
        .unwrap();
    let q1 = s
        .lease_acquire(&key("G", "T", 1), "h1", 1_000)
        .await
        .unwrap()
        .unwrap();
    let ok = s
        .commit_offsets_fenced(
            "G",
            &[
                (offset("T", 0, 5), q0.epoch),
                (offset("T", 1, 7), q1.epoch),
                (offset("T", 1, 8), q1.epoch + 1),
                (offset("T", 2, 1), q0.epoch),
            ],
        )
        .await
        .unwrap();
    assert_eq!(ok, [true, true, false, false]);
    let other_group = s
        .commit_offsets_fenced("H", &[(offset("T", 0, 3), q0.epoch)])
        .await
        .unwrap();
    assert_eq!(other_group, [false]);
    assert!(s.load_offsets("H").await.unwrap().is_empty());

    clock.advance(1_001);
    let taken = s
        .lease_acquire(&key("G", "T", 0), "h2", 1_000)
        .await
        .unwrap()
        .unwrap();
    assert!(taken.epoch > q0.epoch);
    let stale = s
        .commit_offsets_fenced("G", &[(offset("T", 0, 9), q0.epoch)])
        .await
        .unwrap();
    assert_eq!(stale, [false], "the old holder is fenced off");
    let fresh = s
        .commit_offsets_fenced("G", &[(offset("T", 0, 10), taken.epoch)])
        .await
        .unwrap();
    assert_eq!(fresh, [true]);
    let mut got = s.load_offsets("G").await.unwrap();
    got.sort_by_key(|o| o.queue_id);
    assert_eq!(got, [offset("T", 0, 10), offset("T", 1, 7)]);
}

// ------------------------------------------------------------------ metadata

/// Metadata get/list/delete, versions (1 on the first write, +1 on each) and conditions.
pub async fn metadata_versions_and_conditions(make: Factory) {
    let (_clock, _fx, s) = open(make).await;
    assert!(s.meta_get("ns", "a").await.unwrap().is_none());
    s.meta_put("ns", "b", b"1".to_vec()).await.unwrap();
    let b = s.meta_get("ns", "b").await.unwrap().unwrap();
    assert_eq!((b.value.as_slice(), b.version), (&b"1"[..], 1));
    s.meta_put("ns", "b", b"2".to_vec()).await.unwrap();
    assert_eq!(s.meta_get("ns", "b").await.unwrap().unwrap().version, 2);

    let w = s
        .meta_put_if("ns", "a", b"x".to_vec(), PutCondition::Absent)
        .await
        .unwrap();
    assert_eq!(w, PutOutcome::Written { version: 1 });
    let c = s
        .meta_put_if("ns", "a", b"y".to_vec(), PutCondition::Absent)
        .await
        .unwrap();
    assert_eq!(c, PutOutcome::Conflict { current: Some(1) });
    let c = s
        .meta_put_if("ns", "a", b"y".to_vec(), PutCondition::Version(7))
        .await
        .unwrap();
    assert_eq!(c, PutOutcome::Conflict { current: Some(1) });
    let w = s
        .meta_put_if("ns", "a", b"y".to_vec(), PutCondition::Version(1))
        .await
        .unwrap();
    assert_eq!(w, PutOutcome::Written { version: 2 });
    let w = s
        .meta_put_if("ns", "a", b"z".to_vec(), PutCondition::Any)
        .await
        .unwrap();
    assert_eq!(w, PutOutcome::Written { version: 3 });
    let c = s
        .meta_put_if("ns", "absent", b"v".to_vec(), PutCondition::Version(1))
        .await
        .unwrap();
    assert_eq!(c, PutOutcome::Conflict { current: None });
    assert!(s.meta_get("ns", "absent").await.unwrap().is_none());
    let a = s.meta_get("ns", "a").await.unwrap().unwrap();
    assert_eq!((a.value.as_slice(), a.version), (&b"z"[..], 3));

    s.meta_put("other", "a", b"elsewhere".to_vec())
        .await
        .unwrap();
    let list = s.meta_list("ns").await.unwrap();
    assert_eq!(
        list,
        [
            ("a".to_string(), b"z".to_vec()),
            ("b".to_string(), b"2".to_vec())
        ]
    );
    s.meta_delete("ns", "a").await.unwrap();
    s.meta_delete("ns", "never").await.unwrap();
    assert!(s.meta_get("ns", "a").await.unwrap().is_none());
    assert_eq!(s.meta_list("ns").await.unwrap().len(), 1);
    let w = s
        .meta_put_if("ns", "a", b"again".to_vec(), PutCondition::Absent)
        .await
        .unwrap();
    assert!(
        matches!(w, PutOutcome::Written { .. }),
        "a deleted key is absent"
    );
    assert!(s.meta_list("empty").await.unwrap().is_empty());
}

/// Two concurrent create-if-absent writes of one key: exactly one wins, and its value stays.
pub async fn concurrent_creates_have_one_winner(make: Factory) {
    let (_clock, _fx, s) = open(make).await;
    for i in 0..16 {
        let k = format!("key-{i}");
        let tasks: Vec<_> = ["first", "second"]
            .into_iter()
            .map(|who| {
                let (s, k) = (s.clone(), k.clone());
                tokio::spawn(async move {
                    let r = s
                        .meta_put_if("race", &k, who.as_bytes().to_vec(), PutCondition::Absent)
                        .await
                        .unwrap();
                    (who, r)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            let (who, r) = t.await.unwrap();
            match r {
                PutOutcome::Written { version } => {
                    assert_eq!(version, 1);
                    winners.push(who);
                }
                PutOutcome::Conflict { current } => assert_eq!(current, Some(1)),
            }
        }
        assert_eq!(winners.len(), 1, "exactly one create of {k} wins");
        let stored = s.meta_get("race", &k).await.unwrap().unwrap();
        assert_eq!(stored.value, winners[0].as_bytes());
    }
}

// ------------------------------------------------------------------ members and leases

/// Member rows: upsert by heartbeat (true when the member was not live), listed sorted while
/// unexpired by the store's clock, removed on request.
pub async fn members_heartbeat_list_remove_and_expire(make: Factory) {
    let (clock, _fx, s) = open(make).await;
    let hb = |m: &'static str, kind, data: &'static str, ttl| {
        let s = s.clone();
        async move {
            s.member_heartbeat("G", m, kind, data.as_bytes().to_vec(), ttl)
                .await
                .unwrap()
        }
    };
    assert!(hb("m1", MemberKind::HostAssigned, "a", 1_000).await);
    assert!(
        !hb("m1", MemberKind::HostAssigned, "b", 1_000).await,
        "a renewal"
    );
    assert!(hb("m0", MemberKind::SelfBalancing, "c", 500).await);
    s.member_heartbeat("Other", "x", MemberKind::SelfBalancing, Vec::new(), 10_000)
        .await
        .unwrap();
    let list = s.member_list("G").await.unwrap();
    let ids: Vec<_> = list.iter().map(|m| m.member_id.as_str()).collect();
    assert_eq!(ids, ["m0", "m1"]);
    assert_eq!(list[0].kind, MemberKind::SelfBalancing);
    assert_eq!(list[0].group, "G");
    assert_eq!(list[1].data, b"b");
    assert_eq!(list[1].expires_at_ms, T0 + 1_000);
    assert_eq!(list[0].expires_at_ms, T0 + 500);

    clock.set(T0 + 500);
    let ids: Vec<_> = s
        .member_list("G")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.member_id)
        .collect();
    assert_eq!(ids, ["m1"], "m0 expired at its deadline");
    assert!(!hb("m1", MemberKind::HostAssigned, "b", 1_000).await);
    assert!(
        hb("m0", MemberKind::SelfBalancing, "c", 500).await,
        "expired: not live"
    );

    clock.set(T0 + 1_400);
    assert_eq!(s.member_list("G").await.unwrap().len(), 1);
    assert_eq!(
        s.member_list("G").await.unwrap()[0].expires_at_ms,
        T0 + 1_500
    );
    assert!(!s.member_remove("G", "m0").await.unwrap(), "m0 had expired");
    assert!(s.member_remove("G", "m1").await.unwrap());
    assert!(!s.member_remove("G", "m1").await.unwrap());
    assert!(s.member_list("G").await.unwrap().is_empty());
    assert!(s.member_list("Nobody").await.unwrap().is_empty());
    assert_eq!(s.member_list("Other").await.unwrap().len(), 1);
}

/// Leases: one live holder per queue; renewing keeps the epoch; a new holder (after expiry or
/// release) gets the next epoch; a lost lease cannot be renewed; listing shows live leases.
pub async fn leases_acquire_renew_release_and_expire(make: Factory) {
    let (clock, _fx, s) = open(make).await;
    let k0 = key("G", "T", 0);
    let l1 = s.lease_acquire(&k0, "h1", 1_000).await.unwrap().unwrap();
    assert_eq!((l1.key.clone(), l1.holder.as_str()), (k0.clone(), "h1"));
    assert_eq!(l1.expires_at_ms, T0 + 1_000);
    assert!(s.lease_acquire(&k0, "h2", 1_000).await.unwrap().is_none());

    clock.set(T0 + 100);
    let again = s.lease_acquire(&k0, "h1", 1_000).await.unwrap().unwrap();
    assert_eq!(again.epoch, l1.epoch, "the holder re-acquiring renews");
    assert_eq!(again.expires_at_ms, T0 + 1_100);
    clock.set(T0 + 200);
    let renewed = s.lease_renew(&l1, 1_000).await.unwrap().unwrap();
    assert_eq!(
        (renewed.epoch, renewed.expires_at_ms),
        (l1.epoch, T0 + 1_200)
    );
    let k1 = key("G", "T", 1);
    let other = s.lease_acquire(&k1, "h2", 5_000).await.unwrap().unwrap();
    s.lease_acquire(&key("H", "T", 0), "h9", 5_000)
        .await
        .unwrap()
        .unwrap();
    let listed = s.lease_list("G").await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&renewed) && listed.contains(&other));

    clock.set(T0 + 1_200);
    let listed = s.lease_list("G").await.unwrap();
    assert_eq!(
        listed,
        std::slice::from_ref(&other),
        "an expired lease is not listed"
    );
    let l2 = s.lease_acquire(&k0, "h2", 1_000).await.unwrap().unwrap();
    assert_eq!(l2.epoch, l1.epoch + 1, "a new holder: the next epoch");
    assert!(
        s.lease_renew(&l1, 1_000).await.unwrap().is_none(),
        "h1 lost it"
    );
    s.lease_release(&l1).await.unwrap();
    assert!(s.lease_acquire(&k0, "h1", 1_000).await.unwrap().is_none());

    s.lease_release(&l2).await.unwrap();
    assert!(s.lease_renew(&l2, 1_000).await.unwrap().is_none());
    let l3 = s.lease_acquire(&k0, "h1", 1_000).await.unwrap().unwrap();
    assert_eq!(l3.epoch, l2.epoch + 1, "after a release: the next epoch");

    clock.set(T0 + 2_200);
    let l4 = s.lease_acquire(&k0, "h1", 1_000).await.unwrap().unwrap();
    assert_eq!(
        l4.epoch,
        l3.epoch + 1,
        "taken again after expiry: the next epoch"
    );
    clock.set(T0 + 3_300);
    assert!(s.lease_list("G").await.unwrap().iter().all(|l| l.key == k1));
    let kept = s.lease_renew(&l4, 1_000).await.unwrap().unwrap();
    assert_eq!(
        (kept.epoch, kept.expires_at_ms),
        (l4.epoch, T0 + 4_300),
        "expired but not taken: the holder may still renew"
    );
}

// ------------------------------------------------------------------ notifications

/// A queue's watch carries its visible max and wakes only for that queue: appends to other
/// queues or topics, and held timers, do not wake it; a reveal does.
pub async fn watch_queue_wakes_only_its_queue(make: Factory) {
    let (clock, _fx, s) = open(make).await;
    one(&*s, msg("W", 0, None, &[], "existing")).await;
    let mut w0 = s.watch_queue("W", 0);
    let mut w1 = s.watch_queue("W", 1);
    let mut other = s.watch_queue("W2", 1);
    assert_eq!(*w0.borrow_and_update(), 1);
    assert_eq!(*w1.borrow_and_update(), 0);

    one(&*s, msg("W", 1, None, &[], "to-q1")).await;
    tokio::time::timeout(PATIENCE, w1.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*w1.borrow_and_update(), 1);
    assert!(!w0.has_changed().unwrap(), "queue 0 is not woken");
    assert!(!other.has_changed().unwrap(), "another topic is not woken");

    one(&*s, timer("W", 0, "held", T0 + 100)).await;
    assert!(!w0.has_changed().unwrap(), "a held timer is not visible");
    clock.set(T0 + 100);
    assert_eq!(s.reveal_due(T0 + 100, 10).await.unwrap(), 1);
    tokio::time::timeout(PATIENCE, w0.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*w0.borrow_and_update(), 2);
    assert!(!w1.has_changed().unwrap());

    let late = s.watch_queue("W", 1);
    assert_eq!(*late.borrow(), 1, "a new watch starts at the current max");
    s.append(vec![
        msg("W2", 1, None, &[], "a"),
        msg("W2", 1, None, &[], "b"),
    ])
    .await
    .unwrap();
    tokio::time::timeout(PATIENCE, other.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*other.borrow(), 2, "one wake-up carries the whole batch");
    assert!(!w1.has_changed().unwrap());
}

/// This host's own metadata writes and deletes move the namespace's change feed at once (other
/// hosts' changes: `postgres/tests.rs`).
pub async fn watch_meta_moves_on_every_change_of_its_namespace(make: Factory) {
    let (_clock, _fx, s) = open(make).await;
    let mut w = s.watch_meta("topics");
    w.borrow_and_update();
    s.meta_put("topics", "A", b"1".to_vec()).await.unwrap();
    assert!(w.has_changed().unwrap(), "a create moves the feed");
    w.borrow_and_update();
    s.meta_put_if("topics", "A", b"2".to_vec(), PutCondition::Version(1))
        .await
        .unwrap();
    assert!(w.has_changed().unwrap(), "an update moves the feed");
    w.borrow_and_update();
    s.meta_delete("topics", "A").await.unwrap();
    assert!(w.has_changed().unwrap(), "a delete moves the feed");
}

// ------------------------------------------------------------------ housekeeping

/// Stats count appends; a store is writable until closed, and refuses writes after.
pub async fn stats_writable_and_close(make: Factory) {
    let (_clock, _fx, s) = open(make).await;
    assert!(s.writable());
    let before = s.stats();
    s.append(vec![
        msg("Stats", 0, None, &[], "1"),
        msg("Stats", 0, None, &[], "2"),
        msg("Stats", 1, None, &[], "3"),
    ])
    .await
    .unwrap();
    let after = s.stats();
    assert_eq!(after.appended_messages, before.appended_messages + 3);
    assert!(after.appended_bytes > before.appended_bytes);
    assert_eq!(after.pending_timers, 0);
    s.close().await.unwrap();
    assert!(!s.writable());
    let err = s
        .append(vec![msg("Stats", 0, None, &[], "late")])
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::ServiceNotAvailable);
}

/// Retention removes messages older than the retention period and never younger ones.
pub async fn retention_removes_only_old_messages(make: Factory) {
    let (clock, _fx, s) = open(make).await;
    let filler = "x".repeat(1024);
    let mut first = None;
    for i in 0..64 {
        let a = one(&*s, msg("Ret", 0, None, &[], &format!("{i}{filler}"))).await;
        first.get_or_insert(a.id);
    }
    let first = first.unwrap();
    s.enforce_retention(T0 + RETENTION_MS - 1).await.unwrap();
    assert!(s.get(first).await.unwrap().is_some(), "not old enough yet");
    assert_eq!(s.queue_bounds("Ret", 0).await.unwrap().min, 0);

    clock.set(T0 + RETENTION_MS + 1);
    let young = one(&*s, msg("Ret", 0, None, &[], "young")).await;
    s.enforce_retention(T0 + RETENTION_MS + 1).await.unwrap();
    assert!(
        s.get(first).await.unwrap().is_none(),
        "the oldest message is gone"
    );
    let b = s.queue_bounds("Ret", 0).await.unwrap();
    assert!(b.min > 0 && b.max == 65);
    let r = s.read_queue("Ret", 0, 0, 100, None).await.unwrap();
    assert_eq!(
        r.messages.first().map(|m| m.queue_offset),
        Some(Some(b.min))
    );
    assert_eq!(r.messages.last().map(|m| m.id), Some(young.id));
    assert_eq!(
        s.earliest_stored_ms("Ret").await.unwrap(),
        Some(r.messages[0].stored_ms)
    );
}

/// A pending timer keeps no old data alive: retention deletes the messages stored around it
/// (a 40-day timer against 3-day retention), and the timer is still found by id, pending, and
/// fires at its deliver time.
pub async fn pending_timers_pin_no_old_data(make: Factory) {
    let (clock, _fx, s) = open(make).await;
    let filler = "x".repeat(1024);
    let old = one(&*s, msg("Pin", 0, None, &[], &format!("old{filler}"))).await;
    let due = T0 + 40 * 24 * 3_600_000;
    let pending = one(&*s, timer("Pin", 0, "forty-days", due)).await;
    for i in 0..63 {
        one(&*s, msg("Pin", 0, None, &[], &format!("{i}{filler}"))).await;
    }

    // Past retention by more than one partition or segment width.
    let later = T0 + RETENTION_MS + 2 * 3_600_000;
    clock.set(later);
    let young = one(&*s, msg("Pin", 0, None, &[], "young")).await;
    // The store may also run the pass by itself once its clock moves; either way it is done.
    s.enforce_retention(later).await.unwrap();
    assert!(
        s.get(old.id).await.unwrap().is_none(),
        "the data stored with the timer is gone"
    );
    let kept = s.get(pending.id).await.unwrap().expect("the timer is kept");
    assert_eq!((body(&kept), kept.queue_offset), ("forty-days", None));
    assert_eq!(s.next_timer_ms(), Some(due));
    // A store may keep the old messages sharing a file or partition with "young" (retention
    // holds within one segment roll), never the ones before them.
    assert!(s.queue_bounds("Pin", 0).await.unwrap().min > 0);

    clock.set(due);
    assert_eq!(s.reveal_due(due, 10).await.unwrap(), 1);
    // It takes the offset after "young" (which retention may have taken by now, 37 days on).
    assert_eq!(young.queue_offset, Some(64));
    let visible = read_all(&*s, "Pin", 0).await;
    let fired = visible.last().expect("the timer fired");
    assert_eq!(
        (fired.id, body(fired), fired.queue_offset),
        (pending.id, "forty-days", Some(65))
    );
    assert_eq!(s.stats().pending_timers, 0);
}

/// Everything durable survives a clean close and reopen: messages (with their wire fields),
/// metadata versions, offsets, pending timers; watches and appends go on where they left off.
pub async fn restart_keeps_messages_metadata_offsets_and_timers(make: Factory) {
    let (clock, mut fx, s) = open(make).await;
    if !fx.reopens() {
        return;
    }
    let mut m = msg("Keep", 0, Some("t"), &["k"], "kept");
    m.wire.flag = 42;
    m.wire.born_host = Some("127.0.0.1:9".parse().unwrap());
    let kept = one(&*s, m.clone()).await;
    let pending = one(&*s, timer("Keep", 0, "pending", T0 + 60_000)).await;
    s.meta_put("ns", "k", b"1".to_vec()).await.unwrap();
    s.meta_put("ns", "k", b"2".to_vec()).await.unwrap();
    s.commit_offsets("G", &[offset("Keep", 0, 1)])
        .await
        .unwrap();
    s.close().await.unwrap();

    clock.set(T0 + 1_000);
    let s = fx.open().await;
    let got = s.get(kept.id).await.unwrap().unwrap();
    assert_eq!((body(&got), got.wire), ("kept", m.wire));
    assert_eq!(bodies(&s.by_key("Keep", "k", 10).await.unwrap()), ["kept"]);
    let e = s.meta_get("ns", "k").await.unwrap().unwrap();
    assert_eq!((e.value.as_slice(), e.version), (&b"2"[..], 2));
    let w = s
        .meta_put_if("ns", "k", b"3".to_vec(), PutCondition::Version(2))
        .await
        .unwrap();
    assert_eq!(w, PutOutcome::Written { version: 3 });
    assert_eq!(s.load_offsets("G").await.unwrap(), [offset("Keep", 0, 1)]);
    assert_eq!(s.next_timer_ms(), Some(T0 + 60_000));
    assert_eq!(
        s.queue_bounds("Keep", 0).await.unwrap(),
        QueueBounds { min: 0, max: 1 }
    );

    let mut w = s.watch_queue("Keep", 0);
    assert_eq!(*w.borrow_and_update(), 1);
    clock.set(T0 + 60_000);
    assert_eq!(s.reveal_due(T0 + 60_000, 10).await.unwrap(), 1);
    tokio::time::timeout(PATIENCE, w.changed())
        .await
        .unwrap()
        .unwrap();
    let after = one(&*s, msg("Keep", 0, None, &[], "after")).await;
    assert_eq!(after.queue_offset, Some(2));
    assert_ne!(after.id, kept.id);
    let all = read_all(&*s, "Keep", 0).await;
    assert_eq!(bodies(&all), ["kept", "pending", "after"]);
    assert_eq!(all[1].id, pending.id);
    s.close().await.unwrap();
}

/// A lease epoch never goes backwards, even across a restart.
pub async fn restart_never_reuses_a_lease_epoch(make: Factory) {
    let (clock, mut fx, s) = open(make).await;
    if !fx.reopens() {
        return;
    }
    let k = key("G", "T", 0);
    let first = s.lease_acquire(&k, "h1", 1_000).await.unwrap().unwrap();
    s.lease_release(&first).await.unwrap();
    let second = s.lease_acquire(&k, "h2", 1_000).await.unwrap().unwrap();
    s.close().await.unwrap();
    // Past h2's lease, for backends whose lease rows outlive the process.
    clock.set(T0 + 1_001);
    let s = fx.open().await;
    let after = s.lease_acquire(&k, "h1", 1_000).await.unwrap().unwrap();
    assert!(after.epoch > second.epoch, "epochs never go backwards");
    let stale = s
        .commit_offsets_fenced("G", &[(offset("T", 0, 1), second.epoch)])
        .await
        .unwrap();
    assert_eq!(stale, [false]);
    s.close().await.unwrap();
}

conformance_suite!(embedded, crate::store::embedded::tests::fixture);
conformance_suite!(postgres, crate::store::postgres::tests::fixture);
