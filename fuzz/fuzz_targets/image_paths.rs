#![no_main]
//! Fuzz target `image_paths`: the property `fuzzing::image_paths` in tests/support/fuzzing.rs says what holds.

#[path = "../../tests/support/fuzzing.rs"]
#[allow(dead_code)]
mod fuzzing;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::image_paths(data));
