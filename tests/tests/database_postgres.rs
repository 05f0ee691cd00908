//! PostgreSQL on ext4 on an encrypted nbdcrypt volume (nbdcryptd → nbdfuse → loop → ext4, see
//! `common/db_stack.rs`): a pgbench smoke test, and crash trials that `kill -9` nbdcryptd under a
//! committing workload and then check that no acknowledged COMMIT was lost.
//!
//! What the crash trials test: every write nbdcryptd acknowledged as flushed (FLUSH, FUA) must be
//! in the backing file when the daemon dies. The volume file lives on the host filesystem, whose
//! page cache survives the killed process; that is expected and fine here: a process crash of
//! the daemon is the failure under test, not a host power cut. Anything the daemon acknowledged
//! but had not yet handed to the kernel (buffered in the daemon, a write-behind queue, a reply
//! sent before the pwrite/fdatasync) would be lost, and that is what these trials would catch.
//!
//! PostgreSQL runs with fsync=on, synchronous_commit=on, full_page_writes=on as the `postgres`
//! user (initdb refuses root), from Debian's packages under /usr/lib/postgresql/*/bin.
//!
//! `NBDCRYPT_CRASH_TRIALS=N` runs N trials instead of 10; `NBDCRYPT_CRASH_SEED=S` repeats the
//! kill times of an earlier run.

#[path = "common/db_stack.rs"]
mod db_stack;
#[path = "common/postgres.rs"]
mod postgres;

use db_stack::*;
use nbdcrypt_tests::*;
use postgres::*;
use std::fs::File;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The tests of this file share the machine's two cores: run them one at a time so the TPS the
/// smoke test prints is not measured next to a crash trial.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// "tps = 123.45 (without initial connection time)" from pgbench's output.
fn parse_tps(out: &str) -> f64 {
    out.lines()
        .find(|l| l.starts_with("tps = ") && !l.contains("including"))
        .and_then(|l| l["tps = ".len()..].split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no tps line in pgbench output:\n{out}"))
}

#[test]
fn postgres_pgbench_smoke_on_an_encrypted_volume() {
    let _serial = serial();
    preflight();
    let t0 = Instant::now();
    let vol = Volume::create("512M");
    let mut stack = Stack::attach(&vol);
    mkfs(stack.dev());
    stack.mount();
    let mut pg = Pg::init(&vol, &stack.data_mnt.join("pg"));
    pg.start();
    assert_eq!(pg.psql("show fsync"), "on");
    assert_eq!(pg.psql("show synchronous_commit"), "on");
    assert_eq!(pg.psql("show full_page_writes"), "on");

    sh(pg.pgbench().args(["-i", "-s", "2", "-q", "postgres"]), LONG);
    let (_, flushes_before) = stack.io_counters();
    let out = sh(
        pg.pgbench()
            .args(["-c", "4", "-j", "2", "-T", "15", "postgres"]),
        LONG,
    );
    let (_, flushes_after) = stack.io_counters();
    let tps = parse_tps(&out.stdout);
    let txs: u64 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split('/').next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in pgbench output:\n{}", out.stdout));
    let flushes = flushes_after - flushes_before;
    println!(
        "pgbench -c 4 -T 15 (scale 2) on nbdcrypt (encrypted, {}): tps = {tps:.1}; {txs} transactions; {flushes} NBD FLUSHes reached nbdcryptd",
        daemon_binary().display()
    );
    assert!(tps > 0.0);
    // Every commit waits for an fdatasync of the WAL; with 4 clients one WAL flush covers at
    // most 4 commits (group commit). If fsync stopped anywhere above the daemon (a caching
    // layer that lies), the daemon would see far fewer FLUSH commands.
    assert!(
        flushes * 4 >= txs,
        "only {flushes} NBD FLUSHes for {txs} synchronous commits: some layer above nbdcryptd absorbs fsync"
    );
    let (am, am_ok) = pg.amcheck();
    assert!(am_ok, "{am}");

    pg.stop();
    drop(pg);
    let dev = stack.dev().to_owned();
    stack.mount.take().unwrap().unmount();
    fsck_clean(&dev);
    stack.shutdown();
    println!("smoke test took {:.1?}", t0.elapsed());
}

#[test]
fn postgres_crash_trials_lose_no_acknowledged_commit() {
    let _serial = serial();
    preflight();
    let trials = trial_count(10);
    let mut rng = Rng::new(seed());
    let t0 = Instant::now();

    let vol = Volume::create("512M");
    let logs = vol.subdir("client-logs");
    let mut stack = Stack::attach(&vol);
    mkfs(stack.dev());
    stack.mount();
    let mut pg = Pg::init(&vol, &stack.data_mnt.join("pg"));
    pg.start();
    pg.psql("CREATE TABLE t (id bigint PRIMARY KEY, trial int NOT NULL, pad text NOT NULL)");
    sh(pg.pgbench().args(["-i", "-s", "1", "-q", "postgres"]), LONG);

    let mut rows = Vec::new();
    for trial in 1..=trials {
        let first_id: i64 = pg
            .psql("SELECT coalesce(max(id), 0) + 1 FROM t")
            .parse()
            .unwrap();
        let kill_ms = rng.range(1000, 6001);

        // Background load: pgbench updates dirty data pages, so checkpoints and full-page
        // writes are in flight when the daemon dies, not only WAL appends.
        let noise = KillOnDrop(
            pg.pgbench()
                .args(["-n", "-c", "2", "-T", "60", "postgres"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn pgbench"),
        );
        let log = logs.join(format!("trial-{trial}.committed"));
        // The committing client: one psql session in autocommit, one INSERT per transaction.
        // psql prints the RETURNING row only after PQexec returned, i.e. after the server sent
        // ReadyForQuery, which follows the flushed commit record (synchronous_commit=on).
        let mut psql = pg.psql_cmd();
        psql.stderr(File::create(log.with_extension("psql-stderr")).unwrap());
        let (_, flushes_at_start) = stack.io_counters();
        let client = Committer::start(psql, "", &[], first_id, &log, move |id| {
            format!("INSERT INTO t (id, trial, pad) VALUES ({id}, {trial}, repeat('p', 200)) RETURNING id;\n")
        });
        std::thread::sleep(Duration::from_millis(kill_ms));

        // The crash.
        // Acks first, then the counter: every ack counted here had its FLUSH counted below.
        let acked_at_kill = client.acked();
        let flushes = stack.io_counters().1 - flushes_at_start;
        stack.kill_daemon();

        // Tear down: postgres is stuck on (or failing) I/O; kill it and its children, then
        // the layers below. If anything is still in uninterruptible I/O, aborting the FUSE
        // connection releases it.
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

        // Recovery: same volume file, a new daemon unlocked again, attached again.
        stack = Stack::attach(&vol);
        let (fsck, fsck_ok) = fsck_after_crash(stack.dev());
        stack.mount();
        pg.start(); // crash recovery must succeed
        let (amcheck, amcheck_ok) = pg.amcheck();
        let found: std::collections::HashSet<i64> = pg
            .psql(&format!("SELECT id FROM t WHERE trial = {trial}"))
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
            check: amcheck,
            check_ok: amcheck_ok,
        };
        println!(
            "trial {trial}: kill after {kill_ms} ms; {flushes} FLUSHes; {} commits acknowledged ({} before the kill), {} found, {} missing; fsck: {}; amcheck: {}",
            row.acked, row.acked_at_kill, row.found, row.missing.len(), row.fsck, row.check
        );
        assert!(
            row.acked > 0,
            "trial {trial}: no commit was acknowledged before the kill; the trial proves nothing"
        );
        rows.push(row);
    }

    print_table(&rows, "pg_amcheck");
    let total: usize = rows.iter().map(|r| r.acked).sum();
    println!(
        "{trials} crash trials, {total} acknowledged commits, run time {:.1?}",
        t0.elapsed()
    );
    assert_trials(&rows);

    pg.stop();
    drop(pg);
    let dev = stack.dev().to_owned();
    stack.mount.take().unwrap().unmount();
    fsck_clean(&dev);
    stack.shutdown();
}
