//! SQLite (WAL mode, `PRAGMA synchronous=FULL`) on ext4 on an encrypted nbdcrypt volume
//! (nbdcryptd → nbdfuse → loop → ext4, see `common/db_stack.rs`): crash trials that `kill -9`
//! nbdcryptd while a client commits one row per transaction, then check that every commit the
//! client saw return is in the database and `PRAGMA integrity_check` says ok.
//!
//! The daemon's crash is what is tested: the volume file is on the host filesystem, whose page
//! cache survives the killed process (expected and fine); a write nbdcryptd acknowledged as
//! flushed but never handed to the kernel would show up here as a missing row.
//!
//! `NBDCRYPT_CRASH_TRIALS=N` runs N trials instead of 5; `NBDCRYPT_CRASH_SEED=S` repeats the kill
//! times of an earlier run.

#[path = "common/db_stack.rs"]
mod db_stack;

use db_stack::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn sqlite3() -> Command {
    cmd("sqlite3", "sqlite3")
}

/// Run SQL on `db` with a fresh sqlite3 (`-bail`); its stdout, trimmed.
#[track_caller]
fn sql(db: &Path, script: &str) -> String {
    sh(sqlite3().args(["-batch", "-bail"]).arg(db).arg(script), LONG).stdout.trim().to_owned()
}

#[test]
fn sqlite_wal_crash_trials_lose_no_acknowledged_commit() {
    for (t, p) in [
        ("sqlite3", "sqlite3"),
        ("nbdinfo", "libnbd-bin"),
        ("nbdfuse", "libnbd-bin"),
        ("losetup", "mount"),
        ("mount", "mount"),
        ("umount", "mount"),
        ("mkfs.ext4", "e2fsprogs"),
        ("fsck.ext4", "e2fsprogs"),
    ] {
        need(t, p);
    }
    let trials = trial_count(5);
    let mut rng = Rng::new(seed());
    let t0 = Instant::now();

    let vol = Volume::create("256M");
    let logs = vol.subdir("client-logs");
    let mut stack = Stack::attach(&vol);
    mkfs(stack.dev());
    stack.mount();
    let db = stack.data_mnt.join("trials.db");
    assert_eq!(
        sql(&db, "PRAGMA journal_mode=WAL; CREATE TABLE t (id INTEGER PRIMARY KEY, trial INTEGER NOT NULL, pad BLOB NOT NULL);"),
        "wal"
    );

    let mut rows = Vec::new();
    for trial in 1..=trials {
        let first_id: i64 = sql(&db, "SELECT coalesce(max(id), 0) + 1 FROM t;").parse().unwrap();
        let kill_ms = rng.range(1000, 6001);
        let log = logs.join(format!("trial-{trial}.committed"));

        // One sqlite3 session; synchronous is per connection, so it is set in this session.
        // Each INSERT is its own (autocommit) transaction; `.bail on` stops the shell at the
        // first error, and the following `SELECT id` prints only after the INSERT statement
        // finished, i.e. after its commit (WAL append + fsync of the WAL, synchronous=FULL)
        // returned. (Not INSERT … RETURNING: SQLite hands out RETURNING rows before the
        // statement, and so the autocommit, completes.)
        let mut shell = sqlite3();
        shell.args(["-batch"]).arg(&db).stderr(std::fs::File::create(log.with_extension("sqlite3-stderr")).unwrap());
        let (_, flushes_at_start) = stack.io_counters();
        let client = Committer::start(
            shell,
            ".bail on\nPRAGMA journal_mode;\nPRAGMA synchronous=FULL;\nPRAGMA synchronous;\n",
            &["wal", "2"],
            first_id,
            &log,
            move |id| format!("INSERT INTO t (id, trial, pad) VALUES ({id}, {trial}, randomblob(300));\nSELECT {id};\n"),
        );
        std::thread::sleep(Duration::from_millis(kill_ms));

        // Acks first, then the counter: every ack counted here had its FLUSH counted below.
        let acked_at_kill = client.acked();
        let flushes = stack.io_counters().1 - flushes_at_start;
        stack.kill_daemon();
        // Kill the client; abort the FUSE connection if it is stuck in I/O.
        let fuse = stack.fuse.as_mut().unwrap();
        let acked = client.finish(|| fuse.kill());
        stack.crash_teardown();

        // Recovery: a new daemon on the same volume file, unlocked again, attached again.
        stack = Stack::attach(&vol);
        let (fsck, fsck_ok) = fsck_after_crash(stack.dev());
        stack.mount();
        let integrity = sql(&db, "PRAGMA integrity_check;");
        let found: std::collections::HashSet<i64> = sql(&db, &format!("SELECT id FROM t WHERE trial = {trial};"))
            .lines()
            .map(|l| l.trim().parse().unwrap())
            .collect();
        let missing: Vec<i64> = acked.iter().copied().filter(|id| !found.contains(id)).collect();
        let row = TrialRow {
            trial,
            kill_ms,
            acked: acked.len(),
            acked_at_kill,
            flushes,
            found: found.len(),
            missing,
            fsck,
            fsck_ok,
            check_ok: integrity == "ok",
            check: integrity,
        };
        println!(
            "trial {trial}: kill after {kill_ms} ms; {flushes} FLUSHes; {} commits acknowledged ({} before the kill), {} found, {} missing; fsck: {}; integrity_check: {}",
            row.acked, row.acked_at_kill, row.found, row.missing.len(), row.fsck, row.check
        );
        assert!(row.acked > 0, "trial {trial}: no commit was acknowledged before the kill; the trial proves nothing");
        rows.push(row);
    }

    print_table(&rows, "integrity_check");
    let total: usize = rows.iter().map(|r| r.acked).sum();
    println!("{trials} SQLite crash trials, {total} acknowledged commits, run time {:.1?}", t0.elapsed());
    assert_trials(&rows);

    let dev = stack.dev().to_owned();
    stack.mount.take().unwrap().unmount();
    fsck_clean(&dev);
    stack.shutdown();
}
