//! Unaligned I/O on encrypted volumes (mostly 4096-byte sectors, qemu-io on 512 too): every write
//! that does not cover whole sectors is a read-modify-write of the sectors it touches. qemu-io and two concurrent
//! nbdsh connections write pieces that share sectors; the neighbours must be unchanged and the
//! final content must equal the model, both through NBD and as verify.py decrypts the image.

use nbdcrypt_tests::*;
use std::path::PathBuf;
use std::time::Duration;

const DATA: u64 = 2 * MIB;
const PASS: &[u8] = b"unaligned-io passphrase";

/// A fresh 4096-byte-sector volume, served and unlocked, filled with known random data.
fn unlocked_4096(seed: u64) -> (Daemon, PathBuf, Vec<u8>) {
    unlocked_with(4096, seed)
}

fn unlocked_with(sector_size: u32, seed: u64) -> (Daemon, PathBuf, Vec<u8>) {
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, DATA, sector_size, "pbkdf2", PASS);
    let d = Daemon::volume_in(dir, &img, &[]);
    let out = d.unlock(PASS);
    assert!(out.ok(), "unlock\n{}", out.details());
    assert_eq!(d.status()["sector_size"], sector_size);
    let base = random_bytes(seed, DATA as usize);
    write_export(&d.uri(), d.dir(), &base);
    (d, img, base)
}

fn qemu_io(uri: &str, cmds: &[&str]) -> Out {
    let mut c = tool("qemu-io");
    c.arg("-f").arg("raw");
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(uri);
    run(&mut c, TOOL_TIMEOUT)
}

#[track_caller]
fn assert_qemu_io_ok(out: Out) {
    let out = out.success();
    assert!(
        !out.stdout.contains("failed") && !out.stderr.contains("failed"),
        "qemu-io reported a failure:\n{}",
        out.details()
    );
}

/// Lock, then check the image with cryptsetup's volume key and verify.py (not our decryption).
#[track_caller]
fn assert_image_decrypts_to(d: &Daemon, img: &std::path::Path, want: &[u8]) {
    let out = d.lock_idle();
    assert_eq!(out.code(), Some(0), "lock\n{}", out.details());
    d.wait_state("locked", Duration::from_secs(15));
    let key = luks_volume_key(img, PASS);
    assert_same_bytes(
        &verify_py_plaintext(img, &key),
        want,
        "verify.py's decryption of the image",
    );
}

#[test]
fn qemu_io_unaligned_writes_on_4096_byte_sectors_read_back_and_leave_neighbouring_bytes_unchanged()
{
    qemu_io_unaligned(4096, 11);
}

#[test]
fn qemu_io_unaligned_writes_on_512_byte_sectors_read_back_and_leave_neighbouring_bytes_unchanged() {
    qemu_io_unaligned(512, 14);
}

fn qemu_io_unaligned(sector_size: u32, seed: u64) {
    let (d, img, base) = unlocked_with(sector_size, seed);
    let uri = d.uri();
    let writes: &[(u8, u64, u64)] = &[
        (0x5a, 1000, 3333),   // inside sector 0
        (0xa5, 4000, 200),    // straddles the boundary of sectors 0 and 1
        (0x11, 12287, 2),     // last byte of sector 2, first of sector 3
        (0x77, 20000, 10000), // partial first sector, whole middle sector, partial last
        (0xee, DATA - 5, 5),  // tail of the last sector
        (0x42, 0, 1),         // the very first byte
    ];
    let mut model = base.clone();
    let mut cmds = Vec::new();
    for &(p, off, len) in writes {
        cmds.push(format!("write -P {p:#04x} {off} {len}"));
        cmds.push(format!("read -P {p:#04x} {off} {len}"));
        model[off as usize..(off + len) as usize].fill(p);
    }
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    assert_qemu_io_ok(qemu_io(&uri, &cmds));
    // A new connection (another qemu-io process) sees the writes.
    assert_qemu_io_ok(qemu_io(
        &uri,
        &["read -P 0x5a 1000 3000", "read -P 0x77 20000 10000"],
    ));
    // Every other byte, including the rest of each touched sector, is unchanged.
    assert_same_bytes(
        &read_export(&uri, d.dir()),
        &model,
        "export after qemu-io's unaligned writes",
    );
    assert_image_decrypts_to(&d, &img, &model);
}

#[test]
fn two_nbdsh_connections_writing_interleaved_1000_byte_pieces_that_share_sectors_end_with_the_model_content(
) {
    let (d, img, base) = unlocked_4096(12);
    let dir = d.dir().to_path_buf();
    let base_file = dir.join("base.bin");
    let model_file = dir.join("model.bin");
    std::fs::write(&base_file, &base).unwrap();
    let out = nbdsh_env(
        &d.uri(),
        &[
            ("BASE", base_file.to_str().unwrap()),
            ("MODEL", model_file.to_str().unwrap()),
        ],
        r#"
        import random, time
        model = bytearray(open(os.environ["BASE"], "rb").read())
        h.connect_uri(URI)
        h2 = nbd.NBD()
        h2.connect_uri(URI)
        handles = [h, h2]
        size = h.get_size()
        assert size == len(model), (size, len(model))
        rnd = random.Random(1234)
        PIECE = 1000
        deadline = time.monotonic() + 40
        for rnd_no in range(6):
            # Pieces i = 0, 1, 2 ... at START + i*1000 alternate between the two connections, so
            # neighbouring pieces (sharing a 4096-byte sector) are written concurrently by
            # different connections. Each round starts at another unaligned offset.
            start = [0, 123, 4095, 777, 2048, 3999][rnd_no]
            n = (min(size, 600 * 1024) - start) // PIECE
            bufs = []
            pending = [[], []]
            for i in range(n):
                off = start + i * PIECE
                data = bytes(rnd.getrandbits(8) for _ in range(16)) * (PIECE // 16) + b"\x00" * (PIECE % 16)
                data = bytes([rnd_no]) + data[1:]
                model[off:off + PIECE] = data
                b = nbd.Buffer.from_bytearray(bytearray(data))
                bufs.append(b)
                c = handles[i % 2].aio_pwrite(b, off)
                pending[i % 2].append(c)
            while any(pending):
                assert time.monotonic() < deadline, "writes did not complete in time"
                for k in (0, 1):
                    hk = handles[k]
                    if hk.aio_in_flight() > 0:
                        hk.poll(5)
                    still = []
                    for c in pending[k]:
                        if not hk.aio_command_completed(c):
                            still.append(c)
                    pending[k] = still
            # Both connections (and a third, fresh one) see the model.
            for hk in handles:
                got = hk.pread(size, 0)
                if got != model:
                    i = next(j for j in range(size) if got[j] != model[j])
                    raise AssertionError("round %d: differs at byte %d (sector %d): got %r want %r"
                                         % (rnd_no, i, i // 4096, got[i:i+8], bytes(model[i:i+8])))
        h3 = nbd.NBD()
        h3.connect_uri(URI)
        assert h3.pread(size, 0) == model, "a fresh connection reads something else"
        for hk in handles + [h3]:
            hk.shutdown()
        open(os.environ["MODEL"], "wb").write(model)
        "#,
    );
    out.success();
    let model = std::fs::read(&model_file).unwrap();
    assert_eq!(model.len() as u64, DATA);
    assert_ne!(model, base, "the script wrote nothing");
    assert_same_bytes(
        &read_export(&d.uri(), d.dir()),
        &model,
        "export after the interleaved writes (nbdcopy)",
    );
    assert_image_decrypts_to(&d, &img, &model);
}

#[test]
fn an_unaligned_write_racing_a_whole_sector_write_from_another_connection_never_brings_back_old_data(
) {
    // Connection A rewrites whole 4096-byte sectors while connection B patches 100 bytes inside
    // each of them. Whichever lands last, every byte outside B's patch must be A's new data: a
    // read-modify-write that read the sector before A's write and wrote it back after would
    // resurrect the old bytes (a lost update).
    let (d, img, _base) = unlocked_4096(13);
    let model_file = d.dir().join("model.bin");
    let out = nbdsh_env(
        &d.uri(),
        &[("MODEL", model_file.to_str().unwrap())],
        r#"
        import random, time
        h.connect_uri(URI)
        h2 = nbd.NBD()
        h2.connect_uri(URI)
        size = h.get_size()
        SECTORS = 256
        rnd = random.Random(99)
        deadline = time.monotonic() + 40
        for rnd_no in range(4):
            bufs, cookies = [], []
            full, patch = {}, {}
            for s in range(SECTORS):
                full[s] = bytes([rnd_no * 16 + 1]) * 8 + rnd.randbytes(4088)
                patch[s] = bytes([0xF0 | rnd_no]) * 100
                b1 = nbd.Buffer.from_bytearray(bytearray(full[s]))
                b2 = nbd.Buffer.from_bytearray(bytearray(patch[s]))
                bufs += [b1, b2]
                # Alternate which one is issued first.
                if s % 2:
                    cookies.append((h, h.aio_pwrite(b1, s * 4096)))
                    cookies.append((h2, h2.aio_pwrite(b2, s * 4096 + 10)))
                else:
                    cookies.append((h2, h2.aio_pwrite(b2, s * 4096 + 10)))
                    cookies.append((h, h.aio_pwrite(b1, s * 4096)))
            while cookies:
                assert time.monotonic() < deadline, "writes did not complete in time"
                for hk in (h, h2):
                    if hk.aio_in_flight() > 0:
                        hk.poll(5)
                cookies = [(hk, c) for (hk, c) in cookies if not hk.aio_command_completed(c)]
            got = h.pread(SECTORS * 4096, 0)
            for s in range(SECTORS):
                sec = bytes(got[s * 4096:(s + 1) * 4096])
                a = full[s]
                b = a[:10] + patch[s] + a[110:]
                assert sec in (a, b), "round %d sector %d: neither A's write nor A's write with B's patch (first bytes %r, patch area %r)" % (rnd_no, s, sec[:8], sec[10:14])
        open(os.environ["MODEL"], "wb").write(h.pread(size, 0))
        h.shutdown(); h2.shutdown()
        "#,
    );
    out.success();
    let model = std::fs::read(&model_file).unwrap();
    assert_image_decrypts_to(&d, &img, &model);
}
