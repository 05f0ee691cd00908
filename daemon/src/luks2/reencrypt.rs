//! Volume-key re-encryption in cryptsetup's LUKS2 on-disk format (`online-reencrypt-v2`,
//! mode `reencrypt`, direction `forward`, no data shift), so that a re-encryption we start can be
//! finished by `cryptsetup reencrypt --resume-only` and one cryptsetup started can be finished
//! here. Reference: `shared/docs/luks2-format.md` §10 and cryptsetup's `lib/luks2/luks2_reencrypt*.c`.
//!
//! # What is on disk while a re-encryption runs
//!
//! - `config.requirements.mandatory = ["online-reencrypt-v2"]`: older tools refuse the volume.
//! - a keyslot of type `reencrypt` (`key_size` 1, `priority` 0, `mode`, `direction`) whose `area`
//!   is the *resilience area* in the keyslots area: `checksum` (one hash of the old ciphertext per
//!   `sector_size` block of the hot zone), `journal` (a copy of the hot zone's old ciphertext) or
//!   `none`;
//! - regular segments `0..k` describing the device now: `[new-key crypt of the first F bytes]`,
//!   optionally a hot zone flagged `in-reencryption` (only after a crash), `[old-key crypt of the
//!   rest]`, each with `iv_tweak` = its position in 512-byte units, then the `backup-previous`
//!   (old layout) and `backup-final` (new layout) segments;
//! - the old key's digest covering the old segments and `backup-previous`, the new key's digest
//!   covering the new segments and `backup-final`, and a third digest bound to the `reencrypt`
//!   keyslot: PBKDF2 over `"v2"`, both volume keys and the critical fields (keyslot mode,
//!   direction, area; both backup segments). Without both keys nobody can forge it, so a header
//!   whose digest does not verify is refused ([`ReencState::verify_digest`]; cryptsetup's
//!   CVE-2021-4122 fix).
//!
//! # One hot-zone step (what [`Reencryption::step`] does, cryptsetup's order)
//!
//! 1. read the old ciphertext of `[F, F+L)`;
//! 2. write the resilience data (checksums or journal copy) to the area, then commit the header
//!    with the zone flagged `in-reencryption` (skipped for `none`);
//! 3. decrypt with the old key, encrypt with the new one, write, sync the data;
//! 4. commit the header with the new frontier `F+L`.
//!
//! A crash between 2 and 4 leaves the hot-zone flag; [`Reencryption::recover`] then redoes the
//! zone exactly as cryptsetup does: `checksum` re-encrypts each block whose current content still
//! hashes to the recorded old ciphertext (the others were already written), `journal` rewrites
//! the whole zone from the copy, `none` cannot recover (refused, as cryptsetup).
//!
//! # Driving it from an online caller (the daemon)
//!
//! ```text
//! let mut r = Reencryption::open_with_keys(&meta_file, old_key, new_key)?  // or start(...)
//! let io = BlockIo(&*inner_device);     // data I/O through the caller's device / fail-stop latch
//! r.recover(&meta_file, &io)?;          // if r.hot_zone().is_some(): before serving that range
//! loop {
//!     let Some(zone) = r.next_zone() else { break };   // byte range relative to the data start
//!     // take the crypt layer's range lock for `zone` (client I/O in it waits) ...
//!     r.step(&meta_file, &io)?;                        // ... and release it afterwards
//!     // below r.frontier(): new key (r.new_key(), r.new_sector_size()); above: old key
//! }
//! let hdr = r.finish(&meta_file)?;      // old keyslots/digest gone, one segment again
//! ```
//!
//! Every step persists its progress before returning (step 4), so stopping between steps is a
//! clean interruption that `open*` resumes. The engine never holds the header lock between
//! calls; it takes it around each header commit and checks the seqid (nobody else may have
//! written). Allocations are bounded by our hot-zone size ([`MAX_HOTZONE`]) and, for recovery of
//! a zone someone else wrote, by [`RECOVERY_CHUNK`], whatever the header says.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::ops::Range;

use serde_json::{Map, Value};
use zeroize::Zeroize;

use super::digest;
use super::error::FormatError;
use super::header::{device_size, read_exact_at, write_all_at};
use super::keyslot;
use super::layout::{KEYSLOTS_ALIGN, MAX_KEYSLOTS, MAX_KEYSLOTS_SIZE};
use super::lock::{lock, LockMode};
use super::metadata::{DigestEntry, Keyslot, Metadata, Segment, SegmentSize, CIPHER};
use super::volume::{wipe_keyslot_area, Luks2Header};
use super::HeaderIo;
use crate::block::BlockDevice;
use crate::crypto::block_hash;
use crate::crypto::kdf::{HashAlg, KdfLimits, KdfParams};
use crate::crypto::keys::{SecretBytes, VolumeKey};
use crate::crypto::xts::SectorCipher;

/// The only re-encryption requirement we implement (cryptsetup's current one).
pub const REQUIREMENT: &str = "online-reencrypt-v2";
/// cryptsetup's hard limit on a hot zone; a header claiming a larger one is refused.
pub const MAX_HEADER_HOTZONE: u64 = 1 << 30;
/// Largest hot zone we process in one step (one buffer of this size is allocated).
pub const MAX_HOTZONE: u64 = 256 << 20;
/// Hot zone used when the caller asks for none (capped by what the resilience area holds).
pub const DEFAULT_HOTZONE: u64 = 64 << 20;
/// Hot zone for `none` resilience when the caller asks for none (cryptsetup: 20 MiB).
pub const DEFAULT_NONE_HOTZONE: u64 = 20 << 20;
/// Crash recovery works through a hot zone in pieces of this size.
pub const RECOVERY_CHUNK: u64 = 4 << 20;
/// Largest checksum block we accept from a header (cryptsetup uses the device block size).
const MAX_CHECKSUM_BLOCK: u32 = 64 << 10;
/// Checksum block we write: cryptsetup's value for files and 4K devices.
const CHECKSUM_BLOCK: u32 = 4096;
/// Token type of our record of a running re-encryption: `{"type":"nbdcrypt-reencrypt",
/// "keyslots":[],"max_rate":<bytes/s>}` (see [`Reencryption::max_rate`]); removed at finish.
pub const JOB_TOKEN: &str = "nbdcrypt-reencrypt";
/// Smallest rate cap taken from a header (64 KiB/s).
pub const MIN_RECORDED_RATE: u64 = 64 << 10;
/// Token type recording when a volume key was created (see [`KeyAge`]).
pub const KEY_AGE_TOKEN: &str = "nbdcrypt-volume-key";
/// PBKDF2 iterations of the re-encryption digest (cryptsetup's minimum: the digest is keyed by
/// both volume keys, so its cost adds nothing).
const REENC_DIGEST_ITERATIONS: u32 = 1000;

// ---- requirement check (called by metadata.rs) --------------------------------------------

/// For a header with re-encryption markers: the mandatory requirements must be exactly
/// `online-reencrypt-v2`. Anything else is refused with what to do.
pub(crate) fn check_requirements(top: &Map<String, Value>) -> Result<(), FormatError> {
    let list: Vec<String> = top
        .get("config")
        .and_then(|c| c.get("requirements"))
        .and_then(|r| r.get("mandatory"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    match list.as_slice() {
        [one] if one == REQUIREMENT => Ok(()),
        [] => Err(FormatError::meta(
            "config.requirements",
            "re-encryption metadata (reencrypt keyslot or backup segments) without the \
             online-reencrypt-v2 requirement",
        )),
        _ if list.iter().any(|r| r == "online-reencrypt-v3") => Err(FormatError::Unsupported(
            "requirement online-reencrypt-v3 (decryption with a data shift); finish it with \
             `cryptsetup reencrypt --resume-only`"
                .into(),
        )),
        _ if list.iter().any(|r| r == "online-reencrypt") => Err(FormatError::Unsupported(
            "obsolete requirement online-reencrypt (v1); run `cryptsetup repair` first".into(),
        )),
        _ => Err(FormatError::UnmetRequirements(list)),
    }
}

// ---- the state ----------------------------------------------------------------------------

/// How a hot zone is protected against a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resilience {
    /// Nothing: a crash inside a zone loses it (only when asked for).
    None,
    /// One `hash` of the old ciphertext per `block_size` bytes of the zone (cryptsetup's default).
    Checksum { hash: HashAlg, block_size: u32 },
    /// A copy of the zone's old ciphertext in the resilience area.
    Journal,
}

impl Resilience {
    pub fn name(&self) -> &'static str {
        match self {
            Resilience::None => "none",
            Resilience::Checksum { .. } => "checksum",
            Resilience::Journal => "journal",
        }
    }

    /// `"checksum"` (sha256, 4096-byte blocks), `"journal"` or `"none"`.
    pub fn from_name(name: &str) -> Option<Resilience> {
        match name {
            "checksum" => Some(Resilience::Checksum {
                hash: HashAlg::Sha256,
                block_size: CHECKSUM_BLOCK,
            }),
            "journal" => Some(Resilience::Journal),
            "none" => Some(Resilience::None),
            _ => None,
        }
    }
}

/// A validated re-encryption state (structure only; [`ReencState::verify_digest`] checks it
/// against both keys). Offsets are relative to the data start unless named `*_offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReencState {
    /// Id of the `reencrypt` keyslot.
    pub keyslot: u32,
    pub resilience: Resilience,
    /// Resilience area: absolute offset and size in the keyslots area.
    pub area_offset: u64,
    pub area_size: u64,
    /// Absolute byte offset of the data (same for old and new layout: no data shift).
    pub data_offset: u64,
    /// Bytes of data (device size minus `data_offset`).
    pub data_size: u64,
    pub old_sector_size: u32,
    pub new_sector_size: u32,
    /// `[0, frontier)` is under the new key.
    pub frontier: u64,
    /// `Some(len)`: a crash left the zone `[frontier, frontier+len)` half done (`in-reencryption`).
    pub hot_len: Option<u64>,
    pub old_digest: u32,
    pub new_digest: u32,
    pub reenc_digest: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    New,
    Hot,
    Old,
}

fn unsupported(what: impl Into<String>) -> FormatError {
    FormatError::Unsupported(format!(
        "{}; finish this re-encryption with `cryptsetup reencrypt --resume-only`",
        what.into()
    ))
}

fn has_flag(s: &Segment, flag: &str) -> bool {
    s.flags.as_deref().unwrap_or(&[]).iter().any(|f| f == flag)
}

/// The `reencrypt` keyslot's own members, parsed from its raw JSON.
struct ReencKeyslot {
    mode: String,
    direction: String,
    area_type: String,
    offset: u64,
    size: u64,
    hash: Option<String>,
    sector_size: Option<u32>,
}

fn raw_str<'a>(o: &'a Map<String, Value>, key: &str, path: &str) -> Result<&'a str, FormatError> {
    let s = o
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| FormatError::meta(format!("{path}.{key}"), "missing or not a string"))?;
    // cryptsetup's digest serialization takes 1..=64 bytes.
    if s.is_empty() || s.len() > 64 {
        return Err(FormatError::meta(
            format!("{path}.{key}"),
            "empty or longer than 64 bytes",
        ));
    }
    Ok(s)
}

fn raw_u64(o: &Map<String, Value>, key: &str, path: &str) -> Result<u64, FormatError> {
    let s = o
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| FormatError::meta(format!("{path}.{key}"), "missing or not a string"))?;
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FormatError::meta(
            format!("{path}.{key}"),
            "not a decimal number",
        ));
    }
    s.parse()
        .map_err(|_| FormatError::meta(format!("{path}.{key}"), "out of range"))
}

fn raw_u32_num(o: &Map<String, Value>, key: &str, path: &str) -> Result<u32, FormatError> {
    o.get(key)
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| {
            FormatError::meta(format!("{path}.{key}"), "missing or not a 32-bit integer")
        })
}

fn parse_reenc_keyslot(raw: &Map<String, Value>, id: u32) -> Result<ReencKeyslot, FormatError> {
    let path = format!("keyslots.{id}");
    if raw_u32_num(raw, "key_size", &path)? != 1 {
        return Err(FormatError::meta(format!("{path}.key_size"), "must be 1"));
    }
    let mode = raw_str(raw, "mode", &path)?.to_string();
    let direction = raw_str(raw, "direction", &path)?.to_string();
    let apath = format!("{path}.area");
    let area = raw
        .get("area")
        .and_then(Value::as_object)
        .ok_or_else(|| FormatError::meta(apath.clone(), "missing"))?;
    let area_type = raw_str(area, "type", &apath)?.to_string();
    let offset = raw_u64(area, "offset", &apath)?;
    let size = raw_u64(area, "size", &apath)?;
    let (mut hash, mut sector_size) = (None, None);
    if area_type == "checksum" {
        hash = Some(raw_str(area, "hash", &apath)?.to_string());
        sector_size = Some(raw_u32_num(area, "sector_size", &apath)?);
    }
    Ok(ReencKeyslot {
        mode,
        direction,
        area_type,
        offset,
        size,
        hash,
        sector_size,
    })
}

impl ReencState {
    /// Checks what a header in re-encryption says, against the device size: exactly the states
    /// cryptsetup's forward re-key goes through, nothing else. `md` must come from
    /// `Metadata::parse_area_reencrypt` (a normal header is "not in re-encryption").
    pub fn from_header(hdr: &Luks2Header, device_size: u64) -> Result<ReencState, FormatError> {
        Self::parse(&hdr.metadata, device_size)
    }

    pub(crate) fn parse(md: &Metadata, device_size: u64) -> Result<ReencState, FormatError> {
        let segs = md.reenc_segments.as_ref().ok_or_else(|| {
            FormatError::InvalidParams("the volume is not being re-encrypted".into())
        })?;
        // The reencrypt keyslot.
        let mut found = None;
        for (&id, ks) in &md.keyslots {
            if let Keyslot::Other { type_name, raw, .. } = ks {
                if type_name == "reencrypt" {
                    if found.is_some() {
                        return Err(FormatError::meta(
                            "keyslots",
                            "more than one reencrypt keyslot",
                        ));
                    }
                    found = Some((id, raw));
                }
            }
        }
        let (keyslot, raw) =
            found.ok_or_else(|| FormatError::meta("keyslots", "no reencrypt keyslot"))?;
        let ks = parse_reenc_keyslot(raw, keyslot)?;
        match ks.mode.as_str() {
            "reencrypt" => {}
            "encrypt" | "decrypt" => {
                return Err(unsupported(format!(
                    "re-encryption mode {:?} (nbdcrypt does mode \"reencrypt\" only)",
                    ks.mode
                )))
            }
            m => {
                return Err(FormatError::meta(
                    format!("keyslots.{keyslot}.mode"),
                    format!("unknown mode {m:?}"),
                ))
            }
        }
        match ks.direction.as_str() {
            "forward" => {}
            "backward" => {
                return Err(unsupported(
                    "direction \"backward\" (nbdcrypt does \"forward\")",
                ))
            }
            d => {
                return Err(FormatError::meta(
                    format!("keyslots.{keyslot}.direction"),
                    format!("unknown direction {d:?}"),
                ))
            }
        }
        let resilience = match ks.area_type.as_str() {
            "none" => Resilience::None,
            "journal" => Resilience::Journal,
            "checksum" => {
                let name = ks.hash.as_deref().unwrap_or("");
                let hash = HashAlg::from_name(name)
                    .ok_or_else(|| unsupported(format!("checksum hash {name:?}")))?;
                let block_size = ks.sector_size.unwrap_or(0);
                if !block_size.is_power_of_two()
                    || !(512..=MAX_CHECKSUM_BLOCK).contains(&block_size)
                {
                    return Err(FormatError::meta(
                        format!("keyslots.{keyslot}.area.sector_size"),
                        format!("{block_size} is not a power of two in 512..={MAX_CHECKSUM_BLOCK}"),
                    ));
                }
                Resilience::Checksum { hash, block_size }
            }
            t if t.starts_with("datashift") => {
                return Err(unsupported(format!("resilience {t:?} (data shift)")))
            }
            t => {
                return Err(FormatError::meta(
                    format!("keyslots.{keyslot}.area.type"),
                    format!("unknown resilience {t:?}"),
                ))
            }
        };
        // The area itself was checked by Metadata::validate (inside the keyslots area, no
        // overlap); these are its values again from the raw JSON, which must agree.
        if md.keyslots.get(&keyslot).and_then(Keyslot::area_extent) != Some((ks.offset, ks.size)) {
            return Err(FormatError::meta(
                format!("keyslots.{keyslot}.area"),
                "inconsistent",
            ));
        }

        // Segments: backups after the regular ones 0..k.
        let mut prev = None;
        let mut fin = None;
        let mut regular = Vec::new();
        for (&id, s) in segs {
            if has_flag(s, "backup-moved-segment") {
                return Err(unsupported("a backup-moved-segment (data shift)"));
            }
            let p = has_flag(s, "backup-previous");
            let f = has_flag(s, "backup-final");
            match (p, f) {
                (true, true) => {
                    return Err(FormatError::meta(
                        format!("segments.{id}.flags"),
                        "both backup-previous and backup-final",
                    ))
                }
                (true, false) if prev.replace((id, s)).is_some() => {
                    return Err(FormatError::meta(
                        "segments",
                        "two backup-previous segments",
                    ))
                }
                (false, true) if fin.replace((id, s)).is_some() => {
                    return Err(FormatError::meta("segments", "two backup-final segments"))
                }
                (false, false) => regular.push((id, s)),
                _ => {}
            }
        }
        let (prev_id, prev) =
            prev.ok_or_else(|| FormatError::meta("segments", "no backup-previous segment"))?;
        let (fin_id, fin) =
            fin.ok_or_else(|| FormatError::meta("segments", "no backup-final segment"))?;
        let k = regular.len();
        if k == 0
            || k > 3
            || regular
                .iter()
                .enumerate()
                .any(|(i, (id, _))| *id as usize != i)
        {
            return Err(FormatError::meta(
                "segments",
                "regular segments must be 0..k (k = 1..3) before the backups",
            ));
        }
        if prev_id.min(fin_id) as usize != k || prev_id.max(fin_id) as usize != k + 1 {
            return Err(FormatError::meta(
                "segments",
                "backup segments must follow the regular ones",
            ));
        }
        for (name, s) in [("backup-previous", prev), ("backup-final", fin)] {
            if s.iv_tweak != 0 || s.size != SegmentSize::Dynamic {
                return Err(unsupported(format!(
                    "a {name} segment with a fixed size or iv_tweak (--device-size)"
                )));
            }
        }
        if prev.offset != fin.offset {
            return Err(unsupported("old and new data offsets differ (data shift)"));
        }
        let data_offset = prev.offset;
        if data_offset == 0 {
            return Err(FormatError::DetachedHeader {
                reason: "data segment offset is 0".into(),
            });
        }
        let data_size = device_size
            .checked_sub(data_offset)
            .filter(|n| *n > 0)
            .ok_or_else(|| FormatError::Truncated {
                what: "data segment".into(),
                end: data_offset,
                size: device_size,
            })?;
        let (old_ss, new_ss) = (prev.sector_size, fin.sector_size);
        let align = u64::from(old_ss.max(new_ss));
        if !data_size.is_multiple_of(align) {
            return Err(FormatError::Unsupported(format!(
                "data area of {data_size} bytes is not a multiple of the sector size {align}"
            )));
        }

        // Digests.
        let digest_with_segment = |sid: u32| {
            md.digests
                .iter()
                .filter(|(_, d)| d.segments.contains(&sid))
                .map(|(i, _)| *i)
                .collect::<Vec<u32>>()
        };
        let one = |v: Vec<u32>, what: &str| match v.as_slice() {
            [d] => Ok(*d),
            _ => Err(FormatError::meta(
                "digests",
                format!("{what} must be covered by exactly one digest"),
            )),
        };
        let old_digest = one(digest_with_segment(prev_id), "backup-previous")?;
        let new_digest = one(digest_with_segment(fin_id), "backup-final")?;
        if old_digest == new_digest {
            return Err(unsupported(
                "old and new volume key are the same (sector-size change only)",
            ));
        }
        let reenc_digest = md
            .digest_of_keyslot(keyslot)
            .map(|(i, _)| i)
            .ok_or_else(|| {
                FormatError::meta(format!("keyslots.{keyslot}"), "no re-encryption digest")
            })?;
        let covers_none = md
            .digests
            .get(&reenc_digest)
            .is_some_and(|d| d.segments.is_empty());
        if reenc_digest == old_digest || reenc_digest == new_digest || !covers_none {
            return Err(FormatError::meta(
                format!("digests.{reenc_digest}"),
                "the re-encryption digest must cover no segment",
            ));
        }

        // Regular segments: contiguous from the data start, new < hot < old.
        let mut kinds = Vec::with_capacity(k);
        let mut pos = data_offset;
        let mut hot_len = None;
        let mut frontier = None;
        for (i, (id, s)) in regular.iter().enumerate() {
            let covers = |d: u32| md.digests.get(&d).is_some_and(|d| d.segments.contains(id));
            let (in_old, in_new) = (covers(old_digest), covers(new_digest));
            let kind = if has_flag(s, "in-reencryption") {
                Kind::Hot
            } else {
                match (in_new, in_old) {
                    (true, false) => Kind::New,
                    (false, true) => Kind::Old,
                    _ => {
                        return Err(FormatError::meta(
                            format!("segments.{id}"),
                            "bound to neither or both keys",
                        ))
                    }
                }
            };
            if kinds.last().is_some_and(|&last| last >= kind) {
                return Err(FormatError::meta(
                    "segments",
                    "segments out of order (new, hot, old)",
                ));
            }
            let rel = pos - data_offset;
            if s.offset != pos || s.iv_tweak != rel / 512 {
                return Err(FormatError::meta(
                    format!("segments.{id}"),
                    format!("offset/iv_tweak do not continue at {pos}"),
                ));
            }
            let want_ss = if kind == Kind::Old { old_ss } else { new_ss };
            if s.sector_size != want_ss {
                return Err(FormatError::meta(
                    format!("segments.{id}.sector_size"),
                    "does not match its backup segment",
                ));
            }
            let len = match s.size {
                SegmentSize::Bytes(n) => n,
                SegmentSize::Dynamic if i + 1 == k => device_size - pos,
                SegmentSize::Dynamic => {
                    return Err(FormatError::meta(
                        format!("segments.{id}.size"),
                        "only the last segment may be dynamic",
                    ))
                }
            };
            pos = pos
                .checked_add(len)
                .filter(|e| *e <= device_size)
                .ok_or_else(|| FormatError::Truncated {
                    what: format!("segment {id}"),
                    end: pos.saturating_add(len),
                    size: device_size,
                })?;
            match kind {
                Kind::New => frontier = Some(rel + len),
                Kind::Hot => {
                    frontier = Some(rel);
                    hot_len = Some(len);
                }
                Kind::Old => {
                    frontier.get_or_insert(rel);
                }
            }
            kinds.push(kind);
        }
        if pos != device_size {
            return Err(FormatError::meta(
                "segments",
                format!("segments end at {pos}, the device at {device_size}"),
            ));
        }
        let frontier = frontier.unwrap_or(0);
        if let Some(len) = hot_len {
            if len > MAX_HEADER_HOTZONE || !len.is_multiple_of(align) {
                return Err(FormatError::meta(
                    "segments",
                    format!(
                        "hot zone of {len} bytes (limit {MAX_HEADER_HOTZONE}, multiple of {align})"
                    ),
                ));
            }
            let needed = match resilience {
                Resilience::Checksum { hash, block_size } => {
                    (len / u64::from(block_size)) * hash.output_len() as u64
                }
                Resilience::Journal => len,
                Resilience::None => 0,
            };
            if needed > ks.size {
                return Err(FormatError::meta(
                    format!("keyslots.{keyslot}.area"),
                    format!("{} bytes cannot protect a {len}-byte hot zone", ks.size),
                ));
            }
        }
        Ok(ReencState {
            keyslot,
            resilience,
            area_offset: ks.offset,
            area_size: ks.size,
            data_offset,
            data_size,
            old_sector_size: old_ss,
            new_sector_size: new_ss,
            frontier,
            hot_len,
            old_digest,
            new_digest,
            reenc_digest,
        })
    }

    /// True if `old` and `new` are the two volume keys and the re-encryption metadata is the
    /// one they were bound to (cryptsetup's "reencryption metadata digest").
    pub(crate) fn verify_digest(
        &self,
        md: &Metadata,
        old: &VolumeKey,
        new: &VolumeKey,
    ) -> Result<(), FormatError> {
        let d = md
            .digests
            .get(&self.reenc_digest)
            .ok_or_else(|| FormatError::meta("digests", "no re-encryption digest"))?;
        if d.iterations > KdfLimits::default().max_pbkdf2_iterations {
            return Err(FormatError::meta(
                format!("digests.{}", self.reenc_digest),
                "too many iterations",
            ));
        }
        let data = verification_data(md, self.keyslot, old, new)?;
        if digest::verify(d, data.expose_secret()) {
            Ok(())
        } else {
            Err(FormatError::meta(
                format!("digests.{}", self.reenc_digest),
                "the re-encryption metadata digest does not verify: the header was changed by \
                 someone without the volume keys (refused, as cryptsetup does since CVE-2021-4122)",
            ))
        }
    }
}

/// cryptsetup's verification data: `"v2"`, old key, new key, the reencrypt keyslot's mode,
/// direction and area, then the backup-previous and backup-final segments.
fn verification_data(
    md: &Metadata,
    keyslot: u32,
    old: &VolumeKey,
    new: &VolumeKey,
) -> Result<SecretBytes, FormatError> {
    let mut v: Vec<u8> = Vec::with_capacity(512);
    v.extend_from_slice(b"v2");
    v.extend_from_slice(old.expose_secret());
    v.extend_from_slice(new.expose_secret());
    let raw = match md.keyslots.get(&keyslot) {
        Some(Keyslot::Other { raw, .. }) => raw,
        _ => return Err(FormatError::meta("keyslots", "no reencrypt keyslot")),
    };
    let ks = parse_reenc_keyslot(raw, keyslot)?;
    for s in [&ks.mode, &ks.direction, &ks.area_type] {
        v.extend_from_slice(s.as_bytes());
    }
    v.extend_from_slice(&ks.offset.to_be_bytes());
    v.extend_from_slice(&ks.size.to_be_bytes());
    if ks.area_type == "checksum" {
        v.extend_from_slice(ks.hash.as_deref().unwrap_or("").as_bytes());
        v.extend_from_slice(&ks.sector_size.unwrap_or(0).to_be_bytes());
    }
    let segs = md
        .reenc_segments
        .as_ref()
        .ok_or_else(|| FormatError::meta("segments", "not in re-encryption"))?;
    for flag in ["backup-previous", "backup-final"] {
        let s = segs
            .values()
            .find(|s| has_flag(s, flag))
            .ok_or_else(|| FormatError::meta("segments", format!("no {flag} segment")))?;
        v.extend_from_slice(b"crypt");
        v.extend_from_slice(&s.offset.to_be_bytes());
        match s.size {
            SegmentSize::Dynamic => v.extend_from_slice(b"dynamic"),
            SegmentSize::Bytes(n) => v.extend_from_slice(&n.to_be_bytes()),
        }
        v.extend_from_slice(&s.iv_tweak.to_be_bytes());
        v.extend_from_slice(s.encryption.as_bytes());
        v.extend_from_slice(&s.sector_size.to_be_bytes());
    }
    Ok(SecretBytes::from_vec(v))
}

// ---- data I/O -----------------------------------------------------------------------------

/// Raw (ciphertext) I/O on the data device, at absolute byte offsets. The engine calls it only
/// inside the zone it is working on. An online caller implements it over its own block device
/// (so the fail-stop latch sees every error); [`FileIo`] and [`BlockIo`] are ready-made.
pub trait ZoneIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every write so far durable.
    fn sync(&self) -> io::Result<()>;
    /// The same I/O, callable from several threads at once: the engine then reads and writes
    /// each thread's share of a zone from that thread, chunk by chunk, while the chunk is in
    /// the cache. `None` (the default): the engine does all I/O of a zone from the calling
    /// thread, in one read and one write (the online path, whose I/O goes through the daemon's
    /// latch and range locks).
    fn parallel(&self) -> Option<&(dyn ZoneIo + Sync)> {
        None
    }
    /// Bytes per read or write the engine issues on the parallel path (rounded to its
    /// cache-sized crypto pieces of 256 KiB).
    fn io_chunk(&self) -> usize {
        256 << 10
    }
}

/// [`ZoneIo`] on a file or block device opened read-write.
pub struct FileIo<'a>(pub &'a File);

impl ZoneIo for FileIo<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self.0, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self.0, buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn parallel(&self) -> Option<&(dyn ZoneIo + Sync)> {
        Some(self)
    }
}

/// O_DIRECT needs the buffer, offset and length aligned to the logical block size; 4096 covers
/// every device we expect (a smaller logical block size divides it).
pub const DIRECT_ALIGN: usize = 4096;

/// [`ZoneIo`] for an offline run: the data area through a second descriptor opened with
/// O_DIRECT (no page-cache copy of the data on the way in or out), the buffered descriptor for
/// anything unaligned, and everything if the file system refuses O_DIRECT. The header and the
/// resilience area stay on the caller's buffered descriptor. The engine hands it page-aligned
/// buffers and zone-aligned offsets, so on a disk or block device every data I/O bypasses the
/// page cache. On tmpfs O_DIRECT is accepted (Linux 6.6 and later) but still copies through the
/// page cache: there it changes nothing.
pub struct DirectFileIo<'a> {
    buffered: &'a File,
    direct: Option<File>,
}

impl<'a> DirectFileIo<'a> {
    /// Opens the file behind `buffered` a second time with O_DIRECT, through
    /// `/proc/self/fd/N` (never by path, so a name swapped meanwhile cannot point it at another
    /// file); falls back to `buffered` alone when that is refused.
    pub fn open(buffered: &'a File) -> DirectFileIo<'a> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", buffered.as_raw_fd()))
            .ok()
            // Belt and braces: the same file.
            .filter(|d| same_file(d, buffered));
        DirectFileIo { buffered, direct }
    }

    /// Whether data I/O bypasses the page cache (O_DIRECT was accepted).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    fn pick(&self, len: usize, offset: u64, addr: usize) -> &File {
        match &self.direct {
            Some(d)
                if len.is_multiple_of(DIRECT_ALIGN)
                    && offset.is_multiple_of(DIRECT_ALIGN as u64)
                    && addr.is_multiple_of(DIRECT_ALIGN) =>
            {
                d
            }
            _ => self.buffered,
        }
    }
}

fn same_file(a: &File, b: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.metadata(), b.metadata()) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

impl ZoneIo for DirectFileIo<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let f = self.pick(buf.len(), offset, buf.as_ptr() as usize);
        match std::os::unix::fs::FileExt::read_exact_at(f, buf, offset) {
            // A device whose logical block is larger than DIRECT_ALIGN: the buffered path.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !std::ptr::eq(f, self.buffered) => {
                std::os::unix::fs::FileExt::read_exact_at(self.buffered, buf, offset)
            }
            r => r,
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let f = self.pick(buf.len(), offset, buf.as_ptr() as usize);
        match std::os::unix::fs::FileExt::write_all_at(f, buf, offset) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !std::ptr::eq(f, self.buffered) => {
                std::os::unix::fs::FileExt::write_all_at(self.buffered, buf, offset)
            }
            r => r,
        }
    }
    fn sync(&self) -> io::Result<()> {
        // fdatasync covers the inode whichever descriptor wrote: one call for both.
        self.buffered.sync_data()
    }
    fn parallel(&self) -> Option<&(dyn ZoneIo + Sync)> {
        Some(self)
    }
    fn io_chunk(&self) -> usize {
        // Direct I/O: 1 MiB requests (the data goes by DMA, not through the cache). Buffered
        // (tmpfs): 256 KiB, each copied into the cache just before it is hashed.
        if self.direct.is_some() {
            1 << 20
        } else {
            256 << 10
        }
    }
}

/// `n` bytes of `v` starting at a [`DIRECT_ALIGN`]-aligned address (grows `v`, zeroizing what
/// it held, when it is too small).
fn aligned_mut(v: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if v.len() < n + DIRECT_ALIGN {
        v.zeroize();
        *v = vec![0u8; n + DIRECT_ALIGN];
        // Fresh from the allocator, not yet touched: huge pages make O_DIRECT's per-request
        // page pinning cheap (7 % of an offline run's CPU with 4 KiB pages).
        crate::sys::advise_huge_pages(v);
    }
    let off = (DIRECT_ALIGN - v.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
    &mut v[off..off + n]
}

/// [`ZoneIo`] through a [`BlockDevice`] that spans the whole backing device (e.g. the daemon's
/// file backend behind its latch).
pub struct BlockIo<'a>(pub &'a dyn BlockDevice);

fn block_err(e: crate::block::Error) -> io::Error {
    match e.source {
        Some(s) => s,
        None => io::Error::other(e.kind.to_string()),
    }
}

impl ZoneIo for BlockIo<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset).map_err(block_err)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset, false).map_err(block_err)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.flush().map_err(block_err)
    }
}

// ---- the engine ---------------------------------------------------------------------------

/// What a new re-encryption uses.
#[derive(Debug, Clone)]
pub struct StartParams {
    /// New volume key length: 64 (AES-256-XTS) or 32 (AES-128-XTS).
    pub key_size: u32,
    /// New encryption sector size: 512, 1024, 2048 or 4096.
    pub sector_size: u32,
    pub resilience: Resilience,
    /// Bytes per hot zone; `None` = [`DEFAULT_HOTZONE`] (or [`DEFAULT_NONE_HOTZONE`]), capped by
    /// the resilience area and [`MAX_HOTZONE`].
    pub hotzone: Option<u64>,
    /// Unix time recorded as the new key's creation time (see [`KeyAge`]).
    pub now_unix: u64,
}

/// Builds the token of a re-sealed keyslot, given the new keyslot's id (a KMS/HSM secret is
/// sealed for the volume UUID and keyslot number, so it can only be sealed once the id is known).
pub type TokenBuilder = Box<dyn FnOnce(u32) -> Result<super::metadata::Token, String>>;

/// One keyslot of the old key to be matched by a keyslot of the new key.
///
/// - Passphrase / key file: `secret` is the same secret (the caller proves it opens `old_slot`,
///   e.g. with `Luks2Header::unlock_slot`), `token: None`; tokens bound to the old slot (e.g.
///   clevis, whose secret *is* the passphrase) get the new slot added.
/// - KMS/HSM token (re-sealed, not erased): `secret` is the passphrase of a fresh secret and
///   `token` seals that secret for the new slot; the old token is left to
///   [`Reencryption::finish_dropping_orphans`].
pub struct NewSlot {
    pub old_slot: u32,
    pub secret: SecretBytes,
    /// KDF of the new keyslot (usually the old slot's, from `KeyslotInfo::kdf`).
    pub kdf: KdfParams,
    pub token: Option<TokenBuilder>,
}

/// When a volume key was created, recorded in a token of type [`KEY_AGE_TOKEN`]
/// (`{"type":"nbdcrypt-volume-key","keyslots":[],"digest_salt":..., "created":<unix secs>}`)
/// tied to the key's digest salt, so a key replaced by another tool is not mistaken for ours.
/// cryptsetup keeps tokens of unknown types as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyAge {
    pub created_unix: u64,
}

impl KeyAge {
    /// The creation time of the volume key that opens the data segment, if a token records it.
    pub fn of(hdr: &Luks2Header) -> Option<KeyAge> {
        let (_, d) = hdr.metadata.segment_digest()?;
        key_age_of(&hdr.metadata, d)
    }
}

fn key_age_of(md: &Metadata, d: &DigestEntry) -> Option<KeyAge> {
    let salt = super::metadata::b64(&d.salt);
    md.tokens.values().find_map(|t| {
        let o = t.json();
        (t.type_name() == KEY_AGE_TOKEN
            && o.get("digest_salt").and_then(Value::as_str) == Some(salt.as_str()))
        .then(|| o.get("created").and_then(Value::as_u64))
        .flatten()
        .map(|created_unix| KeyAge { created_unix })
    })
}

fn key_age_token(d: &DigestEntry, now_unix: u64) -> Result<super::metadata::Token, FormatError> {
    let mut o = Map::new();
    o.insert("type".into(), KEY_AGE_TOKEN.into());
    o.insert("keyslots".into(), Value::Array(Vec::new()));
    o.insert("digest_salt".into(), super::metadata::b64(&d.salt).into());
    o.insert("created".into(), now_unix.into());
    super::metadata::Token::from_json(o)
}

/// Progress of a re-encryption, for status lines and audit records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub frontier: u64,
    pub data_size: u64,
}

/// A re-encryption in progress with both keys in hand. See the module documentation for the
/// protocol and how an online caller drives it.
pub struct Reencryption {
    hdr: Luks2Header,
    st: ReencState,
    old_key: VolumeKey,
    new_key: VolumeKey,
    old_cipher: SectorCipher,
    new_cipher: SectorCipher,
    hotzone: u64,
    buf: Vec<u8>,
    stop_after: Option<u64>,
    threads: usize,
}

impl Drop for Reencryption {
    fn drop(&mut self) {
        // The buffer held plaintext.
        self.buf.zeroize();
    }
}

fn cipher(key: &VolumeKey, ss: u32) -> Result<SectorCipher, FormatError> {
    SectorCipher::new(key, ss as usize).map_err(|e| FormatError::InvalidParams(e.to_string()))
}

fn io_err(op: &'static str, offset: u64) -> impl FnOnce(io::Error) -> FormatError {
    move |e| FormatError::io(op, offset, e)
}

impl Reencryption {
    /// Starts a re-encryption of a normal volume: a new random volume key, one new keyslot per
    /// `slots` entry (same secret, same priority; tokens bound to the old slot are bound to the
    /// new one too, so KMS/HSM/Tang tokens keep working), the resilience area (the largest free
    /// gap of the keyslots area), and the whole re-encryption state written in ONE header commit
    /// after the new keyslot material is on disk. No data is touched yet.
    pub fn start(
        file: &dyn HeaderIo,
        mut hdr: Luks2Header,
        old_key: VolumeKey,
        slots: Vec<NewSlot>,
        params: &StartParams,
    ) -> Result<Reencryption, FormatError> {
        if hdr.metadata.reenc_segments.is_some() {
            return Err(FormatError::InvalidParams(
                "a re-encryption is already in progress; resume it".into(),
            ));
        }
        if !matches!(params.key_size, 32 | 64) {
            return Err(FormatError::InvalidParams(format!(
                "key size {} is not 32 or 64 bytes",
                params.key_size
            )));
        }
        if !matches!(params.sector_size, 512 | 1024 | 2048 | 4096) {
            return Err(FormatError::InvalidParams(format!(
                "sector size {} is not 512, 1024, 2048 or 4096",
                params.sector_size
            )));
        }
        if slots.is_empty() {
            return Err(FormatError::InvalidParams(
                "no keyslot secret given: the new key would have no keyslot".into(),
            ));
        }
        let _lock = lock(file, LockMode::Exclusive)?;
        hdr.check_unchanged(file)?;
        if !hdr.verify_volume_key(&old_key) {
            return Err(FormatError::WrongVolumeKey);
        }
        let md0 = hdr.metadata.clone();
        let (old_digest, od) = md0.segment_digest().ok_or(FormatError::WrongVolumeKey)?;
        let old_seg = md0.segment.clone();
        let size = device_size(file)?;
        let data_size = size.saturating_sub(old_seg.offset);
        let align = u64::from(old_seg.sector_size.max(params.sector_size));
        if data_size == 0 || !data_size.is_multiple_of(align) {
            return Err(FormatError::InvalidParams(format!(
                "data area of {data_size} bytes is not a multiple of {align}"
            )));
        }
        if let Resilience::Checksum { block_size, .. } = params.resilience {
            if u64::from(block_size) < align || !data_size.is_multiple_of(u64::from(block_size)) {
                return Err(FormatError::InvalidParams(format!(
                    "checksum block {block_size} does not fit the data area"
                )));
            }
        }

        let mut key = SecretBytes::zeroed(params.key_size as usize);
        super::fill_random(key.expose_secret_mut())?;
        let new_key = VolumeKey::from_secret(key);

        // New keyslots: material first (fsynced by keyslot::create), header once at the end.
        let mut md = md0.clone();
        let mut new_ids = Vec::new();
        for mut s in slots {
            let Some(Keyslot::Luks2(old)) = md0.keyslots.get(&s.old_slot) else {
                return Err(FormatError::KeyslotNotFound(s.old_slot));
            };
            if !od.keyslots.contains(&s.old_slot) {
                return Err(FormatError::KeyslotUnusable {
                    slot: s.old_slot,
                    reason: "not a keyslot of the volume key".into(),
                });
            }
            s.kdf
                .check_creatable()
                .map_err(|e| FormatError::InvalidParams(e.to_string()))?;
            let id = (0..MAX_KEYSLOTS)
                .find(|i| !md.keyslots.contains_key(i))
                .ok_or(FormatError::NoFreeKeyslot(MAX_KEYSLOTS))?;
            let mut probe = hdr.clone();
            probe.metadata = md.clone();
            let offset = probe.allocate_area(keyslot::area_size(params.key_size))?;
            let mut ks = keyslot::create(file, offset, &new_key, &s.secret, &s.kdf)?;
            ks.priority = old.priority;
            ks.extra = old.extra.clone();
            md.keyslots.insert(id, Keyslot::Luks2(ks));
            match s.token.take() {
                Some(build) => {
                    let t = build(id).map_err(|e| {
                        FormatError::InvalidToken(format!(
                            "re-sealing the token of keyslot {} for keyslot {id}: {e}",
                            s.old_slot
                        ))
                    })?;
                    let tid = (0..super::layout::MAX_TOKENS)
                        .find(|i| !md.tokens.contains_key(i))
                        .ok_or(FormatError::NoFreeToken(super::layout::MAX_TOKENS))?;
                    md.tokens.insert(tid, t);
                }
                None => {
                    for t in md.tokens.values_mut() {
                        if t.keyslots().contains(&s.old_slot) {
                            let mut list = t.keyslots().to_vec();
                            list.push(id);
                            t.set_keyslots(list);
                        }
                    }
                }
            }
            new_ids.push(id);
        }

        // Resilience area: the largest free gap (cryptsetup's choice).
        let (area_offset, area_size) = largest_gap(&md, hdr.hdr_size(), hdr.metadata_end());
        let min_area = match params.resilience {
            Resilience::Checksum { hash, .. } => hash.output_len() as u64,
            Resilience::Journal => align,
            Resilience::None => 1,
        };
        if area_size < min_area.max(KEYSLOTS_ALIGN) {
            return Err(FormatError::NoKeyslotSpace {
                size: min_area.max(KEYSLOTS_ALIGN),
            });
        }
        let reenc_id = (0..MAX_KEYSLOTS)
            .find(|i| !md.keyslots.contains_key(i))
            .ok_or(FormatError::NoFreeKeyslot(MAX_KEYSLOTS))?;
        let mut area = Map::new();
        area.insert("offset".into(), area_offset.to_string().into());
        area.insert("size".into(), area_size.to_string().into());
        area.insert("type".into(), params.resilience.name().into());
        if let Resilience::Checksum { hash, block_size } = params.resilience {
            area.insert("hash".into(), hash.name().into());
            area.insert("sector_size".into(), block_size.into());
        }
        let mut raw = Map::new();
        raw.insert("area".into(), Value::Object(area));
        raw.insert("type".into(), "reencrypt".into());
        raw.insert("key_size".into(), 1.into());
        raw.insert("mode".into(), "reencrypt".into());
        raw.insert("direction".into(), "forward".into());
        raw.insert("priority".into(), 0.into());
        md.keyslots.insert(
            reenc_id,
            Keyslot::Other {
                type_name: "reencrypt".into(),
                area: (area_offset, area_size),
                raw,
            },
        );

        // Segments 0 (old, as now), 1 backup-previous, 2 backup-final; digests.
        let mut prev = old_seg.clone();
        prev.flags = Some(vec!["backup-previous".into()]);
        let fin = Segment {
            offset: old_seg.offset,
            size: SegmentSize::Dynamic,
            iv_tweak: 0,
            encryption: CIPHER.into(),
            sector_size: params.sector_size,
            flags: Some(vec!["backup-final".into()]),
            extra: Default::default(),
        };
        md.reenc_segments = Some(
            [(0, old_seg.clone()), (1, prev), (2, fin)]
                .into_iter()
                .collect(),
        );
        if let Some(d) = md.digests.get_mut(&old_digest) {
            d.segments = vec![0, 1];
        }
        let iterations = od.iterations.max(1000);
        let nd = digest::create(
            new_key.expose_secret(),
            od.hash,
            iterations,
            new_ids.clone(),
            vec![2],
        )?;
        let new_digest = (0..u32::MAX)
            .find(|i| !md.digests.contains_key(i))
            .unwrap_or(u32::MAX);
        md.digests.insert(new_digest, nd.clone());
        let mut req = match &md.config.requirements {
            Some(Value::Object(o)) => o.clone(),
            _ => Map::new(),
        };
        req.insert("mandatory".into(), Value::Array(vec![REQUIREMENT.into()]));
        md.config.requirements = Some(Value::Object(req));
        let data = verification_data(&md, reenc_id, &old_key, &new_key)?;
        let rd = digest::create(
            data.expose_secret(),
            HashAlg::Sha256,
            REENC_DIGEST_ITERATIONS,
            vec![reenc_id],
            vec![],
        )?;
        let reenc_digest = (0..u32::MAX)
            .find(|i| !md.digests.contains_key(i))
            .unwrap_or(u32::MAX);
        md.digests.insert(reenc_digest, rd);
        if let Some(id) = (0..super::layout::MAX_TOKENS).find(|i| !md.tokens.contains_key(i)) {
            md.tokens.insert(id, key_age_token(&nd, params.now_unix)?);
        }
        let st = ReencState::parse(&md, size)?;
        hdr.commit(file, md)?;
        drop(_lock);
        let mut r = Reencryption::assemble(hdr, st, old_key, new_key)?;
        r.set_hotzone(params.hotzone)?;
        Ok(r)
    }

    /// Resumes a re-encryption (ours or cryptsetup's) with secrets: each is tried on every
    /// keyslot of both keys (priority 2 then 1, as `unlock`), until both keys are found. The
    /// re-encryption digest is verified before anything else happens.
    pub fn open(
        file: &dyn HeaderIo,
        secrets: &[SecretBytes],
        limits: &KdfLimits,
    ) -> Result<Reencryption, FormatError> {
        Self::open_by(file, limits, &mut |_, _| {
            secrets
                .iter()
                .map(|s| SecretBytes::from_slice(s.expose_secret()))
                .collect()
        })
    }

    /// Resumes a re-encryption with secrets found per keyslot: `secrets_for(header, id)` is
    /// asked, lazily, for the candidate secrets of keyslot `id` (e.g. the passphrase a KMS/HSM
    /// or clevis token bound to that keyslot unseals), for keyslots of a key still missing, in
    /// priority order (prefer, then normal), until both keys are found. The re-encryption digest
    /// is verified before anything else happens.
    pub fn open_by(
        file: &dyn HeaderIo,
        limits: &KdfLimits,
        secrets_for: &mut dyn FnMut(&Luks2Header, u32) -> Vec<SecretBytes>,
    ) -> Result<Reencryption, FormatError> {
        let (hdr, _) = Luks2Header::read_reencrypt(file)?;
        let size = device_size(file)?;
        let st = ReencState::from_header(&hdr, size)?;
        let md = &hdr.metadata;
        let (mut old, mut new) = (None, None);
        let mut last_err = None;
        'outer: for prio in [
            super::metadata::KeyslotPriority::Prefer,
            super::metadata::KeyslotPriority::Normal,
        ] {
            for (&id, ks) in &md.keyslots {
                let Keyslot::Luks2(k) = ks else { continue };
                if k.priority() != prio {
                    continue;
                }
                let Some((d, _)) = md.digest_of_keyslot(id) else {
                    continue;
                };
                let slot_for_old = d == st.old_digest;
                if !(slot_for_old && old.is_none() || d == st.new_digest && new.is_none()) {
                    continue;
                }
                for s in secrets_for(&hdr, id) {
                    match hdr.open_slot_unchecked(file, size, id, k, &s, limits) {
                        Ok(key) => {
                            if slot_for_old {
                                old = Some(key);
                            } else {
                                new = Some(key);
                            }
                            break;
                        }
                        Err(FormatError::WrongPassphrase)
                        | Err(FormatError::KeyslotUnusable { .. }) => {}
                        Err(e) => last_err = Some(e),
                    }
                }
                if old.is_some() && new.is_some() {
                    break 'outer;
                }
            }
        }
        match (old, new) {
            (Some(o), Some(n)) => Self::with_keys(file, hdr, o, n),
            (o, n) => Err(last_err.unwrap_or_else(|| {
                FormatError::InvalidParams(format!(
                    "the secrets given open {} of the two volume keys (old and new); both are \
                     needed to resume a re-encryption",
                    match (o.is_some(), n.is_some()) {
                        (true, _) => "only the old",
                        (_, true) => "only the new",
                        _ => "neither",
                    }
                ))
            })),
        }
    }

    /// Resumes with both volume keys known (e.g. the daemon unsealed them from its tokens).
    pub fn open_with_keys(
        file: &dyn HeaderIo,
        old_key: VolumeKey,
        new_key: VolumeKey,
    ) -> Result<Reencryption, FormatError> {
        let (hdr, _) = Luks2Header::read_reencrypt(file)?;
        Self::with_keys(file, hdr, old_key, new_key)
    }

    fn with_keys(
        file: &dyn HeaderIo,
        hdr: Luks2Header,
        old_key: VolumeKey,
        new_key: VolumeKey,
    ) -> Result<Reencryption, FormatError> {
        let st = ReencState::from_header(&hdr, device_size(file)?)?;
        let md = &hdr.metadata;
        let ok = |d: u32, k: &VolumeKey| {
            md.digests
                .get(&d)
                .is_some_and(|d| digest::verify(d, k.expose_secret()))
        };
        if !ok(st.old_digest, &old_key) || !ok(st.new_digest, &new_key) {
            return Err(FormatError::WrongVolumeKey);
        }
        st.verify_digest(md, &old_key, &new_key)?;
        let mut r = Reencryption::assemble(hdr, st, old_key, new_key)?;
        r.set_hotzone(None)?;
        Ok(r)
    }

    fn assemble(
        hdr: Luks2Header,
        st: ReencState,
        old_key: VolumeKey,
        new_key: VolumeKey,
    ) -> Result<Reencryption, FormatError> {
        Ok(Reencryption {
            old_cipher: cipher(&old_key, st.old_sector_size)?,
            new_cipher: cipher(&new_key, st.new_sector_size)?,
            hdr,
            st,
            old_key,
            new_key,
            hotzone: 0,
            buf: Vec::new(),
            stop_after: None,
            threads: 1,
        })
    }

    /// Largest zone the resilience area can protect, aligned to the sector and checksum sizes.
    pub fn max_hotzone(&self) -> u64 {
        let st = &self.st;
        let align = self.align();
        let cap = match st.resilience {
            Resilience::Checksum { hash, block_size } => {
                (st.area_size / hash.output_len() as u64) * u64::from(block_size)
            }
            Resilience::Journal => st.area_size,
            Resilience::None => MAX_HOTZONE,
        };
        (cap.min(MAX_HOTZONE) / align) * align
    }

    fn align(&self) -> u64 {
        let st = &self.st;
        let mut a = u64::from(st.old_sector_size.max(st.new_sector_size));
        if let Resilience::Checksum { block_size, .. } = st.resilience {
            a = a.max(u64::from(block_size));
        }
        a
    }

    /// Sets the bytes per step (`None`: the default), aligned down and capped by
    /// [`Reencryption::max_hotzone`].
    pub fn set_hotzone(&mut self, bytes: Option<u64>) -> Result<(), FormatError> {
        let align = self.align();
        let default = if self.st.resilience == Resilience::None {
            DEFAULT_NONE_HOTZONE
        } else {
            DEFAULT_HOTZONE
        };
        let want = bytes.unwrap_or(default).min(self.max_hotzone());
        let z = (want / align) * align;
        if z == 0 {
            return Err(FormatError::InvalidParams(format!(
                "hot zone must be at least {align} bytes (the resilience area allows up to {})",
                self.max_hotzone()
            )));
        }
        self.hotzone = z;
        Ok(())
    }

    /// Bytes per step.
    pub fn hotzone(&self) -> u64 {
        self.hotzone
    }

    /// The validated state (frontier, hot zone, resilience, sizes).
    pub fn state(&self) -> &ReencState {
        &self.st
    }

    /// The header as last committed.
    pub fn header(&self) -> &Luks2Header {
        &self.hdr
    }

    /// `[0, frontier)` (relative to the data start) is under the new key, the rest under the old.
    pub fn frontier(&self) -> u64 {
        self.st.frontier
    }

    pub fn progress(&self) -> Progress {
        Progress {
            frontier: self.st.frontier,
            data_size: self.st.data_size,
        }
    }

    /// A zone a crash left half done (relative range); [`Reencryption::recover`] it first.
    pub fn hot_zone(&self) -> Option<Range<u64>> {
        self.st
            .hot_len
            .map(|l| self.st.frontier..self.st.frontier + l)
    }

    /// The zone the next [`Reencryption::step`] will re-encrypt (relative to the data start),
    /// `None` when everything is done. Hold the range lock for exactly this range during `step`.
    pub fn next_zone(&self) -> Option<Range<u64>> {
        if let Some(h) = self.hot_zone() {
            return Some(h);
        }
        let f = self.st.frontier;
        (f < self.st.data_size).then(|| f..f + self.hotzone.min(self.st.data_size - f))
    }

    pub fn old_key(&self) -> &VolumeKey {
        &self.old_key
    }
    pub fn new_key(&self) -> &VolumeKey {
        &self.new_key
    }
    pub fn old_sector_size(&self) -> u32 {
        self.st.old_sector_size
    }
    pub fn new_sector_size(&self) -> u32 {
        self.st.new_sector_size
    }
    /// Absolute byte offset of the data on the device.
    pub fn data_offset(&self) -> u64 {
        self.st.data_offset
    }
    pub fn data_size(&self) -> u64 {
        self.st.data_size
    }

    /// Test hook: fail every step after `n` more zones with "interrupted" (for crash trials).
    #[doc(hidden)]
    pub fn stop_after_zones(&mut self, n: Option<u64>) {
        self.stop_after = n;
    }

    /// The rate cap (bytes per second) recorded with this re-encryption (a [`JOB_TOKEN`]
    /// token), so a resume after a restart keeps it. Header input: values under
    /// [`MIN_RECORDED_RATE`] are raised to it (a forged value cannot stall the job for years).
    pub fn max_rate(&self) -> Option<u64> {
        self.hdr
            .metadata
            .tokens
            .values()
            .find(|t| t.type_name() == JOB_TOKEN)
            .and_then(|t| t.json().get("max_rate").and_then(Value::as_u64))
            .map(|r| r.max(MIN_RECORDED_RATE))
    }

    /// Records the rate cap in the header (one commit, under the header lock); `None` removes it.
    pub fn set_max_rate(
        &mut self,
        file: &dyn HeaderIo,
        rate: Option<u64>,
    ) -> Result<(), FormatError> {
        if self.max_rate() == rate.map(|r| r.max(MIN_RECORDED_RATE)) {
            return Ok(());
        }
        let _lock = lock(file, LockMode::Exclusive)?;
        self.hdr.check_unchanged(file)?;
        let mut md = self.hdr.metadata.clone();
        md.tokens.retain(|_, t| t.type_name() != JOB_TOKEN);
        if let Some(rate) = rate {
            let id = (0..super::layout::MAX_TOKENS)
                .find(|i| !md.tokens.contains_key(i))
                .ok_or(FormatError::NoFreeToken(super::layout::MAX_TOKENS))?;
            let mut o = Map::new();
            o.insert("type".into(), JOB_TOKEN.into());
            o.insert("keyslots".into(), Value::Array(Vec::new()));
            o.insert("max_rate".into(), rate.into());
            md.tokens.insert(id, super::metadata::Token::from_json(o)?);
        }
        self.hdr.commit(file, md)
    }

    /// Test hook (crash trials): does the next step up to its hot-zone commit, writes the first
    /// half of the zone re-encrypted, and returns as if the process had died there. Nothing
    /// else should be done with this value afterwards.
    #[doc(hidden)]
    pub fn step_then_crash_test(
        &mut self,
        file: &dyn HeaderIo,
        io: &dyn ZoneIo,
    ) -> Result<(), FormatError> {
        let Some(zone) = self.next_zone() else {
            return Ok(());
        };
        let abs = self.st.data_offset + zone.start;
        let mut b = vec![0u8; usize::try_from(zone.end - zone.start).unwrap_or(0)];
        io.read_at(&mut b, abs)
            .map_err(io_err("reading the hot zone", abs))?;
        match self.st.resilience {
            Resilience::None => {}
            Resilience::Checksum { hash, block_size } => {
                let mut sums = vec![0u8; block_hash::sums_len(hash, b.len(), block_size as usize)];
                block_hash::hash_blocks(hash, &b, block_size as usize, &mut sums);
                write_all_at(
                    file,
                    &sums,
                    self.st.area_offset,
                    "writing the resilience checksums",
                )?;
            }
            Resilience::Journal => write_all_at(
                file,
                &b,
                self.st.area_offset,
                "writing the resilience journal",
            )?,
        }
        if self.st.resilience != Resilience::None {
            self.commit_layout(file, zone.start, Some(b.len() as u64))?;
        }
        let align = usize::try_from(self.align()).unwrap_or(4096);
        let half = (b.len() / 2) / align * align;
        let iv = zone.start / 512;
        let h = &mut b[..half];
        self.old_cipher
            .decrypt_in_place(h, iv)
            .map_err(|e| FormatError::InvalidParams(e.to_string()))?;
        self.new_cipher
            .encrypt_in_place(h, iv)
            .map_err(|e| FormatError::InvalidParams(e.to_string()))?;
        io.write_at(h, abs)
            .map_err(io_err("writing the hot zone", abs))?;
        io.sync().map_err(io_err("syncing the hot zone", abs))?;
        b.zeroize();
        Ok(())
    }

    /// Redoes a zone a crash left half done, from the resilience data, and commits the frontier
    /// after it. Does nothing when there is no such zone.
    pub fn recover(&mut self, file: &dyn HeaderIo, io: &dyn ZoneIo) -> Result<(), FormatError> {
        let Some(len) = self.st.hot_len else {
            return Ok(());
        };
        let start = self.st.frontier;
        let zone_abs = self.st.data_offset + start;
        let iv0 = start / 512;
        let chunk = RECOVERY_CHUNK;
        let mut buf = vec![0u8; usize::try_from(chunk.min(len)).unwrap_or(0)];
        match self.st.resilience {
            Resilience::None => {
                return Err(FormatError::Unsupported(format!(
                    "a crash interrupted the re-encryption of [{start}, +{len}) with resilience \
                     \"none\": that zone cannot be recovered (restore it from a backup)"
                )))
            }
            Resilience::Checksum { hash, block_size } => {
                let bs = block_size as usize;
                let hl = hash.output_len();
                let mut sums = vec![0u8; buf.len() / bs * hl];
                let mut h = vec![0u8; hl];
                let mut done = 0u64;
                while done < len {
                    let n = chunk.min(len - done);
                    let nu = usize::try_from(n).unwrap_or(0);
                    let b = &mut buf[..nu];
                    io.read_at(b, zone_abs + done)
                        .map_err(io_err("reading the hot zone", zone_abs + done))?;
                    let sum_off = self.st.area_offset + done / u64::from(block_size) * hl as u64;
                    let s = &mut sums[..nu / bs * hl];
                    read_exact_at(file, s, sum_off, "reading the resilience checksums")?;
                    for (i, (blk, want)) in
                        b.chunks_exact_mut(bs).zip(s.chunks_exact(hl)).enumerate()
                    {
                        hash.hash_parts(&[blk], &mut h);
                        if h[..] != want[..] {
                            continue; // already the new ciphertext
                        }
                        // Still the old ciphertext: re-encrypt this block.
                        let rel = done + (i * bs) as u64;
                        let iv = iv0 + rel / 512;
                        self.old_cipher
                            .decrypt_in_place(blk, iv)
                            .map_err(|e| FormatError::InvalidParams(e.to_string()))?;
                        self.new_cipher
                            .encrypt_in_place(blk, iv)
                            .map_err(|e| FormatError::InvalidParams(e.to_string()))?;
                        let off = zone_abs + rel;
                        io.write_at(blk, off)
                            .map_err(io_err("writing the recovered hot zone", off))?;
                    }
                    done += n;
                }
            }
            Resilience::Journal => {
                let mut done = 0u64;
                while done < len {
                    let n = chunk.min(len - done);
                    let b = &mut buf[..usize::try_from(n).unwrap_or(0)];
                    read_exact_at(
                        file,
                        b,
                        self.st.area_offset + done,
                        "reading the resilience journal",
                    )?;
                    let iv = iv0 + done / 512;
                    self.old_cipher
                        .decrypt_in_place(b, iv)
                        .map_err(|e| FormatError::InvalidParams(e.to_string()))?;
                    self.new_cipher
                        .encrypt_in_place(b, iv)
                        .map_err(|e| FormatError::InvalidParams(e.to_string()))?;
                    io.write_at(b, zone_abs + done)
                        .map_err(io_err("writing the recovered hot zone", zone_abs + done))?;
                    done += n;
                }
            }
        }
        buf.zeroize();
        io.sync()
            .map_err(io_err("syncing the recovered hot zone", zone_abs))?;
        self.commit_layout(file, start + len, None)
    }

    /// Re-encrypts the next zone (see the module documentation for the order of writes) and
    /// persists the new frontier. Returns the zone done, `None` if nothing was left. Recovers a
    /// half-done zone first if there is one.
    pub fn step(
        &mut self,
        file: &dyn HeaderIo,
        io: &dyn ZoneIo,
    ) -> Result<Option<Range<u64>>, FormatError> {
        if self.st.hot_len.is_some() {
            let z = self.hot_zone();
            self.recover(file, io)?;
            return Ok(z);
        }
        let Some(zone) = self.next_zone() else {
            return Ok(None);
        };
        if let Some(n) = self.stop_after.as_mut() {
            if *n == 0 {
                return Err(FormatError::Io {
                    op: "re-encrypting (test hook: stopped)",
                    offset: zone.start,
                    source: io::Error::other("interrupted by the test hook"),
                });
            }
            *n -= 1;
        }
        let len = zone.end - zone.start;
        let abs = self.st.data_offset + zone.start;
        let n = usize::try_from(len)
            .map_err(|_| FormatError::InvalidParams("hot zone too large".into()))?;
        let mut buf = std::mem::take(&mut self.buf);
        let result = self.step_with(file, io, aligned_mut(&mut buf, n), zone.start, abs);
        self.buf = buf;
        result.map(|()| Some(zone))
    }

    fn step_with(
        &mut self,
        file: &dyn HeaderIo,
        io: &dyn ZoneIo,
        b: &mut [u8],
        start: u64,
        abs: u64,
    ) -> Result<(), FormatError> {
        let len = b.len() as u64;
        // With I/O callable from every thread (offline), each thread reads, hashes,
        // re-encrypts and writes its share of the zone chunk by chunk, while the chunk is in its
        // cache; otherwise (online) one read and one write of the whole zone from here.
        let par = io.parallel();
        let whole = |b: &mut [u8]| {
            io.read_at(b, abs)
                .map_err(io_err("reading the hot zone", abs))
        };
        // Resilience data, then the hot-zone commit (the metadata commit point). Nothing reaches
        // the data area before that commit, so computing the new ciphertext before it changes
        // nothing on disk: the checksums are taken in the same pass as the re-encryption (each
        // block hashed just before it is decrypted, while it is in cache).
        match self.st.resilience {
            Resilience::None => {
                if par.is_none() {
                    whole(b)?;
                }
                // No commit before the data: read, re-encrypt and write in one pass.
                self.zone_pass(b, start, abs, par, Pass::ALL)?;
            }
            Resilience::Checksum { hash, block_size } => {
                if par.is_none() {
                    whole(b)?;
                }
                let mut sums = vec![0u8; block_hash::sums_len(hash, b.len(), block_size as usize)];
                let pass = Pass {
                    read: true,
                    sums: Some((hash, block_size, &mut sums)),
                    crypt: true,
                    write: false,
                };
                self.zone_pass(b, start, abs, par, pass)?;
                write_all_at(
                    file,
                    &sums,
                    self.st.area_offset,
                    "writing the resilience checksums",
                )?;
                self.commit_layout(file, start, Some(len))?;
                self.zone_pass(b, start, abs, par, Pass::WRITE)?;
            }
            Resilience::Journal => {
                if par.is_none() {
                    whole(b)?;
                }
                self.zone_pass(b, start, abs, par, Pass::READ)?;
                write_all_at(
                    file,
                    b,
                    self.st.area_offset,
                    "writing the resilience journal",
                )?;
                self.commit_layout(file, start, Some(len))?;
                let pass = Pass {
                    read: false,
                    sums: None,
                    crypt: true,
                    write: true,
                };
                self.zone_pass(b, start, abs, par, pass)?;
            }
        }
        if par.is_none() {
            io.write_at(b, abs)
                .map_err(io_err("writing the hot zone", abs))?;
        }
        io.sync().map_err(io_err("syncing the hot zone", abs))?;
        self.commit_layout(file, start + len, None)
    }

    /// Zone work in parallel on up to `n` threads (offline: the cores; online the daemon keeps
    /// the default 1 so the worker's back-off measures one thread's time).
    pub fn set_threads(&mut self, n: usize) {
        self.threads = n.clamp(1, 16);
    }

    /// One pass over the zone `b` that starts at `start` (bytes from the data start; `abs` on
    /// the device), split across [`Reencryption::set_threads`] threads, each walking its share
    /// in cache-sized chunks and doing to each chunk, in this order, what `pass` asks: read it
    /// (through `par`), hash each `block_size` block of it (old ciphertext) into the sums,
    /// re-encrypt it in place (old key -> new key), write it (through `par`). Without `par`
    /// the reads and writes are the caller's (whole zone) and only hashing and re-encryption
    /// happen here.
    fn zone_pass(
        &self,
        b: &mut [u8],
        start: u64,
        abs: u64,
        par: Option<&(dyn ZoneIo + Sync)>,
        pass: Pass<'_>,
    ) -> Result<(), FormatError> {
        const CHUNK: usize = 256 << 10;
        let Pass {
            read,
            sums,
            crypt,
            write,
        } = pass;
        let (read, write) = match par {
            Some(io) => (read.then_some(io), write.then_some(io)),
            None => (None, None),
        };
        if read.is_none() && sums.is_none() && !crypt && write.is_none() {
            return Ok(());
        }
        let bs = sums.as_ref().map_or(512, |s| s.1 as usize).max(512);
        let align = usize::try_from(self.align()).unwrap_or(4096);
        let unit = lcm(lcm(bs, align), DIRECT_ALIGN);
        let chunk = (CHUNK / unit).max(1) * unit;
        // I/O in pieces of `io_chunk` (whole multiples of `chunk`), each hashed and
        // re-encrypted `chunk` by `chunk`: larger direct I/O means fewer requests, device
        // notifications and waits; the cache-sized crypto pieces keep their locality.
        let io_chunk = par.map_or(chunk, |io| io.io_chunk().max(chunk) / chunk * chunk);
        let threads = if b.len() >= 4 * chunk {
            self.threads
        } else {
            1
        };
        let part = b.len().div_ceil(threads).div_ceil(io_chunk).max(1) * io_chunk;
        let (old, new) = (&self.old_cipher, &self.new_cipher);
        let work = |p: &mut [u8], at: usize, sums: Option<(HashAlg, &mut [u8])>| {
            let mut sums = sums;
            for (i, big) in p.chunks_mut(io_chunk).enumerate() {
                let big_off = i * io_chunk;
                let dev = abs + (at + big_off) as u64;
                if let Some(io) = read {
                    io.read_at(big, dev)
                        .map_err(io_err("reading the hot zone", dev))?;
                }
                for (j, c) in big.chunks_mut(chunk).enumerate() {
                    let rel = big_off + j * chunk; // within this thread's part
                    if let Some((hash, out)) = sums.as_mut() {
                        let hl = hash.output_len();
                        let first = rel / bs * hl;
                        let out = &mut out[first..first + c.len() / bs * hl];
                        block_hash::hash_blocks(*hash, c, bs, out);
                    }
                    if crypt {
                        let iv = (start + (at + rel) as u64) / 512;
                        old.decrypt_in_place(c, iv)
                            .and_then(|()| new.encrypt_in_place(c, iv))
                            .map_err(|e| FormatError::InvalidParams(e.to_string()))?;
                    }
                }
                if let Some(io) = write {
                    io.write_at(big, dev)
                        .map_err(io_err("writing the hot zone", dev))?;
                }
            }
            Ok(())
        };
        let (hash, mut out) = match sums {
            Some((h, _, o)) => (Some(h), Some(o)),
            None => (None, None),
        };
        if threads == 1 {
            return work(b, 0, hash.zip(out));
        }
        std::thread::scope(|sc| {
            let mut handles = Vec::new();
            for (i, p) in b.chunks_mut(part).enumerate() {
                let s = match (hash, out.take()) {
                    (Some(h), Some(o)) => {
                        let n = (p.len() / bs * h.output_len()).min(o.len());
                        let (mine, rest) = o.split_at_mut(n);
                        out = Some(rest);
                        Some((h, mine))
                    }
                    _ => None,
                };
                let work = &work;
                handles.push(sc.spawn(move || work(p, i * part, s)));
            }
            // Every thread's result, the first error reported (all threads have stopped).
            let mut first = Ok(());
            for h in handles {
                let r = h.join().unwrap_or_else(|_| {
                    Err(FormatError::InvalidParams(
                        "a re-encryption thread failed".into(),
                    ))
                });
                if first.is_ok() {
                    first = r;
                }
            }
            first
        })
    }

    /// Finishes a completed re-encryption: one header commit drops the old key's keyslots and
    /// digest, the `reencrypt` keyslot and its digest, the backup segments and the requirement
    /// (one `crypt` segment again, under the new key); then the old keyslots' areas and the
    /// resilience area are overwritten. Tokens stay (bound to the new keyslots).
    pub fn finish(self, file: &dyn HeaderIo) -> Result<Luks2Header, FormatError> {
        self.finish_dropping_orphans(file, |_| false)
    }

    /// [`Reencryption::finish`], also removing the tokens left without any keyslot by the
    /// removal of the old keyslots for which `drop` is true (e.g. our KMS/HSM tokens whose
    /// keyslots were re-sealed); other orphaned tokens stay, as cryptsetup leaves them.
    pub fn finish_dropping_orphans(
        self,
        file: &dyn HeaderIo,
        drop: impl Fn(&super::metadata::Token) -> bool,
    ) -> Result<Luks2Header, FormatError> {
        self.finish_inner(file, drop, false)
    }

    /// Test hook (crash trials): the final commit of [`Reencryption::finish`] and nothing after
    /// it, as if the process died before wiping the old keyslots (see [`complete_pending_wipe`]).
    #[doc(hidden)]
    pub fn finish_then_crash_test(self, file: &dyn HeaderIo) -> Result<Luks2Header, FormatError> {
        self.finish_inner(file, |_| false, true)
    }

    fn finish_inner(
        mut self,
        file: &dyn HeaderIo,
        drop: impl Fn(&super::metadata::Token) -> bool,
        crash_before_wipe: bool,
    ) -> Result<Luks2Header, FormatError> {
        if self.st.hot_len.is_some() || self.st.frontier != self.st.data_size {
            return Err(FormatError::InvalidParams(format!(
                "re-encryption is not complete ({} of {} bytes)",
                self.st.frontier, self.st.data_size
            )));
        }
        let _lock = lock(file, LockMode::Exclusive)?;
        self.hdr.check_unchanged(file)?;
        let mut md = self.hdr.metadata.clone();
        let old_slots: Vec<u32> = md
            .digests
            .get(&self.st.old_digest)
            .map(|d| d.keyslots.clone())
            .unwrap_or_default();
        let mut wipe = Vec::new();
        for id in old_slots.iter().chain(std::iter::once(&self.st.keyslot)) {
            if let Some(ks) = md.keyslots.remove(id) {
                if let Some(a) = ks.area_extent() {
                    wipe.push((*id, a));
                }
            }
            md.unlink_keyslot(*id);
        }
        let orphaned: Vec<u32> = md
            .tokens
            .iter()
            .filter(|(id, t)| {
                t.keyslots().is_empty()
                    && self.hdr.metadata.tokens.get(id).is_some_and(|before| {
                        before.keyslots().iter().any(|k| old_slots.contains(k))
                    })
                    && drop(t)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in orphaned {
            md.tokens.remove(&id);
        }
        md.digests.remove(&self.st.old_digest);
        md.digests.remove(&self.st.reenc_digest);
        let mut seg = Segment {
            offset: self.st.data_offset,
            size: SegmentSize::Dynamic,
            iv_tweak: 0,
            encryption: CIPHER.into(),
            sector_size: self.st.new_sector_size,
            flags: None,
            extra: Default::default(),
        };
        if let Some(s) = md.reenc_segments.as_ref().and_then(|a| a.get(&0)) {
            seg.extra = s.extra.clone();
        }
        md.segment = seg;
        md.reenc_segments = None;
        if let Some(d) = md.digests.get_mut(&self.st.new_digest) {
            d.segments = vec![0];
        }
        if let Some(Value::Object(req)) = &mut md.config.requirements {
            if let Some(Value::Array(m)) = req.get_mut("mandatory") {
                m.retain(|v| v.as_str() != Some(REQUIREMENT));
                if m.is_empty() {
                    req.remove("mandatory");
                }
            }
            if req.is_empty() {
                md.config.requirements = None;
            }
        }
        // Our record of the running job (its rate cap) goes with it.
        md.tokens.retain(|_, t| t.type_name() != JOB_TOKEN);
        // Key-age tokens of keys that are gone.
        let live = md
            .digests
            .get(&self.st.new_digest)
            .map(|d| super::metadata::b64(&d.salt));
        md.tokens.retain(|_, t| {
            t.type_name() != KEY_AGE_TOKEN
                || t.json().get("digest_salt").and_then(Value::as_str) == live.as_deref()
        });
        // The areas to wipe are named in the same commit that unreferences them, so a crash
        // before the wipe is finished leaves a record the next open acts on
        // ([`complete_pending_wipe`]); without it those bytes would stay unreferenced, unwiped.
        // (With every token id taken there is no record: the wipe below still runs, only a cut
        // in the middle of it goes unnoticed, as before this record existed.)
        let pending = match (0..super::layout::MAX_TOKENS).find(|i| !md.tokens.contains_key(i)) {
            Some(id) if !wipe.is_empty() => {
                md.tokens.insert(id, wipe_token(&wipe)?);
                Some(id)
            }
            _ => None,
        };
        self.hdr.commit(file, md)?;
        if crash_before_wipe {
            return Ok(self.hdr.clone());
        }
        let md = self.hdr.metadata.clone();
        for (id, (off, size)) in wipe {
            wipe_keyslot_area(file, &md, self.hdr.hdr_size(), id, off, size)?;
        }
        if let Some(id) = pending {
            let mut md = self.hdr.metadata.clone();
            md.tokens.remove(&id);
            self.hdr.commit(file, md)?;
        }
        Ok(self.hdr.clone())
    }

    /// Commits the layout "new key below `frontier`, hot zone of `hot` bytes (if any), old key
    /// above", cryptsetup's segment and digest assignment, under the header lock.
    fn commit_layout(
        &mut self,
        file: &dyn HeaderIo,
        frontier: u64,
        hot: Option<u64>,
    ) -> Result<(), FormatError> {
        let _lock = lock(file, LockMode::Exclusive)?;
        self.hdr.check_unchanged(file)?;
        let st = &self.st;
        let mut md = self.hdr.metadata.clone();
        let all = md
            .reenc_segments
            .as_ref()
            .ok_or_else(|| FormatError::meta("segments", "not in re-encryption"))?;
        let prev = all
            .values()
            .find(|s| has_flag(s, "backup-previous"))
            .cloned();
        let fin = all.values().find(|s| has_flag(s, "backup-final")).cloned();
        let (Some(prev), Some(fin)) = (prev, fin) else {
            return Err(FormatError::meta("segments", "backup segments missing"));
        };
        let mk = |rel: u64, size: SegmentSize, ss: u32, flags: Option<Vec<String>>| Segment {
            offset: st.data_offset + rel,
            size,
            iv_tweak: rel / 512,
            encryption: CIPHER.into(),
            sector_size: ss,
            flags,
            extra: Default::default(),
        };
        let mut segs: BTreeMap<u32, Segment> = BTreeMap::new();
        let (mut old_ids, mut new_ids) = (Vec::new(), Vec::new());
        let mut next = 0u32;
        let hot_end = frontier + hot.unwrap_or(0);
        if frontier > 0 {
            let size = if hot_end >= st.data_size && hot.is_none() {
                SegmentSize::Dynamic
            } else {
                SegmentSize::Bytes(frontier)
            };
            segs.insert(next, mk(0, size, st.new_sector_size, None));
            new_ids.push(next);
            next += 1;
        }
        if let Some(h) = hot {
            segs.insert(
                next,
                mk(
                    frontier,
                    SegmentSize::Bytes(h),
                    st.new_sector_size,
                    Some(vec!["in-reencryption".into()]),
                ),
            );
            new_ids.push(next);
            old_ids.push(next);
            next += 1;
        }
        if hot_end < st.data_size {
            segs.insert(
                next,
                mk(hot_end, SegmentSize::Dynamic, st.old_sector_size, None),
            );
            old_ids.push(next);
            next += 1;
        }
        segs.insert(next, prev);
        old_ids.push(next);
        segs.insert(next + 1, fin);
        new_ids.push(next + 1);
        md.segment = segs.get(&0).cloned().unwrap_or_else(|| md.segment.clone());
        md.reenc_segments = Some(segs);
        if let Some(d) = md.digests.get_mut(&st.old_digest) {
            d.segments = old_ids;
        }
        if let Some(d) = md.digests.get_mut(&st.new_digest) {
            d.segments = new_ids;
        }
        let size = st.data_offset + st.data_size;
        let next_st = ReencState::parse(&md, size)?;
        self.hdr.commit(file, md)?;
        self.st = next_st;
        Ok(())
    }
}

/// What one [`Reencryption::zone_pass`] does to each chunk (in this order).
struct Pass<'a> {
    read: bool,
    /// Hash each `block_size` block of the old ciphertext into these sums.
    sums: Option<(HashAlg, u32, &'a mut [u8])>,
    crypt: bool,
    write: bool,
}

impl Pass<'_> {
    const ALL: Pass<'static> = Pass {
        read: true,
        sums: None,
        crypt: true,
        write: true,
    };
    const READ: Pass<'static> = Pass {
        read: true,
        sums: None,
        crypt: false,
        write: false,
    };
    const WRITE: Pass<'static> = Pass {
        read: false,
        sums: None,
        crypt: false,
        write: true,
    };
}

fn lcm(a: usize, b: usize) -> usize {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x.max(1) * b
}

/// Largest free 4 KiB-aligned gap of the keyslots area: `(offset, size)`.
fn largest_gap(md: &Metadata, hdr_size: u64, end: u64) -> (u64, u64) {
    let mut used: Vec<(u64, u64)> = md
        .keyslots
        .values()
        .filter_map(Keyslot::area_extent)
        .map(|(o, s)| (o, o.saturating_add(s)))
        .collect();
    used.sort_unstable();
    let mut best = (0, 0);
    let mut cursor = 2 * hdr_size;
    for (o, e) in used.into_iter().chain(std::iter::once((end, end))) {
        if o > cursor && o - cursor > best.1 {
            best = (cursor, o - cursor);
        }
        cursor = cursor.max(e.div_ceil(KEYSLOTS_ALIGN) * KEYSLOTS_ALIGN);
    }
    (best.0, (best.1 / KEYSLOTS_ALIGN) * KEYSLOTS_ALIGN)
}

// ---- wiping what a crash left unreferenced --------------------------------------------------

/// Token type naming keyslot areas whose keyslots a finished re-encryption removed and that
/// are being (or still have to be) overwritten: `{"type":"nbdcrypt-wipe-pending","keyslots":[],
/// "areas":[["<offset>","<size>"],...]}`. Written in the same header commit that removes the
/// keyslots, removed once they are wiped; cryptsetup keeps it as an unknown token.
pub const WIPE_TOKEN: &str = "nbdcrypt-wipe-pending";

fn wipe_token(areas: &[(u32, (u64, u64))]) -> Result<super::metadata::Token, FormatError> {
    let mut o = Map::new();
    o.insert("type".into(), WIPE_TOKEN.into());
    o.insert("keyslots".into(), Value::Array(Vec::new()));
    o.insert(
        "areas".into(),
        Value::Array(
            areas
                .iter()
                .map(|(_, (off, size))| {
                    Value::Array(vec![off.to_string().into(), size.to_string().into()])
                })
                .collect(),
        ),
    );
    super::metadata::Token::from_json(o)
}

/// What [`complete_pending_wipe`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PendingWipe {
    /// No record of a pending wipe (the normal case).
    Nothing,
    /// The areas named were overwritten and the record removed: `(areas, bytes)`.
    Wiped(usize, u64),
    /// The record was refused (see the rule on [`complete_pending_wipe`]): nothing was written,
    /// the record stays for a person to look at.
    Refused(String),
}

/// Parses and checks a pending-wipe record against the header that carries it. The rule (a
/// header is attacker-written, so it must not be able to make us overwrite anything that
/// matters): every range must be
/// - a non-empty multiple of 4 KiB at a 4 KiB-aligned offset, at most [`MAX_KEYSLOTS_SIZE`]
///   bytes in all and at most one range per possible keyslot;
/// - inside the keyslots area the header declares, `[2*hdr_size, 2*hdr_size+keyslots_size)`,
///   with `keyslots_size` itself at most [`MAX_KEYSLOTS_SIZE`] (our own limit, cryptsetup's);
/// - before the data segment, which must start at or after the end of the keyslots area (a
///   header whose data overlaps its keyslots area, e.g. offset 0, gets no wipe at all) and
///   inside the device;
/// - outside every keyslot area the header still references (`wipe_keyslot_area` re-checks).
///
/// So the worst a forged record can do is overwrite keyslot-area bytes no keyslot uses.
/// A pending-wipe record checked: its token id and the `(offset, size)` ranges to overwrite.
type WipePlan = (u32, Vec<(u64, u64)>);

fn wipe_plan(hdr: &Luks2Header, device: u64) -> Result<Option<WipePlan>, String> {
    let Some((id, t)) = hdr.tokens().find(|(_, t)| t.type_name() == WIPE_TOKEN) else {
        return Ok(None);
    };
    let md = &hdr.metadata;
    let start = 2 * hdr.hdr_size();
    let ks_size = md.config.keyslots_size;
    if ks_size > MAX_KEYSLOTS_SIZE {
        return Err(format!(
            "the keyslots area of {ks_size} bytes is larger than {MAX_KEYSLOTS_SIZE}"
        ));
    }
    let area_end = start + ks_size;
    if md.segment.offset < area_end {
        return Err(format!(
            "the data segment at {} does not start after the keyslots area (ends at {area_end})",
            md.segment.offset
        ));
    }
    let Some(list) = t.json().get("areas").and_then(Value::as_array) else {
        return Err("no \"areas\" array".into());
    };
    if list.len() > MAX_KEYSLOTS as usize + 1 {
        return Err(format!(
            "{} areas named (at most {})",
            list.len(),
            MAX_KEYSLOTS + 1
        ));
    }
    let num = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .and_then(|s| s.parse::<u64>().ok())
    };
    let mut out = Vec::new();
    let mut total = 0u64;
    for a in list {
        let pair = a
            .as_array()
            .map(|p| (num(p.first()), num(p.get(1)), p.len()));
        let Some((Some(off), Some(size), 2)) = pair else {
            return Err(format!("area {a} is not [\"offset\", \"size\"]"));
        };
        let end = off.saturating_add(size);
        if size == 0 || off % KEYSLOTS_ALIGN != 0 || size % KEYSLOTS_ALIGN != 0 {
            return Err(format!(
                "area [{off}, +{size}) is empty or not 4 KiB aligned"
            ));
        }
        if off < start || end > area_end || end > md.segment.offset || end > device {
            return Err(format!(
                "area [{off}, +{size}) is not inside the keyslots area [{start}, {area_end})"
            ));
        }
        for (ks, k) in &md.keyslots {
            if let Some((o, l)) = k.area_extent() {
                if off < o.saturating_add(l) && o < end {
                    return Err(format!(
                        "area [{off}, +{size}) overlaps keyslot {ks}, which is in use"
                    ));
                }
            }
        }
        if out
            .iter()
            .any(|&(o, l): &(u64, u64)| off < o + l && o < end)
        {
            return Err(format!("area [{off}, +{size}) is named twice"));
        }
        total = total.saturating_add(size);
        out.push((off, size));
    }
    if total > ks_size {
        return Err(format!("{total} bytes named, more than the keyslots area"));
    }
    Ok(Some((id, out)))
}

/// Finishes the wipe a re-encryption's last step was doing when it was interrupted (crash,
/// kill -9, power cut between the final header commit and the end of the wipe): the areas the
/// [`WIPE_TOKEN`] record names are overwritten with random bytes, synced, and the record is
/// removed. See `wipe_plan` for the rule that keeps a forged record from overwriting anything
/// in use. Call with the volume open read-write and nothing else writing its header.
pub fn complete_pending_wipe(file: &dyn HeaderIo) -> Result<PendingWipe, FormatError> {
    let (hdr, _) = Luks2Header::read_reencrypt(file)?;
    if hdr.metadata.reenc_segments.is_some()
        || !hdr.tokens().any(|(_, t)| t.type_name() == WIPE_TOKEN)
    {
        return Ok(PendingWipe::Nothing);
    }
    let _lock = lock(file, LockMode::Exclusive)?;
    let (mut hdr, _) = Luks2Header::read_reencrypt(file)?;
    if hdr.metadata.reenc_segments.is_some() {
        return Ok(PendingWipe::Nothing);
    }
    let plan = match wipe_plan(&hdr, device_size(file)?) {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(PendingWipe::Nothing),
        Err(why) => return Ok(PendingWipe::Refused(why)),
    };
    let (id, areas) = plan;
    let md = hdr.metadata.clone();
    let mut bytes = 0;
    for &(off, size) in &areas {
        // Slot number only names the range in errors; it no longer exists.
        wipe_keyslot_area(file, &md, hdr.hdr_size(), u32::MAX, off, size)?;
        bytes += size;
    }
    let mut md = hdr.metadata.clone();
    md.tokens.remove(&id);
    hdr.commit(file, md)?;
    Ok(PendingWipe::Wiped(areas.len(), bytes))
}

/// Reads the re-encryption state of a volume without keys (for status and dump): `None` for a
/// volume not being re-encrypted. NOT digest-verified: display only, never act on it.
pub fn peek(file: &dyn super::HeaderIo) -> Result<Option<ReencState>, FormatError> {
    let (hdr, _) = Luks2Header::read_reencrypt(file)?;
    if hdr.metadata.reenc_segments.is_none() {
        return Ok(None);
    }
    ReencState::from_header(&hdr, device_size(file)?).map(Some)
}

#[cfg(test)]
#[path = "reencrypt_tests.rs"]
mod tests;
