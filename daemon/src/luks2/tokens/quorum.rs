//! Quorum tokens: one keyslot opened by a secret split k-of-n (Shamir, [`crate::seal::shamir`])
//! among key holders: KMS keys, HSM keys (any provider of the registry) and people, each with a
//! passphrase of their own.
//!
//! ```json
//! {
//!   "type": "nbdcrypt-quorum", "keyslots": ["2"], "nbdcrypt_version": 1, "created": "…",
//!   "threshold": 2,
//!   "shares": [
//!     {"x": 1, "holder": "nbdcrypt-aws-kms", "tag": "…", "sealed": "…", "params": {"kms-key-id": "arn:…"}},
//!     {"x": 2, "holder": "nbdcrypt-pkcs11",  "tag": "…", "sealed": "…", "params": {"pkcs11-uri": "pkcs11:…"}},
//!     {"x": 3, "holder": "passphrase", "name": "alice", "tag": "…", "sealed": "…",
//!      "kdf": {"type": "argon2id", "time": 4, "memory": 65536, "cpus": 1, "salt": "…"}}
//!   ]
//! }
//! ```
//!
//! - The keyslot passphrase is `base64(secret)` as for provider tokens, so `cryptsetup` opens
//!   the keyslot given that string, and ignores this token (an unknown type) otherwise.
//! - Machine shares are sealed by their provider, bound to (volume UUID, keyslot) like a provider
//!   token. A person's share is `y XOR KDF(passphrase, salt)` (32 bytes of KDF output used once:
//!   the salt is fresh per share).
//! - Every share carries `tag = HMAC-SHA256(key = share value, "nbdcrypt-quorum-share-v1" ‖ UUID
//!   ‖ keyslot ‖ x)`: a wrong share (a wrong passphrase, a share of another quorum, a swapped
//!   entry) is detected and named before it is combined. The tag reveals nothing usable about a
//!   machine share (256 random bits); for a person's share it allows offline guessing at the
//!   KDF's cost, exactly as a passphrase keyslot does, and yields one share, not the volume.
//!
//! Everything here is read from the header, which is attacker-written: share counts, indices,
//! names and KDF costs are bounded ([`MAX_SHARES`], [`crate::crypto::kdf::KdfLimits`]) and a
//! share's provider comes from the operator's settings, never from the token.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{KeyInit, Mac};
use serde_json::{Map, Value};

use crate::crypto::kdf::{self, HashAlg, KdfLimits, KdfParams};
use crate::crypto::keys::{SecretBytes, VolumeKey};
use crate::luks2::layout::MAX_KEYSLOTS;
use crate::luks2::{FormatError, Luks2Header, Token};
use crate::seal::registry::{self, Provider};
use crate::seal::shamir::{self, Share};
use crate::seal::{Binding, SealError, SealProvider, SealSettings, Sealed, SECRET_LEN};

use super::enroll::{passphrase_for, EnrollError, Enrolled, TOKEN_KEYSLOT_KDF};
use super::format::TOKEN_VERSION;

/// LUKS2 token type of a quorum.
pub const TOKEN_TYPE: &str = "nbdcrypt-quorum";
/// `holder` of a person's share.
pub const PASSPHRASE_HOLDER: &str = "passphrase";
/// Most shares a quorum token may have (bounds the work an attacker-written token can cause).
pub const MAX_SHARES: usize = 16;
/// Longest share name.
pub const MAX_NAME_LEN: usize = 64;
const TAG_CONTEXT: &[u8] = b"nbdcrypt-quorum-share-v1\0";
const SALT_LEN: usize = 32;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Who holds a share.
#[derive(Debug, Clone, PartialEq)]
pub enum Holder {
    /// Sealed by a provider of the registry; `params` are its (informational) parameters.
    Provider {
        provider: &'static str,
        token_type: &'static str,
        params: Map<String, Value>,
    },
    /// A person's passphrase.
    Passphrase {
        name: String,
        kdf: KdfParams,
        salt: Vec<u8>,
    },
}

/// One share as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredShare {
    pub x: u8,
    pub holder: Holder,
    pub tag: [u8; 32],
    pub sealed: Vec<u8>,
}

impl StoredShare {
    /// "AWS KMS arn:…", "HSM token/object", "passphrase share alice". Attacker-written.
    pub fn describe(&self) -> String {
        match &self.holder {
            Holder::Provider {
                provider, params, ..
            } => match registry::by_name(provider) {
                Some(p) => p.describe(params),
                None => (*provider).to_owned(),
            },
            Holder::Passphrase { name, .. } => format!("passphrase share {name}"),
        }
    }

    /// The name to use in messages and the audit log ("alice", or the provider's key).
    pub fn name(&self) -> String {
        match &self.holder {
            Holder::Passphrase { name, .. } => name.clone(),
            Holder::Provider {
                provider, params, ..
            } => registry::by_name(provider)
                .and_then(|p| params.get(p.key_param()).and_then(Value::as_str))
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{provider} share {}", self.x)),
        }
    }
}

/// A quorum token, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct QuorumToken {
    pub keyslot: u32,
    pub threshold: usize,
    pub created: String,
    pub shares: Vec<StoredShare>,
}

impl QuorumToken {
    /// Number of shares held by people.
    pub fn passphrase_shares(&self) -> usize {
        self.shares
            .iter()
            .filter(|s| matches!(s.holder, Holder::Passphrase { .. }))
            .count()
    }

    pub fn share_named(&self, name: &str) -> Option<&StoredShare> {
        self.shares
            .iter()
            .find(|s| matches!(&s.holder, Holder::Passphrase { name: n, .. } if n == name))
    }
}

/// Why a quorum did not open, or a share was refused.
#[derive(Debug, thiserror::Error)]
pub enum QuorumError {
    #[error("malformed quorum token: {0}")]
    BadToken(String),
    /// The share does not match its tag: a wrong passphrase, or a share from elsewhere.
    #[error("share {name:?} is wrong (it does not match its tag: a wrong passphrase, or a share of another volume)")]
    WrongShare { name: String },
    #[error("no quorum on this volume has a passphrase share named {0:?}")]
    UnknownShare(String),
    #[error("share {name:?}: {source}")]
    Provider { name: String, source: SealError },
    #[error("the quorum's key derivation for share {name:?} is refused: {detail}")]
    Kdf { name: String, detail: String },
    #[error("{have} of {need} needed shares received ({total} holders)")]
    NotEnough {
        have: usize,
        need: usize,
        total: usize,
    },
    #[error("the combined secret does not open keyslot {0} (token and keyslot out of step)")]
    SecretRejected(u32),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{0}")]
    Shamir(#[from] shamir::ShamirError),
}

/// The tag of share `(x, y)` of the quorum on (`uuid`, `keyslot`).
pub fn share_tag(y: &[u8], uuid: &str, keyslot: u32, x: u8) -> [u8; 32] {
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(y).expect("HMAC takes any key length");
    mac.update(TAG_CONTEXT);
    mac.update(uuid.as_bytes());
    mac.update(b"\0");
    mac.update(&keyslot.to_be_bytes());
    mac.update(&[x]);
    mac.finalize().into_bytes().into()
}

fn tag_matches(y: &[u8], uuid: &str, keyslot: u32, x: u8, tag: &[u8; 32]) -> bool {
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(y).expect("HMAC takes any key length");
    mac.update(TAG_CONTEXT);
    mac.update(uuid.as_bytes());
    mac.update(b"\0");
    mac.update(&keyslot.to_be_bytes());
    mac.update(&[x]);
    mac.verify_slice(tag).is_ok()
}

/// True for a name a person's share may have: 1..=64 of `A-Za-z0-9._@-`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'@'))
}

fn kdf_json(kdf: &KdfParams, salt: &[u8]) -> Value {
    let mut o = Map::new();
    o.insert("type".into(), kdf.type_name().into());
    match *kdf {
        KdfParams::Pbkdf2 { hash, iterations } => {
            o.insert("hash".into(), hash.name().into());
            o.insert("iterations".into(), iterations.into());
        }
        KdfParams::Argon2i {
            time,
            memory_kib,
            cpus,
        }
        | KdfParams::Argon2id {
            time,
            memory_kib,
            cpus,
        } => {
            o.insert("time".into(), time.into());
            o.insert("memory".into(), memory_kib.into());
            o.insert("cpus".into(), cpus.into());
        }
    }
    o.insert("salt".into(), B64.encode(salt).into());
    Value::Object(o)
}

fn parse_kdf(v: &Value) -> Result<(KdfParams, Vec<u8>), String> {
    let o = v.as_object().ok_or("\"kdf\" is not an object")?;
    let num = |k: &str| -> Result<u32, String> {
        o.get(k)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("kdf \"{k}\" is not a 32-bit unsigned integer"))
    };
    let params = match o.get("type").and_then(Value::as_str) {
        Some("pbkdf2") => {
            let hash = o
                .get("hash")
                .and_then(Value::as_str)
                .and_then(HashAlg::from_name)
                .ok_or("kdf \"hash\" is missing or unknown")?;
            KdfParams::Pbkdf2 {
                hash,
                iterations: num("iterations")?,
            }
        }
        Some("argon2i") => KdfParams::Argon2i {
            time: num("time")?,
            memory_kib: num("memory")?,
            cpus: num("cpus")?,
        },
        Some("argon2id") => KdfParams::Argon2id {
            time: num("time")?,
            memory_kib: num("memory")?,
            cpus: num("cpus")?,
        },
        _ => return Err("kdf \"type\" is not pbkdf2, argon2i or argon2id".into()),
    };
    let salt = o
        .get("salt")
        .and_then(Value::as_str)
        .and_then(|s| B64.decode(s).ok())
        .filter(|s| s.len() == SALT_LEN)
        .ok_or("kdf \"salt\" is not 32 bytes of base64")?;
    Ok((params, salt))
}

fn b64_field(o: &Map<String, Value>, k: &str, len: Option<usize>) -> Result<Vec<u8>, String> {
    let v = o
        .get(k)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("share has no \"{k}\" string"))?;
    if v.len() > 8192 {
        return Err(format!("share \"{k}\" is too long"));
    }
    let bytes = B64
        .decode(v)
        .map_err(|_| format!("share \"{k}\" is not padded standard base64"))?;
    match len {
        Some(n) if bytes.len() != n => Err(format!("share \"{k}\" is not {n} bytes")),
        _ if bytes.is_empty() => Err(format!("share \"{k}\" is empty")),
        _ => Ok(bytes),
    }
}

/// Parses a quorum token. `Ok(None)`: not a quorum token. `Err`: ours but unusable, with why.
pub fn parse_json(o: &Map<String, Value>) -> Result<Option<QuorumToken>, QuorumError> {
    let bad = |m: String| Err(QuorumError::BadToken(m));
    if o.get("type").and_then(Value::as_str) != Some(TOKEN_TYPE) {
        return Ok(None);
    }
    match o.get("nbdcrypt_version").and_then(Value::as_u64) {
        Some(v) if (1..=TOKEN_VERSION).contains(&v) => {}
        Some(v) if v > TOKEN_VERSION => {
            return bad(format!(
                "format version {v} is newer than this nbdcrypt understands; upgrade nbdcrypt"
            ))
        }
        _ => return bad("\"nbdcrypt_version\" is missing or not a positive integer".into()),
    }
    let keyslot = match o
        .get("keyslots")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
    {
        Some([Value::String(s)]) => match s.parse::<u32>() {
            Ok(n) if n.to_string() == *s && n < MAX_KEYSLOTS => n,
            _ => return bad(format!("keyslot reference {s:?} is not a keyslot number")),
        },
        Some([]) => return bad("bound to no keyslot (its keyslot was removed)".into()),
        _ => return bad("\"keyslots\" must name exactly one keyslot".into()),
    };
    let created = match o.get("created") {
        None => String::new(),
        Some(Value::String(s)) if s.len() <= 64 => s.clone(),
        Some(_) => return bad("\"created\" is not a short string".into()),
    };
    let shares_json = match o.get("shares") {
        Some(Value::Array(a)) => a,
        _ => return bad("\"shares\" is not an array".into()),
    };
    if shares_json.is_empty() || shares_json.len() > MAX_SHARES {
        return bad(format!(
            "{} shares; a quorum has 1 to {MAX_SHARES}",
            shares_json.len()
        ));
    }
    let threshold = match o
        .get("threshold")
        .and_then(Value::as_u64)
        .and_then(|k| usize::try_from(k).ok())
    {
        Some(k) if k >= 1 && k <= shares_json.len() => k,
        _ => {
            return bad(format!(
                "\"threshold\" is not a number from 1 to the number of shares ({})",
                shares_json.len()
            ))
        }
    };
    let mut shares: Vec<StoredShare> = Vec::with_capacity(shares_json.len());
    for (i, s) in shares_json.iter().enumerate() {
        let s = s
            .as_object()
            .ok_or_else(|| QuorumError::BadToken(format!("share {i} is not an object")))?;
        let at = |m: String| QuorumError::BadToken(format!("share {i}: {m}"));
        let x = s
            .get("x")
            .and_then(Value::as_u64)
            .and_then(|x| u8::try_from(x).ok())
            .filter(|x| *x != 0)
            .ok_or_else(|| at("\"x\" is not a number from 1 to 255".into()))?;
        if shares.iter().any(|o| o.x == x) {
            return Err(at(format!("index {x} appears twice")));
        }
        let tag: [u8; 32] = b64_field(s, "tag", Some(32))
            .map_err(at)?
            .try_into()
            .map_err(|_| at("\"tag\" is not 32 bytes".into()))?;
        let holder = match s.get("holder").and_then(Value::as_str) {
            Some(PASSPHRASE_HOLDER) => {
                let name = s
                    .get("name")
                    .and_then(Value::as_str)
                    .filter(|n| valid_name(n))
                    .ok_or_else(|| {
                        at(format!(
                            "\"name\" is not 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 . _ - @"
                        ))
                    })?;
                if shares
                    .iter()
                    .any(|o| matches!(&o.holder, Holder::Passphrase { name: n, .. } if n == name))
                {
                    return Err(at(format!("name {name:?} appears twice")));
                }
                let (kdf, salt) = parse_kdf(s.get("kdf").unwrap_or(&Value::Null)).map_err(at)?;
                Holder::Passphrase {
                    name: name.to_owned(),
                    kdf,
                    salt,
                }
            }
            Some(t) => match registry::by_token_type(t) {
                Some(p) => Holder::Provider {
                    provider: p.name(),
                    token_type: p.token_type(),
                    params: match s.get("params") {
                        Some(Value::Object(m)) => m.clone(),
                        None => Map::new(),
                        Some(_) => return Err(at("\"params\" is not an object".into())),
                    },
                },
                None => return Err(at(format!("holder {t:?} is not known to this nbdcrypt"))),
            },
            None => return Err(at("no \"holder\" string".into())),
        };
        let sealed_len = match holder {
            Holder::Passphrase { .. } => Some(SECRET_LEN),
            Holder::Provider { .. } => None,
        };
        let sealed = b64_field(s, "sealed", sealed_len).map_err(at)?;
        shares.push(StoredShare {
            x,
            holder,
            tag,
            sealed,
        });
    }
    Ok(Some(QuorumToken {
        keyslot,
        threshold,
        created,
        shares,
    }))
}

/// [`parse_json`] on a header token.
pub fn parse(t: &Token) -> Result<Option<QuorumToken>, QuorumError> {
    parse_json(t.json())
}

/// The token JSON of a quorum.
pub fn build(q: &QuorumToken) -> Result<Token, QuorumError> {
    let mut o = Map::new();
    o.insert("type".into(), TOKEN_TYPE.into());
    o.insert(
        "keyslots".into(),
        Value::Array(vec![Value::String(q.keyslot.to_string())]),
    );
    o.insert("nbdcrypt_version".into(), TOKEN_VERSION.into());
    o.insert("created".into(), q.created.clone().into());
    o.insert("threshold".into(), q.threshold.into());
    let shares = q
        .shares
        .iter()
        .map(|s| {
            let mut m = Map::new();
            m.insert("x".into(), s.x.into());
            match &s.holder {
                Holder::Provider {
                    token_type, params, ..
                } => {
                    m.insert("holder".into(), (*token_type).into());
                    m.insert("params".into(), Value::Object(params.clone()));
                }
                Holder::Passphrase { name, kdf, salt } => {
                    m.insert("holder".into(), PASSPHRASE_HOLDER.into());
                    m.insert("name".into(), name.clone().into());
                    m.insert("kdf".into(), kdf_json(kdf, salt));
                }
            }
            m.insert("tag".into(), B64.encode(s.tag).into());
            m.insert("sealed".into(), B64.encode(&s.sealed).into());
            Value::Object(m)
        })
        .collect();
    o.insert("shares".into(), Value::Array(shares));
    Token::from_json(o).map_err(QuorumError::from)
}

/// A key holder at enrolment.
pub enum NewHolder<'a> {
    Provider(&'a dyn SealProvider),
    Passphrase {
        name: String,
        passphrase: SecretBytes,
        kdf: KdfParams,
    },
}

fn binding(header: &Luks2Header, keyslot: u32) -> Binding {
    Binding {
        volume_uuid: header.uuid().to_owned(),
        keyslot,
    }
}

fn random(len: usize) -> Result<Vec<u8>, EnrollError> {
    let mut v = vec![0u8; len];
    getrandom::fill(&mut v).map_err(|e| EnrollError::Random(e.to_string()))?;
    Ok(v)
}

/// The 32-byte pad of a person's share: KDF(passphrase, salt).
fn passphrase_pad(
    kdf: &KdfParams,
    passphrase: &[u8],
    salt: &[u8],
) -> Result<SecretBytes, kdf::KdfError> {
    kdf::derive(kdf, passphrase, salt, SECRET_LEN)
}

fn seal_shares(
    header: &Luks2Header,
    keyslot: u32,
    shares: &[Share],
    holders: &[NewHolder<'_>],
) -> Result<Vec<StoredShare>, EnrollError> {
    seal_shares_for(header.uuid(), keyslot, shares, holders)
}

/// Seals `shares[i]` to `holders[i]` for the quorum on (`uuid`, `keyslot`): machine shares by
/// their provider, people's under a fresh salt. (Online re-encryption carries a quorum with it.)
pub fn seal_shares_for(
    uuid: &str,
    keyslot: u32,
    shares: &[Share],
    holders: &[NewHolder<'_>],
) -> Result<Vec<StoredShare>, EnrollError> {
    let b = Binding {
        volume_uuid: uuid.to_owned(),
        keyslot,
    };
    let mut out = Vec::with_capacity(shares.len());
    for (share, holder) in shares.iter().zip(holders) {
        let y = share.y.expose_secret();
        let tag = share_tag(y, uuid, keyslot, share.x);
        let (holder, sealed) = match holder {
            NewHolder::Provider(p) => {
                let Sealed { ciphertext, params } = p.seal(&share.y, &b)?;
                let reg = registry::by_token_type(p.token_type()).ok_or_else(|| {
                    EnrollError::Seal(SealError::BadToken(format!(
                        "provider {} is not in the registry",
                        p.token_type()
                    )))
                })?;
                (
                    Holder::Provider {
                        provider: reg.name(),
                        token_type: reg.token_type(),
                        params,
                    },
                    ciphertext,
                )
            }
            NewHolder::Passphrase {
                name,
                passphrase,
                kdf,
            } => {
                let salt = random(SALT_LEN)?;
                let pad = passphrase_pad(kdf, passphrase.expose_secret(), &salt)
                    .map_err(|e| EnrollError::Format(FormatError::InvalidToken(e.to_string())))?;
                let sealed: Vec<u8> = y
                    .iter()
                    .zip(pad.expose_secret())
                    .map(|(a, b)| a ^ b)
                    .collect();
                (
                    Holder::Passphrase {
                        name: name.clone(),
                        kdf: *kdf,
                        salt,
                    },
                    sealed,
                )
            }
        };
        out.push(StoredShare {
            x: share.x,
            holder,
            tag,
            sealed,
        });
    }
    Ok(out)
}

/// Adds a keyslot for a fresh random secret, split `threshold`-of-`holders.len()` among the
/// holders, and the quorum token. Every share is sealed before anything is written, so a
/// provider failure (or a wrong holder) writes nothing.
pub fn enroll(
    file: &dyn crate::luks2::HeaderIo,
    header: &mut Luks2Header,
    volume_key: &VolumeKey,
    threshold: usize,
    holders: &[NewHolder<'_>],
) -> Result<Enrolled, EnrollError> {
    if !header.verify_volume_key(volume_key) {
        return Err(EnrollError::WrongVolumeKey);
    }
    let bad = |m: String| EnrollError::Seal(SealError::BadToken(m));
    if holders.is_empty() || holders.len() > MAX_SHARES {
        return Err(bad(format!("a quorum has 1 to {MAX_SHARES} holders")));
    }
    if threshold == 0 || threshold > holders.len() {
        return Err(bad(format!(
            "--quorum {threshold} with {} holders: give a number from 1 to {}",
            holders.len(),
            holders.len()
        )));
    }
    let mut names = std::collections::BTreeSet::new();
    for h in holders {
        if let NewHolder::Passphrase { name, .. } = h {
            if !valid_name(name) {
                return Err(bad(format!(
                    "share name {name:?}: use 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 . _ - @"
                )));
            }
            if !names.insert(name.clone()) {
                return Err(bad(format!("share name {name:?} given twice")));
            }
        }
    }
    let mut secret = SecretBytes::zeroed(SECRET_LEN);
    getrandom::fill(secret.expose_secret_mut()).map_err(|e| EnrollError::Random(e.to_string()))?;
    let shares = shamir::split(secret.expose_secret(), threshold, holders.len())
        .map_err(|e| bad(e.to_string()))?;
    let predicted = (0..MAX_KEYSLOTS)
        .find(|id| !header.keyslots().iter().any(|k| k.id == *id))
        .ok_or(FormatError::NoFreeKeyslot(MAX_KEYSLOTS))?;
    let mut stored = seal_shares(header, predicted, &shares, holders)?;
    let pass = passphrase_for(&secret);
    drop(secret);
    let slot = header.add_keyslot(file, volume_key, &pass, &TOKEN_KEYSLOT_KDF)?;
    let rollback = |header: &mut Luks2Header, e: EnrollError| -> EnrollError {
        if let Err(r) = header.remove_keyslot(file, slot) {
            tracing::warn!(
                "could not remove the unused keyslot {slot} after a failed enrolment: {r}"
            );
        }
        e
    };
    if slot != predicted {
        stored = match seal_shares(header, slot, &shares, holders) {
            Ok(s) => s,
            Err(e) => return Err(rollback(header, e)),
        };
    }
    drop(shares);
    let q = QuorumToken {
        keyslot: slot,
        threshold,
        created: crate::audit::rfc3339_now(),
        shares: stored,
    };
    let token = match build(&q) {
        Ok(t) => t,
        Err(e) => return Err(rollback(header, bad(e.to_string()))),
    };
    match header.add_token(file, token) {
        Ok(token_id) => Ok(Enrolled {
            keyslot: slot,
            token_id,
        }),
        Err(e) => Err(rollback(header, e.into())),
    }
}

/// Recovers a person's share from their passphrase and checks its tag. The KDF cost comes from
/// the header: checked against `limits` first.
pub fn open_passphrase_share(
    header: &Luks2Header,
    q: &QuorumToken,
    name: &str,
    passphrase: &SecretBytes,
    limits: &KdfLimits,
) -> Result<Share, QuorumError> {
    let s = q
        .share_named(name)
        .ok_or_else(|| QuorumError::UnknownShare(name.to_owned()))?;
    let Holder::Passphrase { kdf, salt, .. } = &s.holder else {
        return Err(QuorumError::UnknownShare(name.to_owned()));
    };
    let kdf_err = |detail: String| QuorumError::Kdf {
        name: name.to_owned(),
        detail,
    };
    limits.check(kdf).map_err(|e| {
        kdf_err(format!(
            "{} {} is above the cap {} (nbdcryptd --allow-expensive-kdf lifts it, for a header \
             you trust)",
            e.param, e.value, e.cap
        ))
    })?;
    let pad = passphrase_pad(kdf, passphrase.expose_secret(), salt)
        .map_err(|e| kdf_err(e.to_string()))?;
    let mut y = SecretBytes::zeroed(SECRET_LEN);
    for ((o, c), p) in y
        .expose_secret_mut()
        .iter_mut()
        .zip(&s.sealed)
        .zip(pad.expose_secret())
    {
        *o = c ^ p;
    }
    if !tag_matches(y.expose_secret(), header.uuid(), q.keyslot, s.x, &s.tag) {
        return Err(QuorumError::WrongShare {
            name: name.to_owned(),
        });
    }
    Ok(Share { x: s.x, y })
}

/// Unseals one machine share with its provider (built from the operator's settings) and
/// checks its tag.
pub fn open_machine_share(
    header: &Luks2Header,
    q: &QuorumToken,
    s: &StoredShare,
    settings: &SealSettings,
) -> Result<Share, QuorumError> {
    let Holder::Provider {
        token_type, params, ..
    } = &s.holder
    else {
        return Err(QuorumError::BadToken("not a machine share".into()));
    };
    let name = s.name();
    let provider =
        crate::seal::resolve_provider(token_type, params, settings).map_err(|source| {
            QuorumError::Provider {
                name: name.clone(),
                source,
            }
        })?;
    let sealed = Sealed {
        ciphertext: s.sealed.clone(),
        params: params.clone(),
    };
    let y = provider
        .unseal(&sealed, &binding(header, q.keyslot))
        .map_err(|source| QuorumError::Provider {
            name: name.clone(),
            source,
        })?;
    if y.len() != SECRET_LEN
        || !tag_matches(y.expose_secret(), header.uuid(), q.keyslot, s.x, &s.tag)
    {
        return Err(QuorumError::WrongShare { name });
    }
    Ok(Share { x: s.x, y })
}

/// Combines `threshold` checked shares and opens the quorum's keyslot.
pub fn open_keyslot(
    file: &dyn crate::luks2::HeaderIo,
    header: &Luks2Header,
    q: &QuorumToken,
    shares: &[&Share],
) -> Result<VolumeKey, QuorumError> {
    if shares.len() < q.threshold {
        return Err(QuorumError::NotEnough {
            have: shares.len(),
            need: q.threshold,
            total: q.shares.len(),
        });
    }
    let secret = shamir::combine(&shares[..q.threshold])?;
    let pass = passphrase_for(&secret);
    drop(secret);
    match header.unlock_slot(file, q.keyslot, &pass, &KdfLimits::default()) {
        Ok(k) => Ok(k),
        Err(FormatError::WrongPassphrase) => Err(QuorumError::SecretRejected(q.keyslot)),
        Err(e) => Err(e.into()),
    }
}

/// The quorum tokens of a header, with their ids (unparsable ones with why).
pub fn tokens(header: &Luks2Header) -> Vec<(u32, Result<QuorumToken, QuorumError>)> {
    header
        .tokens()
        .filter(|(_, t)| t.type_name() == TOKEN_TYPE)
        .map(|(id, t)| {
            (
                id,
                parse(t).and_then(|q| {
                    q.ok_or_else(|| QuorumError::BadToken("not a quorum token".into()))
                }),
            )
        })
        .collect()
}

/// Describes what a provider's share would be named as, for `policy` and messages.
pub fn provider_words(p: &dyn Provider, params: &Map<String, Value>) -> String {
    p.describe(params)
}

#[cfg(test)]
mod tests;
