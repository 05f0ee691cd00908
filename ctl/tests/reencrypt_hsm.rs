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
