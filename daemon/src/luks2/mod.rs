//! LUKS2 on-disk format: binary header, JSON metadata, keyslots, digests, segments and tokens.
//! Knows the format, not how a secret was sealed.
//!
//! Layout: `layout` (offsets and sizes), `header` (binary header copies, checksum, raw I/O),
//! `metadata` (typed JSON, validation, refusals), `keyslot` (AF material under a passphrase),
//! `digest` (volume-key check), `lock` (cryptsetup-compatible flock), `volume` (`Luks2Header` and
//! the operations on a device). Reference: `shared/docs/luks2-format.md`.
//!
//! ```no_run
//! # use nbdcrypt::luks2::*;
//! # use nbdcrypt::crypto::{kdf::KdfLimits, keys::SecretBytes};
//! # fn f(file: &std::fs::File) -> Result<(), FormatError> {
//! let (hdr, repair) = Luks2Header::read(file)?;
//! let (key, slot) = hdr.unlock(file, &SecretBytes::from_slice(b"pw"), &KdfLimits::default())?;
//! # Ok(()) }
//! ```

mod digest;
mod error;
mod header;
mod io;
mod keyslot;
pub mod layout;
mod lock;
mod metadata;
pub mod online;
pub mod reencrypt;
pub mod tokens;
mod volume;

#[cfg(test)]
mod tests;

pub use crate::crypto::kdf::{benchmark_argon2id, HashAlg, KdfLimits, KdfParams};
pub use error::{FormatError, HeaderCopy};
pub use io::{HeaderIo, VolumeIo};
pub use lock::{HeaderLock, LockMode};
pub use metadata::{KeyslotPriority, SegmentSize, Token};
pub use volume::{
    format, header_backup, header_restore, header_restore_with_progress, DataSegment, FormatParams,
    KeyslotInfo, Luks2Header, RepairNeeded,
};

/// OS randomness for salts, keys and wipes.
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), FormatError> {
    getrandom::fill(buf).map_err(|e| FormatError::Random(e.to_string()))
}
