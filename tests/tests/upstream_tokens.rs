//! An upstream over TLS on a Unix socket (`nbds+unix://`, nbdkit `--tls=require
//! --tls-verify-peer`, client certificates) whose volume carries a KMS token: `nbdcryptd
//! --auto-unlock` reads the token from the header over NBD-over-TLS, asks moto's KMS (the
//! operator's endpoint and allowed key, never the header's), unlocks, and serves; data written
//! through our export reads back and the upstream holds only ciphertext. The same server refuses
//! a plaintext `nbd+unix://` client, and a CA that did not sign it is refused by us.

#[path = "../../ctl/tests/moto/mod.rs"]
mod moto;
#[path = "common/pki.rs"]
mod pki;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbdcrypt_tests::*;

const FAST: [&str; 4] = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];
const PATTERN: &[u8] = b"NBDCRYPT-TLS-UNIX-TOKEN-PLAINTEXT-";

fn ctl_cmd() -> Command {
    let mut c = Command::new(daemon_binary().with_file_name("nbdcryptctl"));
    moto::aws_env(&mut c);
    c.env_remove("NBDCRYPT_CONTROL").stdin(Stdio::null());
    c
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_socket(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::os::unix::net::UnixStream::connect(p).is_err() {
        assert!(Instant::now() < deadline, "{} never listened", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn kms_token_auto_unlock_over_an_nbds_unix_upstream_with_client_certificates() {
    let m = moto::Moto::start();
    let dir = tempdir();
    let d = dir.path();
    let pki = pki::generate(&d.join("pki"), "upstream CA", "nbdcrypt client");
    let other = pki::generate(&d.join("other"), "other CA", "x");

    // A volume with a recovery passphrase and a KMS token, made locally, then put behind nbdkit.
    let img = d.join("vol.img");
    let recovery = d.join("recovery.key");
    std::fs::write(&recovery, b"recovery passphrase").unwrap();
    let mut c = ctl_cmd();
    c.arg("format")
        .arg(&img)
        .args(["--size", "48M", "--yes", "--key-file"])
        .arg(&recovery)
        .args(FAST);
    run(&mut c, TOOL_TIMEOUT).success();
    let kms_key = m.create_key(None);
    let mut c = ctl_cmd();
    c.arg("enroll")
        .arg(&img)
        .args(["--kms", &kms_key, "--region", moto::REGION])
        .args(["--kms-endpoint", &m.endpoint, "--key-file"])
        .arg(&recovery);
    run(&mut c, TOOL_TIMEOUT).success();

    let sock = d.join("tls.sock");
    let _nbdkit = Killed(
        tool("nbdkit")
            .args(["-f", "-U"])
            .arg(&sock)
            .arg("--tls=require")
            .arg(format!("--tls-certificates={}", pki.server().display()))
            .args(["--tls-verify-peer", "file"])
            .arg(&img)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nbdkit"),
    );
    wait_socket(&sock);
    let uri = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        sock.display(),
        pki.client().display()
    );

    // The header over TLS: dump shows the token (provider and key id, no secret).
    let out = run(ctl_cmd().arg("dump").arg(&uri), TOOL_TIMEOUT).success();
    assert!(
        out.stdout.contains("kms") && out.stdout.contains(&kms_key),
        "{}",
        out.stdout
    );
    // Refusals: the server requires TLS; a CA that did not sign the server is not trusted.
    let plain = format!("nbd+unix:///?socket={}", sock.display());
    let out = run(ctl_cmd().arg("dump").arg(&plain), TOOL_TIMEOUT).failure();
    assert!(out.stderr.contains("TLS required"), "{}", out.stderr);
    let wrong = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        sock.display(),
        other.client().display()
    );
    let out = run(ctl_cmd().arg("dump").arg(&wrong), TOOL_TIMEOUT).failure();
    assert!(out.stderr.contains("TLS"), "{}", out.stderr);

    // nbdcryptd unlocks by itself with the token read over the upstream.
    let dd = tempdir();
    let nbd_sock = dd.path().join("nbd.sock");
    let control = dd.path().join("control.sock");
    let log = dd.path().join("daemon.log");
    let mut c = Command::new(daemon_binary());
    moto::aws_env(&mut c);
    let _daemon = Killed(
        c.arg("--volume")
            .arg(&uri)
            .args(["--auto-unlock", "--kms-endpoint", &m.endpoint])
            .args(["--kms-region", moto::REGION, "--kms-allow-key", &kms_key])
            .arg("--unix")
            .arg(&nbd_sock)
            .arg("--control")
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("nbdcryptd"),
    );
    let status = || {
        run(
            ctl_cmd().arg("status").arg("--control").arg(&control),
            TOOL_TIMEOUT,
        )
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let st = loop {
        let o = status();
        if o.ok() && o.stdout.contains("unlocked") {
            break o.stdout;
        }
        assert!(
            Instant::now() < deadline,
            "not unlocked by the token: {}\n{}",
            o.details(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(st.contains("nbds+unix://"), "{st}");
    let daemon_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!daemon_log.contains("panicked"), "{daemon_log}");

    // Data through our export over the TLS upstream reads back; the upstream holds ciphertext.
    let ours = format!("nbd+unix:///nbdcrypt?socket={}", nbd_sock.display());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !run(tool("nbdinfo").arg("--size").arg(&ours), TOOL_TIMEOUT).ok() {
        assert!(
            Instant::now() < deadline,
            "export not offered after the unlock"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let data: Vec<u8> = PATTERN.iter().copied().cycle().take(MIB as usize).collect();
    let src = dd.path().join("src.bin");
    std::fs::write(&src, &data).unwrap();
    run(
        tool("nbdcopy").arg(&src).arg(&ours).arg("--flush"),
        TOOL_TIMEOUT,
    )
    .success();
    let back: PathBuf = dd.path().join("back.bin");
    run(tool("nbdcopy").arg(&ours).arg(&back), TOOL_TIMEOUT).success();
    let got = std::fs::read(&back).unwrap();
    assert_eq!(first_difference(&got[..data.len()], &data), None);
    let raw = std::fs::read(&img).unwrap();
    assert!(
        !contains(&raw, &PATTERN[..24]),
        "plaintext in the upstream's file"
    );
    assert!(contains(&got, &PATTERN[..24]), "control: pattern readable");
}
