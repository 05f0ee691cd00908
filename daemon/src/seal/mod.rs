//! Sealing a keyslot secret with a KMS or an HSM. Knows the providers, not LUKS2:
//! `luks2::tokens` turns a sealed secret into LUKS2 token JSON and back, enrols and unlocks.
//! Every provider is listed once, in [`registry`] (read it to add one).
//!
//! The systemd-cryptenroll pattern: a random 32-byte secret opens an ordinary LUKS2 keyslot
//! (pbkdf2, low iterations: the secret has full entropy). The secret is stored only sealed by a
//! provider, in a token bound to that keyslot; the seal is bound to the volume UUID and keyslot
//! (KMS encryption context / GCM additional data), so a token copied to another volume or
//! keyslot does not open.

pub mod pkcs11;

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

use crate::crypto::keys::SecretBytes;

pub mod clevis;
pub mod kms;
pub mod pin;
pub mod registry;
pub mod shamir;

/// Length of the random keyslot secret every provider seals.
pub const SECRET_LEN: usize = 32;

/// What a sealed secret is bound to. Moving it elsewhere makes unsealing fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub volume_uuid: String,
    pub keyslot: u32,
}

impl Binding {
    /// Additional authenticated data for AEAD-based providers: stable, unambiguous bytes.
    pub fn aad(&self) -> Vec<u8> {
        format!(
            "nbdcrypt-v1\0volume={}\0keyslot={}",
            self.volume_uuid, self.keyslot
        )
        .into_bytes()
    }
}

/// A secret as the provider returned it, plus the non-secret parameters needed to unseal it
/// (key id, IV, ...), as JSON members to store in the token.
#[derive(Clone, PartialEq)]
pub struct Sealed {
    pub ciphertext: Vec<u8>,
    pub params: serde_json::Map<String, serde_json::Value>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Ciphertext is not secret, but it is noise in logs.
        f.debug_struct("Sealed")
            .field("ciphertext_len", &self.ciphertext.len())
            .field("params", &self.params)
            .finish()
    }
}

/// One KMS or HSM that can seal and unseal keyslot secrets.
pub trait SealProvider: Send + Sync {
    /// Token type written into the LUKS2 header, e.g. "nbdcrypt-aws-kms".
    fn token_type(&self) -> &'static str;
    /// Human-readable key reference for logs and the audit trail (KMS key id, PKCS#11 URI).
    fn key_reference(&self) -> String;
    fn seal(&self, secret: &SecretBytes, binding: &Binding) -> Result<Sealed, SealError>;
    fn unseal(&self, sealed: &Sealed, binding: &Binding) -> Result<SecretBytes, SealError>;
}

/// Why sealing or unsealing failed, sorted by what the operator has to do about it.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("access denied by {provider}: {detail} (check the key policy / IAM permissions or the token's access rules)")]
    AccessDenied {
        provider: &'static str,
        detail: String,
    },
    #[error("the sealed secret does not belong to this volume and keyslot (token copied from another volume?)")]
    WrongBinding,
    #[error("key {key} is disabled or pending deletion in {provider}; re-enable it or rekey to another key")]
    KeyDisabled { provider: &'static str, key: String },
    #[error("{provider} login failed: {detail} (check the PIN)")]
    LoginFailed {
        provider: &'static str,
        detail: String,
    },
    #[error("key {key} not found in {provider}")]
    KeyMissing { provider: &'static str, key: String },
    #[error("{provider} unreachable: {detail}")]
    Unreachable {
        provider: &'static str,
        detail: String,
    },
    #[error("malformed token: {0}")]
    BadToken(String),
    #[error("{provider}: {detail}")]
    Other {
        provider: &'static str,
        detail: String,
    },
    /// The operator configured nothing for this provider: says which flag / TOML key to set.
    #[error("{provider} is not configured: {detail}")]
    NotConfigured {
        provider: &'static str,
        detail: String,
    },
    /// The token asks for something the operator's configuration does not allow (another key,
    /// endpoint or region). Nothing was sent anywhere.
    #[error("token refused before any {provider} request: {detail}")]
    Untrusted {
        provider: &'static str,
        detail: String,
    },
}

impl SealError {
    /// Worth retrying with backoff (network trouble), as opposed to a definite refusal.
    pub fn is_transient(&self) -> bool {
        matches!(self, SealError::Unreachable { .. })
    }
}

/// Everything the operator configured about the seal providers: where keys may go and come
/// from. The LUKS2 header, which anyone holding the disk can rewrite, never supplies any of it:
/// a token's copies of endpoint, region, key and module are informational, and must agree.
///
/// One value for every provider of the [`registry`], each provider's settings checked by its
/// own [`registry::Provider::configure`].
#[derive(Clone)]
pub struct SealSettings {
    raw: registry::RawSettings,
    configured: BTreeMap<&'static str, registry::Configured>,
}

impl fmt::Debug for SealSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Settings hold paths and key ids, never PINs themselves.
        f.debug_struct("SealSettings")
            .field("raw", &self.raw)
            .finish_non_exhaustive()
    }
}

impl Default for SealSettings {
    /// Nothing configured: every provider refuses every token before any request.
    fn default() -> Self {
        let raw = registry::RawSettings::default();
        let configured = registry::PROVIDERS
            .iter()
            .filter_map(|p| p.configure(&raw).ok().map(|c| (p.name(), c)))
            .collect();
        SealSettings { raw, configured }
    }
}

impl SealSettings {
    /// Checks `raw` with every provider. The error names the setting.
    pub fn from_raw(raw: registry::RawSettings) -> Result<SealSettings, String> {
        let mut configured = BTreeMap::new();
        for p in registry::PROVIDERS {
            configured.insert(p.name(), p.configure(&raw)?);
        }
        Ok(SealSettings { raw, configured })
    }

    /// What the operator typed (for `nbdcryptctl --config` merges).
    pub fn raw(&self) -> &registry::RawSettings {
        &self.raw
    }

    /// The checked settings of provider `name`, if configured.
    pub fn get(&self, name: &str) -> Option<&(dyn std::any::Any + Send + Sync)> {
        self.configured.get(name).map(|c| &**c)
    }

    /// The checked settings of provider `name`, as its own type.
    pub fn typed<T: 'static>(&self, name: &str) -> Option<&T> {
        self.get(name).and_then(|c| c.downcast_ref::<T>())
    }

    /// The AWS KMS settings (defaults if none).
    pub fn kms(&self) -> KmsSettings {
        self.typed::<KmsSettings>(kms::PROVIDER)
            .cloned()
            .unwrap_or_default()
    }

    /// The clevis settings: allowed Tang servers, the TPM (defaults if none).
    pub fn clevis(&self) -> clevis::ClevisSettings {
        self.typed::<clevis::ClevisSettings>(clevis::provider::NAME)
            .cloned()
            .unwrap_or_default()
    }

    /// The PKCS#11 settings (defaults if none).
    pub fn pkcs11(&self) -> Pkcs11Settings {
        self.typed::<Pkcs11Settings>(pkcs11::NAME)
            .cloned()
            .unwrap_or_default()
    }
}

/// The AWS KMS the operator trusts (daemon: `--kms-endpoint`, `--kms-region`,
/// `--kms-allow-key` or the TOML keys of the same names; nbdcryptctl: the same flags, or
/// `--config` with the daemon's file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KmsSettings {
    /// KMS endpoint URL. `None`: the SDK's (`AWS_ENDPOINT_URL_KMS`, else the regional AWS one).
    pub endpoint: Option<String>,
    /// `None`: the standard region chain (`AWS_REGION`, profile).
    pub region: Option<String>,
    /// Key ARNs or key ids a token may name. Empty: no KMS token is unsealed.
    pub allowed_keys: Vec<String>,
}

impl KmsSettings {
    /// Checks the configured values: endpoint an http(s) URL, allowed keys ARNs or ids (not
    /// aliases, which whoever controls them can re-point).
    pub fn validate(&self) -> Result<(), String> {
        if let Some(e) = &self.endpoint {
            if !(e.starts_with("https://") || e.starts_with("http://")) || e.len() > 2048 {
                return Err(format!("kms-endpoint {e:?} is not an http(s) URL"));
            }
        }
        if let Some(r) = &self.region {
            let ok = !r.is_empty()
                && r.len() <= 64
                && r.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-');
            if !ok {
                return Err(format!("kms-region {r:?} is not an AWS region name"));
            }
        }
        for k in &self.allowed_keys {
            if k.starts_with("alias/") || k.contains(":alias/") {
                return Err(format!(
                    "kms-allow-key {k:?}: an alias can be re-pointed to another key by whoever \
                     controls it; give the key ARN or key id (`aws kms describe-key --key-id {k}`)"
                ));
            }
            if k.trim().is_empty() || k.len() > 2048 {
                return Err(format!("kms-allow-key {k:?} is not a key ARN or key id"));
            }
        }
        Ok(())
    }
}

/// Builds the provider that unseals a token of type `token_type` with these (attacker-written)
/// parameters, from the operator's `settings`, through the [`registry`]:
///
/// - `nbdcrypt-aws-kms`: [`kms::KmsProvider::for_token`]: the configured endpoint and region,
///   and only if the token's key is one of the allowed keys and its informational endpoint and
///   region agree with the configuration — checked before any network request.
/// - `nbdcrypt-pkcs11`: the configured module and PIN source (never the stored URI's).
/// - anything else: `BadToken` (not ours; callers skip such tokens before asking).
pub fn resolve_provider(
    token_type: &str,
    params: &Map<String, Value>,
    settings: &SealSettings,
) -> Result<Box<dyn SealProvider>, SealError> {
    let Some(p) = registry::by_token_type(token_type) else {
        return Err(SealError::BadToken(format!(
            "token type {token_type:?} is not an nbdcrypt provider token"
        )));
    };
    let Some(c) = settings.get(p.name()) else {
        return Err(SealError::NotConfigured {
            provider: p.name(),
            detail: "its settings were refused at start".into(),
        });
    };
    p.for_token(params, c)
}

/// What a PKCS#11 token needs besides what its LUKS2 token stores: the module to load (never
/// taken from the header, which anyone can write) and where the user PIN comes from.
#[derive(Debug, Clone, Default)]
pub struct Pkcs11Settings {
    /// Default: `pkcs11::DEFAULT_MODULE` (SoftHSM2).
    pub module: Option<std::path::PathBuf>,
    pub pin: Option<pkcs11::PinSource>,
}

/// Build the PKCS#11 provider for a token of ours.
pub fn resolve_pkcs11_with(
    params: &Map<String, Value>,
    settings: &Pkcs11Settings,
) -> Result<Box<dyn SealProvider>, SealError> {
    let Some(pin_source) = &settings.pin else {
        return Err(SealError::LoginFailed {
            provider: "pkcs11",
            detail:
                "no PIN configured: give --pkcs11-pin file:/path or cred:NAME (TOML: pkcs11-pin)"
                    .into(),
        });
    };
    let pin = pin_source.read()?;
    let module = settings
        .module
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from(pkcs11::DEFAULT_MODULE));
    Ok(Box::new(pkcs11::Pkcs11Provider::from_token_params(
        params, module, pin,
    )?))
}
