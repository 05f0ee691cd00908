//! The byte budgets (`--max-conn-bytes`, `--max-server-bytes`) bound the memory the daemon
//! really uses, not just the payload bytes (issue 8): every buffer a request holds is charged —
//! on an encrypted volume a WRITE holds its payload AND a ciphertext buffer, and a READ its
//! reply buffer until the reply has left — and idle buffers kept for reuse are bounded apart.
//!
//! Clients that pipeline large requests and do not read their replies must not push the
//! daemon's resident memory past the documented bound, and must not stop other clients from
//! being served.

use nbdcrypt_tests::raw::*;
use nbdcrypt_tests::*;
use std::io::Write;
use std::time::{Duration, Instant};

const CONN_BUDGET: u64 = 40 * MIB;
const SERVER_BUDGET: u64 = 96 * MIB;
const THREADS: u64 = 16;
/// What the daemon may hold beyond its byte budgets, as documented in the README: per
/// connection the 256 KiB request reader and at most 16 MiB of idle buffers kept for reuse, per
/// worker thread the crypt layer's 260 KiB ciphertext chunk; plus 32 MiB for thread stacks and
/// what the allocator keeps of freed memory (glibc's per-thread arenas; measured 10-30 MiB).
fn documented_extra(connections: u64) -> u64 {
    let per_conn = 256 * KIB + 16 * MIB + THREADS * (256 + 4) * KIB;
    connections * per_conn + 32 * MIB
}

fn status_kib(pid: i32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} missing"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Send `count` WRITEs of `len` bytes then `count` READs of `len` bytes, reading no reply.
fn hog(sock: &std::path::Path, base: u64, len: u32, count: u64) -> Client {
    let (mut c, _) = Client::connect_go(sock);
    c.s.set_write_timeout(None).unwrap();
    let payload = vec![0xa5u8; len as usize];
    for i in 0..count {
        c.request(0, CMD_WRITE, i, base + i * u64::from(len), len, &payload)
            .unwrap();
    }
    for i in 0..count {
        c.request(0, CMD_READ, 1000 + i, base + i * u64::from(len), len, &[])
            .unwrap();
    }
    c.s.flush().unwrap();
    c
}

#[test]
fn clients_pipelining_large_requests_without_reading_stay_within_the_memory_bound() {
    let conn = CONN_BUDGET.to_string();
    let server = SERVER_BUDGET.to_string();
    let threads = THREADS.to_string();
    let d = Daemon::luks(
        400 * MIB,
        4096,
        &[
            "--max-conn-bytes",
            &conn,
            "--max-server-bytes",
            &server,
            "--threads",
            &threads,
        ],
    );
    let pid = d.pid();
    // Warm up: one ordinary request, so the baseline includes the unlocked volume.
    let (mut probe, _) = Client::connect_go(&d.sock);
    assert_eq!(probe.write(1, 0, &[7; 4096], 0), 0);
    let baseline = status_kib(pid, "VmRSS:") * KIB;

    // Two clients each ask for 3 MiB WRITEs then READs, 2 x 48 MiB each, reading nothing.
    let hogs: Vec<_> = (0..2u64)
        .map(|h| {
            let sock = d.sock.clone();
            std::thread::spawn(move || hog(&sock, (8 + h * 160) * MIB, 3 << 20, 16))
        })
        .collect();
    // Meanwhile another client is served, within seconds.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut cookie = 10;
    while Instant::now() < deadline {
        let data = random_bytes(cookie, 65536);
        assert_eq!(probe.write(cookie, 4096, &data, 0), 0);
        assert_eq!(
            probe.read(cookie + 1, 4096, 65536).unwrap(),
            data,
            "probe read back"
        );
        cookie += 2;
        std::thread::sleep(Duration::from_millis(50));
    }
    let peak = status_kib(pid, "VmHWM:") * KIB;
    let now = status_kib(pid, "VmRSS:") * KIB;
    let bound = SERVER_BUDGET + documented_extra(3);
    eprintln!(
        "baseline {} MiB, peak {} MiB, now {} MiB above it: bound {} MiB",
        baseline / MIB,
        peak.saturating_sub(baseline) / MIB,
        now.saturating_sub(baseline) / MIB,
        bound / MIB
    );
    assert!(
        peak <= baseline + bound,
        "resident memory peaked {} MiB above the baseline, past the documented bound of {} MiB \
         (server budget {} MiB + per-connection extras)",
        (peak - baseline) / MIB,
        bound / MIB,
        SERVER_BUDGET / MIB
    );
    // The hogs' requests are all answered once they read.
    for h in hogs {
        let mut c = h.join().expect("hog");
        c.s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut writes = 0;
        let mut reads = 0;
        for _ in 0..32 {
            let (err, cookie) = c.simple_reply().expect("hog reply");
            assert_eq!(err, 0);
            if cookie >= 1000 {
                // Reads may overtake the writes to the same range (NBD does not order them):
                // only the length is checked.
                assert_eq!(c.read_n(3 << 20).unwrap().len(), 3 << 20);
                reads += 1;
            } else {
                writes += 1;
            }
        }
        assert_eq!((writes, reads), (16, 16));
    }
    assert_eq!(probe.read(99, 0, 4096).unwrap(), vec![7; 4096]);
}
