#![no_main]
// Harness: nbdcrypt_fuzz::run("sha256_blocks_diff", ...) in fuzz/src/ (replayed by `cargo test` there too).
libfuzzer_sys::fuzz_target!(|data: &[u8]| nbdcrypt_fuzz::run("sha256_blocks_diff", data));
