//! libFuzzer driver of `ocifs::fuzzing::zstdchunked` (see src/fuzzing/mod.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ocifs::fuzzing::zstdchunked(data));
