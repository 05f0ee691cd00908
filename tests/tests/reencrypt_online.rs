//! Online volume-key re-encryption inside nbdcryptd (`nbdcryptctl reencrypt --control`), with
//! real clients (fio over libnbd, nbdcopy, nbdsh) doing I/O throughout, kill -9 of the daemon at
//! every zone commit point and at random moments, restart + unlock resuming, and cryptsetup
//! reading the volume afterwards.
//!
//! The crash points come from debug-build test hooks of nbdcryptd (compiled out of release
//! builds): `NBDCRYPT_TEST_REENCRYPT_ZONE` (zone bytes, so small volumes have many zones),
//! `NBDCRYPT_TEST_REENCRYPT_ABORT=ZONE:POINT` (abort() like kill -9 at POINT of zone ZONE) and
//! `NBDCRYPT_TEST_REENCRYPT_LOSE_ZONE=ZONE` (the negative control: a zone's data write is
//! dropped, its commit goes ahead).

#[path = "common/db_stack.rs"]
mod db_stack;
#[path = "common/postgres.rs"]
mod postgres;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbdcrypt_tests::*;
use serde_json::Value;

const PASS: &[u8] = b"online reencrypt passphrase";
const DATA: u64 = 24 * MIB;
const ZONE: &str = "1048576";

/// The tests share two cores with everything else: one at a time, so timing-driven steps
/// (kill moments, pause windows) behave the same on a loaded machine.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// nbdcryptd serving `img` (locked) with `env` set for it, through `env(1)` so parallel tests
/// do not share the variables.
fn daemon(dir: tempfile::TempDir, img: &Path, env: &[(&str, &str)]) -> Daemon {
    let mut args: Vec<OsString> = env.iter().map(|(k, v)| format!("{k}={v}").into()).collect();
    args.push(daemon_binary().into());
    let d = dir.path().to_owned();
    args.extend([
        "--volume".into(),
        img.as_os_str().to_owned(),
        "--unix".into(),
        d.join("nbd.sock").into(),
        "--control".into(),
        d.join("control.sock").into(),
        "--audit-log".into(),
        d.join("audit.jsonl").into(),
    ]);
    let daemon = Daemon::start_bin_in(Path::new("/usr/bin/env"), dir, args);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(daemon.control()).is_err() {
        assert!(
            Instant::now() < deadline,
            "no control socket\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon
}

fn key_file(dir: &Path) -> PathBuf {
    let f = dir.join("pass.key");
    std::fs::write(&f, PASS).unwrap();
    f
}

fn start(d: &Daemon, extra: &[&str]) -> Out {
    let k = key_file(d.dir());
    let mut args = vec!["--key-file", k.to_str().unwrap()];
    args.extend_from_slice(extra);
    d.ctl("reencrypt", &args)
}

fn wait_exit(d: &mut Daemon, timeout: Duration) {
    assert!(
        d.wait_exit(timeout).is_some(),
        "the daemon did not die at its crash point\n{}",
        d.log()
    );
}

fn fio_verify(uri: &str, offset: u64, size: u64, seed: u64) -> Out {
    let out_dir = tempdir();
    let mut c = tool("fio");
    c.current_dir(out_dir.path())
        .arg("--ioengine=nbd")
        .arg("--verify_state_save=0")
        .arg(format!("--uri={uri}"))
        .arg("--name=online")
        .arg("--rw=randwrite")
        .arg("--bsrange=4k-64k")
        .arg("--iodepth=8")
        .arg(format!("--offset={offset}"))
        .arg(format!("--size={size}"))
        .arg(format!("--randseed={seed}"))
        .arg("--verify=crc32c")
        .arg("--verify_backlog=64")
        .arg("--do_verify=1")
        .arg("--verify_fatal=1");
    run(&mut c, Duration::from_secs(300))
}

/// fio verify over `[0, size)` in a loop on its own thread (at least one run) until the flag is
/// set; the thread returns the number of runs and panics on a verify failure.
fn fio_verify_loop(uri: String, size: u64) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let fio = std::thread::spawn(move || {
        let mut runs = 0u64;
        while !stop2.load(Ordering::Relaxed) || runs == 0 {
            let out = fio_verify(&uri, 0, size, runs + 1);
            assert!(
                out.ok(),
                "fio verify failed in run {runs}\n{}",
                out.details()
            );
            runs += 1;
        }
        runs
    });
    (stop, fio)
}

/// The full online run: fio verify loops over the first half of the volume while the daemon
/// re-encrypts it (with a pause and a resume, and a rate cap), the second half holds data
/// written before; afterwards everything reads back, the audit log has the lifecycle, and
/// cryptsetup's volume key (not ours) decrypts the image to the same bytes.
#[test]
fn online_reencryption_under_fio_verify_reads_back_and_cryptsetup_reads_the_result() {
    let _serial = serial();
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, DATA, 4096, "pbkdf2", PASS);
    let old_key = luks_volume_key(&img, PASS);
    let mut d = daemon(tempdir(), &img, &[("NBDCRYPT_TEST_REENCRYPT_ZONE", ZONE)]);
    assert_eq!(d.unlock(PASS).code(), Some(0), "unlock\n{}", d.log());
    let data = random_bytes(7, DATA as usize);
    write_export(&d.uri(), d.dir(), &data);

    let half = DATA / 2;
    let (stop, fio) = fio_verify_loop(d.uri(), half);

    let out = start(&d, &["--max-rate", "4M"]);
    assert_eq!(out.code(), Some(0), "start\n{}\n{}", out.details(), d.log());
    // Progress, rate and ETA show up while it runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = d.reencrypt_status();
        if r["state"] == "running" && r["rate_bytes_per_sec"].as_u64() > Some(0) {
            assert!(r["eta_secs"].is_u64(), "{r:#}");
            assert_eq!(r["total_bytes"], DATA, "{r:#}");
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {r:#}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // fio keeps the export busy: the worker says it backs off for client I/O.
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.reencrypt_status()["backing_off"] != true {
        assert!(
            Instant::now() < deadline,
            "never backed off under fio: {:#}",
            d.reencrypt_status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let table = d.ctl("status", &[]).success().stdout;
    assert!(table.contains("reencrypt"), "{table}");
    // Pause: the frontier stands still; resume (unthrottled now): it moves on.
    assert_eq!(d.ctl("reencrypt", &["--pause"]).code(), Some(0));
    std::thread::sleep(Duration::from_millis(300));
    let at = d.reencrypt_status()["done_bytes"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let r = d.reencrypt_status();
    assert_eq!(r["state"], "paused", "{r:#}");
    assert_eq!(
        r["done_bytes"].as_u64(),
        Some(at),
        "moved while paused: {r:#}"
    );
    assert!(at < DATA, "finished before the pause could be seen: {r:#}");
    assert_eq!(
        d.ctl("reencrypt", &["--resume", "--max-rate", "64M"])
            .code(),
        Some(0)
    );
    d.wait_reencrypt_finished(Duration::from_secs(240));
    stop.store(true, Ordering::Relaxed);
    let runs = fio.join().unwrap();
    assert!(runs >= 1);

    let got = read_export(&d.uri(), d.dir());
    assert_same_bytes(
        &got[half as usize..],
        &data[half as usize..],
        "data written before the re-encryption",
    );
    let s = d.status();
    assert_eq!(s["errors"], 0, "{s:#}");
    let audit = std::fs::read_to_string(d.dir().join("audit.jsonl")).unwrap();
    for phase in ["start", "checkpoint", "pause", "resume", "finish"] {
        let found = audit.lines().any(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or(Value::Null);
            v["event"] == "reencrypt" && v["phase"] == phase && v["mode"] == "online"
        });
        assert!(found, "no reencrypt {phase} line in\n{audit}");
    }
    assert_eq!(d.lock_idle().code(), Some(0));
    d.terminate(Duration::from_secs(15));

    // cryptsetup: a normal header again (no reencrypt keyslot, no requirement), a new key,
    // and that key decrypts the image to what the export served.
    let dump = luks_dump(&img);
    assert!(!dump.contains("reencrypt"), "{dump}");
    let new_key = luks_volume_key(&img, PASS);
    assert_ne!(new_key, old_key, "the volume key did not change");
    assert_same_bytes(
        &verify_py_plaintext(&img, &new_key)[..DATA as usize],
        &got,
        "cryptsetup's key + verify.py vs the export",
    );
    let k = key_file(dir.path());
    let mut c = cryptsetup();
    c.args(["open", "--test-passphrase", "--key-file"])
        .arg(&k)
        .arg(&img);
    run(&mut c, TOOL_TIMEOUT).success();
}

/// A new key size and sector size online (`--key-size 256 --sector-size 512` on a volume of
/// AES-256-XTS with 4096-byte sectors): fio verify writes over the first half throughout,
/// so client I/O is routed across the frontier between two sector sizes; afterwards the header
/// says 256-bit key and 512-byte sectors, and cryptsetup's key decrypts the image to what the
/// export serves.
#[test]
fn an_online_reencryption_can_change_the_key_and_sector_size() {
    let _serial = serial();
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, DATA, 4096, "pbkdf2", PASS);
    let dump = luks_dump(&img);
    assert!(
        dump.contains("sector: 4096") && dump.contains("512 bits"),
        "{dump}"
    );
    let mut d = daemon(tempdir(), &img, &[("NBDCRYPT_TEST_REENCRYPT_ZONE", ZONE)]);
    assert_eq!(d.unlock(PASS).code(), Some(0), "unlock\n{}", d.log());
    let data = random_bytes(11, DATA as usize);
    write_export(&d.uri(), d.dir(), &data);

    let half = DATA / 2;
    let (stop, fio) = fio_verify_loop(d.uri(), half);
    // A size the daemon cannot use is refused with the reason, and nothing starts.
    let out = start(&d, &["--key-size", "128"]);
    assert_ne!(out.code(), Some(0), "{}", out.details());
    assert!(out.details().contains("key_size"), "{}", out.details());
    let out = start(
        &d,
        &[
            "--key-size",
            "256",
            "--sector-size",
            "512",
            "--max-rate",
            "8M",
        ],
    );
    assert_eq!(out.code(), Some(0), "start\n{}\n{}", out.details(), d.log());
    d.wait_reencrypt_finished(Duration::from_secs(240));
    stop.store(true, Ordering::Relaxed);
    assert!(fio.join().unwrap() >= 1);

    let got = read_export(&d.uri(), d.dir());
    assert_same_bytes(
        &got[half as usize..],
        &data[half as usize..],
        "data written before the re-encryption",
    );
    assert_eq!(d.status()["errors"], 0);
    assert_eq!(d.lock_idle().code(), Some(0));
    d.terminate(Duration::from_secs(15));

    let dump = luks_dump(&img);
    assert!(!dump.contains("reencrypt"), "{dump}");
    assert!(
        dump.contains("sector: 512") && dump.contains("256 bits"),
        "{dump}"
    );
    let new_key = luks_volume_key(&img, PASS);
    assert_eq!(new_key.len(), 64, "not a 256-bit key (hex): {new_key}");
    assert_same_bytes(
        &verify_py_plaintext(&img, &new_key)[..DATA as usize],
        &got,
        "cryptsetup's key + verify.py vs the export",
    );
}

/// One crash trial at a named point of zone 2: the daemon aborts there (as kill -9 would stop
/// it); the header shows the re-encryption; a new daemon unlocked with the same passphrase
/// recovers the zone, serves exactly the data (mid-re-encryption), and finishes.
fn crash_at(point: &str) {
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, DATA, 4096, "pbkdf2", PASS);
    let data = random_bytes(11, DATA as usize);
    let abort = format!("2:{point}");
    let mut d = daemon(
        tempdir(),
        &img,
        &[
            ("NBDCRYPT_TEST_REENCRYPT_ZONE", ZONE),
            ("NBDCRYPT_TEST_REENCRYPT_ABORT", &abort),
        ],
    );
    assert_eq!(d.unlock(PASS).code(), Some(0), "unlock\n{}", d.log());
    write_export(&d.uri(), d.dir(), &data);
    let _ = start(&d, &[]);
    wait_exit(&mut d, Duration::from_secs(60));
    assert!(
        d.log().contains(&format!("at {point}")),
        "did not stop at {point}\n{}",
        d.log()
    );
    drop(d);
    let dump = luks_dump(&img);
    assert!(
        dump.contains("reencrypt"),
        "{point}: no re-encryption in the header\n{dump}"
    );

    let mut d = daemon(tempdir(), &img, &[("NBDCRYPT_TEST_REENCRYPT_ZONE", ZONE)]);
    assert_eq!(
        d.unlock(PASS).code(),
        Some(0),
        "unlock after {point}\n{}",
        d.log()
    );
    assert_same_bytes(
        &read_export(&d.uri(), d.dir()),
        &data,
        &format!("served right after the restart ({point})"),
    );
    d.wait_reencrypt_finished(Duration::from_secs(120));
    assert_same_bytes(
        &read_export(&d.uri(), d.dir()),
        &data,
        &format!("after the resumed re-encryption finished ({point})"),
    );
    assert_eq!(d.lock_idle().code(), Some(0));
    d.terminate(Duration::from_secs(15));
    let key = luks_volume_key(&img, PASS);
    assert_same_bytes(
        &verify_py_plaintext(&img, &key)[..DATA as usize],
        &data,
        &format!("cryptsetup's key after a crash at {point}"),
    );
}

#[test]
fn a_crash_before_the_zone_write_resumes_after_restart_and_unlock() {
    let _serial = serial();
    crash_at("before_write");
}

#[test]
fn a_crash_in_the_middle_of_the_zone_write_resumes_after_restart_and_unlock() {
    let _serial = serial();
    crash_at("half_write");
}

#[test]
fn a_crash_after_the_zone_write_before_its_sync_resumes_after_restart_and_unlock() {
    let _serial = serial();
    crash_at("after_write");
}

#[test]
fn a_crash_after_the_zone_sync_before_its_commit_resumes_after_restart_and_unlock() {
    let _serial = serial();
    crash_at("after_sync");
}

#[test]
fn a_crash_right_after_a_zone_commit_resumes_after_restart_and_unlock() {
    let _serial = serial();
    crash_at("after_commit");
}

/// The negative control: with one zone's data write dropped (what a lost zone looks like after
/// a power cut without the sync), the same read-back check fails. So the checks above can fail.
/// Killed between the final header commit and the wipe of the old keyslots: the header names
/// the areas still to wipe (`nbdcrypt-wipe-pending`), and the next unlock wipes them and drops
/// the record; the data and the new key are intact.
#[test]
fn a_crash_between_the_final_commit_and_the_wipe_is_wiped_at_the_next_unlock() {
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, DATA, 4096, "pbkdf2", PASS);
    let data = random_bytes(41, DATA as usize);
    let mut d = daemon(
        tempdir(),
        &img,
        &[
            ("NBDCRYPT_TEST_REENCRYPT_ZONE", "4194304"),
            ("NBDCRYPT_TEST_REENCRYPT_ABORT", "0:before_wipe"),
        ],
    );
    assert_eq!(d.unlock(PASS).code(), Some(0), "unlock\n{}", d.log());
    write_export(&d.uri(), d.dir(), &data);
    let _ = start(&d, &[]);
    wait_exit(&mut d, Duration::from_secs(120));
    assert!(d.log().contains("at before_wipe"), "{}", d.log());
    drop(d);
    let dump = luks_dump(&img);
    assert!(
        dump.contains("nbdcrypt-wipe-pending") && !dump.contains("reencrypt"),
        "{dump}"
    );
    let mut d = daemon(tempdir(), &img, &[]);
    assert_eq!(d.unlock(PASS).code(), Some(0), "unlock\n{}", d.log());
    assert!(
        d.log().contains("wiped the old keyslot areas"),
        "{}",
        d.log()
    );
    assert_same_bytes(&read_export(&d.uri(), d.dir()), &data, "after the wipe");
    d.terminate(Duration::from_secs(15));
    assert!(!luks_dump(&img).contains("nbdcrypt-wipe-pending"));
}

#[test]
fn negative_control_a_lost_zone_is_caught_by_the_read_back_check() {
    let _serial = serial();
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, DATA, 4096, "pbkdf2", PASS);
    let data = random_bytes(13, DATA as usize);
    let mut d = daemon(
        tempdir(),
        &img,
        &[
            ("NBDCRYPT_TEST_REENCRYPT_ZONE", ZONE),
            ("NBDCRYPT_TEST_REENCRYPT_LOSE_ZONE", "3"),
        ],
    );
    assert_eq!(d.unlock(PASS).code(), Some(0));
    write_export(&d.uri(), d.dir(), &data);
    assert_eq!(start(&d, &[]).code(), Some(0));
    d.wait_reencrypt_finished(Duration::from_secs(120));
    let got = read_export(&d.uri(), d.dir());
    let first = first_difference(&got, &data).expect("a lost zone went unnoticed");
    let zone = ZONE.parse::<usize>().unwrap();
    assert_eq!(first / zone, 3, "the damage is not (only) the lost zone");
    assert!(
        first_difference(&got[4 * zone..], &data[4 * zone..]).is_none()
            && first_difference(&got[..3 * zone], &data[..3 * zone]).is_none(),
        "damage outside the lost zone"
    );
    d.terminate(Duration::from_secs(15));
}

const WRITER: &str = r#"
import os, random, struct
log = open(os.environ["LOG"], "a", buffering=1)
rnd = random.Random(int(os.environ["SEED"]))
bs = 4096
n = h.get_size() // bs
seq = int(os.environ["SEQ0"])
while True:
    i = rnd.randrange(n)
    seq += 1
    buf = struct.pack("<QQ", i, seq) * (bs // 16)
    log.write("try %d %d\n" % (i, seq))
    h.pwrite(buf, i * bs, nbd.CMD_FLAG_FUA)
    log.write("ack %d %d\n" % (i, seq))
"#;

fn block_of(i: u64, seq: u64) -> Vec<u8> {
    let mut one = [0u8; 16];
    one[..8].copy_from_slice(&i.to_le_bytes());
    one[8..].copy_from_slice(&seq.to_le_bytes());
    one.repeat(4096 / 16)
}

/// kill -9 at random moments while a client writes FUA blocks and the daemon re-encrypts
/// (several re-encryptions chained: each restart resumes the interrupted one, or starts the
/// next). After each restart + unlock every block reads back what was last acknowledged (or
/// the one write in flight at the kill), before and after the resumed re-encryption finishes.
#[test]
fn kill_9_at_random_moments_under_fua_writes_loses_no_acknowledged_write() {
    let _serial = serial();
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, DATA, 4096, "pbkdf2", PASS);
    let mut model: Vec<u8> = random_bytes(17, DATA as usize);
    let mut seq = 0u64;
    let mut rng = 0x5eed_u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut first = true;
    for trial in 0..4 {
        let mut d = daemon(tempdir(), &img, &[("NBDCRYPT_TEST_REENCRYPT_ZONE", ZONE)]);
        assert_eq!(
            d.unlock(PASS).code(),
            Some(0),
            "unlock {trial}\n{}",
            d.log()
        );
        if first {
            write_export(&d.uri(), d.dir(), &model);
            first = false;
        } else {
            assert_same_bytes(
                &read_export(&d.uri(), d.dir()),
                &model,
                &format!("after kill {trial}: the last acknowledged data"),
            );
        }
        let resumed = d.reencrypt_status()["state"] == "running";
        if !resumed {
            assert_eq!(
                start(&d, &["--max-rate", "8M"]).code(),
                Some(0),
                "{}",
                d.log()
            );
        } else {
            assert_eq!(
                d.ctl("reencrypt", &["--max-rate", "8M"]).code(),
                Some(0),
                "rate of the resumed one"
            );
        }
        let log = d.dir().join("writes.log");
        let mut w = tool("nbdsh");
        w.arg("-u")
            .arg(d.uri())
            .arg("-c")
            .arg(WRITER)
            .env("LOG", &log)
            .env("SEED", (trial + 1).to_string())
            .env("SEQ0", seq.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(d.dir().join("writer.err")).unwrap());
        let mut writer = w.spawn().unwrap();
        // The writer is running (python starts slowly on a busy machine), then a random moment.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("ack")
        {
            assert!(Instant::now() < deadline, "the writer never wrote");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300 + next() % 2500));
        let frontier = d.reencrypt_status()["done_bytes"].as_u64().unwrap_or(0);
        d.signal(libc::SIGKILL);
        wait_exit(&mut d, Duration::from_secs(10));
        let _ = writer.wait();
        // Apply what was acknowledged; the one write in flight may have landed or not.
        let (in_flight, acks, last) = apply_writes(&log, &mut model);
        seq = seq.max(last);
        assert!(
            acks > 0,
            "trial {trial}: the writer did nothing: {}",
            std::fs::read_to_string(d.dir().join("writer.err")).unwrap_or_default()
        );
        eprintln!("trial {trial}: killed at frontier {frontier}, {acks} acknowledged writes");
        drop(d);
        let mut d = daemon(tempdir(), &img, &[("NBDCRYPT_TEST_REENCRYPT_ZONE", ZONE)]);
        assert_eq!(
            d.unlock(PASS).code(),
            Some(0),
            "unlock after kill {trial}\n{}",
            d.log()
        );
        let mut got = read_export(&d.uri(), d.dir());
        if let Some((i, s)) = in_flight {
            let at = (i * 4096) as usize;
            if got[at..at + 4096] == block_of(i, s)[..] {
                model[at..at + 4096].copy_from_slice(&block_of(i, s));
            }
        }
        assert_same_bytes(&got, &model, &format!("right after kill {trial}"));
        if trial == 3 {
            d.wait_reencrypt_finished(Duration::from_secs(120));
            got = read_export(&d.uri(), d.dir());
            assert_same_bytes(&got, &model, "after the last re-encryption finished");
        }
        d.terminate(Duration::from_secs(15));
    }
}

/// The issue's "done" criterion: PostgreSQL (fsync on) on ext4 on the volume keeps running
/// pgbench through a full online re-encryption; every pgbench run succeeds, pg_amcheck is
/// clean, fsck is clean, and after a restart the database is served from the new key alone.
#[test]
fn postgres_keeps_running_pgbench_through_a_full_online_reencryption() {
    let _serial = serial();
    use db_stack::{fsck_clean, mkfs, sh, Stack, Volume, LONG};
    postgres::preflight();
    let vol = Volume::create("256M");
    let mut stack = Stack::attach(&vol);
    mkfs(stack.dev());
    stack.mount();
    let mut pg = postgres::Pg::init(&vol, &stack.data_mnt.join("pg"));
    pg.start();
    sh(pg.pgbench().args(["-i", "-s", "4", "-q", "postgres"]), LONG);
    let control = stack.daemon.as_ref().unwrap().dir().join("control.sock");
    let ctl = |args: &[&str]| {
        let mut v: Vec<&std::ffi::OsStr> = vec!["reencrypt".as_ref(), "--control".as_ref()];
        v.push(control.as_os_str());
        v.extend(args.iter().map(std::ffi::OsStr::new));
        nbdcryptctl(&v)
    };
    let key = vol.key.to_str().unwrap().to_owned();
    let out = ctl(&["--key-file", &key, "--max-rate", "24M"]);
    assert_eq!(out.code(), Some(0), "start\n{}", out.details());
    let t0 = Instant::now();
    let mut runs = 0;
    let mut txs = 0u64;
    loop {
        let r = ctl(&["--status"]).success().stdout;
        let done = r.starts_with("finished");
        assert!(!r.starts_with("failed"), "{r}");
        let out = sh(
            pg.pgbench()
                .args(["-n", "-c", "4", "-j", "2", "-T", "5", "postgres"]),
            LONG,
        );
        txs += out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|n| n.split('/').next()?.trim().parse::<u64>().ok())
            .unwrap_or(0);
        runs += 1;
        if done && runs >= 2 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(600), "not finished: {r}");
    }
    println!(
        "pgbench: {runs} runs, {txs} transactions during and after the online re-encryption \
         ({:.1?})",
        t0.elapsed()
    );
    assert!(txs > 0);
    let (am, ok) = pg.amcheck();
    assert!(ok, "{am}");
    pg.stop();
    let dev = stack.dev().to_owned();
    stack.mount.take().unwrap().unmount();
    fsck_clean(&dev);
    stack.shutdown();
    let dump = luks_dump(&vol.image);
    assert!(!dump.contains("reencrypt"), "{dump}");

    // Served again from disk (new key only): the database starts and checks clean.
    let mut stack = Stack::attach(&vol);
    stack.mount();
    pg.start();
    let (am, ok) = pg.amcheck();
    assert!(ok, "after restart: {am}");
    pg.stop();
    stack.shutdown();
}

/// Interop, ours → cryptsetup: an online re-encryption interrupted mid-zone (abort in the
/// middle of zone 2's write) is finished by `cryptsetup reencrypt --resume-only`, and
/// cryptsetup's key decrypts the image to the data.
#[test]
fn an_online_reencryption_killed_mid_zone_is_finished_by_cryptsetup_resume_only() {
    let _serial = serial();
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, DATA, 4096, "pbkdf2", PASS);
    let data = random_bytes(19, DATA as usize);
    let mut d = daemon(
        tempdir(),
        &img,
        &[
            ("NBDCRYPT_TEST_REENCRYPT_ZONE", ZONE),
            ("NBDCRYPT_TEST_REENCRYPT_ABORT", "2:half_write"),
        ],
    );
    assert_eq!(d.unlock(PASS).code(), Some(0));
    write_export(&d.uri(), d.dir(), &data);
    let _ = start(&d, &[]);
    wait_exit(&mut d, Duration::from_secs(60));
    drop(d);
    let k = key_file(dir.path());
    // cryptsetup's way after a crash: `repair` recovers the hot zone, then resume.
    let mut c = cryptsetup();
    c.args(["repair", "--batch-mode", "--key-file"])
        .arg(&k)
        .arg(&img);
    run(&mut c, TOOL_TIMEOUT).success();
    let mut c = cryptsetup();
    c.args([
        "reencrypt",
        "--resume-only",
        "--force-offline-reencrypt",
        "--batch-mode",
        "--key-file",
    ])
    .arg(&k)
    .arg(&img);
    run(&mut c, TOOL_TIMEOUT).success();
    assert_finished_and_cryptsetup_decrypts(
        &img,
        PASS,
        &data,
        "cryptsetup finished our interrupted online re-encryption",
    );
}

/// Interop, cryptsetup → ours: a re-encryption cryptsetup initialised (`reencrypt
/// --init-only`: new key, keyslot, reencrypt keyslot and digest, no data moved yet) is resumed
/// by nbdcryptd at unlock, served while it runs, and finished online.
#[test]
fn a_reencryption_cryptsetup_started_is_resumed_and_finished_online_by_the_daemon() {
    let _serial = serial();
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, DATA, 4096, "pbkdf2", PASS);
    let data = random_bytes(23, DATA as usize);
    {
        let d = daemon(tempdir(), &img, &[]);
        assert_eq!(d.unlock(PASS).code(), Some(0));
        write_export(&d.uri(), d.dir(), &data);
        assert_eq!(d.lock_idle().code(), Some(0));
        let mut d = d;
        d.terminate(Duration::from_secs(15));
    }
    let old_key = luks_volume_key(&img, PASS);
    let k = key_file(dir.path());
    let mut c = cryptsetup();
    c.args([
        "reencrypt",
        "--init-only",
        "--force-offline-reencrypt",
        "--batch-mode",
    ])
    .args(cheap_kdf("pbkdf2"))
    .arg("--key-file")
    .arg(&k)
    .arg(&img);
    run(&mut c, TOOL_TIMEOUT).success();
    assert!(luks_dump(&img).contains("reencrypt"));

    let mut d = daemon(tempdir(), &img, &[("NBDCRYPT_TEST_REENCRYPT_ZONE", ZONE)]);
    assert_eq!(d.unlock(PASS).code(), Some(0), "unlock\n{}", d.log());
    assert_same_bytes(
        &read_export(&d.uri(), d.dir()),
        &data,
        "served while resuming cryptsetup's re-encryption",
    );
    d.wait_reencrypt_finished(Duration::from_secs(120));
    assert_same_bytes(
        &read_export(&d.uri(), d.dir()),
        &data,
        "after finishing cryptsetup's re-encryption online",
    );
    assert_eq!(d.lock_idle().code(), Some(0));
    d.terminate(Duration::from_secs(15));
    let key = luks_volume_key(&img, PASS);
    assert_ne!(key, old_key);
    assert_same_bytes(
        &verify_py_plaintext(&img, &key)[..DATA as usize],
        &data,
        "cryptsetup's view after we finished its re-encryption",
    );
}

/// Apply the writer's log to `model`: acknowledged writes land; returns the one write in
/// flight (tried, not acknowledged), the number acknowledged, and the last sequence number.
fn apply_writes(log: &Path, model: &mut [u8]) -> (Option<(u64, u64)>, u64, u64) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let (mut in_flight, mut acks, mut last) = (None, 0, 0);
    for l in text.lines() {
        let f: Vec<u64> = l
            .split(' ')
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let [i, s] = f[..] else { continue };
        last = last.max(s);
        if l.starts_with("ack") {
            let at = (i * 4096) as usize;
            model[at..at + 4096].copy_from_slice(&block_of(i, s));
            in_flight = None;
            acks += 1;
        } else {
            in_flight = Some((i, s));
        }
    }
    (in_flight, acks, last)
}

/// The client of the power-cut trial: 4 KiB writes WITHOUT FUA (`w` tried, `a` acknowledged),
/// and every 1..24 writes a FLUSH (`fi` issued, `fa` acknowledged). Only what a flush covered
/// has to survive a power cut.
const FLUSH_WRITER: &str = r#"
import os, random, struct
log = open(os.environ["LOG"], "a", buffering=1)
rnd = random.Random(int(os.environ["SEED"]))
bs = 4096
n = h.get_size() // bs
seq = int(os.environ["SEQ0"])
while True:
    for _ in range(rnd.randrange(1, 24)):
        i = rnd.randrange(n)
        seq += 1
        buf = struct.pack("<QQ", i, seq) * (bs // 16)
        log.write("w %d %d\n" % (i, seq))
        h.pwrite(buf, i * bs)
        log.write("a %d %d\n" % (i, seq))
    log.write("fi 0 0\n")
    h.flush()
    log.write("fa 0 0\n")
"#;

/// What a power cut may leave in each 4 KiB block: the last flushed content (`durable`), or one
/// of the writes not covered by a completed flush (acknowledged after the flush was issued, or
/// never acknowledged).
struct FlushModel {
    durable: Vec<u8>,
    maybe: std::collections::BTreeMap<u64, Vec<u64>>,
    last_seq: u64,
    flushes: u64,
    writes: u64,
}

impl FlushModel {
    /// Applies a writer log to `durable` (the state before the writer ran).
    fn from_log(log: &Path, durable: Vec<u8>, last_seq: u64) -> FlushModel {
        let mut m = FlushModel {
            durable,
            maybe: Default::default(),
            last_seq,
            flushes: 0,
            writes: 0,
        };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        // Acknowledged, not covered by a flush yet; covered by the flush in flight; tried.
        let (mut acked, mut in_flush, mut tried) = (Vec::new(), Vec::new(), Vec::new());
        for l in text.lines() {
            let f: Vec<&str> = l.split(' ').collect();
            let [kind, i, s] = f[..] else { continue };
            let (Ok(i), Ok(s)) = (i.parse::<u64>(), s.parse::<u64>()) else {
                continue;
            };
            match kind {
                "w" => {
                    tried.push((i, s));
                    m.last_seq = m.last_seq.max(s);
                }
                "a" => {
                    tried.retain(|w| *w != (i, s));
                    acked.push((i, s));
                    m.writes += 1;
                }
                "fi" => in_flush.append(&mut acked),
                "fa" => {
                    for (i, s) in in_flush.drain(..) {
                        let at = (i * 4096) as usize;
                        m.durable[at..at + 4096].copy_from_slice(&block_of(i, s));
                        m.maybe.remove(&i);
                    }
                    m.flushes += 1;
                }
                _ => {}
            }
        }
        for (i, s) in in_flush.into_iter().chain(acked).chain(tried) {
            m.maybe.entry(i).or_default().push(s);
        }
        m
    }

    /// Checks what the volume reads back after the cut; on success returns it (now durable).
    fn check(&self, got: &[u8]) -> Result<Vec<u8>, String> {
        if got.len() != self.durable.len() {
            return Err(format!(
                "{} bytes read, {} expected",
                got.len(),
                self.durable.len()
            ));
        }
        let mut bad = Vec::new();
        for (b, (g, d)) in got
            .chunks_exact(4096)
            .zip(self.durable.chunks_exact(4096))
            .enumerate()
        {
            let b = b as u64;
            if g == d
                || self
                    .maybe
                    .get(&b)
                    .is_some_and(|ss| ss.iter().any(|&s| g == &block_of(b, s)[..]))
            {
                continue;
            }
            bad.push(b);
        }
        if bad.is_empty() {
            Ok(got.to_vec())
        } else {
            Err(format!(
                "{} blocks read back neither their last flushed content nor a later write: \
                 blocks {:?}{}",
                bad.len(),
                &bad[..bad.len().min(12)],
                if bad.len() > 12 { " ..." } else { "" }
            ))
        }
    }
}

/// How a trial of the power-cut test cuts.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// At a random moment (cut now, after a random delay).
    Now,
    /// Right after the k-th filesystem operation from now (writes, fsyncs: any of them may be
    /// one of the hot-zone commit's).
    AfterOps(u64),
    /// At a hot-zone commit point: the daemon stops dead there (test hook), then the power goes.
    At(&'static str),
    /// Negative control: zone 1's data write is dropped and its commit goes ahead (a lost zone).
    LoseZone,
}

/// Power cuts (tests/powercut: everything not fdatasync'd is thrown away) during an online
/// re-encryption while a client writes WITHOUT FUA and flushes at random points. Cuts at random
/// moments, after a random number of filesystem operations, and at each hot-zone commit point
/// (before the zone write, half-way, after the write, after its sync, after the commit); then
/// SIGKILL and a new daemon (unlocked at start) recovers the zone and resumes. Every block must
/// read back its last flushed content (under the old key, the new key or mid-zone) or a write
/// the last completed flush did not cover, right after the restart and when the re-encryption
/// has finished. The negative control (a zone whose data write is lost) must be caught by the
/// same check.
#[test]
fn power_cuts_during_online_reencryption_lose_no_acknowledged_write() {
    use nbdcrypt_tests::powercut_rig::{seed, trial_count, Rig, Rng};
    let _serial = serial();
    const FILE: u64 = 40 * MIB;
    let data_size = FILE - 16 * MIB;
    let rig = Rig::new(|b| luks_format_keyfile(b, FILE, 4096));
    let volume = rig.mnt.join("disk.img");
    let key = rig.backing.join("key");
    let start_daemon = |env: &[String]| {
        let dir = tempdir();
        let d = dir.path().to_owned();
        let mut args: Vec<OsString> = vec![format!("NBDCRYPT_TEST_REENCRYPT_ZONE={ZONE}").into()];
        args.extend(env.iter().map(OsString::from));
        args.extend([
            daemon_binary().into(),
            "--volume".into(),
            volume.clone().into(),
            "--unlock-key-file".into(),
            key.clone().into(),
            "--control".into(),
            d.join("control.sock").into(),
            "--unix".into(),
            d.join("nbd.sock").into(),
        ]);
        let daemon = Daemon::start_bin_in(Path::new("/usr/bin/env"), dir, args);
        let deadline = Instant::now() + Duration::from_secs(30);
        while daemon.ctl("status", &[]).stdout.lines().next() != Some("state        unlocked") {
            assert!(Instant::now() < deadline, "not unlocked\n{}", daemon.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    };
    let flush = |uri: &str| {
        let o = tool("nbdsh")
            .arg("-u")
            .arg(uri)
            .arg("-c")
            .arg("h.flush()")
            .output()
            .unwrap();
        assert!(o.status.success(), "flush: {o:?}");
    };
    let mut rng = Rng::new(seed());
    let mut plan: Vec<Cut> = (0..trial_count(3))
        .map(|i| {
            if i % 2 == 0 {
                Cut::Now
            } else {
                Cut::AfterOps(rng.range(1, 400))
            }
        })
        .collect();
    for p in [
        "before_write",
        "half_write",
        "after_write",
        "after_sync",
        "after_commit",
    ] {
        plan.push(Cut::At(p));
    }
    plan.push(Cut::LoseZone);
    let mut model = random_bytes(29, data_size as usize);
    let mut seq = 0u64;
    let mut pending_total = 0;
    let last = plan.len() - 1;
    for (trial, cut) in plan.into_iter().enumerate() {
        let env: Vec<String> = match cut {
            // Zone 4..7 of this process: late enough that the writer has flushed (2 MiB/s).
            Cut::At(p) => vec![format!(
                "NBDCRYPT_TEST_REENCRYPT_ABORT={}:{p}",
                rng.range(4, 8)
            )],
            Cut::LoseZone => vec!["NBDCRYPT_TEST_REENCRYPT_LOSE_ZONE=1".into()],
            _ => Vec::new(),
        };
        if matches!(cut, Cut::At(_) | Cut::LoseZone) {
            // The crash point counts zones of the next daemon: begin with a fresh re-encryption
            // (finish the one in progress first, unthrottled, without any test hook).
            let mut d = start_daemon(&[]);
            if d.reencrypt_status()["state"] == "running" {
                assert_eq!(d.ctl("reencrypt", &["--max-rate", "1G"]).code(), Some(0));
                d.wait_reencrypt_finished(Duration::from_secs(180));
            }
            d.terminate(Duration::from_secs(20));
        }
        let mut d = start_daemon(&env);
        if trial == 0 {
            write_export(&d.uri(), d.dir(), &model);
            flush(&d.uri());
        }
        let k = key.to_str().unwrap();
        let rate = if matches!(cut, Cut::At(_)) {
            "2M"
        } else {
            "6M"
        };
        if d.reencrypt_status()["state"] != "running" {
            let out = d.ctl("reencrypt", &["--key-file", k, "--max-rate", rate]);
            assert_eq!(out.code(), Some(0), "{}\n{}", out.details(), d.log());
        } else {
            assert_eq!(d.ctl("reencrypt", &["--max-rate", rate]).code(), Some(0));
        }
        let log = d.dir().join("writes.log");
        let mut writer = tool("nbdsh")
            .arg("-u")
            .arg(d.uri())
            .arg("-c")
            .arg(FLUSH_WRITER)
            .env("LOG", &log)
            .env("SEED", (trial + 100).to_string())
            .env("SEQ0", seq.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("fa")
        {
            if matches!(cut, Cut::At(_)) && d.wait_exit(Duration::ZERO).is_some() {
                break; // stopped at its crash point before the writer's first flush
            }
            assert!(Instant::now() < deadline, "the writer never flushed");
            std::thread::sleep(Duration::from_millis(20));
        }
        let frontier = match cut {
            Cut::Now => {
                std::thread::sleep(Duration::from_millis(rng.range(200, 2500)));
                let f = d.reencrypt_status()["done_bytes"].as_u64().unwrap_or(0);
                rig.fs().cut(None);
                f
            }
            Cut::AfterOps(k) => {
                let f = d.reencrypt_status()["done_bytes"].as_u64().unwrap_or(0);
                let from = rig.fs().status().ops;
                rig.fs().arm(k, None);
                let deadline = Instant::now() + Duration::from_secs(60);
                while rig.fs().status().powered {
                    assert!(Instant::now() < deadline, "the armed cut never fired");
                    std::thread::sleep(Duration::from_millis(10));
                }
                let kinds = rig.fs().control().op_kinds(from);
                eprintln!(
                    "power cut {trial}: after {k} operations, the last ones {:?}",
                    &kinds[kinds.len().saturating_sub(4)..]
                );
                f
            }
            Cut::At(p) => {
                wait_exit(&mut d, Duration::from_secs(60));
                assert!(
                    d.log().contains(&format!("at {p}")),
                    "did not stop at {p}\n{}",
                    d.log()
                );
                rig.fs().cut(None);
                0
            }
            Cut::LoseZone => {
                // Zone 1 lost and committed; cut once zone 2 is committed too.
                let deadline = Instant::now() + Duration::from_secs(60);
                let zone: u64 = ZONE.parse().unwrap();
                let f0 = d.reencrypt_status()["done_bytes"].as_u64().unwrap_or(0);
                while d.reencrypt_status()["done_bytes"].as_u64().unwrap_or(0) < f0 + 3 * zone
                    && d.reencrypt_status()["state"] == "running"
                {
                    assert!(Instant::now() < deadline, "no progress\n{}", d.log());
                    std::thread::sleep(Duration::from_millis(20));
                }
                assert!(
                    d.log().contains("dropping this zone's data write"),
                    "{}",
                    d.log()
                );
                rig.fs().cut(None);
                0
            }
        };
        let pending = rig.fs().status().pending_at_last_cut;
        pending_total += pending;
        if !matches!(cut, Cut::At(_)) {
            d.signal(libc::SIGKILL);
            wait_exit(&mut d, Duration::from_secs(20));
        }
        let _ = writer.kill();
        let _ = writer.wait();
        // (The log lives in the daemon's directory: read it before dropping the daemon.)
        let m = FlushModel::from_log(&log, model.clone(), seq);
        drop(d);
        rig.fs().power_on();
        seq = m.last_seq;
        eprintln!(
            "power cut {trial} ({cut:?}): frontier {frontier}, {} writes acknowledged, {} \
             flushes, {} blocks with unflushed writes, {pending} bytes pending at the cut",
            m.writes,
            m.flushes,
            m.maybe.len()
        );
        assert!(
            m.flushes > 0 || matches!(cut, Cut::At(_)),
            "no flush before the cut"
        );
        let mut d = start_daemon(&[]);
        let got = read_export(&d.uri(), d.dir());
        let checked = m.check(&got);
        if let Cut::LoseZone = cut {
            let e = checked.expect_err("negative control: a lost zone went unnoticed");
            eprintln!("negative control caught it: {e}");
            d.terminate(Duration::from_secs(20));
            break;
        }
        model = checked.unwrap_or_else(|e| panic!("right after power cut {trial} ({cut:?}): {e}"));
        // The read-back is durable now (it came from the disk after the power came back).
        if trial + 1 == last && d.reencrypt_status()["state"] == "running" {
            d.wait_reencrypt_finished(Duration::from_secs(180));
            assert_same_bytes(
                &read_export(&d.uri(), d.dir()),
                &model,
                "after the re-encryption finished",
            );
        }
        d.terminate(Duration::from_secs(20));
    }
    if pending_total == 0 {
        eprintln!("warning: no power cut found unsynced data to throw away in this run");
    }
}
