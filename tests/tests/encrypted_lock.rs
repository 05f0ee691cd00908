//! Lock and unlock of a running daemon through `nbdcryptctl`: what a locked daemon tells NBD
//! clients, wrong passphrases (exit 3) and their rate limit (exit 4), `lock` refused while a
//! client is attached, `lock --force` in the middle of a write stream, and `status --json`.

use nbdcrypt_tests::raw::*;
use nbdcrypt_tests::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PASS: &[u8] = b"lock-test passphrase";
const BLOCK: usize = 4096;

/// A fresh volume (pbkdf2, cheap) of `data` bytes, served, still locked.
fn locked_volume(data: u64, sector_size: u32) -> (Daemon, PathBuf) {
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, data, sector_size, "pbkdf2", PASS);
    let d = Daemon::volume_in(dir, &img, &[]);
    (d, img)
}

#[track_caller]
fn expect_code(out: &Out, code: i32, what: &str) {
    assert_eq!(
        out.code(),
        Some(code),
        "{what}: expected exit {code}\n{}",
        out.details()
    );
}

/// A child process killed (and reaped) on drop.
struct Bg(Option<Child>);

impl Bg {
    /// Wait up to `timeout` for it to exit; returns its output.
    fn finish(&mut self, timeout: Duration) -> (std::process::ExitStatus, String, String) {
        let mut child = self.0.take().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if child.try_wait().unwrap().is_some() {
                let o = child.wait_with_output().unwrap();
                return (
                    o.status,
                    String::from_utf8_lossy(&o.stdout).into_owned(),
                    String::from_utf8_lossy(&o.stderr).into_owned(),
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let o = child.wait_with_output().unwrap();
                panic!(
                    "background process did not finish within {timeout:?}\n---- stdout ----\n{}\n---- stderr ----\n{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[track_caller]
fn wait_for_file(p: &Path, timeout: Duration, bg: &mut Bg) {
    let deadline = Instant::now() + timeout;
    while !p.exists() {
        if let Some(c) = bg.0.as_mut() {
            if c.try_wait().unwrap().is_some() {
                let (st, so, se) = bg.finish(Duration::from_secs(1));
                panic!(
                    "background client exited ({st}) before creating {}\n{so}\n{se}",
                    p.display()
                );
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} did not appear within {timeout:?}",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn a_locked_daemon_offers_no_export_and_its_info_and_go_errors_say_locked() {
    let (d, _img) = locked_volume(MIB, 4096);
    assert_eq!(d.state(), "locked");
    nbdinfo(&[&d.uri()]).failure();
    let mut c = Client::connect(&d.sock);
    for name in [EXPORT, ""] {
        for opt in [OPT_INFO, OPT_GO] {
            let (last, _) = c.option(opt, &info_payload(name, &[INFO_BLOCK_SIZE]));
            assert_eq!(
                last.typ, REP_ERR_UNKNOWN,
                "option {opt} for export {name:?} while locked: expected ERR_UNKNOWN, got {last:?}"
            );
            let text = String::from_utf8_lossy(&last.data).to_lowercase();
            assert!(
                text.contains("locked"),
                "option {opt} for {name:?}: error text {text:?} does not say locked"
            );
        }
    }
    // The refusal is an option error, not a hang-up: after unlocking, the same connection can GO.
    let out = d.unlock(PASS);
    expect_code(&out, 0, "unlock");
    let e = c.go(EXPORT);
    assert_eq!(e.size, MIB);
    c.read(1, 0, 4096)
        .expect("READ after GO on the connection that was refused while locked");
}

#[test]
fn nbdsh_opt_info_on_a_locked_export_fails_and_succeeds_once_unlocked() {
    let (d, _img) = locked_volume(MIB, 512);
    let script = r#"
        h.set_opt_mode(True)
        h.connect_uri(URI)
        e = expect_err(lambda: h.opt_info(), errno.ENOENT, "opt_info while locked")
        print("locked error:", e.string)
        h.opt_abort()
        "#;
    nbdsh(&d.uri(), script).success();
    expect_code(&d.unlock(PASS), 0, "unlock");
    nbdsh(
        &d.uri(),
        r#"
        h.set_opt_mode(True)
        h.connect_uri(URI)
        h.opt_info()
        assert h.get_size() == 1048576, h.get_size()
        assert h.get_block_size(nbd.SIZE_PREFERRED) == 512, h.get_block_size(nbd.SIZE_PREFERRED)
        h.opt_abort()
        "#,
    )
    .success();
}

#[test]
fn a_wrong_passphrase_exits_3_and_keeps_the_volume_locked_and_repeated_ones_are_rate_limited_with_exit_4(
) {
    let (d, _img) = locked_volume(MIB, 4096);
    let start = Instant::now();
    let mut codes = Vec::new();
    // Policy: three free attempts, then waits of 1, 2, 4 ... s. Stop at the first exit 4 (or
    // after 8 attempts, which would already be a failure).
    for i in 0..8 {
        let out = d.unlock(format!("wrong passphrase {i}").as_bytes());
        codes.push(out.code());
        match out.code() {
            Some(3) => {
                assert!(out.stderr.contains("wrong passphrase"), "{}", out.details());
            }
            Some(4) => {
                assert!(
                    out.stderr.to_lowercase().contains("try again"),
                    "exit 4 must say when to retry\n{}",
                    out.details()
                );
                break;
            }
            _ => panic!(
                "unlock with a wrong passphrase: exit {:?}\n{}",
                out.code(),
                out.details()
            ),
        }
        assert_eq!(d.state(), "locked", "after wrong passphrase {i}");
    }
    assert_eq!(
        codes[..3],
        [Some(3), Some(3), Some(3)],
        "the first three wrong passphrases: {codes:?}"
    );
    assert_eq!(
        codes.last(),
        Some(&Some(4)),
        "repeated wrong passphrases were never rate limited: {codes:?}"
    );
    assert_eq!(d.state(), "locked");
    nbdinfo(&[&d.uri()]).failure();
    // The limit is temporary: the right passphrase gets through within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = d.unlock(PASS);
        match out.code() {
            Some(0) => break,
            Some(4) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(250)),
            _ => panic!(
                "unlock with the right passphrase after the rate limit\n{}",
                out.details()
            ),
        }
    }
    assert_eq!(d.state(), "unlocked");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn lock_without_force_is_refused_with_exit_4_while_an_nbdsh_client_is_attached_and_the_client_keeps_working(
) {
    let (d, img) = locked_volume(MIB, 4096);
    expect_code(&d.unlock(PASS), 0, "unlock");
    let ready = d.dir().join("client.ready");
    let go = d.dir().join("client.go");
    let script = dedent(
        r#"
        import os, time
        URI = os.environ["NBD_URI"]
        h.connect_uri(URI)
        h.pwrite(b"\xab" * 5000, 3000)
        h.flush()
        open(os.environ["READY"], "w").close()
        deadline = time.monotonic() + 40
        while not os.path.exists(os.environ["GO"]):
            assert time.monotonic() < deadline, "never told to go on"
            time.sleep(0.02)
        # Still attached and working after the refused lock.
        assert h.pread(5000, 3000) == b"\xab" * 5000
        h.pwrite(b"\xcd" * 100, 100000)
        h.flush()
        assert h.pread(100, 100000) == b"\xcd" * 100
        h.shutdown()
        print("client ok")
        "#,
    );
    let mut bg = Bg(Some(
        tool("nbdsh")
            .arg("-c")
            .arg(&script)
            .env("NBD_URI", d.uri())
            .env("READY", &ready)
            .env("GO", &go)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nbdsh"),
    ));
    wait_for_file(&ready, Duration::from_secs(30), &mut bg);

    d.wait_clients(1); // status counts the attached nbdsh client
    let s = d.status();
    assert_eq!(s["state"], "unlocked", "{s:#}");
    assert_eq!(
        s["clients"], 1,
        "status must count the attached nbdsh client: {s:#}"
    );

    let out = d.ctl("lock", &[]);
    expect_code(&out, 4, "lock without --force while a client is attached");
    assert!(
        out.stderr.contains("attached"),
        "the refusal should say clients are attached\n{}",
        out.details()
    );
    assert_eq!(
        d.state(),
        "unlocked",
        "a refused lock must leave the volume unlocked"
    );
    // Others can still attach.
    nbdinfo(&[&d.uri()]).success();

    std::fs::write(&go, b"").unwrap();
    let (st, so, se) = bg.finish(Duration::from_secs(40));
    assert!(
        st.success() && so.contains("client ok"),
        "the attached client stopped working after the refused lock: {st}\n{so}\n{se}"
    );

    // Once it has gone, lock works without --force.
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.status()["clients"] != 0 {
        assert!(
            Instant::now() < deadline,
            "client count did not drop to 0: {:#}",
            d.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    expect_code(&d.lock_idle(), 0, "lock after the client left");
    d.wait_state("locked", Duration::from_secs(10));
    // And what the client wrote is on disk, as the independent decryptor sees it.
    let plain = verify_py_plaintext(&img, &luks_volume_key(&img, PASS));
    assert_eq!(plain[3000..8000], [0xab; 5000][..]);
    assert_eq!(plain[100000..100100], [0xcd; 100][..]);
}

#[test]
fn lock_force_during_an_nbdcopy_write_stream_keeps_the_daemon_up_locks_and_leaves_every_block_old_or_new(
) {
    const DATA: u64 = 32 * MIB;
    let (mut d, _img) = locked_volume(DATA, 4096);
    expect_code(&d.unlock(PASS), 0, "unlock");
    let old = random_bytes(21, DATA as usize);
    write_export(&d.uri(), d.dir(), &old); // completed (and flushed) before the stream
    let new = random_bytes(22, DATA as usize);
    let written_before = d.status()["bytes_written"].as_u64().expect("bytes_written") as usize;

    // nbdcopy from a pipe we feed slowly, so the lock lands in the middle of the stream.
    let mut child = tool("nbdcopy")
        .arg("-")
        .arg(d.uri())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nbdcopy");
    let mut stdin = child.stdin.take().unwrap();
    let mut bg = Bg(Some(child));
    let fed = Arc::new(AtomicUsize::new(0));
    let feeder = {
        let new = new.clone();
        let fed = fed.clone();
        std::thread::spawn(move || {
            for chunk in new.chunks(256 * 1024) {
                if stdin.write_all(chunk).is_err() {
                    return; // nbdcopy has gone (the lock disconnected it)
                }
                fed.fetch_add(chunk.len(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(25));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while (d.status()["bytes_written"].as_u64().unwrap_or(0) as usize)
        < written_before + 4 * MIB as usize
    {
        assert!(
            Instant::now() < deadline,
            "the stream did not get going: fed {} bytes; {:#}",
            fed.load(Ordering::Relaxed),
            d.status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = d.ctl("lock", &["--force"]);
    let fed_at_lock = fed.load(Ordering::Relaxed);
    assert!(
        matches!(out.code(), Some(0) | Some(4)),
        "lock --force during the stream: exit {:?}\n{}",
        out.code(),
        out.details()
    );
    let (st, so, se) = bg.finish(Duration::from_secs(30));
    feeder.join().unwrap();
    d.assert_alive();
    d.wait_state("locked", Duration::from_secs(20));
    let s = d.status();
    assert_eq!(s["clients"], 0, "{s:#}");
    assert!(
        fed_at_lock >= 4 * MIB as usize,
        "the lock came before 4 MiB of the stream were fed"
    );
    nbdinfo(&[&d.uri()]).failure();

    expect_code(&d.unlock(PASS), 0, "unlock after the forced lock");
    let got = read_export(&d.uri(), d.dir());
    assert_eq!(got.len(), DATA as usize);
    let mut n_new = 0;
    for (i, ((g, o), n)) in got
        .chunks(BLOCK)
        .zip(old.chunks(BLOCK))
        .zip(new.chunks(BLOCK))
        .enumerate()
    {
        if g == n {
            n_new += 1;
        } else {
            assert!(
                g == o,
                "block {i} (offset {}) is neither the old nor the new data: torn or garbage",
                i * BLOCK
            );
        }
    }
    if st.success() {
        assert_eq!(
            n_new,
            got.len() / BLOCK,
            "nbdcopy reported success, so all of its data must be there\n{so}\n{se}"
        );
    }
    eprintln!(
        "nbdcopy: {st}; {n_new} of {} blocks new; fed {fed_at_lock} bytes at the lock",
        got.len() / BLOCK
    );
}

#[test]
fn lock_force_keeps_every_write_acknowledged_before_it() {
    const DATA: u64 = 8 * MIB;
    let (mut d, img) = locked_volume(DATA, 4096);
    expect_code(&d.unlock(PASS), 0, "unlock");
    let blocks = DATA as usize / BLOCK;
    let block_data = |i: usize| random_bytes(0x1000 + i as u64, BLOCK);
    let acked: Arc<Mutex<Vec<usize>>> = Arc::new(Mutex::new(Vec::new()));
    let (mut c, _) = Client::connect_go(&d.sock);
    let writer = {
        let acked = acked.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            for i in 0..blocks {
                if Instant::now() > deadline {
                    break;
                }
                if c.request(
                    0,
                    CMD_WRITE,
                    i as u64,
                    (i * BLOCK) as u64,
                    BLOCK as u32,
                    &block_data(i),
                )
                .is_err()
                {
                    break;
                }
                match c.simple_reply() {
                    Ok((0, cookie)) => {
                        assert_eq!(cookie, i as u64);
                        acked.lock().unwrap().push(i);
                    }
                    Ok((_err, _)) => {} // refused during the lock: not acknowledged
                    Err(_) => break,    // disconnected by the lock
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.lock().unwrap().len() < 100 {
        assert!(Instant::now() < deadline, "writer made no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = d.ctl("lock", &["--force"]);
    assert!(
        matches!(out.code(), Some(0) | Some(4)),
        "lock --force: {:?}\n{}",
        out.code(),
        out.details()
    );
    writer.join().unwrap();
    d.assert_alive();
    d.wait_state("locked", Duration::from_secs(20));
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() < blocks,
        "the writer finished before the lock; nothing was tested"
    );

    // The independent decryptor sees every acknowledged block on disk...
    let plain = verify_py_plaintext(&img, &luks_volume_key(&img, PASS));
    for &i in &acked {
        assert!(
            plain[i * BLOCK..(i + 1) * BLOCK] == block_data(i)[..],
            "acknowledged block {i} is not on disk after the forced lock"
        );
    }
    // ...and so does NBD after unlocking again.
    expect_code(&d.unlock(PASS), 0, "unlock after the forced lock");
    let got = read_export(&d.uri(), d.dir());
    for &i in &acked {
        assert!(
            got[i * BLOCK..(i + 1) * BLOCK] == block_data(i)[..],
            "acknowledged block {i} does not read back after unlock"
        );
    }
}

#[test]
fn status_json_reports_state_the_luks_uuid_sector_size_and_the_attached_client_count() {
    let (d, img) = locked_volume(2 * MIB, 512);
    let uuid = luks_uuid(&img);
    let s = d.status();
    assert_eq!(s["state"], "locked", "{s:#}");
    assert_eq!(s["volume_uuid"].as_str(), Some(uuid.as_str()), "{s:#}");
    assert_eq!(s["sector_size"], 512, "{s:#}");
    assert_eq!(s["clients"], 0, "{s:#}");
    assert_eq!(s["cipher"], "aes-xts-plain64", "{s:#}");
    assert_eq!(s["export_name"], EXPORT, "{s:#}");

    expect_code(&d.unlock(PASS), 0, "unlock");
    let (mut c1, _) = Client::connect_go(&d.sock);
    let (c2, _) = Client::connect_go(&d.sock);
    c1.read(1, 0, 512).unwrap();
    d.wait_clients(2); // two raw clients in transmission
    let s = d.status();
    assert_eq!(s["state"], "unlocked", "{s:#}");
    assert_eq!(s["volume_uuid"].as_str(), Some(uuid.as_str()), "{s:#}");
    assert_eq!(s["size"], 2 * MIB, "{s:#}");
    assert_eq!(s["clients"], 2, "two raw clients in transmission: {s:#}");
    drop(c1);
    drop(c2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.status()["clients"] != 0 {
        assert!(
            Instant::now() < deadline,
            "clients did not drop to 0: {:#}",
            d.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn while_an_unlock_derives_the_key_status_says_unlocking_and_lock_or_a_second_unlock_exit_4() {
    // A deliberately slow keyslot (pbkdf2, 200k iterations) keeps the first unlock busy.
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format_args(
        &img,
        16 * MIB + MIB,
        PASS,
        &["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "200000"],
    );
    let d = Arc::new(Daemon::volume_in(dir, &img, &[]));
    let first = {
        let d = d.clone();
        std::thread::spawn(move || d.unlock(PASS))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = d.status();
        if s["state"] == "unlocking" {
            break;
        }
        assert!(
            s["state"] == "locked" && Instant::now() < deadline,
            "never saw state unlocking: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let lock = d.ctl("lock", &[]);
    let second = d.unlock(PASS);
    let s = d.status();
    nbdinfo(&[&d.uri()]).failure();
    let first = first.join().unwrap();
    expect_code(&first, 0, "the first unlock");
    // Only meaningful if the two requests above really overlapped the first unlock.
    if s["state"] == "unlocking" {
        expect_code(&lock, 4, "lock while an unlock is in progress");
        expect_code(&second, 4, "a second unlock while one is in progress");
        assert!(
            second.stderr.contains("in progress"),
            "{}",
            second.details()
        );
    }
    assert_eq!(d.state(), "unlocked");
    nbdinfo(&[&d.uri()]).success();
}

#[test]
fn lock_force_with_a_queue_of_pipelined_writes_keeps_every_acknowledged_one_and_answers_or_drops_the_rest(
) {
    // Up to 32 writes in flight on one connection when the forced lock arrives: each must be
    // answered before the disconnect or not at all, and every one answered with success must be
    // on disk (as the independent decryptor sees it) and read back after the next unlock.
    const DATA: u64 = 16 * MIB;
    const DEPTH: usize = 32;
    let (mut d, img) = locked_volume(DATA, 512);
    expect_code(&d.unlock(PASS), 0, "unlock");
    let blocks = DATA as usize / BLOCK;
    let block_data = |i: usize| random_bytes(0x2000 + i as u64, BLOCK);
    let (c, _) = Client::connect_go(&d.sock);
    let rd = c.s.try_clone().unwrap();
    let acked: Arc<Mutex<Vec<usize>>> = Arc::new(Mutex::new(Vec::new()));
    let (credit_tx, credit_rx) = std::sync::mpsc::sync_channel::<()>(DEPTH);
    let writer = std::thread::spawn(move || {
        let mut c = c;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut sent = 0;
        for i in 0..blocks {
            if Instant::now() > deadline || credit_tx.send(()).is_err() {
                break;
            }
            if c.request(
                0,
                CMD_WRITE,
                i as u64,
                (i * BLOCK) as u64,
                BLOCK as u32,
                &block_data(i),
            )
            .is_err()
            {
                break;
            }
            sent += 1;
        }
        sent
    });
    let reader = {
        let acked = acked.clone();
        std::thread::spawn(move || {
            let mut c = Client {
                s: rd,
                server_flags: 0,
            };
            let mut errors = 0;
            while let Ok((err, cookie)) = c.simple_reply() {
                let _ = credit_rx.try_recv();
                if err == 0 {
                    acked.lock().unwrap().push(cookie as usize);
                } else {
                    errors += 1;
                }
            }
            drop(credit_rx);
            errors
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.lock().unwrap().len() < 300 {
        assert!(Instant::now() < deadline, "writer made no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    let out = d.ctl("lock", &["--force"]);
    assert!(
        matches!(out.code(), Some(0) | Some(4)),
        "lock --force: {:?}\n{}",
        out.code(),
        out.details()
    );
    let errors = reader.join().unwrap();
    let sent = writer.join().unwrap();
    d.assert_alive();
    d.wait_state("locked", Duration::from_secs(20));
    let acked = acked.lock().unwrap().clone();
    assert!(
        sent < blocks,
        "the writer finished before the lock; nothing was tested"
    );
    eprintln!(
        "sent {sent}, acknowledged {}, refused {errors}",
        acked.len()
    );

    let plain = verify_py_plaintext(&img, &luks_volume_key(&img, PASS));
    let missing: Vec<usize> = acked
        .iter()
        .copied()
        .filter(|&i| plain[i * BLOCK..(i + 1) * BLOCK] != block_data(i)[..])
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged blocks are not on disk after the forced lock: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    expect_code(&d.unlock(PASS), 0, "unlock after the forced lock");
    let got = read_export(&d.uri(), d.dir());
    for &i in &acked {
        assert!(
            got[i * BLOCK..(i + 1) * BLOCK] == block_data(i)[..],
            "acknowledged block {i} does not read back after unlock"
        );
    }
}

/// The number of seconds in "... in N s" of a message.
fn seconds_in(msg: &str) -> Option<u64> {
    let i = msg.rfind(" in ")?;
    msg[i + 4..].split_whitespace().next()?.parse().ok()
}

#[test]
fn the_wait_after_wrong_passphrases_doubles_1_then_2_then_4_seconds() {
    let (d, _img) = locked_volume(MIB, 4096);
    let mut waits = Vec::new();
    for i in 0..5 {
        let out = d.unlock(format!("wrong {i}").as_bytes());
        expect_code(
            &out,
            3,
            &format!("wrong passphrase {i} (after waiting out the limit)"),
        );
        if i < 2 {
            assert!(
                seconds_in(&out.stderr).is_none(),
                "no wait after only {} failures: {}",
                i + 1,
                out.stderr
            );
            continue;
        }
        let wait = seconds_in(&out.stderr).unwrap_or_else(|| {
            panic!("failure {} should say when to retry: {}", i + 1, out.stderr)
        });
        // Trying at once is refused with exit 4 and the same advice.
        let early = d.unlock(PASS);
        expect_code(
            &early,
            4,
            "an attempt inside the wait (even with the right passphrase)",
        );
        assert!(
            seconds_in(&early.stderr).is_some_and(|s| s <= wait),
            "{}",
            early.stderr
        );
        waits.push(wait);
        if i < 4 {
            std::thread::sleep(Duration::from_millis(wait * 1000 + 150));
        }
    }
    assert_eq!(waits, [1, 2, 4], "waits after failures 3, 4, 5");
    assert_eq!(d.state(), "locked");
}

#[test]
fn lock_force_does_not_wait_for_a_client_stalled_mid_request_and_its_half_sent_write_is_not_applied(
) {
    let (d, img) = locked_volume(MIB, 4096);
    expect_code(&d.unlock(PASS), 0, "unlock");
    let key = luks_volume_key(&img, PASS);
    // A WRITE whose header and first half of payload arrive, the rest never: not a complete
    // request, so nothing to finish; the forced lock must not hang on it.
    let (mut c, _) = Client::connect_go(&d.sock);
    c.read(1, 0, 4096).expect("READ before the stall");
    let before = read_export(&d.uri(), d.dir());
    let payload = random_bytes(55, 8192);
    let mut req = Vec::new();
    req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&CMD_WRITE.to_be_bytes());
    req.extend_from_slice(&77u64.to_be_bytes());
    req.extend_from_slice(&8192u64.to_be_bytes());
    req.extend_from_slice(&8192u32.to_be_bytes());
    c.send(&req).unwrap();
    c.send(&payload[..4096]).unwrap();
    std::thread::sleep(Duration::from_millis(200));

    let out = d.ctl("lock", &["--force"]);
    assert!(
        matches!(out.code(), Some(0) | Some(4)),
        "lock --force: {:?}\n{}",
        out.code(),
        out.details()
    );
    d.wait_state("locked", Duration::from_secs(20));
    assert!(
        c.closed_within(Duration::from_secs(10)),
        "the stalled client was not disconnected by the forced lock"
    );
    // Sending the rest now reaches nobody.
    let _ = c.send(&payload[4096..]);
    assert!(
        c.simple_reply().is_err(),
        "a reply came for a write finished after the forced lock"
    );

    let plain = verify_py_plaintext(&img, &key);
    assert_same_bytes(
        &plain,
        &before,
        "the image after a half-sent write and a forced lock",
    );
    expect_code(&d.unlock(PASS), 0, "unlock");
    assert_same_bytes(
        &read_export(&d.uri(), d.dir()),
        &before,
        "the export after unlocking again",
    );
}

#[test]
fn lock_force_with_a_client_that_does_not_read_its_replies_ends_locked_and_the_daemon_stays_responsive(
) {
    // Replies to 8 big READs fill the socket buffer while the client reads nothing: the requests
    // cannot finish. The forced lock either cuts the client off or reports busy (exit 4, state
    // `locking`) after its 10 s drain; either way the daemon keeps answering the control socket,
    // refuses new clients, and is locked once the client goes away.
    let (d, _img) = locked_volume(4 * MIB, 4096);
    expect_code(&d.unlock(PASS), 0, "unlock");
    let (mut c, _) = Client::connect_go(&d.sock);
    for i in 0..8u64 {
        c.request(0, CMD_READ, i, 0, 4 * MIB as u32, &[]).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let out = d.ctl("lock", &["--force"]);
    assert!(
        matches!(out.code(), Some(0) | Some(4)),
        "lock --force: {:?}\n{}",
        out.code(),
        out.details()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(25),
        "lock --force took {:?}",
        t0.elapsed()
    );
    let s = d.status();
    assert!(s["state"] == "locked" || s["state"] == "locking", "{s:#}");
    if out.code() == Some(4) {
        assert_eq!(s["state"], "locking", "busy means still locking: {s:#}");
        assert!(
            out.stderr.contains("status"),
            "exit 4 should point at `nbdcryptctl status`\n{}",
            out.details()
        );
        let mut other = Client::connect(&d.sock);
        let (last, _) = other.option(OPT_GO, &info_payload(EXPORT, &[]));
        assert!(last.is_error(), "GO while locking: {last:?}");
        expect_code(&d.unlock(PASS), 4, "unlock while locking");
    }
    drop(c);
    d.wait_state("locked", Duration::from_secs(20));
    expect_code(&d.unlock(PASS), 0, "unlock after the client left");
    nbdinfo(&[&d.uri()]).success();
}

#[test]
fn while_locked_list_offers_no_export_and_export_name_closes_the_connection() {
    let (d, _img) = locked_volume(MIB, 4096);
    let mut c = Client::connect(&d.sock);
    // A locked volume offers no export: LIST answers, with nothing in it.
    assert!(
        c.list().is_empty(),
        "LIST named an export while the volume is locked"
    );
    // NBD_OPT_EXPORT_NAME has no error reply: the server can only hang up.
    c.send_opt(OPT_EXPORT_NAME, EXPORT.as_bytes()).unwrap();
    assert!(
        c.closed_within(Duration::from_secs(10)),
        "EXPORT_NAME of a locked export did not close the connection"
    );
    expect_code(&d.unlock(PASS), 0, "unlock");
    let mut c = Client::connect(&d.sock);
    assert!(c.list().iter().any(|n| n == EXPORT), "LIST after unlock");
}
