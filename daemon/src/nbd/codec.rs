//! Encode and decode NBD messages on byte slices. No sockets, no tokio, and no allocation sized
//! by the peer beyond what the caller has already bounded.

use super::wire::*;

/// A transmission-phase command, with unknown numbers kept as values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl Command {
    pub fn from_wire(kind: u16) -> Command {
        match kind {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    /// Flags that are meaningful for this command (FUA is accepted on every command).
    pub fn allowed_flags(self) -> u16 {
        CMD_FLAG_FUA
            | match self {
                Command::Read => CMD_FLAG_DF,
                Command::WriteZeroes => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                Command::BlockStatus => CMD_FLAG_REQ_ONE,
                _ => 0,
            }
    }
}

/// The 28-byte compact request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

pub const REQUEST_HEADER_LEN: usize = 28;

/// Decode a request header; the only failure is a wrong magic, which the caller cannot frame past.
pub fn decode_request(b: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, u32> {
    let magic = be32(&b[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(magic);
    }
    Ok(RequestHeader {
        flags: be16(&b[4..6]),
        command: Command::from_wire(be16(&b[6..8])),
        cookie: be64(&b[8..16]),
        offset: be64(&b[16..24]),
        length: be32(&b[24..28]),
    })
}

pub fn encode_request(h: &RequestHeader, kind: u16) -> [u8; REQUEST_HEADER_LEN] {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&h.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&h.offset.to_be_bytes());
    b[24..28].copy_from_slice(&h.length.to_be_bytes());
    b
}

pub const SIMPLE_REPLY_LEN: usize = 16;
pub const CHUNK_HEADER_LEN: usize = 20;
/// Bytes in front of the data of a structured OFFSET_DATA chunk.
pub const OFFSET_DATA_PREFIX_LEN: usize = CHUNK_HEADER_LEN + 8;

pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

pub fn chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// Header of an OFFSET_DATA chunk carrying `data_len` bytes read from `offset`, marked DONE.
pub fn offset_data_prefix(cookie: u64, offset: u64, data_len: u32) -> [u8; OFFSET_DATA_PREFIX_LEN] {
    let mut b = [0u8; OFFSET_DATA_PREFIX_LEN];
    // data_len <= MAX_PAYLOAD, so + 8 cannot overflow.
    b[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        data_len.saturating_add(8),
    ));
    b[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// Header of an OFFSET_DATA chunk carrying `data_len` bytes read from `offset`, one of several
/// chunks of a streamed READ reply: DONE only on the last.
pub fn offset_data_part_prefix(
    cookie: u64,
    offset: u64,
    data_len: u32,
    last: bool,
) -> [u8; OFFSET_DATA_PREFIX_LEN] {
    let mut b = offset_data_prefix(cookie, offset, data_len);
    if !last {
        b[4..6].copy_from_slice(&0u16.to_be_bytes());
    }
    b
}

/// A length field for a payload the server built. Every such payload is bounded far below 4 GiB
/// (strings by `MAX_STRING`, extents by the session's `MAX_EXTENTS`, messages to 1024 bytes);
/// saturating rather than panicking means a broken bound can never crash the daemon.
fn wire_len(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A final ERROR chunk with a human-readable message (truncated to a sane length).
pub fn error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let msg = truncate_utf8(message, 1024).as_bytes();
    let len = 6 + msg.len();
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        wire_len(len),
    ));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&u16::try_from(msg.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(msg);
}

/// A final NONE chunk: success with no payload.
pub fn none_chunk(cookie: u64) -> [u8; CHUNK_HEADER_LEN] {
    chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)
}

/// A final BLOCK_STATUS chunk for one context: (length, flags) descriptors.
pub fn block_status_chunk(out: &mut Vec<u8>, cookie: u64, context: u32, extents: &[(u32, u32)]) {
    let len = 4 + 8 * extents.len();
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        wire_len(len),
    ));
    out.extend_from_slice(&context.to_be_bytes());
    for (length, flags) in extents {
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

// ---- handshake ----

pub const OPTION_HEADER_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

pub fn decode_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, u64> {
    let magic = be64(&b[0..8]);
    if magic != IHAVEOPT {
        return Err(magic);
    }
    Ok(OptionHeader {
        option: be32(&b[8..12]),
        length: be32(&b[12..16]),
    })
}

pub fn greeting(flags: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&flags.to_be_bytes());
    b
}

pub fn option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&wire_len(data.len()).to_be_bytes());
    out.extend_from_slice(data);
}

/// Option data of INFO and GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

/// Option data of LIST_META_CONTEXT and SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// Why option data could not be parsed; always answered with ERR_INVALID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, Malformed> {
    let mut r = Reader::new(data);
    let name = r.string_u32()?;
    let count = r
        .u16()
        .ok_or(Malformed("truncated information request count"))?;
    let mut requests = Vec::with_capacity(usize::from(count).min(16));
    for _ in 0..count {
        requests.push(
            r.u16()
                .ok_or(Malformed("information request list overruns the option"))?,
        );
    }
    r.finish()?;
    Ok(InfoRequest { name, requests })
}

pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest, Malformed> {
    let mut r = Reader::new(data);
    let export = r.string_u32()?;
    let count = r.u32().ok_or(Malformed("truncated query count"))?;
    let mut queries = Vec::new();
    for _ in 0..count {
        queries.push(r.string_u32()?);
    }
    r.finish()?;
    Ok(MetaContextRequest { export, queries })
}

pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&min.to_be_bytes());
    b.extend_from_slice(&preferred.to_be_bytes());
    b.extend_from_slice(&max.to_be_bytes());
    b
}

pub fn rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len() + description.len());
    b.extend_from_slice(&wire_len(name.len()).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(description.as_bytes());
    b
}

pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// A bounded reader over option data: every read checks the remaining length first.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.data.len() < n {
            return None;
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(be16)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(be32)
    }

    fn string_u32(&mut self) -> Result<String, Malformed> {
        let len = self.u32().ok_or(Malformed("truncated string length"))?;
        if len > MAX_STRING {
            return Err(Malformed("string longer than 4096 bytes"));
        }
        let bytes = self
            .take(len as usize)
            .ok_or(Malformed("string length overruns the option"))?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Malformed("string is not UTF-8"))
    }

    fn finish(&self) -> Result<(), Malformed> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(Malformed("trailing bytes after the option data"))
        }
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_round_trips_with_flags_and_type_as_separate_fields() {
        let h = RequestHeader {
            flags: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            command: Command::WriteZeroes,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 0xffff_fffe,
        };
        let b = encode_request(&h, CMD_WRITE_ZEROES);
        assert_eq!(decode_request(&b), Ok(h));
    }

    #[test]
    fn request_with_wrong_magic_is_rejected_with_the_magic_seen() {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&0x1256_0953u32.to_be_bytes());
        assert_eq!(decode_request(&b), Err(0x1256_0953));
    }

    #[test]
    fn unknown_command_numbers_are_kept() {
        assert_eq!(Command::from_wire(42), Command::Unknown(42));
    }

    #[test]
    fn info_request_parses_name_and_items() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let r = parse_info_request(&d).unwrap();
        assert_eq!(r.name, "abc");
        assert_eq!(r.requests, vec![INFO_NAME, INFO_BLOCK_SIZE]);
    }

    #[test]
    fn info_request_with_name_overrunning_the_option_is_malformed() {
        let mut d = Vec::new();
        d.extend_from_slice(&100u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        assert!(parse_info_request(&d).is_err());
    }

    #[test]
    fn info_request_with_items_overrunning_the_option_is_malformed() {
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&5u16.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert!(parse_info_request(&d).is_err());
    }

    #[test]
    fn meta_context_request_parses_queries() {
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:x"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        let r = parse_meta_context_request(&d).unwrap();
        assert_eq!(r.export, "");
        assert_eq!(r.queries, vec!["base:allocation", "qemu:dirty-bitmap:x"]);
    }

    #[test]
    fn meta_context_request_with_trailing_bytes_is_malformed() {
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&0u32.to_be_bytes());
        d.push(0);
        assert!(parse_meta_context_request(&d).is_err());
    }

    #[test]
    fn error_chunk_carries_errno_and_message() {
        let mut out = Vec::new();
        error_chunk(&mut out, 7, 22, "bad");
        assert_eq!(out.len(), 20 + 6 + 3);
        assert_eq!(&out[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&out[16..20], &9u32.to_be_bytes());
        assert_eq!(&out[20..24], &22u32.to_be_bytes());
        assert_eq!(&out[26..], b"bad");
    }

    #[test]
    fn option_parsers_never_panic_on_arbitrary_bytes() {
        // A cheap deterministic sweep; proptest-style coverage without the dependency.
        let mut seed = 0x1234_5678u32;
        for len in 0..200usize {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (seed >> 16) as u8
                })
                .collect();
            let _ = parse_info_request(&data);
            let _ = parse_meta_context_request(&data);
        }
    }
}
