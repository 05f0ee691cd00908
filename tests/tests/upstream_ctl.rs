//! The offline commands of `nbdcryptctl` on a volume that lives on an upstream NBD export
//! (`nbd+unix:///?socket=…`, `nbds://…`): format, add-key, dump, remove-key, test-key over NBD
//! against real nbdkit upstreams; cryptsetup reads what we wrote over the network (copied out
//! with nbdcopy); nbdcryptd then serves the volume with the keys left. Offline re-encryption
//! over NBD, killed inside a zone and resumed, keeps the data. Hostile headers on the
//! upstream get exactly the verdicts they get from a local file (same parser, same bounds),
//! never a panic. An unreachable upstream is a clear error naming the URI and the cause.

#[path = "hostile/generator.rs"]
mod generator;
#[path = "../../ctl/tests/moto/mod.rs"]
mod moto;
#[path = "common/pki.rs"]
mod pki;

use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use nbdcrypt_tests::*;

const FAST: [&str; 4] = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];
/// The exit status of a secret that opens no keyslot.
const WRONG_SECRET: i32 = 3;

/// A child process (nbdkit, here) killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ctl(args: &[&OsStr]) -> Out {
    nbdcryptctl(args)
}

fn os<S: AsRef<OsStr> + ?Sized>(s: &S) -> &OsStr {
    s.as_ref()
}

/// A key file holding `secret`.
fn key(dir: &Path, name: &str, secret: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, secret).unwrap();
    p
}

fn format(uri: &str, key: &Path) -> Out {
    let mut a = vec![
        os("format"),
        os(uri),
        os("--yes"),
        os("--key-file"),
        key.as_os_str(),
    ];
    a.extend(FAST.iter().map(os));
    ctl(&a)
}

fn add_key(uri: &str, old: &Path, new: &Path) -> Out {
    let mut a = vec![
        os("add-key"),
        os(uri),
        os("--key-file"),
        old.as_os_str(),
        os("--new-key-file"),
        new.as_os_str(),
    ];
    a.extend(FAST.iter().map(os));
    ctl(&a)
}

fn test_key(vol: &OsStr, key: &Path) -> Out {
    ctl(&[os("test-key"), vol, os("--key-file"), key.as_os_str()])
}

/// The keyslot ids `dump --json` lists.
fn slots(uri: &str) -> Vec<String> {
    let out = ctl(&[os("dump"), os(uri), os("--json")]).success();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let ks = &v["keyslots"];
    let mut ids: Vec<String> = match ks {
        serde_json::Value::Object(m) => m.keys().cloned().collect(),
        serde_json::Value::Array(a) => a
            .iter()
            .map(|k| k["id"].to_string().trim_matches('"').to_owned())
            .collect(),
        other => panic!("dump --json keyslots: {other}"),
    };
    ids.sort();
    ids
}

/// No Rust panic, whatever the outcome.
#[track_caller]
fn no_panic(o: &Out) {
    assert!(
        !o.stderr.contains("panicked") && o.code() != Some(101),
        "nbdcryptctl panicked:\n{}",
        o.details()
    );
}

#[test]
fn format_add_key_dump_remove_key_over_nbd_then_cryptsetup_and_nbdcryptd_agree() {
    let dir = tempdir();
    let d = dir.path();
    let up = Upstream::nbdkit(d, "mem", &["memory", "48M"]);
    let uri = up.uri.clone();
    let k1 = key(d, "k1", b"first passphrase over nbd");
    let k2 = key(d, "k2", b"second passphrase over nbd");

    let out = format(&uri, &k1).success();
    assert!(out.stdout.contains("formatted"), "{}", out.stdout);
    let out = add_key(&uri, &k1, &k2).success();
    // A command that writes reminds the operator that nothing locks an upstream.
    assert!(out.stderr.contains("no lock protects it"), "{}", out.stderr);
    assert_eq!(slots(&uri), ["0", "1"]);
    let text = ctl(&[os("dump"), os(&uri)]).success().stdout;
    assert!(
        text.contains("aes-xts-plain64") && text.contains(&uri),
        "{text}"
    );

    // Remove keyslot 0 (authorised by keyslot 1's passphrase).
    ctl(&[
        os("remove-key"),
        os(&uri),
        os("--slot"),
        os("0"),
        os("--key-file"),
        k2.as_os_str(),
    ])
    .success();
    assert_eq!(slots(&uri), ["1"]);
    let refused = test_key(os(&uri), &k1);
    assert_eq!(refused.code(), Some(WRONG_SECRET), "{}", refused.details());
    test_key(os(&uri), &k2).success();

    // cryptsetup reads what we wrote over the network: the upstream's bytes, copied out.
    let img = d.join("copy.img");
    run(tool("nbdcopy").arg(&uri).arg(&img), TOOL_TIMEOUT).success();
    let dump = run(
        cryptsetup().args(["luksDump", "--disable-locks"]).arg(&img),
        TOOL_TIMEOUT,
    )
    .success()
    .stdout;
    assert!(dump.contains("Version:       \t2"), "{dump}");
    assert!(dump.contains("  1: luks2"), "keyslot 1 missing:\n{dump}");
    assert!(
        !dump.contains("  0: luks2"),
        "keyslot 0 still there:\n{dump}"
    );
    let open = |k: &Path| {
        run(
            cryptsetup()
                .args(["open", "--test-passphrase", "--disable-locks", "--key-file"])
                .arg(k)
                .arg(&img),
            TOOL_TIMEOUT,
        )
    };
    open(&k2).success();
    open(&k1).failure();
    std::fs::remove_file(&img).unwrap();

    // nbdcryptd serves the upstream: the removed passphrase is refused, the new one unlocks.
    let dm = daemon(&uri);
    let out = dm.unlock(b"first passphrase over nbd");
    assert_eq!(out.code(), Some(WRONG_SECRET), "{}", out.details());
    dm.unlock(b"second passphrase over nbd").success();
    let data = random_bytes(11, MIB as usize);
    let src = dm.dir().join("data.bin");
    std::fs::write(&src, &data).unwrap();
    run(
        tool("nbdcopy").arg(&src).arg(dm.uri()).arg("--flush"),
        TOOL_TIMEOUT,
    )
    .success();
    let back = dm.dir().join("back.bin");
    run(tool("nbdcopy").arg(dm.uri()).arg(&back), TOOL_TIMEOUT).success();
    let got = std::fs::read(&back).unwrap();
    assert_eq!(first_difference(&got[..data.len()], &data), None);
}

#[test]
fn add_key_and_test_key_over_nbds_with_client_certificates() {
    let dir = tempdir();
    let d = dir.path();
    let pki = pki::generate(&d.join("pki"), "upstream CA", "nbdcryptctl client");
    let port = pki::free_port();
    let child = tool("nbdkit")
        .args([
            "-f",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--tls=require",
        ])
        .arg(format!("--tls-certificates={}", pki.server().display()))
        .args(["--tls-verify-peer", "memory", "48M"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdkit");
    let _up = Proc(child);
    pki::wait_tcp(&format!("127.0.0.1:{port}"));
    let uri = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        pki.client().display()
    );
    let k1 = key(d, "k1", b"tls one");
    let k2 = key(d, "k2", b"tls two");
    format(&uri, &k1).success();
    add_key(&uri, &k1, &k2).success();
    assert_eq!(slots(&uri), ["0", "1"]);
    test_key(os(&uri), &k2).success();
    let wrong = key(d, "wrong", b"not a passphrase of this volume");
    let out = test_key(os(&uri), &wrong);
    assert_eq!(out.code(), Some(WRONG_SECRET), "{}", out.details());

    // Negative control: plain NBD to the TLS-only server, and nbds without the certificate
    // directory, are refused with the reason (nothing read or written unencrypted).
    let plain = format!("nbd://127.0.0.1:{port}/");
    let out = add_key(&plain, &k1, &k2);
    no_panic(&out);
    assert_eq!(out.code(), Some(1), "{}", out.details());
    let bare = format!("nbds://127.0.0.1:{port}/");
    let out = ctl(&[os("dump"), os(&bare)]).failure();
    assert!(out.stderr.contains("tls-certificates"), "{}", out.stderr);
    assert_eq!(
        slots(&uri),
        ["0", "1"],
        "a refused command changed the header"
    );
}

#[test]
fn an_unreachable_upstream_is_a_clear_error_naming_the_uri_and_the_cause() {
    let dir = tempdir();
    let k = key(dir.path(), "k", b"pw");
    let sock = dir.path().join("nobody-listens.sock");
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    for args in [
        vec![os("dump"), os(&uri)],
        vec![os("add-key"), os(&uri), os("--key-file"), k.as_os_str()],
        vec![
            os("format"),
            os(&uri),
            os("--yes"),
            os("--key-file"),
            k.as_os_str(),
        ],
        vec![os("test-key"), os(&uri), os("--key-file"), k.as_os_str()],
    ] {
        let out = ctl(&args);
        no_panic(&out);
        assert_eq!(out.code(), Some(1), "{}", out.details());
        assert!(
            out.stderr.contains(&sock.display().to_string())
                && out.stderr.contains("No such file or directory"),
            "{:?}: the error must name the URI and the cause:\n{}",
            args[0],
            out.stderr
        );
    }
    // TCP: a port nobody listens on.
    let port = pki::free_port();
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    let out = ctl(&[os("dump"), os(&uri)]);
    no_panic(&out);
    assert_eq!(out.code(), Some(1), "{}", out.details());
    assert!(
        out.stderr.contains(&format!("127.0.0.1:{port}")) && out.stderr.contains("refused"),
        "{}",
        out.stderr
    );
    // A malformed URI names the forms that work.
    let out = ctl(&[os("dump"), os("nbd+unix:///disk")]);
    no_panic(&out);
    assert_eq!(out.code(), Some(1), "{}", out.details());
    assert!(out.stderr.contains("socket="), "{}", out.stderr);
}

/// Token operations over NBD-over-TLS on a Unix socket: `enroll --kms` writes a keyslot and a
/// token through the upstream, `test-token` unseals it through moto's KMS and opens the keyslot,
/// `unenroll` removes both; the recovery passphrase still opens the volume.
#[test]
fn kms_enroll_test_token_unenroll_over_an_nbds_unix_upstream() {
    let m = moto::Moto::start();
    let dir = tempdir();
    let d = dir.path();
    let pki = pki::generate(&d.join("pki"), "upstream CA", "nbdcryptctl client");
    let certs = format!("--tls-certificates={}", pki.server().display());
    let up = Upstream::nbdkit(
        d,
        "tls",
        &[
            "--tls=require",
            &certs,
            "--tls-verify-peer",
            "memory",
            "48M",
        ],
    );
    let sock = up.sock.clone();
    let uri = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        sock.display(),
        pki.client().display()
    );
    let recovery = key(d, "recovery", b"recovery passphrase");
    format(&uri, &recovery).success();
    let kms_key = m.create_key(None);
    let aws = |args: &[&OsStr]| {
        let mut c = std::process::Command::new(ctl_binary());
        moto::aws_env(&mut c);
        c.args(args)
            .env_remove("NBDCRYPT_CONTROL")
            .stdin(Stdio::null());
        run(&mut c, TOOL_TIMEOUT)
    };
    aws(&[
        os("enroll"),
        os(&uri),
        os("--kms"),
        os(&kms_key),
        os("--region"),
        os(moto::REGION),
        os("--kms-endpoint"),
        os(&m.endpoint),
        os("--key-file"),
        recovery.as_os_str(),
    ])
    .success();
    assert_eq!(slots(&uri), ["0", "1"]);
    let out = aws(&[
        os("test-token"),
        os(&uri),
        os("--kms-endpoint"),
        os(&m.endpoint),
        os("--kms-region"),
        os(moto::REGION),
        os("--kms-allow-key"),
        os(&kms_key),
    ])
    .success();
    assert!(out.stdout.contains("keyslot 1"), "{}", out.details());
    // Negative control: with the key disabled in the KMS the token no longer opens anything.
    m.disable_key(&kms_key);
    let out = aws(&[
        os("test-token"),
        os(&uri),
        os("--kms-endpoint"),
        os(&m.endpoint),
        os("--kms-region"),
        os(moto::REGION),
        os("--kms-allow-key"),
        os(&kms_key),
    ]);
    no_panic(&out);
    assert!(!out.ok(), "{}", out.details());
    aws(&[os("unenroll"), os(&uri), os("--slot"), os("1")]).success();
    assert_eq!(slots(&uri), ["0"]);
    let dump = ctl(&[os("dump"), os(&uri), os("--json")]).success().stdout;
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(v["tokens"], serde_json::json!([]), "{dump}");
    test_key(os(&uri), &recovery).success();
}

/// `nbdcryptd --volume URI` (started locked) with its sockets in a new temporary directory.
fn daemon(uri: &str) -> Daemon {
    let ddir = tempdir();
    let p = |n: &str| ddir.path().join(n).into_os_string();
    let args: Vec<OsString> = vec![
        "--volume".into(),
        uri.into(),
        "--control".into(),
        p("control.sock"),
        "--unix".into(),
        p("nbd.sock"),
    ];
    Daemon::start_in(ddir, args)
}

/// `nbdcryptctl reencrypt URI --key-file K ARGS` with `env`.
fn reencrypt(uri: &str, k: &Path, args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut c = std::process::Command::new(ctl_binary());
    c.arg("reencrypt")
        .arg(uri)
        .arg("--key-file")
        .arg(k)
        .args(args)
        .env_remove("NBDCRYPT_CONTROL");
    for (k, v) in env {
        c.env(k, v);
    }
    run(&mut c, TOOL_TIMEOUT)
}

/// The upstream's bytes (ciphertext), copied out with nbdcopy into `dir/name`.
fn copy_out(uri: &str, dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    run(tool("nbdcopy").arg(uri).arg(&img), TOOL_TIMEOUT).success();
    img
}

#[test]
fn offline_reencrypt_over_nbd_recovers_a_crash_inside_a_zone_and_keeps_the_data() {
    let dir = tempdir();
    let d = dir.path();
    let up = Upstream::nbdkit(d, "mem", &["memory", "48M"]);
    let uri = up.uri.clone();
    let k = key(d, "k", b"reencrypt over nbd");
    format(&uri, &k).success();
    let data = random_bytes(12, 6 * MIB as usize);
    let src = d.join("data.bin");
    std::fs::write(&src, &data).unwrap();
    {
        let dm = daemon(&uri);
        dm.unlock(b"reencrypt over nbd").success();
        run(
            tool("nbdcopy").arg(&src).arg(dm.uri()).arg("--flush"),
            TOOL_TIMEOUT,
        )
        .success();
    }
    let old = copy_out(&uri, d, "before.img");
    let before = read_at(&old, 16 * MIB, data.len());
    std::fs::remove_file(&old).unwrap();

    // Killed inside its fourth zone (test hook: half the zone written, then abort).
    let out = reencrypt(
        &uri,
        &k,
        &["--hotzone-size", "1M"],
        &[("NBDCRYPT_TEST_REENCRYPT_CRASH_AFTER_ZONES", "3")],
    );
    no_panic(&out);
    assert!(
        !out.ok() && out.stderr.contains("simulated crash"),
        "{}",
        out.details()
    );
    let st = ctl(&[os("reencrypt"), os(&uri), os("--status")]).success();
    assert!(
        st.stdout.contains("in progress") && st.stdout.contains("interrupted"),
        "{}",
        st.stdout
    );
    // Resumed over NBD: the half-written zone is recovered, the rest re-encrypted.
    let out = reencrypt(&uri, &k, &[], &[]).success();
    assert!(
        out.stderr.contains("recovering an interrupted zone"),
        "{}",
        out.details()
    );

    // nbdcryptd reads the same plaintext under the new key.
    let dm = daemon(&uri);
    dm.unlock(b"reencrypt over nbd").success();
    let back = d.join("back.bin");
    run(tool("nbdcopy").arg(dm.uri()).arg(&back), TOOL_TIMEOUT).success();
    let got = std::fs::read(&back).unwrap();
    assert_eq!(
        first_difference(&got[..data.len()], &data),
        None,
        "data changed by the re-encryption"
    );
    drop(dm);
    // A new volume key: every 4 KiB sector of the data area is new ciphertext.
    let img = copy_out(&uri, d, "after.img");
    let after = read_at(&img, 16 * MIB, data.len());
    let same = before
        .chunks(4096)
        .zip(after.chunks(4096))
        .filter(|(a, b)| a == b)
        .count();
    assert_eq!(same, 0, "{same} sectors were not re-encrypted");
    // And cryptsetup opens the result (copied out of the upstream).
    let dump = run(
        cryptsetup().args(["luksDump", "--disable-locks"]).arg(&img),
        TOOL_TIMEOUT,
    )
    .success()
    .stdout;
    assert!(!dump.contains("reencrypt"), "{dump}");
    run(
        cryptsetup()
            .args(["open", "--test-passphrase", "--disable-locks", "--key-file"])
            .arg(&k)
            .arg(&img),
        TOOL_TIMEOUT,
    )
    .success();
}

/// The verdicts of `dump` and `test-key` on one volume: (dump ok, test-key ok), and whether
/// either panicked.
fn verdict(vol: &OsStr, key: &Path) -> (bool, bool, String) {
    let dump = ctl(&[os("dump"), vol]);
    no_panic(&dump);
    if !dump.ok() {
        return (false, false, first_line(&dump));
    }
    let test = test_key(vol, key);
    no_panic(&test);
    (true, test.ok(), first_line(&test))
}

fn first_line(o: &Out) -> String {
    o.stderr
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("ok")
        .chars()
        .take(160)
        .collect()
}

/// The header bytes come from the network peer: every mangled header of the hostile-headers
/// generator gets the same verdict over NBD as from a local file (same parser, same bounds on
/// offsets and sizes), and none makes nbdcryptctl panic.
#[test]
fn hostile_headers_on_an_upstream_get_the_verdicts_they_get_locally() {
    let dir = tempdir();
    let d = dir.path();
    let img = d.join("hostile.img");
    let p0 = b"hostile upstream slot 0";
    let mut args = vec!["--cipher", "aes-xts-plain64", "--key-size", "512"];
    let kdf = cheap_kdf("pbkdf2");
    args.extend(kdf.iter().map(String::as_str));
    luks_format_args(&img, 16 * MIB + MIB, p0, &args);
    luks_add_key(&img, p0, b"hostile upstream slot 1", "pbkdf2");
    let k = key(d, "k", p0);
    // nbdkit's file plugin reads the file at each request: rewriting it changes the upstream.
    let up = Upstream::nbdkit(d, "file", &["-r", "file", img.to_str().unwrap()]);
    let uri = up.uri.clone();

    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let (json, hdr_size) = generator::read_json(&f);
    let mut orig = vec![0u8; 2 * hdr_size as usize];
    f.read_exact_at(&mut orig, 0).unwrap();
    // Negative control: the unmodified volume opens both ways.
    let (dump, test, why) = verdict(img.as_os_str(), &k);
    assert!(dump && test, "unmodified local volume: {why}");
    let (dump, test, why) = verdict(os(&uri), &k);
    assert!(dump && test, "unmodified volume over NBD: {why}");

    let mut differ = Vec::new();
    let mut cases = 0;
    let mut refused = 0;
    for case in generator::cases(&json) {
        cases += 1;
        f.write_all_at(&generator::headers_with(&orig, hdr_size, &case.json), 0)
            .unwrap();
        f.sync_all().unwrap();
        let local = verdict(img.as_os_str(), &k);
        let remote = verdict(os(&uri), &k);
        refused += usize::from(!local.0 || !local.1);
        if (local.0, local.1) != (remote.0, remote.1) {
            differ.push(format!(
                "{}: local {}/{} ({}) upstream {}/{} ({})",
                case.name, local.0, local.1, local.2, remote.0, remote.1, remote.2
            ));
        }
    }
    assert!(cases > 50, "only {cases} cases");
    // The comparison has teeth: most mangled headers are refused (locally, and so over NBD).
    assert!(refused > cases / 2, "only {refused} of {cases} refused");
    assert!(
        differ.is_empty(),
        "{} of {cases} hostile headers got another verdict over NBD:\n{}",
        differ.len(),
        differ.join("\n")
    );
}
