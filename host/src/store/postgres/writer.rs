//! Appends coalesced into rounds, timer reveals and retention: everything that assigns queue
//! offsets or drops partitions.
//!
//! A round is ONE statement (an implicit transaction): it bumps each touched queue's
//! `max_offset` (locking those rows in a fixed order, so two hosts never deadlock), takes log
//! positions from the sequence, inserts every message with `INSERT ... SELECT FROM unnest`,
//! and sends one NOTIFY per queue. Its commit is the durability point of every append in it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, Row};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    FlushMode, Inner, PARTITION_MS, ROW_FORMAT, big, no_nul, partition_name, partition_of,
    tag_hash_i32, unbig,
};
use crate::error::{Result, WharfError};
use crate::model::{Appended, MessageId, NewMessage};
use crate::store::{QueuePermit, RetentionReport};

/// Longest a round waits for the senders the last one answered, in µs.
const LINGER_MAX_US: u64 = 2_000;
/// Messages per round at most (bounded statement size; the rest waits for the next round).
const ROUND_MESSAGES: usize = 4_096;
/// Bytes per round at most.
const ROUND_BYTES: u64 = 8 << 20;

/// One `append` call waiting for its round.
pub struct Job {
    batch: Vec<NewMessage>,
    properties: Vec<Vec<u8>>,
    bytes: u64,
    started: Instant,
    reply: Option<oneshot::Sender<Result<Vec<Appended>>>>,
    /// Given back just before the reply, so a caller that has its answer sees the budget free.
    permit: Option<QueuePermit>,
}

impl Job {
    /// Validates and encodes a batch on the caller's task: a batch the store cannot take
    /// fails here, whole, before it could share a round with others.
    pub fn prepare(batch: Vec<NewMessage>) -> Result<Job> {
        let mut properties = Vec::with_capacity(batch.len());
        let mut bytes = 0u64;
        for m in &batch {
            if m.topic.is_empty() {
                return Err(WharfError::illegal("a message needs a topic"));
            }
            for (what, s) in [("the topic", m.topic.as_str())]
                .into_iter()
                .chain(m.tag.as_deref().map(|t| ("the tag", t)))
                .chain(m.keys.iter().map(|k| ("a key", k.as_str())))
            {
                no_nul(what, s).map_err(|e| WharfError::illegal(e.message))?;
            }
            let mut p = Vec::new();
            for (k, v) in &m.properties {
                wharf_codec::properties::check_pair(k, v)?;
                wharf_codec::properties::encode_pair(&mut p, k, v);
            }
            bytes += (m.body.len() + p.len() + m.topic.len()) as u64;
            properties.push(p);
        }
        Ok(Job {
            batch,
            properties,
            bytes,
            started: Instant::now(),
            reply: None,
            permit: None,
        })
    }

    /// Encoded bytes of the batch (what it holds of the write-queue budget).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The job with where its answer goes and its share of the write-queue budget.
    pub fn with_reply(
        mut self,
        reply: oneshot::Sender<Result<Vec<Appended>>>,
        permit: QueuePermit,
    ) -> Job {
        self.reply = Some(reply);
        self.permit = Some(permit);
        self
    }

    fn answer(&mut self, r: Result<Vec<Appended>>) {
        self.permit.take();
        if let Some(tx) = self.reply.take() {
            let _ = tx.send(r);
        }
    }
}

/// The writer task: takes everything queued (up to a round's limits), stores it, answers.
pub async fn run(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Job>, stop: CancellationToken) {
    let mut pace = Pace::default();
    loop {
        let first = tokio::select! {
            j = rx.recv() => j,
            _ = stop.cancelled() => rx.try_recv().ok(),
        };
        let Some(first) = first else { return };
        let mut round = Round::default();
        round.push(first);
        while round.has_room() {
            match rx.try_recv() {
                Ok(j) => round.push(j),
                Err(_) => break,
            }
        }
        if inner.flush == FlushMode::Sync && !stop.is_cancelled() {
            pace.linger(&mut rx, &mut round).await;
        }
        let started = Instant::now();
        pace.replied_at = Some(store_round(&inner, &mut round.jobs).await);
        pace.answered = round.jobs.len();
        let us = started.elapsed().as_micros() as u64;
        pace.commit_ema_us = (pace.commit_ema_us * 7 + us) / 8;
    }
}

/// The jobs of one round being gathered.
#[derive(Default)]
struct Round {
    jobs: Vec<Job>,
    messages: usize,
    bytes: u64,
}

impl Round {
    fn push(&mut self, j: Job) {
        self.messages += j.batch.len();
        self.bytes += j.bytes;
        self.jobs.push(j);
    }

    fn has_room(&self) -> bool {
        self.messages < ROUND_MESSAGES && self.bytes < ROUND_BYTES
    }
}

/// What the last round tells the next one.
#[derive(Default)]
struct Pace {
    /// Jobs the last round answered.
    answered: usize,
    /// When it answered them.
    replied_at: Option<Instant>,
    /// Moving average of a round's time to commit.
    commit_ema_us: u64,
}

impl Pace {
    /// Senders answered by the last round usually come straight back; when only some of them
    /// are here yet, waiting a fraction of a commit for the rest lets one commit cover them
    /// all instead of splitting the senders into two alternating half-size rounds (as the
    /// embedded store's writer does for its fsync).
    async fn linger(&self, rx: &mut mpsc::UnboundedReceiver<Job>, round: &mut Round) {
        let Some(since) = self.replied_at else { return };
        if self.answered < 2 {
            return;
        }
        let mut back = round.jobs.iter().filter(|j| j.started >= since).count();
        let budget = Duration::from_micros((self.commit_ema_us / 4).min(LINGER_MAX_US));
        let deadline = tokio::time::Instant::now() + budget;
        while back < self.answered && round.has_room() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(j)) => {
                    back += usize::from(j.started >= since);
                    round.push(j);
                }
                _ => return,
            }
        }
    }
}

/// Stores `jobs` in one round; if the round fails for a reason other than an unreachable
/// database, each job is retried alone so one bad batch cannot fail its neighbours.
async fn store_round(inner: &Inner, jobs: &mut [Job]) -> Instant {
    let result = round(inner, jobs).await;
    let replied_at = Instant::now();
    match result {
        Ok(answers) => {
            for (j, a) in jobs.iter_mut().zip(answers) {
                inner
                    .stats
                    .append_latency
                    .record(j.started.elapsed().as_micros() as u64);
                j.answer(Ok(a));
            }
        }
        Err(e) if jobs.len() > 1 && e.code != crate::error::ErrorCode::ServiceNotAvailable => {
            warn!(error = %e, jobs = jobs.len(), "append round failed; storing its batches one by one");
            for j in jobs.iter_mut() {
                let r = round(inner, std::slice::from_ref(j)).await;
                j.answer(r.map(|mut a| a.remove(0)));
            }
        }
        Err(e) => {
            for j in jobs.iter_mut() {
                j.answer(Err(e.clone()));
            }
        }
    }
    replied_at
}

const APPEND_SQL: &str = "\
WITH s AS (SELECT set_config('synchronous_commit', $22, true) AS v), \
c AS (SELECT * FROM unnest($18::text[], $19::int4[], $20::int8[]) AS c(topic, queue_id, cnt)), \
q AS ( \
    INSERT INTO wharf_queue AS w (topic, queue_id, max_offset) \
    SELECT topic, queue_id, cnt FROM c \
    ON CONFLICT (topic, queue_id) DO UPDATE SET max_offset = w.max_offset + EXCLUDED.max_offset \
    RETURNING w.topic, w.queue_id, w.max_offset), \
p AS (SELECT i::int8 AS i, nextval('wharf_position') AS pos \
      FROM generate_series(1, cardinality($1::text[])) AS i), \
v AS (SELECT * FROM unnest($1::text[], $2::int4[], $3::int8[], $4::text[], $5::int4[], \
        $6::int4[], $7::int4[], $8::bytea[], $9::bytea[], $10::int8[], $11::int8[], $12::int4[], \
        $13::int4[], $14::int4[], $15::text[], $16::text[]) WITH ORDINALITY \
      AS v(topic, queue_id, rank, tag, tag_hash, keys_from, keys_to, properties, body, born_ms, \
           deliver_at_ms, reconsume_times, flag, sys_flag, born_host, store_host, i)), \
m AS ( \
    INSERT INTO wharf_message (position, part_ms, stored_ms, topic, queue_id, queue_offset, tag, \
        tag_hash, keys, properties, body, born_ms, deliver_at_ms, reconsume_times, flag, sys_flag, \
        born_host, store_host, format) \
    SELECT p.pos, $21, $21, v.topic, v.queue_id, \
        CASE WHEN v.rank >= 0 THEN q.max_offset - c.cnt + v.rank END, \
        v.tag, v.tag_hash, \
        CASE WHEN v.keys_from <= v.keys_to THEN ($17::text[])[v.keys_from:v.keys_to] \
             ELSE '{}'::text[] END, \
        v.properties, v.body, v.born_ms, v.deliver_at_ms, v.reconsume_times, v.flag, v.sys_flag, \
        v.born_host, v.store_host, $23 \
    FROM v JOIN p ON p.i = v.i \
    LEFT JOIN c ON c.topic = v.topic AND c.queue_id = v.queue_id \
    LEFT JOIN q ON q.topic = v.topic COLLATE \"C\" AND q.queue_id = v.queue_id \
    RETURNING 1), \
n AS (SELECT pg_notify('wharf_queue', q.queue_id || ' ' || q.max_offset || ' ' || q.topic) FROM q) \
SELECT 'p'::text AS kind, p.i AS a, p.pos AS b, NULL::text AS topic FROM p \
UNION ALL SELECT 'q', q.queue_id::int8, q.max_offset, q.topic::text FROM q \
UNION ALL SELECT 'x', (SELECT count(*) FROM m), (SELECT count(*) FROM n), (SELECT min(v) FROM s)";

/// Arrays of one round, column by column.
#[derive(Default)]
struct Columns<'a> {
    topic: Vec<&'a str>,
    queue: Vec<i32>,
    rank: Vec<i64>,
    tag: Vec<Option<&'a str>>,
    tag_hash: Vec<i32>,
    keys_from: Vec<i32>,
    keys_to: Vec<i32>,
    properties: Vec<&'a [u8]>,
    body: Vec<&'a [u8]>,
    born: Vec<i64>,
    deliver: Vec<Option<i64>>,
    reconsume: Vec<i32>,
    flag: Vec<i32>,
    sys_flag: Vec<i32>,
    born_host: Vec<Option<String>>,
    store_host: Vec<Option<String>>,
    keys: Vec<&'a str>,
}

/// Stores every job's batch in one statement; answers per job, in input order.
async fn round(inner: &Inner, jobs: &[Job]) -> Result<Vec<Vec<Appended>>> {
    let now = inner.clock.now_ms();
    let started = Instant::now();
    let mut cols = Columns::default();
    let mut counts: BTreeMap<(&str, u32), i64> = BTreeMap::new();
    let mut held: Vec<u64> = Vec::new();
    let mut bytes = 0u64;
    for j in jobs {
        bytes += j.bytes;
        for (m, p) in j.batch.iter().zip(&j.properties) {
            let visible = m.deliver_at_ms.is_none_or(|d| d <= now);
            let rank = if visible {
                let c = counts.entry((m.topic.as_str(), m.queue_id)).or_insert(0);
                *c += 1;
                *c - 1
            } else {
                held.extend(m.deliver_at_ms);
                -1
            };
            cols.topic.push(&m.topic);
            cols.queue.push(m.queue_id as i32);
            cols.rank.push(rank);
            cols.tag.push(m.tag.as_deref());
            cols.tag_hash.push(tag_hash_i32(m.tag.as_deref()));
            // PostgreSQL arrays are 1-based; an empty key list is from > to.
            cols.keys_from.push(cols.keys.len() as i32 + 1);
            cols.keys.extend(m.keys.iter().map(String::as_str));
            cols.keys_to.push(cols.keys.len() as i32);
            cols.properties.push(p);
            cols.body.push(&m.body);
            cols.born.push(big(m.born_ms));
            cols.deliver.push(m.deliver_at_ms.map(big));
            cols.reconsume.push(m.reconsume_times as i32);
            cols.flag.push(m.wire.flag);
            cols.sys_flag.push(m.wire.sys_flag);
            cols.born_host.push(m.wire.born_host.map(|a| a.to_string()));
            cols.store_host
                .push(m.wire.store_host.map(|a| a.to_string()));
        }
    }
    // Sorted (BTreeMap order), so every round locks queue rows in the same order.
    let q_topic: Vec<&str> = counts.keys().map(|k| k.0).collect();
    let q_queue: Vec<i32> = counts.keys().map(|k| k.1 as i32).collect();
    let q_count: Vec<i64> = counts.values().copied().collect();
    let sync = match inner.flush {
        FlushMode::Sync => "on",
        FlushMode::Async => "off",
    };

    let part = partition_of(now);
    inner.ensure_partition(part).await?;
    let mut attempt = 0;
    let rows = loop {
        let r = sqlx::query(APPEND_SQL)
            .bind(&cols.topic)
            .bind(&cols.queue)
            .bind(&cols.rank)
            .bind(&cols.tag)
            .bind(&cols.tag_hash)
            .bind(&cols.keys_from)
            .bind(&cols.keys_to)
            .bind(&cols.properties)
            .bind(&cols.body)
            .bind(&cols.born)
            .bind(&cols.deliver)
            .bind(&cols.reconsume)
            .bind(&cols.flag)
            .bind(&cols.sys_flag)
            .bind(&cols.born_host)
            .bind(&cols.store_host)
            .bind(&cols.keys)
            .bind(&q_topic)
            .bind(&q_queue)
            .bind(&q_count)
            .bind(big(now))
            .bind(sync)
            .bind(ROW_FORMAT)
            .fetch_all(&inner.pool)
            .await;
        match r {
            // Another host's retention dropped the partition we knew of: make it again.
            Err(sqlx::Error::Database(d))
                if attempt == 0 && d.code().as_deref() == Some("23514") =>
            {
                attempt += 1;
                inner.partitions.lock().remove(&part);
                inner.ensure_partition(part).await?;
            }
            r => break inner.ok("appending messages", r)?,
        }
    };
    inner
        .stats
        .commit_latency
        .record(started.elapsed().as_micros() as u64);

    let mut positions: Vec<(i64, i64)> = Vec::new();
    let mut max: HashMap<(String, u32), u64> = HashMap::new();
    for row in &rows {
        let kind: String = row.try_get(0).unwrap_or_default();
        let a: i64 = row.try_get(1).unwrap_or(0);
        let b: i64 = row.try_get(2).unwrap_or(0);
        match kind.as_str() {
            "p" => positions.push((a, b)),
            "q" => {
                let topic: String = row.try_get(3).unwrap_or_default();
                max.insert((topic, a as u32), unbig(b));
            }
            _ => {}
        }
    }
    let n = cols.topic.len();
    if positions.len() != n {
        return Err(WharfError::internal(format!(
            "the append statement returned {} positions for {n} messages",
            positions.len()
        )));
    }
    // Positions grow in input order within a round (the id order matches the offset order).
    let mut pos: Vec<i64> = positions.iter().map(|p| p.1).collect();
    pos.sort_unstable();

    let mut answers = Vec::with_capacity(jobs.len());
    let mut i = 0;
    for j in jobs {
        let mut out = Vec::with_capacity(j.batch.len());
        for m in &j.batch {
            let rank = cols.rank[i];
            let queue_offset = if rank >= 0 {
                let key = (m.topic.clone(), m.queue_id);
                let cnt = counts
                    .get(&(m.topic.as_str(), m.queue_id))
                    .copied()
                    .unwrap_or(0);
                let top = max.get(&key).copied().ok_or_else(|| {
                    WharfError::internal("the append statement lost a queue's new max offset")
                })?;
                Some(top - unbig(cnt) + unbig(rank))
            } else {
                None
            };
            out.push(Appended {
                id: MessageId::new(now, inner.node, unbig(pos[i])),
                queue_id: m.queue_id,
                queue_offset,
                stored_ms: now,
            });
            i += 1;
        }
        answers.push(out);
    }

    let messages: usize = jobs.iter().map(|j| j.batch.len()).sum();
    inner
        .stats
        .appended_messages
        .fetch_add(messages as u64, Ordering::Relaxed);
    inner
        .stats
        .appended_bytes
        .fetch_add(bytes, Ordering::Relaxed);
    if !held.is_empty() {
        let mut t = inner.timers.lock();
        t.pending += held.len() as u64;
        let first = held.iter().copied().min();
        t.next = match (t.next, first) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        t.generation += 1;
    }
    for ((topic, q), top) in max {
        inner.watches.advance(&topic, q, top);
    }
    Ok(answers)
}

const REVEAL_SQL: &str = "\
WITH due AS ( \
    SELECT position, part_ms, topic, queue_id, deliver_at_ms FROM wharf_message \
    WHERE queue_offset IS NULL AND deliver_at_ms <= $1 \
    ORDER BY deliver_at_ms, position LIMIT $2 FOR UPDATE SKIP LOCKED), \
r AS (SELECT due.*, row_number() OVER (PARTITION BY topic, queue_id \
        ORDER BY deliver_at_ms, position) - 1 AS rank FROM due), \
c AS (SELECT topic, queue_id, count(*) AS cnt FROM due GROUP BY topic, queue_id), \
q AS ( \
    INSERT INTO wharf_queue AS w (topic, queue_id, max_offset) \
    SELECT topic, queue_id, cnt FROM c ORDER BY topic, queue_id \
    ON CONFLICT (topic, queue_id) DO UPDATE SET max_offset = w.max_offset + EXCLUDED.max_offset \
    RETURNING w.topic, w.queue_id, w.max_offset), \
u AS ( \
    UPDATE wharf_message m SET queue_offset = q.max_offset - c.cnt + r.rank, part_ms = $1 \
    FROM r JOIN c ON c.topic = r.topic AND c.queue_id = r.queue_id \
           JOIN q ON q.topic = r.topic AND q.queue_id = r.queue_id \
    WHERE m.position = r.position AND m.part_ms = r.part_ms \
    RETURNING 1), \
n AS (SELECT pg_notify('wharf_queue', q.queue_id || ' ' || q.max_offset || ' ' || q.topic) FROM q) \
SELECT q.topic::text, q.queue_id, q.max_offset, (SELECT count(*) FROM u), (SELECT count(*) FROM n) \
FROM q";

/// Makes due timers visible: locks up to `max` of them (skipping rows another host is
/// revealing), gives them the next offsets of their queues and moves them into the current
/// partition, in one statement.
pub async fn reveal(inner: &Inner, now_ms: u64, max: usize) -> Result<usize> {
    inner.ensure_partition(partition_of(now_ms)).await?;
    let r = sqlx::query(REVEAL_SQL)
        .bind(big(now_ms))
        .bind(big(max as u64))
        .fetch_all(&inner.pool)
        .await;
    let rows = match r {
        // Another host moved a row we were about to lock: its reveal did the work.
        Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("40001") => {
            debug!("timer reveal raced another host; retrying on the next tick");
            return Ok(0);
        }
        r => inner.ok("revealing timers", r)?,
    };
    let mut moved = 0usize;
    for row in &rows {
        let topic: String = row.try_get(0).unwrap_or_default();
        let q: i32 = row.try_get(1).unwrap_or(0);
        let top: i64 = row.try_get(2).unwrap_or(0);
        moved = unbig(row.try_get(3).unwrap_or(0)) as usize;
        inner.watches.advance(&topic, q as u32, unbig(top));
    }
    {
        let mut t = inner.timers.lock();
        t.pending = t.pending.saturating_sub(moved as u64);
        t.generation += 1;
    }
    // The earliest pending timer is now another one; a change racing this read keeps the
    // earlier of the two views (an early hint costs one empty reveal, a late one a delay).
    for _ in 0..3 {
        let generation = inner.timers.lock().generation;
        let r =
            sqlx::query("SELECT min(deliver_at_ms) FROM wharf_message WHERE queue_offset IS NULL")
                .fetch_one(&inner.pool)
                .await;
        let row = inner.ok("reading pending timers", r)?;
        let next: Option<i64> = row.try_get(0).unwrap_or(None);
        let mut t = inner.timers.lock();
        if t.generation == generation {
            t.next = next.map(unbig);
            t.generation += 1;
            break;
        }
        t.next = match (t.next, next.map(unbig)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    Ok(moved)
}

/// Drops every partition whose newest row is older than the retention period, after moving
/// the timers still pending in it into the current partition (same position and content, so
/// lookups by id still find them), then moves each queue's min offset up to its oldest
/// remaining entry.
pub async fn retention(inner: &Inner, now_ms: u64) -> Result<RetentionReport> {
    let cutoff = now_ms.saturating_sub(inner.keep_ms);
    inner.load_partitions().await?;
    let mut candidates: Vec<u64> = inner
        .partitions
        .lock()
        .iter()
        .copied()
        .filter(|s| *s <= cutoff)
        .collect();
    candidates.sort_unstable();
    if !candidates.is_empty() {
        inner.ensure_partition(partition_of(now_ms)).await?;
    }
    let mut report = RetentionReport::default();
    let what = "dropping an old message partition";
    for start in candidates {
        let name = partition_name(start);
        let mut tx = inner.ok(what, inner.pool.begin().await)?;
        // Dropping a partition takes its parent's lock, and while it waits for that lock
        // new statements on the parent queue behind it: give up within half a second (and
        // retry next pass) rather than stall sends for longer.
        let r = sqlx::query("SET LOCAL lock_timeout = '500ms'")
            .execute(&mut *tx)
            .await;
        inner.ok(what, r)?;
        let lock = format!("LOCK TABLE {name} IN ACCESS EXCLUSIVE MODE");
        if let Err(e) = sqlx::query(AssertSqlSafe(lock)).execute(&mut *tx).await {
            debug!(partition = %name, error = %inner.redactor.redact(&e.to_string()), "partition busy; retention retries later");
            continue;
        }
        let check = format!(
            "SELECT EXISTS (SELECT 1 FROM {name} WHERE part_ms > $1), \
             pg_total_relation_size('{name}'::regclass)"
        );
        let r = sqlx::query(AssertSqlSafe(check))
            .bind(big(cutoff))
            .fetch_one(&mut *tx)
            .await;
        let row = inner.ok(what, r)?;
        let keep: bool = row.try_get(0).unwrap_or(true);
        let size: i64 = row.try_get(1).unwrap_or(0);
        if keep {
            continue;
        }
        // Through the parent, so each row lands in the partition its new part_ms names, and in
        // the drop's transaction: a crash leaves the timers either here or moved, never gone.
        let r = sqlx::query(
            "UPDATE wharf_message SET part_ms = $1 \
             WHERE part_ms >= $2 AND part_ms < $3 AND queue_offset IS NULL",
        )
        .bind(big(now_ms))
        .bind(big(start))
        .bind(big(start + PARTITION_MS))
        .execute(&mut *tx)
        .await;
        let moved = match r {
            Ok(done) => done.rows_affected(),
            Err(e) => {
                debug!(partition = %name, error = %inner.redactor.redact(&e.to_string()), "moving pending timers failed; retention retries later");
                continue;
            }
        };
        let drop = format!("DROP TABLE {name}");
        if let Err(e) = sqlx::query(AssertSqlSafe(drop)).execute(&mut *tx).await {
            debug!(partition = %name, error = %inner.redactor.redact(&e.to_string()), "partition drop failed; retention retries later");
            continue;
        }
        inner.ok(what, tx.commit().await)?;
        report.timers_moved += moved;
        inner.stats.moved_timers.fetch_add(moved, Ordering::Relaxed);
        inner.partitions.lock().remove(&start);
        report.segments_deleted += 1;
        report.bytes_freed += unbig(size);
        debug!(partition = %name, bytes = size, "retention dropped a partition");
    }
    inner
        .stats
        .partitions
        .store(inner.partitions.lock().len() as u64, Ordering::Relaxed);
    if report.segments_deleted > 0 {
        // The min comes from the same snapshot as the max it falls back to, so offsets
        // appended meanwhile (above that max) are never skipped.
        let r = sqlx::query(
            "UPDATE wharf_queue w SET min_offset = s.new_min FROM ( \
               SELECT q.topic, q.queue_id, coalesce((SELECT m.queue_offset FROM wharf_message m \
                 WHERE m.topic = q.topic AND m.queue_id = q.queue_id \
                   AND m.queue_offset IS NOT NULL ORDER BY m.queue_offset LIMIT 1), \
                 q.max_offset) AS new_min FROM wharf_queue q) s \
             WHERE w.topic = s.topic AND w.queue_id = s.queue_id AND s.new_min > w.min_offset",
        )
        .execute(&inner.pool)
        .await;
        inner.ok("moving queue min offsets after retention", r)?;
        info!(
            partitions = report.segments_deleted,
            bytes = report.bytes_freed,
            "retention pass"
        );
    }
    // Member rows expired for an hour are no use to anybody.
    let r = sqlx::query("DELETE FROM wharf_member WHERE expires_at_ms < $1")
        .bind(big(now_ms.saturating_sub(PARTITION_MS)))
        .execute(&inner.pool)
        .await;
    inner.ok("removing expired members", r)?;
    // Delete rows only need to exist until every host has polled; keep the newest per namespace
    // and drop the rest so the table stays small (0003_meta_deletes.sql).
    let r = sqlx::query(
        "DELETE FROM wharf_meta_deleted d WHERE d.stamp < \
         (SELECT max(e.stamp) FROM wharf_meta_deleted e WHERE e.namespace = d.namespace)",
    )
    .execute(&inner.pool)
    .await;
    inner.ok("removing old metadata delete rows", r)?;
    Ok(report)
}
