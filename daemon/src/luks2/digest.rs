//! The `pbkdf2` digest: how LUKS2 recognises the right volume key without storing it.
//! `digest = PBKDF2(hash, password = volume key, salt, iterations, len)`.

use super::error::FormatError;
use super::layout::KDF_SALT_LEN;
use super::metadata::DigestEntry;
use crate::crypto::kdf::{pbkdf2_into, HashAlg};
use crate::crypto::keys::SecretBytes;

/// True if `key` matches the digest. Constant-time in the comparison.
pub(crate) fn verify(d: &DigestEntry, key: &[u8]) -> bool {
    let mut out = SecretBytes::zeroed(d.digest.len());
    if pbkdf2_into(d.hash, key, &d.salt, d.iterations, out.expose_secret_mut()).is_err() {
        return false;
    }
    let diff = out
        .expose_secret()
        .iter()
        .zip(&d.digest)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    diff == 0
}

/// A new digest of `key` for the given segments and keyslots; the digest length follows the
/// hash (32 bytes for sha256).
pub(crate) fn create(
    key: &[u8],
    hash: HashAlg,
    iterations: u32,
    keyslots: Vec<u32>,
    segments: Vec<u32>,
) -> Result<DigestEntry, FormatError> {
    let mut salt = vec![0u8; KDF_SALT_LEN];
    super::fill_random(&mut salt)?;
    let mut digest = vec![0u8; hash.output_len()];
    pbkdf2_into(hash, key, &salt, iterations, &mut digest)
        .map_err(|e| FormatError::InvalidParams(e.to_string()))?;
    Ok(DigestEntry {
        keyslots,
        segments,
        hash,
        iterations,
        salt,
        digest,
        extra: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_digest_verifies_only_its_key() {
        let d = create(&[7u8; 64], HashAlg::Sha256, 1000, vec![0], vec![0]).unwrap();
        assert_eq!(d.digest.len(), 32);
        assert!(verify(&d, &[7u8; 64]));
        assert!(!verify(&d, &[8u8; 64]));
        let d = create(&[7u8; 64], HashAlg::Sha512, 1000, vec![0], vec![0]).unwrap();
        assert_eq!(d.digest.len(), 64);
        assert!(verify(&d, &[7u8; 64]));
    }

    #[test]
    fn a_20_byte_luks1_style_digest_is_checked_over_its_length() {
        let mut d = create(&[1u8; 32], HashAlg::Sha256, 1000, vec![0], vec![0]).unwrap();
        d.digest.truncate(20);
        assert!(verify(&d, &[1u8; 32]));
    }
}
