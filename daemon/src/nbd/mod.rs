//! NBD protocol: wire numbers, codec, handshake, transmission session.
//!
//! `codec` knows bytes, not sockets; `handshake` and `session` own the socket for their phase;
//! `errno` is the one place a block error becomes a wire error.

pub mod codec;
pub mod errno;
pub mod handshake;
pub mod session;
pub mod wire;

use std::io;

/// The peer broke the protocol in a way we cannot frame past, or the socket failed: the
/// connection ends (other connections carry on).
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("client flags {0:#x} not acceptable")]
    BadClientFlags(u32),
    #[error("option length {0} exceeds the limit")]
    OptionTooLong(u32),
    #[error("write payload of {0} bytes exceeds the maximum")]
    PayloadTooLarge(u32),
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("client aborted the handshake")]
    Aborted,
    #[error("export {0:?} not available (EXPORT_NAME cannot carry an error)")]
    NoSuchExport(String),
    #[error("server shutting down")]
    Shutdown,
    #[error("EXPORT_NAME before STARTTLS on a listener that requires TLS")]
    TlsRequired,
}
