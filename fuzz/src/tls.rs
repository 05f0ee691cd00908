//! `tls_certificates`: the files an operator puts in `--tls-certificates DIR` (server
//! certificate chain, private key, CA certificates, CRL), through the daemon's loader
//! `nbdcrypt::tls::server_config_from_pem`, and the client-certificate subject decoder the
//! log and audit use.
//!
//! Input: byte 0 selects, byte 1 picks a key label; then four parts (certificate, key, CA, CRL),
//! each a big-endian u16 length and that many bytes. A part is either used as the file's text
//! or, when its bit in byte 0 is set, taken as DER and wrapped in a PEM block (so the fuzzer
//! mutates DER directly instead of base64):
//!
//! | byte 0 bit | meaning |
//! |---|---|
//! | 0 | client verification: pass the CA part (`--tls-verify-peer`) |
//! | 1 | pass the CRL part too |
//! | 2..=5 | certificate / key / CA / CRL part is DER, wrap it |
//! | 6 | the certificate part gets a second copy of itself appended (a chain) |
//!
//! Checks beyond "no panic": every error names the file it is about and stays short (a parser
//! message quoting a hostile line is cut), and never quotes the private key's base64 text.

use std::path::Path;

use base64::Engine;
use nbdcrypt::tls::{server_config_from_pem, subject_of, PemFile, PemInputs};

const KEY_LABELS: [&str; 4] = ["PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY", "ENCRYPTED PRIVATE KEY"];

fn pem(label: &str, der: &[u8]) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n").into_bytes();
    for line in b64.as_bytes().chunks(64) {
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.extend_from_slice(format!("-----END {label}-----\n").as_bytes());
    out
}

fn parts(mut data: &[u8]) -> [&[u8]; 4] {
    let mut out: [&[u8]; 4] = [&[]; 4];
    for p in out.iter_mut() {
        if data.len() < 2 {
            break;
        }
        let n = usize::from(u16::from_be_bytes([data[0], data[1]])).min(data.len() - 2);
        *p = &data[2..2 + n];
        data = &data[2 + n..];
    }
    out
}

pub fn certificates(data: &[u8]) {
    let _ = load(data);
}

/// The loader's verdict on an input (`None`: too short to be one), after the checks above.
pub fn load(data: &[u8]) -> Option<Result<(), String>> {
    let (ctl, label, rest) = match data {
        [c, l, rest @ ..] => (*c, *l, rest),
        _ => return None,
    };
    let [cert, key, ca, crl] = parts(rest);
    // The DER parts also go through the subject decoder (peer input after a handshake).
    for der in [cert, ca] {
        let _ = subject_of(der);
    }
    let wrap = |bit: u8, label: &str, part: &[u8]| -> Vec<u8> {
        if ctl & (1 << bit) != 0 {
            pem(label, part)
        } else {
            part.to_vec()
        }
    };
    let mut cert_text = wrap(2, "CERTIFICATE", cert);
    if ctl & (1 << 6) != 0 {
        let again = cert_text.clone();
        cert_text.extend_from_slice(&again);
    }
    let key_text = wrap(3, KEY_LABELS[usize::from(label) % KEY_LABELS.len()], key);
    let ca_text = wrap(4, "CERTIFICATE", ca);
    let crl_text = wrap(5, "X509 CRL", crl);
    let (cp, kp, ap, rp) = (
        Path::new("/etc/nbdcrypt/tls/server-cert.pem"),
        Path::new("/etc/nbdcrypt/tls/server-key.pem"),
        Path::new("/etc/nbdcrypt/tls/ca-cert.pem"),
        Path::new("/etc/nbdcrypt/tls/ca-crl.pem"),
    );
    let inputs = PemInputs {
        cert: PemFile { path: cp, data: &cert_text },
        key: PemFile { path: kp, data: &key_text },
        ca: (ctl & 1 != 0).then_some(PemFile { path: ap, data: &ca_text }),
        crl: (ctl & 3 == 3).then_some(PemFile { path: rp, data: &crl_text }),
    };
    let Err(e) = server_config_from_pem(&inputs) else { return Some(Ok(())) };
    assert!(e.contains("/etc/nbdcrypt/tls/"), "the error names no file: {e}");
    // Our text (paths, hints) is about 400 bytes; the parser's detail is cut at 200.
    assert!(e.len() < 1000, "error of {} bytes: {e}", e.len());
    // Not a single base64 line of the key (at least 16 characters of it) is quoted.
    for line in key_text.split(|&b| b == b'\n' || b == b'\r') {
        let line = line.trim_ascii();
        if line.len() >= 16
            && !line.starts_with(b"-----")
            && line.iter().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(b))
        {
            let l = std::str::from_utf8(line).unwrap_or("");
            assert!(!e.contains(&l[..16]), "the error quotes the key: {e}");
        }
    }
    Some(Err(e))
}
