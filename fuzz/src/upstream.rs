//! `upstream_reply`: what an upstream NBD server sends back to nbdcryptd's client. Byte 0 picks
//! simple or structured replies and the read's length; the rest is the server's reply stream,
//! decoded against a read (handle 1) and a flush (handle 2) in flight until an error, both
//! complete, or the input ends. The decoder must bound every length and never panic.

pub fn reply(data: &[u8]) {
    let Some((&ctrl, rest)) = data.split_first() else {
        return;
    };
    let structured = ctrl & 1 != 0;
    let len = 512u32 << (ctrl >> 1 & 7);
    let done = nbdcrypt::upstream::proto::fuzz_decode(rest, structured, 4096, len);
    assert!(done <= 2);
}
