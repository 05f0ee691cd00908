//! Secret files read by the real binaries go through one capped reader: a key file one byte
//! past cryptsetup's 8 MiB limit is refused with the limit in the message (never truncated), one
//! exactly at it is used, a device is refused, and a FIFO nobody writes to does not hang the
//! daemon's `--unlock-key-file` (it stays up, locked, and says why).

use nbdcrypt_tests::*;
use std::ffi::OsStr;
use std::time::{Duration, Instant};

const CAP: usize = 8 * 1024 * 1024;

fn ctl(args: &[&str]) -> Out {
    let v: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    nbdcryptctl(&v)
}

#[test]
fn key_files_are_capped_at_8_mib_and_devices_are_refused() {
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    // A key of exactly the cap opens the volume cryptsetup made with it.
    let key: Vec<u8> = random_bytes(7, CAP);
    luks_format(&img, 4 * MIB, 512, "pbkdf2", &key);
    let at_cap = dir.path().join("at-cap.key");
    std::fs::write(&at_cap, &key).unwrap();
    let img = img.to_str().unwrap();
    ctl(&["test-key", img, "--key-file", at_cap.to_str().unwrap()]).success();

    // One byte more: refused, naming the limit, not silently cut to the first 8 MiB (which
    // would open the volume).
    let over = dir.path().join("over.key");
    let mut longer = key.clone();
    longer.push(b'!');
    std::fs::write(&over, &longer).unwrap();
    let out = ctl(&["test-key", img, "--key-file", over.to_str().unwrap()]).failure();
    assert_eq!(out.code(), Some(1), "{}", out.details());
    assert!(
        out.stderr.contains("longer than 8388608 bytes"),
        "{}",
        out.details()
    );

    // A device is not a key file.
    let out = ctl(&["test-key", img, "--key-file", "/dev/null"]).failure();
    assert!(out.stderr.contains("character device"), "{}", out.details());
}

#[test]
fn an_unlock_key_file_fifo_without_a_writer_does_not_hang_the_daemon() {
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, 4 * MIB, 512, "pbkdf2", b"passphrase");
    let fifo = dir.path().join("key.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let d = Daemon::volume_in(dir, &img, &["--unlock-key-file", fifo.to_str().unwrap()]);
    // Opening a FIFO blocks until a writer comes; ours returns at once (an empty key).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.log().contains("unlock with the key file failed") {
        assert!(
            Instant::now() < deadline,
            "the key file read never finished:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(d.state(), "locked");
    d.unlock(b"passphrase").success();
}
