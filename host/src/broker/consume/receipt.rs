//! Receipts: opaque handles naming exactly one delivery, so a stale one is recognised.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::{Result, WharfError};

/// What a receipt encodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Consumer group.
    pub group: String,
    /// Instance the message was delivered to.
    pub instance: String,
    /// Topic the message is stored under (`%RETRY%…` for a retry).
    pub topic: String,
    /// Queue id.
    pub queue_id: u32,
    /// Queue offset.
    pub offset: u64,
    /// Queue ownership epoch at delivery; a rebalance bumps it.
    pub epoch: u64,
    /// Unique number of this delivery; a redelivery of the same message gets a new one.
    pub delivery: u64,
}

const VERSION: &str = "r1";

impl Receipt {
    /// The opaque text form.
    pub fn encode(&self) -> String {
        let raw = format!(
            "{VERSION}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            self.group,
            self.instance,
            self.topic,
            self.queue_id,
            self.offset,
            self.epoch,
            self.delivery
        );
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Parses a receipt; anything malformed is a 400 saying so.
    pub fn decode(text: &str) -> Result<Receipt> {
        let bad = || {
            WharfError::bad_request(format!(
                "'{}' is not a receipt; pass the receipt string exactly as receive returned it",
                shorten(text)
            ))
        };
        let bytes = URL_SAFE_NO_PAD.decode(text.trim()).map_err(|_| bad())?;
        let raw = String::from_utf8(bytes).map_err(|_| bad())?;
        let parts: Vec<&str> = raw.split('\n').collect();
        let [
            version,
            group,
            instance,
            topic,
            queue,
            offset,
            epoch,
            delivery,
        ] = parts[..]
        else {
            return Err(bad());
        };
        if version != VERSION {
            return Err(bad());
        }
        Ok(Receipt {
            group: group.to_string(),
            instance: instance.to_string(),
            topic: topic.to_string(),
            queue_id: queue.parse().map_err(|_| bad())?,
            offset: offset.parse().map_err(|_| bad())?,
            epoch: epoch.parse().map_err(|_| bad())?,
            delivery: delivery.parse().map_err(|_| bad())?,
        })
    }
}

fn shorten(s: &str) -> String {
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let r = Receipt {
            group: "GID_a".into(),
            instance: "host-1#3".into(),
            topic: "%RETRY%GID_a".into(),
            queue_id: 7,
            offset: 123_456_789,
            epoch: 4,
            delivery: 99,
        };
        let text = r.encode();
        assert_eq!(Receipt::decode(&text).unwrap(), r);
        for bad in ["", "abc", "!!!", &URL_SAFE_NO_PAD.encode("r1\na\nb")] {
            let e = Receipt::decode(bad).unwrap_err();
            assert_eq!(e.http_status(), 400);
            assert!(e.message.contains("not a receipt"));
        }
    }
}
