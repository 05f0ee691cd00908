//! `nbdcryptctl reencrypt` on a volume with a keyslot sealed by a PKCS#11 HSM (a real SoftHSM2
//! token): the token is re-sealed under the same HSM key for a keyslot of the new volume key,
//! not erased; the passphrase keyslot follows the passphrase.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const TOKEN: &str = "nbdcrypt-test";
const PIN: &str = "1234";
const PASS: &[u8] = b"recovery passphrase";
const FAST: [&str; 4] = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];

struct Hsm {
    dir: tempfile::TempDir,
    conf: PathBuf,
}

fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is missing: apt-get install -y {package} (./scripts/test.sh does)"
    );
}

fn run_ok(cmd: &mut Command) -> Output {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

impl Hsm {
    /// A token with two non-extractable AES-256 keys, "kek1" and "kek2", and a volume with the
    /// recovery passphrase in keyslot 0.
    fn new() -> Hsm {
        require("softhsm2-util", "softhsm2");
        require("pkcs11-tool", "opensc");
        assert!(
            Path::new(MODULE).exists(),
            "{MODULE} missing: apt-get install -y softhsm2"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tokens")).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )
        .unwrap();
        run_ok(
            Command::new("softhsm2-util")
                .env("SOFTHSM2_CONF", &conf)
                .args([
                    "--init-token",
                    "--free",
                    "--label",
                    TOKEN,
                    "--so-pin",
                    "87654321",
                    "--pin",
                    PIN,
                ]),
        );
        for (label, id) in [("kek1", "01"), ("kek2", "02")] {
            run_ok(
                Command::new("pkcs11-tool")
                    .env("SOFTHSM2_CONF", &conf)
                    .args([
                        "--module",
                        MODULE,
                        "--token-label",
                        TOKEN,
                        "--login",
                        "--pin",
                        PIN,
                        "--keygen",
                        "--key-type",
                        "AES:32",
                        "--label",
                        label,
                        "--id",
                        id,
                        "--usage-decrypt",
                        "--usage-wrap",
                        "--sensitive",
                        "--private",
                    ]),
            );
        }
        std::fs::write(dir.path().join("pin"), format!("{PIN}\n")).unwrap();
        std::fs::write(dir.path().join("wrong-pin"), "9999\n").unwrap();
        std::fs::write(dir.path().join("recovery.key"), PASS).unwrap();
        let h = Hsm { dir, conf };
        let mut args = vec![
            "format".to_owned(),
            h.vol(),
            "--size".into(),
            "24M".into(),
            "--key-file".into(),
            h.path("recovery.key"),
        ];
        args.extend(FAST.iter().map(|s| s.to_string()));
        assert_ok(&h.ctl(&args.iter().map(String::as_str).collect::<Vec<_>>()));
        h
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    fn vol(&self) -> String {
        self.path("vol.img")
    }

    fn pin(&self) -> String {
        format!("file:{}", self.path("pin"))
    }

    fn uri(label: &str) -> String {
        format!("pkcs11:token={TOKEN};object={label};type=secret-key")
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_nbdcryptctl"))
            .env("SOFTHSM2_CONF", &self.conf)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run nbdcryptctl")
    }

    fn enroll(&self, label: &str) -> Output {
        let (vol, key, pin) = (self.vol(), self.path("recovery.key"), self.pin());
        self.ctl(&[
            "enroll",
            &vol,
            "--pkcs11",
            &Self::uri(label),
            "--pkcs11-pin",
            &pin,
            "--key-file",
            &key,
        ])
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        text(o)
    );
}

fn cryptsetup_opens(vol: &str, key: &str) -> bool {
    Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file", key, vol])
        .status()
        .expect("cryptsetup (cryptsetup-bin)")
        .success()
}

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
