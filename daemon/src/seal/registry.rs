//! The key providers nbdcrypt knows, and everything about each in one place.
//!
//! # Adding a provider
//!
//! A provider is one type implementing [`Provider`] (usually a unit struct next to its
//! [`SealProvider`] implementation, as [`super::kms::Kms`] and [`super::pkcs11::Pkcs11Hsm`]) and one
//! line in [`PROVIDERS`]. Nothing else needs editing:
//!
//! - **Operator settings** ([`Provider::settings`]): each [`SettingSpec`] becomes a daemon flag
//!   `--KEY`, a TOML key `KEY` in nbdcryptd's config file, and the same flag on nbdcryptctl's token
//!   commands (`enroll`, `rekey`, `test-token`, which also read the daemon's file with `--config`).
//!   The values arrive as strings in a [`RawSettings`]; [`Provider::configure`] checks them once
//!   and returns the provider's own typed settings (any `Send + Sync` type), which the registry
//!   hands back, as `&dyn Any`, to [`Provider::for_token`] and [`Provider::for_enroll`]. Empty
//!   settings must configure (to "nothing allowed"): most hosts use one provider.
//! - **Token type** ([`Provider::token_type`]): the LUKS2 token type (`nbdcrypt-NAME`) whose
//!   tokens this provider unseals. The LUKS2 side (`luks2::tokens`) writes and parses the token
//!   JSON; the provider sees only its own parameters (the `params` of [`Sealed`]).
//! - **Enrol flag** ([`Provider::enroll_flag`]): `nbdcryptctl enroll --FLAG VALUE`; VALUE (a key
//!   id, a URI, a server) goes to [`Provider::for_enroll`]. The flag may be given several times
//!   with `--quorum K`, once per share.
//! - **Seal / unseal**: [`Provider::for_token`] builds the [`SealProvider`] that unseals a token.
//!   The token is attacker-written (anyone holding the disk can rewrite the header): take every
//!   endpoint, module, key allow-list and credential from the operator's settings, use the
//!   token's copies only to check they agree, and refuse with [`SealError::Untrusted`] or
//!   [`SealError::NotConfigured`] **before any network request or library load**.
//! - **Errors**: map the provider's own errors (SDK, CK_RV, HTTP) to [`SealError`] inside the
//!   provider, once; callers decide retry ([`SealError::is_transient`]), exit codes and audit
//!   from the variant alone. Never put a secret (PIN, plaintext) in an error.
//! - **Words** ([`Provider::label`], [`Provider::key_param`]): how `policy`, `dump`, the audit log
//!   and messages name a token of this provider ("AWS KMS arn:…", "HSM token/object").

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::{SealError, SealProvider};

/// One operator setting of a provider: daemon flag `--KEY`, TOML key `KEY`, nbdcryptctl flag
/// `--KEY` (plus `aliases`).
#[derive(Debug, Clone, Copy)]
pub struct SettingSpec {
    /// kebab-case, unique across providers, prefixed by the provider (`kms-endpoint`).
    pub key: &'static str,
    /// Other flag names accepted on the command line (not in TOML).
    pub aliases: &'static [&'static str],
    pub value_name: &'static str,
    /// One line of --help.
    pub help: &'static str,
    /// May be given several times (a TOML array).
    pub repeated: bool,
}

/// The flag `nbdcryptctl enroll` takes for a provider (`--kms KEY`).
#[derive(Debug, Clone, Copy)]
pub struct EnrollFlag {
    pub long: &'static str,
    pub value_name: &'static str,
    pub help: &'static str,
}

/// What the operator typed for the providers' settings (flags, TOML), by key, unchecked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawSettings(BTreeMap<String, Vec<String>>);

impl RawSettings {
    /// The value of a single-valued setting (empty strings count as unset).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .and_then(|v| v.last())
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    /// Every value of a repeated setting.
    pub fn get_all(&self, key: &str) -> &[String] {
        self.0.get(key).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Replaces the values of `key`.
    pub fn set(&mut self, key: &str, values: Vec<String>) {
        self.0.insert(key.to_owned(), values);
    }

    pub fn contains(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// `self` with every key `over` sets replaced by its values (flags over a config file).
    pub fn overlaid(mut self, over: &RawSettings) -> RawSettings {
        for (k, v) in &over.0 {
            self.0.insert(k.clone(), v.clone());
        }
        self
    }
}

/// A provider's checked settings, as its [`Provider::configure`] returned them.
pub type Configured = Arc<dyn Any + Send + Sync>;

/// One key provider (KMS, HSM, ...). See the module documentation for how to add one.
pub trait Provider: Send + Sync {
    /// Short name for logs, the audit trail and `dump`: "aws-kms", "pkcs11".
    fn name(&self) -> &'static str;
    /// Words for people: "AWS KMS", "HSM".
    fn label(&self) -> &'static str;
    /// LUKS2 token type of the tokens this provider seals ("nbdcrypt-aws-kms").
    fn token_type(&self) -> &'static str;
    /// Token parameter naming the key (for messages; informational, never trusted).
    fn key_param(&self) -> &'static str;
    /// The operator settings this provider reads.
    fn settings(&self) -> &'static [SettingSpec];
    /// Checks the raw settings and returns the typed ones. Empty settings must succeed.
    fn configure(&self, raw: &RawSettings) -> Result<Configured, String>;
    /// The provider that unseals a token with these (attacker-written) parameters, from the
    /// operator's settings (`configured`: what [`Provider::configure`] returned).
    fn for_token(
        &self,
        params: &Map<String, Value>,
        configured: &(dyn Any + Send + Sync),
    ) -> Result<Box<dyn SealProvider>, SealError>;
    /// `nbdcryptctl enroll --FLAG VALUE`.
    fn enroll_flag(&self) -> EnrollFlag;
    /// The provider that seals under `value` (what the operator gave to the enrol flag).
    fn for_enroll(
        &self,
        value: &str,
        configured: &(dyn Any + Send + Sync),
    ) -> Result<Box<dyn SealProvider>, SealError>;
    /// TOML lines nbdcryptd needs to unseal what was just sealed under `key` (printed by
    /// `enroll`); none by default.
    fn daemon_config_lines(
        &self,
        _key: &str,
        _configured: &(dyn Any + Send + Sync),
    ) -> Vec<String> {
        Vec::new()
    }
    /// "AWS KMS arn:…" for a token's parameters (for `policy`). Attacker-written: callers escape.
    fn describe(&self, params: &Map<String, Value>) -> String {
        match params.get(self.key_param()).and_then(Value::as_str) {
            Some(k) => format!("{} {k}", self.label()),
            None => self.label().to_owned(),
        }
    }
}

/// Every provider, in the order flags and help list them.
pub static PROVIDERS: &[&dyn Provider] = &[
    &super::kms::Kms,
    &super::pkcs11::Pkcs11Hsm,
    &super::clevis::provider::ClevisPins,
];

/// The provider owning a LUKS2 token type, or `None` (another tool's token).
pub fn by_token_type(token_type: &str) -> Option<&'static dyn Provider> {
    PROVIDERS
        .iter()
        .copied()
        .find(|p| p.token_type() == token_type)
}

/// The provider of this short name ("aws-kms").
pub fn by_name(name: &str) -> Option<&'static dyn Provider> {
    PROVIDERS.iter().copied().find(|p| p.name() == name)
}

/// The provider declaring setting `key`, and the setting.
pub fn setting(key: &str) -> Option<(&'static dyn Provider, &'static SettingSpec)> {
    PROVIDERS
        .iter()
        .copied()
        .find_map(|p| p.settings().iter().find(|s| s.key == key).map(|s| (p, s)))
}

/// The clap arguments of every provider setting (daemon and nbdcryptctl), ids = keys.
pub fn setting_args() -> Vec<clap::Arg> {
    let mut out = Vec::new();
    for p in PROVIDERS {
        for s in p.settings() {
            let mut a = clap::Arg::new(s.key)
                .long(s.key)
                .value_name(s.value_name)
                .help(s.help)
                .help_heading(p.label());
            for al in s.aliases {
                a = a.visible_alias(*al);
            }
            a = if s.repeated {
                a.action(clap::ArgAction::Append)
            } else {
                a.action(clap::ArgAction::Set)
            };
            out.push(a);
        }
    }
    out
}

/// The settings the user typed among `matches` (parsed with [`setting_args`]).
pub fn settings_from_matches(m: &clap::ArgMatches) -> RawSettings {
    let mut raw = RawSettings::default();
    for p in PROVIDERS {
        for s in p.settings() {
            if let Ok(Some(v)) = m.try_get_many::<String>(s.key) {
                raw.set(s.key, v.cloned().collect());
            }
        }
    }
    raw
}

/// Every provider's settings as flags, for `#[command(flatten)]` in clap derive structs.
#[derive(Debug, Clone, Default)]
pub struct SettingFlags {
    pub raw: RawSettings,
}

impl clap::FromArgMatches for SettingFlags {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Ok(SettingFlags {
            raw: settings_from_matches(m),
        })
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        self.raw = self.raw.clone().overlaid(&settings_from_matches(m));
        Ok(())
    }
}

impl clap::Args for SettingFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd.args(setting_args())
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl std::fmt::Debug for dyn Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_token_types_flags_and_setting_keys_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for p in PROVIDERS {
            for (what, s) in [
                ("name", p.name()),
                ("type", p.token_type()),
                ("flag", p.enroll_flag().long),
            ] {
                assert!(seen.insert(format!("{what}:{s}")), "{what} {s} twice");
            }
            assert!(
                p.token_type().starts_with("nbdcrypt-"),
                "{}",
                p.token_type()
            );
            for s in p.settings() {
                assert!(
                    seen.insert(format!("flag:{}", s.key)),
                    "flag {} twice",
                    s.key
                );
                assert_eq!(setting(s.key).map(|(q, _)| q.name()), Some(p.name()));
            }
            assert_eq!(
                by_token_type(p.token_type()).map(|q| q.name()),
                Some(p.name())
            );
            assert_eq!(
                by_name(p.name()).map(|q| q.token_type()),
                Some(p.token_type())
            );
        }
        assert!(by_token_type("clevis").is_none());
    }

    #[test]
    fn empty_settings_configure_and_refuse_every_token_before_any_request() {
        let s = crate::seal::SealSettings::default();
        for p in PROVIDERS {
            let c = s.get(p.name()).expect("configured");
            let e = p.for_token(&Map::new(), c).err().expect("refused");
            assert!(!e.is_transient(), "{}: {e}", p.name());
        }
    }

    #[test]
    fn flags_overlay_file_values_per_key() {
        let mut file = RawSettings::default();
        file.set("kms-region", vec!["eu-west-1".into()]);
        file.set("kms-allow-key", vec!["a".into(), "b".into()]);
        let mut flags = RawSettings::default();
        flags.set("kms-allow-key", vec!["c".into()]);
        let r = file.overlaid(&flags);
        assert_eq!(r.get("kms-region"), Some("eu-west-1"));
        assert_eq!(r.get_all("kms-allow-key"), ["c"]);
        let s = crate::seal::SealSettings::from_raw(r).unwrap();
        assert_eq!(s.kms().allowed_keys, ["c"]);
        let mut bad = RawSettings::default();
        bad.set("pkcs11-pin", vec!["1234".into()]);
        let e = crate::seal::SealSettings::from_raw(bad).unwrap_err();
        assert!(e.contains("pkcs11-pin") && !e.contains("1234"), "{e}");
    }
}
