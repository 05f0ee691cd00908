//! The rig the quorum tests share (`quorum.rs`, `reencrypt_carry.rs`): a work directory with a
//! volume (recovery passphrase in keyslot 0), on demand a throwaway SoftHSM2 token with one AES
//! key "kek", nbdcryptctl and nbdcryptd run with AWS dummies (moto) and that SoftHSM2.
//! Each test crate uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::moto::aws_env;

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const PIN: &str = "1234";
pub const PASS: &[u8] = b"recovery passphrase";
pub const FAST: [&str; 4] = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[track_caller]
pub fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        text(&o)
    );
    o
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(o.status.success(), "{cmd:?}: {}", text(&o));
    o
}

/// A work directory with a volume (recovery passphrase in keyslot 0) and, on demand, a SoftHSM2
/// token with one AES key "kek".
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub softhsm_conf: PathBuf,
    /// The SoftHSM2 token's label.
    pub token: &'static str,
}

impl Rig {
    /// A volume of `size` (`24M`); `token`: the label of the SoftHSM2 token [`Rig::with_hsm`]
    /// makes.
    pub fn new(size: &str, token: &'static str) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let softhsm_conf = dir.path().join("softhsm2.conf");
        let r = Rig {
            dir,
            softhsm_conf,
            token,
        };
        std::fs::write(r.path("recovery.key"), PASS).unwrap();
        let (vol, key) = (r.vol(), r.path("recovery.key"));
        let mut args = vec!["format", &vol, "--size", size, "--key-file", &key];
        args.extend(FAST);
        ok(r.ctl(&args, None));
        r
    }

    pub fn with_hsm(self) -> Rig {
        assert!(
            Path::new(MODULE).exists(),
            "{MODULE} missing: apt-get install -y softhsm2 opensc"
        );
        std::fs::create_dir_all(self.path("tokens")).unwrap();
        std::fs::write(
            &self.softhsm_conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                self.path("tokens")
            ),
        )
        .unwrap();
        run_ok(
            Command::new("softhsm2-util")
                .env("SOFTHSM2_CONF", &self.softhsm_conf)
                .args(["--init-token", "--free", "--label", self.token])
                .args(["--so-pin", "87654321", "--pin", PIN]),
        );
        run_ok(
            Command::new("pkcs11-tool")
                .env("SOFTHSM2_CONF", &self.softhsm_conf)
                .args(["--module", MODULE, "--token-label", self.token, "--login"])
                .args(["--pin", PIN, "--keygen", "--key-type", "AES:32"])
                .args(["--label", "kek", "--id", "01", "--usage-decrypt"])
                .args(["--usage-wrap", "--sensitive", "--private"]),
        );
        std::fs::write(self.path("pin"), format!("{PIN}\n")).unwrap();
        self
    }

    /// `enroll --quorum 2` of the volume over three holders: the KMS key `alias/db` (moto at
    /// `kms_endpoint`), the rig's HSM key (after [`Rig::with_hsm`]) and a person, alice, whose
    /// passphrase is "alice's words"; the recovery key file opens the volume key. Not checked:
    /// the caller asserts on the output.
    pub fn enroll_kms_hsm_alice(&self, kms_endpoint: &str) -> Output {
        let (vol, rec, pin) = (self.vol(), self.path("recovery.key"), self.pin());
        let uri = format!("pkcs11:token={};object=kek;type=secret-key", self.token);
        let mut args = vec![
            "enroll",
            &vol,
            "--quorum",
            "2",
            "--kms",
            "alias/db",
            "--kms-endpoint",
            kms_endpoint,
            "--region",
            crate::moto::REGION,
            "--pkcs11",
            &uri,
            "--pkcs11-pin",
            &pin,
            "--passphrase-share",
            "alice",
            "--key-file",
            &rec,
        ];
        args.extend(FAST);
        self.ctl(&args, Some("alice's words\n"))
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

    /// nbdcryptctl with `stdin` fed (or none), AWS dummies and the test's SoftHSM2.
    pub fn ctl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        self.ctl_env(args, stdin, &[])
    }

    /// [`Rig::ctl`] with more environment variables (the debug builds' test hooks).
    pub fn ctl_env(&self, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nbdcryptctl"));
        aws_env(&mut cmd);
        let mut child = cmd
            .env("SOFTHSM2_CONF", &self.softhsm_conf)
            .envs(env.iter().copied())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nbdcryptctl");
        let input = child.stdin.take();
        if let (Some(mut w), Some(s)) = (input, stdin) {
            use std::io::Write;
            w.write_all(s.as_bytes()).unwrap();
        }
        child.wait_with_output().expect("wait")
    }

    pub fn daemon(&self, name: &str, extra: &[&str]) -> Daemon {
        self.daemon_env(name, extra, &[])
    }

    pub fn daemon_env(&self, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let bin = Path::new(env!("CARGO_BIN_EXE_nbdcryptctl")).with_file_name("nbdcryptd");
        assert!(
            bin.exists(),
            "{}: run cargo build --workspace --bins first",
            bin.display()
        );
        let control = self.path(&format!("{name}.control"));
        let sock = self.path(&format!("{name}.sock"));
        let log = self.path(&format!("{name}.log"));
        let audit = self.path(&format!("{name}.audit"));
        let mut cmd = Command::new(&bin);
        aws_env(&mut cmd);
        let child = cmd
            .env("SOFTHSM2_CONF", &self.softhsm_conf)
            .envs(env.iter().copied())
            .args(["--volume", &self.vol(), "--unix", &sock])
            .args(["--control", &control, "--audit-log", &audit])
            .args(extra)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start nbdcryptd");
        let d = Daemon {
            child,
            control,
            sock,
            log,
            audit,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !Path::new(&d.control).exists() {
            assert!(Instant::now() < deadline, "no control socket: {}", d.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    /// The volume's header as `nbdcryptctl dump --json` shows it.
    pub fn dump(&self) -> Value {
        serde_json::from_slice(&ok(self.ctl(&["dump", &self.vol(), "--json"], None)).stdout)
            .unwrap()
    }

    /// The quorum tokens of the header, as stored (`cryptsetup token export`).
    pub fn quorum_tokens(&self) -> Vec<(u32, Value)> {
        self.quorum_tokens_of(&self.vol())
    }

    pub fn quorum_tokens_of(&self, vol: &str) -> Vec<(u32, Value)> {
        let dump: Value =
            serde_json::from_slice(&ok(self.ctl(&["dump", vol, "--json"], None)).stdout).unwrap();
        let ids: Vec<u32> = dump["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["type"] == "nbdcrypt-quorum")
            .map(|t| u32::try_from(t["id"].as_u64().unwrap()).unwrap())
            .collect();
        ids.into_iter()
            .map(|id| {
                let o = run_ok(Command::new("cryptsetup").args([
                    "token",
                    "export",
                    "--token-id",
                    &id.to_string(),
                    vol,
                ]));
                (id, serde_json::from_slice(&o.stdout).unwrap())
            })
            .collect()
    }
}

pub struct Daemon {
    pub child: Child,
    pub control: String,
    pub sock: String,
    pub log: String,
    pub audit: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn audit(&self) -> String {
        std::fs::read_to_string(&self.audit).unwrap_or_default()
    }

    pub fn status(&self, r: &Rig) -> Value {
        let o = ok(r.ctl(&["status", "--json", "--control", &self.control], None));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// Waits until `f(status)`; panics with the log after `secs`.
    pub fn wait_for(&self, r: &Rig, secs: u64, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status(r);
            if f(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: {s}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn unlock(&self, r: &Rig) {
        let rec = r.path("recovery.key");
        ok(r.ctl(
            &["unlock", "--control", &self.control, "--key-file", &rec],
            None,
        ));
    }

    pub fn unlock_share(&self, r: &Rig, name: &str, pass: &str) -> Output {
        r.ctl(
            &[
                "unlock",
                "--share",
                name,
                "--stdin",
                "--control",
                &self.control,
            ],
            Some(&format!("{pass}\n")),
        )
    }

    /// `reencrypt --control C --share NAME --stdin`.
    pub fn stage(&self, r: &Rig, name: &str, pass: &str) -> Output {
        r.ctl(
            &[
                "reencrypt",
                "--control",
                &self.control,
                "--share",
                name,
                "--stdin",
            ],
            Some(&format!("{pass}\n")),
        )
    }

    /// `reencrypt --control C --key-file recovery.key ARGS`.
    pub fn reencrypt(&self, r: &Rig, args: &[&str]) -> Output {
        let rec = r.path("recovery.key");
        let mut a = vec!["reencrypt", "--control", &self.control, "--key-file", &rec];
        a.extend_from_slice(args);
        r.ctl(&a, None)
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///nbdcrypt?socket={}", self.sock)
    }
}

pub fn state(s: &Value) -> &str {
    s["state"].as_str().unwrap_or("")
}
