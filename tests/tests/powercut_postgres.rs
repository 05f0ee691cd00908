//! PostgreSQL across a power cut: PostgreSQL on ext4 on the encrypted volume (nbdcryptd →
//! nbdfuse → loop → ext4, `common/db_stack.rs`, as in database_postgres.rs), with nbdcryptd's
//! backing file on the power-cut filesystem (tests/powercut). A committing client inserts one row
//! per transaction while pgbench dirties pages; at a random moment the power is cut (some trials
//! torn), nbdcryptd killed, and everything above it torn down (the host's page cache of ext4 and
//! of the loop device goes with it, as in a real power loss). After the power comes back: a new
//! daemon, fsck, mount, PostgreSQL crash recovery; every commit the client saw acknowledged must
//! be there, and `pg_amcheck` must be clean.
//!
//! Negative control: the same trial served by nbdcryptd built with the test-only
//! `test-skip-fdatasync` feature (set-up and recovery by the real daemon) must lose commits.
//!
//! `NBDCRYPT_POWERCUT_TRIALS=N` runs N trials (default 2; the control runs min(N, 3), default 1).
//! Needs root, /dev/fuse, PostgreSQL, libnbd-bin (nbdfuse), e2fsprogs.

#[path = "common/db_stack.rs"]
mod db_stack;
#[path = "common/postgres.rs"]
mod postgres;

use db_stack::{
    fsck_after_crash, mkfs, print_table, sh, wait_gone, Committer, Fuse, LoopDev, Rng, Stack,
    TrialRow, Volume, LONG, SHORT,
};
use nbdcrypt_tests::powercut_rig::{nosync_daemon_binary, seed, trial_count};
use nbdcrypt_tests::*;
use postgres::*;
use std::ffi::OsString;
use std::fs::File;
use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One PostgreSQL trial at a time: the machine has two cores.
static SERIAL: Mutex<()> = Mutex::new(());

// ---- the power-cut trials --------------------------------------------------------------------

/// The volume of `Volume::create`, moved onto a power-cut filesystem mounted inside its temp dir.
struct CutVolume {
    vol: Volume,
    fs: Option<powercut::Mounted>,
}

impl CutVolume {
    fn create(size: &str) -> CutVolume {
        let mut vol = Volume::create(size);
        let backing = vol.subdir("powercut-backing");
        let mnt = vol.subdir("powercut-mnt");
        std::fs::rename(&vol.image, backing.join("volume.img")).unwrap();
        let fs = powercut::mount(&backing, &mnt)
            .expect("mount the power-cut filesystem (root, /dev/fuse)");
        vol.image = mnt.join("volume.img");
        CutVolume { vol, fs: Some(fs) }
    }
    fn fs(&self) -> &powercut::Mounted {
        self.fs.as_ref().unwrap()
    }
}

impl Drop for CutVolume {
    fn drop(&mut self) {
        if let Some(fs) = self.fs.take() {
            fs.unmount();
        }
    }
}

/// `Stack::attach` with a given nbdcryptd binary.
fn attach(vol: &Volume, bin: &Path) -> Stack {
    let dir = tempdir();
    let args: Vec<OsString> = vec![
        "--volume".into(),
        vol.image.clone().into(),
        "--unix".into(),
        dir.path().join("nbd.sock").into(),
        "--control".into(),
        dir.path().join("control.sock").into(),
        "--unlock-key-file".into(),
        vol.key.clone().into(),
    ];
    let d = Daemon::start_bin_in(bin, dir, args);
    let deadline = Instant::now() + SHORT;
    loop {
        let out = run(tool("nbdinfo").arg("--size").arg(d.uri()), SHORT);
        if out.ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "export not offered after unlock\n{}\n{}",
            out.details(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let fuse_mnt = vol.subdir("fuse");
    let data_mnt = vol.subdir("data");
    let fuse = Fuse::attach(&d.sock, &fuse_mnt, &vol.path().join("nbdfuse.log"));
    let lo = LoopDev::attach(&fuse.file());
    Stack {
        mount: None,
        lo: Some(lo),
        fuse: Some(fuse),
        daemon: Some(d),
        nbdkit: None,
        fuse_mnt,
        data_mnt,
    }
}

/// Runs `trials` power-cut trials with `bin` serving the load; recovery always by the real
/// daemon. Returns the rows (a failed recovery is a row with check_ok = false).
fn trials(name: &str, bin: &Path, trials: usize) -> Vec<TrialRow> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    preflight();
    let mut rng = Rng::new(seed());
    let t0 = Instant::now();
    let real = daemon_binary();

    let cv = CutVolume::create("256M");
    let vol = &cv.vol;
    let logs = vol.subdir("client-logs");
    let mut stack = attach(vol, &real);
    mkfs(stack.dev());
    stack.mount();
    let mut pg = Pg::init(vol, &stack.data_mnt.join("pg"));
    pg.start();
    pg.psql("CREATE TABLE t (id bigint PRIMARY KEY, trial int NOT NULL, pad text NOT NULL)");
    sh(pg.pgbench().args(["-i", "-s", "1", "-q", "postgres"]), LONG);
    // Set-up is durable (a clean stop syncs everything); the trials run on `bin`.
    pg.stop();
    let dev = stack.dev().to_owned();
    stack.mount.take().unwrap().unmount();
    let _ = dev;
    stack.shutdown();

    let mut rows = Vec::new();
    for trial in 1..=trials {
        let mut stack = attach(vol, bin);
        stack.mount();
        pg.start();
        let first_id: i64 = pg
            .psql("SELECT coalesce(max(id), 0) + 1 FROM t")
            .parse()
            .unwrap();
        let cut_ms = rng.range(1000, 5001);
        let tear = (trial % 2 == 0).then(|| rng.next());
        let noise = KillOnDrop(
            pg.pgbench()
                .args(["-n", "-c", "2", "-T", "60", "postgres"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn pgbench"),
        );
        let log = logs.join(format!("{name}-trial-{trial}.committed"));
        let mut psql = pg.psql_cmd();
        psql.stderr(File::create(log.with_extension("psql-stderr")).unwrap());
        let (_, flushes_at_start) = stack.io_counters();
        let client = Committer::start(psql, "", &[], first_id, &log, move |id| {
            format!("INSERT INTO t (id, trial, pad) VALUES ({id}, {trial}, repeat('p', 200)) RETURNING id;\n")
        });
        std::thread::sleep(Duration::from_millis(cut_ms));

        // The power cut: the disk loses what was not durable, the daemon dies with the machine.
        // Armed a few operations ahead, the cut lands right after a write or sync of the
        // daemon's (not in a quiet moment where everything happens to be flushed).
        cv.fs().arm(rng.range(1, 64), tear);
        let deadline = Instant::now() + Duration::from_secs(10);
        while cv.fs().status().powered && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if cv.fs().status().powered {
            cv.fs().cut(tear);
        }
        let pending = cv.fs().status().pending_at_last_cut;
        let acked_at_kill = client.acked();
        let flushes = stack.io_counters().1 - flushes_at_start;
        stack.kill_daemon();
        // Everything above goes too: postgres, ext4, the loop device, nbdfuse.
        let stuck = pg.kill9(Duration::from_secs(10));
        if !stuck.is_empty() {
            stack.fuse.as_mut().unwrap().kill();
            assert!(
                wait_gone(&stuck, SHORT),
                "postgres processes {stuck:?} survive SIGKILL and a FUSE abort"
            );
        }
        drop(noise);
        let fuse = stack.fuse.as_mut().unwrap();
        let acked = client.finish(|| fuse.kill());
        stack.crash_teardown();
        cv.fs().power_on();

        // Power back: the real daemon, fsck, mount, crash recovery.
        let mut stack = attach(vol, &real);
        let (fsck, fsck_ok) = fsck_after_crash(stack.dev());
        // A failed mount or crash recovery is a result (the negative control expects losses),
        // not a test failure by itself.
        let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            stack.mount();
            pg.start()
        }));
        let (check, check_ok, found) = if started.is_ok() {
            let (amcheck, ok) = pg.amcheck();
            let found: std::collections::HashSet<i64> = pg
                .psql(&format!("SELECT id FROM t WHERE trial = {trial}"))
                .lines()
                .map(|l| l.trim().parse().unwrap())
                .collect();
            (amcheck, ok, found)
        } else {
            (
                "crash recovery failed".to_string(),
                false,
                Default::default(),
            )
        };
        let missing: Vec<i64> = acked
            .iter()
            .copied()
            .filter(|id| !found.contains(id))
            .collect();
        let row = TrialRow {
            trial,
            kill_ms: cut_ms,
            acked: acked.len(),
            acked_at_kill,
            flushes,
            found: found.len(),
            missing,
            fsck,
            fsck_ok,
            check,
            check_ok,
        };
        println!(
            "{name} trial {trial}: cut after {cut_ms} ms{} with {pending} bytes pending; \
             {flushes} FLUSHes; {} commits acknowledged ({} before the cut), {} found, {} missing; \
             fsck: {}; amcheck: {}",
            if tear.is_some() { " (torn)" } else { "" },
            row.acked,
            row.acked_at_kill,
            row.found,
            row.missing.len(),
            row.fsck,
            row.check
        );
        assert!(
            row.acked > 0,
            "{name} trial {trial}: no commit was acknowledged before the cut; the trial proves nothing"
        );
        let failed = !row.ok();
        rows.push(row);
        if started.is_ok() {
            pg.stop();
        } else {
            let _ = pg.kill9(Duration::from_secs(10));
        }
        if let Some(m) = stack.mount.take() {
            m.unmount();
        }
        stack.shutdown();
        if failed {
            // A loss is shown (or a failure to report); later trials would start from it.
            break;
        }
    }
    print_table(&rows, "pg_amcheck");
    println!(
        "{name}: {} trials, run time {:.1?}",
        rows.len(),
        t0.elapsed()
    );
    rows
}

#[test]
fn postgres_loses_no_acknowledged_commit_across_power_cuts() {
    let rows = trials("powercut", &daemon_binary(), trial_count(2));
    db_stack::assert_trials(&rows);
}

#[test]
fn negative_control_postgres_on_a_daemon_without_fdatasync_loses_commits_across_a_power_cut() {
    let bin = nosync_daemon_binary();
    let rows = trials("nosync", &bin, trial_count(1).clamp(1, 3));
    let lost = rows
        .iter()
        .any(|r| !r.missing.is_empty() || !r.check_ok || !r.fsck_ok);
    assert!(
        lost,
        "negative control: PostgreSQL on a daemon without fdatasync lost nothing across a power cut"
    );
}
