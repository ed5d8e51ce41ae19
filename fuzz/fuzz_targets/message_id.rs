//! Message ids as users paste them: parsing arbitrary text never panics, and a parsed id prints
//! back to the same id (case aside) with the same time, node and position.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wharf_fuzz::model::MessageId;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = text.parse::<MessageId>() {
        let shown = id.to_string();
        assert!(shown.eq_ignore_ascii_case(text), "{shown} vs {text}");
        let back: MessageId = shown.parse().expect("a printed id parses");
        assert_eq!(back, id);
        let rebuilt = MessageId::new(id.stored_ms(), id.node(), id.position());
        assert_eq!(rebuilt, id, "fields round trip");
    }
});
