//! What the daemon's online re-encryption needs from the header reader beyond the public API:
//! the header of a volume in the middle of a re-encryption, for the facts a locked daemon
//! shows (UUID, label, data offset) and the volume pin's UUID check. The re-encryption state
//! itself is only acted on through `luks2::reencrypt`, which verifies its digest with both keys.

use std::fs::File;

use super::error::FormatError;
use super::volume::Luks2Header;

/// Reads the header whether or not a re-encryption is in progress (checksums and structure
/// checked as for any header; the re-encryption segments are NOT verified here: display only).
pub fn read_any_header(file: &File) -> Result<Luks2Header, FormatError> {
    match Luks2Header::read(file) {
        Err(FormatError::ReencryptionInProgress { .. }) => {
            Luks2Header::read_reencrypt(file).map(|(h, _)| h)
        }
        other => other.map(|(h, _)| h),
    }
}
