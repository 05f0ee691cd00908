//! The fused AES-XTS pass for x86-64 CPUs with AVX-512F/BW, VAES and VPCLMULQDQ.
//!
//! One pass over the data, 32 blocks (eight 512-bit registers, four blocks each) per step:
//! - A sector's start tweak T0 = AES_K2(IV) is computed 16 sectors at a time (four registers).
//! - Register `r` of a step holds the tweaks T0·x^(4r..4r+3); after the step every register is
//!   multiplied by x^32 at once: a 4-byte shift of each 128-bit lane plus one carry-less
//!   multiply of the bytes that fell off by 0x87 (x^128 = x^7 + x^2 + x + 1).
//! - `data ^ tweak ^ round_key_0` is one ternary-logic instruction; the closing tweak XOR is
//!   folded into the last round key (`aesenclast(x, k ^ T) = aesenclast(x, k) ^ T`).
//! - The source is prefetched 2 KiB ahead.
//!
//! Only `crypto::xts` uses this module; it owns length checks and the portable fallback. The
//! `unsafe` here is for CPU intrinsics (calling `#[target_feature]` code, raw loads and stores),
//! not for OS calls; each block names its invariant. `unsafe_code` is denied workspace-wide and
//! allowed here only, by the `#[allow]` on this module's declaration in xts.rs.

use core::arch::x86_64::*;

use zeroize::Zeroize;

use super::XtsError;
use crate::sys::LockedBuf;

/// Blocks per step: 8 registers × 4 lanes.
const STEP_BYTES: usize = 512;

/// Which of the two passes to run; tests force each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pass {
    /// The one the daemon runs: the buffered pass for 512-byte sectors (there it is the
    /// software-pipelined [`xts_512`]), [`xts`] for larger ones. On an AMD EPYC Zen 4
    /// (`XTS_BENCH_RATIO=1 cargo bench -p nbdcrypt-benches --bench xts`): 512-byte sectors
    /// 82–83 % of the ECB ceiling against 74 % for [`xts`]; at 4096 [`xts`] 85 %, the
    /// buffered pass 79 %. 1024 and 2048 were not measured and stay with [`xts`].
    Auto,
    /// [`xts`]: tweaks advanced in registers, step by step.
    Fused,
    /// [`xts_buffered`]: tweaks for 16 steps computed ahead into a buffer.
    Buffered,
}

/// Expanded key schedules, in locked memory ([`LockedBuf`]: mlocked best effort, wiped on
/// drop). Only constructed after the CPU features were detected, which is the invariant every
/// `unsafe` call into `#[target_feature]` code below relies on.
pub(super) struct VaesXts {
    /// Three schedules of 15 round keys (16 bytes each), in [`Schedule`] order; AES-128 uses the
    /// first 11 of each.
    schedules: LockedBuf,
    /// 10 (AES-128) or 14 (AES-256).
    rounds: usize,
}

/// Which schedule inside `VaesXts::schedules`.
#[derive(Clone, Copy)]
enum Schedule {
    /// Data key, encryption.
    Encrypt = 0,
    /// Data key, equivalent inverse cipher (for `aesdec`).
    Decrypt = 1,
    /// Tweak key, encryption.
    Tweak = 2,
}

type RoundKeys = [[u8; 16]; 15];
const SCHEDULE_BYTES: usize = 15 * 16;

/// Whether this CPU can run the fused pass.
pub(super) fn cpu_supported() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("vaes")
        && is_x86_feature_detected!("vpclmulqdq")
        && is_x86_feature_detected!("aes")
        && is_x86_feature_detected!("pclmulqdq")
}

impl VaesXts {
    /// Expands both keys, or returns `None` if the CPU lacks the features or a key half is not
    /// 16 or 32 bytes.
    pub(super) fn new(key1: &[u8], key2: &[u8]) -> Option<VaesXts> {
        if !cpu_supported() || key1.len() != key2.len() {
            return None;
        }
        let rounds = match key1.len() {
            16 => 10,
            32 => 14,
            _ => return None,
        };
        let mut enc: RoundKeys = [[0; 16]; 15];
        let mut dec: RoundKeys = [[0; 16]; 15];
        let mut tweak: RoundKeys = [[0; 16]; 15];
        // SAFETY: `cpu_supported()` returned true above, so the `aes` and `sse2` features these
        // functions are compiled for are present. Lengths were checked to match `rounds`.
        unsafe {
            expand_key(key1, &mut enc);
            expand_key(key2, &mut tweak);
            inverse_schedule(&enc, &mut dec, rounds);
        }
        let mut schedules = LockedBuf::zeroed(3 * SCHEDULE_BYTES);
        for (out, sched) in schedules
            .as_mut_slice()
            .chunks_exact_mut(SCHEDULE_BYTES)
            .zip([&enc, &dec, &tweak])
        {
            out.copy_from_slice(sched.as_flattened());
        }
        // The stack copies are secrets too.
        enc.zeroize();
        dec.zeroize();
        tweak.zeroize();
        let keys = VaesXts { schedules, rounds };
        Some(keys)
    }

    fn schedule(&self, which: Schedule) -> &RoundKeys {
        let start = which as usize * SCHEDULE_BYTES;
        let bytes = &self.schedules.as_slice()[start..start + SCHEDULE_BYTES];
        let (keys, _) = bytes.as_chunks::<16>();
        // Invariant: `schedules` is 3 * 240 bytes, so every 240-byte window is 15 round keys.
        keys.try_into().expect("a schedule is 15 round keys")
    }

    /// XTS over whole sectors. `src == None` means in place in `dst`. Rechecks the lengths it
    /// relies on (the caller already did, so these errors never reach users).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn crypt(
        &self,
        pass: Pass,
        encrypt: bool,
        src: Option<&[u8]>,
        dst: &mut [u8],
        sector_size: usize,
        first_iv: u64,
        ivs_per_sector: u64,
    ) -> Result<(), XtsError> {
        if sector_size == 0 || !sector_size.is_multiple_of(STEP_BYTES) {
            return Err(XtsError::SectorSize(sector_size));
        }
        if !dst.len().is_multiple_of(sector_size) {
            return Err(XtsError::PartialSector {
                len: dst.len(),
                sector_size,
            });
        }
        let len = dst.len();
        // Both pointers derive from this one `as_mut_ptr()` when in place, so writes through
        // `dst_ptr` do not invalidate `src_ptr` (no shared reborrow of `dst` is taken after it).
        let dst_ptr = dst.as_mut_ptr();
        let src_ptr = match src {
            Some(s) if s.len() != len => {
                return Err(XtsError::LengthMismatch {
                    src: s.len(),
                    dst: len,
                })
            }
            Some(s) => s.as_ptr(),
            None => dst_ptr.cast_const(),
        };
        let buffered = match pass {
            Pass::Auto => sector_size == STEP_BYTES,
            Pass::Fused => false,
            Pass::Buffered => true,
        } && buffered_supports(sector_size);
        let k = self;
        let (a, b, c, d, e, f) = (src_ptr, dst_ptr, len, sector_size, first_iv, ivs_per_sector);
        // SAFETY: (1) `self` exists only if `cpu_supported()` was true, so every feature the
        // callee is compiled for is present. (2) `src_ptr` and `dst_ptr` are valid for `len`
        // bytes: both come from live slices of length `len` (checked equal above); they are
        // either identical (in place) or non-overlapping (`&[u8]` and `&mut [u8]` cannot alias),
        // and the callee reads each 512-byte step before writing it. (3) `len` is a multiple of
        // `sector_size`, itself a non-zero multiple of 512, as checked above. (4) The buffered
        // pass only runs when `buffered_supports(sector_size)`.
        unsafe {
            match (buffered, encrypt, self.rounds) {
                (false, true, 10) => xts::<true, 10>(k, a, b, c, d, e, f),
                (false, true, _) => xts::<true, 14>(k, a, b, c, d, e, f),
                (false, false, 10) => xts::<false, 10>(k, a, b, c, d, e, f),
                (false, false, _) => xts::<false, 14>(k, a, b, c, d, e, f),
                (true, true, 10) => xts_buffered::<true, 10>(k, a, b, c, d, e, f),
                (true, true, _) => xts_buffered::<true, 14>(k, a, b, c, d, e, f),
                (true, false, 10) => xts_buffered::<false, 10>(k, a, b, c, d, e, f),
                (true, false, _) => xts_buffered::<false, 14>(k, a, b, c, d, e, f),
            }
        }
        Ok(())
    }
}

macro_rules! expand128_step {
    ($prev:expr, $rcon:literal) => {{
        let t = _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>($prev));
        let mut k = $prev;
        k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
        k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
        k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
        _mm_xor_si128(k, t)
    }};
}

/// `prev2` is the round key two back, `t` the shuffled keygenassist word.
#[target_feature(enable = "aes,sse2")]
fn expand_mix(prev2: __m128i, t: __m128i) -> __m128i {
    let mut k = prev2;
    k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    _mm_xor_si128(k, t)
}

macro_rules! expand256_pair {
    ($out:ident, $i:expr, $rcon:literal, $last:expr) => {{
        let t = _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>($out[$i - 1]));
        $out[$i] = expand_mix($out[$i - 2], t);
        if !$last {
            let t = _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0x00>($out[$i]));
            $out[$i + 1] = expand_mix($out[$i - 1], t);
        }
    }};
}

/// FIPS-197 key expansion with AES-NI for a 16- or 32-byte key into `out[..rounds + 1]`.
///
/// # Safety
/// The CPU must support `aes` and `sse2`. `key.len()` must be 16 or 32 (else nothing is done).
#[target_feature(enable = "aes,sse2")]
unsafe fn expand_key(key: &[u8], out: &mut RoundKeys) {
    let mut rk = [_mm_setzero_si128(); 15];
    match key.len() {
        16 => {
            // SAFETY: `key` has 16 bytes; unaligned load.
            rk[0] = unsafe { _mm_loadu_si128(key.as_ptr().cast()) };
            rk[1] = expand128_step!(rk[0], 0x01);
            rk[2] = expand128_step!(rk[1], 0x02);
            rk[3] = expand128_step!(rk[2], 0x04);
            rk[4] = expand128_step!(rk[3], 0x08);
            rk[5] = expand128_step!(rk[4], 0x10);
            rk[6] = expand128_step!(rk[5], 0x20);
            rk[7] = expand128_step!(rk[6], 0x40);
            rk[8] = expand128_step!(rk[7], 0x80);
            rk[9] = expand128_step!(rk[8], 0x1b);
            rk[10] = expand128_step!(rk[9], 0x36);
        }
        32 => {
            // SAFETY: `key` has 32 bytes; two unaligned 16-byte loads inside it.
            unsafe {
                rk[0] = _mm_loadu_si128(key.as_ptr().cast());
                rk[1] = _mm_loadu_si128(key.as_ptr().add(16).cast());
            }
            expand256_pair!(rk, 2, 0x01, false);
            expand256_pair!(rk, 4, 0x02, false);
            expand256_pair!(rk, 6, 0x04, false);
            expand256_pair!(rk, 8, 0x08, false);
            expand256_pair!(rk, 10, 0x10, false);
            expand256_pair!(rk, 12, 0x20, false);
            expand256_pair!(rk, 14, 0x40, true);
        }
        _ => return,
    }
    for (o, k) in out.iter_mut().zip(rk.iter()) {
        // SAFETY: `o` is a 16-byte array; unaligned store.
        unsafe { _mm_storeu_si128(o.as_mut_ptr().cast(), *k) };
    }
    // Round keys are secrets: wipe the stack copy (volatile writes via zeroize on the bytes).
    wipe_m128(&mut rk);
}

/// Equivalent inverse cipher schedule: reversed keys, inner ones through InvMixColumns.
///
/// # Safety
/// The CPU must support `aes` and `sse2`; `rounds` must be 10 or 14.
#[target_feature(enable = "aes,sse2")]
unsafe fn inverse_schedule(enc: &RoundKeys, dec: &mut RoundKeys, rounds: usize) {
    if rounds != 10 && rounds != 14 {
        return;
    }
    for i in 0..=rounds {
        // SAFETY: every entry is a 16-byte array; unaligned load and store.
        unsafe {
            let k = _mm_loadu_si128(enc[rounds - i].as_ptr().cast());
            let k = if i == 0 || i == rounds {
                k
            } else {
                _mm_aesimc_si128(k)
            };
            _mm_storeu_si128(dec[i].as_mut_ptr().cast(), k);
        }
    }
}

fn wipe_m128(regs: &mut [__m128i]) {
    for r in regs.iter_mut() {
        // SAFETY: `r` is a valid, aligned `__m128i`; a volatile write of zero to it.
        unsafe { core::ptr::write_volatile(r, _mm_setzero_si128()) };
    }
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
}

/// Broadcasts a 16-byte round key to all four lanes.
#[target_feature(enable = "avx512f")]
fn bcast(k: &[u8; 16]) -> __m512i {
    // SAFETY: `k` is 16 readable bytes; unaligned load.
    _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(k.as_ptr().cast()) })
}

/// Multiplies each 128-bit lane by x^K in GF(2^128) (0 < K < 57, `KC = 64 - K`).
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn mul_xk<const K: u32, const KC: u32>(t: __m512i, poly: __m512i) -> __m512i {
    let shifted = _mm512_slli_epi64::<K>(t);
    // The top K bits of each quadword, moved to the other quadword of the lane: the low
    // quadword's carry goes into the high one; the high quadword's overflow past x^127 lands in
    // the low position, where it is reduced by a carry-less multiply with 0x87.
    let carries = _mm512_shuffle_epi32::<0x4e>(_mm512_srli_epi64::<KC>(t));
    let into_high = _mm512_maskz_mov_epi64(0xaa, carries);
    let reduced = _mm512_clmulepi64_epi128::<0x00>(carries, poly);
    _mm512_ternarylogic_epi64::<0x96>(shifted, into_high, reduced)
}

/// Multiplies each 128-bit lane by x^(8·N) (1 <= N <= 8, `R = 16 - N`): a byte shift of the
/// whole lane, plus the N bytes shifted out times 0x87 (at most 8·N + 7 bits, so no second
/// reduction). Four instructions, one of them a carry-less multiply.
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn mul_x8n<const N: i32, const R: i32>(t: __m512i, poly: __m512i) -> __m512i {
    let out = _mm512_bsrli_epi128::<R>(t);
    let reduced = _mm512_clmulepi64_epi128::<0x00>(out, poly);
    _mm512_xor_si512(_mm512_bslli_epi128::<N>(t), reduced)
}

/// Lanes [T, T·x, T·x², T·x³] from a register holding T in every lane.
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn spread(t: __m512i, poly: __m512i) -> __m512i {
    let counts = _mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0);
    let rev = _mm512_set_epi64(61, 61, 62, 62, 63, 63, 64, 64);
    let shifted = _mm512_sllv_epi64(t, counts);
    // A shift count of 64 yields 0, so lane 0 gets no carries.
    let carries = _mm512_shuffle_epi32::<0x4e>(_mm512_srlv_epi64(t, rev));
    let into_high = _mm512_maskz_mov_epi64(0xaa, carries);
    let reduced = _mm512_clmulepi64_epi128::<0x00>(carries, poly);
    _mm512_ternarylogic_epi64::<0x96>(shifted, into_high, reduced)
}

/// The fused XTS pass.
///
/// # Safety
/// - The CPU supports every feature enabled below (guaranteed by a `VaesXts` existing).
/// - `src` and `dst` are valid for reads resp. writes of `len` bytes, and are either equal or
///   non-overlapping.
/// - `len` is a multiple of `sector_size`, which is a non-zero multiple of 512.
#[target_feature(enable = "avx512f,avx512bw,vaes,vpclmulqdq,aes,pclmulqdq,sse2")]
unsafe fn xts<const ENC: bool, const ROUNDS: usize>(
    keys: &VaesXts,
    src: *const u8,
    dst: *mut u8,
    len: usize,
    sector_size: usize,
    first_iv: u64,
    ivs_per_sector: u64,
) {
    let poly = _mm512_set_epi64(0, 0x87, 0, 0x87, 0, 0x87, 0, 0x87);
    let data_keys = keys.schedule(if ENC {
        Schedule::Encrypt
    } else {
        Schedule::Decrypt
    });
    let mut rk = [_mm512_setzero_si512(); 15];
    for (r, k) in rk.iter_mut().zip(data_keys.iter()).take(ROUNDS + 1) {
        *r = bcast(k);
    }
    let sectors = len / sector_size;
    let steps_per_sector = sector_size / STEP_BYTES;
    // Start tweaks of up to 16 sectors, as 16 consecutive 16-byte blocks. Two buffers: the
    // next batch's tweaks are computed before the current batch is processed, so their AES
    // latency overlaps with the current batch instead of stalling its first sector.
    let mut starts = [[0u8; 256]; 2];
    let tweak_keys = keys.schedule(Schedule::Tweak);
    let offsets = iv_offsets(ivs_per_sector);
    let batch_ivs = ivs_per_sector.wrapping_mul(16);
    let mut iv = first_iv;
    let mut cur = 0;
    if sectors > 0 {
        start_tweaks::<ROUNDS>(tweak_keys, iv, &offsets, &mut starts[0]);
    }
    let mut sector = 0;
    while sector < sectors {
        let batch = (sectors - sector).min(16);
        iv = iv.wrapping_add(batch_ivs);
        if sector + batch < sectors {
            start_tweaks::<ROUNDS>(tweak_keys, iv, &offsets, &mut starts[cur ^ 1]);
        }
        let starts_now = &starts[cur];
        for j in 0..batch {
            // SAFETY: `j < 16`, so `starts[16 * j..16 * j + 16]` is inside the 256-byte array.
            let t0 = unsafe { _mm_loadu_si128(starts_now.as_ptr().add(16 * j).cast()) };
            let t = spread(_mm512_broadcast_i32x4(t0), poly);
            let t4 = mul_xk::<4, 60>(t, poly);
            let mut tw = [
                t,
                t4,
                mul_x8n::<1, 15>(t, poly),
                mul_x8n::<1, 15>(t4, poly),
                mul_x8n::<2, 14>(t, poly),
                mul_x8n::<2, 14>(t4, poly),
                mul_x8n::<3, 13>(t, poly),
                mul_x8n::<3, 13>(t4, poly),
            ];
            let base = (sector + j) * sector_size;
            for step in 0..steps_per_sector {
                let off = base + step * STEP_BYTES;
                // SAFETY: `off + 512 <= sectors * sector_size == len`, so the step lies inside
                // both buffers (caller's contract). The prefetch address may lie past the end;
                // prefetching never faults, and `wrapping_add` keeps the pointer math defined.
                unsafe {
                    let s = src.add(off);
                    let d = dst.add(off);
                    _mm_prefetch::<_MM_HINT_T0>(s.wrapping_add(2048).cast());
                    _mm_prefetch::<_MM_HINT_T0>(s.wrapping_add(2048 + 256).cast());
                    let mut x = [_mm512_setzero_si512(); 8];
                    for (i, x) in x.iter_mut().enumerate() {
                        let v = _mm512_loadu_si512(s.add(64 * i).cast());
                        *x = _mm512_ternarylogic_epi64::<0x96>(v, tw[i], rk[0]);
                    }
                    middle_rounds::<ENC, ROUNDS>(&mut x, &rk);
                    for (i, x) in x.iter().enumerate() {
                        let last = _mm512_xor_si512(rk[ROUNDS], tw[i]);
                        let y = if ENC {
                            _mm512_aesenclast_epi128(*x, last)
                        } else {
                            _mm512_aesdeclast_epi128(*x, last)
                        };
                        _mm512_storeu_si512(d.add(64 * i).cast(), y);
                    }
                }
                if step + 1 < steps_per_sector {
                    // Spelled out: as a loop over the array LLVM kept `tw` in memory.
                    tw = [
                        mul_x8n::<4, 12>(tw[0], poly),
                        mul_x8n::<4, 12>(tw[1], poly),
                        mul_x8n::<4, 12>(tw[2], poly),
                        mul_x8n::<4, 12>(tw[3], poly),
                        mul_x8n::<4, 12>(tw[4], poly),
                        mul_x8n::<4, 12>(tw[5], poly),
                        mul_x8n::<4, 12>(tw[6], poly),
                        mul_x8n::<4, 12>(tw[7], poly),
                    ];
                }
            }
        }
        sector += batch;
        cur ^= 1;
    }
    // Start tweaks are derived from the tweak key; do not leave them on the stack. The round
    // key registers' stack copy (`rk`) likewise.
    starts.zeroize();
    for r in rk.iter_mut() {
        // SAFETY: `r` is a valid, aligned `__m512i` local; a volatile write of zero.
        unsafe { core::ptr::write_volatile(r, _mm512_setzero_si512()) };
    }
}

/// Steps (512 bytes of data each) whose tweaks [`xts_buffered`] computes at once: 8 KiB of
/// tweaks, which stay in L1 next to the 8 KiB of data they are used on.
const TWEAK_STEPS: usize = 16;

/// Whether [`xts_buffered`] handles `sector_size` (one sector's tweaks fit the tweak buffer).
fn buffered_supports(sector_size: usize) -> bool {
    sector_size.is_multiple_of(STEP_BYTES) && sector_size / STEP_BYTES <= TWEAK_STEPS
}

/// The fused XTS pass with the tweaks computed ahead into an L1-resident buffer: for up to
/// [`TWEAK_STEPS`] steps (16 sectors of 512 bytes, 2 of 4096) all tweaks are computed first, in
/// a loop whose sectors do not depend on each other, then the AES pass runs over those steps,
/// loading each tweak from the buffer. With small sectors, [`xts`] starts every sector with a
/// chain of dependent tweak multiplications (about 40 cycles) that the AES rounds wait for; if
/// the out-of-order window cannot hide it behind the previous sector, this pass, whose AES work
/// depends on nothing but the data, should do better. On Zen 4 computing the tweaks in a loop
/// of their own did not help (they then run alone, not beside AES work); for 512-byte sectors
/// [`xts_512`] interleaves them with the rounds instead, which does: see [`Pass::Auto`]. Same
/// results as [`xts`], bit for bit.
///
/// # Safety
/// As for [`xts`], and `buffered_supports(sector_size)`.
#[target_feature(enable = "avx512f,avx512bw,vaes,vpclmulqdq,aes,pclmulqdq,sse2")]
unsafe fn xts_buffered<const ENC: bool, const ROUNDS: usize>(
    keys: &VaesXts,
    src: *const u8,
    dst: *mut u8,
    len: usize,
    sector_size: usize,
    first_iv: u64,
    ivs_per_sector: u64,
) {
    if sector_size == STEP_BYTES {
        // SAFETY: the caller's contract, and one step per sector.
        unsafe { xts_512::<ENC, ROUNDS>(keys, src, dst, len, first_iv, ivs_per_sector) };
        return;
    }
    let poly = _mm512_set_epi64(0, 0x87, 0, 0x87, 0, 0x87, 0, 0x87);
    let data_keys = keys.schedule(if ENC {
        Schedule::Encrypt
    } else {
        Schedule::Decrypt
    });
    let mut rk = [_mm512_setzero_si512(); 15];
    for (r, k) in rk.iter_mut().zip(data_keys.iter()).take(ROUNDS + 1) {
        *r = bcast(k);
    }
    let sectors = len / sector_size;
    let steps_per_sector = (sector_size / STEP_BYTES).clamp(1, TWEAK_STEPS);
    let sectors_per_fill = TWEAK_STEPS / steps_per_sector;
    // Each step's eight tweak registers; wiped before returning.
    let mut tweaks = [[_mm512_setzero_si512(); 8]; TWEAK_STEPS];
    // Start tweaks of up to 16 sectors, double-buffered as in `xts`.
    let mut starts = [[0u8; 256]; 2];
    let tweak_keys = keys.schedule(Schedule::Tweak);
    let offsets = iv_offsets(ivs_per_sector);
    let batch_ivs = ivs_per_sector.wrapping_mul(16);
    let mut iv = first_iv;
    let mut cur = 0;
    if sectors > 0 {
        start_tweaks::<ROUNDS>(tweak_keys, iv, &offsets, &mut starts[0]);
    }
    let mut sector = 0;
    while sector < sectors {
        let batch = (sectors - sector).min(16);
        iv = iv.wrapping_add(batch_ivs);
        if sector + batch < sectors {
            start_tweaks::<ROUNDS>(tweak_keys, iv, &offsets, &mut starts[cur ^ 1]);
        }
        let starts_now = &starts[cur];
        let mut j = 0;
        while j < batch {
            let fill = (batch - j).min(sectors_per_fill);
            for f in 0..fill {
                // SAFETY: `j + f < batch <= 16`, so the 16 bytes lie inside the 256-byte array.
                let t0 = unsafe { _mm_loadu_si128(starts_now.as_ptr().add(16 * (j + f)).cast()) };
                let t = spread(_mm512_broadcast_i32x4(t0), poly);
                let t4 = mul_xk::<4, 60>(t, poly);
                let mut tw = [
                    t,
                    t4,
                    mul_x8n::<1, 15>(t, poly),
                    mul_x8n::<1, 15>(t4, poly),
                    mul_x8n::<2, 14>(t, poly),
                    mul_x8n::<2, 14>(t4, poly),
                    mul_x8n::<3, 13>(t, poly),
                    mul_x8n::<3, 13>(t4, poly),
                ];
                let first = f * steps_per_sector;
                for (step, slot) in tweaks[first..first + steps_per_sector]
                    .iter_mut()
                    .enumerate()
                {
                    *slot = tw;
                    if step + 1 < steps_per_sector {
                        tw = [
                            mul_x8n::<4, 12>(tw[0], poly),
                            mul_x8n::<4, 12>(tw[1], poly),
                            mul_x8n::<4, 12>(tw[2], poly),
                            mul_x8n::<4, 12>(tw[3], poly),
                            mul_x8n::<4, 12>(tw[4], poly),
                            mul_x8n::<4, 12>(tw[5], poly),
                            mul_x8n::<4, 12>(tw[6], poly),
                            mul_x8n::<4, 12>(tw[7], poly),
                        ];
                    }
                }
            }
            let base = (sector + j) * sector_size;
            for (step, tw) in tweaks[..fill * steps_per_sector].iter().enumerate() {
                let off = base + step * STEP_BYTES;
                // SAFETY: the steps of sectors `sector + j .. sector + j + fill` end at
                // `(sector + j + fill) * sector_size <= len`, so the step lies inside both
                // buffers (caller's contract). Prefetching past the end never faults, and
                // `wrapping_add` keeps that pointer math defined.
                unsafe {
                    let s = src.add(off);
                    let d = dst.add(off);
                    _mm_prefetch::<_MM_HINT_T0>(s.wrapping_add(2048).cast());
                    _mm_prefetch::<_MM_HINT_T0>(s.wrapping_add(2048 + 256).cast());
                    let mut x = [_mm512_setzero_si512(); 8];
                    for (i, x) in x.iter_mut().enumerate() {
                        let v = _mm512_loadu_si512(s.add(64 * i).cast());
                        *x = _mm512_ternarylogic_epi64::<0x96>(v, tw[i], rk[0]);
                    }
                    middle_rounds::<ENC, ROUNDS>(&mut x, &rk);
                    for (i, x) in x.iter().enumerate() {
                        let last = _mm512_xor_si512(rk[ROUNDS], tw[i]);
                        let y = if ENC {
                            _mm512_aesenclast_epi128(*x, last)
                        } else {
                            _mm512_aesdeclast_epi128(*x, last)
                        };
                        _mm512_storeu_si512(d.add(64 * i).cast(), y);
                    }
                }
            }
            j += fill;
        }
        sector += batch;
        cur ^= 1;
    }
    // Tweaks and start tweaks are derived from the tweak key; round keys are the data key.
    starts.zeroize();
    for r in tweaks.iter_mut().flatten().chain(rk.iter_mut()) {
        // SAFETY: `r` is a valid, aligned `__m512i` local; a volatile write of zero.
        unsafe { core::ptr::write_volatile(r, _mm512_setzero_si512()) };
    }
}

/// Emits `$op` (vaesenc/vaesdec) for each key in turn over eight registers, round-major, so
/// eight independent AES operations are always in flight (VAES: ~4 cycles latency, 2 per cycle).
/// Written as inline assembly because LLVM, under the register pressure of AES-256 plus eight
/// tweak registers, otherwise schedules each register's rounds back to back and spills.
macro_rules! rounds_asm {
    ($op:literal, $x:ident, $rk:ident, [$($k:ident = $i:literal),+]) => {
        // SAFETY: register-only instructions (no memory, stack or flags); the enclosing function
        // enables `vaes` and `avx512f`, and its callers run only after those were detected.
        unsafe {
            core::arch::asm!(
                $(
                    concat!($op, " {x0}, {x0}, {", stringify!($k), "}"),
                    concat!($op, " {x1}, {x1}, {", stringify!($k), "}"),
                    concat!($op, " {x2}, {x2}, {", stringify!($k), "}"),
                    concat!($op, " {x3}, {x3}, {", stringify!($k), "}"),
                    concat!($op, " {x4}, {x4}, {", stringify!($k), "}"),
                    concat!($op, " {x5}, {x5}, {", stringify!($k), "}"),
                    concat!($op, " {x6}, {x6}, {", stringify!($k), "}"),
                    concat!($op, " {x7}, {x7}, {", stringify!($k), "}"),
                )+
                x0 = inout(zmm_reg) $x[0],
                x1 = inout(zmm_reg) $x[1],
                x2 = inout(zmm_reg) $x[2],
                x3 = inout(zmm_reg) $x[3],
                x4 = inout(zmm_reg) $x[4],
                x5 = inout(zmm_reg) $x[5],
                x6 = inout(zmm_reg) $x[6],
                x7 = inout(zmm_reg) $x[7],
                $($k = in(zmm_reg) $rk[$i],)+
                options(pure, nomem, nostack, preserves_flags),
            )
        }
    };
}

/// AES rounds 1..ROUNDS-1 (all but the first key addition and the last round) on 8 registers.
#[target_feature(enable = "avx512f,vaes")]
#[inline]
fn middle_rounds<const ENC: bool, const ROUNDS: usize>(x: &mut [__m512i; 8], rk: &[__m512i; 15]) {
    match (ENC, ROUNDS) {
        (true, 10) => rounds_asm!(
            "vaesenc",
            x,
            rk,
            [
                k1 = 1,
                k2 = 2,
                k3 = 3,
                k4 = 4,
                k5 = 5,
                k6 = 6,
                k7 = 7,
                k8 = 8,
                k9 = 9
            ]
        ),
        (false, 10) => rounds_asm!(
            "vaesdec",
            x,
            rk,
            [
                k1 = 1,
                k2 = 2,
                k3 = 3,
                k4 = 4,
                k5 = 5,
                k6 = 6,
                k7 = 7,
                k8 = 8,
                k9 = 9
            ]
        ),
        (true, _) => rounds_asm!(
            "vaesenc",
            x,
            rk,
            [
                k1 = 1,
                k2 = 2,
                k3 = 3,
                k4 = 4,
                k5 = 5,
                k6 = 6,
                k7 = 7,
                k8 = 8,
                k9 = 9,
                k10 = 10,
                k11 = 11,
                k12 = 12,
                k13 = 13
            ]
        ),
        (false, _) => rounds_asm!(
            "vaesdec",
            x,
            rk,
            [
                k1 = 1,
                k2 = 2,
                k3 = 3,
                k4 = 4,
                k5 = 5,
                k6 = 6,
                k7 = 7,
                k8 = 8,
                k9 = 9,
                k10 = 10,
                k11 = 11,
                k12 = 12,
                k13 = 13
            ]
        ),
    }
}

/// [`xts_buffered`] for 512-byte sectors (one step each), software-pipelined: while the AES
/// rounds of sector `k` of a group of 16 run, the tweaks of sector `k` of the next group are
/// computed (between the two halves of the rounds) and stored, so tweak work fills the gaps of
/// the AES pipeline instead of running on its own.
///
/// # Safety
/// As for [`xts`], with `sector_size == 512`.
#[target_feature(enable = "avx512f,avx512bw,vaes,vpclmulqdq,aes,pclmulqdq,sse2")]
unsafe fn xts_512<const ENC: bool, const ROUNDS: usize>(
    keys: &VaesXts,
    src: *const u8,
    dst: *mut u8,
    len: usize,
    first_iv: u64,
    ivs_per_sector: u64,
) {
    let poly = _mm512_set_epi64(0, 0x87, 0, 0x87, 0, 0x87, 0, 0x87);
    let data_keys = keys.schedule(if ENC {
        Schedule::Encrypt
    } else {
        Schedule::Decrypt
    });
    let mut rk = [_mm512_setzero_si512(); 15];
    for (r, k) in rk.iter_mut().zip(data_keys.iter()).take(ROUNDS + 1) {
        *r = bcast(k);
    }
    let sectors = len / STEP_BYTES;
    let mut tweaks = [[[_mm512_setzero_si512(); 8]; 16]; 2];
    let mut starts = [0u8; 256];
    let tweak_keys = keys.schedule(Schedule::Tweak);
    let offsets = iv_offsets(ivs_per_sector);
    let iv_at = |sector: usize| {
        // `sector < len / 512` fits u64 on every target; wrapping like plain64.
        first_iv.wrapping_add(ivs_per_sector.wrapping_mul(sector as u64))
    };
    let sector_tweaks = |t0: __m128i| {
        let t = spread(_mm512_broadcast_i32x4(t0), poly);
        let t4 = mul_xk::<4, 60>(t, poly);
        [
            t,
            t4,
            mul_x8n::<1, 15>(t, poly),
            mul_x8n::<1, 15>(t4, poly),
            mul_x8n::<2, 14>(t, poly),
            mul_x8n::<2, 14>(t4, poly),
            mul_x8n::<3, 13>(t, poly),
            mul_x8n::<3, 13>(t4, poly),
        ]
    };
    if sectors > 0 {
        start_tweaks::<ROUNDS>(tweak_keys, iv_at(0), &offsets, &mut starts);
        for (k, slot) in tweaks[0].iter_mut().enumerate().take(sectors.min(16)) {
            // SAFETY: `k < 16`: 16 bytes inside the 256-byte array.
            *slot = sector_tweaks(unsafe { _mm_loadu_si128(starts.as_ptr().add(16 * k).cast()) });
        }
    }
    let mut cur = 0;
    let mut sector = 0;
    while sector < sectors {
        let group = (sectors - sector).min(16);
        let next = (sectors - sector - group).min(16);
        if next > 0 {
            start_tweaks::<ROUNDS>(tweak_keys, iv_at(sector + group), &offsets, &mut starts);
        }
        let (a, b) = tweaks.split_at_mut(1);
        let (now, later) = if cur == 0 {
            (&a[0], &mut b[0])
        } else {
            (&b[0], &mut a[0])
        };
        for (k, tw) in now.iter().enumerate().take(group) {
            let off = (sector + k) * STEP_BYTES;
            // SAFETY: `sector + k < sectors`, so the 512-byte step at `off` lies inside both
            // buffers (caller's contract); prefetching past the end never faults.
            unsafe {
                let s = src.add(off);
                let d = dst.add(off);
                _mm_prefetch::<_MM_HINT_T0>(s.wrapping_add(2048).cast());
                _mm_prefetch::<_MM_HINT_T0>(s.wrapping_add(2048 + 256).cast());
                let mut x = [_mm512_setzero_si512(); 8];
                for (i, x) in x.iter_mut().enumerate() {
                    let v = _mm512_loadu_si512(s.add(64 * i).cast());
                    *x = _mm512_ternarylogic_epi64::<0x96>(v, tw[i], rk[0]);
                }
                first_half_rounds::<ENC, ROUNDS>(&mut x, &rk);
                if k < next {
                    // `k < 16`: 16 bytes inside the 256-byte array.
                    later[k] = sector_tweaks(_mm_loadu_si128(starts.as_ptr().add(16 * k).cast()));
                }
                second_half_rounds::<ENC, ROUNDS>(&mut x, &rk);
                for (i, x) in x.iter().enumerate() {
                    let last = _mm512_xor_si512(rk[ROUNDS], tw[i]);
                    let y = if ENC {
                        _mm512_aesenclast_epi128(*x, last)
                    } else {
                        _mm512_aesdeclast_epi128(*x, last)
                    };
                    _mm512_storeu_si512(d.add(64 * i).cast(), y);
                }
            }
        }
        sector += group;
        cur ^= 1;
    }
    starts.zeroize();
    for r in tweaks.iter_mut().flatten().flatten().chain(rk.iter_mut()) {
        // SAFETY: `r` is a valid, aligned `__m512i` local; a volatile write of zero.
        unsafe { core::ptr::write_volatile(r, _mm512_setzero_si512()) };
    }
}

/// Rounds 1..=ROUNDS/2 of [`middle_rounds`].
#[target_feature(enable = "avx512f,vaes")]
#[inline]
fn first_half_rounds<const ENC: bool, const ROUNDS: usize>(
    x: &mut [__m512i; 8],
    rk: &[__m512i; 15],
) {
    match (ENC, ROUNDS) {
        (true, 10) => rounds_asm!("vaesenc", x, rk, [k1 = 1, k2 = 2, k3 = 3, k4 = 4, k5 = 5]),
        (false, 10) => rounds_asm!("vaesdec", x, rk, [k1 = 1, k2 = 2, k3 = 3, k4 = 4, k5 = 5]),
        (true, _) => rounds_asm!(
            "vaesenc",
            x,
            rk,
            [k1 = 1, k2 = 2, k3 = 3, k4 = 4, k5 = 5, k6 = 6, k7 = 7]
        ),
        (false, _) => rounds_asm!(
            "vaesdec",
            x,
            rk,
            [k1 = 1, k2 = 2, k3 = 3, k4 = 4, k5 = 5, k6 = 6, k7 = 7]
        ),
    }
}

/// Rounds ROUNDS/2+1..ROUNDS-1 of [`middle_rounds`].
#[target_feature(enable = "avx512f,vaes")]
#[inline]
fn second_half_rounds<const ENC: bool, const ROUNDS: usize>(
    x: &mut [__m512i; 8],
    rk: &[__m512i; 15],
) {
    match (ENC, ROUNDS) {
        (true, 10) => rounds_asm!("vaesenc", x, rk, [k6 = 6, k7 = 7, k8 = 8, k9 = 9]),
        (false, 10) => rounds_asm!("vaesdec", x, rk, [k6 = 6, k7 = 7, k8 = 8, k9 = 9]),
        (true, _) => rounds_asm!(
            "vaesenc",
            x,
            rk,
            [k8 = 8, k9 = 9, k10 = 10, k11 = 11, k12 = 12, k13 = 13]
        ),
        (false, _) => rounds_asm!(
            "vaesdec",
            x,
            rk,
            [k8 = 8, k9 = 9, k10 = 10, k11 = 11, k12 = 12, k13 = 13]
        ),
    }
}

/// The offsets `(4g + j) · step` of IV `4g + j` of a batch from the batch's first IV, in the low
/// quadword of lane `j` of register `g` (high quadwords zero).
#[target_feature(enable = "avx512f")]
fn iv_offsets(step: u64) -> [__m512i; 4] {
    let mut lanes = [0u64; 32];
    let mut next = 0u64;
    for pair in lanes.chunks_exact_mut(2) {
        pair[0] = next;
        next = next.wrapping_add(step);
    }
    let mut out = [_mm512_setzero_si512(); 4];
    for (i, o) in out.iter_mut().enumerate() {
        // SAFETY: `lanes` is 32 u64 = 256 bytes; register `i` reads bytes 64i..64i+64.
        *o = unsafe { _mm512_loadu_si512(lanes.as_ptr().add(8 * i).cast()) };
    }
    out
}

/// Encrypts the 16 IVs `iv + offsets` (plain64: little-endian, zero upper half; additions wrap
/// modulo 2^64 like the IVs themselves) with the tweak key into `out`.
#[target_feature(enable = "avx512f,avx512bw,vaes,sse2")]
fn start_tweaks<const ROUNDS: usize>(
    tweak_keys: &RoundKeys,
    iv: u64,
    offsets: &[__m512i; 4],
    out: &mut [u8; 256],
) {
    // Bit-for-bit reinterpretation for the intrinsic; the additions are modulo 2^64 either way.
    let base = _mm512_maskz_set1_epi64(0x55, i64::from_ne_bytes(iv.to_ne_bytes()));
    let k0 = bcast(&tweak_keys[0]);
    let mut x = [
        _mm512_xor_si512(_mm512_add_epi64(base, offsets[0]), k0),
        _mm512_xor_si512(_mm512_add_epi64(base, offsets[1]), k0),
        _mm512_xor_si512(_mm512_add_epi64(base, offsets[2]), k0),
        _mm512_xor_si512(_mm512_add_epi64(base, offsets[3]), k0),
    ];
    for k in &tweak_keys[1..ROUNDS] {
        let k = bcast(k);
        for x in x.iter_mut() {
            *x = _mm512_aesenc_epi128(*x, k);
        }
    }
    let last = bcast(&tweak_keys[ROUNDS]);
    for (i, x) in x.iter().enumerate() {
        let y = _mm512_aesenclast_epi128(*x, last);
        // SAFETY: `out` has 256 bytes; register `i` writes bytes 64i..64i+64.
        unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(64 * i).cast(), y) };
    }
}
