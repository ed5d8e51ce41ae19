//! Test component with only the export the contract names: `consume` (world `consumer`). The
//! host must deploy it and, whatever `batch_max` says, call it once per message.
//!
//! The tag picks the answer: `retry` answers reconsume-later, `trap` panics, anything else
//! commits. Every call is logged with the message's tag and attempt, so tests can follow it.

wit_bindgen::generate!({
    world: "consumer",
    path: "../../wit",
});

use wharf::plugin::host;
use wharf::plugin::types::Level;

struct ConsumeOnly;

impl Guest for ConsumeOnly {
    fn consume(message: Message, context: Context) -> Action {
        let tag = message.tag.as_deref().unwrap_or("");
        host::log(
            Level::Info,
            &format!("consume-only: tag={tag} attempt={}", context.attempt),
        );
        match tag {
            "retry" => Action::ReconsumeLater,
            "trap" => panic!("consume-only asked to trap"),
            _ => Action::CommitMessage,
        }
    }
}

export!(ConsumeOnly);
