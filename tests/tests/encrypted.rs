//! The NBD server core over an encrypted export: a LUKS2 volume made by stock cryptsetup,
//! served with `--volume … --unlock-key-file …`. Round trips through several clients, the
//! read-modify-write path for requests smaller than an XTS sector (also under concurrency, also
//! in plain mode for comparison), persistence across restarts, and that only ciphertext lands
//! in the file.
//!
//! Decrypting the file independently (dm-crypt) is not possible here: the test machines have no
//! device-mapper. The crypto itself is checked against vectors in the daemon's unit tests.

use nbdcrypt_tests::raw::*;
use nbdcrypt_tests::*;
use std::collections::HashSet;
use std::time::Duration;

const FILE_SIZE: u64 = 64 * MIB;

fn memmem(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_cryptsetup_volume_is_served_with_the_payload_size_and_without_fast_zero() {
    let d = Daemon::luks(FILE_SIZE, 4096, &[]);
    let (e, _) = nbdinfo_json(&d.uri());
    let size = e["export-size"].as_u64().unwrap();
    // cryptsetup's default LUKS2 header area is 16 MiB.
    assert_eq!(size, FILE_SIZE - 16 * MIB, "{e:#}");
    assert_eq!(
        e["can_fast_zero"], false,
        "zeroing ciphertext is a full write: no FAST_ZERO\n{e:#}"
    );
    assert_eq!(e["can_zero"], true, "{e:#}");
    assert_eq!(e["can_flush"], true, "{e:#}");
    assert_eq!(e["can_fua"], true, "{e:#}");
    assert_eq!(e["is_read_only"], false, "{e:#}");
}

#[test]
fn nbdcopy_round_trips_through_an_encrypted_export_and_the_file_holds_only_ciphertext() {
    let d = Daemon::luks(FILE_SIZE, 4096, &[]);
    let size = (FILE_SIZE - 16 * MIB) as usize;
    let work = tempdir();
    let src = work.path().join("src.bin");
    let back = work.path().join("back.bin");
    let mut data = random_bytes(31, size);
    // A recognisable plaintext that must not appear in the file.
    let marker = b"NBDCRYPT-PLAINTEXT-MARKER-0123456789".repeat(30000);
    data[4 * MIB as usize..4 * MIB as usize + marker.len()].copy_from_slice(&marker);
    std::fs::write(&src, &data).unwrap();
    run(
        tool("nbdcopy")
            .args(["--connections=4", "--flush"])
            .arg(&src)
            .arg(d.uri()),
        TOOL_TIMEOUT,
    )
    .success();
    run(
        tool("nbdcopy")
            .arg("--connections=4")
            .arg(d.uri())
            .arg(&back),
        TOOL_TIMEOUT,
    )
    .success();
    let got = std::fs::read(&back).unwrap();
    assert!(
        got == data,
        "encrypted export round trip differs at {:?}",
        first_difference(&got, &data)
    );
    let disk = std::fs::read(&d.image).unwrap();
    assert_eq!(disk.len() as u64, FILE_SIZE, "volume file size changed");
    assert!(
        !memmem(&disk, &marker[..64]),
        "plaintext found in the volume file"
    );
    assert!(
        disk[16 * MIB as usize..] != data[..],
        "payload area holds the plaintext"
    );
}

#[test]
fn encrypted_data_survives_a_restart_of_the_daemon() {
    let d = Daemon::luks(FILE_SIZE, 4096, &[]);
    let data = random_bytes(32, 3 * MIB as usize + 777);
    let (mut c, _) = Client::connect_go(&d.sock);
    // Never-written sectors decrypt to noise (the file held zeroes, not ciphertext of zeroes),
    // as with dm-crypt; remember them to compare after the restart.
    let before = c.read(9, 0, 1000).unwrap();
    assert_eq!(c.write(1, 1000, &data, CMD_FLAG_FUA), 0);
    drop(c);
    let mut d = d;
    assert_eq!(
        d.terminate(Duration::from_secs(15)).code(),
        Some(0),
        "{}",
        d.log()
    );
    // Take the files over into a new daemon.
    let dir = tempdir();
    for f in ["disk.img", "key"] {
        std::fs::copy(d.dir().join(f), dir.path().join(f)).unwrap();
    }
    drop(d);
    let d = Daemon::luks_in(dir, &[]);
    let (mut c, _) = Client::connect_go(&d.sock);
    assert!(
        c.read(2, 1000, data.len() as u32).unwrap() == data,
        "data changed across a restart"
    );
    assert_eq!(
        c.read(3, 0, 1000).unwrap(),
        before,
        "bytes before the write (same sector) changed"
    );
}

#[test]
fn write_zeroes_on_an_encrypted_export_reads_back_zero_and_stores_ciphertext() {
    let d = Daemon::luks(FILE_SIZE, 4096, &[]);
    let (mut c, _) = Client::connect_go(&d.sock);
    assert_eq!(c.write(1, 0, &[0xaa; 1 << 20], 0), 0);
    for (cookie, off, len, flags) in [
        (2u64, 0u64, 65536u32, 0u16),
        (3, 100_000, 5000, 0),
        (4, 512 * 1024, 65536, CMD_FLAG_NO_HOLE),
    ] {
        c.request(flags, CMD_WRITE_ZEROES, cookie, off, len, &[])
            .unwrap();
        assert_eq!(c.simple_reply().unwrap(), (0, cookie));
        assert_eq!(
            c.read(10 + cookie, off, len).unwrap(),
            vec![0; len as usize],
            "zeroed range at {off}"
        );
    }
    // Neighbours of the unaligned zeroing keep their data.
    assert_eq!(c.read(20, 100_000 - 100, 100).unwrap(), vec![0xaa; 100]);
    assert_eq!(c.read(21, 105_000, 100).unwrap(), vec![0xaa; 100]);
    // FAST_ZERO is not advertised on an encrypted export: EINVAL, data untouched.
    c.request(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 22, 200_000, 4096, &[])
        .unwrap();
    let (err, _) = c.simple_reply().unwrap();
    assert!(
        err == EINVAL || err == 95,
        "FAST_ZERO on an encrypted export: error {err}"
    );
    assert_eq!(c.read(23, 200_000, 4096).unwrap(), vec![0xaa; 4096]);
    c.request(0, CMD_FLUSH, 24, 0, 0, &[]).unwrap();
    assert_eq!(c.simple_reply().unwrap(), (0, 24));
    let payload = read_at(&d.image, 16 * MIB, 65536);
    assert!(
        payload.iter().any(|&b| b != 0),
        "zeroes stored as plaintext zeroes (XTS of zero is not zero)"
    );
}

#[test]
fn unaligned_writes_on_an_encrypted_export_read_back_exactly() {
    for sector in [4096u32, 512] {
        let d = Daemon::luks(FILE_SIZE, sector, &[]);
        let out = nbdsh_d(
            &d,
            r#"
            import random
            rnd = random.Random(7)
            h.connect_uri(URI)
            size = h.get_size()
            # Unwritten sectors decrypt to noise: start the model from what the export holds.
            shadow = bytearray()
            for o in range(0, size, 1 << 20):
                shadow += h.pread(min(1 << 20, size - o), o)
            for i in range(300):
                n = rnd.choice([1, 7, 511, 512, 513, 4095, 4096, 4097, rnd.randint(1, 70000)])
                off = rnd.choice([0, size - n, rnd.randint(0, size - n)])
                data = rnd.randbytes(n)
                h.pwrite(data, off, nbd.CMD_FLAG_FUA if i % 10 == 0 else 0)
                shadow[off:off + n] = data
                m = rnd.randint(1, 70000)
                o = rnd.randint(0, size - m)
                assert h.pread(m, o) == bytes(shadow[o:o + m]), "read %d at %d after write %d" % (m, o, i)
            h.flush()
            # Read everything back in 1 MiB pieces.
            for o in range(0, size, 1 << 20):
                assert h.pread(min(1 << 20, size - o), o) == bytes(shadow[o:o + (1 << 20)]), "final check at %d" % o
        "#,
        );
        out.success();
    }
}

/// `threads` connections write disjoint, unaligned byte ranges of the same 4 KiB sectors at the
/// same time (pipelined, 32 in flight each); afterwards every range must hold its writer's
/// bytes. A read-modify-write without per-sector locking loses some of them.
fn concurrent_writes_into_shared_sectors(d: &Daemon, sectors: u64, threads: u64) {
    let piece = 4096 / threads as usize - 16;
    let fill = |t: u64, s: u64| (1 + t * 31 + s * 7) as u8 | 1;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let sock = d.sock.clone();
            std::thread::spawn(move || {
                let (c, _) = Client::connect_go(&sock);
                let mut w = Client {
                    s: c.s.try_clone().unwrap(),
                    server_flags: 0,
                };
                let writer = std::thread::spawn(move || {
                    for s in 0..sectors {
                        let off = s * 4096 + t * (piece as u64 + 16) + 5;
                        w.request(0, CMD_WRITE, s, off, piece as u32, &vec![fill(t, s); piece])
                            .unwrap();
                    }
                });
                let mut r = c;
                let mut seen = HashSet::new();
                for _ in 0..sectors {
                    let (err, cookie) = r.simple_reply().expect("write reply");
                    assert_eq!(err, 0, "write {cookie} of thread {t}");
                    seen.insert(cookie);
                }
                writer.join().unwrap();
                assert_eq!(seen.len() as u64, sectors);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer thread");
    }
    let (mut c, _) = Client::connect_go(&d.sock);
    let all = c.read(1, 0, (sectors * 4096) as u32).unwrap();
    for s in 0..sectors {
        for t in 0..threads {
            let off = (s * 4096 + t * (piece as u64 + 16) + 5) as usize;
            let got = &all[off..off + piece];
            assert!(
                got.iter().all(|&b| b == fill(t, s)),
                "sector {s}: the bytes of writer {t} were lost (lost update in read-modify-write?)"
            );
        }
    }
}

#[test]
fn concurrent_unaligned_writes_into_the_same_sectors_lose_nothing_on_an_encrypted_export() {
    let d = Daemon::luks(FILE_SIZE, 4096, &[]);
    concurrent_writes_into_shared_sectors(&d, 512, 8);
}

#[test]
fn concurrent_unaligned_writes_into_the_same_sectors_lose_nothing_on_a_plain_export() {
    let d = Daemon::plain(8 * MIB, &[]);
    concurrent_writes_into_shared_sectors(&d, 512, 8);
    let d = Daemon::plain(8 * MIB, &["--direct"]);
    concurrent_writes_into_shared_sectors(&d, 512, 8);
}

#[test]
fn fio_verification_passes_on_an_encrypted_export_with_mixed_block_sizes() {
    let d = Daemon::luks(FILE_SIZE, 4096, &[]);
    let dir = tempdir();
    let out = run(
        tool("fio")
            .current_dir(dir.path())
            .args([
                "--name=enc",
                "--ioengine=nbd",
                "--rw=randrw",
                "--bsrange=512-64k",
            ])
            .args([
                "--iodepth=8",
                "--numjobs=2",
                "--size=16M",
                "--offset_increment=16M",
            ])
            .args([
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
            ])
            .arg(format!("--uri={}", d.uri())),
        Duration::from_secs(300),
    );
    let out = out.success();
    assert!(
        !out.stdout.contains("verify failed") && !out.stderr.contains("verify failed"),
        "{}",
        out.details()
    );
    assert!(
        out.stdout.contains("err= 0"),
        "fio did not report err=0:\n{}",
        out.details()
    );
}

#[test]
fn a_locked_volume_offers_no_export_but_keeps_answering() {
    let dir = tempdir();
    luks_format_keyfile(dir.path(), FILE_SIZE, 4096);
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let args = [
        "--volume",
        &p("disk.img"),
        "--control",
        &p("control.sock"),
        "--unix",
        &p("nbd.sock"),
    ];
    let d = Daemon::start_in(dir, args.iter().map(std::ffi::OsString::from).collect());
    let mut c = Client::connect(&d.sock);
    let (r, _) = c.option(OPT_LIST, &[]);
    assert_eq!(r.typ, REP_ACK, "LIST on a locked daemon: {r:?}");
    let (r, infos) = c.option(OPT_GO, &info_payload(EXPORT, &[]));
    assert!(
        r.is_error(),
        "GO succeeded on a locked volume: {r:?} {infos:?}"
    );
    // The connection is still usable after the refusal.
    let (r, _) = c.option(OPT_ABORT, &[]);
    assert_eq!(r.typ, REP_ACK);
    nbdinfo(&["--size", &d.uri()]).failure();
}

#[test]
fn a_kernel_style_client_with_128_requests_in_flight_stays_consistent_on_an_encrypted_export() {
    let d = Daemon::luks(32 * MIB, 4096, &[]);
    let (mut c, e) = Client::connect_go(&d.sock);
    // Start the model from what the export holds (unwritten sectors decrypt to noise).
    let mut initial = Vec::with_capacity(e.size as usize);
    for off in (0..e.size).step_by(MIB as usize) {
        initial.extend(c.read(off, off, MIB.min(e.size - off) as u32).unwrap());
    }
    let model = kernel_style_session(&d.sock, 0, initial, 128, 3000, 1234);
    let mut back = Vec::with_capacity(e.size as usize);
    for off in (0..e.size).step_by(MIB as usize) {
        back.extend(c.read(off, off, MIB.min(e.size - off) as u32).unwrap());
    }
    assert!(
        back == model,
        "export differs from the model at {:?}",
        first_difference(&back, &model)
    );
}

#[test]
fn block_status_on_an_encrypted_export_never_claims_zeroes_that_read_as_noise() {
    let d = Daemon::luks(FILE_SIZE, 4096, &[]);
    // Some data, some zeroing; the rest of the file is holes (ciphertext holes read as noise).
    let (mut c, _) = Client::connect_go(&d.sock);
    assert_eq!(c.write(1, MIB, &[7; 65536], 0), 0);
    c.request(0, CMD_WRITE_ZEROES, 2, 4 * MIB, 1 << 20, &[])
        .unwrap();
    assert_eq!(c.simple_reply().unwrap(), (0, 2));
    nbdsh_d(&d, ZERO_EXTENTS_READ_AS_ZERO).success();
}

#[test]
fn a_second_daemon_cannot_serve_a_volume_that_is_already_served() {
    let d = Daemon::luks(FILE_SIZE, 4096, &[]);
    let dir = tempdir();
    let mut cmd = std::process::Command::new(daemon_binary());
    cmd.arg("--volume")
        .arg(&d.image)
        .arg("--unlock-key-file")
        .arg(d.dir().join("key"))
        .arg("--control")
        .arg(dir.path().join("control.sock"))
        .arg("--unix")
        .arg(dir.path().join("nbd.sock"));
    // If it wrongly starts, it would run until killed: bound it.
    let out = run(cmd.env("NBDCRYPT_LOG", "info"), Duration::from_secs(30));
    assert!(
        !out.ok(),
        "a second daemon started on the same volume\n{}",
        out.details()
    );
    // The first one is unaffected.
    let (mut c, _) = Client::connect_go(&d.sock);
    assert_eq!(c.write(1, 0, &[1; 4096], 0), 0);
}
