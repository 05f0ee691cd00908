//! clevis-compatible LUKS2 tokens (type `clevis`): read the ones `clevis luks bind` writes,
//! write ones `clevis luks unlock` / `list` / `pass` accept. Pins: `tang`, `tpm2`, `sss`.
//!
//! A clevis token is `{"type":"clevis","keyslots":["N"],"jwe":{…flattened JWE…}}`; the JWE's
//! plaintext is the passphrase of keyslot N (printable ASCII, no newline: clevis handles it in
//! bash). Which Tang servers may be asked and which TPM is used come from the operator's
//! settings ([`ClevisSettings`]), never from the token: the header is attacker-writable.
//!
//! - [`jwe`]: compact / flattened JWE, A256GCM, Concat KDF, thumbprints.
//! - [`tang`]: McCallum-Relyea recovery over HTTP, advertisement checked against the operator's
//!   thumbprint.
//! - [`tpm2`]: seal / unseal through tpm2-tools, optional PCR policy.
//! - [`sss`]: Shamir threshold over other pins, nested as clevis nests them.
//! - [`provider`]: clevis pins as a registry provider (`nbdcrypt-clevis` tokens, quorum shares)
//!   and the operator settings (`tang-allow`, `tpm2-tcti`).
//!
//! The LUKS2 side (clevis tokens in a header, enrol, unlock) is `luks2::tokens::clevis`.

pub mod http;
pub mod jwe;
pub mod provider;
pub mod sss;
pub mod tang;
pub mod tpm2;

use serde_json::Value;

use crate::crypto::keys::SecretBytes;
use crate::seal::SealError;
use jwe::Jwe;

/// LUKS2 token type clevis reads and writes.
pub const TOKEN_TYPE: &str = "clevis";
/// How deep sss may nest (sss inside sss inside sss): bounds work a hostile header can ask for.
pub const MAX_DEPTH: u32 = 3;
/// Most pins (tang, tpm2) one token may name in all, however nested: each may cost a network
/// exchange or a TPM session, and the header is attacker-written.
pub const MAX_LEAVES: usize = 32;

/// Number of non-sss pins under `jwe` (unreadable children count as one).
fn leaves(jwe: &Jwe, depth: u32) -> usize {
    if jwe.pin().ok() != Some("sss") || depth > MAX_DEPTH {
        return 1;
    }
    match sss::children(jwe) {
        Ok((_, kids)) => kids
            .iter()
            .map(|k| leaves(k, depth + 1))
            .sum::<usize>()
            .max(1),
        Err(_) => 1,
    }
}

/// What the operator allows for clevis tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClevisSettings {
    pub tang: tang::TangSettings,
    pub tpm2: tpm2::Tpm2Settings,
}

impl ClevisSettings {
    /// From the operator's `tang-allow` entries (`URL=THUMBPRINT`) and `tpm2-tcti`.
    pub fn from_config(tang_allow: &[String], tpm2_tcti: Option<String>) -> Result<Self, String> {
        let allowed = tang_allow
            .iter()
            .map(|s| tang::TangServer::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let s = ClevisSettings {
            tang: tang::TangSettings { allowed },
            tpm2: tpm2::Tpm2Settings {
                tcti: tpm2_tcti.filter(|t| !t.is_empty()),
            },
        };
        s.tpm2.validate()?;
        Ok(s)
    }
}

/// A clevis policy to encrypt to (what `clevis encrypt PIN CFG` takes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSpec {
    /// A Tang server and the thumbprint of its signing key (checked against its advertisement).
    Tang { url: String, thumbprint: String },
    /// The TPM of [`tpm2::Tpm2Settings`]; with `pcr = Some((bank, ids))` sealed to the current
    /// values of those PCRs ("sha256", "0,7").
    Tpm2 { pcr: Option<(String, String)> },
    /// Any `t` of `pins`.
    Sss { t: usize, pins: Vec<PinSpec> },
}

pub(crate) fn bad(detail: String) -> SealError {
    SealError::BadToken(format!("clevis token: {detail}"))
}

/// A string from a header, made safe to print: control characters escaped, length capped.
pub(crate) fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(200).flat_map(char::escape_default).collect();
    if s.chars().count() > 200 {
        out.push('…');
    }
    out
}

/// Decrypts one clevis JWE with the pins the operator's settings allow.
pub fn decrypt_jwe(
    jwe: &Jwe,
    settings: &ClevisSettings,
    depth: u32,
) -> Result<SecretBytes, SealError> {
    if depth > MAX_DEPTH {
        return Err(bad(format!("sss nested deeper than {MAX_DEPTH} levels")));
    }
    if depth == 0 && leaves(jwe, 0) > MAX_LEAVES {
        return Err(bad(format!(
            "the token names more than {MAX_LEAVES} pins; refused before trying any"
        )));
    }
    match jwe.pin()? {
        "tang" => tang::decrypt(jwe, &settings.tang),
        "tpm2" => tpm2::decrypt(jwe, &settings.tpm2),
        "sss" => sss::decrypt(jwe, settings, depth),
        other => Err(SealError::NotConfigured {
            provider: "clevis",
            detail: format!(
                "clevis pin {:?} is not supported (tang, tpm2 and sss are)",
                shown(other)
            ),
        }),
    }
}

/// Encrypts `plaintext` to `pin` (tang servers are asked for their advertisement, the TPM
/// seals a key).
pub fn encrypt(
    pin: &PinSpec,
    plaintext: &[u8],
    settings: &ClevisSettings,
) -> Result<Jwe, SealError> {
    match pin {
        PinSpec::Tang { url, thumbprint } => tang::encrypt(url, thumbprint, plaintext),
        PinSpec::Tpm2 { pcr } => tpm2::encrypt(
            pcr.as_ref().map(|(b, i)| (b.as_str(), i.as_str())),
            plaintext,
            &settings.tpm2,
        ),
        PinSpec::Sss { t, pins } => sss::encrypt(*t, pins, plaintext, settings),
    }
}

/// One line describing a JWE's policy, for messages and listings: `tang http://…`,
/// `tpm2 (PCRs sha256:0,7)`, `sss 2 of [tang http://…, tpm2]`.
pub fn summary(jwe: &Jwe) -> String {
    summary_at(jwe, 0)
}

fn summary_at(jwe: &Jwe, depth: u32) -> String {
    let pin = jwe.pin().unwrap_or("?");
    match pin {
        "tang" => {
            let url = jwe
                .pin_header("tang")
                .ok()
                .and_then(|t| t.get("url"))
                .and_then(Value::as_str)
                .unwrap_or("?");
            format!("tang {}", shown(url))
        }
        "tpm2" => {
            let h = jwe.pin_header("tpm2").ok();
            let get = |k: &str| {
                h.and_then(|h| h.get(k)).map(|v| match v {
                    Value::String(s) => shown(s),
                    other => shown(&other.to_string()),
                })
            };
            match get("pcr_ids") {
                Some(ids) => format!(
                    "tpm2 (PCRs {}:{ids})",
                    get("pcr_bank").unwrap_or_else(|| "sha1".into())
                ),
                None => "tpm2".into(),
            }
        }
        "sss" if depth < MAX_DEPTH => match sss::children(jwe) {
            Ok((t, kids)) => format!(
                "sss {t} of [{}]",
                kids.iter()
                    .map(|k| summary_at(k, depth + 1))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(_) => "sss (unreadable)".into(),
        },
        other => shown(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_naming_too_many_pins_is_refused_before_trying_any() {
        let leaf = Jwe::encrypt(
            &serde_json::json!({"alg":"dir","enc":"A256GCM","clevis":{"pin":"tpm2","tpm2":{}}}),
            &[0; 32],
            &[0; 64],
        )
        .unwrap()
        .to_compact();
        let level = |kids: Vec<String>| {
            Jwe::encrypt(
                &serde_json::json!({"alg":"dir","enc":"A256GCM","clevis":{"pin":"sss","sss":{
                    "t":1,"p":jwe::b64u(&[0xff; 32]),"jwe":kids}}}),
                &[0; 32],
                b"x",
            )
            .unwrap()
        };
        let mid = level(vec![leaf; 6]).to_compact();
        let top = level(vec![mid; 6]); // 36 tpm2 pins
        let settings =
            ClevisSettings::from_config(&[], Some("swtpm:host=127.0.0.1,port=1".into())).unwrap();
        let Err(e) = decrypt_jwe(&top, &settings, 0) else {
            panic!()
        };
        assert!(e.to_string().contains("more than 32 pins"), "{e}");
    }

    #[test]
    fn settings_parse_and_refuse_bad_entries() {
        let s = ClevisSettings::from_config(
            &["http://127.0.0.1:7500=yf78M8MmkSCnVRnc0wpmxaJ7g2jGJXR1ue9UAhLMQCk".into()],
            Some("swtpm:host=127.0.0.1,port=2321".into()),
        )
        .unwrap();
        assert_eq!(s.tang.allowed.len(), 1);
        assert!(ClevisSettings::from_config(&["nonsense".into()], None).is_err());
        assert!(ClevisSettings::from_config(&[], Some("a\nb".into())).is_err());
    }

    #[test]
    fn unsupported_pins_and_deep_nesting_are_refused() {
        let null = Jwe::encrypt(
            &serde_json::json!({"alg":"dir","enc":"A256GCM","clevis":{"pin":"null\u{1b}[2J"}}),
            &[0; 32],
            b"x",
        )
        .unwrap();
        let Err(e) = decrypt_jwe(&null, &ClevisSettings::default(), 0) else {
            panic!()
        };
        assert!(
            e.to_string().contains("not supported") && !e.to_string().contains('\u{1b}'),
            "{e}"
        );
        assert!(decrypt_jwe(&null, &ClevisSettings::default(), MAX_DEPTH + 1).is_err());
    }

    #[test]
    fn nested_sss_of_an_unreachable_tang_reports_every_share() {
        // sss t=1 of [tang at an allowed but dead address, tang at a disallowed address]:
        // one Unreachable and one Untrusted; the whole is transient (worth a retry).
        let inner = |url: &str| {
            Jwe::encrypt(
                &serde_json::json!({"alg":"ECDH-ES","enc":"A256GCM","kid":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                    "epk":{"kty":"EC","crv":"P-521","x":"AA","y":"AA"},
                    "clevis":{"pin":"tang","tang":{"url":url}}}),
                &[0; 32],
                &[0; 64],
            )
            .unwrap()
            .to_compact()
        };
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let dead = format!("http://127.0.0.1:{port}");
        let outer = Jwe::encrypt(
            &serde_json::json!({"alg":"dir","enc":"A256GCM","clevis":{"pin":"sss","sss":{
                "t":1,"p":jwe::b64u(&[0xff; 32]),"jwe":[inner(&dead), inner("http://192.0.2.7")]}}}),
            &[0; 32],
            b"x",
        )
        .unwrap();
        let settings = ClevisSettings::from_config(
            &[format!(
                "{dead}=yf78M8MmkSCnVRnc0wpmxaJ7g2jGJXR1ue9UAhLMQCk"
            )],
            None,
        )
        .unwrap();
        assert!(
            summary(&outer).starts_with("sss 1 of [tang http://127.0.0.1:"),
            "{}",
            summary(&outer)
        );
        let Err(e) = decrypt_jwe(&outer, &settings, 0) else {
            panic!()
        };
        let msg = e.to_string();
        // The epk is not a point: that is found before any request, for both shares.
        assert!(msg.contains("0 of 1 shares"), "{msg}");
        assert!(
            msg.contains("192.0.2.7") && msg.contains("not allowed"),
            "{msg}"
        );
    }
}
