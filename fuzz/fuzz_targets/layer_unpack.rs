#![no_main]
//! Fuzz target `layer_unpack`: the property `fuzzing::layer_unpack` in tests/support/fuzzing.rs says what holds.

#[path = "../../tests/support/fuzzing.rs"]
#[allow(dead_code)]
mod fuzzing;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::layer_unpack(data));
