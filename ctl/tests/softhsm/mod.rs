//! A real SoftHSM2 token in a throwaway directory, and the nbdcryptctl/cryptsetup helpers the
//! HSM tests share (`hsm.rs`, `reencrypt_hsm.rs`).

// Shared by several test files, each of which uses only some of the helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const TOKEN: &str = "nbdcrypt-test";
pub const PIN: &str = "1234";
pub const PASS: &[u8] = b"recovery passphrase";
pub const FAST: [&str; 4] = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];

pub struct Hsm {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
}

pub fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is missing: apt-get install -y {package} (./scripts/test.sh does)"
    );
}

pub fn run_ok(cmd: &mut Command) -> Output {
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
    pub fn new() -> Hsm {
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

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    pub fn vol(&self) -> String {
        self.path("vol.img")
    }

    pub fn pin(&self) -> String {
        format!("file:{}", self.path("pin"))
    }

    pub fn uri(label: &str) -> String {
        format!("pkcs11:token={TOKEN};object={label};type=secret-key")
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_nbdcryptctl"))
            .env("SOFTHSM2_CONF", &self.conf)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run nbdcryptctl")
    }

    pub fn enroll(&self, label: &str) -> Output {
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

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        text(o)
    );
}

pub fn cryptsetup_opens(vol: &str, key: &str) -> bool {
    Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file", key, vol])
        .status()
        .expect("cryptsetup (cryptsetup-bin)")
        .success()
}
