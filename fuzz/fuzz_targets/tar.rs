//! libFuzzer driver of `ocifs::fuzzing::tar` (see src/fuzzing/mod.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ocifs::fuzzing::tar(data));
