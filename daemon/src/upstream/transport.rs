//! The transmission phase's I/O: blocking sockets, so a caller's thread writes its own request
//! (no task or channel between it and the socket) and one reader thread per connection decodes
//! the replies. The negotiation before it is async (`handshake`); its socket and TLS session are
//! taken over here.
//!
//! TLS (rustls) without a lock held across socket I/O: a sender encrypts into memory under the
//! session lock, then writes the records to the socket under the send lock (taken first, so
//! records go out in the order they were made); the reader reads the socket with no lock and
//! feeds the session under its lock. So a sender blocked on a full socket never stops the reader
//! (which would deadlock against an upstream that stops reading while it cannot write replies).

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::{Arc, Mutex};

use tokio_rustls::rustls::ClientConnection;

use super::handshake::{Connected, Sock};

enum StdSock {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl StdSock {
    fn from_tokio(s: Sock) -> io::Result<StdSock> {
        Ok(match s {
            // A write that waits longer than a request may is an upstream that stopped
            // reading: it fails, and the sender's error shuts the connection, rather than
            // holding the send lock (and every caller behind it) forever.
            Sock::Tcp(t) => {
                let t = t.into_std()?;
                t.set_nonblocking(false)?;
                t.set_write_timeout(Some(super::client::REQUEST_TIMEOUT))?;
                StdSock::Tcp(t)
            }
            Sock::Unix(u) => {
                let u = u.into_std()?;
                u.set_nonblocking(false)?;
                u.set_write_timeout(Some(super::client::REQUEST_TIMEOUT))?;
                StdSock::Unix(u)
            }
        })
    }
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            StdSock::Tcp(s) => (&*s).read(buf),
            StdSock::Unix(s) => (&*s).read(buf),
        }
    }
    fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            StdSock::Tcp(s) => (&*s).write_vectored(bufs),
            StdSock::Unix(s) => (&*s).write_vectored(bufs),
        }
    }
    /// Writes all of `parts` (one writev(2) in the common case).
    fn write_all_parts(&self, parts: &[&[u8]]) -> io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| IoSlice::new(p))
            .collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match self.write_vectored(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    fn shutdown(&self) {
        let _ = match self {
            StdSock::Tcp(s) => s.shutdown(Shutdown::Both),
            StdSock::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

struct Shared {
    sock: StdSock,
    tls: Option<Mutex<ClientConnection>>,
    /// Held while a request goes onto the socket: requests never interleave.
    send: Mutex<()>,
}

fn poisoned() -> io::Error {
    io::Error::other("internal lock poisoned")
}

/// The sending side of a connection (shared by every caller).
pub struct Transport(Arc<Shared>);

/// The receiving side (owned by the connection's reader thread).
pub struct Receiver {
    shared: Arc<Shared>,
    /// TLS: ciphertext read from the socket, not yet fed to the session.
    raw: Vec<u8>,
    pos: usize,
    end: usize,
}

impl Transport {
    /// Takes over a negotiated connection (switches its socket to blocking mode).
    pub fn new(c: Connected) -> Result<(Transport, Receiver), String> {
        let err = |e: io::Error| format!("cannot take over the upstream socket: {e}");
        let (sock, tls) = match c {
            Connected::Plain(s) => (StdSock::from_tokio(s).map_err(err)?, None),
            Connected::Tls(t) => {
                let (s, conn) = t.into_inner();
                (StdSock::from_tokio(s).map_err(err)?, Some(Mutex::new(conn)))
            }
        };
        let raw = if tls.is_some() {
            vec![0u8; 128 * 1024]
        } else {
            Vec::new()
        };
        let shared = Arc::new(Shared {
            sock,
            tls,
            send: Mutex::new(()),
        });
        Ok((
            Transport(shared.clone()),
            Receiver {
                shared,
                raw,
                pos: 0,
                end: 0,
            },
        ))
    }

    /// Sends one request (`parts` back to back, never interleaved with another's). An error
    /// leaves the stream in an unknown state: the caller must `shutdown` the connection.
    pub fn send(&self, parts: &[&[u8]]) -> io::Result<()> {
        let s = &*self.0;
        let _g = s.send.lock().map_err(|_| poisoned())?;
        let Some(tls) = &s.tls else {
            return s.sock.write_all_parts(parts);
        };
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut out = Vec::with_capacity(total + total / 256 + 64);
        {
            let mut c = tls.lock().map_err(|_| poisoned())?;
            for p in parts {
                let mut rest = *p;
                while !rest.is_empty() {
                    let n = c.writer().write(rest)?;
                    rest = &rest[n..];
                    let mut drained = false;
                    while c.wants_write() {
                        c.write_tls(&mut out)?;
                        drained = true;
                    }
                    if n == 0 && !drained {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                }
            }
            while c.wants_write() {
                c.write_tls(&mut out)?;
            }
        }
        s.sock.write_all_parts(&[&out])
    }

    /// Ends the connection both ways: the reader sees end-of-file, senders get errors.
    pub fn shutdown(&self) {
        self.0.sock.shutdown();
    }
}

impl Read for Receiver {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let shared = &*self.shared;
        let Some(tls) = &shared.tls else {
            return shared.sock.read(out);
        };
        loop {
            {
                let mut c = tls.lock().map_err(|_| poisoned())?;
                match c.reader().read(out) {
                    // Ok(0): the upstream closed the session (close_notify).
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.pos < self.end {
                    let mut src = &self.raw[self.pos..self.end];
                    let n = c.read_tls(&mut src)?;
                    if n == 0 {
                        return Err(io::Error::other("the TLS session took no data"));
                    }
                    self.pos += n;
                    // Records the session queues in answer (a KeyUpdate, say) stay queued: the
                    // next sender writes them first, in order. The reader never writes: blocked
                    // on a full socket it would stop reading the replies the upstream is
                    // blocked on sending.
                    c.process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    drop(c);
                    continue;
                }
            }
            // No lock held while waiting for the upstream.
            let n = shared.sock.read(&mut self.raw)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection without ending TLS",
                ));
            }
            self.pos = 0;
            self.end = n;
        }
    }
}
