//! Receipts as consumers hand them back: decoding arbitrary text never panics, and a decoded
//! receipt encodes to text that decodes to the same delivery.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wharf_fuzz::broker::consume::receipt::Receipt;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = Receipt::decode(text) {
        let again = Receipt::decode(&r.encode()).expect("an encoded receipt decodes");
        assert_eq!(again, r);
    }
});
