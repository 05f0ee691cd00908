//! The transmission phase: read a request, validate it once, run it on the block device, and
//! send exactly one reply, in whatever order requests complete.
//!
//! Threads, as nbdkit's "parallel" model: each connection has a small pool of worker threads.
//! A worker takes the read lock, frames one request (header, then payload), validates it and
//! takes byte-budget permits, releases the read lock, runs the request on the device and hands
//! the reply to the connection's outbox. So the thread that reads a request also serves it: no
//! hand-offs on the hot path, and requests complete out of order.
//!
//! Reading never waits on writing. One thread at a time owns the socket. A worker that finds
//! it free takes it and sends its reply itself with blocking writes (as nbdkit's threads do),
//! then whatever other workers queued meanwhile, and gives it up; a worker that finds it taken
//! queues its reply, with the budget it holds, and goes back to reading requests. Blocking is
//! safe because only the owner blocks and the connection has at least one other worker that
//! keeps reading requests. A connection with a single worker never blocks on the socket: it
//! sends what the socket takes without blocking and leaves the rest to the connection's writer
//! thread, which sends queued replies in batches with blocking vectored writes. (Handing every
//! reply larger than the socket buffer to the writer thread, as before, cost a thread wake-up
//! per 1 MiB READ and took the reply buffer away from the worker, which then often had to
//! allocate and fault in a fresh one.) Large READs with structured replies are streamed: each
//! piece the device has read and decrypted is sent as its own chunk at once (`stream_read`). If
//! every worker could block writing its reply (waiting for the socket in turn, as before
//! issue 14's fix), a client that reads replies
//! only when its own writes would block (the NBD reference `nbd-tester-client`, any
//! single-threaded poll loop) deadlocks with us until its poll times out: every worker blocks
//! on a reply the client is not reading yet, nobody reads the next request, so the client's
//! socket never becomes writable and it sits out its whole wait (issue 14). Now the
//! connection keeps reading requests while replies are backed up, until the byte budgets are
//! spent: then the worker holding the read lock waits and the connection stops reading —
//! back-pressure, bounded by what the client asked for, not by the socket.
//!
//! Devices that are themselves asynchronous (an upstream NBD server below: `BlockDevice::starts`)
//! get READs and WRITEs without a thread waiting for each: the worker that read the request
//! starts it on the device (`Session::try_start`: the crypt layer encrypts a WRITE in place and
//! the upstream client puts it on its socket) and, still holding the read lock, goes on reading
//! the next request; the upstream connection's reader thread hands the answer to the session's
//! completer thread, which finishes it (decrypts a READ, notes a failure in the fail-stop latch,
//! releases the layers' range locks) and sends the reply as any worker would. Per request that
//! saves the two thread wake-ups of the blocking path (the read lock passed to the next worker,
//! the worker woken by its answer): the completer and the reader wake once per batch. A reply is
//! still sent only after the device's answer; FLUSH, TRIM, unaligned and other requests, and
//! every request while an online re-encryption runs, take the blocking path.
//!
//! Memory: every request is charged, before any I/O, the bytes it will really hold while it is
//! in flight — its payload or reply buffer with the page-alignment slack, the scratch the
//! device layers allocate for it (the crypt layer's ciphertext chunk and read-modify-write
//! buffer), a BLOCK_STATUS reply's descriptors — plus a fixed overhead; the charge is given
//! back once its reply has left the process. Idle buffers kept for reuse between requests are
//! bounded apart: at most `KEEP_BUFFER` bytes each and `RETAIN` bytes per connection in all.
//!
//! The handshake runs on the async reactor; the socket is handed here afterwards. A controller
//! stops a session by setting `stop` and shutting the socket's read side (`Stopper`).

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tracing::{debug, warn};

use super::codec::{self, Command, RequestHeader};
use super::errno::{self, NbdErrno};
use super::handshake::Negotiated;
use super::wire::*;
use super::ProtocolError;
use crate::block::{Completion, Error as BlockError, Op, StartOp, Started, Ticket, ZeroFlags};
use crate::export::{Export, IoStats};

/// Fixed cost charged per request on top of its buffers, so many tiny requests are bounded too:
/// covers its queue entry, small reply allocation and allocator overhead (a few hundred bytes).
const REQUEST_OVERHEAD: u64 = 1024;
/// Most descriptors in one BLOCK_STATUS reply (spec: SHOULD NOT exceed 2^20; the file backend
/// reports at most 1024 extents per call anyway).
const MAX_EXTENTS: usize = 1024;
/// Bytes a BLOCK_STATUS request holds at most: the device's extent list and the reply.
const BLOCK_STATUS_COST: u64 = (MAX_EXTENTS * (std::mem::size_of::<crate::block::Extent>() + 8)
    + codec::CHUNK_HEADER_LEN
    + 4) as u64;
/// READs longer than this are streamed piece by piece when possible (`Session::stream_read`):
/// one piece of the device's (256 KiB) would gain nothing.
const STREAM_MIN: u32 = 256 << 10;
/// Replies one vectored write of the writer thread carries at most.
const BATCH: usize = 64;

/// Memory limits for requests in flight.
#[derive(Clone)]
pub struct Budget {
    /// Shared by every connection of the server.
    pub server: Arc<ByteBudget>,
    /// Bytes one connection may have in flight; at least MAX_PAYLOAD + REQUEST_OVERHEAD.
    pub per_connection: u64,
    /// Worker threads per connection: the most requests one connection has in flight.
    pub threads: usize,
}

/// A counting semaphore over bytes, for blocking threads.
pub struct ByteBudget {
    capacity: u64,
    free: Mutex<u64>,
    returned: Condvar,
}

impl ByteBudget {
    pub fn new(bytes: u64) -> ByteBudget {
        ByteBudget {
            capacity: bytes,
            free: Mutex::new(bytes),
            returned: Condvar::new(),
        }
    }

    /// Take `n` bytes, waiting until they are free. A request that costs more than the whole
    /// budget (a 32 MiB request's alignment slack and scratch on top of a minimal budget)
    /// takes all of it: it runs alone instead of never.
    fn take(&self, n: u64) -> Grant<'_> {
        let n = n.min(self.capacity);
        let mut free = lock(&self.free);
        while *free < n {
            free = self.returned.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= n;
        Grant { budget: self, n }
    }
}

/// The byte budgets a request holds until its reply has been sent.
type Grants<'a> = [Grant<'a>; 2];

/// Bytes taken from a budget, given back on drop.
struct Grant<'a> {
    budget: &'a ByteBudget,
    n: u64,
}

impl Drop for Grant<'_> {
    fn drop(&mut self) {
        *lock(&self.budget.free) += self.n;
        self.budget.returned.notify_all();
    }
}

/// Why the session ended without a protocol error.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Client sent NBD_CMD_DISC or closed between requests.
    Disconnected,
    /// Server shutdown or volume lock.
    Stopped,
}

/// Lets another thread end a session: in-flight requests finish, then the session returns.
#[derive(Clone)]
pub struct Stopper {
    flag: Arc<AtomicBool>,
    socket: Arc<dyn Fn() + Send + Sync>,
}

impl Stopper {
    /// `shut_read` must make a blocked read on the session's socket return (shutdown(SHUT_RD)).
    pub fn new(shut_read: impl Fn() + Send + Sync + 'static) -> Stopper {
        Stopper {
            flag: Arc::new(AtomicBool::new(false)),
            socket: Arc::new(shut_read),
        }
    }

    pub fn stop(&self) {
        self.flag.store(true, Ordering::Release);
        (self.socket)();
    }

    fn stopped(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }
}

/// One validated request, ready to run; a WRITE's payload is in the worker's input buffer.
struct Job {
    header: RequestHeader,
    structured: bool,
}

/// Buffers kept in the worker bound to one request at a time, instead of malloc per request
/// (fresh large allocations are fresh pages: page faults cost more than the I/O at 1 MiB).
#[derive(Default)]
struct Buffers {
    input: Scratch,
    output: Scratch,
}

/// A reusable buffer. `kept` is what it counts toward the connection's `retained` bytes.
#[derive(Default)]
struct Scratch(Vec<u8>, usize);

/// Buffers above this size are released after use, so idle connections don't pin 32 MiB each.
/// Large enough for 1 MiB requests (their buffers are what page faults would cost most on).
pub const KEEP_BUFFER: usize = (1 << 20) + 2 * PAGE;
/// Bytes of idle buffers one connection keeps for reuse, all workers and the pool together:
/// one 1 MiB request's buffer for each of the default 16 workers. At exactly 16 MiB the last
/// worker's buffer (1 MiB + alignment slack) never fitted, so one 1 MiB READ in 16 paid for a
/// fresh buffer (zero-fill and page faults of 1 MiB, then the free): 60 000 page faults per 8 s
/// of sequential reads in the profile.
pub const RETAIN: usize = 16 * KEEP_BUFFER;

impl Scratch {
    /// `n` bytes of the buffer, starting page-aligned (so O_DIRECT can use them); zero-filled
    /// only where it grows, and always fully overwritten by its user (the device fills reads
    /// completely or fails).
    fn get(&mut self, n: usize) -> &mut [u8] {
        self.get_aligned(n, 0)
    }

    /// `n` bytes whose byte `lead` is page-aligned: a reply header of `lead` bytes followed by
    /// data that the backend reads with O_DIRECT. Same `n` and `lead` give the same bytes.
    fn get_aligned(&mut self, n: usize, lead: usize) -> &mut [u8] {
        let r = self.aligned_range(n, lead);
        &mut self.0[r]
    }

    fn aligned_range(&mut self, n: usize, lead: usize) -> std::ops::Range<usize> {
        let need = n + PAGE;
        if self.0.len() < need {
            self.0.resize(need, 0);
        }
        let start = (self.0.as_ptr() as usize).wrapping_add(lead);
        let skip = (PAGE - start % PAGE) % PAGE;
        skip..skip + n
    }

    /// After a request: keep the buffer for the next one if it is small enough and the
    /// connection's kept buffers stay within RETAIN, else free it.
    fn trim(&mut self, retained: &AtomicUsize) {
        retained.fetch_sub(std::mem::take(&mut self.1), Ordering::AcqRel);
        let n = self.0.len();
        if n == 0 {
            return;
        }
        let fits = n <= KEEP_BUFFER && retained.fetch_add(n, Ordering::AcqRel) + n <= RETAIN;
        if fits {
            self.1 = n;
        } else {
            if n <= KEEP_BUFFER {
                retained.fetch_sub(n, Ordering::AcqRel);
            }
            self.0 = Vec::new();
        }
    }

    /// Leaves the connection's kept buffers (it goes with a reply, charged to its budget).
    fn release(&mut self, retained: &AtomicUsize) {
        retained.fetch_sub(std::mem::take(&mut self.1), Ordering::AcqRel);
    }
}

/// Alignment of worker buffers: what O_DIRECT needs on every device we expect.
const PAGE: usize = 4096;

/// A reply: either small and owned, or the first `n` bytes of the worker's output buffer.
enum Out {
    Owned(Vec<u8>),
    Output { len: usize, lead: usize },
}

/// What the reader produced under the read lock.
enum Next {
    Run(Job),
    /// Rejected during validation: the error reply to send.
    Reply(Vec<u8>),
}

/// A reply on its way to the socket, holding its request's budget until it has been sent.
struct Reply<'a> {
    body: Body,
    /// Bytes already on the socket.
    sent: usize,
    _grants: Grants<'a>,
    /// Records the request's latency when the reply has been written (metrics).
    _timer: Option<crate::metrics::RequestTimer>,
}

enum Body {
    Owned(Vec<u8>),
    /// `range` of a worker's output buffer (a READ's reply: header and data).
    Output {
        buf: Scratch,
        range: std::ops::Range<usize>,
    },
    /// A started READ's reply: its header, and the data as the device answered it.
    Split {
        head: Vec<u8>,
        data: Vec<u8>,
    },
}

impl Body {
    /// The reply's bytes as one slice (the non-blocking paths; a `Split` body is made whole
    /// first by `flatten`, and never reaches them: requests are only started when the socket's
    /// owner may block, see `Session::try_start`).
    fn bytes(&self) -> &[u8] {
        match self {
            Body::Owned(v) => v,
            Body::Output { buf, range } => &buf.0[range.clone()],
            Body::Split { head, .. } => head,
        }
    }

    fn len(&self) -> usize {
        match self {
            Body::Split { head, data } => head.len() + data.len(),
            b => b.bytes().len(),
        }
    }

    /// The bytes from `from` on, in at most two pieces.
    fn rest(&self, from: usize) -> [&[u8]; 2] {
        match self {
            Body::Split { head, data } if from < head.len() => [&head[from..], data],
            Body::Split { head, data } => [&data[from - head.len()..], &[]],
            b => [&b.bytes()[from..], &[]],
        }
    }

    fn flatten(&mut self) {
        if let Body::Split { head, data } = self {
            let mut v = std::mem::take(head);
            v.extend_from_slice(data);
            *self = Body::Owned(v);
        }
    }
}

/// Replies waiting for the socket. Whoever sets `busy` owns the socket until it clears it, so
/// replies never interleave.
struct Outbox<'a> {
    state: Mutex<OutState<'a>>,
    /// Wakes the writer thread: replies queued while nobody owns the socket, or the end.
    ready: Condvar,
    /// Output buffers the writer has finished with, for workers to reuse (at most `threads`).
    pool: Mutex<Vec<Scratch>>,
    pool_cap: usize,
}

struct OutState<'a> {
    queue: VecDeque<Reply<'a>>,
    busy: bool,
    /// Every worker has exited: the writer sends what is queued and ends.
    closed: bool,
}

/// The write side of the session's socket.
pub trait ReplySink: Write + Send {
    /// Write as much of `buf` as the socket takes right now, without blocking: `Ok(n)`, or
    /// `WouldBlock` when it takes nothing (send with MSG_DONTWAIT).
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize>;
}

/// The socket's read side, noting when each read returned data: the start time of the
/// requests that read delivered (metrics), one clock read per read instead of one per request.
struct Stamped {
    inner: Box<dyn Read + Send>,
    at: Option<std::time::Instant>,
}

impl Read for Stamped {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.at = Some(std::time::Instant::now());
        }
        Ok(n)
    }
}

struct ReadSide {
    reader: BufReader<Stamped>,
    /// Set once the session has decided to end; later workers exit without reading.
    done: bool,
}

struct Session<'a> {
    neg: &'a Negotiated,
    read: Mutex<ReadSide>,
    write: Mutex<Box<dyn ReplySink>>,
    out: Outbox<'a>,
    conn_budget: &'a ByteBudget,
    server_budget: &'a ByteBudget,
    stopper: &'a Stopper,
    /// The first way the session ended; later ones are consequences.
    outcome: Mutex<Option<Result<End, ProtocolError>>>,
    /// The write side failed: the client is gone.
    broken: AtomicBool,
    /// Bytes of idle buffers kept for reuse (at most RETAIN).
    retained: AtomicUsize,
    /// The worker that owns the socket may send with blocking writes: true when the connection
    /// has at least two workers. Only the owner writes; the others queue their replies and go
    /// back to reading requests, so one worker blocked on a client that is not reading yet
    /// never stops the request stream (the stall of issue 14 needed *every* worker blocked in
    /// a write). With a single worker, blocking would stop reading, so it only tries
    /// non-blocking sends and leaves the rest to the writer thread.
    may_block: AtomicBool,
    /// Large READs are streamed (`stream_read`); the environment variable
    /// NBDCRYPT_BENCH_NO_STREAM (benchmarks only) turns it off, to compare both in one build.
    stream_reads: bool,
    /// The device starts requests (`BlockDevice::starts`: an upstream NBD server below): READs
    /// and WRITEs go from the thread that read them straight to the device, and the completer
    /// thread replies when they are answered (see `Session::try_start`). The environment
    /// variable NBDCRYPT_BENCH_NO_START (benchmarks only) turns it off.
    starts: bool,
    /// WRITEs are started too; NBDCRYPT_BENCH_NO_START_WRITES (benchmarks only) leaves them to
    /// the blocking path.
    start_writes: bool,
    /// Started requests by sequence number, until the completer has replied.
    started: Mutex<HashMap<u64, InFlight<'a>>>,
    next_seq: AtomicU64,
    /// Answers of started requests, from the device's completion callbacks.
    answers: Arc<Answers>,
    /// Spare buffers for started READs (counted in `retained`).
    spare: Mutex<Vec<Vec<u8>>>,
}

/// A started request: what its reply needs, and what it holds until then.
struct InFlight<'a> {
    header: RequestHeader,
    structured: bool,
    grants: Grants<'a>,
    timer: Option<crate::metrics::RequestTimer>,
    /// Set by the reader right after `start` returned.
    ticket: Option<Box<dyn Ticket>>,
    /// An answer that came before the ticket was set (the device answered inside `start`).
    early: Option<Result<Vec<u8>, BlockError>>,
}

/// Answers of started requests by sequence number, from any thread to the completer thread.
#[derive(Default)]
struct Answers {
    state: Mutex<AnswerState>,
    ready: Condvar,
}

#[derive(Default)]
struct AnswerState {
    done: Vec<(u64, Result<Vec<u8>, BlockError>)>,
    /// Every worker has exited: once nothing is in flight, the completer ends.
    closed: bool,
    /// The completer waits: the next answer wakes it.
    idle: bool,
}

impl Answers {
    fn put(&self, seq: u64, r: Result<Vec<u8>, BlockError>) {
        let mut st = lock(&self.state);
        st.done.push((seq, r));
        if st.idle {
            st.idle = false;
            drop(st);
            self.ready.notify_one();
        }
    }
}

/// Serve a negotiated connection until the client disconnects, the stopper fires or the peer
/// breaks the protocol. Blocks the calling thread; runs `budget.threads` workers.
pub fn serve(
    neg: Negotiated,
    reader: Box<dyn Read + Send>,
    writer: Box<dyn ReplySink>,
    budget: Budget,
    stopper: Stopper,
) -> Result<End, ProtocolError> {
    let threads = budget.threads.max(1);
    let conn_budget = ByteBudget::new(budget.per_connection);
    let session = Session {
        neg: &neg,
        read: Mutex::new(ReadSide {
            reader: BufReader::with_capacity(
                256 * 1024,
                Stamped {
                    inner: reader,
                    at: None,
                },
            ),
            done: false,
        }),
        write: Mutex::new(writer),
        out: Outbox {
            state: Mutex::new(OutState {
                queue: VecDeque::new(),
                busy: false,
                closed: false,
            }),
            ready: Condvar::new(),
            pool: Mutex::new(Vec::new()),
            pool_cap: threads,
        },
        conn_budget: &conn_budget,
        server_budget: &budget.server,
        stopper: &stopper,
        outcome: Mutex::new(None),
        broken: AtomicBool::new(false),
        retained: AtomicUsize::new(0),
        // Set once a second worker runs (fewer may start than asked for).
        may_block: AtomicBool::new(false),
        stream_reads: std::env::var_os("NBDCRYPT_BENCH_NO_STREAM").is_none(),
        starts: neg.export.device.starts() && std::env::var_os("NBDCRYPT_BENCH_NO_START").is_none(),
        start_writes: std::env::var_os("NBDCRYPT_BENCH_NO_START_WRITES").is_none(),
        started: Mutex::new(HashMap::new()),
        next_seq: AtomicU64::new(0),
        answers: Arc::new(Answers::default()),
        spare: Mutex::new(Vec::new()),
    };
    std::thread::scope(|scope| {
        let session = &session;
        let writer = std::thread::Builder::new()
            .name("nbd-writer".to_owned())
            .stack_size(256 * 1024)
            .spawn_scoped(scope, move || session.write_loop());
        if let Err(e) = writer {
            warn!(error = %e, "could not start the writer thread");
            session.finish(Err(ProtocolError::Io(e)));
            return;
        }
        let completer = if session.starts {
            let spawned = std::thread::Builder::new()
                .name("nbd-completer".to_owned())
                .stack_size(256 * 1024)
                .spawn_scoped(scope, move || session.complete_loop());
            match spawned {
                Ok(h) => Some(h),
                Err(e) => {
                    warn!(error = %e, "could not start the completer thread");
                    session.finish(Err(ProtocolError::Io(e)));
                    lock(&session.out.state).closed = true;
                    session.out.ready.notify_all();
                    return;
                }
            }
        } else {
            None
        };
        let mut workers = Vec::new();
        for i in 0..threads {
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .stack_size(512 * 1024)
                .spawn_scoped(scope, move || session.work());
            match spawned {
                Ok(h) => {
                    workers.push(h);
                    if workers.len() == 2 {
                        session.may_block.store(true, Ordering::Release);
                    }
                }
                Err(e) => {
                    // Fewer workers only means less parallelism; one is enough to make progress.
                    warn!(error = %e, "could not start a worker thread");
                    if i == 0 {
                        session.finish(Err(ProtocolError::Io(e)));
                    }
                    break;
                }
            }
        }
        for h in workers {
            let _ = h.join();
        }
        // Started requests are answered by the device in any case (a reply, a connection
        // failure, its timeout): the completer replies to them (or drops the replies when the
        // client is gone) and ends when none is left.
        if let Some(h) = completer {
            {
                let mut st = lock(&session.answers.state);
                st.closed = true;
                st.idle = false;
            }
            session.answers.ready.notify_all();
            let _ = h.join();
        }
        lock(&session.out.state).closed = true;
        session.out.ready.notify_all();
    });
    let outcome = lock(&session.outcome)
        .take()
        .unwrap_or(Ok(End::Disconnected));
    if matches!(outcome, Ok(End::Stopped)) {
        if let Err(e) = neg.export.device.flush() {
            warn!(error = %e, "flush at session end failed");
        }
    }
    outcome
}

impl<'a> Session<'a> {
    fn work(&self) {
        let mut bufs = Buffers::default();
        loop {
            let (next, grants, timer) = {
                let mut rd = lock(&self.read);
                // Requests the device starts are handed to it here, and this worker goes on
                // reading: no other thread wakes for them until their answers come.
                loop {
                    if rd.done || self.broken.load(Ordering::Acquire) {
                        return;
                    }
                    let x = match self.next_request(&mut rd.reader, &mut bufs.input) {
                        Ok(Some(x)) => x,
                        Ok(None) => {
                            rd.done = true;
                            let end = if self.stopper.stopped() {
                                End::Stopped
                            } else {
                                End::Disconnected
                            };
                            self.finish(Ok(end));
                            return;
                        }
                        Err(e) => {
                            rd.done = true;
                            self.finish(Err(e));
                            return;
                        }
                    };
                    if let Some(x) = self.try_start(x, &mut bufs.input) {
                        break x;
                    }
                }
            };
            if let Next::Run(job) = &next {
                if job.header.command == Command::Read && bufs.output.0.is_empty() {
                    // Reply buffers circulate through the connection's pool rather than staying
                    // with idle workers: as many are in use as READs in flight, so the ones
                    // kept for reuse (RETAIN) cover them and large READs do not fault in fresh
                    // pages.
                    if let Some(b) = lock(&self.out.pool).pop() {
                        bufs.output = b;
                    }
                }
                if self.stream_read(job, &mut bufs.output) {
                    // Sent: the request's budget and timer end here.
                    drop((grants, timer));
                    self.recycle(std::mem::take(&mut bufs.output));
                    bufs.input.trim(&self.retained);
                    continue;
                }
            }
            let out = match next {
                Next::Run(job) => execute(&self.neg.export, job, &mut bufs),
                Next::Reply(bytes) => Out::Owned(bytes),
            };
            let body = match out {
                Out::Owned(bytes) => Body::Owned(bytes),
                Out::Output { len, lead } => {
                    let range = bufs.output.aligned_range(len, lead);
                    bufs.output.release(&self.retained);
                    Body::Output {
                        buf: std::mem::take(&mut bufs.output),
                        range,
                    }
                }
            };
            match self.deliver(Reply {
                body,
                sent: 0,
                _grants: grants,
                _timer: timer,
            }) {
                // Sent here: the buffer goes back to the connection's pool.
                Some(Body::Output { buf, .. }) => self.recycle(buf),
                Some(Body::Owned(_)) | Some(Body::Split { .. }) => {}
                // Queued with the reply; whoever sends it recycles its buffer.
                None => {}
            }
            bufs.input.trim(&self.retained);
            bufs.output.trim(&self.retained);
        }
    }

    /// Hand a READ or WRITE to a device that starts requests (`BlockDevice::start`), from the
    /// thread that read it, which then goes on reading; the completer thread replies once the
    /// device has answered. Gives the request back (to be run here, blocking) when it is not one
    /// to start: other commands, requests the device will not start (unaligned, FUA without
    /// native FUA, during a re-encryption ...), or a connection whose socket owner may not
    /// block (a single worker: then the completer could not send either).
    #[allow(clippy::type_complexity)]
    fn try_start(
        &self,
        x: (Next, Grants<'a>, Option<crate::metrics::RequestTimer>),
        input: &mut Scratch,
    ) -> Option<(Next, Grants<'a>, Option<crate::metrics::RequestTimer>)> {
        let (next, grants, timer) = x;
        let Next::Run(job) = &next else {
            return Some((next, grants, timer));
        };
        let h = job.header;
        let write = match h.command {
            Command::Read => false,
            Command::Write if self.start_writes => true,
            _ => return Some((next, grants, timer)),
        };
        let fua = h.flags & CMD_FLAG_FUA != 0;
        let dev = &self.neg.export.device;
        let op = if write { Op::Write } else { Op::Read };
        if !self.starts
            || !self.may_block.load(Ordering::Acquire)
            || self.broken.load(Ordering::Acquire)
            || !dev.can_start(op, h.offset, u64::from(h.length), fua)
        {
            return Some((next, grants, timer));
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        lock(&self.started).insert(
            seq,
            InFlight {
                header: h,
                structured: job.structured,
                grants,
                timer,
                ticket: None,
                early: None,
            },
        );
        let answers = self.answers.clone();
        let done: Completion = Box::new(move |r| answers.put(seq, r));
        let started = if write {
            let stats = &self.neg.export.stats;
            IoStats::add(&stats.writes, 1);
            IoStats::add(&stats.bytes_written, u64::from(h.length));
            let data = input.get(h.length as usize);
            dev.clone().start(
                StartOp::Write {
                    offset: h.offset,
                    data,
                    fua,
                },
                done,
            )
        } else {
            let buf = self.take_spare();
            dev.clone().start(
                StartOp::Read {
                    offset: h.offset,
                    length: h.length as usize,
                    buf,
                },
                done,
            )
        };
        let mut map = lock(&self.started);
        match started {
            Started::Yes(ticket) => {
                let early = map.get_mut(&seq).and_then(|e| {
                    e.ticket = Some(ticket);
                    e.early.take()
                });
                drop(map);
                if let Some(r) = early {
                    // Answered before the ticket was in: the completer gets it again.
                    self.answers.put(seq, r);
                }
                None
            }
            // Never answered (the device gave `done` back), so never seen by the completer.
            Started::No(_) => {
                let e = map.remove(&seq)?;
                if write {
                    let stats = &self.neg.export.stats;
                    stats.writes.fetch_sub(1, Ordering::Relaxed);
                    stats
                        .bytes_written
                        .fetch_sub(u64::from(h.length), Ordering::Relaxed);
                }
                Some((next, e.grants, e.timer))
            }
        }
    }

    /// The completer thread: reply to started requests as their answers come, until every
    /// worker has exited and nothing is in flight.
    fn complete_loop(&self) {
        let mut batch = Vec::new();
        loop {
            {
                let mut st = lock(&self.answers.state);
                while st.done.is_empty() {
                    if st.closed && lock(&self.started).is_empty() {
                        return;
                    }
                    st.idle = true;
                    st = self
                        .answers
                        .ready
                        .wait(st)
                        .unwrap_or_else(|e| e.into_inner());
                }
                std::mem::swap(&mut batch, &mut st.done);
            }
            for (seq, r) in batch.drain(..) {
                let entry = {
                    let mut map = lock(&self.started);
                    match map.get_mut(&seq) {
                        Some(e) if e.ticket.is_none() => {
                            // The reader puts the answer back once the ticket is in.
                            e.early = Some(r);
                            continue;
                        }
                        Some(_) => map.remove(&seq),
                        None => None,
                    }
                };
                if let Some(e) = entry {
                    self.answer(e, r);
                }
            }
        }
    }

    /// Finish a started request with its answer and send its reply.
    fn answer(&self, e: InFlight<'a>, r: Result<Vec<u8>, BlockError>) {
        let h = e.header;
        let export = &self.neg.export;
        let r = match e.ticket {
            Some(t) => t.finish(r),
            None => r,
        };
        let body = match r {
            Ok(data) if h.command == Command::Read => {
                IoStats::add(&export.stats.reads, 1);
                IoStats::add(&export.stats.bytes_read, u64::from(h.length));
                let head = if e.structured {
                    codec::offset_data_prefix(h.cookie, h.offset, h.length).to_vec()
                } else {
                    codec::simple_reply(0, h.cookie).to_vec()
                };
                Body::Split { head, data }
            }
            Ok(_) => Body::Owned(codec::simple_reply(0, h.cookie).to_vec()),
            Err(err) => Body::Owned(block_error_reply(export, &h, &err, e.structured)),
        };
        let sent = self.deliver(Reply {
            body,
            sent: 0,
            _grants: e.grants,
            _timer: e.timer,
        });
        if let Some(Body::Split { data, .. }) = sent {
            self.keep_spare(data);
        }
    }

    /// A spare buffer for a started READ (or an empty one).
    fn take_spare(&self) -> Vec<u8> {
        match lock(&self.spare).pop() {
            Some(v) => {
                self.retained.fetch_sub(v.capacity(), Ordering::AcqRel);
                v
            }
            None => Vec::new(),
        }
    }

    /// Keep a started READ's buffer for the next one, within KEEP_BUFFER and RETAIN.
    fn keep_spare(&self, v: Vec<u8>) {
        let n = v.capacity();
        if n == 0 || n > KEEP_BUFFER {
            return;
        }
        if self.retained.fetch_add(n, Ordering::AcqRel) + n > RETAIN {
            self.retained.fetch_sub(n, Ordering::AcqRel);
            return;
        }
        lock(&self.spare).push(v);
    }

    /// Send `r` now if nobody else is writing and the socket takes all of it without blocking;
    /// otherwise queue it for the writer thread. Returns the body when it was sent (or dropped
    /// because the client is gone) here, `None` when it was queued.
    fn deliver(&self, mut r: Reply<'a>) -> Option<Body> {
        if self.broken.load(Ordering::Acquire) {
            return Some(r.body);
        }
        {
            let mut st = lock(&self.out.state);
            if st.busy || !st.queue.is_empty() {
                st.queue.push_back(r);
                if !st.busy {
                    self.out.ready.notify_one();
                }
                return None;
            }
            st.busy = true;
        }
        if self.may_block.load(Ordering::Acquire) {
            // Another worker keeps reading requests while this one waits on the socket, so
            // blocking here cannot stop the request stream (see `Session::may_block`).
            let sent = self.write_batch(std::slice::from_mut(&mut r));
            if let Err(e) = sent {
                self.give_up_socket();
                self.broke(e);
                return Some(r.body);
            }
            self.drain_blocking();
            return Some(r.body);
        }
        r.body.flatten();
        let tried = lock(&self.write).try_write(r.body.bytes());
        if matches!(tried, Ok(n) if n == r.body.bytes().len()) {
            // Still owning the socket: send what others queued meanwhile, as long as the
            // socket takes it without blocking (saves waking the writer thread).
            self.drain_nonblocking();
            return Some(r.body);
        }
        let mut st = lock(&self.out.state);
        st.busy = false;
        match tried {
            Ok(n) => {
                r.sent = n;
                // The rest must go before any other reply: to the front, for the writer.
                st.queue.push_front(r);
                self.out.ready.notify_one();
                None
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                st.queue.push_front(r);
                self.out.ready.notify_one();
                None
            }
            Err(e) => {
                if !st.queue.is_empty() {
                    self.out.ready.notify_one();
                }
                drop(st);
                self.broke(e);
                Some(r.body)
            }
        }
    }

    /// Serve a large READ by sending each piece as soon as the device has it (decrypted), as
    /// its own OFFSET_DATA chunk, while it is still in the CPU caches: the pread and decryption
    /// of the next piece overlap with the client draining the previous one from the socket,
    /// and the data is not read back cold from memory for a separate send. Only with structured
    /// replies, without DF (the client asked for one chunk), when this worker may block on the
    /// socket and can take it at once; returns false (nothing done) otherwise. A device error
    /// after some pieces ends the reply with an error chunk, as the protocol allows.
    fn stream_read(&self, job: &Job, output: &mut Scratch) -> bool {
        let h = &job.header;
        let worth = h.command == Command::Read
            && self.stream_reads
            && job.structured
            && h.flags & CMD_FLAG_DF == 0
            && h.length > STREAM_MIN
            && self.may_block.load(Ordering::Acquire)
            && !self.broken.load(Ordering::Acquire);
        if !worth {
            return false;
        }
        {
            let mut st = lock(&self.out.state);
            if st.busy || !st.queue.is_empty() {
                return false;
            }
            st.busy = true;
        }
        let export = &self.neg.export;
        let total = h.length as usize;
        let mut at = 0usize;
        let mut done = false;
        let mut failed: Option<io::Error> = None;
        let result =
            export
                .device
                .read_at_streaming(output.get(total), h.offset, &mut |piece: &[u8]| {
                    let from = at;
                    at += piece.len();
                    if done || failed.is_some() || piece.is_empty() {
                        return;
                    }
                    done = at >= total;
                    // A piece of a request of at most MAX_PAYLOAD bytes.
                    let n = u32::try_from(piece.len()).unwrap_or(u32::MAX);
                    let head =
                        codec::offset_data_part_prefix(h.cookie, h.offset + from as u64, n, done);
                    if let Err(e) = self.send_parts(&[&head, piece]) {
                        failed = Some(e);
                    }
                });
        if failed.is_none() && !done {
            // A device error, or (never, by the trait's contract) pieces that fell short.
            let e = result
                .err()
                .unwrap_or_else(|| BlockError::new(crate::block::ErrorKind::Io));
            let reply = block_error_reply(export, h, &e, true);
            if let Err(e) = self.send_parts(&[&reply]) {
                failed = Some(e);
            }
        } else if failed.is_none() {
            IoStats::add(&export.stats.reads, 1);
            IoStats::add(&export.stats.bytes_read, u64::from(h.length));
        }
        if let Some(e) = failed {
            self.give_up_socket();
            self.broke(e);
            return true;
        }
        self.drain_blocking();
        true
    }

    /// Write `parts` whole, in order, with blocking vectored writes; the caller owns the socket.
    fn send_parts(&self, parts: &[&[u8]]) -> io::Result<()> {
        let mut w = lock(&self.write);
        let mut first = 0;
        let mut skip = 0;
        while first < parts.len() {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len() - first);
            slices.push(IoSlice::new(&parts[first][skip..]));
            slices.extend(parts[first + 1..].iter().map(|p| IoSlice::new(p)));
            let mut n = match w.write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            while first < parts.len() && n >= parts[first].len() - skip {
                n -= parts[first].len() - skip;
                first += 1;
                skip = 0;
            }
            skip += n;
        }
        w.flush()
    }

    /// Called by a worker that owns the socket (`busy`) and may block on it: send what others
    /// queued meanwhile, in batches with blocking vectored writes, until the queue is empty;
    /// then give the socket up.
    fn drain_blocking(&self) {
        let mut batch: Vec<Reply<'a>> = Vec::new();
        loop {
            {
                let mut st = lock(&self.out.state);
                if st.queue.is_empty() {
                    st.busy = false;
                    return;
                }
                let n = st.queue.len().min(BATCH);
                batch.extend(st.queue.drain(..n));
            }
            self.send_and_recycle(&mut batch);
        }
    }

    /// Release the socket after a failed write, waking the writer thread for what is queued
    /// (it drops those replies once the session is broken, freeing their budget).
    fn give_up_socket(&self) {
        let mut st = lock(&self.out.state);
        st.busy = false;
        if !st.queue.is_empty() {
            self.out.ready.notify_one();
        }
    }

    /// Called by a worker that owns the socket (`busy`): send queued replies without blocking,
    /// at most BATCH of them, then give the socket up, waking the writer thread if replies are
    /// left (or one was only partly sent: it goes back to the front).
    fn drain_nonblocking(&self) {
        for _ in 0..BATCH {
            let mut r = {
                let mut st = lock(&self.out.state);
                match st.queue.pop_front() {
                    Some(r) => r,
                    None => {
                        st.busy = false;
                        return;
                    }
                }
            };
            r.body.flatten();
            let tried = if self.broken.load(Ordering::Acquire) {
                Ok(r.body.bytes().len() - r.sent)
            } else {
                lock(&self.write).try_write(&r.body.bytes()[r.sent..])
            };
            match tried {
                Ok(n) if r.sent + n == r.body.bytes().len() => {
                    if let Body::Output { buf, .. } = r.body {
                        self.recycle(buf);
                    }
                }
                Ok(n) => {
                    r.sent += n;
                    lock(&self.out.state).queue.push_front(r);
                    break;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    lock(&self.out.state).queue.push_front(r);
                    break;
                }
                Err(e) => {
                    self.broke(e);
                    break;
                }
            }
        }
        let mut st = lock(&self.out.state);
        st.busy = false;
        if !st.queue.is_empty() {
            self.out.ready.notify_one();
        }
    }

    /// The writer thread: send queued replies in batches until every worker has exited and the
    /// queue is empty. Once the client is gone, queued replies are dropped (freeing budget).
    fn write_loop(&self) {
        let mut batch: Vec<Reply<'a>> = Vec::with_capacity(BATCH);
        loop {
            {
                let mut st = lock(&self.out.state);
                while st.busy || st.queue.is_empty() {
                    if st.closed && st.queue.is_empty() && !st.busy {
                        return;
                    }
                    st = self.out.ready.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                st.busy = true;
                let n = st.queue.len().min(BATCH);
                batch.extend(st.queue.drain(..n));
            }
            self.send_and_recycle(&mut batch);
            lock(&self.out.state).busy = false;
        }
    }

    /// Send `batch` (unless the session already broke) and return its reply buffers to the
    /// pool, leaving `batch` empty for the next round.
    fn send_and_recycle(&self, batch: &mut Vec<Reply<'a>>) {
        if !self.broken.load(Ordering::Acquire) {
            if let Err(e) = self.write_batch(batch) {
                self.broke(e);
            }
        }
        // One end time for the batch's request timers: one write sent them.
        let _clock = crate::metrics::ClockBatch::begin();
        for r in batch.drain(..) {
            match r.body {
                Body::Output { buf, .. } => self.recycle(buf),
                Body::Split { data, .. } => self.keep_spare(data),
                Body::Owned(_) => {}
            }
        }
    }

    /// Write every reply of `batch` whole, in order, with blocking vectored writes.
    fn write_batch(&self, batch: &mut [Reply<'a>]) -> io::Result<()> {
        let mut w = lock(&self.write);
        let mut first = 0;
        while first < batch.len() {
            let slices: Vec<IoSlice<'_>> = batch[first..]
                .iter()
                .flat_map(|r| r.body.rest(r.sent))
                .filter(|p| !p.is_empty())
                .map(IoSlice::new)
                .collect();
            let mut n = match w.write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            while n > 0 && first < batch.len() {
                let r = &mut batch[first];
                let left = r.body.len() - r.sent;
                let step = left.min(n);
                r.sent += step;
                n -= step;
                if r.sent == r.body.len() {
                    first += 1;
                }
            }
        }
        w.flush()
    }

    /// Keep a finished output buffer for a worker to reuse, within the pool's bounds.
    fn recycle(&self, mut buf: Scratch) {
        let mut pool = lock(&self.out.pool);
        if pool.len() >= self.out.pool_cap {
            buf.release(&self.retained);
            return;
        }
        buf.trim(&self.retained);
        if !buf.0.is_empty() {
            pool.push(buf);
        }
    }

    /// The write side failed: the client is gone. End the session.
    fn broke(&self, e: io::Error) {
        self.broken.store(true, Ordering::Release);
        self.finish(Err(ProtocolError::Io(e)));
        // Wake the worker blocked in read so the session can end.
        self.stopper.stop();
    }

    fn finish(&self, outcome: Result<End, ProtocolError>) {
        let mut o = lock(&self.outcome);
        if o.is_none() {
            *o = Some(outcome);
        }
    }

    /// Frame and validate the next request. `None` when the stream ended cleanly (EOF between
    /// requests, DISC, or a stop).
    fn next_request(
        &self,
        r: &mut BufReader<Stamped>,
        input: &mut Scratch,
    ) -> Result<Option<(Next, Grants<'a>, Option<crate::metrics::RequestTimer>)>, ProtocolError>
    {
        if self.stopper.stopped() {
            return Ok(None);
        }
        let mut raw = [0u8; codec::REQUEST_HEADER_LEN];
        match read_header(r, &mut raw) {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            // A stop shuts the read side; whatever the read saw then is not the peer's fault.
            Err(_) if self.stopper.stopped() => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let header =
            codec::decode_request(&raw).map_err(|m| ProtocolError::BadMagic(u64::from(m)))?;
        debug!(cookie = header.cookie, command = ?header.command, offset = header.offset,
               length = header.length, flags = header.flags, "request");
        if header.command == Command::Disc {
            return Ok(None);
        }
        // The header is in: it arrived with the last read that returned data.
        let arrived = r.get_ref().at.unwrap_or_else(std::time::Instant::now);
        let timer = Some(crate::metrics::METRICS.start_at(header.command, header.length, arrived));
        if header.command == Command::Write && header.length > MAX_PAYLOAD {
            return Err(ProtocolError::PayloadTooLarge(header.length));
        }
        let cost = request_cost(&header, self.neg);
        let grants = [self.conn_budget.take(cost), self.server_budget.take(cost)];

        let verdict = validate(&header, self.neg);
        if header.command == Command::Write {
            if verdict.is_ok() {
                r.read_exact(input.get(header.length as usize))?;
            } else {
                // The payload is on the wire whatever we think of the request: skip it.
                let n = io::copy(
                    &mut r.by_ref().take(u64::from(header.length)),
                    &mut io::sink(),
                )?;
                if n != u64::from(header.length) {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                }
            }
        }
        match verdict {
            Ok(()) => {
                let job = Job {
                    header,
                    structured: self.neg.structured_replies,
                };
                Ok(Some((Next::Run(job), grants, timer)))
            }
            Err((code, why)) => {
                debug!(cookie = header.cookie, error = ?code, why, "request rejected");
                IoStats::add(&self.neg.export.stats.errors, 1);
                crate::metrics::METRICS.error(header.command, code);
                let bytes =
                    error_reply(header.cookie, code.code(), why, self.neg.structured_replies);
                Ok(Some((Next::Reply(bytes), grants, timer)))
            }
        }
    }
}

/// Ok(false) on a clean EOF before the first byte of a header.
fn read_header(r: &mut impl Read, raw: &mut [u8; codec::REQUEST_HEADER_LEN]) -> io::Result<bool> {
    let mut got = 0;
    while got < raw.len() {
        match r.read(&mut raw[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The bytes a request holds while it is in flight, charged before it is read further: the
/// payload buffer (WRITE) or the reply buffer (READ) with its page-alignment slack, whatever
/// the device layers allocate to serve it, and a fixed overhead. Lengths the request may not
/// have (a READ over 32 MiB, a WRITE past the end) are clamped: such a request is rejected
/// before any buffer is allocated for it.
fn request_cost(h: &RequestHeader, neg: &Negotiated) -> u64 {
    let len = u64::from(h.length.min(MAX_PAYLOAD));
    let dev = &neg.export.device;
    let page = PAGE as u64;
    let extra = match h.command {
        Command::Read => {
            len + codec::OFFSET_DATA_PREFIX_LEN as u64
                + page
                + dev.scratch_bytes(Op::Read, h.offset, len)
        }
        Command::Write => len + page + dev.scratch_bytes(Op::Write, h.offset, len),
        Command::WriteZeroes => dev.scratch_bytes(Op::Zero, h.offset, u64::from(h.length)),
        Command::BlockStatus => BLOCK_STATUS_COST,
        _ => 0,
    };
    extra + REQUEST_OVERHEAD
}

/// Locks survive a panicking holder: the data they guard stays consistent at every await-free
/// step in this module.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Rejection = (NbdErrno, &'static str);

/// Every check a request gets, in one place, before any I/O.
fn validate(h: &RequestHeader, neg: &Negotiated) -> Result<(), Rejection> {
    let flags = neg.transmission_flags;
    let size = neg.export.device.size();
    let cmd = h.command;
    if let Command::Unknown(_) = cmd {
        return Err((NbdErrno::Inval, "unknown command"));
    }
    if h.flags & !cmd.allowed_flags() != 0 {
        return Err((NbdErrno::Inval, "flag not valid for this command"));
    }
    if h.flags & CMD_FLAG_DF != 0 && flags & TFLAG_SEND_DF == 0 {
        return Err((NbdErrno::Inval, "DF needs structured replies"));
    }
    if h.flags & CMD_FLAG_FAST_ZERO != 0 && flags & TFLAG_SEND_FAST_ZERO == 0 {
        return Err((NbdErrno::Inval, "FAST_ZERO is not supported by this export"));
    }
    let writes = matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes);
    if writes && flags & TFLAG_READ_ONLY != 0 {
        return Err((NbdErrno::Perm, "export is read-only"));
    }
    if cmd == Command::Trim && flags & TFLAG_SEND_TRIM == 0 {
        return Err((NbdErrno::Inval, "trim is not enabled on this export"));
    }
    if cmd == Command::BlockStatus {
        if !neg.base_allocation {
            return Err((NbdErrno::Inval, "no meta context was negotiated"));
        }
        if h.length == 0 {
            return Err((NbdErrno::Inval, "zero-length block status"));
        }
    }
    if cmd == Command::Flush {
        return Ok(());
    }
    let in_range = h
        .offset
        .checked_add(u64::from(h.length))
        .is_some_and(|end| end <= size);
    if !in_range {
        return Err(match cmd {
            Command::Write | Command::WriteZeroes => {
                (NbdErrno::NoSpc, "request extends past the end")
            }
            _ => (NbdErrno::Inval, "request extends past the end"),
        });
    }
    if cmd == Command::Read && h.length > MAX_PAYLOAD {
        if h.flags & CMD_FLAG_DF != 0 {
            return Err((NbdErrno::Overflow, "read too large"));
        }
        return Err((NbdErrno::Inval, "read larger than the 32 MiB maximum"));
    }
    Ok(())
}

/// Run a validated request on the device and encode its reply.
fn execute(export: &Export, job: Job, bufs: &mut Buffers) -> Out {
    let h = job.header;
    let dev = &export.device;
    let stats = &export.stats;
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let len = u64::from(h.length);
    let result = match h.command {
        Command::Read => return read(export, &h, job.structured, &mut bufs.output),
        Command::Write => {
            IoStats::add(&stats.writes, 1);
            IoStats::add(&stats.bytes_written, len);
            // The payload buffer is not read again: the crypt layer may encrypt it in place.
            dev.write_at_scratch(bufs.input.get(h.length as usize), h.offset, fua)
        }
        Command::Flush => {
            IoStats::add(&stats.flushes, 1);
            dev.flush()
        }
        Command::Trim => dev.trim(h.offset, len, fua),
        Command::WriteZeroes => {
            let flags = ZeroFlags {
                no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
                fast_only: h.flags & CMD_FLAG_FAST_ZERO != 0,
                fua,
            };
            dev.write_zeroes(h.offset, len, flags)
        }
        Command::Cache => dev.cache(h.offset, len),
        Command::BlockStatus => return Out::Owned(block_status(export, &h)),
        // Filtered out by validate() and the reader; answered as invalid to stay total.
        Command::Disc | Command::Unknown(_) => {
            let msg = "unexpected command";
            return Out::Owned(error_reply(
                h.cookie,
                NbdErrno::Inval.code(),
                msg,
                job.structured,
            ));
        }
    };
    Out::Owned(match result {
        Ok(()) => codec::simple_reply(0, h.cookie).to_vec(),
        Err(e) => block_error_reply(export, &h, &e, job.structured),
    })
}

fn read(export: &Export, h: &RequestHeader, structured: bool, output: &mut Scratch) -> Out {
    let prefix = if structured {
        codec::OFFSET_DATA_PREFIX_LEN
    } else {
        codec::SIMPLE_REPLY_LEN
    };
    if structured && h.length == 0 {
        return Out::Owned(codec::none_chunk(h.cookie).to_vec());
    }
    let total = prefix + h.length as usize;
    let buf = output.get_aligned(total, prefix);
    match export.device.read_at(&mut buf[prefix..], h.offset) {
        Ok(()) => {
            IoStats::add(&export.stats.reads, 1);
            IoStats::add(&export.stats.bytes_read, u64::from(h.length));
            if structured {
                buf[..prefix]
                    .copy_from_slice(&codec::offset_data_prefix(h.cookie, h.offset, h.length));
            } else {
                buf[..prefix].copy_from_slice(&codec::simple_reply(0, h.cookie));
            }
            Out::Output {
                len: total,
                lead: prefix,
            }
        }
        Err(e) => Out::Owned(block_error_reply(export, h, &e, structured)),
    }
}

fn block_status(export: &Export, h: &RequestHeader) -> Vec<u8> {
    let len = u64::from(h.length);
    let extents = match export.device.extents(h.offset, len) {
        Ok(x) => x,
        Err(e) => return block_error_reply(export, h, &e, true),
    };
    let mut descriptors = Vec::new();
    let mut covered = 0u64;
    for x in extents {
        if covered >= len || descriptors.len() >= MAX_EXTENTS || x.length == 0 {
            break;
        }
        let take = x.length.min(len - covered);
        let flags = if x.hole { STATE_HOLE } else { 0 } | if x.zero { STATE_ZERO } else { 0 };
        // take <= len = h.length, a u32.
        descriptors.push((u32::try_from(take).unwrap_or(h.length), flags));
        covered += take;
        if h.flags & CMD_FLAG_REQ_ONE != 0 {
            break;
        }
    }
    if descriptors.is_empty() {
        // Status 0 ("allocated, contents unknown") is always a correct answer.
        descriptors.push((h.length, 0));
    }
    let mut out = Vec::with_capacity(24 + 8 * descriptors.len());
    codec::block_status_chunk(&mut out, h.cookie, META_BASE_ALLOCATION_ID, &descriptors);
    out
}

fn block_error_reply(
    export: &Export,
    h: &RequestHeader,
    e: &BlockError,
    structured: bool,
) -> Vec<u8> {
    let code = errno::from_block(e);
    IoStats::add(&export.stats.errors, 1);
    crate::metrics::METRICS.error(h.command, code);
    warn!(cookie = h.cookie, command = ?h.command, offset = h.offset, length = h.length,
          error = %e, "request failed");
    error_reply(h.cookie, code.code(), &e.kind.to_string(), structured)
}

fn error_reply(cookie: u64, code: u32, message: &str, structured: bool) -> Vec<u8> {
    if structured {
        let mut out = Vec::with_capacity(64);
        codec::error_chunk(&mut out, cookie, code, message);
        out
    } else {
        codec::simple_reply(code, cookie).to_vec()
    }
}
