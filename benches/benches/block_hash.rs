//! The checksum resilience mode's hashing: SHA-256 of every 4096-byte block of a hot zone.
//! `block_hash::hash_blocks` (two blocks per pass with SHA-NI where the CPU has it) against
//! the portable one-block-at-a-time path (the `sha2` crate, itself SHA-NI accelerated), in
//! the same run, over 1 MiB (cache-resident, as in a re-encryption chunk) and 64 MiB (cold).
//!
//! `cargo bench -p nbdcrypt-benches --bench block_hash`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use nbdcrypt::crypto::block_hash::{
    hash_blocks, hash_blocks_portable, sha256_accelerated, sums_len,
};
use nbdcrypt::crypto::kdf::HashAlg;

fn bench(c: &mut Criterion) {
    eprintln!("two-stream SHA-NI path: {}", sha256_accelerated());
    let mut g = c.benchmark_group("sha256_4096_blocks");
    for len in [1usize << 20, 64 << 20] {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        let mut out = vec![0u8; sums_len(HashAlg::Sha256, len, 4096)];
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(format!("two_stream_{}MiB", len >> 20), |b| {
            b.iter(|| hash_blocks(HashAlg::Sha256, black_box(&data), 4096, &mut out))
        });
        g.bench_function(format!("portable_{}MiB", len >> 20), |b| {
            b.iter(|| hash_blocks_portable(HashAlg::Sha256, black_box(&data), 4096, &mut out))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
