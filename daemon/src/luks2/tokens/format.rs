//! nbdcrypt's provider tokens: a sealed keyslot secret as LUKS2 token JSON, and back.
//!
//! ```json
//! {
//!   "type": "nbdcrypt-aws-kms",          // registry::Provider::token_type()
//!   "keyslots": ["1"],                   // exactly one: the keyslot the secret opens
//!   "nbdcrypt_version": 1,               // token format version
//!   "created": "2026-11-28T22:40:00Z",   // RFC 3339, UTC
//!   "sealed": "AQID...",                 // base64 (standard, padded) of the provider's ciphertext
//!   "kms-key-id": "arn:aws:kms:...",     // ...then the provider's non-secret parameters
//!   "kms-region": "eu-west-1"
//! }
//! ```
//!
//! The keyslot passphrase is `base64(secret)` (the systemd-cryptenroll convention), so the
//! keyslot also opens with cryptsetup given that string. Nothing secret is stored here: the
//! header is readable by anyone.
//!
//! Tokens of other tools (`systemd-*`, `clevis`, ...) are not ours: [`parse`] answers `Ok(None)`
//! for them and callers leave them alone.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{Map, Value};

use crate::luks2::Token;
use crate::seal::registry::{self, Provider};
use crate::seal::{SealError, Sealed};

/// The token format this code writes and the newest it reads.
pub const TOKEN_VERSION: u64 = 1;

pub use crate::seal::kms::AWS_KMS_TOKEN_TYPE;
pub use crate::seal::pkcs11::TOKEN_TYPE as PKCS11_TOKEN_TYPE;

/// Members the token format owns; provider parameters must not use these names.
pub const RESERVED_MEMBERS: [&str; 5] =
    ["type", "keyslots", "nbdcrypt_version", "created", "sealed"];

/// Which provider (of the [`registry`]) sealed a token.
#[derive(Clone, Copy)]
pub struct ProviderKind(&'static dyn Provider);

impl PartialEq for ProviderKind {
    fn eq(&self, other: &Self) -> bool {
        self.0.name() == other.0.name()
    }
}
impl Eq for ProviderKind {}

impl std::fmt::Debug for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.name())
    }
}

impl ProviderKind {
    /// The provider owning `token_type`, or `None` for another tool's token.
    pub fn from_token_type(token_type: &str) -> Option<ProviderKind> {
        registry::by_token_type(token_type).map(ProviderKind)
    }

    pub fn token_type(self) -> &'static str {
        self.0.token_type()
    }

    /// Short name for messages and the audit log: "aws-kms", "pkcs11".
    pub fn name(self) -> &'static str {
        self.0.name()
    }

    /// The provider itself.
    pub fn provider(self) -> &'static dyn Provider {
        self.0
    }
}

/// True if the token type is one of our provider tokens (whatever its contents).
pub fn is_ours(token_type: &str) -> bool {
    ProviderKind::from_token_type(token_type).is_some()
}

/// One of our tokens, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedToken {
    pub kind: ProviderKind,
    /// The keyslot the sealed secret opens.
    pub keyslot: u32,
    pub version: u64,
    /// As written (RFC 3339); empty if absent.
    pub created: String,
    /// Ciphertext plus the provider's parameters (every member not in [`RESERVED_MEMBERS`]).
    pub sealed: Sealed,
}

impl ParsedToken {
    /// The key reference for messages: the provider's key id member if present.
    pub fn key_reference(&self) -> Option<&str> {
        self.sealed
            .params
            .get(self.kind.provider().key_param())
            .and_then(Value::as_str)
    }
}

/// Builds the token JSON for a secret sealed by a provider of type `token_type`, bound to
/// `keyslot`. `created` is an RFC 3339 time (see [`crate::audit::rfc3339_now`]).
pub fn build(
    token_type: &str,
    keyslot: u32,
    sealed: &Sealed,
    created: &str,
) -> Result<Token, SealError> {
    if !is_ours(token_type) {
        return Err(SealError::BadToken(format!(
            "token type {token_type:?} is not an nbdcrypt token type"
        )));
    }
    if sealed.ciphertext.is_empty() {
        return Err(SealError::BadToken("empty sealed secret".into()));
    }
    let mut o = Map::new();
    o.insert("type".into(), token_type.into());
    o.insert(
        "keyslots".into(),
        Value::Array(vec![Value::String(keyslot.to_string())]),
    );
    o.insert("nbdcrypt_version".into(), TOKEN_VERSION.into());
    o.insert("created".into(), created.into());
    o.insert("sealed".into(), B64.encode(&sealed.ciphertext).into());
    for (k, v) in &sealed.params {
        if RESERVED_MEMBERS.contains(&k.as_str()) {
            return Err(SealError::BadToken(format!(
                "provider parameter {k:?} collides with a token member"
            )));
        }
        o.insert(k.clone(), v.clone());
    }
    Token::from_json(o).map_err(|e| SealError::BadToken(e.to_string()))
}

/// Parses one of our tokens. `Ok(None)`: another tool's token (leave it alone). `Err`: ours
/// but unusable, with the reason.
pub fn parse(token: &Token) -> Result<Option<ParsedToken>, SealError> {
    parse_json(token.json())
}

/// [`parse`] on a raw token object (e.g. from `cryptsetup token export`).
pub fn parse_json(o: &Map<String, Value>) -> Result<Option<ParsedToken>, SealError> {
    let bad = |m: String| Err(SealError::BadToken(m));
    let Some(type_name) = o.get("type").and_then(Value::as_str) else {
        return bad("no \"type\" string".into());
    };
    let Some(kind) = ProviderKind::from_token_type(type_name) else {
        return Ok(None);
    };
    let version = match o.get("nbdcrypt_version") {
        None => return bad(format!("{type_name} token has no \"nbdcrypt_version\"")),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => n,
            _ => {
                return bad(format!(
                    "\"nbdcrypt_version\" {v} is not a positive integer"
                ))
            }
        },
    };
    if version > TOKEN_VERSION {
        return bad(format!(
            "token format version {version} is newer than this nbdcrypt understands \
             ({TOKEN_VERSION}); upgrade nbdcrypt"
        ));
    }
    let keyslots: Vec<&Value> = match o.get("keyslots") {
        Some(Value::Array(a)) => a.iter().collect(),
        _ => return bad("\"keyslots\" is not an array".into()),
    };
    let keyslot = match keyslots.as_slice() {
        [] => return bad("bound to no keyslot (its keyslot was removed)".into()),
        [Value::String(s)] => match s.parse::<u32>() {
            Ok(n) if n.to_string() == *s => n,
            _ => return bad(format!("keyslot reference {s:?} is not a keyslot number")),
        },
        [_] => return bad("keyslot reference is not a string".into()),
        more => {
            return bad(format!(
                "bound to {} keyslots; an nbdcrypt token serves exactly one",
                more.len()
            ))
        }
    };
    let sealed_b64 = match o.get("sealed") {
        Some(Value::String(s)) => s,
        Some(_) => return bad("\"sealed\" is not a string".into()),
        None => return bad("no \"sealed\" member".into()),
    };
    let ciphertext = match B64.decode(sealed_b64) {
        Ok(c) if !c.is_empty() => c,
        Ok(_) => return bad("\"sealed\" is empty".into()),
        Err(e) => return bad(format!("\"sealed\" is not padded standard base64: {e}")),
    };
    let created = match o.get("created") {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return bad("\"created\" is not a string".into()),
    };
    let params = o
        .iter()
        .filter(|(k, _)| !RESERVED_MEMBERS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(Some(ParsedToken {
        kind,
        keyslot,
        version,
        created,
        sealed: Sealed { ciphertext, params },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sealed() -> Sealed {
        let mut params = Map::new();
        params.insert(
            "kms-key-id".into(),
            "arn:aws:kms:eu-west-1:1:key/abc".into(),
        );
        params.insert("kms-region".into(), "eu-west-1".into());
        Sealed {
            ciphertext: vec![1, 2, 3, 250],
            params,
        }
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn build_then_parse_round_trips() {
        let t = build(AWS_KMS_TOKEN_TYPE, 3, &sealed(), "2026-11-28T00:00:00Z").unwrap();
        assert_eq!(t.type_name(), "nbdcrypt-aws-kms");
        assert_eq!(t.keyslots(), &[3]);
        let j = t.json();
        assert_eq!(j["keyslots"], json!(["3"]));
        assert_eq!(j["nbdcrypt_version"], json!(1));
        assert_eq!(j["sealed"], json!("AQID+g=="));
        assert_eq!(j["kms-region"], json!("eu-west-1"));
        let p = parse(&t).unwrap().unwrap();
        assert_eq!(p.kind.name(), "aws-kms");
        assert_eq!(p.keyslot, 3);
        assert_eq!(p.created, "2026-11-28T00:00:00Z");
        assert_eq!(p.sealed, sealed());
        assert_eq!(p.key_reference(), Some("arn:aws:kms:eu-west-1:1:key/abc"));
    }

    #[test]
    fn other_tools_tokens_are_not_ours() {
        for t in [
            json!({"type": "systemd-tpm2", "keyslots": ["1"], "tpm2-blob": "AA=="}),
            json!({"type": "clevis", "keyslots": [], "jwe": {}}),
            json!({"type": "luks2-keyring", "keyslots": ["0"], "key_description": "x"}),
        ] {
            assert_eq!(parse_json(&obj(t)).unwrap(), None);
        }
        assert!(!is_ours("systemd-pkcs11"));
        assert!(is_ours("nbdcrypt-pkcs11"));
    }

    #[test]
    fn malformed_tokens_say_why() {
        let base = json!({"type": "nbdcrypt-aws-kms", "keyslots": ["1"], "nbdcrypt_version": 1,
                          "sealed": "AQID"});
        let with = |k: &str, v: Value| {
            let mut o = obj(base.clone());
            o.insert(k.into(), v);
            o
        };
        let without = |k: &str| {
            let mut o = obj(base.clone());
            o.remove(k);
            o
        };
        let cases: Vec<(Map<String, Value>, &str)> = vec![
            (
                with("nbdcrypt_version", json!(2)),
                "newer than this nbdcrypt",
            ),
            (
                with("nbdcrypt_version", json!("1")),
                "not a positive integer",
            ),
            (without("nbdcrypt_version"), "no \"nbdcrypt_version\""),
            (with("keyslots", json!([])), "bound to no keyslot"),
            (with("keyslots", json!(["1", "2"])), "exactly one"),
            (with("keyslots", json!([1])), "not a string"),
            (with("keyslots", json!(["01"])), "not a keyslot number"),
            (with("sealed", json!("not base64!")), "base64"),
            (with("sealed", json!("")), "empty"),
            (with("sealed", json!(5)), "not a string"),
            (without("sealed"), "no \"sealed\""),
            (with("created", json!(5)), "\"created\""),
        ];
        for (o, want) in cases {
            let e = parse_json(&o).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should contain {want:?}");
        }
    }

    #[test]
    fn provider_params_cannot_shadow_token_members() {
        let mut s = sealed();
        s.params.insert("keyslots".into(), json!(["7"]));
        assert!(build(AWS_KMS_TOKEN_TYPE, 1, &s, "t").is_err());
        assert!(build("systemd-tpm2", 1, &sealed(), "t").is_err());
    }
}
