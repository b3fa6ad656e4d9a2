#![no_main]
//! Fuzz target `instance_rootfs`: the property `fuzzing::instance_rootfs` in tests/support/fuzzing.rs says what holds.

#[path = "../../tests/support/fuzzing.rs"]
#[allow(dead_code)]
mod fuzzing;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::instance_rootfs(data));
