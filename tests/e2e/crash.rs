//! Crash safety against the real binary: `kill -9` under load, and a damaged log tail.
//!
//! The promise under test (spec "Sending"): once a sync send is acknowledged the message is never
//! lost; a restart after any crash recovers by itself and never serves damaged data.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde_json::{Value, json};

use crate::foundation::{get_message, id_of, items, range_all, send};
use crate::harness::{Api, Server, ServerOpts, create_topic, wait_for};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// One acknowledged message: what the receipt said and what was sent.
#[derive(Debug, Clone)]
struct Acked {
    id: String,
    queue_id: u64,
    queue_offset: u64,
    body: String,
}

/// Sends from `threads` threads until `stop`; records every acknowledged message.
fn load(
    base: String,
    topic: &'static str,
    threads: usize,
    tag: String,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
) -> Vec<thread::JoinHandle<()>> {
    (0..threads)
        .map(|t| {
            let (base, tag, stop, acked) = (base.clone(), tag.clone(), stop.clone(), acked.clone());
            thread::spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .unwrap();
                let mut rng = rand::rng();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let size = if rng.random_bool(0.5) {
                        1
                    } else {
                        rng.random_range(2..=8)
                    };
                    let bodies: Vec<String> = (0..size)
                        .map(|_| {
                            n += 1;
                            let pad = "p".repeat(rng.random_range(0..2000));
                            format!("{tag}-t{t}-n{n}-{pad}")
                        })
                        .collect();
                    let payload = if size == 1 {
                        json!({"keys": [format!("{tag}-t{t}")], "body": bodies[0]})
                    } else {
                        Value::Array(
                            bodies
                                .iter()
                                .map(|b| json!({"keys": [format!("{tag}-t{t}")], "body": b}))
                                .collect(),
                        )
                    };
                    let res = http
                        .post(format!("{base}/v1/topics/{topic}/messages"))
                        .json(&payload)
                        .send();
                    let Ok(resp) = res else {
                        // The server is gone (killed); the main thread stops us next.
                        continue;
                    };
                    if !resp.status().is_success() {
                        continue;
                    }
                    // A receipt only counts once the whole answer arrived.
                    let Ok(v) = resp.json::<Value>() else {
                        continue;
                    };
                    let receipts = match v {
                        Value::Array(a) => a,
                        one => vec![one],
                    };
                    assert_eq!(receipts.len(), bodies.len(), "one receipt per message");
                    let mut g = acked.lock().unwrap();
                    for (r, body) in receipts.iter().zip(bodies) {
                        g.push(Acked {
                            id: r["message_id"].as_str().unwrap().to_string(),
                            queue_id: r["queue_id"].as_u64().unwrap(),
                            queue_offset: r["queue_offset"].as_u64().unwrap(),
                            body,
                        });
                    }
                }
            })
        })
        .collect()
}

/// Every acknowledged message is there by id (same body, queue, offset) and in the range scan.
fn verify_all(api: &Api, topic: &str, acked: &[Acked], t0: u64) {
    for a in acked {
        let r = api.get(&format!("/v1/messages/{}", a.id));
        assert_eq!(r.status, 200, "acknowledged {} lost: {}", a.id, r.text);
        assert_eq!(r.body["body"], a.body.as_str(), "{} body", a.id);
        assert_eq!(r.body["queue_id"], a.queue_id, "{} queue", a.id);
        assert_eq!(r.body["queue_offset"], a.queue_offset, "{} offset", a.id);
    }
    let all = range_all(api, topic, t0 - 1000, now_ms() + 60_000, 1000);
    let ids: Vec<String> = all
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_string())
        .collect();
    let uniq: HashSet<&String> = ids.iter().collect();
    assert_eq!(uniq.len(), ids.len(), "range scan lists each message once");
    for a in acked {
        assert!(uniq.contains(&a.id), "{} missing from the range scan", a.id);
    }
}

#[test]
fn kill9_under_load_loses_no_acknowledged_message() {
    let mut s = Server::start_default();
    create_topic(s.api(), "Crash", 8);
    let t0 = now_ms();
    let mut all: Vec<Acked> = Vec::new();
    let mut rng = rand::rng();
    for round in 0..4 {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let senders = load(
            s.base_url().to_string(),
            "Crash",
            8,
            format!("r{round}"),
            stop.clone(),
            acked.clone(),
        );
        wait_for("some acknowledged sends", Duration::from_secs(60), || {
            (acked.lock().unwrap().len() >= 50).then_some(())
        });
        // Kill at a random moment of the load, not at a quiet point.
        let delay_ms = rng.random_range(0..800);
        thread::sleep(Duration::from_millis(delay_ms));
        s.kill9();
        eprintln!("round {round}: killed {delay_ms} ms after the 50th acknowledgement");
        stop.store(true, Ordering::Relaxed);
        for h in senders {
            h.join().expect("sender thread");
        }
        all.extend(acked.lock().unwrap().drain(..));

        s.restart();
        verify_all(s.api(), "Crash", &all, t0);

        // No id and no (queue, offset) is ever handed out twice, across crashes.
        let ids: HashSet<&str> = all.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids.len(), all.len(), "a message id was reused");
        let slots: HashSet<(u64, u64)> = all.iter().map(|a| (a.queue_id, a.queue_offset)).collect();
        assert_eq!(slots.len(), all.len(), "a queue offset was reused");
    }
    eprintln!(
        "{} acknowledged messages survived 4 kill -9 rounds",
        all.len()
    );
    // The host keeps working after the last recovery.
    let r = send(s.api(), "Crash", &json!({"body": "after the storm"}));
    assert_eq!(
        get_message(s.api(), r["message_id"].as_str().unwrap())["body"],
        "after the storm"
    );
}

/// How the tail of the newest segment is damaged.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// A torn write: the last bytes never reached the disk.
    Truncate,
    /// Random bytes after the last record.
    Garbage,
    /// Zeros after the last record (preallocated or sparse tail).
    Zeros,
    /// One flipped byte inside the last record.
    FlipLastRecord,
}

/// The newest log segment file of a stopped server.
///
/// The embedded store keeps its message log as numbered segment files in one directory
/// (see host/src/store/embedded); the newest is the highest-numbered file there. This is the one
/// place these tests know the on-disk layout.
fn newest_segment(data_dir: &Path) -> PathBuf {
    let mut candidates: Vec<PathBuf> = Vec::new();
    let mut stack = vec![data_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if is_segment(&p) {
                candidates.push(p);
            }
        }
    }
    candidates.sort_by_key(|p| segment_number(p));
    candidates.pop().unwrap_or_else(|| {
        panic!(
            "no log segment under {}: {:?}",
            data_dir.display(),
            tree(data_dir)
        )
    })
}

fn is_segment(p: &Path) -> bool {
    let in_log_dir = p
        .parent()
        .and_then(|d| d.file_name())
        .and_then(|n| n.to_str())
        .is_some_and(|n| matches!(n, "log" | "commitlog" | "segments"));
    in_log_dir && segment_number(p).is_some()
}

fn segment_number(p: &Path) -> Option<u64> {
    let stem = p.file_stem()?.to_str()?;
    stem.parse().ok()
}

fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                let p = e.path();
                out.push(p.strip_prefix(dir).unwrap_or(&p).display().to_string());
                if p.is_dir() {
                    stack.push(p);
                }
            }
        }
    }
    out
}

fn damage(seg: &Path, how: Damage) {
    let len = std::fs::metadata(seg).unwrap().len();
    match how {
        Damage::Truncate => {
            let f = OpenOptions::new().write(true).open(seg).unwrap();
            f.set_len(len - 7).unwrap();
        }
        Damage::Garbage => {
            let mut f = OpenOptions::new().append(true).open(seg).unwrap();
            let mut rng = rand::rng();
            let junk: Vec<u8> = (0..1000).map(|_| rng.random()).collect();
            f.write_all(&junk).unwrap();
        }
        Damage::Zeros => {
            let mut f = OpenOptions::new().append(true).open(seg).unwrap();
            f.write_all(&[0u8; 8192]).unwrap();
        }
        Damage::FlipLastRecord => {
            let mut bytes = std::fs::read(seg).unwrap();
            // Find the last record's body text near the end and flip one of its bytes.
            let needle = b"LASTBODY";
            let at = bytes
                .windows(needle.len())
                .rposition(|w| w == needle)
                .expect("last body in the newest segment");
            bytes[at + 3] ^= 0x20;
            std::fs::write(seg, bytes).unwrap();
        }
    }
}

#[test]
fn damaged_log_tail_is_recovered() {
    for (how, hard_stop) in [
        (Damage::Truncate, true),
        (Damage::Garbage, false),
        (Damage::Zeros, true),
        (Damage::FlipLastRecord, false),
    ] {
        damaged_tail_case(how, hard_stop);
    }
}

fn damaged_tail_case(how: Damage, hard_stop: bool) {
    let mut s = Server::start(ServerOpts::default());
    create_topic(s.api(), "Torn", 2);
    let t0 = now_ms();
    let mut sent = Vec::new();
    for i in 0..50 {
        let body = if i == 49 {
            format!("LASTBODY-{}", "z".repeat(300))
        } else {
            format!("{i}-{}", "b".repeat(300))
        };
        let r = send(s.api(), "Torn", &json!({"keys": ["torn"], "body": body}));
        sent.push((r["message_id"].as_str().unwrap().to_string(), body));
    }
    if hard_stop {
        s.kill9();
    } else {
        s.stop();
    }
    let seg = newest_segment(s.data_dir());
    damage(&seg, how);

    s.restart(); // must come up by itself
    let api = s.api();
    let (last_id, last_body) = sent.last().unwrap().clone();
    for (id, body) in &sent[..49] {
        let r = api.get(&format!("/v1/messages/{id}"));
        assert_eq!(
            r.status, 200,
            "{how:?}: {id} before the damage lost: {}",
            r.text
        );
        assert_eq!(&r.body["body"], body.as_str(), "{how:?}");
    }
    let r = api.get(&format!("/v1/messages/{last_id}"));
    eprintln!(
        "{how:?} (hard stop: {hard_stop}): damaged last record → HTTP {}",
        r.status
    );
    match how {
        Damage::Garbage | Damage::Zeros => {
            assert_eq!(
                r.status, 200,
                "{how:?}: the last record was intact: {}",
                r.text
            );
            assert_eq!(r.body["body"], last_body.as_str());
        }
        Damage::Truncate | Damage::FlipLastRecord => {
            // The damaged record is dropped, or (if the damage missed its payload) served intact;
            // never served altered.
            assert!(
                r.status == 404 || (r.status == 200 && r.body["body"] == last_body.as_str()),
                "{how:?}: damaged record served as {} {}",
                r.status,
                r.text
            );
        }
    }
    // Queries do not error and list only intact messages.
    let range = range_all(api, "Torn", t0 - 1000, now_ms() + 60_000, 20);
    let bodies: HashMap<String, String> = sent.iter().cloned().collect();
    for m in &range {
        let id = m["message_id"].as_str().unwrap();
        assert_eq!(
            m["body"],
            bodies[id].as_str(),
            "{how:?}: range served altered data"
        );
    }
    assert!(range.len() >= 49, "{how:?}: range lost intact messages");
    let keyed = api.get("/v1/topics/Torn/messages?key=torn").expect(200);
    assert!(items(&keyed, "messages").len() >= 49);

    // New writes after recovery are durable across another restart (they were not appended
    // behind unreadable bytes).
    let after = send(s.api(), "Torn", &json!({"body": "after repair"}));
    let after_id = after["message_id"].as_str().unwrap().to_string();
    s.stop();
    s.restart();
    assert_eq!(
        get_message(s.api(), &after_id)["body"],
        "after repair",
        "{how:?}"
    );
    for (id, _) in &sent[..49] {
        assert_eq!(
            s.api().get(&format!("/v1/messages/{id}")).status,
            200,
            "{how:?}"
        );
    }
    let ids: BTreeSet<String> = range_all(s.api(), "Torn", t0 - 1000, now_ms() + 60_000, 1000)
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.contains(&after_id), "{how:?}");
    s.stop();
}

#[test]
fn sigterm_under_load_exits_zero_and_keeps_every_acknowledged_message() {
    let mut s = Server::start_default();
    create_topic(s.api(), "Drain", 4);
    let t0 = now_ms();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let senders = load(
        s.base_url().to_string(),
        "Drain",
        8,
        "drain".into(),
        stop.clone(),
        acked.clone(),
    );
    wait_for("some acknowledged sends", Duration::from_secs(60), || {
        (acked.lock().unwrap().len() >= 200).then_some(())
    });
    // Graceful stop in the middle of the load: in-flight sends finish or fail, exit code 0.
    s.stop();
    stop.store(true, Ordering::Relaxed);
    for h in senders {
        h.join().expect("sender thread");
    }
    let acked: Vec<Acked> = acked.lock().unwrap().drain(..).collect();
    s.restart();
    verify_all(s.api(), "Drain", &acked, t0);
}

/// The log line a host prints when a `WHARF_TEST_CRASH_AT` point kills it.
fn crashed_at(s: &Server, point: &str) -> bool {
    s.logs()
        .contains(&format!("test crash point '{point}' reached"))
}

#[test]
fn kill9_inside_a_segment_roll_loses_no_acknowledged_message() {
    // 64 KiB segments roll every few dozen sends; the third roll dies after sealing the old
    // segment and creating the new one, before the round's records are in it.
    let mut s = Server::start(
        ServerOpts::with_config("[store]\nsegment_bytes = 65536\n")
            .env("WHARF_TEST_CRASH_AT", "segment-roll:3"),
    );
    create_topic(s.api(), "Rolling", 4);
    let t0 = now_ms();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let senders = load(
        s.base_url().to_string(),
        "Rolling",
        4,
        "roll".into(),
        stop.clone(),
        acked.clone(),
    );
    s.wait_killed(Duration::from_secs(60));
    stop.store(true, Ordering::Relaxed);
    for h in senders {
        h.join().expect("sender thread");
    }
    assert!(crashed_at(&s, "segment-roll"), "{}", s.logs());
    let acked: Vec<Acked> = acked.lock().unwrap().drain(..).collect();
    assert!(!acked.is_empty(), "sends were acknowledged before the roll");
    s.remove_env("WHARF_TEST_CRASH_AT");
    s.restart();
    verify_all(s.api(), "Rolling", &acked, t0);
    // Appends go on past the crash without reusing an offset.
    let r = send(s.api(), "Rolling", &json!({"body": "after the roll"}));
    let last = acked
        .iter()
        .filter(|a| a.queue_id == r["queue_id"].as_u64().unwrap())
        .map(|a| a.queue_offset)
        .max();
    if let Some(last) = last {
        assert!(r["queue_offset"].as_u64().unwrap() > last, "{r}");
    }
    assert_eq!(
        get_message(s.api(), r["message_id"].as_str().unwrap())["body"],
        "after the roll"
    );
}

#[test]
fn kill9_inside_a_retention_pass_then_the_restart_finishes_it() {
    let base = "[store]\nsegment_bytes = 65536\nretention_hours = 1\n";
    let at = |minutes: u64| {
        format!(
            "{base}\n[testing]\nclock_offset_ms = {}\n",
            minutes * 60_000
        )
    };
    let mut s = Server::start(ServerOpts::with_config(base));
    create_topic(s.api(), "Expiring", 2);
    let batch = |s: &Server, what: &str| -> Vec<String> {
        (0..60)
            .map(|i| {
                id_of(&send(
                    s.api(),
                    "Expiring",
                    &json!({"keys": [what], "body": format!("{what}{i}:{}", "x".repeat(4000))}),
                ))
            })
            .collect()
    };
    // ~4 KB each: the old messages fill three closed segments and part of a fourth.
    let old = batch(&s, "old");
    // Half an hour later: newer messages, still young when the old ones expire.
    s.restart_with_config(at(30));
    let new = batch(&s, "new");
    // 75 minutes after the first sends, the pass at start deletes the old segments; it dies
    // right after deleting the second one.
    s.restart_until_killed(at(75), "retention:2");
    assert!(crashed_at(&s, "retention"), "{}", s.logs());
    s.restart_with_config(at(75));
    let api = s.api();
    wait_for(
        "the pass after the crash to delete the oldest message",
        Duration::from_secs(30),
        || (api.get(&format!("/v1/messages/{}", old[0])).status == 404).then_some(()),
    );
    // Each old message is wholly gone or wholly there; the ones sharing a segment with young
    // messages stay until that segment expires.
    let mut gone = 0;
    for (i, id) in old.iter().enumerate() {
        let r = api.get(&format!("/v1/messages/{id}"));
        match r.status {
            404 => gone += 1,
            200 => assert!(
                r.body["body"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("old{i}:")),
                "{id}: {}",
                r.text
            ),
            other => panic!("{id}: {other} {}", r.text),
        }
    }
    assert!(
        gone >= 30,
        "only {gone} of 60 expired messages were deleted"
    );
    for (i, id) in new.iter().enumerate() {
        let m = get_message(api, id);
        assert!(m["body"].as_str().unwrap().starts_with(&format!("new{i}:")));
    }
    // The key index and the range scan agree with what is left.
    let keyed = items(
        &api.get("/v1/topics/Expiring/messages?key=old").expect(200),
        "messages",
    );
    assert_eq!(keyed.len(), old.len() - gone, "key index after the pass");
    let listed: HashSet<String> = range_all(api, "Expiring", 0, now_ms() + 100 * 3_600_000, 50)
        .iter()
        .map(id_of)
        .collect();
    assert!(new.iter().all(|id| listed.contains(id)));
    assert!(!listed.contains(&old[0]));
    // And the host keeps taking writes.
    let r = send(api, "Expiring", &json!({"body": "after the pass"}));
    get_message(api, r["message_id"].as_str().unwrap());
}
