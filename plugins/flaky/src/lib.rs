//! Fails on purpose: answers reconsume-later for the first N attempts of a message (N from the
//! message property `fail_times`, default 3), then commits. With N above the group's
//! `max_reconsume_times` the message ends in the dead letters.

use wharf_sdk::{Action, Context, Level, Message, Plugin, log};

struct Flaky;

impl Plugin for Flaky {
    fn consume(message: &Message, context: &Context) -> Action {
        let fail_times: u32 = message
            .property("fail_times")
            .and_then(|v| v.parse().ok())
            .unwrap_or(3);
        if context.attempt() <= fail_times {
            log(
                Level::Info,
                &format!(
                    "attempt {} of {}: failing on purpose",
                    context.attempt(),
                    fail_times + 1
                ),
            );
            Action::ReconsumeLater
        } else {
            Action::CommitMessage
        }
    }
}

wharf_sdk::export_plugin!(Flaky);
