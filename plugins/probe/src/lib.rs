//! Test plugin: the message tag picks a behaviour, so one component drives every runtime test
//! and `wharf bench plugin`. Not an example to copy; see `order-timeout` for that.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use wharf_sdk::{Action, Context, Level, Message, Outgoing, Plugin};

struct Probe;

/// Calls served by this instance; shows whether the host reuses instances.
static CALLS: AtomicU64 = AtomicU64::new(0);

fn wanted(message: &Message, name: &str) -> Option<u64> {
    message.property(name).and_then(|v| v.parse().ok())
}

fn commit_if(ok: bool) -> Action {
    if ok {
        Action::CommitMessage
    } else {
        Action::ReconsumeLater
    }
}

impl Plugin for Probe {
    fn consume(message: &Message, context: &Context) -> Action {
        let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        match message.tag().unwrap_or("") {
            // Read the body and commit: the benchmark's unit of work.
            "" | "commit" => {
                black_box(message.body().len());
                Action::CommitMessage
            }
            "retry" => Action::ReconsumeLater,
            "trap" => panic!("probe asked to trap"),
            "loop" => loop {
                black_box(&calls);
            },
            "oom" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    black_box(&hoard);
                }
            }
            "send" => {
                let to = message.property("to").unwrap_or("Notify");
                let out = Outgoing::new(to, message.body().to_vec())
                    .tag("probe")
                    .key(&message.id().to_string());
                match (wharf_sdk::send(out), wanted(message, "expect_code")) {
                    (Ok(_), None) => Action::CommitMessage,
                    (Err(e), Some(code)) => {
                        wharf_sdk::log(Level::Info, &format!("send refused as expected: {e}"));
                        commit_if(u64::from(e.code) == code)
                    }
                    (Ok(_), Some(_)) | (Err(_), None) => Action::ReconsumeLater,
                }
            }
            "find" => {
                let topic = message.property("topic").unwrap_or("Trade");
                let key = message
                    .keys()
                    .first()
                    .map(|k| k.to_string())
                    .unwrap_or_default();
                match wharf_sdk::find_by_key(topic, &key) {
                    Ok(found) => commit_if(found.iter().any(|f| f.tag.as_deref() == Some("pay"))),
                    Err(e) => commit_if(Some(u64::from(e.code)) == wanted(message, "expect_code")),
                }
            }
            "log" => {
                wharf_sdk::log(Level::Info, message.body_str().unwrap_or("<binary>"));
                Action::CommitMessage
            }
            "clock" => commit_if(Some(wharf_sdk::now_ms()) == wanted(message, "now")),
            "attempt" => {
                commit_if(Some(u64::from(context.attempt())) == wanted(message, "attempt"))
            }
            "calls" => commit_if(Some(calls) == wanted(message, "calls")),
            "fields" => commit_if(
                message.property("color") == Some("blue")
                    && message.keys() == ["k1", "k2"]
                    && message.topic() == "Trade"
                    && context.group() == wanted_group(message)
                    && message.id().to_string().len() == 32,
            ),
            _ => Action::ReconsumeLater,
        }
    }
}

fn wanted_group(message: &Message) -> &str {
    message.property("group").unwrap_or("")
}

wharf_sdk::export_plugin!(Probe);
