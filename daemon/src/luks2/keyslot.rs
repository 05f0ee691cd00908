//! One `luks2` keyslot: derive the area key from a passphrase, decrypt the AF material
//! (aes-xts-plain64, 512-byte units, IV = unit index from the area start), merge it into a
//! candidate key; and the reverse for a new keyslot.
//!
//! Does not decide whether the candidate is right (`digest` does) or which slot to use (the
//! header does). The keyslot cipher uses `aes` + `xts-mode` directly; the data path has its own
//! `crypto::xts`.

use super::io::HeaderIo;

use aes::cipher::KeyInit;
use aes::{Aes128, Aes256};
use xts_mode::{get_tweak_default, Xts128};

use super::error::FormatError;
use super::header::{read_exact_at, write_all_at};
use super::layout::{AF_STRIPES, KDF_SALT_LEN, KEYSLOTS_ALIGN, KEYSLOT_SECTOR};
use super::metadata::{Af, Area, Kdf, KeyslotPriority, Luks2Keyslot, CIPHER};
use crate::crypto::af;
use crate::crypto::kdf::{self, HashAlg, KdfLimits, KdfParams};
use crate::crypto::keys::{SecretBytes, VolumeKey};

/// Bytes of encrypted AF material actually used: `roundup(key_size * 4000, 512)`.
pub(crate) fn material_len(key_size: u32) -> u64 {
    (u64::from(key_size) * u64::from(AF_STRIPES)).div_ceil(KEYSLOT_SECTOR) * KEYSLOT_SECTOR
}

/// Area allocated for a new keyslot: `roundup(key_size * 4000, 4096)` (258048 for 64 bytes).
pub(crate) fn area_size(key_size: u32) -> u64 {
    (u64::from(key_size) * u64::from(AF_STRIPES)).div_ceil(KEYSLOTS_ALIGN) * KEYSLOTS_ALIGN
}

/// Derives the area key, decrypts and merges: returns the candidate key (not yet verified).
pub(crate) fn open(
    file: &dyn HeaderIo,
    device_size: u64,
    slot: u32,
    ks: &Luks2Keyslot,
    passphrase: &SecretBytes,
    limits: &KdfLimits,
) -> Result<SecretBytes, FormatError> {
    let (params, af_hash) = ks
        .usable()
        .map_err(|reason| FormatError::KeyslotUnusable { slot, reason })?;
    limits
        .check_output(&params, ks.area.key_size as usize)
        .map_err(|l| FormatError::KdfLimit {
            slot,
            param: l.param,
            value: l.value,
            cap: l.cap,
        })?;
    let len = material_len(ks.key_size);
    if len > ks.area.size {
        return Err(FormatError::KeyslotUnusable {
            slot,
            reason: format!(
                "area size {} smaller than the {len} bytes of AF material",
                ks.area.size
            ),
        });
    }
    let end = ks.area.offset.saturating_add(len);
    if end > device_size {
        return Err(FormatError::Truncated {
            what: format!("keyslot {slot} area"),
            end,
            size: device_size,
        });
    }
    // key_size <= 512 (metadata), so len <= 2 MB.
    let len = usize::try_from(len).map_err(|_| FormatError::meta("key_size", "too large"))?;
    let area_key = kdf::derive(
        &params,
        passphrase.expose_secret(),
        &ks.kdf.salt,
        ks.area.key_size as usize,
    )
    // Bad parameters (or memory we cannot get) make this slot unusable, not the search fatal.
    .map_err(|e| FormatError::KeyslotUnusable {
        slot,
        reason: e.to_string(),
    })?;
    let mut material = SecretBytes::zeroed(len);
    read_exact_at(
        file,
        material.expose_secret_mut(),
        ks.area.offset,
        "reading keyslot material",
    )?;
    xts_area(
        area_key.expose_secret(),
        material.expose_secret_mut(),
        Direction::Decrypt,
    )
    .map_err(|reason| FormatError::KeyslotUnusable { slot, reason })?;
    af::merge(
        material.expose_secret(),
        ks.key_size as usize,
        AF_STRIPES,
        af_hash,
    )
    .map_err(|e| FormatError::KeyslotUnusable {
        slot,
        reason: e.to_string(),
    })
}

/// Writes a new keyslot's material at `offset` (fsynced) and returns its metadata. The caller
/// links it into the header afterwards, so a crash leaves only an unreferenced blob.
pub(crate) fn create(
    file: &dyn HeaderIo,
    offset: u64,
    volume_key: &VolumeKey,
    passphrase: &SecretBytes,
    params: &KdfParams,
) -> Result<Luks2Keyslot, FormatError> {
    let key_size = u32::try_from(volume_key.len())
        .ok()
        .filter(|n| matches!(n, 32 | 64))
        .ok_or_else(|| FormatError::InvalidParams("volume key must be 32 or 64 bytes".into()))?;
    // cryptsetup copies the PBKDF2 hash into the AF; argon2 slots use sha256.
    let af_hash = match params {
        KdfParams::Pbkdf2 { hash, .. } => *hash,
        _ => HashAlg::Sha256,
    };
    let mut salt = [0u8; KDF_SALT_LEN];
    super::fill_random(&mut salt)?;
    let area_key = kdf::derive(params, passphrase.expose_secret(), &salt, key_size as usize)
        .map_err(|e| FormatError::Kdf(e.to_string()))?;
    let len = usize::try_from(material_len(key_size)).unwrap_or(usize::MAX); // <= 256000
    let mut material = af::split(volume_key.expose_secret(), AF_STRIPES, af_hash, len)
        .map_err(|e| FormatError::Random(e.to_string()))?;
    xts_area(
        area_key.expose_secret(),
        material.expose_secret_mut(),
        Direction::Encrypt,
    )
    .map_err(FormatError::InvalidParams)?;
    write_all_at(
        file,
        material.expose_secret(),
        offset,
        "writing keyslot material",
    )?;
    file.sync_durable()
        .map_err(|e| FormatError::io("syncing keyslot material", offset, e))?;
    Ok(Luks2Keyslot {
        key_size,
        priority: None::<KeyslotPriority>,
        af: Af {
            stripes: AF_STRIPES,
            hash: af_hash.name().into(),
            extra: Default::default(),
        },
        area: Area {
            offset,
            size: area_size(key_size),
            encryption: CIPHER.into(),
            key_size,
            extra: Default::default(),
        },
        kdf: Kdf::from_params(params, salt),
        extra: Default::default(),
    })
}

#[derive(Clone, Copy)]
enum Direction {
    Encrypt,
    Decrypt,
}

/// aes-xts-plain64 over whole 512-byte units, IV = unit index from the start of `buf`.
fn xts_area(key: &[u8], buf: &mut [u8], dir: Direction) -> Result<(), String> {
    // xts-mode panics on a sector shorter than one block; our buffers are 512-byte multiples.
    // 512 fits any usize.
    #[allow(clippy::cast_possible_truncation)]
    const SECTOR: usize = KEYSLOT_SECTOR as usize;
    if buf.is_empty() || !buf.len().is_multiple_of(SECTOR) {
        return Err(format!(
            "keyslot material of {} bytes is not whole sectors",
            buf.len()
        ));
    }
    let sector = SECTOR;
    match key.len() {
        32 => {
            let (k1, k2) = key.split_at(16);
            let x = Xts128::new(
                Aes128::new_from_slice(k1).map_err(|e| e.to_string())?,
                Aes128::new_from_slice(k2).map_err(|e| e.to_string())?,
            );
            match dir {
                Direction::Encrypt => x.encrypt_area(buf, sector, 0, get_tweak_default),
                Direction::Decrypt => x.decrypt_area(buf, sector, 0, get_tweak_default),
            }
        }
        64 => {
            let (k1, k2) = key.split_at(32);
            let x = Xts128::new(
                Aes256::new_from_slice(k1).map_err(|e| e.to_string())?,
                Aes256::new_from_slice(k2).map_err(|e| e.to_string())?,
            );
            match dir {
                Direction::Encrypt => x.encrypt_area(buf, sector, 0, get_tweak_default),
                Direction::Decrypt => x.decrypt_area(buf, sector, 0, get_tweak_default),
            }
        }
        n => return Err(format!("area key of {n} bytes (need 32 or 64)")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_cryptsetup() {
        assert_eq!(material_len(64), 256_000);
        assert_eq!(area_size(64), 258_048);
        assert_eq!(area_size(32), 131_072);
        assert_eq!(material_len(32), 128_000);
    }

    #[test]
    fn xts_area_matches_ieee1619_vector_4() {
        // IEEE P1619 XTS-AES-128 vector 4: keys 2718..., 3141..., data unit 0, 512 bytes of 00..ff.
        let mut key = Vec::new();
        key.extend_from_slice(&hex("27182818284590452353602874713526"));
        key.extend_from_slice(&hex("31415926535897932384626433832795"));
        let mut buf: Vec<u8> = (0..512).map(|i| i as u8).collect();
        xts_area(&key, &mut buf, Direction::Encrypt).unwrap();
        assert_eq!(&buf[..16], &hex("27a7479befa1d476489f308cd4cfa6e2")[..]);
        xts_area(&key, &mut buf, Direction::Decrypt).unwrap();
        assert!(buf.iter().enumerate().all(|(i, &b)| b == i as u8));
    }

    #[test]
    fn xts_area_rejects_partial_sectors_instead_of_panicking() {
        assert!(xts_area(&[0; 64], &mut [0u8; 8], Direction::Decrypt).is_err());
        assert!(xts_area(&[0; 48], &mut [0u8; 512], Direction::Decrypt).is_err());
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
