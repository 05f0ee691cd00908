//! Bulk data through other implementations: nbdcopy (libnbd, several connections), qemu-io
//! and qemu-img (qemu's NBD client). Everything read back is compared with what was written and
//! with the backing file itself.

use nbdcrypt_tests::*;
use std::time::Duration;

const COPY_TIMEOUT: Duration = Duration::from_secs(180);

#[test]
fn nbdcopy_round_trip_over_four_connections_preserves_32_mib_of_random_data() {
    let size = 32 * MIB;
    let d = Daemon::plain(size, &[]);
    let work = tempdir();
    let src = work.path().join("src.bin");
    let back = work.path().join("back.bin");
    let data = random_bytes(0x5eed, size as usize);
    std::fs::write(&src, &data).unwrap();

    run(
        tool("nbdcopy")
            .arg("--connections=4")
            .arg("--flush")
            .arg(&src)
            .arg(d.uri()),
        COPY_TIMEOUT,
    )
    .success();
    run(
        tool("nbdcopy")
            .arg("--connections=4")
            .arg(d.uri())
            .arg(&back),
        COPY_TIMEOUT,
    )
    .success();

    let got = std::fs::read(&back).unwrap();
    assert_eq!(
        got.len(),
        data.len(),
        "size of the copy read back from the export"
    );
    assert!(
        got == data,
        "export -> file differs from the source at byte {:?}",
        first_difference(&got, &data)
    );
    let disk = std::fs::read(&d.image).unwrap();
    assert_eq!(disk.len() as u64, size, "backing file size changed");
    assert!(
        disk == data,
        "backing file differs from the source at byte {:?}",
        first_difference(&disk, &data)
    );
    run(tool("cmp").arg(&src).arg(&back), TOOL_TIMEOUT).success();
}

#[test]
fn nbdcopy_reads_what_was_put_into_the_backing_file() {
    let size = 8 * MIB;
    let data = random_bytes(77, size as usize);
    let d = Daemon::plain_with(&data, &[]);
    let out = tempdir();
    let back = out.path().join("back.bin");
    run(tool("nbdcopy").arg(d.uri()).arg(&back), COPY_TIMEOUT).success();
    let got = std::fs::read(&back).unwrap();
    assert!(
        got == data,
        "export content differs from the backing file at {:?}",
        first_difference(&got, &data)
    );
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

#[test]
fn qemu_io_reads_back_aligned_and_unaligned_writes() {
    let size = 16 * MIB;
    let d = Daemon::plain(size, &[]);
    let uri = d.uri();
    assert_qemu_io_ok(qemu_io(
        &uri,
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "write -P 0x5a 1000 3333",
            "read -P 0x5a 1000 3333",
            // The neighbours of the unaligned write keep the earlier pattern.
            "read -P 0xab 0 1000",
            "read -P 0xab 4333 61203",
            "write -P 0x11 8388607 2",
            "read -P 0x11 8388607 2",
            "read -P 0 8388609 4096",
            // Last sector of the export.
            "write -P 0xee 16776704 512",
            "read -P 0xee 16776704 512",
            "aio_write -P 0x22 1M 256k",
            "aio_write -P 0x33 2M 256k",
            "aio_flush",
            "read -P 0x22 1M 256k",
            "read -P 0x33 2M 256k",
        ],
    ));
    // A separate qemu-io process (new connection) sees the same data.
    assert_qemu_io_ok(qemu_io(
        &uri,
        &["read -P 0x5a 1000 3333", "read -P 0xee 16776704 512"],
    ));
    // And the backing file holds it.
    assert_eq!(read_at(&d.image, 1000, 3333), vec![0x5a; 3333]);
    assert_eq!(read_at(&d.image, 0, 1000), vec![0xab; 1000]);
    assert_eq!(read_at(&d.image, 8388607, 2), vec![0x11; 2]);
    assert_eq!(read_at(&d.image, 16776704, 512), vec![0xee; 512]);
}

#[test]
fn qemu_io_write_crossing_the_end_of_the_export_fails_and_changes_nothing() {
    let size = 16 * MIB;
    let d = Daemon::plain(size, &[]);
    let uri = d.uri();
    assert_qemu_io_ok(qemu_io(&uri, &["write -P 0x77 16773120 4096"]));
    let out = qemu_io(&uri, &["write -P 0xab 16775168 4096"]);
    assert!(
        !out.ok() || out.stdout.contains("failed") || out.stderr.contains("failed"),
        "a write crossing the end must fail:\n{}",
        out.details()
    );
    // The in-range part was not written, and the file did not grow.
    assert_qemu_io_ok(qemu_io(&uri, &["read -P 0x77 16773120 4096"]));
    assert_eq!(
        std::fs::metadata(&d.image).unwrap().len(),
        size,
        "backing file grew"
    );
    let out = qemu_io(&uri, &["read 16777216 512"]);
    assert!(
        !out.ok() || out.stdout.contains("failed") || out.stderr.contains("failed"),
        "a read past the end must fail:\n{}",
        out.details()
    );
}

#[test]
fn qemu_img_compare_finds_the_export_identical_to_its_backing_file() {
    let size = 16 * MIB;
    // Half random data, half zeroes.
    let dir = tempdir();
    std::fs::write(dir.path().join("disk.img"), {
        let mut v = random_bytes(3, size as usize / 2);
        v.resize(size as usize, 0);
        v
    })
    .unwrap();
    let d = Daemon::plain_in(dir, &[]);
    let uri = d.uri();
    assert_qemu_io_ok(qemu_io(
        &uri,
        &["write -P 0xcd 12M 1M", "write -z 1M 1M", "flush"],
    ));
    let out = run(
        tool("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&uri)
            .arg(&d.image),
        TOOL_TIMEOUT,
    );
    assert_eq!(
        out.code(),
        Some(0),
        "qemu-img compare export vs backing file:\n{}",
        out.details()
    );
    // And a changed copy is detected as different (the comparison is not vacuous).
    let other = tempdir();
    let copy = other.path().join("copy.img");
    std::fs::copy(&d.image, &copy).unwrap();
    {
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&copy)
            .unwrap()
            .write_all_at(b"X", 5 * MIB)
            .unwrap();
    }
    let out = run(
        tool("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&uri)
            .arg(&copy),
        TOOL_TIMEOUT,
    );
    assert_eq!(
        out.code(),
        Some(1),
        "qemu-img compare must see the difference:\n{}",
        out.details()
    );
}
