//! Unit tests of the re-encryption state parser and engine on files we format (the interop
//! tests against the real cryptsetup live in `tests/tests/reencrypt_interop.rs`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

use serde_json::Value;

use super::*;
use crate::luks2::{format, FormatParams};

const DATA: u64 = 2 << 20;

fn pw(s: &str) -> SecretBytes {
    SecretBytes::from_slice(s.as_bytes())
}

fn kdf() -> KdfParams {
    KdfParams::Pbkdf2 {
        hash: HashAlg::Sha256,
        iterations: 1000,
    }
}

/// A formatted volume (16 MiB header, 2 MiB of data) holding a known plaintext.
fn volume(dir: &std::path::Path, ss: u32) -> (File, Vec<u8>) {
    let p = dir.join("vol.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.set_len(16 * 1024 * 1024 + DATA).unwrap();
    let mut params = FormatParams::new(kdf());
    params.digest_iterations = 1000;
    params.sector_size = ss;
    let (hdr, key) = format(&f, &params, &pw("old-pass")).unwrap();
    let plain: Vec<u8> = (0..DATA).map(|i| (i * 7 % 251) as u8).collect();
    let mut ct = plain.clone();
    cipher(&key, ss)
        .unwrap()
        .encrypt_in_place(&mut ct, 0)
        .unwrap();
    f.write_all_at(&ct, hdr.data_segment().offset).unwrap();
    (f, plain)
}

fn read_plain(f: &File, key: &VolumeKey, ss: u32) -> Vec<u8> {
    let mut b = vec![0u8; DATA as usize];
    f.read_exact_at(&mut b, 16 * 1024 * 1024).unwrap();
    cipher(key, ss)
        .unwrap()
        .decrypt_in_place(&mut b, 0)
        .unwrap();
    b
}

fn start(f: &File, res: Resilience, key_size: u32, ss: u32, hotzone: u64) -> Reencryption {
    let (hdr, _) = Luks2Header::read(f).unwrap();
    let (old, slot) = hdr
        .unlock(f, &pw("old-pass"), &KdfLimits::default())
        .unwrap();
    let slots = vec![NewSlot {
        old_slot: slot,
        secret: pw("old-pass"),
        kdf: kdf(),
        token: None,
    }];
    let params = StartParams {
        key_size,
        sector_size: ss,
        resilience: res,
        hotzone: Some(hotzone),
        now_unix: 1_700_000_000,
    };
    Reencryption::start(f, hdr, old, slots, &params).unwrap()
}

fn finish_and_check(f: &File, r: Reencryption, plain: &[u8], ss: u32) {
    let hdr = r.finish(f).unwrap();
    assert_eq!(
        KeyAge::of(&hdr),
        Some(KeyAge {
            created_unix: 1_700_000_000
        })
    );
    let (hdr, _) = Luks2Header::read(f).unwrap();
    assert_eq!(hdr.data_segment().sector_size, ss);
    let (key, _) = hdr
        .unlock(f, &pw("old-pass"), &KdfLimits::default())
        .unwrap();
    assert!(read_plain(f, &key, ss) == plain, "plaintext changed");
    assert_eq!(
        hdr.keyslots().len(),
        1,
        "old keyslot and reencrypt keyslot are gone"
    );
}

#[test]
fn checksum_reencryption_runs_to_the_end_and_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let (f, plain) = volume(dir.path(), 4096);
    let mut r = start(
        &f,
        Resilience::from_name("checksum").unwrap(),
        64,
        4096,
        256 << 10,
    );
    // The normal reader refuses the volume while the re-encryption runs.
    assert!(matches!(
        Luks2Header::read(&f),
        Err(FormatError::ReencryptionInProgress { .. })
    ));
    let mut zones = 0;
    while r.step(&f, &FileIo(&f)).unwrap().is_some() {
        zones += 1;
        assert_eq!(peek(&f).unwrap().unwrap().frontier, r.frontier());
    }
    assert_eq!(zones, 8);
    finish_and_check(&f, r, &plain, 4096);
}

#[test]
fn journal_reencryption_can_change_key_and_sector_size() {
    let dir = tempfile::tempdir().unwrap();
    let (f, plain) = volume(dir.path(), 4096);
    let mut r = start(&f, Resilience::Journal, 32, 512, 768 << 10);
    while r.step(&f, &FileIo(&f)).unwrap().is_some() {}
    finish_and_check(&f, r, &plain, 512);
}

#[test]
fn an_interrupted_reencryption_resumes_from_its_frontier() {
    let dir = tempfile::tempdir().unwrap();
    let (f, plain) = volume(dir.path(), 4096);
    let mut r = start(
        &f,
        Resilience::from_name("checksum").unwrap(),
        64,
        4096,
        256 << 10,
    );
    r.stop_after_zones(Some(3));
    while let Ok(Some(_)) = r.step(&f, &FileIo(&f)) {}
    assert_eq!(r.frontier(), 3 * (256 << 10));
    drop(r);
    let mut r = Reencryption::open(&f, &[pw("old-pass")], &KdfLimits::default()).unwrap();
    assert_eq!(r.frontier(), 3 * (256 << 10));
    r.set_hotzone(Some(1 << 20)).unwrap();
    while r.step(&f, &FileIo(&f)).unwrap().is_some() {}
    finish_and_check(&f, r, &plain, 4096);
}

/// Simulates a crash inside a zone: resilience data and the hot-zone commit are on disk, the
/// zone holds `damage` (partly new ciphertext, or garbage for the journal).
fn crash_in_zone(f: &File, r: &mut Reencryption, damage: impl Fn(&mut [u8], &Reencryption)) {
    let zone = r.next_zone().unwrap();
    let abs = r.data_offset() + zone.start;
    let mut b = vec![0u8; (zone.end - zone.start) as usize];
    f.read_exact_at(&mut b, abs).unwrap();
    match r.state().resilience {
        Resilience::Checksum { hash, block_size } => {
            let hl = hash.output_len();
            let mut sums = vec![0u8; b.len() / block_size as usize * hl];
            for (blk, out) in b
                .chunks_exact(block_size as usize)
                .zip(sums.chunks_exact_mut(hl))
            {
                hash.hash_parts(&[blk], out);
            }
            f.write_all_at(&sums, r.state().area_offset).unwrap();
        }
        Resilience::Journal => f.write_all_at(&b, r.state().area_offset).unwrap(),
        Resilience::None => {}
    }
    r.commit_layout(f, zone.start, Some(b.len() as u64))
        .unwrap();
    damage(&mut b, r);
    f.write_all_at(&b, abs).unwrap();
}

#[test]
fn a_crash_mid_zone_is_recovered_from_checksums() {
    let dir = tempfile::tempdir().unwrap();
    let (f, plain) = volume(dir.path(), 4096);
    let mut r = start(
        &f,
        Resilience::from_name("checksum").unwrap(),
        64,
        4096,
        512 << 10,
    );
    r.step(&f, &FileIo(&f)).unwrap();
    crash_in_zone(&f, &mut r, |b, r| {
        // The first half of the zone reached the disk re-encrypted, the rest is still old.
        let iv = r.next_zone().unwrap().start / 512;
        let half = b.len() / 2;
        r.old_cipher.decrypt_in_place(&mut b[..half], iv).unwrap();
        r.new_cipher.encrypt_in_place(&mut b[..half], iv).unwrap();
    });
    drop(r);
    let st = peek(&f).unwrap().unwrap();
    assert_eq!(st.hot_len, Some(512 << 10));
    let mut r = Reencryption::open(&f, &[pw("old-pass")], &KdfLimits::default()).unwrap();
    assert!(r.hot_zone().is_some());
    r.recover(&f, &FileIo(&f)).unwrap();
    assert!(r.hot_zone().is_none());
    while r.step(&f, &FileIo(&f)).unwrap().is_some() {}
    finish_and_check(&f, r, &plain, 4096);
}

#[test]
fn a_crash_mid_zone_is_recovered_from_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let (f, plain) = volume(dir.path(), 4096);
    let mut r = start(&f, Resilience::Journal, 64, 4096, 512 << 10);
    r.step(&f, &FileIo(&f)).unwrap();
    crash_in_zone(&f, &mut r, |b, _| b.fill(0xa5));
    drop(r);
    let mut r = Reencryption::open(&f, &[pw("old-pass")], &KdfLimits::default()).unwrap();
    while r.step(&f, &FileIo(&f)).unwrap().is_some() {}
    finish_and_check(&f, r, &plain, 4096);
}

#[test]
fn negative_control_without_recovery_the_crashed_zone_is_lost() {
    // Treat the crashed zone as done without replaying the journal: the data must differ, so
    // the recovery test above really depends on the recovery.
    let dir = tempfile::tempdir().unwrap();
    let (f, plain) = volume(dir.path(), 4096);
    let mut r = start(&f, Resilience::Journal, 64, 4096, 512 << 10);
    crash_in_zone(&f, &mut r, |b, _| b.fill(0xa5));
    let z = r.hot_zone().unwrap();
    r.commit_layout(&f, z.end, None).unwrap();
    while r.step(&f, &FileIo(&f)).unwrap().is_some() {}
    let hdr = r.finish(&f).unwrap();
    let (key, _) = hdr
        .unlock(&f, &pw("old-pass"), &KdfLimits::default())
        .unwrap();
    assert!(read_plain(&f, &key, 4096) != plain);
}

fn edit_json(f: &File, edit: impl Fn(&mut Value)) {
    use crate::luks2::header::checksum;
    use crate::luks2::layout::{CSUM_LEN, OFF_CSUM};
    for off in [0u64, 16384] {
        let mut bin = [0u8; 4096];
        f.read_exact_at(&mut bin, off).unwrap();
        let mut area = vec![0u8; 12288];
        f.read_exact_at(&mut area, off + 4096).unwrap();
        let end = area.iter().position(|&b| b == 0).unwrap();
        let mut v: Value = serde_json::from_slice(&area[..end]).unwrap();
        edit(&mut v);
        let j = serde_json::to_vec(&v).unwrap();
        area.fill(0);
        area[..j.len()].copy_from_slice(&j);
        bin[OFF_CSUM..OFF_CSUM + CSUM_LEN].fill(0);
        let c = checksum(&bin, &area);
        bin[OFF_CSUM..OFF_CSUM + CSUM_LEN].copy_from_slice(&c);
        f.write_all_at(&bin, off).unwrap();
        f.write_all_at(&area, off + 4096).unwrap();
    }
}

#[test]
fn a_tampered_reencryption_header_fails_its_digest_and_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (f, _) = volume(dir.path(), 4096);
    let mut r = start(
        &f,
        Resilience::from_name("checksum").unwrap(),
        64,
        4096,
        256 << 10,
    );
    r.step(&f, &FileIo(&f)).unwrap();
    let ks = r.state().keyslot.to_string();
    drop(r);
    // Control: untouched, it opens.
    Reencryption::open(&f, &[pw("old-pass")], &KdfLimits::default()).unwrap();
    // Switch the resilience to "none" (an attacker wanting a crash to destroy a zone).
    edit_json(&f, |v| {
        let a = &mut v["keyslots"][&ks]["area"];
        a["type"] = "none".into();
        a.as_object_mut().unwrap().remove("hash");
        a.as_object_mut().unwrap().remove("sector_size");
    });
    assert!(peek(&f).unwrap().is_some(), "structurally valid");
    let e = Reencryption::open(&f, &[pw("old-pass")], &KdfLimits::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("CVE-2021-4122"), "{e}");
}

#[test]
fn requirements_other_than_v2_are_refused_with_what_to_do() {
    let top = |req: &[&str]| {
        serde_json::json!({"config": {"requirements": {"mandatory": req}}})
            .as_object()
            .unwrap()
            .clone()
    };
    assert!(check_requirements(&top(&["online-reencrypt-v2"])).is_ok());
    let e = check_requirements(&top(&["online-reencrypt-v3"])).unwrap_err();
    assert!(e.to_string().contains("--resume-only"), "{e}");
    let e = check_requirements(&top(&["online-reencrypt"])).unwrap_err();
    assert!(e.to_string().contains("repair"), "{e}");
    let e = check_requirements(&top(&["online-reencrypt-v2", "opal"])).unwrap_err();
    assert!(matches!(e, FormatError::UnmetRequirements(_)), "{e}");
    assert!(check_requirements(&top(&[])).is_err());
}

#[test]
fn a_hot_zone_larger_than_the_limit_is_refused_before_any_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let (f, _) = volume(dir.path(), 4096);
    let r = start(&f, Resilience::None, 64, 4096, 256 << 10);
    let (hdr, _) = Luks2Header::read_reencrypt(&f).unwrap();
    let mut md = hdr.metadata.clone();
    let segs = md.reenc_segments.as_mut().unwrap();
    segs.get_mut(&0).unwrap().flags = Some(vec!["in-reencryption".into()]);
    // A 2 GiB "hot zone" on a 2 MiB volume: refused by the size checks.
    segs.get_mut(&0).unwrap().size = SegmentSize::Bytes(2 << 30);
    assert!(ReencState::parse(&md, 16 * 1024 * 1024 + DATA).is_err());
    drop(r);
}

/// The fuzz target's edits (fuzz/src/luks2.rs `reencrypt`), a few thousand times from a fixed
/// seed, on the parser alone: never a panic, and a state that parses stays inside the device.
#[test]
fn random_edits_of_a_reencryption_header_never_panic_the_parser() {
    let template: Value =
        serde_json::from_str(include_str!("../../../fuzz/src/reencrypt_template.json")).unwrap();
    let paths = [
        "/keyslots/2/area/offset",
        "/keyslots/2/area/size",
        "/keyslots/2/area/type",
        "/keyslots/2/area/hash",
        "/keyslots/2/area/sector_size",
        "/keyslots/2/mode",
        "/keyslots/2/direction",
        "/keyslots/2/key_size",
        "/segments/0/offset",
        "/segments/0/size",
        "/segments/0/iv_tweak",
        "/segments/0/flags",
        "/segments/1/offset",
        "/segments/1/size",
        "/segments/1/iv_tweak",
        "/segments/1/flags",
        "/segments/2/flags",
        "/segments/3/flags",
        "/segments/3/sector_size",
        "/digests/0/segments",
        "/digests/1/segments",
        "/digests/2/segments",
        "/config/requirements/mandatory",
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let size = 18 << 20;
    let mut parsed = 0;
    for _ in 0..3000 {
        let mut v = template.clone();
        for _ in 0..(next() % 4 + 1) {
            let path = paths[(next() % paths.len() as u64) as usize];
            let val: Option<Value> = match next() % 7 {
                0 => None,
                1 => Some((next() % 70000).into()),
                2 => Some(
                    match next() % 4 {
                        0 => next(),
                        1 => u64::MAX - next() % 1000,
                        2 => (16 << 20) + 512 * (next() % 8192),
                        _ => 1 << (next() % 64),
                    }
                    .to_string()
                    .into(),
                ),
                3 => Some(
                    [
                        "checksum",
                        "journal",
                        "none",
                        "datashift",
                        "",
                        "sha1",
                        "backward",
                    ][(next() % 7) as usize]
                        .into(),
                ),
                4 => Some(serde_json::json!(["in-reencryption"])),
                5 => {
                    let f = ["backup-previous", "backup-final", "backup-moved-segment"]
                        [(next() % 3) as usize];
                    Some(serde_json::json!([f]))
                }
                _ => {
                    let ids = &["0", "1", "2", "3"][..(next() % 5) as usize];
                    Some(serde_json::json!(ids))
                }
            };
            let (parent, key) = path.rsplit_once('/').unwrap();
            if let Some(Value::Object(o)) = v.pointer_mut(parent) {
                match val {
                    Some(n) => {
                        o.insert(key.into(), n);
                    }
                    None => {
                        o.remove(key);
                    }
                }
            }
        }
        let Ok(md) = Metadata::from_value_mode(&v, 16384, true) else {
            continue;
        };
        if let Ok(st) = ReencState::parse(&md, size) {
            parsed += 1;
            assert!(st.frontier <= st.data_size, "{st:?}");
            if let Some(h) = st.hot_len {
                assert!(
                    h <= MAX_HEADER_HOTZONE && st.frontier + h <= st.data_size,
                    "{st:?}"
                );
            }
        }
    }
    assert!(
        parsed > 0,
        "no edit ever produced a valid state: the test tests nothing"
    );
}

/// The keyslot areas a finished re-encryption has to wipe: the old key's keyslots and the
/// resilience area (`(offset, size)`, read from the state before finishing).
fn areas_to_wipe(r: &Reencryption) -> Vec<(u64, u64)> {
    let md = &r.header().metadata;
    let old = &md.digests[&r.state().old_digest].keyslots;
    md.keyslots
        .iter()
        .filter(|(id, _)| old.contains(id) || **id == r.state().keyslot)
        .filter_map(|(_, k)| k.area_extent())
        .collect()
}

fn read_range(f: &File, (off, size): (u64, u64)) -> Vec<u8> {
    let mut b = vec![0u8; size as usize];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

#[test]
fn a_crash_between_the_final_commit_and_the_wipe_is_wiped_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let (f, plain) = volume(dir.path(), 4096);
    let mut r = start(&f, Resilience::Journal, 64, 4096, 1 << 20);
    while r.step(&f, &FileIo(&f)).unwrap().is_some() {}
    let areas = areas_to_wipe(&r);
    assert_eq!(areas.len(), 2, "old keyslot + resilience area: {areas:?}");
    let before: Vec<Vec<u8>> = areas.iter().map(|&a| read_range(&f, a)).collect();
    // The crash: the old keyslots are gone from the header, their bytes are still there.
    r.finish_then_crash_test(&f).unwrap();
    let (hdr, _) = Luks2Header::read(&f).unwrap();
    assert!(hdr.tokens().any(|(_, t)| t.type_name() == WIPE_TOKEN));
    for (a, b) in areas.iter().zip(&before) {
        assert!(read_range(&f, *a) == *b, "control: {a:?} not wiped yet");
    }
    // The next open finishes the wipe.
    assert_eq!(
        complete_pending_wipe(&f).unwrap(),
        PendingWipe::Wiped(2, areas.iter().map(|a| a.1).sum())
    );
    for (a, b) in areas.iter().zip(&before) {
        assert!(read_range(&f, *a) != *b, "{a:?} still holds the old bytes");
    }
    let (hdr, _) = Luks2Header::read(&f).unwrap();
    assert!(!hdr.tokens().any(|(_, t)| t.type_name() == WIPE_TOKEN));
    assert_eq!(complete_pending_wipe(&f).unwrap(), PendingWipe::Nothing);
    let (key, _) = hdr
        .unlock(&f, &pw("old-pass"), &KdfLimits::default())
        .unwrap();
    assert!(read_plain(&f, &key, 4096) == plain, "plaintext changed");
}

#[test]
fn a_normal_finish_leaves_no_pending_wipe_record() {
    let dir = tempfile::tempdir().unwrap();
    let (f, _) = volume(dir.path(), 4096);
    let mut r = start(&f, Resilience::Journal, 64, 4096, 1 << 20);
    while r.step(&f, &FileIo(&f)).unwrap().is_some() {}
    r.finish(&f).unwrap();
    let (hdr, _) = Luks2Header::read(&f).unwrap();
    assert!(!hdr.tokens().any(|(_, t)| t.type_name() == WIPE_TOKEN));
}

#[test]
fn a_forged_pending_wipe_record_never_overwrites_a_keyslot_or_data() {
    let dir = tempfile::tempdir().unwrap();
    let (f, plain) = volume(dir.path(), 4096);
    let (hdr, _) = Luks2Header::read(&f).unwrap();
    let live = hdr
        .metadata
        .keyslots
        .values()
        .find_map(Keyslot::area_extent)
        .unwrap();
    let data = hdr.data_segment().offset;
    let hs = hdr.hdr_size();
    let ks_end = 2 * hs + hdr.metadata.config.keyslots_size;
    let forge = |areas: Value, extra: &dyn Fn(&mut Value)| {
        edit_json(&f, |v| {
            v["tokens"]["9"] = serde_json::json!({
                "type": WIPE_TOKEN, "keyslots": [], "areas": areas.clone()
            });
            extra(v);
        });
    };
    let s = |n: u64| Value::from(n.to_string());
    let cases: Vec<(&str, Value)> = vec![
        (
            "the live keyslot",
            serde_json::json!([[s(live.0), s(live.1)]]),
        ),
        ("the data area", serde_json::json!([[s(data), s(1 << 20)]])),
        ("the binary headers", serde_json::json!([[s(0), s(2 * hs)]])),
        (
            "past the keyslots area",
            serde_json::json!([[s(ks_end - 4096), s(8192)]]),
        ),
        (
            "unaligned",
            serde_json::json!([[s(live.0 + live.1 + 512), s(4096)]]),
        ),
        (
            "overflowing",
            serde_json::json!([[s(u64::MAX - 4095), s(4096)]]),
        ),
        ("not a pair", serde_json::json!([[s(live.0 + live.1)]])),
        ("nonsense", serde_json::json!("everything")),
    ];
    let snapshot = || read_range(&f, (0, data + DATA));
    for (what, areas) in cases {
        forge(areas, &|_| {});
        let before = snapshot();
        let got = complete_pending_wipe(&f).unwrap();
        assert!(matches!(got, PendingWipe::Refused(_)), "{what}: {got:?}");
        assert!(snapshot() == before, "{what}: something was written");
    }
    // A header whose data segment starts inside its keyslots area (e.g. offset 0: detached
    // layout) gets no wipe at all, even of a free range.
    let free = (live.0 + live.1 + 4096, 4096);
    forge(serde_json::json!([[s(free.0), s(free.1)]]), &|v| {
        v["segments"]["0"]["offset"] = "0".into();
    });
    let before = snapshot();
    let got = complete_pending_wipe(&f);
    assert!(
        matches!(got, Ok(PendingWipe::Refused(_)) | Err(_)),
        "{got:?}"
    );
    assert!(snapshot() == before, "offset 0: something was written");
    // Control: the same free range with the real layout is wiped, and nothing else changes.
    forge(serde_json::json!([[s(free.0), s(free.1)]]), &|v| {
        v["segments"]["0"]["offset"] = s(data);
    });
    let before = snapshot();
    assert_eq!(
        complete_pending_wipe(&f).unwrap(),
        PendingWipe::Wiped(1, 4096)
    );
    let after = snapshot();
    let changed: Vec<usize> = (0..before.len())
        .filter(|&i| before[i] != after[i])
        .collect();
    let lo = changed
        .iter()
        .copied()
        .filter(|&i| i as u64 >= 2 * hs)
        .min()
        .unwrap();
    let hi = changed
        .iter()
        .copied()
        .filter(|&i| i as u64 >= 2 * hs)
        .max()
        .unwrap();
    assert!(
        lo as u64 >= free.0 && (hi as u64) < free.0 + free.1,
        "wrote outside the free range: [{lo}, {hi}]"
    );
    let (hdr, _) = Luks2Header::read(&f).unwrap();
    let (key, _) = hdr
        .unlock(&f, &pw("old-pass"), &KdfLimits::default())
        .unwrap();
    assert!(read_plain(&f, &key, 4096) == plain);
}

#[test]
fn zones_split_across_threads_keep_the_data_and_write_cryptsetups_checksums() {
    let dir = tempfile::tempdir().unwrap();
    let (f, plain) = volume(dir.path(), 4096);
    let mut r = start(
        &f,
        Resilience::from_name("checksum").unwrap(),
        64,
        4096,
        1 << 20,
    );
    r.set_threads(3);
    // The old ciphertext of the first zone, hashed the simple way.
    let abs = r.data_offset();
    let old = read_range(&f, (abs, 1 << 20));
    let want: Vec<u8> = old
        .chunks_exact(4096)
        .flat_map(|b| {
            let mut h = [0u8; 32];
            HashAlg::Sha256.hash_parts(&[b], &mut h);
            h
        })
        .collect();
    r.step(&f, &FileIo(&f)).unwrap();
    let area = r.state().area_offset;
    assert!(
        read_range(&f, (area, want.len() as u64)) == want,
        "checksums differ"
    );
    while r.step(&f, &FileIo(&f)).unwrap().is_some() {}
    finish_and_check(&f, r, &plain, 4096);
    // And with the journal, three threads, a sector-size change.
    let (f, plain) = volume(dir.path(), 4096);
    let mut r = start(&f, Resilience::Journal, 32, 512, 1536 << 10);
    r.set_threads(3);
    while r.step(&f, &FileIo(&f)).unwrap().is_some() {}
    finish_and_check(&f, r, &plain, 512);
}

/// The online path's I/O: no [`ZoneIo::parallel`], so the engine reads and writes whole zones
/// from the calling thread.
struct WholeZoneIo<'a>(&'a File);

impl ZoneIo for WholeZoneIo<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}

#[test]
fn direct_io_and_whole_zone_io_give_the_same_result_in_every_mode() {
    // tempfile's directory is on a disk file system here (O_DIRECT accepted); on tmpfs the same
    // code takes the buffered path, which must give the same result too.
    let dir = tempfile::tempdir().unwrap();
    for (res, hot) in [
        (Resilience::from_name("checksum").unwrap(), 1u64 << 20),
        (Resilience::Journal, 1 << 20),
        (Resilience::None, 1 << 20),
    ] {
        // Both ways the checksums of the first zone are cryptsetup's (one SHA-256 per
        // 4096-byte block of the old ciphertext).
        for direct in [true, false] {
            let (f, plain) = volume(dir.path(), 4096);
            let mut r = start(&f, res, 64, 4096, hot);
            r.set_threads(2);
            let dio = DirectFileIo::open(&f);
            // Reopened through the descriptor, O_DIRECT is used wherever the file system
            // accepts it for this file by name.
            let by_name = {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(dir.path().join("vol.img"))
                    .is_ok()
            };
            assert_eq!(dio.is_direct(), by_name);
            let whole = WholeZoneIo(&f);
            let io: &dyn ZoneIo = if direct { &dio } else { &whole };
            let old = read_range(&f, (r.data_offset(), hot));
            r.step(&f, io).unwrap();
            if matches!(res, Resilience::Checksum { .. }) {
                let want: Vec<u8> = old
                    .chunks_exact(4096)
                    .flat_map(|b| {
                        let mut h = [0u8; 32];
                        HashAlg::Sha256.hash_parts(&[b], &mut h);
                        h
                    })
                    .collect();
                let area = r.state().area_offset;
                let got = read_range(&f, (area, want.len() as u64));
                assert!(
                    got == want,
                    "checksums (direct: {direct}) are not cryptsetup's"
                );
            }
            // Stop after two zones; the rest is resumed with the other I/O path.
            r.step(&f, io).unwrap();
            drop(r);
            let mut r = Reencryption::open(&f, &[pw("old-pass")], &KdfLimits::default()).unwrap();
            r.set_threads(2);
            let io: &dyn ZoneIo = if direct { &whole } else { &dio };
            while r.step(&f, io).unwrap().is_some() {}
            finish_and_check(&f, r, &plain, 4096);
        }
    }
}

#[test]
fn a_crash_mid_zone_after_direct_io_is_recovered_and_its_negative_control_fails() {
    // The hot-zone commit happens before any data write also on the parallel/direct path: a
    // zone whose first part reached the disk is recovered from its checksums. Without the
    // recovery (treating the zone as done) the data differs.
    let dir = tempfile::tempdir().unwrap();
    for recover in [true, false] {
        let (f, plain) = volume(dir.path(), 4096);
        let dio = DirectFileIo::open(&f);
        let mut r = start(
            &f,
            Resilience::from_name("checksum").unwrap(),
            64,
            4096,
            1 << 20,
        );
        r.set_threads(2);
        r.step(&f, &dio).unwrap();
        r.step_then_crash_test(&f, &dio).unwrap();
        drop(r);
        let mut r = Reencryption::open(&f, &[pw("old-pass")], &KdfLimits::default()).unwrap();
        r.set_threads(2);
        let z = r.hot_zone().expect("the crash left a hot zone");
        if !recover {
            r.commit_layout(&f, z.end, None).unwrap();
        }
        while r.step(&f, &dio).unwrap().is_some() {}
        let hdr = r.finish(&f).unwrap();
        let (key, _) = hdr
            .unlock(&f, &pw("old-pass"), &KdfLimits::default())
            .unwrap();
        assert_eq!(read_plain(&f, &key, 4096) == plain, recover);
    }
}

#[test]
fn aligned_buffers_are_page_aligned_and_sized() {
    let mut v = Vec::new();
    for n in [4096usize, 1 << 20, 12288] {
        let b = aligned_mut(&mut v, n);
        assert_eq!(b.len(), n);
        assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
    }
}
