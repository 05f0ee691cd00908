//! AES-XTS throughput: `nbdcrypt::crypto::xts::SectorCipher` against the AES-only ceiling (the
//! `aes` crate's plain `encrypt_blocks` over the same buffer) and the `xts-mode` crate.
//!
//! One group per sector size (512, 4096), 1 MiB buffer, AES-256-XTS (64-byte key), one thread.
//! Compare with `openssl speed -evp aes-256-xts -bytes 4096` run in the same sitting.
//!
//! Time is this thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), as in
//! `shared/docs/xts-performance.md`, because the build machine is shared and wall-clock figures
//! swing with other people's compiles. Set `XTS_BENCH_WALL=1` for wall-clock time, or
//! `XTS_BENCH_RATIO=1` for a quick interleaved median ratio of ours to the ceiling.
//! Throughput is printed in decimal GB/s (10^9 bytes per second).

use std::time::Duration;

use aes::cipher::array::Array;
use aes::cipher::consts::U16;
use aes::cipher::{BlockCipherEncrypt, KeyInit};
use aes::Aes256;
use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{black_box, Criterion, Throughput};
use nbdcrypt::crypto::keys::VolumeKey;
use nbdcrypt::crypto::xts::{SectorCipher, VaesPass};
use nix::time::{clock_gettime, ClockId};
use xts_mode::{get_tweak_default, Xts128};

const BUF: usize = 1 << 20;

fn key() -> Vec<u8> {
    (0u8..64)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect()
}

fn bench_sector_size<M: Measurement>(c: &mut Criterion<M>, sector_size: usize) {
    let key = key();
    let ours = SectorCipher::new(&VolumeKey::from_slice(&key), sector_size).expect("valid key");
    let ecb = Aes256::new_from_slice(&key[..32]).expect("32-byte key");
    let reference = Xts128::new(
        Aes256::new_from_slice(&key[..32]).expect("32-byte key"),
        Aes256::new_from_slice(&key[32..]).expect("32-byte key"),
    );
    let mut buf = vec![0x5au8; BUF];
    let mut group = c.benchmark_group(format!("xts-{sector_size}"));
    group.throughput(Throughput::Bytes(BUF as u64));

    group.bench_function(format!("ours-encrypt ({})", ours.implementation()), |b| {
        b.iter(|| {
            ours.encrypt_in_place(black_box(&mut buf), 8)
                .expect("whole sectors")
        })
    });
    group.bench_function(format!("ours-decrypt ({})", ours.implementation()), |b| {
        b.iter(|| {
            ours.decrypt_in_place(black_box(&mut buf), 8)
                .expect("whole sectors")
        })
    });
    let portable =
        SectorCipher::new_portable(&VolumeKey::from_slice(&key), sector_size).expect("valid key");
    group.bench_function("ours-encrypt (portable fallback)", |b| {
        b.iter(|| {
            portable
                .encrypt_in_place(black_box(&mut buf), 8)
                .expect("whole sectors")
        })
    });
    group.bench_function("aes-ecb-encrypt_blocks (ceiling)", |b| {
        b.iter(|| {
            let (blocks, _) = Array::<u8, U16>::slice_as_chunks_mut(black_box(&mut buf[..]));
            ecb.encrypt_blocks(blocks)
        })
    });
    group.bench_function("xts-mode-encrypt_area", |b| {
        b.iter(|| reference.encrypt_area(black_box(&mut buf), sector_size, 1, get_tweak_default))
    });
    group.finish();
}

fn run<M: Measurement>(mut c: Criterion<M>) {
    bench_sector_size(&mut c, 512);
    bench_sector_size(&mut c, 4096);
    c.final_summary();
}

/// `XTS_BENCH_RATIO=1`: alternate ours and the ECB ceiling on the same buffer, 400 rounds of
/// 8 buffer passes each, and print the median thread-CPU time of each as GB/s and as a ratio.
/// Alternating puts both under the same background load, so the ratio is steadier on a shared
/// machine than two separate criterion runs.
fn median_ratio() {
    const ROUNDS: usize = 400;
    const PASSES: u32 = 8;
    let key = key();
    let ecb = Aes256::new_from_slice(&key[..32]).expect("32-byte key");
    let mut buf = vec![0x5au8; BUF];
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // Each VAES pass separately (the one `Auto` picks is what the daemon runs), all three
    // alternating with the ceiling in every round.
    let passes = [
        VaesPass::Auto,
        VaesPass::TweaksInRegisters,
        VaesPass::TweaksBuffered,
    ];
    for sector_size in [512, 4096] {
        let ciphers: Vec<SectorCipher> = passes
            .iter()
            .map(|&p| {
                let mut c =
                    SectorCipher::new(&VolumeKey::from_slice(&key), sector_size).expect("key");
                c.set_vaes_pass(p);
                c
            })
            .collect();
        let mut enc = vec![Vec::new(); passes.len()];
        let mut dec = vec![Vec::new(); passes.len()];
        let mut ceil = Vec::new();
        for _ in 0..ROUNDS {
            for (i, ours) in ciphers.iter().enumerate() {
                let t = thread_cpu_now();
                for _ in 0..PASSES {
                    ours.encrypt_in_place(black_box(&mut buf), 8)
                        .expect("whole sectors");
                }
                enc[i].push((thread_cpu_now() - t).as_secs_f64());
                let t = thread_cpu_now();
                for _ in 0..PASSES {
                    ours.decrypt_in_place(black_box(&mut buf), 8)
                        .expect("whole sectors");
                }
                dec[i].push((thread_cpu_now() - t).as_secs_f64());
            }
            let t = thread_cpu_now();
            for _ in 0..PASSES {
                let (blocks, _) = Array::<u8, U16>::slice_as_chunks_mut(black_box(&mut buf[..]));
                ecb.encrypt_blocks(blocks);
            }
            ceil.push((thread_cpu_now() - t).as_secs_f64());
        }
        let ceil = median(&mut ceil);
        let gbs = |secs: f64| f64::from(PASSES) * BUF as f64 / secs / 1e9;
        println!(
            "median of {ROUNDS}, {sector_size:>4} B sectors ({}), ECB ceiling {:.1} GB/s:",
            ciphers[0].implementation(),
            gbs(ceil)
        );
        for (i, pass) in passes.iter().enumerate() {
            let (e, d) = (median(&mut enc[i]), median(&mut dec[i]));
            println!(
                "  {:<20} enc {:5.1} GB/s = {:5.1} % of ceiling, dec {:5.1} GB/s = {:5.1} %",
                format!("{pass:?}"),
                gbs(e),
                100.0 * ceil / e,
                gbs(d),
                100.0 * ceil / d,
            );
        }
    }
}

fn main() {
    if std::env::var_os("XTS_BENCH_RATIO").is_some() {
        median_ratio();
    } else if std::env::var_os("XTS_BENCH_WALL").is_some() {
        run(Criterion::default()
            .with_measurement(WallTime)
            .configure_from_args());
    } else {
        run(Criterion::default()
            .with_measurement(ThreadCpuTime)
            .configure_from_args());
    }
}

/// CPU time consumed by the benchmarking thread.
struct ThreadCpuTime;

fn thread_cpu_now() -> Duration {
    // The thread CPU clock exists on every Linux; a failure would make every figure meaningless,
    // so stop the benchmark rather than report garbage.
    let ts = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).expect("thread CPU clock");
    Duration::from(ts)
}

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu_now()
    }
    fn end(&self, start: Duration) -> Duration {
        thread_cpu_now().saturating_sub(start)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuFormatter
    }
}

struct CpuFormatter;

impl ValueFormatter for CpuFormatter {
    fn scale_values(&self, ns: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = if ns < 1e3 {
            (1.0, "ns cpu")
        } else if ns < 1e6 {
            (1e-3, "µs cpu")
        } else if ns < 1e9 {
            (1e-6, "ms cpu")
        } else {
            (1e-9, "s cpu")
        };
        for v in values {
            *v *= factor;
        }
        unit
    }

    fn scale_throughputs(&self, _typical: f64, t: &Throughput, values: &mut [f64]) -> &'static str {
        let (amount, unit) = match *t {
            Throughput::Bytes(n) | Throughput::BytesDecimal(n) => (n as f64, "GB/s"),
            Throughput::Elements(n) => (n as f64, "Gelem/s"),
        };
        for v in values {
            *v = amount / *v; // per ns = 10^9 per s
        }
        unit
    }

    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}
