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

use db_stack::{
    alive, children_of, fsck_after_crash, mkfs, need, print_table, sh, wait_gone, Committer, Fuse,
    LoopDev, Rng, Stack, TrialRow, Volume, LONG, SHORT,
};
use nbdcrypt_tests::powercut_rig::{nosync_daemon_binary, seed, trial_count};
use nbdcrypt_tests::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One PostgreSQL trial at a time: the machine has two cores.
static SERIAL: Mutex<()> = Mutex::new(());

// ---- PostgreSQL (as in database_postgres.rs) -------------------------------------------------

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

/// A child process killed on drop (pgbench background load).
struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
