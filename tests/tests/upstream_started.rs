//! Requests started on an upstream without a thread waiting for each (`BlockDevice::start`):
//! over an upstream NBD server the session hands READs and WRITEs from the thread that read them
//! straight to the upstream connection, and a completer thread replies when the answers come,
//! in whatever order they come. What that must not change:
//!
//! * an upstream that dies with requests in flight fails exactly those (EIO to the client), and
//!   the daemon reconnects and serves the data it acknowledged;
//! * a client that leaves with requests in flight at the upstream leaves the daemon serving;
//! * the bytes on the upstream are the same whichever path wrote them: data written through
//!   started requests reads back through the blocking path and the other way round, and fio's
//!   verifier finds every block under out-of-order completions (four upstream connections,
//!   nbdkit's thread pool, mixed sizes at queue depth 32).
//!
//! The upstream is held still with SIGSTOP so requests are really in flight there.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbdcrypt_tests::*;

/// 16 MiB of header + 32 MiB of data.
const SIZE: u64 = 48 * MIB;

/// `nbdcryptd --volume URI`, unlocked; `env` set for it alone (through env(1)).
fn serve_env(uri: &str, key: &Path, env: &[&str]) -> Daemon {
    let dir = tempdir();
    let p = |n: &str| OsString::from(dir.path().join(n));
    let mut args: Vec<OsString> = env.iter().map(OsString::from).collect();
    args.push(daemon_binary().into());
    args.extend([
        "--volume".into(),
        uri.into(),
        "--unlock-key-file".into(),
        key.as_os_str().to_owned(),
        "--control".into(),
        p("control.sock"),
        "--unix".into(),
        p("nbd.sock"),
    ]);
    let d = Daemon::start_bin_in(Path::new("/usr/bin/env"), dir, args);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.ctl("status", &[]).ok()
        || !run(tool("nbdinfo").arg("--size").arg(d.uri()), TOOL_TIMEOUT).ok()
    {
        assert!(Instant::now() < deadline, "daemon not serving\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    d
}

fn serve(uri: &str, key: &Path) -> Daemon {
    serve_env(uri, key, &[])
}

fn write_file(d: &Daemon, data: &[u8], name: &str) {
    let src = d.dir().join(name);
    std::fs::write(&src, data).unwrap();
    run(
        tool("nbdcopy")
            .arg("--requests=32")
            .arg("--request-size=65536")
            .arg(&src)
            .arg(d.uri())
            .arg("--flush"),
        TOOL_TIMEOUT,
    )
    .success();
}

fn read_back(d: &Daemon, len: usize, name: &str) -> Vec<u8> {
    let back = d.dir().join(name);
    run(
        tool("nbdcopy")
            .arg("--requests=32")
            .arg("--request-size=65536")
            .arg(d.uri())
            .arg(&back),
        TOOL_TIMEOUT,
    )
    .success();
    let mut got = std::fs::read(&back).unwrap();
    got.truncate(len);
    got
}

fn wait_connected(d: &Daemon, want: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = d.ctl("status", &[]).success().stdout;
        if st.contains(&format!(" {want} connected")) {
            return st;
        }
        assert!(Instant::now() < deadline, "never reconnected: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Thread names of the daemon process.
fn threads(d: &Daemon) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{}/task", d.pid())) else {
        return Vec::new();
    };
    dir.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_owned())
        .collect()
}

/// A libnbd client in the background: issues 32 READs of 4 KiB and 8 WRITEs of 4 KiB at once
/// (asynchronous commands), then either waits for all of them and prints `ok N eio M other K`
/// (`wait`), or leaves at once without waiting (`leave`: the connection closes with all of them
/// in flight).
const INFLIGHT_PY: &str = r#"
import nbd, sys, os, errno
uri, mode = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.connect_uri(uri)
bufs, cookies = [], []
for i in range(32):
    b = nbd.Buffer(4096)
    bufs.append(b)
    cookies.append(h.aio_pread(b, (i * 97 % 4096) * 4096))
for i in range(8):
    cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"W" * 4096)), (4096 + i) * 4096))
print("sent", len(cookies), flush=True)
if mode == "leave":
    os._exit(0)
ok = eio = other = 0
for c in cookies:
    while True:
        try:
            if h.aio_command_completed(c):
                ok += 1
                break
        except nbd.Error as e:
            if e.errnum == errno.EIO:
                eio += 1
            else:
                other += 1
                print("error", e.errnum, e.string, flush=True)
            break
        h.poll(-1)
print("ok", ok, "eio", eio, "other", other, flush=True)
"#;

fn spawn_client(uri: &str, mode: &str) -> Child {
    Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(INFLIGHT_PY)
        .arg(uri)
        .arg(mode)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with libnbd's nbd module")
}

fn finish_client(c: Child, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let mut c = c;
    loop {
        if c.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let out = c.wait_with_output().unwrap();
            panic!(
                "the client never finished: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = c.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn an_upstream_dying_with_requests_in_flight_fails_them_with_eio_and_the_daemon_serves_on() {
    let dir = tempdir();
    let img = dir.path().join("backing.img");
    std::fs::File::create(&img).unwrap().set_len(SIZE).unwrap();
    let mut kit = Upstream::nbdkit(dir.path(), "up", &["file", img.to_str().unwrap()]);
    let key = format_upstream(dir.path(), &kit.uri, 0x5354);
    let mut d = serve(&kit.uri, &key);
    let data = random_bytes(0x4445, MIB as usize);
    write_file(&d, &data, "data.bin");

    // Held still: the requests go out on its socket and stay unanswered.
    kit.signal(nix::sys::signal::Signal::SIGSTOP);
    let client = spawn_client(&d.uri(), "wait");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        threads(&d).iter().any(|t| t == "nbd-completer"),
        "the session does not start requests on the upstream (no completer thread): this test \
         would prove nothing; threads: {:?}",
        threads(&d)
    );
    kit.kill();
    let out = finish_client(client, Duration::from_secs(30));
    assert!(
        out.contains("ok 0 eio 40 other 0"),
        "every request in flight when the upstream died must fail with EIO, and only those: \
         {out}\n{}",
        d.log()
    );
    d.assert_alive();

    // Back: the daemon reconnects and serves what it acknowledged before.
    kit.start();
    wait_connected(&d, 4);
    assert_eq!(
        first_difference(&read_back(&d, data.len(), "back.bin"), &data),
        None,
        "acknowledged data differs after the upstream came back"
    );
    d.assert_alive();
    assert!(!d.log().contains("panicked"), "{}", d.log());
}

#[test]
fn a_client_leaving_with_requests_in_flight_at_the_upstream_leaves_the_daemon_serving() {
    let dir = tempdir();
    let img = dir.path().join("backing.img");
    std::fs::File::create(&img).unwrap().set_len(SIZE).unwrap();
    let kit = Upstream::nbdkit(dir.path(), "up", &["file", img.to_str().unwrap()]);
    let key = format_upstream(dir.path(), &kit.uri, 0x5354);
    let mut d = serve(&kit.uri, &key);

    kit.signal(nix::sys::signal::Signal::SIGSTOP);
    let out = finish_client(spawn_client(&d.uri(), "leave"), Duration::from_secs(30));
    assert!(out.contains("sent 40"), "{out}");
    // The answers come after the client left: the replies have nowhere to go.
    std::thread::sleep(Duration::from_millis(500));
    kit.signal(nix::sys::signal::Signal::SIGCONT);

    let data = random_bytes(0x4c45, 2 * MIB as usize);
    write_file(&d, &data, "data.bin");
    assert_eq!(
        first_difference(&read_back(&d, data.len(), "back.bin"), &data),
        None
    );
    d.assert_alive();
    assert!(!d.log().contains("panicked"), "{}", d.log());
}

#[test]
fn started_and_blocking_requests_write_the_same_ciphertext_and_fio_verifies_out_of_order() {
    let dir = tempdir();
    // nbdkit memory offers multi-conn: four upstream connections, answers out of order.
    let kit = Upstream::nbdkit(dir.path(), "up", &["memory", "48M"]);
    let key = format_upstream(dir.path(), &kit.uri, 0x5354);

    // Mixed sizes at queue depth 32 with fio's verifier, through started requests.
    let mut started = serve(&kit.uri, &key);
    let fio = run(
        tool("fio")
            .arg("--ioengine=nbd")
            .arg(format!("--uri={}", started.uri()))
            .arg("--name=verify")
            .arg("--rw=randwrite")
            .arg("--bsrange=4k-128k")
            .arg("--iodepth=32")
            .arg("--size=24M")
            .arg("--verify=crc32c")
            .arg("--do_verify=1")
            .arg("--verify_fatal=1")
            .arg("--output-format=terse"),
        Duration::from_secs(300),
    );
    assert!(fio.ok(), "fio verify failed: {}", fio.details());

    // Written through started requests, read through the blocking path (and back).
    let one = random_bytes(0x4f4e, 8 * MIB as usize);
    write_file(&started, &one, "one.bin");
    started.terminate(Duration::from_secs(20));
    let mut blocking = serve_env(&kit.uri, &key, &["NBDCRYPT_BENCH_NO_START=1"]);
    assert!(!threads(&blocking).iter().any(|t| t == "nbd-completer"));
    assert_eq!(
        first_difference(&read_back(&blocking, one.len(), "one.back"), &one),
        None,
        "data written by started requests reads back differently through the blocking path"
    );
    let two = random_bytes(0x5457, 8 * MIB as usize);
    write_file(&blocking, &two, "two.bin");
    blocking.terminate(Duration::from_secs(20));
    let d = serve(&kit.uri, &key);
    assert_eq!(
        first_difference(&read_back(&d, two.len(), "two.back"), &two),
        None,
        "data written by the blocking path reads back differently through started requests"
    );
}
