//! Crash trials across an upstream restart: nbdcryptd serves a volume on an upstream NBD server
//! (nbdkit `file` on a Unix socket); a libnbd client writes 4 KiB blocks through our export and
//! FLUSHes every 8 writes; a write counts as acknowledged only once a FLUSH after it returned.
//! The upstream is killed with SIGKILL at a random moment and restarted on the same socket; our
//! daemon reconnects, and every acknowledged block must read back through it, byte for byte.
//!
//! nbdkit's file plugin writes with pwrite(2) and FLUSHes with fdatasync(2); the host's page
//! cache survives the killed process, so a killed nbdkit `file` loses nothing it acknowledged:
//! anything lost would be ours (a reply sent before the upstream answered, a FLUSH that did not
//! reach it, a reconnect that dropped queued writes).
//!
//! After the kill, writes that were in flight failed (EIO) and writes acknowledged but not yet
//! flushed may be gone with the upstream, so every later FLUSH fails until nbdcryptd restarts
//! (fail-stop): the client acknowledges nothing after the kill, and `acked` counts only what it
//! acknowledged before it.
//!
//! Negative controls (the checker must see the loss):
//! * the same trial over `nbdkit --filter=cache cache=unsafe file`, an upstream that answers
//!   FLUSH without writing anything back: its acknowledged blocks die with it, and the trial
//!   reports them missing;
//! * `cache=writeback` (honours FLUSH, holds unflushed writes in memory): writes acknowledged
//!   but not yet flushed are lost when it is killed while idle, and the FLUSH after our
//!   reconnect must fail (EIO) instead of covering data that is gone.
//!
//! `NBDCRYPT_CRASH_TRIALS=N` runs N trials instead of 3; `NBDCRYPT_CRASH_SEED=S` repeats the
//! kill times of an earlier run.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbdcrypt_tests::*;

/// 16 MiB of header + 48 MiB of data (12288 blocks of 4 KiB).
const SIZE: u64 = 64 * MIB;
const BLOCKS: u64 = 12 * 1024;

/// nbdkit on a Unix socket, restartable; killed on drop.
struct Kit {
    child: Option<Child>,
    sock: PathBuf,
    argv: Vec<OsString>,
    log: PathBuf,
}

impl Kit {
    fn start(dir: &Path, args: &[&OsStr]) -> Kit {
        let sock = dir.join("up.sock");
        let mut argv: Vec<OsString> = vec!["-f".into(), "-U".into(), sock.clone().into()];
        argv.extend(args.iter().map(|a| a.to_os_string()));
        let mut k = Kit {
            child: None,
            sock,
            argv,
            log: dir.join("nbdkit.log"),
        };
        k.restart();
        k
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    fn restart(&mut self) {
        let _ = std::fs::remove_file(&self.sock);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            tool("nbdkit")
                .args(&self.argv)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("nbdkit"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&self.sock).is_err() {
            assert!(Instant::now() < deadline, "nbdkit never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: the crash under test.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Kit {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn serve(uri: &str, key: &Path) -> Daemon {
    let dir = tempdir();
    let p = |n: &str| OsString::from(dir.path().join(n));
    let args = vec![
        "--volume".into(),
        uri.into(),
        "--unlock-key-file".into(),
        key.as_os_str().to_owned(),
        "--control".into(),
        p("control.sock"),
        "--unix".into(),
        p("nbd.sock"),
    ];
    let d = Daemon::start_in(dir, args);
    // The NBD socket listens first; wait for the control socket and the unlock.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.ctl("status", &[]).ok()
        || !run(tool("nbdinfo").arg("--size").arg(d.uri()), TOOL_TIMEOUT).ok()
    {
        assert!(Instant::now() < deadline, "daemon not serving\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    d
}

fn status(d: &Daemon) -> String {
    d.ctl("status", &[]).success().stdout
}

/// Waits until all the upstream connections are back (`want` of them).
fn wait_reconnected(d: &Daemon, want: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = status(d);
        if st.contains(&format!(" {want} connected")) {
            return st;
        }
        assert!(Instant::now() < deadline, "never reconnected: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The contents of block `i` in trial `salt`: 16-byte records, 256 of them.
const BLOCK_PY: &str = r#"
import nbd, struct, sys, time, os
def block(salt, i):
    return struct.pack(">4sIQ", b"NBCT", salt, i) * 256
"#;

/// Writes blocks 0, 1, 2, … for `secs` seconds; FLUSH after every 8 writes; prints
/// `acked I J …` after each FLUSH that returned, `error ERRNO WHAT` after each failure, and
/// keeps going (the upstream comes back) until the time is up.
const WRITER_PY: &str = r#"
uri, salt, nblocks, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
h = nbd.NBD()
h.connect_uri(uri)
end = time.monotonic() + secs
pending = []
i = 0
while time.monotonic() < end and i < nblocks:
    try:
        h.pwrite(block(salt, i), i * 4096)
        pending.append(i)
        i += 1
        if len(pending) >= 8:
            h.flush()
            print("acked", *pending, flush=True)
            pending = []
    except nbd.Error as e:
        print("error", e.errnum, e.string.replace("\n", " ")[:200], flush=True)
        pending = []
        i += 1
        time.sleep(0.02)
print("done", i, flush=True)
"#;

/// Reads the blocks listed in the file argv[3] and prints `missing N FIRST…`.
const CHECK_PY: &str = r#"
uri, salt, listfile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
h = nbd.NBD()
h.connect_uri(uri)
ids = [int(x) for x in open(listfile).read().split()]
bad = [i for i in ids if h.pread(4096, i * 4096) != block(salt, i)]
print("missing", len(bad), *bad[:10])
"#;

fn py(code: &str, args: &[&str]) -> Command {
    let mut c = Command::new("/usr/bin/python3");
    c.arg("-c").arg(format!("{BLOCK_PY}\n{code}")).args(args);
    c
}

struct Trial {
    acked: Vec<u64>,
    acked_at_kill: usize,
    errors: usize,
    written: u64,
    missing: usize,
    first_missing: String,
    status_after: String,
}

/// One trial: a fresh volume on `nbdkit [filters] file IMG` (formatted through a plain nbdkit
/// first, so the header is on disk), served by nbdcryptd, written by the libnbd client; the
/// upstream is killed after `kill_ms` and restarted after `down_ms`.
fn trial(filters: &[&str], params: &[&str], salt: u32, kill_ms: u64, down_ms: u64) -> Trial {
    let dir = tempdir();
    let img = dir.path().join("up.img");
    File::create(&img).unwrap().set_len(SIZE).unwrap();
    let key = {
        let k = Kit::start(dir.path(), &[OsStr::new("file"), img.as_os_str()]);
        format_upstream(dir.path(), &k.uri(), 0x4b45)
    };
    let mut args: Vec<&OsStr> = filters.iter().map(OsStr::new).collect();
    args.extend([OsStr::new("file"), img.as_os_str()]);
    args.extend(params.iter().map(OsStr::new));
    let mut kit = Kit::start(dir.path(), &args);
    let mut d = serve(&kit.uri(), &key);
    let conns = if status(&d).contains(" 4 connected") {
        4
    } else {
        1
    };

    let out_path = dir.path().join("writer.out");
    let mut writer = py(
        WRITER_PY,
        &[&d.uri(), &salt.to_string(), &BLOCKS.to_string(), "4"],
    )
    .stdin(Stdio::null())
    .stdout(File::create(&out_path).unwrap())
    .stderr(File::create(dir.path().join("writer.err")).unwrap())
    .spawn()
    .expect("python3 with python3-libnbd");
    let acked_now = || -> usize {
        std::fs::read_to_string(&out_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("acked "))
            .map(|l| l.split_whitespace().count() - 1)
            .sum()
    };
    // The kill lands part-way through the writer's run, whatever the machine's speed: at
    // `kill_ms` or once the writer has acknowledged the share of the blocks `kill_ms` stands for
    // (500..2500 ms -> 10..90 %), whichever comes first. (A fixed time alone missed on a quiet
    // machine: the writer had finished before it.)
    let share = (kill_ms.clamp(500, 2500) - 500) * 80 / 2000 + 10;
    let target = usize::try_from(BLOCKS * share / 100).unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(kill_ms) && acked_now() < target {
        if writer.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let acked_at_kill = acked_now();
    kit.kill9();
    std::thread::sleep(Duration::from_millis(down_ms));
    kit.restart();
    let st = writer.wait().unwrap();
    let out = std::fs::read_to_string(&out_path).unwrap();
    assert!(
        st.success(),
        "writer failed: {st}\n{out}\n{}",
        std::fs::read_to_string(dir.path().join("writer.err")).unwrap_or_default()
    );
    let status_after = wait_reconnected(&d, conns);
    d.assert_alive();

    let mut acked = Vec::new();
    let mut errors = 0;
    let mut written = 0;
    for l in out.lines() {
        let mut w = l.split_whitespace();
        match w.next() {
            Some("acked") => acked.extend(w.map(|x| x.parse::<u64>().unwrap())),
            Some("error") => errors += 1,
            Some("done") => written = w.next().unwrap().parse().unwrap(),
            _ => {}
        }
    }
    // Through the same daemon, over the reconnected upstream.
    let list = dir.path().join("acked.txt");
    std::fs::write(
        &list,
        acked
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" "),
    )
    .unwrap();
    let check = run(
        &mut py(
            CHECK_PY,
            &[&d.uri(), &salt.to_string(), list.to_str().unwrap()],
        ),
        TOOL_TIMEOUT,
    )
    .success()
    .stdout;
    let mut w = check.split_whitespace();
    assert_eq!(w.next(), Some("missing"), "{check}");
    let missing: usize = w.next().unwrap().parse().unwrap();
    let first_missing = w.collect::<Vec<_>>().join(" ");
    Trial {
        acked,
        acked_at_kill,
        errors,
        written,
        missing,
        first_missing,
        status_after,
    }
}

fn seed() -> u64 {
    let s = std::env::var("NBDCRYPT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
                .into()
        });
    println!("crash seed: {s} (NBDCRYPT_CRASH_SEED={s} repeats the kill times)");
    s
}

/// xorshift64*, uniform in [lo, hi).
fn next(state: &mut u64, lo: u64, hi: u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    lo + state.wrapping_mul(0x2545_F491_4F6C_DD1D) % (hi - lo)
}

#[test]
fn acknowledged_writes_survive_an_upstream_killed_and_restarted_while_we_serve() {
    let trials: u64 = std::env::var("NBDCRYPT_CRASH_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mut rng = seed().wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bad = Vec::new();
    println!(
        "{:>5} {:>8} {:>7} {:>8} {:>10} {:>8} {:>7} {:>7}",
        "trial", "kill@ms", "down ms", "written", "acked@kill", "acked", "errors", "missing"
    );
    for t in 1..=trials {
        let (kill_ms, down_ms) = (next(&mut rng, 500, 2500), next(&mut rng, 0, 500));
        let r = trial(&[], &[], t as u32, kill_ms, down_ms);
        println!(
            "{t:>5} {kill_ms:>8} {down_ms:>7} {:>8} {:>10} {:>8} {:>7} {:>7}",
            r.written,
            r.acked_at_kill,
            r.acked.len(),
            r.errors,
            r.missing
        );
        assert!(
            r.acked_at_kill > 0,
            "trial {t}: nothing acknowledged before the kill; the trial proves nothing"
        );
        assert!(
            r.errors > 0,
            "trial {t}: the client never saw the upstream go away; the kill missed"
        );
        assert!(
            r.status_after.contains("reconnects") && !r.status_after.contains(" 0 reconnects"),
            "trial {t}: {}",
            r.status_after
        );
        if r.missing > 0 {
            bad.push(format!(
                "trial {t}: {} of {} acknowledged blocks lost (first {})",
                r.missing,
                r.acked.len(),
                r.first_missing
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn negative_control_an_upstream_that_ignores_flush_loses_acknowledged_writes_and_the_check_sees_it()
{
    let r = trial(&["--filter=cache"], &["cache=unsafe"], 77, 1500, 100);
    println!(
        "cache=unsafe: {} written, {} acknowledged ({} before the kill), {} missing",
        r.written,
        r.acked.len(),
        r.acked_at_kill,
        r.missing
    );
    assert!(r.acked_at_kill > 0, "nothing acknowledged before the kill");
    assert!(
        r.missing > 0,
        "the upstream dropped every write it held in its cache, yet the check found all {} \
         acknowledged blocks: the check is blind",
        r.acked.len()
    );
}

#[test]
fn a_flush_after_losing_unflushed_writes_with_the_upstream_fails_instead_of_covering_them() {
    // cache=writeback: writes sit in nbdkit's memory until a FLUSH; killed while idle (no
    // request in flight), so nothing fails until the client's next FLUSH.
    let dir = tempdir();
    let img = dir.path().join("up.img");
    File::create(&img).unwrap().set_len(SIZE).unwrap();
    let key = {
        let k = Kit::start(dir.path(), &[OsStr::new("file"), img.as_os_str()]);
        format_upstream(dir.path(), &k.uri(), 0x4b45)
    };
    let mut kit = Kit::start(
        dir.path(),
        &[
            OsStr::new("--filter=cache"),
            OsStr::new("file"),
            img.as_os_str(),
            OsStr::new("cache=writeback"),
        ],
    );
    let mut d = serve(&kit.uri(), &key);
    let conns = if status(&d).contains(" 4 connected") {
        4
    } else {
        1
    };
    let hold = dir.path().join("go");
    let script = "uri, hold = sys.argv[1], sys.argv[2]\n\
         h = nbd.NBD(); h.connect_uri(uri)\n\
         for i in range(16): h.pwrite(block(5, i), i * 4096)\n\
         h.flush()\n\
         for i in range(16, 32): h.pwrite(block(5, i), i * 4096)\n\
         print('written', flush=True)\n\
         t = time.monotonic()\n\
         while not os.path.exists(hold) and time.monotonic() < t + 60: time.sleep(0.02)\n\
         try:\n\
         \x20   h.flush(); print('flush ok')\n\
         except nbd.Error as e:\n\
         \x20   print('flush failed', e.errnum)\n\
         print('flushed-ok', sum(h.pread(4096, i * 4096) == block(5, i) for i in range(16)))\n\
         print('unflushed-ok', sum(h.pread(4096, i * 4096) == block(5, i) for i in range(16, 32)))\n";
    let out_path = dir.path().join("client.out");
    let mut client = py(script, &[&d.uri(), hold.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .spawn()
        .expect("python3 with python3-libnbd");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&out_path)
        .unwrap_or_default()
        .contains("written")
    {
        assert!(Instant::now() < deadline, "the client never wrote");
        std::thread::sleep(Duration::from_millis(20));
    }
    kit.kill9();
    kit.restart();
    wait_reconnected(&d, conns);
    File::create(&hold).unwrap();
    assert!(client.wait().unwrap().success());
    let out = std::fs::read_to_string(&out_path).unwrap();
    let st = status(&d);
    println!("{out}{st}");
    // The loss is real: the unflushed blocks are gone with nbdkit's cache; the flushed ones
    // are there. So a successful FLUSH now would have covered data that no longer exists.
    assert!(out.contains("flushed-ok 16"), "{out}");
    assert!(!out.contains("unflushed-ok 16"), "nothing was lost: {out}");
    assert!(
        out.contains(&format!("flush failed {}", libc::EIO)),
        "the FLUSH after the reconnect did not fail with EIO: {out}"
    );
    assert!(st.contains("FLUSH refused until restart"), "{st}");
    assert!(
        d.log()
            .contains("acknowledged write(s) were not yet flushed"),
        "{}",
        d.log()
    );
    d.assert_alive();
}
