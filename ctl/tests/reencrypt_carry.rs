//! Online re-encryption carries quorum keyslots (`enroll --quorum K`) to the new volume key,
//! with real holders: AWS KMS (moto's server), a PKCS#11 HSM (a throwaway SoftHSM2 token) and a
//! person's passphrase share given at the control socket (`reencrypt --share NAME`).
//!
//! - 2 of {KMS, HSM, alice}: refused while alice's passphrase is missing (named), a wrong one is
//!   named, then carried; after a restart the new quorum unlocks (KMS + alice, and KMS + HSM) and
//!   the data written before reads back; the old quorum token is gone, alice's share has a fresh
//!   salt, and the audit log says what was carried without any passphrase.
//! - A header writer who lowers the threshold (2 → 1) of a people-only quorum is refused at the
//!   carry, and nothing is written; restoring the token (negative control) lets it carry.

mod moto;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use moto::{aws_env, Moto, REGION};
use serde_json::Value;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const TOKEN: &str = "nbdcrypt-rc";
const PIN: &str = "1234";
const PASS: &[u8] = b"recovery passphrase";
const FAST: [&str; 4] = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[track_caller]
fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        text(&o)
    );
    o
}

fn run_ok(cmd: &mut Command) -> Output {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(o.status.success(), "{cmd:?}: {}", text(&o));
    o
}

/// A work directory with a volume (recovery passphrase in keyslot 0) and, on demand, a SoftHSM2
/// token with one AES key "kek".
struct Rig {
    dir: tempfile::TempDir,
    softhsm_conf: PathBuf,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let softhsm_conf = dir.path().join("softhsm2.conf");
        let r = Rig { dir, softhsm_conf };
        std::fs::write(r.path("recovery.key"), PASS).unwrap();
        let (vol, key) = (r.vol(), r.path("recovery.key"));
        let mut args = vec!["format", &vol, "--size", "24M", "--key-file", &key];
        args.extend(FAST);
        ok(r.ctl(&args, None));
        r
    }

    fn with_hsm(self) -> Rig {
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
                .args(["--init-token", "--free", "--label", TOKEN])
                .args(["--so-pin", "87654321", "--pin", PIN]),
        );
        run_ok(
            Command::new("pkcs11-tool")
                .env("SOFTHSM2_CONF", &self.softhsm_conf)
                .args(["--module", MODULE, "--token-label", TOKEN, "--login"])
                .args(["--pin", PIN, "--keygen", "--key-type", "AES:32"])
                .args(["--label", "kek", "--id", "01", "--usage-decrypt"])
                .args(["--usage-wrap", "--sensitive", "--private"]),
        );
        std::fs::write(self.path("pin"), format!("{PIN}\n")).unwrap();
        self
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

    /// nbdcryptctl with `stdin` fed (or none), AWS dummies and the test's SoftHSM2.
    fn ctl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nbdcryptctl"));
        aws_env(&mut cmd);
        let mut child = cmd
            .env("SOFTHSM2_CONF", &self.softhsm_conf)
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

    fn daemon(&self, name: &str, extra: &[&str]) -> Daemon {
        self.daemon_env(name, extra, &[])
    }

    fn daemon_env(&self, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
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
    fn dump(&self) -> Value {
        serde_json::from_slice(&ok(self.ctl(&["dump", &self.vol(), "--json"], None)).stdout)
            .unwrap()
    }

    /// The quorum tokens of the header, as stored (`cryptsetup token export`).
    fn quorum_tokens(&self) -> Vec<(u32, Value)> {
        self.quorum_tokens_of(&self.vol())
    }

    fn quorum_tokens_of(&self, vol: &str) -> Vec<(u32, Value)> {
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

struct Daemon {
    child: Child,
    control: String,
    sock: String,
    log: String,
    audit: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(&self.audit).unwrap_or_default()
    }

    fn status(&self, r: &Rig) -> Value {
        let o = ok(r.ctl(&["status", "--json", "--control", &self.control], None));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// Waits until `f(status)`; panics with the log after `secs`.
    fn wait_for(&self, r: &Rig, secs: u64, what: &str, f: impl Fn(&Value) -> bool) -> Value {
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

    fn unlock(&self, r: &Rig) {
        let rec = r.path("recovery.key");
        ok(r.ctl(
            &["unlock", "--control", &self.control, "--key-file", &rec],
            None,
        ));
    }

    fn unlock_share(&self, r: &Rig, name: &str, pass: &str) -> Output {
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
    fn stage(&self, r: &Rig, name: &str, pass: &str) -> Output {
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
    fn reencrypt(&self, r: &Rig, args: &[&str]) -> Output {
        let rec = r.path("recovery.key");
        let mut a = vec!["reencrypt", "--control", &self.control, "--key-file", &rec];
        a.extend_from_slice(args);
        r.ctl(&a, None)
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///nbdcrypt?socket={}", self.sock)
    }
}

fn state(s: &Value) -> &str {
    s["state"].as_str().unwrap_or("")
}

fn nbdcopy(from: &str, to: &str) {
    let o = Command::new("nbdcopy")
        .args([from, to])
        .output()
        .expect("nbdcopy (libnbd-bin)");
    assert!(o.status.success(), "nbdcopy {from} {to}: {}", text(&o));
}

/// Writes `data` (the export's size) through the daemon.
fn write_all(r: &Rig, d: &Daemon, data: &[u8]) {
    let f = r.path("in.bin");
    std::fs::write(&f, data).unwrap();
    nbdcopy(&f, &d.uri());
}

fn read_all(r: &Rig, d: &Daemon) -> Vec<u8> {
    let f = r.path("out.bin");
    let _ = std::fs::remove_file(&f);
    nbdcopy(&d.uri(), &f);
    let v = std::fs::read(&f).unwrap();
    std::fs::remove_file(&f).unwrap();
    v
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

fn size(s: &Value) -> usize {
    usize::try_from(s["size"].as_u64().unwrap()).unwrap()
}

fn share_field<'a>(q: &'a Value, holder: &str, field: &str) -> &'a Value {
    q["shares"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["holder"] == holder || s["name"] == holder)
        .unwrap_or_else(|| panic!("no share of {holder}: {q}"))
        .get(field)
        .unwrap_or(&Value::Null)
}

#[test]
fn a_two_of_three_quorum_of_kms_hsm_and_a_person_is_carried_online_and_opens_the_new_key() {
    let moto = Moto::start();
    let key = moto.create_key(Some("db"));
    let r = Rig::new().with_hsm();
    let (vol, rec, pin) = (r.vol(), r.path("recovery.key"), r.pin());
    let uri = format!("pkcs11:token={TOKEN};object=kek;type=secret-key");
    let mut args = vec![
        "enroll",
        &vol,
        "--quorum",
        "2",
        "--kms",
        "alias/db",
        "--kms-endpoint",
        &moto.endpoint,
        "--region",
        REGION,
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
    ok(r.ctl(&args, Some("alice's words\n")));
    let before = r.quorum_tokens();
    assert_eq!(before.len(), 1);
    let (_, old_q) = &before[0];
    assert_eq!(old_q["keyslots"], serde_json::json!(["1"]));

    let kms = [
        "--kms-endpoint",
        &moto.endpoint,
        "--kms-region",
        REGION,
        "--kms-allow-key",
        &key,
    ];
    let hsm = ["--pkcs11-pin", &pin, "--pkcs11-module", MODULE];
    let mut both = vec!["--auto-unlock"];
    both.extend(kms);
    both.extend(hsm);

    let data;
    {
        let d = r.daemon("carry", &both);
        let s = d.wait_for(&r, 60, "KMS + HSM unlock", |s| state(s) == "unlocked");
        data = pattern(size(&s), 7);
        write_all(&r, &d, &data);

        // alice's passphrase is missing: refused, naming the keyslot, alice and what to do.
        let o = d.reencrypt(&r, &[]);
        assert!(!o.status.success(), "{}", text(&o));
        let t = text(&o);
        assert!(
            t.contains("keyslot 1") && t.contains("alice") && t.contains("--share NAME"),
            "{t}"
        );
        assert_eq!(r.quorum_tokens().len(), 1, "a refused start wrote a token");

        // A wrong passphrase is named at the person's terminal (exit 3), nothing staged.
        let o = d.stage(&r, "alice", "not alice's words");
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        assert!(text(&o).contains("\"alice\" is wrong"), "{}", text(&o));
        let o = d.stage(&r, "mallory", "x");
        assert!(
            !o.status.success() && text(&o).contains("mallory"),
            "{}",
            text(&o)
        );

        let o = ok(d.stage(&r, "alice", "alice's words"));
        assert!(text(&o).contains("staged"), "{}", text(&o));
        let o = ok(d.reencrypt(&r, &["--wait"]));
        assert!(text(&o).contains("finished"), "{}", text(&o));
        // Served throughout; the data reads back under the new key.
        assert!(
            read_all(&r, &d) == data,
            "data changed by the re-encryption"
        );

        let audit = d.audit();
        assert!(!audit.contains("alice's words"), "{audit}");
        assert!(!d.log().contains("alice's words"));
        let events: Vec<Value> = audit
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let staged = events
            .iter()
            .find(|e| e["phase"] == "share" && e["error"].is_null())
            .unwrap_or_else(|| panic!("no staged-share event: {audit}"));
        assert_eq!(staged["share"], "alice");
        assert!(staged["peer_uid"].is_u64(), "{staged}");
        assert!(
            events
                .iter()
                .any(|e| e["phase"] == "share" && e["error"].is_string()),
            "the wrong passphrase is not audited: {audit}"
        );
        let start = events
            .iter()
            .find(|e| e["phase"] == "start")
            .unwrap_or_else(|| panic!("no start event: {audit}"));
        assert_eq!(start["carried"]["0"], "same secret", "{start}");
        assert!(
            start["carried"]["1"]
                .as_str()
                .is_some_and(|s| s.starts_with("quorum re-split: 2 of 3")),
            "{start}"
        );
    }

    // On disk: one quorum token, on a new keyslot, same threshold and holders at the same
    // indices, every share sealed anew (alice's under a fresh salt).
    let after = r.quorum_tokens();
    assert_eq!(after.len(), 1, "{after:?}");
    let (_, new_q) = &after[0];
    assert_ne!(new_q["keyslots"], old_q["keyslots"], "{new_q}");
    assert_eq!(new_q["threshold"], 2);
    assert_eq!(new_q["shares"].as_array().unwrap().len(), 3);
    for holder in ["nbdcrypt-aws-kms", "nbdcrypt-pkcs11", "alice"] {
        assert_eq!(
            share_field(new_q, holder, "x"),
            share_field(old_q, holder, "x")
        );
        assert_ne!(
            share_field(new_q, holder, "sealed"),
            share_field(old_q, holder, "sealed"),
            "{holder}'s share was not re-sealed"
        );
    }
    assert_ne!(
        share_field(new_q, "alice", "kdf")["salt"],
        share_field(old_q, "alice", "kdf")["salt"]
    );
    let p = text(&ok(r.ctl(&["policy", &vol], None)));
    assert!(
        p.contains(": 2 of {AWS KMS arn:aws:kms:")
            && p.contains("HSM nbdcrypt-rc/kek, passphrase share alice}"),
        "{p}"
    );

    // Restarted: KMS alone is one of two, alice completes the new quorum; the data is there.
    {
        let mut a = vec!["--auto-unlock"];
        a.extend(kms);
        let d = r.daemon("kms-alice", &a);
        d.wait_for(&r, 60, "one share from KMS", |s| {
            s["locked_reason"]
                .as_str()
                .is_some_and(|m| m.contains("1 of 2 needed shares received (3 holders)"))
        });
        let o = d.unlock_share(&r, "alice", "not alice's words");
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        ok(d.unlock_share(&r, "alice", "alice's words"));
        assert_eq!(state(&d.status(&r)), "unlocked");
        assert!(read_all(&r, &d) == data, "data lost after the carry");
    }
    // KMS + HSM, no person: the machine shares of the new quorum.
    {
        let d = r.daemon("kms-hsm", &both);
        d.wait_for(&r, 60, "KMS + HSM unlock", |s| state(s) == "unlocked");
        assert!(read_all(&r, &d) == data);
    }

    // A second carry, killed mid-zone (abort, the kill -9 stand-in): the restarted daemon finds
    // the old and the new key through the machine shares of the old and the new quorum, recovers
    // the zone and finishes.
    let zone = [
        ("NBDCRYPT_TEST_REENCRYPT_ZONE", "1048576"),
        ("NBDCRYPT_TEST_REENCRYPT_ABORT", "2:half_write"),
    ];
    {
        let mut d = r.daemon_env("crash", &both, &zone);
        d.wait_for(&r, 60, "KMS + HSM unlock", |s| state(s) == "unlocked");
        ok(d.stage(&r, "alice", "alice's words"));
        ok(d.reencrypt(&r, &["--max-rate", "64M"]));
        let deadline = Instant::now() + Duration::from_secs(60);
        while d.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "no crash\n{}", d.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(d.log().contains("half_write"), "{}", d.log());
    }
    let dump = text(&run_ok(Command::new("cryptsetup").args(["luksDump", &vol])));
    assert_eq!(
        dump.matches("nbdcrypt-quorum").count(),
        2,
        "the old and the new quorum: {dump}"
    );
    {
        let d = r.daemon_env("resume", &both, &zone[..1]);
        d.wait_for(&r, 120, "resumed and finished", |s| {
            s["reencrypt"]["state"] == "finished"
        });
        assert!(read_all(&r, &d) == data, "data lost across the crash");
    }
    assert_eq!(r.quorum_tokens().len(), 1);
}

/// Rewrites token `id` of `vol` with `json` (`cryptsetup token import --token-replace`).
fn replace_token(r: &Rig, id: u32, json: &Value) {
    let f = r.path("token.json");
    std::fs::write(&f, json.to_string()).unwrap();
    run_ok(Command::new("cryptsetup").args([
        "token",
        "import",
        "--token-replace",
        "--token-id",
        &id.to_string(),
        "--json-file",
        &f,
        &r.vol(),
    ]));
}

#[test]
fn a_quorum_whose_threshold_a_header_writer_lowered_is_refused_not_carried() {
    let r = Rig::new();
    let (vol, rec) = (r.vol(), r.path("recovery.key"));
    let mut args = vec![
        "enroll",
        &vol,
        "--quorum",
        "2",
        "--passphrase-share",
        "alice",
        "--passphrase-share",
        "bob",
        "--passphrase-share",
        "carol",
        "--key-file",
        &rec,
    ];
    args.extend(FAST);
    ok(r.ctl(&args, Some("pa\npb\npc\n")));
    let (id, genuine) = r.quorum_tokens().remove(0);

    // The attacker's edit: 1 of 3, so any one person (or a stolen passphrase) would open the
    // new key. Every share and tag is left as it was.
    let mut forged = genuine.clone();
    forged["threshold"] = 1.into();
    replace_token(&r, id, &forged);

    let d = r.daemon("forged", &[]);
    d.unlock(&r);
    for (n, p) in [("alice", "pa"), ("bob", "pb"), ("carol", "pc")] {
        ok(d.stage(&r, n, p));
    }
    let o = d.reencrypt(&r, &[]);
    assert!(
        !o.status.success(),
        "a forged threshold was carried: {}",
        text(&o)
    );
    let t = text(&o);
    assert!(
        t.contains("keyslot 1") && t.contains("threshold or shares were changed"),
        "{t}"
    );
    let dump = r.dump();
    assert!(
        !dump.to_string().contains("reencrypt"),
        "the refused start wrote to the header: {dump}"
    );
    // Nothing was dropped either: with --drop-unopened it would be, and the operator chose.
    assert_eq!(r.quorum_tokens()[0].1["threshold"], 1);

    // Second edit: a fourth holder "mallory" appended, with a share that opens with mallory's
    // passphrase and passes its tag (it comes from a genuine 2-of-4 quorum enrolled on a copy
    // of this volume, same UUID and keyslot), but of another secret. Carried, it would make
    // mallory a holder of the new quorum.
    let copy = r.path("copy.img");
    std::fs::copy(r.vol(), &copy).unwrap();
    run_ok(Command::new("cryptsetup").args([
        "luksKillSlot",
        "--batch-mode",
        "--key-file",
        &rec,
        &copy,
        "1",
    ]));
    run_ok(Command::new("cryptsetup").args([
        "token",
        "remove",
        "--token-id",
        &id.to_string(),
        &copy,
    ]));
    let mut args = vec!["enroll", &copy, "--quorum", "2"];
    for n in ["alice", "bob", "carol", "mallory"] {
        args.extend(["--passphrase-share", n]);
    }
    args.extend(["--key-file", &rec]);
    args.extend(FAST);
    ok(r.ctl(&args, Some("pa\npb\npc\npm\n")));
    let other = r.quorum_tokens_of(&copy).remove(0).1;
    assert_eq!(other["keyslots"], genuine["keyslots"], "{other}");
    let mallory = other["shares"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "mallory")
        .unwrap()
        .clone();
    let mut forged = genuine.clone();
    forged["shares"].as_array_mut().unwrap().push(mallory);
    replace_token(&r, id, &forged);
    ok(d.stage(&r, "mallory", "pm"));
    let o = d.reencrypt(&r, &[]);
    assert!(
        !o.status.success(),
        "a forged holder was carried: {}",
        text(&o)
    );
    let t = text(&o);
    assert!(
        t.contains("share mallory does not belong to a 2-of-4 split"),
        "{t}"
    );
    assert!(!r.dump().to_string().contains("reencrypt"));

    // Negative control: the genuine token is carried by the same daemon, same staged people
    // (a refused start keeps them for a retry).
    replace_token(&r, id, &genuine);
    let o = ok(d.reencrypt(&r, &["--wait"]));
    assert!(text(&o).contains("finished"), "{}", text(&o));
    let after = r.quorum_tokens();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].1["threshold"], 2);
    assert_ne!(after[0].1["keyslots"], genuine["keyslots"]);

    // Staged passphrases do not outlive a lock: staged, locked, unlocked, then the start names
    // every person again.
    ok(d.stage(&r, "alice", "pa"));
    ok(r.ctl(&["lock", "--control", &d.control], None));
    d.unlock(&r);
    let o = d.reencrypt(&r, &[]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("the passphrase of shares alice, bob, carol is needed"),
        "{}",
        text(&o)
    );
}
