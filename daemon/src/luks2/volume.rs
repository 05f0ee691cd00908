//! `Luks2Header`: a validated header in memory, and every operation that reads or changes one
//! on disk (read, repair, unlock, format, keyslots, tokens, backup/restore).
//!
//! Every update follows cryptsetup: exclusive flock, re-read the on-disk seqid (abort if someone
//! else wrote), write keyslot material first, then `seqid + 1` and the primary copy, fsync, the
//! secondary copy, fsync. Reads take the lock shared and never repair on their own.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::digest;
use super::error::{FormatError, HeaderCopy};
use super::header::{self, device_size, read_exact_at, write_all_at, BinaryHeader, RawCopy};
use super::io::HeaderIo;
use super::keyslot;
use super::layout::{
    is_allowed_hdr_size, json_area_size, BIN_HEADER_SIZE, CHECKSUM_ALG, CSUM_LEN,
    DEFAULT_DATA_OFFSET, DEFAULT_HDR_SIZE, DEFAULT_KEYSLOTS_SIZE, KEYSLOTS_ALIGN, LABEL_LEN,
    MAX_KEYSLOTS, MAX_KEYSLOTS_SIZE, MAX_TOKENS, SALT_LEN, SUBSYSTEM_LEN,
};
use super::lock::{lock, LockMode};
use super::metadata::{
    Config, Keyslot, KeyslotPriority, Metadata, Segment, SegmentSize, Token, CIPHER,
};
use crate::crypto::kdf::{HashAlg, KdfLimits, KdfParams};
use crate::crypto::keys::{SecretBytes, VolumeKey};

/// Which header copy, if any, is stale or broken and should be rewritten from the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairNeeded {
    None,
    Primary,
    Secondary,
}

/// The encrypted data segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataSegment {
    /// Absolute byte offset of the data on the device.
    pub offset: u64,
    pub size: SegmentSize,
    /// Encryption unit in bytes (512..4096). IVs still count 512-byte units.
    pub sector_size: u32,
    /// Volume key length in bytes (64 = AES-256-XTS), from the keyslots bound to the segment;
    /// `None` if no keyslot is left.
    pub key_size: Option<u32>,
    /// Added to the IV (512-byte units); always 0 for volumes we accept.
    pub iv_tweak: u64,
}

/// What a keyslot is, without anything secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyslotInfo {
    pub id: u32,
    /// `"luks2"`, or another type we keep but never try.
    pub type_name: String,
    pub priority: KeyslotPriority,
    /// `None` for slots we cannot open (unknown type, KDF, hash or area cipher).
    pub kdf: Option<KdfParams>,
    pub key_size: Option<u32>,
    pub area_offset: Option<u64>,
    pub area_size: Option<u64>,
    /// True if the slot opens the data segment (its digest covers segment 0).
    pub for_data: bool,
}

/// Parameters for [`format`]. Build with [`FormatParams::new`]: the caller picks the keyslot
/// KDF and its cost (see `crypto::kdf::benchmark_argon2id`).
#[derive(Debug, Clone)]
pub struct FormatParams {
    /// KDF of keyslot 0.
    pub kdf: KdfParams,
    /// Volume key length: 64 (AES-256-XTS, default) or 32 (AES-128-XTS).
    pub key_size: u32,
    /// Data encryption unit: 512, 1024, 2048 or 4096 (default; cryptsetup's choice on files).
    pub sector_size: u32,
    /// PBKDF2-SHA256 iterations of the volume-key digest (cryptsetup benchmarks 125 ms; at least
    /// 1000).
    pub digest_iterations: u32,
    pub label: String,
    pub subsystem: String,
    /// Textual UUID; a random v4 one when `None`.
    pub uuid: Option<String>,
    /// One of the nine allowed sizes; default 16 KiB.
    pub hdr_size: u64,
    /// Default 16 MiB - 32 KiB.
    pub keyslots_size: u64,
    /// Default 16 MiB.
    pub data_offset: u64,
}

impl FormatParams {
    pub fn new(kdf: KdfParams) -> FormatParams {
        FormatParams {
            kdf,
            key_size: 64,
            sector_size: 4096,
            digest_iterations: 100_000,
            label: String::new(),
            subsystem: String::new(),
            uuid: None,
            hdr_size: DEFAULT_HDR_SIZE,
            keyslots_size: DEFAULT_KEYSLOTS_SIZE,
            data_offset: DEFAULT_DATA_OFFSET,
        }
    }
}

/// A LUKS2 header that passed every check, as read from (or written to) a device.
#[derive(Clone)]
pub struct Luks2Header {
    hdr_size: u64,
    seqid: u64,
    label: String,
    subsystem: String,
    uuid: String,
    pub(super) metadata: Metadata,
    /// JSON text of the copy this was read from (up to the NUL), for repairing the other copy.
    json_text: Vec<u8>,
}

impl std::fmt::Debug for Luks2Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Luks2Header")
            .field("uuid", &self.uuid)
            .field("label", &self.label)
            .field("seqid", &self.seqid)
            .field("hdr_size", &self.hdr_size)
            .finish_non_exhaustive()
    }
}

enum CopyState {
    Valid(RawCopy, Box<Metadata>),
    /// Valid LUKS2 we refuse (requirements, reencryption, cipher...).
    Refused(RawCopy, FormatError),
    Invalid(FormatError),
}

impl CopyState {
    fn seqid(&self) -> Option<u64> {
        match self {
            CopyState::Valid(c, _) | CopyState::Refused(c, _) => Some(c.bin.seqid),
            CopyState::Invalid(_) => None,
        }
    }
}

impl Luks2Header {
    /// Reads the header of a volume whose data follows it on the same device. Refuses detached
    /// headers (segment offset 0, or data beyond the end of this device).
    pub fn read(file: &dyn HeaderIo) -> Result<(Luks2Header, RepairNeeded), FormatError> {
        let _lock = lock(file, LockMode::Shared)?;
        let (hdr, repair) = Self::read_unlocked(file)?;
        hdr.check_attached(device_size(file)?)?;
        Ok((hdr, repair))
    }

    /// Reads and validates the header without checking that the data segment lives on the same
    /// device: for header files of detached volumes and for inspection.
    pub fn read_metadata_only(
        file: &dyn HeaderIo,
    ) -> Result<(Luks2Header, RepairNeeded), FormatError> {
        let _lock = lock(file, LockMode::Shared)?;
        Self::read_unlocked(file)
    }

    /// Like [`Luks2Header::read`], but a header in the middle of a re-encryption is returned
    /// instead of refused (its segments in `metadata.reenc_segments`). For `luks2::reencrypt`,
    /// which checks the state and its digest before anything uses it.
    pub(super) fn read_reencrypt(
        file: &dyn HeaderIo,
    ) -> Result<(Luks2Header, RepairNeeded), FormatError> {
        let _lock = lock(file, LockMode::Shared)?;
        let (hdr, repair) = Self::read_unlocked_mode(file, true)?;
        hdr.check_attached(device_size(file)?)?;
        Ok((hdr, repair))
    }

    fn read_unlocked(file: &dyn HeaderIo) -> Result<(Luks2Header, RepairNeeded), FormatError> {
        Self::read_unlocked_mode(file, false)
    }

    fn read_unlocked_mode(
        file: &dyn HeaderIo,
        allow_reencrypt: bool,
    ) -> Result<(Luks2Header, RepairNeeded), FormatError> {
        let size = device_size(file)?;
        if size < BIN_HEADER_SIZE as u64 {
            return Err(FormatError::DeviceTooSmall {
                size,
                needed: 2 * DEFAULT_HDR_SIZE,
            });
        }
        let (p, s) = header::read_both(file, size);
        let eval = |r: Result<RawCopy, FormatError>| match r {
            Err(e) => CopyState::Invalid(e),
            Ok(c) => match if allow_reencrypt {
                Metadata::parse_area_reencrypt(&c.json_area, c.bin.hdr_size, c.bin.copy)
            } else {
                Metadata::parse_area(&c.json_area, c.bin.hdr_size, c.bin.copy)
            } {
                Ok(md) => CopyState::Valid(c, Box::new(md)),
                Err(e) if e.is_refusal() => CopyState::Refused(c, e),
                Err(e) => CopyState::Invalid(e),
            },
        };
        let (p, s) = (eval(p), eval(s));
        let (chosen, repair) = match (p.seqid(), s.seqid()) {
            (None, None) => {
                let (CopyState::Invalid(pe), CopyState::Invalid(se)) = (p, s) else {
                    unreachable!("both copies have no seqid, so both are Invalid")
                };
                return Err(FormatError::NoValidHeader {
                    primary: Box::new(pe),
                    secondary: Box::new(se),
                });
            }
            (Some(_), None) => (p, RepairNeeded::Secondary),
            (None, Some(_)) => (s, RepairNeeded::Primary),
            (Some(a), Some(b)) if b > a => (s, RepairNeeded::Primary),
            (Some(a), Some(b)) if a > b => (p, RepairNeeded::Secondary),
            // Same seqid: the primary wins and nothing is rewritten, even if the texts differ.
            _ => (p, RepairNeeded::None),
        };
        let (raw, md) = match chosen {
            CopyState::Valid(raw, md) => (raw, *md),
            CopyState::Refused(_, e) | CopyState::Invalid(e) => return Err(e),
        };
        let text_len = raw.json_area.iter().position(|&b| b == 0).unwrap_or(0);
        let mut json_area = raw.json_area;
        json_area.truncate(text_len);
        let hdr = Luks2Header {
            hdr_size: raw.bin.hdr_size,
            seqid: raw.bin.seqid,
            label: raw.bin.label,
            subsystem: raw.bin.subsystem,
            uuid: raw.bin.uuid,
            metadata: md,
            json_text: json_area,
        };
        let meta_end = hdr.metadata_end();
        if meta_end > size {
            return Err(FormatError::Truncated {
                what: "keyslots area".into(),
                end: meta_end,
                size,
            });
        }
        Ok((hdr, repair))
    }

    /// The data must start after the metadata on this device and leave whole sectors.
    fn check_attached(&self, size: u64) -> Result<(), FormatError> {
        let seg = &self.metadata.segment;
        if seg.offset == 0 {
            return Err(FormatError::DetachedHeader {
                reason: "data segment offset is 0".into(),
            });
        }
        let ss = u64::from(seg.sector_size);
        if seg.offset.saturating_add(ss) > size {
            return Err(FormatError::DetachedHeader {
                reason: format!(
                    "data segment starts at {} but the device has only {size} bytes",
                    seg.offset
                ),
            });
        }
        match seg.size {
            SegmentSize::Bytes(n) => {
                let end = seg.offset.saturating_add(n);
                if end > size {
                    return Err(FormatError::Truncated {
                        what: "data segment".into(),
                        end,
                        size,
                    });
                }
            }
            SegmentSize::Dynamic => {
                let n = size - seg.offset; // offset < size checked above
                if !n.is_multiple_of(ss) {
                    return Err(FormatError::Unsupported(format!(
                        "data area of {n} bytes is not a multiple of the sector size {ss}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Rewrites the copy `which` from the one this header was read from (same seqid, fresh
    /// salt). Refuses if the header changed on disk since it was read.
    pub fn repair(&self, file: &dyn HeaderIo, which: RepairNeeded) -> Result<(), FormatError> {
        let copy = match which {
            RepairNeeded::None => return Ok(()),
            RepairNeeded::Primary => HeaderCopy::Primary,
            RepairNeeded::Secondary => HeaderCopy::Secondary,
        };
        let _lock = lock(file, LockMode::Exclusive)?;
        self.check_unchanged(file)?;
        let bin = self.binary_header(copy)?;
        header::write_copy(file, &bin, &self.json_text)
    }

    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn subsystem(&self) -> &str {
        &self.subsystem
    }

    pub fn seqid(&self) -> u64 {
        self.seqid
    }

    /// Binary header + JSON area size (16 KiB by default).
    pub fn hdr_size(&self) -> u64 {
        self.hdr_size
    }

    /// Bytes from the device start to the end of the keyslots area.
    pub fn metadata_end(&self) -> u64 {
        2 * self.hdr_size + self.metadata.config.keyslots_size
    }

    /// `config.flags` (e.g. `allow-discards`).
    pub fn config_flags(&self) -> &[String] {
        self.metadata.config.flags.as_deref().unwrap_or(&[])
    }

    pub fn data_segment(&self) -> DataSegment {
        let s = &self.metadata.segment;
        let key_size = self.metadata.segment_digest().and_then(|(_, d)| {
            d.keyslots
                .iter()
                .find_map(|k| match self.metadata.keyslots.get(k) {
                    Some(Keyslot::Luks2(ks)) => Some(ks.key_size),
                    _ => None,
                })
        });
        DataSegment {
            offset: s.offset,
            size: s.size,
            sector_size: s.sector_size,
            key_size,
            iv_tweak: s.iv_tweak,
        }
    }

    pub fn keyslots(&self) -> Vec<KeyslotInfo> {
        let bound = self
            .metadata
            .segment_digest()
            .map(|(_, d)| d.keyslots.clone())
            .unwrap_or_default();
        self.metadata
            .keyslots
            .iter()
            .map(|(&id, ks)| match ks {
                Keyslot::Luks2(k) => KeyslotInfo {
                    id,
                    type_name: "luks2".into(),
                    priority: k.priority(),
                    kdf: k.usable().ok().map(|(p, _)| p),
                    key_size: Some(k.key_size),
                    area_offset: Some(k.area.offset),
                    area_size: Some(k.area.size),
                    for_data: bound.contains(&id),
                },
                Keyslot::Other {
                    type_name, area, ..
                } => KeyslotInfo {
                    id,
                    type_name: type_name.clone(),
                    priority: KeyslotPriority::Ignore,
                    kdf: None,
                    key_size: None,
                    area_offset: Some(area.0),
                    area_size: Some(area.1),
                    for_data: false,
                },
            })
            .collect()
    }

    pub fn tokens(&self) -> impl Iterator<Item = (u32, &Token)> {
        self.metadata.tokens.iter().map(|(&id, t)| (id, t))
    }

    pub fn token(&self, id: u32) -> Option<&Token> {
        self.metadata.tokens.get(&id)
    }

    /// Tries every keyslot that opens the data segment (priority 2, then 1; never 0) and returns
    /// the volume key and the slot that opened it. A wrong passphrase is `WrongPassphrase`
    /// whatever slots exist. If no slot matched and some were skipped for exceeding `limits`,
    /// the first such `KdfLimit` is returned instead.
    pub fn unlock(
        &self,
        file: &dyn HeaderIo,
        passphrase: &SecretBytes,
        limits: &KdfLimits,
    ) -> Result<(VolumeKey, u32), FormatError> {
        let size = device_size(file)?;
        let Some((_, digest)) = self.metadata.segment_digest() else {
            return Err(FormatError::WrongPassphrase);
        };
        let mut order: Vec<(u32, &super::metadata::Luks2Keyslot)> = Vec::new();
        for prio in [KeyslotPriority::Prefer, KeyslotPriority::Normal] {
            for (&id, ks) in &self.metadata.keyslots {
                if let Keyslot::Luks2(k) = ks {
                    if k.priority() == prio && digest.keyslots.contains(&id) {
                        order.push((id, k));
                    }
                }
            }
        }
        let mut limit_hit = None;
        // Work already spent, in thousandths of a maximal derivation: many cheap-looking
        // keyslots must not add up to minutes.
        let mut spent: u64 = 0;
        for (id, k) in order {
            let cost = match k.usable() {
                Ok((params, _))
                    if limits
                        .check_output(&params, k.area.key_size as usize)
                        .is_ok()
                        && digest.iterations <= limits.max_pbkdf2_iterations =>
                {
                    limits
                        .cost_permille(&params)
                        .saturating_add(limits.pbkdf2_cost_permille(digest.iterations))
                }
                _ => 0, // refused by open_slot before any work
            };
            if spent.saturating_add(cost) > limits.max_total_permille {
                limit_hit.get_or_insert(FormatError::KdfLimit {
                    slot: id,
                    param: "kdf work of all keyslots tried (thousandths of a maximal derivation)",
                    value: spent.saturating_add(cost),
                    cap: limits.max_total_permille,
                });
                continue;
            }
            spent = spent.saturating_add(cost);
            match self.open_slot(file, size, id, k, passphrase, limits) {
                Ok(key) => return Ok((key, id)),
                Err(FormatError::WrongPassphrase) | Err(FormatError::KeyslotUnusable { .. }) => {}
                Err(e @ FormatError::KdfLimit { .. }) => {
                    limit_hit.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(limit_hit.unwrap_or(FormatError::WrongPassphrase))
    }

    /// Opens one named keyslot (any priority, including 0).
    pub fn unlock_slot(
        &self,
        file: &dyn HeaderIo,
        slot: u32,
        passphrase: &SecretBytes,
        limits: &KdfLimits,
    ) -> Result<VolumeKey, FormatError> {
        let size = device_size(file)?;
        match self.metadata.keyslots.get(&slot) {
            None => Err(FormatError::KeyslotNotFound(slot)),
            Some(Keyslot::Other { type_name, .. }) => Err(FormatError::KeyslotUnusable {
                slot,
                reason: format!("keyslot type {type_name:?} is not supported"),
            }),
            Some(Keyslot::Luks2(k)) => self.open_slot(file, size, slot, k, passphrase, limits),
        }
    }

    fn open_slot(
        &self,
        file: &dyn HeaderIo,
        size: u64,
        id: u32,
        k: &super::metadata::Luks2Keyslot,
        passphrase: &SecretBytes,
        limits: &KdfLimits,
    ) -> Result<VolumeKey, FormatError> {
        let Some((_, digest)) = self.metadata.digest_of_keyslot(id) else {
            return Err(FormatError::KeyslotUnusable {
                slot: id,
                reason: "no digest".into(),
            });
        };
        // A key that does not open the data segment is not a volume key.
        if !digest.segments.contains(&0) {
            return Err(FormatError::KeyslotUnusable {
                slot: id,
                reason: "its key is not bound to the data segment".into(),
            });
        }
        self.open_slot_unchecked(file, size, id, k, passphrase, limits)
    }

    /// Opens keyslot `id` and checks the key against the slot's digest, whatever segments that
    /// digest covers (during a re-encryption the new key's digest covers only backup and
    /// finished segments). Same KDF and digest limits as `unlock`.
    pub(super) fn open_slot_unchecked(
        &self,
        file: &dyn HeaderIo,
        size: u64,
        id: u32,
        k: &super::metadata::Luks2Keyslot,
        passphrase: &SecretBytes,
        limits: &KdfLimits,
    ) -> Result<VolumeKey, FormatError> {
        let Some((_, digest)) = self.metadata.digest_of_keyslot(id) else {
            return Err(FormatError::KeyslotUnusable {
                slot: id,
                reason: "no digest".into(),
            });
        };
        // The digest's PBKDF2 runs on every attempt: cap it like a keyslot KDF.
        if digest.iterations > limits.max_pbkdf2_iterations {
            return Err(FormatError::KdfLimit {
                slot: id,
                param: "digest iterations",
                value: digest.iterations.into(),
                cap: limits.max_pbkdf2_iterations.into(),
            });
        }
        let digest_kdf = KdfParams::Pbkdf2 {
            hash: digest.hash,
            iterations: digest.iterations,
        };
        if let Err(l) = limits.check_output(&digest_kdf, digest.digest.len()) {
            return Err(FormatError::KdfLimit {
                slot: id,
                param: "digest iterations x output blocks",
                value: l.value,
                cap: l.cap,
            });
        }
        let candidate = keyslot::open(file, size, id, k, passphrase, limits)?;
        if !digest::verify(digest, candidate.expose_secret()) {
            return Err(FormatError::WrongPassphrase);
        }
        Ok(VolumeKey::from_slice(candidate.expose_secret()))
    }

    /// The PBKDF2 digest that identifies the volume key (hash, iterations, salt, digest): public
    /// facts, as in the header. For pinning a volume (`nbdcrypt::seal::pin`).
    pub fn volume_key_digest(&self) -> Option<(HashAlg, u32, &[u8], &[u8])> {
        self.metadata
            .segment_digest()
            .map(|(_, d)| (d.hash, d.iterations, d.salt.as_slice(), d.digest.as_slice()))
    }

    /// True if `key` is this volume's data key.
    pub fn verify_volume_key(&self, key: &VolumeKey) -> bool {
        let cap = KdfLimits::default().max_pbkdf2_iterations;
        self.metadata
            .segment_digest()
            .is_some_and(|(_, d)| d.iterations <= cap && digest::verify(d, key.expose_secret()))
    }

    /// Adds a keyslot for `new_passphrase` holding `existing` (which must be the volume key).
    /// Returns the new slot id.
    pub fn add_keyslot(
        &mut self,
        file: &dyn HeaderIo,
        existing: &VolumeKey,
        new_passphrase: &SecretBytes,
        kdf: &KdfParams,
    ) -> Result<u32, FormatError> {
        kdf.check_creatable()
            .map_err(|e| FormatError::InvalidParams(e.to_string()))?;
        let _lock = lock(file, LockMode::Exclusive)?;
        self.check_unchanged(file)?;
        let Some((digest_id, _)) = self.metadata.segment_digest() else {
            return Err(FormatError::WrongVolumeKey);
        };
        if !self.verify_volume_key(existing) {
            return Err(FormatError::WrongVolumeKey);
        }
        let slot = free_id(self.metadata.keyslots.keys(), MAX_KEYSLOTS)
            .ok_or(FormatError::NoFreeKeyslot(MAX_KEYSLOTS))?;
        let key_size = u32::try_from(existing.len()).unwrap_or(0);
        let offset = self.allocate_area(keyslot::area_size(key_size))?;
        let ks = keyslot::create(file, offset, existing, new_passphrase, kdf)?;
        let mut md = self.metadata.clone();
        md.keyslots.insert(slot, Keyslot::Luks2(ks));
        if let Some(d) = md.digests.get_mut(&digest_id) {
            d.keyslots.push(slot);
        }
        self.commit(file, md)?;
        Ok(slot)
    }

    /// Wipes and removes keyslot `slot`; tokens bound to it stay, with the slot removed from
    /// their `keyslots`. Refuses to remove the last keyslot that opens the data.
    pub fn remove_keyslot(&mut self, file: &dyn HeaderIo, slot: u32) -> Result<(), FormatError> {
        let _lock = lock(file, LockMode::Exclusive)?;
        self.check_unchanged(file)?;
        let ks = self
            .metadata
            .keyslots
            .get(&slot)
            .ok_or(FormatError::KeyslotNotFound(slot))?;
        if let Keyslot::Other { type_name, .. } = ks {
            return Err(FormatError::ForeignKeyslot {
                slot,
                type_name: type_name.clone(),
            });
        }
        if let Some((_, d)) = self.metadata.segment_digest() {
            if d.keyslots == [slot] {
                return Err(FormatError::LastKeyslot(slot));
            }
        }
        let mut md = self.metadata.clone();
        md.keyslots.remove(&slot);
        md.unlink_keyslot(slot);
        // Wipe first (as cryptsetup does): a crash leaves a dead slot, never live key material
        // nobody references. The area is checked against the metadata without this slot.
        if let Some((off, size)) = ks.area_extent() {
            wipe_keyslot_area(file, &md, self.hdr_size, slot, off, size)?;
        }
        self.commit(file, md)
    }

    /// Replaces the passphrase of the keyslot `old_passphrase` opens, keeping its slot id: new
    /// material goes to a free area, the header switches to it, then the old area is wiped.
    /// Returns the slot id.
    pub fn change_passphrase(
        &mut self,
        file: &dyn HeaderIo,
        old_passphrase: &SecretBytes,
        new_passphrase: &SecretBytes,
        kdf: &KdfParams,
        limits: &KdfLimits,
    ) -> Result<u32, FormatError> {
        kdf.check_creatable()
            .map_err(|e| FormatError::InvalidParams(e.to_string()))?;
        let _lock = lock(file, LockMode::Exclusive)?;
        self.check_unchanged(file)?;
        let (key, slot) = self.unlock(file, old_passphrase, limits)?;
        let old_area = match self.metadata.keyslots.get(&slot) {
            Some(Keyslot::Luks2(k)) => Some((k.area.offset, k.area.size)),
            _ => None, // unlock only opens luks2 slots
        };
        let key_size = u32::try_from(key.len()).unwrap_or(0);
        let offset = self.allocate_area(keyslot::area_size(key_size))?;
        let mut ks = keyslot::create(file, offset, &key, new_passphrase, kdf)?;
        let mut md = self.metadata.clone();
        if let Some(Keyslot::Luks2(old)) = md.keyslots.get(&slot) {
            ks.priority = old.priority;
            ks.extra = old.extra.clone();
        }
        md.keyslots.insert(slot, Keyslot::Luks2(ks));
        self.commit(file, md)?;
        if let Some((off, size)) = old_area {
            // Checked against the new metadata: the old area must now belong to no keyslot.
            wipe_keyslot_area(file, &self.metadata, self.hdr_size, slot, off, size)?;
        }
        Ok(slot)
    }

    /// Adds a token (its `keyslots` must exist); returns its id. `luks2-*` types are reserved
    /// for libcryptsetup.
    pub fn add_token(&mut self, file: &dyn HeaderIo, token: Token) -> Result<u32, FormatError> {
        if token.type_name().starts_with("luks2-") {
            return Err(FormatError::InvalidToken(format!(
                "type {:?} is reserved for cryptsetup",
                token.type_name()
            )));
        }
        let _lock = lock(file, LockMode::Exclusive)?;
        self.check_unchanged(file)?;
        if let Some(k) = token
            .keyslots()
            .iter()
            .find(|k| !self.metadata.keyslots.contains_key(k))
        {
            return Err(FormatError::InvalidToken(format!(
                "keyslot {k} does not exist"
            )));
        }
        let id = free_id(self.metadata.tokens.keys(), MAX_TOKENS)
            .ok_or(FormatError::NoFreeToken(MAX_TOKENS))?;
        let mut md = self.metadata.clone();
        md.tokens.insert(id, token);
        self.commit(file, md)?;
        Ok(id)
    }

    /// Removes token `id` and returns it.
    pub fn remove_token(&mut self, file: &dyn HeaderIo, id: u32) -> Result<Token, FormatError> {
        let _lock = lock(file, LockMode::Exclusive)?;
        self.check_unchanged(file)?;
        let mut md = self.metadata.clone();
        let t = md
            .tokens
            .remove(&id)
            .ok_or(FormatError::TokenNotFound(id))?;
        self.commit(file, md)?;
        Ok(t)
    }

    // ---- internals ----------------------------------------------------------------------------

    /// Lowest 4 KiB-aligned gap of `size` bytes in the keyslots area.
    pub(super) fn allocate_area(&self, size: u64) -> Result<u64, FormatError> {
        let start = 2 * self.hdr_size;
        let end = self.metadata_end();
        let mut used: Vec<(u64, u64)> = self
            .metadata
            .keyslots
            .values()
            .filter_map(Keyslot::area_extent)
            .map(|(o, s)| (o, o.saturating_add(s)))
            .collect();
        used.sort_unstable();
        let mut candidate = start;
        for (o, e) in used {
            if candidate.saturating_add(size) <= o {
                break;
            }
            candidate = candidate.max(e.div_ceil(KEYSLOTS_ALIGN) * KEYSLOTS_ALIGN);
        }
        if candidate.saturating_add(size) > end {
            return Err(FormatError::NoKeyslotSpace { size });
        }
        Ok(candidate)
    }

    /// Under the exclusive lock: the on-disk header must still be the one we hold.
    pub(super) fn check_unchanged(&self, file: &dyn HeaderIo) -> Result<(), FormatError> {
        // Any valid header counts here, also one in re-encryption: only the seqid matters.
        let (disk, _) = Self::read_unlocked_mode(file, true)?;
        if disk.seqid != self.seqid {
            return Err(FormatError::ConcurrentUpdate {
                expected: self.seqid,
                found: disk.seqid,
            });
        }
        Ok(())
    }

    fn binary_header(&self, copy: HeaderCopy) -> Result<BinaryHeader, FormatError> {
        let mut salt = [0u8; SALT_LEN];
        super::fill_random(&mut salt)?;
        Ok(BinaryHeader {
            copy,
            hdr_size: self.hdr_size,
            seqid: self.seqid,
            label: self.label.clone(),
            checksum_alg: CHECKSUM_ALG.into(),
            salt,
            uuid: self.uuid.clone(),
            subsystem: self.subsystem.clone(),
            hdr_offset: match copy {
                HeaderCopy::Primary => 0,
                HeaderCopy::Secondary => self.hdr_size,
            },
            csum: [0u8; CSUM_LEN],
        })
    }

    /// Writes `md` as the next seqid: primary then secondary, each fsynced.
    pub(super) fn commit(&mut self, file: &dyn HeaderIo, md: Metadata) -> Result<(), FormatError> {
        md.validate(self.hdr_size)?;
        let text = md.to_json();
        let max = json_area_size(self.hdr_size) - 1;
        if text.len() as u64 > max {
            return Err(FormatError::JsonTooLarge {
                len: text.len(),
                max,
            });
        }
        let mut next = self.clone();
        next.seqid = self
            .seqid
            .checked_add(1)
            .ok_or_else(|| FormatError::meta("seqid", "overflows"))?;
        next.metadata = md;
        next.json_text = text;
        for copy in [HeaderCopy::Primary, HeaderCopy::Secondary] {
            let bin = next.binary_header(copy)?;
            header::write_copy(file, &bin, &next.json_text)?;
        }
        *self = next;
        Ok(())
    }
}

/// Creates a new LUKS2 volume on `file`: aes-xts-plain64, one keyslot (slot 0) for
/// `passphrase`. Wipes the metadata area and fills the keyslots area with random bytes, as
/// cryptsetup does. Returns the header and the new volume key.
pub fn format(
    file: &dyn HeaderIo,
    params: &FormatParams,
    passphrase: &SecretBytes,
) -> Result<(Luks2Header, VolumeKey), FormatError> {
    let bad = |m: String| Err(FormatError::InvalidParams(m));
    if !matches!(params.key_size, 32 | 64) {
        return bad(format!(
            "key_size {} (must be 32 or 64 bytes)",
            params.key_size
        ));
    }
    if !matches!(params.sector_size, 512 | 1024 | 2048 | 4096) {
        return bad(format!("sector_size {}", params.sector_size));
    }
    if !is_allowed_hdr_size(params.hdr_size) {
        return bad(format!(
            "hdr_size {} is not an allowed size",
            params.hdr_size
        ));
    }
    if !params.keyslots_size.is_multiple_of(KEYSLOTS_ALIGN)
        || params.keyslots_size > MAX_KEYSLOTS_SIZE
        || params.keyslots_size < keyslot::area_size(params.key_size)
    {
        return bad(format!("keyslots_size {}", params.keyslots_size));
    }
    let meta_end = 2 * params.hdr_size + params.keyslots_size;
    if params.data_offset < meta_end
        || !params
            .data_offset
            .is_multiple_of(u64::from(params.sector_size))
    {
        return bad(format!(
            "data_offset {} (must be >= {meta_end} and a multiple of the sector size)",
            params.data_offset
        ));
    }
    if params.digest_iterations < 1000 {
        return bad(format!(
            "digest_iterations {} below 1000",
            params.digest_iterations
        ));
    }
    check_c_string("label", &params.label, LABEL_LEN)?;
    check_c_string("subsystem", &params.subsystem, SUBSYSTEM_LEN)?;
    let uuid = match &params.uuid {
        Some(u) => {
            if !is_uuid(u) {
                return bad(format!("uuid {u:?} is not a textual UUID"));
            }
            u.to_ascii_lowercase()
        }
        None => random_uuid()?,
    };
    params
        .kdf
        .check_creatable()
        .map_err(|e| FormatError::InvalidParams(e.to_string()))?;

    let _lock = lock(file, LockMode::Exclusive)?;
    let size = device_size(file)?;
    let needed = params.data_offset + u64::from(params.sector_size);
    if size < needed {
        return Err(FormatError::DeviceTooSmall { size, needed });
    }
    if !(size - params.data_offset).is_multiple_of(u64::from(params.sector_size)) {
        return bad(format!(
            "data area of {} bytes is not a multiple of the sector size {}",
            size - params.data_offset,
            params.sector_size
        ));
    }

    // Wipe both header copies, then random-fill the keyslots area.
    let zero = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < 2 * params.hdr_size {
        let n = usize::try_from(2 * params.hdr_size - off)
            .map_or(zero.len(), |left| left.min(zero.len()));
        write_all_at(file, &zero[..n], off, "wiping the metadata area")?;
        off += n as u64;
    }
    // The whole keyslots area of a device we are formatting (parameters checked above).
    fill_random_range(file, 2 * params.hdr_size, params.keyslots_size)?;

    let mut vk_bytes = SecretBytes::zeroed(params.key_size as usize);
    super::fill_random(vk_bytes.expose_secret_mut())?;
    let vk = VolumeKey::from_slice(vk_bytes.expose_secret());
    drop(vk_bytes);

    let ks = keyslot::create(file, 2 * params.hdr_size, &vk, passphrase, &params.kdf)?;
    let dig = digest::create(
        vk.expose_secret(),
        HashAlg::Sha256,
        params.digest_iterations,
        vec![0],
        vec![0],
    )?;
    let metadata = Metadata {
        keyslots: [(0, Keyslot::Luks2(ks))].into_iter().collect(),
        tokens: Default::default(),
        segment: Segment {
            offset: params.data_offset,
            size: SegmentSize::Dynamic,
            iv_tweak: 0,
            encryption: CIPHER.into(),
            sector_size: params.sector_size,
            flags: None,
            extra: Default::default(),
        },
        digests: [(0, dig)].into_iter().collect(),
        config: Config {
            json_size: json_area_size(params.hdr_size),
            keyslots_size: params.keyslots_size,
            flags: None,
            requirements: None,
            extra: Default::default(),
        },
        extra: Default::default(),
        reenc_segments: None,
    };
    let mut hdr = Luks2Header {
        hdr_size: params.hdr_size,
        seqid: 0, // commit writes seqid 1
        label: params.label.clone(),
        subsystem: params.subsystem.clone(),
        uuid,
        metadata: metadata.clone(),
        json_text: Vec::new(),
    };
    hdr.commit(file, metadata)?;
    Ok((hdr, vk))
}

/// Copies the metadata and keyslots area (`2*hdr_size + keyslots_size` bytes, the same extent
/// as cryptsetup's `luksHeaderBackup`) into a new file at `path` (mode 0600; refuses to
/// overwrite). Works for detached headers too.
pub fn header_backup(device: &dyn HeaderIo, path: &Path) -> Result<(), FormatError> {
    let _lock = lock(device, LockMode::Shared)?;
    let (hdr, _) = Luks2Header::read_unlocked(device)?;
    let len = hdr.metadata_end();
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| FormatError::BadBackup {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    copy_range(device, &out, 0, len)?;
    out.sync_all()
        .map_err(|e| FormatError::io("syncing the backup", 0, e))
}

/// Restores a backup made by [`header_backup`] (or cryptsetup's `luksHeaderBackup`) after
/// validating it. If the device still has a readable header, the backup must have the same UUID
/// and data offset.
pub fn header_restore(device: &dyn HeaderIo, path: &Path) -> Result<Luks2Header, FormatError> {
    header_restore_with_progress(device, path, &mut |_, _| {})
}

/// [`header_restore`], calling `progress(done, total)` (bytes) as the keyslots area is copied.
pub fn header_restore_with_progress(
    device: &dyn HeaderIo,
    path: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Luks2Header, FormatError> {
    let bad = |reason: String| FormatError::BadBackup {
        path: path.display().to_string(),
        reason,
    };
    let backup = File::open(path).map_err(|e| bad(e.to_string()))?;
    let (b, _) = Luks2Header::read_unlocked(&backup).map_err(|e| bad(e.to_string()))?;
    let len = b.metadata_end();
    let _lock = lock(device, LockMode::Exclusive)?;
    let current = Luks2Header::read_unlocked(device).ok().map(|(cur, _)| cur);
    if let Some(cur) = &current {
        if cur.uuid != b.uuid {
            return Err(bad(format!(
                "UUID {} differs from the device's {}",
                b.uuid, cur.uuid
            )));
        }
        if cur.metadata.segment.offset != b.metadata.segment.offset {
            return Err(bad(format!(
                "data offset {} differs from the device's {}",
                b.metadata.segment.offset, cur.metadata.segment.offset
            )));
        }
    }
    let size = device_size(device)?;
    if len > size {
        return Err(FormatError::DeviceTooSmall { size, needed: len });
    }
    // Ordered against a torn power cut, which keeps any subset of unsynced sectors (cryptsetup's
    // luksHeaderRestore writes everything, then syncs once, and a torn cut there can leave no
    // valid copy). First the keyslots area, synced; then the backup's header as a seqid above
    // both the device's and the backup's, secondary copy first, each copy synced by
    // `write_copy`. Until the new secondary is durable the old primary is intact; from then on
    // the new secondary outranks it; so some complete copy survives at every point.
    let keyslots_start = 2 * b.hdr_size;
    copy_range_with_progress(&backup, device, keyslots_start, len, progress)?;
    device
        .sync_durable()
        .map_err(|e| FormatError::io("syncing the restored keyslots area", keyslots_start, e))?;
    let mut restored = b.clone();
    restored.seqid = current
        .map_or(b.seqid, |cur| cur.seqid.max(b.seqid))
        .checked_add(1)
        .ok_or_else(|| FormatError::meta("seqid", "overflows"))?;
    for copy in [HeaderCopy::Secondary, HeaderCopy::Primary] {
        let bin = restored.binary_header(copy)?;
        header::write_copy(device, &bin, &restored.json_text)?;
    }
    let (hdr, _) = Luks2Header::read_unlocked(device)?;
    Ok(hdr)
}

// ---- helpers ------------------------------------------------------------------------------------

/// Copies bytes `[start, end)` of `from` to the same offsets of `to`.
fn copy_range(
    from: &dyn HeaderIo,
    to: &dyn HeaderIo,
    start: u64,
    end: u64,
) -> Result<(), FormatError> {
    copy_range_with_progress(from, to, start, end, &mut |_, _| {})
}

/// [`copy_range`], calling `progress(copied, end - start)` after each MiB.
fn copy_range_with_progress(
    from: &dyn HeaderIo,
    to: &dyn HeaderIo,
    start: u64,
    end: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), FormatError> {
    let len = end;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = start;
    while off < len {
        let n = usize::try_from((len - off).min(buf.len() as u64)).unwrap_or(buf.len());
        read_exact_at(from, &mut buf[..n], off, "reading header for copy")?;
        write_all_at(to, &buf[..n], off, "writing header copy")?;
        off += n as u64;
        progress(off - start, end.saturating_sub(start));
    }
    Ok(())
}

/// Wipes the former area `[offset, offset+len)` of keyslot `slot` after proving it safe against
/// `md`, the metadata that no longer contains that area (a keyslot still naming it counts as an
/// overlap): it must lie inside the keyslots area
/// (after both JSON areas, before the end of `config.keyslots_size`), before the data segment,
/// and overlap no keyslot `md` still has (whatever its type). Anything else is refused: a
/// header names the area, and the header is the attacker's.
pub(super) fn wipe_keyslot_area(
    file: &dyn HeaderIo,
    md: &Metadata,
    hdr_size: u64,
    slot: u32,
    offset: u64,
    len: u64,
) -> Result<(), FormatError> {
    let refuse = |reason: String| FormatError::UnsafeWipe {
        what: format!("keyslot {slot}'s area"),
        offset,
        len,
        reason,
    };
    if len == 0 {
        return Err(refuse("the area is empty".into()));
    }
    let end = offset
        .checked_add(len)
        .ok_or_else(|| refuse("offset + size overflows".into()))?;
    let start = 2 * hdr_size;
    let area_end = start.saturating_add(md.config.keyslots_size);
    if offset < start || end > area_end {
        return Err(refuse(format!(
            "not inside the keyslots area [{start}, {area_end})"
        )));
    }
    if md.segment.offset != 0 && end > md.segment.offset {
        return Err(refuse(format!(
            "reaches into the data segment at {}",
            md.segment.offset
        )));
    }
    for (id, ks) in &md.keyslots {
        if let Some((o, s)) = ks.area_extent() {
            if offset < o.saturating_add(s) && o < end {
                return Err(refuse(format!("overlaps keyslot {id}'s area [{o}, +{s})")));
            }
        }
    }
    fill_random_range(file, offset, len)
}

/// Overwrites `[offset, offset+len)` with random bytes and fsyncs. Callers prove the range safe:
/// [`format`] (the keyslots area of the device it formats) and [`wipe_keyslot_area`].
fn fill_random_range(file: &dyn HeaderIo, offset: u64, len: u64) -> Result<(), FormatError> {
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from((len - done).min(buf.len() as u64)).unwrap_or(buf.len());
        super::fill_random(&mut buf[..n])?;
        write_all_at(file, &buf[..n], offset + done, "wiping keyslot area")?;
        done += n as u64;
    }
    file.sync_durable()
        .map_err(|e| FormatError::io("syncing wiped area", offset, e))
}

fn free_id<'a>(used: impl Iterator<Item = &'a u32> + Clone, max: u32) -> Option<u32> {
    (0..max).find(|id| !used.clone().any(|u| u == id))
}

fn check_c_string(field: &str, s: &str, len: usize) -> Result<(), FormatError> {
    if s.len() >= len || s.as_bytes().contains(&0) {
        return Err(FormatError::InvalidParams(format!(
            "{field} must be at most {} bytes without NUL",
            len - 1
        )));
    }
    Ok(())
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

fn random_uuid() -> Result<String, FormatError> {
    let mut b = [0u8; 16];
    super::fill_random(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn the_area_wipe_refuses_anything_not_proven_a_free_keyslot_area() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.img");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .unwrap();
        f.set_len(DEFAULT_DATA_OFFSET + (1 << 20)).unwrap();
        let mut params = FormatParams::new(KdfParams::Pbkdf2 {
            hash: HashAlg::Sha256,
            iterations: 1000,
        });
        params.digest_iterations = 1000;
        let (h, _) = format(&f, &params, &SecretBytes::from_slice(b"pw")).unwrap();
        let data = vec![0x5au8; 1 << 20];
        f.write_all_at(&data, DEFAULT_DATA_OFFSET).unwrap();
        let md = &h.metadata;
        let (s0_off, s0_len) = md.keyslots[&0].area_extent().unwrap();
        let hs = h.hdr_size;
        for (off, len, why) in [
            (DEFAULT_DATA_OFFSET, 1 << 30, "not inside the keyslots area"),
            (
                DEFAULT_DATA_OFFSET - 4096,
                8192,
                "not inside the keyslots area",
            ),
            (0, 4096, "not inside the keyslots area"),
            (s0_off, s0_len, "overlaps keyslot 0"),
            (s0_off + s0_len - 512, 4096, "overlaps keyslot 0"),
            (u64::MAX - 10, 4096, "overflows"),
            (1 << 20, 0, "empty"),
        ] {
            let e = wipe_keyslot_area(&f, md, hs, 7, off, len).unwrap_err();
            assert!(
                matches!(e, FormatError::UnsafeWipe { .. }) && e.to_string().contains(why),
                "{off}+{len}: {e}"
            );
        }
        // The slot being wiped must no longer own the area in the metadata.
        let e = wipe_keyslot_area(&f, md, hs, 0, s0_off, s0_len).unwrap_err();
        assert!(e.to_string().contains("overlaps keyslot 0"), "{e}");
        let mut back = vec![0u8; 1 << 20];
        f.read_exact_at(&mut back, DEFAULT_DATA_OFFSET).unwrap();
        assert_eq!(back, data, "a refused wipe wrote to the data segment");
        // A free area inside the keyslots area is wiped.
        wipe_keyslot_area(&f, md, hs, 7, 1 << 20, 4096).unwrap();
    }

    #[test]
    fn random_uuids_are_lowercase_v4() {
        let u = random_uuid().unwrap();
        assert!(is_uuid(&u));
        assert_eq!(&u[14..15], "4");
        assert_eq!(u, u.to_ascii_lowercase());
    }
}
