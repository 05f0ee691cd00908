//! The JSON area as typed `Metadata`: keyslots, tokens, segments, digests and config, parsed
//! once with every rule of the format checked, and encoded back in cryptsetup's member order.
//!
//! Unknown members are kept (`extra`) and written back after the known ones; tokens are kept as
//! whole JSON objects. Volumes this project must not touch are refused here with the reason:
//! mandatory requirements, reencryption state, ciphers other than aes-xts-plain64, more than
//! one segment. Does no I/O and no cryptography.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::{Map, Value};

use super::error::{FormatError, HeaderCopy};
use super::layout::{
    json_area_size, AF_STRIPES, KDF_SALT_LEN, KEYSLOTS_ALIGN, MAX_KEYSLOTS, MAX_KEYSLOTS_SIZE,
    MAX_SEGMENTS, MAX_TOKENS,
};
use crate::crypto::kdf::{HashAlg, KdfParams};

/// The only cipher this project serves or uses for keyslot areas.
pub const CIPHER: &str = "aes-xts-plain64";

/// Parsed and validated JSON metadata of one header.
#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    pub(crate) keyslots: BTreeMap<u32, Keyslot>,
    pub(crate) tokens: BTreeMap<u32, Token>,
    /// Segment "0", the only one a servable volume has.
    pub(crate) segment: Segment,
    pub(crate) digests: BTreeMap<u32, DigestEntry>,
    pub(crate) config: Config,
    /// Unknown top-level members, preserved.
    pub(crate) extra: Map<String, Value>,
    /// Every segment ("0".."k-1" and the `backup-*` ones) of a header in the middle of a
    /// re-encryption, parsed only by [`Metadata::parse_area_reencrypt`]; `None` for a normal
    /// volume (then `segment` is the only one). When set, `segment` is a copy of segment 0 and
    /// this map is what gets written. Its meaning is checked in `luks2::reencrypt`.
    pub(crate) reenc_segments: Option<BTreeMap<u32, Segment>>,
}

// A handful of keyslots parsed once: boxing the large variant buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Keyslot {
    Luks2(Luks2Keyslot),
    /// A keyslot type we do not implement: kept verbatim, never tried, wiped or rewritten. Its
    /// area is validated like any other (inside the keyslots area, no overlap), as cryptsetup
    /// does, so allocation can avoid it.
    Other {
        type_name: String,
        area: (u64, u64),
        raw: Map<String, Value>,
    },
}

impl Keyslot {
    /// `(offset, size)` of the keyslot area (every keyslot has one).
    pub(crate) fn area_extent(&self) -> Option<(u64, u64)> {
        match self {
            Keyslot::Luks2(k) => Some((k.area.offset, k.area.size)),
            Keyslot::Other { area, .. } => Some(*area),
        }
    }
}

/// Try order for "any keyslot": 2 first, then 1; 0 only when named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeyslotPriority {
    Ignore = 0,
    Normal = 1,
    Prefer = 2,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Luks2Keyslot {
    /// Length of the key this slot stores (= volume key length).
    pub key_size: u32,
    /// `None` when absent (means Normal; cryptsetup drops the member for Normal).
    pub priority: Option<KeyslotPriority>,
    pub af: Af,
    pub area: Area,
    pub kdf: Kdf,
    pub extra: Map<String, Value>,
}

impl Luks2Keyslot {
    pub(crate) fn priority(&self) -> KeyslotPriority {
        self.priority.unwrap_or(KeyslotPriority::Normal)
    }

    /// Everything needed to open the slot, or why we cannot.
    pub(crate) fn usable(&self) -> Result<(KdfParams, HashAlg), String> {
        if self.area.encryption != CIPHER {
            return Err(format!(
                "area encryption {:?} is not {CIPHER}",
                self.area.encryption
            ));
        }
        if !matches!(self.area.key_size, 32 | 64) {
            return Err(format!(
                "area key_size {} is not 32 or 64",
                self.area.key_size
            ));
        }
        if self.af.stripes != AF_STRIPES {
            return Err(format!(
                "af stripes {} is not {AF_STRIPES}",
                self.af.stripes
            ));
        }
        let af_hash = HashAlg::from_name(&self.af.hash)
            .ok_or_else(|| format!("af hash {:?} is not supported", self.af.hash))?;
        Ok((self.kdf.params()?, af_hash))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Af {
    pub stripes: u32,
    pub hash: String,
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Area {
    pub offset: u64,
    pub size: u64,
    pub encryption: String,
    /// Area-encryption key length = KDF output length.
    pub key_size: u32,
    pub extra: Map<String, Value>,
}

/// A keyslot's `kdf` object. Exactly the defined members; extra ones are dropped on rewrite, as
/// cryptsetup's in-memory repair does.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Kdf {
    pub kind: KdfKind,
    pub salt: [u8; KDF_SALT_LEN],
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum KdfKind {
    /// `hash` kept as a name: an unknown hash makes the slot unusable, not the header invalid.
    Pbkdf2 {
        hash: String,
        iterations: u32,
    },
    Argon2i {
        time: u32,
        memory: u32,
        cpus: u32,
    },
    Argon2id {
        time: u32,
        memory: u32,
        cpus: u32,
    },
}

impl Kdf {
    pub(crate) fn params(&self) -> Result<KdfParams, String> {
        Ok(match &self.kind {
            KdfKind::Pbkdf2 { hash, iterations } => KdfParams::Pbkdf2 {
                hash: HashAlg::from_name(hash)
                    .ok_or_else(|| format!("kdf hash {hash:?} is not supported"))?,
                iterations: *iterations,
            },
            KdfKind::Argon2i { time, memory, cpus } => KdfParams::Argon2i {
                time: *time,
                memory_kib: *memory,
                cpus: *cpus,
            },
            KdfKind::Argon2id { time, memory, cpus } => KdfParams::Argon2id {
                time: *time,
                memory_kib: *memory,
                cpus: *cpus,
            },
        })
    }

    pub(crate) fn from_params(params: &KdfParams, salt: [u8; KDF_SALT_LEN]) -> Kdf {
        let kind = match *params {
            KdfParams::Pbkdf2 { hash, iterations } => KdfKind::Pbkdf2 {
                hash: hash.name().to_string(),
                iterations,
            },
            KdfParams::Argon2i {
                time,
                memory_kib,
                cpus,
            } => KdfKind::Argon2i {
                time,
                memory: memory_kib,
                cpus,
            },
            KdfParams::Argon2id {
                time,
                memory_kib,
                cpus,
            } => KdfKind::Argon2id {
                time,
                memory: memory_kib,
                cpus,
            },
        };
        Kdf { kind, salt }
    }
}

/// Size of a segment: to the end of the device, or fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentSize {
    Dynamic,
    Bytes(u64),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Segment {
    pub offset: u64,
    pub size: SegmentSize,
    pub iv_tweak: u64,
    pub encryption: String,
    pub sector_size: u32,
    pub flags: Option<Vec<String>>,
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DigestEntry {
    pub keyslots: Vec<u32>,
    pub segments: Vec<u32>,
    pub hash: HashAlg,
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub digest: Vec<u8>,
    pub extra: Map<String, Value>,
}

/// A token: `type` and `keyslots` checked, the whole object kept as written.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub(crate) type_name: String,
    pub(crate) keyslots: Vec<u32>,
    pub(crate) object: Map<String, Value>,
}

impl Token {
    /// Builds a token from a JSON object with `type` (non-empty string) and `keyslots` (array of
    /// keyslot-name strings). Keyslot existence is checked when it is added to a header.
    pub fn from_json(object: Map<String, Value>) -> Result<Token, FormatError> {
        parse_token(object, "token")
    }

    pub fn type_name(&self) -> &str {
        &self.type_name
    }

    pub fn keyslots(&self) -> &[u32] {
        &self.keyslots
    }

    /// The whole token object, including `type` and `keyslots`.
    pub fn json(&self) -> &Map<String, Value> {
        &self.object
    }

    pub(crate) fn set_keyslots(&mut self, keyslots: Vec<u32>) {
        let list = keyslots
            .iter()
            .map(|k| Value::String(k.to_string()))
            .collect();
        self.keyslots = keyslots;
        if let Some(v) = self.object.get_mut("keyslots") {
            *v = Value::Array(list);
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Config {
    pub json_size: u64,
    pub keyslots_size: u64,
    pub flags: Option<Vec<String>>,
    /// Kept verbatim; its `mandatory` list is empty (a volume with requirements is refused).
    pub requirements: Option<Value>,
    pub extra: Map<String, Value>,
}

impl Metadata {
    /// Parses the JSON area of a copy whose `hdr_size` is known. `copy` only labels errors.
    pub fn parse_area(
        json_area: &[u8],
        hdr_size: u64,
        copy: HeaderCopy,
    ) -> Result<Metadata, FormatError> {
        let text = json_text(json_area).map_err(|reason| FormatError::JsonText { copy, reason })?;
        let root: Value = serde_json::from_slice(text).map_err(|e| FormatError::JsonText {
            copy,
            reason: format!("invalid JSON at line {} column {}", e.line(), e.column()),
        })?;
        Metadata::from_value(&root, hdr_size)
    }

    /// Like [`Metadata::parse_area`], but a header in the middle of a cryptsetup re-encryption
    /// (requirement `online-reencrypt-v2`, a `reencrypt` keyslot, `backup-*` segments) is
    /// parsed instead of refused, with all its segments in `reenc_segments`. Only the
    /// re-encryption engine (`luks2::reencrypt`) reads headers this way; it checks what the
    /// state means and its digest before using it.
    pub(crate) fn parse_area_reencrypt(
        json_area: &[u8],
        hdr_size: u64,
        copy: HeaderCopy,
    ) -> Result<Metadata, FormatError> {
        let text = json_text(json_area).map_err(|reason| FormatError::JsonText { copy, reason })?;
        let root: Value = serde_json::from_slice(text).map_err(|e| FormatError::JsonText {
            copy,
            reason: format!("invalid JSON at line {} column {}", e.line(), e.column()),
        })?;
        Metadata::from_value_mode(&root, hdr_size, true)
    }

    pub(crate) fn from_value(root: &Value, hdr_size: u64) -> Result<Metadata, FormatError> {
        Metadata::from_value_mode(root, hdr_size, false)
    }

    pub(crate) fn from_value_mode(
        root: &Value,
        hdr_size: u64,
        allow_reencrypt: bool,
    ) -> Result<Metadata, FormatError> {
        let top = as_obj(root, "(top level)")?;
        let in_reencryption = match refuse_reencryption_and_requirements(top) {
            Ok(()) => false,
            Err(FormatError::ReencryptionInProgress { .. }) if allow_reencrypt => {
                super::reencrypt::check_requirements(top)?;
                true
            }
            Err(e) => return Err(e),
        };

        let config = parse_config(obj_member(top, "config", "")?)?;
        let expected_json = json_area_size(hdr_size);
        if config.json_size != expected_json {
            return Err(FormatError::meta(
                "config.json_size",
                format!(
                    "{} does not match hdr_size {hdr_size} (expected {expected_json})",
                    config.json_size
                ),
            ));
        }

        let mut keyslots = BTreeMap::new();
        for (name, v) in obj_member(top, "keyslots", "")? {
            let id = parse_id(name, "keyslots", Some(MAX_KEYSLOTS))?;
            keyslots.insert(id, parse_keyslot(v, &format!("keyslots.{id}"))?);
        }

        let seg_obj = obj_member(top, "segments", "")?;
        let mut reenc_segments = None;
        if in_reencryption {
            let mut all = BTreeMap::new();
            for (name, v) in seg_obj {
                let id = parse_id(name, "segments", Some(MAX_SEGMENTS))?;
                all.insert(id, parse_segment_mode(v, &format!("segments.{id}"), true)?);
            }
            reenc_segments = Some(all);
        }
        if reenc_segments.is_none() && seg_obj.len() != 1 {
            return Err(FormatError::Unsupported(format!(
                "{} segments (only single-segment volumes are served)",
                seg_obj.len()
            )));
        }
        let mut segment = reenc_segments.as_ref().and_then(|all| all.get(&0).cloned());
        for (name, v) in seg_obj.iter().filter(|_| reenc_segments.is_none()) {
            let id = parse_id(name, "segments", Some(MAX_SEGMENTS))?;
            if id != 0 {
                return Err(FormatError::Unsupported(format!(
                    "segment {id} without segment 0"
                )));
            }
            segment = Some(parse_segment(v, "segments.0")?);
        }
        let segment = segment.ok_or_else(|| FormatError::meta("segments", "no segment"))?;

        let mut digests = BTreeMap::new();
        for (name, v) in obj_member(top, "digests", "")? {
            let id = parse_id(name, "digests", None)?;
            digests.insert(id, parse_digest(v, &format!("digests.{id}"))?);
        }

        let mut tokens = BTreeMap::new();
        for (name, v) in obj_member(top, "tokens", "")? {
            let id = parse_id(name, "tokens", Some(MAX_TOKENS))?;
            let path = format!("tokens.{id}");
            tokens.insert(id, parse_token(as_obj(v, &path)?.clone(), &path)?);
        }

        let extra = extras(
            top,
            &["keyslots", "tokens", "segments", "digests", "config"],
        );
        let md = Metadata {
            keyslots,
            tokens,
            segment,
            digests,
            config,
            extra,
            reenc_segments,
        };
        md.validate(hdr_size)?;
        Ok(md)
    }

    /// Cross-object rules (cryptsetup's, and a few stricter ones): every keyslot area, whatever
    /// the keyslot type, inside the keyslots area and disjoint from the others; the keyslots
    /// area before the data; digest and token references to objects that exist; each luks2
    /// keyslot bound to exactly one digest; a digest for the data segment. Linear or
    /// `n log n` in the number of objects and references.
    pub(crate) fn validate(&self, hdr_size: u64) -> Result<(), FormatError> {
        let area_start = 2 * hdr_size;
        let area_end = area_start
            .checked_add(self.config.keyslots_size)
            .ok_or_else(|| FormatError::meta("config.keyslots_size", "overflows"))?;
        // A detached header (segment at 0) has no data after its own keyslots area.
        if self.segment.offset != 0 && area_end > self.segment.offset {
            return Err(FormatError::meta(
                "segments.0.offset",
                format!(
                    "{} lies inside the metadata/keyslots area (ends at {area_end})",
                    self.segment.offset
                ),
            ));
        }
        let mut extents: Vec<(u64, u64, u32)> = Vec::with_capacity(self.keyslots.len());
        for (&id, ks) in &self.keyslots {
            let Some((off, size)) = ks.area_extent() else {
                continue;
            };
            let field = format!("keyslots.{id}.area");
            if size == 0 {
                return Err(FormatError::meta(field, "size is zero"));
            }
            let end = off
                .checked_add(size)
                .ok_or_else(|| FormatError::meta(field.clone(), "offset + size overflows"))?;
            if off < area_start || end > area_end {
                return Err(FormatError::meta(
                    field,
                    format!(
                        "[{off}, {end}) is outside the keyslots area [{area_start}, {area_end})"
                    ),
                ));
            }
            if let Keyslot::Luks2(_) = ks {
                // Stricter than cryptsetup (which allocates 4096-aligned areas): keyslot
                // material is read and written in whole 512-byte units.
                if !off.is_multiple_of(512) || !size.is_multiple_of(512) {
                    return Err(FormatError::meta(
                        field,
                        format!("[{off}, {end}) is not aligned to 512 bytes"),
                    ));
                }
            }
            extents.push((off, end, id));
        }
        extents.sort_unstable();
        for w in extents.windows(2) {
            let ((o1, e1, a), (o2, _, b)) = (w[0], w[1]);
            if o2 < e1 {
                return Err(FormatError::meta(
                    format!("keyslots.{b}.area"),
                    format!("[{o2}, ...) overlaps keyslot {a}'s area [{o1}, {e1})"),
                ));
            }
        }
        // References first: after these checks every list names at most 32 distinct keyslots.
        for (&id, d) in &self.digests {
            for k in &d.keyslots {
                if !self.keyslots.contains_key(k) {
                    return Err(FormatError::meta(
                        format!("digests.{id}.keyslots"),
                        format!("keyslot {k} does not exist"),
                    ));
                }
            }
            for s in &d.segments {
                let exists = match &self.reenc_segments {
                    Some(all) => all.contains_key(s),
                    None => *s == 0,
                };
                if !exists {
                    return Err(FormatError::meta(
                        format!("digests.{id}.segments"),
                        format!("segment {s} does not exist"),
                    ));
                }
            }
        }
        for (&id, t) in &self.tokens {
            for k in &t.keyslots {
                if !self.keyslots.contains_key(k) {
                    return Err(FormatError::meta(
                        format!("tokens.{id}.keyslots"),
                        format!("keyslot {k} does not exist"),
                    ));
                }
            }
        }
        let mut digest_count: BTreeMap<u32, usize> = BTreeMap::new();
        for d in self.digests.values() {
            for k in &d.keyslots {
                *digest_count.entry(*k).or_default() += 1;
            }
        }
        for (&id, ks) in &self.keyslots {
            if let Keyslot::Luks2(_) = ks {
                let n = digest_count.get(&id).copied().unwrap_or(0);
                if n != 1 {
                    return Err(FormatError::meta(
                        format!("keyslots.{id}"),
                        format!("referenced by {n} digests, must be exactly one"),
                    ));
                }
            }
        }
        if !self.digests.values().any(|d| d.segments.contains(&0)) {
            return Err(FormatError::meta(
                "segments.0",
                "no digest covers the crypt segment",
            ));
        }
        Ok(())
    }

    /// The digest that covers the data segment (the volume key's digest).
    pub(crate) fn segment_digest(&self) -> Option<(u32, &DigestEntry)> {
        self.digests
            .iter()
            .find(|(_, d)| d.segments.contains(&0))
            .map(|(i, d)| (*i, d))
    }

    pub(crate) fn digest_of_keyslot(&self, slot: u32) -> Option<(u32, &DigestEntry)> {
        self.digests
            .iter()
            .find(|(_, d)| d.keyslots.contains(&slot))
            .map(|(i, d)| (*i, d))
    }

    /// Compact JSON in cryptsetup's member order.
    pub fn to_json(&self) -> Vec<u8> {
        let mut top = Map::new();
        let mut ks = Map::new();
        for (id, k) in &self.keyslots {
            ks.insert(id.to_string(), encode_keyslot(k));
        }
        top.insert("keyslots".into(), Value::Object(ks));
        let mut toks = Map::new();
        for (id, t) in &self.tokens {
            toks.insert(id.to_string(), Value::Object(t.object.clone()));
        }
        top.insert("tokens".into(), Value::Object(toks));
        let mut segs = Map::new();
        match &self.reenc_segments {
            Some(all) => {
                for (id, seg) in all {
                    segs.insert(id.to_string(), encode_segment(seg));
                }
            }
            None => {
                segs.insert("0".into(), encode_segment(&self.segment));
            }
        }
        top.insert("segments".into(), Value::Object(segs));
        let mut digs = Map::new();
        for (id, d) in &self.digests {
            digs.insert(id.to_string(), encode_digest(d));
        }
        top.insert("digests".into(), Value::Object(digs));
        top.insert("config".into(), encode_config(&self.config));
        append(&mut top, &self.extra);
        // Serializing a Value tree cannot fail (all keys are strings).
        serde_json::to_vec(&Value::Object(top)).unwrap_or_default()
    }

    /// Drops `slot` from every digest's and token's `keyslots` (tokens stay, possibly orphaned,
    /// as cryptsetup leaves them).
    pub(crate) fn unlink_keyslot(&mut self, slot: u32) {
        for d in self.digests.values_mut() {
            d.keyslots.retain(|&k| k != slot);
        }
        for t in self.tokens.values_mut() {
            if t.keyslots.contains(&slot) {
                let list = t.keyslots.iter().copied().filter(|&k| k != slot).collect();
                t.set_keyslots(list);
            }
        }
    }
}

/// The JSON text of an area: must start with `{`, end at the first NUL, and be followed only by
/// zeros.
pub(crate) fn json_text(area: &[u8]) -> Result<&[u8], String> {
    if area.first() != Some(&b'{') {
        return Err("does not start with '{'".into());
    }
    let nul = area
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| "JSON text is not NUL-terminated".to_string())?;
    if let Some(pos) = area[nul..].iter().position(|&b| b != 0) {
        return Err(format!(
            "non-zero byte after the JSON text at area offset {}",
            nul + pos
        ));
    }
    Ok(&area[..nul])
}

// ---- refusals ---------------------------------------------------------------------------------

fn refuse_reencryption_and_requirements(top: &Map<String, Value>) -> Result<(), FormatError> {
    if let Some(Value::Object(config)) = top.get("config") {
        if let Some(req) = config.get("requirements") {
            let req = as_obj(req, "config.requirements")?;
            if let Some(m) = req.get("mandatory") {
                let list = str_list(m, "config.requirements.mandatory")?;
                if let Some(r) = list.iter().find(|r| r.contains("reencrypt")) {
                    return Err(FormatError::ReencryptionInProgress {
                        reason: format!("mandatory requirement {r:?}"),
                    });
                }
                if !list.is_empty() {
                    return Err(FormatError::UnmetRequirements(list));
                }
            }
        }
    }
    if let Some(Value::Object(keyslots)) = top.get("keyslots") {
        for (name, ks) in keyslots {
            if ks.get("type").and_then(Value::as_str) == Some("reencrypt") {
                return Err(FormatError::ReencryptionInProgress {
                    reason: format!("keyslot {name} has type reencrypt"),
                });
            }
        }
    }
    if let Some(Value::Object(segments)) = top.get("segments") {
        for (name, seg) in segments {
            if let Some(Value::Array(flags)) = seg.get("flags") {
                for f in flags.iter().filter_map(Value::as_str) {
                    if f.starts_with("backup-") || f == "in-reencryption" {
                        return Err(FormatError::ReencryptionInProgress {
                            reason: format!("segment {name} has flag {f:?}"),
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

// ---- per-object parsers -----------------------------------------------------------------------

fn parse_config(c: &Map<String, Value>) -> Result<Config, FormatError> {
    let p = "config";
    let json_size = u64_str(c, "json_size", p)?;
    let keyslots_size = u64_str(c, "keyslots_size", p)?;
    if !keyslots_size.is_multiple_of(KEYSLOTS_ALIGN) || keyslots_size > MAX_KEYSLOTS_SIZE {
        return Err(FormatError::meta(
            "config.keyslots_size",
            format!("{keyslots_size} is not a multiple of 4096 up to {MAX_KEYSLOTS_SIZE}"),
        ));
    }
    let flags = match c.get("flags") {
        None => None,
        Some(v) => Some(str_list(v, "config.flags")?),
    };
    Ok(Config {
        json_size,
        keyslots_size,
        flags,
        requirements: c.get("requirements").cloned(),
        extra: extras(c, &["json_size", "keyslots_size", "flags", "requirements"]),
    })
}

fn parse_keyslot(v: &Value, path: &str) -> Result<Keyslot, FormatError> {
    let o = as_obj(v, path)?;
    let type_name = str_member(o, "type", path)?;
    if type_name.is_empty() {
        return Err(FormatError::meta(format!("{path}.type"), "empty"));
    }
    if type_name != "luks2" {
        // Unknown type: keep it, but what every keyslot must have is checked (as cryptsetup
        // does): a 32-bit key_size and an area with a type, an offset and a size. The area is
        // validated against the others in `Metadata::validate`.
        u32_num(o, "key_size", path)?;
        let arp = format!("{path}.area");
        let ar = obj_member(o, "area", path)?;
        if str_member(ar, "type", &arp)?.is_empty() {
            return Err(FormatError::meta(format!("{arp}.type"), "empty"));
        }
        let area = (u64_str(ar, "offset", &arp)?, u64_str(ar, "size", &arp)?);
        return Ok(Keyslot::Other {
            type_name: type_name.to_string(),
            area,
            raw: o.clone(),
        });
    }
    let key_size = u32_num(o, "key_size", path)?;
    if key_size == 0 || key_size > 512 {
        return Err(FormatError::meta(
            format!("{path}.key_size"),
            format!("{key_size} out of range"),
        ));
    }
    let priority = match o.get("priority") {
        None => None,
        Some(_) => Some(match u32_num(o, "priority", path)? {
            0 => KeyslotPriority::Ignore,
            1 => KeyslotPriority::Normal,
            2 => KeyslotPriority::Prefer,
            n => {
                return Err(FormatError::meta(
                    format!("{path}.priority"),
                    format!("{n} is not 0, 1 or 2"),
                ))
            }
        }),
    };

    let ap = format!("{path}.af");
    let a = obj_member(o, "af", path)?;
    expect_str(a, "type", "luks1", &ap)?;
    let af = Af {
        stripes: u32_num(a, "stripes", &ap)?,
        hash: str_member(a, "hash", &ap)?.to_string(),
        extra: extras(a, &["type", "stripes", "hash"]),
    };

    let arp = format!("{path}.area");
    let ar = obj_member(o, "area", path)?;
    expect_str(ar, "type", "raw", &arp)?;
    let area = Area {
        offset: u64_str(ar, "offset", &arp)?,
        size: u64_str(ar, "size", &arp)?,
        encryption: str_member(ar, "encryption", &arp)?.to_string(),
        key_size: u32_num(ar, "key_size", &arp)?,
        extra: extras(ar, &["type", "offset", "size", "encryption", "key_size"]),
    };

    let kp = format!("{path}.kdf");
    let k = obj_member(o, "kdf", path)?;
    let salt_vec = b64_member(k, "salt", &kp)?;
    let salt: [u8; KDF_SALT_LEN] = salt_vec.as_slice().try_into().map_err(|_| {
        FormatError::meta(
            format!("{kp}.salt"),
            format!("{} bytes, must be 32", salt_vec.len()),
        )
    })?;
    let kind = match str_member(k, "type", &kp)? {
        "pbkdf2" => KdfKind::Pbkdf2 {
            hash: str_member(k, "hash", &kp)?.to_string(),
            iterations: u32_num(k, "iterations", &kp)?,
        },
        t @ ("argon2i" | "argon2id") => {
            let time = u32_num(k, "time", &kp)?;
            let memory = u32_num(k, "memory", &kp)?;
            let cpus = u32_num(k, "cpus", &kp)?;
            if t == "argon2i" {
                KdfKind::Argon2i { time, memory, cpus }
            } else {
                KdfKind::Argon2id { time, memory, cpus }
            }
        }
        other => {
            return Err(FormatError::meta(
                format!("{kp}.type"),
                format!("unknown kdf {other:?}"),
            ))
        }
    };

    Ok(Keyslot::Luks2(Luks2Keyslot {
        key_size,
        priority,
        af,
        area,
        kdf: Kdf { kind, salt },
        extra: extras(o, &["type", "key_size", "priority", "af", "area", "kdf"]),
    }))
}

fn parse_segment(v: &Value, path: &str) -> Result<Segment, FormatError> {
    parse_segment_mode(v, path, false)
}

/// `any_iv_tweak`: segments of a re-encryption carry their position as `iv_tweak`.
fn parse_segment_mode(v: &Value, path: &str, any_iv_tweak: bool) -> Result<Segment, FormatError> {
    let o = as_obj(v, path)?;
    let t = str_member(o, "type", path)?;
    if t != "crypt" {
        return Err(FormatError::Unsupported(format!(
            "{path}.type is {t:?}, only \"crypt\" is served"
        )));
    }
    if o.contains_key("integrity") {
        return Err(FormatError::Unsupported(format!(
            "{path}.integrity (dm-integrity)"
        )));
    }
    let encryption = str_member(o, "encryption", path)?;
    if encryption != CIPHER {
        return Err(FormatError::UnsupportedCipher {
            field: format!("{path}.encryption"),
            cipher: encryption.to_string(),
        });
    }
    let sector_size = u32_num(o, "sector_size", path)?;
    if !matches!(sector_size, 512 | 1024 | 2048 | 4096) {
        return Err(FormatError::meta(
            format!("{path}.sector_size"),
            format!("{sector_size} is not 512, 1024, 2048 or 4096"),
        ));
    }
    let offset = u64_str(o, "offset", path)?;
    if !offset.is_multiple_of(512) {
        return Err(FormatError::meta(
            format!("{path}.offset"),
            format!("{offset} is not a multiple of 512"),
        ));
    }
    let size = match o.get("size") {
        Some(Value::String(s)) if s == "dynamic" => SegmentSize::Dynamic,
        _ => {
            let n = u64_str(o, "size", path)?;
            if n == 0 || !n.is_multiple_of(512) || !n.is_multiple_of(u64::from(sector_size)) {
                return Err(FormatError::meta(
                    format!("{path}.size"),
                    format!("{n} is not a non-zero multiple of the sector size {sector_size}"),
                ));
            }
            SegmentSize::Bytes(n)
        }
    };
    let iv_tweak = u64_str(o, "iv_tweak", path)?;
    if iv_tweak != 0 && !any_iv_tweak {
        // cryptsetup ignores iv_tweak when activating a single segment; refuse rather than guess.
        return Err(FormatError::Unsupported(format!(
            "{path}.iv_tweak is {iv_tweak}; a single-segment volume must have 0"
        )));
    }
    let flags = match o.get("flags") {
        None => None,
        Some(v) => Some(str_list(v, &format!("{path}.flags"))?),
    };
    Ok(Segment {
        offset,
        size,
        iv_tweak,
        encryption: encryption.to_string(),
        sector_size,
        flags,
        extra: extras(
            o,
            &[
                "type",
                "offset",
                "size",
                "iv_tweak",
                "encryption",
                "sector_size",
                "flags",
            ],
        ),
    })
}

fn parse_digest(v: &Value, path: &str) -> Result<DigestEntry, FormatError> {
    let o = as_obj(v, path)?;
    expect_str(o, "type", "pbkdf2", path)?;
    let hash_name = str_member(o, "hash", path)?;
    let hash = HashAlg::from_name(hash_name)
        .ok_or_else(|| FormatError::Unsupported(format!("{path}.hash {hash_name:?}")))?;
    let salt = b64_member(o, "salt", path)?;
    let digest = b64_member(o, "digest", path)?;
    if salt.is_empty() || salt.len() > 64 {
        return Err(FormatError::meta(
            format!("{path}.salt"),
            format!("{} bytes", salt.len()),
        ));
    }
    if !(16..=64).contains(&digest.len()) {
        return Err(FormatError::meta(
            format!("{path}.digest"),
            format!("{} bytes", digest.len()),
        ));
    }
    let iterations = u32_num(o, "iterations", path)?;
    if iterations == 0 {
        return Err(FormatError::meta(format!("{path}.iterations"), "zero"));
    }
    Ok(DigestEntry {
        keyslots: id_list(o, "keyslots", path, MAX_KEYSLOTS)?,
        segments: id_list(o, "segments", path, MAX_SEGMENTS)?,
        hash,
        iterations,
        salt,
        digest,
        extra: extras(
            o,
            &[
                "type",
                "keyslots",
                "segments",
                "hash",
                "iterations",
                "salt",
                "digest",
            ],
        ),
    })
}

fn parse_token(o: Map<String, Value>, path: &str) -> Result<Token, FormatError> {
    let type_name = str_member(&o, "type", path)?.to_string();
    if type_name.is_empty() {
        return Err(FormatError::meta(format!("{path}.type"), "empty"));
    }
    let keyslots = id_list(&o, "keyslots", path, MAX_KEYSLOTS)?;
    Ok(Token {
        type_name,
        keyslots,
        object: o,
    })
}

// ---- encoders ---------------------------------------------------------------------------------

fn encode_keyslot(k: &Keyslot) -> Value {
    let k = match k {
        Keyslot::Other { raw, .. } => return Value::Object(raw.clone()),
        Keyslot::Luks2(k) => k,
    };
    let mut o = Map::new();
    o.insert("type".into(), "luks2".into());
    o.insert("key_size".into(), k.key_size.into());
    let mut af = Map::new();
    af.insert("type".into(), "luks1".into());
    af.insert("stripes".into(), k.af.stripes.into());
    af.insert("hash".into(), k.af.hash.clone().into());
    append(&mut af, &k.af.extra);
    o.insert("af".into(), Value::Object(af));
    let mut area = Map::new();
    area.insert("type".into(), "raw".into());
    area.insert("offset".into(), k.area.offset.to_string().into());
    area.insert("size".into(), k.area.size.to_string().into());
    area.insert("encryption".into(), k.area.encryption.clone().into());
    area.insert("key_size".into(), k.area.key_size.into());
    append(&mut area, &k.area.extra);
    o.insert("area".into(), Value::Object(area));
    let mut kdf = Map::new();
    match &k.kdf.kind {
        KdfKind::Pbkdf2 { hash, iterations } => {
            kdf.insert("type".into(), "pbkdf2".into());
            kdf.insert("hash".into(), hash.clone().into());
            kdf.insert("iterations".into(), (*iterations).into());
        }
        KdfKind::Argon2i { time, memory, cpus } | KdfKind::Argon2id { time, memory, cpus } => {
            let t = if matches!(k.kdf.kind, KdfKind::Argon2i { .. }) {
                "argon2i"
            } else {
                "argon2id"
            };
            kdf.insert("type".into(), t.into());
            kdf.insert("time".into(), (*time).into());
            kdf.insert("memory".into(), (*memory).into());
            kdf.insert("cpus".into(), (*cpus).into());
        }
    }
    kdf.insert("salt".into(), b64(&k.kdf.salt).into());
    o.insert("kdf".into(), Value::Object(kdf));
    match k.priority {
        // cryptsetup drops the member for Normal.
        None | Some(KeyslotPriority::Normal) => {}
        Some(p) => {
            o.insert("priority".into(), (p as u32).into());
        }
    }
    append(&mut o, &k.extra);
    Value::Object(o)
}

fn encode_segment(s: &Segment) -> Value {
    let mut o = Map::new();
    o.insert("type".into(), "crypt".into());
    o.insert("offset".into(), s.offset.to_string().into());
    o.insert(
        "size".into(),
        match s.size {
            SegmentSize::Dynamic => "dynamic".to_string(),
            SegmentSize::Bytes(n) => n.to_string(),
        }
        .into(),
    );
    o.insert("iv_tweak".into(), s.iv_tweak.to_string().into());
    o.insert("encryption".into(), s.encryption.clone().into());
    o.insert("sector_size".into(), s.sector_size.into());
    if let Some(flags) = &s.flags {
        o.insert("flags".into(), flags.clone().into());
    }
    append(&mut o, &s.extra);
    Value::Object(o)
}

fn encode_digest(d: &DigestEntry) -> Value {
    let mut o = Map::new();
    o.insert("type".into(), "pbkdf2".into());
    o.insert("keyslots".into(), ids(&d.keyslots));
    o.insert("segments".into(), ids(&d.segments));
    o.insert("hash".into(), d.hash.name().into());
    o.insert("iterations".into(), d.iterations.into());
    o.insert("salt".into(), b64(&d.salt).into());
    o.insert("digest".into(), b64(&d.digest).into());
    append(&mut o, &d.extra);
    Value::Object(o)
}

fn encode_config(c: &Config) -> Value {
    let mut o = Map::new();
    o.insert("json_size".into(), c.json_size.to_string().into());
    o.insert("keyslots_size".into(), c.keyslots_size.to_string().into());
    if let Some(flags) = &c.flags {
        o.insert("flags".into(), flags.clone().into());
    }
    if let Some(r) = &c.requirements {
        o.insert("requirements".into(), r.clone());
    }
    append(&mut o, &c.extra);
    Value::Object(o)
}

fn ids(list: &[u32]) -> Value {
    Value::Array(list.iter().map(|k| Value::String(k.to_string())).collect())
}

pub(crate) fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn append(dst: &mut Map<String, Value>, extra: &Map<String, Value>) {
    for (k, v) in extra {
        dst.insert(k.clone(), v.clone());
    }
}

// ---- typed member access with field paths -----------------------------------------------------

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn as_obj<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, FormatError> {
    v.as_object()
        .ok_or_else(|| FormatError::meta(path, "must be an object"))
}

fn member<'a>(o: &'a Map<String, Value>, key: &str, path: &str) -> Result<&'a Value, FormatError> {
    o.get(key)
        .ok_or_else(|| FormatError::meta(join(path, key), "missing"))
}

fn obj_member<'a>(
    o: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a Map<String, Value>, FormatError> {
    as_obj(member(o, key, path)?, &join(path, key))
}

/// A non-empty string member (cryptsetup's `json_contains_string` also refuses "").
fn str_member<'a>(
    o: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a str, FormatError> {
    let s = member(o, key, path)?
        .as_str()
        .ok_or_else(|| FormatError::meta(join(path, key), "must be a string"))?;
    if s.is_empty() {
        return Err(FormatError::meta(join(path, key), "is empty"));
    }
    Ok(s)
}

fn expect_str(
    o: &Map<String, Value>,
    key: &str,
    want: &str,
    path: &str,
) -> Result<(), FormatError> {
    let got = str_member(o, key, path)?;
    if got != want {
        return Err(FormatError::meta(
            join(path, key),
            format!("{got:?} is not {want:?}"),
        ));
    }
    Ok(())
}

/// A "string-uint64": a JSON string of decimal digits. A JSON number here is invalid.
fn u64_str(o: &Map<String, Value>, key: &str, path: &str) -> Result<u64, FormatError> {
    let v = member(o, key, path)?;
    let s = v.as_str().ok_or_else(|| {
        FormatError::meta(
            join(path, key),
            "must be a decimal string (64-bit values are strings)",
        )
    })?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FormatError::meta(
            join(path, key),
            format!("{s:?} is not a decimal number"),
        ));
    }
    s.parse::<u64>()
        .map_err(|_| FormatError::meta(join(path, key), format!("{s:?} does not fit 64 bits")))
}

fn u32_num(o: &Map<String, Value>, key: &str, path: &str) -> Result<u32, FormatError> {
    member(o, key, path)?
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| FormatError::meta(join(path, key), "must be a non-negative integer < 2^32"))
}

fn b64_member(o: &Map<String, Value>, key: &str, path: &str) -> Result<Vec<u8>, FormatError> {
    let s = str_member(o, key, path)?;
    let compact: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|_| FormatError::meta(join(path, key), "not padded standard base64"))
}

fn str_list(v: &Value, path: &str) -> Result<Vec<String>, FormatError> {
    let a = v
        .as_array()
        .ok_or_else(|| FormatError::meta(path, "must be an array"))?;
    a.iter()
        .map(|x| {
            x.as_str()
                .map(str::to_string)
                .ok_or_else(|| FormatError::meta(path, "entries must be strings"))
        })
        .collect()
}

/// An array of object names as strings (`["0","1"]`), each canonical decimal, distinct and below
/// `max` (no keyslot or segment id reaches 32, so a longer list is refused at its 33rd entry).
fn id_list(
    o: &Map<String, Value>,
    key: &str,
    path: &str,
    max: u32,
) -> Result<Vec<u32>, FormatError> {
    let field = join(path, key);
    let a = member(o, key, path)?
        .as_array()
        .ok_or_else(|| FormatError::meta(field.as_str(), "must be an array"))?;
    let mut out = Vec::new();
    // A bit set, not `out.contains`: a hostile list of 400k ids must not take quadratic time.
    let mut seen = 0u64;
    for x in a {
        let s = x
            .as_str()
            .ok_or_else(|| FormatError::meta(field.as_str(), "entries must be strings"))?;
        let id = parse_id(s, &field, None)?;
        if id >= max {
            return Err(FormatError::meta(
                field,
                format!("{id} does not exist (ids are 0..{})", max - 1),
            ));
        }
        if seen & (1u64 << id) != 0 {
            return Err(FormatError::meta(field, format!("{id} listed twice")));
        }
        seen |= 1u64 << id;
        out.push(id);
    }
    Ok(out)
}

/// Canonical decimal object name ("0", "1", ..., no leading zeros), below `max` if given.
fn parse_id(name: &str, field: &str, max: Option<u32>) -> Result<u32, FormatError> {
    let canonical = !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_digit())
        && (name == "0" || !name.starts_with('0'));
    let id = if canonical {
        name.parse::<u32>().ok()
    } else {
        None
    };
    match id {
        Some(id) if max.is_none_or(|m| id < m) => Ok(id),
        _ => Err(FormatError::meta(
            field,
            format!("{name:?} is not a valid id"),
        )),
    }
}

fn extras(o: &Map<String, Value>, known: &[&str]) -> Map<String, Value> {
    o.iter()
        .filter(|(k, _)| !known.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HDR: u64 = 16384;

    pub(crate) fn sample_json() -> Value {
        serde_json::from_str(
            r#"{"keyslots":{"0":{"type":"luks2","key_size":64,
              "af":{"type":"luks1","stripes":4000,"hash":"sha256"},
              "area":{"type":"raw","offset":"32768","size":"258048","encryption":"aes-xts-plain64","key_size":64},
              "kdf":{"type":"pbkdf2","hash":"sha256","iterations":1000,"salt":"pNDs3HenuhqLffxXMNactOeT4YdIeRROu20pejsZP4w="}}},
             "tokens":{"0":{"type":"example-kms","keyslots":["0"],"blob":{"z":1,"a":[1,2]}}},
             "segments":{"0":{"type":"crypt","offset":"16777216","size":"dynamic","iv_tweak":"0",
                  "encryption":"aes-xts-plain64","sector_size":4096}},
             "digests":{"0":{"type":"pbkdf2","keyslots":["0"],"segments":["0"],"hash":"sha256","iterations":1000,
                 "salt":"vGMlQ05OEr8pRTJeJwsKAOIkTLG8DSxk+mpbC6CVYds=","digest":"OC5rddTgYFWsefXPyuvBEbw6HsaJ2K1LEUQGQykXnfU="}},
             "config":{"json_size":"12288","keyslots_size":"16744448"}}"#,
        )
        .unwrap()
    }

    fn parse(v: &Value) -> Result<Metadata, FormatError> {
        Metadata::from_value(v, HDR)
    }

    fn field_of(e: FormatError) -> String {
        match e {
            FormatError::Metadata { field, .. } => field,
            other => panic!("expected a metadata error, got {other:?}"),
        }
    }

    #[test]
    fn sample_parses_and_reencodes_to_the_same_json() {
        let v = sample_json();
        let md = parse(&v).unwrap();
        let back: Value = serde_json::from_slice(&md.to_json()).unwrap();
        assert_eq!(back, v);
        // Member order is cryptsetup's.
        let text = String::from_utf8(md.to_json()).unwrap();
        assert!(text.starts_with(r#"{"keyslots":{"0":{"type":"luks2","key_size":64,"af":"#));
        assert!(!text.contains(' ') && !text.contains("\\/"));
    }

    #[test]
    fn unknown_members_survive_a_rewrite() {
        let mut v = sample_json();
        v["future"] = serde_json::json!({"x": 1});
        v["keyslots"]["0"]["vendor"] = "v".into();
        v["segments"]["0"]["flags"] = serde_json::json!(["some-flag"]);
        v["config"]["flags"] = serde_json::json!(["allow-discards", "who-knows"]);
        let md = parse(&v).unwrap();
        let back: Value = serde_json::from_slice(&md.to_json()).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn extra_kdf_members_are_dropped_like_cryptsetup_repairs_them() {
        let mut v = sample_json();
        v["keyslots"]["0"]["kdf"]["bogus"] = 1.into();
        let md = parse(&v).unwrap();
        let back: Value = serde_json::from_slice(&md.to_json()).unwrap();
        assert!(back["keyslots"]["0"]["kdf"].get("bogus").is_none());
    }

    #[test]
    fn json_text_rules() {
        assert!(json_text(b" {}\0").is_err());
        assert!(json_text(b"{}").is_err());
        assert!(json_text(b"{}\0\0x").is_err());
        assert_eq!(json_text(b"{}\0\0\0").unwrap(), b"{}");
    }

    #[test]
    fn a_64_bit_field_written_as_a_json_number_is_rejected() {
        let mut v = sample_json();
        v["segments"]["0"]["offset"] = 16777216.into();
        assert_eq!(field_of(parse(&v).unwrap_err()), "segments.0.offset");
        let mut v = sample_json();
        v["keyslots"]["0"]["area"]["size"] = "-1".into();
        assert_eq!(field_of(parse(&v).unwrap_err()), "keyslots.0.area.size");
    }

    #[test]
    fn unpadded_base64_is_rejected() {
        let mut v = sample_json();
        v["keyslots"]["0"]["kdf"]["salt"] = "pNDs3HenuhqLffxXMNactOeT4YdIeRROu20pejsZP4w".into();
        assert_eq!(field_of(parse(&v).unwrap_err()), "keyslots.0.kdf.salt");
    }

    #[test]
    fn non_canonical_object_names_and_int_references_are_rejected() {
        let mut v = sample_json();
        let ks = v["keyslots"]["0"].clone();
        v["keyslots"] = serde_json::json!({ "01": ks });
        assert_eq!(field_of(parse(&v).unwrap_err()), "keyslots");
        let mut v = sample_json();
        v["digests"]["0"]["keyslots"] = serde_json::json!([0]);
        assert_eq!(field_of(parse(&v).unwrap_err()), "digests.0.keyslots");
    }

    #[test]
    fn requirements_must_be_an_object() {
        let mut v = sample_json();
        v["config"]["requirements"] = serde_json::json!(["x"]);
        assert_eq!(field_of(parse(&v).unwrap_err()), "config.requirements");
    }

    #[test]
    fn an_unknown_mandatory_requirement_refuses_the_volume() {
        let mut v = sample_json();
        v["config"]["requirements"] = serde_json::json!({"mandatory": ["future-feature"]});
        match parse(&v).unwrap_err() {
            FormatError::UnmetRequirements(list) => assert_eq!(list, vec!["future-feature"]),
            e => panic!("{e:?}"),
        }
        // An empty list is fine.
        let mut v = sample_json();
        v["config"]["requirements"] = serde_json::json!({"mandatory": []});
        parse(&v).unwrap();
    }

    #[test]
    fn the_captured_reencryption_header_is_refused() {
        let text = std::fs::read_to_string(
            super::super::tests::testdata_dir().join("reencrypt-encrypt-initial.json"),
        )
        .unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        let e = parse(&v).unwrap_err();
        assert!(
            matches!(e, FormatError::ReencryptionInProgress { .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("online-reencrypt-v2"));
        // Also without the requirement: the reencrypt keyslot alone is enough.
        let mut v2 = v.clone();
        v2["config"].as_object_mut().unwrap().remove("requirements");
        assert!(matches!(
            parse(&v2).unwrap_err(),
            FormatError::ReencryptionInProgress { .. }
        ));
    }

    #[test]
    fn an_unknown_segment_cipher_is_refused_naming_it() {
        let mut v = sample_json();
        v["segments"]["0"]["encryption"] = "serpent-xts-plain64".into();
        match parse(&v).unwrap_err() {
            FormatError::UnsupportedCipher { field, cipher } => {
                assert_eq!(field, "segments.0.encryption");
                assert_eq!(cipher, "serpent-xts-plain64");
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn a_nonzero_iv_tweak_and_odd_sector_sizes_are_refused() {
        let mut v = sample_json();
        v["segments"]["0"]["iv_tweak"] = "8".into();
        assert!(matches!(
            parse(&v).unwrap_err(),
            FormatError::Unsupported(_)
        ));
        let mut v = sample_json();
        v["segments"]["0"]["sector_size"] = 1536.into();
        assert_eq!(field_of(parse(&v).unwrap_err()), "segments.0.sector_size");
        let mut v = sample_json();
        v["segments"]["0"]["size"] = "4608".into();
        assert_eq!(field_of(parse(&v).unwrap_err()), "segments.0.size");
    }

    #[test]
    fn a_token_pointing_to_a_missing_keyslot_invalidates_the_header() {
        let mut v = sample_json();
        v["tokens"]["0"]["keyslots"] = serde_json::json!(["5"]);
        assert_eq!(field_of(parse(&v).unwrap_err()), "tokens.0.keyslots");
    }

    #[test]
    fn keyslot_areas_must_lie_in_the_keyslots_area_and_not_overlap() {
        let mut v = sample_json();
        v["keyslots"]["0"]["area"]["offset"] = "16384".into();
        assert_eq!(field_of(parse(&v).unwrap_err()), "keyslots.0.area");
        let mut v = sample_json();
        let mut ks1 = v["keyslots"]["0"].clone();
        ks1["area"]["offset"] = "36864".into();
        v["keyslots"]["1"] = ks1;
        v["digests"]["0"]["keyslots"] = serde_json::json!(["0", "1"]);
        assert_eq!(field_of(parse(&v).unwrap_err()), "keyslots.1.area");
    }

    #[test]
    fn each_luks2_keyslot_needs_exactly_one_digest() {
        let mut v = sample_json();
        v["digests"]["0"]["keyslots"] = serde_json::json!([]);
        assert_eq!(field_of(parse(&v).unwrap_err()), "keyslots.0");
    }

    #[test]
    fn json_size_must_match_hdr_size() {
        let v = sample_json();
        assert_eq!(
            field_of(Metadata::from_value(&v, 32768).unwrap_err()),
            "config.json_size"
        );
    }

    #[test]
    fn unusable_keyslot_parameters_do_not_invalidate_the_header() {
        let mut v = sample_json();
        v["keyslots"]["0"]["kdf"]["hash"] = "whirlpool".into();
        let md = parse(&v).unwrap();
        let Keyslot::Luks2(k) = &md.keyslots[&0] else {
            panic!()
        };
        assert!(k.usable().unwrap_err().contains("whirlpool"));
    }

    fn foreign_keyslot(offset: &str, size: &str) -> Value {
        serde_json::json!({"type": "foo", "key_size": 64,
            "area": {"type": "raw", "offset": offset, "size": size}})
    }

    #[test]
    fn a_foreign_keyslot_over_the_data_segment_is_refused_naming_it() {
        // The issue-8 header: remove-key used to wipe this "area", i.e. the whole data.
        let mut v = sample_json();
        v["keyslots"]["1"] = foreign_keyslot("16777216", "1073741824");
        let e = parse(&v).unwrap_err();
        assert!(e.to_string().contains("outside the keyslots area"), "{e}");
        assert_eq!(field_of(e), "keyslots.1.area");
        // Overlapping keyslot 0, or inside the JSON areas.
        for (off, size) in [("36864", "4096"), ("0", "4096"), ("16384", "4096")] {
            let mut v = sample_json();
            v["keyslots"]["1"] = foreign_keyslot(off, size);
            assert_eq!(
                field_of(parse(&v).unwrap_err()),
                "keyslots.1.area",
                "{off}+{size}"
            );
        }
        // Overflowing offset + size, empty area.
        let mut v = sample_json();
        v["keyslots"]["1"] = foreign_keyslot("18446744073709551615", "4096");
        assert_eq!(field_of(parse(&v).unwrap_err()), "keyslots.1.area");
        let mut v = sample_json();
        v["keyslots"]["1"] = foreign_keyslot("1048576", "0");
        assert_eq!(field_of(parse(&v).unwrap_err()), "keyslots.1.area");
    }

    #[test]
    fn a_foreign_keyslot_needs_an_area_and_a_key_size() {
        let mut v = sample_json();
        v["keyslots"]["1"] = serde_json::json!({"type": "foo", "key_size": 64});
        assert_eq!(field_of(parse(&v).unwrap_err()), "keyslots.1.area");
        let mut v = sample_json();
        v["keyslots"]["1"] = foreign_keyslot("1048576", "4096");
        v["keyslots"]["1"]
            .as_object_mut()
            .unwrap()
            .remove("key_size");
        assert_eq!(field_of(parse(&v).unwrap_err()), "keyslots.1.key_size");
        let mut v = sample_json();
        v["keyslots"]["1"] = foreign_keyslot("1048576", "4096");
        v["keyslots"]["1"]["area"]["type"] = "".into();
        assert_eq!(field_of(parse(&v).unwrap_err()), "keyslots.1.area.type");
    }

    #[test]
    fn a_valid_foreign_keyslot_is_kept_verbatim() {
        let mut v = sample_json();
        v["keyslots"]["1"] = foreign_keyslot("1048576", "4096");
        v["keyslots"]["1"]["vendor"] = serde_json::json!({"x": [1, 2]});
        let md = parse(&v).unwrap();
        assert!(matches!(
            &md.keyslots[&1],
            Keyslot::Other { type_name, area: (1048576, 4096), .. } if type_name == "foo"
        ));
        let back: Value = serde_json::from_slice(&md.to_json()).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn a_misaligned_luks2_keyslot_area_is_refused() {
        let mut v = sample_json();
        v["keyslots"]["0"]["area"]["offset"] = "32769".into();
        assert_eq!(field_of(parse(&v).unwrap_err()), "keyslots.0.area");
    }

    /// A JSON area of the largest header (4 MiB) whose `path` list holds `n` ids.
    fn huge_list_area(n: usize, path: &[&str], id: impl Fn(usize) -> String) -> (Vec<u8>, u64) {
        let hdr = 0x40_0000u64;
        let mut v = sample_json();
        v["config"]["json_size"] = json_area_size(hdr).to_string().into();
        let list: Vec<Value> = (0..n).map(|i| Value::String(id(i))).collect();
        let mut cur = &mut v;
        for k in path {
            cur = cur.get_mut(*k).unwrap();
        }
        *cur = Value::Array(list);
        let mut area = serde_json::to_vec(&v).unwrap();
        assert!(
            area.len() < json_area_size(hdr) as usize,
            "{} bytes",
            area.len()
        );
        area.resize(json_area_size(hdr) as usize, 0);
        (area, hdr)
    }

    #[test]
    fn a_header_with_400k_ids_is_refused_in_well_under_a_second() {
        let n = 400_000;
        let cases: Vec<(&str, (Vec<u8>, u64))> = vec![
            (
                "distinct digest keyslots",
                huge_list_area(n, &["digests", "0", "keyslots"], |i| i.to_string()),
            ),
            (
                "repeated digest keyslots",
                huge_list_area(n, &["digests", "0", "keyslots"], |_| "0".into()),
            ),
            (
                "distinct token keyslots",
                huge_list_area(n, &["tokens", "0", "keyslots"], |i| i.to_string()),
            ),
            (
                "distinct digest segments",
                huge_list_area(n, &["digests", "0", "segments"], |i| i.to_string()),
            ),
        ];
        for (name, (area, hdr)) in cases {
            // Reference measured in the same run: serde_json alone reading the same text. Each
            // side is the best of three, so a preempted run on a busy machine does not count.
            let best = |f: &mut dyn FnMut()| {
                (0..3)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        f();
                        t.elapsed()
                    })
                    .min()
                    .unwrap_or_default()
            };
            let serde_only = best(&mut || {
                let _: Value = serde_json::from_slice(json_text(&area).unwrap()).unwrap();
            });
            let took = best(&mut || {
                let r = Metadata::parse_area(&area, hdr, HeaderCopy::Primary);
                assert!(r.is_err(), "{name}: accepted");
            });
            eprintln!(
                "{name}: {} bytes refused in {took:?} (serde_json alone {serde_only:?})",
                area.len()
            );
            // Quadratic work on 400k ids is ~10^11 steps (minutes); ours is serde_json's parse
            // plus a linear pass (release build: tens of milliseconds in all). The margin is wide
            // on purpose: this guards the complexity, not the speed.
            assert!(
                took < serde_only * 4 + std::time::Duration::from_secs(1),
                "{name}: took {took:?}, serde_json alone {serde_only:?}"
            );
        }
    }

    #[test]
    fn parser_never_panics_on_type_confusion() {
        // Replace every member, one at a time, with values of the wrong type.
        fn walk(v: &Value, path: Vec<String>, out: &mut Vec<Vec<String>>) {
            out.push(path.clone());
            if let Value::Object(m) = v {
                for (k, c) in m {
                    let mut p = path.clone();
                    p.push(k.clone());
                    walk(c, p, out);
                }
            }
        }
        let base = sample_json();
        let mut paths = Vec::new();
        walk(&base, vec![], &mut paths);
        for p in paths {
            for bad in [
                Value::Null,
                1.into(),
                (-1).into(),
                "x".into(),
                serde_json::json!([]),
                serde_json::json!({}),
            ] {
                let mut v = base.clone();
                let mut cur = &mut v;
                for k in &p {
                    cur = cur.get_mut(k).unwrap();
                }
                *cur = bad;
                let _ = parse(&v);
            }
        }
    }
}
