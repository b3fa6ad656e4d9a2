#![no_main]
//! Fuzz target `containerfile`: the property `fuzzing::containerfile` in tests/support/fuzzing.rs says what holds.

#[path = "../../tests/support/fuzzing.rs"]
#[allow(dead_code)]
mod fuzzing;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::containerfile(data));
