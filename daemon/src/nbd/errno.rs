//! The one mapping from block-layer errors to NBD error values (spec "Error values").

use crate::block::{Error, ErrorKind};

/// Error values as they travel on the wire; protocol constants, not the platform's errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdErrno {
    Perm = 1,
    Io = 5,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl NbdErrno {
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// Every kind is matched, with no wildcard, so a new kind forces a decision here.
pub fn from_block(err: &Error) -> NbdErrno {
    match err.kind {
        ErrorKind::Io => NbdErrno::Io,
        ErrorKind::NoSpace => NbdErrno::NoSpc,
        ErrorKind::ReadOnly => NbdErrno::Perm,
        ErrorKind::OutOfRange => NbdErrno::Inval,
        ErrorKind::Misaligned => NbdErrno::Inval,
        ErrorKind::NotFast => NbdErrno::NotSup,
        ErrorKind::Unsupported => NbdErrno::Inval,
        ErrorKind::Latched => NbdErrno::Io,
        ErrorKind::Corrupt => NbdErrno::Io,
    }
}
