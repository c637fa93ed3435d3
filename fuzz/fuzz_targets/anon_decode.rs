//! Arbitrary bytes through the loader's decoder of `http_log_anon` records: no panic, and whatever
//! it accepts re-encodes to something it decodes to the same record.
#![no_main]

use edgelog::anon_record::{decode, encode, VERSION};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = decode(data) {
        assert_eq!(r.version, VERSION);
        let again = decode(&encode(&r)).expect("a re-encoded record decodes");
        assert_eq!(again, r);
    }
});
