//! The crypt layer's data path end to end, without sockets: `CryptDevice` over an in-memory
//! device, 1 MiB READs and WRITEs walking a 320 MiB device (so the data is cold, as page-cache
//! data is in the server; each variant in its own region), against
//! - the same layer with a null cipher ("null": `CryptDevice` exactly as the daemon runs it,
//!   chunking, ciphertext buffer and all, but the "cipher" copies on write and does nothing on
//!   read), so crypt − null is what the AES work costs inside the data path;
//! - the memory device alone ("plain": the copy the layer cannot avoid), so null − plain is what
//!   the layer itself adds;
//! - the cipher alone on a hot 1 MiB buffer ("cipher"): crypt − null − cipher is what running
//!   the cipher on the data path costs beyond running it on a hot buffer (memory traffic);
//! - and both layers' WRITEs through `write_at_scratch` (what the NBD session calls: the layer
//!   encrypts the caller's buffer in place, no ciphertext buffer).
//!
//! `cargo bench -p nbdcrypt-benches --bench crypt_layer` runs criterion groups. With
//! `CRYPT_BENCH_RATIO=1` it instead alternates the variants for 200 rounds and prints the
//! median thread-CPU µs per MiB of each and their ratios, steadier on a shared machine.
//! The sector size is 4096 unless `CRYPT_BENCH_SECTOR=512`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{black_box, Criterion, Throughput};
use nbdcrypt::block::crypt::{CryptDevice, SectorTransform, Segment};
use nbdcrypt::block::{BlockDevice, Caps, Error, Extent, ZeroFlags};
use nbdcrypt::crypto::keys::VolumeKey;
use nbdcrypt::crypto::xts::{SectorCipher, XtsError};
use nix::time::{clock_gettime, ClockId};

const DEVICE: usize = 320 << 20;
const REQ: usize = 1 << 20;

/// A plain in-memory device.
struct Mem(Mutex<Vec<u8>>);

impl BlockDevice for Mem {
    fn size(&self) -> u64 {
        DEVICE as u64
    }
    fn caps(&self) -> Caps {
        Caps {
            read_only: false,
            trim: false,
            fast_zero: false,
            min_block: 1,
            preferred_block: 4096,
            rotational: false,
        }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let m = self.0.lock().unwrap();
        buf.copy_from_slice(&m[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64, _: bool) -> Result<(), Error> {
        let mut m = self.0.lock().unwrap();
        m[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<(), Error> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), Error> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, length: u64, _: ZeroFlags) -> Result<(), Error> {
        let mut m = self.0.lock().unwrap();
        m[offset as usize..(offset + length) as usize].fill(0);
        Ok(())
    }
    fn cache(&self, _: u64, _: u64) -> Result<(), Error> {
        Ok(())
    }
    fn extents(&self, _: u64, length: u64) -> Result<Vec<Extent>, Error> {
        Ok(vec![Extent {
            length,
            hole: false,
            zero: false,
        }])
    }
}

/// The null cipher: ciphertext = plaintext. Benchmarks only; lives here, not in the daemon.
struct NullCipher(usize);

impl NullCipher {
    fn check(&self, len: usize) -> Result<(), XtsError> {
        if len.is_multiple_of(self.0) {
            Ok(())
        } else {
            Err(XtsError::PartialSector {
                len,
                sector_size: self.0,
            })
        }
    }
}

impl SectorTransform for NullCipher {
    fn sector_size(&self) -> usize {
        self.0
    }
    fn encrypt_into(&self, src: &[u8], dst: &mut [u8], _: u64) -> Result<(), XtsError> {
        self.check(src.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }
    fn encrypt_in_place(&self, data: &mut [u8], _: u64) -> Result<(), XtsError> {
        self.check(data.len())
    }
    fn decrypt_in_place(&self, data: &mut [u8], _: u64) -> Result<(), XtsError> {
        self.check(data.len())
    }
}

struct Setup {
    plain: Arc<Mem>,
    crypt: CryptDevice,
    null: CryptDevice<NullCipher>,
    cipher: SectorCipher,
}

fn key() -> VolumeKey {
    let k: Vec<u8> = (0u8..64)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    VolumeKey::from_slice(&k)
}

fn setup() -> Setup {
    let sector = match std::env::var("CRYPT_BENCH_SECTOR").as_deref() {
        Ok("512") => 512,
        _ => 4096,
    };
    // CRYPT_BENCH_CHUNK=65536 etc.: the layer's step size (at most its CHUNK, 256 KiB).
    let chunk = std::env::var("CRYPT_BENCH_CHUNK")
        .ok()
        .and_then(|c| c.parse::<usize>().ok());
    // Touch every page up front: page faults are not what is measured.
    let plain = Arc::new(Mem(Mutex::new(vec![0x5a; DEVICE])));
    let segment = Segment {
        offset: 0,
        size: DEVICE as u64,
        iv_tweak: 0,
    };
    let inner: Arc<dyn BlockDevice> = plain.clone();
    let mut crypt = CryptDevice::new(
        inner.clone(),
        SectorCipher::new(&key(), sector).unwrap(),
        segment,
        false,
    )
    .expect("crypt device");
    let mut null =
        CryptDevice::new(inner, NullCipher(sector), segment, false).expect("null device");
    if let Some(c) = chunk {
        crypt.set_chunk_for_benchmarks(c);
        null.set_chunk_for_benchmarks(c);
    }
    Setup {
        plain,
        crypt,
        null,
        cipher: SectorCipher::new(&key(), sector).unwrap(),
    }
}

/// Offsets of successive requests: a walk over the whole device.
struct Walk(usize);

impl Walk {
    fn next(&mut self) -> u64 {
        self.0 = (self.0 + REQ) % DEVICE;
        self.0 as u64
    }
}

type Variant<'a> = (&'static str, Box<dyn FnMut(&mut [u8]) + 'a>);

fn variants(s: &Setup) -> Vec<Variant<'_>> {
    // Each variant walks its own part of the device, 40 MiB from the next one's: a variant
    // never reads what another just pulled into the caches (L3 here: 32 MiB).
    let walk = |i: usize| Walk(i * (40 << 20));
    let (mut w1, mut w2, mut w3, mut w4) = (walk(0), walk(2), walk(3), walk(5));
    let (mut w5, mut w6) = (walk(1), walk(4));
    let (mut w7, mut w8) = (walk(6), walk(7));
    vec![
        (
            "plain read",
            Box::new(move |b| s.plain.read_at(b, w1.next()).unwrap()),
        ),
        (
            "null-cipher layer read",
            Box::new(move |b| s.null.read_at(b, w5.next()).unwrap()),
        ),
        (
            "crypt read",
            Box::new(move |b| s.crypt.read_at(b, w2.next()).unwrap()),
        ),
        (
            "plain write",
            Box::new(move |b| s.plain.write_at(b, w3.next(), false).unwrap()),
        ),
        (
            "null-cipher layer write",
            Box::new(move |b| s.null.write_at(b, w6.next(), false).unwrap()),
        ),
        (
            "crypt write",
            Box::new(move |b| s.crypt.write_at(b, w4.next(), false).unwrap()),
        ),
        (
            "cipher only (hot 1 MiB)",
            Box::new(move |b| s.cipher.encrypt_in_place(b, 8).unwrap()),
        ),
        // What the NBD session calls for a WRITE: the payload buffer is given up and the
        // layer encrypts it in place (the buffer then holds ciphertext; the bench does not
        // care what it writes).
        (
            "null-cipher write in place",
            Box::new(move |b| s.null.write_at_scratch(b, w7.next(), false).unwrap()),
        ),
        (
            "crypt write in place",
            Box::new(move |b| s.crypt.write_at_scratch(b, w8.next(), false).unwrap()),
        ),
    ]
}

fn criterion_run() {
    let s = setup();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let mut group = c.benchmark_group("crypt-layer-1MiB");
    group.throughput(Throughput::Bytes(REQ as u64));
    let mut buf = vec![0x33u8; REQ];
    for (name, mut f) in variants(&s) {
        group.bench_function(name, |b| b.iter(|| f(black_box(&mut buf))));
    }
    group.finish();
    c.final_summary();
}

fn thread_cpu_now() -> Duration {
    Duration::from(clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).expect("thread CPU clock"))
}

fn median_ratio() {
    const ROUNDS: usize = 200;
    const PASSES: u32 = 4;
    let s = setup();
    let mut vs = variants(&s);
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); vs.len()];
    let mut buf = vec![0x33u8; REQ];
    for _ in 0..ROUNDS {
        for (i, (_, f)) in vs.iter_mut().enumerate() {
            let t = thread_cpu_now();
            for _ in 0..PASSES {
                f(black_box(&mut buf));
            }
            times[i].push((thread_cpu_now() - t).as_secs_f64() * 1e6 / f64::from(PASSES));
        }
    }
    let med: Vec<f64> = times
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect();
    let sector = s.cipher.sector_size();
    let chunk = std::env::var("CRYPT_BENCH_CHUNK").unwrap_or_else(|_| "262144".into());
    println!(
        "median of {ROUNDS} rounds, {sector}-byte sectors, {chunk}-byte steps, \
         thread CPU µs per MiB:"
    );
    for ((name, _), m) in vs.iter().zip(&med) {
        println!("  {name:<24} {m:8.1}");
    }
    let (pr, nr, cr, pw, nw, cw, ci) = (med[0], med[1], med[2], med[3], med[4], med[5], med[6]);
    let (nwi, cwi) = (med[7], med[8]);
    for (what, p, n, c) in [
        ("read:             ", pr, nr, cr),
        ("write (copy):     ", pw, nw, cw),
        ("write (in place): ", pw, nwi, cwi),
    ] {
        println!(
            "  {what} crypt/null-cipher {:.2}x (AES adds {:.0} µs/MiB, {:.0} beyond the hot-buffer \
             cipher), null-cipher layer/plain {:.2}x (the layer adds {:.0} µs/MiB)",
            c / n,
            c - n,
            c - n - ci,
            n / p,
            n - p
        );
    }
}

fn main() {
    if std::env::var_os("CRYPT_BENCH_RATIO").is_some() {
        median_ratio();
    } else {
        criterion_run();
    }
}
