//! The daemon as a process: SIGTERM with I/O in flight, socket permissions, --create, TCP.

use nbdcrypt_tests::raw::*;
use nbdcrypt_tests::*;
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

const BLOCK: usize = 4096;

/// Content of write `seq` by writer `t`: an 8-byte tag, then bytes derived from it.
fn pattern(t: u64, seq: u64) -> Vec<u8> {
    let tag = (t << 48) | seq;
    let mut v = tag.to_be_bytes().to_vec();
    v.extend_from_slice(&random_bytes(tag ^ 0x5151, BLOCK - 8));
    v
}

#[test]
fn sigterm_with_writes_in_flight_exits_0_and_keeps_every_acknowledged_write() {
    const WRITERS: u64 = 4;
    const SLOTS: u64 = 1024; // 4 MiB per writer; sequence numbers wrap around the slots
    const DEPTH: usize = 16;
    let size = WRITERS * SLOTS * BLOCK as u64;
    let mut d = Daemon::plain(size, &[]);
    let acked_total = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // acked[t] = seqs acknowledged with error 0
    let acked: Arc<Mutex<Vec<Vec<u64>>>> = Arc::new(Mutex::new(vec![Vec::new(); WRITERS as usize]));
    let mut handles = Vec::new();
    for t in 0..WRITERS {
        let (mut c, _) = Client::connect_go(&d.sock);
        let rd = c.s.try_clone().unwrap();
        let (credit_tx, credit_rx) = mpsc::sync_channel::<()>(DEPTH);
        let stop_w = stop.clone();
        let writer = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut seq = 0u64;
            while !stop_w.load(Ordering::Relaxed) && Instant::now() < deadline && seq < 200_000 {
                if credit_tx.send(()).is_err() {
                    break; // reader gone: connection closed
                }
                let off = (t * SLOTS + seq % SLOTS) * BLOCK as u64;
                if c.request(
                    0,
                    CMD_WRITE,
                    (t << 48) | seq,
                    off,
                    BLOCK as u32,
                    &pattern(t, seq),
                )
                .is_err()
                {
                    break;
                }
                seq += 1;
            }
            seq
        });
        let acked = acked.clone();
        let total = acked_total.clone();
        let reader = std::thread::spawn(move || {
            let mut c = Client {
                s: rd,
                server_flags: 0,
            };
            let mut errors = 0;
            while let Ok((err, cookie)) = c.simple_reply() {
                let _ = credit_rx.try_recv();
                if err == 0 {
                    assert_eq!(cookie >> 48, t, "reply on the wrong connection");
                    acked.lock().unwrap()[t as usize].push(cookie & 0xffff_ffff_ffff);
                    total.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors += 1; // ESHUTDOWN for requests refused during shutdown is allowed
                }
            }
            drop(credit_rx);
            errors
        });
        handles.push((writer, reader));
    }

    // Let the writers get going, then SIGTERM in the middle of the stream.
    let deadline = Instant::now() + Duration::from_secs(15);
    while acked_total.load(Ordering::Relaxed) < 500 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = acked_total.load(Ordering::Relaxed);
    assert!(
        before >= 500,
        "writers did not get 500 writes acknowledged within 15 s ({before})"
    );
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(30));
    stop.store(true, Ordering::Relaxed);
    let status =
        status.expect("nbdcryptd did not exit within 30 s of SIGTERM with clients connected");
    let mut sent = 0;
    let mut refused = 0;
    for (w, r) in handles {
        sent += w.join().expect("writer thread");
        refused += r.join().expect("reader thread");
    }
    let after = acked_total.load(Ordering::Relaxed);
    eprintln!(
        "sent {sent}, acknowledged {before} before SIGTERM and {after} in total, {refused} refused"
    );
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}\n{}",
        d.log()
    );

    // Every acknowledged write is in the backing file: each slot holds the last acknowledged
    // write to it or a later one from the same writer, never an older one or a torn block.
    let disk = std::fs::read(&d.image).unwrap();
    let acked = acked.lock().unwrap();
    for t in 0..WRITERS {
        let mut last: HashMap<u64, u64> = HashMap::new();
        for &s in &acked[t as usize] {
            let e = last.entry(s % SLOTS).or_insert(s);
            *e = (*e).max(s);
        }
        for slot in 0..SLOTS {
            let off = ((t * SLOTS + slot) * BLOCK as u64) as usize;
            let block = &disk[off..off + BLOCK];
            let tag = be64(block);
            match last.get(&slot) {
                None if block.iter().all(|&b| b == 0) => continue,
                None => {}
                Some(&s) => assert!(
                    tag >> 48 == t && (tag & 0xffff_ffff_ffff) >= s,
                    "writer {t} slot {slot}: acknowledged write {s} missing (found tag {tag:#x})"
                ),
            }
            let seq = tag & 0xffff_ffff_ffff;
            assert_eq!(tag >> 48, t, "writer {t} slot {slot}: foreign tag {tag:#x}");
            assert_eq!(
                seq % SLOTS,
                slot,
                "writer {t} slot {slot}: write {seq} in the wrong place"
            );
            assert!(
                block == &pattern(t, seq)[..],
                "writer {t} slot {slot}: torn block for write {seq}"
            );
        }
    }
}

#[test]
fn sigterm_with_an_idle_client_and_no_clients_exits_0_and_stops_accepting() {
    let mut d = Daemon::plain(4 * MIB, &[]);
    let (mut c, _) = Client::connect_go(&d.sock);
    assert_eq!(c.write(1, 0, &[5; 4096], 0), 0);
    let st = d.terminate(Duration::from_secs(15));
    assert_eq!(st.code(), Some(0), "exit status: {st}\n{}", d.log());
    assert!(
        UnixStream::connect(&d.sock).is_err(),
        "socket still accepts after exit"
    );
    assert!(
        c.closed_within(Duration::from_secs(2)),
        "client connection left open"
    );
    assert_eq!(read_at(&d.image, 0, 4096), vec![5; 4096]);

    let mut d = Daemon::plain(4 * MIB, &[]);
    let st = d.terminate(Duration::from_secs(10));
    assert_eq!(st.code(), Some(0), "exit status: {st}\n{}", d.log());
}

#[test]
fn sigterm_with_a_client_stuck_in_the_handshake_exits_0_promptly() {
    // The default handshake timeout is 60 s; shutdown must not wait for it.
    let mut d = Daemon::plain(4 * MIB, &[]);
    let _greeted = Client::connect_no_flags(&d.sock);
    let mut negotiating = Client::connect(&d.sock);
    assert_eq!(negotiating.list(), vec![EXPORT.to_string()]);
    let st = d.terminate(Duration::from_secs(15));
    assert_eq!(st.code(), Some(0), "exit status: {st}\n{}", d.log());
}

#[test]
fn an_option_sent_after_sigterm_gets_err_shutdown_or_a_close() {
    let mut d = Daemon::plain(4 * MIB, &["--handshake-timeout", "30"]);
    let mut c = Client::connect(&d.sock);
    assert_eq!(c.list(), vec![EXPORT.to_string()]);
    d.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    let _ = c.send_opt(OPT_LIST, &[]);
    c.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    match c.read_opt_reply() {
        Ok(r) => assert_eq!(
            r.typ, 0x8000_0007,
            "option after SIGTERM: want ERR_SHUTDOWN, got {r:?}"
        ),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "no answer to an option 5 s after SIGTERM: {e}"
        ),
    }
    drop(c);
    let st = d
        .wait_exit(Duration::from_secs(15))
        .expect("exit after SIGTERM");
    assert_eq!(st.code(), Some(0));
}

#[test]
fn the_unix_socket_is_created_with_mode_0600() {
    let d = Daemon::plain(4 * MIB, &[]);
    let mode = std::fs::metadata(&d.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
}

#[test]
fn create_makes_a_file_of_the_given_size_and_leaves_an_existing_one_alone() {
    let d = Daemon::start(&[
        "--plain",
        "{dir}/new.img",
        "--create",
        "64M",
        "--unix",
        "{dir}/s.sock",
    ]);
    let img = d.dir().join("new.img");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 64 * MIB);
    let (e, _) = nbdinfo_json(&format!("nbd+unix:///nbdcrypt?socket={}", d.sock.display()));
    assert_eq!(e["export-size"], 64 * MIB);

    let dir = tempdir();
    let data = random_bytes(6, 2 * MIB as usize);
    std::fs::write(dir.path().join("disk.img"), &data).unwrap();
    let d = Daemon::plain_in(dir, &["--create", "64M"]);
    assert_eq!(
        std::fs::metadata(&d.image).unwrap().len(),
        2 * MIB,
        "--create resized an existing file"
    );
    let (mut c, e) = Client::connect_go(&d.sock);
    assert_eq!(e.size, 2 * MIB);
    assert_eq!(c.read(1, 0, 4096).unwrap(), data[..4096].to_vec());
}

#[test]
fn a_missing_backing_file_without_create_is_a_startup_error() {
    let dir = tempdir();
    let mut cmd = std::process::Command::new(daemon_binary());
    cmd.arg("--plain")
        .arg(dir.path().join("absent.img"))
        .arg("--unix")
        .arg(dir.path().join("s.sock"));
    let out = run(&mut cmd, Duration::from_secs(20));
    assert!(
        !out.ok(),
        "nbdcryptd started without its backing file\n{}",
        out.details()
    );
    assert!(
        !dir.path().join("absent.img").exists(),
        "created the file without --create"
    );
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn tcp_on_localhost_serves_the_export_only_with_insecure_tcp() {
    let port = free_tcp_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::plain(4 * MIB, &["--tcp", &addr, "--insecure-tcp"]);
    let uri = format!("nbd://{addr}/nbdcrypt");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "TCP listener {addr} never came up\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = nbdinfo(&["--size", &uri]).success();
    assert_eq!(out.stdout.trim(), (4 * MIB).to_string());
    let out = nbdsh(
        &uri,
        r#"
        h.connect_uri(URI)
        h.pwrite(b"t" * 4096, 8192, nbd.CMD_FLAG_FUA)
        assert h.pread(4096, 8192) == b"t" * 4096
    "#,
    );
    out.success();
    assert_eq!(read_at(&d.image, 8192, 4096), vec![b't'; 4096]);
    drop(d);

    // Without --insecure-tcp, plaintext TCP is refused at startup.
    let dir = tempdir();
    std::fs::File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let mut cmd = std::process::Command::new(daemon_binary());
    cmd.arg("--plain")
        .arg(dir.path().join("disk.img"))
        .arg("--unix")
        .arg(dir.path().join("s.sock"))
        .arg("--tcp")
        .arg(format!("127.0.0.1:{}", free_tcp_port()));
    let out = run(&mut cmd, Duration::from_secs(20));
    assert!(
        !out.ok(),
        "plaintext TCP without --insecure-tcp must be refused\n{}",
        out.details()
    );
}

/// A loop device over a file, detached on drop.
struct Loop {
    dev: String,
}

impl Loop {
    fn attach(file: &std::path::Path) -> Loop {
        let out = run(
            std::process::Command::new("losetup")
                .arg("--find")
                .arg("--show")
                .arg(file),
            Duration::from_secs(20),
        )
        .success();
        Loop {
            dev: out.stdout.trim().to_owned(),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.dev)
            .status();
    }
}

#[test]
fn a_block_device_is_served_with_its_device_size() {
    let dir = tempdir();
    let file = dir.path().join("backing.img");
    let data = random_bytes(21, 16 * MIB as usize);
    std::fs::write(&file, &data).unwrap();
    let lo = Loop::attach(&file);
    let d = Daemon::start(&["--plain", &lo.dev, "--unix", "{dir}/s.sock"]);
    let (mut c, e) = Client::connect_go(&d.sock);
    assert_eq!(
        e.size,
        16 * MIB,
        "size of a block device export (BLKGETSIZE64, not st_size)"
    );
    assert!(
        c.read(1, 0, 1 << 20).unwrap() == data[..1 << 20],
        "device content"
    );
    assert!(
        c.read(2, 15 * MIB, 1 << 20).unwrap() == data[15 << 20..],
        "device tail"
    );
    assert_eq!(c.write(3, 4096, &[0x66; 8192], CMD_FLAG_FUA), 0);
    c.request(0, CMD_FLUSH, 4, 0, 0, &[]).unwrap();
    assert_eq!(c.simple_reply().unwrap(), (0, 4));
    c.request(0, CMD_WRITE_ZEROES, 5, MIB, 65536, &[]).unwrap();
    assert_eq!(
        c.simple_reply().unwrap(),
        (0, 5),
        "WRITE_ZEROES on a block device"
    );
    assert_eq!(c.read(6, MIB, 65536).unwrap(), vec![0; 65536]);
    assert_eq!(
        c.write(7, 16 * MIB - 4096, &[1; 8192], 0),
        ENOSPC,
        "write past the device end"
    );
    drop(c);
    let mut d = d;
    assert_eq!(d.terminate(Duration::from_secs(15)).code(), Some(0));
    drop(lo);
    assert_eq!(
        read_at(&file, 4096, 8192),
        vec![0x66; 8192],
        "FUA write reached the device"
    );
    assert_eq!(read_at(&file, MIB, 65536), vec![0; 65536]);
}

#[test]
fn an_export_whose_size_is_not_a_multiple_of_512_serves_its_last_bytes() {
    let size = MIB as usize + 3;
    let data = random_bytes(22, size);
    for extra in [&[][..], &["--direct"][..]] {
        let d = Daemon::plain_with(&data, extra);
        let (mut c, e) = Client::connect_go(&d.sock);
        assert_eq!(e.size, size as u64, "{extra:?}");
        assert_eq!(
            c.read(1, size as u64 - 3, 3).unwrap(),
            data[size - 3..].to_vec(),
            "{extra:?}"
        );
        assert_eq!(
            c.read(2, size as u64 - 4096, 4096).unwrap(),
            data[size - 4096..].to_vec(),
            "{extra:?}"
        );
        assert_eq!(c.read(3, size as u64 - 2, 4), Err(EINVAL), "{extra:?}");
        assert_eq!(c.write(4, size as u64 - 5, b"ABCDE", 0), 0, "{extra:?}");
        assert_eq!(c.write(5, size as u64 - 1, b"XY", 0), ENOSPC, "{extra:?}");
        assert_eq!(
            c.read(6, size as u64 - 5, 5).unwrap(),
            b"ABCDE".to_vec(),
            "{extra:?}"
        );
        drop(c);
        let out = run(
            tool("nbdcopy").arg(d.uri()).arg(d.dir().join("copy.bin")),
            TOOL_TIMEOUT,
        )
        .success();
        drop(out);
        let copy = std::fs::read(d.dir().join("copy.bin")).unwrap();
        assert_eq!(copy.len(), size, "{extra:?}");
        assert_eq!(&copy[size - 5..], b"ABCDE", "{extra:?}");
        assert!(copy[..size - 5] == data[..size - 5], "{extra:?}");
        assert_eq!(
            std::fs::metadata(&d.image).unwrap().len(),
            size as u64,
            "{extra:?}: file size changed"
        );
    }
}

/// True if the server hangs up on a fresh connection (without a greeting) within 5 s.
fn refused(sock: &std::path::Path) -> bool {
    use std::io::Read;
    let Ok(mut s) = UnixStream::connect(sock) else {
        return true;
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 18];
    match s.read(&mut buf) {
        Ok(0) | Err(_) => true,
        Ok(_) => false,
    }
}

#[test]
fn clients_beyond_max_connections_are_refused_until_a_slot_frees_up() {
    let d = Daemon::plain(4 * MIB, &["--max-connections", "2"]);
    std::thread::sleep(Duration::from_millis(500)); // let the harness's readiness probe go away
    let (mut a, _) = Client::connect_go(&d.sock);
    let (b, _) = Client::connect_go(&d.sock);
    assert!(
        refused(&d.sock),
        "a third client was greeted with --max-connections 2"
    );
    assert_eq!(
        a.write(1, 0, &[1; 4096], 0),
        0,
        "existing client affected by the refusal"
    );
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if !refused(&d.sock) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slot not freed 5 s after a client disconnected"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(a);
    std::thread::sleep(Duration::from_millis(300));
    assert_server_serves(&d.sock);
}

#[test]
fn debug_logging_does_not_disturb_serving() {
    let d = Daemon::plain(8 * MIB, &["--log-level", "debug", "--allow-discards"]);
    let out = nbdsh_d(
        &d,
        r#"
        h.add_meta_context("base:allocation")
        h.connect_uri(URI)
        h.pwrite(b"d" * 65536, 0, nbd.CMD_FLAG_FUA)
        assert h.pread(65536, 0) == b"d" * 65536
        h.zero(65536, 65536)
        h.trim(65536, 131072)
        h.cache(65536, 0)
        h.flush()
        h.block_status(8 * 1024 * 1024, 0, lambda *a: 0)
        h.set_strict_mode(0)
        try:
            h.pread(4096, 8 * 1024 * 1024)
        except nbd.Error:
            pass
        h.shutdown()
    "#,
    );
    out.success();
    assert!(
        d.log().to_lowercase().contains("debug"),
        "no debug lines with --log-level debug:\n{}",
        d.log()
    );
}

/// A small tmpfs mounted in a temp dir, unmounted on drop.
struct SmallFs {
    dir: TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> SmallFs {
        let dir = tempdir();
        let st = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "nbdcrypt-test",
            ])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "mount -t tmpfs failed (the tests run as root)"
        );
        SmallFs { dir }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn a_write_that_hits_a_full_filesystem_fails_and_every_later_flush_fails() {
    // 32 MiB sparse backing file on a 4 MiB filesystem: writes fail once it is full.
    let fs = SmallFs::mount("4m");
    let img = fs.dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let img_s = img.to_str().unwrap().to_owned();
    let d = Daemon::start(&["--plain", &img_s, "--unix", "{dir}/s.sock"]);
    let (mut c, _) = Client::connect_go(&d.sock);
    let chunk = vec![0x5au8; MIB as usize];
    let mut failed_at = None;
    for i in 0..32u64 {
        let err = c.write(i, i * MIB, &chunk, 0);
        if err != 0 {
            assert!(
                err == ENOSPC || err == EIO,
                "write on a full filesystem: error {err}"
            );
            failed_at = Some(i);
            break;
        }
    }
    let failed_at = failed_at.expect("32 MiB of writes 'succeeded' on a 4 MiB filesystem");
    assert!(
        failed_at >= 1,
        "the first megabyte fit and should have succeeded"
    );
    // What was acknowledged is there.
    for i in 0..failed_at {
        assert!(
            c.read(100 + i, i * MIB, MIB as u32).unwrap() == chunk,
            "acknowledged MiB {i} lost"
        );
    }
    // Fail-stop: the failed write makes every later flush fail, and FUA writes too.
    for cookie in [200u64, 201] {
        c.request(0, CMD_FLUSH, cookie, 0, 0, &[]).unwrap();
        let (err, got) = c.simple_reply().unwrap();
        assert_eq!(got, cookie);
        assert_ne!(err, 0, "FLUSH succeeded after a write was lost");
    }
    assert_ne!(
        c.write(202, 0, &chunk[..4096], CMD_FLAG_FUA),
        0,
        "FUA write succeeded after a lost write"
    );
    // A new connection sees the same latched state; reads still work.
    let (mut c2, _) = Client::connect_go(&d.sock);
    c2.request(0, CMD_FLUSH, 1, 0, 0, &[]).unwrap();
    assert_ne!(
        c2.simple_reply().unwrap().0,
        0,
        "FLUSH on a new connection succeeded"
    );
    assert!(c2.read(2, 0, 4096).unwrap() == chunk[..4096]);
    drop((c, c2));
    drop(d);
    drop(fs);
}
