//! XTS differential: the fused VAES-512 path, the portable `aes`-crate path and the
//! independent `xts-mode` crate must agree on every key, sector size, length and IV — notably
//! IVs near 2^64, where plain64 wraps (IV = sector number mod 2^64, zero-extended to 128 bits).

use aes::cipher::KeyInit;
use aes::{Aes128, Aes256};
use arbitrary::{Arbitrary, Unstructured};
use xts_mode::{get_tweak_default, Xts128};

use nbdcrypt::crypto::keys::VolumeKey;
use nbdcrypt::crypto::xts::{SectorCipher, IV_UNIT, SECTOR_SIZES};

/// IV of the sector `i` sectors after `first_iv`, as dm-crypt's plain64 counts it.
fn iv_of(first_iv: u64, i: usize, sector: usize) -> u128 {
    u128::from(first_iv.wrapping_add((i * (sector / IV_UNIT)) as u64))
}

fn reference(key: &[u8], data: &mut [u8], sector: usize, first_iv: u64, encrypt: bool) {
    fn go<C>(x: Xts128<C>, data: &mut [u8], sector: usize, first_iv: u64, encrypt: bool)
    where
        C: aes::cipher::BlockCipherEncrypt + aes::cipher::BlockCipherDecrypt
            + aes::cipher::BlockSizeUser<BlockSize = aes::cipher::consts::U16>,
    {
        for (i, s) in data.chunks_mut(sector).enumerate() {
            let t = get_tweak_default(iv_of(first_iv, i, sector));
            if encrypt {
                x.encrypt_sector(s, t)
            } else {
                x.decrypt_sector(s, t)
            }
        }
    }
    let (k1, k2) = key.split_at(key.len() / 2);
    match k1.len() {
        16 => go(
            Xts128::new(Aes128::new_from_slice(k1).unwrap(), Aes128::new_from_slice(k2).unwrap()),
            data,
            sector,
            first_iv,
            encrypt,
        ),
        32 => go(
            Xts128::new(Aes256::new_from_slice(k1).unwrap(), Aes256::new_from_slice(k2).unwrap()),
            data,
            sector,
            first_iv,
            encrypt,
        ),
        n => panic!("no XTS with {n}-byte halves"),
    }
}

/// Decrypts whole sectors with the `xts-mode` crate (used by the NBD model check).
pub fn reference_decrypt(key: &[u8], ct: &[u8], sector: usize, first_iv: u64) -> Vec<u8> {
    let mut v = ct[..ct.len() / sector * sector].to_vec();
    reference(key, &mut v, sector, first_iv, false);
    v
}

#[derive(Arbitrary, Debug)]
struct Case {
    key: [u8; 64],
    aes128: bool,
    sector: u8,
    iv_near_max: bool,
    iv: u64,
    sectors: u8,
    fill: Vec<u8>,
}

/// `xts_diff`.
pub fn diff(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(c) = Case::arbitrary(&mut u) else { return };
    let key = if c.aes128 { &c.key[..32] } else { &c.key[..] };
    let sector = SECTOR_SIZES[usize::from(c.sector) % SECTOR_SIZES.len()];
    let first_iv = if c.iv_near_max { u64::MAX - (c.iv % 4096) } else { c.iv };
    // Up to 40 sectors: longer than the fused path's widest batch for 512-byte sectors.
    let n = usize::from(c.sectors % 40) + 1;
    let mut plain = vec![0u8; n * sector];
    for (i, b) in plain.iter_mut().enumerate() {
        *b = c.fill.get(i % c.fill.len().max(1)).copied().unwrap_or(0) ^ (i as u8);
    }
    let vk = VolumeKey::from_slice(key);
    let fast = SectorCipher::new(&vk, sector).expect("cipher");
    let portable = SectorCipher::new_portable(&vk, sector).expect("portable cipher");

    let mut want = plain.clone();
    reference(key, &mut want, sector, first_iv, true);

    let mut a = plain.clone();
    fast.encrypt_in_place(&mut a, first_iv).unwrap();
    assert!(a == want, "{} encrypt differs from xts-mode", fast.implementation());
    let mut b = plain.clone();
    portable.encrypt_in_place(&mut b, first_iv).unwrap();
    assert!(b == want, "portable encrypt differs from xts-mode");
    let mut d = vec![0u8; plain.len()];
    fast.encrypt_into(&plain, &mut d, first_iv).unwrap();
    assert!(d == want, "{} encrypt_into differs", fast.implementation());
    portable.encrypt_into(&plain, &mut d, first_iv).unwrap();
    assert!(d == want, "portable encrypt_into differs");

    fast.decrypt_in_place(&mut a, first_iv).unwrap();
    assert!(a == plain, "{} decrypt does not invert", fast.implementation());
    portable.decrypt_in_place(&mut b, first_iv).unwrap();
    assert!(b == plain, "portable decrypt does not invert");
    let mut e = vec![0u8; plain.len()];
    fast.decrypt_into(&want, &mut e, first_iv).unwrap();
    assert!(e == plain, "{} decrypt_into differs", fast.implementation());
    portable.decrypt_into(&want, &mut e, first_iv).unwrap();
    assert!(e == plain, "portable decrypt_into differs");

    // Splitting a run of sectors at any sector boundary gives the same ciphertext.
    if n > 1 {
        let cut = (usize::from(c.sectors) % (n - 1) + 1) * sector;
        let mut s = plain.clone();
        let (lo, hi) = s.split_at_mut(cut);
        fast.encrypt_in_place(lo, first_iv).unwrap();
        fast.encrypt_in_place(hi, first_iv.wrapping_add((cut / IV_UNIT) as u64)).unwrap();
        assert!(s == want, "split encryption differs");
    }
    // Partial sectors are refused, never half-done.
    let mut short = plain[..sector - 16].to_vec();
    assert!(fast.encrypt_in_place(&mut short, first_iv).is_err());
}

/// Checksum-hash differential: `block_hash::hash_blocks` (two SHA-256 streams per pass with
/// SHA-NI) must give, for every block, what the `sha2` crate gives for that block alone.
/// Input: two bytes of block size (1..=4096), then the data; the digest buffer's length is
/// varied too (byte 2 shortens it), since callers may pass one that is too short.
pub fn hash_diff(data: &[u8]) {
    use nbdcrypt::crypto::block_hash::{hash_blocks, sums_len};
    use nbdcrypt::crypto::kdf::HashAlg;
    use sha2::{Digest, Sha256};
    let [b0, b1, cut, rest @ ..] = data else {
        return;
    };
    let block = usize::from(u16::from_le_bytes([*b0, *b1])) % 4096 + 1;
    let full = sums_len(HashAlg::Sha256, rest.len(), block);
    let len = full.saturating_sub(usize::from(*cut) % 40);
    let mut out = vec![0x5a; len + 8];
    hash_blocks(HashAlg::Sha256, rest, block, &mut out[..len]);
    for (i, piece) in rest.chunks_exact(block).enumerate() {
        let Some(o) = out[..len].get(32 * i..32 * i + 32) else {
            break;
        };
        assert_eq!(o, Sha256::digest(piece).as_slice(), "block {i} of {block} bytes");
    }
    // Whole digests only: a partial one at the end and the bytes past the buffer stay as they were.
    assert!(out[len / 32 * 32..].iter().all(|&b| b == 0x5a));
}
