//! Volume-key re-encryption against the real cryptsetup, both ways (`nbdcryptctl reencrypt`,
//! `cryptsetup reencrypt`), on small volumes made by `cryptsetup luksFormat` and filled with the
//! test-vector pattern. The data is checked by `verify.py` (independent Python decryptor) with
//! the volume key `cryptsetup luksDump --dump-volume-key` extracts, so neither check relies on
//! our own code. (No dm-crypt in CI: `cryptsetup open` itself cannot run here.)

use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nbdcrypt_tests::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

const PASS: &[u8] = b"reencrypt test passphrase";
const PASS2: &[u8] = b"second keyslot secret";

/// A cryptsetup-formatted volume (pbkdf2, cheap) with `data` bytes of the test pattern, and a
/// key file holding `PASS`.
fn volume(data: u64, ss: u32) -> (TempDir, PathBuf, PathBuf) {
    let dir = tempdir();
    let img = dir.path().join("vol.img");
    luks_format(&img, data, ss, "pbkdf2", PASS);
    let key = luks_volume_key(&img, PASS);
    verify_py(&[
        OsStr::new("fill"),
        img.as_os_str(),
        OsStr::new("--volume-key"),
        OsStr::new(&key),
    ])
    .success();
    let kf = dir.path().join("pass.key");
    std::fs::write(&kf, PASS).unwrap();
    (dir, img, kf)
}

/// verify.py finds the pattern in every sector with the key `PASS` opens (exit 0).
#[track_caller]
fn assert_pattern(img: &Path, kf: &Path) {
    let out = verify_py(&[
        img.as_os_str(),
        OsStr::new("--passphrase-file"),
        kf.as_os_str(),
    ]);
    assert!(
        out.ok(),
        "verify.py: the data is not the pattern\n{}",
        out.details()
    );
    assert!(
        out.stdout.contains("plaintext pattern OK"),
        "{}",
        out.details()
    );
}

fn dump(img: &Path) -> String {
    run(cryptsetup().arg("luksDump").arg(img), TOOL_TIMEOUT)
        .success()
        .stdout
}

fn reencrypt(img: &Path, kf: &Path, extra: &[&str], env: &[(&str, &str)]) -> Out {
    let mut c = Command::new(ctl_binary());
    c.arg("reencrypt")
        .arg(img)
        .arg("--key-file")
        .arg(kf)
        .args(extra);
    c.env_remove("NBDCRYPT_CONTROL");
    for (k, v) in env {
        c.env(k, v);
    }
    run(&mut c, CTL_TIMEOUT)
}

fn cryptsetup_resume(img: &Path, kf: &Path) -> Out {
    run(
        cryptsetup()
            .args([
                "reencrypt",
                "--resume-only",
                "--force-offline-reencrypt",
                "--batch-mode",
            ])
            .arg("--key-file")
            .arg(kf)
            .arg(img),
        TOOL_TIMEOUT,
    )
}

#[test]
fn we_reencrypt_fully_and_cryptsetup_reads_the_new_key_and_the_data() {
    let (dir, img, kf) = volume(16 * MIB, 4096);
    let old_key = luks_volume_key(&img, PASS);
    let log = dir.path().join("audit.jsonl");
    reencrypt(
        &img,
        &kf,
        &["--hotzone-size", "1M", "--audit-log", log.to_str().unwrap()],
        &[],
    )
    .success();
    let d = dump(&img);
    assert!(
        !d.contains("online-reencrypt"),
        "requirement left behind:\n{d}"
    );
    assert!(
        d.contains("nbdcrypt-volume-key"),
        "key-age token missing:\n{d}"
    );
    let new_key = luks_volume_key(&img, PASS);
    assert_ne!(old_key, new_key, "the volume key did not change");
    assert_pattern(&img, &kf);
    // The audit log has the start and the finish.
    let text = std::fs::read_to_string(&log).unwrap();
    let phases: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["phase"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(phases.first().map(String::as_str), Some("start"), "{text}");
    assert_eq!(phases.last().map(String::as_str), Some("finish"), "{text}");

    // Negative control: the check catches one damaged zone.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[0u8; 4096], 16 * MIB + 5 * MIB).unwrap();
    let out = verify_py(&[
        img.as_os_str(),
        OsStr::new("--passphrase-file"),
        kf.as_os_str(),
    ]);
    assert!(!out.ok(), "verify.py did not notice a damaged sector");
}

#[test]
fn key_and_sector_size_change_with_the_journal_and_two_keyslots() {
    let (dir, img, kf) = volume(8 * MIB, 4096);
    luks_add_key(&img, PASS, PASS2, "pbkdf2");
    let kf2 = dir.path().join("pass2.key");
    std::fs::write(&kf2, PASS2).unwrap();
    reencrypt(
        &img,
        &kf,
        &[
            "--key-file",
            kf2.to_str().unwrap(),
            "--resilience",
            "journal",
            "--key-size",
            "256",
            "--sector-size",
            "512",
        ],
        &[],
    )
    .success();
    let d = dump(&img);
    assert!(d.contains("sector: 512"), "{d}");
    assert!(d.contains("Key:        256 bits"), "{d}");
    assert_pattern(&img, &kf);
    assert_pattern(&img, &kf2);
}

#[test]
fn a_keyslot_no_secret_opens_makes_us_refuse_unless_told_to_drop_it() {
    let (_dir, img, kf) = volume(4 * MIB, 4096);
    luks_add_key(&img, PASS, PASS2, "pbkdf2");
    let out = reencrypt(&img, &kf, &[], &[]).failure();
    assert!(out.stderr.contains("--drop-unopened"), "{}", out.details());
    assert!(
        !dump(&img).contains("online-reencrypt"),
        "a refused start changed the header"
    );
    reencrypt(&img, &kf, &["--drop-unopened"], &[]).success();
    assert_pattern(&img, &kf);
}

#[test]
fn our_interruption_is_finished_by_cryptsetup_resume_only() {
    let (_dir, img, kf) = volume(16 * MIB, 4096);
    let out = reencrypt(
        &img,
        &kf,
        &["--hotzone-size", "1M"],
        &[("NBDCRYPT_TEST_REENCRYPT_STOP_AFTER_ZONES", "3")],
    );
    assert!(
        !out.ok(),
        "the test hook did not stop it: {}",
        out.details()
    );
    let d = dump(&img);
    assert!(d.contains("online-reencrypt-v2"), "{d}");
    cryptsetup_resume(&img, &kf).success();
    assert!(!dump(&img).contains("online-reencrypt"));
    assert_pattern(&img, &kf);
}

#[test]
fn our_crash_inside_a_zone_is_recovered_by_cryptsetup_from_our_checksums() {
    for resilience in ["checksum", "journal"] {
        let (_dir, img, kf) = volume(16 * MIB, 4096);
        let out = reencrypt(
            &img,
            &kf,
            &["--hotzone-size", "1M", "--resilience", resilience],
            &[("NBDCRYPT_TEST_REENCRYPT_CRASH_AFTER_ZONES", "2")],
        );
        assert!(
            !out.ok() && out.stderr.contains("simulated crash"),
            "{}",
            out.details()
        );
        let json = header_json(&img);
        let in_reenc = json["segments"].as_object().unwrap().values().any(|s| {
            s["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "in-reencryption"))
        });
        assert!(
            in_reenc,
            "{resilience}: no hot zone left by the crash: {json}"
        );
        // cryptsetup wants an explicit `repair` (its crash recovery) before resuming.
        let out = cryptsetup_resume(&img, &kf);
        assert!(out.stderr.contains("recovery"), "{}", out.details());
        run(
            cryptsetup()
                .args(["repair", "--batch-mode", "--key-file"])
                .arg(&kf)
                .arg(&img),
            TOOL_TIMEOUT,
        )
        .success();
        cryptsetup_resume(&img, &kf).success();
        assert_pattern(&img, &kf);
    }
}

#[test]
fn our_own_crash_inside_a_zone_is_recovered_by_us() {
    let (_dir, img, kf) = volume(16 * MIB, 4096);
    let out = reencrypt(
        &img,
        &kf,
        &["--hotzone-size", "1M"],
        &[("NBDCRYPT_TEST_REENCRYPT_CRASH_AFTER_ZONES", "4")],
    );
    assert!(!out.ok(), "{}", out.details());
    let out = reencrypt(&img, &kf, &[], &[]).success();
    assert!(
        out.stderr.contains("recovering an interrupted zone"),
        "{}",
        out.details()
    );
    assert_pattern(&img, &kf);
}

/// Runs `cryptsetup reencrypt` with tiny hot zones and kills it (-9): as soon as its header
/// shows a hot zone (`in-reencryption`, i.e. inside a zone) when `inside_zone`, else after a
/// few zones are done.
fn cryptsetup_killed(img: &Path, kf: &Path, inside_zone: bool, resilience: &str) {
    let mut child = cryptsetup()
        .args([
            "reencrypt",
            "--force-offline-reencrypt",
            "--batch-mode",
            "--hotzone-size",
            "64k",
        ])
        .args(["--resilience", resilience])
        .args(cheap_kdf("pbkdf2"))
        .arg("--key-file")
        .arg(kf)
        .arg(img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    loop {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "cryptsetup made no progress"
        );
        if let Ok(Some(_)) = child.try_wait() {
            panic!("cryptsetup finished before it was killed; use a larger volume");
        }
        let Some(json) = try_header_json(img) else {
            continue;
        };
        let hot = has_hot_zone(&json);
        let done = json["segments"]["0"]["flags"].is_null()
            && json["segments"]["1"]["offset"]
                .as_str()
                .is_some_and(|o| o.parse::<u64>().unwrap_or(0) > 16 * MIB + MIB);
        if (inside_zone && hot) || (!inside_zone && done) {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "cryptsetup finished before it was killed; use a larger volume"
    );
}

fn has_hot_zone(json: &Value) -> bool {
    json["segments"].as_object().is_some_and(|o| {
        o.values().any(|s| {
            s["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "in-reencryption"))
        })
    })
}

fn try_header_json(img: &Path) -> Option<Value> {
    let f = std::fs::File::open(img).ok()?;
    let mut area = vec![0u8; 12288];
    f.read_exact_at(&mut area, 4096).ok()?;
    let end = area.iter().position(|&b| b == 0)?;
    serde_json::from_slice(&area[..end]).ok()
}

/// The JSON of the header copy cryptsetup (and we) would use: the copy whose checksum holds,
/// the higher seqid if both do. A kill can land between writing a copy's JSON area and its
/// binary header; the raw primary then shows a hot zone that was never committed.
fn header_json(img: &Path) -> Value {
    let f = std::fs::File::open(img).unwrap();
    let copy = |offset: u64| -> Option<(u64, Value)> {
        let mut bin = vec![0u8; 4096];
        f.read_exact_at(&mut bin, offset).ok()?;
        if !bin.starts_with(b"LUKS\xba\xbe") && !bin.starts_with(b"SKUL\xba\xbe") {
            return None;
        }
        let hdr_size = u64::from_be_bytes(bin[8..16].try_into().unwrap());
        if !(16384..=4 << 20).contains(&hdr_size) {
            return None;
        }
        let seqid = u64::from_be_bytes(bin[16..24].try_into().unwrap());
        let mut all = vec![0u8; usize::try_from(hdr_size).unwrap()];
        f.read_exact_at(&mut all, offset).ok()?;
        let stored = all[448..448 + 32].to_vec();
        all[448..448 + 64].fill(0);
        if Sha256::digest(&all)[..] != stored[..] {
            return None;
        }
        let json = &all[4096..];
        let end = json.iter().position(|&b| b == 0).unwrap_or(json.len());
        Some((seqid, serde_json::from_slice(&json[..end]).ok()?))
    };
    let primary = copy(0);
    let secondary = [
        16384u64,
        32768,
        65536,
        131072,
        262144,
        524288,
        1 << 20,
        2 << 20,
        4 << 20,
    ]
    .into_iter()
    .find_map(copy);
    match (primary, secondary) {
        (Some(a), Some(b)) => {
            if a.0 >= b.0 {
                a.1
            } else {
                b.1
            }
        }
        (Some(a), None) | (None, Some(a)) => a.1,
        (None, None) => panic!("{}: no valid LUKS2 header copy", img.display()),
    }
}

#[test]
fn cryptsetup_killed_mid_way_is_resumed_and_finished_by_us() {
    // Killed between zones (a clean interruption), then inside a zone (a hot zone to recover
    // from cryptsetup's checksums or journal). The kill can land just after the zone
    // completed, so the "inside" case retries until the header still shows the hot zone.
    let cases = [(false, "checksum"), (true, "checksum"), (true, "journal")];
    for (inside, resilience) in cases {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (_dir, img, kf) = volume(32 * MIB, 4096);
            cryptsetup_killed(&img, &kf, inside, resilience);
            let json = header_json(&img);
            assert!(
                dump(&img).contains("online-reencrypt-v2"),
                "cryptsetup had not started"
            );
            let hot = has_hot_zone(&json);
            if hot != inside {
                assert!(
                    attempts < 8,
                    "{resilience}: never caught cryptsetup inside a zone"
                );
                continue;
            }
            let out = reencrypt(&img, &kf, &[], &[]);
            assert!(out.ok(), "{resilience}, hot zone {hot}: {}", out.details());
            assert_eq!(
                out.stderr.contains("recovering an interrupted zone"),
                hot,
                "{}",
                out.details()
            );
            assert!(!dump(&img).contains("online-reencrypt"));
            assert_pattern(&img, &kf);
            break;
        }
    }
}

/// Rewrites both header copies (16 KiB headers) with `edit` applied to the JSON and valid
/// checksums: what someone holding the disk, but not the keys, can do.
fn edit_header(img: &Path, edit: impl Fn(&mut Value)) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    for off in [0u64, 16384] {
        let mut bin = vec![0u8; 4096];
        f.read_exact_at(&mut bin, off).unwrap();
        let mut area = vec![0u8; 12288];
        f.read_exact_at(&mut area, off + 4096).unwrap();
        let end = area.iter().position(|&b| b == 0).unwrap();
        let mut v: Value = serde_json::from_slice(&area[..end]).unwrap();
        edit(&mut v);
        let j = serde_json::to_vec(&v).unwrap();
        area.fill(0);
        area[..j.len()].copy_from_slice(&j);
        bin[448..512].fill(0);
        let mut h = Sha256::new();
        h.update(&bin);
        h.update(&area);
        bin[448..480].copy_from_slice(&h.finalize());
        f.write_all_at(&bin, off).unwrap();
        f.write_all_at(&area, off + 4096).unwrap();
    }
}

#[test]
fn a_reencryption_header_whose_digest_fails_is_refused_by_us_and_by_cryptsetup() {
    let (_dir, img, kf) = volume(16 * MIB, 4096);
    reencrypt(
        &img,
        &kf,
        &["--hotzone-size", "1M"],
        &[("NBDCRYPT_TEST_REENCRYPT_STOP_AFTER_ZONES", "2")],
    )
    .failure();
    let json = header_json(&img);
    let ks = json["keyslots"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, k)| k["type"] == "reencrypt")
        .map(|(id, _)| id.clone())
        .unwrap();
    // Turn the resilience off (so a crash would destroy a zone) without the keys.
    edit_header(&img, |v| {
        let a = v["keyslots"][&ks]["area"].as_object_mut().unwrap();
        a.insert("type".into(), "none".into());
        a.remove("hash");
        a.remove("sector_size");
    });
    let out = reencrypt(&img, &kf, &[], &[]).failure();
    assert!(
        out.stderr.contains("digest does not verify"),
        "{}",
        out.details()
    );
    let out = cryptsetup_resume(&img, &kf);
    assert!(
        !out.ok(),
        "cryptsetup accepted the tampered header: {}",
        out.details()
    );
    // The data was not touched by either.
    assert!(header_json(&img)["config"]["requirements"]["mandatory"][0] == "online-reencrypt-v2");
}

#[test]
fn other_commands_refuse_a_volume_in_reencryption() {
    let (_dir, img, kf) = volume(4 * MIB, 4096);
    reencrypt(
        &img,
        &kf,
        &["--hotzone-size", "1M"],
        &[("NBDCRYPT_TEST_REENCRYPT_STOP_AFTER_ZONES", "1")],
    )
    .failure();
    let out = nbdcryptctl(&[
        OsStr::new("test-key"),
        img.as_os_str(),
        OsStr::new("--key-file"),
        kf.as_os_str(),
    ]);
    assert!(!out.ok());
    assert!(out.stderr.contains("reencrypt"), "{}", out.details());
}
