//! Volume pinning: the operator's configuration names the volume the daemon may unlock, so a
//! header swapped by whoever can write the disk is refused instead of unlocked.
//!
//! A pin has two parts, both public facts taken from the header when it was trusted
//! (`nbdcryptctl pin VOLUME`, or printed by `nbdcryptctl enroll`):
//!
//! - `volume-uuid`: the LUKS2 UUID. Checked at start and at every unlock (the header is re-read
//!   each time). An attacker can copy a UUID, so this catches mistakes more than attacks.
//! - `volume-key-digest`: the LUKS2 digest of the volume key, `pbkdf2:HASH:ITERATIONS:SALT:DIGEST`
//!   (salt and digest in standard base64), exactly as the header's digest entry stores them.
//!   It identifies the key without revealing it. Every unlock (passphrase, key file, token,
//!   auto-unlock) recomputes PBKDF2 over the recovered volume key with the pinned salt and
//!   iterations — never the header's — and refuses a key that does not match: a header made by
//!   someone else holds another volume key, whatever UUID and digest it claims.

use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

use crate::crypto::kdf::{pbkdf2_into, HashAlg};
use crate::crypto::keys::{SecretBytes, VolumeKey};
use crate::luks2::Luks2Header;

/// Config key of the UUID pin (TOML; the flag is `--volume-uuid`).
pub const KEY_UUID: &str = "volume-uuid";
/// Config key of the digest pin (TOML; the flag is `--volume-key-digest`).
pub const KEY_DIGEST: &str = "volume-key-digest";

/// Most PBKDF2 iterations a pinned digest may ask for (cryptsetup uses far fewer).
pub const MAX_PIN_ITERATIONS: u32 = 10_000_000;

/// The LUKS2 digest of a volume key: PBKDF2(hash, key, salt, iterations) = digest.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyDigest {
    pub hash: HashAlg,
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub digest: Vec<u8>,
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyDigest({self})")
    }
}

impl fmt::Display for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pbkdf2:{}:{}:{}:{}",
            self.hash.name(),
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(&self.digest)
        )
    }
}

impl KeyDigest {
    /// Parses `pbkdf2:HASH:ITERATIONS:SALT_BASE64:DIGEST_BASE64`.
    pub fn parse(s: &str) -> Result<KeyDigest, String> {
        let want = "expected pbkdf2:HASH:ITERATIONS:SALT:DIGEST as printed by `nbdcryptctl pin`";
        let parts: Vec<&str> = s.trim().split(':').collect();
        let [kind, hash, iterations, salt, digest] = parts.as_slice() else {
            return Err(format!("{KEY_DIGEST}: {want}"));
        };
        if *kind != "pbkdf2" {
            return Err(format!(
                "{KEY_DIGEST}: digest type {kind:?} is not supported; {want}"
            ));
        }
        let hash = HashAlg::from_name(hash)
            .ok_or_else(|| format!("{KEY_DIGEST}: hash {hash:?} is not sha1, sha256 or sha512"))?;
        let iterations: u32 = iterations
            .parse()
            .ok()
            .filter(|n| (1..=MAX_PIN_ITERATIONS).contains(n))
            .ok_or_else(|| {
                format!(
                    "{KEY_DIGEST}: iterations {iterations:?} is not a number from 1 to \
                     {MAX_PIN_ITERATIONS}"
                )
            })?;
        let salt = B64
            .decode(salt)
            .map_err(|e| format!("{KEY_DIGEST}: the salt is not standard base64: {e}"))?;
        let digest = B64
            .decode(digest)
            .map_err(|e| format!("{KEY_DIGEST}: the digest is not standard base64: {e}"))?;
        if salt.is_empty() || salt.len() > 64 {
            return Err(format!(
                "{KEY_DIGEST}: a salt of {} bytes makes no sense",
                salt.len()
            ));
        }
        if !(16..=hash.output_len()).contains(&digest.len()) {
            return Err(format!(
                "{KEY_DIGEST}: a {hash} digest of {} bytes makes no sense",
                digest.len()
            ));
        }
        Ok(KeyDigest {
            hash,
            iterations,
            salt,
            digest,
        })
    }

    /// The header's digest of its volume key.
    pub fn of_header(header: &Luks2Header) -> Option<KeyDigest> {
        header
            .volume_key_digest()
            .map(|(hash, iterations, salt, digest)| KeyDigest {
                hash,
                iterations,
                salt: salt.to_vec(),
                digest: digest.to_vec(),
            })
    }

    /// True if `key` is the key this digest was made of (constant-time comparison).
    pub fn matches(&self, key: &VolumeKey) -> bool {
        let mut out = SecretBytes::zeroed(self.digest.len());
        if pbkdf2_into(
            self.hash,
            key.expose_secret(),
            &self.salt,
            self.iterations,
            out.expose_secret_mut(),
        )
        .is_err()
        {
            return false;
        }
        let diff = out
            .expose_secret()
            .iter()
            .zip(&self.digest)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        diff == 0
    }
}

/// Which volume the daemon may unlock. Empty (the default): any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumePin {
    pub uuid: Option<String>,
    pub key_digest: Option<KeyDigest>,
}

/// A pin did not hold. The message names the pinned and the found value and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    #[error(
        "refused: the volume's LUKS2 UUID is {found} but the configuration pins {KEY_UUID} = \
         {pinned:?}; this is not the pinned volume (wrong path, or a header replaced by someone \
         who could write the disk). If the change is yours, re-pin with `nbdcryptctl pin`"
    )]
    Uuid { pinned: String, found: String },
    #[error(
        "refused: the volume key recovered does not match the pinned {KEY_DIGEST} ({pinned}); \
         the header holds another volume key than the pinned volume (replaced by someone who \
         could write the disk?). The volume stays locked; compare `nbdcryptctl pin` output with \
         the configuration"
    )]
    KeyDigest { pinned: String },
}

impl VolumePin {
    pub fn is_empty(&self) -> bool {
        self.uuid.is_none() && self.key_digest.is_none()
    }

    /// From the config values (`volume-uuid`, `volume-key-digest`).
    pub fn parse(uuid: Option<&str>, key_digest: Option<&str>) -> Result<VolumePin, String> {
        let uuid = match uuid.map(str::trim) {
            None => None,
            Some(u) if is_uuid(u) => Some(u.to_ascii_lowercase()),
            Some(u) => return Err(format!("{KEY_UUID}: {u:?} is not a UUID")),
        };
        let key_digest = key_digest.map(KeyDigest::parse).transpose()?;
        Ok(VolumePin { uuid, key_digest })
    }

    /// The pin of a header as it is now (what `nbdcryptctl pin` prints).
    pub fn of_header(header: &Luks2Header) -> VolumePin {
        VolumePin {
            uuid: Some(header.uuid().to_ascii_lowercase()),
            key_digest: KeyDigest::of_header(header),
        }
    }

    /// The header names the pinned volume (UUID; the digest is checked on the key itself).
    pub fn check_uuid(&self, found: &str) -> Result<(), PinError> {
        match &self.uuid {
            Some(p) if !p.eq_ignore_ascii_case(found.trim()) => Err(PinError::Uuid {
                pinned: p.clone(),
                found: found.to_owned(),
            }),
            _ => Ok(()),
        }
    }

    /// The recovered volume key is the pinned one.
    pub fn check_key(&self, key: &VolumeKey) -> Result<(), PinError> {
        match &self.key_digest {
            Some(d) if !d.matches(key) => Err(PinError::KeyDigest {
                pinned: d.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// Both checks, for an unlock: `header` is the one the key came from.
    pub fn check(&self, header: &Luks2Header, key: &VolumeKey) -> Result<(), PinError> {
        self.check_uuid(header.uuid())?;
        self.check_key(key)
    }

    /// TOML lines for the daemon's `--config` file.
    pub fn toml_lines(&self) -> String {
        let mut s = String::new();
        if let Some(u) = &self.uuid {
            s.push_str(&format!("{KEY_UUID} = \"{u}\"\n"));
        }
        if let Some(d) = &self.key_digest {
            s.push_str(&format!("{KEY_DIGEST} = \"{d}\"\n"));
        }
        s
    }
}

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// True for a config line that sets one of the pin keys.
pub fn is_pin_line(line: &str) -> bool {
    let key = line.split('=').next().unwrap_or("").trim();
    key == KEY_UUID || key == KEY_DIGEST
}

/// Replaces the pin lines of the config file `file` with `lines` (the other lines kept as they
/// are), through a temporary file in the same directory, synced and renamed into place with the
/// file's mode: a crash leaves the old file or the new one, never half of each.
pub fn rewrite_config_pin(file: &std::path::Path, lines: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let old = std::fs::read_to_string(file)?;
    let mode = std::fs::metadata(file)?.permissions().mode() & 0o7777;
    let mut text = String::new();
    for l in old.lines().filter(|l| !is_pin_line(l)) {
        text.push_str(l);
        text.push('\n');
    }
    text.push_str(lines);
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(std::path::Path::new("."));
    let name = file.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.nbdcrypt-pin.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, file)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The daemon's pin, which moves to the new volume key when a re-encryption finishes: in
/// memory (later unlocks of this process) and in the `--config` file it was read from (later
/// starts). Otherwise the pin would go on naming the rotated-out key: the current header would
/// be refused and a header rolled back to before the rotation accepted.
#[derive(Default)]
pub struct PinKeeper {
    pin: std::sync::RwLock<VolumePin>,
    /// The config file that holds the pin's `volume-key-digest` line, if it came from one.
    file: Option<std::path::PathBuf>,
    /// Which volume key is being served (pinned or not): SHA-256 of a per-process random salt
    /// and the key, so a later command that re-reads the header (an online re-encryption start)
    /// can tell the header on disk still holds that key and was not swapped after the unlock.
    served: std::sync::Mutex<Option<[u8; 32]>>,
    salt: std::sync::OnceLock<[u8; 32]>,
}

impl fmt::Debug for PinKeeper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinKeeper")
            .field("pin", &self.get())
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

/// Where [`PinKeeper::rotate`] left the pin.
#[derive(Debug, PartialEq, Eq)]
pub enum Rotated {
    /// No key digest is pinned (only the UUID, or nothing): nothing to move.
    NotPinned,
    /// Moved in memory only (the pin came from the command line).
    InMemory,
    /// Moved in memory and in this config file.
    InFile(std::path::PathBuf),
}

impl PinKeeper {
    pub fn new(pin: VolumePin, file: Option<std::path::PathBuf>) -> PinKeeper {
        PinKeeper {
            pin: std::sync::RwLock::new(pin),
            file,
            ..PinKeeper::default()
        }
    }

    fn fingerprint(&self, key: &VolumeKey) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let salt = self.salt.get_or_init(|| {
            let mut s = [0u8; 32];
            // Without randomness the salt stays zero: still a fingerprint, just not salted.
            let _ = getrandom::fill(&mut s);
            s
        });
        let mut h = Sha256::new();
        h.update(salt);
        h.update(key.expose_secret());
        h.finalize().into()
    }

    /// The key now served (`None`: none, or two during a re-encryption).
    pub fn set_served(&self, key: Option<&VolumeKey>) {
        let fp = key.map(|k| self.fingerprint(k));
        *self.served.lock().unwrap_or_else(|e| e.into_inner()) = fp;
    }

    /// Whether `key` is the key being served; `None` if no single key is recorded.
    pub fn is_served(&self, key: &VolumeKey) -> Option<bool> {
        let served = *self.served.lock().unwrap_or_else(|e| e.into_inner());
        let fp = self.fingerprint(key);
        served.map(|s| s.iter().zip(&fp).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0)
    }

    /// The pin as it is now.
    pub fn get(&self) -> VolumePin {
        self.pin.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A re-encryption from the pinned key to `new_key` finished and `header` is the header it
    /// committed: pin `new_key` (its digest in `header`, checked against the key itself). The
    /// in-memory pin moves even if the file cannot be written (the error says what to run).
    pub fn rotate(&self, header: &Luks2Header, new_key: &VolumeKey) -> Result<Rotated, String> {
        self.set_served(Some(new_key));
        let mut pin = self.pin.write().unwrap_or_else(|e| e.into_inner());
        if pin.key_digest.is_none() {
            return Ok(Rotated::NotPinned);
        }
        let digest = KeyDigest::of_header(header)
            .filter(|d| d.matches(new_key))
            .ok_or("the finished header's volume-key digest does not match the new key")?;
        pin.key_digest = Some(digest);
        let Some(file) = &self.file else {
            return Ok(Rotated::InMemory);
        };
        rewrite_config_pin(file, &pin.toml_lines()).map_err(|e| {
            format!(
                "the pin in {} still names the old key ({e}); run `nbdcryptctl pin VOLUME \
                 --key-file KEY --write {}` before the next start",
                file.display(),
                file.display()
            )
        })?;
        Ok(Rotated::InFile(file.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(key: &[u8]) -> KeyDigest {
        let salt = vec![9u8; 32];
        let mut digest = vec![0u8; 32];
        pbkdf2_into(HashAlg::Sha256, key, &salt, 1000, &mut digest).unwrap();
        KeyDigest {
            hash: HashAlg::Sha256,
            iterations: 1000,
            salt,
            digest,
        }
    }

    #[test]
    fn a_digest_round_trips_and_matches_only_its_key() {
        let d = digest_of(&[7u8; 64]);
        let text = d.to_string();
        assert!(text.starts_with("pbkdf2:sha256:1000:"), "{text}");
        assert_eq!(KeyDigest::parse(&text).unwrap(), d);
        let pin = VolumePin {
            uuid: None,
            key_digest: Some(d),
        };
        assert!(pin.check_key(&VolumeKey::from_slice(&[7u8; 64])).is_ok());
        let e = pin
            .check_key(&VolumeKey::from_slice(&[8u8; 64]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not match the pinned volume-key-digest") && e.contains(&text),
            "{e}"
        );
    }

    #[test]
    fn bad_pins_are_refused_with_the_key_name() {
        for bad in [
            "pbkdf2:sha256:1000:AAAA",
            "argon2:sha256:1000:AAAA:AAAAAAAAAAAAAAAAAAAAAA==",
            "pbkdf2:md5:1000:AAAA:AAAAAAAAAAAAAAAAAAAAAA==",
            "pbkdf2:sha256:0:AAAA:AAAAAAAAAAAAAAAAAAAAAA==",
            "pbkdf2:sha256:99999999999:AAAA:AAAAAAAAAAAAAAAAAAAAAA==",
            "pbkdf2:sha256:1000:!!:AAAAAAAAAAAAAAAAAAAAAA==",
            "pbkdf2:sha256:1000:AAAA:AAAA",
        ] {
            let e = KeyDigest::parse(bad).unwrap_err();
            assert!(e.starts_with(KEY_DIGEST), "{bad}: {e}");
        }
        assert!(VolumePin::parse(Some("not-a-uuid"), None)
            .unwrap_err()
            .contains(KEY_UUID));
    }

    #[test]
    fn a_uuid_mismatch_names_both_values() {
        let pin = VolumePin::parse(Some("0BADC0DE-0000-4000-8000-000000000001"), None).unwrap();
        assert!(pin
            .check_uuid("0badc0de-0000-4000-8000-000000000001")
            .is_ok());
        let e = pin
            .check_uuid("11111111-2222-4333-8444-555555555555")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("0badc0de-0000-4000-8000-000000000001")
                && e.contains("11111111-2222-4333-8444-555555555555"),
            "{e}"
        );
        assert!(VolumePin::default().check_uuid("anything").is_ok());
    }
}
