//! The volume a running nbdcryptd serves is its own: every offline command that writes the header
//! (format, add-key, remove-key, change-key, enroll, unenroll, rekey, header-restore) is refused
//! while the daemon runs, naming it and the way to do it instead, and leaves every byte as it
//! was; read-only commands still work. An offline command holds the same claim while it runs, so
//! a daemon started meanwhile is refused. And the daemon serves the file it claimed at start,
//! even when another LUKS2 image is renamed over its path.

use nbdcrypt_tests::*;
use std::ffi::OsStr;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PASS: &[u8] = b"claim-test passphrase";
const FAST: [&str; 4] = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];

fn ctl(args: &[&str]) -> Out {
    let v: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    nbdcryptctl(&v)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A cryptsetup-made volume with `PASS` in `dir/volume.img` and the key file `dir/pass.key`.
fn volume(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("volume.img");
    luks_format(&img, 4 * MIB, 512, "pbkdf2", PASS);
    std::fs::write(dir.join("pass.key"), PASS).unwrap();
    std::fs::write(dir.join("new.key"), b"another passphrase").unwrap();
    img
}

#[test]
fn every_offline_command_that_writes_is_refused_while_the_daemon_serves_the_volume() {
    let dir = tempdir();
    let img = volume(dir.path());
    let (key, new_key) = (dir.path().join("pass.key"), dir.path().join("new.key"));
    let backup = dir.path().join("header.bak");
    ctl(&["header-backup", s(&img), "--file", s(&backup)]).success();
    let d = Daemon::volume_in(dir, &img, &["--unlock-key-file", s(&key)]);
    d.wait_state("unlocked", Duration::from_secs(30));
    let before = std::fs::read(&img).unwrap();
    let control = d.control();
    let (img, key, new_key, backup) = (s(&img), s(&key), s(&new_key), s(&backup));
    let endpoint = [
        "--region",
        "us-east-1",
        "--kms-endpoint",
        "http://127.0.0.1:9",
    ];
    let mut commands: Vec<Vec<&str>> = vec![
        [&["format", img, "--yes", "--key-file", new_key][..], &FAST].concat(),
        [
            &["add-key", img, "--key-file", key, "--new-key-file", new_key][..],
            &FAST,
        ]
        .concat(),
        vec!["remove-key", img, "--slot", "0", "--force"],
        [
            &[
                "change-key",
                img,
                "--key-file",
                key,
                "--new-key-file",
                new_key,
            ][..],
            &FAST,
        ]
        .concat(),
        [
            &["enroll", img, "--kms", "alias/x", "--key-file", key][..],
            &endpoint,
        ]
        .concat(),
        vec!["unenroll", img, "--slot", "0"],
        [
            &["rekey", img, "--slot", "0", "--kms", "alias/x"][..],
            &endpoint,
        ]
        .concat(),
        vec!["header-restore", img, "--file", backup, "--yes"],
    ];
    let pid = d.pid().to_string();
    for args in commands.drain(..) {
        let out = ctl(&args).failure();
        let what = format!("{args:?}");
        assert_eq!(out.code(), Some(1), "{what}\n{}", out.details());
        let e = &out.stderr;
        assert!(e.contains("in use by a running nbdcryptd"), "{what}: {e}");
        assert!(
            e.contains(&format!("pid {pid} (")),
            "{what} names the daemon's pid {pid}: {e}"
        );
        assert!(
            e.contains("nbdcryptd --volume") && e.contains(img),
            "{what} shows its command line: {e}"
        );
        if args[0] == "rekey" {
            let online = format!("nbdcryptctl rekey --control {}", control.display());
            assert!(e.contains(&online), "{what} names the online way: {e}");
        } else {
            assert!(e.contains("stop the daemon first"), "{what}: {e}");
        }
        assert!(
            std::fs::read(img).unwrap() == before,
            "{what} changed the volume"
        );
    }

    // Reading is fine.
    let dump = ctl(&["dump", img]).success();
    assert!(dump.stdout.contains("Keyslots"), "{}", dump.stdout);
    let json = ctl(&["dump", img, "--json"]).success();
    serde_json::from_str::<serde_json::Value>(&json.stdout).expect("dump --json is JSON");
    ctl(&["test-key", img, "--key-file", key]).success();
    let second = format!("{backup}.2");
    ctl(&["header-backup", img, "--file", &second]).success();
    assert_eq!(
        std::fs::read(backup).unwrap(),
        std::fs::read(&second).unwrap()
    );
    assert_eq!(d.state(), "unlocked", "the daemon serves on");

    // Negative control: the refusals were the daemon's doing. Stopped, the same command works.
    let mut d = d;
    d.terminate(Duration::from_secs(10));
    let args = [
        &["add-key", img, "--key-file", key, "--new-key-file", new_key][..],
        &FAST,
    ]
    .concat();
    ctl(&args).success();
    assert!(
        std::fs::read(img).unwrap() != before,
        "add-key wrote the header"
    );
}

#[test]
fn a_daemon_started_while_an_offline_command_runs_is_refused() {
    let dir = tempdir();
    let img = volume(dir.path());
    // add-key claims the volume, then waits for its passphrase on standard input.
    let mut add = Command::new(ctl_binary())
        .args([
            "add-key",
            s(&img),
            "--new-key-file",
            s(&dir.path().join("new.key")),
        ])
        .args(FAST)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let claimed = |p: &Path| {
        let f = std::fs::File::open(p).unwrap();
        nbdcrypt_probe(&f)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !claimed(&img) {
        assert!(
            Instant::now() < deadline,
            "add-key never claimed the volume"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let sock = dir.path().join("nbd.sock");
    let control = dir.path().join("control.sock");
    let out = run(
        Command::new(daemon_binary())
            .args([
                "--volume",
                s(&img),
                "--unix",
                s(&sock),
                "--control",
                s(&control),
            ])
            .stdin(Stdio::null()),
        Duration::from_secs(20),
    )
    .failure();
    assert!(out.stderr.contains("in use"), "{}", out.details());
    let holder = format!("held by pid {} (", add.id());
    assert!(
        out.stderr.contains(&holder) && out.stderr.contains("add-key"),
        "names the holder: {}",
        out.details()
    );
    // The offline command finishes its work undisturbed.
    let mut stdin = add.stdin.take().unwrap();
    stdin.write_all(PASS).unwrap();
    drop(stdin);
    let o = add.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d = Daemon::volume_in(dir, &img, &[]);
    assert!(
        d.unlock(b"another passphrase").ok(),
        "the key add-key added opens the served volume"
    );
}

/// Whether someone holds nbdcrypt's claim on the file: an OFD write lock on the claim byte
/// (`i64::MAX - 1`) of its inode in /proc/locks.
fn nbdcrypt_probe(f: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = f.metadata().unwrap().ino();
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    let tail = format!(":{ino} {} ", i64::MAX - 1);
    locks
        .lines()
        .any(|l| l.contains("OFDLCK") && l.contains("WRITE") && l.contains(&tail))
}

#[test]
fn a_file_renamed_over_the_volume_path_is_never_served() {
    let dir = tempdir();
    let img = volume(dir.path());
    // Another volume, same passphrase, other key, other contents.
    let other = dir.path().join("other.img");
    luks_format(&other, 4 * MIB, 512, "pbkdf2", PASS);
    let other_bytes = std::fs::read(&other).unwrap();
    let d = Daemon::volume_in(dir, &img, &[]);
    d.unlock(PASS).success();
    let original = random_bytes(1, 256 * 1024);
    {
        let (mut c, e) = raw::Client::connect_go(&d.sock);
        assert_eq!(e.size, 4 * MIB);
        assert_eq!(c.write(1, MIB, &original, 0), 0, "WRITE");
    }
    d.lock_idle().success();

    // Swap: the path now names the other image; the original lives on only through the claim.
    std::fs::rename(&other, &img).unwrap();
    d.unlock(PASS).success();
    {
        let (mut c, _) = raw::Client::connect_go(&d.sock);
        let served = c.read(2, MIB, original.len() as u32).expect("READ");
        assert_same_bytes(
            &served,
            &original,
            "after the swap, the claimed volume is served",
        );
        // A write after the swap lands in the claimed volume too, never in the swapped-in file.
        assert_eq!(c.write(3, 0, &original, 0), 0, "WRITE");
    }
    d.lock_idle().success();
    assert!(
        std::fs::read(&img).unwrap() == other_bytes,
        "the swapped-in image was not touched"
    );
}
