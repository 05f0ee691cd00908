//! The client side of the fixed-newstyle handshake: STARTTLS (nbds), STRUCTURED_REPLY when
//! offered, GO with the export name. Option replies are bounded (64 KiB) and checked.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};

use super::uri::{Address, UpstreamUri};
use crate::nbd::wire::*;

/// What GO told us about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    /// The largest request payload the upstream accepts (its block-size maximum, or 32 MiB).
    pub max_request: u32,
}

impl ExportInfo {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// The socket to the upstream, while negotiating (async). `transport` turns it (and the TLS
/// session, if any) into blocking I/O for the transmission phase.
pub enum Sock {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl AsyncRead for Sock {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Sock::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Sock::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Sock {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Sock::Tcp(s) => Pin::new(s).poll_write(cx, b),
            Sock::Unix(s) => Pin::new(s).poll_write(cx, b),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Sock::Tcp(s) => Pin::new(s).poll_flush(cx),
            Sock::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Sock::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Sock::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A negotiated connection, ready for the transmission phase.
pub enum Connected {
    Plain(Sock),
    Tls(Box<tokio_rustls::client::TlsStream<Sock>>),
}

/// The TLS client configuration for an `nbds` URI: the CA in `DIR/ca-cert.pem` (required: we
/// never connect unverified) and, for mutual TLS, `DIR/client-cert.pem` + `DIR/client-key.pem`.
pub fn tls_config(uri: &UpstreamUri) -> Result<Arc<rustls::ClientConfig>, String> {
    let dir = uri.tls_certificates.clone().ok_or_else(|| {
        format!(
            "{uri}: nbds needs ?tls-certificates=DIR (a directory with ca-cert.pem, and \
             client-cert.pem + client-key.pem for client certificates): the upstream's \
             certificate is always verified"
        )
    })?;
    let ca = dir.join("ca-cert.pem");
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&ca)
        .map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
    for c in certs {
        let c = c.map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
        roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate in it", ca.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
    let cfg = match (cert.exists(), key.exists()) {
        (true, true) => {
            let chain = CertificateDer::pem_file_iter(&cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
            let k = PrivateKeyDer::from_pem_file(&key)
                .map_err(|e| format!("cannot read {}: {e}", key.display()))?;
            // certtool's ECDSA scalars one byte long or short, as the server side takes them (tls.rs).
            let k = match &k {
                PrivateKeyDer::Pkcs8(p) => {
                    match crate::tls::normalise_ec_pkcs8(p.secret_pkcs8_der()) {
                        Some(fixed) => PrivateKeyDer::Pkcs8(fixed.into()),
                        None => k,
                    }
                }
                _ => k,
            };
            builder
                .with_client_auth_cert(chain, k)
                .map_err(|e| format!("{} / {}: {e}", cert.display(), key.display()))?
        }
        (false, false) => builder.with_no_client_auth(),
        _ => {
            return Err(format!(
                "{}: client-cert.pem and client-key.pem go together (both or neither)",
                dir.display()
            ))
        }
    };
    Ok(Arc::new(cfg))
}

fn server_name(uri: &UpstreamUri) -> Result<ServerName<'static>, String> {
    let name = match (&uri.tls_hostname, &uri.address) {
        (Some(h), _) => h.clone(),
        (None, Address::Tcp { host, .. }) => host.clone(),
        (None, Address::Unix(_)) => "localhost".to_owned(),
    };
    ServerName::try_from(name.clone()).map_err(|_| format!("{name:?} is not a valid TLS name"))
}

async fn send_opt<S: AsyncWrite + Unpin>(s: &mut S, opt: u32, data: &[u8]) -> Result<(), String> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend(IHAVEOPT.to_be_bytes());
    b.extend(opt.to_be_bytes());
    b.extend(
        u32::try_from(data.len())
            .map_err(|_| "option too long")?
            .to_be_bytes(),
    );
    b.extend(data);
    s.write_all(&b)
        .await
        .map_err(|e| format!("sending option {opt}: {e}"))?;
    s.flush()
        .await
        .map_err(|e| format!("sending option {opt}: {e}"))
}

/// One option reply: (type, payload), payload at most 64 KiB.
async fn read_opt_reply<S: AsyncRead + Unpin>(
    s: &mut S,
    opt: u32,
) -> Result<(u32, Vec<u8>), String> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)
        .await
        .map_err(|e| format!("reading the reply to option {opt}: {e}"))?;
    let magic = u64::from_be_bytes(h[..8].try_into().unwrap_or_default());
    let got = u32::from_be_bytes(h[8..12].try_into().unwrap_or_default());
    let ty = u32::from_be_bytes(h[12..16].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap_or_default());
    if magic != OPT_REPLY_MAGIC || got != opt {
        return Err(format!(
            "bad reply to option {opt} (magic {magic:#x}, option {got})"
        ));
    }
    if len > MAX_OPTION_LENGTH {
        return Err(format!(
            "reply to option {opt} of {len} bytes (over 64 KiB)"
        ));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)
        .await
        .map_err(|e| format!("reading the reply to option {opt}: {e}"))?;
    Ok((ty, data))
}

fn opt_error(opt: &str, ty: u32, data: &[u8]) -> String {
    let what = match ty {
        REP_ERR_UNSUP => "unsupported",
        REP_ERR_POLICY => "refused by policy",
        REP_ERR_INVALID => "invalid",
        REP_ERR_TLS_REQD => "TLS required (use nbds:// or nbds+unix://)",
        REP_ERR_UNKNOWN => "no such export",
        REP_ERR_SHUTDOWN => "server shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "block size negotiation required",
        _ => "error",
    };
    let msg: String = String::from_utf8_lossy(data)
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    if msg.is_empty() {
        format!("the upstream answered {opt}: {what}")
    } else {
        format!("the upstream answered {opt}: {what}: {msg}")
    }
}

/// Connects, negotiates, and returns the transmission-phase connection and the export's facts.
pub async fn connect(
    uri: &UpstreamUri,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<(Connected, ExportInfo), String> {
    let mut s = match &uri.address {
        Address::Tcp { host, port } => {
            let t = tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
            let _ = t.set_nodelay(true);
            Sock::Tcp(t)
        }
        Address::Unix(p) => Sock::Unix(
            tokio::net::UnixStream::connect(p)
                .await
                .map_err(|e| format!("cannot connect to {}: {e}", p.display()))?,
        ),
    };
    let mut g = [0u8; 18];
    s.read_exact(&mut g)
        .await
        .map_err(|e| format!("reading the greeting: {e}"))?;
    let magic = u64::from_be_bytes(g[..8].try_into().unwrap_or_default());
    let ihaveopt = u64::from_be_bytes(g[8..16].try_into().unwrap_or_default());
    let hflags = u16::from_be_bytes([g[16], g[17]]);
    if magic != NBDMAGIC || ihaveopt != IHAVEOPT {
        return Err("not a newstyle NBD server (oldstyle or not NBD at all)".into());
    }
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err("the server does not speak fixed newstyle NBD".into());
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    s.write_all(&cflags.to_be_bytes())
        .await
        .map_err(|e| format!("sending client flags: {e}"))?;
    if uri.tls {
        let cfg = tls.ok_or("nbds without a TLS configuration")?;
        send_opt(&mut s, OPT_STARTTLS, &[]).await?;
        let (ty, data) = read_opt_reply(&mut s, OPT_STARTTLS).await?;
        // Anything but ACK is fatal: never fall back to plaintext (libnbd CVE-2019-14842).
        if ty != REP_ACK || !data.is_empty() {
            return Err(opt_error("STARTTLS", ty, &data));
        }
        let connector = tokio_rustls::TlsConnector::from(cfg.clone());
        let mut t = connector
            .connect(server_name(uri)?, s)
            .await
            .map_err(|e| format!("TLS handshake with the upstream: {e}"))?;
        let info = negotiate(&mut t, uri).await?;
        return Ok((Connected::Tls(Box::new(t)), info));
    }
    let info = negotiate(&mut s, uri).await?;
    Ok((Connected::Plain(s), info))
}

/// STRUCTURED_REPLY and GO (inside TLS, if any).
async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    uri: &UpstreamUri,
) -> Result<ExportInfo, String> {
    send_opt(s, OPT_STRUCTURED_REPLY, &[]).await?;
    let (ty, data) = read_opt_reply(s, OPT_STRUCTURED_REPLY).await?;
    let structured = ty == REP_ACK && data.is_empty();
    // GO: the export name and no info requests. Block sizes are deliberately not requested:
    // asking would bind us to the upstream's minimum (64 KiB for nbdkit's S3 plugin) while we
    // send 512/4096-byte sectors; unasked, the upstream must accept them (read-modify-write).
    let name = uri.export.as_bytes();
    let mut go = Vec::with_capacity(name.len() + 8);
    go.extend(
        u32::try_from(name.len())
            .map_err(|_| "export name too long")?
            .to_be_bytes(),
    );
    go.extend(name);
    go.extend(0u16.to_be_bytes());
    send_opt(s, OPT_GO, &go).await?;
    let mut export: Option<(u64, u16)> = None;
    let mut max_request = MAX_PAYLOAD;
    for _ in 0..64 {
        let (ty, data) = read_opt_reply(s, OPT_GO).await?;
        match ty {
            REP_ACK => {
                let (size, flags) = export.ok_or("GO acknowledged without NBD_INFO_EXPORT")?;
                if size > i64::MAX as u64 {
                    return Err(format!("export size {size} is not credible"));
                }
                return Ok(ExportInfo {
                    size,
                    flags,
                    structured,
                    max_request,
                });
            }
            REP_INFO if data.len() >= 2 => {
                let it = u16::from_be_bytes([data[0], data[1]]);
                if it == INFO_EXPORT && data.len() == 12 {
                    let size = u64::from_be_bytes(data[2..10].try_into().unwrap_or_default());
                    export = Some((size, u16::from_be_bytes([data[10], data[11]])));
                } else if it == INFO_BLOCK_SIZE && data.len() == 14 {
                    // Volunteered: only the maximum is honoured (requests are split to it).
                    let max = u32::from_be_bytes(data[10..14].try_into().unwrap_or_default());
                    if max >= 4096 {
                        max_request = max.min(MAX_PAYLOAD) & !4095;
                    }
                }
            }
            REP_INFO => return Err("malformed NBD_REP_INFO".into()),
            t if t & (1 << 31) != 0 => {
                return Err(opt_error(
                    &format!("GO for export {:?}", uri.export),
                    t,
                    &data,
                ))
            }
            t => return Err(format!("unexpected reply {t} to GO")),
        }
    }
    Err("more than 64 replies to GO".into())
}
