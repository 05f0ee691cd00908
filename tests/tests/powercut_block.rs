//! Block-level power-loss trials: nbdcryptd serves a LUKS2 volume whose backing file lies on the
//! power-cut filesystem (tests/powercut), which keeps every write that was not fdatasync'd (or
//! written through O_DSYNC) in memory only. Several raw NBD connections write numbered records,
//! aligned (4 KiB) and sub-sector (128 bytes, four to a 512-byte sector, neighbours from different
//! connections), some with FUA, and send FLUSHes now and then. At a random moment the power is cut
//! (optionally tearing: a random subset of the pending 512-byte sectors reaches the disk) and the
//! daemon is killed with SIGKILL. A new daemon on the same file unlocks the volume, and every
//! record that was acknowledged as durable must read back intact:
//! - a write answered OK with FUA;
//! - a write answered OK before a FLUSH was *sent* (on any connection) that was answered OK.
//!
//! Unlike the kill -9 trials, the host page cache does not save a daemon that skips fdatasync:
//! the negative control builds nbdcryptd with the test-only `test-skip-fdatasync` feature and
//! must lose acknowledged records.
//!
//! `NBDCRYPT_POWERCUT_TRIALS=N` runs N trials per test (default 3, 2 for the negative control);
//! `NBDCRYPT_POWERCUT_SEED=S` repeats a run. Needs /dev/fuse, root, cryptsetup.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nbdcrypt_tests::powercut_rig::{nosync_daemon_binary, seed, trial_count, Rig, Rng};
use nbdcrypt_tests::raw::{Client, CMD_FLAG_FUA, CMD_FLUSH, CMD_WRITE};
use nbdcrypt_tests::{
    daemon_binary, luks_format_keyfile, nbdcryptctl, random_bytes, tempdir, Daemon, MIB,
};

const FILE_SIZE: u64 = 64 * MIB;
const CONNS: usize = 4;
/// Data area layout (the volume is FILE_SIZE minus the 16 MiB LUKS2 header): 4 KiB records in
/// the first 24 MiB, 128-byte records after it.
const BIG: u64 = 4096;
const BIG_AREA: u64 = 24 * MIB;
const SMALL: u64 = 128;
const SMALL_AREA: u64 = 8 * MIB;

#[derive(Clone)]
struct Record {
    off: u64,
    data: Vec<u8>,
}

#[derive(Default)]
struct Acks {
    /// Writes answered OK without FUA: (completion number, record).
    completed: Vec<(u64, Record)>,
    /// Every write with completion number <= this was covered by a successful FLUSH.
    flushed_upto: u64,
    /// Writes answered OK with FUA.
    fua: Vec<Record>,
    writes_ok: u64,
    flushes_ok: u64,
}

impl Acks {
    fn durable(&self) -> Vec<Record> {
        let mut v = self.fua.clone();
        v.extend(
            self.completed
                .iter()
                .filter(|(n, _)| *n <= self.flushed_upto)
                .map(|(_, r)| r.clone()),
        );
        v
    }
}

struct Shared {
    acks: Mutex<Acks>,
    completions: AtomicU64,
    big_slot: AtomicU64,
    small_slot: AtomicU64,
    stop: AtomicBool,
    trial_seed: u64,
}

fn daemon_args(volume: &Path, key: &Path, dir: &Path) -> Vec<OsString> {
    vec![
        "--volume".into(),
        volume.into(),
        "--unlock-key-file".into(),
        key.into(),
        "--control".into(),
        dir.join("control.sock").into(),
        "--unix".into(),
        dir.join("nbd.sock").into(),
    ]
}

fn wait_unlocked(d: &Daemon) {
    // The control socket may exist before it accepts: poll status until it says unlocked.
    let sock = d.dir().join("control.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = nbdcryptctl(&[
            OsStr::new("status"),
            OsStr::new("--control"),
            sock.as_os_str(),
            OsStr::new("--json"),
        ]);
        let state = serde_json::from_str::<serde_json::Value>(&out.stdout)
            .ok()
            .map(|v| v["state"].clone());
        if out.ok() && state.is_some_and(|s| s == "unlocked") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the volume was not unlocked within 30 s: {}\n{}",
            out.details(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// One connection's load until the daemon stops answering or the trial ends.
fn writer(sock: PathBuf, sh: Arc<Shared>, conn: u64) {
    let (mut c, _) = Client::connect_go(&sock);
    let mut rng = Rng::new(sh.trial_seed ^ (conn + 1).wrapping_mul(0x1234_5678_9abc));
    let mut cookie = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        cookie += 1;
        let rec = if rng.one_in(2) {
            let slot = sh.big_slot.fetch_add(1, Ordering::Relaxed);
            if (slot + 1) * BIG > BIG_AREA {
                break;
            }
            Record {
                off: slot * BIG,
                data: random_bytes(sh.trial_seed ^ slot << 1, BIG as usize),
            }
        } else {
            let slot = sh.small_slot.fetch_add(1, Ordering::Relaxed);
            if (slot + 1) * SMALL > SMALL_AREA {
                break;
            }
            let data = random_bytes(sh.trial_seed ^ (slot << 1 | 1), SMALL as usize);
            Record {
                off: BIG_AREA + slot * SMALL,
                data,
            }
        };
        let fua = rng.one_in(8);
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        if c.request(
            flags,
            CMD_WRITE,
            cookie,
            rec.off,
            rec.data.len() as u32,
            &rec.data,
        )
        .is_err()
        {
            return;
        }
        match c.simple_reply() {
            Ok((0, k)) if k == cookie => {
                let mut a = sh.acks.lock().unwrap();
                a.writes_ok += 1;
                if fua {
                    a.fua.push(rec);
                } else {
                    let n = sh.completions.fetch_add(1, Ordering::SeqCst) + 1;
                    a.completed.push((n, rec));
                }
            }
            _ => return,
        }
        if rng.one_in(16) {
            cookie += 1;
            // Every write answered before this point is covered if the FLUSH succeeds.
            let upto = sh.completions.load(Ordering::SeqCst);
            if c.request(0, CMD_FLUSH, cookie, 0, 0, &[]).is_err() {
                return;
            }
            match c.simple_reply() {
                Ok((0, k)) if k == cookie => {
                    let mut a = sh.acks.lock().unwrap();
                    a.flushed_upto = a.flushed_upto.max(upto);
                    a.flushes_ok += 1;
                }
                _ => return,
            }
        }
    }
}

#[derive(Debug)]
struct Outcome {
    writes_ok: u64,
    flushes_ok: u64,
    durable: usize,
    pending_at_cut: u64,
    lost: usize,
    cut_ms: u64,
}

/// One trial: load, cut (torn if `tear`), SIGKILL, power on, restart with the real daemon, verify.
fn trial(rig: &Rig, bin: &Path, trial_seed: u64, tear: bool) -> Outcome {
    let volume = rig.mnt.join("disk.img");
    let key = rig.backing.join("key");
    let dir = tempdir();
    let args = daemon_args(&volume, &key, dir.path());
    let mut d = Daemon::start_bin_in(bin, dir, args);
    wait_unlocked(&d);
    let sh = Arc::new(Shared {
        acks: Mutex::new(Acks::default()),
        completions: AtomicU64::new(0),
        big_slot: AtomicU64::new(0),
        small_slot: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        trial_seed,
    });
    let threads: Vec<_> = (0..CONNS as u64)
        .map(|i| {
            let (sock, sh) = (d.sock.clone(), sh.clone());
            std::thread::spawn(move || writer(sock, sh, i))
        })
        .collect();
    let mut rng = Rng::new(trial_seed);
    let cut_ms = rng.range(150, 1500);
    std::thread::sleep(Duration::from_millis(cut_ms));
    rig.fs().cut(tear.then_some(trial_seed));
    let pending_at_cut = rig.fs().status().pending_at_last_cut;
    d.signal(libc::SIGKILL);
    assert!(
        d.wait_exit(Duration::from_secs(20)).is_some(),
        "nbdcryptd survived SIGKILL"
    );
    sh.stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("writer thread panicked");
    }
    drop(d);
    rig.fs().power_on();

    let acks = sh.acks.lock().unwrap();
    let durable = acks.durable();
    let dir = tempdir();
    let args = daemon_args(&volume, &key, dir.path());
    let mut d = Daemon::start_bin_in(&daemon_binary(), dir, args);
    wait_unlocked(&d);
    let (mut c, _) = Client::connect_go(&d.sock);
    let mut lost = 0;
    for (i, r) in durable.iter().enumerate() {
        match c.read(i as u64, r.off, r.data.len() as u32) {
            Ok(got) if got == r.data => {}
            Ok(_) => lost += 1,
            Err(e) => panic!("READ at {} after the cut failed: {e}\n{}", r.off, d.log()),
        }
    }
    drop(c);
    d.terminate(Duration::from_secs(20));
    Outcome {
        writes_ok: acks.writes_ok,
        flushes_ok: acks.flushes_ok,
        durable: durable.len(),
        pending_at_cut,
        lost,
        cut_ms,
    }
}

fn run_trials(
    name: &str,
    sector_size: u32,
    bin: &Path,
    trials: usize,
    tear_every_other: bool,
) -> Vec<Outcome> {
    let rig = Rig::new(|b| luks_format_keyfile(b, FILE_SIZE, sector_size));
    let base = seed();
    let mut v = Vec::new();
    eprintln!("{name}: trial  cut_ms  tear  writes_ok  flushes_ok  durable  pending_at_cut  lost");
    for t in 0..trials {
        let ts = base.wrapping_add(t as u64 * 0x9E37_79B9);
        let tear = tear_every_other && t % 2 == 1;
        let start = Instant::now();
        let o = trial(&rig, bin, ts, tear);
        eprintln!(
            "{name}: {t:5}  {:6}  {:4}  {:9}  {:10}  {:7}  {:14}  {:4}   ({:.1}s)",
            o.cut_ms,
            if tear { "yes" } else { "no" },
            o.writes_ok,
            o.flushes_ok,
            o.durable,
            o.pending_at_cut,
            o.lost,
            start.elapsed().as_secs_f64()
        );
        v.push(o);
    }
    v
}

fn assert_no_loss(name: &str, v: &[Outcome]) {
    let lost: usize = v.iter().map(|o| o.lost).sum();
    let durable: usize = v.iter().map(|o| o.durable).sum();
    assert!(
        durable > 0,
        "{name}: no write was acknowledged as durable: the trials tested nothing"
    );
    assert!(
        v.iter().any(|o| o.pending_at_cut > 0),
        "{name}: no cut found unsynced data to throw away: the trials tested nothing"
    );
    assert_eq!(
        lost, 0,
        "{name}: {lost} of {durable} acknowledged-durable records lost across power cuts"
    );
}

#[test]
fn acknowledged_records_survive_power_cuts_512_byte_sectors_some_torn() {
    let v = run_trials("512/torn", 512, &daemon_binary(), trial_count(3), true);
    assert_no_loss("512/torn", &v);
}

#[test]
fn acknowledged_records_survive_power_cuts_4096_byte_sectors() {
    // No tearing: a 4 KiB encryption sector spans eight 512-byte disk sectors, and a torn one
    // garbles all of it (as on a real disk without 4 KiB atomic writes; see README).
    let v = run_trials("4096", 4096, &daemon_binary(), trial_count(3), false);
    assert_no_loss("4096", &v);
}

#[test]
fn negative_control_a_daemon_that_skips_fdatasync_loses_acknowledged_records() {
    let bin = nosync_daemon_binary();
    let v = run_trials("nosync", 512, &bin, trial_count(2).clamp(1, 10), false);
    let lost: usize = v.iter().map(|o| o.lost).sum();
    let durable: usize = v.iter().map(|o| o.durable).sum();
    assert!(durable > 0, "negative control acknowledged nothing");
    assert!(
        lost > 0,
        "negative control: a daemon without fdatasync lost nothing of {durable} records: \
         the trials cannot see a loss"
    );
}
