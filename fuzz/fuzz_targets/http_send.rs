//! The HTTP send body (one message object or an array of them) on arbitrary bytes: parsing
//! never panics, and an accepted body yields one message for an object and one per element,
//! in order, for an array.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wharf_fuzz::http::messages::parse_send;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_send(data) {
        let first = data.iter().find(|b| !b.is_ascii_whitespace());
        assert_eq!(req.batch, first == Some(&b'['), "batch iff the body is an array");
        if req.batch {
            let array: Vec<serde_json::Value> =
                serde_json::from_slice(data).expect("an accepted batch is a JSON array");
            assert_eq!(req.messages.len(), array.len());
        } else {
            assert_eq!(req.messages.len(), 1);
        }
    }
});
