//! Write Wharf consumer plugins in Rust.
//!
//! Implement [`Plugin`] for a type, name it in [`export_plugin!`], and build with
//! `cargo build --release --target wasm32-wasip2`. The host calls [`Plugin::consume`] for every
//! message the manifest's subscriptions select; what it returns settles the message.
//!
//! The generated component bindings stay inside this crate: plugin authors see [`Message`],
//! [`Context`], [`Action`], [`Outgoing`] and the [`send`], [`find_by_key`], [`log`] and
//! [`now_ms`] helpers.

#![warn(missing_docs)]

mod message;
mod outgoing;

pub use message::{Context, Message, MessageId};
pub use outgoing::{Found, HostError, Outgoing, SendReceipt, find_by_key, send};

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "batch-consumer",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_consumer",
        default_bindings_module: "::wharf_sdk::bindings",
    });
}

use bindings::wharf::plugin::{host, types};

/// What to do with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Done: the group's progress moves past it.
    CommitMessage,
    /// Retry after the group's back-off; past `max_reconsume_times` it is dead-lettered.
    ReconsumeLater,
}

impl From<Action> for types::Action {
    fn from(a: Action) -> Self {
        match a {
            Action::CommitMessage => types::Action::CommitMessage,
            Action::ReconsumeLater => types::Action::ReconsumeLater,
        }
    }
}

/// A consumer plugin. Panicking counts as [`Action::ReconsumeLater`] (the instance is replaced).
pub trait Plugin {
    /// Handles one message.
    fn consume(message: &Message, context: &Context) -> Action;

    /// Handles a batch (manifest `batch_max > 1`); by default one [`Plugin::consume`] per message.
    fn consume_batch(messages: &[Message], context: &Context) -> Vec<Action> {
        messages.iter().map(|m| Self::consume(m, context)).collect()
    }
}

/// Severity of a [`log`] line.
pub use types::Level;

/// Writes a line into the host's log, tagged with plugin, version and current message id.
pub fn log(level: Level, message: &str) {
    host::log(level, message);
}

/// The host's clock (epoch ms); tests on the host can move it, so prefer it over the system time.
pub fn now_ms() -> u64 {
    host::now_ms()
}

#[doc(hidden)]
pub mod __private {
    use super::*;

    pub fn consume<P: Plugin>(m: types::Message, c: types::Context) -> types::Action {
        let context = Context::from_raw(c);
        P::consume(&Message::from_raw(m), &context).into()
    }

    pub fn consume_batch<P: Plugin>(
        ms: Vec<types::Message>,
        c: types::Context,
    ) -> Vec<types::Action> {
        let context = Context::from_raw(c);
        let messages: Vec<Message> = ms.into_iter().map(Message::from_raw).collect();
        P::consume_batch(&messages, &context)
            .into_iter()
            .map(Into::into)
            .collect()
    }
}

/// Exports a [`Plugin`] implementation as the component's `consume` and `consume-batch`.
///
/// ```ignore
/// struct MyPlugin;
/// impl wharf_sdk::Plugin for MyPlugin { /* ... */ }
/// wharf_sdk::export_plugin!(MyPlugin);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        const _: () = {
            struct __WharfGuest;
            impl $crate::bindings::Guest for __WharfGuest {
                fn consume(
                    m: $crate::bindings::wharf::plugin::types::Message,
                    c: $crate::bindings::wharf::plugin::types::Context,
                ) -> $crate::bindings::wharf::plugin::types::Action {
                    $crate::__private::consume::<$plugin>(m, c)
                }
                fn consume_batch(
                    ms: ::std::vec::Vec<$crate::bindings::wharf::plugin::types::Message>,
                    c: $crate::bindings::wharf::plugin::types::Context,
                ) -> ::std::vec::Vec<$crate::bindings::wharf::plugin::types::Action> {
                    $crate::__private::consume_batch::<$plugin>(ms, c)
                }
            }
    $crate::bindings::__export_consumer!(__WharfGuest with_types_in $crate::bindings);
        };
    };
}
