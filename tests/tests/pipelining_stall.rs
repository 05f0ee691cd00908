//! Deep pipelining by a client that does not read and write at the same time (issue 14).
//!
//! The client is modelled on the NBD reference implementation's `nbd-tester-client` throughput
//! test: thousands of 1 KiB READs in flight; it writes requests until its socket would block,
//! drains the replies that are readable, then waits up to one second for the socket to become
//! writable again before it goes on. A server that stops reading requests while its replies are
//! backed up (every worker blocked writing a reply the client is not reading yet) leaves that
//! wait to time out: a whole second with no progress. The test fails on the first such wait. It
//! is a behavioural check, not a benchmark: it counts timed-out waits, not throughput.

use nbdcrypt_tests::raw::*;
use nbdcrypt_tests::*;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const SIZE: u64 = 24 * MIB;
const REQ: u32 = 1024;
/// The reference client's wait for writability.
const WAIT_MS: u16 = 1000;

/// How one run went.
#[derive(Debug)]
struct Run {
    /// Waits of a whole second that ended with the socket still not writable (or, once every
    /// request is sent, not readable).
    stalls: u32,
    /// Most requests the client had in flight at once.
    max_in_flight: usize,
    /// Shown in the Debug output each test prints.
    #[allow(dead_code)]
    elapsed: Duration,
}

/// Wait for `events` on `fd` for at most `ms`; true if they came.
fn wait_for(fd: &OwnedFd, events: PollFlags, ms: u16) -> bool {
    let mut p = [PollFd::new(fd.as_fd(), events)];
    loop {
        match nix::poll::poll(&mut p, PollTimeout::from(ms)) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => panic!("poll: {e}"),
            Ok(n) => return n > 0,
        }
    }
}

fn request(cookie: u64, offset: u64) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[6..8].copy_from_slice(&CMD_READ.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&REQ.to_be_bytes());
    b
}

/// Newstyle handshake with EXPORT_NAME (works on any stream); returns the export size.
fn handshake<S: Read + Write>(s: &mut S) -> u64 {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(be64(&g), NBDMAGIC);
    s.write_all(&(C_FIXED_NEWSTYLE | C_NO_ZEROES).to_be_bytes())
        .unwrap();
    let mut opt = Vec::new();
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    opt.extend_from_slice(&(EXPORT.len() as u32).to_be_bytes());
    opt.extend_from_slice(EXPORT.as_bytes());
    s.write_all(&opt).unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).unwrap();
    be64(&info)
}

/// How the client writes between two waits.
#[derive(Clone, Copy, Debug)]
enum Writes {
    /// Until the socket would block.
    Burst,
    /// One request, like `nbd-tester-client` (skipped when the socket would block).
    One,
}

/// Stop after this many stalls: the verdict is known, no need to sit through the rest.
const ENOUGH_STALLS: u32 = 3;

/// The client loop. `s` is non-blocking. Sends `total` 1 KiB READs cycling over the `size`-byte
/// export; `expect(offset)` is the byte filling the block at `offset`.
fn pipeline<S: Read + Write + AsFd>(
    s: &mut S,
    size: u64,
    total: u64,
    writes: Writes,
    expect: &dyn Fn(u64) -> u8,
) -> Run {
    // A duplicate of the socket's descriptor to poll on, while `s` is borrowed for I/O.
    let fd = s.as_fd().try_clone_to_owned().expect("dup the socket");
    let blocks = size / u64::from(REQ);
    let start = Instant::now();
    let (mut sent, mut done) = (0u64, 0u64);
    let mut pending: Option<([u8; 28], usize)> = None;
    let mut inbuf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut chunk = vec![0u8; 256 * 1024];
    let mut seen = HashSet::new();
    let (mut stalls, mut max_in_flight) = (0u32, 0usize);
    let reply_len = 16 + REQ as usize;
    while done < total {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no end in sight: {done}/{total} replies"
        );
        // Write requests until the socket would block (or all are sent).
        let mut this_round = 0;
        while sent < total && !(matches!(writes, Writes::One) && this_round == 1) {
            let block = sent % blocks;
            let (req, off) =
                pending.get_or_insert_with(|| (request(sent, block * u64::from(REQ)), 0));
            match s.write(&req[*off..]) {
                Ok(n) => {
                    *off += n;
                    if *off == req.len() {
                        pending = None;
                        sent += 1;
                        this_round += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("write after {sent} requests: {e}"),
            }
        }
        max_in_flight = max_in_flight.max((sent - done) as usize);
        // Drain whatever replies are readable.
        loop {
            match s.read(&mut chunk) {
                Ok(0) => panic!("server closed after {done}/{total} replies"),
                Ok(n) => inbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("read after {done} replies: {e}"),
            }
        }
        let mut at = 0;
        while inbuf.len() - at >= reply_len {
            let r = &inbuf[at..at + reply_len];
            assert_eq!(be32(r), SIMPLE_REPLY_MAGIC, "reply {done}: bad magic");
            assert_eq!(be32(&r[4..]), 0, "reply {done}: error");
            let cookie = be64(&r[8..]);
            assert!(
                cookie < sent && seen.insert(cookie),
                "reply {done}: unexpected cookie {cookie}"
            );
            let want = expect((cookie % blocks) * u64::from(REQ));
            assert!(
                r[16..].iter().all(|&b| b == want),
                "reply to cookie {cookie}: wrong data"
            );
            at += reply_len;
            done += 1;
        }
        inbuf.drain(..at);
        if done == total {
            break;
        }
        // Wait for writability (or, with everything sent, for replies) like the reference client.
        let events = if sent < total {
            PollFlags::POLLOUT
        } else {
            PollFlags::POLLIN
        };
        if !wait_for(&fd, events, WAIT_MS) {
            stalls += 1;
            eprintln!(
                "stall: {WAIT_MS} ms without the socket becoming {} ({sent} sent, {done} answered)",
                if events == PollFlags::POLLOUT {
                    "writable"
                } else {
                    "readable"
                }
            );
            if stalls >= ENOUGH_STALLS {
                break;
            }
        }
    }
    Run {
        stalls,
        max_in_flight,
        elapsed: start.elapsed(),
    }
}

/// Block `b` of the image starts with the byte `b % 251`.
fn patterned_image() -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    for (i, block) in v.chunks_mut(REQ as usize).enumerate() {
        block.fill((i % 251) as u8);
    }
    v
}

fn pattern(offset: u64) -> u8 {
    ((offset / u64::from(REQ)) % 251) as u8
}

fn check(run: Run, what: &str, min_depth: usize) {
    eprintln!("{what}: {run:?}");
    assert_eq!(
        run.stalls, 0,
        "{what}: the connection sat {} whole one-second waits with no progress: the server stopped \
         reading requests while its replies were backed up ({run:?})",
        run.stalls
    );
    assert!(
        run.max_in_flight >= min_depth,
        "{what}: the client never had a deep queue ({} in flight), so the test proves nothing",
        run.max_in_flight
    );
}

/// Requests per run: far more than the socket buffers hold (28 bytes each; the server's reply
/// buffer holds a few hundred 1 KiB replies), and all of them may be in flight at once within
/// the default 64 MiB per-connection budget (a 1 KiB READ is charged about 6 KiB). Beyond the
/// budget the server stops reading by design: a client that keeps more than that in flight
/// while it reads nothing waits for its own replies.
const TOTAL: u64 = 8 * 1024;

/// The queue depth a run must reach to have tested anything: thousands for a burst; the
/// one-request-per-wait client only gets deep when the server falls behind, which is the case
/// it checks.
fn depth(writes: Writes) -> usize {
    match writes {
        Writes::Burst => 1000,
        Writes::One => 1,
    }
}

fn unix_run(writes: Writes) {
    let d = Daemon::plain_with(&patterned_image(), &[]);
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(handshake(&mut s), SIZE);
    s.set_nonblocking(true).unwrap();
    let run = pipeline(&mut s, SIZE, TOTAL, writes, &pattern);
    check(run, &format!("unix socket, {writes:?}"), depth(writes));
}

fn tcp_run(writes: Writes) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::plain_with(&patterned_image(), &["--tcp", &addr, "--insecure-tcp"]);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(handshake(&mut s), SIZE);
    s.set_nonblocking(true).unwrap();
    let run = pipeline(&mut s, SIZE, TOTAL, writes, &pattern);
    check(run, &format!("tcp, {writes:?}"), depth(writes));
    drop(d);
}

#[test]
fn writes_until_blocked_then_reads_never_waits_a_whole_second_on_unix() {
    unix_run(Writes::Burst);
}

#[test]
fn one_request_per_wait_like_nbd_tester_client_never_waits_a_whole_second_on_unix() {
    unix_run(Writes::One);
}

#[test]
fn writes_until_blocked_then_reads_never_waits_a_whole_second_on_tcp() {
    tcp_run(Writes::Burst);
}

#[test]
fn one_request_per_wait_like_nbd_tester_client_never_waits_a_whole_second_on_tcp() {
    tcp_run(Writes::One);
}

// ---- The same over TLS (`--tls require`): the session's TLS sink must keep the promise the
// plain socket keeps (a reply the socket does not take now goes to the writer thread; reading
// never waits on writing), although a TLS record cannot be taken back once encrypted. ----

#[path = "common/pki.rs"]
mod pki;

/// A non-blocking TLS client stream in the shape `pipeline` wants: `write` takes a request only
/// when the ciphertext before it has left (else WouldBlock, and the client polls the socket for
/// POLLOUT, as it would on plain TCP); `read` returns decrypted bytes or WouldBlock.
struct NonBlockingTls {
    conn: rustls::ClientConnection,
    sock: TcpStream,
}

impl NonBlockingTls {
    /// Push queued ciphertext; Ok(true) when none is left.
    fn push(&mut self) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

impl Write for NonBlockingTls {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.push()? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.conn.writer().write(buf)?;
        self.push()?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for NonBlockingTls {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Whatever is still queued goes out first, so the server sees every request sent.
        self.push()?;
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if self.conn.read_tls(&mut self.sock)? == 0 {
                return Ok(0);
            }
            self.conn
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
    }
}

impl AsFd for NonBlockingTls {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

fn tls_run(writes: Writes) {
    use rustls::pki_types::pem::PemObject;
    let certs = tempdir();
    let pki = pki::generate(certs.path(), "stall CA", "client");
    let addr = format!("127.0.0.1:{}", pki::free_port());
    let server = pki.server();
    let d = Daemon::plain_with(
        &patterned_image(),
        &[
            "--tcp",
            &addr,
            "--tls",
            "require",
            "--tls-certificates",
            server.to_str().unwrap(),
        ],
    );
    pki::wait_tcp(&addr);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Plaintext: greeting, flags, STARTTLS.
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&(C_FIXED_NEWSTYLE | C_NO_ZEROES).to_be_bytes())
        .unwrap();
    let mut opt = IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&OPT_STARTTLS.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&opt).unwrap();
    let mut ack = [0u8; 20];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(be32(&ack[12..]), REP_ACK, "STARTTLS refused");
    // TLS (blocking for the handshake), then EXPORT_NAME inside it.
    let mut roots = rustls::RootCertStore::empty();
    for c in
        rustls::pki_types::CertificateDer::pem_file_iter(pki.client().join("ca-cert.pem")).unwrap()
    {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, s);
    let mut opt = IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    opt.extend_from_slice(&(EXPORT.len() as u32).to_be_bytes());
    opt.extend_from_slice(EXPORT.as_bytes());
    tls.write_all(&opt).unwrap();
    let mut info = [0u8; 10];
    tls.read_exact(&mut info).unwrap();
    assert_eq!(be64(&info), SIZE);
    let (conn, sock) = tls.into_parts();
    sock.set_nonblocking(true).unwrap();
    let mut nb = NonBlockingTls { conn, sock };
    let run = pipeline(&mut nb, SIZE, TOTAL, writes, &pattern);
    check(run, &format!("tls, {writes:?}"), depth(writes));
    drop(d);
}

#[test]
fn writes_until_blocked_then_reads_never_waits_a_whole_second_over_tls() {
    tls_run(Writes::Burst);
}

#[test]
fn one_request_per_wait_like_nbd_tester_client_never_waits_a_whole_second_over_tls() {
    tls_run(Writes::One);
}

/// The same over an upstream NBD server (`--plain nbd+unix://…` over nbdkit `file`): there the
/// READs are started on the upstream by the thread that read them and replied to by the
/// session's completer thread, which must not stop the request stream either.
fn upstream_run(writes: Writes) {
    let dir = tempdir();
    let img = dir.path().join("image.bin");
    std::fs::write(&img, patterned_image()).unwrap();
    let up = Upstream::nbdkit(dir.path(), "up", &["file", img.to_str().unwrap()]);
    let served = tempdir();
    let sock = served.path().join("nbd.sock");
    let d = Daemon::start_in(
        served,
        vec![
            "--plain".into(),
            up.uri.clone().into(),
            "--unix".into(),
            sock.into(),
        ],
    );
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(handshake(&mut s), SIZE);
    s.set_nonblocking(true).unwrap();
    let run = pipeline(&mut s, SIZE, TOTAL, writes, &pattern);
    check(run, &format!("over an upstream, {writes:?}"), depth(writes));
}

#[test]
fn writes_until_blocked_then_reads_never_waits_a_whole_second_over_an_upstream() {
    upstream_run(Writes::Burst);
}

#[test]
fn one_request_per_wait_like_nbd_tester_client_never_waits_a_whole_second_over_an_upstream() {
    upstream_run(Writes::One);
}
