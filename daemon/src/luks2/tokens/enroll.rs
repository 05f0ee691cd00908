//! Keyslots opened by a sealed secret (the systemd-cryptenroll pattern) on a LUKS2 header:
//! enrol, unenrol, unlock by token, rekey.
//!
//! - The secret is 32 random bytes; the keyslot passphrase is its padded standard base64 (44
//!   ASCII bytes), so `cryptsetup open --key-file` with that string opens the keyslot too.
//! - The keyslot uses PBKDF2-SHA256 with 1000 iterations: the secret has full entropy, a slow
//!   KDF would buy nothing and slow every unlock.
//! - The seal is bound to (volume UUID, keyslot): a token copied to another volume or slot fails
//!   with [`SealError::WrongBinding`].
//!
//! Every header change is one LUKS2 commit (both copies, fsynced), in an order that keeps the
//! volume openable after a crash at any point: see [`rekey`].

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{Map, Value};

use super::format::{self as token, ParsedToken};
use crate::audit::rfc3339_now;
use crate::crypto::kdf::{HashAlg, KdfLimits, KdfParams};
use crate::crypto::keys::{SecretBytes, VolumeKey};
use crate::luks2::layout::MAX_KEYSLOTS;
use crate::luks2::{FormatError, Luks2Header, Token};
use crate::seal::{Binding, SealError, SealProvider};

/// Length of the random keyslot secret.
pub use crate::seal::SECRET_LEN;

/// KDF of keyslots opened by a sealed secret (systemd uses the same minimal PBKDF2).
pub const TOKEN_KEYSLOT_KDF: KdfParams = KdfParams::Pbkdf2 {
    hash: HashAlg::Sha256,
    iterations: 1000,
};

/// Builds the provider that can unseal a token, from the token's JSON (see
/// [`super::resolver`]).
pub type Resolver<'a> = &'a dyn Fn(&Map<String, Value>) -> Result<Box<dyn SealProvider>, SealError>;

/// A keyslot and the token holding its sealed secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enrolled {
    pub keyslot: u32,
    pub token_id: u32,
}

/// What [`rekey`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rekeyed {
    pub old: Enrolled,
    pub new: Enrolled,
}

/// Which enrolment [`unenroll`] removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnenrollTarget {
    Keyslot(u32),
    Token(u32),
}

/// What [`unenroll`] removed.
#[derive(Debug, Clone, PartialEq)]
pub struct Unenrolled {
    pub token_id: u32,
    /// `None` for an orphan token (its keyslot was already gone).
    pub keyslot: Option<u32>,
    pub token_type: String,
    /// Key reference of the removed token, if it was readable.
    pub key: Option<String>,
}

/// Why one token did not open the volume.
#[derive(Debug, thiserror::Error)]
pub enum TokenFailureReason {
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("the unsealed secret does not open keyslot {0} (token and keyslot out of step)")]
    SecretRejected(u32),
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// One token that was tried and failed.
#[derive(Debug)]
pub struct TokenFailure {
    pub token_id: u32,
    pub keyslot: Option<u32>,
    pub token_type: String,
    pub key: Option<String>,
    pub reason: TokenFailureReason,
}

impl std::fmt::Display for TokenFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "token {}", self.token_id)?;
        let mut extra = Vec::new();
        if let Some(k) = self.keyslot {
            extra.push(format!("keyslot {k}"));
        }
        extra.push(self.token_type.clone());
        if let Some(k) = &self.key {
            extra.push(format!("key {k}"));
        }
        write!(f, " ({}): {}", extra.join(", "), self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("cannot get random bytes: {0}")]
    Random(String),
    #[error("token {0} does not exist")]
    NoSuchToken(u32),
    #[error("token {id} has type {type_name:?}: not an nbdcrypt token, left alone")]
    NotOurToken { id: u32, type_name: String },
    #[error("keyslot {0} has no nbdcrypt token (remove a passphrase keyslot with `remove-key`)")]
    NoTokenForKeyslot(u32),
    #[error("keyslot {slot} is served by {count} nbdcrypt tokens ({ids}); name one with --token")]
    SeveralTokens {
        slot: u32,
        count: usize,
        ids: String,
    },
    #[error("token {0} is bound to several keyslots; nbdcrypt tokens serve exactly one")]
    TokenOnSeveralKeyslots(u32),
    #[error(
        "refusing to remove keyslot {0}: it is the last keyslot that opens the volume (the data \
         would be lost); add a passphrase or another token first"
    )]
    LastKeyslot(u32),
    #[error("the volume has no usable nbdcrypt token")]
    NoTokens,
    #[error("{}", join_failures(.0))]
    TokensFailed(Vec<TokenFailure>),
    #[error("the new token {token_id} (keyslot {keyslot}) did not verify: {reason}; the old token is kept")]
    VerifyFailed {
        token_id: u32,
        keyslot: u32,
        reason: String,
    },
    #[error("the volume key does not belong to this volume")]
    WrongVolumeKey,
    /// Test hook: the operation stopped after the requested number of header writes.
    #[doc(hidden)]
    #[error("simulated crash after {0} header writes")]
    SimulatedCrash(u32),
}

fn join_failures(f: &[TokenFailure]) -> String {
    match f {
        [one] => one.to_string(),
        many => format!(
            "no token opened the volume: {}",
            many.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
}

impl EnrollError {
    /// The provider error behind this failure, if there is exactly one kind of them (for exit
    /// codes and retry decisions).
    pub fn seal_error(&self) -> Option<&SealError> {
        match self {
            EnrollError::Seal(e) => Some(e),
            EnrollError::TokensFailed(f) => f.iter().find_map(|x| match &x.reason {
                TokenFailureReason::Seal(e) => Some(e),
                _ => None,
            }),
            _ => None,
        }
    }
}

/// Counts header writes; stops the operation (as a crash would) after `limit` of them.
struct CrashPoint {
    done: u32,
    limit: u32,
    /// Test hook: called with the write count after each header write.
    #[cfg(test)]
    after_write: Option<Box<dyn FnMut(u32)>>,
}

impl CrashPoint {
    fn never() -> CrashPoint {
        CrashPoint {
            done: 0,
            limit: u32::MAX,
            #[cfg(test)]
            after_write: None,
        }
    }

    /// Call after each header write.
    fn wrote(&mut self) -> Result<(), EnrollError> {
        self.done += 1;
        #[cfg(test)]
        if let Some(f) = self.after_write.as_mut() {
            f(self.done);
        }
        if self.done >= self.limit {
            Err(EnrollError::SimulatedCrash(self.done))
        } else {
            Ok(())
        }
    }
}

/// The keyslot passphrase for a secret: its padded standard base64, in locked memory.
pub fn passphrase_for(secret: &SecretBytes) -> SecretBytes {
    let len = base64::encoded_len(secret.len(), true).unwrap_or(0);
    let mut out = SecretBytes::zeroed(len);
    // The length is exact, so this cannot fail; an error would leave a passphrase that opens
    // nothing, which unlock reports.
    let _ = B64.encode_slice(secret.expose_secret(), out.expose_secret_mut());
    out
}

fn binding(header: &Luks2Header, keyslot: u32) -> Binding {
    Binding {
        volume_uuid: header.uuid().to_owned(),
        keyslot,
    }
}

fn lowest_free_keyslot(header: &Luks2Header) -> Option<u32> {
    let used: Vec<u32> = header.keyslots().iter().map(|k| k.id).collect();
    (0..MAX_KEYSLOTS).find(|id| !used.contains(id))
}

/// Adds a keyslot for a fresh random secret and a token with that secret sealed by `provider`.
///
/// The secret is sealed first, for the keyslot number the header will hand out, so a provider
/// failure writes nothing. Then the keyslot is written, then the token (two header commits). A
/// crash between the two leaves a keyslot nobody can open (harmless; `remove-key --force`).
pub fn enroll(
    file: &dyn crate::luks2::HeaderIo,
    header: &mut Luks2Header,
    volume_key: &VolumeKey,
    provider: &dyn SealProvider,
) -> Result<Enrolled, EnrollError> {
    enroll_inner(file, header, volume_key, provider, &mut CrashPoint::never())
}

fn enroll_inner(
    file: &dyn crate::luks2::HeaderIo,
    header: &mut Luks2Header,
    volume_key: &VolumeKey,
    provider: &dyn SealProvider,
    crash: &mut CrashPoint,
) -> Result<Enrolled, EnrollError> {
    if !header.verify_volume_key(volume_key) {
        return Err(EnrollError::WrongVolumeKey);
    }
    let mut secret = SecretBytes::zeroed(SECRET_LEN);
    getrandom::fill(secret.expose_secret_mut()).map_err(|e| EnrollError::Random(e.to_string()))?;
    let pass = passphrase_for(&secret);
    let predicted = lowest_free_keyslot(header).ok_or(FormatError::NoFreeKeyslot(MAX_KEYSLOTS))?;
    let mut sealed = provider.seal(&secret, &binding(header, predicted))?;
    let slot = header.add_keyslot(file, volume_key, &pass, &TOKEN_KEYSLOT_KDF)?;
    crash.wrote()?;
    let rollback = |header: &mut Luks2Header, e: EnrollError| -> EnrollError {
        if let Err(r) = header.remove_keyslot(file, slot) {
            tracing::warn!(
                "could not remove the unused keyslot {slot} after a failed enrolment: {r}"
            );
        }
        e
    };
    if slot != predicted {
        sealed = match provider.seal(&secret, &binding(header, slot)) {
            Ok(s) => s,
            Err(e) => return Err(rollback(header, e.into())),
        };
    }
    drop(secret);
    let token = match token::build(provider.token_type(), slot, &sealed, &rfc3339_now()) {
        Ok(t) => t,
        Err(e) => return Err(rollback(header, e.into())),
    };
    let token_id = match header.add_token(file, token) {
        Ok(id) => id,
        Err(e) => return Err(rollback(header, e.into())),
    };
    crash.wrote()?;
    Ok(Enrolled {
        keyslot: slot,
        token_id,
    })
}

/// Our token types `unenroll` may remove: provider tokens and quorums.
fn removable(type_name: &str) -> bool {
    token::is_ours(type_name) || type_name == super::quorum::TOKEN_TYPE
}

/// Removes one enrolment: the token first, then its keyslot (a crash in between leaves an
/// unopenable keyslot, never a token pointing at nothing). Refuses to remove the last keyslot
/// that opens the volume, and never touches other tools' tokens.
pub fn unenroll(
    file: &dyn crate::luks2::HeaderIo,
    header: &mut Luks2Header,
    target: UnenrollTarget,
) -> Result<Unenrolled, EnrollError> {
    let token_id = match target {
        UnenrollTarget::Token(id) => id,
        UnenrollTarget::Keyslot(slot) => {
            let ids: Vec<u32> = header
                .tokens()
                .filter(|(_, t)| removable(t.type_name()) && t.keyslots() == [slot])
                .map(|(id, _)| id)
                .collect();
            match ids.as_slice() {
                [] => return Err(EnrollError::NoTokenForKeyslot(slot)),
                [id] => *id,
                many => {
                    return Err(EnrollError::SeveralTokens {
                        slot,
                        count: many.len(),
                        ids: many
                            .iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
                }
            }
        }
    };
    let t = header
        .token(token_id)
        .ok_or(EnrollError::NoSuchToken(token_id))?;
    if !removable(t.type_name()) {
        return Err(EnrollError::NotOurToken {
            id: token_id,
            type_name: t.type_name().to_owned(),
        });
    }
    let keyslot = match t.keyslots() {
        [] => None,
        [k] => Some(*k),
        _ => return Err(EnrollError::TokenOnSeveralKeyslots(token_id)),
    };
    let key = token::parse(t)
        .ok()
        .flatten()
        .and_then(|p| p.key_reference().map(str::to_owned));
    let token_type = t.type_name().to_owned();
    if let Some(k) = keyslot {
        // Checked before anything is written: removing the token and then failing on the
        // keyslot would leave a keyslot nobody can open.
        let slots = header.keyslots();
        let target_opens_data = slots.iter().any(|s| s.id == k && s.for_data);
        if target_opens_data && !slots.iter().any(|s| s.for_data && s.id != k) {
            return Err(EnrollError::LastKeyslot(k));
        }
    }
    header.remove_token(file, token_id)?;
    if let Some(k) = keyslot {
        if header.keyslots().iter().any(|s| s.id == k) {
            header.remove_keyslot(file, k)?;
        }
    }
    Ok(Unenrolled {
        token_id,
        keyslot,
        token_type,
        key,
    })
}

/// Our tokens in the order they should be tried: by keyslot priority (prefer, then normal;
/// keyslots marked "ignore" are skipped), then token id. Each with its parse result.
pub fn token_order(header: &Luks2Header) -> Vec<(u32, Result<ParsedToken, SealError>)> {
    super::in_try_order(header, |_, t| token::parse(t), |p| p.keyslot)
}

/// Unseals token `token_id` and opens its keyslot. Returns the volume key and the keyslot.
pub fn unlock_with_token(
    file: &dyn crate::luks2::HeaderIo,
    header: &Luks2Header,
    token_id: u32,
    resolver: Resolver<'_>,
) -> Result<(VolumeKey, u32), EnrollError> {
    let t = header
        .token(token_id)
        .ok_or(EnrollError::NoSuchToken(token_id))?;
    let parsed = match token::parse(t) {
        Ok(Some(p)) => Ok(p),
        Ok(None) => {
            return Err(EnrollError::NotOurToken {
                id: token_id,
                type_name: t.type_name().to_owned(),
            })
        }
        Err(e) => Err(e),
    };
    try_token(file, header, token_id, t, parsed, resolver)
        .map_err(|f| EnrollError::TokensFailed(vec![f]))
}

// A failure is reported once per token tried, off the I/O path: its size does not matter.
#[allow(clippy::result_large_err)]
fn try_token(
    file: &dyn crate::luks2::HeaderIo,
    header: &Luks2Header,
    token_id: u32,
    t: &Token,
    parsed: Result<ParsedToken, SealError>,
    resolver: Resolver<'_>,
) -> Result<(VolumeKey, u32), TokenFailure> {
    let mut failure = TokenFailure {
        token_id,
        keyslot: t.keyslots().first().copied(),
        token_type: t.type_name().to_owned(),
        key: None,
        reason: TokenFailureReason::Seal(SealError::WrongBinding),
    };
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => {
            failure.reason = e.into();
            return Err(failure);
        }
    };
    failure.key = parsed.key_reference().map(str::to_owned);
    let result = resolver(t.json())
        .map_err(TokenFailureReason::from)
        .and_then(|provider| open_with(file, header, &parsed, &*provider));
    result.map_err(|reason| {
        failure.reason = reason;
        failure
    })
}

/// Unseals `parsed` with `provider` and opens its keyslot.
fn open_with(
    file: &dyn crate::luks2::HeaderIo,
    header: &Luks2Header,
    parsed: &ParsedToken,
    provider: &dyn SealProvider,
) -> Result<(VolumeKey, u32), TokenFailureReason> {
    let secret = provider.unseal(&parsed.sealed, &binding(header, parsed.keyslot))?;
    let pass = passphrase_for(&secret);
    drop(secret);
    // Our keyslots use 1000 PBKDF2 iterations; the default limits are far above that.
    match header.unlock_slot(file, parsed.keyslot, &pass, &KdfLimits::default()) {
        Ok(key) => Ok((key, parsed.keyslot)),
        Err(FormatError::WrongPassphrase) => {
            Err(TokenFailureReason::SecretRejected(parsed.keyslot))
        }
        Err(e) => Err(e.into()),
    }
}

/// Tries our tokens in keyslot priority order (see [`token_order`]) until one opens the
/// volume. Returns the volume key, the keyslot and the token id. Other tools' tokens are
/// ignored; if none of ours exists: [`EnrollError::NoTokens`]; if all fail: every failure.
pub fn unlock_with_tokens(
    file: &dyn crate::luks2::HeaderIo,
    header: &Luks2Header,
    resolver: Resolver<'_>,
) -> Result<(VolumeKey, u32, u32), EnrollError> {
    let order = token_order(header);
    if order.is_empty() {
        return Err(EnrollError::NoTokens);
    }
    let mut failures = Vec::new();
    for (id, parsed) in order {
        let Some(t) = header.token(id) else { continue };
        match try_token(file, header, id, t, parsed, resolver) {
            Ok((key, slot)) => return Ok((key, slot, id)),
            Err(f) => {
                tracing::warn!("{f}");
                failures.push(f);
            }
        }
    }
    Err(EnrollError::TokensFailed(failures))
}

/// Re-seals the volume key under `new_provider` (a new KMS key, or the same one with a fresh
/// secret) and retires token `token_id` and its keyslot. `volume_key` comes from unsealing the
/// old token or from a passphrase.
///
/// Crash-safe order; the volume opens with the old or the new token after a crash anywhere:
/// 1. new keyslot (commit), 2. new token (commit) — the old ones are untouched;
/// 3. the new token is verified from a fresh read of the header: unsealed by `new_provider`
///    and its keyslot opened to this volume key; on failure the new token and keyslot are
///    removed again and the old ones stay;
/// 4. old token removed (commit), 5. old keyslot removed (commit): an interruption between
///    these leaves an unopenable old keyslot, never a token without its keyslot.
pub fn rekey(
    file: &dyn crate::luks2::HeaderIo,
    header: &mut Luks2Header,
    token_id: u32,
    volume_key: &VolumeKey,
    new_provider: &dyn SealProvider,
) -> Result<Rekeyed, EnrollError> {
    rekey_inner(
        file,
        header,
        token_id,
        volume_key,
        new_provider,
        &mut CrashPoint::never(),
    )
}

fn rekey_inner(
    file: &dyn crate::luks2::HeaderIo,
    header: &mut Luks2Header,
    token_id: u32,
    volume_key: &VolumeKey,
    new_provider: &dyn SealProvider,
    crash: &mut CrashPoint,
) -> Result<Rekeyed, EnrollError> {
    let t = header
        .token(token_id)
        .ok_or(EnrollError::NoSuchToken(token_id))?;
    if !token::is_ours(t.type_name()) {
        return Err(EnrollError::NotOurToken {
            id: token_id,
            type_name: t.type_name().to_owned(),
        });
    }
    let old_slot = match t.keyslots() {
        [k] => *k,
        [] => {
            return Err(EnrollError::Seal(SealError::BadToken(format!(
            "token {token_id} is bound to no keyslot; remove it with `unenroll --token {token_id}`"
        ))))
        }
        _ => return Err(EnrollError::TokenOnSeveralKeyslots(token_id)),
    };
    if !header.verify_volume_key(volume_key) {
        return Err(EnrollError::WrongVolumeKey);
    }
    let new = enroll_inner(file, header, volume_key, new_provider, crash)?;

    // Verify what is on disk, not what we hold in memory.
    let verified = (|| -> Result<(), String> {
        let (disk, _) = Luks2Header::read_metadata_only(file).map_err(|e| e.to_string())?;
        let t = disk
            .token(new.token_id)
            .ok_or_else(|| format!("token {} is not on disk", new.token_id))?;
        let parsed = match token::parse(t) {
            Ok(Some(p)) => p,
            Ok(None) => return Err("it is not an nbdcrypt token".into()),
            Err(e) => return Err(e.to_string()),
        };
        let (key, slot) =
            open_with(file, &disk, &parsed, new_provider).map_err(|e| e.to_string())?;
        if slot != new.keyslot {
            return Err(format!("opened keyslot {slot}, expected {}", new.keyslot));
        }
        if key.expose_secret() != volume_key.expose_secret() || !disk.verify_volume_key(&key) {
            return Err("the keyslot holds another key".into());
        }
        Ok(())
    })();
    if let Err(reason) = verified {
        let _ = unenroll(file, header, UnenrollTarget::Token(new.token_id));
        return Err(EnrollError::VerifyFailed {
            token_id: new.token_id,
            keyslot: new.keyslot,
            reason,
        });
    }

    header.remove_token(file, token_id)?;
    crash.wrote()?;
    let still_used = header
        .tokens()
        .any(|(_, t)| t.keyslots().contains(&old_slot));
    if !still_used && header.keyslots().iter().any(|s| s.id == old_slot) {
        header.remove_keyslot(file, old_slot)?;
        crash.wrote()?;
    }
    Ok(Rekeyed {
        old: Enrolled {
            keyslot: old_slot,
            token_id,
        },
        new,
    })
}

#[cfg(test)]
mod tests;
