#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kwp::fuzzing::hostile_plan(data));
