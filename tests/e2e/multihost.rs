//! Three `wharf serve` processes on one real PostgreSQL: a topic or plugin created on one host
//! is in force on the others, sends to every host reach one HTTP pull consumer group served by
//! all three, and a host killed with SIGKILL under load loses nothing that was acknowledged
//! (its queues move to the survivors when its leases expire).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{Api, Server, ServerOpts, create_group, wait_for};
use crate::plugins::{deploy, probe_manifest};
use crate::remoting::raw_call;
use crate::testdb::PgServer;

/// How long a change made on one host may take to be in force on the others.
const IN_FORCE: Duration = Duration::from_secs(2);

fn three_hosts(pg: &PgServer) -> Vec<Server> {
    let config = format!(
        "[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"{}\"\npool_size = 8\n\
         [broker]\nretry_delay_scale = 0.0001\n",
        pg.url("postgres")
    );
    (0..3)
        .map(|_| Server::start(ServerOpts::with_config(config.clone())))
        .collect()
}

/// The remoting addresses a route answer from `s` names, master first.
fn route_addrs(s: &Server) -> Vec<String> {
    let (h, body) = raw_call(s, 105, json!({"topic": "Multi"}), b"");
    assert_eq!(h["code"], 0, "route: {h}");
    let route: serde_json::Value = serde_json::from_slice(&body).expect("route JSON");
    let addrs = route["brokerDatas"][0]["brokerAddrs"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let mut ids: Vec<(u64, String)> = addrs
        .into_iter()
        .filter_map(|(id, a)| Some((id.parse().ok()?, a.as_str()?.to_string())))
        .collect();
    ids.sort();
    ids.into_iter().map(|(_, a)| a).collect()
}

fn remoting(s: &Server) -> String {
    s.listener("remoting")
        .expect("remoting listener")
        .to_string()
}

/// Receives and acks on `api` until `stop`, adding every body to `seen`.
fn consume(api: Api, instance: String, seen: Arc<Mutex<BTreeSet<String>>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(r) = api.try_post_json(
            "/v1/groups/GID_multi/receive",
            &json!({"topic": "Multi", "expression": "*", "max": 64, "wait_ms": 300,
                    "instance_id": instance}),
        ) else {
            // The host is gone (killed): the survivors serve its queues.
            return;
        };
        if r.status != 200 {
            continue;
        }
        let messages = r.body["messages"].as_array().cloned().unwrap_or_default();
        if messages.is_empty() {
            continue;
        }
        let receipts: Vec<&str> = messages
            .iter()
            .filter_map(|m| m["receipt"].as_str())
            .collect();
        let Ok(acked) =
            api.try_post_json("/v1/groups/GID_multi/ack", &json!({"receipts": receipts}))
        else {
            return;
        };
        if acked.status == 200 {
            let mut seen = seen.lock().unwrap();
            for m in &messages {
                if let Some(b) = m["body"].as_str() {
                    seen.insert(b.to_string());
                }
            }
        }
    }
}

#[test]
fn three_hosts_share_topics_and_lose_nothing_when_one_is_killed() {
    let pg = PgServer::private();
    let mut hosts = three_hosts(&pg);
    let apis: Vec<Api> = hosts.iter().map(|s| s.api().clone()).collect();

    // A topic created on host 0 takes sends on hosts 1 and 2 within 2 s.
    let created = Instant::now();
    apis[0]
        .post_json("/v1/topics", &json!({"name": "Multi", "queues": 8}))
        .expect(201);
    for api in &apis[1..] {
        wait_for("the new topic on another host", IN_FORCE, || {
            let r = api.post_json("/v1/topics/Multi/messages", &json!({"body": "probe"}));
            (r.status == 200).then_some(())
        });
    }
    assert!(created.elapsed() <= IN_FORCE + Duration::from_millis(500));
    // Creating it again on another host is a conflict there too: the store decides.
    apis[2]
        .post_json("/v1/topics", &json!({"name": "Multi", "queues": 8}))
        .expect_error(409, 1, "SYSTEM_ERROR");
    create_group(&apis[1], "GID_multi");
    wait_for("the new group on every host", IN_FORCE * 2, || {
        apis.iter()
            .all(|a| a.get("/v1/groups/GID_multi/status").status == 200)
            .then_some(())
    });

    // Remoting routes name the answering host first, then every other live host.
    let all: BTreeSet<String> = hosts.iter().map(remoting).collect();
    wait_for("routes naming every host", Duration::from_secs(10), || {
        let addrs = route_addrs(&hosts[0]);
        (addrs.first() == Some(&remoting(&hosts[0]))
            && addrs.iter().cloned().collect::<BTreeSet<_>>() == all)
            .then_some(())
    });

    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let consumers: Vec<_> = apis
        .iter()
        .enumerate()
        .map(|(i, api)| {
            let (api, seen, stop) = (api.clone(), seen.clone(), stop.clone());
            thread::spawn(move || consume(api, format!("c{i}"), seen, stop))
        })
        .collect();

    // Senders on every host; what a host acknowledged must be consumed.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let per_host = 400;
    let senders: Vec<_> = apis
        .iter()
        .enumerate()
        .map(|(h, api)| {
            let (api, acked) = (api.clone(), acked.clone());
            thread::spawn(move || {
                for n in 0..per_host {
                    let body = format!("h{h}-{n}");
                    match api.try_post_json("/v1/topics/Multi/messages", &json!({"body": body})) {
                        Ok(r) if r.status == 200 => acked.lock().unwrap().push(body),
                        Ok(_) => {}
                        Err(_) => return, // the host was killed
                    }
                }
            })
        })
        .collect();
    wait_for(
        "host 2 to acknowledge some sends",
        Duration::from_secs(30),
        || {
            let n = acked
                .lock()
                .unwrap()
                .iter()
                .filter(|b| b.starts_with("h2-"))
                .count();
            (n >= 50).then_some(())
        },
    );
    let killed = Instant::now();
    hosts[2].kill9();
    for s in senders {
        s.join().expect("sender");
    }
    let acked: Vec<String> = acked.lock().unwrap().clone();
    assert!(
        acked.iter().filter(|b| b.starts_with("h0-")).count() == per_host,
        "the surviving hosts acknowledge every send"
    );
    // Host 2's queues (leases of 8 s) move to the survivors, which deliver what it held.
    wait_for(
        "every acknowledged message consumed",
        Duration::from_secs(60),
        || {
            let seen = seen.lock().unwrap();
            acked.iter().all(|b| seen.contains(b)).then_some(())
        },
    );
    let moved_in = killed.elapsed();
    // The killed host drops out of the routes once its membership row expires.
    let survivors: BTreeSet<String> = hosts[..2].iter().map(remoting).collect();
    wait_for(
        "routes without the killed host",
        Duration::from_secs(20),
        || (route_addrs(&hosts[1]).into_iter().collect::<BTreeSet<_>>() == survivors).then_some(()),
    );
    stop.store(true, Ordering::Relaxed);
    for c in consumers {
        let _ = c.join();
    }
    let missing: Vec<&String> = {
        let seen = seen.lock().unwrap();
        acked.iter().filter(|b| !seen.contains(*b)).collect()
    };
    assert!(missing.is_empty(), "lost: {missing:?}");
    eprintln!(
        "{} acknowledged sends all consumed; the killed host's queues were served again {:?} after the kill",
        acked.len(),
        moved_in
    );
    for h in hosts.iter_mut().take(2) {
        h.stop();
    }
}

#[test]
fn a_plugin_deployed_on_one_host_runs_on_every_host() {
    let pg = PgServer::private();
    let mut hosts = three_hosts(&pg);
    hosts[0]
        .api()
        .post_json("/v1/topics", &json!({"name": "Load", "queues": 4}))
        .expect(201);
    let v1 = probe_manifest(&hosts[0], "spread", "1.0.0", "");
    let v2 = probe_manifest(&hosts[1], "spread", "2.0.0", "");
    assert_eq!(deploy(&hosts[0], &v1)["version"], 1);
    // The other hosts run the same version from the bytes in the store (their data dirs never
    // saw the component); compiling it there is part of the wait.
    let running_everywhere = |version: u64, manifest_version: &str| {
        wait_for(
            &format!("v{version} running on every host"),
            Duration::from_secs(60),
            || {
                hosts
                    .iter()
                    .all(|h| {
                        let r = h.get("/v1/plugins/spread");
                        r.status == 200
                            && r.body["version"] == version
                            && r.body["manifest_version"] == manifest_version
                            && r.body["status"] == "running"
                    })
                    .then_some(())
            },
        )
    };
    running_everywhere(1, "1.0.0");
    assert_eq!(
        deploy(&hosts[1], &v2)["version"],
        2,
        "host 1 numbers after host 0's version"
    );
    running_everywhere(2, "2.0.0");
    let back = hosts[2]
        .wharf(&["plugin", "rollback", "spread", "--json"])
        .ok()
        .json();
    assert_eq!(back["version"], 1);
    running_everywhere(1, "1.0.0");
    // Messages sent to any host are committed by the plugin somewhere.
    for (i, h) in hosts.iter().enumerate() {
        for n in 0..20 {
            h.post_json(
                "/v1/topics/Load/messages",
                &json!({"tag": "commit", "body": format!("{i}-{n}")}),
            )
            .expect(200);
        }
    }
    // Each host's plugin commits the messages of the queues it holds; together, all 60.
    wait_for("every message committed", Duration::from_secs(60), || {
        let commits: u64 = hosts
            .iter()
            .map(|h| {
                h.get("/v1/plugins/spread").expect(200)["counters"]["commits"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .sum();
        (commits >= 60).then_some(())
    });
    hosts[0]
        .wharf(&["plugin", "remove", "spread", "--json"])
        .ok();
    wait_for("removed on every host", Duration::from_secs(10), || {
        hosts
            .iter()
            .all(|h| h.get("/v1/plugins/spread").status == 404)
            .then_some(())
    });
    for h in &mut hosts {
        h.stop();
    }
}
