//! Any byte string either parses into a view whose every tensor is in bounds, or gives an error;
//! it never panics, and verify/decompress never panic either.
#![no_main]

use cartridge_formats::cart;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(view) = cart::parse(data) {
        let _ = view.verify();
        if let Ok(raw) = view.decompress() {
            for t in &view.header.tensors {
                let bytes = cart::parse::tensor_bytes(t, raw.as_slice()).expect("validated bounds");
                assert_eq!(bytes.len() as u64, t.len);
            }
        }
    }
});
