#![no_main]
//! Fuzz target `api_request`: the property `fuzzing::api_request` in tests/support/fuzzing.rs says what holds.

#[path = "../../tests/support/fuzzing.rs"]
#[allow(dead_code)]
mod fuzzing;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::api_request(data));
