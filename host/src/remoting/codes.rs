//! Request and response codes of the RocketMQ remoting protocol that Wharf serves.

/// SEND_MESSAGE: long header field names.
pub const SEND_MESSAGE: i32 = 10;
/// PULL_MESSAGE: long-polling pull of one queue.
pub const PULL_MESSAGE: i32 = 11;
/// QUERY_CONSUMER_OFFSET.
pub const QUERY_CONSUMER_OFFSET: i32 = 14;
/// UPDATE_CONSUMER_OFFSET (usually oneway).
pub const UPDATE_CONSUMER_OFFSET: i32 = 15;
/// SEARCH_OFFSET_BY_TIMESTAMP.
pub const SEARCH_OFFSET_BY_TIMESTAMP: i32 = 29;
/// GET_MAX_OFFSET.
pub const GET_MAX_OFFSET: i32 = 30;
/// GET_MIN_OFFSET.
pub const GET_MIN_OFFSET: i32 = 31;
/// VIEW_MESSAGE_BY_ID: one record by its log position.
pub const VIEW_MESSAGE_BY_ID: i32 = 33;
/// HEART_BEAT: producer and consumer registrations.
pub const HEART_BEAT: i32 = 34;
/// UNREGISTER_CLIENT.
pub const UNREGISTER_CLIENT: i32 = 35;
/// CONSUMER_SEND_MSG_BACK: a consumer could not consume a message.
pub const CONSUMER_SEND_MSG_BACK: i32 = 36;
/// GET_CONSUMER_LIST_BY_GROUP.
pub const GET_CONSUMER_LIST_BY_GROUP: i32 = 38;
/// NOTIFY_CONSUMER_IDS_CHANGED (broker → consumer, oneway).
pub const NOTIFY_CONSUMER_IDS_CHANGED: i32 = 40;
/// GET_ROUTEINFO_BY_TOPIC (name server).
pub const GET_ROUTEINFO_BY_TOPIC: i32 = 105;
/// SEND_MESSAGE_V2: short header field names `a`…`n`.
pub const SEND_MESSAGE_V2: i32 = 310;
/// SEND_BATCH_MESSAGE: V2 header, batch body.
pub const SEND_BATCH_MESSAGE: i32 = 320;

/// Response: success.
pub const SUCCESS: i32 = 0;
/// Response: failure (bad signature, internal error, …); the remark says why.
pub const SYSTEM_ERROR: i32 = 1;
/// Response: the request code is not served.
pub const REQUEST_CODE_NOT_SUPPORTED: i32 = 3;
/// Response: the topic does not exist.
pub const TOPIC_NOT_EXIST: i32 = 17;
/// Response: the message is not acceptable.
pub const MESSAGE_ILLEGAL: i32 = 13;
/// Response: no new message in the queue.
pub const PULL_NOT_FOUND: i32 = 19;
/// Response: messages were there but none matched the filter; pull again at once.
pub const PULL_RETRY_IMMEDIATELY: i32 = 20;
/// Response: the requested offset is past the queue's end; restart at `nextBeginOffset`.
pub const PULL_OFFSET_MOVED: i32 = 21;
/// Response: the subscription expression cannot be parsed (or is not a tag expression).
pub const SUBSCRIPTION_PARSE_FAILED: i32 = 23;
/// Response: the consumer group does not exist.
pub const SUBSCRIPTION_GROUP_NOT_EXIST: i32 = 26;

/// The long header names SEND_MESSAGE_V2's short names `a`…`n` stand for.
pub const V2_FIELDS: [(&str, &str); 14] = [
    ("a", "producerGroup"),
    ("b", "topic"),
    ("c", "defaultTopic"),
    ("d", "defaultTopicQueueNums"),
    ("e", "queueId"),
    ("f", "sysFlag"),
    ("g", "bornTimestamp"),
    ("h", "flag"),
    ("i", "properties"),
    ("j", "reconsumeTimes"),
    ("k", "unitMode"),
    ("l", "maxReconsumeTimes"),
    ("m", "batch"),
    ("n", "brokerName"),
];

/// The short name SEND_MESSAGE_V2 gives a long field name.
pub fn v2_short_name(long: &str) -> Option<&'static str> {
    V2_FIELDS.iter().find(|(_, l)| *l == long).map(|(s, _)| *s)
}

/// The long name of a SEND_MESSAGE_V2 field.
pub fn v2_long_name(short: &str) -> Option<&'static str> {
    V2_FIELDS.iter().find(|(s, _)| *s == short).map(|(_, l)| *l)
}
