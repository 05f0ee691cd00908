//! A real AWS KMS stand-in for tests: moto's server from PyPI, on a free loopback port.
//!
//! The Python venv is made once, lazily, under `<workspace>/target/moto-venv` with
//! `python3 -m venv` and `pip install 'moto[server]'` (about a minute and 300 MB), guarded by a
//! file lock so parallel test binaries share it. Needs `python3` with the `venv` module (Debian:
//! `python3-venv`) and PyPI. A missing tool is a test failure, never a skip.
//!
//! Each [`Moto`] is its own server process (state is in memory), stopped on drop. Keys are
//! made and disabled through boto3 from the same venv; credentials are dummies and every
//! address is 127.0.0.1.

// Shared by several test crates, each of which uses only some of the helpers.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const REGION: &str = "us-east-1";

/// The environment a client of the moto server (nbdcryptctl, boto3) runs with: dummy
/// credentials, a region, and never the instance metadata service or the user's AWS files.
pub fn aws_env(cmd: &mut Command) -> &mut Command {
    for v in [
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_KMS",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ] {
        cmd.env_remove(v);
    }
    cmd.env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", REGION)
        .env("AWS_DEFAULT_REGION", REGION)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
}

fn workspace_target() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => PathBuf::from(t),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
    }
}

/// The venv with moto's server, made on first use.
pub fn venv() -> PathBuf {
    let target = workspace_target();
    std::fs::create_dir_all(&target).expect("create target dir");
    let venv = target.join("moto-venv");
    let ready = venv.join(".nbdcrypt-ready");
    if ready.exists() {
        return venv;
    }
    let lock = File::create(target.join("moto-venv.lock")).expect("create moto-venv.lock");
    lock.lock().expect("lock moto-venv.lock");
    if ready.exists() {
        return venv;
    }
    eprintln!(
        "moto: creating {} (python3 -m venv; pip install 'moto[server]')",
        venv.display()
    );
    let st = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect("python3 not found: install python3 and python3-venv");
    assert!(
        st.success(),
        "python3 -m venv {} failed: install python3-venv (Debian)",
        venv.display()
    );
    let st = Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "-q",
            "--disable-pip-version-check",
            "moto[server]",
        ])
        .status()
        .expect("run pip");
    assert!(st.success(), "pip install 'moto[server]' failed");
    std::fs::write(&ready, b"moto[server]\n").expect("write marker");
    venv
}

/// One running moto server.
pub struct Moto {
    child: Option<Child>,
    venv: PathBuf,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// Starts a server on a free loopback port (`-p 0`: the kernel picks; the port is read from
    /// the server's "Running on http://127.0.0.1:PORT" line) and waits until it answers.
    pub fn start() -> Moto {
        let venv = venv();
        let dir = tempfile::tempdir().expect("tempdir");
        let log_path = dir.path().join("moto.log");
        let log = File::create(&log_path).expect("moto.log");
        let child = Command::new(venv.join("bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start moto_server");
        let mut m = Moto {
            child: Some(child),
            venv,
            endpoint: String::new(),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(i) = text.find("http://127.0.0.1:") {
                let rest = &text[i + "http://127.0.0.1:".len()..];
                let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if !port.is_empty() && http_ok(&port) {
                    m.endpoint = format!("http://127.0.0.1:{port}");
                    return m;
                }
            }
            if let Some(c) = m.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("moto_server exited ({st}):\n{text}");
                }
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not come up in 60 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a boto3 snippet with `kms` bound to a client of this server; returns its stdout.
    pub fn boto3(&self, code: &str, args: &[&str]) -> String {
        let script = format!(
            "import sys, json, base64, boto3\n\
             kms = boto3.client('kms', endpoint_url={ep:?}, region_name={REGION:?},\n\
                                aws_access_key_id='test', aws_secret_access_key='test')\n\
             {code}\n",
            ep = self.endpoint
        );
        let mut cmd = Command::new(self.venv.join("bin/python"));
        aws_env(&mut cmd);
        let out = cmd
            .arg("-c")
            .arg(script)
            .args(args)
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "boto3 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_owned()
    }

    /// A new symmetric key; returns its key id. With `alias`, also `alias/<alias>` for it.
    pub fn create_key(&self, alias: Option<&str>) -> String {
        let id = self.boto3(
            "print(kms.create_key(KeySpec='SYMMETRIC_DEFAULT')['KeyMetadata']['KeyId'])",
            &[],
        );
        if let Some(a) = alias {
            self.boto3(
                "kms.create_alias(AliasName='alias/' + sys.argv[1], TargetKeyId=sys.argv[2])",
                &[a, &id],
            );
        }
        id
    }

    pub fn disable_key(&self, key_id: &str) {
        self.boto3("kms.disable_key(KeyId=sys.argv[1])", &[key_id]);
    }

    /// Decrypts a token's `sealed` blob (base64) with its encryption context (JSON): the
    /// keyslot secret, for tests that check where it must not appear.
    pub fn decrypt(&self, blob_b64: &str, context_json: &str) -> Vec<u8> {
        let hex = self.boto3(
            "r = kms.decrypt(CiphertextBlob=base64.b64decode(sys.argv[1]),\n\
                             EncryptionContext=json.loads(sys.argv[2]))\n\
             print(r['Plaintext'].hex())",
            &[blob_b64, context_json],
        );
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// Median wall time of `n` Encrypt and of `n` Decrypt calls of 32 bytes through boto3
    /// (connection reused), in milliseconds.
    pub fn round_trip_ms(&self, key_id: &str, n: u32) -> (f64, f64) {
        let out = self.boto3(
            "import time, statistics\n\
             n = int(sys.argv[2]); ctx = {'nbdcrypt:volume': 'v', 'nbdcrypt:keyslot': '1'}\n\
             kms.encrypt(KeyId=sys.argv[1], Plaintext=b'0'*32, EncryptionContext=ctx)\n\
             e = []; d = []\n\
             for _ in range(n):\n\
             \x20   t = time.perf_counter(); c = kms.encrypt(KeyId=sys.argv[1], Plaintext=b'0'*32, EncryptionContext=ctx)['CiphertextBlob']; e.append(time.perf_counter() - t)\n\
             \x20   t = time.perf_counter(); kms.decrypt(CiphertextBlob=c, EncryptionContext=ctx); d.append(time.perf_counter() - t)\n\
             print(statistics.median(e) * 1000, statistics.median(d) * 1000)",
            &[key_id, &n.to_string()],
        );
        let mut it = out
            .split_whitespace()
            .map(|x| x.parse::<f64>().expect("float"));
        (it.next().expect("enc"), it.next().expect("dec"))
    }

    /// Stops the server (the endpoint then refuses connections).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

fn http_ok(port: &str) -> bool {
    let Ok(addr) = format!("127.0.0.1:{port}").parse() else {
        return false;
    };
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.")
}
