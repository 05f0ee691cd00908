//! SHA-256 with the x86-64 SHA extensions, two independent messages per pass.
//!
//! `sha256rnds2` does two rounds and its result feeds the next one, so a single message keeps
//! the SHA unit waiting on its own latency. [`compress2`] runs the rounds of two messages
//! (two blocks of a hot zone) in one instruction stream, so the unit always has independent
//! work. The round structure is the standard one for these instructions (FIPS 180-4 rounds;
//! state kept as ABEF/CDGH register pairs; message schedule by `sha256msg1`/`sha256msg2`).
//!
//! Only `crypto::block_hash` uses this module; it owns the dispatch and the portable fallback.
//! The `unsafe` here is for CPU intrinsics: calling `#[target_feature]` functions (sound once
//! [`available`] returned true) and unaligned 16-byte loads/stores inside checked slices.

use core::arch::x86_64::*;

/// SHA-256 round constants.
const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

/// Initial hash value H(0).
const H0: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

const SHA_BLOCK: usize = 64;
const DIGEST: usize = 32;

/// Whether this CPU has the instructions [`sha256_blocks`]'s fast path uses.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("sha")
        && is_x86_feature_detected!("sse2")
        && is_x86_feature_detected!("ssse3")
        && is_x86_feature_detected!("sse4.1")
}

/// One message's state: (ABEF, CDGH).
#[derive(Clone, Copy)]
struct State(__m128i, __m128i);

/// Hash each `block`-byte piece of `data` into consecutive 32-byte digests in `out`, two
/// pieces per pass. Stops at the last whole piece or when `out` is full.
/// Callers must have seen [`available`] return true.
pub(super) fn sha256_blocks(data: &[u8], block: usize, out: &mut [u8]) {
    debug_assert!(available());
    let mut pieces = data.chunks_exact(block);
    let mut outs = out.chunks_exact_mut(DIGEST);
    loop {
        match (pieces.next(), outs.next()) {
            (Some(a), Some(oa)) => match (pieces.next(), outs.next()) {
                (Some(b), Some(ob)) => {
                    // SAFETY: `available()` was checked by the caller (`block_hash::hash_blocks`
                    // calls us only after it returned true).
                    unsafe { hash_pair(a, b, oa, ob) }
                }
                _ => {
                    // SAFETY: as above.
                    unsafe { hash_one(a, oa) }
                    return;
                }
            },
            _ => return,
        }
    }
}

/// The padding of a `len`-byte message after its whole 64-byte blocks: one or two blocks.
fn tail_blocks(msg: &[u8], tail: &mut [u8; 2 * SHA_BLOCK]) -> usize {
    let full = msg.len() / SHA_BLOCK * SHA_BLOCK;
    let rest = &msg[full..];
    *tail = [0; 2 * SHA_BLOCK];
    tail[..rest.len()].copy_from_slice(rest);
    tail[rest.len()] = 0x80;
    let n = if rest.len() < SHA_BLOCK - 8 { 1 } else { 2 };
    let bits = (msg.len() as u64).wrapping_mul(8);
    tail[n * SHA_BLOCK - 8..n * SHA_BLOCK].copy_from_slice(&bits.to_be_bytes());
    n
}

#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
fn hash_pair(a: &[u8], b: &[u8], oa: &mut [u8], ob: &mut [u8]) {
    debug_assert_eq!(a.len(), b.len());
    let (mut sa, mut sb) = (init(), init());
    let full = a.len().min(b.len()) / SHA_BLOCK * SHA_BLOCK;
    let mut i = 0;
    while i < full {
        let (ba, bb) = (
            load_block(&a[i..i + SHA_BLOCK]),
            load_block(&b[i..i + SHA_BLOCK]),
        );
        (sa, sb) = (compress_one(sa, ba), compress_one(sb, bb));
        i += SHA_BLOCK;
    }
    let (mut ta, mut tb) = ([0u8; 2 * SHA_BLOCK], [0u8; 2 * SHA_BLOCK]);
    let na = tail_blocks(a, &mut ta);
    let nb = tail_blocks(b, &mut tb);
    for j in 0..na.max(nb) {
        let r = j * SHA_BLOCK..(j + 1) * SHA_BLOCK;
        if j < na {
            sa = compress_one(sa, load_block(&ta[r.clone()]));
        }
        if j < nb {
            sb = compress_one(sb, load_block(&tb[r]));
        }
    }
    store(sa, oa);
    store(sb, ob);
}

#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
fn hash_one(a: &[u8], oa: &mut [u8]) {
    let mut s = init();
    let full = a.len() / SHA_BLOCK * SHA_BLOCK;
    for blk in a[..full].chunks_exact(SHA_BLOCK) {
        s = compress_one(s, load_block(blk));
    }
    let mut t = [0u8; 2 * SHA_BLOCK];
    let n = tail_blocks(a, &mut t);
    for blk in t[..n * SHA_BLOCK].chunks_exact(SHA_BLOCK) {
        s = compress_one(s, load_block(blk));
    }
    store(s, oa);
}

/// A 64-byte block as four big-endian word vectors.
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
#[inline]
fn load_block(blk: &[u8]) -> [__m128i; 4] {
    assert!(blk.len() >= SHA_BLOCK);
    let mask = _mm_set_epi64x(0x0c0d_0e0f_0809_0a0b, 0x0405_0607_0001_0203);
    let mut m = [_mm_setzero_si128(); 4];
    for (k, v) in m.iter_mut().enumerate() {
        // SAFETY: `blk` has at least 64 bytes (asserted above), so bytes 16k..16k+16 are inside
        // it for k < 4; `_mm_loadu_si128` has no alignment requirement.
        let raw = unsafe { _mm_loadu_si128(blk.as_ptr().add(16 * k).cast()) };
        *v = _mm_shuffle_epi8(raw, mask);
    }
    m
}

#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
#[inline]
fn init() -> State {
    let w = |i: usize| H0[i].cast_signed();
    // Lanes low to high: ABEF = (F, E, B, A), CDGH = (H, G, D, C).
    State(
        _mm_set_epi32(w(0), w(1), w(4), w(5)),
        _mm_set_epi32(w(2), w(3), w(6), w(7)),
    )
}

#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
#[inline]
fn store(s: State, out: &mut [u8]) {
    let mut abef = [0u32; 4];
    let mut cdgh = [0u32; 4];
    // SAFETY: both arrays are 16 bytes; `_mm_storeu_si128` has no alignment requirement.
    unsafe {
        _mm_storeu_si128(abef.as_mut_ptr().cast(), s.0);
        _mm_storeu_si128(cdgh.as_mut_ptr().cast(), s.1);
    }
    // abef lanes: [F, E, B, A]; cdgh lanes: [H, G, D, C].
    let h = [
        abef[3], abef[2], cdgh[3], cdgh[2], abef[1], abef[0], cdgh[1], cdgh[0],
    ];
    for (o, w) in out.chunks_exact_mut(4).zip(h) {
        o.copy_from_slice(&w.to_be_bytes());
    }
}

/// Round constants k..k+4 as a vector.
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
#[inline]
fn kvec(g: usize) -> __m128i {
    let k = |i: usize| K[4 * g + i].cast_signed();
    _mm_set_epi32(k(3), k(2), k(1), k(0))
}

/// Four rounds (group `g`) on the message words in `cur`.
macro_rules! rounds4 {
    ($abef:ident, $cdgh:ident, $cur:expr, $g:expr) => {{
        let msg = _mm_add_epi32($cur, kvec($g));
        $cdgh = _mm_sha256rnds2_epu32($cdgh, $abef, msg);
        $abef = _mm_sha256rnds2_epu32($abef, $cdgh, _mm_shuffle_epi32::<0x0e>(msg));
    }};
}

/// Message schedule step after group `g` (3 ≤ g ≤ 14) on words `cur` = M[g], `prev` = M[g-1],
/// `next` = msg1(M[g-3], M[g-2]) (from `sched1`): gives M[g+1].
macro_rules! sched2 {
    ($next:ident, $cur:ident, $prev:ident) => {
        $next = _mm_sha256msg2_epu32(
            _mm_add_epi32($next, _mm_alignr_epi8::<4>($cur, $prev)),
            $cur,
        );
    };
}

/// First half of the schedule: `prev` = msg1(M[g-1], M[g]).
macro_rules! sched1 {
    ($prev:ident, $cur:ident) => {
        $prev = _mm_sha256msg1_epu32($prev, $cur);
    };
}

/// One 64-byte block into `s`. Inlined into the two-message loops above, where the two calls
/// of a step have no data dependence between them and the CPU overlaps them. Groups of four
/// rounds are written out (the schedule rotates through four registers `m0..m3`), so nothing
/// is indexed at run time.
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
#[inline]
fn compress_one(s: State, m: [__m128i; 4]) -> State {
    let State(mut abef, mut cdgh) = s;
    let (abef0, cdgh0) = (abef, cdgh);
    let [mut m0, mut m1, mut m2, mut m3] = m;
    rounds4!(abef, cdgh, m0, 0);
    rounds4!(abef, cdgh, m1, 1);
    sched1!(m0, m1);
    rounds4!(abef, cdgh, m2, 2);
    sched1!(m1, m2);
    // Groups 3..=14: the schedule makes the next group's words as it goes.
    macro_rules! mid {
        ($g:expr, $cur:ident, $prev:ident, $next:ident) => {
            rounds4!(abef, cdgh, $cur, $g);
            sched2!($next, $cur, $prev);
            sched1!($prev, $cur);
        };
    }
    mid!(3, m3, m2, m0);
    mid!(4, m0, m3, m1);
    mid!(5, m1, m0, m2);
    mid!(6, m2, m1, m3);
    mid!(7, m3, m2, m0);
    mid!(8, m0, m3, m1);
    mid!(9, m1, m0, m2);
    mid!(10, m2, m1, m3);
    mid!(11, m3, m2, m0);
    mid!(12, m0, m3, m1);
    // The last two groups need no more msg1 halves.
    rounds4!(abef, cdgh, m1, 13);
    sched2!(m2, m1, m0);
    rounds4!(abef, cdgh, m2, 14);
    sched2!(m3, m2, m1);
    rounds4!(abef, cdgh, m3, 15);
    State(_mm_add_epi32(abef, abef0), _mm_add_epi32(cdgh, cdgh0))
}
