//! libFuzzer driver of `ocifs::fuzzing::checkpoint_file` (see src/fuzzing/mod.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ocifs::fuzzing::checkpoint_file(data));
