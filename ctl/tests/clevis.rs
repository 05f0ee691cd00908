//! clevis interop, both ways, with the real tools on loopback: Debian's `tangd` (under socat),
//! `swtpm` (TCP TCTI), `clevis luks bind/list/pass` and `cryptsetup` on image files.
//!
//! - clevis binds (tang, tpm2, tpm2 with a PCR policy, sss of tang+tpm2, sss of two tangs) →
//!   `nbdcryptd --auto-unlock` opens the volume, given the operator's `--tang-allow`.
//! - `nbdcryptctl enroll --tang/--tpm2/--sss` → `clevis luks list` shows the policy and
//!   `clevis luks pass` gives the passphrase that opens the keyslot (`clevis luks unlock` is
//!   that plus device-mapper, which this kernel lacks).
//! - Hostile tokens: an unallowed Tang URL is refused with no request sent; a Tang whose
//!   advertisement is not signed by the allowed key is refused; an unreachable Tang is retried
//!   with back-off and unlocks once it is back; no secret reaches a log.
//! - An offline re-encryption killed mid-way resumes through the clevis Tang binding alone
//!   (exit 3 and nothing written while the Tang is down).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const INITIAL: &str = "initial-passphrase";

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

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn ctl(args: &[&str]) -> Output {
    run(Command::new(env!("CARGO_BIN_EXE_nbdcryptctl")).args(args))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn free_port() -> u16 {
    // Two consecutive free ports (swtpm's control port is data port + 1).
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < 65000 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `tangd` behind socat on 127.0.0.1, with its own key directory; killed on drop.
struct Tang {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Tang {
    fn start(dir: &Path) -> Tang {
        let db = dir.join("db");
        std::fs::create_dir_all(&db).unwrap();
        ok(run(Command::new("/usr/libexec/tangd-keygen").arg(&db)));
        let mut t = Tang {
            dir: dir.to_owned(),
            port: free_port(),
            child: None,
        };
        t.restart();
        t
    }

    /// (Re)start on the same port and keys.
    fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tangd.log"))
            .unwrap();
        let child = Command::new("socat")
            .arg(format!(
                "TCP-LISTEN:{},bind=127.0.0.1,reuseaddr,fork",
                self.port
            ))
            .arg(format!(
                "EXEC:/usr/libexec/tangd {}",
                self.dir.join("db").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("socat");
        self.child = Some(child);
        wait_port(self.port, "tang");
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The signing-key thumbprint, as an operator gets it.
    fn thumbprint(&self) -> String {
        let o = ok(run(
            Command::new("tang-show-keys").arg(self.port.to_string())
        ));
        stdout(&o).trim().to_owned()
    }

    fn allow(&self) -> String {
        format!("{}={}", self.url(), self.thumbprint())
    }

    /// Requests tangd has answered so far (it logs one line per request).
    fn requests(&self) -> usize {
        std::fs::read_to_string(self.dir.join("tangd.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" => "))
            .count()
    }
}

impl Drop for Tang {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A software TPM 2.0 on TCP; killed on drop.
struct Swtpm {
    port: u16,
    child: Child,
}

impl Swtpm {
    fn start(dir: &Path) -> Swtpm {
        let state = dir.join("tpm");
        std::fs::create_dir_all(&state).unwrap();
        let port = free_port();
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm");
        wait_port(port + 1, "swtpm");
        wait_port(port, "swtpm");
        Swtpm { port, child }
    }

    fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    fn tool(&self, name: &str) -> Command {
        let mut c = Command::new(name);
        c.env("TPM2TOOLS_TCTI", self.tcti());
        c
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A LUKS2 image made by cryptsetup (PBKDF2 for speed, 64 KiB of metadata for several clevis
/// tokens), with the initial passphrase in `pw`.
fn image(dir: &Path, name: &str) -> String {
    let img = dir.join(name);
    let pw = dir.join("pw");
    std::fs::write(&pw, INITIAL).unwrap();
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    ok(run(Command::new("cryptsetup")
        .args(["luksFormat", "--batch-mode", "--type", "luks2"])
        .args(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"])
        .args(["--luks2-metadata-size", "64k", "--key-file"])
        .arg(&pw)
        .arg(&img)));
    img.to_str().unwrap().to_owned()
}

/// `clevis luks bind -y -d IMG -k pw PIN CFG` (with the TCTI for tpm2 pins).
fn clevis_bind(dir: &Path, img: &str, tpm: Option<&Swtpm>, pin: &str, cfg: &str) {
    let mut c = match tpm {
        Some(t) => t.tool("clevis"),
        None => Command::new("clevis"),
    };
    c.args(["luks", "bind", "-y", "-d", img, "-k"])
        .arg(dir.join("pw"))
        .args([pin, cfg]);
    ok(run(&mut c));
}

/// `clevis luks pass -d IMG -s SLOT`.
fn clevis_pass(img: &str, slot: u32, tpm: Option<&Swtpm>) -> Output {
    let mut c = match tpm {
        Some(t) => t.tool("clevis"),
        None => Command::new("clevis"),
    };
    run(c.args(["luks", "pass", "-d", img, "-s", &slot.to_string()]))
}

fn daemon_binary() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_nbdcryptctl")).with_file_name("nbdcryptd");
    assert!(
        p.exists(),
        "{} missing: cargo build --workspace --bins",
        p.display()
    );
    p
}

/// nbdcryptd on an image, started with --auto-unlock and `extra`; killed on drop.
struct Served {
    dir: PathBuf,
    child: Child,
}

impl Served {
    fn start(dir: &Path, img: &str, extra: &[String]) -> Served {
        let d = dir.join(format!("d{}", free_port()));
        std::fs::create_dir_all(&d).unwrap();
        let log = std::fs::File::create(d.join("daemon.log")).unwrap();
        let child = Command::new(daemon_binary())
            .args(["--volume", img, "--auto-unlock"])
            .arg("--unix")
            .arg(d.join("nbd.sock"))
            .arg("--control")
            .arg(d.join("control.sock"))
            .arg("--audit-log")
            .arg(d.join("audit.jsonl"))
            .args(extra)
            .env_remove("TPM2TOOLS_TCTI")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nbdcryptd");
        let s = Served { dir: d, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !s.dir.join("control.sock").exists() {
            assert!(
                Instant::now() < deadline,
                "daemon did not start:\n{}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn log(&self) -> String {
        let audit = std::fs::read_to_string(self.dir.join("audit.jsonl")).unwrap_or_default();
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default() + &audit
    }

    fn status(&self) -> serde_json::Value {
        let sock = self.dir.join("control.sock");
        let o = ok(ctl(&[
            "status",
            "--json",
            "--control",
            sock.to_str().unwrap(),
        ]));
        serde_json::from_slice(&o.stdout).expect("status --json")
    }

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

    fn unlocked(&self, secs: u64) {
        self.wait_for(secs, "auto-unlock", |s| s["state"] == "unlocked");
    }

    /// Waits until auto-unlock gave up and returns the reason.
    fn refused(&self) -> String {
        self.wait_for(30, "a refusal", |s| {
            s["state"] == "locked" && self.log().contains("auto-unlock failed")
        });
        self.log()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn volumes_bound_by_clevis_auto_unlock_in_the_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tang1 = Tang::start(&dir.join("tang1"));
    let tang2 = Tang::start(&dir.join("tang2"));
    let tpm = Swtpm::start(dir);
    let tang_cfg = |t: &Tang| format!("{{\"url\":\"{}\"}}", t.url());
    let cases: Vec<(&str, String, bool)> = vec![
        ("tang", tang_cfg(&tang1), false),
        ("tpm2", "{}".into(), true),
        (
            "sss",
            format!(
                "{{\"t\":2,\"pins\":{{\"tang\":[{{\"url\":\"{}\"}}],\"tpm2\":{{}}}}}}",
                tang1.url()
            ),
            true,
        ),
        (
            "sss",
            format!(
                "{{\"t\":1,\"pins\":{{\"tang\":[{{\"url\":\"{}\"}},{{\"url\":\"{}\"}}]}}}}",
                tang1.url(),
                tang2.url()
            ),
            false,
        ),
        (
            "tpm2",
            r#"{"pcr_bank":"sha256","pcr_ids":"0,7"}"#.into(),
            true,
        ),
    ];
    let operator = args(&[
        "--tang-allow",
        &tang1.allow(),
        "--tang-allow",
        &tang2.allow(),
        "--tpm2-tcti",
        &tpm.tcti(),
    ]);
    for (i, (pin, cfg, uses_tpm)) in cases.iter().enumerate() {
        let img = image(dir, &format!("bound{i}.img"));
        clevis_bind(dir, &img, uses_tpm.then_some(&tpm), pin, cfg);
        let pass = ok(clevis_pass(&img, 1, Some(&tpm))).stdout;
        assert!(pass.len() > 20, "clevis luks pass printed the passphrase");
        let d = Served::start(dir, &img, &operator);
        d.unlocked(30);
        let log = d.log();
        assert!(log.contains("token unsealed"), "{pin} {cfg}: {log}");
        // The recovered passphrase never reaches a log or the audit trail.
        assert!(
            !log.contains(std::str::from_utf8(&pass).unwrap()),
            "the passphrase is in the log"
        );
        assert!(!log.contains(INITIAL));
    }
    // One tang server down: the 1-of-2 sss volume (case 3) still opens through the other.
    drop(tang2);
    let d = Served::start(dir, &dir.join("bound3.img").to_string_lossy(), &operator);
    d.unlocked(30);
}

#[test]
fn a_tpm2_token_with_a_pcr_policy_is_refused_after_the_pcr_changes_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tpm = Swtpm::start(dir);
    let img = image(dir, "pcr.img");
    clevis_bind(
        dir,
        &img,
        Some(&tpm),
        "tpm2",
        r#"{"pcr_bank":"sha256","pcr_ids":"7"}"#,
    );
    // Without the operator naming the TPM, a tpm2 token is not used at all.
    let d = Served::start(dir, &img, &[]);
    let log = d.refused();
    assert!(log.contains("no TPM configured"), "{log}");
    drop(d);
    // Named, and the PCRs unchanged: it opens.
    let d = Served::start(dir, &img, &args(&["--tpm2-tcti", &tpm.tcti()]));
    d.unlocked(30);
    drop(d);
    ok(run(tpm.tool("tpm2_pcrextend").arg(
        "7:sha256=0000000000000000000000000000000000000000000000000000000000000001",
    )));
    let d = Served::start(dir, &img, &args(&["--tpm2-tcti", &tpm.tcti()]));
    let log = d.refused();
    assert!(
        log.contains("PCR policy mismatch") && log.contains("sha256:7"),
        "{log}"
    );
}

#[test]
fn volumes_we_enrol_are_listed_and_opened_by_clevis() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tang1 = Tang::start(&dir.join("tang1"));
    let tang2 = Tang::start(&dir.join("tang2"));
    let tpm = Swtpm::start(dir);
    let img = image(dir, "ours.img");
    let pw = dir.join("pw");
    let pw = pw.to_str().unwrap();
    let tcti = tpm.tcti();
    let (t1, t2) = (tang1.thumbprint(), tang2.thumbprint());
    let (u1, u2) = (tang1.url(), tang2.url());
    let policies: Vec<Vec<&str>> = vec![
        vec!["--tang", &u1, "--tang-thumbprint", &t1],
        vec!["--tpm2", "--tpm2-tcti", &tcti],
        vec!["--tpm2", "--tpm2-tcti", &tcti, "--tpm2-pcr-ids", "0,7"],
        vec![
            "--sss",
            "2",
            "--tang",
            &u1,
            "--tang-thumbprint",
            &t1,
            "--tpm2",
            "--tpm2-tcti",
            &tcti,
        ],
        vec![
            "--sss",
            "1",
            "--tang",
            &u1,
            "--tang-thumbprint",
            &t1,
            "--tang",
            &u2,
            "--tang-thumbprint",
            &t2,
        ],
    ];
    let mut slots = Vec::new();
    for p in &policies {
        let mut a = vec!["enroll", &img[..], "--key-file", pw];
        a.extend(p.iter().copied());
        let o = ok(ctl(&a));
        let out = stdout(&o);
        let slot: u32 = out
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no keyslot in {out}"));
        assert!(
            out.contains("tang-allow") || !p.contains(&"--tang"),
            "{out}"
        );
        slots.push(slot);
    }
    assert_eq!(slots, [1, 2, 3, 4, 5]);

    let list = stdout(&ok(run(tpm
        .tool("clevis")
        .args(["luks", "list", "-d", &img]))));
    let expect = [
        format!("1: tang '{{\"url\":\"{}\"}}'", tang1.url()),
        "2: tpm2 '{\"hash\":\"sha256\",\"key\":\"ecc\"}'".into(),
        "3: tpm2 '{\"hash\":\"sha256\",\"key\":\"ecc\",\"pcr_bank\":\"sha256\",\"pcr_ids\":\"0,7\"}'".into(),
        format!(
            "4: sss '{{\"t\":2,\"pins\":{{\"tang\":[{{\"url\":\"{}\"}}],\"tpm2\":[{{\"hash\":\"sha256\",\"key\":\"ecc\"}}]}}}}'",
            tang1.url()
        ),
        format!(
            "5: sss '{{\"t\":1,\"pins\":{{\"tang\":[{{\"url\":\"{}\"}},{{\"url\":\"{}\"}}]}}}}'",
            tang1.url(),
            tang2.url()
        ),
    ];
    for e in &expect {
        assert!(
            list.contains(e.as_str()),
            "clevis luks list lacks {e}:\n{list}"
        );
    }
    for slot in slots {
        let pass = ok(clevis_pass(&img, slot, Some(&tpm))).stdout;
        assert_eq!(pass.len(), 43, "slot {slot}: a 43-character passphrase");
        let mut c = Command::new("cryptsetup");
        c.args([
            "open",
            "--test-passphrase",
            "--key-file",
            "-",
            "--key-slot",
            &slot.to_string(),
            &img,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&pass).unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "slot {slot}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // `policy` says it in words.
    let policy = stdout(&ok(ctl(&["policy", &img])));
    assert!(
        policy.contains(&format!("clevis tang {}", tang1.url()))
            && policy.contains("clevis tpm2 (PCRs sha256:0,7)")
            && policy.contains("clevis sss 2 of [tang"),
        "{policy}"
    );
    // And our daemon opens what we enrolled, through the same operator settings.
    let d = Served::start(
        dir,
        &img,
        &args(&["--tang-allow", &tang1.allow(), "--tpm2-tcti", &tcti]),
    );
    d.unlocked(30);
    // test-token (offline) agrees.
    let o = ok(ctl(&[
        "test-token",
        &img,
        "--tang-allow",
        &tang1.allow(),
        "--tpm2-tcti",
        &tcti,
    ]));
    assert!(stdout(&o).contains("keyslot 1"), "{}", stdout(&o));
}

#[test]
fn hostile_tang_tokens_are_refused_and_an_unreachable_tang_is_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut tang1 = Tang::start(&dir.join("tang1"));
    let tang2 = Tang::start(&dir.join("tang2"));
    let img = image(dir, "hostile.img");
    clevis_bind(
        dir,
        &img,
        None,
        "tang",
        &format!("{{\"url\":\"{}\"}}", tang1.url()),
    );

    // 1. The token names a server the operator did not allow: refused, and not one request
    //    reaches it.
    let before = tang1.requests();
    let d = Served::start(dir, &img, &args(&["--tang-allow", &tang2.allow()]));
    let log = d.refused();
    assert!(
        log.contains("not allowed") && log.contains(&tang1.url()),
        "{log}"
    );
    assert_eq!(
        tang1.requests(),
        before,
        "a request reached the unallowed server"
    );
    drop(d);

    // 2. The URL is allowed but with another server's thumbprint: the advertisement is not
    //    signed by the allowed key, refused before any recovery request.
    let wrong = format!("{}={}", tang1.url(), tang2.thumbprint());
    let d = Served::start(dir, &img, &args(&["--tang-allow", &wrong]));
    let log = d.refused();
    assert!(log.contains("does not advertise the signing key"), "{log}");
    let tangd = std::fs::read_to_string(dir.join("tang1/tangd.log")).unwrap();
    assert!(
        !tangd.contains("POST /rec"),
        "a recovery was attempted: {tangd}"
    );
    drop(d);

    // 3. Allowed but down: retried with back-off, the reason says unreachable; once the
    //    server is back, the next retry unlocks.
    tang1.stop();
    let d = Served::start(dir, &img, &args(&["--tang-allow", &tang1.allow_cached()]));
    let s = d.wait_for(30, "an unreachable report", |s| {
        s["locked_reason"]
            .as_str()
            .is_some_and(|r| r.contains("unreachable"))
    });
    let reason = s["locked_reason"].as_str().unwrap().to_owned();
    assert!(reason.contains(&tang1.url()), "{reason}");
    assert!(d.log().contains("will retry"), "{}", d.log());
    tang1.restart();
    d.unlocked(60);

    // 4. Offline check with test-token: the same refusal, exit 1, before any request.
    let before = tang1.requests();
    let o = ctl(&["test-token", &img, "--tang-allow", &tang2.allow()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not allowed"));
    assert_eq!(tang1.requests(), before);
}

impl Tang {
    /// `URL=THUMBPRINT` from the key files (works while the server is down).
    fn allow_cached(&self) -> String {
        let db = self.dir.join("db");
        let signing = std::fs::read_dir(&db)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| std::fs::read_to_string(p).is_ok_and(|s| s.contains("ES512")))
            .expect("signing key file");
        let o = ok(run(Command::new("jose")
            .args(["jwk", "thp", "-i"])
            .arg(&signing)));
        format!("{}={}", self.url(), stdout(&o).trim())
    }
}

/// The registry provider: `enroll --clevis SPEC` seals nbdcrypt's own keyslot secret (bound to
/// volume and keyslot) with a clevis pin; the daemon unseals it through the operator's settings.
#[test]
fn enroll_clevis_spec_makes_an_nbdcrypt_token_the_daemon_unseals_through_the_allowed_tang() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tang = Tang::start(&dir.join("tang"));
    let tpm = Swtpm::start(dir);
    let img = image(dir, "spec.img");
    let pw = dir.join("pw");
    let spec = format!("tang:{}", tang.allow());
    let o = ok(ctl(&[
        "enroll",
        &img,
        "--key-file",
        pw.to_str().unwrap(),
        "--clevis",
        &spec,
    ]));
    assert!(stdout(&o).contains("enrolled keyslot 1"), "{}", stdout(&o));
    let o = ok(ctl(&[
        "enroll",
        &img,
        "--key-file",
        pw.to_str().unwrap(),
        "--clevis",
        "tpm2:sha256:7",
        "--tpm2-tcti",
        &tpm.tcti(),
    ]));
    assert!(stdout(&o).contains("enrolled keyslot 2"), "{}", stdout(&o));
    let dump = stdout(&ok(
        run(Command::new("cryptsetup").args(["luksDump", &img])),
    ));
    assert!(dump.contains("nbdcrypt-clevis"), "{dump}");

    // Not allowed: refused before any request.
    let before = tang.requests();
    let d = Served::start(dir, &img, &[]);
    let log = d.refused();
    assert!(log.contains("not configured"), "{log}");
    assert_eq!(tang.requests(), before);
    drop(d);
    // Allowed: opens (keyslot 1 through Tang).
    let d = Served::start(dir, &img, &args(&["--tang-allow", &tang.allow()]));
    d.unlocked(30);
    drop(d);
    // Only the TPM named: keyslot 2 through the TPM.
    let d = Served::start(dir, &img, &args(&["--tpm2-tcti", &tpm.tcti()]));
    d.unlocked(30);
    assert!(d.log().contains("keyslot=2"), "{}", d.log());
}

/// Tang and the TPM as quorum holders (`--quorum 2 --clevis tang:… --clevis tpm2`): the daemon
/// opens the keyslot only when the operator's settings reach both.
#[test]
fn a_quorum_of_tang_and_tpm2_needs_both() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tang = Tang::start(&dir.join("tang"));
    let tpm = Swtpm::start(dir);
    let img = image(dir, "quorum.img");
    let pw = dir.join("pw");
    let spec = format!("tang:{}", tang.allow());
    let o = ok(ctl(&[
        "enroll",
        &img,
        "--key-file",
        pw.to_str().unwrap(),
        "--quorum",
        "2",
        "--clevis",
        &spec,
        "--clevis",
        "tpm2",
        "--tpm2-tcti",
        &tpm.tcti(),
    ]));
    assert!(stdout(&o).contains("keyslot 1"), "{}", stdout(&o));
    // Only Tang allowed (no TPM named): one share of two, stays locked.
    let d = Served::start(dir, &img, &args(&["--tang-allow", &tang.allow()]));
    let log = d.refused();
    assert!(log.contains("quorum"), "{log}");
    drop(d);
    let d = Served::start(
        dir,
        &img,
        &args(&["--tang-allow", &tang.allow(), "--tpm2-tcti", &tpm.tcti()]),
    );
    d.unlocked(30);
}

/// An offline re-encryption (`nbdcryptctl reencrypt VOLUME`) of a volume clevis bound to a
/// Tang, killed inside a zone, is resumed through the clevis binding alone (no passphrase): with
/// the Tang down the resume says so with exit 3 and writes nothing; with it back it finishes,
/// and both the passphrase and the clevis binding open the new key.
#[test]
fn an_interrupted_offline_reencryption_resumes_through_a_clevis_tang_binding() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut tang = Tang::start(&dir.join("tang"));
    let img = image(dir, "resume.img");
    clevis_bind(
        dir,
        &img,
        None,
        "tang",
        &format!("{{\"url\":\"{}\"}}", tang.url()),
    );
    let pw = dir.join("pw").to_str().unwrap().to_owned();
    let allow = tang.allow();
    let resume = [
        "--tang-allow",
        &allow,
        "--no-progress-bar",
        "--hotzone-size",
        "1M",
    ];
    let o = run(Command::new(env!("CARGO_BIN_EXE_nbdcryptctl"))
        .env("NBDCRYPT_TEST_REENCRYPT_CRASH_AFTER_ZONES", "3")
        .args(["reencrypt", &img, "--key-file", &pw])
        .args(resume));
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("simulated crash"),
        "not interrupted: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The Tang down: exit 3, the binding named, not one byte written.
    tang.stop();
    let before = std::fs::read(&img).unwrap();
    let o = ctl(&[&["reencrypt", img.as_str()][..], &resume[..]].concat());
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("token 0 (keyslot 1)") && err.contains("tang"),
        "{err}"
    );
    assert!(std::fs::read(&img).unwrap() == before, "written: {err}");

    // The Tang back: the binding alone resumes and finishes.
    tang.restart();
    let o = ok(ctl(&[
        &["reencrypt", img.as_str(), "--resume-only"][..],
        &resume[..],
    ]
    .concat()));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("re-encryption finished"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    ok(run(Command::new("cryptsetup").args([
        "open",
        "--test-passphrase",
        "--key-file",
        &pw,
        &img,
    ])));
    let listed = stdout(&ok(run(
        Command::new("clevis").args(["luks", "list", "-d", &img])
    )));
    let slot: u32 = listed
        .split(':')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("clevis luks list: {listed}"));
    let pass = ok(clevis_pass(&img, slot, None)).stdout;
    let key = dir.join("clevis.pass");
    std::fs::write(&key, pass).unwrap();
    ok(run(Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(&key)
        .arg(&img)));
}
