//! Runtime tests against the real `probe` component (built from `plugins/probe`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::runtime::{Failure, HostApi, Instance, InstanceConfig, Loaded, Runtime};
use super::testkit;
use crate::broker::consume::Outcome;
use crate::broker::{OutgoingMessage, SendReceipt};
use crate::error::{Result, WharfError};
use crate::model::{MessageId, StoredMessage};

/// Records what the plugin asked the host for; answers like a broker with one queue.
#[derive(Default)]
struct Recorder {
    sent: Mutex<Vec<(String, OutgoingMessage)>>,
    stored: Mutex<Vec<StoredMessage>>,
}

impl HostApi for Recorder {
    fn send(&self, topic: &str, message: OutgoingMessage) -> Result<SendReceipt> {
        if topic == "Missing" {
            return Err(WharfError::topic_not_exist(topic));
        }
        let mut sent = self.sent.lock().unwrap();
        sent.push((topic.to_string(), message));
        Ok(SendReceipt {
            message_id: MessageId::new(1, 1, sent.len() as u64),
            queue_id: 0,
            queue_offset: Some(sent.len() as u64 - 1),
        })
    }

    fn find_by_key(&self, topic: &str, key: &str) -> Result<Vec<StoredMessage>> {
        Ok(self
            .stored
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.topic == topic && m.keys.iter().any(|k| k == key))
            .cloned()
            .collect())
    }

    fn now_ms(&self) -> u64 {
        1_700_000_000_000
    }
}

fn runtime() -> &'static (Runtime, tempfile::TempDir) {
    static RT: OnceLock<(Runtime, tempfile::TempDir)> = OnceLock::new();
    RT.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        (Runtime::new(dir.path().join("cache")).unwrap(), dir)
    })
}

fn probe() -> &'static Loaded {
    static P: OnceLock<Loaded> = OnceLock::new();
    P.get_or_init(|| runtime().0.load(&testkit::component("probe")).unwrap())
}

fn config(api: Arc<Recorder>, timeout_ms: u64, memory_mib: usize) -> Arc<InstanceConfig> {
    Arc::new(InstanceConfig {
        plugin: "probe".into(),
        version: 1,
        group: "GID_probe".into(),
        publish: vec!["Notify".into(), "Missing".into()],
        readable: vec!["Trade".into()],
        memory_bytes: memory_mib * 1024 * 1024,
        timeout: Duration::from_millis(timeout_ms),
        api,
    })
}

fn instance(api: Arc<Recorder>, timeout_ms: u64) -> Instance {
    Instance::new(
        runtime().0.engine(),
        &probe().pre,
        config(api, timeout_ms, 64),
    )
    .unwrap()
}

fn message(tag: &str, props: &[(&str, &str)]) -> StoredMessage {
    StoredMessage {
        id: MessageId::new(1_700_000_000_000, 7, 42),
        topic: "Trade".into(),
        queue_id: 1,
        queue_offset: Some(5),
        tag: Some(tag.into()),
        keys: vec!["k1".into(), "k2".into()],
        properties: props
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        body: Bytes::from_static(b"hello"),
        born_ms: 1,
        stored_ms: 2,
        deliver_at_ms: None,
        reconsume_times: 0,
        wire: Default::default(),
    }
}

#[test]
fn commit_and_reconsume_later_are_returned() {
    let mut i = instance(Arc::default(), 5_000);
    assert_eq!(
        i.consume(&message("commit", &[])),
        Ok(Outcome::CommitMessage)
    );
    assert_eq!(
        i.consume(&message("retry", &[])),
        Ok(Outcome::ReconsumeLater)
    );
}

#[test]
fn message_fields_and_context_reach_the_guest() {
    let mut i = instance(Arc::default(), 5_000);
    let m = message("fields", &[("color", "blue"), ("group", "GID_probe")]);
    assert_eq!(i.consume(&m), Ok(Outcome::CommitMessage));
    let mut retried = message("attempt", &[("attempt", "4")]);
    retried.reconsume_times = 3;
    assert_eq!(i.consume(&retried), Ok(Outcome::CommitMessage));
    let clock = message("clock", &[("now", "1700000000000")]);
    assert_eq!(i.consume(&clock), Ok(Outcome::CommitMessage));
}

#[test]
fn instance_is_reused_between_calls() {
    let mut i = instance(Arc::default(), 5_000);
    for n in 1..=3 {
        let calls = n.to_string();
        assert_eq!(
            i.consume(&message("calls", &[("calls", &calls)])),
            Ok(Outcome::CommitMessage),
            "call {n} should see {n} calls in the same instance"
        );
    }
}

#[test]
fn trap_is_reported_with_the_panic_message() {
    let mut i = instance(Arc::default(), 5_000);
    match i.consume(&message("trap", &[])) {
        Err(Failure::Trap(why)) => assert!(why.contains("probe asked to trap"), "{why}"),
        other => panic!("expected a trap, got {other:?}"),
    }
    // A fresh instance from the same pre-linked component works.
    let mut fresh = instance(Arc::default(), 5_000);
    assert_eq!(
        fresh.consume(&message("commit", &[])),
        Ok(Outcome::CommitMessage)
    );
}

#[test]
fn infinite_loop_is_stopped_at_the_deadline() {
    let mut i = instance(Arc::default(), 100);
    let started = Instant::now();
    assert_eq!(i.consume(&message("loop", &[])), Err(Failure::Timeout));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(95),
        "stopped too early: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "stopped too late: {took:?}");
}

#[test]
fn memory_cap_traps() {
    let api: Arc<Recorder> = Arc::default();
    let mut i = Instance::new(runtime().0.engine(), &probe().pre, config(api, 5_000, 16)).unwrap();
    match i.consume(&message("oom", &[])) {
        Err(Failure::Trap(why)) => assert!(!why.is_empty()),
        other => panic!("expected a trap at the memory cap, got {other:?}"),
    }
}

#[test]
fn send_reaches_only_permitted_topics() {
    let api: Arc<Recorder> = Arc::default();
    let mut i = instance(api.clone(), 5_000);
    let ok = message("send", &[("to", "Notify")]);
    assert_eq!(i.consume(&ok), Ok(Outcome::CommitMessage));
    let refused = message("send", &[("to", "Secret"), ("expect_code", "16")]);
    assert_eq!(
        i.consume(&refused),
        Ok(Outcome::CommitMessage),
        "the guest sees NO_PERMISSION (16)"
    );
    let missing = message("send", &[("to", "Missing"), ("expect_code", "17")]);
    assert_eq!(
        i.consume(&missing),
        Ok(Outcome::CommitMessage),
        "broker errors reach the guest"
    );
    let sent = api.sent.lock().unwrap();
    assert_eq!(
        sent.len(),
        1,
        "nothing was sent to a topic outside permissions.publish"
    );
    assert_eq!(sent[0].0, "Notify");
    assert_eq!(sent[0].1.tag.as_deref(), Some("probe"));
    assert_eq!(sent[0].1.body, Bytes::from_static(b"hello"));
}

#[test]
fn find_by_key_is_limited_to_readable_topics() {
    let api: Arc<Recorder> = Arc::default();
    let mut pay = message("pay", &[]);
    pay.keys = vec!["k1".into()];
    api.stored.lock().unwrap().push(pay);
    let mut i = instance(api, 5_000);
    assert_eq!(
        i.consume(&message("find", &[("topic", "Trade")])),
        Ok(Outcome::CommitMessage)
    );
    let refused = message("find", &[("topic", "Secret"), ("expect_code", "16")]);
    assert_eq!(i.consume(&refused), Ok(Outcome::CommitMessage));
}

#[test]
fn batch_answers_one_action_per_message() {
    let mut i = instance(Arc::default(), 5_000);
    let (commit, retry) = (message("commit", &[]), message("retry", &[]));
    assert_eq!(
        i.consume_batch(&[&commit, &retry, &commit]),
        Ok(vec![
            Outcome::CommitMessage,
            Outcome::ReconsumeLater,
            Outcome::CommitMessage
        ])
    );
}

#[test]
fn a_component_exporting_only_consume_is_served_per_message() {
    let loaded = runtime()
        .0
        .load(&testkit::component("consume-only"))
        .expect("world consumer (consume only) is a plugin");
    assert!(!loaded.pre.has_batch());
    assert!(probe().pre.has_batch(), "the SDK exports consume-batch too");
    let mut i = Instance::new(
        runtime().0.engine(),
        &loaded.pre,
        config(Arc::default(), 5_000, 32),
    )
    .unwrap();
    assert!(!i.has_batch());
    let (commit, retry) = (message("commit", &[]), message("retry", &[]));
    assert_eq!(i.consume(&commit), Ok(Outcome::CommitMessage));
    assert_eq!(
        i.consume_batch(&[&commit, &retry, &commit]),
        Ok(vec![
            Outcome::CommitMessage,
            Outcome::ReconsumeLater,
            Outcome::CommitMessage
        ])
    );
    match i.consume_batch(&[&commit, &message("trap", &[])]) {
        Err(Failure::Trap(why)) => assert!(why.contains("consume-only asked to trap"), "{why}"),
        other => panic!("expected a trap, got {other:?}"),
    }
}

#[test]
fn packed_meta_is_the_shared_property_encoding() {
    let m = message("fields", &[("color", "blue")]);
    let meta = super::runtime::pack_meta(&m);
    assert_eq!(meta, b"color\x01blue\x02KEYS\x01k1 k2\x02");
    let decoded = wharf_codec::properties::decode_map(&meta).unwrap();
    assert_eq!(decoded["KEYS"], "k1 k2");
}

#[test]
fn compiled_artifact_is_reused_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = testkit::component("flaky");
    let first = Runtime::new(dir.path().to_path_buf()).unwrap();
    let cold = first.load(&bytes).unwrap();
    assert!(!cold.cache_hit);
    drop(first);
    let second = Runtime::new(dir.path().to_path_buf()).unwrap();
    let warm = second.load(&bytes).unwrap();
    assert!(
        warm.cache_hit,
        "a restarted runtime loads the cached artifact"
    );
    assert_eq!(warm.hash, cold.hash);
    // A corrupt artifact is detected and recompiled, not trusted.
    let artifact = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .unwrap();
    // Replace the file (not rewrite it in place: the loaded artifact is memory-mapped from it).
    std::fs::remove_file(&artifact).unwrap();
    std::fs::write(&artifact, b"garbage").unwrap();
    let again = second.load(&bytes).unwrap();
    assert!(!again.cache_hit);
}

#[test]
fn components_that_are_not_plugins_are_refused() {
    let rt = &runtime().0;
    let e = rt.load(b"not wasm at all").err().unwrap();
    assert!(e.message.contains("does not compile"), "{}", e.message);
    // A valid core module is not a component.
    let e = rt.load(b"\0asm\x01\0\0\0").err().unwrap();
    assert!(e.message.contains("does not compile"), "{}", e.message);
}
