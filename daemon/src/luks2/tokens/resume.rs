//! Opening the old and the new volume key of an interrupted re-encryption through the tokens:
//! the one place the daemon (an unlock of a volume found mid-way, `--auto-unlock`, `unlock
//! --share`) and nbdcryptctl (`reencrypt VOLUME` / `--resume-only`, offline) find the keys
//! without a passphrase.
//!
//! For every keyslot of a key still missing (old or new, decided by the keyslot's digest, never
//! by a token), [`KeyFinder::secrets_for`] gives the secrets its tokens unseal:
//!
//! - our KMS/HSM tokens, through the provider the operator's settings build (allowed KMS keys,
//!   PKCS#11 module and PIN: [`crate::luks2::tokens::resolver`]), never one the header names on
//!   its own;
//! - clevis tokens (Tang, TPM2, sss), through the operator's clevis settings (`--tang-allow`,
//!   `--tpm2-tcti`);
//! - quorums: every machine share the operator's settings reach, then, while fewer than the
//!   threshold are open, people's shares with their passphrases ([`SharePassphrases`]: the
//!   terminal or share files offline, staged passphrases online). Every share's tag is checked,
//!   and every share opened beyond the threshold must lie on the same polynomial as the first
//!   ones ([`carry::combine_proven`], as a carry proves it).
//!
//! `luks2::reencrypt::Reencryption::open_by` then opens each keyslot with these secrets, checks
//! the key against the keyslot's digest, the old key against the old segment's digest, the new
//! key against the new segment's, and the re-encryption digest, before anything is written.

use std::collections::BTreeMap;

use crate::crypto::kdf::KdfLimits;
use crate::crypto::keys::SecretBytes;
use crate::luks2::reencrypt::Reencryption;
use crate::luks2::tokens::carry::{self, printable, SharePassphrases};
use crate::luks2::tokens::quorum::{self, Holder, QuorumToken};
use crate::luks2::tokens::{clevis, enroll, format, resolver};
use crate::luks2::{FormatError, HeaderIo, Luks2Header};
use crate::seal::pin::VolumePin;
use crate::seal::shamir::Share;
use crate::seal::{Binding, SealSettings};

/// Finds the secrets of the keyslots of an interrupted re-encryption through their tokens.
/// Remembers what each keyslot's tokens gave (a second attempt asks no provider again) and why
/// tokens failed (for the error message).
pub struct KeyFinder<'a> {
    settings: &'a SealSettings,
    limits: &'a KdfLimits,
    people: &'a mut dyn SharePassphrases,
    /// No provider is asked about a header whose UUID is not the pinned one.
    pin: Option<&'a VolumePin>,
    found: BTreeMap<u32, Vec<SecretBytes>>,
    failures: Vec<String>,
    transient: bool,
}

impl<'a> KeyFinder<'a> {
    pub fn new(
        settings: &'a SealSettings,
        limits: &'a KdfLimits,
        people: &'a mut dyn SharePassphrases,
        pin: Option<&'a VolumePin>,
    ) -> KeyFinder<'a> {
        KeyFinder {
            settings,
            limits,
            people,
            pin,
            found: BTreeMap::new(),
            failures: Vec::new(),
            transient: false,
        }
    }

    /// Why tokens did not give a secret, one entry per token (for the error message).
    pub fn failures(&self) -> &[String] {
        &self.failures
    }

    /// The keyslots whose tokens gave a secret (whether or not it opened the keyslot's key).
    pub fn unsealed(&self) -> Vec<u32> {
        self.found
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, _)| *k)
            .collect()
    }

    /// Whether a provider was unreachable (worth retrying later).
    pub fn transient(&self) -> bool {
        self.transient
    }

    /// Resumes the re-encryption of `file`: each keyslot of a key still missing is tried with
    /// `given` (passphrases, key files), then with what its tokens unseal, until both keys are
    /// found and verified (see the module documentation). Nothing is written.
    pub fn open(
        &mut self,
        file: &dyn HeaderIo,
        given: &[SecretBytes],
    ) -> Result<Reencryption, FormatError> {
        let limits = self.limits;
        Reencryption::open_by(file, limits, &mut |hdr, slot| {
            let mut out: Vec<SecretBytes> = given
                .iter()
                .map(|s| SecretBytes::from_slice(s.expose_secret()))
                .collect();
            out.extend(self.secrets_for(hdr, slot));
            out
        })
    }

    /// The secrets the tokens bound to keyslot `slot` unseal (see the module documentation).
    pub fn secrets_for(&mut self, hdr: &Luks2Header, slot: u32) -> Vec<SecretBytes> {
        if let Some(pin) = self.pin {
            if let Err(e) = pin.check_uuid(hdr.uuid()) {
                // Never ask a provider about a volume that is not the pinned one.
                let msg = e.to_string();
                if !self.failures.contains(&msg) {
                    self.failures.push(msg);
                }
                return Vec::new();
            }
        }
        if let Some(known) = self.found.get(&slot) {
            return known
                .iter()
                .map(|s| SecretBytes::from_slice(s.expose_secret()))
                .collect();
        }
        let out = self.unseal(hdr, slot);
        self.found.insert(
            slot,
            out.iter()
                .map(|s| SecretBytes::from_slice(s.expose_secret()))
                .collect(),
        );
        out
    }

    fn unseal(&mut self, hdr: &Luks2Header, slot: u32) -> Vec<SecretBytes> {
        let mut out = Vec::new();
        for (tid, t) in hdr.tokens() {
            if !t.keyslots().contains(&slot) {
                continue;
            }
            if t.type_name() == quorum::TOKEN_TYPE {
                match quorum::parse(t) {
                    Ok(Some(q)) if q.keyslot == slot => match self.quorum_secret(hdr, &q) {
                        Ok(secret) => out.push(enroll::passphrase_for(&secret)),
                        Err(e) => self
                            .failures
                            .push(format!("quorum token {tid} (keyslot {slot}): {e}")),
                    },
                    Ok(_) => {}
                    Err(e) => self
                        .failures
                        .push(format!("quorum token {tid} (keyslot {slot}): {e}")),
                }
                continue;
            }
            let fail = |e: crate::seal::SealError, me: &mut Self| {
                me.transient |= e.is_transient();
                me.failures
                    .push(format!("token {tid} (keyslot {slot}): {e}"));
            };
            match format::parse(t) {
                Ok(Some(p)) if p.keyslot == slot => {
                    let binding = Binding {
                        volume_uuid: hdr.uuid().to_owned(),
                        keyslot: p.keyslot,
                    };
                    match resolver(t.json(), self.settings)
                        .and_then(|pr| pr.unseal(&p.sealed, &binding))
                    {
                        Ok(secret) => out.push(enroll::passphrase_for(&secret)),
                        Err(e) => fail(e, self),
                    }
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    fail(e, self);
                    continue;
                }
            }
            match clevis::parse_token(tid, t.json()) {
                Ok(Some(c)) => {
                    match crate::seal::clevis::decrypt_jwe(&c.jwe, &self.settings.clevis(), 0) {
                        Ok(pass) => out.push(pass),
                        Err(e) => fail(e, self),
                    }
                }
                Ok(None) => {}
                Err(e) => fail(e, self),
            }
        }
        out
    }

    /// The secret of quorum `q`: every machine share the operator's settings reach, then
    /// people's shares (asked only while fewer than the threshold are open), each tag-checked;
    /// the shares beyond the threshold must lie on the same polynomial.
    fn quorum_secret(&mut self, hdr: &Luks2Header, q: &QuorumToken) -> Result<SecretBytes, String> {
        let mut opened: Vec<Share> = Vec::new();
        let mut why = Vec::new();
        for s in &q.shares {
            if !matches!(s.holder, Holder::Provider { .. }) {
                continue;
            }
            match quorum::open_machine_share(hdr, q, s, self.settings) {
                Ok(share) => opened.push(share),
                Err(e) => {
                    if let quorum::QuorumError::Provider { source, .. } = &e {
                        self.transient |= source.is_transient();
                    }
                    why.push(e.to_string());
                }
            }
        }
        let mut missing = Vec::new();
        for s in &q.shares {
            if opened.len() >= q.threshold {
                break;
            }
            let Holder::Passphrase { name, .. } = &s.holder else {
                continue;
            };
            match self.people.passphrase(name, q.keyslot) {
                Ok(Some(pass)) => {
                    match quorum::open_passphrase_share(hdr, q, name, &pass, self.limits) {
                        Ok(share) => opened.push(share),
                        Err(e) => why.push(e.to_string()),
                    }
                }
                Ok(None) => missing.push(printable(name)),
                Err(e) => why.push(format!("share {}: {e}", printable(name))),
            }
        }
        if opened.len() < q.threshold {
            if !missing.is_empty() {
                why.push(format!(
                    "the passphrase of {} {} is needed: {}",
                    if missing.len() == 1 {
                        "share"
                    } else {
                        "shares"
                    },
                    missing.join(", "),
                    self.people.missing(&missing)
                ));
            }
            why.insert(
                0,
                format!(
                    "{} of {} needed shares opened ({} holders)",
                    opened.len(),
                    q.threshold,
                    q.shares.len()
                ),
            );
            return Err(why.join("; "));
        }
        carry::combine_proven(q, &opened)
    }
}
