//! Queue-level access for clients that balance queues themselves (RocketMQ SDKs) and for fan-out
//! front ends (the MQTT router): read one queue from an offset through a tag filter, wait for
//! new data on that one queue, commit offsets (fenced by a lease epoch when the caller holds
//! one), and send a failed message back under a delay policy.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, instrument};

use super::filter::TagFilter;
use super::is_retry_topic_of;
use super::retry::{failure_copy, is_copy_topic, strip_origin_key};
use super::schedule::delay_level_ms;
use super::{dlq_topic, retry_topic};
use crate::broker::Broker;
use crate::error::{ErrorCode, ErrorKind, Result, WharfError};
use crate::model::StoredMessage;
use crate::store::{CommittedOffset, QueueBounds};

/// Answer to a queue read.
#[derive(Debug, Clone, Default)]
pub struct QueuePull {
    /// Matching messages in offset order (stored form: retries keep their `%RETRY%` topic and
    /// properties; only the engine's system key is left out).
    pub messages: Vec<StoredMessage>,
    /// Where the next read starts (after every entry examined, matched or not).
    pub next_offset: u64,
    /// Queue bounds at the time of the read.
    pub bounds: QueueBounds,
}

/// What a long-polling queue pull asks for.
#[derive(Debug, Clone, Copy)]
pub struct PullRequest<'a> {
    /// Topic (or the group's `%RETRY%` topic).
    pub topic: &'a str,
    /// Queue id.
    pub queue_id: u32,
    /// First offset to read.
    pub offset: u64,
    /// Most messages to return.
    pub max: usize,
    /// Tag filter (parsed once by the caller, e.g. per heartbeat).
    pub filter: &'a TagFilter,
    /// Long-poll wait when nothing matches yet.
    pub wait: Duration,
}

/// When a sent-back message is offered again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelayPolicy {
    /// The group's retry schedule (10 s, 30 s, 1 m, … 2 h) for its next attempt.
    GroupSchedule,
    /// One of RocketMQ's 18 delay levels (1-based; `0` means the group's schedule).
    Level(u32),
    /// An explicit delay in ms.
    Delay(u64),
    /// No more attempts: straight to the dead-letter queue.
    DeadLetterNow,
}

/// How to send a failed message back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendBack {
    /// When it comes back.
    pub delay: DelayPolicy,
    /// The client's own maximum attempts (RocketMQ's `maxReconsumeTimes`); the group's when absent.
    pub max_reconsume_times: Option<u32>,
}

/// Where a send-back went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SentBack {
    /// A retry copy in `%RETRY%<group>`, offered again at `deliver_at_ms` (None: now).
    Retry {
        /// Attempt number the copy carries.
        reconsume_times: u32,
        /// When it becomes visible.
        deliver_at_ms: Option<u64>,
    },
    /// A dead letter in `%DLQ%<group>`.
    DeadLetter,
}

impl Broker {
    /// Checks that `topic` (or the group's retry topic) has queue `queue_id`.
    fn check_queue(&self, group: &str, topic: &str, queue_id: u32) -> Result<()> {
        self.consumer_group(group)?;
        if !is_retry_topic_of(topic, group) {
            self.topic(topic)?;
        }
        let n = self.engine_queue_count(topic);
        if queue_id >= n {
            return Err(WharfError::bad_request(format!(
                "topic '{topic}' has queues 0..{n}; queue {queue_id} does not exist"
            )));
        }
        Ok(())
    }

    /// Reads up to `max` messages of one queue from `from` that pass `filter`. Pure reading: no
    /// consumer state is touched. Retention may have moved the queue's start past `from`; the
    /// read then starts at the oldest kept message.
    pub async fn read_queue(
        &self,
        topic: &str,
        queue_id: u32,
        from: u64,
        max: usize,
        filter: &TagFilter,
    ) -> Result<QueuePull> {
        let max = max.clamp(1, super::MAX_RECEIVE_BATCH);
        let read = self
            .store
            .read_queue(topic, queue_id, from, max, filter.hashes())
            .await?;
        let copies = is_copy_topic(topic);
        let messages = read
            .messages
            .into_iter()
            .filter(|m| filter.matches(m.tag.as_deref()))
            .map(|mut m| {
                if copies {
                    strip_origin_key(&mut m);
                }
                m
            })
            .collect();
        Ok(QueuePull {
            messages,
            next_offset: read.next_offset.max(from.min(read.bounds.max)),
            bounds: read.bounds,
        })
    }

    /// Waits until queue `queue_id` of `topic` has a visible message at or past `offset`, or
    /// `deadline` passes, or the host stops; true when there is one. Only appends to this queue
    /// wake the waiter, so thousands of parked waiters cost nothing while their queues are quiet.
    pub async fn wait_queue(
        &self,
        topic: &str,
        queue_id: u32,
        offset: u64,
        deadline: Instant,
    ) -> bool {
        let mut watch = self.store.watch_queue(topic, queue_id);
        let mut stop = self.engine.stop.subscribe();
        let arrived = tokio::select! {
            r = watch.wait_for(|max| *max > offset) => r.is_ok(),
            _ = tokio::time::sleep_until(deadline) => false,
            _ = stop.wait_for(|s| *s) => false,
        };
        arrived
    }

    /// Reads one queue for `group` from `offset` through the request's filter, waiting up to
    /// `wait` for new messages when it has nothing more: RocketMQ's long-polling PULL.
    #[instrument(skip(self, req), fields(group = %group, topic = %req.topic, queue = req.queue_id))]
    pub async fn pull_queue(&self, group: &str, req: PullRequest<'_>) -> Result<QueuePull> {
        self.check_queue(group, req.topic, req.queue_id)?;
        let deadline = Instant::now() + req.wait;
        let mut from = req.offset;
        loop {
            let read = self
                .read_queue(req.topic, req.queue_id, from, req.max, req.filter)
                .await?;
            // Past entries were all filtered out: keep scanning instead of answering empty-handed.
            let caught_up = read.next_offset >= read.bounds.max;
            if !read.messages.is_empty()
                || Instant::now() >= deadline
                || (!caught_up && read.next_offset > from)
            {
                return Ok(read);
            }
            from = read.next_offset.max(from);
            if !self
                .wait_queue(req.topic, req.queue_id, from, deadline)
                .await
            {
                return Ok(QueuePull {
                    messages: Vec::new(),
                    next_offset: from,
                    bounds: read.bounds,
                });
            }
        }
    }

    /// Commits the next offset to consume for (group, topic, queue). With `epoch` the commit is
    /// fenced: refused when that lease epoch is no longer the queue's (a stale holder).
    pub async fn commit_queue_offset(
        &self,
        group: &str,
        topic: &str,
        queue_id: u32,
        offset: u64,
        epoch: Option<u64>,
    ) -> Result<()> {
        self.check_queue(group, topic, queue_id)?;
        let o = CommittedOffset {
            topic: topic.to_string(),
            queue_id,
            offset,
        };
        match epoch {
            None => {
                self.store
                    .commit_offsets(group, std::slice::from_ref(&o))
                    .await?
            }
            Some(epoch) => {
                let accepted = self
                    .store
                    .commit_offsets_fenced(group, &[(o, epoch)])
                    .await?;
                if accepted.first() != Some(&true) {
                    return Err(WharfError::new(
                        ErrorCode::SystemBusy,
                        ErrorKind::Conflict,
                        format!(
                            "offset commit for {topic}:{queue_id} refused: lease epoch {epoch} is no \
                             longer current (another holder took the queue); re-read the member list \
                             and rebalance"
                        ),
                    ));
                }
            }
        }
        if let Some(h) = self.engine.existing(group) {
            h.state
                .lock()
                .loaded
                .insert((topic.to_string(), queue_id), offset);
        }
        Ok(())
    }

    /// The committed offset of (group, topic, queue), if any: the live position when this host
    /// serves the queue to its own consumers, else what the store holds (never a stale cache).
    pub async fn committed_queue_offset(
        &self,
        group: &str,
        topic: &str,
        queue_id: u32,
    ) -> Result<Option<u64>> {
        self.check_queue(group, topic, queue_id)?;
        let key = (topic.to_string(), queue_id);
        if let Some(h) = self.engine.existing(group)
            && let Some(q) = h.state.lock().queues.get(&key)
        {
            return Ok(Some(q.committed()));
        }
        Ok(self
            .store
            .load_offsets(group)
            .await?
            .into_iter()
            .find(|o| o.topic == topic && o.queue_id == queue_id)
            .map(|o| o.offset))
    }

    /// Where `group` starts reading a queue it has no committed offset for, by the same rule
    /// as the host's own dispatcher: the oldest kept message when the topic's first message is
    /// recent, else the newest (broadcasting: the newest); a retry queue from its start.
    pub async fn queue_start_offset(&self, group: &str, topic: &str, queue_id: u32) -> Result<u64> {
        self.check_queue(group, topic, queue_id)?;
        if is_retry_topic_of(topic, group) {
            return Ok(self.store.queue_bounds(topic, queue_id).await?.min);
        }
        let model = self.consumer_group(group)?.model;
        let key = (topic.to_string(), queue_id);
        Ok(self.start_offset(None, model, &key).await?.0)
    }

    /// The first offset of a queue whose message was stored at or after `timestamp_ms`.
    pub async fn offset_for_time(
        &self,
        topic: &str,
        queue_id: u32,
        timestamp_ms: u64,
    ) -> Result<u64> {
        self.store
            .offset_for_time(topic, queue_id, timestamp_ms)
            .await
    }

    /// The message stored at log position `position` (remoting's send-back and offset message
    /// ids carry only that).
    pub async fn message_at(&self, position: u64) -> Result<Option<StoredMessage>> {
        self.store.get_by_position(position).await
    }

    /// A client could not consume `message`: schedule another attempt in `%RETRY%<group>` (or
    /// dead-letter it) under `policy`, durably, as a ReconsumeLater from a broker-assigned
    /// consumer would.
    #[instrument(skip(self, message), fields(group = %group, message_id = %message.id))]
    pub async fn send_back(
        &self,
        group: &str,
        message: &StoredMessage,
        policy: SendBack,
    ) -> Result<SentBack> {
        let g = self.consumer_group(group)?;
        let max = policy.max_reconsume_times.unwrap_or(g.max_reconsume_times);
        let scale = self.config.retry_delay_scale;
        let now = self.clock.now_ms();
        let mut copy = failure_copy(&g.name, message, max, scale, now);
        let retrying = copy.topic == retry_topic(&g.name);
        match policy.delay {
            DelayPolicy::GroupSchedule | DelayPolicy::Level(0) => {}
            _ if !retrying => {}
            DelayPolicy::Level(level) => {
                let d = delay_level_ms(level, scale);
                copy.deliver_at_ms = (d > 0).then(|| now.saturating_add(d));
            }
            DelayPolicy::Delay(ms) => copy.deliver_at_ms = (ms > 0).then(|| now.saturating_add(ms)),
            DelayPolicy::DeadLetterNow => {
                copy.topic = dlq_topic(&g.name);
                copy.deliver_at_ms = None;
                copy.reconsume_times = message.reconsume_times;
            }
        }
        let answer = if copy.topic.starts_with("%DLQ%") {
            SentBack::DeadLetter
        } else {
            SentBack::Retry {
                reconsume_times: copy.reconsume_times,
                deliver_at_ms: copy.deliver_at_ms,
            }
        };
        debug!(?answer, "sent back");
        self.store.append(vec![copy]).await?;
        Ok(answer)
    }
}
