//! The PostgreSQL rig shared by database_postgres.rs (kill -9 crash trials) and
//! powercut_postgres.rs (power-cut trials): Debian's PostgreSQL binaries, the `postgres` user,
//! one cluster on a mounted data directory, and a child killed on drop. Include it with
//! `#[path = "common/postgres.rs"] mod postgres;` after `mod db_stack;`.

#![allow(dead_code)]

use crate::db_stack::*;
use nbdcrypt_tests::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A PostgreSQL program from Debian's packages (highest version under /usr/lib/postgresql).
pub(crate) fn pg_bin(name: &str) -> PathBuf {
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
pub(crate) fn preflight() {
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
pub(crate) fn postgres_user() -> (u32, u32) {
    let user = nix::unistd::User::from_name("postgres")
        .expect("getpwnam(postgres) failed")
        .expect("user `postgres` does not exist (Debian package postgresql-common creates it)");
    (user.uid.as_raw(), user.gid.as_raw())
}

/// A PostgreSQL cluster whose data directory is on the test volume; the socket directory and
/// the server log live outside it (in the volume's temp dir), so the log survives a crash.
pub(crate) struct Pg {
    data: PathBuf,
    run_dir: PathBuf,
    log: PathBuf,
    uid: u32,
    gid: u32,
    postmaster: Option<Child>,
}

impl Pg {
    /// `initdb` DATA (created and chowned to postgres).
    pub(crate) fn init(vol: &Volume, data: &Path) -> Pg {
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

    pub(crate) fn as_postgres(&self, prog: &Path) -> Command {
        let mut c = Command::new(prog);
        c.uid(self.uid)
            .gid(self.gid)
            .current_dir("/")
            .env("LC_ALL", "C");
        c
    }

    pub(crate) fn server_log(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = s.lines().rev().take(40).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Start the postmaster and wait until it accepts connections (after crash recovery, if the
    /// last stop was a crash). Panics with the server log if it exits instead.
    pub(crate) fn start(&mut self) {
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
    pub(crate) fn pid(&self) -> i32 {
        self.postmaster.as_ref().expect("postgres not running").id() as i32
    }

    /// psql with the connection options; `-X -q -A -t -v ON_ERROR_STOP=1`.
    pub(crate) fn psql_cmd(&self) -> Command {
        let mut c = Command::new(pg_bin("psql"));
        c.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.run_dir)
            .args(["-U", "postgres", "-d", "postgres"]);
        c
    }

    #[track_caller]
    pub(crate) fn psql(&self, sql: &str) -> String {
        sh(self.psql_cmd().arg("-c").arg(sql), LONG)
            .stdout
            .trim()
            .to_owned()
    }

    pub(crate) fn pgbench(&self) -> Command {
        let mut c = Command::new(pg_bin("pgbench"));
        c.arg("-h").arg(&self.run_dir).args(["-U", "postgres"]);
        c
    }

    /// `pg_amcheck --all --install-missing --heapallindexed`: ("ok", true) or the complaint.
    pub(crate) fn amcheck(&self) -> (String, bool) {
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
    pub(crate) fn stop(&mut self) {
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
    pub(crate) fn kill9(&mut self, timeout: Duration) -> Vec<i32> {
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
pub(crate) struct KillOnDrop(pub(crate) Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
