//! The spec's error codes in one enum, mapped to HTTP status, JSON and CLI exit.

use serde::Serialize;

/// Wire-compatible error codes from spec.md ("Error codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum ErrorCode {
    /// 1: internal failure, or a permission check failed on a topic.
    SystemError,
    /// 2: overloaded; the client may retry.
    SystemBusy,
    /// 13: empty body, properties too large, message too large.
    MessageIllegal,
    /// 14: the store or node cannot take writes now.
    ServiceNotAvailable,
    /// 16: topic or group not writable/readable for this request.
    NoPermission,
    /// 17: unknown topic.
    TopicNotExist,
    /// 23: bad tag expression.
    SubscriptionParseFailed,
    /// 24: consumer pulls without a subscription.
    SubscriptionNotExist,
    /// 25: subscription changed meanwhile (transient).
    SubscriptionNotLatest,
    /// 26: unknown consumer group.
    SubscriptionGroupNotExist,
}

impl ErrorCode {
    /// The numeric code clients see.
    pub fn code(self) -> i32 {
        match self {
            ErrorCode::SystemError => 1,
            ErrorCode::SystemBusy => 2,
            ErrorCode::MessageIllegal => 13,
            ErrorCode::ServiceNotAvailable => 14,
            ErrorCode::NoPermission => 16,
            ErrorCode::TopicNotExist => 17,
            ErrorCode::SubscriptionParseFailed => 23,
            ErrorCode::SubscriptionNotExist => 24,
            ErrorCode::SubscriptionNotLatest => 25,
            ErrorCode::SubscriptionGroupNotExist => 26,
        }
    }

    /// The upper-case name clients see.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::SystemError => "SYSTEM_ERROR",
            ErrorCode::SystemBusy => "SYSTEM_BUSY",
            ErrorCode::MessageIllegal => "MESSAGE_ILLEGAL",
            ErrorCode::ServiceNotAvailable => "SERVICE_NOT_AVAILABLE",
            ErrorCode::NoPermission => "NO_PERMISSION",
            ErrorCode::TopicNotExist => "TOPIC_NOT_EXIST",
            ErrorCode::SubscriptionParseFailed => "SUBSCRIPTION_PARSE_FAILED",
            ErrorCode::SubscriptionNotExist => "SUBSCRIPTION_NOT_EXIST",
            ErrorCode::SubscriptionNotLatest => "SUBSCRIPTION_NOT_LATEST",
            ErrorCode::SubscriptionGroupNotExist => "SUBSCRIPTION_GROUP_NOT_EXIST",
        }
    }

    /// Looks a code up by its number (used by the CLI to print server errors).
    pub fn from_code(code: i32) -> Option<ErrorCode> {
        ALL_CODES.iter().copied().find(|c| c.code() == code)
    }
}

/// Every code, for lookups and tests.
pub const ALL_CODES: [ErrorCode; 10] = [
    ErrorCode::SystemError,
    ErrorCode::SystemBusy,
    ErrorCode::MessageIllegal,
    ErrorCode::ServiceNotAvailable,
    ErrorCode::NoPermission,
    ErrorCode::TopicNotExist,
    ErrorCode::SubscriptionParseFailed,
    ErrorCode::SubscriptionNotExist,
    ErrorCode::SubscriptionNotLatest,
    ErrorCode::SubscriptionGroupNotExist,
];

/// What kind of failure an error is, which decides the HTTP status beside the spec code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad input: 400.
    Invalid,
    /// A named resource is missing: 404.
    NotFound,
    /// The resource already exists: 409.
    Conflict,
    /// Authentication failed (missing/wrong/stale signature): 401.
    Unauthenticated,
    /// Authenticated but not allowed: 403.
    Forbidden,
    /// Overloaded or cannot write now: 503.
    Unavailable,
    /// Internal failure: 500.
    Internal,
}

/// An error a user can see: the spec code, its kind, and a message that says what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} ({}): {message}", code.name(), code.code())]
pub struct WharfError {
    /// Spec error code.
    pub code: ErrorCode,
    /// Decides the HTTP status.
    pub kind: ErrorKind,
    /// Human message: what went wrong and what to do.
    pub message: String,
}

impl WharfError {
    /// Builds an error from its parts.
    pub fn new(code: ErrorCode, kind: ErrorKind, message: impl Into<String>) -> Self {
        WharfError {
            code,
            kind,
            message: message.into(),
        }
    }

    /// 400 MESSAGE_ILLEGAL.
    pub fn illegal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::MessageIllegal, ErrorKind::Invalid, message)
    }

    /// 400 with SYSTEM_ERROR code: malformed request that is not a message problem.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::SystemError, ErrorKind::Invalid, message)
    }

    /// 404 TOPIC_NOT_EXIST for `topic`.
    pub fn topic_not_exist(topic: &str) -> Self {
        Self::new(
            ErrorCode::TopicNotExist,
            ErrorKind::NotFound,
            format!(
                "topic '{topic}' does not exist; create it first (POST /v1/topics or `wharf topic create`)"
            ),
        )
    }

    /// 404 SUBSCRIPTION_GROUP_NOT_EXIST for `group`.
    pub fn group_not_exist(group: &str) -> Self {
        Self::new(
            ErrorCode::SubscriptionGroupNotExist,
            ErrorKind::NotFound,
            format!(
                "group '{group}' does not exist; create it first (POST /v1/groups or `wharf group create`)"
            ),
        )
    }

    /// 404 with SYSTEM_ERROR code: some other named thing is missing.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::SystemError, ErrorKind::NotFound, message)
    }

    /// 409 with SYSTEM_ERROR code: the resource exists already.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::SystemError, ErrorKind::Conflict, message)
    }

    /// 503 SERVICE_NOT_AVAILABLE: the store cannot take writes.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            ErrorCode::ServiceNotAvailable,
            ErrorKind::Unavailable,
            message,
        )
    }

    /// 503 SYSTEM_BUSY: overloaded, retry later.
    pub fn busy(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::SystemBusy, ErrorKind::Unavailable, message)
    }

    /// 500 SYSTEM_ERROR.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::SystemError, ErrorKind::Internal, message)
    }

    /// HTTP status for this error.
    pub fn http_status(&self) -> u16 {
        match self.kind {
            ErrorKind::Invalid => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::Unauthenticated => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
        }
    }

    /// The contract's JSON error body: `{"error":{"code","name","message"}}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {"code": self.code.code(), "name": self.code.name(), "message": self.message}
        })
    }
}

/// A bad tag expression is the spec's `SUBSCRIPTION_PARSE_FAILED` wherever it is written.
impl From<wharf_codec::tags::ExpressionError> for WharfError {
    fn from(e: wharf_codec::tags::ExpressionError) -> Self {
        Self::new(
            ErrorCode::SubscriptionParseFailed,
            ErrorKind::Invalid,
            e.to_string(),
        )
    }
}

/// A tag a producer may not set makes the message illegal.
impl From<wharf_codec::tags::TagError> for WharfError {
    fn from(e: wharf_codec::tags::TagError) -> Self {
        Self::illegal(e.to_string())
    }
}

/// Properties that cannot be encoded (or arrive malformed) make the message illegal.
impl From<wharf_codec::properties::PropertiesError> for WharfError {
    fn from(e: wharf_codec::properties::PropertiesError) -> Self {
        Self::illegal(e.to_string())
    }
}

/// Result alias used across the host.
pub type Result<T, E = WharfError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_match_spec() {
        let expected = [1, 2, 13, 14, 16, 17, 23, 24, 25, 26];
        for (c, n) in ALL_CODES.iter().zip(expected) {
            assert_eq!(c.code(), n);
            assert_eq!(ErrorCode::from_code(n), Some(*c));
        }
        let e = WharfError::topic_not_exist("T");
        assert_eq!(e.http_status(), 404);
        assert_eq!(e.to_json()["error"]["name"], "TOPIC_NOT_EXIST");
        assert_eq!(e.to_json()["error"]["code"], 17);
    }
}
