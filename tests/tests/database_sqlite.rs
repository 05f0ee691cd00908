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
use nbdcrypt_tests::{run, tempdir};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn sqlite3() -> Command {
    cmd("sqlite3", "sqlite3")
}

/// Run SQL on `db` with a fresh sqlite3 (`-bail`); its stdout, trimmed.
#[track_caller]
fn sql(db: &Path, script: &str) -> String {
    sh(
        sqlite3().args(["-batch", "-bail"]).arg(db).arg(script),
        LONG,
    )
    .stdout
    .trim()
    .to_owned()
}

/// One sqlite3 session committing rows of `trial` from `first_id` on (see [`Committer`]).
///
/// synchronous is per connection, so it is set in this session. Each INSERT is its own
/// (autocommit) transaction; `.bail on` stops the shell at the first error, and the following
/// `SELECT id` prints only after the INSERT statement finished, i.e. after its commit (WAL
/// append + fsync of the WAL, synchronous=FULL) returned. (Not INSERT … RETURNING: SQLite hands
/// out RETURNING rows before the statement, and so the autocommit, completes.)
fn start_client(db: &Path, trial: usize, first_id: i64, log: &Path) -> Committer {
    let mut shell = sqlite3();
    shell
        .args(["-batch"])
        .arg(db)
        .stderr(std::fs::File::create(log.with_extension("sqlite3-stderr")).unwrap());
    Committer::start(
        shell,
        ".bail on\nPRAGMA journal_mode;\nPRAGMA synchronous=FULL;\nPRAGMA synchronous;\n",
        &["wal", "2"],
        first_id,
        log,
        move |id| {
            format!("INSERT INTO t (id, trial, pad) VALUES ({id}, {trial}, randomblob(300));\nSELECT {id};\n")
        },
    )
}

const SCHEMA: &str = "PRAGMA journal_mode=WAL; CREATE TABLE t (id INTEGER PRIMARY KEY, trial INTEGER NOT NULL, pad BLOB NOT NULL);";

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
    assert_eq!(sql(&db, SCHEMA), "wal");

    let mut rows = Vec::new();
    for trial in 1..=trials {
        let first_id: i64 = sql(&db, "SELECT coalesce(max(id), 0) + 1 FROM t;")
            .parse()
            .unwrap();
        let kill_ms = rng.range(1000, 6001);
        let log = logs.join(format!("trial-{trial}.committed"));

        let (_, flushes_at_start) = stack.io_counters();
        let client = start_client(&db, trial, first_id, &log);
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
        let found: std::collections::HashSet<i64> =
            sql(&db, &format!("SELECT id FROM t WHERE trial = {trial};"))
                .lines()
                .map(|l| l.trim().parse().unwrap())
                .collect();
        let missing: Vec<i64> = acked
            .iter()
            .copied()
            .filter(|id| !found.contains(id))
            .collect();
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
        assert!(
            row.acked > 0,
            "trial {trial}: no commit was acknowledged before the kill; the trial proves nothing"
        );
        rows.push(row);
    }

    print_table(&rows, "integrity_check");
    let total: usize = rows.iter().map(|r| r.acked).sum();
    println!(
        "{trials} SQLite crash trials, {total} acknowledged commits, run time {:.1?}",
        t0.elapsed()
    );
    assert_trials(&rows);

    let dev = stack.dev().to_owned();
    stack.mount.take().unwrap().unmount();
    fsck_clean(&dev);
    stack.shutdown();
}

/// Negative control: the same trial over `nbdkit file` behind nbdkit's cache filter with
/// `cache=unsafe`, a server that answers FLUSH without persisting anything. Killing it must
/// lose acknowledged commits, and the trial must notice: if this test ever passes trivially
/// (nothing missing), the crash trials above have stopped being able to see lost writes (for
/// example a cache somewhere in the stack that survives the server).
#[test]
fn sqlite_crash_trial_catches_a_server_that_ignores_flush() {
    need("nbdkit", "nbdkit");
    need("sqlite3", "sqlite3");
    let dir = tempdir();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let image = dir.path().join("plain.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();

    // Set up over an honest nbdkit file, then serve through the lying cache.
    let mut stack = Stack::attach_nbdkit(dir.path(), &image, &[], &[]);
    mkfs(stack.dev());
    stack.mount();
    let db = stack.data_mnt.join("trials.db");
    assert_eq!(sql(&db, SCHEMA), "wal");
    stack.shutdown();
    let mut stack =
        Stack::attach_nbdkit(dir.path(), &image, &["--filter=cache"], &["cache=unsafe"]);
    stack.mount();

    let log = dir.path().join("control.committed");
    let client = start_client(&db, 1, 1, &log);
    std::thread::sleep(Duration::from_millis(2000));
    stack.kill_daemon();
    let fuse = stack.fuse.as_mut().unwrap();
    let acked = client.finish(|| fuse.kill());
    stack.crash_teardown();

    let mut stack = Stack::attach_nbdkit(dir.path(), &image, &[], &[]);
    let (fsck, _) = fsck_after_crash(stack.dev());
    stack.mount();
    let found = run(
        sqlite3()
            .args(["-batch"])
            .arg(&db)
            .arg("SELECT count(*) FROM t WHERE trial = 1;"),
        LONG,
    );
    let found: usize = found.stdout.trim().parse().unwrap_or(0);
    println!(
        "negative control (nbdkit cache=unsafe): {} commits acknowledged, {found} found, {} missing; fsck: {fsck}",
        acked.len(),
        acked.len().saturating_sub(found)
    );
    assert!(
        acked.len() > 10,
        "the control acknowledged only {} commits",
        acked.len()
    );
    assert!(
        found < acked.len(),
        "a server that ignores FLUSH lost nothing ({found} of {} acknowledged rows found): \
         the crash trials cannot see lost writes",
        acked.len()
    );
    stack.shutdown();
}
