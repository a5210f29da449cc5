//! libFuzzer driver of `ocifs::fuzzing::soci` (see src/fuzzing/mod.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ocifs::fuzzing::soci(data));
