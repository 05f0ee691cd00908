//! The LUKS2 side of key providers: nbdcrypt's tokens in a LUKS2 header, and the keyslots they
//! open. `seal` knows the providers and nothing of LUKS2; this module knows LUKS2 tokens and
//! keyslots and asks `seal` (through its registry) to seal and unseal.
//!
//! - [`format`]: a provider's sealed secret as token JSON (`nbdcrypt-aws-kms`, ...), and back.
//! - [`enroll`]: enrol, unenrol, unlock by token, rekey (crash-safe header commits).
//! - [`quorum`]: one keyslot opened by k of n shares held by providers and people.
//! - [`clevis`]: clevis's own tokens (type `clevis`): unlock with them, enrol new ones.
//! - [`carry`]: a re-encryption carries each keyslot of the old key over to the new one.
//! - [`resume`]: an interrupted re-encryption's old and new keys opened through the tokens.

pub mod carry;
pub mod clevis;
pub mod enroll;
pub mod format;
pub mod quorum;
pub mod resume;

use serde_json::{Map, Value};

use crate::luks2::{KeyslotPriority, Luks2Header, Token};
use crate::seal::{resolve_provider, SealError, SealProvider, SealSettings};

/// A header's tokens of one kind in the order to try them: by their keyslot's priority (prefer,
/// then normal; keyslots marked "ignore" skipped), then token id; tokens that fail `parse` last,
/// with their error. `parse` answers `Ok(None)` for tokens of other kinds (left out).
pub(crate) fn in_try_order<T>(
    header: &Luks2Header,
    parse: impl Fn(u32, &Token) -> Result<Option<T>, SealError>,
    keyslot: impl Fn(&T) -> u32,
) -> Vec<(u32, Result<T, SealError>)> {
    let slots = header.keyslots();
    let prio = |slot: u32| {
        slots
            .iter()
            .find(|s| s.id == slot)
            .map(|s| s.priority)
            .unwrap_or(KeyslotPriority::Normal)
    };
    let mut out: Vec<(u8, u32, Result<T, SealError>)> = Vec::new();
    for (id, t) in header.tokens() {
        match parse(id, t) {
            Ok(None) => {}
            Ok(Some(p)) => match prio(keyslot(&p)) {
                KeyslotPriority::Ignore => {}
                KeyslotPriority::Prefer => out.push((0, id, Ok(p))),
                KeyslotPriority::Normal => out.push((1, id, Ok(p))),
            },
            Err(e) => out.push((2, id, Err(e))),
        }
    }
    out.sort_by_key(|(rank, id, _)| (*rank, *id));
    out.into_iter().map(|(_, id, r)| (id, r)).collect()
}

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
