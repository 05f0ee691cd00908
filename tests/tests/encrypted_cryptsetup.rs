//! cryptsetup → nbdcryptd, fresh volumes: `cryptsetup luksFormat --type luks2` with each sector
//! size and key-derivation function, a second passphrase from `luksAddKey`; data written through
//! NBD survives lock/unlock and is exactly what the independent decryptor (`verify.py`, given the
//! volume key cryptsetup dumps) finds on disk.

use nbdcrypt_tests::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const DATA: u64 = 4 * MIB;
const P1: &[u8] = b"first passphrase, slot 0";
const P2: &[u8] = b"second passphrase: slot 1 \xc3\xa9\n(with a newline)";

fn formatted(sector_size: u32, kdf: &str) -> (TempDir, PathBuf) {
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, DATA, sector_size, kdf, P1);
    luks_add_key(&img, P1, P2, kdf);
    (dir, img)
}

#[track_caller]
fn expect_code(out: Out, code: i32, what: &str) {
    assert_eq!(
        out.code(),
        Some(code),
        "{what}: expected exit {code}\n{}",
        out.details()
    );
}

fn round_trip(sector_size: u32, kdf: &str, seed: u64) {
    let (dir, img) = formatted(sector_size, kdf);
    let mut d = Daemon::volume_in(dir, &img, &[]);

    let s = d.status();
    assert_eq!(s["state"], "locked", "{s:#}");
    assert_eq!(
        s["volume_uuid"].as_str(),
        Some(luks_uuid(&img).as_str()),
        "{s:#}"
    );

    // The second passphrase is in slot 1 only.
    expect_code(
        d.ctl_unlock_slot(P2, 0),
        3,
        "unlock with slot 1's passphrase restricted to --slot 0",
    );
    assert_eq!(d.state(), "locked");
    expect_code(d.unlock(P1), 0, "unlock with the luksFormat passphrase");
    let s = d.status();
    assert_eq!(s["sector_size"], sector_size, "{s:#}");
    assert_eq!(s["size"], DATA, "export size = data segment size: {s:#}");

    let data = random_bytes(seed, DATA as usize);
    write_export(&d.uri(), d.dir(), &data);
    assert_same_bytes(
        &read_export(&d.uri(), d.dir()),
        &data,
        "read back before the lock",
    );

    expect_code(d.lock_idle(), 0, "lock with no client");
    d.wait_state("locked", Duration::from_secs(15));
    nbdinfo(&[&d.uri()]).failure();
    expect_code(
        d.ctl_unlock_slot(P2, 1),
        0,
        "unlock with the luksAddKey passphrase (--slot 1)",
    );
    assert_same_bytes(
        &read_export(&d.uri(), d.dir()),
        &data,
        "read back after lock and unlock with the other passphrase",
    );
    expect_code(d.lock_idle(), 0, "second lock");
    d.terminate(Duration::from_secs(15));

    // Not our code: cryptsetup recovers the volume key, verify.py decrypts with it.
    let key = luks_volume_key(&img, P2);
    assert_eq!(key.len(), 128, "a 512-bit XTS key: {key}");
    assert_same_bytes(
        &verify_py_plaintext(&img, &key),
        &data,
        "verify.py's decryption of the image",
    );
}

trait SlotUnlock {
    fn ctl_unlock_slot(&self, secret: &[u8], slot: u32) -> Out;
}

impl SlotUnlock for Daemon {
    fn ctl_unlock_slot(&self, secret: &[u8], slot: u32) -> Out {
        let f = self.dir().join(format!("slot{slot}.key"));
        std::fs::write(&f, secret).unwrap();
        self.ctl(
            "unlock",
            &[
                "--key-file",
                f.to_str().unwrap(),
                "--slot",
                &slot.to_string(),
            ],
        )
    }
}

#[test]
fn luks_format_512_byte_sectors_pbkdf2_round_trips_and_verify_py_decrypts_what_was_written() {
    round_trip(512, "pbkdf2", 1);
}

#[test]
fn luks_format_4096_byte_sectors_pbkdf2_round_trips_and_verify_py_decrypts_what_was_written() {
    round_trip(4096, "pbkdf2", 2);
}

#[test]
fn luks_format_512_byte_sectors_argon2i_round_trips_and_verify_py_decrypts_what_was_written() {
    round_trip(512, "argon2i", 3);
}

#[test]
fn luks_format_4096_byte_sectors_argon2i_round_trips_and_verify_py_decrypts_what_was_written() {
    round_trip(4096, "argon2i", 4);
}

#[test]
fn luks_format_512_byte_sectors_argon2id_round_trips_and_verify_py_decrypts_what_was_written() {
    round_trip(512, "argon2id", 5);
}

#[test]
fn luks_format_4096_byte_sectors_argon2id_round_trips_and_verify_py_decrypts_what_was_written() {
    round_trip(4096, "argon2id", 6);
}

fn kill_slot(img: &Path, slot: u32, authorised_by: &[u8]) {
    let k = img.with_extension("killkey");
    std::fs::write(&k, authorised_by).unwrap();
    let mut c = cryptsetup();
    c.args(["luksKillSlot", "--batch-mode", "--key-file"])
        .arg(&k)
        .arg(img)
        .arg(slot.to_string());
    run(&mut c, TOOL_TIMEOUT).success();
}

#[test]
fn a_slot_killed_by_cryptsetup_while_the_daemon_runs_locked_no_longer_unlocks_and_the_other_still_does(
) {
    let (dir, img) = formatted(4096, "pbkdf2");
    let d = Daemon::volume_in(dir, &img, &[]);
    // Prove slot 0 worked while it existed.
    expect_code(d.unlock(P1), 0, "unlock with slot 0 before the kill");
    let data = random_bytes(77, DATA as usize);
    write_export(&d.uri(), d.dir(), &data);
    expect_code(d.lock_idle(), 0, "lock");
    d.wait_state("locked", Duration::from_secs(15));

    kill_slot(&img, 0, P2);

    expect_code(
        d.unlock(P1),
        3,
        "unlock with the passphrase of the killed slot 0",
    );
    assert_eq!(
        d.state(),
        "locked",
        "a killed slot's passphrase must leave the volume locked"
    );
    expect_code(
        d.unlock(P2),
        0,
        "unlock with the passphrase of the remaining slot 1",
    );
    assert_same_bytes(
        &read_export(&d.uri(), d.dir()),
        &data,
        "data after unlocking through slot 1",
    );
}

/// Format with `args`, serve, unlock, write random data, lock, unlock, read back, and compare
/// what verify.py decrypts with cryptsetup's volume key. Returns the export size.
fn custom_round_trip(file_size: u64, args: &[&str], seed: u64) -> u64 {
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.extend(cheap_kdf("pbkdf2"));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    luks_format_args(&img, file_size, P1, &all);
    let mut d = Daemon::volume_in(dir, &img, &[]);
    expect_code(d.unlock(P1), 0, "unlock");
    let size = d.status()["size"].as_u64().unwrap();
    assert!(
        size > 0 && size < file_size,
        "export size {size} for a {file_size}-byte file"
    );
    let data = random_bytes(seed, size as usize);
    write_export(&d.uri(), d.dir(), &data);
    expect_code(d.lock_idle(), 0, "lock");
    d.wait_state("locked", Duration::from_secs(10));
    expect_code(d.unlock(P1), 0, "unlock again");
    assert_same_bytes(
        &read_export(&d.uri(), d.dir()),
        &data,
        "read back after lock/unlock",
    );
    expect_code(d.lock_idle(), 0, "lock");
    d.terminate(Duration::from_secs(15));
    let key = luks_volume_key(&img, P1);
    assert_same_bytes(
        &verify_py_plaintext(&img, &key),
        &data,
        "verify.py's decryption of the image",
    );
    size
}

#[test]
fn an_aes_128_xts_volume_with_a_256_bit_key_round_trips_and_verify_py_decrypts_it() {
    let size = custom_round_trip(
        20 * MIB,
        &[
            "--cipher",
            "aes-xts-plain64",
            "--key-size",
            "256",
            "--sector-size",
            "4096",
        ],
        8,
    );
    assert_eq!(size, 4 * MIB);
}

#[test]
fn a_non_default_layout_with_64k_metadata_1m_keyslots_and_a_2m_data_offset_round_trips() {
    let size = custom_round_trip(
        6 * MIB,
        &[
            "--luks2-metadata-size",
            "64k",
            "--luks2-keyslots-size",
            "1m",
            "--offset",
            "4096",
            "--sector-size",
            "512",
        ],
        9,
    );
    assert_eq!(
        size,
        4 * MIB,
        "data starts at 2 MiB (--offset 4096 sectors of 512 bytes)"
    );
}

fn refused(img: &Path) -> Out {
    let dir = tempdir();
    let mut c = std::process::Command::new(daemon_binary());
    c.arg("--volume")
        .arg(img)
        .arg("--unix")
        .arg(dir.path().join("nbd.sock"))
        .arg("--control")
        .arg(dir.path().join("control.sock"));
    run(&mut c, Duration::from_secs(20)).failure()
}

#[test]
fn a_cipher_other_than_aes_xts_plain64_is_refused_at_start_naming_the_cipher() {
    for (cipher, bits) in [("aes-cbc-essiv:sha256", "256"), ("aes-xts-plain", "512")] {
        let dir = tempdir();
        let img = dir.path().join("volume.img");
        let mut args = vec!["--cipher", cipher, "--key-size", bits];
        let kdf = cheap_kdf("pbkdf2");
        args.extend(kdf.iter().map(String::as_str));
        luks_format_args(&img, 20 * MIB, P1, &args);
        let out = refused(&img);
        assert!(
            out.stderr.contains(cipher),
            "the refusal of {cipher} should name it\n{}",
            out.details()
        );
    }
}

#[test]
fn a_volume_in_the_middle_of_cryptsetup_reencrypt_encrypt_is_refused_at_start() {
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    File::create(&img).unwrap().set_len(40 * MIB).unwrap();
    let k = dir.path().join("k");
    std::fs::write(&k, P1).unwrap();
    let mut c = cryptsetup();
    c.args([
        "reencrypt",
        "--encrypt",
        "--init-only",
        "--batch-mode",
        "--type",
        "luks2",
        "--reduce-device-size",
        "32M",
    ])
    .args(cheap_kdf("pbkdf2"))
    .arg("--key-file")
    .arg(&k)
    .arg(&img);
    run(&mut c, TOOL_TIMEOUT).success();
    let out = refused(&img);
    assert!(
        out.stderr.contains("reencrypt"),
        "the refusal should say the volume is being re-encrypted\n{}",
        out.details()
    );
}

use std::fs::File;

#[test]
fn a_passphrase_added_by_cryptsetup_while_the_daemon_is_unlocked_opens_the_volume_after_a_lock() {
    let (dir, img) = formatted(512, "pbkdf2");
    let d = Daemon::volume_in(dir, &img, &[]);
    expect_code(d.unlock(P1), 0, "unlock");
    let data = random_bytes(10, DATA as usize);
    write_export(&d.uri(), d.dir(), &data);
    let p3: &[u8] = b"third passphrase, added while unlocked";
    luks_add_key(&img, P1, p3, "argon2id");
    // Serving continues undisturbed by the header update.
    assert_same_bytes(
        &read_export(&d.uri(), d.dir()),
        &data,
        "read while cryptsetup updated the header",
    );
    expect_code(d.lock_idle(), 0, "lock");
    d.wait_state("locked", Duration::from_secs(10));
    expect_code(
        d.unlock(p3),
        0,
        "unlock with the passphrase cryptsetup added meanwhile",
    );
    assert_same_bytes(&read_export(&d.uri(), d.dir()), &data, "read back");
    // cryptsetup still opens the header after our daemon served it (we never damaged it).
    let k = d.dir().join("p3");
    std::fs::write(&k, p3).unwrap();
    let mut c = cryptsetup();
    c.args(["open", "--test-passphrase", "--key-file"])
        .arg(&k)
        .arg(&img);
    run(&mut c, TOOL_TIMEOUT).success();
}

#[test]
fn an_unbound_keyslot_never_unlocks_and_a_priority_ignore_slot_only_with_slot_like_cryptsetup() {
    let (dir, img) = formatted(4096, "pbkdf2");
    let unbound: &[u8] = b"unbound keyslot passphrase";
    let ignored: &[u8] = b"ignored keyslot passphrase";
    // Slot 2: an unbound keyslot (its key is not the volume key).
    let k = dir.path().join("unbound.key");
    std::fs::write(&k, unbound).unwrap();
    let mut c = cryptsetup();
    c.args([
        "luksAddKey",
        "--batch-mode",
        "--unbound",
        "--key-size",
        "512",
        "--key-slot",
        "2",
    ])
    .args(cheap_kdf("pbkdf2"))
    .arg(&img)
    .arg(&k);
    run(&mut c, TOOL_TIMEOUT).success();
    // Slot 3: a normal keyslot with priority "ignore" (used only when asked for by number).
    let k_old = dir.path().join("p1.key");
    std::fs::write(&k_old, P1).unwrap();
    let k_ign = dir.path().join("ignored.key");
    std::fs::write(&k_ign, ignored).unwrap();
    let mut c = cryptsetup();
    c.args(["luksAddKey", "--batch-mode", "--key-slot", "3"])
        .args(cheap_kdf("pbkdf2"))
        .arg("--key-file")
        .arg(&k_old)
        .arg(&img)
        .arg(&k_ign);
    run(&mut c, TOOL_TIMEOUT).success();
    let mut c = cryptsetup();
    c.args(["config", "--priority", "ignore", "--key-slot", "3"])
        .arg(&img);
    run(&mut c, TOOL_TIMEOUT).success();

    let d = Daemon::volume_in(dir, &img, &[]);
    expect_code(d.unlock(unbound), 3, "the unbound keyslot's passphrase");
    let out = d.ctl_unlock_slot(unbound, 2);
    assert!(
        matches!(out.code(), Some(1) | Some(3)),
        "unbound keyslot with --slot 2: {:?}\n{}",
        out.code(),
        out.details()
    );
    assert_eq!(d.state(), "locked");
    expect_code(
        d.unlock(ignored),
        3,
        "a priority-ignore keyslot without --slot (cryptsetup skips it too)",
    );
    assert_eq!(d.state(), "locked");
    // Up to three wrong attempts so far: the rate limit may ask for a short wait first.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let out = loop {
        let out = d.ctl_unlock_slot(ignored, 3);
        if out.code() != Some(4) || std::time::Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    expect_code(out, 0, "the priority-ignore keyslot named with --slot 3");
    assert_eq!(d.state(), "unlocked");
}

#[test]
fn cryptsetup_offline_reencryption_to_a_new_key_and_4096_byte_sectors_of_data_written_through_us_reads_back(
) {
    // cryptsetup decrypts what we wrote (512-byte sectors, old key) and re-encrypts it (4096-byte
    // sectors, new key) in userspace; we must then serve exactly the same plaintext.
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, DATA, 512, "pbkdf2", P1); // one keyslot: reencrypt takes a key file then
    let data = random_bytes(12, DATA as usize);
    {
        let mut d = Daemon::volume_in(tempdir(), &img, &[]);
        expect_code(d.unlock(P1), 0, "unlock");
        write_export(&d.uri(), d.dir(), &data);
        expect_code(d.lock_idle(), 0, "lock");
        d.terminate(Duration::from_secs(15));
    }
    let old_key = luks_volume_key(&img, P1);
    let k = dir.path().join("p1.key");
    std::fs::write(&k, P1).unwrap();
    let mut c = cryptsetup();
    c.args([
        "reencrypt",
        "--batch-mode",
        "--force-offline-reencrypt",
        "--sector-size",
        "4096",
    ])
    .args(cheap_kdf("pbkdf2"))
    .arg("--key-file")
    .arg(&k)
    .arg(&img);
    run(&mut c, TOOL_TIMEOUT).success();
    let new_key = luks_volume_key(&img, P1);
    assert_ne!(
        old_key, new_key,
        "cryptsetup reencrypt did not change the volume key"
    );

    let d = Daemon::volume_in(dir, &img, &[]);
    expect_code(d.unlock(P1), 0, "unlock after cryptsetup reencrypt");
    let s = d.status();
    assert_eq!(s["sector_size"], 4096, "{s:#}");
    assert_same_bytes(
        &read_export(&d.uri(), d.dir()),
        &data,
        "our data after cryptsetup re-encrypted it",
    );
    // And writes under the new key are what verify.py finds.
    let data2 = random_bytes(13, DATA as usize);
    write_export(&d.uri(), d.dir(), &data2);
    expect_code(d.lock_idle(), 0, "lock");
    d.wait_state("locked", Duration::from_secs(10));
    assert_same_bytes(
        &verify_py_plaintext(&img, &new_key),
        &data2,
        "verify.py with the new key",
    );
}

#[test]
fn binary_key_files_with_nul_bytes_and_a_trailing_newline_unlock_as_cryptsetup_reads_them() {
    // cryptsetup --key-file takes the file's bytes as-is; so does `nbdcryptctl unlock --key-file`.
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    let mut binary = random_bytes(14, 4096);
    binary[100] = 0;
    binary[4095] = b'\n';
    luks_format(&img, DATA, 4096, "pbkdf2", &binary);
    let with_newline: &[u8] = b"passphrase with a trailing newline\n";
    luks_add_key(&img, &binary, with_newline, "pbkdf2");
    let d = Daemon::volume_in(dir, &img, &[]);
    expect_code(
        d.unlock(&binary[..4095]),
        3,
        "the binary key without its last byte",
    );
    expect_code(d.unlock(&binary), 0, "the 4 KiB binary key file");
    expect_code(d.lock_idle(), 0, "lock");
    d.wait_state("locked", Duration::from_secs(10));
    expect_code(
        d.unlock(with_newline),
        0,
        "a key file whose last byte is a newline",
    );
}

#[test]
fn a_1_mib_key_file_that_cryptsetup_accepts_unlocks_through_nbdcryptctl_as_through_unlock_key_file()
{
    // cryptsetup reads key files up to 8 MiB by default; a volume made with a 1 MiB one must be
    // usable with nbdcrypt's normal unlock path, not only with --unlock-key-file.
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    let big = random_bytes(15, MIB as usize);
    luks_format(&img, DATA, 4096, "pbkdf2", &big);
    let kf = dir.path().join("big.key");
    std::fs::write(&kf, &big).unwrap();
    {
        let d = Daemon::volume_in(
            tempdir(),
            &img,
            &["--unlock-key-file", kf.to_str().unwrap()],
        );
        d.wait_state("unlocked", Duration::from_secs(20));
    }
    let d = Daemon::volume_in(dir, &img, &[]);
    let out = d.ctl("unlock", &["--key-file", kf.to_str().unwrap()]);
    expect_code(
        out,
        0,
        "nbdcryptctl unlock --key-file with the 1 MiB key file",
    );
    assert_eq!(d.state(), "unlocked");
}
