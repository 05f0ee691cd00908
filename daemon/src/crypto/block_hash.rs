//! Hashing many equal-sized blocks at once: the checksum resilience mode of a re-encryption
//! stores one digest per block of every hot zone (LUKS2 `"checksum"`, usually SHA-256 over
//! 4096-byte blocks), so it hashes every byte of the volume once.
//!
//! One SHA-256 stream is latency-bound: each `sha256rnds2` waits for the previous one. With
//! SHA-NI, two independent blocks hashed side by side fill those waits, so on x86-64 CPUs with
//! SHA-NI, SHA-256 blocks are hashed two at a time (`sha256_ni.rs`); everything else goes
//! through the portable [`HashAlg::hash_parts`]. Both give the same digests (tested below
//! and fuzzed against the `sha2` crate).

use crate::crypto::kdf::HashAlg;

// `unsafe_code` is denied workspace-wide; the SHA-NI module is one of the fenced modules allowed
// it. Its invariant: its `#[target_feature]` code is only called after `ni::available()` saw the
// CPU features it needs, and every load stays inside a length-checked slice (each block's
// `// SAFETY:` comment says which).
#[cfg(target_arch = "x86_64")]
#[path = "sha256_ni.rs"]
#[allow(unsafe_code)]
mod ni;

/// Length of `hash`'s digest for each `block`-byte piece of `data`: the size `out` must have
/// for [`hash_blocks`].
pub fn sums_len(hash: HashAlg, data_len: usize, block: usize) -> usize {
    if block == 0 {
        return 0;
    }
    data_len / block * hash.output_len()
}

/// Hash each `block`-byte piece of `data` with `hash`, writing the digests one after the other
/// into `out`. A partial last piece is not hashed. `out` must be [`sums_len`] bytes long
/// (extra bytes are left alone; a shorter `out` stops early) — callers size it from the same
/// lengths, so this never panics.
pub fn hash_blocks(hash: HashAlg, data: &[u8], block: usize, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if hash == HashAlg::Sha256 && block != 0 && ni::available() {
        ni::sha256_blocks(data, block, out);
        return;
    }
    hash_blocks_portable(hash, data, block, out);
}

/// The portable path, for tests and the fuzz target to compare with.
pub fn hash_blocks_portable(hash: HashAlg, data: &[u8], block: usize, out: &mut [u8]) {
    if block == 0 {
        return;
    }
    let hl = hash.output_len();
    for (blk, o) in data.chunks_exact(block).zip(out.chunks_exact_mut(hl)) {
        hash.hash_parts(&[blk], o);
    }
}

/// Whether [`hash_blocks`] takes the two-stream SHA-NI path for SHA-256 on this CPU.
pub fn sha256_accelerated() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        ni::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x.to_le_bytes()[0]
            })
            .collect()
    }

    #[test]
    fn the_fast_path_gives_the_portable_digests_for_every_shape() {
        // Block sizes around the 64-byte SHA block and its padding edge (55/56), odd counts
        // (the single-stream tail), a partial last block, and the sizes LUKS2 uses.
        for &block in &[1usize, 55, 56, 63, 64, 65, 119, 120, 128, 512, 1000, 4096] {
            for count in [0usize, 1, 2, 3, 5] {
                for extra in [0usize, 7] {
                    let data = pattern(block * count + extra, (block * 31 + count) as u32);
                    let n = sums_len(HashAlg::Sha256, data.len(), block);
                    let (mut fast, mut slow) = (vec![0xaa; n + 3], vec![0xaa; n + 3]);
                    hash_blocks(HashAlg::Sha256, &data, block, &mut fast);
                    hash_blocks_portable(HashAlg::Sha256, &data, block, &mut slow);
                    assert_eq!(fast, slow, "block {block} count {count} extra {extra}");
                }
            }
        }
    }

    #[test]
    fn known_answer_for_an_empty_and_a_short_block() {
        // FIPS 180-2 "abc" and the empty string, through the block interface.
        let mut out = [0u8; 64];
        hash_blocks(HashAlg::Sha256, b"abcabc", 3, &mut out);
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(hex(&out[..32]), abc);
        assert_eq!(hex(&out[32..]), abc);
    }

    #[test]
    fn other_hashes_and_odd_outputs_are_left_to_the_portable_path() {
        let data = pattern(3 * 512, 9);
        for h in [HashAlg::Sha1, HashAlg::Sha512] {
            let n = sums_len(h, data.len(), 512);
            let (mut a, mut b) = (vec![0; n], vec![0; n]);
            hash_blocks(h, &data, 512, &mut a);
            hash_blocks_portable(h, &data, 512, &mut b);
            assert_eq!(a, b);
        }
        // A short `out` stops early instead of panicking.
        let mut short = [0u8; 40];
        hash_blocks(HashAlg::Sha256, &data, 512, &mut short);
        let mut one = [0u8; 32];
        HashAlg::Sha256.hash_parts(&[&data[..512]], &mut one);
        assert_eq!(&short[..32], &one);
        assert_eq!(&short[32..], &[0u8; 8]);
        hash_blocks(HashAlg::Sha256, &data, 0, &mut short);
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
