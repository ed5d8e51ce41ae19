//! Keeps each MQTT device's online state right under flapping; see README.md for the rules.
//!
//! The decision is by connection (`channelId`): a close of an older connection that arrives
//! after a newer `connect` must not mark the device offline, and a `connect` whose connection
//! has already closed must not mark it online.

use wharf_sdk::{Action, Context, Level, Message, Outgoing, Plugin, find_by_key, log, send};

/// Where device states are written.
pub const STATE_TOPIC: &str = "DeviceState";

/// A presence event as the gateway writes it.
#[derive(Debug, PartialEq, Eq)]
pub struct Event {
    /// Client id (`GID_x@@@device`).
    pub client_id: String,
    /// `connect`, `disconnect` or `tcpclean`.
    pub event_type: String,
    /// The connection's id.
    pub channel_id: String,
    /// Strictly increasing per client.
    pub event_index: u64,
}

/// Reads the four fields from the event's JSON body (flat object, gateway-written).
pub fn parse(body: &str) -> Option<Event> {
    Some(Event {
        client_id: string_field(body, "clientId")?,
        event_type: string_field(body, "eventType")?,
        channel_id: string_field(body, "channelId")?,
        event_index: number_field(body, "eventIndex")?,
    })
}

fn value_start<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("\"{name}\"");
    let at = body.find(&key)? + key.len();
    let rest = body[at..].trim_start().strip_prefix(':')?;
    Some(rest.trim_start())
}

fn string_field(body: &str, name: &str) -> Option<String> {
    let rest = value_start(body, name)?.strip_prefix('"')?;
    // The gateway's ids never contain quotes or escapes; refuse anything that does.
    let end = rest.find('"')?;
    let v = &rest[..end];
    (!v.contains('\\')).then(|| v.to_string())
}

fn number_field(body: &str, name: &str) -> Option<u64> {
    let rest = value_start(body, name)?;
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// What to do for one event, given what the store says.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Write this state (`online` / `offline`).
    Write(&'static str),
    /// Nothing changes.
    Keep(&'static str),
}

/// The rules of README.md. `channel_closed`: the event's channel already has a close event;
/// `current`: the device's newest state and whether it belongs to the event's channel.
pub fn decide(event_type: &str, channel_closed: bool, current: Option<(&str, bool)>) -> Decision {
    match event_type {
        "connect" if channel_closed => Decision::Keep("this connection has closed already"),
        "connect" => match current {
            Some(("online", true)) => Decision::Keep("already online on this connection"),
            _ => Decision::Write("online"),
        },
        "disconnect" | "tcpclean" => match current {
            Some(("online", true)) => Decision::Write("offline"),
            Some(("online", false)) => Decision::Keep("a newer connection is online"),
            _ => Decision::Keep("already offline"),
        },
        _ => Decision::Keep("not a presence event"),
    }
}

struct DevicePresence;

fn ids(list: &[wharf_sdk::Found]) -> Vec<&str> {
    list.iter().map(|f| f.message_id.as_str()).collect()
}

impl Plugin for DevicePresence {
    fn consume(message: &Message, _context: &Context) -> Action {
        let Some(ev) = message.body_str().and_then(parse) else {
            log(
                Level::Warn,
                "presence event body is not the gateway's JSON; ignored",
            );
            return Action::CommitMessage;
        };
        // The event's connection: has it closed already?
        let channel_events = match find_by_key(message.topic(), &ev.channel_id) {
            Ok(f) => f,
            Err(e) => {
                log(
                    Level::Error,
                    &format!("cannot read presence of {}: {e}", ev.client_id),
                );
                return Action::ReconsumeLater;
            }
        };
        let channel_closed = channel_events
            .iter()
            .any(|f| matches!(f.tag.as_deref(), Some("disconnect" | "tcpclean")));
        // The device's newest state, and whether it is of this connection.
        let (states, of_channel) = match (
            find_by_key(STATE_TOPIC, &ev.client_id),
            find_by_key(STATE_TOPIC, &ev.channel_id),
        ) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                log(
                    Level::Error,
                    &format!("cannot read the state of {}: {e}", ev.client_id),
                );
                return Action::ReconsumeLater;
            }
        };
        let of_channel = ids(&of_channel);
        let current = states.first().map(|s| {
            (
                s.tag.as_deref().unwrap_or(""),
                of_channel.contains(&s.message_id.as_str()),
            )
        });
        match decide(&ev.event_type, channel_closed, current) {
            Decision::Keep(why) => {
                log(
                    Level::Debug,
                    &format!(
                        "{} {} on {}: {why}",
                        ev.client_id, ev.event_type, ev.channel_id
                    ),
                );
                Action::CommitMessage
            }
            Decision::Write(state) => {
                let out = Outgoing::new(STATE_TOPIC, state.as_bytes().to_vec())
                    .tag(state)
                    .key(&ev.client_id)
                    .key(&ev.channel_id)
                    .property("channelId", &ev.channel_id)
                    .property("eventIndex", &ev.event_index.to_string())
                    .property("eventType", &ev.event_type);
                match send(out) {
                    Ok(_) => {
                        log(
                            Level::Info,
                            &format!("{} is {state} ({})", ev.client_id, ev.channel_id),
                        );
                        Action::CommitMessage
                    }
                    Err(e) => {
                        log(
                            Level::Error,
                            &format!("cannot write the state of {}: {e}", ev.client_id),
                        );
                        Action::ReconsumeLater
                    }
                }
            }
        }
    }
}

wharf_sdk::export_plugin!(DevicePresence);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_gateway_body() {
        let b = r#"{"clientId":"GID_iot@@@lamp","time":1,"eventType":"tcpclean","channelId":"h-7","eventIndex":4294967301}"#;
        assert_eq!(
            parse(b),
            Some(Event {
                client_id: "GID_iot@@@lamp".into(),
                event_type: "tcpclean".into(),
                channel_id: "h-7".into(),
                event_index: 4294967301,
            })
        );
        assert_eq!(parse("{}"), None);
        assert_eq!(parse(r#"{"clientId":"a\"b"}"#), None);
    }

    #[test]
    fn flapping_rules() {
        // Takeover: the old connection's close after the new connect changes nothing.
        assert_eq!(
            decide("tcpclean", true, Some(("online", false))),
            Decision::Keep("a newer connection is online")
        );
        assert_eq!(
            decide("tcpclean", true, Some(("online", true))),
            Decision::Write("offline")
        );
        // A late connect of a connection that already closed.
        assert_eq!(
            decide("connect", true, None),
            Decision::Keep("this connection has closed already")
        );
        assert_eq!(
            decide("connect", false, Some(("offline", false))),
            Decision::Write("online")
        );
        assert_eq!(
            decide("connect", false, Some(("online", true))),
            Decision::Keep("already online on this connection")
        );
        assert_eq!(
            decide("disconnect", true, Some(("offline", true))),
            Decision::Keep("already offline")
        );
    }
}
