//! What the daemon's online re-encryption needs from the header reader beyond the public API:
//! the header of a volume in the middle of a re-encryption, for the facts a locked daemon
//! shows (UUID, label, data offset) and the volume pin's UUID check. The re-encryption state
//! itself is only acted on through `luks2::reencrypt`, which verifies its digest with both keys.

use super::io::HeaderIo;

use super::error::FormatError;
use super::volume::Luks2Header;

/// Reads the header whether or not a re-encryption is in progress (checksums and structure
/// checked as for any header). A header in re-encryption is accepted only in a state
/// `luks2::reencrypt` can resume (cryptsetup's forward re-key without data shift); any other
/// (cryptsetup's encrypt/decrypt modes, data shifts, malformed segments) is refused with the
/// plain reader's error. The re-encryption digest is NOT verified here: the unlock does that
/// (`Reencryption::open`) before anything is served.
pub fn read_any_header(file: &dyn HeaderIo) -> Result<Luks2Header, FormatError> {
    match Luks2Header::read(file) {
        Err(refused @ FormatError::ReencryptionInProgress { .. }) => {
            let Ok((hdr, _)) = Luks2Header::read_reencrypt(file) else {
                return Err(refused);
            };
            let size = super::header::device_size(file)?;
            match super::reencrypt::ReencState::from_header(&hdr, size) {
                Ok(_) => Ok(hdr),
                Err(_) => Err(refused),
            }
        }
        other => other.map(|(h, _)| h),
    }
}
