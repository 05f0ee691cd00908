//! Self-tests of the power-cut filesystem: the real kernel FUSE mount, driven by ordinary file
//! system calls. Each test has its positive case and its negative control.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

struct Env {
    _tmp: tempfile::TempDir,
    backing: PathBuf,
    fs: Option<powercut::Mounted>,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let backing = tmp.path().join("backing");
        let mnt = tmp.path().join("mnt");
        fs::create_dir(&backing).unwrap();
        fs::create_dir(&mnt).unwrap();
        let fs =
            powercut::mount(&backing, &mnt).expect("mount powercut (needs /dev/fuse and root)");
        Env {
            _tmp: tmp,
            backing,
            fs: Some(fs),
        }
    }
    fn fs(&self) -> &powercut::Mounted {
        self.fs.as_ref().unwrap()
    }
    fn p(&self, name: &str) -> PathBuf {
        self.fs().mountpoint().join(name)
    }
    /// Cut and switch the power back on, as a reboot would.
    fn cut(&self, tear: Option<u64>) {
        self.fs().cut(tear);
        self.fs().power_on();
    }
    /// A file with `data` that is durable: written, fsynced, its directory fsynced.
    fn durable_file(&self, name: &str, data: &[u8]) {
        let mut f = File::create(self.p(name)).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
        fsync_dir(&self.p(name));
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(fs) = self.fs.take() {
            fs.unmount();
        }
    }
}

fn fsync_dir(p: &Path) {
    File::open(p.parent().unwrap()).unwrap().sync_all().unwrap();
}

fn read(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap()
}

fn pattern(tag: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| tag.wrapping_add((i / 512) as u8).wrapping_mul(31) ^ (i as u8))
        .collect()
}

#[test]
fn a_writer_that_skips_fsync_loses_its_writes_across_a_cut() {
    let e = Env::new();
    let old = pattern(1, 8192);
    e.durable_file("f", &old);
    let new = pattern(2, 8192);
    let f = OpenOptions::new().write(true).open(e.p("f")).unwrap();
    f.write_all_at(&new, 0).unwrap();
    f.write_all_at(b"tail", 8192).unwrap();
    // Reads see pending writes; the backing file does not have them yet.
    let mut expect = new.clone();
    expect.extend_from_slice(b"tail");
    assert_eq!(read(&e.p("f")), expect);
    assert_eq!(read(&e.backing.join("f")), old);
    assert!(e.fs().status().pending_bytes > 0);
    e.cut(None);
    assert_eq!(
        read(&e.p("f")),
        old,
        "unsynced writes must be gone after the cut"
    );
}

#[test]
fn a_writer_that_fsyncs_keeps_its_writes_across_a_cut() {
    for datasync in [false, true] {
        let e = Env::new();
        e.durable_file("f", &pattern(1, 8192));
        let new = pattern(3, 10_000);
        let f = OpenOptions::new().write(true).open(e.p("f")).unwrap();
        f.write_all_at(&new, 0).unwrap();
        if datasync {
            f.sync_data().unwrap();
        } else {
            f.sync_all().unwrap();
        }
        // A later unsynced write is lost, the synced one stays.
        f.write_all_at(b"lost", 0).unwrap();
        e.cut(None);
        assert_eq!(read(&e.p("f")), new, "datasync={datasync}");
        assert_eq!(e.fs().status().pending_bytes, 0);
    }
}

#[test]
fn writes_through_o_dsync_and_o_sync_descriptors_survive_a_cut() {
    for flag in [libc::O_DSYNC, libc::O_SYNC] {
        let e = Env::new();
        e.durable_file("f", &[0u8; 4096]);
        // Negative control on the same file: a plain descriptor's writes, before and after the
        // O_DSYNC one, are lost: O_DSYNC makes that write durable, not the whole file.
        let plain = OpenOptions::new().write(true).open(e.p("f")).unwrap();
        plain.write_all_at(b"volatile", 2000).unwrap();
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(flag)
            .open(e.p("f"))
            .unwrap();
        f.write_all_at(b"durable", 100).unwrap();
        plain.write_all_at(b"volatile", 3000).unwrap();
        e.cut(None);
        let got = read(&e.p("f"));
        assert_eq!(&got[100..107], b"durable");
        assert_eq!(&got[3000..3008], &[0u8; 8]);
        assert_eq!(&got[2000..2008], &[0u8; 8]);
    }
}

#[test]
fn a_torn_cut_keeps_only_a_subset_of_the_pending_sectors_each_whole() {
    const N: usize = 256;
    for seed in [1u64, 2, 3] {
        let e = Env::new();
        let old = pattern(10, N * 512);
        e.durable_file("f", &old);
        let new = pattern(20, N * 512);
        let f = OpenOptions::new().write(true).open(e.p("f")).unwrap();
        // Sub-sector writes too: the sector, not the write, is the unit that tears.
        f.write_all_at(&new[..100], 0).unwrap();
        f.write_all_at(&new[100..], 100).unwrap();
        e.cut(Some(seed));
        let got = read(&e.p("f"));
        assert_eq!(got.len(), old.len());
        let mut kept = 0;
        for s in 0..N {
            let r = s * 512..(s + 1) * 512;
            if got[r.clone()] == new[r.clone()] {
                kept += 1;
            } else {
                assert_eq!(got[r.clone()], old[r], "sector {s} is neither old nor new");
            }
        }
        assert!(
            kept > 0 && kept < N,
            "seed {seed}: kept {kept} of {N} sectors"
        );
    }
}

#[test]
fn namespace_changes_need_the_directorys_fsync() {
    let e = Env::new();
    e.durable_file("keep", b"k");
    e.durable_file("a", b"A");
    e.durable_file("b", b"B");
    // Created, data fsynced, directory not: the name is gone after the cut.
    let mut f = File::create(e.p("new")).unwrap();
    f.write_all(b"data").unwrap();
    f.sync_all().unwrap();
    drop(f);
    // Renamed and unlinked without a directory fsync: undone.
    fs::rename(e.p("a"), e.p("b")).unwrap();
    fs::remove_file(e.p("keep")).unwrap();
    fs::create_dir(e.p("d")).unwrap();
    assert!(!e.p("keep").exists());
    e.cut(None);
    assert!(!e.p("new").exists());
    assert!(!e.p("d").exists());
    assert_eq!(read(&e.p("a")), b"A");
    assert_eq!(read(&e.p("b")), b"B");
    assert_eq!(read(&e.p("keep")), b"k");

    // The same with the directory fsynced: all of it stays.
    let mut f = File::create(e.p("new")).unwrap();
    f.write_all(b"data").unwrap();
    f.sync_all().unwrap();
    drop(f);
    fs::rename(e.p("a"), e.p("b")).unwrap();
    fs::remove_file(e.p("keep")).unwrap();
    fsync_dir(&e.p("b"));
    e.cut(None);
    assert_eq!(read(&e.p("new")), b"data");
    assert_eq!(read(&e.p("b")), b"A");
    assert!(!e.p("a").exists() && !e.p("keep").exists());
    let names: Vec<_> = fs::read_dir(e.fs().mountpoint())
        .unwrap()
        .map(|d| d.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn truncate_is_durable_only_after_fsync() {
    let e = Env::new();
    let old = pattern(5, 5000);
    e.durable_file("f", &old);
    let f = OpenOptions::new().write(true).open(e.p("f")).unwrap();
    f.set_len(700).unwrap();
    f.set_len(3000).unwrap();
    let got = read(&e.p("f"));
    assert_eq!(&got[..700], &old[..700]);
    assert!(
        got[700..].iter().all(|&b| b == 0),
        "bytes cut off by a truncate read back as zero"
    );
    e.cut(None);
    assert_eq!(read(&e.p("f")), old);
    let f = OpenOptions::new().write(true).open(e.p("f")).unwrap();
    f.set_len(700).unwrap();
    f.sync_all().unwrap();
    e.cut(None);
    assert_eq!(read(&e.p("f")), &old[..700]);
}

#[test]
fn an_armed_cut_fires_after_the_kth_counted_operation_and_old_descriptors_stay_dead() {
    let e = Env::new();
    e.durable_file("f", &[0u8; 2048]);
    let f = OpenOptions::new().write(true).open(e.p("f")).unwrap();
    e.fs().arm(3, None);
    f.write_all_at(b"1", 0).unwrap(); // op 1
    f.sync_data().unwrap(); // op 2: durable
    f.write_all_at(b"2", 512).unwrap(); // op 3: pending, then the cut
    assert!(
        f.write_all_at(b"3", 1024).is_err(),
        "writes after the cut fail"
    );
    assert!(!e.fs().status().powered);
    e.fs().power_on();
    assert!(
        f.write_all_at(b"4", 1024).is_err(),
        "a descriptor from before the cut stays dead"
    );
    let got = read(&e.p("f"));
    assert_eq!((got[0], got[512], got[1024]), (b'1', 0, 0));
}

#[test]
fn the_control_file_cuts_and_reports() {
    let e = Env::new();
    e.durable_file("f", b"old");
    fs::write(e.p("f"), b"new").unwrap();
    let ctl = e.p(".powercut");
    let mut s = String::new();
    File::open(&ctl).unwrap().read_to_string(&mut s).unwrap();
    assert!(s.starts_with("ops ") && s.contains("powered true"), "{s}");
    fs::write(&ctl, "cut").unwrap();
    assert!(fs::read(e.p("f")).is_err(), "power is off");
    fs::write(&ctl, "on").unwrap();
    assert_eq!(read(&e.p("f")), b"old");
    assert!(fs::write(&ctl, "bogus").is_err());
}
