//! The change feed of one host: LISTEN wharf_queue for other hosts' appends and reveals, and
//! a poll of the watched queues every [`POLL_MS`] so a notification lost while the listening
//! connection was down never stalls a waiter. The same loop moves the metadata change feeds
//! of namespaces another host wrote (see `0003_meta_deletes.sql`), refreshes the timer view, the
//! size figures, the partition ahead of the clock, and the health flag behind `writable()`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::{PgListener, PgNotification};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Inner, PARTITION_MS, POLL_MS, partition_of, unbig};

/// The notification channel every round and reveal notifies.
pub const CHANNEL: &str = "wharf_queue";

/// Parses one payload: `"<queue_id> <max_offset> <topic>"` (the topic last: it may hold spaces).
pub fn parse_payload(p: &str) -> Option<(&str, u32, u64)> {
    let mut it = p.splitn(3, ' ');
    let q = it.next()?.parse().ok()?;
    let max = it.next()?.parse().ok()?;
    let topic = it.next()?;
    Some((topic, q, max))
}

async fn next_note(l: &mut Option<PgListener>) -> Result<PgNotification, sqlx::Error> {
    match l {
        Some(l) => l.recv().await,
        None => std::future::pending().await,
    }
}

async fn connect(inner: &Inner) -> Option<PgListener> {
    let mut l = match PgListener::connect_with(&inner.pool).await {
        Ok(l) => l,
        Err(e) => {
            debug!(error = %inner.redactor.redact(&e.to_string()), "cannot listen for queue notifications yet");
            return None;
        }
    };
    match l.listen(CHANNEL).await {
        Ok(()) => Some(l),
        Err(e) => {
            debug!(error = %inner.redactor.redact(&e.to_string()), "LISTEN failed");
            None
        }
    }
}

/// Runs until `stop`.
pub async fn run(inner: Arc<Inner>, stop: CancellationToken) {
    let mut listener: Option<PgListener> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(POLL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                if listener.is_none() {
                    listener = connect(&inner).await;
                }
                n += 1;
                poll(&inner, n).await;
            }
            r = next_note(&mut listener) => match r {
                Ok(note) => match parse_payload(note.payload()) {
                    Some((topic, q, max)) => inner.watches.advance(topic, q, max),
                    None => warn!(payload = note.payload(), "unreadable queue notification"),
                },
                Err(e) => {
                    debug!(error = %inner.redactor.redact(&e.to_string()), "queue notifications lost; reconnecting");
                    listener = None;
                }
            },
        }
    }
}

/// Moves the metadata feed of every watched namespace whose print changed since the last
/// round: (row count, sum of stamps) of its rows and of its delete rows (see
/// `0003_meta_deletes.sql`). The first round after a new receiver moves it too, since a change
/// may have landed between the watcher's load and this round.
async fn poll_meta(inner: &Inner) {
    {
        // A new receiver gets the first round's move even if the namespace was watched before.
        let mut prints = inner.meta_prints.lock();
        for ns in inner.meta_watches.take_fresh() {
            prints.remove(&ns);
        }
    }
    let namespaces = inner.meta_watches.watched();
    if namespaces.is_empty() {
        return;
    }
    // Sums are taken modulo 2^62 so they stay bigints; only their change matters.
    let r = sqlx::query(
        "SELECT u.ns, m.n, m.s, d.n, d.s FROM unnest($1::text[]) AS u(ns) \
         CROSS JOIN LATERAL (SELECT count(*)::int8 AS n, \
             (coalesce(sum(stamp), 0) % 4611686018427387904)::int8 AS s \
             FROM wharf_meta WHERE namespace = u.ns COLLATE \"C\") m \
         CROSS JOIN LATERAL (SELECT count(*)::int8 AS n, \
             (coalesce(sum(stamp), 0) % 4611686018427387904)::int8 AS s \
             FROM wharf_meta_deleted WHERE namespace = u.ns COLLATE \"C\") d",
    )
    .bind(&namespaces)
    .fetch_all(&inner.pool)
    .await;
    let rows = match inner.ok("polling metadata changes", r) {
        Ok(rows) => rows,
        Err(e) => {
            debug!(error = %e, "metadata poll failed");
            return;
        }
    };
    let mut moved = Vec::new();
    {
        let mut prints = inner.meta_prints.lock();
        for row in rows {
            let ns: String = row.try_get(0).unwrap_or_default();
            let print: [i64; 4] =
                std::array::from_fn(|i| row.try_get::<i64, _>(i + 1).unwrap_or(0));
            if prints.insert(ns.clone(), print) != Some(print) {
                moved.push(ns);
            }
        }
    }
    for ns in moved {
        inner.meta_watches.bump(&ns);
    }
}

/// One poll round; errors only mark the store unhealthy (the next round tries again).
async fn poll(inner: &Inner, n: u64) {
    poll_meta(inner).await;
    let (topics, queues) = inner.watches.watched();
    if !topics.is_empty() {
        let r = sqlx::query(
            "SELECT w.topic::text, w.queue_id, w.max_offset FROM wharf_queue w \
             JOIN unnest($1::text[], $2::int4[]) AS u(t, q) ON w.topic = u.t COLLATE \"C\" \
             AND w.queue_id = u.q",
        )
        .bind(&topics)
        .bind(&queues)
        .fetch_all(&inner.pool)
        .await;
        match inner.ok("polling queue maxes", r) {
            Ok(rows) => {
                for row in rows {
                    let topic: String = row.try_get(0).unwrap_or_default();
                    let q: i32 = row.try_get(1).unwrap_or(0);
                    let max: i64 = row.try_get(2).unwrap_or(0);
                    inner.watches.advance(&topic, q as u32, unbig(max));
                }
            }
            Err(e) => {
                debug!(error = %e, "queue poll failed");
                return;
            }
        }
    } else if !inner.healthy.load(Ordering::Acquire) {
        // Nothing else touches the database here: probe it so writable() recovers.
        let r = sqlx::query("SELECT 1").execute(&inner.pool).await;
        if inner.ok("probing the database", r).is_err() {
            return;
        }
    }
    // Timers other hosts stored: refresh the earliest one about once a second.
    if n.is_multiple_of(2)
        && let Err(e) = inner.refresh_timers(n.is_multiple_of(60)).await
    {
        debug!(error = %e, "timer refresh failed");
    }
    if n.is_multiple_of(20) {
        // Make the next partition before the clock reaches it, so no append waits for DDL.
        let next = partition_of(inner.clock.now_ms()) + PARTITION_MS;
        if let Err(e) = inner.ensure_partition(next).await {
            debug!(error = %e, "cannot create the next partition yet");
        }
        let r = sqlx::query("SELECT pg_database_size(current_database())")
            .fetch_one(&inner.pool)
            .await;
        if let Ok(row) = inner.ok("reading the database size", r) {
            let size: i64 = row.try_get(0).unwrap_or(0);
            inner.stats.disk_bytes.store(unbig(size), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse_and_garbage_is_refused() {
        assert_eq!(parse_payload("3 17 Trade"), Some(("Trade", 3, 17)));
        assert_eq!(parse_payload("0 1 %RETRY%G x"), Some(("%RETRY%G x", 0, 1)));
        for bad in ["", "3", "3 x T", "x 1 T", "3 17", "-1 2 T"] {
            assert_eq!(parse_payload(bad), None, "{bad}");
        }
    }
}
