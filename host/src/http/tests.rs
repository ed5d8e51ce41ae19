//! The router end to end in process: a real embedded store in a temp dir, a real listener, and
//! raw HTTP requests, checking that every failure path answers with the contract's JSON error.

use std::sync::Arc;

use serde_json::{Value, json};

use super::auth::{Authenticator, sign, string_to_sign};
use super::{AppState, HttpHandler, HttpMetrics};
use crate::broker::BrokerConfig;
use crate::broker::api::BrokerApi;
use crate::clock::{SharedClock, SystemClock};
use crate::config::{AccessKey, AuthConfig, HttpConfig};
use crate::plugin::{PluginHost, PluginsConfig};
use crate::store::StoreConfig;

struct Host {
    base: String,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

async fn start(auth: AuthConfig) -> Host {
    let dir = tempfile::tempdir().unwrap();
    let clock: SharedClock = Arc::new(SystemClock::default());
    let store = crate::store::open_store(
        &StoreConfig {
            data_dir: dir.path().join("data"),
            ..StoreConfig::default()
        },
        clock.clone(),
    )
    .await
    .unwrap();
    let broker = crate::broker::Broker::open(BrokerConfig::default(), store, clock.clone())
        .await
        .unwrap();
    let broker = BrokerApi::new(broker);
    let plugins = PluginHost::start(
        broker.clone(),
        PluginsConfig {
            dir: dir.path().join("plugins"),
        },
        dir.path().join("data"),
    )
    .await
    .unwrap();
    let shutdown = crate::net::Shutdown::new();
    let state = Arc::new(AppState {
        broker,
        plugins,
        auth: Arc::new(Authenticator::new(&auth, clock)),
        config: HttpConfig {
            max_body_bytes: 4096,
            ..HttpConfig::default()
        },
        metrics: HttpMetrics::default(),
        shutdown: shutdown.token(),
        mqtt: None,
        long_polls: super::LongPolls::new(HttpConfig::default().max_long_polls),
    });
    let listener = crate::net::Listener::bind("http", "127.0.0.1:0", 64)
        .await
        .unwrap();
    let addr = listener.local_addr();
    shutdown.serve(listener, HttpHandler::new(state, None));
    Host {
        base: format!("http://{addr}"),
        _dir: dir,
        http: reqwest::Client::new(),
    }
}

impl Host {
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: &str,
        headers: &[(&str, String)],
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base))
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status >= 400 {
            assert_eq!(ct, "application/json", "{method} {path}: {text}");
            assert!(
                v["error"]["code"].is_i64() && v["error"]["message"].is_string(),
                "{text}"
            );
        }
        (status, v)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_is_a_json_error() {
    let h = start(AuthConfig::default()).await;
    let (s, _) = h.call("GET", "/healthz", "", &[]).await;
    assert_eq!(s, 200);
    let (s, v) = h.call("GET", "/no/such/route", "", &[]).await;
    assert_eq!((s, v["error"]["code"].as_i64()), (404, Some(1)));
    let (s, _) = h.call("PATCH", "/v1/topics", "", &[]).await;
    assert_eq!(s, 405);
    let (s, v) = h.call("POST", "/v1/topics", "{\"name\":", &[]).await;
    assert_eq!(s, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("malformed JSON")
    );
    let (s, v) = h.call("POST", "/v1/topics", &"x".repeat(5000), &[]).await;
    assert_eq!(
        (s, v["error"]["name"].as_str()),
        (413, Some("MESSAGE_ILLEGAL"))
    );
    let (s, _) = h
        .call("POST", "/v1/topics", r#"{"name":"Trade","queues":2}"#, &[])
        .await;
    assert_eq!(s, 201);
    let (s, _) = h
        .call("POST", "/v1/topics", r#"{"name":"Trade"}"#, &[])
        .await;
    assert_eq!(s, 409);
    let (s, v) = h
        .call("POST", "/v1/topics/Nope/messages", r#"{"body":"x"}"#, &[])
        .await;
    assert_eq!((s, v["error"]["code"].as_i64()), (404, Some(17)));
    let (s, v) = h
        .call(
            "POST",
            "/v1/topics/Trade/messages",
            r#"{"body":"x","extra":1}"#,
            &[],
        )
        .await;
    assert_eq!((s, v["error"]["code"].as_i64()), (400, Some(13)));
    let (s, v) = h
        .call(
            "POST",
            "/v1/topics/Trade/messages",
            r#"[{"body":"a"},{"body_base64":"AP8="}]"#,
            &[],
        )
        .await;
    assert_eq!(s, 200);
    let id = v[1]["message_id"].as_str().unwrap().to_string();
    let (s, v) = h.call("GET", &format!("/v1/messages/{id}"), "", &[]).await;
    assert_eq!((s, v["body_base64"].as_str()), (200, Some("AP8=")));
    let (s, _) = h
        .call("GET", "/v1/topics/Trade/messages?limit=abc", "", &[])
        .await;
    assert_eq!(s, 400);
    let (s, v) = h.call("POST", "/t/hooks/none", "x", &[]).await;
    assert_eq!((s, v["error"]["code"].as_i64()), (404, Some(1)));
    let (s, v) = h.call("GET", "/metrics", "", &[]).await;
    assert_eq!((s, v), (200, Value::Null));
    let text = h
        .http
        .get(format!("{}/metrics", h.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("wharf_sent_messages_total{topic=\"Trade\"}"),
        "{text}"
    );
    assert!(
        text.contains("wharf_store_append_duration_seconds_bucket"),
        "{text}"
    );
}

fn signed(method: &str, path: &str, ak: &str, sk: &str, body: &str) -> Vec<(&'static str, String)> {
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let md5 = if body.is_empty() {
        String::new()
    } else {
        super::auth::content_md5(body.as_bytes())
    };
    let ct = if body.is_empty() {
        ""
    } else {
        "application/json"
    };
    let sig = sign(sk, &string_to_sign(method, &md5, ct, &date, path));
    let mut h = vec![
        ("date", date),
        ("authorization", format!("WHARF {ak}:{sig}")),
    ];
    if !body.is_empty() {
        h.push(("content-md5", md5));
        h.push(("content-type", ct.to_string()));
    }
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_and_permissions_are_enforced() {
    let h = start(AuthConfig {
        keys: vec![
            AccessKey {
                access_key: "ADMIN".into(),
                secret_key: "s1".into(),
                allow_publish: vec!["*".into()],
                allow_subscribe: vec!["*".into()],
                admin: true,
            },
            AccessKey {
                access_key: "PUB".into(),
                secret_key: "s2".into(),
                allow_publish: vec!["Trade".into()],
                allow_subscribe: vec![],
                admin: false,
            },
        ],
        metrics_open: false,
    })
    .await;
    assert_eq!(h.call("GET", "/healthz", "", &[]).await.0, 200);
    assert_eq!(h.call("GET", "/v1/topics", "", &[]).await.0, 401);
    assert_eq!(h.call("GET", "/metrics", "", &[]).await.0, 401);
    let body = r#"{"name":"Trade"}"#;
    let hd = signed("POST", "/v1/topics", "ADMIN", "s1", body);
    assert_eq!(h.call("POST", "/v1/topics", body, &hd).await.0, 201);
    let body = r#"{"name":"Other"}"#;
    let hd = signed("POST", "/v1/topics", "ADMIN", "s1", body);
    assert_eq!(h.call("POST", "/v1/topics", body, &hd).await.0, 201);
    let hd = signed("POST", "/v1/topics", "PUB", "s2", body);
    let (s, v) = h.call("POST", "/v1/topics", body, &hd).await;
    assert_eq!((s, v["error"]["code"].as_i64()), (403, Some(16)));
    // Publish rights per topic.
    let m = r#"{"body":"x"}"#;
    let hd = signed("POST", "/v1/topics/Trade/messages", "PUB", "s2", m);
    assert_eq!(
        h.call("POST", "/v1/topics/Trade/messages", m, &hd).await.0,
        200
    );
    let hd = signed("POST", "/v1/topics/Other/messages", "PUB", "s2", m);
    let (s, v) = h.call("POST", "/v1/topics/Other/messages", m, &hd).await;
    assert_eq!(
        (s, v["error"]["name"].as_str()),
        (403, Some("NO_PERMISSION"))
    );
    // A body that does not match its signed Content-MD5 is refused.
    let hd = signed("POST", "/v1/topics/Trade/messages", "PUB", "s2", m);
    assert_eq!(
        h.call("POST", "/v1/topics/Trade/messages", r#"{"body":"y"}"#, &hd)
            .await
            .0,
        401
    );
    // Receive needs subscribe rights.
    let r = json!({"topic": "Trade"}).to_string();
    let hd = signed("POST", "/v1/groups/GID_x/receive", "PUB", "s2", &r);
    assert_eq!(
        h.call("POST", "/v1/groups/GID_x/receive", &r, &hd).await.0,
        403
    );
    // The query string is signed: signing one path and calling another fails.
    let hd = signed("GET", "/v1/topics?a=1", "ADMIN", "s1", "");
    assert_eq!(h.call("GET", "/v1/topics?a=2", "", &hd).await.0, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_consumer_receives_acks_and_reports_status() {
    let h = start(AuthConfig::default()).await;
    let ok = |s: u16, want: u16, v: &Value| assert_eq!(s, want, "{v}");
    let (s, v) = h
        .call("POST", "/v1/topics", r#"{"name":"Trade","queues":1}"#, &[])
        .await;
    ok(s, 201, &v);
    let (s, v) = h
        .call("POST", "/v1/groups", r#"{"name":"GID_pull"}"#, &[])
        .await;
    ok(s, 201, &v);
    let batch = r#"[{"tag":"a","body":"one"},{"tag":"b","body":"two"}]"#;
    let (s, v) = h
        .call("POST", "/v1/topics/Trade/messages", batch, &[])
        .await;
    ok(s, 200, &v);
    // Neither topic nor subscriptions, or both forms at once: a clear 400.
    for bad in [
        json!({"max": 1}),
        json!({"topic": "Trade", "subscriptions": [{"topic": "Trade"}]}),
        json!({"subscriptions": []}),
        json!({"topic": "Trade", "max": 0}),
    ] {
        let (s, v) = h
            .call("POST", "/v1/groups/GID_pull/receive", &bad.to_string(), &[])
            .await;
        ok(s, 400, &v);
    }
    let body = json!({"topic": "Trade", "expression": "a", "max": 8, "wait_ms": 2000, "instance_id": "i1"});
    let (s, v) = h
        .call(
            "POST",
            "/v1/groups/GID_pull/receive",
            &body.to_string(),
            &[],
        )
        .await;
    ok(s, 200, &v);
    let msgs = v["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 1, "the expression filters out tag b: {v}");
    assert_eq!(msgs[0]["body"], "one");
    let receipt = msgs[0]["receipt"].as_str().unwrap().to_string();
    let (s, v) = h
        .call(
            "POST",
            "/v1/groups/GID_pull/ack",
            &json!({"receipts": [receipt]}).to_string(),
            &[],
        )
        .await;
    ok(s, 200, &v);
    assert_eq!(v["settled"], 1);
    // Settling it again names the failed receipt.
    let (s, v) = h
        .call(
            "POST",
            "/v1/groups/GID_pull/ack",
            &json!({"receipts": [receipt]}).to_string(),
            &[],
        )
        .await;
    assert!(s >= 400, "{v}");
    assert_eq!(v["failed"][0]["receipt"], receipt.as_str());
    let (s, v) = h.call("GET", "/v1/groups/GID_pull/status", "", &[]).await;
    ok(s, 200, &v);
    assert_eq!(v["online"], true);
    assert_eq!(v["instances"][0]["instance_id"], "i1");
    let (s, v) = h
        .call(
            "POST",
            "/v1/groups/GID_none/receive",
            r#"{"topic":"Trade"}"#,
            &[],
        )
        .await;
    assert_eq!((s, v["error"]["code"].as_i64()), (404, Some(26)));
}
