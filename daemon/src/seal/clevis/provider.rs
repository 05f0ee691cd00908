//! clevis pins in the provider registry: the operator settings every clevis use reads
//! (`tang-allow`, `tpm2-tcti`: daemon flags, TOML keys and nbdcryptctl flags through the
//! registry), and a key holder for nbdcrypt's own tokens and quorum shares
//! (`nbdcryptctl enroll --clevis SPEC`, token type `nbdcrypt-clevis`): the 32-byte secret is
//! sealed in a clevis JWE (tang, tpm2), the volume binding inside the encrypted plaintext.
//!
//! clevis's own tokens (type `clevis`, as `clevis luks bind` writes them) are read and written
//! by `luks2::tokens::clevis` with the same settings.

use std::any::Any;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::jwe::Jwe;
use super::tang::TangServer;
use super::{ClevisSettings, PinSpec};
use crate::crypto::keys::SecretBytes;
use crate::seal::registry::{Configured, EnrollFlag, Provider, RawSettings, SettingSpec};
use crate::seal::{Binding, SealError, SealProvider, Sealed};

/// Registry name of the clevis provider.
pub const NAME: &str = "clevis";
/// Token type of secrets nbdcrypt sealed with clevis pins.
pub const TOKEN_TYPE: &str = "nbdcrypt-clevis";
/// The TPM `enroll` uses when the operator named none.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";
const POLICY_PARAM: &str = "clevis-policy";

/// The registry entry.
pub struct ClevisPins;

static SETTINGS: &[SettingSpec] = &[
    SettingSpec {
        key: "tang-allow",
        aliases: &[],
        value_name: "URL=THUMBPRINT",
        help: "A Tang server clevis tokens may ask, with the thumbprint of its signing key \
               (`tang-show-keys PORT` on the server); repeat for several. Tokens naming any \
               other server are refused before any request",
        repeated: true,
    },
    SettingSpec {
        key: "tpm2-tcti",
        aliases: &[],
        value_name: "TCTI",
        help: "The TPM for clevis tpm2 tokens, as a tpm2-tools TCTI (device:/dev/tpmrm0, \
               swtpm:host=127.0.0.1,port=2321). Without it tpm2 tokens are not used",
        repeated: false,
    },
];

fn settings_of(configured: &(dyn Any + Send + Sync)) -> ClevisSettings {
    configured
        .downcast_ref::<ClevisSettings>()
        .cloned()
        .unwrap_or_default()
}

/// `tang:URL=THUMBPRINT`, `tpm2`, `tpm2:BANK:IDS` (PCR policy, e.g. `tpm2:sha256:0,7`).
pub fn parse_spec(spec: &str) -> Result<PinSpec, String> {
    if let Some(t) = spec.strip_prefix("tang:") {
        let s = TangServer::parse(t)?;
        return Ok(PinSpec::Tang {
            url: s.url,
            thumbprint: s.thumbprint,
        });
    }
    if spec == "tpm2" {
        return Ok(PinSpec::Tpm2 { pcr: None });
    }
    if let Some(p) = spec.strip_prefix("tpm2:") {
        if let Some((bank, ids)) = p.split_once(':') {
            return Ok(PinSpec::Tpm2 {
                pcr: Some((bank.to_owned(), ids.to_owned())),
            });
        }
    }
    Err(format!(
        "--clevis {spec:?}: give tang:URL=THUMBPRINT, tpm2, or tpm2:BANK:PCRS (tpm2:sha256:0,7)"
    ))
}

fn describe_spec(p: &PinSpec) -> String {
    match p {
        PinSpec::Tang { url, .. } => format!("tang {url}"),
        PinSpec::Tpm2 { pcr: None } => "tpm2".into(),
        PinSpec::Tpm2 { pcr: Some((b, i)) } => format!("tpm2 (PCRs {b}:{i})"),
        PinSpec::Sss { t, pins } => format!(
            "sss {t} of [{}]",
            pins.iter()
                .map(describe_spec)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

impl Provider for ClevisPins {
    fn name(&self) -> &'static str {
        NAME
    }
    fn label(&self) -> &'static str {
        "clevis (Tang, TPM2)"
    }
    fn token_type(&self) -> &'static str {
        TOKEN_TYPE
    }
    fn key_param(&self) -> &'static str {
        POLICY_PARAM
    }
    fn settings(&self) -> &'static [SettingSpec] {
        SETTINGS
    }
    fn configure(&self, raw: &RawSettings) -> Result<Configured, String> {
        let s = ClevisSettings::from_config(
            raw.get_all("tang-allow"),
            raw.get("tpm2-tcti").map(str::to_owned),
        )?;
        Ok(Arc::new(s))
    }
    fn for_token(
        &self,
        _params: &Map<String, Value>,
        configured: &(dyn Any + Send + Sync),
    ) -> Result<Box<dyn SealProvider>, SealError> {
        // Everything that decides where a request goes is the operator's; the policy in the
        // token is checked against it when the JWE is opened (before any request).
        let settings = settings_of(configured);
        if settings.tang.allowed.is_empty() && settings.tpm2.tcti.is_none() {
            return Err(SealError::NotConfigured {
                provider: NAME,
                detail: "no Tang server allowed (--tang-allow URL=THUMBPRINT) and no TPM named \
                         (--tpm2-tcti TCTI)"
                    .into(),
            });
        }
        Ok(Box::new(ClevisSealer {
            settings,
            spec: None,
        }))
    }
    fn enroll_flag(&self) -> EnrollFlag {
        EnrollFlag {
            long: "clevis",
            value_name: "SPEC",
            help: "Seal with a clevis pin: tang:URL=THUMBPRINT, tpm2, or tpm2:BANK:PCRS \
                   (for clevis's own token format use --tang / --tpm2 / --sss)",
        }
    }
    fn for_enroll(
        &self,
        value: &str,
        configured: &(dyn Any + Send + Sync),
    ) -> Result<Box<dyn SealProvider>, SealError> {
        let spec = parse_spec(value).map_err(|detail| SealError::NotConfigured {
            provider: NAME,
            detail,
        })?;
        let mut settings = settings_of(configured);
        if settings.tpm2.tcti.is_none() {
            settings.tpm2.tcti = Some(DEFAULT_TCTI.into());
        }
        Ok(Box::new(ClevisSealer {
            settings,
            spec: Some(spec),
        }))
    }
    fn daemon_config_lines(&self, key: &str, configured: &(dyn Any + Send + Sync)) -> Vec<String> {
        let _ = key;
        let s = settings_of(configured);
        let mut out = Vec::new();
        if let Some(t) = s.tpm2.tcti {
            out.push(format!("tpm2-tcti = {:?}", t));
        }
        out
    }
}

/// Seals / unseals a keyslot secret with clevis pins.
pub struct ClevisSealer {
    settings: ClevisSettings,
    /// What to seal to (enrolment); `None` when only unsealing.
    spec: Option<PinSpec>,
}

impl SealProvider for ClevisSealer {
    fn token_type(&self) -> &'static str {
        TOKEN_TYPE
    }
    fn key_reference(&self) -> String {
        self.spec
            .as_ref()
            .map(describe_spec)
            .unwrap_or_else(|| "clevis".into())
    }
    fn seal(&self, secret: &SecretBytes, binding: &Binding) -> Result<Sealed, SealError> {
        let Some(spec) = &self.spec else {
            return Err(SealError::NotConfigured {
                provider: NAME,
                detail: "no clevis pin given to seal to".into(),
            });
        };
        // The binding rides inside the AEAD plaintext: a token moved to another volume or
        // keyslot decrypts, and is refused as WrongBinding.
        let aad = binding.aad();
        let mut plain = SecretBytes::zeroed(aad.len() + secret.len());
        plain.expose_secret_mut()[..aad.len()].copy_from_slice(&aad);
        plain.expose_secret_mut()[aad.len()..].copy_from_slice(secret.expose_secret());
        let jwe = super::encrypt(spec, plain.expose_secret(), &self.settings)?;
        let mut params = Map::new();
        params.insert(POLICY_PARAM.into(), super::summary(&jwe).into());
        Ok(Sealed {
            ciphertext: jwe.to_compact().into_bytes(),
            params,
        })
    }
    fn unseal(&self, sealed: &Sealed, binding: &Binding) -> Result<SecretBytes, SealError> {
        let text = std::str::from_utf8(&sealed.ciphertext)
            .map_err(|_| super::bad("the sealed JWE is not text".into()))?;
        let jwe = Jwe::from_compact(text)?;
        let plain = super::decrypt_jwe(&jwe, &self.settings, 0)?;
        let aad = binding.aad();
        let p = plain.expose_secret();
        if p.len() <= aad.len() || p[..aad.len()] != aad[..] {
            return Err(SealError::WrongBinding);
        }
        Ok(SecretBytes::from_slice(&p[aad.len()..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert!(matches!(
            parse_spec("tpm2"),
            Ok(PinSpec::Tpm2 { pcr: None })
        ));
        assert!(matches!(
            parse_spec("tpm2:sha256:0,7"),
            Ok(PinSpec::Tpm2 { pcr: Some(_) })
        ));
        assert!(matches!(
            parse_spec("tang:http://127.0.0.1:1=yf78M8MmkSCnVRnc0wpmxaJ7g2jGJXR1ue9UAhLMQCk"),
            Ok(PinSpec::Tang { .. })
        ));
        assert!(parse_spec("tang:http://x").is_err());
        assert!(parse_spec("null").is_err());
    }

    #[test]
    fn empty_settings_configure_and_unseal_nothing() {
        let c = ClevisPins.configure(&RawSettings::default()).unwrap();
        assert!(ClevisPins.for_token(&Map::new(), &*c).is_err());
        let mut raw = RawSettings::default();
        raw.set("tpm2-tcti", vec!["swtpm:host=127.0.0.1,port=1".into()]);
        let c = ClevisPins.configure(&raw).unwrap();
        let p = ClevisPins.for_token(&Map::new(), &*c).unwrap();
        let binding = Binding {
            volume_uuid: "u".into(),
            keyslot: 1,
        };
        let sealed = Sealed {
            ciphertext: b"not a jwe".to_vec(),
            params: Map::new(),
        };
        assert!(p.unseal(&sealed, &binding).is_err());
    }
}
