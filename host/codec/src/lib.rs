//! The formats Wharf shares between the host and its guests, each in exactly one place.
//!
//! - [`properties`]: RocketMQ's property encoding (`name \x01 value \x02` pairs), used for the
//!   property size limit on send, the packed `meta` buffer plugins receive, and the remoting
//!   front end's wire messages.
//! - [`tags`]: what a tag may be, and tag expressions (`*`, `TagA`, `TagA||TagB`) as subscriptions
//!   and plugin manifests write them.
//!
//! Pure functions over bytes and strings, no I/O and no dependencies, so the guest SDK (built for
//! `wasm32-wasip2`) and the host link the same code. Errors say what is wrong and where; the host
//! maps them to its error codes (`SUBSCRIPTION_PARSE_FAILED`, `MESSAGE_ILLEGAL`).

#![warn(missing_docs)]

pub mod properties;
pub mod tags;
