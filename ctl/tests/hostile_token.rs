//! The disk is the attacker's: whoever holds it (or a backup) can rewrite the LUKS2 header. These
//! tests play that attacker against the real binaries.
//!
//! - A token doctored to name the attacker's "KMS" (a tiny HTTP server on 127.0.0.1 that
//!   records every connection and answers anything) gets no request from
//!   `nbdcryptd --auto-unlock`, `nbdcryptctl test-token` or `nbdcryptctl rekey`; the refusal
//!   names the token's value and the configured one. A negative control shows the recorder does
//!   see requests when the operator really configures that endpoint.
//! - A swapped header (another volume, same UUID, whose token a KMS the daemon trusts unseals:
//!   moto plays that KMS) is unlocked by an unpinned daemon (the attack works) and refused by a
//!   daemon pinned with `nbdcryptctl pin`: the volume stays locked, the refusal is audited. A
//!   volume with another UUID is refused at start, naming both UUIDs.

mod moto;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moto::{aws_env, Moto, REGION};
use serde_json::Value;

const FAST: [&str; 4] = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];

fn ctl_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nbdcryptctl"));
    aws_env(&mut cmd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run nbdcryptctl")
}

fn ctl(args: &[&str]) -> Output {
    ctl_env(args, &[])
}

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
        "exit {:?}\n{}",
        o.status.code(),
        text(&o)
    );
    o
}

#[track_caller]
fn fails(o: Output) -> Output {
    assert!(!o.status.success(), "expected failure\n{}", text(&o));
    o
}

fn daemon_binary() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_nbdcryptctl")).with_file_name("nbdcryptd");
    assert!(
        p.exists(),
        "{} missing: run cargo build --workspace --bins first",
        p.display()
    );
    p
}

/// An HTTP server that records every connection and answers every request with a body that
/// fits DescribeKey, Encrypt and Decrypt alike (a KMS that "answers anything").
struct FakeKms {
    url: String,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    port: u16,
}

impl FakeKms {
    fn start() -> FakeKms {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake KMS");
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, r, s) = (connections.clone(), requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut stream) = stream else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                std::thread::spawn(move || serve(&mut stream, &r));
            }
        });
        FakeKms {
            url: format!("http://127.0.0.1:{port}"),
            connections,
            requests,
            stop,
            port,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    #[track_caller]
    fn assert_untouched(&self, after: &str) {
        assert_eq!(
            self.connections(),
            0,
            "the fake KMS named only by the token was contacted after {after}: {:?}",
            self.requests.lock().unwrap()
        );
    }
}

impl Drop for FakeKms {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(stream: &mut TcpStream, log: &Mutex<Vec<String>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    loop {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        // Headers, then Content-Length bytes of body.
        let header_end = loop {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().to_owned())
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < header_end + len {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let target = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("x-amz-target"))
            .unwrap_or("?");
        log.lock().unwrap().push(target.to_owned());
        let body = format!(
            "{{\"KeyMetadata\":{{\"KeyId\":\"k\",\"Arn\":\"arn:aws:kms:{REGION}:1:key/k\",\"KeyState\":\"Enabled\"}},\
             \"KeyId\":\"arn:aws:kms:{REGION}:1:key/k\",\"Plaintext\":\"{}\",\"CiphertextBlob\":\"AQID\"}}",
            "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE="
        );
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// A volume with a recovery passphrase in keyslot 0.
struct Vol {
    dir: tempfile::TempDir,
    vol: String,
    key: String,
}

impl Vol {
    fn new(pass: &[u8]) -> Vol {
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("vol.img").to_str().unwrap().to_owned();
        let key = dir.path().join("recovery.key").to_str().unwrap().to_owned();
        std::fs::write(&key, pass).unwrap();
        let mut args = vec!["format", &vol, "--size", "20M", "--key-file", &key];
        args.extend(FAST);
        ok(ctl(&args));
        Vol { dir, vol, key }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn enroll(&self, moto: &Moto, key: &str) {
        ok(ctl(&[
            "enroll",
            &self.vol,
            "--kms",
            key,
            "--kms-region",
            REGION,
            "--kms-endpoint",
            &moto.endpoint,
            "--key-file",
            &self.key,
        ]));
    }

    /// The header, also one in the middle of a re-encryption.
    fn header(&self) -> nbdcrypt::luks2::Luks2Header {
        let f = std::fs::File::open(&self.vol).unwrap();
        nbdcrypt::luks2::online::read_any_header(&f).unwrap()
    }

    /// Rewrites our token (the first) through the project's LUKS2 API, as an attacker with the
    /// disk would (any tool that rewrites the JSON area and its checksum does the same).
    fn doctor_token(&self, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.vol)
            .unwrap();
        let (mut h, _) = nbdcrypt::luks2::Luks2Header::read(&f).unwrap();
        let (id, t) = h
            .tokens()
            .next()
            .map(|(id, t)| (id, t.json().clone()))
            .expect("a token");
        let mut json = t;
        edit(&mut json);
        h.remove_token(&f, id).unwrap();
        h.add_token(&f, nbdcrypt::luks2::Token::from_json(json).unwrap())
            .unwrap();
    }

    fn token(&self) -> serde_json::Map<String, Value> {
        self.header()
            .tokens()
            .next()
            .map(|(_, t)| t.json().clone())
            .expect("a token")
    }
}

/// A running nbdcryptd; killed on drop.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts nbdcryptd with sockets and logs in `dir` (`name` tells runs apart).
    fn spawn(dir: &Path, name: &str, args: &[&str]) -> Child {
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        aws_env(&mut Command::new(daemon_binary()))
            .arg("--unix")
            .arg(dir.join(format!("{name}.nbd.sock")))
            .arg("--control")
            .arg(dir.join(format!("{name}.control.sock")))
            .arg("--audit-log")
            .arg(dir.join(format!("{name}.audit.jsonl")))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nbdcryptd")
    }

    fn start(dir: &Path, name: &str, args: &[&str]) -> Daemon {
        let mut child = Self::spawn(dir, name, args);
        let log = dir.join(format!("{name}.log"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dir.join(format!("{name}.control.sock")).exists() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "nbdcryptd exited ({st}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "nbdcryptd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Daemon { child, log }
    }

    fn control(&self) -> String {
        self.log
            .with_extension("")
            .with_extension("control.sock")
            .to_str()
            .unwrap()
            .to_owned()
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.log.with_extension("").with_extension("audit.jsonl"))
            .unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn status(&self) -> Value {
        let o = ok(ctl(&["status", "--json", "--control", &self.control()]));
        serde_json::from_slice(&o.stdout).expect("status --json")
    }

    fn wait_for(&self, secs: u64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
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
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn state(s: &Value) -> &str {
    s["state"].as_str().unwrap_or("")
}

fn reason(s: &Value) -> String {
    s["locked_reason"].as_str().unwrap_or("").to_owned()
}

#[test]
fn a_token_naming_a_fake_kms_gets_no_request_from_the_daemon_or_nbdcryptctl() {
    let moto = Moto::start();
    let key = moto.create_key(None);
    let fake = FakeKms::start();
    let v = Vol::new(b"victim passphrase");
    v.enroll(&moto, &key);
    let arn = v.token()["kms-key-id"].as_str().unwrap().to_owned();
    assert!(arn.ends_with(&key), "{arn}");
    // The attacker points the token at their server; the key stays the operator's.
    v.doctor_token(|t| {
        t.insert("kms-endpoint".into(), fake.url.clone().into());
    });
    assert_eq!(v.token()["kms-endpoint"], fake.url.as_str());
    let dir = v.dir.path().to_owned();

    // nbdcryptd --auto-unlock, configured for the operator's KMS: refused, naming both endpoints.
    {
        let d = Daemon::start(
            &dir,
            "configured",
            &[
                "--volume",
                &v.vol,
                "--auto-unlock",
                "--kms-endpoint",
                &moto.endpoint,
                "--kms-region",
                REGION,
                "--kms-allow-key",
                &arn,
            ],
        );
        let s = d.wait_for(30, "the token failure", |s| reason(s).contains("token"));
        assert_eq!(state(&s), "locked");
        let r = reason(&s);
        assert!(
            r.contains(&fake.url) && r.contains(&moto.endpoint),
            "the error names both endpoints: {r}"
        );
        assert!(r.contains("before any aws-kms request"), "{r}");
        // Asked again through the control socket: the same, still nothing sent.
        let o = fails(ctl(&["unlock", "--token", "--control", &d.control()]));
        assert!(text(&o).contains(&fake.url), "{}", text(&o));
        assert!(
            d.audit().contains("unlock_failed"),
            "audited: {}",
            d.audit()
        );
    }
    fake.assert_untouched("nbdcryptd --auto-unlock with a configured KMS");

    // nbdcryptd with no KMS configured at all: says which flag / key to set.
    {
        let d = Daemon::start(&dir, "unconfigured", &["--volume", &v.vol, "--auto-unlock"]);
        let s = d.wait_for(30, "the token failure", |s| reason(s).contains("token"));
        let r = reason(&s);
        assert!(
            r.contains("--kms-allow-key") && r.contains("kms-allow-key = "),
            "{r}"
        );
        assert_eq!(state(&s), "locked");
    }
    fake.assert_untouched("nbdcryptd --auto-unlock without KMS configuration");

    // nbdcryptctl test-token: without configuration, and with the operator's.
    let o = fails(ctl(&["test-token", &v.vol]));
    assert!(text(&o).contains("--kms-allow-key"), "{}", text(&o));
    let o = fails(ctl(&[
        "test-token",
        &v.vol,
        "--kms-endpoint",
        &moto.endpoint,
        "--kms-allow-key",
        &key,
    ]));
    assert!(
        text(&o).contains(&fake.url) && text(&o).contains(&moto.endpoint),
        "{}",
        text(&o)
    );
    // A key the operator did not allow (the attacker's ARN) is refused too, naming both keys.
    let o = fails(ctl(&[
        "test-token",
        &v.vol,
        "--kms-endpoint",
        &fake.url,
        "--kms-allow-key",
        "arn:aws:kms:us-east-1:111122223333:key/operators-key",
    ]));
    assert!(
        text(&o).contains(&arn) && text(&o).contains("operators-key"),
        "{}",
        text(&o)
    );
    fake.assert_untouched("nbdcryptctl test-token");

    // nbdcryptctl rekey unsealing the old token: refused before any request.
    let o = fails(ctl(&[
        "rekey",
        &v.vol,
        "--slot",
        "1",
        "--kms-endpoint",
        &moto.endpoint,
        "--kms-allow-key",
        &key,
    ]));
    assert!(text(&o).contains(&fake.url), "{}", text(&o));
    let o = fails(ctl(&["rekey", &v.vol, "--slot", "1"]));
    assert!(text(&o).contains("--kms-allow-key"), "{}", text(&o));
    // rekey with a passphrase and a new key but no endpoint flag: the endpoint is the operator's
    // (here AWS_ENDPOINT_URL_KMS), never the old token's. Before, the fake got the new secret.
    let o = ok(ctl_env(
        &[
            "rekey",
            &v.vol,
            "--slot",
            "1",
            "--key-file",
            &v.key,
            "--kms",
            &key,
        ],
        &[("AWS_ENDPOINT_URL_KMS", &moto.endpoint)],
    ));
    assert!(text(&o).contains("rekeyed token"), "{}", text(&o));
    fake.assert_untouched("nbdcryptctl rekey");
    let t = v.token();
    assert!(
        t.get("kms-endpoint").is_none(),
        "no endpoint was configured, none is recorded: {t:?}"
    );
    ok(ctl(&[
        "test-token",
        &v.vol,
        "--kms-endpoint",
        &moto.endpoint,
        "--kms-allow-key",
        &key,
    ]));

    // Negative control: an operator who does configure the fake endpoint reaches it (so the
    // recorder above would have seen any request).
    v.doctor_token(|t| {
        t.insert("kms-endpoint".into(), fake.url.clone().into());
    });
    let _ = ctl(&[
        "test-token",
        &v.vol,
        "--kms-endpoint",
        &fake.url,
        "--kms-allow-key",
        &key,
    ]);
    assert!(
        fake.connections() > 0,
        "the recorder saw nothing even when configured"
    );
}

/// Copies the header and keyslot area (everything before the data segment) of `from` over `to`.
fn swap_header(from: &Vol, to: &Vol) {
    let offset = usize::try_from(from.header().data_segment().offset).unwrap();
    let bytes = std::fs::read(&from.vol).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&to.vol)
        .unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&bytes[..offset], 0).unwrap();
    f.sync_all().unwrap();
}

/// The attacker's volume: the victim's UUID, the attacker's passphrase (`a.key`), and a token
/// sealed by a KMS key the daemon accepts (the attacker can Encrypt with it, or controls it).
fn impostor(uuid: &str, moto: &Moto, kms_key: &str) -> Vol {
    let attacker = tempfile::tempdir().unwrap();
    let a_vol = attacker.path().join("a.img");
    let a_key = attacker.path().join("a.key");
    std::fs::write(&a_key, b"attacker passphrase").unwrap();
    std::fs::File::create(&a_vol)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    let o = Command::new("cryptsetup")
        .args([
            "luksFormat",
            "--type",
            "luks2",
            "--batch-mode",
            "--uuid",
            uuid,
            "--pbkdf",
            "pbkdf2",
        ])
        .args(["--pbkdf-force-iterations", "1000", "--key-file"])
        .arg(&a_key)
        .arg(&a_vol)
        .output()
        .expect("cryptsetup");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = Vol {
        dir: attacker,
        vol: a_vol.to_str().unwrap().to_owned(),
        key: a_key.to_str().unwrap().to_owned(),
    };
    a.enroll(moto, kms_key);
    a
}

/// The victim's volume, pinned by its operator while it is theirs (checked with their
/// passphrase): `(volume, its UUID, the daemon config with the pin)`.
fn pinned_victim() -> (Vol, String, PathBuf) {
    let victim = Vol::new(b"victim passphrase");
    let uuid = victim.header().uuid().to_owned();
    let conf = victim.path("nbdcryptd.toml");
    let o = ok(ctl(&[
        "pin",
        &victim.vol,
        "--key-file",
        &victim.key,
        "--write",
        conf.to_str().unwrap(),
    ]));
    assert!(text(&o).contains("pinned"), "{}", text(&o));
    (victim, uuid, conf)
}

/// A copy of `v` (its header to put back later).
fn backup_of(v: &Vol) -> Vol {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("backup.img").to_str().unwrap().to_owned();
    std::fs::copy(&v.vol, &vol).unwrap();
    Vol {
        dir,
        vol,
        key: v.key.clone(),
    }
}

/// The operator's KMS settings: moto's endpoint, and `key` allowed.
fn kms_flags<'a>(moto: &'a Moto, key: &'a str) -> [&'a str; 6] {
    [
        "--kms-endpoint",
        &moto.endpoint,
        "--kms-region",
        REGION,
        "--kms-allow-key",
        key,
    ]
}

/// `nbdcryptctl unlock --key-file KEY` on `d` succeeds.
#[track_caller]
fn unlock_with(d: &Daemon, key: &str) {
    ok(ctl(&[
        "unlock",
        "--key-file",
        key,
        "--control",
        &d.control(),
    ]));
}

/// `nbdcryptctl unlock ARGS` on the pinned daemon `d` is refused by the pin.
#[track_caller]
fn assert_pin_refuses(d: &Daemon, args: &[&str]) {
    let control = d.control();
    let mut all = vec!["unlock", "--control", control.as_str()];
    all.extend(args);
    let o = fails(ctl(&all));
    assert!(
        text(&o).contains("does not match the pinned"),
        "{}",
        text(&o)
    );
}

/// The negative control of the swap tests: a daemon without the pin unlocks `victim`'s
/// (swapped) header through the token alone.
fn unpinned_daemon_unlocks(victim: &Vol, kms: [&str; 6], name: &str, what: &str) -> Daemon {
    let mut args = vec!["--volume", victim.vol.as_str(), "--auto-unlock"];
    args.extend(kms);
    let d = Daemon::start(victim.dir.path(), name, &args);
    d.wait_for(30, what, |s| state(s) == "unlocked");
    d
}

#[test]
fn a_swapped_header_is_refused_by_a_pinned_daemon_and_the_volume_stays_locked() {
    // moto plays a KMS the daemon trusts and the attacker can Encrypt with (or controls).
    let moto = Moto::start();
    let key = moto.create_key(None);
    let (victim, uuid, conf) = pinned_victim();
    let dir = victim.dir.path().to_owned();
    let pinned = std::fs::read_to_string(&conf).unwrap();
    assert!(
        pinned.contains(&format!("volume-uuid = \"{uuid}\"")),
        "{pinned}"
    );
    assert!(pinned.contains("volume-key-digest = \"pbkdf2:"), "{pinned}");

    // The attacker: their own volume with the victim's UUID, their passphrase, and a token
    // sealed by a KMS key the daemon accepts; its header then replaces the victim's.
    let a = impostor(&uuid, &moto, &key);
    let backup = backup_of(&victim);
    swap_header(&a, &victim);
    assert_eq!(
        victim.header().uuid(),
        uuid,
        "same UUID: only the key digest tells them apart"
    );

    let kms = kms_flags(&moto, &key);

    // nbdcryptctl test-token: the token opens the attacker's header; with the daemon's config
    // (and so its pin) that is a failure, as in the daemon.
    let mut args = vec!["test-token", victim.vol.as_str()];
    args.extend(kms);
    ok(ctl(&args));
    args.extend(["--config", conf.to_str().unwrap()]);
    let o = fails(ctl(&args));
    assert!(
        text(&o).contains("does not match the pinned volume-key-digest"),
        "{}",
        text(&o)
    );

    // enroll with the daemon's config: the attacker's key gets no keyslot, token or pin lines.
    let before = std::fs::read(&victim.vol).unwrap();
    let o = fails(ctl(&[
        "enroll",
        &victim.vol,
        "--kms",
        &key,
        "--kms-region",
        REGION,
        "--kms-endpoint",
        &moto.endpoint,
        "--key-file",
        &a.key,
        "--config",
        conf.to_str().unwrap(),
    ]));
    assert!(
        text(&o).contains("does not match the pinned"),
        "{}",
        text(&o)
    );
    assert!(
        std::fs::read(&victim.vol).unwrap() == before,
        "a refused enroll wrote to the volume"
    );

    // Negative control: without the pin the daemon unlocks the swapped header (the attack).
    drop(unpinned_daemon_unlocks(
        &victim,
        kms,
        "unpinned",
        "the unpinned daemon to unlock the attacker's header",
    ));

    // Pinned (the config written by `nbdcryptctl pin`): refused, locked, audited.
    let mut args = vec!["--config", conf.to_str().unwrap(), "--auto-unlock"];
    args.extend(kms);
    let d = Daemon::start(&dir, "pinned", &args);
    let s = d.wait_for(30, "the pin refusal", |s| reason(s).contains("refused"));
    assert_eq!(state(&s), "locked");
    let r = reason(&s);
    assert!(
        r.contains("does not match the pinned volume-key-digest"),
        "{r}"
    );
    let digest = pinned
        .lines()
        .find(|l| l.starts_with("volume-key-digest"))
        .unwrap();
    let digest = digest.split('"').nth(1).unwrap();
    assert!(r.contains(digest), "the error names the pinned digest: {r}");
    // The attacker's passphrase opens a keyslot of their header: refused all the same.
    assert_pin_refuses(&d, &["--key-file", &a.key]);
    assert_pin_refuses(&d, &["--token"]);
    assert_eq!(state(&d.status()), "locked");
    let audit = d.audit();
    let events: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(events.len() >= 3, "{audit}");
    for e in &events {
        assert_eq!(e["event"], "unlock_failed", "{audit}");
        assert!(
            e["error"]
                .as_str()
                .unwrap_or("")
                .contains("pinned volume-key-digest"),
            "{e}"
        );
    }
    assert!(!audit.contains("unlock_ok"), "{audit}");

    // Positive control: the victim's own header back (from a backup), the same pinned daemon
    // (it re-reads the header at each unlock) unlocks with the victim's passphrase.
    swap_header(&backup, &victim);
    unlock_with(&d, &victim.key);
    assert_eq!(state(&d.status()), "unlocked");
}

/// The same attack with a header that claims a re-encryption in progress: unlocking such a
/// volume takes the resume path (both keys, a router across the frontier), which must hold the
/// pin too — the pinned key must be the one the rotation started from.
#[test]
fn a_swapped_header_in_the_middle_of_a_reencryption_is_refused_by_a_pinned_daemon() {
    let moto = Moto::start();
    let key = moto.create_key(None);
    let (victim, uuid, conf) = pinned_victim();
    let dir = victim.dir.path().to_owned();
    let kms = kms_flags(&moto, &key);
    // The attacker's volume, its re-encryption stopped after one zone (its KMS token re-sealed
    // for the new key, so the tokens alone open both keys), then its header over the victim's.
    let a = impostor(&uuid, &moto, &key);
    let mut args = vec![
        "reencrypt",
        a.vol.as_str(),
        "--key-file",
        &a.key,
        "--hotzone-size",
        "1M",
        "--quiet",
    ];
    args.extend(kms);
    let o = ctl_env(&args, &[("NBDCRYPT_TEST_REENCRYPT_STOP_AFTER_ZONES", "1")]);
    assert!(!o.status.success(), "the test hook stops it\n{}", text(&o));
    let o = ok(ctl(&["reencrypt", &a.vol, "--status"]));
    assert!(text(&o).contains("in progress"), "{}", text(&o));
    let backup = backup_of(&victim);
    swap_header(&a, &victim);

    // Negative control: unpinned, the daemon resumes the attacker's re-encryption through the
    // tokens (the attack: the victim's clients would write under the attacker's keys).
    let d = unpinned_daemon_unlocks(
        &victim,
        kms,
        "unpinned-reenc",
        "the unpinned daemon to resume the attacker's re-encryption",
    );
    assert!(d.log().contains("re-encryption"), "{}", d.log());
    drop(d);

    // Pinned: refused, locked, through the tokens and through the attacker's passphrase.
    let mut args = vec!["--config", conf.to_str().unwrap(), "--auto-unlock"];
    args.extend(kms);
    let d = Daemon::start(&dir, "pinned-reenc", &args);
    let s = d.wait_for(30, "the pin refusal", |s| reason(s).contains("refused"));
    assert_eq!(state(&s), "locked", "{s}\n{}", d.log());
    assert!(
        reason(&s).contains("does not match the pinned volume-key-digest"),
        "{s}"
    );
    assert_pin_refuses(&d, &["--key-file", &a.key]);
    assert_eq!(state(&d.status()), "locked");
    assert!(!d.audit().contains("unlock_ok"), "{}", d.audit());

    // Positive control: the victim's header back, the same daemon unlocks with its passphrase.
    swap_header(&backup, &victim);
    unlock_with(&d, &victim.key);
    assert_eq!(state(&d.status()), "unlocked");
}

/// A header rolled back to the middle of an earlier rotation: its re-encryption digest is
/// genuine and the same passphrase opens both its keys, and its *new* key is the one pinned
/// after that rotation finished. Resuming it would serve data above its frontier under the
/// rotated-out key (and then destroy it): offline and in the daemon it is refused, untouched.
#[test]
fn a_header_rolled_back_to_the_middle_of_an_earlier_rotation_is_refused_by_the_pin() {
    let (v, _, before_conf) = pinned_victim();
    let conf = |c: &PathBuf| c.to_str().unwrap().to_owned();
    // A rotation, stopped after two 1 MiB zones; the attacker keeps that header.
    let o = ctl_env(
        &[
            "reencrypt",
            &v.vol,
            "--key-file",
            &v.key,
            "--hotzone-size",
            "1M",
            "--quiet",
        ],
        &[("NBDCRYPT_TEST_REENCRYPT_STOP_AFTER_ZONES", "2")],
    );
    assert!(!o.status.success(), "the test hook stops it\n{}", text(&o));
    let mid = backup_of(&v);
    // Control: the genuine mid-way header resumes under the pin taken before the rotation.
    ok(ctl(&[
        "reencrypt",
        &v.vol,
        "--resume-only",
        "--key-file",
        &v.key,
        "--config",
        &conf(&before_conf),
        "--quiet",
    ]));
    // The operator pins the new key, as the README says to after a rotation.
    let after_conf = v.path("after.toml");
    ok(ctl(&[
        "pin",
        &v.vol,
        "--key-file",
        &v.key,
        "--write",
        &conf(&after_conf),
    ]));
    swap_header(&mid, &v);
    let rolled_back = std::fs::read(&v.vol).unwrap();
    let o = fails(ctl(&[
        "reencrypt",
        &v.vol,
        "--resume-only",
        "--key-file",
        &v.key,
        "--config",
        &conf(&after_conf),
        "--quiet",
    ]));
    assert!(text(&o).contains("rolled back"), "{}", text(&o));
    assert!(
        std::fs::read(&v.vol).unwrap() == rolled_back,
        "a refused resume wrote to the volume"
    );
    let d = Daemon::start(
        v.dir.path(),
        "rolled-back",
        &["--config", &conf(&after_conf)],
    );
    assert_pin_refuses(&d, &["--key-file", &v.key]);
    assert_eq!(state(&d.status()), "locked");
    drop(d);
    assert!(
        std::fs::read(&v.vol).unwrap() == rolled_back,
        "the refused daemon wrote to the volume"
    );
}

/// The digest line of a daemon config written by `nbdcryptctl pin`.
fn pinned_digest(conf: &Path) -> String {
    std::fs::read_to_string(conf)
        .unwrap()
        .lines()
        .find(|l| l.starts_with("volume-key-digest"))
        .expect("a volume-key-digest line")
        .to_owned()
}

/// After a rotation of `v` (pinned in `conf`, whose digest line was `before`): the pin in `conf`
/// names the new key, a daemon started with it unlocks the current header and refuses the
/// header from before the rotation (`old`, the rotated-out key, which may have leaked).
fn assert_pin_moved_to_the_new_key(v: &Vol, conf: &Path, before: &str, old: &Vol, name: &str) {
    let after = pinned_digest(conf);
    assert_ne!(after, before, "the pin still names the rotated-out key");
    let current = backup_of(v);
    let d = Daemon::start(v.dir.path(), name, &["--config", conf.to_str().unwrap()]);
    unlock_with(&d, &v.key);
    ok(ctl(&["lock", "--control", &d.control()]));
    swap_header(old, v);
    assert_pin_refuses(&d, &["--key-file", &v.key]);
    assert_eq!(state(&d.status()), "locked");
    // The refusal says to compare with `nbdcryptctl pin`: re-pinning the old header over the
    // moved pin is refused unless asked for (--replace), and then only with a passphrase.
    let o = fails(ctl(&["pin", &v.vol, "--write", conf.to_str().unwrap()]));
    assert!(text(&o).contains("pins another volume key"), "{}", text(&o));
    let o = fails(ctl(&[
        "pin",
        &v.vol,
        "--write",
        conf.to_str().unwrap(),
        "--replace",
    ]));
    assert!(text(&o).contains("--replace needs"), "{}", text(&o));
    assert_eq!(pinned_digest(conf), after, "a refused pin rewrote the file");
    swap_header(&current, v);
    unlock_with(&d, &v.key);
}

/// Offline: `reencrypt --config FILE` moves FILE's pin to the new key when it finishes.
#[test]
fn after_an_offline_rotation_the_pin_names_the_new_key_and_the_old_header_is_refused() {
    let (v, _, conf) = pinned_victim();
    let before = pinned_digest(&conf);
    let old = backup_of(&v);
    let o = ok(ctl(&[
        "reencrypt",
        &v.vol,
        "--key-file",
        &v.key,
        "--config",
        conf.to_str().unwrap(),
    ]));
    assert!(
        text(&o).contains("now names the new volume key"),
        "{}",
        text(&o)
    );
    assert_pin_moved_to_the_new_key(&v, &conf, &before, &old, "after-offline");
}

/// Online: the daemon moves its pin (in memory and in its --config file) when the run finishes;
/// a lock and unlock in the same process opens the new key, and the old header is refused.
#[test]
fn after_an_online_rotation_the_pin_names_the_new_key_and_the_old_header_is_refused() {
    let (v, _, conf) = pinned_victim();
    let before = pinned_digest(&conf);
    let old = backup_of(&v);
    let d = Daemon::start(
        v.dir.path(),
        "online",
        &["--config", conf.to_str().unwrap()],
    );
    unlock_with(&d, &v.key);
    ok(ctl(&[
        "reencrypt",
        "--control",
        &d.control(),
        "--key-file",
        &v.key,
        "--wait",
    ]));
    // Same process: the in-memory pin moved too.
    ok(ctl(&["lock", "--control", &d.control()]));
    unlock_with(&d, &v.key);
    ok(ctl(&["lock", "--control", &d.control()]));
    let current = backup_of(&v);
    swap_header(&old, &v);
    assert_pin_refuses(&d, &["--key-file", &v.key]);
    drop(d);
    // And a new process reads the moved pin from the config file.
    swap_header(&current, &v);
    assert_pin_moved_to_the_new_key(&v, &conf, &before, &old, "online-restart");
}

/// Unpinned: an online re-encryption start re-reads the header; one swapped in since the unlock
/// (another volume key the same passphrase opens) would have its key carried over and the data
/// rewritten from it. Refused, nothing written; the served header back, the same start runs.
#[test]
fn an_online_reencryption_start_refuses_a_header_swapped_since_the_unlock() {
    let v = Vol::new(b"same passphrase");
    let other = Vol::new(b"same passphrase");
    let d = Daemon::start(v.dir.path(), "swap-start", &["--volume", &v.vol]);
    unlock_with(&d, &v.key);
    let served = backup_of(&v);
    swap_header(&other, &v);
    let before = std::fs::read(&v.vol).unwrap();
    let o = fails(ctl(&[
        "reencrypt",
        "--control",
        &d.control(),
        "--key-file",
        &v.key,
    ]));
    assert!(
        text(&o).contains("another volume key than the one being served"),
        "{}",
        text(&o)
    );
    assert!(
        std::fs::read(&v.vol).unwrap() == before,
        "a refused start wrote to the volume"
    );
    swap_header(&served, &v);
    ok(ctl(&[
        "reencrypt",
        "--control",
        &d.control(),
        "--key-file",
        &v.key,
        "--wait",
    ]));
}

#[test]
fn a_volume_with_another_uuid_is_refused_at_start_naming_both() {
    let victim = Vol::new(b"victim passphrase");
    let other = Vol::new(b"other passphrase");
    let conf = victim.path("nbdcryptd.toml");
    ok(ctl(&[
        "pin",
        &victim.vol,
        "--write",
        conf.to_str().unwrap(),
    ]));
    let (pinned, found) = (
        victim.header().uuid().to_owned(),
        other.header().uuid().to_owned(),
    );
    let dir = victim.dir.path();
    // The flag points the pinned config at another volume (a wrong path, or a swapped disk).
    let mut child = Daemon::spawn(
        dir,
        "wrong",
        &["--config", conf.to_str().unwrap(), "--volume", &other.vol],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon kept running on the wrong volume"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.join("wrong.log")).unwrap();
    assert!(
        log.contains(&pinned) && log.contains(&found),
        "names both UUIDs: {log}"
    );
    // And the pinned volume itself starts (locked) and unlocks with its passphrase.
    let d = Daemon::start(dir, "right", &["--config", conf.to_str().unwrap()]);
    unlock_with(&d, &victim.key);
    assert_eq!(state(&d.status()), "unlocked");
}

#[test]
fn a_pin_on_the_command_line_is_refused_without_echoing_it() {
    let v = Vol::new(b"victim passphrase");
    for uri in [
        "pkcs11:token=t;object=k?pin-value=4711",
        "pkcs11:token=t;object=k?pin-value=%34%37%31%31",
    ] {
        let o = fails(ctl(&[
            "enroll",
            &v.vol,
            "--pkcs11",
            uri,
            "--key-file",
            &v.key,
        ]));
        let t = text(&o);
        assert!(
            t.contains("pin-value") && t.contains("--pkcs11-pin file:") && t.contains("cred:"),
            "{t}"
        );
        let o = fails(ctl(&[
            "rekey",
            &v.vol,
            "--slot",
            "0",
            "--pkcs11",
            uri,
            "--key-file",
            &v.key,
        ]));
        assert!(
            text(&o).contains("pin-value") || text(&o).contains("no nbdcrypt token"),
            "{}",
            text(&o)
        );
    }
    // A bare PIN where a PIN source belongs (daemon and ctl): refused, never echoed.
    let o = fails(ctl(&["test-token", &v.vol, "--pkcs11-pin", "4711"]));
    assert!(
        text(&o).contains("PIN source") && !text(&o).contains("4711"),
        "{}",
        text(&o)
    );
    let o = Command::new(daemon_binary())
        .args(["--volume", &v.vol, "--pkcs11-pin", "4711", "--control"])
        .arg(v.path("c.sock"))
        .arg("--unix")
        .arg(v.path("n.sock"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o).contains("PIN source") && !text(&o).contains("4711"),
        "{}",
        text(&o)
    );
    // The header's tokens are never touched by any of this.
    assert_eq!(v.header().tokens().count(), 0);
}

#[test]
fn pin_teaches_with_examples_and_enroll_offers_the_pin() {
    let o = ok(ctl(&["pin", "--help"]));
    let h = text(&o);
    assert!(
        h.contains("Examples:") && h.contains("nbdcryptctl pin ") && h.contains("Exit status:"),
        "{h}"
    );
    assert!(
        h.contains("volume-key-digest") && h.contains("--write"),
        "{h}"
    );
    // enroll prints the lines for the daemon's config: the allowed key and the pin.
    let moto = Moto::start();
    let key = moto.create_key(None);
    let v = Vol::new(b"victim passphrase");
    let o = ok(ctl(&[
        "enroll",
        &v.vol,
        "--kms",
        &key,
        "--kms-region",
        REGION,
        "--kms-endpoint",
        &moto.endpoint,
        "--key-file",
        &v.key,
    ]));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let uuid = v.header().uuid().to_owned();
    assert!(
        out.contains(&format!("volume-uuid = \"{uuid}\""))
            && out.contains("volume-key-digest = \"pbkdf2:"),
        "{out}"
    );
    assert!(
        out.contains("kms-allow-key = [\"arn:aws:kms:") && out.contains(&key),
        "{out}"
    );
    assert!(
        out.contains(&format!("kms-endpoint = \"{}\"", moto.endpoint)),
        "{out}"
    );
    // Those lines are a working daemon config: the daemon unlocks by token with them alone.
    let conf = v.path("d.toml");
    let lines: String = out
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(" = "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(
        &conf,
        format!("volume = \"{}\"\nauto-unlock = true\n{lines}", v.vol),
    )
    .unwrap();
    let d = Daemon::start(
        v.dir.path(),
        "fromenroll",
        &["--config", conf.to_str().unwrap()],
    );
    d.wait_for(30, "auto-unlock with the printed config", |s| {
        state(s) == "unlocked"
    });
}
