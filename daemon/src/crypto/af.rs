//! The LUKS anti-forensic splitter (AF "luks1"): spreads a key over `stripes` blocks so that
//! erasing any part of the keyslot area destroys it. Split on write, merge on read.
//!
//! Pure computation on buffers; the caller encrypts/decrypts the material and owns the I/O.
//! Every intermediate that depends on the key lives in a `SecretBytes`.

use crate::crypto::kdf::HashAlg;
use crate::crypto::keys::SecretBytes;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AfError {
    #[error(
        "af material is {actual} bytes, need at least {needed} ({stripes} stripes of {key_len})"
    )]
    ShortMaterial {
        actual: usize,
        needed: usize,
        stripes: u32,
        key_len: usize,
    },
    #[error("af parameters out of range: key length {key_len}, stripes {stripes}")]
    BadParams { key_len: usize, stripes: u32 },
    #[error("random number generator failed")]
    Random,
}

/// Bytes of AF material for a key: `key_len * stripes` (not rounded).
pub fn split_len(key_len: usize, stripes: u32) -> Option<usize> {
    key_len.checked_mul(usize::try_from(stripes).ok()?)
}

/// Recovers the key from `material` (at least `key_len * stripes` bytes; extra padding ignored).
pub fn merge(
    material: &[u8],
    key_len: usize,
    stripes: u32,
    hash: HashAlg,
) -> Result<SecretBytes, AfError> {
    let needed = split_len(key_len, stripes)
        .filter(|_| key_len > 0 && stripes > 0)
        .ok_or(AfError::BadParams { key_len, stripes })?;
    if material.len() < needed {
        return Err(AfError::ShortMaterial {
            actual: material.len(),
            needed,
            stripes,
            key_len,
        });
    }
    let mut acc = SecretBytes::zeroed(key_len);
    let mut chunks = material[..needed].chunks_exact(key_len);
    // stripes - 1 diffused stripes, then the last one XORed in plain.
    for _ in 1..stripes {
        let stripe = chunks
            .next()
            .ok_or(AfError::BadParams { key_len, stripes })?;
        xor_into(acc.expose_secret_mut(), stripe);
        diffuse(hash, acc.expose_secret_mut());
    }
    let last = chunks
        .next()
        .ok_or(AfError::BadParams { key_len, stripes })?;
    xor_into(acc.expose_secret_mut(), last);
    Ok(acc)
}

/// Splits `key` into `key_len * stripes` bytes of material, padded with zeros to `padded_len`
/// (pass the 512-rounded length the keyslot area uses).
pub fn split(
    key: &[u8],
    stripes: u32,
    hash: HashAlg,
    padded_len: usize,
) -> Result<SecretBytes, AfError> {
    split_with_rng(key, stripes, hash, padded_len, &mut |buf| {
        getrandom::fill(buf).map_err(|_| AfError::Random)
    })
}

fn split_with_rng(
    key: &[u8],
    stripes: u32,
    hash: HashAlg,
    padded_len: usize,
    rng: &mut dyn FnMut(&mut [u8]) -> Result<(), AfError>,
) -> Result<SecretBytes, AfError> {
    let key_len = key.len();
    let needed = split_len(key_len, stripes)
        .filter(|n| key_len > 0 && stripes > 0 && *n <= padded_len)
        .ok_or(AfError::BadParams { key_len, stripes })?;
    let mut out = SecretBytes::zeroed(padded_len);
    let mut acc = SecretBytes::zeroed(key_len);
    {
        let buf = out.expose_secret_mut();
        let (random_part, rest) = buf[..needed].split_at_mut(needed - key_len);
        rng(random_part)?;
        for stripe in random_part.chunks_exact(key_len) {
            xor_into(acc.expose_secret_mut(), stripe);
            diffuse(hash, acc.expose_secret_mut());
        }
        rest.copy_from_slice(key);
        xor_into(rest, acc.expose_secret());
    }
    Ok(out)
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// In place: block i (hash-sized, last one may be short) becomes H(be32(i) || block)[..len].
fn diffuse(hash: HashAlg, buf: &mut [u8]) {
    let d = hash.output_len();
    let mut digest = SecretBytes::zeroed(d);
    for (i, block) in buf.chunks_mut(d).enumerate() {
        // A key is at most a few hundred bytes, so the block index fits in u32.
        let idx = u32::try_from(i).unwrap_or(u32::MAX).to_be_bytes();
        hash.hash_parts(&[&idx, block], digest.expose_secret_mut());
        let n = block.len();
        block.copy_from_slice(&digest.expose_secret()[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_round_trips_for_each_hash_and_key_size() {
        for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            for key_len in [16usize, 32, 64, 33] {
                let key: Vec<u8> = (0..key_len)
                    .map(|i| u8::try_from(i).unwrap() ^ 0xa5)
                    .collect();
                let padded = (key_len * 4000).div_ceil(512) * 512;
                let m = split(&key, 4000, hash, padded).unwrap();
                assert_eq!(m.len(), padded);
                let k = merge(m.expose_secret(), key_len, 4000, hash).unwrap();
                assert_eq!(k.expose_secret(), &key[..], "{hash} {key_len}");
            }
        }
    }

    #[test]
    fn merge_of_known_material_matches_reference_algorithm() {
        // Material = stripes of zeros except the last: merge = last XOR diffuse(...(diffuse(0))).
        // With 2 stripes of 4 bytes and sha256: acc = H(be32(0)||0000)[..4].
        let mut material = vec![0u8; 8];
        material[4..].copy_from_slice(&[1, 2, 3, 4]);
        let k = merge(&material, 4, 2, HashAlg::Sha256).unwrap();
        let mut h = [0u8; 32];
        HashAlg::Sha256.hash_parts(&[&[0, 0, 0, 0], &[0, 0, 0, 0]], &mut h);
        let want: Vec<u8> = h[..4]
            .iter()
            .zip([1u8, 2, 3, 4])
            .map(|(a, b)| a ^ b)
            .collect();
        assert_eq!(k.expose_secret(), &want[..]);
    }

    #[test]
    fn merge_rejects_short_material() {
        let e = merge(&[0u8; 100], 64, 4000, HashAlg::Sha256).err();
        assert!(matches!(
            e,
            Some(AfError::ShortMaterial {
                needed: 256_000,
                ..
            })
        ));
        assert!(matches!(
            merge(&[0u8; 100], 0, 4000, HashAlg::Sha256),
            Err(AfError::BadParams { .. })
        ));
    }
}
