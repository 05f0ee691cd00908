//! TLS for the NBD listeners (`NBD_OPT_STARTTLS`): settings, certificate loading and reload, the
//! client's identity for logs and audit, and the blocking transport the transmission session
//! runs on once the handshake is done.
//!
//! Files (the nbdkit / qemu-nbd layout, so one directory serves all three servers) in
//! `--tls-certificates DIR`:
//!
//! * `server-cert.pem`: the server certificate chain, leaf first;
//! * `server-key.pem`: its private key (PKCS#8, PKCS#1 or SEC1 PEM);
//! * `ca-cert.pem`: the CA client certificates must chain to (only with `--tls-verify-peer`);
//! * `ca-crl.pem`: optional revocation lists for that CA.
//!
//! SIGHUP re-reads them; connections already up keep the configuration they started with, new
//! ones get the new one. A reload that fails (a half-copied key) keeps the old configuration.
//!
//! rustls is used with the ring provider, TLS 1.2 and 1.3 (nbd-client 3.24 speaks TLS 1.2
//! only). There is no TLS-PSK: rustls has no external-PSK API.
//!
//! The transmission session (nbd::session) reads with one blocking reader and writes through a
//! [`ReplySink`] whose `try_write` must never block. Over TLS both sides share one rustls
//! connection object behind a mutex, held only to encrypt or decrypt, never across socket I/O:
//! the reader blocks on the socket without it, and the sink sends ciphertext after releasing
//! it. See [`TlsSink`] for how `try_write` keeps its promise when a record does not fit.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use nix::sys::socket::MsgFlags;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConnection};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::nbd::session::ReplySink;

/// `--tls`: what the NBD listeners do about TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// STARTTLS is refused (ERR_POLICY); plaintext only.
    #[default]
    Off,
    /// STARTTLS is offered; clients may also go on in plaintext.
    On,
    /// FORCEDTLS: before STARTTLS every option but STARTTLS and ABORT is refused with
    /// ERR_TLS_REQD (no export is listed, none can be attached).
    Require,
}

impl FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<TlsMode, String> {
        match s {
            "off" | "no" | "false" => Ok(TlsMode::Off),
            "on" | "yes" | "true" => Ok(TlsMode::On),
            "require" | "required" | "force" => Ok(TlsMode::Require),
            _ => Err(format!("{s:?}: --tls is off, on or require")),
        }
    }
}

/// Checked TLS settings (from `--tls`, `--tls-certificates`, `--tls-verify-peer`).
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// The mode of the TCP listener. The Unix socket offers TLS (`on`) whenever this is not
    /// `off`, but never requires it: reaching it already takes local permission.
    pub mode: TlsMode,
    pub certificates: PathBuf,
    /// Require a client certificate that chains to `ca-cert.pem` (mutual TLS).
    pub verify_peer: bool,
}

impl TlsSettings {
    /// The mode for the Unix socket: TLS offered, never required.
    pub fn unix_mode(&self) -> TlsMode {
        match self.mode {
            TlsMode::Off => TlsMode::Off,
            TlsMode::On | TlsMode::Require => TlsMode::On,
        }
    }
}

/// Check the TLS flags against each other and against TCP: plaintext TCP (no TLS, or TLS only
/// offered) still needs --insecure-tcp.
pub fn settings_from_args(
    mode: TlsMode,
    certificates: Option<PathBuf>,
    verify_peer: bool,
    tcp: bool,
    insecure_tcp: bool,
) -> Result<Option<TlsSettings>, String> {
    if mode == TlsMode::Off {
        if certificates.is_some() || verify_peer {
            return Err(
                "--tls-certificates / --tls-verify-peer need --tls on or --tls require".into(),
            );
        }
        if tcp && !insecure_tcp {
            return Err("--tcp sends volume data in the clear without TLS: add --tls require \
                        --tls-certificates DIR (see README \"TLS\"), or --insecure-tcp to accept that"
                .into());
        }
        return Ok(None);
    }
    let Some(certificates) = certificates else {
        return Err(format!(
            "--tls {} needs --tls-certificates DIR (server-cert.pem, server-key.pem; README \"TLS\")",
            if mode == TlsMode::On { "on" } else { "require" }
        ));
    };
    if mode == TlsMode::On && tcp && !insecure_tcp {
        return Err(
            "--tls on lets TCP clients skip TLS and read the volume in the clear: use \
                    --tls require, or add --insecure-tcp to accept that"
                .into(),
        );
    }
    Ok(Some(TlsSettings {
        mode,
        certificates,
        verify_peer,
    }))
}

/// The loaded, reloadable TLS configuration.
pub struct TlsState {
    settings: TlsSettings,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl TlsState {
    /// Load the certificates; errors say which file and what to do.
    pub fn load(settings: TlsSettings) -> Result<TlsState, String> {
        let config = build(&settings)?;
        Ok(TlsState {
            settings,
            current: RwLock::new(Arc::new(config)),
        })
    }

    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// Re-read the files; on failure the old configuration stays.
    pub fn reload(&self) -> Result<(), String> {
        let config = build(&self.settings)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        Ok(())
    }

    /// An acceptor with the configuration of this moment.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let cfg = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        tokio_rustls::TlsAcceptor::from(cfg)
    }
}

fn read_pem_err(path: &Path, e: impl std::fmt::Display) -> String {
    // A parser's message may quote an input line; a hostile or mistaken file must not make the
    // error (and the log line) as big as the file.
    let mut e = e.to_string();
    if e.len() > MAX_ERROR_DETAIL {
        let mut cut = MAX_ERROR_DETAIL;
        while !e.is_char_boundary(cut) {
            cut -= 1;
        }
        e.truncate(cut);
        e.push_str("...");
    }
    format!(
        "cannot read {}: {e} (--tls-certificates DIR holds server-cert.pem, server-key.pem and, \
         with --tls-verify-peer, ca-cert.pem; README \"TLS\" shows how to make them)",
        path.display()
    )
}

/// The largest certificate, key, CA or CRL file read from `--tls-certificates` (a CRL of a big
/// CA is the largest of them, a few MiB). A bigger file is not what the operator meant: `/dev/zero`
/// or a disk image must not be read into memory.
pub const MAX_PEM_FILE: u64 = 16 << 20;

/// How much of a parser's own message an error quotes.
const MAX_ERROR_DETAIL: usize = 200;

/// One operator-given PEM file: its path (for errors) and its contents.
#[derive(Clone, Copy)]
pub struct PemFile<'a> {
    pub path: &'a Path,
    pub data: &'a [u8],
}

/// What a server configuration is built from: the contents of the `--tls-certificates` files.
#[derive(Clone, Copy)]
pub struct PemInputs<'a> {
    pub cert: PemFile<'a>,
    pub key: PemFile<'a>,
    /// `ca-cert.pem`: with it, client certificates are required and checked (`--tls-verify-peer`).
    pub ca: Option<PemFile<'a>>,
    /// `ca-crl.pem`, optional even with `ca`.
    pub crl: Option<PemFile<'a>>,
}

/// Read a file of at most [`MAX_PEM_FILE`] bytes (into memory that is wiped when dropped: it
/// may be the private key).
fn read_bounded(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    let f = std::fs::File::open(path).map_err(|e| read_pem_err(path, e))?;
    let mut data = zeroize::Zeroizing::new(Vec::new());
    f.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut data)
        .map_err(|e| read_pem_err(path, e))?;
    if data.len() as u64 > MAX_PEM_FILE {
        return Err(read_pem_err(
            path,
            format!(
                "larger than {} MiB: not a PEM certificate, key or CRL file",
                MAX_PEM_FILE >> 20
            ),
        ));
    }
    Ok(data)
}

/// Why a file held no item of the kind we wanted, with what to do about it.
fn none_found(f: &PemFile<'_>, what: &str) -> String {
    let hint = if f.data.first() == Some(&0x30) {
        format!(
            "it looks like DER (binary); convert it to PEM, e.g. `openssl {} -inform der -in FILE -out FILE.pem`",
            if what == "PRIVATE KEY" { "pkey" } else if what == "X509 CRL" { "crl" } else { "x509" }
        )
    } else if what == "PRIVATE KEY" && find_bytes(f.data, b"ENCRYPTED PRIVATE KEY") {
        "the key is encrypted with a pass phrase; store it unencrypted with mode 0600, e.g. \
         `openssl pkey -in KEY -out server-key.pem`"
            .into()
    } else if f.data.is_empty() {
        "the file is empty".into()
    } else {
        format!("no \"-----BEGIN {what}-----\" block in it")
    };
    read_pem_err(f.path, hint)
}

fn find_bytes(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every `CERTIFICATE` in a PEM file; an error for none, or a block that does not decode.
fn pem_certs(f: &PemFile<'_>) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(f.data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_pem_err(f.path, e))?;
    if certs.is_empty() {
        return Err(none_found(f, "CERTIFICATE"));
    }
    Ok(certs)
}

fn build(s: &TlsSettings) -> Result<rustls::ServerConfig, String> {
    let dir = &s.certificates;
    let cert_path = dir.join("server-cert.pem");
    let key_path = dir.join("server-key.pem");
    let ca_path = dir.join("ca-cert.pem");
    let crl_path = dir.join("ca-crl.pem");
    let cert = read_bounded(&cert_path)?;
    check_key_mode(&key_path);
    let key = read_bounded(&key_path)?;
    let (ca, crl) = if s.verify_peer {
        let ca = read_bounded(&ca_path)?;
        let crl = if crl_path.exists() {
            Some(read_bounded(&crl_path)?)
        } else {
            None
        };
        (Some(ca), crl)
    } else {
        (None, None)
    };
    server_config_from_pem(&PemInputs {
        cert: PemFile {
            path: &cert_path,
            data: &cert,
        },
        key: PemFile {
            path: &key_path,
            data: &key,
        },
        ca: ca.as_ref().map(|d| PemFile {
            path: &ca_path,
            data: d,
        }),
        crl: crl.as_ref().map(|d| PemFile {
            path: &crl_path,
            data: d,
        }),
    })
}

/// Build the server configuration from the files' contents: the certificate chain, its key
/// (PKCS#8, PKCS#1 or SEC1 PEM), and with `ca` client verification against it (and `crl`).
/// Every error names the file and says what to do; no input panics (fuzz target
/// `tls_certificates`).
pub fn server_config_from_pem(p: &PemInputs<'_>) -> Result<rustls::ServerConfig, String> {
    let certs = pem_certs(&p.cert)?;
    let key = match PrivateKeyDer::from_pem_slice(p.key.data) {
        Ok(k) => k,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            return Err(none_found(&p.key, "PRIVATE KEY"))
        }
        Err(e) => return Err(read_pem_err(p.key.path, e)),
    };
    let key = match &key {
        PrivateKeyDer::Pkcs8(k) => match normalise_ec_pkcs8(k.secret_pkcs8_der()) {
            Some(fixed) => PrivateKeyDer::Pkcs8(fixed.into()),
            None => key,
        },
        _ => key,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let builder = if let Some(ca) = &p.ca {
        let mut roots = RootCertStore::empty();
        for c in pem_certs(ca)? {
            roots
                .add(c)
                .map_err(|e| read_pem_err(ca.path, format!("not a usable CA certificate: {e}")))?;
        }
        let mut crls = Vec::new();
        if let Some(crl) = &p.crl {
            for c in CertificateRevocationListDer::pem_slice_iter(crl.data) {
                crls.push(c.map_err(|e| read_pem_err(crl.path, e))?);
            }
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .with_crls(crls)
            .build()
            .map_err(|e| read_pem_err(ca.path, format!("client verification setup: {e}")))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "{} and {} do not make a usable pair: {e}",
            p.cert.path.display(),
            p.key.path.display()
        )
    })
}

/// GnuTLS (certtool 3.7) writes the private scalar of its ECDSA PKCS#8 keys as a minimal
/// integer: about half of them with a sign-padding zero in front, 33 (P-256) or 49 (P-384) bytes,
/// and about 1 in 256 one byte short (31 or 47: the scalar's top byte is zero and is dropped).
/// ring refuses both ("failed to parse private key"), while nbdkit, qemu-nbd and OpenSSL take
/// them. The same key directory must serve all of them, so such a key is re-encoded here with
/// the scalar exactly the field size (RFC 5915): leading zeros dropped, then zeros added in
/// front. `None`: the key is not of that shape (or not a P-256/P-384 key); leave it.
pub(crate) fn normalise_ec_pkcs8(der: &[u8]) -> Option<Vec<u8>> {
    use zeroize::Zeroize;
    const SEQ: u8 = 0x30;
    const OCTETS: u8 = 0x04;
    let (t, outer, _) = tlv(der)?;
    if t != SEQ {
        return None;
    }
    let (vt, vc, r) = tlv(outer)?; // version
    let version_len = outer.len() - r.len();
    let (at, _, r2) = tlv(r)?; // algorithm
    if vt != 0x02 || vc != [0] || at != SEQ {
        return None;
    }
    let alg = &r[..r.len() - r2.len()];
    // id-ecPublicKey 1.2.840.10045.2.1
    if !alg
        .windows(9)
        .any(|w| w == [0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01])
    {
        return None;
    }
    // The curve, for the scalar's size: prime256v1 1.2.840.10045.3.1.7, secp384r1 1.3.132.0.34.
    const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const P384: [u8; 7] = [0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
    let field = if alg.windows(P256.len()).any(|w| w == P256) {
        32
    } else if alg.windows(P384.len()).any(|w| w == P384) {
        48
    } else {
        return None;
    };
    let (ot, ec, after) = tlv(r2)?;
    if ot != OCTETS {
        return None;
    }
    let (st, ec_seq, _) = tlv(ec)?;
    if st != SEQ {
        return None;
    }
    let (it, ic, r3) = tlv(ec_seq)?;
    let (pt, scalar, rest) = tlv(r3)?;
    if it != 0x02 || ic != [1] || pt != OCTETS {
        return None;
    }
    let zeros = scalar.iter().take_while(|&&b| b == 0).count();
    let significant = &scalar[zeros..];
    if scalar.len() == field || significant.len() > field || significant.is_empty() {
        return None;
    }
    let mut fixed = vec![0u8; field - significant.len()];
    fixed.extend_from_slice(significant);
    let mut inner = vec![0x02, 0x01, 0x01];
    der_push(&mut inner, OCTETS, &fixed);
    fixed.zeroize();
    inner.extend_from_slice(rest);
    let mut ec_new = Vec::new();
    der_push(&mut ec_new, SEQ, &inner);
    inner.zeroize();
    let mut body = outer[..version_len].to_vec();
    body.extend_from_slice(alg);
    der_push(&mut body, OCTETS, &ec_new);
    ec_new.zeroize();
    body.extend_from_slice(after);
    let mut out = Vec::new();
    der_push(&mut out, SEQ, &body);
    body.zeroize();
    Some(out)
}

fn der_push(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    let n = content.len();
    let len = n.to_be_bytes();
    let skip = len.iter().take_while(|&&b| b == 0).count();
    if n < 0x80 {
        out.push(len[len.len() - 1]);
    } else {
        let bytes = &len[skip..];
        out.push(0x80 | u8::try_from(bytes.len()).unwrap_or(8));
        out.extend_from_slice(bytes);
    }
    out.extend_from_slice(content);
}

/// A private key others can read is worth a warning (not a refusal: the operator may know why).
fn check_key_mode(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o044 != 0 {
            warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777),
                  "the TLS private key is readable by group or others; chmod 0600 it");
        }
    }
}

/// Who is on the other end of a TLS connection, for logs and audit.
#[derive(Debug, Clone, Default)]
pub struct PeerIdentity {
    pub version: String,
    pub cipher: String,
    /// The verified client certificate's subject (`O=…,CN=…`), with `--tls-verify-peer`.
    pub subject: Option<String>,
    /// SHA-256 of the client certificate (DER), hex.
    pub fingerprint: Option<String>,
}

impl PeerIdentity {
    pub fn of(conn: &ServerConnection) -> PeerIdentity {
        let leaf = conn.peer_certificates().and_then(|c| c.first());
        PeerIdentity {
            version: conn
                .protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default(),
            cipher: conn
                .negotiated_cipher_suite()
                .map(|c| format!("{:?}", c.suite()))
                .unwrap_or_default(),
            subject: leaf.map(|c| subject_of(c).unwrap_or_else(|| "(unreadable subject)".into())),
            fingerprint: leaf.map(|c| hex(&Sha256::digest(c.as_ref()))),
        }
    }
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

/// One DER TLV: (tag, contents, rest). Definite lengths of up to 4 bytes only.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&l0, mut rest) = rest.split_first()?;
    let len = if l0 < 0x80 {
        usize::from(l0)
    } else {
        let n = usize::from(l0 & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &b in &rest[..n] {
            len = (len << 8) | usize::from(b);
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The subject of an X.509 certificate, `TYPE=value` pairs in the order they are encoded
/// (`O=nbdcrypt test,CN=client1`). The certificate was verified by rustls before, but this is
/// still peer input: bounded, no panics, control characters escaped.
pub fn subject_of(cert: &[u8]) -> Option<String> {
    const SEQ: u8 = 0x30;
    let (t, cert, _) = tlv(cert)?;
    if t != SEQ {
        return None;
    }
    let (t, tbs, _) = tlv(cert)?;
    if t != SEQ {
        return None;
    }
    let mut rest = tbs;
    let (t, _, r) = tlv(rest)?;
    if t == 0xa0 {
        rest = r; // explicit version
    }
    // serial, signature algorithm, issuer, validity; then the subject.
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (t, mut name, _) = tlv(rest)?;
    if t != SEQ {
        return None;
    }
    let mut parts = Vec::new();
    while !name.is_empty() {
        let (t, mut set, r) = tlv(name)?;
        name = r;
        if t != 0x31 {
            return None;
        }
        while !set.is_empty() {
            let (t, atv, r) = tlv(set)?;
            set = r;
            if t != SEQ {
                return None;
            }
            let (t, oid, r) = tlv(atv)?;
            if t != 0x06 {
                return None;
            }
            let (vt, value, _) = tlv(r)?;
            let key = match oid {
                [0x55, 0x04, 0x03] => "CN".to_owned(),
                [0x55, 0x04, 0x06] => "C".to_owned(),
                [0x55, 0x04, 0x07] => "L".to_owned(),
                [0x55, 0x04, 0x08] => "ST".to_owned(),
                [0x55, 0x04, 0x0a] => "O".to_owned(),
                [0x55, 0x04, 0x0b] => "OU".to_owned(),
                [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01] => "emailAddress".to_owned(),
                other => format!("OID.{}", hex(other)),
            };
            let text = match vt {
                // UTF8String, PrintableString, T61String, IA5String
                0x0c | 0x13 | 0x14 | 0x16 => escape(&String::from_utf8_lossy(value)),
                _ => format!("#{}", hex(value)),
            };
            parts.push(format!("{key}={text}"));
            if parts.len() > 32 {
                return None;
            }
        }
    }
    Some(parts.join(","))
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars().take(256) {
        match c {
            ',' | '=' | '\\' | '+' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Largest plaintext encrypted per step of `try_write`: what one non-blocking send is
/// expected to take, so at most this much ciphertext waits in the sink when it does not.
const TRY_STEP: usize = 64 * 1024;
/// Largest plaintext encrypted per blocking write.
const WRITE_STEP: usize = 256 * 1024;
/// Ciphertext read from the socket at once.
const READ_BUF: usize = 64 * 1024;

/// The rustls connection shared by the session's reader and writer.
type Shared = Arc<Mutex<ServerConnection>>;

/// Split an established TLS connection into the session's blocking reader and sink. `reader`
/// and `writer` are two handles of the same socket, in blocking mode.
pub fn blocking_parts<R, W>(
    mut conn: ServerConnection,
    reader: R,
    writer: W,
) -> (TlsReader<R>, TlsSink<W>)
where
    R: Read + Send + 'static,
    W: Write + AsRawFd + Send + 'static,
{
    // The sink bounds what it encrypts per step itself; rustls must not refuse plaintext.
    conn.set_buffer_limit(None);
    let shared: Shared = Arc::new(Mutex::new(conn));
    let mut sink = TlsSink {
        conn: shared.clone(),
        sock: writer,
        pending: Vec::new(),
        sent: 0,
        owed: 0,
    };
    // Anything rustls still has to say (it should have nothing: every option reply was flushed).
    sink.collect();
    (
        TlsReader {
            conn: shared,
            sock: reader,
            buf: vec![0u8; READ_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
        },
        sink,
    )
}

/// Plaintext out of the TLS stream. The socket is read without the connection lock.
pub struct TlsReader<R> {
    conn: Shared,
    sock: R,
    /// Ciphertext read but not yet handed to rustls: `buf[start..end]`.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl<R: Read> Read for TlsReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut c = lock(&self.conn);
                match c.reader().read(out) {
                    // Ok(0): the peer sent close_notify.
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.start < self.end {
                    let mut slice = &self.buf[self.start..self.end];
                    let n = c.read_tls(&mut slice)?;
                    if n == 0 {
                        return Err(io::Error::other("TLS: rustls took no input"));
                    }
                    self.start += n;
                    if let Err(e) = c.process_new_packets() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("TLS: {e}"),
                        ));
                    }
                    continue;
                }
            }
            let n = loop {
                match self.sock.read(&mut self.buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            };
            // The socket's end (with or without close_notify; a stop shuts the read side too).
            // The session decides whether that was between requests.
            if n == 0 {
                return Ok(0);
            }
            (self.start, self.end) = (0, n);
        }
    }
}

/// Plaintext into the TLS stream.
///
/// `try_write` must not block and must report only bytes that are really on their way: the
/// session treats a reply it was told was taken whole as sent and never looks at it again. But
/// a TLS record, once encrypted, cannot be taken back. So `try_write` encrypts in steps of
/// `TRY_STEP` and sends each with MSG_DONTWAIT; when the socket does not take a step's whole
/// ciphertext, the rest waits in `pending` and `try_write` reports one byte fewer than it
/// encrypted (`owed = 1`). The session then keeps that reply at the head of its queue and wakes
/// its writer thread, whose next (blocking) write sends `pending` first and then simply counts
/// the owed byte as written. Ciphertext therefore never waits without a writer on its way, and
/// replies stay in order (the session sends the rest of a reply before any other).
pub struct TlsSink<W: Write + AsRawFd> {
    conn: Shared,
    sock: W,
    /// Encrypted bytes not yet on the socket: `pending[sent..]`.
    pending: Vec<u8>,
    sent: usize,
    /// Plaintext bytes at the head of the next write that were already encrypted.
    owed: usize,
}

impl<W: Write + AsRawFd> TlsSink<W> {
    fn encrypt(&mut self, data: &[u8]) -> io::Result<()> {
        let mut c = lock(&self.conn);
        let mut off = 0;
        while off < data.len() {
            let n = c.writer().write(&data[off..])?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            off += n;
        }
        while c.wants_write() {
            c.write_tls(&mut self.pending)?;
        }
        Ok(())
    }

    /// Move whatever rustls has queued (alerts, key updates) into `pending`.
    fn collect(&mut self) {
        let mut c = lock(&self.conn);
        while c.wants_write() {
            if c.write_tls(&mut self.pending).is_err() {
                break;
            }
        }
    }

    fn sent_all(&mut self) {
        self.sent = 0;
        self.pending.clear();
        if self.pending.capacity() > 4 * WRITE_STEP {
            self.pending = Vec::new();
        }
    }

    /// Send pending ciphertext without blocking; true when none is left.
    fn flush_nonblocking(&mut self) -> io::Result<bool> {
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        while self.sent < self.pending.len() {
            match nix::sys::socket::send(self.sock.as_raw_fd(), &self.pending[self.sent..], flags) {
                Ok(n) => self.sent += n,
                Err(nix::errno::Errno::EAGAIN) => return Ok(false),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.sent_all();
        Ok(true)
    }

    fn flush_blocking(&mut self) -> io::Result<()> {
        if self.sent < self.pending.len() {
            self.sock.write_all(&self.pending[self.sent..])?;
        }
        self.sent_all();
        Ok(())
    }
}

impl<W: Write + AsRawFd + Send> Write for TlsSink<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.flush_blocking()?;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if self.owed > 0 {
            let n = self.owed.min(total);
            self.owed -= n;
            return Ok(n);
        }
        let mut taken = 0;
        for b in bufs {
            let step = b.len().min(WRITE_STEP - taken);
            self.encrypt(&b[..step])?;
            taken += step;
            if taken >= WRITE_STEP {
                break;
            }
        }
        self.flush_blocking()?;
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.collect();
        self.flush_blocking()?;
        self.sock.flush()
    }
}

impl<W: Write + AsRawFd + Send> ReplySink for TlsSink<W> {
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if !self.flush_nonblocking()? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if self.owed > 0 {
            let n = self.owed.min(buf.len());
            self.owed -= n;
            return Ok(n);
        }
        let mut done = 0;
        while done < buf.len() {
            let step = (buf.len() - done).min(TRY_STEP);
            self.encrypt(&buf[done..done + step])?;
            done += step;
            if !self.flush_nonblocking()? {
                self.owed = 1;
                return Ok(done - 1);
            }
        }
        Ok(done)
    }
}

impl<W: Write + AsRawFd> Drop for TlsSink<W> {
    /// Best effort: tell the peer the stream ended on purpose (close_notify), without blocking,
    /// and only when no record is half-sent (an alert after half a record is garbage).
    fn drop(&mut self) {
        if self.sent < self.pending.len() {
            return;
        }
        self.sent_all();
        lock(&self.conn).send_close_notify();
        self.collect();
        let _ = self.flush_nonblocking();
    }
}

/// Re-read the certificates on SIGHUP for as long as the process runs.
pub fn reload_on_sighup(state: Arc<TlsState>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot catch SIGHUP: TLS certificates will not be reloaded");
            return;
        }
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let st = state.clone();
            let r = tokio::task::spawn_blocking(move || st.reload()).await;
            match r {
                Ok(Ok(())) => info!(dir = %state.settings().certificates.display(),
                                    "SIGHUP: TLS certificates reloaded"),
                Ok(Err(e)) => {
                    warn!(error = %e, "SIGHUP: TLS reload failed; keeping the old certificates")
                }
                Err(e) => warn!(error = %e, "SIGHUP: TLS reload task failed"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throw-away key from `certtool --generate-privkey --key-type=ecdsa` (GnuTLS 3.7.9)
    /// whose scalar came out as 31 bytes (its top byte was zero); one in 32 tries here.
    const CERTTOOL_31_BYTE_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGSAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBHgwdgIBAQQfUthaVynM4aD259Og
x0SU2YYoEVDod8SgXz6bn42WOKAKBggqhkjOPQMBB6FEA0IABItmrJHPqRhrIWDv
ZCnp7da+lyJ9/FkfOUGr1jdjNDvSObaZMVEnqQ52ACrHIbHnv90lm9Z/noLTDr/w
wrDm7CQ=
-----END PRIVATE KEY-----
";

    #[test]
    fn a_certtool_ecdsa_key_with_a_short_scalar_is_re_encoded_so_ring_takes_it() {
        use rustls::crypto::ring::sign::any_supported_type;
        let key = PrivateKeyDer::from_pem_slice(CERTTOOL_31_BYTE_KEY.as_bytes()).unwrap();
        assert!(any_supported_type(&key).is_err(), "ring took it as it is");
        let PrivateKeyDer::Pkcs8(k) = &key else {
            panic!("not PKCS#8")
        };
        let fixed = normalise_ec_pkcs8(k.secret_pkcs8_der()).expect("re-encoded");
        assert_eq!(fixed.len(), k.secret_pkcs8_der().len() + 1);
        any_supported_type(&PrivateKeyDer::Pkcs8(fixed.clone().into())).expect("ring takes it");
        assert_eq!(normalise_ec_pkcs8(&fixed), None);
    }

    /// A throw-away key from `certtool --generate-privkey --key-type=ecdsa --pkcs8` whose
    /// scalar came out as 33 bytes (00 AD 85 ...).
    const CERTTOOL_33_BYTE_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGUAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBHoweAIBAQQhAK2Foqsj8hvnVYVk
lHhlFK5VsFA60ErP9efdVPTUcXTRoAoGCCqGSM49AwEHoUQDQgAEGXliAZYJte43
3mO20IQys32KWhK08aHXIgavnz1Od650H56MH9ftuRcv6f9nQGEFNcKGXCJuBQXj
xBr/mtcs+w==
-----END PRIVATE KEY-----
";

    #[test]
    fn a_certtool_ecdsa_key_with_a_padded_scalar_is_re_encoded_so_ring_takes_it() {
        use rustls::crypto::ring::sign::any_supported_type;
        let key = PrivateKeyDer::from_pem_slice(CERTTOOL_33_BYTE_KEY.as_bytes()).unwrap();
        assert!(any_supported_type(&key).is_err(), "ring took it as it is");
        let PrivateKeyDer::Pkcs8(k) = &key else {
            panic!("not PKCS#8")
        };
        let fixed = normalise_ec_pkcs8(k.secret_pkcs8_der()).expect("re-encoded");
        assert_eq!(fixed.len(), k.secret_pkcs8_der().len() - 1);
        any_supported_type(&PrivateKeyDer::Pkcs8(fixed.clone().into())).expect("ring takes it");
        // A well-formed key is left alone.
        assert_eq!(normalise_ec_pkcs8(&fixed), None);
        assert_eq!(normalise_ec_pkcs8(&[0x30, 0x03, 0x02, 0x01, 0x00]), None);
    }

    /// A rustls client and server that finished their handshake in memory (a self-signed
    /// certificate made with openssl for the occasion).
    fn connected_pair() -> (rustls::ClientConnection, ServerConnection) {
        let dir = std::env::temp_dir().join(format!("nbdcrypt-tls-unit-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let ok = std::process::Command::new("sh")
            .arg("-c")
            .arg(
                "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
                 -keyout key.pem -out cert.pem -days 1 -subj /CN=localhost \
                 -addext subjectAltName=DNS:localhost -addext basicConstraints=critical,CA:FALSE \
                 >/dev/null 2>&1",
            )
            .current_dir(&dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "openssl req failed");
        let certs: Vec<_> = CertificateDer::pem_file_iter(dir.join("cert.pem"))
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs.clone(), key)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(certs[0].clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let _ = std::fs::remove_dir_all(&dir);
        let mut c = rustls::ClientConnection::new(
            Arc::new(client),
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut s = ServerConnection::new(Arc::new(server)).unwrap();
        while c.is_handshaking() || s.is_handshaking() || c.wants_write() || s.wants_write() {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().unwrap();
            buf.clear();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets().unwrap();
        }
        (c, s)
    }

    /// The sink's promise to the session: `try_write` never blocks, and when it says it took
    /// a buffer whole, all of that buffer's ciphertext is on the socket (nothing waits in the
    /// sink without a writer on its way). Checked against a peer that does not read, so the
    /// socket fills; then the peer reads everything and must see exactly the bytes the sink
    /// reported as taken, in order, after the blocking writes finish the owed ones.
    #[test]
    fn try_write_never_reports_bytes_whose_ciphertext_still_waits_in_the_sink() {
        use std::os::unix::net::UnixStream;
        let (mut client, server) = connected_pair();
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let (_reader, mut sink) = blocking_parts(server, ours.try_clone().unwrap(), ours);
        let mut expect = Vec::new();
        let mut seed = 7u32;
        let mut blocked = 0;
        let mut i = 0u32;
        while blocked < 3 && i < 10_000 {
            i += 1;
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let len = 1 + (seed >> 8) as usize % (100 * 1024);
            let buf: Vec<u8> = (0..len).map(|k| (k as u32 ^ i) as u8).collect();
            match sink.try_write(&buf) {
                Ok(n) => {
                    expect.extend_from_slice(&buf[..n]);
                    if n == buf.len() {
                        assert!(sink.sent >= sink.pending.len(), "ciphertext left behind");
                    } else {
                        // The session sends the rest with blocking writes (its writer thread).
                        blocked += 1;
                        let rest = buf[n..].to_vec();
                        let t = std::thread::spawn(move || {
                            let mut off = 0;
                            while off < rest.len() {
                                off += sink.write(&rest[off..]).unwrap();
                            }
                            sink.flush().unwrap();
                            sink
                        });
                        // Drain the peer until the writer is done.
                        let mut plain = Vec::new();
                        let mut chunk = vec![0u8; 1 << 16];
                        while !t.is_finished() || plain.len() < expect.len() + buf.len() - n {
                            theirs
                                .set_read_timeout(Some(std::time::Duration::from_millis(50)))
                                .unwrap();
                            match theirs.read(&mut chunk) {
                                Ok(0) => break,
                                Ok(k) => {
                                    let mut input = &chunk[..k];
                                    while !input.is_empty() {
                                        client.read_tls(&mut input).unwrap();
                                        client.process_new_packets().unwrap();
                                        let _ = client.reader().read_to_end(&mut plain);
                                    }
                                }
                                Err(_) => {}
                            }
                        }
                        sink = t.join().unwrap();
                        expect.extend_from_slice(&buf[n..]);
                        assert_eq!(plain.len(), expect.len(), "byte count");
                        assert!(plain == expect, "stream differs");
                        expect.clear();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("try_write: {e}"),
            }
        }
        assert!(
            blocked >= 3,
            "the socket never filled: the test proved nothing"
        );
    }

    proptest::proptest! {
        /// The two decoders of peer- and file-supplied DER never panic, on arbitrary bytes and
        /// on single-byte mutations of a real key.
        #[test]
        fn der_decoders_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
                                    at in 0usize..160, byte in proptest::num::u8::ANY) {
            let _ = subject_of(&data);
            let _ = normalise_ec_pkcs8(&data);
            let key = PrivateKeyDer::from_pem_slice(CERTTOOL_33_BYTE_KEY.as_bytes()).unwrap();
            let mut der = key.secret_der().to_vec();
            let i = at % der.len();
            der[i] = byte;
            let _ = normalise_ec_pkcs8(&der);
            let _ = subject_of(&der);
            der.truncate(at % der.len());
            let _ = normalise_ec_pkcs8(&der);
        }
    }

    /// Operator mistakes get an error that names the file and says what to do; a huge file is
    /// not read into memory.
    #[test]
    fn loading_errors_name_the_file_and_say_what_to_do() {
        let dir = std::env::temp_dir().join(format!("nbdcrypt-tls-load-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ok = std::process::Command::new("sh")
            .arg("-c")
            .arg(
                "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
                 -keyout server-key.pem -out server-cert.pem -days 1 -subj /CN=localhost \
                 >/dev/null 2>&1 && openssl x509 -in server-cert.pem -outform der -out cert.der \
                 && openssl pkey -in server-key.pem -out enc.pem -aes256 -passout pass:x",
            )
            .current_dir(&dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "openssl failed");
        let settings = TlsSettings {
            mode: TlsMode::Require,
            certificates: dir.clone(),
            verify_peer: false,
        };
        if let Err(e) = TlsState::load(settings.clone()) {
            panic!("a good pair does not load: {e}");
        }
        let with = |file: &str, contents: &[u8], want: &str| {
            let path = dir.join(file);
            let saved = std::fs::read(&path).unwrap();
            std::fs::write(&path, contents).unwrap();
            let e = TlsState::load(settings.clone())
                .err()
                .expect("loaded a broken file");
            std::fs::write(&path, saved).unwrap();
            assert!(e.contains(&path.display().to_string()), "{e}");
            assert!(e.contains(want), "{want:?} not in: {e}");
        };
        let der = std::fs::read(dir.join("cert.der")).unwrap();
        with("server-cert.pem", &der, "looks like DER");
        let enc = std::fs::read(dir.join("enc.pem")).unwrap();
        with("server-key.pem", &enc, "encrypted with a pass phrase");
        with("server-key.pem", b"", "the file is empty");
        with(
            "server-cert.pem",
            b"hello",
            "no \"-----BEGIN CERTIFICATE-----\" block",
        );
        // 17 MiB (sparse): refused after reading at most 16 MiB + 1 byte.
        let big = dir.join("server-cert.pem");
        let saved = std::fs::read(&big).unwrap();
        std::fs::File::create(&big)
            .unwrap()
            .set_len(17 << 20)
            .unwrap();
        let e = TlsState::load(settings.clone())
            .err()
            .expect("loaded 17 MiB");
        assert!(e.contains("larger than 16 MiB"), "{e}");
        std::fs::write(&big, saved).unwrap();
        // A parser message quoting a long line is cut.
        let mut long = b"-----BEGIN CERTIFICATE-----\n".to_vec();
        long.extend(std::iter::repeat_n(b'!', 100_000));
        long.extend_from_slice(b"\n-----END CERTIFICATE-----\n");
        let path = dir.join("server-cert.pem");
        std::fs::write(&path, &long).unwrap();
        let e = TlsState::load(settings.clone())
            .err()
            .expect("loaded garbage");
        assert!(e.len() < 1000, "{} bytes: {e}", e.len());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn modes_parse() {
        assert_eq!("off".parse(), Ok(TlsMode::Off));
        assert_eq!("on".parse(), Ok(TlsMode::On));
        assert_eq!("require".parse(), Ok(TlsMode::Require));
        assert!("maybe".parse::<TlsMode>().is_err());
    }

    #[test]
    fn truncated_or_garbage_certificates_give_no_subject_and_no_panic() {
        assert_eq!(subject_of(&[]), None);
        assert_eq!(subject_of(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(subject_of(&[0x30, 0x03, 0x30, 0x01]), None);
        for len in 0..64u8 {
            let v: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37) ^ 0x30).collect();
            let _ = subject_of(&v);
        }
    }
}
