//! Receipts: opaque handles naming exactly one delivery by one host, so a stale one (another
//! host, an earlier boot of this one, a moved lease, a redelivery) is recognised precisely.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::{Result, WharfError};

/// Which delivery of which queue entry a consumer holds; a redelivery gets a new `delivery`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryToken {
    /// Topic the message is stored under (`%RETRY%…` for a retry).
    pub topic: String,
    /// Queue id.
    pub queue_id: u32,
    /// Queue offset.
    pub offset: u64,
    /// The queue's local epoch at delivery (moves on rebalance and offset reset).
    pub epoch: u64,
    /// The lease epoch this host held the queue under (0 when the queue is not leased:
    /// broadcasting); a settle after the lease moved is told so.
    pub lease: u64,
    /// Unique number of this delivery.
    pub delivery: u64,
}

/// What a receipt encodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Host (and boot) that made the delivery.
    pub host: String,
    /// Consumer group.
    pub group: String,
    /// The delivery itself.
    pub token: DeliveryToken,
}

/// Current format; `r1` receipts (no host) came from a host version before this one.
const VERSION: &str = "r2";

impl Receipt {
    /// A receipt for `token`, delivered by `host` to an instance of `group` (the lease epoch travels
    /// inside the token).
    pub fn new(host: &str, group: &str, token: &DeliveryToken) -> Receipt {
        Receipt {
            host: host.to_string(),
            group: group.to_string(),
            token: token.clone(),
        }
    }

    /// The opaque text form.
    pub fn encode(&self) -> String {
        let t = &self.token;
        let raw = format!(
            "{VERSION}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            self.host, self.group, t.topic, t.queue_id, t.offset, t.epoch, t.lease, t.delivery
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
        if parts.first() == Some(&"r1") {
            return Err(WharfError::bad_request(
                "receipt expired: it was issued before this host restarted (by an older version); \
                 the message is or will be delivered again, so settle the newer delivery instead",
            ));
        }
        let [
            version,
            host,
            group,
            topic,
            queue,
            offset,
            epoch,
            lease,
            delivery,
        ] = parts[..]
        else {
            return Err(bad());
        };
        if version != VERSION {
            return Err(bad());
        }
        Ok(Receipt {
            host: host.to_string(),
            group: group.to_string(),
            token: DeliveryToken {
                topic: topic.to_string(),
                queue_id: queue.parse().map_err(|_| bad())?,
                offset: offset.parse().map_err(|_| bad())?,
                epoch: epoch.parse().map_err(|_| bad())?,
                lease: lease.parse().map_err(|_| bad())?,
                delivery: delivery.parse().map_err(|_| bad())?,
            },
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
            host: "node-a#1f2e3d4c".into(),
            group: "GID_a".into(),
            token: DeliveryToken {
                topic: "%RETRY%GID_a".into(),
                queue_id: 7,
                offset: 123_456_789,
                epoch: 4,
                lease: 12,
                delivery: 99,
            },
        };
        let text = r.encode();
        assert_eq!(Receipt::decode(&text).unwrap(), r);
        for bad in ["", "abc", "!!!", &URL_SAFE_NO_PAD.encode("r2\na\nb")] {
            let e = Receipt::decode(bad).unwrap_err();
            assert_eq!(e.http_status(), 400);
            assert!(e.message.contains("not a receipt"));
        }
        let old = URL_SAFE_NO_PAD.encode("r1\nGID_a\ni\nT\n0\n1\n0\n5");
        let e = Receipt::decode(&old).unwrap_err();
        assert!(
            e.message.contains("before this host restarted"),
            "{}",
            e.message
        );
    }

    proptest::proptest! {
        #[test]
        fn any_receipt_round_trips(
            host in "[A-Za-z0-9#@._-]{1,40}",
            group in "[A-Za-z0-9_-]{1,64}",
            topic in "(%RETRY%|%DLQ%)?[A-Za-z0-9_-]{1,64}",
            queue_id: u32,
            offset: u64,
            epoch: u64,
            lease: u64,
            delivery: u64,
        ) {
            let r = Receipt {
                host,
                group,
                token: DeliveryToken { topic, queue_id, offset, epoch, lease, delivery },
            };
            proptest::prop_assert_eq!(Receipt::decode(&r.encode()).unwrap(), r);
        }
    }
}
