//! PluginHost over a real broker and embedded store: deploy, consume, retry and dead letters,
//! version swaps, refusals, HTTP triggers and restart from the artifact cache.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{PluginHost, PluginsConfig, testkit};
use crate::broker::api::BrokerApi;
use crate::broker::{BrokerConfig, OutgoingMessage, TopicSpec};
use crate::clock::{SharedClock, SystemClock};
use crate::store::StoreConfig;
use crate::store::embedded::EmbeddedStore;

struct Env {
    broker: BrokerApi,
    host: Arc<PluginHost>,
    dir: tempfile::TempDir,
}

async fn open(dir: &Path) -> (BrokerApi, Arc<PluginHost>) {
    let clock: SharedClock = Arc::new(SystemClock::default());
    let sc = StoreConfig {
        data_dir: dir.to_path_buf(),
        ..StoreConfig::default()
    };
    let store = EmbeddedStore::open(&sc, clock.clone()).await.unwrap();
    let config = BrokerConfig {
        retry_delay_scale: 0.0001,
        ..BrokerConfig::default()
    };
    let broker = BrokerApi::new(
        crate::broker::Broker::open(config, store, clock)
            .await
            .unwrap(),
    );
    let plugins = PluginsConfig {
        dir: dir.join("no-plugins-dir"),
    };
    let host = PluginHost::start(broker.clone(), plugins, dir.to_path_buf())
        .await
        .unwrap();
    (broker, host)
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let (broker, host) = open(dir.path()).await;
    for t in ["Trade", "Notify"] {
        broker
            .create_topic(TopicSpec {
                name: t.into(),
                topic_type: Default::default(),
                queues: Some(4),
            })
            .await
            .unwrap();
    }
    Env { broker, host, dir }
}

impl Env {
    async fn restart(&mut self) {
        self.host.shutdown().await;
        self.broker.shutdown().await.unwrap();
        let (broker, host) = open(self.dir.path()).await;
        self.broker = broker;
        self.host = host;
    }

    async fn send(&self, topic: &str, tag: &str, props: &[(&str, &str)]) -> String {
        let m = OutgoingMessage {
            tag: Some(tag.into()),
            keys: vec!["order-1".into()],
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: Bytes::from_static(b"payload"),
            ..OutgoingMessage::default()
        };
        let r = self.broker.send(topic, vec![m]).await.unwrap();
        r[0].message_id.to_string()
    }

    fn counter(&self, plugin: &str, name: &str) -> u64 {
        self.host.status(plugin).unwrap()["counters"][name]
            .as_u64()
            .unwrap()
    }

    /// Polls until `f` holds or the deadline passes.
    async fn until(&self, what: &str, f: impl Fn(&Env) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn manifest(name: &str, group: &str, extra: &str) -> String {
    format!(
        r#"name = "{name}"
version = "1.0.0"
component = "{name}.wasm"

[consumer]
group = "{group}"
max_reconsume_times = 2
consume_timeout_ms = 2000
concurrency = 2
{extra}
[[subscription]]
topic = "Trade"
expression = "*"

[permissions]
publish = ["Notify"]
"#
    )
}

fn probe() -> Bytes {
    Bytes::from(testkit::component("probe"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployed_plugin_consumes_and_reports_counters() {
    let env = env().await;
    let r = env
        .host
        .deploy(&manifest("probe", "GID_probe", ""), probe())
        .await
        .unwrap();
    assert_eq!((r.version, r.status.as_str()), (1, "running"));
    for _ in 0..10 {
        env.send("Trade", "commit", &[]).await;
    }
    env.until("10 commits", |e| e.counter("probe", "commits") == 10)
        .await;
    let status = env.host.status("probe").unwrap();
    assert_eq!(status["instances"], 2);
    assert_eq!(status["group"], "GID_probe");
    let group = env.broker.group("GID_probe").unwrap();
    assert_eq!(
        group.max_reconsume_times, 2,
        "group created from the manifest"
    );
    let mut metrics = String::new();
    env.host.render_metrics(&mut metrics);
    assert!(
        metrics.contains("wharf_plugin_commits_total{plugin=\"probe\"} 10"),
        "{metrics}"
    );
    assert!(metrics.contains("wharf_plugin_call_duration_seconds_count{plugin=\"probe\"} 10"));
    let list = env.host.list();
    assert_eq!(list[0]["name"], "probe");
    env.host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_from_plugin_lands_and_forbidden_topic_is_refused() {
    let env = env().await;
    env.host
        .deploy(&manifest("probe", "GID_probe", ""), probe())
        .await
        .unwrap();
    env.send("Trade", "send", &[("to", "Notify")]).await;
    env.send("Trade", "send", &[("to", "Trade"), ("expect_code", "16")])
        .await;
    env.until("2 commits", |e| e.counter("probe", "commits") == 2)
        .await;
    let ids: Vec<_> = env
        .broker
        .by_time("Notify", 0, u64::MAX, 10, None)
        .await
        .unwrap()
        .messages;
    assert_eq!(ids.len(), 1, "only the permitted send landed");
    assert_eq!(ids[0].tag.as_deref(), Some("probe"));
    env.host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_then_dead_lettered() {
    let env = env().await;
    env.host
        .deploy(
            &manifest("flaky", "GID_flaky", ""),
            Bytes::from(testkit::component("flaky")),
        )
        .await
        .unwrap();
    env.send("Trade", "x", &[("fail_times", "1")]).await;
    env.send("Trade", "x", &[("fail_times", "9")]).await;
    env.until("the retried message to commit", |e| {
        e.counter("flaky", "commits") == 1
    })
    .await;
    let broker = env.broker.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dead = broker.dead_letters("GID_flaky", 10, None).await.unwrap();
        if let Some(m) = dead.messages.first() {
            assert_eq!(dead.messages.len(), 1);
            assert_eq!(
                m.properties.get("fail_times").map(String::as_str),
                Some("9")
            );
            break;
        }
        assert!(Instant::now() < deadline, "message never dead-lettered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 1 + 1 for the first message, 1 + 2 retries for the doomed one. A retry is counted after
    // its settle (which may already have dead-lettered the message): wait for the count.
    env.until("every retry counted", |e| {
        e.counter("flaky", "retries") >= 4
    })
    .await;
    assert_eq!(env.counter("flaky", "invocations"), 5);
    assert_eq!(env.counter("flaky", "retries"), 4);
    env.host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_and_timeout_are_retried_and_other_plugins_keep_working() {
    let env = env().await;
    let slow = manifest("probe", "GID_probe", "")
        .replace("consume_timeout_ms = 2000", "consume_timeout_ms = 100");
    env.host.deploy(&slow, probe()).await.unwrap();
    let other = manifest("other", "GID_other", "");
    env.host.deploy(&other, probe()).await.unwrap();
    env.send("Trade", "loop", &[]).await;
    env.send("Trade", "trap", &[]).await;
    env.until("a timeout and a trap", |e| {
        e.counter("probe", "timeouts") >= 1 && e.counter("probe", "traps") >= 1
    })
    .await;
    env.send("Trade", "commit", &[]).await;
    env.until("both plugins commit the next message", |e| {
        e.counter("probe", "commits") >= 1 && e.counter("other", "commits") >= 1
    })
    .await;
    assert!(
        env.counter("probe", "instantiations") >= 2,
        "failed instances are replaced"
    );
    env.host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_deploys_are_refused_and_the_running_version_stays() {
    let env = env().await;
    env.host
        .deploy(&manifest("probe", "GID_probe", ""), probe())
        .await
        .unwrap();
    let e = env
        .host
        .deploy(
            &manifest("probe", "GID_probe", ""),
            Bytes::from_static(b"junk"),
        )
        .await
        .unwrap_err();
    assert_eq!(e.http_status(), 400);
    assert!(e.message.contains("does not compile"), "{}", e.message);
    let e = env
        .host
        .deploy(&manifest("probe", "GID_probe", "batch_max = 99\n"), probe())
        .await
        .unwrap_err();
    assert!(e.message.contains("plugin.toml:10:13"), "{}", e.message);
    let unknown_topic =
        manifest("probe", "GID_probe", "").replace("topic = \"Trade\"", "topic = \"Nope\"");
    let e = env.host.deploy(&unknown_topic, probe()).await.unwrap_err();
    assert_eq!(e.code, crate::error::ErrorCode::TopicNotExist);
    let tiny = format!(
        "{}\n[limits]\nmemory_mib = 1\n",
        manifest("probe", "GID_probe", "")
    );
    let e = env.host.deploy(&tiny, probe()).await.unwrap_err();
    assert!(e.message.contains("memory_mib = 1"), "{}", e.message);
    let shared_group = manifest("thief", "GID_probe", "");
    let e = env.host.deploy(&shared_group, probe()).await.unwrap_err();
    assert_eq!(e.http_status(), 409);
    let status = env.host.status("probe").unwrap();
    assert_eq!(
        (status["version"].as_u64(), status["status"].as_str()),
        (Some(1), Some("running"))
    );
    env.send("Trade", "commit", &[]).await;
    env.until("the running version to keep consuming", |e| {
        e.counter("probe", "commits") == 1
    })
    .await;
    env.host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_swaps_under_load_lose_nothing() {
    let env = env().await;
    let m = manifest("probe", "GID_probe", "");
    env.host.deploy(&m, probe()).await.unwrap();
    let total = 300u64;
    let sender = {
        let broker = env.broker.clone();
        tokio::spawn(async move {
            for _ in 0..total {
                let msg = OutgoingMessage {
                    tag: Some("commit".into()),
                    body: Bytes::from_static(b"x"),
                    ..OutgoingMessage::default()
                };
                broker.send("Trade", vec![msg]).await.unwrap();
            }
        })
    };
    let v2 = env
        .host
        .deploy(&m.replace("1.0.0", "2.0.0"), probe())
        .await
        .unwrap();
    assert_eq!(v2.version, 2);
    let back = env.host.rollback("probe").await.unwrap();
    assert_eq!((back.version, back.manifest_version.as_str()), (1, "1.0.0"));
    let e = env.host.rollback("probe").await.unwrap_err();
    assert!(e.message.contains("no earlier version"), "{}", e.message);
    sender.await.unwrap();
    env.until("every message committed", |e| {
        e.counter("probe", "commits") >= total
    })
    .await;
    let status = env.broker.group_status("GID_probe").await.unwrap();
    assert_eq!(status.backlog, 0);
    let removed = env.host.remove("probe").await.unwrap();
    assert_eq!(removed.status, "removed");
    assert!(env.host.status("probe").is_err());
    assert_eq!(env.host.list().as_array().map(Vec::len), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_triggers_send_and_conflicting_routes_are_refused() {
    let env = env().await;
    let route = "[[http]]\npath = \"/hooks/orders\"\ntopic = \"Trade\"\ntag = \"commit\"\nheaders = [\"x-request-id\"]\nkey_header = \"x-order-id\"\n";
    let with_route = format!("{}\n{route}", manifest("probe", "GID_probe", ""));
    env.host.deploy(&with_route, probe()).await.unwrap();
    let headers = vec![
        ("x-request-id".to_string(), "req-7".to_string()),
        ("x-order-id".to_string(), "o-42".to_string()),
    ];
    let receipt = env
        .host
        .trigger(
            "/hooks/orders",
            &headers,
            Bytes::from_static(b"{\"order\":42}"),
            &crate::http::auth::Principal::open(),
        )
        .await
        .unwrap()
        .unwrap();
    let view = env.broker.by_key("Trade", "o-42").await.unwrap();
    assert_eq!(view.len(), 1);
    assert_eq!(view[0].id, receipt.message_id);
    assert_eq!(
        view[0].properties.get("x-request-id").map(String::as_str),
        Some("req-7")
    );
    assert!(
        env.host
            .trigger(
                "/hooks/none",
                &[],
                Bytes::new(),
                &crate::http::auth::Principal::open()
            )
            .await
            .is_none()
    );
    let thief = format!("{}\n{route}", manifest("thief", "GID_thief", ""));
    let e = env.host.deploy(&thief, probe()).await.unwrap_err();
    assert_eq!(e.http_status(), 409);
    assert!(e.message.contains("/hooks/orders"), "{}", e.message);
    env.until("the triggered message to be consumed", |e| {
        e.counter("probe", "commits") == 1
    })
    .await;
    env.host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_restores_the_running_version_from_the_cache() {
    let mut env = env().await;
    let m = manifest("probe", "GID_probe", "");
    env.host.deploy(&m, probe()).await.unwrap();
    env.host
        .deploy(&m.replace("1.0.0", "1.1.0"), probe())
        .await
        .unwrap();
    env.restart().await;
    let status = env.host.status("probe").unwrap();
    assert_eq!(status["version"], 2);
    assert_eq!(status["manifest_version"], "1.1.0");
    assert_eq!(
        status["artifact"]["cache_hit"], true,
        "restart must not recompile"
    );
    assert_eq!(status["rollback_to"], 1);
    env.send("Trade", "commit", &[]).await;
    env.until("consumption after restart", |e| {
        e.counter("probe", "commits") == 1
    })
    .await;
    env.host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_timeout_closes_only_unpaid_orders() {
    let env = env().await;
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/order-timeout/plugin.toml"),
    )
    .unwrap()
    .replace("concurrency = 20", "concurrency = 2");
    env.host
        .deploy(&text, Bytes::from(testkit::component("order-timeout")))
        .await
        .unwrap();
    let order = |id: &str, tag: &str| OutgoingMessage {
        tag: Some(tag.into()),
        keys: vec![id.into()],
        properties: [("timeoutMs".to_string(), "300".to_string())].into(),
        body: Bytes::from_static(b"{}"),
        ..OutgoingMessage::default()
    };
    env.broker
        .send(
            "Trade",
            vec![order("paid-1", "order"), order("late-2", "order")],
        )
        .await
        .unwrap();
    env.broker
        .send("Trade", vec![order("paid-1", "pay")])
        .await
        .unwrap();
    env.until("both checks handled", |e| {
        e.counter("order-timeout", "commits") >= 5
    })
    .await;
    let notify = env
        .broker
        .by_time("Notify", 0, u64::MAX, 10, None)
        .await
        .unwrap()
        .messages;
    assert_eq!(notify.len(), 1, "only the unpaid order is closed");
    assert_eq!(notify[0].tag.as_deref(), Some("close"));
    assert_eq!(notify[0].keys, vec!["late-2".to_string()]);
    env.host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_dir_is_deployed_at_start_once() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    let p = plugins.join("probe");
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join("probe.wasm"), testkit::component("probe")).unwrap();
    std::fs::write(p.join("plugin.toml"), manifest("probe", "GID_probe", "")).unwrap();
    // A broken neighbour is reported in the log and skipped; it does not stop the host.
    std::fs::create_dir_all(plugins.join("broken")).unwrap();
    std::fs::write(plugins.join("broken/plugin.toml"), "name = 1\n").unwrap();
    let start = |broker: BrokerApi| {
        let cfg = PluginsConfig {
            dir: plugins.clone(),
        };
        PluginHost::start(broker, cfg, dir.path().to_path_buf())
    };
    let (broker, host) = open(dir.path()).await;
    host.shutdown().await;
    broker
        .create_topic(TopicSpec {
            name: "Trade".into(),
            topic_type: Default::default(),
            queues: Some(2),
        })
        .await
        .unwrap();
    let host = start(broker.clone()).await.unwrap();
    assert_eq!(host.status("probe").unwrap()["version"], 1);
    host.shutdown().await;
    let host = start(broker.clone()).await.unwrap();
    let status = host.status("probe").unwrap();
    assert_eq!(
        status["version"], 1,
        "an unchanged manifest is not redeployed"
    );
    assert_eq!(status["status"], "running");
    assert!(host.status("broken").is_err());
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_handed_to_consume_batch() {
    let env = env().await;
    env.host
        .deploy(&manifest("probe", "GID_probe", "batch_max = 8\n"), probe())
        .await
        .unwrap();
    for i in 0..40 {
        let tag = if i % 10 == 0 { "retry" } else { "commit" };
        env.send("Trade", tag, &[]).await;
    }
    env.until("36 commits and 4 retries", |e| {
        e.counter("probe", "commits") >= 36 && e.counter("probe", "retries") >= 4
    })
    .await;
    assert_eq!(env.counter("probe", "traps"), 0);
    env.host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasting_runs_one_instance_per_host() {
    let env = env().await;
    let m = manifest("probe", "GID_probe", "").replace(
        "concurrency = 2",
        "concurrency = 2\nmodel = \"broadcasting\"",
    );
    env.host.deploy(&m, probe()).await.unwrap();
    assert_eq!(env.host.status("probe").unwrap()["instances"], 1);
    assert_eq!(
        env.broker.group("GID_probe").unwrap().model,
        crate::broker::ConsumeModel::Broadcasting
    );
    for _ in 0..5 {
        env.send("Trade", "commit", &[]).await;
    }
    env.until("5 commits", |e| e.counter("probe", "commits") == 5)
        .await;
    env.host.shutdown().await;
}

/// The plugin's status JSON.
fn status(env: &Env, plugin: &str) -> serde_json::Value {
    env.host.status(plugin).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_side_failures_pause_delivery_without_using_retries() {
    let env = env().await;
    // Zero retries: a single failure counted against the message would dead-letter it.
    let m = manifest("probe", "GID_probe", "")
        .replace("max_reconsume_times = 2", "max_reconsume_times = 0");
    env.host.fail_instantiations(u32::MAX);
    env.host.deploy(&m, probe()).await.unwrap();
    // Commits only when delivered as a first attempt (reconsume_times 0).
    env.send("Trade", "attempt", &[("attempt", "1")]).await;
    env.until("both workers to fail and pause", |e| {
        e.counter("probe", "host_errors") >= 4
    })
    .await;
    let paused = status(&env, "probe");
    assert_eq!(paused["status"], "paused", "{paused}");
    let error = &paused["host_error"];
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("instance pool is exhausted")),
        "{paused}"
    );
    assert_eq!(error["paused_workers"], 2, "{paused}");
    assert!(error["since_ms"].as_u64() <= error["last_ms"].as_u64());
    assert_eq!(env.counter("probe", "invocations"), 0);
    assert_eq!(env.counter("probe", "retries"), 0);

    env.host.fail_instantiations(0);
    env.until("the message to commit", |e| {
        e.counter("probe", "commits") == 1
    })
    .await;
    assert_eq!(env.counter("probe", "retries"), 0, "no retry was used");
    let dead = env
        .broker
        .dead_letters("GID_probe", 10, None)
        .await
        .unwrap();
    assert!(dead.messages.is_empty(), "nothing dead-lettered");
    env.until("the host error to clear", |e| {
        status(e, "probe")["host_error"].is_null()
    })
    .await;
    assert_eq!(status(&env, "probe")["status"], "running");
    let mut metrics = String::new();
    env.host.render_metrics(&mut metrics);
    assert!(metrics.contains("wharf_plugin_host_errors_total{plugin=\"probe\"}"));
    env.host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_held_when_an_instance_cannot_be_replaced_keep_their_retries() {
    let env = env().await;
    env.broker
        .create_topic(TopicSpec {
            name: "Single".into(),
            topic_type: Default::default(),
            queues: Some(1),
        })
        .await
        .unwrap();
    // One worker taking several messages per call from a component without consume-batch:
    // they are called one by one, and a trap leaves the rest of the batch untried.
    let m = manifest("consume-only", "GID_single", "batch_max = 8\n")
        .replace("concurrency = 2", "concurrency = 1")
        .replace("max_reconsume_times = 2", "max_reconsume_times = 0")
        .replace("topic = \"Trade\"", "topic = \"Single\"");
    env.host
        .deploy(&m, Bytes::from(testkit::component("consume-only")))
        .await
        .unwrap();
    env.until("the worker to join", |e| {
        status(e, "consume-only")["counters"]["instantiations"] == 1
    })
    .await;
    env.host.fail_instantiations(2);
    let batch = ["trap", "a", "b", "c"]
        .map(|tag| OutgoingMessage {
            tag: Some(tag.into()),
            body: Bytes::from_static(b"payload"),
            ..OutgoingMessage::default()
        })
        .to_vec();
    env.broker.send("Single", batch).await.unwrap();
    env.until("the three healthy messages to commit", |e| {
        e.counter("consume-only", "commits") == 3
    })
    .await;
    assert!(env.counter("consume-only", "host_errors") >= 1);
    // Only the trap used its (single) attempt; the untried three were handed back uncounted.
    assert_eq!(env.counter("consume-only", "retries"), 1);
    assert_eq!(env.counter("consume-only", "invocations"), 4);
    let dead = env
        .broker
        .dead_letters("GID_single", 10, None)
        .await
        .unwrap();
    let tags: Vec<_> = dead.messages.iter().map(|m| m.tag.clone()).collect();
    assert_eq!(tags, [Some("trap".to_string())]);
    env.host.shutdown().await;
}
