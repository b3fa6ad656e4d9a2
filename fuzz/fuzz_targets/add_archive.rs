#![no_main]
//! Fuzz target `add_archive`: the property `fuzzing::add_archive` in tests/support/fuzzing.rs says what holds.

#[path = "../../tests/support/fuzzing.rs"]
#[allow(dead_code)]
mod fuzzing;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::add_archive(data));
