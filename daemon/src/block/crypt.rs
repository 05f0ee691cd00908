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

use super::{
    BlockDevice, Caps, Completion, Error, ErrorKind, Extent, Op, StartOp, Started, Ticket,
    ZeroFlags,
};
use crate::crypto::xts::{SectorCipher, XtsError};
use crate::metrics::METRICS;
use crate::sys::LockedBox;

/// Largest buffer one zeroing or RMW step works on.
const ZERO_CHUNK: u64 = 1 << 20;
/// Alignment of ciphertext buffers (O_DIRECT).
const PAGE: usize = 4096;
/// Bytes the data path encrypts or decrypts per step, right before writing or right after
/// reading them, while they are still in the CPU caches: a separate pass over a whole request
/// would find its start evicted from L1/L2 by the time it gets there. Also the size of the
/// per-thread ciphertext buffer, so a large WRITE no longer needs a ciphertext copy of itself.
pub const CHUNK: usize = 256 << 10;

thread_local! {
    /// Each I/O thread's ciphertext buffer (CHUNK bytes + alignment), reused across requests:
    /// a fresh allocation would be fresh pages, and page faults would cost more than the AES.
    static CIPHERTEXT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

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

/// What the crypt layer needs of a sector cipher. [`SectorCipher`] (AES-XTS) is the one the
/// daemon uses; the parameter exists so the crypt-layer benchmark can run the same layer with a
/// cipher that does nothing, and see what the data path costs apart from the AES work.
pub trait SectorTransform: Send + Sync {
    /// Bytes per sector (512..=4096).
    fn sector_size(&self) -> usize;
    /// Encrypts whole sectors of `src` into `dst` (same length); IVs as in [`SectorCipher`].
    fn encrypt_into(&self, src: &[u8], dst: &mut [u8], first_iv: u64) -> Result<(), XtsError>;
    /// Encrypts whole sectors in place.
    fn encrypt_in_place(&self, data: &mut [u8], first_iv: u64) -> Result<(), XtsError>;
    /// Decrypts whole sectors in place.
    fn decrypt_in_place(&self, data: &mut [u8], first_iv: u64) -> Result<(), XtsError>;
    /// Which implementation runs (for metrics): "vaes512", "portable", ...
    fn implementation(&self) -> &'static str {
        "other"
    }
}

impl SectorTransform for SectorCipher {
    fn sector_size(&self) -> usize {
        SectorCipher::sector_size(self)
    }
    fn encrypt_into(&self, src: &[u8], dst: &mut [u8], first_iv: u64) -> Result<(), XtsError> {
        SectorCipher::encrypt_into(self, src, dst, first_iv)
    }
    fn encrypt_in_place(&self, data: &mut [u8], first_iv: u64) -> Result<(), XtsError> {
        SectorCipher::encrypt_in_place(self, data, first_iv)
    }
    fn decrypt_in_place(&self, data: &mut [u8], first_iv: u64) -> Result<(), XtsError> {
        SectorCipher::decrypt_in_place(self, data, first_iv)
    }
    fn implementation(&self) -> &'static str {
        SectorCipher::implementation(self)
    }
}

pub struct CryptDevice<C: SectorTransform = SectorCipher> {
    inner: Arc<dyn BlockDevice>,
    /// The expanded key schedule: in locked memory, wiped when the device drops (lock).
    cipher: LockedBox<C>,
    segment: Segment,
    sector: u64,
    allow_discards: bool,
    locks: RangeLocks,
    /// Bytes per read-and-decrypt / encrypt-and-write step: CHUNK unless a benchmark asks for
    /// less ([`CryptDevice::set_chunk_for_benchmarks`]); never more (the budget counts CHUNK).
    chunk: usize,
}

impl<C: SectorTransform> CryptDevice<C> {
    /// `segment` must lie inside `inner` and be a whole number of sectors.
    pub fn new(
        inner: Arc<dyn BlockDevice>,
        cipher: C,
        segment: Segment,
        allow_discards: bool,
    ) -> Result<CryptDevice<C>, Error> {
        crate::metrics::METRICS.set_xts_impl(cipher.implementation());
        let sector = cipher.sector_size() as u64;
        let fits = segment
            .offset
            .checked_add(segment.size)
            .is_some_and(|end| end <= inner.size());
        // SectorCipher guarantees a LUKS2 sector size; any other transform is checked here
        // (a zero would divide by zero below).
        let sector_ok = (512..=4096).contains(&sector) && sector.is_power_of_two();
        if !fits
            || !sector_ok
            || !segment.size.is_multiple_of(sector)
            || !segment.offset.is_multiple_of(512)
        {
            return Err(Error::new(ErrorKind::OutOfRange).at(
                Op::Open,
                segment.offset,
                segment.size,
            ));
        }
        let cipher = LockedBox::new(cipher);
        Ok(CryptDevice {
            inner,
            cipher,
            segment,
            sector,
            allow_discards,
            locks: RangeLocks::default(),
            chunk: CHUNK,
        })
    }

    /// Benchmarks only: the step size of the data path, clamped to one sector ..= [`CHUNK`].
    #[doc(hidden)]
    pub fn set_chunk_for_benchmarks(&mut self, bytes: usize) {
        let sector = self.cipher.sector_size();
        self.chunk = bytes.clamp(sector, CHUNK) / sector * sector;
    }

    /// IV of the sector starting at plaintext byte `offset` (a multiple of the sector size).
    fn iv(&self, offset: u64) -> u64 {
        self.segment.iv_tweak.wrapping_add(offset / 512)
    }

    fn align_down(&self, x: u64) -> u64 {
        x - x % self.sector
    }

    /// Saturating: `scratch_bytes` sizes a request before it is validated, so `x` may be any
    /// offset a client sent (found by the nbd_* fuzz targets: an offset near 2^64 overflowed).
    fn align_up(&self, x: u64) -> u64 {
        self.align_down(x.saturating_add(self.sector - 1))
    }

    fn is_aligned(&self, offset: u64, len: u64) -> bool {
        offset.is_multiple_of(self.sector) && len.is_multiple_of(self.sector)
    }

    /// A length inside one request's buffers (the request plus at most two sectors) as `usize`.
    fn mem_len(n: u64, op: Op, offset: u64) -> Result<usize, Error> {
        usize::try_from(n).map_err(|_| Error::new(ErrorKind::OutOfRange).at(op, offset, n))
    }

    fn crypto_err(op: Op, offset: u64, len: u64) -> Error {
        Error::new(ErrorKind::Corrupt).at(op, offset, len)
    }

    /// Read and decrypt whole sectors into `buf` (aligned offset and length), one CHUNK at a
    /// time: each chunk is decrypted right after it has been read.
    fn read_sectors(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.read_sectors_streaming(buf, offset, &mut |_| {})
    }

    /// [`read_sectors`](Self::read_sectors), handing each chunk to `ready` right after it has
    /// been decrypted, so the caller can send it while it is still in L2.
    fn read_sectors_streaming(
        &self,
        buf: &mut [u8],
        offset: u64,
        ready: &mut dyn FnMut(&[u8]),
    ) -> Result<(), Error> {
        let mut at = 0usize;
        for piece in buf.chunks_mut(self.chunk) {
            let off = offset + at as u64;
            self.inner.read_at(piece, self.segment.offset + off)?;
            let n = piece.len();
            METRICS
                .xts_chunk(false, n, || {
                    self.cipher.decrypt_in_place(piece, self.iv(off))
                })
                .map_err(|_| Self::crypto_err(Op::Read, off, n as u64))?;
            ready(piece);
            at += piece.len();
        }
        Ok(())
    }

    /// Encrypt whole sectors of plaintext into the layer's own buffer and write them, one
    /// CHUNK at a time: each chunk is written right after it has been encrypted. With `fua`
    /// and more than one chunk, the chunks are written plainly and then flushed once.
    fn write_sectors(&self, plain: &[u8], offset: u64, fua: bool) -> Result<(), Error> {
        CIPHERTEXT.with(|cell| {
            // Re-entrancy is impossible (the inner device never calls back into this layer), but
            // fall back to a fresh buffer rather than panic if it ever happened.
            let mut fresh = Vec::new();
            let mut borrowed = cell.try_borrow_mut();
            let buf = match borrowed.as_mut() {
                Ok(b) => &mut **b,
                Err(_) => &mut fresh,
            };
            let step = plain.len().min(self.chunk);
            // Page-aligned, so a backend using O_DIRECT takes it as it is.
            if buf.len() < step + PAGE {
                buf.resize(step + PAGE, 0);
            }
            let skip = buf.as_ptr().align_offset(PAGE).min(PAGE);
            let single = plain.len() <= self.chunk;
            let mut at = 0usize;
            for piece in plain.chunks(self.chunk) {
                let off = offset + at as u64;
                let out = &mut buf[skip..skip + piece.len()];
                METRICS
                    .xts_chunk(true, piece.len(), || {
                        self.cipher.encrypt_into(piece, out, self.iv(off))
                    })
                    .map_err(|_| Self::crypto_err(Op::Write, off, piece.len() as u64))?;
                self.inner
                    .write_at(out, self.segment.offset + off, fua && single)?;
                at += piece.len();
            }
            if fua && !single {
                self.inner.flush()?;
            }
            Ok(())
        })
    }

    /// [`write_sectors`](Self::write_sectors) for a caller that gives its buffer up: each
    /// CHUNK of `plain` is encrypted in place and written from there. No ciphertext buffer:
    /// the AES reads each plaintext line and writes it back to the same line, which the
    /// backend's pwrite then reads while it is still in L2, instead of filling a second 256 KiB
    /// (which the write-allocate first pulls in, and which evicts the first) for the pwrite to
    /// read. `plain` holds ciphertext, partly if this fails, afterwards.
    fn write_sectors_in_place(
        &self,
        plain: &mut [u8],
        offset: u64,
        fua: bool,
    ) -> Result<(), Error> {
        let single = plain.len() <= self.chunk;
        let mut at = 0usize;
        for piece in plain.chunks_mut(self.chunk) {
            let off = offset + at as u64;
            let n = piece.len();
            METRICS
                .xts_chunk(true, n, || {
                    self.cipher.encrypt_in_place(piece, self.iv(off))
                })
                .map_err(|_| Self::crypto_err(Op::Write, off, n as u64))?;
            self.inner
                .write_at(piece, self.segment.offset + off, fua && single)?;
            at += n;
        }
        if fua && !single {
            self.inner.flush()?;
        }
        Ok(())
    }

    /// Checks a WRITE's range and takes the range lock on the sectors it touches; `None` for
    /// an empty write (nothing to do).
    fn begin_write(&self, offset: u64, len: u64) -> Result<Option<RangeGuard<'_>>, Error> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.segment.size)
        {
            return Err(Error::new(ErrorKind::NoSpace).at(Op::Write, offset, len));
        }
        if len == 0 {
            return Ok(None);
        }
        let start = self.align_down(offset);
        let end = self.align_up(offset + len);
        Ok(Some(self.locks.lock(start, end)))
    }

    /// Write `data` at an unaligned `offset`: read the covering sectors, merge, write back.
    /// The caller holds the range lock for the covering sectors.
    fn read_modify_write(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), Error> {
        let start = self.align_down(offset);
        let end = self.align_up(offset + data.len() as u64);
        let mut plain = vec![0u8; Self::mem_len(end - start, Op::Write, offset)?];
        let head = Self::mem_len(offset - start, Op::Write, offset)?;
        // Only the first and last sectors hold bytes we keep; the middle is overwritten anyway.
        let sector = self.cipher.sector_size();
        self.read_sectors(&mut plain[..sector], start)?;
        if end - start > self.sector {
            let last = plain.len() - sector;
            self.read_sectors(&mut plain[last..], end - self.sector)?;
        }
        plain[head..head + data.len()].copy_from_slice(data);
        // Through the page-aligned ciphertext buffer (`plain` is not aligned for O_DIRECT).
        self.write_sectors(&plain, start, fua)
    }
}

impl<C: SectorTransform + 'static> BlockDevice for CryptDevice<C> {
    fn size(&self) -> u64 {
        self.segment.size
    }

    fn caps(&self) -> Caps {
        let inner = self.inner.caps();
        // A LUKS2 sector size (512..=4096, checked by `SectorCipher::new`): always fits.
        let preferred_block = u32::try_from(self.sector).unwrap_or(4096);
        Caps {
            read_only: inner.read_only,
            trim: self.allow_discards && inner.trim,
            // Zeroing costs a full encrypted write.
            fast_zero: false,
            // Unaligned requests are served by read-modify-write, so any alignment works.
            min_block: 1,
            preferred_block,
            rotational: inner.rotational,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let len = buf.len() as u64;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.segment.size)
        {
            return Err(Error::new(ErrorKind::OutOfRange).at(Op::Read, offset, len));
        }
        if self.is_aligned(offset, len) {
            return self.read_sectors(buf, offset);
        }
        let start = self.align_down(offset);
        let end = self.align_up(offset + len);
        let mut plain = vec![0u8; Self::mem_len(end - start, Op::Read, offset)?];
        self.read_sectors(&mut plain, start)?;
        let head = Self::mem_len(offset - start, Op::Read, offset)?;
        buf.copy_from_slice(&plain[head..head + buf.len()]);
        Ok(())
    }

    fn read_at_streaming(
        &self,
        buf: &mut [u8],
        offset: u64,
        ready: &mut dyn FnMut(&[u8]),
    ) -> Result<(), Error> {
        let len = buf.len() as u64;
        let inside = offset
            .checked_add(len)
            .is_some_and(|end| end <= self.segment.size);
        if inside && self.is_aligned(offset, len) {
            return self.read_sectors_streaming(buf, offset, ready);
        }
        self.read_at(buf, offset)?;
        ready(buf);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), Error> {
        let len = buf.len() as u64;
        let Some(_guard) = self.begin_write(offset, len)? else {
            return Ok(());
        };
        if self.is_aligned(offset, len) {
            self.write_sectors(buf, offset, fua)
        } else {
            self.read_modify_write(buf, offset, fua)
        }
    }

    /// [`write_at`](BlockDevice::write_at) encrypting the caller's buffer in place (aligned
    /// requests; unaligned ones merge into a buffer of their own as `write_at` does).
    fn write_at_scratch(&self, buf: &mut [u8], offset: u64, fua: bool) -> Result<(), Error> {
        let len = buf.len() as u64;
        let Some(_guard) = self.begin_write(offset, len)? else {
            return Ok(());
        };
        if self.is_aligned(offset, len) {
            self.write_sectors_in_place(buf, offset, fua)
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
            self.inner
                .trim(self.segment.offset + start, end - start, fua)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<(), Error> {
        if flags.fast_only {
            return Err(Error::new(ErrorKind::NotFast).at(Op::Zero, offset, length));
        }
        if offset
            .checked_add(length)
            .is_none_or(|end| end > self.segment.size)
        {
            return Err(Error::new(ErrorKind::NoSpace).at(Op::Zero, offset, length));
        }
        let zeroes = vec![0u8; Self::mem_len(ZERO_CHUNK.min(length), Op::Zero, offset)?];
        let mut pos = offset;
        let end = offset + length;
        while pos < end {
            // Chunks after the first start sector-aligned, so only the edges need RMW.
            let step_end = (self.align_down(pos) + ZERO_CHUNK).min(end);
            let n = Self::mem_len(step_end - pos, Op::Zero, pos)?;
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
        Ok(vec![Extent {
            length,
            hole: false,
            zero: false,
        }])
    }

    /// What one request allocates here: the covering sectors of an unaligned request (read or
    /// read-modify-write), the ciphertext chunk of a write, the zero buffer of WRITE_ZEROES.
    fn scratch_bytes(&self, op: Op, offset: u64, length: u64) -> u64 {
        let covering = |off: u64, len: u64| {
            let start = self.align_down(off);
            self.align_up(off.saturating_add(len)).saturating_sub(start)
        };
        let unaligned = |off: u64, len: u64| {
            if self.is_aligned(off, len) {
                0
            } else {
                covering(off, len)
            }
        };
        let cipher = |len: u64| len.min(CHUNK as u64) + PAGE as u64;
        let own = match op {
            Op::Read => unaligned(offset, length),
            Op::Write => cipher(covering(offset, length)) + unaligned(offset, length),
            Op::Zero => {
                // One ZERO_CHUNK of zeroes, each step a write of at most ZERO_CHUNK plus edges.
                let step = length.min(ZERO_CHUNK) + 2 * self.sector;
                length.min(ZERO_CHUNK) + cipher(step) + step
            }
            _ => 0,
        };
        own + self
            .inner
            .scratch_bytes(op, self.segment.offset.saturating_add(offset), length)
    }

    fn starts(&self) -> bool {
        self.inner.starts()
    }

    fn can_start(&self, op: Op, offset: u64, length: u64, fua: bool) -> bool {
        let inside = offset
            .checked_add(length)
            .is_some_and(|end| end <= self.segment.size);
        inside
            && length > 0
            && self.is_aligned(offset, length)
            && self
                .inner
                .can_start(op, self.segment.offset + offset, length, fua)
    }

    /// Whole-sector requests only (unaligned ones need read-modify-write: the blocking path).
    /// A READ is decrypted when its ticket is finished. A WRITE takes the range lock, is
    /// encrypted in place and handed down; its ticket keeps the lock until it is finished, so
    /// an unaligned write's read-modify-write of the same sectors still waits for it.
    fn start(self: Arc<Self>, op: StartOp<'_>, done: Completion) -> Started {
        match op {
            StartOp::Read {
                offset,
                length,
                buf,
            } => {
                if !self.can_start(Op::Read, offset, length as u64, false) {
                    return Started::No(done);
                }
                let down = StartOp::Read {
                    offset: self.segment.offset + offset,
                    length,
                    buf,
                };
                match self.inner.clone().start(down, done) {
                    Started::Yes(inner) => Started::Yes(Box::new(CryptTicket {
                        dev: self,
                        offset,
                        read: Some(length),
                        lock: None,
                        inner: Some(inner),
                    })),
                    no => no,
                }
            }
            StartOp::Write { offset, data, fua } => {
                let len = data.len() as u64;
                if !self.can_start(Op::Write, offset, len, fua) {
                    return Started::No(done);
                }
                let range = (self.align_down(offset), self.align_up(offset + len));
                // Held by the ticket from here on (released by its drop).
                std::mem::forget(self.locks.lock(range.0, range.1));
                let mut ticket = CryptTicket {
                    dev: self.clone(),
                    offset,
                    read: None,
                    lock: Some(range),
                    inner: None,
                };
                let mut at = 0usize;
                for piece in data.chunks_mut(self.chunk) {
                    let off = offset + at as u64;
                    let n = piece.len();
                    let sealed = METRICS.xts_chunk(true, n, || {
                        self.cipher.encrypt_in_place(piece, self.iv(off))
                    });
                    if sealed.is_err() {
                        done(Err(Self::crypto_err(Op::Write, off, n as u64)));
                        return Started::Yes(Box::new(ticket));
                    }
                    at += n;
                }
                // `data` is ciphertext now: whatever happens below, it must not come back to
                // the caller as plaintext to encrypt again.
                let down = StartOp::Write {
                    offset: self.segment.offset + offset,
                    data: &mut *data,
                    fua,
                };
                match self.inner.clone().start(down, done) {
                    Started::Yes(inner) => ticket.inner = Some(inner),
                    Started::No(done) => {
                        // `can_start` said it would be taken; serve it here rather than fail.
                        let r = self
                            .inner
                            .write_at(data, self.segment.offset + offset, fua)
                            .map(|()| Vec::new());
                        done(r);
                    }
                }
                Started::Yes(Box::new(ticket))
            }
        }
    }
}

/// A started request of the crypt layer: a READ still to be decrypted, a WRITE's range lock.
struct CryptTicket<C: SectorTransform + 'static> {
    dev: Arc<CryptDevice<C>>,
    offset: u64,
    /// READ: its length.
    read: Option<usize>,
    /// The range lock this request holds (a WRITE), released on drop.
    lock: Option<(u64, u64)>,
    inner: Option<Box<dyn Ticket>>,
}

impl<C: SectorTransform + 'static> Ticket for CryptTicket<C> {
    fn finish(mut self: Box<Self>, answer: Result<Vec<u8>, Error>) -> Result<Vec<u8>, Error> {
        let mut data = match self.inner.take() {
            Some(t) => t.finish(answer)?,
            None => answer?,
        };
        let Some(len) = self.read else {
            return Ok(data);
        };
        let dev = &*self.dev;
        if data.len() != len {
            return Err(Error::new(ErrorKind::Io).at(Op::Read, self.offset, len as u64));
        }
        let mut at = 0usize;
        for piece in data.chunks_mut(dev.chunk) {
            let off = self.offset + at as u64;
            let n = piece.len();
            METRICS
                .xts_chunk(false, n, || dev.cipher.decrypt_in_place(piece, dev.iv(off)))
                .map_err(|_| CryptDevice::<C>::crypto_err(Op::Read, off, n as u64))?;
            at += n;
        }
        Ok(data)
    }
}

impl<C: SectorTransform + 'static> Drop for CryptTicket<C> {
    fn drop(&mut self) {
        if let Some(range) = self.lock.take() {
            drop(RangeGuard {
                locks: &self.dev.locks,
                range,
            });
        }
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
        RangeGuard {
            locks: self,
            range: (start, end),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::VolumeKey;
    use std::sync::Mutex;

    /// Plain in-memory backend.
    struct Mem(Mutex<Vec<u8>>);

    impl BlockDevice for Mem {
        fn size(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn caps(&self) -> Caps {
            Caps {
                read_only: false,
                trim: true,
                fast_zero: true,
                min_block: 1,
                preferred_block: 4096,
                rotational: false,
            }
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
            let m = self.0.lock().unwrap();
            buf.copy_from_slice(&m[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64, _: bool) -> Result<(), Error> {
            let mut m = self.0.lock().unwrap();
            m[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> Result<(), Error> {
            Ok(())
        }
        fn trim(&self, offset: u64, length: u64, _: bool) -> Result<(), Error> {
            let mut m = self.0.lock().unwrap();
            m[offset as usize..(offset + length) as usize].fill(0);
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, length: u64, _: ZeroFlags) -> Result<(), Error> {
            self.trim(offset, length, false)
        }
        fn cache(&self, _: u64, _: u64) -> Result<(), Error> {
            Ok(())
        }
        fn extents(&self, _: u64, length: u64) -> Result<Vec<Extent>, Error> {
            Ok(vec![Extent {
                length,
                hole: false,
                zero: false,
            }])
        }
    }

    const DATA_OFFSET: u64 = 8192;

    fn key() -> VolumeKey {
        VolumeKey::from_slice(&(0..64u8).collect::<Vec<_>>())
    }

    fn device(sector: usize, size: u64) -> (Arc<Mem>, CryptDevice) {
        let mem = Arc::new(Mem(Mutex::new(vec![0u8; (DATA_OFFSET + size) as usize])));
        let cipher = SectorCipher::new(&key(), sector).unwrap();
        let seg = Segment {
            offset: DATA_OFFSET,
            size,
            iv_tweak: 0,
        };
        let dev = CryptDevice::new(mem.clone(), cipher, seg, false).unwrap();
        (mem, dev)
    }

    /// xorshift, so the tests need no extra dependency and stay reproducible.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn aligned_writes_store_the_luks2_ciphertext_with_512_byte_iv_units() {
        let (mem, dev) = device(4096, 1 << 20);
        let plain: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8).collect();
        dev.write_at(&plain, 8192, false).unwrap();
        // Independent check: the backing holds exactly what SectorCipher gives for IV 16 (= 8192/512).
        let mut expect = plain.clone();
        SectorCipher::new(&key(), 4096)
            .unwrap()
            .encrypt_in_place(&mut expect, 16)
            .unwrap();
        let m = mem.0.lock().unwrap();
        let at = (DATA_OFFSET + 8192) as usize;
        assert_eq!(&m[at..at + expect.len()], &expect[..]);
        assert_ne!(&m[at..at + 16], &plain[..16]);
    }

    #[test]
    fn requests_spanning_several_chunks_keep_the_iv_sequence_in_both_directions() {
        // 2.5 chunks at an offset that is not a chunk multiple, with FUA (flushed once).
        let (mem, dev) = device(512, 4 << 20);
        let len = 2 * CHUNK + CHUNK / 2;
        let plain: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        dev.write_at(&plain, 8192, true).unwrap();
        let mut expect = plain.clone();
        SectorCipher::new(&key(), 512)
            .unwrap()
            .encrypt_in_place(&mut expect, 16)
            .unwrap();
        {
            let m = mem.0.lock().unwrap();
            let at = (DATA_OFFSET + 8192) as usize;
            assert!(
                m[at..at + len] == expect[..],
                "ciphertext differs from one whole-buffer pass"
            );
        }
        let mut back = vec![0u8; len];
        dev.read_at(&mut back, 8192).unwrap();
        assert!(
            back == plain,
            "multi-chunk read did not decrypt to what was written"
        );
    }

    #[test]
    fn scratch_counts_the_ciphertext_chunk_and_unaligned_edges() {
        let (_mem, dev) = device(4096, 4 << 20);
        let page = PAGE as u64;
        assert_eq!(dev.scratch_bytes(Op::Read, 0, 1 << 20), 0);
        assert_eq!(dev.scratch_bytes(Op::Read, 100, 4096), 8192);
        assert_eq!(dev.scratch_bytes(Op::Write, 0, 4096), 4096 + page);
        assert_eq!(
            dev.scratch_bytes(Op::Write, 0, 3 << 20),
            CHUNK as u64 + page
        );
        assert_eq!(dev.scratch_bytes(Op::Write, 1, 4096), 8192 + page + 8192);
    }

    /// Requests are sized before validation: any offset a client sends must be sized without
    /// overflow (the nbd_* fuzz targets found `align_up` overflowing near 2^64).
    #[test]
    fn scratch_of_an_offset_near_2_pow_64_does_not_overflow() {
        let (_mem, dev) = device(4096, 4 << 20);
        for op in [Op::Read, Op::Write, Op::Zero] {
            for off in [
                u64::MAX,
                u64::MAX - 1,
                u64::MAX - 4095,
                u64::MAX - (1 << 20),
            ] {
                let _ = dev.scratch_bytes(op, off, 1 << 20);
                let _ = dev.scratch_bytes(op, off, u64::MAX);
            }
        }
    }

    #[test]
    fn random_reads_and_writes_match_a_plain_model() {
        for sector in [512usize, 4096] {
            let size = 256 * 1024;
            let (_mem, dev) = device(sector, size);
            let mut model = vec![0u8; size as usize];
            // The encrypted device starts as decrypted zeroes, i.e. noise: fill it first.
            dev.write_at(&model, 0, false).unwrap();
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ sector as u64);
            for round in 0..400 {
                let off = rng.below(size);
                let len = 1 + rng.below((size - off).min(20_000));
                if round % 3 == 0 {
                    let mut got = vec![0u8; len as usize];
                    dev.read_at(&mut got, off).unwrap();
                    assert_eq!(
                        got,
                        model[off as usize..(off + len) as usize],
                        "read {off}+{len}"
                    );
                } else if round % 7 == 0 {
                    dev.write_zeroes(off, len, ZeroFlags::default()).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                } else {
                    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    dev.write_at(&data, off, false).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
            }
            let mut all = vec![0u8; size as usize];
            dev.read_at(&mut all, 0).unwrap();
            assert!(
                all == model,
                "final contents differ for sector size {sector}"
            );
        }
    }

    #[test]
    fn concurrent_unaligned_writes_sharing_sectors_lose_nothing() {
        let size = 512 * 1024u64;
        let (_mem, dev) = device(4096, size);
        dev.write_at(&vec![0u8; size as usize], 0, false).unwrap();
        let dev = Arc::new(dev);
        // Thread t owns bytes [k*4000 + t*1000, +1000): every sector is shared by several threads.
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let dev = dev.clone();
                std::thread::spawn(move || {
                    for round in 0..20u8 {
                        let mut k = 0;
                        while (k + 1) * 4000 <= size {
                            let data = vec![(t as u8 + 1).wrapping_mul(round + 1); 1000];
                            dev.write_at(&data, k * 4000 + t * 1000, false).unwrap();
                            k += 1;
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut all = vec![0u8; size as usize];
        dev.read_at(&mut all, 0).unwrap();
        let mut k = 0;
        while (k + 1) * 4000 <= size {
            for t in 0..4u64 {
                let at = (k * 4000 + t * 1000) as usize;
                let want = (t as u8 + 1).wrapping_mul(20);
                assert!(
                    all[at..at + 1000].iter().all(|&b| b == want),
                    "thread {t} block {k} lost"
                );
            }
            k += 1;
        }
    }

    #[test]
    fn requests_past_the_end_are_refused() {
        let (_mem, dev) = device(512, 4096);
        assert_eq!(
            dev.write_at(&[1; 10], 4090, false).unwrap_err().kind,
            ErrorKind::NoSpace
        );
        let mut b = [0u8; 10];
        assert_eq!(
            dev.read_at(&mut b, 4090).unwrap_err().kind,
            ErrorKind::OutOfRange
        );
    }

    #[test]
    fn a_segment_that_does_not_fit_the_backing_is_refused() {
        let mem = Arc::new(Mem(Mutex::new(vec![0u8; 8192])));
        let cipher = SectorCipher::new(&key(), 4096).unwrap();
        let seg = Segment {
            offset: 4096,
            size: 8192,
            iv_tweak: 0,
        };
        assert!(CryptDevice::new(mem, cipher, seg, false).is_err());
    }

    /// A transform that reports whatever sector size it is given and does nothing.
    struct Identity(usize);

    impl SectorTransform for Identity {
        fn sector_size(&self) -> usize {
            self.0
        }
        fn encrypt_into(&self, src: &[u8], dst: &mut [u8], _: u64) -> Result<(), XtsError> {
            dst.copy_from_slice(src);
            Ok(())
        }
        fn encrypt_in_place(&self, _: &mut [u8], _: u64) -> Result<(), XtsError> {
            Ok(())
        }
        fn decrypt_in_place(&self, _: &mut [u8], _: u64) -> Result<(), XtsError> {
            Ok(())
        }
    }

    /// The layer divides by the sector size: a transform with a size LUKS2 does not allow is
    /// refused at construction, not met as a panic in the middle of a request.
    #[test]
    fn a_transform_with_an_impossible_sector_size_is_refused() {
        for bad in [0usize, 1, 100, 1000, 3072, 8192] {
            let mem = Arc::new(Mem(Mutex::new(vec![0u8; 1 << 16])));
            let seg = Segment {
                offset: 0,
                size: 1 << 15,
                iv_tweak: 0,
            };
            assert!(
                CryptDevice::new(mem, Identity(bad), seg, false).is_err(),
                "{bad}"
            );
        }
        let mem = Arc::new(Mem(Mutex::new(vec![0u8; 1 << 16])));
        let seg = Segment {
            offset: 0,
            size: 1 << 15,
            iv_tweak: 0,
        };
        let dev = CryptDevice::new(mem.clone(), Identity(512), seg, false).unwrap();
        dev.write_at(&[9u8; 1000], 100, false).unwrap();
        assert!(mem.0.lock().unwrap()[100..1100].iter().all(|&b| b == 9));
    }

    /// Smaller steps (the benchmarks' knob) change nothing on disk: the IV sequence carries
    /// across step boundaries whatever the step, and steps are clamped to whole sectors.
    #[test]
    fn any_step_size_stores_the_same_ciphertext() {
        let len = 300 * 1024;
        let plain: Vec<u8> = (0..len).map(|i| (i % 241) as u8).collect();
        let mut images = Vec::new();
        for step in [1usize, 4096, 5000, 65536, CHUNK, 10 * CHUNK] {
            let (mem, mut dev) = device(4096, 1 << 20);
            dev.set_chunk_for_benchmarks(step);
            dev.write_at(&plain, 8192, false).unwrap();
            let mut back = vec![0u8; len];
            dev.read_at(&mut back, 8192).unwrap();
            assert!(back == plain, "step {step}: read back differs");
            images.push(mem.0.lock().unwrap().clone());
        }
        assert!(images.windows(2).all(|w| w[0] == w[1]));
    }

    /// A WRITE through `write_at_scratch` (the session's path: encrypted in the caller's
    /// buffer) stores exactly what `write_at` stores, for aligned requests of one and several
    /// chunks, with and without FUA, and for unaligned ones; and reads back.
    #[test]
    fn writes_in_the_callers_buffer_store_what_write_at_stores() {
        for sector in [512usize, 4096] {
            let cases: [(u64, usize, bool); 5] = [
                (8192, 4096, false),
                (0, CHUNK, true),
                (4096, 2 * CHUNK + 8192, true),
                (100, 5000, false),
                (4096 * 3 + 7, CHUNK + 1, true),
            ];
            for (off, len, fua) in cases {
                let plain: Vec<u8> = (0..len).map(|i| (i % 239) as u8 ^ 0x5a).collect();
                let (mem_a, a) = device(sector, 4 << 20);
                let (mem_b, b) = device(sector, 4 << 20);
                a.write_at(&plain, off, fua).unwrap();
                let mut given = plain.clone();
                b.write_at_scratch(&mut given, off, fua).unwrap();
                assert!(
                    *mem_a.0.lock().unwrap() == *mem_b.0.lock().unwrap(),
                    "sector {sector}, {len} bytes at {off}: backing differs"
                );
                let mut back = vec![0u8; len];
                b.read_at(&mut back, off).unwrap();
                assert!(back == plain, "sector {sector}, {len} bytes at {off}");
            }
        }
    }

    /// An aligned in-place write really is in place: the caller's buffer holds the ciphertext
    /// afterwards (no hidden copy), which is why only callers that give it up may use it.
    #[test]
    fn an_aligned_in_place_write_leaves_the_ciphertext_in_the_callers_buffer() {
        let (mem, dev) = device(4096, 1 << 20);
        let plain = vec![0x11u8; 3 * 4096];
        let mut given = plain.clone();
        dev.write_at_scratch(&mut given, 4096, false).unwrap();
        let at = (DATA_OFFSET + 4096) as usize;
        assert_eq!(&mem.0.lock().unwrap()[at..at + given.len()], &given[..]);
        assert_ne!(given, plain);
    }

    #[test]
    fn in_place_writes_past_the_end_are_refused_untouched() {
        let (_mem, dev) = device(512, 4096);
        let mut b = [1u8; 1024];
        assert_eq!(
            dev.write_at_scratch(&mut b, 3584, false).unwrap_err().kind,
            ErrorKind::NoSpace
        );
        assert!(b.iter().all(|&x| x == 1));
    }

    #[test]
    fn fast_zero_is_refused_without_touching_data() {
        let (_mem, dev) = device(512, 4096);
        dev.write_at(&[7u8; 4096], 0, false).unwrap();
        let flags = ZeroFlags {
            fast_only: true,
            ..ZeroFlags::default()
        };
        assert_eq!(
            dev.write_zeroes(0, 4096, flags).unwrap_err().kind,
            ErrorKind::NotFast
        );
        let mut b = [0u8; 4096];
        dev.read_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 7));
    }
}
