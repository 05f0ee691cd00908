#![no_main]
// Harness: nbdcrypt_fuzz::run("tls_certificates", ...) in fuzz/src/ (replayed by `cargo test` there too).
libfuzzer_sys::fuzz_target!(|data: &[u8]| nbdcrypt_fuzz::run("tls_certificates", data));
