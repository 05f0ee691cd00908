//! The re-encryption router: a `BlockDevice` that serves one volume while its data moves from
//! the old volume key to the new one, zone by zone, over the same backing store.
//!
//! ```text
//!   0 ─────────── frontier ═══ hot zone ═══ ─────────────────────── size
//!   new key (below)            exclusive      old key (above)
//! ```
//!
//! - Every client request takes a *shared* lock on its byte range, then reads the frontier and
//!   routes: bytes below the frontier go to the new key's device, bytes at or above it to the
//!   old key's. A request that straddles the frontier is split there (the frontier is always a
//!   multiple of both sector sizes, so each half is whole sectors on its side).
//! - The re-encryption worker takes the *exclusive* lock on the hot zone `[frontier, frontier +
//!   len)`: it waits for the client requests in flight there, and new ones wait for it (an
//!   exclusive waiter blocks new shared holders of its range, so heavy client I/O cannot starve
//!   it). Requests elsewhere never wait.
//! - Inside the zone lock the worker reads the zone's plaintext through the old key, has the
//!   engine make the zone recoverable, writes it through the new key, flushes, has the engine
//!   commit, and only then moves the frontier. A request holding a shared lock therefore sees a
//!   frontier that cannot move under it: the frontier only moves across ranges that are locked
//!   exclusively, and that lock waits for the request.
//! - Before a re-encryption starts (and after it finished) there is one device and the router
//!   is a pass-through that still takes the shared locks, so a re-encryption can start under
//!   running clients.
//!
//! This module knows ranges and devices, not LUKS2: the on-disk steps are the [`ZoneEngine`]'s.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use super::{
    BlockDevice, Caps, Completion, Error, ErrorKind, Extent, Op, StartOp, Started, Ticket,
    ZeroFlags,
};

/// The on-disk half of re-encryption (the LUKS2 engine, `luks2::reencrypt`): it names the next
/// zone and rewrites it, ciphertext to ciphertext, while [`ReencryptDevice::reencrypt_zone`]
/// holds the zone's exclusive lock.
pub trait ZoneEngine {
    /// The zone the next step rewrites; it starts at the router's frontier. `None`: done.
    fn next_zone(&self) -> Option<Range<u64>>;
    /// Rewrite `zone` from the old key to the new one, crash-safely (resilience data first),
    /// make it durable and commit the new frontier (`zone.end`) to the header.
    fn rewrite_zone(&mut self, zone: Range<u64>) -> Result<(), String>;
}

/// Why a zone step failed. The frontier has not moved; the zone may be half rewritten on
/// disk, which is what the engine's recovery handles (and what the router still serves
/// correctly only if the failure came before any write, so the worker stops and latches).
#[derive(Debug)]
pub enum ZoneError {
    Block(Error),
    Engine(String),
    /// The device has no second key (not re-encrypting), or the zone is malformed.
    Invalid(String),
}

impl std::fmt::Display for ZoneError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ZoneError::Block(e) => write!(f, "zone i/o failed: {e}"),
            ZoneError::Engine(e) => write!(f, "re-encryption header step failed: {e}"),
            ZoneError::Invalid(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ZoneError {}

/// Which devices serve which side of the frontier.
#[derive(Clone)]
struct Route {
    /// The new key's device, for bytes below `frontier`; `None` when not re-encrypting.
    below: Option<Arc<dyn BlockDevice>>,
    /// The old key's device (or the only one).
    above: Arc<dyn BlockDevice>,
    frontier: u64,
    /// Frontier and zone lengths are multiples of this (the larger of the two sector sizes).
    align: u64,
    /// A zone whose rewrite failed part-way: its bytes may be under either key, so requests
    /// touching it fail (EIO) until a restart recovers it from the resilience data.
    poisoned: Option<(u64, u64)>,
}

/// Client I/O seen by the router since it was built: the worker backs off while it grows fast.
#[derive(Default)]
pub struct ClientLoad {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
}

pub struct ReencryptDevice {
    route: RwLock<Route>,
    size: u64,
    locks: SharedRangeLocks,
    load: ClientLoad,
}

impl ReencryptDevice {
    /// A pass-through over `device` (nothing to re-encrypt yet).
    pub fn single(device: Arc<dyn BlockDevice>) -> ReencryptDevice {
        let size = device.size();
        ReencryptDevice {
            route: RwLock::new(Route {
                below: None,
                above: device,
                frontier: 0,
                align: 512,
                poisoned: None,
            }),
            size,
            locks: SharedRangeLocks::default(),
            load: ClientLoad::default(),
        }
    }

    /// A re-encryption in progress: `new` serves `[0, frontier)`, `old` the rest. Both are
    /// plaintext views of the same bytes of the same backing store.
    pub fn resuming(
        old: Arc<dyn BlockDevice>,
        new: Arc<dyn BlockDevice>,
        frontier: u64,
        align: u64,
    ) -> Result<ReencryptDevice, Error> {
        let dev = ReencryptDevice::single(old);
        dev.begin(new, frontier, align)?;
        Ok(dev)
    }

    /// Start (or resume) routing: from now on `[0, frontier)` is served by `new`, which must be
    /// a view of the same backing store as the old device (a flush through one covers both).
    /// Safe under
    /// running clients: it takes the exclusive lock on `[0, frontier)` (nothing is there when
    /// starting from 0) and switches while holding it.
    pub fn begin(&self, new: Arc<dyn BlockDevice>, frontier: u64, align: u64) -> Result<(), Error> {
        let align = align.max(512);
        let bad = new.size() != self.size
            || frontier > self.size
            || !frontier.is_multiple_of(align)
            || !align.is_power_of_two();
        if bad || self.current().below.is_some() {
            return Err(Error::new(ErrorKind::Unsupported).at(Op::Open, frontier, self.size));
        }
        let _zone = self.locks.exclusive(0, frontier.max(1));
        let mut r = self.route.write().unwrap_or_else(|e| e.into_inner());
        r.below = Some(new);
        r.frontier = frontier;
        r.align = align;
        Ok(())
    }

    /// The re-encryption boundary: bytes below it are under the new key.
    pub fn frontier(&self) -> u64 {
        self.current().frontier
    }

    pub fn is_reencrypting(&self) -> bool {
        self.current().below.is_some()
    }

    pub fn load(&self) -> &ClientLoad {
        &self.load
    }

    fn current(&self) -> Route {
        self.route.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-encrypt the engine's next zone: take its exclusive lock (client requests in flight
    /// there finish first; new ones wait), flush (so the old ciphertext the engine protects is
    /// what clients were acknowledged), let the engine rewrite and commit it, move the
    /// frontier, unlock. Returns the new frontier.
    pub fn reencrypt_zone(&self, engine: &mut dyn ZoneEngine) -> Result<u64, ZoneError> {
        let Route {
            frontier, align, ..
        } = self.current();
        let Some(zone) = engine.next_zone() else {
            return Ok(frontier);
        };
        let aligned = |x: u64| x.is_multiple_of(align) || x == self.size;
        if zone.start != frontier
            || zone.end <= zone.start
            || zone.end > self.size
            || !aligned(zone.end)
        {
            return Err(ZoneError::Invalid(format!(
                "the engine's zone [{}, {}) does not start at the frontier {frontier} or is \
                 not aligned to {align}",
                zone.start, zone.end
            )));
        }
        let _zone = self.locks.exclusive(zone.start, zone.end);
        if self.current().below.is_none() {
            return Err(ZoneError::Invalid("no re-encryption in progress".into()));
        }
        self.flush().map_err(ZoneError::Block)?;
        if let Err(e) = engine.rewrite_zone(zone.clone()) {
            self.route
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .poisoned = Some((zone.start, zone.end));
            return Err(ZoneError::Engine(e));
        }
        self.route
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .frontier = zone.end;
        Ok(zone.end)
    }

    /// After the last zone (frontier = size): serve everything through the new key alone and
    /// drop the old key's device (its key is wiped when the last in-flight request lets go).
    pub fn complete(&self) -> Result<(), Error> {
        let mut r = self.route.write().unwrap_or_else(|e| e.into_inner());
        let Some(new) = r.below.clone() else {
            return Ok(());
        };
        if r.frontier != self.size {
            return Err(Error::new(ErrorKind::Unsupported).at(Op::Open, r.frontier, self.size));
        }
        // Same bytes, same key for every offset: a relabelling, safe without a range lock.
        r.above = new;
        r.below = None;
        r.frontier = 0;
        Ok(())
    }

    fn note(&self, len: u64) {
        self.load.requests.fetch_add(1, Ordering::Relaxed);
        self.load.bytes.fetch_add(len, Ordering::Relaxed);
    }

    /// Run `f` on each side of the frontier that `[offset, offset + len)` touches, under a
    /// shared lock on the range: `f(device, piece_offset, offset_within_request, piece_len)`.
    fn routed(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&dyn BlockDevice, u64, u64, u64) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let end = offset.saturating_add(len);
        let _shared = self.locks.shared(offset, end.max(offset + 1));
        let r = self.current();
        if r.poisoned
            .is_some_and(|p| overlaps(p, (offset, end.max(offset + 1))))
        {
            return Err(Error::new(ErrorKind::Io).at(op, offset, len));
        }
        match &r.below {
            None => f(&*r.above, offset, 0, len),
            Some(below) => {
                let split = r.frontier.clamp(offset, end);
                if split > offset {
                    f(&**below, offset, 0, split - offset)?;
                }
                if end > split || len == 0 {
                    f(&*r.above, split, split - offset, end - split)?;
                }
                Ok(())
            }
        }
    }
}

fn idx(n: u64) -> usize {
    // Pieces of one request's own buffer: always fit.
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl BlockDevice for ReencryptDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        let r = self.current();
        let mut caps = r.above.caps();
        if let Some(b) = &r.below {
            let other = b.caps();
            caps.read_only |= other.read_only;
            caps.trim &= other.trim;
            caps.fast_zero &= other.fast_zero;
            caps.min_block = caps.min_block.max(other.min_block);
            caps.preferred_block = caps.preferred_block.max(other.preferred_block);
        }
        caps
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::new(ErrorKind::OutOfRange).at(Op::Read, offset, len));
        }
        self.note(len);
        self.routed(Op::Read, offset, len, |dev, off, at, n| {
            dev.read_at(&mut buf[idx(at)..idx(at + n)], off)
        })
    }

    fn read_at_streaming(
        &self,
        buf: &mut [u8],
        offset: u64,
        ready: &mut dyn FnMut(&[u8]),
    ) -> Result<(), Error> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::new(ErrorKind::OutOfRange).at(Op::Read, offset, len));
        }
        self.note(len);
        // `routed` visits the pieces in ascending order, so the pieces stay in order.
        self.routed(Op::Read, offset, len, |dev, off, at, n| {
            dev.read_at_streaming(&mut buf[idx(at)..idx(at + n)], off, ready)
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), Error> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::new(ErrorKind::NoSpace).at(Op::Write, offset, len));
        }
        self.note(len);
        self.routed(Op::Write, offset, len, |dev, off, at, n| {
            dev.write_at(&buf[idx(at)..idx(at + n)], off, fua)
        })
    }

    fn write_at_scratch(&self, buf: &mut [u8], offset: u64, fua: bool) -> Result<(), Error> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::new(ErrorKind::NoSpace).at(Op::Write, offset, len));
        }
        self.note(len);
        self.routed(Op::Write, offset, len, |dev, off, at, n| {
            dev.write_at_scratch(&mut buf[idx(at)..idx(at + n)], off, fua)
        })
    }

    fn flush(&self) -> Result<(), Error> {
        // Both keys' devices are views of the same backing store (see `begin`): one flush
        // makes every completed write of either durable. (Flushing through each would double
        // the fdatasyncs of an fsync-heavy database for the whole re-encryption.)
        let r = self.current();
        r.below.as_ref().unwrap_or(&r.above).flush()
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<(), Error> {
        if offset.checked_add(length).is_none_or(|e| e > self.size) {
            return Err(Error::new(ErrorKind::OutOfRange).at(Op::Trim, offset, length));
        }
        self.note(length);
        self.routed(Op::Trim, offset, length, |dev, off, _, n| {
            dev.trim(off, n, fua)
        })
    }

    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<(), Error> {
        if offset.checked_add(length).is_none_or(|e| e > self.size) {
            return Err(Error::new(ErrorKind::NoSpace).at(Op::Zero, offset, length));
        }
        self.note(length);
        self.routed(Op::Zero, offset, length, |dev, off, _, n| {
            dev.write_zeroes(off, n, flags)
        })
    }

    fn cache(&self, offset: u64, length: u64) -> Result<(), Error> {
        // A hint: the old key's device maps offsets to the same backing bytes.
        self.current().above.cache(offset, length)
    }

    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, Error> {
        self.current().above.extents(offset, length)
    }

    fn scratch_bytes(&self, op: Op, offset: u64, length: u64) -> u64 {
        let r = self.current();
        let above = r.above.scratch_bytes(op, offset, length);
        let below = r
            .below
            .as_ref()
            .map_or(0, |b| b.scratch_bytes(op, offset, length));
        above.max(below)
    }

    fn starts(&self) -> bool {
        self.current().above.starts()
    }

    fn can_start(&self, op: Op, offset: u64, length: u64, fua: bool) -> bool {
        let r = self.current();
        r.below.is_none() && r.poisoned.is_none() && r.above.can_start(op, offset, length, fua)
    }

    /// Only while not re-encrypting (one device): the request takes its shared range lock
    /// first, as `routed` does, and keeps it in its ticket until it is finished, so a zone step
    /// (or `begin`) waits for started requests exactly as for blocking ones. While a
    /// re-encryption runs, requests are left to the blocking path (`No`).
    fn start(self: Arc<Self>, op: StartOp<'_>, done: Completion) -> Started {
        let (offset, len) = match &op {
            StartOp::Read { offset, length, .. } => (*offset, *length as u64),
            StartOp::Write { offset, data, .. } => (*offset, data.len() as u64),
        };
        let end = offset.saturating_add(len);
        if end > self.size || len == 0 {
            return Started::No(done);
        }
        // Held by the ticket from here on (released by its drop).
        std::mem::forget(self.locks.shared(offset, end));
        let range = (offset, end);
        let r = self.current();
        if r.below.is_some() || r.poisoned.is_some() {
            drop(SharedGuard {
                locks: &self.locks,
                range,
            });
            return Started::No(done);
        }
        self.note(len);
        match r.above.start(op, done) {
            Started::Yes(inner) => Started::Yes(Box::new(RoutedTicket {
                router: self,
                range,
                inner: Some(inner),
            })),
            no => {
                drop(SharedGuard {
                    locks: &self.locks,
                    range,
                });
                no
            }
        }
    }
}

/// A started request's shared range lock, held until it is finished (or dropped).
struct RoutedTicket {
    router: Arc<ReencryptDevice>,
    range: (u64, u64),
    inner: Option<Box<dyn Ticket>>,
}

impl Drop for RoutedTicket {
    fn drop(&mut self) {
        drop(SharedGuard {
            locks: &self.router.locks,
            range: self.range,
        });
    }
}

impl Ticket for RoutedTicket {
    fn finish(mut self: Box<Self>, answer: Result<Vec<u8>, Error>) -> Result<Vec<u8>, Error> {
        match self.inner.take() {
            Some(t) => t.finish(answer),
            None => answer,
        }
    }
}

/// Shared/exclusive locks on half-open byte ranges. Shared holders never wait for each other;
/// there is at most one exclusive holder or waiter at a time (the worker), and while it waits,
/// new shared holders of an overlapping range wait behind it.
#[derive(Default)]
struct SharedRangeLocks {
    state: Mutex<LockState>,
    changed: Condvar,
}

#[derive(Default)]
struct LockState {
    shared: Vec<(u64, u64)>,
    /// The exclusive range, held or wanted.
    exclusive: Option<(u64, u64)>,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

struct SharedGuard<'a> {
    locks: &'a SharedRangeLocks,
    range: (u64, u64),
}

struct ExclusiveGuard<'a> {
    locks: &'a SharedRangeLocks,
}

impl SharedRangeLocks {
    fn shared(&self, start: u64, end: u64) -> SharedGuard<'_> {
        let range = (start, end);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while st.exclusive.is_some_and(|x| overlaps(x, range)) {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.shared.push(range);
        SharedGuard { locks: self, range }
    }

    fn exclusive(&self, start: u64, end: u64) -> ExclusiveGuard<'_> {
        let range = (start, end);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // One worker: a second exclusive user waits for the first to finish.
        while st.exclusive.is_some() {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        // Claimed now: new overlapping shared holders wait from this point on.
        st.exclusive = Some(range);
        while st.shared.iter().any(|&s| overlaps(s, range)) {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        ExclusiveGuard { locks: self }
    }
}

impl Drop for SharedGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.locks.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = st.shared.iter().position(|r| *r == self.range) {
            st.shared.swap_remove(i);
        }
        let wake = st.exclusive.is_some_and(|x| overlaps(x, self.range));
        drop(st);
        if wake {
            self.locks.changed.notify_all();
        }
    }
}

impl Drop for ExclusiveGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.locks.state.lock().unwrap_or_else(|e| e.into_inner());
        st.exclusive = None;
        drop(st);
        self.locks.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::crypt::{CryptDevice, Segment};
    use crate::crypto::keys::VolumeKey;
    use crate::crypto::xts::SectorCipher;
    use sha2::{Digest, Sha256};
    use std::sync::atomic::AtomicBool;

    /// A memory disk with a volatile write cache: writes land in `current`; `flush` (or a FUA
    /// write) makes them durable; a crash (after `ops_left` operations) reverts to `durable`
    /// and fails every later operation, like a machine that lost power.
    struct Disk {
        current: Mutex<Vec<u8>>,
        durable: Mutex<Vec<u8>>,
        ops_left: AtomicU64,
        crashed: AtomicBool,
    }

    impl Disk {
        fn new(size: usize) -> Arc<Disk> {
            Arc::new(Disk {
                current: Mutex::new(vec![0; size]),
                durable: Mutex::new(vec![0; size]),
                ops_left: AtomicU64::new(u64::MAX),
                crashed: AtomicBool::new(false),
            })
        }
        fn tick(&self) -> Result<(), Error> {
            if self.crashed.load(Ordering::SeqCst) {
                return Err(Error::new(ErrorKind::Io));
            }
            if self.ops_left.fetch_sub(1, Ordering::SeqCst) == 1 {
                self.crashed.store(true, Ordering::SeqCst);
                let d = self.durable.lock().unwrap().clone();
                *self.current.lock().unwrap() = d;
                return Err(Error::new(ErrorKind::Io));
            }
            Ok(())
        }
        /// Power back on: the durable contents, nothing pending.
        fn reboot(&self) {
            let d = self.durable.lock().unwrap().clone();
            *self.current.lock().unwrap() = d;
            self.ops_left.store(u64::MAX, Ordering::SeqCst);
            self.crashed.store(false, Ordering::SeqCst);
        }
    }

    impl BlockDevice for Disk {
        fn size(&self) -> u64 {
            self.current.lock().unwrap().len() as u64
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
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
            self.tick()?;
            let m = self.current.lock().unwrap();
            buf.copy_from_slice(&m[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), Error> {
            self.tick()?;
            let r = offset as usize..offset as usize + buf.len();
            self.current.lock().unwrap()[r.clone()].copy_from_slice(buf);
            if fua {
                self.durable.lock().unwrap()[r].copy_from_slice(buf);
            }
            Ok(())
        }
        fn flush(&self) -> Result<(), Error> {
            self.tick()?;
            let c = self.current.lock().unwrap();
            self.durable.lock().unwrap().copy_from_slice(&c);
            Ok(())
        }
        fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), Error> {
            Err(Error::new(ErrorKind::Unsupported))
        }
        fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> Result<(), Error> {
            Err(Error::new(ErrorKind::Unsupported))
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

    const DATA: u64 = 4096;

    fn crypt(disk: &Arc<Disk>, key_byte: u8, sector: usize, size: u64) -> Arc<dyn BlockDevice> {
        let key = VolumeKey::from_slice(&[key_byte; 64]);
        let cipher = SectorCipher::new(&key, sector).unwrap();
        let seg = Segment {
            offset: DATA,
            size,
            iv_tweak: 0,
        };
        Arc::new(CryptDevice::new(disk.clone(), cipher, seg, false).unwrap())
    }

    /// A checksum-resilience engine in the image of LUKS2's: the "header" (frontier, hot zone
    /// and the SHA-256 of each of its sectors' old ciphertext) is durable at once.
    #[derive(Default, Clone)]
    struct Header {
        frontier: u64,
        hot: Option<(u64, u64, Vec<[u8; 32]>)>,
    }

    struct TestEngine {
        disk: Arc<Disk>,
        header: Arc<Mutex<Header>>,
        old: Arc<dyn BlockDevice>,
        new: Arc<dyn BlockDevice>,
        sector: u64,
        size: u64,
        /// Bytes of the next zone.
        zone: u64,
        /// Negative controls: no flush before the commit; no checksums.
        skip_sync: bool,
        skip_resilience: bool,
    }

    impl ZoneEngine for TestEngine {
        fn next_zone(&self) -> Option<Range<u64>> {
            let f = self.header.lock().unwrap().frontier;
            (f < self.size).then(|| f..(f + self.zone).min(self.size))
        }
        fn rewrite_zone(&mut self, zone: Range<u64>) -> Result<(), String> {
            let e = |e: Error| e.to_string();
            let mut sums = Vec::new();
            let mut buf = vec![0u8; self.sector as usize];
            if !self.skip_resilience {
                for at in zone.clone().step_by(self.sector as usize) {
                    self.disk.read_at(&mut buf, DATA + at).map_err(e)?;
                    sums.push(Sha256::digest(&buf).into());
                }
            }
            self.header.lock().unwrap().hot = Some((zone.start, zone.end - zone.start, sums));
            let mut plain = vec![0u8; (zone.end - zone.start) as usize];
            self.old.read_at(&mut plain, zone.start).map_err(e)?;
            self.new.write_at(&plain, zone.start, false).map_err(e)?;
            if !self.skip_sync {
                self.disk.flush().map_err(e)?;
            }
            // A header write is an I/O that a crash can prevent.
            self.disk.tick().map_err(e)?;
            let mut h = self.header.lock().unwrap();
            h.frontier = zone.end;
            h.hot = None;
            Ok(())
        }
    }

    /// What the daemon does at unlock after a crash: sectors of the hot zone whose ciphertext
    /// still matches a checksum are old and get re-encrypted; the others are already new.
    fn recover(disk: &Arc<Disk>, header: &Mutex<Header>, old: u8, new: u8, sector: u64, size: u64) {
        let mut h = header.lock().unwrap();
        let Some((start, len, sums)) = h.hot.take() else {
            return;
        };
        let (o, n) = (
            crypt(disk, old, sector as usize, size),
            crypt(disk, new, sector as usize, size),
        );
        let mut buf = vec![0u8; sector as usize];
        for (i, sum) in sums.iter().enumerate() {
            let at = start + i as u64 * sector;
            disk.read_at(&mut buf, DATA + at).unwrap();
            if <[u8; 32]>::from(Sha256::digest(&buf)) == *sum {
                o.read_at(&mut buf, at).unwrap();
                n.write_at(&buf, at, false).unwrap();
            }
        }
        disk.flush().unwrap();
        h.frontier = start + len;
    }

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

    /// Many frontier moves under concurrent unaligned writers and readers: each thread owns
    /// interleaved 1000-byte stripes (so sectors are shared and split at the frontier), checks
    /// every read of its own stripes against what it last wrote, and at the end the whole
    /// device (and the disk, through the new key alone) holds exactly the last writes.
    #[test]
    fn concurrent_clients_see_their_last_writes_across_many_frontier_moves() {
        for (old_sector, new_sector) in [(512usize, 4096usize), (4096, 512), (4096, 4096)] {
            let size = 512 * 1024u64;
            let disk = Disk::new((DATA + size) as usize);
            let old = crypt(&disk, 1, old_sector, size);
            old.write_at(&vec![0u8; size as usize], 0, false).unwrap();
            let dev = Arc::new(ReencryptDevice::single(old));
            dev.begin(
                crypt(&disk, 2, new_sector, size),
                0,
                old_sector.max(new_sector) as u64,
            )
            .unwrap();
            let header = Arc::new(Mutex::new(Header::default()));
            let stop = Arc::new(AtomicBool::new(false));
            const STRIPE: u64 = 1000;
            const THREADS: u64 = 4;
            let clients: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (dev, stop) = (dev.clone(), stop.clone());
                    std::thread::spawn(move || {
                        let stripes = size / (STRIPE * THREADS);
                        let mut mine = vec![0u8; stripes as usize];
                        let mut rng = Rng(0x1234_5678 + t);
                        let mut rounds = 0u64;
                        while !stop.load(Ordering::Relaxed) || rounds < 2000 {
                            rounds += 1;
                            let k = rng.below(stripes);
                            let at = k * STRIPE * THREADS + t * STRIPE;
                            if rng.below(2) == 0 {
                                let v = (rng.below(255) + 1) as u8;
                                dev.write_at(&[v; STRIPE as usize], at, rng.below(8) == 0)
                                    .unwrap();
                                mine[k as usize] = v;
                            } else {
                                let mut got = [0u8; STRIPE as usize];
                                dev.read_at(&mut got, at).unwrap();
                                let want = mine[k as usize];
                                assert!(
                                    got.iter().all(|&b| b == want),
                                    "thread {t} stripe {k} at {at}: want {want}, frontier {}",
                                    dev.frontier()
                                );
                            }
                        }
                        (t, mine)
                    })
                })
                .collect();
            let mut engine = TestEngine {
                disk: disk.clone(),
                header: header.clone(),
                old: crypt(&disk, 1, old_sector, size),
                new: crypt(&disk, 2, new_sector, size),
                sector: old_sector as u64,
                size,
                zone: 4096,
                skip_sync: false,
                skip_resilience: false,
            };
            let mut moves = 0;
            let mut rng = Rng(99);
            while dev.frontier() < size {
                engine.zone = 4096 * (1 + rng.below(2));
                dev.reencrypt_zone(&mut engine).unwrap();
                moves += 1;
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            dev.complete().unwrap();
            stop.store(true, Ordering::Relaxed);
            let mut model = vec![0u8; size as usize];
            for c in clients {
                let (t, mine) = c.join().unwrap();
                for (k, v) in mine.iter().enumerate() {
                    let at = (k as u64 * STRIPE * THREADS + t * STRIPE) as usize;
                    model[at..at + STRIPE as usize].fill(*v);
                }
            }
            assert!(moves > 60, "only {moves} frontier moves");
            let mut all = vec![0u8; size as usize];
            dev.read_at(&mut all, 0).unwrap();
            assert!(
                all == model,
                "router contents differ ({old_sector}->{new_sector})"
            );
            let direct = crypt(&disk, 2, new_sector, size);
            direct.read_at(&mut all, 0).unwrap();
            assert!(
                all == model,
                "disk is not all under the new key ({old_sector}->{new_sector})"
            );
        }
    }

    /// One crash trial: clients write with FUA (acknowledged = durable) between zone steps; the
    /// disk loses power after `crash_after` operations; recovery finishes the hot zone; every
    /// block must read back what was last acknowledged. Returns whether it did.
    fn crash_trial(seed: u64, crash_after: u64, skip_sync: bool, skip_resilience: bool) -> bool {
        let (sector, size) = (4096u64, 256 * 1024u64);
        let disk = Disk::new((DATA + size) as usize);
        let old = crypt(&disk, 1, sector as usize, size);
        let mut rng = Rng(seed);
        let mut model: Vec<u8> = (0..size).map(|_| rng.next() as u8).collect();
        old.write_at(&model, 0, true).unwrap();
        let dev = ReencryptDevice::single(old);
        dev.begin(crypt(&disk, 2, sector as usize, size), 0, sector)
            .unwrap();
        let header = Arc::new(Mutex::new(Header::default()));
        let mut engine = TestEngine {
            disk: disk.clone(),
            header: header.clone(),
            old: crypt(&disk, 1, sector as usize, size),
            new: crypt(&disk, 2, sector as usize, size),
            sector,
            size,
            zone: 8192,
            skip_sync,
            skip_resilience,
        };
        disk.ops_left.store(crash_after, Ordering::SeqCst);
        'run: while dev.frontier() < size {
            for _ in 0..3 {
                let at = rng.below(size - 5000);
                let data: Vec<u8> = (0..1 + rng.below(5000)).map(|_| rng.next() as u8).collect();
                if dev.write_at(&data, at, true).is_err() {
                    break 'run;
                }
                model[at as usize..at as usize + data.len()].copy_from_slice(&data);
            }
            engine.zone = 8192 * (1 + rng.below(3));
            if dev.reencrypt_zone(&mut engine).is_err() {
                break;
            }
        }
        drop(dev);
        disk.reboot();
        recover(&disk, &header, 1, 2, sector, size);
        let frontier = header.lock().unwrap().frontier;
        let dev = ReencryptDevice::resuming(
            crypt(&disk, 1, sector as usize, size),
            crypt(&disk, 2, sector as usize, size),
            frontier,
            sector,
        )
        .unwrap();
        let mut all = vec![0u8; size as usize];
        dev.read_at(&mut all, 0).unwrap();
        all == model
    }

    #[test]
    fn a_crash_at_any_operation_loses_no_acknowledged_write() {
        for seed in 1..=150u64 {
            let crash_after = 1 + Rng(seed * 7919).below(400);
            assert!(
                crash_trial(seed, crash_after, false, false),
                "seed {seed}: crash after {crash_after} operations lost data"
            );
        }
    }

    /// The trial above must be able to fail: without the flush before the commit, or without
    /// the checksums, some crash point loses a zone.
    #[test]
    fn negative_control_the_crash_trial_catches_a_lost_zone() {
        for (skip_sync, skip_resilience) in [(true, false), (false, true)] {
            let caught = (1..=150u64).any(|seed| {
                let crash_after = 1 + Rng(seed * 7919).below(400);
                !crash_trial(seed, crash_after, skip_sync, skip_resilience)
            });
            assert!(
                caught,
                "skip_sync={skip_sync} skip_resilience={skip_resilience}: no trial lost data"
            );
        }
    }

    #[test]
    fn the_worker_waits_for_a_request_inside_its_zone_and_requests_wait_for_it() {
        // A shared holder blocks the exclusive one; the exclusive one, once granted, blocks
        // overlapping shared holders but not disjoint ones.
        let l2 = Arc::new(SharedRangeLocks::default());
        let g = l2.shared(0, 10);
        let (tx, rx) = std::sync::mpsc::channel();
        let l3 = l2.clone();
        let t = std::thread::spawn(move || {
            let _x = l3.exclusive(5, 20);
            tx.send(()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(50));
        });
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(50))
            .is_err());
        let _disjoint = l2.shared(20, 30);
        drop(g);
        rx.recv().unwrap();
        let t0 = std::time::Instant::now();
        let _after = l2.shared(0, 6);
        assert!(t0.elapsed() >= std::time::Duration::from_millis(20));
        t.join().unwrap();
    }

    /// An engine failure part-way through a zone leaves it under either key: the router
    /// refuses I/O there (EIO) instead of decrypting with a guess, and serves the rest.
    #[test]
    fn a_zone_whose_rewrite_failed_answers_eio_and_the_rest_is_served() {
        struct Failing;
        impl ZoneEngine for Failing {
            fn next_zone(&self) -> Option<Range<u64>> {
                Some(0..8192)
            }
            fn rewrite_zone(&mut self, _: Range<u64>) -> Result<(), String> {
                Err("disk on fire".into())
            }
        }
        let size = 64 * 1024u64;
        let disk = Disk::new((DATA + size) as usize);
        let old = crypt(&disk, 1, 4096, size);
        old.write_at(&vec![5u8; size as usize], 0, false).unwrap();
        let dev = ReencryptDevice::single(old);
        dev.begin(crypt(&disk, 2, 4096, size), 0, 4096).unwrap();
        assert!(matches!(
            dev.reencrypt_zone(&mut Failing),
            Err(ZoneError::Engine(_))
        ));
        assert_eq!(dev.frontier(), 0);
        let mut b = [0u8; 4096];
        assert_eq!(dev.read_at(&mut b, 4096).unwrap_err().kind, ErrorKind::Io);
        assert_eq!(dev.write_at(&b, 0, false).unwrap_err().kind, ErrorKind::Io);
        dev.read_at(&mut b, 8192).unwrap();
        assert!(b.iter().all(|&x| x == 5));
    }
}
