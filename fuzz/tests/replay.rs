//! Replays every kept finding (`regressions/TARGET/*`) and, when generated, every seed
//! (`seeds/TARGET/*`, see make_seeds.py) through the harnesses, without libFuzzer: a finding
//! that comes back fails `cargo test` here, not only the fuzz smoke run.

use std::path::Path;

fn replay_dir(target: &str, dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut n = 0;
    let mut files: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_file()).collect();
    files.sort();
    for path in files {
        if path.file_name().is_some_and(|n| n.to_string_lossy().ends_with(".md")) {
            continue;
        }
        let data = std::fs::read(&path).unwrap();
        eprintln!("replay {target} {}", path.display());
        nbdcrypt_fuzz::run(target, &data);
        n += 1;
    }
    n
}

#[test]
fn regressions_and_seeds_replay() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut total = 0;
    for target in nbdcrypt_fuzz::TARGETS {
        total += replay_dir(target, &root.join("regressions").join(target));
        total += replay_dir(target, &root.join("seeds").join(target));
    }
    eprintln!("replayed {total} inputs");
}

#[test]
fn every_target_has_a_binary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for target in nbdcrypt_fuzz::TARGETS {
        assert!(root.join("fuzz_targets").join(format!("{target}.rs")).is_file(), "{target}");
    }
}

/// The seeds reach the deep end: the cryptsetup-made images really unlock through the harness
/// (with the tight KDF limits), and a wrong passphrase really does not.
#[test]
fn image_seeds_unlock() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/luks2_image_unlock");
    let Ok(a) = std::fs::read(dir.join("tv-a-pbkdf2")) else {
        eprintln!("no seeds (run make_seeds.py); skipped");
        return;
    };
    assert_eq!(nbdcrypt_fuzz::luks2::image_unlock_slot(&a), Some(0));
    let a1 = std::fs::read(dir.join("tv-a-argon2id")).unwrap();
    assert_eq!(nbdcrypt_fuzz::luks2::image_unlock_slot(&a1), Some(1));
    let b = std::fs::read(dir.join("tv-b-argon2i")).unwrap();
    assert_eq!(nbdcrypt_fuzz::luks2::image_unlock_slot(&b), Some(0));
    let c = std::fs::read(dir.join("tv-c-detached")).unwrap();
    assert_eq!(nbdcrypt_fuzz::luks2::image_unlock_slot(&c), Some(0));
    let wrong = std::fs::read(dir.join("tv-a-wrong-slots")).unwrap();
    assert_eq!(nbdcrypt_fuzz::luks2::image_unlock_slot(&wrong), None);
}

/// The XTS reference the NBD model check decrypts with tells IVs apart: it is not vacuous.
#[test]
fn xts_reference_detects_a_wrong_iv() {
    use nbdcrypt::crypto::{keys::VolumeKey, xts::SectorCipher};
    let key = nbdcrypt_fuzz::nbd::KEY;
    let c = SectorCipher::new(&VolumeKey::from_slice(&key), 512).unwrap();
    let plain = vec![0x5au8; 1024];
    let mut ct = plain.clone();
    c.encrypt_in_place(&mut ct, u64::MAX).unwrap(); // second sector wraps to IV 0
    assert_eq!(nbdcrypt_fuzz::xts::reference_decrypt(&key, &ct, 512, u64::MAX), plain);
    assert_ne!(nbdcrypt_fuzz::xts::reference_decrypt(&key, &ct, 512, u64::MAX - 1), plain);
}

/// The TLS seeds load where they should, and the broken ones fail with an error that says what
/// to do (see make_seeds.py `tls()` and tls-seeds/make.sh).
#[test]
fn tls_seeds_load_or_fail_clearly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/tls_certificates");
    if !dir.join("ec-pkcs8").is_file() {
        eprintln!("no seeds (run make_seeds.py); skipped");
        return;
    }
    let verdict = |n: &str| nbdcrypt_fuzz::tls::load(&std::fs::read(dir.join(n)).unwrap()).expect(n);
    for ok in ["ec-pkcs8", "ec-pkcs8-verify", "ec-pkcs8-verify-crl", "ec-sec1", "chain", "rsa-pkcs1",
        "certtool-padded-scalar", "der-all-verify-crl", "der-sec1", "der-rsa", "der-padded"]
    {
        assert_eq!(verdict(ok), Ok(()), "{ok}");
    }
    for (bad, says) in [
        ("mismatched-pair", "do not make a usable pair"),
        ("encrypted-label", "encrypted with a pass phrase"),
        ("raw-der-unwrapped", "looks like DER"),
    ] {
        let e = verdict(bad).unwrap_err();
        assert!(e.contains(says), "{bad}: {e}");
    }
}
