//! Sealing a keyslot secret with a KMS or an HSM. Knows the providers, not LUKS2: the `token`
//! module turns a sealed secret into LUKS2 token JSON and back.
//!
//! The systemd-cryptenroll pattern: a random 32-byte secret opens an ordinary LUKS2 keyslot
//! (pbkdf2, low iterations: the secret has full entropy). The secret is stored only sealed by a
//! provider, in a token bound to that keyslot; the seal is bound to the volume UUID and keyslot
//! (KMS encryption context / GCM additional data), so a token copied to another volume or
//! keyslot does not open.

pub mod pkcs11;

use std::fmt;

use serde_json::{Map, Value};

use crate::crypto::keys::SecretBytes;

pub mod clevis;
pub mod enroll;
pub mod kms;
pub mod pin;
pub mod token;

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
/// One struct for every provider, passed whole, so a provider registry can grow here.
#[derive(Debug, Clone, Default)]
pub struct SealSettings {
    pub kms: KmsSettings,
    pub pkcs11: Pkcs11Settings,
    /// clevis tokens: the Tang servers that may be asked, the TPM to use.
    pub clevis: clevis::ClevisSettings,
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

/// Builds the provider that unseals one of our tokens (the whole token object, as in the
/// header), from the operator's `settings`; pass this as the resolver of
/// [`enroll::unlock_with_tokens`].
///
/// - `nbdcrypt-aws-kms`: [`kms::KmsProvider::for_token`]: the configured endpoint and region,
///   and only if the token's key is one of the allowed keys and its informational endpoint and
///   region agree with the configuration — checked before any network request.
/// - `nbdcrypt-pkcs11`: the configured module and PIN source (never the stored URI's).
/// - anything else: `BadToken` (not ours; callers skip such tokens before asking).
pub fn resolve_provider(
    token_json: &Map<String, Value>,
    settings: &SealSettings,
) -> Result<Box<dyn SealProvider>, SealError> {
    let parsed = token::parse_json(token_json)?.ok_or_else(|| {
        SealError::BadToken(format!(
            "token type {} is not an nbdcrypt token",
            token_json
                .get("type")
                .map(|t| t.to_string())
                .unwrap_or_else(|| "(none)".into())
        ))
    })?;
    match parsed.kind {
        token::ProviderKind::AwsKms => Ok(Box::new(kms::KmsProvider::for_token(
            &parsed.sealed.params,
            &settings.kms,
        )?)),
        token::ProviderKind::Pkcs11 => resolve_pkcs11_with(&parsed.sealed.params, &settings.pkcs11),
    }
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
