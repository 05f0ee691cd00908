//! Where things live on a LUKS2 device: byte offsets of the binary header fields and the sizes
//! the format allows. Constants only; parsing is in `header`.
//!
//! ```text
//! device
//! 0                        primary binary header (4096)     magic "LUKS\xba\xbe"
//! 4096                     primary JSON area (hdr_size - 4096)
//! hdr_size                 secondary binary header (4096)   magic "SKUL\xba\xbe"
//! hdr_size + 4096          secondary JSON area
//! 2 * hdr_size             keyslots area (config.keyslots_size)
//! ...                      padding
//! segments."0".offset      encrypted data
//!
//! binary header (big-endian integers)
//! 0    magic[6]  6 version:u16  8 hdr_size:u64  16 seqid:u64  24 label[48]
//! 72   checksum_alg[32]  104 salt[64]  168 uuid[40]  208 subsystem[48]  256 hdr_offset:u64
//! 264  padding[184]  448 csum[64]  512 padding[3584]  4096 end
//! ```

/// Size of one binary header.
pub const BIN_HEADER_SIZE: usize = 4096;

pub const MAGIC_LEN: usize = 6;
pub const MAGIC_PRIMARY: [u8; MAGIC_LEN] = *b"LUKS\xba\xbe";
pub const MAGIC_SECONDARY: [u8; MAGIC_LEN] = *b"SKUL\xba\xbe";
pub const VERSION: u16 = 2;

pub const OFF_MAGIC: usize = 0;
pub const OFF_VERSION: usize = OFF_MAGIC + MAGIC_LEN;
pub const OFF_HDR_SIZE: usize = OFF_VERSION + 2;
pub const OFF_SEQID: usize = OFF_HDR_SIZE + 8;
pub const OFF_LABEL: usize = OFF_SEQID + 8;
pub const LABEL_LEN: usize = 48;
pub const OFF_CHECKSUM_ALG: usize = OFF_LABEL + LABEL_LEN;
pub const CHECKSUM_ALG_LEN: usize = 32;
pub const OFF_SALT: usize = OFF_CHECKSUM_ALG + CHECKSUM_ALG_LEN;
pub const SALT_LEN: usize = 64;
pub const OFF_UUID: usize = OFF_SALT + SALT_LEN;
pub const UUID_LEN: usize = 40;
pub const OFF_SUBSYSTEM: usize = OFF_UUID + UUID_LEN;
pub const SUBSYSTEM_LEN: usize = 48;
pub const OFF_HDR_OFFSET: usize = OFF_SUBSYSTEM + SUBSYSTEM_LEN;
pub const OFF_PADDING: usize = OFF_HDR_OFFSET + 8;
pub const PADDING_LEN: usize = 184;
pub const OFF_CSUM: usize = OFF_PADDING + PADDING_LEN;
pub const CSUM_LEN: usize = 64;
pub const OFF_PADDING4096: usize = OFF_CSUM + CSUM_LEN;

/// The only checksum algorithm cryptsetup writes (and the only one we accept).
pub const CHECKSUM_ALG: &str = "sha256";

/// The nine allowed `hdr_size` values (binary header + JSON area), ascending. The secondary copy
/// sits at `hdr_size`; a reader that lost the primary probes these offsets in this order.
pub const ALLOWED_HDR_SIZES: [u64; 9] = [
    0x4000, 0x8000, 0x1_0000, 0x2_0000, 0x4_0000, 0x8_0000, 0x10_0000, 0x20_0000, 0x40_0000,
];

/// cryptsetup's default `hdr_size` (16 KiB; JSON area 12 KiB).
pub const DEFAULT_HDR_SIZE: u64 = 0x4000;
/// cryptsetup's default keyslots area: 16 MiB minus the two 16 KiB header copies.
pub const DEFAULT_KEYSLOTS_SIZE: u64 = 16 * 1024 * 1024 - 2 * DEFAULT_HDR_SIZE;
/// cryptsetup's default data offset (16 MiB).
pub const DEFAULT_DATA_OFFSET: u64 = 16 * 1024 * 1024;
/// Upper bound of `config.keyslots_size` (128 MiB).
pub const MAX_KEYSLOTS_SIZE: u64 = 0x800_0000;
/// Keyslot areas and the keyslots area are allocated in 4 KiB units.
pub const KEYSLOTS_ALIGN: u64 = 4096;

/// At most 32 keyslots, tokens and segments (ids 0..31).
pub const MAX_KEYSLOTS: u32 = 32;
pub const MAX_TOKENS: u32 = 32;
pub const MAX_SEGMENTS: u32 = 32;

/// AF stripes: LUKS always uses 4000.
pub const AF_STRIPES: u32 = 4000;
/// Keyslot material is encrypted in 512-byte units, IV = unit index from the area start.
pub const KEYSLOT_SECTOR: u64 = 512;
/// KDF and digest salts are 32 bytes.
pub const KDF_SALT_LEN: usize = 32;

/// JSON area size for a given `hdr_size`.
pub const fn json_area_size(hdr_size: u64) -> u64 {
    hdr_size - BIN_HEADER_SIZE as u64
}

pub fn is_allowed_hdr_size(hdr_size: u64) -> bool {
    ALLOWED_HDR_SIZES.contains(&hdr_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_match_the_spec_table() {
        assert_eq!(OFF_VERSION, 6);
        assert_eq!(OFF_HDR_SIZE, 8);
        assert_eq!(OFF_SEQID, 16);
        assert_eq!(OFF_LABEL, 24);
        assert_eq!(OFF_CHECKSUM_ALG, 72);
        assert_eq!(OFF_SALT, 104);
        assert_eq!(OFF_UUID, 168);
        assert_eq!(OFF_SUBSYSTEM, 208);
        assert_eq!(OFF_HDR_OFFSET, 256);
        assert_eq!(OFF_CSUM, 448);
        assert_eq!(OFF_PADDING4096, 512);
        assert_eq!(DEFAULT_KEYSLOTS_SIZE, 16_744_448);
        assert_eq!(json_area_size(0x40_0000), 4_190_208);
    }
}
