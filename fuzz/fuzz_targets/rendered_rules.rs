#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kwp::fuzzing::rendered_rules(data));
