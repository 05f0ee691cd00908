//! Listeners and connections: accept, cap the number of clients, run the handshake under a
//! deadline, then the transmission session. A failing connection is logged and dropped; it never
//! takes the server down.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::MsgFlags;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::audit::{AuditEvent, AuditEventKind, AuditLog};
use crate::export::ExportTable;
use crate::nbd::handshake::{negotiate_in_tls, negotiate_plaintext, Negotiated, Step, TlsPhase};
use crate::nbd::session::{self, Budget, ByteBudget, End, ReplySink, Stopper};
use crate::nbd::ProtocolError;
use crate::shutdown::Shutdown;
use crate::tls::{PeerIdentity, TlsMode, TlsSettings, TlsState};

/// Where and how to listen.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub unix: Option<PathBuf>,
    pub socket_mode: u32,
    pub tcp: Option<SocketAddr>,
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    pub max_connection_bytes: u64,
    pub max_server_bytes: u64,
    /// Worker threads per connection (requests in flight per connection).
    pub threads: usize,
    /// STARTTLS on the listeners (`--tls`); `None`: off.
    pub tls: Option<TlsSettings>,
}

/// Bound listeners, ready to serve; binding happens before the daemon reports itself ready.
pub struct Listeners {
    unix: Option<(UnixListener, PathBuf)>,
    tcp: Option<TcpListener>,
    /// Loaded before the daemon reports itself ready, so a bad certificate fails the start.
    tls: Option<Arc<TlsState>>,
    audit: Option<Arc<AuditLog>>,
}

impl Listeners {
    pub async fn bind(cfg: &ServerConfig) -> io::Result<Listeners> {
        let unix = match &cfg.unix {
            Some(path) => Some((bind_unix(path, cfg.socket_mode).await?, path.clone())),
            None => None,
        };
        let tcp =
            match cfg.tcp {
                Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
                })?),
                None => None,
            };
        let tls = match &cfg.tls {
            Some(t) if t.mode != TlsMode::Off => Some(Arc::new(
                TlsState::load(t.clone()).map_err(io::Error::other)?,
            )),
            _ => None,
        };
        Ok(Listeners {
            unix,
            tcp,
            tls,
            audit: None,
        })
    }

    /// Record TLS clients' attaches (with their certificate subject) in this audit log.
    pub fn set_audit(&mut self, audit: Arc<AuditLog>) {
        self.audit = Some(audit);
    }
}

/// Context every connection task needs.
#[derive(Clone)]
struct Ctx {
    exports: Arc<ExportTable>,
    budget: Budget,
    handshake_timeout: Duration,
    tls: Option<Arc<TlsState>>,
    audit: Option<Arc<AuditLog>>,
}

/// Serve until shutdown, then wait for every connection to finish its in-flight requests.
pub async fn run(
    cfg: &ServerConfig,
    listeners: Listeners,
    exports: Arc<ExportTable>,
    mut shutdown: Shutdown,
) -> io::Result<()> {
    let Listeners {
        unix,
        tcp,
        tls,
        audit,
    } = listeners;
    if let Some(t) = &tls {
        crate::tls::reload_on_sighup(t.clone());
    }
    let unix_phase = phase(tls.as_ref().map(|t| t.settings().unix_mode()));
    let tcp_phase = phase(tls.as_ref().map(|t| t.settings().mode));
    let ctx = Ctx {
        exports,
        budget: Budget {
            server: Arc::new(ByteBudget::new(cfg.max_server_bytes)),
            per_connection: cfg.max_connection_bytes,
            threads: cfg.threads,
        },
        handshake_timeout: cfg.handshake_timeout,
        tls,
        audit,
    };
    let permits = Arc::new(Semaphore::new(cfg.max_connections));
    let mut tasks = JoinSet::new();

    loop {
        tokio::select! {
            _ = shutdown.triggered() => break,
            Some(res) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = res {
                    warn!(error = %e, "connection task ended abnormally");
                }
            }
            accepted = accept_unix(unix.as_ref().map(|(l, _)| l)) => match accepted {
                Ok(stream) => {
                    let peer = describe_unix_peer(&stream);
                    let Some(permit) = take_permit(&permits, &peer) else { continue };
                    let (ctx, sd) = (ctx.clone(), shutdown.clone());
                    tasks.spawn(async move {
                        connection(stream, peer, ctx, sd, unix_phase).await;
                        drop(permit);
                    });
                }
                Err(e) => accept_failed(e).await,
            },
            accepted = accept_tcp(tcp.as_ref()) => match accepted {
                Ok((stream, addr)) => {
                    let peer = format!("tcp {addr}");
                    let Some(permit) = take_permit(&permits, &peer) else { continue };
                    let _ = stream.set_nodelay(true);
                    let (ctx, sd) = (ctx.clone(), shutdown.clone());
                    tasks.spawn(async move {
                        connection(stream, peer, ctx, sd, tcp_phase).await;
                        drop(permit);
                    });
                }
                Err(e) => accept_failed(e).await,
            },
        }
    }

    info!(
        connections = tasks.len(),
        "shutting down: no new connections; finishing in-flight requests"
    );
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res {
            warn!(error = %e, "connection task ended abnormally");
        }
    }
    if let Some((_, path)) = unix {
        crate::socket::remove_ours(&path);
    }
    Ok(())
}

fn phase(mode: Option<TlsMode>) -> TlsPhase {
    match mode {
        None | Some(TlsMode::Off) => TlsPhase::Off,
        Some(TlsMode::On) => TlsPhase::Offered,
        Some(TlsMode::Require) => TlsPhase::Required,
    }
}

/// The stream the session will run on, once the handshake is over.
enum Transport<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>, PeerIdentity),
}

/// Why a handshake ended without a session.
enum HandshakeEnd {
    Protocol(ProtocolError),
    /// The TLS handshake itself failed (no certificate, a wrong CA, garbage).
    Tls(io::Error),
}

impl From<ProtocolError> for HandshakeEnd {
    fn from(e: ProtocolError) -> Self {
        HandshakeEnd::Protocol(e)
    }
}

/// Option haggling, with the TLS handshake in the middle when the client sends STARTTLS.
async fn handshake<S: Socket>(
    mut stream: S,
    peer: &str,
    ctx: &Ctx,
    shutdown: &Shutdown,
    phase: TlsPhase,
) -> Result<(Negotiated, Transport<S>), HandshakeEnd> {
    match negotiate_plaintext(&mut stream, &ctx.exports, shutdown, phase).await? {
        Step::Go(neg) => Ok((neg, Transport::Plain(stream))),
        Step::StartTls(after) => {
            let Some(tls) = &ctx.tls else {
                // negotiate_plaintext only accepts STARTTLS when TLS is configured.
                return Err(ProtocolError::Aborted.into());
            };
            // Options are read with exact-length reads on the bare socket, so nothing the
            // client sent after STARTTLS sits in a buffer of ours: it all reaches rustls.
            let mut tls = tls
                .acceptor()
                .accept(stream)
                .await
                .map_err(HandshakeEnd::Tls)?;
            let id = PeerIdentity::of(tls.get_ref().1);
            info!(peer = %peer, tls = %id.version, cipher = %id.cipher,
                  client = id.subject.as_deref().unwrap_or("(no client certificate)"),
                  "TLS established");
            let neg = negotiate_in_tls(&mut tls, &ctx.exports, shutdown, after).await?;
            Ok((neg, Transport::Tls(Box::new(tls), id)))
        }
    }
}

async fn connection<S: Socket>(
    stream: S,
    peer: String,
    ctx: Ctx,
    mut shutdown: Shutdown,
    phase: TlsPhase,
) {
    debug!(%peer, "connected");
    crate::metrics::METRICS
        .connections
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let failed = |reason: &str| crate::metrics::METRICS.handshake_failed(reason);
    // Subscribe before the export is looked up, so a lock that lands between the lookup and
    // the attach below is still seen.
    let mut withdrawn = ctx.exports.watch_withdrawal();
    withdrawn.borrow_and_update();
    let hs = tokio::time::timeout(
        ctx.handshake_timeout,
        // The span puts the peer on the handshake's own log lines (e.g. a plaintext client
        // refused under --tls require).
        tracing::Instrument::instrument(
            handshake(stream, &peer, &ctx, &shutdown, phase),
            tracing::info_span!("handshake", %peer),
        ),
    );
    let mut stop = shutdown.clone();
    let negotiated = tokio::select! {
        r = hs => r,
        // A client idling in the handshake must not hold up shutdown.
        _ = stop.triggered() => {
            debug!(%peer, "closing a connection still in its handshake: shutting down");
            return;
        }
    };
    let (neg, transport) = match negotiated {
        Err(_) => {
            info!(%peer, "handshake timed out; closing");
            failed("timeout");
            return;
        }
        Ok(Err(HandshakeEnd::Tls(e))) => {
            warn!(%peer, error = %e, "TLS handshake failed; closing");
            return;
        }
        Ok(Err(HandshakeEnd::Protocol(ProtocolError::Aborted))) => {
            debug!(%peer, "client ended the handshake");
            failed("aborted");
            return;
        }
        Ok(Err(HandshakeEnd::Protocol(ProtocolError::Io(e))))
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
            ) =>
        {
            debug!(%peer, "client closed during the handshake");
            failed("closed");
            return;
        }
        Ok(Err(HandshakeEnd::Protocol(e))) => {
            info!(%peer, error = %e, "handshake failed; closing");
            failed("protocol");
            return;
        }
        Ok(Ok(x)) => x,
    };
    let (blocking, identity) = match transport {
        Transport::Plain(s) => (s.into_blocking(), None),
        Transport::Tls(tls, id) => {
            let (s, conn) = tls.into_inner();
            (s.into_blocking_tls(conn), Some(id))
        }
    };
    let (reader, writer, stopper) = match blocking {
        Ok(parts) => parts,
        Err(e) => {
            warn!(%peer, error = %e, "cannot hand the socket to the session");
            return;
        }
    };
    if let Some(id) = &identity {
        info!(%peer, export = %neg.export.name, tls = %id.version, cipher = %id.cipher,
              client = id.subject.as_deref().unwrap_or("(no client certificate)"),
              fingerprint = id.fingerprint.as_deref().unwrap_or(""), "TLS client attaching");
        if let Some(audit) = &ctx.audit {
            let mut ev = AuditEvent::new(AuditEventKind::NbdTlsAttach)
                .detail("peer", peer.clone())
                .detail("export", neg.export.name.clone())
                .detail("tls_version", id.version.clone())
                .detail("cipher", id.cipher.clone());
            if let Some(s) = &id.subject {
                ev = ev.detail("client_subject", s.clone());
            }
            if let Some(f) = &id.fingerprint {
                ev = ev.detail("client_sha256", f.clone());
            }
            if let Err(e) = audit.record(&ev) {
                warn!(error = %e, "cannot write the audit log");
            }
        }
    }
    info!(%peer, export = %neg.export.name, structured = neg.structured_replies,
          encrypted = neg.export.encrypted, "client attached");
    let _attached = ctx.exports.attach();
    if !ctx
        .exports
        .current()
        .is_some_and(|e| Arc::ptr_eq(&e, &neg.export))
    {
        info!(%peer, "volume was locked during the handshake; closing");
        failed("locked");
        return;
    }
    let budget = ctx.budget.clone();
    let session_stopper = stopper.clone();
    let mut session = tokio::task::spawn_blocking(move || {
        session::serve(neg, reader, writer, budget, session_stopper)
    });
    let result = tokio::select! {
        r = &mut session => r,
        _ = shutdown.triggered() => { stopper.stop(); session.await }
        _ = withdrawn.changed() => { stopper.stop(); session.await }
    };
    match result {
        Ok(Ok(End::Disconnected)) => info!(%peer, "client disconnected"),
        Ok(Ok(End::Stopped)) => info!(%peer, "session stopped by the server"),
        Ok(Err(e)) => warn!(%peer, error = %e, "connection closed on protocol error"),
        Err(e) => warn!(%peer, error = %e, "session ended abnormally"),
    }
}

/// A stream the handshake runs on asynchronously and the session then serves with blocking I/O.
trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The same socket as a blocking std stream.
    type Std: Read + Write + AsRawFd + Send + Sync + 'static;
    fn into_std_blocking(self) -> io::Result<Self::Std>;
    fn clone_std(s: &Self::Std) -> io::Result<Self::Std>;
    fn shut_read(s: &Self::Std);

    /// Reader, writer, and a stopper that shuts the read side.
    fn into_blocking(self) -> io::Result<Blocking>
    where
        Self: Sized,
    {
        let s = self.into_std_blocking()?;
        let (r, c) = (Self::clone_std(&s)?, Self::clone_std(&s)?);
        let stop = Stopper::new(move || Self::shut_read(&c));
        Ok((Box::new(r), Box::new(SocketSink(s)), stop))
    }

    /// The same over an established TLS connection (see crate::tls for the design).
    fn into_blocking_tls(self, conn: rustls::ServerConnection) -> io::Result<Blocking>
    where
        Self: Sized,
    {
        let s = self.into_std_blocking()?;
        let (r, c) = (Self::clone_std(&s)?, Self::clone_std(&s)?);
        let stop = Stopper::new(move || Self::shut_read(&c));
        let (reader, sink) = crate::tls::blocking_parts(conn, r, s);
        Ok((Box::new(reader), Box::new(sink), stop))
    }
}

/// The session's reader, writer and stopper.
type Blocking = (Box<dyn Read + Send>, Box<dyn ReplySink>, Stopper);

/// The session's write side: blocking writes, plus a non-blocking try for the fast path.
struct SocketSink<S>(S);

impl<S: Write + AsRawFd + Send> Write for SocketSink<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<S: Write + AsRawFd + Send> ReplySink for SocketSink<S> {
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        nix::sys::socket::send(self.0.as_raw_fd(), buf, flags).map_err(io::Error::from)
    }
}

impl Socket for UnixStream {
    type Std = std::os::unix::net::UnixStream;
    fn into_std_blocking(self) -> io::Result<Self::Std> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        Ok(s)
    }
    fn clone_std(s: &Self::Std) -> io::Result<Self::Std> {
        s.try_clone()
    }
    fn shut_read(s: &Self::Std) {
        let _ = s.shutdown(std::net::Shutdown::Read);
    }
}

impl Socket for TcpStream {
    type Std = std::net::TcpStream;
    fn into_std_blocking(self) -> io::Result<Self::Std> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        Ok(s)
    }
    fn clone_std(s: &Self::Std) -> io::Result<Self::Std> {
        s.try_clone()
    }
    fn shut_read(s: &Self::Std) {
        let _ = s.shutdown(std::net::Shutdown::Read);
    }
}

fn take_permit(permits: &Arc<Semaphore>, peer: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
    match permits.clone().try_acquire_owned() {
        Ok(p) => Some(p),
        Err(_) => {
            warn!(%peer, "connection limit reached; refusing client");
            crate::metrics::METRICS.handshake_failed("connection_limit");
            None
        }
    }
}

async fn accept_unix(l: Option<&UnixListener>) -> io::Result<UnixStream> {
    match l {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

async fn accept_tcp(l: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// EMFILE and friends: back off briefly instead of spinning.
async fn accept_failed(e: io::Error) {
    warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn describe_unix_peer(s: &UnixStream) -> String {
    match s.peer_cred() {
        Ok(c) => format!("unix uid={} pid={}", c.uid(), c.pid().unwrap_or(0)),
        Err(_) => "unix (unknown peer)".to_owned(),
    }
}

/// The NBD socket: bound root-only like the control socket, then opened to `mode` (0600 unless
/// the operator asked for more). Its directory is traversable so such a mode can take effect.
async fn bind_unix(path: &Path, mode: u32) -> io::Result<UnixListener> {
    crate::socket::bind(path, 0o755, mode).await
}
