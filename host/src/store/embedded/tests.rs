//! Tests of the embedded store: behaviour, durability across reopen, crash recovery.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write as _};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use rand::{Rng, SeedableRng};

use super::*;
use crate::clock::{Clock, ManualClock};
use crate::error::ErrorCode;
use crate::model::tag_hash;
use crate::store::{Backend, FlushMode, open_store};

const T0: u64 = 1_700_000_000_000;

fn cfg(dir: &Path) -> StoreConfig {
    StoreConfig {
        data_dir: dir.to_path_buf(),
        segment_bytes: 16 * 1024,
        ..StoreConfig::default()
    }
}

fn small() -> Tuning {
    Tuning {
        cq_entries_per_file: 64,
        key_slots: 64,
        key_entries_per_file: 256,
        timer_bucket_ms: 1_000,
        timer_prefetch_ms: 2_000,
        checkpoint_interval_ms: 50,
        offsets_flush_ms: 50,
        preallocate_segments: true,
        // However slow the test machine's disk, a lone sender writes its own sync rounds.
        inline_fsync_max_us: u64::MAX / 1_000,
        fail_fsync_at: 0,
    }
}

async fn open(dir: &Path, clock: &Arc<ManualClock>) -> Arc<EmbeddedStore> {
    EmbeddedStore::open_with(&cfg(dir), clock.clone(), small())
        .await
        .unwrap()
}

fn msg(topic: &str, queue_id: u32, tag: Option<&str>, keys: &[&str], body: &str) -> NewMessage {
    NewMessage {
        topic: topic.to_string(),
        queue_id,
        tag: tag.map(str::to_string),
        keys: keys.iter().map(|k| k.to_string()).collect(),
        properties: [("p".to_string(), body.to_string())].into_iter().collect(),
        body: Bytes::from(body.to_string()),
        born_ms: 1,
        deliver_at_ms: None,
        reconsume_times: 0,
        wire: Default::default(),
    }
}

fn timer(topic: &str, queue_id: u32, body: &str, at: u64) -> NewMessage {
    NewMessage {
        deliver_at_ms: Some(at),
        ..msg(topic, queue_id, None, &[], body)
    }
}

fn body(m: &StoredMessage) -> String {
    String::from_utf8(m.body.to_vec()).unwrap()
}

async fn read_all(s: &EmbeddedStore, topic: &str, q: u32) -> Vec<StoredMessage> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let r = s.read_queue(topic, q, from, 100, None).await.unwrap();
        if r.messages.is_empty() && r.next_offset >= r.bounds.max {
            return out;
        }
        out.extend(r.messages);
        from = r.next_offset;
    }
}

#[tokio::test]
async fn append_get_and_read_queue_with_tag_filters() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let s = open(d.path(), &clock).await;
    let mut batch = Vec::new();
    for i in 0..30 {
        let tag = ["A", "B", "C"][i % 3];
        batch.push(msg(
            "TopicA",
            1,
            Some(tag),
            &[&format!("k{i}")],
            &format!("m{i}"),
        ));
    }
    let acks = s.append(batch).await.unwrap();
    assert_eq!(acks.len(), 30);
    for (i, a) in acks.iter().enumerate() {
        assert_eq!(a.queue_offset, Some(i as u64));
        assert_eq!(a.stored_ms, T0);
        assert_eq!(a.id.node(), s.node());
        let m = s.get(a.id).await.unwrap().unwrap();
        assert_eq!(body(&m), format!("m{i}"));
        assert_eq!(m.queue_offset, Some(i as u64));
        assert_eq!(m.properties["p"], format!("m{i}"));
    }
    // A forged id (same position, other time) is not the message.
    let fake = MessageId::new(T0 + 1, s.node(), acks[3].id.position());
    assert!(s.get(fake).await.unwrap().is_none());
    let off_record = MessageId::new(T0, s.node(), acks[3].id.position() + 1);
    assert!(s.get(off_record).await.unwrap().is_none());

    let b = s.queue_bounds("TopicA", 1).await.unwrap();
    assert_eq!((b.min, b.max), (0, 30));
    let filter = [tag_hash(Some("B"))];
    let r = s
        .read_queue("TopicA", 1, 0, 4, Some(&filter))
        .await
        .unwrap();
    let got: Vec<u64> = r.messages.iter().map(|m| m.queue_offset.unwrap()).collect();
    assert_eq!(got, vec![1, 4, 7, 10]);
    assert_eq!(r.next_offset, 11);
    let r = s
        .read_queue("TopicA", 1, 11, 100, Some(&filter))
        .await
        .unwrap();
    assert_eq!(r.messages.len(), 6);
    assert_eq!(r.next_offset, 30);
    assert!(r.messages.iter().all(|m| m.tag.as_deref() == Some("B")));
    let r = s.read_queue("TopicA", 1, 0, 100, None).await.unwrap();
    assert_eq!(r.messages.len(), 30);
    let r = s.read_queue("Nope", 0, 0, 10, None).await.unwrap();
    assert!(r.messages.is_empty());
    assert_eq!(r.bounds, QueueBounds::default());
    assert_eq!(s.offset_for_time("TopicA", 1, T0).await.unwrap(), 0);
    assert_eq!(s.offset_for_time("TopicA", 1, T0 + 1).await.unwrap(), 30);
    assert_eq!(s.earliest_stored_ms("TopicA").await.unwrap(), Some(T0));
    let st = s.stats();
    assert_eq!(st.appended_messages, 30);
    assert!(st.appended_bytes > 0 && st.disk_bytes >= st.appended_bytes);
    assert!(st.fsync_latency_us.count >= 1);
    s.close().await.unwrap();
    assert!(!s.writable());
    let e = s
        .append(vec![msg("TopicA", 1, None, &[], "x")])
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ServiceNotAvailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_serves_many_concurrent_appenders() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let s = open(d.path(), &clock).await;
    let mut tasks = Vec::new();
    for t in 0..64u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in 0..20 {
                let m = msg("Load", t % 4, None, &[], &format!("{t}-{i}"));
                acks.push((format!("{t}-{i}"), s.append(vec![m]).await.unwrap()[0]));
            }
            acks
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), 1280);
    for (b, a) in &all {
        assert_eq!(body(&s.get(a.id).await.unwrap().unwrap()), *b);
    }
    for q in 0..4 {
        let msgs = read_all(&s, "Load", q).await;
        assert_eq!(msgs.len(), 320);
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(m.queue_offset, Some(i as u64));
        }
    }
    let st = s.stats();
    // Group commit: far fewer fsyncs than acknowledged appends.
    assert!(
        st.fsync_latency_us.count < 1280,
        "{} fsyncs for 1280 appends",
        st.fsync_latency_us.count
    );
    assert_eq!(st.append_latency_us.count, 1280);
    for q in 0..4 {
        assert_eq!(
            *s.watch_queue("Load", q).borrow(),
            320,
            "waiters see every queue's end"
        );
    }
    s.close().await.unwrap();
}

#[tokio::test]
async fn key_index_returns_newest_64_across_index_files() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let s = open(d.path(), &clock).await;
    let mut want = Vec::new();
    for i in 0..200 {
        // 600 key entries overflow the 256-entry index files twice.
        let keys = if i % 2 == 0 {
            vec!["order-1", "noise-a"]
        } else {
            vec!["noise-b", "noise-c"]
        };
        let a = s
            .append(vec![msg("Keys", 0, None, &keys, &format!("m{i}"))])
            .await
            .unwrap();
        if i % 2 == 0 {
            want.push(a[0].id);
        }
    }
    // Same key on another topic must not show up.
    s.append(vec![msg("Other", 0, None, &["order-1"], "x")])
        .await
        .unwrap();
    let got = s.by_key("Keys", "order-1", 64).await.unwrap();
    let got_ids: Vec<MessageId> = got.iter().map(|m| m.id).collect();
    let newest: Vec<MessageId> = want.iter().rev().take(64).copied().collect();
    assert_eq!(got_ids, newest);
    assert!(s.by_key("Keys", "missing", 64).await.unwrap().is_empty());
    assert_eq!(s.by_key("Other", "order-1", 64).await.unwrap().len(), 1);
    s.close().await.unwrap();
    // Still found after reopen (slot table of the active file rebuilt).
    let s = open(d.path(), &clock).await;
    let again: Vec<MessageId> = s
        .by_key("Keys", "order-1", 64)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(again, newest);
    s.close().await.unwrap();
}

#[tokio::test]
async fn by_time_pages_across_queues_in_time_order() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let s = open(d.path(), &clock).await;
    let mut expected = Vec::new();
    for i in 0..50u64 {
        clock.set(T0 + i * 10);
        let q = (i % 4) as u32;
        let a = s
            .append(vec![msg("Timed", q, None, &[], &format!("m{i}"))])
            .await
            .unwrap();
        if (100..=400).contains(&(i * 10)) {
            expected.push(a[0].id);
        }
    }
    let mut got = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let p = s
            .by_time("Timed", T0 + 100, T0 + 400, 7, token.as_deref())
            .await
            .unwrap();
        assert!(p.messages.len() <= 7);
        got.extend(p.messages.iter().map(|m| m.id));
        pages += 1;
        match p.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert_eq!(got, expected);
    assert!(pages >= 5);
    let e = s
        .by_time("Timed", T0, T0 + 10, 5, Some("garbage"))
        .await
        .unwrap_err();
    assert_eq!(e.http_status(), 400);
    assert!(
        s.by_time("Nope", 0, u64::MAX, 5, None)
            .await
            .unwrap()
            .messages
            .is_empty()
    );
    s.close().await.unwrap();
}

#[tokio::test]
async fn timers_reveal_in_deliver_order_and_survive_restart() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let s = open(d.path(), &clock).await;
    s.append(vec![msg("Delay", 0, None, &[], "plain")])
        .await
        .unwrap();
    let mut batch = Vec::new();
    // Deliver times spread over several 1 s buckets, out of order.
    let times = [5_000u64, 1_500, 3_000, 1_500, 9_000, 2_500, 7_000, 4_000];
    for (i, t) in times.iter().enumerate() {
        batch.push(timer("Delay", 0, &format!("t{i}"), T0 + t));
    }
    // A deliver time in the past is visible at once.
    batch.push(timer("Delay", 0, "past", T0 - 5));
    let acks = s.append(batch).await.unwrap();
    assert!(acks[..8].iter().all(|a| a.queue_offset.is_none()));
    assert_eq!(acks[8].queue_offset, Some(1));
    assert_eq!(s.stats().pending_timers, 8);
    assert_eq!(s.next_timer_ms(), Some(T0 + 1_500));
    assert_eq!(s.reveal_due(T0 + 1_000, 100).await.unwrap(), 0);
    let held = s.get(acks[0].id).await.unwrap().unwrap();
    assert_eq!(held.queue_offset, None);
    assert_eq!(held.deliver_at_ms, Some(T0 + 5_000));

    clock.set(T0 + 3_000);
    assert_eq!(s.reveal_due(T0 + 3_000, 100).await.unwrap(), 4);
    let visible = read_all(&s, "Delay", 0).await;
    let names: Vec<String> = visible.iter().map(body).collect();
    assert_eq!(names, vec!["plain", "past", "t1", "t3", "t5", "t2"]);
    assert_eq!(visible[2].queue_offset, Some(2));
    // Query by id reports the offset a revealed timer got; a held one still has none.
    assert_eq!(
        s.get(acks[1].id).await.unwrap().unwrap().queue_offset,
        Some(2)
    );
    assert_eq!(
        s.get(acks[2].id).await.unwrap().unwrap().queue_offset,
        Some(5)
    );
    assert_eq!(s.get(acks[0].id).await.unwrap().unwrap().queue_offset, None);
    assert_eq!(s.next_timer_ms(), Some(T0 + 4_000));
    assert_eq!(s.stats().pending_timers, 4);

    // Crash (no checkpoint), then restart: pending timers and revealed entries are rebuilt.
    s.halt().await;
    drop(s);
    let s = open(d.path(), &clock).await;
    assert_eq!(s.stats().pending_timers, 4);
    assert_eq!(s.next_timer_ms(), Some(T0 + 4_000));
    assert_eq!(read_all(&s, "Delay", 0).await.len(), 6);
    clock.set(T0 + 7_000);
    assert_eq!(s.reveal_due(T0 + 7_000, 2).await.unwrap(), 2);
    assert_eq!(s.reveal_due(T0 + 7_000, 100).await.unwrap(), 1);
    s.close().await.unwrap();
    let s = open(d.path(), &clock).await;
    clock.set(T0 + 10_000);
    assert_eq!(s.reveal_due(T0 + 10_000, 100).await.unwrap(), 1);
    assert_eq!(s.next_timer_ms(), None);
    let names: Vec<String> = read_all(&s, "Delay", 0).await.iter().map(body).collect();
    assert_eq!(
        names,
        vec![
            "plain", "past", "t1", "t3", "t5", "t2", "t7", "t0", "t6", "t4"
        ]
    );
    assert_eq!(s.stats().pending_timers, 0);
    // After restarts the lookup still finds the offset from the rebuilt consume queue.
    assert_eq!(
        s.get(acks[0].id).await.unwrap().unwrap().queue_offset,
        Some(7)
    );
    s.close().await.unwrap();
}

#[tokio::test]
async fn offsets_and_metadata_survive_reopen() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let s = open(d.path(), &clock).await;
    s.meta_put("topics", "b", b"2".to_vec()).await.unwrap();
    s.meta_put("topics", "a", b"1".to_vec()).await.unwrap();
    s.meta_put("groups", "g", b"x".to_vec()).await.unwrap();
    s.meta_put("topics", "c", b"3".to_vec()).await.unwrap();
    s.meta_delete("topics", "c").await.unwrap();
    s.meta_delete("topics", "never").await.unwrap();
    let off = |t: &str, q, o| CommittedOffset {
        topic: t.into(),
        queue_id: q,
        offset: o,
    };
    s.commit_offsets("G1", &[off("T", 0, 5), off("T", 1, 7)])
        .await
        .unwrap();
    s.commit_offsets("G1", &[off("T", 0, 6)]).await.unwrap();
    s.commit_offsets("G2", &[off("T", 0, 1)]).await.unwrap();
    s.delete_offsets("G2").await.unwrap();
    // Offsets reach disk on the periodic flush even without close: wait for the file.
    let path = d.path().join("offsets");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let saved = files::read_atomic(&path)
            .unwrap()
            .and_then(|b| files::decode_offsets(&b));
        if saved.is_some_and(|o| {
            o.get("G1")
                .is_some_and(|g| g.get(&("T".to_string(), 0)) == Some(&6))
                && !o.contains_key("G2")
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "offsets never flushed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.halt().await;
    drop(s);
    let s = open(d.path(), &clock).await;
    assert_eq!(
        s.meta_list("topics").await.unwrap(),
        vec![
            ("a".to_string(), b"1".to_vec()),
            ("b".to_string(), b"2".to_vec())
        ]
    );
    assert_eq!(s.meta_list("groups").await.unwrap().len(), 1);
    assert!(s.meta_list("empty").await.unwrap().is_empty());
    assert_eq!(
        s.load_offsets("G1").await.unwrap(),
        vec![off("T", 0, 6), off("T", 1, 7)]
    );
    assert!(s.load_offsets("G2").await.unwrap().is_empty());
    s.commit_offsets("G3", &[off("T", 2, 9)]).await.unwrap();
    s.close().await.unwrap();
    let s = open(d.path(), &clock).await;
    assert_eq!(s.load_offsets("G3").await.unwrap(), vec![off("T", 2, 9)]);
    s.close().await.unwrap();
}

/// One metadata write costs one journal record, not a rewrite of its namespace: 10,000 MQTT
/// clients each writing their own key must not rewrite 10,000 keys apiece.
#[tokio::test]
async fn a_metadata_journal_lies_only_beside_a_namespace_file_that_says_so() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let s = open(d.path(), &clock).await;
    s.meta_put("topics", "a", b"1".to_vec()).await.unwrap();
    s.meta_put("topics", "b", b"2".to_vec()).await.unwrap();
    let dir = d.path().join("meta");
    let whole = fs::read(files::namespace_path(&dir, "topics")).unwrap();
    // Format 3's marker: a build reading formats 1 and 2 only refuses the file rather than
    // reading it without the journal's changes.
    assert_eq!(whole[..4], (u32::MAX - 1).to_le_bytes());
    assert!(
        fs::metadata(files::journal_path(&dir, "topics"))
            .unwrap()
            .len()
            > 0
    );
    s.close().await.unwrap();
    drop(s);
    let s = open(d.path(), &clock).await;
    assert_eq!(s.meta_list("topics").await.unwrap().len(), 2);
    s.close().await.unwrap();
}

#[tokio::test]
async fn metadata_writes_append_to_a_journal_folded_now_and_then() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let s = open(d.path(), &clock).await;
    let value = |i: usize, round: usize| format!("{i:05}-{round}-{}", "v".repeat(100)).into_bytes();
    for i in 0..4_000 {
        s.meta_put("owners", &format!("c{i:05}"), value(i, 0))
            .await
            .unwrap();
    }
    for i in (0..4_000).step_by(2) {
        let w = s
            .meta_put_if(
                "owners",
                &format!("c{i:05}"),
                value(i, 1),
                PutCondition::Version(1),
            )
            .await
            .unwrap();
        assert_eq!(w, PutOutcome::Written { version: 2 });
    }
    for i in (0..4_000).step_by(3) {
        s.meta_delete("owners", &format!("c{i:05}")).await.unwrap();
    }
    let dir = d.path().join("meta");
    let size = |p: PathBuf| fs::metadata(p).map_or(0, |m| m.len());
    let whole = size(files::namespace_path(&dir, "owners"));
    let journal = size(files::journal_path(&dir, "owners"));
    assert!(whole > 0, "the journal was folded into the namespace file");
    assert!(
        journal <= whole.max(256 << 10) + 256,
        "the journal is folded once it outgrows the namespace file ({journal} vs {whole})"
    );
    let want = |s: Arc<EmbeddedStore>| async move {
        let mut all = s.meta_list("owners").await.unwrap();
        all.retain(|(k, _)| k.starts_with("c0"));
        let expected: Vec<(String, Vec<u8>)> = (0..4_000)
            .filter(|i| i % 3 != 0)
            .map(|i| (format!("c{i:05}"), value(i, usize::from(i % 2 == 0))))
            .collect();
        // Compared in parts: a failure printing 2,666 values helps nobody.
        let first_wrong = all.iter().zip(&expected).position(|(a, b)| a != b);
        assert_eq!((all.len(), first_wrong), (expected.len(), None));
        let e = s.meta_get("owners", "c00002").await.unwrap().unwrap();
        assert_eq!(e.version, 2);
        let e = s.meta_get("owners", "c00001").await.unwrap().unwrap();
        assert_eq!(e.version, 1);
        s
    };
    let s = want(s).await;
    s.close().await.unwrap();
    drop(s);

    // A crash in the middle of an append leaves a torn record: it was never acknowledged, so
    // it is dropped, and what is written next reads back after it.
    let jpath = files::journal_path(&dir, "owners");
    let mut torn = files::encode_change(
        "c99999",
        Some(&MetaEntry {
            value: b"lost".to_vec(),
            version: 1,
        }),
    );
    torn.truncate(torn.len() - 3);
    let mut f = OpenOptions::new().append(true).open(&jpath).unwrap();
    f.write_all(&torn).unwrap();
    drop(f);
    let s = want(open(d.path(), &clock).await).await;
    assert_eq!(s.meta_get("owners", "c99999").await.unwrap(), None);
    s.meta_put("owners", "c99998", b"after".to_vec())
        .await
        .unwrap();
    s.close().await.unwrap();
    drop(s);
    let s = want(open(d.path(), &clock).await).await;
    assert_eq!(
        s.meta_get("owners", "c99998")
            .await
            .unwrap()
            .map(|e| e.value),
        Some(b"after".to_vec())
    );
    s.close().await.unwrap();
}

#[tokio::test]
async fn retention_deletes_old_segments_and_moves_queue_min() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let s = open(d.path(), &clock).await;
    let big = "x".repeat(1000);
    let mut old = Vec::new();
    for i in 0..40 {
        let a = s
            .append(vec![msg("Ret", 0, None, &["k"], &format!("{i}{big}"))])
            .await
            .unwrap();
        old.push(a[0].id);
    }
    // A far-away timer in an old segment keeps that segment alive until revealed.
    let hold = s
        .append(vec![timer("Ret", 0, "late", T0 + 100 * 3_600_000)])
        .await
        .unwrap()[0]
        .id;
    let hours = 3_600_000;
    let segs_old = s.stats().segments;
    clock.set(T0 + 80 * hours);
    let mut fresh = Vec::new();
    for i in 0..20 {
        let a = s
            .append(vec![msg("Ret", 0, None, &["k"], &format!("new{i}{big}"))])
            .await
            .unwrap();
        fresh.push(a[0].id);
    }
    let segs_before = s.stats().segments;
    let r = s.enforce_retention(T0 + 80 * hours).await.unwrap();
    assert_eq!(s.stats().segments, segs_before - r.segments_deleted);
    // The writer's own pass (after every roll) may have deleted them before this call did.
    assert!(s.stats().segments < segs_old + 2, "{r:?}");
    let b = s.queue_bounds("Ret", 0).await.unwrap();
    assert!(b.min > 0 && b.max == 60, "{b:?}");
    for id in &old[..(b.min as usize).min(old.len())] {
        assert!(s.get(*id).await.unwrap().is_none());
    }
    for id in &fresh {
        assert!(s.get(*id).await.unwrap().is_some());
    }
    assert!(
        s.get(hold).await.unwrap().is_some(),
        "segment with a pending timer was deleted"
    );
    let keyed = s.by_key("Ret", "k", 64).await.unwrap();
    assert!(keyed.len() >= 20 && keyed.len() < 61);
    let page = s.by_time("Ret", 0, u64::MAX, 100, None).await.unwrap();
    assert!(page.messages.len() >= 20);
    let r = s.read_queue("Ret", 0, 0, 100, None).await.unwrap();
    assert_eq!(r.messages[0].queue_offset, Some(b.min));
    assert!(s.earliest_stored_ms("Ret").await.unwrap().is_some());
    // Reveal the timer; its segment is kept a retention period from the reveal, then goes.
    clock.set(T0 + 101 * hours);
    assert_eq!(s.reveal_due(T0 + 101 * hours, 10).await.unwrap(), 1);
    clock.set(T0 + 170 * hours);
    s.enforce_retention(T0 + 170 * hours).await.unwrap();
    assert!(
        s.get(hold).await.unwrap().is_some(),
        "a revealed message went before a retention period from its reveal"
    );
    clock.set(T0 + 200 * hours);
    s.enforce_retention(T0 + 200 * hours).await.unwrap();
    assert!(s.get(hold).await.unwrap().is_none());
    s.close().await.unwrap();
    let s = open(d.path(), &clock).await;
    let b2 = s.queue_bounds("Ret", 0).await.unwrap();
    assert!(b2.min >= b.min && b2.max == 61);
    s.close().await.unwrap();
}

#[tokio::test]
async fn full_disk_fails_the_round_and_keeps_stored_data() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let s = open(d.path(), &clock).await;
    let first = s
        .append(vec![msg("Disk", 0, None, &[], "kept")])
        .await
        .unwrap();
    s.sh.fail_writes.store(1, Ordering::Release);
    let e = s
        .append(vec![msg("Disk", 0, None, &[], "lost")])
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ServiceNotAvailable);
    assert!(e.message.contains(&d.path().display().to_string()));
    assert!(!s.writable());
    let next = s
        .append(vec![msg("Disk", 0, None, &[], "after")])
        .await
        .unwrap();
    assert!(s.writable());
    assert_eq!(next[0].queue_offset, Some(1));
    assert_eq!(body(&s.get(first[0].id).await.unwrap().unwrap()), "kept");
    let names: Vec<String> = read_all(&s, "Disk", 0).await.iter().map(body).collect();
    assert_eq!(names, vec!["kept", "after"]);
    s.close().await.unwrap();
}

#[tokio::test]
async fn unusable_data_dir_fails_with_its_name() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let bad = file.join("data");
    let clock = ManualClock::new(T0);
    let e = EmbeddedStore::open_with(&cfg(&bad), clock.clone(), small())
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ServiceNotAvailable);
    assert!(e.message.contains(&bad.display().to_string()), "{e}");
    // A second host on the same dir is refused while the first runs.
    let s = open(d.path(), &clock).await;
    let e = EmbeddedStore::open_with(&cfg(d.path()), clock.clone(), small())
        .await
        .unwrap_err();
    assert!(e.message.contains("in use"), "{e}");
    s.close().await.unwrap();
    let pg = StoreConfig {
        backend: Backend::Postgres,
        ..cfg(d.path())
    };
    let e = open_store(&pg, clock.clone()).await.err().unwrap();
    assert!(e.message.contains("postgres"), "{e}");
    let s = open_store(&cfg(d.path()), clock.clone()).await.unwrap();
    s.close().await.unwrap();
}

#[tokio::test]
async fn async_flush_acknowledges_and_syncs_periodically() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let c = StoreConfig {
        flush: FlushMode::Async,
        flush_interval_ms: 10,
        ..cfg(d.path())
    };
    let s = EmbeddedStore::open_with(&c, clock.clone(), small())
        .await
        .unwrap();
    let a = s
        .append(vec![msg("Async", 0, None, &[], "m")])
        .await
        .unwrap();
    assert!(s.get(a[0].id).await.unwrap().is_some());
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.stats().fsync_latency_us.count == 0 {
        assert!(Instant::now() < deadline, "no periodic fsync");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_sync_sender_fsyncs_its_own_rounds_and_they_survive_a_crash() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    // No checkpoints and no spare segment: the writer thread has nothing of its own to do that
    // could hold the writer when the sender comes.
    let tuning = Tuning {
        checkpoint_interval_ms: 3_600_000,
        preallocate_segments: false,
        ..small()
    };
    let s = EmbeddedStore::open_with(&cfg(d.path()), clock.clone(), tuning)
        .await
        .unwrap();
    let mut acks = Vec::new();
    for i in 0..30 {
        let a = s
            .append(vec![msg("Lone", 0, None, &[], &format!("lone-{i}"))])
            .await
            .unwrap();
        acks.push(a[0]);
    }
    // Appends one at a time, each arriving after the last one's fsync, so further apart than
    // the smoothed fsync: the sender writes and fsyncs its own rounds (all but any that meet
    // the writer thread in its periodic maintenance, or an fsync far slower than the ones
    // before it on a loaded machine).
    let inline = s.sh.inline_rounds.load(Ordering::Relaxed);
    assert!(inline >= 10, "{inline} of 30 rounds written by the sender");
    // Every acknowledged append had its own fsync: none waited for a later one.
    assert!(s.stats().fsync_latency_us.count >= 30);
    s.halt().await;
    drop(s);
    let s = open(d.path(), &clock).await;
    let bodies: Vec<String> = read_all(&s, "Lone", 0).await.iter().map(body).collect();
    let want: Vec<String> = (0..30).map(|i| format!("lone-{i}")).collect();
    assert_eq!(bodies, want);
    for a in &acks {
        assert!(s.get(a.id).await.unwrap().is_some());
    }
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_appends_written_by_senders_or_the_writer_keep_order_across_rolls_and_restart() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let c = StoreConfig {
        flush: FlushMode::Async,
        ..cfg(d.path())
    };
    let s = EmbeddedStore::open_with(&c, clock.clone(), small())
        .await
        .unwrap();
    // One sender at a time: light load, so senders write their own rounds.
    for i in 0..20 {
        s.append(vec![msg("Mix", 0, None, &[], &format!("solo-{i}"))])
            .await
            .unwrap();
    }
    assert!(s.sh.inline_rounds.load(Ordering::Relaxed) > 0);
    // Eight senders at once over many 16 KiB segments: rounds that roll go to the writer
    // thread, and busy stretches do too.
    let mut tasks = Vec::new();
    for t in 0..8u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..150 {
                let b = format!("t{t}-{i}-{}", "z".repeat(200));
                s.append(vec![msg("Mix", 1 + t % 2, None, &[], &b)])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let check = |s: Arc<EmbeddedStore>| async move {
        let solo: Vec<String> = read_all(&s, "Mix", 0).await.iter().map(body).collect();
        assert_eq!(
            solo,
            (0..20).map(|i| format!("solo-{i}")).collect::<Vec<_>>()
        );
        for q in 1..3u32 {
            let got = read_all(&s, "Mix", q).await;
            assert_eq!(got.len(), 600, "queue {q}");
            for (i, m) in got.iter().enumerate() {
                assert_eq!(m.queue_offset, Some(i as u64));
            }
            // Each sender's messages are in the order it sent them.
            for t in (q - 1..8).step_by(2) {
                let mine: Vec<String> = got
                    .iter()
                    .map(body)
                    .filter(|b| b.starts_with(&format!("t{t}-")))
                    .collect();
                let want: Vec<String> = (0..150)
                    .map(|i| format!("t{t}-{i}-{}", "z".repeat(200)))
                    .collect();
                assert_eq!(mine, want, "sender {t}");
            }
        }
    };
    check(s.clone()).await;
    s.close().await.unwrap();
    // Appends after close fail at once instead of waiting for a writer that is gone.
    let e = s
        .append(vec![msg("Mix", 0, None, &[], "late")])
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ServiceNotAvailable);
    let s = EmbeddedStore::open_with(&c, clock.clone(), small())
        .await
        .unwrap();
    check(s.clone()).await;
    s.close().await.unwrap();
}

/// Writes `n` messages over several segments and returns (id, body, queue offset) per message.
async fn fill(s: &EmbeddedStore, n: usize) -> Vec<(MessageId, String, u64)> {
    let mut out = Vec::new();
    for i in 0..n {
        let b = format!("body-{i}-{}", "y".repeat(i % 300));
        let a = s
            .append(vec![msg(
                "Dmg",
                (i % 2) as u32,
                None,
                &[&format!("k{}", i % 5)],
                &b,
            )])
            .await
            .unwrap();
        out.push((a[0].id, b, a[0].queue_offset.unwrap()));
    }
    out
}

#[tokio::test]
async fn random_truncation_and_corruption_keep_everything_before_the_damage() {
    // WHARF_STORE_DAMAGE_ROUNDS / _SEED widen the search when hunting a recovery bug.
    let rounds: u64 = std::env::var("WHARF_STORE_DAMAGE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let seed: u64 = std::env::var("WHARF_STORE_DAMAGE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5EED);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for round in 0..rounds {
        let d = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0);
        let s = open(d.path(), &clock).await;
        let written = fill(&s, 120).await;
        // Half the rounds crash (indexes lag the log), half close cleanly.
        if round % 2 == 0 {
            s.halt().await;
        } else {
            s.close().await.unwrap();
        }
        drop(s);
        let mut segs: Vec<_> = std::fs::read_dir(d.path().join("log"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        segs.sort();
        let victim = &segs[rng.random_range(0..segs.len())];
        let base: u64 = victim
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let len = std::fs::metadata(victim).unwrap().len();
        let at = rng.random_range(0..len);
        let truncate = rng.random_bool(0.5);
        if truncate {
            std::fs::OpenOptions::new()
                .write(true)
                .open(victim)
                .unwrap()
                .set_len(at)
                .unwrap();
        } else {
            let mut bytes = std::fs::read(victim).unwrap();
            bytes[at as usize] ^= 0x5A;
            std::fs::write(victim, bytes).unwrap();
        }
        let damage = base + at;
        let s = open(d.path(), &clock).await;
        let by_id: HashMap<MessageId, &String> = written.iter().map(|(i, b, _)| (*i, b)).collect();
        for (id, b, _) in &written {
            let got = s.get(*id).await.unwrap();
            // A record is intact when the next one starts at or before the damage.
            let next = written
                .iter()
                .map(|w| w.0.position())
                .filter(|p| *p > id.position())
                .min()
                .unwrap_or(u64::MAX);
            if next <= damage {
                let m = got.unwrap_or_else(|| {
                    panic!("round {round}: lost {id} before damage at {damage}")
                });
                assert_eq!(&body(&m), b);
            } else if let Some(m) = got {
                assert_eq!(&body(&m), b, "round {round}: garbage for {id}");
            }
        }
        let intact = |id: MessageId| {
            let next = written
                .iter()
                .map(|w| w.0.position())
                .filter(|p| *p > id.position())
                .min()
                .unwrap_or(u64::MAX);
            next <= damage
        };
        for q in 0..2u32 {
            let msgs = read_all(&s, "Dmg", q).await;
            for m in &msgs {
                assert_eq!(by_id.get(&m.id).map(|b| b.as_str()), Some(body(m).as_str()));
            }
            for (id, _, off) in written.iter() {
                let in_q = s.get(*id).await.unwrap().is_some_and(|m| m.queue_id == q);
                if in_q && intact(*id) {
                    assert!(
                        msgs.iter()
                            .any(|m| m.id == *id && m.queue_offset == Some(*off)),
                        "round {round}: {id} missing from queue {q}"
                    );
                }
            }
        }
        // The store keeps working after recovery, without reusing queue offsets of kept data.
        let a = s
            .append(vec![msg("Dmg", 0, None, &["k0"], "after")])
            .await
            .unwrap();
        assert!(s.get(a[0].id).await.unwrap().is_some());
        let q0 = read_all(&s, "Dmg", 0).await;
        let offs: Vec<u64> = q0.iter().map(|m| m.queue_offset.unwrap()).collect();
        let mut sorted = offs.clone();
        sorted.dedup();
        assert_eq!(offs, sorted, "round {round}: duplicate queue offsets");
        for m in s.by_key("Dmg", "k0", 64).await.unwrap() {
            if m.id != a[0].id {
                assert_eq!(
                    by_id.get(&m.id).map(|b| b.as_str()),
                    Some(body(&m).as_str())
                );
            }
        }
        s.close().await.unwrap();
    }
}

const CHILD_ENV: &str = "WHARF_STORE_KILL9_CHILD_DIR";

fn kill9_child(dir: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let clock: SharedClock = Arc::new(crate::clock::SystemClock::default());
        let c = StoreConfig {
            data_dir: dir.into(),
            segment_bytes: 64 * 1024,
            ..StoreConfig::default()
        };
        let s = EmbeddedStore::open_with(&c, clock, small()).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for w in 0..8u32 {
            let s = s.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                for i in 0u64.. {
                    let mut m = msg(
                        "Crash",
                        w % 3,
                        Some("T"),
                        &[&format!("k{w}")],
                        &format!("{w}-{i}"),
                    );
                    let now = crate::clock::SystemClock::default().now_ms();
                    if i % 7 == 0 {
                        m.deliver_at_ms = Some(now + 3_600_000);
                    } else if i % 5 == 0 {
                        // Due almost at once: revealed by the ticker while the load runs.
                        m.deliver_at_ms = Some(now + 20);
                    }
                    match s.append(vec![m]).await {
                        Ok(a) => {
                            let _ = tx.send(a[0]);
                        }
                        Err(_) => return,
                    }
                }
            });
        }
        drop(tx);
        let ticker = s.clone();
        tokio::spawn(async move {
            loop {
                let now = crate::clock::SystemClock::default().now_ms();
                if ticker.reveal_due(now, 1_000).await.is_err() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        });
        let mut out = std::io::stdout().lock();
        while let Some(a) = rx.recv().await {
            let off = a.queue_offset.map_or("-".to_string(), |o| o.to_string());
            writeln!(out, "ACK {} {} {}", a.id, a.queue_id, off).unwrap();
            out.flush().unwrap();
        }
    });
}

#[test]
fn kill9_mid_load_loses_no_acknowledged_message() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        kill9_child(&dir);
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "store::embedded::tests::kill9_mid_load_loses_no_acknowledged_message",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, d.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut acked: Vec<(MessageId, u32, Option<u64>)> = Vec::new();
    let parse = |l: &str| -> Option<(MessageId, u32, Option<u64>)> {
        let mut it = l.strip_prefix("ACK ")?.split(' ');
        let id: MessageId = it.next()?.parse().ok()?;
        let q: u32 = it.next()?.parse().ok()?;
        let off = it.next()?.parse::<u64>().ok();
        Some((id, q, off))
    };
    for l in lines.by_ref() {
        let l = l.unwrap();
        if let Some(a) = parse(&l) {
            acked.push(a);
            if acked.len() >= 1500 {
                break;
            }
        }
    }
    child.kill().unwrap();
    // Lines already printed were acknowledged before the kill.
    for l in lines {
        match l {
            Ok(l) => acked.extend(parse(&l)),
            Err(_) => break,
        }
    }
    child.wait().unwrap();
    assert!(
        acked.len() >= 1500,
        "child acknowledged only {}",
        acked.len()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let clock = ManualClock::new(crate::clock::SystemClock::default().now_ms());
        let c = StoreConfig {
            data_dir: d.path().into(),
            segment_bytes: 64 * 1024,
            ..StoreConfig::default()
        };
        let s = EmbeddedStore::open_with(&c, clock.clone(), small())
            .await
            .unwrap();
        let mut by_queue: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        let mut timers = 0;
        for (id, q, off) in &acked {
            let m = s
                .get(*id)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("acknowledged {id} lost"));
            assert_eq!(m.queue_id, *q);
            match off {
                Some(o) => by_queue.entry(*q).or_default().push(*o),
                None => timers += 1,
            }
        }
        eprintln!("kill9: {} acknowledged, {timers} held at ack", acked.len());
        assert!(timers > 0);
        // Reveal every short timer (long ones stay held): each must then be visible exactly once.
        let now = clock.now_ms() + 60_000;
        clock.set(now);
        while s.reveal_due(now, 1_000).await.unwrap() > 0 {}
        let mut seen = std::collections::HashSet::new();
        for q in 0..3 {
            for m in read_all(&s, "Crash", q).await {
                assert!(seen.insert(m.id), "{} visible twice", m.id);
            }
        }
        for (id, _, off) in &acked {
            let m = s.get(*id).await.unwrap().unwrap();
            let short = m.deliver_at_ms.is_some_and(|d| d < now);
            if off.is_some() || short {
                assert!(
                    seen.contains(id),
                    "acknowledged {id} not visible after recovery"
                );
            } else {
                assert!(!seen.contains(id), "held timer {id} visible too early");
            }
        }
        for (q, offs) in by_queue {
            let msgs = read_all(&s, "Crash", q).await;
            for (i, m) in msgs.iter().enumerate() {
                assert_eq!(m.queue_offset, Some(i as u64), "queue {q} has a gap");
            }
            let max = s.queue_bounds("Crash", q).await.unwrap().max;
            assert!(
                offs.iter().all(|o| *o < max),
                "queue {q} lost acknowledged offsets"
            );
        }
        s.close().await.unwrap();
    });
}

#[tokio::test]
async fn far_timers_wait_on_disk_and_fire_on_time() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    // Async flush: this test is about timing, not fsync; it makes thousands of reveal rounds.
    let c = StoreConfig {
        flush: FlushMode::Async,
        ..cfg(d.path())
    };
    let s = EmbeddedStore::open_with(&c, clock.clone(), small())
        .await
        .unwrap();
    // 2,000 timers over 200 s (200 one-second buckets); the prefetch window is 2 s.
    let mut batch = Vec::new();
    for i in 0..2_000u64 {
        batch.push(timer(
            "Far",
            (i % 4) as u32,
            &format!("{i}"),
            T0 + 1_000 + i * 100,
        ));
        if batch.len() == 500 {
            s.append(std::mem::take(&mut batch)).await.unwrap();
        }
    }
    assert_eq!(s.stats().pending_timers, 2_000);
    assert!(
        s.timers_in_memory() <= 40,
        "{} timers in memory",
        s.timers_in_memory()
    );
    // Tick every 50 ms of (manual) time: each timer becomes visible no later than one tick after
    // its deliver time, in deliver order.
    let mut seen = 0u64;
    let mut now = T0;
    while seen < 2_000 {
        now += 50;
        clock.set(now);
        while s.reveal_due(now, 1_000).await.unwrap() > 0 {}
        let mut total = 0;
        for q in 0..4 {
            total += s.queue_bounds("Far", q).await.unwrap().max;
        }
        let due = ((now - T0).saturating_sub(1_000) / 100 + 1).min(2_000);
        if now >= T0 + 1_000 {
            assert_eq!(total, due, "at +{} ms", now - T0);
        }
        seen = total;
        assert!(s.timers_in_memory() <= 40);
        if now == T0 + 100_000 {
            // Restart in the middle: pending timers come back from disk.
            s.halt().await;
        }
        if now == T0 + 100_000 {
            break;
        }
    }
    drop(s);
    let s = EmbeddedStore::open_with(&c, clock.clone(), small())
        .await
        .unwrap();
    assert_eq!(s.stats().pending_timers, 2_000 - seen);
    while seen < 2_000 {
        now += 50;
        clock.set(now);
        while s.reveal_due(now, 1_000).await.unwrap() > 0 {}
        let mut total = 0;
        for q in 0..4 {
            total += s.queue_bounds("Far", q).await.unwrap().max;
        }
        let due = ((now - T0).saturating_sub(1_000) / 100 + 1).min(2_000);
        assert_eq!(total, due, "after restart at +{} ms", now - T0);
        seen = total;
    }
    let mut bodies = Vec::new();
    for q in 0..4 {
        for m in read_all(&s, "Far", q).await {
            let i: u64 = body(&m).parse().unwrap();
            assert_eq!(i % 4, q as u64);
            bodies.push(i);
        }
    }
    bodies.sort_unstable();
    assert_eq!(bodies, (0..2_000).collect::<Vec<_>>());
    assert_eq!(s.next_timer_ms(), None);
    s.close().await.unwrap();
}

#[tokio::test]
async fn far_future_timers_share_coarse_buckets_and_keep_order() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let s = open(d.path(), &clock).await;
    let h = 3_600_000u64;
    // Near (minute tier), hours ahead (hour tier) and days ahead (day tier), interleaved so a
    // coarse bucket holds timers due before timers of finer buckets.
    let plan = [
        ("d10", 10 * 24 * h),
        ("h3", 3 * h),
        ("d4", 4 * 24 * h + 5),
        ("m1", 60_000),
        ("h30", 30 * h),
        ("d4b", 4 * 24 * h + 1),
        ("h3b", 3 * h + 7),
    ];
    let batch: Vec<NewMessage> = plan
        .iter()
        .map(|(n, at)| timer("Tiers", 0, n, T0 + at))
        .collect();
    s.append(batch).await.unwrap();
    // 200 more timers spread over 20 days land in few files (day tier).
    let spread: Vec<NewMessage> = (0..200u64)
        .map(|i| timer("Spread", 0, &i.to_string(), T0 + 11 * 24 * h + i * 2 * h))
        .collect();
    s.append(spread).await.unwrap();
    s.close().await.unwrap();
    let files = std::fs::read_dir(d.path().join("timers")).unwrap().count();
    assert!(files <= 2 * 30, "{files} timer files");
    let s = open(d.path(), &clock).await;
    assert_eq!(s.next_timer_ms(), Some(T0 + 60_000));
    let mut order = Vec::new();
    let mut due: Vec<u64> = plan.iter().map(|p| p.1).collect();
    due.sort_unstable();
    for t in due {
        assert_eq!(s.next_timer_ms(), Some(T0 + t));
        clock.set(T0 + t);
        assert_eq!(s.reveal_due(T0 + t, 100).await.unwrap(), 1);
        // Read each as it fires: retention (3 days) deletes the early ones days before the last.
        let next = order.len() as u64;
        let r = s.read_queue("Tiers", 0, next, 10, None).await.unwrap();
        assert_eq!(r.messages.len(), 1, "at +{t} ms");
        assert_eq!(r.messages[0].queue_offset, Some(next));
        order.push(body(&r.messages[0]));
    }
    assert_eq!(order, vec!["m1", "h3", "h3b", "h30", "d4b", "d4", "d10"]);
    clock.set(T0 + 40 * 24 * h);
    while s.reveal_due(T0 + 40 * 24 * h, 64).await.unwrap() > 0 {}
    let spread: Vec<u64> = read_all(&s, "Spread", 0)
        .await
        .iter()
        .map(|m| body(m).parse().unwrap())
        .collect();
    assert_eq!(spread, (0..200).collect::<Vec<_>>());
    assert_eq!(s.stats().pending_timers, 0);
    s.close().await.unwrap();
}

// ------------------------------------------------------------------ conformance, formats

/// The embedded store in a temporary data dir, reopened over the same dir.
struct Fixture {
    dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
}

#[async_trait::async_trait]
impl crate::store::conformance::Fixture for Fixture {
    async fn open(&mut self) -> Arc<dyn Store> {
        open(self.dir.path(), &self.clock).await
    }

    fn reopens(&self) -> bool {
        true
    }
}

/// The conformance suite's factory for the embedded store.
pub(crate) fn fixture(clock: Arc<ManualClock>) -> Box<dyn crate::store::conformance::Fixture> {
    Box::new(Fixture {
        dir: tempfile::tempdir().unwrap(),
        clock,
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// `testdata/format1` is a data dir written by the store before formats were numbered (record
/// format 1, no segment header, unversioned metadata, index checkpoint without a format): two
/// plain messages at T0, two timers at T0+10 (one revealed at T0+2000, one pending until
/// T0+10^7), a third message at T0+2010, metadata `topics/Legacy` and an offset of GID_legacy.
#[tokio::test]
async fn a_format1_data_dir_reads_back_unchanged() {
    let d = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store/embedded/testdata/format1");
    copy_dir(&src, d.path());
    let raw = std::fs::read(d.path().join("log/00000000000000000000.log")).unwrap();
    assert_eq!(
        raw[record::O_KIND],
        record::KIND_MESSAGE,
        "no segment header"
    );
    assert_eq!(raw[record::O_VERSION], 0, "the fixture really is format 1");

    let clock = ManualClock::new(T0 + 3_000);
    let s = open(d.path(), &clock).await;
    let first = s.by_key("Legacy", "k1", 10).await.unwrap();
    assert_eq!(first.len(), 1);
    let m = &first[0];
    assert_eq!(body(m), "first");
    assert_eq!(m.tag.as_deref(), Some("TagA"));
    assert_eq!(m.keys, ["k1", "k2"]);
    assert_eq!(m.properties["p"], "first");
    assert_eq!((m.born_ms, m.stored_ms), (T0 - 5, T0));
    assert_eq!(m.wire, crate::model::WireInfo::default());
    assert_eq!(s.get(m.id).await.unwrap().as_ref(), Some(m));
    assert_eq!(
        s.get_by_position(m.id.position()).await.unwrap().as_ref(),
        Some(m)
    );

    let q0 = read_all(&s, "Legacy", 0).await;
    let names: Vec<_> = q0.iter().map(body).collect();
    assert_eq!(names, ["first", "timer-due", "third"]);
    assert_eq!(q0[1].deliver_at_ms, Some(T0 + 1_000));
    assert_eq!(body(&read_all(&s, "Legacy", 1).await[0]), "second");
    assert_eq!(s.next_timer_ms(), Some(T0 + 10_000_000));
    let page = s
        .by_time("Legacy", T0, T0 + 3_000, 100, None)
        .await
        .unwrap();
    let names: Vec<_> = page.messages.iter().map(body).collect();
    assert_eq!(
        names,
        ["first", "second", "timer-due", "timer-pending", "third"],
        "indexes of the old layout were rebuilt, held timers included"
    );

    let e = s.meta_get("topics", "Legacy").await.unwrap().unwrap();
    assert_eq!((e.value.as_slice(), e.version), (&b"{\"queues\":2}"[..], 1));
    let w = s
        .meta_put_if("topics", "Legacy", b"{}".to_vec(), PutCondition::Version(1))
        .await
        .unwrap();
    assert_eq!(w, PutOutcome::Written { version: 2 });
    assert_eq!(
        s.load_offsets("GID_legacy").await.unwrap(),
        [CommittedOffset {
            topic: "Legacy".into(),
            queue_id: 0,
            offset: 1
        }]
    );

    // New records (format 2) go on in the format 1 segment; both read back after a restart.
    let mut new = msg("Legacy", 0, None, &["k9"], "new");
    new.wire.flag = 5;
    let a = s.append(vec![new]).await.unwrap();
    assert_eq!(a[0].queue_offset, Some(3));
    s.close().await.unwrap();
    let s = open(d.path(), &clock).await;
    let q0 = read_all(&s, "Legacy", 0).await;
    let names: Vec<_> = q0.iter().map(body).collect();
    assert_eq!(names, ["first", "timer-due", "third", "new"]);
    assert_eq!(q0[3].wire.flag, 5);
    assert_eq!(
        s.meta_get("topics", "Legacy")
            .await
            .unwrap()
            .unwrap()
            .version,
        2
    );
    s.close().await.unwrap();
}

#[tokio::test]
async fn segments_start_with_a_format_header() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let s = open(d.path(), &clock).await;
    let big = "x".repeat(6_000);
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(
            s.append(vec![msg("Seg", 0, None, &[], &big)])
                .await
                .unwrap()[0]
                .id,
        );
    }
    s.close().await.unwrap();
    let mut segs: Vec<_> = std::fs::read_dir(d.path().join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segs.sort();
    assert!(segs.len() >= 2, "the test needs a segment roll");
    for seg in &segs {
        let raw = std::fs::read(seg).unwrap();
        assert_eq!(raw[record::O_KIND], record::KIND_SEGMENT);
        assert_eq!(raw[record::O_FLAGS], record::SEGMENT_FORMAT);
        assert_eq!(raw[record::O_VERSION], record::RECORD_FORMAT);
        let next = record::HEADER;
        assert_eq!(raw[next + record::O_KIND], record::KIND_MESSAGE);
        assert_eq!(raw[next + record::O_VERSION], record::RECORD_FORMAT);
    }
    let s = open(d.path(), &clock).await;
    assert!(
        s.get_by_position(0).await.unwrap().is_none(),
        "a header is no message"
    );
    for id in ids {
        assert!(s.get(id).await.unwrap().is_some());
    }
    s.close().await.unwrap();
}

#[tokio::test]
async fn a_newer_segment_format_is_refused_untouched() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let s = open(d.path(), &clock).await;
    s.append(vec![msg("New", 0, None, &[], "x")]).await.unwrap();
    s.close().await.unwrap();
    let path = d.path().join("log/00000000000000000000.log");
    let mut raw = std::fs::read(&path).unwrap();
    raw[record::O_FLAGS] = record::SEGMENT_FORMAT + 1;
    record::seal(&mut raw[..record::HEADER]);
    std::fs::write(&path, &raw).unwrap();
    let err = EmbeddedStore::open_with(&cfg(d.path()), clock.clone(), small())
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::ServiceNotAvailable);
    assert!(err.message.contains("newer wharf"), "{}", err.message);
    assert_eq!(std::fs::read(&path).unwrap(), raw, "nothing was truncated");
}

#[tokio::test]
async fn by_time_lists_timers_once_after_a_crash() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let s = open(d.path(), &clock).await;
    let mut want = Vec::new();
    for i in 0..20u64 {
        clock.set(T0 + i);
        let m = if i % 3 == 0 {
            timer("Crash", (i % 2) as u32, &format!("t{i}"), T0 + 100 + i)
        } else {
            msg("Crash", (i % 2) as u32, None, &[], &format!("m{i}"))
        };
        want.push(s.append(vec![m]).await.unwrap()[0].id);
        if i == 10 {
            // Reveal markers are stamped with the store clock, not the deliver time.
            assert_eq!(s.reveal_due(T0 + 105, 100).await.unwrap(), 2);
        }
    }
    s.halt().await;
    drop(s);
    let s = open(d.path(), &clock).await;
    let page = s.by_time("Crash", T0, T0 + 19, 100, None).await.unwrap();
    let got: Vec<_> = page.messages.iter().map(|m| m.id).collect();
    assert_eq!(got, want);
    s.close().await.unwrap();
}

#[tokio::test]
async fn ten_thousand_idle_watches_wake_only_their_queue() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let s = open(d.path(), &clock).await;
    let mut rxs: Vec<_> = (0..10_000u32).map(|q| s.watch_queue("Many", q)).collect();
    // Dropping some exercises the cleanup of channels nobody listens to.
    rxs.truncate(9_000);
    s.append(vec![msg("Many", 77, None, &[], "x")])
        .await
        .unwrap();
    let woken: Vec<_> = rxs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.has_changed().unwrap())
        .map(|(q, _)| q)
        .collect();
    assert_eq!(woken, [77]);
    assert_eq!(*rxs[77].borrow(), 1);
    s.close().await.unwrap();
}

/// Polls `cond` until it holds (panics after a generous deadline; never a fixed sleep).
async fn wait_until<F: Fn() -> bool>(what: &str, cond: F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The stall guard is held across awaits on purpose: it is what keeps the writer busy.
#[allow(clippy::await_holding_lock)]
async fn full_write_queue_refuses_with_system_busy_and_stores_nothing_of_it() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let c = StoreConfig {
        write_queue_requests: 3,
        ..cfg(d.path())
    };
    let s = EmbeddedStore::open_with(&c, clock.clone(), small())
        .await
        .unwrap();
    let stall = s.sh.stall.lock();
    let mut accepted = Vec::new();
    for i in 0..3 {
        let s = s.clone();
        accepted.push(tokio::spawn(async move {
            s.append(vec![msg("Busy", 0, None, &[], &format!("ok{i}"))])
                .await
        }));
    }
    wait_until("three queued sends", || s.sh.budget.in_use().0 == 3).await;
    let e = s
        .append(vec![
            msg("Busy", 0, None, &[], "refused-a"),
            msg("Busy", 0, None, &[], "refused-b"),
        ])
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::SystemBusy);
    assert_eq!(e.http_status(), 503);
    assert!(e.message.contains("write_queue_requests"), "{}", e.message);
    // Reads are not queued behind the writer.
    assert_eq!(s.queue_bounds("Busy", 0).await.unwrap().max, 0);
    drop(stall);
    for a in accepted {
        a.await.unwrap().unwrap();
    }
    // Permits go back just after the replies.
    wait_until("the budget returned", || s.sh.budget.in_use() == (0, 0)).await;
    s.append(vec![msg("Busy", 0, None, &[], "after")])
        .await
        .unwrap();
    let mut bodies: Vec<String> = read_all(&s, "Busy", 0).await.iter().map(body).collect();
    bodies.sort();
    assert_eq!(bodies, vec!["after", "ok0", "ok1", "ok2"]);
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The stall guard is held across awaits on purpose: it is what keeps the writer busy.
#[allow(clippy::await_holding_lock)]
async fn write_queue_byte_limit_refuses_but_takes_a_lone_big_batch() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let c = StoreConfig {
        write_queue_bytes: 65_536,
        segment_bytes: 1 << 20,
        ..cfg(d.path())
    };
    let s = EmbeddedStore::open_with(&c, clock.clone(), small())
        .await
        .unwrap();
    let chunk = "x".repeat(30_000);
    let big =
        move || -> Vec<NewMessage> { (0..3).map(|_| msg("Bytes", 0, None, &[], &chunk)).collect() };
    // Alone, a batch over the byte limit is still taken.
    s.append(big()).await.unwrap();
    let stall = s.sh.stall.lock();
    let first = {
        let s = s.clone();
        let b = big();
        tokio::spawn(async move { s.append(b).await })
    };
    wait_until("the big send queued", || s.sh.budget.in_use().0 == 1).await;
    let e = s
        .append(vec![msg("Bytes", 0, None, &[], "small")])
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::SystemBusy);
    drop(stall);
    first.await.unwrap().unwrap();
    assert_eq!(read_all(&s, "Bytes", 0).await.len(), 6);
    s.close().await.unwrap();
}

#[tokio::test]
async fn too_little_free_space_refuses_appends_before_the_disk_is_full() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let s = open(d.path(), &clock).await;
    let kept = s
        .append(vec![msg("Room", 0, None, &[], "kept")])
        .await
        .unwrap();
    s.close().await.unwrap();
    drop(s);
    // No disk has this much free: every append is refused, cleanly.
    let c = StoreConfig {
        min_free_bytes: u64::MAX / 4,
        ..cfg(d.path())
    };
    let s = EmbeddedStore::open_with(&c, clock.clone(), small())
        .await
        .unwrap();
    let e = s
        .append(vec![msg("Room", 0, None, &[], "refused")])
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ServiceNotAvailable);
    assert!(e.message.contains("min_free_bytes"), "{}", e.message);
    assert!(!s.writable());
    assert_eq!(s.queue_bounds("Room", 0).await.unwrap().max, 1);
    assert_eq!(body(&s.get(kept[0].id).await.unwrap().unwrap()), "kept");
    s.close().await.unwrap();
    drop(s);
    // Nothing of the refused send was written; the next open appends after "kept".
    let s = open(d.path(), &clock).await;
    let next = s
        .append(vec![msg("Room", 0, None, &[], "after")])
        .await
        .unwrap();
    assert_eq!(next[0].queue_offset, Some(1));
    assert!(s.writable());
    s.close().await.unwrap();
}

#[tokio::test]
async fn failed_fsync_stops_writes_until_restart_and_recovers_from_the_log() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let tuning = Tuning {
        fail_fsync_at: 2,
        ..small()
    };
    let s = EmbeddedStore::open_with(&cfg(d.path()), clock.clone(), tuning)
        .await
        .unwrap();
    let kept = s
        .append(vec![msg("Fsync", 0, None, &[], "kept")])
        .await
        .unwrap();
    let e = s
        .append(vec![msg("Fsync", 0, None, &[], "unacknowledged")])
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ServiceNotAvailable);
    assert!(e.message.contains("fsync"), "{}", e.message);
    assert!(!s.writable());
    assert!(s.unwritable_reason().unwrap().contains("fsync"));
    // No retry of the fsync as if the data were safe: every later write is refused.
    let e = s
        .append(vec![msg("Fsync", 0, None, &[], "later")])
        .await
        .unwrap_err();
    assert!(e.message.contains("stopped taking writes"), "{}", e.message);
    assert!(s.meta_put("ns", "k", b"v".to_vec()).await.is_err());
    assert!(!s.writable());
    // Reads keep working.
    assert_eq!(body(&s.get(kept[0].id).await.unwrap().unwrap()), "kept");
    s.close().await.ok();
    drop(s);
    let s = open(d.path(), &clock).await;
    assert!(s.writable());
    let bodies: Vec<String> = read_all(&s, "Fsync", 0).await.iter().map(body).collect();
    assert_eq!(bodies, vec!["kept"]);
    let next = s
        .append(vec![msg("Fsync", 0, None, &[], "after restart")])
        .await
        .unwrap();
    assert_eq!(next[0].queue_offset, Some(1));
    s.close().await.unwrap();
}

#[tokio::test]
async fn retention_seals_an_expired_active_segment_within_a_minute_and_restart_keeps_it_gone() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let c = StoreConfig {
        retention_hours: 1,
        segment_bytes: 1 << 20,
        ..cfg(d.path())
    };
    let s = EmbeddedStore::open_with(&c, clock.clone(), small())
        .await
        .unwrap();
    let old = s
        .append(vec![msg("Quiet", 0, None, &["k"], "old")])
        .await
        .unwrap();
    assert_eq!(s.stats().segments, 1);
    // Younger than the retention period: kept however often the pass runs.
    clock.advance(59 * 60_000);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(s.get(old[0].id).await.unwrap().is_some());
    // One hour and a minute later the writer's own pass (every minute) has deleted it,
    // though it sat in the only, active segment and no one called enforce_retention.
    clock.advance(2 * 60_000);
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.get(old[0].id).await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the expired message was never deleted"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let b = s.queue_bounds("Quiet", 0).await.unwrap();
    assert_eq!((b.min, b.max), (1, 1));
    assert!(s.by_key("Quiet", "k", 10).await.unwrap().is_empty());
    s.close().await.unwrap();
    let s = EmbeddedStore::open_with(&c, clock.clone(), small())
        .await
        .unwrap();
    assert!(s.get(old[0].id).await.unwrap().is_none());
    let b = s.queue_bounds("Quiet", 0).await.unwrap();
    assert_eq!((b.min, b.max), (1, 1));
    let next = s
        .append(vec![msg("Quiet", 0, None, &[], "new")])
        .await
        .unwrap();
    assert_eq!(next[0].queue_offset, Some(1));
    assert!(next[0].id.position() > old[0].id.position());
    s.close().await.unwrap();
}

const HOUR: u64 = 3_600_000;
const DAY: u64 = 24 * HOUR;

/// One-hour retention, small segments.
fn short_retention(dir: &Path) -> StoreConfig {
    StoreConfig {
        retention_hours: 1,
        ..cfg(dir)
    }
}

/// Fills about three 16 KiB segments of topic `Fill` with two keyed timers inside (3 and 40
/// days ahead); returns their ids and the segment files they were stored in.
async fn timers_among_filler(
    s: &EmbeddedStore,
    dir: &Path,
) -> (MessageId, MessageId, Vec<PathBuf>) {
    let big = "x".repeat(1000);
    let mut ids = Vec::new();
    for i in 0..45 {
        if i == 5 || i == 20 {
            let (key, at) = if i == 5 {
                ("k3", T0 + 3 * DAY)
            } else {
                ("k40", T0 + 40 * DAY)
            };
            let m = NewMessage {
                keys: vec![key.to_string()],
                ..timer("Tmr", 1, key, at)
            };
            ids.push(s.append(vec![m]).await.unwrap()[0].id);
        }
        s.append(vec![msg("Fill", 0, None, &[], &format!("{i}{big}"))])
            .await
            .unwrap();
    }
    let seg_file = |id: MessageId| {
        let segs = s.sh.log.segments();
        let seg = segs.iter().rev().find(|g| g.base <= id.position()).unwrap();
        log::segment_path(&dir.join("log"), seg.base)
    };
    let files = vec![seg_file(ids[0]), seg_file(ids[1])];
    assert_ne!(files[0], files[1], "the timers sit in different segments");
    assert!(s.stats().segments >= 3);
    (ids[0], ids[1], files)
}

/// Everything a user can see of one pending timer: get, get_by_position, by_key (once).
async fn assert_findable(s: &EmbeddedStore, id: MessageId, key: &str, offset: Option<u64>) {
    let m = s.get(id).await.unwrap().expect("get by the original id");
    assert_eq!((m.id, body(&m).as_str(), m.queue_offset), (id, key, offset));
    let p = s.get_by_position(id.position()).await.unwrap().unwrap();
    assert_eq!(p.id, id);
    let keyed = s.by_key("Tmr", key, 10).await.unwrap();
    assert_eq!(keyed.iter().map(|m| m.id).collect::<Vec<_>>(), vec![id]);
}

/// A time query over all of topic `Tmr` lists exactly `ids`, in store-time order.
async fn assert_listed_by_time(s: &EmbeddedStore, ids: &[MessageId], how: &str) {
    let page = s.by_time("Tmr", 0, u64::MAX, 10, None).await.unwrap();
    let listed: Vec<MessageId> = page.messages.iter().map(|m| m.id).collect();
    assert_eq!(
        listed, ids,
        "{how}: moved timers listed once, by original store time"
    );
}

/// Runs a retention pass at `now` and checks it deleted every segment written before it (the
/// writer's own pass may run first: either way nothing older is left).
async fn pass_deletes_everything_older(s: &EmbeddedStore, clock: &ManualClock, now: u64) {
    let end = s.sh.log.end();
    pass_deletes_everything_older_than(s, clock, now, end).await;
}

/// Runs a retention pass at `now` and checks no segment starting before `pos` is left.
async fn pass_deletes_everything_older_than(
    s: &EmbeddedStore,
    clock: &ManualClock,
    now: u64,
    pos: u64,
) {
    clock.set(now);
    s.enforce_retention(now).await.unwrap();
    assert!(
        s.sh.log.start() >= pos,
        "a segment outlived retention at +{} min",
        (now - T0) / 60_000
    );
}

/// Reveals what is due at `now` and returns the messages of the timer queue.
async fn reveal_and_read(s: &EmbeddedStore, clock: &ManualClock, now: u64) -> Vec<StoredMessage> {
    clock.set(now);
    while s.reveal_due(now, 100).await.unwrap() > 0 {}
    read_all(s, "Tmr", 1).await
}

#[tokio::test]
async fn retention_moves_pending_timers_forward_and_they_fire_once_with_their_id() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let c = short_retention(d.path());
    let s = EmbeddedStore::open_with(&c, clock.clone(), small())
        .await
        .unwrap();
    let (id3, id40, files) = timers_among_filler(&s, d.path()).await;
    assert_eq!(s.stats().pending_timers, 2);
    // Two hours on, one pass deletes every old segment: the timers no longer hold theirs.
    pass_deletes_everything_older(&s, &clock, T0 + 2 * HOUR).await;
    for f in &files {
        assert!(!f.exists(), "{} outlived retention", f.display());
    }
    assert_eq!(s.stats().pending_timers, 2);
    assert_eq!(s.stats().moved_timers, 2);
    assert!(
        s.read_queue("Fill", 0, 0, 10, None)
            .await
            .unwrap()
            .messages
            .is_empty()
    );
    assert_findable(&s, id3, "k3", None).await;
    assert_findable(&s, id40, "k40", None).await;
    let page = s.by_time("Tmr", 0, u64::MAX, 10, None).await.unwrap();
    assert_eq!(
        page.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![id3, id40],
        "a time query lists moved timers once, by their original store time"
    );
    assert!(
        reveal_and_read(&s, &clock, T0 + 3 * DAY - 1)
            .await
            .is_empty()
    );
    // Passes over the following days keep moving them; the copies' segments go as well.
    for h in [30, 60, 71] {
        pass_deletes_everything_older(&s, &clock, T0 + h * HOUR).await;
    }
    let fired = reveal_and_read(&s, &clock, T0 + 3 * DAY).await;
    assert_eq!(fired.iter().map(|m| m.id).collect::<Vec<_>>(), vec![id3]);
    assert_eq!(fired[0].queue_offset, Some(0));
    assert_findable(&s, id3, "k3", Some(0)).await;
    assert_eq!(s.stats().pending_timers, 1);
    // Consumable for a retention period after firing, then gone like anything else.
    clock.set(T0 + 3 * DAY + 50 * 60_000);
    s.enforce_retention(T0 + 3 * DAY + 50 * 60_000)
        .await
        .unwrap();
    assert!(s.get(id3).await.unwrap().is_some());
    for h in [2, 10 * 24, 20 * 24, 36 * 24] {
        pass_deletes_everything_older(&s, &clock, T0 + 3 * DAY + h * HOUR).await;
    }
    assert!(s.get(id3).await.unwrap().is_none());
    assert_findable(&s, id40, "k40", None).await;
    let fired = reveal_and_read(&s, &clock, T0 + 40 * DAY).await;
    assert_eq!(fired.iter().map(|m| m.id).collect::<Vec<_>>(), vec![id40]);
    assert_findable(&s, id40, "k40", Some(1)).await;
    assert_eq!(s.stats().pending_timers, 0);
    assert_eq!(s.next_timer_ms(), None);
    s.close().await.unwrap();
}

#[tokio::test]
async fn moved_timers_fire_once_after_a_restart_or_a_crash_after_the_pass() {
    for how in ["close", "crash", "rebuild"] {
        let d = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0);
        let c = short_retention(d.path());
        let s = EmbeddedStore::open_with(&c, clock.clone(), small())
            .await
            .unwrap();
        let (id3, id40, files) = timers_among_filler(&s, d.path()).await;
        clock.set(T0 + 2 * HOUR);
        s.enforce_retention(T0 + 2 * HOUR).await.unwrap();
        assert!(files.iter().all(|f| !f.exists()));
        match how {
            // No checkpoint after the pass: the copies are replayed from the log.
            "crash" => s.halt().await,
            _ => s.close().await.unwrap(),
        }
        drop(s);
        if how == "rebuild" {
            // Every index is rebuilt from the log, where only the copies are left.
            std::fs::remove_file(d.path().join("checkpoint")).unwrap();
        }
        let s = EmbeddedStore::open_with(&c, clock.clone(), small())
            .await
            .unwrap();
        assert_eq!(s.stats().pending_timers, 2, "{how}");
        assert_findable(&s, id3, "k3", None).await;
        assert_findable(&s, id40, "k40", None).await;
        assert_listed_by_time(&s, &[id3, id40], how).await;
        let fired = reveal_and_read(&s, &clock, T0 + 3 * DAY).await;
        assert_eq!(fired.iter().map(|m| m.id).collect::<Vec<_>>(), vec![id3]);
        assert_listed_by_time(&s, &[id3, id40], how).await;
        let s = if how == "rebuild" {
            // Again from the log alone, now that the first timer fired from its copy.
            s.close().await.unwrap();
            drop(s);
            std::fs::remove_file(d.path().join("checkpoint")).unwrap();
            let s = EmbeddedStore::open_with(&c, clock.clone(), small())
                .await
                .unwrap();
            assert_listed_by_time(&s, &[id3, id40], "second rebuild").await;
            assert_findable(&s, id3, "k3", Some(0)).await;
            s
        } else {
            s
        };
        // (The writer's own pass may have deleted the first one by now: it fired 37 days ago.)
        let fired = reveal_and_read(&s, &clock, T0 + 40 * DAY).await;
        let ids: Vec<MessageId> = fired.iter().map(|m| m.id).collect();
        assert!(ids == vec![id3, id40] || ids == vec![id40], "{ids:?}");
        assert_eq!(s.stats().pending_timers, 0);
        s.close().await.unwrap();
    }
}

const RETENTION_CHILD_ENV: &str = "WHARF_STORE_RETENTION_CHILD_DIR";

/// Child of the test below: stores the timers, then runs a pass that kills the process
/// (crash point `retention`) right after deleting the first old segment.
fn retention_crash_child(dir: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let clock = ManualClock::new(T0);
        let c = short_retention(Path::new(dir));
        let s = EmbeddedStore::open_with(&c, clock.clone(), small())
            .await
            .unwrap();
        let (id3, id40, _) = timers_among_filler(&s, Path::new(dir)).await;
        let mut out = std::io::stdout().lock();
        writeln!(out, "IDS {id3} {id40}").unwrap();
        out.flush().unwrap();
        drop(out);
        clock.set(T0 + 2 * HOUR);
        let _ = s.enforce_retention(T0 + 2 * HOUR).await;
        writeln!(std::io::stdout().lock(), "SURVIVED").unwrap();
    });
}

#[test]
fn kill9_inside_a_retention_pass_fires_every_moved_timer_exactly_once() {
    if let Ok(dir) = std::env::var(RETENTION_CHILD_ENV) {
        retention_crash_child(&dir);
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "store::embedded::tests::kill9_inside_a_retention_pass_fires_every_moved_timer_exactly_once",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(RETENTION_CHILD_ENV, d.path())
        .env("WHARF_TEST_CRASH_AT", crate::crashpoint::RETENTION)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("test crash point 'retention' reached"),
        "the crash point did not fire: {stdout}\n{stderr}"
    );
    assert!(!stdout.contains("SURVIVED"));
    let ids: Vec<MessageId> = stdout
        .lines()
        .find_map(|l| l.split_once("IDS ").map(|(_, ids)| ids))
        .unwrap_or_else(|| panic!("the child stored no timers: {stdout}\n{stderr}"))
        .split(' ')
        .map(|i| i.parse().unwrap())
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let clock = ManualClock::new(T0 + 2 * HOUR);
        let c = short_retention(d.path());
        let s = EmbeddedStore::open_with(&c, clock.clone(), small())
            .await
            .unwrap();
        assert_eq!(s.stats().pending_timers, 2);
        s.enforce_retention(T0 + 2 * HOUR).await.unwrap();
        assert!(
            s.sh.log.start() > ids[1].position(),
            "the pass after the restart deletes what the crashed one left"
        );
        assert_findable(&s, ids[0], "k3", None).await;
        assert_findable(&s, ids[1], "k40", None).await;
        let fired = reveal_and_read(&s, &clock, T0 + 40 * DAY).await;
        assert_eq!(fired.iter().map(|m| m.id).collect::<Vec<_>>(), ids);
        assert_eq!(s.stats().pending_timers, 0);
        s.close().await.unwrap();
    });
}

#[tokio::test]
async fn a_timer_revealed_from_an_older_segment_is_copied_forward_and_keeps_no_segment() {
    let d = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let c = short_retention(d.path());
    let s = EmbeddedStore::open_with(&c, clock.clone(), small())
        .await
        .unwrap();
    let m = NewMessage {
        keys: vec!["soon".to_string()],
        ..timer("Tmr", 1, "soon", T0 + 30 * 60_000)
    };
    let id = s.append(vec![m]).await.unwrap()[0].id;
    let big = "x".repeat(1000);
    for i in 0..40 {
        s.append(vec![msg("Fill", 0, None, &[], &format!("{i}{big}"))])
            .await
            .unwrap();
    }
    let first = s.sh.log.start();
    assert!(s.sh.log.segments().len() >= 3 && id.position() < first + 16 * 1024);
    // Revealed half an hour on, from a segment that is not the active one: copied forward.
    let fired = reveal_and_read(&s, &clock, T0 + 30 * 60_000).await;
    assert_eq!(fired.iter().map(|m| m.id).collect::<Vec<_>>(), vec![id]);
    assert_eq!(s.stats().moved_timers, 1);
    // An hour after the filler the segments holding only filler go, the one the timer was
    // stored in too, yet the revealed message is consumable (and found by id) a full hour
    // from its reveal.
    pass_deletes_everything_older_than(&s, &clock, T0 + HOUR, first + 1).await;
    assert!(s.sh.log.segment_of(id.position()).is_none());
    let fired = read_all(&s, "Tmr", 1).await;
    assert_eq!(fired.iter().map(|m| m.id).collect::<Vec<_>>(), vec![id]);
    assert_findable(&s, id, "soon", Some(0)).await;
    clock.set(T0 + HOUR + 29 * 60_000);
    s.enforce_retention(T0 + HOUR + 29 * 60_000).await.unwrap();
    assert_findable(&s, id, "soon", Some(0)).await;
    clock.set(T0 + 2 * HOUR);
    s.enforce_retention(T0 + 2 * HOUR).await.unwrap();
    assert!(s.get(id).await.unwrap().is_none());
    s.close().await.unwrap();
}
