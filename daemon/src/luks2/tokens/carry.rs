//! Carrying the keyslots of the old volume key over to a new one, for a re-encryption: the one
//! place both the daemon's online path (`unlock::reencrypt`, `nbdcryptctl reencrypt --control`)
//! and nbdcryptctl's offline path (`nbdcryptctl reencrypt VOLUME`) decide how each old keyslot
//! gets a keyslot of the new key.
//!
//! - a passphrase / key file keyslot: the same secret opens the new keyslot;
//! - our KMS/HSM token: a fresh secret, sealed under the same KMS/HSM key for the new keyslot
//!   (re-sealed, never erased);
//! - a clevis token (Tang, TPM2, sss): decrypted through the operator's clevis settings; its
//!   passphrase opens the new keyslot and the token is bound to it too;
//! - a quorum (`nbdcrypt-quorum`): every holder opens its old share (machines through the
//!   operator's provider settings, people with their own passphrase), the threshold is proven
//!   against the keyslot, and a fresh secret is split with the same threshold among the same
//!   holders at the same indices (people's shares re-wrapped under a fresh salt).
//!
//! What a person's passphrase comes from is the caller's: the daemon's staged shares
//! (`reencrypt --control SOCK --share NAME`), or nbdcryptctl's terminal prompt / share files.
//! Every provider is built from the operator's settings, never from the header alone: the header
//! is attacker-writable.

use crate::crypto::kdf::{KdfLimits, KdfParams};
use crate::crypto::keys::{SecretBytes, VolumeKey};
use crate::luks2::reencrypt::{NewSlot, TokenBuilder};
use crate::luks2::tokens::quorum::{self, Holder, NewHolder, QuorumToken};
use crate::luks2::tokens::{clevis, enroll, format, resolver};
use crate::luks2::{FormatError, HeaderIo, KeyslotInfo, Luks2Header, Token};
use crate::seal::shamir::{self, Share};
use crate::seal::{Binding, SealProvider, SealSettings};

/// Where people's passphrases for their quorum shares come from.
pub trait SharePassphrases {
    /// The passphrase of the holder of passphrase share `name` of the quorum on `keyslot`:
    /// `Ok(None)` when none can be had (not staged, nobody to ask); `Err` says why asking
    /// failed (an unreadable file...).
    fn passphrase(&mut self, name: &str, keyslot: u32) -> Result<Option<SecretBytes>, String>;
    /// What to do when the passphrases of `names` are missing (one sentence, for the error).
    fn missing(&self, names: &[String]) -> String;
}

/// The operator's side of a carry: provider settings, KDF limits, people's passphrases.
pub struct Carrier<'a> {
    /// The operator's provider settings (KMS endpoint/allowed keys, PKCS#11 module/PIN, Tang
    /// servers, TPM): the only way a provider is reached.
    pub settings: &'a SealSettings,
    /// Limits for the KDFs of passphrase keyslots and people's shares.
    pub limits: &'a KdfLimits,
    pub people: &'a mut dyn SharePassphrases,
}

/// One old keyslot and how (or why not) it is carried over to the new key.
pub enum Carry {
    /// The new keyslot, and how (for the audit log).
    Slot(NewSlot, String),
    Cannot(String),
}

/// Every keyslot of the old volume key, carried or named.
pub struct Plan {
    /// The new keyslots, for `Reencryption::start`.
    pub slots: Vec<NewSlot>,
    /// The old volume key, if some keyslot opened.
    pub old_key: Option<VolumeKey>,
    /// (old keyslot, how it was carried), for the audit log.
    pub carried: Vec<(u32, String)>,
    /// (old keyslot, why it cannot be carried).
    pub cannot: Vec<(u32, String)>,
}

/// A holder of a share of a quorum being carried over, proven by opening its old share.
enum Held {
    Provider(Box<dyn SealProvider>),
    Person {
        name: String,
        passphrase: SecretBytes,
        kdf: KdfParams,
    },
}

impl Carrier<'_> {
    /// Plans the carry of every keyslot of the data key: by one of `secrets`, by re-sealing
    /// our token, by a clevis token, by re-splitting a quorum. Keyslots none of these opens are
    /// named in [`Plan::cannot`]; nothing is dropped silently. Tokens are unsealed to find the
    /// old key only while no key is known yet.
    pub fn plan(
        &mut self,
        file: &dyn HeaderIo,
        hdr: &Luks2Header,
        secrets: &[SecretBytes],
    ) -> Result<Plan, String> {
        let mut plan = Plan {
            slots: Vec::new(),
            old_key: None,
            carried: Vec::new(),
            cannot: Vec::new(),
        };
        for ks in hdr.keyslots().into_iter().filter(|k| k.for_data) {
            let (c, key) = self.carry(file, hdr, &ks, secrets, plan.old_key.is_none())?;
            if plan.old_key.is_none() {
                plan.old_key = key;
            }
            match c {
                Carry::Slot(s, how) => {
                    plan.carried.push((ks.id, how));
                    plan.slots.push(s);
                }
                Carry::Cannot(why) => plan.cannot.push((ks.id, why)),
            }
        }
        Ok(plan)
    }

    /// How keyslot `ks` of the old key is carried over: by one of `secrets`, by re-sealing our
    /// token bound to it (fresh secret, same KMS/HSM key), by the passphrase its clevis token
    /// decrypts to (the clevis token is then bound to the new keyslot too), or by re-splitting
    /// its quorum. Also returns the old volume key when this keyslot was opened (our tokens are
    /// only unsealed for that when `need_key`).
    pub fn carry(
        &mut self,
        file: &dyn HeaderIo,
        hdr: &Luks2Header,
        ks: &KeyslotInfo,
        secrets: &[SecretBytes],
        need_key: bool,
    ) -> Result<(Carry, Option<VolumeKey>), String> {
        let Some(kdf) = ks.kdf else {
            return Ok((Carry::Cannot("unusable KDF".into()), None));
        };
        for s in secrets {
            match hdr.unlock_slot(file, ks.id, s, self.limits) {
                Ok(key) => {
                    let slot = NewSlot {
                        old_slot: ks.id,
                        secret: SecretBytes::from_slice(s.expose_secret()),
                        kdf,
                        token: None,
                    };
                    return Ok((Carry::Slot(slot, "same secret".into()), Some(key)));
                }
                Err(FormatError::WrongPassphrase | FormatError::KeyslotUnusable { .. }) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        let bound: Vec<(u32, &Token)> = hdr
            .tokens()
            .filter(|(_, t)| t.keyslots().contains(&ks.id))
            .collect();
        let mut why = Vec::new();
        for &(tid, t) in &bound {
            if t.type_name() == quorum::TOKEN_TYPE {
                match quorum::parse(t) {
                    Ok(Some(q)) if q.keyslot == ks.id => match self.carry_quorum(file, hdr, &q) {
                        Ok((slot, key)) => {
                            let names: Vec<String> =
                                q.shares.iter().map(|s| printable(&s.name())).collect();
                            let how = format!(
                                "quorum re-split: {} of {}, token {tid} (same holders at the \
                                 same indices: {})",
                                q.threshold,
                                q.shares.len(),
                                names.join(", ")
                            );
                            return Ok((Carry::Slot(slot, how), Some(key)));
                        }
                        Err(e) => why.push(format!("quorum token {tid}: {e}")),
                    },
                    Ok(_) => why.push(format!("quorum token {tid} names another keyslot")),
                    Err(e) => why.push(format!("quorum token {tid}: {e}")),
                }
                continue;
            }
            match format::parse(t) {
                Ok(Some(p)) if p.keyslot == ks.id => {
                    let provider = match resolver(t.json(), self.settings) {
                        Ok(p) => p,
                        Err(e) => {
                            why.push(format!(
                                "token {tid}: cannot reach its KMS/HSM key to re-seal it: {e}"
                            ));
                            continue;
                        }
                    };
                    let mut key = None;
                    if need_key {
                        let binding = Binding {
                            volume_uuid: hdr.uuid().to_owned(),
                            keyslot: ks.id,
                        };
                        let opened = provider
                            .unseal(&p.sealed, &binding)
                            .map_err(|e| e.to_string())
                            .and_then(|s| {
                                hdr.unlock_slot(
                                    file,
                                    ks.id,
                                    &enroll::passphrase_for(&s),
                                    &KdfLimits::default(),
                                )
                                .map_err(|e| e.to_string())
                            });
                        match opened {
                            Ok(k) => key = Some(k),
                            Err(e) => {
                                why.push(format!("token {tid}: {e}"));
                                continue;
                            }
                        }
                    }
                    let fresh = fresh_secret()?;
                    let pass = enroll::passphrase_for(&fresh);
                    let uuid = hdr.uuid().to_owned();
                    let build: TokenBuilder = Box::new(move |new_slot| {
                        let binding = Binding {
                            volume_uuid: uuid,
                            keyslot: new_slot,
                        };
                        let sealed = provider.seal(&fresh, &binding).map_err(|e| e.to_string())?;
                        format::build(
                            provider.token_type(),
                            new_slot,
                            &sealed,
                            &crate::audit::rfc3339_now(),
                        )
                        .map_err(|e| e.to_string())
                    });
                    let slot = NewSlot {
                        old_slot: ks.id,
                        secret: pass,
                        kdf: enroll::TOKEN_KEYSLOT_KDF,
                        token: Some(build),
                    };
                    let how = format!("re-sealed: token {tid} ({})", printable(t.type_name()));
                    return Ok((Carry::Slot(slot, how), key));
                }
                Ok(_) => {}
                Err(e) => {
                    why.push(format!("token {tid}: {e}"));
                    continue;
                }
            }
            if let Ok(Some(c)) = clevis::parse_token(tid, t.json()) {
                let opened = crate::seal::clevis::decrypt_jwe(&c.jwe, &self.settings.clevis(), 0)
                    .map_err(|e| e.to_string())
                    .and_then(|pass| {
                        hdr.unlock_slot(file, ks.id, &pass, self.limits)
                            .map(|k| (k, pass))
                            .map_err(|e| e.to_string())
                    });
                match opened {
                    Ok((key, pass)) => {
                        let slot = NewSlot {
                            old_slot: ks.id,
                            secret: pass,
                            kdf,
                            token: None,
                        };
                        let how = format!("clevis token {tid} re-bound");
                        return Ok((Carry::Slot(slot, how), Some(key)));
                    }
                    Err(e) => why.push(format!("clevis token {tid}: {e}")),
                }
                continue;
            }
            why.push(format!(
                "token {tid} ({}) cannot be carried over by a re-encryption",
                printable(t.type_name())
            ));
        }
        if why.is_empty() {
            why.push(if secrets.is_empty() {
                "no secret given and no token opens it".into()
            } else {
                "the secret given does not open it".into()
            });
        }
        Ok((Carry::Cannot(why.join("; ")), None))
    }

    /// Carries quorum `q` (bound to an old keyslot) over to the new key: a fresh secret for the
    /// new keyslot, split with the same threshold among the same holders at the same indices.
    ///
    /// Every holder proves itself first: each machine share is unsealed through the provider
    /// the operator's settings build for it (never one the header names on its own), each
    /// person's share is opened with their passphrase ([`SharePassphrases`]), and each share's
    /// tag is checked. Then the token's threshold is proven: the first `threshold` shares must
    /// combine to the secret that opens the keyslot, and every other share must lie on the same
    /// polynomial. A header writer who lowered the threshold, added a holder or re-labelled a
    /// share is refused here instead of being copied into the new quorum. The new shares go
    /// only to holders that just opened their old share; people's shares are re-wrapped under
    /// their own passphrase with a fresh salt (never the old pad).
    pub fn carry_quorum(
        &mut self,
        file: &dyn HeaderIo,
        hdr: &Luks2Header,
        q: &QuorumToken,
    ) -> Result<(NewSlot, VolumeKey), String> {
        let mut opened: Vec<Share> = Vec::with_capacity(q.shares.len());
        let mut holders: Vec<Held> = Vec::with_capacity(q.shares.len());
        let mut people = Vec::new();
        let mut failures = Vec::new();
        for s in &q.shares {
            match &s.holder {
                Holder::Provider {
                    token_type, params, ..
                } => {
                    let provider =
                        match crate::seal::resolve_provider(token_type, params, self.settings) {
                            Ok(p) => p,
                            Err(e) => {
                                failures.push(format!("share {}: {e}", printable(&s.name())));
                                continue;
                            }
                        };
                    match quorum::open_machine_share(hdr, q, s, self.settings) {
                        Ok(share) => {
                            opened.push(share);
                            holders.push(Held::Provider(provider));
                        }
                        Err(e) => failures.push(e.to_string()),
                    }
                }
                Holder::Passphrase { name, kdf, .. } => {
                    let pass = match self.people.passphrase(name, q.keyslot) {
                        Ok(Some(p)) => p,
                        Ok(None) => {
                            people.push(printable(name));
                            continue;
                        }
                        Err(e) => {
                            failures.push(format!("share {}: {e}", printable(name)));
                            continue;
                        }
                    };
                    match quorum::open_passphrase_share(hdr, q, name, &pass, self.limits) {
                        Ok(share) => {
                            opened.push(share);
                            holders.push(Held::Person {
                                name: name.clone(),
                                passphrase: pass,
                                kdf: *kdf,
                            });
                        }
                        Err(e) => failures.push(e.to_string()),
                    }
                }
            }
        }
        if !people.is_empty() {
            failures.push(format!(
                "the passphrase of {} {} is needed to re-wrap {} share: {}",
                if people.len() == 1 { "share" } else { "shares" },
                people.join(", "),
                if people.len() == 1 { "its" } else { "their" },
                self.people.missing(&people),
            ));
        }
        if !failures.is_empty() {
            return Err(format!(
                "every holder must open its share to carry a quorum over ({} of {} did): {}",
                opened.len(),
                q.shares.len(),
                failures.join("; ")
            ));
        }
        let k = q.threshold;
        let secret =
            combine_proven(q, &opened).map_err(|e| format!("{e}; refusing to carry it"))?;
        let key = hdr
            .unlock_slot(
                file,
                q.keyslot,
                &enroll::passphrase_for(&secret),
                &KdfLimits::default(),
            )
            .map_err(|e| match e {
                FormatError::WrongPassphrase => format!(
                    "its first {k} shares do not open keyslot {}: the token's threshold or \
                     shares were changed; refusing to carry it",
                    q.keyslot
                ),
                e => e.to_string(),
            })?;
        drop(secret);
        let fresh = fresh_secret()?;
        let xs: Vec<u8> = opened.iter().map(|s| s.x).collect();
        drop(opened);
        let new_shares =
            shamir::split_at(fresh.expose_secret(), k, &xs).map_err(|e| e.to_string())?;
        let pass = enroll::passphrase_for(&fresh);
        drop(fresh);
        let uuid = hdr.uuid().to_owned();
        let build: TokenBuilder = Box::new(move |new_slot| {
            let new_holders: Vec<NewHolder<'_>> = holders
                .iter()
                .map(|h| match h {
                    Held::Provider(p) => NewHolder::Provider(&**p),
                    Held::Person {
                        name,
                        passphrase,
                        kdf,
                    } => NewHolder::Passphrase {
                        name: name.clone(),
                        passphrase: SecretBytes::from_slice(passphrase.expose_secret()),
                        kdf: *kdf,
                    },
                })
                .collect();
            let stored = quorum::seal_shares_for(&uuid, new_slot, &new_shares, &new_holders)
                .map_err(|e| e.to_string())?;
            quorum::build(&QuorumToken {
                keyslot: new_slot,
                threshold: k,
                created: crate::audit::rfc3339_now(),
                shares: stored,
            })
            .map_err(|e| e.to_string())
        });
        let slot = NewSlot {
            old_slot: q.keyslot,
            secret: pass,
            kdf: enroll::TOKEN_KEYSLOT_KDF,
            token: Some(build),
        };
        Ok((slot, key))
    }
}

/// The secret of quorum `q` from `opened` (tag-checked shares, at least its threshold K): the
/// first K combined, and every other share must give the same secret with the first K - 1,
/// i.e. lie on the same polynomial. Together with the secret opening the quorum's keyslot (the
/// caller's check) this proves the threshold: a header writer who lowered it, added a holder or
/// re-labelled a share is refused. The error says which share does not fit.
pub fn combine_proven(q: &QuorumToken, opened: &[Share]) -> Result<SecretBytes, String> {
    let k = q.threshold;
    if k == 0 || opened.len() < k {
        return Err(format!(
            "{} of {k} needed shares opened ({} holders)",
            opened.len(),
            q.shares.len()
        ));
    }
    let first: Vec<&Share> = opened.iter().take(k).collect();
    let secret = shamir::combine(&first).map_err(|e| e.to_string())?;
    for other in opened.iter().skip(k) {
        let mut set: Vec<&Share> = opened.iter().take(k - 1).collect();
        set.push(other);
        let again = shamir::combine(&set).map_err(|e| e.to_string())?;
        if again.expose_secret() != secret.expose_secret() {
            let name = q
                .shares
                .iter()
                .find(|s| s.x == other.x)
                .map_or_else(|| format!("#{}", other.x), |s| printable(&s.name()));
            return Err(format!(
                "share {name} does not belong to a {k}-of-{} split of the keyslot's secret: the \
                 token's threshold or shares were changed",
                q.shares.len()
            ));
        }
    }
    Ok(secret)
}

/// A fresh random secret for a token keyslot (locked memory, wiped on drop).
fn fresh_secret() -> Result<SecretBytes, String> {
    let mut fresh = SecretBytes::zeroed(crate::seal::SECRET_LEN);
    getrandom::fill(fresh.expose_secret_mut()).map_err(|e| format!("no random bytes: {e}"))?;
    Ok(fresh)
}

/// Whether a token of an old keyslot is dropped with the old keyslots at the end of a
/// re-encryption: our KMS/HSM tokens and quorums were re-sealed for new keyslots.
pub fn resealed_token(t: &Token) -> bool {
    format::is_ours(t.type_name()) || t.type_name() == quorum::TOKEN_TYPE
}

/// A header string for a message: printable ASCII only, at most 64 characters.
pub fn printable(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::kdf::{HashAlg, KdfParams};

    /// A 2-of-3 token of people (only the names and indices matter here).
    fn token(threshold: usize) -> QuorumToken {
        let share = |x: u8, name: &str| quorum::StoredShare {
            x,
            holder: Holder::Passphrase {
                name: name.into(),
                kdf: KdfParams::Pbkdf2 {
                    hash: HashAlg::Sha256,
                    iterations: 1000,
                },
                salt: vec![0; 32],
            },
            tag: [0; 32],
            sealed: Vec::new(),
        };
        QuorumToken {
            keyslot: 1,
            threshold,
            created: String::new(),
            shares: vec![share(1, "alice"), share(2, "bob"), share(3, "carol")],
        }
    }

    #[test]
    fn combine_proven_takes_shares_of_one_polynomial_and_names_one_that_is_not() {
        let secret = [7u8; 32];
        let shares = shamir::split_at(&secret, 2, &[1, 2, 3]).unwrap();
        let q = token(2);
        // Exactly K, and all three: the secret.
        let got = combine_proven(&q, &shares[..2]).unwrap();
        assert_eq!(got.expose_secret(), &secret);
        let got = combine_proven(&q, &shares).unwrap();
        assert_eq!(got.expose_secret(), &secret);
        // Fewer than K: refused, counted.
        let e = combine_proven(&q, &shares[..1]).err().unwrap();
        assert!(e.contains("1 of 2 needed shares"), "{e}");
        // A header that says 1 of 3: the second share is not on a degree-0 polynomial.
        let e = combine_proven(&token(1), &shares[..2]).err().unwrap();
        assert!(
            e.contains("share bob does not belong to a 1-of-3 split")
                && e.contains("threshold or shares were changed"),
            "{e}"
        );
        // carol's share from another split (a replaced share): named.
        let other = shamir::split_at(&[9u8; 32], 2, &[1, 2, 3]).unwrap();
        let mixed: Vec<Share> = shares
            .iter()
            .take(2)
            .chain(other.iter().skip(2))
            .map(|s| Share {
                x: s.x,
                y: SecretBytes::from_slice(s.y.expose_secret()),
            })
            .collect();
        let e = combine_proven(&q, &mixed).err().unwrap();
        assert!(e.contains("share carol does not belong"), "{e}");
    }
}
