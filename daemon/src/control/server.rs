//! The control socket: a root-only Unix stream socket, a peer-credential check, one task per
//! client, each line handed to the volume manager and its answer written back.
//!
//! Guarantees:
//! - The socket is created with mode 0600 (umask 0177 around `bind`, so there is no window in
//!   which others could connect), and a stale socket file is replaced, a live one never; a path
//!   that is not a socket is never removed.
//! - Only uid 0 and the daemon's own effective uid are served; others get `permission_denied`.
//! - A request line is read into a fixed buffer of `MAX_LINE` bytes that is wiped after parsing
//!   (it may hold a secret); a longer line is refused and that connection closed.
//! - Logs name the peer (uid, pid) and the request kind, never the request's contents.
//!
//! This module knows sockets and lines; what a request does is `control::volume`'s business.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};
use zeroize::{Zeroize, Zeroizing};

use crate::control::proto::{ErrorKind, Request, RequestKind, Response, MAX_LINE};
use crate::control::volume::{Origin, VolumeHandle};
use crate::shutdown::Shutdown;

/// Control connections served at once; more are told `busy` and closed.
const MAX_CLIENTS: usize = 16;

/// How long a connection may sit without sending a complete request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long clients still connected at shutdown get to receive their answers.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A bound control socket; bind it before reporting the daemon ready.
pub struct ControlListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlListener {
    /// Bind `path` with mode 0600, creating its directory (mode 0700) if missing.
    pub async fn bind(path: &Path) -> io::Result<ControlListener> {
        let listener = crate::socket::bind_private(path, 0o700).await?;
        Ok(ControlListener {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Serve control requests until shutdown; then close the socket and remove its file.
pub async fn run(listener: ControlListener, volume: VolumeHandle, mut shutdown: Shutdown) {
    let ControlListener { listener, path } = listener;
    let own_uid = nix::unistd::geteuid().as_raw();
    let permits = Arc::new(Semaphore::new(MAX_CLIENTS));
    let mut tasks = JoinSet::new();
    info!(path = %path.display(), "control socket listening");
    loop {
        tokio::select! {
            _ = shutdown.triggered() => break,
            Some(res) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = res {
                    warn!(error = %e, "control connection task ended abnormally");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let permit = permits.clone().try_acquire_owned().ok();
                    let volume = volume.clone();
                    tasks.spawn(async move {
                        match permit {
                            Some(_permit) => connection(stream, volume, own_uid).await,
                            None => {
                                warn!("too many control connections; refusing one");
                                let busy = Response::error(ErrorKind::Busy, "too many control connections; try again");
                                let mut stream = stream;
                                let _ = stream.write_all(&busy.encode()).await;
                            }
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "control accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    crate::socket::remove_ours(&path);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    debug!("control socket closed");
}

/// uid 0 and the daemon's own user may control it.
fn peer_allowed(uid: u32, own_uid: u32) -> bool {
    uid == 0 || uid == own_uid
}

async fn connection(mut stream: UnixStream, volume: VolumeHandle, own_uid: u32) {
    let origin = match stream.peer_cred() {
        Ok(c) => Origin {
            uid: c.uid(),
            pid: c.pid(),
        },
        Err(e) => {
            warn!(error = %e, "control: cannot read peer credentials; closing");
            return;
        }
    };
    if !peer_allowed(origin.uid, own_uid) {
        warn!(%origin, "control: refused a peer that is neither root nor the daemon's user");
        let denied = Response::error(
            ErrorKind::PermissionDenied,
            "permission denied: only root (or the user nbdcryptd runs as) may control it",
        );
        let _ = stream.write_all(&denied.encode()).await;
        return;
    }
    let mut buf = LineBuf::new();
    loop {
        let line = match tokio::time::timeout(IDLE_TIMEOUT, buf.read_line(&mut stream)).await {
            Err(_) => {
                debug!(%origin, "control: idle; closing");
                return;
            }
            Ok(Err(e)) => {
                debug!(%origin, error = %e, "control: read failed; closing");
                return;
            }
            Ok(Ok(Line::Eof)) => return,
            Ok(Ok(Line::TooLong)) => {
                warn!(%origin, limit = MAX_LINE, "control: request line too long; closing");
                let refused = Response::error(
                    ErrorKind::BadRequest,
                    format!("request longer than {MAX_LINE} bytes"),
                );
                let _ = stream.write_all(&refused.encode()).await;
                return;
            }
            Ok(Ok(Line::Complete { len, eof })) => (len, eof),
        };
        let (len, eof) = line;
        let parsed = Request::decode(buf.line(len));
        buf.consume(len);
        let response = match parsed {
            Ok(request) => {
                let kind = request.kind();
                let response = volume.call(request, origin).await;
                log_outcome(origin, kind, &response);
                response
            }
            Err(e) => {
                info!(%origin, reason = e.summary(), "control: bad request");
                Response::error(ErrorKind::BadRequest, e.to_string())
            }
        };
        if let Err(e) = stream.write_all(&response.encode()).await {
            debug!(%origin, error = %e, "control: client went away before the answer");
            return;
        }
        if eof {
            return;
        }
    }
}

fn log_outcome(origin: Origin, kind: RequestKind, response: &Response) {
    match (kind, response) {
        (RequestKind::Status | RequestKind::Stats, Response::Ok(_)) => {
            debug!(%origin, request = %kind, "control request: ok")
        }
        (_, Response::Ok(s)) => {
            info!(%origin, request = %kind, state = %s.state, "control request: ok")
        }
        (_, Response::Error(e)) => {
            info!(%origin, request = %kind, error = %e.kind, "control request refused")
        }
    }
}

enum Line {
    /// `len` bytes of line content, not counting the newline; `eof` if the peer ended the stream
    /// without one.
    Complete {
        len: usize,
        eof: bool,
    },
    TooLong,
    Eof,
}

/// A line buffer that starts small and doubles up to `MAX_LINE` (a key file can be megabytes,
/// a status request is a few bytes). Growing copies into a new buffer and wipes the old one,
/// so no copy of a secret is left behind; the buffer is wiped when dropped.
/// First size of a connection's line buffer.
const INITIAL_LINE: usize = 64 * 1024;

struct LineBuf {
    buf: Zeroizing<Vec<u8>>,
    filled: usize,
    /// Bytes before this were scanned and hold no newline.
    scanned: usize,
}

impl LineBuf {
    fn new() -> Self {
        LineBuf {
            buf: Zeroizing::new(vec![0; INITIAL_LINE.min(MAX_LINE)]),
            filled: 0,
            scanned: 0,
        }
    }

    async fn read_line(&mut self, stream: &mut UnixStream) -> io::Result<Line> {
        loop {
            if let Some(i) = self.buf[self.scanned..self.filled]
                .iter()
                .position(|&b| b == b'\n')
            {
                return Ok(Line::Complete {
                    len: self.scanned + i,
                    eof: false,
                });
            }
            self.scanned = self.filled;
            if self.filled == self.buf.len() {
                if self.buf.len() >= MAX_LINE {
                    return Ok(Line::TooLong);
                }
                let mut bigger = Zeroizing::new(vec![0; (self.buf.len() * 2).min(MAX_LINE)]);
                bigger[..self.filled].copy_from_slice(&self.buf[..self.filled]);
                // The old buffer is wiped as it drops.
                self.buf = bigger;
            }
            let n = stream.read(&mut self.buf[self.filled..]).await?;
            if n == 0 {
                // A last request without its newline is still a request.
                return Ok(if self.filled == 0 {
                    Line::Eof
                } else {
                    Line::Complete {
                        len: self.filled,
                        eof: true,
                    }
                });
            }
            self.filled += n;
        }
    }

    fn line(&self, len: usize) -> &[u8] {
        &self.buf[..len]
    }

    /// Wipe the line (and its newline) and move any bytes after it to the front.
    fn consume(&mut self, len: usize) {
        let end = (len + 1).min(self.filled);
        self.buf[..end].zeroize();
        self.buf.copy_within(end..self.filled, 0);
        let rest = self.filled - end;
        self.buf[rest..self.filled].zeroize();
        self.filled = rest;
        self.scanned = 0;
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::control::client::{self, ClientError};
    use crate::control::proto::{ErrorReply, StatusReport, VolumeState};
    use crate::control::volume::tests::{fake_unlocker, info, Probe, GOOD};
    use crate::control::volume::VolumeManager;
    use crate::crypto::keys::SecretBytes;
    use crate::export::ExportTable;
    use crate::shutdown::{self, ShutdownTrigger};

    struct Daemon {
        _dir: tempfile::TempDir,
        path: PathBuf,
        trigger: ShutdownTrigger,
        served: tokio::task::JoinHandle<()>,
    }

    async fn daemon() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/control.sock");
        let exports = ExportTable::new("vol".into(), String::new());
        let (trigger, shutdown) = shutdown::channel();
        let (volume, _task) = VolumeManager::new(exports, info(), fake_unlocker(&Probe::default()))
            .spawn(shutdown.clone());
        let listener = ControlListener::bind(&path).await.unwrap();
        let served = tokio::spawn(run(listener, volume, shutdown));
        Daemon {
            _dir: dir,
            path,
            trigger,
            served,
        }
    }

    /// The client blocks, so it runs off the test's reactor.
    async fn call(path: &Path, request: Request) -> Result<Response, ClientError> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || client::call(&path, &request))
            .await
            .unwrap()
    }

    async fn raw(path: &Path, bytes: Vec<u8>) -> Vec<String> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
            // The server may close early (line too long): a failed write is part of the test.
            let _ = s.write_all(&bytes);
            let _ = s.shutdown(std::net::Shutdown::Write);
            BufReader::new(s).lines().map_while(Result::ok).collect()
        })
        .await
        .unwrap()
    }

    fn ok(r: Result<Response, ClientError>) -> StatusReport {
        match r.unwrap() {
            Response::Ok(s) => s,
            Response::Error(e) => panic!("expected ok, got {e:?}"),
        }
    }

    fn err(r: Result<Response, ClientError>) -> ErrorReply {
        match r.unwrap() {
            Response::Error(e) => e,
            Response::Ok(s) => panic!("expected an error, got {s:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn status_unlock_lock_round_trip_over_the_socket() {
        let d = daemon().await;
        let mode = std::fs::metadata(&d.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "socket is owner-only");
        let dir_mode = std::fs::metadata(d.path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);

        assert_eq!(
            ok(call(&d.path, Request::Status).await).state,
            VolumeState::Locked
        );
        let wrong = Request::Unlock {
            secret: SecretBytes::from_slice(b"nope"),
            slot: None,
        };
        assert_eq!(
            err(call(&d.path, wrong).await).kind,
            ErrorKind::WrongPassphrase
        );
        let good = Request::Unlock {
            secret: SecretBytes::from_slice(GOOD),
            slot: Some(0),
        };
        let s = ok(call(&d.path, good).await);
        assert_eq!(s.state, VolumeState::Unlocked);
        assert_eq!(s.export_name, "vol");
        assert_eq!(
            ok(call(&d.path, Request::Lock { force: false }).await).state,
            VolumeState::Locked
        );

        d.trigger.trigger();
        d.served.await.unwrap();
        assert!(!d.path.exists(), "socket removed at shutdown");
        match call(&d.path, Request::Status).await {
            Err(e @ ClientError::NoSocket { .. }) => {
                assert!(e.to_string().contains("is nbdcryptd running?"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_oversized_line_is_refused_and_the_server_keeps_serving() {
        let d = daemon().await;
        let lines = raw(&d.path, vec![b'x'; MAX_LINE + 4096]).await;
        assert_eq!(lines.len(), 1, "{lines:?}");
        match Response::decode(lines[0].as_bytes()).unwrap() {
            Response::Error(e) => {
                assert_eq!(e.kind, ErrorKind::BadRequest);
                assert!(e.message.contains("longer than"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            ok(call(&d.path, Request::Status).await).state,
            VolumeState::Locked
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_lines_get_bad_request_and_the_connection_goes_on() {
        let d = daemon().await;
        let input = b"not json\n{\"v\":2,\"op\":\"status\"}\n{\"v\":1,\"op\":\"status\"}".to_vec();
        let lines = raw(&d.path, input).await;
        assert_eq!(lines.len(), 3, "{lines:?}");
        let kinds: Vec<_> = lines
            .iter()
            .map(|l| match Response::decode(l.as_bytes()).unwrap() {
                Response::Error(e) => e.kind.to_string(),
                Response::Ok(s) => s.state.to_string(),
            })
            .collect();
        assert_eq!(kinds, ["bad_request", "bad_request", "locked"]);
        assert!(lines[1].contains("version 2"), "{}", lines[1]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bind_replaces_a_stale_socket_but_not_a_live_one_or_a_file() {
        let d = daemon().await;
        let e = ControlListener::bind(&d.path)
            .await
            .err()
            .expect("live socket kept");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);

        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        ControlListener::bind(&stale)
            .await
            .expect("stale socket replaced");

        let file = dir.path().join("file");
        std::fs::write(&file, b"keep me").unwrap();
        let e = ControlListener::bind(&file)
            .await
            .err()
            .expect("not a socket");
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }

    #[test]
    fn only_root_and_the_daemons_own_user_are_allowed() {
        assert!(peer_allowed(0, 1000));
        assert!(peer_allowed(1000, 1000));
        assert!(!peer_allowed(1001, 1000));
        assert!(peer_allowed(0, 0));
        assert!(!peer_allowed(65534, 0));
    }

    #[test]
    fn line_buffer_wipes_what_it_consumed() {
        let mut b = LineBuf::new();
        b.buf[..12].copy_from_slice(b"secret\nnext\n");
        b.filled = 12;
        b.consume(6);
        assert_eq!(b.filled, 5);
        assert_eq!(&b.buf[..5], b"next\n");
        assert!(b.buf[5..12].iter().all(|&x| x == 0));
    }
}
