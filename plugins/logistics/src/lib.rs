//! Receives only `logistics` messages of `Trade` (the broker filters the rest out) and records
//! each shipment in the host log.

use wharf_sdk::{Action, Context, Level, Message, Plugin, log};

struct Logistics;

impl Plugin for Logistics {
    fn consume(message: &Message, context: &Context) -> Action {
        let order = message.keys().first().copied().unwrap_or("-");
        log(
            Level::Info,
            &format!(
                "shipment for order {order}: {} (attempt {})",
                message.body_str().unwrap_or("<binary body>"),
                context.attempt()
            ),
        );
        Action::CommitMessage
    }
}

wharf_sdk::export_plugin!(Logistics);
