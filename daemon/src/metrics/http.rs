//! A tiny HTTP/1.1 responder for `--metrics`: `GET /metrics` answers the Prometheus text
//! format, anything else a short error, and every connection is closed after one response.
//!
//! It runs on its own threads, never on the reactor or the I/O path. Peers are not trusted
//! (the TCP address may be reachable by anyone who can reach the host): a request is read with
//! a byte cap ([`MAX_REQUEST`]), a per-read timeout and an overall deadline; at most
//! [`MAX_ACTIVE`] connections are served at once (more get `503` and are closed); nothing a
//! peer sends can panic the responder or reach the daemon's other threads.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

/// Bytes of request head we read at most; a longer head gets `431`.
pub const MAX_REQUEST: usize = 8 * 1024;
/// Connections served at once.
pub const MAX_ACTIVE: usize = 4;
/// Whole time a peer has to send its request head.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Time a write of the response may block.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where `--metrics` listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    Tcp(SocketAddr),
    /// A Unix socket path (scrape through a local proxy or `curl --unix-socket`).
    Unix(PathBuf),
}

impl MetricsAddr {
    /// `127.0.0.1:9725`, `[::1]:9725`, or a path (containing a `/`) for a Unix socket.
    pub fn parse(s: &str) -> Result<MetricsAddr, String> {
        if s.contains('/') {
            return Ok(MetricsAddr::Unix(PathBuf::from(s)));
        }
        s.parse::<SocketAddr>().map(MetricsAddr::Tcp).map_err(|_| {
            format!(
                "--metrics {s:?}: give ADDR:PORT (e.g. 127.0.0.1:9725) or a Unix socket path \
                 (containing a '/')"
            )
        })
    }
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAddr::Tcp(a) => write!(f, "http://{a}/metrics"),
            MetricsAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A bound listener, ready for [`spawn`].
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// Bind `addr`. A Unix socket is made like the daemon's others (`socket::bind`: safe
/// directory, stale socket of ours replaced, never a live one), mode 0660.
pub async fn bind(addr: &MetricsAddr) -> io::Result<Listener> {
    match addr {
        MetricsAddr::Tcp(a) => {
            let l = TcpListener::bind(a)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")))?;
            Ok(Listener::Tcp(l))
        }
        MetricsAddr::Unix(p) => {
            let l = crate::socket::bind(p, 0o755, 0o660).await?.into_std()?;
            l.set_nonblocking(false)?;
            Ok(Listener::Unix(l, p.clone()))
        }
    }
}

impl Listener {
    /// Remove a Unix socket file (at exit).
    pub fn cleanup(&self) {
        if let Listener::Unix(_, p) = self {
            crate::socket::remove_ours(p);
        }
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }
}

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn timeouts(&self, read: Duration) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
            Conn::Unix(s) => {
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the responder serves: renders the metrics text on each scrape.
pub type Source = Arc<dyn Fn() -> String + Send + Sync>;

/// Serve `listener` on a thread of its own for the life of the process.
pub fn spawn(listener: Listener, source: Source) -> io::Result<()> {
    std::thread::Builder::new()
        .name("metrics".into())
        .stack_size(256 * 1024)
        .spawn(move || accept_loop(listener, source))?;
    Ok(())
}

fn accept_loop(listener: Listener, source: Source) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let conn = match &listener {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Conn::Tcp(s)),
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Conn::Unix(s)),
        };
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "metrics: accept failed");
                // EMFILE and friends: don't spin.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_ACTIVE {
            active.fetch_sub(1, Ordering::AcqRel);
            let _ = conn.timeouts(Duration::from_millis(100));
            let _ = respond(
                &mut conn,
                503,
                "text/plain",
                b"busy: too many scrapes at once\n",
            );
            continue;
        }
        let (active2, source2) = (active.clone(), source.clone());
        let spawned = std::thread::Builder::new()
            .name("metrics-conn".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                if let Err(e) = serve(&mut conn, &source2) {
                    debug!(error = %e, "metrics: connection ended with an error");
                }
                active2.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Serve one connection on a Unix stream (the fuzz target drives the responder through this).
pub fn serve_stream(s: UnixStream, source: &Source) -> io::Result<()> {
    serve(&mut Conn::Unix(s), source)
}

/// Read one request head within the bounds, answer it, close.
fn serve(conn: &mut Conn, source: &Source) -> io::Result<()> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = find_end(&head) {
            head.truncate(end);
            break;
        }
        if head.len() >= MAX_REQUEST {
            return respond(conn, 431, "text/plain", b"request head too large\n");
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return respond(conn, 408, "text/plain", b"request timeout\n");
        }
        conn.timeouts(left)?;
        let want = (MAX_REQUEST - head.len()).min(buf.len());
        match conn.read(&mut buf[..want]) {
            Ok(0) => return Ok(()),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return respond(conn, 408, "text/plain", b"request timeout\n");
            }
            Err(e) => return Err(e),
        }
    }
    let (status, body): (u16, Vec<u8>) = match route(&head) {
        Route::Metrics => (200, source().into_bytes()),
        Route::Index => (200, b"nbdcryptd metrics: GET /metrics\n".to_vec()),
        Route::NotFound => (404, b"not found; the metrics are at /metrics\n".to_vec()),
        Route::BadMethod => (405, b"only GET is served\n".to_vec()),
        Route::Bad => (400, b"bad request\n".to_vec()),
    };
    let ctype = if status == 200 {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain"
    };
    respond(conn, status, ctype, &body)
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    Index,
    NotFound,
    BadMethod,
    Bad,
}

/// The end of the head: after "\r\n\r\n" (or a bare "\n\n").
fn find_end(b: &[u8]) -> Option<usize> {
    b.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| b.windows(2).position(|w| w == b"\n\n").map(|i| i + 2))
}

fn route(head: &[u8]) -> Route {
    let line = head.split(|c| *c == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return Route::Bad;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::Bad;
    }
    if method != "GET" {
        return Route::BadMethod;
    }
    // Prometheus may add query parameters; they are ignored.
    let path = target.split('?').next().unwrap_or_default();
    match path {
        "/metrics" => Route::Metrics,
        "/" => Route::Index,
        _ => Route::NotFound,
    }
}

fn respond(conn: &mut Conn, status: u16, ctype: &str, body: &[u8]) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::Index);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(route(b"GET /etc/passwd HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"GET /metrics\r\n\r\n"), Route::Bad);
        assert_eq!(route(b"\xff\xfe\r\n\r\n"), Route::Bad);
        assert_eq!(route(b""), Route::Bad);
    }

    #[test]
    fn addresses() {
        assert!(matches!(
            MetricsAddr::parse("127.0.0.1:9725"),
            Ok(MetricsAddr::Tcp(_))
        ));
        assert!(matches!(
            MetricsAddr::parse("/run/x.sock"),
            Ok(MetricsAddr::Unix(_))
        ));
        assert!(MetricsAddr::parse("localhost").is_err());
    }

    #[test]
    fn hostile_peers_get_bounded_answers_and_the_responder_keeps_serving() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        spawn(Listener::Tcp(l), Arc::new(|| "x 1\n".to_owned())).unwrap();
        let get = |req: &[u8]| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let _ = s.write_all(req);
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        };
        // An endless head is cut off at MAX_REQUEST.
        let huge = vec![b'A'; 64 * 1024];
        let r = get(&huge);
        assert!(r.starts_with("HTTP/1.1 431") || r.is_empty(), "{r}");
        // A silent peer is answered 408 after the deadline, and meanwhile others are served.
        let mut silent = TcpStream::connect(addr).unwrap();
        let r = get(b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(r.ends_with("x 1\n"), "{r}");
        silent
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut out = String::new();
        let _ = silent.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
        assert!(get(b"\x00\x01garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
        assert!(get(b"GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
    }
}
