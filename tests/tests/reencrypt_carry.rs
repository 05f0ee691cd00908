//! Online re-encryption carries clevis bindings to the new volume key, checked with the real
//! tools: a cryptsetup-made volume filled with the test-vector pattern, bound by `clevis luks
//! bind` to a Tang server (Debian's tangd under socat) and to a TPM2 (swtpm), re-encrypted
//! online by nbdcryptd (unlocked by its clevis tokens). Afterwards `clevis luks list` shows both
//! bindings on the new keyslots, `clevis luks pass` gives passphrases that cryptsetup accepts,
//! the volume key they open is a new one, verify.py (an independent decryptor) reads the data
//! written before — the pattern and a block written through the daemon — with it, and the
//! daemon unlocks through each binding alone.
//!
//! `clevis luks unlock` is `clevis luks pass` followed by `cryptsetup open`, which needs
//! device-mapper; this kernel (and CI's) has none, so the `cryptsetup open` step is replaced
//! by `cryptsetup open --test-passphrase` and verify.py reading the data with the key cryptsetup
//! dumps.

use std::ffi::OsStr;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbdcrypt_tests::*;
use serde_json::Value;

const PASS: &[u8] = b"carry test passphrase";
const DATA: u64 = 8 << 20;

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

/// Kills its process on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tangd` behind socat on 127.0.0.1 with fresh keys; returns (process, URL, `URL=THUMBPRINT`).
fn tang(dir: &Path) -> (Killed, String, String) {
    let db = dir.join("tang-db");
    std::fs::create_dir_all(&db).unwrap();
    run(
        Command::new("/usr/libexec/tangd-keygen").arg(&db),
        Duration::from_secs(30),
    )
    .success();
    let port = free_port();
    let child = Command::new("socat")
        .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
        .arg(format!("EXEC:/usr/libexec/tangd {}", db.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("socat (for tangd)");
    let k = Killed(child);
    wait_port(port, "tang");
    let thp = run(
        Command::new("tang-show-keys").arg(port.to_string()),
        Duration::from_secs(30),
    )
    .success()
    .stdout
    .trim()
    .to_owned();
    let url = format!("http://127.0.0.1:{port}");
    let allow = format!("{url}={thp}");
    (k, url, allow)
}

/// swtpm on TCP; returns (process, TCTI).
fn swtpm(dir: &Path) -> (Killed, String) {
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
    let k = Killed(child);
    wait_port(port + 1, "swtpm");
    wait_port(port, "swtpm");
    (k, format!("swtpm:host=127.0.0.1,port={port}"))
}

/// `clevis ARGS` with the TPM's TCTI.
fn clevis(tcti: &str, args: &[&str]) -> Out {
    run(
        Command::new("clevis")
            .env("TPM2TOOLS_TCTI", tcti)
            .args(args),
        Duration::from_secs(120),
    )
}

/// `clevis luks pass -d IMG -s SLOT` into a key file.
fn clevis_pass(tcti: &str, img: &Path, slot: u32, dir: &Path) -> PathBuf {
    let out = Command::new("clevis")
        .env("TPM2TOOLS_TCTI", tcti)
        .args(["luks", "pass", "-d"])
        .arg(img)
        .args(["-s", &slot.to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("clevis luks pass");
    assert!(
        out.status.success() && out.stdout.len() > 20,
        "clevis luks pass -s {slot}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = dir.join(format!("clevis-{slot}.key"));
    std::fs::write(&f, &out.stdout).unwrap();
    f
}

/// `clevis luks list`: (keyslot, pin) per binding.
fn clevis_list(tcti: &str, img: &Path) -> Vec<(u32, String)> {
    let out = clevis(tcti, &["luks", "list", "-d", img.to_str().unwrap()]).success();
    out.stdout
        .lines()
        .filter_map(|l| {
            let (slot, rest) = l.split_once(": ")?;
            let pin = rest.split_whitespace().next()?;
            Some((slot.trim().parse().ok()?, pin.to_owned()))
        })
        .collect()
}

fn audit_events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// nbdcryptd on `img` with `--auto-unlock` and the operator's clevis settings `extra`.
fn serve(img: &Path, audit: &Path, extra: &[&str]) -> Daemon {
    let mut a = vec!["--auto-unlock", "--audit-log", audit.to_str().unwrap()];
    a.extend_from_slice(extra);
    let d = Daemon::volume_in(tempdir(), img, &a);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = d.status();
        if s["state"] == "unlocked" {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "not unlocked by a clevis token: {s}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// cryptsetup's volume in `dir` (64 KiB metadata: room for clevis tokens) with the pattern
/// written under its key, then bound by the real clevis: keyslot 1 to Tang at `tang_url`,
/// keyslot 2 to the TPM behind `tcti`. clevis adds its keyslots with cryptsetup's benchmarked
/// argon2id; they are converted to a cheap KDF (same keyslots, same tokens) so the debug-build
/// daemon opens and re-creates them quickly. Returns the image, the passphrase file and the
/// volume key (hex).
fn clevis_bound_volume(dir: &Path, tang_url: &str, tcti: &str) -> (PathBuf, PathBuf, String) {
    let img = dir.join("vol.img");
    let mut args = vec![
        "--cipher",
        "aes-xts-plain64",
        "--key-size",
        "512",
        "--sector-size",
        "4096",
        "--luks2-metadata-size",
        "64k",
    ];
    let kdf = cheap_kdf("pbkdf2");
    args.extend(kdf.iter().map(String::as_str));
    luks_format_args(&img, (16 << 20) + DATA, PASS, &args);
    let old_key = luks_volume_key(&img, PASS);
    verify_py(&[
        OsStr::new("fill"),
        img.as_os_str(),
        OsStr::new("--volume-key"),
        OsStr::new(&old_key),
    ])
    .success();
    let pw = dir.join("pass.key");
    std::fs::write(&pw, PASS).unwrap();
    let (img_s, pw_s) = (img.to_str().unwrap(), pw.to_str().unwrap());
    let tang_cfg = format!("{{\"url\":\"{tang_url}\"}}");
    for (pin, cfg) in [("tang", tang_cfg.as_str()), ("tpm2", "{}")] {
        clevis(
            tcti,
            &["luks", "bind", "-y", "-d", img_s, "-k", pw_s, pin, cfg],
        )
        .success();
    }
    for slot in [1u32, 2] {
        let f = clevis_pass(tcti, &img, slot, dir);
        let mut c = cryptsetup();
        c.args([
            "luksConvertKey",
            "--batch-mode",
            "--key-slot",
            &slot.to_string(),
        ])
        .args(&kdf)
        .arg("--key-file")
        .arg(&f)
        .arg(&img);
        run(&mut c, TOOL_TIMEOUT).success();
    }
    (img, pw, old_key)
}

#[test]
fn clevis_tang_and_tpm2_bindings_are_carried_online_and_open_the_new_key_with_the_real_clevis() {
    let tmp = tempdir();
    let dir = tmp.path();
    let (_tang, tang_url, tang_allow) = tang(dir);
    let (_tpm, tcti) = swtpm(dir);

    let (img, pw, old_key) = clevis_bound_volume(dir, &tang_url, &tcti);
    let pw_s = pw.to_str().unwrap();
    let before = clevis_list(&tcti, &img);
    assert_eq!(
        before,
        [(1, "tang".to_owned()), (2, "tpm2".to_owned())],
        "{before:?}"
    );

    // Online: unlocked by the clevis tokens, a block written through the daemon, then the
    // re-encryption (the passphrase given carries keyslot 0; the clevis ones are re-bound).
    let audit = dir.join("audit.jsonl");
    let operator = ["--tang-allow", &tang_allow, "--tpm2-tcti", &tcti];
    let mut expect = vector_pattern(DATA);
    {
        let d = serve(&img, &audit, &operator);
        let block: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
        expect[1 << 20..(1 << 20) + block.len()].copy_from_slice(&block);
        nbdsh_d(
            &d,
            "h.connect_uri(URI)\nh.pwrite(bytes((i * 7 + 3) & 0xff for i in range(65536)), 1 << 20)\nh.flush()",
        )
        .success();
        d.ctl("reencrypt", &["--key-file", pw_s, "--wait"])
            .success();
        let got = read_export(&d.uri(), dir);
        assert_same_bytes(&got, &expect, "the export after the re-encryption");
    }
    let events = audit_events(&audit);
    let start = events
        .iter()
        .find(|e| e["phase"] == "start")
        .unwrap_or_else(|| panic!("no start event: {events:?}"));
    assert_eq!(start["carried"]["0"], "same secret", "{start}");
    for slot in ["1", "2"] {
        assert!(
            start["carried"][slot]
                .as_str()
                .is_some_and(|s| s.starts_with("clevis token") && s.ends_with("re-bound")),
            "{start}"
        );
    }

    // The real clevis and cryptsetup on the re-encrypted volume.
    let after = clevis_list(&tcti, &img);
    assert_eq!(after.len(), 2, "{after:?}");
    let pins: Vec<&str> = after.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(pins, ["tang", "tpm2"], "{after:?}");
    let mut new_key = None;
    for (slot, pin) in &after {
        assert!(
            ![1, 2].contains(slot),
            "{pin} still on an old keyslot: {after:?}"
        );
        let f = clevis_pass(&tcti, &img, *slot, dir);
        let mut c = cryptsetup();
        c.args(["open", "--test-passphrase", "--key-slot", &slot.to_string()])
            .arg("--key-file")
            .arg(&f)
            .arg(&img);
        run(&mut c, TOOL_TIMEOUT).success();
        let pass = std::fs::read(&f).unwrap();
        let key = luks_volume_key(&img, &pass);
        assert_ne!(key, old_key, "{pin}: the volume key did not change");
        if let Some(k) = &new_key {
            assert_eq!(&key, k);
        }
        new_key = Some(key);
    }
    let new_key = new_key.unwrap();
    let plain = verify_py_plaintext(&img, &new_key);
    assert_same_bytes(
        &plain[..DATA as usize],
        &expect,
        "verify.py with the new key",
    );
    // The old key is gone: the old passphrase opens the new key only.
    assert_eq!(luks_volume_key(&img, PASS), new_key);

    // Our own token unlock through each binding alone.
    for (what, settings) in [
        ("tang", vec!["--tang-allow", tang_allow.as_str()]),
        ("tpm2", vec!["--tpm2-tcti", tcti.as_str()]),
    ] {
        let d = serve(&img, &dir.join(format!("audit-{what}.jsonl")), &settings);
        let got = read_export(&d.uri(), dir);
        assert_same_bytes(&got, &expect, what);
    }
}

/// The offline twin: `nbdcryptctl reencrypt VOLUME` (no daemon) carries the same Tang and TPM2
/// bindings through the same carry code, with the operator's --tang-allow/--tpm2-tcti; without
/// them it refuses and changes nothing.
#[test]
fn clevis_tang_and_tpm2_bindings_are_carried_offline_and_open_the_new_key_with_the_real_clevis() {
    let tmp = tempdir();
    let dir = tmp.path();
    let (_tang, tang_url, tang_allow) = tang(dir);
    let (_tpm, tcti) = swtpm(dir);
    let (img, pw, old_key) = clevis_bound_volume(dir, &tang_url, &tcti);
    let (img_s, pw_s) = (img.to_str().unwrap(), pw.to_str().unwrap());
    assert_eq!(
        clevis_list(&tcti, &img),
        [(1, "tang".to_owned()), (2, "tpm2".to_owned())]
    );

    let audit = dir.join("audit.jsonl");
    let offline = |extra: &[&str]| {
        let base = ["reencrypt", img_s, "--key-file", pw_s, "--no-progress-bar"];
        let a: Vec<&OsStr> = base.iter().chain(extra).map(OsStr::new).collect();
        nbdcryptctl(&a)
    };

    // Without the operator's clevis settings nothing opens the bindings: refused, named,
    // nothing changed.
    let out = offline(&[]).failure();
    assert!(
        out.stderr.contains("keyslot 1") && out.stderr.contains("--drop-unopened"),
        "{}",
        out.details()
    );
    assert_eq!(
        luks_volume_key(&img, PASS),
        old_key,
        "a refused run changed the key"
    );

    offline(&[
        "--tang-allow",
        &tang_allow,
        "--tpm2-tcti",
        &tcti,
        "--audit-log",
        audit.to_str().unwrap(),
    ])
    .success();
    let events = audit_events(&audit);
    let start = events
        .iter()
        .find(|e| e["phase"] == "start")
        .unwrap_or_else(|| panic!("no start event: {events:?}"));
    assert_eq!(start["carried"]["0"], "same secret", "{start}");
    for slot in ["1", "2"] {
        assert!(
            start["carried"][slot]
                .as_str()
                .is_some_and(|s| s.starts_with("clevis token") && s.ends_with("re-bound")),
            "{start}"
        );
    }

    let after = clevis_list(&tcti, &img);
    let pins: Vec<&str> = after.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(pins, ["tang", "tpm2"], "{after:?}");
    let mut new_key = None;
    for (slot, pin) in &after {
        assert!(![1, 2].contains(slot), "{pin} still on an old keyslot");
        let f = clevis_pass(&tcti, &img, *slot, dir);
        let key = luks_volume_key(&img, &std::fs::read(&f).unwrap());
        assert_ne!(key, old_key, "{pin}: the volume key did not change");
        if let Some(k) = &new_key {
            assert_eq!(&key, k);
        }
        new_key = Some(key);
    }
    let new_key = new_key.unwrap();
    let plain = verify_py_plaintext(&img, &new_key);
    assert_same_bytes(
        &plain[..DATA as usize],
        &vector_pattern(DATA),
        "verify.py with the new key",
    );
    assert_eq!(
        luks_volume_key(&img, PASS),
        new_key,
        "the old key is not gone"
    );

    // The daemon unlocks through each binding alone.
    for (what, settings) in [
        ("tang", vec!["--tang-allow", tang_allow.as_str()]),
        ("tpm2", vec!["--tpm2-tcti", tcti.as_str()]),
    ] {
        let d = serve(&img, &dir.join(format!("audit-{what}.jsonl")), &settings);
        let got = read_export(&d.uri(), dir);
        assert_same_bytes(&got, &vector_pattern(DATA), what);
    }
}
