#![no_main]
//! Fuzz target `event_fold`: the property `fuzzing::event_fold` in tests/support/fuzzing.rs says what holds.

#[path = "../../tests/support/fuzzing.rs"]
#[allow(dead_code)]
mod fuzzing;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::event_fold(data));
