//! NBD targets: the handshake (fixed newstyle option haggling) and the transmission phase,
//! driven over in-memory streams into an encrypting `CryptDevice` on a RAM disk — the layers a
//! connection really goes through, minus the socket.

use std::io::{Cursor, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use arbitrary::{Arbitrary, Unstructured};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use nbdcrypt::block::crypt::{CryptDevice, Segment};
use nbdcrypt::block::BlockDevice;
use nbdcrypt::crypto::keys::VolumeKey;
use nbdcrypt::crypto::xts::SectorCipher;
use nbdcrypt::export::{Export, ExportTable};
use nbdcrypt::nbd::codec::{self, Command, RequestHeader};
use nbdcrypt::nbd::handshake::{negotiate, transmission_flags, Negotiated};
use nbdcrypt::nbd::session::{ReplySink, serve, Budget, ByteBudget, End, Stopper};
use nbdcrypt::nbd::wire::*;

use crate::mem::MemDevice;

/// The volume key of every fuzzed export (AES-256-XTS).
pub const KEY: [u8; 64] = {
    let mut k = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        k[i] = (i as u8).wrapping_mul(37).wrapping_add(11);
        i += 1;
    }
    k
};
/// Bytes of plaintext the export offers.
pub const EXPORT_SIZE: u64 = 256 * 1024;
/// Where the data segment starts on the RAM disk.
pub const SEGMENT_OFFSET: u64 = 8192;

/// A device stack as the daemon builds it: `CryptDevice` over the backing store.
pub struct Stack {
    pub backing: Arc<MemDevice>,
    pub crypt: Arc<CryptDevice>,
    pub sector: usize,
    pub iv_tweak: u64,
}

pub fn stack(sector_4k: bool, allow_discards: bool, iv_tweak: u64) -> Stack {
    let sector = if sector_4k { 4096 } else { 512 };
    let backing = Arc::new(MemDevice::new((SEGMENT_OFFSET + EXPORT_SIZE) as usize, allow_discards));
    let cipher = SectorCipher::new(&VolumeKey::from_slice(&KEY), sector).expect("cipher");
    let seg = Segment { offset: SEGMENT_OFFSET, size: EXPORT_SIZE, iv_tweak };
    let inner: Arc<dyn BlockDevice> = backing.clone();
    let crypt = Arc::new(CryptDevice::new(inner, cipher, seg, allow_discards).expect("crypt device"));
    Stack { backing, crypt, sector, iv_tweak }
}

fn export_of(dev: Arc<dyn BlockDevice>) -> Arc<Export> {
    Arc::new(Export {
        name: "vol".into(),
        description: "fuzz".into(),
        device: dev,
        encrypted: true,
        stats: Default::default(),
    })
}

/// A client stream: reads come from `input`, writes go to `output`.
pub struct MemStream {
    input: Vec<u8>,
    pos: usize,
    pub output: Vec<u8>,
}

impl AsyncRead for MemStream {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let n = buf.remaining().min(self.input.len() - self.pos);
        let pos = self.pos;
        buf.put_slice(&self.input[pos..pos + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for MemStream {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.output.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A `Write` whose bytes the harness can read afterwards.
#[derive(Clone, Default)]
pub struct Sink(pub Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ReplySink for Sink {
    fn try_write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write(buf)
    }
}

fn budget() -> Budget {
    Budget {
        server: Arc::new(ByteBudget::new(256 << 20)),
        per_connection: u64::from(MAX_PAYLOAD) + 2 * 4096 + (1 << 20),
        threads: 1,
    }
}

/// Runs the transmission phase on `input`; returns the session's end and the bytes it sent.
fn run_session(neg: Negotiated, input: Vec<u8>) -> (Result<End, String>, Vec<u8>) {
    let sink = Sink::default();
    let end = serve(neg, Box::new(Cursor::new(input)), Box::new(sink.clone()), budget(), Stopper::new(|| {}));
    let out = std::mem::take(&mut *sink.0.lock().unwrap());
    (end.map_err(|e| e.to_string()), out)
}

thread_local! {
    static RT: tokio::runtime::Runtime =
        tokio::runtime::Builder::new_current_thread().build().expect("tokio runtime");
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Checks the server's side of a handshake: the greeting, then whole option replies (each with
/// the reply magic), and at most an EXPORT_NAME reply at the very end.
fn check_handshake_output(out: &[u8], ok: bool) {
    assert!(out.len() >= 18, "no greeting");
    assert_eq!(be64(&out[0..]), NBDMAGIC);
    assert_eq!(be64(&out[8..]), IHAVEOPT);
    let mut rest = &out[18..];
    while rest.len() >= 20 && be64(rest) == OPT_REPLY_MAGIC {
        let len = be32(&rest[16..]) as usize;
        assert!(rest.len() >= 20 + len, "option reply cut short");
        rest = &rest[20 + len..];
    }
    // EXPORT_NAME's reply: size, flags, and 124 zero bytes unless NO_ZEROES.
    let tail_ok = rest.is_empty() || (ok && (rest.len() == 10 || rest.len() == 134));
    assert!(tail_ok, "{} stray bytes after the option replies", rest.len());
}

/// `nbd_handshake`: byte 0 sets the scene (bit 0: volume unlocked, bit 1: shutting down,
/// bit 2: discards, bit 3: 4 KiB sectors); the rest is what the client sends, from its flags on.
/// A successful negotiation goes on into the transmission phase with the remaining bytes.
pub fn handshake(data: &[u8]) {
    let Some((&ctrl, input)) = data.split_first() else { return };
    let table = ExportTable::new("vol".into(), "fuzz export".into());
    let st = stack(ctrl & 8 != 0, ctrl & 4 != 0, 0);
    if ctrl & 1 != 0 {
        table.publish(st.crypt.clone(), true);
    }
    let (trigger, shutdown) = nbdcrypt::shutdown::channel();
    if ctrl & 2 != 0 {
        trigger.trigger();
    }
    let mut stream = MemStream { input: input.to_vec(), pos: 0, output: Vec::new() };
    let res = RT.with(|rt| rt.block_on(negotiate(&mut stream, &table, &shutdown)));
    check_handshake_output(&stream.output, res.is_ok());
    match res {
        Ok(neg) => {
            let caps = neg.export.device.caps();
            assert_eq!(neg.transmission_flags, transmission_flags(&caps, neg.structured_replies));
            let rest = stream.input[stream.pos..].to_vec();
            let (_end, out) = run_session(neg, rest.clone());
            check_replies(&rest, &out);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// The requests a client byte stream frames, in order: (cookie, command, length). Stops where
/// the server must stop reading (bad magic, truncation, DISC, an oversized WRITE payload).
fn framed_requests(input: &[u8]) -> Vec<(u64, u16, u32)> {
    let mut reqs = Vec::new();
    let mut rest = input;
    while rest.len() >= codec::REQUEST_HEADER_LEN {
        if be32(rest) != REQUEST_MAGIC {
            break;
        }
        let cmd = u16::from_be_bytes([rest[6], rest[7]]);
        let (cookie, len) = (be64(&rest[8..]), be32(&rest[24..]));
        rest = &rest[codec::REQUEST_HEADER_LEN..];
        reqs.push((cookie, cmd, len));
        if cmd == CMD_DISC {
            break;
        }
        if cmd == CMD_WRITE {
            if len > MAX_PAYLOAD || rest.len() < len as usize {
                break;
            }
            rest = &rest[len as usize..];
        }
    }
    reqs
}

/// Checks a transmission-phase reply stream against the requests of `input`: with one worker
/// thread, replies come in request order, each with its request's cookie; a simple reply to a
/// successful READ carries exactly the requested bytes; structured chunks are well framed and
/// end with DONE. Requests after the last reply may go unanswered (the session ended).
fn check_replies(input: &[u8], out: &[u8]) {
    let reqs = framed_requests(input);
    let mut next = reqs.iter();
    let mut rest = out;
    let mut current: Option<&(u64, u16, u32)> = None;
    while !rest.is_empty() {
        assert!(rest.len() >= 4, "reply cut short");
        match be32(rest) {
            SIMPLE_REPLY_MAGIC => {
                assert!(current.is_none(), "simple reply inside a structured reply");
                assert!(rest.len() >= 16, "simple reply cut short");
                let &(cookie, cmd, len) = next.next().expect("more replies than requests");
                assert_eq!(be64(&rest[8..]), cookie, "simple reply out of order");
                let err = be32(&rest[4..]);
                rest = &rest[16..];
                if cmd == CMD_READ && err == 0 {
                    assert!(rest.len() >= len as usize, "read data cut short");
                    rest = &rest[len as usize..];
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                assert!(rest.len() >= 20, "structured reply header cut short");
                let req = match current {
                    Some(r) => r,
                    None => next.next().expect("more replies than requests"),
                };
                assert_eq!(be64(&rest[8..]), req.0, "chunk out of order");
                let flags = u16::from_be_bytes([rest[4], rest[5]]);
                let len = be32(&rest[16..]) as usize;
                assert!(rest.len() >= 20 + len, "structured reply payload cut short");
                rest = &rest[20 + len..];
                current = if flags & REPLY_FLAG_DONE != 0 { None } else { Some(req) };
            }
            m => panic!("bad reply magic {m:#x}"),
        }
    }
}

fn negotiated(st: &Stack, structured: bool, base_allocation: bool) -> Negotiated {
    let dev: Arc<dyn BlockDevice> = st.crypt.clone();
    let caps = dev.caps();
    Negotiated {
        export: export_of(dev),
        structured_replies: structured,
        base_allocation,
        transmission_flags: transmission_flags(&caps, structured),
    }
}

/// `nbd_transmission`: byte 0 sets the scene (bit 0 structured replies, bit 1 base:allocation,
/// bit 2 discards, bit 3 4 KiB sectors); the rest is the client's transmission-phase bytes.
/// Also runs the codec's decoders on the raw bytes.
pub fn transmission(data: &[u8]) {
    let Some((&ctrl, input)) = data.split_first() else { return };
    if let Ok(b) = <&[u8; codec::REQUEST_HEADER_LEN]>::try_from(input.get(..codec::REQUEST_HEADER_LEN).unwrap_or(&[])) {
        if let Ok(h) = codec::decode_request(b) {
            let kind = match h.command {
                Command::Unknown(k) => k,
                _ => u16::from_be_bytes([b[6], b[7]]),
            };
            assert_eq!(&codec::encode_request(&h, kind), b, "request header does not round-trip");
        }
    }
    if let Ok(b) = <&[u8; codec::OPTION_HEADER_LEN]>::try_from(input.get(..codec::OPTION_HEADER_LEN).unwrap_or(&[])) {
        let _ = codec::decode_option_header(b);
    }
    let _ = codec::parse_info_request(input);
    let _ = codec::parse_meta_context_request(input);

    let st = stack(ctrl & 8 != 0, ctrl & 4 != 0, 0);
    let (_end, out) = run_session(negotiated(&st, ctrl & 1 != 0, ctrl & 3 == 3), input.to_vec());
    check_replies(input, &out);
}

/// One request of the model-checked session.
#[derive(Arbitrary, Debug)]
enum Op {
    Read { off: u32, len: u16, df: bool },
    Write { off: u32, len: u16, fill: u8, fua: bool },
    Zero { off: u32, len: u32, no_hole: bool },
    Trim { off: u32, len: u32 },
    Flush,
    Cache { off: u32, len: u32 },
    Status { off: u32, len: u32, one: bool },
    /// A request the server must refuse (or accept) without losing the stream's framing.
    Raw { kind: u8, flags: u16, off: u64, len: u16 },
}

#[derive(Arbitrary, Debug)]
struct Script {
    structured: bool,
    sector_4k: bool,
    discards: bool,
    /// IV offset of the segment, near 2^64 half the time.
    iv_high: bool,
    iv_tweak: u32,
    ops: Vec<Op>,
}

/// What the plaintext should be: `None` where it is undefined (never written, or trimmed).
struct Model(Vec<Option<u8>>);

/// Where `off` and `len` land relative to the export: offsets are folded to stay mostly
/// inside, with some running past the end.
fn fold(off: u64, len: u64) -> (u64, u64) {
    (off % (EXPORT_SIZE + 8192), len)
}

/// `nbd_session_model`: an `arbitrary` script of requests, encoded as a client would, run
/// through the session; every request must get exactly one reply, in-range requests must
/// succeed and out-of-range ones fail, reads must return what the plaintext model says, and in
/// the end the RAM disk, decrypted with the independent `xts-mode` crate, must match the model.
pub fn session_model(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(script) = Script::arbitrary(&mut u) else { return };
    let iv_tweak = if script.iv_high {
        u64::MAX - u64::from(script.iv_tweak)
    } else {
        u64::from(script.iv_tweak)
    };
    let st = stack(script.sector_4k, script.discards, iv_tweak);
    let mut input = Vec::new();
    let mut expect = Vec::new(); // (cookie, op index, must succeed?, read range)
    for (i, op) in script.ops.iter().enumerate().take(64) {
        let cookie = 0x1000 + i as u64;
        let mut h = RequestHeader { flags: 0, command: Command::Read, cookie, offset: 0, length: 0 };
        let kind;
        let mut payload = Vec::new();
        match *op {
            Op::Read { off, len, df } => {
                (h.offset, _) = fold(off.into(), 0);
                h.length = len.into();
                if df && script.structured {
                    h.flags |= CMD_FLAG_DF;
                }
                kind = CMD_READ;
            }
            Op::Write { off, len, fill, fua } => {
                (h.offset, _) = fold(off.into(), 0);
                h.length = len.into();
                if fua {
                    h.flags |= CMD_FLAG_FUA;
                }
                payload = (0..len).map(|j| fill.wrapping_add(j as u8).rotate_left(u32::from(fill & 7))).collect();
                kind = CMD_WRITE;
            }
            Op::Zero { off, len, no_hole } => {
                (h.offset, _) = fold(off.into(), 0);
                h.length = len % (1 << 20);
                if no_hole {
                    h.flags |= CMD_FLAG_NO_HOLE;
                }
                kind = CMD_WRITE_ZEROES;
            }
            Op::Trim { off, len } => {
                (h.offset, _) = fold(off.into(), 0);
                h.length = len % (1 << 20);
                kind = CMD_TRIM;
            }
            Op::Flush => kind = CMD_FLUSH,
            Op::Cache { off, len } => {
                (h.offset, _) = fold(off.into(), 0);
                h.length = len % (1 << 20);
                kind = CMD_CACHE;
            }
            Op::Status { off, len, one } => {
                (h.offset, _) = fold(off.into(), 0);
                h.length = len % (1 << 20);
                if one {
                    h.flags |= CMD_FLAG_REQ_ONE;
                }
                kind = CMD_BLOCK_STATUS;
            }
            Op::Raw { kind: k, flags, off, len } => {
                // Never DISC (ends the session) nor WRITE (its payload is framed differently).
                kind = match u16::from(k) % 12 {
                    CMD_DISC | CMD_WRITE => 0x7f,
                    other => other,
                };
                h.flags = flags;
                h.offset = off;
                h.length = len.into();
            }
        }
        input.extend_from_slice(&codec::encode_request(&h, kind));
        input.extend_from_slice(&payload);
        expect.push((cookie, kind, h));
    }
    let ops = &script.ops[..expect.len()];
    let neg = negotiated(&st, script.structured, script.structured);
    let (end, out) = run_session(neg, input);
    assert_eq!(end, Ok(End::Disconnected), "session did not end cleanly at EOF");

    let mut model = Model(vec![None; EXPORT_SIZE as usize]);
    let mut rest = &out[..];
    for ((cookie, kind, h), op) in expect.iter().zip(ops) {
        let in_range = h.offset.checked_add(u64::from(h.length)).is_some_and(|e| e <= EXPORT_SIZE);
        // What the export advertised: TRIM only with discards, BLOCK_STATUS only with the
        // base:allocation context (which needs structured replies).
        let offered = match op {
            Op::Trim { .. } => script.discards,
            Op::Status { .. } => script.structured,
            _ => true,
        };
        let (must_succeed, must_fail) = match op {
            Op::Raw { .. } => (false, false),
            Op::Flush => (true, false),
            _ => (offered && in_range && h.length > 0, !offered || !in_range),
        };
        // Collect this request's reply: data (for reads) and error.
        let (error, data) = take_reply(&mut rest, *cookie, *kind, h.offset, h.length, script.structured);
        if must_succeed {
            assert_eq!(error, 0, "op {op:?} ({h:?}) failed with {error}");
        }
        if must_fail {
            assert_ne!(error, 0, "op {op:?} ({h:?}) past the end succeeded");
        }
        if error != 0 {
            continue;
        }
        if !in_range || matches!(op, Op::Raw { .. } | Op::Flush) {
            continue;
        }
        let r = h.offset as usize..(h.offset + u64::from(h.length)) as usize;
        match op {
            Op::Read { .. } => {
                let data = data.expect("read without data");
                assert_eq!(data.len(), r.len());
                for (i, (got, want)) in data.iter().zip(&model.0[r.clone()]).enumerate() {
                    if let Some(w) = want {
                        assert_eq!(got, w, "read {h:?}: byte {} differs from the model", h.offset as usize + i);
                    }
                }
            }
            Op::Write { fill, len, .. } => {
                let bytes = (0..*len).map(|j| fill.wrapping_add(j as u8).rotate_left(u32::from(fill & 7)));
                for (m, b) in model.0[r].iter_mut().zip(bytes) {
                    *m = Some(b);
                }
            }
            Op::Zero { .. } => model.0[r].fill(Some(0)),
            Op::Trim { .. } => {
                if script.discards {
                    // Discarded sectors read back as garbage: whole sectors around the range.
                    let s = st.sector;
                    let lo = r.start / s * s;
                    let hi = r.end.div_ceil(s) * s;
                    model.0[lo..hi.min(EXPORT_SIZE as usize)].fill(None);
                }
            }
            _ => {}
        }
    }
    assert!(rest.is_empty(), "{} bytes of replies nobody asked for", rest.len());

    // The ciphertext on the RAM disk, decrypted independently, is the model.
    let disk = st.backing.data.lock().unwrap();
    let plain = crate::xts::reference_decrypt(
        &KEY,
        &disk[SEGMENT_OFFSET as usize..],
        st.sector,
        st.iv_tweak,
    );
    for (i, (got, want)) in plain.iter().zip(&model.0).enumerate() {
        if let Some(w) = want {
            assert_eq!(got, w, "on-disk ciphertext at plaintext byte {i} does not decrypt to the model");
        }
    }
}

/// Takes the reply to `cookie` off the front of `rest`: its error (0 = success) and, for a
/// successful read, its data reassembled from chunks.
fn take_reply(
    rest: &mut &[u8],
    cookie: u64,
    kind: u16,
    req_off: u64,
    length: u32,
    structured: bool,
) -> (u32, Option<Vec<u8>>) {
    let mut data: Option<Vec<u8>> = None;
    let mut error = 0;
    loop {
        assert!(rest.len() >= 4, "no reply for cookie {cookie:#x}");
        match be32(rest) {
            SIMPLE_REPLY_MAGIC => {
                assert!(rest.len() >= 16);
                let err = be32(&rest[4..]);
                assert_eq!(be64(&rest[8..]), cookie, "reply out of order");
                *rest = &rest[16..];
                if kind == CMD_READ && err == 0 {
                    let n = length as usize;
                    assert!(rest.len() >= n, "read data cut short");
                    data = Some(rest[..n].to_vec());
                    *rest = &rest[n..];
                }
                return (err, data);
            }
            STRUCTURED_REPLY_MAGIC => {
                assert!(structured, "structured reply without negotiation");
                assert!(rest.len() >= 20);
                let flags = u16::from_be_bytes([rest[4], rest[5]]);
                let ty = u16::from_be_bytes([rest[6], rest[7]]);
                assert_eq!(be64(&rest[8..]), cookie, "chunk out of order");
                let len = be32(&rest[16..]) as usize;
                assert!(rest.len() >= 20 + len);
                let payload = &rest[20..20 + len];
                match ty {
                    REPLY_TYPE_OFFSET_DATA => {
                        assert!(payload.len() >= 8);
                        let at = be64(payload).checked_sub(req_off).expect("chunk before the request") as usize;
                        let chunk = &payload[8..];
                        assert!(at + chunk.len() <= length as usize, "chunk past the request");
                        let d = data.get_or_insert_with(|| vec![0u8; length as usize]);
                        d[at..at + chunk.len()].copy_from_slice(chunk);
                    }
                    t if t & 0x8000 != 0 => {
                        assert!(payload.len() >= 4);
                        error = be32(payload);
                        assert_ne!(error, 0, "error chunk with error 0");
                    }
                    _ => {}
                }
                *rest = &rest[20 + len..];
                if flags & REPLY_FLAG_DONE != 0 {
                    if error == 0 && kind == CMD_READ && data.is_none() {
                        data = Some(Vec::new());
                    }
                    return (error, data);
                }
            }
            m => panic!("bad reply magic {m:#x}"),
        }
    }
}
