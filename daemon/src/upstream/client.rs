//! The upstream connection pool: one connection, or several (`POOL_SIZE`) when the upstream
//! offers CAN_MULTI_CONN. Each connection has a writer task (requests, pipelined with handles)
//! and a reader task (replies, decoded by `proto`). Callers are blocking threads: they queue a
//! request and wait on a channel, so this works from any thread (no `block_on`).
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

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use tokio_rustls::rustls;

use super::handshake::{self, ExportInfo};
use super::proto::{self, Decoded, Pending, PendingMap, ReplyError};
use super::uri::UpstreamUri;
use crate::nbd::wire::*;

/// Connections opened when the upstream offers CAN_MULTI_CONN.
pub const POOL_SIZE: usize = 4;
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

struct Submit {
    cmd: u16,
    flags: u16,
    offset: u64,
    len: u32,
    data: Vec<u8>,
    reply: std::sync::mpsc::SyncSender<Result<Vec<u8>, ReplyError>>,
}

#[derive(Default)]
struct Slot {
    tx: Mutex<Option<mpsc::UnboundedSender<Submit>>>,
}

/// A client of one upstream export.
pub struct Upstream {
    pub uri: UpstreamUri,
    pub info: ExportInfo,
    pub health: Arc<Health>,
    slots: Vec<Arc<Slot>>,
    next: AtomicUsize,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
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
            POOL_SIZE
        } else {
            1
        };
        let health = Arc::new(Health::default());
        let slots: Vec<Arc<Slot>> = (0..n).map(|_| Arc::new(Slot::default())).collect();
        let mut first = Some(stream);
        for slot in &slots {
            let sup = Supervisor {
                uri: uri.clone(),
                tls: tls.clone(),
                want: info,
                slot: slot.clone(),
                health: health.clone(),
            };
            let first = first.take();
            runtime.spawn(sup.run(first));
        }
        // Wait (briefly) until the first connection is serving, so the first request does not
        // race its registration.
        for _ in 0..500 {
            if slots[0].tx.lock().map(|g| g.is_some()).unwrap_or(false) {
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
            runtime: Mutex::new(Some(runtime)),
        }))
    }

    /// Connections currently up.
    pub fn connected(&self) -> usize {
        self.health.connected.load(Ordering::Relaxed)
    }

    fn queue(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: Vec<u8>,
    ) -> Result<std::sync::mpsc::Receiver<Result<Vec<u8>, ReplyError>>, ReplyError> {
        let (reply, rx) = std::sync::mpsc::sync_channel(1);
        let mut sub = Submit {
            cmd,
            flags,
            offset,
            len,
            data,
            reply,
        };
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..self.slots.len() {
            let slot = &self.slots[(start + i) % self.slots.len()];
            let tx = slot.tx.lock().ok().and_then(|g| g.clone());
            if let Some(tx) = tx {
                match tx.send(sub) {
                    Ok(()) => return Ok(rx),
                    Err(mpsc::error::SendError(s)) => sub = s,
                }
            }
        }
        self.health.failed_requests.fetch_add(1, Ordering::Relaxed);
        Err(ReplyError::Connection(format!(
            "not connected to {} (reconnecting{})",
            self.uri,
            self.health
                .last_error()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        )))
    }

    fn wait(
        &self,
        rx: std::sync::mpsc::Receiver<Result<Vec<u8>, ReplyError>>,
    ) -> Result<Vec<u8>, ReplyError> {
        use std::sync::mpsc::RecvTimeoutError;
        let r = match rx.recv_timeout(REQUEST_TIMEOUT) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(ReplyError::Connection(format!(
                "no reply from {} within {} s",
                self.uri,
                REQUEST_TIMEOUT.as_secs()
            ))),
            Err(RecvTimeoutError::Disconnected) => Err(ReplyError::Connection(format!(
                "the connection to {} was lost before the request was sent",
                self.uri
            ))),
        };
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
            waits.push((off, self.queue(CMD_READ, 0, off, n, Vec::new())?));
        }
        for (off, rx) in waits {
            let data = self.wait(rx)?;
            let s = usize::try_from(off - offset).unwrap_or(usize::MAX);
            let dst = buf
                .get_mut(s..s.saturating_add(data.len()))
                .ok_or_else(|| ReplyError::Connection("read reply of the wrong size".into()))?;
            dst.copy_from_slice(&data);
        }
        Ok(())
    }

    pub fn write(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), ReplyError> {
        let native_fua = fua && self.info.has(TFLAG_SEND_FUA);
        let flags = if native_fua { CMD_FLAG_FUA } else { 0 };
        let mut waits = Vec::new();
        for (off, n) in self.pieces(offset, buf.len() as u64) {
            let s = usize::try_from(off - offset).unwrap_or(usize::MAX);
            let piece = buf.get(s..s + n as usize).unwrap_or_default().to_vec();
            waits.push(self.queue(CMD_WRITE, flags, off, n, piece)?);
        }
        for rx in waits {
            self.wait(rx)?;
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
        let rx = self.queue(CMD_FLUSH, 0, 0, 0, Vec::new())?;
        self.wait(rx)?;
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
            waits.push(self.queue(
                cmd,
                flags,
                at,
                u32::try_from(n).unwrap_or(1 << 30),
                Vec::new(),
            )?);
            at += n;
        }
        for rx in waits {
            self.wait(rx)?;
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
}

impl Supervisor {
    async fn run(self, mut first: Option<Box<dyn handshake::Stream>>) {
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
    async fn serve(&self, stream: Box<dyn handshake::Stream>) -> String {
        let (tx, mut rx) = mpsc::unbounded_channel::<Submit>();
        let pending = Arc::new(PendingMap::default());
        let (rd, wr) = tokio::io::split(stream);
        // Buffered: one read(2) takes many small replies (4 KiB reads at QD32 were two reads
        // each); a payload at least this large bypasses the buffer.
        let mut rd = tokio::io::BufReader::with_capacity(128 * 1024, rd);
        if let Ok(mut g) = self.slot.tx.lock() {
            *g = Some(tx);
        }
        self.health.connected.fetch_add(1, Ordering::Relaxed);
        let losses_at_start = self.health.losses.load(Ordering::SeqCst);
        let structured = self.want.structured;
        let reader = {
            let pending = pending.clone();
            let health = self.health.clone();
            let uri = &self.uri;
            async move {
                loop {
                    match proto::read_reply(&mut rd, structured, &pending).await {
                        Ok(Decoded::Partial) => {}
                        Ok(Decoded::Done(p, r)) => {
                            // ESHUTDOWN: the upstream is going away (nbdkit answers it while
                            // it waits for clients to leave): drop this connection, reconnect.
                            let shutting_down =
                                matches!(&r, Err(ReplyError::Upstream { errno: 108, .. }));
                            if p.volatile && r.is_ok() {
                                // Before the caller hears of it (see `Health::flushed`).
                                health.volatile_acked.fetch_add(1, Ordering::SeqCst);
                                if health.losses.load(Ordering::SeqCst) != losses_at_start {
                                    health.late_ack(uri);
                                }
                            }
                            if let Some(reply) = p.reply {
                                let _ = reply.try_send(r);
                            }
                            if shutting_down {
                                return "the upstream is shutting down (ESHUTDOWN)".to_string();
                            }
                        }
                        Err(e) => return e,
                    }
                }
            }
        };
        let writer = {
            let pending = pending.clone();
            async move {
                let mut w = BufWriter::with_capacity(256 * 1024, wr);
                let mut handle = 0u64;
                while let Some(sub) = rx.recv().await {
                    let mut next = Some(sub);
                    // Batch whatever is queued, then flush once.
                    while let Some(sub) = next.take() {
                        handle = handle.wrapping_add(1);
                        let mut hdr = [0u8; 28];
                        hdr[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
                        hdr[4..6].copy_from_slice(&sub.flags.to_be_bytes());
                        hdr[6..8].copy_from_slice(&sub.cmd.to_be_bytes());
                        hdr[8..16].copy_from_slice(&handle.to_be_bytes());
                        hdr[16..24].copy_from_slice(&sub.offset.to_be_bytes());
                        hdr[24..28].copy_from_slice(&sub.len.to_be_bytes());
                        let mut p = Pending::new(sub.cmd, sub.offset, sub.len);
                        p.reply = Some(sub.reply);
                        p.volatile = matches!(sub.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES)
                            && sub.flags & CMD_FLAG_FUA == 0;
                        pending.insert(handle, p);
                        if let Err(e) = w.write_all(&hdr).await {
                            return format!("sending a request: {e}");
                        }
                        if !sub.data.is_empty() {
                            if let Err(e) = w.write_all(&sub.data).await {
                                return format!("sending a request: {e}");
                            }
                        }
                        next = rx.try_recv().ok();
                    }
                    if let Err(e) = w.flush().await {
                        return format!("sending a request: {e}");
                    }
                }
                "closed".to_string()
            }
        };
        let err = tokio::select! {
            e = reader => e,
            e = writer => e,
        };
        if let Ok(mut g) = self.slot.tx.lock() {
            *g = None;
        }
        self.health.connected.fetch_sub(1, Ordering::Relaxed);
        // "closed": the Upstream itself was dropped (shutdown); nothing will flush again.
        if err != "closed" {
            self.health.connection_lost(&self.uri, &err);
        }
        for p in pending.drain() {
            if let Some(reply) = p.reply {
                let _ = reply.try_send(Err(ReplyError::Connection(err.clone())));
            }
        }
        err
    }
}
