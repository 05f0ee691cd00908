//! `enroll`, `test-token`, `rekey`, `unenroll` against a real KMS stand-in (moto's server on
//! 127.0.0.1, see `moto/mod.rs`), checked with the real cryptsetup, with the audit log checked
//! for secrets.
//!
//! Every `nbdcryptctl` runs with dummy AWS credentials and `--kms-endpoint` pointing at the
//! test's own moto server; nothing leaves the machine. Unsealing names the allowed keys with
//! `--kms-allow-key` (the token's own endpoint and key are never trusted: see
//! `hostile_token.rs`).

mod moto;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use moto::{aws_env, Moto, REGION};
use serde_json::Value;

const FAST: [&str; 4] = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];
const PASS: &[u8] = b"recovery passphrase";

fn ctl(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nbdcryptctl"));
    aws_env(&mut cmd);
    let mut child = cmd
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nbdcryptctl");
    drop(child.stdin.take());
    child.wait_with_output().expect("wait")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "expected success, got {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        out(&o),
        err(&o)
    );
    o
}

#[track_caller]
fn fails(o: Output) -> Output {
    assert!(
        !o.status.success(),
        "expected failure\nstdout: {}\nstderr: {}",
        out(&o),
        err(&o)
    );
    o
}

fn cs_opens(vol: &str, key_file: &str) -> bool {
    Command::new("cryptsetup")
        .args([
            "open",
            "--test-passphrase",
            "--disable-external-tokens",
            "--key-file",
            key_file,
            vol,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("cryptsetup")
        .status
        .success()
}

struct Setup {
    dir: tempfile::TempDir,
    vol: String,
    key: String,
}

impl Setup {
    /// A 20 MiB volume with the recovery passphrase in keyslot 0.
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = dir.path().join("vol.img").to_str().unwrap().to_owned();
        let key = dir.path().join("recovery.key").to_str().unwrap().to_owned();
        std::fs::write(&key, PASS).unwrap();
        let mut args = vec!["format", &vol, "--size", "20M", "--key-file", &key];
        args.extend(FAST);
        ok(ctl(&args));
        Setup { dir, vol, key }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    fn enroll(&self, moto: &Moto, kms: &str, audit: Option<&str>) -> Output {
        let mut args = vec![
            "enroll",
            &self.vol,
            "--kms",
            kms,
            "--region",
            REGION,
            "--kms-endpoint",
            &moto.endpoint,
            "--key-file",
            &self.key,
        ];
        if let Some(a) = audit {
            args.extend(["--audit-log", a]);
        }
        ctl(&args)
    }

    /// `test-token` trusting `moto` and the keys `allow`.
    fn test_token(&self, moto: &Moto, allow: &[&str], audit: Option<&str>) -> Output {
        let mut args = vec!["test-token", &self.vol, "--kms-endpoint", &moto.endpoint];
        for k in allow {
            args.extend(["--kms-allow-key", k]);
        }
        if let Some(a) = audit {
            args.extend(["--audit-log", a]);
        }
        ctl(&args)
    }

    /// The header's tokens, straight from the library.
    fn tokens(&self) -> Vec<(u32, serde_json::Map<String, Value>)> {
        let f = std::fs::File::open(&self.vol).unwrap();
        let (h, _) = nbdcrypt::luks2::Luks2Header::read(&f).unwrap();
        h.tokens().map(|(id, t)| (id, t.json().clone())).collect()
    }

    fn keyslots(&self) -> Vec<u32> {
        let f = std::fs::File::open(&self.vol).unwrap();
        let (h, _) = nbdcrypt::luks2::Luks2Header::read(&f).unwrap();
        h.keyslots().iter().map(|k| k.id).collect()
    }

    /// The volume key as `dump --dump-volume-key` prints it (hex).
    fn volume_key_hex(&self) -> String {
        let o = ok(ctl(&[
            "dump",
            &self.vol,
            "--dump-volume-key",
            "--key-file",
            &self.key,
            "--yes",
        ]));
        let text = out(&o);
        let line = text
            .lines()
            .find(|l| l.starts_with("Volume key:"))
            .expect("Volume key line");
        line.split_whitespace().last().unwrap().to_owned()
    }
}

fn hex_to_bytes(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect()
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Every representation of `bytes` that must not appear in a log: hex either case, base64
/// (standard and URL-safe), and 12-character fragments of those.
#[track_caller]
fn assert_absent(text: &str, bytes: &[u8], what: &str) {
    let hex = to_hex(bytes);
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    let b64u = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let lower = text.to_lowercase();
    for s in [&hex, &b64, &b64u] {
        assert!(!text.contains(s.as_str()), "{what} found in the log");
    }
    for chunk in hex.as_bytes().chunks(12).filter(|c| c.len() == 12) {
        let c = std::str::from_utf8(chunk).unwrap();
        assert!(
            !lower.contains(c),
            "part of the {what} (hex) found in the log"
        );
    }
    for chunk in b64.as_bytes().chunks(12).filter(|c| c.len() == 12) {
        let c = std::str::from_utf8(chunk).unwrap();
        assert!(
            !text.contains(c),
            "part of the {what} (base64) found in the log"
        );
    }
}

#[test]
fn enrol_test_token_rekey_unenrol_with_audit_log() {
    let moto = Moto::start();
    let key_a = moto.create_key(Some("vol-a"));
    let key_b = moto.create_key(None);
    let s = Setup::new();
    let audit = s.path("audit.log");

    // Enrol by alias.
    let o = ok(s.enroll(&moto, "alias/vol-a", Some(&audit)));
    assert!(
        out(&o).contains("enrolled keyslot 1 (token 0"),
        "{}",
        out(&o)
    );
    let toks = s.tokens();
    assert_eq!(toks.len(), 1);
    let t = &toks[0].1;
    assert_eq!(t["type"], "nbdcrypt-aws-kms");
    assert_eq!(t["keyslots"], serde_json::json!(["1"]));
    assert_eq!(t["nbdcrypt_version"], 1);
    let arn = t["kms-key-id"].as_str().unwrap();
    assert!(
        arn.starts_with("arn:aws:kms:us-east-1:") && arn.ends_with(&key_a),
        "{arn}"
    );
    assert_eq!(t["kms-region"], REGION);
    assert_eq!(t["kms-endpoint"], moto.endpoint.as_str());
    let dump = out(&ok(ctl(&["dump", &s.vol])));
    assert!(
        dump.contains("Provider:   aws-kms") && dump.contains(arn),
        "{dump}"
    );
    let dump: Value = serde_json::from_str(&out(&ok(ctl(&["dump", &s.vol, "--json"])))).unwrap();
    assert_eq!(dump["tokens"][0]["provider"], "aws-kms");
    assert_eq!(dump["tokens"][0]["key"], arn);

    // test-token opens keyslot 1; the passphrase still opens in cryptsetup.
    let o = ok(s.test_token(&moto, &[&key_a], Some(&audit)));
    assert!(
        out(&o).contains("keyslot 1 unlocked by token 0"),
        "{}",
        out(&o)
    );
    assert!(cs_opens(&s.vol, &s.key));

    // The sealed secret really is the keyslot's passphrase (base64, systemd style): cryptsetup
    // opens keyslot 1 with it.
    let ctx = t["kms-encryption-context"].to_string();
    let secret = moto.decrypt(t["sealed"].as_str().unwrap(), &ctx);
    assert_eq!(secret.len(), 32);
    let token_pass = s.path("token.pass");
    std::fs::write(
        &token_pass,
        base64::engine::general_purpose::STANDARD.encode(&secret),
    )
    .unwrap();
    assert!(cs_opens(&s.vol, &token_pass));

    // Rekey under key B: the old key is gone from the header, both ways still open.
    let o = ok(ctl(&[
        "rekey",
        &s.vol,
        "--slot",
        "1",
        "--kms",
        &key_b,
        "--kms-endpoint",
        &moto.endpoint,
        "--kms-allow-key",
        &key_a,
        "--audit-log",
        &audit,
    ]));
    assert!(
        out(&o).contains("rekeyed token 0 (keyslot 1)"),
        "{}",
        out(&o)
    );
    let toks = s.tokens();
    assert_eq!(toks.len(), 1);
    let text = serde_json::to_string(&toks[0].1).unwrap();
    assert!(
        !text.contains(&key_a),
        "old key id still in the token: {text}"
    );
    assert!(toks[0].1["kms-key-id"].as_str().unwrap().ends_with(&key_b));
    let new_slot: u32 = toks[0].1["keyslots"][0].as_str().unwrap().parse().unwrap();
    assert_ne!(new_slot, 1);
    assert!(
        !s.keyslots().contains(&1),
        "the old keyslot must be removed"
    );
    assert!(
        !cs_opens(&s.vol, &token_pass),
        "the old secret must not open anything"
    );
    let o = ok(s.test_token(&moto, &[&key_b], Some(&audit)));
    assert!(
        out(&o).contains(&format!("keyslot {new_slot} unlocked")),
        "{}",
        out(&o)
    );
    assert!(cs_opens(&s.vol, &s.key));

    // Rekey again with the same key (fresh secret), then unenrol.
    ok(ctl(&[
        "rekey",
        &s.vol,
        "--all-tokens",
        "--kms-endpoint",
        &moto.endpoint,
        "--kms-allow-key",
        &key_b,
        "--audit-log",
        &audit,
    ]));
    let slot = s.tokens()[0].1["keyslots"][0].as_str().unwrap().to_owned();
    let o = ok(ctl(&[
        "unenroll",
        &s.vol,
        "--slot",
        &slot,
        "--audit-log",
        &audit,
    ]));
    assert!(out(&o).contains(&format!("keyslot {slot}")), "{}", out(&o));
    assert!(s.tokens().is_empty());
    assert_eq!(s.keyslots(), vec![0]);
    assert!(cs_opens(&s.vol, &s.key));
    let o = fails(s.test_token(&moto, &[&key_b], None));
    assert!(err(&o).contains("no usable nbdcrypt token"), "{}", err(&o));

    // The audit log: the expected events, one JSON object per line, no secrets.
    let log = std::fs::read_to_string(&audit).unwrap();
    let events: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "enrol",
            "unlock_ok",
            "rekey",
            "unlock_ok",
            "rekey",
            "unenrol"
        ],
        "{log}"
    );
    for e in &events {
        assert_eq!(e["result"], "ok", "{e}");
        assert!(e["time"].as_str().unwrap().ends_with('Z'));
        assert!(e["volume_uuid"].as_str().unwrap().len() == 36);
        assert!(e["peer_pid"].as_i64().unwrap() > 0);
        assert_eq!(e["provider"], "aws-kms");
    }
    assert!(events[0]["key"].as_str().unwrap().ends_with(&key_a));
    assert_eq!(events[0]["keyslot"], 1);
    assert!(events[2]["key"].as_str().unwrap().ends_with(&key_b));
    assert!(events[2]["old_key"].as_str().unwrap().ends_with(&key_a));
    let vk = hex_to_bytes(&s.volume_key_hex());
    assert_eq!(vk.len(), 64);
    assert_absent(&log, &vk, "volume key");
    assert_absent(&log, &secret, "keyslot secret");
    assert_absent(&log, PASS, "passphrase");
}

#[test]
fn a_token_copied_to_another_volume_is_refused() {
    let moto = Moto::start();
    let key = moto.create_key(Some("vol"));
    let a = Setup::new();
    let b = Setup::new();
    ok(a.enroll(&moto, "alias/vol", None));
    // B: a keyslot 1 of its own, then A's token bound to it (edited through the library).
    let newkey = b.path("new.key");
    std::fs::write(&newkey, b"b slot 1").unwrap();
    let mut args = vec![
        "add-key",
        &b.vol,
        "--key-file",
        &b.key,
        "--new-key-file",
        &newkey,
    ];
    args.extend(FAST);
    ok(ctl(&args));
    let mut tok = a.tokens()[0].1.clone();
    tok.insert("keyslots".into(), serde_json::json!(["1"]));
    {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&b.vol)
            .unwrap();
        let (mut h, _) = nbdcrypt::luks2::Luks2Header::read(&f).unwrap();
        h.add_token(&f, nbdcrypt::luks2::Token::from_json(tok).unwrap())
            .unwrap();
    }
    let o = fails(b.test_token(&moto, &[&key], None));
    assert!(
        err(&o).contains("does not belong to this volume and keyslot"),
        "{}",
        err(&o)
    );
    // A is unaffected; B's passphrases still open.
    ok(a.test_token(&moto, &[&key], None));
    assert!(cs_opens(&b.vol, &b.key));
    assert!(cs_opens(&b.vol, &newkey));
}

#[test]
fn a_disabled_key_is_reported_as_disabled() {
    let moto = Moto::start();
    let key = moto.create_key(None);
    let s = Setup::new();
    let audit = s.path("audit.log");
    ok(s.enroll(&moto, &key, Some(&audit)));
    ok(s.test_token(&moto, &[&key], None));
    moto.disable_key(&key);
    let o = fails(s.test_token(&moto, &[&key], Some(&audit)));
    let e = err(&o);
    assert!(
        e.contains("is disabled or pending deletion") && e.contains(&key),
        "{e}"
    );
    assert!(e.contains("state Disabled"), "{e}");
    // Enrolling with a disabled key fails before anything is written.
    let o = fails(s.enroll(&moto, &key, Some(&audit)));
    assert!(err(&o).contains("disabled"), "{}", err(&o));
    assert_eq!(s.tokens().len(), 1);
    assert_eq!(s.keyslots(), vec![0, 1]);
    let log = std::fs::read_to_string(&audit).unwrap();
    let last: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(last[1]["event"], "unlock_failed");
    assert_eq!(last[1]["result"], "failed");
    assert!(last[1]["error"].as_str().unwrap().contains("disabled"));
    assert_eq!(last[1]["keyslot"], 1);
    assert!(last[1]["key"].as_str().unwrap().ends_with(&key));
    assert_eq!(last[2]["event"], "enrol");
    assert_eq!(last[2]["result"], "failed");
    // An unknown key: KeyMissing.
    let o = fails(s.enroll(&moto, "alias/does-not-exist", None));
    assert!(err(&o).contains("not found"), "{}", err(&o));
}

#[test]
fn a_stopped_server_is_unreachable_quickly_and_the_passphrase_still_works() {
    let mut moto = Moto::start();
    let key = moto.create_key(None);
    let s = Setup::new();
    ok(s.enroll(&moto, &key, None));
    moto.stop();
    let start = Instant::now();
    let o = fails(s.test_token(&moto, &[&key], None));
    let took = start.elapsed();
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(err(&o).contains("unreachable"), "{}", err(&o));
    assert!(err(&o).contains("onnection refused"), "{}", err(&o));
    assert!(!err(&o).contains("DispatchFailure {"), "{}", err(&o));
    eprintln!("unreachable reported after {took:?}");
    let o = ok(ctl(&["test-key", &s.vol, "--key-file", &s.key]));
    assert!(out(&o).contains("keyslot 0 unlocked"));
    assert!(cs_opens(&s.vol, &s.key));
}

#[test]
fn unenrol_refuses_the_last_keyslot_and_foreign_tokens() {
    let moto = Moto::start();
    let key = moto.create_key(None);
    let s = Setup::new();
    ok(s.enroll(&moto, &key, None));
    // Remove the passphrase keyslot: the token keyslot is now the only way in.
    ok(ctl(&["remove-key", &s.vol, "--slot", "0", "--force"]));
    let o = fails(ctl(&["unenroll", &s.vol, "--token", "0"]));
    assert!(err(&o).contains("last keyslot"), "{}", err(&o));
    assert_eq!(s.tokens().len(), 1);
    ok(s.test_token(&moto, &[&key], None));
    let o = fails(ctl(&["unenroll", &s.vol, "--slot", "7"]));
    assert!(err(&o).contains("no nbdcrypt token"), "{}", err(&o));
    let o = fails(ctl(&["unenroll", &s.vol]));
    assert_eq!(o.status.code(), Some(2), "--slot or --token is required");
}

/// Latency report (run with `--ignored --nocapture`): moto's Encrypt/Decrypt round trip vs our
/// enrol / unlock-by-token, medians of several runs.
#[test]
#[ignore]
fn latency_report() {
    let moto = Moto::start();
    let key = moto.create_key(None);
    let (enc, dec) = moto.round_trip_ms(&key, 20);
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let mut enrol = Vec::new();
    let mut unlock = Vec::new();
    for _ in 0..7 {
        let s = Setup::new();
        let t = Instant::now();
        ok(s.enroll(&moto, &key, None));
        enrol.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        ok(s.test_token(&moto, &[&key], None));
        unlock.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // In-process: provider calls on a warm client, and the library's enrol/unlock.
    use nbdcrypt::luks2::tokens::enroll as e;
    use nbdcrypt::seal::{kms::KmsProvider, Binding, SealProvider};
    let p = KmsProvider::new(
        key.clone(),
        Some(REGION.into()),
        Some(moto.endpoint.clone()),
    )
    .unwrap()
    .with_test_credentials();
    let b = Binding {
        volume_uuid: "u".into(),
        keyslot: 1,
    };
    let secret = nbdcrypt::crypto::keys::SecretBytes::from_slice(&[7u8; 32]);
    let sealed = p.seal(&secret, &b).unwrap();
    let (mut ps, mut pu, mut le, mut lu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..9 {
        let t = Instant::now();
        p.seal(&secret, &b).unwrap();
        ps.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        p.unseal(&sealed, &b).unwrap();
        pu.push(t.elapsed().as_secs_f64() * 1000.0);
        let s = Setup::new();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&s.vol)
            .unwrap();
        let (mut h, _) = nbdcrypt::luks2::Luks2Header::read(&f).unwrap();
        let (vk, _) = h
            .unlock(
                &f,
                &nbdcrypt::crypto::keys::SecretBytes::from_slice(PASS),
                &Default::default(),
            )
            .unwrap();
        let t = Instant::now();
        e::enroll(&f, &mut h, &vk, &p).unwrap();
        le.push(t.elapsed().as_secs_f64() * 1000.0);
        let resolver = |_: &serde_json::Map<String, Value>| -> Result<Box<dyn SealProvider>, nbdcrypt::seal::SealError> {
            Ok(Box::new(
                KmsProvider::new(key.clone(), Some(REGION.into()), Some(moto.endpoint.clone()))
                    .unwrap()
                    .with_test_credentials(),
            ))
        };
        let t = Instant::now();
        e::unlock_with_tokens(&f, &h, &resolver).unwrap();
        lu.push(t.elapsed().as_secs_f64() * 1000.0);
        let _ = i;
    }
    eprintln!("LATENCY moto boto3 Encrypt median {enc:.2} ms, Decrypt median {dec:.2} ms");
    eprintln!(
        "LATENCY KmsProvider warm seal (DescribeKey+Encrypt) {:.2} ms, unseal (DescribeKey+Decrypt) {:.2} ms",
        median(ps),
        median(pu)
    );
    eprintln!(
        "LATENCY library enroll() {:.2} ms, unlock_with_tokens() (new client each) {:.2} ms",
        median(le),
        median(lu)
    );
    eprintln!(
        "LATENCY nbdcryptctl enroll {:.1} ms, test-token {:.1} ms (whole process)",
        median(enrol),
        median(unlock)
    );
}

#[test]
fn token_commands_teach_with_examples() {
    for cmd in ["enroll", "unenroll", "rekey", "test-token"] {
        let o = ok(ctl(&[cmd, "--help"]));
        let h = out(&o);
        assert!(
            h.contains("Examples:") && h.contains(&format!("nbdcryptctl {cmd} ")),
            "{cmd}: {h}"
        );
        assert!(h.contains("Exit status:"), "{cmd}: {h}");
        assert!(h.contains("--audit-log"), "{cmd}: {h}");
    }
    let h = out(&ok(ctl(&["enroll", "--help"])));
    assert!(
        h.contains("--kms <KEY_ID|ALIAS>")
            && h.contains("--region")
            && h.contains("--kms-endpoint")
    );
    let h = out(&ok(ctl(&["rekey", "--help"])));
    assert!(h.contains("--all-tokens") && h.contains("--slot"));
}
