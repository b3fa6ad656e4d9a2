#![no_main]
//! Fuzz target `syslog_stream`: the property `fuzzing::syslog_stream` in tests/support/fuzzing.rs says what holds.

#[path = "../../tests/support/fuzzing.rs"]
#[allow(dead_code)]
mod fuzzing;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::syslog_stream(data));
