//! Harnesses for the nbdcrypt fuzz targets. Each `fuzz_targets/NAME.rs` is a one-line
//! libFuzzer wrapper around [`run`]`("NAME", data)`; `tests/replay.rs` calls the same
//! functions on the seed corpora and on every kept finding (`regressions/NAME/*`), so a plain
//! `cargo test` replays them without libFuzzer or instrumentation.
//!
//! Every harness must return normally on any input. A panic, an abort, a timeout or an
//! out-of-memory is a finding; so is a failed `assert!` (a checked property, e.g. a read that
//! does not return what the plaintext model says, or two XTS implementations that disagree).

pub mod clevis;
pub mod config;
pub mod control;
pub mod luks2;
pub mod mem;
pub mod metrics;
pub mod nbd;
pub mod upstream;
pub mod tls;
pub mod xts;

/// Every target, by name (the name of its binary and its corpus/regression directories).
pub const TARGETS: &[&str] = &[
    "luks2_header",
    "luks2_json_raw",
    "luks2_json_model",
    "luks2_image_unlock",
    "nbd_handshake",
    "nbd_transmission",
    "nbd_session_model",
    "control_proto",
    "seal_token",
    "pkcs11_uri",
    "config_toml",
    "xts_diff",
    "luks2_reencrypt",
    "metrics_http",
    "clevis_token",
    "upstream_reply",
    "tls_certificates",
    "sha256_blocks_diff",
];

/// Runs target `name` on `data`. Panics on an unknown name.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "luks2_header" => luks2::header(data),
        "luks2_json_raw" => luks2::json_raw(data),
        "luks2_json_model" => luks2::json_model(data),
        "luks2_image_unlock" => luks2::image_unlock(data),
        "nbd_handshake" => nbd::handshake(data),
        "nbd_transmission" => nbd::transmission(data),
        "nbd_session_model" => nbd::session_model(data),
        "control_proto" => control::proto(data),
        "seal_token" => control::token(data),
        "pkcs11_uri" => control::pkcs11_uri(data),
        "config_toml" => config::toml(data),
        "xts_diff" => xts::diff(data),
        "luks2_reencrypt" => luks2::reencrypt(data),
        "metrics_http" => metrics::http(data),
        "clevis_token" => clevis::token(data),
        "upstream_reply" => upstream::reply(data),
        "tls_certificates" => tls::certificates(data),
        "sha256_blocks_diff" => xts::hash_diff(data),
        other => panic!("unknown fuzz target {other:?}"),
    }
}
