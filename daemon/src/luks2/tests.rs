//! Golden and cross-implementation tests: the cryptsetup-made images in
//! `shared/testdata/luks2/`, and volumes we format checked by the real `cryptsetup`.

use std::path::PathBuf;

/// `shared/testdata/luks2`, beside the repository in CI (`../shared`) or at `/work/shared`.
/// Missing test data is a failure, not a skip.
pub(crate) fn testdata_dir() -> PathBuf {
    let beside = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/luks2");
    if beside.join("README.md").exists() {
        return beside;
    }
    let fixed = PathBuf::from("/work/shared/testdata/luks2");
    if fixed.join("README.md").exists() {
        return fixed;
    }
    panic!(
        "LUKS2 test data not found at {} or {}: check out `shared/` beside the repository",
        beside.display(),
        fixed.display()
    );
}

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

use aes::cipher::KeyInit;
use aes::Aes256;
use serde_json::Value;
use sha2::{Digest, Sha256};
use xts_mode::{get_tweak_default, Xts128};

use super::header::checksum;
use super::layout::{BIN_HEADER_SIZE, CSUM_LEN, OFF_CSUM, OFF_SEQID};
use super::*;
use crate::crypto::keys::{SecretBytes, VolumeKey};

const KEY_A: &str = "9ab175310276bb50d5e94b003aea5b57cf08e6622afc22200ac5eee77e4d6f1e\
                     8a31e818427daf763ae647a174e9920359c4b58a8ca6ebca566a7cc6ef16688c";
const KEY_B: &str = "fc53b424c294f14c77d30c979e527018b8922966e0d0fab150b83dd26e8a2d65\
                     456e8a503046ac77b8fe8ebe36bccbc5aa9f1706e447f356b42c76f87b19d900";
const KEY_C: &str = "0b5cbdbd4133afbae47322587b5e8b2fce2681b16b73ab1a9150194a783b8643\
                     920302be9dac123eafc36a29124f4f2e6560569163dd2998a255ec4c5aa41c9d";
/// sha256 of the first 64 KiB of the plaintext pattern (README).
const PATTERN_SHA256: &str = "c18d64203a7ed7338c9acb5d27d4e90421fb21c167d2ab3ff2de3d735a2f97c4";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn pw(s: &str) -> SecretBytes {
    SecretBytes::from_slice(s.as_bytes())
}

/// Gunzips a test image into `dir` and returns its path.
fn image(dir: &Path, name: &str) -> std::path::PathBuf {
    let src = testdata_dir().join(format!("{name}.gz"));
    let gz = File::open(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    let mut data = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut data)
        .unwrap();
    let dst = dir.join(name);
    std::fs::write(&dst, &data).unwrap();
    dst
}

fn open_rw(p: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(p).unwrap()
}

fn limits() -> KdfLimits {
    KdfLimits::default()
}

/// The README pattern: 512-byte unit `u` holds 32 copies of `"LUKS2TV:" || le64(u)`.
fn pattern(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for u in 0..(len / 512) as u64 {
        for _ in 0..32 {
            out.extend_from_slice(b"LUKS2TV:");
            out.extend_from_slice(&u.to_le_bytes());
        }
    }
    out
}

/// Decrypts `len` bytes of the data segment: one XTS unit per sector, IV = byte offset / 512.
fn decrypt_data(
    file: &File,
    offset: u64,
    sector_size: u32,
    key: &VolumeKey,
    len: usize,
) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).unwrap();
    let k = key.expose_secret();
    assert_eq!(k.len(), 64);
    let x = Xts128::new(
        Aes256::new_from_slice(&k[..32]).unwrap(),
        Aes256::new_from_slice(&k[32..]).unwrap(),
    );
    let per = u128::from(sector_size / 512);
    x.decrypt_area(&mut buf, sector_size as usize, 0, |i| {
        get_tweak_default(i * per)
    });
    buf
}

fn cryptsetup(args: &[&str]) -> Output {
    Command::new("cryptsetup")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run cryptsetup ({e}); install it: apt-get install cryptsetup-bin")
        })
}

fn cryptsetup_ok(args: &[&str]) -> String {
    let out = cryptsetup(args);
    assert!(
        out.status.success(),
        "cryptsetup {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn key_file(dir: &Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p.display().to_string()
}

/// Volume key as dumped by cryptsetup.
fn cryptsetup_volume_key(img: &str, keyfile: &str) -> Vec<u8> {
    let out = cryptsetup_ok(&[
        "luksDump",
        "--dump-volume-key",
        "--batch-mode",
        "--key-file",
        keyfile,
        img,
    ]);
    let start = out
        .find("MK dump:")
        .expect("no MK dump in cryptsetup output")
        + "MK dump:".len();
    let hexes: String = out[start..]
        .split_whitespace()
        .take_while(|w| w.len() == 2 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    hex(&hexes)
}

/// Rewrites one header copy at `offset`: optional new JSON text, a patch to the binary header,
/// and a fresh valid checksum.
fn rewrite_copy(
    file: &File,
    offset: u64,
    json: Option<&[u8]>,
    patch: impl Fn(&mut [u8; BIN_HEADER_SIZE]),
) {
    let mut bin = [0u8; BIN_HEADER_SIZE];
    file.read_exact_at(&mut bin, offset).unwrap();
    let hdr_size = u64::from_be_bytes(bin[8..16].try_into().unwrap());
    // A corrupted size field (fuzz test) still gets a checksum over the 16 KiB layout.
    let hdr_size = if super::layout::is_allowed_hdr_size(hdr_size) {
        hdr_size
    } else {
        16384
    };
    let mut area = vec![0u8; (hdr_size - 4096) as usize];
    file.read_exact_at(&mut area, offset + 4096).unwrap();
    if let Some(j) = json {
        area.fill(0);
        area[..j.len()].copy_from_slice(j);
    }
    patch(&mut bin);
    let c = checksum(&bin, &area);
    bin[OFF_CSUM..OFF_CSUM + CSUM_LEN].copy_from_slice(&c);
    file.write_all_at(&bin, offset).unwrap();
    file.write_all_at(&area, offset + 4096).unwrap();
}

/// Applies `edit` to the JSON of both copies of a 16 KiB-header image.
fn edit_json_both(file: &File, edit: impl Fn(&mut Value)) {
    for off in [0u64, 16384] {
        let mut area = vec![0u8; 12288];
        file.read_exact_at(&mut area, off + 4096).unwrap();
        let end = area.iter().position(|&b| b == 0).unwrap();
        let mut v: Value = serde_json::from_slice(&area[..end]).unwrap();
        edit(&mut v);
        rewrite_copy(file, off, Some(&serde_json::to_vec(&v).unwrap()), |_| {});
    }
}

// ---- golden: cryptsetup-made images -------------------------------------------------------------

#[test]
fn tv_a_header_fields_match_the_readme() {
    let dir = tempfile::tempdir().unwrap();
    let f = open_rw(&image(dir.path(), "tv-a-ss4096.img"));
    let (h, repair) = Luks2Header::read(&f).unwrap();
    assert_eq!(repair, RepairNeeded::None);
    assert_eq!(h.uuid(), "11111111-2222-4333-8444-555555555555");
    assert_eq!(h.label(), "tv-a-ss4096");
    assert_eq!(h.subsystem(), "nbd-test");
    assert_eq!(h.seqid(), 5);
    assert_eq!(h.hdr_size(), 16384);
    assert_eq!(h.metadata_end(), 16_777_216);
    assert_eq!(
        h.data_segment(),
        DataSegment {
            offset: 16_777_216,
            size: SegmentSize::Dynamic,
            sector_size: 4096,
            key_size: Some(64),
            iv_tweak: 0
        }
    );
    let ks = h.keyslots();
    assert_eq!(ks.len(), 2);
    assert_eq!(
        ks[0].kdf,
        Some(KdfParams::Pbkdf2 {
            hash: HashAlg::Sha256,
            iterations: 1000
        })
    );
    assert_eq!(ks[0].area_offset, Some(32768));
    assert_eq!(
        ks[1].kdf,
        Some(KdfParams::Argon2id {
            time: 4,
            memory_kib: 64,
            cpus: 1
        })
    );
    assert_eq!(ks[1].area_offset, Some(290_816));
    assert!(ks
        .iter()
        .all(|k| k.for_data && k.priority == KeyslotPriority::Normal));
    let toks: Vec<_> = h.tokens().collect();
    assert_eq!(toks.len(), 1);
    assert_eq!(toks[0].0, 0);
    assert_eq!(toks[0].1.type_name(), "example-kms");
    assert_eq!(toks[0].1.keyslots(), &[1]);
    assert_eq!(
        toks[0].1.json()["example-ciphertext"],
        "AAECAwQFBgcICQoLDA0ODw=="
    );
}

#[test]
fn tv_a_unlocks_with_both_passphrases_and_decrypts_the_pattern() {
    let dir = tempfile::tempdir().unwrap();
    let f = open_rw(&image(dir.path(), "tv-a-ss4096.img"));
    let (h, _) = Luks2Header::read(&f).unwrap();
    for (pass, slot) in [
        ("tv-a-pbkdf2-passphrase", 0),
        ("tv-a-argon2id-passphrase", 1),
    ] {
        let (key, s) = h.unlock(&f, &pw(pass), &limits()).unwrap();
        assert_eq!(s, slot);
        assert_eq!(to_hex(key.expose_secret()), KEY_A);
        let k2 = h.unlock_slot(&f, slot, &pw(pass), &limits()).unwrap();
        assert_eq!(k2.expose_secret(), key.expose_secret());
    }
    let (key, _) = h
        .unlock(&f, &pw("tv-a-pbkdf2-passphrase"), &limits())
        .unwrap();
    // Known answer: sector 1 (IV 8) ciphertext starts 95fd803c...
    let mut ct = [0u8; 16];
    f.read_exact_at(&mut ct, 16_777_216 + 4096).unwrap();
    assert_eq!(to_hex(&ct), "95fd803c331fce3e267a7c68e65aabe8");
    let plain = decrypt_data(&f, 16_777_216, 4096, &key, 65536);
    assert_eq!(plain, pattern(65536));
    assert_eq!(to_hex(&Sha256::digest(&plain)), PATTERN_SHA256);
    assert!(h.verify_volume_key(&key));
}

#[test]
fn a_wrong_passphrase_says_no_keyslot_matches() {
    let dir = tempfile::tempdir().unwrap();
    let f = open_rw(&image(dir.path(), "tv-a-ss4096.img"));
    let (h, _) = Luks2Header::read(&f).unwrap();
    let e = h
        .unlock(&f, &pw("tv-a-pbkdf2-passphrase\n"), &limits())
        .err()
        .unwrap();
    assert!(matches!(e, FormatError::WrongPassphrase));
    assert_eq!(e.to_string(), "no keyslot matches the passphrase");
    let e = h
        .unlock_slot(&f, 1, &pw("tv-a-pbkdf2-passphrase"), &limits())
        .err()
        .unwrap();
    assert!(matches!(e, FormatError::WrongPassphrase));
    let e = h.unlock_slot(&f, 7, &pw("x"), &limits()).err().unwrap();
    assert!(matches!(e, FormatError::KeyslotNotFound(7)));
}

#[test]
fn tv_b_argon2i_with_two_lanes_and_512_byte_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let f = open_rw(&image(dir.path(), "tv-b-ss512.img"));
    let (h, _) = Luks2Header::read(&f).unwrap();
    assert_eq!(h.uuid(), "22222222-3333-4444-8555-666666666666");
    assert_eq!(h.label(), "");
    assert_eq!(h.seqid(), 3);
    let seg = h.data_segment();
    assert_eq!((seg.offset, seg.sector_size), (1_048_576, 512));
    assert_eq!(
        h.keyslots()[0].kdf,
        Some(KdfParams::Argon2i {
            time: 4,
            memory_kib: 64,
            cpus: 2
        })
    );
    let (key, slot) = h
        .unlock(&f, &pw("tv-b-argon2i-passphrase"), &limits())
        .unwrap();
    assert_eq!(slot, 0);
    assert_eq!(to_hex(key.expose_secret()), KEY_B);
    assert_eq!(
        decrypt_data(&f, 1_048_576, 512, &key, 65536),
        pattern(65536)
    );
}

#[test]
fn tv_c_detached_header_is_refused_by_read_and_opens_with_read_metadata_only() {
    let dir = tempfile::tempdir().unwrap();
    let hf = open_rw(&image(dir.path(), "tv-c-detached-hdr.img"));
    let df = open_rw(&image(dir.path(), "tv-c-detached-data.img"));
    let e = Luks2Header::read(&hf).err().unwrap();
    assert!(matches!(e, FormatError::DetachedHeader { .. }), "{e:?}");
    assert!(e.to_string().contains("detached"));
    assert!(
        !e.to_string().contains("--header"),
        "no flag of ours is called --header"
    );
    let (h, _) = Luks2Header::read_metadata_only(&hf).unwrap();
    assert_eq!(h.hdr_size(), 65536);
    assert_eq!(h.label(), "tv-c-detached");
    let (key, _) = h
        .unlock(&hf, &pw("tv-c-pbkdf2-sha512-passphrase"), &limits())
        .unwrap();
    assert_eq!(to_hex(key.expose_secret()), KEY_C);
    assert_eq!(decrypt_data(&df, 0, 4096, &key, 65536), pattern(65536));
    // The data file has no header at all.
    let e = Luks2Header::read(&df).err().unwrap();
    match e {
        FormatError::NoValidHeader { primary, .. } => {
            assert!(matches!(*primary, FormatError::BadMagic { .. }))
        }
        e => panic!("{e:?}"),
    }
}

// ---- negative: one corruption per rejection path --------------------------------------------------

fn tv_a(dir: &Path) -> File {
    open_rw(&image(dir, "tv-a-ss4096.img"))
}

#[test]
fn bad_magic_in_both_copies_is_no_valid_header() {
    let dir = tempfile::tempdir().unwrap();
    let f = tv_a(dir.path());
    f.write_all_at(b"X", 0).unwrap();
    f.write_all_at(b"X", 16384).unwrap();
    match Luks2Header::read(&f).err().unwrap() {
        FormatError::NoValidHeader { primary, secondary } => {
            assert!(matches!(
                *primary,
                FormatError::BadMagic {
                    copy: HeaderCopy::Primary,
                    offset: 0
                }
            ));
            assert!(matches!(
                *secondary,
                FormatError::BadMagic {
                    copy: HeaderCopy::Secondary,
                    ..
                }
            ));
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn bad_checksums_in_both_copies_is_no_valid_header() {
    let dir = tempfile::tempdir().unwrap();
    let f = tv_a(dir.path());
    // One byte of the zero padding in each JSON area.
    f.write_all_at(b"\x01", 4096 + 12000).unwrap();
    f.write_all_at(b"\x01", 16384 + 4096 + 12000).unwrap();
    match Luks2Header::read(&f).err().unwrap() {
        FormatError::NoValidHeader { primary, secondary } => {
            assert!(matches!(
                *primary,
                FormatError::BadChecksum {
                    copy: HeaderCopy::Primary,
                    offset: 0
                }
            ));
            assert!(matches!(
                *secondary,
                FormatError::BadChecksum {
                    copy: HeaderCopy::Secondary,
                    offset: 16384
                }
            ));
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn a_bad_primary_checksum_falls_back_to_the_secondary_and_asks_for_repair() {
    let dir = tempfile::tempdir().unwrap();
    let f = tv_a(dir.path());
    f.write_all_at(b"\xff", OFF_CSUM as u64).unwrap();
    let (h, repair) = Luks2Header::read(&f).unwrap();
    assert_eq!(repair, RepairNeeded::Primary);
    assert_eq!(h.seqid(), 5);
    h.unlock(&f, &pw("tv-a-pbkdf2-passphrase"), &limits())
        .unwrap();
    h.repair(&f, repair).unwrap();
    let (h2, repair2) = Luks2Header::read(&f).unwrap();
    assert_eq!(repair2, RepairNeeded::None);
    assert_eq!(h2.seqid(), 5);
}

#[test]
fn a_zeroed_primary_is_found_through_the_secondary() {
    let dir = tempfile::tempdir().unwrap();
    let f = tv_a(dir.path());
    f.write_all_at(&[0u8; 16384], 0).unwrap();
    let (_, repair) = Luks2Header::read(&f).unwrap();
    assert_eq!(repair, RepairNeeded::Primary);
}

#[test]
fn the_copy_with_the_higher_seqid_wins_and_ties_go_to_the_primary() {
    let dir = tempfile::tempdir().unwrap();
    let f = tv_a(dir.path());
    rewrite_copy(&f, 16384, None, |b| {
        b[OFF_SEQID..OFF_SEQID + 8].copy_from_slice(&6u64.to_be_bytes())
    });
    let (h, repair) = Luks2Header::read(&f).unwrap();
    assert_eq!((h.seqid(), repair), (6, RepairNeeded::Primary));
    rewrite_copy(&f, 0, None, |b| {
        b[OFF_SEQID..OFF_SEQID + 8].copy_from_slice(&7u64.to_be_bytes())
    });
    let (h, repair) = Luks2Header::read(&f).unwrap();
    assert_eq!((h.seqid(), repair), (7, RepairNeeded::Secondary));
    // Same seqid, different labels: primary wins, nothing to repair.
    rewrite_copy(&f, 16384, None, |b| {
        b[OFF_SEQID..OFF_SEQID + 8].copy_from_slice(&7u64.to_be_bytes());
        b[24..30].copy_from_slice(b"other\0");
    });
    let (h, repair) = Luks2Header::read(&f).unwrap();
    assert_eq!((h.label(), repair), ("tv-a-ss4096", RepairNeeded::None));
}

#[test]
fn an_unknown_mandatory_requirement_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let f = tv_a(dir.path());
    edit_json_both(&f, |v| {
        v["config"]["requirements"] = serde_json::json!({"mandatory": ["quantum-sealing"]})
    });
    match Luks2Header::read(&f).err().unwrap() {
        FormatError::UnmetRequirements(r) => assert_eq!(r, vec!["quantum-sealing".to_string()]),
        e => panic!("{e:?}"),
    }
}

#[test]
fn a_header_in_reencryption_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = tv_a(dir.path());
    let text =
        std::fs::read_to_string(testdata_dir().join("reencrypt-encrypt-initial.json")).unwrap();
    let captured: Value = serde_json::from_str(&text).unwrap();
    edit_json_both(&f, |v| *v = captured.clone());
    let e = Luks2Header::read(&f).err().unwrap();
    assert!(
        matches!(e, FormatError::ReencryptionInProgress { .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("--resume-only"));
}

#[test]
fn an_unknown_segment_cipher_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = tv_a(dir.path());
    edit_json_both(&f, |v| {
        v["segments"]["0"]["encryption"] = "twofish-xts-plain64".into()
    });
    match Luks2Header::read(&f).err().unwrap() {
        FormatError::UnsupportedCipher { field, cipher } => {
            assert_eq!(
                (field.as_str(), cipher.as_str()),
                ("segments.0.encryption", "twofish-xts-plain64")
            )
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn a_truncated_image_is_reported_with_the_missing_extent() {
    let dir = tempfile::tempdir().unwrap();
    let f = tv_a(dir.path());
    f.set_len(1 << 20).unwrap();
    match Luks2Header::read(&f).err().unwrap() {
        FormatError::Truncated { what, end, size } => {
            assert_eq!(
                (what.as_str(), end, size),
                ("keyslots area", 16_777_216, 1 << 20)
            )
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn a_file_smaller_than_a_header_is_too_small() {
    let dir = tempfile::tempdir().unwrap();
    let f = tv_a(dir.path());
    f.set_len(100).unwrap();
    assert!(matches!(
        Luks2Header::read(&f).err().unwrap(),
        FormatError::DeviceTooSmall { size: 100, .. }
    ));
}

#[test]
fn data_beyond_the_end_of_the_device_suggests_a_detached_header() {
    let dir = tempfile::tempdir().unwrap();
    let f = tv_a(dir.path());
    f.set_len(16_777_216).unwrap();
    let e = Luks2Header::read(&f).err().unwrap();
    assert!(matches!(e, FormatError::DetachedHeader { .. }), "{e:?}");
}

#[test]
fn a_data_area_that_is_not_whole_sectors_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = tv_a(dir.path());
    f.set_len(16_777_216 + 65536 + 512).unwrap();
    assert!(matches!(
        Luks2Header::read(&f).err().unwrap(),
        FormatError::Unsupported(_)
    ));
}

#[test]
fn kdf_caps_are_enforced_and_named_when_opening_foreign_headers() {
    let dir = tempfile::tempdir().unwrap();
    let f = tv_a(dir.path());
    let (h, _) = Luks2Header::read(&f).unwrap();
    let tight = KdfLimits {
        max_argon2_memory_kib: 32,
        ..KdfLimits::default()
    };
    let e = h
        .unlock(&f, &pw("tv-a-argon2id-passphrase"), &tight)
        .err()
        .unwrap();
    match &e {
        FormatError::KdfLimit {
            slot: 1,
            param: "argon2 memory (KiB)",
            value: 64,
            cap: 32,
        } => {}
        e => panic!("{e:?}"),
    }
    // The slot within limits still opens.
    h.unlock(&f, &pw("tv-a-pbkdf2-passphrase"), &tight).unwrap();
}

#[test]
fn a_json_area_starting_with_whitespace_invalidates_that_copy() {
    let dir = tempfile::tempdir().unwrap();
    let f = tv_a(dir.path());
    let mut area = vec![0u8; 12288];
    f.read_exact_at(&mut area, 4096).unwrap();
    let end = area.iter().position(|&b| b == 0).unwrap();
    let mut text = vec![b' '];
    text.extend_from_slice(&area[..end]);
    rewrite_copy(&f, 0, Some(&text), |_| {});
    let (_, repair) = Luks2Header::read(&f).unwrap();
    assert_eq!(repair, RepairNeeded::Primary);
}

// ---- round trips through the real cryptsetup ------------------------------------------------------

const VOL_SIZE: u64 = 16 * 1024 * 1024 + 256 * 1024;

fn fast_pbkdf2() -> KdfParams {
    KdfParams::Pbkdf2 {
        hash: HashAlg::Sha256,
        iterations: 1000,
    }
}

fn small_argon2id() -> KdfParams {
    KdfParams::Argon2id {
        time: 4,
        memory_kib: 1024,
        cpus: 1,
    }
}

/// A fresh, empty image file of `VOL_SIZE` bytes formatted by us.
fn formatted(
    dir: &Path,
    kdf: KdfParams,
    pass: &str,
) -> (std::path::PathBuf, File, Luks2Header, VolumeKey) {
    let p = dir.join("ours.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    f.set_len(VOL_SIZE).unwrap();
    let mut params = FormatParams::new(kdf);
    params.digest_iterations = 1000;
    params.label = "nbdcrypt-test".into();
    let (h, vk) = format(&f, &params, &pw(pass)).unwrap();
    (p, f, h, vk)
}

#[test]
fn cryptsetup_opens_what_we_format_with_pbkdf2_and_argon2id() {
    for (kdf, name) in [(fast_pbkdf2(), "pbkdf2"), (small_argon2id(), "argon2id")] {
        let dir = tempfile::tempdir().unwrap();
        let (p, f, h, vk) = formatted(dir.path(), kdf, "recovery passphrase");
        let img = p.display().to_string();
        let dump = cryptsetup_ok(&["luksDump", &img]);
        assert!(dump.contains("Version:       \t2"), "{dump}");
        assert!(dump.contains(&format!("PBKDF:      {name}")), "{dump}");
        assert!(dump.contains("sector: 4096 [bytes]"), "{dump}");
        assert!(dump.contains("offset: 16777216 [bytes]"), "{dump}");
        let kf = key_file(dir.path(), "kf", "recovery passphrase");
        cryptsetup_ok(&["open", "--test-passphrase", "--key-file", &kf, &img]);
        assert_eq!(cryptsetup_volume_key(&img, &kf), vk.expose_secret());
        let bad = key_file(dir.path(), "bad", "wrong");
        assert!(
            !cryptsetup(&["open", "--test-passphrase", "--key-file", &bad, &img])
                .status
                .success()
        );
        // And we read back what we wrote.
        let (h2, repair) = Luks2Header::read(&f).unwrap();
        assert_eq!(repair, RepairNeeded::None);
        assert_eq!(h2.uuid(), h.uuid());
        assert_eq!(h2.label(), "nbdcrypt-test");
        assert_eq!(h2.seqid(), 1);
        let (k, slot) = h2
            .unlock(&f, &pw("recovery passphrase"), &limits())
            .unwrap();
        assert_eq!((k.expose_secret(), slot), (vk.expose_secret(), 0));
    }
}

#[test]
fn our_layout_matches_cryptsetup_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let (_, f, h, _) = formatted(dir.path(), fast_pbkdf2(), "p");
    assert_eq!(h.hdr_size(), 16384);
    assert_eq!(h.metadata_end(), 16_777_216);
    let ks = &h.keyslots()[0];
    assert_eq!(
        (ks.area_offset, ks.area_size, ks.key_size),
        (Some(32768), Some(258_048), Some(64))
    );
    // Secondary binary header at 16 KiB; JSON is compact, NUL-terminated, zero-filled.
    let mut magic = [0u8; 6];
    f.read_exact_at(&mut magic, 16384).unwrap();
    assert_eq!(&magic, b"SKUL\xba\xbe");
    let mut area = vec![0u8; 12288];
    f.read_exact_at(&mut area, 4096).unwrap();
    let text = metadata::json_text(&area).unwrap();
    assert!(text.starts_with(br#"{"keyslots":{"0":{"type":"luks2""#));
    assert!(!text.contains(&b' ') && !text.contains(&b'\n'));
}

#[test]
fn cryptsetup_add_and_kill_slot_on_our_volume_keep_it_openable_by_us() {
    let dir = tempfile::tempdir().unwrap();
    let (p, f, _, vk) = formatted(dir.path(), fast_pbkdf2(), "first");
    let img = p.display().to_string();
    let k1 = key_file(dir.path(), "k1", "first");
    let k2 = key_file(dir.path(), "k2", "second");
    cryptsetup_ok(&[
        "luksAddKey",
        "--batch-mode",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        &k1,
        &img,
        &k2,
    ]);
    let (h, _) = Luks2Header::read(&f).unwrap();
    assert_eq!(h.seqid(), 2);
    let (k, slot) = h.unlock(&f, &pw("second"), &limits()).unwrap();
    assert_eq!((k.expose_secret(), slot), (vk.expose_secret(), 1));
    cryptsetup_ok(&["luksKillSlot", "--batch-mode", "--key-file", &k2, &img, "0"]);
    let (h, _) = Luks2Header::read(&f).unwrap();
    assert!(matches!(
        h.unlock(&f, &pw("first"), &limits()).err().unwrap(),
        FormatError::WrongPassphrase
    ));
    assert_eq!(h.unlock(&f, &pw("second"), &limits()).unwrap().1, 1);
}

#[test]
fn keyslot_and_token_changes_we_make_are_accepted_by_cryptsetup() {
    let dir = tempfile::tempdir().unwrap();
    let (p, f, mut h, vk) = formatted(dir.path(), small_argon2id(), "recovery");
    let img = p.display().to_string();

    // A second keyslot the systemd way: PBKDF2-SHA512, 1000 iterations, base64 secret.
    let slot = h
        .add_keyslot(
            &f,
            &vk,
            &pw("c2VjcmV0LXNlY3JldA=="),
            &KdfParams::Pbkdf2 {
                hash: HashAlg::Sha512,
                iterations: 1000,
            },
        )
        .unwrap();
    assert_eq!(slot, 1);
    assert_eq!(h.keyslots()[1].area_offset, Some(290_816));
    let ks = key_file(dir.path(), "ks", "c2VjcmV0LXNlY3JldA==");
    cryptsetup_ok(&[
        "open",
        "--test-passphrase",
        "--key-slot",
        "1",
        "--key-file",
        &ks,
        &img,
    ]);

    // A token bound to it: cryptsetup lists it and still opens by passphrase.
    let tok: serde_json::Map<String, Value> = serde_json::from_str(
        r#"{"type":"nbdcrypt-aws-kms","keyslots":["1"],"key-id":"arn:aws:kms:x","blob":"AAEC"}"#,
    )
    .unwrap();
    let tid = h.add_token(&f, Token::from_json(tok).unwrap()).unwrap();
    assert_eq!(tid, 0);
    let dump = cryptsetup_ok(&["luksDump", &img]);
    assert!(dump.contains("nbdcrypt-aws-kms"), "{dump}");
    let exported = cryptsetup_ok(&["token", "export", "--token-id", "0", &img]);
    let v: Value = serde_json::from_str(&exported).unwrap();
    assert_eq!(v["blob"], "AAEC");
    assert_eq!(v["keyslots"], serde_json::json!(["1"]));

    // A luks2-* token type is reserved; a token for a missing keyslot is refused.
    let bad: serde_json::Map<String, Value> =
        serde_json::from_str(r#"{"type":"luks2-keyring","keyslots":[]}"#).unwrap();
    assert!(matches!(
        h.add_token(&f, Token::from_json(bad).unwrap()),
        Err(FormatError::InvalidToken(_))
    ));
    let bad: serde_json::Map<String, Value> =
        serde_json::from_str(r#"{"type":"x","keyslots":["9"]}"#).unwrap();
    assert!(matches!(
        h.add_token(&f, Token::from_json(bad).unwrap()),
        Err(FormatError::InvalidToken(_))
    ));

    // Change the recovery passphrase: same slot id, new area, old one wiped.
    let slot0 = h
        .change_passphrase(
            &f,
            &pw("recovery"),
            &pw("new recovery"),
            &small_argon2id(),
            &limits(),
        )
        .unwrap();
    assert_eq!(slot0, 0);
    let kn = key_file(dir.path(), "kn", "new recovery");
    let ko = key_file(dir.path(), "ko", "recovery");
    cryptsetup_ok(&[
        "open",
        "--test-passphrase",
        "--key-slot",
        "0",
        "--key-file",
        &kn,
        &img,
    ]);
    assert!(
        !cryptsetup(&["open", "--test-passphrase", "--key-file", &ko, &img])
            .status
            .success()
    );

    // Remove slot 1: the token stays, orphaned.
    h.remove_keyslot(&f, 1).unwrap();
    let (h2, _) = Luks2Header::read(&f).unwrap();
    assert_eq!(h2.token(0).unwrap().keyslots(), &[] as &[u32]);
    assert!(h2.keyslots().iter().all(|k| k.id == 0));
    assert!(
        !cryptsetup(&["open", "--test-passphrase", "--key-file", &ks, &img])
            .status
            .success()
    );
    cryptsetup_ok(&["open", "--test-passphrase", "--key-file", &kn, &img]);
    assert!(matches!(
        h.remove_keyslot(&f, 0),
        Err(FormatError::LastKeyslot(0))
    ));
    h.remove_token(&f, 0).unwrap();
    assert!(h.token(0).is_none());
    assert_eq!(cryptsetup_volume_key(&img, &kn), vk.expose_secret());
}

#[test]
fn a_stale_in_memory_header_refuses_to_write() {
    let dir = tempfile::tempdir().unwrap();
    let (p, f, h, vk) = formatted(dir.path(), fast_pbkdf2(), "first");
    let mut stale = h.clone();
    let k1 = key_file(dir.path(), "k1", "first");
    let k2 = key_file(dir.path(), "k2", "second");
    cryptsetup_ok(&[
        "luksAddKey",
        "--batch-mode",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        &k1,
        &p.display().to_string(),
        &k2,
    ]);
    let e = stale
        .add_keyslot(&f, &vk, &pw("third"), &fast_pbkdf2())
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            FormatError::ConcurrentUpdate {
                expected: 1,
                found: 2
            }
        ),
        "{e:?}"
    );
}

#[test]
fn add_keyslot_needs_the_right_volume_key() {
    let dir = tempfile::tempdir().unwrap();
    let (_, f, mut h, _) = formatted(dir.path(), fast_pbkdf2(), "first");
    let wrong = VolumeKey::from_slice(&[0u8; 64]);
    assert!(matches!(
        h.add_keyslot(&f, &wrong, &pw("x"), &fast_pbkdf2()),
        Err(FormatError::WrongVolumeKey)
    ));
    // Below cryptsetup's creation minimums.
    let weak = KdfParams::Pbkdf2 {
        hash: HashAlg::Sha256,
        iterations: 10,
    };
    assert!(matches!(
        h.add_keyslot(&f, &wrong, &pw("x"), &weak),
        Err(FormatError::InvalidParams(_))
    ));
}

#[test]
fn header_backup_and_restore_round_trip_and_interoperate_with_cryptsetup() {
    let dir = tempfile::tempdir().unwrap();
    let (p, f, h, vk) = formatted(dir.path(), fast_pbkdf2(), "pass");
    let img = p.display().to_string();
    let backup = dir.path().join("hdr.backup");
    header_backup(&f, &backup).unwrap();
    assert_eq!(std::fs::metadata(&backup).unwrap().len(), 16_777_216);
    assert!(header_backup(&f, &backup).is_err(), "must not overwrite");
    // Destroy both copies, restore, unlock.
    f.write_all_at(&[0u8; 32768], 0).unwrap();
    assert!(Luks2Header::read(&f).is_err());
    let r = header_restore(&f, &backup).unwrap();
    assert_eq!(r.uuid(), h.uuid());
    assert_eq!(
        r.unlock(&f, &pw("pass"), &limits())
            .unwrap()
            .0
            .expose_secret(),
        vk.expose_secret()
    );
    // cryptsetup accepts our backup file as a header too.
    let kf = key_file(dir.path(), "kf", "pass");
    cryptsetup_ok(&[
        "open",
        "--test-passphrase",
        "--header",
        &backup.display().to_string(),
        "--key-file",
        &kf,
        &img,
    ]);
    // A backup of another volume is refused.
    let dir2 = tempfile::tempdir().unwrap();
    let (_, f2, _, _) = formatted(dir2.path(), fast_pbkdf2(), "other");
    match header_restore(&f2, &backup).err().unwrap() {
        FormatError::BadBackup { reason, .. } => assert!(reason.contains("UUID"), "{reason}"),
        e => panic!("{e:?}"),
    }
    // A file that is not a header is refused before anything is written.
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0u8; 65536]).unwrap();
    assert!(matches!(
        header_restore(&f, &junk),
        Err(FormatError::BadBackup { .. })
    ));
}

#[test]
fn format_refuses_bad_parameters_and_small_devices() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("small.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    f.set_len(1 << 20).unwrap();
    let mut params = FormatParams::new(fast_pbkdf2());
    params.digest_iterations = 1000;
    assert!(matches!(
        format(&f, &params, &pw("x")),
        Err(FormatError::DeviceTooSmall { .. })
    ));
    let mut bad = params.clone();
    bad.sector_size = 1000;
    assert!(matches!(
        format(&f, &bad, &pw("x")),
        Err(FormatError::InvalidParams(_))
    ));
    let mut bad = params.clone();
    bad.label = "x".repeat(48);
    assert!(matches!(
        format(&f, &bad, &pw("x")),
        Err(FormatError::InvalidParams(_))
    ));
    let mut bad = params.clone();
    bad.kdf = KdfParams::Argon2id {
        time: 1,
        memory_kib: 1024,
        cpus: 1,
    };
    assert!(matches!(
        format(&f, &bad, &pw("x")),
        Err(FormatError::InvalidParams(_))
    ));
}

#[test]
fn format_with_a_small_keyslots_area_and_512_byte_sectors_opens_in_cryptsetup() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    f.set_len(2 << 20).unwrap();
    let mut params = FormatParams::new(fast_pbkdf2());
    params.digest_iterations = 1000;
    params.keyslots_size = 262_144;
    params.data_offset = 1 << 20;
    params.sector_size = 512;
    params.key_size = 32;
    params.uuid = Some("AAAAAAAA-2222-4333-8444-555555555555".into());
    let (h, vk) = format(&f, &params, &pw("p")).unwrap();
    assert_eq!(h.uuid(), "aaaaaaaa-2222-4333-8444-555555555555");
    assert_eq!(vk.len(), 32);
    let img = p.display().to_string();
    let kf = key_file(dir.path(), "kf", "p");
    let dump = cryptsetup_ok(&["luksDump", &img]);
    assert!(
        dump.contains("aaaaaaaa-2222-4333-8444-555555555555"),
        "{dump}"
    );
    assert_eq!(cryptsetup_volume_key(&img, &kf), vk.expose_secret());
}

#[test]
fn a_keyslot_whose_digest_is_not_bound_to_the_data_is_never_a_volume_key() {
    let dir = tempfile::tempdir().unwrap();
    let f = tv_a(dir.path());
    edit_json_both(&f, |v| {
        let mut d1 = v["digests"]["0"].clone();
        d1["keyslots"] = serde_json::json!(["1"]);
        d1["segments"] = serde_json::json!([]);
        v["digests"]["1"] = d1;
        v["digests"]["0"]["keyslots"] = serde_json::json!(["0"]);
    });
    let (h, _) = Luks2Header::read(&f).unwrap();
    let e = h
        .unlock_slot(&f, 1, &pw("tv-a-argon2id-passphrase"), &limits())
        .err()
        .unwrap();
    assert!(
        matches!(e, FormatError::KeyslotUnusable { slot: 1, .. }),
        "{e:?}"
    );
    let e = h
        .unlock(&f, &pw("tv-a-argon2id-passphrase"), &limits())
        .err()
        .unwrap();
    assert!(matches!(e, FormatError::WrongPassphrase), "{e:?}");
    assert!(!h.keyslots()[1].for_data);
}

#[test]
fn an_absurd_digest_iteration_count_is_capped() {
    let dir = tempfile::tempdir().unwrap();
    let f = tv_a(dir.path());
    edit_json_both(&f, |v| {
        v["digests"]["0"]["iterations"] = 4_000_000_000u32.into()
    });
    let (h, _) = Luks2Header::read(&f).unwrap();
    let e = h
        .unlock(&f, &pw("tv-a-pbkdf2-passphrase"), &limits())
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            FormatError::KdfLimit {
                param: "digest iterations",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn reading_randomly_corrupted_headers_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let f = tv_a(dir.path());
    let mut orig = vec![0u8; 32768];
    f.read_exact_at(&mut orig, 0).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..400 {
        let mut img = orig.clone();
        // Binary-header fields, JSON bytes, or both; half the time with fixed-up checksums so
        // the corruption reaches the JSON parser.
        for _ in 0..(1 + next() % 4) {
            let pos = if next() % 2 == 0 {
                (next() % 512) as usize
            } else {
                4096 + (next() % 1400) as usize
            };
            let pos = if next() % 2 == 0 { pos } else { pos + 16384 };
            img[pos] = next() as u8;
        }
        f.write_all_at(&img, 0).unwrap();
        if i % 2 == 0 {
            for off in [0u64, 16384] {
                rewrite_copy(&f, off, None, |_| {});
            }
        }
        let _ = Luks2Header::read(&f);
    }
}

// ---- hostile headers: foreign keyslot types ----------------------------------------------------

fn file_sha256(f: &File) -> Vec<u8> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = f.read_at(&mut buf, off).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.finalize().to_vec()
}

#[test]
fn the_issue_8_keyslot_over_the_data_area_is_refused_at_read() {
    let dir = tempfile::tempdir().unwrap();
    let f = tv_a(dir.path());
    edit_json_both(&f, |v| {
        v["keyslots"]["5"] = serde_json::json!({"type": "foo",
            "area": {"offset": "16777216", "size": "1073741824"}});
    });
    let e = Luks2Header::read_metadata_only(&f).unwrap_err();
    assert!(e.to_string().contains("keyslots.5"), "{e}");
    // With a key_size and an area type it is still outside the keyslots area.
    edit_json_both(&f, |v| {
        v["keyslots"]["5"] = serde_json::json!({"type": "foo", "key_size": 64,
            "area": {"type": "raw", "offset": "16777216", "size": "1073741824"}});
    });
    let e = Luks2Header::read_metadata_only(&f).unwrap_err();
    assert!(
        e.to_string().contains("keyslots.5.area") && e.to_string().contains("outside"),
        "{e}"
    );
}

#[test]
fn remove_keyslot_never_wipes_or_drops_a_foreign_keyslot() {
    let dir = tempfile::tempdir().unwrap();
    let f = tv_a(dir.path());
    // A valid foreign keyslot in free space inside the keyslots area.
    edit_json_both(&f, |v| {
        v["keyslots"]["5"] = serde_json::json!({"type": "foo", "key_size": 64,
            "area": {"type": "raw", "offset": "8388608", "size": "4096"}});
    });
    let before = file_sha256(&f);
    let (mut h, _) = Luks2Header::read(&f).unwrap();
    let info = h.keyslots().into_iter().find(|k| k.id == 5).unwrap();
    assert_eq!(info.type_name, "foo");
    assert_eq!(info.area_offset, Some(8_388_608));
    match h.remove_keyslot(&f, 5).unwrap_err() {
        FormatError::ForeignKeyslot { slot: 5, type_name } => assert_eq!(type_name, "foo"),
        e => panic!("{e:?}"),
    }
    assert_eq!(file_sha256(&f), before, "the volume changed");
    // Our own keyslot changes keep the foreign one, and never place an area over it.
    h.remove_keyslot(&f, 1).unwrap();
    let (h, _) = Luks2Header::read(&f).unwrap();
    assert!(h
        .keyslots()
        .iter()
        .any(|k| k.id == 5 && k.type_name == "foo"));
}

#[test]
fn one_unlock_stops_when_the_keyslots_together_exceed_the_work_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (_, f, mut h, vk) = formatted(dir.path(), fast_pbkdf2(), "zero");
    h.add_keyslot(&f, &vk, &pw("one"), &fast_pbkdf2()).unwrap();
    h.add_keyslot(&f, &vk, &pw("two"), &fast_pbkdf2()).unwrap();
    // Each slot: 1000 iterations + a 1000-iteration digest = 1000 permille of a 2000 cap.
    let tight = KdfLimits {
        max_pbkdf2_iterations: 2000,
        max_total_permille: 2500,
        ..KdfLimits::default()
    };
    match h.unlock(&f, &pw("wrong"), &tight).err().unwrap() {
        FormatError::KdfLimit {
            slot: 2,
            value: 3000,
            cap: 2500,
            param,
        } => {
            assert!(param.contains("all keyslots tried"), "{param}")
        }
        e => panic!("{e:?}"),
    }
    // Within the budget the right passphrase still opens; with the default limits, every slot.
    assert_eq!(h.unlock(&f, &pw("one"), &tight).unwrap().1, 1);
    assert_eq!(h.unlock(&f, &pw("two"), &limits()).unwrap().1, 2);
    let e = h.unlock(&f, &pw("two"), &tight).err().unwrap();
    assert!(e.to_string().contains("--allow-expensive-kdf"), "{e}");
}
