//! Test certificates (keys made with openssl, certificates with certtool from gnutls-bin), in the layout nbdkit, qemu and libnbd
//! read: `server/` (ca-cert.pem, server-cert.pem, server-key.pem) for nbdcryptd and nbdkit,
//! `client/` (ca-cert.pem, client-cert.pem, client-key.pem) for libnbd and qemu, `pki/` with
//! the CA key. ECDSA P-256, unencrypted PKCS#8 keys.

#![allow(dead_code)]

use nbdcrypt_tests::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct Pki {
    pub root: PathBuf,
}

impl Pki {
    pub fn server(&self) -> PathBuf {
        self.root.join("server")
    }
    pub fn client(&self) -> PathBuf {
        self.root.join("client")
    }
    pub fn pki(&self) -> PathBuf {
        self.root.join("pki")
    }
}

fn certtool(args: &[&str], cwd: &Path) {
    run(
        tool("certtool").args(args).current_dir(cwd),
        Duration::from_secs(30),
    )
    .success();
}

/// A P-256 key in PKCS#8 PEM, made by openssl: certtool writes the scalar as a DER INTEGER's
/// bytes, so about one key in 256 (a leading zero byte) comes out 31 bytes long, which rustls's
/// crypto provider refuses ("failed to parse private key") and a test flakes; openssl always
/// writes the full 32 bytes.
fn key(cwd: &Path, out: &str) {
    run(
        tool("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                out,
            ])
            .current_dir(cwd),
        Duration::from_secs(30),
    )
    .success();
}

/// A private CA `ca_cn`, a server certificate for localhost / 127.0.0.1 / ::1, and a client
/// certificate with CN `client_cn`, under `root`.
pub fn generate(root: &Path, ca_cn: &str, client_cn: &str) -> Pki {
    let pki = root.join("pki");
    for d in ["pki", "server", "client"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    key(&pki, "ca-key.pem");
    std::fs::write(
        pki.join("ca.info"),
        format!("cn = {ca_cn}\nca\ncert_signing_key\nexpiration_days = 3650\n"),
    )
    .unwrap();
    certtool(
        &[
            "--generate-self-signed",
            "--no-text",
            "--load-privkey",
            "ca-key.pem",
            "--template",
            "ca.info",
            "--outfile",
            "ca-cert.pem",
        ],
        &pki,
    );
    key(&pki, "server-key.pem");
    std::fs::write(
        pki.join("server.info"),
        "organization = nbdcrypt test\ncn = localhost\ndns_name = localhost\n\
         ip_address = 127.0.0.1\nip_address = ::1\ntls_www_server\nencryption_key\n\
         signing_key\nexpiration_days = 365\n",
    )
    .unwrap();
    sign(&pki, "server");
    key(&pki, "client-key.pem");
    std::fs::write(
        pki.join("client.info"),
        format!(
            "organization = nbdcrypt test\ncn = {client_cn}\ntls_www_client\n\
             encryption_key\nsigning_key\nexpiration_days = 365\n"
        ),
    )
    .unwrap();
    sign(&pki, "client");
    for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        std::fs::copy(pki.join(f), root.join("server").join(f)).unwrap();
    }
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(pki.join(f), root.join("client").join(f)).unwrap();
    }
    Pki {
        root: root.to_owned(),
    }
}

fn sign(pki: &Path, who: &str) {
    certtool(
        &[
            "--generate-certificate",
            "--no-text",
            "--load-ca-certificate",
            "ca-cert.pem",
            "--load-ca-privkey",
            "ca-key.pem",
            "--load-privkey",
            &format!("{who}-key.pem"),
            "--template",
            &format!("{who}.info"),
            "--outfile",
            &format!("{who}-cert.pem"),
        ],
        pki,
    );
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough on a test machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Wait until something accepts on `addr`.
pub fn wait_tcp(addr: &str) {
    for _ in 0..250 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing accepts on {addr}");
}
