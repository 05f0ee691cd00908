//! LUKS2 targets: the binary header, the JSON metadata (raw and structure-aware), and a whole
//! image followed by unlock. The image is handed to the library as a memory-backed `File`
//! (memfd), the way the daemon hands it a volume.
//!
//! The fuzzer cannot compute SHA-256, so harnesses repair header checksums where a control
//! bit asks for it; with the bit clear the checksum check itself is fuzzed.

use arbitrary::{Arbitrary, Unstructured};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use nbdcrypt::crypto::keys::SecretBytes;
use nbdcrypt::luks2::layout::*;
use nbdcrypt::luks2::{KdfLimits, Luks2Header, RepairNeeded};

use crate::mem::with_image;

/// The passphrases of the cryptsetup-made test vectors (shared/testdata/luks2), and a wrong one.
pub const PASSPHRASES: [&[u8]; 4] = [
    b"tv-a-pbkdf2-passphrase",
    b"tv-a-argon2id-passphrase",
    b"tv-b-argon2i-passphrase",
    b"tv-c-pbkdf2-sha512-passphrase",
];

/// KDF limits for a stranger's image: a few milliseconds of work per keyslot at most. The test
/// vectors need pbkdf2 1000 iterations and argon2 64 KiB x 4 passes x 2 lanes.
pub const TIGHT_LIMITS: KdfLimits = KdfLimits {
    max_argon2_memory_kib: 256,
    max_argon2_time: 8,
    max_argon2_cost: 256 * 8,
    max_argon2_cpus: 4,
    max_pbkdf2_iterations: 4000,
    max_total_permille: 4000,
};

/// File lengths a control byte can pick: the image as given, or extended (sparse) so that the
/// test vectors' data segments (at 1 MiB and 16 MiB, 64 KiB long) fit.
const EXTEND: [u64; 4] = [0, (1 << 20) + (64 << 10), (16 << 20) + (64 << 10), 4 << 20];

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

/// Recomputes the checksum of the header copy at `off` in `img`, if a copy with an allowed
/// `hdr_size` fits there. Returns that `hdr_size`.
pub fn fix_checksum(img: &mut [u8], off: usize) -> Option<u64> {
    if img.len() < off.checked_add(BIN_HEADER_SIZE)? {
        return None;
    }
    let hdr_size = be64(img, off + OFF_HDR_SIZE);
    if !is_allowed_hdr_size(hdr_size) || img.len() < off + hdr_size as usize {
        return None;
    }
    img[off + OFF_CSUM..off + OFF_CSUM + CSUM_LEN].fill(0);
    let sum = Sha256::digest(&img[off..off + hdr_size as usize]);
    img[off + OFF_CSUM..off + OFF_CSUM + 32].copy_from_slice(&sum);
    Some(hdr_size)
}

/// Applies the checksum bits of `ctrl`: bit 0 the primary copy, bit 1 the secondary copy (at the
/// primary's `hdr_size`, or 16 KiB if that is not an allowed size).
fn fix_checksums(img: &mut [u8], ctrl: u8) {
    let primary = if ctrl & 1 != 0 { fix_checksum(img, 0) } else { None };
    if ctrl & 2 != 0 {
        let off = if img.len() >= BIN_HEADER_SIZE { be64(img, OFF_HDR_SIZE) } else { 0 };
        let off = primary.or(Some(off).filter(|o| is_allowed_hdr_size(*o))).unwrap_or(DEFAULT_HDR_SIZE);
        fix_checksum(img, off as usize);
    }
}

/// Whether the open finding `name` is to be skipped (`NBDCRYPT_FUZZ_SKIP_OPEN`, comma-separated).
fn skip_open(name: &str) -> bool {
    static SKIP: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    SKIP.get_or_init(|| {
        std::env::var("NBDCRYPT_FUZZ_SKIP_OPEN")
            .map(|v| v.split(',').map(str::to_string).collect())
            .unwrap_or_default()
    })
    .iter()
    .any(|s| s == name)
}

/// Everything a caller may ask a parsed header; none of it may panic.
fn exercise(hdr: &Luks2Header) {
    let _ = format!("{hdr:?}");
    let _ = (hdr.uuid(), hdr.label(), hdr.subsystem(), hdr.seqid(), hdr.config_flags());
    let end = hdr.metadata_end();
    assert!(end >= 2 * hdr.hdr_size(), "metadata ends inside the header copies");
    let _ = hdr.data_segment();
    for ks in hdr.keyslots() {
        let _ = format!("{ks:?}");
        // Issue 8: every keyslot area lies inside the keyslots area, whatever its type.
        // NBDCRYPT_FUZZ_SKIP_OPEN=unknown-keyslot-area skips slots of unknown type, to fuzz past
        // that open finding (fuzz/open/luks2_header/) until the validation fix is merged.
        if ks.type_name != "luks2" && skip_open("unknown-keyslot-area") {
            continue;
        }
        if let (Some(off), Some(size)) = (ks.area_offset, ks.area_size) {
            let inside = off >= 2 * hdr.hdr_size() && off.checked_add(size).is_some_and(|e| e <= end);
            assert!(inside, "keyslot {} area {off}+{size} outside the keyslots area ..{end}", ks.id);
        }
    }
    for (id, t) in hdr.tokens() {
        let _ = (id, t.type_name(), t.keyslots(), t.json());
        assert!(hdr.token(id).is_some());
    }
}

/// Reads the header from `file` both ways; if a copy needs repair, repairs it and checks that
/// the repaired volume reads back clean and the same.
fn read_and_repair(file: &std::fs::File, attached: bool, repair: bool) -> Option<Luks2Header> {
    let res = if attached { Luks2Header::read(file) } else { Luks2Header::read_metadata_only(file) };
    let _ = res.as_ref().map_err(|e| e.to_string());
    let (hdr, need) = res.ok()?;
    exercise(&hdr);
    if repair && need != RepairNeeded::None {
        hdr.repair(file, need).expect("repair of an accepted header failed");
        let (again, need2) = Luks2Header::read_metadata_only(file).expect("repaired header unreadable");
        assert_eq!(need2, RepairNeeded::None, "still needs repair after repair");
        assert_eq!(again.uuid(), hdr.uuid());
        assert_eq!(again.seqid(), hdr.seqid());
    }
    Some(hdr)
}

/// `luks2_header`: the input is the start of a device (binary headers and JSON areas) plus a
/// trailing control byte: bits 0-1 repair checksums, bit 2 `read` (attached) instead of
/// `read_metadata_only`, bit 3 repair a stale copy, bits 4-5 pick the device length.
pub fn header(data: &[u8]) {
    let Some((&ctrl, img)) = data.split_last() else { return };
    let mut img = img.to_vec();
    fix_checksums(&mut img, ctrl);
    let len = EXTEND[usize::from(ctrl >> 4) & 3];
    with_image(&img, len, |file| {
        read_and_repair(file, ctrl & 4 != 0, ctrl & 8 != 0);
    });
}

/// `luks2_image_unlock`: a whole image (header copies and keyslot areas) plus a control byte
/// as for [`header`] (bit 3: unlock each keyslot by number too; bits 6-7 pick the
/// passphrase). The header is read and then unlocked with `TIGHT_LIMITS`. A volume key that
/// comes back must verify against the header's digest.
pub fn image_unlock(data: &[u8]) {
    image_unlock_slot(data);
}

/// [`image_unlock`], returning the keyslot that opened (for the seed tests).
pub fn image_unlock_slot(data: &[u8]) -> Option<u32> {
    let (&ctrl, img) = data.split_last()?;
    let mut img = img.to_vec();
    fix_checksums(&mut img, ctrl);
    let len = EXTEND[usize::from(ctrl >> 4) & 3];
    let pass = SecretBytes::from_slice(PASSPHRASES[usize::from(ctrl >> 6)]);
    with_image(&img, len, |file| {
        let hdr = read_and_repair(file, ctrl & 4 != 0, false)?;
        let opened = match hdr.unlock(file, &pass, &TIGHT_LIMITS) {
            Ok((key, slot)) => {
                assert!(hdr.verify_volume_key(&key), "unlock returned a key the digest rejects");
                assert!(hdr.keyslots().iter().any(|k| k.id == slot), "unlocked by unknown slot {slot}");
                Some(slot)
            }
            Err(e) => {
                let _ = e.to_string();
                None
            }
        };
        if ctrl & 8 != 0 {
            for ks in hdr.keyslots().iter().take(4) {
                if let Ok(key) = hdr.unlock_slot(file, ks.id, &pass, &TIGHT_LIMITS) {
                    assert!(hdr.verify_volume_key(&key), "unlock_slot returned a key the digest rejects");
                }
            }
        }
        opened
    })
}

/// Header sizes the JSON targets choose from (larger ones only cost checksum time).
const JSON_HDR_SIZES: [u64; 3] = [0x4000, 0x8000, 0x10000];

/// A binary header for copy `secondary` of a volume with `hdr_size`, checksum not yet set.
pub fn binary_header(secondary: bool, hdr_size: u64, seqid: u64) -> [u8; BIN_HEADER_SIZE] {
    let mut b = [0u8; BIN_HEADER_SIZE];
    let magic = if secondary { MAGIC_SECONDARY } else { MAGIC_PRIMARY };
    b[OFF_MAGIC..OFF_MAGIC + MAGIC_LEN].copy_from_slice(&magic);
    b[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&VERSION.to_be_bytes());
    b[OFF_HDR_SIZE..OFF_HDR_SIZE + 8].copy_from_slice(&hdr_size.to_be_bytes());
    b[OFF_SEQID..OFF_SEQID + 8].copy_from_slice(&seqid.to_be_bytes());
    b[OFF_LABEL..OFF_LABEL + 4].copy_from_slice(b"fuzz");
    b[OFF_CHECKSUM_ALG..OFF_CHECKSUM_ALG + 6].copy_from_slice(CHECKSUM_ALG.as_bytes());
    let uuid = b"12345678-9abc-4def-8123-456789abcdef";
    b[OFF_UUID..OFF_UUID + uuid.len()].copy_from_slice(uuid);
    let off = if secondary { hdr_size } else { 0 };
    b[OFF_HDR_OFFSET..OFF_HDR_OFFSET + 8].copy_from_slice(&off.to_be_bytes());
    b
}

/// Both header copies around `json` (truncated to fit the area, NUL-terminated), checksummed.
pub fn image_with_json(json: &[u8], hdr_size: u64) -> Vec<u8> {
    let hs = hdr_size as usize;
    let mut img = vec![0u8; 2 * hs];
    for (i, secondary) in [false, true].into_iter().enumerate() {
        let off = i * hs;
        img[off..off + BIN_HEADER_SIZE].copy_from_slice(&binary_header(secondary, hdr_size, 7));
        let area = &mut img[off + BIN_HEADER_SIZE..off + hs];
        let n = json.len().min(area.len() - 1);
        area[..n].copy_from_slice(&json[..n]);
        fix_checksum(&mut img, off);
    }
    img
}

/// Parses `json` as the metadata of a volume, attached (data segment on the same device, which
/// is long enough for a 16 MiB default layout) and detached.
fn parse_json_area(json: &[u8], hdr_size: u64) {
    let img = image_with_json(json, hdr_size);
    with_image(&img, (16 << 20) + (1 << 20), |file| {
        read_and_repair(file, true, false);
        read_and_repair(file, false, false);
    });
}

/// `luks2_json_raw`: byte 0 picks the header size, the rest is the JSON area's text.
pub fn json_raw(data: &[u8]) {
    let Some((&sel, json)) = data.split_first() else { return };
    parse_json_area(json, JSON_HDR_SIZES[usize::from(sel) % JSON_HDR_SIZES.len()]);
}

/// `luks2_json_model`: an `arbitrary`-built model of the metadata, serialized to JSON. The
/// model follows the format's shape (keyslots, segments, digests, tokens, config) with numbers
/// drawn near the boundaries the validation has to get right, and sometimes the wrong type.
pub fn json_model(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(m) = Model::arbitrary(&mut u) else { return };
    let hdr_size = JSON_HDR_SIZES[usize::from(m.hdr_size) % JSON_HDR_SIZES.len()];
    let json = m.to_json(hdr_size);
    parse_json_area(&serde_json::to_vec(&json).unwrap(), hdr_size);
}

#[derive(Arbitrary, Debug)]
pub struct Model {
    hdr_size: u8,
    keyslots: Vec<(Id, KeyslotM)>,
    segments: Vec<(Id, SegmentM)>,
    digests: Vec<(Id, DigestM)>,
    tokens: Vec<(Id, TokenM)>,
    config: ConfigM,
    requirements: Option<Vec<Str>>,
    extra: Option<(Str, Num)>,
    drop_member: Option<u8>,
}

/// An object key: usually a small decimal id, sometimes not a number at all.
#[derive(Arbitrary, Debug)]
enum Id {
    Small(u8),
    Big(u64),
    Text(Str),
    Padded(u8),
}

impl Id {
    fn key(&self) -> String {
        match self {
            Id::Small(n) => (n % 40).to_string(),
            Id::Big(n) => n.to_string(),
            Id::Text(s) => s.0.clone(),
            Id::Padded(n) => format!("0{n}"),
        }
    }
}

/// A string from a small vocabulary of names that matter, or arbitrary text.
#[derive(Debug)]
struct Str(String);

impl<'a> Arbitrary<'a> for Str {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        const WORDS: &[&str] = &[
            "luks2", "reencrypt", "raw", "crypt", "linear", "pbkdf2", "argon2i", "argon2id", "sha1",
            "sha256", "sha512", "luks1", "aes-xts-plain64", "aes-cbc-essiv:sha256", "dynamic",
            "online-reencrypt-v2", "allow-discards", "nbdcrypt-aws-kms", "nbdcrypt-pkcs11",
            "systemd-tpm2", "0", "1", "", "-1", "18446744073709551616",
        ];
        Ok(Str(if u.ratio(3, 4)? {
            (*u.choose(WORDS)?).to_string()
        } else {
            String::arbitrary(u)?
        }))
    }
}

/// A JSON number or numeric string, biased to values near the format's limits.
#[derive(Debug)]
enum Num {
    Str(u64),
    Int(u64),
    Float(f64),
    Neg(i64),
    Text(Str),
    Null,
    Array,
}

impl<'a> Arbitrary<'a> for Num {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let interesting = |u: &mut Unstructured<'a>| -> arbitrary::Result<u64> {
            Ok(match u.int_in_range(0..=7)? {
                0 => u64::from(u.int_in_range(0u32..=64)?) * 4096,
                1 => u64::from(u.int_in_range(0u32..=64)?) << 20,
                2 => u64::MAX - u64::from(u8::arbitrary(u)?),
                3 => (1u64 << u.int_in_range(0..=63)?).wrapping_add(u64::from(u8::arbitrary(u)?)).wrapping_sub(1),
                4 => 258048,
                5 => 32768 + u64::from(u8::arbitrary(u)?) * 4096,
                6 => u64::from(u16::arbitrary(u)?),
                _ => u64::arbitrary(u)?,
            })
        };
        Ok(match u.int_in_range(0..=12)? {
            0..=4 => Num::Str(interesting(u)?),
            5..=8 => Num::Int(interesting(u)?),
            9 => Num::Float(f64::arbitrary(u)?),
            10 => Num::Neg(i64::arbitrary(u)?),
            11 => Num::Text(Str::arbitrary(u)?),
            _ => {
                if bool::arbitrary(u)? {
                    Num::Null
                } else {
                    Num::Array
                }
            }
        })
    }
}

impl Num {
    fn json(&self) -> Value {
        match self {
            Num::Str(n) => Value::String(n.to_string()),
            Num::Int(n) => json!(n),
            Num::Float(f) => serde_json::Number::from_f64(*f).map(Value::Number).unwrap_or(Value::Null),
            Num::Neg(n) => json!(n),
            Num::Text(s) => Value::String(s.0.clone()),
            Num::Null => Value::Null,
            Num::Array => json!([]),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Bytes(Vec<u8>);

impl Bytes {
    fn b64(&self, want: usize, exact: bool) -> Value {
        use base64::Engine;
        let mut v = self.0.clone();
        if exact {
            v.resize(want, 0xa5);
        }
        Value::String(base64::engine::general_purpose::STANDARD.encode(v))
    }
}

#[derive(Arbitrary, Debug)]
struct KeyslotM {
    ty: Str,
    key_size: Option<Num>,
    area_type: Str,
    area_offset: Num,
    area_size: Num,
    area_encryption: Option<Str>,
    area_key_size: Option<Num>,
    kdf_type: Str,
    kdf_hash: Option<Str>,
    kdf_iterations: Option<Num>,
    kdf_time: Option<Num>,
    kdf_memory: Option<Num>,
    kdf_cpus: Option<Num>,
    salt: Bytes,
    salt_exact: bool,
    af_type: Str,
    af_stripes: Num,
    af_hash: Str,
    priority: Option<Num>,
}

#[derive(Arbitrary, Debug)]
struct SegmentM {
    ty: Str,
    offset: Num,
    size: Num,
    iv_tweak: Num,
    encryption: Str,
    sector_size: Num,
    flags: Option<Vec<Str>>,
}

#[derive(Arbitrary, Debug)]
struct DigestM {
    ty: Str,
    keyslots: Vec<Id>,
    segments: Vec<Id>,
    hash: Str,
    iterations: Num,
    salt: Bytes,
    digest: Bytes,
    exact: bool,
}

#[derive(Arbitrary, Debug)]
struct TokenM {
    ty: Str,
    keyslots: Vec<Id>,
    extra: Vec<(Str, Num)>,
}

#[derive(Arbitrary, Debug)]
struct ConfigM {
    json_size: Option<Num>,
    json_size_right: bool,
    keyslots_size: Num,
    flags: Option<Vec<Str>>,
}

fn ids(v: &[Id]) -> Value {
    Value::Array(v.iter().map(|i| Value::String(i.key())).collect())
}

impl Model {
    fn to_json(&self, hdr_size: u64) -> Value {
        let mut keyslots = Map::new();
        for (id, k) in &self.keyslots {
            let mut kdf = Map::new();
            kdf.insert("type".into(), k.kdf_type.0.clone().into());
            let opt = |m: &mut Map<String, Value>, name: &str, v: &Option<Num>| {
                if let Some(v) = v {
                    m.insert(name.into(), v.json());
                }
            };
            if let Some(h) = &k.kdf_hash {
                kdf.insert("hash".into(), h.0.clone().into());
            }
            opt(&mut kdf, "iterations", &k.kdf_iterations);
            opt(&mut kdf, "time", &k.kdf_time);
            opt(&mut kdf, "memory", &k.kdf_memory);
            opt(&mut kdf, "cpus", &k.kdf_cpus);
            kdf.insert("salt".into(), k.salt.b64(32, k.salt_exact));
            let mut area = Map::new();
            area.insert("type".into(), k.area_type.0.clone().into());
            area.insert("offset".into(), k.area_offset.json());
            area.insert("size".into(), k.area_size.json());
            if let Some(e) = &k.area_encryption {
                area.insert("encryption".into(), e.0.clone().into());
            }
            opt(&mut area, "key_size", &k.area_key_size);
            let mut ks = Map::new();
            ks.insert("type".into(), k.ty.0.clone().into());
            opt(&mut ks, "key_size", &k.key_size);
            ks.insert(
                "af".into(),
                json!({"type": k.af_type.0, "stripes": k.af_stripes.json(), "hash": k.af_hash.0}),
            );
            ks.insert("area".into(), Value::Object(area));
            ks.insert("kdf".into(), Value::Object(kdf));
            opt(&mut ks, "priority", &k.priority);
            keyslots.insert(id.key(), Value::Object(ks));
        }
        let mut segments = Map::new();
        for (id, s) in &self.segments {
            let mut o = Map::new();
            o.insert("type".into(), s.ty.0.clone().into());
            o.insert("offset".into(), s.offset.json());
            o.insert("size".into(), s.size.json());
            o.insert("iv_tweak".into(), s.iv_tweak.json());
            o.insert("encryption".into(), s.encryption.0.clone().into());
            o.insert("sector_size".into(), s.sector_size.json());
            if let Some(f) = &s.flags {
                o.insert("flags".into(), f.iter().map(|s| Value::String(s.0.clone())).collect());
            }
            segments.insert(id.key(), Value::Object(o));
        }
        let mut digests = Map::new();
        for (id, d) in &self.digests {
            digests.insert(
                id.key(),
                json!({
                    "type": d.ty.0,
                    "keyslots": ids(&d.keyslots),
                    "segments": ids(&d.segments),
                    "hash": d.hash.0,
                    "iterations": d.iterations.json(),
                    "salt": d.salt.b64(32, d.exact),
                    "digest": d.digest.b64(32, d.exact),
                }),
            );
        }
        let mut tokens = Map::new();
        for (id, t) in &self.tokens {
            let mut o = Map::new();
            o.insert("type".into(), t.ty.0.clone().into());
            o.insert("keyslots".into(), ids(&t.keyslots));
            for (k, v) in &t.extra {
                o.insert(k.0.clone(), v.json());
            }
            tokens.insert(id.key(), Value::Object(o));
        }
        let mut config = Map::new();
        let json_size = match (&self.config.json_size, self.config.json_size_right) {
            (_, true) | (None, _) => Value::String((hdr_size - BIN_HEADER_SIZE as u64).to_string()),
            (Some(n), false) => n.json(),
        };
        config.insert("json_size".into(), json_size);
        config.insert("keyslots_size".into(), self.config.keyslots_size.json());
        if let Some(f) = &self.config.flags {
            config.insert("flags".into(), f.iter().map(|s| Value::String(s.0.clone())).collect());
        }
        if let Some(r) = &self.requirements {
            let mandatory: Vec<Value> = r.iter().map(|s| Value::String(s.0.clone())).collect();
            config.insert("requirements".into(), json!({ "mandatory": mandatory }));
        }
        let mut top = Map::new();
        top.insert("keyslots".into(), Value::Object(keyslots));
        top.insert("tokens".into(), Value::Object(tokens));
        top.insert("segments".into(), Value::Object(segments));
        top.insert("digests".into(), Value::Object(digests));
        top.insert("config".into(), Value::Object(config));
        if let Some((k, v)) = &self.extra {
            top.insert(k.0.clone(), v.json());
        }
        if let Some(i) = self.drop_member {
            let key = top.keys().nth(usize::from(i) % top.len()).cloned();
            if let Some(key) = key {
                top.remove(&key);
            }
        }
        Value::Object(top)
    }
}

/// A header of ours in re-encryption (3 of 8 zones done, checksum resilience, 2 MiB of data):
/// the starting point of `luks2_reencrypt`.
const REENCRYPT_TEMPLATE: &str = include_str!("reencrypt_template.json");

/// Members the re-encryption parser reads, for `luks2_reencrypt`'s edits.
const REENCRYPT_PATHS: &[&str] = &[
    "/keyslots/2/area/offset",
    "/keyslots/2/area/size",
    "/keyslots/2/area/type",
    "/keyslots/2/area/hash",
    "/keyslots/2/area/sector_size",
    "/keyslots/2/mode",
    "/keyslots/2/direction",
    "/keyslots/2/key_size",
    "/keyslots/2/type",
    "/segments/0/offset",
    "/segments/0/size",
    "/segments/0/iv_tweak",
    "/segments/0/flags",
    "/segments/0/sector_size",
    "/segments/1/offset",
    "/segments/1/size",
    "/segments/1/iv_tweak",
    "/segments/1/flags",
    "/segments/2/flags",
    "/segments/2/offset",
    "/segments/3/flags",
    "/segments/3/sector_size",
    "/digests/0/segments",
    "/digests/1/segments",
    "/digests/2/segments",
    "/digests/2/keyslots",
    "/config/requirements/mandatory",
];

/// `luks2_reencrypt`: up to 8 edits (a member of [`REENCRYPT_PATHS`] set to a boundary number,
/// a decimal string, text, a flag list or removed) of a valid header in re-encryption, then the
/// re-encryption reader (`peek`) and a resume with two wrong keys. Checks: no panic, and a state
/// that parses stays inside the device with a hot zone within cryptsetup's limit.
pub fn reencrypt(data: &[u8]) {
    use nbdcrypt::crypto::keys::VolumeKey;
    use nbdcrypt::luks2::reencrypt::{peek, Reencryption, MAX_HEADER_HOTZONE};
    let mut v: Value = serde_json::from_str(REENCRYPT_TEMPLATE).unwrap();
    let mut u = Unstructured::new(data);
    let edits = u.int_in_range(0..=8u8).unwrap_or(0);
    for _ in 0..edits {
        let Ok(i) = u.choose_index(REENCRYPT_PATHS.len()) else { break };
        let path = REENCRYPT_PATHS[i];
        let new: Option<Value> = match u.int_in_range(0..=6u8).unwrap_or(0) {
            0 => None,
            1 => Some(json!(u.arbitrary::<u32>().unwrap_or(0))),
            2 => {
                let n: u64 = match u.int_in_range(0..=4u8).unwrap_or(0) {
                    0 => u.arbitrary().unwrap_or(0),
                    1 => u64::MAX - u64::from(u.arbitrary::<u16>().unwrap_or(0)),
                    2 => (16 << 20) + 512 * u64::from(u.arbitrary::<u16>().unwrap_or(0)),
                    3 => 1 << u.int_in_range(0..=63u32).unwrap_or(0),
                    _ => 4096 * u64::from(u.arbitrary::<u16>().unwrap_or(0)),
                };
                Some(json!(n.to_string()))
            }
            3 => Some(json!(u.arbitrary::<String>().unwrap_or_default())),
            4 => Some(json!(["in-reencryption"])),
            5 => {
                let f = ["backup-previous", "backup-final", "backup-moved-segment", "in-reencryption"]
                    [u.choose_index(4).unwrap_or(0)];
                Some(json!([f]))
            }
            _ => {
                let ids = &["0", "1", "2", "3", "4"][..u.int_in_range(0..=5usize).unwrap_or(0)];
                Some(json!(ids))
            }
        };
        let (parent, key) = path.rsplit_once('/').unwrap();
        if let Some(Value::Object(o)) = v.pointer_mut(parent) {
            match new {
                Some(n) => {
                    o.insert(key.to_string(), n);
                }
                None => {
                    o.remove(key);
                }
            }
        }
    }
    let img = image_with_json(&serde_json::to_vec(&v).unwrap(), DEFAULT_HDR_SIZE);
    with_image(&img, (16 << 20) + (2 << 20), |file| {
        if let Ok(Some(st)) = peek(file) {
            assert!(st.frontier <= st.data_size, "{st:?}");
            if let Some(h) = st.hot_len {
                assert!(h <= MAX_HEADER_HOTZONE && st.frontier + h <= st.data_size, "{st:?}");
            }
            assert!(st.data_offset + st.data_size == (16 << 20) + (2 << 20), "{st:?}");
        }
        let r = Reencryption::open_with_keys(file, VolumeKey::from_slice(&[1; 64]), VolumeKey::from_slice(&[2; 64]));
        assert!(r.is_err(), "wrong keys accepted");
    });
}
