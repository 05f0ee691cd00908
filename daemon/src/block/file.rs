//! The backend over a regular file or a block device: positioned reads and writes on one shared
//! descriptor, so a flush on any connection covers writes completed on all of them.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use nix::fcntl::{fallocate, posix_fadvise, FallocateFlags, PosixFadviseAdvice};
use nix::unistd::{lseek, Whence};

use super::{BlockDevice, Caps, Error, ErrorKind, Extent, Op, ZeroFlags};

/// How to open the backing store.
#[derive(Debug, Clone, Default)]
pub struct FileOptions {
    pub read_only: bool,
    /// Create a regular file of this size if the path does not exist.
    pub create_size: Option<u64>,
    /// TRIM punches holes (file) or discards (device). Off by default.
    pub allow_discards: bool,
    /// Bypass the page cache for aligned I/O.
    pub direct: bool,
    /// Don't take the exclusive claim: the caller holds one from `claim_path` already.
    pub unclaimed: bool,
}

pub struct FileDevice {
    file: File,
    /// Opened with O_DSYNC: a FUA write through it is durable when pwrite returns, without
    /// syncing everything else dirty in the file.
    dsync: Option<File>,
    /// Opened with O_DIRECT when asked for; used for page-aligned requests only.
    direct: Option<File>,
    size: u64,
    is_block_device: bool,
    opts: FileOptions,
}

/// O_DIRECT needs the buffer, offset and length aligned to the logical block size; 4096 covers
/// every device we expect.
const DIRECT_ALIGN: u64 = 4096;
/// Bytes per piece of a streamed read ([`BlockDevice::read_at_streaming`]): each piece is handed
/// on (sent to the client) right after its pread, while it is still in L2, instead of copying a
/// whole large request through the caches twice.
const STREAM_PIECE: usize = 256 << 10;

/// The durability calls. The `test-skip-fdatasync` feature (power-cut negative control only, see
/// tests/tests/powercut_block.rs) turns them into no-ops so the trials can show they see a loss.
#[cfg(all(feature = "test-skip-fdatasync", not(debug_assertions)))]
compile_error!(
    "test-skip-fdatasync drops durability: a test-only feature, never in an optimized build"
);
#[cfg(not(feature = "test-skip-fdatasync"))]
const DSYNC: i32 = libc::O_DSYNC;
#[cfg(feature = "test-skip-fdatasync")]
const DSYNC: i32 = 0;
#[cfg(not(feature = "test-skip-fdatasync"))]
fn sync_data(f: &File) -> io::Result<()> {
    f.sync_data()
}
#[cfg(feature = "test-skip-fdatasync")]
fn sync_data(_: &File) -> io::Result<()> {
    Ok(())
}

impl FileDevice {
    pub fn open(path: &Path, opts: FileOptions) -> Result<FileDevice, Error> {
        let open_err = |e: io::Error| Error::from_io(e).at(Op::Open, 0, 0);
        if let Some(size) = opts.create_size {
            if !path.exists() {
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path);
                f.and_then(|f| f.set_len(size)).map_err(open_err)?;
            }
        }
        let open = |custom: i32| {
            OpenOptions::new()
                .read(true)
                .write(!opts.read_only)
                .custom_flags(custom)
                .open(path)
        };
        let mut file = open(0).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let is_block_device = meta.file_type().is_block_device();
        if !is_block_device && !meta.is_file() {
            return Err(Error::new(ErrorKind::Unsupported).at(Op::Open, 0, 0));
        }
        // lseek(SEEK_END) gives a block device's size as BLKGETSIZE64 would, without an ioctl.
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        if !opts.unclaimed {
            claim(&file, opts.read_only).map_err(|e| e.at(Op::Open, 0, 0))?;
        }
        let dsync = if opts.read_only {
            None
        } else {
            Some(open(DSYNC).map_err(open_err)?)
        };
        let direct = if opts.direct {
            Some(open(libc::O_DIRECT).map_err(open_err)?)
        } else {
            None
        };
        Ok(FileDevice {
            file,
            dsync,
            direct,
            size,
            is_block_device,
            opts,
        })
    }

    fn aligned_for_direct(&self, offset: u64, len: usize, addr: usize) -> bool {
        self.direct.is_some()
            && offset.is_multiple_of(DIRECT_ALIGN)
            && (len as u64).is_multiple_of(DIRECT_ALIGN)
            && (addr as u64).is_multiple_of(DIRECT_ALIGN)
    }

    /// Zero a range by writing zero buffers: the slow path when fallocate cannot do it.
    fn write_zero_buffers(&self, mut offset: u64, mut len: u64) -> Result<(), Error> {
        let zeroes = vec![0u8; 1 << 20];
        while len > 0 {
            let n = usize::try_from(len).map_or(zeroes.len(), |len| len.min(zeroes.len()));
            self.file
                .write_all_at(&zeroes[..n], offset)
                .map_err(|e| Error::from_io(e).at(Op::Zero, offset, n as u64))?;
            offset += n as u64;
            len -= n as u64;
        }
        Ok(())
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps {
            read_only: self.opts.read_only,
            trim: self.opts.allow_discards && !self.opts.read_only,
            fast_zero: true,
            min_block: 1,
            preferred_block: 4096,
            rotational: false,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let len = buf.len();
        let file = match &self.direct {
            Some(d) if self.aligned_for_direct(offset, len, buf.as_ptr() as usize) => d,
            _ => &self.file,
        };
        file.read_exact_at(buf, offset)
            .map_err(|e| Error::from_io(e).at(Op::Read, offset, len as u64))
    }

    fn read_at_streaming(
        &self,
        buf: &mut [u8],
        offset: u64,
        ready: &mut dyn FnMut(&[u8]),
    ) -> Result<(), Error> {
        let mut at = offset;
        for piece in buf.chunks_mut(STREAM_PIECE) {
            self.read_at(piece, at)?;
            ready(piece);
            at += piece.len() as u64;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), Error> {
        let len = buf.len() as u64;
        let err = |e: io::Error| Error::from_io(e).at(Op::Write, offset, len);
        match (&self.direct, &self.dsync) {
            (Some(d), _) if self.aligned_for_direct(offset, buf.len(), buf.as_ptr() as usize) => {
                d.write_all_at(buf, offset).map_err(err)?;
                if fua {
                    sync_data(d).map_err(err)?;
                }
            }
            (_, Some(dsync)) if fua => dsync.write_all_at(buf, offset).map_err(err)?,
            _ => self.file.write_all_at(buf, offset).map_err(err)?,
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), Error> {
        sync_data(&self.file).map_err(|e| Error::from_io(e).at(Op::Flush, 0, 0))
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<(), Error> {
        if !self.caps().trim {
            return Err(Error::new(ErrorKind::Unsupported).at(Op::Trim, offset, length));
        }
        // On a block device, PUNCH_HOLE|KEEP_SIZE becomes a discard-backed zero-out.
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        punch(&self.file, mode, offset, length).map_err(|e| e.at(Op::Trim, offset, length))?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<(), Error> {
        if self.opts.read_only {
            return Err(Error::new(ErrorKind::ReadOnly).at(Op::Zero, offset, length));
        }
        let zero_range = FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let result = match punch(&self.file, zero_range, offset, length) {
            Err(e) if e.kind == ErrorKind::Unsupported && !self.is_block_device => {
                // tmpfs and some others lack ZERO_RANGE: punch, then re-allocate if asked to.
                let hole =
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
                punch(&self.file, hole, offset, length).and_then(|()| {
                    if flags.no_hole {
                        punch(
                            &self.file,
                            FallocateFlags::FALLOC_FL_KEEP_SIZE,
                            offset,
                            length,
                        )
                    } else {
                        Ok(())
                    }
                })
            }
            other => other,
        };
        match result {
            Ok(()) => {}
            Err(e) if e.kind == ErrorKind::Unsupported => {
                if flags.fast_only {
                    return Err(Error::new(ErrorKind::NotFast).at(Op::Zero, offset, length));
                }
                self.write_zero_buffers(offset, length)?;
            }
            Err(e) => return Err(e.at(Op::Zero, offset, length)),
        }
        if flags.fua {
            self.flush()?;
        }
        Ok(())
    }

    fn cache(&self, offset: u64, length: u64) -> Result<(), Error> {
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(length)) else {
            return Err(Error::new(ErrorKind::OutOfRange).at(Op::Cache, offset, length));
        };
        // Advice only: a failure changes nothing the client can observe.
        let _ = posix_fadvise(
            self.file.as_raw_fd(),
            off,
            len,
            PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        );
        Ok(())
    }

    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, Error> {
        let end = offset.saturating_add(length).min(self.size);
        if self.is_block_device || offset >= end {
            return Ok(vec![Extent {
                length: end.saturating_sub(offset).max(1),
                hole: false,
                zero: false,
            }]);
        }
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < 1024 {
            let seek = |whence| {
                let p = i64::try_from(pos).map_err(|_| Error::new(ErrorKind::OutOfRange))?;
                match lseek(self.file.as_raw_fd(), p, whence) {
                    Ok(n) => Ok(u64::try_from(n).unwrap_or(end).min(end)),
                    // ENXIO: no more data after pos, the rest is a hole.
                    Err(nix::errno::Errno::ENXIO) => Ok(end),
                    Err(e) => Err(Error::from_io(e.into()).at(Op::Extents, pos, end - pos)),
                }
            };
            let data_start = seek(Whence::SeekData)?;
            if data_start > pos {
                out.push(Extent {
                    length: data_start - pos,
                    hole: true,
                    zero: true,
                });
                pos = data_start;
                continue;
            }
            let hole_start = seek(Whence::SeekHole)?;
            let data_end = hole_start.max(pos + 1);
            out.push(Extent {
                length: data_end - pos,
                hole: false,
                zero: false,
            });
            pos = data_end;
        }
        Ok(out)
    }
}

/// Claim `path` for this process for as long as the returned file stays open (see `claim`).
pub fn claim_path(path: &Path, read_only: bool) -> Result<File, Error> {
    // A write lock needs a descriptor open for writing.
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|e| Error::from_io(e).at(Op::Open, 0, 0))?;
    claim(&file, read_only).map_err(|e| e.at(Op::Open, 0, 0))?;
    Ok(file)
}

/// The byte we lock to claim a backing store: far past any data, so it never collides with the
/// byte-range locks qemu takes on images (bytes 100 and up), nor with cryptsetup's flock().
const CLAIM_BYTE: i64 = i64::MAX - 1;

/// Take an open-file-description lock on `CLAIM_BYTE`: exclusive when writable, shared when
/// read-only, so two daemons can never serve one volume read-write at once. The lock goes
/// away with the descriptor, also when the process is killed.
fn claim(file: &File, read_only: bool) -> Result<(), Error> {
    match set_claim(file, read_only) {
        Ok(()) => Ok(()),
        Err(e) if is_conflict(&e) => {
            // Say who, as far as /proc tells: a daemon, or an nbdcryptctl changing the header.
            let who: Vec<String> = claim_holders(file)
                .iter()
                .map(|h| {
                    let cmd: String = h
                        .cmdline
                        .join(" ")
                        .chars()
                        .map(|c| if c.is_control() { '?' } else { c })
                        .collect();
                    format!("pid {} ({cmd})", h.pid)
                })
                .collect();
            let source =
                (!who.is_empty()).then(|| io::Error::other(format!("held by {}", who.join(", "))));
            Err(Error {
                kind: ErrorKind::InUse,
                context: None,
                source,
            })
        }
        Err(e) => Err(Error::from_io(e)),
    }
}

fn set_claim(file: &File, read_only: bool) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg};
    let lock = claim_flock(if read_only {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    });
    fcntl(file.as_raw_fd(), FcntlArg::F_OFD_SETLK(&lock))
        .map(|_| ())
        .map_err(io::Error::from)
}

fn is_conflict(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES))
}

fn claim_flock(kind: i32) -> libc::flock {
    let mut lock: libc::flock = empty_flock();
    // `kind` is F_RDLCK, F_WRLCK or F_UNLCK and SEEK_SET is 0: libc types them `c_int`, the
    // fields `c_short`; the values fit.
    #[allow(clippy::cast_possible_truncation)]
    let (l_type, l_whence) = (kind as i16, libc::SEEK_SET as i16);
    lock.l_type = l_type;
    lock.l_whence = l_whence;
    lock.l_start = CLAIM_BYTE;
    lock.l_len = 1;
    lock
}

/// A process found holding the claim on a backing store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimHolder {
    pub pid: u32,
    /// Its command line, one string per argument (lossy UTF-8, as /proc/PID/cmdline has it).
    pub cmdline: Vec<String>,
}

/// Someone else's claim on a backing store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// Exclusive (a read-write server) rather than shared (read-only servers).
    pub exclusive: bool,
    /// The processes holding it, as far as /proc tells (OFD locks report no pid): empty when
    /// they belong to another user and we may not look.
    pub holders: Vec<ClaimHolder>,
}

/// Is this backing store claimed through another open file description, and by whom? Asks the
/// kernel (F_OFD_GETLK) whether an exclusive claim through `file` would conflict; changes nothing.
/// The answer can be stale as soon as it is returned: to act on it, use [`try_claim`].
pub fn probe_claim(file: &File) -> io::Result<Option<Claimed>> {
    use nix::fcntl::{fcntl, FcntlArg};
    let mut lock = claim_flock(libc::F_WRLCK);
    fcntl(file.as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut lock)).map_err(io::Error::from)?;
    if i32::from(lock.l_type) == libc::F_UNLCK {
        return Ok(None);
    }
    Ok(Some(Claimed {
        exclusive: i32::from(lock.l_type) == libc::F_WRLCK,
        holders: claim_holders(file),
    }))
}

/// Claim the backing store open as `file` (the same lock the daemon takes), held until every
/// descriptor of this open file description is closed. `Ok(Err(claimed))` names who holds it.
/// Race-free: a daemon that starts afterwards finds it claimed and refuses to serve.
pub fn try_claim(file: &File, read_only: bool) -> io::Result<Result<(), Claimed>> {
    for _ in 0..3 {
        match set_claim(file, read_only) {
            Ok(()) => return Ok(Ok(())),
            Err(e) if is_conflict(&e) => {}
            Err(e) => return Err(e),
        }
        // Released between the two calls: try again.
        if let Some(claimed) = probe_claim(file)? {
            return Ok(Err(claimed));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::WouldBlock,
        "the claim keeps changing hands",
    ))
}

/// The processes holding an OFD lock on `CLAIM_BYTE` of the file `file` is open on: each
/// /proc/PID/fdinfo/N that lists that lock (the kernel shows an OFD lock in the fdinfo of every
/// descriptor of its open file description). Only fdinfo is read, never the files themselves, so
/// a hung FUSE mount cannot block the scan. Best effort: only processes we may inspect are found.
pub fn claim_holders(file: &File) -> Vec<ClaimHolder> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = file.metadata() else {
        return Vec::new();
    };
    let dev = meta.dev();
    // As /proc/locks and fdinfo print it: MAJOR:MINOR:INODE START END.
    let lock = format!(
        "{:02x}:{:02x}:{} {CLAIM_BYTE} ",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev),
        meta.ino()
    );
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_to_string(fd.path()).is_ok_and(|info| {
                info.lines()
                    .any(|l| l.starts_with("lock:") && l.contains("OFDLCK") && l.contains(&lock))
            })
        });
        if holds {
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmdline = cmdline
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            out.push(ClaimHolder { pid, cmdline });
        }
    }
    out
}

fn empty_flock() -> libc::flock {
    libc::flock {
        l_type: 0,
        l_whence: 0,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

fn punch(file: &File, mode: FallocateFlags, offset: u64, length: u64) -> Result<(), Error> {
    let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(length)) else {
        return Err(Error::new(ErrorKind::OutOfRange));
    };
    if len == 0 {
        return Ok(());
    }
    fallocate(file.as_raw_fd(), mode, off, len).map_err(|e| Error::from_io(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_device(size: u64, opts: FileOptions) -> (tempdir::Dir, FileDevice) {
        let dir = tempdir::Dir::new();
        let path = dir.path.join("backing");
        let dev = FileDevice::open(
            &path,
            FileOptions {
                create_size: Some(size),
                ..opts
            },
        )
        .unwrap();
        (dir, dev)
    }

    /// A tiny self-cleaning temp directory, to keep the dependency list short.
    mod tempdir {
        pub struct Dir {
            pub path: std::path::PathBuf,
        }
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "nbdcrypt-file-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&path).unwrap();
                Dir { path }
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.path);
            }
        }
    }

    #[test]
    fn created_file_has_the_requested_size_and_round_trips_data() {
        let (_d, dev) = temp_device(1 << 20, FileOptions::default());
        assert_eq!(dev.size(), 1 << 20);
        dev.write_at(b"hello", 4093, true).unwrap();
        let mut buf = [0u8; 5];
        dev.read_at(&mut buf, 4093).unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[test]
    fn write_zeroes_makes_a_written_range_read_as_zero() {
        let (_d, dev) = temp_device(1 << 20, FileOptions::default());
        dev.write_at(&[0xaa; 8192], 0, false).unwrap();
        dev.write_zeroes(
            100,
            5000,
            ZeroFlags {
                no_hole: true,
                ..ZeroFlags::default()
            },
        )
        .unwrap();
        let mut buf = vec![0u8; 8192];
        dev.read_at(&mut buf, 0).unwrap();
        assert!(buf[..100].iter().all(|&b| b == 0xaa));
        assert!(buf[100..5100].iter().all(|&b| b == 0));
        assert!(buf[5100..].iter().all(|&b| b == 0xaa));
    }

    #[test]
    fn extents_report_data_and_holes() {
        let (_d, dev) = temp_device(1 << 20, FileOptions::default());
        dev.write_at(&[1u8; 65536], 0, false).unwrap();
        let x = dev.extents(0, 1 << 20).unwrap();
        assert!(!x[0].hole);
        assert!(x.iter().any(|e| e.hole), "{x:?}");
        assert_eq!(x.iter().map(|e| e.length).sum::<u64>(), 1 << 20);
    }

    #[test]
    fn a_second_writable_open_of_the_same_file_is_refused_as_in_use() {
        let (d, _dev) = temp_device(4096, FileOptions::default());
        let again = FileDevice::open(&d.path.join("backing"), FileOptions::default());
        assert_eq!(again.err().map(|e| e.kind), Some(ErrorKind::InUse));
    }

    #[test]
    fn reading_past_the_end_of_the_file_is_an_error() {
        let (_d, dev) = temp_device(4096, FileOptions::default());
        let mut buf = [0u8; 10];
        assert!(dev.read_at(&mut buf, 4090).is_err());
    }

    #[test]
    fn probe_names_the_claiming_process_and_try_claim_refuses_while_it_holds() {
        let (d, dev) = temp_device(4096, FileOptions::default());
        let path = d.path.join("backing");
        let other = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let claimed = probe_claim(&other)
            .unwrap()
            .expect("claimed by the open device");
        assert!(claimed.exclusive);
        assert!(
            claimed.holders.iter().any(|h| h.pid == std::process::id()),
            "{claimed:?}"
        );
        assert!(try_claim(&other, false).unwrap().is_err());
        assert!(
            try_claim(&other, true).unwrap().is_err(),
            "a shared claim conflicts too"
        );
        drop(dev);
        assert_eq!(probe_claim(&other).unwrap(), None);
        // Taken through `other`, the claim now keeps a server out, until `other` is closed.
        try_claim(&other, false).unwrap().unwrap();
        let refused = FileDevice::open(&path, FileOptions::default());
        assert_eq!(refused.err().map(|e| e.kind), Some(ErrorKind::InUse));
        drop(other);
        FileDevice::open(&path, FileOptions::default()).unwrap();
    }
}
