//! `plugin.toml` on arbitrary text: parsing and validation never panic, and an accepted
//! manifest written back out as TOML parses to the same manifest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wharf_fuzz::plugin::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(manifest) = Manifest::parse("plugin.toml", text) {
        let _ = manifest.subscriptions();
        let out = toml::to_string(&manifest).expect("a parsed manifest serializes");
        match Manifest::parse("written.toml", &out) {
            Ok(again) => assert_eq!(again, manifest, "round trip"),
            Err(e) => panic!("written manifest refused: {e}\n{out}"),
        }
    }
});
