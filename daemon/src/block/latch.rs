//! Fail-stop durability: once a write or flush has failed, every later flush fails too, so a
//! client never sees a successful FLUSH over data that was lost (the fsyncgate lesson: after a
//! failed fsync the kernel may drop the dirty pages and report success next time).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracing::error;

use super::{
    BlockDevice, Caps, Completion, Error, ErrorKind, Extent, Op, StartOp, Started, Ticket,
    ZeroFlags,
};

pub struct Latch {
    inner: Arc<dyn BlockDevice>,
    failed: AtomicBool,
}

impl Latch {
    pub fn new(inner: Arc<dyn BlockDevice>) -> Latch {
        crate::metrics::METRICS.latch_reset();
        Latch {
            inner,
            failed: AtomicBool::new(false),
        }
    }

    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn note<T>(&self, r: Result<T, Error>) -> Result<T, Error> {
        if let Err(e) = &r {
            // Range and permission refusals lose nothing; only storage failures latch.
            if matches!(
                e.kind,
                ErrorKind::Io | ErrorKind::NoSpace | ErrorKind::Corrupt
            ) && !self.failed.swap(true, Ordering::AcqRel)
            {
                crate::metrics::METRICS.latch_tripped();
                error!(error = %e, "storage write failed: every later flush will fail until restart");
            }
        }
        r
    }
}

impl BlockDevice for Latch {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn caps(&self) -> Caps {
        self.inner.caps()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.inner.read_at(buf, offset)
    }

    fn read_at_streaming(
        &self,
        buf: &mut [u8],
        offset: u64,
        ready: &mut dyn FnMut(&[u8]),
    ) -> Result<(), Error> {
        self.inner.read_at_streaming(buf, offset, ready)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), Error> {
        if fua && self.has_failed() {
            return Err(Error::new(ErrorKind::Latched).at(Op::Write, offset, buf.len() as u64));
        }
        self.note(self.inner.write_at(buf, offset, fua))
    }

    fn write_at_scratch(&self, buf: &mut [u8], offset: u64, fua: bool) -> Result<(), Error> {
        if fua && self.has_failed() {
            return Err(Error::new(ErrorKind::Latched).at(Op::Write, offset, buf.len() as u64));
        }
        self.note(self.inner.write_at_scratch(buf, offset, fua))
    }

    fn flush(&self) -> Result<(), Error> {
        if self.has_failed() {
            return Err(Error::new(ErrorKind::Latched).at(Op::Flush, 0, 0));
        }
        self.note(self.inner.flush())
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<(), Error> {
        self.note(self.inner.trim(offset, length, fua))
    }

    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<(), Error> {
        if flags.fua && self.has_failed() {
            return Err(Error::new(ErrorKind::Latched).at(Op::Zero, offset, length));
        }
        self.note(self.inner.write_zeroes(offset, length, flags))
    }

    fn cache(&self, offset: u64, length: u64) -> Result<(), Error> {
        self.inner.cache(offset, length)
    }

    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, Error> {
        self.inner.extents(offset, length)
    }

    fn scratch_bytes(&self, op: Op, offset: u64, length: u64) -> u64 {
        self.inner.scratch_bytes(op, offset, length)
    }

    fn starts(&self) -> bool {
        self.inner.starts()
    }

    fn can_start(&self, op: Op, offset: u64, length: u64, fua: bool) -> bool {
        !(fua && self.has_failed()) && self.inner.can_start(op, offset, length, fua)
    }

    /// As the blocking calls: a FUA write after a failure is refused (here by leaving it to
    /// `write_at_scratch`), and a started write's failure trips the latch when it is finished,
    /// before its reply can be sent.
    fn start(self: Arc<Self>, op: StartOp<'_>, done: Completion) -> Started {
        let write = matches!(op, StartOp::Write { .. });
        if matches!(op, StartOp::Write { fua: true, .. }) && self.has_failed() {
            return Started::No(done);
        }
        match self.inner.clone().start(op, done) {
            Started::Yes(inner) => Started::Yes(Box::new(LatchTicket {
                latch: self,
                inner,
                write,
            })),
            no => no,
        }
    }
}

struct LatchTicket {
    latch: Arc<Latch>,
    inner: Box<dyn Ticket>,
    write: bool,
}

impl Ticket for LatchTicket {
    fn finish(self: Box<Self>, answer: Result<Vec<u8>, Error>) -> Result<Vec<u8>, Error> {
        let r = self.inner.finish(answer);
        if self.write {
            self.latch.note(r)
        } else {
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// A device whose writes fail on demand.
    struct Flaky {
        fail_writes: AtomicBool,
        flushes: AtomicU32,
    }

    impl BlockDevice for Flaky {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn caps(&self) -> Caps {
            Caps {
                read_only: false,
                trim: false,
                fast_zero: false,
                min_block: 1,
                preferred_block: 4096,
                rotational: false,
            }
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> Result<(), Error> {
            Ok(())
        }
        fn write_at(&self, _: &[u8], _: u64, _: bool) -> Result<(), Error> {
            if self.fail_writes.load(Ordering::Relaxed) {
                Err(Error::from_io(std::io::Error::from_raw_os_error(libc::EIO)))
            } else {
                Ok(())
            }
        }
        fn flush(&self) -> Result<(), Error> {
            self.flushes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), Error> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> Result<(), Error> {
            Ok(())
        }
        fn cache(&self, _: u64, _: u64) -> Result<(), Error> {
            Ok(())
        }
        fn extents(&self, _: u64, l: u64) -> Result<Vec<Extent>, Error> {
            Ok(vec![Extent {
                length: l,
                hole: false,
                zero: false,
            }])
        }
    }

    #[test]
    fn a_failed_write_makes_every_later_flush_fail() {
        let flaky = Arc::new(Flaky {
            fail_writes: AtomicBool::new(false),
            flushes: AtomicU32::new(0),
        });
        let latch = Latch::new(flaky.clone());
        latch.write_at(b"x", 0, false).unwrap();
        latch.flush().unwrap();
        flaky.fail_writes.store(true, Ordering::Relaxed);
        assert!(latch.write_at(b"x", 0, false).is_err());
        flaky.fail_writes.store(false, Ordering::Relaxed);
        latch.write_at(b"x", 0, false).unwrap();
        let e = latch.flush().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Latched);
        assert_eq!(latch.flush().unwrap_err().kind, ErrorKind::Latched);
        assert_eq!(
            flaky.flushes.load(Ordering::Relaxed),
            1,
            "latched flushes must not reach the device"
        );
    }

    /// The NBD session writes through `write_at_scratch`: a failure there trips the latch
    /// just as through `write_at`, and a FUA write after it is refused.
    #[test]
    fn a_failed_in_place_write_trips_the_latch_too() {
        let flaky = Arc::new(Flaky {
            fail_writes: AtomicBool::new(true),
            flushes: AtomicU32::new(0),
        });
        let latch = Latch::new(flaky.clone());
        assert!(latch.write_at_scratch(&mut [1u8; 8], 0, false).is_err());
        flaky.fail_writes.store(false, Ordering::Relaxed);
        let e = latch.write_at_scratch(&mut [1u8; 8], 0, true).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Latched);
        assert_eq!(latch.flush().unwrap_err().kind, ErrorKind::Latched);
    }
}
