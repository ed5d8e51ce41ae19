//! `wharf serve` on the PostgreSQL backend, against a real PostgreSQL 15 of the test's own:
//! send and consume over HTTP, a restart that loses nothing, and an outage of the database
//! (`/healthz` 503, sends SERVICE_NOT_AVAILABLE) that the host recovers from by itself.

use std::time::Duration;

use serde_json::json;

use crate::harness::{Server, ServerOpts, create_group, create_topic, wait_for};
use crate::testdb::PgServer;

fn send(s: &Server, body: &str) -> String {
    let r = s
        .post_json(
            "/v1/topics/PgOrders/messages",
            &json!({"tag": "t", "keys": ["k"], "body": body}),
        )
        .expect(200);
    r["message_id"].as_str().unwrap().to_string()
}

fn receive(s: &Server, want: usize) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    wait_for(&format!("{want} messages"), Duration::from_secs(15), || {
        let r = s
            .post_json(
                "/v1/groups/GID_pg/receive",
                &json!({"topic": "PgOrders", "expression": "*", "max": 32, "wait_ms": 500,
                        "instance_id": "e2e"}),
            )
            .expect(200);
        out.extend(r["messages"].as_array().cloned().unwrap_or_default());
        (out.len() >= want).then_some(())
    });
    out
}

#[test]
fn serve_on_postgres_survives_a_restart_and_a_database_outage() {
    let pg = PgServer::private();
    let config = format!(
        "[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"{}\"\npool_size = 8\n",
        pg.url("postgres")
    );
    let mut s = Server::start(ServerOpts::with_config(config));
    assert!(
        !s.logs().contains("pw-not-checked"),
        "the password is never logged"
    );
    create_topic(s.api(), "PgOrders", 2);
    create_group(s.api(), "GID_pg");
    let ids: Vec<String> = (0..6).map(|i| send(&s, &format!("m{i}"))).collect();
    let got = receive(&s, 6);
    let first: Vec<&str> = got
        .iter()
        .take(3)
        .map(|m| m["receipt"].as_str().unwrap())
        .collect();
    s.post_json("/v1/groups/GID_pg/ack", &json!({"receipts": first}))
        .expect(200);

    s.restart();
    for id in &ids {
        let m = s.get(&format!("/v1/messages/{id}")).expect(200);
        assert_eq!(m["message_id"], id.as_str());
    }
    let keyed = s.get("/v1/topics/PgOrders/messages?key=k").expect(200);
    assert_eq!(keyed["messages"].as_array().map(Vec::len), Some(6));
    // Un-acked deliveries come back after the restart; none of the 6 is lost.
    let again = receive(&s, 3);
    let mut bodies: Vec<String> = got
        .iter()
        .take(3)
        .chain(again.iter())
        .map(|m| m["body"].as_str().unwrap().to_string())
        .collect();
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies.len(), 6, "{bodies:?}");

    pg.stop();
    wait_for("/healthz to say 503", Duration::from_secs(15), || {
        (s.get("/healthz").status == 503).then_some(())
    });
    s.post_json(
        "/v1/topics/PgOrders/messages",
        &json!({"body": "while down"}),
    )
    .expect_error(503, 14, "SERVICE_NOT_AVAILABLE");

    pg.start();
    wait_for("/healthz to recover", Duration::from_secs(20), || {
        (s.get("/healthz").status == 200).then_some(())
    });
    let id = wait_for("a send after recovery", Duration::from_secs(20), || {
        let r = s.post_json("/v1/topics/PgOrders/messages", &json!({"body": "after"}));
        (r.status == 200).then(|| r.body["message_id"].as_str().unwrap().to_string())
    });
    assert_eq!(
        s.get(&format!("/v1/messages/{id}")).expect(200)["body"],
        "after"
    );
    assert!(
        !s.logs().contains("pw-not-checked"),
        "the password is never logged"
    );
}
