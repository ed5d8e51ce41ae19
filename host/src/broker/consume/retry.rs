//! Failed messages: retry copies in `%RETRY%<group>` after the back-off, dead letters in
//! `%DLQ%<group>` after the last retry, and re-sending a dead letter to its group only.

use std::str::FromStr;

use tracing::{info, warn};

use super::schedule::{NextStep, next_step};
use super::{PROP_ORIGIN_MESSAGE_ID, PROP_RETRY_TOPIC, dlq_topic, retry_topic};
use crate::broker::{Broker, Group, SendReceipt};
use crate::error::{Result, WharfError};
use crate::model::{MessageId, NewMessage, StoredMessage};
use crate::store::TimePage;

/// Property a re-sent dead letter's copy carries: the id of the dead-letter record it re-sends.
pub const PROP_RESENT_DEAD_LETTER: &str = "RESENT_DEAD_LETTER";

/// Starts the system key every retry and dead-letter copy carries, followed by the origin
/// message id. The key index then finds a message's copies without scanning (delivery status);
/// business keys cannot contain spaces, so no user key ever looks like one.
const ORIGIN_KEY_PREFIX: &str = "ORIGIN_MESSAGE_ID ";

/// The system key under which every retry and dead-letter copy of `origin_id` is indexed.
pub fn origin_key(origin_id: &str) -> String {
    format!("{ORIGIN_KEY_PREFIX}{origin_id}")
}

/// True for the system key [`origin_key`] builds (never a business key).
pub fn is_origin_key(key: &str) -> bool {
    key.starts_with(ORIGIN_KEY_PREFIX)
}

/// True when `topic` holds retry or dead-letter copies.
pub fn is_copy_topic(topic: &str) -> bool {
    topic.starts_with("%RETRY%") || topic.starts_with("%DLQ%")
}

/// Drops the system key from a copy, so consumers and operators see only business keys.
pub fn strip_origin_key(m: &mut StoredMessage) {
    m.keys.retain(|k| !is_origin_key(k));
}

/// The original topic and id of a message, looking through retry copies.
pub fn origin(m: &StoredMessage) -> (String, String) {
    let copy = is_copy_topic(&m.topic);
    let topic = copy
        .then(|| m.properties.get(PROP_RETRY_TOPIC).cloned())
        .flatten()
        .unwrap_or_else(|| m.topic.clone());
    let id = copy
        .then(|| m.properties.get(PROP_ORIGIN_MESSAGE_ID).cloned())
        .flatten()
        .unwrap_or_else(|| m.id.to_string());
    (topic, id)
}

/// The copy to append for a failed message: a delayed retry, or a dead letter.
pub fn failure_copy(
    group: &str,
    m: &StoredMessage,
    max_reconsume_times: u32,
    scale: f64,
    now_ms: u64,
) -> NewMessage {
    let (orig_topic, orig_id) = origin(m);
    // A copy of a copy is indexed under the very first id, like its ORIGIN_MESSAGE_ID.
    let mut keys: Vec<String> = m
        .keys
        .iter()
        .filter(|k| !is_origin_key(k))
        .cloned()
        .collect();
    keys.push(origin_key(&orig_id));
    let mut properties = m.properties.clone();
    properties.insert(PROP_RETRY_TOPIC.to_string(), orig_topic);
    properties.insert(PROP_ORIGIN_MESSAGE_ID.to_string(), orig_id);
    let (topic, deliver_at_ms, reconsume_times) =
        match next_step(m.reconsume_times, max_reconsume_times, scale) {
            NextStep::Retry { retry, delay_ms } => (
                retry_topic(group),
                (delay_ms > 0).then(|| now_ms.saturating_add(delay_ms)),
                retry,
            ),
            NextStep::DeadLetter => (dlq_topic(group), None, m.reconsume_times),
        };
    NewMessage {
        topic,
        queue_id: 0,
        tag: m.tag.clone(),
        keys,
        properties,
        body: m.body.clone(),
        born_ms: m.born_ms,
        deliver_at_ms,
        reconsume_times,
        wire: m.wire,
    }
}

impl Broker {
    /// Appends retry or dead-letter copies; the group's current `max_reconsume_times` decides.
    pub(super) async fn write_retries(&self, g: &Group, failed: &[&StoredMessage]) -> Result<()> {
        // The latest group setting wins, even for messages delivered before it changed.
        let max = self
            .group(&g.name)
            .map_or(g.max_reconsume_times, |latest| latest.max_reconsume_times);
        let now = self.clock.now_ms();
        let batch: Vec<NewMessage> = failed
            .iter()
            .map(|m| failure_copy(&g.name, m, max, self.config.retry_delay_scale, now))
            .collect();
        for (copy, m) in batch.iter().zip(failed) {
            if copy.topic.starts_with("%DLQ%") {
                warn!(group = %g.name, message_id = %m.id, reconsume_times = m.reconsume_times,
                    "message dead-lettered after its last retry");
            }
        }
        self.store.append(batch).await?;
        Ok(())
    }
}

/// Drops the system key and shows a copy under its original topic and id, the ones the
/// producer got: operators list, query and re-send dead letters by that id.
pub fn as_original(m: &mut StoredMessage) {
    if !is_copy_topic(&m.topic) {
        return;
    }
    strip_origin_key(m);
    let (topic, id) = origin(m);
    if let Ok(id) = MessageId::from_str(&id) {
        m.id = id;
    }
    m.topic = topic;
}

/// Dead letters of a group, oldest first, paged like a time-range query; each shown under the
/// id and topic the producer got.
pub async fn dead_letters(
    broker: &Broker,
    group: &str,
    limit: usize,
    page_token: Option<&str>,
) -> Result<TimePage> {
    broker.consumer_group(group)?;
    let limit = limit.clamp(1, crate::broker::query::MAX_PAGE);
    let mut page = broker
        .store
        .by_time(&dlq_topic(group), 0, u64::MAX, limit, page_token)
        .await?;
    page.messages.iter_mut().for_each(as_original);
    Ok(page)
}

/// Most retry copies examined when looking for an earlier re-send of a dead letter.
const MAX_RESENDS_EXAMINED: usize = 64;

/// Re-sends the newest dead letter of `message_id` (the id the producer got) to `group` only.
///
/// The copy goes into `%RETRY%<group>`, due now and with its reconsume count reset, rather than
/// to the original topic: only this group reads its retry topic, so the topic's other groups,
/// which consumed the message already, do not get it again. It keeps the original id and topic,
/// so consumers, queries and the next failure see one message. The copy names the dead letter
/// it re-sends ([`PROP_RESENT_DEAD_LETTER`]): delivery status uses that to tell a re-sent dead
/// letter from one still waiting, and a second re-send of the same dead letter is refused.
/// The answer carries the original id and where the copy was stored.
pub async fn resend_dead_letter(
    broker: &Broker,
    group: &str,
    message_id: &str,
) -> Result<SendReceipt> {
    broker.consumer_group(group)?;
    let id = MessageId::from_str(message_id)?;
    let key = origin_key(&id.to_string());
    let dead = broker
        .store
        .by_key(&dlq_topic(group), &key, 1)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| {
            WharfError::not_found(format!(
                "message '{message_id}' is not a dead letter of group '{group}'; list them with GET /v1/groups/{group}/dead-letters"
            ))
        })?;
    let dead_id = dead.id.to_string();
    let retry = retry_topic(group);
    let already = broker
        .store
        .by_key(&retry, &key, MAX_RESENDS_EXAMINED)
        .await?
        .iter()
        .any(|c| c.properties.get(PROP_RESENT_DEAD_LETTER) == Some(&dead_id));
    if already {
        return Err(WharfError::conflict(format!(
            "dead letter '{message_id}' of group '{group}' was already re-sent; see how it went with GET /v1/messages/{message_id}"
        )));
    }
    let mut properties = dead.properties.clone();
    properties.insert(PROP_RESENT_DEAD_LETTER.to_string(), dead_id);
    let copy = NewMessage {
        topic: retry,
        queue_id: 0,
        tag: dead.tag.clone(),
        // Business keys plus the system key, so the copy is found like any retry copy.
        keys: dead.keys.clone(),
        properties,
        body: dead.body.clone(),
        born_ms: dead.born_ms,
        deliver_at_ms: None,
        reconsume_times: 0,
        wire: dead.wire,
    };
    let appended = broker
        .store
        .append(vec![copy])
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| WharfError::internal("the store answered an append with no position"))?;
    info!(group, message_id = %id, copy_id = %appended.id, "dead letter re-sent to its group");
    Ok(SendReceipt {
        message_id: id,
        queue_id: appended.queue_id,
        queue_offset: appended.queue_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(topic: &str, reconsume_times: u32) -> StoredMessage {
        StoredMessage {
            id: MessageId::new(5, 1, 77),
            topic: topic.into(),
            queue_id: 3,
            queue_offset: Some(9),
            tag: Some("order".into()),
            keys: vec!["k1".into()],
            properties: Default::default(),
            body: bytes::Bytes::from_static(b"hi"),
            born_ms: 4,
            stored_ms: 5,
            deliver_at_ms: None,
            reconsume_times,
            wire: Default::default(),
        }
    }

    #[test]
    fn first_failure_becomes_a_delayed_retry() {
        let m = stored("Trade", 0);
        let c = failure_copy("G1", &m, 16, 1.0, 1_000);
        assert_eq!(c.topic, "%RETRY%G1");
        assert_eq!(c.deliver_at_ms, Some(11_000));
        assert_eq!(c.reconsume_times, 1);
        assert_eq!(c.properties[PROP_RETRY_TOPIC], "Trade");
        assert_eq!(c.properties[PROP_ORIGIN_MESSAGE_ID], m.id.to_string());
        assert_eq!(c.tag.as_deref(), Some("order"));
        assert_eq!(
            c.keys,
            vec!["k1".to_string(), origin_key(&m.id.to_string())]
        );
    }

    #[test]
    fn a_retry_keeps_the_original_topic_and_id() {
        let first = stored("Trade", 0);
        let c = failure_copy("G1", &first, 16, 1.0, 0);
        let mut second = stored("%RETRY%G1", 1);
        second.properties = c.properties;
        second.keys = c.keys;
        second.id = MessageId::new(6, 1, 99);
        let c2 = failure_copy("G1", &second, 16, 1.0, 0);
        assert_eq!(c2.properties[PROP_ORIGIN_MESSAGE_ID], first.id.to_string());
        assert_eq!(
            c2.keys,
            vec!["k1".to_string(), origin_key(&first.id.to_string())],
            "one system key, naming the first id"
        );
        assert_eq!(c2.properties[PROP_RETRY_TOPIC], "Trade");
        assert_eq!(c2.deliver_at_ms, Some(30_000));
        assert_eq!(c2.reconsume_times, 2);
    }

    #[test]
    fn out_of_retries_goes_to_the_dead_letter_topic() {
        let mut m = stored("%RETRY%G1", 3);
        m.properties.insert(PROP_RETRY_TOPIC.into(), "Trade".into());
        let c = failure_copy("G1", &m, 3, 1.0, 0);
        assert_eq!(c.topic, "%DLQ%G1");
        assert_eq!(c.deliver_at_ms, None);
        assert_eq!(c.properties[PROP_RETRY_TOPIC], "Trade");
        assert!(
            c.keys.iter().any(|k| is_origin_key(k)),
            "dead letters are indexed too"
        );
    }

    #[test]
    fn the_system_key_is_stripped_and_never_a_business_key() {
        let first = stored("Trade", 0);
        let c = failure_copy("G1", &first, 16, 1.0, 0);
        let mut copy = stored("%RETRY%G1", 1);
        copy.keys = c.keys;
        strip_origin_key(&mut copy);
        assert_eq!(copy.keys, vec!["k1".to_string()]);
        // Business keys are refused when they hold a space; the system key always does.
        assert!(origin_key("X").contains(' '));
        assert!(!is_origin_key("ORIGIN_MESSAGE_ID"));
    }

    #[test]
    fn user_properties_named_like_system_ones_are_not_trusted_on_originals() {
        let mut m = stored("Trade", 0);
        m.properties
            .insert(PROP_RETRY_TOPIC.into(), "Elsewhere".into());
        assert_eq!(origin(&m).0, "Trade");
    }
}
