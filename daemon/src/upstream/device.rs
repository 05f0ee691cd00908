//! A `BlockDevice` and a `luks2::HeaderIo` over an upstream NBD export: the header and the
//! ciphertext both live on the upstream. No claim and no header lock exist there: serving one
//! upstream from two nbdcryptd at once is the operator's to prevent (README "Encrypting remote
//! storage").

use std::io;
use std::sync::Arc;

use super::client::Upstream;
use super::proto::ReplyError;
use crate::block::{self, BlockDevice, Caps, Completion, Extent, Op, StartOp, Started, ZeroFlags};
use crate::luks2::HeaderIo;
use crate::nbd::wire::*;

pub struct UpstreamDevice {
    up: Arc<Upstream>,
    read_only: bool,
    allow_discards: bool,
}

impl UpstreamDevice {
    pub fn new(up: Arc<Upstream>, read_only: bool, allow_discards: bool) -> UpstreamDevice {
        let read_only = read_only || up.info.has(TFLAG_READ_ONLY);
        UpstreamDevice {
            up,
            read_only,
            allow_discards,
        }
    }
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.up
    }
}

fn to_io(e: ReplyError) -> io::Error {
    match e {
        // The upstream's NBD error values are Linux errno numbers.
        ReplyError::Upstream { errno, message } => {
            let code = i32::try_from(errno).unwrap_or(libc::EIO);
            let code = match code {
                libc::ENOSPC | libc::EPERM | libc::EINVAL | libc::EOPNOTSUPP => code,
                _ => libc::EIO,
            };
            let base = io::Error::from_raw_os_error(code);
            if message.is_empty() {
                base
            } else {
                io::Error::new(base.kind(), format!("{base}: upstream says {message}"))
            }
        }
        ReplyError::Connection(m) => io::Error::other(m),
    }
}

fn to_block(e: ReplyError, op: Op, offset: u64, length: u64) -> block::Error {
    let upstream_errno = matches!(&e, ReplyError::Upstream { .. });
    let io = to_io(e);
    let mut err = block::Error::from_io(io);
    if !upstream_errno {
        err.kind = block::ErrorKind::Io;
    }
    err.at(op, offset, length)
}

impl BlockDevice for UpstreamDevice {
    fn size(&self) -> u64 {
        self.up.info.size
    }

    fn caps(&self) -> Caps {
        Caps {
            read_only: self.read_only,
            trim: self.allow_discards && self.up.info.has(TFLAG_SEND_TRIM),
            fast_zero: self.up.info.has(TFLAG_SEND_FAST_ZERO),
            min_block: 512,
            preferred_block: 4096,
            rotational: self.up.info.has(TFLAG_ROTATIONAL),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), block::Error> {
        let n = buf.len() as u64;
        self.up
            .read(buf, offset)
            .map_err(|e| to_block(e, Op::Read, offset, n))
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), block::Error> {
        if self.read_only {
            return Err(block::Error::new(block::ErrorKind::ReadOnly).at(
                Op::Write,
                offset,
                buf.len() as u64,
            ));
        }
        self.up
            .write(buf, offset, fua)
            .map_err(|e| to_block(e, Op::Write, offset, buf.len() as u64))
    }

    fn flush(&self) -> Result<(), block::Error> {
        if self.read_only {
            return Ok(());
        }
        self.up.flush().map_err(|e| to_block(e, Op::Flush, 0, 0))
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<(), block::Error> {
        if !self.caps().trim {
            return Err(block::Error::new(block::ErrorKind::Unsupported).at(
                Op::Trim,
                offset,
                length,
            ));
        }
        let flags = if fua && self.up.info.has(TFLAG_SEND_FUA) {
            CMD_FLAG_FUA
        } else {
            0
        };
        self.up
            .range_cmd(CMD_TRIM, flags, offset, length)
            .map_err(|e| to_block(e, Op::Trim, offset, length))?;
        if fua && flags == 0 {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<(), block::Error> {
        if self.read_only {
            return Err(block::Error::new(block::ErrorKind::ReadOnly).at(Op::Zero, offset, length));
        }
        let info = &self.up.info;
        if info.has(TFLAG_SEND_WRITE_ZEROES) {
            if flags.fast_only && !info.has(TFLAG_SEND_FAST_ZERO) {
                return Err(block::Error::new(block::ErrorKind::NotFast).at(
                    Op::Zero,
                    offset,
                    length,
                ));
            }
            let mut f = 0;
            if flags.no_hole {
                f |= CMD_FLAG_NO_HOLE;
            }
            if flags.fast_only {
                f |= CMD_FLAG_FAST_ZERO;
            }
            let native_fua = flags.fua && info.has(TFLAG_SEND_FUA);
            if native_fua {
                f |= CMD_FLAG_FUA;
            }
            self.up
                .range_cmd(CMD_WRITE_ZEROES, f, offset, length)
                .map_err(|e| to_block(e, Op::Zero, offset, length))?;
            if flags.fua && !native_fua {
                self.flush()?;
            }
            return Ok(());
        }
        if flags.fast_only {
            return Err(block::Error::new(block::ErrorKind::NotFast).at(Op::Zero, offset, length));
        }
        let zeros = vec![0u8; usize::try_from(length.min(1 << 20)).unwrap_or(1 << 20)];
        let mut at = offset;
        let end = offset.saturating_add(length);
        while at < end {
            let n = usize::try_from((end - at).min(zeros.len() as u64)).unwrap_or(zeros.len());
            self.write_at(&zeros[..n], at, false)?;
            at += n as u64;
        }
        if flags.fua {
            self.flush()?;
        }
        Ok(())
    }

    fn cache(&self, _offset: u64, _length: u64) -> Result<(), block::Error> {
        Ok(())
    }

    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, block::Error> {
        let length = length.min(self.up.info.size.saturating_sub(offset));
        Ok(vec![Extent {
            length: length.max(1),
            hole: false,
            zero: false,
        }])
    }

    /// The upstream answers by itself: a request goes on the socket from the caller's thread
    /// and the connection's reader thread completes it (`Upstream::start`).
    fn starts(&self) -> bool {
        true
    }

    /// One upstream request each (at most its largest request); a FUA write only where the
    /// upstream has FUA (else it needs a FLUSH after it: the blocking path).
    fn can_start(&self, op: Op, offset: u64, length: u64, fua: bool) -> bool {
        let info = &self.up.info;
        let fits = length > 0
            && length <= u64::from(info.max_request.max(4096))
            && offset.checked_add(length).is_some_and(|e| e <= info.size);
        match op {
            Op::Read => fits,
            Op::Write => fits && !self.read_only && (!fua || info.has(TFLAG_SEND_FUA)),
            _ => false,
        }
    }

    fn start(self: Arc<Self>, op: StartOp<'_>, done: Completion) -> Started {
        match op {
            StartOp::Read {
                offset,
                length,
                buf,
            } => {
                let n = length as u64;
                let Ok(len) = u32::try_from(length) else {
                    return Started::No(done);
                };
                if !self.can_start(Op::Read, offset, n, false) {
                    return Started::No(done);
                }
                let answer = Box::new(move |r: Result<Vec<u8>, ReplyError>| {
                    done(r.map_err(|e| to_block(e, Op::Read, offset, n)));
                });
                self.up.start(CMD_READ, 0, offset, len, &[], buf, answer);
            }
            StartOp::Write { offset, data, fua } => {
                let n = data.len() as u64;
                let Ok(len) = u32::try_from(data.len()) else {
                    return Started::No(done);
                };
                if !self.can_start(Op::Write, offset, n, fua) {
                    return Started::No(done);
                }
                let flags = if fua { CMD_FLAG_FUA } else { 0 };
                let answer = Box::new(move |r: Result<Vec<u8>, ReplyError>| {
                    done(r.map_err(|e| to_block(e, Op::Write, offset, n)));
                });
                self.up
                    .start(CMD_WRITE, flags, offset, len, data, Vec::new(), answer);
            }
        }
        Started::Yes(Box::new(block::Done))
    }
}

/// The LUKS2 header on the upstream. No lock: `lock_header` keeps the default (`None`).
impl HeaderIo for UpstreamDevice {
    fn pread_exact(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset.saturating_add(buf.len() as u64) > self.up.info.size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the upstream export",
            ));
        }
        self.up.read(buf, offset).map_err(to_io)
    }
    fn pwrite_all(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        if offset.saturating_add(buf.len() as u64) > self.up.info.size {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.up.write(buf, offset, false).map_err(to_io)
    }
    fn sync_durable(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.up.flush().map_err(to_io)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.up.info.size)
    }
}
