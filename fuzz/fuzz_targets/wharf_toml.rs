//! `wharf.toml` on arbitrary text: parsing and validation never panic, and an accepted config
//! written back out as TOML is accepted again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wharf_fuzz::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text, "wharf.toml") {
        let out = toml::to_string(&config).expect("a parsed config serializes");
        if let Err(e) = Config::parse(&out, "written.toml") {
            panic!("written config refused: {e}\n{out}");
        }
    }
});
