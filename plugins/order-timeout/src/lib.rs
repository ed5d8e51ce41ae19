//! Closes orders that are not paid in time.
//!
//! - `order` (key = order id): schedule a `check` for the same order, delivered after the timeout
//!   (property `timeoutMs` on the order, else [`DEFAULT_TIMEOUT_MS`]).
//! - `pay` (key = order id): nothing to do here; the stored `pay` message *is* the record of
//!   payment, so no state lives in the plugin (instances come and go).
//! - `check`: look the order's key up in `Trade`; if a `pay` message exists the order is paid and
//!   the check commits, otherwise a `close` message for the order goes to `Notify`.

use wharf_sdk::{Action, Context, Level, Message, Outgoing, Plugin, find_by_key, log, send};

/// How long an order may stay unpaid when the order does not say (30 minutes).
pub const DEFAULT_TIMEOUT_MS: u64 = 30 * 60 * 1000;
const TRADE: &str = "Trade";
const NOTIFY: &str = "Notify";

struct OrderTimeout;

fn order_id(message: &Message) -> Option<String> {
    message.keys().first().map(|k| k.to_string())
}

impl Plugin for OrderTimeout {
    fn consume(message: &Message, _context: &Context) -> Action {
        let Some(order) = order_id(message) else {
            log(Level::Warn, "message without an order id key; ignored");
            return Action::CommitMessage;
        };
        match message.tag() {
            Some("order") => {
                let timeout = message
                    .property("timeoutMs")
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(DEFAULT_TIMEOUT_MS);
                let check = Outgoing::new(TRADE, order.as_bytes().to_vec())
                    .tag("check")
                    .key(&order)
                    .delay_ms(timeout);
                match send(check) {
                    Ok(_) => Action::CommitMessage,
                    Err(e) => {
                        log(
                            Level::Error,
                            &format!("cannot schedule check for {order}: {e}"),
                        );
                        Action::ReconsumeLater
                    }
                }
            }
            Some("check") => {
                let paid = match find_by_key(TRADE, &order) {
                    Ok(found) => found.iter().any(|m| m.tag.as_deref() == Some("pay")),
                    Err(e) => {
                        log(Level::Error, &format!("cannot look up order {order}: {e}"));
                        return Action::ReconsumeLater;
                    }
                };
                if paid {
                    log(Level::Info, &format!("order {order} was paid"));
                    return Action::CommitMessage;
                }
                let body = format!("{{\"orderId\":\"{order}\",\"reason\":\"payment timeout\"}}");
                let close = Outgoing::new(NOTIFY, body).tag("close").key(&order);
                match send(close) {
                    Ok(_) => {
                        log(
                            Level::Info,
                            &format!("order {order} closed: not paid in time"),
                        );
                        Action::CommitMessage
                    }
                    Err(e) => {
                        log(Level::Error, &format!("cannot close order {order}: {e}"));
                        Action::ReconsumeLater
                    }
                }
            }
            // `pay` and anything else: the stored message is all the state there is.
            _ => Action::CommitMessage,
        }
    }
}

wharf_sdk::export_plugin!(OrderTimeout);
