//! The TOML configuration file (`nbdcryptd --config /etc/nbdcrypt/NAME.toml`), one volume per
//! file. Keys are the long command-line flags without the dashes' prefix; flags given on the
//! command line win over the file. Errors name the file, the line and the key.
//!
//! ```toml
//! volume = "/srv/db.img"
//! name = "db"
//! unix = "/run/nbdcrypt/db.sock"
//! control = "/run/nbdcrypt/db.control.sock"
//! unlock-key-file = "/run/credentials/nbdcryptd@db.service/passphrase"
//! allow-discards = false
//! read-only = false
//! max-conn-bytes = "64M"
//! # Where KMS keys may come from (never from the volume header):
//! kms-endpoint = "https://vpce-0abc.kms.eu-west-1.vpce.amazonaws.com"
//! kms-region = "eu-west-1"
//! kms-allow-key = ["arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"]
//! # The volume this daemon may unlock (`nbdcryptctl pin /srv/db.img`):
//! volume-uuid = "0b7e3a4c-1d2e-4f5a-8b9c-0d1e2f3a4b5c"
//! volume-key-digest = "pbkdf2:sha256:1000:SALT_BASE64:DIGEST_BASE64"
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::config::{parse_mode, parse_size, Args};

// Unknown keys are refused by `parse` (they land in `providers` first: the keys of the provider
// registry's settings are not fields here).
#[derive(Deserialize, Default, Debug)]
#[serde(rename_all = "kebab-case")]
pub struct FileConfig {
    volume: Option<PathBuf>,
    plain: Option<PathBuf>,
    unlock_key_file: Option<PathBuf>,
    auto_unlock: Option<bool>,
    share_timeout: Option<u64>,
    volume_uuid: Option<String>,
    volume_key_digest: Option<String>,
    audit_log: Option<PathBuf>,
    control: Option<PathBuf>,
    unix: Option<PathBuf>,
    socket_mode: Option<Spanned<String>>,
    tcp: Option<SocketAddr>,
    insecure_tcp: Option<bool>,
    name: Option<String>,
    description: Option<String>,
    read_only: Option<bool>,
    allow_discards: Option<bool>,
    direct: Option<bool>,
    handshake_timeout: Option<u64>,
    max_connections: Option<usize>,
    max_conn_bytes: Option<Spanned<String>>,
    max_server_bytes: Option<Spanned<String>>,
    threads: Option<usize>,
    log_level: Option<String>,
    /// Key provider settings (`kms-endpoint`, `pkcs11-pin`, ...: `seal::registry`), checked by
    /// `parse`.
    #[serde(flatten)]
    providers: BTreeMap<String, toml::Value>,
}

/// Read and check `path`.
pub fn load(path: &Path) -> Result<(FileConfig, String), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let cfg = parse(path, &text)?;
    Ok((cfg, text))
}

/// Parse and check the text of `path`: types, and no unknown key.
pub fn parse(path: &Path, text: &str) -> Result<FileConfig, String> {
    let cfg: FileConfig = toml::from_str(text).map_err(|e| {
        // toml's message already names the line, column and key; put the file in front.
        format!("{}: {}", path.display(), e.to_string().trim_end())
    })?;
    for (key, value) in &cfg.providers {
        let at = format!(
            "{}: line {}, key `{key}`",
            path.display(),
            line_of(text, key)
        );
        let Some((_, spec)) = crate::seal::registry::setting(key) else {
            return Err(format!(
                "{at}: unknown key (keys are nbdcryptd's long flags without the dashes; see \
                 nbdcryptd --help)"
            ));
        };
        let ok = match value {
            toml::Value::String(_) => true,
            toml::Value::Array(a) => spec.repeated && a.iter().all(toml::Value::is_str),
            _ => false,
        };
        if !ok {
            return Err(format!(
                "{at}: expected {}",
                if spec.repeated {
                    "a string or an array of strings"
                } else {
                    "a string"
                }
            ));
        }
    }
    Ok(cfg)
}

/// The line (1-based) where top-level `key` is set, for messages; 1 if not found.
fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map_or(1, |i| i + 1)
}

impl FileConfig {
    /// The `volume` the file serves, if it names one.
    pub fn volume(&self) -> Option<&Path> {
        self.volume.as_deref()
    }

    /// The volume pin of this file alone (`volume-uuid`, `volume-key-digest`).
    pub fn volume_pin(&self) -> Result<crate::seal::pin::VolumePin, String> {
        crate::seal::pin::VolumePin::parse(
            self.volume_uuid.as_deref(),
            self.volume_key_digest.as_deref(),
        )
    }

    /// The provider settings of this file, unchecked.
    pub fn provider_settings(&self) -> crate::seal::registry::RawSettings {
        let mut raw = crate::seal::registry::RawSettings::default();
        for (key, value) in &self.providers {
            let values = match value {
                toml::Value::String(s) => vec![s.clone()],
                toml::Value::Array(a) => a
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
                _ => continue,
            };
            raw.set(key, values);
        }
        raw
    }

    /// The seal settings of this file alone (for `nbdcryptctl --config`, which trusts the same
    /// KMS and HSM as the daemon configured by the file).
    pub fn seal_settings(&self) -> Result<crate::seal::SealSettings, String> {
        crate::seal::SealSettings::from_raw(self.provider_settings())
    }

    /// Fill `args` from the file wherever the command line did not set the flag.
    /// `from_cli(id)` tells whether the user typed flag `id`.
    pub fn apply(
        self,
        args: &mut Args,
        path: &Path,
        text: &str,
        from_cli: impl Fn(&str) -> bool,
    ) -> Result<(), String> {
        let at = |s: &Spanned<String>, key: &str, e: String| {
            let line = text[..s.span().start.min(text.len())]
                .lines()
                .count()
                .max(1);
            format!("{}: line {line}, key `{key}`: {e}", path.display())
        };
        let file_providers = self.provider_settings();
        for (key, _) in self.providers.iter() {
            if !from_cli(key) {
                args.providers
                    .raw
                    .set(key, file_providers.get_all(key).to_vec());
            }
        }
        let mode_on_cli = from_cli("volume") || from_cli("plain") || from_cli("demo");
        if !mode_on_cli {
            match (self.volume, self.plain) {
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "{}: give `volume` or `plain`, not both",
                        path.display()
                    ))
                }
                (v, p) => {
                    args.volume = v;
                    args.plain = p;
                }
            }
        }
        macro_rules! take {
            ($field:ident, $id:literal) => {
                if let Some(v) = self.$field {
                    if !from_cli($id) {
                        args.$field = v.into();
                    }
                }
            };
        }
        take!(unlock_key_file, "unlock_key_file");
        take!(auto_unlock, "auto_unlock");
        take!(share_timeout, "share_timeout");
        take!(volume_uuid, "volume_uuid");
        take!(volume_key_digest, "volume_key_digest");
        take!(audit_log, "audit_log");
        take!(control, "control");
        take!(unix, "unix");
        take!(tcp, "tcp");
        take!(insecure_tcp, "insecure_tcp");
        take!(name, "name");
        take!(description, "description");
        take!(read_only, "read_only");
        take!(allow_discards, "allow_discards");
        take!(direct, "direct");
        take!(handshake_timeout, "handshake_timeout");
        take!(max_connections, "max_connections");
        take!(threads, "threads");
        take!(log_level, "log_level");
        if let Some(s) = &self.socket_mode {
            if !from_cli("socket_mode") {
                args.socket_mode = parse_mode(s.get_ref()).map_err(|e| at(s, "socket-mode", e))?;
            }
        }
        if let Some(s) = &self.max_conn_bytes {
            if !from_cli("max_conn_bytes") {
                args.max_conn_bytes =
                    parse_size(s.get_ref()).map_err(|e| at(s, "max-conn-bytes", e))?;
            }
        }
        if let Some(s) = &self.max_server_bytes {
            if !from_cli("max_server_bytes") {
                args.max_server_bytes =
                    parse_size(s.get_ref()).map_err(|e| at(s, "max-server-bytes", e))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn apply(text: &str, argv: &[&str]) -> Result<Args, String> {
        let mut args = Args::parse_from(std::iter::once("nbdcryptd").chain(argv.iter().copied()));
        let cfg = parse(Path::new("/etc/nbdcrypt/t.toml"), text)?;
        // Derived flags have snake_case ids, provider settings their kebab-case keys.
        let typed: Vec<String> = argv
            .iter()
            .filter_map(|a| a.strip_prefix("--"))
            .flat_map(|a| [a.replace('-', "_"), a.to_owned()])
            .collect();
        cfg.apply(&mut args, Path::new("/etc/nbdcrypt/t.toml"), text, |id| {
            typed.iter().any(|t| t == id)
        })?;
        Ok(args)
    }

    #[test]
    fn file_values_fill_what_the_command_line_left_out() {
        let a = apply("volume = \"/srv/v.img\"\nname = \"db\"\nallow-discards = true\nmax-conn-bytes = \"128M\"\n", &[]).unwrap();
        assert_eq!(a.volume.as_deref(), Some(Path::new("/srv/v.img")));
        assert_eq!(a.name, "db");
        assert!(a.allow_discards);
        assert_eq!(a.max_conn_bytes, 128 << 20);
    }

    #[test]
    fn command_line_flags_win_over_the_file() {
        let a = apply(
            "volume = \"/srv/v.img\"\nname = \"db\"\n",
            &["--name", "other"],
        )
        .unwrap();
        assert_eq!(a.name, "other");
    }

    #[test]
    fn a_bad_value_names_the_file_line_and_key() {
        let e = apply("volume = \"/v\"\n\nmax-conn-bytes = \"12X\"\n", &[]).unwrap_err();
        assert!(
            e.contains("/etc/nbdcrypt/t.toml")
                && e.contains("line 3")
                && e.contains("max-conn-bytes"),
            "{e}"
        );
    }

    #[test]
    fn kms_settings_and_the_volume_pin_come_from_the_file() {
        let a = apply(
            "volume = \"/v\"\nkms-endpoint = \"http://127.0.0.1:4566\"\nkms-region = \"us-east-1\"\n\
             kms-allow-key = [\"arn:aws:kms:us-east-1:1:key/a\", \"b\"]\n\
             volume-uuid = \"0b7e3a4c-1d2e-4f5a-8b9c-0d1e2f3a4b5c\"\n",
            &[],
        )
        .unwrap();
        let c = crate::config::Config::from_args(a).unwrap();
        assert_eq!(
            c.seal.kms().endpoint.as_deref(),
            Some("http://127.0.0.1:4566")
        );
        assert_eq!(c.seal.kms().region.as_deref(), Some("us-east-1"));
        assert_eq!(
            c.seal.kms().allowed_keys,
            ["arn:aws:kms:us-east-1:1:key/a", "b"]
        );
        assert_eq!(
            c.pin.uuid.as_deref(),
            Some("0b7e3a4c-1d2e-4f5a-8b9c-0d1e2f3a4b5c")
        );
        let e = apply("volume = \"/v\"\nkms-allow-key = [\"alias/x\"]\n", &[])
            .and_then(crate::config::Config::from_args);
        assert!(e.unwrap_err().contains("alias"));
    }

    #[test]
    fn provider_flags_win_over_the_file_per_key() {
        let a = apply(
            "volume = \"/v\"\nkms-region = \"us-east-1\"\nkms-allow-key = [\"a\"]\n\
             pkcs11-pin = \"file:/etc/pin\"\n",
            &["--kms-allow-key", "b", "--kms-allow-key", "c"],
        )
        .unwrap();
        let c = crate::config::Config::from_args(a).unwrap();
        assert_eq!(c.seal.kms().region.as_deref(), Some("us-east-1"));
        assert_eq!(c.seal.kms().allowed_keys, ["b", "c"]);
        assert!(c.seal.pkcs11().pin.is_some());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let e = parse(
            Path::new("t.toml"),
            "volume = \"/v\"\nallow_discard = true\n",
        )
        .unwrap_err();
        assert!(e.contains("allow_discard") && e.contains("line 2"), "{e}");
        let e = parse(Path::new("t.toml"), "volume = \"/v\"\n\nkms-region = 5\n").unwrap_err();
        assert!(e.contains("kms-region") && e.contains("line 3"), "{e}");
        let e = parse(Path::new("t.toml"), "kms-endpoint = [\"a\"]\n").unwrap_err();
        assert!(e.contains("expected a string"), "{e}");
    }
}
