//! The daemon's TOML configuration file: parsed, applied over default flags, and checked into a
//! `Config`, as `nbdcryptd --config FILE` does.

use clap::Parser;

use nbdcrypt::config::{parse_mode, parse_size, Args, Config};
use nbdcrypt::config_file::FileConfig;

/// `config_toml`.
pub fn toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // The size and mode parsers the file's values go through, on the raw text too.
    let _ = parse_size(text);
    let _ = parse_mode(text);
    let cfg: FileConfig = match toml::from_str(text) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let Ok(mut args) = Args::try_parse_from(["nbdcryptd"]) else { panic!("default flags refused") };
    let path = std::path::Path::new("/etc/nbdcrypt/fuzz.toml");
    match cfg.apply(&mut args, path, text, |_| false) {
        Ok(()) => {
            let _ = Config::from_args(args).map(|c| format!("{c:?}"));
        }
        Err(e) => assert!(e.contains("fuzz.toml"), "error does not name the file: {e}"),
    }
}
