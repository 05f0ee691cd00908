//! `FormatError`: everything that can go wrong reading, unlocking or writing a LUKS2 header.
//!
//! Messages name the field, copy, offset or keyslot involved and never carry a value derived from
//! a secret. Variants are grouped by what the caller can do about them: I/O (retry / check the
//! device), corrupt or invalid metadata (repair / restore a backup), unsupported features (use
//! cryptsetup), wrong secret (ask again), and misuse of the API.

use std::fmt;
use std::io;

/// Which of the two header copies an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderCopy {
    Primary,
    Secondary,
}

impl fmt::Display for HeaderCopy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderCopy::Primary => f.write_str("primary"),
            HeaderCopy::Secondary => f.write_str("secondary"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    // ---- I/O and size -------------------------------------------------------------------------
    #[error("i/o error {op} at offset {offset}")]
    Io {
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("device is too small for a LUKS2 header: {size} bytes, need at least {needed}")]
    DeviceTooSmall { size: u64, needed: u64 },
    #[error("device is truncated: {what} needs bytes up to {end}, device has {size}")]
    Truncated { what: String, end: u64, size: u64 },
    #[error("could not lock the header of {path}")]
    Lock {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "header changed on disk since it was read (seqid {expected} in memory, {found} on disk)"
    )]
    ConcurrentUpdate { expected: u64, found: u64 },

    // ---- binary header ------------------------------------------------------------------------
    #[error("{copy} header at offset {offset}: bad magic (not a LUKS2 header)")]
    BadMagic { copy: HeaderCopy, offset: u64 },
    #[error("{copy} header at offset {offset}: unsupported version {version} (only LUKS2)")]
    UnsupportedVersion {
        copy: HeaderCopy,
        offset: u64,
        version: u16,
    },
    #[error("{copy} header at offset {offset}: hdr_size {hdr_size} is not an allowed size")]
    BadHeaderSize {
        copy: HeaderCopy,
        offset: u64,
        hdr_size: u64,
    },
    #[error("{copy} header at offset {offset}: hdr_offset field says {found}")]
    BadHeaderOffset {
        copy: HeaderCopy,
        offset: u64,
        found: u64,
    },
    #[error("{copy} header at offset {offset}: unsupported checksum_alg {alg:?}")]
    UnsupportedChecksumAlg {
        copy: HeaderCopy,
        offset: u64,
        alg: String,
    },
    #[error("{copy} header at offset {offset}: checksum mismatch")]
    BadChecksum { copy: HeaderCopy, offset: u64 },
    #[error("no valid LUKS2 header copy (primary: {primary}; secondary: {secondary})")]
    NoValidHeader {
        primary: Box<FormatError>,
        secondary: Box<FormatError>,
    },

    // ---- JSON metadata -------------------------------------------------------------------------
    #[error("{copy} header: JSON area: {reason}")]
    JsonText { copy: HeaderCopy, reason: String },
    #[error("metadata field {field}: {reason}")]
    Metadata { field: String, reason: String },
    #[error("metadata does not fit the JSON area: {len} bytes, at most {max}")]
    JsonTooLarge { len: usize, max: u64 },

    // ---- refused volumes (valid LUKS2, but not ours to serve) --------------------------------
    #[error("volume has mandatory requirements this implementation does not support: {0:?}")]
    UnmetRequirements(Vec<String>),
    #[error(
        "volume is in the middle of a reencryption ({reason}); finish it first with \
         `nbdcryptctl reencrypt VOLUME` (or `cryptsetup reencrypt --resume-only`)"
    )]
    ReencryptionInProgress { reason: String },
    #[error("{field}: unsupported cipher {cipher:?} (only aes-xts-plain64)")]
    UnsupportedCipher { field: String, cipher: String },
    #[error("unsupported LUKS2 feature: {0}")]
    Unsupported(String),
    #[error("header is detached from its data ({reason}); nbdcrypt serves only volumes whose header and data share one file or device (cryptsetup can move a detached header back: see `cryptsetup reencrypt --help`)")]
    DetachedHeader { reason: String },

    // ---- secrets --------------------------------------------------------------------------------
    #[error("no keyslot matches the passphrase")]
    WrongPassphrase,
    #[error("keyslot {0} does not exist")]
    KeyslotNotFound(u32),
    #[error("keyslot {slot} cannot be opened: {reason}")]
    KeyslotUnusable { slot: u32, reason: String },
    #[error(
        "keyslot {slot}: the header asks for {param} = {value}, above the limit {cap} (a header \
         from someone else could cost minutes of CPU or gigabytes of memory); if you trust this \
         volume, retry with --allow-expensive-kdf"
    )]
    KdfLimit {
        slot: u32,
        param: &'static str,
        value: u64,
        cap: u64,
    },
    #[error("kdf failed: {0}")]
    Kdf(String),
    #[error("the given volume key does not match the volume's digest")]
    WrongVolumeKey,
    #[error("random number generator failed: {0}")]
    Random(String),

    // ---- writer side ---------------------------------------------------------------------------
    #[error("all {0} keyslots are in use")]
    NoFreeKeyslot(u32),
    #[error("no room for a {size}-byte keyslot area in the keyslots area")]
    NoKeyslotSpace { size: u64 },
    #[error("refusing to remove keyslot {0}: it is the last one that opens the volume")]
    LastKeyslot(u32),
    #[error("token {0} does not exist")]
    TokenNotFound(u32),
    #[error("all {0} token ids are in use")]
    NoFreeToken(u32),
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("invalid format parameters: {0}")]
    InvalidParams(String),
    #[error(
        "keyslot {slot} has type {type_name:?}, which nbdcrypt keeps but never wipes or \
         rewrites; remove it with `cryptsetup luksKillSlot` if you trust this header"
    )]
    ForeignKeyslot { slot: u32, type_name: String },
    #[error("refusing to wipe {what} [{offset}, +{len}): {reason}")]
    UnsafeWipe {
        what: String,
        offset: u64,
        len: u64,
        reason: String,
    },
    #[error("header backup {path}: {reason}")]
    BadBackup { path: String, reason: String },
}

impl FormatError {
    pub(crate) fn io(op: &'static str, offset: u64, source: io::Error) -> Self {
        FormatError::Io { op, offset, source }
    }

    pub(crate) fn meta(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FormatError::Metadata {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// True for errors that say "valid LUKS2, but we refuse it" rather than "corrupt": such a copy
    /// still counts as valid when choosing between the two header copies.
    pub(crate) fn is_refusal(&self) -> bool {
        matches!(
            self,
            FormatError::UnmetRequirements(_)
                | FormatError::ReencryptionInProgress { .. }
                | FormatError::UnsupportedCipher { .. }
                | FormatError::Unsupported(_)
        )
    }
}
