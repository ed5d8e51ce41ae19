//! Queue-level access for clients that balance queues themselves (RocketMQ SDKs): read one queue
//! from an offset through a tag filter with long poll, commit offsets, send a failed message back.

use std::time::Duration;

use tokio::time::Instant;
use tracing::instrument;

use super::filter::TagFilter;
use super::is_retry_topic_of;
use super::retry::{is_copy_topic, strip_origin_key};
use crate::broker::Broker;
use crate::error::{Result, WharfError};
use crate::model::StoredMessage;
use crate::store::{CommittedOffset, QueueBounds};

/// Answer to a queue pull.
#[derive(Debug, Clone, Default)]
pub struct QueuePull {
    /// Matching messages in offset order (stored form: retries keep their `%RETRY%` topic and
    /// properties; only the engine's system key is left out).
    pub messages: Vec<StoredMessage>,
    /// Where the next pull starts (after every entry examined, matched or not).
    pub next_offset: u64,
    /// Queue bounds at the time of the read.
    pub bounds: QueueBounds,
}

/// What a queue pull asks for.
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
    /// Tag expression.
    pub expression: &'a str,
    /// Long-poll wait when nothing matches yet.
    pub wait: Duration,
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

    /// Reads up to `max` messages of one queue from `offset` that match `expression`, waiting up
    /// to `wait` for new ones when the queue has nothing more.
    #[instrument(skip(self, req), fields(group = %group, topic = %req.topic, queue = req.queue_id))]
    pub async fn pull_queue(&self, group: &str, req: PullRequest<'_>) -> Result<QueuePull> {
        let PullRequest {
            topic,
            queue_id,
            offset,
            max,
            expression,
            wait,
        } = req;
        self.check_queue(group, topic, queue_id)?;
        let filter = TagFilter::parse(expression)?;
        let max = max.clamp(1, super::MAX_RECEIVE_BATCH);
        let deadline = Instant::now() + wait;
        let mut from = offset;
        loop {
            let mut changes = self.store.changes();
            changes.borrow_and_update();
            let read = self
                .store
                .read_queue(topic, queue_id, from, max, filter.hashes())
                .await?;
            let copies = is_copy_topic(topic);
            let messages: Vec<StoredMessage> = read
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
            // Past entries were all filtered out: keep scanning instead of answering empty-handed.
            let caught_up = read.next_offset >= read.bounds.max;
            if !messages.is_empty()
                || Instant::now() >= deadline
                || (!caught_up && read.next_offset > from)
            {
                return Ok(QueuePull {
                    messages,
                    next_offset: read.next_offset.max(from.min(read.bounds.max)),
                    bounds: read.bounds,
                });
            }
            from = read.next_offset.max(from);
            let mut stop = self.engine.stop.subscribe();
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            if *self.engine.stop.borrow() {
                return Ok(QueuePull {
                    messages: Vec::new(),
                    next_offset: from,
                    bounds: read.bounds,
                });
            }
        }
    }

    /// Commits the next offset to consume for (group, topic, queue).
    pub async fn commit_queue_offset(
        &self,
        group: &str,
        topic: &str,
        queue_id: u32,
        offset: u64,
    ) -> Result<()> {
        self.check_queue(group, topic, queue_id)?;
        let g = self.group(group)?;
        let o = CommittedOffset {
            topic: topic.to_string(),
            queue_id,
            offset,
        };
        self.store
            .commit_offsets(group, std::slice::from_ref(&o))
            .await?;
        let handle = self.engine.handle(&g).await?;
        handle
            .state
            .lock()
            .loaded
            .insert((topic.to_string(), queue_id), offset);
        Ok(())
    }

    /// The committed offset of (group, topic, queue), if any.
    pub async fn committed_queue_offset(
        &self,
        group: &str,
        topic: &str,
        queue_id: u32,
    ) -> Result<Option<u64>> {
        self.check_queue(group, topic, queue_id)?;
        let g = self.group(group)?;
        let handle = self.engine.handle(&g).await?;
        let st = handle.state.lock();
        let key = (topic.to_string(), queue_id);
        Ok(st
            .queues
            .get(&key)
            .map(|q| q.committed())
            .or_else(|| st.loaded.get(&key).copied()))
    }

    /// A self-balancing client could not consume `message`: schedule its retry (or dead-letter
    /// it) exactly as a ReconsumeLater from a broker-assigned consumer would.
    pub async fn send_back(&self, group: &str, message: &StoredMessage) -> Result<()> {
        let g = self.consumer_group(group)?;
        self.write_retries(&g, &[message]).await
    }

    /// Ids of the group's live instances, sorted (the member list self-balancing clients split by).
    pub fn consumer_ids(&self, group: &str) -> Vec<String> {
        self.engine
            .existing(group)
            .map(|h| h.state.lock().instances.keys().cloned().collect())
            .unwrap_or_default()
    }
}
