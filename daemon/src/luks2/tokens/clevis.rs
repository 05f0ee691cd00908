//! The LUKS2 side of clevis tokens: unlock with the `clevis` tokens of a header, enrol a new
//! keyslot with its token. Tokens are tried in keyslot priority order, then by id, like ours.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64U;
use base64::Engine;
use serde_json::{Map, Value};

use super::enroll::{EnrollError, Enrolled, TokenFailure, TokenFailureReason, TOKEN_KEYSLOT_KDF};
use crate::crypto::kdf::KdfLimits;
use crate::crypto::keys::{SecretBytes, VolumeKey};
use crate::luks2::{FormatError, Luks2Header, Token};
use crate::seal::clevis::jwe::Jwe;
use crate::seal::clevis::{self as pins, ClevisSettings, PinSpec, TOKEN_TYPE};
use crate::seal::SealError;

/// A clevis token of the header, parsed.
#[derive(Debug)]
pub struct ClevisToken {
    pub token_id: u32,
    pub keyslot: u32,
    pub jwe: Jwe,
}

/// Parses one token object; `Ok(None)` if it is not a clevis token.
pub fn parse_token(
    token_id: u32,
    t: &Map<String, Value>,
) -> Result<Option<ClevisToken>, SealError> {
    if t.get("type").and_then(Value::as_str) != Some(TOKEN_TYPE) {
        return Ok(None);
    }
    let slots = t
        .get("keyslots")
        .and_then(Value::as_array)
        .ok_or_else(|| pins::bad("no \"keyslots\" array".into()))?;
    // clevis itself only ever sees a token's first keyslot; so do we.
    let keyslot = slots
        .first()
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<u32>().ok())
        .ok_or_else(|| pins::bad("the token names no keyslot".into()))?;
    let jwe = Jwe::from_flattened(
        t.get("jwe")
            .ok_or_else(|| pins::bad("no \"jwe\" member".into()))?,
    )?;
    Ok(Some(ClevisToken {
        token_id,
        keyslot,
        jwe,
    }))
}

/// The header's clevis tokens in the order to try them (keyslots marked "ignore" skipped).
pub fn clevis_tokens(header: &Luks2Header) -> Vec<(u32, Result<ClevisToken, SealError>)> {
    super::in_try_order(header, |id, t| parse_token(id, t.json()), |c| c.keyslot)
}

/// True if the header has a clevis token.
pub fn has_clevis_tokens(header: &Luks2Header) -> bool {
    header.tokens().any(|(_, t)| t.type_name() == TOKEN_TYPE)
}

/// Decrypts one clevis token and opens its keyslot.
pub fn open_token(
    file: &dyn crate::luks2::HeaderIo,
    header: &Luks2Header,
    token: &ClevisToken,
    settings: &ClevisSettings,
) -> Result<VolumeKey, TokenFailureReason> {
    let pass = pins::decrypt_jwe(&token.jwe, settings, 0)?;
    match header.unlock_slot(file, token.keyslot, &pass, &KdfLimits::default()) {
        Ok(key) => Ok(key),
        Err(FormatError::WrongPassphrase) => Err(TokenFailureReason::SecretRejected(token.keyslot)),
        Err(e) => Err(e.into()),
    }
}

/// Tries the clevis tokens until one opens the volume: the volume key, keyslot and token id.
/// [`EnrollError::NoTokens`] if there is none; else every failure, each naming its token,
/// keyslot and policy.
pub fn unlock_with_clevis_tokens(
    file: &dyn crate::luks2::HeaderIo,
    header: &Luks2Header,
    settings: &ClevisSettings,
) -> Result<(VolumeKey, u32, u32), EnrollError> {
    let order = clevis_tokens(header);
    if order.is_empty() {
        return Err(EnrollError::NoTokens);
    }
    let mut failures = Vec::new();
    for (id, parsed) in order {
        let mut failure = TokenFailure {
            token_id: id,
            keyslot: None,
            token_type: TOKEN_TYPE.into(),
            key: None,
            reason: TokenFailureReason::Seal(SealError::WrongBinding),
        };
        let token = match parsed {
            Ok(t) => t,
            Err(e) => {
                failure.reason = e.into();
                tracing::warn!("{failure}");
                failures.push(failure);
                continue;
            }
        };
        failure.keyslot = Some(token.keyslot);
        failure.key = Some(pins::summary(&token.jwe));
        match open_token(file, header, &token, settings) {
            Ok(key) => return Ok((key, token.keyslot, id)),
            Err(reason) => {
                failure.reason = reason;
                tracing::warn!("{failure}");
                failures.push(failure);
            }
        }
    }
    Err(EnrollError::TokensFailed(failures))
}

/// After nbdcrypt's own tokens did not open the volume (`ours`), tries the clevis tokens; the
/// failures of both are reported together.
pub fn unlock_after_ours(
    file: &dyn crate::luks2::HeaderIo,
    header: &Luks2Header,
    settings: &ClevisSettings,
    ours: EnrollError,
) -> Result<(VolumeKey, u32, u32), EnrollError> {
    if !has_clevis_tokens(header) {
        return Err(ours);
    }
    match (ours, unlock_with_clevis_tokens(file, header, settings)) {
        (_, Ok(opened)) => Ok(opened),
        (EnrollError::NoTokens, Err(e)) => Err(e),
        (EnrollError::TokensFailed(mut a), Err(EnrollError::TokensFailed(b))) => {
            a.extend(b);
            Err(EnrollError::TokensFailed(a))
        }
        (_, Err(e)) => Err(e),
    }
}

/// A fresh keyslot passphrase as clevis wants it: base64url of 32 random bytes (43 printable
/// characters, no newline: it survives clevis's bash).
pub fn new_passphrase() -> Result<SecretBytes, EnrollError> {
    let mut raw = SecretBytes::zeroed(32);
    getrandom::fill(raw.expose_secret_mut()).map_err(|e| EnrollError::Random(e.to_string()))?;
    let mut out = SecretBytes::zeroed(43);
    B64U.encode_slice(raw.expose_secret(), out.expose_secret_mut())
        .map_err(|e| EnrollError::Random(e.to_string()))?;
    Ok(out)
}

/// The token object clevis writes for `jwe` on `keyslot`.
pub fn token_json(keyslot: u32, jwe: &Jwe) -> Map<String, Value> {
    let mut o = Map::new();
    o.insert("type".into(), TOKEN_TYPE.into());
    o.insert(
        "keyslots".into(),
        Value::Array(vec![Value::String(keyslot.to_string())]),
    );
    o.insert("jwe".into(), jwe.to_flattened());
    o
}

/// Adds a keyslot for a fresh passphrase and a clevis token holding it encrypted to `pin`.
/// The encryption (Tang advertisement, TPM seal) happens first, so a failure writes nothing;
/// then the keyslot, then the token (a failure there removes the keyslot again).
pub fn enroll(
    file: &dyn crate::luks2::HeaderIo,
    header: &mut Luks2Header,
    volume_key: &VolumeKey,
    pin: &PinSpec,
    settings: &ClevisSettings,
) -> Result<Enrolled, EnrollError> {
    if !header.verify_volume_key(volume_key) {
        return Err(EnrollError::WrongVolumeKey);
    }
    let pass = new_passphrase()?;
    let jwe = pins::encrypt(pin, pass.expose_secret(), settings)?;
    let slot = header.add_keyslot(file, volume_key, &pass, &TOKEN_KEYSLOT_KDF)?;
    drop(pass);
    let added = Token::from_json(token_json(slot, &jwe))
        .map_err(EnrollError::from)
        .and_then(|t| header.add_token(file, t).map_err(EnrollError::from));
    match added {
        Ok(token_id) => Ok(Enrolled {
            keyslot: slot,
            token_id,
        }),
        Err(e) => {
            if let Err(r) = header.remove_keyslot(file, slot) {
                tracing::warn!(
                    "could not remove the unused keyslot {slot} after a failed enrolment: {r}"
                );
            }
            Err(e)
        }
    }
}

/// `N: summary` lines for the header's clevis tokens (what `clevis luks list` shows).
pub fn list(header: &Luks2Header) -> Vec<String> {
    clevis_tokens(header)
        .into_iter()
        .map(|(id, t)| match t {
            Ok(t) => format!(
                "keyslot {} (token {id}): {}",
                t.keyslot,
                pins::summary(&t.jwe)
            ),
            Err(e) => format!("token {id}: {e}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passphrases_are_printable_and_43_characters() {
        let p = new_passphrase().unwrap();
        assert_eq!(p.len(), 43);
        assert!(p
            .expose_secret()
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_'));
    }

    #[test]
    fn token_json_is_what_clevis_writes() {
        let jwe = Jwe::encrypt(
            &serde_json::json!({"alg":"dir","enc":"A256GCM","clevis":{"pin":"tpm2","tpm2":{}}}),
            &[1; 32],
            b"pw",
        )
        .unwrap();
        let t = token_json(3, &jwe);
        assert_eq!(t["type"], "clevis");
        assert_eq!(t["keyslots"], serde_json::json!(["3"]));
        assert_eq!(t["jwe"]["encrypted_key"], "");
        let back = parse_token(0, &t).unwrap().unwrap();
        assert_eq!((back.keyslot, back.jwe), (3, jwe));
        let mut other = t.clone();
        other.insert("type".into(), "systemd-tpm2".into());
        assert!(parse_token(0, &other).unwrap().is_none());
        let mut broken = t;
        broken.insert("keyslots".into(), serde_json::json!([]));
        assert!(parse_token(0, &broken).is_err());
    }
}
