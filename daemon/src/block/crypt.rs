//! The crypt layer: a `BlockDevice` that encrypts whole sectors with AES-XTS on their way to any
//! other `BlockDevice` (the nbdkit-filter idea). Knows sectors and keys, not NBD or LUKS2.
//!
//! - Ciphertext buffers are the layer's own, never the caller's.
//! - Requests that do not cover whole sectors are served by read-modify-write of the edge sectors
//!   under a range lock, so overlapping unaligned writes from different connections cannot lose
//!   each other's bytes. Every write takes the lock for the sectors it touches; reads do not
//!   (NBD gives no ordering between concurrent reads and writes).
//! - WRITE_ZEROES writes encrypted zeroes: a hole in the backing store would decrypt to garbage.
//! - Extents are reported as one allocated run: allocation of ciphertext would leak plaintext
//!   layout.

use std::sync::{Arc, Condvar, Mutex};

use super::{BlockDevice, Caps, Error, ErrorKind, Extent, Op, ZeroFlags};
use crate::crypto::xts::SectorCipher;

/// Largest buffer one zeroing or RMW step works on.
const ZERO_CHUNK: u64 = 1 << 20;

/// Where the encrypted data segment lives in the backing device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Byte offset of the first data sector in the backing device.
    pub offset: u64,
    /// Bytes of plaintext exported; a multiple of the sector size.
    pub size: u64,
    /// Added to the IV counter, in 512-byte units (LUKS2 `iv_tweak`).
    pub iv_tweak: u64,
}

pub struct CryptDevice {
    inner: Arc<dyn BlockDevice>,
    cipher: SectorCipher,
    segment: Segment,
    sector: u64,
    allow_discards: bool,
    locks: RangeLocks,
}

impl CryptDevice {
    /// `segment` must lie inside `inner` and be a whole number of sectors.
    pub fn new(
        inner: Arc<dyn BlockDevice>,
        cipher: SectorCipher,
        segment: Segment,
        allow_discards: bool,
    ) -> Result<CryptDevice, Error> {
        let sector = cipher.sector_size() as u64;
        let fits = segment.offset.checked_add(segment.size).is_some_and(|end| end <= inner.size());
        if !fits || segment.size % sector != 0 || segment.offset % 512 != 0 {
            return Err(Error::new(ErrorKind::OutOfRange).at(Op::Open, segment.offset, segment.size));
        }
        Ok(CryptDevice { inner, cipher, segment, sector, allow_discards, locks: RangeLocks::default() })
    }

    /// IV of the sector starting at plaintext byte `offset` (a multiple of the sector size).
    fn iv(&self, offset: u64) -> u64 {
        self.segment.iv_tweak.wrapping_add(offset / 512)
    }

    fn align_down(&self, x: u64) -> u64 {
        x - x % self.sector
    }

    fn align_up(&self, x: u64) -> u64 {
        self.align_down(x + self.sector - 1)
    }

    fn is_aligned(&self, offset: u64, len: u64) -> bool {
        offset % self.sector == 0 && len % self.sector == 0
    }

    fn crypto_err(op: Op, offset: u64, len: u64) -> Error {
        Error::new(ErrorKind::Corrupt).at(op, offset, len)
    }

    /// Read and decrypt whole sectors into `buf` (aligned offset and length).
    fn read_sectors(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.inner.read_at(buf, self.segment.offset + offset)?;
        self.cipher
            .decrypt_in_place(buf, self.iv(offset))
            .map_err(|_| Self::crypto_err(Op::Read, offset, buf.len() as u64))
    }

    /// Encrypt whole sectors of plaintext into a fresh buffer and write them.
    fn write_sectors(&self, plain: &[u8], offset: u64, fua: bool) -> Result<(), Error> {
        let mut cipher_text = vec![0u8; plain.len()];
        self.cipher
            .encrypt_into(plain, &mut cipher_text, self.iv(offset))
            .map_err(|_| Self::crypto_err(Op::Write, offset, plain.len() as u64))?;
        self.inner.write_at(&cipher_text, self.segment.offset + offset, fua)
    }

    /// Write `data` at an unaligned `offset`: read the covering sectors, merge, write back.
    /// The caller holds the range lock for the covering sectors.
    fn read_modify_write(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), Error> {
        let start = self.align_down(offset);
        let end = self.align_up(offset + data.len() as u64);
        let mut plain = vec![0u8; (end - start) as usize];
        let head = (offset - start) as usize;
        // Only the first and last sectors hold bytes we keep; the middle is overwritten anyway.
        let sector = self.sector as usize;
        self.read_sectors(&mut plain[..sector], start)?;
        if end - start > self.sector {
            let last = plain.len() - sector;
            self.read_sectors(&mut plain[last..], end - self.sector)?;
        }
        plain[head..head + data.len()].copy_from_slice(data);
        self.write_sectors(&plain, start, fua)
    }
}

impl BlockDevice for CryptDevice {
    fn size(&self) -> u64 {
        self.segment.size
    }

    fn caps(&self) -> Caps {
        let inner = self.inner.caps();
        Caps {
            read_only: inner.read_only,
            trim: self.allow_discards && inner.trim,
            // Zeroing costs a full encrypted write.
            fast_zero: false,
            // Unaligned requests are served by read-modify-write, so any alignment works.
            min_block: 1,
            preferred_block: self.sector as u32,
            rotational: inner.rotational,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.segment.size) {
            return Err(Error::new(ErrorKind::OutOfRange).at(Op::Read, offset, len));
        }
        if self.is_aligned(offset, len) {
            return self.read_sectors(buf, offset);
        }
        let start = self.align_down(offset);
        let end = self.align_up(offset + len);
        let mut plain = vec![0u8; (end - start) as usize];
        self.read_sectors(&mut plain, start)?;
        let head = (offset - start) as usize;
        buf.copy_from_slice(&plain[head..head + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), Error> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.segment.size) {
            return Err(Error::new(ErrorKind::NoSpace).at(Op::Write, offset, len));
        }
        if len == 0 {
            return Ok(());
        }
        let start = self.align_down(offset);
        let end = self.align_up(offset + len);
        let _guard = self.locks.lock(start, end);
        if self.is_aligned(offset, len) {
            self.write_sectors(buf, offset, fua)
        } else {
            self.read_modify_write(buf, offset, fua)
        }
    }

    fn flush(&self) -> Result<(), Error> {
        self.inner.flush()
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<(), Error> {
        if !self.caps().trim {
            return Err(Error::new(ErrorKind::Unsupported).at(Op::Trim, offset, length));
        }
        // TRIM is a hint: discard only whole sectors inside the range and leave the edges.
        let start = self.align_up(offset);
        let end = self.align_down(offset.saturating_add(length));
        if end > start {
            let _guard = self.locks.lock(start, end);
            self.inner.trim(self.segment.offset + start, end - start, fua)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<(), Error> {
        if flags.fast_only {
            return Err(Error::new(ErrorKind::NotFast).at(Op::Zero, offset, length));
        }
        if offset.checked_add(length).is_none_or(|end| end > self.segment.size) {
            return Err(Error::new(ErrorKind::NoSpace).at(Op::Zero, offset, length));
        }
        let zeroes = vec![0u8; ZERO_CHUNK.min(length) as usize];
        let mut pos = offset;
        let end = offset + length;
        while pos < end {
            // Chunks after the first start sector-aligned, so only the edges need RMW.
            let step_end = (self.align_down(pos) + ZERO_CHUNK).min(end);
            let n = (step_end - pos) as usize;
            self.write_at(&zeroes[..n], pos, false)?;
            pos = step_end;
        }
        if flags.fua {
            self.inner.flush()?;
        }
        Ok(())
    }

    fn cache(&self, offset: u64, length: u64) -> Result<(), Error> {
        self.inner.cache(self.segment.offset + offset, length)
    }

    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, Error> {
        let length = length.min(self.segment.size.saturating_sub(offset)).max(1);
        Ok(vec![Extent { length, hole: false, zero: false }])
    }
}

/// Exclusive locks on half-open byte ranges. Writers to disjoint ranges never wait.
#[derive(Default)]
struct RangeLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: Condvar,
}

struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl RangeLocks {
    fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        // Poisoning only means a panic while the list was held; the list itself stays valid.
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while held.iter().any(|&(s, e)| s < end && start < e) {
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        held.push((start, end));
        RangeGuard { locks: self, range: (start, end) }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = held.iter().position(|r| *r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.released.notify_all();
    }
}
