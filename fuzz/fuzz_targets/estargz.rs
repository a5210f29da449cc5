//! libFuzzer driver of `ocifs::fuzzing::estargz` (see src/fuzzing/mod.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ocifs::fuzzing::estargz(data));
