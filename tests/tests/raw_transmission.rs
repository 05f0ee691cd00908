//! Transmission phase on the wire, with a hand-written client (no libnbd): error values, stream
//! sync after rejected requests, hard disconnects for broken peers, and that a broken
//! connection never takes the server (or another client) down.

use nbdcrypt_tests::raw::*;
use nbdcrypt_tests::*;
use std::collections::HashSet;
use std::net::Shutdown;
use std::time::Duration;

const SIZE: u64 = 8 * MIB;

fn daemon() -> Daemon {
    Daemon::plain(SIZE, &[])
}

#[test]
fn an_unknown_command_gets_einval_with_its_cookie_and_the_stream_stays_usable() {
    let d = daemon();
    let (mut c, _) = Client::connect_go(&d.sock);
    c.request(0, 99, 0xdead_beef_0000_0001, 0, 0, &[]).unwrap();
    let (err, cookie) = c.simple_reply().expect("reply to an unknown command");
    assert_eq!((err, cookie), (EINVAL, 0xdead_beef_0000_0001));
    // RESIZE (8) is experimental and not advertised: EINVAL as well.
    c.request(0, 8, 2, SIZE * 2, 0, &[]).unwrap();
    assert_eq!(c.simple_reply().unwrap(), (EINVAL, 2));
    assert_eq!(c.write(3, 0, &[1; 4096], 0), 0);
    assert_eq!(c.read(4, 0, 4096).unwrap(), vec![1; 4096]);
}

#[test]
fn unknown_or_unadvertised_flags_get_einval_and_fua_on_a_read_is_accepted() {
    let d = daemon();
    let (mut c, e) = Client::connect_go(&d.sock);
    assert_eq!(
        e.flags & TF_SEND_DF,
        0,
        "SEND_DF must be clear without structured replies"
    );
    c.request(1 << 15, CMD_READ, 1, 0, 512, &[]).unwrap();
    assert_eq!(
        c.simple_reply().unwrap(),
        (EINVAL, 1),
        "unknown flag bit 15 on READ"
    );
    c.request(CMD_FLAG_NO_HOLE, CMD_READ, 2, 0, 512, &[])
        .unwrap();
    assert_eq!(
        c.simple_reply().unwrap(),
        (EINVAL, 2),
        "NO_HOLE is only for WRITE_ZEROES"
    );
    c.request(CMD_FLAG_DF, CMD_READ, 3, 0, 512, &[]).unwrap();
    assert_eq!(
        c.simple_reply().unwrap(),
        (EINVAL, 3),
        "DF without structured replies"
    );
    // A WRITE with a bad flag: its payload must be drained before the next request is parsed.
    let payload = fake_requests_payload(4096);
    c.request(1 << 14, CMD_WRITE, 4, 0, 4096, &payload).unwrap();
    assert_eq!(
        c.simple_reply().unwrap(),
        (EINVAL, 4),
        "unknown flag on WRITE"
    );
    // FUA is accepted on any command (clients set it on reads too).
    c.request(CMD_FLAG_FUA, CMD_READ, 5, 0, 512, &[]).unwrap();
    assert_eq!(c.simple_reply().unwrap(), (0, 5));
    assert_eq!(c.read_n(512).unwrap(), vec![0; 512]);
    assert_eq!(
        read_at(&d.image, 0, 4096),
        vec![0; 4096],
        "rejected WRITE changed data"
    );
}

/// A payload that is itself a sequence of valid-looking READ requests with cookie 0xbad: if the
/// server forgot to drain it, it would answer them.
fn fake_requests_payload(len: usize) -> Vec<u8> {
    let mut v = Vec::new();
    while v.len() < len {
        v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        v.extend_from_slice(&0u16.to_be_bytes());
        v.extend_from_slice(&CMD_READ.to_be_bytes());
        v.extend_from_slice(&0xbadu64.to_be_bytes());
        v.extend_from_slice(&0u64.to_be_bytes());
        v.extend_from_slice(&4u32.to_be_bytes());
    }
    v.truncate(len);
    v
}

#[test]
fn a_write_past_the_end_gets_enospc_and_its_payload_is_drained() {
    let d = daemon();
    let (mut c, _) = Client::connect_go(&d.sock);
    for (cookie, off, len) in [
        (1u64, SIZE, 4096u32),
        (2, SIZE - 2048, 4096),
        (3, u64::MAX - 1000, 4096),
        (4, SIZE + 1, 65536),
    ] {
        c.request(
            0,
            CMD_WRITE,
            cookie,
            off,
            len,
            &fake_requests_payload(len as usize),
        )
        .unwrap();
        let (err, got) = c.simple_reply().expect("reply to a WRITE past the end");
        assert_eq!((err, got), (ENOSPC, cookie), "WRITE at {off} len {len}");
    }
    // The next request on the same connection is parsed correctly.
    assert_eq!(c.read(5, SIZE - 4096, 4096).unwrap(), vec![0; 4096]);
    assert_eq!(c.write(6, SIZE - 4096, &[9; 4096], 0), 0);
    assert_eq!(read_at(&d.image, SIZE - 4096, 4096), vec![9; 4096]);
    assert_eq!(
        std::fs::metadata(&d.image).unwrap().len(),
        SIZE,
        "backing file grew"
    );
}

#[test]
fn a_read_past_the_end_gets_einval_and_no_data() {
    let d = daemon();
    let (mut c, _) = Client::connect_go(&d.sock);
    assert_eq!(c.read(1, SIZE, 512), Err(EINVAL));
    assert_eq!(c.read(2, SIZE - 512, 1024), Err(EINVAL));
    assert_eq!(
        c.read(3, u64::MAX - 100, 4096),
        Err(EINVAL),
        "offset + length overflows"
    );
    // If the server had sent data after an error header, this reply would be misparsed.
    assert_eq!(c.read(4, SIZE - 512, 512).unwrap(), vec![0; 512]);
}

#[test]
fn a_read_only_export_answers_a_write_with_eperm_and_drains_its_payload() {
    let data = random_bytes(4, SIZE as usize);
    let d = Daemon::plain_with(&data, &["--read-only"]);
    let (mut c, e) = Client::connect_go(&d.sock);
    assert_ne!(e.flags & TF_READ_ONLY, 0, "READ_ONLY flag");
    assert_eq!(e.flags & TF_SEND_TRIM, 0);
    c.request(0, CMD_WRITE, 1, 0, 8192, &fake_requests_payload(8192))
        .unwrap();
    assert_eq!(c.simple_reply().unwrap(), (EPERM, 1));
    c.request(0, CMD_WRITE_ZEROES, 2, 0, 8192, &[]).unwrap();
    assert_eq!(c.simple_reply().unwrap(), (EPERM, 2));
    assert_eq!(c.read(3, 0, 8192).unwrap(), data[..8192].to_vec());
    drop(c);
    assert!(
        std::fs::read(&d.image).unwrap() == data,
        "read-only export changed its file"
    );
}

#[test]
fn a_bad_request_magic_closes_that_connection_and_others_are_served() {
    let d = daemon();
    let (mut other, _) = Client::connect_go(&d.sock);
    let (mut c, _) = Client::connect_go(&d.sock);
    let mut req = Vec::new();
    req.extend_from_slice(&0x2560_9514u32.to_be_bytes()); // a historic, never valid magic
    req.extend_from_slice(&[0u8; 24]);
    c.send(&req).unwrap();
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "bad magic must hard-disconnect"
    );
    // The connection opened before is unaffected.
    assert_eq!(other.write(1, 0, &[7; 512], 0), 0);
    assert_eq!(other.read(2, 0, 512).unwrap(), vec![7; 512]);
    assert_server_serves(&d.sock);
}

#[test]
fn an_oversized_write_closes_that_connection_only() {
    let d = daemon();
    let (mut other, _) = Client::connect_go(&d.sock);
    let (mut c, _) = Client::connect_go(&d.sock);
    // 32 MiB + 1 byte of payload announced; send only the header.
    let _ = c.request(0, CMD_WRITE, 1, 0, (32 << 20) + 1, &[]);
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "a WRITE payload above 32 MiB must close the connection (not be buffered)"
    );
    let (mut c2, _) = Client::connect_go(&d.sock);
    let _ = c2.request(0, CMD_WRITE, 1, 0, u32::MAX, &[1; 4096]); // may hit a closed socket
    assert!(
        c2.closed_within(Duration::from_secs(5)),
        "4 GiB WRITE must close the connection"
    );
    assert_eq!(other.read(2, 0, 512).unwrap(), vec![0; 512]);
    assert_server_serves(&d.sock);
}

#[test]
fn a_write_of_exactly_32_mib_is_accepted() {
    let d = Daemon::plain(64 * MIB, &[]);
    let (mut c, _) = Client::connect_go(&d.sock);
    let data = random_bytes(32, 32 << 20);
    assert_eq!(c.write(1, 16 * MIB, &data, CMD_FLAG_FUA), 0);
    assert!(
        c.read(2, 16 * MIB, 32 << 20).unwrap() == data,
        "32 MiB read back differs"
    );
    assert!(
        read_at(&d.image, 16 * MIB, 32 << 20) == data,
        "backing file differs"
    );
}

#[test]
fn garbage_after_go_closes_that_connection_only() {
    let d = daemon();
    let (mut c, _) = Client::connect_go(&d.sock);
    let _ = c.send(&random_bytes(99, 65536));
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "garbage requests must hard-disconnect"
    );
    assert_server_serves(&d.sock);
}

#[test]
fn eof_in_the_middle_of_a_request_or_a_payload_closes_that_connection_only() {
    let d = daemon();
    let (mut c, _) = Client::connect_go(&d.sock);
    c.send(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    c.send(&[0, 0, 0, 1, 0, 0]).unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    assert!(c.closed_within(Duration::from_secs(5)));

    let (mut c, _) = Client::connect_go(&d.sock);
    c.request(0, CMD_WRITE, 1, 0, 65536, &[0x55; 1000]).unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    assert!(c.closed_within(Duration::from_secs(5)));
    assert_server_serves(&d.sock);
    // The partial WRITE was not applied as a full one: nothing past the received bytes changed.
    assert_eq!(read_at(&d.image, 1000, 64536), vec![0; 64536]);
}

#[test]
fn hanging_up_with_replies_in_flight_does_not_hurt_the_server() {
    let d = daemon();
    for round in 0..3u64 {
        let (mut c, _) = Client::connect_go(&d.sock);
        for i in 0..64u64 {
            c.request(0, CMD_READ, i, (i % 8) * MIB, 1 << 20, &[])
                .unwrap();
        }
        for i in 0..16u64 {
            c.request(0, CMD_WRITE, 100 + i, i * 4096, 4096, &[round as u8; 4096])
                .unwrap();
        }
        drop(c); // close without reading a single reply
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_server_serves(&d.sock);
}

#[test]
fn pipelined_requests_are_all_answered_with_their_own_cookies() {
    let d = daemon();
    let (mut c, _) = Client::connect_go(&d.sock);
    let data = random_bytes(8, SIZE as usize);
    // 64 writes of 128 KiB in one go, then read every reply.
    let chunk = 128 * 1024;
    let mut sent = HashSet::new();
    for (i, part) in data.chunks(chunk).enumerate() {
        let cookie = 0x1000_0000_0000_0000 | i as u64;
        c.request(0, CMD_WRITE, cookie, (i * chunk) as u64, chunk as u32, part)
            .unwrap();
        sent.insert(cookie);
    }
    let mut got = HashSet::new();
    for _ in 0..sent.len() {
        let (err, cookie) = c.simple_reply().expect("write reply");
        assert_eq!(err, 0, "write {cookie:#x}");
        assert!(got.insert(cookie), "cookie {cookie:#x} answered twice");
    }
    assert_eq!(got, sent);
    c.request(0, CMD_FLUSH, 7, 0, 0, &[]).unwrap();
    assert_eq!(c.simple_reply().unwrap(), (0, 7));
    // Pipelined reads: replies may come in any order; each carries its own data.
    for i in 0..32u64 {
        c.request(0, CMD_READ, i, i * 65536 * 3, 65536, &[])
            .unwrap();
    }
    let mut seen = HashSet::new();
    for _ in 0..32 {
        let (err, cookie) = c.simple_reply().unwrap();
        assert_eq!(err, 0);
        assert!(
            cookie < 32 && seen.insert(cookie),
            "unexpected cookie {cookie}"
        );
        let off = (cookie * 65536 * 3) as usize;
        let buf = c.read_n(65536).unwrap();
        assert!(
            buf == data[off..off + 65536],
            "read {cookie} returned other data"
        );
    }
    assert!(std::fs::read(&d.image).unwrap() == data);
}

#[test]
fn disc_finishes_outstanding_writes_and_closes_without_a_reply() {
    let d = daemon();
    let (mut c, _) = Client::connect_go(&d.sock);
    for i in 0..8u64 {
        c.request(0, CMD_WRITE, i, i * 65536, 65536, &[0xa0 + i as u8; 65536])
            .unwrap();
    }
    c.request(0, CMD_DISC, 99, 0, 0, &[]).unwrap();
    let mut answered = HashSet::new();
    loop {
        match c.simple_reply() {
            Ok((err, cookie)) => {
                assert_ne!(cookie, 99, "DISC must not be answered");
                assert_eq!(err, 0);
                answered.insert(cookie);
            }
            Err(e) => {
                assert!(
                    !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "server did not close after DISC: {e}"
                );
                break;
            }
        }
    }
    assert_eq!(
        answered.len(),
        8,
        "every write before DISC must be answered"
    );
    for i in 0..8u64 {
        assert_eq!(
            read_at(&d.image, i * 65536, 65536),
            vec![0xa0 + i as u8; 65536]
        );
    }
    assert_server_serves(&d.sock);
}

#[test]
fn zero_length_requests_do_not_disconnect() {
    let d = daemon();
    let (mut c, _) = Client::connect_go(&d.sock);
    for (cookie, typ) in [
        (1u64, CMD_READ),
        (2, CMD_WRITE),
        (3, CMD_WRITE_ZEROES),
        (4, CMD_CACHE),
    ] {
        c.request(0, typ, cookie, 0, 0, &[]).unwrap();
        let (err, got) = c.simple_reply().expect("reply to a zero-length request");
        assert_eq!(got, cookie);
        assert!(err == 0 || err == EINVAL, "zero-length {typ}: error {err}");
    }
    assert_eq!(c.read(5, 0, 512).unwrap(), vec![0; 512]);
}

#[test]
fn a_structured_read_past_the_end_is_an_error_chunk_not_a_simple_reply() {
    let d = daemon();
    let mut c = Client::connect(&d.sock);
    assert_eq!(c.structured_reply(), REP_ACK);
    let e = c.go(EXPORT);
    assert_ne!(e.flags & TF_SEND_DF, 0, "SEND_DF after structured replies");
    c.request(0, CMD_READ, 1, SIZE, 4096, &[]).unwrap();
    let (flags, typ, cookie, payload) = c.chunk().expect("READ must be answered with chunks");
    assert_eq!(cookie, 1);
    assert!(
        typ == CHUNK_ERROR || typ == CHUNK_ERROR_OFFSET,
        "chunk type {typ:#x}"
    );
    assert_eq!(be32(&payload), EINVAL);
    let msg_len = be16(&payload[4..]) as usize;
    assert!(
        payload.len() >= 6 + msg_len,
        "error message length overruns the chunk"
    );
    if flags & REPLY_FLAG_DONE == 0 {
        let (flags, typ, cookie, _) = c.chunk().unwrap();
        assert_eq!(
            (flags & REPLY_FLAG_DONE, typ, cookie),
            (REPLY_FLAG_DONE, CHUNK_NONE, 1)
        );
    }
    // A DF read of data comes back as a single OFFSET_DATA chunk.
    assert_eq!(
        {
            c.request(0, CMD_WRITE, 2, 8192, 4096, &[3; 4096]).unwrap();
            let h = c.read_n(4).unwrap();
            let magic = be32(&h);
            if magic == SIMPLE_REPLY_MAGIC {
                let r = c.read_n(12).unwrap();
                be32(&r)
            } else {
                let r = c.read_n(16).unwrap();
                let n = be32(&r[12..]) as usize;
                let p = c.read_n(n).unwrap();
                if be16(&r[2..]) == CHUNK_NONE {
                    0
                } else {
                    be32(&p)
                }
            }
        },
        0
    );
    c.request(CMD_FLAG_DF, CMD_READ, 3, 8192 - 512, 8192, &[])
        .unwrap();
    let (flags, typ, cookie, payload) = c.chunk().unwrap();
    assert_eq!((typ, cookie), (CHUNK_OFFSET_DATA, 3));
    assert_eq!(be64(&payload), 8192 - 512);
    let mut want = vec![0u8; 512];
    want.extend_from_slice(&[3; 4096]);
    want.extend_from_slice(&[0; 8192 - 4096 - 512]);
    assert!(payload[8..] == want[..], "DF read content");
    if flags & REPLY_FLAG_DONE == 0 {
        let (flags, typ, _, _) = c.chunk().unwrap();
        assert_eq!(
            (flags & REPLY_FLAG_DONE, typ),
            (REPLY_FLAG_DONE, CHUNK_NONE)
        );
    }
}

#[test]
fn many_broken_clients_in_parallel_leave_good_clients_working() {
    let d = daemon();
    let sock = d.sock.clone();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                for i in 0..10u64 {
                    let (mut c, _) = Client::connect_go(&sock);
                    match (t + i) % 4 {
                        0 => {
                            let _ = c.send(&random_bytes(t * 100 + i, 1000));
                        }
                        1 => {
                            let _ = c.request(0, CMD_WRITE, 1, 0, 1 << 30, &[0; 100]);
                        }
                        2 => {
                            let _ = c.request(0, CMD_READ, 1, 0, 1 << 20, &[]);
                        }
                        _ => {
                            let err = c.write(1, t * 4096, &[t as u8; 4096], 0);
                            assert_eq!(err, 0);
                        }
                    }
                }
            })
        })
        .collect();
    let (mut good, _) = Client::connect_go(&d.sock);
    for i in 0..50u64 {
        let off = 4 * MIB + (i % 16) * 4096;
        assert_eq!(good.write(i, off, &[i as u8; 4096], 0), 0);
        assert_eq!(good.read(1000 + i, off, 4096).unwrap(), vec![i as u8; 4096]);
    }
    for t in threads {
        t.join().expect("client thread");
    }
    assert_server_serves(&d.sock);
}

#[test]
fn payload_less_commands_longer_than_32_mib_are_served() {
    let d = Daemon::plain(64 * MIB, &["--allow-discards"]);
    let (mut c, e) = Client::connect_go(&d.sock);
    assert_ne!(e.flags & TF_SEND_TRIM, 0);
    let len = 48 << 20; // the kernel sends WRITE_ZEROES/TRIM up to 4 GiB - 512
    assert_eq!(c.write(1, 8 * MIB, &[0xff; 65536], 0), 0);
    assert_eq!(c.write(2, 40 * MIB, &[0xff; 65536], 0), 0);
    c.request(0, CMD_WRITE_ZEROES, 3, 4 * MIB, len, &[])
        .unwrap();
    assert_eq!(c.simple_reply().unwrap(), (0, 3), "48 MiB WRITE_ZEROES");
    assert_eq!(c.read(4, 8 * MIB, 65536).unwrap(), vec![0; 65536]);
    assert_eq!(c.read(5, 40 * MIB, 65536).unwrap(), vec![0; 65536]);
    c.request(0, CMD_CACHE, 6, 0, len, &[]).unwrap();
    assert_eq!(c.simple_reply().unwrap(), (0, 6), "48 MiB CACHE");
    c.request(0, CMD_TRIM, 7, 0, len, &[]).unwrap();
    assert_eq!(c.simple_reply().unwrap(), (0, 7), "48 MiB TRIM");
    c.request(
        CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
        CMD_WRITE_ZEROES,
        8,
        0,
        len,
        &[],
    )
    .unwrap();
    assert_eq!(
        c.simple_reply().unwrap(),
        (0, 8),
        "48 MiB WRITE_ZEROES with NO_HOLE|FUA"
    );
    // DF is only for READ.
    c.request(CMD_FLAG_DF, CMD_WRITE_ZEROES, 9, 0, 4096, &[])
        .unwrap();
    assert_eq!(c.simple_reply().unwrap(), (EINVAL, 9));
    assert_eq!(c.read(10, 0, 4096).unwrap(), vec![0; 4096]);
}

#[test]
fn a_read_longer_than_32_mib_keeps_the_connection_in_sync() {
    let d = Daemon::plain(64 * MIB, &[]);
    let (mut c, _) = Client::connect_go(&d.sock);
    let len = (32 << 20) + 4096;
    c.request(0, CMD_READ, 1, 0, len, &[]).unwrap();
    let (err, cookie) = c.simple_reply().expect("reply to a 32 MiB + 4 KiB READ");
    assert_eq!(cookie, 1);
    if err == 0 {
        // Served anyway: then all of it must come.
        assert_eq!(c.read_n(len as usize).unwrap(), vec![0; len as usize]);
    } else {
        assert!(
            err == EINVAL || err == 75, /* EOVERFLOW */
            "error {err}"
        );
    }
    assert_eq!(c.write(2, 0, &[4; 4096], 0), 0);
    assert_eq!(c.read(3, 0, 4096).unwrap(), vec![4; 4096]);
}

/// Pipeline `n` writes of `len` bytes (wrapping around a `region` at `base`) on one connection
/// from a writer thread while this thread reads the replies; panics unless all succeed within
/// the socket timeouts.
fn pipeline_writes(sock: &std::path::Path, base: u64, region: u64, n: u64, len: usize, fill: u8) {
    let (c, _) = Client::connect_go(sock);
    let mut w = Client {
        s: c.s.try_clone().unwrap(),
        server_flags: 0,
    };
    let writer = std::thread::spawn(move || {
        let buf = vec![fill; len];
        for i in 0..n {
            let off = base + (i * len as u64) % region;
            w.request(0, CMD_WRITE, i, off, len as u32, &buf).unwrap();
        }
    });
    let mut r = c;
    let mut seen = HashSet::new();
    for _ in 0..n {
        let (err, cookie) = r
            .simple_reply()
            .expect("write reply (server stalled under a byte budget?)");
        assert_eq!(err, 0);
        assert!(seen.insert(cookie));
    }
    writer.join().unwrap();
}

/// The smallest budget the daemon accepts: one 32 MiB request plus its header.
const MIN_BUDGET: &str = "33558528";

#[test]
fn byte_budgets_smaller_than_one_maximal_request_are_refused_at_startup() {
    let dir = tempdir();
    std::fs::File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(MIB)
        .unwrap();
    for flag in ["--max-conn-bytes", "--max-server-bytes"] {
        let mut cmd = std::process::Command::new(daemon_binary());
        cmd.arg("--plain").arg(dir.path().join("disk.img"));
        cmd.arg("--unix")
            .arg(dir.path().join("s.sock"))
            .args([flag, "1M"]);
        let out = run(&mut cmd, Duration::from_secs(20));
        assert!(
            !out.ok(),
            "{flag} 1M accepted, a 32 MiB request could never be served\n{}",
            out.details()
        );
    }
}

#[test]
fn writes_beyond_the_byte_budgets_are_delayed_not_deadlocked() {
    let d = Daemon::plain(
        64 * MIB,
        &[
            "--max-conn-bytes",
            MIN_BUDGET,
            "--max-server-bytes",
            MIN_BUDGET,
        ],
    );
    // Maximal requests, back to back, on one connection.
    let (mut c, _) = Client::connect_go(&d.sock);
    let big = random_bytes(12, 32 << 20);
    assert_eq!(
        c.write(1, 0, &big, 0),
        0,
        "32 MiB write at the budget limit"
    );
    assert!(
        c.read(2, 0, 32 << 20).unwrap() == big,
        "32 MiB read at the budget limit"
    );
    drop(c);
    // Three connections each pipelining 64 MiB of 4 MiB writes share a 32 MiB server budget.
    let sock = d.sock.clone();
    let threads: Vec<_> = (0..3u64)
        .map(|t| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                pipeline_writes(&sock, t * 16 * MIB, 16 * MIB, 16, 4 << 20, 0x30 + t as u8)
            })
        })
        .collect();
    for t in threads {
        t.join().expect("pipelined writer");
    }
    for t in 0..3u64 {
        let off = t * 16 * MIB;
        assert_eq!(read_at(&d.image, off, 4096), vec![0x30 + t as u8; 4096]);
        assert_eq!(
            read_at(&d.image, off + 16 * MIB - 4096, 4096),
            vec![0x30 + t as u8; 4096]
        );
    }
}

#[test]
fn the_handshake_timeout_does_not_apply_after_go() {
    let d = Daemon::plain(SIZE, &["--handshake-timeout", "1"]);
    let (mut c, _) = Client::connect_go(&d.sock);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        c.write(1, 0, &[8; 4096], 0),
        0,
        "idle transmission-phase client was dropped"
    );
    assert_eq!(c.read(2, 0, 4096).unwrap(), vec![8; 4096]);
}

#[test]
fn reads_past_the_end_of_a_backing_file_truncated_underneath_never_return_stale_memory() {
    // Someone truncates the backing file while it is served: reads of the vanished range must
    // be zeroes or an error (EIO), never leftover buffer contents.
    let d = daemon();
    let (mut c, _) = Client::connect_go(&d.sock);
    for i in 0..16u64 {
        assert_eq!(c.write(i, i * 65536 + 4 * MIB, &[0xc3; 65536], 0), 0);
        c.read(100 + i, i * 65536 + 4 * MIB, 65536).unwrap();
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&d.image)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    for (i, (off, len)) in [
        (6 * MIB, 65536u32),
        (4 * MIB - 4096, 65536),
        (5 * MIB, 1 << 20),
    ]
    .into_iter()
    .enumerate()
    {
        match c.read(200 + i as u64, off, len) {
            Ok(buf) => {
                let tail = (4 * MIB).saturating_sub(off) as usize;
                assert!(
                    buf[tail.min(buf.len())..].iter().all(|&b| b == 0),
                    "read at {off} past the truncated end returned non-zero bytes"
                );
            }
            Err(e) => assert_eq!(e, EIO, "read at {off}: error {e}"),
        }
    }
    assert_eq!(c.read(300, 0, 4096).unwrap(), vec![0; 4096]);
}

#[test]
fn a_kernel_style_client_with_128_requests_in_flight_gets_consistent_replies() {
    let initial = random_bytes(50, 16 * MIB as usize);
    let d = Daemon::plain_with(&initial, &[]);
    let model = kernel_style_session(&d.sock, 0, initial, 128, 4000, 77);
    let (mut c, _) = Client::connect_go(&d.sock);
    c.request(0, CMD_FLUSH, 1, 0, 0, &[]).unwrap();
    assert_eq!(c.simple_reply().unwrap(), (0, 1));
    let disk = std::fs::read(&d.image).unwrap();
    assert!(
        disk == model,
        "backing file differs from the model at {:?}",
        first_difference(&disk, &model)
    );
}

#[test]
fn four_kernel_style_connections_on_disjoint_regions_stay_consistent() {
    let region = 8 * MIB;
    let d = Daemon::plain(4 * region, &[]);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let sock = d.sock.clone();
            std::thread::spawn(move || {
                kernel_style_session(
                    &sock,
                    t * region,
                    vec![0; region as usize],
                    64,
                    1500,
                    100 + t,
                )
            })
        })
        .collect();
    let models: Vec<Vec<u8>> = threads
        .into_iter()
        .map(|t| t.join().expect("session"))
        .collect();
    let disk = std::fs::read(&d.image).unwrap();
    for (t, m) in models.iter().enumerate() {
        let part = &disk[t * region as usize..(t + 1) * region as usize];
        assert!(
            part == &m[..],
            "region {t} differs from its model at {:?}",
            first_difference(part, m)
        );
    }
}
