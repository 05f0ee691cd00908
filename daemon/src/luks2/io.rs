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

/// The device a volume lives on, as the code that opens one holds it (nbdcryptctl's offline
/// commands, nbdcryptd's unlock): a local file or block device, or an upstream NBD export.
/// Header I/O goes through [`HeaderIo`] either way; data I/O through [`VolumeIo::local_file`]
/// or [`VolumeIo::upstream`].
///
/// Locking differs. A local volume is claimed by whoever opened it (an OFD lock on this very
/// descriptor, so the claim lasts as long as the `VolumeIo`), and every header update takes
/// cryptsetup's flock. An upstream has neither: NBD has no lock, so nothing stops another
/// writer (a second nbdcryptd, an nbdcryptctl on another host, cryptsetup through nbd-client)
/// from changing the header at the same time. Best effort: the header's seqid is still re-read
/// before each update (a concurrent writer seen then is refused), but two writers racing inside
/// one update can lose one's change. The operator must make sure one writer at a time uses an
/// upstream export (README "Encrypting remote storage").
pub enum VolumeIo {
    /// A local file or block device (its opener holds the claim on this descriptor).
    Local(File),
    /// An export of another NBD server: no claim, no header lock.
    Upstream(std::sync::Arc<crate::upstream::UpstreamDevice>),
}

impl VolumeIo {
    /// Connects to the upstream NBD export `uri` (libnbd-style, as `nbdcryptd --volume`:
    /// `nbd://`, `nbds://`, `nbd+unix://`, `nbds+unix://`, TLS through `tls-certificates=DIR`)
    /// and reads its first sector, so an unreachable or broken upstream fails here with the
    /// URI and the reason. `writable` refuses a read-only upstream and one without FLUSH.
    pub fn open_upstream(
        uri: &str,
        writable: bool,
        allow_discards: bool,
    ) -> Result<VolumeIo, String> {
        let up = crate::upstream::open(uri, writable)?;
        let name = up.uri.to_string();
        let dev = crate::upstream::UpstreamDevice::new(up, !writable, allow_discards);
        let size = HeaderIo::size(&dev).map_err(|e| format!("{name}: {e}"))?;
        if size == 0 {
            return Err(format!(
                "{name}: the export is empty (0 bytes): no volume there"
            ));
        }
        let mut first = vec![0u8; usize::try_from(size.min(4096)).unwrap_or(4096)];
        dev.pread_exact(&mut first, 0)
            .map_err(|e| format!("{name}: cannot read the header: {e}"))?;
        Ok(VolumeIo::Upstream(std::sync::Arc::new(dev)))
    }

    /// The local file or block device; `None` for an upstream.
    pub fn local_file(&self) -> Option<&File> {
        match self {
            VolumeIo::Local(f) => Some(f),
            VolumeIo::Upstream(_) => None,
        }
    }

    /// The upstream export; `None` for a local volume.
    pub fn upstream(&self) -> Option<&std::sync::Arc<crate::upstream::UpstreamDevice>> {
        match self {
            VolumeIo::Local(_) => None,
            VolumeIo::Upstream(u) => Some(u),
        }
    }

    pub fn is_upstream(&self) -> bool {
        matches!(self, VolumeIo::Upstream(_))
    }

    /// The variant's own `HeaderIo`, which the impl below forwards to.
    fn as_dyn(&self) -> &dyn HeaderIo {
        match self {
            VolumeIo::Local(f) => f,
            VolumeIo::Upstream(u) => &**u,
        }
    }
}

impl HeaderIo for VolumeIo {
    fn pread_exact(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_dyn().pread_exact(buf, offset)
    }
    fn pwrite_all(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.as_dyn().pwrite_all(buf, offset)
    }
    fn sync_durable(&self) -> io::Result<()> {
        self.as_dyn().sync_durable()
    }
    fn size(&self) -> io::Result<u64> {
        self.as_dyn().size()
    }
    /// cryptsetup's flock on a local volume; `None` (no lock: best effort) on an upstream.
    fn lock_header(&self, mode: LockMode) -> Result<Option<HeaderLock>, FormatError> {
        self.as_dyn().lock_header(mode)
    }
}
