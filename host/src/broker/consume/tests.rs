//! Engine tests over the real embedded store, with a manual clock.
//!
//! Background tasks run, but the tests drive timer reveal and expiry passes directly where the
//! outcome must be deterministic, and poll with a deadline for anything asynchronous.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::schedule::RETRY_DELAYS_MS;
use super::timers::reveal_due;
use super::*;
use crate::broker::{
    BrokerConfig, ConsumeModel, DeliveryStatus, GroupSpec, OutgoingMessage, TopicSpec,
};
use crate::clock::{Clock, ManualClock};
use crate::error::ErrorCode;
use crate::store::StoreConfig;
use crate::store::embedded::EmbeddedStore;

const T0: u64 = 1_700_000_000_000;
const NO_WAIT: Duration = Duration::ZERO;

struct Env {
    broker: Arc<Broker>,
    store: Arc<EmbeddedStore>,
    clock: Arc<ManualClock>,
    config: BrokerConfig,
    dir: tempfile::TempDir,
}

async fn open_broker(
    dir: &Path,
    clock: &Arc<ManualClock>,
    config: &BrokerConfig,
) -> (Arc<Broker>, Arc<EmbeddedStore>) {
    let sc = StoreConfig {
        data_dir: dir.to_path_buf(),
        ..StoreConfig::default()
    };
    let store = EmbeddedStore::open(&sc, clock.clone()).await.unwrap();
    let broker = Broker::open(config.clone(), store.clone(), clock.clone())
        .await
        .unwrap();
    (broker, store)
}

async fn env_with(config: BrokerConfig) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let (broker, store) = open_broker(dir.path(), &clock, &config).await;
    Env {
        broker,
        store,
        clock,
        config,
        dir,
    }
}

/// Retries 1000× faster; instances never expire (tests move the clock by days).
async fn env() -> Env {
    env_with(BrokerConfig {
        retry_delay_scale: 0.001,
        consumer_heartbeat_timeout_ms: 1 << 60,
        ..BrokerConfig::default()
    })
    .await
}

impl Env {
    /// Clean restart over the same data dir.
    async fn restart(&mut self) {
        self.broker.shutdown().await.unwrap();
        self.reopen().await;
    }

    /// As if the process were killed: the store stops without flushing, the engine without
    /// saving offsets.
    async fn crash(&mut self) {
        self.store.halt().await;
        self.broker.engine().stop_tasks().await;
        self.reopen().await;
    }

    async fn reopen(&mut self) {
        let (broker, store) = open_broker(self.dir.path(), &self.clock, &self.config).await;
        self.broker = broker;
        self.store = store;
    }

    async fn topic(&self, name: &str, queues: u32) {
        self.broker
            .create_topic(TopicSpec {
                name: name.into(),
                topic_type: Default::default(),
                queues: Some(queues),
            })
            .await
            .unwrap();
    }

    async fn group(&self, name: &str, model: ConsumeModel, max_retries: Option<u32>) {
        self.broker
            .create_group(GroupSpec {
                name: name.into(),
                kind: GroupKind::Consumer,
                model,
                max_reconsume_times: max_retries,
                consume_timeout_ms: Some(60_000),
            })
            .await
            .unwrap();
    }

    async fn join(&self, group: &str, id: &str, subs: &[(&str, &str)]) {
        self.broker
            .register_consumer(InstanceSpec {
                group: group.into(),
                instance_id: id.into(),
                address: format!("10.0.0.1/{id}"),
                pid: Some(42),
                subscriptions: subs
                    .iter()
                    .map(|(t, e)| Subscription {
                        topic: t.to_string(),
                        expression: e.to_string(),
                    })
                    .collect(),
            })
            .await
            .unwrap();
    }

    async fn send(&self, topic: &str, tag: Option<&str>, body: &str) -> String {
        self.send_msg(
            topic,
            OutgoingMessage {
                tag: tag.map(str::to_string),
                body: Bytes::from(body.to_string()),
                ..Default::default()
            },
        )
        .await
    }

    async fn send_msg(&self, topic: &str, m: OutgoingMessage) -> String {
        let r = self.broker.send(topic, vec![m]).await.unwrap();
        r[0].message_id.to_string()
    }

    async fn recv(&self, group: &str, id: &str, max: usize) -> Vec<Delivered> {
        self.broker.receive(group, id, max, NO_WAIT).await.unwrap()
    }

    /// The receipt a remote consumer would have got for `d`.
    fn receipt(&self, group: &str, d: &Delivered) -> String {
        self.broker.receipt(group, d)
    }

    /// Receives until `n` messages arrived (or 10 s of real time pass).
    async fn recv_n(&self, group: &str, id: &str, n: usize) -> Vec<Delivered> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while out.len() < n && std::time::Instant::now() < deadline {
            let got = self
                .broker
                .receive(group, id, n - out.len(), Duration::from_millis(200))
                .await
                .unwrap();
            out.extend(got);
        }
        out
    }

    async fn ack(&self, group: &str, d: &Delivered) {
        self.broker
            .settle(group, &self.receipt(group, d), Outcome::CommitMessage)
            .await
            .unwrap();
    }

    async fn nack(&self, group: &str, d: &Delivered) {
        self.broker
            .settle(group, &self.receipt(group, d), Outcome::ReconsumeLater)
            .await
            .unwrap();
    }

    /// Moves time and runs the timer pass, so everything due is visible on return.
    async fn advance(&self, ms: u64) {
        self.clock.advance(ms);
        reveal_due(&self.broker).await;
    }
}

fn bodies(ds: &[Delivered]) -> BTreeSet<String> {
    ds.iter()
        .map(|d| String::from_utf8_lossy(&d.message.body).into_owned())
        .collect()
}

#[tokio::test]
async fn clustering_filters_by_tag_and_splits_work() {
    let e = env().await;
    e.topic("Trade", 4).await;
    e.group("GID_c", ConsumeModel::Clustering, None).await;
    e.join("GID_c", "a", &[("Trade", "order||pay")]).await;
    e.join("GID_c", "b", &[("Trade", "pay||order")]).await;
    let mut expected = BTreeSet::new();
    for i in 0..60 {
        // Sends go round-robin over the 4 queues; change tags every 4 messages so each tag
        // lands in every queue instead of one tag per queue.
        let tag = ["order", "pay", "refund", ""][(i / 4) % 4];
        let tag = (!tag.is_empty()).then_some(tag);
        e.send("Trade", tag, &format!("m{i}")).await;
        if matches!(tag, Some("order" | "pay")) {
            expected.insert(format!("m{i}"));
        }
    }
    let a = e.recv("GID_c", "a", 100).await;
    let b = e.recv("GID_c", "b", 100).await;
    assert!(
        !a.is_empty() && !b.is_empty(),
        "both instances get work: {} {} {:?}",
        a.len(),
        b.len(),
        e.broker.group_status("GID_c").await.unwrap()
    );
    for d in a.iter().chain(&b) {
        assert!(matches!(d.message.tag.as_deref(), Some("order" | "pay")));
        assert_eq!(d.message.topic, "Trade");
    }
    let mut all = bodies(&a);
    all.extend(bodies(&b));
    assert_eq!(all, expected);
    assert_eq!(
        a.len() + b.len(),
        expected.len(),
        "each message to exactly one instance"
    );
    for d in a.iter().chain(&b) {
        e.ack("GID_c", d).await;
    }
    let st = e.broker.group_status("GID_c").await.unwrap();
    assert!(st.online && st.consistent);
    assert_eq!(st.backlog, 0);
    assert_eq!(st.instances.len(), 2);
    assert_eq!(st.instances[0].pid, Some(42));
    assert_eq!(st.last_consume_ms, Some(T0));
    assert!(st.consume_tps > 0.0);
    assert_eq!(st.subscriptions[0].expression, "order||pay");
}

#[tokio::test]
async fn bad_expression_is_subscription_parse_failed() {
    let e = env().await;
    e.topic("Trade", 1).await;
    e.group("GID_x", ConsumeModel::Clustering, None).await;
    let err = e
        .broker
        .register_consumer(InstanceSpec {
            group: "GID_x".into(),
            instance_id: "a".into(),
            address: "x".into(),
            pid: None,
            subscriptions: vec![Subscription {
                topic: "Trade".into(),
                expression: "a||".into(),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::SubscriptionParseFailed);
    let err = e
        .broker
        .receive("GID_x", "a", 1, NO_WAIT)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::SubscriptionNotExist);
}

#[tokio::test]
async fn silent_instance_is_removed_but_keeps_its_deliveries_until_the_consume_timeout() {
    let e = env_with(BrokerConfig::default()).await;
    e.topic("Trade", 8).await;
    e.group("GID_r", ConsumeModel::Clustering, None).await;
    e.join("GID_r", "a", &[("Trade", "*")]).await;
    e.join("GID_r", "b", &[("Trade", "*")]).await;
    let mut sent = BTreeSet::new();
    for i in 0..80 {
        e.send("Trade", None, &format!("m{i}")).await;
        sent.insert(format!("m{i}"));
    }
    // a takes some messages and goes silent for longer than the heartbeat timeout.
    let held_by_a = e.recv("GID_r", "a", 15).await;
    assert_eq!(held_by_a.len(), 15);
    let mut done = BTreeSet::new();
    let first_b = e.recv("GID_r", "b", 1000).await;
    for d in &first_b {
        e.ack("GID_r", d).await;
    }
    done.extend(bodies(&first_b));
    e.clock.advance(e.config.consumer_heartbeat_timeout_ms + 1);
    e.broker.heartbeat("GID_r", "b");
    e.broker.expire_pass().await;
    let st = e.broker.group_status("GID_r").await.unwrap();
    assert_eq!(st.instances.len(), 1);
    assert_eq!(st.instances[0].instance_id, "b");
    // b takes over a's queues, but not what a holds: a slow consumer keeps its work.
    let rest = e.recv_n("GID_r", "b", sent.len() - done.len() - 15).await;
    for d in &rest {
        e.ack("GID_r", d).await;
    }
    done.extend(bodies(&rest));
    assert!(
        e.recv("GID_r", "b", 100).await.is_empty(),
        "a's 15 are still a's"
    );
    // a comes back within the consume timeout: its receipt still settles.
    e.ack("GID_r", &held_by_a[0]).await;
    done.extend(bodies(&held_by_a[..1]));
    // The rest pass the consume timeout and come back as retries, counted once.
    e.clock.advance(60_000);
    e.broker.heartbeat("GID_r", "b");
    e.broker.expire_pass().await;
    e.advance(10_000).await;
    let retried = e.recv_n("GID_r", "b", 14).await;
    assert_eq!(retried.len(), 14);
    assert!(retried.iter().all(|d| d.message.reconsume_times == 1));
    for d in &retried {
        e.ack("GID_r", d).await;
    }
    done.extend(bodies(&retried));
    assert_eq!(
        done, sent,
        "every message consumed exactly once more or less"
    );
    // a's other receipts are stale now, and say why.
    let err = e
        .broker
        .settle(
            "GID_r",
            &e.receipt("GID_r", &held_by_a[1]),
            Outcome::CommitMessage,
        )
        .await
        .unwrap_err();
    assert!(err.message.contains("receipt expired"), "{}", err.message);
    assert_eq!(e.broker.group_status("GID_r").await.unwrap().backlog, 0);
}

#[tokio::test]
async fn timers_are_never_early_and_survive_restart() {
    let mut e = env().await;
    e.topic("Delay", 2).await;
    e.group("GID_t", ConsumeModel::Clustering, None).await;
    e.join("GID_t", "a", &[("Delay", "*")]).await;
    for (i, delay) in [60_000u64, 120_000].iter().enumerate() {
        e.send_msg(
            "Delay",
            OutgoingMessage {
                body: Bytes::from(format!("t{i}")),
                delay_ms: Some(*delay),
                ..Default::default()
            },
        )
        .await;
    }
    e.advance(59_999).await;
    assert!(
        e.recv("GID_t", "a", 10).await.is_empty(),
        "not before its time"
    );
    e.advance(1).await;
    let got = e.recv_n("GID_t", "a", 1).await;
    assert_eq!(bodies(&got), BTreeSet::from(["t0".to_string()]));
    assert_eq!(got[0].message.deliver_at_ms, Some(T0 + 60_000));
    e.ack("GID_t", &got[0]).await;

    e.restart().await;
    e.join("GID_t", "a", &[("Delay", "*")]).await;
    e.advance(59_999).await;
    assert!(
        e.recv("GID_t", "a", 10).await.is_empty(),
        "second timer still pending"
    );
    e.advance(1).await;
    let got = e.recv_n("GID_t", "a", 1).await;
    assert_eq!(
        bodies(&got),
        BTreeSet::from(["t1".to_string()]),
        "t0 not redelivered"
    );
}

#[tokio::test]
async fn full_retry_schedule_then_dead_letter_then_resend() {
    let e = env().await;
    e.topic("Trade", 2).await;
    e.group("GID_d", ConsumeModel::Clustering, None).await;
    e.join("GID_d", "a", &[("Trade", "*")]).await;
    let id = e.send("Trade", Some("order"), "payload").await;
    let mut d = e.recv_n("GID_d", "a", 1).await.remove(0);
    for (attempt, base) in RETRY_DELAYS_MS.iter().enumerate() {
        assert_eq!(d.message.reconsume_times, attempt as u32);
        assert_eq!(d.message.topic, "Trade");
        assert_eq!(d.message.id.to_string(), id, "retries keep the original id");
        e.nack("GID_d", &d).await;
        let delay = (*base as f64 * 0.001).round() as u64;
        e.advance(delay - 1).await;
        assert!(
            e.recv("GID_d", "a", 10).await.is_empty(),
            "retry {} came early",
            attempt + 1
        );
        e.advance(1).await;
        d = e.recv_n("GID_d", "a", 1).await.remove(0);
        assert_eq!(d.message.properties[PROP_RETRY_TOPIC], "Trade");
    }
    assert_eq!(d.message.reconsume_times, 16);
    e.nack("GID_d", &d).await;
    e.advance(10_000_000).await;
    assert!(e.recv("GID_d", "a", 10).await.is_empty(), "no 17th retry");
    let dead = e.broker.dead_letters("GID_d", 10, None).await.unwrap();
    assert_eq!(dead.messages.len(), 1);
    let dl = &dead.messages[0];
    assert_eq!(dl.body, Bytes::from_static(b"payload"));
    assert_eq!(dl.properties[PROP_ORIGIN_MESSAGE_ID], id);
    assert_eq!(
        dl.id.to_string(),
        id,
        "listed under the id the producer got"
    );
    assert_eq!(dl.topic, "Trade");
    let r = e.broker.resend_dead_letter("GID_d", &id).await.unwrap();
    assert_eq!(r.message_id.to_string(), id);
    let again = e.recv_n("GID_d", "a", 1).await;
    assert_eq!(again[0].message.id, r.message_id);
    assert_eq!(again[0].message.topic, "Trade");
    assert_eq!(again[0].message.reconsume_times, 0);
    assert_eq!(again[0].message.tag.as_deref(), Some("order"));
    let err = e.broker.resend_dead_letter("GID_d", &id).await.unwrap_err();
    assert_eq!(err.http_status(), 409, "one re-send per dead letter: {err}");
    let other = e.send("Trade", None, "fine").await;
    let err = e
        .broker
        .resend_dead_letter("GID_d", &other)
        .await
        .unwrap_err();
    assert_eq!(err.http_status(), 404, "{err}");
}

#[tokio::test]
async fn group_max_reconsume_times_latest_setting_wins() {
    let e = env().await;
    e.topic("Trade", 1).await;
    e.group("GID_m", ConsumeModel::Clustering, Some(5)).await;
    e.join("GID_m", "a", &[("Trade", "*")]).await;
    let id = e.send("Trade", None, "x").await;
    let d = e.recv_n("GID_m", "a", 1).await.remove(0);
    let mut g = e.broker.group("GID_m").unwrap();
    g.max_reconsume_times = 0;
    e.broker.update_group(g).await.unwrap();
    e.nack("GID_m", &d).await;
    e.advance(100_000).await;
    assert!(e.recv("GID_m", "a", 1).await.is_empty());
    let dead = e.broker.dead_letters("GID_m", 10, None).await.unwrap();
    assert_eq!(dead.messages.len(), 1);
    assert_eq!(
        status_of(&e, &id, "GID_m").await,
        DeliveryStatus::DeadLetter
    );
}

#[tokio::test]
async fn restart_in_the_middle_of_retries() {
    let mut e = env().await;
    e.topic("Trade", 1).await;
    e.group("GID_k", ConsumeModel::Clustering, None).await;
    e.join("GID_k", "a", &[("Trade", "*")]).await;
    e.send("Trade", None, "x").await;
    let mut d = e.recv_n("GID_k", "a", 1).await.remove(0);
    for _ in 0..3 {
        e.nack("GID_k", &d).await;
        e.advance(1_000_000).await;
        d = e.recv_n("GID_k", "a", 1).await.remove(0);
    }
    assert_eq!(d.message.reconsume_times, 3);
    e.nack("GID_k", &d).await;
    e.restart().await;
    e.join("GID_k", "a", &[("Trade", "*")]).await;
    assert!(
        e.recv("GID_k", "a", 10).await.is_empty(),
        "retry 4 waits for its back-off"
    );
    e.advance(RETRY_DELAYS_MS[3] / 1000).await;
    let d = e.recv_n("GID_k", "a", 1).await;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].message.reconsume_times, 4);
    assert_eq!(String::from_utf8_lossy(&d[0].message.body), "x");
    e.ack("GID_k", &d[0]).await;
    e.advance(100_000_000).await;
    assert!(
        e.recv("GID_k", "a", 10).await.is_empty(),
        "nothing more after the commit"
    );
}

#[tokio::test]
async fn consume_timeout_retries_and_stale_receipts_are_clear_errors() {
    let e = env().await;
    e.topic("Trade", 1).await;
    e.group("GID_o", ConsumeModel::Clustering, None).await;
    e.join("GID_o", "a", &[("Trade", "*")]).await;
    e.send("Trade", None, "x").await;
    let d = e.recv_n("GID_o", "a", 1).await.remove(0);
    e.clock.advance(60_000);
    e.broker.heartbeat("GID_o", "a");
    e.broker.expire_pass().await;
    let err = e
        .broker
        .settle("GID_o", &e.receipt("GID_o", &d), Outcome::CommitMessage)
        .await
        .unwrap_err();
    assert_eq!(err.http_status(), 400);
    assert!(err.message.contains("receipt expired"), "{}", err.message);
    e.advance(10).await;
    let again = e.recv_n("GID_o", "a", 1).await.remove(0);
    assert_eq!(again.message.reconsume_times, 1);
    e.ack("GID_o", &again).await;
    let err = e
        .broker
        .settle("GID_o", &e.receipt("GID_o", &again), Outcome::CommitMessage)
        .await
        .unwrap_err();
    assert!(err.message.contains("already settled"), "{}", err.message);
    let err = e
        .broker
        .settle("GID_o", "garbage", Outcome::CommitMessage)
        .await
        .unwrap_err();
    assert!(err.message.contains("not a receipt"));
}

#[tokio::test]
async fn broadcasting_delivers_everything_to_everyone_without_retries() {
    let e = env().await;
    e.topic("News", 2).await;
    e.group("GID_b", ConsumeModel::Broadcasting, None).await;
    e.join("GID_b", "a", &[("News", "*")]).await;
    e.join("GID_b", "b", &[("News", "*")]).await;
    for i in 0..10 {
        e.send("News", None, &format!("n{i}")).await;
    }
    let a = e.recv_n("GID_b", "a", 10).await;
    let b = e.recv_n("GID_b", "b", 10).await;
    assert_eq!(bodies(&a), bodies(&b));
    assert_eq!(a.len(), 10);
    for d in &a {
        e.nack("GID_b", d).await;
    }
    for d in &b {
        e.ack("GID_b", d).await;
    }
    e.advance(100_000_000).await;
    assert!(
        e.recv("GID_b", "a", 10).await.is_empty(),
        "no retries when broadcasting"
    );
    // A new instance starts at the newest message.
    e.join("GID_b", "c", &[("News", "*")]).await;
    assert!(e.recv("GID_b", "c", 10).await.is_empty());
    e.send("News", None, "late").await;
    for id in ["a", "b", "c"] {
        let got = e.recv_n("GID_b", id, 1).await;
        assert_eq!(bodies(&got), BTreeSet::from(["late".to_string()]), "{id}");
    }
}

#[tokio::test]
async fn new_group_start_position_follows_the_three_day_rule() {
    let e = env().await;
    e.topic("Old", 1).await;
    e.send("Old", None, "ancient").await;
    e.clock.advance(2 * 24 * 3600 * 1000);
    e.group("GID_young", ConsumeModel::Clustering, None).await;
    e.join("GID_young", "a", &[("Old", "*")]).await;
    let got = e.recv_n("GID_young", "a", 1).await;
    assert_eq!(bodies(&got), BTreeSet::from(["ancient".to_string()]));
    e.clock.advance(2 * 24 * 3600 * 1000);
    e.group("GID_late", ConsumeModel::Clustering, None).await;
    e.join("GID_late", "a", &[("Old", "*")]).await;
    assert!(
        e.recv("GID_late", "a", 10).await.is_empty(),
        "starts at the newest"
    );
    e.send("Old", None, "fresh").await;
    let got = e.recv_n("GID_late", "a", 1).await;
    assert_eq!(bodies(&got), BTreeSet::from(["fresh".to_string()]));
}

#[tokio::test]
async fn offsets_survive_restart_and_reset_to_time() {
    let mut e = env().await;
    e.topic("Trade", 2).await;
    e.group("GID_s", ConsumeModel::Clustering, None).await;
    e.join("GID_s", "a", &[("Trade", "*")]).await;
    for i in 0..10 {
        e.send("Trade", None, &format!("m{i}")).await;
    }
    e.clock.advance(1_000);
    let reset_point = e.clock.now_ms();
    for i in 10..20 {
        e.send("Trade", None, &format!("m{i}")).await;
    }
    let first = e.recv_n("GID_s", "a", 20).await;
    assert_eq!(first.len(), 20);
    // Ack all but one: the committed offset must stay behind the un-acked message.
    let unacked = first
        .iter()
        .find(|d| d.message.body.as_ref() == b"m3")
        .unwrap()
        .clone();
    for d in first.iter().filter(|d| d.token != unacked.token) {
        e.ack("GID_s", d).await;
    }
    e.restart().await;
    e.join("GID_s", "a", &[("Trade", "*")]).await;
    // At-least-once: the queue holding m3 resumes at m3; the other queue was fully acked.
    let (q3, o3) = (
        unacked.message.queue_id,
        unacked.message.queue_offset.unwrap(),
    );
    let expected: BTreeSet<String> = first
        .iter()
        .filter(|d| d.message.queue_id == q3 && d.message.queue_offset.unwrap() >= o3)
        .map(|d| String::from_utf8_lossy(&d.message.body).into_owned())
        .collect();
    let again = e.recv_n("GID_s", "a", expected.len()).await;
    assert_eq!(bodies(&again), expected);
    assert!(e.recv("GID_s", "a", 10).await.is_empty());
    for d in &again {
        e.ack("GID_s", d).await;
    }
    assert!(e.recv("GID_s", "a", 10).await.is_empty());
    e.broker
        .reset_offset("GID_s", "Trade", reset_point)
        .await
        .unwrap();
    let replay = e.recv_n("GID_s", "a", 10).await;
    let expected: BTreeSet<String> = (10..20).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies(&replay), expected);
}

#[tokio::test]
async fn flow_control_caps_unsettled_messages() {
    let e = env_with(BrokerConfig {
        max_in_flight_messages: 5,
        consumer_heartbeat_timeout_ms: 1 << 60,
        ..BrokerConfig::default()
    })
    .await;
    e.topic("Trade", 1).await;
    e.group("GID_f", ConsumeModel::Clustering, None).await;
    e.join("GID_f", "a", &[("Trade", "*")]).await;
    for i in 0..20 {
        e.send("Trade", None, &format!("m{i}")).await;
    }
    let got = e.recv_n("GID_f", "a", 5).await;
    assert_eq!(got.len(), 5);
    assert!(e.recv("GID_f", "a", 10).await.is_empty(), "over the cap");
    e.ack("GID_f", &got[0]).await;
    e.ack("GID_f", &got[1]).await;
    assert_eq!(e.recv("GID_f", "a", 10).await.len(), 2);
}

#[tokio::test]
async fn flow_control_caps_unsettled_bytes() {
    let e = env_with(BrokerConfig {
        max_in_flight_bytes: 10,
        consumer_heartbeat_timeout_ms: 1 << 60,
        ..BrokerConfig::default()
    })
    .await;
    e.topic("Trade", 1).await;
    e.group("GID_fb", ConsumeModel::Clustering, None).await;
    e.join("GID_fb", "a", &[("Trade", "*")]).await;
    for i in 0..4 {
        e.send("Trade", None, &format!("body-{i}")).await; // 6 bytes each
    }
    let first = e.recv("GID_fb", "a", 10).await;
    assert_eq!(
        first.len(),
        1,
        "a second 6-byte message would pass the 10-byte cap"
    );
    assert!(
        e.recv("GID_fb", "a", 10).await.is_empty(),
        "over the byte cap"
    );
    e.ack("GID_fb", &first[0]).await;
    let second = e.recv("GID_fb", "a", 10).await;
    assert_eq!(second.len(), 1, "credit back after settling");
    assert_ne!(second[0].message.body, first[0].message.body);
}

#[tokio::test]
async fn inconsistent_subscriptions_are_reported() {
    let e = env().await;
    e.topic("Trade", 2).await;
    e.group("GID_i", ConsumeModel::Clustering, None).await;
    e.join("GID_i", "a", &[("Trade", "x")]).await;
    e.join("GID_i", "b", &[("Trade", "x")]).await;
    e.join("GID_i", "c", &[("Trade", "y")]).await;
    let st = e.broker.group_status("GID_i").await.unwrap();
    assert!(!st.consistent);
    assert_eq!(st.inconsistent_instances, vec!["c".to_string()]);
    e.join("GID_i", "c", &[("Trade", "x")]).await;
    assert!(e.broker.group_status("GID_i").await.unwrap().consistent);
}

#[tokio::test]
async fn delivery_status_per_group() {
    let e = env().await;
    e.topic("Trade", 1).await;
    e.group("GID_1", ConsumeModel::Clustering, None).await;
    e.group("GID_2", ConsumeModel::Clustering, None).await;
    e.group("GID_3", ConsumeModel::Clustering, None).await;
    e.join("GID_1", "a", &[("Trade", "*")]).await;
    e.join("GID_2", "a", &[("Trade", "other")]).await;
    e.join("GID_3", "a", &[("Trade", "*")]).await;
    let id = e.send("Trade", Some("order"), "x").await;
    let d = e.recv_n("GID_1", "a", 1).await;
    e.ack("GID_1", &d[0]).await;
    e.broker.unregister_consumer("GID_3", "a").await.unwrap();
    let view = e.broker.message(&id).await.unwrap();
    let by: BTreeMap<_, _> = view
        .deliveries
        .iter()
        .map(|d| (d.group.as_str(), d.status))
        .collect();
    assert_eq!(by["GID_1"], DeliveryStatus::Consumed);
    assert_eq!(by["GID_2"], DeliveryStatus::Filtered);
    assert_eq!(by["GID_3"], DeliveryStatus::Offline);
    e.join("GID_3", "a", &[("Trade", "*")]).await;
    let view = e.broker.message(&id).await.unwrap();
    let g3 = view.deliveries.iter().find(|d| d.group == "GID_3").unwrap();
    assert_eq!(g3.status, DeliveryStatus::Pending);
}

/// `group`'s delivery status of message `id`, as `GET /v1/messages/{id}` reports it.
async fn status_of(e: &Env, id: &str, group: &str) -> DeliveryStatus {
    let view = e.broker.message(id).await.unwrap();
    view.deliveries
        .iter()
        .find(|d| d.group == group)
        .unwrap_or_else(|| panic!("no delivery entry for {group}: {:?}", view.deliveries))
        .status
}

/// A keyed message (keys must survive the retry path unchanged).
async fn send_keyed(e: &Env, topic: &str, key: &str, body: &str) -> String {
    e.send_msg(
        topic,
        OutgoingMessage {
            keys: vec![key.to_string()],
            body: Bytes::from(body.to_string()),
            ..Default::default()
        },
    )
    .await
}

#[tokio::test]
async fn a_failed_message_is_pending_until_a_retry_of_it_is_consumed() {
    let e = env().await;
    e.topic("Trade", 1).await;
    e.group("GID_s", ConsumeModel::Clustering, None).await;
    e.join("GID_s", "a", &[("Trade", "*")]).await;
    let id = send_keyed(&e, "Trade", "order-7", "x").await;
    let d = e.recv_n("GID_s", "a", 1).await.remove(0);
    assert_eq!(status_of(&e, &id, "GID_s").await, DeliveryStatus::Pending);
    e.nack("GID_s", &d).await;
    assert_eq!(
        status_of(&e, &id, "GID_s").await,
        DeliveryStatus::Pending,
        "the original's offset is committed, but its retry is held for the back-off"
    );
    e.broker.unregister_consumer("GID_s", "a").await.unwrap();
    assert_eq!(
        status_of(&e, &id, "GID_s").await,
        DeliveryStatus::Offline,
        "a retry is outstanding and nobody is there to take it"
    );
    e.join("GID_s", "a", &[("Trade", "*")]).await;

    // First retry: visible, then in flight, then failed again.
    e.advance(RETRY_DELAYS_MS[0] / 1000).await;
    assert_eq!(status_of(&e, &id, "GID_s").await, DeliveryStatus::Pending);
    let r1 = e.recv_n("GID_s", "a", 1).await.remove(0);
    assert_eq!(r1.message.id.to_string(), id);
    assert_eq!(r1.message.reconsume_times, 1);
    assert_eq!(
        r1.message.keys,
        vec!["order-7".to_string()],
        "consumers see only the business keys"
    );
    assert_eq!(status_of(&e, &id, "GID_s").await, DeliveryStatus::Pending);
    e.nack("GID_s", &r1).await;
    assert_eq!(status_of(&e, &id, "GID_s").await, DeliveryStatus::Pending);

    // Second retry (a copy of a copy) succeeds.
    e.advance(RETRY_DELAYS_MS[1] / 1000).await;
    let r2 = e.recv_n("GID_s", "a", 1).await.remove(0);
    assert_eq!(r2.message.id.to_string(), id);
    assert_eq!(r2.message.reconsume_times, 2);
    assert_eq!(r2.message.keys, vec!["order-7".to_string()]);
    assert_eq!(status_of(&e, &id, "GID_s").await, DeliveryStatus::Pending);
    e.ack("GID_s", &r2).await;
    assert_eq!(status_of(&e, &id, "GID_s").await, DeliveryStatus::Consumed);
    assert!(
        e.broker
            .dead_letters("GID_s", 10, None)
            .await
            .unwrap()
            .messages
            .is_empty()
    );

    // The answer comes from stored state, so it holds across a restart too.
    let mut e = e;
    e.restart().await;
    assert_eq!(status_of(&e, &id, "GID_s").await, DeliveryStatus::Consumed);
}

#[tokio::test]
async fn a_dead_lettered_message_is_reported_as_dead_letter() {
    let e = env().await;
    e.topic("Trade", 1).await;
    e.group("GID_z", ConsumeModel::Clustering, Some(1)).await;
    e.group("GID_y", ConsumeModel::Clustering, None).await;
    e.join("GID_z", "a", &[("Trade", "*")]).await;
    e.join("GID_y", "b", &[("Trade", "*")]).await;
    let id = send_keyed(&e, "Trade", "order-9", "x").await;
    let ok = e.recv_n("GID_y", "b", 1).await.remove(0);
    e.ack("GID_y", &ok).await;

    let d = e.recv_n("GID_z", "a", 1).await.remove(0);
    e.nack("GID_z", &d).await;
    e.advance(RETRY_DELAYS_MS[0] / 1000).await;
    let r1 = e.recv_n("GID_z", "a", 1).await.remove(0);
    assert_eq!(r1.message.reconsume_times, 1);
    e.nack("GID_z", &r1).await;
    e.advance(10_000_000).await;
    assert!(
        e.recv("GID_z", "a", 10).await.is_empty(),
        "retries exhausted"
    );

    assert_eq!(
        status_of(&e, &id, "GID_z").await,
        DeliveryStatus::DeadLetter
    );
    assert_eq!(
        status_of(&e, &id, "GID_y").await,
        DeliveryStatus::Consumed,
        "each group's own outcome"
    );
    e.broker.unregister_consumer("GID_z", "a").await.unwrap();
    assert_eq!(
        status_of(&e, &id, "GID_z").await,
        DeliveryStatus::DeadLetter,
        "final whether or not the group is online"
    );
    assert_eq!(
        serde_json::to_value(DeliveryStatus::DeadLetter).unwrap(),
        "dead_letter"
    );

    let dead = e.broker.dead_letters("GID_z", 10, None).await.unwrap();
    assert_eq!(dead.messages.len(), 1);
    let dl = &dead.messages[0];
    assert_eq!(dl.keys, vec!["order-9".to_string()]);
    assert_eq!(dl.id.to_string(), id);

    // A re-sent dead letter goes to its own group only, under the original id.
    e.join("GID_z", "a", &[("Trade", "*")]).await;
    let again = e.broker.resend_dead_letter("GID_z", &id).await.unwrap();
    assert_eq!(again.message_id.to_string(), id);
    assert_eq!(status_of(&e, &id, "GID_z").await, DeliveryStatus::Pending);
    assert!(
        e.recv("GID_y", "b", 10).await.is_empty(),
        "the topic's other group does not get it again"
    );
    let got = e.recv_n("GID_z", "a", 1).await.remove(0);
    assert_eq!(got.message.id, again.message_id);
    assert_eq!(got.message.keys, vec!["order-9".to_string()]);
    assert_eq!(got.message.reconsume_times, 0);
    e.ack("GID_z", &got).await;
    assert_eq!(status_of(&e, &id, "GID_z").await, DeliveryStatus::Consumed);
    assert_eq!(status_of(&e, &id, "GID_y").await, DeliveryStatus::Consumed);
}

#[tokio::test]
async fn a_query_by_id_builds_no_consumption_state() {
    let mut e = env().await;
    e.topic("Trade", 1).await;
    e.group("GID_q1", ConsumeModel::Clustering, Some(0)).await;
    e.group("GID_q2", ConsumeModel::Clustering, None).await;
    e.group("GID_q3", ConsumeModel::Broadcasting, None).await;
    e.join("GID_q1", "a", &[("Trade", "*")]).await;
    e.join("GID_q2", "b", &[("Trade", "other")]).await;
    e.join("GID_q3", "c", &[("Trade", "*")]).await;
    let failed = e.send("Trade", None, "x").await;
    let d = e.recv_n("GID_q1", "a", 1).await.remove(0);
    e.nack("GID_q1", &d).await;
    let waiting = e.send("Trade", None, "y").await;
    // After a restart no group has state in memory until a consumer comes back.
    e.restart().await;
    assert_eq!(status::built_group_states(&e.broker), 0);
    let of = |v: &crate::broker::MessageView, g: &str| {
        v.deliveries.iter().find(|d| d.group == g).map(|d| d.status)
    };
    let v = e.broker.message(&failed).await.unwrap();
    assert_eq!(of(&v, "GID_q1"), Some(DeliveryStatus::DeadLetter));
    assert_eq!(of(&v, "GID_q2"), Some(DeliveryStatus::Filtered));
    assert_eq!(of(&v, "GID_q3"), Some(DeliveryStatus::Offline));
    let v = e.broker.message(&waiting).await.unwrap();
    assert_eq!(of(&v, "GID_q1"), Some(DeliveryStatus::Offline));
    assert_eq!(
        status::built_group_states(&e.broker),
        0,
        "answered from committed offsets and copies alone"
    );
    // The same answers once the state is built again.
    e.join("GID_q1", "a", &[("Trade", "*")]).await;
    let v = e.broker.message(&failed).await.unwrap();
    assert_eq!(of(&v, "GID_q1"), Some(DeliveryStatus::DeadLetter));
    assert_eq!(status::built_group_states(&e.broker), 1);
}

fn pull<'a>(
    topic: &'a str,
    queue_id: u32,
    offset: u64,
    expr: &'a str,
    wait: Duration,
) -> PullRequest<'a> {
    PullRequest {
        topic,
        queue_id,
        offset,
        max: 32,
        // A test helper may keep its parsed filter for the whole run.
        filter: Box::leak(Box::new(TagFilter::parse(expr).unwrap())),
        wait,
    }
}

#[tokio::test]
async fn queue_level_pull_and_commit() {
    let mut e = env().await;
    e.topic("Trade", 2).await;
    e.group("GID_q", ConsumeModel::Clustering, None).await;
    for i in 0..6 {
        let tag = if i % 2 == 0 { "a" } else { "b" };
        e.broker
            .send(
                "Trade",
                vec![OutgoingMessage {
                    tag: Some(tag.into()),
                    body: Bytes::from(format!("m{i}")),
                    ..Default::default()
                }],
            )
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    for q in 0..2 {
        let p = e
            .broker
            .pull_queue("GID_q", pull("Trade", q, 0, "a", NO_WAIT))
            .await
            .unwrap();
        assert_eq!(p.next_offset, p.bounds.max);
        got.extend(p.messages);
    }
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|m| m.tag.as_deref() == Some("a")));
    let end = e.broker.store().queue_bounds("Trade", 0).await.unwrap().max;
    // A long poll returns as soon as a matching message arrives.
    let broker = e.broker.clone();
    let poll = tokio::spawn(async move {
        broker
            .pull_queue("GID_q", pull("Trade", 0, end, "*", Duration::from_secs(10)))
            .await
    });
    tokio::task::yield_now().await;
    let start = std::time::Instant::now();
    while !poll.is_finished() && start.elapsed() < Duration::from_secs(5) {
        e.broker
            .send(
                "Trade",
                vec![OutgoingMessage {
                    body: Bytes::from_static(b"wake"),
                    ..Default::default()
                }],
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let p = poll.await.unwrap().unwrap();
    assert!(!p.messages.is_empty());
    e.broker
        .commit_queue_offset("GID_q", "Trade", 1, 2, None)
        .await
        .unwrap();
    e.restart().await;
    assert_eq!(
        e.broker
            .committed_queue_offset("GID_q", "Trade", 1)
            .await
            .unwrap(),
        Some(2)
    );
    let err = e
        .broker
        .pull_queue("GID_q", pull("Trade", 9, 0, "*", NO_WAIT))
        .await
        .unwrap_err();
    assert_eq!(err.http_status(), 400);
}

#[tokio::test]
async fn crash_mid_flight_loses_nothing() {
    let mut e = env().await;
    e.topic("Trade", 2).await;
    e.group("GID_z", ConsumeModel::Clustering, None).await;
    e.join("GID_z", "a", &[("Trade", "*")]).await;
    for i in 0..6 {
        e.send("Trade", None, &format!("m{i}")).await;
    }
    e.send_msg(
        "Trade",
        OutgoingMessage {
            body: Bytes::from_static(b"timer"),
            delay_ms: Some(30_000),
            ..Default::default()
        },
    )
    .await;
    let got = e.recv_n("GID_z", "a", 6).await;
    let by_body = |b: &str| {
        got.iter()
            .find(|d| d.message.body.as_ref() == b.as_bytes())
            .unwrap()
    };
    e.ack("GID_z", by_body("m0")).await;
    e.nack("GID_z", by_body("m1")).await;
    // m2..m5 are in flight when the process dies.
    e.crash().await;
    e.join("GID_z", "a", &[("Trade", "*")]).await;
    let mut seen = BTreeSet::new();
    let mut retried = false;
    e.advance(29_999).await;
    let before_timer = e.recv_n("GID_z", "a", 4).await;
    for d in &before_timer {
        assert_ne!(d.message.body.as_ref(), b"timer", "timer came early");
        retried |= d.message.reconsume_times > 0;
        seen.insert(String::from_utf8_lossy(&d.message.body).into_owned());
        e.ack("GID_z", d).await;
    }
    e.advance(1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(seen.contains("timer") && retried) && std::time::Instant::now() < deadline {
        for d in e
            .broker
            .receive("GID_z", "a", 32, Duration::from_millis(100))
            .await
            .unwrap()
        {
            retried |= d.message.reconsume_times > 0 && d.message.body.as_ref() == b"m1";
            seen.insert(String::from_utf8_lossy(&d.message.body).into_owned());
            e.ack("GID_z", &d).await;
        }
    }
    for b in ["m1", "m2", "m3", "m4", "m5", "timer"] {
        assert!(seen.contains(b), "{b} lost: {seen:?}");
    }
    assert!(retried, "m1's retry survived the crash");
}

#[tokio::test]
async fn subscribing_more_topics_keeps_the_others_and_their_receipts() {
    let e = env().await;
    e.topic("TopicA", 1).await;
    e.topic("TopicB", 1).await;
    e.group("GID_one", ConsumeModel::Clustering, None).await;
    let spec = |t: &str| InstanceSpec {
        group: "GID_one".into(),
        instance_id: "http@1".into(),
        address: "1.2.3.4".into(),
        pid: None,
        subscriptions: vec![Subscription {
            topic: t.into(),
            expression: "*".into(),
        }],
    };
    let only = |t: &str| vec![t.to_string()];
    e.broker.subscribe(spec("TopicA")).await.unwrap();
    e.send("TopicA", None, "a").await;
    e.send("TopicA", None, "a2").await;
    let a = e
        .broker
        .receive_topics("GID_one", "http@1", &only("TopicA"), 1, NO_WAIT)
        .await
        .unwrap();
    e.broker.subscribe(spec("TopicB")).await.unwrap();
    e.send("TopicB", None, "b").await;
    let b = e
        .broker
        .receive_topics("GID_one", "http@1", &only("TopicB"), 10, NO_WAIT)
        .await
        .unwrap();
    assert_eq!(
        bodies(&b),
        BTreeSet::from(["b".to_string()]),
        "only TopicB's"
    );
    // The receipt from TopicA is still good: adding TopicB did not move TopicA's queue.
    e.ack("GID_one", &a[0]).await;
    // Asking for TopicA again changes nothing and still serves it.
    e.broker.subscribe(spec("TopicA")).await.unwrap();
    let a2 = e
        .broker
        .receive_topics("GID_one", "http@1", &only("TopicA"), 10, NO_WAIT)
        .await
        .unwrap();
    assert_eq!(bodies(&a2), BTreeSet::from(["a2".to_string()]));
    let st = e.broker.group_status("GID_one").await.unwrap();
    assert_eq!(st.instances[0].subscriptions.len(), 2);
    assert!(st.consistent);
}

#[tokio::test]
async fn concurrent_creates_of_one_name_give_one_conflict() {
    let e = env().await;
    let spec = || TopicSpec {
        name: "Race".into(),
        topic_type: Default::default(),
        queues: Some(2),
    };
    let (a, b) = tokio::join!(e.broker.create_topic(spec()), e.broker.create_topic(spec()));
    assert_eq!(
        [a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count(),
        1,
        "exactly one create may succeed"
    );
    let lost = a.err().or(b.err()).unwrap();
    assert_eq!(lost.kind, crate::error::ErrorKind::Conflict);
    let gspec = || GroupSpec {
        name: "GID_race".into(),
        kind: GroupKind::Consumer,
        model: ConsumeModel::Clustering,
        max_reconsume_times: None,
        consume_timeout_ms: None,
    };
    let (a, b) = tokio::join!(
        e.broker.create_group(gspec()),
        e.broker.create_group(gspec())
    );
    assert!(
        a.is_ok() != b.is_ok(),
        "exactly one group create may succeed"
    );
}

#[tokio::test]
async fn a_group_created_again_forgets_the_old_subscriptions() {
    let e = env().await;
    e.topic("Trade", 2).await;
    e.group("GID_again", ConsumeModel::Clustering, None).await;
    e.join("GID_again", "i1", &[("Trade", "order")]).await;
    let id = e.send("Trade", Some("order"), "x").await;
    e.broker
        .unregister_consumer("GID_again", "i1")
        .await
        .unwrap();
    let before = e.broker.message(&id).await.unwrap();
    assert_eq!(
        before.deliveries.len(),
        1,
        "the old group still remembers its subscription"
    );

    e.broker.delete_group("GID_again").await.unwrap();
    e.group("GID_again", ConsumeModel::Clustering, None).await;
    let status = e.broker.group_status("GID_again").await.unwrap();
    assert!(
        status.subscriptions.is_empty(),
        "{:?}",
        status.subscriptions
    );
    let after = e.broker.message(&id).await.unwrap();
    assert!(after.deliveries.is_empty(), "{:?}", after.deliveries);
}

#[test]
fn retry_topic_names_are_recognised_without_building_them() {
    assert!(is_retry_topic_of(&retry_topic("GID_a"), "GID_a"));
    assert!(!is_retry_topic_of(&retry_topic("GID_a"), "GID_ab"));
    assert!(!is_retry_topic_of("GID_a", "GID_a"));
    assert!(!is_retry_topic_of(&dlq_topic("GID_a"), "GID_a"));
}

#[tokio::test]
async fn instance_ids_with_surrounding_spaces_are_refused() {
    let e = env().await;
    e.topic("Trade", 1).await;
    e.group("GID_ids", ConsumeModel::Clustering, None).await;
    let spec = |id: &str| InstanceSpec {
        group: "GID_ids".into(),
        instance_id: id.into(),
        address: "test".into(),
        pid: None,
        subscriptions: vec![Subscription {
            topic: "Trade".into(),
            expression: "*".into(),
        }],
    };
    for bad in [" a", "a ", "  ", "", "a%BROADCAST%b"] {
        let err = e.broker.register_consumer(spec(bad)).await.unwrap_err();
        assert!(err.message.contains("instance id"), "{bad:?}: {err}");
    }
    e.broker.register_consumer(spec("a b")).await.unwrap();
    assert!(e.broker.is_registered("GID_ids", "a b"));
}

#[tokio::test]
async fn deleting_a_group_deletes_its_broadcasting_offsets() {
    let mut e = env().await;
    e.topic("News", 1).await;
    e.group("GID_bc", ConsumeModel::Broadcasting, None).await;
    e.join("GID_bc", "i1", &[("News", "*")]).await;
    e.send("News", None, "one").await;
    let got = e.recv_n("GID_bc", "i1", 1).await.remove(0);
    e.ack("GID_bc", &got).await;
    e.restart().await;
    let owner = broadcast_offsets_key("GID_bc", "i1");
    assert!(!e.store.load_offsets(&owner).await.unwrap().is_empty());

    e.broker.delete_group("GID_bc").await.unwrap();
    assert!(e.store.load_offsets(&owner).await.unwrap().is_empty());
    // A group of the same name starts afresh: a new broadcasting instance at the newest.
    e.group("GID_bc", ConsumeModel::Broadcasting, None).await;
    e.join("GID_bc", "i1", &[("News", "*")]).await;
    e.send("News", None, "two").await;
    let got = e.recv_n("GID_bc", "i1", 1).await.remove(0);
    assert_eq!(got.message.body, Bytes::from_static(b"two"));
}

#[tokio::test]
async fn patching_a_group_changes_only_what_it_names() {
    use crate::broker::specs::GroupPatch;
    let e = env().await;
    e.group("GID_p", ConsumeModel::Clustering, Some(3)).await;
    let patch = |v: serde_json::Value| GroupPatch::from_json(v.as_object().unwrap());
    let g = e
        .broker
        .patch_group(
            "GID_p",
            patch(serde_json::json!({"max_reconsume_times": 7})).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!((g.max_reconsume_times, g.consume_timeout_ms), (7, 60_000));
    assert_eq!(e.broker.group("GID_p").unwrap(), g);
    let same_model =
        patch(serde_json::json!({"model": "clustering", "consume_timeout_ms": 5})).unwrap();
    let g = e.broker.patch_group("GID_p", same_model).await.unwrap();
    assert_eq!((g.max_reconsume_times, g.consume_timeout_ms), (7, 5));
    let err = e
        .broker
        .patch_group(
            "GID_p",
            patch(serde_json::json!({"model": "broadcasting"})).unwrap(),
        )
        .await
        .unwrap_err();
    assert!(err.message.starts_with("model:"), "{err}");
    let err = e
        .broker
        .patch_group(
            "GID_p",
            patch(serde_json::json!({"max_reconsume_times": 5000})).unwrap(),
        )
        .await
        .unwrap_err();
    assert!(err.message.contains("max_reconsume_times"), "{err}");
    for (bad, field) in [
        (
            serde_json::json!({"max_reconsume_times": "7"}),
            "max_reconsume_times",
        ),
        (
            serde_json::json!({"consume_timeout_ms": -1}),
            "consume_timeout_ms",
        ),
        (serde_json::json!({"colour": 1}), "colour"),
    ] {
        let err = patch(bad).unwrap_err();
        assert_eq!(err.http_status(), 400);
        assert!(err.message.contains(field), "{err}");
    }
    let err = e
        .broker
        .patch_group("GID_nope", GroupPatch::default())
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::SubscriptionGroupNotExist);
}

#[tokio::test]
async fn two_hosts_on_one_store_split_queues_and_a_dead_hosts_queues_move() {
    let e = env().await;
    e.topic("Trade", 4).await;
    e.group("GID_h", ConsumeModel::Clustering, None).await;
    let other = Broker::open(e.config.clone(), e.store.clone(), e.clock.clone())
        .await
        .unwrap();
    assert_ne!(other.host_id(), e.broker.host_id());
    e.join("GID_h", "a", &[("Trade", "*")]).await;
    other
        .register_consumer(InstanceSpec {
            group: "GID_h".into(),
            instance_id: "b".into(),
            address: "10.0.0.2".into(),
            pid: None,
            subscriptions: vec![Subscription {
                topic: "Trade".into(),
                expression: "*".into(),
            }],
        })
        .await
        .unwrap();
    // The first host gives back what is no longer its share at its next lease pass.
    e.clock.advance(leases::LEASE_RENEW_MS);
    e.broker.expire_pass().await;
    other.expire_pass().await;
    let leases = e.store.lease_list("GID_h").await.unwrap();
    let mine = |h: &str| {
        leases
            .iter()
            .filter(|l| l.holder == h && l.key.topic == "Trade")
            .count()
    };
    assert_eq!(mine(e.broker.host_id()), 2, "{leases:?}");
    assert_eq!(mine(other.host_id()), 2, "{leases:?}");
    let mut seen = BTreeSet::new();
    for i in 0..40 {
        e.send("Trade", None, &format!("m{i}")).await;
    }
    let from_a = e.recv_n("GID_h", "a", 20).await;
    let from_b = other
        .receive("GID_h", "b", 100, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(from_a.len() + from_b.len(), 40);
    for d in from_a.iter().chain(&from_b) {
        assert!(
            seen.insert(d.message.id),
            "delivered twice: {}",
            d.message.id
        );
    }
    for d in &from_a {
        e.ack("GID_h", d).await;
    }
    // A receipt of one host is refused by the other, precisely.
    let err = other
        .settle(
            "GID_h",
            &e.receipt("GID_h", &from_a[0]),
            Outcome::CommitMessage,
        )
        .await
        .unwrap_err();
    assert!(err.message.contains("issued by host"), "{}", err.message);
    // The second host dies without a word (nothing released, nothing acked): once its
    // leases expire the first host takes every queue and redelivers what b held.
    other.engine().stop_tasks().await;
    drop(other);
    e.clock.advance(leases::LEASE_TTL_MS + 1);
    e.broker.expire_pass().await;
    let leases = e.store.lease_list("GID_h").await.unwrap();
    assert_eq!(
        leases
            .iter()
            .filter(|l| l.holder == e.broker.host_id())
            .count(),
        5,
        "4 queues and the retry queue: {leases:?}"
    );
    let again = e.recv_n("GID_h", "a", from_b.len()).await;
    assert_eq!(bodies(&again), bodies(&from_b), "nothing b held is lost");
}

#[tokio::test]
async fn self_balancing_members_heartbeat_list_and_send_back() {
    let e = env().await;
    e.topic("Trade", 2).await;
    e.group("GID_sdk", ConsumeModel::Clustering, Some(3)).await;
    let spec = |id: &str, expr: &str| MemberSpec {
        member_id: id.into(),
        address: "10.1.1.1:5000".into(),
        pid: Some(7),
        subscriptions: vec![Subscription {
            topic: "Trade".into(),
            expression: expr.into(),
        }],
    };
    assert!(
        e.broker
            .heartbeat_member("GID_sdk", spec("c2", "*"))
            .await
            .unwrap()
    );
    assert!(
        e.broker
            .heartbeat_member("GID_sdk", spec("c1", "*"))
            .await
            .unwrap()
    );
    assert!(
        !e.broker
            .heartbeat_member("GID_sdk", spec("c1", "*"))
            .await
            .unwrap(),
        "a plain heartbeat changes nothing"
    );
    assert!(
        e.broker
            .heartbeat_member("GID_sdk", spec("c1", "a||b"))
            .await
            .unwrap(),
        "new subscriptions are a change"
    );
    assert_eq!(e.broker.member_ids("GID_sdk").await.unwrap(), ["c1", "c2"]);
    let err = e
        .broker
        .heartbeat_member("GID_sdk", spec("c3", "a|||"))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::SubscriptionParseFailed);
    // Members expire by the clock unless they heartbeat.
    e.clock.advance(e.config.consumer_heartbeat_timeout_ms + 1);
    assert!(e.broker.member_ids("GID_sdk").await.unwrap().is_empty());
    assert!(!e.broker.leave("GID_sdk", "c1").await.unwrap());

    // Send-back: a delay level, then dead-letter now; the copy is found by position too.
    e.send("Trade", Some("a"), "x").await;
    let filter = TagFilter::parse("*").unwrap();
    let mut m = None;
    for q in 0..2 {
        let read = e
            .broker
            .read_queue("Trade", q, 0, 10, &filter)
            .await
            .unwrap();
        m = m.or(read.messages.into_iter().next());
    }
    let m = m.unwrap();
    let by_pos = e.broker.message_at(m.id.position()).await.unwrap().unwrap();
    assert_eq!(by_pos.id, m.id);
    let back = e
        .broker
        .send_back(
            "GID_sdk",
            &m,
            SendBack {
                delay: DelayPolicy::Level(3),
                max_reconsume_times: None,
            },
        )
        .await
        .unwrap();
    let now = e.clock.now_ms();
    assert_eq!(
        back,
        SentBack::Retry {
            reconsume_times: 1,
            deliver_at_ms: Some(now + 10), // level 3 = 10 s, scaled 1000× down
        }
    );
    let back = e
        .broker
        .send_back(
            "GID_sdk",
            &m,
            SendBack {
                delay: DelayPolicy::DeadLetterNow,
                max_reconsume_times: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(back, SentBack::DeadLetter);
    let dlq = e.broker.dead_letters("GID_sdk", 10, None).await.unwrap();
    assert_eq!(dlq.messages.len(), 1);
    // A client's own maximum of 0 dead-letters on the first failure.
    let back = e
        .broker
        .send_back(
            "GID_sdk",
            &m,
            SendBack {
                delay: DelayPolicy::GroupSchedule,
                max_reconsume_times: Some(0),
            },
        )
        .await
        .unwrap();
    assert_eq!(back, SentBack::DeadLetter);
}

#[tokio::test]
async fn waiting_on_one_queue_is_woken_only_by_that_queue() {
    let e = env().await;
    e.topic("Quiet", 2).await;
    e.topic("Busy", 1).await;
    let b = e.broker.clone();
    let waiter = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        b.wait_queue("Quiet", 1, 0, deadline).await
    });
    for i in 0..20 {
        e.send("Busy", None, &format!("b{i}")).await;
    }
    tokio::task::yield_now().await;
    assert!(
        !waiter.is_finished(),
        "appends to another topic do not end the wait"
    );
    e.send_msg(
        "Quiet",
        OutgoingMessage {
            body: Bytes::from_static(b"q"),
            queue: crate::broker::QueueChoice::Queue(1),
            ..Default::default()
        },
    )
    .await;
    assert!(waiter.await.unwrap(), "its own queue's append wakes it");
}
