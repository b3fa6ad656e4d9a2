#![no_main]
//! Fuzz target `oci_documents`: the property `fuzzing::oci_documents` in tests/support/fuzzing.rs says what holds.

#[path = "../../tests/support/fuzzing.rs"]
#[allow(dead_code)]
mod fuzzing;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::oci_documents(data));
