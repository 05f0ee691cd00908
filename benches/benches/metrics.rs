//! What the metrics hooks cost one request, on 1 and 2 threads at once: the daemon's sharded
//! counters (`nbdcrypt::metrics::METRICS`) against the previous design, one shared set of
//! counters every thread adds to (reproduced below as the reference), in the same run.
//!
//! One "request" is what the I/O path does for a 4 KiB READ: `METRICS.start` (clock read, two
//! adds), one XTS record with its own two clock reads, and the timer's drop (clock read,
//! histogram and byte adds). For scale, the same run times AES-256-XTS of the 4 KiB itself.
//!
//! `cargo bench -p nbdcrypt-benches --bench metrics` (per-thread ns per request: criterion's
//! time is the wall time of `iters` requests on each thread, all threads at once).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use nbdcrypt::metrics::{bucket, METRICS, NBUCKETS};
use nbdcrypt::nbd::codec::Command;

/// The previous layout: per-command counters on their own cache line, but one instance for
/// the whole process.
#[repr(align(64))]
struct SharedCommand {
    requests: AtomicU64,
    bytes: AtomicU64,
    latency_sum_ns: AtomicU64,
    buckets: [AtomicU64; NBUCKETS],
}

#[repr(align(64))]
struct SharedXts {
    nanos: AtomicU64,
    bytes: AtomicU64,
}

struct Shared {
    commands: [SharedCommand; 8],
    xts: [SharedXts; 2],
    in_flight_requests: AtomicU64,
    in_flight_bytes: AtomicU64,
}

static SHARED: Shared = Shared {
    commands: [const {
        SharedCommand {
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            latency_sum_ns: AtomicU64::new(0),
            buckets: [const { AtomicU64::new(0) }; NBUCKETS],
        }
    }; 8],
    xts: [const {
        SharedXts {
            nanos: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }; 2],
    in_flight_requests: AtomicU64::new(0),
    in_flight_bytes: AtomicU64::new(0),
};

struct SharedTimer {
    command: usize,
    bytes: u64,
    start: Instant,
}

fn shared_start(bytes: u64) -> SharedTimer {
    SHARED.in_flight_requests.fetch_add(1, Ordering::Relaxed);
    SHARED.in_flight_bytes.fetch_add(bytes, Ordering::Relaxed);
    SharedTimer {
        command: 0,
        bytes,
        start: Instant::now(),
    }
}

fn shared_xts(encrypt: bool, bytes: usize, nanos: u64) {
    let x = &SHARED.xts[usize::from(!encrypt)];
    x.nanos.fetch_add(nanos, Ordering::Relaxed);
    x.bytes
        .fetch_add(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
}

impl Drop for SharedTimer {
    fn drop(&mut self) {
        let ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let c = &SHARED.commands[self.command];
        c.requests.fetch_add(1, Ordering::Relaxed);
        c.bytes.fetch_add(self.bytes, Ordering::Relaxed);
        c.latency_sum_ns.fetch_add(ns, Ordering::Relaxed);
        c.buckets[bucket(ns)].fetch_add(1, Ordering::Relaxed);
        SHARED.in_flight_requests.fetch_sub(1, Ordering::Relaxed);
        SHARED
            .in_flight_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

fn elapsed_ns(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn sharded_request() {
    let timer = METRICS.start(Command::Read, 4096);
    let t = Instant::now();
    black_box(&timer);
    METRICS.xts(false, 4096, elapsed_ns(t));
    drop(timer);
}

fn shared_request() {
    let timer = shared_start(4096);
    let t = Instant::now();
    black_box(&timer);
    shared_xts(false, 4096, elapsed_ns(t));
    drop(timer);
}

/// Wall time of `iters` calls of `f` on each of `threads` threads started together. The
/// threads live for the whole measurement (one pool per benchmark), so each keeps its shard.
fn on_threads(threads: usize, f: fn()) -> impl FnMut(u64) -> Duration {
    move |iters| {
        let start = Barrier::new(threads);
        let mut took = Duration::ZERO;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        let t = Instant::now();
                        for _ in 0..iters {
                            f();
                        }
                        t.elapsed()
                    })
                })
                .collect();
            for h in handles {
                took = took.max(h.join().unwrap());
            }
        });
        took
    }
}

fn hooks(c: &mut Criterion) {
    let mut g = c.benchmark_group("metrics_hooks");
    g.throughput(Throughput::Elements(1));
    for threads in [1usize, 2] {
        g.bench_function(format!("shared_{threads}t"), |b| {
            b.iter_custom(on_threads(threads, shared_request))
        });
        g.bench_function(format!("sharded_{threads}t"), |b| {
            b.iter_custom(on_threads(threads, sharded_request))
        });
    }
    // Scale: what the 4 KiB of a 4 KiB READ costs to decrypt, same run, one thread.
    let key: Vec<u8> = (1..=64u8).collect();
    let key = nbdcrypt::crypto::keys::VolumeKey::from_slice(&key);
    let cipher = nbdcrypt::crypto::xts::SectorCipher::new(&key, 4096).unwrap();
    let mut buf = vec![0u8; 4096];
    g.bench_function(format!("xts_4k_{}", cipher.implementation()), |b| {
        b.iter(|| {
            cipher.decrypt_in_place(black_box(&mut buf), 0).unwrap();
        })
    });
    // A scrape sums the shards; what one costs (not on the I/O path).
    g.bench_function("scrape_sum", |b| {
        b.iter(|| black_box(METRICS.command_totals()))
    });
    g.finish();
}

criterion_group!(benches, hooks);
criterion_main!(benches);
