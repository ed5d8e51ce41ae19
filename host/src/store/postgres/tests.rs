//! PostgreSQL-only behaviour (the shared contract runs in `conformance.rs`): open errors,
//! migrations raced by two hosts, and two hosts on one database.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sqlx::Connection;

use super::testdb::PgServer;
use super::*;
use crate::clock::ManualClock;
use crate::error::ErrorCode;
use crate::store::conformance::{RETENTION_MS, T0};
use crate::store::{Backend, PostgresConfig, open_store};

static NEXT_DB: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Creates a fresh, empty database on the shared test server and returns its URL.
async fn fresh_database() -> String {
    let name = format!(
        "t_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let server = tokio::task::spawn_blocking(PgServer::shared)
        .await
        .expect("start the test server");
    let mut c = sqlx::PgConnection::connect(&server.url("postgres"))
        .await
        .expect("connect to the test server");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut c)
        .await
        .expect("create a test database");
    let _ = c.close().await;
    server.url(&name)
}

fn config(url: &str) -> StoreConfig {
    StoreConfig {
        backend: Backend::Postgres,
        retention_hours: RETENTION_MS / 3_600_000,
        postgres: PostgresConfig {
            url: url.to_string(),
            pool_size: 8,
            statement_timeout_ms: 30_000,
        },
        ..StoreConfig::default()
    }
}

/// A store over one database, reopened over the same database after `close`.
struct Fixture {
    clock: Arc<ManualClock>,
    url: Option<String>,
}

#[async_trait::async_trait]
impl crate::store::conformance::Fixture for Fixture {
    async fn open(&mut self) -> Arc<dyn Store> {
        if self.url.is_none() {
            self.url = Some(fresh_database().await);
        }
        let url = self.url.clone().unwrap_or_default();
        let s: Arc<dyn Store> = PostgresStore::open(&config(&url), self.clock.clone())
            .await
            .unwrap();
        s
    }

    fn reopens(&self) -> bool {
        true
    }
}

/// The conformance suite's factory for the PostgreSQL store.
pub(crate) fn fixture(clock: Arc<ManualClock>) -> Box<dyn crate::store::conformance::Fixture> {
    Box::new(Fixture { clock, url: None })
}

fn msg(topic: &str, queue_id: u32, body: &str) -> NewMessage {
    NewMessage {
        topic: topic.to_string(),
        queue_id,
        tag: None,
        keys: Vec::new(),
        properties: Default::default(),
        body: Bytes::from(body.to_string()),
        born_ms: T0,
        deliver_at_ms: None,
        reconsume_times: 0,
        wire: WireInfo::default(),
    }
}

#[tokio::test]
async fn an_unreachable_database_is_service_not_available_without_the_password() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("postgres://wharf:Very%2FSecret-42@127.0.0.1:{port}/wharf");
    let e = open_store(&config(&url), ManualClock::new(T0))
        .await
        .err()
        .expect("no database listens there");
    assert_eq!(e.code, ErrorCode::ServiceNotAvailable, "{e}");
    let shown = e.to_string();
    assert!(
        !shown.contains("Very%2FSecret-42") && !shown.contains("Very/Secret-42"),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("127.0.0.1:{port}")),
        "names the database: {shown}"
    );
    assert!(shown.contains("wharf:***@"), "{shown}");

    let e = open_store(&config("postgres://u:pw@[::1"), ManualClock::new(T0))
        .await
        .err()
        .expect("a malformed url is refused");
    assert!(!e.to_string().contains(":pw@"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_migrating_at_once_both_open() {
    let url = fresh_database().await;
    let clock = ManualClock::new(T0);
    let c = config(&url);
    let (a, b) = tokio::join!(
        PostgresStore::open(&c, clock.clone()),
        PostgresStore::open(&c, clock.clone())
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let m = a.append(vec![msg("Mig", 0, "x")]).await.unwrap();
    assert_eq!(
        b.get(m[0].id).await.unwrap().map(|m| m.body),
        Some(Bytes::from("x"))
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Two stores ("hosts") over one fresh database, on one clock.
async fn two_hosts() -> (Arc<ManualClock>, Arc<PostgresStore>, Arc<PostgresStore>) {
    let url = fresh_database().await;
    let clock = ManualClock::new(T0);
    let a = PostgresStore::open(&config(&url), clock.clone())
        .await
        .unwrap();
    let b = PostgresStore::open(&config(&url), clock.clone())
        .await
        .unwrap();
    (clock, a, b)
}

/// A metadata write, update or delete on one host moves the other host's change feed of that
/// namespace (and not of another), including a delete and re-create of the same key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_changes_reach_the_other_host() {
    let (_clock, a, b) = two_hosts().await;
    let mut topics = b.watch_meta("topics");
    let mut other = b.watch_meta("elsewhere");
    let moved = |rx: &mut watch::Receiver<u64>| {
        let seen = *rx.borrow_and_update();
        let mut rx = rx.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| *v > seen))
                .await
                .expect("the feed moves within the poll period")
                .map(|_| ())
                .unwrap();
        }
    };
    // The first poll of a namespace moves it (a change may precede the watcher's load).
    for rx in [&mut topics, &mut other] {
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| *v >= 1))
            .await
            .expect("the first poll moves the feed")
            .map(|_| ())
            .unwrap();
    }
    let steps: [(&str, Option<&[u8]>); 4] = [
        ("T1", Some(b"v1")),
        ("T1", Some(b"v2")),
        ("T1", None),
        ("T1", Some(b"v1")),
    ];
    for (key, value) in steps {
        let wait = moved(&mut topics);
        match value {
            Some(v) => a.meta_put("topics", key, v.to_vec()).await.unwrap(),
            None => a.meta_delete("topics", key).await.unwrap(),
        }
        wait.await;
    }
    let before = *other.borrow_and_update();
    // A full poll period after the last write elsewhere, the other namespace has not moved.
    let wait = moved(&mut topics);
    a.meta_put("topics", "T2", b"x".to_vec()).await.unwrap();
    wait.await;
    assert_eq!(
        *other.borrow(),
        before,
        "another namespace's feed stays put"
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// A namespace watched again moves its new receiver on the first poll, even when a row was
/// written and deleted in between (the namespace's print is what it was): a waiter for a key
/// to go reads it again after that move, so it never misses the delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_watched_again_moves_on_the_first_poll() {
    let (_clock, a, b) = two_hosts().await;
    let first_poll = |mut rx: watch::Receiver<u64>| async move {
        let seen = *rx.borrow_and_update();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| *v > seen))
            .await
            .expect("the first poll moves the feed")
            .map(|_| ())
            .unwrap();
    };
    first_poll(b.watch_meta("notices")).await;
    a.meta_put("notices", "k", b"v".to_vec()).await.unwrap();
    let again = b.watch_meta("notices");
    a.meta_delete("notices", "k").await.unwrap();
    first_poll(again).await;
    assert!(b.meta_get("notices", "k").await.unwrap().is_none());
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// A key one host creates and another deletes before the first host's next poll still moves
/// the first host's feed (the delete row moves the print), so a cache there drops the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_created_here_and_deleted_there_between_polls_moves_the_feed() {
    let (_clock, a, b) = two_hosts().await;
    for round in 0..3 {
        let mut rx = a.watch_meta("retained");
        let seen = *rx.borrow_and_update();
        // The first poll after subscribing settles the print this host compares with.
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| *v > seen))
            .await
            .expect("the first poll moves the feed")
            .unwrap();
        a.meta_put("retained", "state", b"on".to_vec())
            .await
            .unwrap();
        let mine = *rx.borrow_and_update();
        b.meta_delete("retained", "state").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| *v > mine))
            .await
            .unwrap_or_else(|_| {
                panic!("round {round}: the other host's delete never moved the feed")
            })
            .unwrap();
        assert!(a.meta_get("retained", "state").await.unwrap().is_none());
    }
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Two hosts appending to one queue share its offsets without gaps, and each host's watch
/// wakes for the other's appends (NOTIFY, or the poll behind it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_share_offsets_and_wake_each_other() {
    let (_clock, a, b) = two_hosts().await;
    let mut wb = b.watch_queue("Shared", 0);
    a.append(vec![msg("Shared", 0, "first")]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), wb.wait_for(|m| *m >= 1))
        .await
        .unwrap()
        .unwrap();

    let mut tasks = Vec::new();
    for (i, s) in [a.clone(), b.clone()].into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut offs = Vec::new();
            for n in 0..50 {
                let r = s
                    .append(vec![msg("Shared", 0, &format!("{i}-{n}"))])
                    .await
                    .unwrap();
                offs.push(r[0].queue_offset.unwrap());
            }
            offs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..101).collect::<Vec<u64>>());
    let r = b.read_queue("Shared", 0, 0, 200, None).await.unwrap();
    let offs: Vec<_> = r.messages.iter().filter_map(|m| m.queue_offset).collect();
    assert_eq!(offs, (0..101).collect::<Vec<u64>>());
    tokio::time::timeout(Duration::from_secs(10), wb.wait_for(|m| *m == 101))
        .await
        .unwrap()
        .unwrap();
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// A lease taken on one host fences the other host's commits: the lease rows live in the
/// database, not in either process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_fence_across_hosts() {
    let (clock, a, b) = two_hosts().await;
    let k = LeaseKey {
        group: "G".into(),
        topic: "T".into(),
        queue_id: 0,
    };
    let la = a.lease_acquire(&k, "host-a", 1_000).await.unwrap().unwrap();
    assert!(
        b.lease_acquire(&k, "host-b", 1_000)
            .await
            .unwrap()
            .is_none()
    );
    clock.advance(1_000);
    let lb = b.lease_acquire(&k, "host-b", 1_000).await.unwrap().unwrap();
    assert_eq!(lb.epoch, la.epoch + 1);
    let off = |o| CommittedOffset {
        topic: "T".into(),
        queue_id: 0,
        offset: o,
    };
    assert_eq!(
        a.commit_offsets_fenced("G", &[(off(5), la.epoch)])
            .await
            .unwrap(),
        [false]
    );
    assert_eq!(
        b.commit_offsets_fenced("G", &[(off(6), lb.epoch)])
            .await
            .unwrap(),
        [true]
    );
    assert_eq!(a.load_offsets("G").await.unwrap(), [off(6)]);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Input PostgreSQL text cannot hold is refused with a message, alone: a batch sharing the
/// round still lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_in_a_key_is_refused_alone() {
    let url = fresh_database().await;
    let s = PostgresStore::open(&config(&url), ManualClock::new(T0))
        .await
        .unwrap();
    let mut bad = msg("Nul", 0, "b");
    bad.keys = vec!["a\0b".into()];
    let (bad, good) = tokio::join!(s.append(vec![bad]), s.append(vec![msg("Nul", 0, "g")]));
    let e = bad.unwrap_err();
    assert_eq!(e.code, ErrorCode::MessageIllegal);
    assert!(e.message.contains("NUL"), "{e}");
    assert_eq!(good.unwrap()[0].queue_offset, Some(0));
    s.close().await.unwrap();
}

/// While the database is down, appends fail with SERVICE_NOT_AVAILABLE and `writable()` says
/// so; once it is back the store recovers by itself and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fails_writes_and_the_store_recovers_by_itself() {
    let pg = Arc::new(
        tokio::task::spawn_blocking(PgServer::private)
            .await
            .unwrap(),
    );
    let s = PostgresStore::open(&config(&pg.url("postgres")), ManualClock::new(T0))
        .await
        .unwrap();
    let before = s.append(vec![msg("Outage", 0, "before")]).await.unwrap();
    let p = pg.clone();
    tokio::task::spawn_blocking(move || p.stop()).await.unwrap();

    let e = s
        .append(vec![msg("Outage", 0, "during")])
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ServiceNotAvailable, "{e}");
    assert!(!e.message.contains("pw-not-checked"), "{e}");
    assert!(!s.writable(), "an unreachable database is not writable");

    let p = pg.clone();
    tokio::task::spawn_blocking(move || p.start())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let after = loop {
        match s.append(vec![msg("Outage", 0, "after")]).await {
            Ok(a) => break a,
            Err(e) => {
                assert_eq!(e.code, ErrorCode::ServiceNotAvailable, "{e}");
                assert!(tokio::time::Instant::now() < deadline, "no recovery: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(s.writable());
    assert_eq!(before[0].queue_offset, Some(0));
    assert_eq!(
        after[0].queue_offset,
        Some(1),
        "the failed append took no offset"
    );
    let r = s.read_queue("Outage", 0, 0, 10, None).await.unwrap();
    let bodies: Vec<_> = r.messages.iter().map(|m| m.body.clone()).collect();
    assert_eq!(bodies, [Bytes::from("before"), Bytes::from("after")]);
    s.close().await.unwrap();
}

/// While the database holds a round up (here a transaction locking the queue's row), appends
/// queue up to `[store] write_queue_requests`; the next fails at once with SYSTEM_BUSY and
/// leaves nothing behind, and everything accepted is stored once the lock goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_write_queue_refuses_with_system_busy_and_stores_nothing_of_it() {
    let url = fresh_database().await;
    let clock = ManualClock::new(T0);
    let c = StoreConfig {
        write_queue_requests: 3,
        ..config(&url)
    };
    let s = PostgresStore::open(&c, clock.clone()).await.unwrap();
    s.append(vec![msg("Busy", 0, "before")]).await.unwrap();
    let mut locker = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("SELECT 1 FROM wharf_queue WHERE topic = 'Busy' FOR UPDATE")
        .execute(&mut locker)
        .await
        .unwrap();
    let mut held = Vec::new();
    for i in 0..3 {
        let s = s.clone();
        held.push(tokio::spawn(async move {
            s.append(vec![msg("Busy", 0, &format!("held {i}"))]).await
        }));
    }
    tokio::time::timeout(Duration::from_secs(10), async {
        while s.inner.budget.in_use().0 < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("three appends wait behind the lock");
    let e = s.append(vec![msg("Busy", 0, "refused")]).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::SystemBusy, "{}", e.message);
    assert!(e.message.contains("write_queue_requests"), "{}", e.message);
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    for h in held {
        h.await.unwrap().unwrap();
    }
    assert_eq!(s.inner.budget.in_use(), (0, 0), "every permit came back");
    s.append(vec![msg("Busy", 0, "after")]).await.unwrap();
    let page = s.read_queue("Busy", 0, 0, 10, None).await.unwrap();
    let mut bodies: Vec<String> = page
        .messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    bodies.sort();
    assert_eq!(bodies, ["after", "before", "held 0", "held 1", "held 2"]);
    s.close().await.unwrap();
}
