//! Online re-encryption (`nbdcryptctl reencrypt --control`) and token re-seal (`nbdcryptctl
//! rekey --control`) of a volume that lives on an upstream NBD export (`nbdcryptd --volume
//! nbd+unix:///?socket=…`), against a real nbdkit memory upstream on a Unix socket: header
//! updates go through the upstream, each zone's data is made durable with the upstream's FLUSH
//! before the header moves on. Afterwards cryptsetup reads the header (copied out with nbdcopy),
//! the old volume key is gone, and a restarted daemon on the same upstream unlocks.
//!
//! The crash points come from the daemon's debug-build test hooks (see reencrypt_online.rs):
//! `NBDCRYPT_TEST_REENCRYPT_ZONE` (zone bytes) and `NBDCRYPT_TEST_REENCRYPT_ABORT=ZONE:POINT`.
//! The negative control for the crash checks (a lost zone is caught by the same read-back
//! check) is reencrypt_online.rs::negative_control_a_lost_zone_is_caught_by_the_read_back_check.

#[path = "../../ctl/tests/moto/mod.rs"]
mod moto;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbdcrypt_tests::*;
use serde_json::Value;

const PASS: &[u8] = b"online reencrypt over an upstream";
const FAST: [&str; 4] = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];
/// Data area: the upstream is 16 MiB of metadata plus this.
const DATA: u64 = 16 * MIB;
const ZONE: &str = "1048576";

/// One at a time: the machine has two shared cores and the steps are timing-driven.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `nbdkit -f -U DIR/up.sock memory SIZE`, and its `nbd+unix` URI.
fn nbdkit_memory(dir: &Path, size: u64) -> (Upstream, String) {
    let up = Upstream::nbdkit(dir, "up", &["memory", &size.to_string()]);
    let uri = up.uri.clone();
    (up, uri)
}

fn key_file(dir: &Path, name: &str, secret: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, secret).unwrap();
    p
}

/// `nbdcryptctl format URI --key-file K` (cheap KDF), through the upstream.
fn format(uri: &str, k: &Path) {
    let mut a: Vec<&OsStr> = vec![
        OsStr::new("format"),
        OsStr::new(uri),
        OsStr::new("--yes"),
        OsStr::new("--key-file"),
        k.as_os_str(),
    ];
    a.extend(FAST.iter().map(OsStr::new));
    let out = nbdcryptctl(&a);
    assert!(out.ok(), "format over the upstream\n{}", out.details());
}

/// nbdcryptd serving the upstream `uri` (locked), with `env` set for it through `env(1)` so
/// parallel tests do not share the variables.
fn daemon(uri: &str, env: &[&str]) -> Daemon {
    let dir = tempdir();
    let d = dir.path().to_owned();
    let mut args: Vec<OsString> = env.iter().map(OsString::from).collect();
    args.push(daemon_binary().into());
    args.extend([
        "--volume".into(),
        uri.into(),
        "--unix".into(),
        d.join("nbd.sock").into(),
        "--control".into(),
        d.join("control.sock").into(),
        "--audit-log".into(),
        d.join("audit.jsonl").into(),
    ]);
    Daemon::start_bin_in(Path::new("/usr/bin/env"), dir, args)
}

fn start_reencrypt(d: &Daemon, extra: &[&str]) -> Out {
    let k = key_file(d.dir(), "reencrypt.key", PASS);
    let mut args = vec!["--key-file", k.to_str().unwrap()];
    args.extend_from_slice(extra);
    d.ctl("reencrypt", &args)
}

/// fio verify (crc32c, verify_fatal) over `[0, size)` of `uri`, in a loop on its own thread
/// until the flag is set (at least one run); the thread panics on a verify failure.
fn fio_verify_loop(uri: String, size: u64) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let fio = std::thread::spawn(move || {
        let mut runs = 0u64;
        while !stop2.load(Ordering::Relaxed) || runs == 0 {
            let out_dir = tempdir();
            let mut c = tool("fio");
            c.current_dir(out_dir.path())
                .arg("--ioengine=nbd")
                .arg("--verify_state_save=0")
                .arg(format!("--uri={uri}"))
                .arg("--name=upstream-online")
                .arg("--rw=randwrite")
                .arg("--bsrange=4k-64k")
                .arg("--iodepth=8")
                .arg(format!("--size={size}"))
                .arg(format!("--randseed={}", runs + 1))
                .arg("--verify=crc32c")
                .arg("--verify_backlog=64")
                .arg("--do_verify=1")
                .arg("--verify_fatal=1");
            let out = run(&mut c, Duration::from_secs(300));
            assert!(
                out.ok(),
                "fio verify failed in run {runs}\n{}",
                out.details()
            );
            runs += 1;
        }
        runs
    });
    (stop, fio)
}

/// The upstream's bytes (header and ciphertext), copied out with nbdcopy into `dir/name`.
fn copy_out(uri: &str, dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    run(tool("nbdcopy").arg(uri).arg(&img), TOOL_TIMEOUT).success();
    img
}

/// The entries of a section of `cryptsetup luksDump` (`Keyslots:`, `Digests:`): the lines
/// `  N: type` up to the next section.
fn dump_entries(dump: &str, section: &str) -> Vec<String> {
    dump.lines()
        .skip_while(|l| l.trim_end() != section)
        .skip(1)
        .take_while(|l| l.starts_with(' ') || l.starts_with('\t') || l.is_empty())
        .filter(|l| {
            l.starts_with("  ")
                && !l.starts_with("   ")
                && l.trim()
                    .split(':')
                    .next()
                    .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
        })
        .map(|l| l.trim().to_owned())
        .collect()
}

/// `cryptsetup luksAddKey --volume-key-file KEY` on a copy of the image: succeeds only if KEY
/// (hex) is the volume key the header's digest verifies.
fn volume_key_accepted(img: &Path, key_hex: &str, dir: &Path) -> bool {
    let bytes: Vec<u8> = (0..key_hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&key_hex[i..i + 2], 16).unwrap())
        .collect();
    let vk = key_file(dir, "vk.bin", &bytes);
    let newpass = key_file(dir, "added.key", b"added through the volume key");
    let out = run(
        cryptsetup()
            .args(["luksAddKey", "--batch-mode", "--disable-locks"])
            .args(cheap_kdf("pbkdf2"))
            .arg("--volume-key-file")
            .arg(&vk)
            .arg(img)
            .arg(&newpass),
        TOOL_TIMEOUT,
    );
    let _ = std::fs::remove_file(&vk);
    out.ok()
}

/// The full run over an upstream: fio verify writes over the first half of the volume
/// throughout, the second half holds data written before; the daemon re-encrypts to the end.
/// Then: status says finished, the data reads back, cryptsetup opens the header copied out of
/// the upstream with the passphrase, it has exactly one keyslot and one digest, the old volume
/// key no longer matches (the new one does), cryptsetup's key decrypts the ciphertext to what
/// the export served, and a restarted daemon on the same upstream unlocks and serves the same.
#[test]
fn online_reencryption_over_an_nbd_upstream_under_fio_verify_then_cryptsetup_and_a_restart_agree() {
    let _serial = serial();
    let dir = tempdir();
    let d = dir.path();
    let (_up, uri) = nbdkit_memory(d, 16 * MIB + DATA);
    let k = key_file(d, "pass.key", PASS);
    format(&uri, &k);
    let before = copy_out(&uri, d, "before.img");
    let old_key = luks_volume_key(&before, PASS);
    std::fs::remove_file(&before).unwrap();

    let zone_env = format!("NBDCRYPT_TEST_REENCRYPT_ZONE={ZONE}");
    let mut dm = daemon(&uri, &[&zone_env]);
    assert_eq!(dm.unlock(PASS).code(), Some(0), "unlock\n{}", dm.log());
    let data = random_bytes(21, DATA as usize);
    write_export(&dm.uri(), dm.dir(), &data);

    let half = DATA / 2;
    let (stop, fio) = fio_verify_loop(dm.uri(), half);
    let out = start_reencrypt(&dm, &["--max-rate", "4M"]);
    assert_eq!(
        out.code(),
        Some(0),
        "start\n{}\n{}",
        out.details(),
        dm.log()
    );
    // It runs (progress over the upstream) while fio writes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = dm.reencrypt_status();
        if r["state"] == "running" && r["done_bytes"].as_u64() > Some(0) {
            assert_eq!(r["total_bytes"], DATA, "{r:#}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no progress: {r:#}\n{}",
            dm.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        dm.ctl("reencrypt", &["--max-rate", "64M"]).code(),
        Some(0),
        "{}",
        dm.log()
    );
    dm.wait_reencrypt_finished(Duration::from_secs(240));
    stop.store(true, Ordering::Relaxed);
    assert!(fio.join().unwrap() >= 1);

    let st = dm.status();
    assert_eq!(st["reencrypt"]["state"], "finished", "{st:#}");
    assert_eq!(st["errors"], 0, "{st:#}");
    let upstream = st["upstream"].as_str().unwrap_or_default();
    assert!(upstream.contains("nbd+unix://"), "{st:#}");
    let got = read_export(&dm.uri(), dm.dir());
    assert_same_bytes(
        &got[half as usize..],
        &data[half as usize..],
        "data written before the re-encryption",
    );
    let audit = std::fs::read_to_string(dm.dir().join("audit.jsonl")).unwrap();
    for phase in ["start", "finish"] {
        assert!(
            audit.lines().any(|l| {
                let v: Value = serde_json::from_str(l).unwrap_or(Value::Null);
                v["event"] == "reencrypt" && v["phase"] == phase && v["mode"] == "online"
            }),
            "no reencrypt {phase} line in\n{audit}"
        );
    }
    assert_eq!(dm.lock_idle().code(), Some(0));
    dm.terminate(Duration::from_secs(15));

    // cryptsetup on the upstream's bytes: a normal header, one keyslot and one digest, the
    // passphrase opens it, the key is new and the old one is refused.
    let img = copy_out(&uri, d, "after.img");
    let dump = luks_dump(&img);
    assert!(!dump.contains("reencrypt"), "{dump}");
    assert_eq!(dump_entries(&dump, "Keyslots:").len(), 1, "{dump}");
    assert_eq!(dump_entries(&dump, "Digests:").len(), 1, "{dump}");
    run(
        cryptsetup()
            .args(["open", "--test-passphrase", "--disable-locks", "--key-file"])
            .arg(&k)
            .arg(&img),
        TOOL_TIMEOUT,
    )
    .success();
    let new_key = luks_volume_key(&img, PASS);
    assert_ne!(new_key, old_key, "the volume key did not change");
    assert_same_bytes(
        &verify_py_plaintext(&img, &new_key)[..DATA as usize],
        &got,
        "cryptsetup's key + verify.py vs the export",
    );
    // The old volume key is gone (cryptsetup refuses it), the new one is the header's.
    assert!(
        !volume_key_accepted(&img, &old_key, d),
        "cryptsetup still accepts the old volume key"
    );
    assert!(
        volume_key_accepted(&img, &new_key, d),
        "control: cryptsetup accepts the new volume key"
    );
    std::fs::remove_file(&img).unwrap();

    // A new daemon on the same upstream unlocks with the passphrase and serves the same bytes.
    let dm = daemon(&uri, &[]);
    assert_eq!(dm.unlock(PASS).code(), Some(0), "restart\n{}", dm.log());
    assert_same_bytes(&read_export(&dm.uri(), dm.dir()), &got, "after a restart");
    assert!(dm.status()["reencrypt"].is_null() || dm.reencrypt_status()["state"] != "running");
}

/// Killed (abort(), as kill -9) in the middle of zone 2's data write over the upstream: the
/// upstream's header shows the re-encryption in progress; a new daemon on the same upstream,
/// unlocked with the passphrase, recovers the zone, serves exactly the data, finishes, and
/// cryptsetup's key decrypts the upstream's bytes to the same data.
#[test]
fn an_online_reencryption_over_an_upstream_killed_mid_zone_resumes_after_a_restart() {
    let _serial = serial();
    let dir = tempdir();
    let d = dir.path();
    let (_up, uri) = nbdkit_memory(d, 16 * MIB + DATA);
    let k = key_file(d, "pass.key", PASS);
    format(&uri, &k);
    let data = random_bytes(22, DATA as usize);
    let zone_env = format!("NBDCRYPT_TEST_REENCRYPT_ZONE={ZONE}");

    let mut dm = daemon(
        &uri,
        &[&zone_env, "NBDCRYPT_TEST_REENCRYPT_ABORT=2:half_write"],
    );
    assert_eq!(dm.unlock(PASS).code(), Some(0), "unlock\n{}", dm.log());
    write_export(&dm.uri(), dm.dir(), &data);
    let _ = start_reencrypt(&dm, &[]);
    assert!(
        dm.wait_exit(Duration::from_secs(60)).is_some(),
        "the daemon did not die at its crash point\n{}",
        dm.log()
    );
    assert!(dm.log().contains("at half_write"), "{}", dm.log());
    drop(dm);
    let img = copy_out(&uri, d, "crashed.img");
    assert!(
        luks_dump(&img).contains("reencrypt"),
        "no re-encryption in the upstream's header"
    );
    std::fs::remove_file(&img).unwrap();

    let mut dm = daemon(&uri, &[&zone_env]);
    assert_eq!(dm.unlock(PASS).code(), Some(0), "resume\n{}", dm.log());
    assert!(
        dm.log().contains("recovering the zone a crash interrupted"),
        "{}",
        dm.log()
    );
    assert_same_bytes(
        &read_export(&dm.uri(), dm.dir()),
        &data,
        "served right after the restart",
    );
    dm.wait_reencrypt_finished(Duration::from_secs(120));
    assert_same_bytes(
        &read_export(&dm.uri(), dm.dir()),
        &data,
        "after the resumed re-encryption finished",
    );
    assert_eq!(dm.lock_idle().code(), Some(0));
    dm.terminate(Duration::from_secs(15));
    let img = copy_out(&uri, d, "after.img");
    assert_finished_and_cryptsetup_decrypts(
        &img,
        PASS,
        &data,
        "cryptsetup's key after the resumed run",
    );
}

/// The upstream (nbdkit `file`) is killed and restarted while the daemon re-encrypts over it.
/// Either the run rides through the reconnection and finishes, or the step that lost its
/// connection fails (the zone is fenced, FLUSH is refused after unflushed writes were lost)
/// and a restarted daemon recovers the zone and finishes. Either way the data is intact and
/// cryptsetup's key decrypts the upstream's file to it.
#[test]
fn an_upstream_restarted_during_an_online_reencryption_loses_no_data() {
    let _serial = serial();
    let dir = tempdir();
    let d = dir.path();
    let img = d.join("upstream.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 * MIB + DATA)
        .unwrap();
    let file_args = ["file", img.to_str().unwrap()];
    let mut up = Upstream::nbdkit(d, "up", &file_args);
    let uri = up.uri.clone();
    let k = key_file(d, "pass.key", PASS);
    format(&uri, &k);
    let data = random_bytes(24, DATA as usize);
    let zone_env = format!("NBDCRYPT_TEST_REENCRYPT_ZONE={ZONE}");
    let mut dm = daemon(&uri, &[&zone_env]);
    assert_eq!(dm.unlock(PASS).code(), Some(0), "unlock\n{}", dm.log());
    write_export(&dm.uri(), dm.dir(), &data);
    let out = start_reencrypt(&dm, &["--max-rate", "2M"]);
    assert_eq!(
        out.code(),
        Some(0),
        "start\n{}\n{}",
        out.details(),
        dm.log()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while dm.reencrypt_status()["done_bytes"].as_u64().unwrap_or(0) < 3 * MIB {
        assert!(Instant::now() < deadline, "no progress\n{}", dm.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    up.kill();
    std::thread::sleep(Duration::from_millis(500));
    up.start();

    let deadline = Instant::now() + Duration::from_secs(180);
    let (state, r) = loop {
        dm.assert_alive();
        let r = dm.reencrypt_status();
        if let Some(s @ ("finished" | "failed")) = r["state"].as_str() {
            break (s.to_owned(), r);
        }
        assert!(
            Instant::now() < deadline,
            "neither finished nor failed: {r:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("after the upstream restart the re-encryption {state}: {r:#}");
    if state == "failed" {
        // The daemon stays up and serving. Once the upstream is back, lock and unlock resume
        // from the header; if writes acknowledged without a FLUSH were lost with the old
        // connection, FLUSH is refused until a restart, and the restart resumes instead.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = dm.status()["upstream"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if !up.contains(": 0 connected") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the upstream never came back: {up}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        if dm.lock_idle().code() == Some(0) {
            eprintln!("resumed by lock and unlock");
        } else {
            eprintln!("resumed by a restart");
            drop(dm);
            dm = daemon(&uri, &[&zone_env]);
        }
        assert_eq!(dm.unlock(PASS).code(), Some(0), "resume\n{}", dm.log());
        dm.wait_reencrypt_finished(Duration::from_secs(120));
    }
    assert_same_bytes(
        &read_export(&dm.uri(), dm.dir()),
        &data,
        &format!("after an upstream restart ({state})"),
    );
    assert_eq!(dm.lock_idle().code(), Some(0));
    dm.terminate(Duration::from_secs(15));
    assert_finished_and_cryptsetup_decrypts(
        &img,
        PASS,
        &data,
        "cryptsetup's key on the upstream's file",
    );
}

/// `nbdcryptctl` with moto's dummy AWS environment.
fn ctl_aws(args: &[&OsStr]) -> Out {
    let mut c = std::process::Command::new(ctl_binary());
    moto::aws_env(&mut c);
    c.args(args)
        .env_remove("NBDCRYPT_CONTROL")
        .stdin(Stdio::null());
    run(&mut c, TOOL_TIMEOUT)
}

/// The tokens of the upstream's header, each as `cryptsetup token export` prints it (sealed
/// blob included), read from a copy of the upstream's bytes.
fn tokens(uri: &str, dir: &Path) -> Vec<String> {
    let img = copy_out(uri, dir, "tokens.img");
    let dump = luks_dump(&img);
    let out = dump_entries(&dump, "Tokens:")
        .iter()
        .map(|e| {
            let id = e.split(':').next().unwrap();
            run(
                cryptsetup()
                    .args(["token", "export", "--disable-locks", "--token-id", id])
                    .arg(&img),
                TOOL_TIMEOUT,
            )
            .success()
            .stdout
        })
        .collect();
    std::fs::remove_file(&img).unwrap();
    out
}

/// A KMS token on an upstream volume, re-sealed online (`rekey --all-tokens --control`): the
/// header on the upstream gets a fresh sealed secret (the old one is gone), serving goes on,
/// and a restarted daemon on the same upstream unlocks by itself through the new token; the
/// recovery passphrase still opens the header copied out for cryptsetup.
#[test]
fn rekey_of_a_kms_token_over_an_nbd_upstream_then_a_restart_unlocks_by_the_token() {
    let m = moto::Moto::start();
    let dir = tempdir();
    let d = dir.path();
    let (_up, uri) = nbdkit_memory(d, 16 * MIB + 16 * MIB);
    let recovery = key_file(d, "recovery.key", b"recovery passphrase");
    format(&uri, &recovery);
    let kms_key = m.create_key(None);
    let out = ctl_aws(&[
        OsStr::new("enroll"),
        OsStr::new(&uri),
        OsStr::new("--kms"),
        OsStr::new(&kms_key),
        OsStr::new("--region"),
        OsStr::new(moto::REGION),
        OsStr::new("--kms-endpoint"),
        OsStr::new(&m.endpoint),
        OsStr::new("--key-file"),
        recovery.as_os_str(),
    ]);
    assert!(out.ok(), "enroll over the upstream\n{}", out.details());
    let before = tokens(&uri, d);
    assert_eq!(before.len(), 1, "{before:?}");

    let env = [
        "AWS_ACCESS_KEY_ID=test",
        "AWS_SECRET_ACCESS_KEY=test",
        "AWS_REGION=us-east-1",
        "AWS_DEFAULT_REGION=us-east-1",
        "AWS_EC2_METADATA_DISABLED=true",
        "AWS_CONFIG_FILE=/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE=/dev/null",
    ];
    let serve = || {
        let dir = tempdir();
        let p = dir.path().to_owned();
        let mut args: Vec<OsString> = vec!["-u".into(), "AWS_PROFILE".into()];
        args.extend(env.iter().map(OsString::from));
        args.push(daemon_binary().into());
        args.extend([
            "--volume".into(),
            OsString::from(&uri),
            "--auto-unlock".into(),
            "--kms-endpoint".into(),
            OsString::from(&m.endpoint),
            "--kms-region".into(),
            moto::REGION.into(),
            "--kms-allow-key".into(),
            OsString::from(&kms_key),
            "--unix".into(),
            p.join("nbd.sock").into(),
            "--control".into(),
            p.join("control.sock").into(),
            "--audit-log".into(),
            p.join("audit.jsonl").into(),
        ]);
        let dm = Daemon::start_bin_in(Path::new("/usr/bin/env"), dir, args);
        dm.wait_state("unlocked", Duration::from_secs(60));
        dm
    };
    let mut dm = serve();
    let data = random_bytes(23, MIB as usize);
    let src = dm.dir().join("data.bin");
    std::fs::write(&src, &data).unwrap();
    run(
        tool("nbdcopy").arg(&src).arg(dm.uri()).arg("--flush"),
        TOOL_TIMEOUT,
    )
    .success();

    let out = dm.ctl("rekey", &["--all-tokens"]);
    assert!(out.ok(), "rekey --control\n{}\n{}", out.details(), dm.log());
    assert!(out.stdout.contains("rekeyed"), "{}", out.details());
    let after = tokens(&uri, d);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(
        after[0], before[0],
        "a fresh secret means a new sealed blob"
    );
    assert!(
        before[0].contains(&kms_key) && after[0].contains(&kms_key),
        "the same KMS key seals it: {before:?} {after:?}"
    );
    assert_eq!(dm.state(), "unlocked", "serving goes on");
    let audit = std::fs::read_to_string(dm.dir().join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"rekey\""), "{audit}");
    dm.terminate(Duration::from_secs(15));

    // The header copied out of the upstream: cryptsetup opens it with the recovery passphrase,
    // and it holds two keyslots (recovery + the re-sealed token's), not three.
    let img = copy_out(&uri, d, "after.img");
    let dump = luks_dump(&img);
    assert_eq!(dump_entries(&dump, "Keyslots:").len(), 2, "{dump}");
    run(
        cryptsetup()
            .args(["open", "--test-passphrase", "--disable-locks", "--key-file"])
            .arg(&recovery)
            .arg(&img),
        TOOL_TIMEOUT,
    )
    .success();
    std::fs::remove_file(&img).unwrap();

    // Restarted on the same upstream: unlocked by the new token alone, same data.
    let dm = serve();
    let back = read_export(&dm.uri(), dm.dir());
    assert_same_bytes(&back[..data.len()], &data, "after the rekey and a restart");
    let log = dm.log();
    assert!(!log.contains("panicked"), "{log}");
}
