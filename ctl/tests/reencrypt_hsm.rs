//! `nbdcryptctl reencrypt` on a volume with a keyslot sealed by a PKCS#11 HSM (a real SoftHSM2
//! token): the token is re-sealed under the same HSM key for a keyslot of the new volume key,
//! not erased; the passphrase keyslot follows the passphrase.

use std::process::Command;

mod softhsm;
use softhsm::*;

fn volume_key(vol: &str, key: &str) -> String {
    let o = Command::new("cryptsetup")
        .args([
            "luksDump",
            "--dump-volume-key",
            "--batch-mode",
            "--key-file",
            key,
            vol,
        ])
        .output()
        .expect("cryptsetup");
    assert!(o.status.success(), "{}", text(&o));
    let s = String::from_utf8_lossy(&o.stdout).into_owned();
    s[s.find("MK dump:").expect("MK dump")..].to_owned()
}

#[test]
fn an_hsm_token_is_resealed_for_the_new_volume_key_not_erased() {
    let h = Hsm::new();
    assert_ok(&h.enroll("kek1"));
    let (vol, pin, rec) = (h.vol(), h.pin(), h.path("recovery.key"));
    let before = volume_key(&vol, &rec);
    let o = h.ctl(&[
        "reencrypt",
        &vol,
        "--key-file",
        &rec,
        "--pkcs11-pin",
        &pin,
        "--hotzone-size",
        "1M",
        "-q",
    ]);
    assert_ok(&o);
    assert_ne!(
        volume_key(&vol, &rec),
        before,
        "the volume key did not change"
    );
    // The token opens a keyslot of the new key, through the HSM.
    let o = h.ctl(&["test-token", &vol, "--pkcs11-pin", &pin]);
    assert_ok(&o);
    assert!(text(&o).contains("object=kek1"), "{}", text(&o));
    // Exactly one HSM token is left (the old one went with the old key), and cryptsetup still
    // opens the recovery passphrase.
    let o = h.ctl(&["dump", &vol, "--json"]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ours: Vec<_> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["type"] == "nbdcrypt-pkcs11")
        .collect();
    assert_eq!(ours.len(), 1, "{v:#}");
    assert_eq!(ours[0]["keyslots"].as_array().unwrap().len(), 1, "{v:#}");
    assert!(v["volume_key_created"].is_string(), "{v:#}");
    assert!(cryptsetup_opens(&vol, &rec));
}

#[test]
fn without_the_hsm_pin_the_token_keyslot_is_not_silently_dropped() {
    let h = Hsm::new();
    assert_ok(&h.enroll("kek1"));
    let (vol, rec) = (h.vol(), h.path("recovery.key"));
    let o = h.ctl(&["reencrypt", &vol, "--key-file", &rec, "-q"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("re-seal"), "{}", text(&o));
    // Nothing changed: the token still opens the volume.
    assert_ok(&h.ctl(&["test-token", &vol, "--pkcs11-pin", &h.pin()]));
}

// ---- online, inside nbdcryptd, with the HSM token ---------------------------------------------

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// nbdcryptd on the rig's volume, unlocking itself through the HSM token; killed on drop.
struct Served {
    child: Child,
    control: String,
    sock: String,
    log: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    fn start(h: &Hsm, env: &[(&str, &str)]) -> Served {
        let daemon = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/nbdcryptd");
        assert!(
            daemon.exists(),
            "{}: run cargo build --workspace --bins first",
            daemon.display()
        );
        let (control, sock, log) = (
            h.path("control.sock"),
            h.path("nbd.sock"),
            h.path("daemon.log"),
        );
        let _ = std::fs::remove_file(&control);
        let child = Command::new(&daemon)
            .env("SOFTHSM2_CONF", &h.conf)
            .envs(env.iter().copied())
            .args(["--volume", &h.vol(), "--unix", &sock, "--control", &control])
            .args(["--auto-unlock", "--pkcs11-pin", &h.pin()])
            .args(["--pkcs11-module", MODULE])
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start nbdcryptd");
        let s = Served {
            child,
            control,
            sock,
            log,
        };
        s.wait_for(h, 60, "unlocked by the HSM token", |v| {
            v["state"] == "unlocked"
        });
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn status(&self, h: &Hsm) -> Option<serde_json::Value> {
        let o = h.ctl(&["status", "--json", "--control", &self.control]);
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).ok())
            .flatten()
    }

    fn wait_for(&self, h: &Hsm, secs: u64, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = self.status(h) {
                if pred(&v) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "not {what} within {secs} s\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///nbdcrypt?socket={}", self.sock)
    }

    fn reencrypt(&self, h: &Hsm, args: &[&str]) -> std::process::Output {
        let mut a = vec!["reencrypt", "--control", &self.control];
        a.extend_from_slice(args);
        h.ctl(&a)
    }
}

fn nbdcopy(from: &str, to: &str) {
    let o = Command::new("nbdcopy")
        .args([from, to])
        .output()
        .expect("nbdcopy (libnbd-bin)");
    assert_ok(&o);
}

fn luks_dump(vol: &str) -> String {
    let o = Command::new("cryptsetup")
        .args(["luksDump", vol])
        .output()
        .expect("cryptsetup");
    text(&o)
}

fn hsm_tokens(h: &Hsm) -> Vec<serde_json::Value> {
    let o = h.ctl(&["dump", &h.vol(), "--json"]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["type"] == "nbdcrypt-pkcs11")
        .cloned()
        .collect()
}

/// Online: the daemon carries the passphrase keyslot (the secret given) and the HSM keyslot
/// (re-sealed through its provider settings) over to the new key, and refuses by name a keyslot
/// it cannot carry until told to drop it. Killed mid-zone, the restarted daemon unlocks through
/// the HSM token (both keys from the old and the re-sealed token), resumes and finishes.
#[test]
fn online_reencryption_carries_the_hsm_keyslot_and_resumes_after_a_crash_through_the_token() {
    let h = Hsm::new();
    assert_ok(&h.enroll("kek1"));
    let (vol, rec, other) = (h.vol(), h.path("recovery.key"), h.path("other.key"));
    std::fs::write(&other, b"a passphrase nobody gives the daemon").unwrap();
    let mut add = vec!["luksAddKey", "--batch-mode", "--key-file", &rec];
    add.extend(FAST);
    add.extend([vol.as_str(), other.as_str()]);
    run_ok(Command::new("cryptsetup").args(&add));
    let before = volume_key(&vol, &rec);
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| i.wrapping_mul(2654435761).to_le_bytes()[1])
        .collect();
    let src = h.path("data.bin");
    std::fs::write(&src, &data).unwrap();

    let zone = [
        ("NBDCRYPT_TEST_REENCRYPT_ZONE", "1048576"),
        ("NBDCRYPT_TEST_REENCRYPT_ABORT", "2:half_write"),
    ];
    let mut d = Served::start(&h, &zone);
    nbdcopy(&src, &d.uri());

    // The third keyslot is opened by nothing the daemon has: refused, by name, nothing changed.
    let o = d.reencrypt(&h, &["--key-file", &rec]);
    assert!(!o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("keyslot 2") && t.contains("--drop-unopened"),
        "{t}"
    );
    assert!(
        !t.contains("keyslot 0 (") && !t.contains("keyslot 1 ("),
        "{t}"
    );
    assert!(!luks_dump(&vol).contains("reencrypt"), "started anyway");
    // Without a secret only the HSM keyslot is carried: the passphrase keyslot is named too.
    let o = d.reencrypt(&h, &["--token"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("keyslot 0"), "{}", text(&o));

    // Told to drop it: starts, and dies mid-zone (kill -9 stand-in).
    assert_ok(&d.reencrypt(
        &h,
        &["--key-file", &rec, "--drop-unopened", "--max-rate", "64M"],
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "no crash\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(d.log().contains("half_write"), "{}", d.log());
    drop(d);
    assert!(
        luks_dump(&vol).contains("reencrypt"),
        "no re-encryption on disk"
    );

    // Restart: the token unlock finds both keys, recovers the zone and finishes.
    let d = Served::start(&h, &zone[..1]);
    d.wait_for(&h, 120, "finished", |v| {
        v["reencrypt"]["state"] == "finished"
    });
    let st = d.status(&h).unwrap();
    assert_eq!(
        st["reencrypt"]["max_rate"].as_u64(),
        Some(64 << 20),
        "the rate cap did not survive the restart: {st:#}"
    );
    let back = h.path("back.bin");
    nbdcopy(&d.uri(), &back);
    assert!(std::fs::read(&back).unwrap() == data, "data changed");
    drop(d);

    assert_ne!(
        volume_key(&vol, &rec),
        before,
        "the volume key did not change"
    );
    assert!(cryptsetup_opens(&vol, &rec));
    assert!(
        !cryptsetup_opens(&vol, &other),
        "the dropped keyslot still opens"
    );
    let toks = hsm_tokens(&h);
    assert_eq!(toks.len(), 1, "{toks:?}");
    assert_eq!(toks[0]["keyslots"].as_array().unwrap().len(), 1, "{toks:?}");
    let o = h.ctl(&["test-token", &vol, "--pkcs11-pin", &h.pin()]);
    assert_ok(&o);
    let dump = luks_dump(&vol);
    assert!(
        !dump.contains("nbdcrypt-wipe-pending") && !dump.contains("nbdcrypt-reencrypt"),
        "{dump}"
    );
}

/// A volume opened only by HSM tokens (two keys, no passphrase): `--token` starts it without a
/// secret, and both tokens are re-sealed for keyslots of the new key.
#[test]
fn online_reencryption_of_a_token_only_volume_needs_no_secret() {
    let h = Hsm::new();
    assert_ok(&h.enroll("kek1"));
    assert_ok(&h.enroll("kek2"));
    let (vol, rec) = (h.vol(), h.path("recovery.key"));
    run_ok(Command::new("cryptsetup").args(["luksKillSlot", "--batch-mode", &vol, "0"]));
    assert!(!cryptsetup_opens(&vol, &rec));
    let d = Served::start(&h, &[("NBDCRYPT_TEST_REENCRYPT_ZONE", "4194304")]);
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_ok(&d.reencrypt(&h, &["--token", "--wait"]));
    d.wait_for(&h, 60, "finished", |v| {
        v["reencrypt"]["state"] == "finished"
    });
    // status shows the new key's age as soon as it is the only one.
    let created = d.status(&h).unwrap()["volume_key_created"].as_u64();
    assert!(created.is_some_and(|c| c >= t0), "{created:?}");
    let o = h.ctl(&["status", "--control", &d.control]);
    assert_ok(&o);
    assert!(
        text(&o).contains("volume key") && text(&o).contains("s ago)"),
        "{}",
        text(&o)
    );
    drop(d);
    let toks = hsm_tokens(&h);
    assert_eq!(toks.len(), 2, "{toks:?}");
    let objs: Vec<String> = toks.iter().map(|t| t.to_string()).collect();
    assert!(
        objs.iter().any(|t| t.contains("kek1")) && objs.iter().any(|t| t.contains("kek2")),
        "{objs:?}"
    );
    // Both open a keyslot of the new key, and it is the key the restarted daemon serves with.
    let o = h.ctl(&["test-token", &vol, "--pkcs11-pin", &h.pin()]);
    assert_ok(&o);
    let d = Served::start(&h, &[]);
    assert_eq!(
        d.status(&h).unwrap()["volume_key_created"].as_u64(),
        created
    );
}
