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

pub mod enroll;
pub mod kms;
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
        format!("nbdcrypt-v1\0volume={}\0keyslot={}", self.volume_uuid, self.keyslot).into_bytes()
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
        f.debug_struct("Sealed").field("ciphertext_len", &self.ciphertext.len()).field("params", &self.params).finish()
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
    AccessDenied { provider: &'static str, detail: String },
    #[error("the sealed secret does not belong to this volume and keyslot (token copied from another volume?)")]
    WrongBinding,
    #[error("key {key} is disabled or pending deletion in {provider}; re-enable it or rekey to another key")]
    KeyDisabled { provider: &'static str, key: String },
    #[error("{provider} login failed: {detail} (check the PIN)")]
    LoginFailed { provider: &'static str, detail: String },
    #[error("key {key} not found in {provider}")]
    KeyMissing { provider: &'static str, key: String },
    #[error("{provider} unreachable: {detail}")]
    Unreachable { provider: &'static str, detail: String },
    #[error("malformed token: {0}")]
    BadToken(String),
    #[error("{provider}: {detail}")]
    Other { provider: &'static str, detail: String },
}

impl SealError {
    /// Worth retrying with backoff (network trouble), as opposed to a definite refusal.
    pub fn is_transient(&self) -> bool {
        matches!(self, SealError::Unreachable { .. })
    }
}

/// Builds the provider that can unseal a token, from the token's JSON (the whole object, as in
/// the header). For the daemon's auto-unlock and `nbdcryptctl`: pass this as the resolver of
/// [`enroll::unlock_with_tokens`].
///
/// - `nbdcrypt-aws-kms`: [`kms::KmsProvider`] with the key ARN, region and endpoint stored in
///   the token (credentials from the standard AWS chain of the calling process).
/// - `nbdcrypt-pkcs11`: [`resolve_pkcs11`] (the PKCS#11 provider's hook).
/// - anything else: `BadToken` (not ours; callers skip such tokens before asking).
pub fn resolve_provider(token_json: &Map<String, Value>) -> Result<Box<dyn SealProvider>, SealError> {
    let parsed = token::parse_json(token_json)?.ok_or_else(|| {
        SealError::BadToken(format!(
            "token type {} is not an nbdcrypt token",
            token_json.get("type").map(|t| t.to_string()).unwrap_or_else(|| "(none)".into())
        ))
    })?;
    match parsed.kind {
        token::ProviderKind::AwsKms => {
            Ok(Box::new(kms::KmsProvider::from_token_params(&parsed.sealed.params)?))
        }
        token::ProviderKind::Pkcs11 => resolve_pkcs11(&parsed.sealed.params),
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
            detail: "no PIN configured: give --pkcs11-pin-file (or a systemd credential)".into(),
        });
    };
    let pin = pin_source.read()?;
    let module = settings.module.clone().unwrap_or_else(|| std::path::PathBuf::from(pkcs11::DEFAULT_MODULE));
    Ok(Box::new(pkcs11::Pkcs11Provider::from_token_params(params, module, pin)?))
}

/// PKCS#11 without settings: a clear error naming what is missing.
pub fn resolve_pkcs11(params: &Map<String, Value>) -> Result<Box<dyn SealProvider>, SealError> {
    resolve_pkcs11_with(params, &Pkcs11Settings::default())
}

/// [`resolve_provider`] with the PKCS#11 module and PIN the operator configured.
pub fn resolve_provider_with(
    token_json: &Map<String, Value>,
    pkcs11: &Pkcs11Settings,
) -> Result<Box<dyn SealProvider>, SealError> {
    match token::parse_json(token_json)? {
        Some(parsed) if parsed.kind == token::ProviderKind::Pkcs11 => {
            resolve_pkcs11_with(&parsed.sealed.params, pkcs11)
        }
        _ => resolve_provider(token_json),
    }
}
