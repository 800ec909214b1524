#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| telcoflow_fuzz::sip::rtcp(data));
