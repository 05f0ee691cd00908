//! A blocking control client for `nbdcryptctl`: connect, send one request, read one response.
//!
//! Errors say what to do next (start the daemon, run as root), because the person reading them
//! is at a shell prompt. The request line is wiped after sending (it may hold a secret).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::control::proto::{DecodeError, Request, Response, MAX_LINE};

/// Long enough for key derivation with heavy Argon2 parameters plus a forced lock's drain.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("is nbdcryptd running? no control socket at {}", path.display())]
    NoSocket { path: PathBuf },
    #[error("is nbdcryptd running? nothing is listening on {}", path.display())]
    NotListening { path: PathBuf },
    #[error("permission denied on {}: run as root (or as the user nbdcryptd runs as)", path.display())]
    PermissionDenied { path: PathBuf },
    #[error("nbdcryptd did not answer within {} s", .0.as_secs())]
    Timeout(Duration),
    #[error("nbdcryptd closed the connection without answering; see its log")]
    Closed,
    #[error("nbdcryptd and nbdcryptctl speak different control protocol versions ({0}); use matching versions")]
    Version(DecodeError),
    #[error("unexpected answer from nbdcryptd: {0}")]
    Protocol(DecodeError),
    #[error("control socket {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// Send `request` to the daemon at `path` and wait for its answer.
pub fn call(path: &Path, request: &Request) -> Result<Response, ClientError> {
    call_with_timeout(path, request, DEFAULT_TIMEOUT)
}

pub fn call_with_timeout(
    path: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let io_err = |source: io::Error| match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout(timeout),
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
            path: path.to_owned(),
        },
        _ => ClientError::Io {
            path: path.to_owned(),
            source,
        },
    };
    let mut stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ClientError::NoSocket {
            path: path.to_owned(),
        },
        io::ErrorKind::ConnectionRefused => ClientError::NotListening {
            path: path.to_owned(),
        },
        _ => io_err(e),
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;

    let line = request.encode(); // wiped on drop
    if let Err(e) = stream.write_all(&line) {
        // The daemon may have refused us before reading (permission_denied); prefer its answer.
        if let Ok(Some(r)) = read_response(&stream) {
            return Ok(r);
        }
        return Err(match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => ClientError::Closed,
            _ => io_err(e),
        });
    }
    drop(line);
    match read_response(&stream) {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(ClientError::Closed),
        Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
            Err(ClientError::Closed)
        }
        Err(ReadError::Io(e)) => Err(io_err(e)),
        Err(ReadError::Decode(e @ DecodeError::UnsupportedVersion { .. })) => {
            Err(ClientError::Version(e))
        }
        Err(ReadError::Decode(e)) => Err(ClientError::Protocol(e)),
    }
}

enum ReadError {
    Io(io::Error),
    Decode(DecodeError),
}

/// One response line; `None` if the daemon closed without one.
fn read_response(stream: &UnixStream) -> Result<Option<Response>, ReadError> {
    let mut reader = BufReader::new(stream.take(MAX_LINE as u64 + 1));
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).map_err(ReadError::Io)?;
    if line.is_empty() {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') && line.len() > MAX_LINE {
        return Err(ReadError::Decode(DecodeError::TooLong { limit: MAX_LINE }));
    }
    Response::decode(&line).map(Some).map_err(ReadError::Decode)
}
