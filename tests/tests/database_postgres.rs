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

use db_stack::*;
use nbdcrypt_tests::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The tests of this file share the machine's two cores: run them one at a time so the TPS the
/// smoke test prints is not measured next to a crash trial.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A PostgreSQL program from Debian's packages (highest version under /usr/lib/postgresql).
fn pg_bin(name: &str) -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let p = e.path().join("bin").join(name);
            p.is_file().then_some((v, p))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).unwrap_or_else(|| {
        let pkg = match name {
            "psql" | "pg_isready" | "pg_amcheck" => "postgresql-client-15",
            _ => "postgresql-15 (postgresql)",
        };
        panic!(
            "required PostgreSQL program `{name}` not found under /usr/lib/postgresql/*/bin \
             (Debian package {pkg}); ./scripts/test.sh installs it"
        )
    })
}

/// Every external program these tests use, checked up front so a missing one fails the test
/// with its name.
fn preflight() {
    for (t, p) in [
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
    for b in [
        "initdb",
        "postgres",
        "pg_isready",
        "psql",
        "pgbench",
        "pg_amcheck",
    ] {
        pg_bin(b);
    }
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: nbdfuse cannot mount"
    );
}

/// uid and gid of the `postgres` user (created by Debian's postgresql-common).
fn postgres_user() -> (u32, u32) {
    let user = nix::unistd::User::from_name("postgres")
        .expect("getpwnam(postgres) failed")
        .expect("user `postgres` does not exist (Debian package postgresql-common creates it)");
    (user.uid.as_raw(), user.gid.as_raw())
}

/// A PostgreSQL cluster whose data directory is on the test volume; the socket directory and
/// the server log live outside it (in the volume's temp dir), so the log survives a crash.
struct Pg {
    data: PathBuf,
    run_dir: PathBuf,
    log: PathBuf,
    uid: u32,
    gid: u32,
    postmaster: Option<Child>,
}

impl Pg {
    /// `initdb` DATA (created and chowned to postgres).
    fn init(vol: &Volume, data: &Path) -> Pg {
        let (uid, gid) = postgres_user();
        let run_dir = vol.subdir("pgrun");
        std::os::unix::fs::chown(&run_dir, Some(uid), Some(gid)).unwrap();
        std::fs::create_dir_all(data).unwrap();
        std::os::unix::fs::chown(data, Some(uid), Some(gid)).unwrap();
        let pg = Pg {
            data: data.to_owned(),
            log: run_dir.join("postgres.log"),
            run_dir,
            uid,
            gid,
            postmaster: None,
        };
        let mut c = pg.as_postgres(&pg_bin("initdb"));
        c.arg("-D").arg(data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-instructions",
        ]);
        sh(&mut c, LONG);
        pg
    }

    fn as_postgres(&self, prog: &Path) -> Command {
        let mut c = Command::new(prog);
        c.uid(self.uid)
            .gid(self.gid)
            .current_dir("/")
            .env("LC_ALL", "C");
        c
    }

    fn server_log(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = s.lines().rev().take(40).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Start the postmaster and wait until it accepts connections (after crash recovery, if the
    /// last stop was a crash). Panics with the server log if it exits instead.
    fn start(&mut self) {
        assert!(self.postmaster.is_none());
        let sock = format!("unix_socket_directories={}", self.run_dir.display());
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut c = self.as_postgres(&pg_bin("postgres"));
        c.arg("-D").arg(&self.data);
        for setting in [
            "listen_addresses=",
            &sock,
            "fsync=on",
            "synchronous_commit=on",
            "full_page_writes=on",
            // Small WAL budget: checkpoints (data file writes + fsyncs) happen during the trials.
            "max_wal_size=32MB",
            "min_wal_size=32MB",
            "checkpoint_timeout=30s",
            "shared_buffers=32MB",
            "log_checkpoints=on",
        ] {
            c.arg("-c").arg(setting);
        }
        c.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.postmaster = Some(c.spawn().expect("spawn postgres"));
        let deadline = Instant::now() + LONG;
        loop {
            if let Some(st) = self.postmaster.as_mut().unwrap().try_wait().unwrap() {
                self.postmaster = None;
                panic!(
                    "postgres exited with {st} during startup\n---- server log ----\n{}",
                    self.server_log()
                );
            }
            let out = run(
                Command::new(pg_bin("pg_isready"))
                    .arg("-h")
                    .arg(&self.run_dir)
                    .args(["-U", "postgres", "-t", "2"]),
                SHORT,
            );
            if out.ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres not ready within {LONG:?}\n{}",
                self.server_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    #[allow(dead_code)]
    fn pid(&self) -> i32 {
        self.postmaster.as_ref().expect("postgres not running").id() as i32
    }

    /// psql with the connection options; `-X -q -A -t -v ON_ERROR_STOP=1`.
    fn psql_cmd(&self) -> Command {
        let mut c = Command::new(pg_bin("psql"));
        c.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.run_dir)
            .args(["-U", "postgres", "-d", "postgres"]);
        c
    }

    #[track_caller]
    fn psql(&self, sql: &str) -> String {
        sh(self.psql_cmd().arg("-c").arg(sql), LONG)
            .stdout
            .trim()
            .to_owned()
    }

    fn pgbench(&self) -> Command {
        let mut c = Command::new(pg_bin("pgbench"));
        c.arg("-h").arg(&self.run_dir).args(["-U", "postgres"]);
        c
    }

    /// `pg_amcheck --all --install-missing --heapallindexed`: ("ok", true) or the complaint.
    fn amcheck(&self) -> (String, bool) {
        let out = run(
            Command::new(pg_bin("pg_amcheck"))
                .arg("-h")
                .arg(&self.run_dir)
                .args([
                    "-U",
                    "postgres",
                    "--all",
                    "--install-missing",
                    "--heapallindexed",
                ]),
            LONG,
        );
        if out.ok() && out.stdout.trim().is_empty() {
            ("ok".into(), true)
        } else {
            (
                format!("pg_amcheck exit {:?}:\n{}", out.code(), out.details()),
                false,
            )
        }
    }

    /// Fast shutdown (SIGINT); must exit 0.
    fn stop(&mut self) {
        let mut pm = self.postmaster.take().expect("postgres not running");
        let _ = kill(Pid::from_raw(pm.id() as i32), Signal::SIGINT);
        let deadline = Instant::now() + LONG;
        let st = loop {
            if let Some(st) = pm.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                self.postmaster = Some(pm);
                panic!(
                    "postgres did not stop within {LONG:?}\n{}",
                    self.server_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            st.success(),
            "postgres exited {st} on fast shutdown\n{}",
            self.server_log()
        );
    }

    /// `kill -9` the postmaster and all its children; returns those still alive after `timeout`.
    fn kill9(&mut self, timeout: Duration) -> Vec<i32> {
        let Some(mut pm) = self.postmaster.take() else {
            return vec![];
        };
        let root = pm.id() as i32;
        let mut pids = children_of(root);
        let _ = kill(Pid::from_raw(root), Signal::SIGKILL);
        // Children forked in the meantime: collect again (orphans keep their pids).
        pids.extend(children_of(root));
        for &p in &pids {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        let _ = pm.wait();
        wait_gone(&pids, timeout);
        pids.into_iter().filter(|&p| alive(p)).collect()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if self.postmaster.is_some() && !self.kill9(Duration::from_secs(20)).is_empty() {
            eprintln!("warning: postgres processes still alive after SIGKILL");
        }
        if std::thread::panicking() {
            eprintln!(
                "---- postgres log (tail) ----\n{}\n---- end ----",
                self.server_log()
            );
        }
    }
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

/// A child process killed on drop (pgbench background load).
struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
