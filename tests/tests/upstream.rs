//! The upstream NBD backend (`nbdcryptd --volume nbd://…`): the LUKS2 header and the ciphertext
//! live on another NBD server, started here on Unix sockets / loopback: nbdkit `file` and
//! `memory`, `qemu-nbd`, another `nbdcryptd --plain`, and nbdkit over TLS with client
//! certificates. Formatted through us (`nbdcryptctl format URI`), written and read back through
//! our export with real clients (nbdcopy, qemu-io, nbdsh); the upstream's bytes must be
//! ciphertext and cryptsetup must read our header. An upstream killed mid-run gives EIO and the
//! daemon reconnects when it returns.

#[path = "../../ctl/tests/moto/mod.rs"]
mod moto;
#[path = "common/pki.rs"]
mod pki;

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nbdcrypt_tests::*;

/// 16 MiB of header + 32 MiB of data.
const SIZE: u64 = 48 * MIB;
/// A plaintext pattern that must never reach the upstream.
const PATTERN: &[u8] = b"NBDCRYPT-UPSTREAM-PLAINTEXT-PATTERN-";

/// `nbdcryptd --volume URI`, unlocked at start.
fn serve(dir: TempDir, uri: &str, key: &Path) -> Daemon {
    let p = |n: &str| dir.path().join(n).into_os_string();
    let args = vec![
        "--volume".into(),
        uri.into(),
        "--unlock-key-file".into(),
        key.as_os_str().to_owned(),
        "--control".into(),
        p("control.sock"),
        "--unix".into(),
        p("nbd.sock"),
    ];
    Daemon::start_in(dir, args)
}

fn pattern(len: usize) -> Vec<u8> {
    PATTERN.iter().copied().cycle().take(len).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Writes `data` at 0 through our export with nbdcopy and reads it back.
fn round_trip(d: &Daemon, data: &[u8]) {
    let src = d.dir().join("pattern.bin");
    std::fs::write(&src, data).unwrap();
    run(
        tool("nbdcopy").arg(&src).arg(d.uri()).arg("--flush"),
        TOOL_TIMEOUT,
    )
    .success();
    let back = d.dir().join("back.bin");
    run(tool("nbdcopy").arg(d.uri()).arg(&back), TOOL_TIMEOUT).success();
    let got = std::fs::read(&back).unwrap();
    assert!(
        got.len() >= data.len(),
        "read back {} bytes, wrote {}",
        got.len(),
        data.len()
    );
    assert_eq!(
        first_difference(&got[..data.len()], data),
        None,
        "data read back through the upstream differs"
    );
}

fn status(d: &Daemon) -> String {
    d.ctl("status", &[]).success().stdout
}

#[test]
fn nbdkit_file_upstream_holds_only_ciphertext_and_cryptsetup_reads_our_header() {
    let dir = tempdir();
    let img = dir.path().join("backing.img");
    std::fs::File::create(&img).unwrap().set_len(SIZE).unwrap();
    let up = Upstream::nbdkit(dir.path(), "file", &["file", img.to_str().unwrap()]);
    let key = format_upstream(dir.path(), &up.uri, 7);

    // cryptsetup reads the header we wrote over NBD.
    let dump = run(tool("cryptsetup").arg("luksDump").arg(&img), TOOL_TIMEOUT)
        .success()
        .stdout;
    assert!(dump.contains("Version:       \t2"), "{dump}");
    run(
        tool("cryptsetup")
            .args(["open", "--test-passphrase", "--key-file"])
            .arg(&key)
            .arg(&img),
        TOOL_TIMEOUT,
    )
    .success();
    // nbdcryptctl dump reads it back over NBD too.
    let out = nbdcryptctl(&[OsStr::new("dump"), OsStr::new(&up.uri)]).success();
    assert!(out.stdout.contains("aes-xts-plain64"), "{}", out.stdout);

    let ddir = tempdir();
    let d = serve(ddir, &up.uri, &key);
    let data = pattern(4 * MIB as usize);
    round_trip(&d, &data);
    let st = status(&d);
    assert!(st.contains("upstream") && st.contains("connected"), "{st}");

    // The upstream's bytes: ciphertext only.
    let raw = std::fs::read(&img).unwrap();
    assert!(
        !contains(&raw, &PATTERN[..24]),
        "plaintext pattern found in the upstream's backing file"
    );
    // Negative control: the pattern is findable where it is plaintext (our own source file).
    assert!(contains(
        &std::fs::read(d.dir().join("pattern.bin")).unwrap(),
        &PATTERN[..24]
    ));
}

#[test]
fn nbdkit_memory_qemu_nbd_and_nbdcryptd_plain_upstreams_round_trip() {
    // nbdkit memory (multi-conn), with qemu-io as the client of our export.
    let dir = tempdir();
    let up = Upstream::nbdkit(dir.path(), "mem", &["memory", "48M"]);
    let key = format_upstream(dir.path(), &up.uri, 7);
    let d = serve(tempdir(), &up.uri, &key);
    let qemu = |cmd: &str| {
        run(
            tool("qemu-io")
                .args(["-f", "raw", "-c", cmd])
                .arg(format!("nbd+unix:///nbdcrypt?socket={}", d.sock.display())),
            TOOL_TIMEOUT,
        )
        .success()
        .stdout
    };
    qemu("write -P 0xa5 1M 3M");
    let out = qemu("read -P 0xa5 1M 3M");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    drop(d);

    // qemu-nbd on a Unix socket (no multi-conn: one connection).
    let qdir = tempdir();
    let qimg = qdir.path().join("q.img");
    std::fs::File::create(&qimg).unwrap().set_len(SIZE).unwrap();
    let qsock = qdir.path().join("q.sock");
    let mut qemu_nbd = Command::new("qemu-nbd")
        .args(["-f", "raw", "-x", "vol", "-t", "--cache=none", "-k"])
        .arg(&qsock)
        .arg(&qimg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd (qemu-utils)");
    wait_for_socket(&qsock);
    let quri = format!("nbd+unix:///vol?socket={}", qsock.display());
    let key = format_upstream(qdir.path(), &quri, 7);
    let d = serve(tempdir(), &quri, &key);
    let data = pattern(2 * MIB as usize);
    round_trip(&d, &data);
    assert!(status(&d).contains("1 connected (multi-conn no)"));
    drop(d);
    let _ = qemu_nbd.kill();
    let _ = qemu_nbd.wait();
    assert!(!contains(&std::fs::read(&qimg).unwrap(), &PATTERN[..24]));

    // Another nbdcryptd, serving a plain file.
    let plain = Daemon::plain(SIZE, &[]);
    let puri = plain.uri();
    let pdir = tempdir();
    let key = format_upstream(pdir.path(), &puri, 7);
    let d = serve(tempdir(), &puri, &key);
    round_trip(&d, &data);
    drop(d);
    assert!(!contains(
        &std::fs::read(&plain.image).unwrap(),
        &PATTERN[..24]
    ));
}

#[test]
fn an_upstream_killed_mid_run_gives_eio_and_the_daemon_reconnects() {
    let dir = tempdir();
    let img = dir.path().join("backing.img");
    std::fs::File::create(&img).unwrap().set_len(SIZE).unwrap();
    let mut up = Upstream::nbdkit(dir.path(), "file", &["file", img.to_str().unwrap()]);
    let key = format_upstream(dir.path(), &up.uri, 7);
    let mut d = serve(tempdir(), &up.uri, &key);
    let data = pattern(MIB as usize);
    round_trip(&d, &data);

    up.kill();
    // A read now fails with EIO, and the daemon keeps running.
    nbdsh_d(
        &d,
        r#"
        h.connect_uri(URI)
        expect_err(lambda: h.pread(4096, 0), errno.EIO, "read with the upstream gone")
        "#,
    )
    .success();
    d.assert_alive();
    let st = status(&d);
    assert!(st.contains("0 connected"), "{st}");

    // The upstream returns: the daemon reconnects (back-off at most 5 s) and serves again.
    up.start();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = status(&d);
        if st.contains(" 4 connected") {
            assert!(st.contains("reconnects"), "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "never reconnected: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let back = d.dir().join("back2.bin");
    run(tool("nbdcopy").arg(d.uri()).arg(&back), TOOL_TIMEOUT).success();
    let got = std::fs::read(&back).unwrap();
    assert_eq!(first_difference(&got[..data.len()], &data), None);
    d.assert_alive();
}

#[test]
fn nbds_upstream_with_client_certificates_and_a_wrong_ca_is_refused() {
    let dir = tempdir();
    let pki = pki::generate(&dir.path().join("pki"), "upstream CA", "nbdcrypt client");
    let other = pki::generate(&dir.path().join("other"), "other CA", "x");
    let port = pki::free_port();
    let mut nbdkit = tool("nbdkit")
        .args([
            "-f",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--tls=require",
        ])
        .arg(format!("--tls-certificates={}", pki.server().display()))
        .args(["--tls-verify-peer", "memory", "48M"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdkit");
    pki::wait_tcp(&format!("127.0.0.1:{port}"));
    let uri = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        pki.client().display()
    );
    let key = format_upstream(dir.path(), &uri, 7);
    let d = serve(tempdir(), &uri, &key);
    round_trip(&d, &pattern(MIB as usize));
    drop(d);

    // A CA that did not sign the server: refused, never connected unverified.
    let wrong = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        other.client().display()
    );
    let out = nbdcryptctl(&[OsStr::new("dump"), OsStr::new(&wrong)]).failure();
    assert!(out.stderr.contains("TLS"), "{}", out.stderr);
    // nbds without a certificate directory: refused with the reason.
    let bare = format!("nbds://127.0.0.1:{port}/");
    let out = nbdcryptctl(&[OsStr::new("dump"), OsStr::new(&bare)]).failure();
    assert!(out.stderr.contains("tls-certificates"), "{}", out.stderr);
    let _ = nbdkit.kill();
    let _ = nbdkit.wait();
}

#[test]
fn an_upstream_without_flush_is_refused_writable_with_the_reason() {
    let dir = tempdir();
    // nbdkit eval without a flush script: can_flush is false.
    let up = Upstream::nbdkit(
        dir.path(),
        "noflush",
        &[
            "eval",
            "get_size=echo 50331648",
            "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
            "pwrite=cat >/dev/null",
        ],
    );
    let out = nbdcryptctl(&[
        OsStr::new("format"),
        OsStr::new(&up.uri),
        OsStr::new("--yes"),
        OsStr::new("--key-file"),
        OsStr::new("/dev/null"),
    ])
    .failure();
    assert!(out.stderr.contains("NBD_CMD_FLUSH"), "{}", out.stderr);
}

/// Runs `code` under Debian's python3 (boto3 from python3-boto3) with `s3` bound to a client of
/// `endpoint`; returns stdout.
fn s3(endpoint: &str, code: &str) -> String {
    let script = format!(
        "import boto3\ns3 = boto3.client('s3', endpoint_url={endpoint:?}, region_name='us-east-1', \
         aws_access_key_id='test', aws_secret_access_key='test')\n{code}\n"
    );
    let mut c = Command::new("/usr/bin/python3");
    moto::aws_env(&mut c);
    run(c.arg("-c").arg(script), TOOL_TIMEOUT).success().stdout
}

#[test]
fn s3_through_nbdkit_over_moto_holds_only_ciphertext_objects() {
    let m = moto::Moto::start();
    s3(&m.endpoint, "s3.create_bucket(Bucket='vols')");
    let dir = tempdir();
    let sock = dir.path().join("s3.sock");
    let mut cmd = tool("nbdkit");
    moto::aws_env(&mut cmd);
    let mut nbdkit = cmd
        .args(["-f", "-U"])
        .arg(&sock)
        .arg("S3")
        .arg(format!("endpoint-url={}", m.endpoint))
        .args(["bucket=vols", "key=vol1", "size=48M", "object-size=64k"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdkit S3 (nbdkit-plugin-python)");
    wait_for_socket(&sock);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let key = format_upstream(dir.path(), &uri, 7);
    let d = serve(tempdir(), &uri, &key);
    let data = pattern(MIB as usize);
    round_trip(&d, &data);
    drop(d);
    let _ = nbdkit.kill();
    let _ = nbdkit.wait();

    // Every object in the bucket: ciphertext only; the header objects are there.
    let needle = String::from_utf8_lossy(&PATTERN[..24]).into_owned();
    let out = s3(
        &m.endpoint,
        &format!(
            "objs = s3.list_objects_v2(Bucket='vols', Prefix='vol1/', MaxKeys=1000)['Contents']\n\
             bad = [o['Key'] for o in objs if {needle:?}.encode() in \
             s3.get_object(Bucket='vols', Key=o['Key'])['Body'].read()]\n\
             luks = s3.get_object(Bucket='vols', Key='vol1/0000000000000000')['Body'].read()[:6]\n\
             s3.put_object(Bucket='vols', Key='control', Body=b'x' + {needle:?}.encode())\n\
             ctl = {needle:?}.encode() in s3.get_object(Bucket='vols', Key='control')['Body'].read()\n\
             print(len(objs), len(bad), luks == b'LUKS\\xba\\xbe', ctl)"
        ),
    );
    let f: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(f.len(), 4, "{out}");
    // Negative control: the same check finds the pattern in a plaintext object.
    assert_eq!(f[3], "True", "the plaintext check is blind: {out}");
    let objects: usize = f[0].parse().unwrap();
    assert!(objects > 256, "only {objects} objects: {out}");
    assert_eq!(f[1], "0", "objects holding plaintext: {out}");
    assert_eq!(f[2], "True", "no LUKS2 header in the first object: {out}");
}

/// A hostile upstream (Python, raw socket): a correct handshake, then replies that break the
/// protocol. Our client must refuse them with a clear error, allocate nothing from their lengths,
/// and never panic (here through `nbdcryptctl dump`, which reads the header over NBD).
const HOSTILE_UPSTREAM: &str = r#"
import socket, struct, sys
path, mode = sys.argv[1], sys.argv[2]
def recv(c, n):
    b = b""
    while len(b) < n:
        k = c.recv(n - len(b))
        if not k:
            raise EOFError
        b += k
    return b
def rep(c, opt, ty, data):
    c.sendall(struct.pack(">QIII", 0x3e889045565a9, opt, ty, len(data)) + data)
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(8)
while True:
    c, _ = s.accept()
    try:
        c.sendall(b"NBDMAGICIHAVEOPT" + struct.pack(">H", 3))
        recv(c, 4)
        while True:
            _, opt, ln = struct.unpack(">QII", recv(c, 16))
            recv(c, ln)
            if opt == 8:
                rep(c, opt, 1, b"")
            elif opt == 7:
                rep(c, opt, 3, struct.pack(">HQH", 0, 48 << 20, 1 | 4 | 8))
                rep(c, opt, 1, b"")
                break
            else:
                rep(c, opt, 0x80000001, b"")
        while True:
            _, flags, cmd, handle, off, ln = struct.unpack(">IHHQQI", recv(c, 28))
            if cmd == 1:
                recv(c, ln)
            if mode == "outside":
                c.sendall(struct.pack(">IHHQI", 0x668e33ef, 1, 1, handle, 8 + ln)
                          + struct.pack(">Q", off + 1) + bytes(ln))
            elif mode == "huge":
                c.sendall(struct.pack(">IHHQI", 0x668e33ef, 1, 1, handle, 0xffffffff))
            elif mode == "handle":
                c.sendall(struct.pack(">IIQ", 0x67446698, 0, handle ^ 0xdead) + bytes(ln))
            elif mode == "gap":
                c.sendall(struct.pack(">IHHQI", 0x668e33ef, 1, 1, handle, 8 + ln // 2)
                          + struct.pack(">Q", off) + bytes(ln // 2))
    except Exception:
        pass
    c.close()
"#;

#[test]
fn a_hostile_upstream_is_refused_with_the_reason_and_nothing_panics() {
    for (mode, expect) in [
        ("outside", "outside its request"),
        ("huge", "data chunk of 4294967295 bytes"),
        ("handle", "unknown handle"),
        ("gap", "covers"),
    ] {
        let dir = tempdir();
        let sock = dir.path().join("hostile.sock");
        let mut py = Command::new("python3")
            .arg("-c")
            .arg(HOSTILE_UPSTREAM)
            .arg(&sock)
            .arg(mode)
            .stdin(Stdio::null())
            .spawn()
            .expect("python3");
        wait_for_socket(&sock);
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let out = nbdcryptctl(&[OsStr::new("dump"), OsStr::new(&uri)]).failure();
        let _ = py.kill();
        let _ = py.wait();
        assert!(
            out.stderr.contains(expect) && !out.stderr.contains("panicked"),
            "{mode}: {}",
            out.stderr
        );
    }
}

#[test]
fn plain_mode_over_an_upstream_passes_bytes_through_unencrypted() {
    // `--plain URI`: the comparison mode benches/upstream.sh uses to split the hop's cost from
    // the encryption's. The bytes arrive as they were written (that is what plain means).
    let dir = tempdir();
    let img = dir.path().join("backing.img");
    std::fs::File::create(&img).unwrap().set_len(SIZE).unwrap();
    let up = Upstream::nbdkit(dir.path(), "file", &["file", img.to_str().unwrap()]);
    let ddir = tempdir();
    let sock = ddir.path().join("nbd.sock").into_os_string();
    let d = Daemon::start_in(
        ddir,
        vec![
            "--plain".into(),
            up.uri.clone().into(),
            "--unix".into(),
            sock,
        ],
    );
    let data = pattern(MIB as usize);
    round_trip(&d, &data);
    let raw = std::fs::read(&img).unwrap();
    assert_eq!(first_difference(&raw[..data.len()], &data), None);
}
