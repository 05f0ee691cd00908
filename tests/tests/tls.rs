//! NBD over TLS (NBD_OPT_STARTTLS), against the real clients and against hand-written ones:
//! libnbd's `nbdinfo`/`nbdcopy` with `nbds://` and a certificates directory, `qemu-img` with
//! `tls-creds-x509`, mutual TLS (a good client certificate is accepted, none or one from another
//! CA is refused), FORCEDTLS on the wire (`--tls require`), the option state reset at STARTTLS
//! (nbdkit CVE-2021-3716), hostile TLS peers, and certificate reload on SIGHUP. Certificates are
//! generated per test with certtool; everything runs on 127.0.0.1.

#[path = "common/pki.rs"]
mod pki;

use nbdcrypt_tests::raw::*;
use nbdcrypt_tests::*;
use pki::{free_port, generate, wait_tcp, Pki};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const SIZE: u64 = 16 * MIB;
const TF_SEND_DF_BIT: u16 = 1 << 7;
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;

/// A daemon with a TCP listener and TLS; `pki` lives in the daemon's directory.
struct Tls {
    d: Daemon,
    pki: Pki,
    addr: String,
}

impl Tls {
    fn nbds(&self, certs: &Path) -> String {
        format!(
            "nbds://{}/{EXPORT}?tls-certificates={}",
            self.addr,
            certs.display()
        )
    }
}

/// `--plain` (so the test can look at the bytes) or a LUKS2 volume, TLS `mode`, and `extra`.
fn start(luks: bool, mode: &str, extra: &[&str]) -> Tls {
    let dir = tempdir();
    let pki = generate(
        &dir.path().join("certs"),
        "nbdcrypt test CA",
        "client1.example.test",
    );
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let server = pki.server();
    let mut args = vec![
        "--tcp",
        &addr,
        "--tls",
        mode,
        "--tls-certificates",
        server.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let d = if luks {
        luks_format_keyfile(dir.path(), SIZE + 16 * MIB, 4096);
        let audit = dir.path().join("audit.jsonl");
        let audit = audit.to_str().unwrap().to_owned();
        let mut a = args.clone();
        a.extend_from_slice(&["--audit-log", &audit]);
        Daemon::luks_in(dir, &a)
    } else {
        std::fs::File::create(dir.path().join("disk.img"))
            .unwrap()
            .set_len(SIZE)
            .unwrap();
        Daemon::plain_in(dir, &args)
    };
    wait_tcp(&addr);
    let pki = Pki {
        root: d.dir().join("certs"),
    };
    Tls { d, pki, addr }
}

// ---- hand-written client pieces (any stream: TCP, or TLS on top of it) ----

fn greet<S: Read + Write>(s: &mut S) -> u16 {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(be64(&g), NBDMAGIC);
    assert_eq!(be64(&g[8..]), IHAVEOPT);
    s.write_all(&(C_FIXED_NEWSTYLE | C_NO_ZEROES).to_be_bytes())
        .unwrap();
    be16(&g[16..])
}

fn send_opt<S: Write>(s: &mut S, opt: u32, data: &[u8]) {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
    s.flush().unwrap();
}

/// (option, reply type, data)
fn read_reply<S: Read>(s: &mut S) -> std::io::Result<(u32, u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    assert_eq!(be64(&h), OPT_REPLY_MAGIC);
    let mut data = vec![0u8; be32(&h[16..]) as usize];
    s.read_exact(&mut data)?;
    Ok((be32(&h[8..]), be32(&h[12..]), data))
}

/// Send an option and return its final reply type, skipping INFO/SERVER replies before it.
fn option<S: Read + Write>(s: &mut S, opt: u32, data: &[u8]) -> (u32, Vec<Vec<u8>>) {
    send_opt(s, opt, data);
    let mut infos = Vec::new();
    loop {
        let (o, typ, d) = read_reply(s).unwrap();
        assert_eq!(o, opt, "reply for another option");
        if typ == REP_INFO || typ == REP_SERVER || typ == REP_META_CONTEXT {
            infos.push(d);
            continue;
        }
        return (typ, infos);
    }
}

fn tcp(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Is the connection closed by the server (EOF or reset) within the I/O timeout?
fn closed<S: Read>(s: &mut S) -> bool {
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue, // an alert record, say
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

fn client_config(ca: &Path, client: Option<&Path>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca.join("ca-cert.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match client {
        None => b.with_no_client_auth(),
        Some(dir) => {
            let certs = CertificateDer::pem_file_iter(dir.join("client-cert.pem"))
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_file(dir.join("client-key.pem")).unwrap();
            b.with_client_auth_cert(certs, key).unwrap()
        }
    })
}

type TlsClient = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn start_tls(s: TcpStream, cfg: Arc<rustls::ClientConfig>) -> TlsClient {
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(cfg, name).unwrap();
    rustls::StreamOwned::new(conn, s)
}

fn go_payload() -> Vec<u8> {
    info_payload(EXPORT, &[])
}

// ---- real clients ----

#[test]
fn nbdcopy_and_nbdinfo_over_nbds_round_trip_and_the_log_names_the_tls_version() {
    let t = start(false, "require", &[]);
    let info = nbdinfo(&[&t.nbds(&t.pki.client())]).success();
    assert!(
        info.stdout.contains("with TLS"),
        "nbdinfo did not use TLS:\n{}",
        info.stdout
    );
    let data = random_bytes(7, 4 * MIB as usize);
    let src = t.d.dir().join("src.bin");
    std::fs::write(&src, &data).unwrap();
    run(
        tool("nbdcopy").arg(&src).arg(t.nbds(&t.pki.client())),
        TOOL_TIMEOUT,
    )
    .success();
    let back = t.d.dir().join("back.bin");
    run(
        tool("nbdcopy").arg(t.nbds(&t.pki.client())).arg(&back),
        TOOL_TIMEOUT,
    )
    .success();
    let back = std::fs::read(&back).unwrap();
    assert_eq!(first_difference(&back[..data.len()], &data), None);
    assert_eq!(
        read_at(&t.d.image, 0, data.len()),
        data,
        "plain image bytes"
    );
    let log = t.d.log();
    assert!(log.contains("TLS client attaching"), "{log}");
    assert!(log.contains("tls=TLSv1_3"), "{log}");
}

#[test]
fn qemu_img_with_tls_creds_x509_and_a_client_certificate_writes_and_reads_back() {
    let t = start(false, "require", &["--tls-verify-peer"]);
    let data = random_bytes(11, 2 * MIB as usize);
    let src = t.d.dir().join("src.bin");
    std::fs::write(&src, &data).unwrap();
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        t.pki.client().display()
    );
    let (host, port) = t.addr.split_once(':').unwrap();
    let opts = format!("driver=nbd,host={host},port={port},export={EXPORT},tls-creds=tls0");
    run(
        tool("qemu-img")
            .args(["convert", "-n", "--object", &object, "-f", "raw"])
            .arg(&src)
            .args(["--target-image-opts", &opts]),
        TOOL_TIMEOUT,
    )
    .success();
    assert_eq!(read_at(&t.d.image, 0, data.len()), data);
    let back = t.d.dir().join("back.raw");
    run(
        tool("qemu-img")
            .args(["convert", "--object", &object, "--image-opts", &opts])
            .args(["-O", "raw"])
            .arg(&back),
        TOOL_TIMEOUT,
    )
    .success();
    assert_eq!(read_at(&back, 0, data.len()), data);
    assert!(
        t.d.log().contains("CN=client1.example.test"),
        "{}",
        t.d.log()
    );
}

#[test]
fn mutual_tls_accepts_a_good_certificate_and_refuses_none_and_another_cas() {
    let mut t = start(true, "require", &["--tls-verify-peer"]);
    // A good client certificate: attaches; the subject is logged and audited.
    let data = random_bytes(3, MIB as usize);
    let src = t.d.dir().join("src.bin");
    std::fs::write(&src, &data).unwrap();
    run(
        tool("nbdcopy").arg(&src).arg(t.nbds(&t.pki.client())),
        TOOL_TIMEOUT,
    )
    .success();
    let audit = std::fs::read_to_string(t.d.dir().join("audit.jsonl")).unwrap();
    let line = audit
        .lines()
        .find(|l| l.contains("nbd_tls_attach"))
        .unwrap_or_else(|| panic!("no nbd_tls_attach event in the audit log:\n{audit}"));
    assert!(
        line.contains("O=nbdcrypt test,CN=client1.example.test"),
        "{line}"
    );
    assert!(line.contains("client_sha256"), "{line}");
    // The volume holds ciphertext: the plaintext is nowhere in the image.
    let image = std::fs::read(&t.d.image).unwrap();
    assert!(
        !image.windows(64).any(|w| w == &data[4096..4160]),
        "plaintext in the image"
    );

    // No client certificate: a directory with only the CA (libnbd then verifies the server
    // but presents nothing).
    let none = t.d.dir().join("no-client-cert");
    std::fs::create_dir(&none).unwrap();
    std::fs::copy(t.pki.client().join("ca-cert.pem"), none.join("ca-cert.pem")).unwrap();
    nbdinfo(&[&t.nbds(&none)]).failure();
    // A client certificate from another CA (the server is still verified with the right one).
    let other = generate(&t.d.dir().join("other"), "some other CA", "mallory");
    let wrong = t.d.dir().join("wrong-ca-client");
    std::fs::create_dir(&wrong).unwrap();
    std::fs::copy(
        t.pki.client().join("ca-cert.pem"),
        wrong.join("ca-cert.pem"),
    )
    .unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(other.client().join(f), wrong.join(f)).unwrap();
    }
    nbdinfo(&[&t.nbds(&wrong)]).failure();
    let log = t.d.log();
    assert!(log.contains("peer sent no certificates"), "{log}");
    assert!(log.contains("TLS handshake failed"), "{log}");
    assert!(
        !log.contains("mallory"),
        "a refused client attached:\n{log}"
    );
    // And the good client still works.
    t.d.assert_alive();
    nbdinfo(&[&t.nbds(&t.pki.client())]).success();
}

// ---- the wire ----

#[test]
fn forcedtls_refuses_every_option_but_starttls_and_lists_no_export() {
    let t = start(false, "require", &[]);
    let mut s = tcp(&t.addr);
    assert_eq!(greet(&mut s), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    for (opt, data) in [
        (OPT_LIST, Vec::new()),
        (OPT_STRUCTURED_REPLY, Vec::new()),
        (OPT_INFO, go_payload()),
        (OPT_GO, go_payload()),
        (OPT_LIST_META_CONTEXT, meta_payload(EXPORT, &[])),
        (
            OPT_SET_META_CONTEXT,
            meta_payload(EXPORT, &["base:allocation"]),
        ),
        (0x4242, b"unknown option with data".to_vec()),
    ] {
        let (typ, infos) = option(&mut s, opt, &data);
        assert_eq!(typ, REP_ERR_TLS_REQD, "option {opt}");
        assert!(
            infos.is_empty(),
            "option {opt} revealed something: {infos:?}"
        );
    }
    // STARTTLS with data is invalid; the stream is still in sync afterwards.
    assert_eq!(option(&mut s, OPT_STARTTLS, b"x").0, REP_ERR_INVALID);
    assert_eq!(option(&mut s, OPT_STARTTLS, &[]).0, REP_ACK);
    // Now TLS, and inside it everything works; STARTTLS again is invalid.
    let mut tls = start_tls(s, client_config(&t.pki.client(), None));
    assert_eq!(option(&mut tls, OPT_STARTTLS, &[]).0, REP_ERR_INVALID);
    let (typ, servers) = option(&mut tls, OPT_LIST, &[]);
    assert_eq!(typ, REP_ACK);
    assert_eq!(servers.len(), 1);
    let (typ, infos) = option(&mut tls, OPT_GO, &go_payload());
    assert_eq!(typ, REP_ACK);
    assert!(!infos.is_empty());
    // EXPORT_NAME before STARTTLS cannot carry an error: the server hangs up.
    let mut s = tcp(&t.addr);
    greet(&mut s);
    send_opt(&mut s, OPT_EXPORT_NAME, EXPORT.as_bytes());
    assert!(
        closed(&mut s),
        "EXPORT_NAME before TLS did not end the connection"
    );
    // The operator sees each refused plaintext client once, at info, with its address (the
    // seven refused options of the first client make one line, not seven).
    let log = t.d.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refused a plaintext client"))
        .collect();
    assert_eq!(refused.len(), 2, "{log}");
    assert!(refused.iter().all(|l| l.contains("127.0.0.1")), "{log}");
}

#[test]
fn starttls_forgets_structured_replies_negotiated_in_plaintext() {
    // --tls on: opportunistic, the mode in which a MitM could inject plaintext options.
    let t = start(false, "on", &["--insecure-tcp"]);
    let mut s = tcp(&t.addr);
    greet(&mut s);
    assert_eq!(option(&mut s, OPT_STRUCTURED_REPLY, &[]).0, REP_ACK);
    let set = meta_payload(EXPORT, &["base:allocation"]);
    assert_eq!(option(&mut s, OPT_SET_META_CONTEXT, &set).0, REP_ACK);
    assert_eq!(option(&mut s, OPT_STARTTLS, &[]).0, REP_ACK);
    let mut tls = start_tls(s, client_config(&t.pki.client(), None));
    let (typ, infos) = option(&mut tls, OPT_GO, &info_payload(EXPORT, &[]));
    assert_eq!(typ, REP_ACK);
    let export = infos
        .iter()
        .find(|d| be16(d) == INFO_EXPORT)
        .expect("INFO_EXPORT");
    let flags = be16(&export[10..]);
    assert_eq!(
        flags & TF_SEND_DF_BIT,
        0,
        "DF is offered: structured replies survived STARTTLS"
    );
    // A READ gets a simple reply (the client never asked for structured ones inside TLS).
    let mut req = Vec::new();
    req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&CMD_READ.to_be_bytes());
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&0u64.to_be_bytes());
    req.extend_from_slice(&512u32.to_be_bytes());
    tls.write_all(&req).unwrap();
    tls.flush().unwrap();
    let mut r = [0u8; 16];
    tls.read_exact(&mut r).unwrap();
    assert_eq!(be32(&r), SIMPLE_REPLY_MAGIC, "not a simple reply: {r:02x?}");
    assert_eq!(be64(&r[8..]), 7);
    let mut rest = [0u8; 512];
    tls.read_exact(&mut rest).unwrap();
    // In plain mode on the Unix socket nothing changed: plaintext GO still works there.
    let mut c = Client::connect(&t.d.sock);
    c.go(EXPORT);
}

#[test]
fn garbage_after_starttls_and_idle_tls_peers_leave_the_daemon_serving_others() {
    let mut t = start(false, "require", &["--handshake-timeout", "30"]);
    // Three peers that say STARTTLS and then nothing: they hold no one up.
    let mut idle = Vec::new();
    for _ in 0..3 {
        let mut s = tcp(&t.addr);
        greet(&mut s);
        assert_eq!(option(&mut s, OPT_STARTTLS, &[]).0, REP_ACK);
        idle.push(s);
    }
    // Garbage instead of a ClientHello.
    let mut s = tcp(&t.addr);
    greet(&mut s);
    assert_eq!(option(&mut s, OPT_STARTTLS, &[]).0, REP_ACK);
    s.write_all(&random_bytes(5, 4096)).unwrap();
    assert!(
        closed(&mut s),
        "garbage after STARTTLS did not end the connection"
    );
    // An option pipelined behind STARTTLS reaches rustls as a bad record.
    let mut s = tcp(&t.addr);
    greet(&mut s);
    let mut both = Vec::new();
    for (o, d) in [(OPT_STARTTLS, Vec::new()), (OPT_GO, go_payload())] {
        both.extend_from_slice(&IHAVEOPT.to_be_bytes());
        both.extend_from_slice(&o.to_be_bytes());
        both.extend_from_slice(&(d.len() as u32).to_be_bytes());
        both.extend_from_slice(&d);
    }
    s.write_all(&both).unwrap();
    let (_, typ, _) = read_reply(&mut s).unwrap();
    assert_eq!(typ, REP_ACK);
    assert!(
        closed(&mut s),
        "pipelined plaintext after STARTTLS was accepted"
    );
    // A TLS client that gives up half-way (ClientHello, then close).
    let mut s = tcp(&t.addr);
    greet(&mut s);
    assert_eq!(option(&mut s, OPT_STARTTLS, &[]).0, REP_ACK);
    let mut conn = rustls::ClientConnection::new(
        client_config(&t.pki.client(), None),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    conn.write_tls(&mut s).unwrap();
    drop(s);
    // Meanwhile a real client works, and the daemon is alive.
    let data = random_bytes(9, 256 * 1024);
    let src = t.d.dir().join("src.bin");
    std::fs::write(&src, &data).unwrap();
    run(
        tool("nbdcopy").arg(&src).arg(t.nbds(&t.pki.client())),
        TOOL_TIMEOUT,
    )
    .success();
    assert_eq!(read_at(&t.d.image, 0, data.len()), data);
    t.d.assert_alive();
    drop(idle);
}

#[test]
fn sighup_reloads_the_certificates_and_a_bad_reload_keeps_the_old_ones() {
    let mut t = start(false, "require", &[]);
    nbdinfo(&[&t.nbds(&t.pki.client())]).success();
    // A new CA and server certificate in place of the old ones.
    let next = generate(&t.d.dir().join("next"), "the next CA", "client2");
    for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        std::fs::copy(next.server().join(f), t.pki.server().join(f)).unwrap();
    }
    // Before SIGHUP the old certificate is still served.
    nbdinfo(&[&t.nbds(&t.pki.client())]).success();
    t.d.signal(libc::SIGHUP);
    let reloaded = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        t.d.log().contains("TLS certificates reloaded")
    });
    assert!(reloaded, "no reload logged:\n{}", t.d.log());
    nbdinfo(&[&t.nbds(&next.client())]).success();
    nbdinfo(&[&t.nbds(&t.pki.client())]).failure();
    // A broken key: the reload fails, the daemon keeps serving the last good certificate.
    std::fs::write(t.pki.server().join("server-key.pem"), "not a key\n").unwrap();
    t.d.signal(libc::SIGHUP);
    let failed = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        t.d.log().contains("TLS reload failed")
    });
    assert!(failed, "no failed reload logged:\n{}", t.d.log());
    t.d.assert_alive();
    nbdinfo(&[&t.nbds(&next.client())]).success();
}

#[test]
fn tcp_without_tls_or_with_tls_only_offered_needs_insecure_tcp_and_bad_files_fail_the_start() {
    let dir = tempdir();
    let pki = generate(&dir.path().join("certs"), "CA", "c");
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(MIB).unwrap();
    let sock = dir.path().join("nbd.sock");
    let base = |extra: &[&str]| {
        let mut c = std::process::Command::new(daemon_binary());
        c.arg("--plain")
            .arg(&img)
            .arg("--unix")
            .arg(&sock)
            .args(extra);
        run(&mut c, Duration::from_secs(20))
    };
    let addr = format!("127.0.0.1:{}", free_port());
    let out = base(&["--tcp", &addr]).failure();
    assert!(out.stderr.contains("--tls require"), "{}", out.stderr);
    let certs = pki.server();
    let certs = certs.to_str().unwrap();
    let out = base(&["--tcp", &addr, "--tls", "on", "--tls-certificates", certs]).failure();
    assert!(out.stderr.contains("--insecure-tcp"), "{}", out.stderr);
    let out = base(&["--tcp", &addr, "--tls", "require"]).failure();
    assert!(out.stderr.contains("--tls-certificates"), "{}", out.stderr);
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = base(&[
        "--tcp",
        &addr,
        "--tls",
        "require",
        "--tls-certificates",
        empty.to_str().unwrap(),
    ])
    .failure();
    assert!(out.stderr.contains("server-cert.pem"), "{}", out.stderr);
}

#[test]
fn the_kernel_clients_nbd_client_lists_over_tls_1_2_with_a_client_certificate() {
    // nbd-client 3.24 forces TLS 1.2 (GnuTLS priority NORMAL:-VERS-TLS-ALL:+VERS-TLS1.2). Only
    // the listing: attaching would need the nbd module (tests/tests/kernel_client.rs's VM).
    let t = start(false, "require", &["--tls-verify-peer"]);
    let c = t.pki.client();
    let (_, port) = t.addr.split_once(':').unwrap();
    let list = |with_cert: bool| {
        let mut cmd = tool("nbd-client");
        cmd.args(["-l", "127.0.0.1", port]);
        if with_cert {
            cmd.arg("-certfile")
                .arg(c.join("client-cert.pem"))
                .arg("-keyfile")
                .arg(c.join("client-key.pem"));
        }
        cmd.arg("-cacertfile")
            .arg(c.join("ca-cert.pem"))
            .args(["-tlshostname", "localhost"]);
        run(&mut cmd, TOOL_TIMEOUT)
    };
    let out = list(true).success();
    assert!(out.stdout.contains(EXPORT), "{}", out.details());
    let log = t.d.log();
    let line = log
        .lines()
        .find(|l| l.contains("TLS established"))
        .unwrap_or_else(|| panic!("no TLS established line:\n{log}"));
    assert!(line.contains("tls=TLSv1_2"), "{line}");
    assert!(line.contains("CN=client1.example.test"), "{line}");
    // Without its certificate it gets nothing.
    let out = list(false);
    assert!(!out.stdout.contains(EXPORT), "{}", out.details());
}
