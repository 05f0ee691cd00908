//! Header I/O: where the LUKS2 code reads and writes a header. A local file or block device
//! (`std::fs::File`, with cryptsetup's flock) or anything else that can do positional I/O, such
//! as an upstream NBD export (`crate::upstream`). Functions taking `&dyn HeaderIo` accept a
//! `&File` unchanged (unsized coercion).

use std::fs::File;
use std::io;

use super::error::FormatError;
use super::lock::{HeaderLock, LockMode};

/// Positional I/O on the device that holds a LUKS2 header.
pub trait HeaderIo: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset` (`UnexpectedEof` past the end).
    fn pread_exact(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn pwrite_all(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every write so far durable (fsync / NBD_CMD_FLUSH).
    fn sync_durable(&self) -> io::Result<()>;
    /// Size of the device in bytes.
    fn size(&self) -> io::Result<u64>;
    /// The cryptsetup-compatible advisory header lock. `Ok(None)` where the device cannot be
    /// locked (an NBD upstream): locking is then best effort (see the README).
    fn lock_header(&self, mode: LockMode) -> Result<Option<HeaderLock>, FormatError> {
        let _ = mode;
        Ok(None)
    }
}

impl HeaderIo for File {
    fn pread_exact(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
    fn pwrite_all(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, offset)
    }
    fn sync_durable(&self) -> io::Result<()> {
        File::sync_all(self)
    }
    fn size(&self) -> io::Result<u64> {
        let meta = self.metadata()?;
        if meta.is_file() {
            return Ok(meta.len());
        }
        // Block devices report 0 in metadata; seek to the end instead (positional I/O everywhere
        // else, so the file position does not matter).
        let mut f = self;
        io::Seek::seek(&mut f, io::SeekFrom::End(0))
    }
    fn lock_header(&self, mode: LockMode) -> Result<Option<HeaderLock>, FormatError> {
        super::lock::lock_file(self, mode).map(Some)
    }
}

/// A shared handle reads and writes its device.
impl<T: HeaderIo + ?Sized> HeaderIo for std::sync::Arc<T> {
    fn pread_exact(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).pread_exact(buf, offset)
    }
    fn pwrite_all(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).pwrite_all(buf, offset)
    }
    fn sync_durable(&self) -> io::Result<()> {
        (**self).sync_durable()
    }
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
    fn lock_header(&self, mode: LockMode) -> Result<Option<HeaderLock>, FormatError> {
        (**self).lock_header(mode)
    }
}
