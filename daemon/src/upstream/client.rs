//! The upstream connection pool: one connection, or several (`POOL_SIZE`) when the upstream
//! offers CAN_MULTI_CONN. Callers are blocking threads: a caller registers its request (handle,
//! waiter) in the connection's in-flight map and writes it on the socket itself, under the
//! connection's send lock (`transport`; a WRITE's payload goes from the caller's buffer to the
//! socket, no copy); each connection's reader thread decodes the replies (`proto`) and wakes the
//! waiter. One thread handoff per request (reader → caller) where a queue, a writer task and a
//! reader task cost four. Measured (the daemon's CPU time per request, `--plain` over nbdkit
//! memory, 2 vCPUs under load): 1 MiB reads and writes -35..45 %, 4k QD1 -25 %; 4k QD32
//! unchanged: there the scheduler's wakeups (worker and reader thread, about 2.5 context
//! switches per request) dominate either way. Negotiation and reconnection stay async on a
//! small runtime (the supervisor per slot). `Upstream::start` sends a request whose answer goes
//! to a callback on the reader thread instead (the NBD session's started requests): no caller
//! waits on it, so each connection's supervisor checks once a second that none has waited
//! longer than REQUEST_TIMEOUT (else the connection is dropped, failing what is in flight).
//! The reader wakes the callers of all the replies one read(2) brought in together, before its
//! next read.
//!
//! Failure: a dead connection fails everything in flight with an error (EIO to the NBD client;
//! the fail-stop latch above us applies), and its supervisor reconnects with back-off (100 ms
//! doubling to 5 s). An upstream that comes back with another size or without FLUSH is refused.
//!
//! Durability across a reconnect: a write the upstream acknowledged without FUA may live only in
//! its volatile cache until a FLUSH. If a connection is lost while such writes are unflushed, an
//! upstream that crashed may have dropped them, and a FLUSH on a new connection would cover
//! nothing of them. So from then on every FLUSH fails (EIO, and the fail-stop latch above us
//! keeps it so) until nbdcryptd is restarted: a client never sees a successful FLUSH over data
//! that may be gone. Reads and writes go on after the reconnect.

use std::io::BufReader;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_rustls::rustls;

use super::handshake::{self, ExportInfo};
use super::proto::{self, Completer, Decoded, Pending, PendingMap, ReplyError, Waiter};
use super::transport::{Receiver, Transport};
use super::uri::UpstreamUri;
use crate::nbd::wire::*;

/// Connections opened when the upstream offers CAN_MULTI_CONN.
pub const POOL_SIZE: usize = 4;
/// Connections to open under CAN_MULTI_CONN: `POOL_SIZE`, or what the environment variable
/// NBDCRYPT_BENCH_UPSTREAM_CONNECTIONS says (1..=16; benchmarks only, to compare pool sizes
/// in one build).
fn pool_size() -> usize {
    std::env::var("NBDCRYPT_BENCH_UPSTREAM_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| (1..=16).contains(n))
        .unwrap_or(POOL_SIZE)
}
/// How long one request may wait for its reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Health, for `status` and the logs.
#[derive(Default)]
pub struct Health {
    pub connected: AtomicUsize,
    pub reconnects: AtomicU64,
    pub failed_requests: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// Write-class commands the upstream acknowledged without FUA (counted by the connection's
    /// reader before the caller sees the reply).
    pub volatile_acked: AtomicU64,
    /// `volatile_acked` as it was when the last successful FLUSH was sent: all of those are
    /// durable (a FLUSH covers every write completed before it, on any connection under
    /// CAN_MULTI_CONN).
    pub flushed: AtomicU64,
    /// Set when a connection was lost with acknowledged writes unflushed: why.
    pub durability_lost: Mutex<Option<String>>,
    /// Connections lost so far. A connection that sees this move after it started may be
    /// talking to an upstream instance that others found dead: see [`Health::late_ack`].
    pub losses: AtomicU64,
}

impl Health {
    fn set_error(&self, e: &str) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some(e.to_owned());
        }
    }
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }
    /// Why FLUSH can no longer be honoured (None while it can).
    pub fn durability_lost(&self) -> Option<String> {
        match self.durability_lost.lock() {
            Ok(g) => g.clone(),
            Err(_) => Some("internal lock poisoned".into()),
        }
    }
    /// A connection ended: if writes it (or another) acknowledged are not yet covered by a
    /// FLUSH, they may be gone with the upstream's cache.
    fn connection_lost(&self, uri: &UpstreamUri, why: &str) {
        self.losses.fetch_add(1, Ordering::SeqCst);
        let acked = self.volatile_acked.load(Ordering::SeqCst);
        let flushed = self.flushed.load(Ordering::SeqCst);
        if acked <= flushed {
            return;
        }
        self.lose_durability(
            uri,
            format!(
                "the connection to {uri} was lost ({why}) while {} acknowledged write(s) were \
                 not yet flushed; the upstream may have dropped them, so no FLUSH can be \
                 honoured any more: check the data and restart nbdcryptd",
                acked - flushed
            ),
        );
    }

    /// A write acknowledged without FUA on a connection that started before another
    /// connection was lost. If the upstream restarted, that write may sit in the cache of the
    /// instance that died while the next FLUSH goes to the new one over a reconnected slot and
    /// covers nothing: its ack counted only now, such a FLUSH would be believed. Treated as a
    /// loss (conservative: a connection dropped without a restart costs durability too).
    fn late_ack(&self, uri: &UpstreamUri) {
        self.lose_durability(
            uri,
            format!(
                "a write to {uri} was acknowledged on a connection older than one that was lost \
                 (the upstream may have restarted in between), so no FLUSH can be honoured any \
                 more: check the data and restart nbdcryptd"
            ),
        );
    }

    fn lose_durability(&self, uri: &UpstreamUri, msg: String) {
        if let Ok(mut g) = self.durability_lost.lock() {
            if g.is_none() {
                tracing::error!(upstream = %uri, "{msg}");
                *g = Some(msg);
            }
        }
    }
}

/// Bytes of read buffers kept for reuse per connection (a fresh 1 MiB `Vec` per read costs page
/// faults): eight 1 MiB reads in flight, or many small ones.
const BUF_POOL_BYTES: usize = 8 << 20;

/// One live connection: callers send on it, its reader thread completes their requests.
struct Conn {
    transport: Transport,
    pending: PendingMap,
    next_handle: AtomicU64,
    /// Why a sender gave up on the connection (reported instead of the reader's end-of-file).
    send_error: Mutex<Option<String>>,
    /// Idle read buffers and the sum of their capacities (at most `BUF_POOL_BYTES`).
    bufs: Mutex<(Vec<Vec<u8>>, usize)>,
}

impl Conn {
    fn take_buf(&self) -> Vec<u8> {
        let Ok(mut g) = self.bufs.lock() else {
            return Vec::new();
        };
        match g.0.pop() {
            Some(b) => {
                g.1 -= b.capacity();
                b
            }
            None => Vec::new(),
        }
    }
    fn put_buf(&self, b: Vec<u8>) {
        if let Ok(mut g) = self.bufs.lock() {
            if g.1 + b.capacity() <= BUF_POOL_BYTES {
                g.1 += b.capacity();
                g.0.push(b);
            }
        }
    }
    fn fail(&self, why: String) {
        if let Ok(mut g) = self.send_error.lock() {
            g.get_or_insert(why);
        }
        self.transport.shutdown();
    }
}

#[derive(Default)]
struct Slot {
    conn: Mutex<Option<Arc<Conn>>>,
}

impl Slot {
    fn get(&self) -> Option<Arc<Conn>> {
        self.conn.lock().ok().and_then(|g| g.clone())
    }
}

/// A request sent: where its reply will be.
struct Ticket {
    conn: Arc<Conn>,
    waiter: Arc<Waiter>,
}

/// A client of one upstream export.
pub struct Upstream {
    pub uri: UpstreamUri,
    pub info: ExportInfo,
    pub health: Arc<Health>,
    slots: Vec<Arc<Slot>>,
    next: AtomicUsize,
    /// Set when this Upstream is dropped: connections that end then were not lost.
    stopping: Arc<AtomicBool>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        for slot in &self.slots {
            if let Some(c) = slot.get() {
                c.transport.shutdown();
            }
        }
        if let Ok(mut g) = self.runtime.lock() {
            if let Some(rt) = g.take() {
                // Never blocks, so it is safe inside another runtime's async context.
                rt.shutdown_background();
            }
        }
    }
}

impl Upstream {
    /// Connects (first connection synchronously, so a wrong URI fails now) and starts the
    /// pool. `writable`: refuse an upstream without FLUSH (writes could never be made durable).
    pub fn open(uri: UpstreamUri, writable: bool) -> Result<Arc<Upstream>, String> {
        let tls = if uri.tls {
            Some(handshake::tls_config(&uri)?)
        } else {
            None
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("nbdcrypt-upstream")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the upstream runtime: {e}"))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        {
            let (uri, tls) = (uri.clone(), tls.clone());
            runtime.spawn(async move {
                let r = handshake::connect(&uri, tls.as_ref()).await;
                let _ = tx.send(r);
            });
        }
        let (stream, info) = rx
            .recv_timeout(REQUEST_TIMEOUT)
            .map_err(|_| format!("{uri}: no answer within {} s", REQUEST_TIMEOUT.as_secs()))?
            .map_err(|e| format!("{uri}: {e}"))?;
        if writable && info.flags & TFLAG_READ_ONLY != 0 {
            return Err(format!(
                "{uri}: the upstream export is read-only; serve it with --read-only"
            ));
        }
        if writable && !info.has(TFLAG_SEND_FLUSH) {
            return Err(format!(
                "{uri}: the upstream does not offer NBD_CMD_FLUSH, so writes could never be made \
                 durable and a client's FLUSH would be a lie; refusing to serve it writable \
                 (enable flush on the upstream, or serve it with --read-only)"
            ));
        }
        let n = if info.has(TFLAG_CAN_MULTI_CONN) {
            pool_size()
        } else {
            1
        };
        let health = Arc::new(Health::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let slots: Vec<Arc<Slot>> = (0..n).map(|_| Arc::new(Slot::default())).collect();
        let mut first = Some(stream);
        for slot in &slots {
            let sup = Supervisor {
                uri: uri.clone(),
                tls: tls.clone(),
                want: info,
                slot: slot.clone(),
                health: health.clone(),
                stopping: stopping.clone(),
            };
            let first = first.take();
            runtime.spawn(sup.run(first));
        }
        // Wait (briefly) until the first connection is serving, so the first request does not
        // race its registration.
        for _ in 0..500 {
            if slots[0].get().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(Arc::new(Upstream {
            uri,
            info,
            health,
            slots,
            next: AtomicUsize::new(0),
            stopping,
            runtime: Mutex::new(Some(runtime)),
        }))
    }

    /// Connections currently up.
    pub fn connected(&self) -> usize {
        self.health.connected.load(Ordering::Relaxed)
    }

    /// Registers a request on a live connection and writes it to the socket from this thread;
    /// the connection it went to, or `reply` back (no connection is up). `buf`: a spare buffer
    /// for a READ's data (else one from the connection's pool). `timed`: nobody waits on it
    /// with a timeout, the connection's watchdog watches its age.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
        mut buf: Option<Vec<u8>>,
        reply: Completer,
        timed: bool,
    ) -> Result<Arc<Conn>, Completer> {
        let mut reply = Some(reply);
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..self.slots.len() {
            let slot = &self.slots[(start + i) % self.slots.len()];
            let Some(conn) = slot.get() else { continue };
            let b = if cmd == CMD_READ {
                buf.take().unwrap_or_else(|| conn.take_buf())
            } else {
                Vec::new()
            };
            let mut p = Pending::with_buf(cmd, offset, len, b);
            p.reply = reply.take();
            p.since = timed.then(std::time::Instant::now);
            p.volatile =
                matches!(cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) && flags & CMD_FLAG_FUA == 0;
            let handle = conn.next_handle.fetch_add(1, Ordering::Relaxed);
            // Registered before it is sent (the reply may come at once); refused once the
            // connection's reader has drained the map: then try the next connection.
            if let Err(mut p) = conn.pending.insert(handle, p) {
                reply = p.reply.take();
                if cmd == CMD_READ {
                    buf = Some(std::mem::take(&mut p.buf));
                }
                continue;
            }
            let mut hdr = [0u8; 28];
            hdr[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            hdr[4..6].copy_from_slice(&flags.to_be_bytes());
            hdr[6..8].copy_from_slice(&cmd.to_be_bytes());
            hdr[8..16].copy_from_slice(&handle.to_be_bytes());
            hdr[16..24].copy_from_slice(&offset.to_be_bytes());
            hdr[24..28].copy_from_slice(&len.to_be_bytes());
            if let Err(e) = conn.transport.send(&[&hdr, data]) {
                // Perhaps half a request on the wire: the connection is done. Its reader
                // fails everything in flight, this request too, with this reason.
                conn.fail(format!("sending a request: {e}"));
            }
            return Ok(conn);
        }
        match reply {
            Some(r) => Err(r),
            // Never: every path above that takes it gives it back or returns.
            None => Err(Completer::Call(Box::new(|_| {}))),
        }
    }

    fn not_connected(&self) -> ReplyError {
        ReplyError::Connection(format!(
            "not connected to {} (reconnecting{})",
            self.uri,
            self.health
                .last_error()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        ))
    }

    /// Registers a request and writes it to the socket from this thread; wait for it with
    /// `wait`.
    fn submit(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<Ticket, ReplyError> {
        let waiter = Arc::new(Waiter::default());
        let reply = Completer::Wait(waiter.clone());
        match self.send(cmd, flags, offset, len, data, None, reply, false) {
            Ok(conn) => Ok(Ticket { conn, waiter }),
            Err(_) => {
                self.health.failed_requests.fetch_add(1, Ordering::Relaxed);
                Err(self.not_connected())
            }
        }
    }

    /// Sends one request (READ or WRITE, at most `info.max_request` bytes) without waiting:
    /// `done` runs once with its answer, on the connection's reader thread (or on this one
    /// if no connection is up). A WRITE's `data` is on the socket when this returns. A reply
    /// that does not come within REQUEST_TIMEOUT drops the connection (its watchdog), which
    /// fails the request.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
        buf: Vec<u8>,
        done: Box<dyn FnOnce(Result<Vec<u8>, ReplyError>) + Send>,
    ) {
        let health = self.health.clone();
        let call = Completer::Call(Box::new(move |r: Result<Vec<u8>, ReplyError>| {
            if r.is_err() {
                health.failed_requests.fetch_add(1, Ordering::Relaxed);
            }
            done(r);
        }));
        if let Err(c) = self.send(cmd, flags, offset, len, data, Some(buf), call, true) {
            c.complete(Err(self.not_connected()));
        }
    }

    fn wait(&self, t: &Ticket) -> Result<Vec<u8>, ReplyError> {
        let r = t.waiter.wait(REQUEST_TIMEOUT).unwrap_or_else(|| {
            let why = format!(
                "no reply from {} within {} s",
                self.uri,
                REQUEST_TIMEOUT.as_secs()
            );
            // An upstream that takes requests and never answers: drop the connection (its
            // reader fails what is in flight and frees their buffers; a reconnect follows)
            // instead of letting every later request wait out the timeout too.
            t.conn.fail(why.clone());
            Err(ReplyError::Connection(why))
        });
        if r.is_err() {
            self.health.failed_requests.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Splits `[offset, offset+len)` into requests no larger than the upstream accepts.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
        let max = u64::from(self.info.max_request.max(4096));
        let end = offset.saturating_add(len);
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let n = (end - at).min(max);
            let p = (at, u32::try_from(n).unwrap_or(u32::MAX));
            at += n;
            Some(p)
        })
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), ReplyError> {
        let mut waits = Vec::new();
        for (off, n) in self.pieces(offset, buf.len() as u64) {
            waits.push((off, self.submit(CMD_READ, 0, off, n, &[])?));
        }
        for (off, t) in waits {
            let data = self.wait(&t)?;
            let s = usize::try_from(off - offset).unwrap_or(usize::MAX);
            let dst = buf
                .get_mut(s..s.saturating_add(data.len()))
                .ok_or_else(|| ReplyError::Connection("read reply of the wrong size".into()))?;
            dst.copy_from_slice(&data);
            t.conn.put_buf(data);
        }
        Ok(())
    }

    pub fn write(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), ReplyError> {
        let native_fua = fua && self.info.has(TFLAG_SEND_FUA);
        let flags = if native_fua { CMD_FLAG_FUA } else { 0 };
        let mut waits = Vec::new();
        for (off, n) in self.pieces(offset, buf.len() as u64) {
            let s = usize::try_from(off - offset).unwrap_or(usize::MAX);
            let piece = buf.get(s..s + n as usize).unwrap_or_default();
            waits.push(self.submit(CMD_WRITE, flags, off, n, piece)?);
        }
        for t in waits {
            self.wait(&t)?;
        }
        if fua && !native_fua {
            self.flush()?;
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<(), ReplyError> {
        if !self.info.has(TFLAG_SEND_FLUSH) {
            return Err(ReplyError::Connection(
                "the upstream does not offer NBD_CMD_FLUSH".into(),
            ));
        }
        let lost = |h: &Health| h.durability_lost().map(ReplyError::Connection);
        if let Some(e) = lost(&self.health) {
            return Err(e);
        }
        // Everything acknowledged before the FLUSH is sent is covered by it.
        let covered = self.health.volatile_acked.load(Ordering::SeqCst);
        let t = self.submit(CMD_FLUSH, 0, 0, 0, &[])?;
        self.wait(&t)?;
        // A connection lost while the FLUSH was in flight may have taken writes it was meant
        // to cover (on another connection, or before the upstream restarted).
        if let Some(e) = lost(&self.health) {
            return Err(e);
        }
        self.health.flushed.fetch_max(covered, Ordering::SeqCst);
        Ok(())
    }

    /// TRIM or WRITE_ZEROES (the caller checked the upstream advertises it).
    pub fn range_cmd(&self, cmd: u16, flags: u16, offset: u64, len: u64) -> Result<(), ReplyError> {
        let mut waits = Vec::new();
        // Ranges are not payload: up to 1 GiB (aligned) per request.
        let mut at = offset;
        let end = offset.saturating_add(len);
        while at < end {
            let n = (end - at).min(1 << 30);
            waits.push(self.submit(cmd, flags, at, u32::try_from(n).unwrap_or(1 << 30), &[])?);
            at += n;
        }
        for t in waits {
            self.wait(&t)?;
        }
        Ok(())
    }
}

struct Supervisor {
    uri: UpstreamUri,
    tls: Option<Arc<rustls::ClientConfig>>,
    want: ExportInfo,
    slot: Arc<Slot>,
    health: Arc<Health>,
    stopping: Arc<AtomicBool>,
}

impl Supervisor {
    async fn run(self, mut first: Option<handshake::Connected>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let stream = match first.take() {
                Some(s) => Ok(s),
                None => match handshake::connect(&self.uri, self.tls.as_ref()).await {
                    Ok((_, info)) if info.size != self.want.size => Err(format!(
                        "the upstream came back with size {} (was {}); not reconnecting to it",
                        info.size, self.want.size
                    )),
                    Ok((_, info))
                        if info.flags & (TFLAG_SEND_FLUSH | TFLAG_READ_ONLY)
                            != self.want.flags & (TFLAG_SEND_FLUSH | TFLAG_READ_ONLY) =>
                    {
                        Err("the upstream came back with other flush/read-only flags".into())
                    }
                    Ok((_, info)) if info.structured != self.want.structured => {
                        Err("the upstream came back without structured replies".into())
                    }
                    Ok((s, _)) => Ok(s),
                    Err(e) => Err(e),
                },
            };
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    self.health.set_error(&e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            backoff = BACKOFF_MIN;
            let err = self.serve(stream).await;
            tracing::warn!(upstream = %self.uri, error = %err, "upstream connection lost; reconnecting");
            self.health.set_error(&err);
            self.health.reconnects.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
        }
    }

    /// Runs one connection until it fails; returns why.
    async fn serve(&self, stream: handshake::Connected) -> String {
        let (transport, rx) = match Transport::new(stream) {
            Ok(t) => t,
            Err(e) => return e,
        };
        let conn = Arc::new(Conn {
            transport,
            pending: PendingMap::default(),
            next_handle: AtomicU64::new(1),
            send_error: Mutex::new(None),
            bufs: Mutex::new((Vec::new(), 0)),
        });
        if let Ok(mut g) = self.slot.conn.lock() {
            *g = Some(conn.clone());
        }
        // The Upstream's drop shuts down the connections in the slots after setting
        // `stopping`: one registered just now is shut down here instead.
        if self.stopping.load(Ordering::SeqCst) {
            conn.transport.shutdown();
        }
        self.health.connected.fetch_add(1, Ordering::Relaxed);
        let watched = conn.clone();
        let reader = Reader {
            uri: self.uri.clone(),
            structured: self.want.structured,
            slot: self.slot.clone(),
            health: self.health.clone(),
            stopping: self.stopping.clone(),
            losses_at_start: self.health.losses.load(Ordering::SeqCst),
            conn,
        };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("nbdcrypt-upstream-rx".into())
            .spawn(move || {
                let _ = done_tx.send(reader.run(rx));
            });
        match spawned {
            Ok(_) => {
                // The watchdog of requests nobody waits on with a timeout (`Upstream::start`):
                // one overdue drops the connection, which fails everything in flight on it.
                let mut done_rx = done_rx;
                loop {
                    match tokio::time::timeout(Duration::from_secs(1), &mut done_rx).await {
                        Ok(r) => break r.unwrap_or_else(|_| "the reply reader ended".to_string()),
                        Err(_) if watched.pending.overdue(REQUEST_TIMEOUT) => {
                            watched.fail(format!(
                                "no reply from {} within {} s",
                                self.uri,
                                REQUEST_TIMEOUT.as_secs()
                            ))
                        }
                        Err(_) => {}
                    }
                }
            }
            // `reader` went with the closure: nothing was sent on this connection yet, but
            // it was registered; drop it the way a reader would.
            Err(e) => {
                let why = format!("cannot start a reply reader thread: {e}");
                if let Ok(mut g) = self.slot.conn.lock() {
                    if let Some(c) = g.take() {
                        c.transport.shutdown();
                        for p in c.pending.drain() {
                            if let Some(w) = p.reply {
                                w.complete(Err(ReplyError::Connection(why.clone())));
                            }
                        }
                    }
                }
                self.health.connected.fetch_sub(1, Ordering::Relaxed);
                why
            }
        }
    }
}

/// The reply reader's socket side. Completions decoded from bytes already in memory wait here
/// and their callers are woken together right before the next read of the socket, the one that
/// may block: a caller woken in the middle of a batch of replies preempts the reader on a busy
/// machine (an involuntary switch, and the rest of the batch waits for it). No completion waits
/// for the upstream: every read of the socket wakes what is decoded first.
struct Deferring {
    rx: Receiver,
    ready: Vec<(Completer, Result<Vec<u8>, ReplyError>)>,
}

impl Deferring {
    fn wake(&mut self) {
        for (w, r) in self.ready.drain(..) {
            w.complete(r);
        }
    }
}

impl std::io::Read for Deferring {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.wake();
        std::io::Read::read(&mut self.rx, buf)
    }
}

/// A connection's reply reader (its own thread): decodes replies and completes their waiters;
/// when the connection ends, takes it out of its slot and fails everything in flight.
struct Reader {
    uri: UpstreamUri,
    structured: bool,
    slot: Arc<Slot>,
    health: Arc<Health>,
    stopping: Arc<AtomicBool>,
    losses_at_start: u64,
    conn: Arc<Conn>,
}

impl Reader {
    fn run(self, rx: Receiver) -> String {
        // Buffered: one read(2) takes many small replies; a payload at least this large
        // bypasses the buffer and is read straight into the request's buffer.
        let mut rd = BufReader::with_capacity(
            128 * 1024,
            Deferring {
                rx,
                ready: Vec::new(),
            },
        );
        let health = &self.health;
        let err = loop {
            match proto::read_reply(&mut rd, self.structured, &self.conn.pending) {
                Ok(Decoded::Partial) => {}
                Ok(Decoded::Done(p, r)) => {
                    // ESHUTDOWN: the upstream is going away (nbdkit answers it while it waits
                    // for clients to leave): drop this connection, reconnect.
                    let shutting_down = matches!(&r, Err(ReplyError::Upstream { errno: 108, .. }));
                    if p.volatile && r.is_ok() {
                        // Before the caller hears of it (see `Health::flushed`).
                        health.volatile_acked.fetch_add(1, Ordering::SeqCst);
                        if health.losses.load(Ordering::SeqCst) != self.losses_at_start {
                            health.late_ack(&self.uri);
                        }
                    }
                    if let Some(w) = p.reply {
                        rd.get_mut().ready.push((w, r));
                    }
                    if shutting_down {
                        break "the upstream is shutting down (ESHUTDOWN)".to_string();
                    }
                }
                Err(e) => break e,
            }
        };
        rd.get_mut().wake();
        // A sender's failure is the cause (the reader then only saw its shutdown).
        let err = self
            .conn
            .send_error
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .unwrap_or(err);
        self.conn.transport.shutdown();
        if let Ok(mut g) = self.slot.conn.lock() {
            if g.as_ref().is_some_and(|c| Arc::ptr_eq(c, &self.conn)) {
                *g = None;
            }
        }
        health.connected.fetch_sub(1, Ordering::Relaxed);
        // Ended by dropping the Upstream (shutdown): nothing will flush again.
        let stopping = self.stopping.load(Ordering::SeqCst);
        if !stopping {
            health.connection_lost(&self.uri, &err);
        }
        for p in self.conn.pending.drain() {
            if let Some(w) = p.reply {
                w.complete(Err(ReplyError::Connection(err.clone())));
            }
        }
        if stopping {
            "closed".to_string()
        } else {
            err
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::Instant;

    use super::*;

    /// A minimal upstream: the handshake (structured replies on, a 1 MiB export with FLUSH),
    /// then `reply` answers the first request (its handle, command, length) with raw bytes and
    /// the connection closes.
    fn fake_upstream(
        reply: impl Fn(u64, u16, u32) -> Vec<u8> + Send + 'static,
    ) -> (tempfile::TempDir, String, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("up.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let Ok((mut s, _)) = l.accept() else { return };
            let _ = serve_one(&mut s, &reply);
            // Then the connection closes (reconnections find nobody answering).
        });
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        (dir, uri, t)
    }

    fn serve_one(
        s: &mut UnixStream,
        reply: &dyn Fn(u64, u16, u32) -> Vec<u8>,
    ) -> std::io::Result<()> {
        let mut g = NBDMAGIC.to_be_bytes().to_vec();
        g.extend(IHAVEOPT.to_be_bytes());
        g.extend((FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&g)?;
        let mut cflags = [0u8; 4];
        s.read_exact(&mut cflags)?;
        let opt_reply = |opt: u32, ty: u32, data: &[u8]| {
            let mut r = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
            r.extend(opt.to_be_bytes());
            r.extend(ty.to_be_bytes());
            r.extend(u32::try_from(data.len()).unwrap().to_be_bytes());
            r.extend(data);
            r
        };
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h)?;
            let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data)?;
            if opt == OPT_GO {
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend((1u64 << 20).to_be_bytes());
                info.extend((TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH).to_be_bytes());
                s.write_all(&opt_reply(opt, REP_INFO, &info))?;
                s.write_all(&opt_reply(opt, REP_ACK, &[]))?;
                break;
            }
            s.write_all(&opt_reply(opt, REP_ACK, &[]))?;
        }
        let mut req = [0u8; 28];
        s.read_exact(&mut req)?;
        let cmd = u16::from_be_bytes([req[6], req[7]]);
        let handle = u64::from_be_bytes(req[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(req[24..28].try_into().unwrap());
        s.write_all(&reply(handle, cmd, len))
    }

    fn chunk(flags: u16, ty: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend(flags.to_be_bytes());
        v.extend(ty.to_be_bytes());
        v.extend(handle.to_be_bytes());
        v.extend(u32::try_from(payload.len()).unwrap().to_be_bytes());
        v.extend(payload);
        v
    }

    /// A read against an upstream that answers with `reply` fails soon (never waits for the
    /// request timeout) with an error naming the violation, and reads nothing beyond its buffer.
    fn read_fails(reply: impl Fn(u64, u16, u32) -> Vec<u8> + Send + 'static, want: &str) {
        let (_dir, uri, _t) = fake_upstream(reply);
        let up = Upstream::open(UpstreamUri::parse(&uri).unwrap(), true).unwrap();
        let mut buf = vec![0xaau8; 4096];
        let t0 = Instant::now();
        let e = up.read(&mut buf, 8192).unwrap_err().to_string();
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "took {:?}",
            t0.elapsed()
        );
        assert!(e.contains(want), "{e:?} does not say {want:?}");
        assert!(
            buf.iter().all(|&b| b == 0xaa),
            "a failed read wrote into the buffer"
        );
        assert_eq!(up.health.failed_requests.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_reply_for_a_handle_never_sent_fails_the_connection() {
        read_fails(
            |h, _, len| {
                let mut r = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
                r.extend(0u32.to_be_bytes());
                r.extend(h.wrapping_add(1000).to_be_bytes());
                r.extend(vec![0u8; len as usize]);
                r
            },
            "unknown handle",
        );
    }

    #[test]
    fn a_data_chunk_longer_than_the_read_is_refused_before_it_is_read() {
        read_fails(
            |h, _, len| {
                let mut p = 8192u64.to_be_bytes().to_vec();
                p.extend(vec![0x55u8; len as usize + 512]);
                chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, h, &p)
            },
            "data chunk of",
        );
    }

    #[test]
    fn a_chunk_outside_the_request_and_a_short_read_are_refused() {
        read_fails(
            |h, _, len| {
                let mut p = 4096u64.to_be_bytes().to_vec();
                p.extend(vec![0x55u8; len as usize]);
                chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, h, &p)
            },
            "outside its request",
        );
        read_fails(
            |h, _, _| {
                let mut p = 8192u64.to_be_bytes().to_vec();
                p.extend([0x55u8; 512]);
                chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, h, &p)
            },
            "covers 512 of 4096",
        );
    }

    #[test]
    fn a_reply_cut_short_by_a_closed_connection_fails_the_request() {
        read_fails(
            |h, _, _| {
                let mut r = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
                r.extend(0u32.to_be_bytes());
                r.extend(h.to_be_bytes());
                r.extend([0x55u8; 100]);
                r
            },
            "reading a reply",
        );
    }

    #[test]
    fn a_well_formed_structured_read_completes() {
        let (_dir, uri, _t) = fake_upstream(|h, cmd, len| {
            assert_eq!(cmd, CMD_READ);
            let half = len / 2;
            let mut a = 8192u64.to_be_bytes().to_vec();
            a.extend(vec![0x11u8; half as usize]);
            let mut hole = (8192u64 + u64::from(half)).to_be_bytes().to_vec();
            hole.extend((len - half).to_be_bytes());
            let mut r = chunk(0, REPLY_TYPE_OFFSET_DATA, h, &a);
            r.extend(chunk(
                REPLY_FLAG_DONE,
                proto::REPLY_TYPE_OFFSET_HOLE,
                h,
                &hole,
            ));
            r
        });
        let up = Upstream::open(UpstreamUri::parse(&uri).unwrap(), true).unwrap();
        // A recycled buffer full of old bytes: the hole must still read as zeros.
        let mut buf = vec![0xaau8; 4096];
        up.read(&mut buf, 8192).unwrap();
        assert!(buf[..2048].iter().all(|&b| b == 0x11));
        assert!(buf[2048..].iter().all(|&b| b == 0));
    }
}
