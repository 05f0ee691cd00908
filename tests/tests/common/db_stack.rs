//! The storage stack the database tests run on, one guard per layer:
//!
//! ```text
//! nbdcryptd (LUKS2 volume file, unlocked with a key file)      Daemon (harness)
//!   → nbdfuse -C 1 (FUSE file MNT/nbd; fsync → NBD FLUSH)       Fuse
//!   → losetup --direct-io=on (a real block device)             LoopDev
//!   → ext4 (-b 4096, data=ordered, barriers on)                Mount
//! ```
//!
//! Every guard undoes its layer on drop, also while a test is panicking, so a failed assertion
//! never leaks a loop device or a FUSE mount into later tests. [`Stack::crash_teardown`] is the
//! order for a stack whose daemon was killed: kill the users of the filesystem, lazy-unmount it,
//! detach the loop device, abort the FUSE connection.
//!
//! Caching: nbdfuse does not enable FUSE's writeback cache (libfuse leaves it off unless asked),
//! and the loop device opens MNT/nbd with O_DIRECT (`--direct-io=on`, checked below), so every
//! write the loop device completes has been answered by the NBD server. The loop device has a
//! volatile write cache and no FUA (`queue/write_cache` = "write back"), so ext4's barriers and
//! PostgreSQL's fdatasync reach the loop device as cache flushes, which it turns into fsync of
//! MNT/nbd, which nbdfuse turns into NBD FLUSH. `-C 1`: one NBD connection, so the FLUSH
//! travels on the same connection as the writes it covers (nbdcryptd advertises CAN_MULTI_CONN
//! too; `NBDCRYPT_NBDFUSE_CONNECTIONS=4` runs the same trials over four connections).
//! The tests also check this end to end: the daemon's FLUSH counter must grow by at least one
//! per acknowledged commit, and a server that ignores FLUSH (nbdkit `cache=unsafe`, the
//! negative control in database_sqlite.rs) must make the trial report lost commits.

#![allow(dead_code)]

use nbdcrypt_tests::*;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const SHORT: Duration = Duration::from_secs(30);
pub const LONG: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------------
// Tools

/// Path of a required tool (searched in $PATH, then /usr/sbin and /sbin); fails the test naming
/// the tool and its Debian package when it is missing.
pub fn need(name: &str, package: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "required tool `{name}` is not installed (Debian package {package}); \
             ./scripts/test.sh installs every tool the tests need"
            )
        })
}

pub fn cmd(name: &str, package: &str) -> Command {
    Command::new(need(name, package))
}

/// `nbdcryptctl`, built next to `nbdcryptd`.
pub fn ctl_binary() -> PathBuf {
    let p = daemon_binary().with_file_name("nbdcryptctl");
    assert!(
        p.is_file(),
        "nbdcryptctl not found at {} (cargo build --workspace --bins)",
        p.display()
    );
    p
}

/// Run and require exit 0.
#[track_caller]
pub fn sh(c: &mut Command, timeout: Duration) -> Out {
    run(c, timeout).success()
}

/// Processes whose parent is `pid` (from /proc).
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...; comm may contain spaces and parentheses.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let ppid = after
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<i32>().ok());
        if ppid == Some(pid) {
            v.push(p);
        }
    }
    v
}

pub fn alive(pid: i32) -> bool {
    // A zombie still has /proc/PID; treat it as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// Wait until none of `pids` is alive; false on timeout.
pub fn wait_gone(pids: &[i32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while pids.iter().any(|&p| alive(p)) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Small deterministic PRNG (no rand crate): xorshift64*.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// Seed from $NBDCRYPT_CRASH_SEED or the clock; printed so a run can be repeated.
pub fn seed() -> u64 {
    let s = std::env::var("NBDCRYPT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("crash seed: {s} (NBDCRYPT_CRASH_SEED={s} repeats the kill times)");
    s
}

// ---------------------------------------------------------------------------------------------
// Volume and daemon

/// A LUKS2 volume file and its key file in a temporary directory (world-traversable, so a
/// database running as another user can reach mount points inside it).
pub struct Volume {
    pub dir: TempDir,
    pub image: PathBuf,
    pub key: PathBuf,
}

impl Volume {
    /// `nbdcryptctl format IMG --size SIZE` with a random 64-byte key file (cheap PBKDF2).
    pub fn create(size: &str) -> Volume {
        let dir = tempdir();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let image = dir.path().join("volume.img");
        let key = dir.path().join("volume.key");
        let mut k = [0u8; 64];
        File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut k))
            .unwrap();
        std::fs::write(&key, k).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        sh(
            Command::new(ctl_binary())
                .arg("format")
                .arg(&image)
                .args(["--size", size, "--key-file"])
                .arg(&key)
                .args([
                    "--pbkdf",
                    "pbkdf2",
                    "--pbkdf-force-iterations",
                    "1000",
                    "--yes",
                ]),
            SHORT,
        );
        Volume { dir, image, key }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A directory inside the volume's temp dir (created, mode 0755).
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// Start nbdcryptd on this volume, unlocked with the key file, and wait until the export is
    /// offered (the daemon listens before the unlock finishes).
    pub fn serve(&self) -> Daemon {
        let img = self.image.to_str().unwrap();
        let key = self.key.to_str().unwrap();
        let d = Daemon::start(&[
            "--volume",
            img,
            "--unix",
            "{dir}/nbd.sock",
            "--control",
            "{dir}/control.sock",
            "--unlock-key-file",
            key,
        ]);
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
        d
    }
}

// ---------------------------------------------------------------------------------------------
// Layers

/// `nbdfuse -C 1 MNT --unix SOCK`: MNT/nbd is the export. Drop: lazy unmount, kill, reap.
pub struct Fuse {
    child: Option<Child>,
    pub mnt: PathBuf,
    log: PathBuf,
}

fn is_mountpoint(p: &Path) -> bool {
    let p = p.to_str().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(p)))
        .unwrap_or(false)
}

/// NBD connections per nbdfuse: 1, or $NBDCRYPT_NBDFUSE_CONNECTIONS (e.g. 4, to run the trials
/// with multi-conn: writes and FLUSHes spread over several connections, which nbdcryptd's
/// CAN_MULTI_CONN promises to handle as one).
pub fn fuse_connections() -> u32 {
    std::env::var("NBDCRYPT_NBDFUSE_CONNECTIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

impl Fuse {
    pub fn attach(sock: &Path, mnt: &Path, log: &Path) -> Fuse {
        std::fs::create_dir_all(mnt).unwrap();
        let child = cmd("nbdfuse", "libnbd-bin")
            .args(["-C", &fuse_connections().to_string()])
            .arg(mnt)
            .arg("--unix")
            .arg(sock)
            .stdin(Stdio::null())
            .stdout(File::create(log).unwrap())
            .stderr(File::options().append(true).open(log).unwrap())
            .spawn()
            .expect("spawn nbdfuse");
        let mut f = Fuse {
            child: Some(child),
            mnt: mnt.to_owned(),
            log: log.to_owned(),
        };
        let deadline = Instant::now() + SHORT;
        while !(is_mountpoint(mnt) && f.file().metadata().map(|m| m.len() > 0).unwrap_or(false)) {
            if let Some(st) = f.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "nbdfuse exited with {st} before mounting\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nbdfuse did not mount {} within {SHORT:?}",
                mnt.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        f
    }

    pub fn file(&self) -> PathBuf {
        self.mnt.join("nbd")
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Abort the FUSE connection now (kill nbdfuse: pending and later requests fail with
    /// ENOTCONN instead of hanging).
    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        if is_mountpoint(&self.mnt) {
            // Clean detach first (lets nbdfuse flush and disconnect); lazy if still busy.
            let ok = Command::new("umount")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `losetup -f --show --direct-io=on FILE`; Drop: `losetup -d`.
pub struct LoopDev {
    pub dev: String,
}

impl LoopDev {
    pub fn attach(file: &Path) -> LoopDev {
        let out = sh(
            cmd("losetup", "mount")
                .args(["-f", "--show", "--direct-io=on"])
                .arg(file),
            SHORT,
        );
        let lo = LoopDev {
            dev: out.stdout.trim().to_owned(),
        };
        assert!(
            lo.dev.starts_with("/dev/loop"),
            "losetup printed {:?}",
            out.stdout
        );
        let name = lo.dev.trim_start_matches("/dev/");
        let dio =
            std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).unwrap_or_default();
        assert_eq!(dio.trim(), "1", "{} is not in direct-I/O mode: the page cache of the FUSE file would sit between ext4 and the NBD server", lo.dev);
        lo
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&self.dev)
            .stderr(Stdio::null())
            .status();
    }
}

/// An ext4 mount; Drop: `umount`, lazily if busy.
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    #[allow(clippy::self_named_constructors)] // reads as what it does at call sites: `Mount::mount(dev, dir)`
    pub fn mount(dev: &str, dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        // Defaults: data=ordered, barriers on; errors=remount-ro is ext4's default behaviour.
        sh(
            cmd("mount", "mount").args(["-t", "ext4", dev]).arg(dir),
            SHORT,
        );
        Mount {
            dir: dir.to_owned(),
        }
    }

    pub fn lazy_unmount(self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        std::mem::forget(self);
    }

    pub fn unmount(self) {
        sh(cmd("umount", "mount").arg(&self.dir), SHORT);
        std::mem::forget(self);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// `mkfs.ext4 -q -b 4096 DEV`
pub fn mkfs(dev: &str) {
    sh(
        cmd("mkfs.ext4", "e2fsprogs").args(["-q", "-F", "-b", "4096", dev]),
        SHORT,
    );
}

/// After a crash: replay the journal (`e2fsck -E journal_only -y`), then a full read-only check
/// (`e2fsck -fn`). Returns ("clean" or a description, ok).
pub fn fsck_after_crash(dev: &str) -> (String, bool) {
    let replay = run(
        cmd("fsck.ext4", "e2fsprogs").args(["-E", "journal_only", "-y", dev]),
        LONG,
    );
    if !matches!(replay.code(), Some(0 | 1)) {
        return (
            format!(
                "journal replay exit {:?}: {}",
                replay.code(),
                replay.details()
            ),
            false,
        );
    }
    let replayed = replay.stdout.contains("recovering journal")
        || replay.stderr.contains("recovering journal");
    let check = run(cmd("fsck.ext4", "e2fsprogs").args(["-f", "-n", dev]), LONG);
    match check.code() {
        Some(0) => (
            if replayed {
                "clean (journal replayed)".into()
            } else {
                "clean".into()
            },
            true,
        ),
        c => (
            format!("e2fsck -fn exit {c:?}:\n{}", check.details()),
            false,
        ),
    }
}

/// `e2fsck -fn DEV` must exit 0.
pub fn fsck_clean(dev: &str) {
    sh(cmd("fsck.ext4", "e2fsprogs").args(["-f", "-n", dev]), LONG);
}

/// nbdcryptd → nbdfuse → loop → ext4, torn down in reverse on drop (field order).
pub struct Stack {
    pub mount: Option<Mount>,
    pub lo: Option<LoopDev>,
    pub fuse: Option<Fuse>,
    pub daemon: Option<Daemon>,
    /// Instead of nbdcryptd: nbdkit (the negative control).
    pub nbdkit: Option<NbdKit>,
    pub fuse_mnt: PathBuf,
    pub data_mnt: PathBuf,
}

/// `nbdkit -f -U SOCK [FILTERS] file IMAGE [PARAMS]`; Drop: kill, reap, remove the socket
/// (nbdkit leaves it behind).
pub struct NbdKit {
    child: Child,
    pub sock: PathBuf,
}

impl NbdKit {
    pub fn start(dir: &Path, image: &Path, filters: &[&str], params: &[&str]) -> NbdKit {
        let sock = dir.join("nbdkit.sock");
        let _ = std::fs::remove_file(&sock);
        let child = cmd("nbdkit", "nbdkit")
            .arg("-f")
            .arg("-U")
            .arg(&sock)
            .args(filters)
            .arg("file")
            .arg(image)
            .args(params)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(dir.join("nbdkit.log")).unwrap())
            .spawn()
            .expect("spawn nbdkit");
        let mut k = NbdKit { child, sock };
        let uri = format!("nbd+unix:///?socket={}", k.sock.display());
        let deadline = Instant::now() + SHORT;
        while !run(tool("nbdinfo").arg("--size").arg(&uri), SHORT).ok() {
            if let Some(st) = k.child.try_wait().unwrap() {
                panic!(
                    "nbdkit exited {st}: {}",
                    std::fs::read_to_string(dir.join("nbdkit.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nbdkit not serving within {SHORT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        k
    }
}

impl Drop for NbdKit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

impl Stack {
    /// Serve the volume and attach it as a loop device (no filesystem mounted yet).
    pub fn attach(vol: &Volume) -> Stack {
        let daemon = vol.serve();
        let fuse_mnt = vol.subdir("fuse");
        let data_mnt = vol.subdir("data");
        let fuse = Fuse::attach(&daemon.sock, &fuse_mnt, &vol.path().join("nbdfuse.log"));
        let lo = LoopDev::attach(&fuse.file());
        Stack {
            mount: None,
            lo: Some(lo),
            fuse: Some(fuse),
            daemon: Some(daemon),
            nbdkit: None,
            fuse_mnt,
            data_mnt,
        }
    }

    /// The same stack over `nbdkit file IMAGE` (plain) in `dir`, with extra filters/params.
    pub fn attach_nbdkit(dir: &Path, image: &Path, filters: &[&str], params: &[&str]) -> Stack {
        let sub = |n: &str| {
            let p = dir.join(n);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        let (fuse_mnt, data_mnt) = (sub("fuse"), sub("data"));
        let kit = NbdKit::start(dir, image, filters, params);
        let fuse = Fuse::attach(&kit.sock, &fuse_mnt, &dir.join("nbdfuse.log"));
        let lo = LoopDev::attach(&fuse.file());
        Stack {
            mount: None,
            lo: Some(lo),
            fuse: Some(fuse),
            daemon: None,
            nbdkit: Some(kit),
            fuse_mnt,
            data_mnt,
        }
    }

    pub fn dev(&self) -> &str {
        &self.lo.as_ref().unwrap().dev
    }

    pub fn mount(&mut self) {
        let m = Mount::mount(&self.lo.as_ref().unwrap().dev, &self.data_mnt);
        std::fs::set_permissions(&m.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        self.mount = Some(m);
    }

    /// The daemon's I/O counters (`nbdcryptctl status --json`): (writes, flushes).
    pub fn io_counters(&self) -> (u64, u64) {
        let d = self.daemon.as_ref().unwrap();
        let out = sh(
            Command::new(ctl_binary())
                .args(["status", "--json", "--control"])
                .arg(d.dir().join("control.sock")),
            SHORT,
        );
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        (
            v["writes"].as_u64().unwrap(),
            v["flushes"].as_u64().unwrap(),
        )
    }

    /// `kill -9` nbdcryptd: the crash under test.
    pub fn kill_daemon(&mut self) {
        if let Some(k) = self.nbdkit.as_mut() {
            let _ = k.child.kill();
            let _ = k.child.wait();
            return;
        }
        let d = self.daemon.as_mut().unwrap();
        d.signal(libc::SIGKILL);
        assert!(d.wait_exit(SHORT).is_some(), "nbdcryptd survived SIGKILL");
    }

    /// After the daemon was killed and the filesystem's users were killed: lazy-unmount ext4,
    /// detach the loop device, abort the FUSE connection, forget the dead daemon.
    pub fn crash_teardown(&mut self) {
        if let Some(m) = self.mount.take() {
            m.lazy_unmount();
        }
        drop(self.lo.take());
        if let Some(mut f) = self.fuse.take() {
            f.kill();
            drop(f);
        }
        drop(self.daemon.take());
        drop(self.nbdkit.take());
    }

    /// Orderly stop: unmount, detach, disconnect, SIGTERM the daemon (must exit 0).
    pub fn shutdown(mut self) {
        if let Some(m) = self.mount.take() {
            m.unmount();
        }
        drop(self.lo.take());
        drop(self.fuse.take());
        if let Some(mut d) = self.daemon.take() {
            let st = d.terminate(SHORT);
            assert!(
                st.success(),
                "nbdcryptd exited {st} on SIGTERM\n{}",
                d.log()
            );
        }
        drop(self.nbdkit.take());
    }
}

// ---------------------------------------------------------------------------------------------
// The committing client

/// Drives a database shell (psql, sqlite3) over its stdin/stdout, one transaction at a time:
/// sends `stmt(id)` for id = first, first+1, …, and waits for the shell to print `id` on a line
/// of its own, which it does only once the transaction's COMMIT returned. Only then is the id
/// appended to the client-side log `log` and counted as acknowledged. Ends when the shell
/// exits or prints anything else (an error: the storage went away).
pub struct Committer {
    child: Child,
    thread: Option<std::thread::JoinHandle<Result<Vec<i64>, String>>>,
    acked: Arc<AtomicUsize>,
}

impl Committer {
    /// `preamble` is sent first; the shell must answer it with exactly the lines `expect`.
    pub fn start(
        mut cmd: Command,
        preamble: &str,
        expect: &[&str],
        first_id: i64,
        log: &Path,
        stmt: impl Fn(i64) -> String + Send + 'static,
    ) -> Committer {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the database shell");
        let mut stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        stdin.write_all(preamble.as_bytes()).unwrap();
        stdin.flush().unwrap();
        for want in expect {
            let got = lines
                .next()
                .map(|l| l.unwrap_or_default())
                .unwrap_or_default();
            assert_eq!(got.trim(), *want, "database shell's answer to {preamble:?}");
        }
        let acked = Arc::new(AtomicUsize::new(0));
        let counter = acked.clone();
        let mut log = File::create(log).unwrap();
        let thread = std::thread::spawn(move || {
            let mut ids = Vec::new();
            for id in first_id.. {
                if stdin
                    .write_all(stmt(id).as_bytes())
                    .and_then(|()| stdin.flush())
                    .is_err()
                {
                    break;
                }
                let line = match lines.next() {
                    Some(Ok(l)) => l,
                    _ => break, // the shell exited: the database went away
                };
                match line.trim().parse::<i64>() {
                    Ok(got) if got == id => {}
                    Ok(_) => {
                        return Err(format!(
                            "the shell answered {line:?} to the insert of id {id}"
                        ))
                    }
                    Err(_) => break, // an error message
                }
                // COMMIT returned: now, and only now, the id counts as acknowledged.
                writeln!(log, "{id}").unwrap();
                ids.push(id);
                counter.fetch_add(1, Ordering::SeqCst);
            }
            Ok(ids)
        });
        Committer {
            child,
            thread: Some(thread),
            acked,
        }
    }

    pub fn acked(&self) -> usize {
        self.acked.load(Ordering::SeqCst)
    }

    /// Kill the shell (its database is gone or going) and return the acknowledged ids. If the
    /// shell is still stuck (in I/O) after 10 s, `unstick` runs (abort the FUSE connection).
    pub fn finish(mut self, unstick: impl FnOnce()) -> Vec<i64> {
        let _ = self.child.kill();
        let t = self.thread.take().unwrap();
        let mut unstick = Some(unstick);
        let start = Instant::now();
        while !(t.is_finished() && self.child.try_wait().ok().flatten().is_some()) {
            if start.elapsed() > Duration::from_secs(10) {
                if let Some(f) = unstick.take() {
                    f();
                }
            }
            assert!(
                start.elapsed() < SHORT + Duration::from_secs(10),
                "the database shell did not end after SIGKILL and a FUSE abort"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        t.join()
            .unwrap()
            .unwrap_or_else(|e| panic!("committer: {e}"))
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One crash trial's outcome.
pub struct TrialRow {
    pub trial: usize,
    pub kill_ms: u64,
    pub acked: usize,
    pub acked_at_kill: usize,
    /// NBD FLUSH commands the daemon served in this trial before the kill.
    pub flushes: u64,
    pub found: usize,
    pub missing: Vec<i64>,
    pub fsck: String,
    pub fsck_ok: bool,
    pub check: String,
    pub check_ok: bool,
}

impl TrialRow {
    /// No acknowledged id missing, fsck and the database's check clean, and at least one FLUSH
    /// per acknowledged commit (each commit waited for its own fsync, which must have reached
    /// the daemon; fewer would mean a layer above it absorbs fsync).
    pub fn ok(&self) -> bool {
        self.missing.is_empty()
            && self.fsck_ok
            && self.check_ok
            && self.flushes >= self.acked_at_kill as u64
    }
}

/// Print the trial table; `check` names the database's own consistency check column.
pub fn print_table(rows: &[TrialRow], check: &str) {
    println!();
    println!(
        "{:>5} {:>8} {:>8} {:>10} {:>8} {:>8} {:>7}  {:<26} {}",
        "trial", "kill@ms", "flushes", "acked@kill", "acked", "found", "missing", "fsck", check
    );
    for r in rows {
        println!(
            "{:>5} {:>8} {:>8} {:>10} {:>8} {:>8} {:>7}  {:<26} {}",
            r.trial,
            r.kill_ms,
            r.flushes,
            r.acked_at_kill,
            r.acked,
            r.found,
            r.missing.len(),
            r.fsck.lines().next().unwrap_or(""),
            r.check.lines().next().unwrap_or("")
        );
    }
    println!();
}

/// Fail with every violation if any trial lost an acknowledged commit or left an inconsistency.
pub fn assert_trials(rows: &[TrialRow]) {
    let bad: Vec<String> = rows
        .iter()
        .filter(|r| !r.ok())
        .map(|r| {
            format!(
                "trial {}: {} of {} acknowledged ids missing (first {:?}); {} FLUSHes for {} acks; fsck: {}; check: {}",
                r.trial,
                r.missing.len(),
                r.acked,
                &r.missing[..r.missing.len().min(20)],
                r.flushes,
                r.acked_at_kill,
                r.fsck,
                r.check
            )
        })
        .collect();
    assert!(bad.is_empty(), "durability violations:\n{}", bad.join("\n"));
}

/// Trials to run: $NBDCRYPT_CRASH_TRIALS or `default`.
pub fn trial_count(default: usize) -> usize {
    std::env::var("NBDCRYPT_CRASH_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
