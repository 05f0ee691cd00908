//! The LUKS2 side of key providers: nbdcrypt's tokens in a LUKS2 header, and the keyslots they
//! open. `seal` knows the providers and nothing of LUKS2; this module knows LUKS2 tokens and
//! keyslots and asks `seal` (through its registry) to seal and unseal.
//!
//! - [`format`]: a provider's sealed secret as token JSON (`nbdcrypt-aws-kms`, ...), and back.
//! - [`enroll`]: enrol, unenrol, unlock by token, rekey (crash-safe header commits).
//! - [`quorum`]: one keyslot opened by k of n shares held by providers and people.
//! - [`clevis`]: clevis's own tokens (type `clevis`): unlock with them, enrol new ones.

pub mod clevis;
pub mod enroll;
pub mod format;
pub mod quorum;

use serde_json::{Map, Value};

use crate::seal::{resolve_provider, SealError, SealProvider, SealSettings};

/// Builds the provider that unseals one of our tokens (the whole token object, as in the
/// header) from the operator's `settings` (see [`crate::seal::resolve_provider`]); pass it as
/// the resolver of [`enroll::unlock_with_tokens`].
pub fn resolver(
    token_json: &Map<String, Value>,
    settings: &SealSettings,
) -> Result<Box<dyn SealProvider>, SealError> {
    let parsed = format::parse_json(token_json)?.ok_or_else(|| {
        SealError::BadToken(format!(
            "token type {} is not an nbdcrypt token",
            token_json
                .get("type")
                .map(|t| t.to_string())
                .unwrap_or_else(|| "(none)".into())
        ))
    })?;
    resolve_provider(parsed.kind.token_type(), &parsed.sealed.params, settings)
}
