//! The running daemon unlocks with a KMS token: `nbdcryptd --auto-unlock` at start and
//! `nbdcryptctl unlock --token` later, against a real moto KMS server on 127.0.0.1; with the
//! KMS down it stays up and locked, says why, and a passphrase still unlocks it.

mod moto;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use moto::{aws_env, Moto, REGION};

const FAST: [&str; 4] = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];
const PASS: &[u8] = b"recovery passphrase";

fn ctl(args: &[&str]) -> Output {
    aws_env(&mut Command::new(env!("CARGO_BIN_EXE_nbdcryptctl")))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run nbdcryptctl")
}

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn daemon_binary() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/nbdcryptd");
    assert!(
        p.exists(),
        "{} missing: run cargo build --workspace --bins first",
        p.display()
    );
    p
}

/// A daemon on a volume enrolled with a KMS key; killed on drop.
struct Served {
    dir: tempfile::TempDir,
    child: Child,
}

impl Served {
    fn vol(dir: &Path) -> String {
        dir.join("vol.img").to_str().unwrap().to_owned()
    }

    /// A volume enrolled with a new moto key; returns the directory and the key id.
    fn prepare(moto: &Moto) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let vol = Self::vol(dir.path());
        let key = dir.path().join("recovery.key");
        std::fs::write(&key, PASS).unwrap();
        let key = key.to_str().unwrap();
        let mut args = vec!["format", &vol, "--size", "24M", "--key-file", key];
        args.extend(FAST);
        ok(ctl(&args));
        let kms = moto.create_key(None);
        ok(ctl(&[
            "enroll",
            &vol,
            "--kms",
            &kms,
            "--region",
            REGION,
            "--kms-endpoint",
            &moto.endpoint,
            "--key-file",
            key,
        ]));
        (dir, kms)
    }

    fn start(dir: tempfile::TempDir, extra: &[&str]) -> Served {
        let p = dir.path();
        let log = std::fs::File::create(p.join("daemon.log")).unwrap();
        let child = aws_env(&mut Command::new(daemon_binary()))
            .arg("--volume")
            .arg(Self::vol(p))
            .arg("--unix")
            .arg(p.join("nbd.sock"))
            .arg("--control")
            .arg(p.join("control.sock"))
            .arg("--audit-log")
            .arg(p.join("audit.jsonl"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nbdcryptd");
        let s = Served { dir, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !s.path("control.sock").exists() {
            assert!(
                Instant::now() < deadline,
                "daemon did not start:\n{}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn control(&self) -> String {
        self.path("control.sock").to_str().unwrap().to_owned()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    fn status(&self) -> serde_json::Value {
        let o = ok(ctl(&["status", "--json", "--control", &self.control()]));
        serde_json::from_slice(&o.stdout).expect("status --json")
    }

    /// Poll until `pred(status)` holds, up to `secs`.
    fn wait_for(
        &self,
        secs: u64,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status {s}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn uri(&self) -> String {
        format!(
            "nbd+unix:///nbdcrypt?socket={}",
            self.path("nbd.sock").display()
        )
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The daemon flags trusting `moto` and the keys `keys` (the operator's KMS configuration).
fn kms_flags(moto: &Moto, keys: &[&str]) -> Vec<String> {
    let mut v = vec!["--kms-endpoint".to_owned(), moto.endpoint.clone()];
    v.extend(["--kms-region".to_owned(), REGION.to_owned()]);
    for k in keys {
        v.extend(["--kms-allow-key".to_owned(), k.to_string()]);
    }
    v
}

fn flags(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn state(s: &serde_json::Value) -> &str {
    s["state"].as_str().unwrap_or("")
}

#[test]
fn auto_unlock_and_unlock_token_open_the_volume_through_the_kms_and_are_audited() {
    let moto = Moto::start();
    let (dir, key) = Served::prepare(&moto);
    let mut args = kms_flags(&moto, &[&key]);
    args.push("--auto-unlock".into());
    let d = Served::start(dir, &flags(&args));
    d.wait_for(30, "auto-unlock", |s| state(s) == "unlocked");

    // The export really serves the decrypted volume: data written reads back.
    let data: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| ((i.wrapping_mul(2_654_435_761) >> 13) & 0xff) as u8)
        .collect();
    let src = d.path("data.bin");
    std::fs::write(&src, &data).unwrap();
    let o = Command::new("nbdcopy")
        .arg(&src)
        .arg(d.uri())
        .output()
        .expect("nbdcopy (libnbd-bin)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    ok(ctl(&["lock", "--control", &d.control()]));
    assert_eq!(state(&d.status()), "locked");
    let o = ok(ctl(&["unlock", "--token", "--control", &d.control()]));
    assert!(String::from_utf8_lossy(&o.stdout).contains("unlocked by token"));
    let back = d.path("back.bin");
    let o = Command::new("nbdcopy")
        .arg(d.uri())
        .arg(&back)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::fs::read(&back).unwrap()[..data.len()] == data[..],
        "data differs after a token unlock"
    );

    let audit = std::fs::read_to_string(d.path("audit.jsonl")).unwrap();
    let events: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(kinds, ["unlock_ok", "lock", "unlock_ok"], "{audit}");
    assert!(
        audit.contains("\"token\""),
        "the audit log names the method: {audit}"
    );
    assert!(!audit.contains(std::str::from_utf8(PASS).unwrap()));
}

#[test]
fn with_the_kms_down_the_daemon_stays_locked_says_why_and_a_passphrase_still_unlocks() {
    let mut moto = Moto::start();
    let (dir, key) = Served::prepare(&moto);
    let mut args = kms_flags(&moto, &[&key]);
    args.push("--auto-unlock".into());
    moto.stop();
    let d = Served::start(dir, &flags(&args));
    let s = d.wait_for(30, "a token failure in the status", |s| {
        state(s) == "locked"
            && s["locked_reason"]
                .as_str()
                .is_some_and(|r| r.contains("token"))
    });
    let reason = s["locked_reason"].as_str().unwrap().to_lowercase();
    assert!(
        reason.contains("unreachable"),
        "reason should say the KMS is unreachable: {reason}"
    );

    // The operator's way in: the recovery passphrase (retry while an auto-unlock attempt runs).
    let key = d.path("recovery.key");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = ctl(&[
            "unlock",
            "--key-file",
            key.to_str().unwrap(),
            "--control",
            &d.control(),
        ]);
        if o.status.success() {
            break;
        }
        assert_eq!(
            o.status.code(),
            Some(4),
            "only 'busy' is acceptable: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            Instant::now() < deadline,
            "the passphrase never got through"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(state(&d.status()), "unlocked");
    let o = ctl(&["unlock", "--token", "--control", &d.control()]);
    assert!(o.status.success(), "already unlocked is not an error");
}

#[test]
fn an_offline_rekey_to_a_new_key_waits_for_the_daemon_to_stop_and_leaves_a_token_it_unlocks_with() {
    let moto = Moto::start();
    let (dir, key) = Served::prepare(&moto);
    // The operator allows the key to rotate to before the rotation.
    let new_key = moto.create_key(None);
    let mut args = kms_flags(&moto, &[&key, &new_key]);
    args.push("--auto-unlock".into());
    let d = Served::start(dir, &flags(&args));
    d.wait_for(30, "auto-unlock", |s| state(s) == "unlocked");
    let vol = Served::vol(d.dir.path());

    // Rotate to a new KMS key while clients could be attached: only the header changes.
    let slot = {
        let f = std::fs::File::open(&vol).unwrap();
        let (h, _) = nbdcrypt::luks2::Luks2Header::read(&f).unwrap();
        let (_, t) = h.tokens().next().expect("a token");
        *t.keyslots().first().unwrap()
    };
    // Offline, a new key needs the daemon stopped: while it serves, the rekey is refused (the
    // same key could be re-sealed through it, `rekey --control`).
    let rekey = [
        "rekey",
        &vol,
        "--slot",
        &slot.to_string(),
        "--kms",
        &new_key,
        "--kms-endpoint",
        &moto.endpoint,
        "--region",
        REGION,
        "--kms-allow-key",
        &key,
    ];
    let o = ctl(&rekey);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("rekey --control"),
        "{o:?}"
    );
    assert_eq!(state(&d.status()), "unlocked", "serving goes on");
    let dir = {
        let mut d = d;
        let _ = d.child.kill();
        let _ = d.child.wait();
        std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap())
    };
    ok(ctl(&rekey));
    // Served::start waits for the control socket to appear: remove the killed daemon's.
    let _ = std::fs::remove_file(dir.path().join("control.sock"));
    let d = Served::start(dir, &flags(&args));
    d.wait_for(30, "auto-unlock with the new key", |s| {
        state(s) == "unlocked"
    });

    ok(ctl(&["lock", "--control", &d.control()]));
    let o = ok(ctl(&["unlock", "--token", "--control", &d.control()]));
    assert!(String::from_utf8_lossy(&o.stdout).contains("unlocked by token"));
    let f = std::fs::File::open(&vol).unwrap();
    let (h, _) = nbdcrypt::luks2::Luks2Header::read(&f).unwrap();
    let tokens: Vec<String> = h
        .tokens()
        .map(|(_, t)| serde_json::to_string(t.json()).unwrap())
        .collect();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    assert!(
        tokens[0].contains(&new_key),
        "the token names the new key: {tokens:?}"
    );
}

#[test]
fn rekey_through_the_control_socket_reseals_with_the_daemons_credentials_and_is_audited() {
    let moto = Moto::start();
    let (dir, key) = Served::prepare(&moto);
    let mut args = kms_flags(&moto, &[&key]);
    args.push("--auto-unlock".into());
    let d = Served::start(dir, &flags(&args));
    d.wait_for(30, "auto-unlock", |s| state(s) == "unlocked");
    let vol = Served::vol(d.dir.path());
    let token_json = || {
        let f = std::fs::File::open(&vol).unwrap();
        let (h, _) = nbdcrypt::luks2::Luks2Header::read(&f).unwrap();
        h.tokens()
            .map(|(id, t)| (id, serde_json::to_string(t.json()).unwrap()))
            .collect::<Vec<_>>()
    };
    let before = token_json();
    assert_eq!(before.len(), 1);

    // No volume path, no KMS settings: the daemon does it with what it has.
    let o = ok(ctl(&["rekey", "--all-tokens", "--control", &d.control()]));
    assert!(String::from_utf8_lossy(&o.stdout).contains("rekeyed"));
    let after = token_json();
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(
        after[0], before[0],
        "a fresh secret means a new sealed blob"
    );
    assert_eq!(state(&d.status()), "unlocked", "serving goes on");

    ok(ctl(&["lock", "--control", &d.control()]));
    ok(ctl(&["unlock", "--token", "--control", &d.control()]));
    let audit = std::fs::read_to_string(d.path("audit.jsonl")).unwrap();
    assert!(audit.contains("\"rekey\""), "{audit}");
}
