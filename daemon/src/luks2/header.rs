//! The 4096-byte binary header: parse, encode, checksum, and the raw I/O of one header copy
//! (binary header + JSON area). Knows nothing about the JSON inside; `metadata` does.
//!
//! Sanity checks (magic, version, `hdr_size`, `hdr_offset`, checksum algorithm) run on the 4096
//! bytes before the JSON area is allocated, so a hostile `hdr_size` never sizes an allocation.

use std::io;

use sha2::{Digest, Sha256};

use super::error::{FormatError, HeaderCopy};
use super::io::HeaderIo;
use super::layout::*;

/// One binary header as found on (or about to be written to) disk.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct BinaryHeader {
    pub copy: HeaderCopy,
    pub hdr_size: u64,
    pub seqid: u64,
    pub label: String,
    pub checksum_alg: String,
    /// Random per copy; no cryptographic role (keeps the two copies from deduplicating).
    pub salt: [u8; SALT_LEN],
    pub uuid: String,
    pub subsystem: String,
    pub hdr_offset: u64,
    pub csum: [u8; CSUM_LEN],
}

impl std::fmt::Debug for BinaryHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BinaryHeader")
            .field("copy", &self.copy)
            .field("hdr_size", &self.hdr_size)
            .field("seqid", &self.seqid)
            .field("label", &self.label)
            .field("uuid", &self.uuid)
            .field("subsystem", &self.subsystem)
            .field("hdr_offset", &self.hdr_offset)
            .finish_non_exhaustive()
    }
}

impl BinaryHeader {
    /// Parses and sanity-checks `buf`, read at `offset` for the given `copy`. Does not verify the
    /// checksum (that needs the JSON area).
    pub fn parse(
        buf: &[u8; BIN_HEADER_SIZE],
        copy: HeaderCopy,
        offset: u64,
    ) -> Result<BinaryHeader, FormatError> {
        let magic = match copy {
            HeaderCopy::Primary => MAGIC_PRIMARY,
            HeaderCopy::Secondary => MAGIC_SECONDARY,
        };
        if buf[OFF_MAGIC..OFF_MAGIC + MAGIC_LEN] != magic {
            return Err(FormatError::BadMagic { copy, offset });
        }
        let version = u16::from_be_bytes([buf[OFF_VERSION], buf[OFF_VERSION + 1]]);
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion {
                copy,
                offset,
                version,
            });
        }
        let hdr_size = be64(buf, OFF_HDR_SIZE);
        if !is_allowed_hdr_size(hdr_size) {
            return Err(FormatError::BadHeaderSize {
                copy,
                offset,
                hdr_size,
            });
        }
        let hdr_offset = be64(buf, OFF_HDR_OFFSET);
        if hdr_offset != offset {
            return Err(FormatError::BadHeaderOffset {
                copy,
                offset,
                found: hdr_offset,
            });
        }
        if copy == HeaderCopy::Secondary && offset != hdr_size {
            // The secondary always sits at hdr_size; one found elsewhere is stale or foreign.
            return Err(FormatError::BadHeaderSize {
                copy,
                offset,
                hdr_size,
            });
        }
        let checksum_alg = c_string(&buf[OFF_CHECKSUM_ALG..OFF_CHECKSUM_ALG + CHECKSUM_ALG_LEN]);
        if checksum_alg != CHECKSUM_ALG {
            return Err(FormatError::UnsupportedChecksumAlg {
                copy,
                offset,
                alg: checksum_alg,
            });
        }
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&buf[OFF_SALT..OFF_SALT + SALT_LEN]);
        let mut csum = [0u8; CSUM_LEN];
        csum.copy_from_slice(&buf[OFF_CSUM..OFF_CSUM + CSUM_LEN]);
        Ok(BinaryHeader {
            copy,
            hdr_size,
            seqid: be64(buf, OFF_SEQID),
            label: c_string(&buf[OFF_LABEL..OFF_LABEL + LABEL_LEN]),
            checksum_alg,
            salt,
            uuid: c_string(&buf[OFF_UUID..OFF_UUID + UUID_LEN]),
            subsystem: c_string(&buf[OFF_SUBSYSTEM..OFF_SUBSYSTEM + SUBSYSTEM_LEN]),
            hdr_offset,
            csum,
        })
    }

    /// Encodes the header with its current `csum` field. Strings longer than their field minus
    /// the NUL are truncated (callers validate labels before they get here).
    pub fn encode(&self) -> [u8; BIN_HEADER_SIZE] {
        let mut buf = [0u8; BIN_HEADER_SIZE];
        let magic = match self.copy {
            HeaderCopy::Primary => MAGIC_PRIMARY,
            HeaderCopy::Secondary => MAGIC_SECONDARY,
        };
        buf[OFF_MAGIC..OFF_MAGIC + MAGIC_LEN].copy_from_slice(&magic);
        buf[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&VERSION.to_be_bytes());
        buf[OFF_HDR_SIZE..OFF_HDR_SIZE + 8].copy_from_slice(&self.hdr_size.to_be_bytes());
        buf[OFF_SEQID..OFF_SEQID + 8].copy_from_slice(&self.seqid.to_be_bytes());
        put_c_string(&mut buf[OFF_LABEL..OFF_LABEL + LABEL_LEN], &self.label);
        put_c_string(
            &mut buf[OFF_CHECKSUM_ALG..OFF_CHECKSUM_ALG + CHECKSUM_ALG_LEN],
            &self.checksum_alg,
        );
        buf[OFF_SALT..OFF_SALT + SALT_LEN].copy_from_slice(&self.salt);
        put_c_string(&mut buf[OFF_UUID..OFF_UUID + UUID_LEN], &self.uuid);
        put_c_string(
            &mut buf[OFF_SUBSYSTEM..OFF_SUBSYSTEM + SUBSYSTEM_LEN],
            &self.subsystem,
        );
        buf[OFF_HDR_OFFSET..OFF_HDR_OFFSET + 8].copy_from_slice(&self.hdr_offset.to_be_bytes());
        buf[OFF_CSUM..OFF_CSUM + CSUM_LEN].copy_from_slice(&self.csum);
        buf
    }

    /// Offset of the JSON area of this copy.
    pub fn json_offset(&self) -> u64 {
        self.hdr_offset + BIN_HEADER_SIZE as u64
    }
}

/// SHA-256 over the binary header with its csum field zeroed, then the whole JSON area, stored
/// as the digest followed by zeros.
pub(crate) fn checksum(bin: &[u8; BIN_HEADER_SIZE], json_area: &[u8]) -> [u8; CSUM_LEN] {
    let mut h = Sha256::new();
    h.update(&bin[..OFF_CSUM]);
    h.update([0u8; CSUM_LEN]);
    h.update(&bin[OFF_CSUM + CSUM_LEN..]);
    h.update(json_area);
    let mut out = [0u8; CSUM_LEN];
    out[..32].copy_from_slice(&h.finalize());
    out
}

/// A header copy that passed the binary sanity checks and its checksum.
#[derive(Debug)]
pub(crate) struct RawCopy {
    pub bin: BinaryHeader,
    /// The whole JSON area (`hdr_size - 4096` bytes).
    pub json_area: Vec<u8>,
}

/// Reads the copy expected at `offset`, checking sanity before allocating and the checksum last.
pub(crate) fn read_copy(
    file: &dyn HeaderIo,
    copy: HeaderCopy,
    offset: u64,
    device_size: u64,
) -> Result<RawCopy, FormatError> {
    let bin_end = offset + BIN_HEADER_SIZE as u64;
    if bin_end > device_size {
        return Err(FormatError::Truncated {
            what: format!("{copy} binary header"),
            end: bin_end,
            size: device_size,
        });
    }
    let mut buf = [0u8; BIN_HEADER_SIZE];
    read_exact_at(file, &mut buf, offset, "reading the binary header")?;
    let bin = BinaryHeader::parse(&buf, copy, offset)?;
    let json_len = json_area_size(bin.hdr_size);
    let end = offset + bin.hdr_size; // both bounded by 4 MiB checks above
    if end > device_size {
        return Err(FormatError::Truncated {
            what: format!("{copy} JSON area"),
            end,
            size: device_size,
        });
    }
    // hdr_size is one of nine values <= 4 MiB, so this allocation is bounded.
    let mut json_area = vec![0u8; usize::try_from(json_len).unwrap_or(0)];
    read_exact_at(
        file,
        &mut json_area,
        bin.json_offset(),
        "reading the JSON area",
    )?;
    if checksum(&buf, &json_area) != bin.csum {
        return Err(FormatError::BadChecksum { copy, offset });
    }
    Ok(RawCopy { bin, json_area })
}

/// Reads both copies the way cryptsetup finds them: the secondary at the primary's `hdr_size`
/// when the primary is sound, otherwise the first valid one at the nine allowed offsets.
pub(crate) fn read_both(
    file: &dyn HeaderIo,
    device_size: u64,
) -> (Result<RawCopy, FormatError>, Result<RawCopy, FormatError>) {
    let primary = read_copy(file, HeaderCopy::Primary, 0, device_size);
    let secondary = match &primary {
        Ok(p) => read_copy(file, HeaderCopy::Secondary, p.bin.hdr_size, device_size),
        Err(_) => {
            let mut first_err = None;
            let mut found = None;
            for off in ALLOWED_HDR_SIZES {
                match read_copy(file, HeaderCopy::Secondary, off, device_size) {
                    Ok(c) => {
                        found = Some(c);
                        break;
                    }
                    // Remember the most telling failure: one where the magic was right.
                    Err(FormatError::BadMagic { .. }) | Err(FormatError::Truncated { .. }) => {}
                    Err(e) => {
                        if first_err.is_none() {
                            first_err = Some(e);
                        }
                    }
                }
            }
            match found {
                Some(c) => Ok(c),
                None => Err(first_err.unwrap_or(FormatError::BadMagic {
                    copy: HeaderCopy::Secondary,
                    offset: DEFAULT_HDR_SIZE,
                })),
            }
        }
    };
    (primary, secondary)
}

/// Writes one copy in cryptsetup's order: binary header with a zero checksum, the JSON area
/// (text, NUL, zeros to the end of the area), the binary header with its checksum, fsync. A crash
/// at any point leaves this copy with a bad checksum, never a wrong-but-valid one.
pub(crate) fn write_copy(
    file: &dyn HeaderIo,
    bin: &BinaryHeader,
    json_text: &[u8],
) -> Result<(), FormatError> {
    let area_len = usize::try_from(json_area_size(bin.hdr_size))
        .map_err(|_| FormatError::InvalidParams("hdr_size".into()))?;
    if json_text.len() >= area_len {
        return Err(FormatError::JsonTooLarge {
            len: json_text.len(),
            max: area_len as u64 - 1,
        });
    }
    let mut area = vec![0u8; area_len];
    area[..json_text.len()].copy_from_slice(json_text);
    let mut unsummed = bin.clone();
    unsummed.csum = [0u8; CSUM_LEN];
    let first = unsummed.encode();
    write_all_at(file, &first, bin.hdr_offset, "writing the binary header")?;
    write_all_at(file, &area, bin.json_offset(), "writing the JSON area")?;
    let mut summed = unsummed;
    summed.csum = checksum(&first, &area);
    write_all_at(
        file,
        &summed.encode(),
        bin.hdr_offset,
        "writing the binary header checksum",
    )?;
    file.sync_durable()
        .map_err(|e| FormatError::io("syncing the header", bin.hdr_offset, e))
}

/// Size of a regular file or block device.
pub(crate) fn device_size(file: &dyn HeaderIo) -> Result<u64, FormatError> {
    file.size()
        .map_err(|e| FormatError::io("finding the device size", 0, e))
}

pub(crate) fn read_exact_at(
    file: &dyn HeaderIo,
    buf: &mut [u8],
    offset: u64,
    op: &'static str,
) -> Result<(), FormatError> {
    file.pread_exact(buf, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FormatError::Truncated {
                what: op.trim_start_matches("reading ").to_string(),
                end: offset.saturating_add(buf.len() as u64),
                size: device_size(file).unwrap_or(0),
            }
        } else {
            FormatError::io(op, offset, e)
        }
    })
}

pub(crate) fn write_all_at(
    file: &dyn HeaderIo,
    buf: &[u8],
    offset: u64,
    op: &'static str,
) -> Result<(), FormatError> {
    file.pwrite_all(buf, offset)
        .map_err(|e| FormatError::io(op, offset, e))
}

fn be64(buf: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[off..off + 8]);
    u64::from_be_bytes(b)
}

/// A NUL-terminated string field; a field without NUL loses its last byte (forced termination,
/// as cryptsetup does). Non-UTF-8 bytes are replaced.
fn c_string(field: &[u8]) -> String {
    let limit = field.len() - 1;
    let end = field[..limit].iter().position(|&b| b == 0).unwrap_or(limit);
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn put_c_string(field: &mut [u8], s: &str) {
    let n = s.len().min(field.len() - 1);
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(copy: HeaderCopy) -> BinaryHeader {
        BinaryHeader {
            copy,
            hdr_size: 0x4000,
            seqid: 7,
            label: "vol".into(),
            checksum_alg: "sha256".into(),
            salt: [3; SALT_LEN],
            uuid: "11111111-2222-4333-8444-555555555555".into(),
            subsystem: String::new(),
            hdr_offset: if copy == HeaderCopy::Primary {
                0
            } else {
                0x4000
            },
            csum: [0; CSUM_LEN],
        }
    }

    #[test]
    fn encode_then_parse_round_trips() {
        for copy in [HeaderCopy::Primary, HeaderCopy::Secondary] {
            let h = sample(copy);
            let buf = h.encode();
            let back = BinaryHeader::parse(&buf, copy, h.hdr_offset).unwrap();
            assert_eq!(back, h);
        }
    }

    #[test]
    fn header_rejects_a_wrong_magic() {
        let buf = sample(HeaderCopy::Primary).encode();
        let e = BinaryHeader::parse(&buf, HeaderCopy::Secondary, 0x4000).unwrap_err();
        assert!(matches!(
            e,
            FormatError::BadMagic {
                copy: HeaderCopy::Secondary,
                offset: 0x4000
            }
        ));
    }

    #[test]
    fn header_rejects_version_1() {
        let mut buf = sample(HeaderCopy::Primary).encode();
        buf[OFF_VERSION + 1] = 1;
        assert!(matches!(
            BinaryHeader::parse(&buf, HeaderCopy::Primary, 0),
            Err(FormatError::UnsupportedVersion { version: 1, .. })
        ));
    }

    #[test]
    fn header_rejects_a_hdr_size_outside_the_nine_allowed_values() {
        let mut buf = sample(HeaderCopy::Primary).encode();
        buf[OFF_HDR_SIZE..OFF_HDR_SIZE + 8].copy_from_slice(&0xffff_ffff_ffffu64.to_be_bytes());
        assert!(matches!(
            BinaryHeader::parse(&buf, HeaderCopy::Primary, 0),
            Err(FormatError::BadHeaderSize {
                hdr_size: 0xffff_ffff_ffff,
                ..
            })
        ));
    }

    #[test]
    fn header_rejects_a_hdr_offset_that_is_not_where_it_was_read() {
        let buf = sample(HeaderCopy::Primary).encode();
        assert!(matches!(
            BinaryHeader::parse(&buf, HeaderCopy::Primary, 512),
            Err(FormatError::BadHeaderOffset { found: 0, .. })
        ));
    }

    #[test]
    fn header_rejects_checksum_algorithms_other_than_sha256() {
        let mut h = sample(HeaderCopy::Primary);
        h.checksum_alg = "sha1".into();
        assert!(matches!(
            BinaryHeader::parse(&h.encode(), HeaderCopy::Primary, 0),
            Err(FormatError::UnsupportedChecksumAlg { .. })
        ));
    }

    #[test]
    fn a_label_without_nul_is_truncated_to_47_bytes() {
        let mut buf = sample(HeaderCopy::Primary).encode();
        buf[OFF_LABEL..OFF_LABEL + LABEL_LEN].fill(b'x');
        let h = BinaryHeader::parse(&buf, HeaderCopy::Primary, 0).unwrap();
        assert_eq!(h.label.len(), 47);
    }

    #[test]
    fn checksum_ignores_the_csum_field_itself() {
        let mut h = sample(HeaderCopy::Primary);
        let a = checksum(&h.encode(), &[0u8; 16]);
        h.csum = [0xff; CSUM_LEN];
        assert_eq!(a, checksum(&h.encode(), &[0u8; 16]));
        assert_ne!(a, checksum(&h.encode(), &[1u8; 16]));
        assert!(a[32..].iter().all(|&b| b == 0));
    }
}
