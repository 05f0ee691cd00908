//! WRITE_ZEROES, TRIM and block status on an encrypted volume. A hole in the backing file
//! decrypts to garbage, not zeros, so WRITE_ZEROES must store encrypted zeros, and block status
//! must never call a range "zero" that does not read as zeros.

use nbdcrypt_tests::raw::*;
use nbdcrypt_tests::*;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

const DATA: u64 = 4 * MIB;
const PASS: &[u8] = b"zero-trim passphrase";

fn unlocked(sector_size: u32, extra: &[&str], seed: u64) -> (Daemon, PathBuf, Vec<u8>) {
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, DATA, sector_size, "pbkdf2", PASS);
    let d = Daemon::volume_in(dir, &img, extra);
    let out = d.unlock(PASS);
    assert_eq!(out.code(), Some(0), "unlock\n{}", out.details());
    let base = random_bytes(seed, DATA as usize);
    write_export(&d.uri(), d.dir(), &base);
    (d, img, base)
}

fn locked_plaintext(d: &Daemon, img: &std::path::Path) -> Vec<u8> {
    let out = d.lock_idle();
    assert_eq!(out.code(), Some(0), "lock\n{}", out.details());
    d.wait_state("locked", Duration::from_secs(10));
    verify_py_plaintext(img, &luks_volume_key(img, PASS))
}

/// nbdsh snippet: `extents()` = list of (offset, length, flags) from base:allocation.
const EXTENTS_PY: &str = r#"
def extents():
    size = h.get_size()
    out = []
    off = 0
    while off < size:
        got = []
        def cb(meta, o, entries, err):
            if meta == "base:allocation":
                got.extend(entries)
            return 0
        h.block_status(min(size - off, 32 << 20), off, cb)
        assert got, "empty block status at %d" % off
        for i in range(0, len(got), 2):
            out.append((off, got[i], got[i + 1]))
            off += got[i]
    return out
def check_zero_claims(what):
    for (off, length, flags) in extents():
        if flags & nbd.STATE_ZERO:
            data = h.pread(length, off)
            assert data == bytearray(length), "%s: block status says [%d, +%d) reads as zero, but it does not" % (what, off, length)
"#;

fn zero_test(extra: &[&str], sector_size: u32, seed: u64) {
    let (d, img, base) = unlocked(sector_size, extra, seed);
    let script = format!(
        r#"
h.add_meta_context("base:allocation")
h.connect_uri(URI)
{EXTENTS_PY}
assert h.can_zero()
check_zero_claims("before")
h.zero(65536, 65536)                             # aligned, hole allowed
h.zero(1000, 200000, nbd.CMD_FLAG_NO_HOLE)       # unaligned, no hole
h.zero(3333, 1048576 + 17)                       # unaligned, hole allowed
h.zero(4096 * 3, 2097152)                        # whole sectors, hole allowed
for off, n in ((65536, 65536), (200000, 1000), (1048576 + 17, 3333), (2097152, 4096 * 3)):
    assert h.pread(n, off) == bytearray(n), "zeroed range [%d, +%d) does not read as zeros" % (off, n)
check_zero_claims("after write_zeroes")
h.flush()
h.shutdown()
"#
    );
    nbdsh(&d.uri(), &script).success();
    let mut model = base.clone();
    for (off, n) in [
        (65536usize, 65536usize),
        (200000, 1000),
        (1048576 + 17, 3333),
        (2097152, 4096 * 3),
    ] {
        model[off..off + n].fill(0);
    }
    assert_same_bytes(
        &read_export(&d.uri(), d.dir()),
        &model,
        "export after WRITE_ZEROES (nbdcopy)",
    );
    assert_same_bytes(
        &locked_plaintext(&d, &img),
        &model,
        "verify.py's decryption after WRITE_ZEROES",
    );
}

#[test]
fn write_zeroes_reads_back_as_zeros_and_decrypts_to_zeros_on_4096_byte_sectors() {
    zero_test(&[], 4096, 31);
}

#[test]
fn write_zeroes_with_allow_discards_still_stores_encrypted_zeros_on_512_byte_sectors() {
    zero_test(&["--allow-discards"], 512, 32);
}

#[test]
fn with_allow_discards_trim_punches_a_hole_in_the_backing_file_keeps_the_neighbours_and_block_status_stays_truthful(
) {
    let (d, img, base) = unlocked(4096, &["--allow-discards"], 33);
    std::fs::File::open(&img).unwrap().sync_all().unwrap();
    let blocks_before = std::fs::metadata(&img).unwrap().blocks();
    let script = format!(
        r#"
h.add_meta_context("base:allocation")
h.connect_uri(URI)
{EXTENTS_PY}
assert h.can_trim(), "--allow-discards must offer TRIM"
h.trim(1048576, 1048576)
h.flush()
check_zero_claims("after trim")
# A trimmed range can be written again and reads back.
h.pwrite(b"\x5a" * 5000, 1048576 + 100)
assert h.pread(5000, 1048576 + 100) == b"\x5a" * 5000
h.shutdown()
"#
    );
    nbdsh(&d.uri(), &script).success();
    let blocks_after = std::fs::metadata(&img).unwrap().blocks();
    assert!(
        blocks_after + 1024 <= blocks_before,
        "TRIM of 1 MiB with --allow-discards did not deallocate the backing file: {blocks_before} -> {blocks_after} 512-byte blocks"
    );
    let got = read_export(&d.uri(), d.dir());
    assert_same_bytes(
        &got[..1048576],
        &base[..1048576],
        "data before the trimmed range",
    );
    assert_same_bytes(
        &got[2097152..],
        &base[2097152..],
        "data after the trimmed range",
    );
    assert_eq!(
        got[1048576 + 100..1048576 + 5100],
        [0x5a; 5000][..],
        "rewritten part of the trimmed range"
    );
}

#[test]
fn without_allow_discards_trim_is_not_offered_and_a_raw_trim_changes_nothing() {
    let (d, img, base) = unlocked(4096, &[], 34);
    let (mut c, e) = Client::connect_go(&d.sock);
    assert_eq!(
        e.flags & TF_SEND_TRIM,
        0,
        "TRIM advertised without --allow-discards: flags {:#x}",
        e.flags
    );
    c.request(0, CMD_TRIM, 9, 0, 65536, &[]).unwrap();
    let (err, cookie) = c.simple_reply().expect("reply to an unadvertised TRIM");
    assert_eq!(cookie, 9);
    // Either refused or accepted as a no-op; the data must be intact either way.
    let _ = err;
    let got = c.read(10, 0, 65536).expect("READ after TRIM");
    assert_same_bytes(&got, &base[..65536], "data after an unadvertised TRIM");
    drop(c);
    assert_same_bytes(
        &locked_plaintext(&d, &img),
        &base,
        "verify.py's decryption after the TRIM attempt",
    );
}

#[test]
fn block_status_on_a_fresh_sparse_volume_never_claims_zeros_that_do_not_read_as_zeros() {
    // luksFormat does not wipe the data area: the backing file is one big hole, which decrypts
    // to garbage. Block status must not report it as zero (nbdcopy would then copy zeros).
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, DATA, 4096, "pbkdf2", PASS);
    let d = Daemon::volume_in(dir, &img, &[]);
    assert_eq!(d.unlock(PASS).code(), Some(0));
    let out_file = d.dir().join("nbdsh-read.bin");
    let script = format!(
        r#"
h.add_meta_context("base:allocation")
h.connect_uri(URI)
{EXTENTS_PY}
check_zero_claims("fresh volume")
open(os.environ["OUT"], "wb").write(h.pread(h.get_size(), 0))
h.shutdown()
"#
    );
    nbdsh_env(&d.uri(), &[("OUT", out_file.to_str().unwrap())], &script).success();
    let direct = std::fs::read(&out_file).unwrap();
    // nbdcopy uses block status to skip zero ranges: it must still copy what a plain read sees.
    assert_same_bytes(
        &read_export(&d.uri(), d.dir()),
        &direct,
        "nbdcopy vs pread of a fresh volume",
    );
    assert!(
        direct.iter().any(|&b| b != 0),
        "a never-written encrypted volume should read as ciphertext garbage, not zeros"
    );
}
