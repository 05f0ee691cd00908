//! The encrypted daemon as a process and a state machine: SIGTERM while unlocked, a second daemon
//! on the same image, volumes it must refuse, --read-only, counters, the rate-limit reset, and
//! clients caught between option negotiation and a lock.

use nbdcrypt_tests::raw::*;
use nbdcrypt_tests::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const DATA: u64 = 4 * MIB;
const PASS: &[u8] = b"lifecycle passphrase";

fn formatted(sector_size: u32) -> (TempDir, PathBuf) {
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, DATA, sector_size, "pbkdf2", PASS);
    (dir, img)
}

#[track_caller]
fn expect_code(out: &Out, code: i32, what: &str) {
    assert_eq!(
        out.code(),
        Some(code),
        "{what}: expected exit {code}\n{}",
        out.details()
    );
}

#[test]
fn sigterm_while_unlocked_flushes_exits_0_and_the_image_holds_every_write() {
    let (dir, img) = formatted(4096);
    let mut d = Daemon::volume_in(dir, &img, &[]);
    expect_code(&d.unlock(PASS), 0, "unlock");
    let data = random_bytes(41, DATA as usize);
    write_export(&d.uri(), d.dir(), &data);
    // A last unaligned write without FLUSH or FUA: shutdown must flush it.
    nbdsh(
        &d.uri(),
        "h.connect_uri(URI)\nh.pwrite(b'\\x99' * 777, 12345)\nh.shutdown()",
    )
    .success();
    let mut model = data;
    model[12345..12345 + 777].fill(0x99);
    let st = d.terminate(Duration::from_secs(20));
    assert!(st.success(), "SIGTERM while unlocked: {st}\n{}", d.log());
    assert_same_bytes(
        &verify_py_plaintext(&img, &luks_volume_key(&img, PASS)),
        &model,
        "verify.py after SIGTERM",
    );
    assert!(
        !d.control().exists() || std::os::unix::net::UnixStream::connect(d.control()).is_err(),
        "control socket still answers after exit"
    );
}

#[test]
fn a_second_daemon_on_the_same_image_is_refused_while_the_first_serves_it() {
    let (dir, img) = formatted(4096);
    let mut d = Daemon::volume_in(dir, &img, &[]);
    expect_code(&d.unlock(PASS), 0, "unlock");
    let other = tempdir();
    let mut c = Command::new(daemon_binary());
    c.arg("--volume")
        .arg(&img)
        .arg("--unix")
        .arg(other.path().join("nbd.sock"))
        .arg("--control")
        .arg(other.path().join("control.sock"));
    let out = run(&mut c, Duration::from_secs(20)).failure();
    assert!(
        out.stderr.contains("in use"),
        "the refusal should say the image is in use\n{}",
        out.details()
    );
    // The first one is unharmed.
    d.assert_alive();
    assert_eq!(d.state(), "unlocked");
    nbdinfo(&[&d.uri()]).success();
}

#[test]
fn a_data_area_that_is_not_a_whole_number_of_sectors_is_refused_at_start_with_an_error_naming_the_sector_size(
) {
    let (dir, img) = formatted(4096);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(16 * MIB + DATA + 1000).unwrap();
    let mut c = Command::new(daemon_binary());
    c.arg("--volume")
        .arg(&img)
        .arg("--unix")
        .arg(dir.path().join("nbd.sock"))
        .arg("--control")
        .arg(dir.path().join("control.sock"));
    let out = run(&mut c, Duration::from_secs(20)).failure();
    assert!(out.stderr.contains("sector size"), "{}", out.details());
}

#[test]
fn a_plain_file_that_is_not_luks2_is_refused_at_start() {
    let dir = tempdir();
    let img = dir.path().join("junk.img");
    std::fs::write(&img, random_bytes(42, 20 * MIB as usize)).unwrap();
    let mut c = Command::new(daemon_binary());
    c.arg("--volume")
        .arg(&img)
        .arg("--unix")
        .arg(dir.path().join("nbd.sock"))
        .arg("--control")
        .arg(dir.path().join("control.sock"));
    let out = run(&mut c, Duration::from_secs(20)).failure();
    assert!(out.stderr.contains("LUKS2"), "{}", out.details());
}

#[test]
fn read_only_refuses_writes_with_eperm_and_leaves_the_image_unchanged() {
    let (dir, img) = formatted(512);
    let before = std::fs::read(&img).unwrap();
    let mut d = Daemon::volume_in(dir, &img, &["--read-only"]);
    expect_code(&d.unlock(PASS), 0, "unlock");
    nbdsh(
        &d.uri(),
        r#"
        h.connect_uri(URI)
        assert h.is_read_only()
        h.set_strict_mode(0)
        before = h.pread(4096, 0)
        expect_err(lambda: h.pwrite(b"x" * 4096, 0), errno.EPERM, "write")
        expect_err(lambda: h.pwrite(b"x" * 100, 1000), errno.EPERM, "unaligned write")
        expect_err(lambda: h.zero(4096, 0), errno.EPERM, "write_zeroes")
        assert h.pread(4096, 0) == before
        h.shutdown()
        "#,
    )
    .success();
    expect_code(&d.lock_idle(), 0, "lock");
    d.terminate(Duration::from_secs(15));
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a --read-only daemon changed the image"
    );
}

#[test]
fn writes_past_the_end_of_the_export_fail_and_the_image_does_not_grow() {
    let (dir, img) = formatted(4096);
    let len = std::fs::metadata(&img).unwrap().len();
    let d = Daemon::volume_in(dir, &img, &[]);
    expect_code(&d.unlock(PASS), 0, "unlock");
    let (mut c, e) = Client::connect_go(&d.sock);
    assert_eq!(e.size, DATA);
    assert_ne!(
        c.write(1, DATA - 100, &[7u8; 200], 0),
        0,
        "a write crossing the end must fail"
    );
    assert_ne!(
        c.write(2, DATA, &[7u8; 1], 0),
        0,
        "a write at the end must fail"
    );
    assert!(
        c.read(3, DATA - 100, 200).is_err(),
        "a read crossing the end must fail"
    );
    assert_eq!(
        c.write(4, DATA - 4096, &[7u8; 4096], 0),
        0,
        "the last sector is writable"
    );
    assert_eq!(c.read(5, DATA - 4096, 4096).unwrap(), vec![7u8; 4096]);
    drop(c);
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        len,
        "the image grew"
    );
}

#[test]
fn status_counters_count_this_unlocks_io_and_start_from_zero_at_the_next_unlock() {
    let (dir, img) = formatted(4096);
    let d = Daemon::volume_in(dir, &img, &[]);
    expect_code(&d.unlock(PASS), 0, "unlock");
    let (mut c, _) = Client::connect_go(&d.sock);
    for i in 0..5u64 {
        assert_eq!(c.write(i, i * 8192, &[i as u8; 8192], 0), 0);
    }
    for i in 0..3u64 {
        c.read(100 + i, 0, 1000).unwrap();
    }
    c.request(0, CMD_FLUSH, 200, 0, 0, &[]).unwrap();
    assert_eq!(c.simple_reply().unwrap(), (0, 200));
    let s = d.status();
    assert_eq!(s["writes"], 5, "{s:#}");
    assert_eq!(s["bytes_written"], 5 * 8192, "{s:#}");
    assert_eq!(s["reads"], 3, "{s:#}");
    assert_eq!(s["bytes_read"], 3000, "{s:#}");
    assert!(s["flushes"].as_u64().unwrap() >= 1, "{s:#}");
    assert_eq!(s["errors"], 0, "{s:#}");
    drop(c);
    expect_code(&d.ctl("lock", &["--force"]), 0, "lock");
    d.wait_state("locked", Duration::from_secs(10));
    expect_code(&d.unlock(PASS), 0, "unlock again");
    let s = d.status();
    for k in ["reads", "writes", "bytes_read", "bytes_written", "errors"] {
        assert_eq!(s[k], 0, "{k} after a new unlock: {s:#}");
    }
}

#[test]
fn a_successful_unlock_resets_the_wrong_passphrase_count() {
    let (dir, img) = formatted(4096);
    let d = Daemon::volume_in(dir, &img, &[]);
    for i in 0..2 {
        expect_code(&d.unlock(b"nope"), 3, &format!("wrong passphrase {i}"));
    }
    expect_code(&d.unlock(PASS), 0, "right passphrase");
    expect_code(&d.lock_idle(), 0, "lock");
    d.wait_state("locked", Duration::from_secs(10));
    // Two more wrong ones are again free (exit 3, not 4): the count restarted at the success.
    for i in 0..2 {
        expect_code(
            &d.unlock(b"nope"),
            3,
            &format!("wrong passphrase {i} after a successful unlock"),
        );
    }
    expect_code(&d.unlock(PASS), 0, "right passphrase again");
}

#[test]
fn unlock_and_lock_are_idempotent_and_an_unknown_slot_does_not_unlock() {
    let (dir, img) = formatted(4096);
    let d = Daemon::volume_in(dir, &img, &[]);
    expect_code(&d.lock_idle(), 0, "lock of a locked volume: nothing to do");
    let f = d.dir().join("k");
    std::fs::write(&f, PASS).unwrap();
    let out = d.ctl(
        "unlock",
        &["--key-file", f.to_str().unwrap(), "--slot", "7"],
    );
    assert!(
        matches!(out.code(), Some(1) | Some(3)),
        "unlock --slot 7 of a volume with only slot 0: {:?}\n{}",
        out.code(),
        out.details()
    );
    assert_eq!(d.state(), "locked");
    expect_code(&d.unlock(PASS), 0, "unlock");
    expect_code(
        &d.unlock(PASS),
        0,
        "unlock of an unlocked volume: nothing to do",
    );
    assert_eq!(d.state(), "unlocked");
}

#[test]
fn a_client_that_got_info_before_a_lock_is_refused_at_go_with_locked() {
    let (dir, img) = formatted(4096);
    let d = Daemon::volume_in(dir, &img, &[]);
    expect_code(&d.unlock(PASS), 0, "unlock");
    let mut c = Client::connect(&d.sock);
    let (last, infos) = c.option(OPT_INFO, &info_payload(EXPORT, &[]));
    assert_eq!(last.typ, REP_ACK, "INFO while unlocked: {last:?}");
    assert_eq!(export_from_infos(&infos).map(|e| e.size), Some(DATA));
    // Still negotiating, so not attached: lock without --force goes through.
    expect_code(&d.lock_idle(), 0, "lock with a client in negotiation only");
    d.wait_state("locked", Duration::from_secs(10));
    let (last, _) = c.option(OPT_GO, &info_payload(EXPORT, &[]));
    assert_eq!(last.typ, REP_ERR_UNKNOWN, "GO after the lock: {last:?}");
    assert!(
        String::from_utf8_lossy(&last.data).contains("locked"),
        "{last:?}"
    );
}

#[test]
fn a_client_attached_when_lock_force_runs_is_disconnected_and_cannot_read_afterwards() {
    let (dir, img) = formatted(4096);
    let d = Daemon::volume_in(dir, &img, &[]);
    expect_code(&d.unlock(PASS), 0, "unlock");
    let (mut c, _) = Client::connect_go(&d.sock);
    c.read(1, 0, 4096).unwrap();
    expect_code(&d.ctl("lock", &["--force"]), 0, "lock --force");
    d.wait_state("locked", Duration::from_secs(10));
    // The server closed the session; nothing more is served on it.
    let sent = c.request(0, CMD_READ, 2, 0, 4096, &[]);
    if sent.is_ok() {
        assert!(
            c.simple_reply().is_err(),
            "a READ was answered on a session closed by lock --force"
        );
    }
}

#[test]
fn an_unlock_key_file_with_a_wrong_passphrase_leaves_the_daemon_serving_locked_and_ctl_unlock_still_works(
) {
    let (dir, img) = formatted(4096);
    let kf = dir.path().join("wrong.key");
    std::fs::write(&kf, b"not the passphrase").unwrap();
    let d = Daemon::volume_in(dir, &img, &["--unlock-key-file", kf.to_str().unwrap()]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !d.log().contains("staying locked") && !d.log().contains("wrong passphrase") {
        assert!(
            std::time::Instant::now() < deadline,
            "the key-file unlock never finished:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d.wait_state("locked", Duration::from_secs(5));
    nbdinfo(&[&d.uri()]).failure();
    expect_code(
        &d.unlock(PASS),
        0,
        "unlock through nbdcryptctl after the key file failed",
    );
    nbdinfo(&[&d.uri()]).success();
}

#[test]
fn a_missing_unlock_key_file_stops_the_daemon_with_an_error_naming_the_file() {
    let (dir, img) = formatted(4096);
    let missing = dir.path().join("no-such.key");
    let mut c = Command::new(daemon_binary());
    c.arg("--volume")
        .arg(&img)
        .arg("--unlock-key-file")
        .arg(&missing)
        .arg("--unix")
        .arg(dir.path().join("nbd.sock"))
        .arg("--control")
        .arg(dir.path().join("control.sock"));
    let out = run(&mut c, Duration::from_secs(20)).failure();
    assert!(out.stderr.contains("no-such.key"), "{}", out.details());
}

#[test]
fn sigterm_during_a_slow_unlock_and_sigterm_while_locked_both_exit_0() {
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format_args(
        &img,
        17 * MIB,
        PASS,
        &["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "200000"],
    );
    let mut d = Daemon::volume_in(dir, &img, &[]);
    let ctl = {
        let control = d.control();
        let kf = d.dir().join("k");
        std::fs::write(&kf, PASS).unwrap();
        std::thread::spawn(move || {
            nbdcryptctl(&[
                "unlock".as_ref(),
                "--control".as_ref(),
                control.as_os_str(),
                "--key-file".as_ref(),
                kf.as_os_str(),
            ])
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while d.status()["state"] != "unlocking" {
        assert!(
            std::time::Instant::now() < deadline,
            "never saw state unlocking: {:#}",
            d.status()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = d.terminate(Duration::from_secs(30));
    assert!(st.success(), "SIGTERM during an unlock: {st}\n{}", d.log());
    let out = ctl.join().unwrap();
    assert!(
        out.code().is_some(),
        "nbdcryptctl was killed: {}",
        out.details()
    );

    let (dir, img) = formatted(512);
    let mut d = Daemon::volume_in(dir, &img, &[]);
    let st = d.terminate(Duration::from_secs(15));
    assert!(st.success(), "SIGTERM while locked: {st}\n{}", d.log());
}

fn hash_prefix(path: &std::path::Path, len: usize) -> Vec<u8> {
    read_at(path, 0, len)
}

#[test]
fn serving_unlocking_writing_and_locking_never_writes_the_luks2_header_or_keyslots_area() {
    let (dir, img) = formatted(4096);
    let before = hash_prefix(&img, 16 * MIB as usize);
    let mut d = Daemon::volume_in(dir, &img, &[]);
    expect_code(&d.unlock(b"wrong"), 3, "wrong passphrase");
    expect_code(&d.unlock(PASS), 0, "unlock");
    write_export(&d.uri(), d.dir(), &random_bytes(43, DATA as usize));
    expect_code(&d.ctl("lock", &["--force"]), 0, "lock");
    d.terminate(Duration::from_secs(15));
    assert!(
        hash_prefix(&img, 16 * MIB as usize) == before,
        "the first 16 MiB (header, keyslots) changed"
    );
}

#[test]
fn a_damaged_primary_header_is_served_through_the_secondary_copy_and_two_damaged_copies_are_refused(
) {
    let (dir, img) = formatted(4096);
    // The intact bytes, so a corruption is always a change from them (cryptsetup may repair a
    // copy in between).
    let intact: Vec<(u64, u8)> = [4096 + 20, 16384 + 4096 + 20]
        .iter()
        .map(|&o| (o, read_at(&img, o, 1)[0]))
        .collect();
    let corrupt = |off: u64| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        let orig = intact.iter().find(|(o, _)| *o == off).unwrap().1;
        f.write_all_at(&[orig ^ 0x20], off).unwrap();
    };
    // A byte of the primary copy's JSON area (its checksum no longer matches).
    corrupt(4096 + 20);
    {
        let mut d = Daemon::volume_in(tempdir(), &img, &[]);
        expect_code(&d.unlock(PASS), 0, "unlock with a damaged primary header");
        let data = random_bytes(44, DATA as usize);
        write_export(&d.uri(), d.dir(), &data);
        expect_code(&d.lock_idle(), 0, "lock");
        d.terminate(Duration::from_secs(15));
        assert_same_bytes(
            &verify_py_plaintext(&img, &luks_volume_key(&img, PASS)),
            &data,
            "verify.py",
        );
    }
    // Damage both copies now.
    corrupt(4096 + 20);
    corrupt(16384 + 4096 + 20);
    let dir2 = tempdir();
    let mut c = Command::new(daemon_binary());
    c.arg("--volume")
        .arg(&img)
        .arg("--unix")
        .arg(dir2.path().join("nbd.sock"))
        .arg("--control")
        .arg(dir2.path().join("control.sock"));
    let out = run(&mut c, Duration::from_secs(20)).failure();
    assert!(out.stderr.contains("header"), "{}", out.details());
    drop(dir);
}

#[test]
fn a_luks1_volume_is_refused_at_start_and_serves_once_cryptsetup_converted_it_to_luks2() {
    let dir = tempdir();
    let img = dir.path().join("luks1.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(6 * MIB)
        .unwrap();
    let k = dir.path().join("k");
    std::fs::write(&k, PASS).unwrap();
    // LUKS1 with the old defaults some volumes still carry: sha1 for PBKDF2 and the digest.
    let mut c = cryptsetup();
    c.args([
        "luksFormat",
        "--type",
        "luks1",
        "--batch-mode",
        "--hash",
        "sha1",
        "--pbkdf-force-iterations",
        "1000",
    ])
    .arg("--key-file")
    .arg(&k)
    .arg(&img);
    run(&mut c, TOOL_TIMEOUT).success();
    let mut c = Command::new(daemon_binary());
    c.arg("--volume")
        .arg(&img)
        .arg("--unix")
        .arg(dir.path().join("nbd.sock"))
        .arg("--control")
        .arg(dir.path().join("control.sock"));
    let out = run(&mut c, Duration::from_secs(20)).failure();
    assert!(
        out.stderr.contains("version 1") || out.stderr.contains("LUKS1"),
        "the refusal should say it is LUKS1\n{}",
        out.details()
    );

    let mut c = cryptsetup();
    c.args(["convert", "--batch-mode", "--type", "luks2"])
        .arg(&img);
    run(&mut c, TOOL_TIMEOUT).success();
    let d = Daemon::volume_in(dir, &img, &[]);
    expect_code(&d.unlock(PASS), 0, "unlock of the converted volume");
    let size = d.status()["size"].as_u64().unwrap();
    assert_eq!(size, 4 * MIB, "LUKS1 puts the data at 2 MiB");
    let data = random_bytes(45, size as usize);
    write_export(&d.uri(), d.dir(), &data);
    expect_code(&d.lock_idle(), 0, "lock");
    d.wait_state("locked", Duration::from_secs(10));
    assert_same_bytes(
        &verify_py_plaintext(&img, &luks_volume_key(&img, PASS)),
        &data,
        "verify.py",
    );
}

/// Resize the backing file of a locked daemon to hold `data` bytes of data, then unlock.
fn resized_while_locked(data: u64) -> (Daemon, PathBuf) {
    let (dir, img) = formatted(4096);
    let d = Daemon::volume_in(dir, &img, &[]);
    expect_code(&d.unlock(PASS), 0, "first unlock");
    assert_eq!(d.status()["size"], DATA);
    expect_code(&d.lock_idle(), 0, "lock");
    d.wait_state("locked", Duration::from_secs(10));
    // The data segment's size is "dynamic": the rest of the device, as measured at activation.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(16 * MIB + data)
        .unwrap();
    expect_code(&d.unlock(PASS), 0, "unlock after the resize");
    (d, img)
}

#[test]
fn an_unlock_after_the_backing_file_grew_while_locked_serves_the_new_size() {
    // `cryptsetup open` measures a dynamic segment when it activates; our unlock is that moment
    // (it re-reads the header too: a slot killed while locked stops working).
    let (d, _img) = resized_while_locked(DATA + 2 * MIB);
    let s = d.status();
    let (export, _) = nbdinfo_json(&d.uri());
    assert_eq!(
        (s["size"].as_u64(), export["export-size"].as_u64()),
        (Some(DATA + 2 * MIB), Some(DATA + 2 * MIB)),
        "status / NBD size after the file grew by 2 MiB while locked (size at start: {DATA})"
    );
}

#[test]
fn an_unlock_after_the_backing_file_shrank_while_locked_never_serves_bytes_beyond_its_end() {
    let (d, _img) = resized_while_locked(DATA - 2 * MIB);
    let (export, _) = nbdinfo_json(&d.uri());
    let size = export["export-size"].as_u64().unwrap();
    assert!(
        size <= DATA - 2 * MIB,
        "the export is {size} bytes, but the file now holds only {} bytes of data",
        DATA - 2 * MIB
    );
    // Every advertised byte is readable.
    let got = read_export(&d.uri(), d.dir());
    assert_eq!(got.len() as u64, size);
}

#[test]
fn twenty_unlock_io_lock_cycles_leak_no_file_descriptors_and_keep_the_data() {
    let (dir, img) = formatted(4096);
    let d = Daemon::volume_in(dir, &img, &[]);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
            .unwrap()
            .count()
    };
    let before = fds();
    let data = random_bytes(46, DATA as usize);
    for i in 0..20 {
        expect_code(&d.unlock(PASS), 0, &format!("unlock {i}"));
        if i == 0 {
            write_export(&d.uri(), d.dir(), &data);
        } else if i % 5 == 0 {
            assert_same_bytes(
                &read_export(&d.uri(), d.dir()),
                &data,
                &format!("cycle {i}"),
            );
        } else {
            nbdinfo(&[&d.uri()]).success();
        }
        expect_code(&d.lock_idle(), 0, &format!("lock {i}"));
        d.wait_state("locked", Duration::from_secs(10));
    }
    let after = fds();
    assert!(
        after <= before + 2,
        "open file descriptors grew from {before} to {after} over 20 cycles"
    );
}
