//! The block-device abstraction every layer speaks: the NBD session calls it, the crypt layer
//! implements it over another `BlockDevice`, and the file backend implements it over a file.
//!
//! Contract (every implementation keeps it):
//! - Offsets and lengths are in bytes and have already been checked against `size()` by the
//!   caller; an implementation may still return `ErrorKind::OutOfRange` defensively.
//! - `write_at` with `fua = true` returns only once the data is on stable storage.
//! - `flush` returns only once every write that returned before it was called is on stable
//!   storage, whichever connection issued it (one backend is shared by all connections).
//! - Methods are blocking; callers run them off the async reactor.
//! - There are no default methods for the data path: a layer states what it does.

pub mod crypt;
pub mod file;
pub mod latch;
pub mod reencrypt;

use std::fmt;
use std::io;
use std::sync::Arc;

/// What a device can do; the session advertises exactly this to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub read_only: bool,
    /// TRIM actually discards (hole punching / BLKDISCARD); off unless the operator enabled it.
    pub trim: bool,
    /// Zeroing is cheaper than writing zeroes (so FAST_ZERO requests can succeed).
    pub fast_zero: bool,
    /// The smallest unit a request should be aligned to (LUKS2 sector size for encrypted volumes).
    pub min_block: u32,
    /// The block size clients should prefer.
    pub preferred_block: u32,
    pub rotational: bool,
}

/// One run of bytes with the same allocation state, for `base:allocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// Not allocated on the backing store.
    pub hole: bool,
    /// Reads as zeroes.
    pub zero: bool,
}

/// Options of a WRITE_ZEROES request, already validated against the advertised flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range must stay allocated (NBD_CMD_FLAG_NO_HOLE).
    pub no_hole: bool,
    /// Fail with `ErrorKind::NotFast` rather than doing slow work (NBD_CMD_FLAG_FAST_ZERO).
    pub fast_only: bool,
    pub fua: bool,
}

pub trait BlockDevice: Send + Sync {
    /// Size in bytes, fixed for the life of the device.
    fn size(&self) -> u64;
    fn caps(&self) -> Caps;
    /// Fill all of `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error>;
    /// Write all of `buf` at `offset`; durable before returning if `fua`.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), Error>;
    /// Make every completed write durable.
    fn flush(&self) -> Result<(), Error>;
    /// Discard a range (only called when `caps().trim`); contents are undefined afterwards.
    fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<(), Error>;
    /// Make a range read back as zeroes.
    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<(), Error>;
    /// Prefetch hint; may do nothing.
    fn cache(&self, offset: u64, length: u64) -> Result<(), Error>;
    /// Allocation map from `offset`, covering at least one byte and at most `length`.
    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, Error>;
    /// [`read_at`](Self::read_at) that hands each finished piece of `buf` to `ready` as soon
    /// as it is final, in order, so the caller can send it while it is still in the CPU caches
    /// (the NBD session streams large READ replies this way). On success the pieces cover
    /// `buf` exactly; on an error, the pieces handed over so far are correct data. Default:
    /// the whole buffer as one piece.
    fn read_at_streaming(
        &self,
        buf: &mut [u8],
        offset: u64,
        ready: &mut dyn FnMut(&[u8]),
    ) -> Result<(), Error> {
        self.read_at(buf, offset)?;
        ready(buf);
        Ok(())
    }

    /// [`write_at`](Self::write_at) where the caller gives `buf` up: a layer may use it as
    /// its own scratch space and leaves its contents unspecified (the crypt layer encrypts a
    /// WRITE's payload in place there instead of into a buffer of its own). Same durability
    /// and error contract as `write_at`. The NBD session calls this for every WRITE, whose
    /// payload buffer it never reads again. Default: `write_at`, the buffer untouched;
    /// layers that pass writes on forward this so the layer below sees it.
    fn write_at_scratch(&self, buf: &mut [u8], offset: u64, fua: bool) -> Result<(), Error> {
        self.write_at(buf, offset, fua)
    }

    /// Bytes of memory this layer (and the layers below it) allocate to serve one `op` of
    /// `length` bytes at `offset`, beyond the caller's own buffer: what a request really holds,
    /// so the server's memory budgets can charge it before the request runs. Not data path;
    /// layers that allocate nothing per request keep the default.
    fn scratch_bytes(&self, op: Op, offset: u64, length: u64) -> u64 {
        let _ = (op, offset, length);
        0
    }

    /// Whether this device (through every layer below it) may [`start`](Self::start)
    /// requests: its backend completes them by itself, an upstream NBD server. Fixed for the
    /// life of the device. Default: no (the local file backend: a thread waits in pread).
    fn starts(&self) -> bool {
        false
    }

    /// Whether [`start`](Self::start) would take this request (`op` Read or Write, `fua` for
    /// a write): a layer that must commit to a request before passing it on (the crypt layer
    /// encrypts a WRITE's payload in place) asks the layer below first. Default: no.
    fn can_start(&self, op: Op, offset: u64, length: u64, fua: bool) -> bool {
        let _ = (op, offset, length, fua);
        false
    }

    /// Start a READ or WRITE without a thread waiting for it. `Started::Yes(ticket)`: `done`
    /// will be called exactly once, on any thread (possibly before this returns), with the
    /// backend's answer; then `ticket.finish(answer)` gives the request's result (each layer
    /// decrypts, notes failures, and releases what it holds for the request: a layer keeps its
    /// locks in the ticket, so a request holds them from start to finish, as the blocking
    /// call would; dropping a ticket unfinished releases them too). `Started::No(done)`: nothing was done, `done` comes back uncalled; serve the
    /// request with the blocking methods. Same checks, durability and error contract as
    /// `read_at` / `write_at_scratch`. Default: `No`.
    fn start(self: Arc<Self>, op: StartOp<'_>, done: Completion) -> Started {
        let _ = op;
        Started::No(done)
    }
}

/// A request for [`BlockDevice::start`].
pub enum StartOp<'b> {
    /// Read `length` bytes at `offset`. `buf` is a spare buffer the device may fill and hand
    /// back with the answer (its old contents are never seen).
    Read {
        offset: u64,
        length: usize,
        buf: Vec<u8>,
    },
    /// Write `data` at `offset`, durable before the answer if `fua`. The layers may use `data`
    /// as scratch (as `write_at_scratch`); it is not needed once `start` has returned.
    Write {
        offset: u64,
        data: &'b mut [u8],
        fua: bool,
    },
}

/// Called once with the backend's answer to a started request: a READ's data as the backend
/// returned it (still to be finished by the ticket), or an empty buffer for a WRITE.
pub type Completion = Box<dyn FnOnce(Result<Vec<u8>, Error>) + Send>;

/// What the layers still have to do for a started request once its answer has come.
pub trait Ticket: Send {
    /// The request's result from the backend's answer (a READ's plaintext).
    fn finish(self: Box<Self>, answer: Result<Vec<u8>, Error>) -> Result<Vec<u8>, Error>;
}

/// Whether [`BlockDevice::start`] took a request.
pub enum Started {
    Yes(Box<dyn Ticket>),
    No(Completion),
}

/// The ticket of a layer with nothing left to do: the answer is the result.
pub struct Done;

impl Ticket for Done {
    fn finish(self: Box<Self>, answer: Result<Vec<u8>, Error>) -> Result<Vec<u8>, Error> {
        answer
    }
}

/// The stable part of a block error, the one thing callers match on (see `nbd::errno`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The storage failed an operation.
    Io,
    /// No space left on the backing store (or past the end on write).
    NoSpace,
    /// The device or export is read-only.
    ReadOnly,
    /// The range lies outside the device.
    OutOfRange,
    /// The request is not aligned to what the layer needs.
    Misaligned,
    /// A FAST_ZERO request that would be slow.
    NotFast,
    /// The operation is not supported by this device.
    Unsupported,
    /// An earlier write or flush failed; durability can no longer be promised.
    Latched,
    /// Data failed an integrity check (decryption layer).
    Corrupt,
    /// Another process is serving this backing store.
    InUse,
}

/// Which operation failed, and where: enough for a log line to be useful.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    pub op: Op,
    pub offset: u64,
    pub length: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    Zero,
    Cache,
    Extents,
    Open,
}

/// A block-layer error: a kind to match on, a context to log, and the OS error behind it.
#[derive(Debug)]
pub struct Error {
    pub kind: ErrorKind,
    pub context: Option<Context>,
    pub source: Option<io::Error>,
}

impl Error {
    pub fn new(kind: ErrorKind) -> Self {
        Error {
            kind,
            context: None,
            source: None,
        }
    }

    pub fn at(mut self, op: Op, offset: u64, length: u64) -> Self {
        self.context = Some(Context { op, offset, length });
        self
    }

    /// Classify an OS error from the backing store.
    pub fn from_io(source: io::Error) -> Self {
        let kind = match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ErrorKind::NoSpace,
            Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EACCES) => ErrorKind::ReadOnly,
            Some(libc::EOPNOTSUPP) => ErrorKind::Unsupported,
            Some(libc::EINVAL) => ErrorKind::Io,
            _ => ErrorKind::Io,
        };
        Error {
            kind,
            context: None,
            source: Some(source),
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Io => "i/o error",
            ErrorKind::NoSpace => "no space left",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::OutOfRange => "range outside the device",
            ErrorKind::Misaligned => "request not aligned to the sector size",
            ErrorKind::NotFast => "zeroing would not be fast",
            ErrorKind::Unsupported => "operation not supported",
            ErrorKind::Latched => {
                "an earlier write or flush failed; refusing to promise durability"
            }
            ErrorKind::Corrupt => "data failed an integrity check",
            ErrorKind::InUse => "in use by another process (another nbdcryptd serves it)",
        })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(c) = &self.context {
            write!(
                f,
                " ({:?} at offset {} length {})",
                c.op, c.offset, c.length
            )?;
        }
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}
