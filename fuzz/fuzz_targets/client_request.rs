//! Fuzz target `client_request`: the check and what it asserts are in `fuzz/harness.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardcast_fuzz::client_request(data));
