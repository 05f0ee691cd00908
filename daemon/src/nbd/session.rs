//! The transmission phase: read a request, validate it once, run it on the block device off the
//! reactor, and send exactly one reply, in whatever order requests complete.
//!
//! Three parts per connection:
//! - the reader (this task) frames requests, validates them and takes byte-budget permits before
//!   reading a payload, so a client that floods us is slowed by back-pressure, not buffered;
//! - each accepted request runs as a blocking job and hands its encoded reply to the writer;
//! - the writer task is the only one touching the socket's write half, so replies never
//!   interleave, and it batches small replies into one write.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use super::codec::{self, Command, RequestHeader};
use super::errno::{self, NbdErrno};
use super::handshake::{drain, Negotiated};
use super::wire::*;
use super::ProtocolError;
use crate::block::{Error as BlockError, ZeroFlags};
use crate::export::{Export, IoStats};
use crate::shutdown::Shutdown;

/// Fixed cost charged per request on top of its payload, so many tiny requests are bounded too.
const REQUEST_OVERHEAD: u32 = 4096;
/// Most descriptors in one BLOCK_STATUS reply (spec: SHOULD NOT exceed 2^20).
const MAX_EXTENTS: usize = 1 << 16;

/// Memory limits for requests in flight.
#[derive(Clone)]
pub struct Budget {
    /// Shared by every connection of the server.
    pub server: Arc<Semaphore>,
    /// Bytes one connection may have in flight; at least MAX_PAYLOAD + REQUEST_OVERHEAD.
    pub per_connection: u32,
}

/// Why the session ended without a protocol error.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Client sent NBD_CMD_DISC or closed between requests.
    Disconnected,
    /// Server shutdown or volume lock.
    Stopped,
}

/// A reply on its way to the writer, with the budget it holds until it is on the socket.
struct Reply {
    bytes: Vec<u8>,
    _permits: [OwnedSemaphorePermit; 2],
}

/// One validated request, ready to run.
struct Job {
    header: RequestHeader,
    payload: Vec<u8>,
    structured: bool,
}

pub async fn serve<R, W>(
    reader: R,
    writer: W,
    neg: Negotiated,
    budget: Budget,
    mut shutdown: Shutdown,
    mut withdrawn: watch::Receiver<u64>,
) -> Result<End, ProtocolError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = BufReader::with_capacity(256 * 1024, reader);
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer_task = tokio::spawn(write_replies(BufWriter::with_capacity(64 * 1024, writer), rx));
    let conn_budget = Arc::new(Semaphore::new(budget.per_connection as usize));
    withdrawn.borrow_and_update();

    let outcome = loop {
        let mut raw = [0u8; codec::REQUEST_HEADER_LEN];
        tokio::select! {
            biased;
            _ = shutdown.triggered() => break Ok(End::Stopped),
            _ = withdrawn.changed() => break Ok(End::Stopped),
            _ = tx.closed() => break Ok(End::Disconnected),
            r = read_header(&mut reader, &mut raw) => match r {
                Ok(true) => {}
                Ok(false) => break Ok(End::Disconnected),
                Err(e) => break Err(e),
            },
        }
        let header = match codec::decode_request(&raw) {
            Ok(h) => h,
            Err(magic) => break Err(ProtocolError::BadMagic(u64::from(magic))),
        };
        debug!(cookie = header.cookie, command = ?header.command, offset = header.offset,
               length = header.length, flags = header.flags, "request");
        if header.command == Command::Disc {
            break Ok(End::Disconnected);
        }
        if header.command == Command::Write && header.length > MAX_PAYLOAD {
            break Err(ProtocolError::PayloadTooLarge(header.length));
        }

        let cost = request_cost(&header);
        let permits = match acquire(&budget.server, &conn_budget, cost).await {
            Some(p) => p,
            None => break Ok(End::Stopped),
        };

        let verdict = validate(&header, &neg);
        let mut payload = Vec::new();
        if header.command == Command::Write {
            if verdict.is_ok() {
                payload.reserve_exact(header.length as usize);
                let n = (&mut reader).take(u64::from(header.length)).read_to_end(&mut payload).await?;
                if n != header.length as usize {
                    break Err(ProtocolError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
            } else {
                // The payload is on the wire whatever we think of the request: skip it.
                drain(&mut reader, u64::from(header.length)).await?;
            }
        }
        if let Err((code, why)) = verdict {
            debug!(cookie = header.cookie, error = ?code, why, "request rejected");
            IoStats::add(&neg.export.stats.errors, 1);
            let bytes = error_reply(header.cookie, code.code(), why, neg.structured_replies);
            let _ = tx.send(Reply { bytes, _permits: permits });
            continue;
        }

        let job = Job { header, payload, structured: neg.structured_replies };
        let export = neg.export.clone();
        let tx = tx.clone();
        tokio::task::spawn_blocking(move || {
            let bytes = execute(&export, job);
            // The writer is gone only if the connection died; the reply has nowhere to go.
            let _ = tx.send(Reply { bytes, _permits: permits });
        });
    };

    // Let in-flight requests finish and their replies go out, then close.
    drop(tx);
    let written = writer_task.await;
    if outcome.as_ref().map(|e| *e == End::Stopped).unwrap_or(false) {
        let dev = neg.export.device.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || dev.flush()).await {
            warn!(error = %e, "flush at session end failed");
        }
    }
    match written {
        Ok(Err(e)) if outcome.is_ok() => Err(ProtocolError::Io(e)),
        _ => outcome,
    }
}

/// Ok(false) on a clean EOF before the first byte of a header.
async fn read_header<R: AsyncRead + Unpin>(
    reader: &mut R,
    raw: &mut [u8; codec::REQUEST_HEADER_LEN],
) -> Result<bool, ProtocolError> {
    let n = reader.read(&mut raw[..]).await?;
    if n == 0 {
        return Ok(false);
    }
    reader.read_exact(&mut raw[n..]).await?;
    Ok(true)
}

fn request_cost(h: &RequestHeader) -> u32 {
    let data = match h.command {
        Command::Read | Command::Write => h.length.min(MAX_PAYLOAD),
        _ => 0,
    };
    data + REQUEST_OVERHEAD
}

async fn acquire(
    server: &Arc<Semaphore>,
    conn: &Arc<Semaphore>,
    cost: u32,
) -> Option<[OwnedSemaphorePermit; 2]> {
    let c = conn.clone().acquire_many_owned(cost).await.ok()?;
    let s = server.clone().acquire_many_owned(cost).await.ok()?;
    Some([c, s])
}

async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Reply>,
) -> std::io::Result<()> {
    while let Some(reply) = rx.recv().await {
        w.write_all(&reply.bytes).await?;
        drop(reply);
        while let Ok(reply) = rx.try_recv() {
            w.write_all(&reply.bytes).await?;
        }
        w.flush().await?;
    }
    w.shutdown().await
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
    let in_range = h.offset.checked_add(u64::from(h.length)).is_some_and(|end| end <= size);
    if !in_range {
        return Err(match cmd {
            Command::Write | Command::WriteZeroes => (NbdErrno::NoSpc, "request extends past the end"),
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
fn execute(export: &Export, job: Job) -> Vec<u8> {
    let h = job.header;
    let dev = &export.device;
    let stats = &export.stats;
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let len = u64::from(h.length);
    let result = match h.command {
        Command::Read => return read(export, &h, job.structured),
        Command::Write => {
            IoStats::add(&stats.writes, 1);
            IoStats::add(&stats.bytes_written, len);
            dev.write_at(&job.payload, h.offset, fua)
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
        Command::BlockStatus => return block_status(export, &h),
        // Filtered out by validate() and the reader; answered as invalid to stay total.
        Command::Disc | Command::Unknown(_) => {
            return error_reply(h.cookie, NbdErrno::Inval.code(), "unexpected command", job.structured)
        }
    };
    match result {
        Ok(()) => codec::simple_reply(0, h.cookie).to_vec(),
        Err(e) => block_error_reply(export, &h, &e, job.structured),
    }
}

fn read(export: &Export, h: &RequestHeader, structured: bool) -> Vec<u8> {
    let prefix = if structured { codec::OFFSET_DATA_PREFIX_LEN } else { codec::SIMPLE_REPLY_LEN };
    if structured && h.length == 0 {
        return codec::none_chunk(h.cookie).to_vec();
    }
    // Zero-filled, so a short backend read can never leak old heap contents.
    let mut buf = vec![0u8; prefix + h.length as usize];
    match export.device.read_at(&mut buf[prefix..], h.offset) {
        Ok(()) => {
            IoStats::add(&export.stats.reads, 1);
            IoStats::add(&export.stats.bytes_read, u64::from(h.length));
            if structured {
                buf[..prefix].copy_from_slice(&codec::offset_data_prefix(h.cookie, h.offset, h.length));
            } else {
                buf[..prefix].copy_from_slice(&codec::simple_reply(0, h.cookie));
            }
            buf
        }
        Err(e) => block_error_reply(export, h, &e, structured),
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
        // take <= len <= u32::MAX.
        descriptors.push((take as u32, flags));
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

fn block_error_reply(export: &Export, h: &RequestHeader, e: &BlockError, structured: bool) -> Vec<u8> {
    let code = errno::from_block(e);
    IoStats::add(&export.stats.errors, 1);
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
