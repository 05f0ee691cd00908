//! Black-box tests of the offline commands: the built `nbdcryptctl` against temporary volume
//! files, checked with (and against) the real cryptsetup.
//!
//! Keyslots use `--pbkdf pbkdf2 --pbkdf-force-iterations 1000` so each test takes well under a
//! second. Every command runs with standard input piped, so nothing ever waits on a terminal.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const FAST: [&str; 4] = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];
const SIZE: &str = "20M";
/// Exit status for "no key available with this passphrase" (`offline::EXIT_NO_KEY`).
const NO_KEY: i32 = 3;

fn ctl(args: &[&str], stdin: &[u8]) -> Output {
    run(
        Command::new(env!("CARGO_BIN_EXE_nbdcryptctl")).args(args),
        stdin,
    )
}

fn cs(args: &[&str]) -> Output {
    run(Command::new("cryptsetup").args(args), b"")
}

fn run(cmd: &mut Command, stdin: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // A command may exit before reading all of its input; that is not an error here.
    let _ = child.stdin.take().expect("stdin").write_all(stdin);
    child.wait_with_output().expect("wait")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn ok(o: Output) -> Output {
    assert_eq!(
        o.status.code(),
        Some(0),
        "expected success\nstdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    o
}

#[track_caller]
fn code(o: &Output, want: i32) {
    assert_eq!(
        o.status.code(),
        Some(want),
        "expected exit {want}\nstdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
}

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        Dir {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn s(&self, name: &str) -> String {
        self.path(name).to_str().expect("utf-8 path").to_owned()
    }

    /// A key file with exactly these bytes.
    fn key(&self, name: &str, bytes: &[u8]) -> String {
        std::fs::write(self.path(name), bytes).expect("write key");
        self.s(name)
    }
}

/// Our format of a fresh 20 MiB file with the passphrase in `key`.
fn format(vol: &str, key: &str) -> Output {
    let mut args = vec!["format", vol, "--size", SIZE, "--key-file", key];
    args.extend(FAST);
    ok(ctl(&args, b""))
}

/// cryptsetup's luksFormat of a fresh 20 MiB file.
fn cs_format(d: &Dir, name: &str, key: &str) -> String {
    let f = std::fs::File::create(d.path(name)).expect("create");
    f.set_len(20 << 20).expect("set_len");
    let vol = d.s(name);
    ok(cs(&[
        "luksFormat",
        "--type",
        "luks2",
        "--batch-mode",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        key,
        &vol,
    ]));
    vol
}

fn cs_opens(vol: &str, key: &str) -> bool {
    let o = cs(&["open", "--test-passphrase", "--key-file", key, vol]);
    match o.status.code() {
        Some(0) => true,
        Some(2) => false,
        _ => panic!("cryptsetup open --test-passphrase: {}", stderr(&o)),
    }
}

fn cs_uuid(vol: &str) -> String {
    stdout(&ok(cs(&["luksUUID", vol]))).trim().to_owned()
}

/// The volume key in cryptsetup's `MK dump:` output, as contiguous lowercase hex.
fn cs_volume_key(vol: &str, key: &str) -> String {
    let o = ok(cs(&[
        "luksDump",
        "--dump-volume-key",
        "--key-file",
        key,
        "--batch-mode",
        vol,
    ]));
    let text = stdout(&o);
    let at = text.find("MK dump:").expect("MK dump in cryptsetup output");
    text[at + "MK dump:".len()..]
        .split_whitespace()
        .take_while(|t| t.len() == 2 && t.chars().all(|c| c.is_ascii_hexdigit()))
        .collect::<String>()
        .to_ascii_lowercase()
}

fn our_volume_key(vol: &str, key: &str) -> String {
    let o = ok(ctl(
        &["dump", vol, "--dump-volume-key", "--key-file", key, "--yes"],
        b"",
    ));
    assert!(stderr(&o).contains("WARNING"), "no warning: {}", stderr(&o));
    let text = stdout(&o);
    let line = text
        .lines()
        .find(|l| l.starts_with("Volume key:"))
        .expect("Volume key line");
    line["Volume key:".len()..].trim().to_owned()
}

// ---- format -------------------------------------------------------------------------------------

#[test]
fn format_opens_in_cryptsetup_and_volume_keys_agree() {
    let d = Dir::new();
    let vol = d.s("v.img");
    let k = d.key("k", b"correct horse\nbattery staple"); // a newline inside: key files are raw
    let o = ctl(
        &[
            "format",
            &vol,
            "--size",
            SIZE,
            "--key-file",
            &k,
            "--label",
            "backups",
            "--sector-size",
            "512",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
        ],
        b"",
    );
    let out = stdout(&ok(o));
    let uuid = cs_uuid(&vol);
    assert!(
        out.contains(&uuid),
        "format output lacks the uuid {uuid}: {out}"
    );
    assert!(out.contains("aes-xts-plain64"), "{out}");
    assert!(out.contains("sector size:   512"), "{out}");
    assert!(out.contains("data offset:   16777216"), "{out}");
    assert!(out.contains("exported size: 4194304"), "{out}"); // 20 MiB - 16 MiB

    let dump = stdout(&ok(cs(&["luksDump", &vol])));
    assert!(
        dump.contains("Label:          \tbackups") || dump.contains("backups"),
        "{dump}"
    );
    assert!(dump.contains("sector: 512 [bytes]"), "{dump}");
    assert!(dump.contains("Iterations: 1000"), "{dump}");

    assert!(cs_opens(&vol, &k));
    let wrong = d.key("wrong", b"correct horse");
    assert!(!cs_opens(&vol, &wrong));

    let ours = our_volume_key(&vol, &k);
    assert_eq!(ours.len(), 128, "512-bit key as hex: {ours}");
    assert_eq!(ours, cs_volume_key(&vol, &k));
}

#[test]
fn argon2_keyslots_open_in_cryptsetup() {
    let d = Dir::new();
    let k = d.key("k", b"pw");
    // Benchmarked argon2id (small so the test stays fast).
    let vol = d.s("id.img");
    let o = ok(ctl(
        &[
            "format",
            &vol,
            "--size",
            SIZE,
            "--key-file",
            &k,
            "--iter-time",
            "200",
            "--pbkdf-memory",
            "32768",
        ],
        b"",
    ));
    assert!(
        stderr(&o).contains("benchmarking key derivation"),
        "{}",
        stderr(&o)
    );
    let dump = stdout(&ok(cs(&["luksDump", &vol])));
    assert!(dump.contains("PBKDF:      argon2id"), "{dump}");
    assert!(cs_opens(&vol, &k));

    // Forced argon2i with explicit memory and threads, added by add-key.
    let k2 = d.key("k2", b"pw2");
    let o = ok(ctl(
        &[
            "add-key",
            &vol,
            "--key-file",
            &k,
            "--new-key-file",
            &k2,
            "--pbkdf",
            "argon2i",
            "--pbkdf-force-iterations",
            "4",
            "--pbkdf-memory",
            "32768",
            "--pbkdf-parallel",
            "2",
        ],
        b"",
    ));
    assert!(
        stdout(&o).contains("argon2i (time 4, memory 32768 KiB, 2 threads)"),
        "{}",
        stdout(&o)
    );
    let dump = stdout(&ok(cs(&["luksDump", &vol])));
    assert!(dump.contains("PBKDF:      argon2i\n"), "{dump}");
    assert!(cs_opens(&vol, &k2));

    // Parameters cryptsetup would refuse are refused before anything is written.
    let o = ctl(
        &[
            "add-key",
            &vol,
            "--key-file",
            &k,
            "--new-key-file",
            &k2,
            "--pbkdf-force-iterations",
            "3",
            "--pbkdf-memory",
            "32768",
        ],
        b"",
    );
    code(&o, 1);
    assert!(
        stderr(&o).contains("argon2 time 3 below the minimum 4"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn format_key_size_256_and_file_mode() {
    use std::os::unix::fs::PermissionsExt;
    let d = Dir::new();
    let vol = d.s("v.img");
    let k = d.key("k", b"pw");
    let mut args = vec![
        "format",
        &vol,
        "--size",
        SIZE,
        "--key-file",
        &k,
        "--key-size",
        "256",
    ];
    args.extend(FAST);
    ok(ctl(&args, b""));
    let mode = std::fs::metadata(&vol).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(our_volume_key(&vol, &k).len(), 64);
    assert_eq!(our_volume_key(&vol, &k), cs_volume_key(&vol, &k));
}

#[test]
fn format_refuses_existing_luks_without_yes() {
    let d = Dir::new();
    let k = d.key("k", b"first");
    let vol = cs_format(&d, "v.img", &k);
    let before = cs_uuid(&vol);
    let k2 = d.key("k2", b"second");

    let mut args = vec!["format", &vol, "--key-file", &k2];
    args.extend(FAST);
    let o = ctl(&args, b"");
    code(&o, 1);
    let err = stderr(&o);
    assert!(err.contains("already contains a LUKS2 volume"), "{err}");
    assert!(err.contains(&before), "{err}");
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(cs_uuid(&vol), before, "the volume was changed");
    assert!(cs_opens(&vol, &k));

    args.push("--yes");
    ok(ctl(&args, b""));
    assert_ne!(cs_uuid(&vol), before);
    assert!(cs_opens(&vol, &k2));
    assert!(!cs_opens(&vol, &k));
}

#[test]
fn format_refuses_data_and_cleans_up_on_failure() {
    let d = Dir::new();
    let vol = d.s("data.img");
    let mut bytes = vec![0u8; 20 << 20];
    bytes[100] = 1;
    std::fs::write(&vol, &bytes).unwrap();
    let k = d.key("k", b"pw");
    let mut args = vec!["format", &vol, "--key-file", &k];
    args.extend(FAST);
    let o = ctl(&args, b"");
    code(&o, 1);
    assert!(
        stderr(&o).contains("first 4 KiB contain data"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&vol).unwrap()[100], 1);

    // Too small: a file we created is not left behind.
    let small = d.s("small.img");
    let o = ctl(&["format", &small, "--size", "1M", "--key-file", &k], b"");
    code(&o, 1);
    assert!(stderr(&o).contains("too small"), "{}", stderr(&o));
    assert!(!Path::new(&small).exists());

    // Missing file without --size.
    let o = ctl(&["format", &d.s("nope.img"), "--key-file", &k], b"");
    code(&o, 1);
    assert!(stderr(&o).contains("--size"), "{}", stderr(&o));
}

// ---- keyslots on a cryptsetup volume ------------------------------------------------------------

#[test]
fn keyslots_on_a_cryptsetup_volume() {
    let d = Dir::new();
    let k1 = d.key("k1", b"one");
    let k2 = d.key("k2", b"two");
    let vol = cs_format(&d, "v.img", &k1);

    let o = ok(ctl(&["test-key", &vol, "--key-file", &k1], b""));
    assert_eq!(stdout(&o).trim(), "keyslot 0 unlocked");

    let mut args = vec!["add-key", &vol, "--key-file", &k1, "--new-key-file", &k2];
    args.extend(FAST);
    let o = ok(ctl(&args, b""));
    assert!(stdout(&o).starts_with("added keyslot 1"), "{}", stdout(&o));
    assert!(cs_opens(&vol, &k2));
    let o = ok(ctl(&["test-key", &vol, "--key-file", &k2], b""));
    assert_eq!(stdout(&o).trim(), "keyslot 1 unlocked");

    // The passphrase of the slot being removed does not authorize its removal.
    let o = ctl(&["remove-key", &vol, "--slot", "1", "--key-file", &k2], b"");
    code(&o, NO_KEY);
    assert!(
        stderr(&o).contains("no key available with this passphrase"),
        "{}",
        stderr(&o)
    );
    assert!(cs_opens(&vol, &k2));

    ok(ctl(
        &["remove-key", &vol, "--slot", "1", "--key-file", &k1],
        b"",
    ));
    assert!(!cs_opens(&vol, &k2));
    assert!(cs_opens(&vol, &k1));

    // The last keyslot stays, even with --force.
    let o = ctl(&["remove-key", &vol, "--slot", "0", "--force"], b"");
    code(&o, 1);
    assert!(stderr(&o).contains("last keyslot"), "{}", stderr(&o));
    assert!(cs_opens(&vol, &k1));

    let o = ctl(&["remove-key", &vol, "--slot", "7", "--force"], b"");
    code(&o, 1);
    assert!(
        stderr(&o).contains("keyslot 7 does not exist"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn passphrases_as_lines_of_stdin() {
    let d = Dir::new();
    let k1 = d.key("k1", b"one");
    let vol = cs_format(&d, "v.img", &k1);
    // Existing, then new passphrase, one line each (the newline is not part of it).
    let mut args = vec!["add-key", &vol];
    args.extend(FAST);
    ok(ctl(&args, b"one\ntwo\n"));
    assert!(cs_opens(&vol, &d.key("two", b"two")));
    assert!(!cs_opens(&vol, &d.key("two-nl", b"two\n")));
    let o = ok(ctl(&["test-key", &vol], b"two\n"));
    assert_eq!(stdout(&o).trim(), "keyslot 1 unlocked");
    // --key-file - takes all of stdin, newline included.
    let o = ctl(&["test-key", &vol, "--key-file", "-"], b"two\n");
    code(&o, NO_KEY);
    ok(ctl(&["test-key", &vol, "--key-file", "-"], b"two"));
}

#[test]
fn change_key_keeps_the_slot() {
    let d = Dir::new();
    let k1 = d.key("k1", b"one");
    let k2 = d.key("k2", b"two");
    let k3 = d.key("k3", b"three");
    let vol = cs_format(&d, "v.img", &k1);
    let mut args = vec!["add-key", &vol, "--key-file", &k1, "--new-key-file", &k2];
    args.extend(FAST);
    ok(ctl(&args, b""));
    let vk = cs_volume_key(&vol, &k1);

    // --slot must be the slot the passphrase opens.
    let mut args = vec![
        "change-key",
        &vol,
        "--slot",
        "0",
        "--key-file",
        &k2,
        "--new-key-file",
        &k3,
    ];
    args.extend(FAST);
    let o = ctl(&args, b"");
    code(&o, 1);
    assert!(
        stderr(&o).contains("opens keyslot 1, not keyslot 0"),
        "{}",
        stderr(&o)
    );

    args[3] = "1";
    let o = ok(ctl(&args, b""));
    assert!(stdout(&o).contains("keyslot 1"), "{}", stdout(&o));
    assert!(cs_opens(&vol, &k3));
    assert!(!cs_opens(&vol, &k2));
    assert!(cs_opens(&vol, &k1));
    let o = ok(ctl(&["test-key", &vol, "--key-file", &k3], b""));
    assert_eq!(stdout(&o).trim(), "keyslot 1 unlocked");
    assert_eq!(cs_volume_key(&vol, &k3), vk);
}

// ---- errors -------------------------------------------------------------------------------------

#[test]
fn wrong_passphrase_exits_2() {
    let d = Dir::new();
    let k = d.key("k", b"right");
    let vol = d.s("v.img");
    format(&vol, &k);
    let bad = d.key("bad", b"wrong");
    for o in [
        ctl(&["test-key", &vol, "--key-file", &bad], b""),
        ctl(&["test-key", &vol], b"wrong\n"),
        ctl(
            &["add-key", &vol, "--key-file", &bad, "--new-key-file", &k],
            b"",
        ),
        ctl(
            &["change-key", &vol, "--key-file", &bad, "--new-key-file", &k],
            b"",
        ),
        ctl(
            &[
                "dump",
                &vol,
                "--dump-volume-key",
                "--key-file",
                &bad,
                "--yes",
            ],
            b"",
        ),
    ] {
        code(&o, NO_KEY);
        assert!(
            stderr(&o).contains("no key available with this passphrase"),
            "{}",
            stderr(&o)
        );
        assert!(stdout(&o).is_empty(), "{}", stdout(&o));
    }
    // Nothing was added.
    let v: serde_json::Value =
        serde_json::from_slice(&ok(ctl(&["dump", &vol, "--json"], b"")).stdout).unwrap();
    assert_eq!(v["keyslots"].as_array().unwrap().len(), 1);
}

#[test]
fn errors_name_the_path_and_reason() {
    let d = Dir::new();
    let k = d.key("k", b"pw");
    let missing = d.s("missing.img");
    let o = ctl(&["test-key", &missing, "--key-file", &k], b"");
    code(&o, 1);
    let e = stderr(&o);
    assert!(
        e.contains(&missing) && e.contains("no such file or directory"),
        "{e}"
    );

    let zero = d.s("zero.img");
    std::fs::write(&zero, vec![0u8; 1 << 20]).unwrap();
    let o = ctl(&["dump", &zero], b"");
    code(&o, 1);
    let e = stderr(&o);
    assert!(e.contains(&zero) && e.contains("not a LUKS2 volume"), "{e}");

    let o = ctl(
        &["test-key", d.dir.path().to_str().unwrap(), "--key-file", &k],
        b"",
    );
    code(&o, 1);
    assert!(stderr(&o).contains("is a directory"), "{}", stderr(&o));

    let vol = d.s("v.img");
    format(&vol, &k);
    let o = ctl(&["test-key", &vol, "--key-file", &d.s("nokey")], b"");
    code(&o, 1);
    assert!(
        stderr(&o).contains("cannot open key file"),
        "{}",
        stderr(&o)
    );
    let o = ctl(&["test-key", &vol, "--key-file", &d.key("empty", b"")], b"");
    code(&o, 1);
    assert!(stderr(&o).contains("is empty"), "{}", stderr(&o));

    // A detached header: dump shows it, commands that need the data refuse it.
    let hdr = d.s("det.hdr");
    let data = d.s("det.img");
    std::fs::File::create(&hdr)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    std::fs::File::create(&data)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    ok(cs(&[
        "luksFormat",
        "--type",
        "luks2",
        "--batch-mode",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        &k,
        "--header",
        &hdr,
        &data,
    ]));
    let o = ctl(&["test-key", &hdr, "--key-file", &k], b"");
    code(&o, 1);
    assert!(
        stderr(&o).contains("detached LUKS2 header"),
        "{}",
        stderr(&o)
    );
    let o = ok(ctl(&["dump", &hdr], b""));
    assert!(stdout(&o).contains("offset: 0 [bytes]"), "{}", stdout(&o));

    // A LUKS1 volume is named as such.
    let l1 = d.s("l1.img");
    std::fs::File::create(&l1)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    ok(cs(&[
        "luksFormat",
        "--type",
        "luks1",
        "--batch-mode",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        &k,
        &l1,
    ]));
    let o = ctl(&["test-key", &l1, "--key-file", &k], b"");
    code(&o, 1);
    assert!(stderr(&o).contains("LUKS1"), "{}", stderr(&o));
}

#[test]
fn permission_denied_is_reported() {
    if nix_is_root() {
        eprintln!("skipped: root can open any file");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let d = Dir::new();
    let k = d.key("k", b"pw");
    let vol = d.s("v.img");
    format(&vol, &k);
    std::fs::set_permissions(&vol, std::fs::Permissions::from_mode(0o000)).unwrap();
    let o = ctl(&["test-key", &vol, "--key-file", &k], b"");
    code(&o, 1);
    assert!(stderr(&o).contains("permission denied"), "{}", stderr(&o));
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

// ---- header backup / restore --------------------------------------------------------------------

fn zero_range(path: &str, offset: u64, len: usize) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![0u8; len], offset).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn header_backup_and_restore() {
    let d = Dir::new();
    let k = d.key("k", b"pw");
    let vol = d.s("v.img");
    format(&vol, &k);
    let backup = d.s("v.header");
    let o = ok(ctl(&["header-backup", &vol, "--file", &backup], b""));
    assert!(stdout(&o).contains(&backup), "{}", stdout(&o));
    assert_eq!(std::fs::metadata(&backup).unwrap().len(), 16 << 20);
    // Never overwrites.
    code(&ctl(&["header-backup", &vol, "--file", &backup], b""), 1);

    // Primary copy gone: the secondary still opens the volume (with a warning).
    zero_range(&vol, 0, 4096);
    let o = ok(ctl(&["test-key", &vol, "--key-file", &k], b""));
    assert!(stderr(&o).contains("primary header copy"), "{}", stderr(&o));

    // Both copies gone: nothing opens.
    zero_range(&vol, 0, 32 << 10);
    let o = ctl(&["test-key", &vol, "--key-file", &k], b"");
    code(&o, 1);
    assert!(stderr(&o).contains("not a LUKS2 volume"), "{}", stderr(&o));
    assert!(!cs_opens_quiet(&vol, &k));

    // Restore asks for confirmation; without a terminal it needs --yes.
    let o = ctl(&["header-restore", &vol, "--file", &backup], b"YES\n");
    code(&o, 1);
    assert!(stderr(&o).contains("--yes"), "{}", stderr(&o));
    let o = ok(ctl(
        &["header-restore", &vol, "--file", &backup, "--yes"],
        b"",
    ));
    assert!(stdout(&o).contains("restored"), "{}", stdout(&o));
    let o = ok(ctl(&["test-key", &vol, "--key-file", &k], b""));
    assert_eq!(stdout(&o).trim(), "keyslot 0 unlocked");
    assert!(cs_opens(&vol, &k));

    // cryptsetup and our dump read the backup too.
    let o = cs(&["luksDump", &backup]);
    code(&o, 0);
    let o = ok(ctl(&["dump", &backup], b""));
    assert!(stdout(&o).contains(&cs_uuid(&vol)), "{}", stdout(&o));
}

/// cryptsetup on a volume without any header exits 1 ("not a valid LUKS device").
fn cs_opens_quiet(vol: &str, key: &str) -> bool {
    cs(&["open", "--test-passphrase", "--key-file", key, vol])
        .status
        .success()
}

#[test]
fn restore_refuses_a_backup_of_another_volume() {
    let d = Dir::new();
    let k = d.key("k", b"pw");
    let a = d.s("a.img");
    let b = d.s("b.img");
    format(&a, &k);
    format(&b, &k);
    let backup = d.s("a.header");
    ok(ctl(&["header-backup", &a, "--file", &backup], b""));
    let before = cs_uuid(&b);
    let o = ctl(&["header-restore", &b, "--file", &backup, "--yes"], b"");
    code(&o, 1);
    assert!(stderr(&o).contains("UUID"), "{}", stderr(&o));
    assert_eq!(cs_uuid(&b), before);
}

// ---- dump ---------------------------------------------------------------------------------------

#[test]
fn dump_json_has_keyslots_and_tokens_without_secrets() {
    let d = Dir::new();
    let k1 = d.key("k1", b"one");
    let k2 = d.key("k2", b"two");
    let vol = d.s("v.img");
    format(&vol, &k1);
    let mut args = vec!["add-key", &vol, "--key-file", &k1, "--new-key-file", &k2];
    args.extend(FAST);
    ok(ctl(&args, b""));
    let tok = d.path("token.json");
    std::fs::write(
        &tok,
        br#"{"type":"example-kms","keyslots":["1"],"wrapped_key":"TOPSECRETWRAPPED"}"#,
    )
    .unwrap();
    ok(cs(&[
        "token",
        "import",
        "--json-file",
        tok.to_str().unwrap(),
        &vol,
    ]));

    let o = ok(ctl(&["dump", &vol, "--json"], b""));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("dump --json is JSON");
    assert_eq!(v["uuid"].as_str().unwrap(), cs_uuid(&vol));
    let slots = v["keyslots"].as_array().unwrap();
    let ids: Vec<u64> = slots.iter().map(|s| s["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [0, 1]);
    for s in slots {
        assert_eq!(s["kdf"]["type"], "pbkdf2");
        assert_eq!(s["kdf"]["iterations"], 1000);
        assert_eq!(s["key_bits"], 512);
        assert_eq!(s["opens_data"], true);
    }
    assert_eq!(v["segment"]["offset"], 16 << 20);
    assert_eq!(v["segment"]["sector_size"], 4096);
    assert_eq!(v["tokens"][0]["type"], "example-kms");
    assert_eq!(v["tokens"][0]["keyslots"], serde_json::json!([1]));
    assert!(v["epoch"].as_u64().unwrap() >= 3);
    assert!(!stdout(&o).contains("TOPSECRETWRAPPED"));

    let text = stdout(&ok(ctl(&["dump", &vol], b"")));
    assert!(!text.contains("TOPSECRETWRAPPED"));
    for want in [
        "Version:",
        "UUID:",
        "Epoch:",
        "Keyslots:",
        "  1: luks2",
        "PBKDF:      pbkdf2",
        "Tokens:",
        "  0: example-kms",
        "cipher: aes-xts-plain64",
        "sector: 4096 [bytes]",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
}

#[test]
fn dump_escapes_terminal_controls_and_newlines_from_the_header() {
    let d = Dir::new();
    let k = d.key("k", b"pw");
    let vol = d.s("esc.img");
    std::fs::File::create(&vol)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    // Whoever holds the disk writes the header: a label that turns the terminal red and fakes a
    // line, a subsystem that retitles the window, a token type that clears the screen.
    let label = "L\x1b[31mred\nFake: line";
    let subsystem = "S\x1b]0;title\x07";
    ok(cs(&[
        "luksFormat",
        "--type",
        "luks2",
        "--batch-mode",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        &k,
        "--label",
        label,
        "--subsystem",
        subsystem,
        &vol,
    ]));
    let tok = d.path("token.json");
    std::fs::write(
        &tok,
        br#"{"type":"x\u001b[2Jclear\nKeyslot: 9\u009b1m","keyslots":["0"]}"#,
    )
    .unwrap();
    ok(cs(&[
        "token",
        "import",
        "--json-file",
        tok.to_str().unwrap(),
        &vol,
    ]));

    let text = stdout(&ok(ctl(&["dump", &vol], b"")));
    assert!(
        !text
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t'),
        "a control character reached the terminal:\n{text:?}"
    );
    assert!(
        text.contains("Label:         \tL\\e[31mred\\nFake: line\n"),
        "{text}"
    );
    assert!(
        text.contains("Subsystem:     \tS\\e]0;title\\u{7}\n"),
        "{text}"
    );
    assert!(
        text.contains("  0: x\\e[2Jclear\\nKeyslot: 9\\u{9b}1m\n"),
        "{text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("Fake:") || l.trim() == "Keyslot: 9"),
        "{text}"
    );

    // JSON: valid, and the strings exactly as the header has them.
    let o = ok(ctl(&["dump", &vol, "--json"], b""));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("dump --json is JSON");
    assert_eq!(v["label"], label);
    assert_eq!(v["subsystem"], subsystem);
    assert_eq!(v["tokens"][0]["type"], "x\x1b[2Jclear\nKeyslot: 9\u{9b}1m");
    assert!(!o.stdout.contains(&0x1b), "raw ESC in the JSON output");
}

#[test]
fn dump_volume_key_needs_confirmation() {
    let d = Dir::new();
    let k = d.key("k", b"pw");
    let vol = d.s("v.img");
    format(&vol, &k);
    let o = ctl(
        &["dump", &vol, "--dump-volume-key", "--key-file", &k],
        b"YES\n",
    );
    code(&o, 1);
    assert!(
        stdout(&o).is_empty(),
        "key printed without confirmation: {}",
        stdout(&o)
    );
    assert!(stderr(&o).contains("--yes"), "{}", stderr(&o));
}

#[test]
fn help_teaches_with_examples_and_exit_codes() {
    for cmd in [
        "format",
        "add-key",
        "remove-key",
        "change-key",
        "dump",
        "header-backup",
        "header-restore",
        "test-key",
    ] {
        let o = ok(ctl(&[cmd, "--help"], b""));
        let h = stdout(&o);
        assert!(
            h.contains("Examples:") && h.contains(&format!("nbdcryptctl {cmd}")),
            "{cmd}: {h}"
        );
        assert!(
            h.contains("Exit status:") && h.contains(&format!("{NO_KEY}  wrong passphrase")),
            "{cmd}: {h}"
        );
    }
}

#[test]
fn offline_reencrypt_checks_the_volume_pin_of_its_config() {
    let d = Dir::new();
    let key = d.key("k", b"pin passphrase");
    let (a, b) = (d.s("a.img"), d.s("b.img"));
    format(&a, &key);
    format(&b, &key);
    // The operator pins volume a; b (same passphrase, another volume) stands in for a header
    // someone put in its place.
    let conf = d.s("nbdcryptd.toml");
    ok(ctl(&["pin", &a, "--key-file", &key, "--write", &conf], b""));
    let before = std::fs::read(&b).unwrap();
    let o = ctl(
        &[
            "reencrypt",
            &b,
            "--key-file",
            &key,
            "--config",
            &conf,
            "--quiet",
        ],
        b"",
    );
    assert!(!o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("pin") || stderr(&o).contains("UUID") || stderr(&o).contains("uuid"),
        "{}",
        stderr(&o)
    );
    assert!(
        std::fs::read(&b).unwrap() == before,
        "a refused run wrote to the volume"
    );
    // Control: the pinned volume itself re-encrypts under the same config.
    ok(ctl(
        &[
            "reencrypt",
            &a,
            "--key-file",
            &key,
            "--config",
            &conf,
            "--quiet",
        ],
        b"",
    ));
    assert!(cs_opens(&a, &key));
}
