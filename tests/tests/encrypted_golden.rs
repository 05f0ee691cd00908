//! cryptsetup → nbdcryptd, golden: the LUKS2 test vectors cryptsetup 2.6.1 made
//! (`shared/testdata/luks2`) are served, unlocked and read back through NBD; what comes out must
//! be the known plaintext pattern (`verify.py pattern N`).

use nbdcrypt_tests::*;
use std::ffi::OsStr;
use std::time::Duration;

/// Serve `img`, check the export is absent while locked, unlock with `passphrase`, copy the
/// whole export out with nbdcopy and compare it with the vector's plaintext pattern.
#[track_caller]
fn unlock_and_expect_pattern(d: &Daemon, passphrase: &str, sector_size: u64) {
    assert_eq!(
        d.state(),
        "locked",
        "the daemon must start (and stay) locked before an unlock"
    );
    nbdinfo(&[&d.uri()]).failure();
    let out = d.unlock(passphrase.as_bytes());
    assert_eq!(
        out.code(),
        Some(0),
        "unlock with {passphrase:?}\n{}",
        out.details()
    );
    let s = d.status();
    assert_eq!(s["state"], "unlocked", "{s:#}");
    assert_eq!(s["sector_size"], sector_size, "{s:#}");
    let (export, _) = nbdinfo_json(&d.uri());
    let size = export["export-size"].as_u64().expect("export-size");
    assert_eq!(s["size"], size, "status size vs NBD export size: {s:#}");
    assert_eq!(
        export["block_size_preferred"].as_u64(),
        Some(sector_size),
        "the sector size is advertised as the preferred block size: {export:#}"
    );
    let got = read_export(&d.uri(), d.dir());
    assert_eq!(got.len() as u64, size);
    assert_same_bytes(
        &got,
        &vector_pattern(size),
        &format!(
            "export of {} after unlock with {passphrase:?}",
            d.image.display()
        ),
    );
}

#[test]
fn vector_a_4096_byte_sectors_reads_back_the_pattern_after_unlock_with_the_pbkdf2_and_then_the_argon2id_passphrase(
) {
    let dir = tempdir();
    let img = gunzip_vector("tv-a-ss4096.img", dir.path());
    // The vector really carries a token of a type nobody implements (on a copy: cryptsetup may
    // rewrite a header it reads).
    let copy = dir.path().join("copy-for-luksdump.img");
    std::fs::copy(&img, &copy).unwrap();
    let dump = run(cryptsetup().arg("luksDump").arg(&copy), TOOL_TIMEOUT).success();
    assert!(
        dump.stdout.contains("example-kms"),
        "tv-a has no example-kms token?\n{}",
        dump.stdout
    );
    let d = Daemon::volume_in(dir, &img, &[]);
    // keyslot 0 (pbkdf2-sha256); the unknown `example-kms` token must not get in the way.
    unlock_and_expect_pattern(&d, "tv-a-pbkdf2-passphrase", 4096);
    let out = d.lock_idle();
    assert_eq!(
        out.code(),
        Some(0),
        "lock with no client attached\n{}",
        out.details()
    );
    d.wait_state("locked", Duration::from_secs(15));
    // keyslot 1 (argon2id, the slot the unknown token points at).
    unlock_and_expect_pattern(&d, "tv-a-argon2id-passphrase", 4096);
    assert_eq!(
        d.status()["volume_uuid"],
        "11111111-2222-4333-8444-555555555555"
    );
}

#[test]
fn vector_b_512_byte_sectors_argon2i_with_two_lanes_reads_back_the_pattern() {
    let dir = tempdir();
    let img = gunzip_vector("tv-b-ss512.img", dir.path());
    let d = Daemon::volume_in(dir, &img, &[]);
    unlock_and_expect_pattern(&d, "tv-b-argon2i-passphrase", 512);
    assert_eq!(
        d.status()["volume_uuid"],
        "22222222-3333-4444-8555-666666666666"
    );
}

#[test]
fn vector_b_read_only_export_reads_the_pattern_and_leaves_the_image_byte_for_byte_unchanged() {
    let dir = tempdir();
    let img = gunzip_vector("tv-b-ss512.img", dir.path());
    let before = std::fs::read(&img).unwrap();
    {
        let mut d = Daemon::volume_in(tempdir(), &img, &["--read-only"]);
        unlock_and_expect_pattern(&d, "tv-b-argon2i-passphrase", 512);
        d.terminate(Duration::from_secs(15));
    }
    assert!(
        std::fs::read(&img).unwrap() == before,
        "serving read-only changed the image file"
    );
}

/// Run nbdcryptd on `volume` and expect it to refuse to start (a time limit guards against a
/// daemon that starts after all).
fn refused_start(volume: &std::path::Path) -> Out {
    let dir = tempdir();
    let mut c = std::process::Command::new(daemon_binary());
    c.arg("--volume")
        .arg(volume)
        .arg("--unix")
        .arg(dir.path().join("nbd.sock"))
        .arg("--control")
        .arg(dir.path().join("control.sock"));
    let out = run(&mut c, Duration::from_secs(20));
    out.failure()
}

#[test]
fn the_detached_header_of_vector_c_is_refused_at_start_with_an_error_about_the_header() {
    let dir = tempdir();
    let hdr = gunzip_vector("tv-c-detached-hdr.img", dir.path());
    let out = refused_start(&hdr);
    let err = out.stderr.to_lowercase();
    assert!(
        err.contains("header") && err.contains("detached"),
        "the refusal must say the header is detached from its data\n{}",
        out.details()
    );
}

#[test]
fn the_data_file_of_vector_c_has_no_header_and_is_refused_at_start_with_an_error_about_the_header()
{
    let dir = tempdir();
    let data = gunzip_vector("tv-c-detached-data.img", dir.path());
    let out = refused_start(&data);
    assert!(
        out.stderr.to_lowercase().contains("header"),
        "the refusal must mention the missing LUKS2 header\n{}",
        out.details()
    );
}

#[test]
fn verify_py_agrees_with_the_vectors_so_the_golden_comparison_means_something() {
    // The independent decryptor must itself accept the vectors with their passphrases (else a
    // broken test environment, not the daemon, would be blamed).
    let dir = tempdir();
    let img = gunzip_vector("tv-b-ss512.img", dir.path());
    let out = verify_py(&[
        img.as_os_str(),
        OsStr::new("--passphrase"),
        OsStr::new("tv-b-argon2i-passphrase"),
    ])
    .success();
    assert!(out.stdout.contains("RESULT: OK"), "{}", out.details());
}

#[test]
fn the_detached_header_refusal_advises_only_flags_that_nbdcryptd_has() {
    // The advice in an error message is an instruction to the operator: a flag it names must
    // exist, or the operator is sent to a dead end.
    let dir = tempdir();
    let hdr = gunzip_vector("tv-c-detached-hdr.img", dir.path());
    let out = refused_start(&hdr);
    let help = run(
        std::process::Command::new(daemon_binary()).arg("--help"),
        Duration::from_secs(10),
    )
    .success();
    let flags: Vec<&str> = out
        .stderr
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .collect();
    for f in &flags {
        assert!(
            help.stdout
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .any(|w| w == *f),
            "the refusal advises `{f}`, which `nbdcryptd --help` does not list\n{}",
            out.details()
        );
    }
}
