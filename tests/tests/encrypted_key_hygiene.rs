//! Key hygiene, seen from outside: with debug logging on, the daemon's log never contains the
//! passphrase (right or wrong) or the volume key in any common rendering, and the process cannot
//! leave a core file (RLIMIT_CORE is 0).

use nbdcrypt_tests::*;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DATA: u64 = 4 * MIB;
const PASS: &str = "hygiene-Passphrase-7f3c9e";
const WRONG: &str = "hygiene-Wrong-Guess-51b2aa";

fn hex_to_bytes(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect()
}

/// Renderings of `secret` (the volume key) a careless log line could contain.
fn renderings(key: &[u8]) -> Vec<String> {
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut v = vec![hex.clone(), hex.to_uppercase()];
    // Each XTS half (data key, tweak key) on its own, and the first 8 bytes (a truncated dump).
    v.push(hex[..64].to_owned());
    v.push(hex[64..].to_owned());
    v.push(hex[..16].to_owned());
    v.push(hex[..16].to_uppercase());
    // `{:?}` of a byte slice, and space-separated hex as luksDump prints it.
    v.push(format!("{:?}", &key[..8]).trim_end_matches(']').to_owned());
    v.push(
        key[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    v.push(
        key[..8]
            .iter()
            .map(|b| format!("{b:#04x}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    v
}

#[track_caller]
fn assert_log_clean(what: &str, log: &str, secrets: &[String]) {
    for s in secrets {
        assert!(
            !log.contains(s.as_str()),
            "{what} contains the secret rendering {s:?}:\n{log}"
        );
    }
}

/// `nbdcryptctl unlock --stdin` with `line` written to its standard input.
fn unlock_stdin(d: &Daemon, line: &str) -> (Option<i32>, String) {
    let mut child = Command::new(ctl_binary())
        .args(["unlock", "--stdin", "--control"])
        .arg(d.control())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{line}\n").as_bytes())
        .unwrap();
    let deadline = Instant::now() + CTL_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("nbdcryptctl unlock --stdin did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn max_core_limits(pid: i32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap_or_else(|| panic!("no core line in /proc/{pid}/limits:\n{limits}"))
        .to_owned()
}

#[track_caller]
fn assert_no_core_dumps(pid: i32) {
    let line = max_core_limits(pid);
    let fields: Vec<&str> = line["Max core file size".len()..]
        .split_whitespace()
        .collect();
    assert_eq!(
        &fields[..2],
        ["0", "0"],
        "soft and hard RLIMIT_CORE must be 0: {line:?}"
    );
}

fn volume(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("volume.img");
    luks_format(&img, DATA, 4096, "argon2id", PASS.as_bytes());
    img
}

#[test]
fn a_debug_log_of_unlock_io_and_lock_contains_neither_the_passphrase_nor_the_volume_key_and_core_dumps_are_off(
) {
    let dir = tempdir();
    let img = volume(dir.path());
    let key = hex_to_bytes(&luks_volume_key(&img, PASS.as_bytes()));
    assert_eq!(key.len(), 64);
    let mut d = Daemon::volume_in(dir, &img, &["--log-level", "debug"]);
    assert_no_core_dumps(d.pid());

    assert_eq!(
        d.unlock(WRONG.as_bytes()).code(),
        Some(3),
        "wrong passphrase"
    );
    let out = d.unlock(PASS.as_bytes());
    assert_eq!(out.code(), Some(0), "unlock\n{}", out.details());
    assert_no_core_dumps(d.pid());
    let data = random_bytes(99, DATA as usize);
    write_export(&d.uri(), d.dir(), &data);
    assert_same_bytes(&read_export(&d.uri(), d.dir()), &data, "read back");
    assert_eq!(d.lock_idle().code(), Some(0), "lock");
    d.wait_state("locked", Duration::from_secs(10));

    // The other input path: the passphrase as a line on nbdcryptctl's stdin.
    let (code, err) = unlock_stdin(&d, PASS);
    assert_eq!(code, Some(0), "unlock --stdin: {err}");
    assert_same_bytes(
        &read_export(&d.uri(), d.dir()),
        &data,
        "read back after unlock --stdin",
    );
    assert_eq!(d.lock_idle().code(), Some(0), "lock");
    d.wait_state("locked", Duration::from_secs(10));
    assert_no_core_dumps(d.pid());

    let log = d.log();
    assert!(
        log.contains("DEBUG"),
        "--log-level debug produced no debug lines; the test would prove little:\n{log}"
    );
    let mut secrets = renderings(&key);
    secrets.push(PASS.to_owned());
    secrets.push(WRONG.to_owned());
    assert_log_clean("the daemon's stderr", &log, &secrets);
    let stdout = std::fs::read_to_string(d.dir().join("nbdcryptd.stdout")).unwrap_or_default();
    assert_log_clean("the daemon's stdout", &stdout, &secrets);
    d.terminate(Duration::from_secs(15));
    let log = d.log();
    assert_log_clean("the daemon's stderr after shutdown", &log, &secrets);
}

#[test]
fn a_daemon_unlocked_at_start_with_unlock_key_file_logs_neither_the_key_file_contents_nor_the_volume_key(
) {
    let dir = tempdir();
    let img = volume(dir.path());
    let key = hex_to_bytes(&luks_volume_key(&img, PASS.as_bytes()));
    let key_file = dir.path().join("unlock.key");
    std::fs::write(&key_file, PASS).unwrap();
    let d = Daemon::volume_in(
        dir,
        &img,
        &[
            "--log-level",
            "trace",
            "--unlock-key-file",
            key_file.to_str().unwrap(),
        ],
    );
    d.wait_state("unlocked", Duration::from_secs(20));
    assert_no_core_dumps(d.pid());
    let data = random_bytes(98, DATA as usize);
    write_export(&d.uri(), d.dir(), &data);
    assert_same_bytes(&read_export(&d.uri(), d.dir()), &data, "read back");
    let mut secrets = renderings(&key);
    secrets.push(PASS.to_owned());
    assert_log_clean("the daemon's stderr (trace)", &d.log(), &secrets);
}

/// Scans the daemon's readable memory (`/proc/PID/maps` + `/proc/PID/mem`, which needs root or
/// CAP_SYS_PTRACE) for each needle; returns, per needle, the addresses and mappings where it
/// occurs. Done by Debian's python3 because `bytes.find` is fast and this crate is built without
/// optimisation.
fn scan_memory(pid: i32, needles: &[&[u8]]) -> Vec<Vec<String>> {
    const SCAN_PY: &str = r#"
import sys
pid = int(sys.argv[1]); needles = [bytes.fromhex(h) for h in sys.argv[2:]]
hits = [[] for _ in needles]; readable = 0
with open("/proc/%d/maps" % pid) as maps, open("/proc/%d/mem" % pid, "rb", 0) as mem:
    for line in maps:
        parts = line.split()
        name = parts[5] if len(parts) > 5 else "[anon]"
        if "r" not in parts[1] or name in ("[vvar]", "[vsyscall]"):
            continue
        a, b = (int(x, 16) for x in parts[0].split("-"))
        try:
            mem.seek(a); data = mem.read(b - a)
        except OSError:
            continue
        readable += len(data)
        for k, n in enumerate(needles):
            i = data.find(n)
            while i >= 0:
                hits[k].append("%#x in %s %s %s" % (a + i, parts[0], parts[1], name))
                i = data.find(n, i + 1)
if readable == 0:
    sys.exit("could not read any memory of pid %d: the scan needs root (CAP_SYS_PTRACE)" % pid)
for h in hits:
    print("|".join(h))
"#;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut c = python3();
    c.arg("-c").arg(SCAN_PY).arg(pid.to_string());
    for n in needles {
        c.arg(hex(n));
    }
    let out = run(&mut c, Duration::from_secs(60)).success();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines.len(),
        needles.len(),
        "memory scan output:\n{}",
        out.details()
    );
    lines
        .iter()
        .map(|l| {
            if l.is_empty() {
                Vec::new()
            } else {
                l.split('|').map(str::to_owned).collect()
            }
        })
        .collect()
}

#[test]
fn after_lock_neither_half_of_the_volume_key_nor_the_passphrase_is_left_anywhere_in_the_daemons_memory(
) {
    // `nbdcryptctl lock` promises to "wipe the key from nbdcryptd's memory". Read the daemon's
    // memory from outside: after the lock no copy of either 32-byte XTS half (which is also the
    // first two AES-256 round keys) may remain, on the heap or on any thread's stack.
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, DATA, 4096, "pbkdf2", PASS.as_bytes());
    let key = hex_to_bytes(&luks_volume_key(&img, PASS.as_bytes()));
    let (k1, k2) = key.split_at(32);
    let d = Daemon::volume_in(dir, &img, &[]);
    let pid = d.pid();

    let before = scan_memory(pid, &[k1, k2]);
    assert!(
        before.iter().all(Vec::is_empty),
        "the key is in memory before any unlock?! {before:?}"
    );

    assert_eq!(d.unlock(PASS.as_bytes()).code(), Some(0), "unlock");
    let data = random_bytes(97, DATA as usize);
    write_export(&d.uri(), d.dir(), &data);
    assert_same_bytes(&read_export(&d.uri(), d.dir()), &data, "read back");
    // Calibration: the scan must see the daemon's own data (it keeps the volume UUID for
    // `status`), or an empty result after the lock would prove nothing.
    let uuid = luks_uuid(&img);
    let unlocked = scan_memory(pid, &[uuid.as_bytes(), PASS.as_bytes()]);
    assert!(
        !unlocked[0].is_empty(),
        "calibration: the memory scan does not even find the volume UUID {uuid}"
    );
    assert!(
        unlocked[1].is_empty(),
        "the passphrase is still in memory after the unlock finished:\n{}",
        unlocked[1].join("\n")
    );

    let out = d.lock_idle();
    assert_eq!(out.code(), Some(0), "lock\n{}", out.details());
    d.wait_state("locked", Duration::from_secs(10));
    let after = scan_memory(pid, &[k1, k2, PASS.as_bytes()]);
    let report = |i: usize| {
        format!(
            "{} copies: {}",
            after[i].len(),
            after[i]
                .iter()
                .take(6)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        )
    };
    assert!(
        after.iter().all(Vec::is_empty),
        "after `lock` (\"the key wiped\") the daemon's memory still holds\n  XTS key 1 (bytes 0..32): {}\n  XTS key 2 (bytes 32..64): {}\n  passphrase: {}",
        report(0),
        report(1),
        report(2)
    );
}

#[test]
fn neither_a_wrong_passphrase_nor_the_unlock_key_file_contents_stay_in_the_daemons_memory() {
    let dir = tempdir();
    let img = volume(dir.path());
    let key_file = dir.path().join("unlock.key");
    std::fs::write(&key_file, PASS).unwrap();
    let d = Daemon::volume_in(
        dir,
        &img,
        &["--unlock-key-file", key_file.to_str().unwrap()],
    );
    d.wait_state("unlocked", Duration::from_secs(20));
    expect_lock(&d);
    assert_eq!(
        d.unlock(WRONG.as_bytes()).code(),
        Some(3),
        "wrong passphrase"
    );
    let (code, err) = unlock_stdin(&d, &format!("{WRONG}-via-stdin"));
    assert_eq!(code, Some(3), "wrong passphrase on stdin: {err}");
    let stdin_wrong = format!("{WRONG}-via-stdin");
    let uuid = luks_uuid(&img);
    let mut hits = scan_memory(
        d.pid(),
        &[
            uuid.as_bytes(),
            PASS.as_bytes(),
            WRONG.as_bytes(),
            stdin_wrong.as_bytes(),
        ],
    );
    assert!(
        !hits.remove(0).is_empty(),
        "calibration: the memory scan does not even find the volume UUID {uuid}"
    );
    for (what, h) in [
        "the key file's passphrase",
        "a wrong passphrase (key file)",
        "a wrong passphrase (stdin)",
    ]
    .iter()
    .zip(&hits)
    {
        assert!(
            h.is_empty(),
            "{what} is still in the daemon's memory: {} copies: {}",
            h.len(),
            h.join("; ")
        );
    }
}

fn expect_lock(d: &Daemon) {
    let out = d.lock_idle();
    assert_eq!(out.code(), Some(0), "lock\n{}", out.details());
    d.wait_state("locked", Duration::from_secs(10));
}
