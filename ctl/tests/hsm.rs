//! Keyslots sealed by a PKCS#11 HSM (a real SoftHSM2 token in a throwaway directory): enrol,
//! test-token, the daemon's auto-unlock, rekey to a new HSM key, and the errors an operator
//! meets (wrong PIN, missing key) — with cryptsetup still opening the recovery passphrase.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod softhsm;
use softhsm::*;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_hsm_sealed_keyslot_enrols_tests_auto_unlocks_the_daemon_and_rekeys_to_a_new_key() {
    let h = Hsm::new();
    let o = h.enroll("kek1");
    assert_ok(&o);
    assert!(text(&o).contains("pkcs11"), "{}", text(&o));
    let (vol, pin) = (h.vol(), h.pin());
    let o = h.ctl(&["test-token", &vol, "--pkcs11-pin", &pin]);
    assert_ok(&o);
    assert!(text(&o).contains("object=kek1"), "{}", text(&o));
    assert!(
        cryptsetup_opens(&vol, &h.path("recovery.key")),
        "cryptsetup no longer opens the passphrase slot"
    );

    // cryptsetup adds, then kills, another keyslot: our token slot keeps opening throughout.
    std::fs::write(h.path("other.key"), "another passphrase").unwrap();
    let cs = |args: &[&str]| {
        let o = Command::new("cryptsetup")
            .args(args)
            .output()
            .expect("cryptsetup");
        assert!(o.status.success(), "cryptsetup {args:?}: {}", text(&o));
    };
    let (recovery, other) = (h.path("recovery.key"), h.path("other.key"));
    cs(&[
        "luksAddKey",
        "--batch-mode",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-slot",
        "7",
        "--key-file",
        &recovery,
        &vol,
        &other,
    ]);
    assert_ok(&h.ctl(&["test-token", &vol, "--pin-file", &h.path("pin")]));
    cs(&[
        "luksKillSlot",
        "--batch-mode",
        "--key-file",
        &recovery,
        &vol,
        "7",
    ]);
    assert_ok(&h.ctl(&["test-token", &vol, "--pkcs11-pin", &pin]));

    // The daemon unseals the token by itself at start.
    let daemon = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/nbdcryptd");
    assert!(
        daemon.exists(),
        "{}: run cargo build --workspace --bins first",
        daemon.display()
    );
    let control = h.path("control.sock");
    let d = Daemon(
        Command::new(&daemon)
            .env("SOFTHSM2_CONF", &h.conf)
            .args([
                "--volume",
                &vol,
                "--unix",
                &h.path("nbd.sock"),
                "--control",
                &control,
            ])
            .args([
                "--auto-unlock",
                "--pkcs11-pin",
                &pin,
                "--pkcs11-module",
                MODULE,
            ])
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(h.path("daemon.log")).unwrap())
            .spawn()
            .expect("start nbdcryptd"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = h.ctl(&["status", "--json", "--control", &control]);
        if o.status.success() && text(&o).contains("\"unlocked\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not unlocked: {}\n{}",
            text(&o),
            std::fs::read_to_string(h.path("daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(d);

    // Rotate to the second HSM key: the token now names kek2, and it still opens.
    let slot = text(&h.ctl(&["test-token", &vol, "--pkcs11-pin", &pin]))
        .split("keyslot ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse::<u32>().ok())
        .expect("keyslot number in test-token output");
    let o = h.ctl(&[
        "rekey",
        &vol,
        "--slot",
        &slot.to_string(),
        "--pkcs11",
        &Hsm::uri("kek2"),
        "--pkcs11-pin",
        &pin,
    ]);
    assert_ok(&o);
    let o = h.ctl(&["test-token", &vol, "--pkcs11-pin", &pin]);
    assert_ok(&o);
    assert!(
        text(&o).contains("object=kek2") && !text(&o).contains("object=kek1"),
        "{}",
        text(&o)
    );
    assert!(cryptsetup_opens(&vol, &h.path("recovery.key")));
}

#[test]
fn a_wrong_pin_and_a_missing_key_are_reported_as_such() {
    let h = Hsm::new();
    let o = h.enroll("no-such-key");
    assert!(!o.status.success());
    assert!(
        text(&o).contains("no-such-key") && text(&o).contains("not found"),
        "{}",
        text(&o)
    );

    assert_ok(&h.enroll("kek1"));
    let (vol, wrong) = (h.vol(), format!("file:{}", h.path("wrong-pin")));
    let o = h.ctl(&["test-token", &vol, "--pkcs11-pin", &wrong]);
    assert!(!o.status.success());
    assert!(
        text(&o).to_lowercase().contains("login failed"),
        "{}",
        text(&o)
    );
    assert!(
        !text(&o).contains("9999"),
        "the PIN must never be printed: {}",
        text(&o)
    );
    let o = h.ctl(&["test-token", &vol]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("--pkcs11-pin"),
        "says what is missing: {}",
        text(&o)
    );
}
