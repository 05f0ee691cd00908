//! Decoding the upstream's transmission-phase replies (simple and structured). Everything here
//! comes from the upstream and is treated as hostile: every length is bounded before anything is
//! allocated or read, every handle must name a request in flight, every chunk must lie inside
//! its request, a read must be covered exactly once, and nothing panics.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::nbd::wire::*;

/// `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;
/// Longest error message or unknown error chunk we read (then discard).
pub const MAX_ERROR_CHUNK: u32 = 64 * 1024;
/// Most chunks one read may be split into (bounds the coverage list).
pub const MAX_CHUNKS: usize = 65_536;

/// A request in flight on one connection, as the reply decoder needs it.
pub struct Pending {
    pub cmd: u16,
    pub offset: u64,
    pub len: u32,
    /// READ: the data, filled in by chunks (zero-initialised: holes stay zero).
    pub buf: Vec<u8>,
    /// READ over structured replies: the byte ranges (relative) covered so far.
    pub covered: Vec<(u32, u32)>,
    /// The first error chunk's errno and message.
    pub error: Option<(u32, String)>,
    /// Chunks received so far (bounded by `MAX_CHUNKS`).
    pub chunks: usize,
    /// Where the completion goes (None in the fuzz target).
    pub reply: Option<Completer>,
    /// When a request with a callback was sent: nobody waits on it with a timeout, so the
    /// connection's watchdog checks its age ([`PendingMap::overdue`]).
    pub since: Option<Instant>,
    /// A write-class command sent without FUA: once acknowledged, its data may sit in the
    /// upstream's volatile cache until a FLUSH (counted by the connection's reader).
    pub volatile: bool,
}

impl Pending {
    pub fn new(cmd: u16, offset: u64, len: u32) -> Pending {
        Pending::with_buf(cmd, offset, len, Vec::new())
    }

    /// Like `new`, with a (recycled) buffer for a READ's data. Its old contents are never seen
    /// by the caller: a successful read covers every byte exactly once (data, or a hole that is
    /// zero-filled), and a failed one returns no data.
    pub fn with_buf(cmd: u16, offset: u64, len: u32, mut buf: Vec<u8>) -> Pending {
        if cmd == CMD_READ {
            buf.resize(len as usize, 0);
        } else {
            buf.clear();
        }
        Pending {
            cmd,
            offset,
            len,
            buf,
            covered: Vec::new(),
            error: None,
            chunks: 0,
            reply: None,
            since: None,
            volatile: false,
        }
    }
}

/// Why a request failed.
#[derive(Debug, Clone)]
pub enum ReplyError {
    /// The upstream answered with an NBD error value (and maybe a message).
    Upstream { errno: u32, message: String },
    /// The connection failed or the upstream broke the protocol.
    Connection(String),
}

impl std::fmt::Display for ReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyError::Upstream { errno, message } if message.is_empty() => {
                write!(f, "the upstream returned error {errno}")
            }
            ReplyError::Upstream { errno, message } => {
                write!(f, "the upstream returned error {errno}: {message}")
            }
            ReplyError::Connection(m) => write!(f, "upstream connection: {m}"),
        }
    }
}

/// The requests in flight on a connection, keyed by handle. Short critical sections only: the
/// decoder takes an entry out while it reads that reply's payload and puts it back if not done.
/// Once drained (the connection died) nothing more is accepted, so no request can be
/// registered after the drain and then wait for a reply that never comes.
#[derive(Default)]
pub struct PendingMap(Mutex<(HashMap<u64, Pending>, bool)>);

impl PendingMap {
    /// Registers a request; gives it back if the connection is closed.
    pub fn insert(&self, handle: u64, p: Pending) -> Result<(), Box<Pending>> {
        match self.0.lock() {
            Ok(mut m) if !m.1 => {
                m.0.insert(handle, p);
                Ok(())
            }
            _ => Err(Box::new(p)),
        }
    }
    pub fn take(&self, handle: u64) -> Option<Pending> {
        self.0.lock().ok()?.0.remove(&handle)
    }
    /// Whether a request with a callback has waited longer than `timeout` for its reply.
    pub fn overdue(&self, timeout: Duration) -> bool {
        let Ok(m) = self.0.lock() else {
            return false;
        };
        m.0.values()
            .filter_map(|p| p.since)
            .any(|t| t.elapsed() > timeout)
    }
    /// Closes the map and returns every request still in flight (the connection died).
    pub fn drain(&self) -> Vec<Pending> {
        match self.0.lock() {
            Ok(mut m) => {
                m.1 = true;
                m.0.drain().map(|(_, p)| p).collect()
            }
            Err(_) => Vec::new(),
        }
    }
}

/// Where a request's completion goes.
pub enum Completer {
    /// A blocked caller.
    Wait(Arc<Waiter>),
    /// A callback, run on the thread that completes the request (the connection's reader, or
    /// the one that failed it).
    Call(Box<dyn FnOnce(Result<Vec<u8>, ReplyError>) + Send>),
}

impl Completer {
    pub fn complete(self, r: Result<Vec<u8>, ReplyError>) {
        match self {
            Completer::Wait(w) => w.complete(r),
            Completer::Call(f) => f(r),
        }
    }
}

/// Where a caller waits for its request's completion (filled in by the connection's reader).
#[derive(Default)]
pub struct Waiter {
    done: Mutex<Option<Result<Vec<u8>, ReplyError>>>,
    cv: Condvar,
}

impl Waiter {
    /// The first completion wins; later ones are ignored.
    pub fn complete(&self, r: Result<Vec<u8>, ReplyError>) {
        if let Ok(mut g) = self.done.lock() {
            if g.is_none() {
                *g = Some(r);
                // Woken after the unlock, so it does not wake only to wait for this lock.
                drop(g);
                self.cv.notify_one();
            }
        }
    }

    /// The completion, or None after `timeout`.
    pub fn wait(&self, timeout: Duration) -> Option<Result<Vec<u8>, ReplyError>> {
        let deadline = Instant::now() + timeout;
        let mut g = self.done.lock().ok()?;
        loop {
            if let Some(r) = g.take() {
                return Some(r);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            g = self.cv.wait_timeout(g, left).ok()?.0;
        }
    }
}

/// One reply (or one chunk of one) decoded.
pub enum Decoded {
    /// A chunk of a structured reply that is not the last one.
    Partial,
    /// A request completed: its data (READ) or nothing, or the upstream's error.
    Done(Pending, Result<Vec<u8>, ReplyError>),
}

/// A protocol violation: the connection is dropped and everything in flight fails.
pub type ProtoError = String;

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn discard<R: Read>(r: &mut R, n: u32) -> Result<(), ProtoError> {
    let copied = std::io::copy(&mut r.take(u64::from(n)), &mut std::io::sink())
        .map_err(|e| format!("reading a reply: {e}"))?;
    if copied != u64::from(n) {
        return Err("the upstream closed the connection mid-reply".into());
    }
    Ok(())
}

fn read_exact<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), ProtoError> {
    r.read_exact(buf)
        .map_err(|e| format!("reading a reply: {e}"))
}

/// Reads one simple reply or one structured chunk from `r`.
pub fn read_reply<R: Read>(
    r: &mut R,
    structured: bool,
    pending: &PendingMap,
) -> Result<Decoded, ProtoError> {
    let mut magic = [0u8; 4];
    read_exact(r, &mut magic)?;
    match be_u32(&magic) {
        SIMPLE_REPLY_MAGIC => {
            let mut h = [0u8; 12];
            read_exact(r, &mut h)?;
            let errno = be_u32(&h[..4]);
            let handle = be_u64(&h[4..]);
            let mut p = pending
                .take(handle)
                .ok_or_else(|| format!("reply for unknown handle {handle:#x}"))?;
            if errno != 0 {
                return Ok(Decoded::Done(
                    p,
                    Err(ReplyError::Upstream {
                        errno,
                        message: String::new(),
                    }),
                ));
            }
            if p.cmd == CMD_READ {
                let res = if p.covered.is_empty() {
                    read_exact(r, &mut p.buf)
                } else {
                    Err("simple reply after structured chunks".into())
                };
                if let Err(e) = res {
                    // Back in the map: the connection's failure fails it with the reason.
                    let _ = pending.insert(handle, p);
                    return Err(e);
                }
                let data = std::mem::take(&mut p.buf);
                return Ok(Decoded::Done(p, Ok(data)));
            }
            Ok(Decoded::Done(p, Ok(Vec::new())))
        }
        STRUCTURED_REPLY_MAGIC if structured => {
            let mut h = [0u8; 16];
            read_exact(r, &mut h)?;
            let flags = be_u16(&h[..2]);
            let ty = be_u16(&h[2..4]);
            let handle = be_u64(&h[4..12]);
            let length = be_u32(&h[12..16]);
            let mut p = pending
                .take(handle)
                .ok_or_else(|| format!("reply chunk for unknown handle {handle:#x}"))?;
            let checked = (|| {
                chunk(r, &mut p, ty, length)?;
                p.chunks += 1;
                if ty == REPLY_TYPE_NONE && flags & REPLY_FLAG_DONE == 0 {
                    return Err("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE".to_string());
                }
                if flags & REPLY_FLAG_DONE == 0 && p.chunks > MAX_CHUNKS {
                    return Err("too many chunks in one reply".into());
                }
                if flags & REPLY_FLAG_DONE != 0 && p.error.is_none() && p.cmd == CMD_READ {
                    check_coverage(&mut p.covered, p.len)?;
                }
                Ok(())
            })();
            if let Err(e) = checked {
                // Back in the map: the connection's failure fails it with the reason.
                let _ = pending.insert(handle, p);
                return Err(e);
            }
            if flags & REPLY_FLAG_DONE == 0 {
                // Only the reader drains the map, so it is still open here.
                let _ = pending.insert(handle, p);
                return Ok(Decoded::Partial);
            }
            if let Some((errno, message)) = p.error.take() {
                return Ok(Decoded::Done(
                    p,
                    Err(ReplyError::Upstream { errno, message }),
                ));
            }
            if p.cmd == CMD_READ {
                let data = std::mem::take(&mut p.buf);
                return Ok(Decoded::Done(p, Ok(data)));
            }
            Ok(Decoded::Done(p, Ok(Vec::new())))
        }
        other => Err(format!("bad reply magic {other:#010x}")),
    }
}

/// The chunk's payload, checked against its request.
fn chunk<R: Read>(r: &mut R, p: &mut Pending, ty: u16, length: u32) -> Result<(), ProtoError> {
    let in_request = |off: u64, n: u64| -> Result<u32, ProtoError> {
        let rel = off
            .checked_sub(p.offset)
            .filter(|rel| rel.checked_add(n).is_some_and(|e| e <= u64::from(p.len)))
            .ok_or_else(|| {
                format!(
                    "chunk [{off}, +{n}) outside its request [{}, +{}]",
                    p.offset, p.len
                )
            })?;
        u32::try_from(rel).map_err(|_| "chunk offset overflows".to_string())
    };
    match ty {
        REPLY_TYPE_NONE => {
            if length != 0 {
                return Err("NBD_REPLY_TYPE_NONE with a payload".into());
            }
        }
        REPLY_TYPE_OFFSET_DATA => {
            if p.cmd != CMD_READ {
                return Err("data chunk for a request that is not a read".into());
            }
            if length <= 8 || length - 8 > p.len {
                return Err(format!(
                    "data chunk of {length} bytes for a read of {}",
                    p.len
                ));
            }
            let mut o = [0u8; 8];
            read_exact(r, &mut o)?;
            let n = length - 8;
            let rel = in_request(be_u64(&o), u64::from(n))?;
            let (s, e) = (rel as usize, rel as usize + n as usize);
            read_exact(r, &mut p.buf[s..e])?;
            p.covered.push((rel, n));
        }
        REPLY_TYPE_OFFSET_HOLE => {
            if p.cmd != CMD_READ || length != 12 {
                return Err("malformed hole chunk".into());
            }
            let mut b = [0u8; 12];
            read_exact(r, &mut b)?;
            let n = be_u32(&b[8..]);
            if n == 0 {
                return Err("empty hole chunk".into());
            }
            let rel = in_request(be_u64(&b[..8]), u64::from(n))?;
            p.buf[rel as usize..rel as usize + n as usize].fill(0);
            p.covered.push((rel, n));
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            if !(6..=MAX_ERROR_CHUNK).contains(&length) {
                return Err(format!("error chunk of {length} bytes"));
            }
            let mut b = vec![0u8; length as usize];
            read_exact(r, &mut b)?;
            let errno = be_u32(&b[..4]);
            let msg_len = u32::from(be_u16(&b[4..6]));
            let expect = 6 + msg_len + if ty == REPLY_TYPE_ERROR_OFFSET { 8 } else { 0 };
            if expect != length {
                return Err("error chunk length does not match its message".into());
            }
            let message = String::from_utf8_lossy(&b[6..6 + msg_len as usize])
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect();
            if p.error.is_none() {
                // Error 0 in an error chunk is a protocol slip; still a failure.
                p.error = Some((if errno == 0 { 5 } else { errno }, message));
            }
        }
        t if t & (1 << 15) != 0 => {
            if length > MAX_ERROR_CHUNK {
                return Err(format!("unknown error chunk of {length} bytes"));
            }
            discard(r, length)?;
            if p.error.is_none() {
                p.error = Some((5, format!("unknown error chunk type {t}")));
            }
        }
        t => return Err(format!("unexpected reply chunk type {t}")),
    }
    Ok(())
}

/// A successful read must be covered exactly: no gap, no overlap.
fn check_coverage(covered: &mut [(u32, u32)], len: u32) -> Result<(), ProtoError> {
    covered.sort_unstable();
    let mut at = 0u64;
    for &(s, n) in covered.iter() {
        if u64::from(s) != at {
            return Err("read reply chunks leave a gap or overlap".into());
        }
        at += u64::from(n);
    }
    if at != u64::from(len) {
        return Err(format!("read reply covers {at} of {len} bytes"));
    }
    Ok(())
}

/// For the fuzz target: decode `bytes` as replies to a read of `len` bytes at `offset` (handle 1)
/// and a flush (handle 2) until an error, both complete, or the input ends. Never panics.
pub fn fuzz_decode(bytes: &[u8], structured: bool, offset: u64, len: u32) -> usize {
    let map = PendingMap::default();
    let _ = map.insert(1, Pending::new(CMD_READ, offset, len.min(1 << 20)));
    let _ = map.insert(2, Pending::new(CMD_FLUSH, 0, 0));
    let mut r = bytes;
    let mut done = 0;
    while done < 2 {
        match read_reply(&mut r, structured, &map) {
            Ok(Decoded::Done(..)) => done += 1,
            Ok(Decoded::Partial) => {}
            Err(_) => break,
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk_bytes(flags: u16, ty: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend(flags.to_be_bytes());
        v.extend(ty.to_be_bytes());
        v.extend(handle.to_be_bytes());
        v.extend((payload.len() as u32).to_be_bytes());
        v.extend(payload);
        v
    }

    fn run(bytes: &[u8], p: Pending) -> Result<Decoded, ProtoError> {
        let map = PendingMap::default();
        assert!(map.insert(7, p).is_ok());
        let mut r = bytes;
        loop {
            match read_reply(&mut r, true, &map)? {
                Decoded::Partial => continue,
                d => return Ok(d),
            }
        }
    }

    #[test]
    fn data_and_hole_chunks_assemble_a_read() {
        let mut a = 100u64.to_be_bytes().to_vec();
        a.extend([1, 2, 3, 4]);
        let mut h = 104u64.to_be_bytes().to_vec();
        h.extend(4u32.to_be_bytes());
        let mut bytes = chunk_bytes(0, REPLY_TYPE_OFFSET_HOLE, 7, &h);
        bytes.extend(chunk_bytes(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 7, &a));
        match run(&bytes, Pending::new(CMD_READ, 100, 8)).unwrap() {
            Decoded::Done(_, Ok(d)) => assert_eq!(d, vec![1, 2, 3, 4, 0, 0, 0, 0]),
            _ => panic!("not done"),
        }
    }

    #[test]
    fn hostile_replies_are_refused() {
        // Outside the request.
        let mut a = 90u64.to_be_bytes().to_vec();
        a.extend([1, 2, 3, 4]);
        let b = chunk_bytes(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 7, &a);
        assert!(run(&b, Pending::new(CMD_READ, 100, 8)).is_err());
        // A gap: only 4 of 8 bytes.
        let mut a = 100u64.to_be_bytes().to_vec();
        a.extend([1, 2, 3, 4]);
        let b = chunk_bytes(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 7, &a);
        assert!(run(&b, Pending::new(CMD_READ, 100, 8)).is_err());
        // Overlap: the same 4 bytes twice.
        let mut b = chunk_bytes(0, REPLY_TYPE_OFFSET_DATA, 7, &a);
        b.extend(chunk_bytes(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 7, &a));
        assert!(run(&b, Pending::new(CMD_READ, 100, 8)).is_err());
        // Unknown handle.
        let b = chunk_bytes(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 8, &[]);
        assert!(run(&b, Pending::new(CMD_FLUSH, 0, 0)).is_err());
        // Huge length never allocates.
        let mut b = chunk_bytes(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 7, &[]);
        b[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(run(&b, Pending::new(CMD_FLUSH, 0, 0)).is_err());
        // Data for a flush.
        let b = chunk_bytes(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 7, &a);
        assert!(run(&b, Pending::new(CMD_FLUSH, 0, 0)).is_err());
    }

    #[test]
    fn an_error_chunk_fails_the_request_with_its_errno() {
        let mut e = 28u32.to_be_bytes().to_vec();
        e.extend(3u16.to_be_bytes());
        e.extend(b"ful");
        let b = chunk_bytes(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 7, &e);
        match run(&b, Pending::new(CMD_WRITE, 0, 4)).unwrap() {
            Decoded::Done(_, Err(ReplyError::Upstream { errno: 28, message })) => {
                assert_eq!(message, "ful")
            }
            _ => panic!("expected an upstream error"),
        }
    }

    #[test]
    fn the_fuzz_entry_survives_garbage() {
        assert_eq!(
            fuzz_decode(&[0x66, 0x8e, 0x33, 0xef, 0xff], true, 0, 512),
            0
        );
        assert_eq!(fuzz_decode(&[], false, 0, 512), 0);
    }
}
