//! The JWE subset clevis writes: a protected header only, `encrypted_key` empty (`dir` or direct
//! `ECDH-ES`), content encrypted with `A256GCM`; compact form (`hdr..iv.ct.tag`) and the
//! flattened JSON form LUKS2 tokens carry. Plus the pieces the pins share: base64url, the
//! Concat KDF of ECDH-ES and RFC 7638 thumbprints of P-521 keys.
//!
//! Every input here comes from a LUKS2 header (anyone holding the disk can write it): sizes are
//! capped before decoding and nothing panics on malformed data.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64U;
use base64::Engine;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

use super::bad;
use crate::crypto::keys::SecretBytes;
use crate::seal::SealError;

/// Largest protected header accepted (base64url characters). An sss header of four tang
/// children is about 6 KiB; clevis tokens must fit a LUKS2 JSON area (at most 4 MiB).
pub const MAX_PROTECTED: usize = 256 * 1024;
/// Largest ciphertext accepted: clevis encrypts passphrases, sss shares and TPM JWKs.
pub const MAX_CIPHERTEXT: usize = 4096;

/// One JWE as clevis writes it. `protected_b64` is kept exactly as stored: it is the AAD.
#[derive(Clone, PartialEq)]
pub struct Jwe {
    pub protected_b64: String,
    pub header: Map<String, Value>,
    pub iv: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub tag: Vec<u8>,
}

impl std::fmt::Debug for Jwe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwe")
            .field("header", &self.header)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

/// base64url without padding, as JOSE writes it.
pub fn b64u(bytes: &[u8]) -> String {
    B64U.encode(bytes)
}

/// Decodes base64url (no padding), at most `max` decoded bytes.
pub fn b64u_decode(s: &str, what: &str, max: usize) -> Result<Vec<u8>, SealError> {
    if s.len() > max.saturating_mul(4) / 3 + 4 {
        return Err(bad(format!("{what} is longer than {max} bytes")));
    }
    B64U.decode(s.as_bytes())
        .map_err(|_| bad(format!("{what} is not base64url")))
}

/// A string member of a JSON object, or a `BadToken` naming it.
pub fn str_member<'a>(
    o: &'a Map<String, Value>,
    key: &str,
    what: &str,
) -> Result<&'a str, SealError> {
    o.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("{what} has no \"{key}\" string")))
}

/// An object member of a JSON object, or a `BadToken` naming it.
pub fn obj_member<'a>(
    o: &'a Map<String, Value>,
    key: &str,
    what: &str,
) -> Result<&'a Map<String, Value>, SealError> {
    o.get(key)
        .and_then(Value::as_object)
        .ok_or_else(|| bad(format!("{what} has no \"{key}\" object")))
}

impl Jwe {
    /// Parses the compact serialization `protected.encrypted_key.iv.ciphertext.tag`.
    pub fn from_compact(s: &str) -> Result<Jwe, SealError> {
        if s.len() > MAX_PROTECTED + 2 * MAX_CIPHERTEXT {
            return Err(bad("compact JWE too long".into()));
        }
        let parts: Vec<&str> = s.trim().split('.').collect();
        let [protected, ek, iv, ct, tag] = parts[..] else {
            return Err(bad(format!(
                "a compact JWE has 5 parts separated by '.', this has {}",
                parts.len()
            )));
        };
        Self::from_parts(protected, ek, iv, ct, tag)
    }

    /// Parses the flattened JSON serialization stored in a clevis token's `jwe` member.
    pub fn from_flattened(v: &Value) -> Result<Jwe, SealError> {
        let o = v
            .as_object()
            .ok_or_else(|| bad("\"jwe\" is not an object".into()))?;
        for unsupported in ["header", "aad", "recipients"] {
            if o.contains_key(unsupported) {
                return Err(bad(format!(
                    "JWE member \"{unsupported}\" is not used by clevis and not supported"
                )));
            }
        }
        let get = |k: &str| str_member(o, k, "the JWE");
        let ek = o.get("encrypted_key").and_then(Value::as_str).unwrap_or("");
        Self::from_parts(
            get("protected")?,
            ek,
            get("iv")?,
            get("ciphertext")?,
            get("tag")?,
        )
    }

    fn from_parts(
        protected: &str,
        ek: &str,
        iv: &str,
        ct: &str,
        tag: &str,
    ) -> Result<Jwe, SealError> {
        if !ek.is_empty() {
            return Err(bad(
                "the JWE has an encrypted key: clevis uses direct keys only (alg dir / ECDH-ES)"
                    .into(),
            ));
        }
        if protected.len() > MAX_PROTECTED {
            return Err(bad(format!(
                "JWE protected header longer than {MAX_PROTECTED} characters"
            )));
        }
        let raw = b64u_decode(protected, "the JWE protected header", MAX_PROTECTED)?;
        let header: Map<String, Value> = serde_json::from_slice(&raw).map_err(|e| {
            bad(format!(
                "the JWE protected header is not a JSON object: {e}"
            ))
        })?;
        let iv = b64u_decode(iv, "the JWE iv", 64)?;
        let ciphertext = b64u_decode(ct, "the JWE ciphertext", MAX_CIPHERTEXT)?;
        let tag = b64u_decode(tag, "the JWE tag", 64)?;
        if iv.len() != 12 || tag.len() != 16 {
            return Err(bad(format!(
                "A256GCM needs a 12-byte iv and a 16-byte tag (got {} and {})",
                iv.len(),
                tag.len()
            )));
        }
        let jwe = Jwe {
            protected_b64: protected.to_owned(),
            header,
            iv,
            ciphertext,
            tag,
        };
        if jwe.header.get("enc").and_then(Value::as_str) != Some("A256GCM") {
            return Err(bad(format!(
                "JWE enc {} is not supported (clevis uses A256GCM)",
                jwe.header
                    .get("enc")
                    .map(Value::to_string)
                    .unwrap_or("(none)".into())
            )));
        }
        Ok(jwe)
    }

    pub fn to_compact(&self) -> String {
        format!(
            "{}..{}.{}.{}",
            self.protected_b64,
            b64u(&self.iv),
            b64u(&self.ciphertext),
            b64u(&self.tag)
        )
    }

    /// The flattened JSON form, with all five members (udisks2's reader needs
    /// `encrypted_key` even when empty).
    pub fn to_flattened(&self) -> Value {
        let mut o = Map::new();
        o.insert("ciphertext".into(), b64u(&self.ciphertext).into());
        o.insert("encrypted_key".into(), "".into());
        o.insert("iv".into(), b64u(&self.iv).into());
        o.insert("protected".into(), self.protected_b64.clone().into());
        o.insert("tag".into(), b64u(&self.tag).into());
        Value::Object(o)
    }

    /// `clevis.pin` of the header.
    pub fn pin(&self) -> Result<&str, SealError> {
        let clevis = obj_member(&self.header, "clevis", "the JWE header")?;
        str_member(clevis, "pin", "the clevis header")
    }

    /// `clevis.<pin>`: the pin's own header object.
    pub fn pin_header(&self, pin: &str) -> Result<&Map<String, Value>, SealError> {
        let clevis = obj_member(&self.header, "clevis", "the JWE header")?;
        obj_member(clevis, pin, "the clevis header")
    }

    /// Decrypts with the content key. A wrong key and a tampered JWE look alike: both fail the
    /// GCM tag.
    pub fn decrypt(&self, cek: &[u8; 32]) -> Result<SecretBytes, SealError> {
        let cipher =
            Aes256Gcm::new_from_slice(cek).map_err(|_| bad("bad content key length".into()))?;
        let nonce = Nonce::try_from(&self.iv[..]).map_err(|_| bad("bad iv length".into()))?;
        let mut msg = Vec::with_capacity(self.ciphertext.len() + self.tag.len());
        msg.extend_from_slice(&self.ciphertext);
        msg.extend_from_slice(&self.tag);
        let plain = cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: &msg,
                    aad: self.protected_b64.as_bytes(),
                },
            )
            .map_err(|_| SealError::Other {
                provider: "clevis",
                detail: "the JWE did not decrypt (authentication tag mismatch: wrong key \
                         recovered, or the token was altered)"
                    .into(),
            })?;
        Ok(SecretBytes::from_vec(plain))
    }

    /// Encrypts `plaintext` under `cek` with `header` (serialized with sorted keys, as jose
    /// does) as the protected header.
    pub fn encrypt(header: &Value, cek: &[u8; 32], plaintext: &[u8]) -> Result<Jwe, SealError> {
        let header = sorted(header.clone());
        let Value::Object(map) = header.clone() else {
            return Err(bad("JWE header must be an object".into()));
        };
        let protected_b64 = b64u(header.to_string().as_bytes());
        let mut iv = vec![0u8; 12];
        getrandom::fill(&mut iv).map_err(|e| SealError::Other {
            provider: "clevis",
            detail: format!("no random bytes: {e}"),
        })?;
        let cipher =
            Aes256Gcm::new_from_slice(cek).map_err(|_| bad("bad content key length".into()))?;
        let nonce = Nonce::try_from(&iv[..]).map_err(|_| bad("bad iv length".into()))?;
        let mut out = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: protected_b64.as_bytes(),
                },
            )
            .map_err(|_| bad("AES-GCM encryption failed".into()))?;
        let tag = out.split_off(out.len().saturating_sub(16));
        Ok(Jwe {
            protected_b64,
            header: map,
            iv,
            ciphertext: out,
            tag,
        })
    }
}

/// A JSON value with every object's members in sorted order (jose's output order).
pub fn sorted(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(String, Value)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// RFC 7518 §4.6.2 Concat KDF for `ECDH-ES` with `enc` A256GCM, empty apu/apv: one SHA-256
/// round over the shared x-coordinate `z`.
pub fn concat_kdf_a256gcm(z: &[u8]) -> [u8; 32] {
    let alg = b"A256GCM";
    let mut h = Sha256::new();
    h.update(1u32.to_be_bytes());
    h.update(z);
    h.update(7u32.to_be_bytes());
    h.update(alg);
    h.update(0u32.to_be_bytes());
    h.update(0u32.to_be_bytes());
    h.update(256u32.to_be_bytes());
    h.finalize().into()
}

/// RFC 7638 thumbprint input of an EC JWK: `{"crv","kty","x","y"}` in that order.
fn ec_thumbprint_input(jwk: &Map<String, Value>) -> Result<String, SealError> {
    let get = |k: &str| str_member(jwk, k, "the JWK");
    if get("kty")? != "EC" {
        return Err(bad("the JWK is not an EC key".into()));
    }
    // serde_json escapes as JSON requires; base64url and curve names need no escaping anyway.
    Ok(format!(
        "{{\"crv\":{},\"kty\":\"EC\",\"x\":{},\"y\":{}}}",
        Value::from(get("crv")?),
        Value::from(get("x")?),
        Value::from(get("y")?)
    ))
}

/// RFC 7638 SHA-256 thumbprint (base64url, 43 characters) of an EC JWK.
pub fn thumbprint_s256(jwk: &Map<String, Value>) -> Result<String, SealError> {
    let input = ec_thumbprint_input(jwk)?;
    Ok(b64u(&Sha256::digest(input.as_bytes())))
}

/// RFC 7638 SHA-1 thumbprint (27 characters): older clevis bindings name keys by it.
pub fn thumbprint_s1(jwk: &Map<String, Value>) -> Result<String, SealError> {
    use sha1::Sha1;
    let input = ec_thumbprint_input(jwk)?;
    Ok(b64u(&Sha1::digest(input.as_bytes())))
}

/// True if `thp` is the S256 or S1 thumbprint of `jwk`.
pub fn thumbprint_matches(jwk: &Map<String, Value>, thp: &str) -> bool {
    thumbprint_s256(jwk).is_ok_and(|t| t == thp) || thumbprint_s1(jwk).is_ok_and(|t| t == thp)
}

/// A base64url thumbprint as an operator or a header gives it: 27 (S1) to 86 (S512) characters
/// of the base64url alphabet. Also what keeps a `kid` from reshaping a request path.
pub fn is_thumbprint(s: &str) -> bool {
    (27..=86).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// 32 random bytes for a content key.
pub fn random_key() -> Result<[u8; 32], SealError> {
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).map_err(|e| SealError::Other {
        provider: "clevis",
        detail: format!("no random bytes: {e}"),
    })?;
    Ok(k)
}

/// Wipes a content key on every path.
pub struct Cek(pub [u8; 32]);

impl Drop for Cek {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn encrypt_then_decrypt_round_trips_in_both_forms() {
        let key = [7u8; 32];
        let hdr = json!({"enc":"A256GCM","alg":"dir","clevis":{"pin":"x","x":{}}});
        let jwe = Jwe::encrypt(&hdr, &key, b"passphrase").unwrap();
        let compact = Jwe::from_compact(&jwe.to_compact()).unwrap();
        let flat = Jwe::from_flattened(&jwe.to_flattened()).unwrap();
        assert_eq!(compact, jwe);
        assert_eq!(flat, jwe);
        assert_eq!(flat.decrypt(&key).unwrap().expose_secret(), b"passphrase");
        // jose's order: sorted members.
        let raw = B64U.decode(&jwe.protected_b64).unwrap();
        assert!(
            raw.starts_with(b"{\"alg\":\"dir\",\"clevis\""),
            "{}",
            String::from_utf8_lossy(&raw)
        );
        assert_eq!(jwe.pin().unwrap(), "x");
    }

    #[test]
    fn the_protected_header_is_authenticated_and_the_key_checked() {
        let key = [9u8; 32];
        let hdr = json!({"enc":"A256GCM","alg":"dir"});
        let jwe = Jwe::encrypt(&hdr, &key, b"secret").unwrap();
        assert!(jwe.decrypt(&[8u8; 32]).is_err());
        let mut altered = jwe.clone();
        altered.protected_b64 = b64u(br#"{"alg":"dir","enc":"A256GCM"} "#);
        assert!(altered.decrypt(&key).is_err());
        let mut ct = jwe.clone();
        ct.ciphertext[0] ^= 1;
        assert!(ct.decrypt(&key).is_err());
    }

    #[test]
    fn malformed_jwes_are_refused_with_a_reason() {
        let cases = [
            "a.b.c",
            "....",
            "e30..AAAAAAAAAAAAAAAA.AA.AAAAAAAAAAAAAAAAAAAAAA",
            "!!!..AAAAAAAAAAAAAAAA.AA.AAAAAAAAAAAAAAAAAAAAAA",
            "eyJlbmMiOiJBMjU2R0NNIn0.eA.AAAAAAAAAAAAAAAA.AA.AAAAAAAAAAAAAAAAAAAAAA",
            "eyJlbmMiOiJBMjU2R0NNIn0..AAAA.AA.AAAAAAAAAAAAAAAAAAAAAA",
        ];
        for c in cases {
            assert!(Jwe::from_compact(c).is_err(), "{c}");
        }
        // A well-formed minimal one parses.
        let ok = "eyJlbmMiOiJBMjU2R0NNIn0..AAAAAAAAAAAAAAAA.AA.AAAAAAAAAAAAAAAAAAAAAA";
        Jwe::from_compact(ok).unwrap();
        assert!(Jwe::from_flattened(&json!({"protected":"eyJlbmMiOiJBMjU2R0NNIn0"})).is_err());
        assert!(Jwe::from_flattened(&json!([])).is_err());
    }

    #[test]
    fn thumbprints_follow_rfc_7638() {
        // RFC 7638 §3.1 is RSA; this EC vector is the S256 of the canonical string, computed
        // independently (Python: hashlib.sha256(b'{"crv":"P-256","kty":"EC","x":"a","y":"b"}')).
        let jwk =
            json!({"kty":"EC","crv":"P-256","x":"a","y":"b","alg":"ECMR","key_ops":["deriveKey"]});
        let jwk = jwk.as_object().unwrap();
        let want = b64u(&Sha256::digest(
            br#"{"crv":"P-256","kty":"EC","x":"a","y":"b"}"#,
        ));
        assert_eq!(thumbprint_s256(jwk).unwrap(), want);
        assert!(thumbprint_matches(jwk, &want));
        assert!(thumbprint_matches(jwk, &thumbprint_s1(jwk).unwrap()));
        assert!(!thumbprint_matches(
            jwk,
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        ));
        assert!(is_thumbprint(&want));
        assert!(!is_thumbprint(
            "../../etc/passwd/aaaaaaaaaaaaaaaaaaaaaaaaaaa"
        ));
    }

    #[test]
    fn concat_kdf_matches_a_hand_computed_value() {
        let z = [0x11u8; 66];
        let mut input = Vec::new();
        input.extend_from_slice(&[0, 0, 0, 1]);
        input.extend_from_slice(&z);
        input.extend_from_slice(&[0, 0, 0, 7]);
        input.extend_from_slice(b"A256GCM");
        input.extend_from_slice(&[0; 8]);
        input.extend_from_slice(&[0, 0, 1, 0]);
        let want: [u8; 32] = Sha256::digest(&input).into();
        assert_eq!(concat_kdf_a256gcm(&z), want);
    }
}
